// The deterministic runner, in the manner of FoundationDB's simulation:
// every domain's kernel runs in the main thread, and a scheduler decides,
// one step at a time, what runs next: a vCPU whose wake word was kicked, a
// due timer, a message between dom0 and the machine, a kernel's boot. The
// choice among runnable tasks comes from a seeded Rng; time is virtual and
// advances only by a seeded cost per step and by jumping to the next timer
// when nothing is runnable; and faults that Xen allows are injected from a
// second stream of the same seed. Each step runs to the end of its promise
// continuations before the next is chosen, so the same seed replays the same
// run, and the digest (sha256 over every decision, every fault and every
// console byte) shows that it did.
//
// What Xen allows, and so what the faults are:
// - spurious: an event on a bound interdomain port that its peer did not
//   send, or an upcall with nothing pending;
// - delay: a kicked vCPU, or a message to or from dom0's toolstack, waits a
//   while before it runs (the host was busy elsewhere);
// - deschedule: a whole domain stops for a while, timers included, as a
//   vCPU does on an oversubscribed host;
// - actions the machine registers, such as vbd-restart (a block backend
//   killed and started again while the guest runs).
// The order of runnable vCPUs is itself the seed's choice on every step.

import { createHash, type Hash } from 'node:crypto';
import { DOMID_SELF } from '../abi/xen.js';
import { EVTCHNSTAT_interdomain } from '../abi/event_channel.js';
import { XenError } from '../errors.js';
import { Rng } from '../fuzz/rng.js';
import { logger } from '../log.js';
import { D, DomainState, MAX_EVTCHNS, VCPU_BLOCKED, VCPU_WAKE, type Domain } from '../hypervisor/domain.js';
import * as evtchn from '../hypervisor/evtchn.js';
import type { DomainHandle, Hypervisor } from '../hypervisor/hypervisor.js';
import type { KernelContext, KernelModule, KernelVcpu, Runner, RunnerEvents, StartSpec } from '../hypervisor/runner.js';
import { install, real, uninstall, VirtualTimer, type ClockOwner } from './clock.js';
import { traceDomain } from '../trace/trace.js';

const log = logger('sim');
const trace = logger('sim', 'steps');

export const FAULT_KINDS = ['spurious', 'delay', 'deschedule', 'vbd-restart'] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];

export type SimOptions = {
  /** Names the run: the same seed, the same schedule and faults. */
  seed: number;
  /** The faults to inject; none by default. */
  faults?: readonly FaultKind[];
  /** Told of each fault as it is injected. */
  onFault?: (f: FaultRecord) => void;
};

export type FaultRecord = { step: number; timeMs: number; kind: FaultKind; detail: string };

/** A fault the machine carries out (a backend restart): a description, and its completion. */
export type FaultAction = (rng: Rng) => { detail: string; done: Promise<unknown> } | null;

/** `--faults`: a comma-separated list of kinds, `all`, or `none`. */
export function parseFaults(list: string): FaultKind[] {
  if (list === 'none' || list === '') return [];
  if (list === 'all') return [...FAULT_KINDS];
  const kinds = list.split(',').map((s) => s.trim());
  for (const k of kinds) {
    if (!(FAULT_KINDS as readonly string[]).includes(k)) throw new XenError('EINVAL', `unknown fault ${k}; faults are ${FAULT_KINDS.join(', ')}, all, none`);
  }
  return [...new Set(kinds)] as FaultKind[];
}

/**
 * Virtual time a step costs, in microseconds: time moves on while vCPUs keep
 * busy, by a seeded amount of the order of an event's round trip between two
 * threads, so that timers and work interleave differently from seed to seed.
 */
const STEP_US_MIN = 1;
const STEP_US_MAX = 100;
/** A jump to the next timer moves at least this far. */
const TICK_MS = 0.001;
/** The wall clock at virtual time 0 (Date.now of a simulation). */
const EPOCH_MS = Date.UTC(2025, 0, 1);
/** kickVcpu sets a vCPU's wake word to this (KICKED). */
const WAKE_KICKED = 1;
/** The machine's own code (the CLI, a test) is a pseudo-domain with this id. */
const HOST_ID = -1;

/** How often each fault strikes: per step, per kick, per message. */
const P_SPURIOUS = 1 / 150;
const P_DESCHEDULE = 1 / 400;
const P_DELAY = 1 / 12;
const P_ACTION = 1 / 250;
const DELAY_MAX_MS = 5;
const DESCHEDULE_MAX_MS = 20;
/** Faults kept for the summary; a long run keeps counting past them. */
const MAX_FAULT_RECORDS = 10_000;

type Delivery = { at: number; toKernel: boolean; deliver: () => void };

/** A domain as the scheduler keeps it: its vCPUs, timers, inbox. */
class SimDomain {
  /** Due order; equal due times in the order they were set, as Node fires them. */
  readonly timers: VirtualTimer[] = [];
  readonly inbox: Delivery[] = [];
  readonly vcpus: SimVcpu[] = [];
  handler: ((m: unknown) => void) | null = null;
  boot: (() => void) | null = null;
  /** A deschedule fault holds every task of the domain until this time. */
  heldUntil = 0;
  alive = true;
  cpuMs = 0;

  constructor(
    readonly domid: number,
    readonly d: Domain | null,
  ) {}
}

/** A vCPU under the scheduler: halt() parks it until a step resumes it. */
class SimVcpu implements KernelVcpu {
  private resume: (() => void) | null = null;
  deadline = Infinity;
  /** A delay fault: the kick is seen but the vCPU runs no sooner than this. */
  wakeAt = 0;
  /** The current kick was already considered for a delay. */
  seen = false;
  private readonly wake: number;
  private readonly blocked: number;

  constructor(
    readonly dom: SimDomain,
    readonly id: number,
    private readonly d: Domain,
    private readonly now: () => number,
  ) {
    this.wake = d.vcpuWord(id, VCPU_WAKE);
    this.blocked = d.vcpuWord(id, VCPU_BLOCKED);
  }

  get halted(): boolean {
    return this.resume !== null;
  }

  kicked(): boolean {
    return Atomics.load(this.d.ctl, this.wake) === WAKE_KICKED;
  }

  halt(timeoutMs = Infinity): Promise<void> {
    if (this.resume !== null) return Promise.reject(new XenError('EBUSY', `vcpu ${this.id} halted twice`));
    Atomics.store(this.d.ctl, this.blocked, 1);
    this.deadline = this.now() + timeoutMs;
    return new Promise((resolve) => (this.resume = resolve));
  }

  kick(): void {
    Atomics.store(this.d.ctl, this.wake, WAKE_KICKED);
  }

  /** The step that runs this vCPU: clear the kick and return from halt(). */
  run(): void {
    const resume = this.resume;
    this.resume = null;
    this.wakeAt = 0;
    this.seen = false;
    Atomics.store(this.d.ctl, this.blocked, 0);
    Atomics.store(this.d.ctl, this.wake, 0);
    resume?.();
  }
}

type Task = { dom: SimDomain; name: string; run: () => void };

export class SimRunner implements Runner, ClockOwner {
  readonly kind = 'deterministic';
  readonly seed: number;
  readonly epochMs = EPOCH_MS;
  private readonly rng: Rng;
  /** Faults draw from their own stream, so turning one on does not reshuffle every choice. */
  private readonly frng: Rng;
  /** What Math.random and crypto's random functions return. */
  private readonly erng: Rng;
  private readonly kinds: Set<FaultKind>;
  private readonly hash: Hash = createHash('sha256');
  private hv!: Hypervisor;
  private events!: RunnerEvents;
  private readonly host = new SimDomain(HOST_ID, null);
  private readonly domains = new Map<number, SimDomain>([[HOST_ID, this.host]]);
  private currentDom: SimDomain = this.host;
  /** The domain whose task runs now (a trace's records carry it). */
  private get current(): SimDomain {
    return this.currentDom;
  }
  private set current(dom: SimDomain) {
    this.currentDom = dom;
    traceDomain(dom.domid);
  }
  private nowMs = 0;
  private nextTimerId = 1;
  private readonly timersById = new Map<number, VirtualTimer>();
  /** Work outside the simulation (module loads): no step runs until it is done. */
  private readonly externals = new Set<Promise<unknown>>();
  private externalOwner: SimDomain = this.host;
  private readonly actions = new Map<FaultKind, { fn: FaultAction; busy: boolean }>();
  private readonly idleWaiters: Array<() => void> = [];
  private looping = false;
  private stopped = false;
  steps = 0;
  /** The first MAX_FAULT_RECORDS faults injected (each is in the digest and told to onFault). */
  readonly faults: FaultRecord[] = [];
  faultCount = 0;

  constructor(private readonly opts: SimOptions) {
    this.seed = opts.seed;
    this.rng = new Rng(opts.seed);
    this.frng = new Rng((opts.seed ^ 0x5bd1e995) >>> 0);
    this.erng = new Rng((opts.seed ^ 0x27d4eb2f) >>> 0);
    this.kinds = new Set(opts.faults ?? []);
  }

  // --- Runner ---------------------------------------------------------------

  bind(host: { hv: Hypervisor }, events: RunnerEvents): void {
    this.hv = host.hv;
    this.events = events;
    // Every domain shares this thread: a hypercall must not block it.
    this.hv.vcpusBlock = false;
    install(this);
    process.on('unhandledRejection', this.onRejection);
    this.hash.update(`seed ${this.seed} faults ${[...this.kinds].join(',')}\n`);
  }

  added(_h: DomainHandle): void {
    // One Hypervisor view serves every domain here.
  }

  removed(_domid: number): void {}

  start(spec: StartSpec): void {
    const d = this.hv.domain(spec.domid);
    if (d === undefined) throw new XenError('ESRCH', `no domain ${spec.domid}`);
    const dom = new SimDomain(spec.domid, d);
    this.domains.set(spec.domid, dom);
    const ctx = this.context(dom, spec);
    dom.boot = () => {
      dom.boot = null;
      this.external(dom, import(spec.kernel))
        .then((mod) => (dom.alive ? (mod as KernelModule).main(ctx) : undefined))
        .catch((err: unknown) => this.fail(dom, err));
    };
    this.poke();
  }

  running(domid: number): boolean {
    return this.domains.get(domid)?.alive === true;
  }

  post(domid: number, message: unknown): void {
    const dom = this.domains.get(domid);
    if (dom === undefined || !dom.alive || domid === HOST_ID) throw new XenError('ESRCH', `domain ${domid} is not running`);
    const m = structuredClone(message);
    this.enqueue(dom, true, () => dom.handler?.(m), `to dom${domid}`);
  }

  async destroy(domid: number): Promise<void> {
    const dom = this.domains.get(domid);
    if (dom === undefined || dom === this.host) return;
    const wasAlive = dom.alive;
    this.kill(dom);
    this.domains.delete(domid);
    if (wasAlive) this.toHost(() => this.events.exited(domid, null));
  }

  cpuTimeMs(domid: number): number {
    return this.domains.get(domid)?.cpuMs ?? 0;
  }

  async shutdown(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    for (const dom of this.domains.values()) if (dom !== this.host) this.kill(dom);
    process.off('unhandledRejection', this.onRejection);
    uninstall(this);
    for (const w of this.idleWaiters.splice(0)) w();
    log('seed %d: stopped after %d steps, %s ms virtual', this.seed, this.steps, this.nowMs.toFixed(3));
  }

  // --- what the machine and tests see ---------------------------------------

  /** sha256 over the seed, every decision, every fault and every note: equal digests, equal runs. */
  digest(): string {
    return this.hash.copy().digest('hex');
  }

  /** Fold something the run produced (console output) into the digest. */
  note(what: string, data: string): void {
    this.hash.update(`@${this.steps} ${what} ${data.length}\n`);
    this.hash.update(data);
  }

  /** Virtual time. */
  timeMs(): number {
    return this.nowMs;
  }

  /** Register a fault the machine carries out; injected only when its kind was asked for. */
  action(kind: FaultKind, fn: FaultAction): void {
    this.actions.set(kind, { fn, busy: false });
  }

  /** Called once each time nothing can run and no timer is set: every domain waits on another. */
  onIdle(fn: () => void): void {
    this.idleWaiters.push(fn);
  }

  // --- the kernel's side ----------------------------------------------------

  private context(dom: SimDomain, spec: StartSpec): KernelContext {
    const d = dom.d!;
    return {
      domid: spec.domid,
      hv: this.hv,
      args: structuredClone(spec.args),
      vcpu: (id) => {
        let v = dom.vcpus.find((x) => x.id === id);
        if (v === undefined) dom.vcpus.push((v = new SimVcpu(dom, id, d, () => this.nowMs)));
        return v;
      },
      post: (message) => {
        const m = structuredClone(message);
        this.enqueue(this.host, false, () => this.events.message(dom.domid, m, (r) => this.post(dom.domid, r)), `from dom${dom.domid}`);
      },
      onMessage: (handler) => {
        dom.handler = handler;
      },
      // One process stdout for every domain: images print with guest.print.
      routeStdout: () => undefined,
      load: (url) => this.external(dom, import(url)),
      exit: () => {
        if (dom.alive) {
          this.kill(dom);
          this.toHost(() => this.events.exited(dom.domid, null));
        }
        return new Promise<never>(() => undefined);
      },
    };
  }

  /** A domain stops for good: its tasks are dropped and its halted vCPUs never resume. */
  private kill(dom: SimDomain): void {
    dom.alive = false;
    dom.boot = null;
    for (const t of dom.timers) {
      t.cancelled = true;
      this.timersById.delete(t.id);
    }
    dom.timers.length = 0;
    dom.inbox.length = 0;
  }

  private fail(dom: SimDomain, err: unknown): void {
    const error = err instanceof Error ? err : new Error(String(err));
    if (dom === this.host) {
      // The machine's own code failed: that is no domain's crash.
      real.setImmediate(() => {
        throw error;
      });
      return;
    }
    if (!dom.alive) return;
    log('dom%d crashed at step %d: %s', dom.domid, this.steps, error.message);
    this.kill(dom);
    this.toHost(() => this.events.exited(dom.domid, error));
  }

  /** A rejection nobody handled ends the domain whose step it came from, as it ends a worker. */
  private readonly onRejection = (reason: unknown): void => {
    this.fail(this.current, reason);
  };

  private external<T>(dom: SimDomain, p: Promise<T>): Promise<T> {
    const settled: Promise<unknown> = p.then(
      () => this.externals.delete(settled),
      () => this.externals.delete(settled),
    );
    this.externals.add(settled);
    this.externalOwner = dom;
    this.poke();
    return p;
  }

  private enqueue(dom: SimDomain, toKernel: boolean, deliver: () => void, what: string): void {
    let at = this.nowMs;
    if (this.kinds.has('delay') && this.frng.chance(P_DELAY)) {
      const by = this.frng.range(1, DELAY_MAX_MS * 1000) / 1000;
      at += by;
      this.fault('delay', `message ${what} by ${by.toFixed(3)} ms`);
    }
    dom.inbox.push({ at, toKernel, deliver });
    this.poke();
  }

  /** Tell the machine something the runner saw (an exit, a crash), as a worker's events do. */
  private toHost(deliver: () => void): void {
    this.host.inbox.push({ at: this.nowMs, toKernel: false, deliver });
    this.poke();
  }

  // --- the clock ------------------------------------------------------------

  now(): number {
    return this.nowMs;
  }

  add(fire: () => void, delayMs: number, repeat: boolean): VirtualTimer {
    const owner = this.current;
    const t = new VirtualTimer(this, this.nextTimerId++, owner.domid, this.nowMs + delayMs, delayMs, repeat, fire);
    if (!owner.alive || this.stopped) {
      t.cancelled = true;
      return t;
    }
    this.timersById.set(t.id, t);
    this.insert(owner, t);
    this.poke();
    return t;
  }

  private insert(dom: SimDomain, t: VirtualTimer): void {
    const q = dom.timers;
    let lo = 0;
    let hi = q.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const m = q[mid]!;
      if (m.due < t.due || (m.due === t.due && m.id < t.id)) lo = mid + 1;
      else hi = mid;
    }
    q.splice(lo, 0, t);
  }

  private unlink(t: VirtualTimer): SimDomain | undefined {
    const dom = this.domains.get(t.owner);
    if (dom === undefined) return undefined;
    const i = dom.timers.indexOf(t);
    if (i >= 0) dom.timers.splice(i, 1);
    return dom;
  }

  rearm(t: VirtualTimer, due: number): void {
    if (t.cancelled) return;
    const dom = this.unlink(t);
    t.due = due;
    if (dom !== undefined) this.insert(dom, t);
  }

  cancel(t: VirtualTimer): void {
    if (t.cancelled) return;
    t.cancelled = true;
    this.timersById.delete(t.id);
    this.unlink(t);
  }

  byId(id: number): VirtualTimer | undefined {
    return this.timersById.get(id);
  }

  entropy(): number {
    return this.erng.u32();
  }

  private fire(dom: SimDomain, t: VirtualTimer): void {
    dom.timers.shift();
    if (t.repeat) {
      t.due = this.nowMs + t.delayMs;
      this.insert(dom, t);
    } else {
      t.cancelled = true;
      this.timersById.delete(t.id);
    }
    t.fire();
  }

  // --- the scheduler --------------------------------------------------------

  private poke(): void {
    if (this.looping || this.stopped) return;
    this.looping = true;
    this.loop().catch((err: unknown) => {
      this.looping = false;
      real.setImmediate(() => {
        throw err;
      });
    });
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      // One macrotask per step: the last step's continuations have all run.
      await new Promise<void>((resolve) => real.setImmediate(resolve));
      if (this.stopped) break;
      if (this.externals.size > 0) {
        this.current = this.externalOwner;
        await Promise.all([...this.externals]);
        continue;
      }
      if (this.step() || this.advance()) continue;
      this.looping = false;
      this.current = this.host;
      log('seed %d: idle at step %d, %s ms', this.seed, this.steps, this.nowMs.toFixed(3));
      for (const w of this.idleWaiters) w();
      return;
    }
    this.looping = false;
  }

  private schedulable(dom: SimDomain): boolean {
    if (dom === this.host) return true;
    return dom.alive && Atomics.load(dom.d!.ctl, D.state) === DomainState.running;
  }

  /** Run one task the seed picks among the runnable ones; false when none is. */
  private step(): boolean {
    this.injectFaults();
    const tasks = this.runnable();
    if (tasks.length === 0) return false;
    const task = tasks[this.rng.int(tasks.length)]!;
    this.steps++;
    this.hash.update(`${this.steps} ${task.name}\n`);
    trace('%d %s ms: %s of %d', this.steps, this.nowMs.toFixed(3), task.name, tasks.length);
    const costMs = this.rng.range(STEP_US_MIN, STEP_US_MAX) / 1000;
    this.nowMs += costMs;
    task.dom.cpuMs += costMs;
    this.current = task.dom;
    try {
      task.run();
    } catch (err) {
      this.fail(task.dom, err);
    }
    return true;
  }

  private runnable(): Task[] {
    const now = this.nowMs;
    const tasks: Task[] = [];
    for (const dom of this.domains.values()) {
      if (!this.schedulable(dom) || dom.heldUntil > now) continue;
      const id = dom.domid;
      if (dom.boot !== null) tasks.push({ dom, name: `boot ${id}`, run: dom.boot });
      for (const v of dom.vcpus) {
        if (!v.halted) continue;
        const kicked = v.kicked();
        if (kicked && !v.seen) this.maybeDelay(v);
        if ((kicked && v.wakeAt <= now) || v.deadline <= now) tasks.push({ dom, name: `vcpu ${id}.${v.id}`, run: () => v.run() });
      }
      const t = dom.timers[0];
      if (t !== undefined && t.due <= now) tasks.push({ dom, name: `timer ${id}#${t.id}`, run: () => this.fire(dom, t) });
      const m = dom.inbox[0];
      if (m !== undefined && m.at <= now && (!m.toKernel || dom.handler !== null)) {
        tasks.push({ dom, name: `msg ${id}`, run: () => dom.inbox.shift()!.deliver() });
      }
    }
    return tasks;
  }

  /** Nothing runnable: jump to the earliest time something will be; false when nothing will. */
  private advance(): boolean {
    let next = Infinity;
    let live = false;
    for (const dom of this.domains.values()) {
      if (!this.schedulable(dom)) continue;
      const at = (t: number): void => {
        next = Math.min(next, Math.max(t, dom.heldUntil));
      };
      if (dom.boot !== null) {
        at(this.nowMs);
        live = true;
      }
      for (const v of dom.vcpus) {
        if (!v.halted) continue;
        if (v.kicked()) at(v.wakeAt);
        else if (v.deadline !== Infinity) at(v.deadline);
        else continue;
        live = true;
      }
      if (dom.timers[0] !== undefined) at(dom.timers[0].due);
      if (dom.timers.some((t) => t.hasRef())) live = true;
      const m = dom.inbox[0];
      if (m !== undefined && (!m.toKernel || dom.handler !== null)) {
        at(m.at);
        live = true;
      }
    }
    if (!live || next === Infinity) return false;
    this.nowMs = Math.max(next, this.nowMs + TICK_MS);
    return true;
  }

  // --- faults ---------------------------------------------------------------

  private fault(kind: FaultKind, detail: string): void {
    const f: FaultRecord = { step: this.steps, timeMs: this.nowMs, kind, detail };
    this.faultCount++;
    if (this.faults.length < MAX_FAULT_RECORDS) this.faults.push(f);
    this.hash.update(`fault ${f.step} ${kind} ${detail}\n`);
    log('step %d (%s ms): %s %s', f.step, f.timeMs.toFixed(3), kind, detail);
    this.opts.onFault?.(f);
  }

  private maybeDelay(v: SimVcpu): void {
    v.seen = true;
    if (!this.kinds.has('delay') || !this.frng.chance(P_DELAY)) return;
    const by = this.frng.range(1, DELAY_MAX_MS * 1000) / 1000;
    v.wakeAt = this.nowMs + by;
    this.fault('delay', `wake-up of vcpu ${v.dom.domid}.${v.id} by ${by.toFixed(3)} ms`);
  }

  private guests(): SimDomain[] {
    return [...this.domains.values()].filter((dom) => dom !== this.host && this.schedulable(dom));
  }

  private injectFaults(): void {
    if (this.kinds.size === 0) return;
    if (this.kinds.has('spurious') && this.frng.chance(P_SPURIOUS)) this.spurious();
    if (this.kinds.has('deschedule') && this.frng.chance(P_DESCHEDULE)) this.deschedule();
    for (const [kind, a] of this.actions) {
      if (!this.kinds.has(kind) || a.busy || !this.frng.chance(P_ACTION)) continue;
      const previous = this.current;
      this.current = this.host;
      const r = a.fn(this.frng);
      this.current = previous;
      if (r === null) continue;
      a.busy = true;
      this.fault(kind, r.detail);
      r.done.then(
        () => log('%s done: %s', kind, r.detail),
        (err: Error) => log('%s failed: %s: %s', kind, r.detail, err.message),
      ).finally(() => (a.busy = false));
    }
  }

  /** An event its peer did not send on a bound port, or an upcall with none pending. */
  private spurious(): void {
    const doms = this.guests();
    if (doms.length === 0) return;
    const dom = this.frng.pick(doms);
    const d = dom.d!;
    const ports: number[] = [];
    for (let port = 1; port < MAX_EVTCHNS; port++) {
      const op = { dom: DOMID_SELF, port, status: 0, vcpu: 0, u: { unbound: { dom: 0 }, interdomain: { dom: 0, port: 0 }, virq: 0 } };
      if (evtchn.status(d, op, this.hv.lookup) === 0 && op.status === EVTCHNSTAT_interdomain) ports.push(port);
    }
    if (ports.length > 0 && this.frng.chance(0.75)) {
      const port = this.frng.pick(ports);
      evtchn.setPending(d, port);
      this.fault('spurious', `event on dom${dom.domid} port ${port}`);
    } else if (dom.vcpus.length > 0) {
      const v = this.frng.pick(dom.vcpus);
      v.kick();
      this.fault('spurious', `upcall of vcpu ${dom.domid}.${v.id} with nothing pending`);
    }
  }

  private deschedule(): void {
    const doms = this.guests();
    if (doms.length === 0) return;
    const dom = this.frng.pick(doms);
    const forMs = this.frng.range(1, DESCHEDULE_MAX_MS * 1000) / 1000;
    dom.heldUntil = this.nowMs + forMs;
    this.fault('deschedule', `dom${dom.domid} for ${forMs.toFixed(3)} ms`);
  }
}
