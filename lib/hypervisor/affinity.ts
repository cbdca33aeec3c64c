// vCPU affinity (xl.cfg's `cpus`, `xl vcpu-pin`, Xen's dom0_vcpus_pin): the
// host CPUs a domain's thread may run on. A domain's vCPUs share one worker
// thread, so the set is the domain's. It lives in the control block as a
// mask (D.affinity, CPUs 0-63; 0 = every CPU, which is also what a set naming
// every CPU of the host is stored as) with the thread's Linux thread
// id (D.threadId). As it starts, the thread applies the mask, publishes its
// id, and reads the mask again; `xl vcpu-pin` writes the mask and then reads
// the id. Sequentially consistent atomics on both sides mean at least one of
// them sees the other's write and applies the new set, so a pin racing a
// start is not lost, and a published id means the start's pin is done.
//
// Node cannot call sched_setaffinity, so the set is applied with util-linux's
// `taskset -p`, which works on one thread id (Linux's affinity is per thread).

import { execFile, execFileSync } from 'node:child_process';
import { readFileSync, readlinkSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { XenError } from '../errors.js';
import { D } from './domain.js';

/** The mask covers CPUs 0..MAX_CPUS-1. */
export const MAX_CPUS = 64;

/**
 * A CPU list in xl's syntax (xl.cfg(5) `cpus`): comma-separated CPUs "N",
 * ranges "N-M" and "all" (every CPU this host may run on), with "^N",
 * "^N-M" or "^all" taking CPUs out again.
 * Sorted, each once. EINVAL names the part that is wrong.
 */
export function parseCpuList(text: string, max = MAX_CPUS): number[] {
  const set = new Set<number>();
  const parts = text.split(',').map((p) => p.trim());
  if (text.trim() === '' || parts.includes('')) throw new XenError('EINVAL', `cpus "${text}": empty CPU list or list entry`);
  for (const part of parts) {
    const remove = part.startsWith('^');
    const body = remove ? part.slice(1) : part;
    let cpus: number[];
    if (body === 'all') {
      cpus = hostCpus();
    } else {
      const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(body);
      if (m === null) throw new XenError('EINVAL', `cpus "${text}": "${part}" is not a CPU, a range N-M or "all"`);
      const lo = Number(m[1]);
      const hi = m[2] === undefined ? lo : Number(m[2]);
      if (hi < lo) throw new XenError('EINVAL', `cpus "${text}": range "${part}" runs backwards`);
      if (hi >= max) throw new XenError('EINVAL', `cpus "${text}": CPU ${hi} is above ${max - 1}`);
      cpus = Array.from({ length: hi - lo + 1 }, (_, i) => lo + i);
    }
    for (const c of cpus) {
      if (remove) set.delete(c);
      else set.add(c);
    }
  }
  if (set.size === 0) throw new XenError('EINVAL', `cpus "${text}": names no CPU`);
  return [...set].sort((a, b) => a - b);
}

/** A sorted CPU list in the short form taskset and /proc use: "0-2,5". */
export function formatCpuList(cpus: readonly number[]): string {
  const out: string[] = [];
  for (let i = 0; i < cpus.length; ) {
    let j = i;
    while (j + 1 < cpus.length && cpus[j + 1] === cpus[j]! + 1) j++;
    out.push(i === j ? String(cpus[i]) : `${cpus[i]}-${cpus[j]}`);
    i = j + 1;
  }
  return out.join(',');
}

/** Linux's own CPU numbers go to 4095 (NR_CPUS); /proc lists them all. */
const LINUX_MAX_CPUS = 4096;

/** The CPUs this process may run on (its own affinity, which a cpuset or taskset may have narrowed). */
export function hostCpus(): number[] {
  try {
    const m = /^Cpus_allowed_list:\s*(\S+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
    if (m !== null) return parseCpuList(m[1]!, LINUX_MAX_CPUS).filter((c) => c < MAX_CPUS);
  } catch {
    // Not Linux: every CPU Node reports.
  }
  return Array.from({ length: Math.min(availableParallelism(), MAX_CPUS) }, (_, i) => i);
}

/** Whether `cpus` names every CPU this process may run on (xl's "all"). */
export function everyHostCpu(cpus: readonly number[]): boolean {
  return hostCpus().every((c) => cpus.includes(c));
}

/** Check a set against the host's CPUs; EINVAL names the first it lacks. */
export function checkCpus(cpus: readonly number[]): void {
  const have = hostCpus();
  const missing = cpus.find((c) => !have.includes(c));
  if (missing !== undefined) throw new XenError('EINVAL', `cpus: CPU ${missing} is not one this host may run on (${formatCpuList(have)})`);
}

function toMask(cpus: readonly number[]): [number, number] {
  let lo = 0;
  let hi = 0;
  for (const c of cpus) {
    if (c < 32) lo |= 1 << c;
    else hi |= 1 << (c - 32);
  }
  return [lo, hi];
}

function fromMask(lo: number, hi: number): number[] {
  const out: number[] = [];
  for (let c = 0; c < MAX_CPUS; c++) if (((c < 32 ? lo >>> c : hi >>> (c - 32)) & 1) !== 0) out.push(c);
  return out;
}

/** The set in a control block; null for every CPU. */
export function affinityOf(ctl: Int32Array): number[] | null {
  const lo = Atomics.load(ctl, D.affinity);
  const hi = Atomics.load(ctl, D.affinity + 1);
  return lo === 0 && hi === 0 ? null : fromMask(lo, hi);
}

/**
 * Write the set of a domain whose thread has not started (it applies the set
 * as it starts). A set naming every CPU of the host ("all") is no pin at all.
 */
export function setAffinity(ctl: Int32Array, cpus: readonly number[] | null): void {
  const [lo, hi] = cpus === null || everyHostCpu(cpus) ? [0, 0] : toMask(cpus);
  Atomics.store(ctl, D.affinity, lo);
  Atomics.store(ctl, D.affinity + 1, hi);
}

function tasksetArgs(cpus: readonly number[] | null, tid: number): string[] {
  return ['-p', '-c', formatCpuList(cpus ?? hostCpus()), String(tid)];
}

function tasksetError(tid: number, err: unknown): XenError {
  const e = err as { code?: unknown; stderr?: unknown; message?: string };
  if (e.code === 'ENOENT') return new XenError('ENOSYS', 'pinning a domain needs taskset (Debian package util-linux) on the PATH');
  const why = typeof e.stderr === 'string' && e.stderr.trim() !== '' ? e.stderr.trim() : (e.message ?? String(err));
  return new XenError('EIO', `taskset could not set the affinity of thread ${tid}: ${why}`);
}

/**
 * The domain's thread, as it starts: apply the set the host gave the domain,
 * if any, publish the thread's id, and apply the set again if a pin changed
 * it meanwhile. Throws (the domain crashes at start) only when taskset is
 * missing or fails.
 */
export function pinSelf(ctl: Int32Array): void {
  let tid = 0;
  try {
    // "/proc/thread-self" links to "<pid>/task/<tid>".
    tid = Number(readlinkSync('/proc/thread-self').split('/').pop());
  } catch {
    return; // Not Linux: no thread ids, and no pinning.
  }
  const apply = (cpus: number[] | null): void => {
    try {
      execFileSync('taskset', tasksetArgs(cpus, tid), { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
    } catch (err) {
      throw tasksetError(tid, err);
    }
  };
  const first = affinityOf(ctl);
  if (first !== null) apply(first);
  Atomics.store(ctl, D.threadId, tid);
  const now = affinityOf(ctl);
  if (String(now) !== String(first)) apply(now);
}

/**
 * Give a domain the set `cpus` (null: every CPU the host has). A running
 * thread is pinned now; one not started yet pins itself when it starts.
 */
export async function pinDomain(ctl: Int32Array, cpus: readonly number[] | null): Promise<void> {
  if (cpus !== null) checkCpus(cpus);
  setAffinity(ctl, cpus);
  const tid = Atomics.load(ctl, D.threadId);
  if (tid === 0) return;
  await new Promise<void>((resolve, reject) => {
    execFile('taskset', tasksetArgs(cpus, tid), (err, _stdout, stderr) => {
      if (err === null) resolve();
      else reject(tasksetError(tid, Object.assign(err, { stderr })));
    });
  });
}

/** Where a domain's thread may run and where it last ran, from /proc; null fields when it has no thread. */
export function threadPlacement(ctl: Int32Array): { tid: number; allowed: number[] | null; cpu: number | null } {
  const tid = Atomics.load(ctl, D.threadId);
  if (tid === 0) return { tid, allowed: null, cpu: null };
  try {
    const status = readFileSync(`/proc/self/task/${tid}/status`, 'utf8');
    const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
    const m = /^Cpus_allowed_list:\s*(\S+)$/m.exec(status);
    // Field 39 of stat, "processor"; the fields after the command name start at 3.
    const cpu = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[36]);
    return { tid, allowed: m === null ? null : parseCpuList(m[1]!, LINUX_MAX_CPUS), cpu: Number.isInteger(cpu) ? cpu : null };
  } catch {
    return { tid, allowed: null, cpu: null }; // The thread has ended.
  }
}
