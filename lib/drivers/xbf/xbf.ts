// xbf(4): the Xen block frontend, after OpenBSD sys/dev/pv/xbf.c, with the
// features of Linux xen-blkfront.c: multi-page rings (ring-page-order),
// several queues (multi-queue-num-queues), indirect descriptors
// (feature-max-indirect-segments), persistent grants (feature-persistent),
// the x86_32 request layout (`protocol`), FLUSH_DISKCACHE and WRITE_BARRIER,
// DISCARD, and recovery when the backend goes away and comes back.
//
// Every page the backend touches is shared through the Xen bus_dma tag
// (sc.dmat), so grant refs sit where physical addresses were. A guest image
// hands xbf plain arrays, so data passes through the pages of the request
// slot (ccb): a write is copied in, a read copied out. A transfer starts at
// its sector's offset within a 4 KiB page, where a page cache would put it,
// so segments are unaligned within pages as they are under a real kernel.
// With persistent grants a ccb's pages stay granted for the connection;
// without, each request grants them and revokes them when it completes. A
// backend that is not trusted (`trusted` = 0, XSA-403) gets no persistent
// grants and pages zeroed around the data.
//
// An array from buffer() is guest memory, as the buffers OpenBSD's xbf
// loads into its maps are: with persistent grants its pages are granted
// once per connection and the requests name them, so its data is not
// copied at all.
//
// Responses are copied once off the ring and checked (id outstanding,
// operation matches, status known, grants given back); a violation breaks
// the disk with a logged reason and never throws out of the interrupt.
//
// When the backend closes (it crashed, or dom0 restarted it), the requests
// still out are taken back, oldest first, and issued again once a backend
// connects (Linux blkif_recover): no write acknowledged is lost, and none in
// flight is dropped.

import {
  BLKIF_DISCARD_SECURE, BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
  BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
  VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE, blkif_request_segment,
} from '../../abi/blkif.js';
import { __CONST_RING_SIZE } from '../../abi/ring.js';
import { XEN_IO_PROTO_ABI_X86_64 } from '../../abi/protocols.js';
import {
  XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitWait, XenbusStateInitialised,
} from '../../abi/xenbus.js';
import {
  BUS_DMA_READ, BUS_DMA_WRITE, BUS_DMA_ZERO, BUS_DMASYNC_POSTREAD, BUS_DMASYNC_POSTWRITE, BUS_DMASYNC_PREREAD,
  BUS_DMASYNC_PREWRITE, busDmaDomid, type DmaKva, type DmaSegment, type XenDmaMap,
} from '../../busdma/busdma.js';
import { XenError } from '../../errors.js';
import type { IntrHandle } from '../../evtchn/evtchn.js';
import { copyBytes, FramePage, PAGE_SIZE, zeroBytes } from '../../hypervisor/page.js';
import { logger, type Log } from '../../log.js';
import { BLKIF_WIRES, putU64, requestBytes, type BlkifWire } from '../../xen/blkif.js';
import { FrontRing } from '../../xen/ring.js';
import type { XenDevice, XenDriver, XenSoftc } from '../../xen/xen.js';
import type { XsWatch } from '../../xenstore/xenstore.js';

// --- wire layouts ------------------------------------------------------------

const XBF_SEC_SHIFT = 9;
const XBF_SEC_SIZE = 1 << XBF_SEC_SHIFT;
const XBF_SECS_PER_PAGE = PAGE_SIZE / XBF_SEC_SIZE;
const XBF_SEG_BYTES = blkif_request_segment.size;
const XBF_SEGS_PER_INDIRECT_PAGE = PAGE_SIZE / XBF_SEG_BYTES;
/** XENBUS_MAX_RING_GRANT_ORDER */
const XBF_MAX_RING_PAGE_ORDER = 4;
const XBF_MAX_QUEUES = 16;
/** Linux blkback's MAX_INDIRECT_SEGMENTS: more would not fit its one indirect page per request. */
const XBF_MAX_INDIRECT_SEGS = 256;
const XBF_MAX_CCBS_PER_QUEUE = 64;
/** Request pages one disk may take: at most 16 MiB and a quarter of free memory. */
const XBF_MAX_BUFFER_PAGES = 4096;
/**
 * Pages of buffer() arrays the disks of one kernel may hand out in its whole
 * life (a detached disk's arrays are never freed, so this bounds what a
 * guest that plugs disks again and again can lose): 4 MiB, and no more than
 * a quarter of the free memory at a time.
 */
const XBF_MAX_DIRECT_PAGES = 1024;
const XBF_CONNECT_TIMEOUT_MS = 30_000;
const XBF_RECONNECT_TIMEOUT_MS = 30_000;
const XBF_MAX_QUEUED = 4096;
/** Settled transfers kept for reuse (io()): a queue depth's worth, so steady I/O allocates none. */
const XBF_IO_POOL = 256;
/** What a transfer of no bytes returns. */
const RESOLVED: Promise<void> = Promise.resolve();
/** Frontend nodes of a connection, removed before the next one publishes its own. */
const XBF_TRANSPORT_NODE = /^(ring-ref\d*|event-channel|queue-\d+|ring-page-order|multi-queue-num-queues|protocol|feature-persistent)$/;

function putU32(bytes: Uint8Array, at: number, value: number): void {
  bytes[at] = value & 0xff;
  bytes[at + 1] = (value >>> 8) & 0xff;
  bytes[at + 2] = (value >>> 16) & 0xff;
  bytes[at + 3] = value >>> 24;
}

// --- tunables ------------------------------------------------------------------

/**
 * What this frontend asks for, from `xbf.<name>=<value>` words on the kernel
 * command line (the config's `extra`), as Linux takes xen_blkfront.* module
 * parameters. The backend's limits cap each one.
 */
export type XbfParams = {
  /** xbf.max_ring_page_order: ring pages as a power of two, 0..4. */
  maxRingPageOrder: number;
  /** xbf.max_queues: rings, 1..16. */
  maxQueues: number;
  /** xbf.max_indirect_segments: segments per indirect request; 11 or less turns indirect descriptors off. */
  maxIndirectSegments: number;
  /** xbf.feature_persistent: 0 or 1. */
  persistent: boolean;
  /** xbf.protocol: x86_64-abi or x86_32-abi, the request layout on the ring. */
  protocol: string;
  /** xbf.trusted: 0 treats every backend as untrusted, as the `trusted` node does. */
  trusted: boolean;
};

export const xbfDefaultParams: Readonly<XbfParams> = {
  maxRingPageOrder: 0, maxQueues: 1, maxIndirectSegments: 32, persistent: true, protocol: XEN_IO_PROTO_ABI_X86_64, trusted: true,
};

/** The xbf.* words of a command line; a bad value is logged and the default kept. */
export function xbfParams(cmdline: string, log: Log = logger('xbf')): XbfParams {
  const p: XbfParams = { ...xbfDefaultParams };
  for (const word of cmdline.split(/\s+/)) {
    const m = /^xbf\.([a-z_]+)=(.*)$/.exec(word);
    if (m !== null && !setParam(p, m[1]!, m[2]!)) log('ignoring %s', word);
  }
  return p;
}

function setParam(p: XbfParams, key: string, value: string): boolean {
  switch (key) {
    case 'max_ring_page_order':
      return setInt(value, 0, XBF_MAX_RING_PAGE_ORDER, (n) => (p.maxRingPageOrder = n));
    case 'max_queues':
      return setInt(value, 1, XBF_MAX_QUEUES, (n) => (p.maxQueues = n));
    case 'max_indirect_segments':
      return setInt(value, 0, XBF_MAX_INDIRECT_SEGS, (n) => (p.maxIndirectSegments = n));
    case 'feature_persistent':
      return setInt(value, 0, 1, (n) => (p.persistent = n === 1));
    case 'trusted':
      return setInt(value, 0, 1, (n) => (p.trusted = n === 1));
    case 'protocol':
      if (!BLKIF_WIRES.has(value)) return false;
      p.protocol = value;
      return true;
    default:
      return false;
  }
}

function setInt(value: string, min: number, max: number, set: (n: number) => unknown): boolean {
  const n = /^\d+$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) return false;
  set(n);
  return true;
}

// --- softc -------------------------------------------------------------------

/** One transfer (OpenBSD's scsi_xfer, Linux's struct request), split over as many requests as it needs. */
export type XbfBio = {
  /** BLKIF_OP_READ, _WRITE, _WRITE_BARRIER, _FLUSH_DISKCACHE or _DISCARD. */
  op: number;
  /** In 512-byte units, as on the ring. */
  sector: number;
  /** READ fills it; WRITE and WRITE_BARRIER send it; null for a flush or a discard. */
  data: Uint8Array | null;
  /** DISCARD: 512-byte sectors, and BLKIF_DISCARD_SECURE or 0. */
  nrSectors: number;
  flag: number;
  /** Called once, when every request of the transfer has been answered. */
  done: (err: XenError | null) => void;
  /** Bytes of data handed to requests so far (1 once a dataless request is out). */
  next: number;
  inflight: number;
  error: XenError | null;
  /** The last response status (for raw requests). */
  status: number;
  /** Bytes put on the ring as they are (hostile-peer tests), or null. */
  raw: Uint8Array | null;
};

/** A transfer for XbfSoftc.strategy; a caller may reuse it once `done` ran (reset `next`, `inflight`, `error`). */
export function bioCreate(op: number, sector: number, data: Uint8Array | null, nrSectors: number, flag: number, done: (err: XenError | null) => void): XbfBio {
  return { op, sector, data, nrSectors, flag, done, next: 0, inflight: 0, error: null, status: BLKIF_RSP_OKAY, raw: null };
}

/**
 * Words a failed transfer's error as the caller's API promises it (a guest
 * Disk's DiskError), from the disk sectors it asked for; made once per
 * caller, so a transfer carries no closure of its own.
 */
export type XbfErrorMap = (err: XenError, lba: number, count: number) => Error;

/** A transfer io() made and the promise it settles; back in the pool once settled. */
type XbfIo = { bio: XbfBio; resolve: () => void; reject: (err: Error) => void; mapError: XbfErrorMap | null };

function noop(): void {}

function bioIssued(bio: XbfBio): boolean {
  return bio.data === null ? bio.next > 0 : bio.next >= bio.data.length;
}

/**
 * An array of guest memory from buffer(), its pages granted to the backend
 * while a connection with persistent grants uses it (`granted`).
 */
type XbfDirect = { bytes: Uint8Array; segs: DmaSegment[]; map: XenDmaMap; npages: number; granted: boolean; lost: boolean };

/** One request slot (OpenBSD's struct xbf_ccb, Linux's blk_shadow): its id on the ring is its index in its queue. */
type XbfCcb = {
  id: number;
  dataSegs: DmaSegment[];
  dataKva: DmaKva;
  dataMap: XenDmaMap;
  /** A view of each data page, for copies in and out. */
  pages: Uint8Array[];
  indSegs: DmaSegment[] | null;
  indKva: DmaKva | null;
  indMap: XenDmaMap | null;
  indPages: Uint8Array[];
  /** The transfer this request carries a piece of; null when the slot is free. */
  bio: XbfBio | null;
  /** The buffer() array whose own pages the piece names, or null when it uses the ccb's pages. */
  direct: XbfDirect | null;
  /** The operation the response must carry. */
  rspOp: number;
  /** The piece: first 512-byte sector, byte offset in bio.data, bytes, and its order of issue. */
  sector: number;
  offset: number;
  len: number;
  seq: number;
};

/** One ring and its event channel (Linux struct blkfront_ring_info). */
type XbfQueue = {
  index: number;
  name: string;
  ringSegs: DmaSegment[];
  ringKva: DmaKva;
  ringMap: XenDmaMap;
  ring: FrontRing;
  ih: IntrHandle | null;
  ccbs: XbfCcb[];
  free: XbfCcb[];
  /** Requests put on the ring and not yet pushed. */
  dirty: boolean;
  req: Uint8Array;
  reqView: DataView;
  rsp: Uint8Array;
  rspView: DataView;
};

/** What was negotiated with the backend, for a guest image or a test to see. */
export type XbfFeatures = {
  protocol: string;
  ringPageOrder: number;
  queues: number;
  /** Segments per indirect request, 0 when indirect descriptors are off. */
  indirectSegments: number;
  persistent: boolean;
  trusted: boolean;
  flushCache: boolean;
  barrier: boolean;
  discard: boolean;
  discardGranularity: number;
  discardAlignment: number;
  discardSecure: boolean;
};

export class XbfSoftc {
  readonly name: string;
  readonly log: Log;
  readonly devid: number;
  readonly params: XbfParams;
  wire: BlkifWire;
  /** In sectorSize units. */
  sectors = 0;
  sectorSize = XBF_SEC_SIZE;
  physicalSectorSize = XBF_SEC_SIZE;
  readOnly = false;
  cdrom = false;
  removable = false;
  features: XbfFeatures;
  /** Pages per request: 11, or the indirect segment count. */
  segsPerRequest: number = BLKIF_MAX_SEGMENTS_PER_REQUEST;
  queues: XbfQueue[] = [];
  /** connecting -> connected <-> recovering; broken for good. */
  state: 'connecting' | 'connected' | 'recovering' | 'broken' = 'connecting';
  /** Set once: the backend broke the protocol, never came back, or the disk went away. */
  error: XenError | null = null;
  /** Times a backend came back and the requests in flight were issued again. */
  reconnects = 0;
  recovery: Promise<void> | null = null;
  watch: XsWatch | null = null;
  readonly abort = new AbortController();
  /** Transfers waiting for a ccb, oldest first. */
  private readonly pending: XbfBio[] = [];
  /** While the kernel suspends: transfers asked for since, waiting for resume (null when not suspending). */
  private held: XbfBio[] | null = null;
  /** Waiting until nothing is queued or in flight. */
  private idleWaiters: Array<() => void> = [];
  private seq = 0;
  private nextQueue = 0;
  /** Settled io() transfers, for reuse. */
  private readonly ioPool: XbfIo[] = [];
  /** The arrays buffer() made, by the array itself. */
  readonly directs = new Map<Uint8Array, XbfDirect>();
  /** A push of the rings is queued as a microtask (see strategy). */
  private pushQueued = false;
  private readonly pushLater = (): void => {
    this.pushQueued = false;
    this.push();
  };

  constructor(
    readonly sc: XenSoftc,
    readonly dev: XenDevice,
  ) {
    this.name = `xbf${dev.unit}`;
    this.log = logger('xbf', this.name);
    this.devid = Number(dev.unit);
    this.params = xbfParams(sc.cmdline, this.log);
    this.wire = BLKIF_WIRES.get(this.params.protocol)!;
    this.features = {
      protocol: this.wire.protocol, ringPageOrder: 0, queues: 0, indirectSegments: 0, persistent: false, trusted: true,
      flushCache: false, barrier: false, discard: false, discardGranularity: 0, discardAlignment: 0, discardSecure: false,
    };
  }

  /** 512-byte sectors per disk sector. */
  get ratio(): number {
    return this.sectorSize / XBF_SEC_SIZE;
  }

  // --- the disk as the guest uses it -------------------------------------------------

  // xbf_scsi_cmd READ: `count` disk sectors from `lba`.
  async read(lba: number, count: number): Promise<Uint8Array> {
    this.checkRange(lba, count);
    const out = new Uint8Array(count * this.sectorSize);
    if (count > 0) await this.io(BLKIF_OP_READ, lba * this.ratio, out);
    return out;
  }

  /**
   * READ into the caller's array (whole sectors). Not an async function: the
   * promise io() makes is the only one per transfer (random 4 KiB I/O spends
   * a good part of its guest time on promises).
   */
  readInto(lba: number, into: Uint8Array, mapError: XbfErrorMap | null = null): Promise<void> {
    try {
      this.checkData(into);
      this.checkRange(lba, into.length / this.sectorSize);
    } catch (err) {
      return Promise.reject(mapError === null ? err : mapError(err as XenError, lba, into.length / this.sectorSize));
    }
    return into.length > 0 ? this.io(BLKIF_OP_READ, lba * this.ratio, into, 0, 0, mapError) : RESOLVED;
  }

  /**
   * `bytes` (whole sectors) of the guest's own memory, zeroed, for readInto
   * and write. While the backend grants persistently, the requests name its
   * pages and nothing is copied; otherwise it goes through the request
   * pages as any array does. A subarray of it is copied too. It lives as
   * long as the kernel: the backend keeps persistent grants mapped for the
   * whole connection, so its pages are never handed back, even when the
   * disk is detached (the caller may still hold the array). Only a trusted
   * backend gets persistent grants; one that keeps a buffer mapped after
   * its connection can still write into it, and xbf copies that buffer
   * from then on (xbfQueuesDestroy). EINVAL for a size that is not whole
   * sectors, ENOMEM past XBF_MAX_DIRECT_PAGES for the kernel's disks
   * together, or a quarter of the free memory; a detached or broken disk's
   * error (ENXIO, EIO), as its transfers get.
   */
  buffer(bytes: number): Uint8Array {
    if (this.error !== null) throw this.error;
    if (!Number.isSafeInteger(bytes) || bytes <= 0 || bytes % this.sectorSize !== 0) {
      throw new XenError('EINVAL', `${this.name}: a buffer is whole sectors of ${this.sectorSize} bytes, not ${bytes}`);
    }
    const npages = Math.ceil(bytes / PAGE_SIZE);
    const made = directPages.get(this.sc) ?? 0;
    if (made + npages > XBF_MAX_DIRECT_PAGES || npages > Math.floor(this.sc.physmem.freePages / 4)) {
      throw new XenError('ENOMEM', `${this.name}: ${npages} buffer pages more than the ${XBF_MAX_DIRECT_PAGES - made} left (or a quarter of free memory)`);
    }
    const { dmat } = this.sc;
    // One segment: the pages are contiguous, so the array is one view of them.
    const segs = dmat.dmamemAlloc(npages * PAGE_SIZE, PAGE_SIZE, 0, 1, 0);
    let map: XenDmaMap;
    try {
      map = dmat.dmamapCreate(npages * PAGE_SIZE, npages, PAGE_SIZE, PAGE_SIZE, 0);
    } catch (err) {
      dmat.dmamemFree(segs);
      throw err;
    }
    const bytesView = this.sc.mem.u8.subarray(segs[0]!.ds_addr, segs[0]!.ds_addr + bytes);
    this.directs.set(bytesView, { bytes: bytesView, segs, map, npages, granted: false, lost: false });
    directPages.set(this.sc, made + npages);
    return bytesView;
  }

  // xbf_scsi_cmd WRITE. FUA: a barrier write when the backend only has
  // barriers, else (feature-flush-cache) the write and then a flush.
  write(lba: number, data: Uint8Array, opts: { fua?: boolean } = {}, mapError: XbfErrorMap | null = null): Promise<void> {
    try {
      this.checkData(data);
      this.checkRange(lba, data.length / this.sectorSize);
      if (this.readOnly) throw new XenError('EROFS', `${this.name}: read-only disk`);
    } catch (err) {
      return Promise.reject(mapError === null ? err : mapError(err as XenError, lba, data.length / this.sectorSize));
    }
    if (data.length === 0) return RESOLVED;
    if (opts.fua !== true) return this.io(BLKIF_OP_WRITE, lba * this.ratio, data, 0, 0, mapError);
    if (this.features.barrier && !this.features.flushCache) return this.io(BLKIF_OP_WRITE_BARRIER, lba * this.ratio, data);
    return this.io(BLKIF_OP_WRITE, lba * this.ratio, data).then(() => this.flush());
  }

  // xbf_scsi_cmd SYNCHRONIZE_CACHE: a backend with neither feature writes through.
  async flush(): Promise<void> {
    if (this.error !== null) throw this.error;
    if (this.features.flushCache) await this.io(BLKIF_OP_FLUSH_DISKCACHE, 0, null);
    else if (this.features.barrier) await this.io(BLKIF_OP_WRITE_BARRIER, 0, null);
  }

  /** BLKIF_OP_DISCARD of `count` disk sectors; `secure` asks that the old data be unrecoverable. */
  async discard(lba: number, count: number, opts: { secure?: boolean } = {}): Promise<void> {
    this.checkRange(lba, count);
    if (this.readOnly) throw new XenError('EROFS', `${this.name}: read-only disk`);
    const secure = opts.secure === true;
    if (!this.features.discard || (secure && !this.features.discardSecure)) {
      throw new XenError('EOPNOTSUPP', `${this.name}: the backend offers no ${secure ? 'secure ' : ''}discard`);
    }
    if (count === 0) return;
    await this.io(BLKIF_OP_DISCARD, lba * this.ratio, null, count * this.ratio, secure ? BLKIF_DISCARD_SECURE : 0);
  }

  private checkData(data: Uint8Array): void {
    if (!(data instanceof Uint8Array) || data.length % this.sectorSize !== 0) {
      throw new XenError('EINVAL', `${this.name}: data must be whole sectors of ${this.sectorSize} bytes`);
    }
  }

  private checkRange(lba: number, count: number): void {
    if (this.error !== null) throw this.error;
    if (!Number.isSafeInteger(lba) || !Number.isSafeInteger(count) || lba < 0 || count < 0 || lba + count > this.sectors) {
      throw new XenError('EINVAL', `${this.name}: sectors ${lba}+${count} outside 0..${this.sectors}`);
    }
  }

  /**
   * One transfer and its promise, the only allocation per transfer: the
   * transfer itself comes from the pool (its done callback made once, with it).
   */
  private io(op: number, sector: number, data: Uint8Array | null, nrSectors = 0, flag = 0, mapError: XbfErrorMap | null = null): Promise<void> {
    const io = this.ioPool.pop() ?? this.ioCreate();
    const bio = io.bio;
    bio.op = op;
    bio.sector = sector;
    bio.data = data;
    bio.nrSectors = nrSectors;
    bio.flag = flag;
    bio.next = 0;
    bio.inflight = 0;
    bio.error = null;
    bio.status = BLKIF_RSP_OKAY;
    io.mapError = mapError;
    return new Promise((resolve, reject) => {
      io.resolve = resolve;
      io.reject = reject;
      this.strategy(bio);
    });
  }

  private ioCreate(): XbfIo {
    const io: XbfIo = { bio: bioCreate(BLKIF_OP_READ, 0, null, 0, 0, (err) => this.ioDone(io, err)), resolve: noop, reject: noop, mapError: null };
    return io;
  }

  /** A transfer of io() is done: back to the pool (done runs once per transfer), then its promise settles. */
  private ioDone(io: XbfIo, err: XenError | null): void {
    const { bio, resolve, reject, mapError } = io;
    const failed = err === null || mapError === null ? err
      : mapError(err, bio.sector / this.ratio, bio.data === null ? bio.nrSectors / this.ratio : bio.data.length / this.sectorSize);
    bio.data = null;
    io.resolve = io.reject = noop;
    io.mapError = null;
    if (this.ioPool.length < XBF_IO_POOL) this.ioPool.push(io);
    if (failed === null) resolve();
    else reject(failed);
  }

  // --- datapath ------------------------------------------------------------------

  /** xbf_scsi_cmd: queue a transfer; `bio.done` is called once it is answered. */
  strategy(bio: XbfBio): void {
    if (this.error !== null) return bio.done(this.error);
    if (this.held !== null) {
      if (this.held.length >= XBF_MAX_QUEUED) return bio.done(new XenError('EAGAIN', `${this.name}: ${XBF_MAX_QUEUED} transfers held`));
      this.held.push(bio);
      return;
    }
    if (this.pending.length >= XBF_MAX_QUEUED) return bio.done(new XenError('EAGAIN', `${this.name}: ${XBF_MAX_QUEUED} transfers queued`));
    this.pending.push(bio);
    // The first transfer of a run is pushed at once, so that a backend asleep
    // starts waking while the rest are put on the ring; those are pushed
    // together once the run is out (a microtask: the callers one interrupt
    // resumed all issue first), as blk-mq's commit_rqs: one index update per
    // batch, and still one event.
    this.dispatch(false);
  }

  /** Put queued transfers on the rings while ccbs are free, then push them now, or the first now and the rest in a microtask. */
  private dispatch(pushNow = true): void {
    if (this.state !== 'connected') return;
    while (this.pending.length > 0) {
      const q = this.freeQueue();
      if (q === null) break;
      const bio = this.pending[0]!;
      const ccb = q.free.pop()!;
      try {
        this.start(q, ccb, bio);
      } catch (err) {
        // The request could not be built (no grant refs): the transfer fails, the ring goes on.
        this.reclaim(ccb, bio);
        ccb.bio = null;
        q.free.push(ccb);
        this.pending.shift();
        this.fail(bio, err instanceof XenError ? err : new XenError('EIO', String(err)));
        continue;
      }
      if (bioIssued(bio)) this.pending.shift();
    }
    if (pushNow) return this.push();
    if (this.pushQueued) return;
    this.push();
    this.pushQueued = true;
    queueMicrotask(this.pushLater);
  }

  /** Publish the requests put on each ring, and signal a backend that asked to be told. */
  private push(): void {
    for (const q of this.queues) {
      if (!q.dirty) continue;
      q.dirty = false;
      if (q.ring.pushRequests() && q.ih !== null) this.sc.intr.intrSignal(q.ih);
    }
  }

  /** The next queue, round robin, that has a free ccb. */
  private freeQueue(): XbfQueue | null {
    const n = this.queues.length;
    for (let i = 0; i < n; i++) {
      const q = this.queues[(this.nextQueue + i) % n]!;
      if (q.free.length > 0) {
        this.nextQueue = (this.nextQueue + i + 1) % n;
        return q;
      }
    }
    return null;
  }

  // xbf_submit_cmd: the next piece of `bio` as one request in `ccb`, on q's ring (not yet pushed).
  private start(q: XbfQueue, ccb: XbfCcb, bio: XbfBio): void {
    const w = this.wire;
    q.req.fill(0);
    ccb.bio = bio;
    ccb.seq = this.seq++;
    ccb.sector = bio.sector;
    ccb.offset = 0;
    ccb.len = 0;
    if (bio.raw !== null) {
      this.encodeRaw(q, ccb, bio.raw);
      bio.next = 1;
    } else if (bio.op === BLKIF_OP_DISCARD) {
      q.req[0] = BLKIF_OP_DISCARD;
      q.req[w.discardFlag] = bio.flag;
      q.reqView.setUint16(w.discardHandle, this.devid & 0xffff, true);
      putU64(q.reqView, w.discardId, ccb.id);
      putU64(q.reqView, w.discardSector, bio.sector);
      putU64(q.reqView, w.discardNrSectors, bio.nrSectors);
      ccb.rspOp = BLKIF_OP_DISCARD;
      bio.next = 1;
    } else if (bio.data === null) {
      this.encodeDirect(q, ccb, bio.op, 0, bio.sector);
      bio.next = 1;
    } else {
      this.load(q, ccb, bio);
    }
    bio.inflight++;
    // The slot gets what the request uses (OpenBSD's xbf fills only those
    // fields in place), and a raw request all its caller gave.
    q.ring.putRequest(q.req, bio.raw !== null ? q.req.length : requestBytes(w, q.req));
    q.dirty = true;
  }

  /** A READ/WRITE/barrier piece: fill and grant the pages, describe them directly or through indirect pages. */
  private load(q: XbfQueue, ccb: XbfCcb, bio: XbfBio): void {
    const data = bio.data!;
    const direct = this.directs.size === 0 || !this.features.persistent ? undefined : this.directs.get(data);
    if (direct !== undefined && !direct.lost) return this.loadDirect(q, ccb, bio, direct);
    ccb.direct = null;
    const sector = bio.sector + bio.next / XBF_SEC_SIZE;
    const pageOff = (sector % XBF_SECS_PER_PAGE) * XBF_SEC_SIZE;
    const len = this.pieceBytes(bio, pageOff);
    const npages = Math.ceil((pageOff + len) / PAGE_SIZE);
    const write = bio.op !== BLKIF_OP_READ;
    if (!this.features.trusted) for (let i = 0; i < npages; i++) zeroBytes(ccb.pages[i]!, 0, PAGE_SIZE);
    if (write) copyPages(ccb.pages, pageOff, data, bio.next, len, true);
    const dmat = this.sc.dmat;
    if (!this.features.persistent) {
      dmat.dmamapLoadRaw(ccb.dataMap, ccb.dataSegs, npages * PAGE_SIZE, busDmaDomid(this.dev.backendId) | (write ? BUS_DMA_WRITE : BUS_DMA_READ));
    }
    dmat.dmamapSync(ccb.dataMap, 0, npages * PAGE_SIZE, write ? BUS_DMASYNC_PREWRITE : BUS_DMASYNC_PREREAD);
    ccb.sector = sector;
    ccb.offset = bio.next;
    ccb.len = len;
    bio.next += len;
    this.encodeSegments(q, ccb, bio.op, sector, ccb.dataMap, 0, pageOff, len, npages);
  }

  /**
   * A piece of a buffer() array: its own pages, granted for the connection
   * the first time one is used, from the page that holds byte bio.next on.
   * The backend sees those pages whole, as it sees a ccb's persistent ones:
   * only a trusted backend gets persistent grants (XSA-403).
   */
  private loadDirect(q: XbfQueue, ccb: XbfCcb, bio: XbfBio, d: XbfDirect): void {
    const dmat = this.sc.dmat;
    const first = Math.floor(bio.next / PAGE_SIZE);
    const pageOff = bio.next - first * PAGE_SIZE;
    const len = this.pieceBytes(bio, pageOff);
    const npages = Math.ceil((pageOff + len) / PAGE_SIZE);
    if (!d.granted) {
      dmat.dmamapLoadRaw(d.map, d.segs, d.npages * PAGE_SIZE, busDmaDomid(this.dev.backendId));
      d.granted = true;
    }
    // The whole map, as a ccb's is synced (and the POST sync in reclaim is).
    dmat.dmamapSync(d.map, 0, d.map.dm_mapsize, bio.op !== BLKIF_OP_READ ? BUS_DMASYNC_PREWRITE : BUS_DMASYNC_PREREAD);
    const sector = bio.sector + bio.next / XBF_SEC_SIZE;
    ccb.direct = d;
    ccb.sector = sector;
    ccb.offset = bio.next;
    ccb.len = len;
    bio.next += len;
    this.encodeSegments(q, ccb, bio.op, sector, d.map, first, pageOff, len, npages);
  }

  /** Bytes of the transfer from bio.next that one request carries, its first page used from `pageOff`: whole sectors, at most its segments' pages. */
  private pieceBytes(bio: XbfBio, pageOff: number): number {
    const maxSegs = bio.op === BLKIF_OP_WRITE_BARRIER ? BLKIF_MAX_SEGMENTS_PER_REQUEST : this.segsPerRequest;
    const cap = Math.floor((maxSegs * PAGE_SIZE - pageOff) / this.sectorSize) * this.sectorSize;
    return Math.min(bio.data!.length - bio.next, cap);
  }

  /** The piece's `npages` pages, from page `base` of `map` on: in the request, or through indirect pages. */
  private encodeSegments(q: XbfQueue, ccb: XbfCcb, op: number, sector: number, map: XenDmaMap, base: number, pageOff: number, len: number, npages: number): void {
    if (npages <= BLKIF_MAX_SEGMENTS_PER_REQUEST) {
      this.encodeDirect(q, ccb, op, npages, sector);
      for (let i = 0; i < npages; i++) this.putSegment(q.req, this.wire.reqSeg + i * XBF_SEG_BYTES, map, base, i, pageOff, len, npages);
    } else {
      this.encodeIndirect(q, ccb, op, npages, sector, map, base, pageOff, len);
    }
  }

  /** blkif_request_segment `i` of the piece: its page's grant (page base + i of `map`) and the sectors used in it. */
  private putSegment(into: Uint8Array, at: number, map: XenDmaMap, base: number, i: number, pageOff: number, len: number, npages: number): void {
    const first = i === 0 ? pageOff >> XBF_SEC_SHIFT : 0;
    const last = i === npages - 1 ? ((pageOff + len - 1 - i * PAGE_SIZE) >> XBF_SEC_SHIFT) : XBF_SECS_PER_PAGE - 1;
    putU32(into, at, map.dm_segs[base + i]!.ds_addr);
    into[at + 4] = first;
    into[at + 5] = last;
  }

  private encodeDirect(q: XbfQueue, ccb: XbfCcb, op: number, nrSegments: number, sector: number): void {
    const w = this.wire;
    q.req[0] = op;
    q.req[w.reqNrSegments] = nrSegments;
    q.reqView.setUint16(w.reqHandle, this.devid & 0xffff, true);
    putU64(q.reqView, w.reqId, ccb.id);
    putU64(q.reqView, w.reqSector, sector);
    ccb.rspOp = op;
  }

  // blkif_setup_rw_req with indirect grants: the segments go in the ccb's indirect pages.
  private encodeIndirect(q: XbfQueue, ccb: XbfCcb, op: number, npages: number, sector: number, map: XenDmaMap, base: number, pageOff: number, len: number): void {
    const w = this.wire;
    const nind = Math.ceil(npages / XBF_SEGS_PER_INDIRECT_PAGE);
    if (!this.features.trusted) for (let p = 0; p < nind; p++) zeroBytes(ccb.indPages[p]!, 0, PAGE_SIZE);
    for (let i = 0; i < npages; i++) {
      const page = ccb.indPages[Math.floor(i / XBF_SEGS_PER_INDIRECT_PAGE)]!;
      this.putSegment(page, (i % XBF_SEGS_PER_INDIRECT_PAGE) * XBF_SEG_BYTES, map, base, i, pageOff, len, npages);
    }
    const indMap = ccb.indMap!;
    if (!this.features.persistent) this.sc.dmat.dmamapLoadRaw(indMap, ccb.indSegs!, nind * PAGE_SIZE, busDmaDomid(this.dev.backendId) | BUS_DMA_WRITE);
    this.sc.dmat.dmamapSync(indMap, 0, nind * PAGE_SIZE, BUS_DMASYNC_PREWRITE);
    q.req[0] = BLKIF_OP_INDIRECT;
    q.req[w.indOp] = op;
    q.reqView.setUint16(w.indNrSegments, npages, true);
    putU64(q.reqView, w.indId, ccb.id);
    putU64(q.reqView, w.indSector, sector);
    q.reqView.setUint16(w.indHandle, this.devid & 0xffff, true);
    for (let p = 0; p < nind; p++) q.reqView.setUint32(w.indGrefs + p * 4, indMap.dm_segs[p]!.ds_addr, true);
    ccb.rspOp = op;
  }

  /** A raw request: the caller's bytes with the ccb's id in the field its operation uses. */
  private encodeRaw(q: XbfQueue, ccb: XbfCcb, raw: Uint8Array): void {
    const w = this.wire;
    q.req.set(raw.subarray(0, q.req.length));
    const op = q.req[0]!;
    const idAt = op === BLKIF_OP_INDIRECT ? w.indId : op === BLKIF_OP_DISCARD ? w.discardId : w.reqId;
    putU64(q.reqView, idAt, ccb.id);
    ccb.rspOp = op === BLKIF_OP_INDIRECT ? q.req[w.indOp]! : op;
  }

  // xbf_intr: take the answers, then start what waits for the ccbs they freed.
  // False when the event brought none (the interrupt layer throttles a
  // backend that keeps signalling for nothing).
  intr(q: XbfQueue): boolean {
    if (this.error !== null) return false;
    const before = q.ring.rspConsumed;
    if (this.drain(q)) this.dispatch();
    return q.ring.rspConsumed !== before || this.error !== null;
  }

  /** Copy each response on q's ring once, check it, complete its ccb; false when the disk broke. */
  private drain(q: XbfQueue): boolean {
    if (this.error !== null) return false;
    const ring = q.ring;
    do {
      ring.unconsumedResponses();
      while (ring.takeResponse(q.rsp)) {
        const why = this.response(q);
        if (why !== null) {
          this.broken(why);
          return false;
        }
      }
    } while (ring.finalCheckForResponses());
    if (ring.error !== undefined) {
      this.broken(ring.error.message);
      return false;
    }
    return true;
  }

  /** The response in q.rsp against what is outstanding: null when it completed a ccb, else what is wrong. */
  private response(q: XbfQueue): string | null {
    const w = this.wire;
    const lo = q.rspView.getUint32(w.rspId, true);
    const hi = q.rspView.getUint32(w.rspId + 4, true);
    const op = q.rsp[w.rspOperation]!;
    const status = q.rspView.getInt16(w.rspStatus, true);
    const ccb = hi === 0 && lo < q.ccbs.length ? q.ccbs[lo]! : undefined;
    if (ccb === undefined || ccb.bio === null) return `queue ${q.index}: response for id ${hi * 0x1_0000_0000 + lo}, which is not outstanding`;
    if (op !== ccb.rspOp) return `queue ${q.index}: response for id ${lo} has operation ${op}, the request ${ccb.rspOp}`;
    if (status !== BLKIF_RSP_OKAY && status !== BLKIF_RSP_ERROR && status !== BLKIF_RSP_EOPNOTSUPP) {
      return `queue ${q.index}: response for id ${lo} has unknown status ${status}`;
    }
    return this.complete(q, ccb, status);
  }

  // xbf_complete_cmd + xbf_reclaim_cmd: revoke, copy a read out, free the ccb, account the piece.
  private complete(q: XbfQueue, ccb: XbfCcb, status: number): string | null {
    const bio = ccb.bio!;
    const direct = ccb.direct !== null;
    ccb.bio = null;
    if (!this.reclaim(ccb, bio)) {
      this.settle(bio, new XenError('EIO', `${this.name}: backend kept a grant mapped`));
      return `queue ${q.index}: the backend still maps the pages of id ${ccb.id} after answering it`;
    }
    if (status === BLKIF_RSP_OKAY && bio.op === BLKIF_OP_READ && bio.data !== null && bio.raw === null && !direct) {
      copyPages(ccb.pages, (ccb.sector % XBF_SECS_PER_PAGE) * XBF_SEC_SIZE, bio.data, ccb.offset, ccb.len, false);
    }
    q.free.push(ccb);
    bio.status = status;
    this.settle(bio, status === BLKIF_RSP_OKAY || bio.raw !== null ? null : this.statusError(bio, status));
    if (this.idleWaiters.length > 0 && this.isIdle()) for (const f of this.idleWaiters.splice(0)) f();
    return null;
  }

  /** Revoke a non-persistent request's grants; false if the backend still maps one (the ccb is then lost). */
  private reclaim(ccb: XbfCcb, bio: XbfBio): boolean {
    const d = ccb.direct;
    if (d !== null) {
      // A buffer() array's grants stay for the connection (they are only used with persistent grants).
      ccb.direct = null;
      this.sc.dmat.dmamapSync(d.map, 0, d.map.dm_mapsize, bio.op === BLKIF_OP_READ ? BUS_DMASYNC_POSTREAD : BUS_DMASYNC_POSTWRITE);
      return ccb.indMap === null || this.reclaimMap(ccb, ccb.indMap, false);
    }
    const data = this.reclaimMap(ccb, ccb.dataMap, bio.op === BLKIF_OP_READ);
    return (ccb.indMap === null || this.reclaimMap(ccb, ccb.indMap, false)) && data;
  }

  private reclaimMap(ccb: XbfCcb, map: XenDmaMap, read: boolean): boolean {
    if (map.dm_nsegs === 0) return true;
    const dmat = this.sc.dmat;
    dmat.dmamapSync(map, 0, map.dm_mapsize, read ? BUS_DMASYNC_POSTREAD : BUS_DMASYNC_POSTWRITE);
    if (this.features.persistent) return true;
    dmat.dmamapUnload(map).catch((err: Error) => this.log('ccb %d: %s', ccb.id, err.message));
    // The fast path revokes at once; a map still loaded waits on the backend (then quarantine).
    return map.dm_nsegs === 0;
  }

  private statusError(bio: XbfBio, status: number): XenError {
    const what = `${this.name}: operation ${bio.op} at sector ${bio.sector}`;
    if (status !== BLKIF_RSP_EOPNOTSUPP) return new XenError('EIO', `${what}: BLKIF_RSP_ERROR`);
    // blkif_interrupt: the backend withdrew the feature.
    if (bio.op === BLKIF_OP_WRITE_BARRIER) this.features.barrier = false;
    else if (bio.op === BLKIF_OP_FLUSH_DISKCACHE) this.features.flushCache = false;
    else if (bio.op === BLKIF_OP_DISCARD && bio.flag !== 0) this.features.discardSecure = false;
    else if (bio.op === BLKIF_OP_DISCARD) this.features.discard = false;
    return new XenError('EOPNOTSUPP', `${what}: not supported by the backend`);
  }

  /** One request of `bio` answered (or given up): the transfer is done when all are. */
  private settle(bio: XbfBio, err: XenError | null): void {
    bio.inflight--;
    if (err !== null && bio.error === null) bio.error = err;
    if (bio.inflight === 0 && bioIssued(bio)) bio.done(bio.error);
  }

  /** A transfer that will get no more requests. */
  private fail(bio: XbfBio, err: XenError): void {
    if (bio.error === null) bio.error = err;
    bio.next = bio.data === null ? 1 : bio.data.length;
    if (bio.inflight === 0) bio.done(bio.error);
  }

  /** The disk is unusable from now on: every transfer in flight and queued fails. */
  broken(reason: string, code = 'EIO'): void {
    if (this.error !== null) return;
    this.error = new XenError(code, `${this.name}: ${reason}`);
    this.state = 'broken';
    this.log('broken: %s', reason);
    for (const q of this.queues) {
      for (const ccb of q.ccbs) {
        const bio = ccb.bio;
        if (bio === null) continue;
        ccb.bio = null;
        this.settle(bio, this.error);
      }
    }
    for (const bio of this.pending.splice(0)) this.fail(bio, this.error);
    for (const bio of this.held?.splice(0) ?? []) this.fail(bio, this.error);
    for (const f of this.idleWaiters.splice(0)) f();
  }

  // --- suspend ---------------------------------------------------------------------

  private isIdle(): boolean {
    return this.pending.length === 0 && this.queues.every((q) => q.free.length === q.ccbs.length);
  }

  /**
   * For the kernel's suspend: transfers asked for from now on wait; resolves
   * when every transfer asked for before (queued or in flight) is answered,
   * or after `timeoutMs`.
   */
  async quiesce(timeoutMs: number): Promise<void> {
    this.held ??= [];
    if (this.error !== null || this.isIdle()) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      new Promise<void>((resolve) => this.idleWaiters.push(resolve)),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs))),
    ]);
    clearTimeout(timer);
  }

  /** After a suspend the toolstack cancelled: the backend is as it was, so the held transfers go. */
  unhold(): void {
    const held = this.held ?? [];
    this.held = null;
    for (const bio of held) this.strategy(bio);
  }

  /**
   * Put `raw` on the first ring as one request under a free ccb's id (the id
   * field of its operation is overwritten) and resolve with the response's
   * status. For tests that play a hostile frontend against a real backend.
   */
  rawRequest(raw: Uint8Array): Promise<number> {
    return new Promise((resolve, reject) => {
      const bio = bioCreate(raw[0] ?? 0, 0, null, 0, 0, (err) => (err === null ? resolve(bio.status) : reject(err)));
      bio.raw = raw.slice();
      this.strategy(bio);
    });
  }

  // --- recovery ------------------------------------------------------------------

  /** The backend's state changed: a connected disk whose backend closes starts recovery. */
  backendChanged(): void {
    if (this.state !== 'connected') return;
    void this.sc.xs.read(`${this.dev.backend}/state`).then(Number, () => XenbusStateClosed).then(async (s) => {
      if (this.state !== 'connected' || (s !== XenbusStateClosing && s !== XenbusStateClosed)) return;
      // online 0: the toolstack unplugs the disk; the nexus detaches it (lib/xen/xen.ts).
      if ((await this.sc.xs.read(`${this.dev.backend}/online`).catch(() => '0')) !== '1') return;
      if (this.state !== 'connected') return;
      this.log('backend state %d: recovering', s);
      this.state = 'recovering';
      this.recovery = xbfRecover(this).finally(() => (this.recovery = null));
    });
  }

  /** Take every response the old backend left, then hand the requests still out back to the queue, oldest first. */
  takeBack(): boolean {
    for (const q of this.queues) if (!this.drain(q)) return false;
    const out = this.queues.flatMap((q) => q.ccbs).filter((c) => c.bio !== null).sort((a, b) => a.seq - b.seq);
    const again: XbfBio[] = [];
    for (const ccb of out) {
      const parent = ccb.bio!;
      ccb.bio = null;
      this.reclaim(ccb, parent);
      if (parent.raw !== null) {
        this.settle(parent, new XenError('ECANCELED', `${this.name}: raw request lost with the backend`));
        continue;
      }
      const data = parent.data === null ? null : parent.data.subarray(ccb.offset, ccb.offset + ccb.len);
      again.push(bioCreate(parent.op, ccb.sector, data, parent.nrSectors, parent.flag, (err) => this.settle(parent, err)));
    }
    this.pending.unshift(...again);
    if (again.length > 0) this.log('%d request(s) to issue again', again.length);
    return true;
  }

  /** Connected again after recovery: what waited goes out; a backend that closed meanwhile starts another round. */
  resumed(): void {
    this.reconnects++;
    this.state = 'connected';
    this.dispatch();
    this.backendChanged();
  }
}

/** Copy `len` bytes between `data[at..]` and the pages, which hold them from byte `pageOff` of page 0 on. */
function copyPages(pages: readonly Uint8Array[], pageOff: number, data: Uint8Array, at: number, len: number, toPages: boolean): void {
  for (let p = 0, off = pageOff, done = 0; done < len; p++, off = 0) {
    const n = Math.min(PAGE_SIZE - off, len - done);
    if (toPages) copyBytes(pages[p]!, off, data, at + done, at + done + n);
    else copyBytes(data, at + done, pages[p]!, off, off + n);
    done += n;
  }
}

// blkif_recover: stop the interrupts, take back what is out, let go of the
// rings, say Closed, wait for a backend in InitWait and connect again. A
// backend that closes again before we are connected costs another round;
// all rounds together are bounded by XBF_RECONNECT_TIMEOUT_MS.
async function xbfRecover(xbf: XbfSoftc): Promise<void> {
  const { xs } = xbf.sc;
  const deadline = Date.now() + XBF_RECONNECT_TIMEOUT_MS;
  try {
    for (const q of xbf.queues) {
      if (q.ih !== null) await xbf.sc.intr.intrDisestablish(q.ih);
      q.ih = null;
    }
    if (!xbf.takeBack()) return;
    for (;;) {
      await xbfQueuesDestroy(xbf);
      await xs.write(`${xbf.dev.path}/state`, String(XenbusStateClosed));
      const timeoutMs = Math.max(1, deadline - Date.now());
      await xs.awaitState(`${xbf.dev.backend}/state`, XenbusStateInitWait, { timeoutMs, signal: xbf.abort.signal });
      try {
        await xbfConnect(xbf);
        break;
      } catch (err) {
        if (xbf.abort.signal.aborted || Date.now() >= deadline) throw err;
        xbf.log('reconnect failed, again: %s', (err as Error).message);
      }
    }
    xbf.log('reconnected');
    xbf.resumed();
  } catch (err) {
    if (xbf.abort.signal.aborted) xbf.broken('detached', 'ENXIO');
    else xbf.broken(`backend did not come back: ${(err as Error).message}`);
  }
}

// --- attach/detach -------------------------------------------------------------

const softcs = new WeakMap<XenSoftc, Map<string, XbfSoftc>>();
/** Pages each kernel's disks have handed out as buffer() arrays (XBF_MAX_DIRECT_PAGES). */
const directPages = new WeakMap<XenSoftc, number>();

/** The attached disks of this kernel, in device order. */
export function xbfDisks(sc: XenSoftc): XbfSoftc[] {
  return [...(softcs.get(sc)?.values() ?? [])].sort((a, b) => a.devid - b.devid);
}

// xbf_attach: negotiate (rings, interrupts, ccbs), then watch the backend for
// it going away; a failure unwinds what was built.
async function xbfAttach(sc: XenSoftc, dev: XenDevice): Promise<void> {
  const xbf = new XbfSoftc(sc, dev);
  try {
    await xbfConnect(xbf);
    // Connected first: the watch fires once at once, and a backend that closed meanwhile starts recovery.
    xbf.state = 'connected';
    xbf.watch = await sc.xs.watch(`${dev.backend}/state`, () => xbf.backendChanged());
  } catch (err) {
    xbf.log('attach failed: %s', (err as Error).message);
    xbf.broken('attach failed', 'ENXIO');
    await xbfQueuesDestroy(xbf);
    throw err;
  }
  const map = softcs.get(sc) ?? new Map<string, XbfSoftc>();
  map.set(dev.path, xbf);
  softcs.set(sc, map);
  const f = xbf.features;
  xbf.log('%d sectors of %d bytes%s; %d queue(s), ring order %d, indirect %d, persistent %s, %s',
    xbf.sectors, xbf.sectorSize, xbf.readOnly ? ', read-only' : '', f.queues, f.ringPageOrder, f.indirectSegments, f.persistent, f.protocol);
}

// xbf_detach: Closing, fail what is in flight, release everything, Closed.
async function xbfDetach(sc: XenSoftc, dev: XenDevice): Promise<void> {
  const xbf = softcs.get(sc)?.get(dev.path);
  if (xbf === undefined) return;
  softcs.get(sc)!.delete(dev.path);
  xbf.abort.abort();
  await xbf.watch?.unwatch().catch(() => undefined);
  await sc.xs.write(`${dev.path}/state`, String(XenbusStateClosing)).catch(() => undefined);
  xbf.broken('detached', 'ENXIO');
  await xbf.recovery?.catch(() => undefined);
  await xbfQueuesDestroy(xbf);
  await sc.xs.write(`${dev.path}/state`, String(XenbusStateClosed)).catch(() => undefined);
}

// Suspend, minimally: what was asked for completes and new transfers wait. A
// suspend the toolstack cancels finds the backend as it was, so resume lets
// them go; a restored domain attaches its disks afresh.
async function xbfSuspend(sc: XenSoftc, dev: XenDevice): Promise<void> {
  await softcs.get(sc)?.get(dev.path)?.quiesce(XBF_RECONNECT_TIMEOUT_MS);
}

async function xbfResume(sc: XenSoftc, dev: XenDevice): Promise<void> {
  softcs.get(sc)?.get(dev.path)?.unhold();
}

export const xbfDriver: XenDriver = { name: 'xbf', attach: xbfAttach, detach: xbfDetach, suspend: xbfSuspend, resume: xbfResume };

// --- ring and ccb create/destroy -------------------------------------------------

/** The physical address of each page of dmamem. */
function pagesOf(segs: readonly DmaSegment[]): number[] {
  const out: number[] = [];
  for (const s of segs) for (let off = 0; off < s.ds_len; off += PAGE_SIZE) out.push(s.ds_addr + off);
  return out;
}

// xbf_ring_create for one queue: 2^order zeroed pages granted to the backend, and an unbound port.
function xbfQueueCreate(xbf: XbfSoftc, index: number, order: number): XbfQueue {
  const { dmat, intr, mem } = xbf.sc;
  const size = PAGE_SIZE << order;
  const npages = 1 << order;
  const ringSegs = dmat.dmamemAlloc(size, PAGE_SIZE, 0, npages, BUS_DMA_ZERO);
  const ringKva = dmat.dmamemMap(ringSegs, size, 0);
  let ringMap: XenDmaMap | null = null;
  try {
    ringMap = dmat.dmamapCreate(size, npages, PAGE_SIZE, PAGE_SIZE, 0);
    dmat.dmamapLoadRaw(ringMap, ringSegs, size, busDmaDomid(xbf.dev.backendId));
  } catch (err) {
    if (ringMap !== null) dmat.dmamapDestroy(ringMap);
    dmat.dmamemUnmap(ringKva);
    dmat.dmamemFree(ringSegs);
    throw err;
  }
  const name = `${xbf.name}.${index}`;
  const pages = pagesOf(ringSegs).map((pa) => new FramePage(mem, pa / PAGE_SIZE, true));
  const ring = new FrontRing(pages, xbf.wire.entryBytes, __CONST_RING_SIZE(xbf.wire.sring, size), name, xbf.wire.ringType);
  ring.init();
  const req = new Uint8Array(xbf.wire.entryBytes);
  const rsp = new Uint8Array(xbf.wire.rspBytes);
  const q: XbfQueue = {
    index, name, ringSegs, ringKva, ringMap, ring, ih: null, ccbs: [], free: [], dirty: false,
    req, reqView: new DataView(req.buffer), rsp, rspView: new DataView(rsp.buffer),
  };
  xbf.queues.push(q);
  q.ih = intr.intrEstablish(0, xbf.dev.backendId, () => xbf.intr(q), name);
  return q;
}

// xbf_ring_destroy and xbf_free_ccbs for every queue; tolerates half-built ones.
// The buffer() arrays' grants go with the connection; their pages stay, as
// the caller may still hold the arrays.
async function xbfQueuesDestroy(xbf: XbfSoftc): Promise<void> {
  const { dmat, intr } = xbf.sc;
  for (const d of xbf.directs.values()) {
    if (!d.granted) continue;
    d.granted = false;
    // A backend that keeps them mapped leaves them to the tag's quarantine: the array is then only ever copied.
    await dmat.dmamapUnload(d.map).catch((err: Error) => {
      d.lost = true;
      xbf.log('buffer at %d: %s', d.segs[0]!.ds_addr, err.message);
    });
  }
  for (const q of xbf.queues.splice(0)) {
    if (q.ih !== null) await intr.intrDisestablish(q.ih).catch(() => undefined);
    q.ih = null;
    await xbfCcbsDestroy(xbf, q);
    await dmat.dmamapUnload(q.ringMap).catch((err: Error) => xbf.log('%s ring: %s', q.name, err.message));
    dmat.dmamapDestroy(q.ringMap);
    dmat.dmamemUnmap(q.ringKva);
    dmat.dmamemFree(q.ringSegs);
  }
}

/** dmamem of `npages` pages, mapped, with a map of one page per segment; or null for none. */
function xbfBufCreate(xbf: XbfSoftc, npages: number): { segs: DmaSegment[]; kva: DmaKva; map: XenDmaMap; pages: Uint8Array[] } {
  const { dmat } = xbf.sc;
  const size = npages * PAGE_SIZE;
  const segs = dmat.dmamemAlloc(size, PAGE_SIZE, 0, npages, 0);
  const kva = dmat.dmamemMap(segs, size, 0);
  try {
    const map = dmat.dmamapCreate(size, npages, PAGE_SIZE, PAGE_SIZE, 0);
    const pages = pagesOf(segs).map((_, i) => kva.bytes(i * PAGE_SIZE, PAGE_SIZE));
    return { segs, kva, map, pages };
  } catch (err) {
    dmat.dmamemUnmap(kva);
    dmat.dmamemFree(segs);
    throw err;
  }
}

// xbf_alloc_ccbs (blkfront_setup_indirect): each ccb gets segsPerRequest data
// pages and, with indirect descriptors, the pages for them. With persistent
// grants everything is granted now, writable, for the whole connection.
function xbfCcbsCreate(xbf: XbfSoftc, q: XbfQueue, count: number): void {
  const { dmat } = xbf.sc;
  const segs = xbf.segsPerRequest;
  const nind = segs > BLKIF_MAX_SEGMENTS_PER_REQUEST ? Math.ceil(segs / XBF_SEGS_PER_INDIRECT_PAGE) : 0;
  const domid = busDmaDomid(xbf.dev.backendId);
  for (let id = 0; id < count; id++) {
    const data = xbfBufCreate(xbf, segs);
    const ind = nind > 0 ? xbfBufCreate(xbf, nind) : null;
    const ccb: XbfCcb = {
      id, dataSegs: data.segs, dataKva: data.kva, dataMap: data.map, pages: data.pages,
      indSegs: ind?.segs ?? null, indKva: ind?.kva ?? null, indMap: ind?.map ?? null, indPages: ind?.pages ?? [],
      bio: null, direct: null, rspOp: -1, sector: 0, offset: 0, len: 0, seq: 0,
    };
    q.ccbs.push(ccb);
    if (xbf.features.persistent) {
      dmat.dmamapLoadRaw(ccb.dataMap, ccb.dataSegs, segs * PAGE_SIZE, domid);
      if (ind !== null) dmat.dmamapLoadRaw(ind.map, ind.segs, nind * PAGE_SIZE, domid);
    }
  }
  for (let i = q.ccbs.length - 1; i >= 0; i--) q.free.push(q.ccbs[i]!);
}

// xbf_free_ccbs
async function xbfCcbsDestroy(xbf: XbfSoftc, q: XbfQueue): Promise<void> {
  const { dmat } = xbf.sc;
  for (const ccb of q.ccbs.splice(0)) {
    for (const map of [ccb.dataMap, ccb.indMap]) {
      if (map === null) continue;
      if (map.dm_nsegs !== 0) await dmat.dmamapUnload(map).catch((err: Error) => xbf.log('%s ccb %d: %s', q.name, ccb.id, err.message));
      dmat.dmamapDestroy(map);
    }
    dmat.dmamemUnmap(ccb.dataKva);
    dmat.dmamemFree(ccb.dataSegs);
    if (ccb.indKva !== null) dmat.dmamemUnmap(ccb.indKva);
    if (ccb.indSegs !== null) dmat.dmamemFree(ccb.indSegs);
  }
  q.free.length = 0;
}

// --- backend negotiation ---------------------------------------------------------

/** A node's value, or undefined when it is absent. */
function optional(read: Promise<string>): Promise<string | undefined> {
  return read.catch(() => undefined);
}

/** A backend node as a non-negative integer: `fallback` when absent, EPROTO for anything else. */
function count(xbf: XbfSoftc, key: string, text: string | undefined, fallback: number): number {
  if (text === undefined) return fallback;
  const n = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(n)) throw new XenError('EPROTO', `${xbf.name}: backend ${key} = ${JSON.stringify(text)}`);
  return n;
}

// talk_to_blkback + blkfront_connect: the backend's limits, our rings, the
// nodes, Initialised; await Connected; the disk, the ccbs, Connected.
async function xbfConnect(xbf: XbfSoftc): Promise<void> {
  const { xs } = xbf.sc;
  const be = xbf.dev.backend;
  const signal = xbf.abort.signal;
  // Only a backend waiting for us: one already Connected would never map the rings made now.
  const state = await xs.awaitState(`${be}/state`, (v) => v !== undefined && Number(v) >= XenbusStateInitWait, { timeoutMs: XBF_CONNECT_TIMEOUT_MS, signal });
  if (Number(state) !== XenbusStateInitWait) throw new XenError('ENXIO', `${xbf.name}: backend state ${state}`);
  const p = xbf.params;
  const trusted = p.trusted && (await optional(xs.read(`${xbf.dev.path}/trusted`))) !== '0';
  const maxOrder = count(xbf, 'max-ring-page-order', await optional(xs.read(`${be}/max-ring-page-order`)), 0);
  const maxQueues = count(xbf, 'multi-queue-max-queues', await optional(xs.read(`${be}/multi-queue-max-queues`)), 1);
  const order = Math.min(p.maxRingPageOrder, maxOrder, XBF_MAX_RING_PAGE_ORDER);
  const nq = Math.max(1, Math.min(p.maxQueues, maxQueues, XBF_MAX_QUEUES));
  Object.assign(xbf.features, { trusted, ringPageOrder: order, queues: nq, protocol: xbf.wire.protocol });
  for (let i = 0; i < nq; i++) xbfQueueCreate(xbf, i, order);
  await xbfPublish(xbf, order, p.persistent && trusted);
  const connected = await xs.awaitState(`${be}/state`, (v) => v !== undefined && Number(v) >= XenbusStateConnected, { timeoutMs: XBF_CONNECT_TIMEOUT_MS, signal });
  if (Number(connected) !== XenbusStateConnected) throw new XenError('ENXIO', `${xbf.name}: backend state ${connected}`);
  await xbfReadDisk(xbf, p.persistent && trusted);
  const perCcb = xbf.segsPerRequest + (xbf.features.indirectSegments > 0 ? Math.ceil(xbf.segsPerRequest / XBF_SEGS_PER_INDIRECT_PAGE) : 0);
  const budget = Math.min(XBF_MAX_BUFFER_PAGES, Math.floor(xbf.sc.physmem.freePages / 4));
  for (const q of xbf.queues) {
    const count = Math.max(1, Math.min(q.ring.size, XBF_MAX_CCBS_PER_QUEUE, Math.floor(budget / (nq * perCcb))));
    xbfCcbsCreate(xbf, q, count);
  }
  for (const q of xbf.queues) xbf.sc.intr.intrUnmask(q.ih!);
  await xs.write(`${xbf.dev.path}/state`, String(XenbusStateConnected));
}

// talk_to_blkback's transaction: this connection's nodes replace the last one's.
async function xbfPublish(xbf: XbfSoftc, order: number, persistent: boolean): Promise<void> {
  const fe = xbf.dev.path;
  const nq = xbf.queues.length;
  await xbf.sc.xs.transaction(async (t) => {
    for (const key of await t.list(fe).catch(() => [] as string[])) if (XBF_TRANSPORT_NODE.test(key)) await t.rm(`${fe}/${key}`);
    if (order > 0) await t.write(`${fe}/ring-page-order`, String(order));
    if (nq > 1) await t.write(`${fe}/multi-queue-num-queues`, String(nq));
    for (const q of xbf.queues) {
      // One queue keeps the classic keys at the top; several go under queue-N/.
      const dir = nq === 1 ? fe : `${fe}/queue-${q.index}`;
      const refs = q.ringMap.dm_segs;
      if (order === 0) await t.write(`${dir}/ring-ref`, String(refs[0]!.ds_addr));
      else for (let i = 0; i < 1 << order; i++) await t.write(`${dir}/ring-ref${i}`, String(refs[i]!.ds_addr));
      await t.write(`${dir}/event-channel`, String(q.ih!.port));
    }
    await t.write(`${fe}/protocol`, xbf.wire.protocol);
    await t.write(`${fe}/feature-persistent`, persistent ? '1' : '0');
    await t.write(`${fe}/state`, String(XenbusStateInitialised));
  }, { signal: xbf.abort.signal });
}

// blkfront_connect + blkfront_gather_backend_features: the disk and what the backend offers.
async function xbfReadDisk(xbf: XbfSoftc, persistent: boolean): Promise<void> {
  const { xs } = xbf.sc;
  const be = xbf.dev.backend;
  const num = async (key: string, read: Promise<string>, fallback: number): Promise<number> => count(xbf, key, await optional(read), fallback);
  const sectors512 = await num('sectors', xs.read(`${be}/sectors`), -1);
  const sectorSize = await num('sector-size', xs.read(`${be}/sector-size`), -1);
  if (sectors512 < 0 || sectorSize < XBF_SEC_SIZE || sectorSize > PAGE_SIZE || (sectorSize & (sectorSize - 1)) !== 0) {
    throw new XenError('EPROTO', `${xbf.name}: backend sectors ${sectors512}, sector-size ${sectorSize}`);
  }
  const physical = await num('physical-sector-size', xs.read(`${be}/physical-sector-size`), sectorSize);
  const info = await num('info', xs.read(`${be}/info`), 0);
  const mode = await optional(xs.read(`${be}/mode`));
  const indirect = Math.min(xbf.params.maxIndirectSegments, await num('feature-max-indirect-segments', xs.read(`${be}/feature-max-indirect-segments`), 0));
  Object.assign(xbf.features, {
    persistent: persistent && (await num('feature-persistent', xs.read(`${be}/feature-persistent`), 0)) === 1,
    indirectSegments: indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST ? Math.min(indirect, XBF_MAX_INDIRECT_SEGS) : 0,
    flushCache: (await num('feature-flush-cache', xs.read(`${be}/feature-flush-cache`), 0)) === 1,
    barrier: (await num('feature-barrier', xs.read(`${be}/feature-barrier`), 0)) === 1,
    discard: (await num('feature-discard', xs.read(`${be}/feature-discard`), 0)) === 1,
    discardGranularity: await num('discard-granularity', xs.read(`${be}/discard-granularity`), sectorSize),
    discardAlignment: await num('discard-alignment', xs.read(`${be}/discard-alignment`), 0),
    discardSecure: (await num('discard-secure', xs.read(`${be}/discard-secure`), 0)) === 1,
  });
  xbf.segsPerRequest = Math.max(BLKIF_MAX_SEGMENTS_PER_REQUEST, xbf.features.indirectSegments);
  xbf.sectorSize = sectorSize;
  xbf.physicalSectorSize = physical >= sectorSize && physical % sectorSize === 0 ? physical : sectorSize;
  // `sectors` is in 512-byte units whatever the sector size (Linux); the disk's own sectors are sectorSize.
  xbf.sectors = Math.floor(sectors512 / xbf.ratio);
  xbf.readOnly = (info & VDISK_READONLY) !== 0 || mode === 'r';
  xbf.cdrom = (info & VDISK_CDROM) !== 0;
  xbf.removable = (info & VDISK_REMOVABLE) !== 0;
}
