// The bridge's forwarding table (br_fdb) on its own: a real Bridge and
// FramePool in dom0's memory, with scripted ports that record what the
// bridge hands them. Learning, forwarding, filtering, ageing, a port's
// removal, the bound on the table, and addresses that differ in either half.

import t from 'tap';
import { Bridge, FramePool, newPortStats, type BridgePort } from '../lib/backends/bridge.js';
import { formatMac, parseMac } from '../lib/ether.js';
import { Host } from '../lib/hypervisor/host.js';
import { PhysMem } from '../lib/xen/physmem.js';

const AGEING_MS = 1000;

type Port = BridgePort & { got: string[] };

function port(name: string): Port {
  const got: string[] = [];
  return { name, stats: newPortStats(), got, deliver: (pkt) => got.push(`${formatMac(pkt.header, 6)}>${formatMac(pkt.header, 0)}`) };
}

function setup(): { bridge: Bridge; pool: FramePool; a: Port; b: Port; c: Port } {
  const host = new Host();
  const d = host.domain(host.createDomain({ name: 'dom0', memoryMiB: 4 }).domid);
  const pool = new FramePool(host.hv.entry(d.domid), new PhysMem(d.mem, d.specialBase), { packets: 4, smallBuffers: 1, largeBuffers: 0 });
  const bridge = new Bridge('br0', pool, { ageingMs: AGEING_MS });
  const [a, b, c] = [port('a'), port('b'), port('c')];
  for (const p of [a, b, c]) bridge.addPort(p);
  return { bridge, pool, a, b, c };
}

/** A 60-byte frame from `src` to `dst` enters the bridge on `from` at `now`. */
function send(s: { bridge: Bridge; pool: FramePool }, from: Port, src: string, dst: string, now: number): void {
  const pkt = s.pool.get(null)!;
  pkt.header.set(parseMac(dst), 0);
  pkt.header.set(parseMac(src), 6);
  pkt.header[12] = 0x88;
  pkt.header[13] = 0xb5;
  pkt.headerLen = 14;
  pkt.len = 60;
  s.bridge.input(from, pkt, now);
  s.pool.release(pkt);
}

const X = '00:16:3e:00:00:01';
const Y = '00:16:3e:00:00:02';
const Z = '00:16:3e:00:00:03';

t.test('learn, forward, filter, move, age', async (t) => {
  const s = setup();
  const { bridge, a, b, c } = s;
  send(s, a, X, Y, 0);
  t.same([a.got, b.got, c.got], [[], [`${X}>${Y}`], [`${X}>${Y}`]], 'unknown destination: flooded to every other port');
  t.same(bridge.entries().map((e) => [e.mac, e.port]), [[X, 'a']], 'the source learned on its port');
  send(s, b, Y, X, 10);
  t.same([a.got.length, c.got.length], [1, 1], 'a learned destination: forwarded to its port only');
  t.equal(a.got[0], `${Y}>${X}`);
  send(s, a, Z, X, 20);
  t.same([b.got.length, c.got.length], [1, 1], 'a frame for the port it came from is filtered');
  t.equal(bridge.stats.filtered, 1);
  send(s, c, X, Y, 30);
  t.equal(bridge.lookup(parseMac(X), 0, 30), c, 'an address seen on another port moves there');
  t.equal(b.got[1], `${X}>${Y}`);
  t.equal(bridge.lookup(parseMac(Y), 0, 10 + AGEING_MS), b, 'still fresh at the ageing time');
  t.equal(bridge.lookup(parseMac(Y), 0, 11 + AGEING_MS), null, 'older than the ageing time: not used');
  t.same(bridge.entries().map((e) => [e.mac, e.port]).sort(), [[X, 'c'], [Z, 'a']], 'and gone from the table');
  t.same(bridge.stats, { ...bridge.stats, flooded: 1, forwarded: 2, filtered: 1, learned: 3 });
});

t.test('addresses that differ only in their first or their last three bytes are distinct', async (t) => {
  const s = setup();
  const macs = ['00:16:3e:00:00:01', '00:16:3f:00:00:01', '02:16:3e:00:00:01', '00:16:3e:80:00:01', '00:16:3e:00:00:81', 'fe:ff:ff:ff:ff:fe'];
  const ports = [s.a, s.b, s.c];
  macs.forEach((m, i) => send(s, ports[i % 3]!, m, 'ff:ff:ff:ff:ff:ff', i));
  t.same(s.bridge.entries().map((e) => [e.mac, e.port]).sort(), macs.map((m, i) => [m, ports[i % 3]!.name]).sort());
  macs.forEach((m, i) => t.equal(s.bridge.lookup(parseMac(m), 0, 10), ports[i % 3], m));
  t.equal(s.bridge.lookup(parseMac('00:16:3e:00:00:02'), 0, 10), null);
});

t.test('a port removed takes its addresses with it', async (t) => {
  const s = setup();
  send(s, s.a, X, Y, 0);
  send(s, s.b, Y, X, 0);
  s.bridge.removePort(s.a);
  t.same(s.bridge.entries().map((e) => e.mac), [Y]);
  t.equal(s.bridge.lookup(parseMac(X), 0, 1), null);
});

t.test('the table is bounded: invented addresses fill it, aged ones make room', async (t) => {
  const s = setup();
  const mac = (i: number): string => formatMac(Uint8Array.from([2, (i >> 16) & 0xff, 0, (i >> 8) & 0xff, i & 0xff, 7]));
  for (let i = 0; i < 5000; i++) send(s, s.a, mac(i), Y, 0);
  t.equal(s.bridge.entries().length, 4096, 'no more than 4096 entries');
  t.equal(s.bridge.stats.learned, 4096);
  t.equal(s.bridge.lookup(parseMac(mac(4095)), 0, 1), s.a);
  t.equal(s.bridge.lookup(parseMac(mac(4096)), 0, 1), null, 'the ones past the bound were not learned');
  send(s, s.b, X, Y, AGEING_MS + 1);
  t.same(s.bridge.entries().map((e) => [e.mac, e.port]), [[X, 'b']], 'a full table drops its aged entries to learn a new one');
});
