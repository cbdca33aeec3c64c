// A vCPU as a kernel sees it: something that sleeps until the hypervisor
// kicks it (an event became pending) and then runs the upcall. The thread
// runner sleeps in Atomics.waitAsync on the vCPU's wake word, so the thread's
// event loop keeps serving timers and messages meanwhile.

import { D, Domain, DomainState, VCPU_BLOCKED, VCPU_WAKE } from './domain.js';

export class Vcpu {
  private readonly ctl: Int32Array;
  private readonly wake: number;
  private readonly blocked: number;

  constructor(domain: Domain, readonly id: number) {
    this.ctl = domain.ctl;
    this.wake = domain.vcpuWord(id, VCPU_WAKE);
    this.blocked = domain.vcpuWord(id, VCPU_BLOCKED);
    if (id < 0 || id >= domain.maxVcpus) throw new RangeError(`vcpu ${id} does not exist`);
  }

  /** Sleep until kicked or `timeoutMs` passes; clears the kick so the next one is seen. */
  async halt(timeoutMs = Infinity): Promise<void> {
    Atomics.store(this.ctl, this.blocked, 1);
    const r = Atomics.waitAsync(this.ctl, this.wake, 0, timeoutMs);
    if (r.async) await r.value;
    Atomics.store(this.ctl, this.blocked, 0);
    Atomics.store(this.ctl, this.wake, 0);
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
    while (Atomics.load(this.ctl, D.state) === DomainState.paused) Atomics.wait(this.ctl, D.state, DomainState.paused);
    Atomics.add(this.ctl, D.pausedMs, Math.round(performance.now() - since));
  }

  /** Kick this vCPU from outside, e.g. to make it notice a stop request. */
  kick(): void {
    Atomics.store(this.ctl, this.wake, 1);
    Atomics.notify(this.ctl, this.wake);
  }
}
