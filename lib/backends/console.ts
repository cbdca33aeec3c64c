// dom0's console backend (xenconsoled): for each guest, map the console page
// the builder granted (GNTTAB_RESERVED_CONSOLE), bind the console event
// channel, and collect what the guest writes. The collected text is bounded:
// past the limit the oldest output goes, so a chatty guest cannot grow dom0.
// Input goes the other way through the page's `in` ring. A sink (the
// concentrator: log file, sockets) gets the output bytes and gives input.

import { __HYPERVISOR_event_channel_op, __HYPERVISOR_grant_table_op } from '../abi/xen.js';
import { EVTCHNOP_bind_interdomain } from '../abi/event_channel.js';
import { GNTMAP_host_map, GNTTABOP_map_grant_ref, GNTTABOP_unmap_grant_ref, GNTTAB_RESERVED_CONSOLE, GNTST_okay } from '../abi/grant_table.js';
import { XenError } from '../errors.js';
import { errnoName } from '../hypervisor/errno.js';
import type { Interrupts, IntrHandle } from '../evtchn/evtchn.js';
import type { Hypercall, gnttab_map_grant_ref } from '../hypervisor/hypercall.js';
import { XenCons } from '../xen/xencons.js';
import { writablePage } from '../hypervisor/page.js';
import { logger, type Log } from '../log.js';

const MAX_KEPT_CHARS = 1 << 20;
const CHUNK = 2048;
/** Input waiting for room in the guest's `in` ring; beyond it input is dropped, as a serial line drops it. */
const MAX_INPUT_QUEUED = 64 * 1024;

export type ConsoleOutput = (domid: number, text: string) => void;

/** Where consoles go besides the toolstack: the concentrator. */
export type ConsoleSink = {
  /** A guest's console exists; `input` puts bytes into it. */
  open(domid: number, name: string, tcpPort: number | undefined, input: (bytes: Uint8Array) => void): Promise<void>;
  output(domid: number, bytes: Uint8Array): void;
  close(domid: number): Promise<void>;
};

class GuestConsole {
  text = '';
  outBytes = 0;
  inBytes = 0;
  inDropped = 0;
  /** Input not yet in the ring. */
  input: Uint8Array[] = [];
  inputQueued = 0;
  private readonly decoder = new TextDecoder('utf-8');
  private readonly buf = new Uint8Array(CHUNK);

  constructor(
    readonly domid: number,
    readonly ring: XenCons,
    readonly handle: number,
    public intr: IntrHandle | null,
    private readonly log: Log,
  ) {}

  /** Take everything the guest produced; returns the new text. */
  drain(sink: ConsoleSink | null): string {
    let out = '';
    for (let n = this.ring.read(this.buf); n > 0; n = this.ring.read(this.buf)) {
      this.outBytes += n;
      sink?.output(this.domid, Buffer.from(this.buf.subarray(0, n)));
      out += this.decoder.decode(this.buf.subarray(0, n), { stream: true });
    }
    if (this.ring.error !== undefined) this.log('console ring broken: %s', this.ring.error.message);
    this.text += out;
    if (this.text.length > MAX_KEPT_CHARS) this.text = this.text.slice(this.text.length - MAX_KEPT_CHARS);
    return out;
  }
}

export class ConsoleBackend {
  private readonly consoles = new Map<number, GuestConsole>();

  constructor(
    private readonly hypercall: Hypercall,
    private readonly intr: Interrupts,
    private readonly onOutput: ConsoleOutput,
    private readonly sink: ConsoleSink | null = null,
  ) {}

  /** Map the guest's console page, bind its port, open it in the sink (`name`, `tcpPort`). */
  async attach(domid: number, remotePort: number, opts: { name?: string; tcpPort?: number | undefined } = {}): Promise<void> {
    const log = logger('console', `dom${domid}`);
    const map: gnttab_map_grant_ref = {
      host_addr: 0n, flags: GNTMAP_host_map, ref: GNTTAB_RESERVED_CONSOLE, dom: domid,
      status: 0, handle: -1, dev_bus_addr: 0n, page: null,
    };
    this.hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_map_grant_ref, map);
    if (map.status !== GNTST_okay || map.page === null) throw new XenError('EACCES', `console page of domain ${domid}: GNTST ${map.status}`);
    const gc = new GuestConsole(domid, new XenCons(writablePage(map.page), 'backend', `console-dom${domid}`), map.handle, null, log);
    const bind = { remote_dom: domid, remote_port: remotePort, local_port: 0 };
    const rc = this.hypercall(__HYPERVISOR_event_channel_op, EVTCHNOP_bind_interdomain, bind);
    if (rc !== 0) {
      this.unmap(gc);
      throw new XenError(errnoName(-rc), `console port ${remotePort} of domain ${domid}`);
    }
    gc.intr = this.intr.adopt(bind.local_port, () => this.output(gc), `console-dom${domid}`);
    this.consoles.set(domid, gc);
    this.intr.intrUnmask(gc.intr);
    log('attached, port %d', bind.local_port);
    if (this.sink === null) return;
    try {
      await this.sink.open(domid, opts.name ?? `dom${domid}`, opts.tcpPort, (bytes) => this.write(domid, bytes));
    } catch (err) {
      await this.detach(domid);
      throw err;
    }
  }

  /** Input for the guest: into its `in` ring as room allows, the rest queued (bounded). */
  write(domid: number, bytes: Uint8Array): void {
    const gc = this.consoles.get(domid);
    if (gc === undefined) return;
    if (gc.inputQueued + bytes.length > MAX_INPUT_QUEUED) {
      gc.inDropped += bytes.length;
      return;
    }
    gc.input.push(bytes);
    gc.inputQueued += bytes.length;
    this.pushInput(gc);
  }

  private pushInput(gc: GuestConsole): void {
    let moved = 0;
    while (gc.input.length > 0) {
      const head = gc.input[0]!;
      const n = gc.ring.write(head);
      moved += n;
      if (n < head.length) {
        gc.input[0] = head.subarray(n);
        break;
      }
      gc.input.shift();
    }
    gc.inputQueued -= moved;
    gc.inBytes += moved;
    if (moved > 0 && gc.intr !== null) this.intr.intrSignal(gc.intr);
  }

  /** Bytes each way: for `top`. */
  stats(domid: number): Record<string, number> | null {
    const gc = this.consoles.get(domid);
    if (gc === undefined) return null;
    return { out_bytes: gc.outBytes, in_bytes: gc.inBytes, in_dropped: gc.inDropped };
  }

  private output(gc: GuestConsole): void {
    this.pushInput(gc);
    const text = gc.drain(this.sink);
    // The guest may have output queued behind a full ring: tell it there is room.
    if (gc.intr !== null) this.intr.intrSignal(gc.intr);
    if (text.length > 0) this.onOutput(gc.domid, text);
  }

  /** Everything a guest wrote so far (the last MiB of it). */
  text(domid: number): string {
    const gc = this.consoles.get(domid);
    if (gc === undefined) return '';
    this.output(gc);
    return gc.text;
  }

  private unmap(gc: GuestConsole): void {
    const op = { host_addr: 0n, dev_bus_addr: 0n, handle: gc.handle, status: 0 };
    this.hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_unmap_grant_ref, op);
  }

  /** Drain a last time, then let go of the page and the port. */
  async detach(domid: number): Promise<string> {
    const gc = this.consoles.get(domid);
    if (gc === undefined) return '';
    this.output(gc);
    this.consoles.delete(domid);
    if (gc.intr !== null) await this.intr.intrDisestablish(gc.intr).catch(() => undefined);
    this.unmap(gc);
    await this.sink?.close(domid).catch((err: Error) => logger('console', `dom${domid}`)('sink: %s', err.message));
    return gc.text;
  }
}
