// The xenstore_domain_interface page: two 1 KiB byte rings, `req` from the
// guest to xenstored and `rsp` back, with free-running u32 indices. One class
// serves both ends: the front (guest) produces into req and consumes rsp, the
// back (xenstored) the mirror. Each end frames its input with XsDecoder and
// queues its output when the ring is full.
//
// Only the peer's indices are read from the page; our own live in private
// shadows, so a peer scribbling on them cannot make us read or write outside
// what we produced. A peer index more than a ring away from ours is a
// protocol error: the end stops, reports it once, and never loops on it.

import { offsetOf } from '../abi/layout.js';
import {
  XENSTORE_PAYLOAD_MAX,
  XENSTORE_ERROR_NONE,
  XENSTORE_ERROR_PROTO,
  XENSTORE_ERROR_RINGIDX,
  XENSTORE_RING_SIZE,
  XENSTORE_SERVER_FEATURE_ERROR,
  XENSTORE_SERVER_FEATURE_RECONNECTION,
  XENSTORE_CONNECTED,
  XENSTORE_RECONNECT,
  xenstore_domain_interface as intf,
} from '../abi/xs_wire.js';
import { XenError } from '../errors.js';
import type { Page } from '../hypervisor/page.js';
import { logger, type Log } from '../log.js';
import { XS_HDR_SIZE, XsDecoder, encodeInto, type XsMessage } from './wire.js';
import { TraceKind, traceDevice, traceXs, tracing } from '../trace/trace.js';

export type XsRingSide = 'front' | 'back';

export type XsRingOptions = {
  page: Page;
  side: XsRingSide;
  /** Signal the peer (the event channel); called once per batch that moved bytes. */
  notify: () => void;
  /** Each whole message from the peer, in order. */
  deliver: (msg: XsMessage) => void;
  /** Called once when the peer breaks the protocol; the ring is dead afterwards. */
  broken?: ((err: XenError) => void) | undefined;
  /**
   * Output bytes waiting for ring space above which send() reports backlog
   * and input is not read (xenstored uses this to stop taking requests from
   * a guest that does not read its responses).
   */
  highWaterBytes?: number | undefined;
  /** Messages waiting for ring space above which the same happens (C quota_req_outstanding). */
  highWaterMessages?: number | undefined;
  /** Called when the backlog falls back under the high-water mark. */
  drained?: (() => void) | undefined;
  /** Hard bound on queued output; exceeding it is the owner's bug. */
  maxQueuedBytes?: number | undefined;
  /**
   * Back end only: the guest asked to reconnect (connection = XENSTORE_RECONNECT).
   * The owner drops the connection's state; the ring then starts again from zero.
   */
  reconnect?: (() => void) | undefined;
  log?: Log | undefined;
  /** The ring's device name in a trace; "xenstore" by default. */
  traceName?: string | undefined;
};

const RING_MASK = XENSTORE_RING_SIZE - 1;
const REQ = offsetOf(intf, 'req');
const RSP = offsetOf(intf, 'rsp');
const REQ_CONS = offsetOf(intf, 'req_cons');
const REQ_PROD = offsetOf(intf, 'req_prod');
const RSP_CONS = offsetOf(intf, 'rsp_cons');
const RSP_PROD = offsetOf(intf, 'rsp_prod');
const SERVER_FEATURES = offsetOf(intf, 'server_features');
const ERROR = offsetOf(intf, 'error');
const CONNECTION = offsetOf(intf, 'connection');

if ((XENSTORE_RING_SIZE & RING_MASK) !== 0) throw new Error('xenstore: ring size must be a power of two');

/** Where one end finds its two rings and four indices. */
type Geometry = { out: number; outProd: number; outCons: number; in: number; inProd: number; inCons: number };

const FRONT: Geometry = { out: REQ, outProd: REQ_PROD, outCons: REQ_CONS, in: RSP, inProd: RSP_PROD, inCons: RSP_CONS };
const BACK: Geometry = { out: RSP, outProd: RSP_PROD, outCons: RSP_CONS, in: REQ, inProd: REQ_PROD, inCons: REQ_CONS };

export class XsRing {
  error: XenError | undefined;
  private readonly page: Page;
  private readonly side: XsRingSide;
  private readonly geo: Geometry;
  private readonly opts: XsRingOptions;
  private readonly log: Log;
  private readonly decoder = new XsDecoder();
  private readonly scratch = new Uint8Array(XENSTORE_RING_SIZE);
  /** Where send() encodes a message; only what does not fit on the ring is copied out to the queue. */
  private readonly outScratch = new Uint8Array(XS_HDR_SIZE + XENSTORE_PAYLOAD_MAX);
  private readonly outView = new DataView(this.outScratch.buffer);
  private readonly highWater: number;
  private readonly highWaterMessages: number;
  private readonly maxQueued: number;
  private outProd: number;
  private inCons: number;
  private readonly queue: Uint8Array[] = [];
  private queueHead = 0;
  private queuedBytes = 0;
  private wasBacklogged = false;
  private busy = false;
  private again = false;
  private moved = false;
  private readonly traceDev: number;

  constructor(opts: XsRingOptions) {
    this.opts = opts;
    this.page = opts.page;
    this.side = opts.side;
    this.geo = opts.side === 'front' ? FRONT : BACK;
    this.log = opts.log ?? logger('xenstore', `ring-${opts.side}`);
    this.highWater = opts.highWaterBytes ?? Infinity;
    this.highWaterMessages = opts.highWaterMessages ?? Infinity;
    this.maxQueued = opts.maxQueuedBytes ?? 1 << 20;
    this.traceDev = traceDevice(opts.traceName ?? 'xenstore');
    // Start where the indices stand: the page may have been in use before.
    this.outProd = this.page.load32(this.geo.outProd);
    this.inCons = this.page.load32(this.geo.inCons);
    if (opts.side === 'back') {
      const features = this.page.load32(SERVER_FEATURES);
      const ours = XENSTORE_SERVER_FEATURE_ERROR | (opts.reconnect === undefined ? 0 : XENSTORE_SERVER_FEATURE_RECONNECTION);
      this.page.store32(SERVER_FEATURES, (features | ours) >>> 0);
    }
  }

  private overHighWater(): boolean {
    return this.queuedBytes > this.highWater || this.queue.length - this.queueHead >= this.highWaterMessages;
  }

  /** Output bytes not yet on the ring. */
  get backlogBytes(): number {
    return this.queuedBytes;
  }

  /**
   * Queue one message and push what fits. Returns false while the backlog is
   * over the high-water mark; `drained` is called when it falls back.
   */
  send(msg: XsMessage): boolean {
    if (this.error !== undefined) return false;
    if (tracing) traceXs(TraceKind.xsOut, this.traceDev, this.side === 'front', msg.type, msg.req_id, msg.tx_id, msg.payload);
    const length = encodeInto(msg, this.outScratch, this.outView);
    if (this.queuedBytes + length > this.maxQueued) {
      throw new XenError('ENOSPC', `xenstore ring output queue over ${this.maxQueued} bytes`);
    }
    // Behind queued output the message waits its turn; otherwise what fits goes on the ring now.
    const put = this.queueHead === this.queue.length ? this.put(this.outScratch, length) : 0;
    if (this.error !== undefined) return false;
    if (put < length) {
      this.queue.push(this.outScratch.slice(put, length));
      this.queuedBytes += length - put;
    }
    // Inside intr() the pump flushes after each delivery and signals once at
    // the end. Outside it, only flush: reading input here would run the
    // peer's requests re-entrantly inside whatever made us send (xenstored
    // firing a watch, say).
    if (!this.busy) {
      this.flush();
      this.kick();
    }
    return !this.overHighWater();
  }

  /** The owner calls this when the event channel fires (and may call it any time); false when there was nothing to do. */
  intr(): boolean {
    if (this.error !== undefined) return false;
    if (this.side === 'front') this.checkServerError();
    else if (this.opts.reconnect !== undefined && this.page.load32(CONNECTION) === XENSTORE_RECONNECT) this.resetRing();
    if (this.busy) {
      this.again = true;
      return true;
    }
    const before = this.outProd + this.inCons;
    this.busy = true;
    try {
      do {
        this.again = false;
        this.pump();
      } while (this.again && this.error === undefined);
    } finally {
      this.busy = false;
    }
    this.kick();
    // Nothing taken or put: the event was spurious (a reconnect resets both indices, which counts).
    return this.outProd + this.inCons !== before || this.error !== undefined;
  }

  /** Stop using the page; later events and sends are ignored. */
  close(): void {
    if (this.error === undefined) this.error = new XenError('ESHUTDOWN', 'xenstore ring closed');
    this.queue.length = 0;
    this.queueHead = 0;
    this.queuedBytes = 0;
  }

  private pump(): void {
    this.flush();
    while (this.error === undefined && !this.overHighWater()) {
      // At most the rest of one header or payload: each turn completes at most one message.
      const n = this.get(this.decoder.wanted());
      if (n === 0) break;
      const msg = this.decoder.take(this.scratch, 0, n);
      if (this.decoder.error !== undefined) {
        this.fail(this.decoder.error, XENSTORE_ERROR_PROTO);
        return;
      }
      if (msg === undefined) continue;
      this.deliverOne(msg);
      this.flush();
      this.kick();
    }
  }

  private deliverOne(msg: XsMessage): void {
    if (tracing) traceXs(TraceKind.xsIn, this.traceDev, this.side === 'back', msg.type, msg.req_id, msg.tx_id, msg.payload);
    try {
      this.opts.deliver(msg);
    } catch (err) {
      // The owner's bug, not the peer's: keep the stream in step.
      this.log('deliver of type %d req_id %d threw: %O', msg.type, msg.req_id, err);
    }
  }

  private flush(): void {
    while (this.error === undefined && this.queueHead < this.queue.length) {
      const head = this.queue[this.queueHead];
      if (head === undefined) break;
      const n = this.put(head, head.length);
      if (n === head.length) {
        this.queueHead++;
      } else if (n > 0) {
        this.queue[this.queueHead] = head.subarray(n);
      }
      this.queuedBytes -= n;
      if (n < head.length) break;
    }
    if (this.queueHead !== 0 && this.queueHead === this.queue.length) {
      this.queue.length = 0;
      this.queueHead = 0;
    }
  }

  /** Signal the peer once for everything moved since the last signal. */
  private kick(): void {
    if (this.moved && this.error === undefined) {
      this.moved = false;
      this.opts.notify();
    }
    this.checkDrained();
  }

  private checkDrained(): void {
    const over = this.overHighWater();
    if (this.wasBacklogged && !over && this.error === undefined) {
      this.wasBacklogged = false;
      this.opts.drained?.();
    } else if (over) {
      this.wasBacklogged = true;
    }
  }

  /** Copy as much of `bytes` [0, length) as fits into the out ring (OpenBSD xs_ring_put; xenstored writechn). */
  private put(bytes: Uint8Array, length: number): number {
    const cons = this.page.load32(this.geo.outCons);
    const used = (this.outProd - cons) >>> 0;
    if (used > XENSTORE_RING_SIZE) {
      this.fail(new XenError('EPROTO', `peer consumer index ${cons} is ${used} bytes behind producer ${this.outProd}`), XENSTORE_ERROR_RINGIDX);
      return 0;
    }
    const size = Math.min(length, XENSTORE_RING_SIZE - used);
    if (size === 0) return 0;
    const at = this.outProd & RING_MASK;
    const first = Math.min(size, XENSTORE_RING_SIZE - at);
    this.page.write(this.geo.out + at, bytes, 0, first);
    if (size > first) this.page.write(this.geo.out, bytes, first, size);
    this.outProd = (this.outProd + size) >>> 0;
    // The bytes are in place before the index that publishes them (seq-cst store).
    this.page.store32(this.geo.outProd, this.outProd);
    this.moved = true;
    return size;
  }

  /** Copy up to `want` bytes from the in ring into scratch (OpenBSD xs_ring_get; xenstored readchn). */
  private get(want: number): number {
    const prod = this.page.load32(this.geo.inProd);
    const avail = (prod - this.inCons) >>> 0;
    if (avail > XENSTORE_RING_SIZE) {
      this.fail(new XenError('EPROTO', `peer producer index ${prod} is ${avail} bytes ahead of consumer ${this.inCons}`), XENSTORE_ERROR_RINGIDX);
      return 0;
    }
    const size = Math.min(avail, want, XENSTORE_RING_SIZE);
    if (size === 0) return 0;
    const at = this.inCons & RING_MASK;
    const first = Math.min(size, XENSTORE_RING_SIZE - at);
    this.page.read(this.geo.in + at, this.scratch, 0, first);
    if (size > first) this.page.read(this.geo.in, this.scratch, first, size);
    this.inCons = (this.inCons + size) >>> 0;
    this.page.store32(this.geo.inCons, this.inCons);
    this.moved = true;
    return size;
  }

  /**
   * xenstore-ring.txt reconnection, as C xenstored's domain_conn_reset: drop
   * what was in flight, zero the four indices and the error, mark the ring
   * connected again and tell the guest.
   */
  private resetRing(): void {
    this.opts.reconnect?.();
    this.queue.length = 0;
    this.queueHead = 0;
    this.queuedBytes = 0;
    this.decoder.reset();
    this.outProd = 0;
    this.inCons = 0;
    for (const at of [REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD, ERROR]) this.page.store32(at, 0);
    this.page.store32(CONNECTION, XENSTORE_CONNECTED);
    this.log('reconnected at the guest\'s request');
    this.opts.notify();
  }

  /** A server with XENSTORE_SERVER_FEATURE_ERROR says it gave up on us: stop rather than time out. */
  private checkServerError(): void {
    if ((this.page.load32(SERVER_FEATURES) & XENSTORE_SERVER_FEATURE_ERROR) === 0) return;
    const code = this.page.load32(ERROR);
    if (code !== XENSTORE_ERROR_NONE) this.fail(new XenError('EIO', `xenstored reports ring error ${code}`), code);
  }

  private fail(err: XenError, code: number): void {
    if (this.error !== undefined) return;
    this.error = err;
    this.log('%s end broken: %s', this.side, err.message);
    // Tell a guest that knows XENSTORE_SERVER_FEATURE_ERROR why we stopped.
    if (this.side === 'back' && this.page.writable) this.page.store32(ERROR, code);
    this.queue.length = 0;
    this.queueHead = 0;
    this.queuedBytes = 0;
    this.opts.broken?.(err);
  }
}
