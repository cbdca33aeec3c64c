// xnf(4): the Xen network frontend, after OpenBSD sys/dev/pv/if_xnf.c in
// shape and Linux drivers/net/xen-netfront.c in features. Per queue one TX
// and one RX ring (io/netif.h, one page each), one event channel or a split
// pair, and a page of dmamem per ring slot, all made at attach time and
// shared only through the Xen bus_dma tag (sc.dmat): a grant ref sits where
// the physical address was.
//
// TX: a frame is copied into the pages of free buffer ids, one page per slot
// (feature-sg: up to XEN_NETIF_NR_SLOTS_MIN slots, 65535 bytes), the first
// slot carrying the total size and the checksum flags, a GSO extra slot after
// it. RX: slot i always holds buffer i (netif.h: a response sits in the slot
// of its request), so a response's id must be its slot's; a frame is handed
// up as a view of its page, or of its pages when they lie one after another
// (attach allocates the buffers in order), else gathered into a buffer of
// the queue. Every response is copied once off the ring and
// checked; a violation breaks the interface (logged, ENETDOWN from then on),
// never throws out of the interrupt.
//
// `trusted` (device/vif/N/trusted, default 1): a trusted backend keeps its
// grants on the buffers for the life of the queue. With 0 every frame goes
// through a zeroed whole page granted for that frame alone and revoked when
// it is done, so the backend sees nothing else (XSA-403).

import {
  NETIF_RSP_DROPPED, NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, netifOffsets, NETRXF_csum_blank,
  NETRXF_data_validated, NETRXF_extra_info, NETRXF_more_data, NETTXF_csum_blank, NETTXF_data_validated,
  NETTXF_extra_info, NETTXF_more_data, XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_EXTRA_TYPE_MAX,
  XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL, XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6,
  XEN_NETIF_MAX_TX_SIZE, XEN_NETIF_NR_SLOTS_MIN,
} from '../../abi/netif.js';
import { __CONST_RING_SIZE, netif_rx_sring, netif_rx_sring_entry, netif_tx_sring, netif_tx_sring_entry } from '../../abi/ring.js';
import { XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitWait } from '../../abi/xenbus.js';
import {
  BUS_DMA_READ, BUS_DMA_WRITE, BUS_DMA_ZERO, BUS_DMASYNC_POSTREAD, BUS_DMASYNC_POSTWRITE, BUS_DMASYNC_PREREAD,
  BUS_DMASYNC_PREWRITE, busDmaDomid, type DmaKva, type DmaSegment, type XenDmaMap,
} from '../../busdma/busdma.js';
import { XenError } from '../../errors.js';
import { ETHER_ADDR_LEN, ETHER_HDR_LEN, ETHERTYPE_IPV6, fillChecksum, flowHash, formatMac, parseMac } from '../../ether.js';
import type { IntrHandle } from '../../evtchn/evtchn.js';
import { copyBytes, FramePage, PAGE_SIZE, zeroBytes } from '../../hypervisor/page.js';
import { logger, type Log } from '../../log.js';
import { TraceKind, traceBytes, traceDevice, tracing, type RingType } from '../../trace/trace.js';
import { FrontRing } from '../../xen/ring.js';
import type { XenDevice, XenDriver, XenSoftc } from '../../xen/xen.js';
import type { XsWatch } from '../../xenstore/xenstore.js';

// --- wire layouts ------------------------------------------------------------

const XNF_TX_DESC = __CONST_RING_SIZE(netif_tx_sring, PAGE_SIZE);
const XNF_RX_DESC = __CONST_RING_SIZE(netif_rx_sring, PAGE_SIZE);
/** Data slots of one frame, either way (XEN_NETIF_NR_SLOTS_MIN: what every backend takes). */
const XNF_FRAG = XEN_NETIF_NR_SLOTS_MIN;
const XNF_MAX_QUEUES = 8;
const XNF_MAX_WAITERS = 1024;
/** RX buffers go back to the ring every this many responses taken, not only at the end of a batch. */
const XNF_RX_REFILL_BATCH = 64;
const XNF_CONNECT_TIMEOUT_MS = 30_000;
/** How long a suspend or a clean shutdown waits for the TX rings to be answered (Linux's xenbus_dev_shutdown waits 5 s for its backend). */
const XNF_DRAIN_MS = 5_000;
/** How long all rounds of reconnecting to a restarted backend may take together. */
const XNF_RECONNECT_TIMEOUT_MS = 60_000;
const ETH_DATA_LEN = 1500;
const ETH_MIN_MTU = 68;
/** Linux netfront's ceiling with feature-sg: the largest frame less its header. */
const XNF_MAX_MTU = XEN_NETIF_MAX_TX_SIZE - ETHER_HDR_LEN;
const TX_BYTES = netif_tx_sring_entry.size;
const RX_BYTES = netif_rx_sring_entry.size;

const {
  TXQ_GREF, TXQ_OFFSET, TXQ_FLAGS, TXQ_ID, TXQ_SIZE, TXP_ID, TXP_STATUS, RXQ_ID, RXQ_GREF, RXP_ID, RXP_OFFSET,
  RXP_FLAGS, RXP_STATUS, EXT_TYPE, EXT_FLAGS, EXT_GSO_SIZE, EXT_GSO_TYPE, EXT_MCAST_ADDR
} = netifOffsets;

/** Offload a sender asks for: the checksum left blank for the peer, or a TCP frame to be cut into gsoSize segments. */
export type XnfTxOffload = { csumBlank?: boolean; gsoType?: number; gsoSize?: number };

/** What came with a received frame; one object per interface, rewritten for every frame. */
export type XnfRxInfo = { queue: number; csumBlank: boolean; dataValidated: boolean; gsoType: number; gsoSize: number };

export type XnfCounters = {
  rxPackets: number; rxBytes: number; rxDropped: number; rxErrors: number;
  txPackets: number; txBytes: number; txDropped: number; txErrors: number;
};

// --- softc -------------------------------------------------------------------

/** One page of dmamem with the map that grants it (OpenBSD's sc_tx_dmap[i] and its mbuf). */
type XnfBuf = {
  id: number;
  segs: DmaSegment[];
  kva: DmaKva;
  map: XenDmaMap;
  /** The whole page, as the driver writes and reads it. */
  page: Uint8Array;
  /** TX: the id is on the ring. */
  busy: boolean;
  /** RX: the last frame view handed up, kept while frames repeat its offset and length. */
  view: Uint8Array;
  viewOffset: number;
};

type XnfRingMem = { segs: DmaSegment[]; kva: DmaKva; map: XenDmaMap; ring: FrontRing; ref: number };

type TxWaiter = {
  frame: Uint8Array;
  offload: XnfTxOffload | undefined;
  resolve: () => void;
  reject: (e: XenError) => void;
  /** The bound on the wait, cleared when the frame goes out or fails. */
  timer: NodeJS.Timeout;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | null;
};

/** How long a frame waits for ring space by default: the backend answers, or the send fails. */
const XNF_SEND_TIMEOUT_MS = 30_000;

/** A wait for ring space: bounded, and abortable. */
export type XnfSendWait = { timeoutMs?: number | undefined; signal?: AbortSignal | undefined };

const RESOLVED: Promise<void> = Promise.resolve();

/** A TX/RX ring pair with its event channel(s) and buffers: Linux's netfront_queue. */
export class XnfQueue {
  readonly name: string;
  tx: XnfRingMem | null = null;
  rx: XnfRingMem | null = null;
  txIh: IntrHandle | null = null;
  /** Same as txIh unless event channels are split. */
  rxIh: IntrHandle | null = null;
  readonly txBufs: XnfBuf[] = [];
  readonly rxBufs: XnfBuf[] = [];
  /** Stack of free TX ids. */
  readonly txFree = new Int32Array(XNF_TX_DESC);
  txFreeCount = 0;
  /** NETIF_RSP_NULL responses still owed for extra slots we sent. */
  nullOwed = 0;
  readonly waiters: TxWaiter[] = [];
  /** Multicast requests waiting for their TX response, by id. */
  readonly mcastDone = new Map<number, (status: number) => void>();
  // The RX frame being gathered across slots (and across interrupts).
  /** Data slots of the frame so far; its extra slots are counted apart (netfront's slots and xennet_get_extras). */
  rxSlots = 0;
  rxExtraSlots = 0;
  rxLen = 0;
  rxFlags = 0;
  rxBad = false;
  rxExtras = false;
  rxMoreAfterExtras = false;
  rxGsoType = 0;
  rxGsoSize = 0;
  /** The frame's data pieces so far: buffer (slot), offset and length. */
  readonly pieceSlot = new Int32Array(XNF_FRAG);
  readonly pieceOffset = new Int32Array(XNF_FRAG);
  readonly pieceLen = new Int32Array(XNF_FRAG);
  rxPieces = 0;
  /** Pieces already copied into gather, and their bytes (see rxFrame). */
  rxCopied = 0;
  rxCopiedBytes = 0;
  readonly gather = new Uint8Array(XEN_NETIF_MAX_TX_SIZE + 1);
  readonly txReq = new Uint8Array(TX_BYTES);
  readonly txReqView = new DataView(this.txReq.buffer);
  readonly txRsp = new Uint8Array(TX_BYTES);
  readonly txRspView = new DataView(this.txRsp.buffer);
  readonly rxReq = new Uint8Array(RX_BYTES);
  readonly rxReqView = new DataView(this.rxReq.buffer);
  readonly rxRsp = new Uint8Array(RX_BYTES);
  readonly rxRspView = new DataView(this.rxRsp.buffer);

  constructor(
    readonly xnf: XnfSoftc,
    readonly id: number,
  ) {
    this.name = `${xnf.name}-q${id}`;
  }
}

export class XnfSoftc {
  readonly name: string;
  readonly log: Log;
  readonly devid: number;
  readonly mac = new Uint8Array(ETHER_ADDR_LEN);
  mtu = ETH_DATA_LEN;
  trusted = true;
  // Backend capabilities (OpenBSD's sc_caps).
  capSg = false;
  capCsum4 = true;
  capCsum6 = false;
  capGso4 = false;
  capGso6 = false;
  capMcast = false;
  capSplit = false;
  maxQueues = 1;
  readonly queues: XnfQueue[] = [];
  /** Set once: the backend broke the protocol, or the interface was detached. */
  error: XenError | null = null;
  /** The backend is Connected and the interface not broken. */
  up = false;
  /** Times the interface connected again after its backend restarted. */
  reconnects = 0;
  /** The reconnection under way (null when none), and whether detach has begun. */
  recovery: Promise<void> | null = null;
  detached = false;
  readonly counters: XnfCounters = {
    rxPackets: 0, rxBytes: 0, rxDropped: 0, rxErrors: 0, txPackets: 0, txBytes: 0, txDropped: 0, txErrors: 0,
  };
  /** if_input: every received frame; the view is valid only during the call. */
  input: ((frame: Uint8Array, info: XnfRxInfo) => void) | null = null;
  /** Link went up or down. */
  onLink: ((up: boolean) => void) | null = null;
  readonly rxInfo: XnfRxInfo = { queue: 0, csumBlank: false, dataValidated: false, gsoType: 0, gsoSize: 0 };
  stateWatch: XsWatch | null = null;
  readonly dmaDomid: number;
  private readonly drainWaiters: Array<() => void> = [];
  private readonly txScratch = new Uint8Array(XEN_NETIF_MAX_TX_SIZE);

  constructor(
    readonly sc: XenSoftc,
    readonly dev: XenDevice,
  ) {
    this.name = `xnf${dev.unit}`;
    this.log = logger('xnf', this.name);
    this.devid = Number(dev.unit);
    this.dmaDomid = busDmaDomid(dev.backendId);
  }

  /** Largest frame send() takes: the MTU plus the Ethernet header, or 65535 for a GSO frame. */
  maxFrame(gso: boolean): number {
    return gso && this.capSg ? XEN_NETIF_MAX_TX_SIZE : this.mtu + ETHER_HDR_LEN;
  }

  // --- datapath: start / encap ---------------------------------------------------

  /**
   * xnf_start for one frame: copy it onto a queue's ring now, or once slots
   * free up. Rejects EINVAL (shorter than a header), EMSGSIZE, ENETDOWN,
   * ENOBUFS (too many senders waiting), and for a frame that waited for ring
   * space ETIMEDOUT (30 s by default) or ECANCELED. A waiting frame is copied
   * before the promise resolves; the caller must not change it until then.
   */
  send(frame: Uint8Array, offload?: XnfTxOffload, wait?: XnfSendWait): Promise<void> {
    const err = this.checkFrame(frame, offload);
    if (err !== null) return Promise.reject(err);
    const nq = this.queues.length;
    const q = this.queues[nq === 1 ? 0 : flowHash(frame) % nq]!;
    if (q.waiters.length === 0 && this.encap(q, frame, offload)) return RESOLVED;
    if (q.waiters.length >= XNF_MAX_WAITERS) return Promise.reject(new XenError('ENOBUFS', `${this.name}: ${XNF_MAX_WAITERS} frames waiting`));
    if (wait?.signal?.aborted === true) return Promise.reject(new XenError('ECANCELED', `${this.name}: send aborted`));
    return new Promise((resolve, reject) => {
      const w: TxWaiter = {
        frame, offload, resolve, reject, signal: wait?.signal, onAbort: null,
        timer: setTimeout(() => this.dropWaiter(q, w, new XenError('ETIMEDOUT', `${this.name}: no ring space in ${wait?.timeoutMs ?? XNF_SEND_TIMEOUT_MS} ms`)),
          wait?.timeoutMs ?? XNF_SEND_TIMEOUT_MS),
      };
      if (w.signal !== undefined) {
        w.onAbort = () => this.dropWaiter(q, w, new XenError('ECANCELED', `${this.name}: send aborted`));
        w.signal.addEventListener('abort', w.onAbort, { once: true });
      }
      q.waiters.push(w);
    });
  }

  /** A waiting frame leaves the queue unsent. */
  private dropWaiter(q: XnfQueue, w: TxWaiter, err: XenError): void {
    const i = q.waiters.indexOf(w);
    if (i < 0) return;
    q.waiters.splice(i, 1);
    this.settleWaiter(w, err);
  }

  /** Resolve (err null) or reject a waiter, and let go of its timer and signal. */
  private settleWaiter(w: TxWaiter, err: XenError | null): void {
    clearTimeout(w.timer);
    if (w.onAbort !== null) w.signal?.removeEventListener('abort', w.onAbort);
    if (err === null) w.resolve();
    else w.reject(err);
  }

  private checkFrame(frame: Uint8Array, offload: XnfTxOffload | undefined): XenError | null {
    if (this.error !== null) return this.error;
    if (!this.up) return new XenError('ENETDOWN', `${this.name}: link is down`);
    if (!(frame instanceof Uint8Array) || frame.length < ETHER_HDR_LEN) {
      return new XenError('EINVAL', `${this.name}: a frame is at least ${ETHER_HDR_LEN} bytes`);
    }
    const gso = offload?.gsoType !== undefined && offload.gsoType !== 0;
    if (gso) {
      const type = offload.gsoType;
      const ok = (type === XEN_NETIF_GSO_TYPE_TCPV4 && this.capGso4) || (type === XEN_NETIF_GSO_TYPE_TCPV6 && this.capGso6);
      const size = offload.gsoSize ?? 0;
      if (!ok && frame.length > this.mtu + ETHER_HDR_LEN) return new XenError('EMSGSIZE', `${this.name}: the backend takes no GSO type ${type}`);
      if (ok && (!Number.isInteger(size) || size < 1 || size > 0xffff)) return new XenError('EINVAL', `${this.name}: GSO size ${size}`);
    }
    if (frame.length > this.maxFrame(gso)) {
      return new XenError('EMSGSIZE', `${this.name}: ${frame.length} bytes exceed ${this.maxFrame(gso)}`);
    }
    return null;
  }

  /** xnf_encap: false when the queue has too few ids or slots now. */
  encap(q: XnfQueue, frame: Uint8Array, offload: XnfTxOffload | undefined): boolean {
    const ring = q.tx!.ring;
    const len = frame.length;
    const slots = len <= PAGE_SIZE ? 1 : Math.ceil(len / PAGE_SIZE);
    const gso = this.gsoOf(offload);
    if (q.txFreeCount < slots || ring.freeRequests() < slots + (gso !== 0 ? 1 : 0)) return false;
    let flags = 0;
    if (offload?.csumBlank === true) {
      if (this.backendCompletes(frame)) flags = NETTXF_csum_blank | NETTXF_data_validated;
      else frame = this.softChecksum(frame);
    }
    for (let i = 0, off = 0; i < slots; i++, off += PAGE_SIZE) {
      const n = Math.min(PAGE_SIZE, len - off);
      const buf = this.txLoad(q, frame, off, n);
      let f = i + 1 < slots ? NETTXF_more_data : 0;
      if (i === 0) f |= flags | (gso !== 0 ? NETTXF_extra_info : 0);
      this.putTxRequest(q, buf, f, i === 0 ? len : n);
      if (i === 0 && gso !== 0) this.putGsoExtra(q, gso, offload!.gsoSize!);
    }
    if (ring.pushRequests()) this.sc.intr.intrSignal(q.txIh!);
    this.counters.txPackets++;
    this.counters.txBytes += len;
    if (tracing) traceBytes(TraceKind.frame, traceDevice(this.name), 0, len, frame, 0, len);
    return true;
  }

  private gsoOf(offload: XnfTxOffload | undefined): number {
    const type = offload?.gsoType ?? 0;
    if (type === XEN_NETIF_GSO_TYPE_TCPV4 && this.capGso4) return type;
    if (type === XEN_NETIF_GSO_TYPE_TCPV6 && this.capGso6) return type;
    return 0;
  }

  /** Whether the backend takes this frame's checksum blank (IPv6 needs feature-ipv6-csum-offload). */
  private backendCompletes(frame: Uint8Array): boolean {
    const v6 = ((frame[12]! << 8) | frame[13]!) === ETHERTYPE_IPV6;
    return v6 ? this.capCsum6 : this.capCsum4;
  }

  /** It does not: complete the checksum on a private copy (the caller's frame stays as it was). */
  private softChecksum(frame: Uint8Array): Uint8Array {
    const copy = this.txScratch.subarray(0, frame.length);
    copyBytes(copy, 0, frame, 0, frame.length);
    fillChecksum(copy);
    return copy;
  }

  /** Take a free id, copy `n` bytes of the frame from `off` into its page, and grant it if untrusted. */
  private txLoad(q: XnfQueue, frame: Uint8Array, off: number, n: number): XnfBuf {
    const id = q.txFree[--q.txFreeCount]!;
    const buf = q.txBufs[id]!;
    copyBytes(buf.page, 0, frame, off, off + n);
    const dmat = this.sc.dmat;
    if (!this.trusted) {
      zeroBytes(buf.page, n, PAGE_SIZE);
      dmat.dmamapLoadRaw(buf.map, buf.segs, PAGE_SIZE, this.dmaDomid | BUS_DMA_WRITE);
    }
    dmat.dmamapSync(buf.map, 0, PAGE_SIZE, BUS_DMASYNC_PREWRITE);
    buf.busy = true;
    return buf;
  }

  private putTxRequest(q: XnfQueue, buf: XnfBuf, flags: number, size: number): void {
    const v = q.txReqView;
    v.setUint32(TXQ_GREF, buf.map.dm_segs[0]!.ds_addr, true);
    v.setUint16(TXQ_OFFSET, 0, true);
    v.setUint16(TXQ_FLAGS, flags, true);
    v.setUint16(TXQ_ID, buf.id, true);
    v.setUint16(TXQ_SIZE, size, true);
    q.tx!.ring.putRequest(q.txReq);
  }

  private putGsoExtra(q: XnfQueue, type: number, size: number): void {
    q.txReq.fill(0);
    q.txReq[EXT_TYPE] = XEN_NETIF_EXTRA_TYPE_GSO;
    q.txReq[EXT_FLAGS] = 0;
    q.txReqView.setUint16(EXT_GSO_SIZE, size, true);
    q.txReq[EXT_GSO_TYPE] = type;
    q.nullOwed++;
    q.tx!.ring.putRequest(q.txReq);
  }

  /**
   * Ask the backend to pass (add) or stop passing (del) multicast frames to
   * `mac`: a dummy TX request carrying an MCAST_ADD/DEL extra (netif.h).
   * Resolves once the backend answered; EIO if it refused.
   */
  async multicast(mac: Uint8Array, add: boolean): Promise<void> {
    if (this.error !== null) throw this.error;
    if (!this.capMcast) throw new XenError('EOPNOTSUPP', `${this.name}: the backend has no feature-multicast-control`);
    if (mac.length !== ETHER_ADDR_LEN || (mac[0]! & 1) === 0) throw new XenError('EINVAL', `${this.name}: ${formatMac(mac)} is not a multicast address`);
    const q = this.queues[0]!;
    const ring = q.tx!.ring;
    if (q.txFreeCount < 1 || ring.freeRequests() < 2) throw new XenError('ENOBUFS', `${this.name}: TX ring full`);
    const id = q.txFree[--q.txFreeCount]!;
    const buf = q.txBufs[id]!;
    buf.busy = true;
    const status = new Promise<number>((resolve) => q.mcastDone.set(id, resolve));
    const v = q.txReqView;
    q.txReq.fill(0);
    v.setUint16(TXQ_FLAGS, NETTXF_extra_info, true);
    v.setUint16(TXQ_ID, id, true);
    ring.putRequest(q.txReq);
    q.txReq.fill(0);
    q.txReq[EXT_TYPE] = add ? XEN_NETIF_EXTRA_TYPE_MCAST_ADD : XEN_NETIF_EXTRA_TYPE_MCAST_DEL;
    q.txReq.set(mac, EXT_MCAST_ADDR);
    q.nullOwed++;
    ring.putRequest(q.txReq);
    if (ring.pushRequests()) this.sc.intr.intrSignal(q.txIh!);
    const s = await status;
    if (s !== NETIF_RSP_OKAY) throw new XenError('EIO', `${this.name}: multicast ${add ? 'add' : 'del'} ${formatMac(mac)}: status ${s}`);
  }

  // --- datapath: interrupt, txeof, rxeof -------------------------------------------

  // The handlers return false when the event found no response on the ring
  // (netfront's XEN_EOI_FLAG_SPURIOUS), so that the interrupt layer throttles
  // a backend that keeps signalling for nothing (XSA-391).

  // xnf_intr: one channel for both rings.
  intr(q: XnfQueue): boolean {
    const tx = this.txeof(q);
    return this.rxeof(q) || tx;
  }

  // xnf_txeof: copy each response once, check it, free its id; then start waiting frames.
  txeof(q: XnfQueue): boolean {
    const ring = q.tx?.ring;
    if (ring === undefined || this.error !== null) return false;
    const work = ring.unconsumedResponses() > 0;
    this.txCollect(q, ring);
    return work;
  }

  private txCollect(q: XnfQueue, ring: FrontRing): void {
    do {
      ring.unconsumedResponses();
      while (ring.takeResponse(q.txRsp)) {
        const why = this.txComplete(q);
        if (why !== null) return this.broken(why);
      }
    } while (ring.finalCheckForResponses());
    if (ring.error !== undefined) return this.broken(ring.error.message);
    this.startWaiters(q);
    if (this.drainWaiters.length > 0 && this.txIdle()) for (const w of this.drainWaiters.splice(0)) w();
  }

  /** Every frame handed to the ring has been answered and none waits. */
  txIdle(): boolean {
    for (const q of this.queues) if (q.waiters.length > 0 || q.txFreeCount !== q.txBufs.length) return false;
    return true;
  }

  /**
   * Resolve once the backend has answered every frame sent so far (what is
   * still on the ring is lost with the domain; a suspend and a clean
   * shutdown wait for it, xnfDrain). ETIMEDOUT after `timeoutMs`; ENETDOWN
   * if the interface stops.
   */
  drain(timeoutMs = 10_000): Promise<void> {
    if (this.error !== null) return Promise.reject(this.error);
    if (this.txIdle()) return RESOLVED;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.drainWaiters.indexOf(done);
        if (i >= 0) this.drainWaiters.splice(i, 1);
        reject(this.error ?? new XenError('ETIMEDOUT', `${this.name}: TX ring not drained in ${timeoutMs} ms`));
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        if (this.error !== null) reject(this.error);
        else resolve();
      };
      this.drainWaiters.push(done);
    });
  }

  /** Check the response in q.txRsp; null when it freed an id (or was a NULL for an extra). */
  private txComplete(q: XnfQueue): string | null {
    const id = q.txRspView.getUint16(TXP_ID, true);
    const status = q.txRspView.getInt16(TXP_STATUS, true);
    if (status === NETIF_RSP_NULL) {
      if (q.nullOwed === 0) return 'NETIF_RSP_NULL with no extra slot outstanding';
      q.nullOwed--;
      return null;
    }
    if (status !== NETIF_RSP_OKAY && status !== NETIF_RSP_ERROR && status !== NETIF_RSP_DROPPED) return `tx id ${id}: unknown status ${status}`;
    const buf = id < XNF_TX_DESC ? q.txBufs[id] : undefined;
    if (buf === undefined || !buf.busy) return `tx response for id ${id}, which is not outstanding`;
    if (status === NETIF_RSP_ERROR) this.counters.txErrors++;
    else if (status === NETIF_RSP_DROPPED) this.counters.txDropped++;
    const mcast = q.mcastDone.size === 0 ? undefined : q.mcastDone.get(id);
    if (mcast !== undefined) {
      q.mcastDone.delete(id);
      mcast(status);
    } else {
      this.sc.dmat.dmamapSync(buf.map, 0, PAGE_SIZE, BUS_DMASYNC_POSTWRITE);
      if (!this.trusted && !this.revoke(buf)) return `grant of tx buffer ${id} still in use by the backend`;
    }
    buf.busy = false;
    q.txFree[q.txFreeCount++] = id;
    return null;
  }

  /**
   * Take back an untrusted frame's grant. False when the backend still maps
   * the page: as Linux netfront does, the interface is then broken, and the
   * tag quarantines the page once its bounded wait gives up.
   */
  private revoke(buf: XnfBuf): boolean {
    const done = this.sc.dmat.dmamapUnload(buf.map);
    if (!buf.map.unloading) return true;
    done.catch((err: Error) => this.log('buffer %d: %s', buf.id, err.message));
    return false;
  }

  private startWaiters(q: XnfQueue): void {
    while (q.waiters.length > 0) {
      const w = q.waiters[0]!;
      if (!this.encap(q, w.frame, w.offload)) return;
      q.waiters.shift();
      this.settleWaiter(w, null);
    }
  }

  // xnf_rxeof: copy each response once, check it, hand whole frames up; then refill.
  rxeof(q: XnfQueue): boolean {
    const ring = q.rx?.ring;
    if (ring === undefined || this.error !== null) return false;
    const work = ring.unconsumedResponses() > 0;
    this.rxCollect(q, ring);
    return work;
  }

  private rxCollect(q: XnfQueue, ring: FrontRing): void {
    do {
      ring.unconsumedResponses();
      while (ring.takeResponse(q.rxRsp)) {
        const why = this.rxSlot(q, (ring.rspConsumed - 1) >>> 0);
        if (why !== null) return this.broken(why);
        // Hand buffers back while the backend may still be filling: it need not wait for the whole batch.
        if ((ring.rspConsumed & (XNF_RX_REFILL_BATCH - 1)) === 0 && q.rxSlots === 0) this.rxFill(q);
      }
    } while (ring.finalCheckForResponses());
    if (ring.error !== undefined) return this.broken(ring.error.message);
    // A frame that goes on in a later batch: its buffers go back to the ring now, so its bytes so far are copied first.
    if (q.rxSlots > 0) this.rxGather(q);
    this.rxFill(q);
  }

  /** One RX response (in q.rxRsp) from ring slot `idx`: a data slot or an extra. */
  private rxSlot(q: XnfQueue, idx: number): string | null {
    const slot = idx & (XNF_RX_DESC - 1);
    if (q.rxExtras) return this.rxExtra(q, slot);
    const id = q.rxRspView.getUint16(RXP_ID, true);
    const offset = q.rxRspView.getUint16(RXP_OFFSET, true);
    const flags = q.rxRspView.getUint16(RXP_FLAGS, true);
    const status = q.rxRspView.getInt16(RXP_STATUS, true);
    if (id !== slot) return `rx response in slot ${slot} has id ${id}`;
    const buf = q.rxBufs[slot]!;
    if (!this.rxTakeBack(buf)) return `grant of rx buffer ${slot} still in use by the backend`;
    if (status < NETIF_RSP_DROPPED) return `rx id ${id}: status ${status}`;
    if (status >= 0 && offset + status > PAGE_SIZE) return `rx id ${id}: offset ${offset} + size ${status} crosses the page`;
    if (++q.rxSlots > XNF_FRAG) return `rx frame of more than ${XNF_FRAG} slots`;
    const first = q.rxSlots === 1;
    if (status < 0) {
      q.rxBad = true;
      if (status === NETIF_RSP_DROPPED) this.counters.rxDropped++;
      else this.counters.rxErrors++;
    }
    if (first) {
      q.rxFlags = flags;
      q.rxGsoType = q.rxGsoSize = 0;
      if ((flags & NETRXF_extra_info) !== 0) {
        q.rxExtras = true;
        q.rxMoreAfterExtras = (flags & NETRXF_more_data) !== 0;
      }
      if (!q.rxBad && !q.rxExtras && (flags & NETRXF_more_data) === 0) return this.rxDirect(q, buf, offset, status);
    }
    if (status > 0) {
      if (q.rxLen + status > XEN_NETIF_MAX_TX_SIZE) return `rx frame longer than ${XEN_NETIF_MAX_TX_SIZE} bytes`;
      q.pieceSlot[q.rxPieces] = slot;
      q.pieceOffset[q.rxPieces] = offset;
      q.pieceLen[q.rxPieces++] = status;
      q.rxLen += status;
    }
    if (!q.rxExtras && (flags & NETRXF_more_data) === 0) this.rxDeliver(q);
    return null;
  }

  /** An extra-info slot: it used up the request (and buffer) of its slot, but carries no id. */
  private rxExtra(q: XnfQueue, slot: number): string | null {
    if (!this.rxTakeBack(q.rxBufs[slot]!)) return `grant of rx buffer ${slot} still in use by the backend`;
    if (++q.rxExtraSlots >= XEN_NETIF_EXTRA_TYPE_MAX) return 'rx frame with too many extra slots';
    const type = q.rxRsp[EXT_TYPE]!;
    const flags = q.rxRsp[EXT_FLAGS]!;
    if (type !== XEN_NETIF_EXTRA_TYPE_GSO) return `rx extra of type ${type}`;
    const gsoType = q.rxRsp[EXT_GSO_TYPE]!;
    const gsoSize = q.rxRspView.getUint16(EXT_GSO_SIZE, true);
    if ((gsoType !== XEN_NETIF_GSO_TYPE_TCPV4 && gsoType !== XEN_NETIF_GSO_TYPE_TCPV6) || gsoSize === 0) {
      return `rx GSO extra: type ${gsoType}, size ${gsoSize}`;
    }
    q.rxGsoType = gsoType;
    q.rxGsoSize = gsoSize;
    if ((flags & XEN_NETIF_EXTRA_FLAG_MORE) !== 0) return null;
    q.rxExtras = false;
    if (!q.rxMoreAfterExtras) this.rxDeliver(q);
    return null;
  }

  /** A frame in one slot: hand up a view of the page itself. */
  private rxDirect(q: XnfQueue, buf: XnfBuf, offset: number, len: number): null {
    this.rxUp(q, this.rxView(buf, offset, len), q.rxFlags);
    this.rxReset(q);
    return null;
  }

  /** The received bytes of a buffer's page; the view is kept, since the next frame in it is mostly the same span. */
  private rxView(buf: XnfBuf, offset: number, len: number): Uint8Array {
    if (buf.viewOffset !== offset || buf.view.length !== len) {
      buf.view = buf.page.subarray(offset, offset + len);
      buf.viewOffset = offset;
    }
    return buf.view;
  }

  private rxDeliver(q: XnfQueue): void {
    if (!q.rxBad) this.rxUp(q, this.rxFrame(q), q.rxFlags);
    this.rxReset(q);
  }

  /**
   * A frame of several slots: a view of its buffers' pages when each piece
   * starts where the one before ends (full pages from offset 0 in buffers
   * that lie one after another, as attach allocates them), else its pieces
   * gathered into one array. A GSO frame's extra slot used up the buffer
   * between its first piece and the rest, with no data in it: the first
   * piece is copied there, and the frame is a view from it on. Either way
   * the view is valid until the buffers go back to the ring, after the
   * handler returns.
   */
  private rxFrame(q: XnfQueue): Uint8Array {
    const n = q.rxPieces;
    if (q.rxCopied === 0 && n > 1) {
      const first = this.pieceAddress(q, 0);
      const second = this.pieceAddress(q, 1);
      let end = second + q.pieceLen[1]!;
      let i = 2;
      for (; i < n && this.pieceAddress(q, i) === end; i++) end += q.pieceLen[i]!;
      if (i === n) {
        const len = q.pieceLen[0]!;
        const mem = this.sc.mem.u8;
        if (first + len === second) return mem.subarray(first, end);
        const extra = q.rxBufs[(q.pieceSlot[0]! + 1) & (XNF_RX_DESC - 1)]!;
        if (q.rxGsoType !== 0 && q.pieceSlot[1] === ((q.pieceSlot[0]! + 2) & (XNF_RX_DESC - 1)) && extra.segs[0]!.ds_addr + PAGE_SIZE === second && q.pieceOffset[1] === 0) {
          mem.copyWithin(second - len, first, first + len);
          return mem.subarray(second - len, end);
        }
      }
    }
    this.rxGather(q);
    return q.gather.subarray(0, q.rxLen);
  }

  private pieceAddress(q: XnfQueue, i: number): number {
    return q.rxBufs[q.pieceSlot[i]!]!.segs[0]!.ds_addr + q.pieceOffset[i]!;
  }

  /** Copy the pieces not copied yet into gather. */
  private rxGather(q: XnfQueue): void {
    for (let i = q.rxCopied; i < q.rxPieces; i++) {
      const len = q.pieceLen[i]!;
      const piece = this.rxView(q.rxBufs[q.pieceSlot[i]!]!, q.pieceOffset[i]!, len);
      copyBytes(q.gather, q.rxCopiedBytes, piece, 0, len);
      q.rxCopiedBytes += len;
    }
    q.rxCopied = q.rxPieces;
  }

  private rxReset(q: XnfQueue): void {
    q.rxPieces = q.rxCopied = q.rxCopiedBytes = 0;
    q.rxSlots = q.rxExtraSlots = q.rxLen = q.rxFlags = 0;
    q.rxBad = q.rxExtras = q.rxMoreAfterExtras = false;
  }

  /** if_input: count the frame and hand it to the stack; nothing the stack throws escapes. */
  private rxUp(q: XnfQueue, frame: Uint8Array, flags: number): void {
    if (frame.length < ETHER_HDR_LEN) {
      this.counters.rxErrors++;
      return;
    }
    this.counters.rxPackets++;
    this.counters.rxBytes += frame.length;
    const info = this.rxInfo;
    info.queue = q.id;
    info.csumBlank = (flags & NETRXF_csum_blank) !== 0;
    info.dataValidated = (flags & NETRXF_data_validated) !== 0;
    info.gsoType = q.rxGsoType;
    info.gsoSize = q.rxGsoSize;
    if (tracing) traceBytes(TraceKind.frame, traceDevice(this.name), 1, frame.length, frame, 0, frame.length);
    try {
      this.input?.(frame, info);
    } catch (err) {
      this.log('input: %s', (err as Error).message);
    }
  }

  /** The backend is done with an RX buffer: sync, and take an untrusted grant back before reading; false if it still maps it. */
  private rxTakeBack(buf: XnfBuf): boolean {
    if (buf.map.dm_nsegs === 0) return true;
    this.sc.dmat.dmamapSync(buf.map, 0, PAGE_SIZE, BUS_DMASYNC_POSTREAD);
    return this.trusted || this.revoke(buf);
  }

  // xnf_rx_ring_fill: slot i gets buffer i, for every slot whose response was taken.
  rxFill(q: XnfQueue): void {
    const ring = q.rx!.ring;
    const dmat = this.sc.dmat;
    let posted = 0;
    while (!ring.full()) {
      const slot = ring.reqProd & (XNF_RX_DESC - 1);
      const buf = q.rxBufs[slot]!;
      if (!this.trusted) {
        zeroBytes(buf.page, 0, PAGE_SIZE);
        dmat.dmamapLoadRaw(buf.map, buf.segs, PAGE_SIZE, this.dmaDomid | BUS_DMA_READ);
      }
      dmat.dmamapSync(buf.map, 0, PAGE_SIZE, BUS_DMASYNC_PREREAD);
      q.rxReqView.setUint16(RXQ_ID, slot, true);
      q.rxReqView.setUint32(RXQ_GREF, buf.map.dm_segs[0]!.ds_addr, true);
      ring.putRequest(q.rxReq);
      posted++;
    }
    if (posted > 0 && ring.pushRequests() && q.rxIh !== null) this.sc.intr.intrSignal(q.rxIh);
  }

  /** The interface is unusable from now on; every waiting sender fails. */
  broken(reason: string): void {
    if (this.error !== null) return;
    this.error = new XenError('ENETDOWN', `${this.name}: ${reason}`);
    this.log('broken: %s', reason);
    this.setLink(false);
    for (const w of this.drainWaiters.splice(0)) w();
    for (const q of this.queues) {
      for (const w of q.waiters.splice(0)) this.settleWaiter(w, this.error);
      for (const done of q.mcastDone.values()) done(NETIF_RSP_ERROR);
      q.mcastDone.clear();
    }
  }

  setLink(up: boolean): void {
    const now = up && this.error === null;
    if (now === this.up) return;
    this.up = now;
    this.log('link %s', now ? 'up' : 'down');
    if (!now) for (const q of this.queues) for (const w of q.waiters.splice(0)) this.settleWaiter(w, new XenError('ENETDOWN', `${this.name}: link is down`));
    try {
      this.onLink?.(now);
    } catch (err) {
      this.log('link handler: %s', (err as Error).message);
    }
  }
}

// --- attach/detach -------------------------------------------------------------

const softcs = new WeakMap<XenSoftc, Map<string, XnfSoftc>>();

/** The attached interfaces of this kernel, in device order. */
export function xnfInterfaces(sc: XenSoftc): XnfSoftc[] {
  return [...(softcs.get(sc)?.values() ?? [])].sort((a, b) => a.devid - b.devid);
}

// xnf_attach: address, capabilities, queues (rings, buffers, interrupts),
// negotiation; each failure unwinds the steps before it.
async function xnfAttach(sc: XenSoftc, dev: XenDevice): Promise<void> {
  const xnf = new XnfSoftc(sc, dev);
  try {
    await xnfLladdr(xnf);
    await xnfCapabilities(xnf);
    xnfQueuesCreate(xnf);
    await xnfInitBackend(xnf);
  } catch (err) {
    xnf.log('attach failed: %s', (err as Error).message);
    await xnfRelease(xnf);
    throw err;
  }
  for (const q of xnf.queues) {
    sc.intr.intrUnmask(q.txIh!);
    if (q.rxIh !== q.txIh) sc.intr.intrUnmask(q.rxIh!);
  }
  const map = softcs.get(sc) ?? new Map<string, XnfSoftc>();
  map.set(dev.path, xnf);
  softcs.set(sc, map);
  xnf.setLink(true);
  xnf.log('address %s, mtu %d, %d queue(s)%s%s%s', formatMac(xnf.mac), xnf.mtu, xnf.queues.length,
    xnf.capSg ? ', sg' : '', xnf.capSplit ? ', split event channels' : '', xnf.trusted ? '' : ', untrusted backend');
}

// xnf_detach: Closing, stop, release every grant and port, Closed.
async function xnfDetach(sc: XenSoftc, dev: XenDevice): Promise<void> {
  const xnf = softcs.get(sc)?.get(dev.path);
  if (xnf === undefined) return;
  softcs.get(sc)!.delete(dev.path);
  xnf.detached = true;
  await xnf.recovery?.catch(() => undefined);
  await sc.xs.write(`${dev.path}/state`, String(XenbusStateClosing)).catch(() => undefined);
  xnf.broken('detached');
  await xnfRelease(xnf);
  await sc.xs.write(`${dev.path}/state`, String(XenbusStateClosed)).catch(() => undefined);
}

/** Undo attach in reverse; tolerates a half-built softc. */
async function xnfRelease(xnf: XnfSoftc): Promise<void> {
  const w = xnf.stateWatch;
  xnf.stateWatch = null;
  await w?.unwatch().catch(() => undefined);
  for (const q of xnf.queues.splice(0).reverse()) await xnfQueueDestroy(xnf, q);
}

// Before a suspend or a clean shutdown: what is on the TX rings is answered
// first (bounded), so no frame is lost with the old backend, or with the
// domain.
async function xnfDrain(sc: XenSoftc, dev: XenDevice): Promise<void> {
  await softcs.get(sc)?.get(dev.path)?.drain(XNF_DRAIN_MS).catch(() => undefined);
}

export const xnfDriver: XenDriver = { name: 'xnf', attach: xnfAttach, detach: xnfDetach, suspend: xnfDrain, shutdown: xnfDrain };

// xnf_lladdr: the MAC the toolstack gave (Linux reads the frontend's node, OpenBSD the backend's).
async function xnfLladdr(xnf: XnfSoftc): Promise<void> {
  const { xs } = xnf.sc;
  const text = await xs.read(`${xnf.dev.path}/mac`).catch(() => xs.read(`${xnf.dev.backend}/mac`));
  xnf.mac.set(parseMac(text));
  const mtu = await optional(xs.getNumber(`${xnf.dev.path}/mtu`), ETH_DATA_LEN);
  xnf.mtu = Number.isInteger(mtu) && mtu >= ETH_MIN_MTU ? mtu : ETH_DATA_LEN;
  xnf.trusted = (await xs.read(`${xnf.dev.path}/trusted`).catch(() => '1')) !== '0';
}

/** A number the backend may not have written: `absent` when there is none (or it is not a number). */
async function optional(read: Promise<number>, absent: number): Promise<number> {
  try {
    return await read;
  } catch (err) {
    if (err instanceof XenError && (err.code === 'ENOENT' || err.code === 'EINVAL')) return absent;
    throw err;
  }
}

/** Linux's xen_netfront.max_queues: from the kernel command line, else one per vCPU. */
function netQueues(sc: XenSoftc): number {
  const m = /(?:^|\s)xen_netfront\.max_queues=(\d+)(?:\s|$)/.exec(sc.cmdline);
  return m === null ? sc.vcpus : Number(m[1]);
}

// xnf_capabilities, once the backend has written them (Linux netfront connects on the backend's InitWait).
async function xnfCapabilities(xnf: XnfSoftc): Promise<void> {
  const { xs } = xnf.sc;
  const be = xnf.dev.backend;
  const state = await xs.awaitState(`${be}/state`, (v) => v !== undefined && Number(v) >= XenbusStateInitWait, { timeoutMs: XNF_CONNECT_TIMEOUT_MS });
  if (Number(state) > XenbusStateConnected) throw new XenError('ENXIO', `${xnf.name}: backend state ${state}`);
  if ((await optional(xs.getNumber(`${be}/feature-rx-copy`), 0)) !== 1) throw new XenError('ENODEV', `${xnf.name}: the backend has no feature-rx-copy`);
  xnf.capSg = (await optional(xs.getNumber(`${be}/feature-sg`), 0)) === 1;
  xnf.capCsum4 = (await optional(xs.getNumber(`${be}/feature-no-csum-offload`), 0)) !== 1;
  xnf.capCsum6 = (await optional(xs.getNumber(`${be}/feature-ipv6-csum-offload`), 0)) === 1;
  xnf.capGso4 = xnf.capSg && (await optional(xs.getNumber(`${be}/feature-gso-tcpv4`), 0)) === 1;
  xnf.capGso6 = xnf.capSg && (await optional(xs.getNumber(`${be}/feature-gso-tcpv6`), 0)) === 1;
  xnf.capMcast = (await optional(xs.getNumber(`${be}/feature-multicast-control`), 0)) === 1;
  xnf.capSplit = (await optional(xs.getNumber(`${be}/feature-split-event-channels`), 0)) === 1;
  const max = await optional(xs.getNumber(`${be}/multi-queue-max-queues`), 1);
  xnf.maxQueues = Math.max(1, Math.min(Number.isInteger(max) ? max : 1, XNF_MAX_QUEUES, netQueues(xnf.sc)));
  xnf.mtu = Math.min(xnf.mtu, xnf.capSg ? XNF_MAX_MTU : ETH_DATA_LEN);
}

// --- ring and buffer create/destroy ------------------------------------------------

/**
 * xennet_create_queues: as many as asked; if one cannot be made (no grant
 * refs, no memory, no port) carry on with those made before it, as Linux
 * does; the first must succeed.
 */
function xnfQueuesCreate(xnf: XnfSoftc): void {
  for (let i = 0; i < xnf.maxQueues; i++) {
    const q = new XnfQueue(xnf, i);
    try {
      xnfQueueCreate(xnf, q);
    } catch (err) {
      void xnfQueueDestroy(xnf, q);
      if (i === 0) throw err;
      xnf.log('only %d of %d queues: %s', i, xnf.maxQueues, (err as Error).message);
      return;
    }
    xnf.queues.push(q);
  }
}

function xnfQueueCreate(xnf: XnfSoftc, q: XnfQueue): void {
  q.tx = ringCreate(xnf, TX_BYTES, XNF_TX_DESC, `${q.name}-tx`, 'netif_tx');
  q.rx = ringCreate(xnf, RX_BYTES, XNF_RX_DESC, `${q.name}-rx`, 'netif_rx');
  for (let id = 0; id < XNF_TX_DESC; id++) q.txBufs.push(bufCreate(xnf, id, BUS_DMA_WRITE));
  for (let id = XNF_TX_DESC - 1; id >= 0; id--) q.txFree[q.txFreeCount++] = id;
  for (let id = 0; id < XNF_RX_DESC; id++) q.rxBufs.push(bufCreate(xnf, id, BUS_DMA_READ));
  const { intr } = xnf.sc;
  const backend = xnf.dev.backendId;
  if (xnf.capSplit) {
    q.txIh = intr.intrEstablish(0, backend, () => xnf.txeof(q), `${q.name}-tx`);
    try {
      q.rxIh = intr.intrEstablish(0, backend, () => xnf.rxeof(q), `${q.name}-rx`);
    } catch (err) {
      // Linux's fallback: one channel for both rings.
      xnf.log('%s: split event channels failed (%s), using one', q.name, (err as Error).message);
      void intr.intrDisestablish(q.txIh);
      q.txIh = null;
    }
  }
  if (q.txIh === null) {
    q.txIh = intr.intrEstablish(0, backend, () => xnf.intr(q), q.name);
    q.rxIh = q.txIh;
  }
  xnf.rxFill(q);
}

async function xnfQueueDestroy(xnf: XnfSoftc, q: XnfQueue): Promise<void> {
  const { intr } = xnf.sc;
  const rxIh = q.rxIh;
  if (q.txIh !== null) await intr.intrDisestablish(q.txIh).catch(() => undefined);
  if (rxIh !== null && rxIh !== q.txIh) await intr.intrDisestablish(rxIh).catch(() => undefined);
  q.txIh = q.rxIh = null;
  await ringDestroy(xnf, q.tx);
  await ringDestroy(xnf, q.rx);
  q.tx = q.rx = null;
  for (const buf of q.txBufs.splice(0)) await bufDestroy(xnf, buf);
  for (const buf of q.rxBufs.splice(0)) await bufDestroy(xnf, buf);
  q.txFreeCount = 0;
}

// xnf_{rx,tx}_ring_create: one zeroed page of dmamem, granted to the backend.
function ringCreate(xnf: XnfSoftc, entryBytes: number, size: number, name: string, type: RingType): XnfRingMem {
  const dmat = xnf.sc.dmat;
  const segs = dmat.dmamemAlloc(PAGE_SIZE, PAGE_SIZE, 0, 1, BUS_DMA_ZERO);
  const kva = dmat.dmamemMap(segs, PAGE_SIZE, 0);
  let map: XenDmaMap | null = null;
  try {
    map = dmat.dmamapCreate(PAGE_SIZE, 1, PAGE_SIZE, 0, 0);
    dmat.dmamapLoadRaw(map, segs, PAGE_SIZE, xnf.dmaDomid);
  } catch (err) {
    if (map !== null) dmat.dmamapDestroy(map);
    dmat.dmamemUnmap(kva);
    dmat.dmamemFree(segs);
    throw err;
  }
  const ring = new FrontRing([new FramePage(xnf.sc.mem, segs[0]!.ds_addr / PAGE_SIZE, true)], entryBytes, size, name, type);
  ring.init();
  return { segs, kva, map, ring, ref: map.dm_segs[0]!.ds_addr };
}

// xnf_{rx,tx}_ring_destroy
async function ringDestroy(xnf: XnfSoftc, r: XnfRingMem | null): Promise<void> {
  if (r === null) return;
  const dmat = xnf.sc.dmat;
  await dmat.dmamapUnload(r.map).catch((err: Error) => xnf.log('ring: %s', err.message));
  dmat.dmamapDestroy(r.map);
  dmat.dmamemUnmap(r.kva);
  dmat.dmamemFree(r.segs);
}

/** A page of dmamem and its map; a trusted backend gets the grant now, for good. */
function bufCreate(xnf: XnfSoftc, id: number, dir: number): XnfBuf {
  const dmat = xnf.sc.dmat;
  const segs = dmat.dmamemAlloc(PAGE_SIZE, PAGE_SIZE, 0, 1, BUS_DMA_ZERO);
  const kva = dmat.dmamemMap(segs, PAGE_SIZE, 0);
  let map: XenDmaMap | null = null;
  try {
    map = dmat.dmamapCreate(PAGE_SIZE, 1, PAGE_SIZE, PAGE_SIZE, 0);
    if (xnf.trusted) dmat.dmamapLoadRaw(map, segs, PAGE_SIZE, xnf.dmaDomid | dir);
  } catch (err) {
    if (map !== null) dmat.dmamapDestroy(map);
    dmat.dmamemUnmap(kva);
    dmat.dmamemFree(segs);
    throw err;
  }
  const page = kva.bytes(0, PAGE_SIZE);
  return { id, segs, kva, map, page, busy: false, view: page.subarray(0, 0), viewOffset: 0 };
}

async function bufDestroy(xnf: XnfSoftc, buf: XnfBuf): Promise<void> {
  const dmat = xnf.sc.dmat;
  if (buf.map.dm_nsegs !== 0) await dmat.dmamapUnload(buf.map).catch((err: Error) => xnf.log('buffer %d: %s', buf.id, err.message));
  dmat.dmamapDestroy(buf.map);
  dmat.dmamemUnmap(buf.kva);
  dmat.dmamemFree(buf.segs);
}

// --- backend negotiation ---------------------------------------------------------

/** The frontend's nodes for queue `q`: at the top with one queue, under queue-N/ with more. */
async function writeQueueNodes(xnf: XnfSoftc, t: { write(p: string, v: string): Promise<void> }, q: XnfQueue): Promise<void> {
  const dir = xnf.queues.length === 1 ? xnf.dev.path : `${xnf.dev.path}/queue-${q.id}`;
  await t.write(`${dir}/tx-ring-ref`, String(q.tx!.ref));
  await t.write(`${dir}/rx-ring-ref`, String(q.rx!.ref));
  if (q.rxIh !== q.txIh) {
    await t.write(`${dir}/event-channel-tx`, String(q.txIh!.port));
    await t.write(`${dir}/event-channel-rx`, String(q.rxIh!.port));
  } else {
    await t.write(`${dir}/event-channel`, String(q.txIh!.port));
  }
}

// xnf_init_backend (Linux talk_to_netback): rings, channels and what we can
// receive in one transaction, Connected; then await the backend's Connected.
async function xnfInitBackend(xnf: XnfSoftc): Promise<void> {
  const { xs } = xnf.sc;
  const fe = xnf.dev.path;
  await xs.transaction(async (t) => {
    if (xnf.queues.length > 1) await t.write(`${fe}/multi-queue-num-queues`, String(xnf.queues.length));
    for (const q of xnf.queues) await writeQueueNodes(xnf, t, q);
    await t.write(`${fe}/request-rx-copy`, '1');
    await t.write(`${fe}/feature-rx-notify`, '1');
    await t.write(`${fe}/feature-sg`, '1');
    await t.write(`${fe}/feature-gso-tcpv4`, '1');
    await t.write(`${fe}/feature-gso-tcpv6`, '1');
    await t.write(`${fe}/feature-ipv6-csum-offload`, '1');
    if (xnf.capMcast) await t.write(`${fe}/request-multicast-control`, '1');
  });
  await xs.write(`${fe}/state`, String(XenbusStateConnected));
  const state = await xs.awaitState(`${xnf.dev.backend}/state`, (v) => v !== undefined && Number(v) >= XenbusStateConnected, { timeoutMs: XNF_CONNECT_TIMEOUT_MS });
  if (Number(state) !== XenbusStateConnected) throw new XenError('ENXIO', `${xnf.name}: backend state ${state}`);
  // netback_changed: the link follows the backend's state from now on; a backend that closes while online stays 1 is restarting.
  xnf.stateWatch = await xs.watch(`${xnf.dev.backend}/state`, () => {
    void xs.read(`${xnf.dev.backend}/state`).then(
      (v) => {
        const s = Number(v);
        xnf.setLink(s === XenbusStateConnected);
        if (s === XenbusStateClosing || s === XenbusStateClosed) xnfBackendClosed(xnf);
      },
      () => xnf.setLink(false),
    );
  });
}

/** The backend closed: unless the toolstack is unplugging the vif (online 0, the nexus detaches), reconnect. */
function xnfBackendClosed(xnf: XnfSoftc): void {
  if (xnf.recovery !== null || xnf.detached || xnf.error !== null) return;
  const { xs } = xnf.sc;
  xnf.recovery = xs.read(`${xnf.dev.backend}/online`).catch(() => '0').then(async (online) => {
    if (online !== '1' || xnf.detached || xnf.error !== null) return;
    xnf.log('backend closed: reconnecting');
    await xnfRecover(xnf);
  }).finally(() => {
    xnf.recovery = null;
    // A backend that closed again while we were connecting starts another round.
    void xs.read(`${xnf.dev.backend}/state`).then(Number, () => XenbusStateClosed).then((st) => {
      if (st === XenbusStateClosing || st === XenbusStateClosed) xnfBackendClosed(xnf);
    });
  });
}

// Linux netfront's backend-restart path (xennet_disconnect_backend, then
// talk_to_netback again): let go of the queues once the old backend has let
// go of them (frames on the rings are lost, senders waiting fail with
// ENETDOWN), say Closed, wait for a backend in InitWait and connect as at
// attach. A backend that closes again before we are connected costs another
// round; all rounds together are bounded, then the interface breaks.
async function xnfRecover(xnf: XnfSoftc): Promise<void> {
  const { xs } = xnf.sc;
  const deadline = Date.now() + XNF_RECONNECT_TIMEOUT_MS;
  const left = (): number => Math.max(1, deadline - Date.now());
  for (;;) {
    try {
      await xs.awaitState(`${xnf.dev.backend}/state`, (v) => v === undefined || Number(v) === XenbusStateClosed || Number(v) === XenbusStateInitWait,
        { timeoutMs: Math.min(left(), XNF_CONNECT_TIMEOUT_MS) }).catch((err: Error) => xnf.log('backend did not close: %s', err.message));
      await xnfRelease(xnf);
      await xs.write(`${xnf.dev.path}/state`, String(XenbusStateClosed));
      await xs.awaitState(`${xnf.dev.backend}/state`, XenbusStateInitWait, { timeoutMs: left() });
      if (xnf.detached) return;
      await xnfCapabilities(xnf);
      xnfQueuesCreate(xnf);
      await xnfInitBackend(xnf);
      break;
    } catch (err) {
      if (xnf.detached) return;
      if (Date.now() >= deadline) return xnf.broken(`backend did not come back: ${(err as Error).message}`);
      xnf.log('reconnect failed, again: %s', (err as Error).message);
    }
  }
  if (xnf.detached) return;
  for (const q of xnf.queues) {
    xnf.sc.intr.intrUnmask(q.txIh!);
    if (q.rxIh !== q.txIh) xnf.sc.intr.intrUnmask(q.rxIh!);
  }
  xnf.reconnects++;
  xnf.log('reconnected (%d)', xnf.reconnects);
  xnf.setLink(true);
}
