// The block path's own cost: dom0's blkback and a guest's xbf in one thread
// (the fuzz World pumps both), random 4 KiB transfers at queue depth 32 as in
// bench/block.ts. No wake-up, no second CPU and no other job on the machine
// enters the figure, so it compares two versions of the code on a shared
// machine where rates do not: CPU nanoseconds per request, both sides
// together. What profile.js adds on top (two threads) is the cost of crossing
// threads: wake-ups, and cache lines moving between CPUs.
//
//   node dist/bench/block-path.js memory|null|file [--write] [--untrusted] [--requests N] [--runs N]
//
// --untrusted: the disk's backend is not trusted (XSA-403): no persistent
// grants, each request grants and revokes its pages, which are zeroed first.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { xbfDisks } from '../lib/drivers/xbf/xbf.js';
import { World } from '../lib/fuzz/world.js';
import { Disk } from '../lib/guest/guest.js';
import { makeDataFile, xorshift } from './peers.js';
import { QUEUE_DEPTH } from './block.js';
import { countOption, cpuNsPerUnit, describeNs } from './path-cpu.js';

const XVDA = 51712;
const DISK_BYTES = 64 << 20;

/** `requests` random 4 KiB reads (or writes) at QUEUE_DEPTH, pumped to the end. */
async function load(world: World, disk: Disk, requests: number, write: boolean): Promise<void> {
  const blocks = Math.floor((disk.sectors * disk.sectorSize) / 4096);
  const spb = 4096 / disk.sectorSize;
  let left = requests;
  const caller = async (seed: number): Promise<void> => {
    const buf = disk.buffer(4096).fill(0x5a);
    const next = xorshift(seed);
    while (left-- > 0) {
      const lba = (next() % blocks) * spb;
      if (write) await disk.write(lba, buf);
      else await disk.readInto(lba, buf);
    }
  };
  await world.run(Promise.all(Array.from({ length: QUEUE_DEPTH }, (_, i) => caller(i + 1))), 'block load');
}

/** CPU ns per request of each run, after a warm-up run. */
export async function blockPathCpu(type: 'memory' | 'null' | 'file', write: boolean, trusted: boolean, requests: number, runs: number): Promise<number[]> {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-block-path-'));
  try {
    const params = type === 'file' ? join(dir, 'disk.img') : String(DISK_BYTES);
    if (type === 'file') makeDataFile(params, DISK_BYTES);
    const world = new World({ dom0MemoryMiB: 64 });
    const sc = await world.createGuest({ name: 'path', memoryMiB: 64, disks: [{ vdev: 'xvda', devid: XVDA, type, params, readOnly: false, trusted }] });
    const disk = new Disk(xbfDisks(sc)[0]!);
    return await cpuNsPerUnit(() => load(world, disk, requests, write), requests, runs);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const { positionals, values } = parseArgs({
    allowPositionals: true,
    options: { write: { type: 'boolean' }, untrusted: { type: 'boolean' }, requests: { type: 'string' }, runs: { type: 'string' } },
  });
  const type = positionals[0] ?? 'memory';
  if (type !== 'memory' && type !== 'null' && type !== 'file') throw new Error('usage: block-path memory|null|file [--write] [--untrusted] [--requests N] [--runs N]');
  const write = values.write === true;
  const trusted = values.untrusted !== true;
  const ns = await blockPathCpu(type, write, trusted, countOption(values.requests, 300_000, 'requests'), countOption(values.runs, 5, 'runs'));
  console.log(`block path ${type}${trusted ? '' : ' untrusted'} rand${write ? 'write' : 'read'}4k, one thread: CPU ns per request ${describeNs(ns)}`);
}

await main();
process.exit(0);
