// lib/gnttab against the real hypervisor: domain A grants with GrantTable,
// domain B (the test acting as its kernel) maps and copies with hypercalls.

import fc from 'fast-check';
import t from 'tap';
import { map, unmap, code, rejection } from './fixtures/grants.js';

import { offsetOf } from '../lib/abi/layout.js';
import {
  grant_entry_v1,
  GNTCOPY_dest_gref,
  GNTCOPY_source_gref,
  GNTTAB_NR_RESERVED_ENTRIES,
  GNTTAB_RESERVED_XENSTORE,
  GNTTABOP_copy,
  GNTST_bad_gntref,
  GNTST_okay,
  GNTST_general_error,
  GTF_permit_access,
  GTF_readonly,
} from '../lib/abi/grant_table.js';
import { __HYPERVISOR_grant_table_op, DOMID_SELF } from '../lib/abi/xen.js';
import { XenError } from '../lib/errors.js';
import { GNTTAB_ENTRIES_PER_FRAME, GrantTable, type GrantTableOptions } from '../lib/gnttab/gnttab.js';
import { D, SpecialPage } from '../lib/hypervisor/domain.js';
import { Host } from '../lib/hypervisor/host.js';
import type { gnttab_copy } from '../lib/hypervisor/hypercall.js';
import { PAGE_SIZE, writablePage } from '../lib/hypervisor/page.js';
import { PhysMem } from '../lib/xen/physmem.js';

const EPF = GNTTAB_ENTRIES_PER_FRAME;
const FAST: GrantTableOptions = { removeRetries: 3, removeWaitMs: 1, removeMaxWaitMs: 2 };

function setup(maxGrantFrames = 4, options: GrantTableOptions = FAST) {
  const host = new Host();
  const a = host.createDomain({ name: 'a', memoryMiB: 4, maxGrantFrames });
  const b = host.createDomain({ name: 'b', memoryMiB: 4 });
  const c = host.createDomain({ name: 'c', memoryMiB: 4 });
  const da = host.domain(a.domid);
  const physmem = new PhysMem(da.mem, da.specialBase);
  const gt = new GrantTable(host.hv.entry(a.domid), da.mem, physmem, 'a', options);
  return { host, a: da, physmem, gt, hcB: host.hv.entry(b.domid), b: b.domid, hcC: host.hv.entry(c.domid), c: c.domid };
}





t.test('init moves frame 0 into RAM and keeps the builder entries; reserved refs are never handed out', async (t) => {
  const { a, gt, hcB, b } = setup();
  // What the domain builder does: entry 1 grants the xenstore page to domain b.
  const special = (a.specialBase + SpecialPage.grantFrame0) * PAGE_SIZE + GNTTAB_RESERVED_XENSTORE * grant_entry_v1.size;
  const storeGfn = a.specialBase + SpecialPage.xenstore;
  a.mem.u8[storeGfn * PAGE_SIZE] = 0x5a;
  a.mem.u32[(special + offsetOf(grant_entry_v1, 'frame')) / 4] = storeGfn;
  a.mem.u32[special / 4] = (b << 16) | GTF_permit_access;
  gt.init();
  t.same(gt.frames, { nrFrames: 1, maxNrFrames: 4 });
  const frame0 = a.ctl[D.grantFrames] ?? -1;
  t.ok(frame0 > 0 && frame0 < a.specialBase, 'frame 0 is a page of RAM now');
  const op = map(hcB, a.domid, GNTTAB_RESERVED_XENSTORE, true);
  t.equal(op.status, GNTST_okay, 'the builder grant survived the move');
  t.equal(op.page?.load8(0), 0x5a);
  t.equal(unmap(hcB, op.handle), GNTST_okay);
  t.equal(gt.nrFree, EPF - GNTTAB_NR_RESERVED_ENTRIES);
  const seen = new Set<number>();
  for (let i = 0; i < EPF - GNTTAB_NR_RESERVED_ENTRIES; i++) seen.add(gt.alloc());
  t.equal(seen.size, EPF - GNTTAB_NR_RESERVED_ENTRIES, 'refs are unique');
  t.ok([...seen].every((r) => r >= GNTTAB_NR_RESERVED_ENTRIES && r < EPF));
  t.equal(code(() => gt.init()), 'EEXIST');
});

t.test('alloc grows the table one frame at a time, then ENOSPC at max_nr_frames', async (t) => {
  const { gt, physmem } = setup(3);
  gt.init();
  const before = physmem.freePages;
  const refs = new Set<number>();
  for (let i = 0; i < EPF - GNTTAB_NR_RESERVED_ENTRIES; i++) refs.add(gt.alloc());
  t.equal(gt.frames.nrFrames, 1);
  const next = gt.alloc();
  t.equal(gt.frames.nrFrames, 2, 'the next alloc grew the table');
  t.ok(next >= EPF && next < 2 * EPF);
  refs.add(next);
  t.equal(physmem.freePages, before - 1, 'one page for the new frame');
  for (let i = 1; i < 2 * EPF; i++) refs.add(gt.alloc());
  t.equal(refs.size, 3 * EPF - GNTTAB_NR_RESERVED_ENTRIES);
  t.same(gt.frames, { nrFrames: 3, maxNrFrames: 3 });
  t.equal(code(() => gt.alloc()), 'ENOSPC');
  t.equal(code(() => gt.grow()), 'ENOSPC');
  gt.free(next);
  t.equal(gt.alloc(), next, 'a freed ref comes back');
});

t.test('grant, map from the other domain, read and write through the page', async (t) => {
  const { a, gt, physmem, hcB, b } = setup();
  gt.init();
  const gfn = physmem.alloc(1);
  a.mem.u8.set([1, 2, 3, 4], gfn * PAGE_SIZE + 100);
  const ref = gt.alloc();
  gt.enter(ref, b, gfn, 0);
  const op = map(hcB, a.domid, ref);
  t.equal(op.status, GNTST_okay);
  const page = writablePage(op.page);
  t.ok(page.writable);
  const got = new Uint8Array(4);
  page.read(100, got);
  t.same([...got], [1, 2, 3, 4]);
  page.store32(200, 0xdeadbeef);
  t.equal(a.mem.u32[(gfn * PAGE_SIZE + 200) / 4], 0xdeadbeef, 'B wrote into A');
  t.equal(unmap(hcB, op.handle), GNTST_okay);
  t.equal(code(() => page.load8(0)), 'EFAULT', 'the page dies with the unmap');
  await gt.remove(ref);
  gt.free(ref);
});

t.test('a read-only grant refuses a writable map; its page has no working store', async (t) => {
  const { gt, physmem, hcB, b, a } = setup();
  gt.init();
  const ref = gt.alloc();
  gt.enter(ref, b, physmem.alloc(1), GTF_readonly);
  t.equal(map(hcB, a.domid, ref, false).status, GNTST_general_error);
  const op = map(hcB, a.domid, ref, true);
  t.equal(op.status, GNTST_okay);
  t.notOk(op.page!.writable);
  t.notOk('store8' in op.page! || 'write' in op.page!, 'the page object has no store methods');
  t.equal(code(() => writablePage(op.page)), 'EACCES');
  unmap(hcB, op.handle);
  await gt.remove(ref);
});

t.test('wrong domid, out-of-range ref, revoked ref', async (t) => {
  const { gt, physmem, hcB, hcC, b, a } = setup();
  gt.init();
  const ref = gt.alloc();
  gt.enter(ref, b, physmem.alloc(1), 0);
  t.equal(map(hcC, a.domid, ref).status, GNTST_general_error, 'granted to b, not c');
  t.equal(map(hcB, a.domid, 4 * EPF + 5).status, GNTST_bad_gntref, 'beyond the table');
  t.equal(map(hcB, a.domid, 2 * EPF - 1).status, GNTST_bad_gntref, 'beyond the frames placed so far');
  t.equal(code(() => gt.enter(EPF + 1, b, 1)), 'EINVAL', 'enter of a ref beyond the table');
  t.equal(code(() => gt.enter(GNTTAB_RESERVED_XENSTORE, b, 1)), 'EINVAL', 'a reserved ref');
  await gt.remove(ref);
  t.equal(map(hcB, a.domid, ref).status, GNTST_general_error, 'revoked');
  const unused = gt.alloc();
  t.equal(map(hcB, a.domid, unused).status, GNTST_general_error, 'allocated but never entered');
});

t.test('enter checks its arguments and refuses to grant a grant-table frame', async (t) => {
  const { gt, b, a } = setup();
  gt.init();
  const ref = gt.alloc();
  t.equal(code(() => gt.enter(ref, DOMID_SELF, 1)), 'EINVAL', 'domid');
  t.equal(code(() => gt.enter(ref, b, a.nrPages)), 'EINVAL', 'gfn beyond memory');
  t.equal(code(() => gt.enter(ref, b, 1, 0x10)), 'EINVAL', 'flags other than GTF_readonly');
  t.equal(code(() => gt.enter(ref, b, a.ctl[D.grantFrames] ?? 0)), 'EINVAL', 'frame 0 of the table itself');
  t.equal(code(() => gt.tryRemove(ref)), 'EINVAL', 'remove of a ref never entered');
});

t.test('grant copy in both directions, and a read-only grant as the destination', async (t) => {
  const { gt, physmem, hcB, b, a, host } = setup();
  gt.init();
  const src = physmem.alloc(1);
  a.mem.u8.fill(7, src * PAGE_SIZE + 8, src * PAGE_SIZE + 24);
  const ro = gt.alloc();
  gt.enter(ro, b, src, GTF_readonly);
  const dstGfn = physmem.alloc(1);
  const rw = gt.alloc();
  gt.enter(rw, b, dstGfn, 0);
  const bMem = host.domain(b).mem;
  const bGfn = 40;
  bMem.u8.fill(9, bGfn * PAGE_SIZE, bGfn * PAGE_SIZE + 16);
  const op = (flags: number, from: { ref: number; gmfn: number; domid: number }, to: { ref: number; gmfn: number; domid: number }): number => {
    const c: gnttab_copy = {
      source: { u: { ref: from.ref, gmfn: from.gmfn }, domid: from.domid, offset: 8 },
      dest: { u: { ref: to.ref, gmfn: to.gmfn }, domid: to.domid, offset: 0 },
      len: 16, flags, status: 0,
    };
    hcB(__HYPERVISOR_grant_table_op, GNTTABOP_copy, c);
    return c.status;
  };
  const self = { ref: 0, gmfn: bGfn, domid: DOMID_SELF };
  t.equal(op(GNTCOPY_source_gref, { ref: ro, gmfn: 0, domid: a.domid }, self), GNTST_okay, 'A -> B');
  t.same([...bMem.u8.subarray(bGfn * PAGE_SIZE, bGfn * PAGE_SIZE + 16)], new Array(16).fill(7));
  bMem.u8.fill(3, bGfn * PAGE_SIZE + 8, bGfn * PAGE_SIZE + 24);
  t.equal(op(GNTCOPY_dest_gref, self, { ref: rw, gmfn: 0, domid: a.domid }), GNTST_okay, 'B -> A');
  t.same([...a.mem.u8.subarray(dstGfn * PAGE_SIZE, dstGfn * PAGE_SIZE + 16)], new Array(16).fill(3));
  t.equal(op(GNTCOPY_dest_gref, self, { ref: ro, gmfn: 0, domid: a.domid }), GNTST_general_error, 'read-only as dest');
  // A copy pins only while it runs: both entries revoke at once afterwards.
  t.ok(gt.tryRemove(ro));
  t.ok(gt.tryRemove(rw));
  t.equal(op(GNTCOPY_source_gref, { ref: ro, gmfn: 0, domid: a.domid }, self), GNTST_general_error, 'revoked');
});

t.test('free or enter of an entry in use is an error with a code', async (t) => {
  const { gt, physmem, b } = setup();
  gt.init();
  const ref = gt.alloc();
  const gfn = physmem.alloc(1);
  gt.enter(ref, b, gfn);
  t.equal(code(() => gt.free(ref)), 'EBUSY', 'free while entered');
  t.equal(code(() => gt.enter(ref, b, gfn)), 'EBUSY', 'enter over an entered ref');
  t.ok(gt.tryRemove(ref));
  gt.free(ref);
  t.equal(code(() => gt.free(ref)), 'EINVAL', 'double free');
  t.equal(code(() => gt.enter(ref, b, gfn)), 'EINVAL', 'enter of a free ref');
  t.equal(code(() => gt.free(GNTTAB_RESERVED_XENSTORE)), 'EINVAL', 'free of a reserved ref');
});

t.test('XSA-396: remove while the peer maps it retries, then quarantines ref and page for good', async (t) => {
  const { gt, physmem, hcB, b, a } = setup(2);
  gt.init();
  const gfn = physmem.alloc(1);
  const ref = gt.alloc();
  gt.enter(ref, b, gfn, 0);
  const op = map(hcB, a.domid, ref);
  t.equal(op.status, GNTST_okay);
  t.notOk(gt.tryRemove(ref), 'one attempt fails while mapped');
  const started = performance.now();
  t.equal(await rejection(gt.remove(ref)), 'EBUSY');
  const ms = performance.now() - started;
  t.ok(ms >= 3 && ms < 5000, `bounded retries took ${ms.toFixed(1)} ms`);
  t.equal(gt.quarantined, 1);
  t.ok(gt.isQuarantined(gfn), 'the page is reported');
  t.equal(code(() => gt.free(ref)), 'no error', 'free of a quarantined ref does nothing');
  t.equal(code(() => gt.enter(ref, b, gfn)), 'EBUSY', 'a quarantined ref cannot be entered');
  writablePage(op.page).store8(0, 42);
  t.equal(a.mem.u8[gfn * PAGE_SIZE], 42, 'the peer still writes the page: it must never be reused');
  const other = gt.alloc();
  t.equal(code(() => gt.enter(other, b, gfn)), 'EBUSY', 'nor may its page be granted again');
  gt.free(other);
  const handed: number[] = [];
  for (;;) {
    try {
      handed.push(gt.alloc());
    } catch (err) {
      t.equal((err as XenError).code, 'ENOSPC');
      break;
    }
  }
  t.equal(handed.length, 2 * EPF - GNTTAB_NR_RESERVED_ENTRIES - 1, 'every ref but the quarantined one');
  t.notOk(handed.includes(ref), 'the quarantined ref is never handed out again');
  for (const r of handed) gt.free(r);
  t.equal(unmap(hcB, op.handle), GNTST_okay);
  const fresh = gt.alloc();
  gt.enter(fresh, b, physmem.alloc(1), 0);
  const op2 = map(hcB, a.domid, fresh, true);
  t.equal(unmap(hcB, op2.handle), GNTST_okay);
  await gt.remove(fresh);
  t.equal(map(hcB, a.domid, fresh).status, GNTST_general_error, 'after the unmap a fresh ref revokes cleanly');
  t.equal(gt.quarantined, 1);
});

t.test('remove succeeds on a retry once the peer unmaps in time', async (t) => {
  const { gt, physmem, hcB, b, a } = setup(2, { removeRetries: 20, removeWaitMs: 2, removeMaxWaitMs: 5 });
  gt.init();
  const ref = gt.alloc();
  gt.enter(ref, b, physmem.alloc(1), 0);
  const op = map(hcB, a.domid, ref, true);
  setTimeout(() => unmap(hcB, op.handle), 10);
  await gt.remove(ref);
  t.equal(gt.quarantined, 0);
  gt.free(ref);
});

t.test('an aborted remove quarantines with ECANCELED; removeNow never waits', async (t) => {
  const { gt, physmem, hcB, b, a } = setup(2, { removeRetries: 100, removeWaitMs: 50, removeMaxWaitMs: 50 });
  gt.init();
  const r1 = gt.alloc();
  gt.enter(r1, b, physmem.alloc(1), 0);
  map(hcB, a.domid, r1, true);
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 5);
  const started = performance.now();
  t.equal(await rejection(gt.remove(r1, ac.signal)), 'ECANCELED');
  t.ok(performance.now() - started < 1000);
  const r2 = gt.alloc();
  gt.enter(r2, b, physmem.alloc(1), 0);
  map(hcB, a.domid, r2, true);
  t.equal(code(() => gt.removeNow(r2)), 'EBUSY');
  t.equal(gt.quarantined, 2);
});

t.test('Grant objects are disposable', async (t) => {
  const { gt, physmem, hcB, b, a } = setup();
  gt.init();
  const free0 = gt.nrFree;
  let ref = -1;
  {
    await using g = gt.grant(b, physmem.alloc(1), GTF_readonly);
    ref = g.ref;
    const op = map(hcB, a.domid, ref, true);
    t.equal(op.status, GNTST_okay);
    t.equal(unmap(hcB, op.handle), GNTST_okay);
  }
  t.equal(map(hcB, a.domid, ref, true).status, GNTST_general_error, 'revoked at scope end');
  t.equal(gt.nrFree, free0, 'and freed');
  {
    using g = gt.grant(b, physmem.alloc(1));
    ref = g.ref;
  }
  t.equal(gt.nrFree, free0);
});

type Cmd = { op: 'alloc' } | { op: 'free'; i: number } | { op: 'grant'; i: number } | { op: 'quarantine'; i: number };

t.test('property: random alloc/free/grant/quarantine keeps refs unique, never reserved or quarantined', async (t) => {
  const cmd: fc.Arbitrary<Cmd> = fc.oneof(
    { weight: 10, arbitrary: fc.constant<Cmd>({ op: 'alloc' }) },
    { weight: 3, arbitrary: fc.nat(5000).map((i): Cmd => ({ op: 'free', i })) },
    { weight: 2, arbitrary: fc.nat(5000).map((i): Cmd => ({ op: 'grant', i })) },
    { weight: 1, arbitrary: fc.nat(5000).map((i): Cmd => ({ op: 'quarantine', i })) },
  );
  let grew = 0;
  let full = 0;
  fc.assert(
    fc.property(fc.array(cmd, { minLength: 1000, maxLength: 4000, size: 'max' }), (cmds) => {
      const { gt, physmem, hcB, b, a } = setup(2);
      gt.init();
      const page = physmem.alloc(1);
      const held = new Set<number>();
      const quarantined = new Set<number>();
      for (const c of cmds) {
        const pick = (i: number): number | undefined => [...held][i % Math.max(1, held.size)];
        if (c.op === 'alloc') {
          let ref: number;
          try {
            ref = gt.alloc();
          } catch (err) {
            if ((err as XenError).code !== 'ENOSPC') throw err;
            if (held.size + quarantined.size !== 2 * EPF - GNTTAB_NR_RESERVED_ENTRIES) return false;
            full++;
            continue;
          }
          if (held.has(ref) || quarantined.has(ref) || ref < GNTTAB_NR_RESERVED_ENTRIES) return false;
          held.add(ref);
        } else {
          const ref = pick(c.i);
          if (ref === undefined) continue;
          if (c.op === 'free') {
            gt.free(ref);
            held.delete(ref);
          } else if (c.op === 'grant') {
            gt.enter(ref, b, page, GTF_readonly);
            if (!gt.tryRemove(ref)) return false;
          } else {
            gt.enter(ref, b, physmem.alloc(1), GTF_readonly);
            map(hcB, a.domid, ref, true);
            if (code(() => gt.removeNow(ref)) !== 'EBUSY') return false;
            gt.free(ref); // what unwind code does after a failed remove: the quarantine keeps it
            held.delete(ref);
            quarantined.add(ref);
          }
        }
      }
      if (gt.frames.nrFrames > 1) grew++;
      return gt.quarantined === quarantined.size;
    }),
    { numRuns: 40 },
  );
  t.ok(grew > 0 && full > 0, `runs grew the table (${grew}) and reached ENOSPC (${full} times)`);
});
