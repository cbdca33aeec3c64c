// A whole host in one thread, for harnesses and tests that must replay from
// a seed: the hypervisor, dom0 (xenstored, the toolstack, blkback, the
// console backend) and guests booted in-process through the real xen(4)
// attach. No vCPU runs by itself: pump() runs each domain's upcall in domid
// order, and run(p) pumps until `p` settles, so the same calls in the same
// order make the same run. The interrupt layers' throttles run on a virtual
// clock that moves only when the world moves it; real timers (xenstore
// deadlines, a transaction's EAGAIN back-off) fire only on a hang.

import { setImmediate as immediate } from 'node:timers/promises';
import { vcpu_info, VIRQ_DOM_EXC } from '../abi/xen.js';
import { SHUTDOWN_crash } from '../abi/sched.js';
import { XS_INTRODUCE, XS_RELEASE } from '../abi/xs_wire.js';
import { BlkbackSet, defaultBlkbackOptions, type BlkbackFactory, type BlkbackOptions } from '../backends/blkback.js';
import { Bridges, FramePool } from '../backends/bridge.js';
import { ConsoleBackend } from '../backends/console.js';
import { localClient, StoreRings } from '../backends/dom0.js';
import { NetbackSet, type NetbackOptions } from '../backends/netback.js';
import { Toolstack, type DiskSpec, type DomainExit, type DomainSpec, type NicSpec } from '../backends/toolstack.js';
import { Xenstored } from '../backends/xenstored.js';
import { XenError } from '../errors.js';
import { Interrupts, type IntrClock } from '../evtchn/evtchn.js';
import { D, DomainState } from '../hypervisor/domain.js';
import { UPCALL_PENDING } from '../hypervisor/evtchn.js';
import { Host } from '../hypervisor/host.js';
import type { Hypercall } from '../hypervisor/hypercall.js';
import type { KernelContext } from '../hypervisor/runner.js';
import { PAGE_SIZE, type MemoryViews } from '../hypervisor/page.js';
import { Vcpu } from '../hypervisor/vcpu.js';
import { PhysMem } from '../xen/physmem.js';
import { initSharedInfo, probeDevices, ramPages, xenAttach, type XenSoftc } from '../xen/xen.js';
import { joinStrings } from '../xenstore/wire.js';
import type { XenStore } from '../xenstore/xenstore.js';

/** A run that does not settle within this much wall time is hung. */
const RUN_TIMEOUT_MS = 60_000;

/**
 * The world's time for the interrupt layers' throttles: it stands still
 * until the world moves it on, so a run does not depend on how fast it runs.
 */
export class VirtualClock implements IntrClock {
  private ms = 0;
  private seq = 0;
  private timers: { at: number; seq: number; fn: () => void }[] = [];

  now(): number {
    return this.ms;
  }

  after(ms: number, fn: () => void): void {
    this.timers.push({ at: this.ms + Math.max(0, ms), seq: this.seq++, fn });
    this.timers.sort((a, b) => a.at - b.at || a.seq - b.seq);
  }

  /** Milliseconds to the next timer, or null when none is set. */
  untilNext(): number | null {
    const t = this.timers[0];
    return t === undefined ? null : t.at - this.ms;
  }

  /** Move on by `ms`, running each timer that falls due, in order. */
  advance(ms: number): void {
    const end = this.ms + ms;
    for (let t = this.timers[0]; t !== undefined && t.at <= end; t = this.timers[0]) {
      this.timers.shift();
      this.ms = t.at;
      t.fn();
    }
    this.ms = end;
  }
}

/** dom0 as the world builds it: the pieces dom0's kernel (lib/backends/dom0.ts) puts together. */
export type WorldDom0 = {
  hypercall: Hypercall;
  mem: MemoryViews;
  physmem: PhysMem;
  intr: Interrupts;
  xsd: Xenstored;
  xs: XenStore;
  toolstack: Toolstack;
  vbds: BlkbackSet;
  consoles: ConsoleBackend;
  /** dom0's netbacks and bridges, when the world was asked for a network. */
  net: NetbackSet | null;
};

export type WorldOptions = {
  blkback?: Partial<BlkbackOptions>;
  /** Builds dom0's blkbacks; a test hands in a deliberately weakened one. */
  makeBlkback?: BlkbackFactory | undefined;
  dom0MemoryMiB?: number;
  /**
   * A network: netback's tunables (a harness sets its timeouts beyond any
   * run, so that no wall-clock timer decides one) and the bridges' ageing.
   */
  net?: { netback: NetbackOptions; ageingMs: number };
};

/** A guest to build: the xl config's fields, and whether its kernel probes device/ (attaching xbf) at boot. */
export type WorldGuestSpec = {
  name: string;
  memoryMiB?: number;
  extra?: string;
  disks?: DiskSpec[];
  vifs?: NicSpec[];
  /** false: the guest's kernel attaches nothing; a harness speaks for its devices. */
  probe?: boolean;
};

/** A kernel context for a guest whose vCPU the world pumps itself: no channel to a machine, no exit but a halt. */
function inProcessContext(host: Host, domid: number, args: unknown): KernelContext {
  const d = host.domain(domid);
  return {
    domid, hv: host.hv, args,
    vcpu: (id) => new Vcpu(d, id),
    post: () => undefined,
    onMessage: () => undefined,
    routeStdout: () => undefined,
    load: (url) => import(url),
    exit: () => new Promise<never>(() => undefined),
  };
}

type Cpu = { domid: number; intr: Interrupts; upcallPending: number; u8: Uint8Array };

export class World {
  readonly host = new Host();
  readonly clock = new VirtualClock();
  readonly dom0: WorldDom0;
  readonly guests = new Map<number, XenSoftc>();
  readonly exits: DomainExit[] = [];
  /** Every domain's vCPU 0, in domid order: pump() runs them in this order. */
  private cpus: Cpu[] = [];
  private readonly probe = new Map<string, boolean>();

  constructor(opts: WorldOptions = {}) {
    const host = this.host;
    host.createDomain({ name: 'Domain-0', memoryMiB: opts.dom0MemoryMiB ?? 16, privileged: true }, 0);
    const self = host.domain(0);
    const hypercall = host.hv.entry(0);
    const physmem = new PhysMem(self.mem, ramPages(hypercall));
    const gfn = initSharedInfo(hypercall, physmem);
    const intr = new Interrupts(hypercall, self.mem, gfn, new Vcpu(self, 0), 'dom0', this.clock);
    this.addCpu(0, intr, gfn, self.mem);
    const rings = new StoreRings(hypercall, intr);
    const xsd: Xenstored = new Xenstored({
      introduce: (domid, _gfn, evtchn) => rings.introduce(xsd, domid, evtchn),
      release: (domid) => rings.release(domid),
    });
    const xs = localClient({ domid: 0, hv: host.hv }, xsd, physmem);
    const consoles = new ConsoleBackend(hypercall, intr, () => undefined);
    const vbds = new BlkbackSet(hypercall, intr, xs, { ...defaultBlkbackOptions, ...opts.blkback }, opts.makeBlkback);
    let net: NetbackSet | null = null;
    if (opts.net !== undefined) {
      const bridges = new Bridges(new FramePool(hypercall, physmem));
      bridges.configure('xenbr0', { ageingMs: opts.net.ageingMs });
      net = new NetbackSet(hypercall, intr, xs, bridges, opts.net.netback);
    }
    const toolstack = new Toolstack(
      host.hv, hypercall, xs,
      {
        introduce: async (domid, gfn, evtchn) => void (await xs.cmd(XS_INTRODUCE, 0, joinStrings([String(domid), String(gfn), String(evtchn)]))),
        release: async (domid) => void (await xs.cmd(XS_RELEASE, 0, joinStrings([String(domid)]))),
      },
      consoles,
      {
        createDomain: async (spec) => host.createDomain({ name: spec.name, memoryMiB: spec.memoryMiB, vcpus: spec.vcpus }).domid,
        unpause: (domid, _kernel, args) => this.boot(domid, args as { name: string; extra: string }),
        destroy: (domid) => this.destroy(domid),
      },
      (exit) => this.exits.push(exit),
      'in-process',
      vbds,
      net,
    );
    const domExc = intr.virqEstablish(VIRQ_DOM_EXC, () => toolstack.domainException(), 'dom-exc');
    intr.intrUnmask(domExc);
    this.dom0 = { hypercall, mem: self.mem, physmem, intr, xsd, xs, toolstack, vbds, consoles, net };
  }

  private addCpu(domid: number, intr: Interrupts, sharedInfoGfn: number, mem: MemoryViews): void {
    const cpu = { domid, intr, upcallPending: sharedInfoGfn * PAGE_SIZE + 0 * vcpu_info.size + UPCALL_PENDING, u8: mem.u8 };
    this.cpus = [...this.cpus, cpu].sort((a, b) => a.domid - b.domid);
  }

  // What the toolstack's unpause starts: the guest kernel's xen_attach and probe, in this thread.
  private async boot(domid: number, args: { name: string; extra: string }): Promise<void> {
    const d = this.host.domain(domid);
    Atomics.store(d.ctl, D.state, DomainState.running);
    // A peer in this thread lets go of a grant before the granter revokes it, or never:
    // revocation does not wait (no timer may decide a run), a ref still mapped goes to quarantine at once.
    const gnttab = { removeRetries: 0 };
    const { sc } = xenAttach(inProcessContext(this.host, domid, args), args.name, args.extra, { idle: false, gnttab, clock: this.clock });
    this.guests.set(domid, sc);
    this.addCpu(domid, sc.intr, d.sharedInfoGfn, d.mem);
    if (this.probe.get(args.name) !== false) await probeDevices(sc);
  }

  /** XEN_DOMCTL_destroydomain: its vCPU stops for good, the hypervisor drops what it held. */
  private async destroy(domid: number): Promise<void> {
    this.cpus = this.cpus.filter((c) => c.domid !== domid);
    this.guests.delete(domid);
    await this.host.destroy(domid);
  }

  /** Run every domain whose upcall is pending, in domid order, until none is; true when any ran. */
  pump(): boolean {
    let ran = false;
    for (let again = true; again; ) {
      again = false;
      for (const c of this.cpus) {
        if (Atomics.load(c.u8, c.upcallPending) === 0) continue;
        c.intr.upcall();
        again = ran = true;
      }
    }
    return ran;
  }

  /** Pump and let the continuations run until nothing moves: every event delivered, every handler done. */
  async settle(): Promise<void> {
    for (let round = 0; ; round++) {
      const ran = this.pump();
      await immediate();
      if (!ran && !this.pending()) return;
      if (round > 1_000_000) throw new XenError('ETIMEDOUT', 'the world never settles: an event storm without end');
    }
  }

  /**
   * Settle, then let virtual time run on from timer to timer (ports held
   * masked by a throttle come back) while any is set, up to `maxMs`;
   * returns the virtual milliseconds that passed.
   */
  async drain(maxMs = 10_000): Promise<number> {
    await this.settle();
    let waited = 0;
    for (let next = this.clock.untilNext(); next !== null && waited + next <= maxMs; next = this.clock.untilNext()) {
      this.clock.advance(next);
      waited += next;
      await this.settle();
    }
    return waited;
  }

  private pending(): boolean {
    for (const c of this.cpus) if (Atomics.load(c.u8, c.upcallPending) !== 0) return true;
    return false;
  }

  /** Pump until `p` settles; ETIMEDOUT when it has not after RUN_TIMEOUT_MS of wall time (a hang). */
  async run<T>(p: Promise<T>, what = 'run'): Promise<T> {
    let done = false;
    const watched = p.finally(() => (done = true));
    watched.catch(() => undefined);
    const deadline = performance.now() + RUN_TIMEOUT_MS;
    while (!done) {
      const ran = this.pump();
      await immediate();
      // Nothing moves but a timer can: virtual time goes on to it.
      const next = this.clock.untilNext();
      if (!done && !ran && !this.pending() && next !== null) this.clock.advance(next);
      if (performance.now() > deadline) throw new XenError('ETIMEDOUT', `${what} did not finish in ${RUN_TIMEOUT_MS} ms`);
    }
    return watched;
  }

  /** Build and boot a guest with the toolstack (nodes, disks, xenstore, console), as `xl create`. */
  async createGuest(spec: WorldGuestSpec): Promise<XenSoftc> {
    this.probe.set(spec.name, spec.probe !== false);
    const full: DomainSpec = {
      name: spec.name, memoryMiB: spec.memoryMiB ?? 8, vcpus: 1, kernel: 'in-process', extra: spec.extra ?? '',
      onPoweroff: 'destroy', onReboot: 'destroy', onCrash: 'destroy', disks: spec.disks ?? [], vifs: spec.vifs ?? [],
    };
    const domid = await this.run(this.dom0.toolstack.create(full), `create ${spec.name}`);
    const sc = this.guests.get(domid);
    if (sc === undefined) throw new XenError('ESRCH', `${spec.name} did not boot`);
    return sc;
  }

  /**
   * The guest's kernel dies (a crash): its vCPU never runs again and the
   * hypervisor tells dom0, whose toolstack tears the domain down.
   */
  async crash(domid: number): Promise<DomainExit> {
    this.cpus = this.cpus.filter((c) => c.domid !== domid);
    this.guests.delete(domid);
    this.host.hv.shutdown(this.host.domain(domid), SHUTDOWN_crash);
    const wait = async (): Promise<DomainExit> => {
      for (;;) {
        const exit = this.exits.find((e) => e.domid === domid);
        if (exit !== undefined) return exit;
        await immediate();
      }
    };
    return this.run(wait(), `teardown of domain ${domid}`);
  }
}
