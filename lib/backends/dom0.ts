// dom0's kernel: the same interrupt and memory code as a guest, then the
// backends. xenstored serves dom0 itself over a ring page in dom0's memory
// (as it serves any domain) and each introduced guest over the page the
// builder granted it. The toolstack answers the machine's calls.

import { randomBytes } from 'node:crypto';
import { VIRQ_DOM_EXC } from '../abi/xen.js';
import { GNTTAB_RESERVED_XENSTORE } from '../abi/grant_table.js';
import { XS_INTRODUCE, XS_RELEASE } from '../abi/xs_wire.js';
import { XenError } from '../errors.js';
import { Interrupts, type IntrHandle } from '../evtchn/evtchn.js';
import type { Hypercall } from '../hypervisor/hypercall.js';
import { FramePage } from '../hypervisor/page.js';
import type { KernelContext } from '../hypervisor/runner.js';
import { Rpc, type RpcHandlers } from '../rpc.js';
import { logger } from '../log.js';
import { PhysMem } from '../xen/physmem.js';
import { initSharedInfo, ramPages } from '../xen/xen.js';
import { joinStrings } from '../xenstore/wire.js';
import { XenStore } from '../xenstore/xenstore.js';
import { ConsoleBackend } from './console.js';
import { BlkbackSet } from './blkback.js';
import { Bridges, FramePool, parseUplink, type BridgeOptions } from './bridge.js';
import { NetbackSet, type NetbackOptions } from './netback.js';
import { Dhcpd, parseDhcpdConfig, type DhcpdSpec } from './dhcpd.js';
import { parseMac } from '../ether.js';
import { Toolstack, toolstackOps, type Platform, type StoreIntroduce } from './toolstack.js';
import { Concentrator } from './concentrator.js';
import { Xenstored, XenstoredRing, type XenstoredLimits } from './xenstored.js';
import { XenstoredSocket } from './xenstored-socket.js';
import { bindInterdomain, mapGrant, unmapGrant } from './xenbus.js';

const log = logger('dom0');

/** dom0's own shared info and interrupts, the same steps xen_attach takes for a guest. */
function attachInterrupts(ctx: KernelContext, hypercall: Hypercall): { intr: Interrupts; physmem: PhysMem } {
  const self = ctx.hv.domain(ctx.domid);
  if (self === undefined) throw new XenError('ESRCH', 'dom0 unknown to itself');
  const physmem = new PhysMem(self.mem, ramPages(hypercall));
  const gfn = initSharedInfo(hypercall, physmem);
  const intr = new Interrupts(hypercall, self.mem, gfn, ctx.vcpu(0), 'dom0');
  void intr.run();
  return { intr, physmem };
}

/** XS_INTRODUCE's effect in dom0: map the guest's store page, bind its port, serve it. */
export class StoreRings {
  private readonly rings = new Map<number, { ring: XenstoredRing; intr: IntrHandle; handle: number }>();

  constructor(
    private readonly hypercall: Hypercall,
    private readonly intr: Interrupts,
  ) {}

  introduce(xsd: Xenstored, domid: number, remotePort: number): void {
    const map = mapGrant(this.hypercall, domid, GNTTAB_RESERVED_XENSTORE);
    let ring: XenstoredRing | null = null;
    let ih: IntrHandle;
    try {
      ih = bindInterdomain(this.hypercall, this.intr, domid, remotePort, () => ring?.intr(), `xenstore-dom${domid}`);
    } catch (err) {
      unmapGrant(this.hypercall, map.handle);
      throw err;
    }
    ring = new XenstoredRing(xsd, domid, map.page, () => this.intr.intrSignal(ih));
    this.rings.set(domid, { ring, intr: ih, handle: map.handle });
    this.intr.intrUnmask(ih);
  }

  release(domid: number): void {
    const r = this.rings.get(domid);
    if (r === undefined) return;
    this.rings.delete(domid);
    r.ring.close();
    void this.intr.intrDisestablish(r.intr).catch(() => undefined);
    unmapGrant(this.hypercall, r.handle);
  }
}

/** dom0's own client: a ring page in dom0's memory, xenstored at its other end. */
export function localClient(ctx: Pick<KernelContext, 'domid' | 'hv'>, xsd: Xenstored, physmem: PhysMem): XenStore {
  const self = ctx.hv.domain(ctx.domid)!;
  const page = new FramePage(self.mem, physmem.alloc(), true);
  let client: XenStore | null = null;
  let server: XenstoredRing | null = null;
  client = new XenStore({ page, notify: () => queueMicrotask(() => server?.intr()), name: 'dom0' });
  server = new XenstoredRing(xsd, 0, page, () => queueMicrotask(() => client?.intr()));
  return client;
}

/** What the machine hands dom0 at boot. */
export type Dom0Args = {
  /** xenstored listens on <socketPath> when set. */
  socketPath?: string | undefined;
  limits?: Partial<XenstoredLimits> | undefined;
  /** The host's rundir: guests' consoles are concentrated under <rundir>/console. */
  rundir?: string | undefined;
  /** netback's tunables and bridges' options (pcap, ageing) by bridge name. */
  net?: { netback?: NetbackOptions | undefined; bridges?: Record<string, BridgeSetup> | undefined } | undefined;
};

/**
 * What a bridge is set up with: its own options, a DHCP server on a port of
 * its own, and a sink: a dom0 port at that MAC that takes frames and drops
 * them, counted (what `xenpv bench` measures a guest against).
 */
export type BridgeSetup = BridgeOptions & { dhcp?: DhcpdSpec | undefined; sink?: string | undefined };

/** dom0's network: one frame pool, the bridges (a DHCP server on those that ask), a netback per vif. */
function startNet(hypercall: Hypercall, intr: Interrupts, xs: XenStore, physmem: PhysMem, args: Dom0Args): NetbackSet {
  const bridges = new Bridges(new FramePool(hypercall, physmem));
  for (const [name, { dhcp, sink, ...opts }] of Object.entries(args.net?.bridges ?? {})) {
    bridges.configure(name, opts);
    if (sink !== undefined) bridges.attachLocal(name, { name: 'sink', mac: parseMac(sink), mtu: 65521 }).onFrame(() => undefined);
    if (dhcp === undefined) continue;
    // A locally administered address of its own, as a host on the bridge has.
    const port = bridges.attachLocal(name, { name: 'dhcpd', mac: Uint8Array.from([0x02, 0, 0, ...randomBytes(3)]) });
    new Dhcpd(port, parseDhcpdConfig(dhcp), { name });
  }
  return new NetbackSet(hypercall, intr, xs, bridges, args.net?.netback);
}

export async function main(ctx: KernelContext): Promise<void> {
  const args = (ctx.args ?? {}) as Dom0Args;
  const hypercall = ctx.hv.entry(ctx.domid);
  const { intr, physmem } = attachInterrupts(ctx, hypercall);
  const rings = new StoreRings(hypercall, intr);
  const xsd: Xenstored = new Xenstored({
    introduce: (domid, _gfn, evtchn) => rings.introduce(xsd, domid, evtchn),
    release: (domid) => rings.release(domid),
    limits: args.limits,
  });
  const socket = args.socketPath === undefined ? null : await XenstoredSocket.listen(xsd, args.socketPath);
  const xs = localClient(ctx, xsd, physmem);
  // One channel both ways: dom0 calls the machine's domctls, the machine calls the toolstack.
  const handlers: RpcHandlers = {};
  const rpc = new Rpc((m) => ctx.post(m), handlers);
  const platform: Platform = {
    createDomain: async (spec) => (await rpc.call('createdomain', spec)) as number,
    unpause: async (domid, kernel, args) => void (await rpc.call('unpause', { domid, kernel, args })),
    destroy: async (domid) => void (await rpc.call('destroy', { domid })),
  };
  const store: StoreIntroduce = {
    introduce: async (domid, gfn, evtchn) => void (await xs.cmd(XS_INTRODUCE, 0, joinStrings([String(domid), String(gfn), String(evtchn)]))),
    release: async (domid) => void (await xs.cmd(XS_RELEASE, 0, joinStrings([String(domid)]))),
  };
  const net = startNet(hypercall, intr, xs, physmem, args);
  const concentrator = args.rundir === undefined ? null : new Concentrator(args.rundir);
  let names: Toolstack | null = null;
  const consoles = new ConsoleBackend(
    hypercall, intr, (domid, text) => rpc.event('console', { domid, name: names?.nameOf(domid) ?? `dom${domid}`, text }), concentrator,
  );
  const vbds = new BlkbackSet(hypercall, intr, xs);
  const toolstack = new Toolstack(
    ctx.hv, hypercall, xs, store, consoles, platform,
    (exit) => rpc.event('exit', exit),
    new URL('../xen/kernel.js', import.meta.url).href,
    vbds,
    net,
  );
  names = toolstack;
  const domExc = intr.virqEstablish(VIRQ_DOM_EXC, () => toolstack.domainException(), 'dom-exc');
  intr.intrUnmask(domExc);
  Object.assign(handlers, {
    ping: () => 'pong',
    ...toolstackOps(toolstack),
    // Before the machine terminates this thread: the socket files go with the listeners.
    stop: async () => {
      net.bridges.close();
      await socket?.close();
      await concentrator?.closeAll();
    },
    'vbd-restart': (args: unknown) => {
      const a = args as { domid: number; devid: number };
      return vbds.restart(a.domid, a.devid);
    },
    'vif-restart': (args: unknown) => {
      const a = args as { domid: number; devid: number };
      return net.restart(a.domid, a.devid);
    },
    'net-stats': () => ({
      vifs: net.list(),
      bridges: net.bridges.list().map((b) => b.report()),
      pool: net.pool.stats,
    }),
    uplink: async (a: unknown) => {
      const { bridge, spec } = a as { bridge: string; spec: string };
      const u = await net.bridges.addUplink(bridge, parseUplink(spec));
      return { localPort: u.spec.localPort };
    },
    'bridge-config': (a: unknown) => net.bridges.configure((a as { bridge: string }).bridge, (a as { opts: BridgeOptions }).opts),
  } satisfies RpcHandlers);
  // Listening last: the machine's first call (ping) finds everything in place.
  ctx.onMessage((m) => rpc.receive(m));
  log('dom0 up');
}
