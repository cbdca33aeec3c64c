// `xenpv run`: one host for the length of a command. Guests' console lines
// are printed as they arrive, prefixed with the guest's name; with --json a
// summary is printed at the end instead. With --seed the host runs under the
// deterministic runner: the run replays from its seed, and ends with the
// seed and a digest to compare replays by. Meanwhile a status line shows
// each guest's device counters (not under --seed: sampling would be part of
// the run), and at the end a table shows them as each guest left them.

import { loadDomainConfig } from '../backends/xlcfg.js';
import type { DomainExit, DomainSpec } from '../backends/toolstack.js';
import { XenError } from '../errors.js';
import { Machine } from '../machine.js';
import type { BridgeSetup } from '../backends/dom0.js';
import type { FaultKind, FaultRecord, SimRunner } from '../sim/sim.js';
import type { DeviceStats } from '../backends/toolstack.js';
import { StatusLine, deviceTable, type GuestStatus } from './status.js';

/** How often the status line samples dom0's counters. */
const STATUS_INTERVAL_MS = 500;

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

type Result = { name: string; domid: number | null; exit: { reason: string }; console: string; devices: DeviceStats[] };

/** What a deterministic run reports: enough to replay it and to compare the replay. */
type SimSummary = { seed: number; faults: FaultKind[]; steps: number; virtualMs: number; digest: string; faultCount: number; injected: FaultRecord[] };

function simSummary(sim: SimRunner, faults: FaultKind[]): SimSummary {
  return { seed: sim.seed, faults, steps: sim.steps, virtualMs: Math.round(sim.timeMs() * 1000) / 1000, digest: sim.digest(), faultCount: sim.faultCount, injected: sim.faults };
}

/** Splits console text into whole lines per guest, so prefixes land at line starts. */
class LinePrinter {
  private readonly partial = new Map<number, string>();
  status: StatusLine | null = null;

  write(domid: number, name: string, text: string): void {
    const lines = ((this.partial.get(domid) ?? '') + text).split('\n');
    this.partial.set(domid, lines.pop() ?? '');
    this.print(lines.map((line) => `${name}: ${line}\n`).join(''));
  }

  flush(domid: number, name: string): void {
    const rest = this.partial.get(domid);
    if (rest !== undefined && rest !== '') this.print(`${name}: ${rest}\n`);
    this.partial.delete(domid);
  }

  /** Lines above the status line. */
  private print(text: string): void {
    if (text === '') return;
    this.status?.clear();
    process.stdout.write(text);
    this.status?.draw();
  }
}

/** Sample dom0's counters for the status line until the signal fires. */
function sampleStatus(machine: Machine, status: StatusLine, signal: AbortSignal): void {
  let busy = false;
  const timer = setInterval(() => {
    if (busy) return;
    busy = true;
    machine.top().then((rows) => status.update(rows), () => undefined).finally(() => (busy = false));
  }, STATUS_INTERVAL_MS);
  signal.addEventListener('abort', () => clearInterval(timer), { once: true });
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
  const guests: GuestStatus[] = specs.map((s) => ({ name: s.name, domid: null, exit: null, devices: [] }));
  const status = opts.json || opts.seed !== undefined ? null : new StatusLine(process.stderr, guests);
  printer.status = status;
  const sampling = new AbortController();
  if (status !== null) sampleStatus(machine, status, sampling.signal);
  try {
    const created: { spec: DomainSpec; domid: number; status: GuestStatus }[] = [];
    for (const [i, spec] of specs.entries()) {
      try {
        const domid = await machine.create(spec);
        guests[i]!.domid = domid;
        created.push({ spec, domid, status: guests[i]! });
      } catch (err) {
        const code = err instanceof XenError ? err.code : 'EIO';
        guests[i]!.exit = `create failed: ${code}`;
        results.push({ name: spec.name, domid: null, exit: { reason: `create failed: ${code}` }, console: '', devices: [] });
        if (!opts.json) process.stderr.write(`xenpv: ${spec.name}: ${(err as Error).message}\n`);
      }
    }
    const deadline = opts.durationS === undefined ? stuck.signal : AbortSignal.any([stuck.signal, AbortSignal.timeout(opts.durationS * 1000)]);
    for (const { spec, domid, status: g } of created) {
      const exit = await waitGuest(machine, spec.name, g, deadline, stuck.signal);
      if (!opts.json) printer.flush(domid, spec.name);
      g.exit = exit.reason;
      g.devices = exit.devices ?? [];
      results.push({ name: spec.name, domid, exit: { reason: exit.reason }, console: exit.console, devices: g.devices });
    }
    if (machine.sim !== null) sim = simSummary(machine.sim, faults);
  } finally {
    sampling.abort();
    status?.done();
    await machine.stop();
  }
  if (opts.json) process.stdout.write(JSON.stringify(sim === null ? { domains: results } : { domains: results, sim }, null, 2) + '\n');
  else printSummary(results, guests);
  if (sim !== null && !opts.json) {
    process.stdout.write(`xenpv: seed ${sim.seed}: ${sim.steps} steps, ${sim.virtualMs} ms virtual, ${sim.faultCount} faults, digest ${sim.digest}\n`);
  }
  const failed = results.filter((r) => r.exit.reason !== 'poweroff');
  if (failed.length > 0 && !opts.json) process.stderr.write(`xenpv: ${failed.map((r) => `${r.name}: ${r.exit.reason}`).join(', ')} (every guest must power off)\n`);
  return failed.length === 0 ? 0 : 1;
}

/**
 * A guest's end: its exit, following it through restarts (on_reboot or
 * on_crash = restart run it on under a new domid); at the deadline it is
 * destroyed ('destroyed', or 'deadlock' when the simulation is stuck).
 */
async function waitGuest(machine: Machine, name: string, g: GuestStatus, deadline: AbortSignal, stuck: AbortSignal): Promise<DomainExit> {
  let current = g.domid!;
  try {
    let exit = await machine.waitExit(current, deadline);
    while (exit.restartedAs !== undefined) exit = await machine.waitExit((g.domid = current = exit.restartedAs), deadline);
    return exit;
  } catch {
    await machine.destroy(current).catch(() => undefined);
    // The destroy reports the devices' last counters; a stuck simulation is not asked again.
    const gone = machine.sim === null ? await machine.waitExit(current, AbortSignal.timeout(5000)).catch(() => null) : null;
    return { domid: current, name, reason: stuck.aborted ? 'deadlock' : 'destroyed', console: '', devices: gone?.devices ?? g.devices };
  }
}

/** Each guest's exit, then the table of its devices. */
function printSummary(results: Result[], guests: GuestStatus[]): void {
  for (const r of results) process.stdout.write(`${r.name} (domid ${r.domid ?? '-'}): ${r.exit.reason}\n`);
  const table = deviceTable(guests);
  if (table !== '') process.stdout.write(`\n${table}`);
}
