// A network interface as a guest image sees it: one xnf unit with its MAC
// and MTU, send(frame), received frames as a callback (a view valid only
// during the call, so the hot path copies and allocates nothing) or as an
// async iterator (a bounded queue of copies), link events and counters.
// An IP layer needs exactly { mac, mtu, send, onFrame }.

import { XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6 } from '../abi/netif.js';
import { XenError } from '../errors.js';
import { formatMac, parseMac } from '../ether.js';
import { xnfInterfaces, type XnfCounters, type XnfRxInfo, type XnfSoftc, type XnfTxOffload } from '../drivers/xnf/xnf.js';
import type { XenSoftc } from '../xen/xen.js';

export type FrameHandler = (frame: Uint8Array, info: XnfRxInfo) => void;

/** What send() may ask of the backend: leave the checksum for it, or let it carry a TCP frame larger than the MTU. */
export type SendOptions = {
  /** The TCP/UDP checksum is left blank for the other end to fill in (NETTXF_csum_blank). */
  checksumOffload?: boolean;
  /** A TCP frame to be cut into segments of `mss` payload bytes (GSO through a netif extra). */
  gso?: { type: 'tcpv4' | 'tcpv6'; mss: number };
  /** A frame that must wait for ring space waits at most this long (30 s by default): ETIMEDOUT. */
  timeoutMs?: number;
  /** Abort the wait for ring space: ECANCELED. */
  signal?: AbortSignal;
};

export type FramesOptions = {
  /** Frames the iterator holds before it drops new ones (default 256). */
  maxQueued?: number;
};

const DEFAULT_MAX_QUEUED = 256;
const MAX_QUEUED = 65536;

/** An async iterator's queue: copies of frames, bounded, dropping when full. */
class FrameQueue implements AsyncIterableIterator<Uint8Array> {
  private readonly frames: Uint8Array[] = [];
  private waiter: ((r: IteratorResult<Uint8Array>) => void) | null = null;
  private done = false;
  dropped = 0;

  constructor(
    private readonly max: number,
    private readonly detach: () => void,
  ) {}

  push(frame: Uint8Array): void {
    if (this.done) return;
    const copy = frame.slice();
    if (this.waiter !== null) {
      const w = this.waiter;
      this.waiter = null;
      w({ value: copy, done: false });
    } else if (this.frames.length < this.max) {
      this.frames.push(copy);
    } else {
      this.dropped++;
    }
  }

  next(): Promise<IteratorResult<Uint8Array>> {
    const f = this.frames.shift();
    if (f !== undefined) return Promise.resolve({ value: f, done: false });
    if (this.done) return Promise.resolve({ value: undefined, done: true });
    if (this.waiter !== null) return Promise.reject(new XenError('EBUSY', 'one next() at a time'));
    return new Promise((resolve) => (this.waiter = resolve));
  }

  return(): Promise<IteratorResult<Uint8Array>> {
    this.end();
    return Promise.resolve({ value: undefined, done: true });
  }

  end(): void {
    if (this.done) return;
    this.done = true;
    this.frames.length = 0;
    this.detach();
    const w = this.waiter;
    this.waiter = null;
    w?.({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<Uint8Array> {
    return this;
  }
}

/**
 * One interface (an attached xnf unit). send() rejects with EINVAL (not a
 * frame), EMSGSIZE (larger than the MTU allows), ENETDOWN (link down, the
 * backend broke the protocol, or the device was detached) or ENOBUFS (too
 * many frames waiting for ring space).
 */
export class NetInterface {
  private readonly handlers: FrameHandler[] = [];
  private readonly linkHandlers: Array<(up: boolean) => void> = [];
  private readonly queues = new Set<FrameQueue>();

  constructor(private readonly xnf: XnfSoftc) {
    xnf.input = (frame, info) => this.input(frame, info);
    xnf.onLink = (up) => this.link(up);
  }

  /** xnf0, xnf1, ... */
  get name(): string {
    return this.xnf.name;
  }
  /** device/vif/<devid> */
  get path(): string {
    return this.xnf.dev.path;
  }
  /** The 6-byte MAC (a copy). */
  get mac(): Uint8Array {
    return this.xnf.mac.slice();
  }
  get macText(): string {
    return formatMac(this.xnf.mac);
  }
  /** Bytes of payload a frame may carry after its 14-byte Ethernet header. */
  get mtu(): number {
    return this.xnf.mtu;
  }
  /** The backend is connected and nothing broke. */
  get up(): boolean {
    return this.xnf.up;
  }
  /** Why the interface stopped for good, or null. */
  get error(): XenError | null {
    return this.xnf.error;
  }
  get queuesInUse(): number {
    return this.xnf.queues.length;
  }
  /** What the backend takes: scatter-gather (frames over several pages), GSO, checksum offload. */
  get features(): { sg: boolean; gsoTcpv4: boolean; gsoTcpv6: boolean; csumIpv4: boolean; csumIpv6: boolean; multicastControl: boolean } {
    const x = this.xnf;
    return { sg: x.capSg, gsoTcpv4: x.capGso4, gsoTcpv6: x.capGso6, csumIpv4: x.capCsum4, csumIpv6: x.capCsum6, multicastControl: x.capMcast };
  }

  /**
   * Send one Ethernet frame (no FCS). Resolves once it is on the ring; a
   * frame that waits for ring space is copied before the promise resolves,
   * so leave it unchanged until then.
   */
  send(frame: Uint8Array, opts?: SendOptions): Promise<void> {
    if (opts === undefined) return this.xnf.send(frame);
    const offload: XnfTxOffload = { csumBlank: opts.checksumOffload === true };
    if (opts.gso !== undefined) {
      offload.gsoType = opts.gso.type === 'tcpv6' ? XEN_NETIF_GSO_TYPE_TCPV6 : XEN_NETIF_GSO_TYPE_TCPV4;
      offload.gsoSize = opts.gso.mss;
    }
    return this.xnf.send(frame, offload, { timeoutMs: opts.timeoutMs, signal: opts.signal });
  }

  /**
   * Resolve once the backend has taken every frame sent so far. A clean
   * poweroff or reboot does it for every interface (for up to 5 s), so a
   * frame sent just before main returns still goes. ETIMEDOUT after
   * `timeoutMs` (10 s), ENETDOWN if the interface stops.
   */
  drain(timeoutMs?: number): Promise<void> {
    return this.xnf.drain(timeoutMs);
  }

  /** Call `handler` for every received frame; the view is valid only during the call. Returns an unsubscribe. */
  onFrame(handler: FrameHandler): () => void {
    this.handlers.push(handler);
    return () => {
      const i = this.handlers.indexOf(handler);
      if (i >= 0) this.handlers.splice(i, 1);
    };
  }

  /** Received frames as copies, in order; the oldest are kept and new ones dropped when `maxQueued` wait. */
  frames(opts: FramesOptions = {}): AsyncIterableIterator<Uint8Array> & { readonly dropped: number } {
    const max = opts.maxQueued ?? DEFAULT_MAX_QUEUED;
    if (!Number.isInteger(max) || max < 1 || max > MAX_QUEUED) throw new XenError('EINVAL', `maxQueued ${max}: want 1..${MAX_QUEUED}`);
    const q: FrameQueue = new FrameQueue(max, () => this.queues.delete(q));
    this.queues.add(q);
    if (this.xnf.error !== null) q.end();
    return q;
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<Uint8Array> {
    return this.frames();
  }

  /** Called with true/false as the link comes up or goes down. Returns an unsubscribe. */
  onLink(handler: (up: boolean) => void): () => void {
    this.linkHandlers.push(handler);
    return () => {
      const i = this.linkHandlers.indexOf(handler);
      if (i >= 0) this.linkHandlers.splice(i, 1);
    };
  }

  /** A snapshot of the interface's counters. */
  counters(): XnfCounters {
    return { ...this.xnf.counters };
  }

  /** Ask the backend to pass frames for a multicast group (feature-multicast-control), or to stop. */
  joinMulticast(mac: Uint8Array | string): Promise<void> {
    return this.xnf.multicast(typeof mac === 'string' ? parseMac(mac) : mac, true);
  }
  leaveMulticast(mac: Uint8Array | string): Promise<void> {
    return this.xnf.multicast(typeof mac === 'string' ? parseMac(mac) : mac, false);
  }

  private input(frame: Uint8Array, info: XnfRxInfo): void {
    const hs = this.handlers;
    for (let i = 0; i < hs.length; i++) hs[i]!(frame, info);
    if (this.queues.size !== 0) for (const q of this.queues) q.push(frame);
  }

  private link(up: boolean): void {
    for (const h of [...this.linkHandlers]) h(up);
    if (this.xnf.error !== null) for (const q of [...this.queues]) q.end();
  }
}

const interfaces = new WeakMap<XnfSoftc, NetInterface>();

/** The attached interfaces, in devid order; the same object for a unit each time. */
export function netInterfaces(sc: XenSoftc): NetInterface[] {
  return xnfInterfaces(sc).map((x) => {
    let n = interfaces.get(x);
    if (n === undefined) {
      n = new NetInterface(x);
      interfaces.set(x, n);
    }
    return n;
  });
}
