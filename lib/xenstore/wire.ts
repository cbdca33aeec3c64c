// The xsd_sockmsg stream: a 16-byte header {type, req_id, tx_id, len} and
// `len` payload bytes, back to back, the same on the shared ring and on the
// unix socket. The decoder is a pure state machine (bytes in, whole messages
// out); the transports plug it into their I/O.

import { offsetOf } from '../abi/layout.js';
import { XENSTORE_PAYLOAD_MAX, xsd_sockmsg } from '../abi/xs_wire.js';
import { XenError } from '../errors.js';

export type XsMessage = {
  type: number;
  req_id: number;
  tx_id: number;
  payload: Uint8Array;
};

export const XS_HDR_SIZE = xsd_sockmsg.size;
/** Copies up to this long go byte by byte (see takePayload). */
const SHORT_COPY_BYTES = 64;
const TYPE_OFF = offsetOf(xsd_sockmsg, 'type');
const REQ_ID_OFF = offsetOf(xsd_sockmsg, 'req_id');
const TX_ID_OFF = offsetOf(xsd_sockmsg, 'tx_id');
const LEN_OFF = offsetOf(xsd_sockmsg, 'len');

/**
 * Incremental decoder. Feed it any chunking of the byte stream; it returns the
 * messages the chunk completed. A header announcing more than
 * XENSTORE_PAYLOAD_MAX bytes is a protocol error: the decoder records it in
 * `error` (code E2BIG), and from then on ignores its input, because the
 * stream can no longer be framed.
 */
export class XsDecoder {
  error: XenError | undefined;
  private readonly hdr = new Uint8Array(XS_HDR_SIZE);
  private readonly hdrView = new DataView(this.hdr.buffer);
  private hdrUsed = 0;
  private payload: Uint8Array | undefined;
  private payloadUsed = 0;
  private used = 0;

  constructor(private readonly maxPayload: number = XENSTORE_PAYLOAD_MAX) {}

  /** Bytes held for a message not yet complete. */
  get buffered(): number {
    return this.hdrUsed + this.payloadUsed;
  }

  /**
   * Bytes that finish the header or payload in progress. A reader that takes
   * at most this many per feed completes at most one message per feed, which
   * lets it stop between messages for flow control.
   */
  wanted(): number {
    if (this.payload === undefined) return XS_HDR_SIZE - this.hdrUsed;
    return this.payload.length - this.payloadUsed;
  }

  /** Messages completed by `chunk` up to `end` (its length by default); EINVAL for an `end` past the chunk. */
  feed(chunk: Uint8Array, end = chunk.length): XsMessage[] {
    const out: XsMessage[] = [];
    for (let at = 0; at < end && this.error === undefined; at += this.used) {
      const msg = this.take(chunk, at, end);
      if (msg !== undefined) out.push(msg);
    }
    return out;
  }

  /**
   * The message that bytes [at, end) of `chunk` complete, if they complete
   * one; `took` says how many of them it used (all, or up to the end of that
   * message). A reader that feeds at most wanted() bytes at a time takes
   * every message this way with no array to hold them.
   */
  take(chunk: Uint8Array, at: number, end: number): XsMessage | undefined {
    if (!(at >= 0 && at <= end && end <= chunk.length)) throw new XenError('EINVAL', `bytes [${at}, ${end}) of a ${chunk.length}-byte chunk`);
    if (this.error !== undefined) {
      this.used = end - at;
      return undefined;
    }
    return this.payload === undefined ? this.takeHeader(chunk, at, end) : this.takePayload(chunk, at, end);
  }

  /** Bytes the last take() used. */
  get took(): number {
    return this.used;
  }

  reset(): void {
    this.error = undefined;
    this.hdrUsed = 0;
    this.payload = undefined;
    this.payloadUsed = 0;
  }

  private takeHeader(chunk: Uint8Array, at: number, end: number): XsMessage | undefined {
    const n = Math.min(XS_HDR_SIZE - this.hdrUsed, end - at);
    for (let i = 0; i < n; i++) this.hdr[this.hdrUsed + i] = chunk[at + i]!;
    this.hdrUsed += n;
    this.used = n;
    if (this.hdrUsed < XS_HDR_SIZE) return undefined;
    const len = this.hdrView.getUint32(LEN_OFF, true);
    if (len > this.maxPayload) {
      this.error = new XenError('E2BIG', `message announces ${len} payload bytes, at most ${this.maxPayload} allowed`);
      this.used = end - at;
      return undefined;
    }
    this.payload = new Uint8Array(len);
    this.payloadUsed = 0;
    return len === 0 ? this.finish() : undefined;
  }

  private takePayload(chunk: Uint8Array, at: number, end: number): XsMessage | undefined {
    const payload = this.payload!;
    const n = Math.min(payload.length - this.payloadUsed, end - at);
    // Most payloads are a path or a short value: a loop costs less than the view set() needs.
    if (n <= SHORT_COPY_BYTES) for (let i = 0; i < n; i++) payload[this.payloadUsed + i] = chunk[at + i]!;
    else payload.set(chunk.subarray(at, at + n), this.payloadUsed);
    this.payloadUsed += n;
    this.used = n;
    return this.payloadUsed === payload.length ? this.finish() : undefined;
  }

  private finish(): XsMessage {
    const v = this.hdrView;
    const msg = {
      type: v.getUint32(TYPE_OFF, true),
      req_id: v.getUint32(REQ_ID_OFF, true),
      tx_id: v.getUint32(TX_ID_OFF, true),
      payload: this.payload!,
    };
    this.hdrUsed = 0;
    this.payload = undefined;
    this.payloadUsed = 0;
    return msg;
  }
}

/** Header and payload as one byte string; the sender's own bug if the payload is too big. */
export function encodeMessage(msg: XsMessage): Uint8Array {
  const bytes = new Uint8Array(XS_HDR_SIZE + msg.payload.length);
  encodeInto(msg, bytes, new DataView(bytes.buffer));
  return bytes;
}

/**
 * Header and payload into `into` (at least XS_HDR_SIZE + XENSTORE_PAYLOAD_MAX
 * bytes, `view` over the same bytes); returns the length. For a sender that
 * reuses one buffer instead of allocating per message.
 */
export function encodeInto(msg: XsMessage, into: Uint8Array, view: DataView): number {
  if (msg.payload.length > XENSTORE_PAYLOAD_MAX) {
    throw new XenError('E2BIG', `payload of ${msg.payload.length} bytes exceeds ${XENSTORE_PAYLOAD_MAX}`);
  }
  view.setUint32(TYPE_OFF, msg.type, true);
  view.setUint32(REQ_ID_OFF, msg.req_id, true);
  view.setUint32(TX_ID_OFF, msg.tx_id, true);
  view.setUint32(LEN_OFF, msg.payload.length, true);
  into.set(msg.payload, XS_HDR_SIZE);
  return XS_HDR_SIZE + msg.payload.length;
}

// Payloads: NUL-separated strings. Paths and tokens are ASCII; values are
// bytes, usually text without a NUL.

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder();

/** Strings up to this long are encoded in JavaScript when they are ASCII: TextEncoder costs more for short ones. */
const ASCII_FAST_MAX = 256;

/** UTF-8 of `parts`, each followed by `sep` when given (a NUL), without building the joined string. */
function encodeParts(parts: readonly string[], sep: number | undefined): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length + (sep === undefined ? 0 : 1);
  if (n > ASCII_FAST_MAX) return slowEncode(parts, sep);
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    for (let i = 0; i < p.length; i++) {
      const c = p.charCodeAt(i);
      if (c >= 0x80) return slowEncode(parts, sep);
      out[at++] = c;
    }
    if (sep !== undefined) out[at++] = sep;
  }
  return out;
}

function slowEncode(parts: readonly string[], sep: number | undefined): Uint8Array {
  const s = sep === undefined ? '' : String.fromCharCode(sep);
  return utf8.encode(parts.map((p) => p + s).join(''));
}

export function toBytes(value: string | Uint8Array): Uint8Array {
  return typeof value === 'string' ? encodeParts([value], undefined) : value;
}

export function fromBytes(bytes: Uint8Array): string {
  return utf8Decoder.decode(bytes);
}

/** Character codes of the string decodeRange is making, reused: one string comes out, not one per character. */
const codes: number[] = [];

/** The text of bytes [start, end): short ASCII without a view or a call into TextDecoder. */
function decodeRange(bytes: Uint8Array, start: number, end: number): string {
  if (end - start > ASCII_FAST_MAX) return utf8Decoder.decode(bytes.subarray(start, end));
  codes.length = 0;
  for (let i = start; i < end; i++) {
    const c = bytes[i]!;
    if (c >= 0x80) return utf8Decoder.decode(bytes.subarray(start, end));
    codes.push(c);
  }
  return String.fromCharCode.apply(null, codes);
}

/**
 * The one string of a payload that is exactly one NUL-terminated string (C
 * xenstored's onearg), or undefined when it is anything else.
 */
export function oneString(payload: Uint8Array): string | undefined {
  const last = payload.length - 1;
  if (last < 0 || payload[last] !== 0 || payload.indexOf(0) !== last) return undefined;
  return decodeRange(payload, 0, last);
}

/** Each string followed by a NUL: "a\0b\0". */
export function joinStrings(parts: readonly string[]): Uint8Array {
  return encodeParts(parts, 0);
}

/**
 * Split at NULs. A final NUL terminates the last string rather than starting
 * an empty one, so "a\0b\0" and "a\0b" both give ["a", "b"], and "" gives [].
 */
export function splitStrings(payload: Uint8Array): string[] {
  if (payload.length === 0) return [];
  const end = payload[payload.length - 1] === 0 ? payload.length - 1 : payload.length;
  return fromBytes(payload.subarray(0, end)).split('\0');
}

/** Count of NUL-terminated strings, as C xenstored's xs_count_strings. */
export function countStrings(payload: Uint8Array): number {
  let n = 0;
  for (const b of payload) if (b === 0) n++;
  return n;
}

/**
 * A request payload whose first string is a path and the rest raw bytes
 * (XS_WRITE): undefined when there is no NUL at all.
 */
export function splitFirst(payload: Uint8Array): [string, Uint8Array] | undefined {
  const nul = payload.indexOf(0);
  if (nul < 0) return undefined;
  return [fromBytes(payload.subarray(0, nul)), payload.subarray(nul + 1)];
}

/** "path\0" + value bytes, no trailing NUL: the XS_WRITE payload. */
export function joinWrite(path: string, value: string | Uint8Array): Uint8Array {
  const head = encodeParts([path], 0);
  const body = toBytes(value);
  const out = new Uint8Array(head.length + body.length);
  out.set(head, 0);
  out.set(body, head.length);
  return out;
}

// Permissions: one string per entry, a letter and a domid ("b0", "r1"). The
// first entry names the owner and the access of everyone not listed.

export type XsPermLetter = 'n' | 'r' | 'w' | 'b';
export type XsPerm = { domid: number; perm: XsPermLetter };

const DOMID_MAX = 0xffff;

export function formatPerm(p: XsPerm): string {
  return `${p.perm}${p.domid}`;
}

/** Parse "r1"; EINVAL for anything else. */
export function parsePerm(s: string): XsPerm {
  const m = /^([nrwb])(\d{1,5})$/.exec(s);
  const domid = m === null ? NaN : Number(m[2]);
  if (m === null || !(domid <= DOMID_MAX)) throw new XenError('EINVAL', `bad permission ${JSON.stringify(s)}`);
  return { domid, perm: m[1] as XsPermLetter };
}

export function canRead(p: XsPermLetter): boolean {
  return p === 'r' || p === 'b';
}

export function canWrite(p: XsPermLetter): boolean {
  return p === 'w' || p === 'b';
}
