// What every fuzz harness reports: what it did, what the attacked side
// refused, each invariant it saw broken, and a digest of everything observed
// so that two runs of one seed can be shown to be the same run.

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
