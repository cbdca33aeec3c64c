// One load at a time, with the CPU each thread spent per unit of work: the
// figure to compare when the machine is shared, since a rate moves with the
// CPU the other jobs leave us and CPU per frame or per request does not
// (much). Threads are read from /proc/self/task and named by when they
// appeared: dom0 at boot, then each guest as it is created.
//
//   node dist/bench/profile.js net 64 [--sink] [--ms 1000] [--runs 3] [--no-pin]
//   node dist/bench/profile.js block memory|null|file [--write] [--ms 2000] [--pin]
//
// Domains are placed as `npm run bench` places them (bench/placement.ts):
// the network loads pinned, unless --no-pin; the block loads left to the
// scheduler, unless --pin. Each network window also prints how long each
// thread waited for a CPU (/proc's schedstat).
//
// Run it under `perf record -F 1999 -g -- node --perf-basic-prof ...` for
// each thread's CPU-time profile (`perf report --sort pid`, then `--tid T
// --sort sym`), or under `node --cpu-prof`, whose samples are wall-clock
// (a thread that lost its CPU counts where it lost it).

import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine, type NetStats } from '../lib/machine.js';
import { netGuest, RECEIVER_MAC, SENDER_MAC, SINK_MAC, writeNetImages } from './net.js';
import { makeDataFile } from './peers.js';
import { netPlacement, type Placement } from './placement.js';
import { formatCpuList } from '../lib/hypervisor/affinity.js';

/** Clock ticks per second of /proc's utime and stime (USER_HZ, 100 on Linux). */
const USER_HZ = 100;

/** CPU milliseconds of each thread of this process, by tid. */
function threadCpuMs(): Map<number, number> {
  const out = new Map<number, number>();
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      out.set(Number(tid), ((Number(f[11]) + Number(f[12])) * 1000) / USER_HZ);
    } catch {
      // The thread ended between the listing and the read.
    }
  }
  return out;
}

/** Names for the threads that appear from now on. */
class ThreadNames {
  private readonly known = new Set(threadCpuMs().keys());
  readonly names = new Map<number, string>();
  mark(name: string): void {
    for (const tid of threadCpuMs().keys()) {
      if (!this.known.has(tid)) this.names.set(tid, name);
      this.known.add(tid);
    }
  }
  /** Each named thread's time waiting for a CPU, in ms, so far (schedstat's second field). */
  waits(): Map<string, number> {
    const out = new Map<string, number>();
    for (const [tid, name] of this.names) {
      try {
        out.set(name, Number(readFileSync(`/proc/self/task/${tid}/schedstat`, 'utf8').split(' ')[1]) / 1e6);
      } catch {
        // The thread has ended.
      }
    }
    return out;
  }
  /** Each named thread's sleeps and preemptions so far (/proc's voluntary and nonvoluntary context switches). */
  switches(): Map<string, [number, number]> {
    const out = new Map<string, [number, number]>();
    for (const [tid, name] of this.names) {
      try {
        const st = readFileSync(`/proc/self/task/${tid}/status`, 'utf8');
        const field = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(st)?.[1] ?? 0);
        out.set(name, [field('voluntary_ctxt_switches'), field('nonvoluntary_ctxt_switches')]);
      } catch {
        // The thread has ended.
      }
    }
    return out;
  }
  /** Each named thread's CPU µs per unit between two samples. */
  per(a: Map<number, number>, b: Map<number, number>, units: number): string {
    const parts: string[] = [];
    for (const [tid, name] of this.names) {
      const ms = (b.get(tid) ?? a.get(tid) ?? 0) - (a.get(tid) ?? 0);
      parts.push(`${name} ${((ms * 1000) / units).toFixed(2)}`);
    }
    return parts.join(', ');
  }
}

/** "; sleeps/preemptions per 1000 frames: dom0 12/3, ..." between two switches() samples. */
function switched(a: Map<string, [number, number]>, b: Map<string, [number, number]>, units: number): string {
  const per = (n: number): string => ((n * 1000) / Math.max(1, units)).toFixed(1);
  return `; sleeps/preemptions per 1000 frames: ${[...b].map(([n, [v, i]]) => `${n} ${per(v - (a.get(n)?.[0] ?? 0))}/${per(i - (a.get(n)?.[1] ?? 0))}`).join(', ')}`;
}

/** "; waited for a CPU: dom0 3 ms, ..." between two waits() samples. */
function waited(a: Map<string, number>, b: Map<string, number>): string {
  return `; waited for a CPU (ms): ${[...b].map(([n, v]) => `${n} ${(v - (a.get(n) ?? 0)).toFixed(0)}`).join(', ')}`;
}

async function net(dir: string, size: number, toSink: boolean, ms: number, runs: number, place: Placement): Promise<void> {
  writeNetImages(dir);
  const names = new ThreadNames();
  const m = await Machine.boot({ bridges: { xenbr0: { sink: SINK_MAC } }, ...(place.dom0Cpus === undefined ? {} : { dom0Cpus: place.dom0Cpus }) });
  names.mark('dom0');
  try {
    let rx = -1;
    if (!toSink) {
      rx = await m.create(netGuest(dir, 'rx', 'receiver', RECEIVER_MAC, '', place.guestCpus));
      names.mark('receiver');
    }
    await m.create(netGuest(dir, 'tx', 'sender', SENDER_MAC, `to=${toSink ? SINK_MAC : RECEIVER_MAC} size=${size}`, place.guestCpus));
    names.mark('sender');
    const count = (s: NetStats): { packets: number; bytes: number; dropped: number } => {
      const p = toSink
        ? s.bridges.find((b) => b.name === 'xenbr0')?.ports.find((x) => x.name === 'sink')
        : s.vifs.find((x) => x.name === `vif${rx}.0`);
      return { packets: p?.txPackets ?? 0, bytes: p?.txBytes ?? 0, dropped: p?.txDropped ?? 0 };
    };
    // Events dom0 took from every vif: the frames each one brought is the batch the per-event costs divide by.
    const events = (s: NetStats): number => s.vifs.reduce((n, v) => n + v.rings.reduce((k, r) => k + r.events, 0), 0);
    const deadline = Date.now() + 30_000;
    while (count(await m.netStats()).packets === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 300));
    for (let i = 0; i < runs; i++) {
      const sa = await m.netStats();
      const a = count(sa);
      const ta = threadCpuMs();
      const wa = names.waits();
      const xa = names.switches();
      const t0 = performance.now();
      await new Promise((r) => setTimeout(r, ms));
      const sb = await m.netStats();
      const b = count(sb);
      const tb = threadCpuMs();
      const wb = names.waits();
      const xb = names.switches();
      const s = (performance.now() - t0) / 1000;
      const frames = b.packets - a.packets;
      console.log(`net ${size} ${toSink ? 'g2d' : 'g2g'}: ${(frames / s / 1e6).toFixed(3)} Mpps ${(((b.bytes - a.bytes) * 8) / s / 1e9).toFixed(2)} Gbit/s, ` +
        `${b.dropped - a.dropped} dropped, ${(frames / Math.max(1, events(sb) - events(sa))).toFixed(1)} frames per dom0 event; ` +
        `CPU us per frame: ${names.per(ta, tb, Math.max(1, frames))}${waited(wa, wb)}${switched(xa, xb, frames)}`);
    }
  } finally {
    await m.stop();
  }
}

// The guest samples every thread of the process (its own and dom0's) around the measured load.
const BLOCK_GUEST = `
import { readdirSync, readFileSync } from 'node:fs';
function threads() {
  const out = {};
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const st = readFileSync('/proc/self/task/' + tid + '/stat', 'utf8');
      const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
      out[tid] = (Number(f[11]) + Number(f[12])) * ${1000 / USER_HZ};
    } catch {}
  }
  return out;
}
function xorshift(seed) { let x = seed | 0 || 1; return () => { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; return x >>> 0; }; }
async function load(disk, write, ms) {
  const spb = 4096 / disk.sectorSize;
  const blocks = Math.floor(disk.sectors / spb);
  const end = performance.now() + ms;
  let n = 0;
  const caller = async (seed) => {
    const buf = disk.buffer(4096);
    const next = xorshift(seed);
    while (performance.now() < end) {
      const lba = (next() % blocks) * spb;
      if (write) await disk.write(lba, buf); else await disk.readInto(lba, buf);
      n++;
    }
  };
  await Promise.all(Array.from({ length: 32 }, (_, i) => caller(i + 1)));
  return n;
}
export async function main(guest) {
  const [ms, write] = guest.extra.split(',');
  const d = guest.disks()[0];
  await load(d, write === '1', 300);
  const a = threads();
  const t0 = performance.now();
  const n = await load(d, write === '1', Number(ms));
  const s = (performance.now() - t0) / 1000;
  guest.print('PROFILE ' + JSON.stringify({ n, s, a, b: threads() }) + '\\n');
}`;

async function block(dir: string, format: string, write: boolean, ms: number, place: Placement): Promise<void> {
  writeFileSync(join(dir, 'blk.mjs'), BLOCK_GUEST);
  // file: a page-cached raw file of 64 MiB, as the benchmark's xvdc.
  let target = format === 'null' ? '1G' : '64M';
  if (format === 'file') {
    target = join(dir, 'disk.img');
    makeDataFile(target, 64 << 20);
  }
  writeFileSync(join(dir, 'blk.cfg'), [
    'name = "blk"', 'memory = 64', 'kernel = "blk.mjs"', `extra = "${ms},${write ? 1 : 0}"`,
    ...(place.guestCpus === undefined ? [] : [`cpus = "${formatCpuList(place.guestCpus)}"`]),
    `disk = [ 'format=${format === 'file' ? 'raw' : format}, vdev=xvda, access=rw, target=${target}' ]`, '',
  ].join('\n'));
  const names = new ThreadNames();
  const m = await Machine.boot(place.dom0Cpus === undefined ? {} : { dom0Cpus: place.dom0Cpus });
  names.mark('dom0');
  try {
    const domid = await m.create(loadDomainConfig(join(dir, 'blk.cfg')));
    names.mark('guest');
    const exit = await m.waitExit(domid, AbortSignal.timeout(120_000));
    const got = /PROFILE (.*)/.exec(exit.console);
    if (got === null) throw new Error(`guest: ${exit.reason}\n${exit.console}`);
    const r = JSON.parse(got[1]!) as { n: number; s: number; a: Record<string, number>; b: Record<string, number> };
    const map = (o: Record<string, number>): Map<number, number> => new Map(Object.entries(o).map(([k, v]) => [Number(k), v]));
    console.log(`block ${format} rand${write ? 'write' : 'read'}4k: ${Math.round(r.n / r.s)} IOPS; CPU us per request: ${names.per(map(r.a), map(r.b), r.n)}`);
  } finally {
    await m.stop();
  }
}

async function main(): Promise<void> {
  const { positionals, values } = parseArgs({
    allowPositionals: true,
    options: { sink: { type: 'boolean' }, write: { type: 'boolean' }, ms: { type: 'string' }, runs: { type: 'string' }, 'no-pin': { type: 'boolean' }, pin: { type: 'boolean' } },
  });
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-profile-'));
  try {
    if (positionals[0] === 'net') {
      await net(dir, Number(positionals[1] ?? 64), values.sink === true, Number(values.ms ?? 1000), Number(values.runs ?? 3), values['no-pin'] === true ? {} : netPlacement());
    } else if (positionals[0] === 'block') {
      await block(dir, positionals[1] ?? 'memory', values.write === true, Number(values.ms ?? 2000), values.pin === true ? netPlacement() : {});
    } else {
      throw new Error('usage: profile net SIZE [--sink] [--ms N] [--runs N] [--no-pin] | profile block memory|null|file [--write] [--ms N] [--pin]');
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
