// What a guest image sees: its domain id and name, the `extra` string of its
// config, a PV console, xenstore, the devices the kernel attached, and
// shutdown. An image is an ES module exporting `main(guest)`; its stdout goes
// to the PV console, and returning from main powers the guest off.

import { formatWithOptions } from 'node:util';
import type { XenStore } from '../xenstore/xenstore.js';
import { shutdown, type XenDevice, type XenSoftc } from '../xen/xen.js';

export type ShutdownReason = 'poweroff' | 'reboot' | 'suspend' | 'crash';

export type GuestImage = { main(guest: Guest): Promise<void> | void };

export class Guest {
  private shutdownHandler: ((reason: ShutdownReason) => void | Promise<void>) | null = null;

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

  /** Write to the PV console. */
  write(text: string | Uint8Array): void {
    this.sc.console.write(text);
  }

  /** console.log to the PV console. */
  print(...values: unknown[]): void {
    this.sc.console.write(formatWithOptions({ colors: false }, ...values) + '\n');
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
