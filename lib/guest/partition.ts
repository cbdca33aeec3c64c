// Partition tables, read from a disk: the MBR (with the extended partition's
// chain of EBRs) and the GUID partition table of UEFI 2.10 section 5.3 (the
// primary header at LBA 1, the backup at the last LBA when the primary is
// damaged, CRC32 over header and entries). The layouts are the ones Linux's
// block/partitions/msdos.c and efi.c read. Numbers are in the disk's own
// sectors; partitions are numbered as Linux names them (1-4 primary, 5 on
// logical). A table that cannot be right is an EBADMSG error naming why.

import { XenError } from '../errors.js';

/** What the reader needs of a disk: a guest's Disk, or anything with the same three members. */
export type BlockSource = {
  readonly sectorSize: number;
  readonly sectors: number;
  read(lba: number, count: number): Promise<Uint8Array>;
};

export type Partition = {
  /** Linux's number: xvda1 is 1; logical partitions start at 5. */
  number: number;
  /** First sector and length, in the disk's sectors. */
  start: number;
  sectors: number;
  /** MBR: the system id (0x83 Linux, 0x05 extended, ...). */
  mbrType?: number;
  /** MBR: the boot indicator is 0x80. */
  bootable?: boolean;
  /** GPT: the partition type GUID, the partition's own GUID, its name and attribute bits. */
  typeGuid?: string;
  guid?: string;
  name?: string;
  attributes?: bigint;
};

export type PartitionTable = {
  /** `none` when sector 0 carries no 0x55AA signature. */
  scheme: 'mbr' | 'gpt' | 'none';
  /** MBR: the disk signature as 0x%08x; GPT: the disk GUID. */
  id: string;
  partitions: Partition[];
  /** GPT: the primary header was damaged and the backup was read. */
  usedBackup?: boolean;
};

const MBR_TABLE = 446;
const MBR_ENTRY_BYTES = 16;
const MBR_DISK_ID = 440;
const MBR_TYPE_EXTENDED = new Set([0x05, 0x0f, 0x85]);
const MBR_TYPE_GPT = 0xee;
/** A bound on the EBR chain, which could otherwise loop. */
const MAX_LOGICAL = 128;

const GPT_SIGNATURE = 'EFI PART';
const GPT_HEADER_MIN_BYTES = 92;
const GPT_ENTRY_MIN_BYTES = 128;
const GPT_MAX_ENTRIES_BYTES = 1 << 20;

function bad(why: string): XenError {
  return new XenError('EBADMSG', `partition table: ${why}`);
}

// --- CRC32 (IEEE 802.3, reflected, as the UEFI specification uses) -----------

const CRC_TABLE = new Int32Array(256);
for (let n = 0; n < 256; n++) {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  CRC_TABLE[n] = c;
}

export function crc32(bytes: Uint8Array): number {
  let c = -1;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}

// --- MBR -----------------------------------------------------------------------

type MbrEntry = { status: number; type: number; lba: number; sectors: number };

/** The four entries of a boot sector, or null without the 0x55AA signature. */
function mbrEntries(sector: Uint8Array): MbrEntry[] | null {
  if (sector.length < 512 || sector[510] !== 0x55 || sector[511] !== 0xaa) return null;
  const v = new DataView(sector.buffer, sector.byteOffset, 512);
  const out: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const at = MBR_TABLE + i * MBR_ENTRY_BYTES;
    out.push({ status: sector[at]!, type: sector[at + 4]!, lba: v.getUint32(at + 8, true), sectors: v.getUint32(at + 12, true) });
  }
  return out;
}

function checkExtent(disk: BlockSource, what: string, start: number, sectors: number): void {
  if (start + sectors > disk.sectors) throw bad(`${what}: sectors ${start}+${sectors} beyond the disk's ${disk.sectors}`);
}

async function readMbr(disk: BlockSource, sector0: Uint8Array, entries: MbrEntry[]): Promise<PartitionTable> {
  const id = `0x${new DataView(sector0.buffer, sector0.byteOffset).getUint32(MBR_DISK_ID, true).toString(16).padStart(8, '0')}`;
  const partitions: Partition[] = [];
  let extended: Partition | null = null;
  for (const [i, e] of entries.entries()) {
    if (e.type === 0 || e.sectors === 0) continue;
    if (e.status !== 0 && e.status !== 0x80) throw bad(`entry ${i + 1}: boot indicator 0x${e.status.toString(16)}`);
    checkExtent(disk, `partition ${i + 1}`, e.lba, e.sectors);
    const p: Partition = { number: i + 1, start: e.lba, sectors: e.sectors, mbrType: e.type, bootable: e.status === 0x80 };
    partitions.push(p);
    if (MBR_TYPE_EXTENDED.has(e.type)) {
      if (extended !== null) throw bad('two extended partitions');
      extended = p;
    }
  }
  if (extended !== null) partitions.push(...(await readLogical(disk, extended)));
  return { scheme: 'mbr', id, partitions };
}

// parse_extended: each EBR holds one logical partition (relative to the EBR)
// and a link to the next EBR (relative to the extended partition).
async function readLogical(disk: BlockSource, ext: Partition): Promise<Partition[]> {
  const out: Partition[] = [];
  const seen = new Set<number>();
  for (let ebr = ext.start; out.length < MAX_LOGICAL; ) {
    if (seen.has(ebr)) throw bad(`the EBR chain loops at sector ${ebr}`);
    seen.add(ebr);
    const entries = mbrEntries(await disk.read(ebr, 1));
    if (entries === null) throw bad(`no signature in the EBR at sector ${ebr}`);
    const [part, link] = entries as [MbrEntry, MbrEntry];
    if (part.type !== 0 && part.sectors !== 0) {
      const start = ebr + part.lba;
      checkExtent(disk, `partition ${out.length + 5}`, start, part.sectors);
      if (start < ext.start || start + part.sectors > ext.start + ext.sectors) throw bad(`partition ${out.length + 5} lies outside the extended partition`);
      out.push({ number: out.length + 5, start, sectors: part.sectors, mbrType: part.type, bootable: part.status === 0x80 });
    }
    if (link.type === 0 || link.sectors === 0) return out;
    ebr = ext.start + link.lba;
    if (ebr >= ext.start + ext.sectors) throw bad(`an EBR link points outside the extended partition`);
  }
  throw bad(`more than ${MAX_LOGICAL} logical partitions`);
}

// --- GPT -----------------------------------------------------------------------

/** A GUID as text: the first three fields are little-endian on disk (EFI_GUID), uppercase as sfdisk prints it. */
export function guidText(b: Uint8Array): string {
  const hex = (from: number, to: number, reverse: boolean): string => {
    const part = Array.from(b.subarray(from, to), (x) => x.toString(16).padStart(2, '0'));
    return (reverse ? part.reverse() : part).join('');
  };
  return [hex(0, 4, true), hex(4, 6, true), hex(6, 8, true), hex(8, 10, false), hex(10, 16, false)].join('-').toUpperCase();
}

type GptHeader = {
  firstUsable: bigint;
  lastUsable: bigint;
  diskGuid: string;
  entriesLba: bigint;
  nrEntries: number;
  entryBytes: number;
  entriesCrc: number;
};

/** is_gpt_valid's header checks: signature, size, CRC, its own LBA; a string says what is wrong. */
function gptHeader(sector: Uint8Array, lba: number, disk: BlockSource): GptHeader | string {
  const v = new DataView(sector.buffer, sector.byteOffset, sector.length);
  if (Buffer.from(sector.subarray(0, 8)).toString('latin1') !== GPT_SIGNATURE) return 'no "EFI PART" signature';
  const size = v.getUint32(12, true);
  if (size < GPT_HEADER_MIN_BYTES || size > sector.length) return `header size ${size}`;
  // A copy (a Buffer's slice() would be a view) with the CRC field zeroed, as it was computed.
  const copy = new Uint8Array(sector.subarray(0, size));
  copy.fill(0, 16, 20);
  if (crc32(copy) !== v.getUint32(16, true)) return 'header CRC mismatch';
  if (v.getBigUint64(24, true) !== BigInt(lba)) return `header says it is at LBA ${v.getBigUint64(24, true)}, not ${lba}`;
  const h: GptHeader = {
    firstUsable: v.getBigUint64(40, true),
    lastUsable: v.getBigUint64(48, true),
    diskGuid: guidText(sector.subarray(56, 72)),
    entriesLba: v.getBigUint64(72, true),
    nrEntries: v.getUint32(80, true),
    entryBytes: v.getUint32(84, true),
    entriesCrc: v.getUint32(88, true),
  };
  const end = BigInt(disk.sectors);
  if (h.firstUsable > h.lastUsable || h.lastUsable >= end) return `usable sectors ${h.firstUsable}..${h.lastUsable}`;
  if (h.entryBytes < GPT_ENTRY_MIN_BYTES || h.entryBytes % GPT_ENTRY_MIN_BYTES !== 0) return `entry size ${h.entryBytes}`;
  if (h.nrEntries * h.entryBytes > GPT_MAX_ENTRIES_BYTES) return `${h.nrEntries} entries of ${h.entryBytes} bytes`;
  const entrySectors = BigInt(Math.ceil((h.nrEntries * h.entryBytes) / disk.sectorSize));
  if (h.entriesLba < 1n || h.entriesLba + entrySectors > end) return `entries at LBA ${h.entriesLba}`;
  return h;
}

async function readGptAt(disk: BlockSource, lba: number): Promise<{ h: GptHeader; entries: Uint8Array } | string> {
  const h = gptHeader(await disk.read(lba, 1), lba, disk);
  if (typeof h === 'string') return h;
  const bytes = h.nrEntries * h.entryBytes;
  const raw = await disk.read(Number(h.entriesLba), Math.ceil(bytes / disk.sectorSize));
  const entries = raw.subarray(0, bytes);
  if (crc32(entries) !== h.entriesCrc) return 'partition entries CRC mismatch';
  return { h, entries };
}

async function readGpt(disk: BlockSource): Promise<PartitionTable> {
  let usedBackup = false;
  let got = await readGptAt(disk, 1);
  if (typeof got === 'string') {
    const backup = await readGptAt(disk, disk.sectors - 1);
    if (typeof backup === 'string') throw bad(`GPT: primary: ${got}; backup: ${backup}`);
    got = backup;
    usedBackup = true;
  }
  const { h, entries } = got;
  const v = new DataView(entries.buffer, entries.byteOffset, entries.length);
  const partitions: Partition[] = [];
  for (let i = 0; i < h.nrEntries; i++) {
    const at = i * h.entryBytes;
    const type = entries.subarray(at, at + 16);
    if (type.every((b) => b === 0)) continue;
    const first = v.getBigUint64(at + 32, true);
    const last = v.getBigUint64(at + 40, true);
    if (first > last || first < h.firstUsable || last > h.lastUsable) throw bad(`GPT entry ${i + 1}: sectors ${first}..${last} outside ${h.firstUsable}..${h.lastUsable}`);
    const name = Buffer.from(entries.subarray(at + 56, at + 128)).toString('utf16le').replace(/\0.*$/s, '');
    partitions.push({
      number: i + 1, start: Number(first), sectors: Number(last - first + 1n),
      typeGuid: guidText(type), guid: guidText(entries.subarray(at + 16, at + 32)), name, attributes: v.getBigUint64(at + 48, true),
    });
  }
  const table: PartitionTable = { scheme: 'gpt', id: h.diskGuid, partitions };
  if (usedBackup) table.usedBackup = true;
  return table;
}

/**
 * The partition table of `disk`: GPT when the MBR is protective (one 0xEE
 * entry), the MBR's own otherwise, `none` without a boot signature.
 */
export async function readPartitionTable(disk: BlockSource): Promise<PartitionTable> {
  if (disk.sectorSize < 512 || disk.sectors < 1) throw new XenError('EINVAL', 'partition table: not a disk');
  const sector0 = await disk.read(0, 1);
  const entries = mbrEntries(sector0);
  if (entries === null) return { scheme: 'none', id: '', partitions: [] };
  if (entries.some((e) => e.type === MBR_TYPE_GPT)) return readGpt(disk);
  return readMbr(disk, sector0, entries);
}
