// `xenpv fuzz frontend --device blkback`: a guest that speaks raw bytes on a
// vbd's rings to a real blkback, and the checks that blkback holds. The whole
// host runs in this thread (lib/fuzz/world.ts), driven by one seeded
// generator, so a seed replays a run exactly; the digest of every response
// and of the disk proves it.
//
// Cast: the attacker (a guest whose kernel attaches nothing; this file is
// its frontend) connects to its vbd with rings of 1 to 4 pages, 1 to 3
// queues, either request layout, with or without persistent grants, and
// sends valid I/O mixed with malformed requests: too many segments,
// first_sect > last_sect, sectors past the end, bad operations, indirect
// requests with bad counts, refs or descriptor pages, grant refs not granted,
// read-only or granted to another domain, floods, events with nothing to do,
// req_prod jumps beyond the ring, and disconnects with requests in flight.
// A bystander guest reads and writes its own disk through a real xbf.
//
// The checks are an independent model of the protocol: each request's status
// follows from its bytes and the attacker's grant table (blkif.h, Linux
// blkback's order of checks), a good READ must put the model disk's bytes in
// exactly the sectors named, a good WRITE must change the model disk and
// nothing else, and every other byte of the attacker's buffers, the canary
// pages between them and the tail of each ring page must stay as the
// attacker left it.

import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  BLKIF_DISCARD_SECURE, BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
  BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
} from '../abi/blkif.js';
import { GTF_permit_access, GTF_readonly, GTF_type_mask } from '../abi/grant_table.js';
import { XEN_IO_PROTO_ABI_X86_32, XEN_IO_PROTO_ABI_X86_64 } from '../abi/protocols.js';
import { XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitialised, XenbusStateInitWait } from '../abi/xenbus.js';
import { MAX_INDIRECT_SEGMENTS, type Blkback, type BlkbackFactory } from '../backends/blkback.js';
import { BUS_DMA_READ, BUS_DMA_WRITE, busDmaDomid, type XenDmaMap } from '../busdma/busdma.js';
import type { XbfSoftc } from '../drivers/xbf/xbf.js';
import { xbfDisks } from '../drivers/xbf/xbf.js';
import type { IntrHandle } from '../evtchn/evtchn.js';
import { D, type Domain } from '../hypervisor/domain.js';
import { FramePage, PAGE_SIZE } from '../hypervisor/page.js';
import { FrontRing, SRING_RING_OFFSET } from '../xen/ring.js';
import type { XenSoftc } from '../xen/xen.js';
import { BLK_WIRES, putU64, type BlkWire } from './blkwire.js';
import { Harness, MAX_VIOLATIONS, count, type FuzzReport } from './report.js';
import { World } from './world.js';

const XVDA = 51712;
const SECTOR = 512;
const SECTORS_PER_PAGE = PAGE_SIZE / SECTOR;
const DISK_SECTORS = 2048;
const SEG_BYTES = 8;
const ENTRIES_PER_FRAME = PAGE_SIZE / 8;
/** Grant refs this far up are outside any table (64 frames of 512 entries). */
const OUT_OF_TABLE = 64 * ENTRIES_PER_FRAME;
const CANARY = 0xa5;
const RING_CANARY = 0x5a;
const PROBE_EVERY = 64;
const MEMORY_CHECK_EVERY = 64;
const DISK_CHECK_EVERY = 4096;
const STATUS_NAMES: Record<number, string> = { [BLKIF_RSP_OKAY]: 'OKAY', [BLKIF_RSP_ERROR]: 'BLKIF_RSP_ERROR', [BLKIF_RSP_EOPNOTSUPP]: 'BLKIF_RSP_EOPNOTSUPP' };

// --- requests and what they must get --------------------------------------------------

type Seg = { gref: number; first: number; last: number };

/** One request as the attacker means it; the bytes on the ring follow from it. */
type Plan = {
  label: string;
  op: number;
  indirectOp: number;
  /** The nr_segments field as sent (u8 direct, u16 indirect). */
  nrSegments: number;
  sector: bigint;
  /** Direct: the descriptors in the request. Indirect: the ones written into the indirect page. */
  segs: Seg[];
  /** Indirect: indirect_grefs[0..]. */
  indGrefs: number[];
  discardCount: bigint;
  discardFlag: number;
};

type Outstanding = { lo: number; hi: number; plan: Plan; rspOp: number };

type Queue = {
  index: number;
  gfn: number;
  npages: number;
  map: XenDmaMap;
  ring: FrontRing;
  /** The ring's first page, for the indices. */
  head: FramePage;
  size: number;
  /** Where the entries end in the ring's pages; after it, canary. */
  areaEnd: number;
  ih: IntrHandle;
  reqProd: number;
  rspCons: number;
  /** By id (the low word), in the order sent. */
  outstanding: Map<number, Outstanding>;
  /** The attacker broke this ring on purpose: blkback must have stopped serving it. */
  broken: boolean;
};

type Kind = 'W' | 'R' | 'X' | 'I';

type Connection = { wire: BlkWire; order: number; persistent: boolean; queues: Queue[] };

export type BlkbackFuzzOptions = {
  seed: number;
  steps: number;
  /** A bystander's disk I/O answered later than this breaks the latency invariant. */
  latencyBoundMs?: number;
  onProgress?: (step: number) => void;
  /** The blkback under attack; a test hands in a deliberately weakened one to see the harness catch it. */
  makeBlkback?: BlkbackFactory;
};

type Action = 'io' | 'malformed' | 'indirect' | 'flood' | 'storm' | 'jump' | 'disconnect' | 'reconnect';
const ACTION_WEIGHTS: Record<Action, number> = {
  io: 400, malformed: 300, indirect: 150, flood: 15, storm: 20, jump: 2, disconnect: 4, reconnect: 2,
};

const MALFORMATIONS = [
  'nr_segments > 11', 'nr_segments 0', 'first_sect > last_sect', 'last_sect > 7', 'past the end', 'sector 2^63',
  'ref not granted', 'ref out of the table', 'read into a read-only grant', 'ref granted to another domain', 'bad operation',
  'indirect_op', 'indirect nr_segments 0', 'indirect nr_segments > 256', 'indirect page not granted',
  'indirect page granted to another domain', 'indirect descriptors garbage', 'indirect descriptor bad', 'discard past the end',
  'secure discard', 'junk in unused fields',
] as const;

export class BlkbackFuzz extends Harness {
  private readonly hash = createHash('sha256');
  private world!: World;
  private sc!: XenSoftc;
  private dom!: Domain;
  private bystander!: XbfSoftc;
  private dir = '';
  private conn: Connection | null = null;
  private nextId = 1;
  /** The disk as it must be. */
  private readonly disk = new Uint8Array(DISK_SECTORS * SECTOR);
  // The attacker's buffers: canary, page, canary, page, ... canary, from GFN `base`.
  private base = 0;
  // W: granted to dom0 writable; R: read-only; X: to the bystander; I: read-only, holding only indirect descriptors
  // (so that no READ ever turns disk bytes into descriptors that name the attacker's own rings).
  private readonly kinds: Kind[] = [
    ...Array<Kind>(16).fill('W'), ...Array<Kind>(4).fill('R'), ...Array<Kind>(2).fill('X'), ...Array<Kind>(4).fill('I'),
  ];
  private readonly grefs: number[] = [];
  private readonly pageOfRef = new Map<number, number>();
  private region!: Uint8Array;
  private shadow!: Uint8Array;
  private readonly touched = new Set<number>();
  /** blkback.badRequests as last seen, and the ERROR answers to bad requests since. */
  private badSeen = 0;
  private badExpected = 0;
  private probeCounter = 0;

  constructor(private readonly opts: BlkbackFuzzOptions) {
    super('frontend-blkback', opts);
  }

  // --- setup -------------------------------------------------------------------------

  async run(): Promise<FuzzReport> {
    const start = performance.now();
    try {
      await this.setup();
      for (this.step = 0; this.step < this.opts.steps; this.step++) {
        await this.attack();
        if (this.step % PROBE_EVERY === PROBE_EVERY - 1) await this.probe();
        if (this.step % MEMORY_CHECK_EVERY === MEMORY_CHECK_EVERY - 1) this.checkAllMemory();
        if (this.step % DISK_CHECK_EVERY === DISK_CHECK_EVERY - 1) this.checkDisk();
        if (this.report.violations.length >= MAX_VIOLATIONS) break;
        if ((this.step & 1023) === 0) this.opts.onProgress?.(this.step);
      }
      this.report.steps = this.step;
      this.checkAllMemory();
      this.checkDisk();
      this.hash.update(this.disk);
      this.report.refusals['port throttled'] = this.world.dom0.intr.throttles;
    } finally {
      if (this.dir !== '') rmSync(this.dir, { recursive: true, force: true });
    }
    this.report.digest = this.hash.digest('hex');
    this.report.ms = Math.round(performance.now() - start);
    return this.report;
  }

  /** The host, the attacker with its file-backed disk, the bystander with a memory disk, the buffers. */
  private async setup(): Promise<void> {
    // tmpfs when there is one: barriers and flushes call fdatasync.
    this.dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'xenpv-fuzz-blkback-'));
    this.rng.fill(this.disk);
    const image = join(this.dir, 'attacker.img');
    writeFileSync(image, this.disk);
    this.world = new World({ makeBlkback: this.opts.makeBlkback });
    const w = this.world;
    this.bystander = xbfDisks(await w.createGuest({
      name: 'bystander', disks: [{ vdev: 'xvda', devid: XVDA, type: 'memory', params: String(1 << 20), readOnly: false }],
    }))[0]!;
    this.sc = await w.createGuest({
      name: 'attacker', memoryMiB: 4, probe: false,
      disks: [{ vdev: 'xvda', devid: XVDA, type: 'file', params: image, readOnly: false }],
    });
    this.dom = w.host.domain(this.sc.domid);
    this.makeBuffers();
    await w.run(this.connect(), 'first connect');
  }

  /** 2n+1 pages: canaries around every buffer; each buffer granted once, for the whole run. */
  private makeBuffers(): void {
    const n = this.kinds.length;
    const { physmem, dmat, mem } = this.sc;
    this.base = physmem.alloc(2 * n + 1);
    this.region = mem.u8.subarray(this.base * PAGE_SIZE, (this.base + 2 * n + 1) * PAGE_SIZE);
    for (let k = 0; k <= n; k++) this.region.fill(CANARY, 2 * k * PAGE_SIZE, (2 * k + 1) * PAGE_SIZE);
    for (let k = 0; k < n; k++) this.rng.fill(this.region.subarray((2 * k + 1) * PAGE_SIZE, (2 * k + 2) * PAGE_SIZE));
    this.shadow = this.region.slice();
    for (const [k, kind] of this.kinds.entries()) {
      const map = dmat.dmamapCreate(PAGE_SIZE, 1, PAGE_SIZE, PAGE_SIZE, 0);
      const seg = { ds_addr: (this.base + 2 * k + 1) * PAGE_SIZE, ds_len: PAGE_SIZE, ds_offset: 0 };
      // BUS_DMA_READ: the device writes memory (a writable grant); BUS_DMA_WRITE: it only reads.
      const to = kind === 'X' ? this.bystander.sc.domid : 0;
      dmat.dmamapLoadRaw(map, [seg], PAGE_SIZE, busDmaDomid(to) | (kind === 'R' || kind === 'I' ? BUS_DMA_WRITE : BUS_DMA_READ));
      const gref = map.dm_segs[0]!.ds_addr;
      this.grefs.push(gref);
      this.pageOfRef.set(gref, k);
    }
  }

  private blkback(): Blkback | undefined {
    return this.world.dom0.vbds.get(this.sc.domid, XVDA);
  }

  // --- the frontend's handshake ----------------------------------------------------------

  private get fe(): string {
    return `device/vbd/${XVDA}`;
  }

  /** talk_to_blkback with random transport choices: rings, port, nodes, Initialised; Connected. */
  private async connect(): Promise<void> {
    const { xs } = this.sc;
    const be = await xs.read(`${this.fe}/backend`);
    await xs.awaitState(`${be}/state`, XenbusStateInitWait, { timeoutMs: 30_000 });
    const wire = BLK_WIRES.get(this.rng.chance(0.25) ? XEN_IO_PROTO_ABI_X86_32 : XEN_IO_PROTO_ABI_X86_64)!;
    const order = this.rng.pick([0, 0, 0, 1, 2]);
    const nq = this.rng.pick([1, 1, 2, 3]);
    const persistent = this.rng.chance(0.5);
    const queues: Queue[] = [];
    for (let i = 0; i < nq; i++) queues.push(this.makeQueue(i, wire, order));
    this.conn = { wire, order, persistent, queues };
    this.count(`connect ${wire.protocol} order ${order} queues ${nq}${persistent ? ' persistent' : ''}`);
    await xs.transaction(async (t) => {
      for (const key of await t.list(this.fe)) {
        if (/^(ring-ref\d*|event-channel|queue-\d+|ring-page-order|multi-queue-num-queues|protocol|feature-persistent)$/.test(key)) await t.rm(`${this.fe}/${key}`);
      }
      if (order > 0) await t.write(`${this.fe}/ring-page-order`, String(order));
      if (nq > 1) await t.write(`${this.fe}/multi-queue-num-queues`, String(nq));
      for (const q of queues) {
        const dir = nq === 1 ? this.fe : `${this.fe}/queue-${q.index}`;
        for (let i = 0; i < q.npages; i++) await t.write(`${dir}/ring-ref${order === 0 ? '' : i}`, String(q.map.dm_segs[i]!.ds_addr));
        await t.write(`${dir}/event-channel`, String(q.ih.port));
      }
      await t.write(`${this.fe}/protocol`, wire.protocol);
      await t.write(`${this.fe}/feature-persistent`, persistent ? '1' : '0');
      await t.write(`${this.fe}/state`, String(XenbusStateInitialised));
    });
    await xs.awaitState(`${be}/state`, XenbusStateConnected, { timeoutMs: 30_000 });
    await xs.write(`${this.fe}/state`, String(XenbusStateConnected));
    this.badSeen = this.blkback()?.badRequests ?? 0;
    this.badExpected = 0;
  }

  /** One queue: zeroed ring pages granted to dom0, canary after the entries, an unbound port. */
  private makeQueue(index: number, wire: BlkWire, order: number): Queue {
    const { physmem, dmat, mem, intr } = this.sc;
    const npages = 1 << order;
    const gfn = physmem.alloc(npages);
    const map = dmat.dmamapCreate(npages * PAGE_SIZE, npages, PAGE_SIZE, PAGE_SIZE, 0);
    dmat.dmamapLoadRaw(map, [{ ds_addr: gfn * PAGE_SIZE, ds_len: npages * PAGE_SIZE, ds_offset: 0 }], npages * PAGE_SIZE, busDmaDomid(0));
    const size = wire.ringSize(order);
    const pages = Array.from({ length: npages }, (_, i) => new FramePage(mem, gfn + i, true));
    const ring = new FrontRing(pages, wire.entryBytes, size, `attacker.${index}`);
    ring.init();
    const areaEnd = SRING_RING_OFFSET + size * wire.entryBytes;
    mem.u8.fill(RING_CANARY, gfn * PAGE_SIZE + areaEnd, (gfn + npages) * PAGE_SIZE);
    // The attacker takes responses when it likes; its handler only counts.
    const ih = intr.intrEstablish(0, 0, () => undefined, `attacker.${index}`);
    intr.intrUnmask(ih);
    return { index, gfn, npages, map, ring, head: pages[0]!, size, areaEnd, ih, reqProd: 0, rspCons: 0, outstanding: new Map(), broken: false };
  }

  /** blkif_recover as a frontend does it: the backend closed, take the last answers, let go, Closed, connect again. */
  private async reconnectFront(): Promise<void> {
    const { xs, intr, dmat, physmem } = this.sc;
    const be = await xs.read(`${this.fe}/backend`);
    await xs.awaitState(`${be}/state`, [XenbusStateClosing, XenbusStateClosed], { timeoutMs: 30_000 });
    const conn = this.conn!;
    for (const q of conn.queues) {
      this.collect(q);
      // What the old backend never answered it never did: no effect, no obligation.
      q.outstanding.clear();
      this.checkRingTail(q);
      await intr.intrDisestablish(q.ih);
      try {
        await dmat.dmamapUnload(q.map);
        dmat.dmamapDestroy(q.map);
        physmem.free(q.gfn, q.npages);
      } catch (err) {
        this.violation(`queue ${q.index}: the closed backend still maps the ring: ${(err as Error).message}`);
      }
    }
    this.conn = null;
    await xs.write(`${this.fe}/state`, String(XenbusStateClosed));
    await this.connect();
  }

  /** dom0 restarts the vbd's backend (a crash and restart) while the attacker reconnects. */
  private async restart(): Promise<void> {
    const vbds = this.world.dom0.vbds;
    await this.world.run(Promise.all([vbds.restart(this.sc.domid, XVDA), this.reconnectFront()]), 'vbd restart');
  }

  // --- attacks ------------------------------------------------------------------------

  private async attack(): Promise<void> {
    const action = this.rng.weighted(ACTION_WEIGHTS);
    this.count(action);
    const conn = this.conn!;
    const q = this.rng.pick(conn.queues);
    switch (action) {
      case 'io':
        for (let n = this.rng.range(1, 4); n > 0 && this.free(q) > 0; n--) this.send(q, this.validPlan());
        break;
      case 'malformed':
        for (let n = this.rng.range(1, 3); n > 0 && this.free(q) > 0; n--) this.send(q, this.rng.chance(0.3) ? this.validPlan() : this.malformedPlan());
        break;
      case 'indirect':
        for (let n = this.rng.range(1, 3); n > 0 && this.free(q) > 0; n--) this.send(q, this.indirectPlan(this.rng.chance(0.3)));
        break;
      case 'flood':
        while (this.free(q) > 0) this.send(q, this.rng.chance(0.5) ? this.validPlan() : this.malformedPlan());
        break;
      case 'storm':
        return this.storm(q);
      case 'jump':
        return this.jump(q);
      case 'disconnect':
        return this.disconnect(q);
      case 'reconnect':
        return this.restart();
    }
    this.push(q);
    this.world.pump();
    await this.exchange();
  }

  private free(q: Queue): number {
    return q.size - ((q.reqProd - q.rspCons) >>> 0);
  }

  /** Events with nothing new on the ring, as fast as the attacker can send them. */
  private async storm(q: Queue): Promise<void> {
    const n = this.rng.range(16, 256);
    for (let i = 0; i < n; i++) {
      this.sc.intr.intrSignal(q.ih);
      this.world.pump();
      if ((i & 15) === 15) await this.world.settle();
    }
    // And then real work, which must still be served.
    this.send(q, this.validPlan());
    this.push(q);
    await this.exchange();
  }

  /** req_prod more than a ring ahead of the responses, or behind: blkback must stop serving that ring. */
  private async jump(q: Queue): Promise<void> {
    const ahead = this.rng.chance(0.7);
    const prod = ahead ? (q.reqProd + q.size + 1 + this.rng.int(1 << 20)) >>> 0 : (q.reqProd - 1 - this.rng.int(1 << 20)) >>> 0;
    q.head.store32(0, prod);
    q.broken = true;
    this.sc.intr.intrSignal(q.ih);
    await this.world.settle();
    this.collect(q);
    const err = this.blkback()?.ringErrors[q.index] ?? null;
    if (err === null) this.violation(`req_prod ${ahead ? 'a ring ahead' : 'behind'} (${prod}) and blkback still serves the ring`);
    else this.count('ring broken');
    this.report.ringBreaks++;
    await this.restart();
  }

  /** Requests on the ring, and the backend goes away: before serving them, after, or half way. */
  private async disconnect(q: Queue): Promise<void> {
    const how = this.rng.pick(['unserved', 'unread', 'half'] as const);
    this.count(`disconnect ${how}`);
    for (let n = this.rng.range(1, 6); n > 0 && this.free(q) > 0; n--) this.send(q, this.rng.chance(0.7) ? this.validPlan() : this.malformedPlan());
    this.push(q);
    if (how !== 'unserved') await this.world.settle();
    if (how === 'half') {
      // Judge what was served before new requests rewrite the descriptor pages it read.
      this.collect(q);
      for (let n = this.rng.range(1, 4); n > 0 && this.free(q) > 0; n--) this.send(q, this.validPlan());
      this.push(q);
    }
    await this.restart();
  }

  // --- building requests ---------------------------------------------------------------

  private pageOf(kind: Kind): number {
    for (;;) {
      const k = this.rng.int(this.kinds.length);
      if (this.kinds[k] === kind) return k;
    }
  }

  private refOf(kind: Kind): number {
    return this.grefs[this.pageOf(kind)]!;
  }

  /** A ref that grants nothing: outside every table, or inside ours and not in use. */
  private ungrantedRef(): number {
    if (this.rng.chance(0.5)) {
      const nr = Atomics.load(this.dom.ctl, D.nrGrantFrames) * ENTRIES_PER_FRAME;
      const ref = this.rng.range(8, nr - 1);
      if (this.entry(ref) === 0) return ref;
    }
    return this.rng.pick([OUT_OF_TABLE, OUT_OF_TABLE + 1 + this.rng.int(1 << 20), 0x7fffffff, 0xffffffff]);
  }

  private segment(gref: number): Seg {
    const first = this.rng.int(SECTORS_PER_PAGE);
    return { gref, first, last: this.rng.range(first, SECTORS_PER_PAGE - 1) };
  }

  private segments(n: number, read: boolean): Seg[] {
    const segs: Seg[] = [];
    for (let i = 0; i < n; i++) segs.push(this.segment(this.refOf(read || this.rng.chance(0.7) ? 'W' : 'R')));
    return segs;
  }

  private sectorFor(segs: readonly Seg[]): bigint {
    let total = 0;
    for (const s of segs) total += s.last - s.first + 1;
    return BigInt(this.rng.range(0, Math.max(0, DISK_SECTORS - total)));
  }

  private plan(label: string, op: number, segs: Seg[], sector?: bigint): Plan {
    return {
      label, op, indirectOp: 0, nrSegments: segs.length, sector: sector ?? this.sectorFor(segs), segs,
      indGrefs: [], discardCount: 0n, discardFlag: 0,
    };
  }

  private validPlan(): Plan {
    const r = this.rng.int(100);
    if (r < 40) return this.plan('read', BLKIF_OP_READ, this.segments(this.rng.range(1, BLKIF_MAX_SEGMENTS_PER_REQUEST), true));
    if (r < 80) return this.plan('write', BLKIF_OP_WRITE, this.segments(this.rng.range(1, BLKIF_MAX_SEGMENTS_PER_REQUEST), false));
    if (r < 85) return this.plan('flush', BLKIF_OP_FLUSH_DISKCACHE, this.segments(this.rng.chance(0.7) ? 0 : this.rng.range(1, 3), false));
    if (r < 90) return this.plan('barrier', BLKIF_OP_WRITE_BARRIER, this.segments(this.rng.range(0, 3), false));
    if (r < 95) return this.indirectPlan(false);
    const sector = this.rng.int(DISK_SECTORS);
    const p = this.plan('discard', BLKIF_OP_DISCARD, [], BigInt(sector));
    p.discardCount = BigInt(this.rng.int(DISK_SECTORS - sector + 1));
    return p;
  }

  /** BLKIF_OP_INDIRECT: descriptors written into one of the buffers, which is granted by its ref. */
  private indirectPlan(malformed: boolean): Plan {
    const read = this.rng.chance(0.5);
    const n = this.rng.chance(0.9) ? this.rng.range(1, 32) : this.rng.range(33, MAX_INDIRECT_SEGMENTS);
    const p = this.plan(read ? 'indirect read' : 'indirect write', BLKIF_OP_INDIRECT, this.segments(n, read));
    p.indirectOp = read ? BLKIF_OP_READ : BLKIF_OP_WRITE;
    p.indGrefs = [this.refOf('I')];
    if (!malformed) return p;
    const what = this.rng.pick(MALFORMATIONS.filter((m) => m.startsWith('indirect')));
    this.malform(p, what);
    return p;
  }

  private malformedPlan(): Plan {
    const what = this.rng.pick(MALFORMATIONS);
    if (what.startsWith('indirect')) return this.indirectPlan(true);
    const p = what.includes('discard') ? this.plan('discard', BLKIF_OP_DISCARD, [], 0n) : this.validRw();
    this.malform(p, what);
    return p;
  }

  private validRw(): Plan {
    const read = this.rng.chance(0.5);
    return this.plan(read ? 'read' : 'write', read ? BLKIF_OP_READ : BLKIF_OP_WRITE, this.segments(this.rng.range(1, BLKIF_MAX_SEGMENTS_PER_REQUEST), read));
  }

  /** Break a good plan in one way; the expected status still follows from the bytes alone. */
  private malform(p: Plan, what: (typeof MALFORMATIONS)[number]): void {
    p.label = what;
    const seg = p.segs.length > 0 ? this.rng.pick(p.segs) : undefined;
    switch (what) {
      case 'nr_segments > 11': p.nrSegments = this.rng.range(12, 255); break;
      case 'nr_segments 0': p.nrSegments = 0; break;
      case 'first_sect > last_sect': if (seg) { seg.first = this.rng.range(1, 7); seg.last = this.rng.int(seg.first); } break;
      case 'last_sect > 7': if (seg) seg.last = this.rng.range(8, 255); break;
      case 'past the end': p.sector = BigInt(DISK_SECTORS - this.rng.int(8)) + BigInt(this.rng.int(3) * this.rng.int(1 << 30)); break;
      case 'sector 2^63': p.sector = this.rng.pick([1n << 63n, (1n << 64n) - 1n, 1n << 53n, (1n << 53n) + 1n, 0xffffffffn]); break;
      case 'ref not granted': case 'ref out of the table': if (seg) seg.gref = this.ungrantedRef(); break;
      case 'read into a read-only grant': p.op = BLKIF_OP_READ; if (seg) seg.gref = this.refOf('R'); break;
      case 'ref granted to another domain': if (seg) seg.gref = this.refOf('X'); break;
      case 'bad operation': p.op = this.rng.pick([4, 7, 8, 9, 0x7f, 0x80, 0xff]); break;
      case 'indirect_op': p.indirectOp = this.rng.pick([BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE, 4, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT, 0xff]); break;
      case 'indirect nr_segments 0': p.nrSegments = 0; break;
      case 'indirect nr_segments > 256': p.nrSegments = this.rng.range(MAX_INDIRECT_SEGMENTS + 1, 0xffff); break;
      case 'indirect page not granted': p.indGrefs = [this.ungrantedRef()]; break;
      case 'indirect page granted to another domain': p.indGrefs = [this.refOf('X')]; break;
      case 'indirect descriptors garbage': p.segs = []; break;
      case 'indirect descriptor bad':
        if (seg) {
          if (this.rng.chance(0.5)) seg.gref = this.ungrantedRef();
          else seg.last = this.rng.chance(0.5) ? 8 + this.rng.int(248) : seg.first - 1;
        }
        break;
      case 'discard past the end': p.sector = BigInt(this.rng.int(DISK_SECTORS + 8)); p.discardCount = BigInt(DISK_SECTORS + 1 - this.rng.int(Number(p.sector) + 1)); break;
      case 'secure discard': p.discardFlag = BLKIF_DISCARD_SECURE; p.sector = BigInt(this.rng.int(DISK_SECTORS)); break;
      case 'junk in unused fields': break;
    }
  }

  // --- the ring --------------------------------------------------------------------------

  private readonly req = new Uint8Array(112);
  private readonly rsp = new Uint8Array(112);

  /** Lay the plan out on the next slot (and its descriptors in the indirect page), and record what it must get. */
  private send(q: Queue, p: Plan): void {
    const w = this.conn!.wire;
    const req = this.req.subarray(0, w.entryBytes);
    const v = new DataView(req.buffer, 0, w.entryBytes);
    // Junk everywhere first: blkback must read only the fields the operation has.
    this.rng.fill(req);
    const lo = this.nextId++ >>> 0;
    const hi = this.rng.chance(0.5) ? this.rng.u32() : 0;
    const id = (BigInt(hi) << 32n) | BigInt(lo);
    req[0] = p.op;
    if (p.op === BLKIF_OP_INDIRECT) {
      req[w.indOp] = p.indirectOp;
      v.setUint16(w.indNrSegments, p.nrSegments, true);
      putU64(v, w.indId, id);
      putU64(v, w.indSector, p.sector);
      for (const [i, g] of p.indGrefs.entries()) v.setUint32(w.indGrefs + i * 4, g, true);
      this.writeDescriptors(p);
    } else if (p.op === BLKIF_OP_DISCARD) {
      req[w.discardFlag] = p.discardFlag | (this.rng.chance(0.1) ? 0xfe & this.rng.u32() : 0);
      putU64(v, w.discardId, id);
      putU64(v, w.discardSector, p.sector);
      putU64(v, w.discardNrSectors, p.discardCount);
    } else {
      req[w.nrSegments] = p.nrSegments;
      putU64(v, w.id, id);
      putU64(v, w.sector, p.sector);
      for (const [i, s] of p.segs.slice(0, BLKIF_MAX_SEGMENTS_PER_REQUEST).entries()) {
        v.setUint32(w.seg + i * SEG_BYTES, s.gref, true);
        req[w.seg + i * SEG_BYTES + 4] = s.first;
        req[w.seg + i * SEG_BYTES + 5] = s.last;
      }
    }
    const rspOp = p.op === BLKIF_OP_INDIRECT ? p.indirectOp : p.op;
    q.ring.writeSlot(q.reqProd, req);
    q.reqProd = (q.reqProd + 1) >>> 0;
    q.outstanding.set(lo, { lo, hi, plan: p, rspOp });
    count(this.report.actions, `sent ${p.label}`);
  }

  /** The descriptors of an indirect request into the page its first indirect ref grants (if it is one of ours). */
  private writeDescriptors(p: Plan): void {
    const k = this.pageOfRef.get(p.indGrefs[0] ?? -1);
    if (k === undefined) return;
    const off = (2 * k + 1) * PAGE_SIZE;
    const garbage = p.segs.length === 0;
    const bytes = new Uint8Array(Math.min(garbage ? p.nrSegments : p.segs.length, ENTRIES_PER_FRAME) * SEG_BYTES);
    const v = new DataView(bytes.buffer);
    if (garbage) {
      this.rng.fill(bytes);
      // Garbage, but never a ref that happens to grant one of the attacker's rings.
      for (let at = 0; at < bytes.length; at += SEG_BYTES) {
        const ref = v.getUint32(at, true);
        if (ref < OUT_OF_TABLE && !this.pageOfRef.has(ref)) v.setUint32(at, (ref | 0x80000000) >>> 0, true);
      }
    }
    for (const [i, s] of p.segs.entries()) {
      if (i * SEG_BYTES >= bytes.length) break;
      v.setUint32(i * SEG_BYTES, s.gref, true);
      bytes[i * SEG_BYTES + 4] = s.first;
      bytes[i * SEG_BYTES + 5] = s.last;
      v.setUint16(i * SEG_BYTES + 6, this.rng.u32() & 0xffff, true);
    }
    this.region.set(bytes, off);
    this.shadow.set(bytes, off);
    this.touched.add(k);
  }

  private push(q: Queue): void {
    q.head.store32(0, q.reqProd);
    this.sc.intr.intrSignal(q.ih);
  }

  // --- what each request must get ---------------------------------------------------------

  /** The attacker's grant entry `ref` as dom0 sees it: 0 no access, 1 read-only, 2 writable. */
  private entry(ref: number): number {
    const d = this.dom;
    if (ref >= Atomics.load(d.ctl, D.nrGrantFrames) * ENTRIES_PER_FRAME) return 0;
    const gfn = d.ctl[D.grantFrames + Math.floor(ref / ENTRIES_PER_FRAME)] ?? 0;
    const at = (gfn * PAGE_SIZE + (ref % ENTRIES_PER_FRAME) * 8) >> 2;
    const word = Atomics.load(d.mem.u32, at);
    const frame = Atomics.load(d.mem.u32, at + 1);
    const flags = word & 0xffff;
    if ((flags & GTF_type_mask) !== GTF_permit_access || word >>> 16 !== 0 || frame >= d.nrPages) return 0;
    return (flags & GTF_readonly) !== 0 ? 1 : 2;
  }

  /** The descriptors blkback will find: those in the page the indirect ref grants, as it holds them now. */
  private descriptors(p: Plan): Seg[] | null {
    const n = p.nrSegments;
    const pages = Math.ceil(n / ENTRIES_PER_FRAME);
    const segs: Seg[] = [];
    for (let pg = 0; pg < pages; pg++) {
      const ref = p.indGrefs[pg] ?? 0;
      const k = this.pageOfRef.get(ref);
      if (this.entry(ref) === 0 || k === undefined) return null;
      const v = new DataView(this.shadow.buffer, this.shadow.byteOffset + (2 * k + 1) * PAGE_SIZE, PAGE_SIZE);
      for (let i = 0; i < Math.min(ENTRIES_PER_FRAME, n - pg * ENTRIES_PER_FRAME); i++) {
        segs.push({ gref: v.getUint32(i * SEG_BYTES, true), first: v.getUint8(i * SEG_BYTES + 4), last: v.getUint8(i * SEG_BYTES + 5) });
      }
    }
    return segs;
  }

  /**
   * The status blkif.h and Linux's blkback give these bytes: ERROR for
   * anything malformed (`bad`: blkback must count and log it), EOPNOTSUPP for
   * what this disk cannot do (a secure discard on a file), else OKAY.
   */
  private expect(p: Plan): { status: number; bad: boolean } {
    const bad = { status: BLKIF_RSP_ERROR, bad: true };
    switch (p.op) {
      case BLKIF_OP_READ:
      case BLKIF_OP_WRITE:
      case BLKIF_OP_WRITE_BARRIER:
      case BLKIF_OP_FLUSH_DISKCACHE: {
        const flush = p.op === BLKIF_OP_WRITE_BARRIER || p.op === BLKIF_OP_FLUSH_DISKCACHE;
        if (p.nrSegments > BLKIF_MAX_SEGMENTS_PER_REQUEST || (p.nrSegments === 0 && !flush)) return bad;
        return this.expectData(p.op === BLKIF_OP_READ, p.segs.slice(0, p.nrSegments), p.sector) ? { status: BLKIF_RSP_OKAY, bad: false } : bad;
      }
      case BLKIF_OP_INDIRECT: {
        if (p.indirectOp !== BLKIF_OP_READ && p.indirectOp !== BLKIF_OP_WRITE) return bad;
        if (p.nrSegments === 0 || p.nrSegments > MAX_INDIRECT_SEGMENTS) return bad;
        const segs = this.descriptors(p);
        if (segs === null) return bad;
        p.segs = segs;
        return this.expectData(p.indirectOp === BLKIF_OP_READ, segs, p.sector) ? { status: BLKIF_RSP_OKAY, bad: false } : bad;
      }
      case BLKIF_OP_DISCARD:
        if ((p.discardFlag & BLKIF_DISCARD_SECURE) !== 0) return { status: BLKIF_RSP_EOPNOTSUPP, bad: false };
        if (p.sector > BigInt(DISK_SECTORS) || p.discardCount > BigInt(DISK_SECTORS) - p.sector) return bad;
        return { status: BLKIF_RSP_OKAY, bad: false };
      default:
        return bad;
    }
  }

  /** Every segment within its page, the request within the disk, every ref granted to dom0 as the operation needs. */
  private expectData(read: boolean, segs: readonly Seg[], sector: bigint): boolean {
    let total = 0n;
    for (const s of segs) {
      if (s.first > s.last || s.last >= SECTORS_PER_PAGE) return false;
      total += BigInt(s.last - s.first + 1);
    }
    if (segs.length > 0 && sector + total > BigInt(DISK_SECTORS)) return false;
    for (const s of segs) {
      const access = this.entry(s.gref);
      if (read ? access !== 2 : access === 0) return false;
    }
    return true;
  }

  /** What an OKAY did: a read fills the named sectors of the pages, a write or discard changes the disk. */
  private apply(p: Plan): void {
    const op = p.op === BLKIF_OP_INDIRECT ? p.indirectOp : p.op;
    if (op === BLKIF_OP_DISCARD) {
      this.disk.fill(0, Number(p.sector) * SECTOR, Number(p.sector + p.discardCount) * SECTOR);
      return;
    }
    let pos = Number(p.sector) * SECTOR;
    for (const s of p.segs.slice(0, p.op === BLKIF_OP_INDIRECT ? p.segs.length : p.nrSegments)) {
      const k = this.pageOfRef.get(s.gref);
      if (k === undefined) return this.violation(`${p.label}: OKAY for ref ${s.gref}, which is none of the attacker's buffers`);
      const at = (2 * k + 1) * PAGE_SIZE + s.first * SECTOR;
      const len = (s.last - s.first + 1) * SECTOR;
      if (op === BLKIF_OP_READ) this.shadow.set(this.disk.subarray(pos, pos + len), at);
      else this.disk.set(this.shadow.subarray(at, at + len), pos);
      pos += len;
    }
  }

  // --- answers and checks -------------------------------------------------------------------

  /** Let blkback run; every request of an unbroken ring must then be answered, and as the model says. */
  private async exchange(): Promise<void> {
    // Settle, and wait out (in virtual time) a throttle a storm may have set off.
    await this.world.drain();
    for (const q of this.conn!.queues) {
      this.collect(q);
      if (!q.broken && q.outstanding.size > 0) {
        this.violation(`queue ${q.index}: ${q.outstanding.size} request(s) left unanswered (first: ${[...q.outstanding.values()][0]!.plan.label})`);
        q.outstanding.clear();
      }
    }
    this.checkTouched();
    this.checkBadCount();
    this.checkHandlers([['dom0', this.world.dom0.intr]]);
  }

  /** Take the responses blkback produced on q: each for an outstanding id, in order, with the right operation and status. */
  private collect(q: Queue): void {
    const w = this.conn!.wire;
    const prod = q.head.load32(8);
    const avail = (prod - q.rspCons) >>> 0;
    if (avail > ((q.reqProd - q.rspCons) >>> 0) && !q.broken) {
      this.violation(`queue ${q.index}: rsp_prod ${prod} beyond the ${(q.reqProd - q.rspCons) >>> 0} requests sent`);
      return;
    }
    const rsp = this.rsp.subarray(0, w.entryBytes);
    const v = new DataView(rsp.buffer, 0, w.entryBytes);
    for (let i = 0; i < Math.min(avail, q.size); i++) {
      q.ring.readSlot(q.rspCons, rsp);
      q.rspCons = (q.rspCons + 1) >>> 0;
      const lo = v.getUint32(w.rspId, true);
      const hi = v.getUint32(w.rspId + 4, true);
      const op = rsp[w.rspOperation]!;
      const status = v.getInt16(w.rspStatus, true);
      this.hash.update(rsp.subarray(0, 12));
      this.answered(q, lo, hi, op, status);
    }
    // Ask for an event at the next response, as a frontend does.
    q.head.store32(12, (q.rspCons + 1) >>> 0);
  }

  private answered(q: Queue, lo: number, hi: number, op: number, status: number): void {
    const o = q.outstanding.get(lo);
    if (o === undefined || o.hi !== hi) return this.violation(`queue ${q.index}: response for id ${hi}:${lo}, never sent or answered twice`);
    q.outstanding.delete(lo);
    count(this.report.refusals, STATUS_NAMES[status] ?? `status ${status}`);
    if (op !== o.rspOp) this.violation(`${o.plan.label}: response operation ${op}, request ${o.rspOp}`);
    // Judged now, in ring order: blkback served the requests before this one
    // first, and a READ among them may have rewritten this one's descriptors.
    const want = this.expect(o.plan);
    if (status !== want.status) {
      const what = status === BLKIF_RSP_OKAY ? 'allowed' : `answered ${STATUS_NAMES[status] ?? status}`;
      return this.violation(`${what}: ${o.plan.label} (expected ${STATUS_NAMES[want.status]})`);
    }
    if (want.bad) this.badExpected++;
    if (status === BLKIF_RSP_OKAY) this.apply(o.plan);
    for (const s of o.plan.segs) {
      const k = this.pageOfRef.get(s.gref);
      if (k !== undefined) this.touched.add(k);
    }
  }

  /** Each request answered ERROR for being malformed was counted (and logged) by blkback as such. */
  private checkBadCount(): void {
    const b = this.blkback();
    if (b === undefined) return;
    const seen = b.badRequests - this.badSeen;
    if (seen !== this.badExpected) this.violation(`blkback counted ${seen} bad requests, ${this.badExpected} were answered as such`);
    this.badSeen = b.badRequests;
    this.badExpected = 0;
  }

  /** The pages this step named, and the canaries on either side, hold exactly what the model says. */
  private checkTouched(): void {
    for (const k of this.touched) {
      const from = 2 * k * PAGE_SIZE;
      const to = from + 3 * PAGE_SIZE;
      if (Buffer.compare(this.view(this.region, from, to), this.view(this.shadow, from, to)) !== 0) this.memoryViolation(from, to);
    }
    this.touched.clear();
  }

  private checkAllMemory(): void {
    if (Buffer.compare(this.view(this.region, 0, this.region.length), this.view(this.shadow, 0, this.shadow.length)) !== 0) {
      this.memoryViolation(0, this.region.length);
      this.region.set(this.shadow);
    }
    for (const q of this.conn?.queues ?? []) this.checkRingTail(q);
  }

  private view(a: Uint8Array, from: number, to: number): Buffer {
    return Buffer.from(a.buffer, a.byteOffset + from, to - from);
  }

  private memoryViolation(from: number, to: number): void {
    let i = from;
    while (i < to && this.region[i] === this.shadow[i]) i++;
    const page = Math.floor(i / PAGE_SIZE);
    const what = page % 2 === 0 ? `the canary page before buffer ${page / 2}` : `buffer ${(page - 1) / 2} (${this.kinds[(page - 1) / 2]})`;
    this.violation(`memory of ${what} changed at byte ${i % PAGE_SIZE}: ${this.region[i]} where the model has ${this.shadow[i]}`);
    // Resynchronise so that one stray write is reported once.
    this.shadow.set(this.region.subarray(from, to), from);
  }

  private checkRingTail(q: Queue): void {
    const u8 = this.sc.mem.u8;
    const end = (q.gfn + q.npages) * PAGE_SIZE;
    for (let i = q.gfn * PAGE_SIZE + q.areaEnd; i < end; i++) {
      if (u8[i] !== RING_CANARY) return this.violation(`queue ${q.index}: a write past the ring's entries`);
    }
  }

  /** The file under blkback equals the model disk. */
  private checkDisk(): void {
    const b = this.blkback();
    if (b === undefined) return;
    const file = readFileSync(b.spec.params);
    if (Buffer.compare(file, this.view(this.disk, 0, this.disk.length)) !== 0) {
      let i = 0;
      while (file[i] === this.disk[i]) i++;
      this.violation(`the disk differs from the model at sector ${Math.floor(i / SECTOR)}`);
      this.disk.set(file);
    }
  }

  /** The bystander writes and reads back its own disk through xbf, within the bound. */
  private async probe(): Promise<void> {
    const t0 = performance.now();
    const x = this.bystander;
    const lba = this.rng.int(x.sectors - 4);
    const data = new Uint8Array(this.rng.range(1, 4) * x.sectorSize).fill(++this.probeCounter & 0xff);
    try {
      await this.world.run(x.write(lba, data), 'bystander write');
      const back = await this.world.run(x.read(lba, data.length / x.sectorSize), 'bystander read');
      if (Buffer.compare(back, data) !== 0) this.violation('the bystander read back something else');
      this.hash.update(back);
    } catch (err) {
      this.violation(`the bystander's disk failed: ${(err as Error).message}`);
    }
    const ms = performance.now() - t0;
    this.report.maxProbeLatencyMs = Math.max(this.report.maxProbeLatencyMs, Math.round(ms * 1000) / 1000);
    if (ms > this.latencyBoundMs) this.violation(`the bystander's disk answered in ${ms.toFixed(1)} ms`);
  }
}

export function fuzzBlkback(opts: BlkbackFuzzOptions): Promise<FuzzReport> {
  return new BlkbackFuzz(opts).run();
}
