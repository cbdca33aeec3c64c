// What one copy into shared memory costs each way a copy can go: set() (V8
// copies a word at a time with relaxed atomics when either side is shared),
// 32-bit words in a loop, and copyBytes (memcpy past MEMCPY_BYTES). Spans
// of the sizes the rings carry, from a page that stays in cache, and 4 KiB
// from a random place in a 64 MiB array (a memory disk's read), which comes
// from DRAM. The figures behind MEMCPY_BYTES in lib/hypervisor/page.ts.
//
//   node dist/bench/copy.js [--copies N] [--runs N]

import { parseArgs } from 'node:util';
import { copyBytes, PAGE_SIZE } from '../lib/hypervisor/page.js';
import { countOption } from './path-cpu.js';

const SIZES = [64, 256, 512, 1024, 1500, 4096];
const DISK_BYTES = 64 << 20;
/** Destination pages, as many as a ring has slots. */
const PAGES = 256;

type Way = 'set' | 'words' | 'copyBytes';
const WAYS: Way[] = ['set', 'words', 'copyBytes'];

/** Each way in a function of its own, so that each is compiled for itself alone. */
const LOOPS: Record<Way, (src: Uint8Array, from: Int32Array, len: number, dst: Uint8Array) => void> = {
  set(src, from, len, dst) {
    for (let i = 0; i < from.length; i++) dst.set(src.subarray(from[i]!, from[i]! + len), (i & (PAGES - 1)) * PAGE_SIZE);
  },
  words(src, from, len, dst) {
    const s32 = new Uint32Array(src.buffer);
    const d32 = new Uint32Array(dst.buffer);
    for (let i = 0; i < from.length; i++) {
      for (let a = from[i]! >> 2, b = ((i & (PAGES - 1)) * PAGE_SIZE) >> 2, e = (from[i]! + len) >> 2; a < e; a++, b++) d32[b] = s32[a]!;
    }
  },
  copyBytes(src, from, len, dst) {
    for (let i = 0; i < from.length; i++) copyBytes(dst, (i & (PAGES - 1)) * PAGE_SIZE, src, from[i]!, from[i]! + len);
  },
};

/** ns per copy of `len` bytes from `src` at the offsets `from` gives, into one of PAGES shared pages. */
function time(way: Way, src: Uint8Array, from: Int32Array, len: number, dst: Uint8Array): number {
  const t0 = process.hrtime.bigint();
  LOOPS[way](src, from, len, dst);
  return Number(process.hrtime.bigint() - t0) / from.length;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1]!;
}

function main(): void {
  const { values } = parseArgs({ options: { copies: { type: 'string' }, runs: { type: 'string' } } });
  const copies = countOption(values.copies, 200_000, 'copies');
  const runs = countOption(values.runs, 5, 'runs');
  const dst = new Uint8Array(new SharedArrayBuffer(PAGES * PAGE_SIZE));
  const hot = new Uint8Array(new SharedArrayBuffer(16 * PAGE_SIZE)).fill(1);
  const hotFrom = Int32Array.from({ length: copies }, (_, i) => (i & 15) * PAGE_SIZE);
  const disk = new Uint8Array(DISK_BYTES).fill(2);
  const diskFrom = Int32Array.from({ length: copies }, () => Math.floor(Math.random() * (DISK_BYTES / PAGE_SIZE)) * PAGE_SIZE);
  const rows: [string, Uint8Array, Int32Array, number][] = SIZES.map((len) => [`${len} B from cache`, hot, hotFrom, len]);
  rows.push(['4096 B from a 64 MiB array', disk, diskFrom, PAGE_SIZE]);
  console.log(`ns per copy into shared memory, median of ${runs} runs of ${copies}`);
  console.log(['', ...WAYS].map((w, i) => (i === 0 ? w.padEnd(28) : w.padStart(10))).join(''));
  for (const [name, src, from, len] of rows) {
    // The ways take turns, run by run, so that a change in the machine's speed falls on all of them.
    const ns: number[][] = WAYS.map(() => []);
    for (let r = 0; r < runs; r++) WAYS.forEach((way, w) => ns[w]!.push(time(way, src, from, len, dst)));
    const cells = ns.map(median);
    console.log(name.padEnd(28) + cells.map((ns) => ns.toFixed(0).padStart(10)).join(''));
  }
}

main();
