// DHCP (RFC 2131) over the IP layer of ip.ts: the BOOTP message codec with
// the options of RFC 2132 that a host and a small server use (1 subnet mask,
// 3 routers, 6 DNS servers, 12 host name, 50 requested address, 51 lease
// time, 53 message type, 54 server identifier, 55 parameter request list,
// 56 message, 57 maximum size, 58/59 renewal and rebinding times, 61 client
// identifier), and the client's state machine: INIT, SELECTING, REQUESTING,
// BOUND, RENEWING, REBINDING (RFC 2131 figure 5).

import { XenError } from '../errors.js';
import { logger, type Log } from '../log.js';
import {
  INADDR_BROADCAST, bounded, checkAssignment, ipv4Format, macFormat, macRead, macWrite,
  type IpInterface, type UdpSocket, type WaitOptions,
} from './ip.js';

export const DHCP_SERVER_PORT = 67;
export const DHCP_CLIENT_PORT = 68;
export const BOOTREQUEST = 1;
export const BOOTREPLY = 2;
export const HTYPE_ETHER = 1;
export const DHCP_MAGIC_COOKIE = 0x63825363;
/** op..file: the fixed BOOTP fields */
export const BOOTP_FIXED_LEN = 236;
export const DHCP_OPTIONS_OFF = BOOTP_FIXED_LEN + 4;
/** RFC 1542: relays may drop BOOTP messages shorter than this. */
export const BOOTP_MIN_LEN = 300;
export const BOOTP_BROADCAST = 0x8000;

export const DHCPDISCOVER = 1;
export const DHCPOFFER = 2;
export const DHCPREQUEST = 3;
export const DHCPDECLINE = 4;
export const DHCPACK = 5;
export const DHCPNAK = 6;
export const DHCPRELEASE = 7;
export const DHCPINFORM = 8;

export const DHO_PAD = 0;
export const DHO_SUBNET_MASK = 1;
export const DHO_ROUTERS = 3;
export const DHO_DOMAIN_NAME_SERVERS = 6;
export const DHO_HOST_NAME = 12;
export const DHO_DHCP_REQUESTED_ADDRESS = 50;
export const DHO_DHCP_LEASE_TIME = 51;
export const DHO_DHCP_MESSAGE_TYPE = 53;
export const DHO_DHCP_SERVER_IDENTIFIER = 54;
export const DHO_DHCP_PARAMETER_REQUEST_LIST = 55;
export const DHO_DHCP_MESSAGE = 56;
export const DHO_DHCP_MAX_MESSAGE_SIZE = 57;
export const DHO_DHCP_RENEWAL_TIME = 58;
export const DHO_DHCP_REBINDING_TIME = 59;
export const DHO_DHCP_CLIENT_IDENTIFIER = 61;
export const DHO_END = 255;

/** A lease time of all ones is an infinite lease. */
export const DHCP_INFINITE = 0xffff_ffff;

/** A DHCP message; addresses and the MAC (`chaddr`, Ethernet only) are numbers. */
export type DhcpMessage = {
  op: number;
  hops: number;
  xid: number;
  secs: number;
  flags: number;
  ciaddr: number;
  yiaddr: number;
  siaddr: number;
  giaddr: number;
  chaddr: number;
  /** option 53 */
  type: number;
  subnetMask?: number;
  routers?: number[];
  dns?: number[];
  hostName?: string;
  requestedAddress?: number;
  leaseSeconds?: number;
  serverId?: number;
  parameters?: number[];
  message?: string;
  maxMessageSize?: number;
  renewalSeconds?: number;
  rebindingSeconds?: number;
  clientId?: Uint8Array;
};

const u16 = (b: Uint8Array, off: number): number => (b[off]! << 8) | b[off + 1]!;
const u32 = (b: Uint8Array, off: number): number => ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
function put32(b: Uint8Array, off: number, v: number): void {
  b[off] = v >>> 24;
  b[off + 1] = v >>> 16;
  b[off + 2] = v >>> 8;
  b[off + 3] = v;
}

const bad = (reason: string): XenError => new XenError('EBADMSG', `dhcp: ${reason}`);
const latin1 = new TextDecoder('latin1');

/** Decode one message; EBADMSG (with the reason) for anything malformed. */
export function dhcpDecode(b: Uint8Array): DhcpMessage {
  if (b.length < DHCP_OPTIONS_OFF) throw bad(`${b.length} bytes, shorter than ${DHCP_OPTIONS_OFF}`);
  const op = b[0]!;
  if (op !== BOOTREQUEST && op !== BOOTREPLY) throw bad(`op ${op}`);
  if (b[1] !== HTYPE_ETHER || b[2] !== 6) throw bad(`htype ${b[1]} hlen ${b[2]}: not Ethernet`);
  if (u32(b, BOOTP_FIXED_LEN) !== DHCP_MAGIC_COOKIE) throw bad('no magic cookie');
  const m: DhcpMessage = {
    op, hops: b[3]!, xid: u32(b, 4), secs: u16(b, 8), flags: u16(b, 10),
    ciaddr: u32(b, 12), yiaddr: u32(b, 16), siaddr: u32(b, 20), giaddr: u32(b, 24), chaddr: macRead(b, 28), type: 0,
  };
  let off = DHCP_OPTIONS_OFF;
  while (off < b.length) {
    const code = b[off++]!;
    if (code === DHO_END) break;
    if (code === DHO_PAD) continue;
    if (off >= b.length) throw bad(`option ${code} has no length`);
    const len = b[off++]!;
    if (off + len > b.length) throw bad(`option ${code} of ${len} bytes runs past the end`);
    optionDecode(m, code, b.subarray(off, off + len));
    off += len;
  }
  if (m.type < DHCPDISCOVER || m.type > DHCPINFORM) throw bad(m.type === 0 ? 'no message type' : `message type ${m.type}`);
  return m;
}

function optionDecode(m: DhcpMessage, code: number, v: Uint8Array): void {
  const one32 = (): number => {
    if (v.length !== 4) throw bad(`option ${code} has ${v.length} bytes, not 4`);
    return u32(v, 0);
  };
  const list32 = (): number[] => {
    if (v.length === 0 || v.length % 4 !== 0) throw bad(`option ${code} has ${v.length} bytes, not a multiple of 4`);
    const a: number[] = [];
    for (let i = 0; i < v.length; i += 4) a.push(u32(v, i));
    return a;
  };
  switch (code) {
    case DHO_DHCP_MESSAGE_TYPE:
      if (v.length !== 1) throw bad(`message type option of ${v.length} bytes`);
      m.type = v[0]!;
      break;
    case DHO_SUBNET_MASK: m.subnetMask = one32(); break;
    case DHO_ROUTERS: m.routers = list32(); break;
    case DHO_DOMAIN_NAME_SERVERS: m.dns = list32(); break;
    case DHO_HOST_NAME: m.hostName = latin1.decode(v); break;
    case DHO_DHCP_REQUESTED_ADDRESS: m.requestedAddress = one32(); break;
    case DHO_DHCP_LEASE_TIME: m.leaseSeconds = one32(); break;
    case DHO_DHCP_SERVER_IDENTIFIER: m.serverId = one32(); break;
    case DHO_DHCP_PARAMETER_REQUEST_LIST: m.parameters = [...v]; break;
    case DHO_DHCP_MESSAGE: m.message = latin1.decode(v); break;
    case DHO_DHCP_MAX_MESSAGE_SIZE:
      if (v.length !== 2) throw bad(`maximum size option of ${v.length} bytes`);
      m.maxMessageSize = u16(v, 0);
      break;
    case DHO_DHCP_RENEWAL_TIME: m.renewalSeconds = one32(); break;
    case DHO_DHCP_REBINDING_TIME: m.rebindingSeconds = one32(); break;
    case DHO_DHCP_CLIENT_IDENTIFIER:
      if (v.length < 2) throw bad(`client identifier of ${v.length} bytes`);
      m.clientId = v.slice();
      break;
    default: // options this host does not use are skipped (RFC 2131 section 3)
  }
}

/** The options of `m` as (code, bytes) pairs, message type first. */
function optionsOf(m: DhcpMessage): Array<[number, Uint8Array]> {
  const o: Array<[number, Uint8Array]> = [[DHO_DHCP_MESSAGE_TYPE, Uint8Array.of(m.type)]];
  const a32 = (a: number[]): Uint8Array => {
    const v = new Uint8Array(a.length * 4);
    a.forEach((x, i) => put32(v, i * 4, x));
    return v;
  };
  const text = (s: string): Uint8Array => Uint8Array.from(s, (c) => c.charCodeAt(0) & 0xff);
  if (m.serverId !== undefined) o.push([DHO_DHCP_SERVER_IDENTIFIER, a32([m.serverId])]);
  if (m.requestedAddress !== undefined) o.push([DHO_DHCP_REQUESTED_ADDRESS, a32([m.requestedAddress])]);
  if (m.leaseSeconds !== undefined) o.push([DHO_DHCP_LEASE_TIME, a32([m.leaseSeconds])]);
  if (m.renewalSeconds !== undefined) o.push([DHO_DHCP_RENEWAL_TIME, a32([m.renewalSeconds])]);
  if (m.rebindingSeconds !== undefined) o.push([DHO_DHCP_REBINDING_TIME, a32([m.rebindingSeconds])]);
  if (m.subnetMask !== undefined) o.push([DHO_SUBNET_MASK, a32([m.subnetMask])]);
  if (m.routers !== undefined) o.push([DHO_ROUTERS, a32(m.routers)]);
  if (m.dns !== undefined) o.push([DHO_DOMAIN_NAME_SERVERS, a32(m.dns)]);
  if (m.hostName !== undefined) o.push([DHO_HOST_NAME, text(m.hostName)]);
  if (m.parameters !== undefined) o.push([DHO_DHCP_PARAMETER_REQUEST_LIST, Uint8Array.from(m.parameters)]);
  if (m.message !== undefined) o.push([DHO_DHCP_MESSAGE, text(m.message)]);
  if (m.maxMessageSize !== undefined) o.push([DHO_DHCP_MAX_MESSAGE_SIZE, Uint8Array.of(m.maxMessageSize >> 8, m.maxMessageSize)]);
  if (m.clientId !== undefined) o.push([DHO_DHCP_CLIENT_IDENTIFIER, m.clientId]);
  return o;
}

/** Encode `m`, padded to BOOTP_MIN_LEN; EINVAL for an option over 255 bytes or an empty list. */
export function dhcpEncode(m: DhcpMessage): Uint8Array {
  const options = optionsOf(m);
  let len = DHCP_OPTIONS_OFF + 1;
  for (const [code, v] of options) {
    if (v.length > 255 || (v.length === 0 && code !== DHO_HOST_NAME && code !== DHO_DHCP_MESSAGE)) {
      throw new XenError('EINVAL', `dhcp option ${code} of ${v.length} bytes`);
    }
    len += 2 + v.length;
  }
  const b = new Uint8Array(Math.max(len, BOOTP_MIN_LEN));
  b[0] = m.op;
  b[1] = HTYPE_ETHER;
  b[2] = 6;
  b[3] = m.hops;
  put32(b, 4, m.xid);
  b[8] = m.secs >> 8;
  b[9] = m.secs;
  b[10] = m.flags >> 8;
  b[11] = m.flags;
  put32(b, 12, m.ciaddr);
  put32(b, 16, m.yiaddr);
  put32(b, 20, m.siaddr);
  put32(b, 24, m.giaddr);
  macWrite(b, 28, m.chaddr);
  put32(b, BOOTP_FIXED_LEN, DHCP_MAGIC_COOKIE);
  let off = DHCP_OPTIONS_OFF;
  for (const [code, v] of options) {
    b[off] = code;
    b[off + 1] = v.length;
    b.set(v, off + 2);
    off += 2 + v.length;
  }
  b[off] = DHO_END;
  return b;
}

/** A message with every fixed field zero but op, xid and chaddr. */
export function dhcpMessage(op: number, type: number, xid: number, chaddr: number): DhcpMessage {
  return { op, hops: 0, xid, secs: 0, flags: 0, ciaddr: 0, yiaddr: 0, siaddr: 0, giaddr: 0, chaddr, type };
}

/** The prefix length of a contiguous netmask, or -1. */
export function maskPrefix(mask: number): number {
  const host = ~mask >>> 0;
  if ((host & (host + 1)) !== 0) return -1;
  return Math.clz32(host);
}

// ---- the client -----------------------------------------------------------------

export type DhcpLease = {
  address: number;
  prefixLength: number;
  /** 0: none */
  router: number;
  dns: number[];
  serverId: number;
  leaseSeconds: number;
  renewalSeconds: number;
  rebindingSeconds: number;
};

export type DhcpClientOptions = {
  /** The first retransmission delay; it doubles up to maxRetransmitMs (RFC 2131: 4 s, then 8 s ... 64 s). */
  retransmitMs?: number;
  maxRetransmitMs?: number;
  /** Option 61; default: type 1 and the MAC (RFC 2132 section 9.14). */
  clientId?: Uint8Array;
  /** Option 12. */
  hostName?: string;
};

export type DhcpState = 'init' | 'selecting' | 'requesting' | 'bound' | 'renewing' | 'rebinding' | 'stopped';

export const DHCP_CLIENT_DROPS = ['malformed', 'not-reply', 'xid', 'chaddr', 'unexpected', 'no-server-id', 'no-lease-time', 'bad-address', 'source-port'] as const;
export type DhcpClientDrop = (typeof DHCP_CLIENT_DROPS)[number];

const PARAMETERS = [DHO_SUBNET_MASK, DHO_ROUTERS, DHO_DOMAIN_NAME_SERVERS, DHO_DHCP_LEASE_TIME, DHO_DHCP_SERVER_IDENTIFIER, DHO_DHCP_RENEWAL_TIME, DHO_DHCP_REBINDING_TIME];
/** setTimeout's longest delay; longer waits are taken in steps. */
const MAX_TIMER_MS = 0x7fff_ffff;
/** REQUESTs sent in REQUESTING before starting over (RFC 2131 section 3.1, step 5). */
const REQUEST_TRIES = 4;

/**
 * A DHCP client on an interface: acquires a lease, assigns it, renews it at
 * T1 (unicast to the server), rebinds at T2 (broadcast), and drops the
 * address when the lease expires or a server says NAK, then starts over.
 */
export class DhcpClient implements Disposable {
  state: DhcpState = 'init';
  lease: DhcpLease | null = null;
  readonly counters = {
    discovers: 0, offers: 0, requests: 0, acks: 0, naks: 0,
    drops: Object.fromEntries(DHCP_CLIENT_DROPS.map((r) => [r, 0])) as Record<DhcpClientDrop, number>,
  };

  private readonly log: Log;
  private readonly socket: UdpSocket;
  private readonly retransmitMs: number;
  private readonly maxRetransmitMs: number;
  private readonly clientId: Uint8Array;
  private readonly hostName: string | undefined;
  private readonly leaseWaiters = new Set<(l: DhcpLease) => void>();
  private xid = 0;
  private startedMs = 0;
  private tries = 0;
  private offer: { address: number; serverId: number } | null = null;
  private timer: NodeJS.Timeout | null = null;
  /** performance.now() at T1, T2 and expiry of the current lease */
  private t1Ms = 0;
  private t2Ms = 0;
  private expiryMs = 0;

  constructor(
    private readonly ip: IpInterface,
    options: DhcpClientOptions = {},
  ) {
    this.log = logger('dhcp', macFormat(ip.mac));
    this.retransmitMs = options.retransmitMs ?? 4000;
    this.maxRetransmitMs = options.maxRetransmitMs ?? 64_000;
    const id = new Uint8Array(7);
    id[0] = HTYPE_ETHER;
    macWrite(id, 1, ip.mac);
    this.clientId = options.clientId ?? id;
    this.hostName = options.hostName;
    this.socket = ip.bind(DHCP_CLIENT_PORT);
    this.socket.onMessage((d) => this.input(d.port, d.data));
  }

  /** Start (if not running) and resolve with the first lease; ETIMEDOUT, ECANCELED (the client keeps trying). */
  start(opts: WaitOptions = {}): Promise<DhcpLease> {
    if (this.state === 'stopped') return Promise.reject(new XenError('EBADF', 'dhcp client is closed'));
    if (this.state === 'init' && this.timer === null) this.discover();
    if (this.lease !== null) return Promise.resolve(this.lease);
    return bounded<DhcpLease>('dhcp', opts, (resolve) => {
      this.leaseWaiters.add(resolve);
      return () => this.leaseWaiters.delete(resolve);
    });
  }

  /** Give the lease back (DHCPRELEASE) and stop. */
  async release(): Promise<void> {
    const l = this.lease;
    if (l !== null && this.ip.addr === l.address) {
      const m = this.message(DHCPRELEASE);
      m.ciaddr = l.address;
      m.serverId = l.serverId;
      await this.socket.send(l.serverId, DHCP_SERVER_PORT, dhcpEncode(m)).catch(() => {});
      this.ip.unassign();
    }
    this.close();
  }

  close(): void {
    if (this.state === 'stopped') return;
    this.state = 'stopped';
    this.clearTimer();
    this.socket.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  // ---- states ---------------------------------------------------------------

  private discover(): void {
    this.state = 'selecting';
    this.xid = randomXid();
    this.startedMs = performance.now();
    this.tries = 0;
    this.offer = null;
    this.log('DISCOVER xid %s', this.xid.toString(16));
    this.retransmit();
  }

  /** Send the message of the current state now and arm the next try. */
  private retransmit(): void {
    const now = performance.now();
    let delayMs = Math.min(this.retransmitMs * 2 ** this.tries, this.maxRetransmitMs);
    if (this.state === 'requesting' && this.tries >= REQUEST_TRIES) return this.restart('no ACK to REQUEST');
    if (this.state === 'renewing' || this.state === 'rebinding') {
      // RFC 2131 4.4.5: half the time left until T2 (renewing) or expiry (rebinding).
      const until = this.state === 'renewing' ? this.t2Ms : this.expiryMs;
      delayMs = Math.max((until - now) / 2, Math.min(this.retransmitMs, until - now));
    }
    this.tries++;
    this.transmit();
    this.schedule(now + delayMs * (0.9 + 0.2 * Math.random()), () => this.retransmit());
  }

  private transmit(): void {
    const secs = Math.min(0xffff, Math.floor((performance.now() - this.startedMs) / 1000));
    let to = INADDR_BROADCAST;
    let m: DhcpMessage;
    if (this.state === 'selecting') {
      m = this.message(DHCPDISCOVER);
      this.counters.discovers++;
    } else {
      m = this.message(DHCPREQUEST);
      this.counters.requests++;
      if (this.state === 'requesting' && this.offer !== null) {
        m.requestedAddress = this.offer.address;
        m.serverId = this.offer.serverId;
      } else if (this.lease !== null) {
        m.ciaddr = this.lease.address;
        if (this.state === 'renewing') to = this.lease.serverId;
      }
    }
    m.secs = secs;
    this.socket.send(to, DHCP_SERVER_PORT, dhcpEncode(m)).catch((err: Error) => this.log('send: %s', err.message));
  }

  private message(type: number): DhcpMessage {
    const m = dhcpMessage(BOOTREQUEST, type, this.xid, this.ip.mac);
    m.clientId = this.clientId;
    if (type !== DHCPRELEASE) m.parameters = PARAMETERS;
    if (this.hostName !== undefined && type !== DHCPRELEASE) m.hostName = this.hostName;
    return m;
  }

  private restart(why: string): void {
    this.log('starting over: %s', why);
    if (this.lease !== null && this.ip.addr === this.lease.address) this.ip.unassign();
    this.lease = null;
    this.clearTimer();
    // A short pause so that a server that keeps saying NAK is not flooded.
    this.state = 'init';
    this.schedule(performance.now() + Math.min(this.retransmitMs, 1000), () => this.discover());
  }

  // ---- input -------------------------------------------------------------------

  private input(sport: number, data: Uint8Array): void {
    const reason = this.accept(sport, data);
    if (reason !== null) this.counters.drops[reason]++;
  }

  private accept(sport: number, data: Uint8Array): DhcpClientDrop | null {
    if (sport !== DHCP_SERVER_PORT) return 'source-port';
    let m: DhcpMessage;
    try {
      m = dhcpDecode(data);
    } catch (err) {
      this.log('%s', (err as Error).message);
      return 'malformed';
    }
    if (m.op !== BOOTREPLY) return 'not-reply';
    if (m.chaddr !== this.ip.mac) return 'chaddr';
    if (m.xid !== this.xid) return 'xid';
    if (m.serverId === undefined) return 'no-server-id';
    if (m.type === DHCPOFFER && this.state === 'selecting') return this.offered(m);
    if (m.type === DHCPACK && (this.state === 'requesting' || this.state === 'renewing' || this.state === 'rebinding')) return this.acked(m);
    if (m.type === DHCPNAK && (this.state === 'requesting' || this.state === 'renewing' || this.state === 'rebinding')) {
      this.counters.naks++;
      this.restart(`NAK from ${ipv4Format(m.serverId)}${m.message === undefined ? '' : `: ${m.message}`}`);
      return null;
    }
    return 'unexpected';
  }

  /** SELECTING: take the first usable offer (RFC 2131 allows any choice). */
  private offered(m: DhcpMessage): DhcpClientDrop | null {
    if (m.leaseSeconds === undefined) return 'no-lease-time';
    if (leaseOf(m) === null) return 'bad-address';
    this.counters.offers++;
    const serverId = m.serverId!;
    this.log('OFFER %s from %s', ipv4Format(m.yiaddr), ipv4Format(serverId));
    this.offer = { address: m.yiaddr, serverId };
    this.state = 'requesting';
    this.tries = 0;
    this.clearTimer();
    this.retransmit();
    return null;
  }

  private acked(m: DhcpMessage): DhcpClientDrop | null {
    const l = leaseOf(m);
    if (m.leaseSeconds === undefined) return 'no-lease-time';
    if (l === null) return 'bad-address';
    if (this.state === 'requesting' && (this.offer === null || m.serverId !== this.offer.serverId)) return 'unexpected';
    this.counters.acks++;
    this.clearTimer();
    this.bind(l);
    return null;
  }

  /** BOUND: assign the address and set T1, T2 and expiry from the ACK's time. */
  private bind(l: DhcpLease): void {
    const now = performance.now();
    const changed = this.lease === null || this.lease.address !== l.address || this.ip.addr !== l.address
      || this.lease.prefixLength !== l.prefixLength || this.lease.router !== l.router;
    this.lease = l;
    this.state = 'bound';
    if (changed) this.ip.assign({ address: l.address, prefixLength: l.prefixLength, gateway: l.router });
    this.log('BOUND %s/%d for %d s', ipv4Format(l.address), l.prefixLength, l.leaseSeconds);
    for (const w of [...this.leaseWaiters]) w(l);
    if (l.leaseSeconds === DHCP_INFINITE) return;
    this.t1Ms = now + l.renewalSeconds * 1000;
    this.t2Ms = now + l.rebindingSeconds * 1000;
    this.expiryMs = now + l.leaseSeconds * 1000;
    this.schedule(this.t1Ms, () => this.renew('renewing'));
  }

  private renew(state: 'renewing' | 'rebinding'): void {
    this.state = state;
    this.xid = randomXid();
    this.startedMs = performance.now();
    this.tries = 0;
    this.log('%s', state.toUpperCase());
    this.retransmit();
    // The retransmit timer is replaced at T2 and at expiry.
    if (state === 'renewing') this.scheduleAlso(this.t2Ms, () => this.renew('rebinding'));
    else this.scheduleAlso(this.expiryMs, () => this.restart('lease expired'));
  }

  // ---- timers ----------------------------------------------------------------------

  private deadline: NodeJS.Timeout | null = null;

  /** One pending action at `atMs`; long waits are taken in steps of at most MAX_TIMER_MS. */
  private schedule(atMs: number, fn: () => void): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = stepTimer(atMs, fn, (t) => (this.timer = t));
  }

  /** A second action (T2 or expiry) that also cancels the retransmissions. */
  private scheduleAlso(atMs: number, fn: () => void): void {
    if (this.deadline !== null) clearTimeout(this.deadline);
    this.deadline = stepTimer(atMs, () => {
      this.deadline = null;
      if (this.timer !== null) clearTimeout(this.timer);
      this.timer = null;
      fn();
    }, (t) => (this.deadline = t));
  }

  private clearTimer(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    if (this.deadline !== null) clearTimeout(this.deadline);
    this.timer = null;
    this.deadline = null;
  }
}

function stepTimer(atMs: number, fn: () => void, rearmed: (t: NodeJS.Timeout) => void): NodeJS.Timeout {
  const wait = Math.max(0, Math.min(atMs - performance.now(), MAX_TIMER_MS));
  const t = setTimeout(() => {
    if (performance.now() + 1 < atMs) rearmed(stepTimer(atMs, fn, rearmed));
    else fn();
  }, wait);
  t.unref();
  return t;
}

function randomXid(): number {
  return crypto.getRandomValues(new Uint32Array(1))[0]!;
}

/** The lease an OFFER or ACK gives, or null when its address or mask is unusable. */
export function leaseOf(m: DhcpMessage): DhcpLease | null {
  const leaseSeconds = m.leaseSeconds ?? 0;
  if (m.serverId === undefined || leaseSeconds === 0) return null;
  const prefixLength = m.subnetMask === undefined ? classfulPrefix(m.yiaddr) : maskPrefix(m.subnetMask);
  const router = m.routers?.[0] ?? 0;
  try {
    checkAssignment({ address: m.yiaddr, prefixLength, gateway: router });
  } catch {
    return null;
  }
  const t1 = m.renewalSeconds ?? Math.floor(leaseSeconds / 2);
  const t2 = m.rebindingSeconds ?? Math.floor((leaseSeconds * 7) / 8);
  // A server's T1 <= T2 <= lease is trusted only when it is consistent.
  const consistent = t1 <= t2 && t2 <= leaseSeconds;
  return {
    address: m.yiaddr, prefixLength, router, dns: m.dns ?? [], serverId: m.serverId, leaseSeconds,
    renewalSeconds: consistent ? t1 : Math.floor(leaseSeconds / 2),
    rebindingSeconds: consistent ? t2 : Math.floor((leaseSeconds * 7) / 8),
  };
}

/** RFC 2132 3.3's fallback when a server names no mask: the class of the address. */
function classfulPrefix(a: number): number {
  if (a >>> 31 === 0) return 8;
  if (a >>> 30 === 2) return 16;
  return 24;
}
