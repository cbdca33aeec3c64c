// The deterministic runner (lib/sim): every domain in this thread under a
// seeded scheduler, in virtual time, with seeded faults. A seed replays its
// run exactly (the same digest, the same console bytes); other seeds run the
// domains in other orders to the same correct end; a fault-injected run still
// ends correctly; and a race that depends on the order (two guests committing
// xenstore transactions) comes out differently from seed to seed, each seed
// always the same way. XENPV_SEED=N replays one seed (test/sim-harness.ts).

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import type { DomainSpec } from '../lib/backends/toolstack.js';
import { Host } from '../lib/hypervisor/host.js';
import { Machine } from '../lib/machine.js';
import { SimRunner, parseFaults } from '../lib/sim/sim.js';
import { lines, runSim, seeds } from './sim-harness.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const cli = join(root, 'dist/lib/cli/main.js');
const helloCfg = join(root, 'examples/hello/hello.cfg');
const dir = mkdtempSync(join(tmpdir(), 'xenpv-sim-'));
const hello = (): DomainSpec => loadDomainConfig(helloCfg);

function cfg(name: string, body: string): string {
  const file = join(dir, `${name}.cfg`);
  writeFileSync(file, `name = "${name}"\nmemory = 32\n${body}\n`);
  return file;
}

const guestImage = join(root, 'dist/test/fixtures/sim-guest.js');
const simGuest = (mode: string): DomainSpec => loadDomainConfig(cfg(`sim-${mode}`, `kernel = "${guestImage}"\nextra = "mode=${mode}"`));

t.test('hello under the deterministic runner: a seed replays, other seeds reorder to the same end', async (t) => {
  const [first, again] = [await runSim([hello()], 1), await runSim([hello()], 1)];
  t.equal(first.exits[0]!.reason, 'poweroff');
  t.same(lines(first.exits[0]!), ['hello from domU 1', 'devices: none', 'name hello, extra "greeting=hello"']);
  t.equal(again.digest, first.digest, 'the same seed, the same digest');
  t.same(again.console, first.console, 'and the same console bytes in the same chunks');
  t.equal(again.steps, first.steps);
  const digests = new Set<string>();
  for (const seed of [2, 3, 4, 5, 6]) {
    const r = await runSim([hello()], seed);
    t.same(lines(r.exits[0]!), lines(first.exits[0]!), `seed ${seed}: the same output`);
    digests.add(r.digest);
  }
  t.ok(digests.size >= 4, `other seeds take other schedules (${digests.size} digests of 5)`);
});

/** A fresh 8 MiB image and the disk-pattern example's config pointing at it. */
function diskPattern(name: string): { spec: DomainSpec; file: string } {
  const file = join(dir, `${name}.img`);
  const fd = openSync(file, 'w');
  ftruncateSync(fd, 8 << 20);
  closeSync(fd);
  const image = join(root, 'examples/disk-pattern/disk-pattern.mjs');
  const spec = loadDomainConfig(cfg(name, `kernel = "${image}"\ndisk = ['format=raw, vdev=xvda, access=rw, target=${file}']`));
  return { spec, file };
}

/** Every sector n of the file holds n mod 251. */
function patternOk(file: string): boolean {
  const data = readFileSync(file);
  for (let s = 0; s < data.length / 512; s++) {
    const want = s % 251;
    for (let i = s * 512; i < (s + 1) * 512; i++) if (data[i] !== want) return false;
  }
  return true;
}

t.test('disk-pattern under the deterministic runner: verified, replayed, on the file byte for byte', async (t) => {
  const a = diskPattern('dp-a');
  const b = diskPattern('dp-b');
  const first = await runSim([a.spec], 11);
  const again = await runSim([b.spec], 11);
  for (const r of [first, again]) {
    t.equal(r.exits[0]!.reason, 'poweroff');
    t.match(r.exits[0]!.console, /verified 16384 sectors/);
  }
  t.equal(again.digest, first.digest, 'a replay on a fresh image is the same run');
  t.ok(patternOk(a.file) && patternOk(b.file), 'the pattern is on both files');
});

t.test('with faults injected (spurious events, delays, deschedules, vbd restarts) runs still end correctly and replay', async (t) => {
  const faults = parseFaults('all');
  const kinds = new Set<string>();
  for (const seed of seeds([1, 2, 3, 4])) {
    const { spec, file } = diskPattern(`dpf-${seed}`);
    const r = await runSim([spec], seed, { faults });
    t.equal(r.exits[0]!.reason, 'poweroff', `seed ${seed}: powered off`);
    t.match(r.exits[0]!.console, /verified 16384 sectors/, `seed ${seed}: verified after ${r.faults.length} faults`);
    t.ok(patternOk(file), `seed ${seed}: every sector on the file`);
    t.ok(r.faults.length > 0, `seed ${seed}: faults were injected`);
    for (const f of r.faults) kinds.add(f.kind);
    t.ok(r.faults.every((f, i) => i === 0 || f.step >= r.faults[i - 1]!.step), 'each fault logged with its step, in order');
    if (seed === 2) {
      const replay = await runSim([diskPattern('dpf-replay').spec], seed, { faults });
      t.equal(replay.digest, r.digest, 'a fault-injected run replays');
      t.same(replay.faults, r.faults, 'with the same faults at the same steps');
    }
  }
  if (process.env.XENPV_SEED === undefined) t.same([...kinds].sort(), ['delay', 'deschedule', 'spurious', 'vbd-restart'], 'every kind of fault struck');
});

t.test('two guests racing on xenstore transactions: EAGAIN under some seeds, not others; each seed replays its outcome', async (t) => {
  const image = join(root, 'dist/test/fixtures/xs-race.js');
  const race = (): DomainSpec[] => [
    loadDomainConfig(cfg('race-a', `kernel = "${image}"\nextra = "peer=2 rounds=2"`)),
    loadDomainConfig(cfg('race-b', `kernel = "${image}"\nextra = "peer=1 rounds=2"`)),
  ];
  const outcomes = new Map<number, { out: string; digest: string }>();
  for (const seed of seeds([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])) {
    const r = await runSim(race(), seed);
    t.same(r.exits.map((e) => e.reason), ['poweroff', 'poweroff']);
    outcomes.set(seed, { out: r.exits.map((e) => lines(e).join()).join(' | '), digest: r.digest });
  }
  const conflicted = [...outcomes].filter(([, o]) => o.out.includes('EAGAIN')).map(([s]) => s);
  const clean = [...outcomes].filter(([, o]) => !o.out.includes('EAGAIN')).map(([s]) => s);
  t.comment(`EAGAIN under seeds ${conflicted.join(' ')}; none under ${clean.join(' ')}`);
  if (process.env.XENPV_SEED === undefined) {
    t.ok(conflicted.length > 0, 'some seeds order the commits so that one conflicts');
    t.ok(clean.length > 0, 'some do not');
  }
  for (const seed of [conflicted[0], clean[0]]) {
    if (seed === undefined) continue;
    const r = await runSim(race(), seed);
    t.equal(r.exits.map((e) => lines(e).join()).join(' | '), outcomes.get(seed)!.out, `seed ${seed} replays its outcome`);
    t.equal(r.digest, outcomes.get(seed)!.digest);
  }
});

t.test('guests see virtual time and seeded entropy: a 10 s sleep takes no wall time, and replays read the same', async (t) => {
  const wall = performance.now();
  const a = await runSim([simGuest('clock')], 5);
  const b = await runSim([simGuest('clock')], 5);
  const c = await runSim([simGuest('clock')], 6);
  t.ok(performance.now() - wall < 20_000, 'three 10 s sleeps in well under their time');
  const out = lines(a.exits[0]!);
  t.match(out[0], /^date \d+ 2025-01-01T00:00:\d\d\.\d+Z perf \d+\.\d+$/, 'the virtual clock starts at 2025-01-01');
  t.match(out[2], /^slept 100\d\d ms$/, 'and moved 10 s in the sleep');
  t.same(lines(b.exits[0]!), out, 'the same seed reads the same time and the same random numbers');
  t.not(lines(c.exits[0]!)[1], out[1], 'another seed other random numbers');
  t.equal(Date.now() > Date.UTC(2025, 1, 1), true, 'the real clock is back after the run');
});

t.test('a paused domain does not run, timers included', async (t) => {
  const r = await runSim([simGuest('ticks')], 3, {
    during: async (m, [domid], out) => {
      // Virtual time: once it has ticked twice, hold it for a second, then let it go.
      while (!out.join('').includes('tick 1 ')) await new Promise((resolve) => setTimeout(resolve, 1));
      await m.pause(domid!, true);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      await m.pause(domid!, false);
    },
  });
  const at = lines(r.exits[0]!).map((l) => Number(/at (\d+)/.exec(l)?.[1]));
  t.equal(at.length, 6);
  const gaps = at.slice(1).map((x, i) => x - at[i]!);
  t.ok(gaps.some((g) => g >= 900), `one gap spans the pause (${gaps.join(' ')})`);
  t.ok(gaps.filter((g) => g < 100).length === 4, 'the others are a tick');
});

t.test('save and restore under the deterministic runner: the guest carries on, and the run replays', async (t) => {
  const once = async (): Promise<{ out: string[]; digest: string }> => {
    const out: string[] = [];
    const m = await Machine.boot({ sim: { seed: 9 }, onConsole: (_d, _n, text) => out.push(text) });
    try {
      const domid = await m.create(simGuest('count'));
      await new Promise((resolve) => setTimeout(resolve, 200));
      const file = join(dir, 'count.save');
      t.ok((await m.save(domid, file)).pages > 0);
      const { domid: again } = await m.restore(file);
      t.equal((await m.waitExit(again)).reason, 'poweroff');
      return { out, digest: m.sim!.digest() };
    } finally {
      await m.stop();
    }
  };
  const a = await once();
  const m = /^start 0\nstart (\d+)\ndone 50\n$/.exec(a.out.join(''));
  t.ok(m !== null && Number(m[1]) > 0 && Number(m[1]) < 50, `restored with the count it saved (${m?.[1]})`);
  t.equal((await once()).digest, a.digest, 'replayed');
});

t.test('one simulation owns the process at a time; a simulated host takes no rundir', async (t) => {
  await t.rejects(Machine.boot({ sim: { seed: 1 }, rundir: dir }), { code: 'EINVAL' });
  const m = await Machine.boot({ sim: { seed: 1 } });
  try {
    await t.rejects(Machine.boot({ sim: { seed: 2 } }), { code: 'EBUSY' });
  } finally {
    await m.stop();
  }
  t.ok(Date.now() > Date.UTC(2025, 1, 1), 'the real clock is back');
  const again = await Machine.boot({ sim: { seed: 2 } });
  await again.stop();
});

t.test('xenpv run --seed: prints the seed and a digest; the same seed prints the same run', (t) => {
  const run = (...args: string[]): { status: number | null; stdout: string; stderr: string } =>
    spawnSync(process.execPath, [cli, 'run', ...args], { encoding: 'utf8', timeout: 60_000 });
  const a = run(helloCfg, '--seed', '7');
  const b = run(helloCfg, '--seed', '7');
  t.equal(a.status, 0, a.stderr);
  t.match(a.stdout, /^xenpv: deterministic run, seed 7, faults none\n/);
  t.match(a.stdout, /hello: hello from domU 1\n/);
  t.match(a.stdout, /\nxenpv: seed 7: \d+ steps, [\d.]+ ms virtual, 0 faults, digest [0-9a-f]{64}\n$/);
  t.equal(b.stdout, a.stdout, 'a replay prints the same, digest included');
  const json = run(helloCfg, '--seed', '7', '--faults', 'delay,spurious', '--json');
  t.equal(json.status, 0, json.stderr);
  const summary = JSON.parse(json.stdout) as { domains: { exit: { reason: string } }[]; sim: { seed: number; faults: string[]; digest: string; injected: unknown[] } };
  t.equal(summary.domains[0]!.exit.reason, 'poweroff');
  t.same(summary.sim.faults, ['delay', 'spurious']);
  t.equal(summary.sim.seed, 7);
  t.match(summary.sim.digest, /^[0-9a-f]{64}$/);
  for (const bad of [['--seed', '-1'], ['--seed', 'x'], ['--seed', '4294967296'], ['--faults', 'all'], ['--seed', '1', '--faults', 'meteor']]) {
    const r = run(helloCfg, ...bad);
    t.equal(r.status, 2, bad.join(' '));
    t.match(r.stderr, /^xenpv: EINVAL/);
  }
  t.end();
});

t.test('xenpv run --seed reports a deadlock: a guest waits for what never comes', (t) => {
  const hang = cfg('hang', `kernel = "${guestImage}"\nextra = "mode=hang"`);
  const r = spawnSync(process.execPath, [cli, 'run', hang, '--seed', '1'], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.status, 1);
  t.match(r.stdout, /hang: waiting\n/);
  t.match(r.stdout, /hang \(domid 1\): deadlock\n/);
  t.end();
});

t.test('a Host under the deterministic runner: 2,000 events between two kernels, replayed', async (t) => {
  const kernel = new URL('./fixtures/evtchn-kernel.js', import.meta.url).href;
  const once = async (seed: number): Promise<{ echoes: number; digest: string; steps: number }> => {
    const sim = new SimRunner({ seed, faults: ['spurious', 'delay', 'deschedule'] });
    let pingId = -1;
    let host: Host | null = null;
    try {
      const echoes = await new Promise<number>((resolve) => {
        host = new Host({
          onMessage: (domid, m) => {
            const msg = m as { port?: number; echoes?: number };
            if (msg.port !== undefined) host!.post(pingId, { port: msg.port });
            if (domid === pingId && msg.echoes !== undefined) resolve(msg.echoes);
          },
        }, sim);
        const ping = host.createDomain({ name: 'ping', memoryMiB: 1 });
        const pong = host.createDomain({ name: 'pong', memoryMiB: 1 });
        pingId = ping.domid;
        host.start(pong.domid, kernel, { role: 'pong', peer: ping.domid, rounds: 2000 });
        host.start(ping.domid, kernel, { role: 'ping', peer: pong.domid, rounds: 2000 });
      });
      return { echoes, digest: sim.digest(), steps: sim.steps };
    } finally {
      await (host as Host | null)?.shutdown();
    }
  };
  const a = await once(42);
  const b = await once(42);
  t.equal(a.echoes, 2000, 'every event echoed, spurious ones and delays notwithstanding');
  t.equal(b.digest, a.digest, 'replayed');
  t.equal(b.steps, a.steps);
});
