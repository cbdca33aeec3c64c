// What the one-thread path benchmarks (block-path, net-path, xenstore-path)
// share: the CPU a load costs per unit of work, and how they print it.

import { median } from '../lib/cli/bench.js';
import { XenError } from '../lib/errors.js';

/**
 * CPU nanoseconds per unit of `units`-unit loads, `runs` of them after one
 * unmeasured (compiled code, warmed caches). The whole process's CPU time:
 * these loads run every domain in this one thread.
 */
export async function cpuNsPerUnit(load: () => Promise<void>, units: number, runs: number): Promise<number[]> {
  await load();
  const out: number[] = [];
  for (let i = 0; i < runs; i++) {
    const before = process.cpuUsage();
    await load();
    const used = process.cpuUsage(before);
    out.push(((used.user + used.system) * 1000) / units);
  }
  return out;
}

/** "median 1183, min 1161 (1356 1183 1161)": the runs as the path benchmarks print them. */
export function describeNs(ns: readonly number[]): string {
  const mid = median(ns);
  if (mid === null) return 'no runs';
  return `median ${mid.toFixed(0)}, min ${Math.min(...ns).toFixed(0)} (${ns.map((x) => x.toFixed(0)).join(' ')})`;
}

/** A count option (--requests, --frames, --runs): `fallback` when absent, EINVAL unless a whole number from 1 up. */
export function countOption(text: string | undefined, fallback: number, name: string): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n) || n < 1) throw new XenError('EINVAL', `--${name} ${JSON.stringify(text)}: a whole number from 1 up`);
  return n;
}
