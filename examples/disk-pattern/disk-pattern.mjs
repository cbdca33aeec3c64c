// A guest image that exercises its first disk: every 512-byte sector n gets
// the byte (n mod 251) throughout, then a flush, then everything is read back
// and compared, through one disk.buffer() array. Prints `verified <N> sectors`
// and powers off.

const CHUNK_SECTORS = 256;

function fill(buf, firstSector) {
  for (let s = 0; s < buf.length / 512; s++) buf.fill((firstSector + s) % 251, s * 512, (s + 1) * 512);
}

export async function main(guest) {
  const [disk] = guest.disks();
  if (disk === undefined) throw new Error('no disk attached');
  if (disk.sectorSize !== 512) throw new Error(`sector size ${disk.sectorSize}, want 512`);
  guest.print(`disk ${disk.path}: ${disk.sectors} sectors of ${disk.sectorSize} bytes`);
  // Guest memory the backend reads and writes itself: a whole buffer goes
  // to the disk without a copy (a subarray of it, the last chunk, is copied).
  const buf = disk.buffer(CHUNK_SECTORS * 512);
  const chunk = (n) => (n === CHUNK_SECTORS ? buf : buf.subarray(0, n * 512));
  for (let lba = 0; lba < disk.sectors; lba += CHUNK_SECTORS) {
    const part = chunk(Math.min(CHUNK_SECTORS, disk.sectors - lba));
    fill(part, lba);
    await disk.write(lba, part);
  }
  await disk.flush();
  const want = new Uint8Array(CHUNK_SECTORS * 512);
  for (let lba = 0; lba < disk.sectors; lba += CHUNK_SECTORS) {
    const n = Math.min(CHUNK_SECTORS, disk.sectors - lba);
    const got = chunk(n).fill(0);
    await disk.readInto(lba, got);
    fill(want.subarray(0, n * 512), lba);
    const at = got.findIndex((b, i) => b !== want[i]);
    if (at >= 0) throw new Error(`sector ${lba + Math.floor(at / 512)}: byte ${got[at]}, want ${want[at]}`);
  }
  guest.print(`verified ${disk.sectors} sectors`);
  await guest.shutdown('poweroff');
}
