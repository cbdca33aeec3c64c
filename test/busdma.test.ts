// lib/busdma: the generic tag over the page allocator, and the Xen tag whose
// segments carry grant refs that another domain maps with the real hypervisor.

import t from 'tap';
import { map, unmap, code, rejection } from './fixtures/grants.js';

import {
  GNTST_okay,
  GNTST_general_error,
} from '../lib/abi/grant_table.js';
import { __HYPERVISOR_grant_table_op } from '../lib/abi/xen.js';
import {
  BUS_DMA_NOWAIT,
  BUS_DMA_READ,
  BUS_DMA_WRITE,
  BUS_DMASYNC_POSTREAD,
  BUS_DMASYNC_PREREAD,
  BUS_DMASYNC_PREWRITE,
  BusDma,
  busDmaDomid,
  XenDmaTag,
  type DmaMap,
} from '../lib/busdma/busdma.js';
import { GrantTable } from '../lib/gnttab/gnttab.js';
import { Host } from '../lib/hypervisor/host.js';
import { PAGE_SIZE, writablePage } from '../lib/hypervisor/page.js';
import { PhysMem } from '../lib/xen/physmem.js';

function setup(maxGrantFrames = 4) {
  const host = new Host();
  const a = host.createDomain({ name: 'a', memoryMiB: 4, maxGrantFrames });
  const b = host.createDomain({ name: 'b', memoryMiB: 4 });
  const da = host.domain(a.domid);
  const physmem = new PhysMem(da.mem, da.specialBase);
  const gt = new GrantTable(host.hv.entry(a.domid), da.mem, physmem, 'a', { removeRetries: 2, removeWaitMs: 1, removeMaxWaitMs: 2 });
  gt.init();
  const dma = new BusDma(physmem, 'a');
  const xen = new XenDmaTag(gt, physmem, 'a');
  return { host, a: da, physmem, gt, dma, xen, hcB: host.hv.entry(b.domid), b: b.domid };
}





function segs(m: DmaMap): [number, number][] {
  return m.dm_segs.slice(0, m.dm_nsegs).map((s) => [s.ds_addr, s.ds_len]);
}

t.test('dmamem: multi-page alloc, alignment, boundary, nsegs, map and free', async (t) => {
  const { dma, physmem, a } = setup();
  const free0 = physmem.freePages;
  const s1 = dma.dmamemAlloc(3 * PAGE_SIZE - 100, PAGE_SIZE, 0, 1, BUS_DMA_NOWAIT);
  t.equal(s1.length, 1);
  t.equal(s1[0]!.ds_len, 3 * PAGE_SIZE, 'whole pages');
  t.equal(s1[0]!.ds_addr % PAGE_SIZE, 0);
  t.equal(physmem.freePages, free0 - 3);
  const kva = dma.dmamemMap(s1, 3 * PAGE_SIZE, 0);
  const data = Uint8Array.from({ length: 6000 }, (_, i) => i & 0xff);
  kva.write(2000, data);
  t.equal(a.mem.u8[s1[0]!.ds_addr + 2000 + 4095], 4095 & 0xff, 'kva writes guest memory');
  const back = new Uint8Array(6000);
  kva.read(2000, back);
  t.same(back, data);
  t.equal(kva.bytes(0, 3 * PAGE_SIZE).length, 3 * PAGE_SIZE, 'one run, one view');
  t.equal(kva.paddr(5000), s1[0]!.ds_addr + 5000);
  dma.dmamemUnmap(kva);
  t.equal(code(() => kva.paddr(0)), 'EFAULT', 'unmapped');

  const s2 = dma.dmamemAlloc(2 * PAGE_SIZE, 4 * PAGE_SIZE, 0, 1, 0);
  t.equal(s2[0]!.ds_addr % (4 * PAGE_SIZE), 0, 'aligned');
  const s3 = dma.dmamemAlloc(2 * PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE, 1, 0);
  t.equal(s3.length, 1);
  t.equal(Math.floor(s3[0]!.ds_addr / (2 * PAGE_SIZE)), Math.floor((s3[0]!.ds_addr + s3[0]!.ds_len - 1) / (2 * PAGE_SIZE)), 'no boundary crossed');
  const s4 = dma.dmamemAlloc(4 * PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE, 4, 0);
  t.ok(s4.every((s) => s.ds_len <= 2 * PAGE_SIZE && Math.floor(s.ds_addr / 8192) === Math.floor((s.ds_addr + s.ds_len - 1) / 8192)), 'split at the boundary');
  t.equal(code(() => dma.dmamemAlloc(4 * PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE, 1, 0)), 'EINVAL', 'cannot fit one segment');
  t.equal(code(() => dma.dmamemAlloc(PAGE_SIZE, 3, 0, 1, 0)), 'EINVAL', 'alignment not a power of two');
  t.equal(code(() => dma.dmamemAlloc(PAGE_SIZE * 10000, PAGE_SIZE, 0, 1, 0)), 'ENOMEM');
  for (const s of [s1, s2, s3, s4]) dma.dmamemFree(s);
  t.equal(physmem.freePages, free0, 'every page back');
});

t.test('dmamem falls back to several segments when memory is fragmented', async (t) => {
  const { dma, physmem } = setup();
  // Take every other page so no run of two is left.
  const held: number[] = [];
  for (;;) {
    try {
      held.push(physmem.alloc(1));
    } catch {
      break;
    }
  }
  for (let i = 0; i < 8; i += 2) physmem.free(held[i]!, 1);
  t.equal(code(() => dma.dmamemAlloc(3 * PAGE_SIZE, PAGE_SIZE, 0, 1, 0)), 'ENOMEM', 'no run of three');
  const s = dma.dmamemAlloc(3 * PAGE_SIZE, PAGE_SIZE, 0, 4, 0);
  t.equal(s.length, 3);
  t.equal(code(() => dma.dmamemAlloc(2 * PAGE_SIZE, PAGE_SIZE, 0, 1, 0)), 'ENOMEM');
  dma.dmamemFree(s);
  const kva = dma.dmamemMap(s, 3 * PAGE_SIZE, 0);
  t.equal(code(() => kva.bytes(PAGE_SIZE - 8, 16)), 'EFAULT', 'a view cannot span segments');
});

t.test('load and unload a multi-page buffer: page walk, joins, maxsegsz, boundary, nsegments', async (t) => {
  const { dma, physmem } = setup();
  const gfn = physmem.alloc(4);
  const pa = gfn * PAGE_SIZE + 100;
  const big = dma.dmamapCreate(65536, 4, 65536, 0, 0);
  dma.dmamapLoad(big, pa, 10000, BUS_DMA_WRITE);
  t.same(segs(big), [[pa, 10000]], 'contiguous pages join into one segment');
  t.equal(big.dm_mapsize, 10000);
  t.equal(code(() => dma.dmamapLoad(big, pa, 10, 0)), 'EBUSY', 'already loaded');
  t.equal(code(() => dma.dmamapDestroy(big)), 'EBUSY', 'destroy of a loaded map');
  await dma.dmamapUnload(big);
  t.equal(big.dm_nsegs, 0);
  const paged = dma.dmamapCreate(65536, 4, PAGE_SIZE, 0, 0);
  dma.dmamapLoad(paged, pa, 10000, 0);
  t.same(segs(paged), [[pa, 3996], [pa + 3996, 4096], [pa + 8092, 1908]], 'maxsegsz of a page');
  t.equal(paged.dm_segs[1]!.ds_offset, 0);
  t.equal(paged.dm_segs[0]!.ds_offset, 100);
  await dma.dmamapUnload(paged);
  const bounded = dma.dmamapCreate(65536, 4, 65536, 8192, 0);
  dma.dmamapLoad(bounded, pa, 10000, 0);
  t.same(segs(bounded), [[pa, 8092], [pa + 8092, 1908]], 'split at the 8 KiB boundary');
  await dma.dmamapUnload(bounded);
  const small = dma.dmamapCreate(65536, 16, 1000, 0, 0);
  dma.dmamapLoad(small, pa, 2500, 0);
  t.same(segs(small), [[pa, 1000], [pa + 1000, 1000], [pa + 2000, 500]], 'maxsegsz below a page');
  await dma.dmamapUnload(small);
  const two = dma.dmamapCreate(65536, 2, PAGE_SIZE, 0, 0);
  t.equal(code(() => dma.dmamapLoad(two, pa, 10000, 0)), 'EFBIG', 'three segments into two');
  t.equal(two.dm_nsegs, 0, 'a failed load leaves the map unloaded');
  dma.dmamapLoad(two, pa, 5000, 0);
  t.equal(two.dm_nsegs, 2, 'and usable');
  await dma.dmamapUnload(two);
  t.equal(code(() => dma.dmamapLoad(two, pa, 70000, 0)), 'EINVAL', 'longer than the map');
  t.equal(code(() => dma.dmamapLoad(two, 4 * 1024 * 1024 - 10, 100, 0)), 'EFAULT', 'outside memory');
  t.equal(code(() => dma.dmamapLoad(two, pa, 10, BUS_DMA_READ | BUS_DMA_WRITE)), 'EINVAL', 'both directions');
  dma.dmamapDestroy(two);
  dma.dmamapDestroy(two);
  t.equal(code(() => dma.dmamapLoad(two, pa, 10, 0)), 'EINVAL', 'destroyed');
  t.equal(code(() => dma.dmamapCreate(100, 0, 100, 0, 0)), 'EINVAL', 'no segments');
  t.equal(code(() => dma.dmamapCreate(100, 1, 100, 3000, 0)), 'EINVAL', 'boundary not a power of two');
});

t.test('load a chain, and raw dmamem segments', async (t) => {
  const { dma, physmem } = setup();
  const p = physmem.alloc(2) * PAGE_SIZE;
  const q = physmem.alloc(1) * PAGE_SIZE;
  const m = dma.dmamapCreate(16384, 4, PAGE_SIZE, 0, 0);
  dma.dmamapLoadChain(m, [{ paddr: p + 10, len: 100 }, { paddr: p + 110, len: 50 }, { paddr: q + 8, len: 0 }, { paddr: q + 16, len: 64 }], BUS_DMA_WRITE);
  t.same(segs(m), [[p + 10, 150], [q + 16, 64]], 'adjacent pieces join, a gap starts a segment, empty pieces vanish');
  t.equal(m.dm_mapsize, 214);
  await dma.dmamapUnload(m);
  dma.dmamapLoadChain(m, [{ paddr: p + 4000, len: 200 }, { paddr: q, len: 10 }], 0);
  t.same(segs(m), [[p + 4000, 200], [q, 10]], 'a piece over two contiguous pages stays whole');
  await dma.dmamapUnload(m);
  const paged = dma.dmamapCreate(16384, 4, PAGE_SIZE, PAGE_SIZE, 0);
  dma.dmamapLoadChain(paged, [{ paddr: p + 4000, len: 200 }, { paddr: q, len: 10 }], 0);
  t.same(segs(paged), [[p + 4000, 96], [p + 4096, 104], [q, 10]], 'with a page boundary it splits');
  await dma.dmamapUnload(paged);
  t.equal(code(() => dma.dmamapLoadChain(m, [{ paddr: p, len: 4096 }, { paddr: q, len: 4096 }, { paddr: p + 8192, len: 4096 }, { paddr: q + 4096, len: 10 }, { paddr: p, len: 1 }], 0)), 'EFBIG');
  const mem = dma.dmamemAlloc(3 * PAGE_SIZE, PAGE_SIZE, 0, 1, 0);
  dma.dmamapLoadRaw(m, mem, 2 * PAGE_SIZE + 5, 0);
  t.same(segs(m), [[mem[0]!.ds_addr, 4096], [mem[0]!.ds_addr + 4096, 4096], [mem[0]!.ds_addr + 8192, 5]]);
  await dma.dmamapUnload(m);
});

t.test('sync checks range and direction', async (t) => {
  const { dma, physmem } = setup();
  const p = physmem.alloc(1) * PAGE_SIZE;
  const m = dma.dmamapCreate(PAGE_SIZE, 1, PAGE_SIZE, 0, 0);
  dma.dmamapLoad(m, p, 512, BUS_DMA_READ);
  t.equal(code(() => dma.dmamapSync(m, 0, 512, BUS_DMASYNC_PREREAD)), 'no error');
  t.equal(code(() => dma.dmamapSync(m, 0, 512, BUS_DMASYNC_PREWRITE)), 'EINVAL', 'write sync on a read load');
  t.equal(code(() => dma.dmamapSync(m, 256, 512, BUS_DMASYNC_POSTREAD)), 'EINVAL', 'past the loaded bytes');
  t.equal(code(() => dma.dmamapSync(m, 0, 1, 0x40)), 'EINVAL', 'unknown op');
  await dma.dmamapUnload(m);
  dma.dmamapLoad(m, p, 512, BUS_DMA_WRITE);
  t.equal(code(() => dma.dmamapSync(m, 0, 512, BUS_DMASYNC_PREWRITE)), 'no error');
  t.equal(code(() => dma.dmamapSync(m, 0, 512, BUS_DMASYNC_POSTREAD)), 'EINVAL', 'read sync on a write load');
  await dma.dmamapUnload(m);
  const other = new BusDma(physmem, 'other');
  t.equal(code(() => other.dmamapLoad(m, p, 1, 0)), 'EINVAL', 'a map of another tag');
});

t.test('Xen tag: ds_addr holds grant refs the peer maps; direction sets read-only; unload revokes; destroy frees refs', async (t) => {
  const { xen, gt, a, hcB, b, physmem } = setup();
  const free0 = gt.nrFree;
  const m = xen.dmamapCreate(65536, 4, 65536, 0, BUS_DMA_NOWAIT);
  t.equal(gt.nrFree, free0 - 4, 'a ref per segment up front');
  t.equal(m.maxSegSize, PAGE_SIZE, 'no segment may cross a page');
  const gfn = physmem.alloc(3);
  const pa = gfn * PAGE_SIZE + 300;
  for (let i = 0; i < 9000; i++) a.mem.u8[pa + i] = (i * 7) & 0xff;
  xen.dmamapLoad(m, pa, 9000, BUS_DMA_WRITE | busDmaDomid(b));
  t.equal(m.dm_nsegs, 3);
  const lens = [PAGE_SIZE - 300, PAGE_SIZE, 9000 - (PAGE_SIZE - 300) - PAGE_SIZE];
  const refs: number[] = [];
  let at = 0;
  for (let i = 0; i < m.dm_nsegs; i++) {
    const s = m.dm_segs[i]!;
    t.equal(s.ds_len, lens[i]);
    t.equal(s.ds_offset, i === 0 ? 300 : 0, 'the in-page offset is kept');
    refs.push(s.ds_addr);
    t.equal(map(hcB, a.domid, s.ds_addr, false).status, GNTST_general_error, 'BUS_DMA_WRITE: the device only reads');
    const op = map(hcB, a.domid, s.ds_addr, true);
    t.equal(op.status, GNTST_okay);
    const got = new Uint8Array(s.ds_len);
    op.page!.read(s.ds_offset, got);
    t.ok(got.every((v, k) => v === ((at + k) * 7 & 0xff)), `segment ${i} reads the right bytes`);
    at += s.ds_len;
    t.equal(unmap(hcB, op.handle), GNTST_okay);
  }
  await xen.dmamapUnload(m);
  t.equal(m.dm_nsegs, 0);
  t.same([m.dm_segs[0]!.ds_addr, m.dm_segs[1]!.ds_addr, m.dm_segs[2]!.ds_addr], [pa, gfn * PAGE_SIZE + PAGE_SIZE, gfn * PAGE_SIZE + 2 * PAGE_SIZE], 'physical addresses restored');
  for (const ref of refs) t.equal(map(hcB, a.domid, ref, true).status, GNTST_general_error, `ref ${ref} is gone`);

  xen.dmamapLoad(m, pa, 100, BUS_DMA_READ | busDmaDomid(b));
  const op = map(hcB, a.domid, m.dm_segs[0]!.ds_addr, false);
  t.equal(op.status, GNTST_okay, 'BUS_DMA_READ: the device writes');
  writablePage(op.page).write(300, Uint8Array.of(0xaa, 0xbb));
  unmap(hcB, op.handle);
  xen.dmamapSync(m, 0, 100, BUS_DMASYNC_POSTREAD);
  t.same([a.mem.u8[pa], a.mem.u8[pa + 1]], [0xaa, 0xbb]);
  await xen.dmamapUnload(m);
  xen.dmamapDestroy(m);
  t.equal(gt.nrFree, free0, 'destroy gave every ref back');
  t.equal(code(() => xen.dmamapCreate(4096, 5000, 4096, 0, 0)), 'EINVAL', 'nsegments bound');
});

t.test('Xen tag: limits, a bad peer domid, and running out of refs', async (t) => {
  const { xen, gt, physmem, b } = setup(1);
  const gfn = physmem.alloc(3);
  const m = xen.dmamapCreate(65536, 2, 65536, 0, 0);
  t.equal(code(() => xen.dmamapLoad(m, gfn * PAGE_SIZE + 1, 2 * PAGE_SIZE, busDmaDomid(b))), 'EFBIG', 'three pages touched, two segments');
  t.equal(code(() => xen.dmamapLoad(m, gfn * PAGE_SIZE, 10, 0x7ff0 * 65536)), 'EINVAL', 'a reserved domid');
  t.equal(m.dm_nsegs, 0);
  t.equal(m.dm_segs[0]!.ds_addr, gfn * PAGE_SIZE, 'a failed grant leaves the physical address');
  const free = gt.nrFree;
  t.equal(code(() => xen.dmamapCreate(PAGE_SIZE * 1000, free + 1, PAGE_SIZE, 0, 0)), 'ENOBUFS');
  t.equal(gt.nrFree, free, 'the refs taken were given back');
  const dm = new BusDma(physmem, 'x').dmamapCreate(10, 1, 10, 0, 0);
  t.equal(code(() => xen.dmamapLoad(dm, gfn * PAGE_SIZE, 10, 0)), 'EINVAL', 'a map of another tag');
  {
    using m2 = xen.dmamapCreate(4096, 1, 4096, 0, 0);
    t.equal(m2.nrSegments, 1);
  }
  t.equal(gt.nrFree, free, 'a disposed map frees its refs');
  {
    await using m3 = xen.dmamapCreate(4096, 1, 4096, 0, 0);
    xen.dmamapLoad(m3, gfn * PAGE_SIZE, 10, busDmaDomid(b));
  }
  t.equal(gt.nrFree, free, 'async dispose unloads and destroys');
});

t.test('Xen tag, XSA-396: unload while the peer maps a segment quarantines its page; dmamem keeps it out of use', async (t) => {
  const { xen, gt, a, hcB, b, physmem } = setup();
  const mem = xen.dmamemAlloc(2 * PAGE_SIZE, PAGE_SIZE, 0, 1, 0);
  const m = xen.dmamapCreate(2 * PAGE_SIZE, 2, PAGE_SIZE, 0, 0);
  xen.dmamapLoadRaw(m, mem, 2 * PAGE_SIZE, BUS_DMA_READ | busDmaDomid(b));
  const held = map(hcB, a.domid, m.dm_segs[1]!.ds_addr, false);
  t.equal(held.status, GNTST_okay);
  const oldRef = m.dm_segs[1]!.ds_addr;
  t.equal(await rejection(xen.dmamapUnload(m)), 'EBUSY');
  t.equal(m.dm_nsegs, 0, 'the map is unloaded anyway');
  const page1 = mem[0]!.ds_addr + PAGE_SIZE;
  t.equal(m.dm_segs[1]!.ds_addr, page1, 'address restored');
  t.ok(xen.isQuarantined(page1));
  t.notOk(xen.isQuarantined(mem[0]!.ds_addr));
  t.equal(gt.quarantined, 1);
  t.not(m.gm_ref[1], oldRef, 'the slot got a fresh ref');
  const before = physmem.freePages;
  xen.dmamemFree(mem);
  t.equal(physmem.freePages, before + 1, 'only the clean page went back to the allocator');
  const gfn = physmem.alloc(1);
  xen.dmamapLoad(m, gfn * PAGE_SIZE, 2 * PAGE_SIZE, BUS_DMA_WRITE | busDmaDomid(b));
  t.equal(code(() => xen.dmamapLoad(m, gfn * PAGE_SIZE, 2, 0)), 'EBUSY');
  const op = map(hcB, a.domid, m.dm_segs[1]!.ds_addr, true);
  t.equal(op.status, GNTST_okay, 'the fresh ref works');
  unmap(hcB, op.handle);
  t.equal(unmap(hcB, held.handle), GNTST_okay);
  await xen.dmamapUnload(m);
  xen.dmamapDestroy(m);
});

type Seg = { ref: number; offset: number; len: number };
type Posted = { tx: Seg[]; rx: Seg[] } | { rxBytes: number[]; unloadTx: string; unloadRx: string; refsBack: boolean; quarantined: boolean };

const kernelSource = (lib: string): string => `
import { parentPort } from 'node:worker_threads';
import { GrantTable } from '${lib}/gnttab/gnttab.js';
import { XenDmaTag, busDmaDomid, BUS_DMA_READ, BUS_DMA_WRITE, BUS_DMASYNC_POSTREAD, BUS_DMASYNC_PREWRITE } from '${lib}/busdma/busdma.js';
import { PhysMem } from '${lib}/xen/physmem.js';
const segsOf = (m) => m.dm_segs.slice(0, m.dm_nsegs).map((s) => ({ ref: s.ds_addr, offset: s.ds_offset, len: s.ds_len }));
export async function main({ domid, hv, args }) {
  const self = hv.domain(domid);
  const physmem = new PhysMem(self.mem, self.specialBase);
  const gt = new GrantTable(hv.entry(domid), self.mem, physmem, 'worker', { removeRetries: 2, removeWaitMs: 1 });
  gt.init();
  const tag = new XenDmaTag(gt, physmem, 'worker');
  const free0 = gt.nrFree;
  const txMem = tag.dmamemAlloc(3 * 4096, 4096, 0, 1, 0);
  const kva = tag.dmamemMap(txMem, 3 * 4096, 0);
  kva.write(0, Uint8Array.from({ length: 3 * 4096 }, (_, i) => (i * 13 + 1) & 0xff));
  const tx = tag.dmamapCreate(3 * 4096, 3, 4096, 0, 0);
  tag.dmamapLoadRaw(tx, txMem, 10000, BUS_DMA_WRITE | busDmaDomid(args.peer));
  tag.dmamapSync(tx, 0, 10000, BUS_DMASYNC_PREWRITE);
  const rxMem = tag.dmamemAlloc(4096, 4096, 0, 1, 0);
  const rx = tag.dmamapCreate(4096, 1, 4096, 0, 0);
  tag.dmamapLoad(rx, rxMem[0].ds_addr + 64, 256, BUS_DMA_READ | busDmaDomid(args.peer));
  const done = new Promise((resolve) => parentPort.once('message', resolve));
  parentPort.postMessage({ tx: segsOf(tx), rx: segsOf(rx) });
  await done;
  tag.dmamapSync(rx, 0, 256, BUS_DMASYNC_POSTREAD);
  const rxBytes = [...self.mem.u8.subarray(rxMem[0].ds_addr + 64, rxMem[0].ds_addr + 72)];
  const code = (p) => p.then(() => 'ok', (e) => e.code);
  const unloadRx = await code(tag.dmamapUnload(rx));
  const unloadTx = await code(tag.dmamapUnload(tx));
  const quarantined = tag.isQuarantined(txMem[0].ds_addr + 4096);
  tag.dmamapDestroy(rx);
  tag.dmamapDestroy(tx);
  tag.dmamemFree(txMem);
  tag.dmamemFree(rxMem);
  parentPort.postMessage({ rxBytes, unloadTx, unloadRx, refsBack: gt.nrFree === free0, quarantined });
}
`;

t.test('across threads: the granting domain runs in a worker, the test thread maps its grants', async (t) => {
  const inbox: Posted[] = [];
  let wake: (() => void) | null = null;
  let failure: Error | null = null;
  const host = new Host({
    onMessage: (_domid, msg) => {
      inbox.push(msg as Posted);
      wake?.();
    },
    onExit: (_domid, err) => {
      failure = err;
      wake?.();
    },
  });
  t.teardown(() => host.shutdown());
  const next = async (): Promise<Posted> => {
    while (inbox.length === 0) {
      if (failure !== null) throw failure;
      await new Promise<void>((resolve) => (wake = resolve));
    }
    return inbox.shift()!;
  };
  const a = host.createDomain({ name: 'a', memoryMiB: 4 });
  const b = host.createDomain({ name: 'b', memoryMiB: 4 });
  const hcB = host.hv.entry(b.domid);
  const lib = new URL('../lib', import.meta.url).href;
  const kernel = `data:text/javascript,${encodeURIComponent(kernelSource(lib))}`;
  host.start(a.domid, kernel, { peer: b.domid });

  const first = await next();
  if (!('tx' in first)) throw new Error('expected the segments first');
  t.equal(first.tx.length, 3);
  let at = 0;
  const handles: number[] = [];
  for (const s of first.tx) {
    const op = map(hcB, a.domid, s.ref, true);
    t.equal(op.status, GNTST_okay, `tx ref ${s.ref} maps in this thread`);
    const got = new Uint8Array(s.len);
    op.page!.read(s.offset, got);
    t.ok(got.every((v, k) => v === (((at + k) * 13 + 1) & 0xff)), 'the bytes the worker wrote');
    at += s.len;
    handles.push(op.handle);
  }
  t.equal(at, 10000);
  const rxSeg = first.rx[0]!;
  const rxOp = map(hcB, a.domid, rxSeg.ref, false);
  t.equal(rxOp.status, GNTST_okay);
  writablePage(rxOp.page).write(rxSeg.offset, Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8));
  t.equal(unmap(hcB, rxOp.handle), GNTST_okay);
  // Keep the second tx segment mapped: the worker's unload must quarantine it.
  t.equal(unmap(hcB, handles[0]!), GNTST_okay);
  t.equal(unmap(hcB, handles[2]!), GNTST_okay);
  host.post(a.domid, 'done');

  const second = await next();
  if (!('rxBytes' in second)) throw new Error('expected the results');
  t.same(second.rxBytes, [1, 2, 3, 4, 5, 6, 7, 8], 'the worker reads what this thread wrote');
  t.equal(second.unloadRx, 'ok');
  t.equal(second.unloadTx, 'EBUSY', 'a segment still mapped across threads is caught');
  t.ok(second.quarantined, 'and its page quarantined');
  t.notOk(second.refsBack, 'the quarantined ref never returns');
  t.equal(map(hcB, a.domid, first.tx[0]!.ref, true).status, GNTST_general_error, 'revoked refs are gone');
  t.equal(unmap(hcB, handles[1]!), GNTST_okay);
});
