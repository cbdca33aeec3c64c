// Traces: `xenpv run --trace FILE` records every ring slot written and read,
// every producer push, every event sent and delivered, every grant entered,
// removed, mapped, unmapped and copied, every xenstore message, every console
// chunk and every frame a guest's network interface sent or received, with
// domain, device and time;
// `xenpv trace FILE` decodes it (lib/trace/decode.ts).
//
// Recording. Each thread appends fixed-layout binary records to its own
// buffer, a SharedArrayBuffer the machine allocated, and writes the buffer
// to the file as one block when it is full; the machine writes what is left
// of a thread's buffer when the thread has ended (a destroyed domain's worker
// is terminated, not asked). A record takes its place in a counter shared by
// every thread as it is made, so the decoder merges the threads' blocks into
// one order that agrees with everything the threads saw of each other. The
// hot paths test one module-level flag (`tracing`) and call out of line only
// when it is set: off, a trace costs a load and a branch; on, no record
// allocates (the slot or message is copied into the buffer).
//
// File format, little-endian:
//   file header, 64 bytes:
//      0 char[8] "XPVTRACE"
//      8 u32     version (1)
//     12 u32     header bytes (64)
//     16 f64     Unix time in ms at trace time 0
//     24 u32     flags: bit 0, times are virtual (a deterministic run, --seed)
//     28 ...     zero up to 64
//   blocks, each written whole by one thread, in any order between threads:
//      0 u32     magic "XTBK"
//      4 u32     thread (0 the machine's thread, then one per vCPU thread)
//      8 u32     block number in the thread (a thread that died while writing
//                its block may leave it twice; the decoder keeps one)
//     12 u32     bytes of records that follow
//   records, each starting 8-byte aligned:
//      0 f64     time, ns since trace time 0
//      8 u32     sequence number across all threads: the merge order
//     12 u32     record bytes, header and payload (the next record starts at
//                this rounded up to 8)
//     16 u16     kind (TraceKind below)
//     18 u16     domain doing it (0xffff: the machine itself)
//     20 u16     device: 0 none, else an id a device record of the same
//                thread named earlier
//     22 u16     zero
//     24 u32     arg, 28 u32 arg2, then the payload: per kind, see TraceKind.

import { closeSync, constants, openSync, writeSync } from 'node:fs';
import { XenError } from '../errors.js';

export const TRACE_MAGIC = 'XPVTRACE';
export const TRACE_VERSION = 1;
export const FILE_HEADER_BYTES = 64;
export const TRACE_FLAG_VIRTUAL_TIME = 1;
export const BLOCK_MAGIC = 0x4b425458; // "XTBK"
export const BLOCK_HEADER_BYTES = 16;
export const RECORD_HEADER_BYTES = 32;
/** The domain field of what the machine's own thread does. */
export const DOMID_MACHINE = 0xffff;
/** Frames are cut to this many bytes (a record's payload stays well inside a buffer). */
export const FRAME_SNAP_BYTES = 65535;

/**
 * What a record says; arg, arg2 and payload per kind. Slot payloads are the
 * slot's bytes as on the ring; the ring type of the device's last ringAttach
 * says which io/*.h struct they are.
 */
export const TraceKind = {
  /** payload: the UTF-8 name of device id `dev`. */
  device: 1,
  /** arg: RingType, arg2: entry bytes; payload: u32 entries, u32 side (0 front, 1 back), u32 index attached at. */
  ringAttach: 2,
  /** arg: free-running slot index; payload: the slot. */
  ringRequestPut: 3,
  ringRequestTake: 4,
  ringResponsePut: 5,
  ringResponseTake: 6,
  /** arg: the producer index published; arg2: 1 when the push says to notify the peer. */
  ringRequestPush: 7,
  ringResponsePush: 8,
  /** payload: why the ring stopped (UTF-8). */
  ringBroken: 9,
  /** EVTCHNOP_send. arg: local port, arg2: its EVTCHNSTAT_*; payload: u32 remote domid, u32 remote port. */
  evtchnSend: 16,
  /** The upcall hands a pending port to its handler. arg: port (device 0: no handler, a spurious event). */
  evtchnDeliver: 17,
  /** A handler is established on a port (xen_intr_establish): the port's device from now on. arg: port. */
  evtchnBind: 18,
  /** The guest's grant table. arg: ref; payload: u32 domid, u32 gfn, u32 GTF_* flags. */
  grantEnter: 32,
  /** arg: ref; arg2: 1 revoked, 0 the peer still maps it (quarantined). */
  grantRemove: 33,
  /** GNTTABOP_map_grant_ref. arg: ref; payload: u32 granting domid, u32 GNTMAP_* flags, i32 handle, i32 GNTST_* status. */
  grantMap: 34,
  /** GNTTABOP_unmap_grant_ref. arg: handle; payload: u32 granting domid, u32 ref, i32 status (domid and ref 0xffffffff when the handle was bad). */
  grantUnmap: 35,
  /** GNTTABOP_copy. arg: len, arg2: GNTCOPY_* flags; payload: u32 source domid, u32 source ref or gmfn, u32 source offset, then the same of dest, i32 status. */
  grantCopy: 36,
  /**
   * A xenstore message sent (Out) or received (In) on a ring or socket.
   * arg: req_id, arg2: type; payload: u32 tx_id, u32 1 for a request (0 a
   * reply or watch event), then the message payload.
   */
  xsOut: 48,
  xsIn: 49,
  /** Console bytes a ring end wrote (Out) or read (In). arg: the producer or consumer index before; payload: the bytes. */
  consoleOut: 56,
  consoleIn: 57,
  /** An Ethernet frame a guest's netfront sent (arg 0) or received (arg 1). arg2: its length; payload: the frame, cut to FRAME_SNAP_BYTES. */
  frame: 64,
} as const;

/** What a ring's slots hold: DEFINE_RING_TYPES names (io/blkif.h, io/netif.h; blkif_x86_32 as Linux's blkif_common.h). */
export const RING_TYPES = ['raw', 'blkif', 'blkif_x86_32', 'netif_tx', 'netif_rx', 'netif_ctrl'] as const;
export type RingType = (typeof RING_TYPES)[number];

/** What a thread needs to record into a trace; structured-cloneable, made by TraceFile.thread(). */
export type TraceThread = {
  path: string;
  thread: number;
  domid: number;
  /** performance.timeOrigin + performance.now() of the machine's thread at trace time 0. */
  originMs: number;
  /** Int32Array word 0: the sequence counter every thread shares. */
  counter: SharedArrayBuffer;
  buffer: SharedArrayBuffer;
};

// The thread's buffer: two control words, then a block header and the records after it.
const CTL_USED = 0;
const CTL_BLOCK = 1;
const BLOCK_AT = 16;
const DATA_AT = BLOCK_AT + BLOCK_HEADER_BYTES;
const DEFAULT_BUFFER_BYTES = 1 << 20;
const MIN_BUFFER_BYTES = 1 << 17;

/** Set while this thread records; every call site tests it before calling in. */
export let tracing = false;

let thread = 0;
// Always views of SharedArrayBuffers, so the record path sees one kind of array.
let buf = new Uint8Array(new SharedArrayBuffer(DATA_AT));
let view = new DataView(buf.buffer);
let ctl = new Int32Array(buf.buffer, 0, 2);
let counter = new Int32Array(new SharedArrayBuffer(4));
let pos = DATA_AT;
/** performance.now() at trace time 0 in this thread's clock. */
let baseMs = 0;
let domid = DOMID_MACHINE;
let write: (bytes: Uint8Array, length: number) => void = () => undefined;
const devices = new Map<string, number>();
const encoder = new TextEncoder();

/** Start recording in this thread (a vCPU thread at start, or the machine's via TraceFile.start). */
export function traceBegin(t: TraceThread, writeBlock?: (bytes: Uint8Array, length: number) => void): void {
  if (tracing) throw new XenError('EBUSY', 'this thread is already tracing');
  thread = t.thread;
  buf = new Uint8Array(t.buffer);
  view = new DataView(t.buffer);
  ctl = new Int32Array(t.buffer, 0, 2);
  counter = new Int32Array(t.counter);
  pos = DATA_AT + (ctl[CTL_USED] ?? 0);
  baseMs = t.originMs - performance.timeOrigin;
  domid = t.domid;
  devices.clear();
  write = writeBlock ?? ((bytes, length) => {
    // A vCPU thread may be terminated at any moment: hold no descriptor between blocks.
    const fd = openSync(t.path, 'a');
    try {
      writeSync(fd, bytes, BLOCK_AT, length);
    } finally {
      closeSync(fd);
    }
  });
  tracing = true;
}

/** Stop recording in this thread and write what is buffered. */
export function traceEnd(): void {
  if (!tracing) return;
  traceFlush();
  tracing = false;
  devices.clear();
}

/** The domain whose code runs now (the deterministic runner switches domains in one thread). */
export function traceDomain(id: number): void {
  domid = machineDomid(id);
}

function machineDomid(id: number): number {
  return id >= 0 && id < DOMID_MACHINE ? id : DOMID_MACHINE;
}

/** Write the buffered records as one block. */
export function traceFlush(): void {
  const used = pos - DATA_AT;
  if (used === 0) return;
  const block = ctl[CTL_BLOCK] ?? 0;
  view.setUint32(BLOCK_AT, BLOCK_MAGIC, true);
  view.setUint32(BLOCK_AT + 4, thread, true);
  view.setUint32(BLOCK_AT + 8, block, true);
  view.setUint32(BLOCK_AT + 12, used, true);
  write(buf, BLOCK_HEADER_BYTES + used);
  ctl[CTL_BLOCK] = block + 1;
  ctl[CTL_USED] = 0;
  pos = DATA_AT;
}

/** Room for one record with `payload` bytes; the header filled in; returns where the payload goes. */
function record(kind: number, by: number, dev: number, arg: number, arg2: number, payload: number): number {
  const size = RECORD_HEADER_BYTES + payload;
  const next = (size + 7) & ~7;
  if (pos + next > buf.length) traceFlush();
  const at = pos;
  view.setFloat64(at, (performance.now() - baseMs) * 1e6, true);
  view.setUint32(at + 8, Atomics.add(counter, 0, 1), true);
  view.setUint32(at + 12, size, true);
  view.setUint16(at + 16, kind, true);
  view.setUint16(at + 18, by, true);
  view.setUint16(at + 20, dev, true);
  view.setUint16(at + 22, 0, true);
  view.setUint32(at + 24, arg, true);
  view.setUint32(at + 28, arg2, true);
  if (next > size) buf.fill(0, at + size, at + next);
  pos = at + next;
  ctl[CTL_USED] = pos - DATA_AT;
  return at + RECORD_HEADER_BYTES;
}

/** The id of device `name` in this thread's trace, naming it in the trace the first time; 0 when not tracing. */
export function traceDevice(name: string): number {
  if (!tracing) return 0;
  let id = devices.get(name);
  if (id !== undefined) return id;
  id = devices.size + 1;
  if (id >= 0xffff) return 0;
  devices.set(name, id);
  const bytes = encoder.encode(name);
  buf.set(bytes, record(TraceKind.device, domid, id, 0, 0, bytes.length));
  return id;
}

/** A ring starts being used at `index` by its front or back. */
export function traceRingAttach(dev: number, type: RingType, entryBytes: number, nrEnts: number, back: boolean, index: number): void {
  const at = record(TraceKind.ringAttach, domid, dev, RING_TYPES.indexOf(type), entryBytes, 12);
  view.setUint32(at, nrEnts, true);
  view.setUint32(at + 4, back ? 1 : 0, true);
  view.setUint32(at + 8, index, true);
}

/** A slot written or read: its index and bytes. */
export function traceSlot(kind: number, dev: number, index: number, slot: Uint8Array): void {
  buf.set(slot, record(kind, domid, dev, index, 0, slot.length));
}

/**
 * A producer index about to be published: recorded before the peer can see
 * it, so no record of the peer's can come first; returns the record for
 * tracePushed, which adds whether the push asked for a notify.
 */
export function tracePush(kind: number, dev: number, prod: number): number {
  return record(kind, domid, dev, prod, 0, 0);
}

/** The push recorded at `at` (tracePush, with no record made since) asked to notify the peer. */
export function tracePushed(at: number, notify: boolean): void {
  view.setUint32(at - RECORD_HEADER_BYTES + 28, notify ? 1 : 0, true);
}

/** A record whose payload is text (a ring that broke, and why). */
export function traceText(kind: number, dev: number, text: string): void {
  const bytes = encoder.encode(text);
  buf.set(bytes, record(kind, domid, dev, 0, 0, bytes.length));
}

/** Bytes of a console ring or a frame: `length` bytes of `bytes` from `offset`. */
export function traceBytes(kind: number, dev: number, arg: number, arg2: number, bytes: Uint8Array, offset: number, length: number): void {
  buf.set(bytes.subarray(offset, offset + length), record(kind, domid, dev, arg, arg2, length));
}

/** EVTCHNOP_send from domain `from`. */
export function traceEvtchnSend(from: number, port: number, state: number, remoteDomid: number, remotePort: number): void {
  const at = record(TraceKind.evtchnSend, machineDomid(from), 0, port, state, 8);
  view.setUint32(at, remoteDomid, true);
  view.setUint32(at + 4, remotePort, true);
}

/** The upcall hands `port` to the handler named by `dev`. */
export function traceEvtchnDeliver(dev: number, port: number): void {
  record(TraceKind.evtchnDeliver, domid, dev, port, 0, 0);
}

/** A handler named by `dev` now owns `port`. */
export function traceEvtchnBind(dev: number, port: number): void {
  record(TraceKind.evtchnBind, domid, dev, port, 0, 0);
}

/** A hypervisor grant-table record (grantMap, grantUnmap) of domain `by`; -1 in a word is 0xffffffff. */
export function traceGrant(kind: number, by: number, arg: number, arg2: number, w0: number, w1: number, w2: number, w3: number): void {
  const words = kind === TraceKind.grantMap ? 4 : 3;
  const at = record(kind, machineDomid(by), 0, arg, arg2, words * 4);
  if (words > 0) view.setUint32(at, w0 >>> 0, true);
  if (words > 1) view.setUint32(at + 4, w1 >>> 0, true);
  if (words > 2) view.setUint32(at + 8, w2 >>> 0, true);
  if (words > 3) view.setUint32(at + 12, w3 >>> 0, true);
}

/** The guest's own grant table: an entry made (grantEnter: domid, gfn, flags) or taken back (grantRemove: revoked 1 or 0). */
export function traceGrantEntry(kind: number, ref: number, revoked: number, grantee: number, gfn: number, flags: number): void {
  const words = kind === TraceKind.grantEnter ? 3 : 0;
  const at = record(kind, domid, 0, ref, revoked, words * 4);
  if (words === 0) return;
  view.setUint32(at, grantee >>> 0, true);
  view.setUint32(at + 4, gfn >>> 0, true);
  view.setUint32(at + 8, flags >>> 0, true);
}

/** GNTTABOP_copy by domain `by`: both sides and the status. */
export function traceGrantCopy(
  by: number, len: number, flags: number,
  srcDomid: number, srcRef: number, srcOffset: number, dstDomid: number, dstRef: number, dstOffset: number, status: number,
): void {
  const at = record(TraceKind.grantCopy, machineDomid(by), 0, len, flags, 28);
  view.setUint32(at, srcDomid >>> 0, true);
  view.setUint32(at + 4, srcRef >>> 0, true);
  view.setUint32(at + 8, srcOffset >>> 0, true);
  view.setUint32(at + 12, dstDomid >>> 0, true);
  view.setUint32(at + 16, dstRef >>> 0, true);
  view.setUint32(at + 20, dstOffset >>> 0, true);
  view.setInt32(at + 24, status, true);
}

/** A whole xenstore message sent or received. */
export function traceXs(kind: number, dev: number, request: boolean, type: number, reqId: number, txId: number, payload: Uint8Array): void {
  const at = record(kind, domid, dev, reqId, type, 8 + payload.length);
  view.setUint32(at, txId, true);
  view.setUint32(at + 4, request ? 1 : 0, true);
  buf.set(payload, at + 8);
}

/** The bytes of a thread's buffer left when the thread has ended, as one block (the machine calls this). */
function remains(t: TraceThread): Uint8Array | null {
  const c = new Int32Array(t.buffer, 0, 2);
  const used = c[CTL_USED] ?? 0;
  if (used <= 0) return null;
  const b = new Uint8Array(t.buffer);
  const v = new DataView(t.buffer);
  v.setUint32(BLOCK_AT, BLOCK_MAGIC, true);
  v.setUint32(BLOCK_AT + 4, t.thread, true);
  v.setUint32(BLOCK_AT + 8, c[CTL_BLOCK] ?? 0, true);
  v.setUint32(BLOCK_AT + 12, used, true);
  c[CTL_USED] = 0;
  c[CTL_BLOCK] = (c[CTL_BLOCK] ?? 0) + 1;
  return b.subarray(BLOCK_AT, DATA_AT + used);
}

export type TraceFileOptions = {
  /** Each thread's buffer, written out as a block whenever it fills. */
  bufferBytes?: number | undefined;
};

/**
 * A trace file as the machine's thread owns it: the header, the shared
 * counter, a buffer per thread, and the writing out of what threads leave.
 */
export class TraceFile {
  private fd = -1;
  private readonly counter = new SharedArrayBuffer(4);
  private readonly bufferBytes: number;
  private readonly live = new Set<TraceThread>();
  private nextThread = 1;
  private originMs = 0;
  private started = false;

  /** Create (or truncate) the file; one trace at a time per process. */
  constructor(readonly path: string, opts: TraceFileOptions = {}) {
    this.bufferBytes = opts.bufferBytes ?? DEFAULT_BUFFER_BYTES;
    if (!Number.isInteger(this.bufferBytes) || this.bufferBytes < MIN_BUFFER_BYTES || this.bufferBytes > 1 << 30) {
      throw new XenError('EINVAL', `trace buffer of ${this.bufferBytes} bytes; ${MIN_BUFFER_BYTES} to ${1 << 30}`);
    }
    if (tracing) throw new XenError('EBUSY', 'a trace is already being recorded in this process');
    try {
      // Appending, as every thread does: each block lands whole after the others.
      this.fd = openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_APPEND, 0o644);
    } catch (err) {
      throw new XenError((err as { code?: string }).code ?? 'EIO', `trace ${path}: ${(err as Error).message}`);
    }
  }

  /**
   * Write the header and start recording in this thread as the machine.
   * Time 0 is now; `virtualTime` when the clock is a deterministic run's.
   */
  start(virtualTime: boolean): void {
    if (this.fd < 0) throw new XenError('EBADF', `trace ${this.path} is closed`);
    if (tracing) throw new XenError('EBUSY', 'a trace is already being recorded in this process');
    const now = performance.now();
    this.originMs = performance.timeOrigin + now;
    const header = new DataView(new ArrayBuffer(FILE_HEADER_BYTES));
    for (let i = 0; i < TRACE_MAGIC.length; i++) header.setUint8(i, TRACE_MAGIC.charCodeAt(i));
    header.setUint32(8, TRACE_VERSION, true);
    header.setUint32(12, FILE_HEADER_BYTES, true);
    header.setFloat64(16, Date.now(), true);
    header.setUint32(24, virtualTime ? TRACE_FLAG_VIRTUAL_TIME : 0, true);
    writeSync(this.fd, new Uint8Array(header.buffer));
    const fd = this.fd;
    this.started = true;
    traceBegin(this.make(0, DOMID_MACHINE), (bytes, length) => void writeSync(fd, bytes, BLOCK_AT, length));
  }

  private make(threadId: number, id: number): TraceThread {
    return { path: this.path, thread: threadId, domid: id, originMs: this.originMs, counter: this.counter, buffer: new SharedArrayBuffer(this.bufferBytes) };
  }

  /** A buffer for a new vCPU thread of domain `id`; hand it to traceBegin there. */
  thread(id: number): TraceThread {
    if (this.fd < 0) throw new XenError('EBADF', `trace ${this.path} is not open`);
    const t = this.make(this.nextThread++, id);
    this.live.add(t);
    return t;
  }

  /** Thread `t` has ended: write what it left. */
  threadDone(t: TraceThread): void {
    if (!this.live.delete(t) || this.fd < 0) return;
    const rest = remains(t);
    if (rest !== null) writeSync(this.fd, rest);
  }

  /** Stop recording here, write what every thread left (they must have ended) and close the file. */
  close(): void {
    if (this.fd < 0) return;
    if (this.started) traceEnd();
    for (const t of [...this.live]) this.threadDone(t);
    closeSync(this.fd);
    this.fd = -1;
  }
}
