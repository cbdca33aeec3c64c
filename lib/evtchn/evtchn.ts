// Guest interrupts over event channels, after OpenBSD sys/dev/pv/xen.c
// (xen_intr, xen_intr_establish, xen_intr_mask, ...). The upcall scans the
// 2-level pending bitmap in shared_info and hands each port to its handler,
// as xen_intr() does, with the port masked. A handler that returns at once
// has run to completion inside the upcall, and its port is unmasked there.
// A handler that returns a promise keeps its port masked until the promise
// settles, so a handler never re-enters.

import { vcpu_info, DOMID_SELF, __HYPERVISOR_event_channel_op } from '../abi/xen.js';
import {
  EVTCHNOP_alloc_unbound,
  EVTCHNOP_close,
  EVTCHNOP_send,
  EVTCHNOP_unmask,
  EVTCHNOP_bind_virq,
} from '../abi/event_channel.js';
import { XenError } from '../errors.js';
import { errnoName } from '../hypervisor/errno.js';
import { EVTCHN_MASK, EVTCHN_PENDING, PENDING_SEL, UPCALL_PENDING, bitWord } from '../hypervisor/evtchn.js';
import { logger, type Log } from '../log.js';
import { PAGE_SIZE, type MemoryViews } from '../hypervisor/page.js';
import type { Hypercall } from '../hypervisor/hypercall.js';
import type { KernelVcpu } from '../hypervisor/runner.js';
import { traceDevice, traceEvtchnBind, traceEvtchnDeliver, tracing } from '../trace/trace.js';

/** 2-level ABI on a 64-bit guest: 64 rows of 64 ports. */
const NR_ROWS = 64;

/**
 * A port's handler. It returns false when the event found nothing to do (a
 * spurious event, Linux's XEN_EOI_FLAG_SPURIOUS); anything else counts as work.
 */
export type IntrHandler = () => void | boolean | Promise<void | boolean>;

/** Time for throttling: the real clock, or a one-thread host's virtual one. */
export type IntrClock = { now(): number; after(ms: number, fn: () => void): void };

export const realClock: IntrClock = {
  now: () => performance.now(),
  after: (ms, fn) => void setTimeout(fn, ms).unref(),
};

// Spurious-event throttling (XSA-332, XSA-391), after Linux's lateeoi: the
// port is unmasked when its handler returns (the EOI), but a port that fired
// SPURIOUS_LIMIT times in a row with nothing to do, each within
// SPURIOUS_WINDOW_MS of the last, stays masked for THROTTLE_MIN_MS first,
// twice as long at each further event for nothing, up to THROTTLE_MAX_MS.
// One event with work resets it. A peer that sends events as fast as it can
// costs the target a bounded share of its time, and its other ports go on.
const SPURIOUS_LIMIT = 8;
const SPURIOUS_WINDOW_MS = 100;
const THROTTLE_MIN_MS = 1;
const THROTTLE_MAX_MS = 1000;
/** Passes of the upcall over the pending bitmaps before it yields to the rest of the kernel. */
const UPCALL_MAX_ROUNDS = 64;

/** One established port (OpenBSD's struct xen_intsrc). */
export class IntrHandle {
  count = 0;
  running: Promise<void> | null = null;
  closed = false;
  /** The handler's device in this thread's trace (0 when not tracing). */
  readonly traceDev: number;
  /** Events in a row that found nothing to do, and when the last of them came. */
  spuriousRun = 0;
  lastSpurious = 0;
  /** Events that found nothing to do, and times the port was held masked for it. */
  spuriousEvents = 0;
  throttles = 0;
  /** EVTCHNOP_send's argument, made once: a signal allocates nothing. */
  readonly sendOp: { port: number };

  constructor(
    readonly port: number,
    readonly name: string,
    readonly handler: IntrHandler,
    readonly closeOnDisestablish: boolean,
  ) {
    this.traceDev = traceDevice(name);
    this.sendOp = { port };
  }
}

export class Interrupts {
  private readonly handles = new Map<number, IntrHandle>();
  private readonly log: Log;
  /** Byte offsets in memory of the shared_info bitmaps, which do not move once mapped. */
  private readonly pending: number;
  private readonly mask: number;
  private stopped = false;
  /** Events that arrived for a port nobody established; counted, not fatal. */
  spurious = 0;
  /** Handlers that threw (a driver bug: logged, the port goes on). */
  handlerErrors = 0;
  /** Times a port was held masked for firing with nothing to do. */
  throttles = 0;

  constructor(
    private readonly hypercall: Hypercall,
    private readonly mem: MemoryViews,
    private readonly sharedInfoGfn: number,
    private readonly vcpu: KernelVcpu,
    name: string,
    private readonly clock: IntrClock = realClock,
  ) {
    this.log = logger('evtchn', name);
    this.pending = sharedInfoGfn * PAGE_SIZE + EVTCHN_PENDING;
    this.mask = sharedInfoGfn * PAGE_SIZE + EVTCHN_MASK;
  }

  private setMask(port: number): void {
    Atomics.or(this.mem.u32, bitWord(this.mask, port), 1 << (port & 31));
  }

  private isMasked(port: number): boolean {
    return (Atomics.load(this.mem.u32, bitWord(this.mask, port)) & (1 << (port & 31))) !== 0;
  }

  private evtchnOp(cmd: number, arg: object, what: string): void {
    const rc = this.hypercall(__HYPERVISOR_event_channel_op, cmd, arg);
    if (rc !== 0) throw new XenError(errnoName(-rc), `${what} failed`);
  }

  /**
   * xen_intr_establish: attach `handler` to `port`; port 0 allocates an
   * unbound port that `remoteDomid` may bind. The port stays masked until
   * intrUnmask, so the caller finishes its setup first.
   */
  intrEstablish(port: number, remoteDomid: number, handler: IntrHandler, name: string): IntrHandle {
    let closeOnDisestablish = false;
    if (port === 0) {
      const op = { dom: DOMID_SELF, remote_dom: remoteDomid, port: 0 };
      this.evtchnOp(EVTCHNOP_alloc_unbound, op, 'alloc_unbound');
      port = op.port;
      closeOnDisestablish = true;
    }
    if (this.handles.has(port)) throw new XenError('EEXIST', `port ${port} is already established`);
    this.setMask(port);
    const h = new IntrHandle(port, name, handler, closeOnDisestablish);
    this.handles.set(port, h);
    if (tracing) traceEvtchnBind(h.traceDev, port);
    this.log('established port %d for %s', port, name);
    return h;
  }

  /** Bind a VIRQ on vCPU 0 and establish a handler on its port. */
  virqEstablish(virq: number, handler: IntrHandler, name: string): IntrHandle {
    const op = { virq, vcpu: 0, port: 0 };
    this.evtchnOp(EVTCHNOP_bind_virq, op, 'bind_virq');
    const h = this.intrEstablish(op.port, DOMID_SELF, handler, name);
    return Object.assign(h, { closeOnDisestablish: true });
  }

  /** Take over a port bound elsewhere (e.g. by bind_interdomain) and own its close. */
  adopt(port: number, handler: IntrHandler, name: string): IntrHandle {
    const h = this.intrEstablish(port, DOMID_SELF, handler, name);
    return Object.assign(h, { closeOnDisestablish: true });
  }

  /** xen_intr_disestablish: mask, wait for a running handler, forget, close. */
  async intrDisestablish(h: IntrHandle): Promise<void> {
    if (h.closed) return;
    h.closed = true;
    this.setMask(h.port);
    await this.intrBarrier(h);
    this.handles.delete(h.port);
    if (h.closeOnDisestablish) this.evtchnOp(EVTCHNOP_close, { port: h.port }, 'close');
  }

  intrMask(h: IntrHandle): void {
    this.setMask(h.port);
  }

  /** xen_intr_unmask: the hypervisor clears the mask and re-delivers a held-back event. */
  intrUnmask(h: IntrHandle): void {
    if (h.closed) return;
    this.evtchnOp(EVTCHNOP_unmask, { port: h.port }, 'unmask');
  }

  /** xen_intr_signal: notify the other end of the port. */
  intrSignal(h: IntrHandle): void {
    this.evtchnOp(EVTCHNOP_send, h.sendOp, 'send');
  }

  /**
   * resend_irq_on_evtchn, after the thread's event loop has had a turn: mark
   * the port pending again and, once it is unmasked, have it delivered. A
   * handler that stops at its budget with work left calls this, so the work
   * goes on in a later upcall with no event needed from the other end, and
   * the thread's timers, messages and other devices run first. (Marked at
   * once, the upcall's own loop would run the handler again before it
   * returns.)
   */
  intrResend(h: IntrHandle): void {
    setImmediate(() => {
      if (h.closed || this.handles.get(h.port) !== h) return;
      Atomics.or(this.mem.u32, bitWord(this.pending, h.port), 1 << (h.port & 31));
      if (!this.isMasked(h.port) && h.running === null) this.intrUnmask(h);
    });
  }

  /** xen_intr_barrier: resolve once a handler that is running has returned. */
  async intrBarrier(h: IntrHandle): Promise<void> {
    while (h.running !== null) await h.running;
  }

  /** xen_intr: the upcall. Fan pending, unmasked ports out to their handlers. */
  upcall(): void {
    const u8 = this.mem.u8;
    const u32 = this.mem.u32;
    const vi = this.sharedInfoGfn * PAGE_SIZE + this.vcpu.id * vcpu_info.size;
    for (let round = 0; Atomics.exchange(u8, vi + UPCALL_PENDING, 0) !== 0; round++) {
      if (round === UPCALL_MAX_ROUNDS) {
        // Events keep coming: the rest waits for the next upcall, and the kernel's other work runs first.
        Atomics.store(u8, vi + UPCALL_PENDING, 1);
        this.vcpu.kick();
        return;
      }
      for (let half = 0; half < 2; half++) {
        let sel = Atomics.exchange(u32, (vi + PENDING_SEL + half * 4) >> 2, 0);
        for (; sel !== 0; sel &= sel - 1) {
          const row = half * 32 + (31 - Math.clz32(sel & -sel));
          if (row < NR_ROWS) this.scanRow(row);
        }
      }
    }
  }

  private scanRow(row: number): void {
    const u32 = this.mem.u32;
    for (let half = 0; half < 2; half++) {
      const first = row * 64 + half * 32;
      const pw = bitWord(this.pending, first);
      let ready = Atomics.load(u32, pw) & ~Atomics.load(u32, bitWord(this.mask, first));
      if (ready === 0) continue;
      Atomics.and(u32, pw, ~ready);
      for (; ready !== 0; ready &= ready - 1) this.dispatch(first + (31 - Math.clz32(ready & -ready)));
    }
  }

  private dispatch(port: number): void {
    const h = this.handles.get(port);
    if (h === undefined || h.closed) {
      if (tracing) traceEvtchnDeliver(0, port);
      this.spurious++;
      return;
    }
    h.count++;
    if (tracing) traceEvtchnDeliver(h.traceDev, port);
    this.setMask(port);
    let result: void | boolean | Promise<void | boolean> = undefined;
    try {
      result = h.handler();
    } catch (err) {
      this.handlerFailed(h, err);
    }
    if (result instanceof Promise) h.running = this.settle(h, result);
    else this.eoi(h, result === false);
  }

  /** The rest of an asynchronous handler, its port masked until it settles. */
  private async settle(h: IntrHandle, result: Promise<void | boolean>): Promise<void> {
    let work: void | boolean = undefined;
    try {
      work = await result;
    } catch (err) {
      this.handlerFailed(h, err);
    } finally {
      h.running = null;
      this.eoi(h, work === false);
    }
  }

  // A driver's failure must not take the interrupt path down with it.
  private handlerFailed(h: IntrHandle, err: unknown): void {
    this.handlerErrors++;
    this.log('handler %s on port %d threw: %s', h.name, h.port, (err as Error).message);
  }

  // xen_irq_lateeoi: the handler is done; unmask the port now, or a while
  // later if it keeps firing with nothing to do.
  private eoi(h: IntrHandle, spurious: boolean): void {
    if (h.closed || this.handles.get(h.port) !== h) return;
    const delayMs = this.spuriousDelay(h, spurious);
    if (delayMs === 0) return this.unmaskAfter(h);
    h.throttles++;
    this.throttles++;
    this.log('port %d (%s): %d events in a row with nothing to do: masked for %d ms', h.port, h.name, h.spuriousRun, delayMs);
    this.clock.after(delayMs, () => {
      if (h.running === null) this.unmaskAfter(h);
    });
  }

  private spuriousDelay(h: IntrHandle, spurious: boolean): number {
    if (!spurious) {
      h.spuriousRun = 0;
      return 0;
    }
    const now = this.clock.now();
    h.spuriousEvents++;
    if (now - h.lastSpurious > SPURIOUS_WINDOW_MS) h.spuriousRun = 0;
    h.lastSpurious = now;
    h.spuriousRun++;
    if (h.spuriousRun < SPURIOUS_LIMIT) return 0;
    const delayMs = Math.min(THROTTLE_MAX_MS, THROTTLE_MIN_MS * 2 ** Math.min(10, h.spuriousRun - SPURIOUS_LIMIT));
    // The window runs from the unmask: a storm that resumes at once doubles the wait.
    h.lastSpurious = now + delayMs;
    return delayMs;
  }

  /**
   * The port's handler returned: clear the mask ourselves and ask the
   * hypervisor to deliver only when an event came in while it was masked
   * (Linux unmask_evtchn), which saves a hypercall per event.
   */
  private unmaskAfter(h: IntrHandle): void {
    if (h.closed || this.handles.get(h.port) !== h) return;
    const bit = 1 << (h.port & 31);
    Atomics.and(this.mem.u32, bitWord(this.mask, h.port), ~bit);
    if ((Atomics.load(this.mem.u32, bitWord(this.pending, h.port)) & bit) !== 0) this.intrUnmask(h);
  }

  /** The vCPU's idle loop: sleep until kicked, run the upcall, until stop(). */
  async run(): Promise<void> {
    while (!this.stopped) {
      this.upcall();
      await this.vcpu.halt();
    }
  }

  stop(): void {
    this.stopped = true;
    this.vcpu.kick();
  }

  isPortMasked(port: number): boolean {
    return this.isMasked(port);
  }
}
