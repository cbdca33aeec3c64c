// lib/guest/partition.ts: MBR (with an extended partition's EBR chain) and
// GPT, on images built here byte by byte and, when util-linux's sfdisk is
// installed, on images sfdisk made, compared with what `sfdisk --json`
// reads back. Damaged tables: the GPT backup takes over from a broken
// primary; what cannot be right is EBADMSG. A guest reads a table through
// its own disk at the end.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { crc32, readPartitionTable, type BlockSource, type Partition } from '../lib/guest/partition.js';
import { Machine } from '../lib/machine.js';

const dir = mkdtempSync(join(tmpdir(), 'xenpv-partition-'));
const sfdisk = spawnSync('sfdisk', ['--version'], { encoding: 'utf8' }).status === 0 ? 'sfdisk' : null;

/** A disk over bytes in memory. */
function memDisk(bytes: Uint8Array, sectorSize = 512): BlockSource & { reads: number } {
  const d = {
    sectorSize,
    sectors: bytes.length / sectorSize,
    reads: 0,
    read(lba: number, count: number): Promise<Uint8Array> {
      d.reads++;
      if (lba < 0 || lba + count > d.sectors) return Promise.reject(new Error(`read ${lba}+${count} outside the disk`));
      return Promise.resolve(new Uint8Array(bytes.subarray(lba * sectorSize, (lba + count) * sectorSize)));
    },
  };
  return d;
}

function u32(b: Uint8Array, at: number, v: number): void {
  new DataView(b.buffer, b.byteOffset).setUint32(at, v >>> 0, true);
}

function u64(b: Uint8Array, at: number, v: bigint): void {
  new DataView(b.buffer, b.byteOffset).setBigUint64(at, v, true);
}

/** Four MBR entries [boot, type, lba, sectors] into the boot sector at `at`. */
function mbr(img: Uint8Array, at: number, entries: [number, number, number, number][], diskId = 0): void {
  entries.forEach(([boot, type, lba, sectors], i) => {
    const e = at + 446 + i * 16;
    img[e] = boot;
    img[e + 4] = type;
    u32(img, e + 8, lba);
    u32(img, e + 12, sectors);
  });
  if (at === 0) u32(img, 440, diskId);
  img[at + 510] = 0x55;
  img[at + 511] = 0xaa;
}

/** EFI_GUID bytes of a GUID's text. */
function guidBytes(text: string): Uint8Array {
  const h = text.replace(/-/g, '');
  const b = Uint8Array.from(h.match(/../g)!.map((x) => parseInt(x, 16)));
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

type GptPart = { type: string; guid: string; first: number; last: number; name: string; attrs?: bigint };

/** A GPT (protective MBR, primary and backup header, 128 entries of 128 bytes) as UEFI lays it out. */
function gpt(sectorSize: number, sectors: number, diskGuid: string, parts: GptPart[]): Uint8Array {
  const img = new Uint8Array(sectorSize * sectors);
  mbr(img, 0, [[0, 0xee, 1, Math.min(sectors - 1, 0xffffffff)]]);
  const entries = new Uint8Array(128 * 128);
  parts.forEach((p, i) => {
    const e = i * 128;
    entries.set(guidBytes(p.type), e);
    entries.set(guidBytes(p.guid), e + 16);
    u64(entries, e + 32, BigInt(p.first));
    u64(entries, e + 40, BigInt(p.last));
    u64(entries, e + 48, p.attrs ?? 0n);
    entries.set(Buffer.from(p.name, 'utf16le'), e + 56);
  });
  const entrySectors = entries.length / sectorSize;
  const header = (my: number, alt: number, entriesLba: number): Uint8Array => {
    const h = new Uint8Array(sectorSize);
    h.set(Buffer.from('EFI PART', 'latin1'));
    u32(h, 8, 0x10000);
    u32(h, 12, 92);
    u64(h, 24, BigInt(my));
    u64(h, 32, BigInt(alt));
    u64(h, 40, BigInt(2 + entrySectors));
    u64(h, 48, BigInt(sectors - 2 - entrySectors));
    h.set(guidBytes(diskGuid), 56);
    u64(h, 72, BigInt(entriesLba));
    u32(h, 80, 128);
    u32(h, 84, 128);
    u32(h, 88, crc32(entries));
    u32(h, 16, crc32(h.subarray(0, 92)));
    return h;
  };
  img.set(header(1, sectors - 1, 2), sectorSize);
  img.set(entries, 2 * sectorSize);
  img.set(entries, (sectors - 1 - entrySectors) * sectorSize);
  img.set(header(sectors - 1, 1, sectors - 1 - entrySectors), (sectors - 1) * sectorSize);
  return img;
}

const LINUX = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';
const ESP = 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B';

t.test('MBR: primaries, the boot flag, the disk id and logical partitions through the EBR chain', async (t) => {
  const img = new Uint8Array(8192 * 512);
  mbr(img, 0, [[0x80, 0x83, 2048, 1024], [0, 0x0c, 3072, 1024], [0, 0x05, 4096, 4096], [0, 0, 0, 0]], 0xdeadbeef);
  mbr(img, 4096 * 512, [[0, 0x83, 64, 512], [0, 0x05, 1024, 1024], [0, 0, 0, 0], [0, 0, 0, 0]]);
  mbr(img, 5120 * 512, [[0, 0x82, 64, 256], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]);
  const table = await readPartitionTable(memDisk(img));
  t.same(table, {
    scheme: 'mbr', id: '0xdeadbeef', partitions: [
      { number: 1, start: 2048, sectors: 1024, mbrType: 0x83, bootable: true },
      { number: 2, start: 3072, sectors: 1024, mbrType: 0x0c, bootable: false },
      { number: 3, start: 4096, sectors: 4096, mbrType: 0x05, bootable: false },
      { number: 5, start: 4160, sectors: 512, mbrType: 0x83, bootable: false },
      { number: 6, start: 5184, sectors: 256, mbrType: 0x82, bootable: false },
    ],
  });
});

t.test('GPT: entries, names, GUIDs, attributes; 512- and 4096-byte sectors; the backup when the primary is damaged', async (t) => {
  for (const ss of [512, 4096]) {
    const sectors = ss === 512 ? 8192 : 2048;
    const parts: GptPart[] = [
      { type: LINUX, guid: '11111111-2222-3333-4444-555555555555', first: 40, last: 1063, name: 'root' },
      { type: ESP, guid: 'AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE', first: 1064, last: 1100, name: 'EFI system', attrs: 1n << 2n },
    ];
    const img = gpt(ss, sectors, '01234567-89AB-CDEF-0123-456789ABCDEF', parts);
    const want = {
      scheme: 'gpt', id: '01234567-89AB-CDEF-0123-456789ABCDEF', partitions: parts.map((p, i): Partition => ({
        number: i + 1, start: p.first, sectors: p.last - p.first + 1, typeGuid: p.type, guid: p.guid, name: p.name, attributes: p.attrs ?? 0n,
      })),
    };
    t.same(await readPartitionTable(memDisk(img, ss)), want, `${ss}-byte sectors`);
    const header = img.slice(ss, 2 * ss);
    img[ss + 8]! ^= 0xff; // the primary header's revision: its CRC fails
    t.same(await readPartitionTable(memDisk(img, ss)), { ...want, usedBackup: true }, `${ss}: damaged primary header`);
    img.set(header, ss);
    img[2 * ss + 56]! ^= 0xff; // a name byte in the primary entries: their CRC fails
    t.same(await readPartitionTable(memDisk(img, ss)), { ...want, usedBackup: true }, `${ss}: damaged primary entries`);
    img[(sectors - 1) * ss] = 0; // and the backup's signature
    await t.rejects(readPartitionTable(memDisk(img, ss)), { code: 'EBADMSG' }, `${ss}: both damaged`);
  }
});

t.test('no table, and tables that cannot be right: EBADMSG', async (t) => {
  t.same(await readPartitionTable(memDisk(new Uint8Array(64 * 512))), { scheme: 'none', id: '', partitions: [] });
  const cases: [string, (img: Uint8Array) => void][] = [
    ['beyond the disk', (img) => mbr(img, 0, [[0, 0x83, 2048, 8192]])],
    ['a bad boot indicator', (img) => mbr(img, 0, [[0x42, 0x83, 2048, 8]])],
    ['an EBR chain that loops', (img) => {
      mbr(img, 0, [[0, 0x05, 100, 1000]]);
      mbr(img, 100 * 512, [[0, 0x83, 10, 10], [0, 0x05, 0, 1000]]);
    }],
    ['a logical partition outside the extended one', (img) => {
      mbr(img, 0, [[0, 0x05, 100, 200]]);
      mbr(img, 100 * 512, [[0, 0x83, 150, 100]]);
    }],
    ['a protective MBR without a GPT', (img) => mbr(img, 0, [[0, 0xee, 1, 4095]])],
    ['a GPT entry outside the usable sectors', (img) => {
      img.set(gpt(512, 4096, '01234567-89AB-CDEF-0123-456789ABCDEF', [{ type: LINUX, guid: LINUX, first: 10, last: 4095, name: 'x' }]));
    }],
  ];
  for (const [what, make] of cases) {
    const img = new Uint8Array(4096 * 512);
    make(img);
    await t.rejects(readPartitionTable(memDisk(img)), { code: 'EBADMSG' }, what);
  }
});

/** What sfdisk --json reads from an image, in our terms. */
function sfdiskRead(file: string): { scheme: string; id: string; partitions: Partition[] } {
  const r = spawnSync('sfdisk', ['--json', file], { encoding: 'utf8' });
  const pt = (JSON.parse(r.stdout) as { partitiontable: { label: string; id: string; partitions: Record<string, unknown>[] } }).partitiontable;
  return {
    scheme: pt.label === 'dos' ? 'mbr' : pt.label,
    id: pt.id,
    partitions: pt.partitions.map((p) => {
      const number = Number(/(\d+)$/.exec(p['node'] as string)![1]);
      const base = { number, start: p['start'] as number, sectors: p['size'] as number };
      if (pt.label === 'dos') return { ...base, mbrType: parseInt(p['type'] as string, 16), bootable: p['bootable'] === true };
      return { ...base, typeGuid: p['type'] as string, guid: p['uuid'] as string, name: (p['name'] as string | undefined) ?? '' };
    }),
  };
}

function sfdiskMake(name: string, script: string): string {
  const file = join(dir, name);
  writeFileSync(file, new Uint8Array(16 << 20));
  const r = spawnSync('sfdisk', ['-q', file], { input: script, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`sfdisk: ${r.stderr}`);
  return file;
}

const sfdiskGpt = 'label: gpt\nlabel-id: 01234567-89AB-CDEF-0123-456789ABCDEF\n'
  + `size=1MiB, type=${LINUX}, name="root"\nsize=2MiB, type=${ESP}, name="EFI system"\n`
  + 'type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name="swap", attrs="LegacyBIOSBootable"\n';

t.test('sfdisk (util-linux) builds the tables, the reader reads what sfdisk reads', { skip: sfdisk === null ? 'sfdisk is not installed (apt-get install fdisk)' : false }, async (t) => {
  const dos = sfdiskMake('dos.img', 'label: dos\nlabel-id: 0x12345678\nstart=2048, size=2048, type=83, bootable\n'
    + 'start=4096, size=2048, type=c\nstart=6144, type=5\nsize=1024, type=83\nsize=1024, type=82\n');
  const g = sfdiskMake('gpt.img', sfdiskGpt);
  for (const file of [dos, g]) {
    const ours = await readPartitionTable(memDisk(readFileSync(file)));
    const theirs = sfdiskRead(file);
    t.same({ ...ours, partitions: ours.partitions.map(({ attributes: _, ...p }) => p) }, theirs, file);
  }
  const swap = (await readPartitionTable(memDisk(readFileSync(g)))).partitions[2]!;
  t.equal(swap.attributes, 1n << 2n, 'LegacyBIOSBootable is attribute bit 2');
});

t.test('a guest reads the partition table of its disk', async (t) => {
  const img = sfdisk === null
    ? (() => {
      const f = join(dir, 'guest.img');
      writeFileSync(f, gpt(512, 32768, '01234567-89AB-CDEF-0123-456789ABCDEF', [{ type: LINUX, guid: LINUX, first: 2048, last: 4095, name: 'root' }]));
      return f;
    })()
    : sfdiskMake('guest.img', sfdiskGpt);
  writeFileSync(join(dir, 'parts.mjs'), `export async function main(guest) {
  const [disk] = guest.disks();
  const table = await disk.partitions();
  console.log(JSON.stringify({ ...table, partitions: table.partitions.map(({ attributes, ...p }) => p) }));
}
`);
  const cfg = join(dir, 'parts.cfg');
  writeFileSync(cfg, `name = "parts"\nmemory = 32\nkernel = "parts.mjs"\ndisk = ['format=raw, vdev=xvda, access=ro, target=${img}']\n`);
  const m = await Machine.boot();
  try {
    const exit = await m.waitExit(await m.create(loadDomainConfig(cfg)), AbortSignal.timeout(60_000));
    t.equal(exit.reason, 'poweroff', exit.console);
    const ours = await readPartitionTable(memDisk(readFileSync(img)));
    t.same(JSON.parse(exit.console), { ...ours, partitions: ours.partitions.map(({ attributes: _, ...p }) => p) });
  } finally {
    await m.stop();
  }
});
