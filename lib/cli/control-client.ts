// The client half of the control socket (lib/backends/control.ts): requests
// out as JSON lines, replies matched by id, errors back as XenError.

import { createConnection, type Socket } from 'node:net';
import { XenError, type XenErrorShape } from '../errors.js';
import { controlPath } from './host.js';

type Reply = { id: number; result?: unknown; error?: XenErrorShape };

export class ControlClient {
  private nextId = 1;
  private buffered = '';
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: XenError) => void }>();
  private closed: XenError | null = null;

  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => this.receive(chunk));
    sock.on('error', () => undefined);
    sock.on('close', () => this.fail(new XenError('ECONNRESET', 'the host closed the control socket')));
  }

  /** Connect to the host of `rundir`; ESRCH when none runs there. */
  static connect(rundir: string): Promise<ControlClient> {
    const path = controlPath(rundir);
    return new Promise((resolve, reject) => {
      const sock = createConnection(path);
      sock.once('connect', () => {
        sock.removeAllListeners('error');
        resolve(new ControlClient(sock));
      });
      sock.once('error', (err: NodeJS.ErrnoException) => {
        const down = err.code === 'ENOENT' || err.code === 'ECONNREFUSED';
        reject(new XenError(down ? 'ESRCH' : (err.code ?? 'EIO'), down ? `no host is running in ${rundir} (xenpv host start)` : `${path}: ${err.message}`));
      });
    });
  }

  /** One request; resolves with its result, rejects with its coded error. */
  call(op: string, args: object = {}): Promise<unknown> {
    if (this.closed !== null) return Promise.reject(this.closed);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.sock.write(JSON.stringify({ id, op, args }) + '\n');
    });
  }

  private receive(chunk: string): void {
    this.buffered += chunk;
    for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
      const line = this.buffered.slice(0, nl);
      this.buffered = this.buffered.slice(nl + 1);
      let r: Reply;
      try {
        r = JSON.parse(line) as Reply;
      } catch {
        this.fail(new XenError('EPROTO', 'the host sent a line that is not JSON'));
        this.sock.destroy();
        return;
      }
      const p = this.pending.get(r.id);
      if (p === undefined) continue;
      this.pending.delete(r.id);
      if (r.error !== undefined) p.reject(XenError.fromJSON(r.error));
      else p.resolve(r.result);
    }
  }

  private fail(err: XenError): void {
    this.closed ??= err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  close(): void {
    this.closed ??= new XenError('ECANCELED', 'closed');
    this.sock.destroy();
  }
}

/** Connect, make one call, close. */
export async function controlCall(rundir: string, op: string, args: object = {}): Promise<unknown> {
  const c = await ControlClient.connect(rundir);
  try {
    return await c.call(op, args);
  } finally {
    c.close();
  }
}
