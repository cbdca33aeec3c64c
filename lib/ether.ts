// Ethernet facts both ends of a vif need: MAC addresses as text and as
// 48-bit numbers, the flow hash that picks a queue, and the Internet
// checksum (RFC 1071) with which a backend completes a frame whose sender
// left it blank (NETTXF_csum_blank) before it leaves for a peer that cannot
// take a blank one.

import { XenError } from './errors.js';

export const ETHER_ADDR_LEN = 6;
export const ETHER_HDR_LEN = 14;
export const ETHERTYPE_IP = 0x0800;
export const ETHERTYPE_IPV6 = 0x86dd;
export const ETHERTYPE_VLAN = 0x8100;
const IPPROTO_TCP = 6;
const IPPROTO_UDP = 17;
const TCP_CSUM_OFFSET = 16;
const UDP_CSUM_OFFSET = 6;
const IPV6_HDR_LEN = 40;

/** "00:16:3e:01:02:03" -> 6 bytes; EINVAL for anything else. */
export function parseMac(text: string): Uint8Array {
  const m = /^([0-9a-fA-F]{2}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})$/.exec(text);
  if (m === null) throw new XenError('EINVAL', `MAC address ${JSON.stringify(text)}: want six hex pairs separated by ":"`);
  return Uint8Array.from(m.slice(1, 7), (h) => parseInt(h, 16));
}

export function formatMac(mac: Uint8Array, at = 0): string {
  let s = '';
  for (let i = 0; i < ETHER_ADDR_LEN; i++) s += (i === 0 ? '' : ':') + (mac[at + i] ?? 0).toString(16).padStart(2, '0');
  return s;
}

/** The 6 bytes at `at` as one number (48 bits fit a double exactly): a Map key that costs no allocation. */
export function macKey(bytes: Uint8Array, at = 0): number {
  return (
    (bytes[at]! * 0x10000 + bytes[at + 1]! * 0x100 + bytes[at + 2]!) * 0x1000000 +
    (bytes[at + 3]! * 0x10000 + bytes[at + 4]! * 0x100 + bytes[at + 5]!)
  );
}

/**
 * The first and the last three of the 6 bytes at `at`, each as a 24-bit
 * number: a pair of small-integer keys, where macKey's 48-bit number is a
 * heap number, made anew for each lookup on a hot path.
 */
export function macHigh(bytes: Uint8Array, at = 0): number {
  return (bytes[at]! << 16) | (bytes[at + 1]! << 8) | bytes[at + 2]!;
}
export function macLow(bytes: Uint8Array, at = 0): number {
  return (bytes[at + 3]! << 16) | (bytes[at + 4]! << 8) | bytes[at + 5]!;
}

/** Group bit of the first octet: multicast, broadcast included. */
export function isMulticast(bytes: Uint8Array, at = 0): boolean {
  return (bytes[at]! & 1) !== 0;
}

export function isBroadcast(bytes: Uint8Array, at = 0): boolean {
  for (let i = 0; i < ETHER_ADDR_LEN; i++) if (bytes[at + i] !== 0xff) return false;
  return true;
}

/**
 * A hash of the IPv4/IPv6 addresses and TCP/UDP ports in the first `len`
 * bytes of `frame` (0 when it is neither): frames of one flow always pick the
 * same queue, so a flow is never reordered across queues.
 */
export function flowHash(frame: Uint8Array, len: number = frame.length): number {
  if (len < ETHER_HDR_LEN + 20) return 0;
  const type = (frame[12]! << 8) | frame[13]!;
  let h = 0x811c9dc5;
  let l4 = -1;
  let proto = 0;
  if (type === ETHERTYPE_IP) {
    for (let i = ETHER_HDR_LEN + 12; i < ETHER_HDR_LEN + 20; i++) h = Math.imul(h ^ frame[i]!, 0x01000193);
    proto = frame[ETHER_HDR_LEN + 9]!;
    l4 = ETHER_HDR_LEN + (frame[ETHER_HDR_LEN]! & 0xf) * 4;
  } else if (type === ETHERTYPE_IPV6 && len >= ETHER_HDR_LEN + IPV6_HDR_LEN) {
    for (let i = ETHER_HDR_LEN + 8; i < ETHER_HDR_LEN + IPV6_HDR_LEN; i++) h = Math.imul(h ^ frame[i]!, 0x01000193);
    proto = frame[ETHER_HDR_LEN + 6]!;
    l4 = ETHER_HDR_LEN + IPV6_HDR_LEN;
  } else {
    return 0;
  }
  if ((proto === IPPROTO_TCP || proto === IPPROTO_UDP) && l4 + 4 <= len) {
    for (let i = l4; i < l4 + 4; i++) h = Math.imul(h ^ frame[i]!, 0x01000193);
  }
  return h >>> 0;
}

/** One's-complement sum of `len` bytes from `at`, added to `sum` (not folded). */
export function csumAdd(bytes: Uint8Array, at: number, len: number, sum = 0): number {
  let i = at;
  const end = at + len;
  for (; i + 1 < end; i += 2) sum += (bytes[i]! << 8) | bytes[i + 1]!;
  if (i < end) sum += bytes[i]! << 8;
  return sum;
}

export function csumFold(sum: number): number {
  while (sum > 0xffff) sum = (sum & 0xffff) + Math.floor(sum / 0x10000);
  return ~sum & 0xffff;
}

/**
 * Fill in the TCP or UDP checksum of an IPv4 or IPv6 frame whose sender left
 * it blank (a frontend's NETTXF_csum_blank, Linux's CHECKSUM_PARTIAL).
 * Returns false, changing nothing, when the frame is not TCP/UDP over IP or
 * its headers do not fit.
 */
export function fillChecksum(frame: Uint8Array, len: number = frame.length): boolean {
  if (len < ETHER_HDR_LEN) return false;
  const type = (frame[12]! << 8) | frame[13]!;
  let l4: number;
  let proto: number;
  let pseudo: number;
  let l4len: number;
  if (type === ETHERTYPE_IP) {
    const ihl = (frame[ETHER_HDR_LEN]! & 0xf) * 4;
    if (ihl < 20 || len < ETHER_HDR_LEN + ihl) return false;
    const total = (frame[ETHER_HDR_LEN + 2]! << 8) | frame[ETHER_HDR_LEN + 3]!;
    proto = frame[ETHER_HDR_LEN + 9]!;
    l4 = ETHER_HDR_LEN + ihl;
    l4len = Math.min(total, len - ETHER_HDR_LEN) - ihl;
    pseudo = csumAdd(frame, ETHER_HDR_LEN + 12, 8) + proto + l4len;
  } else if (type === ETHERTYPE_IPV6) {
    if (len < ETHER_HDR_LEN + IPV6_HDR_LEN) return false;
    const payload = (frame[ETHER_HDR_LEN + 4]! << 8) | frame[ETHER_HDR_LEN + 5]!;
    proto = frame[ETHER_HDR_LEN + 6]!;
    l4 = ETHER_HDR_LEN + IPV6_HDR_LEN;
    l4len = Math.min(payload, len - l4);
    pseudo = csumAdd(frame, ETHER_HDR_LEN + 8, 32) + proto + l4len;
  } else {
    return false;
  }
  const at = proto === IPPROTO_TCP ? TCP_CSUM_OFFSET : proto === IPPROTO_UDP ? UDP_CSUM_OFFSET : -1;
  if (at < 0 || l4len < at + 2) return false;
  frame[l4 + at] = 0;
  frame[l4 + at + 1] = 0;
  let c = csumFold(csumAdd(frame, l4, l4len, pseudo));
  if (c === 0 && proto === IPPROTO_UDP) c = 0xffff; // RFC 768: 0 means "no checksum"
  frame[l4 + at] = c >> 8;
  frame[l4 + at + 1] = c & 0xff;
  return true;
}

const TH_FIN = 0x01;
const TH_PSH = 0x08;
const TH_CWR = 0x80;

/**
 * Software GSO (Linux's tcp_gso_segment): cut a TCP frame over IPv4 or IPv6
 * whose payload exceeds `mss` into frames of at most `mss` payload bytes,
 * each with its own IP length (and IPv4 id and header checksum), TCP
 * sequence number and checksum; FIN and PSH stay on the last, CWR on the
 * first. Each frame is built in `scratch` and handed to `emit`, valid only
 * during the call. Returns the number of frames, or 0 (nothing emitted) when
 * the frame is not TCP or its headers do not fit.
 */
export function segmentTcp(frame: Uint8Array, len: number, mss: number, scratch: Uint8Array, emit: (segment: Uint8Array) => void): number {
  if (len < ETHER_HDR_LEN || !(mss >= 1)) return 0;
  const type = (frame[12]! << 8) | frame[13]!;
  const v6 = type === ETHERTYPE_IPV6;
  if (!v6 && type !== ETHERTYPE_IP) return 0;
  const l4 = v6 ? ETHER_HDR_LEN + IPV6_HDR_LEN : ETHER_HDR_LEN + (frame[ETHER_HDR_LEN]! & 0xf) * 4;
  const proto = v6 ? frame[ETHER_HDR_LEN + 6] : frame[ETHER_HDR_LEN + 9];
  if (proto !== IPPROTO_TCP || l4 + 20 > len) return 0;
  const hdr = l4 + (frame[l4 + 12]! >> 4) * 4;
  if (hdr < l4 + 20 || hdr > len || hdr + mss > scratch.length) return 0;
  const payload = len - hdr;
  const seq0 = ((frame[l4 + 4]! << 24) | (frame[l4 + 5]! << 16) | (frame[l4 + 6]! << 8) | frame[l4 + 7]!) >>> 0;
  const id0 = (frame[ETHER_HDR_LEN + 4]! << 8) | frame[ETHER_HDR_LEN + 5]!;
  const flags0 = frame[l4 + 13]!;
  let n = 0;
  let off = 0;
  do {
    const chunk = Math.min(mss, payload - off);
    const segLen = hdr + chunk;
    scratch.set(frame.subarray(0, hdr), 0);
    scratch.set(frame.subarray(hdr + off, hdr + off + chunk), hdr);
    if (v6) {
      put16(scratch, ETHER_HDR_LEN + 4, segLen - l4);
    } else {
      put16(scratch, ETHER_HDR_LEN + 2, segLen - ETHER_HDR_LEN);
      put16(scratch, ETHER_HDR_LEN + 4, (id0 + n) & 0xffff);
      put16(scratch, ETHER_HDR_LEN + 10, 0);
      put16(scratch, ETHER_HDR_LEN + 10, csumFold(csumAdd(scratch, ETHER_HDR_LEN, l4 - ETHER_HDR_LEN)));
    }
    const seq = (seq0 + off) >>> 0;
    put16(scratch, l4 + 4, seq >>> 16);
    put16(scratch, l4 + 6, seq & 0xffff);
    let flags = flags0;
    if (off + chunk < payload) flags &= ~(TH_FIN | TH_PSH);
    if (n > 0) flags &= ~TH_CWR;
    scratch[l4 + 13] = flags;
    fillChecksum(scratch, segLen);
    emit(scratch.subarray(0, segLen));
    n++;
    off += mss;
  } while (off < payload);
  return n;
}

function put16(b: Uint8Array, at: number, v: number): void {
  b[at] = (v >> 8) & 0xff;
  b[at + 1] = v & 0xff;
}
