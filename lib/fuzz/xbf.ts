// `xenpv fuzz backend --device xbf`: a block backend in dom0 that answers a
// real xbf with honest, late, reordered, failing and malicious responses,
// and the checks that xbf holds. The whole host runs in this thread
// (lib/fuzz/world.ts), driven by one seeded generator, so a seed replays.
//
// Cast: the victim guest has two disks: xvda, served by dom0's real blkback
// (its other device, which must keep working), and xvdb, served by
// HostileBlkBackend below. Each episode plugs xvdb with new offers (ring
// pages, queues, persistent grants, indirect segments, 512- or 4096-byte
// sectors, flush, barrier, discard), lets the guest read, write, flush and
// discard through xbf, and has the backend answer: mostly honestly (in order
// or not, now or later, with I/O errors or EOPNOTSUPP), sometimes with
// unknown, duplicate or never-issued ids, wrong operations, junk statuses,
// rsp_prod ahead of the requests or behind, event storms, grants kept
// mapped, or a restart. An episode ends when the disk breaks or is unplugged.
//
// Checks: xbf never throws from its interrupt or leaves a transfer hanging;
// every malicious answer breaks the disk with EIO and a reason, and fails
// what is in flight; every request xbf puts on the ring is well formed and
// carries the guest's own data; no read is acknowledged with data other
// than what was acknowledged written; xvda keeps answering within a bound;
// and a page the backend still maps is never freed, granted again or reused
// (XSA-396): its grant entry stays, its page stays allocated, and the
// marker the backend writes there never shows up in the guest's data.

import { createHash } from 'node:crypto';
import {
  BLKIF_DISCARD_SECURE, BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
  BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
} from '../abi/blkif.js';
import {
  GNTMAP_host_map, GNTMAP_readonly, GNTST_okay, GNTTABOP_map_grant_ref, GNTTABOP_unmap_grant_ref, GTF_permit_access, GTF_type_mask,
} from '../abi/grant_table.js';
import { XEN_IO_PROTO_ABI_X86_32, XEN_IO_PROTO_ABI_X86_64 } from '../abi/protocols.js';
import { __HYPERVISOR_grant_table_op } from '../abi/xen.js';
import {
  XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitialised, XenbusStateInitialising, XenbusStateInitWait,
} from '../abi/xenbus.js';
import { bindInterdomain, mapGrant, unmapGrant } from '../backends/xenbus.js';
import { xbfDisks, type XbfSoftc } from '../drivers/xbf/xbf.js';
import type { XenError } from '../errors.js';
import type { IntrHandle } from '../evtchn/evtchn.js';
import { D, type Domain } from '../hypervisor/domain.js';
import type { gnttab_map_grant_ref } from '../hypervisor/hypercall.js';
import { PAGE_SIZE, pageBytes, type Page } from '../hypervisor/page.js';
import { BackRing } from '../xen/ring.js';
import { probeDevices, type XenSoftc } from '../xen/xen.js';
import { BLK_WIRES, getU64, putU64, type BlkWire } from './blkwire.js';
import { Harness, MAX_VIOLATIONS, count, type FuzzReport } from './report.js';
import { World } from './world.js';

const XVDA = 51712;
const XVDB = 51728;
const SECTOR = 512;
const SECTORS_PER_PAGE = PAGE_SIZE / SECTOR;
const DISK_SECTORS = 2048;
const SEG_BYTES = 8;
const ENTRIES_PER_FRAME = PAGE_SIZE / 8;
const REQ_PROD = 0;
const REQ_EVENT = 4;
const RSP_PROD = 8;
const PROBE_EVERY = 64;
const XSA396_CHECK_EVERY = 16;
/**
 * Grant mappings the backend keeps for good, at most: each costs the guest a
 * page for the rest of its life (quarantine), so the attack stops once they
 * are spent, and every later step checks those pages are never reused.
 */
const MAX_KEPT = 64;
/** Persistent mappings a backend keeps when it goes away holding them. */
const KEEP_PERSISTENT = 4;
/** A transfer older than this many steps while nothing holds it is hung. */
const HANG_STEPS = 200;
/** What the backend writes into pages it kept mapped: it must never reach the guest's data. */
const MARKER = 0xdb;

// --- the hostile backend ------------------------------------------------------------------

/** What the backend offers in one episode (its xenstore nodes). */
export type BlkOffer = {
  maxRingPageOrder: number;
  maxQueues: number;
  persistent: boolean;
  maxIndirectSegments: number;
  sectorSize: number;
  flushCache: boolean;
  barrier: boolean;
  discard: boolean;
  discardSecure: boolean;
};

/** A grant mapping the backend holds: the granted frame, for the XSA-396 checks. */
export type BlkMapping = { ref: number; handle: number; frame: number; writable: boolean; bytes: Uint8Array };

type Seg = { gref: number; first: number; last: number };

/** A request as the backend took it: copied off the ring once and parsed. */
export type TakenRequest = {
  queue: number;
  lo: number;
  hi: number;
  /** The operation the response must carry (an indirect request's indirect_op). */
  op: number;
  indirect: boolean;
  sector: number;
  segs: Seg[];
  nrSectors: number;
  flag: number;
};

type BackQueue = {
  index: number;
  /** The ring's pages as mapped. */
  pages: Page[];
  ring: BackRing;
  head: Page;
  size: number;
  ringHandles: number[];
  ih: IntrHandle;
  reqCons: number;
  rspProd: number;
  /** rsp_prod as last published. */
  rspPushed: number;
};

/**
 * A block backend in dom0 that does what its harness tells it, byte by byte:
 * the xenbus handshake, the rings, the grants, the responses. `problem` is
 * called for anything the frontend does against blkif.h.
 */
export class HostileBlkBackend {
  readonly fe: string;
  readonly be: string;
  queues: BackQueue[] = [];
  wire: BlkWire = BLK_WIRES.get(XEN_IO_PROTO_ABI_X86_64)!;
  persistent = false;
  offer: BlkOffer | null = null;
  /** Persistent mappings by ref, for the connection. */
  readonly pmaps = new Map<number, BlkMapping>();
  /** Mappings kept on purpose, never unmapped. */
  readonly kept: BlkMapping[] = [];
  /** Events from the frontend. */
  kicks = 0;
  /** Each indirect page as mapped, and how many of its bytes hold the request's descriptors. */
  onIndirectPage: ((page: Uint8Array, usedBytes: number) => void) | null = null;
  private readonly scratch = new Uint8Array(112);
  private readonly desc = new Uint8Array(PAGE_SIZE);

  constructor(
    private readonly world: World,
    readonly domid: number,
    readonly devid: number,
    private readonly problem: (what: string) => void,
  ) {
    this.fe = `/local/domain/${domid}/device/vbd/${devid}`;
    this.be = `/local/domain/0/backend/vbd/${domid}/${devid}`;
  }

  private get xs() {
    return this.world.dom0.xs;
  }

  private get hypercall() {
    return this.world.dom0.hypercall;
  }

  /**
   * libxl__device_disk_add's nodes: the frontend Initialising, the backend
   * online; connect() follows. `trusted` false: the disk spec's `untrusted`.
   */
  async create(trusted = true): Promise<void> {
    const fe: [string, string][] = [
      ['backend', this.be], ['backend-id', '0'], ['state', String(XenbusStateInitialising)], ['virtual-device', String(this.devid)],
      ['device-type', 'disk'], ['trusted', trusted ? '1' : '0'],
    ];
    const be: [string, string][] = [
      ['frontend', this.fe], ['frontend-id', String(this.domid)], ['state', String(XenbusStateInitialising)], ['online', '1'],
      ['mode', 'w'], ['type', 'hostile'],
    ];
    await this.xs.transaction(async (t) => {
      for (const [dir, nodes, owner, reader] of [[this.fe, fe, this.domid, 0], [this.be, be, 0, this.domid]] as const) {
        await t.mkdir(dir);
        await t.setPerms(dir, [{ domid: owner, perm: 'n' }, { domid: reader, perm: 'r' }]);
        for (const [k, v] of nodes) {
          await t.write(`${dir}/${k}`, v);
          await t.setPerms(`${dir}/${k}`, [{ domid: owner, perm: 'n' }, { domid: reader, perm: 'r' }]);
        }
      }
    });
  }

  /** InitWait with the limits, the frontend's rings, the disk, Connected. */
  async connect(offer: BlkOffer): Promise<void> {
    this.offer = offer;
    const xs = this.xs;
    const b = this.be;
    await xs.write(`${b}/max-ring-page-order`, String(offer.maxRingPageOrder));
    await xs.write(`${b}/multi-queue-max-queues`, String(offer.maxQueues));
    await xs.write(`${b}/feature-persistent`, offer.persistent ? '1' : '0');
    await xs.write(`${b}/feature-max-indirect-segments`, String(offer.maxIndirectSegments));
    await xs.write(`${b}/state`, String(XenbusStateInitWait));
    await xs.awaitState(`${this.fe}/state`, XenbusStateInitialised, { timeoutMs: 30_000 });
    await this.mapRings();
    await xs.transaction(async (t) => {
      await t.write(`${b}/sectors`, String(DISK_SECTORS));
      await t.write(`${b}/sector-size`, String(offer.sectorSize));
      await t.write(`${b}/physical-sector-size`, String(Math.max(offer.sectorSize, 4096)));
      await t.write(`${b}/info`, '0');
      await t.write(`${b}/feature-flush-cache`, offer.flushCache ? '1' : '0');
      await t.write(`${b}/feature-barrier`, offer.barrier ? '1' : '0');
      await t.write(`${b}/feature-discard`, offer.discard ? '1' : '0');
      await t.write(`${b}/discard-granularity`, String(offer.sectorSize));
      await t.write(`${b}/discard-secure`, offer.discardSecure ? '1' : '0');
      await t.write(`${b}/state`, String(XenbusStateConnected));
    });
  }

  /** connect_ring: what the frontend chose, checked against what we offered; map and bind each queue. */
  private async mapRings(): Promise<void> {
    const xs = this.xs;
    const f = this.fe;
    const offer = this.offer!;
    const read = (k: string): Promise<string | undefined> => xs.read(`${f}/${k}`).catch(() => undefined);
    const protocol = (await read('protocol')) ?? XEN_IO_PROTO_ABI_X86_64;
    const wire = BLK_WIRES.get(protocol);
    if (wire === undefined) this.problem(`protocol ${protocol}`);
    this.wire = wire ?? BLK_WIRES.get(XEN_IO_PROTO_ABI_X86_64)!;
    const order = Number((await read('ring-page-order')) ?? '0');
    const nq = Number((await read('multi-queue-num-queues')) ?? '1');
    this.persistent = offer.persistent && (await read('feature-persistent')) === '1';
    if (!(order >= 0 && order <= offer.maxRingPageOrder)) this.problem(`ring-page-order ${order}, offered ${offer.maxRingPageOrder}`);
    if (!(nq >= 1 && nq <= offer.maxQueues)) this.problem(`multi-queue-num-queues ${nq}, offered ${offer.maxQueues}`);
    for (let i = 0; i < nq; i++) {
      const dir = nq === 1 ? '' : `queue-${i}/`;
      const refs: number[] = [];
      for (let p = 0; p < 1 << order; p++) refs.push(Number(await read(`${dir}ring-ref${order === 0 ? '' : p}`)));
      const port = Number(await read(`${dir}event-channel`));
      const maps = refs.map((ref) => mapGrant(this.hypercall, this.domid, ref));
      const size = this.wire.ringSize(order);
      const ring = new BackRing(maps.map((m) => m.page), this.wire.entryBytes, size, `hostile.${i}`);
      const ih = bindInterdomain(this.hypercall, this.world.dom0.intr, this.domid, port, () => void this.kicks++, `hostile.${i}`);
      this.world.dom0.intr.intrUnmask(ih);
      this.queues.push({ index: i, pages: maps.map((m) => m.page), ring, head: maps[0]!.page, size, ringHandles: maps.map((m) => m.handle), ih, reqCons: 0, rspProd: 0, rspPushed: 0 });
    }
  }

  /** Unmap and unbind everything, except what is kept (and a few persistent maps too, when `keepPersistent`). */
  async release(keepPersistent: boolean): Promise<void> {
    let keep = keepPersistent ? KEEP_PERSISTENT : 0;
    for (const m of this.pmaps.values()) {
      if (keep-- > 0 && this.kept.length < MAX_KEPT) this.kept.push(m);
      else this.unmap(m);
    }
    this.pmaps.clear();
    for (const q of this.queues) {
      await this.world.dom0.intr.intrDisestablish(q.ih);
      for (const h of q.ringHandles) unmapGrant(this.hypercall, h);
    }
    this.queues = [];
  }

  /** The backend dies and comes back (online stays 1): the frontend recovers and connects again. */
  async restart(offer: BlkOffer, keepPersistent: boolean): Promise<void> {
    await this.release(keepPersistent);
    await this.xs.write(`${this.be}/state`, String(XenbusStateClosing));
    await this.xs.awaitState(`${this.fe}/state`, XenbusStateClosed, { timeoutMs: 30_000 });
    await this.connect(offer);
  }

  /**
   * The toolstack unplugs the disk (online 0): the frontend closes, we let
   * go, both directories go. `attached`: a frontend is there to answer.
   */
  async unplug(keepPersistent: boolean, attached: boolean): Promise<void> {
    const xs = this.xs;
    await xs.write(`${this.be}/online`, '0');
    await xs.write(`${this.be}/state`, String(XenbusStateClosing));
    if (attached) await xs.awaitState(`${this.fe}/state`, [XenbusStateClosing, XenbusStateClosed], { timeoutMs: 30_000 });
    await this.release(keepPersistent);
    await xs.write(`${this.be}/state`, String(XenbusStateClosed));
    if (attached) await xs.awaitState(`${this.fe}/state`, XenbusStateClosed, { timeoutMs: 30_000 });
    await xs.rm(this.fe);
    await xs.rm(this.be);
  }

  // --- the datapath ------------------------------------------------------------------

  /** Copy every new request off every ring and parse it; anything malformed is a problem of the frontend. */
  take(): TakenRequest[] {
    const out: TakenRequest[] = [];
    for (const q of this.queues) {
      const prod = q.head.load32(REQ_PROD);
      const n = (prod - q.reqCons) >>> 0;
      if (n > q.size - ((q.reqCons - q.rspProd) >>> 0)) {
        this.problem(`queue ${q.index}: req_prod ${prod} runs ${n} requests past ${q.reqCons}, ring of ${q.size}`);
        continue;
      }
      const req = this.scratch.subarray(0, this.wire.entryBytes);
      for (let i = 0; i < n; i++) {
        q.ring.readSlot(q.reqCons, req);
        q.reqCons = (q.reqCons + 1) >>> 0;
        const r = this.parse(q.index, req);
        if (r !== null) out.push(r);
      }
      q.head.store32(REQ_EVENT, (q.reqCons + 1) >>> 0);
    }
    return out;
  }

  private parse(queue: number, req: Uint8Array): TakenRequest | null {
    const w = this.wire;
    const v = new DataView(req.buffer, req.byteOffset, req.length);
    const op = req[0]!;
    const base = { queue, segs: [] as Seg[], nrSectors: 0, flag: 0, indirect: false };
    switch (op) {
      case BLKIF_OP_READ:
      case BLKIF_OP_WRITE:
      case BLKIF_OP_WRITE_BARRIER:
      case BLKIF_OP_FLUSH_DISKCACHE: {
        const n = req[w.nrSegments]!;
        if (n > BLKIF_MAX_SEGMENTS_PER_REQUEST) this.problem(`nr_segments ${n}`);
        const segs: Seg[] = [];
        for (let i = 0; i < Math.min(n, BLKIF_MAX_SEGMENTS_PER_REQUEST); i++) {
          const at = w.seg + i * SEG_BYTES;
          segs.push({ gref: v.getUint32(at, true), first: req[at + 4]!, last: req[at + 5]! });
        }
        return { ...base, lo: v.getUint32(w.id, true), hi: v.getUint32(w.id + 4, true), op, sector: getU64(v, w.sector), segs };
      }
      case BLKIF_OP_DISCARD:
        return {
          ...base, lo: v.getUint32(w.discardId, true), hi: v.getUint32(w.discardId + 4, true), op, sector: getU64(v, w.discardSector),
          nrSectors: getU64(v, w.discardNrSectors), flag: req[w.discardFlag]!,
        };
      case BLKIF_OP_INDIRECT: {
        const n = v.getUint16(w.indNrSegments, true);
        const lo = v.getUint32(w.indId, true);
        const hi = v.getUint32(w.indId + 4, true);
        const max = this.offer?.maxIndirectSegments ?? 0;
        if (max <= BLKIF_MAX_SEGMENTS_PER_REQUEST || n === 0 || n > max) this.problem(`indirect nr_segments ${n}, offered ${max}`);
        const segs = this.indirectSegments(v, n);
        return { ...base, lo, hi, op: req[w.indOp]!, indirect: true, sector: getU64(v, w.indSector), segs };
      }
      default:
        this.problem(`operation ${op}`);
        return null;
    }
  }

  /** The descriptors of an indirect request, copied out of its pages (read-only maps, as blkback does). */
  private indirectSegments(v: DataView, n: number): Seg[] {
    const segs: Seg[] = [];
    for (let p = 0; p * ENTRIES_PER_FRAME < n; p++) {
      const ref = v.getUint32(this.wire.indGrefs + p * 4, true);
      const m = this.map(ref, false);
      if (m === null) return segs;
      const count = Math.min(ENTRIES_PER_FRAME, n - p * ENTRIES_PER_FRAME);
      this.onIndirectPage?.(m.bytes, count * SEG_BYTES);
      this.desc.set(m.bytes.subarray(0, count * SEG_BYTES));
      this.done(m);
      const d = new DataView(this.desc.buffer);
      for (let i = 0; i < count; i++) segs.push({ gref: d.getUint32(i * SEG_BYTES, true), first: this.desc[i * SEG_BYTES + 4]!, last: this.desc[i * SEG_BYTES + 5]! });
    }
    return segs;
  }

  /** Map `ref` of the frontend (from the persistent cache when there is one); null, and a problem, if it is not granted so. */
  map(ref: number, writable: boolean): BlkMapping | null {
    const cached = this.pmaps.get(ref);
    if (cached !== undefined) return cached;
    // feature-persistent maps every grant writable and keeps it.
    const rw = writable || this.persistent;
    const op: gnttab_map_grant_ref = {
      host_addr: 0n, flags: GNTMAP_host_map | (rw ? 0 : GNTMAP_readonly), ref, dom: this.domid,
      status: 0, handle: -1, dev_bus_addr: 0n, page: null,
    };
    this.hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_map_grant_ref, op);
    if (op.status !== GNTST_okay || op.page === null) {
      this.problem(`ref ${ref} is not granted ${rw ? 'writable' : 'read-only'} to dom0 (GNTST ${op.status})`);
      return null;
    }
    const m: BlkMapping = { ref, handle: op.handle, frame: Number(op.dev_bus_addr >> 12n), writable: rw, bytes: pageBytes(op.page) };
    if (this.persistent) this.pmaps.set(ref, m);
    return m;
  }

  /** The request is through with `m`: unmap it unless it is persistent. */
  done(m: BlkMapping): void {
    if (!this.persistent) this.unmap(m);
  }

  unmap(m: BlkMapping): void {
    this.hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_unmap_grant_ref, { host_addr: 0n, dev_bus_addr: 0n, handle: m.handle, status: 0 });
  }

  /** A response in the next slot of q: any id, operation and status at all. */
  respond(queue: number, lo: number, hi: number, op: number, status: number): void {
    const q = this.queues[queue]!;
    const w = this.wire;
    const rsp = this.scratch.subarray(0, w.entryBytes);
    rsp.fill(0);
    const v = new DataView(rsp.buffer, rsp.byteOffset, rsp.length);
    v.setUint32(w.rspId, lo, true);
    v.setUint32(w.rspId + 4, hi, true);
    rsp[w.rspOperation] = op;
    v.setInt16(w.rspStatus, status, true);
    q.ring.writeSlot(q.rspProd, rsp);
    q.rspProd = (q.rspProd + 1) >>> 0;
  }

  /** Publish rsp_prod (ours, or any value at all) and send an event. */
  publish(queue: number, prod?: number): void {
    const q = this.queues[queue]!;
    q.rspPushed = prod ?? q.rspProd;
    q.head.store32(RSP_PROD, q.rspPushed);
    this.world.dom0.intr.intrSignal(q.ih);
  }

  signal(queue: number): void {
    this.world.dom0.intr.intrSignal(this.queues[queue]!.ih);
  }
}

// --- the harness -----------------------------------------------------------------------

type IoOp = 'read' | 'write' | 'fua' | 'flush' | 'discard';

/** One transfer the guest asked for. */
type Io = {
  n: number;
  op: IoOp;
  /** In 512-byte sectors. */
  sector: number;
  count: number;
  data: Uint8Array | null;
  step: number;
  done: boolean;
  err: XenError | null;
  result: Uint8Array | null;
};

export type XbfFuzzOptions = {
  seed: number;
  steps: number;
  /** The guest's other disk answered later than this breaks the latency invariant. */
  latencyBoundMs?: number;
  onProgress?: (step: number) => void;
};

type Action =
  | 'serve' | 'serve some' | 'serve reordered' | 'hold' | 'io error' | 'eopnotsupp' | 'storm' | 'restart' | 'unplug'
  | 'unknown id' | 'id with high bits' | 'duplicate' | 'wrong operation' | 'junk status' | 'rsp_prod ahead' | 'rsp_prod back' | 'grant kept';
const ACTION_WEIGHTS: Record<Action, number> = {
  serve: 1500, 'serve some': 300, 'serve reordered': 300, hold: 300, 'io error': 60, eopnotsupp: 30, storm: 45, restart: 6, unplug: 2,
  'unknown id': 1, 'id with high bits': 1, duplicate: 1, 'wrong operation': 1, 'junk status': 1, 'rsp_prod ahead': 1, 'rsp_prod back': 1,
  'grant kept': 2,
};
/** Each of these must break the disk. */
const MALICIOUS = new Set<Action>(['unknown id', 'id with high bits', 'duplicate', 'wrong operation', 'junk status', 'rsp_prod ahead', 'rsp_prod back']);

export class XbfFuzz extends Harness {
  private readonly hash = createHash('sha256');
  private world!: World;
  private sc!: XenSoftc;
  private dom!: Domain;
  private other!: XbfSoftc;
  private backend!: HostileBlkBackend;
  private xbf: XbfSoftc | null = null;
  /** The current disk's buffer() arrays not in use, by size: reads go into them now and then. */
  private buffers = new Map<number, Uint8Array[]>();
  private ioSeq = 0;
  private ios: Io[] = [];
  private held: TakenRequest[] = [];
  /** The disk as the backend holds it, and as the guest may expect it (`known` per 512-byte sector). */
  private readonly bdisk = new Uint8Array(DISK_SECTORS * SECTOR);
  private readonly gdisk = new Uint8Array(DISK_SECTORS * SECTOR);
  private readonly known = new Uint8Array(DISK_SECTORS).fill(1);
  /** Set by a malicious answer: the disk must be broken by the end of the step. */
  private mustBreak: Action | null = null;
  /** serve() kept a mapping for good. */
  private keptNow = false;
  private probeCounter = 0;

  constructor(private readonly opts: XbfFuzzOptions) {
    super('backend-xbf', opts);
  }

  async run(): Promise<FuzzReport> {
    const start = performance.now();
    await this.setup();
    for (this.step = 0; this.step < this.opts.steps; this.step++) {
      if (this.xbf === null) await this.plug();
      if (this.xbf === null) break;
      this.issue();
      await this.world.settle();
      this.held.push(...this.backend.take());
      await this.act();
      // Settle, and wait out (in virtual time) a throttle a storm may have set off.
      await this.world.drain();
      this.completions();
      await this.checkEpisode();
      if (this.step % XSA396_CHECK_EVERY === XSA396_CHECK_EVERY - 1) this.checkKept();
      if (this.step % PROBE_EVERY === PROBE_EVERY - 1) await this.probe();
      this.checkHandlers([['the guest', this.sc.intr], ['dom0', this.world.dom0.intr]]);
      if (this.report.violations.length >= MAX_VIOLATIONS) break;
      if ((this.step & 1023) === 0) this.opts.onProgress?.(this.step);
    }
    this.report.steps = this.step;
    if (this.xbf !== null) await this.unplug(false);
    this.checkKept();
    this.report.actions['pages still mapped by the backend'] = this.backend.kept.length;
    this.report.refusals['port throttled'] = this.sc.intr.throttles;
    this.report.digest = this.hash.digest('hex');
    this.report.ms = Math.round(performance.now() - start);
    return this.report;
  }

  private async setup(): Promise<void> {
    this.rng.fill(this.bdisk);
    this.gdisk.set(this.bdisk);
    this.world = new World();
    const protocol = this.rng.chance(0.3) ? XEN_IO_PROTO_ABI_X86_32 : XEN_IO_PROTO_ABI_X86_64;
    this.sc = await this.world.createGuest({
      name: 'victim', memoryMiB: 8,
      extra: `xbf.max_queues=3 xbf.max_ring_page_order=2 xbf.max_indirect_segments=64 xbf.protocol=${protocol}`,
      disks: [{ vdev: 'xvda', devid: XVDA, type: 'memory', params: String(1 << 20), readOnly: false }],
    });
    this.count(`guest ${protocol}`);
    this.dom = this.world.host.domain(this.sc.domid);
    this.other = xbfDisks(this.sc).find((x) => x.devid === XVDA)!;
    this.backend = new HostileBlkBackend(this.world, this.sc.domid, XVDB, (what) => this.violation(`xbf sent a bad request: ${what}`));
  }

  private randomOffer(): BlkOffer {
    const r = this.rng;
    return {
      maxRingPageOrder: r.pick([0, 0, 1, 2]), maxQueues: r.pick([1, 1, 2, 3]), persistent: r.chance(0.5),
      maxIndirectSegments: r.pick([0, 32, 64, 256]), sectorSize: r.chance(0.2) ? 4096 : 512,
      flushCache: r.chance(0.7), barrier: r.chance(0.5), discard: r.chance(0.6), discardSecure: r.chance(0.3),
    };
  }

  // --- episodes ------------------------------------------------------------------------------

  private async plug(): Promise<void> {
    const offer = this.randomOffer();
    await this.world.run(this.backend.create(), 'disk nodes');
    await this.world.run(Promise.all([this.backend.connect(offer), probeDevices(this.sc)]), 'plug');
    this.xbf = xbfDisks(this.sc).find((x) => x.devid === XVDB) ?? null;
    this.buffers = new Map();
    if (this.xbf === null) {
      this.violation('xbf did not attach to an honest backend');
      await this.world.run(this.backend.unplug(false, false), 'unplug');
      return;
    }
    const f = this.xbf.features;
    this.count(`episode order ${f.ringPageOrder} queues ${f.queues} indirect ${f.indirectSegments} sector ${this.xbf.sectorSize}${f.persistent ? ' persistent' : ''}`);
  }

  /** End the episode: the backend unplugs the disk; every transfer must be over afterwards. */
  private async unplug(keepPersistent: boolean): Promise<void> {
    this.held = [];
    await this.world.run(this.backend.unplug(keepPersistent, true), 'unplug');
    await this.world.settle();
    this.completions();
    for (const io of this.ios) this.violation(`${io.op} at ${io.sector} still unanswered after the disk was unplugged`);
    this.ios = [];
    if (xbfDisks(this.sc).some((x) => x.devid === XVDB)) this.violation('xbf is still attached after the unplug');
    this.xbf = null;
  }

  // --- the guest's I/O -------------------------------------------------------------------------

  /** Up to three new transfers, none overlapping one in flight (as a file system would). */
  private issue(): void {
    const x = this.xbf;
    if (x === null || x.state === 'broken') return;
    for (let n = this.rng.int(4); n > 0 && this.ios.length < 24; n--) {
      const ratio = x.sectorSize / SECTOR;
      const op = this.rng.weighted<IoOp>({ read: 40, write: 40, fua: 5, flush: 8, discard: 7 });
      const count = op === 'flush' ? 0 : this.rng.chance(0.8) ? this.rng.range(1, 8) : this.rng.range(9, 96);
      const lba = this.rng.int(x.sectors - Math.max(1, Math.ceil(count / ratio)) + 1);
      const sector = lba * ratio;
      const sectors = Math.ceil(count / ratio) * ratio;
      if (op !== 'flush' && this.ios.some((o) => o.count > 0 && o.sector < sector + sectors && sector < o.sector + o.count)) continue;
      const data = op === 'write' || op === 'fua' ? this.pattern(sectors) : null;
      const io: Io = { n: this.ioSeq++, op, sector, count: op === 'flush' ? 0 : sectors, data, step: this.step, done: false, err: null, result: null };
      this.ios.push(io);
      this.count(`io ${op}`);
      const p = op === 'read' ? this.read(x, lba, sectors, io)
        : op === 'write' || op === 'fua' ? x.write(lba, data!, { fua: op === 'fua' })
        : op === 'flush' ? x.flush()
        : x.discard(lba, sectors / ratio, { secure: this.rng.chance(0.2) });
      p.then(() => (io.done = true), (err: XenError) => {
        io.done = true;
        io.err = err;
      });
    }
  }

  /**
   * A read into a new array, or now and then into a buffer() array of its
   * size (guest memory the backend writes itself while it grants
   * persistently), copied out when it completes. Only reads: a backend that
   * keeps a buffer's pages mapped past its connection may write into them
   * at any time, so what a write took from there would not be the guest's
   * data (the price of trusting a backend with persistent grants).
   */
  private read(x: XbfSoftc, lba: number, sectors: number, io: Io): Promise<void> {
    const bytes = sectors * SECTOR;
    let buf = this.rng.chance(0.3) ? this.buffers.get(bytes)?.pop() : undefined;
    if (buf === undefined && this.rng.chance(0.1)) {
      try {
        buf = x.buffer(bytes);
        this.count('buffer made');
      } catch {
        this.count('buffer refused');
      }
    }
    if (buf === undefined) return x.read(lba, sectors / (x.sectorSize / SECTOR)).then((d) => void (io.result = d));
    this.count('io read into a buffer');
    const done = (): void => {
      const pool = this.buffers.get(bytes) ?? [];
      pool.push(buf);
      this.buffers.set(bytes, pool);
    };
    return x.readInto(lba, buf).then(() => {
      io.result = buf.slice();
      done();
    }, (err: unknown) => {
      done();
      throw err;
    });
  }

  /** Data for `sectors` sectors: each a random word repeated, its sector's own (cheap, and no two writes alike). */
  private pattern(sectors: number): Uint8Array {
    const words = new Uint32Array(sectors * (SECTOR / 4));
    for (let s = 0; s < sectors; s++) words.fill(this.rng.u32(), s * (SECTOR / 4), (s + 1) * (SECTOR / 4));
    return new Uint8Array(words.buffer);
  }

  /** Transfers that finished: acknowledged data must be the guest's; the models move on. */
  private completions(): void {
    const left: Io[] = [];
    for (const io of this.ios) {
      if (!io.done) {
        left.push(io);
        continue;
      }
      const at = io.sector * SECTOR;
      const len = io.count * SECTOR;
      this.hash.update(`${io.n} ${io.op} ${io.sector} ${io.count} ${io.err?.code ?? 'ok'}\n`);
      count(this.report.refusals, io.err === null ? 'ok' : io.err.code);
      if (io.err !== null) {
        if (io.op !== 'read' && io.op !== 'flush') this.known.fill(0, io.sector, io.sector + io.count);
        continue;
      }
      if (io.op === 'read') this.checkRead(io);
      else if (io.data !== null) {
        this.gdisk.set(io.data, at);
        this.known.fill(1, io.sector, io.sector + io.count);
      } else if (io.op === 'discard') {
        this.gdisk.fill(0, at, at + len);
        this.known.fill(1, io.sector, io.sector + io.count);
      }
    }
    this.ios = left;
  }

  private checkRead(io: Io): void {
    const got = io.result!;
    this.hash.update(got);
    for (let s = 0; s < io.count; s++) {
      if (this.known[io.sector + s] === 0) continue;
      const a = got.subarray(s * SECTOR, (s + 1) * SECTOR);
      const b = this.gdisk.subarray((io.sector + s) * SECTOR, (io.sector + s + 1) * SECTOR);
      if (Buffer.compare(a, b) !== 0) {
        const marker = a.every((x) => x === MARKER);
        return this.violation(`a read acknowledged at sector ${io.sector + s} returned ${marker ? "the marker of a page the backend kept" : 'other data than was written'}`);
      }
    }
  }

  // --- the backend's answers ---------------------------------------------------------------------

  private async act(): Promise<void> {
    const b = this.backend;
    if (this.xbf === null || b.queues.length === 0) return;
    let action = this.rng.weighted(ACTION_WEIGHTS);
    if (this.held.length === 0 && ['duplicate', 'wrong operation', 'junk status', 'grant kept', 'id with high bits'].includes(action)) action = 'unknown id';
    this.count(action);
    if (MALICIOUS.has(action)) this.mustBreak = action;
    switch (action) {
      case 'serve':
        return this.serveAll(this.held.splice(0));
      case 'serve some':
        return this.serveAll(this.held.splice(0, this.rng.int(this.held.length + 1)));
      case 'serve reordered':
        return this.serveAll(this.shuffle(this.held.splice(0)));
      case 'hold':
        return;
      case 'io error':
        return this.serveAll(this.held.splice(0), BLKIF_RSP_ERROR);
      case 'eopnotsupp':
        return this.serveAll(this.held.splice(0), BLKIF_RSP_EOPNOTSUPP);
      case 'storm':
        return this.storm();
      case 'restart':
        return this.restart();
      case 'unplug':
        return this.unplug(this.rng.chance(0.2));
      default:
        return this.malicious(action);
    }
  }

  private shuffle<T>(a: T[]): T[] {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.rng.int(i + 1);
      [a[i], a[j]] = [a[j]!, a[i]!];
    }
    return a;
  }

  /** Answer each request: honestly (the I/O done, OKAY), or with `status` for every one. */
  private serveAll(reqs: TakenRequest[], status?: number): void {
    const queues = new Set<number>();
    for (const r of reqs) {
      const st = status === BLKIF_RSP_EOPNOTSUPP && !this.mayRefuse(r) ? BLKIF_RSP_OKAY : status;
      const s = st === undefined || st === BLKIF_RSP_OKAY ? this.serve(r, false) : st;
      this.backend.respond(r.queue, r.lo, r.hi, r.op, s);
      queues.add(r.queue);
    }
    for (const q of queues) this.backend.publish(q);
  }

  /** EOPNOTSUPP only where blkif.h allows it: a barrier, a flush or a discard. */
  private mayRefuse(r: TakenRequest): boolean {
    return r.op === BLKIF_OP_WRITE_BARRIER || r.op === BLKIF_OP_FLUSH_DISKCACHE || r.op === BLKIF_OP_DISCARD;
  }

  /** Do one request: check it against the offer, the disk and the guest's transfers; move the data. */
  private serve(r: TakenRequest, keep: boolean): number {
    const offer = this.backend.offer!;
    if (r.op === BLKIF_OP_DISCARD) return this.serveDiscard(r, offer);
    if ((r.op === BLKIF_OP_WRITE_BARRIER && !offer.barrier) || (r.op === BLKIF_OP_FLUSH_DISKCACHE && !offer.flushCache)) {
      this.violation(`xbf sent a bad request: operation ${r.op} not offered`);
    }
    if (r.indirect && r.op !== BLKIF_OP_READ && r.op !== BLKIF_OP_WRITE) this.violation(`xbf sent a bad request: indirect_op ${r.op}`);
    let sectors = 0;
    for (const s of r.segs) {
      if (s.first > s.last || s.last >= SECTORS_PER_PAGE) this.violation(`xbf sent a bad request: segment ${s.first}..${s.last}`);
      sectors += s.last - s.first + 1;
    }
    if (!this.inDisk(r.sector, sectors)) return BLKIF_RSP_ERROR;
    const read = r.op === BLKIF_OP_READ;
    if (sectors > 0) this.checkCovered(r, sectors, read);
    let pos = r.sector * SECTOR;
    for (const s of r.segs) {
      const m = this.backend.map(s.gref, read);
      if (m === null) return BLKIF_RSP_ERROR;
      const at = s.first * SECTOR;
      const len = (s.last - s.first + 1) * SECTOR;
      if (read) m.bytes.set(this.bdisk.subarray(pos, pos + len), at);
      else this.checkWriteData(r, pos, m.bytes.subarray(at, at + len));
      if (!read) this.bdisk.set(m.bytes.subarray(at, at + len), pos);
      pos += len;
      if (keep && !this.backend.persistent && this.backend.kept.length < MAX_KEPT) {
        this.backend.kept.push(m);
        keep = false;
        this.keptNow = true;
      } else {
        this.backend.done(m);
      }
    }
    return BLKIF_RSP_OKAY;
  }

  private serveDiscard(r: TakenRequest, offer: BlkOffer): number {
    if (!offer.discard) this.violation('xbf sent a bad request: discard not offered');
    if ((r.flag & BLKIF_DISCARD_SECURE) !== 0 && !offer.discardSecure) this.violation('xbf sent a bad request: secure discard not offered');
    if (!this.inDisk(r.sector, r.nrSectors)) return BLKIF_RSP_ERROR;
    if (r.nrSectors > 0) this.checkCovered(r, r.nrSectors, false);
    this.bdisk.fill(0, r.sector * SECTOR, (r.sector + r.nrSectors) * SECTOR);
    return BLKIF_RSP_OKAY;
  }

  private inDisk(sector: number, count: number): boolean {
    const ratio = (this.xbf?.sectorSize ?? SECTOR) / SECTOR;
    if (sector + count > DISK_SECTORS || sector % ratio !== 0 || count % ratio !== 0) {
      this.violation(`xbf sent a bad request: sectors ${sector}+${count} (disk of ${DISK_SECTORS}, ${ratio} per sector)`);
      return false;
    }
    return true;
  }

  /** The range lies inside a transfer the guest asked for and has not seen answered. */
  private checkCovered(r: TakenRequest, count: number, read: boolean): void {
    const fits = this.ios.some((io) => !io.done && io.sector <= r.sector && r.sector + count <= io.sector + io.count
      && (read ? io.op === 'read' : r.op === BLKIF_OP_DISCARD ? io.op === 'discard' : io.op === 'write' || io.op === 'fua'));
    if (!fits) this.violation(`xbf sent a bad request: operation ${r.op} at ${r.sector}+${count} belongs to no transfer in flight`);
  }

  /** A WRITE carries the guest's own bytes for those sectors. */
  private checkWriteData(r: TakenRequest, pos: number, bytes: Uint8Array): void {
    const io = this.ios.find((o) => !o.done && o.data !== null && o.sector * SECTOR <= pos && pos + bytes.length <= (o.sector + o.count) * SECTOR);
    if (io === undefined) return;
    const want = io.data!.subarray(pos - io.sector * SECTOR, pos - io.sector * SECTOR + bytes.length);
    if (Buffer.compare(want, bytes) !== 0) this.violation(`xbf wrote other data than the guest's at sector ${pos / SECTOR} (queue ${r.queue})`);
  }

  /** Events as fast as the backend can send them, with nothing new on the ring; then honest answers. */
  private async storm(): Promise<void> {
    const q = this.rng.int(this.backend.queues.length);
    for (let i = this.rng.range(16, 256); i > 0; i--) {
      this.backend.signal(q);
      this.world.pump();
      if ((i & 15) === 0) await this.world.settle();
    }
    this.serveAll(this.held.splice(0));
  }

  /** The backend dies and comes back with other offers; xbf must recover and issue again what was out. */
  private async restart(): Promise<void> {
    const keep = this.backend.persistent && this.rng.chance(0.3);
    this.held = [];
    const x = this.xbf!;
    const before = x.reconnects;
    const broken = x.state === 'broken';
    // The same disk comes back (its sector size and features); only the transport may differ.
    const old = this.backend.offer!;
    const offer = { ...this.randomOffer(), sectorSize: old.sectorSize, flushCache: old.flushCache, barrier: old.barrier, discard: old.discard, discardSecure: old.discardSecure };
    await this.world.run(this.backend.restart(offer, keep), 'restart');
    await this.world.settle();
    if (!broken && x.state !== 'broken' && x.reconnects !== before + 1) this.violation(`xbf did not reconnect after a backend restart (state ${x.state})`);
    if (keep) this.count('restart keeping persistent grants');
  }

  /** One malicious answer; the disk must break. */
  private malicious(action: Action): void {
    const b = this.backend;
    const r = this.held.length > 0 ? this.held.splice(this.rng.int(this.held.length), 1)[0]! : null;
    const q = r?.queue ?? this.rng.int(b.queues.length);
    switch (action) {
      case 'unknown id':
        b.respond(q, 64 + this.rng.int(1 << 16), 0, BLKIF_OP_READ, BLKIF_RSP_OKAY);
        break;
      case 'id with high bits':
        b.respond(q, r!.lo, 1 + this.rng.int(0xffff), r!.op, BLKIF_RSP_OKAY);
        break;
      case 'duplicate':
        b.respond(q, r!.lo, r!.hi, r!.op, this.serve(r!, false));
        b.respond(q, r!.lo, r!.hi, r!.op, BLKIF_RSP_OKAY);
        break;
      case 'wrong operation':
        b.respond(q, r!.lo, r!.hi, (r!.op + 1 + this.rng.int(6)) % 7, BLKIF_RSP_OKAY);
        break;
      case 'junk status':
        b.respond(q, r!.lo, r!.hi, r!.op, this.rng.pick([1, 2, 3, -3, 77, 0x7fff, -0x8000]));
        break;
      case 'grant kept': {
        // One page of the request stays mapped: unless grants are persistent, xbf must notice when it revokes.
        this.keptNow = false;
        b.respond(q, r!.lo, r!.hi, r!.op, this.serve(r!, true));
        if (this.keptNow) this.mustBreak = action;
        else this.count(b.persistent ? 'grant kept (persistent)' : 'grant kept (nothing kept)');
        break;
      }
      case 'rsp_prod ahead': {
        const reqProd = b.queues[q]!.head.load32(REQ_PROD);
        return b.publish(q, (reqProd + 1 + this.rng.int(1 << 20)) >>> 0);
      }
      case 'rsp_prod back':
        return b.publish(q, (b.queues[q]!.rspPushed - 1 - this.rng.int(1 << 20)) >>> 0);
    }
    b.publish(q);
  }

  // --- checks --------------------------------------------------------------------------------

  /** After a malicious answer the disk is broken (EIO, a reason) with nothing in flight; then the episode ends. */
  private async checkEpisode(): Promise<void> {
    const x = this.xbf;
    if (x === null) return;
    if (this.mustBreak !== null) {
      const why = this.mustBreak;
      this.mustBreak = null;
      if (x.state !== 'broken' || x.error?.code !== 'EIO') return this.violation(`xbf took "${why}" without breaking the disk (state ${x.state})`);
      count(this.report.refusals, `broken: ${why}`);
      this.report.ringBreaks++;
      for (const io of this.ios) if (!io.done) this.violation(`${io.op} at ${io.sector} left in flight on a broken disk`);
      return this.unplug(this.rng.chance(0.3));
    }
    if (x.state === 'broken') {
      this.violation(`xbf broke the disk with an honest backend: ${x.error?.message ?? ''}`);
      return this.unplug(false);
    }
    const heldSteps = new Set(this.held.map((r) => r.queue));
    for (const io of this.ios) {
      if (!io.done && this.step - io.step > HANG_STEPS && heldSteps.size === 0) {
        this.violation(`${io.op} at ${io.sector} hangs since step ${io.step}`);
        io.step = this.step;
      }
    }
  }

  /**
   * XSA-396: each page the backend still maps is still granted to it by the
   * same ref, still allocated, granted under no other ref, and holds only
   * what the backend put there (the marker goes in now).
   */
  private checkKept(): void {
    const d = this.dom;
    const nr = Atomics.load(d.ctl, D.nrGrantFrames) * ENTRIES_PER_FRAME;
    const byFrame = new Map<number, number[]>();
    for (let ref = 0; ref < nr; ref++) {
      const [word, frame] = this.grantEntry(ref);
      if ((word & GTF_type_mask) !== GTF_permit_access) continue;
      byFrame.set(frame, [...(byFrame.get(frame) ?? []), ref]);
    }
    for (const m of this.backend.kept) {
      const [word, frame] = this.grantEntry(m.ref);
      if ((word & GTF_type_mask) !== GTF_permit_access || word >>> 16 !== 0 || frame !== m.frame) {
        this.violation(`ref ${m.ref}, still mapped by the backend, no longer grants page ${m.frame} to it`);
      }
      if (!this.sc.physmem.isAllocated(m.frame)) this.violation(`page ${m.frame}, still mapped by the backend, was freed`);
      const others = (byFrame.get(m.frame) ?? []).filter((r) => r !== m.ref);
      if (others.length > 0) this.violation(`page ${m.frame}, still mapped by the backend, is granted again by ref ${others.join(',')}`);
      if (m.writable) m.bytes.fill(MARKER);
    }
  }

  private grantEntry(ref: number): [number, number] {
    const d = this.dom;
    const gfn = d.ctl[D.grantFrames + Math.floor(ref / ENTRIES_PER_FRAME)] ?? 0;
    const at = (gfn * PAGE_SIZE + (ref % ENTRIES_PER_FRAME) * 8) >> 2;
    return [Atomics.load(d.mem.u32, at), Atomics.load(d.mem.u32, at + 1)];
  }

  /** The guest's other disk (a real blkback) writes and reads back within the bound. */
  private async probe(): Promise<void> {
    const t0 = performance.now();
    const x = this.other;
    const lba = this.rng.int(x.sectors - 4);
    const data = new Uint8Array(this.rng.range(1, 4) * x.sectorSize).fill(++this.probeCounter & 0xff);
    try {
      await this.world.run(x.write(lba, data), 'xvda write');
      const back = await this.world.run(x.read(lba, data.length / x.sectorSize), 'xvda read');
      if (Buffer.compare(back, data) !== 0) this.violation('the guest\'s other disk read back something else');
    } catch (err) {
      this.violation(`the guest's other disk failed: ${(err as Error).message}`);
    }
    const ms = performance.now() - t0;
    this.report.maxProbeLatencyMs = Math.max(this.report.maxProbeLatencyMs, Math.round(ms * 1000) / 1000);
    if (ms > this.latencyBoundMs) this.violation(`the guest's other disk answered in ${ms.toFixed(1)} ms`);
  }
}

export function fuzzXbf(opts: XbfFuzzOptions): Promise<FuzzReport> {
  return new XbfFuzz(opts).run();
}
