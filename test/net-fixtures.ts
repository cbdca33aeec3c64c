// Shared by the network tests: guest images written to a temporary folder,
// configs for them, and a machine that runs them to the end.

import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine, type MachineOptions } from '../lib/machine.js';
import type { DomainExit } from '../lib/backends/toolstack.js';
import { GTF_permit_access, GTF_type_mask } from '../lib/abi/grant_table.js';
import { EVTCHNSTAT_interdomain } from '../lib/abi/event_channel.js';
import { D, MAX_EVTCHNS, MAX_MAPTRACK } from '../lib/hypervisor/domain.js';
import { PAGE_SIZE } from '../lib/hypervisor/page.js';

export const root = fileURLToPath(new URL('../..', import.meta.url));
/** Import specifiers of modules a scripted image reaches into. */
export const lib = (path: string): string => pathToFileURL(join(root, 'dist/lib', path)).href;

export function tempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** Write `<name>.mjs` and `<name>.cfg` (the given extra config lines) into `dir`; returns the cfg path. */
export function guestImage(dir: string, name: string, body: string, cfg: string, memoryMiB = 32): string {
  const image = join(dir, `${name}.mjs`);
  writeFileSync(image, body);
  const file = join(dir, `${name}.cfg`);
  writeFileSync(file, `name = "${name}"\nmemory = ${memoryMiB}\nkernel = "${image}"\n${cfg}\n`);
  return file;
}

/** Boot, create the configs in order, wait for all to end, stop; the exits in the same order. */
export async function runGuests(cfgs: string[], opts: MachineOptions = {}, during?: (m: Machine, domids: number[]) => Promise<void>): Promise<DomainExit[]> {
  const m = await Machine.boot(opts);
  try {
    const domids: number[] = [];
    for (const c of cfgs) domids.push(await m.create(loadDomainConfig(c)));
    if (during !== undefined) await during(m, domids);
    const exits: DomainExit[] = [];
    for (const d of domids) exits.push(await m.waitExit(d, AbortSignal.timeout(240_000)));
    return exits;
  } finally {
    await m.stop();
  }
}

/**
 * Image code both peers of an exchange share: wait until the peer answers a
 * hello (so no frame goes out before it listens), with a bound.
 */
export const helloCode = `
async function meet(n, peer, timeoutMs = 60000) {
  let ready = false;
  const hello = new Uint8Array(60);
  hello.set(peer, 0); hello.set(n.mac, 6); hello[12] = 0x88; hello[13] = 0xb6;
  // Byte 14: 0 asks, 1 answers. Every ask is answered, not only the first:
  // a lone answer lost while the peer's interface came up left the peer
  // asking a side that no longer listened, until its 60 s ran out.
  const answer = hello.slice(); answer[14] = 1;
  const off = n.onFrame((f) => {
    if (f[12] !== 0x88 || f[13] !== 0xb6) return;
    ready = true;
    if (f[14] === 0) void n.send(answer).catch(() => {});
  });
  const until = Date.now() + timeoutMs;
  while (!ready) {
    if (Date.now() > until) throw new Error('peer never answered');
    await n.send(hello);
    await new Promise((r) => setTimeout(r, 20));
  }
  return off;
}
`;

/** Image code that puts raw netif requests on an xnf queue's rings, as a hostile frontend would. */
// Guest-side: words(seq, out) fills a Uint32Array with frame seq's payload; same(seq, got) checks one.
export const payloadCode = `
function words(seq, out) {
  let x = (Math.imul(seq, 2654435761) + 1) >>> 0 || 1;
  for (let i = 0; i < out.length; i++) { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; out[i] = x; }
}
function same(seq, got) {
  let x = (Math.imul(seq, 2654435761) + 1) >>> 0 || 1;
  for (let i = 0; i < got.length; i++) { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; if (got[i] !== x) return false; }
  return true;
}
`;

export const rawFrontCode = `
function txRaw(q, reqs) {
  const b = new Uint8Array(12), v = new DataView(b.buffer);
  for (const r of reqs) {
    b.fill(0);
    if (r.extra !== undefined) { b[0] = r.extra; b[1] = r.flags ?? 0; v.setUint16(2, r.size ?? 0, true); b[4] = r.gsoType ?? 0; }
    else { v.setUint32(0, r.gref, true); v.setUint16(4, r.offset ?? 0, true); v.setUint16(6, r.flags ?? 0, true); v.setUint16(8, r.id ?? 0, true); v.setUint16(10, r.size, true); }
    q.tx.ring.putRequest(b);
  }
  q.tx.ring.pushRequests();
}
function gref(q, id) { return q.txBufs[id].map.dm_segs[0].ds_addr; }
/** The backend's state once it reached \`want\` (or the bound passed), after the link followed it down. */
async function backendState(guest, x, want, timeoutMs = 20000) {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const s = Number(await guest.xenstore.read(x.dev.backend + '/state').catch(() => '6'));
    if ((s >= want && !x.up) || Date.now() > until) return s;
    await new Promise((r) => setTimeout(r, 20));
  }
}
`;

/** Image code that builds a UDP/IPv4 frame (the IP header checksum filled, the UDP one left 0 when `blank`). */
export const udpFrameCode = `
function udpFrame(dstMac, srcMac, srcIp, dstIp, sport, dport, payload) {
  const f = new Uint8Array(42 + payload.length);
  f.set(dstMac, 0); f.set(srcMac, 6); f[12] = 0x08; f[13] = 0x00;
  const total = 28 + payload.length;
  f[14] = 0x45; f[16] = total >> 8; f[17] = total & 255; f[22] = 64; f[23] = 17;
  f.set(srcIp, 26); f.set(dstIp, 30);
  let s = 0;
  for (let i = 14; i < 34; i += 2) s += (f[i] << 8) | f[i + 1];
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  s = ~s & 0xffff; f[24] = s >> 8; f[25] = s & 255;
  f[34] = sport >> 8; f[35] = sport & 255; f[36] = dport >> 8; f[37] = dport & 255;
  f[38] = (8 + payload.length) >> 8; f[39] = (8 + payload.length) & 255;
  f.set(payload, 42);
  return f;
}
`;

/**
 * What a domain holds toward dom0, read straight from the hypervisor's
 * state: its grant entries that permit access to dom0, its ports bound to
 * dom0, and dom0's mappings of its grants.
 */
export function heldByDom0(m: Machine, domid: number): { grants: number; ports: number; mappings: number } {
  const d = m.host.hv.domain(domid)!;
  const dom0 = m.host.hv.domain(0)!;
  let grants = 0;
  for (let f = 0; f < Atomics.load(d.ctl, D.nrGrantFrames); f++) {
    const base = (d.ctl[D.grantFrames + f] ?? 0) * PAGE_SIZE;
    for (let e = 0; e < PAGE_SIZE / 8; e++) {
      const word = Atomics.load(d.mem.u32, (base + e * 8) >> 2);
      if ((word & GTF_type_mask) === GTF_permit_access && word >>> 16 === 0) grants++;
    }
  }
  let ports = 0;
  for (let p = 1; p < MAX_EVTCHNS; p++) {
    if (Atomics.load(d.ctl, D.evtchns + p * 4) === EVTCHNSTAT_interdomain && d.ctl[D.evtchns + p * 4 + 1] === 0) ports++;
  }
  let mappings = 0;
  for (let h = 0; h < MAX_MAPTRACK; h++) {
    const w = D.maptrack + h * 4;
    if ((Atomics.load(dom0.ctl, w) & ~(1 << 30)) !== 0 && dom0.ctl[w + 1] === domid) mappings++;
  }
  return { grants, ports, mappings };
}
