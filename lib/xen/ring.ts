// xen/io/ring.h: the generic shared ring of netif, blkif and the netif ctrl
// ring. The shared area is the 64-byte sring header, then `size` entries of
// `entryBytes`, laid end to end over one or more pages (a multi-page blkif
// ring is one area: an entry may straddle two pages). FrontRing and BackRing
// are front_ring_t and back_ring_t with the macros as methods; each keeps its
// own indices private and only reads the peer's producer and event index.
//
// Distrust of the peer (XSA-155): a slot is copied once into a caller-owned
// buffer (take*), the peer's producer is read once per batch and must lie
// between what we last saw and what it could legally have produced; anything
// else marks the ring broken (`error`, EPROTO) and it stops moving. Slot
// indices are masked, so no value on the page can make us touch memory
// outside the ring.
//
// Under `xenpv run --trace`, every slot put or taken and every push is
// recorded with the ring's name and type (lib/trace/trace.ts), so the
// decoder can print the slots as the io/*.h structs they are.

import { offsetOf } from '../abi/layout.js';
import { sring_header } from '../abi/ring.js';
import { XenError, assert } from '../errors.js';
import { PAGE_SHIFT, PAGE_SIZE } from '../hypervisor/page.js';
import type { Page } from '../hypervisor/page.js';
import { logger } from '../log.js';
import type { Log } from '../log.js';
import { TraceKind, traceDevice, tracePush, tracePushed, traceRingAttach, traceSlot, traceText, tracing, type RingType } from '../trace/trace.js';

const REQ_PROD = offsetOf(sring_header, 'req_prod');
const REQ_EVENT = offsetOf(sring_header, 'req_event');
const RSP_PROD = offsetOf(sring_header, 'rsp_prod');
const RSP_EVENT = offsetOf(sring_header, 'rsp_event');
const PVT = offsetOf(sring_header, 'pvt');
/** Offset of ring[0]: the header is 64 bytes. */
export const SRING_RING_OFFSET = sring_header.size;

/** Where a slot lives: one object per ring, overwritten by every slot() (and put*, take*, readSlot and writeSlot may call it). */
export type SlotRef = {
  page: Page;
  offset: number;
  /** The entry runs on into the next page: use readSlot/writeSlot, not the page. */
  straddles: boolean;
};

/** The part both halves share: the pages, slot addressing, the broken state. */
class SharedRing {
  readonly size: number;
  /** Set once when the peer breaks the protocol; the ring does nothing afterwards. */
  error: XenError | undefined;
  protected readonly log: Log;
  private readonly mask: number;
  private readonly ref: SlotRef;
  /** Index in `pages` of ref.page. */
  private refPage = 0;
  // The entry that straddles the boundary after page p is copied through
  // bounce, whose two views head[p] and tail[p] are made here, not per copy.
  private readonly bounce: Uint8Array;
  private readonly head: (Uint8Array | undefined)[] = [];
  private readonly tail: (Uint8Array | undefined)[] = [];
  /** The ring's device in this thread's trace (0 when not tracing). */
  protected readonly traceDev: number;
  /** A slot written in place, copied for the trace; made on first use. */
  private traceScratch: Uint8Array | null = null;

  /**
   * `pages` hold the shared area in order, header in pages[0]; `nrEnts` is
   * RING_SIZE, a power of two (use __CONST_RING_SIZE of lib/abi/ring.ts);
   * `type` says what the slots hold (a trace decodes them by it).
   */
  constructor(
    protected readonly pages: readonly Page[],
    readonly entryBytes: number,
    nrEnts: number,
    readonly name: string,
    readonly type: RingType = 'raw',
  ) {
    assert(Number.isInteger(entryBytes) && entryBytes > 0 && entryBytes <= PAGE_SIZE, `ring ${name}: bad entry size ${entryBytes}`);
    assert(Number.isInteger(nrEnts) && nrEnts > 0 && nrEnts <= 2 ** 31 && (nrEnts & (nrEnts - 1)) === 0,
      `ring ${name}: ${nrEnts} entries is not a power of two`);
    const areaBytes = SRING_RING_OFFSET + nrEnts * entryBytes;
    assert(pages.length > 0 && areaBytes <= pages.length * PAGE_SIZE,
      `ring ${name}: ${nrEnts} entries of ${entryBytes} bytes need ${areaBytes} bytes, ${pages.length} pages given`);
    this.size = nrEnts;
    this.mask = nrEnts - 1;
    this.log = logger('ring', name);
    this.ref = { page: pages[0]!, offset: 0, straddles: false };
    this.bounce = new Uint8Array(entryBytes);
    this.traceDev = traceDevice(name);
    for (let i = 0; i < nrEnts; i++) {
      const at = SRING_RING_OFFSET + i * entryBytes;
      const p = Math.floor(at / PAGE_SIZE);
      const headBytes = (p + 1) * PAGE_SIZE - at;
      if (headBytes < entryBytes) {
        this.head[p] = this.bounce.subarray(0, headBytes);
        this.tail[p] = this.bounce.subarray(headBytes);
      }
    }
  }

  /** Byte offset of slot `idx` (a free-running index) in the shared area. */
  slotOffset(idx: number): number {
    return SRING_RING_OFFSET + (idx & this.mask) * this.entryBytes;
  }

  /** RING_GET_REQUEST/RING_GET_RESPONSE: the page and offset of slot `idx`. */
  slot(idx: number): SlotRef {
    const at = this.slotOffset(idx);
    const p = Math.floor(at / PAGE_SIZE);
    this.refPage = p;
    this.ref.page = this.pages[p]!;
    this.ref.offset = at - p * PAGE_SIZE;
    this.ref.straddles = this.ref.offset + this.entryBytes > PAGE_SIZE;
    return this.ref;
  }

  /**
   * Copy bytes [start, end) of slot `idx` into the same bytes of `into`
   * (all of it by default), in two parts if the slot straddles a page.
   * `into` may be shorter than the entry: a slot is a union of request and
   * response, and each side copies only its own struct (a blkif response is
   * 16 bytes of a 112-byte slot), as Linux's memcpy of sizeof(rsp) does.
   */
  readSlot(idx: number, into: Uint8Array, start = 0, end = into.length): void {
    if (end > this.entryBytes || end > into.length) this.badBuffer(end);
    // Most slots lie within a page: no SlotRef to fill in for them.
    const at = this.slotOffset(idx);
    const offset = at & (PAGE_SIZE - 1);
    if (offset + end <= PAGE_SIZE) {
      this.pages[at >> PAGE_SHIFT]!.read(offset + start, into, start, end);
      return;
    }
    const s = this.slot(idx);
    const p = this.refPage;
    s.page.read(s.offset, this.head[p]!);
    this.pages[p + 1]!.read(0, this.tail[p]!);
    for (let i = start; i < end; i++) into[i] = this.bounce[i]!;
  }

  /** Copy the first `end` bytes of `from` (all of it by default, at most entryBytes; see readSlot) into slot `idx`. */
  writeSlot(idx: number, from: Uint8Array, end = from.length): void {
    if (end > this.entryBytes || end > from.length) this.badBuffer(end);
    const at = this.slotOffset(idx);
    const offset = at & (PAGE_SIZE - 1);
    if (offset + end <= PAGE_SIZE) {
      this.pages[at >> PAGE_SHIFT]!.write(offset, from, 0, end);
      return;
    }
    const s = this.slot(idx);
    const p = this.refPage;
    // A shorter struct across the page boundary: the rest of the slot is written back as it was.
    if (end < this.entryBytes) {
      s.page.read(s.offset, this.head[p]!);
      this.pages[p + 1]!.read(0, this.tail[p]!);
    }
    for (let i = 0; i < end; i++) this.bounce[i] = from[i]!;
    s.page.write(s.offset, this.head[p]!);
    this.pages[p + 1]!.write(0, this.tail[p]!);
  }

  // Out of line so the hot path builds no message string.
  private badBuffer(bytes: number): never {
    throw new XenError('EINVAL', `ring ${this.name}: a copy of ${bytes} bytes does not fit its buffer or the ${this.entryBytes}-byte entries`);
  }

  /** Record slot `idx` as it is on the ring now (a slot written in place, then committed). */
  protected traceInPlace(kind: number, idx: number): void {
    const slot = (this.traceScratch ??= new Uint8Array(this.entryBytes));
    this.readSlot(idx, slot);
    traceSlot(kind, this.traceDev, idx, slot);
  }

  /** The four shared indices as the page holds them now (for debug dumps, like Linux's io_ring_q). */
  sharedIndices(): { req_prod: number; req_event: number; rsp_prod: number; rsp_event: number } {
    return { req_prod: this.load(REQ_PROD), req_event: this.load(REQ_EVENT), rsp_prod: this.load(RSP_PROD), rsp_event: this.load(RSP_EVENT) };
  }

  protected load(offset: number): number {
    return this.pages[0]!.load32(offset);
  }

  protected store(offset: number, value: number): void {
    this.pages[0]!.store32(offset, value >>> 0);
  }

  protected fail(message: string): void {
    if (this.error !== undefined) return;
    this.error = new XenError('EPROTO', `ring ${this.name}: ${message}`);
    this.log('broken: %s', message);
    if (tracing) traceText(TraceKind.ringBroken, this.traceDev, message);
  }
}

/**
 * The push half of RING_PUSH_*_AND_CHECK_NOTIFY: publish `next` and say
 * whether the peer's event index lies in (old, next], i.e. it asked to be
 * woken for one of the entries just published.
 */
function pushAndCheck(page: Page, prodOffset: number, eventOffset: number, old: number, next: number): boolean {
  page.store32(prodOffset, next); // seq-cst: entries before the index, the event read after (wmb, mb)
  const event = page.load32(eventOffset);
  return ((next - event) >>> 0) < ((next - old) >>> 0);
}

/** front_ring_t: produces requests, consumes responses. */
export class FrontRing extends SharedRing {
  private reqProdPvt = 0;
  private rspCons = 0;
  /** What we last published as req_prod (ours; never read back from the page). */
  private reqProdPushed = 0;
  /** rsp_prod as last read and checked; responses up to here may be taken. */
  private rspProdSeen = 0;

  /** SHARED_RING_INIT then FRONT_RING_INIT: indices 0, event indices 1. */
  init(): void {
    this.store(REQ_PROD, 0);
    this.store(RSP_PROD, 0);
    this.store(REQ_EVENT, 1);
    this.store(RSP_EVENT, 1);
    for (let off = PVT; off < SRING_RING_OFFSET; off += 4) this.store(off, 0);
    this.attach(0);
  }

  /** FRONT_RING_ATTACH: take over a shared ring whose indices are at `idx`. */
  attach(idx: number): void {
    this.reqProdPvt = this.rspCons = this.reqProdPushed = this.rspProdSeen = idx >>> 0;
    this.error = undefined;
    if (tracing) traceRingAttach(this.traceDev, this.type, this.entryBytes, this.size, false, idx >>> 0);
  }

  get reqProd(): number {
    return this.reqProdPvt;
  }
  get rspConsumed(): number {
    return this.rspCons;
  }

  /** RING_FREE_REQUESTS */
  freeRequests(): number {
    return this.size - ((this.reqProdPvt - this.rspCons) >>> 0);
  }

  /** RING_FULL */
  full(): boolean {
    return this.freeRequests() === 0;
  }

  /**
   * Copy the first `bytes` of `from` (all of it by default) into the next
   * request slot (RING_GET_REQUEST + req_prod_pvt++): a request that uses
   * less of its struct than the whole (a blkif read of one page: 32 of 112
   * bytes) writes what it uses, as a driver filling the slot in place does.
   * False when broken.
   */
  putRequest(from: Uint8Array, bytes = from.length): boolean {
    if (this.error !== undefined) return false;
    assert(!this.full(), 'putRequest on a full ring');
    this.writeSlot(this.reqProdPvt, from, bytes);
    if (tracing) {
      if (bytes === from.length) traceSlot(TraceKind.ringRequestPut, this.traceDev, this.reqProdPvt, from);
      else this.traceInPlace(TraceKind.ringRequestPut, this.reqProdPvt);
    }
    this.reqProdPvt = (this.reqProdPvt + 1) >>> 0;
    return true;
  }

  /** req_prod_pvt++ after writing slot(reqProd) in place. */
  commitRequest(): void {
    assert(!this.full(), 'commitRequest on a full ring');
    if (tracing) this.traceInPlace(TraceKind.ringRequestPut, this.reqProdPvt);
    this.reqProdPvt = (this.reqProdPvt + 1) >>> 0;
  }

  /** RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: true when the back must be signalled. */
  pushRequests(): boolean {
    if (this.error !== undefined) return false;
    const old = this.reqProdPushed;
    this.reqProdPushed = this.reqProdPvt;
    const rec = tracing ? tracePush(TraceKind.ringRequestPush, this.traceDev, this.reqProdPvt) : 0;
    const notify = pushAndCheck(this.pages[0]!, REQ_PROD, REQ_EVENT, old, this.reqProdPvt);
    if (rec !== 0) tracePushed(rec, notify);
    return notify;
  }

  /**
   * RING_HAS_UNCONSUMED_RESPONSES, reading rsp_prod once. The back can only
   * answer requests we pushed, so rsp_prod must lie in [seen, pushed]; a
   * value outside (ahead, or moved backwards) breaks the ring.
   */
  unconsumedResponses(): number {
    if (this.error !== undefined) return 0;
    const prod = this.load(RSP_PROD);
    if (((prod - this.rspProdSeen) >>> 0) > ((this.reqProdPushed - this.rspProdSeen) >>> 0)) {
      this.fail(`rsp_prod ${prod} outside [${this.rspProdSeen}, ${this.reqProdPushed}]`);
      return 0;
    }
    this.rspProdSeen = prod;
    return (prod - this.rspCons) >>> 0;
  }

  /** RING_COPY_RESPONSE + rsp_cons++: false when none is left of the last unconsumedResponses(). */
  takeResponse(into: Uint8Array): boolean {
    if (this.error !== undefined || this.rspCons === this.rspProdSeen) return false;
    this.readSlot(this.rspCons, into);
    if (tracing) traceSlot(TraceKind.ringResponseTake, this.traceDev, this.rspCons, into);
    this.rspCons = (this.rspCons + 1) >>> 0;
    return true;
  }

  /**
   * RING_FINAL_CHECK_FOR_RESPONSES: before sleeping, ask for an event at the
   * next response, then look again so one that raced in is not missed.
   */
  finalCheckForResponses(): boolean {
    if (this.unconsumedResponses() > 0) return true;
    if (this.error !== undefined) return false;
    this.store(RSP_EVENT, this.rspCons + 1);
    return this.unconsumedResponses() > 0;
  }
}

/** back_ring_t: consumes requests, produces responses. */
export class BackRing extends SharedRing {
  private rspProdPvt = 0;
  private reqCons = 0;
  private rspProdPushed = 0;
  /** req_prod as last read and checked; requests up to here may be taken. */
  private reqProdSeen = 0;

  /** BACK_RING_INIT: a fresh ring the front has just initialised. */
  init(): void {
    this.attach(0);
  }

  /**
   * BACK_RING_ATTACH at `idx`, by default the ring's rsp_prod (a reconnect);
   * EPROTO when req_prod is more than a ring ahead of it.
   */
  attach(idx: number = this.load(RSP_PROD)): void {
    this.rspProdPvt = this.reqCons = this.rspProdPushed = this.reqProdSeen = idx >>> 0;
    this.error = undefined;
    if (tracing) traceRingAttach(this.traceDev, this.type, this.entryBytes, this.size, true, idx >>> 0);
    this.unconsumedRequests();
  }

  get rspProd(): number {
    return this.rspProdPvt;
  }
  get reqConsumed(): number {
    return this.reqCons;
  }

  /**
   * RING_HAS_UNCONSUMED_REQUESTS, reading req_prod once: the front cannot be
   * more than a ring ahead of our responses (RING_REQUEST_PROD_OVERFLOW) nor
   * go backwards; either breaks the ring.
   */
  unconsumedRequests(): number {
    if (this.error !== undefined) return 0;
    const prod = this.load(REQ_PROD);
    const limit = (this.rspProdPvt + this.size) >>> 0;
    if (((prod - this.reqProdSeen) >>> 0) > ((limit - this.reqProdSeen) >>> 0)) {
      this.fail(`req_prod ${prod} outside [${this.reqProdSeen}, ${limit}]`);
      return 0;
    }
    this.reqProdSeen = prod;
    const req = (prod - this.reqCons) >>> 0;
    const rsp = this.size - ((this.reqCons - this.rspProdPvt) >>> 0);
    return Math.min(req, rsp);
  }

  /** RING_REQUEST_CONS_OVERFLOW */
  private consOverflow(cons: number): boolean {
    return ((cons - this.rspProdPvt) >>> 0) >= this.size;
  }

  /**
   * RING_COPY_REQUEST + req_cons++ of the first `bytes` of the request (all
   * of `into` by default): false when none is left of the last
   * unconsumedRequests(). A backend whose requests say how long they are
   * copies the head first, then the rest it needs with takeRequestRest.
   */
  takeRequest(into: Uint8Array, bytes = into.length): boolean {
    if (this.error !== undefined || this.reqCons === this.reqProdSeen || this.consOverflow(this.reqCons)) return false;
    this.readSlot(this.reqCons, into, 0, bytes);
    if (tracing) {
      if (bytes === into.length) traceSlot(TraceKind.ringRequestTake, this.traceDev, this.reqCons, into);
      else this.traceInPlace(TraceKind.ringRequestTake, this.reqCons);
    }
    this.reqCons = (this.reqCons + 1) >>> 0;
    return true;
  }

  /**
   * Bytes [start, end) of the request takeRequest took last, into the same
   * bytes of `into`. Each byte is still copied once: the head decided how
   * much more to copy, and nothing copied is read from the ring again. The
   * slot is ours until its response is put.
   */
  takeRequestRest(into: Uint8Array, start: number, end: number): void {
    assert(this.rspProdPvt !== this.reqCons, 'takeRequestRest with no request taken');
    this.readSlot((this.reqCons - 1) >>> 0, into, start, end);
  }

  /** Copy `from` into the next response slot (rsp_prod_pvt++); false when broken. */
  putResponse(from: Uint8Array): boolean {
    if (this.error !== undefined) return false;
    assert(this.rspProdPvt !== this.reqCons, 'putResponse with no request taken to answer');
    this.writeSlot(this.rspProdPvt, from);
    if (tracing) traceSlot(TraceKind.ringResponsePut, this.traceDev, this.rspProdPvt, from);
    this.rspProdPvt = (this.rspProdPvt + 1) >>> 0;
    return true;
  }

  /** rsp_prod_pvt++ after writing slot(rspProd) in place. */
  commitResponse(): void {
    assert(this.rspProdPvt !== this.reqCons, 'commitResponse with no request taken to answer');
    if (tracing) this.traceInPlace(TraceKind.ringResponsePut, this.rspProdPvt);
    this.rspProdPvt = (this.rspProdPvt + 1) >>> 0;
  }

  /** RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: true when the front must be signalled. */
  pushResponses(): boolean {
    if (this.error !== undefined) return false;
    const old = this.rspProdPushed;
    this.rspProdPushed = this.rspProdPvt;
    const rec = tracing ? tracePush(TraceKind.ringResponsePush, this.traceDev, this.rspProdPvt) : 0;
    const notify = pushAndCheck(this.pages[0]!, RSP_PROD, RSP_EVENT, old, this.rspProdPvt);
    if (rec !== 0) tracePushed(rec, notify);
    return notify;
  }

  /**
   * Whether `needed` requests are there to take; if not, ask to be woken by
   * the next one the front publishes (req_event = req_prod + 1) and look
   * again, so one that raced in is not missed. A backend that needs several
   * slots for one packet (netback's xenvif_rx_ring_slots_available) sleeps
   * on this instead of RING_FINAL_CHECK_FOR_REQUESTS, which only asks for one.
   */
  requestsAvailable(needed: number): boolean {
    for (;;) {
      if (this.unconsumedRequests() >= needed) return true;
      if (this.error !== undefined) return false;
      const prod = this.reqProdSeen;
      this.store(REQ_EVENT, prod + 1);
      if (this.load(REQ_PROD) === prod) return false;
    }
  }

  /** RING_FINAL_CHECK_FOR_REQUESTS */
  finalCheckForRequests(): boolean {
    if (this.unconsumedRequests() > 0) return true;
    if (this.error !== undefined) return false;
    this.store(REQ_EVENT, this.reqCons + 1);
    return this.unconsumedRequests() > 0;
  }
}
