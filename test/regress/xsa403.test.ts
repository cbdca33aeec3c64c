// XSA-403: a frontend shares whole pages, so whatever else a granted page
// holds is the backend's to read. Against a backend the disk spec calls
// untrusted (`trusted` = 0), xbf must leave nothing but the I/O payload in
// any page it grants: no persistent grants, every request's pages zeroed
// around the data. The backend here maps every page granted to it (rings,
// data, indirect descriptor pages) and scans it for a canary the guest
// planted: in all of its free memory, and as the payload of earlier I/O, so
// that it sits in the very pages xbf uses for later requests. Outside the
// sectors a write carries, and anywhere in a page before a read fills it,
// the canary must never show. With a trusted backend it does: the test can
// tell.

import t from 'tap';
import { BLKIF_OP_READ, BLKIF_RSP_OKAY } from '../../lib/abi/blkif.js';
import { xbfDisks } from '../../lib/drivers/xbf/xbf.js';
import { World } from '../../lib/fuzz/world.js';
import { HostileBlkBackend, type BlkOffer } from '../../lib/fuzz/xbf.js';
import { PAGE_SIZE, pageBytes } from '../../lib/hypervisor/page.js';
import { Rng } from '../../lib/fuzz/rng.js';
import { probeDevices } from '../../lib/xen/xen.js';

const XVDB = 51728;
const SECTOR = 512;
const CANARY = Buffer.from('XSA-403 SECRET!!');
const OFFER: BlkOffer = {
  maxRingPageOrder: 1, maxQueues: 2, persistent: true, maxIndirectSegments: 64, sectorSize: SECTOR,
  flushCache: false, barrier: false, discard: false, discardSecure: false,
};

type Scan = { leaks: string[]; payload: number; requests: number; indirectPages: number; persistent: boolean };

function holdsCanary(bytes: Uint8Array, from: number, to: number): boolean {
  return to > from && Buffer.from(bytes.buffer, bytes.byteOffset + from, to - from).indexOf(CANARY) >= 0;
}

async function scanRun(trusted: boolean): Promise<Scan> {
  const out: Scan = { leaks: [], payload: 0, requests: 0, indirectPages: 0, persistent: false };
  const w = new World();
  const sc = await w.createGuest({ name: 'g', memoryMiB: 16, extra: 'xbf.max_indirect_segments=64 xbf.max_ring_page_order=1 xbf.max_queues=2' });
  // A kernel's free pages hold whatever they held last: secrets.
  const secret = new Uint8Array(PAGE_SIZE);
  for (let i = 0; i < PAGE_SIZE; i += CANARY.length) secret.set(CANARY, i);
  for (let g = 1; g < sc.physmem.ramPages; g++) if (!sc.physmem.isAllocated(g)) sc.mem.u8.set(secret, g * PAGE_SIZE);

  const b = new HostileBlkBackend(w, sc.domid, XVDB, (what) => out.leaks.push(`protocol: ${what}`));
  b.onIndirectPage = (page, used) => {
    out.indirectPages++;
    if (holdsCanary(page, 0, PAGE_SIZE)) out.leaks.push(`indirect page: canary (${used} bytes of descriptors)`);
  };
  await w.run(b.create(trusted));
  await w.run(Promise.all([b.connect(OFFER), probeDevices(sc)]));
  const x = xbfDisks(sc).find((d) => d.devid === XVDB)!;
  out.persistent = x.features.persistent;
  const disk = new Uint8Array(2048 * SECTOR);

  // The backend: map each page a request names and look before using it.
  const serve = (): void => {
    const queues = new Set<number>();
    for (const r of b.take()) {
      out.requests++;
      let pos = r.sector * SECTOR;
      for (const s of r.segs) {
        const m = b.map(s.gref, r.op === BLKIF_OP_READ)!;
        const lo = s.first * SECTOR;
        const hi = (s.last + 1) * SECTOR;
        if (r.op === BLKIF_OP_READ) {
          if (holdsCanary(m.bytes, 0, PAGE_SIZE)) out.leaks.push(`read at ${r.sector}: canary in the page before the data came`);
          m.bytes.set(disk.subarray(pos, pos + hi - lo), lo);
        } else {
          if (holdsCanary(m.bytes, 0, lo) || holdsCanary(m.bytes, hi, PAGE_SIZE)) out.leaks.push(`write at ${r.sector}: canary outside sectors ${s.first}..${s.last}`);
          if (holdsCanary(m.bytes, lo, hi)) out.payload++;
          disk.set(m.bytes.subarray(lo, hi), pos);
        }
        pos += hi - lo;
        b.done(m);
      }
      b.respond(r.queue, r.lo, r.hi, r.op, BLKIF_RSP_OKAY);
      queues.add(r.queue);
    }
    for (const q of queues) b.publish(q);
    for (const q of b.queues) for (const p of q.pages) if (holdsCanary(pageBytes(p), 0, PAGE_SIZE)) out.leaks.push(`ring of queue ${q.index}: canary`);
  };
  const io = async <T>(p: Promise<T>): Promise<T> => {
    let done = false;
    void p.finally(() => (done = true)).catch(() => undefined);
    for (let i = 0; !done; i++) {
      await w.settle();
      serve();
      if (i > 10_000) throw new Error('the transfer never finished');
    }
    return p;
  };

  // The secret goes through the disk once as payload (which the backend may see)...
  const secretData = new Uint8Array(64 * SECTOR);
  for (let i = 0; i < secretData.length; i += CANARY.length) secretData.set(CANARY, i);
  await io(x.write(0, secretData));
  await io(x.read(0, 64));
  // ...and stays in the guest's buffers while it does other I/O: small writes, reads, big writes through indirect pages.
  const rng = new Rng(403);
  const plain = (n: number): Uint8Array => new Uint8Array(n * SECTOR).fill(0x11);
  for (let i = 0; i < 300; i++) {
    const lba = rng.range(64, 2048 - 200);
    const r = rng.int(10);
    if (r < 5) await io(x.write(lba, plain(rng.range(1, 3))));
    else if (r < 8) await io(x.read(lba, rng.range(1, 24)));
    else if (r < 9) await io(x.write(lba, plain(rng.range(100, 200))));
    else await io(x.read(rng.range(0, 60), rng.range(1, 4)));
  }
  return out;
}

t.test('an untrusted backend sees nothing but payload in the pages xbf grants it', async (t) => {
  const r = await scanRun(false);
  t.equal(r.persistent, false, 'no persistent grants with an untrusted backend');
  t.ok(r.requests > 300, `${r.requests} requests scanned`);
  t.ok(r.indirectPages > 10, `${r.indirectPages} indirect pages scanned`);
  t.ok(r.payload > 0, 'the canary did pass as payload');
  t.same(r.leaks, [], 'and nowhere else');
});

t.test('a trusted backend with persistent grants does see stale data: the scan can tell', async (t) => {
  const r = await scanRun(true);
  t.equal(r.persistent, true);
  t.ok(r.leaks.some((l) => /canary outside sectors|before the data came/.test(l)), 'stale secrets around the payload');
  t.notOk(r.leaks.some((l) => /^protocol:/.test(l)), 'and no protocol problem');
});
