// `xenpv fuzz backend --device xnf`: a network backend in dom0 that answers a
// real xnf with honest, late, failing and malicious responses, and the checks
// that xnf holds. The whole host runs in this thread (lib/fuzz/world.ts),
// driven by one seeded generator, so a seed replays.
//
// Cast: the victim guest has two vifs: vif 0, served by dom0's real netback
// (its other device, which must keep working: frames echoed off a dom0 port),
// and vif 1, served by HostileNetBackend below. Each episode plugs vif 1 with
// new offers (sg, GSO, split event channels, multicast control, trusted or
// not), sends frames through xnf and has the backend answer: mostly honestly
// (now or later, OKAY, ERROR or DROPPED, frames of one or more slots into the
// posted buffers), sometimes with ids never issued or answered twice, junk
// statuses, NULLs nothing asked for, RX responses in the wrong slot, offsets
// and lengths outside the page, frames of too many slots or bytes, bad
// extras, rsp_prod jumping ahead or going back, event storms, or a TX grant
// kept mapped (untrusted mode). An episode ends when the interface breaks or
// at random, with the toolstack's unplug.
//
// Checks: xnf never throws from its interrupt; every malicious answer breaks
// the interface (ENETDOWN, a reason) and fails every frame still waiting;
// every request xnf puts on the ring is well formed and carries exactly the
// frame sent; every frame xnf hands up is exactly one the backend wrote, in
// order; vif 0 keeps echoing within a bound; and after the unplug xnf has
// let go of every grant but those the backend still maps.

import { createHash } from 'node:crypto';
import { GTF_permit_access, GTF_type_mask } from '../abi/grant_table.js';
import {
  NETIF_RSP_DROPPED, NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, netifOffsets, NETRXF_data_validated,
  NETRXF_extra_info, NETRXF_more_data, NETTXF_extra_info, NETTXF_more_data, XEN_NETIF_EXTRA_FLAG_MORE,
  XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_NR_SLOTS_MIN,
} from '../abi/netif.js';
import { __CONST_RING_SIZE, netif_rx_sring, netif_rx_sring_entry, netif_tx_sring, netif_tx_sring_entry } from '../abi/ring.js';
import { XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitialising, XenbusStateInitWait } from '../abi/xenbus.js';
import type { LocalPort } from '../backends/bridge.js';
import type { NicSpec } from '../backends/toolstack.js';
import { bindInterdomain, mapGrant, mapGrantReadonly, unmapGrant } from '../backends/xenbus.js';
import { xnfInterfaces, type XnfSoftc } from '../drivers/xnf/xnf.js';
import type { IntrHandle } from '../evtchn/evtchn.js';
import { D, type Domain } from '../hypervisor/domain.js';
import { PAGE_SIZE, type Page } from '../hypervisor/page.js';
import { SRING_RING_OFFSET } from '../xen/ring.js';
import { probeDevices, type XenSoftc } from '../xen/xen.js';
import { Harness, MAX_VIOLATIONS, count, type FuzzReport } from './report.js';
import { World } from './world.js';

const TX_SIZE = __CONST_RING_SIZE(netif_tx_sring, PAGE_SIZE);
const RX_SIZE = __CONST_RING_SIZE(netif_rx_sring, PAGE_SIZE);
const TX_BYTES = netif_tx_sring_entry.size;
const RX_BYTES = netif_rx_sring_entry.size;
const {
  TXQ_GREF, TXQ_OFFSET, TXQ_FLAGS, TXQ_ID, TXQ_SIZE, TXP_ID, TXP_STATUS, RXQ_ID, RXQ_GREF, RXP_ID, RXP_OFFSET,
  RXP_FLAGS, RXP_STATUS, EXT_TYPE, EXT_FLAGS, EXT_GSO_SIZE, EXT_GSO_TYPE
} = netifOffsets;
const REQ_PROD = 0;
const RSP_PROD = 8;
const ENTRIES_PER_FRAME = PAGE_SIZE / 8;
const ETHER_HDR_LEN = 14;
const ETHERTYPE_TEST = 0x88b5;
const NEVER_MS = 1e9;
const PROBE_EVERY = 32;
const VICTIM_MAC = [0x00, 0x16, 0x3e, 0x00, 0x00, 0x1a];
const HOSTILE_MAC = [0x00, 0x16, 0x3e, 0x00, 0x00, 0x1b];
const SINK_MAC = Uint8Array.from([0x02, 0, 0, 0, 0, 0x5d]);
const HOSTILE_DEVID = 1;

/** What the backend offers in one episode. */
type Offer = { sg: boolean; gso: boolean; split: boolean; mcast: boolean; trusted: boolean };

type TxSlot = { id: number; gref: number; offset: number; size: number; flags: number };
/** A frame xnf put on the TX ring, as the backend took it. */
type TxPacket = { slots: TxSlot[]; extras: number };

type Action =
  | 'send' | 'answer' | 'deliver' | 'late' | 'storm' | 'unplug'
  | 'tx id never issued' | 'tx id answered twice' | 'tx junk status' | 'tx NULL unasked' | 'tx rsp_prod ahead' | 'tx rsp_prod back'
  | 'rx id not its slot' | 'rx past the page' | 'rx junk status' | 'rx too many slots' | 'rx too long' | 'rx bad extra'
  | 'rx bad GSO' | 'rx rsp_prod ahead' | 'tx grant kept mapped';
const ACTION_WEIGHTS: Record<Action, number> = {
  send: 400, answer: 330, deliver: 330, late: 40, storm: 20, unplug: 3,
  'tx id never issued': 2, 'tx id answered twice': 2, 'tx junk status': 2, 'tx NULL unasked': 2, 'tx rsp_prod ahead': 2,
  'tx rsp_prod back': 2, 'rx id not its slot': 2, 'rx past the page': 2, 'rx junk status': 2, 'rx too many slots': 2,
  'rx too long': 2, 'rx bad extra': 2, 'rx bad GSO': 2, 'rx rsp_prod ahead': 2, 'tx grant kept mapped': 3,
};

/** One of the victim's send()s and how it ended. */
type Sent = { frame: Uint8Array; settled: boolean; error: string | null };

export type XnfFuzzOptions = {
  seed: number;
  steps: number;
  latencyBoundMs?: number;
  onProgress?: (step: number) => void;
};

/** The backend of vif 1: raw bytes on xnf's rings, its own xenbus handshake. */
class HostileNetBackend {
  readonly fe: string;
  readonly be: string;
  tx: Page | null = null;
  rx: Page | null = null;
  private handles: number[] = [];
  ihs: IntrHandle[] = [];
  txCons = 0;
  txRsp = 0;
  rxCons = 0;
  rxRsp = 0;
  /** Mappings kept on purpose, let go only after the unplug. */
  kept: number[] = [];

  constructor(
    private readonly world: World,
    readonly domid: number,
  ) {
    this.fe = `/local/domain/${domid}/device/vif/${HOSTILE_DEVID}`;
    this.be = `/local/domain/0/backend/vif/${domid}/${HOSTILE_DEVID}`;
  }

  private get xs() {
    return this.world.dom0.xs;
  }

  private get hypercall() {
    return this.world.dom0.hypercall;
  }

  /** The nodes libxl writes for a vif, the backend's features, InitWait. */
  async create(offer: Offer): Promise<void> {
    const mac = HOSTILE_MAC.map((b) => b.toString(16).padStart(2, '0')).join(':');
    const fe: [string, string][] = [
      ['backend', this.be], ['backend-id', '0'], ['state', String(XenbusStateInitialising)], ['handle', String(HOSTILE_DEVID)],
      ['mac', mac], ['trusted', offer.trusted ? '1' : '0'], ['mtu', '9000'],
    ];
    const be: [string, string][] = [
      ['frontend', this.fe], ['frontend-id', String(this.domid)], ['state', String(XenbusStateInitialising)], ['online', '1'],
      ['mac', mac], ['handle', String(HOSTILE_DEVID)], ['feature-rx-copy', '1'], ['feature-sg', offer.sg ? '1' : '0'],
      ['feature-gso-tcpv4', offer.gso ? '1' : '0'], ['feature-split-event-channels', offer.split ? '1' : '0'],
      ['feature-multicast-control', offer.mcast ? '1' : '0'], ['multi-queue-max-queues', '1'],
    ];
    await this.xs.transaction(async (t) => {
      for (const [dir, nodes, owner, reader] of [[this.fe, fe, this.domid, 0], [this.be, be, 0, this.domid]] as const) {
        await t.mkdir(dir);
        await t.setPerms(dir, [{ domid: owner, perm: 'n' }, { domid: reader, perm: 'r' }]);
        for (const [k, v] of nodes) {
          await t.write(`${dir}/${k}`, v);
          await t.setPerms(`${dir}/${k}`, [{ domid: owner, perm: 'n' }, { domid: reader, perm: 'r' }]);
        }
      }
    });
    await this.xs.write(`${this.be}/state`, String(XenbusStateInitWait));
  }

  /** The frontend's rings and channel(s) once it says Connected; then Connected. */
  async connect(): Promise<void> {
    const xs = this.xs;
    await xs.awaitState(`${this.fe}/state`, XenbusStateConnected, { timeoutMs: 30_000 });
    const read = (k: string): Promise<number> => xs.read(`${this.fe}/${k}`).then(Number, () => -1);
    const txRef = await read('tx-ring-ref');
    const rxRef = await read('rx-ring-ref');
    const one = await read('event-channel');
    const ports = one >= 0 ? [one] : [await read('event-channel-tx'), await read('event-channel-rx')];
    const tx = mapGrant(this.hypercall, this.domid, txRef);
    const rx = mapGrant(this.hypercall, this.domid, rxRef);
    this.tx = tx.page;
    this.rx = rx.page;
    this.handles = [tx.handle, rx.handle];
    const intr = this.world.dom0.intr;
    this.ihs = ports.map((p, i) => bindInterdomain(this.hypercall, intr, this.domid, p, () => undefined, `hostile-vif.${i}`));
    for (const ih of this.ihs) intr.intrUnmask(ih);
    this.txCons = this.txRsp = this.rxCons = this.rxRsp = 0;
    await xs.write(`${this.be}/state`, String(XenbusStateConnected));
  }

  /** The toolstack's unplug: online 0, Closing; let go once the frontend closes; Closed; the nodes go. */
  async unplug(): Promise<void> {
    const xs = this.xs;
    await xs.write(`${this.be}/online`, '0');
    await xs.write(`${this.be}/state`, String(XenbusStateClosing));
    await xs.awaitState(`${this.fe}/state`, [XenbusStateClosing, XenbusStateClosed], { timeoutMs: 30_000 });
    for (const ih of this.ihs) await this.world.dom0.intr.intrDisestablish(ih);
    this.ihs = [];
    for (const h of this.handles) unmapGrant(this.hypercall, h);
    this.handles = [];
    this.tx = this.rx = null;
    await xs.write(`${this.be}/state`, String(XenbusStateClosed));
    await xs.awaitState(`${this.fe}/state`, XenbusStateClosed, { timeoutMs: 30_000 });
    for (const h of this.kept.splice(0)) unmapGrant(this.hypercall, h);
    await xs.rm(this.fe);
    await xs.rm(this.be);
  }

  signal(): void {
    for (const ih of this.ihs) this.world.dom0.intr.intrSignal(ih);
  }
}

export class XnfFuzz extends Harness {
  private readonly hash = createHash('sha256');
  private world!: World;
  private sc!: XenSoftc;
  private dom!: Domain;
  private other!: XnfSoftc;
  private sink!: LocalPort;
  private backend!: HostileNetBackend;
  private xnf: XnfSoftc | null = null;
  private offer!: Offer;
  /** The victim's sends, oldest first, whose frames the backend has not yet taken. */
  private untaken: Sent[] = [];
  private sends: Sent[] = [];
  /** TX packets taken and not yet answered, oldest first. */
  private taken: TxPacket[] = [];
  /** Ids answered in the last answer (for the duplicate). */
  private lastAnswered: number[] = [];
  /** RX requests taken (id, gref), not yet used. */
  private posted: { id: number; gref: number }[] = [];
  /** Frames the backend wrote, not yet handed up by xnf. */
  private written: Uint8Array[] = [];
  private mustBreak: string | null = null;
  /** Grant entries the victim had before the episode. */
  private grantsBefore = 0;
  private echoed: ((frame: Uint8Array) => void) | null = null;
  private probeCounter = 0;
  private readonly buf = new Uint8Array(TX_BYTES);

  constructor(private readonly opts: XnfFuzzOptions) {
    super('backend-xnf', opts);
  }

  async run(): Promise<FuzzReport> {
    const start = performance.now();
    await this.setup();
    for (this.step = 0; this.step < this.opts.steps; this.step++) {
      if (this.xnf === null) await this.plug();
      await this.act();
      if (this.step % PROBE_EVERY === PROBE_EVERY - 1) await this.probe();
      if (this.report.violations.length >= MAX_VIOLATIONS) break;
      if ((this.step & 1023) === 0) this.opts.onProgress?.(this.step);
    }
    this.report.steps = this.step;
    if (this.xnf !== null) await this.unplug();
    await this.probe();
    this.report.refusals['port throttled'] = this.sc.intr.throttles;
    this.report.digest = this.hash.digest('hex');
    this.report.ms = Math.round(performance.now() - start);
    return this.report;
  }

  private async setup(): Promise<void> {
    const netback = { drainTimeoutMs: NEVER_MS, stallTimeoutMs: NEVER_MS, holdMs: NEVER_MS, maxQueues: 1 };
    this.world = new World({ net: { netback, ageingMs: NEVER_MS }, dom0MemoryMiB: 24 });
    this.sink = this.world.dom0.net!.bridges.attachLocal('xenbr0', { name: 'sink', mac: SINK_MAC });
    this.sink.onFrame((frame) => {
      if (frame[11] !== VICTIM_MAC[5]) return;
      const echo = frame.slice();
      echo.copyWithin(0, 6, 12);
      echo.set(SINK_MAC, 6);
      queueMicrotask(() => void this.sink.send(echo));
    });
    const nic: NicSpec = {
      devid: 0, mac: VICTIM_MAC.map((b) => b.toString(16).padStart(2, '0')).join(':'), bridge: 'xenbr0', mtu: 1500, rate: null,
      trusted: true, pcap: null, backend: null,
    };
    this.sc = await this.world.createGuest({ name: 'victim', memoryMiB: 12, vifs: [nic] });
    this.dom = this.world.host.domain(this.sc.domid);
    this.other = xnfInterfaces(this.sc).find((x) => x.devid === 0)!;
    this.other.input = (frame) => this.echoed?.(frame);
    this.backend = new HostileNetBackend(this.world, this.sc.domid);
  }

  // --- episodes ----------------------------------------------------------------------------

  private async plug(): Promise<void> {
    const r = this.rng;
    this.offer = { sg: r.chance(0.6), gso: r.chance(0.5), split: r.chance(0.4), mcast: r.chance(0.3), trusted: r.chance(0.6) };
    this.grantsBefore = this.grants();
    await this.world.run(this.backend.create(this.offer), 'vif nodes');
    await this.world.run(Promise.all([this.backend.connect(), probeDevices(this.sc)]), 'plug');
    this.xnf = xnfInterfaces(this.sc).find((x) => x.devid === HOSTILE_DEVID) ?? null;
    if (this.xnf === null) {
      this.violation('xnf did not attach to an honest backend');
      return;
    }
    this.xnf.input = (frame) => this.received(frame);
    const o = this.offer;
    this.count(`episode${o.sg ? ' sg' : ''}${o.gso ? ' gso' : ''}${o.split ? ' split' : ''}${o.mcast ? ' mcast' : ''}${o.trusted ? '' : ' untrusted'}`);
    this.untaken = [];
    this.sends = [];
    this.taken = [];
    this.posted = [];
    this.written = [];
    this.lastAnswered = [];
  }

  /** The unplug: xnf must detach, fail what waits, and let go of every grant the backend does not hold. */
  private async unplug(): Promise<void> {
    const kept = this.backend.kept.length;
    await this.world.run(this.backend.unplug(), 'unplug');
    await this.world.settle();
    if (xnfInterfaces(this.sc).some((x) => x.devid === HOSTILE_DEVID)) this.violation('xnf is still attached after the unplug');
    for (const s of this.sends) if (!s.settled) this.violation('a send still waits after the unplug');
    // A page the backend kept mapped stays granted (quarantined), never freed or reused.
    const after = this.grants();
    if (after !== this.grantsBefore + kept) this.violation(`${after - this.grantsBefore} grant(s) left after the unplug, ${kept} kept mapped by the backend`);
    this.grantsBefore = 0;
    this.xnf = null;
  }

  /** Active grant entries of the victim. */
  private grants(): number {
    const d = this.dom;
    const nr = Atomics.load(d.ctl, D.nrGrantFrames) * ENTRIES_PER_FRAME;
    let n = 0;
    for (let ref = 0; ref < nr; ref++) {
      const gfn = d.ctl[D.grantFrames + Math.floor(ref / ENTRIES_PER_FRAME)] ?? 0;
      const word = Atomics.load(d.mem.u32, (gfn * PAGE_SIZE + (ref % ENTRIES_PER_FRAME) * 8) >> 2);
      if ((word & GTF_type_mask) === GTF_permit_access) n++;
    }
    return n;
  }

  // --- one step ----------------------------------------------------------------------------------

  private async act(): Promise<void> {
    const x = this.xnf;
    if (x === null) return;
    const action = this.rng.weighted(ACTION_WEIGHTS);
    if (action === 'unplug') {
      this.count(action);
      await this.world.drain();
      return this.unplug();
    }
    this.take();
    const done = this.actOn(action);
    if (done) this.count(action);
    await this.world.drain();
    this.take();
    this.checkHandlers([['the guest', this.sc.intr], ['dom0', this.world.dom0.intr]]);
    if (this.mustBreak !== null) {
      const why = this.mustBreak;
      this.mustBreak = null;
      if (x.error === null || x.error.code !== 'ENETDOWN') this.violation(`xnf took "${why}" without breaking (up ${x.up})`);
      else count(this.report.refusals, `broken: ${x.error.message.replace(/^ENETDOWN: xnf\d+: /, '').replace(/\d+/g, 'N')}`);
      for (const s of this.sends) if (!s.settled) this.violation(`a frame still waits on a broken interface (after ${why})`);
      this.report.ringBreaks++;
      return this.unplug();
    }
    if (x.error !== null) {
      this.violation(`xnf broke with an honest backend: ${x.error.message}`);
      return this.unplug();
    }
    this.sends = this.sends.filter((s) => !s.settled);
  }

  /** Do `action`; false when it could not be done now (nothing to answer, too few buffers). */
  private actOn(action: Action): boolean {
    switch (action) {
      case 'send': return this.send();
      case 'answer': return this.answer(this.taken.length, false);
      case 'late': return this.answer(this.rng.int(this.taken.length + 1), true);
      case 'deliver': return this.deliver(this.rng.range(1, 6));
      case 'storm':
        for (let i = this.rng.range(100, 2000); i > 0; i--) this.backend.signal();
        return true;
      case 'unplug': return true;
      default: return this.malicious(action);
    }
  }

  /** The victim sends 1 to 4 frames through xnf (longer than a page when the backend has sg). */
  private send(): boolean {
    const x = this.xnf!;
    for (let n = this.rng.range(1, 4); n > 0; n--) {
      const max = this.rng.chance(0.2) ? x.maxFrame(false) : Math.min(1514, x.maxFrame(false));
      const frame = this.frame(this.rng.range(ETHER_HDR_LEN, max));
      const s: Sent = { frame, settled: false, error: null };
      this.sends.push(s);
      this.untaken.push(s);
      x.send(frame, undefined, { timeoutMs: NEVER_MS }).then(
        () => (s.settled = true),
        (err: Error) => {
          s.settled = true;
          s.error = err.message;
          // Refused before it reached the ring (the interface is down): the backend will not see it.
          const i = this.untaken.indexOf(s);
          if (i >= 0 && x.error === null) this.untaken.splice(i, 1);
        },
      );
    }
    return true;
  }

  private frame(len: number): Uint8Array {
    const f = new Uint8Array(len);
    const w = new Uint32Array(f.buffer, 0, len >> 2);
    for (let i = 0; i < w.length; i++) w[i] = this.rng.u32();
    f.set(SINK_MAC, 0);
    f.set(HOSTILE_MAC, 6);
    f[12] = ETHERTYPE_TEST >> 8;
    f[13] = ETHERTYPE_TEST & 0xff;
    return f;
  }

  // --- the backend's datapath --------------------------------------------------------------------

  /** Take every new TX and RX request: each TX packet must be well formed and carry the next frame sent. */
  private take(): void {
    const b = this.backend;
    if (b.tx === null || b.rx === null) return;
    const prod = b.tx.load32(REQ_PROD);
    const n = (prod - b.txCons) >>> 0;
    if (n > TX_SIZE) {
      this.violation(`xnf's tx req_prod ${prod} runs ${n} past ${b.txCons}`);
      b.txCons = prod;
    }
    while (b.txCons !== prod) {
      const pkt = this.takePacket(prod);
      if (pkt === null) break;
      this.taken.push(pkt);
    }
    const rprod = b.rx.load32(REQ_PROD);
    if (((rprod - b.rxCons) >>> 0) > RX_SIZE) this.violation(`xnf's rx req_prod ${rprod} runs past ${b.rxCons}`);
    const v = new DataView(this.buf.buffer, 0, RX_BYTES);
    for (; b.rxCons !== rprod; b.rxCons = (b.rxCons + 1) >>> 0) {
      b.rx.read(SRING_RING_OFFSET + (b.rxCons & (RX_SIZE - 1)) * RX_BYTES, this.buf.subarray(0, RX_BYTES));
      this.posted.push({ id: v.getUint16(RXQ_ID, true), gref: v.getUint32(RXQ_GREF, true) });
    }
  }

  private readTx(idx: number): TxSlot {
    const v = new DataView(this.buf.buffer, 0, TX_BYTES);
    this.backend.tx!.read(SRING_RING_OFFSET + (idx & (TX_SIZE - 1)) * TX_BYTES, this.buf);
    return { id: v.getUint16(TXQ_ID, true), gref: v.getUint32(TXQ_GREF, true), offset: v.getUint16(TXQ_OFFSET, true), size: v.getUint16(TXQ_SIZE, true), flags: v.getUint16(TXQ_FLAGS, true) };
  }

  /** One packet from txCons: its first slot, extras, other slots; its bytes against the next frame sent. */
  private takePacket(prod: number): TxPacket | null {
    const b = this.backend;
    const at = b.txCons;
    const left = (): number => (prod - b.txCons) >>> 0;
    const first = this.readTx(b.txCons);
    b.txCons = (b.txCons + 1) >>> 0;
    const pkt: TxPacket = { slots: [first], extras: 0 };
    if ((first.flags & NETTXF_extra_info) !== 0) {
      for (let more = true; more; pkt.extras++) {
        if (left() === 0) return this.badTx(at, 'extra missing at req_prod');
        this.readTx(b.txCons);
        b.txCons = (b.txCons + 1) >>> 0;
        more = (this.buf[EXT_FLAGS]! & XEN_NETIF_EXTRA_FLAG_MORE) !== 0;
      }
    }
    for (let more = (first.flags & NETTXF_more_data) !== 0; more; ) {
      if (left() === 0) return this.badTx(at, 'packet cut at req_prod');
      const s = this.readTx(b.txCons);
      b.txCons = (b.txCons + 1) >>> 0;
      pkt.slots.push(s);
      more = (s.flags & NETTXF_more_data) !== 0;
    }
    this.checkTx(pkt);
    return pkt;
  }

  private badTx(at: number, what: string): null {
    this.violation(`xnf sent a bad TX packet: ${what}`);
    this.backend.txCons = at;
    return null;
  }

  /** Slots within their pages, at most XEN_NETIF_NR_SLOTS_MIN, ids not outstanding, the bytes the victim sent. */
  private checkTx(pkt: TxPacket): void {
    const sent = this.untaken.shift();
    if (sent === undefined) return this.violation('xnf put a frame on the ring that nobody sent');
    if (pkt.slots.length > XEN_NETIF_NR_SLOTS_MIN) this.violation(`xnf sent ${pkt.slots.length} slots for a frame`);
    const total = pkt.slots[0]!.size;
    if (total !== sent.frame.length) return this.violation(`xnf sent a frame of ${total} bytes for one of ${sent.frame.length}`);
    const bytes = new Uint8Array(total);
    let rest = total;
    for (const s of pkt.slots.slice(1)) rest -= s.size;
    let at = 0;
    for (const [i, s] of pkt.slots.entries()) {
      if (this.taken.some((p) => p.slots.some((t) => t.id === s.id)) || pkt.slots.some((t, j) => j < i && t.id === s.id)) {
        this.violation(`xnf sent tx id ${s.id} while it was outstanding`);
      }
      const len = i === 0 ? rest : s.size;
      if (len < 0 || s.offset + len > PAGE_SIZE) return this.violation(`xnf sent a slot of ${len} bytes at ${s.offset}`);
      const m = this.map(s.gref, false);
      if (m === null) return;
      m.page.read(s.offset, bytes.subarray(at, at + len));
      at += len;
      this.unmapOrKeep(m.handle);
    }
    if (Buffer.compare(bytes, sent.frame) !== 0) this.violation(`xnf sent other bytes than the frame of ${total}`);
    this.hash.update(bytes.subarray(0, 64));
  }

  private map(gref: number, writable: boolean): { handle: number; page: Page } | null {
    try {
      return writable ? mapGrant(this.world.dom0.hypercall, this.sc.domid, gref) : mapGrantReadonly(this.world.dom0.hypercall, this.sc.domid, gref) as { handle: number; page: Page };
    } catch (err) {
      this.violation(`xnf's ref ${gref} cannot be mapped: ${(err as Error).message}`);
      return null;
    }
  }

  /** The next mapping kept on purpose (XSA-396's attack), else unmapped now. */
  private keepNext = false;
  private unmapOrKeep(handle: number): void {
    if (this.keepNext) {
      this.keepNext = false;
      this.backend.kept.push(handle);
      return;
    }
    unmapGrant(this.world.dom0.hypercall, handle);
  }

  /** Answer the `n` oldest packets taken: OKAY mostly, ERROR or DROPPED sometimes, NULL after each extra. */
  private answer(n: number, late: boolean): boolean {
    if (n === 0 || this.taken.length === 0) return false;
    const b = this.backend;
    const pkts = this.taken.splice(0, n);
    this.lastAnswered = [];
    for (const p of pkts) {
      const status = this.rng.chance(0.9) ? NETIF_RSP_OKAY : this.rng.pick([NETIF_RSP_ERROR, NETIF_RSP_DROPPED]);
      this.txResponse(p.slots[0]!.id, status);
      for (let i = 0; i < p.extras; i++) this.txResponse(0, NETIF_RSP_NULL);
      for (const s of p.slots.slice(1)) this.txResponse(s.id, status);
      this.lastAnswered.push(...p.slots.map((s) => s.id));
    }
    b.tx!.store32(RSP_PROD, b.txRsp);
    if (!late || this.rng.chance(0.5)) b.signal();
    return true;
  }

  private txResponse(id: number, status: number): void {
    const b = this.backend;
    const v = new DataView(this.buf.buffer, 0, TX_BYTES);
    this.buf.fill(0);
    v.setUint16(TXP_ID, id, true);
    v.setInt16(TXP_STATUS, status, true);
    b.tx!.write(SRING_RING_OFFSET + (b.txRsp & (TX_SIZE - 1)) * TX_BYTES, this.buf);
    b.txRsp = (b.txRsp + 1) >>> 0;
  }

  /** `n` frames into the posted buffers, each of one or more slots at random offsets. */
  private deliver(n: number): boolean {
    let any = false;
    for (let i = 0; i < n; i++) {
      const slots = this.offer.sg && this.rng.chance(0.3) ? this.rng.range(2, 4) : 1;
      if (this.posted.length < slots) break;
      const pieces = Array.from({ length: slots }, () => this.rng.range(1, 1500));
      pieces[0] = Math.max(pieces[0]!, ETHER_HDR_LEN);
      const frame = this.frame(pieces.reduce((a, x) => a + x, 0));
      frame.set(HOSTILE_MAC, 0);
      frame.set(SINK_MAC, 6);
      let at = 0;
      for (const [j, len] of pieces.entries()) {
        const offset = this.rng.int(PAGE_SIZE - len + 1);
        if (!this.rxWrite(frame.subarray(at, at + len), offset)) return any;
        this.rxResponse(offset, (j + 1 < slots ? NETRXF_more_data : 0) | (j === 0 ? NETRXF_data_validated : 0), len);
        at += len;
      }
      this.written.push(frame);
      any = true;
    }
    this.backend.rx!.store32(RSP_PROD, this.backend.rxRsp);
    this.backend.signal();
    return any;
  }

  /** Copy into the next posted buffer (mapped, written, unmapped). */
  private rxWrite(bytes: Uint8Array, offset: number): boolean {
    const req = this.posted[0]!;
    const m = this.map(req.gref, true);
    if (m === null) return false;
    m.page.write(offset, bytes);
    unmapGrant(this.world.dom0.hypercall, m.handle);
    return true;
  }

  /** The response in the slot of the next posted request, with its id unless told otherwise. */
  private rxResponse(offset: number, flags: number, status: number, id?: number): void {
    const b = this.backend;
    const req = this.posted.shift()!;
    const v = new DataView(this.buf.buffer, 0, RX_BYTES);
    this.buf.fill(0);
    v.setUint16(RXP_ID, id ?? req.id, true);
    v.setUint16(RXP_OFFSET, offset, true);
    v.setUint16(RXP_FLAGS, flags, true);
    v.setInt16(RXP_STATUS, status, true);
    b.rx!.write(SRING_RING_OFFSET + (b.rxRsp & (RX_SIZE - 1)) * RX_BYTES, this.buf.subarray(0, RX_BYTES));
    b.rxRsp = (b.rxRsp + 1) >>> 0;
  }

  private received(frame: Uint8Array): void {
    const want = this.written.shift();
    this.hash.update(frame.subarray(0, 64));
    if (want === undefined) return this.violation(`xnf handed up a frame of ${frame.length} bytes the backend never sent`);
    if (Buffer.compare(frame, want) !== 0) this.violation(`xnf handed up ${frame.length} bytes, not the ${want.length} the backend wrote`);
  }

  // --- malice -------------------------------------------------------------------------------------

  /** One answer that breaks netif.h; false when it cannot be made now. */
  private malicious(action: Action): boolean {
    const b = this.backend;
    const r = this.rng;
    const rxExtra = (type: number, gsoType: number, gsoSize: number): void => {
      this.rxWrite(this.frame(60), 0);
      this.rxResponse(0, NETRXF_extra_info, 60);
      const v = new DataView(this.buf.buffer, 0, RX_BYTES);
      this.buf.fill(0);
      this.buf[EXT_TYPE] = type;
      this.buf[EXT_GSO_TYPE] = gsoType;
      v.setUint16(EXT_GSO_SIZE, gsoSize, true);
      b.rx!.write(SRING_RING_OFFSET + (b.rxRsp & (RX_SIZE - 1)) * RX_BYTES, this.buf.subarray(0, RX_BYTES));
      b.rxRsp = (b.rxRsp + 1) >>> 0;
      this.posted.shift();
    };
    switch (action) {
      case 'tx id never issued':
        this.txResponse(r.range(TX_SIZE, 0xffff), NETIF_RSP_OKAY);
        break;
      case 'tx id answered twice':
        if (this.taken.length === 0) return false;
        this.answer(1, false);
        this.txResponse(this.lastAnswered[0]!, NETIF_RSP_OKAY);
        break;
      case 'tx junk status':
        if (this.taken.length === 0) return false;
        this.txResponse(this.taken[0]!.slots[0]!.id, r.chance(0.5) ? r.range(2, 0x7fff) : r.range(-0x8000, -3));
        break;
      case 'tx NULL unasked':
        if (this.taken.some((p) => p.extras > 0)) return false;
        this.txResponse(0, NETIF_RSP_NULL);
        break;
      case 'tx rsp_prod ahead':
        b.tx!.store32(RSP_PROD, (b.txCons + r.range(1, 0x7fffffff)) >>> 0);
        b.signal();
        this.mustBreak = action;
        return true;
      case 'tx rsp_prod back':
        b.tx!.store32(RSP_PROD, (b.txRsp - r.range(1, 1000)) >>> 0);
        b.signal();
        this.mustBreak = action;
        return true;
      case 'tx grant kept mapped': {
        // Untrusted: xnf revokes each frame's grant when it is answered; one still mapped breaks the interface.
        if (this.offer.trusted || this.backend.kept.length >= 64) return false;
        this.send();
        this.keepNext = true;
        this.take();
        this.keepNext = false;
        if (this.taken.length === 0) return false;
        this.answer(this.taken.length, false);
        this.mustBreak = action;
        return true;
      }
      default:
        if (!this.rxMalicious(action, rxExtra)) return false;
    }
    if (action.startsWith('tx')) b.tx!.store32(RSP_PROD, b.txRsp);
    else b.rx!.store32(RSP_PROD, b.rxRsp);
    b.signal();
    this.mustBreak = action;
    return true;
  }

  private rxMalicious(action: Action, rxExtra: (type: number, gsoType: number, gsoSize: number) => void): boolean {
    const b = this.backend;
    const r = this.rng;
    const need = action === 'rx too many slots' ? XEN_NETIF_NR_SLOTS_MIN + 1 : action === 'rx too long' ? 17 : 2;
    if (this.posted.length < need) return false;
    switch (action) {
      case 'rx id not its slot': {
        const slot = b.rxRsp & (RX_SIZE - 1);
        this.rxResponse(0, 0, 60, (slot + r.range(1, 0xfffe)) & 0xffff);
        return true;
      }
      case 'rx past the page': {
        const len = r.range(1, PAGE_SIZE);
        this.rxResponse(r.range(PAGE_SIZE - len + 1, 0xffff), 0, len);
        return true;
      }
      case 'rx junk status':
        this.rxResponse(0, 0, r.range(-0x8000, NETIF_RSP_DROPPED - 1));
        return true;
      case 'rx too many slots':
        for (let i = 0; i < need; i++) this.rxResponse(0, i + 1 < need ? NETRXF_more_data : 0, 60);
        return true;
      case 'rx too long':
        for (let i = 0; i < need; i++) this.rxResponse(0, i + 1 < need ? NETRXF_more_data : 0, PAGE_SIZE);
        return true;
      case 'rx bad extra':
        rxExtra(r.pick([0, 2, 3, 4, 5, 200]), 1, 1448);
        return true;
      case 'rx bad GSO':
        if (r.chance(0.5)) rxExtra(XEN_NETIF_EXTRA_TYPE_GSO, r.pick([0, 3, 4, 255]), 1448);
        else rxExtra(XEN_NETIF_EXTRA_TYPE_GSO, 1, 0);
        return true;
      case 'rx rsp_prod ahead':
        b.rx!.store32(RSP_PROD, (b.rxCons + r.range(1, 0x7fffffff)) >>> 0);
        b.rxRsp = b.rx!.load32(RSP_PROD);
        return true;
      default:
        return false;
    }
  }

  // --- checks ------------------------------------------------------------------------------------

  /** The victim's other vif (a real netback) sends a frame to dom0's sink, which echoes it: within the bound. */
  private async probe(): Promise<void> {
    const t0 = performance.now();
    const f = this.frame(this.rng.range(60, 1514));
    f.set(VICTIM_MAC, 6);
    f[14] = ++this.probeCounter & 0xff;
    try {
      const back = new Promise<Uint8Array>((resolve) => {
        this.echoed = (frame) => {
          if (frame[14] === f[14] && frame.length === f.length) resolve(frame.slice());
        };
      });
      await this.world.run(this.other.send(f), 'vif 0 send');
      const got = await this.world.run(back, 'vif 0 echo');
      if (Buffer.compare(got.subarray(12), f.subarray(12)) !== 0) this.violation('vif 0\'s echo came back changed');
      this.hash.update(got.subarray(0, 64));
    } catch (err) {
      this.violation(`the victim's other vif failed: ${(err as Error).message}`);
    } finally {
      this.echoed = null;
    }
    const ms = performance.now() - t0;
    this.report.maxProbeLatencyMs = Math.max(this.report.maxProbeLatencyMs, Math.round(ms * 1000) / 1000);
    if (ms > this.latencyBoundMs) this.violation(`the victim's other vif echoed in ${ms.toFixed(1)} ms`);
  }
}

export function fuzzXnf(opts: XnfFuzzOptions): Promise<FuzzReport> {
  return new XnfFuzz(opts).run();
}
