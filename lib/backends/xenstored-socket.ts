// xenstored's unix socket (C xenstored's "socket" connections): dom0 tools
// such as xenstore-read and test-xenstore speak the same xsd_sockmsg stream
// as the ring, as privileged dom0. Each socket is one connection; a client
// that breaks framing loses its socket, never the daemon.

import { rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { logger } from '../log.js';
import { XsDecoder, encodeMessage } from '../xenstore/wire.js';
import type { Xenstored } from './xenstored.js';
import { listenUnix } from './stale-socket.js';
import { TraceKind, traceDevice, traceXs, tracing } from '../trace/trace.js';

const log = logger('xenstored', 'socket');

/** Stop reading a client whose answers pile up unread (bytes queued in the socket). */
const HIGH_WATER_BYTES = 256 * 1024;
/** Sockets at once; C xenstored has no fixed cap, but every queue here has one. */
const MAX_CLIENTS = 1024;

export class XenstoredSocket {
  private readonly clients = new Set<Socket>();

  private constructor(
    readonly path: string,
    private readonly server: Server,
  ) {}

  /** Listen on `path` (its directory is created); a stale socket left by a dead host is replaced. */
  static async listen(xsd: Xenstored, path: string): Promise<XenstoredSocket> {
    const server = createServer({ allowHalfOpen: false });
    const self = new XenstoredSocket(path, server);
    server.maxConnections = MAX_CLIENTS;
    server.on('connection', (sock) => self.accept(xsd, sock));
    await listenUnix(server, path, 'xenstored', log);
    return self;
  }

  private accept(xsd: Xenstored, sock: Socket): void {
    this.clients.add(sock);
    const decoder = new XsDecoder();
    const dev = traceDevice('xenstored.socket');
    const conn = xsd.connect(0, (msg) => {
      if (sock.destroyed) return;
      if (tracing) traceXs(TraceKind.xsOut, dev, false, msg.type, msg.req_id, msg.tx_id, msg.payload);
      const room = sock.write(encodeMessage(msg));
      if (!room && sock.writableLength > HIGH_WATER_BYTES) sock.pause();
      return room;
    }, { privileged: true, onClose: () => sock.destroy() });
    sock.on('drain', () => {
      sock.resume();
      conn.drain();
    });
    sock.on('data', (chunk: Buffer) => {
      for (const msg of decoder.feed(chunk)) {
        if (tracing) traceXs(TraceKind.xsIn, dev, true, msg.type, msg.req_id, msg.tx_id, msg.payload);
        conn.receive(msg);
      }
      if (decoder.error !== undefined) {
        log('client broke framing: %s', decoder.error.message);
        sock.destroy();
      }
    });
    sock.on('error', (err) => log('client error: %s', err.message));
    sock.on('close', () => {
      this.clients.delete(sock);
      conn.close();
    });
  }

  /** Stop listening, drop every client, remove the socket file. */
  async close(): Promise<void> {
    for (const sock of this.clients) sock.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.path, { force: true });
  }
}
