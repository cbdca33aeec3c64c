// `xenpv fuzz backend --device xbf`: a seeded hostile block backend against a
// real xbf, the whole host in one thread. A long pass must break no
// invariant, and every malicious answer must have broken the disk; a seed
// replays exactly; and an xbf with one check taken out, or a bus_dma that
// frees a page the backend still maps (XSA-396), is caught.

import t from 'tap';
import { checkCli, checkReplay } from './fixtures/fuzz.js';
import { XbfSoftc } from '../lib/drivers/xbf/xbf.js';
import { XenDmaTag, type DmaSegment } from '../lib/busdma/busdma.js';
import { PAGE_SIZE } from '../lib/hypervisor/page.js';
import { fuzzXbf } from '../lib/fuzz/xbf.js';


t.test('50,000 seeded steps against xbf break no invariant; every malicious answer broke the disk', async (t) => {
  const r = await fuzzXbf({ seed: 20261201, steps: 50_000 });
  t.same(r.violations, [], 'no invariant broken');
  t.equal(r.steps, 50_000);
  for (const what of ['unknown id', 'id with high bits', 'duplicate', 'wrong operation', 'junk status', 'rsp_prod ahead', 'rsp_prod back', 'grant kept']) {
    t.ok((r.refusals[`broken: ${what}`] ?? 0) > 0, `"${what}" broke the disk`);
  }
  for (const action of ['serve reordered', 'hold', 'io error', 'eopnotsupp', 'storm', 'restart', 'restart keeping persistent grants', 'unplug']) {
    t.ok((r.actions[action] ?? 0) > 0, `the run included ${action}`);
  }
  for (const io of ['read', 'write', 'fua', 'flush', 'discard']) t.ok((r.actions[`io ${io}`] ?? 0) > 0, `the guest did ${io}`);
  t.ok((r.actions['io read into a buffer'] ?? 0) > 0, 'the guest read into disk.buffer() arrays');
  t.ok(Object.keys(r.actions).some((a) => /^episode order [12] queues [23] indirect 64 sector 4096/.test(a)), 'multi-page rings, queues, indirect segments, 4 KiB sectors');
  t.ok(Object.keys(r.actions).some((a) => / persistent$/.test(a)), 'persistent grants');
  t.ok((r.actions['pages still mapped by the backend'] ?? 0) > 0, 'the backend ended the run holding mappings, checked all along');
  t.ok((r.refusals.ok ?? 0) > 10_000, 'most transfers succeeded');
  t.ok((r.refusals['port throttled'] ?? 0) > 0, 'event storms got the port held masked for a while');
});

t.test('a seed replays exactly; another seed is another run', async (t) => {
  await checkReplay(t, (seed) => fuzzXbf({ seed, steps: 3000 }));
});

/** Run `fn` with one method of a class replaced, then put it back. */
async function withPatched<T extends object, K extends keyof T>(proto: T, key: K, value: T[K], fn: () => Promise<void>): Promise<void> {
  const saved = proto[key];
  proto[key] = value;
  try {
    await fn();
  } finally {
    proto[key] = saved;
  }
}

t.test('an xbf that does not break on a bad response is caught', async (t) => {
  const original = XbfSoftc.prototype.broken;
  await withPatched(XbfSoftc.prototype, 'broken', function (this: XbfSoftc, reason: string, code?: string) {
    if (code !== undefined) original.call(this, reason, code);
  }, async () => {
    const r = await fuzzXbf({ seed: 9, steps: 6000 });
    t.ok(r.violations.some((v) => /^xbf took ".*" without breaking the disk/.test(v.what)), 'a malicious answer went unnoticed');
  });
});

t.test('a bus_dma that frees a page the backend still maps is caught (XSA-396)', async (t) => {
  // The tag's own allocator, reached past `private`: this copy frees quarantined pages like any other.
  await withPatched(XenDmaTag.prototype, 'dmamemFree', function (this: XenDmaTag, segs: readonly DmaSegment[]) {
    const dma = (this as unknown as { dma: { freePage(gfn: number): void } }).dma;
    for (const s of segs) for (let off = 0; off < s.ds_len; off += PAGE_SIZE) dma.freePage((s.ds_addr + off) / PAGE_SIZE);
  }, async () => {
    const r = await fuzzXbf({ seed: 9, steps: 6000 });
    t.ok(r.violations.some((v) => /still mapped by the backend, (was freed|is granted again)/.test(v.what)), 'the page went back to the allocator');
  });
});

t.test('xenpv fuzz backend --device xbf: seed printed, JSON report', async (t) => {
  checkCli(t, ['fuzz', 'backend', '--device', 'xbf'], 500);
});
