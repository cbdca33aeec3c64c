// The network end to end: xnf in two guests, netback and the bridge in dom0,
// real worker threads. Frames carry a sequence number and a payload that the
// receiver regenerates from it, so a lost, repeated, reordered or corrupted
// frame is seen.

import t from 'tap';
import { guestImage, helloCode, payloadCode, runGuests, tempDir } from './net-fixtures.js';

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
${payloadCode}
export async function main(guest) {
  const N = ${count};
  const [n] = guest.nets();
  const me = n.mac[5], other = me === 1 ? 2 : 1;
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 0, other]);
  const nextSize = sizes(1000 + me), expectSize = sizes(1000 + other);
  let recv = 0, bad = 0, gso = 0, blank = 0, multi = 0, views = 0, gsoViews = 0;
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
    // A frame of several slots handed up as a view of xnf's own pages (no gather copy).
    if (f.length > 4096) {
      multi++;
      if (f.buffer === guest.sc.mem.u8.buffer) { views++; if (info.gsoType !== 0) gsoViews++; }
    }
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
  // Powering off with frames still on the ring, or in dom0 pointing at this
  // guest's pages, would lose them for the peer that still waits for them.
  await n.drain();
  const c = n.counters();
  console.log('received ' + recv + ' bad ' + bad + ' gso ' + (gso > 0) + ' blank ' + (blank > 0) + ' rxErrors ' + c.rxErrors + ' rxDropped ' + c.rxDropped);
  console.log('multi-slot ' + multi + ' views ' + views + ' gso views ' + gsoViews);
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
    const v = /^multi-slot (\d+) views (\d+) gso views (\d+)$/m.exec(e.console);
    t.ok(v !== null && Number(v[2]) > Number(v[1]) / 2 && Number(v[3]) > 0, `${e.name}: most frames of several slots came up as views of xnf's pages, GSO frames too (${v?.slice(1).join(', ')})`);
  }
});



