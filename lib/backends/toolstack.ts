// dom0's toolstack: the domain builder (libxl__domain_make, libxl__build_hvm
// and the xenstore half of libxl__domain_build) and the lifecycle that
// follows a domain's shutdown. Creating a domain is a straight list of steps;
// a failure unwinds the ones before it.

import { offsetOf } from '../abi/layout.js';
import { __HYPERVISOR_event_channel_op, __HYPERVISOR_hvm_op, __HYPERVISOR_memory_op } from '../abi/xen.js';
import { EVTCHNOP_alloc_unbound } from '../abi/event_channel.js';
import { grant_entry_v1, GTF_permit_access, GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE } from '../abi/grant_table.js';
import { HVMOP_set_param, HVM_PARAM_CONSOLE_EVTCHN, HVM_PARAM_CONSOLE_PFN, HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN } from '../abi/hvm.js';
import { XENMEM_add_to_physmap_batch, XENMAPSPACE_gmfn_foreign } from '../abi/memory.js';
import { XenError } from '../errors.js';
import { SpecialPage } from '../hypervisor/domain.js';
import { errnoName } from '../hypervisor/errno.js';
import type { Hypervisor } from '../hypervisor/hypervisor.js';
import type { Hypercall, xen_add_to_physmap_batch } from '../hypervisor/hypercall.js';
import type { Page } from '../hypervisor/page.js';
import { shutdownReasonNames } from '../hypervisor/shutdown.js';
import type { XenStore, XsTransaction } from '../xenstore/xenstore.js';
import type { XsPerm } from '../xenstore/wire.js';
import { logger } from '../log.js';
import type { ConsoleBackend } from './console.js';
import type { VbdSpec, VbdStorageType } from './blkback.js';

const log = logger('toolstack');

const GE_FLAGS = offsetOf(grant_entry_v1, 'flags');
const GE_DOMID = offsetOf(grant_entry_v1, 'domid');
const GE_FRAME = offsetOf(grant_entry_v1, 'frame');

/** A domain as the toolstack creates it (the parsed xl config). */
export type DomainSpec = {
  name: string;
  memoryMiB: number;
  vcpus: number;
  /** Path of the guest image module. */
  kernel: string;
  extra: string;
  onPoweroff: 'destroy' | 'preserve';
  onReboot: 'destroy' | 'restart' | 'preserve';
  onCrash: 'destroy' | 'restart' | 'preserve';
  /** The `disk` list: one vbd each. */
  disks?: DiskSpec[];
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
};

/** What dom0 asks of the machine (domctls that need a thread created or ended). */
export type Platform = {
  createDomain(spec: { name: string; memoryMiB: number; vcpus: number }): Promise<number>;
  unpause(domid: number, kernel: string, args: unknown): Promise<void>;
  destroy(domid: number): Promise<void>;
};

/** Connects a guest's xenstore ring to xenstored (XS_INTRODUCE's effect). */
export type StoreIntroduce = {
  introduce(domid: number, storeGfn: number, remotePort: number): Promise<void>;
  release(domid: number): Promise<void>;
};

export type DomainExit = { domid: number; name: string; reason: string; console: string };

type Managed = { domid: number; spec: DomainSpec; storePort: number; consolePort: number };

/** A node under a base path: its name ('' for the base), its value (null: a directory) and permissions. */
type XsNodeSpec = [name: string, value: string | null, perms: XsPerm[]];

/** Write `nodes` under `base` in a transaction, each with its permissions. */
async function writeTree(t: XsTransaction, base: string, nodes: readonly XsNodeSpec[]): Promise<void> {
  for (const [name, value, perms] of nodes) {
    const path = name === '' ? base : `${base}/${name}`;
    if (value === null) await t.mkdir(path);
    else await t.write(path, value);
    await t.setPerms(path, perms);
  }
}

export class Toolstack {
  private readonly domains = new Map<number, Managed>();

  constructor(
    private readonly hv: Hypervisor,
    private readonly hypercall: Hypercall,
    private readonly xs: XenStore,
    private readonly store: StoreIntroduce,
    private readonly consoles: ConsoleBackend,
    private readonly platform: Platform,
    private readonly onExit: (exit: DomainExit) => void,
    private readonly guestKernel: string,
    private readonly vbds: VbdBackends | null = null,
  ) {}

  /** Map frames of another domain, as privcmd does for the builder. */
  private mapForeign(domid: number, gfns: number[]): Page[] {
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

  /** libxl__domain_make + build: a paused domain with its special pages, params and nodes. */
  async create(spec: DomainSpec): Promise<number> {
    const domid = await this.platform.createDomain({ name: spec.name, memoryMiB: spec.memoryMiB, vcpus: spec.vcpus });
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
      await this.store.introduce(domid, storeGfn, storePort);
      this.consoles.attach(domid, consolePort);
      this.domains.set(domid, { domid, spec, storePort, consolePort });
      await this.platform.unpause(domid, this.guestKernel, { name: spec.name, image: spec.kernel, extra: spec.extra });
      log('domain %d (%s) started', domid, spec.name);
      return domid;
    } catch (err) {
      log('creating %s failed: %s', spec.name, (err as Error).message);
      await this.teardown(domid);
      throw err;
    }
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
    const nodes: XsNodeSpec[] = [
      ['', null, ro],
      ...['device', 'control', 'console', 'store', 'memory', 'cpu'].map((n): XsNodeSpec => [n, null, ro]),
      ...['control/shutdown', 'data', 'drivers', 'feature', 'attr', 'error'].map((n): XsNodeSpec => [n, '', rw]),
      ['name', spec.name, ro],
      ['domid', String(domid), ro],
      ['memory/static-max', String(spec.memoryMiB * 1024), ro],
      ['memory/target', String(spec.memoryMiB * 1024), ro],
      ['cpu/availability', 'online', ro],
      ['store/ring-ref', String(p.storeGfn), ro],
      ['store/port', String(p.storePort), ro],
      ['console/ring-ref', String(p.consoleGfn), ro],
      ['console/port', String(p.consolePort), ro],
      ['console/type', 'xenconsoled', ro],
      ['console/limit', String(1 << 20), ro],
    ];
    await this.xs.transaction((t) => writeTree(t, dom, nodes));
  }

  // libxl__device_disk_add: frontend and backend nodes in one transaction, then blkback.
  private async addDisk(domid: number, disk: DiskSpec): Promise<void> {
    if (this.vbds === null) throw new XenError('ENODEV', 'no block backend in this dom0');
    const fe = `/local/domain/${domid}/device/vbd/${disk.devid}`;
    const be = `/local/domain/0/backend/vbd/${domid}/${disk.devid}`;
    const devtype = disk.cdrom === true ? 'cdrom' : 'disk';
    const feNodes: [string, string][] = [
      ['backend', be], ['backend-id', '0'], ['state', '1'], ['virtual-device', String(disk.devid)], ['device-type', devtype],
      ['trusted', disk.trusted === false ? '0' : '1'],
    ];
    const beNodes: [string, string][] = [
      ['frontend', fe], ['frontend-id', String(domid)], ['params', disk.params], ['type', disk.type],
      ['mode', disk.readOnly ? 'r' : 'w'], ['dev', disk.vdev], ['device-type', devtype], ['removable', disk.cdrom === true ? '1' : '0'],
      ['bootable', '1'], ['online', '1'], ['state', '1'],
    ];
    // The guest owns its frontend and dom0 may read it; dom0 owns the backend and the guest may read it.
    const fePerms: XsPerm[] = [{ domid, perm: 'n' }, { domid: 0, perm: 'r' }];
    const bePerms: XsPerm[] = [{ domid: 0, perm: 'n' }, { domid, perm: 'r' }];
    const tree = (nodes: [string, string][], perms: XsPerm[]): XsNodeSpec[] => [
      ['', null, perms],
      ...nodes.map(([k, v]): XsNodeSpec => [k, v, perms]),
    ];
    await this.xs.transaction(async (t) => {
      await writeTree(t, fe, tree(feNodes, fePerms));
      await writeTree(t, be, tree(beNodes, bePerms));
    });
    await this.vbds.start({ domid, devid: disk.devid, type: disk.type, params: disk.params, readOnly: disk.readOnly });
  }

  /** VIRQ_DOM_EXC: find the managed domains that shut down and deal with each. */
  async domainException(): Promise<void> {
    for (const m of [...this.domains.values()]) {
      const info = this.hv.getDomainInfo(this.hv.domain(0)!, m.domid);
      if (typeof info === 'number' || info.state !== 'shutdown') continue;
      const reason = shutdownReasonNames[info.shutdown_reason] ?? `reason ${info.shutdown_reason}`;
      log('domain %d (%s) shut down: %s', m.domid, m.spec.name, reason);
      await this.finish(m, reason);
    }
  }

  /** The end of a managed domain: its last console output, its teardown, the report. */
  private async finish(m: Managed, reason: string): Promise<void> {
    this.domains.delete(m.domid);
    const consoleText = await this.consoles.detach(m.domid);
    await this.teardown(m.domid);
    this.onExit({ domid: m.domid, name: m.spec.name, reason, console: consoleText });
  }

  /** `xl destroy`: stop the domain now, whatever it is doing. */
  async destroyNow(domid: number): Promise<void> {
    const m = this.domains.get(domid);
    if (m === undefined) throw new XenError('ESRCH', `no domain ${domid}`);
    await this.finish(m, 'destroyed');
  }

  /** Undo create: the xenstore connection and nodes, the console, the domain. */
  private async teardown(domid: number): Promise<void> {
    await this.consoles.detach(domid).catch(() => '');
    await this.vbds?.stop(domid).catch((err: Error) => log('blkback of %d: %s', domid, err.message));
    await this.xs.rm(`/local/domain/0/backend/vbd/${domid}`).catch(() => undefined);
    await this.store.release(domid).catch(() => undefined);
    await this.xs.rm(`/local/domain/${domid}`).catch(() => undefined);
    await this.platform.destroy(domid).catch((err: Error) => log('destroy %d: %s', domid, err.message));
  }

  /** Ask a guest to shut down through control/shutdown, as `xl shutdown` does. */
  async requestShutdown(domid: number, reason: 'poweroff' | 'reboot' | 'suspend'): Promise<void> {
    if (!this.domains.has(domid)) throw new XenError('ESRCH', `no domain ${domid}`);
    await this.xs.write(`/local/domain/${domid}/control/shutdown`, reason);
  }

  list(): { domid: number; name: string }[] {
    return [...this.domains.values()].map((m) => ({ domid: m.domid, name: m.spec.name }));
  }
}
