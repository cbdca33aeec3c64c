// dom0's unix sockets (lib/backends/stale-socket.ts): a socket file left by
// a process that was killed is replaced, one a live process listens on is
// EADDRINUSE and stays its own, and the folder is made for its owner only.

import t from 'tap';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { createConnection, createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { listenUnix } from '../lib/backends/stale-socket.js';
import { logger } from '../lib/log.js';

const dir = mkdtempSync(join(tmpdir(), 'xenpv-sock-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const quiet = logger('test', 'stale-socket');

function echoServer(): Server {
  return createServer((sock) => sock.pipe(sock));
}

/** Connect to `path`, send `text`, resolve with what comes back. */
function echo(path: string, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = createConnection(path, () => c.end(text));
    let got = '';
    c.on('data', (d) => (got += d));
    c.on('end', () => resolve(got));
    c.on('error', reject);
  });
}

function close(server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

t.test('a socket file left by a killed process is replaced', async (t) => {
  const path = join(dir, 'stale', 'a.sock');
  const child = spawn(process.execPath, ['-e', `
    require('node:fs').mkdirSync(require('node:path').dirname(${JSON.stringify(path)}), { recursive: true });
    require('node:net').createServer().listen(${JSON.stringify(path)}, () => console.log('up'));`], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve) => child.stdout.once('data', () => resolve()));
  child.kill('SIGKILL');
  await new Promise((resolve) => child.once('exit', resolve));
  t.ok(existsSync(path), 'the killed listener left its socket file');
  const server = echoServer();
  await listenUnix(server, path, 'test listener', quiet);
  t.equal(await echo(path, 'ping'), 'ping', 'the new listener answers there');
  await close(server);
});

t.test('a live listener keeps its socket: EADDRINUSE', async (t) => {
  const path = join(dir, 'live', 'b.sock');
  const first = echoServer();
  await listenUnix(first, path, 'test listener', quiet);
  const second = echoServer();
  await t.rejects(listenUnix(second, path, 'test listener', quiet), { code: 'EADDRINUSE', message: /another test listener is listening/ });
  t.equal(await echo(path, 'still mine'), 'still mine', 'the first listener still answers');
  await close(first);
});

t.test('the folder is made for its owner only', async (t) => {
  const folder = join(dir, 'new', 'deeper');
  const server = echoServer();
  await listenUnix(server, join(folder, 'c.sock'), 'test listener', quiet);
  t.equal(statSync(folder).mode & 0o777, 0o700);
  await close(server);
});
