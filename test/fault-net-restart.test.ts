// Fault: a vif's backend killed and started again 100 times while two guests
// send each other frames (dom0's vif-restart: the old netback closes and lets
// go of the rings, a new one starts on the same nodes). xnf sees its backend
// close with online still 1, lets go of its queues and connects to the new
// one by itself. Frames carry a sequence number and a payload the receiver
// regenerates from it: frames in flight may be lost, none may arrive
// corrupted, twice or out of order, and the network works after the last
// restart.

import t from 'tap';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';
import { guestImage, helloCode, payloadCode, tempDir } from './net-fixtures.js';

const RESTARTS = 100;
const dir = tempDir('xenpv-fault-net-');

const image = `${helloCode}
${payloadCode}
export async function main(guest) {
  const [n] = guest.nets();
  const me = n.mac[5], other = me === 1 ? 2 : 1;
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 0, other]);
  let stop = false, ups = 0, recv = 0, bad = 0, reordered = 0, last = -1;
  // Never resolves: the guest powers off when main() returns, after its report.
  guest.onShutdownRequest(() => new Promise(() => { stop = true; }));
  n.onLink((up) => { if (up) ups++; });
  n.onFrame((f) => {
    if (f[12] !== 0x88 || f[13] !== 0xb5) return;
    const v = new DataView(f.buffer, f.byteOffset, f.length);
    const seq = v.getUint32(16, true), len = v.getUint32(20, true);
    const nw = (f.length - 24) >> 2;
    const body = new Uint32Array(f.slice(24, 24 + nw * 4).buffer);
    if (f.length !== len || !same(seq, body)) { if (bad++ < 3) console.log('bad frame ' + seq + ', ' + f.length + ' bytes'); }
    if (seq <= last) reordered++;
    last = seq;
    recv++;
  });
  await meet(n, peer);
  console.log('sending');
  const buf = new Uint8Array(1514);
  const view = new DataView(buf.buffer);
  let seq = 0, sent = 0, failed = 0, s = 7 + me;
  while (!stop) {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    const len = 60 + (s % (1514 - 60 + 1));
    buf.set(peer, 0); buf.set(n.mac, 6); buf[12] = 0x88; buf[13] = 0xb5;
    view.setUint32(16, seq, true); view.setUint32(20, len, true);
    words(seq, new Uint32Array(buf.buffer, 24, (len - 24) >> 2));
    seq++;
    try {
      await n.send(buf.subarray(0, len));
      sent++;
    } catch (err) {
      failed++;
      const until = Date.now() + 30000;
      while (!n.up && !stop && Date.now() < until) await new Promise((r) => setTimeout(r, 2));
    }
    if (seq % 16 === 0) await new Promise((r) => setTimeout(r, 1));
  }
  // After the last restart: the two still reach each other.
  await meet(n, peer);
  console.log('done sent ' + sent + ' failed ' + failed + ' recv ' + recv + ' bad ' + bad + ' reordered ' + reordered + ' reconnects ' + ups);
}
`;

t.test(`netback killed and restarted ${RESTARTS} times during traffic: xnf reconnects, frames are lost at worst, never corrupted`, async (t) => {
  let sending = 0;
  let bothSending: () => void = () => undefined;
  const started = new Promise<void>((resolve) => (bothSending = resolve));
  const m = await Machine.boot({ onConsole: (_d, _n, text) => /^sending$/m.test(text) && ++sending === 2 && bothSending() });
  try {
    const ids: number[] = [];
    for (const i of [1, 2]) ids.push(await m.create(loadDomainConfig(guestImage(dir, `n${i}`, image, `vif = [ 'mac=00:16:3e:00:00:0${i}' ]`, 32))));
    await Promise.race([started, sleep(60_000, undefined, { ref: false }).then(() => Promise.reject(new Error('the guests never started sending')))]);
    for (let i = 0; i < RESTARTS; i++) {
      await m.restartVif(ids[0]!, 0);
      // Let some frames through the new backend before killing it again.
      await sleep(5);
    }
    await sleep(200);
    for (const id of ids) await m.requestShutdown(id, 'poweroff');
    const exits = await Promise.all(ids.map((id) => m.waitExit(id, AbortSignal.timeout(120_000))));
    const stats = exits.map((e) => {
      t.equal(e.reason, 'poweroff', e.console);
      const d = /^done sent (\d+) failed (\d+) recv (\d+) bad (\d+) reordered (\d+) reconnects (\d+)$/m.exec(e.console);
      t.ok(d !== null, `${e.name} finished: ${e.console.slice(-300)}`);
      return d === null ? null : { sent: Number(d[1]), recv: Number(d[3]), bad: Number(d[4]), reordered: Number(d[5]), reconnects: Number(d[6]) };
    });
    const [a, b] = stats;
    if (a == null || b == null) return;
    // A restart that lands while xnf is still connecting to the last backend costs it one more round, not one more link-up.
    t.ok(a.reconnects >= RESTARTS / 2 && a.reconnects <= RESTARTS, `the restarted vif's xnf reconnected by itself (${a.reconnects} times)`);
    t.equal(b.reconnects, 0, 'the other guest\'s link never went down');
    t.equal(a.bad + b.bad, 0, 'no frame arrived corrupted');
    t.equal(a.reordered + b.reordered, 0, 'none twice or out of order');
    t.ok(b.recv <= a.sent && a.recv <= b.sent, 'none made up');
    t.ok(b.recv > RESTARTS && a.recv > RESTARTS, `frames kept flowing both ways (${a.sent} sent, ${b.recv} received; ${b.sent} sent, ${a.recv} received)`);
  } finally {
    await m.stop();
  }
});
