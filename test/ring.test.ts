// The generic shared ring (lib/xen/ring.ts) over real domain pages: round
// trips, a full ring, io/ring.h's notify decisions and final-check race,
// index wrap at 2^32 against a model queue, hostile indices, a multi-page
// blkif ring whose entries straddle pages, and two threads moving 100,000
// requests through a granted page.

import t from 'tap';
import fc from 'fast-check';
import { offsetOf } from '../lib/abi/layout.js';
import { __CONST_RING_SIZE, blkif_sring, blkif_sring_entry, netif_tx_sring, netif_tx_sring_entry, sring_header } from '../lib/abi/ring.js';
import { XenError } from '../lib/errors.js';
import { Host } from '../lib/hypervisor/host.js';
import { FramePage, PAGE_SIZE } from '../lib/hypervisor/page.js';
import type { MemoryViews, Page } from '../lib/hypervisor/page.js';
import { BackRing, FrontRing, SRING_RING_OFFSET } from '../lib/xen/ring.js';
import { BLKIF_WIRES, requestBytes } from '../lib/xen/blkif.js';
import { BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE } from '../lib/abi/blkif.js';
import { runPair } from '../bench/ring.js';

const REQ_PROD = offsetOf(sring_header, 'req_prod');
const REQ_EVENT = offsetOf(sring_header, 'req_event');
const RSP_PROD = offsetOf(sring_header, 'rsp_prod');
const RSP_EVENT = offsetOf(sring_header, 'rsp_event');
const TX_BYTES = netif_tx_sring_entry.size;
const TX_SIZE = __CONST_RING_SIZE(netif_tx_sring, PAGE_SIZE);
const BLK_BYTES = blkif_sring_entry.size;

const host = new Host();
const mem: MemoryViews = host.domain(host.createDomain({ name: 'ring', memoryMiB: 1 }).domid).mem;

/** A page wrapper that lets a peer act once in the middle of a macro: after a load or a store of one word. */
class HookPage implements Page {
  readonly writable = true;
  hook: { after: 'load' | 'store'; offset: number; run: () => void } | undefined;
  constructor(private readonly page: Page) {}
  private fire(after: 'load' | 'store', offset: number): void {
    const h = this.hook;
    if (h === undefined || h.after !== after || h.offset !== offset) return;
    this.hook = undefined;
    h.run();
  }
  load8(o: number): number { return this.page.load8(o); }
  load16(o: number): number { return this.page.load16(o); }
  load32(o: number): number {
    const v = this.page.load32(o);
    this.fire('load', o);
    return v;
  }
  read(o: number, into: Uint8Array, start?: number, end?: number): void { this.page.read(o, into, start, end); }
  store8(o: number, v: number): void { this.page.store8(o, v); }
  store16(o: number, v: number): void { this.page.store16(o, v); }
  store32(o: number, v: number): void {
    this.page.store32(o, v);
    this.fire('store', o);
  }
  write(o: number, from: Uint8Array, start?: number, end?: number): void { this.page.write(o, from, start, end); }
}

function pages(gfns: number[]): FramePage[] {
  for (const gfn of gfns) mem.u8.fill(0xee, gfn * PAGE_SIZE, (gfn + 1) * PAGE_SIZE);
  return gfns.map((gfn) => new FramePage(mem, gfn, true));
}

function pair(p: Page[] = pages([16]), entryBytes = TX_BYTES, size = TX_SIZE): { front: FrontRing; back: BackRing; page: Page } {
  const front = new FrontRing(p, entryBytes, size, 'test-front');
  const back = new BackRing(p, entryBytes, size, 'test-back');
  front.init();
  back.init();
  return { front, back, page: p[0]! };
}

/** An entry whose first word is `id` and whose other bytes follow from it. */
function entry(bytes: number, id: number, into = new Uint8Array(bytes)): Uint8Array {
  new DataView(into.buffer, into.byteOffset).setUint32(0, id >>> 0, true);
  for (let k = 4; k < bytes; k++) into[k] = (id * 7 + k) & 0xff;
  return into;
}

function idOf(e: Uint8Array): number {
  return new DataView(e.buffer, e.byteOffset).getUint32(0, true);
}

function codeOf(e: XenError | undefined): string {
  return e?.code ?? 'none';
}

t.test('construction checks its arguments', async (t) => {
  const p = pages([16]);
  t.throws(() => new FrontRing(p, TX_BYTES, 255, 'x'), { code: 'EINVAL' }, 'not a power of two');
  t.throws(() => new FrontRing(p, TX_BYTES, 512, 'x'), { code: 'EINVAL' }, 'does not fit one page');
  t.throws(() => new FrontRing([], TX_BYTES, 1, 'x'), { code: 'EINVAL' }, 'no pages');
  t.throws(() => new BackRing(p, 0, 1, 'x'), { code: 'EINVAL' }, 'zero-byte entries');
  t.equal(new FrontRing(p, TX_BYTES, 256, 'x').size, 256);
});

t.test('init writes SHARED_RING_INIT', async (t) => {
  const { page } = pair();
  t.same([page.load32(REQ_PROD), page.load32(REQ_EVENT), page.load32(RSP_PROD), page.load32(RSP_EVENT)], [0, 1, 0, 1]);
  for (let o = 16; o < SRING_RING_OFFSET; o++) if (page.load8(o) !== 0) t.fail(`header byte ${o} not cleared`);
});

t.test('request/response round trips', async (t) => {
  const { front, back } = pair();
  const buf = new Uint8Array(TX_BYTES);
  for (let round = 0; round < 5; round++) {
    for (let i = 0; i < 3; i++) t.ok(front.putRequest(entry(TX_BYTES, round * 10 + i)));
    front.pushRequests();
    t.equal(back.unconsumedRequests(), 3);
    const ids: number[] = [];
    while (back.takeRequest(buf)) {
      t.same(buf, entry(TX_BYTES, idOf(buf)), 'request bytes intact');
      ids.push(idOf(buf));
      back.putResponse(entry(TX_BYTES, idOf(buf) + 1000));
    }
    t.same(ids, [round * 10, round * 10 + 1, round * 10 + 2]);
    back.pushResponses();
    t.equal(front.unconsumedResponses(), 3);
    const got: number[] = [];
    while (front.takeResponse(buf)) got.push(idOf(buf));
    t.same(got, ids.map((i) => i + 1000));
    t.equal(front.freeRequests(), TX_SIZE);
  }
  t.equal(front.error, undefined);
  t.equal(back.error, undefined);
});

t.test('in-place entries: slot() then commit, as RING_GET_REQUEST users write', async (t) => {
  const { front, back } = pair(pages([16]), BLK_BYTES, 32);
  const buf = new Uint8Array(BLK_BYTES);
  const s = front.slot(front.reqProd);
  t.notOk(s.straddles);
  s.page.store32(s.offset, 0xfeed);
  front.commitRequest();
  front.pushRequests();
  back.unconsumedRequests();
  t.ok(back.takeRequest(buf));
  t.equal(idOf(buf), 0xfeed);
  const r = back.slot(back.rspProd);
  r.page.store32(r.offset, 0xbeef);
  back.commitResponse();
  t.throws(() => back.commitResponse(), { code: 'EINVAL' }, 'no request left to answer');
  back.pushResponses();
  front.unconsumedResponses();
  t.ok(front.takeResponse(buf));
  t.equal(idOf(buf), 0xbeef);
  t.equal(back.reqConsumed, 1);
  t.equal(front.rspConsumed, 1);
  t.throws(() => front.putRequest(new Uint8Array(BLK_BYTES + 1)), { code: 'EINVAL' }, 'a buffer longer than the entry');
  t.throws(() => back.readSlot(0, new Uint8Array(BLK_BYTES + 1)), { code: 'EINVAL' });
  for (let i = 0; i < 32; i++) front.commitRequest();
  t.throws(() => front.commitRequest(), { code: 'EINVAL' }, 'commit on a full ring');
});

t.test('a full ring: freeRequests 0, the back consumes at most a ring', async (t) => {
  const { front, back } = pair(pages([16]), BLK_BYTES, 32);
  const buf = new Uint8Array(BLK_BYTES);
  for (let i = 0; i < 32; i++) front.putRequest(entry(BLK_BYTES, i));
  t.equal(front.freeRequests(), 0);
  t.ok(front.full());
  t.throws(() => front.putRequest(buf), { code: 'EINVAL' }, 'a put on a full ring is the caller\'s bug');
  front.pushRequests();
  t.equal(back.unconsumedRequests(), 32);
  let n = 0;
  while (back.takeRequest(buf)) n++;
  t.equal(n, 32);
  t.equal(back.unconsumedRequests(), 0, 'RING_REQUEST_CONS_OVERFLOW: no room for responses');
  t.throws(() => front.putRequest(buf), { code: 'EINVAL' }, 'still full until responses are consumed');
  for (let i = 0; i < 5; i++) back.putResponse(entry(BLK_BYTES, i));
  back.pushResponses();
  t.equal(front.freeRequests(), 0, 'responses count once taken');
  front.unconsumedResponses();
  while (front.takeResponse(buf));
  t.equal(front.freeRequests(), 5);
  t.throws(() => {
    for (let i = 0; i < 28; i++) back.putResponse(buf);
  }, { code: 'EINVAL' }, 'a response with no request to answer');
});

t.test('notify decisions follow io/ring.h', async (t) => {
  const { front, back, page } = pair();
  const buf = new Uint8Array(TX_BYTES);
  const put = (n: number): void => {
    for (let i = 0; i < n; i++) front.putRequest(buf);
  };
  put(3);
  t.equal(front.pushRequests(), true, 'the first push crosses req_event = 1');
  put(2);
  t.equal(front.pushRequests(), false, 'the back has not asked again');
  t.equal(front.pushRequests(), false, 'a push of nothing never notifies');
  back.unconsumedRequests();
  while (back.takeRequest(buf)) back.putResponse(buf);
  t.equal(back.finalCheckForRequests(), false, 'all taken: arm req_event');
  t.equal(page.load32(REQ_EVENT), 6, 'req_event = req_cons + 1');
  let notifies = 0;
  for (let i = 0; i < 10; i++) {
    put(1);
    if (front.pushRequests()) notifies++;
  }
  t.equal(notifies, 1, 'ten single pushes to a sleeping back notify once');
  back.unconsumedRequests();
  while (back.takeRequest(buf)) back.putResponse(buf);
  back.finalCheckForRequests();
  put(10);
  t.equal(front.pushRequests(), true, 'a batch of ten notifies once');
  // An event index further ahead (a back that wants a batch): notify only once it is crossed.
  page.store32(REQ_EVENT, front.reqProd + 5);
  put(4);
  t.equal(front.pushRequests(), false, 'event index not reached');
  put(1);
  t.equal(front.pushRequests(), true, 'event index reached exactly');
});

t.test('notify decisions for responses mirror those for requests', async (t) => {
  const { front, back, page } = pair();
  const buf = new Uint8Array(TX_BYTES);
  for (let i = 0; i < 10; i++) front.putRequest(buf);
  front.pushRequests();
  back.unconsumedRequests();
  const respond = (): void => {
    back.takeRequest(buf);
    back.putResponse(buf);
  };
  respond();
  t.equal(back.pushResponses(), true, 'the first response crosses rsp_event = 1');
  respond();
  t.equal(back.pushResponses(), false, 'the front has not asked again');
  t.equal(front.finalCheckForResponses(), true, 'two unconsumed: no arming');
  t.equal(page.load32(RSP_EVENT), 1, 'rsp_event untouched');
  front.takeResponse(buf);
  front.takeResponse(buf);
  t.equal(front.finalCheckForResponses(), false);
  t.equal(page.load32(RSP_EVENT), 3, 'rsp_event = rsp_cons + 1');
  respond();
  respond();
  respond();
  t.equal(back.pushResponses(), true, 'a batch of three notifies once');
  respond();
  t.equal(back.pushResponses(), false);
});

t.test('final check: a push racing the re-arm is never lost', async (t) => {
  for (const side of ['back', 'front'] as const) {
    for (const when of ['before', 'after'] as const) {
      const raw = pages([16])[0]!;
      const hooked = new HookPage(raw);
      const front = new FrontRing([side === 'front' ? hooked : raw], TX_BYTES, TX_SIZE, 'race-front');
      const back = new BackRing([side === 'back' ? hooked : raw], TX_BYTES, TX_SIZE, 'race-back');
      front.init();
      back.init();
      const buf = new Uint8Array(TX_BYTES);
      // Settle: one round trip, then both sides have consumed everything and no event is armed.
      front.putRequest(buf);
      front.pushRequests();
      back.unconsumedRequests();
      back.takeRequest(buf);
      back.putResponse(buf);
      back.pushResponses();
      front.unconsumedResponses();
      front.takeResponse(buf);
      let notified = false;
      const peer = (): void => {
        if (side === 'back') {
          front.putRequest(buf);
          notified = front.pushRequests();
        } else {
          back.unconsumedRequests();
          back.takeRequest(buf);
          back.putResponse(buf);
          notified = back.pushResponses();
        }
      };
      if (side === 'front') {
        front.putRequest(buf);
        front.pushRequests();
      }
      // 'before': the peer pushes between our first look and the arming store, so it
      // sees the old event index and does not notify; the re-check must find the work.
      // 'after': it pushes after the arming store and notifies; the re-check finds it too.
      const prodOffset = side === 'back' ? REQ_PROD : RSP_PROD;
      const eventOffset = side === 'back' ? REQ_EVENT : RSP_EVENT;
      hooked.hook = when === 'before' ? { after: 'load', offset: prodOffset, run: peer } : { after: 'store', offset: eventOffset, run: peer };
      const found = side === 'back' ? back.finalCheckForRequests() : front.finalCheckForResponses();
      t.ok(found, `${side}: the re-check after arming sees the racing push (${when})`);
      t.equal(notified, when === 'after', `${side}: the peer notifies only when it saw the armed index (${when})`);
    }
  }
});

t.test('a sleeper is always woken: notify || final check, at every step (property)', async (t) => {
  const op = fc.oneof(
    fc.record({ k: fc.constant('put' as const), n: fc.integer({ min: 1, max: 40 }) }),
    fc.record({ k: fc.constant('push' as const), n: fc.constant(0) }),
    fc.record({ k: fc.constant('take' as const), n: fc.integer({ min: 1, max: 40 }) }),
    fc.record({ k: fc.constant('respond' as const), n: fc.integer({ min: 1, max: 40 }) }),
    fc.record({ k: fc.constant('pushRsp' as const), n: fc.constant(0) }),
    fc.record({ k: fc.constant('takeRsp' as const), n: fc.integer({ min: 1, max: 40 }) }),
  );
  fc.assert(fc.property(fc.array(op, { minLength: 1, maxLength: 300 }), (ops) => {
    const { front, back } = pair();
    const buf = new Uint8Array(TX_BYTES);
    let backAsleep = false;
    let frontAsleep = false;
    let taken = 0;
    let responded = 0;
    for (const { k, n } of ops) {
      if (k === 'put') for (let i = 0; i < n && !front.full(); i++) front.putRequest(buf);
      if (k === 'push') {
        const before = back.unconsumedRequests();
        const notify = front.pushRequests();
        // The back sleeps only after a final check found nothing; new work must wake it.
        if (backAsleep && back.unconsumedRequests() > before && !notify) return false;
        if (notify) backAsleep = false;
      }
      if (k === 'take' && !backAsleep) {
        back.unconsumedRequests();
        for (let i = 0; i < n && back.takeRequest(buf); i++) taken++;
        if (!back.finalCheckForRequests()) backAsleep = true;
      }
      if (k === 'respond') for (let i = 0; i < n && responded < taken; i++, responded++) back.putResponse(buf);
      if (k === 'pushRsp') {
        const before = front.unconsumedResponses();
        const notify = back.pushResponses();
        if (frontAsleep && front.unconsumedResponses() > before && !notify) return false;
        if (notify) frontAsleep = false;
      }
      if (k === 'takeRsp' && !frontAsleep) {
        front.unconsumedResponses();
        for (let i = 0; i < n && front.takeResponse(buf); i++);
        if (!front.finalCheckForResponses()) frontAsleep = true;
      }
    }
    return front.error === undefined && back.error === undefined;
  }), { numRuns: 300 });
  t.pass('no lost wake-up');
});

/** Set both sides at `start` by writing the header directly, as a ring in mid-life looks. */
function pairAt(start: number, p: Page[], entryBytes: number, size: number): { front: FrontRing; back: BackRing } {
  const page = p[0]!;
  page.store32(REQ_PROD, start);
  page.store32(RSP_PROD, start);
  page.store32(REQ_EVENT, start + 1);
  page.store32(RSP_EVENT, start + 1);
  const front = new FrontRing(p, entryBytes, size, 'wrap-front');
  const back = new BackRing(p, entryBytes, size, 'wrap-back');
  front.attach(start);
  back.attach();
  return { front, back };
}

/**
 * Random batches through both halves across the 2^32 wrap, against a model:
 * requests arrive in order, once, intact; responses likewise; the free count
 * and the unconsumed counts are what the model queues say.
 */
function wrapProperty(p: () => Page[], entryBytes: number, size: number): fc.IPropertyWithHooks<[number, number[]]> {
  return fc.property(
    fc.integer({ min: 0, max: 3 * size }),
    fc.array(fc.integer({ min: 0, max: 6 * size - 1 }), { minLength: 30, maxLength: 120 }),
    (before, batches) => {
      const start = (2 ** 32 - before) >>> 0;
      const { front, back } = pairAt(start, p(), entryBytes, size);
      const buf = new Uint8Array(entryBytes);
      const scratch = new Uint8Array(entryBytes);
      let nextReq = 0;
      let nextTaken = 0;
      const pending: number[] = []; // taken, not yet answered
      const answered: number[] = []; // responses pushed, not yet taken by the front
      let outstanding = 0; // put by the front, response not yet taken
      let ops = 0;
      for (const b of batches) {
        const n = (b % size) + 1;
        switch (Math.floor(b / size)) {
          case 0: case 1: {
            for (let i = 0; i < n && !front.full(); i++, outstanding++) front.putRequest(entry(entryBytes, nextReq++, scratch));
            front.pushRequests();
            break;
          }
          case 2: case 3: {
            back.unconsumedRequests();
            for (let i = 0; i < n && back.takeRequest(buf); i++) {
              const id = idOf(buf);
              entry(entryBytes, id, scratch);
              if (id !== nextTaken++ || !buf.every((v, k) => v === scratch[k])) return false;
              pending.push(id);
            }
            break;
          }
          case 4: {
            for (let i = 0; i < n && pending.length > 0; i++) {
              const id = pending.shift()!;
              back.putResponse(entry(entryBytes, id ^ 0x5a5a5a5a, scratch));
              answered.push(id);
            }
            back.pushResponses();
            break;
          }
          default: {
            const avail = front.unconsumedResponses();
            if (avail !== answered.length) return false;
            for (let i = 0; i < n && front.takeResponse(buf); i++, outstanding--) {
              const id = answered.shift();
              if (id === undefined || idOf(buf) !== (id ^ 0x5a5a5a5a) >>> 0) return false;
            }
          }
        }
        ops += n;
        if (front.freeRequests() !== size - outstanding) return false;
      }
      // Drain: everything put comes back, in order.
      for (let guard = 0; outstanding > 0; guard++) {
        if (guard > 4 * size + 10) return false;
        front.pushRequests();
        back.unconsumedRequests();
        while (back.takeRequest(buf)) pending.push(idOf(buf));
        for (const id of pending.splice(0)) {
          back.putResponse(entry(entryBytes, id ^ 0x5a5a5a5a, scratch));
          answered.push(id);
        }
        back.pushResponses();
        front.unconsumedResponses();
        while (front.takeResponse(buf)) {
          if (idOf(buf) !== (answered.shift()! ^ 0x5a5a5a5a) >>> 0) return false;
          outstanding--;
        }
      }
      return ops > 0 && front.error === undefined && back.error === undefined && answered.length === 0;
    },
  );
}

t.test('index wrap at 2^32 matches a model queue (property)', async (t) => {
  fc.assert(wrapProperty(() => pages([16]), TX_BYTES, TX_SIZE), { numRuns: 100 });
  fc.assert(wrapProperty(() => pages([16]), BLK_BYTES, 32), { numRuns: 200 });
  t.pass('netif tx (256 x 12 bytes) and blkif (32 x 112 bytes) across the wrap');
});

t.test('a hostile front: req_prod ahead by more than a ring, or backwards', async (t) => {
  const buf = new Uint8Array(TX_BYTES);
  {
    const { back, page } = pair();
    page.store32(REQ_PROD, TX_SIZE + 1);
    t.equal(back.unconsumedRequests(), 0);
    t.equal(codeOf(back.error), 'EPROTO', 'more than a ring ahead');
    t.equal(back.takeRequest(buf), false, 'nothing is read');
    t.equal(back.finalCheckForRequests(), false, 'the final check ends');
    t.equal(back.putResponse(buf), false);
    t.equal(back.pushResponses(), false);
  }
  {
    const { back, page } = pair();
    page.store32(REQ_PROD, TX_SIZE);
    t.equal(back.unconsumedRequests(), TX_SIZE, 'exactly a ring ahead is legal');
    for (let i = 0; i < 10; i++) back.takeRequest(buf);
    page.store32(REQ_PROD, 5);
    t.equal(back.unconsumedRequests(), 0);
    t.equal(codeOf(back.error), 'EPROTO', 'req_prod moved backwards');
  }
  {
    const { page } = pair();
    page.store32(RSP_PROD, 0xfffffff0);
    page.store32(REQ_PROD, 0x00000100);
    const back = new BackRing([page], TX_BYTES, TX_SIZE, 'attach');
    back.attach();
    t.equal(codeOf(back.error), 'EPROTO', 'BACK_RING_ATTACH: req_prod - rsp_prod > size');
  }
});

t.test('a hostile back: rsp_prod ahead of our requests, or backwards', async (t) => {
  const buf = new Uint8Array(TX_BYTES);
  {
    const { front, page } = pair();
    for (let i = 0; i < 4; i++) front.putRequest(buf);
    front.pushRequests();
    page.store32(RSP_PROD, 5);
    t.equal(front.unconsumedResponses(), 0);
    t.equal(codeOf(front.error), 'EPROTO', 'more responses than requests pushed');
    t.equal(front.takeResponse(buf), false);
    t.equal(front.finalCheckForResponses(), false);
    t.equal(front.putRequest(buf), false, 'a broken ring takes no more requests');
    t.equal(front.pushRequests(), false);
  }
  {
    const { front, page } = pair();
    for (let i = 0; i < 4; i++) front.putRequest(buf);
    page.store32(RSP_PROD, 2);
    t.equal(front.unconsumedResponses(), 0);
    t.equal(codeOf(front.error), 'EPROTO', 'responses to requests not yet pushed');
  }
  {
    const { front, page } = pair();
    for (let i = 0; i < 4; i++) front.putRequest(buf);
    front.pushRequests();
    page.store32(RSP_PROD, 3);
    t.equal(front.unconsumedResponses(), 3);
    front.takeResponse(buf);
    page.store32(RSP_PROD, 2);
    t.equal(front.unconsumedResponses(), 0);
    t.equal(codeOf(front.error), 'EPROTO', 'rsp_prod moved backwards, still ahead of rsp_cons');
  }
});

t.test('random header scribbles never make a side read outside, throw or spin (property)', async (t) => {
  const word = fc.constantFrom(REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT);
  const step = fc.oneof(
    fc.record({ k: fc.constant('scribble' as const), at: word, v: fc.oneof(fc.nat({ max: 600 }), fc.integer({ min: 0, max: 0xffffffff })) }),
    fc.record({ k: fc.constant('front' as const), at: fc.constant(0), v: fc.nat({ max: 300 }) }),
    fc.record({ k: fc.constant('back' as const), at: fc.constant(0), v: fc.nat({ max: 300 }) }),
  );
  fc.assert(fc.property(fc.array(step, { maxLength: 60 }), (steps) => {
    const { front, back, page } = pair();
    const buf = new Uint8Array(TX_BYTES);
    for (const s of steps) {
      if (s.k === 'scribble') page.store32(s.at, s.v);
      if (s.k === 'front') {
        for (let i = 0; i < s.v && front.freeRequests() > 0 && front.putRequest(buf); i++);
        front.pushRequests();
        let loops = 0;
        do {
          front.unconsumedResponses();
          let taken = 0;
          while (front.takeResponse(buf)) if (++taken > TX_SIZE) return false;
          if (++loops > 3) break; // a hostile back can keep it busy, one ring per check at most
        } while (front.finalCheckForResponses());
        if (front.freeRequests() < 0 || front.freeRequests() > TX_SIZE) return false;
      }
      if (s.k === 'back') {
        let loops = 0;
        do {
          back.unconsumedRequests();
          let taken = 0;
          while (back.takeRequest(buf)) {
            if (++taken > TX_SIZE) return false;
            back.putResponse(buf);
          }
          back.pushResponses();
          if (++loops > 3) break;
        } while (back.finalCheckForRequests());
      }
    }
    // Once broken, a side stays broken and inert.
    for (const r of [front, back]) if (r.error !== undefined && r.error.code !== 'EPROTO') return false;
    return true;
  }), { numRuns: 500 });
  t.pass('bounded, in range, no throw');
});

/** A blkif ring of ring-page-order 2 over four pages granted separately (not contiguous). */
function blkRing(gfns: number[]): { size: number; p: Page[]; front: FrontRing; back: BackRing } {
  const size = __CONST_RING_SIZE(blkif_sring, 4 * PAGE_SIZE);
  const p = pages(gfns);
  return { size, p, ...pair(p, BLK_BYTES, size) };
}

/** The ring's pages end to end, as a vmap'd C ring would see them. */
function areaOf(gfns: number[]): Uint8Array {
  const area = new Uint8Array(gfns.length * PAGE_SIZE);
  gfns.forEach((gfn, k) => area.set(mem.u8.subarray(gfn * PAGE_SIZE, (gfn + 1) * PAGE_SIZE), k * PAGE_SIZE));
  return area;
}

t.test('a multi-page blkif ring (ring-page-order 2): 128 slots of 112 bytes over 4 pages', async (t) => {
  const gfns = [40, 23, 31, 17];
  const { size, p, front, back } = blkRing(gfns);
  t.equal(size, 128);
  const straddling: number[] = [];
  for (let i = 0; i < size; i++) {
    const at = SRING_RING_OFFSET + i * BLK_BYTES;
    const s = front.slot(i);
    t.equal(s.page, p[Math.floor(at / PAGE_SIZE)], `slot ${i} page`);
    t.equal(s.offset, at % PAGE_SIZE, `slot ${i} offset`);
    if (s.straddles) straddling.push(i);
  }
  t.same(straddling, [72, 109], 'entries 72 and 109 cross page boundaries; 36 starts exactly on one');
  for (let i = 0; i < size; i++) front.putRequest(entry(BLK_BYTES, 0xabc00 + i));
  front.pushRequests();
  // The bytes sit in the concatenated area exactly as a vmap'd C ring would have them.
  const area = areaOf(gfns);
  for (const i of [0, 35, 36, 71, 72, 73, 109, 127]) {
    const at = SRING_RING_OFFSET + i * BLK_BYTES;
    t.same(area.subarray(at, at + BLK_BYTES), entry(BLK_BYTES, 0xabc00 + i), `slot ${i} in the concatenated area`);
  }
  const buf = new Uint8Array(BLK_BYTES);
  t.equal(back.unconsumedRequests(), size);
  for (let i = 0; i < size; i++) {
    back.takeRequest(buf);
    t.same(buf, entry(BLK_BYTES, 0xabc00 + i), `request ${i} read back whole`);
    back.putResponse(entry(BLK_BYTES, i));
  }
  back.pushResponses();
  front.unconsumedResponses();
  for (let i = 0; i < size; i++) {
    front.takeResponse(buf);
    if (idOf(buf) !== i || buf[111] !== ((i * 7 + 111) & 0xff)) t.fail(`response ${i}`);
  }
  fc.assert(wrapProperty(() => pages(gfns), BLK_BYTES, size), { numRuns: 60 });
  t.pass('wrap property over four pages');
});

t.test('a response shorter than the slot: only its bytes are copied, on a page or across one', async (t) => {
  const gfns = [41, 24, 32, 18];
  const { size, front, back } = blkRing(gfns);
  for (let i = 0; i < size; i++) front.putRequest(entry(BLK_BYTES, 0xbcd00 + i));
  front.pushRequests();
  t.equal(back.unconsumedRequests(), size);
  // 80 bytes: slot 72 has 64 bytes on its first page and slot 109 16, so both answers cross a page boundary.
  const RSP = 80;
  const req = new Uint8Array(BLK_BYTES);
  for (let i = 0; i < size; i++) {
    back.takeRequest(req);
    back.putResponse(entry(RSP, i));
  }
  back.pushResponses();
  const area = areaOf(gfns);
  for (const i of [0, 71, 72, 73, 108, 109, 127]) {
    const at = SRING_RING_OFFSET + i * BLK_BYTES;
    t.same(area.subarray(at, at + RSP), entry(RSP, i), `slot ${i}: the response`);
    t.same(area.subarray(at + RSP, at + BLK_BYTES), entry(BLK_BYTES, 0xbcd00 + i).subarray(RSP), `slot ${i}: the request's bytes after it unchanged`);
  }
  t.equal(front.unconsumedResponses(), size);
  const rsp = new Uint8Array(RSP);
  let wrong = 0;
  for (let i = 0; i < size; i++) {
    front.takeResponse(rsp);
    if (!Buffer.from(rsp).equals(entry(RSP, i))) wrong++;
  }
  t.equal(wrong, 0, 'every response read back whole through an 80-byte buffer');
});

t.test('a request that uses part of its slot: the front writes that part, the back copies its head and then the rest, on a page or across one', async (t) => {
  const gfns = [42, 25, 33, 19];
  const { size, front, back } = blkRing(gfns);
  // A first round leaves whole entries in every slot; the second writes 40 bytes of each.
  for (let i = 0; i < size; i++) front.putRequest(entry(BLK_BYTES, 0xcde00 + i));
  front.pushRequests();
  back.unconsumedRequests();
  const req = new Uint8Array(BLK_BYTES);
  for (let i = 0; i < size; i++) {
    back.takeRequest(req);
    back.putResponse(entry(16, i));
  }
  back.pushResponses();
  front.unconsumedResponses();
  for (let i = 0; i < size; i++) front.takeResponse(new Uint8Array(16));
  const USED = 40;
  const HEAD = 32;
  for (let i = 0; i < size; i++) front.putRequest(entry(BLK_BYTES, 0xdef00 + i), USED);
  front.pushRequests();
  const area = areaOf(gfns);
  for (const i of [0, 71, 72, 73, 108, 109, 127]) {
    const at = SRING_RING_OFFSET + i * BLK_BYTES;
    t.same(area.subarray(at, at + USED), entry(BLK_BYTES, 0xdef00 + i).subarray(0, USED), `slot ${i}: the part written`);
    t.same(area.subarray(at + USED, at + BLK_BYTES), entry(BLK_BYTES, 0xcde00 + i).subarray(USED), `slot ${i}: the rest as it was`);
  }
  t.throws(() => back.takeRequestRest(req, HEAD, USED), /no request taken/, 'no rest before a request is taken');
  back.unconsumedRequests();
  let wrong = 0;
  for (let i = 0; i < size; i++) {
    req.fill(0x55);
    back.takeRequest(req, HEAD);
    const headOnly = req.subarray(HEAD).every((b) => b === 0x55);
    back.takeRequestRest(req, HEAD, USED);
    const want = entry(BLK_BYTES, 0xdef00 + i);
    if (!headOnly || !Buffer.from(req.subarray(0, USED)).equals(want.subarray(0, USED)) || !req.subarray(USED).every((b) => b === 0x55)) wrong++;
    back.putResponse(entry(16, i));
  }
  t.equal(wrong, 0, 'each request: the head alone, then exactly the rest, and nothing past it');
  t.throws(() => back.takeRequestRest(req, HEAD, USED), /no request taken/, 'nor once its response is put');
});

t.test('requestBytes: what each blkif operation uses of its slot, under both protocols', async (t) => {
  const req = new Uint8Array(BLK_BYTES);
  for (const [protocol, w] of BLKIF_WIRES) {
    const used = (op: number, nr: number): number => {
      req.fill(0);
      req[0] = op;
      req[w.reqNrSegments] = nr;
      return requestBytes(w, req);
    };
    t.equal(used(BLKIF_OP_READ, 1), w.reqHeadBytes, `${protocol}: a read of one page is the head`);
    t.equal(used(BLKIF_OP_WRITE, 11), w.reqSeg + 11 * 8, `${protocol}: eleven segments`);
    t.equal(used(BLKIF_OP_READ, 200), w.reqSeg + 11 * 8, `${protocol}: more than eleven copies eleven (the request is refused)`);
    t.equal(used(BLKIF_OP_FLUSH_DISKCACHE, 0), w.reqSeg, `${protocol}: a flush without data`);
    t.equal(used(BLKIF_OP_INDIRECT, 0), w.indBytes, `${protocol}: the indirect struct`);
    t.equal(used(BLKIF_OP_DISCARD, 0), w.discardBytes, `${protocol}: the discard struct`);
    t.ok(w.discardBytes <= w.reqHeadBytes && w.indBytes <= w.entryBytes, `${protocol}: a discard fits the head, an indirect request the slot`);
  }
});

t.test('100,000 requests between two domains in two threads through a granted page', async (t) => {
  const r = await runPair(100_000);
  t.equal(r.front.error, null);
  t.equal(r.back.error, null);
  t.equal(r.back.done, 100_000, 'the back answered every request once');
  t.equal(r.front.done, 100_000, 'the front got every response once, in order, intact');
  t.equal(r.front.timeouts + r.back.timeouts, 0, 'no sleep outlasted its limit: no lost notification');
  t.ok(r.back.notifies < 100_000 && r.front.notifies < 100_000, 'events were suppressed');
});
