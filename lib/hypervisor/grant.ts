// Grant tables v1 (xen/common/grant_table.c). Entries live in the granting
// domain's memory, in the frames it registered; the hypervisor keeps a pin
// count per entry (its active table) and a maptrack per mapping domain.
// Flags change only by compare-and-swap on the entry's first word (flags,
// domid), the same protocol the guest uses to revoke an entry.

import { offsetOf } from '../abi/layout.js';
import {
  grant_entry_v1,
  GTF_permit_access,
  GTF_type_mask,
  GTF_readonly,
  GTF_reading,
  GTF_writing,
  GNTMAP_host_map,
  GNTMAP_device_map,
  GNTMAP_readonly,
  GNTCOPY_source_gref,
  GNTCOPY_dest_gref,
  GNTST_okay,
  GNTST_general_error,
  GNTST_bad_domain,
  GNTST_bad_gntref,
  GNTST_bad_handle,
  GNTST_permission_denied,
  GNTST_bad_page,
  GNTST_bad_copy_arg,
  GNTST_no_space,
} from '../abi/grant_table.js';
import { DOMID_SELF } from '../abi/xen.js';
import { D, Domain, GRANT_ENTRIES_PER_FRAME, MAX_MAPTRACK } from './domain.js';
import { lock, unlock } from './lock.js';
import { copyBytes, FramePage, PAGE_SIZE, ReadOnlyPage, type MemoryViews } from './page.js';
import type { DomainLookup } from './evtchn.js';
import type { gnttab_copy, gnttab_copy_ptr, gnttab_map_grant_ref, gnttab_unmap_grant_ref } from './hypercall.js';
import { TraceKind, traceGrant, traceGrantCopy, tracing } from '../trace/trace.js';

const ENTRY_SIZE = grant_entry_v1.size;
const FRAME = offsetOf(grant_entry_v1, 'frame');
const READERS = 0xffff;
const WRITER = 0x10000;

// Words of a maptrack entry.
const MT_FLAGS = 0; // GNTMAP_* | MT_INUSE
const MT_DOM = 1;
const MT_REF = 2;
const MT_GEN = 3;
const MT_INUSE = 1 << 30;

/**
 * A plain load: the count changes only under the domain's grant lock, which
 * every caller that acts on the answer holds (an Atomics call costs about
 * 9 ns more here, and a grant copy makes several).
 */
export function nrEntries(d: Domain): number {
  return (d.ctl[D.nrGrantFrames] ?? 0) * GRANT_ENTRIES_PER_FRAME;
}

/** u32 index of the first word (flags | domid << 16) of entry `ref`. */
function entryWord(d: Domain, ref: number): number {
  const gfn = d.ctl[D.grantFrames + Math.floor(ref / GRANT_ENTRIES_PER_FRAME)] ?? 0;
  return (gfn * PAGE_SIZE + (ref % GRANT_ENTRIES_PER_FRAME) * ENTRY_SIZE) >> 2;
}

function entryFrame(d: Domain, ref: number): number {
  return Atomics.load(d.mem.u32, entryWord(d, ref) + (FRAME >> 2));
}

/**
 * Pin entry `ref` of `rd` for `mapper`: check the grant and set GTF_reading
 * (and GTF_writing) with compare-and-swap, then count the pin. Caller holds
 * rd's grant lock. Returns the frame or a GNTST_* status (negative).
 */
function acquire(rd: Domain, ref: number, mapper: number, readonly: boolean): number {
  if (!Number.isInteger(ref) || ref < 0 || ref >= nrEntries(rd)) return GNTST_bad_gntref;
  // Pins change only under rd's grant lock, which the caller holds.
  const count = rd.ctl[D.active + ref] ?? 0;
  if ((count & READERS) === READERS || count >>> 16 === 0x7fff) return GNTST_general_error;
  const u32 = rd.mem.u32;
  const w = entryWord(rd, ref);
  // Xen's _set_status_v1: bad type, domid or a write pin of a read-only entry
  // is GNTST_general_error, and a granter that keeps changing the entry under
  // the compare-and-swap is taken to misbehave after five tries.
  for (let tries = 0; ; tries++) {
    const old = Atomics.load(u32, w);
    const flags = old & 0xffff;
    if ((flags & GTF_type_mask) !== GTF_permit_access || old >>> 16 !== mapper) return GNTST_general_error;
    if (!readonly && (flags & GTF_readonly) !== 0) return GNTST_general_error;
    const next = (old | GTF_reading | (readonly ? 0 : GTF_writing)) >>> 0;
    if (Atomics.compareExchange(u32, w, old, next) === old) break;
    if (tries === 4) return GNTST_general_error;
  }
  const frame = entryFrame(rd, ref);
  const pins = D.active + ref;
  rd.ctl[pins] = (rd.ctl[pins] ?? 0) + (readonly ? 1 : WRITER);
  if (frame >= rd.nrPages) {
    release(rd, ref, readonly);
    return GNTST_bad_page;
  }
  return frame;
}

/** Drop one pin; clear GTF_writing and GTF_reading when their last pin goes. Caller holds the lock. */
function release(rd: Domain, ref: number, readonly: boolean): void {
  const pins = D.active + ref;
  const count = Math.max(0, (rd.ctl[pins] ?? 0) - (readonly ? 1 : WRITER));
  rd.ctl[pins] = count;
  let clear = 0;
  if (count >>> 16 === 0) clear |= GTF_writing;
  if (count === 0) clear |= GTF_reading;
  if (clear !== 0) Atomics.and(rd.mem.u32, entryWord(rd, ref), ~clear);
}

function allocHandle(d: Domain): number {
  for (let h = 0; h < MAX_MAPTRACK; h++) {
    const w = D.maptrack + h * 4;
    if (Atomics.compareExchange(d.ctl, w + MT_FLAGS, 0, MT_INUSE) === 0) return h;
  }
  return -1;
}

export function mapGrantRef(caller: Domain, op: gnttab_map_grant_ref, lookup: DomainLookup): void {
  mapOne(caller, op, lookup);
  if (tracing) traceGrant(TraceKind.grantMap, caller.domid, op.ref, 0, op.dom === DOMID_SELF ? caller.domid : op.dom, op.flags, op.handle, op.status);
}

function mapOne(caller: Domain, op: gnttab_map_grant_ref, lookup: DomainLookup): void {
  op.page = null;
  op.handle = -1;
  if ((op.flags & (GNTMAP_host_map | GNTMAP_device_map)) === 0) {
    op.status = GNTST_bad_gntref;
    return;
  }
  const rd = op.dom === DOMID_SELF ? caller : lookup(op.dom);
  if (rd === undefined || rd.state === 'dead') {
    op.status = GNTST_bad_domain;
    return;
  }
  const readonly = (op.flags & GNTMAP_readonly) !== 0;
  const handle = allocHandle(caller);
  if (handle < 0) {
    op.status = GNTST_no_space;
    return;
  }
  lock(rd.ctl, D.lockGnttab);
  const frame = acquire(rd, op.ref, caller.domid, readonly);
  unlock(rd.ctl, D.lockGnttab);
  const mt = D.maptrack + handle * 4;
  if (frame < 0) {
    Atomics.store(caller.ctl, mt + MT_FLAGS, 0);
    op.status = frame;
    return;
  }
  caller.ctl[mt + MT_DOM] = rd.domid;
  caller.ctl[mt + MT_REF] = op.ref;
  const gen = Atomics.add(caller.ctl, mt + MT_GEN, 1) + 1;
  Atomics.store(caller.ctl, mt + MT_FLAGS, MT_INUSE | op.flags);
  const page = new FramePage(rd.mem, frame, !readonly, { words: caller.ctl, index: mt + MT_GEN, value: gen });
  op.page = readonly ? new ReadOnlyPage(page) : page;
  op.handle = handle;
  op.dev_bus_addr = BigInt(frame) << 12n;
  op.status = GNTST_okay;
}

export function unmapGrantRef(caller: Domain, op: gnttab_unmap_grant_ref, lookup: DomainLookup): void {
  if (tracing) return unmapTraced(caller, op, lookup);
  unmapOne(caller, op, lookup);
}

// What the handle maps is read before the unmap frees it; a bad handle maps nothing.
function unmapTraced(caller: Domain, op: gnttab_unmap_grant_ref, lookup: DomainLookup): void {
  const valid = Number.isInteger(op.handle) && op.handle >= 0 && op.handle < MAX_MAPTRACK;
  const mt = D.maptrack + (valid ? op.handle : 0) * 4;
  const dom = caller.ctl[mt + MT_DOM] ?? -1;
  const ref = caller.ctl[mt + MT_REF] ?? -1;
  unmapOne(caller, op, lookup);
  const ok = op.status === GNTST_okay;
  traceGrant(TraceKind.grantUnmap, caller.domid, op.handle, 0, ok ? dom : -1, ok ? ref : -1, op.status, 0);
}

function unmapOne(caller: Domain, op: gnttab_unmap_grant_ref, lookup: DomainLookup): void {
  const h = op.handle;
  if (!Number.isInteger(h) || h < 0 || h >= MAX_MAPTRACK) {
    op.status = GNTST_bad_handle;
    return;
  }
  const mt = D.maptrack + h * 4;
  const flags = Atomics.load(caller.ctl, mt + MT_FLAGS);
  if ((flags & MT_INUSE) === 0 || (flags & ~MT_INUSE) === 0) {
    op.status = GNTST_bad_handle;
    return;
  }
  // Claim the handle so that of two racing unmaps only one releases the pin,
  // then kill the mapping: the page object goes dead before the grant is released.
  if (Atomics.compareExchange(caller.ctl, mt + MT_FLAGS, flags, MT_INUSE) !== flags) {
    op.status = GNTST_bad_handle;
    return;
  }
  Atomics.add(caller.ctl, mt + MT_GEN, 1);
  const rd = lookup(caller.ctl[mt + MT_DOM] ?? -1);
  if (rd !== undefined) {
    lock(rd.ctl, D.lockGnttab);
    release(rd, caller.ctl[mt + MT_REF] ?? 0, (flags & GNTMAP_readonly) !== 0);
    unlock(rd.ctl, D.lockGnttab);
  }
  Atomics.store(caller.ctl, mt + MT_FLAGS, 0);
  op.status = GNTST_okay;
}

/** One grant mapping a domain holds (its maptrack entry), for the toolstack's and the tests' view of the tables. */
export type GrantMapping = { handle: number; domid: number; ref: number; readonly: boolean };

export function mappingsOf(d: Domain): GrantMapping[] {
  const out: GrantMapping[] = [];
  for (let h = 0; h < MAX_MAPTRACK; h++) {
    const flags = Atomics.load(d.ctl, D.maptrack + h * 4 + MT_FLAGS);
    if ((flags & ~MT_INUSE) === 0) continue;
    out.push({ handle: h, domid: d.ctl[D.maptrack + h * 4 + MT_DOM] ?? -1, ref: d.ctl[D.maptrack + h * 4 + MT_REF] ?? -1, readonly: (flags & GNTMAP_readonly) !== 0 });
  }
  return out;
}

/** Unmap everything a dying domain still maps, so the granters can revoke. */
export function unmapAll(d: Domain, lookup: DomainLookup): void {
  for (let h = 0; h < MAX_MAPTRACK; h++) {
    if ((Atomics.load(d.ctl, D.maptrack + h * 4 + MT_FLAGS) & ~MT_INUSE) !== 0) {
      unmapGrantRef(d, { host_addr: 0n, dev_bus_addr: 0n, handle: h, status: 0 }, lookup);
    }
  }
}

/**
 * One side of a copy as resolve() found it; two of them are reused by every
 * copy (no allocation per packet). `set` holds the GTF_* bits the copy set on
 * the entry and must clear again. `known` is the domain this side last named
 * (`knownDomid`), kept through one hypercall as Xen's gnttab_copy keeps its
 * buffers' domains: a batch whose ops name the same domid looks it up once.
 */
type CopySide = {
  d: Domain | null; frame: number; ref: number; byRef: boolean; readonly: boolean; word: number; set: number;
  known: Domain | null; knownDomid: number;
};
const copySrc: CopySide = { d: null, frame: 0, ref: 0, byRef: false, readonly: true, word: 0, set: 0, known: null, knownDomid: -1 };
const copyDst: CopySide = { d: null, frame: 0, ref: 0, byRef: false, readonly: false, word: 0, set: 0, known: null, knownDomid: -1 };

/**
 * The grant locks held from one copy to the next within one hypercall: the
 * lower domid's in `lo`. An op that needs no other lock keeps them.
 */
const locked: { lo: Domain | null; hi: Domain | null } = { lo: null, hi: null };

/** Find one side's domain, and its frame when it names one; GNTST_okay or the failure. */
function resolve(caller: Domain, ptr: gnttab_copy_ptr, byRef: boolean, side: CopySide, lookup: DomainLookup): number {
  let d: Domain | undefined = caller;
  if (ptr.domid !== DOMID_SELF) {
    if (side.known !== null && ptr.domid === side.knownDomid) d = side.known;
    else {
      d = lookup(ptr.domid);
      side.known = d ?? null;
      side.knownDomid = d === undefined ? -1 : ptr.domid;
    }
  }
  if (d === undefined || d.dead) return GNTST_bad_domain;
  side.d = d;
  side.byRef = byRef;
  side.set = 0;
  if (byRef) {
    side.ref = ptr.u.ref;
    return GNTST_okay;
  }
  // As Xen: copy by frame number only for one's own memory.
  if (d !== caller) return GNTST_permission_denied;
  if (!Number.isInteger(ptr.u.gmfn) || ptr.u.gmfn < 0 || ptr.u.gmfn >= d.nrPages) return GNTST_bad_page;
  side.frame = ptr.u.gmfn;
  return GNTST_okay;
}

/**
 * Check a granted side and mark its entry in use, with its granter's grant
 * lock held. A copy keeps that lock until its bytes are moved, so unlike a
 * mapping it takes no pin: the GTF_reading (and GTF_writing) it sets, where
 * no pin set them already, are what the granter sees of it, and release()
 * cannot clear them under it. Checks as acquire(); GNTST_okay or the failure.
 */
function claim(side: CopySide, mapper: number): number {
  if (!side.byRef) return GNTST_okay;
  const rd = side.d!;
  const ref = side.ref;
  if (!Number.isInteger(ref) || ref < 0 || ref >= nrEntries(rd)) return GNTST_bad_gntref;
  const u32 = rd.mem.u32;
  const w = entryWord(rd, ref);
  side.word = w;
  const want = GTF_reading | (side.readonly ? 0 : GTF_writing);
  // Plain loads: the compare-and-swap checks the word it read, and where no
  // bit is to be set a pin holds the entry as it is. The frame is read after
  // the swap, or under that pin.
  for (let tries = 0; ; tries++) {
    const old = u32[w]!;
    const flags = old & 0xffff;
    if ((flags & GTF_type_mask) !== GTF_permit_access || old >>> 16 !== mapper) return GNTST_general_error;
    if (!side.readonly && (flags & GTF_readonly) !== 0) return GNTST_general_error;
    const set = want & ~flags;
    if (set === 0 || Atomics.compareExchange(u32, w, old, (old | set) >>> 0) === old) {
      side.set = set;
      break;
    }
    if (tries === 4) return GNTST_general_error;
  }
  const frame = u32[w + (FRAME >> 2)]!;
  if (frame >= rd.nrPages) {
    unclaim(side);
    return GNTST_bad_page;
  }
  side.frame = frame;
  return GNTST_okay;
}

/** Clear what claim() set. */
function unclaim(side: CopySide): void {
  if (side.set === 0) return;
  Atomics.and(side.d!.mem.u32, side.word, ~side.set);
  side.set = 0;
}

/**
 * Hold the grant locks a copy needs: each granting side's domain once, the
 * lower domid first. Locks the last op left held stay when they cover these;
 * otherwise they go first, so no lock is ever taken out of order.
 */
function lockSides(src: CopySide, dst: CopySide): void {
  let a = src.byRef ? src.d : null;
  let b = dst.byRef && dst.d !== a ? dst.d : null;
  if (a === null) {
    a = b;
    b = null;
  } else if (b !== null && b.domid < a.domid) {
    const t = a;
    a = b;
    b = t;
  }
  const { lo, hi } = locked;
  if ((a === null || a === lo || a === hi) && (b === null || b === lo || b === hi)) return;
  unlockHeld();
  if (a !== null) lock(a.ctl, D.lockGnttab);
  if (b !== null) lock(b.ctl, D.lockGnttab);
  locked.lo = a;
  locked.hi = b;
}

function unlockHeld(): void {
  if (locked.hi !== null) unlock(locked.hi.ctl, D.lockGnttab);
  if (locked.lo !== null) unlock(locked.lo.ctl, D.lockGnttab);
  locked.lo = locked.hi = null;
}

/** End of a copy hypercall: its locks go, and no domain it found is kept for the next. */
function endCopies(): void {
  unlockHeld();
  copySrc.known = copyDst.known = copySrc.d = copyDst.d = null;
  copySrc.knownDomid = copyDst.knownDomid = -1;
}

/**
 * Copies up to this long, with both ends and the length 4-byte aligned, go
 * word by word: cheaper than making the subarray view set() needs (a
 * netif header, a 64-byte frame).
 */
const SHORT_COPY_BYTES = 256;

function copyMemory(from: MemoryViews, at: number, to: MemoryViews, dest: number, len: number): void {
  if (len <= SHORT_COPY_BYTES && ((at | dest | len) & 3) === 0) {
    const src = from.u32;
    const dst = to.u32;
    for (let i = at >> 2, j = dest >> 2, end = (at + len) >> 2; i < end; i++, j++) dst[j] = src[i]!;
  } else if (from === to) {
    to.u8.copyWithin(dest, at, at + len);
  } else {
    copyBytes(to.u8, dest, from.u8, at, at + len);
  }
}

/**
 * GNTTABOP_copy of ops[0..count) (Xen's gnttab_copy): each op gets the
 * status it would get alone, in order; between ops the batch keeps the grant
 * locks and the domains the next op needs again, and lets them go at the end.
 */
export function copy(caller: Domain, ops: readonly gnttab_copy[], count: number, lookup: DomainLookup): void {
  try {
    for (let i = 0; i < count; i++) {
      const op = ops[i]!;
      copyOne(caller, op, lookup);
      if (tracing) traceCopy(caller, op);
    }
  } finally {
    endCopies();
  }
}

function traceCopy(caller: Domain, op: gnttab_copy): void {
  const { source: s, dest: d } = op;
  traceGrantCopy(
    caller.domid, op.len, op.flags,
    s.domid === DOMID_SELF ? caller.domid : s.domid, (op.flags & GNTCOPY_source_gref) !== 0 ? s.u.ref : s.u.gmfn, s.offset,
    d.domid === DOMID_SELF ? caller.domid : d.domid, (op.flags & GNTCOPY_dest_gref) !== 0 ? d.u.ref : d.u.gmfn, d.offset,
    op.status,
  );
}

/** One copy; the grant locks it took stay held for the next op of the batch (endCopies lets them go). */
function copyOne(caller: Domain, op: gnttab_copy, lookup: DomainLookup): void {
  const { source, dest, len } = op;
  if (
    !Number.isInteger(len) || len < 0 ||
    !Number.isInteger(source.offset) || source.offset < 0 || source.offset + len > PAGE_SIZE ||
    !Number.isInteger(dest.offset) || dest.offset < 0 || dest.offset + len > PAGE_SIZE
  ) {
    op.status = GNTST_bad_copy_arg;
    return;
  }
  const src = copySrc;
  const dst = copyDst;
  const srcStatus = resolve(caller, source, (op.flags & GNTCOPY_source_gref) !== 0, src, lookup);
  if (srcStatus !== GNTST_okay) {
    op.status = srcStatus;
    return;
  }
  // The source is judged whole before the destination, as in Xen.
  const dstStatus = resolve(caller, dest, (op.flags & GNTCOPY_dest_gref) !== 0, dst, lookup);
  if (dstStatus !== GNTST_okay) dst.byRef = false;
  lockSides(src, dst);
  let status = claim(src, caller.domid);
  if (status === GNTST_okay) status = dstStatus;
  if (status === GNTST_okay) status = claim(dst, caller.domid);
  if (status === GNTST_okay) copyMemory(src.d!.mem, src.frame * PAGE_SIZE + source.offset, dst.d!.mem, dst.frame * PAGE_SIZE + dest.offset, len);
  unclaim(dst);
  unclaim(src);
  op.status = status;
}

/** What a domain holds in grant tables: entries it grants, of those pinned by a mapper, and mappings it holds of others' grants. */
export function grantCounts(d: Domain): { granted: number; pinned: number; mapped: number } {
  let granted = 0;
  let pinned = 0;
  const n = nrEntries(d);
  for (let ref = 0; ref < n; ref++) {
    if ((Atomics.load(d.mem.u32, entryWord(d, ref)) & GTF_type_mask) !== 0) granted++;
    if ((d.ctl[D.active + ref] ?? 0) !== 0) pinned++;
  }
  let mapped = 0;
  for (let h = 0; h < MAX_MAPTRACK; h++) {
    if ((Atomics.load(d.ctl, D.maptrack + h * 4 + MT_FLAGS) & ~MT_INUSE) !== 0) mapped++;
  }
  return { granted, pinned, mapped };
}
