// A domain's vCPU thread under the threads runner: build this thread's view
// of the hypervisor, then hand over to the domain's kernel. An exception out
// of the kernel ends the thread with an error, which the host takes as a
// crash. The thread lives until the kernel exits or the domain is destroyed.

import { parentPort, workerData } from 'node:worker_threads';
import { Hypervisor } from './hypervisor.js';
import type { KernelContext, KernelModule } from './runner.js';
import type { VcpuData } from './threads.js';
import { Vcpu } from './vcpu.js';
import { traceBegin } from '../trace/trace.js';
import { pinSelf } from './affinity.js';

export type { KernelContext, KernelModule } from './runner.js';

const data = workerData as VcpuData;
if (data.trace !== null) traceBegin(data.trace);
const hv = new Hypervisor(data.hostBlock, data.registry, data.known);
hv.parkDying = true;
const port = parentPort!;
const self = hv.domain(data.domid);
if (self === undefined) throw new Error(`domain ${data.domid} is not known to its own thread`);
pinSelf(self.ctl);
const vcpus = new Map<number, Vcpu>();

const ctx: KernelContext = {
  domid: data.domid,
  hv,
  args: data.args,
  vcpu: (id) => {
    let v = vcpus.get(id);
    if (v === undefined) vcpus.set(id, (v = new Vcpu(self, id)));
    return v;
  },
  post: (m) => port.postMessage(m),
  onMessage: (handler) => port.on('message', handler),
  routeStdout: (write) => {
    process.stdout.write = ((chunk: string | Uint8Array): boolean => {
      write(chunk);
      return true;
    }) as typeof process.stdout.write;
  },
  load: (url) => import(url),
  exit: () => process.exit(0),
};

// A vCPU idle in Atomics.waitAsync does not keep a thread alive; the domain does.
setInterval(() => undefined, 1 << 30);
const kernel = (await import(data.kernel)) as KernelModule;
await kernel.main(ctx);
