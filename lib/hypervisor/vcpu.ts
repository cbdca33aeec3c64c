// A vCPU as a kernel sees it: something that sleeps until the hypervisor
// kicks it (an event became pending) and then runs the upcall. The thread
// runner sleeps in Atomics.waitAsync on the vCPU's wake word, so the thread's
// event loop keeps serving timers and messages meanwhile.
//
// Waking a sleeping thread costs tens of microseconds, more than most work an
// event brings. So before sleeping, an idle vCPU that was woken soon after it
// went idle last time polls its wake word for a while, as Linux's
// cpuidle-haltpoll governor does for a KVM guest: the window grows while
// events keep arriving just after it closed, and shrinks when the vCPU sleeps
// longer than the most it would ever poll.
//
// Polling pays only while the peer that will kick us runs on another CPU.
// When the poll itself gets descheduled (a gap in its clock), the CPUs are
// oversubscribed and the poll is stealing time from that peer: for a while
// the vCPU spends its window blocked in Atomics.wait instead, which gives the
// CPU away and still wakes faster than the event loop's Atomics.waitAsync.
//
// The wake word says whether anyone must be woken: a kick sets KICKED and
// calls Atomics.notify only when the vCPU had announced SLEEPING.

import { Domain, VCPU_WAKE, WAKE_IDLE, WAKE_KICKED, WAKE_SLEEPING } from './domain.js';

/** guest_halt_poll_ns: the longest poll, and the idle time past which polling would not have paid. */
export const HALTPOLL_MAX_US = 200;
/** guest_halt_poll_grow_start */
const HALTPOLL_GROW_START_US = 50;
/** guest_halt_poll_grow, guest_halt_poll_shrink */
const HALTPOLL_GROW = 2;
const HALTPOLL_SHRINK = 2;
/** A gap this long between two looks at the clock while polling means the thread was descheduled. */
const PREEMPTED_GAP_US = 50;
/** How long to stay off polling after that. */
const PREEMPTED_BACKOFF_MS = 20;
/** The shortest blocking wait. */
const BLOCK_MIN_MS = 2;
/** While polling, at least one event-loop turn this often. */
const EVENT_LOOP_TURN_MS = 1;
/** Promise hops the work of an upcall gets before a blocking wait (a xenstore reply to its caller's next request is 4). */
const CONTINUATION_HOPS = 16;

export type VcpuOptions = {
  /** The longest poll before sleeping, in microseconds; 0 turns polling off. */
  haltPollMaxUs?: number;
};

export class Vcpu {
  private readonly ctl: Int32Array;
  private readonly wake: number;
  private readonly pollMaxUs: number;
  /** The current poll window (haltpoll's poll_limit_ns). */
  pollLimitUs = 0;
  /** Halts that ended in the poll window, and halts that slept. */
  polled = 0;
  slept = 0;
  /** Polls cut short because the thread was descheduled. */
  preempted = 0;
  /** No polling before this performance.now(). */
  private pollOffUntil = 0;
  /** When the thread's event loop last had a turn. */
  private lastTurn = 0;

  constructor(domain: Domain, readonly id: number, opts: VcpuOptions = {}) {
    this.ctl = domain.ctl;
    this.wake = domain.vcpuWord(id, VCPU_WAKE);
    this.pollMaxUs = opts.haltPollMaxUs ?? HALTPOLL_MAX_US;
    if (id < 0 || id >= domain.maxVcpus) throw new RangeError(`vcpu ${id} does not exist`);
  }

  /**
   * Idle until kicked or `timeoutMs` passes; clears the kick so the next one
   * is seen. Callers await it with the work of the last upcall still queued
   * as promise continuations: the poll yields to them between looks at the
   * wake word, and a blocking wait lets them run first.
   */
  async halt(timeoutMs = Infinity): Promise<void> {
    const t0 = performance.now();
    if (this.pollLimitUs > 0) {
      // Polling never passes through the event loop; make sure timers, I/O and messages get a turn.
      if (t0 - this.lastTurn > EVENT_LOOP_TURN_MS) {
        await new Promise<void>((resolve) => setImmediate(resolve));
        this.lastTurn = performance.now();
      }
      const until = performance.now() + this.pollLimitUs / 1000;
      if (t0 < this.pollOffUntil ? await this.block(until) : await this.poll(until)) {
        this.polled++;
        Atomics.store(this.ctl, this.wake, WAKE_IDLE);
        return;
      }
    }
    // Announce the sleep so that a kick notifies; a kick that came first left KICKED.
    if (Atomics.compareExchange(this.ctl, this.wake, WAKE_IDLE, WAKE_SLEEPING) === WAKE_IDLE) {
      this.slept++;
      const r = Atomics.waitAsync(this.ctl, this.wake, WAKE_SLEEPING, timeoutMs);
      if (r.async) {
        await r.value;
        this.lastTurn = performance.now();
      }
    }
    Atomics.store(this.ctl, this.wake, WAKE_IDLE);
    this.adjust((performance.now() - t0) * 1000);
  }

  /** Look at the wake word until it is set or `until` (performance.now()) passes, yielding to promise continuations. */
  private async poll(until: number): Promise<boolean> {
    let last = performance.now();
    for (let i = 1; ; i++) {
      if (Atomics.load(this.ctl, this.wake) === WAKE_KICKED) return true;
      await null;
      if ((i & 15) !== 0) continue;
      const now = performance.now();
      if (now - last > PREEMPTED_GAP_US / 1000) {
        this.preempted++;
        this.pollOffUntil = now + PREEMPTED_BACKOFF_MS;
        return Atomics.load(this.ctl, this.wake) === WAKE_KICKED;
      }
      if (now >= until) return Atomics.load(this.ctl, this.wake) === WAKE_KICKED;
      last = now;
    }
  }

  /**
   * The window without spinning, for oversubscribed CPUs: after the
   * continuations of the last upcall had their hops, sleep in Atomics.wait,
   * which a kick ends as fast as the runtime wakes a thread; the thread's
   * event loop waits meanwhile.
   */
  private async block(until: number): Promise<boolean> {
    for (let i = 0; i < CONTINUATION_HOPS; i++) await null;
    if (Atomics.compareExchange(this.ctl, this.wake, WAKE_IDLE, WAKE_SLEEPING) !== WAKE_IDLE) return true;
    // A timeout under a millisecond makes the wake-up itself several times slower here, so wait at least that.
    Atomics.wait(this.ctl, this.wake, WAKE_SLEEPING, Math.max(BLOCK_MIN_MS, until - performance.now()));
    return Atomics.compareExchange(this.ctl, this.wake, WAKE_SLEEPING, WAKE_IDLE) !== WAKE_SLEEPING;
  }

  /** haltpoll's adjust_poll_limit: grow when a longer poll would have caught the kick, shrink when none would. */
  private adjust(idleUs: number): void {
    if (idleUs > this.pollLimitUs && idleUs <= this.pollMaxUs) {
      this.pollLimitUs = Math.min(this.pollMaxUs, Math.max(HALTPOLL_GROW_START_US, this.pollLimitUs * HALTPOLL_GROW));
    } else if (idleUs > this.pollMaxUs) {
      const shrunk = this.pollLimitUs / HALTPOLL_SHRINK;
      this.pollLimitUs = shrunk < HALTPOLL_GROW_START_US ? 0 : shrunk;
    }
  }

  /** Kick this vCPU from outside, e.g. to make it notice a stop request (vcpu_kick). */
  kick(): void {
    if (Atomics.exchange(this.ctl, this.wake, WAKE_KICKED) === WAKE_SLEEPING) Atomics.notify(this.ctl, this.wake);
  }
}
