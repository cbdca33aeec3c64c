// A small IPv4 host over one Ethernet link: Ethernet II, ARP (RFC 826) with
// a bounded, ageing cache and a bounded queue of packets per unresolved
// address, IPv4 (RFC 791/1122: header checksum, TTL, no fragments), ICMP
// echo (RFC 792) and UDP (RFC 768) sockets. A guest interface and a dom0
// bridge port offer the same Link, so dom0's DHCP server runs on this too.
//
// Every frame is untrusted: each length and offset is checked before it is
// read, a bad frame is counted under its reason and dropped, and nothing
// thrown escapes the frame handler. The receive path parses into headers
// allocated at attach time and reads bytes straight off the frame; only a
// UDP payload handed to a socket is copied (the frame view dies with the
// call). Addresses and MACs are plain numbers inside (a MAC fits in 48 bits).

import { XenError } from '../errors.js';
import { logger, type Log } from '../log.js';
// A cycle, and a safe one: dhcp.ts builds on this file, and configure() here
// starts its client; neither module touches the other's bindings while it
// loads. Static, so that a guest's DHCP client is loaded with its image, at
// boot: an import() mid-run would complete in real time, outside the order a
// seeded run (lib/sim) replays.
import { DhcpClient, type DhcpClientOptions } from './dhcp.js';

/** An Ethernet link: what a guest's net interface and a dom0 bridge port offer. */
export type Link = {
  /** 6 bytes */
  mac: Uint8Array;
  /** bytes of L3 payload, 1500 by default */
  mtu: number;
  /** Send a whole Ethernet frame (no FCS). */
  send(frame: Uint8Array): Promise<void> | void;
  /** The frame view is valid only during the call. Returns unsubscribe. */
  onFrame(handler: (frame: Uint8Array) => void): () => void;
};

// ---- wire constants -------------------------------------------------------

export const ETHER_HDR_LEN = 14;
export const ETHERTYPE_IP = 0x0800;
export const ETHERTYPE_ARP = 0x0806;
export const ETHER_ADDR_BROADCAST = 0xffff_ffff_ffff;

export const ARPHRD_ETHER = 1;
export const ARPOP_REQUEST = 1;
export const ARPOP_REPLY = 2;
export const ARP_LEN = 28;

export const IPVERSION = 4;
export const IP_HDR_LEN = 20;
export const IP_DF = 0x4000;
export const IP_MF = 0x2000;
export const IP_OFFMASK = 0x1fff;
export const IPDEFTTL = 64;
export const IPPROTO_ICMP = 1;
export const IPPROTO_UDP = 17;
export const INADDR_ANY = 0;
export const INADDR_BROADCAST = 0xffff_ffff;

export const ICMP_ECHOREPLY = 0;
export const ICMP_ECHO = 8;
export const ICMP_HDR_LEN = 8;
export const UDP_HDR_LEN = 8;

// ---- byte access ----------------------------------------------------------

const u16 = (b: Uint8Array, off: number): number => (b[off]! << 8) | b[off + 1]!;
const u32 = (b: Uint8Array, off: number): number => ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;

function put16(b: Uint8Array, off: number, v: number): void {
  b[off] = v >>> 8;
  b[off + 1] = v;
}
function put32(b: Uint8Array, off: number, v: number): void {
  b[off] = v >>> 24;
  b[off + 1] = v >>> 16;
  b[off + 2] = v >>> 8;
  b[off + 3] = v;
}

/** A 48-bit MAC as a number (exact: below 2^53). */
export function macRead(b: Uint8Array, off: number): number {
  return u16(b, off) * 0x1_0000_0000 + u32(b, off + 2);
}
export function macWrite(b: Uint8Array, off: number, mac: number): void {
  put16(b, off, Math.floor(mac / 0x1_0000_0000));
  put32(b, off + 2, mac >>> 0);
}
export function macFormat(mac: number): string {
  const b = new Uint8Array(6);
  macWrite(b, 0, mac);
  return [...b].map((x) => x.toString(16).padStart(2, '0')).join(':');
}
/** The group bit: broadcast and multicast MACs may never be a sender. */
const macIsGroup = (mac: number): boolean => (Math.floor(mac / 0x100_0000_0000) & 1) === 1;

// ---- the Internet checksum (RFC 1071) --------------------------------------

/** One's complement sum of `len` bytes at `off`, added to `sum`, not folded. */
export function inetSum(b: Uint8Array, off: number, len: number, sum = 0): number {
  const end = off + (len & ~1);
  for (let i = off; i < end; i += 2) sum += (b[i]! << 8) | b[i + 1]!;
  if (len & 1) sum += b[end]! << 8;
  return sum;
}
/** Fold a sum to 16 bits and complement it: the checksum field's value. */
export function inetFold(sum: number): number {
  while (sum > 0xffff) sum = (sum & 0xffff) + Math.floor(sum / 0x10000);
  return ~sum & 0xffff;
}
export function inetChecksum(b: Uint8Array, off: number, len: number): number {
  return inetFold(inetSum(b, off, len));
}
/** The UDP pseudo header: source, destination, zero, protocol, UDP length. */
const pseudoSum = (src: number, dst: number, protocol: number, len: number): number =>
  (src >>> 16) + (src & 0xffff) + (dst >>> 16) + (dst & 0xffff) + protocol + len;

// ---- headers (parsed into objects the caller owns and reuses) ---------------

export type EtherHeader = { dst: number; src: number; type: number };
export type ArpHeader = { op: number; sha: number; spa: number; tha: number; tpa: number };
export type Ipv4Header = {
  hlen: number; tos: number; len: number; id: number; off: number;
  ttl: number; p: number; src: number; dst: number;
};
export type UdpHeader = { sport: number; dport: number; len: number; sum: number };
export type IcmpEcho = { type: number; code: number; id: number; seq: number };

export const newEtherHeader = (): EtherHeader => ({ dst: 0, src: 0, type: 0 });
export const newArpHeader = (): ArpHeader => ({ op: 0, sha: 0, spa: 0, tha: 0, tpa: 0 });
export const newIpv4Header = (): Ipv4Header => ({ hlen: 0, tos: 0, len: 0, id: 0, off: 0, ttl: 0, p: 0, src: 0, dst: 0 });
export const newUdpHeader = (): UdpHeader => ({ sport: 0, dport: 0, len: 0, sum: 0 });
export const newIcmpEcho = (): IcmpEcho => ({ type: 0, code: 0, id: 0, seq: 0 });

/** Why a frame was dropped; each has a counter. */
export const DROP_REASONS = [
  'eth-short', 'eth-other-host', 'eth-type',
  'arp-short', 'arp-format', 'arp-op', 'arp-bad-sender', 'arp-address-conflict',
  'ip-short', 'ip-version', 'ip-header-length', 'ip-total-length', 'ip-checksum', 'ip-fragment',
  'ip-bad-source', 'ip-other-host', 'ip-protocol',
  'icmp-short', 'icmp-checksum', 'icmp-type', 'icmp-broadcast-echo', 'icmp-too-big', 'icmp-unmatched-reply',
  'udp-short', 'udp-length', 'udp-checksum', 'udp-no-socket', 'udp-queue-full',
  'arp-queue-full', 'arp-unresolved', 'arp-evicted', 'no-route', 'link-error', 'internal-error',
] as const;
export type DropReason = (typeof DROP_REASONS)[number];

export function etherDecode(b: Uint8Array, h: EtherHeader): DropReason | null {
  if (b.length < ETHER_HDR_LEN) return 'eth-short';
  h.dst = macRead(b, 0);
  h.src = macRead(b, 6);
  h.type = u16(b, 12);
  return null;
}
export function etherEncode(b: Uint8Array, h: EtherHeader): void {
  macWrite(b, 0, h.dst);
  macWrite(b, 6, h.src);
  put16(b, 12, h.type);
}

/** An Ethernet/IPv4 ARP packet at `off`, within `end`. */
export function arpDecode(b: Uint8Array, off: number, end: number, h: ArpHeader): DropReason | null {
  if (end - off < ARP_LEN) return 'arp-short';
  if (u16(b, off) !== ARPHRD_ETHER || u16(b, off + 2) !== ETHERTYPE_IP || b[off + 4] !== 6 || b[off + 5] !== 4) return 'arp-format';
  h.op = u16(b, off + 6);
  if (h.op !== ARPOP_REQUEST && h.op !== ARPOP_REPLY) return 'arp-op';
  h.sha = macRead(b, off + 8);
  h.spa = u32(b, off + 14);
  h.tha = macRead(b, off + 18);
  h.tpa = u32(b, off + 24);
  return null;
}
export function arpEncode(b: Uint8Array, off: number, h: ArpHeader): void {
  put16(b, off, ARPHRD_ETHER);
  put16(b, off + 2, ETHERTYPE_IP);
  b[off + 4] = 6;
  b[off + 5] = 4;
  put16(b, off + 6, h.op);
  macWrite(b, off + 8, h.sha);
  put32(b, off + 14, h.spa);
  macWrite(b, off + 18, h.tha);
  put32(b, off + 24, h.tpa);
}

/**
 * An IPv4 header at `off`; `end` bounds the frame (an Ethernet frame may be
 * padded past the datagram). Options are skipped; fragments are refused.
 */
export function ipv4Decode(b: Uint8Array, off: number, end: number, h: Ipv4Header): DropReason | null {
  if (end - off < IP_HDR_LEN) return 'ip-short';
  if (b[off]! >>> 4 !== IPVERSION) return 'ip-version';
  h.hlen = (b[off]! & 0x0f) * 4;
  if (h.hlen < IP_HDR_LEN || h.hlen > end - off) return 'ip-header-length';
  h.len = u16(b, off + 2);
  if (h.len < h.hlen || h.len > end - off) return 'ip-total-length';
  if (inetChecksum(b, off, h.hlen) !== 0) return 'ip-checksum';
  h.tos = b[off + 1]!;
  h.id = u16(b, off + 4);
  h.off = u16(b, off + 6);
  if ((h.off & (IP_MF | IP_OFFMASK)) !== 0) return 'ip-fragment';
  h.ttl = b[off + 8]!;
  h.p = b[off + 9]!;
  h.src = u32(b, off + 12);
  h.dst = u32(b, off + 16);
  return null;
}
/** A 20-byte header (no options), checksum computed. */
export function ipv4Encode(b: Uint8Array, off: number, h: Ipv4Header): void {
  b[off] = (IPVERSION << 4) | (IP_HDR_LEN >> 2);
  b[off + 1] = h.tos;
  put16(b, off + 2, h.len);
  put16(b, off + 4, h.id);
  put16(b, off + 6, h.off);
  b[off + 8] = h.ttl;
  b[off + 9] = h.p;
  put16(b, off + 10, 0);
  put32(b, off + 12, h.src);
  put32(b, off + 16, h.dst);
  put16(b, off + 10, inetChecksum(b, off, IP_HDR_LEN));
}

/** A UDP header at `off` inside an IP payload ending at `end`; checks length and checksum. */
export function udpDecode(b: Uint8Array, off: number, end: number, src: number, dst: number, h: UdpHeader): DropReason | null {
  if (end - off < UDP_HDR_LEN) return 'udp-short';
  h.sport = u16(b, off);
  h.dport = u16(b, off + 2);
  h.len = u16(b, off + 4);
  h.sum = u16(b, off + 6);
  if (h.len < UDP_HDR_LEN || h.len > end - off) return 'udp-length';
  // A zero checksum means the sender computed none (RFC 768).
  if (h.sum !== 0 && inetFold(inetSum(b, off, h.len, pseudoSum(src, dst, IPPROTO_UDP, h.len))) !== 0) return 'udp-checksum';
  return null;
}
/** The header for the `h.len - 8` payload bytes already at `off + 8`; checksum computed. */
export function udpEncode(b: Uint8Array, off: number, src: number, dst: number, h: UdpHeader): void {
  put16(b, off, h.sport);
  put16(b, off + 2, h.dport);
  put16(b, off + 4, h.len);
  put16(b, off + 6, 0);
  const sum = inetFold(inetSum(b, off, h.len, pseudoSum(src, dst, IPPROTO_UDP, h.len)));
  // A computed zero goes out as all ones: zero on the wire means "no checksum".
  put16(b, off + 6, sum === 0 ? 0xffff : sum);
}

/** An ICMP message of `end - off` bytes; checks the checksum; fills type, code and the echo id/seq. */
export function icmpDecode(b: Uint8Array, off: number, end: number, h: IcmpEcho): DropReason | null {
  if (end - off < ICMP_HDR_LEN) return 'icmp-short';
  if (inetChecksum(b, off, end - off) !== 0) return 'icmp-checksum';
  h.type = b[off]!;
  h.code = b[off + 1]!;
  h.id = u16(b, off + 4);
  h.seq = u16(b, off + 6);
  return null;
}
/** An echo header over the `len - 8` data bytes already at `off + 8`; checksum computed. */
export function icmpEncode(b: Uint8Array, off: number, len: number, h: IcmpEcho): void {
  b[off] = h.type;
  b[off + 1] = h.code;
  put16(b, off + 2, 0);
  put16(b, off + 4, h.id);
  put16(b, off + 6, h.seq);
  put16(b, off + 2, inetChecksum(b, off, len));
}

// ---- addresses and configuration ---------------------------------------------

const DOTTED_QUAD = /^(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})$/;

/** "10.0.0.2" -> 0x0a000002; EINVAL for anything but four decimal octets. */
export function ipv4Parse(text: string): number {
  const m = DOTTED_QUAD.exec(text);
  if (m === null) throw new XenError('EINVAL', `${JSON.stringify(text)} is not an IPv4 address`);
  let a = 0;
  for (let i = 1; i <= 4; i++) {
    const octet = Number(m[i]);
    if (octet > 255) throw new XenError('EINVAL', `${JSON.stringify(text)} is not an IPv4 address`);
    a = a * 256 + octet;
  }
  return a;
}
export function ipv4Format(a: number): string {
  return `${a >>> 24}.${(a >>> 16) & 0xff}.${(a >>> 8) & 0xff}.${a & 0xff}`;
}
export function prefixMask(prefixLength: number): number {
  return prefixLength === 0 ? 0 : (0xffff_ffff << (32 - prefixLength)) >>> 0;
}
const isMulticast = (a: number): boolean => a >>> 28 === 0xe;
const isLoopback = (a: number): boolean => a >>> 24 === 127;

/** An interface's address, numeric. gateway 0: none. */
export type Ipv4Assignment = { address: number; prefixLength: number; gateway: number };

/** What `ip=` in the domain's extra asks for. */
export type IpConfig = ({ method: 'static' } & Ipv4Assignment) | { method: 'dhcp' };

/**
 * Check an assignment: a unicast host address of its subnet (not its network
 * or broadcast address, except on /31 and /32), and a gateway inside it.
 */
export function checkAssignment(a: Ipv4Assignment): void {
  const { address, prefixLength, gateway } = a;
  if (!Number.isInteger(prefixLength) || prefixLength < 1 || prefixLength > 32) throw new XenError('EINVAL', `prefix length ${prefixLength} is not 1..32`);
  if (address === 0 || isMulticast(address) || isLoopback(address) || address >>> 28 === 0xf) {
    throw new XenError('EINVAL', `${ipv4Format(address)} is not a unicast host address`);
  }
  const mask = prefixMask(prefixLength);
  const host = address & ~mask;
  if (prefixLength <= 30 && (host === 0 || host === ~mask >>> 0)) {
    throw new XenError('EINVAL', `${ipv4Format(address)}/${prefixLength} is the network or broadcast address of its subnet`);
  }
  if (gateway === 0) return;
  if (gateway === address || ((gateway ^ address) & mask) !== 0) {
    throw new XenError('EINVAL', `gateway ${ipv4Format(gateway)} is not another address in ${ipv4Format(address)}/${prefixLength}`);
  }
}

/**
 * The interface configuration in a domain's `extra` (whitespace-separated
 * words; others are left alone): `ip=10.0.0.2/24` with an optional
 * `gw=10.0.0.1`, or `ip=dhcp`. Null when there is no `ip=`. EINVAL otherwise.
 */
export function parseIpConfig(extra: string): IpConfig | null {
  let ip: string | undefined;
  let gw: string | undefined;
  for (const word of extra.split(/\s+/)) {
    const eq = word.indexOf('=');
    const key = word.slice(0, eq);
    if (key !== 'ip' && key !== 'gw') continue;
    if ((key === 'ip' ? ip : gw) !== undefined) throw new XenError('EINVAL', `extra: ${key}= given twice`);
    if (key === 'ip') ip = word.slice(eq + 1);
    else gw = word.slice(eq + 1);
  }
  if (ip === undefined) {
    if (gw !== undefined) throw new XenError('EINVAL', 'extra: gw= without ip=');
    return null;
  }
  if (ip === 'dhcp') {
    if (gw !== undefined) throw new XenError('EINVAL', 'extra: gw= with ip=dhcp (the server names the router)');
    return { method: 'dhcp' };
  }
  const m = /^([^/]+)\/(\d{1,2})$/.exec(ip);
  if (m === null) throw new XenError('EINVAL', `extra: ip=${ip}: expected ADDRESS/PREFIX or dhcp`);
  const a: Ipv4Assignment = { address: ipv4Parse(m[1]!), prefixLength: Number(m[2]), gateway: gw === undefined ? 0 : ipv4Parse(gw) };
  checkAssignment(a);
  return { method: 'static', ...a };
}

// ---- bounded waits -------------------------------------------------------------

export type WaitOptions = { timeoutMs?: number; signal?: AbortSignal };

function abortError(signal: AbortSignal, what: string): XenError {
  return signal.reason instanceof XenError ? signal.reason : new XenError('ECANCELED', `${what}: aborted`);
}

/**
 * A promise settled by `arm`'s resolve/reject, or rejected by ETIMEDOUT after
 * `timeoutMs` or ECANCELED when `signal` aborts. `arm` returns its cleanup.
 */
export function bounded<T>(what: string, opts: WaitOptions, arm: (resolve: (v: T) => void, reject: (e: Error) => void) => () => void): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const { signal, timeoutMs } = opts;
    if (signal?.aborted) return reject(abortError(signal, what));
    let done = false;
    let timer: NodeJS.Timeout | undefined;
    let cleanup: (() => void) | undefined;
    const onAbort = (): void => settle(() => reject(abortError(signal!, what)));
    const settle = (fn: () => void): void => {
      if (done) return;
      done = true;
      if (timer !== undefined) clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      cleanup?.();
      fn();
    };
    const c = arm((v) => settle(() => resolve(v)), (e) => settle(() => reject(e)));
    if (done) return c();
    cleanup = c;
    if (timeoutMs !== undefined && Number.isFinite(timeoutMs)) {
      timer = setTimeout(() => settle(() => reject(new XenError('ETIMEDOUT', `${what}: nothing in ${timeoutMs} ms`))), timeoutMs);
    }
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

// ---- UDP sockets ---------------------------------------------------------------

export type Datagram = { address: string; port: number; data: Uint8Array };

/**
 * A bound UDP port. Datagrams go to every `onMessage` handler; while there is
 * none they queue (up to `queueLength`, newer ones dropped and counted) for
 * `receive()` and the async iterator, which ends when the socket closes.
 */
export class UdpSocket implements AsyncIterable<Datagram>, Disposable {
  /** Datagrams dropped because the queue was full. */
  dropped = 0;
  private readonly queue: Datagram[] = [];
  private readonly waiters = new Set<{ resolve: (d: Datagram) => void; reject: (e: Error) => void }>();
  private readonly handlers = new Set<(d: Datagram) => void>();
  private closed = false;

  constructor(
    private readonly ip: IpInterface,
    readonly port: number,
    private readonly queueLength: number,
  ) {}

  /** Every datagram to this port; returns unsubscribe. */
  onMessage(handler: (d: Datagram) => void): () => void {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }

  /** The next datagram; EBADF once closed, ETIMEDOUT, ECANCELED. */
  receive(opts: WaitOptions = {}): Promise<Datagram> {
    const d = this.queue.shift();
    if (d !== undefined) return Promise.resolve(d);
    if (this.closed) return Promise.reject(new XenError('EBADF', `udp port ${this.port} is closed`));
    return bounded<Datagram>(`udp port ${this.port} receive`, opts, (resolve, reject) => {
      const w = { resolve, reject };
      this.waiters.add(w);
      return () => this.waiters.delete(w);
    });
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Datagram> {
    for (;;) {
      try {
        yield await this.receive();
      } catch (err) {
        if ((err as XenError).code === 'EBADF') return;
        throw err;
      }
    }
  }

  /** Send `data` from this port; EMSGSIZE beyond the MTU, ENETUNREACH without a route. */
  send(address: string | number, port: number, data: Uint8Array): Promise<void> {
    if (this.closed) return Promise.reject(new XenError('EBADF', `udp port ${this.port} is closed`));
    let dst: number;
    try {
      dst = typeof address === 'number' ? address : ipv4Parse(address);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.ip.udpOutput(dst, this.port, port, data);
  }

  /** The interface's input path hands a datagram here (a copy it owns). */
  deliver(d: Datagram): void {
    if (this.handlers.size > 0) {
      for (const h of this.handlers) h(d);
      return;
    }
    const w = this.waiters.values().next();
    if (!w.done) {
      this.waiters.delete(w.value);
      w.value.resolve(d);
      return;
    }
    if (this.queue.length >= this.queueLength) {
      this.dropped++;
      this.ip.drop('udp-queue-full');
      return;
    }
    this.queue.push(d);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.ip.unbind(this);
    const e = new XenError('EBADF', `udp port ${this.port} is closed`);
    for (const w of this.waiters) w.reject(e);
    this.waiters.clear();
    this.handlers.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

// ---- the interface --------------------------------------------------------------

export type IpOptions = {
  /** Names the log namespace xenpv:ip:<name>. */
  name?: string;
  /** ARP cache entries, resolved and pending together. */
  arpEntries?: number;
  /** How long a resolved entry is trusted. */
  arpTimeoutMs?: number;
  /** Between ARP requests for an unresolved address. */
  arpRetransmitMs?: number;
  /** Requests sent before an address counts as unreachable. */
  arpTries?: number;
  /** Packets held per unresolved address (older ones dropped). */
  arpQueueLength?: number;
  /** Datagrams queued per UDP socket. */
  udpQueueLength?: number;
  ttl?: number;
};

type ArpEntry = {
  /** -1 while unresolved */
  mac: number;
  expiresMs: number;
  pending: Uint8Array[];
  tries: number;
  timer: NodeJS.Timeout | null;
};

type PendingPing = { resolve: (rttMs: number) => void; reject: (e: Error) => void; sentMs: number; bytes: number };

export type IpCounters = {
  rxFrames: number;
  txFrames: number;
  rxBytes: number;
  txBytes: number;
  arpRequests: number;
  arpReplies: number;
  echoRequests: number;
  echoReplies: number;
  udpIn: number;
  udpOut: number;
  drops: Record<DropReason, number>;
};

const EPHEMERAL_FIRST = 49152;
const MAX_PINGS = 64;

/** An IPv4 interface over one Link. Close (or dispose) to detach from the link. */
export class IpInterface implements Disposable {
  readonly mac: number;
  readonly mtu: number;
  /** 0 while unconfigured */
  addr = 0;
  prefixLength = 0;
  gatewayAddr = 0;
  readonly counters: IpCounters;
  dhcp: DhcpClient | null = null;

  private readonly log: Log;
  private readonly opts: Required<Omit<IpOptions, 'name'>>;
  private readonly arp = new Map<number, ArpEntry>();
  private readonly sockets = new Map<number, UdpSocket>();
  private readonly pings = new Map<number, PendingPing>();
  private readonly unsubscribe: () => void;
  private ipId = Math.floor(Math.random() * 0x10000);
  private readonly pingId = Math.floor(Math.random() * 0x10000);
  private pingSeq = 0;
  private nextEphemeral = EPHEMERAL_FIRST;
  private closed = false;
  // Receive-path headers, allocated once.
  private readonly eh = newEtherHeader();
  private readonly ah = newArpHeader();
  private readonly ih = newIpv4Header();
  private readonly uh = newUdpHeader();
  private readonly ch = newIcmpEcho();

  constructor(
    private readonly link: Link,
    options: IpOptions = {},
  ) {
    if (link.mac.length !== 6) throw new XenError('EINVAL', `link MAC has ${link.mac.length} bytes, not 6`);
    if (!Number.isInteger(link.mtu) || link.mtu < 576 || link.mtu > 65535) throw new XenError('EINVAL', `link MTU ${link.mtu} is not 576..65535`);
    this.mac = macRead(link.mac, 0);
    this.mtu = link.mtu;
    this.log = logger('ip', options.name ?? macFormat(this.mac));
    this.opts = {
      arpEntries: options.arpEntries ?? 256,
      arpTimeoutMs: options.arpTimeoutMs ?? 300_000,
      arpRetransmitMs: options.arpRetransmitMs ?? 1000,
      arpTries: options.arpTries ?? 3,
      arpQueueLength: options.arpQueueLength ?? 16,
      udpQueueLength: options.udpQueueLength ?? 64,
      ttl: options.ttl ?? IPDEFTTL,
    };
    const drops = Object.fromEntries(DROP_REASONS.map((r) => [r, 0])) as Record<DropReason, number>;
    this.counters = { rxFrames: 0, txFrames: 0, rxBytes: 0, txBytes: 0, arpRequests: 0, arpReplies: 0, echoRequests: 0, echoReplies: 0, udpIn: 0, udpOut: 0, drops };
    this.unsubscribe = link.onFrame((frame) => this.input(frame));
  }

  /** The dotted address, or null while unconfigured. */
  get address(): string | null {
    return this.addr === 0 ? null : ipv4Format(this.addr);
  }
  get gateway(): string | null {
    return this.gatewayAddr === 0 ? null : ipv4Format(this.gatewayAddr);
  }

  /**
   * Configure from a domain's `extra` string or an IpConfig: a static address
   * at once, or DHCP (resolves at the first lease; renewals go on until close).
   */
  async configure(config: string | IpConfig, options: WaitOptions & DhcpClientOptions = {}): Promise<void> {
    const c = typeof config === 'string' ? parseIpConfig(config) : config;
    if (c === null) throw new XenError('EINVAL', 'extra has no ip=');
    if (c.method === 'static') return this.assign(c);
    this.dhcp?.close();
    this.dhcp = new DhcpClient(this, options);
    await this.dhcp.start(options);
  }

  /** Set the address (numeric form) and announce it with a gratuitous ARP. */
  assign(a: Ipv4Assignment): void {
    checkAssignment(a);
    this.addr = a.address;
    this.prefixLength = a.prefixLength;
    this.gatewayAddr = a.gateway;
    this.log('address %s/%d gateway %s', ipv4Format(a.address), a.prefixLength, this.gateway ?? 'none');
    this.arpOutput(ARPOP_REQUEST, ETHER_ADDR_BROADCAST, this.addr, 0, this.addr);
  }

  /** Forget the address (a lease expired); sockets stay bound. */
  unassign(): void {
    this.addr = 0;
    this.prefixLength = 0;
    this.gatewayAddr = 0;
  }

  /** Put a resolved entry in the ARP cache (a DHCP server answers a client that cannot ARP yet). */
  arpSet(address: number, mac: number): void {
    const e = this.arpEntry(address);
    e.mac = mac;
    e.expiresMs = performance.now() + this.opts.arpTimeoutMs;
    this.arpFlush(e);
  }

  /** The resolved MAC of `address`, if the cache holds a live one. */
  arpLookup(address: string | number): number | undefined {
    const a = typeof address === 'number' ? address : ipv4Parse(address);
    const e = this.arp.get(a);
    return e !== undefined && e.mac >= 0 && e.expiresMs > performance.now() ? e.mac : undefined;
  }

  /** Bind a UDP port (0: an ephemeral one); EADDRINUSE when taken. */
  bind(port = 0, options: { queueLength?: number } = {}): UdpSocket {
    if (this.closed) throw new XenError('EBADF', 'interface is closed');
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new XenError('EINVAL', `port ${port} is not 0..65535`);
    if (port === 0) port = this.ephemeralPort();
    if (this.sockets.has(port)) throw new XenError('EADDRINUSE', `udp port ${port} is bound`);
    const s = new UdpSocket(this, port, options.queueLength ?? this.opts.udpQueueLength);
    this.sockets.set(port, s);
    return s;
  }

  private ephemeralPort(): number {
    for (let i = 0; i <= 65535 - EPHEMERAL_FIRST; i++) {
      const p = this.nextEphemeral;
      this.nextEphemeral = p === 65535 ? EPHEMERAL_FIRST : p + 1;
      if (!this.sockets.has(p)) return p;
    }
    throw new XenError('EADDRINUSE', 'no ephemeral udp port is free');
  }

  unbind(s: UdpSocket): void {
    if (this.sockets.get(s.port) === s) this.sockets.delete(s.port);
  }

  /**
   * ICMP echo to `address`; resolves with the round trip in milliseconds.
   * ETIMEDOUT after `timeoutMs` (default 1000), ECANCELED on abort.
   */
  ping(address: string | number, opts: WaitOptions & { bytes?: number } = {}): Promise<number> {
    const dst = typeof address === 'number' ? address : ipv4Parse(address);
    const bytes = opts.bytes ?? 56;
    if (!Number.isInteger(bytes) || bytes < 0 || bytes > this.mtu - IP_HDR_LEN - ICMP_HDR_LEN) {
      return Promise.reject(new XenError('EMSGSIZE', `ping of ${bytes} bytes does not fit the MTU ${this.mtu}`));
    }
    if (this.pings.size >= MAX_PINGS) return Promise.reject(new XenError('ENOBUFS', `${MAX_PINGS} pings outstanding`));
    const seq = this.pingSeq;
    this.pingSeq = (seq + 1) & 0xffff;
    return bounded<number>(`ping ${ipv4Format(dst)} seq ${seq}`, { timeoutMs: 1000, ...opts }, (resolve, reject) => {
      this.pings.set(seq, { resolve, reject, sentMs: performance.now(), bytes });
      this.echoOutput(dst, ICMP_ECHO, this.pingId, seq, null, bytes).catch(reject);
      return () => this.pings.delete(seq);
    });
  }

  /** Count a drop (sockets count theirs here too). */
  drop(reason: DropReason): void {
    this.counters.drops[reason]++;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.dhcp?.close();
    this.unsubscribe();
    for (const s of [...this.sockets.values()]) s.close();
    const e = new XenError('ECANCELED', 'interface closed');
    for (const p of [...this.pings.values()]) p.reject(e);
    for (const entry of this.arp.values()) if (entry.timer !== null) clearTimeout(entry.timer);
    this.arp.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  // ---- input ---------------------------------------------------------------

  /** The frame handler: never throws; a frame that cannot be used is counted under its reason. */
  input(frame: Uint8Array): void {
    try {
      this.counters.rxFrames++;
      this.counters.rxBytes += frame.length;
      const reason = this.etherInput(frame);
      if (reason !== null) this.counters.drops[reason]++;
    } catch (err) {
      this.counters.drops['internal-error']++;
      this.log('frame handler failed: %s', (err as Error).message);
    }
  }

  private etherInput(frame: Uint8Array): DropReason | null {
    const eh = this.eh;
    const bad = etherDecode(frame, eh);
    if (bad !== null) return bad;
    if (eh.dst !== this.mac && eh.dst !== ETHER_ADDR_BROADCAST) return 'eth-other-host';
    if (eh.type === ETHERTYPE_ARP) return this.arpInput(frame);
    if (eh.type === ETHERTYPE_IP) return this.ipInput(frame);
    return 'eth-type';
  }

  /** in_arpinput: learn the sender when it is known or we are the target; answer requests for us. */
  private arpInput(frame: Uint8Array): DropReason | null {
    const ah = this.ah;
    const bad = arpDecode(frame, ETHER_HDR_LEN, frame.length, ah);
    if (bad !== null) return bad;
    if (macIsGroup(ah.sha) || ah.sha === this.mac || ah.spa === INADDR_BROADCAST || isMulticast(ah.spa)) return 'arp-bad-sender';
    if (this.addr !== 0 && ah.spa === this.addr) {
      this.log('address conflict: %s is claimed by %s', ipv4Format(ah.spa), macFormat(ah.sha));
      return 'arp-address-conflict';
    }
    const forUs = this.addr !== 0 && ah.tpa === this.addr;
    const known = this.arp.get(ah.spa);
    // RFC 826's merge: refresh a known sender; add one only when it talks to us.
    if (ah.spa !== 0 && (known !== undefined || forUs)) this.arpSet(ah.spa, ah.sha);
    if (ah.op === ARPOP_REPLY) this.counters.arpReplies++;
    if (ah.op === ARPOP_REQUEST && forUs) {
      this.counters.arpRequests++;
      this.arpOutput(ARPOP_REPLY, ah.sha, this.addr, ah.sha, ah.spa);
    }
    return null;
  }

  private ipInput(frame: Uint8Array): DropReason | null {
    const ih = this.ih;
    const bad = ipv4Decode(frame, ETHER_HDR_LEN, frame.length, ih);
    if (bad !== null) return bad;
    if (isMulticast(ih.src) || ih.src === INADDR_BROADCAST || isLoopback(ih.src)) return 'ip-bad-source';
    const broadcast = ih.dst === INADDR_BROADCAST || (this.addr !== 0 && this.prefixLength <= 30 && ih.dst === this.subnetBroadcast());
    // Unconfigured, take any unicast: a DHCP server may answer to the offered address.
    if (!broadcast && ih.dst !== this.addr && this.addr !== 0) return 'ip-other-host';
    const off = ETHER_HDR_LEN + ih.hlen;
    const end = ETHER_HDR_LEN + ih.len;
    if (ih.p === IPPROTO_ICMP) return this.icmpInput(frame, off, end, broadcast);
    if (ih.p === IPPROTO_UDP) return this.udpInput(frame, off, end);
    return 'ip-protocol';
  }

  private icmpInput(frame: Uint8Array, off: number, end: number, broadcast: boolean): DropReason | null {
    const ch = this.ch;
    const bad = icmpDecode(frame, off, end, ch);
    if (bad !== null) return bad;
    if (ch.type === ICMP_ECHO && ch.code === 0) {
      // As Linux with icmp_echo_ignore_broadcasts (smurf amplification).
      if (broadcast || this.addr === 0) return 'icmp-broadcast-echo';
      if (IP_HDR_LEN + end - off > this.mtu) return 'icmp-too-big';
      this.counters.echoRequests++;
      const data = frame.subarray(off + ICMP_HDR_LEN, end);
      this.echoOutput(this.ih.src, ICMP_ECHOREPLY, ch.id, ch.seq, data, data.length).catch(() => this.drop('no-route'));
      return null;
    }
    if (ch.type === ICMP_ECHOREPLY && ch.code === 0) return this.echoReplyInput(frame, off, end);
    return 'icmp-type';
  }

  private echoReplyInput(frame: Uint8Array, off: number, end: number): DropReason | null {
    const ch = this.ch;
    const p = this.pings.get(ch.seq);
    if (ch.id !== this.pingId || p === undefined || end - off - ICMP_HDR_LEN !== p.bytes) return 'icmp-unmatched-reply';
    for (let i = 0; i < p.bytes; i++) if (frame[off + ICMP_HDR_LEN + i] !== ((i + ch.seq) & 0xff)) return 'icmp-unmatched-reply';
    this.counters.echoReplies++;
    this.pings.delete(ch.seq);
    p.resolve(performance.now() - p.sentMs);
    return null;
  }

  private udpInput(frame: Uint8Array, off: number, end: number): DropReason | null {
    const uh = this.uh;
    const ih = this.ih;
    const bad = udpDecode(frame, off, end, ih.src, ih.dst, uh);
    if (bad !== null) return bad;
    const s = this.sockets.get(uh.dport);
    if (s === undefined) return 'udp-no-socket';
    this.counters.udpIn++;
    s.deliver({ address: ipv4Format(ih.src), port: uh.sport, data: frame.slice(off + UDP_HDR_LEN, off + uh.len) });
    return null;
  }

  // ---- output ----------------------------------------------------------------

  private subnetBroadcast(): number {
    return (this.addr | ~prefixMask(this.prefixLength)) >>> 0;
  }

  /** The next hop for `dst`: itself on the subnet, the gateway beyond, INADDR_BROADCAST for broadcasts. */
  private route(dst: number): number {
    if (dst === INADDR_BROADCAST) return INADDR_BROADCAST;
    if (this.addr === 0) throw new XenError('ENETUNREACH', `${ipv4Format(dst)}: the interface has no address`);
    if (this.prefixLength <= 30 && dst === this.subnetBroadcast()) return INADDR_BROADCAST;
    if (isMulticast(dst) || dst === 0) throw new XenError('ENETUNREACH', `${ipv4Format(dst)}: not a unicast or broadcast address`);
    if (((dst ^ this.addr) & prefixMask(this.prefixLength)) === 0) return dst;
    if (this.gatewayAddr !== 0) return this.gatewayAddr;
    throw new XenError('ENETUNREACH', `${ipv4Format(dst)}: off the subnet and no gateway`);
  }

  /** A frame with room for `l4Bytes` after a 20-byte IP header. */
  private ipFrame(l4Bytes: number): Uint8Array {
    if (IP_HDR_LEN + l4Bytes > this.mtu) throw new XenError('EMSGSIZE', `${IP_HDR_LEN + l4Bytes} bytes exceed the MTU ${this.mtu}`);
    return new Uint8Array(ETHER_HDR_LEN + IP_HDR_LEN + l4Bytes);
  }

  /** Fill the IP header of a frame from ipFrame() and send it toward `dst`; ENETUNREACH without a route. */
  private ipOutput(frame: Uint8Array, dst: number, p: number): Promise<void> {
    let hop: number;
    try {
      hop = this.route(dst);
    } catch (err) {
      return Promise.reject(err);
    }
    const h = newIpv4Header();
    h.len = frame.length - ETHER_HDR_LEN;
    h.id = this.ipId;
    this.ipId = (this.ipId + 1) & 0xffff;
    h.off = IP_DF;
    h.ttl = this.opts.ttl;
    h.p = p;
    h.src = this.addr;
    h.dst = dst;
    ipv4Encode(frame, ETHER_HDR_LEN, h);
    if (hop === INADDR_BROADCAST) return this.etherOutput(frame, ETHER_ADDR_BROADCAST, ETHERTYPE_IP);
    if (hop === this.addr) {
      // To ourselves: loop back, as through lo.
      etherEncode(frame, { dst: this.mac, src: this.mac, type: ETHERTYPE_IP });
      queueMicrotask(() => this.input(frame));
      return Promise.resolve();
    }
    return this.arpResolve(hop, frame);
  }

  udpOutput(dst: number, sport: number, dport: number, data: Uint8Array): Promise<void> {
    if (!Number.isInteger(dport) || dport < 1 || dport > 65535) return Promise.reject(new XenError('EINVAL', `port ${dport} is not 1..65535`));
    try {
      const frame = this.ipFrame(UDP_HDR_LEN + data.length);
      const off = ETHER_HDR_LEN + IP_HDR_LEN;
      frame.set(data, off + UDP_HDR_LEN);
      udpEncode(frame, off, this.addr, dst, { sport, dport, len: UDP_HDR_LEN + data.length, sum: 0 });
      this.counters.udpOut++;
      return this.ipOutput(frame, dst, IPPROTO_UDP);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** An echo request (data: our pattern) or reply (data: the request's). */
  private echoOutput(dst: number, type: number, id: number, seq: number, data: Uint8Array | null, bytes: number): Promise<void> {
    const frame = new Uint8Array(ETHER_HDR_LEN + IP_HDR_LEN + ICMP_HDR_LEN + bytes);
    const off = ETHER_HDR_LEN + IP_HDR_LEN;
    if (data !== null) frame.set(data, off + ICMP_HDR_LEN);
    else for (let i = 0; i < bytes; i++) frame[off + ICMP_HDR_LEN + i] = (i + seq) & 0xff;
    icmpEncode(frame, off, ICMP_HDR_LEN + bytes, { type, code: 0, id, seq });
    return this.ipOutput(frame, dst, IPPROTO_ICMP);
  }

  private arpOutput(op: number, dstMac: number, spa: number, tha: number, tpa: number): void {
    const frame = new Uint8Array(ETHER_HDR_LEN + ARP_LEN);
    arpEncode(frame, ETHER_HDR_LEN, { op, sha: this.mac, spa, tha, tpa });
    this.etherOutput(frame, dstMac, ETHERTYPE_ARP).catch(() => {});
  }

  /** Hand a frame to the link; a link failure is counted, and returned to a caller who awaits. */
  private etherOutput(frame: Uint8Array, dst: number, type: number): Promise<void> {
    if (this.closed) return Promise.resolve();
    etherEncode(frame, { dst, src: this.mac, type });
    this.counters.txFrames++;
    this.counters.txBytes += frame.length;
    try {
      const r = this.link.send(frame);
      if (r === undefined) return Promise.resolve();
      return r.catch((err: unknown) => {
        this.linkError(err);
        throw err;
      });
    } catch (err) {
      this.linkError(err);
      return Promise.reject(err);
    }
  }

  private linkError(err: unknown): void {
    this.counters.drops['link-error']++;
    this.log('link send failed: %s', (err as Error).message);
  }

  // ---- ARP resolution ------------------------------------------------------------

  private arpEntry(address: number): ArpEntry {
    let e = this.arp.get(address);
    if (e !== undefined) return e;
    if (this.arp.size >= this.opts.arpEntries) this.arpEvictOldest();
    e = { mac: -1, expiresMs: 0, pending: [], tries: 0, timer: null };
    this.arp.set(address, e);
    return e;
  }

  private arpEvictOldest(): void {
    const first = this.arp.entries().next();
    if (first.done) return;
    const [address, e] = first.value;
    if (e.timer !== null) clearTimeout(e.timer);
    this.counters.drops['arp-evicted'] += e.pending.length;
    this.arp.delete(address);
  }

  /** arpresolve: send now when the entry is live; else hold the frame (bounded) and ask. */
  private arpResolve(hop: number, frame: Uint8Array): Promise<void> {
    let e = this.arp.get(hop);
    if (e !== undefined && e.mac >= 0 && e.expiresMs > performance.now()) return this.etherOutput(frame, e.mac, ETHERTYPE_IP);
    if (e !== undefined && e.mac >= 0) this.arp.delete(hop); // aged out: ask again
    e = this.arpEntry(hop);
    if (e.pending.length >= this.opts.arpQueueLength) {
      e.pending.shift();
      this.counters.drops['arp-queue-full']++;
    }
    e.pending.push(frame);
    if (e.timer === null) this.arpRequest(hop, e);
    return Promise.resolve();
  }

  private arpRequest(hop: number, e: ArpEntry): void {
    if (e.tries >= this.opts.arpTries) {
      this.log('%s: no ARP reply after %d requests', ipv4Format(hop), e.tries);
      this.counters.drops['arp-unresolved'] += e.pending.length;
      this.arp.delete(hop);
      return;
    }
    e.tries++;
    this.arpOutput(ARPOP_REQUEST, ETHER_ADDR_BROADCAST, this.addr, 0, hop);
    e.timer = setTimeout(() => {
      e.timer = null;
      if (this.arp.get(hop) === e && e.mac < 0) this.arpRequest(hop, e);
    }, this.opts.arpRetransmitMs);
    e.timer.unref();
  }

  /** The entry resolved: stop asking and send what waited. */
  private arpFlush(e: ArpEntry): void {
    if (e.timer !== null) clearTimeout(e.timer);
    e.timer = null;
    e.tries = 0;
    const frames = e.pending;
    e.pending = [];
    for (const f of frames) void this.etherOutput(f, e.mac, ETHERTYPE_IP).catch(() => {});
  }
}
