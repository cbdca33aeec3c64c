// The simulated Xen as one thread sees it. A hypercall runs in the calling
// thread, as Xen runs on the trapping CPU, on state every thread shares:
// the host block (which domids exist), each domain's control block and memory.
// A thread learns of new domains from the host over a MessagePort it drains
// synchronously (receiveMessageOnPort) the first time it meets an unknown
// domid; the host posts there before anyone can learn the domid elsewhere.

import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import {
  __HYPERVISOR_event_channel_op,
  __HYPERVISOR_grant_table_op,
  __HYPERVISOR_hvm_op,
  __HYPERVISOR_memory_op,
  __HYPERVISOR_sched_op,
  __HYPERVISOR_vcpu_op,
  __HYPERVISOR_xen_version,
  DOMID_SELF,
  VIRQ_DOM_EXC,
} from '../abi/xen.js';
import {
  EVTCHNOP_alloc_unbound,
  EVTCHNOP_bind_interdomain,
  EVTCHNOP_bind_vcpu,
  EVTCHNOP_bind_virq,
  EVTCHNOP_close,
  EVTCHNOP_send,
  EVTCHNOP_status,
  EVTCHNOP_unmask,
} from '../abi/event_channel.js';
import {
  GNTTABOP_copy,
  GNTTABOP_map_grant_ref,
  GNTTABOP_query_size,
  GNTTABOP_setup_table,
  GNTTABOP_unmap_grant_ref,
  GNTST_general_error,
  GNTST_okay,
  GNTST_permission_denied,
  GNTST_bad_domain,
} from '../abi/grant_table.js';
import {
  XENMEM_add_to_physmap,
  XENMEM_add_to_physmap_batch,
  XENMEM_current_reservation,
  XENMEM_maximum_reservation,
  XENMEM_memory_map,
  XENMAPSPACE_shared_info,
  XENMAPSPACE_grant_table,
  XENMAPSPACE_gmfn_foreign,
} from '../abi/memory.js';
import { HVMOP_get_param, HVMOP_set_param } from '../abi/hvm.js';
import {
  SCHEDOP_block,
  SCHEDOP_poll,
  SCHEDOP_remote_shutdown,
  SCHEDOP_shutdown,
  SCHEDOP_yield,
  SHUTDOWN_poweroff,
  SHUTDOWN_suspend,
  SHUTDOWN_watchdog,
} from '../abi/sched.js';
import { VCPUOP_down, VCPUOP_is_up, VCPUOP_up } from '../abi/vcpu.js';
import { XENVER_extraversion, XENVER_get_features, XENVER_version } from '../abi/version.js';
import { XEN_EBUSY, XEN_EINVAL, XEN_ENOENT, XEN_ENOSYS, XEN_EPERM, XEN_ESRCH, XEN_EFAULT } from '../abi/errno.js';
import { D, Domain, DomainState, HOST_AWAKE, MAX_GRANT_FRAMES, NR_HVM_PARAMS, SpecialPage, VCPU_BLOCKED, VCPU_ONLINE, VCPU_POLL, VCPU_WAKE, WAKE_IDLE, WAKE_SLEEPING } from './domain.js';
import * as evtchn from './evtchn.js';
import * as grant from './grant.js';
import { lock, unlock } from './lock.js';
import { FramePage, PAGE_SIZE, zeroBytes } from './page.js';
import type * as H from './hypercall.js';
import { XenError } from '../errors.js';

/** Words of the host block. */
export const HOST = {
  lock: 0,
  nextDomid: 1,
  /** vCPUs whose threads run or poll (VCPU_AWAKE set): a halting vCPU polls only while they fit the machine's CPUs. */
  awake: HOST_AWAKE,
  /** per domid: 0 never existed, 2g+1 domain of generation g exists, 2g+2 it was destroyed */
  domains: 16,
} as const;

/** The host block's word for a domid whose domain of `generation` exists (or was destroyed). */
export function domidWord(generation: number, alive: boolean): number {
  return generation * 2 + (alive ? 1 : 2);
}
export const DOMID_FIRST_RESERVED = 0x7ff0;
export const HOST_WORDS = HOST.domains + DOMID_FIRST_RESERVED;

export const XEN_VERSION_MAJOR = 4;
export const XEN_VERSION_MINOR = 17;
const XEN_EXTRAVERSION = '.0-xenpv';
const E820_RAM = 1;
const E820_RESERVED = 2;

/** A domain's shared buffers as they travel between threads. */
export type DomainHandle = { domid: number; control: SharedArrayBuffer; memory: SharedArrayBuffer; generation: number };
export type RegistryMessage = { add: DomainHandle } | { remove: number };

export class Hypervisor {
  readonly host: Int32Array;
  private readonly domains = new Map<number, Domain>();
  readonly lookup = (domid: number): Domain | undefined => this.domain(domid);
  private readonly oneCopy: H.gnttab_copy[] = [];
  /**
   * Whether a hypercall may block its vCPU's thread (SCHEDOP_block, SCHEDOP_poll,
   * a suspend). The deterministic runner runs every domain in one thread and
   * turns this off: block and poll then return at once, as after a spurious
   * wake-up, and a suspending vCPU stops (lib/sim/sim.ts).
   */
  vcpusBlock = true;
  /**
   * Set in a domain's own vCPU thread (thread.ts): a hypercall of the domain
   * once it is dying stops the thread there until the host ends it. Elsewhere
   * (the host's thread, the one-thread runners) it returns ESRCH.
   */
  parkDying = false;

  constructor(
    hostBlock: SharedArrayBuffer,
    private readonly registry: MessagePort | null,
    known: readonly DomainHandle[] = [],
  ) {
    this.host = new Int32Array(hostBlock);
    for (const h of known) this.add(h);
  }

  add(h: DomainHandle): Domain {
    const d = new Domain(h.domid, h.control, h.memory, h.generation, this.host);
    this.domains.set(h.domid, d);
    return d;
  }

  /**
   * The domain with this id, if it exists (a dying one included: its memory
   * is still there). A domid used again names a new domain: a thread that
   * still holds the old one's views learns of the new one from the registry.
   */
  domain(domid: number): Domain | undefined {
    if (!Number.isInteger(domid) || domid < 0 || domid >= DOMID_FIRST_RESERVED) return undefined;
    const known = Atomics.load(this.host, HOST.domains + domid);
    if ((known & 1) === 0) {
      if (known !== 0) this.domains.delete(domid);
      return undefined;
    }
    const generation = known >>> 1;
    let d = this.domains.get(domid);
    if ((d === undefined || d.generation !== generation) && this.registry !== null) {
      for (let m = receiveMessageOnPort(this.registry); m !== undefined; m = receiveMessageOnPort(this.registry)) {
        const msg = m.message as RegistryMessage;
        if ('add' in msg) this.add(msg.add);
        else this.domains.delete(msg.remove);
      }
      d = this.domains.get(domid);
    }
    return d?.generation === generation ? d : undefined;
  }

  /** The hypercall page of domain `domid`: its one entry point. */
  entry(domid: number): H.Hypercall {
    const self = this.domain(domid);
    if (self === undefined) throw new Error(`hypervisor: domain ${domid} is not known to this thread`);
    return (op, cmd, arg, count) => this.hypercall(self, op, cmd, arg, count);
  }

  hypercall(caller: Domain, op: number, cmd: number, arg?: object, count?: number): number {
    // Counted while inside, so that a destroy stops the thread only once it is
    // out of the hypervisor and its locks: Xen pauses a dying domain's vCPUs
    // first, and a vCPU is never descheduled holding a spinlock. Counted
    // before the state is read, so a destroy that saw the count at 0 is never
    // followed by a hypercall that did not see the domain dying.
    const ctl = caller.ctl;
    Atomics.add(ctl, D.inHypercall, 1);
    if (Atomics.load(ctl, D.state) === DomainState.dying) {
      Atomics.sub(ctl, D.inHypercall, 1);
      return this.dying(caller);
    }
    try {
      return this.dispatch(caller, op, cmd, arg, count);
    } finally {
      Atomics.sub(ctl, D.inHypercall, 1);
    }
  }

  /**
   * A wait inside a hypercall (SCHEDOP_block and poll, a suspend) holds no
   * lock: the vCPU is descheduled, as in Xen, so it leaves the count a destroy
   * waits on for the length of the wait.
   */
  private descheduled(d: Domain, wait: () => void): void {
    Atomics.sub(d.ctl, D.inHypercall, 1);
    try {
      wait();
    } finally {
      Atomics.add(d.ctl, D.inHypercall, 1);
    }
  }

  /** A dying domain's own thread stops here until the host ends it; anywhere else, ESRCH. */
  private dying(caller: Domain): number {
    if (this.parkDying) {
      while (Atomics.load(caller.ctl, D.state) === DomainState.dying) Atomics.wait(caller.ctl, D.state, DomainState.dying, 100);
    }
    return -XEN_ESRCH;
  }

  private dispatch(caller: Domain, op: number, cmd: number, arg?: object, count?: number): number {
    switch (op) {
      case __HYPERVISOR_event_channel_op:
        return this.eventChannelOp(caller, cmd, arg);
      case __HYPERVISOR_grant_table_op:
        return this.grantTableOp(caller, cmd, arg, count);
      case __HYPERVISOR_memory_op:
        return this.memoryOp(caller, cmd, arg);
      case __HYPERVISOR_hvm_op:
        return this.hvmOp(caller, cmd, arg);
      case __HYPERVISOR_sched_op:
        return this.schedOp(caller, cmd, arg);
      case __HYPERVISOR_vcpu_op:
        return arg === undefined ? -XEN_EFAULT : this.vcpuOp(caller, cmd, arg as H.vcpu_op);
      case __HYPERVISOR_xen_version:
        return this.xenVersion(cmd, arg);
      default:
        return -XEN_ENOSYS;
    }
  }

  private eventChannelOp(caller: Domain, cmd: number, arg: object | undefined): number {
    if (arg === undefined) return -XEN_EFAULT;
    switch (cmd) {
      case EVTCHNOP_alloc_unbound:
        return evtchn.allocUnbound(caller, arg as H.evtchn_alloc_unbound, this.lookup);
      case EVTCHNOP_bind_interdomain:
        return evtchn.bindInterdomain(caller, arg as H.evtchn_bind_interdomain, this.lookup);
      case EVTCHNOP_bind_virq:
        return evtchn.bindVirq(caller, arg as H.evtchn_bind_virq);
      case EVTCHNOP_send:
        return evtchn.send(caller, (arg as H.evtchn_send).port, this.lookup);
      case EVTCHNOP_close:
        return evtchn.close(caller, (arg as H.evtchn_close).port, this.lookup);
      case EVTCHNOP_unmask:
        return evtchn.unmask(caller, (arg as H.evtchn_unmask).port);
      case EVTCHNOP_status:
        return evtchn.status(caller, arg as H.evtchn_status, this.lookup);
      case EVTCHNOP_bind_vcpu:
        return evtchn.bindVcpu(caller, arg as H.evtchn_bind_vcpu);
      default:
        return -XEN_ENOSYS;
    }
  }

  /**
   * do_grant_table_op. `count` as in C: a count beyond INT_MAX (here also a
   * negative or fractional one) is EINVAL. Only GNTTABOP_copy takes a batch
   * here; every other op takes one struct (count absent or 1, else EINVAL).
   */
  private grantTableOp(caller: Domain, cmd: number, arg: object | undefined, count: number | undefined): number {
    if (count !== undefined && (!Number.isInteger(count) || count < 0 || count > 0x7fffffff)) return -XEN_EINVAL;
    if (cmd === GNTTABOP_copy) return this.grantCopy(caller, arg, count);
    if (count !== undefined && count !== 1) return -XEN_EINVAL;
    if (arg === undefined) return -XEN_EFAULT;
    switch (cmd) {
      case GNTTABOP_map_grant_ref:
        grant.mapGrantRef(caller, arg as H.gnttab_map_grant_ref, this.lookup);
        return 0;
      case GNTTABOP_unmap_grant_ref:
        grant.unmapGrantRef(caller, arg as H.gnttab_unmap_grant_ref, this.lookup);
        return 0;
      case GNTTABOP_query_size:
        return this.queryGrantSize(caller, arg as H.gnttab_query_size);
      case GNTTABOP_setup_table:
        return this.setupGrantTable(caller, arg as H.gnttab_setup_table);
      default:
        return -XEN_ENOSYS;
    }
  }

  /**
   * GNTTABOP_copy: one gnttab_copy (count absent or 1), or the first `count`
   * of an array of them. As Xen's guest_handle_okay, a count that runs past
   * what the caller passed is EFAULT; a count of 0 copies nothing. An array
   * with no count says nothing of how many to do: EINVAL.
   */
  private grantCopy(caller: Domain, arg: object | undefined, count: number | undefined): number {
    if (count === 0) return 0;
    if (arg === undefined) return -XEN_EFAULT;
    if (Array.isArray(arg)) {
      if (count === undefined) return -XEN_EINVAL;
      if (count > arg.length) return -XEN_EFAULT;
      grant.copy(caller, arg as H.gnttab_copy[], count, this.lookup);
      return 0;
    }
    if (count !== undefined && count !== 1) return -XEN_EFAULT;
    // A lone op goes the batch's way, as an array of one made once.
    this.oneCopy[0] = arg as H.gnttab_copy;
    grant.copy(caller, this.oneCopy, 1, this.lookup);
    return 0;
  }

  private grantTarget(caller: Domain, dom: number): Domain | number {
    if (dom === DOMID_SELF || dom === caller.domid) return caller;
    if (!caller.privileged) return GNTST_permission_denied;
    return this.domain(dom) ?? GNTST_bad_domain;
  }

  private queryGrantSize(caller: Domain, op: H.gnttab_query_size): number {
    const d = this.grantTarget(caller, op.dom);
    if (typeof d === 'number') {
      op.status = d;
      return 0;
    }
    op.nr_frames = Atomics.load(d.ctl, D.nrGrantFrames);
    op.max_nr_frames = d.ctl[D.maxGrantFrames] ?? MAX_GRANT_FRAMES;
    op.status = GNTST_okay;
    return 0;
  }

  /**
   * An HVM guest's grant frames are pages of its own memory that it names with
   * XENMAPSPACE_grant_table, so setup_table reports the frames placed so far
   * and cannot grow the table by itself.
   */
  private setupGrantTable(caller: Domain, op: H.gnttab_setup_table): number {
    const d = this.grantTarget(caller, op.dom);
    if (typeof d === 'number') {
      op.status = d;
      return 0;
    }
    const nr = Atomics.load(d.ctl, D.nrGrantFrames);
    if (!Number.isInteger(op.nr_frames) || op.nr_frames < 0 || op.nr_frames > nr) {
      op.status = GNTST_general_error;
      return 0;
    }
    op.frame_list = [];
    for (let i = 0; i < op.nr_frames; i++) op.frame_list.push(d.ctl[D.grantFrames + i] ?? 0);
    op.status = GNTST_okay;
    return 0;
  }

  private memoryOp(caller: Domain, cmd: number, arg: object | undefined): number {
    switch (cmd) {
      case XENMEM_add_to_physmap:
        return arg === undefined ? -XEN_EFAULT : this.addToPhysmap(caller, arg as H.xen_add_to_physmap);
      case XENMEM_add_to_physmap_batch:
        return arg === undefined ? -XEN_EFAULT : this.mapForeign(caller, arg as H.xen_add_to_physmap_batch);
      case XENMEM_memory_map:
        return arg === undefined ? -XEN_EFAULT : this.memoryMap(caller, arg as H.xen_memory_map);
      case XENMEM_current_reservation:
      case XENMEM_maximum_reservation: {
        const dom = arg === undefined ? DOMID_SELF : (arg as H.xen_memory_reservation).domid;
        const d = dom === DOMID_SELF ? caller : caller.privileged ? this.domain(dom) : undefined;
        return d === undefined ? -XEN_ESRCH : d.nrPages;
      }
      default:
        return -XEN_ENOSYS;
    }
  }

  /** Move a page the hypervisor placed (shared info, a grant frame) to the GFN the guest chose. */
  private relocate(d: Domain, from: number, to: number): void {
    if (from === to) return;
    const u8 = d.mem.u8;
    u8.copyWithin(to * PAGE_SIZE, from * PAGE_SIZE, (from + 1) * PAGE_SIZE);
    zeroBytes(u8, from * PAGE_SIZE, (from + 1) * PAGE_SIZE);
  }

  private addToPhysmap(caller: Domain, op: H.xen_add_to_physmap): number {
    const d = op.domid === DOMID_SELF || op.domid === caller.domid ? caller : undefined;
    if (d === undefined) return -XEN_EPERM;
    if (!Number.isInteger(op.gpfn) || op.gpfn < 0 || op.gpfn >= d.specialBase) return -XEN_EINVAL;
    if (op.space === XENMAPSPACE_shared_info) {
      if (op.idx !== 0) return -XEN_EINVAL;
      lock(d.ctl, D.lockEvtchn);
      this.relocate(d, d.sharedInfoGfn, op.gpfn);
      Atomics.store(d.ctl, D.sharedInfoGfn, op.gpfn);
      unlock(d.ctl, D.lockEvtchn);
      return 0;
    }
    if (op.space === XENMAPSPACE_grant_table) {
      return this.placeGrantFrame(d, op.idx, op.gpfn);
    }
    return -XEN_EINVAL;
  }

  /** Frame `idx` of the grant table goes to `gpfn`; the table grows one frame at a time. */
  private placeGrantFrame(d: Domain, idx: number, gpfn: number): number {
    lock(d.ctl, D.lockGnttab);
    try {
      const nr = Atomics.load(d.ctl, D.nrGrantFrames);
      const max = d.ctl[D.maxGrantFrames] ?? MAX_GRANT_FRAMES;
      if (!Number.isInteger(idx) || idx < 0 || idx > nr || idx >= max) return -XEN_EINVAL;
      for (let i = 0; i < nr; i++) if (i !== idx && d.ctl[D.grantFrames + i] === gpfn) return -XEN_EINVAL;
      if (idx < nr) {
        this.relocate(d, d.ctl[D.grantFrames + idx] ?? gpfn, gpfn);
      } else {
        zeroBytes(d.mem.u8, gpfn * PAGE_SIZE, (gpfn + 1) * PAGE_SIZE);
      }
      d.ctl[D.grantFrames + idx] = gpfn;
      if (idx === nr) Atomics.store(d.ctl, D.nrGrantFrames, nr + 1);
      return 0;
    } finally {
      unlock(d.ctl, D.lockGnttab);
    }
  }

  /** XENMAPSPACE_gmfn_foreign: how a privileged toolstack maps a guest's pages (privcmd). */
  private mapForeign(caller: Domain, op: H.xen_add_to_physmap_batch): number {
    if (op.space !== XENMAPSPACE_gmfn_foreign) return -XEN_EINVAL;
    if (!caller.privileged) return -XEN_EPERM;
    const d = this.domain(op.u.foreign_domid);
    if (d === undefined) return -XEN_ESRCH;
    op.errs = [];
    op.pages = [];
    for (let i = 0; i < op.size; i++) {
      const gfn = op.idxs[i] ?? -1;
      const ok = Number.isInteger(gfn) && gfn >= 0 && gfn < d.nrPages;
      op.errs.push(ok ? 0 : -XEN_EINVAL);
      op.pages.push(ok ? new FramePage(d.mem, gfn, true) : null);
    }
    return 0;
  }

  private memoryMap(caller: Domain, op: H.xen_memory_map): number {
    const special = caller.specialBase;
    op.buffer = [
      { addr: 0, size: special * PAGE_SIZE, type: E820_RAM },
      { addr: special * PAGE_SIZE, size: (caller.nrPages - special) * PAGE_SIZE, type: E820_RESERVED },
    ];
    op.nr_entries = op.buffer.length;
    return 0;
  }

  private hvmOp(caller: Domain, cmd: number, arg: object | undefined): number {
    if (cmd !== HVMOP_set_param && cmd !== HVMOP_get_param) return -XEN_ENOSYS;
    if (arg === undefined) return -XEN_EFAULT;
    const op = arg as H.xen_hvm_param;
    const d = op.domid === DOMID_SELF || op.domid === caller.domid ? caller : caller.privileged ? this.domain(op.domid) : null;
    if (d === null) return -XEN_EPERM;
    if (d === undefined) return -XEN_ESRCH;
    if (!Number.isInteger(op.index) || op.index < 0 || op.index >= NR_HVM_PARAMS) return -XEN_EINVAL;
    const w = D.params + op.index * 2;
    if (cmd === HVMOP_set_param) {
      const v = BigInt.asUintN(64, op.value);
      Atomics.store(d.ctl, w, Number(v & 0xffffffffn) | 0);
      Atomics.store(d.ctl, w + 1, Number(v >> 32n) | 0);
      return 0;
    }
    if (cmd === HVMOP_get_param) {
      const lo = BigInt(Atomics.load(d.ctl, w) >>> 0);
      const hi = BigInt(Atomics.load(d.ctl, w + 1) >>> 0);
      op.value = (hi << 32n) | lo;
      return 0;
    }
    return -XEN_ENOSYS;
  }

  private schedOp(caller: Domain, cmd: number, arg: object | undefined): number {
    switch (cmd) {
      case SCHEDOP_yield:
        return 0;
      case SCHEDOP_block:
        return this.block(caller, 0, Infinity);
      case SCHEDOP_poll:
        return arg === undefined ? -XEN_EFAULT : this.poll(caller, arg as H.sched_poll);
      case SCHEDOP_shutdown: {
        const op = arg as H.sched_shutdown | undefined;
        const reason = op === undefined ? -1 : op.reason;
        if (reason !== SHUTDOWN_suspend) return this.shutdown(caller, reason);
        Atomics.store(caller.ctl, D.suspendRecord, Number.isInteger(op?.srec) ? op!.srec! : 0);
        const rc = this.shutdown(caller, reason);
        return rc !== 0 ? rc : this.suspended(caller);
      }
      case SCHEDOP_remote_shutdown: {
        if (arg === undefined) return -XEN_EFAULT;
        if (!caller.privileged) return -XEN_EPERM;
        const op = arg as H.sched_remote_shutdown;
        const d = this.domain(op.domain_id);
        return d === undefined ? -XEN_ESRCH : this.shutdown(d, op.reason);
      }
      default:
        return -XEN_ENOSYS;
    }
  }

  /**
   * Block vCPU 0 of `d` until its wake word is set or `timeoutMs` passes. A
   * JavaScript vCPU that blocks stops its thread's event loop, as a real one
   * stops executing; kernels normally sleep in Atomics.waitAsync instead.
   */
  private block(d: Domain, vcpu: number, timeoutMs: number): number {
    if (!this.vcpusBlock) return 0;
    const w = d.vcpuWord(vcpu, VCPU_WAKE);
    // Announce the sleep so a kick notifies; a kick that came first leaves KICKED and we do not sleep.
    if (Atomics.compareExchange(d.ctl, w, WAKE_IDLE, WAKE_SLEEPING) === WAKE_IDLE) {
      d.setAwake(vcpu, 0);
      this.descheduled(d, () => Atomics.wait(d.ctl, w, WAKE_SLEEPING, timeoutMs));
      d.setAwake(vcpu, 1);
      Atomics.compareExchange(d.ctl, w, WAKE_SLEEPING, WAKE_IDLE);
    }
    return 0;
  }

  private poll(d: Domain, op: H.sched_poll): number {
    const ports = op.ports.slice(0, op.nr_ports);
    if (ports.length === 0 || ports.length > 128) return -XEN_EINVAL;
    if (!ports.every((p) => evtchn.validPort(p))) return -XEN_EINVAL;
    const deadline = op.timeout === 0n ? Infinity : Number(op.timeout) / 1e6;
    const pollWord = d.vcpuWord(0, VCPU_POLL);
    Atomics.store(d.ctl, pollWord, 1);
    try {
      for (;;) {
        for (const port of ports) if (evtchn.isPending(d, port)) return 0;
        const left = deadline === Infinity ? Infinity : deadline - performance.now();
        if (left <= 0) return 0;
        Atomics.store(d.ctl, d.vcpuWord(0, VCPU_WAKE), WAKE_IDLE);
        for (const port of ports) if (evtchn.isPending(d, port)) return 0;
        if (!this.vcpusBlock) return 0;
        this.block(d, 0, left);
      }
    } finally {
      Atomics.store(d.ctl, pollWord, 0);
    }
  }

  /** domain_shutdown: record the reason, tell dom0 through VIRQ_DOM_EXC. */
  shutdown(d: Domain, reason: number): number {
    if (!Number.isInteger(reason) || reason < SHUTDOWN_poweroff || reason > SHUTDOWN_watchdog) return -XEN_EINVAL;
    const prev = Atomics.compareExchange(d.ctl, D.state, DomainState.running, DomainState.shutdown);
    if (prev !== DomainState.running && prev !== DomainState.paused) return 0;
    if (prev === DomainState.paused) Atomics.store(d.ctl, D.state, DomainState.shutdown);
    Atomics.store(d.ctl, D.shutdownReason, reason);
    for (let v = 0; v < d.maxVcpus; v++) evtchn.kickVcpu(d, v);
    const dom0 = this.domain(0);
    if (dom0 !== undefined) evtchn.sendVirq(dom0, VIRQ_DOM_EXC);
    return 0;
  }

  /**
   * A suspended vCPU is descheduled until the toolstack resumes the domain
   * (the suspend was cancelled: the hypercall returns 1, as Xen's
   * xc_domain_resume arranges) or destroys it, which ends the thread here.
   */
  private suspended(d: Domain): number {
    // Nothing after the hypercall may run while the toolstack saves the domain; without a thread to block, unwind.
    if (!this.vcpusBlock) throw new XenError('EOPNOTSUPP', 'a suspended vCPU cannot wait for resume in the deterministic runner');
    // Descheduled: it takes no CPU from the vCPUs that poll (vCPU 0 suspends, as block() is vCPU 0's).
    d.setAwake(0, 0);
    this.descheduled(d, () => {
      while (Atomics.load(d.ctl, D.state) === DomainState.shutdown) Atomics.wait(d.ctl, D.state, DomainState.shutdown);
    });
    d.setAwake(0, 1);
    return 1;
  }

  /** VCPUOP_up, VCPUOP_down, VCPUOP_is_up on one's own vCPUs (vcpu_op's vcpuid in the argument). */
  private vcpuOp(caller: Domain, cmd: number, op: H.vcpu_op): number {
    const v = op.vcpuid;
    if (!Number.isInteger(v) || v < 0 || v >= caller.maxVcpus) return -XEN_ENOENT;
    const w = caller.vcpuWord(v, VCPU_ONLINE);
    switch (cmd) {
      case VCPUOP_up:
        Atomics.store(caller.ctl, w, 1);
        return 0;
      case VCPUOP_down:
        // vCPU 0 runs the kernel's thread; taking it down would stop the domain.
        if (v === 0) return -XEN_EBUSY;
        Atomics.store(caller.ctl, w, 0);
        return 0;
      case VCPUOP_is_up:
        return Atomics.load(caller.ctl, w) === 0 ? 0 : 1;
      default:
        return -XEN_ENOSYS;
    }
  }

  /** The target of a domctl: privileged callers only, never the caller itself. */
  private domctlTarget(caller: Domain, domid: number): Domain | number {
    if (!caller.privileged) return -XEN_EPERM;
    if (domid === caller.domid) return -XEN_EINVAL;
    return this.domain(domid) ?? -XEN_ESRCH;
  }

  /** XEN_DOMCTL_pausedomain: the domain's vCPU stops at its next event and stays stopped. */
  pauseDomain(caller: Domain, domid: number): number {
    const d = this.domctlTarget(caller, domid);
    if (typeof d === 'number') return d;
    if (Atomics.compareExchange(d.ctl, D.state, DomainState.running, DomainState.paused) !== DomainState.running) return -XEN_EINVAL;
    for (let v = 0; v < d.maxVcpus; v++) evtchn.kickVcpu(d, v);
    return 0;
  }

  /** XEN_DOMCTL_unpausedomain of a domain paused by pauseDomain. */
  unpauseDomain(caller: Domain, domid: number): number {
    const d = this.domctlTarget(caller, domid);
    if (typeof d === 'number') return d;
    if (Atomics.compareExchange(d.ctl, D.state, DomainState.paused, DomainState.running) !== DomainState.paused) return -XEN_EINVAL;
    Atomics.notify(d.ctl, D.state);
    return 0;
  }

  /** XEN_DOMCTL_resumedomain: a domain that suspended runs on in place. */
  resumeDomain(caller: Domain, domid: number): number {
    const d = this.domctlTarget(caller, domid);
    if (typeof d === 'number') return d;
    if (d.state !== 'shutdown' || Atomics.load(d.ctl, D.shutdownReason) !== SHUTDOWN_suspend) return -XEN_EINVAL;
    Atomics.store(d.ctl, D.suspendRecord, 0);
    Atomics.store(d.ctl, D.state, DomainState.running);
    Atomics.notify(d.ctl, D.state);
    return 0;
  }

  private xenVersion(cmd: number, arg: object | undefined): number {
    switch (cmd) {
      case XENVER_version:
        return (XEN_VERSION_MAJOR << 16) | XEN_VERSION_MINOR;
      case XENVER_extraversion:
        if (arg === undefined) return -XEN_EFAULT;
        (arg as H.xen_extraversion).extraversion = XEN_EXTRAVERSION;
        return 0;
      case XENVER_get_features:
        if (arg === undefined) return -XEN_EFAULT;
        (arg as H.xen_feature_info).submap = 0;
        return 0;
      default:
        return -XEN_ENOSYS;
    }
  }

  /** CPUID leaf 0x40000000: the signature pvbus looks for, and the highest Xen leaf. */
  cpuid(leaf: number): { eax: number; ebx: number; ecx: number; edx: number } {
    if (leaf !== 0x40000000) return { eax: 0, ebx: 0, ecx: 0, edx: 0 };
    const sig = Buffer.from('XenVMMXenVMM', 'latin1');
    return { eax: 0x40000005, ebx: sig.readUInt32LE(0), ecx: sig.readUInt32LE(4), edx: sig.readUInt32LE(8) };
  }

  /** XEN_DOMCTL_getdomaininfo (privileged). */
  getDomainInfo(caller: Domain, domid: number): H.xen_domctl_getdomaininfo | number {
    if (!caller.privileged && domid !== caller.domid) return -XEN_EPERM;
    const d = this.domain(domid);
    if (d === undefined) return -XEN_ESRCH;
    let online = 0;
    for (let v = 0; v < d.maxVcpus; v++) if (Atomics.load(d.ctl, d.vcpuWord(v, VCPU_ONLINE)) !== 0) online++;
    return {
      domain: domid,
      flags: 0,
      tot_pages: d.nrPages,
      max_pages: d.nrPages,
      nr_online_vcpus: online,
      max_vcpu_id: d.maxVcpus - 1,
      shutdown_reason: Atomics.load(d.ctl, D.shutdownReason),
      state: d.state,
      blocked: Atomics.load(d.ctl, d.vcpuWord(0, VCPU_BLOCKED)) === 1,
    };
  }

  /** Tear down what a dying domain holds in others: its mappings and its ports. */
  teardown(d: Domain): void {
    grant.unmapAll(d, this.lookup);
    evtchn.closeAll(d, this.lookup);
  }
}

/** The GFN of a special page the builder placed for `d`. */
export function specialGfn(d: Domain, page: (typeof SpecialPage)[keyof typeof SpecialPage]): number {
  return d.specialBase + page;
}
