// The host config: xenstored's quotas and dom0's CPUs from a JSON file,
// checked key by key, and the quotas in force for guests of a host booted
// with it (test/affinity.test.ts boots dom0 on its CPUs).

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadHostConfig } from '../lib/backends/hostcfg.js';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { XenError } from '../lib/errors.js';
import { Machine } from '../lib/machine.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const cli = join(root, 'dist/lib/cli/main.js');
const dir = mkdtempSync(join(tmpdir(), 'xenpv-hostcfg-'));

function file(name: string, text: string): string {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
}

function failure(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return err instanceof XenError ? `${err.code} ${err.message}` : String(err);
  }
  return 'no error';
}

t.test('a host config is read key by key', async (t) => {
  t.same(loadHostConfig(file('ok.json', '{"xenstored": {"maxNodes": 50, "maxWatches": 3}}')), { xenstored: { maxNodes: 50, maxWatches: 3 } });
  t.same(loadHostConfig(file('empty.json', '{}')), {});
  t.match(failure(() => loadHostConfig(file('a.json', '{"xenstore": {}}'))), /^ECONFIG .*a\.json: xenstore: unknown key/);
  t.match(failure(() => loadHostConfig(file('b.json', '{"xenstored": {"maxNodez": 5}}'))), /^ECONFIG .*b\.json: xenstored\.maxNodez: unknown key/);
  t.match(failure(() => loadHostConfig(file('c.json', '{"xenstored": {"maxNodes": 0}}'))), /^ECONFIG .*xenstored\.maxNodes: must be a whole number/);
  t.match(failure(() => loadHostConfig(file('d.json', '{"xenstored": {"maxNodes": "9"}}'))), /^ECONFIG .*xenstored\.maxNodes/);
  t.match(failure(() => loadHostConfig(file('e.json', '{"xenstored": '))), /^ECONFIG .*e\.json: not JSON/);
  t.match(failure(() => loadHostConfig(file('f.json', '[]'))), /^ECONFIG .*must be a JSON object/);
  t.match(failure(() => loadHostConfig(join(dir, 'missing.json'))), /^ENOENT/);
  t.same(loadHostConfig(file('g.json', '{"dom0": {"cpus": "0"}}')), { dom0Cpus: [0] });
  t.match(failure(() => loadHostConfig(file('h.json', '{"dom0": {"cpu": "0"}}'))), /^ECONFIG .*h\.json: dom0\.cpu: unknown key; known: cpus/);
  t.match(failure(() => loadHostConfig(file('i.json', '{"dom0": {"cpus": 0}}'))), /^ECONFIG .*dom0\.cpus: must be a CPU list/);
  t.match(failure(() => loadHostConfig(file('j.json', '{"dom0": {"cpus": "1-0"}}'))), /^ECONFIG .*dom0\.cpus: cpus "1-0": range "1-0" runs backwards/);
});

t.test('xenpv host start refuses a bad config before starting anything', async (t) => {
  const bad = file('bad.json', '{"xenstored": {"maxWatches": -1}}');
  const r = spawnSync(process.execPath, [cli, 'host', 'start', '--rundir', join(dir, 'run'), '--config', bad], { encoding: 'utf8' });
  t.equal(r.status, 2);
  t.match(r.stderr, /ECONFIG: .*bad\.json: xenstored\.maxWatches/);
});

t.test('a guest of a host booted with the config meets its node quota', async (t) => {
  const image = file('filler.mjs', `export async function main(guest) {
  let n = 0;
  try { for (; n < 100; n++) await guest.xenstore.write('data/n' + n, 'x'); }
  catch (err) { console.log('stopped at ' + n + ' with ' + err.code); }
}\n`);
  const cfg = file('filler.cfg', `name = "filler"\nmemory = 8\nkernel = "${image}"\n`);
  const m = await Machine.boot(loadHostConfig(file('small.json', '{"xenstored": {"maxNodes": 30}}')));
  t.teardown(() => m.stop());
  const exit = await m.waitExit(await m.create(loadDomainConfig(cfg)));
  const stopped = /stopped at (\d+) with (\w+)/.exec(exit.console);
  t.ok(stopped, exit.console);
  t.equal(stopped?.[2], 'ENOSPC');
  t.ok(Number(stopped?.[1]) > 0 && Number(stopped?.[1]) < 30, `the guest wrote ${stopped?.[1]} nodes, under the quota of 30 it shares with its own nodes`);
});
