// Event channels, 2-level ABI (xen/common/event_channel.c, event_2l.c).
// A port's pending and mask bits live in the owning domain's shared_info page,
// in its own memory; the selector and upcall_pending in its vcpu_info. Port
// state lives in the domain's control block under its event lock.

import { offsetOf, sizeOf } from '../abi/layout.js';
import { shared_info, vcpu_info, DOMID_SELF } from '../abi/xen.js';
import {
  EVTCHNSTAT_closed,
  EVTCHNSTAT_unbound,
  EVTCHNSTAT_interdomain,
  EVTCHNSTAT_virq,
} from '../abi/event_channel.js';
import { XEN_EEXIST, XEN_EINVAL, XEN_ENOENT, XEN_ENOSPC, XEN_EPERM, XEN_ESRCH } from '../abi/errno.js';
import { D, Domain, MAX_EVTCHNS, MAX_VCPUS, NR_VIRQS, VCPU_ONLINE, VCPU_POLL, VCPU_WAKE, WAKE_KICKED, WAKE_SLEEPING } from './domain.js';
import { lock, unlock } from './lock.js';
import { PAGE_SIZE } from './page.js';
import { traceEvtchnSend, tracing } from '../trace/trace.js';
import type {
  evtchn_alloc_unbound,
  evtchn_bind_interdomain,
  evtchn_bind_vcpu,
  evtchn_bind_virq,
  evtchn_status,
} from './hypercall.js';

// The 2-level bitmaps as both the hypervisor and the guest's upcall address them.
export const EVTCHN_PENDING = offsetOf(shared_info, 'evtchn_pending');
export const EVTCHN_MASK = offsetOf(shared_info, 'evtchn_mask');
export const EVTCHN_MASK_BYTES = sizeOf(shared_info, 'evtchn_mask');
export const UPCALL_PENDING = offsetOf(vcpu_info, 'evtchn_upcall_pending');
export const PENDING_SEL = offsetOf(vcpu_info, 'evtchn_pending_sel');
const VCPU_INFO_SIZE = vcpu_info.size;

// Words of a port's entry in the control block.
const STATE = 0;
const REMOTE = 1; // remote domid (unbound, interdomain) or virq
const REMOTE_PORT = 2;
const VCPU = 3;

export type DomainLookup = (domid: number) => Domain | undefined;

function entry(port: number): number {
  return D.evtchns + port * 4;
}

export function validPort(port: number): boolean {
  return Number.isInteger(port) && port > 0 && port < MAX_EVTCHNS;
}

/** Index of the u32 word holding bit `bit` of a little-endian xen_ulong_t array at byte `base`. */
export function bitWord(base: number, bit: number): number {
  return (base + (bit >> 5) * 4) >> 2;
}

function allocPort(d: Domain): number {
  for (let port = 1; port < MAX_EVTCHNS; port++) {
    if (d.ctl[entry(port) + STATE] === EVTCHNSTAT_closed) return port;
  }
  return -XEN_ENOSPC;
}

/** Lock two domains' event locks in domid order, as Xen's double_evtchn_lock. */
function lockPair(a: Domain, b: Domain): void {
  if (a === b) return lock(a.ctl, D.lockEvtchn);
  const [first, second] = a.domid < b.domid ? [a, b] : [b, a];
  lock(first.ctl, D.lockEvtchn);
  lock(second.ctl, D.lockEvtchn);
}

function unlockPair(a: Domain, b: Domain): void {
  unlock(a.ctl, D.lockEvtchn);
  if (a !== b) unlock(b.ctl, D.lockEvtchn);
}

/**
 * vcpu_kick: set the wake word; wake the thread only if its vCPU went to
 * sleep on it (Atomics.waitAsync or wait). A running or polling vCPU finds
 * the word set without a thread wake-up, which costs tens of microseconds.
 */
export function kickVcpu(d: Domain, vcpu: number): void {
  const w = d.vcpuWord(vcpu, VCPU_WAKE);
  if (Atomics.exchange(d.ctl, w, WAKE_KICKED) === WAKE_SLEEPING) {
    d.setAwake(vcpu, 1);
    Atomics.notify(d.ctl, w);
  }
}

/** evtchn_2l_set_pending: mark `port` of `d` pending and tell its vCPU. */
export function setPending(d: Domain, port: number): void {
  // Shared info moves only once, when the guest maps it; if it moved while we
  // marked the old page, mark the new one too so the event is not lost.
  let gfn = d.sharedInfoGfn;
  for (;;) {
    markPending(d, port, gfn);
    const now = d.sharedInfoGfn;
    if (now === gfn) return;
    gfn = now;
  }
}

function markPending(d: Domain, port: number, gfn: number): void {
  const si = gfn * PAGE_SIZE;
  const u32 = d.mem.u32;
  const bit = 1 << (port & 31);
  if ((Atomics.or(u32, bitWord(si + EVTCHN_PENDING, port), bit) & bit) !== 0) return;
  const vcpu = Atomics.load(d.ctl, entry(port) + VCPU);
  if ((Atomics.load(u32, bitWord(si + EVTCHN_MASK, port)) & bit) === 0 && markUpcall(d, si, vcpu, port)) {
    kickVcpu(d, vcpu);
    return;
  }
  // A vCPU in SCHEDOP_poll waits for the port itself, masked or not.
  for (let v = 0; v < d.maxVcpus; v++) {
    if (Atomics.load(d.ctl, d.vcpuWord(v, VCPU_POLL)) !== 0) kickVcpu(d, v);
  }
}

/**
 * Set `port`'s row in the vCPU's selector and then upcall_pending; true when
 * this call raised upcall_pending, so the vCPU must be kicked (the tail of
 * evtchn_2l_set_pending and evtchn_2l_unmask, vcpu_mark_events_pending).
 */
function markUpcall(d: Domain, si: number, vcpu: number, port: number): boolean {
  const vi = si + vcpu * VCPU_INFO_SIZE;
  const row = port >> 6;
  const selBit = 1 << (row & 31);
  const sel = Atomics.or(d.mem.u32, bitWord(vi + PENDING_SEL, row), selBit);
  return (sel & selBit) === 0 && Atomics.exchange(d.mem.u8, vi + UPCALL_PENDING, 1) === 0;
}

export function isPending(d: Domain, port: number): boolean {
  if (!validPort(port)) return false;
  const si = d.sharedInfoGfn * PAGE_SIZE;
  return (Atomics.load(d.mem.u32, bitWord(si + EVTCHN_PENDING, port)) & (1 << (port & 31))) !== 0;
}

function resolveDom(caller: Domain, dom: number, lookup: DomainLookup): Domain | number {
  if (dom === DOMID_SELF || dom === caller.domid) return caller;
  if (!caller.privileged) return -XEN_EPERM;
  return lookup(dom) ?? -XEN_ESRCH;
}

export function allocUnbound(caller: Domain, op: evtchn_alloc_unbound, lookup: DomainLookup): number {
  const d = resolveDom(caller, op.dom, lookup);
  if (typeof d === 'number') return d;
  const remote = op.remote_dom === DOMID_SELF ? caller.domid : op.remote_dom;
  if (!Number.isInteger(remote) || remote < 0 || remote > 0xffff) return -XEN_EINVAL;
  lock(d.ctl, D.lockEvtchn);
  try {
    const port = allocPort(d);
    if (port < 0) return port;
    const e = entry(port);
    d.ctl[e + REMOTE] = remote;
    d.ctl[e + REMOTE_PORT] = 0;
    d.ctl[e + VCPU] = 0;
    Atomics.store(d.ctl, e + STATE, EVTCHNSTAT_unbound);
    op.port = port;
    return 0;
  } finally {
    unlock(d.ctl, D.lockEvtchn);
  }
}

export function bindInterdomain(caller: Domain, op: evtchn_bind_interdomain, lookup: DomainLookup): number {
  const rdomid = op.remote_dom === DOMID_SELF ? caller.domid : op.remote_dom;
  const rd = lookup(rdomid);
  if (rd === undefined) return -XEN_ESRCH;
  if (!validPort(op.remote_port)) return -XEN_EINVAL;
  lockPair(caller, rd);
  try {
    const re = entry(op.remote_port);
    if (rd.ctl[re + STATE] !== EVTCHNSTAT_unbound || rd.ctl[re + REMOTE] !== caller.domid) return -XEN_EINVAL;
    const port = allocPort(caller);
    if (port < 0) return port;
    const le = entry(port);
    caller.ctl[le + REMOTE] = rd.domid;
    caller.ctl[le + REMOTE_PORT] = op.remote_port;
    caller.ctl[le + VCPU] = 0;
    Atomics.store(caller.ctl, le + STATE, EVTCHNSTAT_interdomain);
    rd.ctl[re + REMOTE] = caller.domid;
    rd.ctl[re + REMOTE_PORT] = port;
    Atomics.store(rd.ctl, re + STATE, EVTCHNSTAT_interdomain);
    op.local_port = port;
  } finally {
    unlockPair(caller, rd);
  }
  // Like Xen: the new local port is pending, so neither side misses an early send.
  setPending(caller, op.local_port);
  return 0;
}

function virqWord(vcpu: number, virq: number): number {
  return D.virqs + vcpu * NR_VIRQS + virq;
}

export function bindVirq(caller: Domain, op: evtchn_bind_virq): number {
  if (!Number.isInteger(op.virq) || op.virq < 0 || op.virq >= NR_VIRQS) return -XEN_EINVAL;
  if (!Number.isInteger(op.vcpu) || op.vcpu < 0 || op.vcpu >= caller.maxVcpus) return -XEN_ENOENT;
  lock(caller.ctl, D.lockEvtchn);
  try {
    if (caller.ctl[virqWord(op.vcpu, op.virq)] !== 0) return -XEN_EEXIST;
    const port = allocPort(caller);
    if (port < 0) return port;
    const e = entry(port);
    caller.ctl[e + REMOTE] = op.virq;
    caller.ctl[e + VCPU] = op.vcpu;
    Atomics.store(caller.ctl, e + STATE, EVTCHNSTAT_virq);
    caller.ctl[virqWord(op.vcpu, op.virq)] = port;
    op.port = port;
    return 0;
  } finally {
    unlock(caller.ctl, D.lockEvtchn);
  }
}

/** Raise a VIRQ bound on any vCPU of `d` (send_guest_global_virq). */
export function sendVirq(d: Domain, virq: number): void {
  for (let v = 0; v < d.maxVcpus && v < MAX_VCPUS; v++) {
    const port = Atomics.load(d.ctl, virqWord(v, virq));
    if (port !== 0) return setPending(d, port);
  }
}

/** evtchn_close: both ends of an interdomain channel go back to unbound on the far side. */
export function close(d: Domain, port: number, lookup: DomainLookup): number {
  if (!validPort(port)) return -XEN_EINVAL;
  // The peer may close its end at the same moment and change what we must lock: retry, as Xen does.
  for (;;) {
    const rc = closeOnce(d, port, lookup);
    if (rc !== RETRY) return rc;
  }
}

const RETRY = 1;

function closeOnce(d: Domain, port: number, lookup: DomainLookup): number {
  const e = entry(port);
  const state = Atomics.load(d.ctl, e + STATE);
  const rd = state === EVTCHNSTAT_interdomain ? lookup(d.ctl[e + REMOTE] ?? -1) : undefined;
  if (rd !== undefined) lockPair(d, rd);
  else lock(d.ctl, D.lockEvtchn);
  try {
    if (Atomics.load(d.ctl, e + STATE) !== state) return RETRY;
    if (state === EVTCHNSTAT_closed) return -XEN_EINVAL;
    if (state === EVTCHNSTAT_virq) d.ctl[virqWord(d.ctl[e + VCPU] ?? 0, d.ctl[e + REMOTE] ?? 0)] = 0;
    if (rd !== undefined) {
      const re = entry(d.ctl[e + REMOTE_PORT] ?? 0);
      rd.ctl[re + REMOTE] = d.domid;
      rd.ctl[re + REMOTE_PORT] = 0;
      Atomics.store(rd.ctl, re + STATE, EVTCHNSTAT_unbound);
    }
    // evtchn_free: a reused port number must not inherit this one's pending event.
    Atomics.and(d.mem.u32, bitWord(d.sharedInfoGfn * PAGE_SIZE + EVTCHN_PENDING, port), ~(1 << (port & 31)));
    Atomics.store(d.ctl, e + STATE, EVTCHNSTAT_closed);
    d.ctl[e + REMOTE] = 0;
    d.ctl[e + REMOTE_PORT] = 0;
    d.ctl[e + VCPU] = 0;
    return 0;
  } finally {
    if (rd !== undefined) unlockPair(d, rd);
    else unlock(d.ctl, D.lockEvtchn);
  }
}

/** evtchn_send: an interdomain port raises its peer; an unbound one is a no-op, as in Xen. */
export function send(caller: Domain, port: number, lookup: DomainLookup): number {
  if (!validPort(port)) return -XEN_EINVAL;
  const e = entry(port);
  lock(caller.ctl, D.lockEvtchn);
  const state = caller.ctl[e + STATE];
  const rdomid = caller.ctl[e + REMOTE] ?? 0;
  const rport = caller.ctl[e + REMOTE_PORT] ?? 0;
  unlock(caller.ctl, D.lockEvtchn);
  if (tracing) traceEvtchnSend(caller.domid, port, state ?? EVTCHNSTAT_closed, rdomid, rport);
  if (state === EVTCHNSTAT_unbound) return 0;
  if (state !== EVTCHNSTAT_interdomain) return -XEN_EINVAL;
  const rd = lookup(rdomid);
  if (rd !== undefined && rd.state !== 'dead') setPending(rd, rport);
  return 0;
}

/** evtchn_2l_unmask: clear the mask bit and deliver an event that was held back. */
export function unmask(d: Domain, port: number): number {
  if (!validPort(port)) return -XEN_EINVAL;
  const si = d.sharedInfoGfn * PAGE_SIZE;
  const u32 = d.mem.u32;
  const bit = 1 << (port & 31);
  // Deliver whatever is pending, masked or not before: a guest may clear the
  // mask bit itself and then ask for the held-back event.
  Atomics.and(u32, bitWord(si + EVTCHN_MASK, port), ~bit);
  if ((Atomics.load(u32, bitWord(si + EVTCHN_PENDING, port)) & bit) === 0) return 0;
  const vcpu = Atomics.load(d.ctl, entry(port) + VCPU);
  if (markUpcall(d, si, vcpu, port)) kickVcpu(d, vcpu);
  return 0;
}

export function status(caller: Domain, op: evtchn_status, lookup: DomainLookup): number {
  const d = resolveDom(caller, op.dom, lookup);
  if (typeof d === 'number') return d;
  if (!Number.isInteger(op.port) || op.port < 0 || op.port >= MAX_EVTCHNS) return -XEN_EINVAL;
  const e = entry(op.port);
  lock(d.ctl, D.lockEvtchn);
  try {
    op.status = d.ctl[e + STATE] ?? EVTCHNSTAT_closed;
    op.vcpu = d.ctl[e + VCPU] ?? 0;
    const remote = d.ctl[e + REMOTE] ?? 0;
    op.u = { unbound: { dom: remote }, interdomain: { dom: remote, port: d.ctl[e + REMOTE_PORT] ?? 0 }, virq: remote };
    return 0;
  } finally {
    unlock(d.ctl, D.lockEvtchn);
  }
}

export function bindVcpu(caller: Domain, op: evtchn_bind_vcpu): number {
  if (!validPort(op.port)) return -XEN_EINVAL;
  if (!Number.isInteger(op.vcpu) || op.vcpu < 0 || op.vcpu >= caller.maxVcpus) return -XEN_ENOENT;
  if (Atomics.load(caller.ctl, caller.vcpuWord(op.vcpu, VCPU_ONLINE)) === 0) return -XEN_ENOENT;
  const e = entry(op.port);
  lock(caller.ctl, D.lockEvtchn);
  try {
    const state = caller.ctl[e + STATE];
    if (state !== EVTCHNSTAT_unbound && state !== EVTCHNSTAT_interdomain) return -XEN_EINVAL;
    Atomics.store(caller.ctl, e + VCPU, op.vcpu);
    return 0;
  } finally {
    unlock(caller.ctl, D.lockEvtchn);
  }
}

/** One port a domain has open: its state (EVTCHNSTAT_*), and the remote domid (or virq) and port. */
export type PortInfo = { port: number; state: number; remote: number; remotePort: number };

export function portsOf(d: Domain): PortInfo[] {
  const out: PortInfo[] = [];
  for (let port = 1; port < MAX_EVTCHNS; port++) {
    const e = entry(port);
    const state = Atomics.load(d.ctl, e + STATE);
    if (state !== EVTCHNSTAT_closed) out.push({ port, state, remote: d.ctl[e + REMOTE] ?? 0, remotePort: d.ctl[e + REMOTE_PORT] ?? 0 });
  }
  return out;
}

/** Close every port of a dying domain, so peers see their ends go unbound. */
export function closeAll(d: Domain, lookup: DomainLookup): void {
  for (let port = 1; port < MAX_EVTCHNS; port++) {
    if (Atomics.load(d.ctl, entry(port) + STATE) !== EVTCHNSTAT_closed) close(d, port, lookup);
  }
}

/** Ports of `d` that are not closed. */
export function openPorts(d: Domain): number {
  let n = 0;
  for (let port = 1; port < MAX_EVTCHNS; port++) if (Atomics.load(d.ctl, entry(port) + STATE) !== EVTCHNSTAT_closed) n++;
  return n;
}
