// XSA-396: a frontend that revokes a grant its backend still maps, and then
// reuses the page, hands the backend a window into whatever the page holds
// next. The guest side must never reuse such a page: the revoke fails, the
// ref and the page go to quarantine, and the allocator never sees the page.

import t from 'tap';

import { GNTMAP_host_map, GNTTABOP_map_grant_ref, GNTTABOP_unmap_grant_ref, GNTST_okay } from '../../lib/abi/grant_table.js';
import { __HYPERVISOR_grant_table_op } from '../../lib/abi/xen.js';
import { BUS_DMA_READ, busDmaDomid, XenDmaTag } from '../../lib/busdma/busdma.js';
import { XenError } from '../../lib/errors.js';
import { GrantTable } from '../../lib/gnttab/gnttab.js';
import { Host } from '../../lib/hypervisor/host.js';
import type { gnttab_map_grant_ref } from '../../lib/hypervisor/hypercall.js';
import { PAGE_SIZE, writablePage } from '../../lib/hypervisor/page.js';
import { PhysMem } from '../../lib/xen/physmem.js';

t.test('a page the backend still maps at unload is never handed out again', async (t) => {
  const host = new Host();
  const front = host.domain(host.createDomain({ name: 'front', memoryMiB: 4 }).domid);
  const back = host.createDomain({ name: 'back', memoryMiB: 4 }).domid;
  const hcBack = host.hv.entry(back);
  const physmem = new PhysMem(front.mem, front.specialBase);
  const gt = new GrantTable(host.hv.entry(front.domid), front.mem, physmem, 'front', { removeRetries: 2, removeWaitMs: 1 });
  gt.init();
  const tag = new XenDmaTag(gt, physmem, 'front');

  const rx = tag.dmamemAlloc(PAGE_SIZE, PAGE_SIZE, 0, 1, 0);
  const gfn = rx[0]!.ds_addr / PAGE_SIZE;
  const map = tag.dmamapCreate(PAGE_SIZE, 1, PAGE_SIZE, 0, 0);
  tag.dmamapLoadRaw(map, rx, PAGE_SIZE, BUS_DMA_READ | busDmaDomid(back));
  const op: gnttab_map_grant_ref = {
    host_addr: 0n, flags: GNTMAP_host_map, ref: map.dm_segs[0]!.ds_addr, dom: front.domid,
    status: 0, handle: 0, dev_bus_addr: 0n, page: null,
  };
  hcBack(__HYPERVISOR_grant_table_op, GNTTABOP_map_grant_ref, op);
  t.equal(op.status, GNTST_okay);

  // The frontend tears down while the backend keeps its mapping.
  const err = await tag.dmamapUnload(map).then(() => null, (e: unknown) => e);
  t.ok(err instanceof XenError && err.code === 'EBUSY', 'unload reports the held segment');
  tag.dmamapDestroy(map);
  tag.dmamemFree(rx);
  t.ok(tag.isQuarantined(gfn * PAGE_SIZE));

  // Whatever the frontend allocates next, the backend cannot reach it.
  const pages = new Set<number>();
  for (;;) {
    try {
      pages.add(physmem.alloc(1));
    } catch {
      break;
    }
  }
  t.notOk(pages.has(gfn), 'the allocator never hands out the quarantined page');
  writablePage(op.page).store32(0, 0x41414141);
  for (const g of pages) {
    if (front.mem.u32[(g * PAGE_SIZE) / 4] === 0x41414141) t.fail(`backend write reached page ${g}`);
  }
  const unmap = { host_addr: 0n, dev_bus_addr: 0n, handle: op.handle, status: 0 };
  hcBack(__HYPERVISOR_grant_table_op, GNTTABOP_unmap_grant_ref, unmap);
  t.equal(unmap.status, GNTST_okay);
});
