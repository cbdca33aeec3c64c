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
// KVM's host-side halt polling asks single_task_running(). Here the host
// block counts the vCPUs that are awake (running, polling, or kicked awake),
// and the machine's CPU pressure (Linux PSI) says whether any other task
// waits for a CPU. While the awake vCPUs fit the CPUs and nothing waits, a
// poll takes no one's CPU: the window may grow to 1 ms instead of 200 µs, a
// window that runs out counts against polling only once it is the longest
// window, and the poll ends when the CPUs fill up.
//
// When the CPUs are oversubscribed the poll steals time from that peer: it
// gets descheduled itself (a long gap in its clock), or its window runs out
// while the peer waits for a CPU. After either, or two windows in a row that
// ran out, the vCPU sleeps at once for a while, as a plain halt does, and
// for twice as long each time it happens again soon after. On free CPUs a
// gap in the clock is not taken for a starved peer: a collection or a long
// continuation makes one too, and an outside task that wanted the CPU shows
// in the pressure, which is judged over 100 ms so that a blip does not
// stop polling.
//
// The wake word says whether anyone must be woken: a kick sets KICKED and
// calls Atomics.notify only when the vCPU had announced SLEEPING.

import { closeSync, openSync, readSync } from 'node:fs';
import { D, Domain, DomainState, HOST_AWAKE, VCPU_BLOCKED, VCPU_WAKE, WAKE_IDLE, WAKE_KICKED, WAKE_SLEEPING } from './domain.js';
import { kickVcpu } from './evtchn.js';
import { hostCpus } from './affinity.js';

/** guest_halt_poll_ns: the longest poll, and the idle time past which polling would not have paid. */
export const HALTPOLL_MAX_US = 200;
/**
 * The longest poll while every awake vCPU has a CPU of its own: such a poll
 * takes no one's time. Under a block load dom0's vCPU found gaps of 200 µs
 * to 1 ms thousands of times a second; with the shorter window each cost a
 * sleep and a wake-up (bench/profile.ts block memory: 9,000-12,000 sleeps a
 * second with 200 µs, 200-700 with 1 ms).
 */
export const HALTPOLL_FREE_MAX_US = 1000;
/** guest_halt_poll_grow_start */
const HALTPOLL_GROW_START_US = 50;
/** guest_halt_poll_grow, guest_halt_poll_shrink */
const HALTPOLL_GROW = 2;
const HALTPOLL_SHRINK = 2;
/**
 * A gap this long between two looks at the clock while polling means the
 * thread was descheduled: longer than a young-generation collection, shorter
 * than the time slice another runnable thread gets. (Continuations that ran
 * that long inside the poll count too: there is work enough without it.)
 */
const PREEMPTED_GAP_US = 500;
/** Windows in a row that may run out before polling stops for a while. */
const FAILED_POLLS_MAX = 2;
/** How long polling stops; doubled, up to the most, while it keeps not paying. */
const POLL_BACKOFF_MS = 20;
const POLL_BACKOFF_MAX_MS = 1000;
/** How often a vCPU looks at the machine's CPU pressure (the span it judges), and the share of waiting above which CPUs are not free. */
export const PRESSURE_FILE = '/proc/pressure/cpu';
const PRESSURE_SAMPLE_MS = 100;
const PRESSURE_HIGH = 0.25;
/** While polling, at least one event-loop turn this often. */
const EVENT_LOOP_TURN_MS = 1;

export type VcpuOptions = {
  /** The longest poll before sleeping, in microseconds; 0 turns polling off. */
  haltPollMaxUs?: number;
  /** The longest poll while the CPUs are free (at least haltPollMaxUs). */
  haltPollFreeMaxUs?: number;
  /** While it keeps polling, the vCPU gives the thread's event loop a turn at least this often. */
  eventLoopTurnMs?: number;
  /** A gap in the poll's clock that counts as being descheduled; Infinity never stops polling. */
  preemptedGapUs?: number;
  /**
   * The CPUs the awake vCPUs share: the process's (hostCpus), not this
   * thread's, which a pinned domain has narrowed (os.availableParallelism()
   * asks the calling thread's affinity, and a domain pinned to one CPU would
   * count one CPU for every vCPU of the host).
   */
  cpus?: number;
  /** Where the machine's CPU pressure is read (Linux PSI); null never looks. */
  pressureFile?: string | null;
};

export class Vcpu {
  private readonly ctl: Int32Array;
  private readonly wake: number;
  private readonly blocked: number;
  private readonly pollMaxUs: number;
  private readonly pollFreeMaxUs: number;
  private readonly eventLoopTurnMs: number;
  private readonly preemptedGapMs: number;
  private readonly domain: Domain;
  private readonly cpus: number;
  private readonly pressure: CpuPressure;
  /** The current poll window (haltpoll's poll_limit_ns). */
  pollLimitUs = 0;
  /** Halts that ended in the poll window, and halts that slept. */
  polled = 0;
  slept = 0;
  /** Polls cut short because the thread was descheduled. */
  preempted = 0;
  /** Poll windows that ran out; polls that ended when the CPUs filled up; times polling was stopped for a while. */
  ranOut = 0;
  contended = 0;
  backoffs = 0;
  /** No polling before this performance.now(). */
  private pollOffUntil = 0;
  private backoffMs = POLL_BACKOFF_MS;
  /** Windows that ran out since the last poll that saw a kick. */
  private failedPolls = 0;
  /** When the thread's event loop last had a turn. */
  private lastTurn = 0;

  constructor(domain: Domain, readonly id: number, opts: VcpuOptions = {}) {
    this.ctl = domain.ctl;
    this.wake = domain.vcpuWord(id, VCPU_WAKE);
    this.blocked = domain.vcpuWord(id, VCPU_BLOCKED);
    this.pollMaxUs = opts.haltPollMaxUs ?? HALTPOLL_MAX_US;
    this.pollFreeMaxUs = this.pollMaxUs === 0 ? 0 : Math.max(this.pollMaxUs, opts.haltPollFreeMaxUs ?? HALTPOLL_FREE_MAX_US);
    this.eventLoopTurnMs = opts.eventLoopTurnMs ?? EVENT_LOOP_TURN_MS;
    this.preemptedGapMs = (opts.preemptedGapUs ?? PREEMPTED_GAP_US) / 1000;
    if (id < 0 || id >= domain.maxVcpus) throw new RangeError(`vcpu ${id} does not exist`);
    this.domain = domain;
    this.cpus = opts.cpus ?? hostCpus().length;
    this.pressure = new CpuPressure(opts.pressureFile === undefined ? PRESSURE_FILE : opts.pressureFile);
    domain.setAwake(id, 1);
  }

  /** Whether every awake vCPU, this one included, has a CPU of its own (unknown: no), and no one outside waits for one. */
  private cpuFree(): boolean {
    const host = this.domain.host;
    return host !== null && Atomics.load(host, HOST_AWAKE) <= this.cpus && !this.pressure.high();
  }

  /**
   * Idle until kicked or `timeoutMs` passes; clears the kick so the next one
   * is seen. Callers await it with the work of the last upcall still queued
   * as promise continuations: the poll yields to them between looks at the
   * wake word.
   */
  async halt(timeoutMs = Infinity): Promise<void> {
    Atomics.store(this.ctl, this.blocked, 1);
    await this.idle(timeoutMs);
    Atomics.store(this.ctl, this.blocked, 0);
    Atomics.store(this.ctl, this.wake, WAKE_IDLE);
    this.holdWhilePaused();
  }

  /**
   * A paused domain does not run: its thread stops here, timers and all, as a
   * descheduled vCPU stops, until the toolstack unpauses it (or destroys the
   * domain, which ends the thread). The time held is not CPU time.
   */
  holdWhilePaused(): void {
    if (Atomics.load(this.ctl, D.state) !== DomainState.paused) return;
    const since = performance.now();
    this.domain.setAwake(this.id, 0);
    while (Atomics.load(this.ctl, D.state) === DomainState.paused) Atomics.wait(this.ctl, D.state, DomainState.paused);
    this.domain.setAwake(this.id, 1);
    Atomics.add(this.ctl, D.pausedMs, Math.round(performance.now() - since));
  }

  /** Poll for the window, then sleep until kicked or `timeoutMs` passes. */
  private async idle(timeoutMs: number): Promise<void> {
    const t0 = performance.now();
    if (this.pollLimitUs > 0 && t0 >= this.pollOffUntil) {
      // Polling never passes through the event loop; make sure timers, I/O and messages get a turn.
      if (t0 - this.lastTurn > this.eventLoopTurnMs) await this.turn();
      const free = this.cpuFree();
      const window = Math.min(this.pollLimitUs, free ? this.pollFreeMaxUs : this.pollMaxUs);
      const outcome = await this.poll(performance.now() + window / 1000, free);
      if (outcome === 'kicked') {
        this.polled++;
        this.failedPolls = 0;
        return;
      }
      // A window that ran out on a free CPU cost no one anything, unless polling longer is not an option.
      const counts = !free || window >= this.pollFreeMaxUs;
      if (outcome === 'expired') this.ranOut++;
      else if (outcome === 'contended') this.contended++;
      if (outcome === 'preempted' || (outcome === 'expired' && counts && ++this.failedPolls >= FAILED_POLLS_MAX)) this.stopPolling();
    }
    // Announce the sleep so that a kick notifies; a kick that came first left KICKED.
    if (Atomics.compareExchange(this.ctl, this.wake, WAKE_IDLE, WAKE_SLEEPING) === WAKE_IDLE) {
      this.slept++;
      this.domain.setAwake(this.id, 0);
      const r = Atomics.waitAsync(this.ctl, this.wake, WAKE_SLEEPING, timeoutMs);
      if (r.async) {
        await r.value;
        this.lastTurn = performance.now();
      }
      this.domain.setAwake(this.id, 1);
    }
    this.adjust((performance.now() - t0) * 1000, this.cpuFree() ? this.pollFreeMaxUs : this.pollMaxUs);
  }

  /** One pass through the event loop: timers, I/O and messages run. */
  private async turn(): Promise<void> {
    await new Promise<void>((resolve) => setImmediate(resolve));
    this.lastTurn = performance.now();
  }

  /**
   * Look at the wake word until it is set or `until` (performance.now())
   * passes, yielding to promise continuations. A poll that began on a free
   * CPU ends as 'contended' once the awake vCPUs outnumber the CPUs.
   */
  private async poll(until: number, free: boolean): Promise<'kicked' | 'expired' | 'preempted' | 'contended'> {
    let last = performance.now();
    for (let i = 1; ; i++) {
      if (Atomics.load(this.ctl, this.wake) === WAKE_KICKED) return 'kicked';
      await null;
      if ((i & 15) !== 0) continue;
      if (free && !this.cpuFree()) return Atomics.load(this.ctl, this.wake) === WAKE_KICKED ? 'kicked' : 'contended';
      const now = performance.now();
      // On free CPUs a long gap is a collection or a long continuation, not a peer starved: pressure would show one.
      if (!free && now - last > this.preemptedGapMs) {
        this.preempted++;
        return Atomics.load(this.ctl, this.wake) === WAKE_KICKED ? 'kicked' : 'preempted';
      }
      if (now >= until) return Atomics.load(this.ctl, this.wake) === WAKE_KICKED ? 'kicked' : 'expired';
      last = now;
    }
  }

  /** Polling did not pay: sleep at once for a while, longer if it did not pay right after the last pause either. */
  private stopPolling(): void {
    this.backoffs++;
    const now = performance.now();
    const again = now - this.pollOffUntil < this.backoffMs;
    this.backoffMs = again ? Math.min(POLL_BACKOFF_MAX_MS, this.backoffMs * 2) : POLL_BACKOFF_MS;
    this.pollOffUntil = now + this.backoffMs;
    this.failedPolls = 0;
  }

  /** haltpoll's adjust_poll_limit: grow when a longer poll (up to `maxUs`) would have caught the kick, shrink when none would. */
  private adjust(idleUs: number, maxUs: number): void {
    if (idleUs > this.pollLimitUs && idleUs <= maxUs) {
      this.pollLimitUs = Math.min(maxUs, Math.max(HALTPOLL_GROW_START_US, this.pollLimitUs * HALTPOLL_GROW));
    } else if (idleUs > maxUs) {
      const shrunk = this.pollLimitUs / HALTPOLL_SHRINK;
      this.pollLimitUs = shrunk < HALTPOLL_GROW_START_US ? 0 : shrunk;
    }
  }

  /** Kick this vCPU from outside, e.g. to make it notice a stop request (vcpu_kick). */
  kick(): void {
    kickVcpu(this.domain, this.id);
  }
}

/**
 * The machine's CPU pressure (Linux PSI, /proc/pressure/cpu "some"): the
 * share of time some task, in this process or another, waited for a CPU.
 * HOST_AWAKE sees only xenpv's vCPUs; this sees everyone else. Where the
 * file is missing, pressure is never high.
 */
export class CpuPressure {
  private readonly buf = Buffer.alloc(128);
  private lastMs = 0;
  private lastTotalUs = 0;
  private isHigh = false;

  /**
   * The file is opened for each look (every PRESSURE_SAMPLE_MS at most, a
   * few microseconds): a descriptor kept per vCPU would outlive its thread,
   * since descriptors belong to the process.
   */
  constructor(private file: string | null) {}

  /** Whether tasks waited for a CPU more than PRESSURE_HIGH of the time since the last sample (at most every PRESSURE_SAMPLE_MS). */
  high(): boolean {
    if (this.file === null) return false;
    const now = performance.now();
    if (now - this.lastMs < PRESSURE_SAMPLE_MS) return this.isHigh;
    const total = this.read(this.file);
    if (total < 0) {
      this.file = null;
      return false;
    }
    if (this.lastMs !== 0) this.isHigh = (total - this.lastTotalUs) / ((now - this.lastMs) * 1000) > PRESSURE_HIGH;
    this.lastMs = now;
    this.lastTotalUs = total;
    return this.isHigh;
  }

  /** The "some" line's total= now, in microseconds; -1 if unreadable. */
  totalUs(): number {
    return this.file === null ? -1 : this.read(this.file);
  }

  private read(file: string): number {
    let n: number;
    try {
      const fd = openSync(file, 'r');
      try {
        n = readSync(fd, this.buf, 0, this.buf.length, 0);
      } finally {
        closeSync(fd);
      }
    } catch {
      return -1;
    }
    const at = this.buf.indexOf('total=');
    if (at < 0 || at >= n) return -1;
    let v = 0;
    for (let i = at + 6; i < n; i++) {
      const c = this.buf[i]! - 48;
      if (c < 0 || c > 9) break;
      v = v * 10 + c;
    }
    return v;
  }
}
