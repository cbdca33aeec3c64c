// A guest's xenstore client in its own thread for xenstore.test.ts: it sleeps
// in Atomics.waitAsync on its wake word and signals xenstored through the
// other, as a vCPU would with an event channel. The test drives it with
// messages; a pending waitAsync does not keep this thread alive, the
// parentPort listener does.

import { parentPort, workerData } from 'node:worker_threads';

import { errorShape } from '../lib/errors.js';
import { FramePage, MemoryViews } from '../lib/hypervisor/page.js';
import { XenStore } from '../lib/xenstore/xenstore.js';

const { memory, wake } = workerData as { memory: SharedArrayBuffer; wake: SharedArrayBuffer };
const words = new Int32Array(wake);
const SERVER = 0;
const CLIENT = 1;

const xs = new XenStore({
  page: new FramePage(new MemoryViews(memory), 0, true),
  notify: () => {
    Atomics.add(words, SERVER, 1);
    Atomics.notify(words, SERVER);
  },
  name: 'worker',
  timeoutMs: 5000,
});

let running = true;
const upcalls = (async () => {
  while (running) {
    const seen = Atomics.load(words, CLIENT);
    xs.intr();
    const r = Atomics.waitAsync(words, CLIENT, seen);
    if (r.async) await r.value;
  }
})();

type Call = { id: number; op: string; args: unknown[] };

async function run(op: string, args: unknown[]): Promise<unknown> {
  const s = (i: number): string => String(args[i]);
  switch (op) {
    case 'read':
      return xs.read(s(0));
    case 'write':
      return xs.write(s(0), s(1));
    case 'list':
      return xs.list(s(0));
    case 'watch':
      await xs.watch(s(0), s(1), (path, token) => parentPort?.postMessage({ ok: true, event: `${path}|${token}` }));
      return undefined;
    case 'awaitState':
      return xs.awaitState(s(0), Number(args[1]));
    case 'increment':
      return xs.transaction(async (tx) => tx.setNumber(s(0), (await tx.getNumber(s(0))) + 1), { retries: 50 });
    case 'exit':
      running = false;
      Atomics.add(words, CLIENT, 1);
      Atomics.notify(words, CLIENT);
      await upcalls;
      xs.close();
      setImmediate(() => parentPort?.close());
      return undefined;
    default:
      throw new Error(`unknown op ${op}`);
  }
}

parentPort?.on('message', (m: Call) => {
  run(m.op, m.args).then(
    (value) => parentPort?.postMessage({ id: m.id, ok: true, value }),
    (err: unknown) => parentPort?.postMessage({ id: m.id, ok: false, error: errorShape(err) }),
  );
});
