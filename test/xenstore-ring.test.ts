import fc from 'fast-check';
import t from 'tap';

import {
  XENSTORE_ERROR_PROTO,
  XENSTORE_ERROR_RINGIDX,
  XENSTORE_PAYLOAD_MAX,
  XENSTORE_RING_SIZE,
  XENSTORE_SERVER_FEATURE_ERROR,
  XS_READ,
  XS_WRITE,
} from '../lib/abi/xs_wire.js';
import type { XenError } from '../lib/errors.js';
import type { Page } from '../lib/hypervisor/page.js';
import { XsRing } from '../lib/xenstore/ring.js';
import { encodeMessage, type XsMessage } from '../lib/xenstore/wire.js';
import { ERROR, FEATURES, REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD, guestWrite, newPage } from './xenstore-harness.js';

type Pair = { front: XsRing; back: XsRing; toBack: XsMessage[]; toFront: XsMessage[]; settle: () => Promise<void> };

/** Both ends on one page; each notify runs the other end's intr() on a later microtask, as an event would. */
function pair(page: Page, backOpts: { highWaterBytes?: number; drained?: () => void } = {}): Pair {
  const toBack: XsMessage[] = [];
  const toFront: XsMessage[] = [];
  let inFlight = 0;
  const later = (f: () => void) => () => {
    inFlight++;
    setImmediate(() => {
      inFlight--;
      f();
    });
  };
  const front: XsRing = new XsRing({ page, side: 'front', notify: later(() => back.intr()), deliver: (m) => toFront.push(m) });
  const back: XsRing = new XsRing({
    page,
    side: 'back',
    notify: later(() => front.intr()),
    deliver: (m) => toBack.push(m),
    ...backOpts,
  });
  const settle = async (): Promise<void> => {
    while (inFlight > 0) await new Promise((r) => setImmediate(r));
  };
  return { front, back, toBack, toFront, settle };
}

function msg(req_id: number, size: number, type = XS_WRITE): XsMessage {
  const payload = new Uint8Array(size);
  for (let i = 0; i < size; i++) payload[i] = (i * 7 + req_id) & 0xff;
  return { type, req_id, tx_id: 0, payload };
}

t.test('messages both ways, including ones bigger than the ring', async (t) => {
  const p = pair(newPage());
  t.equal(p.front.error, undefined);
  const sent = [msg(1, 10), msg(2, XENSTORE_PAYLOAD_MAX), msg(3, 0), msg(4, 3000)];
  for (const m of sent) p.front.send(m);
  await p.settle();
  t.same(p.toBack, sent);
  p.back.send(msg(9, 2500, XS_READ));
  await p.settle();
  t.same(p.toFront, [msg(9, 2500, XS_READ)]);
  t.equal(p.front.backlogBytes, 0);
  t.equal(p.back.backlogBytes, 0);
});

t.test('server end advertises XENSTORE_SERVER_FEATURE_ERROR', async (t) => {
  const page = newPage();
  pair(page);
  t.equal(page.load32(FEATURES) & XENSTORE_SERVER_FEATURE_ERROR, XENSTORE_SERVER_FEATURE_ERROR);
});

t.test('a message split across the ring wrap', async (t) => {
  const p = pair(newPage(XENSTORE_RING_SIZE - 5));
  const m = msg(7, 40);
  p.front.send(m);
  await p.settle();
  t.same(p.toBack, [m], 'header itself straddles the wrap');
});

t.test('indices wrap through 2^32', async (t) => {
  const page = newPage(0xffffffff - 100);
  const p = pair(page);
  const sent = [msg(1, 500), msg(2, 500), msg(3, 500)];
  for (const m of sent) p.front.send(m);
  await p.settle();
  t.same(p.toBack, sent);
  t.ok(page.load32(REQ_PROD) < 2000, 'req_prod wrapped');
});

t.test('property: any start index and message sizes deliver in order', async (t) => {
  await fc.assert(
    fc.asyncProperty(
      fc.oneof(fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0xfffff000, max: 0xffffffff })),
      fc.array(fc.integer({ min: 0, max: 2000 }), { minLength: 1, maxLength: 8 }),
      async (start, sizes) => {
        const p = pair(newPage(start));
        const sent = sizes.map((s, i) => msg(i + 1, s));
        for (const m of sent) p.front.send(m);
        for (const m of sent) p.back.send(m);
        await p.settle();
        return JSON.stringify(p.toBack) === JSON.stringify(sent) && JSON.stringify(p.toFront) === JSON.stringify(sent);
      },
    ),
    { numRuns: 60 },
  );
  t.pass();
});

/** A back end alone on a page, with a hostile guest that writes raw bytes and indices. */
function lone(page: Page): { back: XsRing; got: XsMessage[]; broken: XenError[]; notified: () => number } {
  const got: XsMessage[] = [];
  const broken: XenError[] = [];
  let notifies = 0;
  const back = new XsRing({ page, side: 'back', notify: () => notifies++, deliver: (m) => got.push(m), broken: (e) => broken.push(e) });
  return { back, got, broken, notified: () => notifies };
}

t.test('hostile: producer index more than a ring ahead', async (t) => {
  const page = newPage();
  const s = lone(page);
  guestWrite(page, encodeMessage(msg(1, 4)));
  s.back.intr();
  t.equal(s.got.length, 1, 'an honest message first');
  page.store32(REQ_PROD, page.load32(REQ_CONS) + XENSTORE_RING_SIZE + 1);
  s.back.intr();
  t.equal(s.back.error?.code, 'EPROTO');
  t.equal(s.broken.length, 1);
  t.equal(page.load32(ERROR), XENSTORE_ERROR_RINGIDX);
  s.back.intr();
  t.equal(s.broken.length, 1, 'reported once');
  t.equal(s.got.length, 1, 'nothing read past the bad index');
  t.equal(s.back.send(msg(2, 1)), false, 'dead end takes no output');
});

t.test('hostile: consumer index moved past what we produced', async (t) => {
  const page = newPage();
  const s = lone(page);
  page.store32(RSP_CONS, 5000);
  s.back.send(msg(1, 8));
  t.equal(s.back.error?.code, 'EPROTO');
  t.equal(page.load32(ERROR), XENSTORE_ERROR_RINGIDX);
  t.equal(page.load32(RSP_PROD), 0, 'nothing written');
});

t.test('hostile: bogus len in a header', async (t) => {
  const page = newPage();
  const s = lone(page);
  const hdr = encodeMessage(msg(1, 0));
  new DataView(hdr.buffer).setUint32(12, 0xffffffff, true);
  guestWrite(page, hdr);
  s.back.intr();
  t.equal(s.back.error?.code, 'E2BIG');
  t.equal(page.load32(ERROR), XENSTORE_ERROR_PROTO);
  t.equal(s.got.length, 0);
});

t.test('hostile: our own index scribbled on the page is ignored', async (t) => {
  const page = newPage();
  const s = lone(page);
  guestWrite(page, encodeMessage(msg(1, 4)));
  page.store32(REQ_CONS, 700);
  s.back.intr();
  t.equal(s.got.length, 1, 'read from the private consumer index');
  t.equal(s.back.error, undefined);
});

t.test('back end stops reading input while its output is backlogged', async (t) => {
  const page = newPage();
  let drained = 0;
  const got: XsMessage[] = [];
  const back = new XsRing({
    page,
    side: 'back',
    notify: () => undefined,
    deliver: (m) => {
      got.push(m);
      back.send(msg(m.req_id, 1500));
    },
    highWaterBytes: 2000,
    drained: () => drained++,
  });
  for (let i = 1; i <= 4; i++) guestWrite(page, encodeMessage(msg(i, 4)));
  back.intr();
  t.equal(got.length, 2, 'took requests until the backlog passed high water');
  t.ok(back.backlogBytes > 2000);
  // The guest reads everything on rsp and kicks us.
  page.store32(RSP_CONS, page.load32(RSP_PROD));
  back.intr();
  page.store32(RSP_CONS, page.load32(RSP_PROD));
  back.intr();
  page.store32(RSP_CONS, page.load32(RSP_PROD));
  back.intr();
  t.equal(got.length, 4, 'resumed once the guest read');
  t.ok(drained >= 1, 'owner told the backlog drained');
});

t.test('re-entrant intr from inside deliver is safe', async (t) => {
  const page = newPage();
  const got: XsMessage[] = [];
  const back: XsRing = new XsRing({
    page,
    side: 'back',
    notify: () => back.intr(),
    deliver: (m) => {
      got.push(m);
      back.intr();
      back.send(msg(m.req_id, 1));
    },
  });
  for (let i = 1; i <= 3; i++) guestWrite(page, encodeMessage(msg(i, 4)));
  back.intr();
  t.equal(got.length, 3);
  t.equal(page.load32(RSP_PROD), 3 * 17);
});
