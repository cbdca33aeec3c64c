// `xenpv trace FILE`: read a trace (the format is in lib/trace/trace.ts),
// merge every thread's records by their sequence number, and decode each:
// ring slots as the io/*.h structs their ring carries (netif tx/rx requests,
// responses and extra-info slots, blkif requests with their segments,
// discard and indirect requests, responses), xenstore messages with their
// type names and payload strings, grant and event-channel operations with
// their flag and status names. A trace is input from outside: every size is
// checked, and a file that is not a trace is an error with a code.

import { readFileSync } from 'node:fs';
import { constants } from '../abi/abi.js';
import {
  blkif_request,
  blkif_request_discard,
  blkif_request_discard_x86_32,
  blkif_request_indirect,
  blkif_request_indirect_x86_32,
  blkif_request_segment,
  blkif_request_x86_32,
  blkif_response,
  blkif_response_x86_32,
  BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
  BLKIF_MAX_SEGMENTS_PER_REQUEST,
  BLKIF_OP_DISCARD,
  BLKIF_OP_INDIRECT,
} from '../abi/blkif.js';
import type { Layout } from '../abi/layout.js';
import {
  netif_extra_info,
  netif_rx_request,
  netif_rx_response,
  netif_tx_request,
  netif_tx_response,
  xen_netif_ctrl_request,
  xen_netif_ctrl_response,
  NETRXF_extra_info,
  NETTXF_extra_info,
  XEN_NETIF_EXTRA_FLAG_MORE,
  XEN_NETIF_EXTRA_TYPE_GSO,
  XEN_NETIF_EXTRA_TYPE_HASH,
  XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
  XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
} from '../abi/netif.js';
import { XS_TYPE_COUNT, XS_WATCH_EVENT, XS_WRITE } from '../abi/xs_wire.js';
import { XenError } from '../errors.js';
import {
  BLOCK_HEADER_BYTES,
  BLOCK_MAGIC,
  DOMID_MACHINE,
  FILE_HEADER_BYTES,
  RECORD_HEADER_BYTES,
  RING_TYPES,
  TRACE_FLAG_VIRTUAL_TIME,
  TRACE_MAGIC,
  TRACE_VERSION,
  TraceKind,
  type RingType,
} from './trace.js';

export type TraceHeader = { version: number; epochMs: number; virtualTime: boolean };

/** One record as the file holds it. */
export type TraceRecord = {
  thread: number;
  seq: number;
  timeNs: number;
  kind: number;
  domid: number;
  dev: number;
  arg: number;
  arg2: number;
  payload: Uint8Array;
};

/** A slot's fields: numbers, and arrays of segments or grant refs. */
export type SlotFields = Record<string, number | string | number[] | Record<string, number>[]>;

type Common = {
  seq: number;
  timeNs: number;
  /** The domain that did it; null for the machine's own thread. */
  domid: number | null;
  /** The device (ring, handler, xenstore end) it happened on, if any. */
  device: string | null;
};

export type TraceEvent = Common & (
  | { type: 'ring-attach'; ring: RingType; side: 'front' | 'back'; entries: number; entryBytes: number; index: number }
  | { type: 'ring-slot'; op: 'put' | 'take'; half: 'request' | 'response'; index: number; ring: RingType; struct: string; fields: SlotFields }
  | { type: 'ring-push'; half: 'request' | 'response'; prod: number; notify: boolean }
  | { type: 'ring-broken'; message: string }
  | { type: 'evtchn-send'; port: number; state: string; remoteDomid: number; remotePort: number }
  | { type: 'evtchn-deliver'; port: number }
  | { type: 'evtchn-bind'; port: number }
  | { type: 'grant-enter'; ref: number; grantee: number; gfn: number; flags: number }
  | { type: 'grant-remove'; ref: number; revoked: boolean }
  | { type: 'grant-map'; ref: number; granter: number; flags: number; handle: number; status: string }
  | { type: 'grant-unmap'; handle: number; granter: number | null; ref: number | null; status: string }
  | { type: 'grant-copy'; len: number; flags: number; source: CopySide; dest: CopySide; status: string }
  | { type: 'xs'; dir: 'out' | 'in'; request: boolean; msg: string; msgType: number; reqId: number; txId: number; args: string[] }
  | { type: 'console'; dir: 'out' | 'in'; index: number; text: string }
  | { type: 'frame'; dir: 'from-guest' | 'to-guest'; length: number; bytes: Uint8Array }
  | { type: 'unknown'; kind: number; arg: number; arg2: number }
);

export type CopySide = { domid: number; ref: number | null; gmfn: number | null; offset: number };

export type Trace = { header: TraceHeader; events: TraceEvent[]; /** bytes at the end that were not a whole block */ truncatedBytes: number };

function bad(message: string): never {
  throw new XenError('EINVAL', `not a trace: ${message}`);
}

// --- the file ----------------------------------------------------------------

/** The header and every record, deduplicated and in sequence order. */
export function readRecords(bytes: Uint8Array): { header: TraceHeader; records: TraceRecord[]; truncatedBytes: number } {
  if (bytes.length < FILE_HEADER_BYTES) bad(`${bytes.length} bytes`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const magic = String.fromCharCode(...bytes.subarray(0, TRACE_MAGIC.length));
  if (magic !== TRACE_MAGIC) bad(`magic ${JSON.stringify(magic)}`);
  const version = v.getUint32(8, true);
  if (version !== TRACE_VERSION) throw new XenError('EOPNOTSUPP', `trace version ${version}; this xenpv reads ${TRACE_VERSION}`);
  const headerBytes = v.getUint32(12, true);
  if (headerBytes < FILE_HEADER_BYTES || headerBytes > bytes.length) bad(`header of ${headerBytes} bytes`);
  const header = { version, epochMs: v.getFloat64(16, true), virtualTime: (v.getUint32(24, true) & TRACE_FLAG_VIRTUAL_TIME) !== 0 };
  const records: TraceRecord[] = [];
  const blocks = new Set<string>();
  let at = headerBytes;
  while (at + BLOCK_HEADER_BYTES <= bytes.length) {
    if (v.getUint32(at, true) !== BLOCK_MAGIC) bad(`no block at byte ${at}`);
    const thread = v.getUint32(at + 4, true);
    const block = v.getUint32(at + 8, true);
    const size = v.getUint32(at + 12, true);
    const start = at + BLOCK_HEADER_BYTES;
    if (start + size > bytes.length) break;
    // A thread that died while writing a block leaves it again among its remains.
    const key = `${thread}:${block}`;
    if (!blocks.has(key)) {
      blocks.add(key);
      readBlock(v, bytes, thread, start, start + size, records);
    }
    at = start + size;
  }
  records.sort((a, b) => a.seq - b.seq);
  return { header, records, truncatedBytes: bytes.length - at };
}

function readBlock(v: DataView, bytes: Uint8Array, thread: number, start: number, end: number, out: TraceRecord[]): void {
  for (let at = start; at < end;) {
    if (at + RECORD_HEADER_BYTES > end) bad(`record at byte ${at} runs past its block`);
    const size = v.getUint32(at + 12, true);
    if (size < RECORD_HEADER_BYTES || at + size > end) bad(`record at byte ${at} of ${size} bytes`);
    out.push({
      thread,
      timeNs: v.getFloat64(at, true),
      seq: v.getUint32(at + 8, true),
      kind: v.getUint16(at + 16, true),
      domid: v.getUint16(at + 18, true),
      dev: v.getUint16(at + 20, true),
      arg: v.getUint32(at + 24, true),
      arg2: v.getUint32(at + 28, true),
      payload: bytes.subarray(at + RECORD_HEADER_BYTES, at + size),
    });
    at += (size + 7) & ~7;
  }
}

/** Read and decode a trace file. */
export function readTrace(path: string): Trace {
  let bytes: Uint8Array;
  try {
    bytes = readFileSync(path);
  } catch (err) {
    throw new XenError((err as { code?: string }).code ?? 'EIO', `trace ${path}: ${(err as Error).message}`);
  }
  return decodeTrace(bytes);
}

/** Decode a trace held in memory. */
export function decodeTrace(bytes: Uint8Array): Trace {
  const { header, records, truncatedBytes } = readRecords(bytes);
  const d = new Decoder();
  const events: TraceEvent[] = [];
  for (const r of records) {
    const e = d.decode(r);
    if (e !== null) events.push(e);
  }
  return { header, events, truncatedBytes };
}

// --- names ---------------------------------------------------------------------

const byPrefix = new Map<string, Map<number, string>>();

/** The first constant named `prefix...` with this value, as the headers list them. */
function nameOf(prefix: string, value: number, fallback = String(value)): string {
  let names = byPrefix.get(prefix);
  if (names === undefined) {
    byPrefix.set(prefix, (names = new Map()));
    for (const [name, v] of Object.entries(constants)) {
      if (typeof v === 'number' && name.startsWith(prefix) && !names.has(v)) names.set(v, name);
    }
  }
  return names.get(value) ?? fallback;
}

/** Bit flags as `A|B`, by the single-bit constants named `prefix...`. */
export function flagNames(prefix: string, value: number): string {
  const names: string[] = [];
  let rest = value;
  for (const [name, v] of Object.entries(constants)) {
    if (!name.startsWith(prefix) || typeof v !== 'number' || v === 0 || (v & (v - 1)) !== 0) continue;
    if ((rest & v) !== 0) {
      names.push(name);
      rest &= ~v;
    }
  }
  if (rest !== 0) names.push(`0x${rest.toString(16)}`);
  return names.length === 0 ? '0' : names.join('|');
}

function xsTypeName(type: number): string {
  return type < XS_TYPE_COUNT ? nameOf('XS_', type, `XS_${type}`) : `XS_${type}`;
}

// --- slots ---------------------------------------------------------------------

function readField(bytes: Uint8Array, offset: number, size: number, signed: boolean): number | string {
  if (offset + size > bytes.length) return 0;
  const v = new DataView(bytes.buffer, bytes.byteOffset + offset, size);
  switch (size) {
    case 1:
      return v.getUint8(0);
    case 2:
      return signed ? v.getInt16(0, true) : v.getUint16(0, true);
    case 4:
      return signed ? v.getInt32(0, true) : v.getUint32(0, true);
    default: {
      const n = v.getBigUint64(0, true);
      return n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n.toString();
    }
  }
}

/** Members of a struct that are int16_t/int32_t in C (lib/abi's layouts do not carry signedness). */
const SIGNED = new Set(['status']);

const leavesOf = new Map<Layout, { name: string; offset: number; size: number; signed: boolean }[]>();

/** A layout's scalar members in C order: not a struct or union that has members, not an array. */
function leaves(layout: Layout): { name: string; offset: number; size: number; signed: boolean }[] {
  let list = leavesOf.get(layout);
  if (list !== undefined) return list;
  const names = Object.keys(layout.fields);
  list = names
    .filter((name) => !names.some((n) => n.startsWith(`${name}.`)))
    .map((name) => ({ name, ...layout.fields[name]!, signed: SIGNED.has(name) }))
    .filter((f) => f.size <= 8 && (f.size & (f.size - 1)) === 0);
  leavesOf.set(layout, list);
  return list;
}

/** The scalar members of `layout` at `base`, in C order; nested members as `a.b`, arrays left to the caller. */
function scalars(layout: Layout, bytes: Uint8Array, base = 0, only?: string): SlotFields {
  const out: SlotFields = {};
  for (const f of leaves(layout)) {
    if (only !== undefined && !f.name.startsWith(`${only}.`)) continue;
    out[f.name] = readField(bytes, base + f.offset, f.size, f.signed);
  }
  return out;
}

function blkifSegments(bytes: Uint8Array, layout: Layout, nr: number): Record<string, number>[] {
  const base = layout.fields['seg']!.offset;
  const segs: Record<string, number>[] = [];
  for (let i = 0; i < Math.min(nr, BLKIF_MAX_SEGMENTS_PER_REQUEST); i++) {
    segs.push(scalars(blkif_request_segment, bytes, base + i * blkif_request_segment.size) as Record<string, number>);
  }
  return segs;
}

function blkifRequest(bytes: Uint8Array, x86_32: boolean): { struct: string; fields: SlotFields } {
  const op = bytes[0] ?? 0;
  if (op === BLKIF_OP_DISCARD) {
    return { struct: 'blkif_request_discard', fields: scalars(x86_32 ? blkif_request_discard_x86_32 : blkif_request_discard, bytes) };
  }
  if (op === BLKIF_OP_INDIRECT) {
    const layout = x86_32 ? blkif_request_indirect_x86_32 : blkif_request_indirect;
    const fields = scalars(layout, bytes);
    const pages = Math.min(Math.ceil(Number(fields['nr_segments']) / 512), BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    const refs: number[] = [];
    for (let i = 0; i < pages; i++) refs.push(Number(readField(bytes, layout.fields['indirect_grefs']!.offset + i * 4, 4, false)));
    fields['indirect_grefs'] = refs;
    return { struct: 'blkif_request_indirect', fields };
  }
  const layout = x86_32 ? blkif_request_x86_32 : blkif_request;
  const fields = scalars(layout, bytes);
  fields['seg'] = blkifSegments(bytes, layout, Number(fields['nr_segments']));
  return { struct: 'blkif_request', fields };
}

function extraInfo(bytes: Uint8Array): { struct: string; fields: SlotFields } {
  const fields = scalars(netif_extra_info, bytes);
  const type = Number(fields['type']);
  const u: Record<number, string> = {
    [XEN_NETIF_EXTRA_TYPE_GSO]: 'u.gso',
    [XEN_NETIF_EXTRA_TYPE_MCAST_ADD]: 'u.mcast',
    [XEN_NETIF_EXTRA_TYPE_MCAST_DEL]: 'u.mcast',
    [XEN_NETIF_EXTRA_TYPE_HASH]: 'u.hash',
  };
  const keep = u[type];
  const out: SlotFields = { type: fields['type']!, flags: fields['flags']! };
  if (keep !== undefined) Object.assign(out, scalars(netif_extra_info, bytes, 0, keep));
  const base = netif_extra_info.fields['u']!.offset;
  if (keep === 'u.mcast') out['u.mcast.addr'] = [...bytes.subarray(base, base + 6)];
  if (keep === 'u.hash') out['u.hash.value'] = [...bytes.subarray(base + 2, base + 6)];
  return { struct: 'netif_extra_info', fields: out };
}

function raw(bytes: Uint8Array): { struct: string; fields: SlotFields } {
  return { struct: 'raw', fields: { bytes: Buffer.from(bytes).toString('hex') } };
}

// --- the decoder -----------------------------------------------------------------

type RingState = { type: RingType; extraRequests: number; extraResponses: number };

class Decoder {
  private readonly names = new Map<string, string>();
  private readonly rings = new Map<string, RingState>();
  /** The device a domain's port was last bound for. */
  private readonly ports = new Map<string, string | null>();

  decode(r: TraceRecord): TraceEvent | null {
    if (r.kind === TraceKind.device) {
      this.names.set(`${r.thread}:${r.dev}`, Buffer.from(r.payload).toString('utf8'));
      return null;
    }
    const c: Common = {
      seq: r.seq,
      timeNs: r.timeNs,
      domid: r.domid === DOMID_MACHINE ? null : r.domid,
      device: r.dev === 0 ? null : this.names.get(`${r.thread}:${r.dev}`) ?? `dev${r.dev}`,
    };
    return this.ring(r, c) ?? this.other(r, c);
  }

  private ringState(r: TraceRecord): RingState {
    const key = `${r.thread}:${r.domid}:${r.dev}`;
    let s = this.rings.get(key);
    if (s === undefined) this.rings.set(key, (s = { type: 'raw', extraRequests: 0, extraResponses: 0 }));
    return s;
  }

  private ring(r: TraceRecord, c: Common): TraceEvent | null {
    const p = new DataView(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength);
    switch (r.kind) {
      case TraceKind.ringAttach: {
        const s = this.ringState(r);
        s.type = RING_TYPES[r.arg] ?? 'raw';
        s.extraRequests = s.extraResponses = 0;
        if (r.payload.length < 12) bad('short ring attach record');
        return { ...c, type: 'ring-attach', ring: s.type, entryBytes: r.arg2, entries: p.getUint32(0, true), side: p.getUint32(4, true) === 1 ? 'back' : 'front', index: p.getUint32(8, true) };
      }
      case TraceKind.ringRequestPut:
      case TraceKind.ringRequestTake:
      case TraceKind.ringResponsePut:
      case TraceKind.ringResponseTake:
        return this.slot(r, c);
      case TraceKind.ringRequestPush:
      case TraceKind.ringResponsePush:
        return { ...c, type: 'ring-push', half: r.kind === TraceKind.ringRequestPush ? 'request' : 'response', prod: r.arg, notify: r.arg2 === 1 };
      case TraceKind.ringBroken:
        return { ...c, type: 'ring-broken', message: Buffer.from(r.payload).toString('utf8') };
      default:
        return null;
    }
  }

  private slot(r: TraceRecord, c: Common): TraceEvent {
    const request = r.kind === TraceKind.ringRequestPut || r.kind === TraceKind.ringRequestTake;
    const put = r.kind === TraceKind.ringRequestPut || r.kind === TraceKind.ringResponsePut;
    const s = this.ringState(r);
    const decoded = request ? this.request(s, r.payload, put) : this.response(s, r.payload, put);
    return { ...c, type: 'ring-slot', op: put ? 'put' : 'take', half: request ? 'request' : 'response', index: r.arg, ring: s.type, ...decoded };
  }

  // Extra-info slots follow a netif slot that announced them; the producer's
  // and the consumer's records are each followed in their own order.
  private request(s: RingState, bytes: Uint8Array, put: boolean): { struct: string; fields: SlotFields } {
    switch (s.type) {
      case 'blkif':
      case 'blkif_x86_32':
        return blkifRequest(bytes, s.type === 'blkif_x86_32');
      case 'netif_tx': {
        const bit = put ? 1 : 2;
        if ((s.extraRequests & bit) !== 0) {
          const x = extraInfo(bytes);
          if ((Number(x.fields['flags']) & XEN_NETIF_EXTRA_FLAG_MORE) === 0) s.extraRequests &= ~bit;
          return x;
        }
        const fields = scalars(netif_tx_request, bytes);
        if ((Number(fields['flags']) & NETTXF_extra_info) !== 0) s.extraRequests |= bit;
        return { struct: 'netif_tx_request', fields };
      }
      case 'netif_rx':
        return { struct: 'netif_rx_request', fields: scalars(netif_rx_request, bytes) };
      case 'netif_ctrl':
        return { struct: 'xen_netif_ctrl_request', fields: scalars(xen_netif_ctrl_request, bytes) };
      default:
        return raw(bytes);
    }
  }

  private response(s: RingState, bytes: Uint8Array, put: boolean): { struct: string; fields: SlotFields } {
    switch (s.type) {
      case 'blkif':
        return { struct: 'blkif_response', fields: scalars(blkif_response, bytes) };
      case 'blkif_x86_32':
        return { struct: 'blkif_response', fields: scalars(blkif_response_x86_32, bytes) };
      case 'netif_tx':
        return { struct: 'netif_tx_response', fields: scalars(netif_tx_response, bytes) };
      case 'netif_rx': {
        const bit = put ? 1 : 2;
        if ((s.extraResponses & bit) !== 0) {
          const x = extraInfo(bytes);
          if ((Number(x.fields['flags']) & XEN_NETIF_EXTRA_FLAG_MORE) === 0) s.extraResponses &= ~bit;
          return x;
        }
        const fields = scalars(netif_rx_response, bytes);
        if ((Number(fields['flags']) & NETRXF_extra_info) !== 0) s.extraResponses |= bit;
        return { struct: 'netif_rx_response', fields };
      }
      case 'netif_ctrl':
        return { struct: 'xen_netif_ctrl_response', fields: scalars(xen_netif_ctrl_response, bytes) };
      default:
        return raw(bytes);
    }
  }

  private other(r: TraceRecord, c: Common): TraceEvent {
    const p = new DataView(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength);
    const u32 = (i: number): number => (i * 4 + 4 <= r.payload.length ? p.getUint32(i * 4, true) : 0);
    const i32 = (i: number): number => (i * 4 + 4 <= r.payload.length ? p.getInt32(i * 4, true) : 0);
    switch (r.kind) {
      case TraceKind.evtchnBind:
        this.ports.set(`${r.domid}:${r.arg}`, c.device);
        return { ...c, type: 'evtchn-bind', port: r.arg };
      case TraceKind.evtchnSend:
        // The port's handler names the device the event is sent for.
        c.device ??= this.ports.get(`${r.domid}:${r.arg}`) ?? null;
        return { ...c, type: 'evtchn-send', port: r.arg, state: nameOf('EVTCHNSTAT_', r.arg2), remoteDomid: u32(0), remotePort: u32(1) };
      case TraceKind.evtchnDeliver:
        return { ...c, type: 'evtchn-deliver', port: r.arg };
      case TraceKind.grantEnter:
        return { ...c, type: 'grant-enter', ref: r.arg, grantee: u32(0), gfn: u32(1), flags: u32(2) };
      case TraceKind.grantRemove:
        return { ...c, type: 'grant-remove', ref: r.arg, revoked: r.arg2 === 1 };
      case TraceKind.grantMap:
        return { ...c, type: 'grant-map', ref: r.arg, granter: u32(0), flags: u32(1), handle: i32(2), status: nameOf('GNTST_', i32(3)) };
      case TraceKind.grantUnmap: {
        const ok = u32(0) !== 0xffffffff;
        return { ...c, type: 'grant-unmap', handle: r.arg, granter: ok ? u32(0) : null, ref: ok ? u32(1) : null, status: nameOf('GNTST_', i32(2)) };
      }
      case TraceKind.grantCopy:
        return { ...c, type: 'grant-copy', len: r.arg, flags: r.arg2, source: copySide(u32(0), u32(1), u32(2), (r.arg2 & 1) !== 0), dest: copySide(u32(3), u32(4), u32(5), (r.arg2 & 2) !== 0), status: nameOf('GNTST_', i32(6)) };
      case TraceKind.xsOut:
      case TraceKind.xsIn:
      {
        const request = u32(1) === 1;
        const args = xsArgs(request && r.arg2 === XS_WRITE, r.payload.subarray(8));
        return { ...c, type: 'xs', dir: r.kind === TraceKind.xsOut ? 'out' : 'in', request, msg: xsTypeName(r.arg2), msgType: r.arg2, reqId: r.arg, txId: u32(0), args };
      }
      case TraceKind.consoleOut:
      case TraceKind.consoleIn:
        return { ...c, type: 'console', dir: r.kind === TraceKind.consoleOut ? 'out' : 'in', index: r.arg, text: Buffer.from(r.payload).toString('utf8') };
      case TraceKind.frame:
        return { ...c, type: 'frame', dir: r.arg === 1 ? 'to-guest' : 'from-guest', length: r.arg2, bytes: r.payload };
      default:
        return { ...c, type: 'unknown', kind: r.kind, arg: r.arg, arg2: r.arg2 };
    }
  }
}

function copySide(domid: number, refOrGmfn: number, offset: number, byRef: boolean): CopySide {
  return { domid, ref: byRef ? refOrGmfn : null, gmfn: byRef ? null : refOrGmfn, offset };
}

/** A payload as its NUL-terminated strings; XS_WRITE's value is all that follows the path's NUL. */
function xsArgs(write: boolean, payload: Uint8Array): string[] {
  const text = Buffer.from(payload).toString('utf8');
  if (write) {
    const nul = text.indexOf('\0');
    return nul < 0 ? [text] : [text.slice(0, nul), text.slice(nul + 1)];
  }
  const parts = text.split('\0');
  if (parts.length > 1 && parts[parts.length - 1] === '') parts.pop();
  return payload.length === 0 ? [] : parts;
}

// --- text ------------------------------------------------------------------------

/** The named value a field holds, where the headers name it. */
function fieldText(struct: string, name: string, value: unknown): string {
  if (typeof value !== 'number') return Array.isArray(value) ? `[${value.map((x) => (typeof x === 'object' ? `{${Object.entries(x).map(([k, v]) => `${k}=${v}`).join(' ')}}` : String(x))).join(', ')}]` : String(value);
  const named = (prefix: string): string => `${nameOf(prefix, value)}`;
  switch (`${struct}.${name}`) {
    case 'blkif_request.operation':
    case 'blkif_request_discard.operation':
    case 'blkif_request_indirect.operation':
    case 'blkif_request_indirect.indirect_op':
    case 'blkif_response.operation':
      return named('BLKIF_OP_');
    case 'blkif_response.status':
      return named('BLKIF_RSP_');
    case 'netif_tx_request.flags':
      return flagNames('NETTXF_', value);
    case 'netif_rx_response.flags':
      return flagNames('NETRXF_', value);
    case 'netif_tx_response.status':
      return named('NETIF_RSP_');
    case 'netif_rx_response.status':
      return value < 0 ? named('NETIF_RSP_') : String(value);
    case 'netif_extra_info.type':
      return named('XEN_NETIF_EXTRA_TYPE_');
    case 'xen_netif_ctrl_request.type':
    case 'xen_netif_ctrl_response.type':
      return named('XEN_NETIF_CTRL_TYPE_');
    default:
      return String(value);
  }
}

function slotText(struct: string, fields: SlotFields): string {
  return `${struct} { ${Object.entries(fields).map(([k, v]) => `${k}: ${fieldText(struct, k, v)}`).join(', ')} }`;
}

function copySideText(s: CopySide): string {
  return `dom${s.domid} ${s.ref !== null ? `ref ${s.ref}` : `gmfn ${s.gmfn}`}+${s.offset}`;
}

/** One line per event: time in seconds, domain, device, what happened. */
export function formatEvent(e: TraceEvent): string {
  const time = (e.timeNs / 1e9).toFixed(9);
  const dom = e.domid === null ? 'machine' : `dom${e.domid}`;
  return `${time} ${dom.padEnd(7)} ${(e.device ?? '-').padEnd(18)} ${describe(e)}`;
}

function describe(e: TraceEvent): string {
  switch (e.type) {
    case 'ring-attach':
      return `ring ${e.side} attach ${e.ring} (${e.entries} entries of ${e.entryBytes} bytes) at ${e.index}`;
    case 'ring-slot':
      return `${e.half} ${e.op} [${e.index}] ${slotText(e.struct, e.fields)}`;
    case 'ring-push':
      return `${e.half === 'request' ? 'req_prod' : 'rsp_prod'} = ${e.prod}${e.notify ? ', notify' : ''}`;
    case 'ring-broken':
      return `ring broken: ${e.message}`;
    case 'evtchn-send':
      return e.state === 'EVTCHNSTAT_interdomain' ? `evtchn send port ${e.port} -> dom${e.remoteDomid} port ${e.remotePort}` : `evtchn send port ${e.port} (${e.state})`;
    case 'evtchn-bind':
      return `evtchn bind port ${e.port}`;
    case 'evtchn-deliver':
      return `evtchn deliver port ${e.port}${e.device === null ? ' (no handler)' : ''}`;
    case 'grant-enter':
      return `grant enter ref ${e.ref} to dom${e.grantee} gfn ${e.gfn}${e.flags === 0 ? '' : ` ${flagNames('GTF_', e.flags)}`}`;
    case 'grant-remove':
      return `grant remove ref ${e.ref}${e.revoked ? '' : ' (still mapped: quarantined)'}`;
    case 'grant-map':
      return `grant map dom${e.granter} ref ${e.ref} ${flagNames('GNTMAP_', e.flags)} -> handle ${e.handle} ${e.status}`;
    case 'grant-unmap':
      return `grant unmap handle ${e.handle}${e.granter === null ? '' : ` (dom${e.granter} ref ${e.ref})`} ${e.status}`;
    case 'grant-copy':
      return `grant copy ${e.len} bytes ${copySideText(e.source)} -> ${copySideText(e.dest)} ${e.status}`;
    case 'xs':
      return `xs ${e.dir} ${e.msg}${e.request || e.msgType === XS_WATCH_EVENT ? '' : ' reply'} req_id ${e.reqId} tx_id ${e.txId}${e.args.map((a) => ` ${JSON.stringify(a)}`).join('')}`;
    case 'console':
      return `console ${e.dir} ${JSON.stringify(e.text)}`;
    case 'frame':
      return `frame ${e.dir} ${e.length} bytes${frameSummary(e.bytes)}`;
    case 'unknown':
      return `record kind ${e.kind} arg ${e.arg} arg2 ${e.arg2}`;
  }
}

function mac(b: Uint8Array, at: number): string {
  return [...b.subarray(at, at + 6)].map((x) => x.toString(16).padStart(2, '0')).join(':');
}

function frameSummary(b: Uint8Array): string {
  if (b.length < 14) return '';
  const type = ((b[12] ?? 0) << 8) | (b[13] ?? 0);
  return ` ${mac(b, 6)} > ${mac(b, 0)} ethertype 0x${type.toString(16).padStart(4, '0')}`;
}
