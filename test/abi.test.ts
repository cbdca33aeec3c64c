// lib/abi without a compiler: the layout engine's C rules, and the registry's
// shape. test/conformance/abi.test.ts checks the numbers against the headers.

import t from 'tap';
import {
  array, offsetOf, record, sizeOf, struct, u16, u32, u64, u64_x86_32, u8, union, unionOf,
} from '../lib/abi/layout.js';
import { constants, includes, strings, structs } from '../lib/abi/abi.js';
import {
  __CONST_RING_SIZE, blkif_sring, blkif_sring_x86_32, netif_rx_sring, netif_tx_sring,
  sring_header, xen_netif_ctrl_sring,
} from '../lib/abi/ring.js';

t.test('a size that differs from the header throws at load', async (t) => {
  t.throws(() => struct('too_small', 4, [['a', u8], ['b', u32]]), /too_small lays out to 8 bytes, the header says 4/);
  t.throws(() => unionOf('u', 2, [['a', u32]]), /u lays out to 4 bytes/);
  t.doesNotThrow(() => struct('ok', 8, [['a', u8], ['b', u32]]));
});

t.test('members are aligned to their type and the size to the largest alignment', async (t) => {
  const s = struct('s', 24, [['a', u8], ['b', u16], ['c', u64], ['d', u8]]);
  t.same([offsetOf(s, 'a'), offsetOf(s, 'b'), offsetOf(s, 'c'), offsetOf(s, 'd')], [0, 2, 8, 16]);
  t.equal(s.align, 8);
  t.same(s.c, { kind: 'struct', tag: 's' });
});

t.test('nested unions and structs get dotted names and absolute offsets', async (t) => {
  const s = struct('nested', 12, [
    ['type', u8],
    ['u', union([
      ['word', u32],
      ['pair', record([['lo', u16], ['hi', u8]])],
      ['bytes', array(u8, 6)],
    ])],
  ]);
  t.equal(offsetOf(s, 'u'), 4, 'the union takes the alignment of its widest member');
  t.equal(sizeOf(s, 'u'), 8, 'and pads to it');
  t.equal(offsetOf(s, 'u.word'), 4);
  t.equal(offsetOf(s, 'u.pair.hi'), 6);
  t.equal(sizeOf(s, 'u.bytes'), 6, 'an array is one field of its whole size');
  t.equal(s.fields['u.bytes.0'], undefined, 'with no element members');
  t.throws(() => offsetOf(s, 'u.nope'), /no member u.nope/);
  t.same(unionOf('v', 4, [['a', u32], ['b', u8]]).c, { kind: 'union', tag: 'v' });
});

t.test('uint64_t is 4-byte aligned in i386 structs', async (t) => {
  const i386 = struct('r', 12, [['op', u8], ['id', u64_x86_32]]);
  const amd64 = struct('r', 16, [['op', u8], ['id', u64]]);
  t.equal(offsetOf(i386, 'id'), 4);
  t.equal(i386.align, 4);
  t.equal(offsetOf(amd64, 'id'), 8);
  t.equal(structs['blkif_request_x86_32']?.size, 108);
  t.equal(structs['blkif_request']?.size, 112);
});

t.test('the shared ring header is 64 bytes and ring[] follows it', async (t) => {
  t.equal(sring_header.size, 64);
  t.same(
    ['req_prod', 'req_event', 'rsp_prod', 'rsp_event', 'pvt', '__pad'].map((n) => offsetOf(sring_header, n)),
    [0, 4, 8, 12, 16, 20],
  );
  for (const [key, s] of Object.entries(structs)) {
    if (s.tag.endsWith('_sring')) t.equal(s.fields['ring']?.offset, 64, `${key}.ring`);
  }
  t.equal(__CONST_RING_SIZE(netif_tx_sring, 4096), 256);
  t.equal(__CONST_RING_SIZE(netif_rx_sring, 4096), 256);
  t.equal(__CONST_RING_SIZE(xen_netif_ctrl_sring, 4096), 128);
  t.equal(__CONST_RING_SIZE(blkif_sring, 4096), 32);
  t.equal(__CONST_RING_SIZE(blkif_sring_x86_32, 4096), 32);
  t.equal(__CONST_RING_SIZE(netif_tx_sring, 64), 0, 'no room for an entry');
});

t.test('the registry has no undefined entries', async (t) => {
  const bad: string[] = [];
  for (const [key, s] of Object.entries(structs)) {
    if (!Number.isInteger(s.size) || s.size <= 0) bad.push(`${key}.size`);
    if (key !== s.tag && key !== `${s.tag}_x86_32`) bad.push(`${key}: tag ${s.tag}`);
    for (const [name, f] of Object.entries(s.fields)) {
      if (!Number.isInteger(f.offset) || !Number.isInteger(f.size) || f.offset + f.size > s.size) bad.push(`${key}.${name}`);
    }
  }
  for (const [name, v] of Object.entries(constants)) {
    if (typeof v !== 'bigint' && !Number.isSafeInteger(v)) bad.push(name);
  }
  for (const [name, v] of Object.entries(strings)) if (typeof v !== 'string') bad.push(name);
  t.same(bad, []);
  t.ok(Object.keys(structs).length >= 60, 'at least 60 structs/unions');
  t.ok(Object.keys(constants).length >= 300, 'at least 300 constants');
  t.equal(structs['grant_entry_v2']?.kind, 'union');
  t.equal(constants['GNTST_bad_copy_arg'], -10);
  t.equal(constants['HVM_PARAM_CALLBACK_IRQ_TYPE_MASK'], 0xff00000000000000n);
  t.equal(strings['XEN_IO_PROTO_ABI_X86_32'], 'x86_32-abi');
  t.equal(constants['XEN_IO_PROTO_ABI_X86_32'], undefined, 'strings stay out of constants');
  t.ok(includes.includes('xen/io/xs_wire.h'));
});
