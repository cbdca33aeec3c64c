// xbf(4): the Xen block frontend, after OpenBSD sys/dev/pv/xbf.c. One
// one-page blkif ring; every page the backend touches is shared through the
// Xen bus_dma tag (sc.dmat), so grant refs sit where physical addresses were.
// Each request slot (ccb) owns a dmamap and an 11-page bounce buffer of
// dmamem; the caller's data is copied in and out of it. Responses are copied
// once off the ring and checked (id outstanding, operation matches, status
// known); a violation breaks the disk with a logged reason, never throws out
// of the interrupt.

import {
  BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE,
  BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, VDISK_READONLY,
  blkif_request, blkif_request_segment, blkif_response,
} from '../../abi/blkif.js';
import { __CONST_RING_SIZE, blkif_sring, blkif_sring_entry } from '../../abi/ring.js';
import { offsetOf } from '../../abi/layout.js';
import { XEN_IO_PROTO_ABI_X86_64 } from '../../abi/protocols.js';
import { XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitialised } from '../../abi/xenbus.js';
import {
  BUS_DMA_READ, BUS_DMA_WRITE, BUS_DMA_ZERO, BUS_DMASYNC_POSTREAD, BUS_DMASYNC_POSTWRITE, BUS_DMASYNC_PREREAD, BUS_DMASYNC_PREWRITE,
  busDmaDomid, type DmaKva, type DmaSegment, type XenDmaMap,
} from '../../busdma/busdma.js';
import { XenError } from '../../errors.js';
import type { IntrHandle } from '../../evtchn/evtchn.js';
import { FramePage, PAGE_SIZE } from '../../hypervisor/page.js';
import { logger, type Log } from '../../log.js';
import { FrontRing } from '../../xen/ring.js';
import type { XenDevice, XenDriver, XenSoftc } from '../../xen/xen.js';

// --- wire layouts ------------------------------------------------------------

const XBF_SEC_SHIFT = 9;
const XBF_SEC_SIZE = 1 << XBF_SEC_SHIFT;
const XBF_MAX_SGE = BLKIF_MAX_SEGMENTS_PER_REQUEST;
/** The most one request carries: XBF_MAX_SGE whole pages. */
const XBF_MAXPHYS = XBF_MAX_SGE * PAGE_SIZE;
const XBF_RING_SIZE = __CONST_RING_SIZE(blkif_sring, PAGE_SIZE);
const ENTRY_BYTES = blkif_sring_entry.size;
const XBF_CONNECT_TIMEOUT_MS = 30_000;
const XBF_MAX_WAITERS = 4096;

const REQ_OPERATION = offsetOf(blkif_request, 'operation');
const REQ_NR_SEGMENTS = offsetOf(blkif_request, 'nr_segments');
const REQ_HANDLE = offsetOf(blkif_request, 'handle');
const REQ_ID = offsetOf(blkif_request, 'id');
const REQ_SECTOR = offsetOf(blkif_request, 'sector_number');
const REQ_SEG = offsetOf(blkif_request, 'seg');
const SEG_GREF = offsetOf(blkif_request_segment, 'gref');
const SEG_FIRST = offsetOf(blkif_request_segment, 'first_sect');
const SEG_LAST = offsetOf(blkif_request_segment, 'last_sect');
const RSP_ID = offsetOf(blkif_response, 'id');
const RSP_OPERATION = offsetOf(blkif_response, 'operation');
const RSP_STATUS = offsetOf(blkif_response, 'status');

// --- softc -------------------------------------------------------------------

/** One request slot (OpenBSD's struct xbf_ccb): its id on the ring is its index. */
type XbfCcb = {
  id: number;
  map: XenDmaMap;
  bufSegs: DmaSegment[];
  buf: DmaKva;
  /** The operation in flight, -1 when free. */
  op: number;
  done: ((status: number | XenError) => void) | null;
};

type XbfRing = { segs: DmaSegment[]; kva: DmaKva; map: XenDmaMap; ring: FrontRing; ref: number };

export class XbfSoftc {
  readonly name: string;
  readonly log: Log;
  readonly devid: number;
  sectors = 0;
  sectorSize = XBF_SEC_SIZE;
  readOnly = false;
  flushCache = false;
  /** Set once: the backend broke the protocol or the disk went away. */
  error: XenError | null = null;
  ring: XbfRing | null = null;
  ih: IntrHandle | null = null;
  readonly ccbs: XbfCcb[] = [];
  /** Ccbs not in flight; popped by getCcb. */
  readonly freeCcbs: XbfCcb[] = [];
  private readonly waiters: Array<(ccb: XbfCcb | XenError) => void> = [];
  /** While suspending: requests that wait for resume (null when not suspending). */
  private held: Array<() => void> | null = null;
  /** Waiting for every ccb to be free. */
  private idle: Array<() => void> = [];
  private readonly req = new Uint8Array(ENTRY_BYTES);
  private readonly reqView = new DataView(this.req.buffer);
  private readonly rsp = new Uint8Array(ENTRY_BYTES);
  private readonly rspView = new DataView(this.rsp.buffer);

  constructor(
    readonly sc: XenSoftc,
    readonly dev: XenDevice,
  ) {
    this.name = `xbf${dev.unit}`;
    this.log = logger('xbf', this.name);
    this.devid = Number(dev.unit);
  }

  /** Sectors of 512 bytes per disk sector. */
  get ratio(): number {
    return this.sectorSize / XBF_SEC_SIZE;
  }

  // --- datapath ----------------------------------------------------------------

  // xbf_scsi_cmd READ: `count` disk sectors from `lba`.
  async read(lba: number, count: number): Promise<Uint8Array> {
    this.checkRange(lba, count);
    const out = new Uint8Array(count * this.sectorSize);
    await this.transfer(BLKIF_OP_READ, lba * this.ratio, out);
    return out;
  }

  // xbf_scsi_cmd WRITE: whole disk sectors from `lba`.
  async write(lba: number, data: Uint8Array): Promise<void> {
    if (!(data instanceof Uint8Array) || data.length % this.sectorSize !== 0) {
      throw new XenError('EINVAL', `${this.name}: data must be whole sectors of ${this.sectorSize} bytes`);
    }
    this.checkRange(lba, data.length / this.sectorSize);
    if (this.readOnly) throw new XenError('EROFS', `${this.name}: read-only disk`);
    await this.transfer(BLKIF_OP_WRITE, lba * this.ratio, data);
  }

  // xbf_scsi_cmd SYNCHRONIZE_CACHE: without feature-flush-cache the backend has no cache to flush.
  async flush(): Promise<void> {
    if (this.error !== null) throw this.error;
    if (this.flushCache) await this.submit(BLKIF_OP_FLUSH_DISKCACHE, 0, null);
  }

  private checkRange(lba: number, count: number): void {
    if (this.error !== null) throw this.error;
    if (!Number.isSafeInteger(lba) || !Number.isSafeInteger(count) || lba < 0 || count < 0 || lba + count > this.sectors) {
      throw new XenError('EINVAL', `${this.name}: sectors ${lba}+${count} outside 0..${this.sectors}`);
    }
  }

  // xbf_submit_cmd for a transfer: split into requests of at most XBF_MAXPHYS, up to a ring's worth in flight.
  async transfer(op: number, sector: number, bytes: Uint8Array): Promise<void> {
    const chunks = Math.ceil(bytes.length / XBF_MAXPHYS);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < chunks) {
        const i = next++;
        const part = bytes.subarray(i * XBF_MAXPHYS, Math.min(bytes.length, (i + 1) * XBF_MAXPHYS));
        await this.submit(op, sector + (i * XBF_MAXPHYS) / XBF_SEC_SIZE, part);
      }
    };
    await Promise.all(Array.from({ length: Math.min(chunks, this.ccbs.length) }, worker));
  }

  // xbf_submit_cmd + xbf_complete_cmd for one request (a FLUSH has no data).
  async submit(op: number, sector: number, data: Uint8Array | null): Promise<void> {
    const ccb = await this.getCcb();
    try {
      const status = await this.start(ccb, op, sector, data);
      if (status === BLKIF_RSP_EOPNOTSUPP) throw new XenError('EOPNOTSUPP', `${this.name}: operation ${op} not supported by the backend`);
      if (status !== BLKIF_RSP_OKAY) throw new XenError('EIO', `${this.name}: operation ${op} at sector ${sector}: status ${status}`);
      if (op === BLKIF_OP_READ && data !== null) {
        this.sc.dmat.dmamapSync(ccb.map, 0, data.length, BUS_DMASYNC_POSTREAD);
        ccb.buf.read(0, data);
      }
    } finally {
      await this.putCcb(ccb);
    }
  }

  /** Load the ccb's map, put the request on the ring, notify; resolves with the response status. */
  private start(ccb: XbfCcb, op: number, sector: number, data: Uint8Array | null): Promise<number | XenError> {
    if (this.error !== null) throw this.error;
    const domid = busDmaDomid(this.dev.backendId);
    if (data !== null) {
      const write = op === BLKIF_OP_WRITE;
      if (write) ccb.buf.write(0, data);
      this.sc.dmat.dmamapLoadRaw(ccb.map, ccb.bufSegs, data.length, domid | (write ? BUS_DMA_WRITE : BUS_DMA_READ));
      this.sc.dmat.dmamapSync(ccb.map, 0, data.length, write ? BUS_DMASYNC_PREWRITE : BUS_DMASYNC_PREREAD);
    }
    this.encodeRequest(ccb, op, sector);
    const ring = this.ring!.ring;
    const done = new Promise<number | XenError>((resolve) => (ccb.done = resolve));
    ccb.op = op;
    ring.putRequest(this.req);
    if (ring.pushRequests()) this.sc.intr.intrSignal(this.ih!);
    return done.then((r) => {
      if (r instanceof XenError) throw r;
      return r;
    });
  }

  private encodeRequest(ccb: XbfCcb, op: number, sector: number): void {
    this.req.fill(0);
    this.req[REQ_OPERATION] = op;
    this.req[REQ_NR_SEGMENTS] = ccb.map.dm_nsegs;
    this.reqView.setUint16(REQ_HANDLE, this.devid & 0xffff, true);
    this.reqView.setBigUint64(REQ_ID, BigInt(ccb.id), true);
    this.reqView.setBigUint64(REQ_SECTOR, BigInt(sector), true);
    for (let i = 0; i < ccb.map.dm_nsegs; i++) {
      const seg = ccb.map.dm_segs[i]!;
      const at = REQ_SEG + i * blkif_request_segment.size;
      this.reqView.setUint32(at + SEG_GREF, seg.ds_addr, true);
      this.req[at + SEG_FIRST] = seg.ds_offset >> XBF_SEC_SHIFT;
      this.req[at + SEG_LAST] = (seg.ds_offset + seg.ds_len - 1) >> XBF_SEC_SHIFT;
    }
  }

  // xbf_intr: copy each response once, check it, complete its ccb.
  intr(): void {
    const ring = this.ring?.ring;
    if (ring === undefined || this.error !== null) return;
    do {
      ring.unconsumedResponses();
      while (ring.takeResponse(this.rsp)) {
        const why = this.complete();
        if (why !== null) return this.broken(why);
      }
    } while (ring.finalCheckForResponses());
    if (ring.error !== undefined) this.broken(ring.error.message);
  }

  /** Check the response in this.rsp against what is outstanding; null when it completed a ccb. */
  private complete(): string | null {
    const id = this.rspView.getBigUint64(RSP_ID, true);
    const op = this.rsp[RSP_OPERATION]!;
    const status = this.rspView.getInt16(RSP_STATUS, true);
    const ccb = id < BigInt(this.ccbs.length) ? this.ccbs[Number(id)] : undefined;
    if (ccb === undefined || ccb.op < 0 || ccb.done === null) return `response for id ${id}, which is not outstanding`;
    if (op !== ccb.op) return `response for id ${id} has operation ${op}, request had ${ccb.op}`;
    if (status !== BLKIF_RSP_OKAY && status !== BLKIF_RSP_ERROR && status !== BLKIF_RSP_EOPNOTSUPP) return `response for id ${id}: unknown status ${status}`;
    const done = ccb.done;
    ccb.done = null;
    done(status);
    return null;
  }

  /** The disk is unusable from now on; every request in flight and waiting fails. */
  broken(reason: string): void {
    if (this.error !== null) return;
    this.error = new XenError('EIO', `${this.name}: ${reason}`);
    this.log('broken: %s', reason);
    for (const ccb of this.ccbs) {
      const done = ccb.done;
      ccb.done = null;
      done?.(this.error);
    }
    for (const w of this.waiters.splice(0)) w(this.error);
    for (const h of this.held?.splice(0) ?? []) h();
    for (const f of this.idle.splice(0)) f();
  }

  private getCcb(): Promise<XbfCcb> {
    if (this.error !== null) return Promise.reject(this.error);
    if (this.held !== null) {
      if (this.held.length >= XBF_MAX_WAITERS) return Promise.reject(new XenError('EAGAIN', `${this.name}: ${XBF_MAX_WAITERS} requests held`));
      return new Promise((resolve, reject) => this.held!.push(() => this.getCcb().then(resolve, reject)));
    }
    const ccb = this.freeCcbs.pop();
    if (ccb !== undefined) return Promise.resolve(ccb);
    if (this.waiters.length >= XBF_MAX_WAITERS) return Promise.reject(new XenError('EAGAIN', `${this.name}: ${XBF_MAX_WAITERS} requests waiting`));
    return new Promise((resolve, reject) => this.waiters.push((c) => (c instanceof XenError ? reject(c) : resolve(c))));
  }

  // xbf_reclaim_cmd: unload (revoking the grants), then hand the ccb on.
  private async putCcb(ccb: XbfCcb): Promise<void> {
    const wasRead = ccb.op === BLKIF_OP_READ;
    ccb.op = -1;
    if (ccb.map.dm_nsegs !== 0) {
      if (!wasRead) this.sc.dmat.dmamapSync(ccb.map, 0, ccb.map.dm_mapsize, BUS_DMASYNC_POSTWRITE);
      try {
        await this.sc.dmat.dmamapUnload(ccb.map);
      } catch (err) {
        this.log('ccb %d: %s', ccb.id, (err as Error).message);
      }
    }
    const w = this.waiters.shift();
    if (w !== undefined) w(ccb);
    else this.freeCcbs.push(ccb);
    if (this.isIdle()) for (const f of this.idle.splice(0)) f();
  }

  private isIdle(): boolean {
    return this.freeCcbs.length === this.ccbs.length && this.waiters.length === 0;
  }

  /**
   * For suspend: requests made from now on wait; resolves when every request
   * made before (in flight or waiting for a slot) has completed (bounded).
   */
  async quiesce(timeoutMs: number): Promise<void> {
    this.held ??= [];
    if (this.error !== null || this.isIdle()) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      new Promise<void>((resolve) => this.idle.push(resolve)),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs))),
    ]);
    clearTimeout(timer);
  }

  /** After a cancelled suspend: the held requests go. */
  unhold(): void {
    const held = this.held ?? [];
    this.held = null;
    for (const h of held) h();
  }
}

// --- attach/detach -------------------------------------------------------------

const softcs = new WeakMap<XenSoftc, Map<string, XbfSoftc>>();

/** The attached disks of this kernel, in device order. */
export function xbfDisks(sc: XenSoftc): XbfSoftc[] {
  return [...(softcs.get(sc)?.values() ?? [])].sort((a, b) => a.devid - b.devid);
}

// xbf_attach: ccbs, ring, interrupt, negotiation; each failure unwinds the steps before it.
async function xbfAttach(sc: XenSoftc, dev: XenDevice): Promise<void> {
  const xbf = new XbfSoftc(sc, dev);
  try {
    xbfCcbsCreate(xbf);
    xbfRingCreate(xbf);
    xbf.ih = sc.intr.intrEstablish(0, dev.backendId, () => xbf.intr(), xbf.name);
    await xbfInit(xbf);
  } catch (err) {
    xbf.log('attach failed: %s', (err as Error).message);
    await xbfRelease(xbf);
    throw err;
  }
  sc.intr.intrUnmask(xbf.ih);
  const map = softcs.get(sc) ?? new Map<string, XbfSoftc>();
  map.set(dev.path, xbf);
  softcs.set(sc, map);
  xbf.log('%d sectors of %d bytes%s', xbf.sectors, xbf.sectorSize, xbf.readOnly ? ', read-only' : '');
}

// xbf_detach: Closing, fail what is in flight, release everything, Closed.
async function xbfDetach(sc: XenSoftc, dev: XenDevice): Promise<void> {
  const xbf = softcs.get(sc)?.get(dev.path);
  if (xbf === undefined) return;
  softcs.get(sc)!.delete(dev.path);
  await sc.xs.write(`${dev.path}/state`, String(XenbusStateClosing)).catch(() => undefined);
  xbf.broken('detached');
  await xbfRelease(xbf);
  await sc.xs.write(`${dev.path}/state`, String(XenbusStateClosed)).catch(() => undefined);
}

/** Undo attach in reverse; tolerates a half-built softc. */
async function xbfRelease(xbf: XbfSoftc): Promise<void> {
  if (xbf.ih !== null) await xbf.sc.intr.intrDisestablish(xbf.ih).catch(() => undefined);
  xbf.ih = null;
  await xbfRingDestroy(xbf);
  await xbfCcbsDestroy(xbf);
}

// Suspend, minimally: requests in flight complete and new ones wait. A suspend
// the toolstack cancels finds the backend as it was, so resume lets them go;
// a restored domain attaches its disks afresh.
async function xbfSuspend(sc: XenSoftc, dev: XenDevice): Promise<void> {
  await softcs.get(sc)?.get(dev.path)?.quiesce(XBF_CONNECT_TIMEOUT_MS);
}

async function xbfResume(sc: XenSoftc, dev: XenDevice): Promise<void> {
  softcs.get(sc)?.get(dev.path)?.unhold();
}

export const xbfDriver: XenDriver = { name: 'xbf', attach: xbfAttach, detach: xbfDetach, suspend: xbfSuspend, resume: xbfResume };

// --- ring and ccb create/destroy -------------------------------------------------

// xbf_ring_create: one zeroed page of dmamem, granted to the backend.
function xbfRingCreate(xbf: XbfSoftc): void {
  const dmat = xbf.sc.dmat;
  const segs = dmat.dmamemAlloc(PAGE_SIZE, PAGE_SIZE, 0, 1, BUS_DMA_ZERO);
  const kva = dmat.dmamemMap(segs, PAGE_SIZE, 0);
  let map: XenDmaMap | null = null;
  try {
    map = dmat.dmamapCreate(PAGE_SIZE, 1, PAGE_SIZE, 0, 0);
    dmat.dmamapLoadRaw(map, segs, PAGE_SIZE, busDmaDomid(xbf.dev.backendId));
  } catch (err) {
    if (map !== null) dmat.dmamapDestroy(map);
    dmat.dmamemUnmap(kva);
    dmat.dmamemFree(segs);
    throw err;
  }
  const page = new FramePage(xbf.sc.mem, segs[0]!.ds_addr / PAGE_SIZE, true);
  const ring = new FrontRing([page], ENTRY_BYTES, XBF_RING_SIZE, xbf.name);
  ring.init();
  xbf.ring = { segs, kva, map, ring, ref: map.dm_segs[0]!.ds_addr };
}

// xbf_ring_destroy
async function xbfRingDestroy(xbf: XbfSoftc): Promise<void> {
  const r = xbf.ring;
  if (r === null) return;
  xbf.ring = null;
  const dmat = xbf.sc.dmat;
  await dmat.dmamapUnload(r.map).catch((err: Error) => xbf.log('ring: %s', err.message));
  dmat.dmamapDestroy(r.map);
  dmat.dmamemUnmap(r.kva);
  dmat.dmamemFree(r.segs);
}

// xbf_alloc_ccbs: a dmamap and XBF_MAX_SGE pages of buffer per ring slot.
function xbfCcbsCreate(xbf: XbfSoftc): void {
  const dmat = xbf.sc.dmat;
  for (let id = 0; id < XBF_RING_SIZE; id++) {
    const bufSegs = dmat.dmamemAlloc(XBF_MAXPHYS, PAGE_SIZE, 0, XBF_MAX_SGE, 0);
    const buf = dmat.dmamemMap(bufSegs, XBF_MAXPHYS, 0);
    let map: XenDmaMap;
    try {
      map = dmat.dmamapCreate(XBF_MAXPHYS, XBF_MAX_SGE, PAGE_SIZE, PAGE_SIZE, 0);
    } catch (err) {
      dmat.dmamemUnmap(buf);
      dmat.dmamemFree(bufSegs);
      throw err;
    }
    const ccb: XbfCcb = { id, map, bufSegs, buf, op: -1, done: null };
    xbf.ccbs.push(ccb);
  }
  for (let i = xbf.ccbs.length - 1; i >= 0; i--) xbf.freeCcbs.push(xbf.ccbs[i]!);
}

// xbf_free_ccbs
async function xbfCcbsDestroy(xbf: XbfSoftc): Promise<void> {
  const dmat = xbf.sc.dmat;
  for (const ccb of xbf.ccbs.splice(0)) {
    if (ccb.map.dm_nsegs !== 0) await dmat.dmamapUnload(ccb.map).catch((err: Error) => xbf.log('ccb %d: %s', ccb.id, err.message));
    dmat.dmamapDestroy(ccb.map);
    dmat.dmamemUnmap(ccb.buf);
    dmat.dmamemFree(ccb.bufSegs);
  }
  xbf.freeCcbs.length = 0;
}

// --- backend negotiation ---------------------------------------------------------

// xbf_init: ring-ref, event-channel, protocol, Initialised; await Connected; read the disk.
async function xbfInit(xbf: XbfSoftc): Promise<void> {
  const { xs } = xbf.sc;
  const fe = xbf.dev.path;
  const be = xbf.dev.backend;
  await xs.write(`${fe}/ring-ref`, String(xbf.ring!.ref));
  await xs.write(`${fe}/event-channel`, String(xbf.ih!.port));
  await xs.write(`${fe}/protocol`, XEN_IO_PROTO_ABI_X86_64);
  await xs.write(`${fe}/state`, String(XenbusStateInitialised));
  const state = await xs.awaitState(`${be}/state`, (v) => v !== undefined && Number(v) >= XenbusStateConnected, { timeoutMs: XBF_CONNECT_TIMEOUT_MS });
  if (Number(state) !== XenbusStateConnected) throw new XenError('ENXIO', `${xbf.name}: backend state ${state}`);
  xbf.sectors = await xs.getNumber(`${be}/sectors`);
  xbf.sectorSize = await xs.getNumber(`${be}/sector-size`);
  const info = await xs.getNumber(`${be}/info`).catch(() => 0);
  const mode = await xs.read(`${be}/mode`).catch(() => 'w');
  xbf.flushCache = (await xs.getNumber(`${be}/feature-flush-cache`).catch(() => 0)) === 1;
  xbf.readOnly = (info & VDISK_READONLY) !== 0 || mode === 'r';
  if (!Number.isSafeInteger(xbf.sectors) || xbf.sectors < 0) throw new XenError('EPROTO', `${xbf.name}: sectors ${xbf.sectors}`);
  if (xbf.sectorSize < XBF_SEC_SIZE || xbf.sectorSize > PAGE_SIZE || (xbf.sectorSize & (xbf.sectorSize - 1)) !== 0) {
    throw new XenError('EPROTO', `${xbf.name}: sector-size ${xbf.sectorSize}`);
  }
  // `sectors` is in 512-byte units (Linux); the disk's own sectors are sectorSize.
  xbf.sectors = Math.floor(xbf.sectors / xbf.ratio);
  await xs.write(`${fe}/state`, String(XenbusStateConnected));
}
