// Fault: the vbd's backend killed and started again 100 times while the
// guest writes (dom0's vbd-restart: the old blkback unmaps everything and
// closes, a new one opens the same file). xbf takes back what was in flight,
// reconnects and issues it again each time; the guest keeps a model of the
// disk with every acknowledged write, reads must match it, and at the end
// the file must equal it byte for byte.

import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const randomImage = join(root, 'dist/test/fixtures/blk-random.js');
const RESTARTS = 100;
const XVDA = 51712;

t.test(`blkback killed and restarted ${RESTARTS} times during writes: nothing acknowledged is lost`, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-fault-restart-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  let writing: () => void = () => undefined;
  const started = new Promise<void>((resolve) => (writing = resolve));
  const m = await Machine.boot({ onConsole: (_domid, _name, text) => /^writing$/m.test(text) && writing() });
  try {
    writeFileSync(join(dir, 'g.img'), randomBytes(4 << 20));
    const cfg = join(dir, 'g.cfg');
    writeFileSync(cfg, `name = "g"\nmemory = 64\nkernel = "${randomImage}"\n`
      + `extra = "seed=100 qd=8 maxkib=128 until=shutdown xbf.max_queues=2 xbf.max_indirect_segments=32"\n`
      + `disk = ['format=raw, vdev=xvda, target=g.img']\n`);
    const id = await m.create(loadDomainConfig(cfg));
    await Promise.race([started, sleep(30_000, undefined, { ref: false }).then(() => Promise.reject(new Error('the guest never started writing')))]);
    for (let i = 0; i < RESTARTS; i++) {
      await m.restartVbd(id, XVDA);
      // Let some writes through the new backend before killing it again.
      await sleep(5);
    }
    await m.requestShutdown(id, 'poweroff');
    const exit = await m.waitExit(id, AbortSignal.timeout(60_000));
    t.equal(exit.reason, 'poweroff', exit.console);
    const done = /^done ops=(\d+) bytes=\d+ readback=(\w+) reconnects=(\d+) sha256=([0-9a-f]+)$/m.exec(exit.console);
    t.ok(done !== null, 'the guest finished');
    if (done === null) return;
    t.ok(Number(done[1]) > RESTARTS, `${done[1]} transfers`);
    t.equal(Number(done[3]), RESTARTS, 'xbf reconnected after every restart');
    t.equal(done[2], 'true', 'the disk reads back as the guest wrote it');
    const file = createHash('sha256').update(readFileSync(join(dir, 'g.img'))).digest('hex');
    t.equal(done[4], file, 'the file holds every acknowledged write');
  } finally {
    await m.stop();
  }
});
