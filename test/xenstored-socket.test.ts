// xenstored's unix socket in a booted host: the xsd_sockmsg stream as dom0
// tools speak it, a client that breaks framing, and the file's lifetime.

import t from 'tap';
import { existsSync, mkdtempSync } from 'node:fs';
import { createConnection, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { XS_ERROR, XS_READ, XS_WATCH, XS_WATCH_EVENT, XS_WRITE } from '../lib/abi/xs_wire.js';
import { Machine } from '../lib/machine.js';
import { XsDecoder, encodeMessage, fromBytes, joinStrings, joinWrite, splitStrings, type XsMessage } from '../lib/xenstore/wire.js';

/** A raw socket client: send a message, collect what comes back. */
class RawClient {
  private readonly decoder = new XsDecoder();
  readonly got: XsMessage[] = [];
  private waiters: Array<() => void> = [];
  closed = false;

  private constructor(readonly sock: Socket) {
    sock.on('data', (b: Buffer) => {
      this.got.push(...this.decoder.feed(b));
      this.wake();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }

  static open(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const sock = createConnection(path, () => resolve(new RawClient(sock)));
      sock.once('error', reject);
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Wait until `n` messages arrived or the socket closed; bounded. */
  async until(n: number, timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.got.length < n && !this.closed) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} messages`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 100);
      });
    }
  }

  send(type: number, payload: Uint8Array, req_id = 1): void {
    this.sock.write(encodeMessage({ type, req_id, tx_id: 0, payload }));
  }
}

t.test('socket: write, read, watch as privileged dom0; the file goes at stop', async (t) => {
  const rundir = mkdtempSync(join(tmpdir(), 'xenpv-sock-'));
  const m = await Machine.boot({ rundir });
  t.equal(m.socketPath, join(rundir, 'xenstored', 'socket'));
  t.ok(existsSync(m.socketPath!), 'socket file exists while the host runs');
  const c = await RawClient.open(m.socketPath!);
  c.send(XS_WRITE, joinWrite('/tool/sock', 'v1'), 7);
  c.send(XS_READ, joinStrings(['/tool/sock']), 8);
  c.send(XS_READ, joinStrings(['/tool/missing']), 9);
  c.send(XS_WATCH, joinStrings(['/tool/sock', 'tok']), 10);
  await c.until(5);
  t.same(c.got.slice(0, 4).map((r) => [r.type, r.req_id]), [[XS_WRITE, 7], [XS_READ, 8], [XS_ERROR, 9], [XS_WATCH, 10]]);
  t.equal(fromBytes(c.got[1]!.payload), 'v1');
  t.same(splitStrings(c.got[2]!.payload), ['ENOENT']);
  t.equal(c.got[4]!.type, XS_WATCH_EVENT);
  t.same(splitStrings(c.got[4]!.payload), ['/tool/sock', 'tok']);
  c.sock.destroy();
  await m.stop();
  t.notOk(existsSync(m.socketPath!), 'socket file removed at stop');
});

t.test('socket: a client that breaks framing loses its socket; others go on', async (t) => {
  const rundir = mkdtempSync(join(tmpdir(), 'xenpv-sock-'));
  const m = await Machine.boot({ rundir });
  t.teardown(() => m.stop());
  const bad = await RawClient.open(m.socketPath!);
  const hdr = new Uint8Array(16);
  new DataView(hdr.buffer).setUint32(12, 100_000, true); // len far above XENSTORE_PAYLOAD_MAX
  bad.sock.write(hdr);
  await bad.until(1);
  t.ok(bad.closed, 'xenstored closed the malformed stream');
  const good = await RawClient.open(m.socketPath!);
  good.send(XS_READ, joinStrings(['/local/domain/0/name']), 3);
  await good.until(1);
  t.equal(good.got[0]!.req_id, 3, 'a new client is answered');
  good.sock.destroy();
});

t.test('socket: a second host on the same rundir is refused', async (t) => {
  const rundir = mkdtempSync(join(tmpdir(), 'xenpv-sock-'));
  const m = await Machine.boot({ rundir });
  t.teardown(() => m.stop());
  await t.rejects(Machine.boot({ rundir, bootTimeoutMs: 5000 }));
});
