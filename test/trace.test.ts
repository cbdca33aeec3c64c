// Traces (lib/trace): `xenpv run --trace` records a run's ring slots, events,
// grant operations and xenstore messages from every thread; `xenpv trace`
// decodes them with the io/*.h field names. A deterministic run's trace is
// the same bytes every time and tracing does not change the run; the vbd
// handshake and the block datapath can be checked from the trace alone; a
// trace's frames read back in tshark as pcapng; a file that is not a trace
// is refused with a code.

import t, { type Test } from 'tap';
import { spawnSync } from 'node:child_process';
import { appendFileSync, closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import type { DomainSpec } from '../lib/backends/toolstack.js';
import type { Layout } from '../lib/abi/layout.js';
import {
  netif_extra_info,
  netif_rx_request,
  netif_rx_response,
  netif_tx_request,
  netif_tx_response,
  NETIF_RSP_DROPPED,
  NETIF_RSP_ERROR,
  NETTXF_csum_blank,
  NETTXF_extra_info,
  XEN_NETIF_EXTRA_TYPE_GSO,
  XEN_NETIF_GSO_TYPE_TCPV4,
} from '../lib/abi/netif.js';
import { __CONST_RING_SIZE, netif_rx_sring, netif_rx_sring_entry, netif_tx_sring, netif_tx_sring_entry } from '../lib/abi/ring.js';
import { FramePage, MemoryViews, PAGE_SIZE } from '../lib/hypervisor/page.js';
import { BackRing, FrontRing } from '../lib/xen/ring.js';
import { decodeTrace, formatEvent, readTrace, type TraceEvent } from '../lib/trace/decode.js';
import { writeTracePcapng } from '../lib/trace/pcapng.js';
import { BLOCK_HEADER_BYTES, FILE_HEADER_BYTES, TraceFile, TraceKind, traceBytes, traceDevice, tracing } from '../lib/trace/trace.js';
import { runSim } from './sim-harness.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const cli = join(root, 'dist/lib/cli/main.js');
const dir = mkdtempSync(join(tmpdir(), 'xenpv-trace-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

/** A fresh 8 MiB image and a disk-pattern config pointing at it. */
function diskPattern(name: string): { cfg: string; spec: DomainSpec } {
  const img = join(dir, `${name}.img`);
  const fd = openSync(img, 'w');
  ftruncateSync(fd, 8 << 20);
  closeSync(fd);
  const cfg = join(dir, `${name}.cfg`);
  const image = join(root, 'examples/disk-pattern/disk-pattern.mjs');
  writeFileSync(cfg, `name = "${name}"\nmemory = 32\nkernel = "${image}"\ndisk = ['format=raw, vdev=xvda, access=rw, target=${img}']\n`);
  return { cfg, spec: loadDomainConfig(cfg) };
}

type Slot = Extract<TraceEvent, { type: 'ring-slot' }>;
const slots = (events: TraceEvent[], half: 'request' | 'response', op: 'put' | 'take', device: RegExp): Slot[] =>
  events.filter((e): e is Slot => e.type === 'ring-slot' && e.half === half && e.op === op && device.test(e.device ?? ''));

/** The XS_WRITE requests xenstored received, in order, as absolute path and value. */
function storeWrites(events: TraceEvent[]): { path: string; value: string; seq: number }[] {
  const out: { path: string; value: string; seq: number }[] = [];
  for (const e of events) {
    if (e.type !== 'xs' || e.dir !== 'in' || !e.request || e.msg !== 'XS_WRITE' || !/^xenstored\./.test(e.device ?? '')) continue;
    const [path = '', value = ''] = e.args;
    const conn = /^xenstored\.dom(\d+)$/.exec(e.device ?? '');
    out.push({ path: path.startsWith('/') || conn === null ? path : `/local/domain/${conn[1]}/${path}`, value, seq: e.seq });
  }
  return out;
}

/**
 * The vbd handshake as xenbus orders it: the backend waits (InitWait), the
 * frontend publishes its ring and event channel and says Initialised, the
 * backend connects, then the frontend.
 */
function checkHandshake(t: Test, events: TraceEvent[], domid: number, devid: number): void {
  const writes = storeWrites(events);
  const front = `/local/domain/${domid}/device/vbd/${devid}`;
  const back = `/local/domain/0/backend/vbd/${domid}/${devid}`;
  const at = (path: string, value?: string): number => writes.findIndex((w) => w.path === path && (value === undefined || w.value === value));
  const order = [
    ['backend InitWait', at(`${back}/state`, '2')],
    ['frontend ring-ref', at(`${front}/ring-ref`)],
    ['frontend event-channel', at(`${front}/event-channel`)],
    ['frontend Initialised', at(`${front}/state`, '3')],
    ['backend Connected', at(`${back}/state`, '4')],
    ['frontend Connected', at(`${front}/state`, '4')],
  ] as const;
  for (const [what, i] of order) t.ok(i >= 0, `${what} is in the trace`);
  for (let i = 1; i < order.length; i++) {
    t.ok(order[i - 1]![1] < order[i]![1], `${order[i - 1]![0]} before ${order[i]![0]}`);
  }
}

/**
 * Every read blkback answered: the pages it names (segments, or the
 * indirect pages) were mapped by dom0 before it answered: mapped after it
 * took the request, or held mapped since before (persistent grants).
 */
function checkReadsMapped(t: Test, events: TraceEvent[], domid: number): number {
  const taken = slots(events, 'request', 'take', /^blkback/);
  const answered = slots(events, 'response', 'put', /^blkback/);
  let checked = 0;
  for (const req of taken) {
    const f = req.fields;
    const read = f['operation'] === 0 || (f['operation'] === 6 && f['indirect_op'] === 0);
    if (!read) continue;
    const rsp = answered.find((r) => r.seq > req.seq && r.fields['id'] === f['id']);
    t.ok(rsp !== undefined, `read ${req.index} was answered`);
    if (rsp === undefined) continue;
    const refs = f['operation'] === 6 ? (f['indirect_grefs'] as number[]) : (f['seg'] as Record<string, number>[]).map((s) => s['gref']!);
    for (const ref of refs) {
      const held = new Set<number>();
      let mappedForIt = false;
      for (const e of events) {
        if (e.seq > rsp.seq || e.domid !== 0) continue;
        if (e.type === 'grant-map' && e.granter === domid && e.ref === ref && e.status === 'GNTST_okay') {
          held.add(e.handle);
          if (e.seq > req.seq) mappedForIt = true;
        }
        if (e.type === 'grant-unmap' && e.granter === domid && e.ref === ref && e.seq < req.seq) held.delete(e.handle);
      }
      if (!mappedForIt && held.size === 0) t.fail(`read ${req.index}: ref ${ref} was not mapped before its response`);
    }
    checked++;
  }
  return checked;
}

t.test('a deterministic run: the trace is the same bytes every time, and tracing changes nothing of the run', async (t) => {
  // The same config and a fresh image each time: the trace holds the paths xenstore carried.
  const plain = await runSim([diskPattern('dp-sim').spec], 21);
  const traced = [join(dir, 'a.trace'), join(dir, 'b.trace')];
  const runs = [];
  for (const file of traced) runs.push(await runSim([diskPattern('dp-sim').spec], 21, { trace: file }));
  for (const r of runs) {
    t.equal(r.exits[0]!.reason, 'poweroff');
    t.equal(r.digest, plain.digest, 'the digest of the untraced run');
  }
  t.ok(readFileSync(traced[0]!).equals(readFileSync(traced[1]!)), 'two traces of the seed are byte for byte the same');
  t.notOk(tracing, 'the machine stopped recording when it stopped');
  const { header, events } = readTrace(traced[0]!);
  t.ok(header.virtualTime, 'virtual time');
  t.ok(events.every((e, i) => i === 0 || e.seq > events[i - 1]!.seq), 'in sequence order');
  t.ok(events.every((e, i) => i === 0 || e.timeNs >= events[i - 1]!.timeNs), 'one thread, one clock: time never goes back');
  const puts = slots(events, 'request', 'put', /^xbf/);
  t.ok(puts.length > 0 && puts.every((e) => e.domid === 1 && e.ring === 'blkif'), 'the guest put blkif requests');
  t.ok(slots(events, 'request', 'take', /^blkback/).every((e) => e.domid === 0), 'dom0 took them');
  checkHandshake(t, events, 1, 51712);
  t.ok(checkReadsMapped(t, events, 1) > 0, 'reads were checked');
  const text = events.filter((e) => e.type === 'console' && e.domid === 1 && e.dir === 'out').map((e) => (e as { text: string }).text).join('');
  t.match(text, /verified 16384 sectors/);
});

t.test('xenpv run --trace under worker threads; xenpv trace decodes every thread\'s records', async (t) => {
  const { cfg } = diskPattern('dp-threads');
  const file = join(dir, 'threads.trace');
  const run = spawnSync(process.execPath, [cli, 'run', cfg, '--trace', file], { encoding: 'utf8', timeout: 60_000 });
  t.equal(run.status, 0, run.stderr);
  t.match(run.stdout, /verified 16384 sectors/);
  const json = spawnSync(process.execPath, [cli, 'trace', file, '--json'], { encoding: 'utf8', maxBuffer: 1 << 28 });
  t.equal(json.status, 0, json.stderr);
  const events = json.stdout.trim().split('\n').map((l) => JSON.parse(l) as TraceEvent);
  t.same(new Set(events.map((e) => e.domid)).has(1) && new Set(events.map((e) => e.domid)).has(0), true, 'dom0 and the guest, each in its own thread');
  const puts = slots(events, 'request', 'put', /^xbf/);
  const takes = slots(events, 'request', 'take', /^blkback/);
  t.ok(puts.length > 100, `${puts.length} requests`);
  t.same(takes.map((e) => e.index), puts.map((e) => e.index), 'blkback took every slot the guest put, in order');
  t.same(takes.map((e) => e.fields), puts.map((e) => e.fields), 'and read what the guest wrote');
  const order = new Map(events.map((e, i) => [e.seq, i]));
  t.ok(puts.every((p, i) => order.get(p.seq)! < order.get(takes[i]!.seq)!), 'each slot was put before it was taken');
  const pushes = events.filter((e): e is Extract<TraceEvent, { type: 'ring-push' }> => e.type === 'ring-push' && e.half === 'request' && /^xbf/.test(e.device ?? ''));
  t.ok(takes.every((tk) => pushes.some((p) => p.prod > tk.index && order.get(p.seq)! < order.get(tk.seq)!)), 'each slot was taken after the push that published it');
  const rspPuts = slots(events, 'response', 'put', /^blkback/);
  const rspTakes = slots(events, 'response', 'take', /^xbf/);
  t.same(rspTakes.map((e) => e.fields), rspPuts.map((e) => e.fields), 'the guest took every response blkback put');
  t.ok(events.some((e) => e.type === 'evtchn-send' && e.domid === 1 && /^xbf/.test(e.device ?? '')), 'the guest\'s sends carry its queue\'s name');
  t.ok(events.some((e) => e.type === 'evtchn-deliver' && e.domid === 0 && /^blkback/.test(e.device ?? '')), 'dom0 delivered them to blkback');
  checkHandshake(t, events, 1, 51712);
  t.ok(checkReadsMapped(t, events, 1) > 0);
  const text = spawnSync(process.execPath, [cli, 'trace', file], { encoding: 'utf8', maxBuffer: 1 << 28 });
  t.equal(text.status, 0, text.stderr);
  t.match(text.stdout, /dom1 +xbf51712\.0 +request put \[0\] blkif_request(_indirect)? \{ operation: BLKIF_OP_/);
  t.match(text.stdout, /dom0 +blkback1\.51712\.0 +response put \[\d+\] blkif_response \{ id: \d+, operation: BLKIF_OP_\w+, status: BLKIF_RSP_OKAY \}/);
  t.match(text.stdout, /xenstored\.dom1 +xs in XS_WRITE req_id \d+ tx_id \d+ "device\/vbd\/51712\/state" "3"/);
  t.match(text.stdout, /grant map dom1 ref \d+ GNTMAP_host_map/);
});

t.test('a vCPU thread\'s records: the blocks it writes and what the machine writes of it once it has gone', async (t) => {
  const file = join(dir, 'worker.trace');
  const tf = new TraceFile(file, { bufferBytes: 1 << 17 });
  tf.start(false);
  const count = 20_000; // about six buffers of 40-byte records
  const thread = tf.thread(7);
  const worker = new Worker(join(root, 'dist/test/fixtures/trace-worker.js'), { workerData: { trace: thread, count } });
  await new Promise((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  await worker.terminate();
  tf.threadDone(thread);
  tf.close();
  const events = readTrace(file).events.filter((e) => e.type === 'ring-slot');
  t.equal(events.length, count, 'every record, none twice');
  t.ok(events.every((e, i) => e.domid === 7 && e.device === 'worker-ring' && e.type === 'ring-slot' && e.index === i), 'in order, with domain and device');
  // A thread killed while writing its block leaves it again: the decoder keeps one.
  const bytes = readFileSync(file);
  const firstBlock = bytes.readUInt32LE(FILE_HEADER_BYTES + 12);
  appendFileSync(file, bytes.subarray(FILE_HEADER_BYTES, FILE_HEADER_BYTES + BLOCK_HEADER_BYTES + firstBlock));
  t.equal(readTrace(file).events.filter((e) => e.type === 'ring-slot').length, count, 'a block written twice is read once');
});

t.test('a file that is not a trace is refused with a code; a trace cut short decodes up to the cut', async (t) => {
  const file = join(dir, 'worker.trace');
  t.throws(() => decodeTrace(new Uint8Array(10)), { code: 'EINVAL' });
  t.throws(() => decodeTrace(Buffer.alloc(200, 0x41)), { code: 'EINVAL' });
  const good = readFileSync(file);
  const v2 = Buffer.from(good);
  v2.writeUInt32LE(2, 8);
  t.throws(() => decodeTrace(v2), { code: 'EOPNOTSUPP' });
  const badRecord = Buffer.from(good);
  badRecord.writeUInt32LE(7, FILE_HEADER_BYTES + BLOCK_HEADER_BYTES + 12); // a record shorter than its header
  t.throws(() => decodeTrace(badRecord), { code: 'EINVAL' });
  const cut = decodeTrace(good.subarray(0, good.length - 100));
  t.ok(cut.truncatedBytes > 0, 'the unfinished block is reported');
  t.ok(cut.events.length > 0, 'the whole blocks before it decode');
  t.throws(() => readTrace(join(dir, 'missing.trace')), { code: 'ENOENT' });
  t.throws(() => new TraceFile(join(dir, 'no/such/dir.trace')), { code: 'ENOENT' });
  const r = spawnSync(process.execPath, [cli, 'trace', join(dir, 'a.cfg-missing')], { encoding: 'utf8' });
  t.equal(r.status, 2, 'the CLI says so and exits 2');
});

const tshark = spawnSync('tshark', ['--version'], { encoding: 'utf8' });

/** An Ethernet frame from `src` to `dst` with an experimental EtherType. */
function frame(src: number, dst: number, length: number): Uint8Array {
  const f = new Uint8Array(length);
  f.set([0x00, 0x16, 0x3e, 0, 0, dst], 0);
  f.set([0x00, 0x16, 0x3e, 0, 0, src], 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  return f;
}

t.test('the frames of a trace as pcapng, read back by tshark', { skip: tshark.status === 0 ? false : 'tshark is not installed (Debian package tshark)' }, async (t) => {
  const file = join(dir, 'frames.trace');
  const tf = new TraceFile(file);
  tf.start(false);
  const vif1 = traceDevice('xnf0');
  const vif2 = traceDevice('xnf1');
  const sent = [frame(1, 2, 60), frame(2, 1, 1514), frame(1, 2, 98)];
  traceBytes(TraceKind.frame, vif1, 0, sent[0]!.length, sent[0]!, 0, sent[0]!.length);
  traceBytes(TraceKind.frame, vif2, 1, sent[1]!.length, sent[1]!, 0, sent[1]!.length);
  traceBytes(TraceKind.frame, vif1, 0, sent[2]!.length, sent[2]!, 0, sent[2]!.length);
  tf.close();
  const out = join(dir, 'frames.pcapng');
  t.same(writeTracePcapng(readTrace(file), out), { frames: 3, interfaces: 2 });
  const r = spawnSync('tshark', ['-r', out, '-T', 'fields', '-e', 'frame.interface_name', '-e', 'eth.src', '-e', 'eth.dst', '-e', 'frame.len', '-e', 'frame.packet_flags_direction'], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr);
  t.same(r.stdout.trim().split('\n').map((l) => l.split('\t')), [
    ['xnf0', '00:16:3e:00:00:01', '00:16:3e:00:00:02', '60', '0x00000002'],
    ['xnf1', '00:16:3e:00:00:02', '00:16:3e:00:00:01', '1514', '0x00000001'],
    ['xnf0', '00:16:3e:00:00:01', '00:16:3e:00:00:02', '98', '0x00000002'],
  ]);
});

/** Little-endian writes of a struct member into a slot buffer. */
function put(slot: Uint8Array, layout: Layout, name: string, value: number): void {
  const f = layout.fields[name]!;
  const v = new DataView(slot.buffer, slot.byteOffset);
  if (f.size === 1) v.setUint8(f.offset, value);
  else if (f.size === 2) v.setUint16(f.offset, value & 0xffff, true);
  else v.setUint32(f.offset, value >>> 0, true);
}

t.test('netif slots decode as their structs: a tx request, the extra-info slot it announces, responses with signed status', async (t) => {
  const file = join(dir, 'netif.trace');
  const tf = new TraceFile(file);
  tf.start(false);
  const mem = new MemoryViews(new SharedArrayBuffer(4 * PAGE_SIZE));
  const txEntries = __CONST_RING_SIZE(netif_tx_sring, PAGE_SIZE);
  const rxEntries = __CONST_RING_SIZE(netif_rx_sring, PAGE_SIZE);
  const txFront = new FrontRing([new FramePage(mem, 1, true)], netif_tx_sring_entry.size, txEntries, 'xnf0-tx', 'netif_tx');
  const txBack = new BackRing([new FramePage(mem, 1, true)], netif_tx_sring_entry.size, txEntries, 'vif1.0-tx', 'netif_tx');
  const rxFront = new FrontRing([new FramePage(mem, 2, true)], netif_rx_sring_entry.size, rxEntries, 'xnf0-rx', 'netif_rx');
  const rxBack = new BackRing([new FramePage(mem, 2, true)], netif_rx_sring_entry.size, rxEntries, 'vif1.0-rx', 'netif_rx');
  txFront.init();
  txBack.init();
  rxFront.init();
  rxBack.init();
  const tx = new Uint8Array(netif_tx_sring_entry.size);
  put(tx, netif_tx_request, 'gref', 77);
  put(tx, netif_tx_request, 'flags', NETTXF_extra_info | NETTXF_csum_blank);
  put(tx, netif_tx_request, 'id', 5);
  put(tx, netif_tx_request, 'size', 9000);
  txFront.putRequest(tx);
  const extra = new Uint8Array(netif_tx_sring_entry.size);
  put(extra, netif_extra_info, 'type', XEN_NETIF_EXTRA_TYPE_GSO);
  put(extra, netif_extra_info, 'u.gso.size', 1448);
  put(extra, netif_extra_info, 'u.gso.type', XEN_NETIF_GSO_TYPE_TCPV4);
  txFront.putRequest(extra);
  tx.fill(0);
  put(tx, netif_tx_request, 'gref', 78);
  put(tx, netif_tx_request, 'id', 6);
  put(tx, netif_tx_request, 'size', 60);
  txFront.putRequest(tx);
  txFront.pushRequests();
  const slot = new Uint8Array(netif_tx_sring_entry.size);
  txBack.unconsumedRequests();
  const idAt = netif_tx_request.fields['id']!.offset;
  while (txBack.takeRequest(slot)) {
    const rsp = new Uint8Array(netif_tx_sring_entry.size);
    put(rsp, netif_tx_response, 'id', slot[idAt]!);
    put(rsp, netif_tx_response, 'status', slot[idAt] === 6 ? NETIF_RSP_DROPPED : 0);
    txBack.putResponse(rsp);
  }
  txBack.pushResponses();
  const rxReq = new Uint8Array(netif_rx_sring_entry.size);
  put(rxReq, netif_rx_request, 'id', 3);
  put(rxReq, netif_rx_request, 'gref', 99);
  rxFront.putRequest(rxReq);
  rxFront.pushRequests();
  rxBack.unconsumedRequests();
  rxBack.takeRequest(new Uint8Array(netif_rx_sring_entry.size));
  const rxRsp = new Uint8Array(netif_rx_sring_entry.size);
  put(rxRsp, netif_rx_response, 'id', 3);
  put(rxRsp, netif_rx_response, 'status', NETIF_RSP_ERROR);
  rxBack.putResponse(rxRsp);
  rxBack.pushResponses();
  rxFront.unconsumedResponses();
  rxFront.takeResponse(new Uint8Array(netif_rx_sring_entry.size));
  tf.close();

  const events = readTrace(file).events.filter((e): e is Slot => e.type === 'ring-slot');
  const back = events.filter((e) => e.device === 'vif1.0-tx' && e.half === 'request');
  t.same(back.map((e) => e.struct), ['netif_tx_request', 'netif_extra_info', 'netif_tx_request'], 'the slot after NETTXF_extra_info is an extra-info slot');
  t.same(back[0]!.fields, { gref: 77, offset: 0, flags: NETTXF_extra_info | NETTXF_csum_blank, id: 5, size: 9000 });
  t.same(back[1]!.fields, { type: XEN_NETIF_EXTRA_TYPE_GSO, flags: 0, 'u.gso.size': 1448, 'u.gso.type': XEN_NETIF_GSO_TYPE_TCPV4, 'u.gso.pad': 0, 'u.gso.features': 0 });
  const rsps = events.filter((e) => e.device === 'vif1.0-tx' && e.half === 'response');
  t.same(rsps.map((e) => e.fields['status']), [0, 0, NETIF_RSP_DROPPED], 'int16_t status');
  const rx = events.filter((e) => e.device === 'xnf0-rx' && e.half === 'response');
  t.same(rx.map((e) => [e.struct, e.fields['status']]), [['netif_rx_response', NETIF_RSP_ERROR]]);
  const text = events.map((e) => formatEvent(e)).join('\n');
  t.match(text, /xnf0-tx +request put \[0\] netif_tx_request \{ gref: 77, offset: 0, flags: NETTXF_csum_blank\|NETTXF_extra_info, id: 5, size: 9000 \}/);
  t.match(text, /netif_extra_info \{ type: XEN_NETIF_EXTRA_TYPE_GSO, flags: 0, u\.gso\.size: 1448, u\.gso\.type: 1/);
  t.match(text, /netif_tx_response \{ id: 6, status: NETIF_RSP_DROPPED \}/);
});

t.test('a trace of examples/ping: netif slots on both ends, every frame a guest sent reached the other, and the pings and echoes are in it', async (t) => {
  const file = join(dir, 'ping.trace');
  const cfgs = ['ping-a.cfg', 'ping-b.cfg'].map((c) => join(root, 'examples', 'ping', c));
  const run = spawnSync(process.execPath, [cli, 'run', ...cfgs, '--trace', file], { encoding: 'utf8', timeout: 60_000 });
  t.equal(run.status, 0, run.stderr);
  const json = spawnSync(process.execPath, [cli, 'trace', file, '--json'], { encoding: 'utf8', maxBuffer: 1 << 28 });
  t.equal(json.status, 0, json.stderr);
  const events = json.stdout.trim().split('\n').map((l) => JSON.parse(l) as TraceEvent);
  for (const ring of ['netif_tx', 'netif_rx']) {
    for (const side of ['front', 'back']) {
      t.equal(events.filter((e) => e.type === 'ring-attach' && e.ring === ring && e.side === side).length, 2, `two ${ring} rings attached at the ${side}`);
    }
  }
  // What xnf put on its TX ring is what netback took, slot for slot.
  for (const domid of [1, 2]) {
    const puts = slots(events, 'request', 'put', /^xnf0-q0-tx$/).filter((e) => e.domid === domid);
    const takes = slots(events, 'request', 'take', new RegExp(`^vif${domid}\\.0-q0-tx$`));
    t.ok(puts.length > 10, `dom${domid} put ${puts.length} tx requests`);
    t.same(takes.map((e) => e.fields), puts.map((e) => e.fields), `netback took dom${domid}'s tx requests as written`);
  }
  type Frame = Extract<TraceEvent, { type: 'frame' }>;
  const frames = events.filter((e): e is Frame => e.type === 'frame');
  const hex = (f: Frame) => f.bytes as unknown as string; // --json gives a frame's bytes in hex
  for (const [from, to] of [[1, 2], [2, 1]]) {
    const sent = frames.filter((f) => f.domid === from && f.dir === 'from-guest').map(hex);
    const got = frames.filter((f) => f.domid === to && f.dir === 'to-guest').map(hex);
    // Frames sent before the peer's vif is connected, or after it has powered
    // off, reach no one; every other frame arrives, in order, byte for byte.
    let at = 0;
    const lost = sent.filter((f) => (got[at] === f ? (at++, false) : true));
    t.equal(at, got.length, `every frame dom${to} received is one dom${from} sent, in order, byte for byte`);
    t.ok(lost.length <= 4, `dom${to} received ${got.length} of ${sent.length}`);
  }
  // Three pings each way, each with its reply (ICMP type at byte 34 of an untagged IPv4 frame).
  const icmp = (f: Frame, type: number) => hex(f).slice(24, 28) === '0800' && hex(f).slice(46, 48) === '01' && hex(f).slice(68, 70) === type.toString(16).padStart(2, '0');
  for (const domid of [1, 2]) {
    t.ok(frames.filter((f) => f.domid === domid && f.dir === 'from-guest' && icmp(f, 8)).length >= 3, `dom${domid} sent echo requests`);
    t.ok(frames.filter((f) => f.domid === domid && f.dir === 'to-guest' && icmp(f, 0)).length >= 3, `dom${domid} got echo replies`);
  }
  // The run is a handful of exchanges: a few dozen frames, not a loop of replies.
  t.ok(frames.length < 200, `${frames.length} frames`);
});
