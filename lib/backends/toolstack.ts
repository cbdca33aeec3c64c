// dom0's toolstack: the domain builder (libxl__domain_make, libxl__build_hvm
// and the xenstore half of libxl__domain_build) and the lifecycle that
// follows a domain's shutdown (xl's on_poweroff/on_reboot/on_crash: destroy,
// restart, preserve). Creating a domain is a straight list of steps; a
// failure unwinds the ones before it. Devices come and go through the
// generic hotplug path of devices.ts; save and restore are in saverestore.ts.

import { offsetOf } from '../abi/layout.js';
import { __HYPERVISOR_event_channel_op, __HYPERVISOR_hvm_op, __HYPERVISOR_memory_op } from '../abi/xen.js';
import { EVTCHNOP_alloc_unbound } from '../abi/event_channel.js';
import { grant_entry_v1, GTF_permit_access, GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE } from '../abi/grant_table.js';
import { HVMOP_set_param, HVM_PARAM_CONSOLE_EVTCHN, HVM_PARAM_CONSOLE_PFN, HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN } from '../abi/hvm.js';
import { XENMEM_add_to_physmap_batch, XENMAPSPACE_gmfn_foreign } from '../abi/memory.js';
import { XenError } from '../errors.js';
import { D, SpecialPage } from '../hypervisor/domain.js';
import { errnoName } from '../hypervisor/errno.js';
import type { Hypervisor } from '../hypervisor/hypervisor.js';
import type { Hypercall, xen_add_to_physmap_batch } from '../hypervisor/hypercall.js';
import type { Page } from '../hypervisor/page.js';
import { shutdownReasonNames } from '../hypervisor/shutdown.js';
import type { XenStore } from '../xenstore/xenstore.js';
import type { XsPerm } from '../xenstore/wire.js';
import { logger } from '../log.js';
import type { ConsoleBackend } from './console.js';
import type { VbdSpec, VbdStats, VbdStorageType } from './blkback.js';
import { deviceAdd, deviceList, deviceRemove, writeTree, type DeviceInfo, type DeviceKind, type XsNodeSpec } from './devices.js';
import { restoreDomain, saveDomain } from './saverestore.js';

const log = logger('toolstack');

const GE_FLAGS = offsetOf(grant_entry_v1, 'flags');
const GE_DOMID = offsetOf(grant_entry_v1, 'domid');
const GE_FRAME = offsetOf(grant_entry_v1, 'frame');

/** What the toolstack does when a domain shuts down (xl.cfg's on_poweroff, on_reboot, on_crash). */
export type LifecycleAction = 'destroy' | 'restart' | 'preserve';

/** A domain as the toolstack creates it (the parsed xl config). */
export type DomainSpec = {
  name: string;
  memoryMiB: number;
  /** vCPUs online at boot. */
  vcpus: number;
  /** vCPUs `vcpu-set` may bring online (xl's maxvcpus); `vcpus` when absent. */
  maxVcpus?: number;
  /** The host CPUs the domain may run on (xl's `cpus`); every CPU when absent. */
  cpus?: number[];
  /** Path of the guest image module. */
  kernel: string;
  extra: string;
  onPoweroff: LifecycleAction;
  onReboot: LifecycleAction;
  onCrash: LifecycleAction;
  /** The `disk` list: one vbd each. */
  disks?: DiskSpec[];
  /** The `vif` list: one network interface each. */
  vifs?: NicSpec[];
  /** `console_port`: the console is also served on this TCP port of 127.0.0.1. */
  consolePort?: number;
};

/** One entry of `disk`: where the data is and how the guest sees it. */
export type DiskSpec = {
  /** xvda, xvdb, ...; devid is its Linux/libxl number. */
  vdev: string;
  devid: number;
  type: VbdStorageType;
  /** The image path (type file) or the size in bytes (memory, null). */
  params: string;
  readOnly: boolean;
  /** devtype=cdrom: the guest sees a CD-ROM (VDISK_CDROM), read-only. */
  cdrom?: boolean;
  /** `untrusted`: false, and the frontend takes the measures of XSA-403 (the `trusted` node). */
  trusted?: boolean;
};

/** dom0's block backends as the toolstack starts and stops them. */
export type VbdBackends = {
  start(spec: VbdSpec): Promise<void>;
  stop(domid: number): Promise<void>;
  stopOne(domid: number, devid: number): Promise<void>;
  stats(domid: number): VbdStats[];
};

/** One entry of `vif` (libxl_device_nic, the part xenpv uses). */
export type NicSpec = {
  devid: number;
  /** "00:16:3e:.." */
  mac: string;
  bridge: string;
  mtu: number;
  /** Credit scheduler: bytes per interval of usec; null for no limit. */
  rate: { bytes: number; usec: number } | null;
  /** 0 makes the frontend bounce every frame through whole zeroed pages (XSA-403). */
  trusted: boolean;
  /** Capture the vif's frames to this file. */
  pcap: string | null;
  /** A driver domain's name to serve the vif instead of dom0. */
  backend: string | null;
};

/** dom0's network backends as the toolstack starts and stops them. */
export type VifBackends = {
  start(spec: { domid: number; devid: number; bridge: string; pcap: string | null }): Promise<void>;
  stop(domid: number, devid?: number): Promise<void>;
  stats(domid: number): { devid: number; counters: Record<string, number> }[];
};

/** What dom0 asks of the machine (domctls that need a thread created or ended). */
export type Platform = {
  createDomain(spec: { name: string; memoryMiB: number; vcpus: number; cpus?: number[] | undefined }): Promise<number>;
  unpause(domid: number, kernel: string, args: unknown): Promise<void>;
  destroy(domid: number): Promise<void>;
};

/** Connects a guest's xenstore ring to xenstored (XS_INTRODUCE's effect). */
export type StoreIntroduce = {
  introduce(domid: number, storeGfn: number, remotePort: number): Promise<void>;
  release(domid: number): Promise<void>;
};

export type DomainExit = {
  domid: number;
  name: string;
  reason: string;
  console: string;
  /** What the toolstack did about it: the config's on_* action, or 'saved'. */
  action?: LifecycleAction | 'saved';
  /** After a restart: the domain that runs the config now. */
  restartedAs?: number;
  /** Its devices' last counters (as `top` shows them), taken just before its backends stopped. */
  devices?: DeviceStats[];
};

/** A row of `xenpv list`. */
export type DomainInfo = {
  domid: number;
  name: string;
  memoryMiB: number;
  /** vCPUs online now, and the most vcpu-set may bring online. */
  vcpus: number;
  maxVcpus: number;
  /** xl's state letters: r running, b blocked, p paused, s shut down, c crashed, d dying. */
  state: string;
  /** Set while the domain is kept shut down (preserve): why it shut down. */
  shutdownReason: string | null;
};

/** Counters of one device of a domain, for `top`. */
export type DeviceStats = { type: string; devid: number; counters: Record<string, number> };

/** The kernel args a guest's thread starts with (lib/xen/kernel.ts GuestArgs). */
type GuestStart = { name: string; image: string; extra: string; resume?: number };

type Managed = {
  domid: number;
  /** The config as it is now: hotplugged disks included. */
  spec: DomainSpec;
  storePort: number;
  consolePort: number;
  /** Set while the domain is kept shut down (on_* = preserve): the reason it shut down. */
  preserved: string | null;
  /** When this config was restarted lately, for the restart-loop guard. */
  restarts: number[];
  /** A save waiting for the domain to suspend. */
  onSuspended: (() => void) | null;
};

/** A config restarted this many times within the window is left destroyed: it is looping. */
const RESTART_LIMIT = 5;
const RESTART_WINDOW_MS = 10_000;

/** The vbd's nodes (libxl__device_disk_add) with blkback as its backend. */
function vbdKind(vbds: VbdBackends): DeviceKind<DiskSpec> {
  return {
    type: 'vbd',
    devid: (d) => d.devid,
    frontendNodes: (_domid, d) => [
      ['state', '1'], ['virtual-device', String(d.devid)], ['device-type', d.cdrom === true ? 'cdrom' : 'disk'],
      ['trusted', d.trusted === false ? '0' : '1'],
    ],
    backendNodes: (_domid, d) => [
      ['params', d.params], ['type', d.type], ['mode', d.readOnly ? 'r' : 'w'], ['dev', d.vdev], ['device-type', d.cdrom === true ? 'cdrom' : 'disk'],
      ['removable', d.cdrom === true ? '1' : '0'], ['bootable', '1'], ['online', '1'], ['state', '1'],
    ],
    start: (domid, d) => vbds.start({ domid, devid: d.devid, type: d.type, params: d.params, readOnly: d.readOnly }),
    stop: (domid, devid) => vbds.stopOne(domid, devid),
    stopAll: (domid) => vbds.stop(domid),
  };
}

/** The vif's nodes (libxl__device_nic_add) with netback as its backend. */
function vifKind(vifs: VifBackends): DeviceKind<NicSpec> {
  return {
    type: 'vif',
    devid: (n) => n.devid,
    frontendNodes: (_domid, n) => nicFrontendNodes(n),
    backendNodes: (_domid, n) => nicBackendNodes(n),
    start: (domid, n) => vifs.start({ domid, devid: n.devid, bridge: n.bridge, pcap: n.pcap }),
    stop: (domid, devid) => vifs.stop(domid, devid),
    stopAll: (domid) => vifs.stop(domid),
  };
}

function nicFrontendNodes(n: NicSpec): [string, string][] {
  return [['state', '1'], ['handle', String(n.devid)], ['mac', n.mac], ['mtu', String(n.mtu)], ['trusted', n.trusted ? '1' : '0']];
}

function nicBackendNodes(n: NicSpec): [string, string][] {
  const nodes: [string, string][] = [
    ['online', '1'], ['state', '1'], ['script', 'vif-bridge'], ['mac', n.mac], ['bridge', n.bridge], ['handle', String(n.devid)],
    ['type', 'vif'], ['mtu', String(n.mtu)],
  ];
  if (n.rate !== null) nodes.push(['rate', `${n.rate.bytes},${n.rate.usec}`]);
  return nodes;
}

export class Toolstack {
  private readonly domains = new Map<number, Managed>();
  /** The device kinds this dom0 has backends for; each is torn down with its domain. */
  private readonly kinds: DeviceKind<never>[] = [];
  private readonly vbd: DeviceKind<DiskSpec> | null;
  private readonly vif: DeviceKind<NicSpec> | null;
  /** Driver domains serving a domain's vifs (backend=), by the domain's id. */
  private readonly driverBackends = new Map<number, Set<number>>();

  constructor(
    private readonly hv: Hypervisor,
    private readonly hypercall: Hypercall,
    readonly xs: XenStore,
    private readonly store: StoreIntroduce,
    private readonly consoles: ConsoleBackend,
    private readonly platform: Platform,
    private readonly onExit: (exit: DomainExit) => void,
    private readonly guestKernel: string,
    private readonly vbds: VbdBackends | null = null,
    private readonly vifs: VifBackends | null = null,
  ) {
    this.vbd = vbds === null ? null : vbdKind(vbds);
    if (this.vbd !== null) this.kinds.push(this.vbd as DeviceKind<never>);
    this.vif = vifs === null ? null : vifKind(vifs);
    if (this.vif !== null) this.kinds.push(this.vif as DeviceKind<never>);
  }

  /** Map frames of another domain, as privcmd does for the builder. */
  mapForeign(domid: number, gfns: number[]): Page[] {
    const op: xen_add_to_physmap_batch = {
      domid: 0, space: XENMAPSPACE_gmfn_foreign, size: gfns.length, u: { foreign_domid: domid },
      idxs: gfns, gpfns: gfns, errs: [], pages: [],
    };
    this.check(this.hypercall(__HYPERVISOR_memory_op, XENMEM_add_to_physmap_batch, op), 'map foreign frames');
    return op.pages.map((p, i) => {
      if (p === null) throw new XenError('EFAULT', `frame ${gfns[i]} of domain ${domid}`);
      return p;
    });
  }

  private check(rc: number, what: string): void {
    if (rc !== 0) throw new XenError(errnoName(-rc), `${what} failed (${rc})`);
  }

  private allocUnbound(domid: number): number {
    const op = { dom: domid, remote_dom: 0, port: 0 };
    this.check(this.hypercall(__HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, op), 'alloc_unbound');
    return op.port;
  }

  private setParam(domid: number, index: number, value: number): void {
    this.check(this.hypercall(__HYPERVISOR_hvm_op, HVMOP_set_param, { domid, index, value: BigInt(value) }), `set param ${index}`);
  }

  /** Grant entry `ref` of the new domain's frame 0 to dom0: frame and domid first, flags last. */
  private grantToDom0(frame0: Page, ref: number, gfn: number): void {
    const at = ref * grant_entry_v1.size;
    frame0.store32(at + GE_FRAME, gfn);
    frame0.store16(at + GE_DOMID, 0);
    frame0.store16(at + GE_FLAGS, GTF_permit_access);
  }

  /** Build and start a guest (`xl create`); resolves with its domid once its thread runs. */
  async create(spec: DomainSpec): Promise<number> {
    const m = await this.build(spec, []);
    await this.start(m);
    return m.domid;
  }

  /** libxl__domain_make + build: a paused domain with its special pages, params, nodes and devices. */
  async build(spec: DomainSpec, restarts: number[] = []): Promise<Managed> {
    for (const other of this.domains.values()) {
      if (other.spec.name === spec.name) throw new XenError('EEXIST', `a domain named ${spec.name} exists (domid ${other.domid})`);
    }
    const maxVcpus = Math.max(spec.vcpus, spec.maxVcpus ?? spec.vcpus);
    const domid = await this.platform.createDomain({ name: spec.name, memoryMiB: spec.memoryMiB, vcpus: maxVcpus, cpus: spec.cpus });
    try {
      const d = this.hv.domain(domid);
      if (d === undefined) throw new XenError('ESRCH', `new domain ${domid} unknown to dom0`);
      const storeGfn = d.specialBase + SpecialPage.xenstore;
      const consoleGfn = d.specialBase + SpecialPage.console;
      const [frame0] = this.mapForeign(domid, [d.specialBase + SpecialPage.grantFrame0]);
      this.grantToDom0(frame0!, GNTTAB_RESERVED_CONSOLE, consoleGfn);
      this.grantToDom0(frame0!, GNTTAB_RESERVED_XENSTORE, storeGfn);
      const storePort = this.allocUnbound(domid);
      const consolePort = this.allocUnbound(domid);
      this.setParam(domid, HVM_PARAM_STORE_PFN, storeGfn);
      this.setParam(domid, HVM_PARAM_STORE_EVTCHN, storePort);
      this.setParam(domid, HVM_PARAM_CONSOLE_PFN, consoleGfn);
      this.setParam(domid, HVM_PARAM_CONSOLE_EVTCHN, consolePort);
      await this.writeNodes(domid, spec, { storeGfn, storePort, consoleGfn, consolePort });
      for (const disk of spec.disks ?? []) await this.addDisk(domid, disk);
      for (const nic of spec.vifs ?? []) await this.addNic(domid, nic);
      await this.store.introduce(domid, storeGfn, storePort);
      await this.consoles.attach(domid, consolePort, { name: spec.name, tcpPort: spec.consolePort });
      const m: Managed = { domid, spec, storePort, consolePort, preserved: null, restarts, onSuspended: null };
      this.domains.set(domid, m);
      return m;
    } catch (err) {
      log('creating %s failed: %s', spec.name, (err as Error).message);
      await this.teardown(domid);
      throw err;
    }
  }

  /** The first unpause: the guest's thread runs its kernel (resuming from a record when restored). */
  async start(m: Managed, resume?: number): Promise<void> {
    const args: GuestStart = { name: m.spec.name, image: m.spec.kernel, extra: m.spec.extra };
    if (resume !== undefined) args.resume = resume;
    try {
      await this.platform.unpause(m.domid, this.guestKernel, args);
    } catch (err) {
      this.domains.delete(m.domid);
      await this.teardown(m.domid);
      throw err;
    }
    log('domain %d (%s) started', m.domid, m.spec.name);
  }

  private async writeNodes(
    domid: number,
    spec: DomainSpec,
    p: { storeGfn: number; storePort: number; consoleGfn: number; consolePort: number },
  ): Promise<void> {
    const dom = `/local/domain/${domid}`;
    // libxl's roperm (dom0 owns, the guest reads) and rwperm (the guest owns).
    const ro: XsPerm[] = [{ domid: 0, perm: 'n' }, { domid, perm: 'r' }];
    const rw: XsPerm[] = [{ domid, perm: 'n' }];
    const maxVcpus = Math.max(spec.vcpus, spec.maxVcpus ?? spec.vcpus);
    const cpus = Array.from({ length: maxVcpus }, (_, i): XsNodeSpec[] => [
      [`cpu/${i}`, null, ro],
      [`cpu/${i}/availability`, i < spec.vcpus ? 'online' : 'offline', ro],
    ]).flat();
    const nodes: XsNodeSpec[] = [
      ['', null, ro],
      ...['device', 'control', 'console', 'store', 'memory', 'cpu'].map((n): XsNodeSpec => [n, null, ro]),
      ...['control/shutdown', 'data', 'drivers', 'feature', 'attr', 'error'].map((n): XsNodeSpec => [n, '', rw]),
      ['name', spec.name, ro],
      ['domid', String(domid), ro],
      ['memory/static-max', String(spec.memoryMiB * 1024), ro],
      ['memory/target', String(spec.memoryMiB * 1024), ro],
      ...cpus,
      ['store/ring-ref', String(p.storeGfn), ro],
      ['store/port', String(p.storePort), ro],
      ['console/ring-ref', String(p.consoleGfn), ro],
      ['console/port', String(p.consolePort), ro],
      ['console/type', 'xenconsoled', ro],
      ['console/limit', String(1 << 20), ro],
    ];
    await this.xs.transaction((t) => writeTree(t, dom, nodes));
  }

  // libxl__device_disk_add: the vbd's nodes, then blkback.
  private async addDisk(domid: number, disk: DiskSpec): Promise<void> {
    if (this.vbd === null) throw new XenError('ENODEV', 'no block backend in this dom0');
    await deviceAdd(this.xs, domid, this.vbd, disk);
  }

  // libxl__device_nic_add: the vif's nodes, then netback; or the nodes of a driver domain's vif.
  private async addNic(domid: number, nic: NicSpec): Promise<void> {
    if (nic.backend !== null) return this.addDriverDomainNic(domid, nic, nic.backend);
    if (this.vif === null) throw new XenError('ENODEV', 'no network backend in this dom0');
    await deviceAdd(this.xs, domid, this.vif, nic);
  }

  /**
   * A vif that a driver domain serves (backend=<name>): the same nodes, the
   * backend directory in that domain's tree and owned by it, and no netback
   * in dom0; the driver domain runs the backend half itself.
   */
  private async addDriverDomainNic(domid: number, nic: NicSpec, backendName: string): Promise<void> {
    const bd = [...this.domains.values()].find((m) => m.spec.name === backendName)?.domid;
    if (bd === undefined) throw new XenError('ESRCH', `no domain named ${backendName} to serve as a backend`);
    if (bd === domid) throw new XenError('EINVAL', `vif ${nic.devid}: a domain cannot be its own backend`);
    const fe = `/local/domain/${domid}/device/vif/${nic.devid}`;
    const be = `/local/domain/${bd}/backend/vif/${domid}/${nic.devid}`;
    const fePerms: XsPerm[] = [{ domid, perm: 'n' }, { domid: bd, perm: 'r' }];
    const bePerms: XsPerm[] = [{ domid: bd, perm: 'n' }, { domid, perm: 'r' }];
    const tree = (nodes: [string, string][], perms: XsPerm[]): XsNodeSpec[] => [
      ['', null, perms],
      ...nodes.map(([k, v]): XsNodeSpec => [k, v, perms]),
    ];
    await this.xs.transaction(async (t) => {
      await writeTree(t, fe, tree([['backend', be], ['backend-id', String(bd)], ...nicFrontendNodes(nic)], fePerms));
      await writeTree(t, be, tree([['frontend', fe], ['frontend-id', String(domid)], ...nicBackendNodes(nic)], bePerms));
    });
    const set = this.driverBackends.get(domid) ?? new Set<number>();
    set.add(bd);
    this.driverBackends.set(domid, set);
  }

  /** VIRQ_DOM_EXC: find the managed domains that shut down and deal with each. */
  async domainException(): Promise<void> {
    for (const m of [...this.domains.values()]) {
      if (m.preserved !== null) continue;
      const info = this.hv.getDomainInfo(this.hv.domain(0)!, m.domid);
      if (typeof info === 'number' || info.state !== 'shutdown') continue;
      const reason = shutdownReasonNames[info.shutdown_reason] ?? `reason ${info.shutdown_reason}`;
      log('domain %d (%s) shut down: %s', m.domid, m.spec.name, reason);
      if (reason === 'suspend' && m.onSuspended !== null) {
        m.onSuspended();
        continue;
      }
      await this.lifecycle(m, reason);
    }
  }

  /** The config's on_* action for a shutdown: destroy, restart or preserve. */
  private async lifecycle(m: Managed, reason: string): Promise<void> {
    const s = m.spec;
    // A suspend nobody saves is kept, as xl leaves a suspended domain for its saver.
    const action: LifecycleAction =
      reason === 'poweroff' ? s.onPoweroff : reason === 'reboot' ? s.onReboot : reason === 'crash' || reason === 'watchdog' ? s.onCrash : reason === 'suspend' ? 'preserve' : 'destroy';
    if (action !== 'preserve') return this.finish(m, reason, action);
    m.preserved = reason;
    this.onExit({ domid: m.domid, name: s.name, reason, console: this.consoles.text(m.domid), action });
  }

  /** The end of a managed domain: its last console output, its teardown, a restart, the report. */
  async finish(m: Managed, reason: string, action: LifecycleAction | 'saved', report = true): Promise<void> {
    this.domains.delete(m.domid);
    const devices = this.domainDeviceStats(m.domid);
    const consoleText = await this.consoles.detach(m.domid);
    await this.teardown(m.domid);
    const restartedAs = action === 'restart' ? await this.restart(m) : undefined;
    if (!report) return;
    const exit: DomainExit = { domid: m.domid, name: m.spec.name, reason, console: consoleText, action, devices };
    if (action === 'restart') {
      if (restartedAs === undefined) exit.action = 'destroy';
      else exit.restartedAs = restartedAs;
    }
    this.onExit(exit);
  }

  /** Run the config again in a new domain, unless it restarts in a loop. */
  private async restart(m: Managed): Promise<number | undefined> {
    const now = Date.now();
    const recent = m.restarts.filter((t) => now - t < RESTART_WINDOW_MS);
    if (recent.length >= RESTART_LIMIT) {
      log('%s restarted %d times in %d ms: left destroyed', m.spec.name, recent.length, RESTART_WINDOW_MS);
      return undefined;
    }
    try {
      const next = await this.build(m.spec, [...recent, now]);
      await this.start(next);
      return next.domid;
    } catch (err) {
      log('restarting %s failed: %s', m.spec.name, (err as Error).message);
      return undefined;
    }
  }

  /** `xl destroy`: stop the domain now, whatever it is doing. */
  async destroyNow(domid: number): Promise<void> {
    const m = this.managed(domid);
    await this.finish(m, m.preserved ?? 'destroyed', 'destroy', m.preserved === null);
  }

  /** Undo create: devices, the xenstore connection and nodes, the console, the domain. */
  private async teardown(domid: number): Promise<void> {
    await this.consoles.detach(domid).catch(() => '');
    for (const kind of this.kinds) {
      await kind.stopAll(domid).catch((err: Error) => log('%s backends of %d: %s', kind.type, domid, err.message));
      await this.xs.rm(`/local/domain/0/backend/${kind.type}/${domid}`).catch(() => undefined);
    }
    for (const bd of this.driverBackends.get(domid) ?? []) await this.xs.rm(`/local/domain/${bd}/backend/vif/${domid}`).catch(() => undefined);
    this.driverBackends.delete(domid);
    await this.store.release(domid).catch(() => undefined);
    await this.xs.rm(`/local/domain/${domid}`).catch(() => undefined);
    await this.platform.destroy(domid).catch((err: Error) => log('destroy %d: %s', domid, err.message));
  }

  /** A managed domain by id; ESRCH when there is none. */
  managed(domid: number): Managed {
    const m = this.domains.get(domid);
    if (m === undefined) throw new XenError('ESRCH', `no domain ${domid}`);
    return m;
  }

  /** A managed domain that runs (not kept shut down); EINVAL otherwise. */
  running(domid: number): Managed {
    const m = this.managed(domid);
    if (m.preserved !== null) throw new XenError('EINVAL', `domain ${domid} (${m.spec.name}) is shut down (${m.preserved})`);
    return m;
  }

  /** Ask a guest to shut down through control/shutdown, as `xl shutdown` does. */
  async requestShutdown(domid: number, reason: 'poweroff' | 'reboot' | 'suspend'): Promise<void> {
    this.running(domid);
    await this.xs.write(`/local/domain/${domid}/control/shutdown`, reason);
  }

  /** `xl list`: dom0 first, then every managed domain. */
  list(): DomainInfo[] {
    const dom0 = this.hv.domain(0)!;
    const rows = [this.info(0, 'Domain-0', (dom0.nrPages * 4096) / 1048576, null)];
    for (const m of [...this.domains.values()].sort((a, b) => a.domid - b.domid)) {
      rows.push(this.info(m.domid, m.spec.name, m.spec.memoryMiB, m.preserved));
    }
    return rows;
  }

  private info(domid: number, name: string, memoryMiB: number, preserved: string | null): DomainInfo {
    const i = this.hv.getDomainInfo(this.hv.domain(0)!, domid);
    if (typeof i === 'number') return { domid, name, memoryMiB, vcpus: 0, maxVcpus: 0, state: '-----d', shutdownReason: preserved };
    const crashed = i.state === 'shutdown' && (shutdownReasonNames[i.shutdown_reason] === 'crash' || shutdownReasonNames[i.shutdown_reason] === 'watchdog');
    const state = [
      i.state === 'running' && !i.blocked ? 'r' : '-',
      i.state === 'running' && i.blocked ? 'b' : '-',
      i.state === 'paused' ? 'p' : '-',
      i.state === 'shutdown' && !crashed ? 's' : '-',
      crashed ? 'c' : '-',
      i.state === 'dying' || i.state === 'dead' ? 'd' : '-',
    ].join('');
    return { domid, name, memoryMiB, vcpus: i.nr_online_vcpus, maxVcpus: i.max_vcpu_id + 1, state, shutdownReason: preserved };
  }

  /** `xl pause` / `xl unpause`. */
  pause(domid: number, paused: boolean): void {
    this.running(domid);
    const dom0 = this.hv.domain(0)!;
    const rc = paused ? this.hv.pauseDomain(dom0, domid) : this.hv.unpauseDomain(dom0, domid);
    if (rc !== 0) throw new XenError(errnoName(-rc), `${paused ? 'pause' : 'unpause'} of domain ${domid}: it is ${this.hv.domain(domid)?.state ?? 'gone'}`);
  }

  /** `xl vcpu-set`: cpu/<i>/availability for each vCPU; the guest onlines and offlines them. */
  async vcpuSet(domid: number, count: number): Promise<void> {
    const m = this.running(domid);
    const max = Math.max(m.spec.vcpus, m.spec.maxVcpus ?? m.spec.vcpus);
    if (!Number.isInteger(count) || count < 1 || count > max) throw new XenError('EINVAL', `vcpu-set: ${count} is not in 1..${max} (maxvcpus)`);
    await this.xs.transaction(async (t) => {
      for (let i = 0; i < max; i++) await t.write(`/local/domain/${domid}/cpu/${i}/availability`, i < count ? 'online' : 'offline');
    });
  }

  /** `xl block-attach`: a new vbd while the guest runs; the guest's watch on device/ attaches it. */
  async blockAttach(domid: number, disk: DiskSpec): Promise<void> {
    const m = this.running(domid);
    await this.addDisk(domid, disk);
    // As libxl updates the stored config: a restart or a save keeps the disk.
    m.spec = { ...m.spec, disks: [...(m.spec.disks ?? []), disk] };
  }

  /** `xl block-detach`: the removal handshake; forced when the guest does not answer. */
  async blockDetach(domid: number, devid: number, signal?: AbortSignal): Promise<{ forced: boolean }> {
    const m = this.managed(domid);
    if (this.vbd === null) throw new XenError('ENODEV', 'no block backend in this dom0');
    const r = await deviceRemove(this.xs, domid, this.vbd, devid, signal);
    m.spec = { ...m.spec, disks: (m.spec.disks ?? []).filter((d) => d.devid !== devid) };
    return r;
  }

  /** `xl block-list`: the vbds of a domain as xenstore has them. */
  async blockList(domid: number): Promise<DeviceInfo[]> {
    this.managed(domid);
    return deviceList(this.xs, domid, 'vbd');
  }

  /** `xl network-attach`: a new vif while the guest runs; the guest's watch on device/ attaches it. */
  async networkAttach(domid: number, nic: NicSpec): Promise<void> {
    const m = this.running(domid);
    await this.addNic(domid, nic);
    m.spec = { ...m.spec, vifs: [...(m.spec.vifs ?? []), nic] };
  }

  /** `xl network-detach`: the removal handshake (netback's vifs); forced when the guest does not answer. */
  async networkDetach(domid: number, devid: number, signal?: AbortSignal): Promise<{ forced: boolean }> {
    const m = this.managed(domid);
    if (this.vif === null) throw new XenError('ENODEV', 'no network backend in this dom0');
    const r = await deviceRemove(this.xs, domid, this.vif, devid, signal);
    m.spec = { ...m.spec, vifs: (m.spec.vifs ?? []).filter((n) => n.devid !== devid) };
    return r;
  }

  /** `xl network-list`: the vifs of a domain as xenstore has them. */
  async networkList(domid: number): Promise<DeviceInfo[]> {
    this.managed(domid);
    return deviceList(this.xs, domid, 'vif');
  }

  /** Per-device counters of every managed domain, for `top`. */
  deviceStats(): { domid: number; devices: DeviceStats[] }[] {
    return [...this.domains.values()].map((m) => ({ domid: m.domid, devices: this.domainDeviceStats(m.domid) }));
  }

  /** The counters of one domain's devices, from dom0's backends. */
  private domainDeviceStats(domid: number): DeviceStats[] {
    const devices: DeviceStats[] = [];
    const c = this.consoles.stats(domid);
    if (c !== null) devices.push({ type: 'console', devid: 0, counters: c });
    for (const v of this.vbds?.stats(domid) ?? []) devices.push({ type: 'vbd', devid: v.devid, counters: v.counters });
    for (const v of this.vifs?.stats(domid) ?? []) devices.push({ type: 'vif', devid: v.devid, counters: v.counters });
    return devices;
  }

  /** `xl save`: lib/backends/saverestore.ts. */
  save(domid: number, file: string): Promise<{ pages: number }> {
    return saveDomain(this, domid, file);
  }

  /** `xl restore`. */
  restore(file: string): Promise<{ domid: number; name: string }> {
    return restoreDomain(this, file);
  }

  /** A domain's frames: all of them, the RAM below the special pages, and the record a suspend left. */
  frames(domid: number): { nrPages: number; ramPages: number; record: number } {
    const d = this.hv.domain(domid);
    if (d === undefined) throw new XenError('ESRCH', `no domain ${domid}`);
    return { nrPages: d.nrPages, ramPages: d.specialBase, record: Atomics.load(d.ctl, D.suspendRecord) };
  }

  /** XEN_DOMCTL_resumedomain: a suspended guest runs on in place. */
  resumeDomain(domid: number): void {
    const rc = this.hv.resumeDomain(this.hv.domain(0)!, domid);
    if (rc !== 0) throw new XenError(errnoName(-rc), `resume of domain ${domid}`);
  }

  /** A domain built but never started goes again. */
  async discard(m: Managed): Promise<void> {
    this.domains.delete(m.domid);
    await this.teardown(m.domid);
  }

  /** The name of a managed domain, for console output. */
  nameOf(domid: number): string {
    return this.domains.get(domid)?.spec.name ?? `dom${domid}`;
  }
}

/** The toolstack's operations as dom0 serves them to the machine. */
export function toolstackOps(ts: Toolstack): Record<string, (args: unknown) => unknown> {
  type A = { domid: number };
  return {
    create: (spec) => ts.create(spec as DomainSpec),
    shutdown: (args) => {
      const a = args as A & { reason: 'poweroff' | 'reboot' | 'suspend' };
      return ts.requestShutdown(a.domid, a.reason);
    },
    destroy: (args) => ts.destroyNow((args as A).domid),
    list: () => ts.list(),
    pause: (args) => ts.pause((args as A).domid, true),
    unpause: (args) => ts.pause((args as A).domid, false),
    'vcpu-set': (args) => ts.vcpuSet((args as A).domid, (args as A & { count: number }).count),
    'block-attach': (args) => ts.blockAttach((args as A).domid, (args as A & { disk: DiskSpec }).disk),
    'block-detach': (args) => ts.blockDetach((args as A).domid, (args as A & { devid: number }).devid),
    'block-list': (args) => ts.blockList((args as A).domid),
    'network-attach': (args) => ts.networkAttach((args as A).domid, (args as A & { nic: NicSpec }).nic),
    'network-detach': (args) => ts.networkDetach((args as A).domid, (args as A & { devid: number }).devid),
    'network-list': (args) => ts.networkList((args as A).domid),
    'device-stats': () => ts.deviceStats(),
    save: (args) => ts.save((args as A).domid, (args as A & { file: string }).file),
    restore: (args) => ts.restore((args as { file: string }).file),
  };
}
