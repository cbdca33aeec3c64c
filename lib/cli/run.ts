// `xenpv run`: one host for the length of a command. Guests' console lines
// are printed as they arrive, prefixed with the guest's name; with --json a
// summary is printed at the end instead. With --seed the host runs under the
// deterministic runner: the run replays from its seed, and ends with the
// seed and a digest to compare replays by.

import { loadDomainConfig } from '../backends/xlcfg.js';
import type { DomainExit, DomainSpec } from '../backends/toolstack.js';
import { XenError } from '../errors.js';
import { Machine } from '../machine.js';
import type { BridgeSetup } from '../backends/dom0.js';
import type { FaultKind, FaultRecord, SimRunner } from '../sim/sim.js';

export type RunOptions = {
  json: boolean;
  durationS: number | undefined;
  /** UDP uplinks by bridge name. */
  uplinks?: Record<string, string>;
  /** Bridge setups (a pcap file, a DHCP server) by bridge name. */
  bridges?: Record<string, BridgeSetup>;
  /** Run under the deterministic runner with this seed (u32). */
  seed?: number | undefined;
  faults?: FaultKind[] | undefined;
  /** Record a trace of the run into this file. */
  trace?: string | undefined;
};

type Result = { name: string; domid: number | null; exit: { reason: string }; console: string };

/** What a deterministic run reports: enough to replay it and to compare the replay. */
type SimSummary = { seed: number; faults: FaultKind[]; steps: number; virtualMs: number; digest: string; faultCount: number; injected: FaultRecord[] };

function simSummary(sim: SimRunner, faults: FaultKind[]): SimSummary {
  return { seed: sim.seed, faults, steps: sim.steps, virtualMs: Math.round(sim.timeMs() * 1000) / 1000, digest: sim.digest(), faultCount: sim.faultCount, injected: sim.faults };
}

/** Splits console text into whole lines per guest, so prefixes land at line starts. */
class LinePrinter {
  private readonly partial = new Map<number, string>();

  write(domid: number, name: string, text: string): void {
    const lines = ((this.partial.get(domid) ?? '') + text).split('\n');
    this.partial.set(domid, lines.pop() ?? '');
    for (const line of lines) process.stdout.write(`${name}: ${line}\n`);
  }

  flush(domid: number, name: string): void {
    const rest = this.partial.get(domid);
    if (rest !== undefined && rest !== '') process.stdout.write(`${name}: ${rest}\n`);
    this.partial.delete(domid);
  }
}

export async function run(files: string[], opts: RunOptions): Promise<number> {
  const specs: DomainSpec[] = files.map((f) => loadDomainConfig(f));
  const printer = new LinePrinter();
  const faults = opts.faults ?? [];
  if (opts.seed !== undefined && !opts.json) process.stdout.write(`xenpv: deterministic run, seed ${opts.seed}, faults ${faults.join(',') || 'none'}\n`);
  const machine = await Machine.boot({
    ...(opts.trace === undefined ? {} : { trace: opts.trace }),
    onConsole: (domid, name, text) => {
      if (!opts.json) printer.write(domid, name, text);
    },
    uplinks: opts.uplinks,
    bridges: opts.bridges,
    ...(opts.seed === undefined ? {} : {
      sim: {
        seed: opts.seed,
        faults,
        onFault: (f) => opts.json || process.stderr.write(`xenpv: fault at step ${f.step} (${f.timeMs.toFixed(3)} ms): ${f.kind} ${f.detail}\n`),
      },
    }),
  });
  // Under the deterministic runner, a world where nothing can run any more never will: a deadlock.
  const stuck = new AbortController();
  machine.sim?.onIdle(() => stuck.abort());
  const results: Result[] = [];
  let sim: SimSummary | null = null;
  try {
    const created: { spec: DomainSpec; domid: number }[] = [];
    for (const spec of specs) {
      try {
        created.push({ spec, domid: await machine.create(spec) });
      } catch (err) {
        const code = err instanceof XenError ? err.code : 'EIO';
        results.push({ name: spec.name, domid: null, exit: { reason: `create failed: ${code}` }, console: '' });
        if (!opts.json) process.stderr.write(`xenpv: ${spec.name}: ${(err as Error).message}\n`);
      }
    }
    const deadline = opts.durationS === undefined ? stuck.signal : AbortSignal.any([stuck.signal, AbortSignal.timeout(opts.durationS * 1000)]);
    for (const { spec, domid } of created) {
      let exit: DomainExit;
      // A restarted guest (on_reboot/on_crash = restart) runs on under a new domid.
      let current = domid;
      try {
        exit = await machine.waitExit(current, deadline);
        while (exit.restartedAs !== undefined) exit = await machine.waitExit((current = exit.restartedAs), deadline);
      } catch {
        await machine.destroy(current).catch(() => undefined);
        exit = { domid: current, name: spec.name, reason: stuck.signal.aborted ? 'deadlock' : 'destroyed', console: '' };
      }
      if (!opts.json) printer.flush(domid, spec.name);
      results.push({ name: spec.name, domid, exit: { reason: exit.reason }, console: exit.console });
    }
    if (machine.sim !== null) sim = simSummary(machine.sim, faults);
  } finally {
    await machine.stop();
  }
  if (opts.json) process.stdout.write(JSON.stringify(sim === null ? { domains: results } : { domains: results, sim }, null, 2) + '\n');
  else for (const r of results) process.stdout.write(`${r.name} (domid ${r.domid ?? '-'}): ${r.exit.reason}\n`);
  if (sim !== null && !opts.json) {
    process.stdout.write(`xenpv: seed ${sim.seed}: ${sim.steps} steps, ${sim.virtualMs} ms virtual, ${sim.faultCount} faults, digest ${sim.digest}\n`);
  }
  return results.every((r) => r.exit.reason === 'poweroff') ? 0 : 1;
}
