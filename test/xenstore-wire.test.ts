import fc from 'fast-check';
import t from 'tap';

import { XENSTORE_PAYLOAD_MAX, XS_READ, XS_WRITE } from '../lib/abi/xs_wire.js';
import {
  XS_HDR_SIZE,
  XsDecoder,
  countStrings,
  encodeInto,
  encodeMessage,
  joinStrings,
  joinWrite,
  oneString,
  parsePerm,
  splitFirst,
  splitStrings,
  toBytes,
  type XsMessage,
} from '../lib/xenstore/wire.js';

const enc = new TextEncoder();

function msg(type: number, req_id: number, tx_id: number, text: string): XsMessage {
  return { type, req_id, tx_id, payload: enc.encode(text) };
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

t.test('header is the 16-byte xsd_sockmsg, little-endian', async (t) => {
  const bytes = encodeMessage(msg(XS_READ, 0x01020304, 7, 'a\0'));
  t.equal(XS_HDR_SIZE, 16);
  t.same([...bytes.subarray(0, 16)], [2, 0, 0, 0, 4, 3, 2, 1, 7, 0, 0, 0, 2, 0, 0, 0]);
  t.same([...bytes.subarray(16)], [0x61, 0]);
});

t.test('decoder fed one byte at a time', async (t) => {
  const msgs = [msg(XS_READ, 1, 0, 'device/vif\0'), msg(XS_WRITE, 2, 5, 'a\0b'), msg(XS_READ, 3, 0, '')];
  const stream = concat(msgs.map(encodeMessage));
  const d = new XsDecoder();
  const got: XsMessage[] = [];
  for (let i = 0; i < stream.length; i++) {
    const out = d.feed(stream.subarray(i, i + 1));
    t.ok(out.length <= 1, 'at most one message completes per byte');
    got.push(...out);
    t.ok(d.wanted() >= 1);
  }
  t.same(got, msgs);
  t.equal(d.buffered, 0);
  t.equal(d.error, undefined);
});

t.test('len over XENSTORE_PAYLOAD_MAX is a protocol error, not a crash', async (t) => {
  const d = new XsDecoder();
  const hdr = new Uint8Array(16);
  new DataView(hdr.buffer).setUint32(12, XENSTORE_PAYLOAD_MAX + 1, true);
  t.same(d.feed(hdr), []);
  t.equal(d.error?.code, 'E2BIG');
  t.same(d.feed(encodeMessage(msg(XS_READ, 1, 0, 'x\0'))), [], 'stream unframed after the error');
  d.reset();
  t.equal(d.feed(encodeMessage(msg(XS_READ, 1, 0, 'x\0'))).length, 1, 'reset starts afresh');
  const max = { type: XS_WRITE, req_id: 9, tx_id: 0, payload: new Uint8Array(XENSTORE_PAYLOAD_MAX) };
  t.equal(new XsDecoder().feed(encodeMessage(max))[0]?.payload.length, XENSTORE_PAYLOAD_MAX, 'exactly max is fine');
  t.throws(() => encodeMessage({ ...max, payload: new Uint8Array(XENSTORE_PAYLOAD_MAX + 1) }), { code: 'E2BIG' });
});

t.test('payload helpers', async (t) => {
  t.same(splitStrings(joinStrings(['a', 'b'])), ['a', 'b']);
  t.same(splitStrings(enc.encode('a\0b')), ['a', 'b']);
  t.same(splitStrings(new Uint8Array(0)), []);
  t.same(splitStrings(enc.encode('\0')), ['']);
  t.equal(countStrings(enc.encode('a\0b\0c')), 2);
  const w = joinWrite('p/q', 'v\0x');
  const [path, value] = splitFirst(w) ?? ['', new Uint8Array()];
  t.equal(path, 'p/q');
  t.same([...value], [...enc.encode('v\0x')], 'values are bytes after the first NUL');
  t.equal(splitFirst(enc.encode('nonul')), undefined);
  t.same(parsePerm('b0'), { domid: 0, perm: 'b' });
  t.same(parsePerm('r65535'), { domid: 65535, perm: 'r' });
  for (const bad of ['', 'x1', 'r', 'r-1', 'r65536', 'b0 ', 'R1']) t.throws(() => parsePerm(bad), { code: 'EINVAL' }, bad);
});

const arbMessage = fc.record({
  type: fc.integer({ min: 0, max: 0xffffffff }),
  req_id: fc.integer({ min: 0, max: 0xffffffff }),
  tx_id: fc.integer({ min: 0, max: 0xffffffff }),
  payload: fc.uint8Array({ maxLength: 300 }),
});

t.test('property: any chunking of any message stream round-trips', async (t) => {
  fc.assert(
    fc.property(fc.array(arbMessage, { maxLength: 12 }), fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1 }), (msgs, cuts) => {
      const stream = concat(msgs.map(encodeMessage));
      const d = new XsDecoder();
      const got: XsMessage[] = [];
      let at = 0;
      for (let i = 0; at < stream.length; i++) {
        const n = cuts[i % cuts.length] ?? 1;
        got.push(...d.feed(stream.subarray(at, at + n)));
        at += n;
      }
      t.same(got, msgs);
      return d.buffered === 0 && d.error === undefined && got.length === msgs.length;
    }),
  );
});

t.test('property: take() fed wanted() bytes at a time, as a ring reads, gives each message as feed() does, with no array', async (t) => {
  fc.assert(
    fc.property(fc.array(arbMessage, { maxLength: 12 }), fc.integer({ min: 0, max: 7 }), (msgs, lead) => {
      const stream = concat(msgs.map(encodeMessage));
      // The bytes sit at an offset in a bigger buffer, as in a ring reader's scratch.
      const scratch = new Uint8Array(lead + XS_HDR_SIZE + 300);
      const d = new XsDecoder();
      const got: XsMessage[] = [];
      for (let at = 0; at < stream.length; ) {
        const n = Math.min(d.wanted(), stream.length - at);
        scratch.set(stream.subarray(at, at + n), lead);
        const m = d.take(scratch, lead, lead + n);
        if (d.took !== n) return false;
        if (m !== undefined) got.push(m);
        at += n;
      }
      t.same(got, msgs);
      return d.buffered === 0 && d.error === undefined && got.length === msgs.length;
    }),
    { numRuns: 200 },
  );
  const d = new XsDecoder();
  const hdr = new Uint8Array(16);
  new DataView(hdr.buffer).setUint32(12, XENSTORE_PAYLOAD_MAX + 1, true);
  t.equal(d.take(hdr, 0, 16), undefined);
  t.equal(d.error?.code, 'E2BIG', 'an oversized header stops take() as it stops feed()');
  const next = encodeMessage(msg(XS_READ, 1, 0, 'x\0'));
  t.equal(d.take(next, 0, next.length), undefined, 'and nothing after it is framed');
  t.equal(d.took, next.length, 'though the bytes count as used');
  const fresh = new XsDecoder();
  for (const [at, end] of [[-1, 4], [5, 4], [0, 17]]) t.throws(() => fresh.take(hdr, at!, end!), { code: 'EINVAL' }, `bytes [${at}, ${end}) of 16`);
  t.throws(() => fresh.feed(hdr, 17), { code: 'EINVAL' }, 'feed() with an end past the chunk');
  t.equal(fresh.buffered, 0, 'and the refused calls took nothing');
});

t.test('property: strings survive join and split', async (t) => {
  const arbPart = fc.string({ unit: fc.constantFrom('a', 'b', '/', '-', '_', '@', '0', '9'), maxLength: 20 });
  fc.assert(
    fc.property(fc.array(arbPart, { minLength: 1, maxLength: 8 }), (parts) => {
      const back = splitStrings(joinStrings(parts));
      return back.length === parts.length && back.every((p, i) => p === parts[i]);
    }),
  );
  t.pass();
});

t.test('property: joinStrings, joinWrite and toBytes give the UTF-8 of the joined text, ASCII or not, short or long', async (t) => {
  // Short ASCII strings take an encoder of their own; everything else TextEncoder. Both must agree byte for byte.
  const arbText = fc.oneof(fc.string({ maxLength: 40 }), fc.string({ unit: 'grapheme', maxLength: 40 }), fc.string({ minLength: 250, maxLength: 300 }));
  fc.assert(
    fc.property(fc.array(arbText, { minLength: 1, maxLength: 4 }), arbText, (parts, value) => {
      t.same(joinStrings(parts), enc.encode(parts.map((p) => `${p}\0`).join('')));
      t.same(joinWrite(parts[0]!, value), enc.encode(`${parts[0]}\0${value}`));
      t.same(toBytes(value), enc.encode(value));
    }),
  );
});

t.test('encodeInto writes what encodeMessage returns and refuses an oversized payload', async (t) => {
  const m = msg(XS_WRITE, 7, 9, 'a/b\0value');
  const into = new Uint8Array(XS_HDR_SIZE + XENSTORE_PAYLOAD_MAX).fill(0xee);
  const n = encodeInto(m, into, new DataView(into.buffer));
  t.same(into.subarray(0, n), encodeMessage(m));
  t.throws(() => encodeInto({ ...m, payload: new Uint8Array(XENSTORE_PAYLOAD_MAX + 1) }, into, new DataView(into.buffer)), { code: 'E2BIG' });
});

t.test('property: oneString is the single NUL-terminated string of a payload, or undefined', async (t) => {
  const arbPayload = fc.oneof(
    fc.uint8Array({ maxLength: 40 }),
    fc.string({ unit: 'grapheme', maxLength: 30 }).map((s) => enc.encode(`${s}\0`)),
    fc.string({ minLength: 250, maxLength: 300 }).map((s) => enc.encode(`${s}\0`)),
  );
  fc.assert(
    fc.property(arbPayload, (p) => {
      const whole = p.length > 0 && p[p.length - 1] === 0 && countStrings(p) === 1;
      t.equal(oneString(p), whole ? splitStrings(p)[0] : undefined);
    }),
  );
});
