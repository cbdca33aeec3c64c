// The xenstore path's own cost: a guest's client and dom0's xenstored in one
// thread (the fuzz World pumps both), CALLERS loops reading (or writing) one
// node as bench/xenstore.ts does. No wake-up and no second CPU enters the
// figure, so it compares two versions of the code on a shared machine where
// rates do not: CPU nanoseconds per request, both sides together.
//
//   node dist/bench/xenstore-path.js [--write] [--requests N] [--runs N]

import { parseArgs } from 'node:util';
import { World } from '../lib/fuzz/world.js';
import type { XenStore } from '../lib/xenstore/xenstore.js';
import { CALLERS, VALUE } from './xenstore.js';
import { countOption, cpuNsPerUnit, describeNs } from './path-cpu.js';

/** `requests` reads (or writes) of data/bench by CALLERS loops, pumped to the end. */
async function load(world: World, xs: XenStore, requests: number, write: boolean): Promise<void> {
  let left = requests;
  const caller = async (): Promise<void> => {
    while (left-- > 0) {
      if (write) await xs.write('data/bench', String(left & 0xffff));
      else await xs.read('data/bench');
    }
  };
  await world.run(Promise.all(Array.from({ length: CALLERS }, caller)), 'xenstore load');
}

/** CPU ns per request of each run, after a warm-up run. */
export async function xenstorePathCpu(write: boolean, requests: number, runs: number): Promise<number[]> {
  const world = new World({});
  const sc = await world.createGuest({ name: 'path' });
  await world.run(sc.xs.write('data/bench', VALUE), 'setup');
  return await cpuNsPerUnit(() => load(world, sc.xs, requests, write), requests, runs);
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { write: { type: 'boolean' }, requests: { type: 'string' }, runs: { type: 'string' } } });
  const write = values.write === true;
  const ns = await xenstorePathCpu(write, countOption(values.requests, 200_000, 'requests'), countOption(values.runs, 5, 'runs'));
  console.log(`xenstore path ${write ? 'writes' : 'reads'}, one thread: CPU ns per request ${describeNs(ns)}`);
}

await main();
process.exit(0);
