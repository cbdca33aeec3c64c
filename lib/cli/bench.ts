// `xenpv bench` (and `npm run bench`): every figure of the benchmark in one
// invocation, each the median of RUNS runs made here and now, next to the
// limits of this runtime and the peers a Node program would otherwise use,
// so that the targets are ratios within one run on one machine. The
// measurements live in bench/; this file runs them, prints the table,
// evaluates the targets and writes the JSON.

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release, tmpdir, totalmem, type } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { XenError } from '../errors.js';
import { CpuPressure, PRESSURE_FILE } from '../hypervisor/vcpu.js';
import { atomicsPingPong, memcpyLimit, ringLimit } from '../../bench/limits.js';
import { fioRandRead, makeDataFile, messagePort, readSyncRandom } from '../../bench/peers.js';
import { runPair } from '../../bench/ring.js';
import { evtchnPingPong } from '../../bench/evtchn.js';
import { xenstoreBench } from '../../bench/xenstore.js';
import { BLOCK_LOADS, blockBench } from '../../bench/block.js';
import { scaleBench } from '../../bench/scale.js';
import { NET_METRICS, NET_PENDING, netBench } from '../../bench/net.js';

const RUNS = 3;
const RUN_MS = 1000;
const QUICK_RUN_MS = 250;
/**
 * How long the network, block and xenstore loads run before their first
 * measured run. Each domain is an isolate of its own that compiles its hot
 * paths while the load runs, on compiler threads that share the two CPUs
 * with the busy domains: on a machine where that takes long, the rate was
 * still climbing for two to three seconds (bench/profile.ts net 64, ten runs
 * of 700 ms: 0.46, 0.70, 0.69, 0.74, 0.72, 0.79, 0.79 ... Mpps), and a short
 * warm-up made the first of three runs, and sometimes the median, a figure
 * of code not yet compiled.
 */
const WARMUP_MS = 3000;
const QUICK_WARMUP_MS = 200;
/** The file the file-backed disk serves and the fs/fio peers read: page-cached, data in every block. */
const DATA_FILE_BYTES = 64 << 20;

export type Metric = { name: string; value: number | null; unit: string; runs: number[]; note?: string };
export type TargetResult = { target: string; value: number | null; bound: number | null; pass: boolean | null; note?: string };
export type MachineInfo = {
  cpu: string; cores: number; node: string; os: string; memoryGiB: number; date: string;
  /** 1, 5 and 15 minute load averages when the run started and ended: other work skews the figures. */
  loadStart: number[]; loadEnd: number[];
  /**
   * The share of the half second before the run in which some task waited
   * for a CPU (Linux PSI, /proc/pressure/cpu "some"); null where the kernel
   * has no PSI. Under a VM it also shows the host taking the CPUs away,
   * which the load average does not.
   */
  cpuPressure: number | null;
};
export type BenchReport = { machine: MachineInfo; runs: number; runMs: number; metrics: Metric[]; targets: TargetResult[] };

/** Every metric: its unit and what it measures, in the order of the table. */
const CATALOG: readonly (readonly [name: string, unit: string, what: string])[] = [
  ['limit.ring.64.mpps', 'Mpps', 'bare SharedArrayBuffer ring between two workers, 64-byte packets'],
  ['limit.ring.1500.gbps', 'Gbit/s', 'the same ring, 1500-byte packets'],
  ['limit.ring.65536.gbps', 'Gbit/s', 'the same ring, 64 KiB packets'],
  ['limit.memcpy.65536.gbps', 'Gbit/s', 'one thread copying 64 KiB'],
  ['limit.atomics.pingpong.p50.us', 'us', 'Atomics.notify/wait round trip between two workers, median'],
  ['limit.atomics.pingpong.p99.us', 'us', 'the same, 99th percentile'],
  ['peer.messageport.1500.gbps', 'Gbit/s', 'postMessage of a copied 1500-byte Uint8Array'],
  ['peer.messageport.batch64.1500.gbps', 'Gbit/s', 'postMessage of 64 copied 1500-byte Uint8Arrays'],
  ['peer.fs.readsync.randread4k.iops', 'IOPS', 'fs.readSync, random 4 KiB, the disk file'],
  ['peer.fio.psync.randread4k.iops', 'IOPS', 'fio psync, random 4 KiB, the disk file'],
  ['peer.fio.libaio.randread4k.qd32.iops', 'IOPS', 'fio libaio QD32, random 4 KiB, the disk file'],
  ['ring.xen.roundtrip.mops', 'Mop/s', 'request+response through lib/xen/ring.ts between two domains'],
  ['net.g2g.64.mpps', 'Mpps', 'guest to guest through netback and the bridge, 64-byte frames'],
  ['net.g2g.1500.gbps', 'Gbit/s', 'guest to guest, 1500-byte frames'],
  ['net.g2g.65536.gbps', 'Gbit/s', 'guest to guest, 64 KiB with SG/GSO'],
  ['net.g2d.1500.gbps', 'Gbit/s', 'guest to a dom0 sink, 1500-byte frames'],
  ['evtchn.pingpong.p50.us', 'us', 'event channel round trip between two guests, median'],
  ['evtchn.pingpong.p99.us', 'us', 'the same, 99th percentile'],
  ['block.null.randread4k.iops', 'IOPS', 'guest disks(), null storage, random 4 KiB reads, QD32'],
  ['block.memory.randread4k.iops', 'IOPS', 'memory storage, random 4 KiB reads, QD32'],
  ['block.memory.randwrite4k.iops', 'IOPS', 'memory storage, random 4 KiB writes, QD32'],
  ['block.file.randread4k.iops', 'IOPS', 'page-cached file, random 4 KiB reads, QD32'],
  ['block.file.randwrite4k.iops', 'IOPS', 'page-cached file, random 4 KiB writes, QD32'],
  ['block.file.seqread1m.mbps', 'MB/s', 'page-cached file, sequential 1 MiB reads'],
  ['block.file.seqwrite1m.mbps', 'MB/s', 'page-cached file, sequential 1 MiB writes'],
  ['xenstore.ring.read.ops', 'ops/s', "a guest's xs.read over its ring, many outstanding"],
  ['xenstore.ring.write.ops', 'ops/s', "a guest's xs.write over its ring, many outstanding"],
  ['xenstore.socket.read.ops', 'ops/s', 'READ over the unix socket, 16 outstanding'],
  ['scale.boot1.ms', 'ms', 'create to every device Connected, one guest with a vbd'],
  ['scale.boot32.s', 's', '32 guests at once, each with a vbd'],
  ['scale.rss_per_guest.mb', 'MiB', 'resident memory per running guest'],
];

/** A target: `metric` <= or >= `factor` x `of` (a metric of the same run) or a fixed `bound`. */
type Target = { metric: string; op: '>=' | '<='; bound?: number; factor?: number; of?: string };

const TARGETS: readonly Target[] = [
  { metric: 'net.g2g.1500.gbps', op: '>=', factor: 0.4, of: 'limit.ring.1500.gbps' },
  { metric: 'net.g2g.1500.gbps', op: '>=', factor: 4, of: 'peer.messageport.batch64.1500.gbps' },
  { metric: 'net.g2g.64.mpps', op: '>=', bound: 1.0 },
  { metric: 'net.g2g.65536.gbps', op: '>=', factor: 0.5, of: 'limit.ring.65536.gbps' },
  { metric: 'block.memory.randread4k.iops', op: '>=', bound: 1_000_000 },
  { metric: 'block.file.randread4k.iops', op: '>=', factor: 0.5, of: 'peer.fio.psync.randread4k.iops' },
  { metric: 'xenstore.ring.read.ops', op: '>=', bound: 200_000 },
  { metric: 'evtchn.pingpong.p50.us', op: '<=', factor: 1.5, of: 'limit.atomics.pingpong.p50.us' },
  { metric: 'scale.boot32.s', op: '<=', bound: 10 },
];

type Ctx = { runs: number; ms: number; warmupMs: number; file: string; progress: (what: string) => void };
/** A suite's runs per metric; a metric it could not measure gets a note instead. */
type SuiteResult = { runs: Record<string, number[]>; notes?: Record<string, string> };
type Suite = { name: string; metrics: readonly string[]; run: (ctx: Ctx) => Promise<SuiteResult> };

async function repeat(runs: number, f: () => Promise<number> | number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < runs; i++) out.push(await f());
  return out;
}

// A ratio's two halves are measured as close together as the suites allow
// (the bare ring right before the network, fio right before the block
// loads): on a VM the rates drift between minutes, and a ratio of figures
// taken a minute apart measures the drift as much as xenpv.
const SUITES: readonly Suite[] = [
  {
    name: 'limits',
    metrics: CATALOG.map(([n]) => n).filter((n) => n.startsWith('limit.')),
    run: async ({ runs, ms }) => {
      const r: Record<string, number[]> = {};
      r['limit.ring.64.mpps'] = await repeat(runs, async () => (await ringLimit(64, ms)).pps / 1e6);
      r['limit.ring.1500.gbps'] = await repeat(runs, async () => (await ringLimit(1500, ms)).gbps);
      r['limit.ring.65536.gbps'] = await repeat(runs, async () => (await ringLimit(65536, ms)).gbps);
      r['limit.memcpy.65536.gbps'] = await repeat(runs, () => memcpyLimit(65536, ms / 2));
      const pings: { p50Us: number; p99Us: number }[] = [];
      for (let i = 0; i < runs; i++) pings.push(await atomicsPingPong(ms));
      r['limit.atomics.pingpong.p50.us'] = pings.map((p) => p.p50Us);
      r['limit.atomics.pingpong.p99.us'] = pings.map((p) => p.p99Us);
      return { runs: r };
    },
  },
  {
    name: 'net',
    metrics: NET_METRICS,
    run: async ({ runs, ms, warmupMs }) => {
      const r = await netBench(runs, ms, warmupMs);
      if (r === null) return { runs: {}, notes: Object.fromEntries(NET_METRICS.map((n) => [n, NET_PENDING])) };
      return { runs: r };
    },
  },
  {
    name: 'evtchn',
    metrics: ['evtchn.pingpong.p50.us', 'evtchn.pingpong.p99.us'],
    run: async ({ runs, ms }) => {
      const pings: { p50Us: number; p99Us: number }[] = [];
      for (let i = 0; i < runs; i++) pings.push(await evtchnPingPong(ms));
      return { runs: { 'evtchn.pingpong.p50.us': pings.map((p) => p.p50Us), 'evtchn.pingpong.p99.us': pings.map((p) => p.p99Us) } };
    },
  },
  {
    name: 'peers',
    metrics: CATALOG.map(([n]) => n).filter((n) => n.startsWith('peer.')),
    run: async ({ runs, ms, file }) => {
      const r: Record<string, number[]> = {};
      const notes: Record<string, string> = {};
      r['peer.messageport.1500.gbps'] = await repeat(runs, async () => (await messagePort(1500, 1, ms)).gbps);
      r['peer.messageport.batch64.1500.gbps'] = await repeat(runs, async () => (await messagePort(1500, 64, ms)).gbps);
      r['peer.fs.readsync.randread4k.iops'] = await repeat(runs, () => readSyncRandom(file, DATA_FILE_BYTES, ms));
      for (const [name, engine, depth] of [['peer.fio.psync.randread4k.iops', 'psync', 1], ['peer.fio.libaio.randread4k.qd32.iops', 'libaio', 32]] as const) {
        const got = await repeat(runs, async () => (await fioRandRead(file, engine, depth, ms)) ?? NaN);
        if (got.some(Number.isNaN)) notes[name] = 'skipped: fio is not installed';
        else r[name] = got;
      }
      return { runs: r, notes };
    },
  },
  {
    name: 'block',
    metrics: BLOCK_LOADS.map(([n]) => n),
    run: async ({ runs, ms, warmupMs, file }) => ({ runs: await blockBench(file, runs, ms, warmupMs) }),
  },
  {
    name: 'ring',
    metrics: ['ring.xen.roundtrip.mops'],
    run: async ({ runs, ms }) => {
      const count = Math.max(50_000, ms * 1000);
      const mops = await repeat(runs, async () => {
        const r = await runPair(count);
        if (r.front.error !== null || r.back.error !== null) throw new Error(`ring: ${r.front.error ?? r.back.error}`);
        return count / r.front.elapsedMs / 1000;
      });
      return { runs: { 'ring.xen.roundtrip.mops': mops } };
    },
  },
  {
    name: 'xenstore',
    metrics: ['xenstore.ring.read.ops', 'xenstore.ring.write.ops', 'xenstore.socket.read.ops'],
    run: async ({ runs, ms, warmupMs }) => {
      const r = await xenstoreBench(runs, ms, warmupMs);
      return { runs: { 'xenstore.ring.read.ops': r.ringRead, 'xenstore.ring.write.ops': r.ringWrite, 'xenstore.socket.read.ops': r.socketRead } };
    },
  },
  {
    name: 'scale',
    metrics: ['scale.boot1.ms', 'scale.boot32.s', 'scale.rss_per_guest.mb'],
    run: async ({ runs }) => {
      const r = await scaleBench(runs);
      return { runs: { 'scale.boot1.ms': r.boot1Ms, 'scale.boot32.s': r.boot32S, 'scale.rss_per_guest.mb': r.rssPerGuestMiB } };
    },
  },
];

export function median(xs: readonly number[]): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/** Three significant digits, or a whole number with separators from 1000 up. */
export function formatValue(v: number | null): string {
  if (v === null || !Number.isFinite(v)) return '-';
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString('en-US');
  return Number(v.toPrecision(3)).toString();
}

function targetName(t: Target): string {
  return t.of === undefined ? `${t.metric} ${t.op} ${formatValue(t.bound ?? null)}` : `${t.metric} ${t.op} ${t.factor} x ${t.of}`;
}

/** Each target against the metrics of this run: pass, fail, or null with why it could not be judged. */
export function evaluateTargets(metrics: readonly Metric[]): TargetResult[] {
  const value = (name: string): Metric | undefined => metrics.find((m) => m.name === name);
  return TARGETS.map((t) => {
    const m = value(t.metric);
    const base = t.of === undefined ? undefined : value(t.of);
    const bound = t.of === undefined ? (t.bound ?? null) : base?.value == null ? null : base.value * (t.factor ?? 1);
    const v = m?.value ?? null;
    const r: TargetResult = { target: targetName(t), value: v, bound, pass: null };
    if (v === null || bound === null) {
      r.note = m?.note ?? base?.note ?? 'not measured';
      return r;
    }
    r.pass = t.op === '>=' ? v >= bound : v <= bound;
    return r;
  });
}

async function machineInfo(): Promise<MachineInfo> {
  return {
    cpu: cpus()[0]?.model ?? 'unknown', cores: cpus().length, node: process.version, os: `${type()} ${release()}`,
    memoryGiB: Math.round((totalmem() / (1 << 30)) * 10) / 10, date: new Date().toISOString(),
    loadStart: loadavg().map((l) => Math.round(l * 100) / 100), loadEnd: [],
    cpuPressure: await cpuPressure(PRESSURE_SAMPLE_MS),
  };
}

const PRESSURE_SAMPLE_MS = 500;

/** The share of the next `ms` in which some task waited for a CPU (read as the vCPUs read it). */
async function cpuPressure(ms: number): Promise<number | null> {
  const psi = new CpuPressure(PRESSURE_FILE);
  const a = psi.totalUs();
  const t0 = performance.now();
  await new Promise((resolve) => setTimeout(resolve, ms));
  const b = psi.totalUs();
  if (a < 0 || b < 0) return null;
  return Math.round(((b - a) / ((performance.now() - t0) * 1000)) * 1000) / 1000;
}

export type BenchOptions = { quick: boolean; only: string[] | undefined; progress: (line: string) => void };

/** Run the suites (those with a metric matching `only`, when given) and evaluate the targets. */
export async function runBench(opts: BenchOptions): Promise<BenchReport> {
  const machine = await machineInfo();
  const ms = opts.quick ? QUICK_RUN_MS : RUN_MS;
  const wanted = (name: string): boolean => opts.only === undefined || opts.only.some((p) => name.startsWith(p));
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-bench-'));
  const file = join(dir, 'disk.img');
  const got = new Map<string, { runs: number[]; note?: string }>();
  try {
    // Only the peers and the block suite read the data file.
    if (SUITES.some((x) => (x.name === 'peers' || x.name === 'block') && x.metrics.some(wanted))) makeDataFile(file, DATA_FILE_BYTES);
    for (const suite of SUITES) {
      if (!suite.metrics.some(wanted)) continue;
      opts.progress(`bench: ${suite.name}`);
      const t0 = performance.now();
      try {
        const r = await suite.run({ runs: RUNS, ms, warmupMs: opts.quick ? QUICK_WARMUP_MS : WARMUP_MS, file, progress: opts.progress });
        for (const [name, runs] of Object.entries(r.runs)) got.set(name, { runs });
        for (const [name, note] of Object.entries(r.notes ?? {})) got.set(name, { runs: [], note });
      } catch (err) {
        for (const name of suite.metrics) got.set(name, { runs: [], note: `error: ${(err as Error).message.split('\n')[0]}` });
      }
      opts.progress(`bench: ${suite.name} done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const metrics: Metric[] = CATALOG.filter(([name]) => wanted(name)).map(([name, unit]) => {
    const g = got.get(name) ?? { runs: [], note: 'not measured' };
    const m: Metric = { name, value: median(g.runs), unit, runs: g.runs.map((v) => Number(v.toPrecision(6))) };
    if (m.value !== null) m.value = Number(m.value.toPrecision(6));
    if (g.note !== undefined) m.note = g.note;
    return m;
  });
  machine.loadEnd = loadavg().map((l) => Math.round(l * 100) / 100);
  return { machine, runs: RUNS, runMs: ms, metrics, targets: evaluateTargets(metrics) };
}

/** The table: one metric a line, then the targets. */
export function formatReport(r: BenchReport): string {
  const m = r.machine;
  const lines = [
    `xenpv bench: ${m.cores} x ${m.cpu}, ${m.memoryGiB} GiB, node ${m.node}, ${m.os}, ${m.date}`,
    `load average ${m.loadStart.join(' ')} at start, ${m.loadEnd.join(' ')} at end; ` +
      `CPU pressure before the run ${m.cpuPressure === null ? 'unknown' : `${Math.round(m.cpuPressure * 100)}%`}; ` +
      `each value the median of ${r.runs} runs of ${r.runMs} ms`,
    '',
    `${'metric'.padEnd(38)} ${'value'.padStart(12)}  ${'unit'.padEnd(7)} runs`,
  ];
  for (const x of r.metrics) {
    const runs = x.note ?? x.runs.map(formatValue).join(' ');
    lines.push(`${x.name.padEnd(38)} ${formatValue(x.value).padStart(12)}  ${x.unit.padEnd(7)} ${runs}`);
  }
  lines.push('', 'targets');
  for (const t of r.targets) {
    const verdict = t.pass === null ? '----' : t.pass ? 'PASS' : 'FAIL';
    const detail = t.pass === null ? (t.note ?? '') : `${formatValue(t.value)} vs ${formatValue(t.bound)}`;
    lines.push(`  ${verdict}  ${t.target.padEnd(72)} ${detail}`);
  }
  return lines.join('\n') + '\n';
}

const DEFAULT_OUT = 'xenpv-bench.json';

/** `xenpv bench [--json] [--quick] [--out FILE] [--only PREFIX,...]`. */
export async function bench(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      json: { type: 'boolean', default: false },
      quick: { type: 'boolean', default: false },
      out: { type: 'string' },
      only: { type: 'string' },
    },
  });
  if (positionals.length > 0) throw new XenError('EINVAL', `bench: unexpected ${positionals.join(' ')}`);
  const only = values.only?.split(',').map((s) => s.trim()).filter((s) => s !== '');
  if (only !== undefined && only.length === 0) throw new XenError('EINVAL', 'bench: --only needs a metric name prefix');
  if (only !== undefined && !only.some((p) => CATALOG.some(([n]) => n.startsWith(p)))) {
    throw new XenError('EINVAL', `bench: no metric starts with ${only.join(' or ')}`);
  }
  const out = resolve(values.out ?? DEFAULT_OUT);
  const report = await runBench({ quick: values.quick === true, only, progress: (line) => process.stderr.write(`${line}\n`) });
  writeFileSync(out, JSON.stringify(report, null, 2) + '\n');
  if (values.json === true) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
  else process.stdout.write(formatReport(report));
  process.stderr.write(`bench: wrote ${out}\n`);
  return 0;
}
