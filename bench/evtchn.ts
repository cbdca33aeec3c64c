// evtchn.pingpong: round trips of one event between two guests, through the
// whole upcall path: EVTCHNOP_send, the pending bits in shared_info, the
// vCPU kick, the sleeping vCPU's wake, the upcall's scan, the handler task.
// The `ping` domain signals and times the answer; the `pong` domain's
// handler signals straight back. Sequence words in a shared buffer tell a
// real answer from the event bind_interdomain leaves pending.
//
// This module is also both domains' kernel (thread.ts calls main()).

import { parentPort } from 'node:worker_threads';
import { __HYPERVISOR_event_channel_op, __HYPERVISOR_memory_op, DOMID_SELF } from '../lib/abi/xen.js';
import { EVTCHNOP_alloc_unbound, EVTCHNOP_bind_interdomain } from '../lib/abi/event_channel.js';
import { XENMEM_add_to_physmap, XENMAPSPACE_shared_info } from '../lib/abi/memory.js';
import { Interrupts } from '../lib/evtchn/evtchn.js';
import { Host } from '../lib/hypervisor/host.js';
import type { KernelContext } from '../lib/hypervisor/thread.js';
import { Vcpu } from '../lib/hypervisor/vcpu.js';
import { PhysMem } from '../lib/xen/physmem.js';
import { percentiles, type PingResult } from './limits.js';

type Args = { role: 'ping' | 'pong'; peer: number; port: number; seq: SharedArrayBuffer; durationMs: number };

/** Words of `seq`: the ping's sequence, the pong's answer, pong ready. */
const PING = 0;
const PONG = 1;
const READY = 2;

function attach(ctx: KernelContext): Interrupts {
  const hypercall = ctx.hv.entry(ctx.domid);
  const self = ctx.hv.domain(ctx.domid)!;
  const physmem = new PhysMem(self.mem, self.specialBase);
  const si = physmem.alloc();
  const rc = hypercall(__HYPERVISOR_memory_op, XENMEM_add_to_physmap, { domid: DOMID_SELF, size: 0, space: XENMAPSPACE_shared_info, idx: 0, gpfn: si });
  if (rc !== 0) throw new Error(`add_to_physmap: ${rc}`);
  const intr = new Interrupts(hypercall, self.mem, si, new Vcpu(self, 0), `dom${ctx.domid}`);
  void intr.run();
  return intr;
}

export function main(ctx: KernelContext): void {
  const args = ctx.args as Args;
  const seq = new Int32Array(args.seq);
  const intr = attach(ctx);
  if (args.role === 'pong') {
    const bind = { remote_dom: args.peer, remote_port: args.port, local_port: 0 };
    const rc = ctx.hv.entry(ctx.domid)(__HYPERVISOR_event_channel_op, EVTCHNOP_bind_interdomain, bind);
    if (rc !== 0) throw new Error(`bind_interdomain: ${rc}`);
    const h = intr.adopt(bind.local_port, () => {
      const s = Atomics.load(seq, PING);
      if (s === -1) {
        intr.stop();
        parentPort!.postMessage(null);
        return;
      }
      if (s === Atomics.load(seq, PONG)) return;
      Atomics.store(seq, PONG, s);
      intr.intrSignal(h);
    }, 'pong');
    intr.intrUnmask(h);
    Atomics.store(seq, READY, 1);
    Atomics.notify(seq, READY);
    return;
  }
  const rtts: number[] = [];
  let t = 0;
  let end = 0;
  const h = intr.adopt(args.port, () => {
    const s = Atomics.load(seq, PING);
    if (s === 0 || Atomics.load(seq, PONG) !== s) return;
    const now = performance.now();
    rtts.push((now - t) * 1000);
    if (now >= end) {
      Atomics.store(seq, PING, -1);
      intr.intrSignal(h);
      intr.stop();
      parentPort!.postMessage(percentiles(rtts));
      return;
    }
    Atomics.store(seq, PING, s + 1);
    t = performance.now();
    intr.intrSignal(h);
  }, 'ping');
  intr.intrUnmask(h);
  void (async () => {
    const w = Atomics.waitAsync(seq, READY, 0, 10_000);
    if (w.async) await w.value;
    end = performance.now() + args.durationMs;
    Atomics.store(seq, PING, 1);
    t = performance.now();
    intr.intrSignal(h);
  })();
}

/** Two guests on a bare host, one interdomain port between them; round trips for `durationMs`. */
export async function evtchnPingPong(durationMs: number): Promise<PingResult> {
  let host: Host | undefined;
  try {
    return await new Promise<PingResult>((resolve, reject) => {
      host = new Host({
        onMessage: (_domid, m) => {
          if (m !== null) resolve(m as PingResult);
        },
        onExit: (domid, err) => {
          if (err !== null) reject(new Error(`domain ${domid}: ${err.message}`));
        },
      });
      const a = host.createDomain({ name: 'ping', memoryMiB: 1 }).domid;
      const b = host.createDomain({ name: 'pong', memoryMiB: 1 }).domid;
      const op = { dom: DOMID_SELF, remote_dom: b, port: 0 };
      const rc = host.hv.entry(a)(__HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, op);
      if (rc !== 0) throw new Error(`alloc_unbound: ${rc}`);
      const seq = new SharedArrayBuffer(16);
      const kernel = import.meta.url;
      host.start(b, kernel, { role: 'pong', peer: a, port: op.port, seq, durationMs } satisfies Args);
      host.start(a, kernel, { role: 'ping', peer: b, port: op.port, seq, durationMs } satisfies Args);
    });
  } finally {
    await host?.shutdown();
  }
}
