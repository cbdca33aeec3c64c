import { Worker } from 'node:worker_threads';

import t from 'tap';

import { XenbusStateConnected, XenbusStateInitialised, XenbusStateInitWait } from '../lib/abi/xenbus.js';
import { offsetOf } from '../lib/abi/layout.js';
import { XENSTORE_PAYLOAD_MAX, XS_READ, xenstore_domain_interface } from '../lib/abi/xs_wire.js';
import { XenstoredRing, Xenstored } from '../lib/backends/xenstored.js';
import { XenError, type XenErrorShape } from '../lib/errors.js';
import { FramePage, MemoryViews } from '../lib/hypervisor/page.js';
import { XS_HDR_SIZE, joinStrings } from '../lib/xenstore/wire.js';
import { attach, makeHome, settle, sleep } from './xenstore-harness.js';

async function world(): Promise<{ xsd: Xenstored; dom0: ReturnType<typeof attach>; dom1: ReturnType<typeof attach>; dom2: ReturnType<typeof attach> }> {
  const xsd = new Xenstored();
  const dom0 = attach(xsd, 0);
  await makeHome(dom0.xs, 1);
  await makeHome(dom0.xs, 2);
  return { xsd, dom0, dom1: attach(xsd, 1), dom2: attach(xsd, 2) };
}

t.test('read, write, list, mkdir, rm', async (t) => {
  const { dom0, dom1 } = await world();
  const xs = dom1.xs;
  await xs.write('data/greeting', 'hello');
  t.equal(await xs.read('data/greeting'), 'hello', 'relative path');
  t.equal(await xs.read('/local/domain/1/data/greeting'), 'hello', 'same node by absolute path');
  t.equal(await xs.read('data'), '', 'implicitly created parent is empty');
  await xs.mkdir('data/dir');
  await xs.mkdir('data/dir');
  t.same(await xs.list('data'), ['greeting', 'dir']);
  t.same(await xs.list('data/dir'), []);
  await xs.write('data/bin', new Uint8Array([1, 0, 2]));
  t.equal(await xs.read('data/bin'), '\x01\x00\x02', 'values are bytes');
  await xs.rm('data/dir');
  await xs.rm('data/dir');
  t.same(await xs.list('data'), ['greeting', 'bin'], 'rm of a missing node under an existing parent is fine');
  await t.rejects(xs.rm('data/nope/deeper'), { code: 'ENOENT' });
  await t.rejects(xs.read('data/nope'), { code: 'ENOENT' });
  await t.rejects(xs.list('nope'), { code: 'ENOENT' });
  await xs.rm('data');
  await t.rejects(xs.read('data/greeting'), { code: 'ENOENT' }, 'rm takes the subtree');
  t.equal(await xs.getDomainPath(1), '/local/domain/1');
  t.equal(await dom0.xs.getDomainPath(7), '/local/domain/7');
  await t.rejects(xs.read('bad//path'), { code: 'EINVAL' });
  await t.rejects(xs.read('trailing/'), { code: 'EINVAL' });
  await t.rejects(xs.read('sp ace'), { code: 'EINVAL' });
});

t.test('numbers', async (t) => {
  const { dom1 } = await world();
  await dom1.xs.setNumber('n', 42);
  t.equal(await dom1.xs.getNumber('n'), 42);
  await dom1.xs.write('s', 'forty');
  await t.rejects(dom1.xs.getNumber('s'), { code: 'EINVAL' });
  await t.rejects(dom1.xs.getNumber('none'), { code: 'ENOENT' });
});

t.test('permissions', async (t) => {
  const { dom0, dom1, dom2 } = await world();
  await dom1.xs.write('secret', 's');
  t.same(await dom1.xs.getPerms('secret'), [{ domid: 1, perm: 'n' }], 'inherits the home perms, owned by the writer');
  await t.rejects(dom2.xs.read('/local/domain/1/secret'), { code: 'EACCES' }, 'domU cannot read another domain');
  await t.rejects(dom2.xs.read('/local/domain/1/missing'), { code: 'EACCES' }, 'nor learn what is missing there');
  await t.rejects(dom2.xs.write('/local/domain/1/x', 'x'), { code: 'EACCES' });
  await t.rejects(dom2.xs.list('/local/domain/1'), { code: 'EACCES' });
  await t.rejects(dom2.xs.write('/tool/x', 'x'), { code: 'EACCES' });
  t.equal(await dom0.xs.read('/local/domain/1/secret'), 's', 'dom0 reads everything');

  await dom1.xs.setPerms('secret', [{ domid: 1, perm: 'n' }, { domid: 2, perm: 'r' }]);
  t.equal(await dom2.xs.read('/local/domain/1/secret'), 's', 'an ACL entry grants read');
  await t.rejects(dom2.xs.write('/local/domain/1/secret', 'x'), { code: 'EACCES' }, 'but not write');
  await t.rejects(dom2.xs.setPerms('/local/domain/1/secret', [{ domid: 2, perm: 'b' }]), { code: 'EACCES' }, 'nor chmod');
  await t.rejects(dom1.xs.setPerms('secret', [{ domid: 2, perm: 'b' }]), { code: 'EPERM' }, 'a domU cannot chown');
  await dom0.xs.setPerms('/local/domain/1/secret', [{ domid: 2, perm: 'r' }]);
  t.same(await dom0.xs.getPerms('/local/domain/1/secret'), [{ domid: 2, perm: 'r' }], 'dom0 can chown');
  t.equal(await dom1.xs.read('secret'), 's', 'now owned by dom2; others get the default, r');
  await t.rejects(dom1.xs.write('secret', 'x'), { code: 'EACCES' }, 'and no longer write');
});

t.test('watches', async (t) => {
  const { dom0, dom1, dom2 } = await world();
  const seen: string[] = [];
  const w = await dom1.xs.watch('dev', 'tok\u00e9n with spaces', (path, token) => seen.push(`${path}|${token}`));
  await settle();
  t.same(seen, ['dev|tok\u00e9n with spaces'], 'fires once when set, relative path and token verbatim');
  await dom1.xs.write('dev', 'x');
  await dom1.xs.write('dev/child/grandchild', 'y');
  await dom0.xs.write('/local/domain/1/dev/child', 'z');
  await dom1.xs.write('other', 'not watched');
  await settle();
  t.same(seen.slice(1), ['dev|tok\u00e9n with spaces', 'dev/child/grandchild|tok\u00e9n with spaces', 'dev/child|tok\u00e9n with spaces']);
  seen.length = 0;
  await dom1.xs.rm('dev');
  await settle();
  t.same(seen, ['dev|tok\u00e9n with spaces'], 'rm fires once on the watched node');
  await w.unwatch();
  seen.length = 0;
  await dom1.xs.write('dev', 'again');
  await settle();
  t.same(seen, [], 'no events after unwatch');

  const spy: string[] = [];
  await dom2.xs.watch('/local/domain/1', (p) => spy.push(p));
  await settle();
  spy.length = 0;
  await dom1.xs.write('private', 'p');
  await settle();
  t.same(spy, [], 'no events for nodes the watcher cannot read');
  await t.rejects(dom1.xs.watch('x', 'dup', () => undefined).then(() => dom1.xs.watch('y', 'dup', () => undefined)), { code: 'EEXIST' });
});

t.test('watch below a removed node hears of its removal', async (t) => {
  const { dom1 } = await world();
  await dom1.xs.write('a/b/c', '1');
  const seen: string[] = [];
  await dom1.xs.watch('a/b/c', (p) => seen.push(p));
  await settle();
  seen.length = 0;
  await dom1.xs.rm('a');
  await settle();
  t.same(seen, ['a/b/c']);
});

t.test('transactions', async (t) => {
  const { dom1, dom2 } = await world();
  await dom1.xs.write('counter', '0');
  const result = await dom1.xs.transaction(async (tx) => {
    const n = await tx.getNumber('counter');
    await tx.setNumber('counter', n + 1);
    await tx.write('log/entry', 'one');
    t.equal(await tx.read('log/entry'), 'one', 'a transaction reads its own writes');
    return n + 1;
  });
  t.equal(result, 1);
  t.equal(await dom1.xs.read('counter'), '1');
  t.equal(await dom1.xs.read('log/entry'), 'one');

  await t.rejects(
    dom1.xs.transaction(async (tx) => {
      await tx.write('aborted', 'x');
      throw new XenError('EIO', 'changed my mind');
    }),
    { code: 'EIO' },
  );
  await t.rejects(dom1.xs.read('aborted'), { code: 'ENOENT' }, 'abort discards');

  // Someone else changes what the transaction read: its first commit fails, the retry wins.
  let attempts = 0;
  await dom1.xs.transaction(async (tx) => {
    attempts++;
    const n = await tx.getNumber('counter');
    if (attempts === 1) await dom1.xs.setNumber('counter', 100);
    await tx.setNumber('counter', n + 1);
  });
  t.equal(attempts, 2, 'retried after EAGAIN');
  t.equal(await dom1.xs.read('counter'), '101');

  await t.rejects(
    dom1.xs.transaction(
      async (tx) => {
        const n = await tx.getNumber('counter');
        await dom1.xs.setNumber('counter', n + 50);
        await tx.setNumber('counter', n + 1);
      },
      { retries: 2 },
    ),
    { code: 'EAGAIN' },
    'bounded retries',
  );

  // Many increments from two domains at once lose nothing.
  await dom1.xs.setPerms('counter', [{ domid: 1, perm: 'n' }, { domid: 2, perm: 'b' }]);
  const before = await dom1.xs.getNumber('counter');
  const bump = (xs: typeof dom1.xs) =>
    xs.transaction(async (tx) => tx.setNumber('/local/domain/1/counter', (await tx.getNumber('/local/domain/1/counter')) + 1), {
      retries: 50,
    });
  await Promise.all([...Array(10)].flatMap(() => [bump(dom1.xs), bump(dom2.xs)]));
  t.equal(await dom1.xs.getNumber('counter'), before + 20);
});

t.test('awaitState for xenbus states, with timeout and abort', async (t) => {
  const { dom0, dom1 } = await world();
  const waiting = dom1.xs.awaitState('backend-state', [XenbusStateInitWait, XenbusStateConnected]);
  await sleep(5);
  await dom0.xs.write('/local/domain/1/backend-state', String(XenbusStateInitialised));
  await sleep(5);
  await dom0.xs.write('/local/domain/1/backend-state', String(XenbusStateConnected));
  t.equal(await waiting, '4');
  t.equal(await dom1.xs.awaitState('backend-state', XenbusStateConnected), '4', 'already there');
  await t.rejects(dom1.xs.awaitState('backend-state', 6, { timeoutMs: 30 }), { code: 'ETIMEDOUT' });
  const ctl = new AbortController();
  const aborted = dom1.xs.awaitState('backend-state', (v) => v === 'never', { signal: ctl.signal });
  setTimeout(() => ctl.abort(), 10);
  await t.rejects(aborted, { code: 'ECANCELED' });
  t.equal(await dom1.xs.awaitState('gone', (v) => v === undefined), undefined, 'a predicate sees absence');
});

t.test('bounded outstanding requests, big payloads, ring wraps', async (t) => {
  const xsd = new Xenstored();
  const dom0 = attach(xsd, 0, { maxOutstanding: 3 });
  const big = 'v'.repeat(XENSTORE_PAYLOAD_MAX - '/big\0'.length);
  await dom0.xs.write('/big', big);
  t.equal(await dom0.xs.read('/big'), big, 'a value of the largest payload, several ring wraps');
  await t.rejects(dom0.xs.write('/big', `${big}x`), { code: 'E2BIG' });
  const writes = [...Array(40)].map((_, i) => dom0.xs.write(`/many/n${i}`, `${i}`.repeat(100)));
  await Promise.all(writes);
  const reads = await Promise.all([...Array(40)].map((_, i) => dom0.xs.read(`/many/n${i}`)));
  t.same(reads, [...Array(40)].map((_, i) => `${i}`.repeat(100)));
  t.equal((await dom0.xs.list('/many')).length, 40);
});

t.test('a dead xenstored times requests out; close fails them', async (t) => {
  const page = new FramePage(new MemoryViews(new SharedArrayBuffer(4096)), 0, true);
  const { XenStore } = await import('../lib/xenstore/xenstore.js');
  const xs = new XenStore({ page, notify: () => undefined, timeoutMs: 20 });
  await t.rejects(xs.read('x'), { code: 'ETIMEDOUT' });
  const pending = xs.read('y', { timeoutMs: 5000 });
  xs.close();
  await t.rejects(pending, { code: 'ESHUTDOWN' });
  await t.rejects(xs.read('z'), { code: 'ESHUTDOWN' });
});

t.test('calls past maxOutstanding wait their turn; one aborted or timed out while waiting never reaches the ring', async (t) => {
  const page = new FramePage(new MemoryViews(new SharedArrayBuffer(4096)), 0, true);
  const { XenStore } = await import('../lib/xenstore/xenstore.js');
  const reqProd = offsetOf(xenstore_domain_interface, 'req_prod');
  const xs = new XenStore({ page, notify: () => undefined, timeoutMs: 200, maxOutstanding: 2 });
  const onRing = xs.read('a').catch((e: XenError) => e.code);
  const onRing2 = xs.read('b').catch((e: XenError) => e.code);
  const ctl = new AbortController();
  const aborted = xs.read('c', { signal: ctl.signal });
  const timedOut = xs.read('d', { timeoutMs: 20 });
  ctl.abort();
  await t.rejects(aborted, { code: 'ECANCELED' });
  await t.rejects(timedOut, { code: 'ETIMEDOUT' });
  t.equal(page.load32(reqProd), 2 * (XS_HDR_SIZE + 2), 'only the two calls holding slots are on the ring');
  t.same(await Promise.all([onRing, onRing2]), ['ETIMEDOUT', 'ETIMEDOUT']);
  await t.rejects(xs.read('e', { timeoutMs: 20 }), { code: 'ETIMEDOUT' });
  t.equal(page.load32(reqProd), 3 * (XS_HDR_SIZE + 2), 'timed-out calls gave their slots back');
  xs.close();
});

t.test('client in a worker, xenstored here, woken through Atomics', async (t) => {
  const xsd = new Xenstored();
  const dom0 = attach(xsd, 0);
  await makeHome(dom0.xs, 5);
  const memory = new SharedArrayBuffer(4096);
  const wake = new SharedArrayBuffer(8);
  const words = new Int32Array(wake);
  const SERVER = 0;
  const CLIENT = 1;
  const page = new FramePage(new MemoryViews(memory), 0, true);
  const server = new XenstoredRing(xsd, 5, page, () => {
    Atomics.add(words, CLIENT, 1);
    Atomics.notify(words, CLIENT);
  });
  let running = true;
  const serve = (async () => {
    while (running) {
      const seen = Atomics.load(words, SERVER);
      server.intr();
      const r = Atomics.waitAsync(words, SERVER, seen, 1000);
      if (r.async) await r.value;
    }
  })();

  const worker = new Worker(new URL('./xenstore-worker.js', import.meta.url), { workerData: { memory, wake } });
  let nextId = 1;
  const replies = new Map<number, (m: { ok: boolean; value?: unknown; error?: XenErrorShape }) => void>();
  const events: string[] = [];
  worker.on('message', (m: { id?: number; ok: boolean; event?: string }) => {
    if (m.event !== undefined) events.push(m.event);
    else if (m.id !== undefined) replies.get(m.id)?.(m);
  });
  const call = (op: string, ...args: unknown[]): Promise<unknown> =>
    new Promise((resolve, reject) => {
      const id = nextId++;
      replies.set(id, (m) => (m.ok ? resolve(m.value) : reject(XenError.fromJSON(m.error as XenErrorShape))));
      worker.postMessage({ id, op, args });
    });

  await call('write', 'device/vif/0/state', '1');
  t.equal(await call('read', 'device/vif/0/state'), '1');
  t.equal(await dom0.xs.read('/local/domain/5/device/vif/0/state'), '1', 'dom0 sees the worker write');
  t.same(await call('list', 'device/vif'), ['0']);
  await t.rejects(call('read', '/local/domain/0'), { code: 'EACCES' });
  await t.rejects(call('read', 'nothing'), { code: 'ENOENT' });

  await call('watch', 'backend', 'be-token');
  const waiting = call('awaitState', 'backend/state', XenbusStateConnected);
  await dom0.xs.write('/local/domain/5/backend/state', String(XenbusStateConnected));
  t.equal(await waiting, '4');
  t.ok(events.includes('backend|be-token'), 'initial watch event crossed the thread');
  t.ok(events.includes('backend/state|be-token'), 'change event crossed the thread');

  await dom0.xs.write('/local/domain/5/counter', '0');
  const bumps = [...Array(10)].map(() => call('increment', 'counter'));
  const local = [...Array(10)].map(() =>
    dom0.xs.transaction(async (tx) => tx.setNumber('/local/domain/5/counter', (await tx.getNumber('/local/domain/5/counter')) + 1), {
      retries: 50,
    }),
  );
  await Promise.all([...bumps, ...local]);
  t.equal(await dom0.xs.getNumber('/local/domain/5/counter'), 20, 'transactions across threads lose no update');

  await call('exit');
  running = false;
  Atomics.add(words, SERVER, 1);
  Atomics.notify(words, SERVER);
  await serve;
  await new Promise((r) => worker.once('exit', r));
  t.equal(server.error, undefined);
});

t.test('raw request of a known type works through the client cmd()', async (t) => {
  const { dom1 } = await world();
  await dom1.xs.write('raw', 'r');
  const rsp = await dom1.xs.cmd(XS_READ, 0, joinStrings(['raw']));
  t.equal(new TextDecoder().decode(rsp), 'r');
});
