// Network figures: guest to guest through netback and the bridge
// (net.g2g.*: 64-byte frames, 1500-byte frames, 64 KiB with SG/GSO) and a
// guest to a dom0 sink (net.g2d.1500.gbps). A sender guest sends as fast as
// its ring takes frames; the figure is what dom0's counters say reached the
// receiver over each window: the frames netback copied into the receiving
// guest's RX ring, or those the sink port took. One host serves every run;
// each metric gets a fresh pair of guests. dom0 and the guests run on CPUs
// of their own (bench/placement.ts).

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DomainSpec } from '../lib/backends/toolstack.js';
import { Machine, type NetStats } from '../lib/machine.js';
import { netPlacement } from './placement.js';

export const NET_METRICS = ['net.g2g.64.mpps', 'net.g2g.1500.gbps', 'net.g2g.65536.gbps', 'net.g2d.1500.gbps'] as const;

export type NetMetric = (typeof NET_METRICS)[number];

/** Why netBench gives nothing (kept for the harness; the network is here now). */
export const NET_PENDING = 'pending: needs the netfront (xnf) and netback';

export const SENDER_MAC = '00:16:3e:00:be:01';
export const RECEIVER_MAC = '00:16:3e:00:be:02';
export const SINK_MAC = '02:00:00:00:be:03';
const START_TIMEOUT_MS = 30_000;

// Sends frames of `size` to `to` until destroyed; a 64 KiB frame goes as TCPv4 GSO.
const SENDER = `
export async function main(guest) {
  const [n] = guest.nets();
  const to = /to=(\\S+)/.exec(guest.extra)[1].split(':').map((h) => parseInt(h, 16));
  const size = Number(/size=(\\d+)/.exec(guest.extra)[1]);
  const f = new Uint8Array(size);
  f.set(to, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = 0xb5;
  const opts = size > 1514 ? { gso: { type: 'tcpv4', mss: 1448 } } : undefined;
  for (;;) await n.send(f, opts);
}
`;
// Takes frames (xnf hands them up and counts them) until destroyed.
const RECEIVER = `
export async function main(guest) {
  guest.nets()[0].onFrame(() => {});
  await new Promise(() => {});
}
`;

type Counter = (s: NetStats) => { packets: number; bytes: number };

const receiverVif = (domid: number): Counter => (s) => {
  const v = s.vifs.find((x) => x.name === `vif${domid}.0`);
  return { packets: v?.txPackets ?? 0, bytes: v?.txBytes ?? 0 };
};

const sinkPort: Counter = (s) => {
  const p = s.bridges.find((b) => b.name === 'xenbr0')?.ports.find((x) => x.name === 'sink');
  return { packets: p?.txPackets ?? 0, bytes: p?.txBytes ?? 0 };
};

/** The sender's and the receiver's images, as `sender.mjs` and `receiver.mjs` in `dir`. */
export function writeNetImages(dir: string): void {
  writeFileSync(join(dir, 'sender.mjs'), SENDER);
  writeFileSync(join(dir, 'receiver.mjs'), RECEIVER);
}

/** A guest running `image` (from writeNetImages) with one vif on xenbr0. */
export function netGuest(dir: string, name: string, image: string, mac: string, extra: string, cpus?: number[]): DomainSpec {
  const kernel = join(dir, `${image}.mjs`);
  return {
    name, memoryMiB: 64, vcpus: 1, ...(cpus === undefined ? {} : { cpus }), kernel, extra, onPoweroff: 'destroy', onReboot: 'destroy', onCrash: 'destroy',
    vifs: [{ devid: 0, mac, bridge: 'xenbr0', mtu: 65521, rate: null, trusted: true, pcap: null, backend: null }],
  };
}

/** Runs of (packets, bytes) per second over `ms` each, once traffic flows and has run `warmupMs`. */
async function sample(m: Machine, count: Counter, runs: number, ms: number, warmupMs: number): Promise<{ pps: number; bps: number }[]> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (count(await m.netStats()).packets === 0) {
    if (Date.now() > deadline) throw new Error('no frame reached the receiver');
    await new Promise((r) => setTimeout(r, 20));
  }
  await new Promise((r) => setTimeout(r, warmupMs));
  const out: { pps: number; bps: number }[] = [];
  for (let i = 0; i < runs; i++) {
    const a = count(await m.netStats());
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, ms));
    const b = count(await m.netStats());
    const s = (performance.now() - t0) / 1000;
    out.push({ pps: (b.packets - a.packets) / s, bps: ((b.bytes - a.bytes) * 8) / s });
  }
  return out;
}

/** One sender (and a receiving guest, unless the sink receives) for the length of `runs` windows. */
async function measure(m: Machine, dir: string, tag: string, size: number, toSink: boolean, runs: number, ms: number, warmupMs: number, cpus?: number[]): Promise<{ pps: number; bps: number }[]> {
  const domids: number[] = [];
  try {
    if (!toSink) domids.push(await m.create(netGuest(dir, `bench-rx-${tag}`, 'receiver', RECEIVER_MAC, '', cpus)));
    domids.push(await m.create(netGuest(dir, `bench-tx-${tag}`, 'sender', SENDER_MAC, `to=${toSink ? SINK_MAC : RECEIVER_MAC} size=${size}`, cpus)));
    return await sample(m, toSink ? sinkPort : receiverVif(domids[0]!), runs, ms, warmupMs);
  } finally {
    for (const d of domids.reverse()) await m.destroy(d).catch(() => undefined);
  }
}

/** Each metric's `runs` values, measured for `ms` each after `warmupMs` of the load. */
export async function netBench(runs: number, ms: number, warmupMs: number): Promise<Record<NetMetric, number[]> | null> {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-bench-net-'));
  writeNetImages(dir);
  const { dom0Cpus, guestCpus } = netPlacement();
  const m = await Machine.boot({ bridges: { xenbr0: { sink: SINK_MAC } }, ...(dom0Cpus === undefined ? {} : { dom0Cpus }) });
  try {
    const g64 = await measure(m, dir, '64', 64, false, runs, ms, warmupMs, guestCpus);
    const g1500 = await measure(m, dir, '1500', 1500, false, runs, ms, warmupMs, guestCpus);
    const g64k = await measure(m, dir, '65535', 65535, false, runs, ms, warmupMs, guestCpus);
    const d1500 = await measure(m, dir, 'd1500', 1500, true, runs, ms, warmupMs, guestCpus);
    return {
      'net.g2g.64.mpps': g64.map((r) => r.pps / 1e6),
      'net.g2g.1500.gbps': g1500.map((r) => r.bps / 1e9),
      'net.g2g.65536.gbps': g64k.map((r) => r.bps / 1e9),
      'net.g2d.1500.gbps': d1500.map((r) => r.bps / 1e9),
    };
  } finally {
    await m.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
