// The simulated hypervisor through its real hypercall entry. One thread acts
// as every domain: it issues each domain's hypercalls with host.hv.entry(domid)
// and reads that domain's memory the way its kernel would (shared_info,
// vcpu_info, grant entries), at offsets taken from lib/abi layouts.

import { performance } from 'node:perf_hooks';
import fc from 'fast-check';
import t from 'tap';
import { code } from './fixtures/grants.js';

import { offsetOf } from '../lib/abi/layout.js';
import {
  __HYPERVISOR_event_channel_op,
  __HYPERVISOR_grant_table_op,
  __HYPERVISOR_hvm_op,
  __HYPERVISOR_memory_op,
  __HYPERVISOR_sched_op,
  __HYPERVISOR_xen_version,
  DOMID_SELF,
  shared_info,
  vcpu_info,
  VIRQ_DEBUG,
  VIRQ_DOM_EXC,
  NR_VIRQS,
  xen_ulong_t,
} from '../lib/abi/xen.js';
import {
  EVTCHNOP_alloc_unbound,
  EVTCHNOP_bind_interdomain,
  EVTCHNOP_bind_vcpu,
  EVTCHNOP_bind_virq,
  EVTCHNOP_close,
  EVTCHNOP_reset,
  EVTCHNOP_send,
  EVTCHNOP_status,
  EVTCHNOP_unmask,
  EVTCHNSTAT_closed,
  EVTCHNSTAT_interdomain,
  EVTCHNSTAT_unbound,
  EVTCHNSTAT_virq,
} from '../lib/abi/event_channel.js';
import {
  grant_entry_v1,
  GNTCOPY_dest_gref,
  GNTCOPY_source_gref,
  GNTMAP_host_map,
  GNTMAP_readonly,
  GNTST_bad_copy_arg,
  GNTST_bad_domain,
  GNTST_bad_gntref,
  GNTST_bad_handle,
  GNTST_okay,
  GNTST_general_error,
  GNTST_permission_denied,
  GNTTABOP_copy,
  GNTTABOP_map_grant_ref,
  GNTTABOP_query_size,
  GNTTABOP_setup_table,
  GNTTABOP_transfer,
  GNTTABOP_unmap_grant_ref,
  GTF_permit_access,
  GTF_reading,
  GTF_readonly,
  GTF_writing,
} from '../lib/abi/grant_table.js';
import {
  XENMAPSPACE_gmfn,
  XENMAPSPACE_gmfn_foreign,
  XENMAPSPACE_grant_table,
  XENMAPSPACE_shared_info,
  XENMEM_add_to_physmap,
  XENMEM_add_to_physmap_batch,
  XENMEM_current_reservation,
  XENMEM_decrease_reservation,
  XENMEM_memory_map,
} from '../lib/abi/memory.js';
import {
  HVM_PARAM_CALLBACK_IRQ,
  HVM_PARAM_CALLBACK_IRQ_TYPE_MASK,
  HVM_PARAM_CALLBACK_TYPE_VECTOR,
  HVM_PARAM_STORE_PFN,
  HVMOP_get_param,
  HVMOP_set_param,
} from '../lib/abi/hvm.js';
import {
  SCHEDOP_poll,
  SCHEDOP_remote_shutdown,
  SCHEDOP_shutdown,
  SCHEDOP_yield,
  SHUTDOWN_crash,
  SHUTDOWN_poweroff,
  SHUTDOWN_reboot,
} from '../lib/abi/sched.js';
import { XENVER_extraversion, XENVER_get_features, XENVER_version } from '../lib/abi/version.js';
import { XEN_EEXIST, XEN_EFAULT, XEN_EINVAL, XEN_ENOENT, XEN_ENOSPC, XEN_ENOSYS, XEN_EPERM, XEN_ESRCH } from '../lib/abi/errno.js';
import { D, Domain, DomainState, GRANT_ENTRIES_PER_FRAME, MAX_EVTCHNS, SPECIAL_PAGES, SpecialPage, VCPU_WAKE } from '../lib/hypervisor/domain.js';
import { Host, type DomainConfig } from '../lib/hypervisor/host.js';
import type {
  evtchn_status,
  gnttab_copy,
  gnttab_copy_ptr,
  gnttab_map_grant_ref,
  gnttab_query_size,
  gnttab_setup_table,
  Hypercall,
  sched_poll,
  xen_add_to_physmap_batch,
  xen_hvm_param,
  xen_memory_map,
} from '../lib/hypervisor/hypercall.js';
import { copyBytes, FramePage, MemoryViews, MEMCPY_BYTES, PAGE_SIZE, writablePage, zeroBytes } from '../lib/hypervisor/page.js';

// ---------------------------------------------------------------------------
// Layouts, from lib/abi

const SI_VCPU_INFO = offsetOf(shared_info, 'vcpu_info');
const SI_PENDING = offsetOf(shared_info, 'evtchn_pending');
const SI_MASK = offsetOf(shared_info, 'evtchn_mask');
const VI_UPCALL_PENDING = offsetOf(vcpu_info, 'evtchn_upcall_pending');
const VI_PENDING_SEL = offsetOf(vcpu_info, 'evtchn_pending_sel');
/** Ports per selector bit: BITS_PER_EVTCHN_WORD, the width of xen_ulong_t. */
const BITS_PER_EVTCHN_WORD = xen_ulong_t.size * 8;
const GE_FLAGS = offsetOf(grant_entry_v1, 'flags');
const GE_DOMID = offsetOf(grant_entry_v1, 'domid');
const GE_FRAME = offsetOf(grant_entry_v1, 'frame');
const E820_RAM = 1;
const E820_RESERVED = 2;

// ---------------------------------------------------------------------------
// A domain as its kernel sees it: a hypercall entry and its own memory

/** Bit `bit` of a little-endian array of xen_ulong_t at byte `base`. */
function testBit(u8: Uint8Array, base: number, bit: number): boolean {
  return ((u8[base + (bit >> 3)] ?? 0) & (1 << (bit & 7))) !== 0;
}

function writeBit(u8: Uint8Array, base: number, bit: number, on: boolean): void {
  const at = base + (bit >> 3);
  const m = 1 << (bit & 7);
  if (on) Atomics.or(u8, at, m);
  else Atomics.and(u8, at, ~m & 0xff);
}

class Guest {
  readonly d: Domain;
  readonly hc: Hypercall;

  constructor(host: Host, readonly domid: number) {
    this.d = host.domain(domid);
    this.hc = host.hv.entry(domid);
  }

  // -- event channel hypercalls --

  ev(cmd: number, arg?: object): number {
    return this.hc(__HYPERVISOR_event_channel_op, cmd, arg);
  }

  /** EVTCHNOP_alloc_unbound; the port, or throws with the errno. */
  alloc(remoteDom: number, dom = DOMID_SELF): number {
    const op = { dom, remote_dom: remoteDom, port: 0 };
    return ok(this.ev(EVTCHNOP_alloc_unbound, op), 'alloc_unbound', op.port);
  }

  bind(remoteDom: number, remotePort: number): number {
    const op = { remote_dom: remoteDom, remote_port: remotePort, local_port: 0 };
    return ok(this.ev(EVTCHNOP_bind_interdomain, op), 'bind_interdomain', op.local_port);
  }

  bindVirq(virq: number, vcpu = 0): number {
    const op = { virq, vcpu, port: 0 };
    return ok(this.ev(EVTCHNOP_bind_virq, op), 'bind_virq', op.port);
  }

  send(port: number): number {
    return this.ev(EVTCHNOP_send, { port });
  }

  close(port: number): number {
    return this.ev(EVTCHNOP_close, { port });
  }

  unmask(port: number): number {
    return this.ev(EVTCHNOP_unmask, { port });
  }

  status(port: number, dom = DOMID_SELF): evtchn_status & { rc: number } {
    const op: evtchn_status = {
      dom, port, status: -1, vcpu: -1,
      u: { unbound: { dom: -1 }, interdomain: { dom: -1, port: -1 }, virq: -1 },
    };
    const rc = this.ev(EVTCHNOP_status, op);
    return { ...op, rc };
  }

  // -- shared_info and vcpu_info, read and written as the guest does --

  private get si(): number {
    return this.d.sharedInfoGfn * PAGE_SIZE;
  }

  private vi(vcpu: number): number {
    return this.si + SI_VCPU_INFO + vcpu * vcpu_info.size;
  }

  pending(port: number): boolean {
    return testBit(this.d.mem.u8, this.si + SI_PENDING, port);
  }

  masked(port: number): boolean {
    return testBit(this.d.mem.u8, this.si + SI_MASK, port);
  }

  /** The guest masks and unmasks by writing evtchn_mask itself. */
  setMasked(port: number, on: boolean): void {
    writeBit(this.d.mem.u8, this.si + SI_MASK, port, on);
  }

  clearPending(port: number): void {
    writeBit(this.d.mem.u8, this.si + SI_PENDING, port, false);
  }

  selector(vcpu = 0): bigint {
    return new DataView(this.d.mem.buffer).getBigUint64(this.vi(vcpu) + VI_PENDING_SEL, true);
  }

  /** Is the selector bit of `port`'s row set in vcpu_info `vcpu`? */
  selected(port: number, vcpu = 0): boolean {
    return testBit(this.d.mem.u8, this.vi(vcpu) + VI_PENDING_SEL, Math.floor(port / BITS_PER_EVTCHN_WORD));
  }

  upcallPending(vcpu = 0): number {
    return Atomics.load(this.d.mem.u8, this.vi(vcpu) + VI_UPCALL_PENDING);
  }

  /** The vCPU's wake word, which a kick sets to 1. */
  woken(vcpu = 0): number {
    return Atomics.load(this.d.ctl, this.d.vcpuWord(vcpu, VCPU_WAKE));
  }

  /** The guest entered its upcall: clear upcall_pending and consume the kick, leave the ports alone. */
  enterUpcall(vcpu = 0): void {
    Atomics.store(this.d.mem.u8, this.vi(vcpu) + VI_UPCALL_PENDING, 0);
    Atomics.store(this.d.ctl, this.d.vcpuWord(vcpu, VCPU_WAKE), 0);
  }

  /**
   * The upcall, as OpenBSD's xen_intr() runs it: clear upcall_pending and the
   * selector, then take (clear) every pending, unmasked port of the selected
   * rows. Also consumes the kick. Returns the ports it took.
   */
  upcall(vcpu = 0): number[] {
    const u8 = this.d.mem.u8;
    Atomics.store(u8, this.vi(vcpu) + VI_UPCALL_PENDING, 0);
    const sel = this.selector(vcpu);
    new DataView(this.d.mem.buffer).setBigUint64(this.vi(vcpu) + VI_PENDING_SEL, 0n, true);
    const taken: number[] = [];
    for (let row = 0; row < BITS_PER_EVTCHN_WORD; row++) {
      if ((sel & (1n << BigInt(row))) === 0n) continue;
      for (let port = row * BITS_PER_EVTCHN_WORD; port < (row + 1) * BITS_PER_EVTCHN_WORD; port++) {
        if (this.pending(port) && !this.masked(port)) {
          this.clearPending(port);
          taken.push(port);
        }
      }
    }
    Atomics.store(this.d.ctl, this.d.vcpuWord(vcpu, VCPU_WAKE), 0);
    return taken;
  }

  /** Everything an event can touch: the whole shared_info page and the wake words. */
  snapshot(): string {
    const si = this.d.mem.u8.subarray(this.si, this.si + shared_info.size);
    const wakes = Array.from({ length: this.d.maxVcpus }, (_, v) => this.woken(v));
    return `${Buffer.from(si).toString('hex')}/${wakes.join(',')}`;
  }

  // -- grant tables --

  gt(cmd: number, arg?: object, count?: number): number {
    return this.hc(__HYPERVISOR_grant_table_op, cmd, arg, count);
  }

  querySize(dom = DOMID_SELF): gnttab_query_size {
    const op: gnttab_query_size = { dom, nr_frames: -1, max_nr_frames: -1, status: 1 };
    ok(this.gt(GNTTABOP_query_size, op), 'query_size', 0);
    return op;
  }

  /** The GFNs of this domain's grant frames, as GNTTABOP_setup_table reports them. */
  grantFrames(): number[] {
    const op: gnttab_setup_table = { dom: DOMID_SELF, nr_frames: this.querySize().nr_frames, status: 1, frame_list: [] };
    ok(this.gt(GNTTABOP_setup_table, op), 'setup_table', 0);
    if (op.status !== GNTST_okay) throw new Error(`setup_table status ${op.status}`);
    return op.frame_list;
  }

  /** The grant frames as last seen: a dying domain makes no more hypercalls, and its frames stay where they were. */
  private frames: number[] | null = null;

  /** Byte address of grant entry `ref` in this domain's memory. */
  entryAddr(ref: number): number {
    if (Atomics.load(this.d.ctl, D.state) !== DomainState.dying || this.frames === null) this.frames = this.grantFrames();
    const frame = this.frames[Math.floor(ref / GRANT_ENTRIES_PER_FRAME)];
    if (frame === undefined) throw new Error(`ref ${ref} is beyond the table`);
    return frame * PAGE_SIZE + (ref % GRANT_ENTRIES_PER_FRAME) * grant_entry_v1.size;
  }

  /** gnttab_grant_foreign_access_ref: frame and domid first, flags last. */
  grant(ref: number, domid: number, gfn: number, flags = 0): void {
    const at = this.entryAddr(ref);
    const mem = this.d.mem;
    Atomics.store(mem.u32, (at + GE_FRAME) >> 2, gfn);
    Atomics.store(mem.u16, (at + GE_DOMID) >> 1, domid);
    Atomics.store(mem.u16, (at + GE_FLAGS) >> 1, GTF_permit_access | flags);
  }

  grantFlags(ref: number): number {
    return Atomics.load(this.d.mem.u16, (this.entryAddr(ref) + GE_FLAGS) >> 1);
  }

  /** Revoke as the guest does when nothing maps the entry: flags to 0. */
  revoke(ref: number): void {
    Atomics.store(this.d.mem.u16, (this.entryAddr(ref) + GE_FLAGS) >> 1, 0);
  }

  map(dom: number, ref: number, flags = GNTMAP_host_map): gnttab_map_grant_ref {
    const op: gnttab_map_grant_ref = {
      host_addr: 0n, flags, ref, dom, status: 1, handle: -1, dev_bus_addr: 0n, page: null,
    };
    ok(this.gt(GNTTABOP_map_grant_ref, op), 'map_grant_ref', 0);
    return op;
  }

  unmap(handle: number): number {
    const op = { host_addr: 0n, dev_bus_addr: 0n, handle, status: 1 };
    ok(this.gt(GNTTABOP_unmap_grant_ref, op), 'unmap_grant_ref', 0);
    return op.status;
  }

  copy(source: gnttab_copy_ptr, dest: gnttab_copy_ptr, len: number, flags: number): number {
    const op: gnttab_copy = { source, dest, len, flags, status: 1 };
    ok(this.gt(GNTTABOP_copy, op), 'copy', 0);
    return op.status;
  }

  // -- memory_op, hvm_op, sched_op --

  mem(cmd: number, arg?: object): number {
    return this.hc(__HYPERVISOR_memory_op, cmd, arg);
  }

  addToPhysmap(space: number, idx: number, gpfn: number, domid = DOMID_SELF): number {
    return this.mem(XENMEM_add_to_physmap, { domid, size: 0, space, idx, gpfn });
  }

  setParam(index: number, value: bigint, domid = DOMID_SELF): number {
    return this.hc(__HYPERVISOR_hvm_op, HVMOP_set_param, { domid, index, value });
  }

  getParam(index: number, domid = DOMID_SELF): { rc: number; value: bigint } {
    const op: xen_hvm_param = { domid, index, value: -1n };
    const rc = this.hc(__HYPERVISOR_hvm_op, HVMOP_get_param, op);
    return { rc, value: op.value };
  }

  sched(cmd: number, arg?: object): number {
    return this.hc(__HYPERVISOR_sched_op, cmd, arg);
  }
}

function ok<T>(rc: number, what: string, value: T): T {
  if (rc !== 0) throw new Error(`${what} returned ${rc}`);
  return value;
}


const SMALL: DomainConfig = { name: 'guest', memoryMiB: 1 };

/** A host with domains a and b (unprivileged) and, if asked, a privileged dom0. */
function setup(opts: { dom0?: boolean; a?: Partial<DomainConfig> } = {}) {
  const host = new Host();
  const dom0 = opts.dom0 === true ? new Guest(host, host.createDomain({ name: 'dom0', memoryMiB: 1, privileged: true }, 0).domid) : null;
  const a = new Guest(host, host.createDomain({ ...SMALL, name: 'a', ...opts.a }).domid);
  const b = new Guest(host, host.createDomain({ ...SMALL, name: 'b' }).domid);
  return { host, dom0, a, b };
}

/** A guest's own RAM page, below the special pages, for data and grants. */
const DATA_GFN = 10;

// ---------------------------------------------------------------------------
// Grant copies in a batch and one by one

/**
 * dom0 copying between a's and b's grants (each granted to dom0: ref 8
 * read-only, ref 9 writable; b's ref 10 to a instead), c dying, and a domain
 * destroyed. Each world is built the same, bytes and all, so that two of
 * them can be compared after the same copies. kill() starts c's destruction.
 */
type CopyWorld = { host: Host; dom0: Guest; a: Guest; b: Guest; c: Guest; gone: number; kill: () => Promise<void> };

async function copyWorld(): Promise<CopyWorld> {
  const host = new Host();
  const dom0 = new Guest(host, host.createDomain({ name: 'dom0', memoryMiB: 1, privileged: true }, 0).domid);
  const [a, b, c] = ['a', 'b', 'c'].map((name) => new Guest(host, host.createDomain({ ...SMALL, name }).domid)) as [Guest, Guest, Guest];
  for (const g of [dom0, a, b, c]) {
    for (let i = 0; i < 3 * PAGE_SIZE; i++) g.d.mem.u8[DATA_GFN * PAGE_SIZE + i] = (i * 7 + g.domid * 31) & 0xff;
  }
  for (const g of [a, b, c]) {
    g.grant(8, 0, DATA_GFN, GTF_readonly);
    g.grant(9, 0, DATA_GFN + 1);
  }
  b.grant(10, a.domid, DATA_GFN + 2);
  const gone = host.createDomain({ ...SMALL, name: 'gone' }).domid;
  await host.destroy(gone);
  // c is dying from kill() until its promise settles: destroy() runs to its first await at once.
  return { host, dom0, a, b, c, gone, kill: () => host.destroy(c.domid) };
}

const cref = (domid: number, ref: number, offset = 0): gnttab_copy_ptr => ({ u: { ref, gmfn: 0 }, domid, offset });
const cgmfn = (gmfn: number, offset = 0, domid = DOMID_SELF): gnttab_copy_ptr => ({ u: { ref: 0, gmfn }, domid, offset });
const REFS = GNTCOPY_source_gref | GNTCOPY_dest_gref;

/** Good copies and bad ones mixed, the good ones needing the same locks in a row and then others. */
function mixedCopies(w: CopyWorld): [string, gnttab_copy][] {
  const { a, b, c } = w;
  const op = (source: gnttab_copy_ptr, dest: gnttab_copy_ptr, len: number, flags: number): gnttab_copy => ({ source, dest, len, flags, status: 1 });
  return [
    ['a ref to dom0', op(cref(a.domid, 8, 100), cgmfn(DATA_GFN), 64, GNTCOPY_source_gref)],
    ['a ref to b ref', op(cref(a.domid, 8), cref(b.domid, 9, 200), 300, REFS)],
    ['b ref to a ref', op(cref(b.domid, 8, 8), cref(a.domid, 9, 4000), 96, REFS)],
    ['bad ref', op(cref(a.domid, GRANT_ENTRIES_PER_FRAME), cgmfn(DATA_GFN), 8, GNTCOPY_source_gref)],
    ['a ref to b ref again', op(cref(a.domid, 9, 12), cref(b.domid, 9, 3000), 1000, REFS)],
    ['bad domain', op(cref(0x7000, 8), cgmfn(DATA_GFN), 8, GNTCOPY_source_gref)],
    ['read-only dest', op(cgmfn(DATA_GFN + 1), cref(a.domid, 8), 8, GNTCOPY_dest_gref)],
    ['offset+len past the page', op(cref(a.domid, 9, 4090), cgmfn(DATA_GFN), 7, GNTCOPY_source_gref)],
    ['dying domain', op(cref(c.domid, 9, 16), cgmfn(DATA_GFN + 2), 48, GNTCOPY_source_gref)],
    ['destroyed domain', op(cref(w.gone, 8), cgmfn(DATA_GFN), 8, GNTCOPY_source_gref)],
    ['granted to another', op(cref(b.domid, 10), cgmfn(DATA_GFN), 8, GNTCOPY_source_gref)],
    ['bad source before bad dest', op(cref(a.domid, -1), cref(0x7000, 9), 8, REFS)],
    ['foreign gmfn dest', op(cref(b.domid, 8), cgmfn(DATA_GFN, 0, a.domid), 8, GNTCOPY_source_gref)],
    ['dom0 to dom0, overlapping', op(cgmfn(DATA_GFN + 1, 10), cgmfn(DATA_GFN + 1, 20), 2000, 0)],
    ['b ref to dom0', op(cref(b.domid, 9, 4), cgmfn(DATA_GFN + 2, 4), 4092, GNTCOPY_source_gref)],
  ];
}

const MIXED_STATUSES: [string, number][] = [
  ['a ref to dom0', GNTST_okay],
  ['a ref to b ref', GNTST_okay],
  ['b ref to a ref', GNTST_okay],
  ['bad ref', GNTST_bad_gntref],
  ['a ref to b ref again', GNTST_okay],
  ['bad domain', GNTST_bad_domain],
  ['read-only dest', GNTST_general_error],
  ['offset+len past the page', GNTST_bad_copy_arg],
  ['dying domain', GNTST_okay],
  ['destroyed domain', GNTST_bad_domain],
  ['granted to another', GNTST_general_error],
  ['bad source before bad dest', GNTST_bad_gntref],
  ['foreign gmfn dest', GNTST_permission_denied],
  ['dom0 to dom0, overlapping', GNTST_okay],
  ['b ref to dom0', GNTST_okay],
];

/** The data pages of every live domain of the world, as hex. */
function pages(w: CopyWorld): string[] {
  return [w.dom0, w.a, w.b, w.c].map((g) => Buffer.from(g.d.mem.u8.subarray(DATA_GFN * PAGE_SIZE, (DATA_GFN + 3) * PAGE_SIZE)).toString('hex'));
}

/** What copies may leave behind: each domain's grant lock word, and GTF_reading|GTF_writing on any entry. */
function copyResidue(w: CopyWorld): { locks: number[]; flags: number } {
  const gs = [w.dom0, w.a, w.b, w.c];
  let flags = 0;
  for (const g of [w.a, w.b, w.c]) for (const ref of [8, 9, 10]) flags |= g.grantFlags(ref) & (GTF_reading | GTF_writing);
  return { locks: gs.map((g) => Atomics.load(g.d.ctl, D.lockGnttab)), flags };
}

/** One side of a random copy: which page or grant, at which offset. */
type SidePick = { kind: number; offset: number };
type CopyPick = { src: SidePick; dst: SidePick; len: number };
const sideArb: fc.Arbitrary<SidePick> = fc.record({
  kind: fc.nat(9),
  offset: fc.oneof(fc.nat(PAGE_SIZE), fc.constantFrom(0, 4000, 4095)),
});
const copyArb: fc.Arbitrary<CopyPick> = fc.record({
  src: sideArb, dst: sideArb, len: fc.oneof(fc.nat(300), fc.nat(PAGE_SIZE), fc.constant(PAGE_SIZE + 1)),
});

/** The copy a pick names in world `w`: grants good and bad, own and foreign frames, missing domains. */
function randomCopy(w: CopyWorld, p: CopyPick): gnttab_copy {
  const side = (s: SidePick): [gnttab_copy_ptr, boolean] => {
    switch (s.kind) {
      case 0: return [cref(w.a.domid, 8, s.offset), true];
      case 1: return [cref(w.a.domid, 9, s.offset), true];
      case 2: return [cref(w.b.domid, 8, s.offset), true];
      case 3: return [cref(w.b.domid, 9, s.offset), true];
      case 4: return [cref(w.b.domid, 10, s.offset), true];
      case 5: return [cref(w.a.domid, 11, s.offset), true];
      case 6: return [cref(w.gone, 9, s.offset), true];
      case 7: return [cgmfn(DATA_GFN + (s.offset % 3), s.offset), false];
      case 8: return [cgmfn(DATA_GFN, s.offset, w.a.domid), false];
      default: return [cref(w.c.domid, 9, s.offset), true];
    }
  };
  const [source, srcRef] = side(p.src);
  const [dest, dstRef] = side(p.dst);
  return { source, dest, len: p.len, flags: (srcRef ? GNTCOPY_source_gref : 0) | (dstRef ? GNTCOPY_dest_gref : 0), status: 1 };
}

// ---------------------------------------------------------------------------
// Event channels

t.test('event channels', async (t) => {
  t.test('alloc_unbound, bind_interdomain, and the new local port starts pending', async (t) => {
    const { a, b } = setup();
    const pa = a.alloc(b.domid);
    t.ok(pa > 0, 'a port');
    t.match(a.status(pa), { rc: 0, status: EVTCHNSTAT_unbound, vcpu: 0, u: { unbound: { dom: b.domid } } });
    t.notOk(a.pending(pa), 'an unbound port is not pending');

    const pb = b.bind(a.domid, pa);
    t.match(b.status(pb), { rc: 0, status: EVTCHNSTAT_interdomain, u: { interdomain: { dom: a.domid, port: pa } } });
    t.match(a.status(pa), { rc: 0, status: EVTCHNSTAT_interdomain, u: { interdomain: { dom: b.domid, port: pb } } });
    t.ok(b.pending(pb), 'the binder\'s new port is pending, as in Xen');
    t.ok(b.masked(pb), 'ports start masked');
    t.equal(b.selector(), 0n, 'masked: no selector bit');
    t.equal(b.upcallPending(), 0);
    t.notOk(a.pending(pa), 'the far end is not raised by the bind');
  });

  t.test('send sets pending, the selector bit, upcall_pending and the wake word', async (t) => {
    const { a, b } = setup();
    // 70 ports in a, so the one under test sits in selector row 1.
    const ports = Array.from({ length: 70 }, () => a.alloc(b.domid));
    const pa = ports[69]!;
    t.ok(pa >= BITS_PER_EVTCHN_WORD, `port ${pa} is in row ${Math.floor(pa / BITS_PER_EVTCHN_WORD)}`);
    const pb = b.bind(a.domid, pa);
    a.setMasked(pa, false);

    t.equal(b.send(pb), 0);
    t.ok(a.pending(pa), 'pending in a\'s shared_info');
    t.equal(a.selector(), 1n << BigInt(Math.floor(pa / BITS_PER_EVTCHN_WORD)), 'exactly the row\'s selector bit');
    t.equal(a.upcallPending(), 1);
    t.equal(a.woken(), 1, 'a\'s vCPU was kicked');

    // The guest enters its upcall but has not yet cleared the port: a second
    // send finds it pending and changes nothing at all.
    a.enterUpcall();
    const before = a.snapshot();
    t.equal(b.send(pb), 0);
    t.equal(a.snapshot(), before, 'second send while pending: shared_info and wake word unchanged');

    t.same(a.upcall(), [pa], 'the upcall finds exactly that port');
    t.equal(b.send(pb), 0);
    t.equal(a.upcallPending(), 1, 'after the port was cleared, a send raises it again');
    t.equal(a.woken(), 1);
  });

  t.test('a masked port: send sets pending only; EVTCHNOP_unmask delivers it', async (t) => {
    const { a, b } = setup();
    const pa = a.alloc(b.domid);
    const pb = b.bind(a.domid, pa);
    t.ok(a.masked(pa), 'masked from the start');

    t.equal(b.send(pb), 0);
    t.ok(a.pending(pa), 'pending');
    t.equal(a.selector(), 0n, 'no selector bit');
    t.equal(a.upcallPending(), 0, 'no upcall');
    t.equal(a.woken(), 0, 'no kick');

    t.equal(a.unmask(pa), 0);
    t.notOk(a.masked(pa), 'unmask cleared the mask bit');
    t.ok(a.selected(pa), 'selector bit set');
    t.equal(a.upcallPending(), 1, 'upcall_pending set');
    t.equal(a.woken(), 1, 'kicked');
    t.same(a.upcall(), [pa]);

    t.equal(a.unmask(pa), 0, 'unmask of an unmasked, idle port');
    t.equal(a.upcallPending(), 0, 'nothing to deliver');
  });

  t.test('bind_vcpu moves delivery to another vcpu_info and wake word', async (t) => {
    const { a, b } = setup({ a: { vcpus: 2 } });
    const pa = a.alloc(b.domid);
    const pb = b.bind(a.domid, pa);
    a.setMasked(pa, false);
    t.equal(a.ev(EVTCHNOP_bind_vcpu, { port: pa, vcpu: 1 }), 0);
    t.equal(a.status(pa).vcpu, 1, 'status reports the new vCPU');
    t.equal(b.send(pb), 0);
    t.equal(a.upcallPending(0), 0, 'nothing on vCPU 0');
    t.equal(a.woken(0), 0);
    t.ok(a.selected(pa, 1), 'selector of vCPU 1');
    t.equal(a.upcallPending(1), 1);
    t.equal(a.woken(1), 1);
  });

  t.test('status reports virq ports with their vCPU and virq', async (t) => {
    const { a } = setup();
    const p = a.bindVirq(VIRQ_DEBUG);
    t.match(a.status(p), { rc: 0, status: EVTCHNSTAT_virq, vcpu: 0, u: { virq: VIRQ_DEBUG } });
    t.match(a.status(MAX_EVTCHNS - 1), { rc: 0, status: EVTCHNSTAT_closed }, 'a never-used port is closed');
  });

  t.test('close makes the peer end unbound to the closer, which can bind it again', async (t) => {
    const { a, b } = setup();
    const pa = a.alloc(b.domid);
    const pb = b.bind(a.domid, pa);
    t.equal(b.close(pb), 0);
    t.match(b.status(pb), { status: EVTCHNSTAT_closed });
    t.match(a.status(pa), { status: EVTCHNSTAT_unbound, u: { unbound: { dom: b.domid } } }, 'a\'s end waits for b again');
    t.equal(b.send(pb), -XEN_EINVAL, 'send on a closed port');
    t.equal(b.close(pb), -XEN_EINVAL, 'close of a closed port');
    t.equal(a.send(pa), 0, 'send on an unbound port is silently dropped, as in Xen');
    const again = b.bind(a.domid, pa);
    t.match(a.status(pa), { status: EVTCHNSTAT_interdomain, u: { interdomain: { dom: b.domid, port: again } } });
  });

  t.test('bind_interdomain to a port not offered to the caller', async (t) => {
    const { a, b, host } = setup();
    const c = new Guest(host, host.createDomain({ ...SMALL, name: 'c' }).domid);
    const forC = a.alloc(c.domid);
    const bind = (g: Guest, remote_dom: number, remote_port: number) =>
      g.ev(EVTCHNOP_bind_interdomain, { remote_dom, remote_port, local_port: 0 });
    t.equal(bind(b, a.domid, forC), -XEN_EINVAL, 'offered to c, not b');
    t.equal(bind(b, a.domid, forC + 1), -XEN_EINVAL, 'a closed port');
    const pc = c.bind(a.domid, forC);
    t.equal(bind(c, a.domid, forC), -XEN_EINVAL, 'already bound');
    t.equal(bind(b, a.domid, 0), -XEN_EINVAL, 'port 0');
    t.equal(bind(b, a.domid, MAX_EVTCHNS), -XEN_EINVAL, 'port beyond the table');
    t.equal(bind(b, 0x7000, 1), -XEN_ESRCH, 'no such domain');
    t.match(c.status(pc), { status: EVTCHNSTAT_interdomain }, 'the failed binds changed nothing');
  });

  t.test('alloc_unbound for another domain: EPERM unprivileged, works for dom0', async (t) => {
    const { dom0, a, b } = setup({ dom0: true });
    const op = { dom: b.domid, remote_dom: a.domid, port: 0 };
    t.equal(a.ev(EVTCHNOP_alloc_unbound, op), -XEN_EPERM);
    t.equal(a.status(1, b.domid).rc, -XEN_EPERM, 'status of another domain\'s port, too');

    const pb = dom0!.alloc(a.domid, b.domid);
    t.match(b.status(pb), { status: EVTCHNSTAT_unbound, u: { unbound: { dom: a.domid } } }, 'the port is b\'s');
    t.match(dom0!.status(pb, b.domid), { rc: 0, status: EVTCHNSTAT_unbound }, 'dom0 may read it');
    const pa = a.bind(b.domid, pb);
    t.match(b.status(pb), { status: EVTCHNSTAT_interdomain, u: { interdomain: { dom: a.domid, port: pa } } });
    t.equal(dom0!.ev(EVTCHNOP_alloc_unbound, { dom: 0x7000, remote_dom: a.domid, port: 0 }), -XEN_ESRCH);
  });

  t.test('bind_virq twice, closing frees the virq; bind_vcpu to a missing vCPU', async (t) => {
    const { a, b } = setup();
    const p = a.bindVirq(VIRQ_DEBUG);
    t.equal(a.ev(EVTCHNOP_bind_virq, { virq: VIRQ_DEBUG, vcpu: 0, port: 0 }), -XEN_EEXIST);
    t.equal(a.close(p), 0);
    t.ok(a.bindVirq(VIRQ_DEBUG) > 0, 'bound again after close');
    t.equal(a.ev(EVTCHNOP_bind_virq, { virq: NR_VIRQS, vcpu: 0, port: 0 }), -XEN_EINVAL, 'virq beyond NR_VIRQS');
    t.equal(a.ev(EVTCHNOP_bind_virq, { virq: VIRQ_DEBUG, vcpu: 1, port: 0 }), -XEN_ENOENT, 'vCPU 1 of a 1-vCPU domain');

    const pa = a.alloc(b.domid);
    t.equal(a.ev(EVTCHNOP_bind_vcpu, { port: pa, vcpu: 1 }), -XEN_ENOENT);
    t.equal(a.ev(EVTCHNOP_bind_vcpu, { port: pa, vcpu: -1 }), -XEN_ENOENT);
    t.equal(a.ev(EVTCHNOP_bind_vcpu, { port: pa + 1, vcpu: 0 }), -XEN_EINVAL, 'a closed port');
  });

  t.test('port exhaustion: ENOSPC, and a closed port is reused', async (t) => {
    const { a, b } = setup();
    const ports: number[] = [];
    for (;;) {
      const op = { dom: DOMID_SELF, remote_dom: b.domid, port: 0 };
      const rc = a.ev(EVTCHNOP_alloc_unbound, op);
      if (rc !== 0) {
        t.equal(rc, -XEN_ENOSPC);
        break;
      }
      ports.push(op.port);
      if (ports.length > MAX_EVTCHNS) break;
    }
    t.equal(ports.length, MAX_EVTCHNS - 1, 'every port but 0');
    t.equal(new Set(ports).size, ports.length, 'all distinct');
    t.equal(a.ev(EVTCHNOP_bind_virq, { virq: VIRQ_DEBUG, vcpu: 0, port: 0 }), -XEN_ENOSPC, 'bind_virq too');
    t.equal(a.close(ports[41]!), 0);
    t.equal(a.alloc(b.domid), ports[41], 'the one free port is handed out again');
  });

  t.test('port numbers out of range', async (t) => {
    const { a } = setup();
    for (const port of [0, -1, MAX_EVTCHNS, 2 ** 32, 1.5]) {
      t.equal(a.send(port), -XEN_EINVAL, `send ${port}`);
      t.equal(a.close(port), -XEN_EINVAL, `close ${port}`);
      t.equal(a.unmask(port), -XEN_EINVAL, `unmask ${port}`);
      t.equal(a.ev(EVTCHNOP_bind_vcpu, { port, vcpu: 0 }), -XEN_EINVAL, `bind_vcpu ${port}`);
    }
    for (const port of [-1, MAX_EVTCHNS, 2 ** 32]) t.equal(a.status(port).rc, -XEN_EINVAL, `status ${port}`);
  });
});

// ---------------------------------------------------------------------------
// Grant tables

t.test('grant tables', async (t) => {
  t.test('map a grant: GTF_reading|GTF_writing while mapped, the page is the granter\'s memory', async (t) => {
    const { a, b } = setup();
    a.grant(8, b.domid, DATA_GFN);
    a.d.mem.u32[(DATA_GFN * PAGE_SIZE + 64) >> 2] = 0x01020304;

    const op = b.map(a.domid, 8);
    t.equal(op.status, GNTST_okay);
    t.ok(op.handle >= 0, 'a handle');
    t.equal(op.dev_bus_addr, BigInt(DATA_GFN * PAGE_SIZE), 'dev_bus_addr is the frame');
    t.equal(a.grantFlags(8), GTF_permit_access | GTF_reading | GTF_writing);
    const page = writablePage(op.page);
    t.ok(page.writable);
    t.equal(page.load32(64), 0x01020304, 'reads a\'s memory');
    page.store32(128, 0xcafef00d);
    t.equal(a.d.mem.u32[(DATA_GFN * PAGE_SIZE + 128) >> 2], 0xcafef00d, 'writes a\'s memory');

    t.equal(b.unmap(op.handle), GNTST_okay);
    t.equal(a.grantFlags(8), GTF_permit_access, 'flags cleared by the unmap');
    t.equal(code(() => page.load32(64)), 'EFAULT', 'the page is dead');
    t.equal(code(() => page.store8(0, 1)), 'EFAULT');
    t.equal(b.unmap(op.handle), GNTST_bad_handle, 'double unmap');
    t.equal(b.unmap(-1), GNTST_bad_handle);
    t.equal(b.unmap(1 << 20), GNTST_bad_handle);
  });

  t.test('map refusals', async (t) => {
    const { a, b, host } = setup();
    const c = new Guest(host, host.createDomain({ ...SMALL, name: 'c' }).domid);
    a.grant(8, b.domid, DATA_GFN);
    t.equal(c.map(a.domid, 8).status, GNTST_general_error, 'granted to b, not c');
    t.equal(b.map(a.domid, GRANT_ENTRIES_PER_FRAME).status, GNTST_bad_gntref, 'ref beyond the one frame');
    t.equal(b.map(a.domid, -1).status, GNTST_bad_gntref, 'negative ref');
    t.equal(b.map(a.domid, 9).status, GNTST_general_error, 'an entry never granted');
    t.equal(b.map(0x7000, 8).status, GNTST_bad_domain, 'no such domain');
    t.equal(b.map(a.domid, 8, 0).status, GNTST_bad_gntref, 'neither host_map nor device_map');
    t.equal(b.map(a.domid, 8, GNTMAP_readonly).status, GNTST_bad_gntref, 'readonly alone');
    a.revoke(8);
    t.equal(b.map(a.domid, 8).status, GNTST_general_error, 'revoked (flags 0)');
    t.equal(a.grantFlags(8), 0, 'a refused map leaves the entry alone');
    const failed = b.map(a.domid, 8);
    t.equal(failed.page, null);
    t.equal(b.unmap(failed.handle), GNTST_bad_handle, 'a failed map hands out no handle');
  });

  t.test('a GTF_readonly grant: writable map denied, GNTMAP_readonly gives a page with no store methods', async (t) => {
    const { a, b } = setup();
    a.grant(8, b.domid, DATA_GFN, GTF_readonly);
    a.d.mem.u8[DATA_GFN * PAGE_SIZE] = 0x77;
    t.equal(b.map(a.domid, 8).status, GNTST_general_error);
    t.equal(a.grantFlags(8), GTF_permit_access | GTF_readonly, 'no flag left behind by the refusal');

    const op = b.map(a.domid, 8, GNTMAP_host_map | GNTMAP_readonly);
    t.equal(op.status, GNTST_okay);
    t.equal(a.grantFlags(8), GTF_permit_access | GTF_readonly | GTF_reading, 'reading, not writing');
    const page = op.page!;
    t.notOk(page.writable);
    t.equal(page.load8(0), 0x77);
    for (const method of ['store8', 'store16', 'store32', 'write']) t.notOk(method in page, `no ${method} on a read-only mapping`);
    t.equal(code(() => writablePage(page)), 'EACCES');
    t.equal(a.d.mem.u8[DATA_GFN * PAGE_SIZE], 0x77, 'memory untouched');
    t.equal(b.unmap(op.handle), GNTST_okay);
    t.equal(a.grantFlags(8), GTF_permit_access | GTF_readonly);
  });

  t.test('two mappings of one ref keep GTF_reading until the last unmap', async (t) => {
    const { a, b } = setup();
    a.grant(8, b.domid, DATA_GFN);
    const rw = b.map(a.domid, 8);
    const ro = b.map(a.domid, 8, GNTMAP_host_map | GNTMAP_readonly);
    t.equal(rw.status, GNTST_okay);
    t.equal(ro.status, GNTST_okay);
    t.not(rw.handle, ro.handle, 'two handles');
    t.equal(b.unmap(rw.handle), GNTST_okay);
    t.equal(a.grantFlags(8), GTF_permit_access | GTF_reading, 'writing gone with the writable map, reading stays');
    t.equal(ro.page!.load8(0), 0, 'the other mapping still works');
    t.equal(code(() => rw.page!.load8(0)), 'EFAULT', 'the unmapped one does not');
    t.equal(b.unmap(ro.handle), GNTST_okay);
    t.equal(a.grantFlags(8), GTF_permit_access, 'all clear after the last unmap');
  });

  t.test('GNTTABOP_copy', async (t) => {
    const { a, b, dom0 } = setup({ dom0: true });
    const SRC = DATA_GFN;
    const DST = DATA_GFN + 1;
    const B_GFN = DATA_GFN + 2;
    a.grant(8, b.domid, SRC, GTF_readonly);
    a.grant(9, b.domid, DST);
    a.d.mem.u8.fill(0xab, SRC * PAGE_SIZE + 100, SRC * PAGE_SIZE + 132);
    const ref = (r: number, domid = a.domid, offset = 0): gnttab_copy_ptr => ({ u: { ref: r, gmfn: 0 }, domid, offset });
    const gmfn = (g: number, domid = DOMID_SELF, offset = 0): gnttab_copy_ptr => ({ u: { ref: 0, gmfn: g }, domid, offset });

    t.equal(b.copy(ref(8, a.domid, 100), gmfn(B_GFN, DOMID_SELF, 8), 32, GNTCOPY_source_gref), GNTST_okay, 'from a\'s ref');
    t.same([...b.d.mem.u8.subarray(B_GFN * PAGE_SIZE + 8, B_GFN * PAGE_SIZE + 40)], new Array(32).fill(0xab));
    t.equal(a.grantFlags(8), GTF_permit_access | GTF_readonly, 'no pin left after the copy');

    b.d.mem.u8.fill(0xcd, B_GFN * PAGE_SIZE, B_GFN * PAGE_SIZE + 16);
    t.equal(b.copy(gmfn(B_GFN), ref(9, a.domid, 4000), 16, GNTCOPY_dest_gref), GNTST_okay, 'into a\'s ref');
    t.same([...a.d.mem.u8.subarray(DST * PAGE_SIZE + 4000, DST * PAGE_SIZE + 4016)], new Array(16).fill(0xcd));
    t.equal(a.grantFlags(9), GTF_permit_access, 'no pin left after the copy');

    t.equal(b.copy(gmfn(SRC, a.domid), gmfn(B_GFN), 8, 0), GNTST_permission_denied, 'a foreign gmfn, unprivileged');
    t.equal(b.copy(gmfn(B_GFN), gmfn(SRC, a.domid), 8, 0), GNTST_permission_denied, 'a foreign gmfn as destination');
    t.equal(b.copy(gmfn(B_GFN), ref(8), 8, GNTCOPY_dest_gref), GNTST_general_error, 'into a read-only grant');
    t.equal(a.grantFlags(8), GTF_permit_access | GTF_readonly);
    t.equal(b.copy(ref(8, a.domid, 4090), gmfn(B_GFN), 7, GNTCOPY_source_gref), GNTST_bad_copy_arg, 'source offset+len > 4096');
    t.equal(b.copy(gmfn(B_GFN), ref(9, a.domid, 4096), 1, GNTCOPY_dest_gref), GNTST_bad_copy_arg, 'dest offset+len > 4096');
    t.equal(b.copy(ref(8, 0x7000), gmfn(B_GFN), 8, GNTCOPY_source_gref), GNTST_bad_domain, 'a missing domain');
    t.equal(b.copy(ref(GRANT_ENTRIES_PER_FRAME), gmfn(B_GFN), 8, GNTCOPY_source_gref), GNTST_bad_gntref);
    t.equal(b.copy(ref(8), ref(9), 8, GNTCOPY_source_gref | GNTCOPY_dest_gref), GNTST_okay, 'ref to ref');
    t.equal(dom0!.copy(gmfn(SRC, a.domid), gmfn(B_GFN, b.domid), 8, 0), GNTST_permission_denied, 'frames only of DOMID_SELF, even for dom0 (Xen: only allow copy-by-mfn for DOMID_SELF)');
  });

  t.test('GNTTABOP_copy batch: each op the status it gets alone, only the good ones copied, no lock or flag left', async (t) => {
    const singles = await copyWorld();
    const batched = await copyWorld();
    const dying = [singles.kill(), batched.kill()];
    const ops = (w: CopyWorld): gnttab_copy[] => mixedCopies(w).map(([, op]) => op);
    const want = mixedCopies(singles).map(([what, op]) => [what, singles.dom0.copy(op.source, op.dest, op.len, op.flags)] as const);
    const batch = ops(batched);
    t.equal(batched.dom0.gt(GNTTABOP_copy, batch, batch.length), 0);
    const got = mixedCopies(batched).map(([what], i) => [what, batch[i]!.status] as const);
    t.same(got, want, 'statuses in order, as one by one');
    t.same(want, MIXED_STATUSES, 'the statuses Xen gives each');
    t.same(pages(batched), pages(singles), 'the bytes of every page involved, as one by one');
    t.same([...batched.dom0.d.mem.u8.subarray(DATA_GFN * PAGE_SIZE, DATA_GFN * PAGE_SIZE + 64)],
      [...batched.a.d.mem.u8.subarray(DATA_GFN * PAGE_SIZE + 100, DATA_GFN * PAGE_SIZE + 164)], 'a good copy moved its bytes');
    t.same(copyResidue(batched), { locks: [0, 0, 0, 0], flags: 0 }, 'no grant lock held, no GTF_reading/GTF_writing left');
    await Promise.all(dying);
  });

  t.test('GNTTABOP_copy count: as Xen\'s do_grant_table_op takes it', async (t) => {
    const w = await copyWorld();
    const dying = w.kill();
    const fresh = (): gnttab_copy[] => mixedCopies(w).map(([, op]) => ({ ...op, status: 1 }));
    const ops = fresh();
    t.equal(w.dom0.gt(GNTTABOP_copy, ops, 2), 0, 'the first two');
    t.same(ops.map((o) => o.status), [GNTST_okay, GNTST_okay, ...new Array(ops.length - 2).fill(1)], 'the rest untouched');
    t.equal(w.dom0.gt(GNTTABOP_copy, ops, ops.length + 1), -XEN_EFAULT, 'past the array (guest_handle_okay)');
    t.equal(w.dom0.gt(GNTTABOP_copy, ops[0], 2), -XEN_EFAULT, 'two of one struct');
    t.equal(w.dom0.gt(GNTTABOP_copy, ops, -1), -XEN_EINVAL, 'negative ((int)count < 0)');
    t.equal(w.dom0.gt(GNTTABOP_copy, ops, 2 ** 31), -XEN_EINVAL, 'beyond INT_MAX');
    t.equal(w.dom0.gt(GNTTABOP_copy, ops, 1.5), -XEN_EINVAL, 'not an integer');
    t.equal(w.dom0.gt(GNTTABOP_copy, ops), -XEN_EINVAL, 'an array and no count');
    t.equal(w.dom0.gt(GNTTABOP_copy, undefined, 1), -XEN_EFAULT, 'a count and no array');
    t.equal(w.dom0.gt(GNTTABOP_copy, undefined, 0), 0, 'nothing to do');
    const one = fresh()[0]!;
    t.equal(w.dom0.gt(GNTTABOP_copy, one, 1), 0);
    t.equal(one.status, GNTST_okay, 'one struct, count 1');
    t.equal(w.dom0.gt(GNTTABOP_query_size, { dom: DOMID_SELF, nr_frames: 0, max_nr_frames: 0, status: 1 }, 2), -XEN_EINVAL, 'a batch of another op');
    t.same(copyResidue(w), { locks: [0, 0, 0, 0], flags: 0 });
    await dying;
  });

  t.test('property: a GNTTABOP_copy batch does what the same copies one by one do', async (t) => {
    await fc.assert(fc.asyncProperty(fc.array(copyArb, { minLength: 1, maxLength: 24 }), async (picks) => {
      const singles = await copyWorld();
      const batched = await copyWorld();
      const dying = [singles.kill(), batched.kill()];
      const statuses = picks.map((p) => {
        const op = randomCopy(singles, p);
        return singles.dom0.copy(op.source, op.dest, op.len, op.flags);
      });
      const many = picks.map((p) => randomCopy(batched, p));
      if (batched.dom0.gt(GNTTABOP_copy, many, many.length) !== 0) throw new Error('batch refused');
      const got = many.map((op) => op.status);
      if (JSON.stringify(got) !== JSON.stringify(statuses)) throw new Error(`statuses ${got}, one by one ${statuses}`);
      if (JSON.stringify(pages(batched)) !== JSON.stringify(pages(singles))) throw new Error('the pages differ from one by one');
      const left = copyResidue(batched);
      if (left.flags !== 0 || left.locks.some((l) => l !== 0)) throw new Error(`left behind: ${JSON.stringify(left)}`);
      await Promise.all(dying);
    }), { numRuns: 200 });
    t.pass('200 random batches of good and bad copies');
  });

  t.test('query_size and setup_table', async (t) => {
    const { a, b, dom0 } = setup({ dom0: true, a: { maxGrantFrames: 4 } });
    t.match(a.querySize(), { status: GNTST_okay, nr_frames: 1, max_nr_frames: 4 });
    t.same(a.grantFrames(), [a.d.specialBase + SpecialPage.grantFrame0], 'frame 0 is the builder\'s special page');
    t.match(b.querySize(a.domid), { status: GNTST_permission_denied }, 'another domain, unprivileged');
    t.match(dom0!.querySize(a.domid), { status: GNTST_okay, nr_frames: 1, max_nr_frames: 4 });
    const op: gnttab_setup_table = { dom: DOMID_SELF, nr_frames: 2, status: 1, frame_list: [] };
    t.equal(a.gt(GNTTABOP_setup_table, op), 0);
    t.not(op.status, GNTST_okay, 'more frames than placed');
  });
});

t.test('grant table growth with XENMAPSPACE_grant_table', async (t) => {
  t.test('idx 0 relocates frame 0 with its entries', async (t) => {
    const { a, b } = setup();
    a.grant(8, b.domid, DATA_GFN, GTF_readonly);
    const old = a.grantFrames()[0]!;
    const entry = (gfn: number) => [...a.d.mem.u8.subarray(gfn * PAGE_SIZE + 8 * 8, gfn * PAGE_SIZE + 9 * 8)];
    const bytes = entry(old);
    t.equal(a.addToPhysmap(XENMAPSPACE_grant_table, 0, 20), 0);
    t.same(a.grantFrames(), [20], 'setup_table reports the new place');
    t.same(entry(20), bytes, 'the entry moved with the frame');
    const op = b.map(a.domid, 8, GNTMAP_host_map | GNTMAP_readonly);
    t.equal(op.status, GNTST_okay, 'and still maps');
    t.equal(a.grantFlags(8), GTF_permit_access | GTF_readonly | GTF_reading, 'the pin is visible at the new place');
    t.equal(b.unmap(op.handle), GNTST_okay);
    t.match(a.querySize(), { nr_frames: 1 }, 'relocation does not grow the table');
  });

  t.test('frames grow one at a time up to max_nr_frames', async (t) => {
    const { a, b } = setup({ a: { maxGrantFrames: 4 } });
    t.equal(a.addToPhysmap(XENMAPSPACE_grant_table, 2, 30), -XEN_EINVAL, 'idx beyond nr_frames');
    for (let idx = 1; idx < 4; idx++) {
      t.equal(a.addToPhysmap(XENMAPSPACE_grant_table, idx, 30 + idx), 0, `frame ${idx}`);
      t.match(a.querySize(), { nr_frames: idx + 1, max_nr_frames: 4 });
    }
    t.equal(a.addToPhysmap(XENMAPSPACE_grant_table, 4, 40), -XEN_EINVAL, 'at max');
    t.equal(a.addToPhysmap(XENMAPSPACE_grant_table, 5, 40), -XEN_EINVAL, 'beyond max');
    t.equal(a.addToPhysmap(XENMAPSPACE_grant_table, 1, 33), -XEN_EINVAL, 'a gpfn another frame holds');
    t.same(a.grantFrames(), [a.d.specialBase + SpecialPage.grantFrame0, 31, 32, 33]);

    const ref = 3 * GRANT_ENTRIES_PER_FRAME + 5;
    a.grant(ref, b.domid, DATA_GFN);
    t.equal(a.entryAddr(ref), 33 * PAGE_SIZE + 5 * grant_entry_v1.size, 'the entry is in frame 3');
    const op = b.map(a.domid, ref);
    t.equal(op.status, GNTST_okay, 'a grant in frame 3 maps');
    t.equal(b.unmap(op.handle), GNTST_okay);
    t.equal(b.map(a.domid, 4 * GRANT_ENTRIES_PER_FRAME).status, GNTST_bad_gntref, 'just beyond the last frame');
  });

  t.test('a new frame starts zeroed', async (t) => {
    const { a, b } = setup();
    a.d.mem.u8.fill(0xff, 30 * PAGE_SIZE, 31 * PAGE_SIZE);
    t.equal(a.addToPhysmap(XENMAPSPACE_grant_table, 1, 30), 0);
    t.equal(a.d.mem.u8.subarray(30 * PAGE_SIZE, 31 * PAGE_SIZE).every((x) => x === 0), true);
    t.equal(b.map(a.domid, GRANT_ENTRIES_PER_FRAME).status, GNTST_general_error, 'an empty entry grants nothing');
  });
});

// ---------------------------------------------------------------------------
// memory_op

t.test('memory_op', async (t) => {
  t.test('XENMAPSPACE_shared_info relocates shared info; events land at the new place', async (t) => {
    const { a, b } = setup();
    const pa = a.alloc(b.domid);
    const pb = b.bind(a.domid, pa);
    a.setMasked(pa, false);
    t.equal(a.addToPhysmap(XENMAPSPACE_shared_info, 0, 40), 0);
    t.equal(a.d.sharedInfoGfn, 40);
    t.notOk(a.masked(pa), 'the mask bits moved with the page');
    t.ok(a.masked(pa + 1), 'all of them');
    t.equal(b.send(pb), 0);
    t.ok(testBit(a.d.mem.u8, 40 * PAGE_SIZE + SI_PENDING, pa), 'pending at gfn 40');
    t.equal(a.d.mem.u8[40 * PAGE_SIZE + SI_VCPU_INFO + VI_UPCALL_PENDING], 1, 'upcall_pending at gfn 40');
    const special = (a.d.specialBase + SpecialPage.sharedInfo) * PAGE_SIZE;
    t.notOk(testBit(a.d.mem.u8, special + SI_PENDING, pa), 'not at the old place');

    t.equal(a.addToPhysmap(XENMAPSPACE_shared_info, 0, a.d.specialBase), -XEN_EINVAL, 'gpfn in the special area');
    t.equal(a.addToPhysmap(XENMAPSPACE_shared_info, 0, a.d.nrPages), -XEN_EINVAL, 'gpfn beyond memory');
    t.equal(a.addToPhysmap(XENMAPSPACE_shared_info, 0, -1), -XEN_EINVAL, 'negative gpfn');
    t.equal(a.addToPhysmap(XENMAPSPACE_shared_info, 1, 41), -XEN_EINVAL, 'idx 1');
    t.equal(a.addToPhysmap(XENMAPSPACE_gmfn, 0, 41), -XEN_EINVAL, 'a space not supported');
    t.equal(a.addToPhysmap(XENMAPSPACE_shared_info, 0, 41, b.domid), -XEN_EPERM, 'another domain');
    t.equal(a.d.sharedInfoGfn, 40, 'unchanged by the refusals');
  });

  t.test('XENMEM_memory_map: RAM below the special pages, then reserved', async (t) => {
    const { a } = setup();
    const op: xen_memory_map = { nr_entries: 0, buffer: [] };
    t.equal(a.mem(XENMEM_memory_map, op), 0);
    t.equal(op.nr_entries, 2);
    t.same(op.buffer, [
      { addr: 0, size: a.d.specialBase * PAGE_SIZE, type: E820_RAM },
      { addr: a.d.specialBase * PAGE_SIZE, size: SPECIAL_PAGES * PAGE_SIZE, type: E820_RESERVED },
    ]);
    t.equal(a.mem(XENMEM_current_reservation, { domid: DOMID_SELF, nr_extents: 0 }), a.d.nrPages);
  });

  t.test('add_to_physmap_batch(gmfn_foreign): dom0 maps a guest frame, a guest may not', async (t) => {
    const { dom0, a, b } = setup({ dom0: true });
    a.d.mem.u32[(DATA_GFN * PAGE_SIZE) >> 2] = 0x12345678;
    const batch = (idxs: number[], space = XENMAPSPACE_gmfn_foreign, foreign = a.domid): xen_add_to_physmap_batch => ({
      domid: DOMID_SELF, space, size: idxs.length, u: { foreign_domid: foreign }, idxs, gpfns: idxs.map((_, i) => 50 + i), errs: [], pages: [],
    });
    const op = batch([DATA_GFN, a.d.nrPages]);
    t.equal(dom0!.mem(XENMEM_add_to_physmap_batch, op), 0);
    t.same(op.errs, [0, -XEN_EINVAL], 'the frame beyond memory fails alone');
    t.equal(op.pages[0]!.load32(0), 0x12345678, 'dom0 reads a\'s frame');
    op.pages[0]!.store32(4, 0x9abcdef0);
    t.equal(a.d.mem.u32[(DATA_GFN * PAGE_SIZE + 4) >> 2], 0x9abcdef0, 'and writes it');
    t.equal(op.pages[1], null);
    t.equal(b.mem(XENMEM_add_to_physmap_batch, batch([DATA_GFN])), -XEN_EPERM, 'unprivileged');
    t.equal(dom0!.mem(XENMEM_add_to_physmap_batch, batch([DATA_GFN], XENMAPSPACE_gmfn_foreign, 0x7000)), -XEN_ESRCH);
    t.equal(dom0!.mem(XENMEM_add_to_physmap_batch, batch([DATA_GFN], XENMAPSPACE_gmfn)), -XEN_EINVAL, 'other spaces');
  });
});

// ---------------------------------------------------------------------------
// hvm_op

t.test('hvm_op set/get param', async (t) => {
  const { dom0, a, b } = setup({ dom0: true });
  const vector = 0xf3n;
  const value = (BigInt(HVM_PARAM_CALLBACK_TYPE_VECTOR) << 56n) | vector;
  t.equal(a.setParam(HVM_PARAM_CALLBACK_IRQ, value), 0);
  const got = a.getParam(HVM_PARAM_CALLBACK_IRQ);
  t.equal(got.rc, 0);
  t.equal(got.value, value, 'the 64-bit value round-trips');
  t.equal((got.value & HVM_PARAM_CALLBACK_IRQ_TYPE_MASK) >> 56n, BigInt(HVM_PARAM_CALLBACK_TYPE_VECTOR), 'type in bits 63:56');
  t.equal(a.getParam(HVM_PARAM_CALLBACK_IRQ, a.domid).value, value, 'by own domid too');

  t.equal(a.setParam(HVM_PARAM_CALLBACK_IRQ, 0xffff_ffff_ffff_ffffn), 0);
  t.equal(a.getParam(HVM_PARAM_CALLBACK_IRQ).value, 0xffff_ffff_ffff_ffffn, 'all 64 bits');

  t.equal(b.setParam(HVM_PARAM_STORE_PFN, 1n, a.domid), -XEN_EPERM, 'unprivileged, another domain');
  t.equal(b.getParam(HVM_PARAM_STORE_PFN, a.domid).rc, -XEN_EPERM);
  t.equal(dom0!.setParam(HVM_PARAM_STORE_PFN, 0x1234n, a.domid), 0, 'the toolstack sets a guest\'s param');
  t.equal(a.getParam(HVM_PARAM_STORE_PFN).value, 0x1234n, 'and the guest reads it');
  t.equal(dom0!.setParam(HVM_PARAM_STORE_PFN, 1n, 0x7000), -XEN_ESRCH);
  for (const index of [-1, 64, 2 ** 32, 1.5]) {
    t.equal(a.setParam(index, 1n), -XEN_EINVAL, `set index ${index}`);
    t.equal(a.getParam(index).rc, -XEN_EINVAL, `get index ${index}`);
  }
});

// ---------------------------------------------------------------------------
// sched_op

t.test('sched_op', async (t) => {
  t.test('SCHEDOP_shutdown: bad reasons, poweroff, VIRQ_DOM_EXC in dom0', async (t) => {
    const { host, dom0, a } = setup({ dom0: true });
    const exc = dom0!.bindVirq(VIRQ_DOM_EXC);
    dom0!.setMasked(exc, false);
    for (const reason of [-1, 99, 1.5]) t.equal(a.sched(SCHEDOP_shutdown, { reason }), -XEN_EINVAL, `reason ${reason}`);
    t.equal(a.sched(SCHEDOP_shutdown), -XEN_EINVAL, 'no argument: no reason');
    t.equal(dom0!.upcallPending(), 0, 'no VIRQ for refused shutdowns');

    t.equal(a.sched(SCHEDOP_shutdown, { reason: SHUTDOWN_poweroff }), 0);
    const info = host.hv.getDomainInfo(dom0!.d, a.domid);
    t.match(info, { domain: a.domid, state: 'shutdown', shutdown_reason: SHUTDOWN_poweroff });
    t.ok(dom0!.pending(exc), 'VIRQ_DOM_EXC pending in dom0');
    t.ok(dom0!.selected(exc));
    t.equal(dom0!.upcallPending(), 1);
    t.equal(dom0!.woken(), 1, 'dom0 kicked');
    t.equal(a.woken(), 1, 'the domain\'s own vCPU kicked so it stops');

    t.same(dom0!.upcall(), [exc]);
    t.equal(a.sched(SCHEDOP_shutdown, { reason: SHUTDOWN_reboot }), 0, 'a second shutdown');
    t.match(host.hv.getDomainInfo(dom0!.d, a.domid), { shutdown_reason: SHUTDOWN_poweroff }, 'the first reason stands');
    t.equal(dom0!.upcallPending(), 0, 'no second VIRQ');
    t.equal(host.hv.getDomainInfo(a.d, 0), -XEN_EPERM, 'getdomaininfo of another domain is privileged');
  });

  t.test('shutdown with no dom0 VIRQ bound raises nothing', async (t) => {
    const { host, dom0, a } = setup({ dom0: true });
    const before = dom0!.snapshot();
    t.equal(a.sched(SCHEDOP_shutdown, { reason: SHUTDOWN_crash }), 0);
    t.match(host.hv.getDomainInfo(dom0!.d, a.domid), { state: 'shutdown', shutdown_reason: SHUTDOWN_crash });
    t.equal(dom0!.snapshot(), before);
  });

  t.test('SCHEDOP_remote_shutdown is privileged', async (t) => {
    const { host, dom0, a, b } = setup({ dom0: true });
    t.equal(b.sched(SCHEDOP_remote_shutdown, { domain_id: a.domid, reason: SHUTDOWN_poweroff }), -XEN_EPERM);
    t.match(host.hv.getDomainInfo(dom0!.d, a.domid), { state: 'paused' }, 'a untouched');
    t.equal(dom0!.sched(SCHEDOP_remote_shutdown, { domain_id: a.domid, reason: SHUTDOWN_reboot }), 0);
    t.match(host.hv.getDomainInfo(dom0!.d, a.domid), { state: 'shutdown', shutdown_reason: SHUTDOWN_reboot });
    t.equal(dom0!.sched(SCHEDOP_remote_shutdown, { domain_id: 0x7000, reason: SHUTDOWN_poweroff }), -XEN_ESRCH);
    t.equal(dom0!.sched(SCHEDOP_remote_shutdown, { domain_id: b.domid, reason: 99 }), -XEN_EINVAL);
  });

  t.test('SCHEDOP_poll returns when a port is pending, else at its absolute timeout', async (t) => {
    const { a, b } = setup();
    const pa = a.alloc(b.domid);
    const pb = b.bind(a.domid, pa);
    const deadline = (ms: number) => BigInt(Math.round((performance.now() + ms) * 1e6));

    // Masked or not, a pending port ends the poll: poll is how a vCPU waits with events masked.
    t.equal(b.send(pb), 0);
    let start = performance.now();
    t.equal(a.sched(SCHEDOP_poll, { ports: [pa], nr_ports: 1, timeout: deadline(5000) } satisfies sched_poll), 0);
    t.ok(performance.now() - start < 1000, 'returned at once for a pending port');

    a.clearPending(pa);
    start = performance.now();
    t.equal(a.sched(SCHEDOP_poll, { ports: [pa], nr_ports: 1, timeout: deadline(60) } satisfies sched_poll), 0);
    const waited = performance.now() - start;
    t.ok(waited >= 55, `waited for the timeout (${waited.toFixed(1)} ms)`);
    t.ok(waited < 2000, 'and not much longer');

    start = performance.now();
    t.equal(a.sched(SCHEDOP_poll, { ports: [pa], nr_ports: 1, timeout: 1n } satisfies sched_poll), 0, 'a deadline in the past');
    t.ok(performance.now() - start < 1000);

    t.equal(a.sched(SCHEDOP_poll, { ports: [], nr_ports: 0, timeout: 1n } satisfies sched_poll), -XEN_EINVAL, 'no ports');
    const many = Array.from({ length: 129 }, () => pa);
    t.equal(a.sched(SCHEDOP_poll, { ports: many, nr_ports: 129, timeout: 1n } satisfies sched_poll), -XEN_EINVAL, 'more than 128 ports');
    t.equal(a.sched(SCHEDOP_yield), 0, 'yield');
  });
});

// ---------------------------------------------------------------------------
// Version, CPUID, unknown operations

t.test('xen_version, CPUID, and ENOSYS for what is not implemented', async (t) => {
  const { host, a } = setup();
  const v = a.hc(__HYPERVISOR_xen_version, XENVER_version);
  t.equal(v >>> 16, 4, 'major');
  t.equal(v & 0xffff, 17, 'minor');
  const extra = { extraversion: '' };
  t.equal(a.hc(__HYPERVISOR_xen_version, XENVER_extraversion, extra), 0);
  t.match(extra.extraversion, /^\./, 'extraversion starts with a dot, as "4.17" + ".0"');
  const features = { submap_idx: 0, submap: -1 };
  t.equal(a.hc(__HYPERVISOR_xen_version, XENVER_get_features, features), 0);
  t.equal(features.submap, 0);

  const leaf = host.hv.cpuid(0x40000000);
  const sig = Buffer.alloc(12);
  sig.writeUInt32LE(leaf.ebx >>> 0, 0);
  sig.writeUInt32LE(leaf.ecx >>> 0, 4);
  sig.writeUInt32LE(leaf.edx >>> 0, 8);
  t.equal(sig.toString('latin1'), 'XenVMMXenVMM');
  t.ok(leaf.eax >= 0x40000001, 'eax names the highest Xen leaf');

  t.equal(a.hc(1, 0, {}), -XEN_ENOSYS, '__HYPERVISOR_mmu_update');
  t.equal(a.hc(63, 0, {}), -XEN_ENOSYS, 'a hypercall number beyond the table');
  t.equal(a.ev(EVTCHNOP_reset, { dom: DOMID_SELF }), -XEN_ENOSYS, 'EVTCHNOP_reset');
  t.equal(a.gt(GNTTABOP_transfer, {}), -XEN_ENOSYS, 'GNTTABOP_transfer');
  t.equal(a.mem(XENMEM_decrease_reservation, {}), -XEN_ENOSYS, 'XENMEM_decrease_reservation');
  t.equal(a.hc(__HYPERVISOR_hvm_op, 99, { domid: DOMID_SELF, index: 0, value: 0n }), -XEN_ENOSYS, 'HVMOP 99');
  t.equal(a.sched(99, {}), -XEN_ENOSYS, 'SCHEDOP 99');
  t.equal(a.hc(__HYPERVISOR_xen_version, 99, {}), -XEN_ENOSYS, 'XENVER 99');
});

// ---------------------------------------------------------------------------
// Property: port states and event delivery against a model

type PortModel = { state: 'unbound'; remote: number } | { state: 'interdomain'; remote: number; rport: number };

/** `pick` chooses a port: usually one the model knows of (so binds and sends succeed), sometimes any. */
type Op = { op: 'alloc' | 'bind' | 'send' | 'mask' | 'unmask' | 'close' | 'upcall'; side: number; pick: number };

const NR_PORTS = 8;

const opArb: fc.Arbitrary<Op> = fc.record({
  // Repeats weight the choice towards the operations that build and use channels.
  op: fc.constantFrom(...(['alloc', 'alloc', 'bind', 'bind', 'send', 'send', 'send', 'mask', 'unmask', 'close', 'upcall'] as const)),
  side: fc.nat(1),
  pick: fc.nat(3 * NR_PORTS),
});

function choosePort(known: Map<number, PortModel>, pick: number): number {
  const ports = [...known.keys()];
  return pick < 2 * NR_PORTS && ports.length > 0 ? ports[pick % ports.length]! : 1 + (pick % NR_PORTS);
}

/**
 * Run `ops` on two domains and a model of their port tables. After every
 * step: each hypercall returned what Xen returns, EVTCHNOP_status of every
 * port matches the model, and every pending, unmasked port has been
 * delivered (its selector bit and upcall_pending are set).
 */
function checkAgainstModel(ops: Op[]): void {
  const { a, b } = setup();
  const sides = [a, b] as const;
  const model = [new Map<number, PortModel>(), new Map<number, PortModel>()];
  let highest = NR_PORTS;
  const fail = (msg: string) => {
    throw new Error(`${msg} after ${JSON.stringify(ops)}`);
  };
  const expectRc = (got: number, want: number, what: string) => {
    if (got !== want) fail(`${what}: returned ${got}, expected ${want}`);
  };

  for (const o of ops) {
    const me = sides[o.side]!;
    const peer = sides[1 - o.side]!;
    const mine = model[o.side]!;
    const theirs = model[1 - o.side]!;
    const port = choosePort(o.op === 'bind' ? theirs : mine, o.pick);
    const what = `${o.op} on side ${o.side}${o.op === 'alloc' || o.op === 'upcall' ? '' : ` port ${port}`}`;
    switch (o.op) {
      case 'alloc': {
        const p = me.alloc(peer.domid);
        if (mine.has(p)) fail(`${what}: got port ${p}, which is in use`);
        mine.set(p, { state: 'unbound', remote: peer.domid });
        highest = Math.max(highest, p);
        break;
      }
      case 'bind': {
        const offered = theirs.get(port);
        const op = { remote_dom: peer.domid, remote_port: port, local_port: 0 };
        const rc = me.ev(EVTCHNOP_bind_interdomain, op);
        if (offered?.state !== 'unbound' || offered.remote !== me.domid) {
          expectRc(rc, -XEN_EINVAL, what);
          break;
        }
        expectRc(rc, 0, what);
        if (mine.has(op.local_port)) fail(`${what}: got port ${op.local_port}, which is in use`);
        mine.set(op.local_port, { state: 'interdomain', remote: peer.domid, rport: port });
        theirs.set(port, { state: 'interdomain', remote: me.domid, rport: op.local_port });
        highest = Math.max(highest, op.local_port);
        break;
      }
      case 'send':
        expectRc(me.send(port), mine.has(port) ? 0 : -XEN_EINVAL, what);
        break;
      case 'mask':
        me.setMasked(port, true);
        break;
      case 'unmask':
        expectRc(me.unmask(port), 0, what);
        break;
      case 'close': {
        const m = mine.get(port);
        expectRc(me.close(port), m === undefined ? -XEN_EINVAL : 0, what);
        if (m?.state === 'interdomain') theirs.set(m.rport, { state: 'unbound', remote: me.domid });
        mine.delete(port);
        break;
      }
      case 'upcall':
        me.upcall();
        break;
    }
    for (let s = 0; s < 2; s++) {
      const g = sides[s]!;
      for (let p = 1; p <= highest; p++) {
        const m = model[s]!.get(p);
        const st = g.status(p);
        const ok =
          st.rc === 0 &&
          (m === undefined
            ? st.status === EVTCHNSTAT_closed
            : m.state === 'unbound'
              ? st.status === EVTCHNSTAT_unbound && st.u.unbound.dom === m.remote
              : st.status === EVTCHNSTAT_interdomain && st.u.interdomain.dom === m.remote && st.u.interdomain.port === m.rport);
        if (!ok) fail(`${what}: side ${s} port ${p} has status ${JSON.stringify(st)}, model ${JSON.stringify(m)}`);
        if (g.pending(p) && !g.masked(p) && (!g.selected(p) || g.upcallPending() !== 1)) {
          fail(`${what}: side ${s} port ${p} is pending and unmasked but was not delivered`);
        }
      }
    }
  }
}

t.test('property: port status and delivery follow a model of Xen', async (t) => {
  fc.assert(fc.property(fc.array(opArb, { maxLength: 40, size: 'max' }), (ops) => checkAgainstModel(ops)), { numRuns: 300 });
  t.pass('300 random sequences of alloc/bind/send/mask/unmask/close/upcall');
});

t.test('FramePage.read copies short spans (words on the page\'s side, or a byte loop when unaligned), unaligned ones up to 64 bytes and long ones (words, set() or memcpy) exactly', async (t) => {
  const mem = new MemoryViews(new SharedArrayBuffer(PAGE_SIZE * 2));
  for (let i = 0; i < mem.u8.length; i++) mem.u8[i] = (i * 7 + 3) & 0xff;
  const page = new FramePage(mem, 1, false);
  for (const [offset, length] of [[0, 0], [5, 1], [100, 12], [PAGE_SIZE - 24, 24], [40, 25], [41, 60], [PAGE_SIZE - 65, 65], [PAGE_SIZE - 112, 112], [0, PAGE_SIZE]] as const) {
    const into = new Uint8Array(length);
    page.read(offset, into);
    t.same(into, mem.u8.subarray(PAGE_SIZE + offset, PAGE_SIZE + offset + length), `${length} bytes at ${offset}`);
  }
  t.throws(() => page.read(PAGE_SIZE - 8, new Uint8Array(12)), { code: 'EFAULT' }, 'a short read past the page end');
  t.throws(() => page.read(PAGE_SIZE - 100, new Uint8Array(112)), { code: 'EFAULT' }, 'a long read past the page end');
});

t.test('property: FramePage.read and write move exactly the span, by words, bytes, set() or memcpy, and reuse of one buffer stays exact', async (t) => {
  const mem = new MemoryViews(new SharedArrayBuffer(PAGE_SIZE * 3));
  const page = new FramePage(mem, 1, true);
  const fill = (): void => {
    for (let i = 0; i < mem.u8.length; i++) mem.u8[i] = (i * 13 + 5) & 0xff;
  };
  // One backing buffer, viewed at different offsets and lengths (word-aligned or not), and one view used again and again as a ring's user does.
  const backing = new ArrayBuffer(PAGE_SIZE + 8);
  const reused = new Uint8Array(backing, 4, 112);
  // Short spans often, and word-aligned ones often: a ring slot is 8 or 12 bytes at a word.
  const lengthArb = fc.oneof(fc.integer({ min: 0, max: 32 }), fc.integer({ min: 0, max: 300 }), fc.integer({ min: MEMCPY_BYTES - 8, max: PAGE_SIZE }));
  const offsetArb = fc.oneof(fc.integer({ min: 0, max: PAGE_SIZE }), fc.integer({ min: 0, max: PAGE_SIZE / 4 }).map((w) => w * 4));
  const spanArb = fc.record({ offset: offsetArb, at: fc.integer({ min: 0, max: 7 }), lead: fc.integer({ min: 0, max: 5 }), length: lengthArb, reuse: fc.boolean() });
  t.doesNotThrow(() => fc.assert(fc.property(spanArb, ({ offset, at, lead, length, reuse }) => {
    const len = reuse ? 112 : length;
    if (offset + len > PAGE_SIZE) return true;
    fill();
    // The span is [lead, lead + len) of the buffer (of all of it when reused).
    const first = reuse ? 0 : lead;
    const buf = reuse ? reused : new Uint8Array(backing, at, lead + len);
    for (let i = 0; i < first; i++) buf[i] = 0xee;
    page.read(offset, buf, first, first + len);
    if (String(buf.subarray(first)) !== String(mem.u8.subarray(PAGE_SIZE + offset, PAGE_SIZE + offset + len))) return false;
    for (let i = 0; i < first; i++) if (buf[i] !== 0xee) return false;
    for (let i = 0; i < first + len; i++) buf[i] = (i * 31 + 1) & 0xff;
    page.write(offset, buf, first, first + len);
    // The span holds the buffer's span, and no byte around it moved.
    for (let i = 0; i < mem.u8.length; i++) {
      const inSpan = i >= PAGE_SIZE + offset && i < PAGE_SIZE + offset + len;
      if (mem.u8[i] !== (inSpan ? buf[first + i - PAGE_SIZE - offset] : (i * 13 + 5) & 0xff)) return false;
    }
    return true;
  }), { numRuns: 500 }), 'random spans, offsets, buffer alignments and spans within the buffer');
});

t.test('property: copyBytes does what set() of the same span does, memcpy or not, between buffers or within one', async (t) => {
  const SIZE = 3 * MEMCPY_BYTES;
  const byte = (i: number, seed: number): number => (i * 29 + seed) & 0xff;
  const arb = fc.record({
    shared: fc.boolean(), same: fc.boolean(), seed: fc.nat(255),
    start: fc.integer({ min: 0, max: SIZE }), length: fc.oneof(fc.integer({ min: 0, max: 64 }), fc.integer({ min: MEMCPY_BYTES - 4, max: SIZE }), fc.constant(MEMCPY_BYTES)),
    at: fc.integer({ min: 0, max: SIZE }),
  });
  const make = (shared: boolean, seed: number): Uint8Array => {
    const b = new Uint8Array(shared ? new SharedArrayBuffer(SIZE) : new ArrayBuffer(SIZE));
    for (let i = 0; i < SIZE; i++) b[i] = byte(i, seed);
    return b;
  };
  t.doesNotThrow(() => fc.assert(fc.property(arb, ({ shared, same, seed, start, length, at }) => {
    const end = Math.min(SIZE, start + length);
    // What set() does with the same arguments, on copies of the two buffers.
    const to = make(true, seed);
    const from = same ? to : make(shared, seed + 101);
    const wantTo = Uint8Array.from(to);
    const wantFrom = same ? wantTo : Uint8Array.from(from);
    let wantError: unknown = null;
    try {
      wantTo.set(wantFrom.subarray(start, end), at);
    } catch (e) {
      wantError = e;
    }
    let error: unknown = null;
    try {
      copyBytes(to, at, from, start, end);
    } catch (e) {
      error = e;
    }
    if ((wantError === null) !== (error === null)) return false;
    if (error !== null && !(error instanceof RangeError)) return false;
    return String(to) === String(wantTo) && String(from) === String(wantFrom);
  }), { numRuns: 500 }), 'random spans, past the end too, across the memcpy threshold');
  const to = new Uint8Array(new SharedArrayBuffer(PAGE_SIZE));
  t.throws(() => copyBytes(to, 1, new Uint8Array(PAGE_SIZE), 0, PAGE_SIZE), RangeError, 'a long span one byte past the end');
  t.equal(to[0], 0, 'and nothing written');
});

t.test('property: zeroBytes zeroes exactly its span, within a page or across pages', async (t) => {
  const SIZE = 3 * PAGE_SIZE;
  const to = new Uint8Array(new SharedArrayBuffer(SIZE));
  const arb = fc.record({ a: fc.integer({ min: 0, max: SIZE }), b: fc.integer({ min: 0, max: SIZE }) });
  t.doesNotThrow(() => fc.assert(fc.property(arb, ({ a, b }) => {
    const start = Math.min(a, b);
    const end = Math.max(a, b);
    for (let i = 0; i < SIZE; i++) to[i] = (i % 255) + 1;
    zeroBytes(to, start, end);
    for (let i = 0; i < SIZE; i++) if (to[i] !== (i >= start && i < end ? 0 : (i % 255) + 1)) return false;
    return true;
  }), { numRuns: 300 }), 'random spans of a three-page buffer');
  to.fill(7);
  t.throws(() => zeroBytes(to, 0, SIZE + 1), { code: 'EINVAL' }, 'a span past the end');
  t.ok(to.every((x) => x === 7), 'and nothing zeroed');
});

t.test('property: FramePage.read and write of a part [start, end) of the buffer move exactly it, and nothing else of the buffer or the page', async (t) => {
  const mem = new MemoryViews(new SharedArrayBuffer(PAGE_SIZE * 3));
  const page = new FramePage(mem, 1, true);
  const pageByte = (i: number): number => (i * 13 + 5) & 0xff;
  const bufByte = (i: number): number => (i * 31 + 1) & 0xff;
  // As a ring's user: one 112-byte request buffer, its head copied first and the rest after.
  const buf = new Uint8Array(new ArrayBuffer(120), 4, 112);
  const arb = fc.record({ offset: fc.integer({ min: 0, max: PAGE_SIZE }), a: fc.integer({ min: 0, max: 112 }), b: fc.integer({ min: 0, max: 112 }) });
  t.doesNotThrow(() => fc.assert(fc.property(arb, ({ offset, a, b }) => {
    const start = Math.min(a, b);
    const end = Math.max(a, b);
    const n = end - start;
    if (offset + n > PAGE_SIZE) return true;
    for (let i = 0; i < mem.u8.length; i++) mem.u8[i] = pageByte(i);
    for (let i = 0; i < buf.length; i++) buf[i] = bufByte(i);
    page.read(offset, buf, start, end);
    for (let i = 0; i < buf.length; i++) {
      if (buf[i] !== (i >= start && i < end ? pageByte(PAGE_SIZE + offset + i - start) : bufByte(i))) return false;
    }
    for (let i = 0; i < buf.length; i++) buf[i] = bufByte(i);
    page.write(offset, buf, start, end);
    for (let i = 0; i < mem.u8.length; i++) {
      const inSpan = i >= PAGE_SIZE + offset && i < PAGE_SIZE + offset + n;
      if (mem.u8[i] !== (inSpan ? bufByte(start + i - PAGE_SIZE - offset) : pageByte(i))) return false;
    }
    return true;
  }), { numRuns: 500 }), 'random parts of one buffer at random page offsets');
  t.throws(() => page.read(0, buf, 8, 113), { code: 'EINVAL' }, 'a part past the buffer');
  t.throws(() => page.write(0, buf, 9, 8), { code: 'EINVAL' }, 'a part that ends before it starts');
});
