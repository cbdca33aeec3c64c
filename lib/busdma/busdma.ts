// bus_dma(9) after OpenBSD (sys/arch/amd64/amd64/bus_dma.c: _bus_dmamap_*,
// _bus_dmamem_*) and the Xen tag of sys/dev/pv/xen.c (xen_bus_dmamap_*).
// A physical address is `gfn * PAGE_SIZE + offset` in the domain's own memory.
//
// The generic tag (BusDma) turns buffers into segments {ds_addr, ds_len},
// honouring the map's nsegments, maxsegsz and boundary, and hands out
// dmamem from the page allocator. The Xen tag (XenDmaTag) does the same, then
// grants each segment's page to the peer named in the load flags and puts the
// grant ref in ds_addr, the in-page offset in ds_offset: what a frontend
// writes into its ring. Drivers use a tag, never lib/gnttab directly.
//
// Flags, as in OpenBSD's <machine/bus.h>:
//   BUS_DMA_WAITOK / BUS_DMA_NOWAIT: accepted; nothing here ever sleeps.
//   BUS_DMA_READ:  the device writes memory (an rx buffer): a writable grant.
//   BUS_DMA_WRITE: the device reads memory (a tx buffer): a read-only grant.
//   domid << BUS_DMA_DOMID_SHIFT (the upper 16 bits): the Xen tag's peer,
//   as OpenBSD's xen_bus_dmamap_load takes `flags >> 16`.

import { DOMID_FIRST_RESERVED } from '../abi/xen.js';
import { GTF_readonly } from '../abi/grant_table.js';
import { XenError } from '../errors.js';
import type { GrantTable } from '../gnttab/gnttab.js';
import { copyBytes, PAGE_SIZE, type MemoryViews } from '../hypervisor/page.js';
import { logger, type Log } from '../log.js';
import type { PhysMem } from '../xen/physmem.js';

export const BUS_DMA_WAITOK = 0x0000;
export const BUS_DMA_NOWAIT = 0x0001;
export const BUS_DMA_ALLOCNOW = 0x0002;
export const BUS_DMA_COHERENT = 0x0004;
export const BUS_DMA_STREAMING = 0x0100;
export const BUS_DMA_READ = 0x0200;
export const BUS_DMA_WRITE = 0x0400;
export const BUS_DMA_NOCACHE = 0x0800;
export const BUS_DMA_ZERO = 0x1000;
export const BUS_DMA_DOMID_SHIFT = 16;

/** The flags bits that name the Xen tag's peer domain. */
export function busDmaDomid(domid: number): number {
  if (!Number.isInteger(domid) || domid < 0 || domid >= DOMID_FIRST_RESERVED) throw new XenError('EINVAL', `bad domid ${domid}`);
  return domid * (1 << BUS_DMA_DOMID_SHIFT);
}

export const BUS_DMASYNC_PREREAD = 0x01;
export const BUS_DMASYNC_POSTREAD = 0x02;
export const BUS_DMASYNC_PREWRITE = 0x04;
export const BUS_DMASYNC_POSTWRITE = 0x08;
const SYNC_READ = BUS_DMASYNC_PREREAD | BUS_DMASYNC_POSTREAD;
const SYNC_WRITE = BUS_DMASYNC_PREWRITE | BUS_DMASYNC_POSTWRITE;

/** Limits on what a map may describe; a queue without a bound is a bug. */
export const BUS_DMA_MAX_SEGMENTS = 4096;

/**
 * bus_dma_segment_t. ds_offset is OpenBSD's addition for Xen: the offset in
 * the page, kept when the Xen tag replaces ds_addr with a grant ref.
 */
export type DmaSegment = { ds_addr: number; ds_len: number; ds_offset: number };
/** One piece of a buffer chain (an mbuf of load_mbuf): a physical address and a length. */
export type DmaBuffer = { readonly paddr: number; readonly len: number };

const RESOLVED: Promise<void> = Promise.resolve();

export interface DmaTag {
  dmamapCreate(size: number, nsegments: number, maxsegsz: number, boundary: number, flags: number): DmaMap;
  dmamapDestroy(map: DmaMap): void;
  dmamapLoad(map: DmaMap, paddr: number, len: number, flags: number): void;
  dmamapLoadChain(map: DmaMap, bufs: readonly DmaBuffer[], flags: number): void;
  dmamapLoadRaw(map: DmaMap, segs: readonly DmaSegment[], size: number, flags: number): void;
  dmamapUnload(map: DmaMap, signal?: AbortSignal): Promise<void>;
  dmamapSync(map: DmaMap, offset: number, len: number, ops: number): void;
  dmamemAlloc(size: number, alignment: number, boundary: number, nsegs: number, flags: number): DmaSegment[];
  dmamemFree(segs: readonly DmaSegment[]): void;
  dmamemMap(segs: readonly DmaSegment[], size: number, flags: number): DmaKva;
  dmamemUnmap(kva: DmaKva): void;
}

function isPow2(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** struct bus_dmamap: the limits it was created with, and what the last load made of a buffer. */
export class DmaMap {
  dm_mapsize = 0;
  dm_nsegs = 0;
  readonly dm_segs: DmaSegment[];
  /** BUS_DMA_READ / BUS_DMA_WRITE of the current load, for the direction check of sync. */
  dm_flags = 0;
  destroyed = false;
  /** Load state: the segment being filled and where the last piece ended. */
  seg = -1;
  lastaddr = 0;

  constructor(
    readonly tag: DmaTag,
    readonly size: number,
    readonly nrSegments: number,
    readonly maxSegSize: number,
    readonly boundary: number,
    readonly flags: number,
  ) {
    if (!Number.isInteger(size) || size <= 0) throw new XenError('EINVAL', `bad map size ${size}`);
    if (!Number.isInteger(nrSegments) || nrSegments < 1 || nrSegments > BUS_DMA_MAX_SEGMENTS) {
      throw new XenError('EINVAL', `nsegments ${nrSegments} not in 1..${BUS_DMA_MAX_SEGMENTS}`);
    }
    if (!Number.isInteger(maxSegSize) || maxSegSize <= 0) throw new XenError('EINVAL', `bad maxsegsz ${maxSegSize}`);
    if (boundary !== 0 && !isPow2(boundary)) throw new XenError('EINVAL', `boundary ${boundary} is not a power of two`);
    this.dm_segs = [];
    for (let i = 0; i < nrSegments; i++) this.dm_segs.push({ ds_addr: 0, ds_len: 0, ds_offset: 0 });
  }

  /** bus_dmamap_destroy; the map must be unloaded. */
  [Symbol.dispose](): void {
    this.tag.dmamapDestroy(this);
  }

  /** Unload (waiting for the peer as the tag does) and destroy. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (this.dm_nsegs !== 0) await this.tag.dmamapUnload(this);
    this.tag.dmamapDestroy(this);
  }
}

// --- the map operations both tags share (OpenBSD _bus_dmamap_*) -------------

function loadBegin(map: DmaMap, len: number, flags: number): void {
  if (map.destroyed) throw new XenError('EINVAL', 'map is destroyed');
  if (map.dm_nsegs !== 0) throw new XenError('EBUSY', 'map is loaded; unload it first');
  if (!Number.isInteger(flags) || flags < 0) throw new XenError('EINVAL', `bad flags ${flags}`);
  if ((flags & BUS_DMA_READ) !== 0 && (flags & BUS_DMA_WRITE) !== 0) throw new XenError('EINVAL', 'both BUS_DMA_READ and BUS_DMA_WRITE');
  if (!Number.isInteger(len) || len <= 0) throw new XenError('EINVAL', `bad length ${len}`);
  if (len > map.size) throw new XenError('EINVAL', `${len} bytes do not fit a map of ${map.size}`);
  map.seg = -1;
  map.lastaddr = 0;
}

function loadEnd(map: DmaMap, len: number, flags: number): void {
  map.dm_mapsize = len;
  map.dm_nsegs = map.seg + 1;
  map.dm_flags = flags & (BUS_DMA_READ | BUS_DMA_WRITE);
}

function unloadMap(map: DmaMap): void {
  map.dm_mapsize = 0;
  map.dm_nsegs = 0;
  map.dm_flags = 0;
  map.seg = -1;
}

// _bus_dmamap_load_buffer: walk the buffer a page at a time, joining a piece
// to the previous segment when it follows it and the limits allow.
function loadBuffer(map: DmaMap, mem: MemoryViews, paddr: number, len: number): void {
  if (!Number.isInteger(paddr) || !Number.isInteger(len) || paddr < 0 || len < 0 || paddr + len > mem.nrPages * PAGE_SIZE) {
    throw new XenError('EFAULT', `buffer [${paddr}, +${len}) is outside memory`);
  }
  const boundary = map.boundary;
  while (len > 0) {
    let sgsize = Math.min(PAGE_SIZE - (paddr % PAGE_SIZE), len, map.maxSegSize);
    if (boundary !== 0) sgsize = Math.min(sgsize, boundary - (paddr % boundary));
    const cur = map.seg >= 0 ? map.dm_segs[map.seg] : undefined;
    if (
      cur !== undefined && paddr === map.lastaddr && cur.ds_len + sgsize <= map.maxSegSize &&
      (boundary === 0 || Math.floor(cur.ds_addr / boundary) === Math.floor(paddr / boundary))
    ) {
      cur.ds_len += sgsize;
    } else {
      const next = map.dm_segs[map.seg + 1];
      if (next === undefined) throw new XenError('EFBIG', `buffer needs more than ${map.nrSegments} segments`);
      map.seg++;
      next.ds_addr = paddr;
      next.ds_len = sgsize;
      next.ds_offset = paddr % PAGE_SIZE;
    }
    map.lastaddr = paddr + sgsize;
    paddr += sgsize;
    len -= sgsize;
  }
}

function loadOne(map: DmaMap, mem: MemoryViews, paddr: number, len: number, flags: number): void {
  loadBegin(map, len, flags);
  try {
    loadBuffer(map, mem, paddr, len);
  } catch (err) {
    unloadMap(map);
    throw err;
  }
  loadEnd(map, len, flags);
}

// _bus_dmamap_load_mbuf: the pieces of a chain in order, as one transfer.
function loadChain(map: DmaMap, mem: MemoryViews, bufs: readonly DmaBuffer[], flags: number): void {
  let total = 0;
  for (const b of bufs) total += b.len;
  loadBegin(map, total, flags);
  try {
    for (const b of bufs) if (b.len !== 0) loadBuffer(map, mem, b.paddr, b.len);
  } catch (err) {
    unloadMap(map);
    throw err;
  }
  loadEnd(map, total, flags);
}

// _bus_dmamap_load_raw: segments from bus_dmamem_alloc, the first `size` bytes of them.
function loadRaw(map: DmaMap, mem: MemoryViews, segs: readonly DmaSegment[], size: number, flags: number): void {
  loadBegin(map, size, flags);
  try {
    let left = size;
    for (let i = 0; i < segs.length && left > 0; i++) {
      const s = segs[i]!;
      const n = Math.min(s.ds_len, left);
      loadBuffer(map, mem, s.ds_addr, n);
      left -= n;
    }
    if (left > 0) throw new XenError('EINVAL', `segments hold fewer than ${size} bytes`);
  } catch (err) {
    unloadMap(map);
    throw err;
  }
  loadEnd(map, size, flags);
}

// _bus_dmamap_sync: check the range and the direction. On amd64 with no
// bounce buffers OpenBSD does nothing more: the data is ordered by the ring
// indices around it, which both sides read and write with Atomics.
function syncMap(map: DmaMap, offset: number, len: number, ops: number): void {
  if (!Number.isInteger(ops) || ops === 0 || (ops & ~(SYNC_READ | SYNC_WRITE)) !== 0) throw new XenError('EINVAL', `bad sync ops ${ops}`);
  if (!Number.isInteger(offset) || !Number.isInteger(len) || offset < 0 || len < 0 || offset + len > map.dm_mapsize) {
    throw new XenError('EINVAL', `sync [${offset}, +${len}) outside the ${map.dm_mapsize} loaded bytes`);
  }
  // A device may write only what was loaded for BUS_DMA_READ, read only what was loaded for BUS_DMA_WRITE.
  if ((ops & SYNC_READ) !== 0 && (map.dm_flags & BUS_DMA_WRITE) !== 0) throw new XenError('EINVAL', 'read sync on a BUS_DMA_WRITE load');
  if ((ops & SYNC_WRITE) !== 0 && (map.dm_flags & BUS_DMA_READ) !== 0) throw new XenError('EINVAL', 'write sync on a BUS_DMA_READ load');
}

/** The mapped view of dmamem (bus_dmamem_map's kva): offsets in, bytes of guest memory out. */
export class DmaKva {
  private mapped = true;

  constructor(
    private readonly mem: MemoryViews,
    private readonly segs: readonly DmaSegment[],
    readonly size: number,
  ) {}

  unmap(): void {
    this.mapped = false;
  }

  /** The physical address of byte `offset` (for bus_dmamap_load). */
  paddr(offset: number): number {
    if (!this.mapped) throw new XenError('EFAULT', 'dmamem is unmapped');
    if (!Number.isInteger(offset) || offset < 0 || offset >= this.size) throw new XenError('EFAULT', `offset ${offset} outside ${this.size} bytes`);
    let off = offset;
    for (const s of this.segs) {
      if (off < s.ds_len) return s.ds_addr + off;
      off -= s.ds_len;
    }
    throw new XenError('EFAULT', `offset ${offset} beyond the segments`);
  }

  /** `len` bytes at `offset` as a view of guest memory, no copy; they must lie in one segment. */
  bytes(offset: number, len: number): Uint8Array {
    if (!Number.isInteger(len) || len < 0 || offset + len > this.size) throw new XenError('EFAULT', `[${offset}, +${len}) outside ${this.size} bytes`);
    const at = this.paddr(offset);
    if (len > 0 && this.paddr(offset + len - 1) !== at + len - 1) throw new XenError('EFAULT', `[${offset}, +${len}) spans segments`);
    return this.mem.u8.subarray(at, at + len);
  }

  read(offset: number, into: Uint8Array): void {
    for (let done = 0; done < into.length; ) {
      const at = this.paddr(offset + done);
      const n = Math.min(into.length - done, PAGE_SIZE - (at % PAGE_SIZE));
      copyBytes(into, done, this.mem.u8, at, at + n);
      done += n;
    }
  }

  write(offset: number, from: Uint8Array): void {
    for (let done = 0; done < from.length; ) {
      const at = this.paddr(offset + done);
      const n = Math.min(from.length - done, PAGE_SIZE - (at % PAGE_SIZE));
      copyBytes(this.mem.u8, at, from, done, done + n);
      done += n;
    }
  }
}

/** The generic tag over the domain's page allocator. */
export class BusDma implements DmaTag {
  readonly mem: MemoryViews;

  constructor(
    private readonly physmem: PhysMem,
    readonly name: string,
  ) {
    this.mem = physmem.mem;
  }

  private own(map: DmaMap): DmaMap {
    if (map.tag !== this) throw new XenError('EINVAL', 'map belongs to another tag');
    return map;
  }

  // _bus_dmamap_create
  dmamapCreate(size: number, nsegments: number, maxsegsz: number, boundary: number, flags: number): DmaMap {
    return new DmaMap(this, size, nsegments, maxsegsz, boundary, flags);
  }

  // _bus_dmamap_destroy; a second destroy does nothing.
  dmamapDestroy(map: DmaMap): void {
    this.own(map);
    if (map.destroyed) return;
    if (map.dm_nsegs !== 0) throw new XenError('EBUSY', 'map is loaded; unload it first');
    map.destroyed = true;
  }

  // _bus_dmamap_load, with the buffer named by its physical address.
  dmamapLoad(map: DmaMap, paddr: number, len: number, flags: number): void {
    loadOne(this.own(map), this.mem, paddr, len, flags);
  }

  dmamapLoadChain(map: DmaMap, bufs: readonly DmaBuffer[], flags: number): void {
    loadChain(this.own(map), this.mem, bufs, flags);
  }

  dmamapLoadRaw(map: DmaMap, segs: readonly DmaSegment[], size: number, flags: number): void {
    loadRaw(this.own(map), this.mem, segs, size, flags);
  }

  // _bus_dmamap_unload: nothing to wait for without an IOMMU.
  dmamapUnload(map: DmaMap): Promise<void> {
    unloadMap(this.own(map));
    return RESOLVED;
  }

  dmamapSync(map: DmaMap, offset: number, len: number, ops: number): void {
    syncMap(this.own(map), offset, len, ops);
  }

  // _bus_dmamem_alloc: whole zeroed pages in at most `nsegs` segments, none crossing `boundary`.
  dmamemAlloc(size: number, alignment: number, boundary: number, nsegs: number, flags: number): DmaSegment[] {
    if (!Number.isInteger(size) || size <= 0) throw new XenError('EINVAL', `bad size ${size}`);
    if (!isPow2(alignment)) throw new XenError('EINVAL', `alignment ${alignment} is not a power of two`);
    if (boundary !== 0 && (!isPow2(boundary) || boundary < PAGE_SIZE)) throw new XenError('EINVAL', `bad boundary ${boundary}`);
    if (!Number.isInteger(nsegs) || nsegs < 1 || nsegs > BUS_DMA_MAX_SEGMENTS) throw new XenError('EINVAL', `bad nsegs ${nsegs}`);
    if (!Number.isInteger(flags) || flags < 0) throw new XenError('EINVAL', `bad flags ${flags}`);
    const npages = Math.ceil(size / PAGE_SIZE);
    const bpages = boundary / PAGE_SIZE;
    if (nsegs === 1 && bpages !== 0 && npages > bpages) throw new XenError('EINVAL', `${size} bytes cross a ${boundary} boundary`);
    // Contiguous first; raise the alignment to the boundary if a plain run would cross one.
    const aligned = Math.max(1, alignment / PAGE_SIZE);
    const segs = this.allocRun(npages, aligned, bpages, nsegs);
    if (segs !== null) return segs;
    if (bpages !== 0 && npages <= bpages && aligned < bpages) {
      const again = this.allocRun(npages, bpages, bpages, nsegs);
      if (again !== null) return again;
    }
    if (aligned > 1) throw new XenError('ENOMEM', `no aligned run of ${npages} pages`);
    return this.allocPages(npages, bpages, nsegs);
  }

  /** One physically contiguous run aligned to `alignPages`, split at boundaries; null if it would not do. */
  private allocRun(npages: number, alignPages: number, bpages: number, nsegs: number): DmaSegment[] | null {
    let first: number;
    try {
      first = this.physmem.alloc(npages + alignPages - 1);
    } catch (err) {
      if (err instanceof XenError && err.code === 'ENOMEM') return null;
      throw err;
    }
    const start = Math.ceil(first / alignPages) * alignPages;
    if (start > first) this.physmem.free(first, start - first);
    const tail = first + npages + alignPages - 1 - (start + npages);
    if (tail > 0) this.physmem.free(start + npages, tail);
    const segs: DmaSegment[] = [];
    for (let g = start, end = start + npages; g < end; ) {
      const stop = bpages === 0 ? end : Math.min(end, (Math.floor(g / bpages) + 1) * bpages);
      segs.push({ ds_addr: g * PAGE_SIZE, ds_len: (stop - g) * PAGE_SIZE, ds_offset: 0 });
      g = stop;
    }
    if (segs.length <= nsegs) return segs;
    this.physmem.free(start, npages);
    return null;
  }

  /** Page by page, joining neighbours: when memory is too fragmented for one run. */
  private allocPages(npages: number, bpages: number, nsegs: number): DmaSegment[] {
    const segs: DmaSegment[] = [];
    try {
      for (let i = 0; i < npages; i++) {
        const g = this.physmem.alloc(1);
        const last = segs[segs.length - 1];
        const follows = last !== undefined && last.ds_addr + last.ds_len === g * PAGE_SIZE;
        if (follows && (bpages === 0 || Math.floor(last.ds_addr / PAGE_SIZE / bpages) === Math.floor(g / bpages))) {
          last.ds_len += PAGE_SIZE;
        } else {
          segs.push({ ds_addr: g * PAGE_SIZE, ds_len: PAGE_SIZE, ds_offset: 0 });
        }
        if (segs.length > nsegs) throw new XenError('ENOMEM', `${npages} pages do not fit ${nsegs} segments`);
      }
    } catch (err) {
      this.dmamemFree(segs);
      throw err;
    }
    return segs;
  }

  // _bus_dmamem_free
  dmamemFree(segs: readonly DmaSegment[]): void {
    for (const s of segs) {
      if (s.ds_addr % PAGE_SIZE !== 0 || s.ds_len % PAGE_SIZE !== 0) throw new XenError('EINVAL', `segment ${s.ds_addr}+${s.ds_len} is not dmamem`);
      this.physmem.free(s.ds_addr / PAGE_SIZE, s.ds_len / PAGE_SIZE);
    }
  }

  /** Free one page of dmamem (the Xen tag frees page by page, skipping quarantined ones). */
  freePage(gfn: number): void {
    this.physmem.free(gfn, 1);
  }

  // _bus_dmamem_map: our "kernel virtual address" is a view that walks the segments.
  dmamemMap(segs: readonly DmaSegment[], size: number, flags: number): DmaKva {
    let total = 0;
    for (const s of segs) total += s.ds_len;
    if (!Number.isInteger(size) || size <= 0 || size > total) throw new XenError('EINVAL', `cannot map ${size} of ${total} bytes`);
    if (!Number.isInteger(flags) || flags < 0) throw new XenError('EINVAL', `bad flags ${flags}`);
    return new DmaKva(this.mem, segs.map((s) => ({ ...s })), size);
  }

  // _bus_dmamem_unmap
  dmamemUnmap(kva: DmaKva): void {
    kva.unmap();
  }
}

/** A map of the Xen tag: a grant ref per segment slot (OpenBSD's struct xen_gntmap). */
export class XenDmaMap extends DmaMap {
  /** Grant ref of each segment slot; -1 once a quarantined ref left the slot and no new one was free. */
  readonly gm_ref: Int32Array;
  /** The physical address a granted segment stands for; -1 when the slot is not granted. */
  readonly gm_paddr: Float64Array;
  unloading = false;

  constructor(tag: XenDmaTag, size: number, nsegments: number, maxsegsz: number, boundary: number, flags: number) {
    super(tag, size, nsegments, maxsegsz, boundary, flags);
    this.gm_ref = new Int32Array(nsegments).fill(-1);
    this.gm_paddr = new Float64Array(nsegments).fill(-1);
  }
}

/** The Xen tag: dmamem and segments from the generic tag, grants on top. */
export class XenDmaTag implements DmaTag {
  private readonly dma: BusDma;
  private readonly log: Log;
  private readonly fence = new Int32Array(new SharedArrayBuffer(4));

  constructor(
    private readonly gnttab: GrantTable,
    physmem: PhysMem,
    readonly name: string,
  ) {
    this.dma = new BusDma(physmem, name);
    this.log = logger('busdma', name);
  }

  private own(map: DmaMap): XenDmaMap {
    if (map.tag !== this || !(map instanceof XenDmaMap)) throw new XenError('EINVAL', 'map belongs to another tag');
    return map;
  }

  /** Whether the page at `paddr` was granted by a ref now in quarantine (XSA-396): never reuse it. */
  isQuarantined(paddr: number): boolean {
    return this.gnttab.isQuarantined(Math.floor(paddr / PAGE_SIZE));
  }

  // xen_bus_dmamap_create: a grant covers one page, so no segment may cross
  // one (maxsegsz and boundary at most a page); a ref per segment, up front.
  dmamapCreate(size: number, nsegments: number, maxsegsz: number, boundary: number, flags: number): XenDmaMap {
    const seg = Number.isInteger(maxsegsz) && maxsegsz > PAGE_SIZE ? PAGE_SIZE : maxsegsz;
    const bnd = boundary === 0 || boundary > PAGE_SIZE ? PAGE_SIZE : boundary;
    const map = new XenDmaMap(this, size, nsegments, seg, bnd, flags);
    try {
      for (let i = 0; i < nsegments; i++) map.gm_ref[i] = this.gnttab.alloc();
    } catch (err) {
      this.dmamapDestroy(map);
      throw new XenError('ENOBUFS', `no grant refs for ${nsegments} segments`, { cause: err });
    }
    return map;
  }

  // xen_bus_dmamap_destroy: give the refs back; a second destroy does nothing.
  dmamapDestroy(map: DmaMap): void {
    const m = this.own(map);
    if (m.destroyed) return;
    if (m.dm_nsegs !== 0 || m.unloading) throw new XenError('EBUSY', 'map is loaded; unload it first');
    for (let i = 0; i < m.nrSegments; i++) {
      const ref = m.gm_ref[i] ?? -1;
      if (ref >= 0) this.gnttab.free(ref);
      m.gm_ref[i] = -1;
    }
    m.destroyed = true;
  }

  // xen_bus_dmamap_load
  dmamapLoad(map: DmaMap, paddr: number, len: number, flags: number): void {
    const m = this.own(map);
    this.checkIdle(m);
    loadOne(m, this.dma.mem, paddr, len, flags);
    this.grantSegments(m, flags);
  }

  // xen_bus_dmamap_load_mbuf
  dmamapLoadChain(map: DmaMap, bufs: readonly DmaBuffer[], flags: number): void {
    const m = this.own(map);
    this.checkIdle(m);
    loadChain(m, this.dma.mem, bufs, flags);
    this.grantSegments(m, flags);
  }

  dmamapLoadRaw(map: DmaMap, segs: readonly DmaSegment[], size: number, flags: number): void {
    const m = this.own(map);
    this.checkIdle(m);
    loadRaw(m, this.dma.mem, segs, size, flags);
    this.grantSegments(m, flags);
  }

  private checkIdle(m: XenDmaMap): void {
    if (m.unloading) throw new XenError('EBUSY', 'map is being unloaded');
  }

  /** Grant each segment's page to the peer in `flags`; ds_addr becomes the ref. Undone whole on error. */
  private grantSegments(m: XenDmaMap, flags: number): void {
    const domid = Math.floor(flags / (1 << BUS_DMA_DOMID_SHIFT));
    const gtf = (flags & BUS_DMA_WRITE) !== 0 ? GTF_readonly : 0;
    let i = 0;
    try {
      for (; i < m.dm_nsegs; i++) {
        const seg = m.dm_segs[i]!;
        if ((m.gm_ref[i] ?? -1) < 0) m.gm_ref[i] = this.gnttab.alloc();
        const ref = m.gm_ref[i]!;
        this.gnttab.enter(ref, domid, Math.floor(seg.ds_addr / PAGE_SIZE), gtf);
        m.gm_paddr[i] = seg.ds_addr;
        seg.ds_offset = seg.ds_addr % PAGE_SIZE;
        seg.ds_addr = ref;
      }
    } catch (err) {
      // A hostile peer may map a ref the moment it is entered: revoke without waiting.
      for (let j = 0; j < i; j++) this.revokeNow(m, j);
      unloadMap(m);
      throw err;
    }
  }

  private revokeNow(m: XenDmaMap, i: number): void {
    try {
      this.gnttab.removeNow(m.gm_ref[i]!);
    } catch {
      this.replaceRef(m, i);
    }
    this.restore(m, i);
  }

  /** The slot's ref went to quarantine: take a fresh one now if there is one, else at the next load. */
  private replaceRef(m: XenDmaMap, i: number): void {
    this.gnttab.free(m.gm_ref[i]!);
    try {
      m.gm_ref[i] = this.gnttab.alloc();
    } catch {
      m.gm_ref[i] = -1;
    }
  }

  private restore(m: XenDmaMap, i: number): void {
    const seg = m.dm_segs[i]!;
    seg.ds_addr = m.gm_paddr[i]!;
    m.gm_paddr[i] = -1;
  }

  // xen_bus_dmamap_unload: revoke every grant and put the physical addresses
  // back. A segment the peer still maps costs a bounded wait, then its ref and
  // page go to quarantine and the promise rejects with EBUSY (ECANCELED if
  // `signal` aborted); the map is unloaded either way.
  dmamapUnload(map: DmaMap, signal?: AbortSignal): Promise<void> {
    const m = this.own(map);
    if (m.unloading) return Promise.reject(new XenError('EBUSY', 'map is being unloaded'));
    let busy = 0;
    for (let i = 0; i < m.dm_nsegs; i++) {
      if ((m.gm_paddr[i] ?? -1) < 0) continue;
      if (this.gnttab.tryRemove(m.gm_ref[i]!)) this.restore(m, i);
      else busy++;
    }
    if (busy === 0) {
      unloadMap(m);
      return RESOLVED;
    }
    return this.unloadSlow(m, signal);
  }

  private async unloadSlow(m: XenDmaMap, signal: AbortSignal | undefined): Promise<void> {
    m.unloading = true;
    let lost = 0;
    let code = 'EBUSY';
    try {
      for (let i = 0; i < m.dm_nsegs; i++) {
        if ((m.gm_paddr[i] ?? -1) < 0) continue;
        try {
          await this.gnttab.remove(m.gm_ref[i]!, signal);
        } catch (err) {
          lost++;
          if (err instanceof XenError && err.code === 'ECANCELED') code = 'ECANCELED';
          this.log('segment %d (page %d) still mapped by the peer: quarantined', i, Math.floor((m.gm_paddr[i] ?? 0) / PAGE_SIZE));
          this.replaceRef(m, i);
        }
        this.restore(m, i);
      }
    } finally {
      m.unloading = false;
      unloadMap(m);
    }
    if (lost !== 0) throw new XenError(code, `${lost} segment(s) still mapped by the peer; their pages are quarantined`);
  }

  // xen_bus_dmamap_sync: a full barrier (virtio_membar_sync) for the PRE and
  // the POST pair only; one direction, as the drivers sync their data, needs none.
  dmamapSync(map: DmaMap, offset: number, len: number, ops: number): void {
    syncMap(this.own(map), offset, len, ops);
    if (ops === (BUS_DMASYNC_PREREAD | BUS_DMASYNC_PREWRITE) || ops === (BUS_DMASYNC_POSTREAD | BUS_DMASYNC_POSTWRITE)) {
      // A locked read-modify-write is a full barrier.
      Atomics.add(this.fence, 0, 0);
    }
  }

  dmamemAlloc(size: number, alignment: number, boundary: number, nsegs: number, flags: number): DmaSegment[] {
    return this.dma.dmamemAlloc(size, alignment, boundary, nsegs, flags);
  }

  /** Frees dmamem, except pages in quarantine: the peer may still touch those, so they stay out of use. */
  dmamemFree(segs: readonly DmaSegment[]): void {
    for (const s of segs) {
      if (s.ds_addr % PAGE_SIZE !== 0 || s.ds_len % PAGE_SIZE !== 0) throw new XenError('EINVAL', `segment ${s.ds_addr}+${s.ds_len} is not dmamem`);
      for (let g = s.ds_addr / PAGE_SIZE, end = g + s.ds_len / PAGE_SIZE; g < end; g++) {
        if (this.gnttab.isQuarantined(g)) this.log('page %d stays out of use: quarantined', g);
        else this.dma.freePage(g);
      }
    }
  }

  dmamemMap(segs: readonly DmaSegment[], size: number, flags: number): DmaKva {
    return this.dma.dmamemMap(segs, size, flags);
  }

  dmamemUnmap(kva: DmaKva): void {
    this.dma.dmamemUnmap(kva);
  }
}
