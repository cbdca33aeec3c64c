// What a guest image sees: its domain id and name, the `extra` string of its
// config, a PV console, xenstore, the devices the kernel attached, and
// shutdown. An image is an ES module exporting `main(guest)`; its stdout goes
// to the PV console, and returning from main powers the guest off.

import { formatWithOptions } from 'node:util';
import { XenError } from '../errors.js';
import type { XenStore } from '../xenstore/xenstore.js';
import { shutdown, type XenDevice, type XenSoftc } from '../xen/xen.js';
import { xbfDisks, type XbfErrorMap, type XbfFeatures, type XbfSoftc } from '../drivers/xbf/xbf.js';
import { readPartitionTable, type PartitionTable } from './partition.js';
import { netInterfaces, type NetInterface } from './net.js';
import { vcpusOnline } from '../xen/cpu.js';

/**
 * Why a disk operation failed:
 * - EINVAL: a range outside the disk, or data (or a buffer() size) that is not whole sectors;
 * - EROFS: a write or discard to a read-only disk;
 * - EOPNOTSUPP: the backend offers no (secure) discard, or withdrew a feature;
 * - EIO: the backend refused the request, broke the protocol, or did not come back;
 * - ENXIO: the disk was detached;
 * - EAGAIN: too many transfers queued;
 * - ENOMEM: no room for another buffer().
 */
export type DiskErrorCode = 'EINVAL' | 'EROFS' | 'EOPNOTSUPP' | 'EIO' | 'ENXIO' | 'EAGAIN' | 'ENOMEM';
export type DiskOp = 'read' | 'write' | 'flush' | 'discard' | 'buffer';
const DISK_ERROR_CODES = new Set<string>(['EINVAL', 'EROFS', 'EOPNOTSUPP', 'EIO', 'ENXIO', 'EAGAIN', 'ENOMEM']);

/** A failed disk operation: `code` says why; `op`, `lba` and `count` say what was asked. */
export class DiskError extends XenError {
  declare readonly code: DiskErrorCode;

  constructor(
    code: DiskErrorCode,
    message: string,
    readonly op: DiskOp,
    readonly lba: number,
    readonly count: number,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

function diskError(err: unknown, op: DiskOp, lba: number, count: number): DiskError {
  if (err instanceof DiskError) return err;
  const code = err instanceof XenError && DISK_ERROR_CODES.has(err.code) ? (err.code as DiskErrorCode) : 'EIO';
  const message = (err instanceof Error ? err.message : String(err)).replace(/^[A-Z]+: /, '');
  return new DiskError(code, message, op, lba, count, { cause: err });
}

/**
 * A disk as a guest image sees it (one xbf unit). Sector numbers and counts
 * are in `sectorSize` units. Every failure is a DiskError.
 */
export class Disk {
  // Made once: a transfer's promise rejects with the DiskError itself, with no .catch (and promise) per call.
  private readonly readError: XbfErrorMap = (err, lba, count) => diskError(err, 'read', lba, count);
  private readonly writeError: XbfErrorMap = (err, lba, count) => diskError(err, 'write', lba, count);

  constructor(private readonly xbf: XbfSoftc) {}

  /** device/vbd/<devid> */
  get path(): string {
    return this.xbf.dev.path;
  }
  get sectorSize(): number {
    return this.xbf.sectorSize;
  }
  get physicalSectorSize(): number {
    return this.xbf.physicalSectorSize;
  }
  get sectors(): number {
    return this.xbf.sectors;
  }
  get readOnly(): boolean {
    return this.xbf.readOnly;
  }
  /** VDISK_CDROM: a CD-ROM drive (read-only, removable). */
  get cdrom(): boolean {
    return this.xbf.cdrom;
  }
  /** What xbf and the backend agreed on: queues, ring size, indirect segments, persistent grants, flush, barrier, discard. */
  get features(): Readonly<XbfFeatures> {
    return { ...this.xbf.features };
  }
  /** Times the backend went away and came back while this disk was attached. */
  get reconnects(): number {
    return this.xbf.reconnects;
  }
  read(lba: number, count: number): Promise<Uint8Array> {
    return this.xbf.read(lba, count).catch((err: unknown) => Promise.reject(diskError(err, 'read', lba, count)));
  }
  /**
   * `bytes` (whole sectors) of the guest's own memory, zeroed, to read into
   * and write from: while the backend maps grants persistently, the
   * requests name its pages and xbf copies nothing (a subarray of it is
   * copied as any array is). Its memory is never freed, even when the
   * disk is detached; the disks of a guest hand out at most 4 MiB of it in
   * all. EINVAL, ENOMEM; ENXIO once the disk is detached.
   */
  buffer(bytes: number): Uint8Array {
    try {
      return this.xbf.buffer(bytes);
    } catch (err) {
      throw diskError(err, 'buffer', 0, bytes / this.sectorSize);
    }
  }
  /** Read into `into` (whole sectors) instead of a new array. */
  readInto(lba: number, into: Uint8Array): Promise<void> {
    return this.xbf.readInto(lba, into, this.readError);
  }
  /** With `fua`, the data is on stable storage when the promise resolves. */
  write(lba: number, data: Uint8Array, opts?: { fua?: boolean }): Promise<void> {
    if (opts?.fua === true) {
      return this.xbf.write(lba, data, opts).catch((err: unknown) => Promise.reject(diskError(err, 'write', lba, data.length / this.sectorSize)));
    }
    return this.xbf.write(lba, data, undefined, this.writeError);
  }
  flush(): Promise<void> {
    return this.xbf.flush().catch((err: unknown) => Promise.reject(diskError(err, 'flush', 0, 0)));
  }
  /** The sectors are no longer needed; they read back as zeros. `secure` asks that the old data be unrecoverable. */
  discard(lba: number, count: number, opts: { secure?: boolean } = {}): Promise<void> {
    return this.xbf.discard(lba, count, opts).catch((err: unknown) => Promise.reject(diskError(err, 'discard', lba, count)));
  }
  /** The MBR or GPT partition table (lib/guest/partition.ts). */
  partitions(): Promise<PartitionTable> {
    return readPartitionTable(this);
  }
}

export type ShutdownReason = 'poweroff' | 'reboot' | 'suspend' | 'crash';

export type GuestImage = { main(guest: Guest): Promise<void> | void };

export class Guest {
  private shutdownHandler: ((reason: ShutdownReason) => void | Promise<void>) | null = null;
  private devicesChanged: (() => void) | null = null;
  private suspendHandler: (() => unknown) | null = null;
  private resumeHandler: ((state: unknown) => void) | null = null;
  /** Set by the kernel of a restored domain: what onSuspend's handler returned before the save. */
  resumeState: unknown = undefined;

  constructor(
    private readonly sc: XenSoftc,
    /** The `extra` string of the domain's config (a kernel command line). */
    readonly extra: string,
  ) {}

  get domid(): number {
    return this.sc.domid;
  }

  get name(): string {
    return this.sc.name;
  }

  get xenstore(): XenStore {
    return this.sc.xs;
  }

  /** Devices found under device/, with the driver attached to each (null when none). */
  devices(): XenDevice[] {
    return [...this.sc.devices.values()];
  }

  /** The attached disks (xbf), in devid order: xvda first. */
  disks(): Disk[] {
    return xbfDisks(this.sc).map((x) => new Disk(x));
  }

  /** The attached network interfaces (xnf), in devid order: { name, mac, mtu, send, onFrame, frames, onLink, counters }. */
  nets(): NetInterface[] {
    return netInterfaces(this.sc);
  }

  /** Write to the PV console. */
  write(text: string | Uint8Array): void {
    this.sc.console.write(text);
  }

  /** console.log to the PV console. */
  print(...values: unknown[]): void {
    this.sc.console.write(formatWithOptions({ colors: false }, ...values) + '\n');
  }

  /** Console input (what `xenpv console` clients type), decoded as UTF-8. */
  onInput(handler: (text: string) => void): void {
    const decoder = new TextDecoder('utf-8');
    this.sc.console.onInput((bytes) => handler(decoder.decode(bytes, { stream: true })));
  }

  /** vCPUs online now (`xenpv vcpu-set` changes it). */
  vcpus(): number {
    return vcpusOnline(this.sc);
  }

  /** Called when a device appears or goes away (hotplug). */
  onDevicesChanged(handler: () => void): void {
    this.devicesChanged = handler;
  }

  /** The kernel's side of hotplug. */
  devicesChangedNow(): void {
    this.devicesChanged?.();
  }

  /**
   * Called when the toolstack suspends the guest (`xenpv save`): stop
   * issuing I/O, wait for what is in flight and return the state to carry
   * over (JSON). A restored guest runs main() again with it as
   * `guest.resumeState`.
   */
  onSuspend(handler: () => unknown): void {
    this.suspendHandler = handler;
  }

  /** Called when a suspend was cancelled and the guest runs on in place, with the state onSuspend returned. */
  onResume(handler: (state: unknown) => void): void {
    this.resumeHandler = handler;
  }

  /** The kernel's side of suspend and a cancelled suspend. */
  suspendHooks(): { suspend(): Promise<unknown>; resumed(state: unknown): void } {
    return {
      suspend: async () => (this.suspendHandler === null ? null : await this.suspendHandler()),
      resumed: (state) => this.resumeHandler?.(state),
    };
  }

  /** Called when the toolstack asks for a shutdown; without a handler the guest complies at once. */
  onShutdownRequest(handler: (reason: ShutdownReason) => void | Promise<void>): void {
    this.shutdownHandler = handler;
  }

  /** The kernel's side of a toolstack request. */
  async requested(reason: ShutdownReason): Promise<void> {
    if (this.shutdownHandler !== null) await this.shutdownHandler(reason);
    await this.shutdown(reason);
  }

  /** Stop the domain with SCHEDOP_shutdown; never returns. */
  shutdown(reason: ShutdownReason = 'poweroff'): Promise<never> {
    return shutdown(this.sc, reason);
  }
}
