import t from 'tap';
import { checkCli, checkReplay, cli } from './fixtures/fuzz.js';
import { spawnSync } from 'node:child_process';
import { Xenstored } from '../lib/backends/xenstored.js';
import type { XsPerm } from '../lib/xenstore/wire.js';
import { fuzzXenstore } from '../lib/fuzz/xenstore.js';


t.test('50,000 seeded steps against xenstored break no invariant and reach every kind of refusal', async (t) => {
  const r = fuzzXenstore({ seed: 20261129, steps: 50_000 });
  t.same(r.violations, [], 'no invariant broken');
  t.equal(r.steps, 50_000);
  for (const mode of ['mixed', 'nodes', 'watches', 'tx', 'deaf', 'storm', 'garbage', 'probe', 'reconnect', 'reintroduce']) {
    t.ok((r.actions[mode] ?? 0) > 0, `the run included ${mode}`);
  }
  // Quotas (ENOSPC nodes/transactions, E2BIG watches), permissions (EACCES), XSA-352 (EPERM), bad requests (EINVAL).
  for (const code of ['ENOSPC', 'E2BIG', 'EACCES', 'EPERM', 'EINVAL', 'ENOENT']) t.ok((r.refusals[code] ?? 0) > 0, `xenstored refused with ${code}`);
  t.ok(r.ringBreaks > 0, 'malformed headers broke the ring and the domain was introduced again');
});

t.test('a seed replays exactly; another seed is another run', async (t) => {
  await checkReplay(t, (seed) => fuzzXenstore({ seed, steps: 5000 }));
});

/** xenstored with one check taken out, to see that the harness notices. */
class LeakyWatches extends Xenstored {
  override fireWatches(path: string, _perms: readonly (readonly XsPerm[])[], exact: boolean): void {
    super.fireWatches(path, [[{ domid: 0, perm: 'r' }]], exact);
  }
}

t.test('a xenstored that sends watch events without the read check (XSA-115) is caught', async (t) => {
  const r = fuzzXenstore({ seed: 1, steps: 20_000, makeXenstored: (limits) => new LeakyWatches({ limits }) });
  t.ok(r.violations.some((v) => /secret reached the attacker/.test(v.what)), 'the secret leaked through a watch event');
});

t.test('a xenstored that lets a guest past its node or watch quota is caught', async (t) => {
  const nodes = fuzzXenstore({ seed: 3, steps: 20_000, makeXenstored: (limits) => new Xenstored({ limits: { ...limits, maxNodes: 1e9 } }) });
  t.ok(nodes.violations.some((v) => /owns \d+ nodes/.test(v.what)), 'more nodes than the quota');
  const watches = fuzzXenstore({ seed: 3, steps: 20_000, makeXenstored: (limits) => new Xenstored({ limits: { ...limits, maxWatches: 1e9 } }) });
  t.ok(watches.violations.some((v) => /holds \d+ watches/.test(v.what)), 'more watches than the quota');
});

t.test('xenpv fuzz xenstore: seed printed, JSON report, bad arguments', async (t) => {
  checkCli(t, ['fuzz', 'xenstore'], 3000);
  for (const args of [['fuzz'], ['fuzz', 'nothing'], ['fuzz', 'xenstore', '--seed', '-1'], ['fuzz', 'xenstore', '--steps', 'x']]) {
    const bad = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' });
    t.equal(bad.status, 2, args.join(' '));
    t.match(bad.stderr, /EINVAL/);
  }
});
