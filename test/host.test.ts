// `xenpv host start|stop`: a detached host whose xenstored socket answers,
// refused twice, stopped cleanly, and refused when not running.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createConnection } from 'node:net';
import { Machine } from '../lib/machine.js';
import type { XenError } from '../lib/errors.js';

const cli = fileURLToPath(new URL('../lib/cli/main.js', import.meta.url));

function xenpv(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  return spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 60_000 });
}

function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(path, () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

t.test('host start prints the socket, refuses a second start; stop cleans up; a second stop is ESRCH', async (t) => {
  const rundir = mkdtempSync(join(tmpdir(), 'xenpv-host-'));
  const socket = join(rundir, 'xenstored', 'socket');
  t.teardown(() => void xenpv('host', 'stop', '--rundir', rundir));
  let r = xenpv('host', 'start', '--rundir', rundir);
  t.equal(r.status, 0, r.stderr);
  t.equal(r.stdout.trim(), socket);
  t.ok(existsSync(join(rundir, 'xenpv.pid')), 'pid file');
  t.ok(await answers(socket), 'xenstored answers on the socket');
  r = xenpv('host', 'start', '--rundir', rundir);
  t.equal(r.status, 1);
  t.match(r.stderr, /^xenpv: EEXIST: /);
  r = xenpv('host', 'stop', '--rundir', rundir);
  t.equal(r.status, 0, r.stderr);
  t.notOk(existsSync(socket), 'socket removed');
  t.notOk(existsSync(join(rundir, 'xenpv.pid')), 'pid file removed');
  r = xenpv('host', 'stop', '--rundir', rundir);
  t.equal(r.status, 1);
  t.match(r.stderr, /^xenpv: ESRCH: /);
});

t.test('host with a bad subcommand is a usage error', async (t) => {
  const r = xenpv('host', 'frobnicate');
  t.equal(r.status, 2);
  t.match(r.stderr, /EINVAL/);
});

t.test('waitExit with a deadline that already passed rejects ECANCELED at once (xenpv run shares one deadline)', async (t) => {
  const m = await Machine.boot();
  t.teardown(() => m.stop());
  const err = await m.waitExit(7, AbortSignal.abort()).then(
    () => null,
    (e: XenError) => e,
  );
  t.equal(err?.code, 'ECANCELED');
  const later = new AbortController();
  const waiting = m.waitExit(7, later.signal).catch((e: XenError) => e.code);
  later.abort();
  t.equal(await waiting, 'ECANCELED', 'and when it fires while waiting');
});
