// dom0's network backend for one vif, after Linux drivers/net/xen-netback
// (xenbus.c for the handshake, netback.c for guest TX, rx.c for guest RX,
// interface.c for the queues). Grant copy both ways, no page flipping
// (feature-rx-flip 0): a frame from one guest to another is copied once,
// from the sender's granted page into the receiver's.
//
// Guest TX: each request is copied once off the ring and checked; the
// packet keeps pointing at the sender's grants, and its requests are
// answered only when every port that took it has copied it out. So a slow
// receiver holds the sender's ring slots: the sender's ring is the queue.
// A frontend that breaks the protocol (more slots than XEN_NETIF_NR_SLOTS_MIN,
// a slot crossing its page, a bad extra, req_prod jumping a ring ahead, a
// grant dom0 may not use) gets its vif disabled with a logged reason, as
// xenvif_fatal_tx_err does; every other vif carries on.
//
// Guest RX: a bounded queue per ring (XSA-392: beyond it frames are
// dropped), drained into the frontend's posted buffers; a frame that waits
// longer than drainTimeoutMs is dropped, and a frontend that posts no buffer
// for stallTimeoutMs is stalled (carrier off) until it does. A frame that
// waits longer than holdMs lets go of its sender: it is copied into dom0's
// pool and the sender's requests are answered, so a receiver that stops
// taking frames cannot keep another guest's ring full.

import {
  NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, netifOffsets, NETRXF_csum_blank, NETRXF_data_validated,
  NETRXF_extra_info, NETRXF_more_data, NETTXF_csum_blank, NETTXF_data_validated, NETTXF_extra_info, NETTXF_more_data,
  XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_EXTRA_TYPE_MAX, XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
  XEN_NETIF_EXTRA_TYPE_MCAST_DEL, XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, XEN_NETIF_NR_SLOTS_MIN,
} from '../abi/netif.js';
import { __CONST_RING_SIZE, netif_rx_sring, netif_rx_sring_entry, netif_tx_sring, netif_tx_sring_entry } from '../abi/ring.js';
import { GNTCOPY_source_gref, GNTST_okay } from '../abi/grant_table.js';
import { XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitialised, XenbusStateInitWait } from '../abi/xenbus.js';
import { XenError } from '../errors.js';
import { ETHER_ADDR_LEN, ETHER_HDR_LEN, ETHERTYPE_IPV6, formatMac, isBroadcast, isMulticast, macKey, parseMac } from '../ether.js';
import type { Interrupts, IntrHandle } from '../evtchn/evtchn.js';
import type { Hypercall } from '../hypervisor/hypercall.js';
import { copyBytes, PAGE_SIZE } from '../hypervisor/page.js';
import { logger, type Log } from '../log.js';
import { PcapWriter } from '../pcap.js';
import { BackRing } from '../xen/ring.js';
import type { XenStore, XsWatch } from '../xenstore/xenstore.js';
import {
  CopyBatch, HEADER_BYTES, MAX_FRAGS, newPortStats, type Bridge, type Bridges, type BridgePort, type Frag, type FramePool, type Packet, type PacketOrigin,
} from './bridge.js';
import { bindInterdomain, mapGrant, unmapGrant } from './xenbus.js';

const TX_RING_SIZE = __CONST_RING_SIZE(netif_tx_sring, PAGE_SIZE);
const RX_RING_SIZE = __CONST_RING_SIZE(netif_rx_sring, PAGE_SIZE);
const TX_BYTES = netif_tx_sring_entry.size;
const RX_BYTES = netif_rx_sring_entry.size;
const CONNECT_TIMEOUT_MS = 5 * 60_000;
/** Packets one TX batch takes at most: it ends once half a ring of requests is taken. */
const TX_BATCH = TX_RING_SIZE >> 1;
/**
 * A TX batch also ends, and the pass pushes its answers, once the frames it
 * took come to this many bytes: after every third 64 KiB GSO frame, where
 * the half ring alone would push after every eighth (each takes 17 slots),
 * some 200 µs of dom0's copying while the sender, its ring full, waits for
 * answers and the receiver for its frames. `node dist/bench/profile.js net 65535`,
 * three runs of three windows each: 10.1-11.7 -> 12.9-13.6 Gbit/s; 1500
 * bytes (a push every 87 frames instead of 128) 0.58-0.63 -> 0.59-0.66
 * Mpps; 64-byte frames never reach it. (At 64 KiB, a push every second
 * 64 KiB frame and every 44th of 1500 bytes: as good for the first, 6%
 * worse for the second.)
 */
const TX_PUSH_BYTES = 128 * 1024;
/**
 * How long one TX pass may hold dom0's thread (Linux's netdev_budget_usecs,
 * 2 ms); judged at the clock reading each push already takes.
 */
const TX_PASS_MS = 2;
/** txBuild's answer for a packet that goes on to the bridge (any other is a NETIF_RSP_* status). */
const FORWARD = 0x7fff;
// What rxBuild made of a frame: copies into RX slots, or nothing (no dom0 buffer, or the sender's grant failed).
const RX_COPY = 0;
const RX_NO_BUFFER = 1;
const RX_BAD_SENDER = 2;
// Why txBuildBatch stopped, when not for a bad packet.
const TX_MORE = 0;
const TX_EMPTY = 1;
const TX_NO_PACKET = 2;
/** XEN_NETBK_MCAST_MAX */
const MCAST_MAX = 64;
const MAX_BURST_BYTES = 131072;

const {
  TXQ_GREF, TXQ_OFFSET, TXQ_FLAGS, TXQ_ID, TXQ_SIZE, TXP_ID, TXP_STATUS, RXQ_ID, RXQ_GREF, RXP_ID, RXP_OFFSET,
  RXP_FLAGS, RXP_STATUS, EXT_TYPE, EXT_FLAGS, EXT_GSO_SIZE, EXT_GSO_TYPE, EXT_MCAST_ADDR
} = netifOffsets;

export type NetbackOptions = {
  /** multi-queue-max-queues (Linux: one per dom0 CPU). */
  maxQueues?: number;
  /** Frames and bytes a guest-RX queue holds before it drops (XSA-392). */
  rxQueueMaxPackets?: number;
  rxQueueMaxBytes?: number;
  /** A queued frame older than this is dropped (Linux rx_drain_timeout_msecs, 10 s). */
  drainTimeoutMs?: number;
  /** A frontend that posts no RX buffer for this long is stalled (Linux rx_stall_timeout_msecs, 60 s). */
  stallTimeoutMs?: number;
  /** A queued frame holds its sender's grants (and ring slots) at most this long, then is copied into dom0 (500 ms). */
  holdMs?: number;
};

/** One vif as the toolstack hands it to dom0; mac, rate and mtu are read from the backend's nodes. */
export type VifSpec = {
  domid: number;
  devid: number;
  /** The bridge the vif joins (xenbr0 by default). */
  bridge: string;
  /** Capture the vif's frames both ways. */
  pcap?: string | null | undefined;
};

export type VifStats = {
  name: string;
  state: 'waiting' | 'connected' | 'disabled' | 'closed';
  reason: string | null;
  queues: number;
  /** Frames from the guest into the bridge / from the bridge to the guest. */
  rxPackets: number; rxBytes: number; txPackets: number; txBytes: number;
  /** Frames for the guest dropped (queue full, stalled, expired, cannot be taken, or their sender's vif went and no dom0 buffer was free). */
  txDropped: number;
  /** Malformed but survivable guest requests, answered NETIF_RSP_ERROR. */
  txErrors: number;
  expired: number;
  /** Frames copied into dom0 so as to let their sender go (they waited longer than holdMs, or its vif went). */
  released: number;
  stalls: number;
  /** Per queue, the rings as xenvif_read_io_ring shows them. */
  rings: QueueDump[];
};

export type QueueDump = {
  tx: { req_prod: number; req_event: number; rsp_prod: number; rsp_event: number; reqCons: number; rspProdPvt: number } | null;
  rx: { req_prod: number; req_event: number; rsp_prod: number; rsp_event: number; reqCons: number; rspProdPvt: number } | null;
  rxQueued: number;
  rxQueuedBytes: number;
  held: boolean;
  stalled: boolean;
  /** Events the queue's handlers ran for, those that brought nothing, and how often its ports were held masked for it. */
  events: number;
  spuriousEvents: number;
  throttles: number;
  /** The most TX requests one pass of netback took, and the passes cut at its time budget (2 ms) with more waiting. */
  txPassMax: number;
  txBudgetHits: number;
  /** Times a pass pushed its answers before it ended (every half ring, or every 128 KiB of frames). */
  txPushes: number;
};

function eventCounts(tx: IntrHandle | null, rx: IntrHandle | null): Pick<QueueDump, 'events' | 'spuriousEvents' | 'throttles'> {
  const hs = rx !== null && rx !== tx ? [tx, rx] : [tx];
  const sum = (f: (h: IntrHandle) => number): number => hs.reduce((n, h) => n + (h === null ? 0 : f(h)), 0);
  return { events: sum((h) => h.count), spuriousEvents: sum((h) => h.spuriousEvents), throttles: sum((h) => h.throttles) };
}

function ringDump(r: BackRing | null): QueueDump['tx'] {
  return r === null ? null : { ...r.sharedIndices(), reqCons: r.reqConsumed, rspProdPvt: r.rspProd };
}

type Resolved = Required<NetbackOptions>;

/** xenbus_read_unsigned's default: a node the frontend may not have written is `absent` (as is one that is not a number). */
async function optional(read: Promise<number>, absent: number): Promise<number> {
  try {
    return await read;
  } catch (err) {
    if (err instanceof XenError && (err.code === 'ENOENT' || err.code === 'EINVAL')) return absent;
    throw err;
  }
}

/**
 * One txAction batch (xenvif_tx_build_gops' pending packets and its
 * tx_copy_ops): the packets taken off the ring, and the copies of their
 * heads into dom0, done in one hypercall. Made at attach.
 */
class TxBatch {
  readonly pkts: (Packet | null)[] = new Array<Packet | null>(TX_BATCH).fill(null);
  /** FORWARD, or the NETIF_RSP_* status every slot of the packet is answered with. */
  readonly answer = new Int16Array(TX_BATCH);
  /** Where each packet's header copies end in `copies` (they start where the last packet's end). */
  readonly opEnd = new Uint16Array(TX_BATCH);
  readonly copies = new CopyBatch(TX_BATCH + XEN_NETIF_NR_SLOTS_MIN);
  count = 0;
  /** Bytes of the frames taken since the pass last pushed its answers. */
  bytes = 0;
  /** Packets before this one are forwarded or answered; from it on they wait for credit. */
  next = 0;
}

/**
 * One rxAction batch (Linux's queue->rx_copy): the frames taken off the
 * guest-RX queue, the RX slots each took and the copies into them, done in
 * one hypercall. Made at attach.
 */
class RxBatch {
  readonly pkts: (Packet | null)[] = new Array<Packet | null>(RX_RING_SIZE).fill(null);
  /** RX_COPY, RX_NO_BUFFER or RX_BAD_SENDER. */
  readonly kind = new Uint8Array(RX_RING_SIZE);
  /** The first slot's NETRXF_* flags. */
  readonly flags = new Uint16Array(RX_RING_SIZE);
  /** Where each frame's slots end (they start where the last frame's end). */
  readonly slotEnd = new Uint16Array(RX_RING_SIZE);
  // Per slot: the request's id, the response's offset and length, and where its copies end.
  readonly slotId = new Uint16Array(RX_RING_SIZE);
  readonly slotOffset = new Uint16Array(RX_RING_SIZE);
  readonly slotLen = new Uint16Array(RX_RING_SIZE);
  readonly slotOpEnd = new Uint16Array(RX_RING_SIZE);
  readonly copies = new CopyBatch(RX_RING_SIZE);
  frames = 0;
  slots = 0;
}

/** struct xenvif_queue */
class NetbackQueue implements PacketOrigin {
  readonly name: string;
  txRing: BackRing | null = null;
  rxRing: BackRing | null = null;
  txHandle = -1;
  rxHandle = -1;
  txIh: IntrHandle | null = null;
  rxIh: IntrHandle | null = null;
  // Guest RX queue: a ring of packets.
  readonly rxq: (Packet | null)[];
  rxqHead = 0;
  rxqCount = 0;
  rxqBytes = 0;
  lastRxMs = performance.now();
  stalled = false;
  // Credit scheduler (tx_credit_exceeded).
  creditBytes = Infinity;
  creditUsec = 0;
  remainingCredit = Infinity;
  nextCreditMs = 0;
  creditTimer: NodeJS.Timeout | null = null;
  readonly tx = new TxBatch();
  readonly rx = new RxBatch();
  /** Frames came in while a TX batch was forwarded: this queue's RX pass waits for its end (NetbackSet.rxLater). */
  rxLater = false;
  rxLaterMs = 0;
  waitingForPackets = false;
  /** The most TX requests one pass took, the passes that stopped at their time budget with requests left, and the pushes passes made before their end. */
  txPassMax = 0;
  txBudgetHits = 0;
  txPushes = 0;
  /** The MCAST_ADD/DEL extra of the request being built, and the answer it gets. */
  mcastType = 0;
  mcastStatus = 0;
  txDirty = false;
  rxDirty = false;
  readonly txReq = new Uint8Array(TX_BYTES);
  readonly txReqView = new DataView(this.txReq.buffer);
  readonly txRsp = new Uint8Array(TX_BYTES);
  readonly txRspView = new DataView(this.txRsp.buffer);
  readonly rxReq = new Uint8Array(RX_BYTES);
  readonly rxReqView = new DataView(this.rxReq.buffer);
  readonly rxRsp = new Uint8Array(RX_BYTES);
  readonly rxRspView = new DataView(this.rxRsp.buffer);
  readonly resume = (): void => this.vif.txAction(this);

  constructor(
    readonly vif: Netback,
    readonly id: number,
    rxqMax: number,
  ) {
    this.name = `${vif.name}-q${id}`;
    this.rxq = new Array<Packet | null>(rxqMax).fill(null);
  }

  packetDone(pkt: Packet): void {
    this.vif.txDone(this, pkt);
  }

  packetFault(_pkt: Packet, reason: string): void {
    // The frames forwarded before it reach their guests first, as if each had been copied when forwarded.
    this.vif.set.runDeferredRx();
    this.vif.disable(reason);
  }
}

/** One vif's backend (struct xenvif + backend_info), and its port on the bridge. */
export class Netback implements BridgePort {
  readonly name: string;
  readonly backendPath: string;
  readonly frontendPath: string;
  readonly stats = newPortStats();
  readonly log: Log;
  readonly queues: NetbackQueue[] = [];
  readonly mac = new Uint8Array(ETHER_ADDR_LEN);
  mtu = 1500;
  // What the frontend can take (read_xenbus_vif_flags).
  canSg = false;
  gso4 = false;
  gso6 = false;
  ipCsum = true;
  ipv6Csum = false;
  multicastControl = false;
  readonly mcast = new Set<number>();
  state: VifStats['state'] = 'waiting';
  reason: string | null = null;
  txErrors = 0;
  expired = 0;
  /** Frames copied into dom0 after holding their sender for holdMs. */
  released = 0;
  stalls = 0;
  bridge: Bridge | null = null;
  pcap: PcapWriter | null = null;
  private readonly abort = new AbortController();
  private feWatch: XsWatch | null = null;
  /** disconnect() has run: the rings and channels are let go. */
  private ringsReleased = false;
  private readonly rxFrags: Frag[] = Array.from({ length: MAX_FRAGS }, () => ({ domid: 0, ref: 0, byRef: false, offset: 0, len: 0 }));

  constructor(
    readonly set: NetbackSet,
    readonly spec: VifSpec,
  ) {
    this.name = `vif${spec.domid}.${spec.devid}`;
    this.log = logger('netback', this.name);
    this.backendPath = `/local/domain/0/backend/vif/${spec.domid}/${spec.devid}`;
    this.frontendPath = `/local/domain/${spec.domid}/device/vif/${spec.devid}`;
  }

  private get xs(): XenStore {
    return this.set.xs;
  }

  // --- xenbus: probe, connect, disconnect ---------------------------------------

  // netback_probe: advertise what we do, InitWait, then follow the frontend.
  async start(): Promise<void> {
    const b = this.backendPath;
    await this.xs.transaction(async (t) => {
      await t.write(`${b}/feature-sg`, '1');
      await t.write(`${b}/feature-gso-tcpv4`, '1');
      await t.write(`${b}/feature-gso-tcpv6`, '1');
      await t.write(`${b}/feature-ipv6-csum-offload`, '1');
      await t.write(`${b}/feature-rx-copy`, '1');
      await t.write(`${b}/feature-rx-flip`, '0');
      await t.write(`${b}/feature-multicast-control`, '1');
      await t.write(`${b}/feature-split-event-channels`, '1');
      await t.write(`${b}/multi-queue-max-queues`, String(this.set.opts.maxQueues));
    });
    await this.xs.write(`${b}/state`, String(XenbusStateInitWait));
    this.log('InitWait');
    void this.run().catch((err: Error) => {
      if (!this.abort.signal.aborted) void this.fatal(`connect: ${err.message}`);
    });
  }

  // frontend_changed: Connected -> connect; Closing, Closed or gone -> disconnect.
  private async run(): Promise<void> {
    const signal = this.abort.signal;
    const f = this.frontendPath;
    await this.xs.awaitState(`${f}/state`, XenbusStateConnected, { signal, timeoutMs: CONNECT_TIMEOUT_MS });
    if (signal.aborted) return;
    await this.connect(signal);
    if (signal.aborted) return;
    this.feWatch = await this.xs.watch(`${f}/state`, () => {
      void this.xs.read(`${f}/state`).then((v) => Number(v) >= XenbusStateClosing, () => true).then((closing) => {
        // A disabled vif lets go of the rings too, once its frontend gives up on it.
        if (closing && (this.state === 'connected' || this.state === 'disabled')) void this.disconnect('frontend closed');
      });
    });
  }

  // connect(): queues, address, rate, the frontend's flags, rings; Connected.
  private async connect(signal: AbortSignal): Promise<void> {
    const f = this.frontendPath;
    const b = this.backendPath;
    const n = await optional(this.xs.getNumber(`${f}/multi-queue-num-queues`, { signal }), 1);
    if (!Number.isInteger(n) || n < 1 || n > this.set.opts.maxQueues) {
      return this.fatal(`guest requested ${n} queues, but valid range is 1 - ${this.set.opts.maxQueues}`);
    }
    this.mac.set(parseMac(await this.xs.read(`${b}/mac`, { signal })));
    this.mtu = await optional(this.xs.getNumber(`${b}/mtu`, { signal }), 1500);
    const rate = await this.readRate(signal);
    const why = await this.readFlags(signal);
    if (why !== null) return this.fatal(why);
    for (let i = 0; i < n; i++) {
      const q = new NetbackQueue(this, i, this.set.opts.rxQueueMaxPackets);
      q.creditBytes = q.remainingCredit = rate.bytes;
      q.creditUsec = rate.usec;
      this.queues.push(q);
      await this.connectQueue(q, n === 1 ? f : `${f}/queue-${i}`, signal);
    }
    if (signal.aborted) return;
    if (this.spec.pcap != null) this.pcap = new PcapWriter(this.spec.pcap);
    this.bridge = this.set.bridges.get(this.spec.bridge);
    this.bridge.addPort(this);
    this.state = 'connected';
    for (const q of this.queues) {
      this.set.intr.intrUnmask(q.txIh!);
      if (q.rxIh !== q.txIh) this.set.intr.intrUnmask(q.rxIh!);
    }
    await this.xs.write(`${b}/state`, String(XenbusStateConnected));
    this.log('Connected: %s, %d queue(s), bridge %s%s', formatMac(this.mac), n, this.spec.bridge,
      Number.isFinite(rate.bytes) ? `, rate ${rate.bytes} bytes per ${rate.usec} us` : '');
    for (const q of this.queues) this.txAction(q);
  }

  /** xen_net_read_rate: "bytes,usec"; unlimited when absent or malformed. */
  private async readRate(signal: AbortSignal): Promise<{ bytes: number; usec: number }> {
    const text = await this.xs.read(`${this.backendPath}/rate`, { signal }).catch(() => '');
    const m = /^(\d+),(\d+)$/.exec(text);
    if (m === null) {
      if (text !== '') this.log('bad rate %s: unlimited', JSON.stringify(text));
      return { bytes: Infinity, usec: 0 };
    }
    return { bytes: Number(m[1]), usec: Number(m[2]) };
  }

  // read_xenbus_vif_flags
  private async readFlags(signal: AbortSignal): Promise<string | null> {
    const f = this.frontendPath;
    const is1 = (read: Promise<number>): Promise<boolean> => optional(read, 0).then((v) => v === 1, () => false);
    if (!(await is1(this.xs.getNumber(`${f}/request-rx-copy`, { signal })))) return 'the frontend does not request rx-copy';
    if (!(await is1(this.xs.getNumber(`${f}/feature-rx-notify`, { signal })))) return 'feature-rx-notify is mandatory';
    this.canSg = await is1(this.xs.getNumber(`${f}/feature-sg`, { signal }));
    this.gso4 = await is1(this.xs.getNumber(`${f}/feature-gso-tcpv4`, { signal }));
    this.gso6 = await is1(this.xs.getNumber(`${f}/feature-gso-tcpv6`, { signal }));
    this.ipCsum = !(await is1(this.xs.getNumber(`${f}/feature-no-csum-offload`, { signal })));
    this.ipv6Csum = await is1(this.xs.getNumber(`${f}/feature-ipv6-csum-offload`, { signal }));
    this.multicastControl = await is1(this.xs.getNumber(`${f}/request-multicast-control`, { signal }));
    return null;
  }

  // connect_data_rings + xenvif_connect_data: map both rings, bind the channel(s).
  private async connectQueue(q: NetbackQueue, dir: string, signal: AbortSignal): Promise<void> {
    const txRef = await this.xs.getNumber(`${dir}/tx-ring-ref`, { signal });
    const rxRef = await this.xs.getNumber(`${dir}/rx-ring-ref`, { signal });
    let txPort = await optional(this.xs.getNumber(`${dir}/event-channel-tx`, { signal }), -1);
    let rxPort = await optional(this.xs.getNumber(`${dir}/event-channel-rx`, { signal }), -1);
    if (txPort < 0 || rxPort < 0) txPort = rxPort = await this.xs.getNumber(`${dir}/event-channel`, { signal });
    const { hypercall, intr } = this.set;
    const domid = this.spec.domid;
    const tx = mapGrant(hypercall, domid, txRef);
    q.txHandle = tx.handle;
    q.txRing = new BackRing([tx.page], TX_BYTES, TX_RING_SIZE, `${q.name}-tx`, 'netif_tx');
    q.txRing.init();
    const rx = mapGrant(hypercall, domid, rxRef);
    q.rxHandle = rx.handle;
    q.rxRing = new BackRing([rx.page], RX_BYTES, RX_RING_SIZE, `${q.name}-rx`, 'netif_rx');
    q.rxRing.init();
    if (txPort === rxPort) {
      q.txIh = q.rxIh = bindInterdomain(hypercall, intr, domid, txPort, () => this.interrupt(q), q.name);
    } else {
      q.txIh = bindInterdomain(hypercall, intr, domid, txPort, () => this.txInterrupt(q), `${q.name}-tx`);
      q.rxIh = bindInterdomain(hypercall, intr, domid, rxPort, () => this.rxInterrupt(q), `${q.name}-rx`);
    }
  }

  /**
   * xenbus_dev_fatal: the reason under dom0's error/ tree, the vif Closing.
   * Also xenvif_fatal_tx_err's effect: the rings are no longer served.
   */
  disable(reason: string): void {
    if (this.state === 'disabled' || this.state === 'closed') return;
    this.state = 'disabled';
    this.reason = reason;
    this.log('fatal error; disabling device: %s', reason);
    this.dropQueued();
    void this.fatal(reason);
  }

  private async fatal(reason: string): Promise<void> {
    if (this.state !== 'disabled' && this.state !== 'closed') {
      this.state = 'disabled';
      this.reason = reason;
      this.log('fatal error: %s', reason);
    }
    await this.xs.write(`/local/domain/0/error/backend/vif/${this.spec.domid}/${this.spec.devid}/error`, reason).catch(() => undefined);
    await this.xs.write(`${this.backendPath}/state`, String(XenbusStateClosing)).catch(() => undefined);
  }

  /** backend_disconnect: off the bridge, channels closed, rings unmapped, queued frames dropped. */
  private async disconnect(why: string): Promise<void> {
    if (this.ringsReleased) return;
    this.ringsReleased = true;
    const wasConnected = this.state === 'connected';
    // A disabled vif keeps its state and reason for the counters.
    if (this.state !== 'disabled') this.state = 'closed';
    this.log('disconnect: %s', why);
    if (this.bridge !== null) {
      this.bridge.removePort(this);
      for (const q of this.queues) this.bridge.purge(q);
    }
    this.dropQueued();
    const { hypercall, intr } = this.set;
    for (const q of this.queues.splice(0)) {
      if (q.creditTimer !== null) clearTimeout(q.creditTimer);
      this.txDrop(q);
      const rxIh = q.rxIh;
      if (q.txIh !== null) await intr.intrDisestablish(q.txIh).catch(() => undefined);
      if (rxIh !== null && rxIh !== q.txIh) await intr.intrDisestablish(rxIh).catch(() => undefined);
      q.txIh = q.rxIh = null;
      if (q.txHandle >= 0) unmapGrant(hypercall, q.txHandle);
      if (q.rxHandle >= 0) unmapGrant(hypercall, q.rxHandle);
      q.txHandle = q.rxHandle = -1;
      q.txRing = q.rxRing = null;
    }
    this.pcap?.close();
    this.pcap = null;
    if (wasConnected) await this.xs.write(`${this.backendPath}/state`, String(XenbusStateClosing)).catch(() => undefined);
  }

  // netback_remove: Closing, everything let go, Closed.
  async stop(): Promise<void> {
    this.abort.abort();
    const w = this.feWatch;
    this.feWatch = null;
    await w?.unwatch().catch(() => undefined);
    await this.xs.write(`${this.backendPath}/state`, String(XenbusStateClosing)).catch(() => undefined);
    await this.disconnect('removed');
    await this.xs.write(`${this.backendPath}/state`, String(XenbusStateClosed)).catch(() => undefined);
    this.log('Closed');
  }

  vifStats(): VifStats {
    return {
      name: this.name, state: this.state, reason: this.reason, queues: this.queues.length,
      rxPackets: this.stats.rxPackets, rxBytes: this.stats.rxBytes, txPackets: this.stats.txPackets, txBytes: this.stats.txBytes,
      txDropped: this.stats.txDropped, txErrors: this.txErrors, expired: this.expired, released: this.released, stalls: this.stalls,
      rings: this.queues.map((q) => ({
        tx: ringDump(q.txRing), rx: ringDump(q.rxRing), rxQueued: q.rxqCount, rxQueuedBytes: q.rxqBytes, held: this.txHeld(q), stalled: q.stalled,
        ...eventCounts(q.txIh, q.rxIh), txPassMax: q.txPassMax, txBudgetHits: q.txBudgetHits, txPushes: q.txPushes,
      })),
    };
  }

  // --- interrupts -----------------------------------------------------------------

  private serving(): boolean {
    return this.state === 'connected';
  }

  // xenvif_interrupt: one channel for both rings.
  // The handlers return false when the event brought nothing new on the ring
  // (xenvif's XEN_EOI_FLAG_SPURIOUS), so that the interrupt layer throttles a
  // frontend that keeps signalling for nothing (XSA-332, XSA-391).
  private interrupt(q: NetbackQueue): boolean {
    const tx = this.txInterrupt(q);
    return this.rxInterrupt(q) || tx;
  }

  // The frontend posted TX requests.
  private txInterrupt(q: NetbackQueue): boolean {
    const work = q.txRing !== null && q.txRing.unconsumedRequests() > 0;
    if (this.serving()) this.txAction(q);
    return work;
  }

  // The frontend posted RX buffers.
  private rxInterrupt(q: NetbackQueue): boolean {
    const work = q.rxRing !== null && q.rxRing.unconsumedRequests() > 0;
    if (this.serving()) this.rxAction(q);
    return work;
  }

  // --- guest TX -------------------------------------------------------------------

  /**
   * xenvif_tx_action: until the ring is empty or we must wait, take a batch
   * of packets off the ring (xenvif_tx_build_gops), copy their heads into
   * dom0 in one hypercall, and answer or forward each (xenvif_tx_submit).
   *
   * A pass runs for at most TX_PASS_MS (NAPI's time budget): a frontend
   * that refills its ring as fast as dom0 empties it would otherwise keep
   * dom0's thread, and every other domain's devices and the toolstack with
   * it. With more waiting, the pass marks its port pending again
   * (resend_irq_on_evtchn) and returns; the vCPU gives the event loop its
   * turn and the next upcall goes on where this pass stopped. (A budget of
   * one ring's worth, 256 requests, cost a quarter of the 64-byte rate:
   * each cut ends a pass and its batching of answers and RX frames.)
   */
  txAction(q: NetbackQueue): void {
    const ring = q.txRing;
    if (ring === null || !this.serving()) return;
    const start = ring.reqConsumed;
    this.txPass(q, ring);
    const took = (ring.reqConsumed - start) >>> 0;
    if (took > q.txPassMax) q.txPassMax = took;
  }

  private txPass(q: NetbackQueue, ring: BackRing): void {
    const pool = this.set.pool;
    const b = q.tx;
    // Every half ring of requests taken, or TX_PUSH_BYTES of frames: one
    // clock reading, which the bridge stamps on each frame, and a push of
    // what was answered so far, so that the frontends take their TX answers
    // and RX frames (and post more) while this pass goes on instead of
    // after it. (Pushing every quarter ring woke the guests twice as often
    // for less: `node dist/bench/profile.js net 64` 0.84 Mpps against 0.98;
    // only at the end of a pass, 0.66.) A batch ends there too.
    const half = ring.size >> 1;
    let mark = ring.reqConsumed;
    let now = performance.now();
    const until = now + TX_PASS_MS;
    b.bytes = 0;
    for (;;) {
      if (!this.serving()) return;
      if (((ring.reqConsumed - mark) >>> 0) >= half || b.bytes >= TX_PUSH_BYTES) {
        mark = ring.reqConsumed;
        b.bytes = 0;
        now = performance.now();
        q.txPushes++;
        this.set.pushDirty();
        if (now >= until && ring.unconsumedRequests() > 0 && q.txIh !== null) {
          q.txBudgetHits++;
          this.set.intr.intrResend(q.txIh);
          return;
        }
      }
      if (!this.txSubmit(q, now)) return;
      const stop = this.txBuildBatch(q, mark, half);
      pool.copyBatch(q.tx.copies);
      if (!this.txSubmit(q, now)) return;
      if (stop === TX_EMPTY) break;
      if (stop === TX_NO_PACKET) {
        q.waitingForPackets = true;
        pool.whenFree(q.resume);
        return;
      }
      if (typeof stop === 'string') return this.disable(stop);
    }
    if (ring.error !== undefined) this.disable(ring.error.message);
  }

  /**
   * Take packets off the ring into q.tx, each with its header copies, until
   * `half` requests from `mark` or TX_PUSH_BYTES of frames are taken (or the
   * batch is full). Why it stopped: TX_MORE, TX_EMPTY, TX_NO_PACKET, or a
   * reason to disable the vif (the packets before the bad one are still to
   * be sent on).
   */
  private txBuildBatch(q: NetbackQueue, mark: number, half: number): number | string {
    const ring = q.txRing!;
    const pool = this.set.pool;
    const b = q.tx;
    b.count = b.next = 0;
    b.copies.count = 0;
    while (((ring.reqConsumed - mark) >>> 0) < half && b.bytes < TX_PUSH_BYTES && b.count < b.pkts.length && b.copies.room >= MAX_FRAGS) {
      if (ring.unconsumedRequests() === 0 && !ring.finalCheckForRequests()) return TX_EMPTY;
      if (ring.error !== undefined) return ring.error.message;
      const pkt = pool.get(q);
      if (pkt === null) return TX_NO_PACKET;
      const answer = this.txBuild(q, pkt);
      if (typeof answer === 'string') {
        pkt.origin = null;
        pool.release(pkt);
        return answer;
      }
      if (answer === FORWARD) pool.headerCopies(pkt, b.copies);
      b.pkts[b.count] = pkt;
      b.answer[b.count] = answer;
      b.bytes += pkt.len;
      b.opEnd[b.count++] = b.copies.count;
    }
    return TX_MORE;
  }

  /**
   * xenvif_tx_submit: the batch's packets from q.tx.next on, in ring order,
   * each answered or forwarded. The frames it forwards to guests are copied
   * into them after it, in one RX pass per guest queue (NetbackSet.rxLater).
   * False when a packet waits for credit (those after it wait behind it),
   * or the vif was disabled.
   */
  private txSubmit(q: NetbackQueue, now: number): boolean {
    this.set.deferRx();
    try {
      return this.txSubmitBatch(q, now);
    } finally {
      this.set.runDeferredRx();
    }
  }

  private txSubmitBatch(q: NetbackQueue, now: number): boolean {
    const b = q.tx;
    const set = this.set;
    for (; b.next < b.count; b.next++) {
      const i = b.next;
      const pkt = b.pkts[i]!;
      if (!this.serving()) break;
      if (b.answer[i] !== FORWARD) {
        // Answered in ring order: after what the frames before it did in their receivers.
        set.runDeferredRx();
        this.txAnswer(q, pkt, b.answer[i]!);
        set.deferRx();
      } else if (!this.headerCopied(b, i)) {
        set.runDeferredRx();
        this.disable(`TX grant ${pkt.frags[0]!.ref} cannot be copied`);
        break;
      } else if (this.creditExceeded(q, pkt.len, now)) {
        return false;
      } else {
        if (pkt.len <= HEADER_BYTES) set.pool.fragsFromHeader(pkt);
        this.forward(pkt, now);
      }
      b.pkts[i] = null;
    }
    if (b.next === b.count) return true;
    set.runDeferredRx();
    this.txDrop(q);
    return false;
  }

  private headerCopied(b: TxBatch, i: number): boolean {
    for (let op = i === 0 ? 0 : b.opEnd[i - 1]!; op < b.opEnd[i]!; op++) {
      if (b.copies.status(op) !== GNTST_okay) return false;
    }
    return true;
  }

  /** A packet not forwarded (a runt, multicast control): every slot answered `status`, and the packet let go. */
  private txAnswer(q: NetbackQueue, pkt: Packet, status: number): void {
    this.answerAll(q, pkt, status);
    pkt.origin = null;
    this.set.pool.release(pkt);
  }

  /** Packets of the batch not sent on (the vif stops): let go, unanswered. */
  private txDrop(q: NetbackQueue): void {
    const b = q.tx;
    for (; b.next < b.count; b.next++) {
      const pkt = b.pkts[b.next]!;
      b.pkts[b.next] = null;
      pkt.origin = null;
      this.set.pool.release(pkt);
    }
  }

  /** Packets of the last batch wait for credit. */
  private txHeld(q: NetbackQueue): boolean {
    return q.tx.next < q.tx.count;
  }

  /** Into the bridge, then drop the maker's reference. */
  private forward(pkt: Packet, now: number): void {
    if (this.pcap !== null) this.capture(pkt);
    if (this.bridge !== null) this.bridge.input(this, pkt, now);
    this.set.pool.release(pkt);
  }

  private capture(pkt: Packet): void {
    const bytes = this.set.pool.materialize(pkt);
    if (bytes !== null) this.pcap!.write(bytes);
    else if (this.set.pool.failedFrag >= 0) pkt.origin?.packetFault(pkt, 'a TX grant could not be copied');
  }

  /** tx_credit_exceeded: refill the credit each interval; a packet larger than what is left waits for the timer. */
  private creditExceeded(q: NetbackQueue, size: number, now: number): boolean {
    if (!Number.isFinite(q.creditBytes)) return false;
    if (now >= q.nextCreditMs) {
      const burst = Math.max(q.creditBytes, MAX_BURST_BYTES);
      q.remainingCredit = Math.min(q.remainingCredit + q.creditBytes, burst);
      q.nextCreditMs = now + q.creditUsec / 1000;
    }
    if (size <= q.remainingCredit) {
      q.remainingCredit -= size;
      return false;
    }
    if (q.creditTimer === null) {
      q.creditTimer = setTimeout(() => {
        q.creditTimer = null;
        this.txAction(q);
        this.set.scheduleFlush();
      }, Math.max(1, q.nextCreditMs - now));
      q.creditTimer.unref();
    }
    return true;
  }

  /**
   * xenvif_tx_build_gops for one packet: the first request, its extras, the
   * rest of its slots, each copied once and checked. Returns a reason to
   * disable the vif, or what to do with the packet: FORWARD, or the status
   * to answer each of its slots with (a runt, a multicast control).
   */
  private txBuild(q: NetbackQueue, pkt: Packet): string | number {
    const ring = q.txRing!;
    const v = q.txReqView;
    if (!this.take(ring, q.txReq)) return 'request vanished';
    const size = v.getUint16(TXQ_SIZE, true);
    const flags = v.getUint16(TXQ_FLAGS, true);
    this.setFrag(pkt.frags[0]!, v);
    pkt.ids[0] = v.getUint16(TXQ_ID, true);
    pkt.nrIds = 1;
    pkt.nrFrags = 1;
    pkt.originQueue = q.id;
    if ((flags & NETTXF_extra_info) !== 0) {
      const why = this.txExtras(q, pkt);
      if (why !== null) return why;
      if (q.mcastType !== 0) return q.mcastStatus;
    }
    let remaining = size;
    for (let more = (flags & NETTXF_more_data) !== 0; more; ) {
      if (!this.take(ring, q.txReq)) return `packet runs past req_prod after ${pkt.nrFrags} slots`;
      if (pkt.nrFrags >= XEN_NETIF_NR_SLOTS_MIN) return `asked for more than ${XEN_NETIF_NR_SLOTS_MIN} slots`;
      const f = pkt.frags[pkt.nrFrags++]!;
      this.setFrag(f, v);
      pkt.ids[pkt.nrIds++] = v.getUint16(TXQ_ID, true);
      if (f.len > remaining) return `frag of ${f.len} bytes is bigger than the frame (${remaining} left)`;
      if (f.offset + f.len > PAGE_SIZE) return `slot crosses its page: offset ${f.offset}, size ${f.len}`;
      remaining -= f.len;
      more = (v.getUint16(TXQ_FLAGS, true) & NETTXF_more_data) !== 0;
    }
    const f0 = pkt.frags[0]!;
    f0.len = remaining;
    if (f0.offset + f0.len > PAGE_SIZE) return `first slot crosses its page: offset ${f0.offset}, size ${f0.len}`;
    pkt.len = size;
    if (pkt.len < ETHER_HDR_LEN) {
      this.txErrors++;
      return NETIF_RSP_ERROR;
    }
    pkt.csumBlank = (flags & NETTXF_csum_blank) !== 0;
    pkt.dataValidated = (flags & NETTXF_data_validated) !== 0;
    return FORWARD;
  }

  /** Take one request into buf; once more with a fresh look at req_prod if the last look is used up. */
  private take(ring: BackRing, buf: Uint8Array): boolean {
    if (ring.takeRequest(buf)) return true;
    ring.unconsumedRequests();
    return ring.takeRequest(buf);
  }

  private setFrag(f: Frag, v: DataView): void {
    f.domid = this.spec.domid;
    f.byRef = true;
    f.ref = v.getUint32(TXQ_GREF, true);
    f.offset = v.getUint16(TXQ_OFFSET, true);
    f.len = v.getUint16(TXQ_SIZE, true);
  }

  /** xenvif_get_extras (+ xenvif_set_skb_gso, xenvif_mcast_add/del): a reason to disable, or null. */
  private txExtras(q: NetbackQueue, pkt: Packet): string | null {
    const ring = q.txRing!;
    q.mcastType = 0;
    for (let more = true; more; ) {
      if (!this.take(ring, q.txReq)) return 'missing extra info';
      if (++pkt.nrExtras > XEN_NETIF_EXTRA_TYPE_MAX) return 'too many extra info slots';
      const type = q.txReq[EXT_TYPE]!;
      more = (q.txReq[EXT_FLAGS]! & XEN_NETIF_EXTRA_FLAG_MORE) !== 0;
      if (type === 0 || type >= XEN_NETIF_EXTRA_TYPE_MAX) return `invalid extra type: ${type}`;
      if (type === XEN_NETIF_EXTRA_TYPE_GSO) {
        const size = q.txReqView.getUint16(EXT_GSO_SIZE, true);
        const gso = q.txReq[EXT_GSO_TYPE]!;
        if (size === 0) return 'GSO size must not be zero';
        if (gso !== XEN_NETIF_GSO_TYPE_TCPV4 && gso !== XEN_NETIF_GSO_TYPE_TCPV6) return `bad GSO type ${gso}`;
        pkt.gsoType = gso;
        pkt.gsoSize = size;
      } else if (type === XEN_NETIF_EXTRA_TYPE_MCAST_ADD || type === XEN_NETIF_EXTRA_TYPE_MCAST_DEL) {
        q.mcastType = type;
        q.mcastStatus = this.mcastChange(q.txReq.subarray(EXT_MCAST_ADDR, EXT_MCAST_ADDR + ETHER_ADDR_LEN), type === XEN_NETIF_EXTRA_TYPE_MCAST_ADD);
      }
    }
    return null;
  }

  private mcastChange(addr: Uint8Array, add: boolean): number {
    if (!isMulticast(addr)) return NETIF_RSP_ERROR;
    const key = macKey(addr);
    if (!add) {
      this.mcast.delete(key);
      return NETIF_RSP_OKAY;
    }
    if (!this.mcast.has(key) && this.mcast.size >= MCAST_MAX) return NETIF_RSP_ERROR;
    this.mcast.add(key);
    return NETIF_RSP_OKAY;
  }

  /** Every slot of the packet answered `status` (xenvif_tx_err for NETIF_RSP_ERROR). */
  private answerAll(q: NetbackQueue, pkt: Packet, status: number): void {
    this.answer(q, pkt.ids[0]!, status, pkt.nrExtras);
    for (let i = 1; i < pkt.nrIds; i++) this.answer(q, pkt.ids[i]!, status, 0);
  }

  /** make_tx_response: the request's id and status, then NETIF_RSP_NULL for each extra slot. */
  private answer(q: NetbackQueue, id: number, status: number, extras: number): void {
    const ring = q.txRing;
    if (ring === null) return;
    q.txRspView.setUint16(TXP_ID, id, true);
    q.txRspView.setInt16(TXP_STATUS, status, true);
    ring.putResponse(q.txRsp);
    for (let i = 0; i < extras; i++) {
      q.txRspView.setInt16(TXP_STATUS, NETIF_RSP_NULL, true);
      ring.putResponse(q.txRsp);
    }
    this.markTx(q);
  }

  /** Every port let go of a packet this queue made: answer its requests. */
  txDone(q: NetbackQueue, pkt: Packet): void {
    if (this.state !== 'connected' || q.txRing === null) return;
    this.answerAll(q, pkt, NETIF_RSP_OKAY);
  }

  private markTx(q: NetbackQueue): void {
    if (q.txDirty) return;
    q.txDirty = true;
    this.set.dirty(q);
  }

  private markRx(q: NetbackQueue): void {
    if (q.rxDirty) return;
    q.rxDirty = true;
    this.set.dirty(q);
  }

  /** Mid-pass: push what was answered on both rings so far and signal where the frontend asked for it. */
  push(q: NetbackQueue): void {
    const intr = this.set.intr;
    if (q.txDirty && q.txRing !== null && q.txRing.pushResponses() && q.txIh !== null) intr.intrSignal(q.txIh);
    if (q.rxDirty && q.rxRing !== null && q.rxRing.pushResponses() && q.rxIh !== null) intr.intrSignal(q.rxIh);
  }

  /** End of the turn: push what was answered on both rings, signal where the frontend asked, and take requests the answers made room for. */
  flush(q: NetbackQueue): void {
    const tx = q.txDirty;
    this.push(q);
    q.txDirty = q.rxDirty = false;
    // Answers free ring slots: more requests may be waiting behind them.
    if (tx && q.txRing !== null && this.serving() && !this.txHeld(q)) this.txAction(q);
  }

  // --- guest RX -------------------------------------------------------------------

  /** xenvif_start_xmit: the bridge hands us a frame for the guest. */
  deliver(pkt: Packet): void {
    if (this.state !== 'connected') return;
    const hdr = pkt.header;
    if (this.multicastControl && isMulticast(hdr) && !isBroadcast(hdr) && !this.mcast.has(macKey(hdr))) return;
    if (pkt.gsoType !== 0 && !this.takesGso(pkt.gsoType)) return this.deliverSegments(pkt);
    if (!this.canSg && pkt.len > PAGE_SIZE) {
      this.stats.txDropped++;
      return;
    }
    this.enqueue(pkt);
  }

  private takesGso(type: number): boolean {
    return (type === XEN_NETIF_GSO_TYPE_TCPV4 && this.gso4) || (type === XEN_NETIF_GSO_TYPE_TCPV6 && this.gso6);
  }

  /** A GSO frame for a frontend that did not ask for GSO: cut in dom0, each segment queued as a frame of its own. */
  private deliverSegments(pkt: Packet): void {
    this.segHash = pkt.hash;
    this.segQueuedAtMs = pkt.queuedAtMs;
    if (!this.set.pool.unoffload(pkt, this.segmentIn)) this.rxUnavailable(pkt, this.set.pool.failedFrag >= 0);
  }

  private segHash = 0;
  private segQueuedAtMs = 0;
  private readonly segmentIn = (frame: Uint8Array): void => {
    const pool = this.set.pool;
    const p = pool.get(null);
    if (p === null || !pool.attachBuffer(p, frame.length)) {
      if (p !== null) pool.release(p);
      this.stats.txDropped++;
      return;
    }
    p.len = frame.length;
    copyBytes(p.buf!.bytes, 0, frame, 0, frame.length);
    pool.fragsFromBuffer(p);
    p.headerLen = Math.min(HEADER_BYTES, frame.length);
    p.header.set(frame.subarray(0, p.headerLen));
    p.dataValidated = true;
    p.hash = this.segHash;
    p.queuedAtMs = this.segQueuedAtMs;
    // To the ring at once: a segment holds a pool buffer until copied.
    if (this.canSg || p.len <= PAGE_SIZE) this.enqueue(p, false);
    else this.stats.txDropped++;
    pool.release(p);
  };

  /**
   * Into the guest-RX queue its hash picks, if there is room (XSA-392), and
   * on to the ring: now, or (`later`) after the TX batch that forwards it.
   */
  private enqueue(pkt: Packet, later = true): void {
    const q = this.queues[this.queues.length === 1 ? 0 : pkt.hash % this.queues.length]!;
    // The bound is on what stays queued: frames of this batch go to the ring first, as they would have one by one.
    if (q.rxLater && this.rxqFull(q, pkt)) this.rxAction(q, q.rxLaterMs);
    if (q.stalled || this.rxqFull(q, pkt)) {
      this.stats.txDropped++;
      return;
    }
    pkt.refs++;
    q.rxq[(q.rxqHead + q.rxqCount) % q.rxq.length] = pkt;
    q.rxqCount++;
    q.rxqBytes += pkt.len;
    if (!later || !this.set.rxLater(q, pkt.queuedAtMs)) this.rxAction(q, pkt.queuedAtMs);
  }

  private rxqFull(q: NetbackQueue, pkt: Packet): boolean {
    return q.rxqCount >= q.rxq.length || q.rxqBytes + pkt.len > this.set.opts.rxQueueMaxBytes;
  }

  /** Whether the frame must reach this guest with its checksum filled in. */
  private needsChecksum(pkt: Packet): boolean {
    if (!pkt.csumBlank) return false;
    const v6 = pkt.headerLen >= ETHER_HDR_LEN && ((pkt.header[12]! << 8) | pkt.header[13]!) === ETHERTYPE_IPV6;
    return v6 ? !this.ipv6Csum : !this.ipCsum;
  }

  /**
   * xenvif_rx_action: move queued frames into the buffers the frontend
   * posted, a batch at a time: take the frames and their slots (rxBuild),
   * copy them in one hypercall, then answer each slot by its copies.
   */
  rxAction(q: NetbackQueue, now = performance.now()): void {
    const ring = q.rxRing;
    if (ring === null) return;
    let moved = false;
    while (q.rxqCount > 0 && this.state === 'connected') {
      if (this.rxBuild(q) === 0) break;
      this.set.pool.copyBatch(q.rx.copies);
      this.rxComplete(q);
      moved = true;
    }
    if (moved) {
      q.lastRxMs = now;
      q.stalled = false;
    }
    if (ring.error !== undefined) this.disable(ring.error.message);
  }

  private rxqPop(q: NetbackQueue): Packet {
    const pkt = q.rxq[q.rxqHead]!;
    q.rxq[q.rxqHead] = null;
    q.rxqHead = (q.rxqHead + 1) % q.rxq.length;
    q.rxqCount--;
    q.rxqBytes -= pkt.len;
    return pkt;
  }

  /** RX slots the frame takes: one per piece (one in all without SG), one for a GSO extra. */
  private slotsFor(pkt: Packet): number {
    const pieces = this.needsChecksum(pkt) ? Math.ceil(pkt.len / PAGE_SIZE) : pkt.nrFrags;
    return (this.canSg ? pieces : 1) + (pkt.gsoType !== 0 ? 1 : 0);
  }

  /**
   * Frames off the queue into q.rx while the ring has their slots: each
   * takes its slots and adds its copies. A frame whose checksum dom0 fills
   * in goes alone, as it takes a dom0 buffer. The number of frames.
   */
  private rxBuild(q: NetbackQueue): number {
    const ring = q.rxRing!;
    const b = q.rx;
    b.frames = b.slots = 0;
    b.copies.count = 0;
    while (q.rxqCount > 0 && b.frames < b.pkts.length && b.copies.room >= MAX_FRAGS) {
      const pkt = q.rxq[q.rxqHead]!;
      const csum = this.needsChecksum(pkt);
      if (csum && b.frames > 0) break;
      if (!ring.requestsAvailable(this.slotsFor(pkt))) break;
      this.rxqPop(q);
      this.rxBuildFrame(q, pkt, csum);
      if (csum) break;
    }
    return b.frames;
  }

  /** xenvif_rx_skb's first half: the frame's slots taken and its pieces' copies added. */
  private rxBuildFrame(q: NetbackQueue, pkt: Packet, csum: boolean): void {
    const b = q.rx;
    const i = b.frames++;
    b.pkts[i] = pkt;
    b.kind[i] = RX_COPY;
    let frags = pkt.frags;
    let n = pkt.nrFrags;
    b.flags[i] = pkt.csumBlank ? NETRXF_csum_blank | NETRXF_data_validated : pkt.dataValidated ? NETRXF_data_validated : 0;
    b.slotEnd[i] = b.slots;
    if (csum) {
      if (this.set.pool.complete(pkt) === null) {
        b.kind[i] = this.set.pool.failedFrag >= 0 ? RX_BAD_SENDER : RX_NO_BUFFER;
        return;
      }
      n = this.bufferFrags(pkt);
      frags = this.rxFrags;
      b.flags[i] = NETRXF_data_validated;
    }
    if (this.canSg) this.rxSg(q, pkt, frags, n);
    else this.rxLinear(q, pkt, frags, n);
    b.slotEnd[i] = b.slots;
  }

  /** The packet's buffer as frags of dom0 pages. */
  private bufferFrags(pkt: Packet): number {
    const buf = pkt.buf!;
    let n = 0;
    for (let off = 0; off < pkt.len; off += PAGE_SIZE, n++) {
      const f = this.rxFrags[n]!;
      f.domid = 0;
      f.byRef = false;
      f.ref = buf.gfn + off / PAGE_SIZE;
      f.offset = 0;
      f.len = Math.min(PAGE_SIZE, pkt.len - off);
    }
    return n;
  }

  /** Could not make the frame's bytes in dom0 (no buffer, or a sender's grant failed): drop it. */
  private rxUnavailable(pkt: Packet, badSender: boolean): void {
    this.stats.txDropped++;
    if (badSender) pkt.origin?.packetFault(pkt, 'a TX grant could not be copied');
  }

  /**
   * With SG: one slot per piece. A frame in one piece goes at the start of
   * the page, as Linux's netback puts each slot's data (rsp->offset 0), but
   * for the source's offset within a word, which keeps the copy aligned: a
   * frontend that keeps a view of each buffer (xnf) then sees the same span
   * frame after frame, where a 64-byte frame made in a dom0 header buffer
   * would land at a new offset each time. The pieces of a longer frame keep
   * their offsets, so that pieces that meet end to end in the sender's pages
   * meet in the receiver's.
   */
  private rxSg(q: NetbackQueue, pkt: Packet, frags: Frag[], n: number): void {
    const b = q.rx;
    for (let i = 0; i < n; i++) {
      const f = frags[i]!;
      const at = n === 1 ? f.offset & 3 : f.offset;
      const gref = this.rxSlot(q, at, f.len);
      if (f.len > 0) this.set.pool.addCopy(b.copies, f, f.offset, this.spec.domid, gref, true, at, f.len);
      b.slotOpEnd[b.slots - 1] = b.copies.count;
      if (i === 0 && pkt.gsoType !== 0) q.rxRing!.takeRequest(q.rxReq); // the GSO extra's
    }
  }

  /** Without SG: the whole frame (at most a page) in one slot. */
  private rxLinear(q: NetbackQueue, pkt: Packet, frags: Frag[], n: number): void {
    const b = q.rx;
    const gref = this.rxSlot(q, 0, pkt.len);
    let at = 0;
    for (let i = 0; i < n; i++) {
      const f = frags[i]!;
      if (f.len > 0) this.set.pool.addCopy(b.copies, f, f.offset, this.spec.domid, gref, true, at, f.len);
      at += f.len;
    }
    b.slotOpEnd[b.slots - 1] = b.copies.count;
    if (pkt.gsoType !== 0) q.rxRing!.takeRequest(q.rxReq); // the GSO extra's
  }

  /** Take the next RX request as a slot of the batch, answered later at `offset` with `len` bytes; its gref. */
  private rxSlot(q: NetbackQueue, offset: number, len: number): number {
    const b = q.rx;
    q.rxRing!.takeRequest(q.rxReq);
    b.slotId[b.slots] = q.rxReqView.getUint16(RXQ_ID, true);
    b.slotOffset[b.slots] = offset;
    b.slotLen[b.slots++] = len;
    return q.rxReqView.getUint32(RXQ_GREF, true);
  }

  /**
   * The batch's frames in order: each slot answered by its copies' statuses,
   * then the frame let go. A copy into this guest that failed disables this
   * vif: the frames after it are dropped, as they would have been queued.
   */
  private rxComplete(q: NetbackQueue): void {
    const b = q.rx;
    const pool = this.set.pool;
    for (let i = 0, slot = 0; i < b.frames; slot = b.slotEnd[i++]!) {
      const pkt = b.pkts[i]!;
      b.pkts[i] = null;
      const why = b.kind[i] === RX_COPY ? this.rxPacket(q, pkt, i, slot) : (this.rxUnavailable(pkt, b.kind[i] === RX_BAD_SENDER), null);
      if (why !== null) {
        this.rxDropBatch(q, i + 1);
        this.disable(why);
        this.markRx(q);
        pool.release(pkt);
        return;
      }
      pool.release(pkt);
    }
  }

  /**
   * xenvif_rx_skb's second half: one frame's responses, each slot by the
   * statuses of its copies. On a failed copy, find whose grant broke: the
   * sender's (its vif is disabled, this slot and the rest answered with an
   * error) or this guest's (returned: the reason to disable this vif).
   */
  private rxPacket(q: NetbackQueue, pkt: Packet, i: number, first: number): string | null {
    const b = q.rx;
    if (this.pcap !== null) this.capture(pkt);
    this.stats.txPackets++;
    this.stats.txBytes += pkt.len;
    const end = b.slotEnd[i]!;
    let failed = false;
    for (let s = first, op = first === 0 ? 0 : b.slotOpEnd[first - 1]!; s < end; op = b.slotOpEnd[s++]!) {
      for (; !failed && op < b.slotOpEnd[s]!; op++) {
        if (b.copies.status(op) === GNTST_okay) continue;
        const copy = b.copies.ops[op]!;
        if ((copy.flags & GNTCOPY_source_gref) === 0 || this.set.pool.probeSource(copy)) return `RX grant ${copy.dest.u.ref} cannot be copied into`;
        pkt.origin?.packetFault(pkt, `TX grant ${copy.source.u.ref} cannot be copied`);
        failed = true;
      }
      let fl = s + 1 < end ? NETRXF_more_data : 0;
      if (s === first) fl |= b.flags[i]! | (pkt.gsoType !== 0 ? NETRXF_extra_info : 0);
      this.rxResponse(q, b.slotId[s]!, b.slotOffset[s]!, fl, failed ? NETIF_RSP_ERROR : b.slotLen[s]!);
      if (s === first && pkt.gsoType !== 0) this.rxGsoExtra(q, pkt);
    }
    this.markRx(q);
    return null;
  }

  /** Frames of the batch from `from` on, dropped unanswered (this vif is going down). */
  private rxDropBatch(q: NetbackQueue, from: number): void {
    const b = q.rx;
    for (let i = from; i < b.frames; i++) {
      this.stats.txDropped++;
      this.set.pool.release(b.pkts[i]!);
      b.pkts[i] = null;
    }
  }

  private rxResponse(q: NetbackQueue, id: number, offset: number, flags: number, status: number): void {
    const v = q.rxRspView;
    v.setUint16(RXP_ID, id, true);
    v.setUint16(RXP_OFFSET, offset, true);
    v.setUint16(RXP_FLAGS, flags, true);
    v.setInt16(RXP_STATUS, status, true);
    q.rxRing!.putResponse(q.rxRsp);
  }

  /** The GSO extra: it used up the request after the first slot's (rxBuildFrame), and its response sits in that request's slot. */
  private rxGsoExtra(q: NetbackQueue, pkt: Packet): void {
    const ring = q.rxRing!;
    q.rxRsp.fill(0);
    q.rxRsp[EXT_TYPE] = XEN_NETIF_EXTRA_TYPE_GSO;
    q.rxRsp[EXT_FLAGS] = 0;
    q.rxRspView.setUint16(EXT_GSO_SIZE, pkt.gsoSize, true);
    q.rxRsp[EXT_GSO_TYPE] = pkt.gsoType;
    ring.putResponse(q.rxRsp);
  }

  /** Drop every queued frame (disabled, disconnected). */
  private dropQueued(): void {
    for (const q of this.queues) {
      while (q.rxqCount > 0) {
        this.stats.txDropped++;
        this.set.pool.release(this.rxqPop(q));
      }
    }
  }

  /**
   * The vif that sent some of the queued frames is going away, and its
   * grants with it: each such frame is copied into dom0 while pool buffers
   * last, and stays queued, as Linux netback's skbs outlive their sender's
   * disconnect; one that cannot be copied is dropped and counted.
   */
  purge(origin: PacketOrigin): void {
    const pool = this.set.pool;
    for (const q of this.queues) {
      const keep: Packet[] = [];
      while (q.rxqCount > 0) {
        const pkt = this.rxqPop(q);
        if (pkt.origin !== origin || this.letSenderGo(pkt)) keep.push(pkt);
        else {
          this.stats.txDropped++;
          pool.release(pkt);
        }
      }
      for (const pkt of keep) {
        q.rxq[(q.rxqHead + q.rxqCount) % q.rxq.length] = pkt;
        q.rxqCount++;
        q.rxqBytes += pkt.len;
      }
    }
  }

  /**
   * Frames at the head of the queue that waited longer than holdMs stop
   * pointing at their sender's grants: copied into dom0 (the sender's
   * requests answered now), oldest first, while pool buffers last.
   */
  private releaseSenders(q: NetbackQueue, now: number): void {
    const pool = this.set.pool;
    for (let i = 0; i < q.rxqCount; i++) {
      const pkt = q.rxq[(q.rxqHead + i) % q.rxq.length]!;
      if (now - pkt.queuedAtMs <= this.set.opts.holdMs) return;
      if (pkt.origin === null) continue;
      if (!this.letSenderGo(pkt)) {
        if (pool.failedFrag >= 0) pkt.origin.packetFault(pkt, 'a TX grant could not be copied');
        return;
      }
    }
  }

  /** The frame copied into a pool buffer of dom0's and its sender's requests answered; false when it could not be. */
  private letSenderGo(pkt: Packet): boolean {
    const pool = this.set.pool;
    const origin = pkt.origin!;
    if (pool.materialize(pkt) === null) return false;
    pool.fragsFromBuffer(pkt);
    pkt.origin = null;
    origin.packetDone(pkt);
    this.released++;
    return true;
  }

  /**
   * xenvif_rx_queue_drop_expired and the stall check: frames queued longer
   * than drainTimeoutMs go; a queue that moved nothing for stallTimeoutMs
   * while the frontend posted no buffer is stalled until it posts one.
   */
  checkQueues(now: number): void {
    if (this.state !== 'connected') return;
    const { drainTimeoutMs, stallTimeoutMs } = this.set.opts;
    for (const q of this.queues) {
      const ring = q.rxRing;
      if (ring === null) continue;
      this.releaseSenders(q, now);
      if (q.stalled && ring.unconsumedRequests() > 0) {
        q.stalled = false;
        q.lastRxMs = now;
        this.log('%s: ready again', q.name);
      }
      while (q.rxqCount > 0 && now - q.rxq[q.rxqHead]!.queuedAtMs > drainTimeoutMs) {
        this.expired++;
        this.stats.txDropped++;
        this.set.pool.release(this.rxqPop(q));
      }
      if (q.rxqCount === 0) {
        q.lastRxMs = now;
      } else if (!q.stalled && now - q.lastRxMs > stallTimeoutMs && ring.unconsumedRequests() === 0) {
        q.stalled = true;
        this.stalls++;
        this.log('%s: stalled, no RX buffers for %d ms', q.name, Math.round(now - q.lastRxMs));
        while (q.rxqCount > 0) {
          this.stats.txDropped++;
          this.set.pool.release(this.rxqPop(q));
        }
      }
    }
  }
}

/** dom0's netbacks, per domain and devid; they share the frame pool and the bridges. */
export class NetbackSet {
  private readonly vifs = new Map<string, Netback>();
  readonly opts: Resolved;
  private readonly dirtyQueues: NetbackQueue[] = [];
  private flushScheduled = false;
  private rxDeferred = false;
  private readonly rxWaiting: NetbackQueue[] = [];
  private timer: NodeJS.Timeout | null = null;

  constructor(
    readonly hypercall: Hypercall,
    readonly intr: Interrupts,
    readonly xs: XenStore,
    readonly bridges: Bridges,
    opts: NetbackOptions = {},
  ) {
    this.opts = {
      maxQueues: opts.maxQueues ?? 8,
      rxQueueMaxPackets: opts.rxQueueMaxPackets ?? 2048,
      rxQueueMaxBytes: opts.rxQueueMaxBytes ?? 2 << 20,
      drainTimeoutMs: opts.drainTimeoutMs ?? 10_000,
      stallTimeoutMs: opts.stallTimeoutMs ?? 60_000,
      holdMs: opts.holdMs ?? 500,
    };
  }

  get pool(): FramePool {
    return this.bridges.pool;
  }

  async start(spec: VifSpec): Promise<void> {
    const key = `${spec.domid}/${spec.devid}`;
    if (this.vifs.has(key)) throw new XenError('EEXIST', `vif${spec.domid}.${spec.devid} exists`);
    const vif = new Netback(this, spec);
    this.vifs.set(key, vif);
    try {
      await vif.start();
    } catch (err) {
      this.vifs.delete(key);
      throw err;
    }
    this.armTimer();
  }

  /** Stop the vifs of `domid` (one devid, or all). */
  async stop(domid: number, devid?: number): Promise<void> {
    for (const [key, vif] of [...this.vifs]) {
      if (vif.spec.domid !== domid || (devid !== undefined && vif.spec.devid !== devid)) continue;
      this.vifs.delete(key);
      await vif.stop();
    }
    if (this.vifs.size === 0 && this.timer !== null) {
      clearInterval(this.timer);
      this.timer = null;
    }
  }

  /**
   * Kill the vif's backend and start a new one while the guest runs, as a
   * backend crash and restart would (online stays 1, so the frontend
   * reconnects); resolves once the new one is Connected (ETIMEDOUT after
   * `timeoutMs`).
   */
  async restart(domid: number, devid: number, timeoutMs = 30_000): Promise<void> {
    const key = `${domid}/${devid}`;
    const old = this.vifs.get(key);
    if (old === undefined) throw new XenError('ENODEV', `no vif ${devid} of domain ${domid}`);
    await old.stop();
    // The new backend must not map the rings the frontend used with the old one: wait (bounded) until it lets go.
    const released = (v: string | undefined): boolean => v === undefined || (Number(v) !== XenbusStateConnected && Number(v) !== XenbusStateInitialised);
    await this.xs.awaitState(`${old.frontendPath}/state`, released, { timeoutMs }).catch(() => undefined);
    const vif = new Netback(this, old.spec);
    this.vifs.set(key, vif);
    await vif.start();
    await this.xs.awaitState(`${vif.backendPath}/state`, XenbusStateConnected, { timeoutMs });
  }

  list(): VifStats[] {
    return [...this.vifs.values()].map((v) => v.vifStats());
  }

  /** Each vif of `domid` with its counters, for `xenpv top`. */
  stats(domid: number): { devid: number; counters: Record<string, number> }[] {
    return [...this.vifs.values()].filter((v) => v.spec.domid === domid).map((v) => {
      const s = v.vifStats();
      return {
        devid: v.spec.devid,
        counters: { rxPackets: s.rxPackets, rxBytes: s.rxBytes, txPackets: s.txPackets, txBytes: s.txBytes, txDropped: s.txDropped, txErrors: s.txErrors },
      };
    });
  }

  /**
   * From deferRx() to runDeferredRx(), while a vif forwards a TX batch,
   * frames for guests wait in their queues (rxLater), and each such queue
   * then gets one RX pass: the batch's frames for it copied in one hypercall.
   */
  deferRx(): void {
    this.rxDeferred = true;
  }

  /** Whether q's RX pass waits for runDeferredRx (noted if so). */
  rxLater(q: NetbackQueue, now: number): boolean {
    if (!this.rxDeferred) return false;
    q.rxLaterMs = now;
    if (!q.rxLater) {
      q.rxLater = true;
      this.rxWaiting.push(q);
    }
    return true;
  }

  runDeferredRx(): void {
    if (!this.rxDeferred) return;
    this.rxDeferred = false;
    for (let i = 0; i < this.rxWaiting.length; i++) {
      const q = this.rxWaiting[i]!;
      q.rxLater = false;
      q.vif.rxAction(q, q.rxLaterMs);
    }
    this.rxWaiting.length = 0;
  }

  /** A queue answered something: push and signal once, after the work of this turn. */
  dirty(q: NetbackQueue): void {
    this.dirtyQueues.push(q);
    this.scheduleFlush();
  }

  /** Mid-pass: push every queue's answers so far (flush still ends the turn). */
  pushDirty(): void {
    for (let i = 0; i < this.dirtyQueues.length; i++) {
      const q = this.dirtyQueues[i]!;
      q.vif.push(q);
    }
  }

  scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    queueMicrotask(this.flush);
  }

  private readonly flush = (): void => {
    this.flushScheduled = false;
    for (let i = 0; i < this.dirtyQueues.length; i++) {
      const q = this.dirtyQueues[i]!;
      q.vif.flush(q);
    }
    this.dirtyQueues.length = 0;
  };

  private armTimer(): void {
    if (this.timer !== null) return;
    const every = Math.max(10, Math.min(this.opts.drainTimeoutMs, this.opts.stallTimeoutMs, this.opts.holdMs) / 4);
    this.timer = setInterval(() => {
      const now = performance.now();
      for (const v of this.vifs.values()) v.checkQueues(now);
    }, every);
    this.timer.unref();
  }
}
