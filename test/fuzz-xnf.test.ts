// `xenpv fuzz backend --device xnf`: a seeded hostile network backend against
// a real xnf, the whole host in one thread, the guest's other vif on a real
// netback beside it. A long pass must break no invariant and reach every
// kind of attack; a seed must replay exactly.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { fuzzXnf } from '../lib/fuzz/xnf.js';

const cli = fileURLToPath(new URL('../lib/cli/main.js', import.meta.url));

t.test('50,000 seeded steps against xnf break no invariant and reach every attack', async (t) => {
  const r = await fuzzXnf({ seed: 20261130, steps: 50_000 });
  t.same(r.violations, [], 'no invariant broken');
  t.equal(r.steps, 50_000);
  const malice = [
    'tx id never issued', 'tx id answered twice', 'tx junk status', 'tx NULL unasked', 'tx rsp_prod ahead', 'tx rsp_prod back',
    'rx id not its slot', 'rx past the page', 'rx junk status', 'rx too many slots', 'rx too long', 'rx bad extra', 'rx bad GSO',
    'rx rsp_prod ahead', 'tx grant kept mapped',
  ];
  for (const action of ['send', 'answer', 'late', 'deliver', 'storm', 'unplug', ...malice]) t.ok((r.actions[action] ?? 0) > 0, `the run included ${action}`);
  const made = malice.reduce((n, a) => n + (r.actions[a] ?? 0), 0);
  t.equal(r.ringBreaks, made, 'every malicious answer broke the interface');
  const broken = Object.entries(r.refusals).filter(([k]) => k.startsWith('broken: ')).reduce((n, [, v]) => n + v, 0);
  t.equal(broken, made, 'each with a reason');
  for (const why of ['grant of tx buffer N still in use by the backend', 'NETIF_RSP_NULL with no extra slot outstanding', 'rx frame of more than N slots']) {
    t.ok((r.refusals[`broken: ${why}`] ?? 0) > 0, why);
  }
  t.ok(Object.keys(r.actions).some((a) => /^episode sg.* split.* untrusted/.test(a)), 'an episode with sg, split channels, untrusted');
});

t.test('a seed replays exactly; another seed is another run', async (t) => {
  const a = await fuzzXnf({ seed: 42, steps: 2000 });
  const b = await fuzzXnf({ seed: 42, steps: 2000 });
  const c = await fuzzXnf({ seed: 43, steps: 2000 });
  t.same(a.violations, []);
  t.equal(a.digest, b.digest);
  t.same(a.actions, b.actions);
  t.same(a.refusals, b.refusals);
  t.not(a.digest, c.digest);
});

t.test('xenpv fuzz backend --device xnf: seed printed, the digest replays from the CLI', async (t) => {
  const args = ['fuzz', 'backend', '--device', 'xnf', '--seed', '7', '--steps', '300'];
  const ok = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' });
  t.equal(ok.status, 0, ok.stderr);
  t.match(ok.stdout, /seed 7, 300 steps/);
  t.match(ok.stdout, /no invariant broken/);
  const json = spawnSync(process.execPath, [cli, ...args, '--json'], { encoding: 'utf8' });
  const report = JSON.parse(json.stdout) as { seed: number; digest: string };
  t.equal(report.seed, 7);
  t.match(ok.stdout, report.digest, 'the same seed gives the same digest from the CLI');
});
