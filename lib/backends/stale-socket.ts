// dom0's unix sockets (xenstored's, the host's control socket). A socket
// file left by a process that died answers nobody and is removed; one that
// answers belongs to a live listener (EADDRINUSE).

import { mkdirSync, rmSync } from 'node:fs';
import { createConnection, type Server } from 'node:net';
import { dirname } from 'node:path';
import { XenError } from '../errors.js';
import type { Log } from '../log.js';

export async function removeStaleSocket(path: string, listener: string): Promise<void> {
  const alive = await new Promise<boolean>((resolve) => {
    const probe = createConnection(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new XenError('EADDRINUSE', `${path}: another ${listener} is listening`);
  rmSync(path, { force: true });
}

/**
 * `server` listening on `path`: its folder made (owner only), a stale socket
 * file replaced; EADDRINUSE when another `listener` answers there. Errors
 * after that are logged.
 */
export async function listenUnix(server: Server, path: string, listener: string, log: Log): Promise<void> {
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  await removeStaleSocket(path, listener);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (err) => log('server error: %s', err.message));
  log('listening on %s', path);
}
