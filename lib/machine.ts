// A running xenpv host as the main thread drives it: the machine (Host) with
// dom0 booted on it, and the toolstack API that dom0 serves. The CLI, the
// host daemon and the end-to-end tests all start here.

import { XenError } from './errors.js';
import { Host } from './hypervisor/host.js';
import { Rpc } from './rpc.js';
import { logger } from './log.js';
import type { DeviceStats, DiskSpec, DomainExit, DomainInfo, DomainSpec, NicSpec } from './backends/toolstack.js';
import type { DeviceInfo } from './backends/devices.js';
import { grantCounts } from './hypervisor/grant.js';
import { openPorts } from './hypervisor/evtchn.js';
import type { BridgeSetup, Dom0Args } from './backends/dom0.js';
import type { BridgeOptions, BridgeReport } from './backends/bridge.js';
import type { NetbackOptions, VifStats } from './backends/netback.js';
import { parseDhcpdConfig } from './backends/dhcpd.js';
import { parseMac } from './ether.js';
import type { XenstoredLimits } from './backends/xenstored.js';
import { SimRunner, type SimOptions } from './sim/sim.js';
import { ThreadRunner } from './hypervisor/threads.js';
import { TraceFile } from './trace/trace.js';
import { join } from 'node:path';
import { rmSync } from 'node:fs';

const log = logger('machine');

/** A row of `xenpv list`: the toolstack's view and the CPU time the host measured. */
export type DomainRow = DomainInfo & { timeS: number };

/** A domain in `xenpv top`: its row, what it holds in the hypervisor, its devices' counters. */
export type DomainTop = DomainRow & {
  /** Event channels open, grant entries it grants (and of those, pinned by a mapper), mappings it holds of others' grants. */
  ports: number;
  granted: number;
  pinned: number;
  mapped: number;
  devices: DeviceStats[];
};

/**
 * A domain in `xenpv vcpu-list`: `cpus` the set it was given (null: none),
 * `allowed` where its thread may run and `everyCpu` whether that is every
 * CPU of the host, `cpu` where it last ran (null without a thread).
 */
export type VcpuRow = {
  domid: number; name: string; vcpus: number; timeS: number; cpus: number[] | null; allowed: number[] | null; everyCpu: boolean; cpu: number | null;
};

export type MachineOptions = {
  /** dom0's memory in MiB. */
  dom0MemoryMiB?: number;
  /** The host CPUs dom0 may run on (Xen's dom0_vcpus_pin, the host config's `dom0.cpus`); every CPU when absent. */
  dom0Cpus?: number[];
  /** Console output of a guest as it arrives. */
  onConsole?: (domid: number, name: string, text: string) => void;
  /** A guest shut down and was destroyed. */
  onExit?: (exit: DomainExit) => void;
  bootTimeoutMs?: number;
  /** Where the host keeps its sockets: xenstored listens on <rundir>/xenstored/socket. No socket without it. */
  rundir?: string;
  /** xenstored's quotas; see XenstoredLimits. */
  xenstored?: Partial<XenstoredLimits>;
  /** netback's tunables (queues, guest-RX queue bounds, drain and stall timeouts). */
  netback?: NetbackOptions | undefined;
  /** Bridges by name, set up when dom0 starts: pcap, ageingMs, a DHCP server (`dhcp: { range: 'FIRST-LAST', ... }`). */
  bridges?: Record<string, BridgeSetup> | undefined;
  /** UDP uplinks by bridge name: `udp:<localport>:<remotehost>:<remoteport>`. */
  uplinks?: Record<string, string> | undefined;
  /**
   * Run every domain under the deterministic runner (lib/sim/sim.ts) with
   * this seed and these faults, instead of a worker thread each. The machine
   * owns the process's clock until stop().
   */
  sim?: SimOptions;
  /** Record a trace of the run into this file (lib/trace/trace.ts); `xenpv trace FILE` decodes it. */
  trace?: string;
};

/** What `netStats()` reports: each vif, each bridge with its ports and learned addresses, the frame pool. */
export type NetStats = { vifs: VifStats[]; bridges: BridgeReport[]; pool: Record<string, number> };

export class Machine {
  readonly host: Host;
  /** xenstored's unix socket, when booted with a rundir. */
  readonly socketPath: string | undefined;
  private rpc!: Rpc;
  private readonly exits = new Map<number, DomainExit>();
  private readonly exitWaiters = new Map<number, Array<(e: DomainExit) => void>>();
  private dom0Dead: Error | null = null;
  /** The deterministic runner, when the machine runs under one. */
  readonly sim: SimRunner | null;
  /** The vbds of each guest this machine created, for the vbd-restart fault. */
  private readonly vbds = new Map<number, number[]>();
  /** The trace being recorded, if any. */
  private readonly trace: TraceFile | null;

  private constructor(private readonly opts: MachineOptions) {
    this.socketPath = opts.rundir === undefined ? undefined : join(opts.rundir, 'xenstored', 'socket');
    this.sim = opts.sim === undefined ? null : new SimRunner(opts.sim);
    this.trace = opts.trace === undefined ? null : new TraceFile(opts.trace);
    this.host = new Host({
      onMessage: (domid, m) => {
        if (domid === 0) this.rpc.receive(m);
      },
      onExit: (domid, error) => {
        if (domid !== 0) return;
        this.dom0Dead = error ?? new XenError('ESHUTDOWN', 'dom0 stopped');
        this.rpc.close(new XenError('ESHUTDOWN', `dom0 stopped: ${this.dom0Dead.message}`));
      },
    }, this.sim ?? new ThreadRunner(this.trace));
    // After the runner is bound: a deterministic run's trace is in its virtual time.
    this.trace?.start(this.sim !== null);
    this.sim?.action('vbd-restart', (rng) => {
      const all = [...this.vbds].flatMap(([domid, devids]) => devids.map((devid) => ({ domid, devid })));
      if (all.length === 0) return null;
      const { domid, devid } = rng.pick(all);
      return { detail: `vbd ${devid} of dom${domid}`, done: this.restartVbd(domid, devid) };
    });
  }

  /** Create and start dom0, and wait until its toolstack answers. */
  static async boot(opts: MachineOptions = {}): Promise<Machine> {
    // A bad bridge setting is the caller's error, found before any thread starts.
    for (const b of Object.values(opts.bridges ?? {})) {
      if (b.dhcp !== undefined) parseDhcpdConfig(b.dhcp);
      if (b.sink !== undefined) parseMac(b.sink);
    }
    // A simulated host has no sockets: every byte that reaches it must come from the seed.
    if (opts.sim !== undefined && opts.rundir !== undefined) throw new XenError('EINVAL', 'a deterministic machine takes no rundir');
    if (opts.sim !== undefined && Object.keys(opts.uplinks ?? {}).length > 0) throw new XenError('EINVAL', 'a deterministic machine takes no uplink');
    const m = new Machine(opts);
    const host = m.host;
    m.rpc = new Rpc((msg) => host.post(0, msg), m.platformHandlers(), (name, data) => m.event(name, data));
    host.createDomain({ name: 'Domain-0', memoryMiB: opts.dom0MemoryMiB ?? 16, privileged: true, cpus: opts.dom0Cpus }, 0);
    const args: Dom0Args = {
      socketPath: m.socketPath, limits: opts.xenstored, rundir: opts.rundir, net: { netback: opts.netback, bridges: opts.bridges },
    };
    host.start(0, new URL('./backends/dom0.js', import.meta.url).href, args);
    try {
      await m.rpc.call('ping', null, opts.bootTimeoutMs ?? 30_000);
    } catch (err) {
      // Nothing of a failed boot stays behind: no thread, and no simulation owning the clock.
      await host.shutdown();
      m.trace?.close();
      throw err;
    }
    try {
      for (const [bridge, spec] of Object.entries(opts.uplinks ?? {})) await m.addUplink(bridge, spec);
    } catch (err) {
      await m.stop();
      throw err;
    }
    log('dom0 is up');
    return m;
  }

  /** What dom0's toolstack asks of the machine. */
  private platformHandlers(): Record<string, (args: unknown) => unknown> {
    return {
      createdomain: (args) => {
        const a = args as { name: string; memoryMiB: number; vcpus: number; cpus?: number[] };
        return this.host.createDomain({ name: a.name, memoryMiB: a.memoryMiB, vcpus: a.vcpus, cpus: a.cpus }).domid;
      },
      unpause: (args) => {
        const a = args as { domid: number; kernel: string; args: unknown };
        this.host.start(a.domid, a.kernel, a.args);
        return null;
      },
      destroy: (args) => this.host.destroy((args as { domid: number }).domid).then(() => null),
    };
  }

  private event(name: string, data: unknown): void {
    if (name === 'console') {
      const c = data as { domid: number; name: string; text: string };
      this.sim?.note(`console ${c.domid}`, c.text);
      this.opts.onConsole?.(c.domid, c.name, c.text);
    } else if (name === 'exit') {
      const e = data as DomainExit;
      const vbds = this.vbds.get(e.domid);
      this.vbds.delete(e.domid);
      if (vbds !== undefined && e.restartedAs !== undefined) this.vbds.set(e.restartedAs, vbds);
      this.exits.set(e.domid, e);
      this.opts.onExit?.(e);
      for (const w of this.exitWaiters.get(e.domid) ?? []) w(e);
      this.exitWaiters.delete(e.domid);
    }
  }

  /** Build and start a guest; resolves with its domid once it runs. */
  async create(spec: DomainSpec): Promise<number> {
    if (this.dom0Dead !== null) throw new XenError('ESHUTDOWN', 'dom0 is not running');
    const before = new Map(this.exits);
    const domid = (await this.rpc.call('create', spec)) as number;
    // A domid used again: the exit of its last domain is not this one's.
    if (this.exits.get(domid) === before.get(domid)) this.exits.delete(domid);
    if (spec.disks !== undefined && spec.disks.length > 0) this.vbds.set(domid, spec.disks.map((d) => d.devid));
    return domid;
  }

  /** Resolve when the guest has shut down and been destroyed. */
  waitExit(domid: number, signal?: AbortSignal): Promise<DomainExit> {
    const done = this.exits.get(domid);
    if (done !== undefined) return Promise.resolve(done);
    // One deadline signal is shared by `xenpv run` across all its guests, so it may have fired already.
    if (signal?.aborted === true) return Promise.reject(new XenError('ECANCELED', `waiting for domain ${domid}`));
    return new Promise((resolve, reject) => {
      const onAbort = (): void => {
        const rest = (this.exitWaiters.get(domid) ?? []).filter((w) => w !== done);
        if (rest.length === 0) this.exitWaiters.delete(domid);
        else this.exitWaiters.set(domid, rest);
        reject(new XenError('ECANCELED', `waiting for domain ${domid}`));
      };
      const done = (e: DomainExit): void => {
        signal?.removeEventListener('abort', onAbort);
        resolve(e);
      };
      const list = this.exitWaiters.get(domid) ?? [];
      list.push(done);
      this.exitWaiters.set(domid, list);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Ask a guest to shut down (control/shutdown). */
  async requestShutdown(domid: number, reason: 'poweroff' | 'reboot' | 'suspend' = 'poweroff'): Promise<void> {
    await this.rpc.call('shutdown', { domid, reason });
  }

  /** Destroy a guest now, as `xl destroy`. */
  async destroy(domid: number): Promise<void> {
    await this.rpc.call('destroy', { domid });
  }

  /** `xl list`: dom0 and every guest, with the CPU time each has used. */
  async list(): Promise<DomainRow[]> {
    const rows = (await this.rpc.call('list', null)) as DomainInfo[];
    return rows.map((r) => ({ ...r, timeS: this.host.cpuTimeMs(r.domid) / 1000 }));
  }

  /** `xl top` counters: per domain, its resources in the hypervisor and its devices. */
  async top(): Promise<DomainTop[]> {
    const rows = await this.list();
    const devices = (await this.rpc.call('device-stats', null)) as { domid: number; devices: DeviceStats[] }[];
    return rows.map((r) => {
      const d = this.host.hv.domain(r.domid);
      const g = d === undefined ? { granted: 0, pinned: 0, mapped: 0 } : grantCounts(d);
      const ports = d === undefined ? 0 : openPorts(d);
      return { ...r, ports, ...g, devices: devices.find((x) => x.domid === r.domid)?.devices ?? [] };
    });
  }

  /** `xl pause` (true) and `xl unpause` (false). */
  async pause(domid: number, paused: boolean): Promise<void> {
    await this.rpc.call(paused ? 'pause' : 'unpause', { domid });
  }

  /** `xl vcpu-pin`: the host CPUs the domain may run on from now on (null: every CPU). */
  async vcpuPin(domid: number, cpus: number[] | null): Promise<void> {
    await this.host.pin(domid, cpus);
  }

  /** `xl vcpu-list`: each domain's vCPUs, the CPU its thread last ran on, and its affinity. */
  async vcpuList(): Promise<VcpuRow[]> {
    const rows = await this.list();
    // A domain destroyed since the list has no placement: it is left out, as a list made a moment later would.
    return rows.filter((r) => this.host.hv.domain(r.domid) !== undefined)
      .map((r) => ({ domid: r.domid, name: r.name, vcpus: r.vcpus, timeS: r.timeS, ...this.host.placement(r.domid) }));
  }

  /** `xl vcpu-set`: the guest brings vCPUs online or offline to match `count`. */
  async vcpuSet(domid: number, count: number): Promise<void> {
    await this.rpc.call('vcpu-set', { domid, count });
  }

  /** `xl block-attach`. */
  async blockAttach(domid: number, disk: DiskSpec): Promise<void> {
    await this.rpc.call('block-attach', { domid, disk });
  }

  /** `xl block-detach`: resolves once the device is gone; `forced` when the guest did not answer. */
  async blockDetach(domid: number, devid: number): Promise<{ forced: boolean }> {
    return (await this.rpc.call('block-detach', { domid, devid }, 60_000)) as { forced: boolean };
  }

  /** `xl block-list`. */
  async blockList(domid: number): Promise<DeviceInfo[]> {
    return (await this.rpc.call('block-list', { domid })) as DeviceInfo[];
  }

  /** `xl save`: the guest suspends; its memory and config go to `file`; the domain goes. */
  async save(domid: number, file: string): Promise<{ pages: number }> {
    return (await this.rpc.call('save', { domid, file }, 120_000)) as { pages: number };
  }

  /** `xl restore`: a new domain from a save file; resolves with its domid once it runs. */
  async restore(file: string): Promise<{ domid: number; name: string }> {
    return (await this.rpc.call('restore', { file }, 120_000)) as { domid: number; name: string };
  }

  /** `xl network-attach`: a new vif for a running guest. */
  async networkAttach(domid: number, nic: NicSpec): Promise<void> {
    await this.rpc.call('network-attach', { domid, nic });
  }

  /** `xl network-detach`: resolves once the vif is gone; `forced` when the guest did not answer. */
  async networkDetach(domid: number, devid: number): Promise<{ forced: boolean }> {
    return (await this.rpc.call('network-detach', { domid, devid }, 60_000)) as { forced: boolean };
  }

  /** `xl network-list`. */
  async networkList(domid: number): Promise<DeviceInfo[]> {
    return (await this.rpc.call('network-list', { domid })) as DeviceInfo[];
  }

  /** Join bridge `bridge` (made if needed) to a UDP peer: `udp:<localport>:<remotehost>:<remoteport>`. */
  async addUplink(bridge: string, spec: string): Promise<void> {
    await this.rpc.call('uplink', { bridge, spec });
  }

  /** Capture a bridge (pcap: a file, null to stop) or change its ageing. */
  async configureBridge(bridge: string, opts: BridgeOptions): Promise<void> {
    await this.rpc.call('bridge-config', { bridge, opts });
  }

  /** Counters of every vif and bridge in dom0. */
  async netStats(): Promise<NetStats> {
    return (await this.rpc.call('net-stats', null)) as NetStats;
  }

  /**
   * Stop a vbd's backend and start a new one on the same storage while the
   * guest runs (a backend crash and restart); resolves once the guest's
   * frontend has reconnected.
   */
  async restartVbd(domid: number, devid: number): Promise<void> {
    await this.rpc.call('vbd-restart', { domid, devid }, 60_000);
  }

  /** Kill a vif's netback and start a new one while the guest runs; resolves once it is Connected again. */
  async restartVif(domid: number, devid: number): Promise<void> {
    await this.rpc.call('vif-restart', { domid, devid }, 60_000);
  }

  /** Stop every domain and dom0. */
  async stop(): Promise<void> {
    // dom0 closes its listeners first; a dom0 that does not answer is terminated all the same.
    if (this.dom0Dead === null) await this.rpc.call('stop', null, 5_000).catch(() => undefined);
    await this.host.shutdown();
    this.trace?.close();
    if (this.socketPath !== undefined) rmSync(this.socketPath, { force: true });
  }
}
