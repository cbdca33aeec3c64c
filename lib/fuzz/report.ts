// What every fuzz harness reports: what it did, what the attacked side
// refused, each invariant it saw broken, and a digest of everything observed
// so that two runs of one seed can be shown to be the same run.

import { Rng } from './rng.js';

export type FuzzReport = {
  harness: string;
  seed: number;
  steps: number;
  ms: number;
  /** How often each attack ran. */
  actions: Record<string, number>;
  /** How the attacked side refused (error names, response statuses). */
  refusals: Record<string, number>;
  /** Times the attacker broke its ring badly enough to be disconnected and connected again. */
  ringBreaks: number;
  /** The slowest answer a well-behaved bystander got while the attack ran. */
  maxProbeLatencyMs: number;
  violations: { step: number; what: string }[];
  /** sha256 of everything the harness observed: equal digests, equal runs. */
  digest: string;
};

export const MAX_VIOLATIONS = 50;

export function emptyReport(harness: string, seed: number): FuzzReport {
  return { harness, seed, steps: 0, ms: 0, actions: {}, refusals: {}, ringBreaks: 0, maxProbeLatencyMs: 0, violations: [], digest: '' };
}

export function count(map: Record<string, number>, key: string): void {
  map[key] = (map[key] ?? 0) + 1;
}

/**
 * What every device harness holds: the seed's random stream, the report, the
 * step it is at and the latency bound a bystander is held to; and the two
 * ways it writes to the report as it goes.
 */
export abstract class Harness {
  readonly report: FuzzReport;
  protected readonly rng: Rng;
  protected readonly latencyBoundMs: number;
  protected step = 0;

  constructor(harness: string, opts: { seed: number; latencyBoundMs?: number }) {
    this.rng = new Rng(opts.seed);
    this.latencyBoundMs = opts.latencyBoundMs ?? 1000;
    this.report = emptyReport(harness, opts.seed);
  }

  protected violation(what: string): void {
    if (this.report.violations.length < MAX_VIOLATIONS) this.report.violations.push({ step: this.step, what });
  }

  /** One more run of attack or action `what`. */
  protected count(what: string): void {
    count(this.report.actions, what);
  }

  /** A driver or backend handler that threw is a violation (the interrupt layer only logs and counts it). */
  protected checkHandlers(intrs: readonly (readonly [who: string, intr: { handlerErrors: number }])[]): void {
    for (const [who, intr] of intrs) {
      if (intr.handlerErrors === 0) continue;
      this.violation(`${intr.handlerErrors} interrupt handler(s) of ${who} threw`);
      intr.handlerErrors = 0;
    }
  }
}
