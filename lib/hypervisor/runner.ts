// The vCPU runner: how the machine runs each domain's kernel. The
// hypervisor, the kernels and the backends are written against this small
// interface, not against worker_threads, so the same code runs under either
// runner:
// - threads (lib/hypervisor/threads.ts, the default): a worker thread per
//   domain, real parallelism;
// - deterministic (lib/sim/sim.ts): every domain in the main thread, a seeded
//   scheduler picking the next runnable vCPU, timer or message, virtual time
//   and fault injection, so a run replays exactly from its seed.
// Memory is SharedArrayBuffers under both. Pause is the hypervisor's
// (XEN_DOMCTL_pausedomain sets the domain's state word and kicks its vCPUs);
// a runner honours it: a paused domain's vCPU does not come back from
// halt(), and under the deterministic runner its timers wait too. Timers
// are the standard globals (setTimeout, Date.now, performance.now,
// AbortSignal.timeout): the deterministic runner replaces them with
// virtual-time ones while it owns the process, so kernels, backends and
// guest images need no clock handed down.

import type { DomainHandle, Hypervisor } from './hypervisor.js';

/**
 * A vCPU as its kernel runs it: it idles in halt() until the hypervisor kicks
 * it (an event became pending, evtchn.ts kickVcpu sets its wake word) and
 * then runs the upcall. While its domain is paused, halt() does not return.
 */
export type KernelVcpu = {
  readonly id: number;
  /** Sleep until kicked or `timeoutMs` passes; clears the kick so the next one is seen. */
  halt(timeoutMs?: number): Promise<void>;
  /** Make a halted vCPU return from halt() (vcpu_kick). */
  kick(): void;
};

/** What a domain's kernel gets from the runner that runs it. */
export type KernelContext = {
  domid: number;
  /** The hypervisor as this kernel's CPU sees it: hypercalls run in the caller. */
  hv: Hypervisor;
  args: unknown;
  /** vCPU `id` of this domain. */
  vcpu(id: number): KernelVcpu;
  /** Send a message to the machine (dom0's toolstack answers and calls it this way). */
  post(message: unknown): void;
  /** Where the machine's messages go. */
  onMessage(handler: (message: unknown) => void): void;
  /**
   * Send what the image writes to its own stdout (console.log) to `write`.
   * The threads runner can (a domain owns its thread's stdout); the
   * deterministic one cannot tell domains apart there, so images that must
   * run under it use guest.print and guest.write.
   */
  routeStdout(write: (chunk: string | Uint8Array) => void): void;
  /** Import a module (the guest image); under the deterministic runner the simulation waits for it. */
  load(url: string): Promise<unknown>;
  /** The domain's vCPUs stop for good (after SCHEDOP_shutdown); never resolves. */
  exit(): Promise<never>;
};

/** A kernel: the module a domain's vCPU 0 starts in. */
export type KernelModule = { main(ctx: KernelContext): Promise<void> | void };

/** What the runner tells the machine. */
export type RunnerEvents = {
  /** A domain's kernel ended (exit or destroy), or crashed with `error`. */
  exited(domid: number, error: Error | null): void;
  /** A message from a domain's kernel; `reply` posts back to it. */
  message(domid: number, message: unknown, reply: (m: unknown) => void): void;
};

/** A domain to start: its kernel module URL and arguments. */
export type StartSpec = { domid: number; kernel: string; args: unknown };

/** The machine's side of a runner. */
export type Runner = {
  readonly kind: 'threads' | 'deterministic';
  /** Called once by the Host that owns this runner. */
  bind(host: { hostBlock: SharedArrayBuffer; hv: Hypervisor; handles(): DomainHandle[] }, events: RunnerEvents): void;
  /** Every running kernel learns of a new domain, or of one that is gone. */
  added(h: DomainHandle): void;
  removed(domid: number): void;
  /** Start the domain's kernel on its vCPU 0. */
  start(spec: StartSpec): void;
  running(domid: number): boolean;
  post(domid: number, message: unknown): void;
  /** Stop the domain's vCPUs for good (XEN_DOMCTL_destroydomain's first half). */
  destroy(domid: number): Promise<void>;
  /** CPU time the domain's vCPUs used. */
  cpuTimeMs(domid: number): number;
  /** Stop every domain; for the end of a run. */
  shutdown(): Promise<void>;
};
