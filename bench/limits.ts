// The limits of this runtime, with no xenpv code: what a ring between two
// worker threads can move at best, what one memcpy costs, and what one
// Atomics.wait/notify round trip takes. Every xenpv figure is read against
// these, measured in the same run.
//
// The ring is the shape of Xen's io/ring.h reduced to one direction: 256
// slots in a SharedArrayBuffer, free-running u32 indices, event suppression
// (the consumer asks to be woken only when it would otherwise sleep, the
// producer only when the ring is full), one payload copy into the slot by
// the producer and one out of it by the consumer.
//
// This module is also the workers' entry (workerData says which role).

import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

const SLOTS = 256;
const MASK = SLOTS - 1;
/** Header words: indices, event indices, wake words, the end mark. */
const PROD = 0;
const CONS = 1;
const PROD_EVENT = 2; // the consumer wants a wake when prod passes this
const CONS_EVENT = 3; // the producer wants a wake when cons passes this
const WAKE_CONS = 4;
const WAKE_PROD = 5;
const DONE = 6; // 1 once the producer stopped; PROD is final then
const HDR_BYTES = 64;
const SLEEP_LIMIT_MS = 2000;

type RingWork = { kind: 'ring'; role: 'producer' | 'consumer'; sab: SharedArrayBuffer; size: number; durationMs: number };
type PingWork = { kind: 'ping'; role: 'ping' | 'pong'; sab: SharedArrayBuffer; durationMs: number };
type Work = RingWork | PingWork;

export type RingResult = { packets: number; elapsedMs: number; pps: number; gbps: number };
export type PingResult = { p50Us: number; p99Us: number; roundTrips: number };

function slotBytes(size: number): number {
  return Math.ceil(size / 64) * 64;
}

/**
 * Node's memcpy into a typed array: Buffer's fill() with a source as long
 * as the span. set() into or out of shared memory goes a word at a time.
 */
const memcpy = Buffer.prototype.fill as (this: Uint8Array, value: Uint8Array, offset: number, end: number) => Uint8Array;
/** Where memcpy's call costs less than set()'s word loop saves (bench/copy.ts). */
const MEMCPY_BYTES = 2048;

/** One copy, the way a careful driver writes it: words for a small aligned payload, memcpy for a long one, set() between. */
function copy(dst: Uint8Array, dst32: Int32Array, dOff: number, src: Uint8Array, src32: Int32Array, sOff: number, n: number): void {
  if (n <= 128 && (n & 3) === 0 && (dOff & 3) === 0 && (sOff & 3) === 0) {
    const d = dOff >> 2;
    const s = sOff >> 2;
    for (let i = 0; i < n >> 2; i++) dst32[d + i] = src32[s + i]!;
    return;
  }
  if (n >= MEMCPY_BYTES) memcpy.call(dst, src.subarray(sOff, sOff + n), dOff, dOff + n);
  else dst.set(src.subarray(sOff, sOff + n), dOff);
}

function wake(hdr: Int32Array, word: number): void {
  Atomics.add(hdr, word, 1);
  Atomics.notify(hdr, word);
}

/** Producer: fill slots from a private packet, push, notify only when the consumer asked. */
function produce(w: RingWork): { packets: number } {
  const hdr = new Int32Array(w.sab, 0, HDR_BYTES / 4);
  const data = new Uint8Array(w.sab, HDR_BYTES);
  const data32 = new Int32Array(w.sab, HDR_BYTES);
  const stride = slotBytes(w.size);
  const pkt = new Uint8Array(stride);
  const pkt32 = new Int32Array(pkt.buffer);
  for (let i = 0; i < stride; i++) pkt[i] = i & 0xff;
  const end = performance.now() + w.durationMs;
  let prod = 0;
  let batches = 0;
  for (;;) {
    if ((batches++ & 15) === 0 && performance.now() >= end) break;
    const seen = Atomics.load(hdr, WAKE_PROD);
    const cons = Atomics.load(hdr, CONS);
    let free = SLOTS - ((prod - cons) >>> 0);
    if (free === 0) {
      // RING_FINAL_CHECK: ask for a wake once half the ring has drained, then look again.
      Atomics.store(hdr, CONS_EVENT, (cons + SLOTS / 2) | 0);
      if (((prod - Atomics.load(hdr, CONS)) >>> 0) === SLOTS) Atomics.wait(hdr, WAKE_PROD, seen, SLEEP_LIMIT_MS);
      continue;
    }
    const old = prod;
    for (; free > 0; free--) {
      pkt32[0] = prod;
      copy(data, data32, (prod & MASK) * stride, pkt, pkt32, 0, w.size);
      prod = (prod + 1) >>> 0;
    }
    Atomics.store(hdr, PROD, prod | 0);
    // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
    const event = Atomics.load(hdr, PROD_EVENT) >>> 0;
    if (((prod - event) >>> 0) < ((prod - old) >>> 0)) wake(hdr, WAKE_CONS);
  }
  Atomics.store(hdr, DONE, 1);
  wake(hdr, WAKE_CONS);
  return { packets: prod };
}

/** Consumer: copy each slot out into a private packet, check it, give the slot back. */
function consume(w: RingWork): RingResult {
  const hdr = new Int32Array(w.sab, 0, HDR_BYTES / 4);
  const data = new Uint8Array(w.sab, HDR_BYTES);
  const data32 = new Int32Array(w.sab, HDR_BYTES);
  const stride = slotBytes(w.size);
  const pkt = new Uint8Array(stride);
  const pkt32 = new Int32Array(pkt.buffer);
  let cons = 0;
  let t0 = 0;
  for (;;) {
    const seen = Atomics.load(hdr, WAKE_CONS);
    const prod = Atomics.load(hdr, PROD) >>> 0;
    if (prod === cons) {
      if (Atomics.load(hdr, DONE) === 1 && Atomics.load(hdr, PROD) >>> 0 === cons) break;
      Atomics.store(hdr, PROD_EVENT, (cons + 1) | 0);
      if (Atomics.load(hdr, PROD) >>> 0 === cons && Atomics.load(hdr, DONE) === 0) Atomics.wait(hdr, WAKE_CONS, seen, SLEEP_LIMIT_MS);
      continue;
    }
    if (t0 === 0) t0 = performance.now();
    const old = cons;
    for (; cons !== prod; cons = (cons + 1) >>> 0) {
      copy(pkt, pkt32, 0, data, data32, (cons & MASK) * stride, w.size);
      if (pkt32[0] !== (cons | 0)) throw new Error(`ring: slot ${cons} holds packet ${pkt32[0]}`);
    }
    Atomics.store(hdr, CONS, cons | 0);
    const event = Atomics.load(hdr, CONS_EVENT) >>> 0;
    if (((cons - event) >>> 0) < ((cons - old) >>> 0)) wake(hdr, WAKE_PROD);
  }
  const elapsedMs = performance.now() - t0;
  const pps = (cons / elapsedMs) * 1000;
  return { packets: cons, elapsedMs, pps, gbps: (pps * w.size * 8) / 1e9 };
}

/** Ping: store, notify, wait for the answer; record each round trip. */
function ping(w: PingWork): PingResult {
  const hdr = new Int32Array(w.sab);
  const rtts: number[] = [];
  const end = performance.now() + w.durationMs;
  for (let seq = 1; ; seq++) {
    const t = performance.now();
    if (t >= end) {
      Atomics.store(hdr, 0, -1);
      Atomics.notify(hdr, 0);
      break;
    }
    Atomics.store(hdr, 0, seq);
    Atomics.notify(hdr, 0);
    while (Atomics.load(hdr, 1) !== seq) Atomics.wait(hdr, 1, seq - 1, SLEEP_LIMIT_MS);
    rtts.push((performance.now() - t) * 1000);
  }
  return percentiles(rtts);
}

function pong(w: PingWork): void {
  const hdr = new Int32Array(w.sab);
  for (let seen = 0; ; ) {
    Atomics.wait(hdr, 0, seen, SLEEP_LIMIT_MS);
    const seq = Atomics.load(hdr, 0);
    if (seq === -1) return;
    if (seq === seen) continue;
    seen = seq;
    Atomics.store(hdr, 1, seq);
    Atomics.notify(hdr, 1);
  }
}

/** p50 and p99 of round-trip times in microseconds. */
export function percentiles(us: number[]): PingResult {
  const s = Float64Array.from(us).sort();
  const at = (q: number): number => s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? NaN;
  return { p50Us: at(0.5), p99Us: at(0.99), roundTrips: s.length };
}

function runWorker(work: Work): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const w = new Worker(new URL(import.meta.url), { workerData: work });
    w.once('message', resolve);
    w.once('error', reject);
    w.once('exit', (code) => reject(new Error(`limits worker exited with ${code}`)));
  });
}

/** limit.ring.<size>: packets of `size` bytes through the bare ring for `durationMs`. */
export async function ringLimit(size: number, durationMs: number): Promise<RingResult> {
  const sab = new SharedArrayBuffer(HDR_BYTES + SLOTS * slotBytes(size));
  const consumer = runWorker({ kind: 'ring', role: 'consumer', sab, size, durationMs });
  const producer = runWorker({ kind: 'ring', role: 'producer', sab, size, durationMs });
  const [c] = await Promise.all([consumer, producer]);
  return c as RingResult;
}

/** limit.atomics.pingpong: round trips of Atomics.notify/Atomics.wait between two blocked workers. */
export async function atomicsPingPong(durationMs: number): Promise<PingResult> {
  const sab = new SharedArrayBuffer(8);
  const b = runWorker({ kind: 'ping', role: 'pong', sab, durationMs });
  const a = runWorker({ kind: 'ping', role: 'ping', sab, durationMs });
  const [r] = await Promise.all([a, b]);
  return r as PingResult;
}

/** limit.memcpy.<size>: one thread copying between two aligned buffers of shared memory. */
export function memcpyLimit(size: number, durationMs: number): number {
  const src = new Uint8Array(new SharedArrayBuffer(size));
  const dst = new Uint8Array(new SharedArrayBuffer(size));
  for (let i = 0; i < size; i++) src[i] = i & 0xff;
  let bytes = 0;
  const t0 = performance.now();
  let t = t0;
  while (t - t0 < durationMs) {
    for (let i = 0; i < 64; i++) memcpy.call(dst, src, 0, size);
    bytes += 64 * size;
    t = performance.now();
  }
  return (bytes * 8) / ((t - t0) / 1000) / 1e9;
}

if (!isMainThread && (workerData as Work | undefined)?.kind !== undefined) {
  const w = workerData as Work;
  let out: unknown = null;
  if (w.kind === 'ring') out = w.role === 'producer' ? produce(w) : consume(w);
  else if (w.role === 'ping') out = ping(w);
  else pong(w);
  parentPort!.postMessage(out);
}
