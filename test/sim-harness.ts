// Tests under the deterministic runner: boot a machine whose domains all run
// in this thread under a seeded scheduler, run guests to their end, and hand
// back what a replay must reproduce. XENPV_SEED in the environment replaces
// the seeds a test would try, so a failing seed replays alone:
//   XENPV_SEED=1234 npx tap dist/test/sim.test.js

import type { DomainExit, DomainSpec } from '../lib/backends/toolstack.js';
import { XenError } from '../lib/errors.js';
import { Machine } from '../lib/machine.js';
import type { FaultKind, FaultRecord } from '../lib/sim/sim.js';

export type SimResult = {
  seed: number;
  exits: DomainExit[];
  /** Console output as it arrived, `<name>: <text>` per chunk. */
  console: string[];
  digest: string;
  steps: number;
  virtualMs: number;
  faults: FaultRecord[];
};

/** The seeds to try: `seeds`, or only $XENPV_SEED when it is set. */
export function seeds(list: readonly number[]): number[] {
  const env = process.env.XENPV_SEED;
  return env === undefined || env === '' ? [...list] : [Number(env)];
}

/**
 * Boot a deterministic machine with `seed` and `faults`, create `specs` in
 * order, let `during` act on the running machine, wait until every guest has
 * gone, and stop. A run in which nothing can move any more is EDEADLK.
 */
export async function runSim(
  specs: readonly DomainSpec[],
  seed: number,
  opts: { faults?: FaultKind[]; during?: (m: Machine, domids: number[], console: readonly string[]) => Promise<void>; trace?: string } = {},
): Promise<SimResult> {
  const consoleOut: string[] = [];
  const m = await Machine.boot({
    sim: { seed, faults: opts.faults ?? [] },
    ...(opts.trace === undefined ? {} : { trace: opts.trace }),
    onConsole: (_domid, name, text) => consoleOut.push(`${name}: ${text}`),
  });
  const sim = m.sim!;
  try {
    const stuck = new AbortController();
    sim.onIdle(() => stuck.abort());
    const domids: number[] = [];
    for (const spec of specs) domids.push(await m.create(spec));
    const during = (opts.during?.(m, domids, consoleOut) ?? Promise.resolve()).then(() => null, (err: unknown) => err);
    const exits = await Promise.all(domids.map((id) => m.waitExit(id, stuck.signal))).catch((err: unknown) => {
      if (stuck.signal.aborted) throw new XenError('EDEADLK', `seed ${seed}: every domain waits and no timer is set (step ${sim.steps})`);
      throw err;
    });
    const failed = await during;
    if (failed !== null) throw failed;
    return { seed, exits, console: consoleOut, digest: sim.digest(), steps: sim.steps, virtualMs: sim.timeMs(), faults: [...sim.faults] };
  } finally {
    await m.stop();
  }
}

/** The lines a guest printed, from its exit record. */
export function lines(exit: DomainExit): string[] {
  return exit.console.split('\n').filter((l) => l !== '');
}
