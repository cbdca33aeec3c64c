// The xenpv CLI against a host daemon, end to end: disks and saved state.
// block-attach and block-detach while a guest writes (every grant, port and
// node comes back), and save and restore with writes in flight, and what
// they refuse. A host of its own (test/cli-host.ts).

import t from 'tap';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CliHost, cli, until } from './cli-host.js';

const h = new CliHost(t, 'xenpv-cli-disk-');

t.test('block-attach and block-detach while the guest writes; every grant, port and node comes back', async (t) => {
  const img = join(h.dir, 'a.img');
  t.equal((await h.xenpv(['disk', 'create', img, '4M'])).status, 0);
  await h.ok(['create', h.cfg('disks', 'writer', `disk = ['a.img,raw,xvda,rw']\n`)]);
  await h.waitLog('disks', /boot disks/);
  await h.ok(['block-attach', 'disks', 'format=memory, vdev=xvdb, target=1M']);
  await h.waitLog('disks', /attached device\/vbd\/51728 2048\r?\n/);
  await h.waitLog('disks', /device\/vbd\/51728 verified/);
  const listed = JSON.parse(await h.ok(['block-list', 'disks', '--json'])) as { name: string; devices: { devid: number; frontendState: number; backendState: number }[] }[];
  t.match(listed, [{ name: 'disks', devices: [{ devid: 51712, frontendState: 4, backendState: 4 }, { devid: 51728, frontendState: 4, backendState: 4 }] }]);
  t.match(await h.ok(['block-list', 'disks']), /^disks +51728 xvdb +0 +4 +4 /m);
  await h.ok(['block-detach', 'disks', 'xvdb']);
  await h.waitLog('disks', /detached device\/vbd\/51728 buffer ENXIO/);
  // The writer on xvda went on all along; now stop it and count what is held.
  const c = spawn(process.execPath, [cli, 'console', 'disks', '--rundir', h.rundir], { stdio: ['pipe', 'ignore', 'ignore'] });
  c.stdin.write('stop\n');
  const writes = Number((await h.waitLog('disks', /stopped after (\d+) writes/))[1]);
  c.kill();
  t.ok(writes > 0, `${writes} writes`);
  const held = async (): Promise<number[]> => {
    const rows = await h.topOnce();
    const g = rows.find((r) => r.name === 'disks')!;
    const d0 = rows.find((r) => r.domid === 0)!;
    return [g.granted, g.pinned, g.ports, d0.mapped, d0.ports];
  };
  const base = await held();
  await h.ok(['block-attach', 'disks', 'format=memory, vdev=xvdb, target=1M']);
  await until('xvdb attached again', () => (h.log('disks').match(/device\/vbd\/51728 verified/g) ?? []).length === 2);
  const plugged = await held();
  t.ok(plugged.every((v, i) => v > base[i]!), `ring grants (and the guest's buffer) pinned by blkback, a port each side: ${base} -> ${plugged}`);
  const stats = (await h.topOnce()).find((r) => r.name === 'disks')!.devices;
  t.match(stats.find((d) => d.type === 'vbd' && d.devid === 51728)?.counters, { wr_req: 1, rd_req: 1, wr_sect: 64, rd_sect: 64 });
  t.ok((stats.find((d) => d.type === 'vbd' && d.devid === 51712)?.counters['wr_req'] ?? 0) >= writes, 'xvda counted every write');
  t.ok((stats.find((d) => d.type === 'console')?.counters['out_bytes'] ?? 0) > 0, 'console bytes');
  t.same(await h.ok(['block-detach', 'disks', '51728']), '');
  await until('xvdb detached again', () => (h.log('disks').match(/detached device\/vbd\/51728/g) ?? []).length === 2);
  t.same(await held(), base, 'every grant and port let go');
  const after = JSON.parse(await h.ok(['block-list', 'disks', '--json'])) as { devices: { devid: number }[] }[];
  t.same(after[0]!.devices.map((d) => d.devid), [51712], 'the nodes are gone');
  const missing = await h.xenpv(['block-detach', 'disks', 'xvdc']);
  t.equal(missing.status, 1);
  t.match(missing.stderr, /ENODEV/);
  const twice = await h.xenpv(['block-attach', 'disks', 'format=memory, vdev=xvda, target=1M']);
  t.equal(twice.status, 1);
  t.match(twice.stderr, /EEXIST/);
  await h.ok(['destroy', 'disks']);
  const data = readFileSync(img);
  let bad = 0;
  for (let lba = 0; lba < Math.min(writes * 8, data.length / 512); lba++) {
    if (data.readUInt32LE(lba * 512) !== lba || data[lba * 512 + 4] !== ((lba * 7 + 1) & 255)) bad++;
  }
  t.equal(bad, 0, 'every sector the writer wrote is in the file');
});

// The saver keeps 48 writes in flight (more than xbf has ring slots) and hands over only how many it issued:
// writes still in flight at suspend must complete (xbf quiesces) or the check fails.
const saver = join(h.dir, 'saver.mjs');
writeFileSync(saver, `
const pattern = (lba) => { const b = new Uint8Array(512); b.fill((lba * 13 + 5) & 255); new DataView(b.buffer).setUint32(0, lba, true); return b; };
const chunk = (n) => { const d = new Uint8Array(8 * 512); for (let i = 0; i < 8; i++) d.set(pattern(n * 8 + i), i * 512); return d; };
export async function main(guest) {
  const disk = guest.disks()[0];
  const total = disk.sectors / 8;
  let next = guest.resumeState?.next ?? 0;
  console.log((guest.resumeState === undefined ? 'boot' : 'resumed') + ' at ' + next);
  let stop = false;
  guest.onSuspend(() => { stop = true; console.log('suspending at ' + next); return { next }; });
  const inflight = new Set();
  while (next < total && !stop) {
    const p = disk.write(next * 8, chunk(next)).finally(() => inflight.delete(p));
    inflight.add(p);
    next++;
    if (inflight.size >= 48) await Promise.race(inflight);
    if (next % 64 === 0) console.log('wrote ' + next);
    await new Promise((r) => setTimeout(r, 4));
  }
  if (stop) return new Promise(() => {});
  await Promise.all(inflight);
  let bad = 0;
  for (let n = 0; n < total; n++) if (Buffer.compare(Buffer.from(await disk.read(n * 8, 8)), Buffer.from(chunk(n))) !== 0) bad++;
  console.log('verified ' + total + ', ' + bad + ' bad');
}
`);

t.test('save and restore with a disk writer running: the guest carries on, nothing lost', async (t) => {
  const img = join(h.dir, 'save.img');
  t.equal((await h.xenpv(['disk', 'create', img, '2M'])).status, 0);
  const file = join(h.dir, 'saver.cfg');
  writeFileSync(file, `name = "saver"\nmemory = 32\nkernel = "saver.mjs"\ndisk = ['save.img,raw,xvda,rw']\n`);
  await h.ok(['create', file]);
  await h.waitLog('saver', /wrote 64\b/);
  const saved = join(h.dir, 'saver.save');
  t.match(await h.ok(['save', 'saver', saved]), /^saver: saved to .*saver\.save \(\d+ pages\)$/m);
  t.equal(await h.row('saver'), undefined, 'the saved domain is gone');
  const at = Number((await h.waitLog('saver', /suspending at (\d+)/))[1]);
  t.ok(at >= 64 && at < 512, `suspended at ${at} of 512`);
  const [magic, header] = readFileSync(saved, 'latin1').split('\n', 2);
  t.equal(magic, 'XENPV-SAVE 1');
  t.match(JSON.parse(header!), { spec: { name: 'saver', disks: [{ vdev: 'xvda' }] }, nrPages: 8192 });
  const restored = await h.ok(['restore', saved]);
  t.match(restored, /^saver: domid \d+$/m);
  await h.waitLog('saver', new RegExp(`resumed at ${at}\\b`));
  t.match((await h.waitLog('saver', /verified (\d+), (\d+) bad/))[0], 'verified 512, 0 bad');
  await until('the restored guest powered off', async () => (await h.row('saver')) === undefined);
  const data = readFileSync(img);
  let bad = 0;
  for (let lba = 0; lba < data.length / 512; lba++) {
    if (data.readUInt32LE(lba * 512) !== lba || data[lba * 512 + 4] !== ((lba * 13 + 5) & 255)) bad++;
  }
  t.equal(bad, 0, 'the backing file holds every sector');
});

t.test('save and restore refuse what they cannot do, and the guest runs on', async (t) => {
  await h.ok(['create', h.cfg('keeper')]);
  await h.waitLog('keeper', /boot keeper/);
  const nodir = await h.xenpv(['save', 'keeper', join(h.dir, 'no', 'such', 'dir', 'x.save')]);
  t.equal(nodir.status, 1);
  t.match(nodir.stderr, /ENOENT/);
  t.match((await h.row('keeper'))?.state, /^[r-][b-]----$/, 'still running');
  const nobody = await h.xenpv(['save', 'nosuch', join(h.dir, 'x.save')]);
  t.match(nobody.stderr, /ESRCH/);
  const junk = join(h.dir, 'junk.save');
  writeFileSync(junk, 'XENPV-SAVE 1\n{"spec": {"name": "../evil"}}\n');
  const bad = await h.xenpv(['restore', junk]);
  t.equal(bad.status, 1);
  t.match(bad.stderr, /EINVAL: .*not a xenpv save file/);
  writeFileSync(junk, 'hello\n');
  t.match((await h.xenpv(['restore', junk])).stderr, /EINVAL/);
  t.match((await h.xenpv(['restore', join(h.dir, 'missing.save')])).stderr, /ENOENT/);
  const saved = join(h.dir, 'keeper.save');
  await h.ok(['block-attach', 'keeper', 'format=memory, vdev=xvdc, target=1M']);
  await h.ok(['save', 'keeper', saved]);
  await h.ok(['restore', saved]);
  const disks = JSON.parse(await h.ok(['block-list', 'keeper', '--json'])) as { devices: { devid: number }[] }[];
  t.same(disks[0]!.devices.map((d) => d.devid), [51744], 'a hotplugged disk is part of the saved config');
  const clash = await h.xenpv(['restore', saved]);
  t.equal(clash.status, 1);
  t.match(clash.stderr, /EEXIST/, 'a second restore of the same guest: its name is taken');
  await h.waitLog('keeper', /boot keeper \d+[\s\S]*boot keeper \d+/);
  await h.ok(['destroy', 'keeper']);
});
