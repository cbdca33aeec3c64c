// xenstore throughput: reads/s and writes/s by a guest over its ring (one
// request in flight, as a driver's xs_cmd does) and reads/s by a dom0 tool
// over xenstored's unix socket. Median of 3 runs; prints a table and writes
// JSON {metrics: [{name, value, unit, runs}]} to dist/bench/xenstore.json
// (or the path given as the first argument).

import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { createConnection, type Socket } from 'node:net';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { XS_READ, XS_WRITE } from '../lib/abi/xs_wire.js';
import { Machine } from '../lib/machine.js';
import { XsDecoder, encodeMessage, joinStrings, joinWrite } from '../lib/xenstore/wire.js';

const RUNS = 3;
const RUN_MS = 1000;

type Metric = { name: string; value: number; unit: string; runs: number[] };

const GUEST = `export async function main(guest) {
  const xs = guest.xenstore;
  await xs.write('data/bench', 'x'.repeat(64));
  const time = async (op) => {
    const end = performance.now() + ${RUN_MS};
    let n = 0;
    while (performance.now() < end) { for (let i = 0; i < 64; i++) await op(i); n += 64; }
    return n / (${RUN_MS} / 1000);
  };
  const reads = await time(() => xs.read('data/bench'));
  const writes = await time((i) => xs.write('data/bench', String(i)));
  console.log('BENCH ' + JSON.stringify({ reads, writes }));
}
`;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? 0;
}

async function ringRun(m: Machine, cfg: string): Promise<{ reads: number; writes: number }> {
  const exit = await m.waitExit(await m.create(loadDomainConfig(cfg)), AbortSignal.timeout(30_000));
  const line = /BENCH (.*)/.exec(exit.console)?.[1];
  if (exit.reason !== 'poweroff' || line === undefined) throw new Error(`bench guest: ${exit.reason}\n${exit.console}`);
  return JSON.parse(line) as { reads: number; writes: number };
}

/** One request at a time over the socket, as libxenstore's xs_read and xs_write do. */
async function socketRun(path: string, type: number): Promise<number> {
  const sock: Socket = await new Promise((resolve, reject) => {
    const s = createConnection(path, () => resolve(s));
    s.once('error', reject);
  });
  const payload = type === XS_READ ? joinStrings(['/tool/bench']) : joinWrite('/tool/bench', 'y'.repeat(64));
  const req = encodeMessage({ type, req_id: 1, tx_id: 0, payload });
  const decoder = new XsDecoder();
  const end = performance.now() + RUN_MS;
  let n = -1; // the first reply answers the setup write
  sock.write(encodeMessage({ type: XS_WRITE, req_id: 0, tx_id: 0, payload: joinWrite('/tool/bench', 'x'.repeat(64)) }));
  await new Promise<void>((resolve) => {
    sock.on('data', (b: Buffer) => {
      n += decoder.feed(b).length;
      if (performance.now() < end) sock.write(req);
      else resolve();
    });
    sock.write(req);
  });
  n = Math.max(n, 0);
  sock.destroy();
  return n / (RUN_MS / 1000);
}

async function main(): Promise<void> {
  const out = process.argv[2] ?? join('dist', 'bench', 'xenstore.json');
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-bench-'));
  writeFileSync(join(dir, 'bench.mjs'), GUEST);
  const cfg = join(dir, 'bench.cfg');
  writeFileSync(cfg, `name = "xsbench"\nmemory = 8\nkernel = "bench.mjs"\n`);
  const m = await Machine.boot({ rundir: dir });
  const ring: { reads: number; writes: number }[] = [];
  const socket: number[] = [];
  const socketWrites: number[] = [];
  try {
    for (let i = 0; i < RUNS; i++) ring.push(await ringRun(m, cfg));
    for (let i = 0; i < RUNS; i++) socket.push(await socketRun(m.socketPath!, XS_READ));
    for (let i = 0; i < RUNS; i++) socketWrites.push(await socketRun(m.socketPath!, XS_WRITE));
  } finally {
    await m.stop();
  }
  const metric = (name: string, runs: number[]): Metric => ({ name, value: Math.round(median(runs)), unit: 'ops/s', runs: runs.map(Math.round) });
  const metrics = [
    metric('xenstore.ring.read.ops', ring.map((r) => r.reads)),
    metric('xenstore.ring.write.ops', ring.map((r) => r.writes)),
    metric('xenstore.socket.read.ops', socket),
    metric('xenstore.socket.write.ops', socketWrites),
  ];
  process.stdout.write(`xenstore bench: ${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, node ${process.version}, median of ${RUNS} runs of ${RUN_MS} ms\n`);
  for (const x of metrics) process.stdout.write(`${x.name.padEnd(28)} ${String(x.value).padStart(9)} ${x.unit}   runs ${x.runs.join(' ')}\n`);
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify({ metrics }, null, 2) + '\n');
}

await main();
