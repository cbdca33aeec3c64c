// dom0's block backend for one vbd, after Linux drivers/block/xen-blkback
// (xenbus.c for the xenstore half, blkback.c for the datapath). It advertises
// the disk, waits for the frontend's ring-ref and event-channel, maps the
// one-page ring and serves READ, WRITE and FLUSH_DISKCACHE. Each request is
// copied once off the ring and checked; a bad one gets BLKIF_RSP_ERROR and
// the ring keeps being served. Segments are reached by grant map, one page
// at a time, and copied through a preallocated page buffer to the storage.

import { closeSync, fdatasyncSync, fstatSync, openSync, readSync, writeSync } from 'node:fs';
import {
  BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE,
  BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, VDISK_READONLY, blkif_request, blkif_request_segment, blkif_response,
} from '../abi/blkif.js';
import { __CONST_RING_SIZE, blkif_sring, blkif_sring_entry } from '../abi/ring.js';
import { offsetOf } from '../abi/layout.js';
import { XEN_IO_PROTO_ABI_X86_64 } from '../abi/protocols.js';
import { XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitWait, XenbusStateInitialised } from '../abi/xenbus.js';
import { XenError } from '../errors.js';
import type { Interrupts, IntrHandle } from '../evtchn/evtchn.js';
import type { Hypercall } from '../hypervisor/hypercall.js';
import { PAGE_SIZE, writablePage, type Page, type ReadPage } from '../hypervisor/page.js';
import { BackRing } from '../xen/ring.js';
import type { XenStore } from '../xenstore/xenstore.js';
import { logger, type Log } from '../log.js';
import { bindInterdomain, mapGrant, mapGrantReadonly, unmapGrant, type GrantMapping } from './xenbus.js';

export const SECTOR_SIZE = 512;
const SECTORS_PER_PAGE = PAGE_SIZE / SECTOR_SIZE;
const RING_SIZE = __CONST_RING_SIZE(blkif_sring, PAGE_SIZE);
const ENTRY_BYTES = blkif_sring_entry.size;
const CONNECT_TIMEOUT_MS = 5 * 60_000;

const REQ_OPERATION = offsetOf(blkif_request, 'operation');
const REQ_NR_SEGMENTS = offsetOf(blkif_request, 'nr_segments');
const REQ_ID = offsetOf(blkif_request, 'id');
const REQ_SECTOR = offsetOf(blkif_request, 'sector_number');
const REQ_SEG = offsetOf(blkif_request, 'seg');
const SEG_GREF = offsetOf(blkif_request_segment, 'gref');
const SEG_FIRST = offsetOf(blkif_request_segment, 'first_sect');
const SEG_LAST = offsetOf(blkif_request_segment, 'last_sect');
const RSP_ID = offsetOf(blkif_response, 'id');
const RSP_OPERATION = offsetOf(blkif_response, 'operation');
const RSP_STATUS = offsetOf(blkif_response, 'status');

/** Where a vbd's data lives: `file` (params = path), `memory` or `null` (params = size in bytes). */
export type VbdStorageType = 'file' | 'memory' | 'null';

/** One vbd as the toolstack hands it to dom0. */
export type VbdSpec = {
  domid: number;
  devid: number;
  type: VbdStorageType;
  params: string;
  readOnly: boolean;
};

/** A vbd's counters, as Linux blkback's statistics/ (rd_req, wr_req, f_req, rd_sect, wr_sect, bad requests). */
export type VbdStats = { devid: number; counters: Record<string, number> };

/** The disk behind a vbd, in bytes at byte offsets; sizes are whole sectors. */
interface Storage {
  readonly sectors: number;
  read(into: Uint8Array, offset: number): void;
  write(from: Uint8Array, offset: number): void;
  flush(): void;
  close(): void;
}

class FileStorage implements Storage {
  readonly sectors: number;
  private fd: number;

  constructor(path: string, readOnly: boolean) {
    this.fd = openSync(path, readOnly ? 'r' : 'r+');
    this.sectors = Math.floor(fstatSync(this.fd).size / SECTOR_SIZE);
  }
  read(into: Uint8Array, offset: number): void {
    for (let done = 0; done < into.length; ) {
      const n = readSync(this.fd, into, done, into.length - done, offset + done);
      if (n === 0) throw new XenError('EIO', `short read at ${offset + done}`);
      done += n;
    }
  }
  write(from: Uint8Array, offset: number): void {
    for (let done = 0; done < from.length; ) done += writeSync(this.fd, from, done, from.length - done, offset + done);
  }
  flush(): void {
    fdatasyncSync(this.fd);
  }
  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}

class MemoryStorage implements Storage {
  readonly sectors: number;
  private readonly bytes: Uint8Array;

  constructor(sizeBytes: number) {
    this.sectors = Math.floor(sizeBytes / SECTOR_SIZE);
    this.bytes = new Uint8Array(this.sectors * SECTOR_SIZE);
  }
  read(into: Uint8Array, offset: number): void {
    into.set(this.bytes.subarray(offset, offset + into.length));
  }
  write(from: Uint8Array, offset: number): void {
    this.bytes.set(from, offset);
  }
  flush(): void {}
  close(): void {}
}

/** Reads zeros, drops writes: a disk for benchmarks. */
class NullStorage implements Storage {
  constructor(readonly sectors: number) {}
  read(into: Uint8Array): void {
    into.fill(0);
  }
  write(): void {}
  flush(): void {}
  close(): void {}
}

function openStorage(spec: VbdSpec): Storage {
  if (spec.type === 'file') return new FileStorage(spec.params, spec.readOnly);
  const size = Number(spec.params);
  if (!Number.isSafeInteger(size) || size < SECTOR_SIZE) throw new XenError('EINVAL', `vbd ${spec.devid}: bad size ${spec.params}`);
  return spec.type === 'memory' ? new MemoryStorage(size) : new NullStorage(Math.floor(size / SECTOR_SIZE));
}

/** A request as copied off the ring: the fields blkback acts on. */
type Request = { operation: number; nrSegments: number; sector: number };

export class Blkback {
  readonly backendPath: string;
  readonly frontendPath: string;
  private readonly log: Log;
  private storage: Storage | null = null;
  private ring: BackRing | null = null;
  private ringHandle = -1;
  private ih: IntrHandle | null = null;
  private readonly abort = new AbortController();
  private readonly req = new Uint8Array(ENTRY_BYTES);
  private readonly reqView = new DataView(this.req.buffer);
  private readonly rsp = new Uint8Array(ENTRY_BYTES);
  private readonly rspView = new DataView(this.rsp.buffer);
  private readonly bounce = new Uint8Array(PAGE_SIZE);
  /** Requests answered with BLKIF_RSP_ERROR because they were malformed. */
  badRequests = 0;
  /** Requests served, by operation, and 512-byte sectors moved. */
  readonly stats = { rd_req: 0, wr_req: 0, f_req: 0, rd_sect: 0, wr_sect: 0 };

  constructor(
    private readonly hypercall: Hypercall,
    private readonly intr: Interrupts,
    private readonly xs: XenStore,
    readonly spec: VbdSpec,
  ) {
    this.backendPath = `/local/domain/0/backend/vbd/${spec.domid}/${spec.devid}`;
    this.frontendPath = `/local/domain/${spec.domid}/device/vbd/${spec.devid}`;
    this.log = logger('blkback', `vbd${spec.domid}.${spec.devid}`);
  }

  // xen_blkbk_probe + backend_changed: open the storage, advertise it, InitWait.
  async start(): Promise<void> {
    const storage = openStorage(this.spec);
    this.storage = storage;
    const b = this.backendPath;
    await this.xs.write(`${b}/sectors`, String(storage.sectors));
    await this.xs.write(`${b}/sector-size`, String(SECTOR_SIZE));
    await this.xs.write(`${b}/info`, String(this.spec.readOnly ? VDISK_READONLY : 0));
    await this.xs.write(`${b}/feature-flush-cache`, '1');
    await this.xs.write(`${b}/state`, String(XenbusStateInitWait));
    this.log('InitWait, %d sectors%s', storage.sectors, this.spec.readOnly ? ', read-only' : '');
    void this.connect().catch((err: Error) => {
      if (!this.abort.signal.aborted) this.log('connect failed: %s', err.message);
    });
  }

  // frontend_changed -> connect_ring: the frontend's ring and port, then Connected.
  private async connect(): Promise<void> {
    const signal = this.abort.signal;
    const f = this.frontendPath;
    await this.xs.awaitState(`${f}/state`, [XenbusStateInitialised, XenbusStateConnected], { signal, timeoutMs: CONNECT_TIMEOUT_MS });
    const ringRef = await this.xs.getNumber(`${f}/ring-ref`, { signal });
    const port = await this.xs.getNumber(`${f}/event-channel`, { signal });
    const protocol = await this.xs.read(`${f}/protocol`, { signal }).catch(() => XEN_IO_PROTO_ABI_X86_64);
    if (protocol !== XEN_IO_PROTO_ABI_X86_64) throw new XenError('EOPNOTSUPP', `protocol ${protocol}`);
    if (signal.aborted) return;
    this.mapRing(ringRef, port);
    await this.xs.write(`${this.backendPath}/state`, String(XenbusStateConnected));
    this.log('Connected: ring-ref %d, port %d', ringRef, port);
  }

  // xen_blkif_map: map the ring page, bind the port, unmask.
  private mapRing(ringRef: number, remotePort: number): void {
    const name = `blkback${this.spec.domid}.${this.spec.devid}`;
    const map = mapGrant(this.hypercall, this.spec.domid, ringRef);
    this.ringHandle = map.handle;
    this.ring = new BackRing([map.page], ENTRY_BYTES, RING_SIZE, name);
    this.ring.init();
    this.ih = bindInterdomain(this.hypercall, this.intr, this.spec.domid, remotePort, () => this.serve(), name);
    this.intr.intrUnmask(this.ih);
  }

  // do_block_io_op: copy each request once, dispatch, answer; then notify.
  private serve(): void {
    const ring = this.ring;
    if (ring === null || this.ih === null) return;
    let notify = false;
    do {
      ring.unconsumedRequests();
      while (ring.takeRequest(this.req)) {
        this.answer(this.dispatch());
        if (ring.pushResponses()) notify = true;
      }
    } while (ring.finalCheckForRequests());
    if (ring.error !== undefined) this.log('ring broken: %s', ring.error.message);
    if (notify) this.intr.intrSignal(this.ih);
  }

  /** make_response: the request's id and operation with `status`. */
  private answer(status: number): void {
    this.rsp.fill(0);
    this.rspView.setBigUint64(RSP_ID, this.reqView.getBigUint64(REQ_ID, true), true);
    this.rsp[RSP_OPERATION] = this.req[REQ_OPERATION]!;
    this.rspView.setInt16(RSP_STATUS, status, true);
    this.ring!.putResponse(this.rsp);
  }

  // dispatch_rw_block_io / dispatch_other_io: validate, then do it.
  private dispatch(): number {
    const r: Request = {
      operation: this.req[REQ_OPERATION]!,
      nrSegments: this.req[REQ_NR_SEGMENTS]!,
      sector: Number(this.reqView.getBigUint64(REQ_SECTOR, true)),
    };
    try {
      if (r.operation === BLKIF_OP_FLUSH_DISKCACHE) {
        this.stats.f_req++;
        this.storage!.flush();
        return BLKIF_RSP_OKAY;
      }
      if (r.operation !== BLKIF_OP_READ && r.operation !== BLKIF_OP_WRITE) return this.bad(`operation ${r.operation}`);
      if (r.operation === BLKIF_OP_WRITE && this.spec.readOnly) return this.bad('write to a read-only disk');
      const why = this.check(r);
      if (why !== null) return this.bad(why);
      return this.rw(r);
    } catch (err) {
      this.log('request failed: %s', (err as Error).message);
      return BLKIF_RSP_ERROR;
    }
  }

  /** Every bound of a READ/WRITE request, or null when it is good. */
  private check(r: Request): string | null {
    if (r.nrSegments === 0 || r.nrSegments > BLKIF_MAX_SEGMENTS_PER_REQUEST) return `nr_segments ${r.nrSegments}`;
    let sectors = 0;
    for (let i = 0; i < r.nrSegments; i++) {
      const at = REQ_SEG + i * blkif_request_segment.size;
      const first = this.req[at + SEG_FIRST]!;
      const last = this.req[at + SEG_LAST]!;
      if (first > last || last >= SECTORS_PER_PAGE) return `segment ${i}: sectors ${first}..${last}`;
      sectors += last - first + 1;
    }
    if (!Number.isSafeInteger(r.sector) || r.sector + sectors > this.storage!.sectors) {
      return `sectors ${r.sector}+${sectors} beyond ${this.storage!.sectors}`;
    }
    return null;
  }

  private bad(why: string): number {
    this.badRequests++;
    this.log('bad request: %s', why);
    return BLKIF_RSP_ERROR;
  }

  /** Each segment: map its grant, move its sectors between page and storage, unmap. */
  private rw(r: Request): number {
    const write = r.operation === BLKIF_OP_WRITE;
    let offset = r.sector * SECTOR_SIZE;
    for (let i = 0; i < r.nrSegments; i++) {
      const at = REQ_SEG + i * blkif_request_segment.size;
      const gref = this.reqView.getUint32(at + SEG_GREF, true);
      const first = this.req[at + SEG_FIRST]!;
      const len = (this.req[at + SEG_LAST]! - first + 1) * SECTOR_SIZE;
      // A WRITE only reads the guest's page: map it read-only, as Linux blkback does.
      let map: GrantMapping<Page | ReadPage>;
      try {
        map = write ? mapGrantReadonly(this.hypercall, this.spec.domid, gref) : mapGrant(this.hypercall, this.spec.domid, gref);
      } catch {
        return this.bad(`segment ${i}: gref ${gref} not mappable`);
      }
      try {
        const buf = this.bounce.subarray(0, len);
        if (write) {
          map.page.read(first * SECTOR_SIZE, buf);
          this.storage!.write(buf, offset);
        } else {
          this.storage!.read(buf, offset);
          writablePage(map.page).write(first * SECTOR_SIZE, buf);
        }
      } finally {
        unmapGrant(this.hypercall, map.handle);
      }
      offset += len;
    }
    if (write) this.stats.wr_req++;
    else this.stats.rd_req++;
    const sectors = offset / SECTOR_SIZE - r.sector;
    if (write) this.stats.wr_sect += sectors;
    else this.stats.rd_sect += sectors;
    return BLKIF_RSP_OKAY;
  }

  // xen_blkbk_remove: Closing, let go of the ring and port and storage, Closed.
  async stop(): Promise<void> {
    this.abort.abort();
    await this.xs.write(`${this.backendPath}/state`, String(XenbusStateClosing)).catch(() => undefined);
    if (this.ih !== null) await this.intr.intrDisestablish(this.ih).catch(() => undefined);
    this.ih = null;
    if (this.ringHandle >= 0) unmapGrant(this.hypercall, this.ringHandle);
    this.ringHandle = -1;
    this.ring = null;
    this.storage?.close();
    this.storage = null;
    await this.xs.write(`${this.backendPath}/state`, String(XenbusStateClosed)).catch(() => undefined);
    this.log('Closed');
  }
}

/** dom0's blkbacks, per domain. */
export class BlkbackSet {
  private readonly byDomid = new Map<number, Blkback[]>();

  constructor(
    private readonly hypercall: Hypercall,
    private readonly intr: Interrupts,
    private readonly xs: XenStore,
  ) {}

  async start(spec: VbdSpec): Promise<void> {
    const b = new Blkback(this.hypercall, this.intr, this.xs, spec);
    await b.start();
    const list = this.byDomid.get(spec.domid) ?? [];
    list.push(b);
    this.byDomid.set(spec.domid, list);
  }

  async stop(domid: number): Promise<void> {
    const list = this.byDomid.get(domid) ?? [];
    this.byDomid.delete(domid);
    for (const b of list) await b.stop();
  }

  /** Stop the blkback of one vbd (its detach). */
  async stopOne(domid: number, devid: number): Promise<void> {
    const list = this.byDomid.get(domid) ?? [];
    const b = list.find((x) => x.spec.devid === devid);
    if (b === undefined) return;
    this.byDomid.set(domid, list.filter((x) => x !== b));
    await b.stop();
  }

  stats(domid: number): VbdStats[] {
    return (this.byDomid.get(domid) ?? []).map((b) => ({ devid: b.spec.devid, counters: { ...b.stats, bad_req: b.badRequests } }));
  }
}
