// The console concentrator, the I/O half of xenconsoled (and what the LDoms
// control domain's vntsd does): each guest's console output goes to a log
// file under the rundir, to every client of the guest's unix socket and,
// when the config sets console_port, of a TCP port on 127.0.0.1. What any
// client types goes to the guest. Several clients may attach at once; each
// sees the output from the moment it attached. A client that cannot keep up
// is dropped, never the guest.

import { closeSync, mkdirSync, openSync, rmSync, writeSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { XenError } from '../errors.js';
import { logger, type Log } from '../log.js';
import type { ConsoleSink } from './console.js';
import { removeStaleSocket } from './stale-socket.js';

/** Output queued for one client beyond which it is dropped. */
const CLIENT_HIGH_WATER_BYTES = 1 << 20;
/** Clients of one console at once. */
const MAX_CLIENTS = 16;
const CLOSE_GRACE_MS = 1000;

/** Where a guest's console is found under the rundir. */
export function consolePaths(rundir: string, name: string): { socket: string; log: string } {
  const dir = join(rundir, 'console');
  return { socket: join(dir, `${name}.sock`), log: join(dir, `${name}.log`) };
}

type Concentrated = {
  name: string;
  socketPath: string;
  logFd: number;
  servers: Server[];
  clients: Set<Socket>;
  log: Log;
};

export class Concentrator implements ConsoleSink {
  private readonly consoles = new Map<number, Concentrated>();

  constructor(private readonly rundir: string) {}

  async open(domid: number, name: string, tcpPort: number | undefined, input: (bytes: Uint8Array) => void): Promise<void> {
    const paths = consolePaths(this.rundir, name);
    mkdirSync(join(this.rundir, 'console'), { recursive: true, mode: 0o700 });
    const c: Concentrated = {
      name, socketPath: paths.socket, logFd: openSync(paths.log, 'a', 0o600), servers: [], clients: new Set(), log: logger('console', name),
    };
    this.consoles.set(domid, c);
    try {
      await removeStaleSocket(paths.socket, 'console');
      c.servers.push(await listen(createServer((s) => this.accept(c, s, input)), { path: paths.socket }));
      if (tcpPort !== undefined) {
        c.servers.push(await listen(createServer((s) => this.accept(c, s, input)), { host: '127.0.0.1', port: tcpPort }));
      }
    } catch (err) {
      await this.close(domid);
      throw err;
    }
    c.log('console of domain %d at %s%s', domid, paths.socket, tcpPort === undefined ? '' : ` and 127.0.0.1:${tcpPort}`);
  }

  private accept(c: Concentrated, sock: Socket, input: (bytes: Uint8Array) => void): void {
    if (c.clients.size >= MAX_CLIENTS) {
      sock.end(`xenpv: EBUSY: ${MAX_CLIENTS} clients on the console of ${c.name} already\r\n`);
      return;
    }
    c.clients.add(sock);
    sock.on('data', (chunk: Buffer) => input(chunk));
    sock.on('error', (err) => c.log('client: %s', err.message));
    sock.on('close', () => c.clients.delete(sock));
  }

  output(domid: number, bytes: Uint8Array): void {
    const c = this.consoles.get(domid);
    if (c === undefined) return;
    try {
      writeSync(c.logFd, bytes);
    } catch (err) {
      c.log('log: %s', (err as Error).message);
    }
    for (const sock of c.clients) {
      if (sock.writableLength > CLIENT_HIGH_WATER_BYTES) {
        c.log('a client fell %d bytes behind: dropped', sock.writableLength);
        sock.destroy();
        continue;
      }
      sock.write(bytes);
    }
  }

  /** The console has gone: clients are told by end of stream; the log stays. */
  async close(domid: number): Promise<void> {
    const c = this.consoles.get(domid);
    if (c === undefined) return;
    this.consoles.delete(domid);
    for (const sock of c.clients) sock.end();
    // A client that does not close its end in time is cut off.
    const cut = setTimeout(() => c.clients.forEach((s) => s.destroy()), CLOSE_GRACE_MS);
    await Promise.all(c.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    clearTimeout(cut);
    rmSync(c.socketPath, { force: true });
    closeSync(c.logFd);
  }

  async closeAll(): Promise<void> {
    for (const domid of [...this.consoles.keys()]) await this.close(domid);
  }
}

function listen(server: Server, where: { path: string } | { host: string; port: number }): Promise<Server> {
  return new Promise((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => {
      const at = 'path' in where ? where.path : `${where.host}:${where.port}`;
      reject(new XenError(err.code ?? 'EIO', `console at ${at}: ${err.message}`));
    });
    server.listen(where, () => {
      server.removeAllListeners('error');
      server.on('error', () => undefined);
      resolve(server);
    });
  });
}
