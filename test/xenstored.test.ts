import fc from 'fast-check';
import t from 'tap';

import {
  XENSTORE_ERROR_PROTO,
  XENSTORE_ERROR_RINGIDX,
  XENSTORE_RING_SIZE,
  XS_CONTROL,
  XS_DIRECTORY,
  XS_DIRECTORY_PART,
  XS_GET_PERMS,
  XS_INTRODUCE,
  XS_IS_DOMAIN_INTRODUCED,
  XS_MKDIR,
  XS_READ,
  XS_RELEASE,
  XS_RESET_WATCHES,
  XS_RESUME,
  XS_RM,
  XS_SET_PERMS,
  XS_SET_TARGET,
  XS_TRANSACTION_END,
  XS_TRANSACTION_START,
  XS_UNWATCH,
  XS_WATCH,
  XS_WATCH_EVENT,
  XS_WRITE,
} from '../lib/abi/xs_wire.js';
import { XenstoredRing, Xenstored } from '../lib/backends/xenstored.js';
import { isValidNodename } from '../lib/backends/xenstored-store.js';
import { encodeMessage, fromBytes, joinStrings, joinWrite, type XsMessage } from '../lib/xenstore/wire.js';
import { ERROR, REQ_CONS, REQ_PROD, attach, direct, errorOf, guestWrite, makeHome, newPage, rawGuest, settle, strings } from './xenstore-harness.js';


t.test('wire basics: acks, replies echo req_id and tx_id, errors are errno names', async (t) => {
  const xsd = new Xenstored();
  const d0 = direct(xsd, 0);
  const w = d0.raw(XS_WRITE, 0, joinWrite('/a/b', 'v'));
  t.same(strings(w), ['OK']);
  t.equal(w.type, XS_WRITE);
  const r = d0.req(XS_READ, 0, '/a/b');
  t.equal(fromBytes(r.payload), 'v', 'READ answers the bare value');
  t.same(strings(d0.req(XS_DIRECTORY, 0, '/a')), ['b']);
  t.same(strings(d0.req(XS_GET_PERMS, 0, '/a/b')), ['n0']);
  t.equal(errorOf(d0.req(XS_READ, 0, '/a/c')), 'ENOENT');
  t.equal(errorOf(d0.raw(XS_READ, 0, new TextEncoder().encode('/a/b'))), 'EINVAL', 'argument without its NUL');
  t.equal(errorOf(d0.raw(XS_READ, 0, joinStrings(['/a/b', 'extra']))), 'EINVAL', 'two arguments to a one-argument op');
  t.equal(errorOf(d0.req(99, 0, '/a')), 'EINVAL', 'unknown type');
  t.equal(errorOf(d0.req(20, 0, '/a')), 'EINVAL', 'the removed XS_RESTRICT');
  t.equal(errorOf(d0.req(XS_WATCH_EVENT, 0, '/a', 't')), 'EINVAL', 'a reply type sent as a request');
  t.equal(errorOf(d0.req(XS_CONTROL, 0, 'print', 'x')), 'ENOSYS');
  t.equal(errorOf(d0.req(XS_READ, 77, '/a/b')), 'ENOENT', 'unknown transaction');
  t.equal(errorOf(d0.req(XS_RM, 0, '/')), 'EINVAL');
  t.equal(errorOf(d0.req(XS_SET_PERMS, 0, '/a')), 'EINVAL', 'no permissions');
  t.equal(errorOf(d0.req(XS_SET_PERMS, 0, '/a', 'q1')), 'EINVAL', 'bad permission letter');
  const e = d0.req(XS_READ, 0, 'x'.repeat(4000));
  t.equal(errorOf(e), 'EINVAL', 'path too long');
  const big = d0.raw(XS_WRITE, 0, joinWrite('/big', 'x'.repeat(4000)));
  t.same(strings(big), ['OK']);
  for (let i = 0; i < 300; i++) d0.raw(XS_WRITE, 0, joinWrite(`/wide/child-with-a-long-name-${i}`, ''));
  t.equal(errorOf(d0.req(XS_DIRECTORY, 0, '/wide')), 'E2BIG', 'a listing over the payload limit');
});

t.test('DIRECTORY_PART pages through a big directory', async (t) => {
  const xsd = new Xenstored();
  const d0 = direct(xsd, 0);
  const names = [...Array(300)].map((_, i) => `child-with-a-long-name-${i}`);
  for (const n of names) d0.raw(XS_WRITE, 0, joinWrite(`/wide/${n}`, ''));
  const got: string[] = [];
  let offset = 0;
  let gen: string | undefined;
  for (let i = 0; i < 10; i++) {
    const rsp = d0.req(XS_DIRECTORY_PART, 0, '/wide', String(offset));
    t.equal(rsp.type, XS_DIRECTORY_PART);
    const parts = fromBytes(rsp.payload).split('\0');
    gen ??= parts[0];
    t.equal(parts[0], gen, 'same generation on every page');
    const done = rsp.payload.length >= 2 && rsp.payload[rsp.payload.length - 2] === 0;
    const page = parts.slice(1).filter((p) => p !== '');
    got.push(...page);
    offset += page.reduce((n, p) => n + p.length + 1, 0);
    if (done) break;
  }
  t.same(got, names);
});

t.test('privileged operations and domain lifecycle', async (t) => {
  const introduced: number[][] = [];
  const released: number[] = [];
  const xsd = new Xenstored({
    introduce: (domid, gfn, evtchn) => introduced.push([domid, gfn, evtchn]),
    release: (domid) => released.push(domid),
  });
  const d0 = direct(xsd, 0);
  const d3 = direct(xsd, 3);
  t.equal(errorOf(d3.req(XS_INTRODUCE, 0, '4', '100', '5')), 'EACCES');
  t.equal(errorOf(d3.req(XS_IS_DOMAIN_INTRODUCED, 0, '3')), 'EACCES');
  t.same(strings(d0.req(XS_WATCH, 0, '@introduceDomain', 'in')), ['OK']);
  t.same(strings(d0.req(XS_WATCH, 0, '@releaseDomain', 'out')), ['OK']);
  d0.events.length = 0;
  t.same(strings(d0.req(XS_IS_DOMAIN_INTRODUCED, 0, '3')), ['F']);
  t.same(strings(d0.req(XS_INTRODUCE, 0, '3', '4660', '7')), ['OK']);
  t.same(introduced, [[3, 4660, 7]]);
  t.same(strings(d0.req(XS_IS_DOMAIN_INTRODUCED, 0, '3')), ['T']);
  t.same(d0.events.map(strings), [['@introduceDomain', 'in']]);
  t.equal(errorOf(d0.req(XS_INTRODUCE, 0, '3', 'x', '7')), 'EINVAL');
  t.same(strings(d0.req(XS_RESUME, 0, '3')), ['OK']);
  t.equal(errorOf(d0.req(XS_RESUME, 0, '9')), 'ENOENT');
  t.same(strings(d0.req(XS_RELEASE, 0, '3')), ['OK']);
  t.same(released, [3]);
  t.ok(d3.conn.closed, "the released domain's connection is gone");
  t.same(d0.events.map(strings)[1], ['@releaseDomain', 'out']);
  t.equal(errorOf(d0.req(XS_RELEASE, 0, '3')), 'ENOENT');
  t.equal(errorOf(d0.req(XS_RELEASE, 0, '0')), 'EINVAL');
  t.equal(errorOf(d0.req(XS_INTRODUCE, 0, '70000', '1', '1')), 'EINVAL', 'domid out of range');
});

t.test('SET_TARGET lets a device model act for its target', async (t) => {
  const xsd = new Xenstored();
  const d0 = direct(xsd, 0);
  const dm = direct(xsd, 8);
  d0.req(XS_INTRODUCE, 0, '7', '1', '1');
  d0.req(XS_INTRODUCE, 0, '8', '1', '1');
  d0.req(XS_MKDIR, 0, '/local/domain/7');
  d0.req(XS_SET_PERMS, 0, '/local/domain/7', 'n7');
  t.equal(errorOf(dm.req(XS_READ, 0, '/local/domain/7')), 'EACCES');
  t.same(strings(d0.req(XS_SET_TARGET, 0, '8', '7')), ['OK']);
  t.equal(dm.req(XS_READ, 0, '/local/domain/7').type, XS_READ);
});

t.test('watches: relative and absolute paths, exact removal events, reset', async (t) => {
  const xsd = new Xenstored();
  const d0 = direct(xsd, 0);
  d0.req(XS_MKDIR, 0, '/local/domain/1');
  d0.req(XS_SET_PERMS, 0, '/local/domain/1', 'n1');
  const d1 = direct(xsd, 1);
  d1.req(XS_WATCH, 0, 'dev', 'rel');
  d0.req(XS_WATCH, 0, '/', 'all');
  t.same(d1.events.map(strings), [['dev', 'rel']], 'fires once when set, after the ack');
  t.same(d0.events.map(strings), [['/', 'all']]);
  d1.events.length = 0;
  d0.events.length = 0;
  d1.raw(XS_WRITE, 0, joinWrite('dev/x/y', '1'));
  t.same(d1.events.map(strings), [['dev/x/y', 'rel']], 'relative watch, relative event path');
  t.same(d0.events.map(strings), [['/local/domain/1/dev/x/y', 'all']], 'dom0 sees everything');
  t.equal(errorOf(d1.req(XS_WATCH, 0, 'dev', 'rel')), 'EEXIST');
  t.same(strings(d1.req(XS_WATCH, 0, 'dev/x/y', 'leaf')), ['OK']);
  d1.events.length = 0;
  d1.req(XS_RM, 0, 'dev');
  t.same(d1.events.map(strings).sort(), [['dev', 'rel'], ['dev/x/y', 'leaf']].sort(), 'descendant watchers hear of the removal');
  t.equal(errorOf(d1.req(XS_UNWATCH, 0, 'dev', 'nope')), 'ENOENT');
  t.same(strings(d1.req(XS_UNWATCH, 0, 'dev', 'rel')), ['OK']);
  t.same(strings(d1.req(XS_RESET_WATCHES, 0)), ['OK']);
  d1.events.length = 0;
  d1.raw(XS_WRITE, 0, joinWrite('dev/x/y', '2'));
  t.same(d1.events, [], 'no watches after RESET_WATCHES');
  t.equal(errorOf(d1.req(XS_WATCH, 0, 'only-path')), 'EINVAL');
  t.equal(errorOf(d1.req(XS_WATCH, 0, 'bad//path', 't')), 'EINVAL');
});

t.test('pending watch events are bounded while the transport is backlogged', async (t) => {
  const xsd = new Xenstored({ limits: { maxPendingEvents: 5 } });
  const d0 = direct(xsd, 0);
  const sent: XsMessage[] = [];
  let room = true;
  const conn = xsd.connect(0, (m) => {
    sent.push(m);
    return room;
  });
  conn.receive({ type: XS_WATCH, req_id: 1, tx_id: 0, payload: joinStrings(['/w', 'tok']) });
  room = false;
  for (let i = 0; i < 20; i++) d0.raw(XS_WRITE, 0, joinWrite(`/w/${i}`, ''));
  const before = sent.length;
  t.ok(before <= 3, 'after backlog, events are held');
  room = true;
  conn.drain();
  t.equal(sent.length - before, 5, 'at most maxPendingEvents were held');
  t.equal(sent.at(-1)?.type, XS_WATCH_EVENT);
});

t.test('transactions: snapshot isolation, commit, conflict, abort', async (t) => {
  const xsd = new Xenstored();
  const a = direct(xsd, 0);
  const b = direct(xsd, 0);
  a.raw(XS_WRITE, 0, joinWrite('/k/x', '1'));
  a.raw(XS_WRITE, 0, joinWrite('/k/y', '1'));
  b.req(XS_WATCH, 0, '/k', 'w');
  b.events.length = 0;

  const tx = Number(strings(a.req(XS_TRANSACTION_START, 0, ''))[0]);
  t.ok(tx > 0);
  t.equal(errorOf(a.req(XS_TRANSACTION_START, tx, '')), 'EBUSY', 'no nesting');
  b.raw(XS_WRITE, 0, joinWrite('/k/y', '2'));
  t.equal(fromBytes(a.req(XS_READ, tx, '/k/y').payload), '1', 'the transaction sees its snapshot');
  a.raw(XS_WRITE, tx, joinWrite('/k/z', 'new'));
  t.equal(errorOf(b.req(XS_READ, 0, '/k/z')), 'ENOENT', 'others do not see uncommitted writes');
  b.events.length = 0;
  t.equal(errorOf(a.req(XS_TRANSACTION_END, tx, 'T')), 'EAGAIN', '/k/y changed after the transaction read it');
  t.equal(errorOf(b.req(XS_READ, 0, '/k/z')), 'ENOENT', 'a failed commit leaves nothing');
  t.same(b.events, [], 'and fires nothing');
  t.equal(errorOf(a.req(XS_TRANSACTION_END, tx, 'T')), 'ENOENT', 'the transaction is gone');

  const tx2 = Number(strings(a.req(XS_TRANSACTION_START, 0, ''))[0]);
  a.req(XS_READ, tx2, '/k/x');
  a.raw(XS_WRITE, tx2, joinWrite('/k/x', '10'));
  a.req(XS_RM, tx2, '/k/y');
  b.raw(XS_WRITE, 0, joinWrite('/other', 'unrelated'));
  b.events.length = 0;
  t.same(strings(a.req(XS_TRANSACTION_END, tx2, 'T')), ['OK'], 'unrelated changes do not conflict');
  t.equal(fromBytes(b.req(XS_READ, 0, '/k/x').payload), '10');
  t.equal(errorOf(b.req(XS_READ, 0, '/k/y')), 'ENOENT');
  t.same(b.events.map(strings), [['/k/x', 'w'], ['/k/y', 'w']], 'watches fire at commit');

  const tx3 = Number(strings(a.req(XS_TRANSACTION_START, 0, ''))[0]);
  a.raw(XS_WRITE, tx3, joinWrite('/k/x', 'discard'));
  t.equal(errorOf(a.req(XS_TRANSACTION_END, tx3, 'X')), 'EINVAL');
  t.same(strings(a.req(XS_TRANSACTION_END, tx3, 'F')), ['OK']);
  t.equal(fromBytes(b.req(XS_READ, 0, '/k/x').payload), '10', 'abort discards');

  const tx4 = Number(strings(a.req(XS_TRANSACTION_START, 0, ''))[0]);
  t.same(a.req(XS_DIRECTORY, tx4, '/k').type, XS_DIRECTORY);
  b.raw(XS_WRITE, 0, joinWrite('/k/phantom', ''));
  a.raw(XS_WRITE, tx4, joinWrite('/k/count', '1'));
  t.equal(errorOf(a.req(XS_TRANSACTION_END, tx4, 'T')), 'EAGAIN', 'a new child conflicts with a listing');
});

t.test('transaction limits and RESET_WATCHES ends them', async (t) => {
  const xsd = new Xenstored({ limits: { maxTransactions: 2 } });
  const a = direct(xsd, 1);
  const t1 = Number(strings(a.req(XS_TRANSACTION_START, 0, ''))[0]);
  a.req(XS_TRANSACTION_START, 0, '');
  t.equal(errorOf(a.req(XS_TRANSACTION_START, 0, '')), 'ENOSPC');
  a.req(XS_RESET_WATCHES, 0);
  t.equal(errorOf(a.req(XS_READ, t1, 'x')), 'ENOENT');
  t.equal(a.req(XS_TRANSACTION_START, 0, '').type, XS_TRANSACTION_START);
});

const TX_KEYS = ['/t/a', '/t/b', '/t/c/d'];
type Step = { conn: number; action: string; key: number; value: number };
type Open = { id: number; snap: Map<string, string>; reads: Map<string, string | undefined>; writes: Map<string, string | undefined> };

/**
 * Run a schedule of steps from three connections against xenstored and a
 * model (a map of key to value). Every read must see the transaction's
 * snapshot plus its own writes; a committed transaction must have read what
 * the store still held at commit, and then its writes land; EAGAIN leaves
 * nothing. The store must end equal to the model.
 */
function runSchedule(steps: readonly Step[]): boolean {
  const xsd = new Xenstored();
  const conns = [direct(xsd, 0), direct(xsd, 0), direct(xsd, 0)];
  const model = new Map<string, string>();
  const open: (Open | undefined)[] = [undefined, undefined, undefined];
  const view = (tx: Open | undefined, key: string): string | undefined =>
    tx === undefined ? model.get(key) : tx.writes.has(key) ? tx.writes.get(key) : tx.snap.get(key);
  for (const s of steps) {
    const c = conns[s.conn];
    const key = TX_KEYS[s.key] ?? '/t/a';
    if (c === undefined) return false;
    const tx = open[s.conn];
    const txId = tx?.id ?? 0;
    if (s.action === 'begin' && tx === undefined) {
      const id = Number(strings(c.req(XS_TRANSACTION_START, 0, ''))[0]);
      open[s.conn] = { id, snap: new Map(model), reads: new Map(), writes: new Map() };
    } else if ((s.action === 'commit' || s.action === 'abort') && tx !== undefined) {
      open[s.conn] = undefined;
      const rsp = c.req(XS_TRANSACTION_END, tx.id, s.action === 'commit' ? 'T' : 'F');
      if (s.action === 'abort' || errorOf(rsp) === 'EAGAIN') continue;
      if (errorOf(rsp) !== undefined) return false;
      for (const [k, v] of tx.reads) if (model.get(k) !== v) return false;
      for (const [k, v] of tx.writes) v === undefined ? model.delete(k) : model.set(k, v);
    } else if (s.action === 'read') {
      const rsp = c.req(XS_READ, txId, key);
      const got = rsp.type === XS_READ ? fromBytes(rsp.payload) : undefined;
      if (got !== view(tx, key)) return false;
      if (tx !== undefined && !tx.writes.has(key) && !tx.reads.has(key)) tx.reads.set(key, got);
    } else if (s.action === 'write' || s.action === 'rm') {
      const value = s.action === 'write' ? String(s.value) : undefined;
      const rsp = value === undefined ? c.req(XS_RM, txId, key) : c.raw(XS_WRITE, txId, joinWrite(key, value));
      // Removing /t/c/d where /t/c never existed: ENOENT, and nothing changes.
      if (value === undefined && errorOf(rsp) === 'ENOENT' && view(tx, key) === undefined) continue;
      if (errorOf(rsp) !== undefined) return false;
      if (tx === undefined) value === undefined ? model.delete(key) : model.set(key, value);
      else tx.writes.set(key, value);
    }
  }
  return TX_KEYS.every((k) => {
    const rsp = conns[0]?.req(XS_READ, 0, k);
    return (rsp?.type === XS_READ ? fromBytes(rsp.payload) : undefined) === model.get(k);
  });
}

t.test('property: transactions see their snapshot and commit serializably', async (t) => {
  const step = fc.record({
    conn: fc.integer({ min: 0, max: 2 }),
    action: fc.constantFrom('begin', 'begin', 'commit', 'commit', 'abort', 'read', 'read', 'read', 'write', 'write', 'rm'),
    key: fc.integer({ min: 0, max: TX_KEYS.length - 1 }),
    value: fc.integer({ min: 0, max: 9 }),
  });
  fc.assert(fc.property(fc.array(step, { minLength: 20, maxLength: 80 }), runSchedule), { numRuns: 300 });
  t.pass();
});

t.test('hostile guest: bogus len breaks only its own connection', async (t) => {
  const xsd = new Xenstored();
  const dom0 = attach(xsd, 0);
  await makeHome(dom0.xs, 1);
  const bad = rawGuest(xsd, 3);
  const good = attach(xsd, 1);
  bad.ring.send({ type: XS_WATCH, req_id: 1, tx_id: 0, payload: joinStrings(['/', 'spy']) });
  t.equal(bad.got.length, 2, 'ack and initial event');
  const hdr = encodeMessage({ type: XS_READ, req_id: 2, tx_id: 0, payload: new Uint8Array(0) });
  new DataView(hdr.buffer).setUint32(12, 1 << 20, true);
  guestWrite(bad.page, hdr);
  bad.server.intr();
  t.equal(bad.server.error?.code, 'E2BIG');
  t.equal(bad.page.load32(ERROR), XENSTORE_ERROR_PROTO, 'told the guest why');
  t.ok(bad.server.conn.closed, 'its watches and transactions are gone');
  await good.xs.write('still', 'works');
  t.equal(await good.xs.read('still'), 'works', 'others keep being served');
  await settle();
  t.equal(bad.got.length, 2, 'the broken connection hears nothing more');
  bad.ring.intr();
  t.equal(bad.ring.error?.code, 'EIO', 'a guest that reads the error field stops too');
});

t.test('hostile guest: producer index past the ring', async (t) => {
  const xsd = new Xenstored();
  const bad = rawGuest(xsd, 4);
  const good = attach(xsd, 0);
  bad.page.store32(REQ_PROD, 0x80000000);
  bad.server.intr();
  t.equal(bad.server.error?.code, 'EPROTO');
  t.equal(bad.page.load32(ERROR), XENSTORE_ERROR_RINGIDX);
  t.equal(bad.page.load32(REQ_CONS), 0, 'nothing consumed');
  await good.xs.write('/ok', '1');
  t.equal(await good.xs.read('/ok'), '1');
});

t.test('hostile guest that never reads its answers is throttled', async (t) => {
  const xsd = new Xenstored();
  const good = attach(xsd, 0);
  await good.xs.write('/big', 'x'.repeat(3000));
  // No guest code at all on this page: nothing ever consumes rsp.
  const bad = { page: newPage(), server: undefined as unknown as XenstoredRing };
  bad.server = new XenstoredRing(xsd, 0, bad.page, () => undefined);
  const req = encodeMessage({ type: XS_READ, req_id: 1, tx_id: 0, payload: joinStrings(['/big']) });
  let written = 0;
  for (let round = 0; round < 20; round++) {
    while (bad.page.load32(REQ_PROD) - bad.page.load32(REQ_CONS) + req.length <= XENSTORE_RING_SIZE) {
      guestWrite(bad.page, req);
      written++;
    }
    bad.server.intr();
  }
  const consumed = bad.page.load32(REQ_CONS) / req.length;
  t.ok(consumed < written, `stopped taking requests (${consumed} of ${written})`);
  t.ok(consumed <= 4, 'after a couple of answers piled up');
  t.equal(bad.server.error, undefined, 'not a protocol error, just back-pressure');
  t.equal(await good.xs.read('/big'), 'x'.repeat(3000), 'others keep being served');
});

t.test('property: node names are checked as C xenstored is_valid_nodename checks them', async (t) => {
  // The rule written out with regular expressions, as the C source reads; the store checks it in one pass.
  const reference = (path: string): boolean => {
    if (!path.startsWith('/') || (path.endsWith('/') && path !== '/') || path.includes('//')) return false;
    const localOff = /^\/local\/domain\/\d{1,5}\//.exec(path)?.[0].length ?? 0;
    if (path.length > localOff + 2048 || path.length > 3072) return false;
    return /^[A-Za-z0-9\-/_@]*$/.test(path);
  };
  const segment = fc.string({ unit: fc.constantFrom('a', 'Z', '0', '-', '_', '@', '/', '.', ' ', 'é', '\0'), maxLength: 12 });
  const long = fc.integer({ min: 2030, max: 3100 }).map((n) => `/local/domain/7/${'x'.repeat(n)}`);
  const longOutside = fc.integer({ min: 2030, max: 3100 }).map((n) => `/tool/${'y'.repeat(n)}`);
  fc.assert(
    fc.property(fc.oneof(segment.map((s) => `/${s}`), segment, long, longOutside, fc.constant('/')), (path) => {
      t.equal(isValidNodename(path), reference(path), JSON.stringify(path.slice(0, 40)));
    }),
  );
});
