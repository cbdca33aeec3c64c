// The vCPU's idle: the wake word's three states, the kick that notifies only
// a vCPU that announced its sleep, and the haltpoll window that lets the
// work of the last upcall run while it polls. Wake-ups cross real threads.

import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import t from 'tap';
import { D, Domain, HOST_AWAKE, VCPU_WAKE, WAKE_IDLE, WAKE_KICKED, WAKE_SLEEPING, newControlBlock } from '../lib/hypervisor/domain.js';
import { kickVcpu } from '../lib/hypervisor/evtchn.js';
import { PAGE_SIZE } from '../lib/hypervisor/page.js';
import { CpuPressure, Vcpu } from '../lib/hypervisor/vcpu.js';

function domain(host: Int32Array | null = null): Domain {
  const d = new Domain(1, newControlBlock(), new SharedArrayBuffer(PAGE_SIZE), 0, host);
  d.ctl[D.maxVcpus] = 1;
  return d;
}

/** Keep the event loop alive through timed sleeps (a waitAsync alone does not; a domain's thread has its own timer). */
function keepAlive(t: { teardown(fn: () => void): void }): void {
  const timer = setInterval(() => undefined, 1000);
  t.teardown(() => clearInterval(timer));
}

/** A host block with its awake count. */
function hostBlock(): Int32Array {
  return new Int32Array(new SharedArrayBuffer(64));
}

/** A thread that sleeps in Atomics.wait on the word while it holds `expect`, and says how the wait ended. */
function sleeper(ctl: Int32Array, word: number, expect: number, timeoutMs: number): { waiting: Promise<void>; ended: Promise<string> } {
  const src = `const { parentPort, workerData: w } = require('node:worker_threads');
    parentPort.postMessage('waiting');
    parentPort.postMessage(Atomics.wait(new Int32Array(w.sab), w.word, w.expect, w.timeoutMs));`;
  const worker = new Worker(src, { eval: true, workerData: { sab: ctl.buffer, word, expect, timeoutMs } });
  let waiting: () => void = () => undefined;
  const started = new Promise<void>((resolve) => (waiting = resolve));
  const ended = new Promise<string>((resolve, reject) => {
    worker.on('message', (m: string) => {
      if (m === 'waiting') waiting();
      else resolve(m);
    });
    worker.once('error', reject);
  });
  return { waiting: started, ended };
}

/**
 * The kick of the two tests below, once the sleeper said it is about to
 * wait and 20 ms more have passed: a fixed delay from the worker's creation
 * lost the race on a loaded machine (the worker took longer to start).
 */
async function kickWhenWaiting(d: Domain, s: { waiting: Promise<void> }): Promise<void> {
  await s.waiting;
  await new Promise((resolve) => setTimeout(resolve, 20));
  kickVcpu(d, 0);
}

t.test('a kick before the halt ends it at once, without sleeping, and is consumed', async (t) => {
  const d = domain();
  const vcpu = new Vcpu(d, 0);
  const w = d.vcpuWord(0, VCPU_WAKE);
  kickVcpu(d, 0);
  t.equal(Atomics.load(d.ctl, w), WAKE_KICKED);
  await vcpu.halt();
  t.equal(vcpu.slept, 0, 'no sleep');
  t.equal(Atomics.load(d.ctl, w), WAKE_IDLE, 'the kick is consumed');
});

t.test('a polling vCPU kicked before every halt still gives the event loop a turn', async (t) => {
  // Timers and messages must still run while events keep coming.
  const d = domain();
  const vcpu = new Vcpu(d, 0, { haltPollMaxUs: 200 });
  let turned = false;
  setImmediate(() => (turned = true));
  const end = performance.now() + 50;
  let halts = 0;
  while (!turned && performance.now() < end) {
    kickVcpu(d, 0);
    await vcpu.halt();
    halts++;
  }
  t.ok(turned, `a macrotask ran within 50 ms (${halts} halts)`);
  t.equal(vcpu.slept, 0, 'and the vCPU never slept');
});

t.test('a vCPU asleep in waitAsync is woken by a kick from another thread', async (t) => {
  const d = domain();
  const vcpu = new Vcpu(d, 0, { haltPollMaxUs: 0 });
  const w = d.vcpuWord(0, VCPU_WAKE);
  const halted = vcpu.halt(5000);
  t.equal(Atomics.load(d.ctl, w), WAKE_SLEEPING, 'the sleep is announced');
  const src = `const { workerData: w } = require('node:worker_threads');
    const ctl = new Int32Array(w.sab);
    if (Atomics.exchange(ctl, w.word, ${WAKE_KICKED}) === ${WAKE_SLEEPING}) Atomics.notify(ctl, w.word);`;
  const kicker = new Worker(src, { eval: true, workerData: { sab: d.control, word: w } });
  const t0 = performance.now();
  await halted;
  t.ok(performance.now() - t0 < 4000, 'woken, not timed out');
  t.equal(vcpu.slept, 1);
  t.equal(Atomics.load(d.ctl, w), WAKE_IDLE);
  await new Promise((resolve) => kicker.once('exit', resolve));
});

t.test('a kick of a vCPU that did not announce a sleep sets the word and wakes no thread', async (t) => {
  const d = domain();
  const w = d.vcpuWord(0, VCPU_WAKE);
  // A thread waiting on the word while it reads IDLE sees the change only if someone notifies.
  for (let attempt = 0; attempt < 5; attempt++) {
    Atomics.store(d.ctl, w, WAKE_IDLE);
    const s = sleeper(d.ctl, w, WAKE_IDLE, 300);
    await kickWhenWaiting(d, s);
    const how = await s.ended;
    if (how === 'not-equal') continue; // the kick came before the wait began; try again
    t.equal(how, 'timed-out', 'no notify for a vCPU that is not asleep');
    t.equal(Atomics.load(d.ctl, w), WAKE_KICKED);
    return;
  }
  t.fail('the waiting thread never got to wait');
});

t.test('a kick of a vCPU that announced its sleep notifies', async (t) => {
  const d = domain();
  const w = d.vcpuWord(0, VCPU_WAKE);
  for (let attempt = 0; attempt < 5; attempt++) {
    Atomics.store(d.ctl, w, WAKE_SLEEPING);
    const s = sleeper(d.ctl, w, WAKE_SLEEPING, 5000);
    await kickWhenWaiting(d, s);
    const how = await s.ended;
    if (how === 'not-equal') continue; // the kick came before the wait began; try again
    t.equal(how, 'ok');
    return;
  }
  t.fail('the waiting thread never got to wait');
});

t.test('while it polls, the vCPU lets promise continuations run; the one that kicks ends the halt', async (t) => {
  const d = domain();
  // No event-loop turn before the poll: the continuations can only run inside it. And no giving up on a pause.
  const vcpu = new Vcpu(d, 0, { eventLoopTurnMs: Infinity, preemptedGapUs: Infinity, haltPollMaxUs: 200_000 });
  vcpu.pollLimitUs = 200_000; // a window far longer than the continuations take
  let hops = 0;
  const chain = (async () => {
    for (; hops < 200; hops++) await null;
    kickVcpu(d, 0);
  })();
  const t0 = performance.now();
  await vcpu.halt();
  const took = performance.now() - t0;
  await chain;
  t.equal(hops, 200);
  t.ok(took < 100, `the halt ended with the kick, not with the window (${took.toFixed(1)} ms)`);
  t.equal(vcpu.polled, 1, 'the poll saw the kick');
  t.equal(vcpu.slept, 0);
});

t.test('the host counts awake vCPUs: a sleep leaves the count, the kick that wakes puts it back at once, an ended thread leaves it', async (t) => {
  keepAlive(t);
  const host = hostBlock();
  const d = domain(host);
  const vcpu = new Vcpu(d, 0, { haltPollMaxUs: 0, pressureFile: null });
  t.equal(Atomics.load(host, HOST_AWAKE), 1, 'a vCPU starts awake');
  const halted = vcpu.halt(5000);
  t.equal(Atomics.load(host, HOST_AWAKE), 0, 'asleep');
  kickVcpu(d, 0);
  t.equal(Atomics.load(host, HOST_AWAKE), 1, 'counted by the kick, before the woken thread runs');
  await halted;
  t.equal(Atomics.load(host, HOST_AWAKE), 1, 'counted once');
  await vcpu.halt(1);
  t.equal(Atomics.load(host, HOST_AWAKE), 1, 'a sleep that timed out is awake again');
  d.vcpusGone();
  t.equal(Atomics.load(host, HOST_AWAKE), 0, 'the ended thread holds no CPU');
  d.vcpusGone();
  t.equal(Atomics.load(host, HOST_AWAKE), 0, 'and is taken out once');
});

/** Halt `n` times with no kick: each polls its window (1 ms) and then sleeps 1 ms. */
async function idleHalts(vcpu: Vcpu, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    vcpu.pollLimitUs = 1000;
    await vcpu.halt(1);
  }
}

t.test('windows that run out while every awake vCPU has a CPU do not stop polling; with the CPUs full, two do', async (t) => {
  keepAlive(t);
  const opts = { haltPollMaxUs: 20_000, preemptedGapUs: Infinity, eventLoopTurnMs: Infinity, cpus: 2, pressureFile: null };
  const host = hostBlock();
  const free = new Vcpu(domain(host), 0, opts);
  await idleHalts(free, 4);
  t.equal(free.ranOut, 4, 'each halt polled its window');
  t.equal(free.backoffs, 0, 'and polling went on');

  const full = hostBlock();
  Atomics.add(full, HOST_AWAKE, 2); // two other vCPUs run: with this one, three on two CPUs
  const crowded = new Vcpu(domain(full), 0, opts);
  await idleHalts(crowded, 4);
  t.equal(crowded.backoffs, 1, 'two windows that ran out stopped polling');
  t.equal(crowded.ranOut, 2, 'and the halts after them did not poll');

  const alone = new Vcpu(domain(null), 0, opts);
  await idleHalts(alone, 4);
  t.equal(alone.backoffs, 1, 'without a host count a CPU is never known to be free');
});

t.test('on free CPUs the window grows past haltPollMaxUs, up to haltPollFreeMaxUs; on full ones idling that long shrinks it', async (t) => {
  keepAlive(t);
  // Each halt idles its window and then 10 ms: within the free limit, past the other.
  const opts = { haltPollMaxUs: 2000, haltPollFreeMaxUs: 50_000, preemptedGapUs: Infinity, eventLoopTurnMs: Infinity, cpus: 2, pressureFile: null };
  const free = new Vcpu(domain(hostBlock()), 0, opts);
  for (let i = 0; i < 8; i++) await free.halt(10);
  t.ok(free.pollLimitUs > 2000, `the window grew to ${free.pollLimitUs} µs`);
  t.ok(free.pollLimitUs <= 50_000);
  t.equal(free.backoffs, 0, 'windows that ran out on free CPUs did not stop polling');
  const full = hostBlock();
  Atomics.add(full, HOST_AWAKE, 2);
  const crowded = new Vcpu(domain(full), 0, opts);
  crowded.pollLimitUs = 400_000;
  const t0 = performance.now();
  await crowded.halt(0);
  const took = performance.now() - t0;
  t.ok(took < 200, `the poll stopped at haltPollMaxUs (2 ms), not at its 400 ms window (${took.toFixed(1)} ms)`);
  for (let i = 0; i < 9; i++) await crowded.halt(10);
  t.ok(crowded.pollLimitUs <= 2000, `and idling 10 ms shrank the window (${crowded.pollLimitUs} µs)`);
});

t.test('on free CPUs a gap in the poll\'s clock does not stop polling; on full ones it does', async (t) => {
  keepAlive(t);
  // A gap of 1 µs: every look at the clock finds one.
  const opts = { haltPollMaxUs: 20_000, preemptedGapUs: 1, eventLoopTurnMs: Infinity, cpus: 2, pressureFile: null };
  const free = new Vcpu(domain(hostBlock()), 0, opts);
  await idleHalts(free, 2);
  t.equal(free.preempted, 0);
  t.equal(free.backoffs, 0);
  const full = hostBlock();
  Atomics.add(full, HOST_AWAKE, 2);
  const crowded = new Vcpu(domain(full), 0, opts);
  await idleHalts(crowded, 2);
  t.equal(crowded.preempted, 1, 'taken for being descheduled');
  t.equal(crowded.backoffs, 1, 'and polling stopped at once');
});

t.test('a poll that began with a CPU free ends when another vCPU wakes and fills the CPUs', async (t) => {
  keepAlive(t);
  const host = hostBlock();
  const d = domain(host);
  const vcpu = new Vcpu(d, 0, { haltPollMaxUs: 200_000, preemptedGapUs: Infinity, eventLoopTurnMs: Infinity, cpus: 1, pressureFile: null });
  vcpu.pollLimitUs = 200_000;
  const other = domain(host);
  const wakeOther = (async () => {
    for (let i = 0; i < 100; i++) await null;
    other.setAwake(0, 1); // one CPU, two awake
  })();
  const t0 = performance.now();
  await vcpu.halt(1);
  const took = performance.now() - t0;
  await wakeOther;
  t.equal(vcpu.contended, 1, 'the poll ended as contended');
  t.equal(vcpu.slept, 1, 'and the vCPU slept');
  t.ok(took < 100, `long before its window ran out (${took.toFixed(1)} ms)`);
});

t.test('CPU pressure: high when tasks waited for a CPU more than a quarter of the time since the last look', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-psi-'));
  t.teardown(() => rmSync(dir, { recursive: true }));
  const file = join(dir, 'cpu');
  const write = (totalUs: number): void =>
    writeFileSync(file, `some avg10=0.00 avg60=0.00 avg300=0.00 total=${totalUs}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n`);
  const pause = (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 110));
  write(1_000_000);
  const p = new CpuPressure(file);
  t.equal(p.high(), false, 'the first look has nothing to compare');
  await pause();
  write(1_000_500); // 0.5 ms of waiting in 110 ms or more
  t.equal(p.high(), false, 'a little waiting is not pressure');
  await pause();
  write(11_000_500); // 10 s of waiting: more than a quarter of any pause a loaded machine gives us
  t.equal(p.high(), true);
  const fds = (): number => readdirSync('/proc/self/fd').length;
  const before = fds();
  const readers = Array.from({ length: 50 }, () => new CpuPressure(file));
  for (const r of readers) r.high();
  t.equal(fds(), before, 'a reader keeps no descriptor open (vCPU threads end, the process stays)');
  t.equal(new CpuPressure(join(dir, 'missing')).high(), false, 'no file: never high');
  t.equal(new CpuPressure(null).high(), false, 'not asked: never high');
});
