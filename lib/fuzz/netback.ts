// `xenpv fuzz frontend --device netback`: a guest that speaks raw bytes on a
// vif's TX and RX rings to a real netback, and the checks that netback holds.
// The whole host runs in this thread (lib/fuzz/world.ts), driven by one
// seeded generator, so a seed replays a run exactly; the digest of every
// response, every frame and every probe proves it.
//
// Cast: the attacker (a guest whose kernel attaches nothing; this file is
// its netfront) connects its vif with random features and sends valid
// frames to dom0's sink port mixed with malformed ones: more slots than
// XEN_NETIF_NR_SLOTS_MIN, slots crossing their page, a slot bigger than its
// frame, bad extras and GSO, a packet cut off at req_prod, grant refs not
// granted or granted to another domain (TX), read-only or foreign (RX),
// req_prod jumping beyond the ring or back, floods and event storms. The
// sink sends frames back into the attacker's posted RX buffers. A bystander
// guest's real xnf echoes frames off the sink all along.
//
// The checks are an independent model of netif.h: each TX request is
// answered once with the status its bytes call for (NETIF_RSP_NULL for each
// extra), each valid frame reaches the sink byte for byte, each frame for
// the attacker lands in the next posted buffer at offset 0 and nowhere else;
// a packet that breaks the protocol disables the vif with a logged reason
// (xenvif_fatal_tx_err); every other byte of the attacker's pages, the
// canary pages between them and the tail of each ring page stays as the
// attacker left it; the bystander's echo comes back within the bound.

import { createHash } from 'node:crypto';
import { GTF_permit_access, GTF_readonly, GTF_type_mask } from '../abi/grant_table.js';
import {
  NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, netifOffsets, NETRXF_data_validated, NETTXF_extra_info,
  NETTXF_more_data, XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_EXTRA_TYPE_MAX,
  XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL, XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6,
  XEN_NETIF_NR_SLOTS_MIN,
} from '../abi/netif.js';
import { __CONST_RING_SIZE, netif_rx_sring, netif_rx_sring_entry, netif_tx_sring, netif_tx_sring_entry } from '../abi/ring.js';
import { XenbusStateClosed, XenbusStateConnected, XenbusStateInitWait } from '../abi/xenbus.js';
import type { LocalPort } from '../backends/bridge.js';
import type { NicSpec } from '../backends/toolstack.js';
import { BUS_DMA_READ, BUS_DMA_WRITE, busDmaDomid } from '../busdma/busdma.js';
import { xnfInterfaces, type XnfSoftc } from '../drivers/xnf/xnf.js';
import { formatMac } from '../ether.js';
import type { IntrHandle } from '../evtchn/evtchn.js';
import { D, type Domain } from '../hypervisor/domain.js';
import { FramePage, PAGE_SIZE } from '../hypervisor/page.js';
import { FrontRing, SRING_RING_OFFSET } from '../xen/ring.js';
import type { XenSoftc } from '../xen/xen.js';
import { Harness, MAX_VIOLATIONS, count, type FuzzReport } from './report.js';
import { World } from './world.js';

const TX_SIZE = __CONST_RING_SIZE(netif_tx_sring, PAGE_SIZE);
const RX_SIZE = __CONST_RING_SIZE(netif_rx_sring, PAGE_SIZE);
const TX_BYTES = netif_tx_sring_entry.size;
const RX_BYTES = netif_rx_sring_entry.size;
const {
  TXQ_GREF, TXQ_OFFSET, TXQ_FLAGS, TXQ_ID, TXQ_SIZE, TXP_ID, TXP_STATUS, RXQ_ID, RXQ_GREF, RXP_ID, RXP_OFFSET,
  RXP_FLAGS, RXP_STATUS, EXT_TYPE, EXT_FLAGS, EXT_GSO_SIZE, EXT_GSO_TYPE, EXT_MCAST_ADDR
} = netifOffsets;

const ENTRIES_PER_FRAME = PAGE_SIZE / 8;
const OUT_OF_TABLE = 64 * ENTRIES_PER_FRAME;
const CANARY = 0xa5;
const RING_CANARY = 0x5a;
const ETHER_HDR_LEN = 14;
/** An ethertype that is neither IPv4 nor IPv6: nothing on the way looks into these frames. */
const ETHERTYPE_TEST = 0x88b5;
const PROBE_EVERY = 32;
const MEMORY_CHECK_EVERY = 64;
/** Beyond any run: no wall-clock timer of netback or the bridge may decide one. */
const NEVER_MS = 1e9;
const ATTACKER_MAC = '00:16:3e:00:00:0a';
const BYSTANDER_MAC = '00:16:3e:00:00:0b';
const SINK_MAC = Uint8Array.from([0x02, 0, 0, 0, 0, 0x5c]);
const MCAST_MAX = 64;
const RX_BACKLOG = 64;

/** T: TX data, granted read-only to dom0; W: RX buffers, writable; R: read-only; X: granted to the bystander. */
type Kind = 'T' | 'W' | 'R' | 'X';
const KINDS: Kind[] = [...Array<Kind>(12).fill('T'), ...Array<Kind>(8).fill('W'), ...Array<Kind>(2).fill('R'), ...Array<Kind>(2).fill('X')];

type Slot = { gref: number; offset: number; size: number; flags: number; id: number };
type Extra = { type: number; flags: number; gsoSize: number; gsoType: number; mcast: Uint8Array | null };
/** One TX packet as the attacker means it. */
type TxPacket = { label: string; slots: Slot[]; extras: Extra[]; frame: Uint8Array | null; fatal: boolean; status: number };
type Pending = { pkt: TxPacket; first: boolean };
type Posted = { id: number; gref: number; page: number | null; bad: boolean };

type Conn = {
  devid: number;
  tx: FrontRing; txHead: FramePage; txGfn: number;
  rx: FrontRing; rxHead: FramePage; rxGfn: number;
  ih: IntrHandle;
  canSg: boolean;
  txReqProd: number; txRspCons: number;
  rxReqProd: number; rxRspCons: number;
  /** Outstanding TX requests by id. */
  pending: Map<number, Pending>;
  /** RX requests posted, oldest first. */
  posted: Posted[];
  /** Frames the sink sent to the attacker, oldest first, not yet received. */
  expected: Uint8Array[];
  /** Why netback must have disabled this vif by the end of the step (null: it must still serve). */
  doomed: string | null;
  /** The vif was disabled: nothing more is expected of its rings. */
  dead: boolean;
  nextId: number;
  groups: Set<string>;
};

export type NetbackFuzzOptions = {
  seed: number;
  steps: number;
  /** An echo to the bystander later than this breaks the latency invariant. */
  latencyBoundMs?: number;
  onProgress?: (step: number) => void;
};

type Action = 'tx' | 'runt' | 'mcast' | 'rx' | 'bad tx' | 'bad rx' | 'jump' | 'flood' | 'storm' | 'reconnect';
const ACTION_WEIGHTS: Record<Action, number> = {
  tx: 300, runt: 20, mcast: 20, rx: 250, 'bad tx': 12, 'bad rx': 4, jump: 2, flood: 6, storm: 20, reconnect: 1,
};

const BAD_TX = [
  'too many slots', 'slot crosses its page', 'first slot crosses its page', 'slot bigger than the frame', 'extra of type 0',
  'extra of type >= MAX', 'GSO size 0', 'bad GSO type', 'too many extras', 'packet cut at req_prod', 'first ref not granted',
  'first ref out of the table', 'first ref granted to another domain', 'later ref not granted',
] as const;
const BAD_RX = ['ref read-only', 'ref granted to another domain', 'ref not granted', 'ref out of the table'] as const;

export class NetbackFuzz extends Harness {
  private readonly hash = createHash('sha256');
  private world!: World;
  private sc!: XenSoftc;
  private dom!: Domain;
  private bystander!: XnfSoftc;
  private sink!: LocalPort;
  private conn: Conn | null = null;
  private ih2: IntrHandle | null = null;
  private devid = 0;
  private base = 0;
  /** The attacker's two ring pages (TX, RX), granted once and initialised again at each connect. */
  private ringGfn = 0;
  private ringRefs: number[] = [];
  private readonly grefs: number[] = [];
  private readonly pageOfRef = new Map<number, number>();
  private region!: Uint8Array;
  private shadow!: Uint8Array;
  /** Frames the sink received from the attacker, in order. */
  private readonly sunk: Uint8Array[] = [];
  /** Frames the attacker sent that must reach the sink, in order. */
  private readonly toSink: Uint8Array[] = [];
  private echoed: ((frame: Uint8Array) => void) | null = null;
  private probeCounter = 0;
  private readonly txReq = new Uint8Array(TX_BYTES);
  private readonly txRsp = new Uint8Array(TX_BYTES);
  private readonly rxReq = new Uint8Array(RX_BYTES);
  private readonly rxRsp = new Uint8Array(RX_BYTES);

  constructor(private readonly opts: NetbackFuzzOptions) {
    super('frontend-netback', opts);
  }

  // --- setup -------------------------------------------------------------------------

  async run(): Promise<FuzzReport> {
    const start = performance.now();
    await this.setup();
    for (this.step = 0; this.step < this.opts.steps; this.step++) {
      await this.attack();
      if (this.step % PROBE_EVERY === PROBE_EVERY - 1) await this.probe();
      if (this.step % MEMORY_CHECK_EVERY === MEMORY_CHECK_EVERY - 1) this.checkAllMemory();
      if (this.report.violations.length >= MAX_VIOLATIONS) break;
      if ((this.step & 1023) === 0) this.opts.onProgress?.(this.step);
    }
    this.report.steps = this.step;
    await this.probe();
    this.checkAllMemory();
    this.report.refusals['port throttled'] = this.world.dom0.intr.throttles;
    this.report.digest = this.hash.digest('hex');
    this.report.ms = Math.round(performance.now() - start);
    return this.report;
  }

  private nic(devid: number, mac: string): NicSpec {
    return { devid, mac, bridge: 'xenbr0', mtu: 1500, rate: null, trusted: true, pcap: null, backend: null };
  }

  /** The host with a network, the sink, the bystander with a real xnf, the attacker and its buffers. */
  private async setup(): Promise<void> {
    const netback = { drainTimeoutMs: NEVER_MS, stallTimeoutMs: NEVER_MS, holdMs: NEVER_MS, maxQueues: 1 };
    this.world = new World({ net: { netback, ageingMs: NEVER_MS }, dom0MemoryMiB: 24 });
    const w = this.world;
    this.sink = w.dom0.net!.bridges.attachLocal('xenbr0', { name: 'sink', mac: SINK_MAC });
    this.sink.onFrame((frame) => this.sinkFrame(frame));
    const by = await w.createGuest({ name: 'bystander', vifs: [this.nic(0, BYSTANDER_MAC)] });
    this.bystander = xnfInterfaces(by)[0]!;
    this.bystander.input = (frame) => this.echoed?.(frame);
    this.sc = await w.createGuest({ name: 'attacker', memoryMiB: 4, probe: false, vifs: [this.nic(0, ATTACKER_MAC)] });
    this.dom = w.host.domain(this.sc.domid);
    this.makeBuffers();
    await w.run(this.connect(), 'first connect');
  }

  /** 2n+1 pages: canaries around every buffer; each buffer granted once, for the whole run. */
  private makeBuffers(): void {
    const n = KINDS.length;
    const { physmem, dmat, mem } = this.sc;
    this.base = physmem.alloc(2 * n + 1);
    this.region = mem.u8.subarray(this.base * PAGE_SIZE, (this.base + 2 * n + 1) * PAGE_SIZE);
    for (let k = 0; k <= n; k++) this.region.fill(CANARY, 2 * k * PAGE_SIZE, (2 * k + 1) * PAGE_SIZE);
    for (let k = 0; k < n; k++) this.rng.fill(this.region.subarray((2 * k + 1) * PAGE_SIZE, (2 * k + 2) * PAGE_SIZE));
    this.shadow = this.region.slice();
    for (const [k, kind] of KINDS.entries()) {
      const map = dmat.dmamapCreate(PAGE_SIZE, 1, PAGE_SIZE, PAGE_SIZE, 0);
      const seg = { ds_addr: (this.base + 2 * k + 1) * PAGE_SIZE, ds_len: PAGE_SIZE, ds_offset: 0 };
      const to = kind === 'X' ? this.bystander.sc.domid : 0;
      dmat.dmamapLoadRaw(map, [seg], PAGE_SIZE, busDmaDomid(to) | (kind === 'W' ? BUS_DMA_READ : BUS_DMA_WRITE));
      const gref = map.dm_segs[0]!.ds_addr;
      this.grefs.push(gref);
      this.pageOfRef.set(gref, k);
    }
  }

  private pagesOf(kind: Kind): number[] {
    return KINDS.flatMap((k, i) => (k === kind ? [i] : []));
  }

  private readonly tPages = this.pagesOf('T');
  // Where this step places TX data: pages used since placeFirst, offset in the current one.
  private placeFirst = 0;
  private placed = 0;
  private placeOff = 0;
  private readonly wPages = this.pagesOf('W');

  // --- the frontend's handshake ----------------------------------------------------------

  private get fe(): string {
    return `device/vif/${this.devid}`;
  }

  /** talk_to_netback with random choices: rings, one channel or two, features; Connected. */
  private async connect(): Promise<void> {
    const { xs, physmem, dmat, mem, intr } = this.sc;
    const be = await xs.read(`${this.fe}/backend`);
    await xs.awaitState(`${be}/state`, XenbusStateInitWait, { timeoutMs: 30_000 });
    if (this.ringRefs.length === 0) {
      this.ringGfn = physmem.alloc(2);
      const map = dmat.dmamapCreate(2 * PAGE_SIZE, 2, PAGE_SIZE, PAGE_SIZE, 0);
      dmat.dmamapLoadRaw(map, [{ ds_addr: this.ringGfn * PAGE_SIZE, ds_len: 2 * PAGE_SIZE, ds_offset: 0 }], 2 * PAGE_SIZE, busDmaDomid(0));
      this.ringRefs = [map.dm_segs[0]!.ds_addr, map.dm_segs[1]!.ds_addr];
    }
    const gfn = this.ringGfn;
    mem.u8.fill(0, gfn * PAGE_SIZE, (gfn + 2) * PAGE_SIZE);
    const txHead = new FramePage(mem, gfn, true);
    const rxHead = new FramePage(mem, gfn + 1, true);
    const tx = new FrontRing([txHead], TX_BYTES, TX_SIZE, 'attacker-tx');
    const rx = new FrontRing([rxHead], RX_BYTES, RX_SIZE, 'attacker-rx');
    tx.init();
    rx.init();
    mem.u8.fill(RING_CANARY, gfn * PAGE_SIZE + SRING_RING_OFFSET + TX_SIZE * TX_BYTES, (gfn + 1) * PAGE_SIZE);
    mem.u8.fill(RING_CANARY, (gfn + 1) * PAGE_SIZE + SRING_RING_OFFSET + RX_SIZE * RX_BYTES, (gfn + 2) * PAGE_SIZE);
    // The attacker takes responses when it likes; its handler does nothing.
    const ih = intr.intrEstablish(0, 0, () => undefined, 'attacker');
    intr.intrUnmask(ih);
    const split = this.rng.chance(0.3);
    const ih2 = split ? intr.intrEstablish(0, 0, () => undefined, 'attacker-rx') : null;
    this.ih2 = ih2;
    const canSg = this.rng.chance(0.5);
    const gso = this.rng.chance(0.5);
    const mcast = this.rng.chance(0.5);
    this.conn = {
      devid: this.devid, tx, txHead, txGfn: gfn, rx, rxHead, rxGfn: gfn + 1, ih, canSg,
      txReqProd: 0, txRspCons: 0, rxReqProd: 0, rxRspCons: 0, pending: new Map(), posted: [], expected: [],
      doomed: null, dead: false, nextId: this.rng.int(0x10000), groups: new Set(),
    };
    this.count(`connect${split ? ' split' : ''}${canSg ? ' sg' : ''}${gso ? ' gso' : ''}${mcast ? ' mcast' : ''}`);
    await xs.transaction(async (t) => {
      await t.write(`${this.fe}/tx-ring-ref`, String(this.ringRefs[0]));
      await t.write(`${this.fe}/rx-ring-ref`, String(this.ringRefs[1]));
      if (ih2 !== null) {
        await t.write(`${this.fe}/event-channel-tx`, String(ih.port));
        await t.write(`${this.fe}/event-channel-rx`, String(ih2.port));
      } else {
        await t.write(`${this.fe}/event-channel`, String(ih.port));
      }
      await t.write(`${this.fe}/request-rx-copy`, '1');
      await t.write(`${this.fe}/feature-rx-notify`, '1');
      await t.write(`${this.fe}/feature-sg`, canSg ? '1' : '0');
      await t.write(`${this.fe}/feature-gso-tcpv4`, gso ? '1' : '0');
      await t.write(`${this.fe}/request-multicast-control`, mcast ? '1' : '0');
      await t.write(`${this.fe}/state`, String(XenbusStateConnected));
    });
    await xs.awaitState(`${be}/state`, XenbusStateConnected, { timeoutMs: 30_000 });
    if (ih2 !== null) intr.intrUnmask(ih2);
  }

  /** Closed, the vif unplugged and plugged again (`xl network-detach` + `network-attach`), connect afresh. */
  private async replug(): Promise<void> {
    const { xs, intr } = this.sc;
    const ts = this.world.dom0.toolstack;
    await xs.write(`${this.fe}/state`, String(XenbusStateClosed));
    await ts.networkDetach(this.sc.domid, this.devid);
    await intr.intrDisestablish(this.conn!.ih).catch(() => undefined);
    if (this.ih2 !== null) await intr.intrDisestablish(this.ih2).catch(() => undefined);
    this.ih2 = null;
    this.conn = null;
    this.devid = (this.devid + 1) % 4;
    await ts.networkAttach(this.sc.domid, this.nic(this.devid, ATTACKER_MAC));
    await this.connect();
  }

  // --- the attack ---------------------------------------------------------------------------

  private async attack(): Promise<void> {
    const c = this.conn!;
    const action = this.rng.weighted(ACTION_WEIGHTS);
    this.count(action);
    this.placeFirst = this.rng.int(this.tPages.length);
    this.placed = this.placeOff = 0;
    switch (action) {
      case 'tx':
        for (let i = this.rng.range(1, 4); i > 0; i--) this.sendTx(c, this.validPacket(c));
        this.pushTx(c);
        break;
      case 'runt':
        this.sendTx(c, this.runt(c));
        this.pushTx(c);
        break;
      case 'mcast':
        this.sendTx(c, this.mcast(c));
        this.pushTx(c);
        break;
      case 'rx':
        this.postRx(c, this.rng.range(0, 8), false);
        this.sinkSend(c, this.rng.range(0, 8));
        break;
      case 'bad tx':
        this.badTx(c);
        break;
      case 'bad rx':
        this.postRx(c, this.rng.range(0, 3), false);
        this.postRx(c, 1, true);
        this.sinkSend(c, c.posted.length + c.expected.length === 0 ? 1 : this.rng.range(1, 8));
        break;
      case 'jump':
        this.jump(c);
        break;
      case 'flood':
        while (((c.txReqProd - c.txRspCons) >>> 0) + 2 <= TX_SIZE && this.sendTx(c, this.validPacket(c, 1, true)));
        this.pushTx(c);
        break;
      case 'storm':
        for (let i = this.rng.range(50, 1000); i > 0; i--) this.sc.intr.intrSignal(this.ih2 !== null && (i & 1) === 1 ? this.ih2 : c.ih);
        break;
      case 'reconnect':
        break;
    }
    await this.exchange();
    if (this.conn!.dead) this.report.ringBreaks++;
    if (this.conn!.dead || action === 'reconnect') await this.world.run(this.replug(), 'replug');
  }

  private frame(len: number, dst: Uint8Array): Uint8Array {
    const f = this.bytes(Math.max(len, ETHER_HDR_LEN));
    f.set(dst, 0);
    f.set([0x00, 0x16, 0x3e, 0x00, 0x00, 0x0a], 6);
    f[12] = ETHERTYPE_TEST >> 8;
    f[13] = ETHERTYPE_TEST & 0xff;
    return f.subarray(0, len);
  }

  /** Random bytes, four to a draw (frames are many and long). */
  private bytes(n: number): Uint8Array {
    const b = new Uint8Array((n + 3) & ~3);
    const w = new Uint32Array(b.buffer);
    for (let i = 0; i < w.length; i++) w[i] = this.rng.u32();
    return b.subarray(0, n);
  }

  private id(c: Conn): number {
    for (;;) {
      const id = c.nextId;
      c.nextId = (c.nextId + 1) & 0xffff;
      if (!c.pending.has(id)) return id;
    }
  }

  /** A valid frame for the sink in `n` slots (random when not given) of the T pages, at random offsets. */
  private validPacket(c: Conn, n?: number, small = false, firstMin = ETHER_HDR_LEN): TxPacket | null {
    const slots = n ?? (this.rng.chance(0.05) ? this.rng.range(5, XEN_NETIF_NR_SLOTS_MIN) : this.rng.range(1, 4));
    const max = small ? 64 : this.rng.chance(0.3) ? PAGE_SIZE : 600;
    const sizes = Array.from({ length: slots }, () => this.rng.range(slots === 1 ? ETHER_HDR_LEN : 1, max));
    sizes[0] = Math.max(sizes[0]!, firstMin, ETHER_HDR_LEN);
    const total = sizes.reduce((a, b) => a + b, 0);
    if (total > 0xffff) sizes.fill(ETHER_HDR_LEN);
    const frame = this.frame(sizes.reduce((a, b) => a + b, 0), this.rng.chance(0.9) ? SINK_MAC : Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]));
    const pkt = this.layout(c, frame, sizes, 'valid');
    if (pkt === null) return null;
    if (this.rng.chance(0.15)) {
      pkt.extras.push({ type: XEN_NETIF_EXTRA_TYPE_GSO, flags: 0, gsoSize: this.rng.range(1, 0xffff), gsoType: XEN_NETIF_GSO_TYPE_TCPV4, mcast: null });
      pkt.slots[0]!.flags |= NETTXF_extra_info;
      pkt.label = 'valid with GSO';
    }
    return pkt;
  }

  /**
   * The frame's bytes into the T pages, one slot per size, each piece where
   * no other piece of this step lies (netback reads them only when the step
   * pushes). Null when this step has used up the pages.
   */
  private layout(c: Conn, frame: Uint8Array, sizes: number[], label: string): TxPacket | null {
    const slots: Slot[] = [];
    const places: [number, number][] = [];
    for (const size of sizes) {
      const place = this.place(size);
      if (place === null) return null;
      places.push(place);
    }
    let at = 0;
    for (const [i, size] of sizes.entries()) {
      const [k, offset] = places[i]!;
      this.write(k, offset, frame.subarray(at, at + size));
      at += size;
      slots.push({ gref: this.grefs[k]!, offset, size: i === 0 ? frame.length : size, flags: i + 1 < sizes.length ? NETTXF_more_data : 0, id: this.id(c) });
    }
    return { label, slots, extras: [], frame, fatal: false, status: NETIF_RSP_OKAY };
  }

  /** Room for `size` bytes in the T pages after what this step placed: [page, offset], or null. */
  private place(size: number): [number, number] | null {
    for (;;) {
      if (this.placed >= this.tPages.length) return null;
      const off = this.placeOff + this.rng.int(64);
      if (off + size <= PAGE_SIZE) {
        this.placeOff = off + size;
        return [this.tPages[(this.placeFirst + this.placed) % this.tPages.length]!, off];
      }
      this.placed++;
      this.placeOff = 0;
    }
  }

  private write(k: number, offset: number, bytes: Uint8Array): void {
    const at = (2 * k + 1) * PAGE_SIZE + offset;
    this.region.set(bytes, at);
    this.shadow.set(bytes, at);
  }

  /** Shorter than an Ethernet header: answered NETIF_RSP_ERROR, the vif carries on (xenvif_tx_err). */
  private runt(c: Conn): TxPacket | null {
    const frame = this.frame(this.rng.range(1, ETHER_HDR_LEN - 1), SINK_MAC);
    const pkt = this.layout(c, frame, [frame.length], 'runt');
    if (pkt === null) return null;
    pkt.frame = null;
    pkt.status = NETIF_RSP_ERROR;
    return pkt;
  }

  /** A dummy request with an MCAST_ADD/DEL extra: OKAY for a multicast address (while the list has room), else ERROR. */
  private mcast(c: Conn): TxPacket {
    const addr = this.rng.fill(new Uint8Array(6));
    if (this.rng.chance(0.8)) addr[0]! |= 1;
    addr[5] = addr[5]! & 7;
    const add = this.rng.chance(0.6);
    const key = formatMac(addr);
    let status = (addr[0]! & 1) === 0 ? NETIF_RSP_ERROR : NETIF_RSP_OKAY;
    if (status === NETIF_RSP_OKAY && add && !c.groups.has(key) && c.groups.size >= MCAST_MAX) status = NETIF_RSP_ERROR;
    if (status === NETIF_RSP_OKAY) {
      if (add) c.groups.add(key);
      else c.groups.delete(key);
    }
    const type = add ? XEN_NETIF_EXTRA_TYPE_MCAST_ADD : XEN_NETIF_EXTRA_TYPE_MCAST_DEL;
    return {
      label: add ? 'mcast add' : 'mcast del', frame: null, fatal: false, status,
      slots: [{ gref: 0, offset: 0, size: 0, flags: NETTXF_extra_info, id: this.id(c) }],
      extras: [{ type, flags: 0, gsoSize: 0, gsoType: 0, mcast: addr }],
    };
  }

  /** One of the packets that break netif.h; the vif must be disabled for it. */
  private badTx(c: Conn): void {
    const what = this.rng.pick(BAD_TX);
    this.count(`sent ${what}`);
    // Good frames first: they must still be answered and delivered.
    for (let i = this.rng.range(0, 2); i > 0; i--) this.sendTx(c, this.validPacket(c));
    // Placed last, when the step may have used up the pages: netback never reads its bytes (but for the header).
    // 'later ref not granted' with a first slot longer than the header netback reads at once: only the sink's copy meets it.
    const later = what === 'later ref not granted';
    const pkt = this.validPacket(c, what === 'too many slots' ? this.rng.range(XEN_NETIF_NR_SLOTS_MIN + 1, 40) : this.rng.range(2, 4), !later, later ? 512 : 0);
    if (pkt === null) return this.pushTx(c);
    pkt.label = what;
    pkt.fatal = true;
    const s = pkt.slots;
    const gso = (gsoSize: number, gsoType: number): void => {
      pkt.extras = [{ type: XEN_NETIF_EXTRA_TYPE_GSO, flags: 0, gsoSize, gsoType, mcast: null }];
      s[0]!.flags |= NETTXF_extra_info;
    };
    switch (what) {
      case 'too many slots':
        break;
      case 'slot crosses its page':
        s[1]!.offset = this.rng.range(PAGE_SIZE - s[1]!.size + 1, 0xffff);
        break;
      case 'first slot crosses its page':
        s[0]!.offset = this.rng.range(PAGE_SIZE - (s[0]!.size - s.slice(1).reduce((a, x) => a + x.size, 0)) + 1, 0xffff);
        break;
      case 'slot bigger than the frame':
        s[1]!.size = Math.min(PAGE_SIZE, s[0]!.size + 1);
        s[1]!.offset = 0;
        if (s[1]!.size <= s[0]!.size) s[0]!.size = s[1]!.size - 1;
        break;
      case 'extra of type 0':
        pkt.extras = [{ type: 0, flags: 0, gsoSize: 0, gsoType: 0, mcast: null }];
        s[0]!.flags |= NETTXF_extra_info;
        break;
      case 'extra of type >= MAX':
        pkt.extras = [{ type: this.rng.range(XEN_NETIF_EXTRA_TYPE_MAX, 255), flags: 0, gsoSize: 0, gsoType: 0, mcast: null }];
        s[0]!.flags |= NETTXF_extra_info;
        break;
      case 'GSO size 0':
        gso(0, XEN_NETIF_GSO_TYPE_TCPV4);
        break;
      case 'bad GSO type':
        gso(1448, this.rng.pick([0, 3, 4, 255].filter((t) => t !== XEN_NETIF_GSO_TYPE_TCPV6)));
        break;
      case 'too many extras':
        gso(1448, XEN_NETIF_GSO_TYPE_TCPV4);
        pkt.extras = Array.from({ length: XEN_NETIF_EXTRA_TYPE_MAX + 1 }, () => ({ ...pkt.extras[0]!, flags: XEN_NETIF_EXTRA_FLAG_MORE }));
        break;
      case 'packet cut at req_prod':
        break;
      case 'first ref not granted':
        s[0]!.gref = this.notGranted();
        break;
      case 'first ref out of the table':
        s[0]!.gref = OUT_OF_TABLE + this.rng.int(0x7fff0000);
        break;
      case 'first ref granted to another domain':
        s[0]!.gref = this.grefs[this.rng.pick(this.pagesOf('X'))]!;
        break;
      case 'later ref not granted':
        s[1]!.gref = this.notGranted();
        pkt.frame = Uint8Array.from(pkt.frame!);
        pkt.frame.set(SINK_MAC, 0);
        break;
    }
    if (what === 'packet cut at req_prod') {
      // The last slot says more_data, and nothing follows it.
      s[s.length - 1]!.flags |= NETTXF_more_data;
    }
    c.doomed = what;
    this.sendTx(c, pkt);
    this.pushTx(c);
  }

  /** A ref in the table that the attacker has not granted. */
  private notGranted(): number {
    for (;;) {
      const ref = this.rng.range(8, ENTRIES_PER_FRAME - 1);
      if (this.entry(ref) === 0) return ref;
    }
  }

  /** Lay the packet out on the TX ring: its first slot, its extras, its other slots. */
  private sendTx(c: Conn, p: TxPacket | null): boolean {
    if (p === null) return false;
    const v = new DataView(this.txReq.buffer);
    const put = (): void => {
      c.tx.writeSlot(c.txReqProd, this.txReq);
      c.txReqProd = (c.txReqProd + 1) >>> 0;
    };
    const slot = (s: Slot): void => {
      this.txReq.fill(0);
      v.setUint32(TXQ_GREF, s.gref, true);
      v.setUint16(TXQ_OFFSET, s.offset & 0xffff, true);
      v.setUint16(TXQ_FLAGS, s.flags, true);
      v.setUint16(TXQ_ID, s.id, true);
      v.setUint16(TXQ_SIZE, s.size & 0xffff, true);
      put();
      c.pending.set(s.id, { pkt: p, first: s === p.slots[0] });
    };
    slot(p.slots[0]!);
    for (const [i, e] of p.extras.entries()) {
      this.txReq.fill(0);
      this.txReq[EXT_TYPE] = e.type;
      this.txReq[EXT_FLAGS] = e.flags | (i + 1 < p.extras.length ? XEN_NETIF_EXTRA_FLAG_MORE : 0);
      if (e.mcast !== null) this.txReq.set(e.mcast, EXT_MCAST_ADDR);
      else {
        v.setUint16(EXT_GSO_SIZE, e.gsoSize, true);
        this.txReq[EXT_GSO_TYPE] = e.gsoType;
      }
      put();
    }
    for (const s of p.slots.slice(1)) slot(s);
    if (!p.fatal && p.frame !== null && p.status === NETIF_RSP_OKAY) this.toSink.push(p.frame);
    count(this.report.actions, `sent ${p.label}`);
    return true;
  }

  private pushTx(c: Conn): void {
    c.txHead.store32(0, c.txReqProd);
    this.sc.intr.intrSignal(c.ih);
  }

  /** Post `n` RX buffers: W pages, or (bad) one ref netback may not write. */
  private postRx(c: Conn, n: number, bad: boolean): void {
    const v = new DataView(this.rxReq.buffer);
    for (let i = 0; i < n && ((c.rxReqProd - c.rxRspCons) >>> 0) < RX_SIZE; i++) {
      let page: number | null = this.rng.pick(this.wPages);
      let gref = this.grefs[page]!;
      if (bad) {
        const what = this.rng.pick(BAD_RX);
        this.count(`posted ${what}`);
        page = null;
        if (what === 'ref read-only') gref = this.grefs[this.rng.pick(this.pagesOf('R'))]!;
        else if (what === 'ref granted to another domain') gref = this.grefs[this.rng.pick(this.pagesOf('X'))]!;
        else if (what === 'ref not granted') gref = this.notGranted();
        else gref = OUT_OF_TABLE + this.rng.int(0x7fff0000);
      }
      const id = this.rng.int(0x10000);
      this.rxReq.fill(0);
      v.setUint16(RXQ_ID, id, true);
      v.setUint32(RXQ_GREF, gref, true);
      c.rx.writeSlot(c.rxReqProd, this.rxReq);
      c.rxReqProd = (c.rxReqProd + 1) >>> 0;
      c.posted.push({ id, gref, page, bad });
    }
    c.rxHead.store32(0, c.rxReqProd);
    this.sc.intr.intrSignal(this.ih2 ?? c.ih);
  }

  /** The sink sends `n` frames to the attacker; a bad buffer they reach dooms the vif. */
  private sinkSend(c: Conn, n: number, force = false): void {
    // At most RX_BACKLOG frames wait for buffers: netback's queue and dom0's pool stay far from full.
    if (!force) n = Math.min(n, RX_BACKLOG + c.posted.length - c.expected.length);
    for (let i = 0; i < n; i++) {
      const f = this.frame(this.rng.range(ETHER_HDR_LEN, 1514), new Uint8Array(6));
      f.set([0x00, 0x16, 0x3e, 0x00, 0x00, 0x0a], 0);
      f.set(SINK_MAC, 6);
      c.expected.push(f);
      void this.sink.send(f);
    }
    const reach = Math.min(c.posted.length, c.expected.length);
    for (let i = 0; i < reach; i++) if (c.posted[i]!.bad) c.doomed ??= 'a frame for a buffer netback may not write';
  }

  /** req_prod beyond the ring or back, on either ring. */
  private jump(c: Conn): void {
    const tx = this.rng.chance(0.6);
    // Back only on TX: netback has read its req_prod after every step, not always the RX ring's.
    const back = tx && this.rng.chance(0.3);
    this.count(`jump ${tx ? 'tx' : 'rx'} ${back ? 'back' : 'ahead'}`);
    if (tx) {
      const prod = back ? (c.txReqProd - this.rng.range(1, 1000)) >>> 0 : (c.txRspCons + TX_SIZE + this.rng.range(1, 0x7fffffff)) >>> 0;
      c.txHead.store32(0, prod);
      this.sc.intr.intrSignal(c.ih);
      c.doomed = 'tx req_prod jumped';
    } else {
      const prod = back ? (c.rxReqProd - this.rng.range(1, 1000)) >>> 0 : (c.rxRspCons + RX_SIZE + this.rng.range(1, 0x7fffffff)) >>> 0;
      c.rxHead.store32(0, prod);
      this.sc.intr.intrSignal(this.ih2 ?? c.ih);
      // Netback reads the RX ring when a frame waits for it.
      this.sinkSend(c, 1, true);
      c.doomed = 'rx req_prod jumped';
    }
  }

  // --- answers and checks -------------------------------------------------------------------

  private async exchange(): Promise<void> {
    await this.world.drain();
    const c = this.conn!;
    this.collectTx(c);
    this.collectRx(c);
    this.checkSink(c);
    this.checkState(c);
    this.checkAllMemoryCheap(c);
    this.checkHandlers([['dom0', this.world.dom0.intr]]);
  }

  private vif(c: Conn): { state: string; reason: string | null } | undefined {
    return this.world.dom0.net!.list().find((v) => v.name === `vif${this.sc.domid}.${c.devid}`);
  }

  /** Disabled with a reason exactly when the model says so; else every request answered. */
  private checkState(c: Conn): void {
    const vif = this.vif(c);
    if (vif === undefined) return this.violation(`vif ${c.devid} is gone`);
    if (c.doomed !== null) {
      if (vif.state !== 'disabled' || vif.reason === null) this.violation(`${c.doomed}: the vif is ${vif.state}, not disabled with a reason`);
      else count(this.report.refusals, `disabled: ${vif.reason.replace(/\d+/g, 'N')}`);
      c.dead = true;
      return;
    }
    if (vif.state !== 'connected') {
      this.violation(`the vif is ${vif.state} (${vif.reason}) with nothing wrong sent`);
      c.dead = true;
      return;
    }
    if (c.pending.size > 0) {
      this.violation(`${c.pending.size} TX request(s) left unanswered (first: ${[...c.pending.values()][0]!.pkt.label})`);
      c.pending.clear();
    }
    const waiting = Math.min(c.posted.length, c.expected.length);
    if (waiting > 0) this.violation(`${waiting} frame(s) for the attacker wait while buffers are posted`);
  }

  /** TX responses: each for an outstanding id, with its packet's status, NETIF_RSP_NULL after each extra. */
  private collectTx(c: Conn): void {
    const prod = c.txHead.load32(8);
    const avail = (prod - c.txRspCons) >>> 0;
    if (avail > ((c.txReqProd - c.txRspCons) >>> 0) && c.doomed === null) {
      this.violation(`tx rsp_prod ${prod} beyond the requests sent`);
      return;
    }
    const v = new DataView(this.txRsp.buffer);
    let nulls = 0;
    for (let i = 0; i < Math.min(avail, TX_SIZE); i++) {
      c.tx.readSlot(c.txRspCons, this.txRsp);
      c.txRspCons = (c.txRspCons + 1) >>> 0;
      this.hash.update(this.txRsp.subarray(0, 4));
      const id = v.getUint16(TXP_ID, true);
      const status = v.getInt16(TXP_STATUS, true);
      if (nulls > 0) {
        if (status !== NETIF_RSP_NULL) this.violation(`tx: status ${status} where an extra's NETIF_RSP_NULL belongs`);
        nulls--;
        continue;
      }
      const p = c.pending.get(id);
      if (p === undefined) {
        this.violation(`tx response for id ${id}, never sent or answered twice`);
        continue;
      }
      c.pending.delete(id);
      count(this.report.refusals, status === NETIF_RSP_OKAY ? 'OKAY' : status === NETIF_RSP_ERROR ? 'NETIF_RSP_ERROR' : `status ${status}`);
      if (p.pkt.fatal) this.violation(`${p.pkt.label}: answered ${status}, the vif must be disabled`);
      else if (status !== p.pkt.status) this.violation(`${p.pkt.label}: status ${status}, expected ${p.pkt.status}`);
      if (p.first) nulls = p.pkt.extras.length;
    }
    c.txHead.store32(12, (c.txRspCons + 1) >>> 0);
  }

  /** RX responses: the next posted buffer, offset 0, the next frame's length and bytes, data_validated. */
  private collectRx(c: Conn): void {
    const prod = c.rxHead.load32(8);
    const avail = (prod - c.rxRspCons) >>> 0;
    if (avail > ((c.rxReqProd - c.rxRspCons) >>> 0) && c.doomed === null) {
      this.violation(`rx rsp_prod ${prod} beyond the buffers posted`);
      return;
    }
    const v = new DataView(this.rxRsp.buffer);
    for (let i = 0; i < Math.min(avail, RX_SIZE); i++) {
      c.rx.readSlot(c.rxRspCons, this.rxRsp);
      c.rxRspCons = (c.rxRspCons + 1) >>> 0;
      this.hash.update(this.rxRsp);
      const post = c.posted.shift();
      const frame = c.expected.shift();
      if (post === undefined || frame === undefined) {
        this.violation('rx response with no buffer posted or no frame sent');
        continue;
      }
      const id = v.getUint16(RXP_ID, true);
      const offset = v.getUint16(RXP_OFFSET, true);
      const flags = v.getUint16(RXP_FLAGS, true);
      const status = v.getInt16(RXP_STATUS, true);
      if (post.bad) {
        this.violation(`rx: a frame answered into a buffer netback may not write (ref ${post.gref}, status ${status})`);
        continue;
      }
      if (id !== post.id || offset !== 0 || status !== frame.length || flags !== NETRXF_data_validated) {
        this.violation(`rx response id ${id} offset ${offset} flags ${flags} status ${status}; expected id ${post.id}, offset 0, flags ${NETRXF_data_validated}, ${frame.length} bytes`);
        continue;
      }
      count(this.report.refusals, 'rx OKAY');
      // The frame lands at the start of the buffer; the rest of the page stays.
      this.shadow.set(frame, (2 * post.page! + 1) * PAGE_SIZE);
    }
    c.rxHead.store32(12, (c.rxRspCons + 1) >>> 0);
  }

  /** What the sink got from the attacker equals what the attacker sent, in order. */
  private checkSink(c: Conn): void {
    for (const f of this.sunk) {
      const want = this.toSink.shift();
      this.hash.update(f);
      if (want === undefined) {
        this.violation(`the sink got a frame of ${f.length} bytes the attacker never sent whole`);
        continue;
      }
      if (Buffer.compare(f, want) !== 0) this.violation(`the sink got ${f.length} bytes, not the ${want.length} sent`);
    }
    this.sunk.length = 0;
    // Frames sent before a fatal packet must arrive too: netback served them before it met it.
    if (this.toSink.length > 0) this.violation(`${this.toSink.length} frame(s) never reached the sink`);
    this.toSink.length = 0;
  }

  private sinkFrame(frame: Uint8Array): void {
    if (frame[6] === 0x00 && frame[11] === 0x0a) {
      this.sunk.push(frame.slice());
      return;
    }
    if (frame[11] !== 0x0b) return;
    // The bystander's probe: back where it came from.
    const echo = frame.slice();
    echo.copyWithin(0, 6, 12);
    echo.set(SINK_MAC, 6);
    queueMicrotask(() => void this.sink.send(echo));
  }

  /** The attacker's grant entry `ref` as dom0 sees it: 0 no access, 1 read-only, 2 writable. */
  private entry(ref: number): number {
    const d = this.dom;
    if (ref >= Atomics.load(d.ctl, D.nrGrantFrames) * ENTRIES_PER_FRAME) return 0;
    const gfn = d.ctl[D.grantFrames + Math.floor(ref / ENTRIES_PER_FRAME)] ?? 0;
    const at = (gfn * PAGE_SIZE + (ref % ENTRIES_PER_FRAME) * 8) >> 2;
    const word = Atomics.load(d.mem.u32, at);
    const flags = word & 0xffff;
    if ((flags & GTF_type_mask) !== GTF_permit_access || word >>> 16 !== 0) return 0;
    return (flags & GTF_readonly) !== 0 ? 1 : 2;
  }

  private checkPage(k: number): void {
    const from = 2 * k * PAGE_SIZE;
    const to = from + 3 * PAGE_SIZE;
    if (Buffer.compare(this.view(this.region, from, to), this.view(this.shadow, from, to)) !== 0) this.memoryViolation(from, to);
  }

  /** After each step, the W pages (the only ones netback may write) and their canaries. */
  private checkAllMemoryCheap(c: Conn): void {
    if (c.doomed !== null || this.step % 8 === 0) for (const k of this.wPages) this.checkPage(k);
  }

  private checkAllMemory(): void {
    if (Buffer.compare(this.view(this.region, 0, this.region.length), this.view(this.shadow, 0, this.shadow.length)) !== 0) {
      this.memoryViolation(0, this.region.length);
      this.region.set(this.shadow);
    }
    const c = this.conn;
    if (c === null) return;
    const u8 = this.sc.mem.u8;
    const tails: [number, number][] = [[c.txGfn, SRING_RING_OFFSET + TX_SIZE * TX_BYTES], [c.rxGfn, SRING_RING_OFFSET + RX_SIZE * RX_BYTES]];
    for (const [gfn, end] of tails) {
      for (let i = gfn * PAGE_SIZE + end; i < (gfn + 1) * PAGE_SIZE; i++) {
        if (u8[i] !== RING_CANARY) return this.violation('a write past a ring\'s entries');
      }
    }
  }

  private view(a: Uint8Array, from: number, to: number): Buffer {
    return Buffer.from(a.buffer, a.byteOffset + from, to - from);
  }

  private memoryViolation(from: number, to: number): void {
    let i = from;
    while (i < to && this.region[i] === this.shadow[i]) i++;
    const page = Math.floor(i / PAGE_SIZE);
    const what = page % 2 === 0 ? `the canary page before buffer ${page / 2}` : `buffer ${(page - 1) / 2} (${KINDS[(page - 1) / 2]})`;
    this.violation(`memory of ${what} changed at byte ${i % PAGE_SIZE}: ${this.region[i]} where the model has ${this.shadow[i]}`);
    this.shadow.set(this.region.subarray(from, to), from);
  }

  /** The bystander's xnf sends a frame to the sink, which sends it back: within the bound. */
  private async probe(): Promise<void> {
    const t0 = performance.now();
    const x = this.bystander;
    const f = this.bytes(this.rng.range(60, 1514)).slice();
    f.set(SINK_MAC, 0);
    f.set([0x00, 0x16, 0x3e, 0x00, 0x00, 0x0b], 6);
    f[12] = ETHERTYPE_TEST >> 8;
    f[13] = ETHERTYPE_TEST & 0xff;
    f[14] = ++this.probeCounter & 0xff;
    try {
      const back = new Promise<Uint8Array>((resolve) => {
        this.echoed = (frame) => {
          if (frame[14] === f[14] && frame.length === f.length) resolve(frame.slice());
        };
      });
      await this.world.run(x.send(f), 'bystander send');
      const got = await this.world.run(back, 'bystander echo');
      if (Buffer.compare(got.subarray(12), f.subarray(12)) !== 0) this.violation('the bystander\'s echo came back changed');
      this.hash.update(got);
    } catch (err) {
      this.violation(`the bystander's network failed: ${(err as Error).message}`);
    } finally {
      this.echoed = null;
    }
    const ms = performance.now() - t0;
    this.report.maxProbeLatencyMs = Math.max(this.report.maxProbeLatencyMs, Math.round(ms * 1000) / 1000);
    if (ms > this.latencyBoundMs) this.violation(`the bystander's echo took ${ms.toFixed(1)} ms`);
  }
}

export function fuzzNetback(opts: NetbackFuzzOptions): Promise<FuzzReport> {
  return new NetbackFuzz(opts).run();
}
