// A unix socket file left by a process that died answers nobody and is
// removed; one that answers belongs to a live listener (EADDRINUSE).

import { rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { XenError } from '../errors.js';

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
