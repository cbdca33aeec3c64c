// Block devices end to end: the toolstack's vbd nodes, blkback in dom0 over
// a raw file, xbf in the guest, guest.disks(). The scripted images reach
// the guest's xbf softc and put raw requests on the real ring, so blkback's
// checks meet malformed bytes, not a mock.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const cli = join(root, 'dist/lib/cli/main.js');
const xbfModule = pathToFileURL(join(root, 'dist/lib/drivers/xbf/xbf.js')).href;
const dir = mkdtempSync(join(tmpdir(), 'xenpv-blk-'));

function diskCreate(name: string, size: string): { status: number | null; stdout: string; stderr: string; file: string } {
  const file = join(dir, name);
  const r = spawnSync(process.execPath, [cli, 'disk', 'create', file, size], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, file };
}

async function runGuest(cfg: string): Promise<{ reason: string; console: string }> {
  const m = await Machine.boot();
  try {
    const exit = await m.waitExit(await m.create(loadDomainConfig(cfg)));
    return { reason: exit.reason, console: exit.console };
  } finally {
    await m.stop();
  }
}

t.test('xenpv disk create: sizes, EEXIST, EINVAL', async (t) => {
  const ok = diskCreate('a.img', '1M');
  t.equal(ok.status, 0);
  t.equal(readFileSync(ok.file).length, 1 << 20);
  const again = diskCreate('a.img', '1M');
  t.equal(again.status, 1);
  t.match(again.stderr, /^xenpv: EEXIST/);
  const bad = diskCreate('b.img', '100');
  t.equal(bad.status, 2);
  t.match(bad.stderr, /^xenpv: EINVAL/);
});

t.test('disk-pattern fills, flushes and verifies an 8 MiB file disk', async (t) => {
  const img = diskCreate('pattern.img', '8M');
  t.equal(img.status, 0, img.stderr);
  const cfg = join(dir, 'pattern.cfg');
  writeFileSync(cfg, `name = "disk-pattern"\nmemory = 32\nkernel = "${join(root, 'examples/disk-pattern/disk-pattern.mjs')}"\n`
    + `disk = [ 'format=raw, vdev=xvda, access=rw, target=pattern.img' ]\n`);
  const exit = await runGuest(cfg);
  t.equal(exit.reason, 'poweroff', exit.console);
  t.match(exit.console, /^verified 16384 sectors$/m);
  const data = readFileSync(img.file);
  let bad = 0;
  for (let n = 0; n < data.length / 512; n++) {
    for (let i = n * 512; i < (n + 1) * 512; i++) if (data[i] !== n % 251) bad++;
  }
  t.equal(bad, 0, 'the backing file holds the pattern');
});

// Puts `fields` as one raw blkif request on xbf's ring under a free ccb and returns the status.
const rawRequest = `
function raw(x, sc, op, nrSegments, sector, segs) {
  const ccb = x.freeCcbs.pop();
  const req = new Uint8Array(112);
  const v = new DataView(req.buffer);
  req[0] = op; req[1] = nrSegments;
  v.setBigUint64(8, BigInt(ccb.id), true);
  v.setBigUint64(16, BigInt(sector), true);
  segs.forEach(([gref, first, last], i) => { v.setUint32(24 + i * 8, gref, true); req[28 + i * 8] = first; req[29 + i * 8] = last; });
  return new Promise((resolve) => {
    ccb.op = op;
    ccb.done = (status) => { ccb.op = -1; x.freeCcbs.push(ccb); resolve(status); };
    x.ring.ring.putRequest(req);
    if (x.ring.ring.pushRequests()) sc.intr.intrSignal(x.ih);
  });
}
`;

t.test('blkback answers malformed requests with BLKIF_RSP_ERROR and keeps serving', async (t) => {
  diskCreate('hostile.img', '1M');
  const image = join(dir, 'hostile.mjs');
  writeFileSync(image, `import { xbfDisks } from '${xbfModule}';
${rawRequest}
export async function main(guest) {
  const sc = guest.sc;
  const x = xbfDisks(sc)[0];
  const seg = [[0, 0, 7]];
  console.log('too many segments ' + await raw(x, sc, 0, 12, 0, []));
  console.log('no segments ' + await raw(x, sc, 0, 0, 0, []));
  console.log('first > last ' + await raw(x, sc, 0, 1, 0, [[0, 3, 2]]));
  console.log('last_sect 8 ' + await raw(x, sc, 0, 1, 0, [[0, 0, 8]]));
  console.log('beyond the disk ' + await raw(x, sc, 0, 1, 2048 - 7, seg));
  console.log('unknown op ' + await raw(x, sc, 9, 0, 0, []));
  console.log('bad gref ' + await raw(x, sc, 0, 1, 0, [[100000, 0, 7]]));
  const [disk] = guest.disks();
  await disk.write(2047, new Uint8Array(512).fill(7));
  console.log('still serving ' + (await disk.read(2047, 1))[511]);
}
`);
  const cfg = join(dir, 'hostile.cfg');
  writeFileSync(cfg, `name = "hostile"\nmemory = 32\nkernel = "hostile.mjs"\ndisk = ['hostile.img,raw,xvda,rw']\n`);
  const exit = await runGuest(cfg);
  t.equal(exit.reason, 'poweroff', exit.console);
  for (const what of ['too many segments', 'no segments', 'first > last', 'last_sect 8', 'beyond the disk', 'unknown op', 'bad gref']) {
    t.match(exit.console, new RegExp(`^${what} -1$`, 'm'), what);
  }
  t.match(exit.console, /^still serving 7$/m);
});

t.test('a read-only disk: EROFS in the guest, BLKIF_RSP_ERROR from blkback, the file unchanged', async (t) => {
  const img = diskCreate('ro.img', '1M');
  writeFileSync(img.file, new Uint8Array(1 << 20).fill(0x5a));
  const image = join(dir, 'ro.mjs');
  writeFileSync(image, `import { xbfDisks } from '${xbfModule}';
export async function main(guest) {
  const [disk] = guest.disks();
  console.log('readOnly ' + disk.readOnly);
  try { await disk.write(0, new Uint8Array(512)); console.log('wrote'); } catch (err) { console.log('write ' + err.code); }
  xbfDisks(guest.sc)[0].readOnly = false; // a frontend that ignores VDISK_READONLY
  try { await disk.write(0, new Uint8Array(512)); console.log('wrote'); } catch (err) { console.log('forced write ' + err.code); }
  console.log('read ' + (await disk.read(0, 1))[0]);
  try { await disk.read(2048, 1); } catch (err) { console.log('outside ' + err.code); }
}
`);
  const cfg = join(dir, 'ro.cfg');
  writeFileSync(cfg, `name = "ro"\nmemory = 32\nkernel = "ro.mjs"\ndisk = ['vdev=xvdb, access=r, target=ro.img']\n`);
  const exit = await runGuest(cfg);
  t.equal(exit.reason, 'poweroff', exit.console);
  t.match(exit.console, /^readOnly true$/m);
  t.match(exit.console, /^write EROFS$/m);
  t.match(exit.console, /^forced write EIO$/m);
  t.match(exit.console, /^read 90$/m);
  t.match(exit.console, /^outside EINVAL$/m);
  t.ok(readFileSync(img.file).every((b) => b === 0x5a), 'the file is unchanged');
});

t.test('disk specs: both forms, devids, errors name file, line and key', async (t) => {
  const cfg = join(dir, 'spec.cfg');
  writeFileSync(cfg, `name = "spec"\nkernel = "x.mjs"\ndisk = [ 'format=raw, vdev=xvda, access=rw, target=a b,c.img',\n  'b.img,raw,xvdb,r', 'format=memory,vdev=xvdq,target=64M' ]\n`);
  const spec = loadDomainConfig(cfg);
  t.same(spec.disks, [
    { vdev: 'xvda', devid: 51712, type: 'file', params: join(dir, 'a b,c.img'), readOnly: false },
    { vdev: 'xvdb', devid: 51728, type: 'file', params: join(dir, 'b.img'), readOnly: true },
    { vdev: 'xvdq', devid: (1 << 28) | (16 << 8), type: 'memory', params: String(64 << 20), readOnly: false },
  ]);
  for (const [body, re] of [
    [`disk = ['vdev=xvda, access=x, target=a.img']`, /spec2\.cfg:3: disk: access x/],
    [`disk = ['format=qcow2, vdev=xvda, target=a.img']`, /spec2\.cfg:3: disk: format/],
    [`disk = ['a.img,raw,sda']`, /spec2\.cfg:3: disk: vdev/],
    [`disk = ['a.img,raw,xvda', 'b.img,raw,xvda']`, /spec2\.cfg:3: disk: vdev xvda given twice/],
    [`disk = ['colour=red']`, /spec2\.cfg:3: disk: unknown disk parameter colour/],
  ] as const) {
    const f = join(dir, 'spec2.cfg');
    writeFileSync(f, `name = "spec"\nkernel = "x.mjs"\n${body}\n`);
    t.throws(() => loadDomainConfig(f), { code: 'ECONFIG', message: re }, body);
  }
});

t.test('memory and null storage: a RAM disk keeps what is written, null reads zeros', async (t) => {
  const image = join(dir, 'ram.mjs');
  writeFileSync(image, `export async function main(guest) {
  const [ram, nul] = guest.disks();
  console.log('sizes ' + ram.sectors + ' ' + nul.sectors);
  const data = new Uint8Array(3 * 4096 + 512).map((_, i) => i % 253);
  await ram.write(5, data);
  await nul.write(5, data);
  await ram.flush();
  const back = await ram.read(5, data.length / 512);
  console.log('ram ' + back.every((b, i) => b === data[i]));
  console.log('null ' + (await nul.read(5, 2)).every((b) => b === 0));
}
`);
  const cfg = join(dir, 'ram.cfg');
  writeFileSync(cfg, `name = "ram"\nmemory = 32\nkernel = "ram.mjs"\ndisk = ['format=memory, vdev=xvda, target=4M', 'format=null, vdev=xvdb, target=1G']\n`);
  const exit = await runGuest(cfg);
  t.equal(exit.reason, 'poweroff', exit.console);
  t.match(exit.console, /^sizes 8192 2097152$/m);
  t.match(exit.console, /^ram true$/m);
  t.match(exit.console, /^null true$/m);
});
