// `xenpv run --seed N` with two guests that take their addresses over DHCP
// from dom0's server (`--dhcp`): the same seed gives the same digest, run
// after run, and while another thread keeps a core busy. The guests load
// nothing of DHCP themselves (test/fixtures/dhcp-guest.ts): the client is
// what `ip=dhcp` brings, so every module it needs must be loaded inside a
// step of the schedule, never in real time beside it. The runs preload a
// module loader hook (test/fixtures/loader-hook.ts), as coverage tools and
// TypeScript loaders do, which moves module resolution to another thread.

import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { seeds } from './sim-harness.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const cli = join(root, 'dist/lib/cli/main.js');
const hook = join(root, 'dist/test/fixtures/loader-hook.js');
const image = join(root, 'dist/test/fixtures/dhcp-guest.js');
const dir = mkdtempSync(join(tmpdir(), 'xenpv-sim-dhcp-'));
const RUNS = 4;

const cfgs = [['dg-a', '00:16:3e:00:0e:0a'], ['dg-b', '00:16:3e:00:0e:0b']].map(([name, mac]) => {
  const file = join(dir, `${name}.cfg`);
  writeFileSync(file, `name = "${name}"\nmemory = 32\nkernel = "${image}"\nextra = "ip=dhcp"\nvif = [ 'mac=${mac}, bridge=xenbr0' ]\n`);
  return { name: name!, mac: mac!, file };
});

type Run = { status: number | null; stdout: string; stderr: string; digest: string | undefined };

/** One `xenpv run --seed` of both guests, as its own process. */
function run(seed: number): Promise<Run> {
  const args = ['--import', hook, cli, 'run', '--seed', String(seed), '--dhcp', 'xenbr0=10.0.0.100-10.0.0.199', ...cfgs.map((c) => c.file)];
  const child = spawn(process.execPath, args, { env: { ...process.env, DEBUG: '' } });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const timer = setTimeout(() => child.kill(), 60_000);
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (status) => {
      clearTimeout(timer);
      const digest = /^xenpv: seed \d+: \d+ steps, [\d.]+ ms virtual, \d+ faults, digest ([0-9a-f]{64})$/m.exec(stdout)?.[1];
      resolve({ status, stdout, stderr, digest });
    });
  });
}

/** Both guests leased distinct addresses from dom0's server and powered off. */
function leased(t: Test, r: Run, what: string): void {
  t.equal(r.status, 0, `${what}: ${r.stdout}${r.stderr}`);
  const addresses = cfgs.map((c) => {
    const m = new RegExp(`^${c.name}: xnf0 ${c.mac}: (10\\.0\\.0\\.1\\d\\d)/24 from 10\\.0\\.0\\.1$`, 'm').exec(r.stdout);
    return m?.[1];
  });
  t.ok(addresses.every((a) => a !== undefined) && addresses[0] !== addresses[1], `${what}: leases ${addresses.join(', ')}`);
}

/** A thread that keeps a core busy until terminated. */
function burner(): Worker {
  return new Worker('for (;;) Math.sqrt(Math.random());', { eval: true });
}

const quiet = new Map<number, string>();

t.test('a seeded run of two DHCP guests replays: the same digest every time', async (t) => {
  for (const seed of seeds([3, 8])) {
    const digests = new Set<string | undefined>();
    for (let i = 0; i < RUNS; i++) {
      const r = await run(seed);
      leased(t, r, `seed ${seed} run ${i + 1}`);
      digests.add(r.digest);
    }
    t.same([...digests].map((d) => d !== undefined), [true], `seed ${seed}: one digest in ${RUNS} runs: ${[...digests].join(' ')}`);
    quiet.set(seed, [...digests][0]!);
  }
});

t.test('and the same digest while another thread keeps a core busy', async (t) => {
  const w = burner();
  t.teardown(() => w.terminate());
  for (const seed of seeds([3, 8])) {
    for (let i = 0; i < RUNS; i++) {
      const r = await run(seed);
      leased(t, r, `busy, seed ${seed} run ${i + 1}`);
      t.equal(r.digest, quiet.get(seed), `busy, seed ${seed} run ${i + 1}: the quiet runs' digest`);
    }
  }
});
