// The guest kernel's page allocator (uvm_pglistalloc, much reduced): a bitmap
// over the RAM range the memory map reports. Page 0 stays unused so that a
// physical address of 0 never names a real page.

import { XenError } from '../errors.js';
import { MemoryViews, PAGE_SIZE, zeroBytes } from '../hypervisor/page.js';

export class PhysMem {
  private readonly used: Uint8Array;
  private next = 1;
  freePages: number;

  constructor(
    readonly mem: MemoryViews,
    readonly ramPages: number,
  ) {
    if (ramPages > mem.nrPages || ramPages < 2) throw new XenError('EINVAL', `bad RAM size ${ramPages} pages`);
    this.used = new Uint8Array(ramPages);
    this.used[0] = 1;
    this.freePages = ramPages - 1;
  }

  /** `count` physically contiguous pages, zeroed; returns the first GFN. */
  alloc(count = 1): number {
    if (!Number.isInteger(count) || count < 1) throw new XenError('EINVAL', `bad page count ${count}`);
    const n = this.ramPages;
    for (let tries = 0, start = this.next; tries < n; tries++, start = start + 1 >= n ? 1 : start + 1) {
      if (start + count > n) continue;
      let run = 0;
      while (run < count && this.used[start + run] === 0) run++;
      if (run < count) {
        start += run;
        tries += run;
        continue;
      }
      this.used.fill(1, start, start + count);
      this.freePages -= count;
      this.next = start + count >= n ? 1 : start + count;
      zeroBytes(this.mem.u8, start * PAGE_SIZE, (start + count) * PAGE_SIZE);
      return start;
    }
    throw new XenError('ENOMEM', `no run of ${count} free pages`);
  }

  /** Whether page `gfn` is handed out (for checks that a page the peer maps is never freed). */
  isAllocated(gfn: number): boolean {
    return this.used[gfn] === 1;
  }

  free(gfn: number, count = 1): void {
    if (!Number.isInteger(gfn) || gfn < 1 || gfn + count > this.ramPages) throw new XenError('EINVAL', `bad gfn ${gfn}`);
    for (let i = gfn; i < gfn + count; i++) {
      if (this.used[i] !== 1) throw new XenError('EINVAL', `page ${i} is not allocated`);
      this.used[i] = 0;
    }
    this.freePages += count;
  }
}
