// The machine: the main thread's part of the hypervisor. It allocates each
// domain's control block and memory, places the special pages, tells every
// kernel about the domain, and has its runner run each domain's vCPU (a
// worker thread each by default; lib/hypervisor/runner.ts). What a domain
// does once started is its kernel's business.

import { XenError } from '../errors.js';
import { logger } from '../log.js';
import { SHUTDOWN_crash } from '../abi/sched.js';
import { D, Domain, DomainState, MAX_GRANT_FRAMES, MAX_VCPUS, SPECIAL_PAGES, SpecialPage, VCPU_ONLINE, newControlBlock } from './domain.js';
import { DOMID_FIRST_RESERVED, HOST, HOST_WORDS, Hypervisor, domidWord, type DomainHandle } from './hypervisor.js';
import { EVTCHN_MASK, EVTCHN_MASK_BYTES, portsOf } from './evtchn.js';
import { mappingsOf } from './grant.js';
import { EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound } from '../abi/event_channel.js';
import { PAGE_SIZE } from './page.js';
import type { Runner } from './runner.js';
import { ThreadRunner } from './threads.js';
import { affinityOf, checkCpus, everyHostCpu, pinDomain, setAffinity, threadPlacement } from './affinity.js';

const log = logger('host');

export type DomainConfig = {
  name: string;
  memoryMiB: number;
  vcpus?: number;
  privileged?: boolean;
  maxGrantFrames?: number;
  /** The host CPUs the domain's thread may run on (xl.cfg `cpus`); every CPU when absent. */
  cpus?: readonly number[] | undefined;
};

export type HostEvents = {
  /** A domain's thread ended; `error` if its kernel threw (the domain crashed). */
  onExit?: (domid: number, error: Error | null) => void;
  /** A message from a domain's kernel to the machine (dom0's toolstack requests). */
  onMessage?: (domid: number, message: unknown, reply: (m: unknown) => void) => void;
};

const MIN_MEMORY_PAGES = SPECIAL_PAGES + 16;

export class Host {
  readonly hostBlock = new SharedArrayBuffer(HOST_WORDS * 4);
  readonly hv: Hypervisor;
  private readonly handles = new Map<number, DomainHandle>();
  /** The last generation of each domid used. */
  private readonly generations = new Map<number, number>();
  readonly names = new Map<number, string>();

  constructor(
    private readonly events: HostEvents = {},
    readonly runner: Runner = new ThreadRunner(),
  ) {
    this.hv = new Hypervisor(this.hostBlock, null);
    runner.bind({ hostBlock: this.hostBlock, hv: this.hv, handles: () => [...this.handles.values()] }, {
      exited: (domid, error) => {
        const d = this.hv.domain(domid);
        if (error !== null && d !== undefined) this.hv.shutdown(d, SHUTDOWN_crash);
        this.events.onExit?.(domid, error);
      },
      message: (domid, m, reply) => this.events.onMessage?.(domid, m, reply),
    });
  }

  /** XEN_DOMCTL_createdomain and the builder's memory setup: the domain starts paused. */
  createDomain(cfg: DomainConfig, domid?: number): DomainHandle {
    const nrPages = Math.floor((cfg.memoryMiB * 1024 * 1024) / PAGE_SIZE);
    if (!Number.isFinite(nrPages) || nrPages < MIN_MEMORY_PAGES) {
      throw new XenError('EINVAL', `memory ${cfg.memoryMiB} MiB is below the minimum of ${(MIN_MEMORY_PAGES * PAGE_SIZE) / 1048576} MiB`);
    }
    const vcpus = cfg.vcpus ?? 1;
    if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > MAX_VCPUS) throw new XenError('EINVAL', `vcpus must be 1..${MAX_VCPUS}`);
    if (cfg.cpus !== undefined) checkCpus(cfg.cpus);
    if (domid !== undefined && !this.reusable(domid)) throw new XenError('EEXIST', `domid ${domid} is in use`);
    const id = domid ?? this.allocDomid();
    const generation = (this.generations.get(id) ?? -1) + 1;
    const h: DomainHandle = { domid: id, control: newControlBlock(), memory: new SharedArrayBuffer(nrPages * PAGE_SIZE), generation };
    const d = new Domain(id, h.control, h.memory, generation);
    const ctl = d.ctl;
    ctl[D.domid] = id;
    ctl[D.nrPages] = nrPages;
    ctl[D.maxVcpus] = vcpus;
    ctl[D.privileged] = cfg.privileged === true ? 1 : 0;
    ctl[D.maxGrantFrames] = Math.min(cfg.maxGrantFrames ?? MAX_GRANT_FRAMES, MAX_GRANT_FRAMES);
    ctl[D.sharedInfoGfn] = d.specialBase + SpecialPage.sharedInfo;
    ctl[D.grantFrames] = d.specialBase + SpecialPage.grantFrame0;
    ctl[D.nrGrantFrames] = 1;
    for (let v = 0; v < vcpus; v++) ctl[d.vcpuWord(v, VCPU_ONLINE)] = 1;
    if (cfg.cpus !== undefined) setAffinity(ctl, cfg.cpus);
    // Every event starts masked, as Xen's shared_info does for an HVM guest.
    const mask = ctl[D.sharedInfoGfn]! * PAGE_SIZE + EVTCHN_MASK;
    d.mem.u8.fill(0xff, mask, mask + EVTCHN_MASK_BYTES);
    Atomics.store(ctl, D.state, DomainState.paused);
    this.handles.set(id, h);
    this.names.set(id, cfg.name);
    this.hv.add(h);
    this.generations.set(id, generation);
    Atomics.store(this.hv.host, HOST.domains + id, domidWord(generation, true));
    this.runner.added(h);
    log('created domain %d (%s): %d pages, %d vcpus', id, cfg.name, nrPages, vcpus);
    return h;
  }

  // domain_create's rover: the next domid after the last one handed out,
  // wrapping around below DOMID_FIRST_RESERVED, skipping any in use.
  private allocDomid(): number {
    for (let tries = 0; tries < DOMID_FIRST_RESERVED; tries++) {
      const id = ((Atomics.add(this.hv.host, HOST.nextDomid, 1) % (DOMID_FIRST_RESERVED - 1)) + 1);
      if (this.reusable(id)) return id;
    }
    throw new XenError('ENOSPC', 'no domain ids left');
  }

  /**
   * A domid may name a new domain once its last one is destroyed and nothing
   * of it is left in a live domain: no grant mapping of its pages, no port
   * naming it as the remote end. A new domain must inherit nothing (XSA-322's
   * rule, here for the hypervisor's tables: the toolstack and xenstored clean
   * theirs).
   */
  private reusable(id: number): boolean {
    if (!Number.isInteger(id) || id < 0 || id >= DOMID_FIRST_RESERVED) return false;
    const word = Atomics.load(this.hv.host, HOST.domains + id);
    if (word === 0) return true;
    if ((word & 1) !== 0) return false;
    for (const h of this.handles.values()) {
      const d = this.hv.domain(h.domid);
      if (d === undefined) continue;
      if (mappingsOf(d).some((m) => m.domid === id)) return false;
      if (portsOf(d).some((p) => (p.state === EVTCHNSTAT_interdomain || p.state === EVTCHNSTAT_unbound) && p.remote === id)) return false;
    }
    return true;
  }

  domain(domid: number): Domain {
    const d = this.hv.domain(domid);
    if (d === undefined) throw new XenError('ESRCH', `no domain ${domid}`);
    return d;
  }

  /** Unpause for the first time: the runner starts the domain's vCPU running `kernel` (a module URL). */
  start(domid: number, kernel: string, args: unknown): void {
    const d = this.domain(domid);
    if (this.runner.running(domid)) throw new XenError('EEXIST', `domain ${domid} is already running`);
    Atomics.store(d.ctl, D.state, DomainState.running);
    this.runner.start({ domid, kernel, args });
  }

  /** `xl vcpu-pin`: the CPUs the domain may run on from now on (null: every CPU). */
  pin(domid: number, cpus: readonly number[] | null): Promise<void> {
    return pinDomain(this.domain(domid).ctl, cpus);
  }

  /** `xl vcpu-list`: the set the domain was given, and where its thread may run and last ran. */
  placement(domid: number): { cpus: number[] | null; allowed: number[] | null; everyCpu: boolean; cpu: number | null } {
    const ctl = this.domain(domid).ctl;
    const { allowed, cpu } = threadPlacement(ctl);
    // Judged here, against the CPUs of the process that runs the threads (a CLI under taskset sees fewer).
    const everyCpu = allowed !== null && everyHostCpu(allowed);
    return { cpus: affinityOf(ctl), allowed, everyCpu, cpu };
  }

  /** CPU time of a domain's vCPU. */
  cpuTimeMs(domid: number): number {
    return this.runner.cpuTimeMs(domid);
  }

  post(domid: number, message: unknown): void {
    this.runner.post(domid, message);
  }

  /** XEN_DOMCTL_destroydomain: stop the vCPU, drop its mappings and ports, forget it. */
  async destroy(domid: number): Promise<void> {
    const d = this.domain(domid);
    Atomics.store(d.ctl, D.state, DomainState.dying);
    await leaveHypervisor(d);
    await this.runner.destroy(domid);
    this.hv.teardown(d);
    Atomics.store(d.ctl, D.state, DomainState.dead);
    Atomics.store(this.hv.host, HOST.domains + domid, domidWord(d.generation, false));
    this.handles.delete(domid);
    this.names.delete(domid);
    this.runner.removed(domid);
    log('destroyed domain %d', domid);
  }

  /** Stop every domain; for the end of a run. */
  async shutdown(): Promise<void> {
    await this.runner.shutdown();
  }
}

/** How long a destroy waits for the dying domain's thread to leave the hypervisor (a hypercall takes microseconds). */
const LEAVE_HYPERVISOR_MS = 5_000;

/** Resolve once no hypercall of `d` is running (the dying state lets none start), or after LEAVE_HYPERVISOR_MS. */
async function leaveHypervisor(d: Domain): Promise<void> {
  const until = performance.now() + LEAVE_HYPERVISOR_MS;
  while (Atomics.load(d.ctl, D.inHypercall) > 0 && performance.now() < until) await new Promise((r) => setTimeout(r, 1));
  if (Atomics.load(d.ctl, D.inHypercall) > 0) log('domain %d still inside a hypercall after %d ms: stopped all the same', d.domid, LEAVE_HYPERVISOR_MS);
}
