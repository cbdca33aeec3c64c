// The network path's own cost: dom0's netback and bridge and two guests'
// xnf in one thread (the fuzz World pumps them all), a sender guest sending
// frames of one size to a receiver guest as in bench/net.ts. No wake-up, no
// second CPU and no other job on the machine enters the figure, so it
// compares two versions of the code on a shared machine where rates do not:
// CPU nanoseconds per frame, the three domains together. What profile.js
// adds on top (three threads) is the cost of crossing threads.
//
//   node dist/bench/net-path.js 64|1500|65535 [--untrusted] [--frames N] [--runs N]
//
// --untrusted: the vifs' backend is not trusted (XSA-403): xnf grants each
// transmit page for its frame and revokes it after, zeroing what the frame
// does not fill, and zeroes each receive page before granting it.
//
// A 65535-byte frame goes as TCPv4 GSO (mss 1448), so the receiver takes it
// whole, as net.g2g.65536 does.

import { parseArgs } from 'node:util';
import { XEN_NETIF_GSO_TYPE_TCPV4 } from '../lib/abi/netif.js';
import type { NicSpec } from '../lib/backends/toolstack.js';
import { xnfInterfaces, type XnfSoftc, type XnfTxOffload } from '../lib/drivers/xnf/xnf.js';
import { World } from '../lib/fuzz/world.js';
import { RECEIVER_MAC, SENDER_MAC } from './net.js';
import { countOption, cpuNsPerUnit, describeNs } from './path-cpu.js';

const NEVER_MS = 1e9;

function nic(mac: string, trusted: boolean): NicSpec {
  return { devid: 0, mac, bridge: 'xenbr0', mtu: 65521, rate: null, trusted, pcap: null, backend: null };
}

/** `frames` frames of `size` from `tx` to `rx`, pumped until the receiver has them all. */
async function load(world: World, tx: XnfSoftc, rx: XnfSoftc, size: number, frames: number): Promise<void> {
  const f = new Uint8Array(size);
  f.set(rx.mac, 0);
  f.set(tx.mac, 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  const opts: XnfTxOffload | undefined = size > 1514 ? { gsoType: XEN_NETIF_GSO_TYPE_TCPV4, gsoSize: 1448 } : undefined;
  let got = 0;
  let done: () => void = () => undefined;
  const all = new Promise<void>((resolve) => (done = resolve));
  rx.input = () => {
    if (++got === frames) done();
  };
  const send = async (): Promise<void> => {
    for (let i = 0; i < frames; i++) await tx.send(f, opts);
  };
  await world.run(Promise.all([send(), all]), 'net load');
}

/** CPU ns per frame of each run, after a warm-up run. */
export async function netPathCpu(size: number, frames: number, runs: number, trusted = true): Promise<number[]> {
  const netback = { drainTimeoutMs: NEVER_MS, stallTimeoutMs: NEVER_MS, holdMs: NEVER_MS, maxQueues: 1 };
  const world = new World({ net: { netback, ageingMs: NEVER_MS }, dom0MemoryMiB: 32 });
  const tx = xnfInterfaces(await world.createGuest({ name: 'sender', memoryMiB: 32, vifs: [nic(SENDER_MAC, trusted)] }))[0]!;
  const rx = xnfInterfaces(await world.createGuest({ name: 'receiver', memoryMiB: 32, vifs: [nic(RECEIVER_MAC, trusted)] }))[0]!;
  return await cpuNsPerUnit(() => load(world, tx, rx, size, frames), frames, runs);
}

async function main(): Promise<void> {
  const { positionals, values } = parseArgs({ allowPositionals: true, options: { untrusted: { type: 'boolean' }, frames: { type: 'string' }, runs: { type: 'string' } } });
  const size = Number(positionals[0] ?? 64);
  if (![64, 1500, 65535].includes(size)) throw new Error('usage: net-path 64|1500|65535 [--untrusted] [--frames N] [--runs N]');
  const frames = countOption(values.frames, size > 1514 ? 20_000 : 300_000, 'frames');
  const trusted = values.untrusted !== true;
  const ns = await netPathCpu(size, frames, countOption(values.runs, 5, 'runs'), trusted);
  console.log(`net path ${size}-byte frames guest to guest${trusted ? '' : ', untrusted'}, one thread: CPU ns per frame ${describeNs(ns)}`);
}

await main();
process.exit(0);
