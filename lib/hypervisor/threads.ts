// The threads runner (the default): each domain's vCPU is a worker thread
// running lib/hypervisor/thread.ts, which builds the thread's own view of
// the hypervisor and starts the kernel. Domains run in parallel; a thread
// learns of domains created after it over a registry port.

import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';
import { XenError } from '../errors.js';
import { logger } from '../log.js';
import { D } from './domain.js';
import type { DomainHandle, Hypervisor, RegistryMessage } from './hypervisor.js';
import type { Runner, RunnerEvents, StartSpec } from './runner.js';
import type { TraceFile, TraceThread } from '../trace/trace.js';

const log = logger('threads');

/** What a vCPU thread receives: enough to build its Hypervisor view and boot its kernel. */
export type VcpuData = {
  domid: number;
  hostBlock: SharedArrayBuffer;
  registry: MessagePort;
  known: DomainHandle[];
  kernel: string;
  args: unknown;
  /** The thread records into this buffer of a trace (xenpv run --trace). */
  trace: TraceThread | null;
};

type Host = { hostBlock: SharedArrayBuffer; hv: Hypervisor; handles(): DomainHandle[] };

export class ThreadRunner implements Runner {
  readonly kind = 'threads';
  private host!: Host;
  private events!: RunnerEvents;
  private readonly registries = new Map<number, MessagePort>();
  private readonly workers = new Map<number, Worker>();
  /** CPU time of each domain's thread at its last sample, kept once the thread has ended. */
  private readonly cpuMs = new Map<number, number>();

  /** With `trace`, every vCPU thread records into it. */
  constructor(private readonly trace: TraceFile | null = null) {}

  bind(host: Host, events: RunnerEvents): void {
    this.host = host;
    this.events = events;
  }

  private broadcast(msg: RegistryMessage): void {
    for (const port of this.registries.values()) port.postMessage(msg);
  }

  added(h: DomainHandle): void {
    this.broadcast({ add: h });
  }

  removed(domid: number): void {
    this.cpuMs.delete(domid);
    this.broadcast({ remove: domid });
  }

  start(spec: StartSpec): void {
    const { domid } = spec;
    const { port1, port2 } = new MessageChannel();
    this.registries.set(domid, port1);
    const trace = this.trace?.thread(domid) ?? null;
    const data: VcpuData = { domid, hostBlock: this.host.hostBlock, registry: port2, known: this.host.handles(), kernel: spec.kernel, args: spec.args, trace };
    const worker = new Worker(new URL('./thread.js', import.meta.url), { workerData: data, transferList: [port2] });
    this.workers.set(domid, worker);
    worker.on('message', (m: unknown) => this.events.message(domid, m, (r) => worker.postMessage(r)));
    worker.on('error', (err) => {
      log('domain %d crashed: %s', domid, err.message);
      this.events.exited(domid, err);
    });
    const domain = this.host.hv.domain(domid);
    worker.on('exit', () => {
      // Its id may name another thread from now on: no pin must reach it.
      if (domain !== undefined) Atomics.store(domain.ctl, D.threadId, 0);
      domain?.vcpusGone();
      if (trace !== null) this.trace?.threadDone(trace);
      this.workers.delete(domid);
      this.registries.get(domid)?.close();
      this.registries.delete(domid);
      this.events.exited(domid, null);
    });
  }

  running(domid: number): boolean {
    return this.workers.has(domid);
  }

  post(domid: number, message: unknown): void {
    const w = this.workers.get(domid);
    if (w === undefined) throw new XenError('ESRCH', `domain ${domid} is not running`);
    w.postMessage(message);
  }

  async destroy(domid: number): Promise<void> {
    await this.workers.get(domid)?.terminate();
  }

  /**
   * CPU time of a domain's vCPU thread: its event loop's busy time (a thread
   * idle in Atomics.waitAsync is not busy) less the time a pause held it.
   */
  cpuTimeMs(domid: number): number {
    const w = this.workers.get(domid);
    const d = this.host.hv.domain(domid);
    if (w !== undefined && d !== undefined) {
      const busy = w.performance.eventLoopUtilization().active - Atomics.load(d.ctl, D.pausedMs);
      this.cpuMs.set(domid, Math.max(busy, this.cpuMs.get(domid) ?? 0));
    }
    return this.cpuMs.get(domid) ?? 0;
  }

  async shutdown(): Promise<void> {
    const ids = [...this.workers.keys()].sort((a, b) => b - a);
    for (const id of ids) await this.workers.get(id)?.terminate();
  }
}
