// The network against hostile peers: netback facing a guest that writes
// malformed raw requests on its rings, xnf facing a driver domain that
// writes malformed raw responses, a receiver that stops taking frames, and
// bad grants among good ones in netback's copy batches.

import t from 'tap';
import { netifOffsets } from '../lib/abi/netif.js';
import type { VifStats } from '../lib/backends/netback.js';
import type { NicSpec } from '../lib/backends/toolstack.js';
import { xnfInterfaces, type XnfSoftc } from '../lib/drivers/xnf/xnf.js';
import { World } from '../lib/fuzz/world.js';
import { guestImage, helloCode, lib, rawFrontCode, runGuests, tempDir } from './net-fixtures.js';

const dir = tempDir('xenpv-net-hostile-');

t.test('netback disables a vif whose frontend breaks the protocol; the other vifs and dom0 carry on', async (t) => {
  const hostile = guestImage(dir, 'hostile', `${helloCode}${rawFrontCode}
import { xnfInterfaces } from '${lib('drivers/xnf/xnf.js')}';
const NETTXF_more_data = 4, NETTXF_extra_info = 8;
export async function main(guest) {
  const sc = guest.sc;
  const xs = xnfInterfaces(sc);
  const attacks = [
    ['too many slots', (q) => txRaw(q, Array.from({ length: 19 }, (_, i) => ({ gref: gref(q, i), id: i, size: i === 0 ? 19 * 100 : 100, flags: i < 18 ? NETTXF_more_data : 0 })))],
    ['a slot crossing its page', (q) => txRaw(q, [{ gref: gref(q, 0), offset: 4000, size: 200 }])],
    ['a bad extra', (q) => txRaw(q, [{ gref: gref(q, 0), size: 60, flags: NETTXF_extra_info }, { extra: 7 }])],
    ['a GSO extra of size 0', (q) => txRaw(q, [{ gref: gref(q, 0), size: 60, flags: NETTXF_extra_info }, { extra: 1, size: 0, gsoType: 1 }])],
    ['a ring index jump', (q) => q.tx.ring.slot(0).page.store32(0, (q.tx.ring.reqProd + 1000) >>> 0)],
    ['a grant dom0 may not use', (q) => txRaw(q, [{ gref: 30000, size: 60 }])],
    ['a packet running past req_prod', (q) => txRaw(q, [{ gref: gref(q, 0), size: 200, flags: NETTXF_more_data }])],
  ];
  for (let i = 0; i < attacks.length; i++) {
    const [what, attack] = attacks[i];
    const q = xs[i].queues[0];
    attack(q);
    sc.intr.intrSignal(q.txIh);
    const state = await backendState(guest, xs[i], 5);
    console.log(what + ': backend state ' + state + ', link ' + (xs[i].up ? 'up' : 'down'));
  }
  // The first disabled vif's frontend gives up on it: netback lets go of its rings.
  await guest.xenstore.write(xs[0].dev.path + '/state', '5');
  // RX buffers dom0 may not write: disabled when a frame arrives for one.
  // Every request posted and not yet answered (from the shared rsp_prod on)
  // names a grant that is not there, so whichever netback takes next is bad,
  // however far it got (the ring need not be full): the peer's first
  // broadcast meets a bad grant.
  const ring = xs[7].queues[0].rx.ring;
  const b = new Uint8Array(8), v = new DataView(b.buffer);
  for (let i = ring.sharedIndices().rsp_prod; i !== ring.reqProd; i = (i + 1) >>> 0) {
    v.setUint16(0, i & 255, true); v.setUint32(4, 30001, true);
    const s = ring.slot(i);
    s.page.write(s.offset, b);
  }
  const [n] = guest.nets().slice(8);
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 1, 2]);
  await meet(n, peer);
  let echoed = 0;
  const got = new Promise((resolve) => n.onFrame((f) => { if (f[13] === 0xb5 && ++echoed === 100) resolve(); }));
  for (let i = 0; i < 100; i++) {
    const f = new Uint8Array(1000); f.set(peer, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = 0xb5; f[14] = i;
    await n.send(f);
  }
  await Promise.race([got, new Promise((r) => setTimeout(r, 30000))]);
  console.log('healthy vif: ' + echoed + ' echoed');
  console.log('bad RX grant: backend state ' + await backendState(guest, xs[7], 5));
  // Stay up a moment: the test reads dom0's counters while the vifs still exist.
  await new Promise((r) => setTimeout(r, 2000));
}
`, `vif = [ ${Array.from({ length: 9 }, (_, i) => `'mac=00:16:3e:00:01:${(0x10 + i).toString(16)}'`).join(', ')} ]`);
  const peer = guestImage(dir, 'peer', `${helloCode}
export async function main(guest) {
  const [n] = guest.nets();
  const hostile = Uint8Array.from([0x00, 0x16, 0x3e, 0, 1, 0x18]);
  let echoed = 0;
  n.onFrame((f) => {
    if (f[12] !== 0x88 || f[13] !== 0xb5) return;
    const r = f.slice(); r.set(f.subarray(6, 12), 0); r.set(n.mac, 6);
    void n.send(r).then(() => echoed++);
  });
  await meet(n, hostile);
  const bcast = new Uint8Array(60).fill(0xff, 0, 6); bcast.set(n.mac, 6); bcast[12] = 0x88; bcast[13] = 0xb7;
  for (let i = 0; i < 20; i++) await n.send(bcast);
  await new Promise((r) => setTimeout(r, 3000));
  console.log('peer echoed ' + echoed);
}
`, `vif = [ 'mac=00:16:3e:00:01:02' ]`);
  let stats: Awaited<ReturnType<import('../lib/machine.js').Machine['netStats']>> | null = null;
  const exits = await runGuests([hostile, peer], {}, async (m) => {
    // Poll until the last attack landed and the peer is up (it boots alongside), then keep the counters.
    for (let i = 0; i < 600; i++) {
      stats = await m.netStats();
      const peerUp = stats.vifs.find((v) => v.name === 'vif2.0')?.state !== 'waiting';
      const released = stats.vifs.find((v) => v.name === 'vif1.0')?.rings.length === 0;
      if (stats.vifs.filter((v) => v.state === 'disabled').length >= 8 && peerUp && released) break;
      await new Promise((r) => setTimeout(r, 100));
    }
  });
  const [h, p] = exits;
  t.equal(h!.reason, 'poweroff', h!.console);
  t.equal(p!.reason, 'poweroff', p!.console);
  for (const what of ['too many slots', 'a slot crossing its page', 'a bad extra', 'a GSO extra of size 0', 'a ring index jump',
    'a grant dom0 may not use', 'a packet running past req_prod']) {
    t.match(h!.console, new RegExp(`^${what}: backend state 5, link down$`, 'm'), what);
  }
  t.match(h!.console, /^bad RX grant: backend state 5$/m, 'an RX grant dom0 may not write disables the receiver');
  t.match(h!.console, /^healthy vif: 100 echoed$/m, 'a vif of the same guest keeps working');
  const vifs = stats!.vifs.filter((v) => v.name.startsWith('vif1.'));
  t.equal(vifs.filter((v) => v.state === 'disabled' && v.reason !== null).length, 8, 'eight vifs disabled, each with a reason');
  t.equal(vifs.find((v) => v.name === 'vif1.8')?.state, 'connected');
  const first = vifs.find((v) => v.name === 'vif1.0');
  t.same([first?.state, first?.rings.length], ['disabled', 0], 'a disabled vif whose frontend closed let go of its rings, and still says why it was disabled');
  t.equal(stats!.vifs.find((v) => v.name === 'vif2.0')?.state, 'connected', 'the peer was never disturbed');
});

t.test('xnf against a scripted hostile backend in a driver domain: each violation breaks only its interface', async (t) => {
  // The backend domain: raw bytes on the rings, no netback code.
  const backend = guestImage(dir, 'evil', `
import { bindInterdomain, mapGrant, mapGrantReadonly, unmapGrant } from '${lib('backends/xenbus.js')}';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const more_data = 4;
async function until(what, test, timeoutMs = 30000) {
  const end = Date.now() + timeoutMs;
  for (;;) { const v = await test(); if (v) return v; if (Date.now() > end) throw new Error('timed out: ' + what); await sleep(10); }
}
function txReq(page, idx) {
  const at = 64 + (idx % 256) * 12, b = new Uint8Array(12); page.read(at, b); const v = new DataView(b.buffer);
  return { gref: v.getUint32(0, true), offset: v.getUint16(4, true), flags: v.getUint16(6, true), id: v.getUint16(8, true), size: v.getUint16(10, true) };
}
function txRsp(page, idx, id, status) {
  const at = 64 + (idx % 256) * 12; page.store16(at, id); page.store16(at + 2, status & 0xffff); page.store32(8, idx + 1);
}
function rxRsp(page, idx, id, offset, flags, status) {
  const at = 64 + (idx % 256) * 8; page.store16(at, id); page.store16(at + 2, offset); page.store16(at + 4, flags); page.store16(at + 6, status & 0xffff);
}
export async function main(guest) {
  const xs = guest.xenstore, sc = guest.sc, hc = sc.hypercall;
  const fe = await until('a frontend', async () => (await xs.list('backend/vif').catch(() => []))[0]);
  const devids = await until('nine vifs', async () => { const l = await xs.list('backend/vif/' + fe).catch(() => []); return l.length === 9 ? l : null; });
  const domid = Number(fe);
  const out = await Promise.all(devids.map(async (devid) => {
    const be = 'backend/vif/' + fe + '/' + devid;
    const f = await xs.read(be + '/frontend');
    await xs.write(be + '/feature-rx-copy', '1');
    await xs.write(be + '/state', '2');
    await xs.awaitState(f + '/state', 4, { timeoutMs: 30000 });
    const split = await xs.read(f + '/event-channel-tx').then(() => true, () => false);
    const tx = mapGrant(hc, domid, Number(await xs.read(f + '/tx-ring-ref'))).page;
    const rx = mapGrant(hc, domid, Number(await xs.read(f + '/rx-ring-ref'))).page;
    const ih = bindInterdomain(hc, sc.intr, domid, Number(await xs.read(f + '/event-channel')), () => {}, 'evil' + devid);
    sc.intr.intrUnmask(ih);
    const kick = () => sc.intr.intrSignal(ih);
    await xs.write(be + '/state', '4');
    const waitTx = (n) => until('tx request ' + n, () => tx.load32(0) >= n);
    switch (Number(devid)) {
      case 0: await waitTx(1); txRsp(tx, 0, 200, 0); kick(); break;
      case 1: rxRsp(rx, 0, 0, 4000, 0, 200); rx.store32(8, 1); kick(); break;
      case 2: rxRsp(rx, 0, 5, 0, 0, 60); rx.store32(8, 1); kick(); break;
      case 3: rx.store32(8, 300); kick(); break;
      case 4: for (let i = 0; i < 19; i++) rxRsp(rx, i, i, 0, more_data, 100); rx.store32(8, 19); kick(); break;
      case 5: { await waitTx(1); txRsp(tx, 0, txReq(tx, 0).id, 1); kick(); break; }
      case 6: case 7: {
        // A full page first, then a short frame in the same buffer: what else of the page does the backend see?
        await waitTx(1);
        txRsp(tx, 0, txReq(tx, 0).id, 0); kick();
        await waitTx(2);
        const r = txReq(tx, 1);
        const m = mapGrantReadonly(hc, domid, r.gref);
        const page = new Uint8Array(4096); m.page.read(0, page);
        unmapGrant(hc, m.handle);
        const frame = page.subarray(r.offset, r.offset + r.size).every((b, i) => i < 12 || b === 0x5a);
        const rest = page.subarray(r.offset + r.size).every((b) => b === 0);
        txRsp(tx, 1, r.id, 0); kick();
        await sleep(300);
        let kept; try { unmapGrant(hc, mapGrantReadonly(hc, domid, r.gref).handle); kept = true; } catch { kept = false; }
        return 'vif ' + devid + ': frame ' + frame + ', rest zeroed ' + rest + ', grant kept ' + kept + ', split ' + split;
      }
      case 8: {
        await waitTx(1);
        const r = txReq(tx, 0);
        const m = mapGrantReadonly(hc, domid, r.gref);
        txRsp(tx, 0, r.id, 0); kick();
        await sleep(2000);
        unmapGrant(hc, m.handle);
        break;
      }
    }
    return 'vif ' + devid + ': served, split ' + split;
  }));
  for (const line of out) console.log(line);
}
`, '', 16);
  const victim = guestImage(dir, 'victim', `
import { xnfInterfaces } from '${lib('drivers/xnf/xnf.js')}';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function main(guest) {
  const xs = xnfInterfaces(guest.sc);
  const nets = guest.nets();
  const frame = (len) => { const f = new Uint8Array(len).fill(0x5a); f.fill(0xff, 0, 6); f.set(nets[0].mac, 6); return f; };
  const oldPage = xs[8].queues[0].txBufs[0].segs[0].ds_addr;
  for (const i of [0, 5, 8]) await nets[i].send(frame(100));
  for (const i of [6, 7]) await nets[i].send(frame(1514));
  await sleep(300);
  for (const i of [6, 7]) await nets[i].send(frame(100));
  await sleep(1000);
  for (let i = 0; i < 9; i++) {
    const x = xs[i];
    let code = 'none';
    try { await nets[i].send(frame(100)); } catch (err) { code = err.code; }
    console.log('vif ' + i + ': ' + (x.error === null ? 'working' : 'broken ' + x.error.code) + ', send ' + code + ', up ' + nets[i].up);
  }
  console.log('quarantined ' + guest.sc.dmat.isQuarantined(oldPage));
  // vif 7's backend answers nothing more: once the ring is full, a send waits, bounded.
  for (let i = 0; i < 256; i++) void nets[7].send(frame(100)).catch(() => {});
  let code = 'none';
  try { await nets[7].send(frame(100), { timeoutMs: 300 }); } catch (err) { code = err.code; }
  const ac = new AbortController();
  const aborted = nets[7].send(frame(100), { signal: ac.signal }).catch((err) => err.code);
  ac.abort();
  console.log('full ring: ' + code + ', aborted: ' + await aborted);
}
`, `vif = [ ${Array.from({ length: 9 }, (_, i) => `'mac=00:16:3e:00:02:0${i},backend=evil${i === 6 || i === 8 ? ',trusted=0' : ''}'`).join(', ')} ]`);
  const [evil, v] = await runGuests([backend, victim]);
  t.equal(v!.reason, 'poweroff', v!.console);
  t.equal(evil!.reason, 'poweroff', evil!.console);
  const broken = [0, 1, 2, 3, 4, 5, 8];
  for (let i = 0; i < 9; i++) {
    const want = broken.includes(i) ? `broken ENETDOWN, send ENETDOWN, up false` : `working, send none, up true`;
    t.match(v!.console, new RegExp(`^vif ${i}: ${want}$`, 'm'), `vif ${i}`);
  }
  t.match(evil!.console, /^vif 6: frame true, rest zeroed true, grant kept false, split false$/m, 'trusted=0: the backend saw only the frame, and only while it was in flight');
  t.match(evil!.console, /^vif 7: frame true, rest zeroed false, grant kept true, split false$/m, 'trusted=1: the buffer stays granted, with what it held before');
  t.match(v!.console, /^quarantined true$/m, 'a page the backend kept mapped is quarantined');
  t.match(v!.console, /^full ring: ETIMEDOUT, aborted: ECANCELED$/m, 'a send that waits for ring space is bounded and abortable');
});

t.test('a receiver that stops taking frames holds its sender only for holdMs: the sender goes on talking to others', async (t) => {
  const image = `${helloCode}
import { xnfInterfaces } from '${lib('drivers/xnf/xnf.js')}';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function main(guest) {
  const [n] = guest.nets();
  const me = n.mac[5];
  const mac = (x) => Uint8Array.from([0x00, 0x16, 0x3e, 0, 0x0b, x]);
  const frame = (to, type) => { const f = new Uint8Array(1000); f.set(to, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = type; return f; };
  if (me === 2) {
    // The stuck receiver: it never looks at its RX ring again, so it never gives buffers back.
    // One frame out first, so that the bridge knows where it is; it outlives the others' waits.
    guest.sc.intr.intrMask(xnfInterfaces(guest.sc)[0].queues[0].rxIh);
    await n.send(frame(mac(1), 0xbb));
    await sleep(14000);
    return;
  }
  if (me === 3) {
    let got = 0;
    const done = new Promise((resolve) => n.onFrame((f) => { if (f[13] === 0xb7 && ++got === 100) resolve(); }));
    await meet(n, mac(1));
    await Promise.race([done, sleep(7000)]);
    console.log('healthy receiver got ' + got);
    return;
  }
  await meet(n, mac(3));
  // 256 fill the receiver's posted buffers; the rest would keep all 256 of the sender's ring slots.
  for (let i = 0; i < 600; i++) await n.send(frame(mac(2), 0xb5));
  for (let i = 0; i < 100; i++) await n.send(frame(mac(3), 0xb7));
  await n.drain(7000).catch((err) => console.log('drain: ' + err.code));
  console.log('sender done');
}
`;
  const cfgs = [1, 2, 3].map((i) => guestImage(dir, `hold${i}`, image, `vif = [ 'mac=00:16:3e:00:0b:0${i}' ]`));
  // Without the release the sender's ring stays full until the stuck receiver goes (14 s), past the healthy one's wait (7 s).
  const [s, , c] = await runGuests(cfgs, { netback: { drainTimeoutMs: 120_000 } });
  t.match(s!.console, /^sender done$/m, s!.console);
  t.match(c!.console, /^healthy receiver got 100$/m, 'the stuck receiver did not keep the sender\'s ring full');
});

// One thread, the whole host (lib/fuzz/world.ts): netback takes each guest's
// requests in batches and copies them in one hypercall per batch, so a bad
// grant sits among good ones. Each failure must still blame the right side.

const NEVER_MS = 1e9;
const SENDER = '00:16:3e:00:0b:01';
const RECEIVER = '00:16:3e:00:0b:02';

/** A sender and a receiver guest with real xnf on one bridge, frames of up to 9000 bytes. */
async function batchWorld(): Promise<{ world: World; tx: XnfSoftc; rx: XnfSoftc; got: Uint8Array[] }> {
  const netback = { drainTimeoutMs: NEVER_MS, stallTimeoutMs: NEVER_MS, holdMs: NEVER_MS, maxQueues: 1 };
  const world = new World({ net: { netback, ageingMs: NEVER_MS }, dom0MemoryMiB: 24 });
  const nic = (mac: string): NicSpec => ({ devid: 0, mac, bridge: 'xenbr0', mtu: 9000, rate: null, trusted: true, pcap: null, backend: null });
  const tx = xnfInterfaces(await world.createGuest({ name: 'sender', vifs: [nic(SENDER)] }))[0]!;
  const rx = xnfInterfaces(await world.createGuest({ name: 'receiver', vifs: [nic(RECEIVER)] }))[0]!;
  const got: Uint8Array[] = [];
  rx.input = (f) => void got.push(f.slice());
  return { world, tx, rx, got };
}

/** Frame `k` of `size` bytes from the sender to the receiver, its bytes telling it apart. */
function batchFrame(tx: XnfSoftc, rx: XnfSoftc, k: number, size: number): Uint8Array {
  const f = new Uint8Array(size);
  for (let i = 14; i < size; i++) f[i] = (i * 13 + k * 101) & 0xff;
  f.set(rx.mac, 0);
  f.set(tx.mac, 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  return f;
}

/** Rewrite the gref of the TX request `back` slots behind req_prod, as a hostile frontend may before netback reads it. */
function badTxGref(x: XnfSoftc, back: number, gref: number): void {
  const ring = x.queues[0]!.tx!.ring;
  const s = ring.slot((ring.reqProd - back) >>> 0);
  s.page.store32(s.offset + netifOffsets.TXQ_GREF, gref);
}

function vifOf(world: World, x: XnfSoftc): VifStats {
  return world.dom0.net!.list().find((v) => v.name === `vif${x.sc.domid}.0`)!;
}

/** Restart the disabled vif's backend and let its xnf reconnect (nothing of either is left waiting). */
async function reconnect(world: World, x: XnfSoftc): Promise<void> {
  await world.run(world.dom0.net!.restart(x.sc.domid, 0), 'vif restart');
  await world.run((async () => {
    while (!x.up) await new Promise((r) => setImmediate(r));
  })(), 'xnf reconnect');
  await world.settle();
}

t.test('netback batches: a bad grant among good ones blames its own side, as copied one by one', async (t) => {
  t.test('a sender\'s first slot that cannot be copied: the frames before it go, the sender is disabled', async (t) => {
    const { world, tx, rx, got } = await batchWorld();
    const frames = [0, 1, 2].map((k) => batchFrame(tx, rx, k, 1000));
    for (const f of frames) void tx.send(f);
    badTxGref(tx, 2, 30000);
    await world.settle();
    t.match(vifOf(world, tx), { state: 'disabled', reason: 'TX grant 30000 cannot be copied' });
    t.equal(vifOf(world, rx).state, 'connected');
    t.same(got, [frames[0]], 'the frame before the bad one reached the receiver whole, no other did');
    await reconnect(world, tx);
    t.equal(vifOf(world, tx).state, 'connected', 'the sender comes back with a new backend');
  });

  t.test('a sender\'s later slot that cannot be copied: the receiver blames the sender, not itself', async (t) => {
    const { world, tx, rx, got } = await batchWorld();
    const frames = [0, 1, 2].map((k) => batchFrame(tx, rx, k, 6000));
    for (const f of frames) void tx.send(f);
    badTxGref(tx, 3, 30000); // frame 1's second slot
    await world.settle();
    t.match(vifOf(world, tx), { state: 'disabled', reason: 'TX grant 30000 cannot be copied' });
    t.equal(vifOf(world, rx).state, 'connected', 'the receiver carries on');
    t.same(got[0], frames[0], 'the frame before reached the receiver whole');
    t.notOk(got.some((f) => f[14] === frames[1]![14] && f.length === 6000), 'the broken frame did not');
    t.ok(rx.counters.rxErrors >= 1, 'its slots were answered NETIF_RSP_ERROR');
    await reconnect(world, tx);
  });

  t.test('a receiver\'s buffer that cannot be copied into: the receiver is disabled, the sender carries on', async (t) => {
    const { world, tx, rx, got } = await batchWorld();
    const ring = rx.queues[0]!.rx!.ring;
    for (let i = ring.sharedIndices().rsp_prod; i !== ring.reqProd; i = (i + 1) >>> 0) {
      const s = ring.slot(i);
      s.page.store32(s.offset + netifOffsets.RXQ_GREF, 30001);
    }
    const sent = [0, 1, 2].map((k) => tx.send(batchFrame(tx, rx, k, 1000)));
    await world.run(Promise.all(sent), 'sends');
    await world.settle();
    t.match(vifOf(world, rx), { state: 'disabled', reason: 'RX grant 30001 cannot be copied into' });
    t.equal(vifOf(world, tx).state, 'connected');
    t.same(got, [], 'nothing reached the receiver');
    t.equal(tx.counters.txErrors, 0, 'the sender\'s requests were answered OKAY');
    await reconnect(world, rx);
  });
});

// A sender whose vif goes away (its domain shuts down and the toolstack
// stops its backends first, or its backend restarts) while frames it sent
// wait in a receiver's queue, pointing at its grants: each is copied into
// dom0 while pool buffers last and still reaches the receiver; the rest are
// dropped and counted.
t.test('frames queued for a receiver outlive their sender\'s vif: copied into dom0 while buffers last, the rest dropped and counted', async (t) => {
  for (const [size, queued, copied] of [[1000, 44, 44], [9000, 30, 16]] as const) {
    const { world, tx, rx, got } = await batchWorld();
    // The receiver takes nothing while the frames are sent: its posted buffers fill, the rest queue in dom0.
    const rq = rx.queues[0]!;
    rx.sc.intr.intrMask(rq.rxIh!);
    const slots = size <= 4096 ? 1 : Math.ceil(size / 4096);
    const fit = Math.floor(rq.rx!.ring.size / slots);
    const frames = Array.from({ length: fit + queued }, (_, k) => batchFrame(tx, rx, k, size));
    for (const f of frames) void tx.send(f).catch(() => undefined);
    await world.settle();
    t.equal(vifOf(world, rx).rings[0]!.rxQueued, queued, `${size} bytes: ${queued} frames wait in dom0 for the receiver`);
    const before = vifOf(world, rx);
    // The old backend goes (and a new one comes, so that the sender's xnf is left waiting for nothing).
    await reconnect(world, tx);
    rx.sc.intr.intrUnmask(rq.rxIh!);
    await world.settle();
    const after = vifOf(world, rx);
    t.equal(after.released - before.released, copied, `${size} bytes: ${copied} copied into dom0 (16 buffers of 17 pages for frames over a page)`);
    t.equal(after.txDropped - before.txDropped, queued - copied, 'the rest dropped and counted');
    t.equal(got.length, fit + copied, 'the receiver got every frame sent before, and every one copied');
    t.ok(got.every((f, i) => f.length === size && f.every((b, j) => b === frames[i]![j])), 'in order and intact');
  }
});
