// A small DHCP server (RFC 2131 section 4.3) for a dom0 bridge: it sits on a
// bridge port with an address of its own (the server identifier), hands out
// addresses from one range, binds each lease to the client's MAC, and
// answers DISCOVER with OFFER and REQUEST with ACK or NAK. It takes RELEASE
// and DECLINE; relayed messages and INFORM are left alone. A malformed or
// unexpected message is logged with its reason, counted, and dropped; the
// server carries on.

import { XenError } from '../errors.js';
import { logger, type Log } from '../log.js';
import {
  DHCPACK, DHCPDECLINE, DHCPDISCOVER, DHCPINFORM, DHCPNAK, DHCPOFFER, DHCPRELEASE, DHCPREQUEST,
  BOOTP_BROADCAST, BOOTREPLY, BOOTREQUEST, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, dhcpDecode, dhcpEncode,
  type DhcpMessage,
} from '../guest/dhcp.js';
import {
  INADDR_BROADCAST, IpInterface, checkAssignment, ipv4Format, ipv4Parse, macFormat, prefixMask,
  type IpOptions, type Link, type UdpSocket,
} from '../guest/ip.js';

export type DhcpdConfig = {
  /** The range handed out, inclusive. */
  first: number;
  last: number;
  prefixLength: number;
  /** The server's own address on the bridge (option 54). */
  server: number;
  /** Option 3; 0: none. */
  router: number;
  /** Option 6. */
  dns: number[];
  leaseSeconds: number;
};

/** The words of a bridge's DHCP settings, as text. */
export type DhcpdSpec = {
  /** `<first>-<last>` */
  range: string;
  /** dotted mask or prefix length; default 24 */
  netmask?: string;
  /** default: the subnet's first host address */
  server?: string;
  router?: string;
  /** comma-separated */
  dns?: string;
  leaseSeconds?: string | number;
};

/** The most addresses one range may hold. */
export const DHCPD_MAX_RANGE = 65536;
const DEFAULT_LEASE_SECONDS = 3600;
/** How long an offered address is held for the client that was offered it. */
const OFFER_HOLD_MS = 60_000;
/** How long a declined address (another host has it) stays out of use. */
const DECLINE_HOLD_MS = 10 * 60_000;

/** Check and convert a bridge's `dhcp=<first>-<last>` and its options; EINVAL names the bad word. */
export function parseDhcpdConfig(spec: DhcpdSpec): DhcpdConfig {
  const m = /^([^-\s]+)-([^-\s]+)$/.exec(spec.range);
  if (m === null) throw new XenError('EINVAL', `dhcp=${spec.range}: expected FIRST-LAST`);
  const first = ipv4Parse(m[1]!);
  const last = ipv4Parse(m[2]!);
  const prefixLength = parsePrefix(spec.netmask ?? '24');
  const mask = prefixMask(prefixLength);
  const network = (first & mask) >>> 0;
  const server = spec.server === undefined ? network + 1 : ipv4Parse(spec.server);
  const router = spec.router === undefined || spec.router === '' ? 0 : ipv4Parse(spec.router);
  const dns = spec.dns === undefined || spec.dns === '' ? [] : spec.dns.split(',').map((s) => ipv4Parse(s.trim()));
  const leaseSeconds = Number(spec.leaseSeconds ?? DEFAULT_LEASE_SECONDS);
  if (!Number.isInteger(leaseSeconds) || leaseSeconds < 1 || leaseSeconds >= 0xffff_ffff) {
    throw new XenError('EINVAL', `lease ${spec.leaseSeconds}: not a whole number of seconds`);
  }
  if (first > last) throw new XenError('EINVAL', `dhcp=${spec.range}: the first address is above the last`);
  if (last - first + 1 > DHCPD_MAX_RANGE) throw new XenError('EINVAL', `dhcp=${spec.range}: more than ${DHCPD_MAX_RANGE} addresses`);
  for (const a of [first, last]) checkAssignment({ address: a, prefixLength, gateway: 0 });
  if (((last & mask) >>> 0) !== network) throw new XenError('EINVAL', `dhcp=${spec.range}: not inside one /${prefixLength}`);
  checkAssignment({ address: server, prefixLength, gateway: 0 });
  if (((server & mask) >>> 0) !== network) throw new XenError('EINVAL', `server ${ipv4Format(server)} is outside the range's subnet`);
  // The router may be the server itself (dom0 routing for its bridge).
  if (router !== 0 && router !== server) checkAssignment({ address: server, prefixLength, gateway: router });
  if (server >= first && server <= last) throw new XenError('EINVAL', `server ${ipv4Format(server)} is inside the range`);
  return { first, last, prefixLength, server, router, dns, leaseSeconds };
}

function parsePrefix(text: string): number {
  if (/^\d{1,2}$/.test(text)) {
    const n = Number(text);
    if (n >= 1 && n <= 30) return n;
  } else {
    const mask = ipv4Parse(text);
    const host = ~mask >>> 0;
    if ((host & (host + 1)) === 0 && Math.clz32(host) >= 1 && Math.clz32(host) <= 30) return Math.clz32(host);
  }
  throw new XenError('EINVAL', `netmask ${text}: not a contiguous mask of 1..30 bits`);
}

type Lease = { mac: number; address: number; state: 'offered' | 'bound'; expiresMs: number };

export const DHCPD_DROPS = ['malformed', 'not-request', 'bad-chaddr', 'relayed', 'inform', 'pool-exhausted', 'unknown-client', 'not-ours', 'unexpected'] as const;
export type DhcpdDrop = (typeof DHCPD_DROPS)[number];

/** The server on one bridge port. Close (or dispose) to stop it. */
export class Dhcpd implements Disposable {
  readonly ip: IpInterface;
  readonly counters = {
    discovers: 0, requests: 0, offers: 0, acks: 0, naks: 0, releases: 0, declines: 0,
    drops: Object.fromEntries(DHCPD_DROPS.map((r) => [r, 0])) as Record<DhcpdDrop, number>,
  };
  private readonly log: Log;
  private readonly socket: UdpSocket;
  private readonly byMac = new Map<number, Lease>();
  private readonly byAddress = new Map<number, Lease>();
  private readonly declined = new Map<number, number>();

  constructor(
    link: Link,
    readonly config: DhcpdConfig,
    options: IpOptions & { name?: string } = {},
  ) {
    const name = options.name ?? 'dhcpd';
    this.log = logger('dhcpd', name);
    this.ip = new IpInterface(link, { ...options, name });
    try {
      this.ip.assign({ address: config.server, prefixLength: config.prefixLength, gateway: 0 });
      this.socket = this.ip.bind(DHCP_SERVER_PORT);
    } catch (err) {
      this.ip.close();
      throw err;
    }
    this.socket.onMessage((d) => this.input(d.data));
    this.log('serving %s-%s/%d as %s', ipv4Format(config.first), ipv4Format(config.last), config.prefixLength, ipv4Format(config.server));
  }

  /** The lease table, for `xl`-style listings and tests. */
  leases(): Array<{ mac: string; address: string; state: 'offered' | 'bound'; expiresInMs: number }> {
    const now = performance.now();
    return [...this.byMac.values()].map((l) => ({ mac: macFormat(l.mac), address: ipv4Format(l.address), state: l.state, expiresInMs: Math.max(0, l.expiresMs - now) }));
  }

  close(): void {
    this.ip.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  private input(data: Uint8Array): void {
    let m: DhcpMessage;
    try {
      m = dhcpDecode(data);
    } catch (err) {
      return this.drop('malformed', (err as Error).message);
    }
    try {
      const reason = this.serve(m);
      if (reason !== null) this.drop(reason, `${typeName(m.type)} from ${macFormat(m.chaddr)}`);
    } catch (err) {
      // An encode of our own reply cannot fail on client input; say so loudly if it does.
      this.drop('unexpected', `internal: ${(err as Error).message}`);
    }
  }

  private drop(reason: DhcpdDrop, detail: string): void {
    this.counters.drops[reason]++;
    this.log('dropped (%s): %s', reason, detail);
  }

  private serve(m: DhcpMessage): DhcpdDrop | null {
    if (m.op !== BOOTREQUEST) return 'not-request';
    if (m.chaddr === 0 || Math.floor(m.chaddr / 0x100_0000_0000) & 1) return 'bad-chaddr';
    if (m.giaddr !== 0) return 'relayed';
    switch (m.type) {
      case DHCPDISCOVER: return this.discover(m);
      case DHCPREQUEST: return this.request(m);
      case DHCPRELEASE: return this.release(m);
      case DHCPDECLINE: return this.decline(m);
      case DHCPINFORM: return 'inform';
      default: return 'not-request';
    }
  }

  private discover(m: DhcpMessage): DhcpdDrop | null {
    this.counters.discovers++;
    const address = this.allocate(m.chaddr, m.requestedAddress);
    if (address === null) return 'pool-exhausted';
    // RFC 2131 4.3.1: a client with a binding is offered its address, and the
    // binding stands: an offer the client never takes up must not free an
    // address it may go on using until the lease ends.
    const held = this.byMac.get(m.chaddr);
    const bound = held !== undefined && held.state === 'bound' && held.address === address && held.expiresMs > performance.now();
    const l = bound ? held : this.bindLease(m.chaddr, address, 'offered', OFFER_HOLD_MS);
    this.counters.offers++;
    this.log('OFFER %s to %s', ipv4Format(l.address), macFormat(m.chaddr));
    this.reply(m, DHCPOFFER, l.address);
    return null;
  }

  /** RFC 2131 4.3.2: SELECTING (server id), INIT-REBOOT (requested address), RENEWING/REBINDING (ciaddr). */
  private request(m: DhcpMessage): DhcpdDrop | null {
    this.counters.requests++;
    const l = this.byMac.get(m.chaddr);
    if (m.serverId !== undefined) {
      if (m.serverId !== this.config.server) {
        // The client chose another server: our offer is free again.
        if (l !== undefined && l.state === 'offered') this.forget(l);
        return 'not-ours';
      }
      if (l === undefined || m.requestedAddress !== l.address || m.ciaddr !== 0) return this.nak(m, 'no offer for that address');
      return this.ack(m, l);
    }
    const wanted = m.ciaddr !== 0 ? m.ciaddr : m.requestedAddress;
    if (wanted === undefined) return 'unexpected';
    if (l !== undefined && l.address === wanted) return this.ack(m, l);
    if (l !== undefined || !this.usable(wanted, m.chaddr, performance.now())) return this.nak(m, `${ipv4Format(wanted)} is not yours`);
    // A free address we have no record of (a server restarted): RFC 2131 says stay silent.
    return 'unknown-client';
  }

  private ack(m: DhcpMessage, l: Lease): null {
    this.bindLease(l.mac, l.address, 'bound', this.config.leaseSeconds * 1000);
    this.counters.acks++;
    this.log('ACK %s to %s', ipv4Format(l.address), macFormat(l.mac));
    this.reply(m, DHCPACK, l.address);
    return null;
  }

  private nak(m: DhcpMessage, why: string): null {
    this.counters.naks++;
    this.log('NAK to %s: %s', macFormat(m.chaddr), why);
    this.reply(m, DHCPNAK, 0, why);
    return null;
  }

  private release(m: DhcpMessage): DhcpdDrop | null {
    const l = this.byMac.get(m.chaddr);
    if (m.serverId !== this.config.server) return 'not-ours';
    if (l === undefined || l.address !== m.ciaddr) return 'unknown-client';
    this.counters.releases++;
    this.forget(l);
    return null;
  }

  private decline(m: DhcpMessage): DhcpdDrop | null {
    const l = this.byMac.get(m.chaddr);
    if (m.serverId !== this.config.server) return 'not-ours';
    if (l === undefined || l.address !== m.requestedAddress) return 'unknown-client';
    this.counters.declines++;
    this.log('%s declined %s: another host uses it', macFormat(m.chaddr), ipv4Format(l.address));
    this.declined.set(l.address, performance.now() + DECLINE_HOLD_MS);
    this.forget(l);
    return null;
  }

  // ---- the lease table -----------------------------------------------------------

  private inRange(a: number): boolean {
    return a >= this.config.first && a <= this.config.last;
  }

  /** Usable by `mac`: in range, not declined, and not held by a live lease of another client. */
  private usable(a: number, mac: number, now: number): boolean {
    if (!this.inRange(a) || (this.declined.get(a) ?? 0) > now) return false;
    const l = this.byAddress.get(a);
    return l === undefined || l.mac === mac || l.expiresMs <= now;
  }

  /** The client's previous address, else the one it asks for, else a never-used one, else an expired one. */
  private allocate(mac: number, requested: number | undefined): number | null {
    const now = performance.now();
    const previous = this.byMac.get(mac);
    if (previous !== undefined && this.usable(previous.address, mac, now)) return previous.address;
    if (requested !== undefined && this.usable(requested, mac, now)) return requested;
    let expired: number | null = null;
    for (let a = this.config.first; a <= this.config.last; a++) {
      if (!this.usable(a, mac, now)) continue;
      if (!this.byAddress.has(a)) return a;
      expired ??= a;
    }
    return expired;
  }

  private bindLease(mac: number, address: number, state: Lease['state'], forMs: number): Lease {
    const old = this.byMac.get(mac);
    if (old !== undefined) this.forget(old);
    const taken = this.byAddress.get(address);
    if (taken !== undefined) this.forget(taken);
    const l: Lease = { mac, address, state, expiresMs: performance.now() + forMs };
    this.byMac.set(mac, l);
    this.byAddress.set(address, l);
    return l;
  }

  private forget(l: Lease): void {
    if (this.byMac.get(l.mac) === l) this.byMac.delete(l.mac);
    if (this.byAddress.get(l.address) === l) this.byAddress.delete(l.address);
  }

  // ---- replies ----------------------------------------------------------------------

  /** RFC 2131 4.1: NAK broadcast; to ciaddr when set; broadcast on request; else to chaddr at yiaddr. */
  private reply(req: DhcpMessage, type: number, yiaddr: number, message?: string): void {
    const c = this.config;
    const r: DhcpMessage = {
      op: BOOTREPLY, hops: 0, xid: req.xid, secs: 0, flags: req.flags, ciaddr: type === DHCPNAK ? 0 : req.ciaddr,
      yiaddr, siaddr: 0, giaddr: 0, chaddr: req.chaddr, type, serverId: c.server,
    };
    if (type === DHCPNAK) {
      if (message !== undefined) r.message = message;
    } else {
      r.leaseSeconds = c.leaseSeconds;
      r.renewalSeconds = Math.floor(c.leaseSeconds / 2);
      r.rebindingSeconds = Math.floor((c.leaseSeconds * 7) / 8);
      r.subnetMask = prefixMask(c.prefixLength);
      if (c.router !== 0) r.routers = [c.router];
      if (c.dns.length > 0) r.dns = c.dns;
    }
    let to = INADDR_BROADCAST;
    if (type !== DHCPNAK && req.ciaddr !== 0) to = req.ciaddr;
    else if (type !== DHCPNAK && (req.flags & BOOTP_BROADCAST) === 0) {
      // The client cannot answer ARP yet: put its MAC in the cache, as dhcpd does with SIOCSARP.
      this.ip.arpSet(yiaddr, req.chaddr);
      to = yiaddr;
    }
    this.socket.send(to, DHCP_CLIENT_PORT, dhcpEncode(r)).catch((err: Error) => this.log('reply to %s: %s', macFormat(req.chaddr), err.message));
  }
}

const TYPE_NAMES = ['?', 'DISCOVER', 'OFFER', 'REQUEST', 'DECLINE', 'ACK', 'NAK', 'RELEASE', 'INFORM'];
const typeName = (t: number): string => TYPE_NAMES[t] ?? `type ${t}`;
