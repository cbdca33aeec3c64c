// The network end to end: xnf in two guests, netback and the bridge in dom0,
// real worker threads. Frames carry a sequence number and a payload that the
// receiver regenerates from it, so a lost, repeated, reordered or corrupted
// frame is seen.

import t from 'tap';
import { guestImage, heldByDom0, helloCode, lib, rawFrontCode, runGuests, tempDir, udpFrameCode } from './net-fixtures.js';

const dir = tempDir('xenpv-net-');

/**
 * Each peer sends `count` frames of sizes 60..65535 from a seeded generator
 * (a third of the large ones as TCPv4 GSO with a blank checksum, every fifth
 * with a blank checksum) and checks every frame it receives.
 */
function exchangeImage(count: number): string {
  return `${helloCode}
function sizes(seed) {
  let s = seed >>> 0 || 1;
  return () => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return 60 + (s % (65535 - 60 + 1)); };
}
function words(seq, out) {
  let x = (Math.imul(seq, 2654435761) + 1) >>> 0 || 1;
  for (let i = 0; i < out.length; i++) { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; out[i] = x; }
}
function same(seq, got) {
  let x = (Math.imul(seq, 2654435761) + 1) >>> 0 || 1;
  for (let i = 0; i < got.length; i++) { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; if (got[i] !== x) return false; }
  return true;
}
export async function main(guest) {
  const N = ${count};
  const [n] = guest.nets();
  const me = n.mac[5], other = me === 1 ? 2 : 1;
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 0, other]);
  const nextSize = sizes(1000 + me), expectSize = sizes(1000 + other);
  let recv = 0, bad = 0, gso = 0, blank = 0;
  let finished;
  const done = new Promise((r) => (finished = r));
  n.onFrame((f, info) => {
    if (f[12] !== 0x88 || f[13] !== 0xb5) return;
    const v = new DataView(f.buffer, f.byteOffset, f.length);
    const seq = v.getUint32(16, true), want = expectSize();
    const nw = (f.length - 24) >> 2;
    const body = f.byteOffset % 4 === 0 ? new Uint32Array(f.buffer, f.byteOffset + 24, nw) : new Uint32Array(f.slice(24, 24 + nw * 4).buffer);
    if (seq !== recv || f.length !== want || v.getUint32(20, true) !== want || !same(seq, body)) {
      if (bad++ < 3) console.log('bad frame ' + seq + ' (want ' + recv + '), ' + f.length + ' bytes (want ' + want + ')');
    }
    if (info.gsoType !== 0) gso++;
    if (info.csumBlank) blank++;
    if (++recv === N) finished();
  });
  await meet(n, peer);
  const buf = new Uint8Array(65536);
  const view = new DataView(buf.buffer);
  for (let seq = 0; seq < N; seq++) {
    const len = nextSize();
    buf.set(peer, 0); buf.set(n.mac, 6); buf[12] = 0x88; buf[13] = 0xb5;
    view.setUint32(16, seq, true); view.setUint32(20, len, true);
    words(seq, new Uint32Array(buf.buffer, 24, (len - 24) >> 2));
    const opts = len > 1514 && seq % 3 === 0 ? { gso: { type: 'tcpv4', mss: 1448 }, checksumOffload: true }
      : seq % 5 === 0 ? { checksumOffload: true } : undefined;
    await n.send(buf.subarray(0, len), opts);
  }
  const timer = setTimeout(() => finished(), 180000);
  await done;
  clearTimeout(timer);
  const c = n.counters();
  console.log('received ' + recv + ' bad ' + bad + ' gso ' + (gso > 0) + ' blank ' + (blank > 0) + ' rxErrors ' + c.rxErrors + ' rxDropped ' + c.rxDropped);
}
`;
}

t.test('two guests on xenbr0 exchange 100,000 frames of 60..65535 bytes with SG and GSO: none lost or corrupted', async (t) => {
  const image = exchangeImage(50_000);
  const cfgs = [1, 2].map((i) => guestImage(dir, `x${i}`, image, `vif = [ 'mac=00:16:3e:00:00:0${i},mtu=65521' ]`, 64));
  const exits = await runGuests(cfgs);
  for (const e of exits) {
    t.equal(e.reason, 'poweroff', e.console);
    t.match(e.console, /^received 50000 bad 0 gso true blank true rxErrors 0 rxDropped 0$/m, `${e.name}: every frame arrived once, in order, intact`);
  }
});



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
  // An RX buffer dom0 may not write: disabled when a frame arrives for it.
  const rxq = xs[7].queues[0];
  const b = new Uint8Array(8), v = new DataView(b.buffer);
  v.setUint16(0, rxq.rx.ring.reqProd & 255, true); v.setUint32(4, 30001, true);
  rxq.rx.ring.slot(rxq.rx.ring.reqProd).page.write(rxq.rx.ring.slot(rxq.rx.ring.reqProd).offset, b);
  // That slot holds the request netback takes next: the peer's first broadcast meets the bad grant.
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
    // Poll until the last attack landed, then keep the counters.
    for (let i = 0; i < 600; i++) {
      stats = await m.netStats();
      if (stats.vifs.filter((v) => v.state === 'disabled').length >= 8) break;
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
});

t.test('hotplug: network-detach releases every grant, port and mapping; network-attach brings the interface back', async (t) => {
  const guest = guestImage(dir, 'plug', `${helloCode}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function pingPong(n, peer, count) {
  let echoed = 0;
  const got = new Promise((resolve) => n.onFrame((f) => { if (f[13] === 0xb5 && ++echoed === count) resolve(); }));
  for (let i = 0; i < count; i++) {
    const f = new Uint8Array(200 + i); f.set(peer, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = 0xb5;
    await n.send(f);
  }
  await Promise.race([got, sleep(20000)]);
  return echoed;
}
async function until(test) { for (let i = 0; i < 600 && !test(); i++) await sleep(50); return test(); }
export async function main(guest) {
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 5, 2]);
  let [n] = guest.nets();
  await meet(n, peer);
  console.log('before: echoed ' + await pingPong(n, peer, 10));
  const old = n;
  console.log('detached ' + await until(() => guest.nets().length === 0) + ', link ' + (old.up ? 'up' : 'down'));
  try { await old.send(new Uint8Array(60)); } catch (err) { console.log('old interface: ' + err.code); }
  await until(() => guest.nets().length === 1);
  [n] = guest.nets();
  await meet(n, peer);
  console.log('after: echoed ' + await pingPong(n, peer, 10));
  const bye = new Uint8Array(60); bye.set(peer, 0); bye.set(n.mac, 6); bye[12] = 0x88; bye[13] = 0xb8;
  await n.send(bye);
  await n.drain();
}
`, `vif = [ 'mac=00:16:3e:00:05:01' ]`);
  const peer = guestImage(dir, 'plugpeer', `
export async function main(guest) {
  const [n] = guest.nets();
  await new Promise((resolve) => {
    n.onFrame((f) => {
      if (f[12] !== 0x88) return;
      if (f[13] === 0xb8) return resolve();
      if (f[13] !== 0xb5 && f[13] !== 0xb6) return;
      const r = f.slice(); r.set(f.subarray(6, 12), 0); r.set(n.mac, 6);
      void n.send(r);
    });
    setTimeout(resolve, 60000);
  });
}
`, `vif = [ 'mac=00:16:3e:00:05:02' ]`);
  const bare = guestImage(dir, 'bare', `export async function main() { await new Promise((r) => setTimeout(r, 3000)); }`, '');
  const consoles = new Map<number, string>();
  const seen = (domid: number, re: RegExp): boolean => re.test(consoles.get(domid) ?? '');
  const waitFor = async (domid: number, re: RegExp): Promise<boolean> => {
    for (let i = 0; i < 600 && !seen(domid, re); i++) await new Promise((r) => setTimeout(r, 50));
    return seen(domid, re);
  };
  const { Machine } = await import('../lib/machine.js');
  const { loadDomainConfig } = await import('../lib/backends/xlcfg.js');
  const m = await Machine.boot({ onConsole: (d, _n, text) => consoles.set(d, (consoles.get(d) ?? '') + text) });
  t.teardown(() => m.stop());
  const g = await m.create(loadDomainConfig(guest));
  const p = await m.create(loadDomainConfig(peer));
  const b = await m.create(loadDomainConfig(bare));
  const baseline = heldByDom0(m, b);
  t.ok(await waitFor(g, /^before: echoed 10$/m), 'traffic before the detach');
  const attached = heldByDom0(m, g);
  t.ok(attached.grants > baseline.grants && attached.ports > baseline.ports && attached.mappings > baseline.mappings, 'the vif holds grants, ports and mappings');
  await m.networkDetach(g, 0);
  let after = heldByDom0(m, g);
  for (let i = 0; i < 200 && JSON.stringify(after) !== JSON.stringify(baseline); i++) {
    await new Promise((r) => setTimeout(r, 50));
    after = heldByDom0(m, g);
  }
  t.same(after, baseline, 'after the detach the guest holds toward dom0 exactly what a guest without a vif does');
  t.ok(await waitFor(g, /^detached true, link down$/m), 'the guest saw its interface go');
  t.ok(await waitFor(g, /^old interface: ENETDOWN$/m), 'the old interface refuses to send');
  await m.networkAttach(g, { devid: 0, mac: '00:16:3e:00:05:01', bridge: 'xenbr0', mtu: 1500, rate: null, trusted: true, pcap: null, backend: null });
  const exit = await m.waitExit(g, AbortSignal.timeout(60_000));
  t.equal(exit.reason, 'poweroff', exit.console);
  t.match(exit.console, /^after: echoed 10$/m, 'traffic after the reattach');
  await m.waitExit(p, AbortSignal.timeout(60_000));
  await m.waitExit(b, AbortSignal.timeout(60_000));
});

t.test('multi-queue and split event channels when offered, one queue and one channel when not', async (t) => {
  const sender = (flows: number): string => `${helloCode}${udpFrameCode}
export async function main(guest) {
  const [n] = guest.nets();
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 6, 2]);
  await meet(n, peer);
  const fe = n.path;
  const keys = await guest.xenstore.list(fe);
  console.log('queues ' + n.queuesInUse + ', num-queues node ' + keys.includes('multi-queue-num-queues') + ', queue-0 ' + keys.includes('queue-0')
    + ', split ' + (await guest.xenstore.list(n.queuesInUse > 1 ? fe + '/queue-0' : fe)).includes('event-channel-tx'));
  for (let i = 0; i < 400; i++) await n.send(udpFrame(peer, n.mac, Uint8Array.from([10, 0, 0, 1]), Uint8Array.from([10, 0, 0, 2]), 5000 + (i % ${flows}), 7, new Uint8Array(100)));
  await n.drain();
}
`;
  const receiver = `${helloCode}
export async function main(guest) {
  const [n] = guest.nets();
  const queues = new Set();
  let got = 0;
  const done = new Promise((resolve) => n.onFrame((f, info) => { if (f[12] === 0x08) { queues.add(info.queue); if (++got === 400) resolve(); } }));
  await meet(n, Uint8Array.from([0x00, 0x16, 0x3e, 0, 6, 1]));
  await Promise.race([done, new Promise((r) => setTimeout(r, 30000))]);
  console.log('received ' + got + ' on ' + queues.size + ' queue(s) of ' + n.queuesInUse);
}
`;
  const s4 = guestImage(dir, 'mq1', sender(16), `extra = "xen_netfront.max_queues=4"\nvif = [ 'mac=00:16:3e:00:06:01' ]`);
  const r4 = guestImage(dir, 'mq2', receiver, `vcpus = 2\nvif = [ 'mac=00:16:3e:00:06:02' ]`);
  const [a, b] = await runGuests([s4, r4]);
  t.match(a!.console, /^queues 4, num-queues node true, queue-0 true, split true$/m, a!.console);
  t.match(b!.console, /^received 400 on 2 queue\(s\) of 2$/m, 'one queue per vCPU by default; flows spread over both');
  const [c, d] = await runGuests([s4, r4], { netback: { maxQueues: 1 } });
  t.match(c!.console, /^queues 1, num-queues node false, queue-0 false, split true$/m, 'a backend offering one queue gets the flat layout');
  t.match(d!.console, /^received 400 on 1 queue\(s\) of 1$/m);
});

t.test('rate: the credit scheduler holds a vif to its bytes per interval', async (t) => {
  const image = `${helloCode}
export async function main(guest) {
  const [n] = guest.nets();
  const me = n.mac[5];
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 7, me === 1 ? 2 : 1]);
  if (me === 2) {
    let got = 0, first = 0;
    const done = new Promise((resolve) => n.onFrame((f) => {
      if (f[13] !== 0xb5) return;
      if (got++ === 0) first = Date.now();
      if (got === 100) resolve();
    }));
    await meet(n, peer);
    await Promise.race([done, new Promise((r) => setTimeout(r, 60000))]);
    console.log('received ' + got + ' over ' + (Date.now() - first) + ' ms');
    return;
  }
  await meet(n, peer);
  const start = Date.now();
  for (let i = 0; i < 100; i++) { const f = new Uint8Array(1000); f.set(peer, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = 0xb5; await n.send(f); }
  // netback answers a frame once it passed the credit check: drain() waits for the last.
  await n.drain(30000);
  console.log('sent 100 in ' + (Date.now() - start) + ' ms');
  await new Promise((r) => setTimeout(r, 500));
}
`;
  const a = guestImage(dir, 'rate1', image, `vif = [ 'mac=00:16:3e:00:07:01,rate=800Kb/s@50ms' ]`);
  const b = guestImage(dir, 'rate2', image, `vif = [ 'mac=00:16:3e:00:07:02' ]`);
  const [rx, tx] = await runGuests([b, a]);
  t.match(rx!.console, /^received 100 over \d+ ms$/m, rx!.console);
  const m = /^sent 100 in (\d+) ms$/m.exec(tx!.console);
  t.ok(m !== null, tx!.console);
  // 100,000 bytes at 100,000 bytes/s, of which at most three intervals' credit (15,000 bytes) pass at once:
  // about 0.85 s at least, measured where load can only make it longer (unlimited it takes a few ms).
  t.ok(Number(m![1]) >= 750, `the limit spread the frames over ${m![1]} ms`);
});

t.test('multicast control: netback passes a group only to a frontend that joined it', async (t) => {
  const image = `${helloCode}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function main(guest) {
  const [n] = guest.nets();
  const me = n.mac[5];
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 0x0a, me === 1 ? 2 : 1]);
  const group = Uint8Array.from([0x01, 0x00, 0x5e, 0x00, 0x00, 0x42]);
  const rounds = [];
  let got = 0;
  n.onFrame((f) => { if (f[12] === 0x88 && f[13] === 0xb9) got++; if (f[12] === 0x88 && f[13] === 0xba) rounds.push(f[14]); });
  await meet(n, peer);
  const say = (type, v) => { const f = new Uint8Array(60); f.set(type === 0xb9 ? group : peer, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = type; f[14] = v; return n.send(f); };
  if (me === 1) {
    // Three rounds of 10 frames to the group; the receiver says when it is ready for each.
    for (let r = 0; r < 3; r++) {
      while (!rounds.includes(r)) await sleep(10);
      for (let i = 0; i < 10; i++) await say(0xb9, i);
      await say(0xba, 10 + r);
    }
    await n.drain();
    return;
  }
  console.log('multicast control ' + n.features.multicastControl);
  const counts = [];
  for (const step of ['before', 'joined', 'left']) {
    if (step === 'joined') await n.joinMulticast('01:00:5e:00:00:42');
    if (step === 'left') await n.leaveMulticast(group);
    const r = counts.length;
    got = 0;
    await say(0xba, r);
    while (!rounds.includes(10 + r)) await sleep(10);
    await sleep(100);
    counts.push(step + ' ' + got);
  }
  console.log(counts.join(', '));
  try { await n.joinMulticast('00:16:3e:00:00:01'); } catch (err) { console.log('unicast join: ' + err.code); }
}
`;
  const a = guestImage(dir, 'mc1', image, `vif = [ 'mac=00:16:3e:00:0a:01' ]`);
  const b = guestImage(dir, 'mc2', image, `vif = [ 'mac=00:16:3e:00:0a:02' ]`);
  const [, rx] = await runGuests([a, b]);
  t.equal(rx!.reason, 'poweroff', rx!.console);
  t.match(rx!.console, /^multicast control true$/m);
  t.match(rx!.console, /^before 0, joined 10, left 0$/m, 'filtered until joined, and again after leaving');
  t.match(rx!.console, /^unicast join: EINVAL$/m);
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
    await sleep(25000);
    return;
  }
  if (me === 3) {
    let got = 0;
    const done = new Promise((resolve) => n.onFrame((f) => { if (f[13] === 0xb7 && ++got === 100) resolve(); }));
    await meet(n, mac(1));
    await Promise.race([done, sleep(12000)]);
    console.log('healthy receiver got ' + got);
    return;
  }
  await meet(n, mac(3));
  // 256 fill the receiver's posted buffers; the rest would keep all 256 of the sender's ring slots.
  for (let i = 0; i < 600; i++) await n.send(frame(mac(2), 0xb5));
  for (let i = 0; i < 100; i++) await n.send(frame(mac(3), 0xb7));
  await n.drain(12000).catch((err) => console.log('drain: ' + err.code));
  console.log('sender done');
}
`;
  const cfgs = [1, 2, 3].map((i) => guestImage(dir, `hold${i}`, image, `vif = [ 'mac=00:16:3e:00:0b:0${i}' ]`));
  // Without the release the sender's ring stays full until the stuck receiver goes (25 s), past the healthy one's wait (12 s).
  const [s, , c] = await runGuests(cfgs, { netback: { drainTimeoutMs: 120_000 } });
  t.match(s!.console, /^sender done$/m, s!.console);
  t.match(c!.console, /^healthy receiver got 100$/m, 'the stuck receiver did not keep the sender\'s ring full');
});
