// Suspend from the guest's side: xbf's suspend hook completes every request
// made before it (more than the ring has slots) and holds the ones made
// after until resume; a save whose file cannot be written resumes the guest
// in place, its drivers and image carrying on. The images reach the guest's
// xbf softcs as the blk test's do.

import t from 'tap';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';
import type { XenError } from '../lib/errors.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const xbfModule = pathToFileURL(join(root, 'dist/lib/drivers/xbf/xbf.js')).href;
const dir = mkdtempSync(join(tmpdir(), 'xenpv-suspend-'));

function config(name: string, body: string): string {
  writeFileSync(join(dir, `${name}.mjs`), body);
  const cfg = join(dir, `${name}.cfg`);
  writeFileSync(cfg, `name = "${name}"\nmemory = 32\nkernel = "${name}.mjs"\ndisk = ['format=memory, vdev=xvda, target=4M']\n`);
  return cfg;
}

t.test('xbf suspend: transfers asked for before complete (more than the rings have slots); those asked for after wait for resume', async (t) => {
  const cfg = config('quiesce', `import { xbfDisks, xbfDriver } from '${xbfModule}';
export async function main(guest) {
  const sc = guest.sc;
  const [disk] = guest.disks();
  const dev = sc.devices.get(disk.path);
  const x = xbfDisks(sc)[0];
  const slots = x.queues.reduce((n, q) => n + q.ccbs.length, 0);
  const n = Math.min(slots + 64, disk.sectors / 8);
  let done = 0;
  const writes = Array.from({ length: n }, (_, i) => disk.write(i * 8, new Uint8Array(4096).fill(i & 255)).then(() => done++));
  await xbfDriver.suspend(sc, dev);
  // Nothing outstanding when the hook returns; the writers' own promises settle a few microtasks later.
  console.log('more than the slots ' + (n > slots) + ', all free ' + x.queues.every((q) => q.free.length === q.ccbs.length));
  await new Promise((r) => setImmediate(r));
  console.log('settled ' + (done === n));
  let late = false;
  const after = disk.write(1000, new Uint8Array(512).fill(1)).then(() => (late = true));
  await new Promise((r) => setTimeout(r, 100));
  console.log('held ' + !late);
  await xbfDriver.resume(sc, dev);
  await after;
  await Promise.all(writes);
  console.log('after resume ' + late + ', byte ' + (await disk.read((n - 1) * 8, 1))[0] + ' of ' + ((n - 1) & 255));
}
`);
  const m = await Machine.boot();
  t.teardown(() => m.stop());
  const exit = await m.waitExit(await m.create(loadDomainConfig(cfg)));
  t.equal(exit.reason, 'poweroff', exit.console);
  t.match(exit.console, /^more than the slots true, all free true$/m);
  t.match(exit.console, /^settled true$/m);
  t.match(exit.console, /^held true$/m);
  t.match(exit.console, /^after resume true, byte (\d+) of \1$/m);
});

t.test('a save that cannot write its file resumes the guest in place (SCHEDOP_shutdown returns, drivers and image go on)', async (t) => {
  const cfg = config('inplace', `
export async function main(guest) {
  const [disk] = guest.disks();
  let n = 0, stop = false, resumed;
  const again = new Promise((r) => (resumed = r));
  guest.onSuspend(() => { stop = true; console.log('suspending at ' + n); return { n }; });
  guest.onResume((state) => { console.log('resumed in place at ' + state.n); resumed(); });
  console.log('ready');
  while (!stop) { await disk.write(n % 8000, new Uint8Array(512).fill(n & 255)); n++; await new Promise((r) => setTimeout(r, 1)); }
  await again;
  for (let i = 0; i < 10; i++) await disk.write(i, new Uint8Array(512).fill(9));
  console.log('wrote after resume, read ' + (await disk.read(9, 1))[0]);
}
`);
  let ready!: () => void;
  const up = new Promise<void>((r) => (ready = r));
  const m = await Machine.boot({ onConsole: (_d, _n, text) => text.includes('ready') && ready() });
  t.teardown(() => m.stop());
  const domid = await m.create(loadDomainConfig(cfg));
  await up;
  // /dev/full opens for writing and fails every write with ENOSPC, after the guest has suspended.
  const err = await m.save(domid, '/dev/full').then(() => null, (e: XenError) => e);
  t.equal(err?.code, 'ENOSPC');
  const exit = await m.waitExit(domid);
  t.equal(exit.reason, 'poweroff', exit.console);
  t.match(exit.console, /suspending at (\d+)\nresumed in place at \1\n/);
  t.match(exit.console, /^wrote after resume, read 9$/m);
});
