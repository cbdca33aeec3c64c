// Suspend with frames in flight: a save that cannot write its file resumes
// the guest in place, and a save that can is restored as a new domain; after
// either, the guest's network works (its xnf drains what it sent before the
// suspend; the restored domain attaches a new one). A peer on the same
// bridge echoes every frame, so each ping is a frame each way.

import t from 'tap';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';
import type { XenError } from '../lib/errors.js';
import { guestImage, tempDir } from './net-fixtures.js';

const dir = tempDir('xenpv-suspend-net-');

const echo = `
export async function main(guest) {
  const [n] = guest.nets();
  let stop = false;
  guest.onShutdownRequest(() => new Promise(() => { stop = true; }));
  n.onFrame((f) => {
    if (f[12] !== 0x88 || f[13] !== 0xb5) return;
    const e = f.slice();
    e.copyWithin(0, 6, 12);
    e.set(n.mac, 6);
    void n.send(e).catch(() => {});
  });
  console.log('echoing');
  while (!stop) await new Promise((r) => setTimeout(r, 20));
}
`;

const mover = `
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function main(guest) {
  const [n] = guest.nets();
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 0, 0x02]);
  const state = guest.resumeState;
  let stop = false, resumed;
  const inPlace = new Promise((r) => (resumed = r));
  guest.onSuspend(() => { stop = true; console.log('suspending'); return { round: 1 }; });
  guest.onResume(() => { console.log('resumed in place'); resumed(); });
  const got = new Set();
  let mark = 0;
  n.onFrame((f) => {
    if (f[12] !== 0x88 || f[13] !== 0xb5 || f[11] !== 0x02) return;
    const v = new DataView(f.buffer, f.byteOffset, f.length);
    if (v.getUint32(16, true) === mark) got.add(v.getUint32(20, true));
  });
  const frame = (i, len) => {
    const f = new Uint8Array(len);
    f.set(peer, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = 0xb5;
    const v = new DataView(f.buffer);
    v.setUint32(16, mark, true); v.setUint32(20, i, true);
    return f;
  };
  async function pings(k) {
    mark++;
    got.clear();
    for (let i = 0; i < k; i++) { await n.send(frame(i, 60 + (i * 37) % 1400)).catch(() => {}); await sleep(1); }
    for (let w = 0; w < 500 && got.size < k; w++) await sleep(10);
    return got.size;
  }
  async function traffic() {
    stop = false;
    for (let i = 0; !stop; i++) { await n.send(frame(i, 1514)).catch(() => {}); if (i % 8 === 0) await sleep(1); }
  }
  if (state !== undefined) {
    console.log('after restore ' + (await pings(50)) + '/50');
    return;
  }
  console.log('before ' + (await pings(20)) + '/20');
  console.log('ready');
  await traffic();
  await inPlace;
  console.log('after resume in place ' + (await pings(50)) + '/50');
  console.log('ready again');
  await traffic();
  return new Promise(() => {});
}
`;

t.test('frames in flight at suspend: after a resume in place and after save and restore, the network works', async (t) => {
  const text = new Map<string, string>();
  const m = await Machine.boot({ onConsole: (_d, name, s) => void text.set(name, (text.get(name) ?? '') + s) });
  t.teardown(() => m.stop());
  const wait = async (name: string, re: RegExp): Promise<RegExpExecArray> => {
    for (let i = 0; i < 3000; i++) {
      const hit = re.exec(text.get(name) ?? '');
      if (hit !== null) return hit;
      await sleep(10);
    }
    throw new Error(`${name} never printed ${re}: ${text.get(name) ?? ''}`);
  };
  const peer = await m.create(loadDomainConfig(guestImage(dir, 'peer', echo, `vif = [ 'mac=00:16:3e:00:00:02' ]`)));
  await wait('peer', /^echoing$/m);
  const domid = await m.create(loadDomainConfig(guestImage(dir, 'mover', mover, `vif = [ 'mac=00:16:3e:00:00:01' ]`)));
  t.match((await wait('mover', /^before (\d+)\/20$/m))[0], 'before 20/20', 'the network works before');
  await wait('mover', /^ready$/m);
  await sleep(50);
  // /dev/full opens for writing and fails every write with ENOSPC, after the guest has suspended.
  const err = await m.save(domid, '/dev/full').then(() => null, (e: XenError) => e);
  t.equal(err?.code, 'ENOSPC');
  t.match((await wait('mover', /^after resume in place (\d+)\/50$/m))[0], 'after resume in place 50/50', 'the network works after a resume in place');
  await wait('mover', /^ready again$/m);
  await sleep(50);
  text.set('mover', '');
  const saved = join(dir, 'mover.save');
  await m.save(domid, saved);
  const back = await m.restore(saved);
  const exit = await m.waitExit(back.domid, AbortSignal.timeout(60_000));
  t.equal(exit.reason, 'poweroff', exit.console);
  t.match(exit.console, /^after restore 50\/50$/m, 'the restored domain\'s new xnf works');
  await m.requestShutdown(peer, 'poweroff');
  await m.waitExit(peer, AbortSignal.timeout(30_000));
});
