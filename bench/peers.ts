// What a Node program would use instead of xenpv, measured in the same run:
// MessagePort.postMessage between two workers, and random 4 KiB reads of
// the very file the file-backed disk serves, by fs.readSync and by fio.
//
// This module is also the MessagePort workers' entry.

import { execFile } from 'node:child_process';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { MessageChannel, Worker, isMainThread, parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';

/** Messages (or batches) the sender may have unacknowledged: bounds the receiver's queue. */
const WINDOW = 256;
const ACK_EVERY = 64;

type PortWork = { kind: 'port'; role: 'sender' | 'receiver'; port: MessagePort; size: number; batch: number; durationMs: number };

export type PortResult = { packets: number; elapsedMs: number; gbps: number };

function sender(w: PortWork): void {
  const pkt = new Uint8Array(w.size);
  // Distinct arrays: the structured clone would send one array listed 64 times only once.
  const batch = Array.from({ length: w.batch }, () => new Uint8Array(w.size));
  const nap = new Int32Array(new SharedArrayBuffer(4));
  const end = performance.now() + w.durationMs;
  let sent = 0;
  let acked = 0;
  for (let n = 0; ; n++) {
    if ((n & 63) === 0 && performance.now() >= end) break;
    while (sent - acked >= WINDOW) {
      const m = receiveMessageOnPort(w.port);
      if (m === undefined) Atomics.wait(nap, 0, 0, 0.01);
      else acked = m.message as number;
    }
    pkt[0] = n & 0xff;
    // postMessage copies a Uint8Array that is not transferred: the copy under test.
    if (w.batch === 1) w.port.postMessage(pkt);
    else w.port.postMessage(batch);
    sent++;
  }
  w.port.postMessage(null);
}

function receiver(w: PortWork): Promise<PortResult> {
  return new Promise((resolve) => {
    let t0 = 0;
    let messages = 0;
    let packets = 0;
    w.port.on('message', (m: Uint8Array | Uint8Array[] | null) => {
      if (m === null) {
        const elapsedMs = performance.now() - t0;
        w.port.close();
        resolve({ packets, elapsedMs, gbps: (packets * w.size * 8) / (elapsedMs / 1000) / 1e9 });
        return;
      }
      if (t0 === 0) t0 = performance.now();
      packets += Array.isArray(m) ? m.length : 1;
      if (++messages % ACK_EVERY === 0) w.port.postMessage(messages);
    });
  });
}

function runWorker(work: PortWork): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const w = new Worker(new URL(import.meta.url), { workerData: work, transferList: [work.port] });
    w.once('message', resolve);
    w.once('error', reject);
  });
}

/** peer.messageport: `batch` copied Uint8Arrays of `size` bytes per postMessage, sender and receiver in two workers. */
export async function messagePort(size: number, batch: number, durationMs: number): Promise<PortResult> {
  const { port1, port2 } = new MessageChannel();
  const rx = runWorker({ kind: 'port', role: 'receiver', port: port2, size, batch, durationMs });
  const tx = runWorker({ kind: 'port', role: 'sender', port: port1, size, batch, durationMs });
  const [r] = await Promise.all([rx, tx]);
  return r as PortResult;
}

/** A page-cached file of `sizeBytes` with data (not holes) in every block; read once to warm the cache. */
export function makeDataFile(path: string, sizeBytes: number): void {
  const fd = openSync(path, 'w');
  try {
    const chunk = new Uint8Array(1 << 20);
    for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131 + 7) & 0xff;
    for (let at = 0; at < sizeBytes; at += chunk.length) writeSync(fd, chunk, 0, Math.min(chunk.length, sizeBytes - at), at);
  } finally {
    closeSync(fd);
  }
}

/** A xorshift generator: the same offsets every run, no allocation. */
export function xorshift(seed: number): () => number {
  let x = seed | 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

/** peer.fs.readsync.randread4k: fs.readSync of aligned 4 KiB blocks at random into one buffer. */
export function readSyncRandom(path: string, sizeBytes: number, durationMs: number): number {
  const fd = openSync(path, 'r');
  try {
    const buf = new Uint8Array(4096);
    const blocks = Math.floor(sizeBytes / 4096);
    const next = xorshift(12345);
    let n = 0;
    const t0 = performance.now();
    let t = t0;
    while (t - t0 < durationMs) {
      for (let i = 0; i < 256; i++) readSync(fd, buf, 0, 4096, (next() % blocks) * 4096);
      n += 256;
      t = performance.now();
    }
    return (n / (t - t0)) * 1000;
  } finally {
    closeSync(fd);
  }
}

/** fio's random 4 KiB read IOPS on `path`, or null when fio is not installed. */
export function fioRandRead(path: string, engine: 'psync' | 'libaio', iodepth: number, durationMs: number): Promise<number | null> {
  const args = [
    '--name=randread', `--filename=${path}`, '--rw=randread', '--bs=4k', `--ioengine=${engine}`, `--iodepth=${iodepth}`,
    '--direct=0', '--invalidate=0', '--time_based', `--runtime=${Math.max(1, Math.round(durationMs / 1000))}`,
    '--randrepeat=1', '--norandommap', '--output-format=json',
  ];
  return new Promise((resolve, reject) => {
    execFile('fio', args, { maxBuffer: 1 << 24 }, (err, stdout) => {
      if (err !== null) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') resolve(null);
        else reject(new Error(`fio: ${err.message}`));
        return;
      }
      const out = JSON.parse(stdout) as { jobs: { read: { iops: number } }[] };
      resolve(out.jobs[0]?.read.iops ?? 0);
    });
  });
}

if (!isMainThread && (workerData as PortWork | undefined)?.kind === 'port') {
  const w = workerData as PortWork;
  if (w.role === 'sender') {
    sender(w);
    parentPort!.postMessage(null);
  } else {
    parentPort!.postMessage(await receiver(w));
  }
}
