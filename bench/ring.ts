// Descriptors per second through lib/xen/ring.ts between two domains in two
// threads: a front in one domU grants its ring page, a back in the other maps
// it and answers every request. Each side sleeps on a wake word only after
// its final check, and the peer bumps that word only when the push says so,
// so a wrong event-suppression decision shows up as a sleep that times out.
//
// `xenpv bench` reports it as ring.xen.roundtrip.mops; the module is also
// the kernel that test/ring.test.ts runs for its two-thread test (main()).

import { parentPort } from 'node:worker_threads';
import { __CONST_RING_SIZE, netif_tx_sring, netif_tx_sring_entry } from '../lib/abi/ring.js';
import { GNTMAP_host_map, GNTTABOP_map_grant_ref, GNTTABOP_setup_table, GNTTABOP_query_size, GTF_permit_access, grant_entry_v1 } from '../lib/abi/grant_table.js';
import { DOMID_SELF, __HYPERVISOR_grant_table_op } from '../lib/abi/xen.js';
import { offsetOf } from '../lib/abi/layout.js';
import type { gnttab_map_grant_ref, gnttab_query_size, gnttab_setup_table } from '../lib/hypervisor/hypercall.js';
import { Host } from '../lib/hypervisor/host.js';
import { FramePage, PAGE_SIZE, writablePage } from '../lib/hypervisor/page.js';
import type { KernelContext } from '../lib/hypervisor/thread.js';
import type { Page } from '../lib/hypervisor/page.js';
import { BackRing, FrontRing } from '../lib/xen/ring.js';

export const RING_GFN = 16;
export const RING_GREF = 8;
const ENTRY_BYTES = netif_tx_sring_entry.size;
const NR_ENTS = __CONST_RING_SIZE(netif_tx_sring, PAGE_SIZE);
/** A sleep longer than this means a wake-up was lost. */
const SLEEP_LIMIT_MS = 2000;

export type RingKernelArgs = {
  role: 'front' | 'back';
  peer: number;
  count: number;
  /** Int32Array words: [0] wakes the front, [1] wakes the back. */
  wake: SharedArrayBuffer;
};

export type RingKernelReport = {
  role: 'front' | 'back';
  done: number;
  /** Sleeps that ended by timeout: lost wake-ups. */
  timeouts: number;
  notifies: number;
  sleeps: number;
  /** From the first request to the last response (front) or the last response (back). */
  elapsedMs: number;
  error: string | null;
};

function signal(wake: Int32Array, word: number): void {
  Atomics.add(wake, word, 1);
  Atomics.notify(wake, word);
}

/** Grant the ring page to `backend` as a frontend does, from the main thread before start. */
export function grantRing(host: Host, front: number, backend: number): void {
  const hc = host.hv.entry(front);
  const size: gnttab_query_size = { dom: DOMID_SELF, nr_frames: -1, max_nr_frames: -1, status: 1 };
  hc(__HYPERVISOR_grant_table_op, GNTTABOP_query_size, size);
  const setup: gnttab_setup_table = { dom: DOMID_SELF, nr_frames: size.nr_frames, status: 1, frame_list: [] };
  hc(__HYPERVISOR_grant_table_op, GNTTABOP_setup_table, setup);
  const mem = host.domain(front).mem;
  const at = setup.frame_list[0]! * PAGE_SIZE + RING_GREF * grant_entry_v1.size;
  Atomics.store(mem.u32, (at + offsetOf(grant_entry_v1, 'frame')) >> 2, RING_GFN);
  Atomics.store(mem.u16, (at + offsetOf(grant_entry_v1, 'domid')) >> 1, backend);
  Atomics.store(mem.u16, (at + offsetOf(grant_entry_v1, 'flags')) >> 1, GTF_permit_access);
}

function runFront(ctx: KernelContext, args: RingKernelArgs, wake: Int32Array): RingKernelReport {
  const ring = new FrontRing([new FramePage(ctx.hv.domain(ctx.domid)!.mem, RING_GFN, true)], ENTRY_BYTES, NR_ENTS, `bench${ctx.domid}`);
  ring.init();
  const req = new Uint8Array(ENTRY_BYTES);
  const reqView = new DataView(req.buffer);
  const rsp = new Uint8Array(ENTRY_BYTES);
  const rspView = new DataView(rsp.buffer);
  const r: RingKernelReport = { role: 'front', done: 0, timeouts: 0, notifies: 0, sleeps: 0, elapsedMs: 0, error: null };
  const t0 = performance.now();
  let sent = 0;
  signal(wake, 1); // the ring is initialised
  while (r.done < args.count && ring.error === undefined) {
    while (sent < args.count && ring.freeRequests() > 0) {
      reqView.setUint32(0, sent, true);
      reqView.setUint32(4, Math.imul(sent, 2654435761) >>> 0, true);
      ring.putRequest(req);
      sent++;
    }
    if (ring.pushRequests()) {
      r.notifies++;
      signal(wake, 1);
    }
    const seen = Atomics.load(wake, 0);
    ring.unconsumedResponses();
    while (ring.takeResponse(rsp)) {
      const id = rspView.getUint32(0, true);
      const value = rspView.getUint32(4, true);
      if (id !== r.done || value !== (~Math.imul(id, 2654435761)) >>> 0) {
        r.error = `response ${r.done}: id ${id} value ${value}`;
        return r;
      }
      r.done++;
    }
    if (sent < args.count && ring.freeRequests() > 0) continue;
    if (r.done < args.count && !ring.finalCheckForResponses()) {
      r.sleeps++;
      if (Atomics.wait(wake, 0, seen, SLEEP_LIMIT_MS) === 'timed-out') r.timeouts++;
    }
  }
  if (ring.error !== undefined) r.error = ring.error.code;
  r.elapsedMs = performance.now() - t0;
  return r;
}

function mapRing(ctx: KernelContext, front: number): Page {
  const op: gnttab_map_grant_ref = {
    host_addr: 0n, flags: GNTMAP_host_map, ref: RING_GREF, dom: front, status: 1, handle: -1, dev_bus_addr: 0n, page: null,
  };
  const rc = ctx.hv.entry(ctx.domid)(__HYPERVISOR_grant_table_op, GNTTABOP_map_grant_ref, op);
  if (rc !== 0 || op.status !== 0) throw new Error(`map_grant_ref: rc ${rc} status ${op.status}`);
  return writablePage(op.page);
}

function runBack(ctx: KernelContext, args: RingKernelArgs, wake: Int32Array): RingKernelReport {
  while (Atomics.load(wake, 1) === 0) Atomics.wait(wake, 1, 0, SLEEP_LIMIT_MS);
  const ring = new BackRing([mapRing(ctx, args.peer)], ENTRY_BYTES, NR_ENTS, `bench${ctx.domid}`);
  ring.init();
  const req = new Uint8Array(ENTRY_BYTES);
  const reqView = new DataView(req.buffer);
  const rsp = new Uint8Array(ENTRY_BYTES);
  const rspView = new DataView(rsp.buffer);
  const r: RingKernelReport = { role: 'back', done: 0, timeouts: 0, notifies: 0, sleeps: 0, elapsedMs: 0, error: null };
  const t0 = performance.now();
  while (r.done < args.count && ring.error === undefined) {
    const seen = Atomics.load(wake, 1);
    ring.unconsumedRequests();
    while (ring.takeRequest(req)) {
      rspView.setUint32(0, reqView.getUint32(0, true), true);
      rspView.setUint32(4, ~reqView.getUint32(4, true) >>> 0, true);
      ring.putResponse(rsp);
      r.done++;
    }
    if (ring.pushResponses()) {
      r.notifies++;
      signal(wake, 0);
    }
    if (r.done < args.count && !ring.finalCheckForRequests()) {
      r.sleeps++;
      if (Atomics.wait(wake, 1, seen, SLEEP_LIMIT_MS) === 'timed-out') r.timeouts++;
    }
  }
  if (ring.error !== undefined) r.error = ring.error.code;
  r.elapsedMs = performance.now() - t0;
  return r;
}

/** The kernel of either domain (thread.ts calls it). */
export function main(ctx: KernelContext): void {
  const args = ctx.args as RingKernelArgs;
  const wake = new Int32Array(args.wake);
  const report = args.role === 'front' ? runFront(ctx, args, wake) : runBack(ctx, args, wake);
  parentPort!.postMessage(report);
}

/** Start a front and a back domain; resolves with both reports. */
export async function runPair(count: number): Promise<{ front: RingKernelReport; back: RingKernelReport }> {
  const reports = new Map<string, RingKernelReport>();
  let host: Host | undefined;
  await new Promise<void>((resolve, reject) => {
    host = new Host({
      onMessage: (_domid, m) => {
        const rep = m as RingKernelReport;
        reports.set(rep.role, rep);
        if (reports.size === 2) resolve();
      },
      onExit: (domid, err) => {
        if (err !== null) reject(new Error(`domain ${domid}: ${err.message}`));
      },
    });
    const front = host.createDomain({ name: 'ringfront', memoryMiB: 1 }).domid;
    const back = host.createDomain({ name: 'ringback', memoryMiB: 1 }).domid;
    grantRing(host, front, back);
    const wake = new SharedArrayBuffer(8);
    const kernel = import.meta.url;
    host.start(back, kernel, { role: 'back', peer: front, count, wake } satisfies RingKernelArgs);
    host.start(front, kernel, { role: 'front', peer: back, count, wake } satisfies RingKernelArgs);
  }).finally(() => host?.shutdown());
  return { front: reports.get('front')!, back: reports.get('back')! };
}
