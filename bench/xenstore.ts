// xenstore throughput: reads/s and writes/s by a guest over its ring, and
// reads/s by a dom0 tool over xenstored's unix socket. Both clients keep
// many requests outstanding, as a driver reading its backend's nodes does:
// the guest runs CALLERS concurrent loops of xs.read (its client caps what is
// on the ring at its maxOutstanding; the rest wait for a slot), the socket
// client keeps SOCKET_DEPTH requests in flight.

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { XS_READ, XS_WRITE } from '../lib/abi/xs_wire.js';
import { Machine } from '../lib/machine.js';
import { XsDecoder, encodeMessage, joinStrings, joinWrite } from '../lib/xenstore/wire.js';

export const CALLERS = 32;
const SOCKET_DEPTH = 16;
/** A node's value as drivers read them: a ring-ref, a state, a feature flag. */
export const VALUE = 'x'.repeat(16);

const GUEST = `export async function main(guest) {
  const xs = guest.xenstore;
  const [runs, ms, warmupMs] = guest.extra.split(',').map(Number);
  await xs.write('data/bench', ${JSON.stringify(VALUE)});
  const time = async (op, runMs = ms) => {
    let n = 0;
    const end = performance.now() + runMs;
    const caller = async () => { while (performance.now() < end) { await op(n); n++; } };
    const t0 = performance.now();
    await Promise.all(Array.from({ length: ${CALLERS} }, caller));
    return (n / (performance.now() - t0)) * 1000;
  };
  const out = { reads: [], writes: [] };
  await time(() => xs.read('data/bench'), warmupMs); // compiled code, haltpoll windows
  for (let i = 0; i < runs; i++) {
    out.reads.push(await time(() => xs.read('data/bench')));
    out.writes.push(await time((i) => xs.write('data/bench', String(i & 0xffff))));
  }
  console.log('BENCH ' + JSON.stringify(out));
}
`;

export type XenstoreResult = { ringRead: number[]; ringWrite: number[]; socketRead: number[] };

async function ringRuns(m: Machine, cfg: string, runs: number, ms: number, warmupMs: number): Promise<{ reads: number[]; writes: number[] }> {
  const spec = loadDomainConfig(cfg);
  const exit = await m.waitExit(await m.create({ ...spec, extra: `${runs},${ms},${warmupMs}` }), AbortSignal.timeout(60_000 + (runs * ms + warmupMs) * 4));
  const line = /BENCH (.*)/.exec(exit.console)?.[1];
  if (exit.reason !== 'poweroff' || line === undefined) throw new Error(`xenstore bench guest: ${exit.reason}\n${exit.console}`);
  return JSON.parse(line) as { reads: number[]; writes: number[] };
}

/** READs of one node over the socket, SOCKET_DEPTH in flight, for `ms`. */
async function socketRun(path: string, ms: number): Promise<number> {
  const sock: Socket = await new Promise((resolve, reject) => {
    const s = createConnection(path, () => resolve(s));
    s.once('error', reject);
  });
  try {
    const write = encodeMessage({ type: XS_WRITE, req_id: 0, tx_id: 0, payload: joinWrite('/tool/bench', VALUE) });
    const read = encodeMessage({ type: XS_READ, req_id: 1, tx_id: 0, payload: joinStrings(['/tool/bench']) });
    const decoder = new XsDecoder();
    let n = -1; // the first reply answers the setup write
    let t0 = 0;
    let elapsed = 0;
    await new Promise<void>((resolve, reject) => {
      sock.once('error', reject);
      sock.on('data', (b: Buffer) => {
        const got = decoder.feed(b).length;
        if (n < 0) {
          t0 = performance.now();
          sock.write(Buffer.concat(Array.from({ length: SOCKET_DEPTH }, () => read)));
          n = 0;
          return;
        }
        n += got;
        elapsed = performance.now() - t0;
        if (elapsed < ms) sock.write(got === 1 ? read : Buffer.concat(Array.from({ length: got }, () => read)));
        else resolve();
      });
      sock.write(write);
    });
    return (n / elapsed) * 1000;
  } finally {
    sock.destroy();
  }
}

/** Boot a host, run the guest's ring loops (after `warmupMs` of reads) and the socket loops `runs` times each. */
export async function xenstoreBench(runs: number, ms: number, warmupMs: number): Promise<XenstoreResult> {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-bench-xs-'));
  const m = await Machine.boot({ rundir: dir });
  try {
    writeFileSync(join(dir, 'bench.mjs'), GUEST);
    const cfg = join(dir, 'bench.cfg');
    writeFileSync(cfg, `name = "xsbench"\nmemory = 8\nkernel = "bench.mjs"\n`);
    const ring = await ringRuns(m, cfg, runs, ms, warmupMs);
    const socketRead: number[] = [];
    for (let i = 0; i < runs; i++) socketRead.push(await socketRun(m.socketPath!, ms));
    return { ringRead: ring.reads, ringWrite: ring.writes, socketRead };
  } finally {
    await m.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
