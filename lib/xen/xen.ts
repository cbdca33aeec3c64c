// The guest kernel's xen(4) nexus, after OpenBSD sys/dev/pv/xen.c xen_attach:
// a straight list of steps, each undone in reverse if a later one fails.
// It finds the hypervisor, maps shared info, sets the callback vector, masks
// every port, sets up grant tables, attaches the console and xenstore, probes
// device/<type>/<unit> against a static driver table, watches device/ for
// hotplug and control/shutdown, and then runs the guest image.

import { offsetOf, sizeOf } from '../abi/layout.js';
import { shared_info, __HYPERVISOR_hvm_op, __HYPERVISOR_memory_op, __HYPERVISOR_sched_op, __HYPERVISOR_xen_version, DOMID_SELF } from '../abi/xen.js';
import {
  HVMOP_get_param,
  HVMOP_set_param,
  HVM_PARAM_CALLBACK_IRQ,
  HVM_PARAM_CALLBACK_TYPE_VECTOR,
  HVM_PARAM_CONSOLE_EVTCHN,
  HVM_PARAM_CONSOLE_PFN,
  HVM_PARAM_STORE_EVTCHN,
  HVM_PARAM_STORE_PFN,
} from '../abi/hvm.js';
import { XENMEM_add_to_physmap, XENMEM_memory_map, XENMAPSPACE_shared_info } from '../abi/memory.js';
import { SCHEDOP_shutdown, SHUTDOWN_crash, SHUTDOWN_poweroff, SHUTDOWN_reboot, SHUTDOWN_suspend } from '../abi/sched.js';
import { XENVER_extraversion, XENVER_version } from '../abi/version.js';
import { XenError } from '../errors.js';
import { errnoName } from '../hypervisor/errno.js';
import { Interrupts, type IntrClock, type IntrHandle } from '../evtchn/evtchn.js';
import { FramePage, MemoryViews, PAGE_SIZE } from '../hypervisor/page.js';
import type { Hypercall } from '../hypervisor/hypercall.js';
import type { KernelContext } from '../hypervisor/runner.js';
import { XenStore, type XsWatch } from '../xenstore/xenstore.js';
import { XenbusStateClosed, XenbusStateClosing, XenbusStateInitialising } from '../abi/xenbus.js';
import { logger, type Log } from '../log.js';
import { PhysMem } from './physmem.js';
import { XenCons } from './xencons.js';
import { GrantTable, type GrantTableOptions } from '../gnttab/gnttab.js';
import { XenDmaTag } from '../busdma/busdma.js';
import { xbfDriver } from '../drivers/xbf/xbf.js';
import { xnfDriver } from '../drivers/xnf/xnf.js';

/** The vector OpenBSD's xen(4) asks for; any value works, Xen only records it. */
const XEN_CALLBACK_VECTOR = 0x70n;
const EVTCHN_MASK = offsetOf(shared_info, 'evtchn_mask');
const MASK_BYTES = sizeOf(shared_info, 'evtchn_mask');
const E820_RAM = 1;

/** A frontend device found under device/<type>/<unit>. */
export type XenDevice = {
  type: string;
  unit: string;
  /** device/<type>/<unit> */
  path: string;
  backend: string;
  backendId: number;
  /** The driver attached to it, or null when the table has none for the type. */
  driver: string | null;
};

/** A driver in the static table (OpenBSD's xen_attach_args matching by type). */
export type XenDriver = {
  name: string;
  attach(sc: XenSoftc, dev: XenDevice): Promise<void>;
  detach(sc: XenSoftc, dev: XenDevice): Promise<void>;
  /** Before the kernel suspends: complete the I/O in flight, hold new I/O (lib/xen/suspend.ts). */
  suspend?(sc: XenSoftc, dev: XenDevice): Promise<void>;
  /** After a suspend the toolstack cancelled: the backend is as it was; let held I/O go. */
  resume?(sc: XenSoftc, dev: XenDevice): Promise<void>;
  /** Before a clean poweroff or reboot: let the backend finish what it was handed (bounded), as Linux's device_shutdown. */
  shutdown?(sc: XenSoftc, dev: XenDevice): Promise<void>;
};

/** Everything the nexus set up, handed to drivers and to the guest layer. */
export type XenSoftc = {
  domid: number;
  name: string;
  hypercall: Hypercall;
  mem: MemoryViews;
  physmem: PhysMem;
  intr: Interrupts;
  /** The Xen bus_dma tag: how drivers share memory with a backend (never lib/gnttab directly). */
  dmat: XenDmaTag;
  xs: XenStore;
  console: Console;
  devices: Map<string, XenDevice>;
  log: Log;
  /** vCPUs of the domain (Linux sizes per-CPU things, such as netfront's queues, by it). */
  vcpus: number;
  /** The kernel command line (the config's `extra`); drivers take `<driver>.<name>=<value>` words from it. */
  cmdline: string;
  /** The runner stops this domain's vCPUs for good (after SCHEDOP_shutdown). */
  exit: () => Promise<never>;
};

/**
 * The guest's PV console: output queued while the ring is full, flushed on
 * the backend's event; input taken from the `in` ring on the same event.
 */
export class Console {
  private readonly queue: Uint8Array[] = [];
  private queued = 0;
  private drainedWaiters: Array<() => void> = [];
  private readonly maxQueued = 1 << 20;
  dropped = 0;
  private inputHandler: ((bytes: Uint8Array) => void) | null = null;
  /** Input that came before anyone listened, kept up to one ring's worth. */
  private early: Uint8Array[] = [];
  private readonly inBuf = new Uint8Array(1024);

  constructor(
    private readonly ring: XenCons,
    private readonly signal: () => void,
  ) {}

  write(text: string | Uint8Array): void {
    const bytes = typeof text === 'string' ? Buffer.from(text, 'utf8') : text;
    if (this.queued + bytes.length > this.maxQueued) {
      this.dropped += bytes.length; // like a full serial line: later output is lost, never the kernel
      return;
    }
    this.queue.push(bytes);
    this.queued += bytes.length;
    this.flush();
  }

  /** The backend consumed output (its event): push more. */
  flush(): void {
    let moved = false;
    while (this.queue.length > 0) {
      const head = this.queue[0]!;
      const n = this.ring.write(head);
      if (n > 0) moved = true;
      this.queued -= n;
      if (n < head.length) {
        this.queue[0] = head.subarray(n);
        break;
      }
      this.queue.shift();
    }
    if (moved) this.signal();
    if (this.queue.length === 0 && this.ring.pendingBytes === 0) {
      for (const w of this.drainedWaiters.splice(0)) w();
    }
  }

  /** The backend's event: take the input it put in the `in` ring, tell it there is room. */
  receive(): void {
    let moved = false;
    for (let n = this.ring.read(this.inBuf); n > 0; n = this.ring.read(this.inBuf)) {
      moved = true;
      const bytes = this.inBuf.slice(0, n);
      if (this.inputHandler !== null) this.inputHandler(bytes);
      else if (this.early.reduce((a, b) => a + b.length, 0) < this.inBuf.length) this.early.push(bytes);
    }
    if (moved) this.signal();
  }

  /** Where input goes from now on (what came before is handed over first). */
  onInput(handler: (bytes: Uint8Array) => void): void {
    this.inputHandler = handler;
    for (const b of this.early.splice(0)) handler(b);
  }

  /** Resolve when the backend has taken everything, or after `timeoutMs`. */
  drained(timeoutMs: number): Promise<void> {
    if (this.queue.length === 0 && this.ring.pendingBytes === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(resolve, timeoutMs);
      this.drainedWaiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }
}

function check(rc: number, what: string): void {
  if (rc !== 0) throw new XenError(errnoName(-rc), `${what} failed (${rc})`);
}

function getParam(hypercall: Hypercall, index: number): number {
  const op = { domid: DOMID_SELF, index, value: 0n };
  check(hypercall(__HYPERVISOR_hvm_op, HVMOP_get_param, op), `HVMOP_get_param ${index}`);
  return Number(op.value);
}

/** Step 1, pvbus: the CPUID signature says a Xen is there. */
function pvbusDetect(ctx: KernelContext): void {
  const { ebx, ecx, edx } = ctx.hv.cpuid(0x40000000);
  const sig = Buffer.alloc(12);
  sig.writeUInt32LE(ebx, 0);
  sig.writeUInt32LE(ecx, 4);
  sig.writeUInt32LE(edx, 8);
  if (sig.toString('latin1') !== 'XenVMMXenVMM') throw new XenError('ENXIO', 'no Xen signature at CPUID 0x40000000');
}

/** The RAM pages the memory map reports, for the page allocator. */
export function ramPages(hypercall: Hypercall): number {
  const op = { nr_entries: 0, buffer: [] as { addr: number; size: number; type: number }[] };
  check(hypercall(__HYPERVISOR_memory_op, XENMEM_memory_map, op), 'XENMEM_memory_map');
  const ram = op.buffer.find((e) => e.type === E820_RAM && e.addr === 0);
  if (ram === undefined) throw new XenError('ENXIO', 'no RAM at address 0 in the memory map');
  return ram.size / PAGE_SIZE;
}

/** Steps 3-5: shared info at a page of ours, callback vector, every port masked. */
export function initSharedInfo(hypercall: Hypercall, physmem: PhysMem): number {
  const gfn = physmem.alloc();
  check(
    hypercall(__HYPERVISOR_memory_op, XENMEM_add_to_physmap, { domid: DOMID_SELF, size: 0, space: XENMAPSPACE_shared_info, idx: 0, gpfn: gfn }),
    'XENMEM_add_to_physmap(shared_info)',
  );
  const value = (BigInt(HVM_PARAM_CALLBACK_TYPE_VECTOR) << 56n) | XEN_CALLBACK_VECTOR;
  check(hypercall(__HYPERVISOR_hvm_op, HVMOP_set_param, { domid: DOMID_SELF, index: HVM_PARAM_CALLBACK_IRQ, value }), 'HVM_PARAM_CALLBACK_IRQ');
  physmem.mem.u8.fill(0xff, gfn * PAGE_SIZE + EVTCHN_MASK, gfn * PAGE_SIZE + EVTCHN_MASK + MASK_BYTES);
  return gfn;
}

export type Boot = {
  sc: XenSoftc;
  consoleIntr: IntrHandle;
  storeIntr: IntrHandle;
};

/**
 * xen_attach up to the xenstore; the caller probes devices and starts the
 * image. With `idle: false` the vCPU's idle loop is not started: whoever
 * runs the domain in its own thread (lib/fuzz/world.ts) calls the upcall.
 */
export function xenAttach(
  ctx: KernelContext, name: string, cmdline = '', opts: { idle?: boolean; gnttab?: GrantTableOptions; clock?: IntrClock } = {},
): Boot {
  const log = logger('xen', name);
  pvbusDetect(ctx);
  const hypercall = ctx.hv.entry(ctx.domid);
  const version = hypercall(__HYPERVISOR_xen_version, XENVER_version);
  const extra = { extraversion: '' };
  hypercall(__HYPERVISOR_xen_version, XENVER_extraversion, extra);
  log('Xen %d.%d%s', version >> 16, version & 0xffff, extra.extraversion);
  const self = ctx.hv.domain(ctx.domid);
  if (self === undefined) throw new XenError('ESRCH', 'own domain unknown');
  const physmem = new PhysMem(self.mem, ramPages(hypercall));
  const sharedInfoGfn = initSharedInfo(hypercall, physmem);
  const intr = new Interrupts(hypercall, self.mem, sharedInfoGfn, ctx.vcpu(0), name, opts.clock);
  const gnttab = new GrantTable(hypercall, self.mem, physmem, name, opts.gnttab);
  gnttab.init();
  const dmat = new XenDmaTag(gnttab, physmem, name);

  const consPage = new FramePage(self.mem, getParam(hypercall, HVM_PARAM_CONSOLE_PFN), true);
  let console: Console | null = null;
  const consoleIntr = intr.intrEstablish(getParam(hypercall, HVM_PARAM_CONSOLE_EVTCHN), 0, () => {
    console?.flush();
    console?.receive();
  }, 'console');
  console = new Console(new XenCons(consPage, 'guest'), () => intr.intrSignal(consoleIntr));

  const storePage = new FramePage(self.mem, getParam(hypercall, HVM_PARAM_STORE_PFN), true);
  let xs: XenStore | null = null;
  const storeIntr = intr.intrEstablish(getParam(hypercall, HVM_PARAM_STORE_EVTCHN), 0, () => xs?.intr(), 'xenstore');
  xs = new XenStore({ page: storePage, notify: () => intr.intrSignal(storeIntr), name });

  const sc: XenSoftc = {
    domid: ctx.domid, name, hypercall, mem: self.mem, physmem, intr, dmat, xs, console, devices: new Map(), log,
    vcpus: self.maxVcpus, cmdline, exit: ctx.exit,
  };
  intr.intrUnmask(consoleIntr);
  intr.intrUnmask(storeIntr);
  if (opts.idle !== false) void intr.run();
  return { sc, consoleIntr, storeIntr };
}

/** The static driver table; drivers of later issues register here. */
export const xenDrivers = new Map<string, XenDriver>([['vbd', xbfDriver], ['vif', xnfDriver]]);

/** xen_probe_devices: each device/<type>/<unit> with its backend, matched against the table. */
export async function probeDevices(sc: XenSoftc): Promise<void> {
  const types = await listOrEmpty(sc.xs, 'device');
  for (const type of types) {
    for (const unit of await listOrEmpty(sc.xs, `device/${type}`)) {
      await attachDevice(sc, type, unit, () => undefined);
    }
  }
}

async function listOrEmpty(xs: XenStore, path: string): Promise<string[]> {
  try {
    return await xs.list(path);
  } catch (err) {
    if (err instanceof XenError && err.code === 'ENOENT') return [];
    throw err;
  }
}

/** The watch on each attached device's backend state (Linux's otherend watch), by device path. */
const otherendWatches = new WeakMap<XenSoftc, Map<string, XsWatch>>();

/** How long a closing frontend waits for its backend to let go (Linux's XENNET_TIMEOUT is 10 s). */
const CLOSE_TIMEOUT_MS = 10_000;

// xenbus_probe_node + config_attach: a unit whose frontend is Initialising gets its driver.
async function attachDevice(sc: XenSoftc, type: string, unit: string, onChange: () => void): Promise<boolean> {
  const path = `device/${type}/${unit}`;
  if (sc.devices.has(path)) return false;
  let backend: string;
  let backendId: number;
  try {
    // A frontend past Initialising belongs to a driver that has it or had it (Linux skips it too).
    if (Number(await sc.xs.read(`${path}/state`)) !== XenbusStateInitialising) return false;
    backend = await sc.xs.read(`${path}/backend`);
    backendId = await sc.xs.getNumber(`${path}/backend-id`);
  } catch (err) {
    sc.log('%s: no backend (%s), not attached', path, (err as Error).message);
    return false;
  }
  if (sc.devices.has(path)) return false;
  const drv = xenDrivers.get(type);
  const dev: XenDevice = { type, unit, path, backend, backendId, driver: drv?.name ?? null };
  sc.devices.set(path, dev);
  if (drv === undefined) {
    sc.log('%s at xen0 backend %d not configured', path, backendId);
    return true;
  }
  try {
    await drv.attach(sc, dev);
    sc.log('%s at xen0: %s, backend %d', path, drv.name, backendId);
  } catch (err) {
    sc.devices.delete(path);
    sc.log('%s: %s attach failed: %s', path, drv.name, (err as Error).message);
    return false;
  }
  await watchOtherend(sc, dev, onChange);
  return true;
}

/** Whether the backend is going away for good: gone, or Closing/Closed with `online` 0 (libxl's removal). */
async function backendLeaving(sc: XenSoftc, backend: string): Promise<boolean> {
  const state = await sc.xs.read(`${backend}/state`).then(Number, () => null);
  if (state === null) return true;
  if (state !== XenbusStateClosing && state !== XenbusStateClosed) return false;
  // A backend that closes while online stays is restarting: the driver reconnects (xbf's recovery).
  return (await sc.xs.read(`${backend}/online`).catch(() => '0')) !== '1';
}

/** otherend_changed: a backend the toolstack unplugs (online 0, Closing) or removes starts the close. */
async function watchOtherend(sc: XenSoftc, dev: XenDevice, onChange: () => void): Promise<void> {
  const watches = otherendWatches.get(sc) ?? new Map<string, XsWatch>();
  otherendWatches.set(sc, watches);
  const w = await sc.xs.watch(`${dev.backend}/state`, `otherend:${dev.path}`, () => {
    void backendLeaving(sc, dev.backend).then((leaving) => {
      if (leaving) return detachDevice(sc, dev.path).then((gone) => gone && onChange());
    });
  }).catch((err: Error) => {
    sc.log('%s: no watch on the backend: %s', dev.path, err.message);
    return null;
  });
  if (w !== null) watches.set(dev.path, w);
}

// The frontend's half of closing (xennet_remove's order): Closing, wait until the
// backend has let go of the ring and port (Closed), then the driver frees its
// grants and port and says Closed. Freeing first would leave grants the backend
// still maps, which the grant table must quarantine.
async function detachDevice(sc: XenSoftc, path: string): Promise<boolean> {
  const dev = sc.devices.get(path);
  if (dev === undefined) return false;
  sc.devices.delete(path);
  const w = otherendWatches.get(sc)?.get(path);
  otherendWatches.get(sc)?.delete(path);
  await w?.unwatch().catch(() => undefined);
  const drv = dev.driver === null ? undefined : xenDrivers.get(dev.type);
  if (drv === undefined) return true;
  await sc.xs.write(`${path}/state`, String(XenbusStateClosing)).catch(() => undefined);
  await sc.xs.awaitState(`${dev.backend}/state`, (v) => v === undefined || Number(v) === XenbusStateClosed, { timeoutMs: CLOSE_TIMEOUT_MS })
    .catch((err: Error) => sc.log('%s: backend did not close: %s', path, err.message));
  await drv.detach(sc, dev);
  await sc.xs.write(`${path}/state`, String(XenbusStateClosed)).catch(() => undefined);
  sc.log('%s detached', path);
  return true;
}

/** xen_hotplug: a watch on device/ attaches new units and detaches vanished ones. */
export async function watchHotplug(sc: XenSoftc, onChange: () => void): Promise<void> {
  await sc.xs.watch('device', 'hotplug', (path) => {
    const m = /^device\/([^/]+)\/([^/]+)/.exec(path.replace(/^\/local\/domain\/\d+\//, ''));
    if (m === null) return;
    const devPath = `device/${m[1]}/${m[2]}`;
    void sc.xs.read(`${devPath}/backend`).then(
      () => attachDevice(sc, m[1]!, m[2]!, onChange).then((added) => added && onChange()),
      () => detachDevice(sc, devPath).then((gone) => gone && onChange()),
    );
  });
}

export const shutdownReasons: Record<string, number> = {
  poweroff: SHUTDOWN_poweroff,
  halt: SHUTDOWN_poweroff,
  reboot: SHUTDOWN_reboot,
  suspend: SHUTDOWN_suspend,
  crash: SHUTDOWN_crash,
};

/** A watch on control/shutdown: the toolstack's request, acknowledged by clearing the node. */
export async function watchShutdown(sc: XenSoftc, onRequest: (reason: string) => void): Promise<void> {
  await sc.xs.watch('control/shutdown', 'shutdown', () => {
    void sc.xs.read('control/shutdown').then(
      async (reason) => {
        if (reason === '' || !(reason in shutdownReasons)) return;
        await sc.xs.write('control/shutdown', '');
        onRequest(reason);
      },
      () => undefined,
    );
  });
}

/** Every attached device whose driver has the hook, in attach order. */
export async function eachDriver(sc: XenSoftc, hook: 'suspend' | 'resume' | 'shutdown'): Promise<void> {
  for (const dev of sc.devices.values()) {
    const drv = dev.driver === null ? undefined : xenDrivers.get(dev.type);
    const fn = drv?.[hook];
    if (fn !== undefined) await fn(sc, dev);
  }
}

/**
 * SCHEDOP_shutdown after the drivers (on a clean poweroff or reboot) and
 * the console have drained: a frame the image sent just before returning
 * still goes. The vCPU does not run again.
 */
export async function shutdown(sc: XenSoftc, reason: string): Promise<never> {
  const code = shutdownReasons[reason];
  if (code === undefined) throw new XenError('EINVAL', `unknown shutdown reason ${reason}`);
  if (code === SHUTDOWN_poweroff || code === SHUTDOWN_reboot) await eachDriver(sc, 'shutdown');
  await sc.console.drained(2000);
  check(sc.hypercall(__HYPERVISOR_sched_op, SCHEDOP_shutdown, { reason: code }), 'SCHEDOP_shutdown');
  sc.intr.stop();
  // The hypervisor has stopped this domain; nothing after this point may run.
  return sc.exit();
}
