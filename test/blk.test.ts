// Block devices end to end: the toolstack's vbd nodes, blkback in dom0 over
// a raw file or memory, xbf in the guest, guest.disks(). Guests run real
// I/O and the test checks the backing file byte for byte.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';
import { readTrace } from '../lib/trace/decode.js';
import { runSim } from './sim-harness.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const cli = join(root, 'dist/lib/cli/main.js');
const xbfModule = pathToFileURL(join(root, 'dist/lib/drivers/xbf/xbf.js')).href;
const randomImage = join(root, 'dist/test/fixtures/blk-random.js');
const dir = mkdtempSync(join(tmpdir(), 'xenpv-blk-'));

function diskCreate(name: string, size: string): { status: number | null; stdout: string; stderr: string; file: string } {
  const file = join(dir, name);
  const r = spawnSync(process.execPath, [cli, 'disk', 'create', file, size], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, file };
}

function cfg(name: string, body: string): string {
  const file = join(dir, `${name}.cfg`);
  writeFileSync(file, `name = "${name}"\nmemory = 64\n${body}\n`);
  return file;
}

/** Boot one host, run the guests of `cfgs` side by side, return each one's exit. */
async function runGuests(...cfgs: string[]): Promise<{ reason: string; console: string }[]> {
  const m = await Machine.boot();
  try {
    const ids: number[] = [];
    for (const c of cfgs) ids.push(await m.create(loadDomainConfig(c)));
    const exits = await Promise.all(ids.map((id) => m.waitExit(id, AbortSignal.timeout(120_000))));
    return exits.map((e) => ({ reason: e.reason, console: e.console }));
  } finally {
    await m.stop();
  }
}

function sha256(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
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
  const [exit] = await runGuests(cfg('disk-pattern', `kernel = "${join(root, 'examples/disk-pattern/disk-pattern.mjs')}"\n`
    + `disk = [ 'format=raw, vdev=xvda, access=rw, target=pattern.img' ]`));
  t.equal(exit!.reason, 'poweroff', exit!.console);
  t.match(exit!.console, /^verified 16384 sectors$/m);
  const data = readFileSync(img.file);
  let bad = 0;
  for (let n = 0; n < data.length / 512; n++) {
    for (let i = n * 512; i < (n + 1) * 512; i++) if (data[i] !== n % 251) bad++;
  }
  t.equal(bad, 0, 'the backing file holds the pattern');
});

// Each variant is a guest of test/fixtures/blk-random with its own 8 MiB
// image of random bytes; the xbf.* words pick what the frontend asks for.
const variants: { name: string; extra: string; disk?: string; want: RegExp }[] = [
  { name: 'defaults', extra: '', want: /protocol=x86_64-abi order=0 queues=1 indirect=32 persistent=true trusted=true/ },
  {
    name: 'plain', extra: 'xbf.max_indirect_segments=0 xbf.feature_persistent=0',
    want: /order=0 queues=1 indirect=0 persistent=false/,
  },
  {
    name: 'big', extra: 'xbf.max_indirect_segments=256 xbf.feature_persistent=0 xbf.max_ring_page_order=2 xbf.max_queues=4',
    want: /order=2 queues=4 indirect=256 persistent=false/,
  },
  { name: 'persistent', extra: 'xbf.max_indirect_segments=0 xbf.max_ring_page_order=1', want: /order=1 queues=1 indirect=0 persistent=true/ },
  {
    name: 'x86-32', extra: 'xbf.protocol=x86_32-abi xbf.max_queues=2 xbf.max_ring_page_order=1 xbf.max_indirect_segments=128',
    want: /protocol=x86_32-abi order=1 queues=2 indirect=128 persistent=true/,
  },
  { name: 'untrusted', extra: '', disk: 'untrusted', want: /indirect=32 persistent=false trusted=false/ },
];

t.test('random reads and writes (512 B..4 MiB, unaligned) match the backing file in every configuration', async (t) => {
  const cfgs = variants.map((v, i) => {
    writeFileSync(join(dir, `${v.name}.img`), randomBytes(8 << 20));
    const disk = `${v.disk === undefined ? '' : `${v.disk}, `}format=raw, vdev=xvda, target=${v.name}.img`;
    return cfg(`random-${v.name}`, `kernel = "${randomImage}"\nextra = "seed=${i + 1} ops=80 qd=8 ${v.extra}"\ndisk = ['${disk}']`);
  });
  const exits = await runGuests(...cfgs);
  for (const [i, v] of variants.entries()) {
    const exit = exits[i]!;
    t.equal(exit.reason, 'poweroff', `${v.name}: ${exit.console}`);
    t.match(exit.console, v.want, `${v.name}: negotiated`);
    const m = /^done ops=(\d+) bytes=(\d+) readback=(\w+) reconnects=0 sha256=([0-9a-f]+)$/m.exec(exit.console);
    t.ok(m !== null, `${v.name}: finished`);
    if (m === null) continue;
    t.equal(Number(m[1]), 80, `${v.name}: every operation done`);
    const b = /^buffers ops=(\d+) granted=(\d+)$/m.exec(exit.console);
    t.ok(b !== null && Number(b[1]) > 0, `${v.name}: transfers through disk.buffer() arrays`);
    // With persistent grants xbf names the buffers' own pages (and grants them); otherwise it copies them as any array.
    const direct = /persistent=true trusted=true/.test(exit.console);
    if (b !== null) t.ok(direct ? Number(b[2]) > 0 : Number(b[2]) === 0, `${v.name}: buffers granted ${b[2]}`);
    t.equal(m[3], 'true', `${v.name}: a final read of the whole disk matches`);
    t.equal(m[4], sha256(join(dir, `${v.name}.img`)), `${v.name}: the file is what the guest wrote`);
  }
});

t.test('discard zeroes exactly the range; FUA writes; secure discard only where the storage offers it', async (t) => {
  const img = join(dir, 'discard.img');
  writeFileSync(img, new Uint8Array(1 << 20).fill(0x11));
  writeFileSync(join(dir, 'discard.mjs'), `export async function main(guest) {
  const [file, ram, nul] = guest.disks();
  const f = file.features;
  console.log('file discard ' + f.discard + ' ' + f.discardGranularity + ' ' + f.discardSecure + ' flush ' + f.flushCache + ' ' + f.barrier);
  console.log('ram discard ' + ram.features.discardSecure + ' flush ' + ram.features.flushCache + ' sizes ' + ram.sectors + ' ' + nul.sectors);
  await file.write(0, new Uint8Array(64 * 512).fill(0xab));
  await file.discard(3, 10);
  await file.discard(file.sectors - 9, 9);
  await file.write(100, new Uint8Array(3 * 512).fill(0xcd), { fua: true });
  const back = await file.read(0, 64);
  console.log('zeros ' + back.subarray(3 * 512, 13 * 512).every((b) => b === 0)
    + ' kept ' + (back.subarray(0, 3 * 512).every((b) => b === 0xab) && back.subarray(13 * 512).every((b) => b === 0xab)));
  for (const [what, p] of [['secure', file.discard(0, 1, { secure: true })], ['outside', file.discard(file.sectors, 1)]]) {
    try { await p; console.log(what + ' ok'); } catch (err) { console.log(what + ' ' + err.code + ' ' + err.op + ' ' + err.lba); }
  }
  const data = new Uint8Array(3 * 4096 + 512).map((_, i) => i % 253);
  await ram.write(5, data);
  await nul.write(5, data);
  await ram.flush();
  console.log('ram ' + (await ram.read(5, data.length / 512)).every((b, i) => b === data[i]));
  await ram.discard(6, 2, { secure: true });
  const r = await ram.read(5, 4);
  console.log('ram discard ' + r.subarray(512, 1536).every((b) => b === 0) + ' ' + r.subarray(1536).every((b, i) => b === data[1536 + i]));
  console.log('null ' + (await nul.read(5, 2)).every((b) => b === 0));
}
`);
  const [exit] = await runGuests(cfg('discard', `kernel = "discard.mjs"\n`
    + `disk = ['discard.img,raw,xvda,rw', 'format=memory, vdev=xvdb, target=4M', 'format=null, vdev=xvdc, target=1G']`));
  const c = exit!.console;
  t.equal(exit!.reason, 'poweroff', c);
  t.match(c, /^file discard true 4096 false flush true true$/m);
  t.match(c, /^ram discard true flush false sizes 8192 2097152$/m);
  t.match(c, /^zeros true kept true$/m);
  t.match(c, /^secure EOPNOTSUPP discard 0$/m);
  t.match(c, /^outside EINVAL discard 2048$/m);
  t.match(c, /^ram true$/m);
  t.match(c, /^ram discard true true$/m);
  t.match(c, /^null true$/m);
  const file = readFileSync(img);
  t.equal(statSync(img).size, 1 << 20, 'the tail discard keeps the size');
  t.ok(file.subarray(0, 3 * 512).every((b) => b === 0xab) && file.subarray(13 * 512, 64 * 512).every((b) => b === 0xab), 'around the range: kept');
  t.ok(file.subarray(3 * 512, 13 * 512).every((b) => b === 0), 'the range: zeros');
  t.ok(file.subarray(100 * 512, 103 * 512).every((b) => b === 0xcd), 'the FUA write');
  t.ok(file.subarray(103 * 512, (2048 - 9) * 512).every((b) => b === 0x11), 'untouched sectors');
  t.ok(file.subarray((2048 - 9) * 512).every((b) => b === 0), 'the tail: zeros');
});

t.test('disk.buffer(): with persistent grants the backend reads and writes the buffer\'s own pages; without, they are copied', async (t) => {
  // Sectors 64..71 hold 0xb7, written by the host: the guest has never had them in any page of its own.
  const img = join(dir, 'direct.img');
  const bytes = new Uint8Array(1 << 20).fill(0x11);
  bytes.fill(0xb7, 64 * 512, 72 * 512);
  writeFileSync(img, bytes);
  writeFileSync(join(dir, 'direct.mjs'), `import { xbfDisks } from '${xbfModule}';
export async function main(guest) {
  const [disk] = guest.disks();
  const x = xbfDisks(guest.sc)[0];
  // Whether any of xbf's request pages starts with n bytes of this byte (a whole page by default).
  const inRequestPages = (v, n = 4096) => x.queues.some((q) => q.ccbs.some((c) => c.pages.some((p) => p.subarray(0, n).every((b) => b === v))));
  const buf = disk.buffer(4096);
  await disk.readInto(64, buf);
  console.log('read ' + buf.every((b) => b === 0xb7) + ' via request pages ' + inRequestPages(0xb7));
  buf.fill(0xc9);
  await disk.write(128, buf);
  console.log('wrote via request pages ' + inRequestPages(0xc9) + ' granted ' + [...x.directs.values()].filter((d) => d.granted).length);
  const part = buf.subarray(0, 1024);
  part.fill(0xd4);
  await disk.write(256, part);
  console.log('subarray via request pages ' + inRequestPages(0xd4, 1024));
  for (const [what, n] of [['zero', 0], ['odd', 100], ['huge', 5 << 20]]) {
    try { disk.buffer(n); console.log(what + ' ok'); } catch (err) { console.log(what + ' ' + err.code + ' ' + err.op); }
  }
  // 4 MiB for all the disks of the guest: the other disk takes what is left, then nothing is.
  for (const [what, d, n] of [['rest on the other disk', guest.disks()[1], (1 << 20) * 4 - 4096], ['one page more', disk, 4096]]) {
    try { d.buffer(n); console.log(what + ' ok'); } catch (err) { console.log(what + ' ' + err.code); }
  }
}
`);
  const disk = `disk = ['format=raw, vdev=xvda, target=direct.img', 'format=memory, vdev=xvdb, target=1M']`;
  const [direct, copied] = await runGuests(cfg('direct', `kernel = "direct.mjs"\n${disk}`), cfg('copied', `kernel = "direct.mjs"\nextra = "xbf.feature_persistent=0"\n${disk}`));
  t.equal(direct!.reason, 'poweroff', direct!.console);
  t.match(direct!.console, /^read true via request pages false$/m, 'a read lands in the buffer, not in a request page');
  t.match(direct!.console, /^wrote via request pages false granted 1$/m, 'a write goes from the buffer\'s own (granted) page');
  t.match(direct!.console, /^subarray via request pages true$/m, 'a subarray of a buffer is copied');
  t.match(direct!.console, /^zero EINVAL buffer$/m);
  t.match(direct!.console, /^odd EINVAL buffer$/m);
  t.match(direct!.console, /^huge ENOMEM buffer$/m);
  t.match(direct!.console, /^rest on the other disk ok$/m);
  t.match(direct!.console, /^one page more ENOMEM$/m, 'the 4 MiB are the guest\'s, not each disk\'s');
  t.equal(copied!.reason, 'poweroff', copied!.console);
  t.match(copied!.console, /^read true via request pages true$/m, 'without persistent grants the read is copied out of a request page');
  t.match(copied!.console, /^wrote via request pages true granted 0$/m, 'and the write copied into one');
  const file = readFileSync(img);
  t.ok(file.subarray(128 * 512, 136 * 512).every((b) => b === 0xc9), 'the buffer\'s write is in the file');
  t.ok(file.subarray(256 * 512, 258 * 512).every((b) => b === 0xd4), 'and the subarray\'s');
});

t.test('blkback pushes a deep queue\'s answers eight at a time, a large transfer\'s and a lone request\'s at once, and none behind a flush or a discard', async (t) => {
  // A deterministic run, so that each burst is on the ring whole before
  // dom0 looks; the trace has every push blkback made and what it published.
  writeFileSync(join(dir, 'push.img'), new Uint8Array(4 << 20));
  writeFileSync(join(dir, 'push.mjs'), `export async function main(guest) {
  const [disk] = guest.disks();
  const page = () => new Uint8Array(4096);
  await disk.readInto(0, page());
  await Promise.all(Array.from({ length: 32 }, (_, i) => disk.readInto(i * 8, page())));
  await Promise.all(Array.from({ length: 8 }, (_, i) => disk.readInto(i * 128, new Uint8Array(65536))));
  await Promise.all([disk.readInto(0, page()), disk.readInto(8, page()), disk.readInto(16, page()), disk.flush()]);
  await Promise.all([disk.readInto(0, page()), disk.readInto(8, page()), disk.discard(64, 8)]);
  guest.print('ring slots ' + (32 << disk.features.ringPageOrder) + ' queues ' + disk.features.queues);
}
`);
  const trace = join(dir, 'push.trace');
  const run = await runSim([loadDomainConfig(cfg('push', `kernel = "push.mjs"\ndisk = ['format=raw, vdev=xvda, access=rw, target=push.img']`))], 5, { trace });
  t.equal(run.exits[0]!.reason, 'poweroff', run.exits[0]!.console);
  t.match(run.exits[0]!.console, /^ring slots 32 queues 1$/m, 'one ring that holds the 32 reads at once');
  // Answers each push published: rsp_prod's step from the push before.
  const steps: number[] = [];
  let prod = 0;
  for (const e of readTrace(trace).events) {
    if (e.type !== 'ring-push' || e.half !== 'response' || !/^blkback/.test(e.device ?? '')) continue;
    steps.push(e.prod - prod);
    prod = e.prod;
  }
  t.same(steps, [
    1, // the lone read, at once: nothing else was waiting
    8, 8, 8, 8, // 32 reads of 4 KiB
    1, 1, 1, 1, 1, 1, 1, 1, // 8 reads of 64 KiB: each one moved PUSH_BYTES
    3, 1, // 3 reads pushed before the flush that followed them, then the flush
    2, 1, // and before a discard
  ], 'the answers each push published');
});

t.test('read-only disks and a CD-ROM: EROFS in the guest, BLKIF_RSP_ERROR from blkback, the file unchanged', async (t) => {
  const img = diskCreate('ro.img', '1M');
  writeFileSync(img.file, new Uint8Array(1 << 20).fill(0x5a));
  writeFileSync(join(dir, 'ro.mjs'), `import { xbfDisks } from '${xbfModule}';
export async function main(guest) {
  const [disk, cd] = guest.disks();
  console.log('readOnly ' + disk.readOnly + ' cdrom ' + disk.cdrom + ' / ' + cd.readOnly + ' ' + cd.cdrom);
  for (const [what, f] of [['write', () => disk.write(0, new Uint8Array(512))], ['discard', () => disk.discard(0, 1)], ['cd write', () => cd.write(0, new Uint8Array(512))]]) {
    try { await f(); console.log(what + ' ok'); } catch (err) { console.log(what + ' ' + err.code); }
  }
  await disk.flush();
  xbfDisks(guest.sc)[0].readOnly = false; // a frontend that ignores VDISK_READONLY
  try { await disk.write(0, new Uint8Array(512)); console.log('wrote'); } catch (err) { console.log('forced write ' + err.code, err.op, err.lba, err.count); }
  console.log('read ' + (await disk.read(0, 1))[0] + ' ' + (await cd.read(7, 1))[511]);
  try { await disk.read(2048, 1); } catch (err) { console.log('outside ' + err.code + ' ' + err.op); }
  try { await disk.read(0.5, 1); } catch (err) { console.log('fraction ' + err.code); }
  try { await disk.readInto(2047, new Uint8Array(1024)); } catch (err) { console.log('readInto outside ' + err.code, err.op, err.lba, err.count); }
  try { await cd.write(6, new Uint8Array(1024)); } catch (err) { console.log('cd write ' + err.code, err.op, err.lba, err.count); }
}
`);
  const [exit] = await runGuests(cfg('ro', `kernel = "ro.mjs"\ndisk = ['vdev=xvdb, access=r, target=ro.img', 'ro.img,raw,xvdc,cdrom']`));
  const c = exit!.console;
  t.equal(exit!.reason, 'poweroff', c);
  t.match(c, /^readOnly true cdrom false \/ true true$/m);
  t.match(c, /^write EROFS$/m);
  t.match(c, /^discard EROFS$/m);
  t.match(c, /^cd write EROFS$/m);
  t.match(c, /^forced write EIO write 0 1$/m);
  t.match(c, /^read 90 90$/m);
  t.match(c, /^outside EINVAL read$/m);
  t.match(c, /^fraction EINVAL$/m);
  // readInto and write reject with the DiskError itself: what was asked, in disk sectors.
  t.match(c, /^readInto outside EINVAL read 2047 2$/m);
  t.match(c, /^cd write EROFS write 6 2$/m);
  t.ok(readFileSync(img.file).every((b) => b === 0x5a), 'the file is unchanged');
});

t.test('disk specs: both forms, devids, cdrom and untrusted; errors name file, line and key', async (t) => {
  const file = join(dir, 'spec.cfg');
  writeFileSync(file, `name = "spec"\nkernel = "x.mjs"\ndisk = [ 'format=raw, vdev=xvda, access=rw, target=a b,c.img',\n`
    + `  'b.img,raw,xvdb,r', 'format=memory,vdev=xvdq,target=64M', 'c.iso,raw,xvdd,devtype=cdrom', 'untrusted,d.img,raw,xvde' ]\n`);
  const spec = loadDomainConfig(file);
  t.same(spec.disks, [
    { vdev: 'xvda', devid: 51712, type: 'file', params: join(dir, 'a b,c.img'), readOnly: false },
    { vdev: 'xvdb', devid: 51728, type: 'file', params: join(dir, 'b.img'), readOnly: true },
    { vdev: 'xvdq', devid: (1 << 28) | (16 << 8), type: 'memory', params: String(64 << 20), readOnly: false },
    { vdev: 'xvdd', devid: 51760, type: 'file', params: join(dir, 'c.iso'), readOnly: true, cdrom: true },
    { vdev: 'xvde', devid: 51776, type: 'file', params: join(dir, 'd.img'), readOnly: false, trusted: false },
  ]);
  for (const [body, re] of [
    [`disk = ['vdev=xvda, access=x, target=a.img']`, /spec2\.cfg:3: disk: access x/],
    [`disk = ['format=qcow2, vdev=xvda, target=a.img']`, /spec2\.cfg:3: disk: format/],
    [`disk = ['a.img,raw,sda']`, /spec2\.cfg:3: disk: vdev/],
    [`disk = ['a.img,raw,xvda', 'b.img,raw,xvda']`, /spec2\.cfg:3: disk: vdev xvda given twice/],
    [`disk = ['colour=red']`, /spec2\.cfg:3: disk: unknown disk parameter colour/],
    [`disk = ['a.iso,raw,xvda,rw,cdrom']`, /spec2\.cfg:3: disk: a cdrom is read-only/],
    [`disk = ['a.img,raw,xvda,devtype=floppy']`, /spec2\.cfg:3: disk: devtype floppy/],
  ] as const) {
    const f = join(dir, 'spec2.cfg');
    writeFileSync(f, `name = "spec"\nkernel = "x.mjs"\n${body}\n`);
    t.throws(() => loadDomainConfig(f), { code: 'ECONFIG', message: re }, body);
  }
});
