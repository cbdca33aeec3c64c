// `xenpv fuzz backend --device xnf`: a seeded hostile network backend against
// a real xnf, the whole host in one thread, the guest's other vif on a real
// netback beside it. A long pass must break no invariant and reach every
// kind of attack; a seed must replay exactly.

import t from 'tap';
import { checkCli, checkReplay } from './fixtures/fuzz.js';
import { fuzzXnf } from '../lib/fuzz/xnf.js';


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
  await checkReplay(t, (seed) => fuzzXnf({ seed, steps: 2000 }));
});

t.test('xenpv fuzz backend --device xnf: seed printed, the digest replays from the CLI', async (t) => {
  checkCli(t, ['fuzz', 'backend', '--device', 'xnf'], 300);
});
