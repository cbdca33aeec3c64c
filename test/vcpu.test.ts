// The vCPU's idle: the wake word's three states, the kick that notifies only
// a vCPU that announced its sleep, and the haltpoll window that lets the
// work of the last upcall run while it polls. Wake-ups cross real threads.

import { Worker } from 'node:worker_threads';
import t from 'tap';
import { D, Domain, VCPU_WAKE, WAKE_IDLE, WAKE_KICKED, WAKE_SLEEPING, newControlBlock } from '../lib/hypervisor/domain.js';
import { kickVcpu } from '../lib/hypervisor/evtchn.js';
import { PAGE_SIZE } from '../lib/hypervisor/page.js';
import { Vcpu } from '../lib/hypervisor/vcpu.js';

function domain(): Domain {
  const d = new Domain(1, newControlBlock(), new SharedArrayBuffer(PAGE_SIZE));
  d.ctl[D.maxVcpus] = 1;
  return d;
}

/** A thread that sleeps in Atomics.wait on the word while it holds `expect`, and says how the wait ended. */
function sleeper(ctl: Int32Array, word: number, expect: number, timeoutMs: number): Promise<string> {
  const src = `const { parentPort, workerData: w } = require('node:worker_threads');
    parentPort.postMessage('waiting');
    parentPort.postMessage(Atomics.wait(new Int32Array(w.sab), w.word, w.expect, w.timeoutMs));`;
  const worker = new Worker(src, { eval: true, workerData: { sab: ctl.buffer, word, expect, timeoutMs } });
  return new Promise((resolve, reject) => {
    worker.on('message', (m: string) => {
      if (m !== 'waiting') resolve(m);
    });
    worker.once('error', reject);
  });
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
    const ended = sleeper(d.ctl, w, WAKE_IDLE, 300);
    await new Promise((resolve) => setTimeout(resolve, 50));
    kickVcpu(d, 0);
    const how = await ended;
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
    const ended = sleeper(d.ctl, w, WAKE_SLEEPING, 5000);
    await new Promise((resolve) => setTimeout(resolve, 50));
    kickVcpu(d, 0);
    const how = await ended;
    if (how === 'not-equal') continue; // the kick came before the wait began; try again
    t.equal(how, 'ok');
    return;
  }
  t.fail('the waiting thread never got to wait');
});

t.test('while it polls, the vCPU lets promise continuations run; the one that kicks ends the halt', async (t) => {
  const d = domain();
  // No event-loop turn before the poll: the continuations can only run inside it. And no giving up on a pause.
  const vcpu = new Vcpu(d, 0, { eventLoopTurnMs: Infinity, preemptedGapUs: Infinity });
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
