// dom0's Ethernet bridges, after Linux net/bridge (br_input.c, br_forward.c,
// br_fdb.c): a learning switch per name, created on first use, that floods
// broadcast, multicast and unknown unicast to every other port, forwards
// known unicast to the one port its source was last seen on, and forgets an
// address after `ageingMs`. Ports are netback's vifs, dom0's own endpoints
// (`attachLocal`: the DHCP server, dom0's IP, an uplink) and UDP uplinks.
//
// A frame crosses the bridge as a Packet: a descriptor of where its bytes
// are, not the bytes. A vif's frame stays in the sending guest's granted
// pages until each receiving vif grant-copies it straight into its own
// pages, so guest to guest it is copied once. Only a port in dom0 (or a
// capture) needs the bytes in dom0's memory: they are then copied once into
// a buffer of the pool, which the packet keeps until it is released.
// Packets and buffers come from pools made at start; none is allocated per
// frame.

import { createSocket, type Socket } from 'node:dgram';
import { isIP } from 'node:net';
import { __HYPERVISOR_grant_table_op, DOMID_SELF } from '../abi/xen.js';
import { GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_okay, GNTTABOP_copy } from '../abi/grant_table.js';
import { XEN_NETIF_MAX_TX_SIZE, XEN_NETIF_NR_SLOTS_MIN } from '../abi/netif.js';
import { XenError } from '../errors.js';
import { ETHER_ADDR_LEN, ETHER_HDR_LEN, fillChecksum, flowHash, formatMac, isMulticast, macHigh, macKey, macLow, segmentTcp } from '../ether.js';
import type { Hypercall, gnttab_copy } from '../hypervisor/hypercall.js';
import { copyBytes, PAGE_SIZE, type MemoryViews } from '../hypervisor/page.js';
import { logger, type Log } from '../log.js';
import { PcapWriter } from '../pcap.js';
import type { PhysMem } from '../xen/physmem.js';

/** Most pieces a packet has: a vif frame's slots, or the pages of a pool buffer (65535 bytes). */
export const MAX_FRAGS = XEN_NETIF_NR_SLOTS_MIN;
/** Bytes of the frame's head kept in the packet for switching and hashing (Linux copies 128). */
export const HEADER_BYTES = 128;
const LARGE_PAGES = Math.ceil((XEN_NETIF_MAX_TX_SIZE + 1) / PAGE_SIZE);
const DEFAULT_AGEING_MS = 300_000;
const FDB_MAX = 4096;

/** Where one piece of a frame is: a page another domain granted to dom0, or a page of dom0's own. */
export type Frag = { domid: number; ref: number; byRef: boolean; offset: number; len: number };

/** The maker of a packet (a vif queue): told when every port released it, or when its pages failed a copy. */
export interface PacketOrigin {
  /** netback answers the packet's TX requests now. */
  packetDone(pkt: Packet): void;
  /** A grant of the packet could not be copied from: the maker broke the protocol. */
  packetFault(pkt: Packet, reason: string): void;
}

/** A contiguous run of dom0 pages holding one frame. */
export type PoolBuffer = { gfn: number; pages: number; bytes: Uint8Array };

export class Packet {
  readonly frags: Frag[] = Array.from({ length: MAX_FRAGS }, () => ({ domid: 0, ref: 0, byRef: false, offset: 0, len: 0 }));
  /**
   * The first bytes of the frame (HEADER_BYTES at most), in dom0 memory: a
   * slot of the pool's header pages, so that a short frame can be sent on
   * from here (copybreak).
   */
  readonly header: Uint8Array;
  headerLen = 0;
  nrFrags = 0;
  len = 0;
  /** The sender left the TCP/UDP checksum blank (NETTXF_csum_blank). */
  csumBlank = false;
  /** The sender vouches for the checksum (NETTXF_data_validated). */
  dataValidated = false;
  gsoType = 0;
  gsoSize = 0;
  hash = 0;
  /** Holders: the maker while it forwards, and each port queue that keeps it. */
  refs = 0;
  /** The whole frame in dom0 memory, once some port needed it. */
  buf: PoolBuffer | null = null;
  /** The checksum in `buf` has been filled in. */
  csumFilled = false;
  origin: PacketOrigin | null = null;
  /** Origin data: netback keeps the TX request ids here. */
  readonly ids = new Uint16Array(MAX_FRAGS);
  nrIds = 0;
  nrExtras = 0;
  originQueue = 0;
  /** When the frame entered the bridge (performance.now()); ports queue it at that time. */
  queuedAtMs = 0;

  constructor(
    /** Where `header` is: a dom0 frame and the offset in it. */
    readonly headerGfn: number,
    readonly headerOffset: number,
    mem: MemoryViews,
  ) {
    const at = headerGfn * PAGE_SIZE + headerOffset;
    this.header = mem.u8.subarray(at, at + HEADER_BYTES);
  }

  /** The view of the whole frame in dom0 memory (buf must be set). */
  bytes(): Uint8Array {
    return this.buf!.bytes.subarray(0, this.len);
  }
}

export type PortStats = {
  /** Frames the port put into the bridge. */
  rxPackets: number;
  rxBytes: number;
  /** Frames the bridge handed to the port. */
  txPackets: number;
  txBytes: number;
  /** Frames for the port that it could not take. */
  txDropped: number;
};

export function newPortStats(): PortStats {
  return { rxPackets: 0, rxBytes: 0, txPackets: 0, txBytes: 0, txDropped: 0 };
}

/** A bridge port (struct net_bridge_port). */
export interface BridgePort {
  readonly name: string;
  readonly stats: PortStats;
  /** Take a packet from the bridge; a port that keeps it past the call takes a reference. */
  deliver(pkt: Packet): void;
  /** Drop every packet made by `origin` that the port still holds (its sender is going away). */
  purge?(origin: PacketOrigin): void;
}

export type FramePoolOptions = {
  /** Packet descriptors: frames in flight across all bridges at once. */
  packets?: number;
  /** One-page buffers (frames up to 4096 bytes in dom0). */
  smallBuffers?: number;
  /** 17-page buffers (frames up to 65535 bytes in dom0). */
  largeBuffers?: number;
};

function newCopy(): gnttab_copy {
  return { source: { u: { ref: 0, gmfn: 0 }, domid: 0, offset: 0 }, dest: { u: { ref: 0, gmfn: 0 }, domid: 0, offset: 0 }, len: 0, flags: 0, status: 0 };
}

/** One copy's op: a ref side names a grant of its domain, otherwise a frame of dom0's own. */
function fillCopy(op: gnttab_copy, src: Frag, srcOffset: number, dstDomid: number, dstRef: number, dstByRef: boolean, dstOffset: number, len: number): void {
  op.source.domid = src.byRef ? src.domid : DOMID_SELF;
  op.source.u.ref = op.source.u.gmfn = src.ref;
  op.source.offset = srcOffset;
  op.dest.domid = dstByRef ? dstDomid : DOMID_SELF;
  op.dest.u.ref = op.dest.u.gmfn = dstRef;
  op.dest.offset = dstOffset;
  op.len = len;
  op.flags = (src.byRef ? GNTCOPY_source_gref : 0) | (dstByRef ? GNTCOPY_dest_gref : 0);
}

/**
 * GNTTABOP_copy ops made once (at attach), filled one per piece and done in
 * one hypercall by FramePool.copyBatch (Linux's gnttab_batch_copy); each
 * op's status is read after it, by index.
 */
export class CopyBatch {
  readonly ops: gnttab_copy[];
  count = 0;

  constructor(size: number) {
    this.ops = Array.from({ length: size }, newCopy);
  }

  /** Ops still free. */
  get room(): number {
    return this.ops.length - this.count;
  }

  status(i: number): number {
    return this.ops[i]!.status;
  }
}

/**
 * dom0's frame memory: packet descriptors, and buffers in dom0's own pages
 * so that GNTTABOP_copy can move bytes between them and a guest's grants.
 */
export class FramePool {
  private readonly free: Packet[] = [];
  private readonly small: PoolBuffer[] = [];
  private readonly large: PoolBuffer[] = [];
  /** Called when a packet goes back to the pool while someone waits for one. */
  private readonly waiting: Array<() => void> = [];
  private readonly op: gnttab_copy = newCopy();
  readonly mem: MemoryViews;
  /** Where software GSO builds each segment (dom0's heap: segments are handed on, not grant-copied). */
  readonly scratch = new Uint8Array(XEN_NETIF_MAX_TX_SIZE + 1);
  /** A dom0 page that frame heads are copied through. */
  private readonly scratchGfn: number;
  readonly stats = { packets: 0, copies: 0, copyFailures: 0, noPacket: 0, noBuffer: 0 };

  constructor(
    private readonly hypercall: Hypercall,
    physmem: PhysMem,
    opts: FramePoolOptions = {},
  ) {
    this.mem = physmem.mem;
    const packets = opts.packets ?? 4096;
    // Each packet's header slot: HEADER_BYTES in dom0 pages, none straddling a page.
    const perPage = PAGE_SIZE / HEADER_BYTES;
    const headerGfn = physmem.alloc(Math.ceil(packets / perPage));
    for (let i = 0; i < packets; i++) {
      this.free.push(new Packet(headerGfn + Math.floor(i / perPage), (i % perPage) * HEADER_BYTES, this.mem));
    }
    for (let i = 0; i < (opts.smallBuffers ?? 256); i++) this.small.push(this.buffer(physmem, 1));
    for (let i = 0; i < (opts.largeBuffers ?? 16); i++) this.large.push(this.buffer(physmem, LARGE_PAGES));
    this.stats.packets = packets;
    this.scratchGfn = physmem.alloc(1);
  }

  /** Whether the source of `op` (a copy that failed) can be read, with a copy of no bytes: tells which side broke. */
  probeSource(op: gnttab_copy): boolean {
    const p = this.op;
    p.source.domid = op.source.domid;
    p.source.u.ref = op.source.u.ref;
    p.source.u.gmfn = op.source.u.gmfn;
    p.source.offset = op.source.offset;
    p.dest.domid = DOMID_SELF;
    p.dest.u.ref = p.dest.u.gmfn = this.scratchGfn;
    p.dest.offset = 0;
    p.len = 0;
    p.flags = op.flags & GNTCOPY_source_gref;
    return this.issue(p) === GNTST_okay;
  }

  private buffer(physmem: PhysMem, pages: number): PoolBuffer {
    const gfn = physmem.alloc(pages);
    return { gfn, pages, bytes: this.mem.u8.subarray(gfn * PAGE_SIZE, (gfn + pages) * PAGE_SIZE) };
  }

  /** A clean packet holding one reference (the caller's), or null when all are in flight. */
  get(origin: PacketOrigin | null): Packet | null {
    const pkt = this.free.pop();
    if (pkt === undefined) {
      this.stats.noPacket++;
      return null;
    }
    pkt.refs = 1;
    pkt.origin = origin;
    pkt.nrFrags = pkt.len = pkt.gsoType = pkt.gsoSize = pkt.hash = pkt.headerLen = pkt.nrIds = pkt.nrExtras = 0;
    pkt.csumBlank = pkt.dataValidated = pkt.csumFilled = false;
    return pkt;
  }

  /** Drop one reference; the last one tells the origin, then frees the buffer and the packet. */
  release(pkt: Packet): void {
    if (--pkt.refs > 0) return;
    if (pkt.refs < 0) throw new XenError('EINVAL', 'packet released twice');
    const origin = pkt.origin;
    pkt.origin = null;
    origin?.packetDone(pkt);
    if (pkt.buf !== null) (pkt.buf.pages === 1 ? this.small : this.large).push(pkt.buf);
    pkt.buf = null;
    this.free.push(pkt);
    if (this.waiting.length > 0) queueMicrotask(this.wakeWaiting);
  }

  private readonly wakeWaiting = (): void => {
    for (const w of this.waiting.splice(0)) w();
  };

  /** Run `fn` once a packet is back in the pool. */
  whenFree(fn: () => void): void {
    if (!this.waiting.includes(fn)) this.waiting.push(fn);
  }

  /** A buffer for `len` bytes, attached to the packet; false when none is free. */
  attachBuffer(pkt: Packet, len: number): boolean {
    const buf = (len <= PAGE_SIZE ? this.small : this.large).pop() ?? (len <= PAGE_SIZE ? this.large.pop() : undefined);
    if (buf === undefined) {
      this.stats.noBuffer++;
      return false;
    }
    pkt.buf = buf;
    return true;
  }

  /** Point the packet's frags at its own buffer's pages (a frame made in dom0). */
  fragsFromBuffer(pkt: Packet): void {
    const buf = pkt.buf!;
    let n = 0;
    for (let off = 0; off < pkt.len; off += PAGE_SIZE, n++) {
      const f = pkt.frags[n]!;
      f.domid = DOMID_SELF;
      f.byRef = false;
      f.ref = buf.gfn + off / PAGE_SIZE;
      f.offset = 0;
      f.len = Math.min(PAGE_SIZE, pkt.len - off);
    }
    pkt.nrFrags = n;
  }

  /**
   * GNTTABOP_copy of `len` bytes; both sides within their page. A ref side
   * names a grant of `domid`, otherwise a frame of dom0's own. Returns the
   * GNTST status.
   */
  copy(src: Frag, srcOffset: number, dstDomid: number, dstRef: number, dstByRef: boolean, dstOffset: number, len: number): number {
    fillCopy(this.op, src, srcOffset, dstDomid, dstRef, dstByRef, dstOffset, len);
    return this.issue(this.op);
  }

  private issue(op: gnttab_copy): number {
    this.hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_copy, op);
    this.stats.copies++;
    if (op.status !== GNTST_okay) this.stats.copyFailures++;
    return op.status;
  }

  /** Add a copy (arguments as copy()) to `batch`; its index there. */
  addCopy(batch: CopyBatch, src: Frag, srcOffset: number, dstDomid: number, dstRef: number, dstByRef: boolean, dstOffset: number, len: number): number {
    const i = batch.count++;
    fillCopy(batch.ops[i]!, src, srcOffset, dstDomid, dstRef, dstByRef, dstOffset, len);
    return i;
  }

  /** Do the batch's copies in one hypercall; each op's status is then in batch.status(i). */
  copyBatch(batch: CopyBatch): void {
    const n = batch.count;
    if (n === 0) return;
    this.hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_copy, batch.ops, n);
    this.stats.copies += n;
    for (let i = 0; i < n; i++) if (batch.ops[i]!.status !== GNTST_okay) this.stats.copyFailures++;
  }

  /**
   * Add the copies of the frame's first HEADER_BYTES into pkt.header
   * (straight into dom0 memory) to `batch`, and set pkt.headerLen: right
   * once they all worked.
   */
  headerCopies(pkt: Packet, batch: CopyBatch): void {
    const want = Math.min(HEADER_BYTES, pkt.len);
    let got = 0;
    for (let i = 0; i < pkt.nrFrags && got < want; i++) {
      const f = pkt.frags[i]!;
      const n = Math.min(f.len, want - got);
      if (n === 0) continue;
      this.addCopy(batch, f, f.offset, 0, pkt.headerGfn, false, pkt.headerOffset + got, n);
      got += n;
    }
    pkt.headerLen = got;
  }

  /**
   * Copybreak: a frame that fits its header copy is sent on from there (Linux
   * netback too copies the first 128 bytes of every frame into dom0), so each
   * receiver's copy reads dom0's page instead of pinning the sender's grant
   * again. The sender is still answered only when every port let go of the
   * packet: its ring stays the queue, and a slow receiver still slows it.
   */
  fragsFromHeader(pkt: Packet): void {
    const f = pkt.frags[0]!;
    f.domid = DOMID_SELF;
    f.byRef = false;
    f.ref = pkt.headerGfn;
    f.offset = pkt.headerOffset;
    f.len = pkt.len;
    pkt.nrFrags = 1;
  }

  /**
   * The frame's bytes in a dom0 buffer (copied there once, then kept with the
   * packet). Null when no buffer is free or a source grant failed
   * (`failedFrag` then says which piece).
   */
  materialize(pkt: Packet): Uint8Array | null {
    if (pkt.buf !== null) return pkt.bytes();
    // A failure for want of a buffer blames no sender.
    this.failedFrag = -1;
    if (!this.attachBuffer(pkt, pkt.len)) return null;
    const base = pkt.buf!.gfn;
    let at = 0;
    for (let i = 0; i < pkt.nrFrags; i++) {
      const f = pkt.frags[i]!;
      for (let done = 0; done < f.len; ) {
        const n = Math.min(f.len - done, PAGE_SIZE - (at % PAGE_SIZE));
        if (this.copy(f, f.offset + done, 0, base + Math.floor(at / PAGE_SIZE), false, at % PAGE_SIZE, n) !== GNTST_okay) {
          this.failedFrag = i;
          (pkt.buf!.pages === 1 ? this.small : this.large).push(pkt.buf!);
          pkt.buf = null;
          return null;
        }
        done += n;
        at += n;
      }
    }
    return pkt.bytes();
  }

  /** The frag whose copy failed in the last materialize() that returned null for that reason. */
  failedFrag = -1;

  /**
   * The frame as frames without GSO: a GSO frame cut into segments (each
   * with its checksum, in `scratch`), any other frame completed. Each goes to
   * `emit`, valid during the call. False when the bytes could not be had.
   */
  unoffload(pkt: Packet, emit: (frame: Uint8Array) => void): boolean {
    if (pkt.gsoType === 0) {
      const bytes = this.complete(pkt);
      if (bytes !== null) emit(bytes);
      return bytes !== null;
    }
    const bytes = this.materialize(pkt);
    if (bytes === null) return false;
    if (segmentTcp(bytes, pkt.len, pkt.gsoSize, this.scratch, emit) === 0) emit(this.complete(pkt)!);
    return true;
  }

  /** The frame as a port in dom0 must see it: materialized, its blank checksum filled in. */
  complete(pkt: Packet): Uint8Array | null {
    const bytes = this.materialize(pkt);
    if (bytes === null) return null;
    if (pkt.csumBlank && !pkt.csumFilled) {
      fillChecksum(bytes);
      pkt.csumFilled = true;
    }
    return bytes;
  }
}

type FdbEntry = { port: BridgePort; seenMs: number };

export type BridgeOptions = {
  /** Forget a learned address after this long (Linux's default is 300 s). */
  ageingMs?: number;
  /** Capture every frame that enters the bridge (null: stop capturing). */
  pcap?: string | null;
};

/** A bridge as `xenpv`'s net stats report it. */
export type BridgeReport = {
  name: string;
  ports: (PortStats & { name: string })[];
  fdb: { mac: string; port: string; ageMs: number }[];
  flooded: number;
  forwarded: number;
  filtered: number;
  learned: number;
  captureDrops: number;
  captured: number;
};

/** One learning bridge (struct net_bridge). */
export class Bridge {
  readonly ports: BridgePort[] = [];
  /** br_fdb: by the address's first three bytes, then its last three (macHigh, macLow), so no key is a heap number. */
  private readonly fdb = new Map<number, Map<number, FdbEntry>>();
  private fdbSize = 0;
  private readonly log: Log;
  ageingMs: number;
  pcap: PcapWriter | null = null;
  readonly stats = { flooded: 0, forwarded: 0, filtered: 0, learned: 0, captureDrops: 0 };

  constructor(
    readonly name: string,
    readonly pool: FramePool,
    opts: BridgeOptions = {},
  ) {
    this.log = logger('bridge', name);
    this.ageingMs = opts.ageingMs ?? DEFAULT_AGEING_MS;
    if (opts.pcap !== undefined) this.setPcap(opts.pcap);
  }

  setPcap(path: string | null): void {
    this.pcap?.close();
    this.pcap = path === null ? null : new PcapWriter(path);
  }

  /** br_add_if */
  addPort(port: BridgePort): void {
    if (this.ports.includes(port)) return;
    this.ports.push(port);
    this.log('port %s added', port.name);
  }

  /** br_del_if: the port and the addresses learned on it go. */
  removePort(port: BridgePort): void {
    const i = this.ports.indexOf(port);
    if (i < 0) return;
    this.ports.splice(i, 1);
    this.forget((e) => e.port === port);
    this.log('port %s removed', port.name);
  }

  /** Packets still held by some port and made by `origin` are dropped (the sender is going away). */
  purge(origin: PacketOrigin): void {
    for (const p of this.ports) p.purge?.(origin);
  }

  /** Where `mac` was last seen, if still fresh (br_fdb_find). */
  lookup(mac: Uint8Array, at = 0, nowMs = performance.now()): BridgePort | null {
    const low = this.fdb.get(macHigh(mac, at));
    const key = macLow(mac, at);
    const e = low?.get(key);
    if (e === undefined) return null;
    if (nowMs - e.seenMs > this.ageingMs) {
      this.remove(mac, at, low!, key);
      return null;
    }
    return e.port;
  }

  /**
   * br_handle_frame: learn the source, then forward or flood. The caller
   * keeps its own reference. A port that forwards a batch passes one clock
   * reading for it (the clock is a call into the runtime).
   */
  input(from: BridgePort, pkt: Packet, now = performance.now()): void {
    from.stats.rxPackets++;
    from.stats.rxBytes += pkt.len;
    if (this.pcap !== null) this.capture(pkt);
    if (pkt.hash === 0) pkt.hash = flowHash(pkt.header, pkt.headerLen);
    const hdr = pkt.header;
    pkt.queuedAtMs = now;
    if (!isMulticast(hdr, ETHER_ADDR_LEN)) this.learn(hdr, from, now);
    const to = isMulticast(hdr, 0) ? null : this.lookup(hdr, 0, now);
    if (to === from) {
      this.stats.filtered++;
      return;
    }
    if (to !== null) {
      this.stats.forwarded++;
      this.deliver(to, pkt);
      return;
    }
    this.stats.flooded++;
    for (let i = 0; i < this.ports.length; i++) {
      const p = this.ports[i]!;
      if (p !== from) this.deliver(p, pkt);
    }
  }

  private deliver(port: BridgePort, pkt: Packet): void {
    try {
      port.deliver(pkt);
    } catch (err) {
      port.stats.txDropped++;
      this.log('%s: %s', port.name, (err as Error).message);
    }
  }

  private learn(hdr: Uint8Array, port: BridgePort, now: number): void {
    const high = macHigh(hdr, ETHER_ADDR_LEN);
    const key = macLow(hdr, ETHER_ADDR_LEN);
    const e = this.fdb.get(high)?.get(key);
    if (e !== undefined) {
      e.port = port;
      e.seenMs = now;
      return;
    }
    // A bounded table: a sender that invents addresses cannot grow it without end.
    if (this.fdbSize >= FDB_MAX) this.expire(now);
    if (this.fdbSize >= FDB_MAX) return;
    let low = this.fdb.get(high);
    if (low === undefined) this.fdb.set(high, (low = new Map()));
    low.set(key, { port, seenMs: now });
    this.fdbSize++;
    this.stats.learned++;
  }

  private remove(mac: Uint8Array, at: number, low: Map<number, FdbEntry>, key: number): void {
    low.delete(key);
    this.fdbSize--;
    if (low.size === 0) this.fdb.delete(macHigh(mac, at));
  }

  /** Entries for which `stale` holds go. */
  private forget(stale: (e: FdbEntry) => boolean): void {
    for (const [high, low] of this.fdb) {
      for (const [key, e] of low) {
        if (!stale(e)) continue;
        low.delete(key);
        this.fdbSize--;
      }
      if (low.size === 0) this.fdb.delete(high);
    }
  }

  /** br_fdb_cleanup */
  expire(now = performance.now()): void {
    this.forget((e) => now - e.seenMs > this.ageingMs);
  }

  /** The learned table, for tools and tests. */
  entries(): { mac: string; port: string; ageMs: number }[] {
    const now = performance.now();
    const out: { mac: string; port: string; ageMs: number }[] = [];
    const b = new Uint8Array(ETHER_ADDR_LEN);
    for (const [high, low] of this.fdb) {
      for (const [key, e] of low) {
        for (let i = 0; i < 3; i++) {
          b[i] = (high >> (16 - 8 * i)) & 0xff;
          b[3 + i] = (key >> (16 - 8 * i)) & 0xff;
        }
        out.push({ mac: formatMac(b), port: e.port.name, ageMs: now - e.seenMs });
      }
    }
    return out;
  }

  report(): BridgeReport {
    return {
      name: this.name, ports: this.ports.map((p) => ({ name: p.name, ...p.stats })), fdb: this.entries(),
      ...this.stats, captured: this.pcap?.frames ?? 0,
    };
  }

  capture(pkt: Packet): void {
    const bytes = this.pool.materialize(pkt);
    if (bytes === null) {
      this.stats.captureDrops++;
      return;
    }
    this.pcap!.write(bytes);
  }

  close(): void {
    this.pcap?.close();
    this.pcap = null;
  }
}

/**
 * A port for code that runs in dom0 (a DHCP server, dom0's own IP, an
 * uplink): the same { mac, mtu, send, onFrame } a guest's interface offers.
 * Without `promiscuous` it takes only frames for its own address,
 * broadcast and multicast, as a NIC's filter does.
 */
export class LocalPort implements BridgePort {
  readonly stats = newPortStats();
  private readonly handlers: Array<(frame: Uint8Array) => void> = [];
  private closed = false;
  private readonly log: Log;

  constructor(
    readonly name: string,
    private readonly bridge: Bridge,
    readonly mac: Uint8Array,
    readonly mtu: number,
    readonly promiscuous: boolean,
  ) {
    this.log = logger('bridge', `${bridge.name}:${name}`);
  }

  /** Put a frame onto the bridge. EINVAL (no header), EMSGSIZE, ENETDOWN (closed); a full pool drops it. */
  send(frame: Uint8Array): Promise<void> {
    if (this.closed) return Promise.reject(new XenError('ENETDOWN', `${this.name}: port is closed`));
    if (!(frame instanceof Uint8Array) || frame.length < ETHER_HDR_LEN) {
      return Promise.reject(new XenError('EINVAL', `${this.name}: a frame is at least ${ETHER_HDR_LEN} bytes`));
    }
    if (frame.length > XEN_NETIF_MAX_TX_SIZE) return Promise.reject(new XenError('EMSGSIZE', `${this.name}: ${frame.length} bytes`));
    const pool = this.bridge.pool;
    const pkt = pool.get(null);
    if (pkt === null || !pool.attachBuffer(pkt, frame.length)) {
      if (pkt !== null) pool.release(pkt);
      this.stats.txDropped++;
      return RESOLVED;
    }
    pkt.len = frame.length;
    copyBytes(pkt.buf!.bytes, 0, frame, 0, frame.length);
    pool.fragsFromBuffer(pkt);
    pkt.headerLen = Math.min(HEADER_BYTES, frame.length);
    pkt.header.set(frame.subarray(0, pkt.headerLen));
    pkt.dataValidated = true;
    this.bridge.input(this, pkt);
    pool.release(pkt);
    return RESOLVED;
  }

  onFrame(handler: (frame: Uint8Array) => void): () => void {
    this.handlers.push(handler);
    return () => {
      const i = this.handlers.indexOf(handler);
      if (i >= 0) this.handlers.splice(i, 1);
    };
  }

  deliver(pkt: Packet): void {
    if (this.closed) return;
    const hdr = pkt.header;
    if (!this.promiscuous && !isMulticast(hdr, 0) && macKey(hdr, 0) !== macKey(this.mac, 0)) return;
    if (this.bridge.pool.unoffload(pkt, this.emit)) return;
    this.stats.txDropped++;
    // A sender's grant that cannot be read is its vif's fault, as when a vif copies it (netback's rxCopy).
    if (this.bridge.pool.failedFrag >= 0) pkt.origin?.packetFault(pkt, 'a TX grant could not be copied');
  }

  /** One frame (a GSO frame's segment) to every handler. */
  private readonly emit = (frame: Uint8Array): void => {
    this.stats.txPackets++;
    this.stats.txBytes += frame.length;
    for (let i = 0; i < this.handlers.length; i++) {
      try {
        this.handlers[i]!(frame);
      } catch (err) {
        this.log('handler: %s', (err as Error).message);
      }
    }
  };

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.handlers.length = 0;
    this.bridge.removePort(this);
  }
}

const RESOLVED: Promise<void> = Promise.resolve();

/** Where an uplink's datagrams go and come from: `udp:<localport>:<remotehost>:<remoteport>`. */
export type UplinkSpec = { localPort: number; remoteHost: string; remotePort: number };

/** Parse `udp:<localport>:<remotehost>:<remoteport>` (an IPv6 host in brackets); EINVAL otherwise. */
export function parseUplink(text: string): UplinkSpec {
  const m = /^udp:(\d{1,5}):(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(text);
  const port = (s: string): number => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < 1 || n > 65535) throw new XenError('EINVAL', `uplink ${JSON.stringify(text)}: port ${s} out of range`);
    return n;
  };
  if (m === null) throw new XenError('EINVAL', `uplink ${JSON.stringify(text)}: want udp:<localport>:<remotehost>:<remoteport>`);
  return { localPort: port(m[1]!), remoteHost: m[2]!.replace(/^\[(.*)\]$/, '$1'), remotePort: port(m[3]!) };
}

/**
 * A UDP uplink: each Ethernet frame is one datagram, the format of QEMU's
 * `-netdev dgram` and of socat's UDP addresses, so a Linux TAP device
 * bridged by socat joins the bridge. Only the named peer is heard.
 */
export class UdpUplink {
  readonly port: LocalPort;
  private readonly socket: Socket;
  private readonly log: Log;
  readonly stats = { sent: 0, received: 0, tooBig: 0, runts: 0, sendErrors: 0 };

  private constructor(bridge: Bridge, readonly spec: UplinkSpec, socket: Socket) {
    this.log = logger('uplink', bridge.name);
    this.socket = socket;
    // The far side is a switch port too: it takes every frame.
    this.port = new LocalPort(`udp:${spec.localPort}`, bridge, new Uint8Array(ETHER_ADDR_LEN), 65535 - ETHER_HDR_LEN, true);
    bridge.addPort(this.port);
    this.port.onFrame((frame) => this.output(frame));
    socket.on('message', (msg) => this.inputDatagram(msg));
    socket.on('error', (err) => this.log('socket: %s', err.message));
  }

  /** Bind the local port, connect to the peer, join the bridge. */
  static async open(bridge: Bridge, spec: UplinkSpec): Promise<UdpUplink> {
    const family = isIP(spec.remoteHost) === 6 ? 'udp6' : 'udp4';
    const socket = createSocket(family);
    await new Promise<void>((resolve, reject) => {
      socket.once('error', reject);
      socket.bind(spec.localPort, () => {
        socket.off('error', reject);
        resolve();
      });
    }).catch((err: NodeJS.ErrnoException) => {
      socket.close();
      throw new XenError(err.code ?? 'EIO', `uplink ${bridge.name}: bind ${spec.localPort}: ${err.message}`);
    });
    await new Promise<void>((resolve, reject) => {
      socket.once('error', reject);
      socket.connect(spec.remotePort, spec.remoteHost, () => {
        socket.off('error', reject);
        resolve();
      });
    }).catch((err: NodeJS.ErrnoException) => {
      socket.close();
      throw new XenError(err.code ?? 'EIO', `uplink ${bridge.name}: ${spec.remoteHost}:${spec.remotePort}: ${err.message}`);
    });
    return new UdpUplink(bridge, spec, socket);
  }

  private inputDatagram(msg: Buffer): void {
    if (msg.length < ETHER_HDR_LEN) {
      this.stats.runts++;
      return;
    }
    this.stats.received++;
    void this.port.send(msg);
  }

  private output(frame: Uint8Array): void {
    // The largest UDP payload over IPv4 is 65507 bytes.
    if (frame.length > 65507) {
      this.stats.tooBig++;
      return;
    }
    // The view dies with the call; the datagram needs its own bytes until sent.
    this.socket.send(Buffer.from(frame), (err) => {
      if (err !== null) this.stats.sendErrors++;
    });
    this.stats.sent++;
  }

  close(): void {
    this.port.close();
    this.socket.close();
  }
}

/** dom0's bridges by name, made on first use; one frame pool for all of them. */
export class Bridges {
  private readonly byName = new Map<string, Bridge>();
  private readonly uplinks: UdpUplink[] = [];
  private readonly options = new Map<string, BridgeOptions>();

  constructor(readonly pool: FramePool) {}

  /** Options for a bridge not made yet, or applied to one that is (pcap). */
  configure(name: string, opts: BridgeOptions): void {
    this.options.set(name, { ...this.options.get(name), ...opts });
    const b = this.byName.get(name);
    if (b !== undefined && opts.pcap !== undefined) b.setPcap(opts.pcap);
    if (b !== undefined && opts.ageingMs !== undefined) b.ageingMs = opts.ageingMs;
  }

  get(name: string): Bridge {
    if (!/^[A-Za-z0-9._-]{1,15}$/.test(name)) throw new XenError('EINVAL', `bridge name ${JSON.stringify(name)}: 1-15 of A-Za-z0-9._-`);
    let b = this.byName.get(name);
    if (b === undefined) {
      b = new Bridge(name, this.pool, this.options.get(name));
      this.byName.set(name, b);
    }
    return b;
  }

  find(name: string): Bridge | undefined {
    return this.byName.get(name);
  }

  list(): Bridge[] {
    return [...this.byName.values()];
  }

  /** A port for dom0 code on bridge `name` (made if needed). */
  attachLocal(name: string, opts: { name: string; mac: Uint8Array; mtu?: number; promiscuous?: boolean }): LocalPort {
    if (opts.mac.length !== ETHER_ADDR_LEN) throw new XenError('EINVAL', 'a MAC address is 6 bytes');
    const bridge = this.get(name);
    const port = new LocalPort(opts.name, bridge, Uint8Array.from(opts.mac), opts.mtu ?? 1500, opts.promiscuous ?? false);
    bridge.addPort(port);
    return port;
  }

  async addUplink(name: string, spec: UplinkSpec): Promise<UdpUplink> {
    const u = await UdpUplink.open(this.get(name), spec);
    this.uplinks.push(u);
    return u;
  }

  close(): void {
    for (const u of this.uplinks.splice(0)) u.close();
    for (const b of this.byName.values()) b.close();
  }
}
