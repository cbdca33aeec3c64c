// A domain's vCPU thread: build this thread's view of the hypervisor, then
// hand over to the domain's kernel. An exception out of the kernel ends the
// thread with an error, which the host takes as a crash.

import { workerData } from 'node:worker_threads';
import { Hypervisor } from './hypervisor.js';
import type { VcpuData } from './host.js';

export type KernelContext = {
  domid: number;
  hv: Hypervisor;
  args: unknown;
};

export type KernelModule = { main(ctx: KernelContext): Promise<void> | void };

const data = workerData as VcpuData;
const hv = new Hypervisor(data.hostBlock, data.registry, data.known);
const kernel = (await import(data.kernel)) as KernelModule;
await kernel.main({ domid: data.domid, hv, args: data.args });
