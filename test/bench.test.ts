// The benchmark harness: target evaluation from one run's metrics, and the
// command end to end on its cheapest metric (no timing is asserted: speed
// lives in the figures, never in tests).

import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { evaluateTargets, formatValue, median, type BenchReport, type Metric } from '../lib/cli/bench.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const cli = join(root, 'dist/lib/cli/main.js');

function metric(name: string, value: number | null, note?: string): Metric {
  return { name, value, unit: 'x', runs: value === null ? [] : [value], ...(note === undefined ? {} : { note }) };
}

t.test('median of an odd and an even count, and of nothing', async (t) => {
  t.equal(median([3, 1, 2]), 2);
  t.equal(median([4, 1, 3, 2]), 3);
  t.equal(median([]), null);
});

t.test('values print with three significant digits, thousands separated', async (t) => {
  t.equal(formatValue(0.012345), '0.0123');
  t.equal(formatValue(47.61), '47.6');
  t.equal(formatValue(1234567.8), '1,234,568');
  t.equal(formatValue(null), '-');
});

t.test('targets: fixed bounds, ratios to a metric of the same run, and what cannot be judged', async (t) => {
  const metrics = [
    metric('xenstore.ring.read.ops', 250_000),
    metric('evtchn.pingpong.p50.us', 10),
    metric('limit.atomics.pingpong.p50.us', 5),
    metric('block.file.randread4k.iops', 300_000),
    metric('peer.fio.psync.randread4k.iops', null, 'skipped: fio is not installed'),
    metric('net.g2g.64.mpps', null, 'pending: needs the netfront (xnf) and netback'),
  ];
  const byName = new Map(evaluateTargets(metrics).map((r) => [r.target, r]));
  t.match(byName.get('xenstore.ring.read.ops >= 200,000'), { pass: true, value: 250_000, bound: 200_000 });
  t.match(byName.get('evtchn.pingpong.p50.us <= 1.5 x limit.atomics.pingpong.p50.us'), { pass: false, value: 10, bound: 7.5 });
  t.match(byName.get('block.file.randread4k.iops >= 0.5 x peer.fio.psync.randread4k.iops'), { pass: null, note: 'skipped: fio is not installed' });
  t.match(byName.get('net.g2g.64.mpps >= 1'), { pass: null, note: /pending/ });
  t.match(byName.get('scale.boot32.s <= 10'), { pass: null, note: 'not measured' });
});

t.test('xenpv bench --quick --only limit.memcpy writes the report it prints', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-bench-test-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const out = join(dir, 'report.json');
  const r = spawnSync(process.execPath, [cli, 'bench', '--quick', '--only', 'limit.memcpy', '--json', '--out', out], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.status, 0, r.stderr);
  const report = JSON.parse(readFileSync(out, 'utf8')) as BenchReport;
  t.same(JSON.parse(r.stdout), report, '--json prints the report it wrote');
  t.match(report.machine, { cores: Number, node: process.version, date: String, cpu: String });
  // This machine has PSI: the share is a fraction, and the table says it.
  t.ok(report.machine.cpuPressure !== null && report.machine.cpuPressure >= 0 && report.machine.cpuPressure <= 1, `cpuPressure ${report.machine.cpuPressure}`);
  t.equal(report.metrics.length, 1);
  const m = report.metrics[0]!;
  t.equal(m.name, 'limit.memcpy.65536.gbps');
  t.equal(m.runs.length, 3, 'three runs');
  t.equal(m.value, median(m.runs), 'the value is their median');
  t.ok(m.value! > 0);
  t.equal(report.targets.length, 9, 'every target is listed, judged or not');
});

t.test('bench refuses an unknown metric prefix and stray arguments with EINVAL, status 2', async (t) => {
  for (const args of [['--only', 'nosuch'], ['extra']]) {
    const r = spawnSync(process.execPath, [cli, 'bench', ...args], { encoding: 'utf8', timeout: 30_000 });
    t.equal(r.status, 2, args.join(' '));
    t.match(r.stderr, /EINVAL/);
  }
});

t.test('the path benchmarks: CPU per unit after an unmeasured load, printed as median, min and every run', async (t) => {
  const { cpuNsPerUnit, describeNs } = await import('../bench/path-cpu.js');
  let loads = 0;
  const ns = await cpuNsPerUnit(async () => {
    loads++;
    let x = 0;
    for (let i = 0; i < 200_000; i++) x += Math.sqrt(i);
    t.ok(x > 0);
  }, 1000, 3);
  t.equal(loads, 4, 'one warm-up load, then one per run');
  t.equal(ns.length, 3);
  for (const v of ns) t.ok(v > 0, 'a load that computes costs CPU');
  t.equal(describeNs([1356.4, 1183, 1161.2]), 'median 1183, min 1161 (1356 1183 1161)');
  t.equal(describeNs([]), 'no runs');
});

t.test('the path benchmarks refuse a count that is not a whole number from 1 up with EINVAL', async (t) => {
  const { countOption } = await import('../bench/path-cpu.js');
  t.equal(countOption(undefined, 300_000, 'requests'), 300_000);
  t.equal(countOption('7', 5, 'runs'), 7);
  for (const bad of ['abc', '0', '-3', '1.5', '', '1e3', ' 4']) {
    t.throws(() => countOption(bad, 5, 'runs'), { code: 'EINVAL', message: /--runs/ }, JSON.stringify(bad));
  }
});
