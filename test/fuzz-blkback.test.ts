// `xenpv fuzz frontend --device blkback`: a seeded hostile frontend against a
// real blkback, the whole host in one thread. A long pass must break no
// invariant and reach every kind of attack; a seed must replay exactly; and a
// blkback with one check taken out must be caught.

import t from 'tap';
import { checkCli, checkReplay, cli } from './fixtures/fuzz.js';
import { spawnSync } from 'node:child_process';
import { Blkback, type BlkifRing } from '../lib/backends/blkback.js';
import { fuzzBlkback } from '../lib/fuzz/blkback.js';


t.test('50,000 seeded steps against blkback break no invariant and reach every attack', async (t) => {
  const r = await fuzzBlkback({ seed: 20261130, steps: 50_000 });
  t.same(r.violations, [], 'no invariant broken');
  t.equal(r.steps, 50_000);
  for (const action of ['io', 'malformed', 'indirect', 'flood', 'storm', 'jump', 'disconnect unserved', 'disconnect unread', 'disconnect half', 'reconnect']) {
    t.ok((r.actions[action] ?? 0) > 0, `the run included ${action}`);
  }
  for (const what of [
    'nr_segments > 11', 'nr_segments 0', 'first_sect > last_sect', 'last_sect > 7', 'past the end', 'sector 2^63', 'ref not granted',
    'ref out of the table', 'read into a read-only grant', 'ref granted to another domain', 'bad operation', 'indirect_op',
    'indirect nr_segments 0', 'indirect nr_segments > 256', 'indirect page not granted', 'indirect page granted to another domain',
    'indirect descriptors garbage', 'indirect descriptor bad', 'discard past the end', 'secure discard', 'read', 'write', 'flush',
    'barrier', 'discard', 'indirect read', 'indirect write',
  ]) {
    t.ok((r.actions[`sent ${what}`] ?? 0) > 0, `sent ${what}`);
  }
  t.ok(Object.keys(r.actions).some((a) => /^connect x86_32-abi order [12] queues [23]/.test(a)), 'connected with a 32-bit layout, several queues and pages');
  t.ok(Object.keys(r.actions).some((a) => / persistent$/.test(a)), 'connected with persistent grants');
  for (const status of ['OKAY', 'BLKIF_RSP_ERROR', 'BLKIF_RSP_EOPNOTSUPP']) t.ok((r.refusals[status] ?? 0) > 0, `answered ${status}`);
  t.equal(r.ringBreaks, r.actions['ring broken'], 'every req_prod jump stopped that ring');
  t.ok((r.refusals['port throttled'] ?? 0) > 0, 'event storms got the port held masked for a while');
});

t.test('a seed replays exactly; another seed is another run', async (t) => {
  await checkReplay(t, (seed) => fuzzBlkback({ seed, steps: 3000 }));
});

/** blkback with one check taken out: every segment mapped read-only, READs included. */
class ReadsIntoReadOnly extends Blkback {
  protected override mapSegments(r: BlkifRing, _write: boolean): string | null {
    return super.mapSegments(r, true);
  }
}

t.test('a blkback that reads into read-only grants is caught', async (t) => {
  const r = await fuzzBlkback({ seed: 5, steps: 2000, makeBlkback: (...args) => new ReadsIntoReadOnly(...args) });
  t.ok(r.violations.some((v) => /^allowed: read into a read-only grant/.test(v.what)), 'an OKAY it must not give');
  t.ok(r.violations.some((v) => /memory of buffer \d+ \(R\) changed/.test(v.what)), 'the read-only page changed');
});

t.test('xenpv fuzz frontend --device blkback: seed printed, JSON report, bad arguments', async (t) => {
  checkCli(t, ['fuzz', 'frontend', '--device', 'blkback'], 500);
  for (const bad of [['fuzz', 'frontend'], ['fuzz', 'frontend', '--device', 'nothing'], ['fuzz', 'backend', '--device', 'blkback']]) {
    const r = spawnSync(process.execPath, [cli, ...bad], { encoding: 'utf8' });
    t.equal(r.status, 2, bad.join(' '));
    t.match(r.stderr, /EINVAL/);
  }
});
