// A vbd's backend stopped and started again 20 times while the guest reads
// and writes (dom0's vbd-restart: the old blkback unmaps everything and
// closes, a new one opens the same file). xbf takes back what was in flight,
// reconnects and issues it again (blkif_recover); the guest's model of the
// disk holds every acknowledged write, and the file must equal it. Some of
// the transfers use disk.buffer() arrays, whose grants go with each
// connection.

import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const randomImage = join(root, 'dist/test/fixtures/blk-random.js');
const dir = mkdtempSync(join(tmpdir(), 'xenpv-blk-reconnect-'));
const RESTARTS = 20;
const XVDA = 51712;

const guests = [
  { name: 'mq', extra: 'xbf.max_queues=2 xbf.max_ring_page_order=1 xbf.max_indirect_segments=64' },
  { name: 'plain', extra: 'xbf.feature_persistent=0 xbf.max_indirect_segments=0 xbf.protocol=x86_32-abi' },
];

t.test(`the backend restarted ${RESTARTS} times during I/O: nothing acknowledged is lost`, async (t) => {
  const started = new Map<string, () => void>();
  const writing = guests.map((g) => new Promise<void>((resolve) => started.set(g.name, resolve)));
  const m = await Machine.boot({
    onConsole: (_domid, name, text) => {
      if (/^writing$/m.test(text)) started.get(name)?.();
    },
  });
  try {
    const ids: number[] = [];
    for (const [i, g] of guests.entries()) {
      writeFileSync(join(dir, `${g.name}.img`), randomBytes(4 << 20));
      const cfg = join(dir, `${g.name}.cfg`);
      writeFileSync(cfg, `name = "${g.name}"\nmemory = 64\nkernel = "${randomImage}"\n`
        + `extra = "seed=${i + 11} qd=8 maxkib=256 until=shutdown ${g.extra}"\ndisk = ['format=raw, vdev=xvda, target=${g.name}.img']\n`);
      ids.push(await m.create(loadDomainConfig(cfg)));
    }
    await Promise.race([Promise.all(writing), sleep(30_000, undefined, { ref: false }).then(() => Promise.reject(new Error('the guests never started writing')))]);
    await Promise.all(ids.map(async (id) => {
      for (let i = 0; i < RESTARTS; i++) {
        await m.restartVbd(id, XVDA);
        await sleep(20);
      }
      await m.requestShutdown(id, 'poweroff');
    }));
    const exits = await Promise.all(ids.map((id) => m.waitExit(id, AbortSignal.timeout(60_000))));
    for (const [i, g] of guests.entries()) {
      const c = exits[i]!.console;
      t.equal(exits[i]!.reason, 'poweroff', `${g.name}: ${c}`);
      const done = /^done ops=(\d+) bytes=\d+ readback=(\w+) reconnects=(\d+) sha256=([0-9a-f]+)$/m.exec(c);
      t.ok(done !== null, `${g.name}: finished`);
      if (done === null) continue;
      t.ok(Number(done[1]) > RESTARTS, `${g.name}: ${done[1]} operations`);
      t.match(c, /^buffers ops=[1-9]\d* /m, `${g.name}: some through disk.buffer() arrays (granted again after each reconnect where grants are persistent)`);
      t.equal(Number(done[3]), RESTARTS, `${g.name}: reconnected after every restart`);
      t.equal(done[2], 'true', `${g.name}: the disk reads back as the guest wrote it`);
      const file = createHash('sha256').update(readFileSync(join(dir, `${g.name}.img`))).digest('hex');
      t.equal(done[4], file, `${g.name}: the file holds every acknowledged write`);
    }
  } finally {
    await m.stop();
  }
});
