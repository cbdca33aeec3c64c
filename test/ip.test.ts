// The guest IP layer (lib/guest/ip.ts): stacks joined by a scripted hub
// (test/ip-harness.ts) doing ARP, ping and UDP; hostile and truncated frames;
// property tests of the codecs; tshark decoding the frames the stack wrote,
// with checksum validation on; and, as root with /dev/net/tun, Linux's own
// ping and socat in a network namespace talking to the stack over a TAP
// device that socat carries as UDP datagrams.

import t from 'tap';
import fc from 'fast-check';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  ARPOP_REPLY, ARPOP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IP, ETHER_ADDR_BROADCAST, ETHER_HDR_LEN, ICMP_ECHO, IPPROTO_ICMP, IPPROTO_UDP,
  IP_HDR_LEN, IP_MF, IpInterface, UDP_HDR_LEN, arpDecode, arpEncode, etherEncode, icmpDecode, icmpEncode, inetChecksum,
  ipv4Decode, ipv4Encode, ipv4Format, ipv4Parse, macRead, newArpHeader, newIcmpEcho, newIpv4Header, newUdpHeader,
  parseIpConfig, udpDecode, udpEncode, type DropReason, type Ipv4Header, type Link,
} from '../lib/guest/ip.js';
import { PcapWriter } from '../lib/pcap.js';
import { hub, type Hub } from './ip-harness.js';
import { netnsSkip, run } from './fixtures/netns.js';

const MAC_A = 0x02_00_00_00_00_0a;
const MAC_B = 0x02_00_00_00_00_0b;
const A = ipv4Parse('10.0.0.1');
const B = ipv4Parse('10.0.0.2');

function pair(opts: ConstructorParameters<typeof IpInterface>[1] = {}): { h: Hub; a: IpInterface; b: IpInterface } {
  const h = hub();
  const a = new IpInterface(h.port(MAC_A), { name: 'a', ...opts });
  const b = new IpInterface(h.port(MAC_B), { name: 'b', ...opts });
  a.assign({ address: A, prefixLength: 24, gateway: 0 });
  b.assign({ address: B, prefixLength: 24, gateway: 0 });
  return { h, a, b };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const drops = (ip: IpInterface): Partial<Record<DropReason, number>> =>
  Object.fromEntries(Object.entries(ip.counters.drops).filter(([, n]) => n > 0));

/** A frame from `src` to `dst` (MACs) carrying an IPv4 datagram with `l4` as its payload. */
function ipFrame(dstMac: number, srcMac: number, ih: Partial<Ipv4Header>, l4: Uint8Array): Uint8Array {
  const f = new Uint8Array(ETHER_HDR_LEN + IP_HDR_LEN + l4.length);
  etherEncode(f, { dst: dstMac, src: srcMac, type: ETHERTYPE_IP });
  f.set(l4, ETHER_HDR_LEN + IP_HDR_LEN);
  ipv4Encode(f, ETHER_HDR_LEN, { ...newIpv4Header(), len: IP_HDR_LEN + l4.length, ttl: 64, p: IPPROTO_UDP, src: B, dst: A, ...ih });
  return f;
}

/** A UDP segment from `sport` to `dport` with checksum for src -> dst. */
function udpSegment(src: number, dst: number, sport: number, dport: number, data: Uint8Array): Uint8Array {
  const u = new Uint8Array(UDP_HDR_LEN + data.length);
  u.set(data, UDP_HDR_LEN);
  udpEncode(u, 0, src, dst, { sport, dport, len: u.length, sum: 0 });
  return u;
}

t.test('ARP resolves both ways, a ping is answered and its round trip returned', async (t) => {
  const h = hub();
  const wire: Uint8Array[] = [];
  h.onWire = (f) => wire.push(f);
  const a = new IpInterface(h.port(MAC_A), { name: 'a' });
  const b = new IpInterface(h.port(MAC_B), { name: 'b' });
  t.teardown(() => (a.close(), b.close()));
  a.assign({ address: A, prefixLength: 24, gateway: 0 });
  b.assign({ address: B, prefixLength: 24, gateway: 0 });
  t.equal(a.address, '10.0.0.1');
  // Gratuitous ARP: a broadcast request whose sender and target are the new address.
  const garp = wire.map((f) => {
    const h = newArpHeader();
    return arpDecode(f, ETHER_HDR_LEN, f.length, h) === null && macRead(f, 0) === ETHER_ADDR_BROADCAST ? h : null;
  });
  t.same(garp.map((g) => g && [g.op, g.spa, g.tpa]), [[ARPOP_REQUEST, A, A], [ARPOP_REQUEST, B, B]]);
  t.equal(a.arpLookup(B), undefined, 'a gratuitous ARP of a stranger is not cached');

  const rtt = await a.ping('10.0.0.2', { timeoutMs: 2000 });
  t.ok(rtt >= 0 && rtt < 2000, `rtt ${rtt} ms`);
  t.equal(a.arpLookup('10.0.0.2'), MAC_B);
  t.equal(b.arpLookup(A), MAC_A, 'the target of a request learns its sender');
  t.equal(b.counters.echoRequests, 1);
  t.equal(a.counters.echoReplies, 1);
  t.equal(b.counters.arpRequests, 1);
  await Promise.all([1, 2, 3].map(() => a.ping(B, { bytes: 1000 })));
  t.equal(a.counters.echoReplies, 4);
  t.same(drops(a), {});
  t.same(drops(b), {});
  t.ok((await a.ping(A)) >= 0, 'ping to our own address loops back');
});

t.test('UDP: echo by callback, receive by async iterator, lengths up to the MTU', async (t) => {
  const { a, b } = pair();
  t.teardown(() => (a.close(), b.close()));
  const echo = b.bind(7);
  echo.onMessage((d) => void echo.send(d.address, d.port, d.data));
  const client = a.bind();
  t.ok(client.port >= 49152, `ephemeral port ${client.port}`);
  const sizes = [0, 1, 2, 100, 1472];
  for (const n of sizes) {
    const data = Uint8Array.from({ length: n }, (_, i) => (i * 7 + n) & 0xff);
    await client.send('10.0.0.2', 7, data);
  }
  const got: number[] = [];
  for await (const d of client) {
    t.equal(d.address, '10.0.0.2');
    t.equal(d.port, 7);
    t.ok(d.data.every((x, i) => x === ((i * 7 + d.data.length) & 0xff)), `payload of ${d.data.length} intact`);
    got.push(d.data.length);
    if (got.length === sizes.length) client.close();
  }
  t.same(got, sizes);
  t.equal(b.counters.udpIn, sizes.length);
  await t.rejects(a.bind(9).send(B, 7, new Uint8Array(1473)), { code: 'EMSGSIZE' });
  await t.rejects(client.send(B, 7, new Uint8Array(1)), { code: 'EBADF' });
  await t.rejects(client.receive(), { code: 'EBADF' });
  t.same(drops(a), {});
  t.same(drops(b), {});
});

t.test('UDP: bind errors, a bounded queue, receive timeouts and aborts', async (t) => {
  const { a, b } = pair();
  t.teardown(() => (a.close(), b.close()));
  const s = b.bind(5000, { queueLength: 3 });
  t.throws(() => b.bind(5000), { code: 'EADDRINUSE' });
  t.throws(() => b.bind(70000), { code: 'EINVAL' });
  t.throws(() => b.bind(-1), { code: 'EINVAL' });
  const c = a.bind(6000);
  await t.rejects(c.send(B, 0, new Uint8Array(1)), { code: 'EINVAL' });
  await t.rejects(c.send('10.0.0', 5000, new Uint8Array(1)), { code: 'EINVAL' });
  for (let i = 0; i < 5; i++) await c.send(B, 5000, Uint8Array.of(i));
  await c.send(B, 5001, Uint8Array.of(9));
  await sleep(20);
  t.equal(s.dropped, 2);
  t.equal(b.counters.drops['udp-queue-full'], 2);
  t.equal(b.counters.drops['udp-no-socket'], 1);
  for (let i = 0; i < 3; i++) t.same([...(await s.receive({ timeoutMs: 100 })).data], [i], 'the oldest datagrams were kept');
  await t.rejects(s.receive({ timeoutMs: 20 }), { code: 'ETIMEDOUT' });
  const ac = new AbortController();
  const r = s.receive({ signal: ac.signal });
  ac.abort();
  await t.rejects(r, { code: 'ECANCELED' });
  s.close();
  t.doesNotThrow(() => b.bind(5000).close(), 'a closed port can be bound again');
});

t.test('routing: on the subnet, by the gateway, broadcast, and ENETUNREACH', async (t) => {
  const h = hub();
  const seen: Uint8Array[] = [];
  h.onWire = (f) => seen.push(f);
  const a = new IpInterface(h.port(MAC_A), { name: 'a' });
  const gw = new IpInterface(h.port(MAC_B), { name: 'gw' });
  const bare = new IpInterface(h.port(0x02_00_00_00_00_0c), { name: 'bare' });
  t.teardown(() => (a.close(), gw.close(), bare.close()));
  gw.assign({ address: ipv4Parse('10.0.0.254'), prefixLength: 24, gateway: 0 });
  const s = a.bind(1234);
  await t.rejects(s.send('10.0.0.2', 7, new Uint8Array(1)), { code: 'ENETUNREACH' }, 'no address yet');
  a.assign({ address: A, prefixLength: 24, gateway: 0 });
  await t.rejects(s.send('192.168.1.5', 7, new Uint8Array(1)), { code: 'ENETUNREACH' }, 'no gateway');
  await t.rejects(s.send('224.0.0.1', 7, new Uint8Array(1)), { code: 'ENETUNREACH' });
  t.throws(() => a.assign({ address: A, prefixLength: 24, gateway: ipv4Parse('10.0.1.1') }), { code: 'EINVAL' });
  a.assign({ address: A, prefixLength: 24, gateway: ipv4Parse('10.0.0.254') });
  seen.length = 0;
  await s.send('192.168.1.5', 7, new Uint8Array(4));
  await sleep(30);
  const out = seen.filter((f) => macRead(f, 12 - 6) === MAC_A && (f[12]! << 8 | f[13]!) === ETHERTYPE_IP);
  t.equal(out.length, 1);
  t.equal(macRead(out[0]!, 0), MAC_B, 'sent to the gateway\'s MAC');
  const ih = newIpv4Header();
  t.equal(ipv4Decode(out[0]!, ETHER_HDR_LEN, out[0]!.length, ih), null);
  t.equal(ipv4Format(ih.dst), '192.168.1.5');
  t.equal(gw.counters.drops['ip-other-host'], 1, 'a host does not forward');
  // A broadcast leaves an unconfigured interface from 0.0.0.0 and reaches everyone.
  const r = a.bind(68);
  seen.length = 0;
  await bare.bind(68).send('255.255.255.255', 68, Uint8Array.of(1, 2));
  t.same([...(await r.receive({ timeoutMs: 500 })).data], [1, 2]);
  t.equal(seen.length, 1);
  t.equal(macRead(seen[0]!, 0), ETHER_ADDR_BROADCAST);
  t.equal(ipv4Decode(seen[0]!, ETHER_HDR_LEN, seen[0]!.length, ih), null);
  t.equal(ih.src, 0);
  // A subnet-directed broadcast is accepted; a broadcast ping is not answered.
  await gw.bind(99).send('10.0.0.255', 68, Uint8Array.of(3));
  t.same([...(await r.receive({ timeoutMs: 500 })).data], [3]);
  await t.rejects(gw.ping('10.0.0.255', { timeoutMs: 100 }), { code: 'ETIMEDOUT' });
  t.equal(a.counters.drops['icmp-broadcast-echo'], 1);
});

t.test('ARP: unanswered requests, the pending queue bound, eviction, ageing', async (t) => {
  const { h, a, b } = pair({ arpRetransmitMs: 30, arpTries: 2, arpQueueLength: 4, arpTimeoutMs: 150, arpEntries: 4 });
  t.teardown(() => (a.close(), b.close()));
  let requests = 0;
  h.onWire = (f) => {
    const ah = newArpHeader();
    if (arpDecode(f, ETHER_HDR_LEN, f.length, ah) === null && ah.op === ARPOP_REQUEST && ah.spa === A && ah.tpa !== A) requests++;
  };
  const s = a.bind(1000);
  for (let i = 0; i < 10; i++) await s.send('10.0.0.77', 9, Uint8Array.of(i));
  t.equal(a.counters.drops['arp-queue-full'], 6);
  await t.rejects(a.ping('10.0.0.78', { timeoutMs: 200 }), { code: 'ETIMEDOUT' });
  t.equal(a.counters.drops['arp-unresolved'], 4 + 1, 'the four held datagrams and the ping');
  t.equal(requests, 4, 'arpTries requests per address');
  const ac = new AbortController();
  const p = a.ping(B, { signal: ac.signal, timeoutMs: 5000 });
  ac.abort();
  await t.rejects(p, { code: 'ECANCELED' });
  // Ageing: after arpTimeoutMs the entry is asked for again.
  await a.ping(B);
  t.equal(a.arpLookup(B), MAC_B);
  await sleep(200);
  t.equal(a.arpLookup(B), undefined, 'aged out');
  requests = 0;
  await a.ping(B);
  t.equal(requests, 1, 're-resolved');
  // Bound: requests from many hosts for a's address keep at most arpEntries entries.
  for (let i = 0; i < 10; i++) {
    const f = new Uint8Array(ETHER_HDR_LEN + 28);
    etherEncode(f, { dst: ETHER_ADDR_BROADCAST, src: 0x02_00_00_00_01_00 + i, type: ETHERTYPE_ARP });
    arpEncode(f, ETHER_HDR_LEN, { op: ARPOP_REQUEST, sha: 0x02_00_00_00_01_00 + i, spa: ipv4Parse('10.0.0.100') + i, tha: 0, tpa: A });
    a.input(f);
  }
  const cached = Array.from({ length: 10 }, (_, i) => a.arpLookup(ipv4Parse('10.0.0.100') + i) !== undefined);
  t.same(cached, [false, false, false, false, false, false, true, true, true, true]);
  t.equal(a.counters.drops['internal-error'], 0);
});

t.test('checksums are verified: a corrupted header or payload is dropped under its reason', async (t) => {
  const { h, a, b } = pair();
  t.teardown(() => (a.close(), b.close()));
  await a.ping(B);
  const sock = b.bind(7);
  const s = a.bind(1000);
  const corrupt = (at: (f: Uint8Array) => number) => {
    h.rewrite = (f, from) => {
      if (from.mac[5] !== 0x0a || (f[12]! << 8 | f[13]!) !== ETHERTYPE_IP) return f;
      const g = f.slice();
      g[at(g)]! ^= 0x10;
      return g;
    };
  };
  corrupt((f) => f.length - 1);
  await s.send(B, 7, Uint8Array.of(1, 2, 3, 4));
  await a.ping(B, { timeoutMs: 100 }).catch(() => {});
  corrupt(() => ETHER_HDR_LEN + 8); // TTL, covered by the header checksum
  await s.send(B, 7, Uint8Array.of(1, 2, 3, 4));
  h.rewrite = null;
  await sleep(30);
  t.same(drops(b), { 'udp-checksum': 1, 'icmp-checksum': 1, 'ip-checksum': 1 });
  // A zero UDP checksum means none was computed (RFC 768) and is accepted.
  const seg = udpSegment(A, B, 1000, 7, Uint8Array.of(5));
  seg[6] = 0;
  seg[7] = 0;
  b.input(ipFrame(MAC_B, MAC_A, { src: A, dst: B }, seg));
  t.same([...(await sock.receive({ timeoutMs: 100 })).data], [5]);
});

t.test('hostile frames are dropped with reasons, never thrown', async (t) => {
  const { a, b } = pair();
  t.teardown(() => (a.close(), b.close()));
  const sock = a.bind(7);
  const seg = udpSegment(B, A, 9, 7, Uint8Array.of(1, 2, 3));
  const cases: Array<[string, Uint8Array, DropReason | null]> = [
    ['runt', new Uint8Array(13), 'eth-short'],
    ['another host', ipFrame(MAC_B, MAC_A, {}, seg), 'eth-other-host'],
    ['IPv6', (() => { const f = ipFrame(MAC_A, MAC_B, {}, seg); f[12] = 0x86; f[13] = 0xdd; return f; })(), 'eth-type'],
    ['good', ipFrame(MAC_A, MAC_B, {}, seg), null],
    ['padded to 60 bytes', (() => { const f = new Uint8Array(80); f.set(ipFrame(MAC_A, MAC_B, {}, seg)); return f; })(), null],
    ['fragment', ipFrame(MAC_A, MAC_B, { off: IP_MF }, seg), 'ip-fragment'],
    ['later fragment', ipFrame(MAC_A, MAC_B, { off: 185 }, seg), 'ip-fragment'],
    ['truncated IP', ipFrame(MAC_A, MAC_B, {}, seg).subarray(0, 30), 'ip-short'],
    ['total length past the frame', ipFrame(MAC_A, MAC_B, { len: 200 }, seg), 'ip-total-length'],
    ['for another address', ipFrame(MAC_A, MAC_B, { dst: ipv4Parse('10.0.0.3') }, seg), 'ip-other-host'],
    ['broadcast source', ipFrame(MAC_A, MAC_B, { src: 0xffffffff }, seg), 'ip-bad-source'],
    ['TCP', ipFrame(MAC_A, MAC_B, { p: 6 }, seg), 'ip-protocol'],
    ['UDP length past the datagram', (() => { const s = seg.slice(); s[5] = 40; return ipFrame(MAC_A, MAC_B, {}, s); })(), 'udp-length'],
    ['UDP header cut', ipFrame(MAC_A, MAC_B, {}, seg.subarray(0, 6)), 'udp-short'],
    ['no socket', ipFrame(MAC_A, MAC_B, {}, udpSegment(B, A, 9, 8, Uint8Array.of(1))), 'udp-no-socket'],
    ['ICMP header cut', ipFrame(MAC_A, MAC_B, { p: IPPROTO_ICMP }, Uint8Array.of(8, 0, 0xf7, 0xff)), 'icmp-short'],
    ['unsolicited echo reply', ipFrame(MAC_A, MAC_B, { p: IPPROTO_ICMP }, (() => { const m = new Uint8Array(16); icmpEncode(m, 0, 16, { type: 0, code: 0, id: 1, seq: 1 }); return m; })()), 'icmp-unmatched-reply'],
    ['ICMP timestamp', ipFrame(MAC_A, MAC_B, { p: IPPROTO_ICMP }, (() => { const m = new Uint8Array(20); icmpEncode(m, 0, 20, { type: 13, code: 0, id: 1, seq: 1 }); return m; })()), 'icmp-type'],
  ];
  for (const [name, f, reason] of cases) {
    const before = { ...a.counters.drops };
    a.input(f);
    const changed = Object.entries(a.counters.drops).filter(([k, n]) => n !== before[k as DropReason]).map(([k]) => k);
    t.same(changed, reason === null ? [] : [reason], name);
  }
  t.equal((await sock.receive({ timeoutMs: 100 })).data.length, 3);
  t.equal((await sock.receive({ timeoutMs: 100 })).data.length, 3, 'padding after the datagram is ignored');
  // ARP: wrong hardware type, unknown op, a broadcast sender, someone claiming our address.
  const arp = (mutate: (f: Uint8Array) => void, op = ARPOP_REQUEST, sha = MAC_B, spa = B) => {
    const f = new Uint8Array(ETHER_HDR_LEN + 28);
    etherEncode(f, { dst: ETHER_ADDR_BROADCAST, src: sha, type: ETHERTYPE_ARP });
    arpEncode(f, ETHER_HDR_LEN, { op, sha, spa, tha: 0, tpa: A });
    mutate(f);
    return f;
  };
  const arpCases: Array<[string, Uint8Array, DropReason]> = [
    ['ARP cut', arp(() => {}).subarray(0, 40), 'arp-short'],
    ['ARP over token ring', arp((f) => (f[ETHER_HDR_LEN + 1] = 6)), 'arp-format'],
    ['ARP op 9', arp(() => {}, 9), 'arp-op'],
    ['ARP from a broadcast MAC', arp(() => {}, ARPOP_REQUEST, ETHER_ADDR_BROADCAST), 'arp-bad-sender'],
    ['ARP claiming our address', arp(() => {}, ARPOP_REPLY, 0x02_00_00_00_00_66, A), 'arp-address-conflict'],
  ];
  for (const [name, f, reason] of arpCases) {
    const before = a.counters.drops[reason];
    a.input(f);
    t.equal(a.counters.drops[reason], before + 1, name);
  }
  t.equal(a.counters.drops['internal-error'], 0);
});

t.test('parseIpConfig: static, DHCP, and EINVAL for anything else', async (t) => {
  t.same(parseIpConfig('greeting=hello ip=10.0.0.2/24 gw=10.0.0.1'), { method: 'static', address: B, prefixLength: 24, gateway: A });
  t.same(parseIpConfig('ip=10.1.2.3/8'), { method: 'static', address: ipv4Parse('10.1.2.3'), prefixLength: 8, gateway: 0 });
  t.same(parseIpConfig('  ip=dhcp  '), { method: 'dhcp' });
  t.equal(parseIpConfig('greeting=hello'), null);
  t.equal(parseIpConfig(''), null);
  for (const bad of [
    'ip=10.0.0.2', 'ip=10.0.0.2/33', 'ip=10.0.0.2/0', 'ip=10.0.0.256/24', 'ip=10.0.0/24', 'ip=010.0.0.2/24', 'ip=dhcp gw=10.0.0.1',
    'gw=10.0.0.1', 'ip=10.0.0.0/24', 'ip=10.0.0.255/24', 'ip=224.0.0.1/4', 'ip=127.0.0.1/8', 'ip=10.0.0.2/24 gw=10.0.1.1',
    'ip=10.0.0.2/24 gw=10.0.0.2', 'ip=10.0.0.2/24 ip=10.0.0.3/24', 'ip=', 'ip=dhcp6', 'ip=1.2.3.4/24/1',
  ]) {
    t.throws(() => parseIpConfig(bad), { code: 'EINVAL' }, bad);
  }
  t.same(parseIpConfig('ip=10.0.0.1/31'), { method: 'static', address: A, prefixLength: 31, gateway: 0 }, '/31 has no network or broadcast address');
  const h = hub();
  const ip = new IpInterface(h.port(MAC_A));
  t.teardown(() => ip.close());
  await t.rejects(ip.configure('greeting=hello'), { code: 'EINVAL' });
  await ip.configure('ip=10.0.0.1/24 gw=10.0.0.254');
  t.equal(ip.address, '10.0.0.1');
  t.equal(ip.gateway, '10.0.0.254');
  t.throws(() => new IpInterface({ ...h.port(MAC_B), mac: new Uint8Array(5) }), { code: 'EINVAL' });
  t.throws(() => new IpInterface({ ...h.port(MAC_B), mtu: 100 }), { code: 'EINVAL' });
});

// ---- property tests ----------------------------------------------------------------

const u32Arb = fc.integer({ min: 0, max: 0xffffffff });
const macArb = fc.integer({ min: 0, max: 0xffff_ffff_ffff });

/** RFC 1071 by the book: 16-bit words, end-around carry after each add. */
function referenceChecksum(b: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < b.length; i += 2) {
    sum += (b[i]! << 8) | (b[i + 1] ?? 0);
    if (sum > 0xffff) sum = (sum & 0xffff) + 1;
  }
  return ~sum & 0xffff;
}

t.test('property: the Internet checksum matches RFC 1071 and verifies to zero', async () => {
  fc.assert(fc.property(fc.uint8Array({ maxLength: 3000 }), (data) => {
    const sum = inetChecksum(data, 0, data.length);
    if (sum !== referenceChecksum(data)) return false;
    // Appended at an even offset, the checksum makes the whole verify to zero.
    const even = new Uint8Array(data.length + (data.length & 1) + 2);
    even.set(data);
    even[even.length - 2] = sum >> 8;
    even[even.length - 1] = sum & 0xff;
    return inetChecksum(even, 0, even.length) === 0;
  }), { numRuns: 500 });
});

t.test('property: ARP, IPv4, UDP and ICMP headers round-trip; one flipped bit is caught', async () => {
  fc.assert(fc.property(fc.integer({ min: 1, max: 2 }), macArb, u32Arb, macArb, u32Arb, (op, sha, spa, tha, tpa) => {
    const b = new Uint8Array(28);
    arpEncode(b, 0, { op, sha, spa, tha, tpa });
    const h = newArpHeader();
    return arpDecode(b, 0, 28, h) === null && h.op === op && h.sha === sha && h.spa === spa && h.tha === tha && h.tpa === tpa;
  }));
  const ipArb = fc.record({
    tos: fc.integer({ min: 0, max: 255 }), id: fc.integer({ min: 0, max: 0xffff }), df: fc.boolean(),
    ttl: fc.integer({ min: 0, max: 255 }), p: fc.integer({ min: 0, max: 255 }), src: u32Arb, dst: u32Arb,
    payload: fc.uint8Array({ maxLength: 200 }), flip: fc.nat(),
  });
  fc.assert(fc.property(ipArb, (r) => {
    const b = new Uint8Array(IP_HDR_LEN + r.payload.length);
    b.set(r.payload, IP_HDR_LEN);
    const h: Ipv4Header = { hlen: IP_HDR_LEN, tos: r.tos, len: b.length, id: r.id, off: r.df ? 0x4000 : 0, ttl: r.ttl, p: r.p, src: r.src, dst: r.dst };
    ipv4Encode(b, 0, h);
    const d = newIpv4Header();
    if (ipv4Decode(b, 0, b.length, d) !== null) return false;
    if (JSON.stringify(d) !== JSON.stringify(h)) return false;
    const bit = r.flip % (IP_HDR_LEN * 8);
    b[bit >> 3]! ^= 1 << (bit & 7);
    return ipv4Decode(b, 0, b.length, d) !== null;
  }), { numRuns: 500 });
  fc.assert(fc.property(u32Arb, u32Arb, fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 0xffff }), fc.uint8Array({ maxLength: 1472 }), fc.nat(),
    (src, dst, sport, dport, data, flip) => {
      const u = udpSegment(src, dst, sport, dport, data);
      const h = newUdpHeader();
      if (udpDecode(u, 0, u.length, src, dst, h) !== null || h.sport !== sport || h.dport !== dport || h.len !== u.length || h.sum === 0) return false;
      // Any one flipped bit outside the checksum field fails the check or the length test.
      const bit = flip % (u.length * 8);
      if (bit >> 3 === 6 || bit >> 3 === 7) return true;
      u[bit >> 3]! ^= 1 << (bit & 7);
      return udpDecode(u, 0, u.length, src, dst, h) !== null;
    }), { numRuns: 500 });
  fc.assert(fc.property(fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 0xffff }), fc.uint8Array({ maxLength: 100 }),
    (type, id, seq, data) => {
      const m = new Uint8Array(8 + data.length);
      m.set(data, 8);
      icmpEncode(m, 0, m.length, { type, code: 0, id, seq });
      const h = newIcmpEcho();
      return icmpDecode(m, 0, m.length, h) === null && h.type === type && h.id === id && h.seq === seq;
    }));
});

t.test('property: random, truncated and corrupted frames are counted, never thrown', async (t) => {
  const { a, b } = pair();
  t.teardown(() => (a.close(), b.close()));
  a.bind(7);
  const valid = [
    ipFrame(MAC_A, MAC_B, {}, udpSegment(B, A, 9, 7, Uint8Array.of(1, 2, 3))),
    ipFrame(MAC_A, MAC_B, { p: IPPROTO_ICMP }, (() => { const m = new Uint8Array(64); icmpEncode(m, 0, 64, { type: ICMP_ECHO, code: 0, id: 1, seq: 2 }); return m; })()),
    (() => {
      const f = new Uint8Array(42);
      etherEncode(f, { dst: ETHER_ADDR_BROADCAST, src: MAC_B, type: ETHERTYPE_ARP });
      arpEncode(f, ETHER_HDR_LEN, { op: ARPOP_REQUEST, sha: MAC_B, spa: B, tha: 0, tpa: A });
      return f;
    })(),
  ];
  const mangled = fc.oneof(
    fc.uint8Array({ maxLength: 1600 }),
    fc.tuple(fc.constantFrom(...valid), fc.nat()).map(([f, n]) => f.subarray(0, n % (f.length + 1))),
    fc.tuple(fc.constantFrom(...valid), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }))
      .map(([f, edits]) => { const g = f.slice(); for (const [at, v] of edits) g[at % g.length] = v; return g; }),
    // A valid Ethernet and IPv4 header (checksum right) over random bytes.
    fc.tuple(fc.constantFrom(IPPROTO_UDP, IPPROTO_ICMP), fc.uint8Array({ maxLength: 200 })).map(([p, l4]) => ipFrame(MAC_A, MAC_B, { p }, l4)),
  );
  fc.assert(fc.property(mangled, (f) => {
    const before = a.counters.rxFrames;
    a.input(f);
    return a.counters.rxFrames === before + 1 && a.counters.drops['internal-error'] === 0;
  }), { numRuns: 3000 });
  t.equal(a.counters.drops['internal-error'], 0);
  t.ok(Object.values(a.counters.drops).reduce((x, y) => x + y, 0) > 1000, 'most were dropped, each under a reason');
  await sleep(10);
});

// ---- tshark, a real decoder ---------------------------------------------------------

const tshark = spawnSync('tshark', ['--version'], { encoding: 'utf8' });

export function tsharkFields(path: string, fields: string[]): string[][] {
  const r = spawnSync('tshark', ['-r', path, '-o', 'ip.check_checksum:TRUE', '-o', 'udp.check_checksum:TRUE', '-T', 'fields', '-E', 'occurrence=f',
    ...fields.flatMap((f) => ['-e', f])], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`tshark: ${r.stderr}`);
  return r.stdout.trim().split('\n').map((l) => l.split('\t'));
}

t.test('tshark decodes ARP, ping and UDP with valid checksums', { skip: tshark.status === 0 ? false : 'tshark is not installed (Debian package tshark)' }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-ip-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'ip.pcap');
  const pcap = new PcapWriter(path);
  const h = hub();
  h.onWire = (f) => pcap.write(f);
  const a = new IpInterface(h.port(MAC_A), { name: 'a' });
  const b = new IpInterface(h.port(MAC_B), { name: 'b' });
  a.assign({ address: A, prefixLength: 24, gateway: 0 });
  b.assign({ address: B, prefixLength: 24, gateway: 0 });
  const echo = b.bind(7);
  echo.onMessage((d) => void echo.send(d.address, d.port, d.data));
  await a.ping(B);
  await a.ping(B, { bytes: 1472 });
  const s = a.bind(40000);
  await s.send(B, 7, new TextEncoder().encode('hello, tshark'));
  await s.receive({ timeoutMs: 1000 });
  await s.send(B, 7, new Uint8Array(0));
  await s.receive({ timeoutMs: 1000 });
  await h.idle();
  pcap.close();
  a.close();
  b.close();
  const rows = tsharkFields(path, ['eth.src', 'eth.dst', 'arp.opcode', 'arp.src.proto_ipv4', 'arp.dst.proto_ipv4', 'arp.src.hw_mac',
    'ip.src', 'ip.dst', 'ip.checksum.status', 'ip.ttl', 'icmp.type', 'icmp.seq', 'icmp.checksum.status', 'icmp.resp_to',
    'udp.srcport', 'udp.dstport', 'udp.length', 'udp.checksum.status', '_ws.expert.severity', '_ws.malformed']);
  const col = (r: string[], name: string) => r[['eth.src', 'eth.dst', 'arp.opcode', 'arp.spa', 'arp.tpa', 'arp.sha', 'ip.src', 'ip.dst', 'ip.cs', 'ip.ttl',
    'icmp.type', 'icmp.seq', 'icmp.cs', 'icmp.resp_to', 'udp.sport', 'udp.dport', 'udp.len', 'udp.cs', 'severity', 'malformed'].indexOf(name)] ?? '';
  t.equal(rows.length, 2 + 2 + 4 + 4, 'two gratuitous ARPs, ARP request and reply, two pings, two UDP echoes');
  const arps = rows.filter((r) => col(r, 'arp.opcode') !== '');
  t.same(arps.map((r) => [col(r, 'arp.opcode'), col(r, 'arp.spa'), col(r, 'arp.tpa')]), [
    ['1', '10.0.0.1', '10.0.0.1'], ['1', '10.0.0.2', '10.0.0.2'], ['1', '10.0.0.1', '10.0.0.2'], ['2', '10.0.0.2', '10.0.0.1'],
  ]);
  t.same(arps.map((r) => col(r, 'arp.sha')), ['02:00:00:00:00:0a', '02:00:00:00:00:0b', '02:00:00:00:00:0a', '02:00:00:00:00:0b']);
  const icmp = rows.filter((r) => col(r, 'icmp.type') !== '');
  t.same(icmp.map((r) => [col(r, 'icmp.type'), col(r, 'icmp.seq'), col(r, 'icmp.cs')]), [['8', '0', '1'], ['0', '0', '1'], ['8', '1', '1'], ['0', '1', '1']]);
  t.ok(icmp.filter((r) => col(r, 'icmp.type') === '0').every((r) => col(r, 'icmp.resp_to') !== ''), 'tshark pairs each reply with its request');
  const udp = rows.filter((r) => col(r, 'udp.sport') !== '');
  t.same(udp.map((r) => [col(r, 'udp.sport'), col(r, 'udp.dport'), col(r, 'udp.len'), col(r, 'udp.cs')]), [
    ['40000', '7', '21', '1'], ['7', '40000', '21', '1'], ['40000', '7', '8', '1'], ['7', '40000', '8', '1'],
  ]);
  const ip = rows.filter((r) => col(r, 'ip.src') !== '');
  t.ok(ip.every((r) => col(r, 'ip.cs') === '1' && col(r, 'ip.ttl') === '64'), 'every IP header checksum good (status 1), TTL 64');
  t.ok(rows.every((r) => col(r, 'malformed') === '' && !/error|warn/i.test(col(r, 'severity'))), 'no malformed frame, no expert warning');
});

// ---- Linux in a network namespace -------------------------------------------------------

/** A Link over a UDP socket: one Ethernet frame per datagram, the format socat and QEMU's dgram use. */
async function udpLink(localPort: number, remotePort: number, mac: number): Promise<Link & { close(): void }> {
  const sock = createSocket('udp4');
  await new Promise<void>((resolve, reject) => sock.once('error', reject).bind(localPort, '127.0.0.1', () => resolve()));
  const handlers = new Set<(f: Uint8Array) => void>();
  sock.on('message', (msg) => { for (const h of handlers) h(msg); });
  return {
    mac: Uint8Array.of(2, 0, 0, 0, 0, mac & 0xff), mtu: 1500,
    send: (f) => new Promise<void>((resolve, reject) => sock.send(f, remotePort, '127.0.0.1', (err) => (err ? reject(err) : resolve()))),
    onFrame: (h) => (handlers.add(h), () => handlers.delete(h)),
    close: () => sock.close(),
  };
}

t.test('Linux in a network namespace pings the stack and gets its UDP echo', { skip: netnsSkip() }, async (t) => {
  const tag = `${process.pid % 100000}`;
  const ns = `xenpv-ip-${tag}`;
  const tap = `xpip${tag}`;
  const ourPort = 40000 + (process.pid % 10000);
  const socatPort = ourPort + 10000;
  const link = await udpLink(ourPort, socatPort, 0x42);
  const ip = new IpInterface(link, { name: 'netns' });
  const stackAddr = '10.231.0.2';
  ip.assign({ address: ipv4Parse(stackAddr), prefixLength: 24, gateway: 0 });
  const echo = ip.bind(7);
  echo.onMessage((d) => void echo.send(d.address, d.port, d.data));
  let socat: ChildProcess | null = null;
  t.teardown(async () => {
    socat?.kill();
    await run(['ip', 'netns', 'del', ns]);
    ip.close();
    link.close();
  });
  t.equal((await run(['ip', 'netns', 'add', ns])).status, 0);
  // socat opens the TAP in the root namespace (its UDP side must reach our loopback); then the TAP moves into the namespace.
  socat = spawn('socat', [`TUN,tun-type=tap,iff-no-pi,tun-name=${tap}`, `UDP:127.0.0.1:${ourPort},bind=127.0.0.1:${socatPort}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  let socatErr = '';
  socat.stderr!.on('data', (d) => (socatErr += d));
  for (let i = 0; i < 50 && (await run(['ip', 'link', 'show', tap])).status !== 0; i++) await sleep(50);
  const ns_ = (args: string[], input?: string) => run(['ip', 'netns', 'exec', ns, ...args], input);
  const moved = await run(['ip', 'link', 'set', tap, 'netns', ns]);
  t.equal(moved.status, 0, moved.stderr + socatErr);
  for (const cmd of [['ip', 'link', 'set', 'lo', 'up'], ['ip', 'addr', 'add', '10.231.0.1/24', 'dev', tap], ['ip', 'link', 'set', tap, 'up']]) {
    const r = await ns_(cmd);
    t.equal(r.status, 0, `${cmd.join(' ')}: ${r.stderr}`);
  }
  const ping = await ns_(['ping', '-c', '3', '-i', '0.2', '-W', '2', stackAddr]);
  t.equal(ping.status, 0, ping.stdout + ping.stderr);
  t.match(ping.stdout, /3 packets transmitted, 3 received/);
  t.ok(ip.counters.echoRequests >= 3);
  const big = await ns_(['ping', '-c', '1', '-s', '1472', '-M', 'do', '-W', '2', stackAddr]);
  t.equal(big.status, 0, `a 1500-byte ping: ${big.stdout}${big.stderr}`);
  const udp = await ns_(['socat', '-t', '2', '-', `UDP:${stackAddr}:7`], 'echo me');
  t.equal(udp.status, 0, udp.stderr);
  t.equal(udp.stdout, 'echo me');
  // And the other way: the stack pings Linux.
  const rtt = await ip.ping('10.231.0.1', { timeoutMs: 2000 });
  t.ok(rtt >= 0);
  const neigh = await ns_(['ip', 'neigh', 'show', stackAddr]);
  t.match(neigh.stdout, /lladdr 02:00:00:00:00:42/, 'Linux learnt our MAC by ARP');
  t.equal(ip.counters.drops['internal-error'], 0);
  t.equal(ip.counters.drops['ip-checksum'] + ip.counters.drops['udp-checksum'] + ip.counters.drops['icmp-checksum'], 0);
});
