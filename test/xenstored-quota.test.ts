// xenstored's per-domain quotas, each with C xenstored's answer: nodes per
// domain, node size and ACL length (ENOSPC), watches (E2BIG), transactions
// (ENOSPC), outstanding requests (back-pressure, no error); dom0 exempt.

import t from 'tap';
import {
  XENSTORE_RING_SIZE,
  XS_MKDIR,
  XS_READ,
  XS_RM,
  XS_SET_PERMS,
  XS_TRANSACTION_END,
  XS_TRANSACTION_START,
  XS_WATCH,
  XS_WRITE,
} from '../lib/abi/xs_wire.js';
import { DEFAULT_LIMITS, Xenstored, XenstoredRing, type XenstoredLimits } from '../lib/backends/xenstored.js';
import { encodeMessage, joinStrings, joinWrite, splitStrings } from '../lib/xenstore/wire.js';
import { REQ, REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD, direct, errorOf, newPage } from './xenstore-harness.js';

/** xenstored with dom0 and domain 1, whose home 1 owns (one node already). */
function setup(limits: Partial<XenstoredLimits> = {}): { d0: ReturnType<typeof direct>; g: ReturnType<typeof direct>; xsd: Xenstored } {
  const xsd = new Xenstored({ limits });
  const d0 = direct(xsd, 0);
  d0.req(XS_MKDIR, 0, '/local/domain/1');
  d0.req(XS_SET_PERMS, 0, '/local/domain/1', 'n1');
  return { d0, g: direct(xsd, 1), xsd };
}

t.test('defaults are C xenstored 4.17 quotas', async (t) => {
  t.match(DEFAULT_LIMITS, { maxNodes: 1000, maxNodeSizeBytes: 2048, maxPermsPerNode: 5, maxWatches: 128, maxTransactions: 10, maxOutstanding: 20 });
});

t.test('nodes per domain: ENOSPC, implicit parents count, rm gives them back, dom0 is exempt', async (t) => {
  const { d0, g } = setup({ maxNodes: 5 });
  for (const k of ['a', 'b', 'c']) t.equal(g.raw(XS_WRITE, 0, joinWrite(k, '1')).type, XS_WRITE);
  t.equal(errorOf(g.raw(XS_WRITE, 0, joinWrite('x/y', '1'))), 'ENOSPC', 'two nodes would make six');
  t.equal(g.raw(XS_WRITE, 0, joinWrite('d', '1')).type, XS_WRITE, 'the fifth fits');
  t.equal(errorOf(g.req(XS_MKDIR, 0, 'e')), 'ENOSPC');
  t.equal(g.raw(XS_WRITE, 0, joinWrite('a', 'rewrite')).type, XS_WRITE, 'rewriting an existing node is not a new node');
  g.req(XS_RM, 0, 'a');
  t.equal(g.req(XS_MKDIR, 0, 'e').type, XS_MKDIR, 'rm gave one back');
  const tx = Number(splitStrings(g.req(XS_TRANSACTION_START, 0, '').payload)[0]);
  t.equal(errorOf(g.req(XS_MKDIR, tx, 'f')), 'ENOSPC', 'inside a transaction too');
  g.req(XS_TRANSACTION_END, tx, 'F');
  for (let i = 0; i < 20; i++) t.equal(d0.raw(XS_WRITE, 0, joinWrite(`/tool/n${i}`, '1')).type, XS_WRITE);
  t.equal(d0.raw(XS_WRITE, 0, joinWrite('/local/domain/1/by-dom0', '1')).type, XS_WRITE, 'dom0 writes in a full home');
});

t.test('nodes per domain: a committed transaction counts, an aborted one does not; an owner change moves the count', async (t) => {
  const { d0, g } = setup({ maxNodes: 3 });
  const tx = Number(splitStrings(g.req(XS_TRANSACTION_START, 0, '').payload)[0]);
  g.req(XS_MKDIR, tx, 'a');
  g.req(XS_TRANSACTION_END, tx, 'F');
  const tx2 = Number(splitStrings(g.req(XS_TRANSACTION_START, 0, '').payload)[0]);
  g.req(XS_MKDIR, tx2, 'b');
  t.equal(g.req(XS_TRANSACTION_END, tx2, 'T').type, XS_TRANSACTION_END);
  g.req(XS_MKDIR, 0, 'c');
  t.equal(errorOf(g.req(XS_MKDIR, 0, 'd')), 'ENOSPC', 'home, b and c');
  d0.req(XS_SET_PERMS, 0, '/local/domain/1/c', 'n0', 'w1');
  t.equal(g.req(XS_MKDIR, 0, 'd').type, XS_MKDIR, 'c now belongs to dom0');
});

t.test('node size: ENOSPC at 2048 bytes of record, children count too; dom0 exempt', async (t) => {
  const { d0, g } = setup();
  const big = 'x'.repeat(2048 - 24 - 8); // header and one permission make exactly 2048
  t.equal(errorOf(g.raw(XS_WRITE, 0, joinWrite('v', big))), 'ENOSPC');
  t.equal(g.raw(XS_WRITE, 0, joinWrite('v', big.slice(1))).type, XS_WRITE, 'one byte less fits');
  t.equal(errorOf(g.raw(XS_WRITE, 0, joinWrite('v/child', ''))), 'ENOSPC', 'a new child name grows the parent over');
  t.equal(d0.raw(XS_WRITE, 0, joinWrite('/local/domain/1/v', 'y'.repeat(4000))).type, XS_WRITE);
});

t.test('permissions per node: ENOSPC beyond five besides the owner; dom0 exempt', async (t) => {
  const { d0, g } = setup();
  g.req(XS_MKDIR, 0, 'p');
  const acl = ['n1', 'r2', 'r3', 'r4', 'r5', 'r6'];
  t.equal(g.req(XS_SET_PERMS, 0, 'p', ...acl).type, XS_SET_PERMS);
  t.equal(errorOf(g.req(XS_SET_PERMS, 0, 'p', ...acl, 'r7')), 'ENOSPC');
  t.equal(d0.req(XS_SET_PERMS, 0, '/local/domain/1/p', ...acl, 'r7', 'r8').type, XS_SET_PERMS);
});

t.test('watches: E2BIG beyond the quota; dom0 exempt', async (t) => {
  const { d0, g } = setup({ maxWatches: 3 });
  for (let i = 0; i < 3; i++) t.equal(g.req(XS_WATCH, 0, `w${i}`, 't').type, XS_WATCH);
  t.equal(errorOf(g.req(XS_WATCH, 0, 'w3', 't')), 'E2BIG');
  for (let i = 0; i < 10; i++) t.equal(d0.req(XS_WATCH, 0, `/w${i}`, 't').type, XS_WATCH);
});

t.test('transactions: ENOSPC beyond the quota; dom0 exempt', async (t) => {
  const { d0, g } = setup({ maxTransactions: 2 });
  g.req(XS_TRANSACTION_START, 0, '');
  g.req(XS_TRANSACTION_START, 0, '');
  t.equal(errorOf(g.req(XS_TRANSACTION_START, 0, '')), 'ENOSPC');
  for (let i = 0; i < 5; i++) t.equal(d0.req(XS_TRANSACTION_START, 0, '').type, XS_TRANSACTION_START);
});

/** Put `n` READ requests on a fresh page's req ring; xenstored serves it as `domid`. */
function flood(xsd: Xenstored, domid: number, n: number): { consumed: () => number; readReplies: () => void; server: XenstoredRing } {
  const page = newPage();
  let prod = 0;
  const req = encodeMessage({ type: XS_READ, req_id: 1, tx_id: 0, payload: joinStrings(['/v']) });
  for (let i = 0; i < n; i++) for (const b of req) page.store8(REQ + (prod++ % XENSTORE_RING_SIZE), b);
  page.store32(REQ_PROD, prod);
  const server = new XenstoredRing(xsd, domid, page, () => undefined);
  return {
    consumed: () => page.load32(REQ_CONS) / req.length,
    readReplies: () => page.store32(RSP_CONS, page.load32(RSP_PROD)),
    server,
  };
}

t.test('outstanding requests: xenstored stops reading a domain that leaves its replies unread; dom0 exempt', async (t) => {
  const xsd = new Xenstored({ limits: { maxOutstanding: 3 } });
  const d0 = direct(xsd, 0);
  d0.raw(XS_WRITE, 0, joinWrite('/v', 'v'.repeat(200)));
  d0.req(XS_SET_PERMS, 0, '/v', 'r0');
  const n = Math.floor(XENSTORE_RING_SIZE / 19); // requests of 19 bytes, replies of 216
  const guest = flood(xsd, 1, n);
  guest.server.intr();
  const first = guest.consumed();
  t.ok(first < n, `stopped after ${first} of ${n}`);
  t.ok(first <= Math.floor(XENSTORE_RING_SIZE / 216) + 3, 'a full reply ring plus the quota');
  guest.readReplies();
  guest.server.intr();
  t.ok(guest.consumed() > first, 'reading replies lets it go on');
  const dom0 = flood(xsd, 0, n);
  dom0.server.intr();
  // dom0 is held only by the byte high-water mark, far above three replies.
  t.ok(dom0.consumed() > Math.floor(XENSTORE_RING_SIZE / 216) + 4, `dom0 took ${dom0.consumed()}`);
});
