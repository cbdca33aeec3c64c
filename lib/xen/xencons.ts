// The console page (io/console.h xencons_interface): `out` carries the
// guest's output to dom0, `in` carries input back. Both ends use this class;
// each reads only the peer's producer index from the page and keeps its own
// in private, so a peer moving indices wildly cannot make it read or write
// outside the ring: it is marked broken instead.

import { offsetOf, sizeOf } from '../abi/layout.js';
import { xencons_interface as intf } from '../abi/console.js';
import { XenError } from '../errors.js';
import type { Page } from '../hypervisor/page.js';
import { TraceKind, traceBytes, traceDevice, tracing } from '../trace/trace.js';

const IN = offsetOf(intf, 'in');
const OUT = offsetOf(intf, 'out');
const IN_SIZE = sizeOf(intf, 'in');
const OUT_SIZE = sizeOf(intf, 'out');
const IN_CONS = offsetOf(intf, 'in_cons');
const IN_PROD = offsetOf(intf, 'in_prod');
const OUT_CONS = offsetOf(intf, 'out_cons');
const OUT_PROD = offsetOf(intf, 'out_prod');

type Ring = { data: number; size: number; prod: number; cons: number };
const GUEST_TX: Ring = { data: OUT, size: OUT_SIZE, prod: OUT_PROD, cons: OUT_CONS };
const GUEST_RX: Ring = { data: IN, size: IN_SIZE, prod: IN_PROD, cons: IN_CONS };

export class XenCons {
  error: XenError | undefined;
  private readonly tx: Ring;
  private readonly rx: Ring;
  private txProd: number;
  private rxCons: number;
  private readonly one = new Uint8Array(1);
  private readonly traceDev: number;

  /** `side` 'guest' writes `out` and reads `in`; 'backend' the mirror. `traceName` names it in a trace. */
  constructor(
    private readonly page: Page,
    side: 'guest' | 'backend',
    traceName = 'console',
  ) {
    this.traceDev = traceDevice(traceName);
    this.tx = side === 'guest' ? GUEST_TX : GUEST_RX;
    this.rx = side === 'guest' ? GUEST_RX : GUEST_TX;
    this.txProd = page.load32(this.tx.prod);
    this.rxCons = page.load32(this.rx.cons);
  }

  private fail(message: string): void {
    if (this.error === undefined) this.error = new XenError('EPROTO', `console ring: ${message}`);
  }

  /** Put as many bytes as fit; returns how many went (the caller signals the peer). */
  write(bytes: Uint8Array): number {
    if (this.error !== undefined) return 0;
    const cons = this.page.load32(this.tx.cons);
    const used = (this.txProd - cons) >>> 0;
    if (used > this.tx.size) {
      this.fail(`peer consumer index ${cons} is ${used} bytes behind our producer`);
      return 0;
    }
    const n = Math.min(bytes.length, this.tx.size - used);
    let done = 0;
    while (done < n) {
      const at = (this.txProd + done) % this.tx.size;
      const chunk = Math.min(n - done, this.tx.size - at);
      this.page.write(this.tx.data + at, bytes.subarray(done, done + chunk));
      done += chunk;
    }
    if (tracing && n > 0) traceBytes(TraceKind.consoleOut, this.traceDev, this.txProd, 0, bytes, 0, n);
    this.txProd = (this.txProd + n) >>> 0;
    this.page.store32(this.tx.prod, this.txProd);
    return n;
  }

  /** Take what the peer produced, up to `into.length` bytes; returns the count. */
  read(into: Uint8Array): number {
    if (this.error !== undefined) return 0;
    const prod = this.page.load32(this.rx.prod);
    const avail = (prod - this.rxCons) >>> 0;
    if (avail > this.rx.size) {
      this.fail(`peer producer index ${prod} is ${avail} bytes ahead of our consumer`);
      return 0;
    }
    const n = Math.min(avail, into.length);
    let done = 0;
    while (done < n) {
      const at = (this.rxCons + done) % this.rx.size;
      const chunk = Math.min(n - done, this.rx.size - at);
      this.page.read(this.rx.data + at, into.subarray(done, done + chunk));
      done += chunk;
    }
    if (tracing && n > 0) traceBytes(TraceKind.consoleIn, this.traceDev, this.rxCons, 0, into, 0, n);
    this.rxCons = (this.rxCons + n) >>> 0;
    this.page.store32(this.rx.cons, this.rxCons);
    return n;
  }

  /** Bytes our side produced that the peer has not consumed yet. */
  get pendingBytes(): number {
    return (this.txProd - this.page.load32(this.tx.cons)) >>> 0;
  }

  /** A byte at a time, for callers that want it (the console's line discipline). */
  readByte(): number {
    return this.read(this.one) === 1 ? (this.one[0] ?? -1) : -1;
  }
}
