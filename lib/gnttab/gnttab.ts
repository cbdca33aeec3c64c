// The guest's side of grant tables v1, after OpenBSD sys/dev/pv/xen.c
// (xen_init_grant_tables, xen_grant_table_grow/alloc/free/enter/remove).
// The table lives in pages of our own RAM that we hand to Xen with
// XENMEM_add_to_physmap(XENMAPSPACE_grant_table); it grows lazily, one frame
// at a time, up to the max_nr_frames GNTTABOP_query_size reports.
//
// Which refs are free is private bookkeeping (OpenBSD marks them in the
// shared entry itself); the shared entry only ever says what is granted.
// One GrantTable per domain, used from the thread that runs its kernel.
//
// Revocation (XSA-396): an entry the peer still maps (GTF_reading or
// GTF_writing set) cannot be taken back. remove() retries a bounded number of
// times; then the ref and its page go to quarantine for good: the ref is never
// handed out again and the page must never be reused, because the peer may
// still read or write it.

import { offsetOf } from '../abi/layout.js';
import * as gntabi from '../abi/grant_table.js';
import {
  grant_entry_v1,
  GNTTAB_NR_RESERVED_ENTRIES,
  GNTTABOP_query_size,
  GNTST_okay,
  GTF_permit_access,
  GTF_readonly,
  GTF_reading,
  GTF_writing,
} from '../abi/grant_table.js';
import { XENMEM_add_to_physmap, XENMAPSPACE_grant_table } from '../abi/memory.js';
import { __HYPERVISOR_grant_table_op, __HYPERVISOR_memory_op, DOMID_FIRST_RESERVED, DOMID_SELF } from '../abi/xen.js';
import { XenError } from '../errors.js';
import { errnoName } from '../hypervisor/errno.js';
import { PAGE_SIZE, type MemoryViews } from '../hypervisor/page.js';
import { logger, type Log } from '../log.js';
import type { PhysMem } from '../xen/physmem.js';
import type { gnttab_query_size, Hypercall, xen_add_to_physmap } from '../hypervisor/hypercall.js';
import { TraceKind, traceGrantEntry, tracing } from '../trace/trace.js';

export const GNTTAB_ENTRIES_PER_FRAME = PAGE_SIZE / grant_entry_v1.size;

const FLAGS = offsetOf(grant_entry_v1, 'flags');
const DOMID = offsetOf(grant_entry_v1, 'domid');
const FRAME = offsetOf(grant_entry_v1, 'frame');
// Revocation is one compare-and-swap on the word that holds flags and domid.
if (FLAGS !== 0 || DOMID !== 2 || FRAME % 4 !== 0) throw new Error('gnttab: grant_entry_v1 header is not one u32 word');
const IN_USE = GTF_reading | GTF_writing;

/** Private state of each ref. */
const RefState = {
  reserved: 0,
  free: 1,
  allocated: 2,
  entered: 3,
  removing: 4,
  quarantined: 5,
} as const;

export type GrantTableOptions = {
  /** Tries after the first before remove() quarantines a ref the peer still maps. */
  removeRetries?: number;
  /** First wait between tries; it doubles up to removeMaxWaitMs. */
  removeWaitMs?: number;
  removeMaxWaitMs?: number;
};

const DEFAULT_REMOVE_RETRIES = 8;
const DEFAULT_REMOVE_WAIT_MS = 1;
const DEFAULT_REMOVE_MAX_WAIT_MS = 50;
const CAS_SPINS = 16;
const RESOLVED: Promise<void> = Promise.resolve();

/** `GNTST_permission_denied` for -8: the code a failed grant operation carries. */
export function gntstName(status: number): string {
  for (const [name, value] of Object.entries(gntabi)) {
    if (name.startsWith('GNTST_') && value === status) return name;
  }
  return 'GNTST_general_error';
}

// A wait on the global timers (virtual time under the deterministic runner,
// which replaces them; node:timers/promises would keep real time); rejects
// with the signal's reason when it aborts.
function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted === true) return reject(signal.reason);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export class GrantTable {
  private readonly log: Log;
  private readonly retries: number;
  private readonly waitMs: number;
  private readonly maxWaitMs: number;
  private maxFrames = 0;
  private nrFrames = 0;
  /** GFN of each table frame, where we placed it. */
  private frameGfn = new Int32Array(0);
  private state = new Uint8Array(0);
  /** The page each entered ref grants, for quarantine. */
  private grantedGfn = new Int32Array(0);
  /** FIFO of free refs: a freed ref is reused last, so a stale peer reference rarely hits a new grant. */
  private freeq = new Int32Array(0);
  private freeHead = 0;
  private freeCount = 0;
  private readonly quarantinedPages = new Set<number>();
  private nrQuarantined = 0;
  private readonly xatp: xen_add_to_physmap = { domid: DOMID_SELF, size: 0, space: XENMAPSPACE_grant_table, idx: 0, gpfn: 0 };

  constructor(
    private readonly hypercall: Hypercall,
    private readonly mem: MemoryViews,
    private readonly physmem: PhysMem,
    readonly name: string,
    options: GrantTableOptions = {},
  ) {
    this.log = logger('gnttab', name);
    this.retries = options.removeRetries ?? DEFAULT_REMOVE_RETRIES;
    this.waitMs = options.removeWaitMs ?? DEFAULT_REMOVE_WAIT_MS;
    this.maxWaitMs = options.removeMaxWaitMs ?? DEFAULT_REMOVE_MAX_WAIT_MS;
    if (!Number.isInteger(this.retries) || this.retries < 0 || this.retries > 1000) {
      throw new XenError('EINVAL', `removeRetries ${this.retries} out of range`);
    }
    if (!(this.waitMs >= 0) || !(this.maxWaitMs >= this.waitMs)) throw new XenError('EINVAL', 'bad remove wait');
  }

  /** Frames in the table now, and the most it may have. */
  get frames(): { nrFrames: number; maxNrFrames: number } {
    return { nrFrames: this.nrFrames, maxNrFrames: this.maxFrames };
  }

  /** Refs ready to hand out without growing the table. */
  get nrFree(): number {
    return this.freeCount;
  }

  get quarantined(): number {
    return this.nrQuarantined;
  }

  /** Whether page `gfn` was granted by a ref now in quarantine: never reuse it. */
  isQuarantined(gfn: number): boolean {
    return this.quarantinedPages.size !== 0 && this.quarantinedPages.has(gfn);
  }

  // xen_init_grant_tables: learn the limits, move the frames Xen placed into our RAM.
  init(): void {
    if (this.maxFrames !== 0) throw new XenError('EEXIST', 'grant table already set up');
    const gqs: gnttab_query_size = { dom: DOMID_SELF, nr_frames: 0, max_nr_frames: 0, status: 0 };
    const rc = this.hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_query_size, gqs);
    if (rc !== 0) throw new XenError(errnoName(-rc), 'GNTTABOP_query_size failed');
    if (gqs.status !== GNTST_okay) throw new XenError(gntstName(gqs.status), 'GNTTABOP_query_size failed');
    const { nr_frames: nr, max_nr_frames: max } = gqs;
    if (!Number.isInteger(max) || max < 1 || max > 0x10000 || !Number.isInteger(nr) || nr < 1 || nr > max) {
      throw new XenError('EINVAL', `invalid number of grant table frames: ${nr}/${max}`);
    }
    const entries = max * GNTTAB_ENTRIES_PER_FRAME;
    this.maxFrames = max;
    this.frameGfn = new Int32Array(max);
    this.state = new Uint8Array(entries);
    this.grantedGfn = new Int32Array(entries).fill(-1);
    this.freeq = new Int32Array(entries);
    // Frame 0 holds the builder's entries (console, xenstore): placing it copies them.
    for (let i = 0; i < nr; i++) this.grow();
    this.log('%d/%d grant table frames', this.nrFrames, max);
  }

  // xen_grant_table_grow: one more frame, in a page of our own RAM.
  grow(): void {
    if (this.maxFrames === 0) throw new XenError('EINVAL', 'grant table not set up');
    const idx = this.nrFrames;
    if (idx >= this.maxFrames) throw new XenError('ENOSPC', `grant table is at its maximum of ${this.maxFrames} frames`);
    const gfn = this.physmem.alloc(1);
    this.xatp.idx = idx;
    this.xatp.gpfn = gfn;
    const rc = this.hypercall(__HYPERVISOR_memory_op, XENMEM_add_to_physmap, this.xatp);
    if (rc !== 0) {
      this.physmem.free(gfn, 1);
      throw new XenError(errnoName(-rc), `failed to add grant table frame ${idx}`);
    }
    this.frameGfn[idx] = gfn;
    this.nrFrames = idx + 1;
    const first = idx * GNTTAB_ENTRIES_PER_FRAME;
    const skip = idx === 0 ? GNTTAB_NR_RESERVED_ENTRIES : 0;
    for (let i = 0; i < GNTTAB_ENTRIES_PER_FRAME; i++) {
      if (i < skip) continue;
      this.push(first + i);
    }
  }

  // xen_grant_table_alloc: a free ref, growing the table when none is left.
  alloc(): number {
    if (this.freeCount === 0) this.grow();
    const ref = this.freeq[this.freeHead] ?? -1;
    this.freeHead = (this.freeHead + 1) % this.freeq.length;
    this.freeCount--;
    if (this.state[ref] !== RefState.free) throw new XenError('EFAULT', `gnttab: free list holds ref ${ref} in use`);
    this.state[ref] = RefState.allocated;
    return ref;
  }

  // xen_grant_table_free. A quarantined ref belongs to the quarantine: freeing it does nothing.
  free(ref: number): void {
    switch (this.stateOf(ref)) {
      case RefState.allocated:
        this.push(ref);
        return;
      case RefState.quarantined:
        return;
      case RefState.entered:
      case RefState.removing:
        throw new XenError('EBUSY', `grant ref ${ref} is still entered; remove it first`);
      default:
        throw new XenError('EINVAL', `grant ref ${ref} is not allocated`);
    }
  }

  // xen_grant_table_enter: frame and domid first, then the flags that make the entry valid.
  enter(ref: number, domid: number, gfn: number, flags = 0): void {
    const s = this.stateOf(ref);
    if (s === RefState.entered || s === RefState.removing || s === RefState.quarantined) {
      throw new XenError('EBUSY', `grant ref ${ref} is in use`);
    }
    if (s !== RefState.allocated) throw new XenError('EINVAL', `grant ref ${ref} is not allocated`);
    if (!Number.isInteger(domid) || domid < 0 || domid >= DOMID_FIRST_RESERVED) throw new XenError('EINVAL', `bad domid ${domid}`);
    if ((flags & ~GTF_readonly) !== 0) throw new XenError('EINVAL', `bad grant flags ${flags}`);
    this.checkGrantable(gfn);
    const w = this.word(ref);
    Atomics.store(this.mem.u32, w + FRAME / 4, gfn);
    // One store publishes domid and flags together, after the frame (the barrier of xen_grant_table_enter).
    Atomics.store(this.mem.u32, w, ((domid << 16) | GTF_permit_access | flags) >>> 0);
    this.grantedGfn[ref] = gfn;
    this.state[ref] = RefState.entered;
    if (tracing) traceGrantEntry(TraceKind.grantEnter, ref, 0, domid, gfn, flags);
  }

  /**
   * One attempt to revoke an entered ref: true if it is revoked (the ref is
   * allocated again, ready for enter or free), false if the peer maps it.
   */
  tryRemove(ref: number): boolean {
    const s = this.stateOf(ref);
    if (s !== RefState.entered) throw this.notEntered(ref, s);
    if (!this.revoke(ref)) return false;
    this.state[ref] = RefState.allocated;
    this.grantedGfn[ref] = -1;
    return true;
  }

  // xen_grant_table_remove, bounded: resolves once revoked; rejects with EBUSY
  // (or ECANCELED if `signal` aborts) after putting the ref in quarantine.
  remove(ref: number, signal?: AbortSignal): Promise<void> {
    const s = this.stateOf(ref);
    if (s !== RefState.entered) return Promise.reject(this.notEntered(ref, s));
    if (this.revoke(ref)) {
      this.state[ref] = RefState.allocated;
      this.grantedGfn[ref] = -1;
      return RESOLVED;
    }
    this.state[ref] = RefState.removing;
    return this.removeSlow(ref, signal);
  }

  private async removeSlow(ref: number, signal: AbortSignal | undefined): Promise<void> {
    let waitMs = this.waitMs;
    for (let i = 0; i < this.retries && signal?.aborted !== true; i++) {
      try {
        await sleep(waitMs, signal);
      } catch {
        break;
      }
      if (this.revoke(ref)) {
        this.state[ref] = RefState.allocated;
        this.grantedGfn[ref] = -1;
        return;
      }
      waitMs = Math.min(waitMs * 2, this.maxWaitMs);
    }
    const gfn = this.grantedGfn[ref] ?? -1;
    this.quarantineRef(ref);
    if (signal?.aborted === true) throw new XenError('ECANCELED', `remove of grant ref ${ref} aborted; ref and page ${gfn} quarantined`);
    throw new XenError('EBUSY', `grant ref ${ref} is still mapped by its peer; ref and page ${gfn} quarantined`);
  }

  /** remove() without waiting, for a caller that cannot: a ref the peer maps goes to quarantine at once (EBUSY). */
  removeNow(ref: number): void {
    if (this.tryRemove(ref)) return;
    const gfn = this.grantedGfn[ref] ?? -1;
    this.quarantineRef(ref);
    throw new XenError('EBUSY', `grant ref ${ref} is still mapped by its peer; ref and page ${gfn} quarantined`);
  }

  /** Alloc and enter in one step, as a disposable object (not for the data path: it allocates). */
  grant(domid: number, gfn: number, flags = 0): Grant {
    const ref = this.alloc();
    try {
      this.enter(ref, domid, gfn, flags);
    } catch (err) {
      this.free(ref);
      throw err;
    }
    return new Grant(this, ref, domid, gfn);
  }

  private quarantineRef(ref: number): void {
    const gfn = this.grantedGfn[ref] ?? -1;
    this.state[ref] = RefState.quarantined;
    this.nrQuarantined++;
    if (gfn >= 0) this.quarantinedPages.add(gfn);
    if (tracing) traceGrantEntry(TraceKind.grantRemove, ref, 0, 0, gfn, 0);
    this.log('ref %d still mapped by its peer: quarantined with page %d', ref, gfn);
  }

  /** The CAS of xen_grant_table_remove: expect the entry with no mapping bits, leave it invalid. */
  private revoke(ref: number): boolean {
    const u32 = this.mem.u32;
    const w = this.word(ref);
    for (let spin = 0; spin < CAS_SPINS; spin++) {
      const old = Atomics.load(u32, w);
      if ((old & IN_USE) !== 0) return false;
      if (Atomics.compareExchange(u32, w, old, 0) === old) {
        Atomics.store(u32, w + FRAME / 4, 0);
        if (tracing) traceGrantEntry(TraceKind.grantRemove, ref, 1, 0, 0, 0);
        return true;
      }
    }
    return false;
  }

  private push(ref: number): void {
    this.freeq[(this.freeHead + this.freeCount) % this.freeq.length] = ref;
    this.freeCount++;
    this.state[ref] = RefState.free;
  }

  private stateOf(ref: number): number {
    if (!Number.isInteger(ref) || ref < 0 || ref >= this.nrFrames * GNTTAB_ENTRIES_PER_FRAME) {
      throw new XenError('EINVAL', `grant ref ${ref} out of range`);
    }
    return this.state[ref] ?? RefState.reserved;
  }

  private notEntered(ref: number, s: number): XenError {
    if (s === RefState.removing || s === RefState.quarantined) return new XenError('EBUSY', `grant ref ${ref} is being removed or quarantined`);
    return new XenError('EINVAL', `grant ref ${ref} is not entered`);
  }

  /** A page we may grant: our own, not a table frame (the peer could forge grants), not quarantined. */
  private checkGrantable(gfn: number): void {
    if (!Number.isInteger(gfn) || gfn < 0 || gfn >= this.mem.nrPages) throw new XenError('EINVAL', `gfn ${gfn} out of range`);
    for (let i = 0; i < this.nrFrames; i++) {
      if (this.frameGfn[i] === gfn) throw new XenError('EINVAL', `gfn ${gfn} is grant table frame ${i}`);
    }
    if (this.isQuarantined(gfn)) throw new XenError('EBUSY', `gfn ${gfn} is quarantined`);
  }

  /** u32 index of the flags|domid word of entry `ref`. */
  private word(ref: number): number {
    const frame = this.frameGfn[Math.floor(ref / GNTTAB_ENTRIES_PER_FRAME)] ?? 0;
    return (frame * PAGE_SIZE + (ref % GNTTAB_ENTRIES_PER_FRAME) * grant_entry_v1.size) / 4;
  }
}

/** One grant: `await using g = gnttab.grant(...)` revokes and frees it at scope end. */
export class Grant {
  private done = false;

  constructor(
    private readonly table: GrantTable,
    readonly ref: number,
    readonly domid: number,
    readonly gfn: number,
  ) {}

  /** Remove (bounded wait, quarantine on failure) and free; a second call does nothing. */
  async revoke(signal?: AbortSignal): Promise<void> {
    if (this.done) return;
    this.done = true;
    try {
      await this.table.remove(this.ref, signal);
    } finally {
      this.table.free(this.ref);
    }
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.revoke();
  }

  /** Without waiting: a ref the peer still maps goes to quarantine at once (EBUSY). */
  [Symbol.dispose](): void {
    if (this.done) return;
    this.done = true;
    try {
      this.table.removeNow(this.ref);
    } finally {
      this.table.free(this.ref);
    }
  }
}
