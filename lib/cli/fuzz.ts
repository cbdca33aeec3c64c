// `xenpv fuzz <harness> [--device D] --seed N --steps M [--json]`: run a
// hostile-peer harness, print its seed first (so a failing run can be
// replayed), then what it did and every invariant it saw broken. Exit 1 on
// any violation.
//
//   fuzz xenstore                   a guest that abuses xenstored
//   fuzz frontend --device blkback  a frontend that abuses a real blkback
//   fuzz backend --device xbf       a backend that abuses a real xbf
//   fuzz frontend --device netback  a frontend that abuses a real netback
//   fuzz backend --device xnf       a backend that abuses a real xnf

import { randomInt } from 'node:crypto';
import { parseArgs } from 'node:util';
import { XenError } from '../errors.js';
import { fuzzBlkback } from '../fuzz/blkback.js';
import { fuzzNetback } from '../fuzz/netback.js';
import type { FuzzReport } from '../fuzz/report.js';
import { fuzzXbf } from '../fuzz/xbf.js';
import { fuzzXnf } from '../fuzz/xnf.js';
import { fuzzXenstore } from '../fuzz/xenstore.js';

type Harness = (seed: number, steps: number, progress: (n: number) => void) => FuzzReport | Promise<FuzzReport>;

/** Harnesses by `<name>` or `<name> --device <device>`. */
const HARNESSES: Record<string, Harness> = {
  xenstore: (seed, steps, onProgress) => fuzzXenstore({ seed, steps, onProgress }),
  'frontend blkback': (seed, steps, onProgress) => fuzzBlkback({ seed, steps, onProgress }),
  'backend xbf': (seed, steps, onProgress) => fuzzXbf({ seed, steps, onProgress }),
  'frontend netback': (seed, steps, onProgress) => fuzzNetback({ seed, steps, onProgress }),
  'backend xnf': (seed, steps, onProgress) => fuzzXnf({ seed, steps, onProgress }),
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

function usage(): XenError {
  const names = Object.keys(HARNESSES).map((k) => k.replace(' ', ' --device '));
  return new XenError('EINVAL', `fuzz needs one harness of: ${names.join('; ')}`);
}

export async function fuzz(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      seed: { type: 'string' }, steps: { type: 'string' }, device: { type: 'string' }, json: { type: 'boolean', default: false },
    },
  });
  const [name, ...extra] = positionals;
  if (name === undefined || extra.length > 0) throw usage();
  const key = values.device === undefined ? name : `${name} ${values.device}`;
  const harness = HARNESSES[key];
  if (harness === undefined) throw usage();
  const seed = integer('seed', values.seed, randomInt(0x7fffffff), 0xffffffff);
  const steps = integer('steps', values.steps, 100_000, 1e9);
  if (!values.json) process.stdout.write(`fuzz ${key}: seed ${seed}, ${steps} steps\n`);
  const progress = (n: number): void => {
    if (!values.json && process.stderr.isTTY) process.stderr.write(`\r${n} steps`);
  };
  const report = await harness(seed, steps, progress);
  if (values.json) {
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  } else {
    if (process.stderr.isTTY) process.stderr.write('\r');
    const rate = report.ms > 0 ? Math.round((report.steps / report.ms) * 1000) : report.steps;
    process.stdout.write(
      `${report.steps} steps in ${(report.ms / 1000).toFixed(1)} s (${rate} steps/s)\n` +
        `actions: ${counts(report.actions)}\n` +
        `refusals: ${counts(report.refusals)}\n` +
        `ring breaks: ${report.ringBreaks}; slowest answer to a bystander: ${report.maxProbeLatencyMs} ms\n` +
        `digest ${report.digest}\n`,
    );
    for (const v of report.violations) process.stdout.write(`VIOLATION at step ${v.step}: ${v.what}\n`);
    process.stdout.write(report.violations.length === 0 ? 'no invariant broken\n' : `${report.violations.length} violations; replay with --seed ${seed}\n`);
  }
  return report.violations.length === 0 ? 0 : 1;
}
