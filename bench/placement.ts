// Where the network benchmarks run each domain: dom0 on the host's first CPU
// and the guests on the others, as Xen's tuning advice has it for I/O-bound
// hosts (dom0_vcpus_pin, and guests' `cpus` away from dom0's). There, three
// busy threads share two CPUs, and every frame passes through dom0's: left
// to the scheduler, now and then both guests run at once and dom0 waits for
// a CPU (/proc's schedstat: 60-250 ms of every second on 2 CPUs).
// `node dist/bench/profile.js net SIZE` with and without --no-pin, six
// interleaved windows each: 64-byte frames 0.91 -> 1.02 Mpps, 1500 bytes
// 7.2 -> 7.4 Gbit/s, 64 KiB 14.1 -> 13.3 (the two guests, busier than dom0
// there, share one CPU). The block benchmark has two threads for two CPUs
// and is not pinned: pinning moved it by less than the noise (file reads
// 540k -> 534k IOPS). On a host with one CPU nothing is pinned.

import { hostCpus } from '../lib/hypervisor/affinity.js';

export type Placement = { dom0Cpus?: number[]; guestCpus?: number[] };

export function netPlacement(): Placement {
  const cpus = hostCpus();
  if (cpus.length < 2) return {};
  return { dom0Cpus: cpus.slice(0, 1), guestCpus: cpus.slice(1) };
}
