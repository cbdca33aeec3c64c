// DHCP: the message codec (lib/guest/dhcp.ts) under property tests, the
// client against dom0's server (lib/backends/dhcpd.ts) on a scripted hub,
// renewal, rebinding, expiry and NAK, hostile messages on both sides, and
// tshark decoding the exchange with checksum validation on.

import t from 'tap';
import fc from 'fast-check';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { Dhcpd, parseDhcpdConfig, type DhcpdConfig } from '../lib/backends/dhcpd.js';
import {
  BOOTP_BROADCAST, BOOTREPLY, BOOTREQUEST, DHCPACK, DHCPDISCOVER, DHCPNAK, DHCPOFFER, DHCPREQUEST, DHCP_CLIENT_PORT, DHCP_SERVER_PORT,
  DhcpClient, dhcpDecode, dhcpEncode, dhcpMessage, leaseOf, maskPrefix, type DhcpMessage,
} from '../lib/guest/dhcp.js';
import { ETHER_HDR_LEN, IP_HDR_LEN, IpInterface, UDP_HDR_LEN, ipv4Format, ipv4Parse, macRead, prefixMask } from '../lib/guest/ip.js';
import { XenError } from '../lib/errors.js';
import { PcapWriter } from '../lib/pcap.js';
import { hub, type Hub } from './ip-harness.js';

const SERVER_MAC = 0x02_00_00_00_00_01;
const mac = (n: number): number => 0x02_00_00_00_10_00 + n;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Poll `cond` every 20 ms for up to `ms`; true once it holds. */
async function until(cond: () => boolean, ms: number): Promise<boolean> {
  for (const end = performance.now() + ms; !cond(); await sleep(20)) if (performance.now() > end) return false;
  return true;
}
const FAST = { retransmitMs: 100, maxRetransmitMs: 400 };
// Asked before the first test starts: a test's body runs from t.test() on, and
// this blocks the thread (for 100 ms and more) while the exchange is in flight.
const tshark = spawnSync('tshark', ['--version'], { encoding: 'utf8' });

function server(h: Hub, spec: Partial<Parameters<typeof parseDhcpdConfig>[0]> = {}): Dhcpd {
  const config = parseDhcpdConfig({ range: '10.0.0.100-10.0.0.199', router: '10.0.0.1', dns: '10.0.0.1,9.9.9.9', ...spec });
  return new Dhcpd(h.port(SERVER_MAC), config, { name: 'xenbr0' });
}

/** The DHCP payload of a frame on the wire, or null. */
function dhcpOf(f: Uint8Array): DhcpMessage | null {
  if (f.length < ETHER_HDR_LEN + IP_HDR_LEN + UDP_HDR_LEN || f[12] !== 8 || f[13] !== 0 || f[23] !== 17) return null;
  const udp = ETHER_HDR_LEN + (f[ETHER_HDR_LEN]! & 0xf) * 4;
  const dport = (f[udp + 2]! << 8) | f[udp + 3]!;
  if (dport !== DHCP_CLIENT_PORT && dport !== DHCP_SERVER_PORT) return null;
  try {
    return dhcpDecode(f.subarray(udp + UDP_HDR_LEN));
  } catch {
    return null;
  }
}

/**
 * One client's exchange with one server on a wire that loses nothing and
 * keeps order, as RFC 2131 lets it go when the client retransmits (4.1: it
 * repeats a DISCOVER until an OFFER comes, then a REQUEST until an ACK): one
 * xid; DISCOVERs, then REQUESTs once an OFFER came, never a DISCOVER again;
 * each OFFER answers a DISCOVER before it and each ACK a REQUEST before it;
 * once the wire is quiet every question has its answer. Without a
 * retransmission that is DISCOVER, OFFER, REQUEST, ACK and nothing else.
 * Returns the first message of each type, or why the exchange is wrong.
 */
function exchange(msgs: readonly DhcpMessage[]): { discover: DhcpMessage; offer: DhcpMessage; request: DhcpMessage; ack: DhcpMessage; surplus: number } | string {
  const n = { [DHCPDISCOVER]: 0, [DHCPOFFER]: 0, [DHCPREQUEST]: 0, [DHCPACK]: 0 };
  const first: Record<number, DhcpMessage> = {};
  for (const [i, m] of msgs.entries()) {
    const at = `message ${i} (type ${m.type})`;
    if (m.xid !== msgs[0]!.xid) return `${at}: xid ${m.xid}, not ${msgs[0]!.xid}`;
    if (m.op !== (m.type === DHCPDISCOVER || m.type === DHCPREQUEST ? BOOTREQUEST : BOOTREPLY)) return `${at}: op ${m.op}`;
    if (m.type === DHCPDISCOVER && n[DHCPREQUEST] > 0) return `${at}: a DISCOVER after a REQUEST`;
    else if (m.type === DHCPOFFER && n[DHCPOFFER] >= n[DHCPDISCOVER]) return `${at}: an OFFER that answers no DISCOVER`;
    else if (m.type === DHCPREQUEST && n[DHCPOFFER] === 0) return `${at}: a REQUEST before any OFFER`;
    else if (m.type === DHCPACK && n[DHCPACK] >= n[DHCPREQUEST]) return `${at}: an ACK that answers no REQUEST`;
    else if (!(m.type in n)) return `${at}: not a DISCOVER, OFFER, REQUEST or ACK`;
    n[m.type as keyof typeof n]++;
    first[m.type] ??= m;
  }
  if (n[DHCPOFFER] !== n[DHCPDISCOVER] || n[DHCPACK] !== n[DHCPREQUEST] || n[DHCPACK] === 0) return `unanswered or missing: ${JSON.stringify(n)}`;
  // The client heeds the first OFFER and the first ACK; it drops each later one as unexpected.
  const surplus = n[DHCPOFFER] - 1 + n[DHCPACK] - 1;
  return { discover: first[DHCPDISCOVER]!, offer: first[DHCPOFFER]!, request: first[DHCPREQUEST]!, ack: first[DHCPACK]!, surplus };
}

t.test('the exchange checker: retransmissions pass, anything out of order fails', async (t) => {
  const m = (type: number, xid = 7): DhcpMessage => dhcpMessage(type === DHCPDISCOVER || type === DHCPREQUEST ? BOOTREQUEST : BOOTREPLY, type, xid, mac(1));
  const [D, O, R, A] = [DHCPDISCOVER, DHCPOFFER, DHCPREQUEST, DHCPACK];
  const ok = (types: number[]): number | string => {
    const r = exchange(types.map((x) => m(x)));
    return typeof r === 'string' ? r : r.surplus;
  };
  t.equal(ok([D, O, R, A]), 0);
  t.equal(ok([D, O, D, R, O, A]), 1, 'a DISCOVER retransmitted before the OFFER arrived');
  t.equal(ok([D, O, R, A, R, A]), 1, 'a REQUEST retransmitted before the ACK arrived');
  for (const bad of [[D, O, R], [D, R, O, A], [O, D, R, A], [D, O, R, A, D, O], [D, O, R, A, A], [D, D, O, R, A], [D, O, R, A, DHCPNAK]]) {
    t.type(ok(bad), 'string', `not a clean exchange: ${bad.join(',')}`);
  }
  t.type(exchange([m(D), m(O, 8), m(R), m(A)]), 'string', 'another xid');
});

t.test('a client gets a lease from dhcpd: DISCOVER, OFFER, REQUEST, ACK', async (t) => {
  const h = hub();
  const wire: Uint8Array[] = [];
  h.onWire = (f) => wire.push(f);
  const d = server(h);
  const ip = new IpInterface(h.port(mac(1)), { name: 'c1' });
  t.teardown(() => (ip.close(), d.close()));
  await ip.configure('console=hvc0 ip=dhcp', { ...FAST, timeoutMs: 3000, hostName: 'guest1' });
  t.equal(ip.address, '10.0.0.100');
  t.equal(ip.prefixLength, 24);
  t.equal(ip.gateway, '10.0.0.1');
  const client = ip.dhcp!;
  t.equal(client.state, 'bound');
  t.same(client.lease!.dns.map(ipv4Format), ['10.0.0.1', '9.9.9.9']);
  t.equal(client.lease!.serverId, ipv4Parse('10.0.0.1'));
  t.same(d.leases().map((l) => [l.mac, l.address, l.state]), [['02:00:00:00:10:01', '10.0.0.100', 'bound']]);
  // The 100 ms retransmit can fire before a busy host delivers the answer: allowed, checked.
  await h.idle();
  const x = exchange(wire.map(dhcpOf).filter((m) => m !== null));
  if (typeof x === 'string') return t.fail(`the exchange: ${x}`);
  t.pass(`DISCOVER, OFFER, REQUEST, ACK in order, ${x.surplus} answers to retransmissions`);
  const { discover, offer, request, ack } = x;
  t.equal(discover!.hostName, 'guest1');
  t.same([...discover!.clientId!], [1, 2, 0, 0, 0, 0x10, 1], 'client id: type 1 and the MAC');
  t.same(discover!.parameters, [1, 3, 6, 51, 54, 58, 59]);
  t.equal(offer!.op, BOOTREPLY);
  t.equal(offer!.xid, discover!.xid);
  t.equal(request!.requestedAddress, ipv4Parse('10.0.0.100'));
  t.equal(request!.serverId, ipv4Parse('10.0.0.1'));
  t.equal(ack!.leaseSeconds, 3600);
  t.equal(ack!.subnetMask, prefixMask(24));
  // The OFFER went to the client's MAC and offered address (no broadcast bit): the server could not ARP for it.
  const offerFrame = wire.find((f) => dhcpOf(f)?.type === DHCPOFFER)!;
  t.equal(macRead(offerFrame, 0), mac(1));
  t.equal(ipv4Format(((offerFrame[30]! << 24) | (offerFrame[31]! << 16) | (offerFrame[32]! << 8) | offerFrame[33]!) >>> 0), '10.0.0.100');
  // The new address answers pings from the server's side of the bridge.
  t.ok((await d.ip.ping('10.0.0.100')) >= 0);
  t.same(Object.values(d.counters.drops).filter((n) => n > 0), []);
  const drops = Object.fromEntries(Object.keys(client.counters.drops).map((k) => [k, k === 'unexpected' ? x.surplus : 0]));
  t.same(client.counters.drops, drops, 'nothing dropped but the answers to retransmissions');
});

t.test('leases are bound to the MAC: distinct clients, the same client again, an exhausted pool', async (t) => {
  const h = hub();
  const d = server(h, { range: '10.0.0.100-10.0.0.101' });
  const ips = [1, 2, 3].map((n) => new IpInterface(h.port(mac(n)), { name: `c${n}` }));
  t.teardown(() => (ips.forEach((ip) => ip.close()), d.close()));
  await ips[0]!.configure('ip=dhcp', { ...FAST, timeoutMs: 3000 });
  await ips[1]!.configure('ip=dhcp', { ...FAST, timeoutMs: 3000 });
  t.same(ips.slice(0, 2).map((ip) => ip.address), ['10.0.0.100', '10.0.0.101']);
  await t.rejects(ips[2]!.configure('ip=dhcp', { ...FAST, timeoutMs: 600 }), { code: 'ETIMEDOUT' });
  t.ok(d.counters.drops['pool-exhausted'] >= 1);
  // Client 1 goes away without a word, comes back, and gets its address again.
  ips[0]!.dhcp!.close();
  ips[0]!.unassign();
  await ips[0]!.configure('ip=dhcp', { ...FAST, timeoutMs: 3000 });
  t.equal(ips[0]!.address, '10.0.0.100');
  // A released address goes to the waiting client.
  await ips[1]!.dhcp!.release();
  await h.idle();
  t.equal(ips[1]!.address, null);
  t.equal(d.counters.releases, 1);
  const lease = await ips[2]!.dhcp!.start({ timeoutMs: 3000 });
  t.equal(ipv4Format(lease.address), '10.0.0.101');
});

t.test('a DISCOVER from a bound client offers its address and leaves the binding as it was', async (t) => {
  const h = hub();
  const d = server(h, { range: '10.0.0.100-10.0.0.100' });
  const ip = new IpInterface(h.port(mac(1)), { name: 'c1' });
  t.teardown(() => (ip.close(), d.close()));
  await ip.configure('ip=dhcp', { ...FAST, timeoutMs: 3000 });
  const [before] = d.leases();
  t.equal(before?.state, 'bound');
  // The same client (its MAC) starts over, as after a reboot that lost its lease file, and never follows up.
  const again = new IpInterface(h.port(mac(1)), { name: 'c1-again' });
  t.teardown(() => again.close());
  const sock = again.bind(DHCP_CLIENT_PORT);
  await sock.send('255.255.255.255', DHCP_SERVER_PORT, dhcpEncode({ ...dhcpMessage(BOOTREQUEST, DHCPDISCOVER, 7, mac(1)), flags: BOOTP_BROADCAST }));
  const offer = dhcpDecode((await sock.receive({ timeoutMs: 500 })).data);
  t.equal(offer.type, DHCPOFFER);
  t.equal(ipv4Format(offer.yiaddr), '10.0.0.100', 'offered the address it holds');
  const [after] = d.leases();
  t.equal(after?.state, 'bound', 'still bound, not merely offered');
  t.ok(after!.expiresInMs > 60_000, `the lease keeps its hour (${after!.expiresInMs} ms left), not an offer's minute`);
});

t.test('renewal at T1 by unicast; rebinding at T2; expiry drops the address', async (t) => {
  const h = hub();
  const wire: Array<{ f: Uint8Array; ms: number }> = [];
  h.onWire = (f) => wire.push({ f, ms: performance.now() });
  const d = server(h, { leaseSeconds: 4 });
  const ip = new IpInterface(h.port(mac(1)), { name: 'c1' });
  t.teardown(() => (ip.close(), d.close()));
  await ip.configure('ip=dhcp', { ...FAST, timeoutMs: 3000 });
  const client = ip.dhcp!;
  const boundMs = performance.now();
  t.same([client.lease!.renewalSeconds, client.lease!.rebindingSeconds, client.lease!.leaseSeconds], [2, 3, 4]);
  const renewed = () => wire.some(({ f }) => dhcpOf(f)?.type === DHCPACK && dhcpOf(f)!.ciaddr !== 0);
  t.ok(await until(renewed, 3000), 'an ACK to the renewal before T2');
  // The hub shows the ACK as it is sent; the client takes it a turn later.
  await until(() => client.state !== 'renewing', 1000);
  t.equal(client.state, 'bound', 'renewed');
  t.equal(ip.address, '10.0.0.100');
  const renew = wire.filter(({ f }) => dhcpOf(f)?.type === DHCPREQUEST && dhcpOf(f)!.ciaddr !== 0);
  t.equal(renew.length, 1);
  t.equal(macRead(renew[0]!.f, 0), SERVER_MAC, 'RENEWING: unicast to the server');
  t.ok(renew[0]!.ms - boundMs >= 1900, `at T1 (${Math.round(renew[0]!.ms - boundMs)} ms)`);
  t.equal(dhcpOf(renew[0]!.f)!.requestedAddress, undefined, 'no requested address while renewing (RFC 2131 table 5)');
  // Extended, the lease ends 4 s after the renewal; the old one ended 2 s after it. Counted from the
  // renewal, so that a slow machine between it and this line does not eat the margin.
  const sinceRenewMs = performance.now() - renew[0]!.ms;
  t.ok(d.leases()[0]!.expiresInMs > 3500 - sinceRenewMs, 'the server extended the lease');
  // The server goes away: the client renews, then rebinds by broadcast, then lets the address go.
  d.close();
  wire.length = 0;
  t.ok(await until(() => ip.address === null, 6000), 'the address goes when the lease expires');
  const requests = wire.map(({ f }) => ({ m: dhcpOf(f), dst: macRead(f, 0) })).filter(({ m }) => m?.type === DHCPREQUEST);
  t.ok(requests.some(({ dst }) => dst === SERVER_MAC), 'renewing');
  t.ok(requests.some(({ dst }) => dst === 0xffff_ffff_ffff), 'rebinding by broadcast');
  t.equal(ip.address, null, 'expired');
  t.ok(await until(() => wire.some(({ f }) => dhcpOf(f)?.type === DHCPDISCOVER), 1000), 'and starts over with a DISCOVER');
  t.equal(client.state, 'selecting');
});

t.test('a NAK while renewing sends the client back to discovery, and it gets a new address', async (t) => {
  const h = hub();
  const d1 = server(h, { leaseSeconds: 2 });
  const ip = new IpInterface(h.port(mac(1)), { name: 'c1' });
  t.teardown(() => ip.close());
  await ip.configure('ip=dhcp', { ...FAST, timeoutMs: 3000 });
  t.equal(ip.address, '10.0.0.100');
  // dom0 restarts its server with another range: the old address is no longer this client's.
  d1.close();
  const d2 = server(h, { range: '10.0.0.50-10.0.0.60', leaseSeconds: 2 });
  t.teardown(() => d2.close());
  t.ok(await until(() => ip.dhcp!.counters.naks > 0, 3000), 'the renewal was refused');
  // With a 2 s lease T1 and T2 fall in the same second: a renewal and a rebinding may both be refused.
  t.ok(d2.counters.naks >= 1, `${d2.counters.naks} NAKs`);
  const lease = await ip.dhcp!.start({ timeoutMs: 3000 });
  t.equal(ipv4Format(lease.address), '10.0.0.50');
  t.equal(ip.address, '10.0.0.50');
});

t.test('dhcpd: malformed and unexpected messages are logged, counted and dropped; it carries on', async (t) => {
  const h = hub();
  const d = server(h);
  const rogue = new IpInterface(h.port(mac(9)), { name: 'rogue' });
  const sock = rogue.bind(DHCP_CLIENT_PORT);
  t.teardown(() => (rogue.close(), d.close()));
  const good = dhcpEncode({ ...dhcpMessage(BOOTREQUEST, DHCPDISCOVER, 1, mac(9)) });
  const cases: Array<[string, Uint8Array, string]> = [
    ['short', good.subarray(0, 100), 'malformed'],
    ['no cookie', (() => { const b = good.slice(); b[236] = 0; return b; })(), 'malformed'],
    ['option past the end', (() => { const b = good.slice(0, 243); b[240] = 53; b[241] = 1; b[242] = 9; return Uint8Array.of(...b.subarray(0, 240), 12, 200, 1); })(), 'malformed'],
    ['no message type', (() => { const b = good.slice(); b[240] = 255; return b; })(), 'malformed'],
    ['message type 99', (() => { const b = good.slice(); b[242] = 99; return b; })(), 'malformed'],
    ['bad lease option length', dhcpEncode({ ...dhcpMessage(BOOTREQUEST, DHCPDISCOVER, 1, mac(9)) }).map((x, i, b) => (i === 243 ? 51 : i === 244 ? 3 : b[i]!)), 'malformed'],
    ['a reply', dhcpEncode(dhcpMessage(BOOTREPLY, DHCPOFFER, 1, mac(9))), 'not-request'],
    ['an OFFER sent to the server', dhcpEncode(dhcpMessage(BOOTREQUEST, DHCPOFFER, 1, mac(9))), 'not-request'],
    ['multicast chaddr', dhcpEncode(dhcpMessage(BOOTREQUEST, DHCPDISCOVER, 1, 0x01_00_5e_00_00_01)), 'bad-chaddr'],
    ['relayed', dhcpEncode({ ...dhcpMessage(BOOTREQUEST, DHCPDISCOVER, 1, mac(9)), giaddr: ipv4Parse('10.9.9.9') }), 'relayed'],
    ['REQUEST for another server', dhcpEncode({ ...dhcpMessage(BOOTREQUEST, DHCPREQUEST, 1, mac(9)), serverId: ipv4Parse('10.0.0.7'), requestedAddress: ipv4Parse('10.0.0.100') }), 'not-ours'],
    ['RELEASE of nothing', dhcpEncode({ ...dhcpMessage(BOOTREQUEST, 7, 1, mac(9)), serverId: ipv4Parse('10.0.0.1'), ciaddr: ipv4Parse('10.0.0.100') }), 'unknown-client'],
  ];
  for (const [name, bytes, reason] of cases) {
    const before = d.counters.drops[reason as keyof typeof d.counters.drops];
    await sock.send('255.255.255.255', DHCP_SERVER_PORT, bytes);
    await h.idle();
    t.equal(d.counters.drops[reason as keyof typeof d.counters.drops], before + 1, name);
  }
  // A REQUEST for an address nobody offered is refused with a broadcast NAK.
  await sock.send('255.255.255.255', DHCP_SERVER_PORT, dhcpEncode({ ...dhcpMessage(BOOTREQUEST, DHCPREQUEST, 2, mac(9)), serverId: ipv4Parse('10.0.0.1'), requestedAddress: ipv4Parse('10.0.0.150') }));
  const nak = dhcpDecode((await sock.receive({ timeoutMs: 500 })).data);
  t.equal(nak.type, DHCPNAK);
  t.equal(nak.xid, 2);
  t.equal(nak.yiaddr, 0);
  t.type(nak.message, 'string');
  // The broadcast bit: the OFFER goes to everyone.
  await sock.send('255.255.255.255', DHCP_SERVER_PORT, dhcpEncode({ ...dhcpMessage(BOOTREQUEST, DHCPDISCOVER, 3, mac(9)), flags: BOOTP_BROADCAST }));
  const offer = dhcpDecode((await sock.receive({ timeoutMs: 500 })).data);
  t.equal(offer.type, DHCPOFFER);
  t.equal(offer.flags, BOOTP_BROADCAST);
  // And after all of that, a real client is served.
  const ip = new IpInterface(h.port(mac(1)), { name: 'c1' });
  t.teardown(() => ip.close());
  await ip.configure('ip=dhcp', { ...FAST, timeoutMs: 3000 });
  t.ok(ip.address !== null);
  t.equal(d.ip.counters.drops['internal-error'], 0);
});

t.test('the client ignores replies that are not for it or not usable', async (t) => {
  const h = hub();
  const rogue = new IpInterface(h.port(SERVER_MAC), { name: 'rogue' });
  rogue.assign({ address: ipv4Parse('10.0.0.1'), prefixLength: 24, gateway: 0 });
  const srv = rogue.bind(DHCP_SERVER_PORT);
  const ip = new IpInterface(h.port(mac(1)), { name: 'c1' });
  t.teardown(() => (ip.close(), rogue.close()));
  const client = new DhcpClient(ip, FAST);
  const got = client.start({ timeoutMs: 3000 });
  const discover = dhcpDecode((await srv.receive({ timeoutMs: 1000 })).data);
  const offer = (o: Partial<DhcpMessage>): Uint8Array => dhcpEncode({
    ...dhcpMessage(BOOTREPLY, DHCPOFFER, discover.xid, mac(1)), yiaddr: ipv4Parse('10.0.0.123'),
    serverId: ipv4Parse('10.0.0.1'), leaseSeconds: 60, subnetMask: prefixMask(24), ...o,
  });
  const bad: Array<[Uint8Array, keyof typeof client.counters.drops]> = [
    [offer({ xid: discover.xid ^ 1 }), 'xid'],
    [offer({ chaddr: mac(2) }), 'chaddr'],
    [offer({ op: BOOTREQUEST }), 'not-reply'],
    [withoutOption(offer({}), 54), 'no-server-id'],
    [withoutOption(offer({}), 51), 'no-lease-time'],
    [offer({ yiaddr: ipv4Parse('255.255.255.255') }), 'bad-address'],
    [offer({ yiaddr: ipv4Parse('10.0.0.0') }), 'bad-address'],
    [offer({ subnetMask: 0xff00ff00 }), 'bad-address'],
    [offer({ type: DHCPACK }), 'unexpected'],
  ];
  for (const [bytes, reason] of bad) {
    const before = client.counters.drops[reason];
    await srv.send('255.255.255.255', DHCP_CLIENT_PORT, bytes);
    await h.idle();
    t.equal(client.counters.drops[reason], before + 1, reason);
  }
  await srv.send('255.255.255.255', DHCP_CLIENT_PORT, new Uint8Array(50));
  await h.idle();
  t.equal(client.counters.drops.malformed, 1);
  t.equal(client.state, 'selecting', 'still selecting');
  // A good offer, then a good ACK.
  await srv.send('255.255.255.255', DHCP_CLIENT_PORT, offer({}));
  let req: DhcpMessage;
  do req = dhcpDecode((await srv.receive({ timeoutMs: 1000 })).data); while (req.type !== DHCPREQUEST);
  await srv.send('255.255.255.255', DHCP_CLIENT_PORT, dhcpEncode({ ...dhcpDecode(offer({})), type: DHCPACK, xid: req.xid }));
  const lease = await got;
  t.equal(ipv4Format(lease.address), '10.0.0.123');
  t.equal(ip.address, '10.0.0.123');
  client.close();
});

/** `m` with option `code` removed (the codec always writes what the message has). */
function withoutOption(b: Uint8Array, code: number): Uint8Array {
  const out = [...b.subarray(0, 240)];
  for (let off = 240; off < b.length && b[off] !== 255;) {
    if (b[off] === 0) { off++; continue; }
    const len = b[off + 1]!;
    if (b[off] !== code) out.push(...b.subarray(off, off + 2 + len));
    off += 2 + len;
  }
  out.push(255);
  while (out.length < 300) out.push(0);
  return Uint8Array.from(out);
}

t.test('parseDhcpdConfig: defaults, and EINVAL for a bad range or option', async (t) => {
  const c = parseDhcpdConfig({ range: '10.0.0.100-10.0.0.200' });
  t.same(c, { first: ipv4Parse('10.0.0.100'), last: ipv4Parse('10.0.0.200'), prefixLength: 24, server: ipv4Parse('10.0.0.1'), router: 0, dns: [], leaseSeconds: 3600 } satisfies DhcpdConfig);
  t.equal(parseDhcpdConfig({ range: '172.16.5.10-172.16.9.10', netmask: '255.255.240.0' }).prefixLength, 20);
  t.equal(parseDhcpdConfig({ range: '172.16.5.10-172.16.9.10', netmask: '20', server: '172.16.0.2', router: '172.16.0.1', leaseSeconds: '60' }).leaseSeconds, 60);
  for (const bad of [
    { range: '10.0.0.100' }, { range: '10.0.0.200-10.0.0.100' }, { range: '10.0.0.100-10.0.1.100' }, { range: '10.0.0.0-10.0.0.10' },
    { range: '10.0.0.100-10.0.0.255' }, { range: '10.0.0.1-10.0.0.10' }, { range: '10.0.0.100-10.0.0.200', netmask: '255.0.255.0' },
    { range: '10.0.0.100-10.0.0.200', netmask: '31' }, { range: '10.0.0.100-10.0.0.200', server: '10.0.1.1' },
    { range: '10.0.0.100-10.0.0.200', router: '10.0.1.1' }, { range: '10.0.0.100-10.0.0.200', dns: '1.2.3' },
    { range: '10.0.0.100-10.0.0.200', leaseSeconds: 0 }, { range: '10.0.0.100-10.0.0.200', leaseSeconds: 'soon' },
    { range: '10.0.0.1-10.2.0.1', netmask: '8' },
  ]) {
    t.throws(() => parseDhcpdConfig(bad), { code: 'EINVAL' }, JSON.stringify(bad));
  }
  t.equal(maskPrefix(0xffffff00), 24);
  t.equal(maskPrefix(0xffffffff), 32);
  t.equal(maskPrefix(0), 0);
  t.equal(maskPrefix(0xff00ff00), -1);
});

// ---- property tests ----------------------------------------------------------------

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const text = fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).map((c) => String.fromCharCode(c)), maxLength: 60 });
const addrs = fc.array(u32, { minLength: 1, maxLength: 10 });
const messageArb: fc.Arbitrary<DhcpMessage> = fc.record({
  op: fc.constantFrom(BOOTREQUEST, BOOTREPLY), hops: fc.integer({ min: 0, max: 255 }), xid: u32, secs: fc.integer({ min: 0, max: 0xffff }),
  flags: fc.integer({ min: 0, max: 0xffff }), ciaddr: u32, yiaddr: u32, siaddr: u32, giaddr: u32,
  chaddr: fc.integer({ min: 0, max: 0xffff_ffff_ffff }), type: fc.integer({ min: 1, max: 8 }),
  subnetMask: u32, routers: addrs, dns: addrs, hostName: text, requestedAddress: u32, leaseSeconds: u32, serverId: u32,
  parameters: fc.array(fc.integer({ min: 1, max: 254 }), { minLength: 1, maxLength: 20 }), message: text,
  maxMessageSize: fc.integer({ min: 576, max: 0xffff }), renewalSeconds: u32, rebindingSeconds: u32,
  clientId: fc.uint8Array({ minLength: 2, maxLength: 20 }),
}, { requiredKeys: ['op', 'hops', 'xid', 'secs', 'flags', 'ciaddr', 'yiaddr', 'siaddr', 'giaddr', 'chaddr', 'type'] });

t.test('property: DHCP messages round-trip through the codec', async () => {
  fc.assert(fc.property(messageArb, (m) => {
    const b = dhcpEncode(m);
    if (b.length < 300) return false;
    return isDeepStrictEqual(dhcpDecode(b), { ...m });
  }), { numRuns: 300 });
});

t.test('property: garbage and truncated messages decode or fail with EBADMSG, nothing else', async () => {
  const onlyBadMsg = (b: Uint8Array): boolean => {
    try {
      dhcpDecode(b);
      return true;
    } catch (err) {
      return err instanceof XenError && err.code === 'EBADMSG';
    }
  };
  fc.assert(fc.property(fc.uint8Array({ maxLength: 600 }), onlyBadMsg), { numRuns: 1000 });
  fc.assert(fc.property(messageArb, fc.nat(), (m, cut) => {
    const b = dhcpEncode(m);
    return onlyBadMsg(b.subarray(0, cut % (b.length + 1)));
  }), { numRuns: 500 });
  // The valid header with random options: the option walk is where lengths can lie.
  fc.assert(fc.property(fc.uint8Array({ maxLength: 300 }), (opts) => {
    const b = new Uint8Array(240 + opts.length);
    b.set(dhcpEncode(dhcpMessage(BOOTREQUEST, DHCPDISCOVER, 1, 2)).subarray(0, 240));
    b.set(opts, 240);
    return onlyBadMsg(b);
  }), { numRuns: 1000 });
  // leaseOf accepts only a usable address and mask.
  fc.assert(fc.property(messageArb, (m) => {
    const l = leaseOf(m);
    return l === null || (l.address === m.yiaddr && l.prefixLength >= 1 && l.renewalSeconds <= l.rebindingSeconds && l.rebindingSeconds <= l.leaseSeconds);
  }), { numRuns: 500 });
});

t.test('property: dhcpd survives any bytes on port 67 and still serves', async (t) => {
  const h = hub();
  const d = server(h);
  const rogue = new IpInterface(h.port(mac(9)), { name: 'rogue' });
  const sock = rogue.bind(DHCP_CLIENT_PORT);
  t.teardown(() => (rogue.close(), d.close()));
  const good = dhcpEncode(dhcpMessage(BOOTREQUEST, DHCPDISCOVER, 1, mac(9)));
  await fc.assert(fc.asyncProperty(fc.oneof(fc.uint8Array({ maxLength: 600 }), fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 }), fc.nat())
    .map(([at, v, cut]) => { const b = good.slice(0, 240 + (cut % 80)); b[at % b.length] = v; return b; })), async (bytes) => {
    await sock.send('255.255.255.255', DHCP_SERVER_PORT, bytes);
  }), { numRuns: 300 });
  await h.idle();
  t.ok(d.counters.drops.malformed > 100, `${d.counters.drops.malformed} malformed`);
  const ip = new IpInterface(h.port(mac(1)), { name: 'c1' });
  t.teardown(() => ip.close());
  await ip.configure('ip=dhcp', { ...FAST, timeoutMs: 3000 });
  t.ok(ip.address !== null, `served ${ip.address}`);
});

// ---- tshark --------------------------------------------------------------------------

t.test('tshark decodes the DHCP exchange: message types, options, good checksums', { skip: tshark.status === 0 ? false : 'tshark is not installed (Debian package tshark)' }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-dhcp-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'dhcp.pcap');
  const pcap = new PcapWriter(path);
  const h = hub();
  h.onWire = (f) => pcap.write(f);
  const d = server(h);
  const ip = new IpInterface(h.port(mac(1)), { name: 'c1' });
  await ip.configure('ip=dhcp', { ...FAST, timeoutMs: 3000, hostName: 'guest1' });
  await ip.dhcp!.release();
  await h.idle();
  pcap.close();
  ip.close();
  d.close();
  const fields = ['dhcp.option.dhcp', 'ip.src', 'ip.dst', 'ip.checksum.status', 'udp.srcport', 'udp.dstport', 'udp.checksum.status',
    'dhcp.hw.mac_addr', 'dhcp.ip.your', 'dhcp.ip.client', 'dhcp.option.dhcp_server_id', 'dhcp.option.requested_ip_address',
    'dhcp.option.ip_address_lease_time', 'dhcp.option.subnet_mask', 'dhcp.option.router', 'dhcp.option.domain_name_server',
    'dhcp.option.request_list_item', 'dhcp.option.type', 'dhcp.option.hostname', '_ws.malformed', '_ws.expert.severity'];
  const r = spawnSync('tshark', ['-r', path, '-o', 'ip.check_checksum:TRUE', '-o', 'udp.check_checksum:TRUE', '-Y', 'dhcp', '-T', 'fields',
    '-E', 'occurrence=a', '-E', 'aggregator=,', ...fields.flatMap((f) => ['-e', f])], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr);
  const rows = r.stdout.replace(/\n$/, '').split('\n').map((l) => Object.fromEntries(l.split('\t').map((v, i) => [fields[i]!, v])));
  t.same(rows.map((x) => x['dhcp.option.dhcp']), ['1', '2', '3', '5', '7'], 'DISCOVER OFFER REQUEST ACK RELEASE');
  t.same(rows.map((x) => [x['udp.srcport'], x['udp.dstport']]), [['68', '67'], ['67', '68'], ['68', '67'], ['67', '68'], ['68', '67']]);
  t.ok(rows.every((x) => x['ip.checksum.status'] === '1' && x['udp.checksum.status'] === '1'), 'IP and UDP checksums good');
  // chaddr, and in the client's messages the MAC of its client identifier (type 1, Ethernet) too.
  t.same(rows.map((x) => x['dhcp.hw.mac_addr']), [2, 1, 2, 1, 2].map((n) => Array(n).fill('02:00:00:00:10:01').join(',')));
  // tshark lists the options in wire order; the last is End.
  const options = (x: Record<string, string> | undefined) => x!['dhcp.option.type']!.split(',').slice(0, -1).join(',');
  const [discover, offer, request, ack, release] = rows as Array<Record<string, string>>;
  t.equal(discover!['ip.src'], '0.0.0.0');
  t.equal(discover!['ip.dst'], '255.255.255.255');
  t.equal(discover!['dhcp.option.request_list_item'], '1,3,6,51,54,58,59');
  t.equal(options(discover), '53,12,55,61', 'options in the DISCOVER');
  t.equal(options(offer), '53,54,51,58,59,1,3,6', 'options in the OFFER');
  t.equal(options(request), '53,54,50,12,55,61', 'options in the REQUEST');
  t.equal(options(ack), '53,54,51,58,59,1,3,6', 'options in the ACK');
  t.equal(options(release), '53,54,61', 'options in the RELEASE');
  t.equal(discover!['dhcp.option.hostname'], 'guest1');
  t.equal(offer!['dhcp.ip.your'], '10.0.0.100');
  t.equal(offer!['ip.dst'], '10.0.0.100');
  t.equal(offer!['dhcp.option.dhcp_server_id'], '10.0.0.1');
  t.equal(request!['dhcp.option.requested_ip_address'], '10.0.0.100');
  t.equal(request!['dhcp.option.dhcp_server_id'], '10.0.0.1');
  t.equal(ack!['dhcp.option.ip_address_lease_time'], '3600');
  t.equal(ack!['dhcp.option.subnet_mask'], '255.255.255.0');
  t.equal(ack!['dhcp.option.router'], '10.0.0.1');
  t.equal(ack!['dhcp.option.domain_name_server'], '10.0.0.1,9.9.9.9');
  t.equal(release!['dhcp.ip.client'], '10.0.0.100');
  t.equal(release!['ip.src'], '10.0.0.100');
  t.ok(rows.every((x) => x['_ws.malformed'] === '' && !/error|warn/i.test(x['_ws.expert.severity'] ?? '')), 'no malformed packet, no expert warning');
});
