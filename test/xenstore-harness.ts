// Shared by the xenstore tests: real clients and a real xenstored talking over
// real xenstore pages in SharedArrayBuffers. Events are delivered on a later
// macrotask, as an event channel upcall would be.

import { offsetOf } from '../lib/abi/layout.js';
import { XENSTORE_RING_SIZE, XS_ERROR, xenstore_domain_interface as intf } from '../lib/abi/xs_wire.js';
import { XenstoredRing, Xenstored, type XsConnection } from '../lib/backends/xenstored.js';
import { FramePage, MemoryViews, type Page } from '../lib/hypervisor/page.js';
import { XsRing } from '../lib/xenstore/ring.js';
import { joinStrings, splitStrings, type XsMessage } from '../lib/xenstore/wire.js';
import { XenStore } from '../lib/xenstore/xenstore.js';

// Offsets in struct xenstore_domain_interface, for tests that poke the page.
export const REQ = offsetOf(intf, 'req');
export const REQ_PROD = offsetOf(intf, 'req_prod');
export const REQ_CONS = offsetOf(intf, 'req_cons');
export const RSP_PROD = offsetOf(intf, 'rsp_prod');
export const RSP_CONS = offsetOf(intf, 'rsp_cons');
export const ERROR = offsetOf(intf, 'error');
export const FEATURES = offsetOf(intf, 'server_features');

/** A zeroed xenstore page; `startIdx` puts all four ring indices there (to test wrap). */
export function newPage(startIdx = 0): Page {
  const page = new FramePage(new MemoryViews(new SharedArrayBuffer(4096)), 0, true);
  if (startIdx !== 0) for (const off of [REQ_PROD, REQ_CONS, RSP_PROD, RSP_CONS]) page.store32(off, startIdx >>> 0);
  return page;
}

/** A hostile guest puts raw bytes on its req ring. */
export function guestWrite(page: Page, bytes: Uint8Array): void {
  let prod = page.load32(REQ_PROD);
  for (const b of bytes) {
    page.store8(REQ + (prod % XENSTORE_RING_SIZE), b);
    prod = (prod + 1) >>> 0;
  }
  page.store32(REQ_PROD, prod);
}

/** A reply's payload as its NUL-separated strings. */
export function strings(m: XsMessage): string[] {
  return splitStrings(m.payload);
}

/** The errno name of an XS_ERROR reply, undefined for any other reply. */
export function errorOf(m: XsMessage): string | undefined {
  return m.type === XS_ERROR ? strings(m)[0] : undefined;
}

export type Dom = { domid: number; xs: XenStore; server: XenstoredRing; page: Page };

/** A domain's client attached to xenstored through its own ring page. */
export function attach(xsd: Xenstored, domid: number, opts: { maxOutstanding?: number; timeoutMs?: number } = {}): Dom {
  const page = newPage();
  let server: XenstoredRing | undefined;
  const xs = new XenStore({
    page,
    notify: () => setImmediate(() => server?.intr()),
    name: `dom${domid}`,
    timeoutMs: opts.timeoutMs ?? 5000,
    maxOutstanding: opts.maxOutstanding,
  });
  server = new XenstoredRing(xsd, domid, page, () => setImmediate(() => xs.intr()));
  return { domid, xs, server, page };
}

/** What the toolstack does for a new domain: its home, owned by it. */
export async function makeHome(dom0: XenStore, domid: number): Promise<void> {
  const home = `/local/domain/${domid}`;
  await dom0.mkdir(home);
  await dom0.setPerms(home, [{ domid, perm: 'n' }]);
}

/** A raw guest end that can send any message at all, for protocol tests. */
export function rawGuest(xsd: Xenstored, domid: number): { ring: XsRing; got: XsMessage[]; server: XenstoredRing; page: Page } {
  const page = newPage();
  const got: XsMessage[] = [];
  let server: XenstoredRing | undefined;
  const ring = new XsRing({ page, side: 'front', notify: () => server?.intr(), deliver: (m) => got.push(m) });
  server = new XenstoredRing(xsd, domid, page, () => ring.intr());
  return { ring, got, server, page };
}

/** A synchronous client straight on a connection: send a request, get the reply. */
export function direct(xsd: Xenstored, domid: number): {
  conn: XsConnection;
  events: XsMessage[];
  req: (type: number, tx: number, ...args: string[]) => XsMessage;
  raw: (type: number, tx: number, payload: Uint8Array) => XsMessage;
} {
  const events: XsMessage[] = [];
  let reply: XsMessage | undefined;
  const conn = xsd.connect(domid, (m) => {
    if (m.req_id === 0 && m.type === 15) events.push(m);
    else reply = m;
    return true;
  });
  let nextId = 1;
  const raw = (type: number, tx: number, payload: Uint8Array): XsMessage => {
    reply = undefined;
    conn.receive({ type, req_id: nextId++, tx_id: tx, payload });
    if (reply === undefined) throw new Error('no reply');
    return reply;
  };
  const req = (type: number, tx: number, ...args: string[]): XsMessage => raw(type, tx, joinStrings(args));
  return { conn, events, req, raw };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Let queued event deliveries run. */
export async function settle(rounds = 20): Promise<void> {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}
