// `xenpv fuzz frontend --device netback`: a seeded hostile netfront against a
// real netback, the whole host in one thread, a bystander's real xnf beside
// it. A long pass must break no invariant and reach every kind of attack; a
// seed must replay exactly.

import t from 'tap';
import { checkCli, checkReplay } from './fixtures/fuzz.js';
import { fuzzNetback } from '../lib/fuzz/netback.js';


t.test('50,000 seeded steps against netback break no invariant and reach every attack', async (t) => {
  const r = await fuzzNetback({ seed: 20261130, steps: 50_000 });
  t.same(r.violations, [], 'no invariant broken');
  t.equal(r.steps, 50_000);
  for (const action of ['tx', 'runt', 'mcast', 'rx', 'bad tx', 'bad rx', 'jump', 'flood', 'storm', 'reconnect', 'jump tx ahead', 'jump tx back', 'jump rx ahead']) {
    t.ok((r.actions[action] ?? 0) > 0, `the run included ${action}`);
  }
  for (const what of [
    'valid', 'valid with GSO', 'runt', 'mcast add', 'mcast del', 'too many slots', 'slot crosses its page', 'first slot crosses its page',
    'slot bigger than the frame', 'extra of type 0', 'extra of type >= MAX', 'GSO size 0', 'bad GSO type', 'too many extras',
    'packet cut at req_prod', 'first ref not granted', 'first ref out of the table', 'first ref granted to another domain', 'later ref not granted',
  ]) {
    t.ok((r.actions[`sent ${what}`] ?? 0) > 0, `sent ${what}`);
  }
  for (const what of ['ref read-only', 'ref granted to another domain', 'ref not granted', 'ref out of the table']) {
    t.ok((r.actions[`posted ${what}`] ?? 0) > 0, `posted an RX buffer with a ${what}`);
  }
  t.ok(Object.keys(r.actions).some((a) => /^connect split sg/.test(a)), 'connected with split channels and SG');
  for (const status of ['OKAY', 'NETIF_RSP_ERROR', 'rx OKAY']) t.ok((r.refusals[status] ?? 0) > 0, `answered ${status}`);
  const disabled = Object.entries(r.refusals).filter(([k]) => k.startsWith('disabled: ')).reduce((n, [, v]) => n + v, 0);
  t.equal(disabled, r.ringBreaks, 'every vif that broke the protocol was disabled with a reason');
  t.ok(r.refusals['disabled: a TX grant could not be copied'] !== undefined, 'a frame with a bad grant past its header disabled its vif');
});

t.test('a seed replays exactly; another seed is another run', async (t) => {
  await checkReplay(t, (seed) => fuzzNetback({ seed, steps: 2000 }));
});

t.test('xenpv fuzz frontend --device netback: seed printed, the digest replays from the CLI', async (t) => {
  checkCli(t, ['fuzz', 'frontend', '--device', 'netback'], 300);
});
