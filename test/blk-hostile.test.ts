// Both ends of the block path against a scripted hostile peer that speaks
// raw bytes on a real ring.
//
// blkback: a guest puts malformed requests on xbf's ring (xbf.rawRequest:
// the bytes as given, under a free request id) with pages it granted, or not,
// through its own bus_dma tag. Each must come back BLKIF_RSP_ERROR, and the
// disk must keep working afterwards. And a guest keeps its ring full of reads
// for 5 s while the toolstack asks dom0 for the domain list: blkback's
// serving must not keep dom0's thread.
//
// xbf: a guest attaches extra xbf units whose backend is a script in the
// same guest (a loopback driver domain: it maps the ring xbf granted to it
// and binds xbf's event channel). Each script breaks the protocol in one
// way; the unit must break with EIO and a reason, and nothing else may.

import t from 'tap';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const mod = (p: string): string => pathToFileURL(join(root, 'dist/lib', p)).href;
const dir = mkdtempSync(join(tmpdir(), 'xenpv-blk-hostile-'));

async function runGuest(name: string, image: string, disk: string): Promise<{ reason: string; console: string }> {
  writeFileSync(join(dir, `${name}.mjs`), image);
  writeFileSync(join(dir, `${name}.img`), new Uint8Array(1 << 20).map((_, i) => (i >> 9) & 0xff));
  const cfg = join(dir, `${name}.cfg`);
  writeFileSync(cfg, `name = "${name}"\nmemory = 32\nkernel = "${name}.mjs"\ndisk = [${disk}]\n`);
  const m = await Machine.boot();
  try {
    const exit = await m.waitExit(await m.create(loadDomainConfig(cfg)), AbortSignal.timeout(60_000));
    return { reason: exit.reason, console: exit.console };
  } finally {
    await m.stop();
  }
}

// blkif_request, blkif_request_indirect and blkif_request_discard as an
// x86_64 frontend lays them out (the id is filled in by rawRequest).
const requests = `
function rw(op, nseg, sector, segs) {
  const b = new Uint8Array(112), v = new DataView(b.buffer);
  b[0] = op; b[1] = nseg;
  v.setBigUint64(16, BigInt(sector), true);
  segs.forEach(([gref, first, last], i) => { v.setUint32(24 + i * 8, gref, true); b[28 + i * 8] = first; b[29 + i * 8] = last; });
  return b;
}
function indirect(indOp, nseg, sector, grefs) {
  const b = new Uint8Array(112), v = new DataView(b.buffer);
  b[0] = 6; b[1] = indOp; v.setUint16(2, nseg, true);
  v.setBigUint64(16, BigInt(sector), true);
  grefs.forEach((g, i) => v.setUint32(28 + i * 4, g, true));
  return b;
}
function discard(sector, count) {
  const b = new Uint8Array(112), v = new DataView(b.buffer);
  b[0] = 5;
  v.setBigUint64(16, BigInt(sector), true);
  v.setBigUint64(24, BigInt(count), true);
  return b;
}
`;

t.test('blkback answers every malformed request with BLKIF_RSP_ERROR and keeps serving', async (t) => {
  const image = `import { xbfDisks } from '${mod('drivers/xbf/xbf.js')}';
import { busDmaDomid, BUS_DMA_READ, BUS_DMA_WRITE } from '${mod('busdma/busdma.js')}';
${requests}
export async function main(guest) {
  const sc = guest.sc;
  const [x, y] = xbfDisks(sc);
  const dmat = sc.dmat;
  // A page granted to dom0 with the access given, and where it is.
  const grant = (domid, flags) => {
    const segs = dmat.dmamemAlloc(4096, 4096, 0, 1, 0);
    const map = dmat.dmamapCreate(4096, 1, 4096, 4096, 0);
    dmat.dmamapLoadRaw(map, segs, 4096, busDmaDomid(domid) | flags);
    return { ref: map.dm_segs[0].ds_addr, paddr: segs[0].ds_addr };
  };
  const rw0 = grant(0, BUS_DMA_READ), ro = grant(0, BUS_DMA_WRITE), other = grant(7, BUS_DMA_READ);
  const ind = grant(0, BUS_DMA_WRITE), indBad = grant(0, BUS_DMA_WRITE), indFar = grant(0, BUS_DMA_WRITE);
  const putSeg = (page, i, gref, first, last) => {
    const v = new DataView(sc.mem.u8.buffer, page.paddr + i * 8, 8);
    v.setUint32(0, gref, true); v.setUint8(4, first); v.setUint8(5, last);
  };
  putSeg(ind, 0, rw0.ref, 0, 7);
  putSeg(indBad, 0, rw0.ref, 5, 2);
  putSeg(indFar, 0, 999999, 0, 7);
  const cases = [
    ['unknown op', rw(9, 0, 0, [])],
    ['reserved op', rw(4, 0, 0, [])],
    ['too many segments', rw(0, 12, 0, [])],
    ['no segments', rw(0, 0, 0, [])],
    ['first > last', rw(0, 1, 0, [[rw0.ref, 3, 2]])],
    ['last_sect 8', rw(0, 1, 0, [[rw0.ref, 0, 8]])],
    ['past the end', rw(0, 1, 2048 - 7, [[rw0.ref, 0, 7]])],
    ["sector 2 to the 63", rw(0, 1, 2n ** 63n, [[rw0.ref, 0, 7]])],
    ['ref not granted', rw(0, 1, 0, [[100000, 0, 7]])],
    ['read into a read-only grant', rw(0, 1, 0, [[ro.ref, 0, 7]])],
    ['ref granted to domain 7', rw(1, 1, 0, [[other.ref, 0, 7]])],
    ['barrier with 12 segments', rw(2, 12, 0, [])],
    ['indirect flush', indirect(3, 1, 0, [ind.ref])],
    ['indirect no segments', indirect(0, 0, 0, [ind.ref])],
    ['indirect 257 segments', indirect(0, 257, 0, [ind.ref])],
    ['indirect 4096 segments', indirect(0, 4096, 0, [ind.ref, ind.ref, ind.ref, ind.ref, ind.ref, ind.ref, ind.ref, ind.ref])],
    ['indirect page not granted', indirect(0, 1, 0, [123456])],
    ['indirect first > last', indirect(0, 1, 0, [indBad.ref])],
    ['indirect data ref not granted', indirect(0, 1, 0, [indFar.ref])],
    ['discard past the end', discard(2000, 100)],
    ['good read', rw(0, 1, 3, [[rw0.ref, 0, 7]])],
    ['good indirect read', indirect(0, 1, 5, [ind.ref])],
    ['good barrier write', rw(2, 1, 100, [[rw0.ref, 0, 7]])],
    ['good flush', rw(3, 0, 0, [])],
  ];
  for (const [what, bytes] of cases) console.log(what + ' ' + await x.rawRequest(bytes));
  console.log('data ' + sc.mem.u8[rw0.paddr] + ' ' + sc.mem.u8[rw0.paddr + 4095]);
  console.log('barrier on memory ' + await y.rawRequest(rw(2, 1, 0, [[rw0.ref, 0, 7]])));
  // A frontend whose req_prod runs a whole ring ahead: that ring stops, dom0 and the other disk go on.
  const page = y.queues[0].ring.pages[0];
  page.store32(0, page.load32(0) + 1000);
  sc.intr.intrSignal(y.queues[0].ih);
  const [disk] = guest.disks();
  await disk.write(2047, new Uint8Array(512).fill(7));
  console.log('still serving ' + (await disk.read(2047, 1))[511] + ' ' + (await disk.read(9, 1))[0] + ' ' + (await disk.read(107, 1))[0]);
}
`;
  const exit = await runGuest('hostile-front', image, `'hostile-front.img,raw,xvda,rw', 'format=memory, vdev=xvdb, target=1M'`);
  const c = exit.console;
  t.equal(exit.reason, 'poweroff', c);
  for (const what of [
    'unknown op', 'reserved op', 'too many segments', 'no segments', 'first > last', 'last_sect 8', 'past the end', 'sector 2 to the 63',
    'ref not granted', 'read into a read-only grant', 'ref granted to domain 7', 'barrier with 12 segments', 'indirect flush',
    'indirect no segments', 'indirect 257 segments', 'indirect 4096 segments', 'indirect page not granted', 'indirect first > last',
    'indirect data ref not granted', 'discard past the end',
  ]) {
    t.match(c, new RegExp(`^${what} -1$`, 'm'), what);
  }
  t.match(c, /^good read 0$/m);
  t.match(c, /^good indirect read 0$/m);
  t.match(c, /^data 5 12$/m, "the good indirect read put sectors 5..12 in the page");
  t.match(c, /^good barrier write 0$/m);
  t.match(c, /^good flush 0$/m);
  t.match(c, /^barrier on memory -2$/m, 'storage without a cache: BLKIF_RSP_EOPNOTSUPP');
  t.match(c, /^still serving 7 9 12$/m, 'the barrier wrote sectors 5..12 at 100..107');
});

// One hostile backend per unit: `act(ctx)` runs on each event, with the ring
// page, its private consumer index, and a way to respond and notify.
const hostileBackends = `
const SLOT = 112, RING = 32;
const respond = (page, at, id, op, status) => {
  const b = new Uint8Array(16), v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(id), true); b[8] = op; v.setInt16(10, status, true);
  page.write(64 + (at % RING) * SLOT, b);
};
const reqId = (page, i) => { const b = new Uint8Array(8); page.read(64 + (i % RING) * SLOT + 8, b); return Number(new DataView(b.buffer).getBigUint64(0, true)); };
const reqGref = (page, i) => page.load32(64 + (i % RING) * SLOT + 24);
const kept = [];
const scripts = {
  // The id of a request never issued.
  'unknown id': (c, i) => { respond(c.page, c.rsp, 999, 0, 0); c.rsp++; },
  // Every request answered with the first request's id: right once, then a duplicate.
  'duplicate response': (c, i) => { if (i === 0) c.first = reqId(c.page, 0); respond(c.page, c.rsp, c.first, 0, 0); c.rsp++; },
  // WRITE for a READ.
  'wrong operation': (c, i) => { respond(c.page, c.rsp, reqId(c.page, i), 1, 0); c.rsp++; },
  'junk status': (c, i) => { respond(c.page, c.rsp, reqId(c.page, i), 0, 77); c.rsp++; },
  // rsp_prod far beyond anything requested.
  'rsp_prod jump': (c, i) => { c.rsp += 100; },
  // Answers, but keeps the data page mapped.
  'grant kept': (c, i) => { kept.push(c.map(reqGref(c.page, i))); respond(c.page, c.rsp, reqId(c.page, i), 0, 0); c.rsp++; },
};
`;

// Keeps its ring full of 4 KiB reads of a file disk for FLOOD_MS: takes the
// answers and posts again straight on the ring, in one synchronous loop (so
// xbf's own handler never runs meanwhile). Each read costs dom0 a pread and
// the guest 112 bytes of ring, so blkback is the slow side and, without a
// budget, would never find the ring empty.
const FLOOD_MS = 5000;
const BOUND_MS = 2000;

t.test('a guest that keeps its ring full does not keep dom0\'s thread: the toolstack is answered meanwhile', async (t) => {
  const image = `import { xbfDisks } from '${mod('drivers/xbf/xbf.js')}';
import { busDmaDomid, BUS_DMA_READ } from '${mod('busdma/busdma.js')}';
${requests}
export async function main(guest) {
  const sc = guest.sc;
  const [x] = xbfDisks(sc);
  const q = x.queues[0];
  const ring = q.ring;
  const segs = sc.dmat.dmamemAlloc(4096, 4096, 0, 1, 0);
  const map = sc.dmat.dmamapCreate(4096, 1, 4096, 4096, 0);
  sc.dmat.dmamapLoadRaw(map, segs, 4096, busDmaDomid(0) | BUS_DMA_READ);
  const req = rw(0, 1, 0, [[map.dm_segs[0].ds_addr, 0, 7]]);
  const v = new DataView(req.buffer);
  const rsp = new Uint8Array(16);
  let sent = 0, bad = 0;
  console.log('flooding');
  for (const end = Date.now() + ${FLOOD_MS}; Date.now() < end;) {
    ring.unconsumedResponses();
    while (ring.takeResponse(rsp)) if (rsp[10] !== 0 || rsp[11] !== 0) bad++;
    while (ring.freeRequests() > 0) {
      v.setBigUint64(8, BigInt(sent), true);
      v.setBigUint64(16, BigInt((sent * 8) % 2040), true);
      ring.putRequest(req);
      sent++;
    }
    if (ring.pushRequests()) sc.intr.intrSignal(q.ih);
  }
  console.log('flooded ' + sent + ' bad ' + bad);
}
`;
  writeFileSync(join(dir, 'flood.mjs'), image);
  writeFileSync(join(dir, 'flood.img'), new Uint8Array(1 << 20));
  const cfg = join(dir, 'flood.cfg');
  writeFileSync(cfg, `name = "flood"\nmemory = 32\nkernel = "flood.mjs"\ndisk = [ 'flood.img,raw,xvda,rw' ]\n`);
  const m = await Machine.boot();
  let worst = 0;
  let asked = 0;
  let exit: { reason: string; console: string };
  try {
    const domid = await m.create(loadDomainConfig(cfg));
    for (const end = Date.now() + FLOOD_MS + 1000; Date.now() < end; asked++) {
      const t0 = performance.now();
      await m.list();
      worst = Math.max(worst, performance.now() - t0);
      await new Promise((r) => setTimeout(r, 50));
    }
    exit = await m.waitExit(domid, AbortSignal.timeout(60_000));
  } finally {
    await m.stop();
  }
  t.equal(exit.reason, 'poweroff', exit.console);
  const got = /^flooded (\d+) bad (\d+)$/m.exec(exit.console);
  const [sent, bad] = got === null ? [0, -1] : [Number(got[1]), Number(got[2])];
  t.comment(`${sent} reads posted; dom0 answered ${asked} requests of the toolstack, the slowest in ${worst.toFixed(1)} ms`);
  t.ok(sent > 100_000, 'blkback kept serving');
  t.equal(bad, 0, 'every read answered OKAY');
  t.ok(asked >= 10, 'the toolstack kept asking');
  t.ok(worst < BOUND_MS, `each answer within ${BOUND_MS} ms`);
});

t.test('xbf breaks a disk whose backend breaks the protocol, with EIO and a reason, and nothing else', async (t) => {
  const image = `import { xbfDriver, xbfDisks } from '${mod('drivers/xbf/xbf.js')}';
import { bindInterdomain, mapGrant } from '${mod('backends/xenbus.js')}';
${hostileBackends}
async function attach(guest, unit, script) {
  const sc = guest.sc, xs = sc.xs;
  const fe = 'data/vbd/' + unit, be = 'data/hostile/' + unit;
  for (const [k, v] of [['sectors', '2048'], ['sector-size', '512'], ['info', '0'], ['state', '2']]) await xs.write(be + '/' + k, v);
  const dev = { type: 'vbd', unit: String(unit), path: fe, backend: be, backendId: sc.domid, driver: 'xbf' };
  const attaching = xbfDriver.attach(sc, dev);
  await xs.awaitState(fe + '/state', 3);
  const ring = mapGrant(sc.hypercall, sc.domid, await xs.getNumber(fe + '/ring-ref'));
  const c = { page: ring.page, req: 0, rsp: 0, map: (gref) => mapGrant(sc.hypercall, sc.domid, gref) };
  let ih = null;
  ih = bindInterdomain(sc.hypercall, sc.intr, sc.domid, await xs.getNumber(fe + '/event-channel'), () => {
    for (const prod = c.page.load32(0); c.req !== prod; c.req++) script(c, c.req);
    c.page.store32(8, c.rsp);
    sc.intr.intrSignal(ih);
  }, 'hostile' + unit);
  sc.intr.intrUnmask(ih);
  await xs.write(be + '/state', '4');
  await attaching;
  return xbfDisks(sc).find((x) => x.dev.path === fe);
}
export async function main(guest) {
  let unit = 1;
  for (const [name, script] of Object.entries(scripts)) {
    const x = await attach(guest, unit++, script);
    const two = await Promise.allSettled([x.read(0, 1), x.read(1, 1)]);
    const [a, b] = two.map((r) => (r.status === 'fulfilled' ? 'ok' : r.reason.code));
    let again;
    try { await x.read(2, 1); again = 'ok'; } catch (err) { again = err.code; }
    console.log(name + ': ' + a + ' ' + b + ' ' + again + ' ' + x.state + ' ' + (x.error ? x.error.code : '-') + ' | ' + (x.error ? x.error.message : ''));
  }
  const disk = guest.disks().find((d) => d.path === 'device/vbd/51712');
  await disk.write(3, new Uint8Array(512).fill(4));
  console.log('real disk ' + (await disk.read(3, 1))[100] + ' ' + (await disk.read(9, 1))[0]);
}
`;
  const exit = await runGuest('hostile-back', image, `'hostile-back.img,raw,xvda,rw'`);
  const c = exit.console;
  t.equal(exit.reason, 'poweroff', c);
  t.match(c, /^unknown id: EIO EIO EIO broken EIO \| .*response for id 999, which is not outstanding$/m);
  t.match(c, /^duplicate response: ok EIO EIO broken EIO \| .*which is not outstanding$/m, 'the first answer completes a read');
  t.match(c, /^wrong operation: EIO EIO EIO broken EIO \| .*has operation 1, the request 0$/m);
  t.match(c, /^junk status: EIO EIO EIO broken EIO \| .*unknown status 77$/m);
  t.match(c, /^rsp_prod jump: EIO EIO EIO broken EIO \| .*rsp_prod \d+ outside \[0, [12]\]$/m);
  t.match(c, /^grant kept: EIO EIO EIO broken EIO \| .*still maps the pages of id \d+ after answering it$/m);
  t.match(c, /^real disk 4 9$/m, 'the real disk works on');
});
