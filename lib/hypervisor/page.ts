// A 4 KiB page of some domain's memory as code outside that domain may touch
// it. A domain's own pages are reachable directly; a foreign page only through
// a grant map, which hands out a Page whose store methods work only when the
// grant was writable and which goes dead when it is unmapped.

import { XenError } from '../errors.js';

export const PAGE_SHIFT = 12;
export const PAGE_SIZE = 4096;

/** What a read-only grant mapping gives: loads and copies out, nothing that writes. */
export interface ReadPage {
  readonly writable: boolean;
  /** Atomic loads; offsets are within the page and aligned to the width. */
  load8(offset: number): number;
  load16(offset: number): number;
  load32(offset: number): number;
  /** Copy bytes out of the page from `offset` into `into[start, end)` (all of `into` by default). */
  read(offset: number, into: Uint8Array, start?: number, end?: number): void;
}

export interface Page extends ReadPage {
  /** Atomic stores; offsets are within the page and aligned to the width. */
  store8(offset: number, value: number): void;
  store16(offset: number, value: number): void;
  store32(offset: number, value: number): void;
  /** Copy `from[start, end)` (all of `from` by default) into the page at `offset`. */
  write(offset: number, from: Uint8Array, start?: number, end?: number): void;
}

/** Views on one SharedArrayBuffer, made once per domain and shared by its pages. */
export class MemoryViews {
  readonly u8: Uint8Array;
  readonly u16: Uint16Array;
  readonly u32: Uint32Array;
  readonly nrPages: number;

  constructor(readonly buffer: SharedArrayBuffer) {
    if (buffer.byteLength % PAGE_SIZE !== 0) throw new XenError('EINVAL', 'memory is not a whole number of pages');
    this.u8 = new Uint8Array(buffer);
    this.u16 = new Uint16Array(buffer);
    this.u32 = new Uint32Array(buffer);
    this.nrPages = buffer.byteLength / PAGE_SIZE;
  }
}

/**
 * Reads and writes up to this long (a netif slot is 8 or 12 bytes, a
 * response 4 or 8) make no view: whole words go as 32-bit loads or stores
 * on the page's side (little-endian, as every load32 of a wire field here
 * assumes) and bytes on the caller's, 8.5 ns for 12 bytes where a byte loop
 * took 19 (and a view would be garbage per slot).
 */
const SHORT_COPY_BYTES = 24;
/**
 * Those that cannot go by words (a xenstore message at its ring index) do
 * up to this long: timed alone, set() is faster past about 32 bytes, but its
 * view is garbage, and the scavenger's time was not in that timing.
 */
const SHORT_UNALIGNED_BYTES = 64;

/**
 * Spans this long or longer are copied by the C library's memcpy. V8 copies
 * into and out of shared memory a word at a time (relaxed atomic loads and
 * stores, for the memory model's sake), where memcpy moves whole vectors:
 * 4 KiB out of cache 228 -> 170 ns, out of a 64 MiB array in DRAM 816 ->
 * 663 ns (node dist/bench/copy.js). Shorter spans go by set(): the call into
 * C costs 70-100 ns, and memcpy still lost at 1024 and 1500 bytes.
 */
export const MEMCPY_BYTES = 2048;
/**
 * Node's one memcpy into a typed array: Buffer's fill() with a source
 * exactly as long as the span copies it once (node_buffer.cc Fill), checks
 * the span against the target, and works on any Uint8Array.
 */
const fillFrom = Buffer.prototype.fill as (this: Uint8Array, value: Uint8Array, offset: number, end: number) => Uint8Array;

/**
 * `to.set(from.subarray(start, end), at)`, with memcpy for a long span
 * between two buffers (within one buffer the ranges may overlap, which
 * memcpy does not allow). Either way a span past the end of `to` throws a
 * RangeError.
 */
export function copyBytes(to: Uint8Array, at: number, from: Uint8Array, start: number, end: number): void {
  const src = start === 0 && end === from.length ? from : from.subarray(start, end);
  if (src.length >= MEMCPY_BYTES && to.buffer !== from.buffer) fillFrom.call(to, src, at, at + src.length);
  else to.set(src, at);
}

/** A page of zeros, the source zeroBytes copies from. */
const ZERO_PAGE = new Uint8Array(PAGE_SIZE);

/**
 * Zero `to[start, end)` by copying from a page of zeros: fill() on shared
 * memory goes a byte at a time with relaxed stores, 1.3-1.9 µs per 4 KiB
 * on these machines, where the copy takes 0.1-0.25 µs.
 */
export function zeroBytes(to: Uint8Array, start: number, end: number): void {
  // Before any byte changes: a span past the end would be zeroed up to the page that fails.
  checkBuffer(to, start, end);
  for (let at = start; at < end; at += PAGE_SIZE) copyBytes(to, at, ZERO_PAGE, 0, Math.min(PAGE_SIZE, end - at));
}

/** `[start, end)` must lie within `buf`: a typed array would drop the bytes outside silently. */
function checkBuffer(buf: Uint8Array, start: number, end: number): void {
  if (!(start >= 0 && start <= end && end <= buf.length)) throw new XenError('EINVAL', `bytes [${start}, ${end}) of a ${buf.length}-byte buffer`);
}

function checkSpan(offset: number, length: number): void {
  if (!Number.isInteger(offset) || offset < 0 || length < 0 || offset + length > PAGE_SIZE) {
    throw new XenError('EFAULT', `access [${offset}, ${offset + length}) outside the page`);
  }
}

/**
 * What keeps a grant mapping's page usable: the page is live while
 * `words[index]` still holds `value`; unmapping moves the word on.
 */
export type Liveness = { readonly words: Int32Array; readonly index: number; readonly value: number };

/**
 * A page at a guest frame number. A grant mapping's page checks its
 * liveness on every access, so that unmap revokes it without the holder's
 * cooperation.
 */
export class FramePage implements Page {
  private readonly base: number;
  private lastBuffer: Uint8Array | null = null;
  private lastWords: Uint32Array | null = null;

  constructor(
    private readonly mem: MemoryViews,
    readonly gfn: number,
    readonly writable: boolean,
    private readonly mapping: Liveness | null = null,
  ) {
    if (!Number.isInteger(gfn) || gfn < 0 || gfn >= mem.nrPages) throw new XenError('EFAULT', `gfn ${gfn} out of range`);
    this.base = gfn * PAGE_SIZE;
  }

  // A plain load: only the mapping thread's own unmap (or its domain's death) moves the word on.
  private live(): boolean {
    const m = this.mapping;
    return m === null || m.words[m.index] === m.value;
  }

  private enter(offset: number, length: number, store: boolean): number {
    if (!this.live()) throw new XenError('EFAULT', `page ${this.gfn} is no longer mapped`);
    if (store && !this.writable) throw new XenError('EACCES', `page ${this.gfn} is mapped read-only`);
    checkSpan(offset, length);
    return this.base + offset;
  }

  private word(offset: number, width: 2 | 4, store: boolean): number {
    if (offset % width !== 0) throw new XenError('EFAULT', `unaligned ${width * 8}-bit access at ${offset}`);
    return this.enter(offset, width, store);
  }

  load8(offset: number): number {
    return Atomics.load(this.mem.u8, this.enter(offset, 1, false));
  }
  load16(offset: number): number {
    return Atomics.load(this.mem.u16, this.word(offset, 2, false) >> 1);
  }
  load32(offset: number): number {
    return Atomics.load(this.mem.u32, this.word(offset, 4, false) >> 2);
  }
  store8(offset: number, value: number): void {
    Atomics.store(this.mem.u8, this.enter(offset, 1, true), value);
  }
  store16(offset: number, value: number): void {
    Atomics.store(this.mem.u16, this.word(offset, 2, true) >> 1, value);
  }
  store32(offset: number, value: number): void {
    Atomics.store(this.mem.u32, this.word(offset, 4, true) >> 2, value);
  }
  read(offset: number, into: Uint8Array, start = 0, end = into.length): void {
    checkBuffer(into, start, end);
    const n = end - start;
    const at = this.enter(offset, n, false);
    const u8 = this.mem.u8;
    const aligned = ((at | n) & 3) === 0;
    if (aligned && n <= SHORT_COPY_BYTES) {
      const u32 = this.mem.u32;
      for (let i = start, j = at >> 2; i < end; i += 4, j++) {
        const v = u32[j]!;
        into[i] = v;
        into[i + 1] = v >>> 8;
        into[i + 2] = v >>> 16;
        into[i + 3] = v >>> 24;
      }
      return;
    }
    const w = n > SHORT_COPY_BYTES && aligned && (start & 3) === 0 ? this.wordsOf(into) : null;
    if (w === null && n <= SHORT_UNALIGNED_BYTES) {
      for (let i = 0; i < n; i++) into[start + i] = u8[at + i]!;
      return;
    }
    if (w === null) return copyBytes(into, start, u8, at, at + n);
    const u32 = this.mem.u32;
    for (let i = start >> 2, j = at >> 2, e = end >> 2; i < e; i++, j++) w[i] = u32[j]!;
  }
  write(offset: number, from: Uint8Array, start = 0, end = from.length): void {
    checkBuffer(from, start, end);
    const n = end - start;
    const at = this.enter(offset, n, true);
    const u8 = this.mem.u8;
    const aligned = ((at | n) & 3) === 0;
    if (aligned && n <= SHORT_COPY_BYTES) {
      const u32 = this.mem.u32;
      for (let i = start, j = at >> 2; i < end; i += 4, j++) u32[j] = from[i]! | (from[i + 1]! << 8) | (from[i + 2]! << 16) | (from[i + 3]! << 24);
      return;
    }
    const w = n > SHORT_COPY_BYTES && aligned && (start & 3) === 0 ? this.wordsOf(from) : null;
    if (w === null && n <= SHORT_UNALIGNED_BYTES) {
      for (let i = 0; i < n; i++) u8[at + i] = from[start + i]!;
      return;
    }
    if (w === null) return copyBytes(u8, at, from, start, end);
    const u32 = this.mem.u32;
    for (let i = start >> 2, j = at >> 2, e = end >> 2; i < e; i++, j++) u32[j] = w[i]!;
  }
  /**
   * `b` as 32-bit words, or null when it is not whole words. The view of the
   * last buffer is kept: a ring's user copies every slot through one buffer
   * (a 112-byte blkif request), so the view is made once, not per request,
   * and the copy is 28 words with nothing allocated.
   */
  private wordsOf(b: Uint8Array): Uint32Array | null {
    if (b === this.lastBuffer) return this.lastWords;
    if (((b.byteOffset | b.length) & 3) !== 0) return null;
    this.lastBuffer = b;
    this.lastWords = new Uint32Array(b.buffer, b.byteOffset, b.length >> 2);
    return this.lastWords;
  }
  /** The page's bytes as a view; see pageBytes. */
  bytes(): Uint8Array {
    const at = this.enter(0, PAGE_SIZE, false);
    return this.mem.u8.subarray(at, at + PAGE_SIZE);
  }
}

/**
 * A read-only grant mapping: a page object with no store methods at all, so
 * a backend holding one cannot write the granter's memory by any path.
 */
export class ReadOnlyPage implements ReadPage {
  readonly writable = false;

  constructor(private readonly page: FramePage) {}

  load8(offset: number): number {
    return this.page.load8(offset);
  }
  load16(offset: number): number {
    return this.page.load16(offset);
  }
  load32(offset: number): number {
    return this.page.load32(offset);
  }
  read(offset: number, into: Uint8Array, start?: number, end?: number): void {
    this.page.read(offset, into, start, end);
  }
  bytes(): Uint8Array {
    return this.page.bytes();
  }
}

export function isWritable(page: ReadPage | Page): page is Page {
  return page.writable && 'store32' in page;
}

/** The writable Page of a grant mapping; EACCES for a read-only one or none. */
export function writablePage(page: ReadPage | Page | null): Page {
  if (page === null || !isWritable(page)) throw new XenError('EACCES', 'the mapping is not writable');
  return page;
}

/**
 * The bytes of a mapped page as a view of the granter's memory, for I/O that
 * must not go through a copy (a backend's fs.readSync into a granted page).
 * Unlike the page object, the view is not revoked by unmap: its holder drops
 * it before unmapping, and stores nothing through the view of a read-only
 * mapping. EINVAL for a page that is not a mapping of domain memory.
 */
export function pageBytes(page: ReadPage): Uint8Array {
  if (page instanceof FramePage || page instanceof ReadOnlyPage) return page.bytes();
  throw new XenError('EINVAL', 'not a page of domain memory');
}
