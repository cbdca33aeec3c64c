// `xenpv fuzz <harness> --seed N --steps M [--json]`: run a hostile-peer
// harness, print its seed first (so a failing run can be replayed), then
// what it did and every invariant it saw broken. Exit 1 on any violation.

import { randomInt } from 'node:crypto';
import { parseArgs } from 'node:util';
import { XenError } from '../errors.js';
import { fuzzXenstore, type FuzzReport } from '../fuzz/xenstore.js';

const HARNESSES: Record<string, (seed: number, steps: number, progress: (n: number) => void) => FuzzReport> = {
  xenstore: (seed, steps, onProgress) => fuzzXenstore({ seed, steps, onProgress }),
};

function integer(name: string, value: string | undefined, fallback: number, max: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n > max) throw new XenError('EINVAL', `--${name} must be an integer 0..${max}, not ${value}`);
  return n;
}

function counts(map: Record<string, number>): string {
  return Object.entries(map).sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => `${k} ${v}`).join(', ') || 'none';
}

export function fuzz(argv: string[]): number {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { seed: { type: 'string' }, steps: { type: 'string' }, json: { type: 'boolean', default: false } },
  });
  const [name, ...extra] = positionals;
  const harness = name === undefined ? undefined : HARNESSES[name];
  if (harness === undefined || extra.length > 0) {
    throw new XenError('EINVAL', `fuzz needs one harness of: ${Object.keys(HARNESSES).join(', ')}`);
  }
  const seed = integer('seed', values.seed, randomInt(0x7fffffff), 0xffffffff);
  const steps = integer('steps', values.steps, 100_000, 1e9);
  if (!values.json) process.stdout.write(`fuzz ${name}: seed ${seed}, ${steps} steps\n`);
  const progress = (n: number): void => {
    if (!values.json && process.stderr.isTTY) process.stderr.write(`\r${n} steps`);
  };
  const report = harness(seed, steps, progress);
  if (values.json) {
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  } else {
    if (process.stderr.isTTY) process.stderr.write('\r');
    const rate = report.ms > 0 ? Math.round((report.steps / report.ms) * 1000) : report.steps;
    process.stdout.write(
      `${report.steps} steps in ${(report.ms / 1000).toFixed(1)} s (${rate} steps/s)\n` +
        `actions: ${counts(report.actions)}\n` +
        `refusals: ${counts(report.refusals)}\n` +
        `ring breaks: ${report.ringBreaks}; slowest probe of dom0 and a bystander: ${report.maxProbeLatencyMs} ms\n` +
        `digest ${report.digest}\n`,
    );
    for (const v of report.violations) process.stdout.write(`VIOLATION at step ${v.step}: ${v.what}\n`);
    process.stdout.write(report.violations.length === 0 ? 'no invariant broken\n' : `${report.violations.length} violations; replay with --seed ${seed}\n`);
  }
  return report.violations.length === 0 ? 0 : 1;
}
