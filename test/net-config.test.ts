// The pieces of the network that are plain functions: vif specs in xl
// configs, rates, uplink specs, MAC text, the flow hash, the checksum a
// backend fills in for a sender that left it blank, and netif RX slots on
// the generic ring across the index wrap.

import t from 'tap';
import fc from 'fast-check';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { derivedMac, loadDomainConfig, parseNicSpec, parseRate } from '../lib/backends/xlcfg.js';
import { parseUplink } from '../lib/backends/bridge.js';
import { csumAdd, csumFold, fillChecksum, flowHash, formatMac, macKey, parseMac, segmentTcp } from '../lib/ether.js';
import { tempDir } from './net-fixtures.js';
import { offsetOf } from '../lib/abi/layout.js';
import { netif_rx_request, netif_rx_response } from '../lib/abi/netif.js';
import { __CONST_RING_SIZE, netif_rx_sring, netif_rx_sring_entry } from '../lib/abi/ring.js';
import { FramePage, MemoryViews, PAGE_SIZE } from '../lib/hypervisor/page.js';
import { BackRing, FrontRing } from '../lib/xen/ring.js';

const dir = tempDir('xenpv-netcfg-');

t.test('vif specs: keys, defaults, paths relative to the config', async (t) => {
  const cfg = join(dir, 'v.cfg');
  writeFileSync(cfg, `name = "v"\nkernel = "v.mjs"\nvif = [ 'mac=00:16:3e:0A:0b:0c, bridge=br1, rate=10Mb/s, trusted=0, pcap=cap/v.pcap, mtu=9000',\n  'script=vif-bridge' ]\n`);
  const spec = loadDomainConfig(cfg);
  t.same(spec.vifs![0], {
    devid: 0, mac: '00:16:3e:0a:0b:0c', bridge: 'br1', mtu: 9000, rate: { bytes: 62500, usec: 50000 },
    trusted: false, pcap: join(dir, 'cap/v.pcap'), backend: null,
  });
  const second = spec.vifs![1]!;
  t.equal(second.devid, 1);
  t.match(second.mac, /^00:16:3e:[0-7][0-9a-f]:[0-9a-f]{2}:[0-9a-f]{2}$/, 'a MAC under the Xen OUI');
  t.equal(second.mac, derivedMac('v', 1), 'derived from the name and the devid');
  t.equal(loadDomainConfig(cfg).vifs![1]!.mac, second.mac, 'the same on every load, so a seeded run replays');
  t.equal(second.bridge, 'xenbr0');
  t.equal(second.mtu, 1500);
  t.equal(second.trusted, true);
  t.equal(second.rate, null);
});

t.test('a vif without mac=: the MAC comes from the domain name and the devid', async (t) => {
  const macs = new Set<string>();
  for (const name of ['a', 'b', 'web', 'web2']) for (const devid of [0, 1, 2]) macs.add(derivedMac(name, devid));
  t.equal(macs.size, 12, 'other names and devids, other MACs');
  for (const m of macs) t.equal(parseMac(m)[0]! & 3, 0, `${m}: unicast, globally administered (the Xen OUI)`);
  t.equal(parseNicSpec('bridge=xenbr0', dir, 3, 'web').mac, derivedMac('web', 3), 'network-attach derives it the same way');
  const cfg = join(dir, 'late-name.cfg');
  writeFileSync(cfg, `vif = [ 'bridge=xenbr0' ]\nkernel = "v.mjs"\nname = "late"\n`);
  t.equal(loadDomainConfig(cfg).vifs![0]!.mac, derivedMac('late', 0), 'the name may come after the vif list');
  writeFileSync(cfg, `name = "dup"\nkernel = "v.mjs"\nvif = [ 'bridge=xenbr0', 'mac=${derivedMac('dup', 0)}' ]\n`);
  t.throws(() => loadDomainConfig(cfg), { code: 'ECONFIG', message: /late-name\.cfg:3: vif: mac .* given twice/ }, 'a derived MAC given again explicitly');
});

t.test('vif spec errors name the file, the line and the key', async (t) => {
  const cases = [
    `vif = [ 'mac=00:16:3e:00:00' ]`,
    `vif = [ 'mac=01:00:5e:00:00:01' ]`,
    `vif = [ 'colour=red' ]`,
    `vif = [ 'bridge' ]`,
    `vif = [ 'rate=10 lightyears' ]`,
    `vif = [ 'trusted=2' ]`,
    `vif = [ 'mtu=10' ]`,
    `vif = [ 'mac=00:16:3e:00:00:01', 'mac=00:16:3e:00:00:01' ]`,
    `vif = [ 'bridge=a, bridge=b' ]`,
    `vif = 'bridge=xenbr0'`,
  ];
  for (const body of cases) {
    const f = join(dir, 'bad.cfg');
    writeFileSync(f, `name = "bad"\nkernel = "x.mjs"\n${body}\n`);
    t.throws(() => loadDomainConfig(f), { code: 'ECONFIG', message: /bad\.cfg:3: vif: / }, body);
  }
});

t.test('rates as libxl reads them: bits or bytes per second over an interval', async (t) => {
  t.same(parseRate('10Mb/s'), { bytes: 62500, usec: 50000 });
  t.same(parseRate('1MB/s@20ms'), { bytes: 20000, usec: 20000 });
  t.same(parseRate('8Kb/s@1s'), { bytes: 1000, usec: 1000000 });
  t.same(parseRate('100B/s@10000us'), { bytes: 1, usec: 10000 });
  for (const bad of ['', '10', '10Mb', '10Mb/s@', '1b/s@1us', '10Xb/s', '-1Mb/s']) t.throws(() => parseRate(bad), { code: 'EINVAL' }, bad);
});

t.test('uplink specs', async (t) => {
  t.same(parseUplink('udp:5555:127.0.0.1:6666'), { localPort: 5555, remoteHost: '127.0.0.1', remotePort: 6666 });
  t.same(parseUplink('udp:1:[::1]:2'), { localPort: 1, remoteHost: '::1', remotePort: 2 });
  t.same(parseUplink('udp:5555:peer.example:6666').remoteHost, 'peer.example');
  for (const bad of ['tcp:1:h:2', 'udp:0:h:2', 'udp:1:h:70000', 'udp:1:h', 'udp:x:h:2', 'udp:1::2']) t.throws(() => parseUplink(bad), { code: 'EINVAL' }, bad);
});

t.test('MAC text and keys round-trip (property)', async (t) => {
  fc.assert(fc.property(fc.uint8Array({ minLength: 6, maxLength: 6 }), (mac) => {
    const text = formatMac(mac);
    const back = parseMac(text);
    return back.every((b, i) => b === mac[i]) && macKey(back) === mac.reduce((k, b) => k * 256 + b, 0);
  }));
  t.throws(() => parseMac('00:16:3e:00:00:0g'), { code: 'EINVAL' });
});

/** A TCP or UDP frame over IPv4 or IPv6 with a random payload. */
const frames = fc.record({
  v6: fc.boolean(),
  udp: fc.boolean(),
  payload: fc.uint8Array({ minLength: 0, maxLength: 300 }),
  addrs: fc.uint8Array({ minLength: 32, maxLength: 32 }),
  ports: fc.uint8Array({ minLength: 4, maxLength: 4 }),
}).map(({ v6, udp, payload, addrs, ports }) => {
  const l4len = (udp ? 8 : 20) + payload.length;
  const l3 = v6 ? 40 : 20;
  const f = new Uint8Array(14 + l3 + l4len);
  f[12] = v6 ? 0x86 : 0x08;
  f[13] = v6 ? 0xdd : 0x00;
  if (v6) {
    f[14] = 0x60;
    f[18] = l4len >> 8; f[19] = l4len & 0xff;
    f[20] = udp ? 17 : 6;
    f.set(addrs, 22);
  } else {
    f[14] = 0x45;
    f[16] = (l3 + l4len) >> 8; f[17] = (l3 + l4len) & 0xff;
    f[23] = udp ? 17 : 6;
    f.set(addrs.subarray(0, 8), 26);
  }
  const l4 = 14 + l3;
  f.set(ports, l4);
  if (udp) { f[l4 + 4] = l4len >> 8; f[l4 + 5] = l4len & 0xff; } else f[l4 + 12] = 0x50;
  f.set(payload, l4 + (udp ? 8 : 20));
  return { f, v6, udp, l4, l4len };
});

t.test('fillChecksum gives a checksum that verifies over the pseudo-header (property)', async (t) => {
  fc.assert(fc.property(frames, ({ f, v6, udp, l4, l4len }) => {
    if (!fillChecksum(f)) return false;
    const proto = udp ? 17 : 6;
    const pseudo = v6 ? csumAdd(f, 22, 32) : csumAdd(f, 26, 8);
    // Summing the segment with its checksum in place gives 0 (or 0xffff folded to 0).
    const sum = csumFold(csumAdd(f, l4, l4len, pseudo + proto + l4len));
    return sum === 0 || (udp && f[l4 + 6] === 0xff && f[l4 + 7] === 0xff && sum === 0);
  }));
  const arp = new Uint8Array(60);
  arp[12] = 0x08; arp[13] = 0x06;
  t.equal(fillChecksum(arp), false, 'not IP: left alone');
});

t.test('flowHash: the same flow gives the same hash, headers of other kinds give 0', async (t) => {
  fc.assert(fc.property(frames, ({ f }) => flowHash(f) === flowHash(f.slice()) && flowHash(f) !== 0));
  t.equal(flowHash(new Uint8Array(60)), 0);
});

t.test('netif RX slots through the ring across the 2^32 wrap: each response in its request\'s slot, fields intact (property)', async (t) => {
  const size = __CONST_RING_SIZE(netif_rx_sring, PAGE_SIZE);
  const bytes = netif_rx_sring_entry.size;
  const RQ_ID = offsetOf(netif_rx_request, 'id');
  const RQ_GREF = offsetOf(netif_rx_request, 'gref');
  const RP_ID = offsetOf(netif_rx_response, 'id');
  const RP_OFFSET = offsetOf(netif_rx_response, 'offset');
  const RP_FLAGS = offsetOf(netif_rx_response, 'flags');
  const RP_STATUS = offsetOf(netif_rx_response, 'status');
  fc.assert(fc.property(
    fc.integer({ min: 0, max: 3 * size }),
    fc.array(fc.record({ post: fc.integer({ min: 0, max: size }), answer: fc.integer({ min: 0, max: size }), status: fc.integer({ min: -2, max: 4096 }) }), { minLength: 5, maxLength: 60 }),
    (before, steps) => {
      const page = new FramePage(new MemoryViews(new SharedArrayBuffer(PAGE_SIZE)), 0, true);
      const start = (2 ** 32 - before) >>> 0;
      for (const off of [0, 8]) page.store32(off, start);
      page.store32(4, start + 1);
      page.store32(12, start + 1);
      const front = new FrontRing([page], bytes, size, 'rx-front');
      const back = new BackRing([page], bytes, size, 'rx-back');
      front.attach(start);
      back.attach();
      const slot = new Uint8Array(bytes);
      const v = new DataView(slot.buffer);
      const posted = new Map<number, number>(); // slot -> gref
      for (const s of steps) {
        for (let i = 0; i < s.post && !front.full(); i++) {
          const id = front.reqProd & (size - 1);
          const gref = (id * 7919 + start) >>> 0;
          v.setUint16(RQ_ID, id, true);
          v.setUint32(RQ_GREF, gref, true);
          front.putRequest(slot);
          posted.set(id, gref);
        }
        front.pushRequests();
        back.unconsumedRequests();
        for (let i = 0; i < s.answer && back.takeRequest(slot); i++) {
          const idx = (back.reqConsumed - 1) >>> 0;
          const id = v.getUint16(RQ_ID, true);
          if (id !== (idx & (size - 1)) || v.getUint32(RQ_GREF, true) !== posted.get(id)) return false;
          if (back.rspProd !== idx) return false; // netif.h: the response goes in the request's slot
          v.setUint16(RP_ID, id, true);
          v.setUint16(RP_OFFSET, id & 7, true);
          v.setUint16(RP_FLAGS, id & 3, true);
          v.setInt16(RP_STATUS, s.status, true);
          back.putResponse(slot);
        }
        back.pushResponses();
        front.unconsumedResponses();
        while (front.takeResponse(slot)) {
          const idx = (front.rspConsumed - 1) >>> 0;
          const id = v.getUint16(RP_ID, true);
          if (id !== (idx & (size - 1)) || v.getUint16(RP_OFFSET, true) !== (id & 7) || v.getUint16(RP_FLAGS, true) !== (id & 3)) return false;
          if (v.getInt16(RP_STATUS, true) !== s.status) return false;
        }
      }
      return front.error === undefined && back.error === undefined;
    },
  ), { numRuns: 200 });
  t.pass('256 slots of 8 bytes, requests and responses in the same slots, across the wrap');
});

t.test('software GSO: the segments carry the payload in order, each with its own lengths, sequence numbers and good checksums (property)', async (t) => {
  const scratch = new Uint8Array(65536);
  fc.assert(fc.property(
    fc.boolean(), fc.integer({ min: 0, max: 20000 }), fc.integer({ min: 1, max: 9000 }), fc.integer({ min: 0, max: 0xff }),
    fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: 40 }).map((n) => n & ~3),
    (v6, payloadLen, mss, flags, seq0, optLen) => {
      const l4 = 14 + (v6 ? 40 : 20);
      const hdr = l4 + 20 + optLen;
      const f = new Uint8Array(hdr + payloadLen);
      for (let i = 0; i < payloadLen; i++) f[hdr + i] = (i * 31 + 7) & 0xff;
      f[12] = v6 ? 0x86 : 0x08; f[13] = v6 ? 0xdd : 0x00;
      if (v6) { f[14] = 0x60; f[20] = 6; f[21] = 64; f.fill(0xfe, 22, 54); }
      else { f[14] = 0x45; f[16] = (f.length - 14) >> 8; f[17] = (f.length - 14) & 255; f[18] = 0x12; f[19] = 0x34; f[22] = 64; f[23] = 6; f.fill(10, 26, 34); }
      new DataView(f.buffer).setUint32(l4 + 4, seq0);
      f[l4 + 12] = ((20 + optLen) / 4) << 4; f[l4 + 13] = flags;
      const got: Uint8Array[] = [];
      const n = segmentTcp(f, f.length, mss, scratch, (s) => got.push(s.slice()));
      if (n !== Math.max(1, Math.ceil(payloadLen / mss)) || got.length !== n) return false;
      let at = 0;
      for (let i = 0; i < n; i++) {
        const s = got[i]!;
        const v = new DataView(s.buffer);
        const chunk = s.length - hdr;
        if (chunk > mss || (i < n - 1 && chunk !== mss)) return false;
        if (!s.subarray(hdr).every((b, k) => b === f[hdr + at + k])) return false;
        if (v.getUint32(l4 + 4) !== ((seq0 + at) >>> 0)) return false;
        const last = i === n - 1;
        const want = (flags & ~(last ? 0 : 0x09)) & ~(i > 0 ? 0x80 : 0);
        if (s[l4 + 13] !== want) return false;
        if (v6 ? v.getUint16(18) !== s.length - 54 : v.getUint16(16) !== s.length - 14 || csumFold(csumAdd(s, 14, 20)) !== 0) return false;
        const pseudo = v6 ? csumAdd(s, 22, 32) : csumAdd(s, 26, 8);
        if (csumFold(csumAdd(s, l4, s.length - l4, pseudo + 6 + (s.length - l4))) !== 0) return false;
        at += chunk;
      }
      return at === payloadLen;
    },
  ), { numRuns: 300 });
  const udp = new Uint8Array(100);
  udp[12] = 0x08; udp[14] = 0x45; udp[23] = 17;
  t.equal(segmentTcp(udp, 100, 10, scratch, () => t.fail('emitted')), 0, 'not TCP: nothing cut');
});
