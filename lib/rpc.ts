// Calls between the machine (main thread) and dom0's kernel over a worker's
// message port: each side serves some operations and calls the other's.
// Errors travel as {name, code, message} and come back as XenError.

import { XenError, errorShape, type XenErrorShape } from './errors.js';

type Call = { rpc: 'call'; id: number; op: string; args: unknown };
type Reply = { rpc: 'reply'; id: number; result?: unknown; error?: XenErrorShape };
type Event = { rpc: 'event'; name: string; data: unknown };
export type RpcMessage = Call | Reply | Event;

export type RpcHandlers = Record<string, (args: unknown) => unknown>;

const MAX_PENDING = 256;

export class Rpc {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: XenError) => void; timer: NodeJS.Timeout }>();

  constructor(
    private readonly post: (m: RpcMessage) => void,
    private readonly handlers: RpcHandlers,
    private readonly onEvent: (name: string, data: unknown) => void = () => undefined,
  ) {}

  /** Feed a message from the port; returns false for one that is not ours. */
  receive(m: unknown): boolean {
    if (typeof m !== 'object' || m === null || !('rpc' in m)) return false;
    const msg = m as RpcMessage;
    if (msg.rpc === 'event') this.onEvent(msg.name, msg.data);
    else if (msg.rpc === 'reply') this.settle(msg);
    else void this.serve(msg);
    return true;
  }

  private settle(msg: Reply): void {
    const p = this.pending.get(msg.id);
    if (p === undefined) return;
    this.pending.delete(msg.id);
    clearTimeout(p.timer);
    if (msg.error !== undefined) p.reject(XenError.fromJSON(msg.error));
    else p.resolve(msg.result);
  }

  private async serve(msg: Call): Promise<void> {
    const handler = this.handlers[msg.op];
    try {
      if (handler === undefined) throw new XenError('ENOSYS', `no operation ${msg.op}`);
      this.post({ rpc: 'reply', id: msg.id, result: await handler(msg.args) });
    } catch (err) {
      this.post({ rpc: 'reply', id: msg.id, error: errorShape(err) });
    }
  }

  call(op: string, args: unknown, timeoutMs = 30_000): Promise<unknown> {
    if (this.pending.size >= MAX_PENDING) return Promise.reject(new XenError('EAGAIN', 'too many calls in flight'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new XenError('ETIMEDOUT', `${op}: no answer in ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.post({ rpc: 'call', id, op, args });
    });
  }

  event(name: string, data: unknown): void {
    this.post({ rpc: 'event', name, data });
  }

  /** Fail every call in flight (the other side went away). */
  close(reason: XenError): void {
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(reason);
      this.pending.delete(id);
    }
  }
}
