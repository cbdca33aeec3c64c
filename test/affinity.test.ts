// vCPU affinity: xl's CPU-list syntax, the `cpus` key of a domain config, and
// real threads pinned by Linux. A host booted with dom0 on one CPU and a guest
// on another: their threads (new threads of this process, whose affinity and
// CPU are read from /proc, not from xenpv) may run only there, and run there; `vcpu-pin` moves a running guest
// and frees it again; a CPU the host lacks is refused and changes nothing; a
// crashed, preserved domain has no thread left to pin.

import t from 'tap';
import fc from 'fast-check';
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { formatCpuList, hostCpus, parseCpuList } from '../lib/hypervisor/affinity.js';
import { XenError } from '../lib/errors.js';
import { Machine } from '../lib/machine.js';
import { D } from '../lib/hypervisor/domain.js';

const dir = mkdtempSync(join(tmpdir(), 'xenpv-affinity-'));

function failure(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return err instanceof XenError ? err.message : String(err);
  }
  return 'no error';
}

async function rejection(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return err instanceof XenError ? err.message : String(err);
  }
  return 'no error';
}

t.test('CPU lists in xl syntax', async (t) => {
  t.same(parseCpuList('3'), [3]);
  t.same(parseCpuList('0-3,^2'), [0, 1, 3]);
  t.same(parseCpuList(' 5 , 1-2 '), [1, 2, 5]);
  t.same(parseCpuList('all'), hostCpus());
  t.same(parseCpuList('0-63,^1-63'), [0]);
  t.equal(formatCpuList([0, 1, 2, 5, 7, 8]), '0-2,5,7-8');
  t.match(failure(() => parseCpuList('')), /EINVAL: cpus "": empty/);
  t.match(failure(() => parseCpuList('1,')), /empty CPU list or list entry/);
  t.match(failure(() => parseCpuList('3-1')), /range "3-1" runs backwards/);
  t.match(failure(() => parseCpuList('64')), /CPU 64 is above 63/);
  t.match(failure(() => parseCpuList('two')), /"two" is not a CPU/);
  t.match(failure(() => parseCpuList('-1')), /"-1" is not a CPU/);
  t.match(failure(() => parseCpuList('1,^1')), /names no CPU/);
  // Any set survives formatting and parsing back.
  t.doesNotThrow(() => fc.assert(fc.property(fc.uniqueArray(fc.integer({ min: 0, max: 63 }), { minLength: 1 }), (cpus) => {
    const sorted = [...cpus].sort((a, b) => a - b);
    return String(parseCpuList(formatCpuList(sorted))) === String(sorted);
  }), { numRuns: 500 }), 'any set survives formatting and parsing');
});

t.test('cpus in a domain config', async (t) => {
  const cfg = (name: string, line: string): string => {
    const file = join(dir, `${name}.cfg`);
    writeFileSync(file, `name = "${name}"\nkernel = "k.mjs"\n${line}\n`);
    return file;
  };
  t.same(loadDomainConfig(cfg('a', 'cpus = "0-1,^0"')).cpus, [1]);
  t.same(loadDomainConfig(cfg('b', 'cpus = 0')).cpus, [0]);
  t.equal(loadDomainConfig(cfg('c', '')).cpus, undefined);
  t.match(failure(() => loadDomainConfig(cfg('d', 'cpus = ["0", "1"]'))), /ECONFIG: .*d\.cfg:3: cpus: a domain's vCPUs share one thread/);
  t.match(failure(() => loadDomainConfig(cfg('e', 'cpus = "0-x"'))), /ECONFIG: .*e\.cfg:3: cpus "0-x": "0-x" is not a CPU/);
});

/** Thread ids of this process. */
function tids(): Set<number> {
  return new Set(readdirSync('/proc/self/task').map(Number));
}

/** Where Linux lets thread `tid` run, and the CPU it last ran on. */
function linux(tid: number): { allowed: number[]; cpu: number } {
  const allowed = /^Cpus_allowed_list:\s*(\S+)$/m.exec(readFileSync(`/proc/self/task/${tid}/status`, 'utf8'))![1]!;
  const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
  return { allowed: parseCpuList(allowed, 4096), cpu: Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[36]) };
}

async function until(what: string, fn: () => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const twoCpus = { skip: hostCpus().length < 2 ? 'needs two CPUs' : false };

t.test('dom0 and a guest run on the CPUs they were given; vcpu-pin moves the guest', twoCpus, async (t) => {
  const cpus = hostCpus();
  const [first, last] = [cpus[0]!, cpus[cpus.length - 1]!];
  // A guest that wakes every 2 ms to do some work, so Linux keeps placing it.
  const kernel = join(dir, 'busy.mjs');
  // It also says how many CPUs its vCPU counts for haltpoll (hostCpus) and what the pinned thread's own affinity gives.
  const affinityJs = new URL('../lib/hypervisor/affinity.js', import.meta.url).href;
  writeFileSync(kernel, `import { hostCpus } from '${affinityJs}';
  import { availableParallelism } from 'node:os';
  export async function main(guest) {
    setInterval(() => { let x = 0; for (let i = 0; i < 1e5; i++) x += i; }, 2);
    guest.print('cpus ' + hostCpus().length + ' thread ' + availableParallelism() + '\\n');
    await new Promise(() => {});
  }\n`);
  writeFileSync(join(dir, 'crash.mjs'), `export async function main() { throw new Error('guest bug'); }\n`);

  const before = tids();
  let consoleText = '';
  const m = await Machine.boot({ dom0Cpus: [first], onConsole: (_domid, _name, text) => (consoleText += text) });
  t.teardown(() => m.stop());
  // The thread id each domain's thread published (D.threadId); Node gives its threads no names to tell them apart by.
  const threadOf = (domid: number): number => Atomics.load(m.host.domain(domid).ctl, D.threadId);
  const dom0 = threadOf(0);
  t.ok(!before.has(dom0) && tids().has(dom0), 'dom0 is a new thread of this process');
  t.same(linux(dom0).allowed, [first], 'dom0 may run only on its CPU');

  const seen = tids();
  const spec = { name: 'busy', memoryMiB: 16, vcpus: 1, kernel, extra: '', onPoweroff: 'destroy', onReboot: 'destroy', onCrash: 'destroy' } as const;
  const domid = await m.create({ ...spec, cpus: [last] });
  // The thread publishes its id once its start's pin is done.
  await until('the guest thread starts', () => threadOf(domid) !== 0);
  const tid = threadOf(domid);
  t.ok(!seen.has(tid) && tids().has(tid), 'the guest is a new thread of this process');
  t.same(linux(tid).allowed, [last], 'pinned as it started');
  await until('the guest runs on its CPU', () => linux(tid).cpu === last);
  t.match((await m.vcpuList()).find((r) => r.domid === domid), { cpus: [last], allowed: [last] });
  await until('the guest reports', () => consoleText.includes('cpus '));
  // A vCPU that counted its own thread's CPUs would think the host has one, and never poll (the bug this guards).
  t.match(consoleText, `cpus ${cpus.length} thread 1`, 'a pinned vCPU still counts every CPU of the host');

  await m.vcpuPin(domid, [first]);
  t.same(linux(tid).allowed, [first], 'vcpu-pin moved it');
  await until('the guest runs on the new CPU', () => linux(tid).cpu === first);

  t.match(await rejection(m.vcpuPin(domid, [63])), /EINVAL: cpus: CPU 63 is not one this host may run on/);
  t.same(linux(tid).allowed, [first], 'a refused pin changes nothing');
  t.match((await m.vcpuList()).find((r) => r.domid === domid), { cpus: [first] });

  await m.vcpuPin(domid, null);
  t.same(linux(tid).allowed, cpus, 'unpinned: every CPU of the host');
  t.match((await m.vcpuList()).find((r) => r.domid === domid), { cpus: null, allowed: cpus });
  // A set naming every CPU ("all") is the same as no pin.
  await m.vcpuPin(domid, [first]);
  await m.vcpuPin(domid, parseCpuList('all'));
  t.same(linux(tid).allowed, cpus, '"all" frees the thread');
  t.match((await m.vcpuList()).find((r) => r.domid === domid), { cpus: null, allowed: cpus }, 'and records no set');

  t.match(await rejection(m.create({ ...spec, name: 'nowhere', cpus: [63] })), /EINVAL: cpus: CPU 63/);

  // A crashed, preserved domain: its thread is gone, and so is its id.
  const crashed = await m.create({ ...spec, name: 'crasher', kernel: join(dir, 'crash.mjs'), onCrash: 'preserve', cpus: [last] });
  for (let i = 0; (await m.list()).find((r) => r.domid === crashed)?.state !== '----c-'; i++) {
    if (i === 1000) throw new Error('the crash was not preserved');
    await new Promise((r) => setTimeout(r, 10));
  }
  // The thread's exit comes after the crash is reported.
  await until('the thread is gone', () => m.host.placement(crashed).cpu === null);
  t.match(m.host.placement(crashed), { cpus: [last], allowed: null, cpu: null });
  await m.vcpuPin(crashed, [first]);
  t.match(m.host.placement(crashed), { cpus: [first], allowed: null }, 'the set is kept; no thread to move');
});
