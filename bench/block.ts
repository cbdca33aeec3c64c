// Block I/O through a guest's disks(): the guest image runs the loads and
// reports rates over its console; the path under test is xbf, the ring,
// the event channels, grant maps and blkback with its storage in dom0.
//
// Three disks: xvda null storage, xvdb memory storage, xvdc a page-cached
// raw file (the file the peer fs and fio figures read). Random loads keep
// QUEUE_DEPTH requests outstanding; sequential loads one 1 MiB transfer at a
// time (xbf splits it into ring requests of up to 11 pages and issues them
// together). Each caller reads into and writes from one array it reuses,
// as fio's do: an array from disk.buffer(), guest memory whose pages the
// backend reads and writes itself, as a kernel's buffer pages are (a plain
// array would be copied through xbf's request pages).

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';

export const QUEUE_DEPTH = 32;
/** Operations each random-load caller issues between two looks at the clock. */
const CLOCK_EVERY = 16;
const MEMORY_DISK_BYTES = 64 << 20;
const NULL_DISK_BYTES = 1 << 30;

/** What the guest measures, in the order it runs them: [metric name, disk index, load]. */
export const BLOCK_LOADS = [
  ['block.null.randread4k.iops', 0, 'randread4k'],
  ['block.memory.randread4k.iops', 1, 'randread4k'],
  ['block.memory.randwrite4k.iops', 1, 'randwrite4k'],
  ['block.file.randread4k.iops', 2, 'randread4k'],
  ['block.file.randwrite4k.iops', 2, 'randwrite4k'],
  ['block.file.seqread1m.mbps', 2, 'seqread1m'],
  ['block.file.seqwrite1m.mbps', 2, 'seqwrite1m'],
] as const;

const GUEST = `const LOADS = ${JSON.stringify(BLOCK_LOADS)};
function xorshift(seed) {
  let x = seed | 0 || 1;
  return () => { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; return x >>> 0; };
}
// Each disk's arrays, made once: disk.buffer() memory is never freed, and
// the three disks' 864 pages are most of the guest's 1024.
const arrays = new Map();
function arraysOf(disk) {
  let a = arrays.get(disk.path);
  if (a === undefined) {
    a = { page: Array.from({ length: ${QUEUE_DEPTH} }, () => disk.buffer(4096).fill(0x5a)), mib: disk.buffer(1 << 20).fill(0xa5) };
    arrays.set(disk.path, a);
  }
  return a;
}
// Operations per second (4k loads) or MB/s (1m loads) over ms milliseconds.
async function load(disk, kind, ms) {
  const spb = 4096 / disk.sectorSize;
  const blocks = Math.floor(disk.sectors / spb);
  const end = performance.now() + ms;
  const t0 = performance.now();
  if (kind === 'randread4k' || kind === 'randwrite4k') {
    let n = 0;
    // The clock once per CLOCK_EVERY operations: a reading (~60 ns) would count against the disk.
    const caller = async (seed) => {
      const buf = arraysOf(disk).page[seed - 1];
      const next = xorshift(seed);
      while (performance.now() < end) {
        for (let i = 0; i < ${CLOCK_EVERY}; i++) {
          const lba = (next() % blocks) * spb;
          if (kind === 'randread4k') await disk.readInto(lba, buf);
          else await disk.write(lba, buf);
        }
        n += ${CLOCK_EVERY};
      }
    };
    await Promise.all(Array.from({ length: ${QUEUE_DEPTH} }, (_, i) => caller(i + 1)));
    return (n / (performance.now() - t0)) * 1000;
  }
  const spm = (1 << 20) / disk.sectorSize;
  const mbs = Math.floor(disk.sectors / spm);
  const buf = arraysOf(disk).mib;
  let n = 0;
  while (performance.now() < end) {
    const lba = (n % mbs) * spm;
    if (kind === 'seqread1m') await disk.readInto(lba, buf);
    else await disk.write(lba, buf);
    n++;
  }
  return (n * 1.048576 / (performance.now() - t0)) * 1000;
}
export async function main(guest) {
  const [runs, ms, warmupMs] = guest.extra.split(',').map(Number);
  const disks = guest.disks();
  const out = {};
  for (const [name, at, kind] of LOADS) {
    out[name] = [];
    await load(disks[at], kind, warmupMs); // compiled code, haltpoll windows
    for (let i = 0; i < runs; i++) out[name].push(await load(disks[at], kind, ms));
  }
  console.log('BENCH ' + JSON.stringify(out));
}
`;

/** Boot a host with one guest and its three disks; every load `runs` times for `ms` each, after `warmupMs` of it. */
export async function blockBench(file: string, runs: number, ms: number, warmupMs: number): Promise<Record<string, number[]>> {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-bench-blk-'));
  const m = await Machine.boot({});
  try {
    writeFileSync(join(dir, 'bench.mjs'), GUEST);
    const cfg = join(dir, 'bench.cfg');
    writeFileSync(cfg, [
      'name = "blkbench"',
      'memory = 64',
      'kernel = "bench.mjs"',
      `extra = "${runs},${ms},${warmupMs}"`,
      `disk = [ 'format=null, vdev=xvda, access=rw, target=${NULL_DISK_BYTES}',`,
      `         'format=memory, vdev=xvdb, access=rw, target=${MEMORY_DISK_BYTES}',`,
      `         'format=raw, vdev=xvdc, access=rw, target=${file}' ]`,
      '',
    ].join('\n'));
    const budgetMs = 60_000 + BLOCK_LOADS.length * (runs * ms + warmupMs) * 3;
    const exit = await m.waitExit(await m.create(loadDomainConfig(cfg)), AbortSignal.timeout(budgetMs));
    const line = /BENCH (.*)/.exec(exit.console)?.[1];
    if (exit.reason !== 'poweroff' || line === undefined) throw new Error(`block bench guest: ${exit.reason}\n${exit.console}`);
    return JSON.parse(line) as Record<string, number[]>;
  } finally {
    await m.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
