// dom0's block backend for one vbd, after Linux drivers/block/xen-blkback
// (xenbus.c for the xenstore half: probe, connect_ring, connect; blkback.c
// for the datapath: do_block_io_op, dispatch_rw_block_io, make_response).
//
// It advertises its transport limits (max-ring-page-order,
// multi-queue-max-queues, feature-persistent, feature-max-indirect-segments),
// waits for the frontend's rings, maps every queue's ring pages and binds its
// event channel, then publishes the disk. Each request is copied once off the
// ring and checked in full (operation, segment count, sector bounds within a
// page and within the disk, indirect page count, every grant mappable with
// the access the operation needs) before any data moves; a bad request is
// answered BLKIF_RSP_ERROR, logged, and the ring keeps being served.
//
// Data moves straight between the storage and the granted page: fs.readSync
// and fs.writeSync work on a view of the frontend's memory (pageBytes), with
// no bounce copy. With feature-persistent the grants stay mapped across
// requests in a bounded per-queue cache, unmapped at disconnect.

import { closeSync, fdatasyncSync, fstatSync, ftruncateSync, openSync, readSync, writeSync } from 'node:fs';
import {
  BLKIF_DISCARD_SECURE, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
  BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE,
  blkif_request_segment,
} from '../abi/blkif.js';
import { __CONST_RING_SIZE } from '../abi/ring.js';
import { offsetOf } from '../abi/layout.js';
import { XEN_IO_PROTO_ABI_X86_64 } from '../abi/protocols.js';
import {
  XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitWait, XenbusStateInitialised,
} from '../abi/xenbus.js';
import { XenError } from '../errors.js';
import type { Interrupts, IntrHandle } from '../evtchn/evtchn.js';
import type { Hypercall } from '../hypervisor/hypercall.js';
import { copyBytes, PAGE_SIZE, pageBytes, zeroBytes } from '../hypervisor/page.js';
import { BLKIF_WIRES, getU64, requestBytes, type BlkifWire } from '../xen/blkif.js';
import { BackRing } from '../xen/ring.js';
import type { XenStore } from '../xenstore/xenstore.js';
import { logger, type Log } from '../log.js';
import { bindInterdomain, mapGrant, mapGrantReadonly, unmapGrant } from './xenbus.js';

export const SECTOR_SIZE = 512;
const SECTORS_PER_PAGE = PAGE_SIZE / SECTOR_SIZE;
const SEG_BYTES = blkif_request_segment.size;
const SEGS_PER_INDIRECT_FRAME = PAGE_SIZE / SEG_BYTES;
/** XENBUS_MAX_RING_GRANT_ORDER: a ring of at most 16 pages. */
const XENBUS_MAX_RING_GRANT_ORDER = 4;
/** Linux blkback's MAX_INDIRECT_SEGMENTS. */
export const MAX_INDIRECT_SEGMENTS = 256;
/** xen_blkif_max_pgrants: grants one queue keeps mapped persistently. */
const MAX_PERSISTENT_PER_RING = 1056;
/** All of dom0's blkbacks together, so that persistent maps never use up dom0's maptrack. */
export const MAX_PERSISTENT_TOTAL = 4096;
const MAX_QUEUES = 16;
const CONNECT_TIMEOUT_MS = 5 * 60_000;
const ZERO_CHUNK_BYTES = 64 * 1024;
/**
 * Answers a pass pushes together, and the data they may have moved: a
 * frontend that keeps a deep queue gets its answers in eights, which it
 * completes and refills together, and dom0 writes rsp_prod and signals an
 * eighth as often (see serve).
 */
const PUSH_ANSWERS = 8;
const PUSH_BYTES = 64 * 1024;

const SEG_GREF = offsetOf(blkif_request_segment, 'gref');
const SEG_FIRST = offsetOf(blkif_request_segment, 'first_sect');
const SEG_LAST = offsetOf(blkif_request_segment, 'last_sect');

// --- storage -------------------------------------------------------------------

/** Where a vbd's data lives: `file` (params = path), `memory` or `null` (params = size in bytes). */
export type VbdStorageType = 'file' | 'memory' | 'null';

/** One vbd as the toolstack hands it to dom0. */
export type VbdSpec = {
  domid: number;
  devid: number;
  type: VbdStorageType;
  params: string;
  readOnly: boolean;
};

/** A vbd's counters, as Linux blkback's statistics/: requests by kind, 512-byte sectors moved, bad requests. */
export type VbdStats = { devid: number; counters: Record<string, number> };

/** What a blkback offers; the defaults are Linux blkback's. */
export type BlkbackOptions = {
  /** max-ring-page-order, 0..4. */
  maxRingPageOrder: number;
  /** multi-queue-max-queues, 1..16. */
  maxQueues: number;
  /** feature-max-indirect-segments; 0 leaves the node out (no BLKIF_OP_INDIRECT). */
  maxIndirectSegments: number;
  /** feature-persistent. */
  persistent: boolean;
};

export const defaultBlkbackOptions: Readonly<BlkbackOptions> = {
  maxRingPageOrder: XENBUS_MAX_RING_GRANT_ORDER,
  maxQueues: 4,
  maxIndirectSegments: MAX_INDIRECT_SEGMENTS,
  persistent: true,
};

/**
 * The disk behind a vbd, addressed in bytes; its size is whole sectors.
 * read/write move `len` bytes between `buf[at..]` and the disk at `pos`.
 */
interface Storage {
  readonly sectors: number;
  readonly physicalSectorSize: number;
  /** A volatile cache that FLUSH_DISKCACHE and barriers must write back. */
  readonly cache: boolean;
  /** Bytes per discard extent (discard-granularity); 0 when it cannot discard. */
  readonly discardGranularity: number;
  readonly discardSecure: boolean;
  read(buf: Uint8Array, at: number, len: number, pos: number): void;
  write(buf: Uint8Array, at: number, len: number, pos: number): void;
  flush(): void;
  discard(pos: number, len: number, secure: boolean): void;
  close(): void;
}

class FileStorage implements Storage {
  readonly sectors: number;
  readonly physicalSectorSize = 4096;
  readonly cache = true;
  readonly discardGranularity = 4096;
  // Zero-fill overwrites in place, but a file system may keep old blocks (journal, copy on write).
  readonly discardSecure = false;
  private readonly sizeBytes: number;
  private readonly zeros: Uint8Array;
  private fd: number;

  constructor(path: string, readOnly: boolean) {
    this.fd = openSync(path, readOnly ? 'r' : 'r+');
    this.sectors = Math.floor(fstatSync(this.fd).size / SECTOR_SIZE);
    this.sizeBytes = this.sectors * SECTOR_SIZE;
    this.zeros = readOnly ? new Uint8Array(0) : new Uint8Array(ZERO_CHUNK_BYTES);
  }
  read(buf: Uint8Array, at: number, len: number, pos: number): void {
    for (let done = 0; done < len; ) {
      const n = readSync(this.fd, buf, at + done, len - done, pos + done);
      if (n === 0) throw new XenError('EIO', `short read at ${pos + done}`);
      done += n;
    }
  }
  write(buf: Uint8Array, at: number, len: number, pos: number): void {
    for (let done = 0; done < len; ) done += writeSync(this.fd, buf, at + done, len - done, pos + done);
  }
  flush(): void {
    fdatasyncSync(this.fd);
  }
  // Node has no fallocate(PUNCH_HOLE): a range that reaches the end of the
  // image is cut off and the size restored, which leaves a hole; any other
  // range is overwritten with zeros. Either way it reads back as zeros.
  discard(pos: number, len: number): void {
    if (len > 0 && pos + len === this.sizeBytes) {
      ftruncateSync(this.fd, pos);
      ftruncateSync(this.fd, this.sizeBytes);
      return;
    }
    for (let done = 0; done < len; ) done += writeSync(this.fd, this.zeros, 0, Math.min(ZERO_CHUNK_BYTES, len - done), pos + done);
  }
  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}

class MemoryStorage implements Storage {
  readonly sectors: number;
  readonly physicalSectorSize = 4096;
  readonly cache = false;
  readonly discardGranularity = 4096;
  readonly discardSecure = true;
  private readonly bytes: Uint8Array;

  constructor(sizeBytes: number) {
    this.sectors = Math.floor(sizeBytes / SECTOR_SIZE);
    this.bytes = new Uint8Array(this.sectors * SECTOR_SIZE);
  }
  read(buf: Uint8Array, at: number, len: number, pos: number): void {
    copyBytes(buf, at, this.bytes, pos, pos + len);
  }
  write(buf: Uint8Array, at: number, len: number, pos: number): void {
    copyBytes(this.bytes, pos, buf, at, at + len);
  }
  flush(): void {}
  discard(pos: number, len: number): void {
    this.bytes.fill(0, pos, pos + len);
  }
  close(): void {}
}

/** Reads zeros, drops writes: a disk for benchmarks. */
class NullStorage implements Storage {
  readonly physicalSectorSize = 4096;
  readonly cache = false;
  readonly discardGranularity = SECTOR_SIZE;
  readonly discardSecure = true;
  constructor(readonly sectors: number) {}
  read(buf: Uint8Array, at: number, len: number): void {
    zeroBytes(buf, at, at + len);
  }
  write(): void {}
  flush(): void {}
  discard(): void {}
  close(): void {}
}

function openStorage(spec: VbdSpec): Storage {
  if (spec.type === 'file') return new FileStorage(spec.params, spec.readOnly);
  const size = Number(spec.params);
  if (!Number.isSafeInteger(size) || size < SECTOR_SIZE) throw new XenError('EINVAL', `vbd ${spec.devid}: bad size ${spec.params}`);
  return spec.type === 'memory' ? new MemoryStorage(size) : new NullStorage(Math.floor(size / SECTOR_SIZE));
}

// --- one queue -------------------------------------------------------------------

/** A grant kept mapped across requests (Linux struct persistent_gnt). */
type PersistentGrant = { handle: number; bytes: Uint8Array };

/** Persistent maps in use across all of dom0's blkbacks, against MAX_PERSISTENT_TOTAL. */
export type PersistentBudget = { used: number; max: number };

/**
 * One ring and its event channel (Linux struct xen_blkif_ring), with the
 * scratch space one request needs: allocated at connect, reused per request.
 */
export class BlkifRing {
  ring: BackRing | null = null;
  ih: IntrHandle | null = null;
  readonly ringHandles: number[] = [];
  readonly req: Uint8Array;
  readonly reqView: DataView;
  readonly rsp: Uint8Array;
  readonly rspView: DataView;
  readonly pgrants = new Map<number, PersistentGrant>();
  /** The current request's segments, as parsed (the private copy of XSA-155). */
  nrSegments = 0;
  readonly grefs: Uint32Array;
  readonly first: Uint8Array;
  readonly last: Uint8Array;
  /** Each segment's page, and the handle of a map made for this request only (-1: persistent). */
  readonly pages: (Uint8Array | null)[];
  readonly transient: Int32Array;
  /** The descriptors copied out of the indirect pages. */
  readonly indirect: Uint8Array;
  readonly indirectView: DataView;
  /** Answers put since the last push, and the bytes they moved. */
  unpushed = 0;
  unpushedBytes = 0;

  constructor(
    readonly index: number,
    readonly name: string,
    entryBytes: number,
    rspBytes: number,
    maxSegments: number,
  ) {
    this.req = new Uint8Array(entryBytes);
    this.reqView = new DataView(this.req.buffer);
    this.rsp = new Uint8Array(rspBytes);
    this.rspView = new DataView(this.rsp.buffer);
    this.grefs = new Uint32Array(maxSegments);
    this.first = new Uint8Array(maxSegments);
    this.last = new Uint8Array(maxSegments);
    this.pages = new Array<Uint8Array | null>(maxSegments).fill(null);
    this.transient = new Int32Array(maxSegments).fill(-1);
    this.indirect = new Uint8Array(Math.max(1, maxSegments) * SEG_BYTES);
    this.indirectView = new DataView(this.indirect.buffer);
  }
}

// --- the backend -------------------------------------------------------------------

export class Blkback {
  readonly backendPath: string;
  readonly frontendPath: string;
  private readonly log: Log;
  private storage: Storage | null = null;
  private rings: BlkifRing[] = [];
  private wire: BlkifWire = BLKIF_WIRES.get(XEN_IO_PROTO_ABI_X86_64)!;
  /** Negotiated at connect: the frontend asked for persistent grants and we offer them. */
  private persistent = false;
  private readonly abort = new AbortController();
  private cdrom = false;
  /** Requests answered with BLKIF_RSP_ERROR because they were malformed. */
  badRequests = 0;
  /** Requests served, by kind, and sectors moved (Linux's st_rd_req, st_wr_req, ...). */
  readonly stats = { rd_req: 0, wr_req: 0, f_req: 0, ds_req: 0, rd_sect: 0, wr_sect: 0 };

  constructor(
    private readonly hypercall: Hypercall,
    private readonly intr: Interrupts,
    private readonly xs: XenStore,
    readonly spec: VbdSpec,
    private readonly opts: Readonly<BlkbackOptions> = defaultBlkbackOptions,
    private readonly budget: PersistentBudget = { used: 0, max: MAX_PERSISTENT_TOTAL },
  ) {
    this.backendPath = `/local/domain/0/backend/vbd/${spec.domid}/${spec.devid}`;
    this.frontendPath = `/local/domain/${spec.domid}/device/vbd/${spec.devid}`;
    this.log = logger('blkback', `vbd${spec.domid}.${spec.devid}`);
  }

  /** Each queue's ring error: set when the frontend broke the ring, which then stays unserved until it reconnects. */
  get ringErrors(): (string | null)[] {
    return this.rings.map((r) => r.ring?.error?.message ?? null);
  }

  private get maxSegments(): number {
    return Math.max(BLKIF_MAX_SEGMENTS_PER_REQUEST, this.opts.maxIndirectSegments);
  }

  // xen_blkbk_probe + backend_changed: open the storage, publish the transport limits, InitWait.
  async start(): Promise<void> {
    const b = this.backendPath;
    this.cdrom = (await this.xs.read(`${b}/device-type`).catch(() => 'disk')) === 'cdrom';
    this.storage = openStorage(this.spec);
    await this.xs.write(`${b}/max-ring-page-order`, String(this.opts.maxRingPageOrder));
    await this.xs.write(`${b}/multi-queue-max-queues`, String(this.opts.maxQueues));
    await this.xs.write(`${b}/feature-persistent`, this.opts.persistent ? '1' : '0');
    if (this.opts.maxIndirectSegments > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
      await this.xs.write(`${b}/feature-max-indirect-segments`, String(this.opts.maxIndirectSegments));
    } else {
      await this.xs.rm(`${b}/feature-max-indirect-segments`).catch(() => undefined);
    }
    await this.xs.write(`${b}/state`, String(XenbusStateInitWait));
    this.log('InitWait, %d sectors%s', this.storage.sectors, this.spec.readOnly ? ', read-only' : '');
    void this.connect().catch((err: Error) => this.fatal(err));
  }

  /** xenbus_dev_fatal: say why in `error`, then Closing; the frontend gives up or retries. */
  private fatal(err: Error): void {
    if (this.abort.signal.aborted) return;
    this.log('connect failed: %s', err.message);
    void this.xs.write(`${this.backendPath}/error`, err.message).catch(() => undefined);
    void this.xs.write(`${this.backendPath}/state`, String(XenbusStateClosing)).catch(() => undefined);
  }

  /** Resolve once the frontend is Connected to us (bounded). */
  async connected(timeoutMs: number): Promise<void> {
    await this.xs.awaitState(`${this.backendPath}/state`, XenbusStateConnected, { timeoutMs, signal: this.abort.signal });
  }

  // frontend_changed -> connect_ring -> connect: the frontend's rings, then the disk, then Connected.
  private async connect(): Promise<void> {
    const signal = this.abort.signal;
    const f = this.frontendPath;
    await this.xs.awaitState(`${f}/state`, XenbusStateInitialised, { signal, timeoutMs: CONNECT_TIMEOUT_MS });
    const protocol = await this.xs.read(`${f}/protocol`, { signal }).catch(() => XEN_IO_PROTO_ABI_X86_64);
    const wire = BLKIF_WIRES.get(protocol);
    if (wire === undefined) throw new XenError('EOPNOTSUPP', `protocol ${protocol}`);
    const nrQueues = Number(await this.xs.read(`${f}/multi-queue-num-queues`, { signal }).catch(() => '1'));
    const order = Number(await this.xs.read(`${f}/ring-page-order`, { signal }).catch(() => '0'));
    if (!Number.isInteger(nrQueues) || nrQueues < 1 || nrQueues > this.opts.maxQueues) throw new XenError('EINVAL', `multi-queue-num-queues ${nrQueues}`);
    if (!Number.isInteger(order) || order < 0 || order > this.opts.maxRingPageOrder) throw new XenError('EINVAL', `ring-page-order ${order}`);
    const persistent = this.opts.persistent && (await this.xs.read(`${f}/feature-persistent`, { signal }).catch(() => '0')) === '1';
    const queues: { refs: number[]; port: number }[] = [];
    for (let q = 0; q < nrQueues; q++) {
      const dir = nrQueues === 1 ? f : `${f}/queue-${q}`;
      const refs: number[] = [];
      if (order === 0) refs.push(await this.xs.getNumber(`${dir}/ring-ref`, { signal }));
      else for (let i = 0; i < 1 << order; i++) refs.push(await this.xs.getNumber(`${dir}/ring-ref${i}`, { signal }));
      queues.push({ refs, port: await this.xs.getNumber(`${dir}/event-channel`, { signal }) });
    }
    if (signal.aborted) return;
    this.wire = wire;
    this.persistent = persistent;
    this.mapRings(queues, order);
    await this.publish();
    if (signal.aborted) return;
    await this.xs.write(`${this.backendPath}/state`, String(XenbusStateConnected));
    this.log('Connected: %d queue(s), ring order %d, %s, persistent %s', nrQueues, order, protocol, persistent);
  }

  // xen_blkif_map for each queue: map the ring pages, bind the port, unmask. Undone whole on error.
  private mapRings(queues: readonly { refs: number[]; port: number }[], order: number): void {
    const size = __CONST_RING_SIZE(this.wire.sring, PAGE_SIZE << order);
    try {
      for (const [index, q] of queues.entries()) {
        const name = `blkback${this.spec.domid}.${this.spec.devid}.${index}`;
        const r = new BlkifRing(index, name, this.wire.entryBytes, this.wire.rspBytes, this.maxSegments);
        this.rings.push(r);
        const pages = q.refs.map((ref) => {
          const map = mapGrant(this.hypercall, this.spec.domid, ref);
          r.ringHandles.push(map.handle);
          return map.page;
        });
        r.ring = new BackRing(pages, this.wire.entryBytes, size, name, this.wire.ringType);
        r.ring.init();
        r.ih = bindInterdomain(this.hypercall, this.intr, this.spec.domid, q.port, () => this.serve(r), name);
      }
    } catch (err) {
      this.unmapRings();
      throw err;
    }
    for (const r of this.rings) this.intr.intrUnmask(r.ih!);
  }

  // connect(): the disk as the frontend sees it, and what it may ask of it.
  private async publish(): Promise<void> {
    const s = this.storage!;
    const ro = this.spec.readOnly;
    const info = (ro ? VDISK_READONLY : 0) | (this.cdrom ? VDISK_CDROM | VDISK_REMOVABLE : 0);
    const discard = s.discardGranularity > 0 && !ro;
    await this.xs.transaction(async (t) => {
      const b = this.backendPath;
      await t.write(`${b}/sectors`, String(s.sectors));
      await t.write(`${b}/sector-size`, String(SECTOR_SIZE));
      await t.write(`${b}/physical-sector-size`, String(s.physicalSectorSize));
      await t.write(`${b}/info`, String(info));
      await t.write(`${b}/feature-flush-cache`, s.cache ? '1' : '0');
      await t.write(`${b}/feature-barrier`, s.cache ? '1' : '0');
      await t.write(`${b}/feature-discard`, discard ? '1' : '0');
      await t.write(`${b}/discard-granularity`, String(s.discardGranularity));
      await t.write(`${b}/discard-alignment`, '0');
      await t.write(`${b}/discard-secure`, s.discardSecure ? '1' : '0');
    });
  }

  // --- datapath ----------------------------------------------------------------

  // do_block_io_op: copy each request once, dispatch, answer. The copy takes
  // what the operation uses: its head first (a read or write of one page is
  // all there, 32 of the slot's 112 bytes), then the segments or the struct
  // the head says it has. The frontend's CPU wrote the slot last, so each
  // cache line of it not copied is one less to take from there.
  //
  // Answers are pushed (make_response's RING_PUSH_RESPONSES_AND_CHECK_NOTIFY)
  // PUSH_ANSWERS at a time, or once they moved PUSH_BYTES, before a flush or
  // a discard (which can take long), and whenever the pass runs out of
  // requests: a lone request is answered at once, and a deep queue in
  // batches. Linux's make_response pushes each answer; here that kept a
  // polling frontend completing and refilling one request at a time, and
  // dom0 writing rsp_prod and signalling for each: `profile.js block file`,
  // dom0 1.55-1.74 us a request against 1.32-1.51 in eights. The frontend is
  // signalled only when it asked (rsp_event). False when the event brought
  // nothing to do (the interrupt layer throttles a frontend that keeps
  // signalling for nothing, or on a ring it broke).
  private serve(r: BlkifRing): boolean {
    const ring = r.ring;
    if (ring === null || r.ih === null) return false;
    let took = false;
    do {
      ring.unconsumedRequests();
      while (ring.takeRequest(r.req, this.wire.reqHeadBytes)) {
        const bytes = requestBytes(this.wire, r.req);
        if (bytes > this.wire.reqHeadBytes) ring.takeRequestRest(r.req, this.wire.reqHeadBytes, bytes);
        took = true;
        this.answer(r, this.dispatch(r));
        if (++r.unpushed >= PUSH_ANSWERS || r.unpushedBytes >= PUSH_BYTES) this.push(r);
      }
      this.push(r);
    } while (ring.finalCheckForRequests());
    if (ring.error !== undefined) this.log('queue %d: ring broken: %s', r.index, ring.error.message);
    return took;
  }

  /** The answers put since the last push, pushed; the frontend signalled if it asked. */
  private push(r: BlkifRing): void {
    if (r.unpushed === 0) return;
    r.unpushed = r.unpushedBytes = 0;
    if (r.ring!.pushResponses()) this.intr.intrSignal(r.ih!);
  }

  /** make_response: id and operation echoed (an indirect request's indirect_op), and `status`. */
  private answer(r: BlkifRing, status: number): void {
    const w = this.wire;
    const op = r.req[0]!;
    const idAt = op === BLKIF_OP_INDIRECT ? w.indId : op === BLKIF_OP_DISCARD ? w.discardId : w.reqId;
    r.rspView.setUint32(w.rspId, r.reqView.getUint32(idAt, true), true);
    r.rspView.setUint32(w.rspId + 4, r.reqView.getUint32(idAt + 4, true), true);
    r.rsp[w.rspOperation] = op === BLKIF_OP_INDIRECT ? r.req[w.indOp]! : op;
    r.rspView.setInt16(w.rspStatus, status, true);
    r.ring!.putResponse(r.rsp);
  }

  // dispatch_rw_block_io / dispatch_discard_io / dispatch_other_io.
  private dispatch(r: BlkifRing): number {
    const w = this.wire;
    const op = r.req[0]!;
    try {
      switch (op) {
        case BLKIF_OP_READ:
        case BLKIF_OP_WRITE:
        case BLKIF_OP_WRITE_BARRIER:
        case BLKIF_OP_FLUSH_DISKCACHE:
          return this.rw(r, op, r.req[1]!, getU64(r.reqView, w.reqSector), false);
        case BLKIF_OP_INDIRECT:
          return this.rw(r, r.req[w.indOp]!, r.reqView.getUint16(w.indNrSegments, true), getU64(r.reqView, w.indSector), true);
        case BLKIF_OP_DISCARD:
          return this.discard(r);
        default:
          return this.bad(r, `operation ${op}`);
      }
    } catch (err) {
      this.log('queue %d: request failed: %s', r.index, (err as Error).message);
      return BLKIF_RSP_ERROR;
    }
  }

  private bad(r: BlkifRing, why: string): number {
    this.badRequests++;
    this.log('queue %d: bad request: %s', r.index, why);
    return BLKIF_RSP_ERROR;
  }

  /** A READ, WRITE, barrier or flush: parse, check, map every grant, move the data, unmap. */
  private rw(r: BlkifRing, op: number, nrSegments: number, sector: number, indirect: boolean): number {
    const write = op !== BLKIF_OP_READ;
    const flush = op === BLKIF_OP_WRITE_BARRIER || op === BLKIF_OP_FLUSH_DISKCACHE;
    if (indirect && op !== BLKIF_OP_READ && op !== BLKIF_OP_WRITE) return this.bad(r, `indirect_op ${op}`);
    if (flush && !this.storage!.cache) return BLKIF_RSP_EOPNOTSUPP;
    if (write && this.spec.readOnly && (op !== BLKIF_OP_FLUSH_DISKCACHE || nrSegments !== 0)) return this.bad(r, 'write to a read-only disk');
    const why = indirect ? this.parseIndirect(r, nrSegments) : this.parseDirect(r, nrSegments, flush);
    if (why !== null) return this.bad(r, why);
    const sectors = this.checkSegments(r, sector);
    if (typeof sectors === 'string') return this.bad(r, sectors);
    const unmapped = this.mapSegments(r, write);
    if (unmapped !== null) return this.bad(r, unmapped);
    try {
      if (flush) {
        this.push(r);
        this.storage!.flush();
      }
      this.move(r, write, sector);
      if (flush && r.nrSegments !== 0) this.storage!.flush();
    } finally {
      this.unmapTransient(r);
    }
    if (flush) this.stats.f_req++;
    r.unpushedBytes += sectors * SECTOR_SIZE;
    if (r.nrSegments !== 0 && write) {
      this.stats.wr_req++;
      this.stats.wr_sect += sectors;
    } else if (!write) {
      this.stats.rd_req++;
      this.stats.rd_sect += sectors;
    }
    return BLKIF_RSP_OKAY;
  }

  private parseDirect(r: BlkifRing, n: number, flush: boolean): string | null {
    if (n > BLKIF_MAX_SEGMENTS_PER_REQUEST || (n === 0 && !flush)) return `nr_segments ${n}`;
    const at = this.wire.reqSeg;
    for (let i = 0; i < n; i++) {
      const s = at + i * SEG_BYTES;
      r.grefs[i] = r.reqView.getUint32(s + SEG_GREF, true);
      r.first[i] = r.req[s + SEG_FIRST]!;
      r.last[i] = r.req[s + SEG_LAST]!;
    }
    r.nrSegments = n;
    return null;
  }

  // xen_blkbk_parse_indirect: copy the descriptors out of the indirect pages once, then parse the copy.
  private parseIndirect(r: BlkifRing, n: number): string | null {
    if (this.opts.maxIndirectSegments <= BLKIF_MAX_SEGMENTS_PER_REQUEST) return 'BLKIF_OP_INDIRECT without feature-max-indirect-segments';
    if (n === 0 || n > this.opts.maxIndirectSegments) return `indirect nr_segments ${n}`;
    const nrPages = Math.ceil(n / SEGS_PER_INDIRECT_FRAME);
    if (nrPages > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST) return `${nrPages} indirect pages`;
    for (let p = 0; p < nrPages; p++) {
      const gref = r.reqView.getUint32(this.wire.indGrefs + p * 4, true);
      const count = Math.min(SEGS_PER_INDIRECT_FRAME, n - p * SEGS_PER_INDIRECT_FRAME);
      const why = this.copyIndirect(r, gref, p * PAGE_SIZE, count * SEG_BYTES);
      if (why !== null) return `indirect page ${p}: ${why}`;
    }
    const v = r.indirectView;
    for (let i = 0; i < n; i++) {
      const s = i * SEG_BYTES;
      r.grefs[i] = v.getUint32(s + SEG_GREF, true);
      r.first[i] = r.indirect[s + SEG_FIRST]!;
      r.last[i] = r.indirect[s + SEG_LAST]!;
    }
    r.nrSegments = n;
    return null;
  }

  private copyIndirect(r: BlkifRing, gref: number, at: number, len: number): string | null {
    const pg = this.persistent ? r.pgrants.get(gref) : undefined;
    if (pg !== undefined) {
      copyBytes(r.indirect, at, pg.bytes, 0, len);
      return null;
    }
    let map;
    try {
      map = mapGrantReadonly(this.hypercall, this.spec.domid, gref);
    } catch {
      return `gref ${gref} not mappable`;
    }
    try {
      copyBytes(r.indirect, at, pageBytes(map.page), 0, len);
    } finally {
      unmapGrant(this.hypercall, map.handle);
    }
    return null;
  }

  /** Every segment within its page and the whole request within the disk: its sector count, or why not. */
  private checkSegments(r: BlkifRing, sector: number): number | string {
    // A flush without data has no sectors; its sector_number means nothing.
    if (r.nrSegments === 0) return 0;
    let sectors = 0;
    for (let i = 0; i < r.nrSegments; i++) {
      const first = r.first[i]!;
      const last = r.last[i]!;
      if (first > last || last >= SECTORS_PER_PAGE) return `segment ${i}: sectors ${first}..${last}`;
      sectors += last - first + 1;
    }
    const disk = this.storage!.sectors;
    if (!Number.isSafeInteger(sector) || sector > disk || sectors > disk - sector) return `sectors ${sector}+${sectors} beyond ${disk}`;
    return sectors;
  }

  /**
   * xen_blkbk_map: each segment's page, from the persistent cache or mapped
   * now (persistently while the cache has room, else for this request only).
   * A grant that cannot be mapped with the access the operation needs fails
   * the whole request before any data moves; null when all are mapped.
   */
  protected mapSegments(r: BlkifRing, write: boolean): string | null {
    for (let i = 0; i < r.nrSegments; i++) {
      const gref = r.grefs[i]!;
      const pg = this.persistent ? (r.pgrants.get(gref) ?? this.mapPersistent(r, gref)) : undefined;
      if (pg !== undefined) {
        r.pages[i] = pg.bytes;
        continue;
      }
      try {
        const map = write ? mapGrantReadonly(this.hypercall, this.spec.domid, gref) : mapGrant(this.hypercall, this.spec.domid, gref);
        r.transient[i] = map.handle;
        r.pages[i] = pageBytes(map.page);
      } catch {
        r.nrSegments = i;
        this.unmapTransient(r);
        return `segment ${i}: gref ${gref} not mappable${write ? '' : ' writable'}`;
      }
    }
    return null;
  }

  /** A new persistent grant, mapped writable as feature-persistent allows; undefined when the cache is full or the map fails. */
  private mapPersistent(r: BlkifRing, gref: number): PersistentGrant | undefined {
    if (r.pgrants.size >= MAX_PERSISTENT_PER_RING || this.budget.used >= this.budget.max) return undefined;
    let map;
    try {
      map = mapGrant(this.hypercall, this.spec.domid, gref);
    } catch {
      return undefined;
    }
    const pg: PersistentGrant = { handle: map.handle, bytes: pageBytes(map.page) };
    r.pgrants.set(gref, pg);
    this.budget.used++;
    return pg;
  }

  /** The data between the pages and the storage, segment by segment, in disk order. */
  private move(r: BlkifRing, write: boolean, sector: number): void {
    const s = this.storage!;
    let pos = sector * SECTOR_SIZE;
    for (let i = 0; i < r.nrSegments; i++) {
      const at = r.first[i]! * SECTOR_SIZE;
      const len = (r.last[i]! - r.first[i]! + 1) * SECTOR_SIZE;
      if (write) s.write(r.pages[i]!, at, len, pos);
      else s.read(r.pages[i]!, at, len, pos);
      pos += len;
    }
  }

  private unmapTransient(r: BlkifRing): void {
    for (let i = 0; i < r.nrSegments; i++) {
      r.pages[i] = null;
      const h = r.transient[i]!;
      if (h < 0) continue;
      r.transient[i] = -1;
      unmapGrant(this.hypercall, h);
    }
  }

  // dispatch_discard_io
  private discard(r: BlkifRing): number {
    const w = this.wire;
    const s = this.storage!;
    const secure = (r.req[w.discardFlag]! & BLKIF_DISCARD_SECURE) !== 0;
    const sector = getU64(r.reqView, w.discardSector);
    const count = getU64(r.reqView, w.discardNrSectors);
    if (this.spec.readOnly) return this.bad(r, 'discard on a read-only disk');
    if (s.discardGranularity === 0 || (secure && !s.discardSecure)) return BLKIF_RSP_EOPNOTSUPP;
    if (!Number.isSafeInteger(sector) || !Number.isSafeInteger(count) || sector > s.sectors || count > s.sectors - sector) {
      return this.bad(r, `discard ${sector}+${count} beyond ${s.sectors}`);
    }
    this.push(r);
    s.discard(sector * SECTOR_SIZE, count * SECTOR_SIZE, secure);
    this.stats.ds_req++;
    return BLKIF_RSP_OKAY;
  }

  // --- disconnect ----------------------------------------------------------------

  /** xen_blkif_disconnect: no more serving, every persistent grant and ring page unmapped. */
  private unmapRings(): void {
    for (const r of this.rings) {
      for (const pg of r.pgrants.values()) {
        unmapGrant(this.hypercall, pg.handle);
        this.budget.used--;
      }
      r.pgrants.clear();
      for (const h of r.ringHandles.splice(0)) unmapGrant(this.hypercall, h);
      r.ring = null;
    }
    this.rings = [];
  }

  // xen_blkbk_remove: stop serving and let go of the frontend's pages before
  // saying Closing, so a frontend that sees Closing can revoke its grants at once.
  async stop(): Promise<void> {
    this.abort.abort();
    for (const r of this.rings) {
      if (r.ih !== null) await this.intr.intrDisestablish(r.ih).catch(() => undefined);
      r.ih = null;
    }
    this.unmapRings();
    await this.xs.write(`${this.backendPath}/state`, String(XenbusStateClosing)).catch(() => undefined);
    this.storage?.close();
    this.storage = null;
    await this.xs.write(`${this.backendPath}/state`, String(XenbusStateClosed)).catch(() => undefined);
    this.log('Closed');
  }
}

/** How a BlkbackSet builds each backend: a harness may hand in a deliberately weakened one. */
export type BlkbackFactory = (...args: ConstructorParameters<typeof Blkback>) => Blkback;

/** dom0's blkbacks, per domain, sharing one budget of persistent maps. */
export class BlkbackSet {
  private readonly byDomid = new Map<number, Blkback[]>();
  private readonly budget: PersistentBudget = { used: 0, max: MAX_PERSISTENT_TOTAL };

  constructor(
    private readonly hypercall: Hypercall,
    private readonly intr: Interrupts,
    private readonly xs: XenStore,
    private readonly opts: Readonly<BlkbackOptions> = defaultBlkbackOptions,
    private readonly make: BlkbackFactory = (...args) => new Blkback(...args),
  ) {}

  /** The running backend of one vbd. */
  get(domid: number, devid: number): Blkback | undefined {
    return this.byDomid.get(domid)?.find((b) => b.spec.devid === devid);
  }

  async start(spec: VbdSpec): Promise<void> {
    const b = this.make(this.hypercall, this.intr, this.xs, spec, this.opts, this.budget);
    const list = this.byDomid.get(spec.domid) ?? [];
    list.push(b);
    this.byDomid.set(spec.domid, list);
    await b.start();
  }

  async stop(domid: number): Promise<void> {
    const list = this.byDomid.get(domid) ?? [];
    this.byDomid.delete(domid);
    for (const b of list) await b.stop();
  }

  /** Stop the blkback of one vbd (its detach). */
  async stopOne(domid: number, devid: number): Promise<void> {
    const list = this.byDomid.get(domid) ?? [];
    const b = list.find((x) => x.spec.devid === devid);
    if (b === undefined) return;
    this.byDomid.set(domid, list.filter((x) => x !== b));
    await b.stop();
  }

  stats(domid: number): VbdStats[] {
    return (this.byDomid.get(domid) ?? []).map((b) => ({ devid: b.spec.devid, counters: { ...b.stats, bad_req: b.badRequests } }));
  }

  /**
   * Stop one vbd's backend and start a new one on the same storage while the
   * guest runs, as a backend crash and restart would; resolves once the
   * frontend has reconnected (ETIMEDOUT after `timeoutMs`).
   */
  async restart(domid: number, devid: number, timeoutMs = 30_000): Promise<void> {
    const list = this.byDomid.get(domid) ?? [];
    const i = list.findIndex((b) => b.spec.devid === devid);
    if (i < 0) throw new XenError('ENODEV', `no vbd ${devid} of domain ${domid}`);
    const old = list[i]!;
    await old.stop();
    // A new backend must not map the ring the frontend used with the old one:
    // wait (bounded) until the frontend has let go of it.
    const released = (v: string | undefined): boolean => v === undefined || (Number(v) !== XenbusStateInitialised && Number(v) !== XenbusStateConnected);
    await this.xs.awaitState(`${old.frontendPath}/state`, released, { timeoutMs }).catch(() => undefined);
    const b = this.make(this.hypercall, this.intr, this.xs, old.spec, this.opts, this.budget);
    list[i] = b;
    await b.start();
    await b.connected(timeoutMs);
    await this.xs.awaitState(`${old.frontendPath}/state`, XenbusStateConnected, { timeoutMs });
  }
}

