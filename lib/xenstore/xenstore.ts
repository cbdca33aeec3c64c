// The guest's xenstore client (OpenBSD sys/dev/pv/xenstore.c): requests go
// out on the shared page's req ring tagged with a req_id, responses come back
// on rsp and are matched by that id, XS_WATCH_EVENT goes to the watch whose
// token it carries. A small API on top: read, write, list, rm, mkdir,
// permissions, watches, transactions, numbers and xenbus state waits.
//
// The owner wires the event channel: `notify` signals xenstored, and the
// owner calls `intr()` from the channel's handler (or whenever it polls).

import {
  XENSTORE_PAYLOAD_MAX,
  XS_DIRECTORY,
  XS_ERROR,
  XS_GET_DOMAIN_PATH,
  XS_GET_PERMS,
  XS_MKDIR,
  XS_READ,
  XS_RM,
  XS_SET_PERMS,
  XS_TRANSACTION_END,
  XS_TRANSACTION_START,
  XS_UNWATCH,
  XS_WATCH,
  XS_WATCH_EVENT,
  XS_WRITE,
} from '../abi/xs_wire.js';
import { XenError } from '../errors.js';
import type { Page } from '../hypervisor/page.js';
import { logger, type Log } from '../log.js';
import { XsRing } from './ring.js';
import {
  formatPerm,
  fromBytes,
  joinStrings,
  joinWrite,
  parsePerm,
  splitStrings,
  type XsMessage,
  type XsPerm,
} from './wire.js';

export type XsWait = {
  signal?: AbortSignal | undefined;
  /** Bound on the whole call; the client's default when absent. */
  timeoutMs?: number | undefined;
};

export type XenStoreOptions = {
  page: Page;
  /** Signal xenstored (the store event channel). */
  notify: () => void;
  /** Log instance name, e.g. "dom1". */
  name?: string | undefined;
  /** Requests in flight at once; further callers wait for a slot. */
  maxOutstanding?: number | undefined;
  /** Default bound on each call. */
  timeoutMs?: number | undefined;
  /** Attempts a transaction(fn) makes when commits keep failing with EAGAIN. */
  txRetries?: number | undefined;
};

export type XsWatchHandler = (path: string, token: string) => void;

export type XsWatch = {
  readonly path: string;
  readonly token: string;
  unwatch(wait?: XsWait): Promise<void>;
};

/** What awaitState waits for: xenbus states, or any test of the value (undefined when absent). */
export type XsStateWant = number | readonly number[] | ((value: string | undefined) => boolean);

/**
 * One call of cmd(): queued until a slot is free, then on the ring under
 * req_id until its answer, an abort or its deadline. One object and one
 * promise per call; no timer or AbortController of its own.
 */
type Request = {
  type: number;
  txId: number;
  payload: Uint8Array;
  /** 0 while it waits for a slot. */
  reqId: number;
  /** performance.now() past which the call fails with ETIMEDOUT. */
  deadline: number;
  timeoutMs: number;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
  done: boolean;
  /** What the caller gets from the answer's payload. */
  decode: (payload: Uint8Array) => unknown;
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
};

const asIs = (payload: Uint8Array): Uint8Array => payload;
type WatchEntry = { path: string; token: string; handler: XsWatchHandler };

const DEFAULT_MAX_OUTSTANDING = 16;
const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_TX_RETRIES = 8;
const TX_BACKOFF_MS = 2;

/** One deadline for a whole call: the caller's signal or the timeout, whichever first. */
type Deadline = { signal: AbortSignal; dispose: () => void };

function deadline(wait: XsWait | undefined, defaultMs: number, what: string): Deadline {
  const ctl = new AbortController();
  const ms = wait?.timeoutMs ?? defaultMs;
  const timer = setTimeout(() => ctl.abort(new XenError('ETIMEDOUT', `${what}: no answer in ${ms} ms`)), ms);
  const outer = wait?.signal;
  const onAbort = (): void => ctl.abort(new XenError('ECANCELED', `${what}: aborted`, { cause: outer?.reason }));
  if (outer?.aborted) onAbort();
  else outer?.addEventListener('abort', onAbort, { once: true });
  return {
    signal: ctl.signal,
    dispose: () => {
      clearTimeout(timer);
      outer?.removeEventListener('abort', onAbort);
    },
  };
}

/** The error of a call whose caller's signal aborted. */
function cancelled(type: number, signal: AbortSignal): XenError {
  const r: unknown = signal.reason;
  return r instanceof XenError ? r : new XenError('ECANCELED', `xenstore request type ${type}: aborted`, { cause: r });
}

function abortReason(signal: AbortSignal): XenError {
  const r: unknown = signal.reason;
  return r instanceof XenError ? r : new XenError('ECANCELED', 'aborted', { cause: r });
}

/** Resolve when `signal` aborts or `ms` pass, whichever first; never rejects. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
  });
}

/** The XS_ERROR payload ("ENOENT\0") as the error it names. */
function errorFrom(msg: XsMessage, what: string): XenError {
  const name = splitStrings(msg.payload)[0] ?? '';
  const code = /^E[A-Z0-9]+$/.test(name) ? name : 'EIO';
  return new XenError(code, `${what}: xenstored says ${JSON.stringify(name)}`);
}

function wantTest(want: XsStateWant): (value: string | undefined) => boolean {
  if (typeof want === 'function') return want;
  const states: readonly number[] = typeof want === 'number' ? [want] : want;
  return (value) => value !== undefined && /^\d+$/.test(value) && states.includes(Number(value));
}

export class XenStore {
  private readonly ring: XsRing;
  private readonly log: Log;
  private readonly maxOutstanding: number;
  readonly timeoutMs: number;
  readonly txRetries: number;
  /** Requests on the ring, by req_id. */
  private readonly pending = new Map<number, Request>();
  /** Requests waiting for a slot, oldest first from waitingHead. */
  private readonly waiting: Request[] = [];
  private waitingHead = 0;
  private readonly watches = new Map<string, WatchEntry>();
  /** One timer for every request's deadline, armed for the earliest; unref'd while nothing is outstanding. */
  private timer: ReturnType<typeof setTimeout> | undefined;
  private timerAt = Infinity;
  private nextReqId = 1;
  private nextToken = 1;
  private error: XenError | undefined;

  constructor(opts: XenStoreOptions) {
    this.log = logger('xenstore', opts.name);
    this.maxOutstanding = opts.maxOutstanding ?? DEFAULT_MAX_OUTSTANDING;
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.txRetries = opts.txRetries ?? DEFAULT_TX_RETRIES;
    if (!(this.maxOutstanding >= 1)) throw new XenError('EINVAL', 'maxOutstanding must be at least 1');
    this.ring = new XsRing({
      page: opts.page,
      side: 'front',
      notify: opts.notify,
      deliver: (msg) => this.deliver(msg),
      broken: (err) => this.fail(err),
      log: this.log,
    });
  }

  /** The event channel fired: take responses and watch events, push queued requests (OpenBSD xs_intr); false when there was nothing to do. */
  intr(): boolean {
    return this.ring.intr();
  }

  /** Fail everything in flight and stop; watches are forgotten. */
  close(): void {
    this.ring.close();
    this.fail(new XenError('ESHUTDOWN', 'xenstore client closed'));
  }

  [Symbol.dispose](): void {
    this.close();
  }

  // --- the request path -------------------------------------------------

  /**
   * Send one request and wait for its response payload (OpenBSD xs_cmd).
   * XS_ERROR becomes a XenError whose code is the errno name. At most
   * maxOutstanding requests are on the ring; later calls wait their turn.
   */
  cmd(type: number, txId: number, payload: Uint8Array, wait?: XsWait): Promise<Uint8Array> {
    return this.request(type, txId, payload, wait, asIs);
  }

  /**
   * cmd() with the payload turned into the caller's value as the answer is
   * settled: one promise per call, however many layers the API has.
   * @internal for the operations below
   */
  request<T>(type: number, txId: number, payload: Uint8Array, wait: XsWait | undefined, decode: (payload: Uint8Array) => T): Promise<T> {
    if (payload.length > XENSTORE_PAYLOAD_MAX) {
      return Promise.reject(new XenError('E2BIG', `request of ${payload.length} bytes exceeds ${XENSTORE_PAYLOAD_MAX}`));
    }
    if (this.error !== undefined) return Promise.reject(this.error);
    const signal = wait?.signal;
    if (signal?.aborted === true) return Promise.reject(cancelled(type, signal));
    const timeoutMs = wait?.timeoutMs ?? this.timeoutMs;
    return new Promise<T>((resolve, reject) => {
      const r: Request = {
        type, txId, payload, reqId: 0, deadline: performance.now() + timeoutMs, timeoutMs,
        signal, onAbort: undefined, done: false, decode, resolve: resolve as (value: unknown) => void, reject,
      };
      if (signal !== undefined) {
        r.onAbort = () => this.finish(r, cancelled(type, signal));
        signal.addEventListener('abort', r.onAbort, { once: true });
      }
      this.armTimer(r.deadline);
      if (this.pending.size < this.maxOutstanding) this.transmit(r);
      else this.waiting.push(r);
    });
  }

  private allocReqId(): number {
    let id = this.nextReqId;
    while (this.pending.has(id) || id === 0) id = (id + 1) >>> 0;
    this.nextReqId = (id + 1) >>> 0;
    return id;
  }

  private transmit(r: Request): void {
    r.reqId = this.allocReqId();
    this.pending.set(r.reqId, r);
    this.ring.send({ type: r.type, req_id: r.reqId, tx_id: r.txId, payload: r.payload });
  }

  /**
   * Settle a request once: its answer, or an error. Its slot goes to the
   * next waiter; a late answer to an abandoned request finds no entry and is
   * dropped in deliver().
   */
  private finish(r: Request, result: XsMessage | XenError): void {
    if (r.done) return;
    r.done = true;
    if (r.onAbort !== undefined) r.signal?.removeEventListener('abort', r.onAbort);
    if (r.reqId !== 0 && this.pending.get(r.reqId) === r) this.pending.delete(r.reqId);
    if (result instanceof XenError) r.reject(result);
    else this.answer(r, result);
    this.startWaiting();
  }

  /** XS_ERROR becomes a XenError whose code is the errno name; a decode that throws rejects. */
  private answer(r: Request, msg: XsMessage): void {
    if (msg.type === XS_ERROR) return r.reject(errorFrom(msg, `xenstore request type ${r.type}`));
    if (msg.type !== r.type) return r.reject(new XenError('EIO', `xenstore request type ${r.type}: answered with type ${msg.type}`));
    let value: unknown;
    try {
      value = r.decode(msg.payload);
    } catch (err) {
      return r.reject(err);
    }
    r.resolve(value);
  }

  /** Put waiting requests on the ring while slots are free (skipping those already settled). */
  private startWaiting(): void {
    while (this.pending.size < this.maxOutstanding && this.waitingHead < this.waiting.length && this.error === undefined) {
      const r = this.waiting[this.waitingHead++]!;
      if (!r.done) this.transmit(r);
    }
    if (this.waitingHead !== 0 && this.waitingHead === this.waiting.length) {
      this.waiting.length = 0;
      this.waitingHead = 0;
    }
    if (this.pending.size === 0 && this.waiting.length === 0) this.timer?.unref();
  }

  private armTimer(deadline: number): void {
    if (this.timer !== undefined && deadline >= this.timerAt) {
      this.timer.ref();
      return;
    }
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timerAt = deadline;
    this.timer = setTimeout(() => this.expire(), Math.max(0, deadline - performance.now()));
  }

  /** The timer fired: fail what is past its deadline, re-arm for the earliest of the rest. */
  private expire(): void {
    this.timer = undefined;
    this.timerAt = Infinity;
    const now = performance.now();
    let next = Infinity;
    for (const r of [...this.pending.values(), ...this.waiting.slice(this.waitingHead)]) {
      if (r.done) continue;
      if (r.deadline <= now) this.finish(r, new XenError('ETIMEDOUT', `xenstore request type ${r.type}: no answer in ${r.timeoutMs} ms`));
      else next = Math.min(next, r.deadline);
    }
    if (next !== Infinity) this.armTimer(next);
  }

  private deliver(msg: XsMessage): void {
    if (msg.type === XS_WATCH_EVENT) {
      this.event(msg);
      return;
    }
    const r = this.pending.get(msg.req_id);
    if (r === undefined) {
      this.log('dropping response type %d for unknown req_id %d', msg.type, msg.req_id);
      return;
    }
    this.finish(r, msg);
  }

  /** Run a watch's handler (OpenBSD xs_event). */
  private event(msg: XsMessage): void {
    const [path, token] = splitStrings(msg.payload);
    const w = token === undefined ? undefined : this.watches.get(token);
    if (path === undefined || w === undefined) {
      this.log('dropping watch event for unknown token %s', token);
      return;
    }
    try {
      w.handler(path, w.token);
    } catch (err) {
      this.log('watch %s handler threw: %O', w.path, err);
    }
  }

  private fail(err: XenError): void {
    if (this.error === undefined) {
      this.error = err;
      this.log('xenstore down: %s', err.message);
    }
    for (const r of [...this.pending.values(), ...this.waiting.slice(this.waitingHead)]) this.finish(r, err);
    this.pending.clear();
    this.waiting.length = 0;
    this.waitingHead = 0;
    this.watches.clear();
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    this.timerAt = Infinity;
  }

  // --- the API ----------------------------------------------------------

  read(path: string, wait?: XsWait): Promise<string> {
    return xsRead(this, 0, path, wait);
  }
  write(path: string, value: string | Uint8Array, wait?: XsWait): Promise<void> {
    return xsWrite(this, 0, path, value, wait);
  }
  list(path: string, wait?: XsWait): Promise<string[]> {
    return xsList(this, 0, path, wait);
  }
  rm(path: string, wait?: XsWait): Promise<void> {
    return xsAck(this, 0, XS_RM, path, wait);
  }
  mkdir(path: string, wait?: XsWait): Promise<void> {
    return xsAck(this, 0, XS_MKDIR, path, wait);
  }
  getPerms(path: string, wait?: XsWait): Promise<XsPerm[]> {
    return xsGetPerms(this, 0, path, wait);
  }
  setPerms(path: string, perms: readonly XsPerm[], wait?: XsWait): Promise<void> {
    return xsSetPerms(this, 0, path, perms, wait);
  }
  getNumber(path: string, wait?: XsWait): Promise<number> {
    return xsGetNumber(this, 0, path, wait);
  }
  setNumber(path: string, value: number, wait?: XsWait): Promise<void> {
    return xsWrite(this, 0, path, String(value), wait);
  }

  /** The home of a domain, "/local/domain/<domid>". */
  async getDomainPath(domid: number, wait?: XsWait): Promise<string> {
    const rsp = await this.cmd(XS_GET_DOMAIN_PATH, 0, joinStrings([String(domid)]), wait);
    return splitStrings(rsp)[0] ?? '';
  }

  /**
   * Watch `path` and everything below it (OpenBSD xs_watch). xenstored fires
   * once as soon as the watch is set, then on every change; the handler gets
   * the changed path and the token. Tokens are unique per client.
   */
  watch(path: string, handler: XsWatchHandler, wait?: XsWait): Promise<XsWatch>;
  watch(path: string, token: string, handler: XsWatchHandler, wait?: XsWait): Promise<XsWatch>;
  async watch(
    path: string,
    tokenOrHandler: string | XsWatchHandler,
    handlerOrWait?: XsWatchHandler | XsWait,
    lastWait?: XsWait,
  ): Promise<XsWatch> {
    const token = typeof tokenOrHandler === 'string' ? tokenOrHandler : `xs${this.nextToken++}`;
    const handler = typeof tokenOrHandler === 'string' ? handlerOrWait : tokenOrHandler;
    const wait = typeof tokenOrHandler === 'string' ? lastWait : (handlerOrWait as XsWait | undefined);
    if (typeof handler !== 'function') throw new XenError('EINVAL', 'watch needs a handler');
    if (this.watches.has(token)) throw new XenError('EEXIST', `watch token ${token} in use`);
    // Registered first: xenstored fires right after its ack.
    const entry: WatchEntry = { path, token, handler };
    this.watches.set(token, entry);
    try {
      await this.cmd(XS_WATCH, 0, joinStrings([path, token]), wait);
    } catch (err) {
      if (this.watches.get(token) === entry) this.watches.delete(token);
      throw err;
    }
    return { path, token, unwatch: (w?: XsWait) => this.unwatch(path, token, w) };
  }

  /** Remove a watch; its handler runs no more from now on. */
  async unwatch(path: string, token: string, wait?: XsWait): Promise<void> {
    const entry = this.watches.get(token);
    if (entry !== undefined && entry.path === path) this.watches.delete(token);
    await this.cmd(XS_UNWATCH, 0, joinStrings([path, token]), wait);
  }

  /**
   * Run `fn` in a transaction and commit; when the commit (or an operation)
   * fails with EAGAIN because someone else changed what it touched, run it
   * again, up to `retries` times. Any other failure aborts and rethrows.
   */
  async transaction<T>(fn: (tx: XsTransaction) => Promise<T>, opts?: XsWait & { retries?: number }): Promise<T> {
    const retries = opts?.retries ?? this.txRetries;
    const dl = deadline(opts, this.timeoutMs * (retries + 1), 'xenstore transaction');
    const wait: XsWait = { signal: dl.signal, timeoutMs: this.timeoutMs };
    try {
      for (let attempt = 0; ; attempt++) {
        const outcome = await this.transactionOnce(fn, wait);
        if (outcome.done) return outcome.value;
        if (attempt >= retries) throw new XenError('EAGAIN', `transaction still conflicting after ${attempt + 1} attempts`);
        await sleep(TX_BACKOFF_MS * (attempt + 1) * (1 + Math.random()), dl.signal);
      }
    } finally {
      dl.dispose();
    }
  }

  private async transactionOnce<T>(
    fn: (tx: XsTransaction) => Promise<T>,
    wait: XsWait,
  ): Promise<{ done: true; value: T } | { done: false }> {
    const rsp = await this.cmd(XS_TRANSACTION_START, 0, joinStrings(['']), wait);
    const id = Number(splitStrings(rsp)[0]);
    if (!Number.isInteger(id) || id <= 0 || id > 0xffffffff) throw new XenError('EIO', `bad transaction id from xenstored`);
    const tx = new XsTransaction(this, id);
    let value: T;
    try {
      value = await fn(tx);
    } catch (err) {
      tx.ended = true;
      await this.cmd(XS_TRANSACTION_END, id, joinStrings(['F']), wait).catch(() => undefined);
      if (err instanceof XenError && err.code === 'EAGAIN') return { done: false };
      throw err;
    }
    tx.ended = true;
    try {
      await this.cmd(XS_TRANSACTION_END, id, joinStrings(['T']), wait);
    } catch (err) {
      if (err instanceof XenError && err.code === 'EAGAIN') return { done: false };
      throw err;
    }
    return { done: true, value };
  }

  /**
   * Wait until the node at `path` satisfies `want` (OpenBSD
   * xs_await_transition); returns the value that did. For xenbus states pass
   * the state number(s).
   */
  async awaitState(path: string, want: XsStateWant, wait?: XsWait): Promise<string | undefined> {
    const test = wantTest(want);
    const dl = deadline(wait, this.timeoutMs, `xenstore wait on ${path}`);
    let dirty = true;
    let wake: (() => void) | undefined;
    const onChange = (): void => {
      dirty = true;
      wake?.();
    };
    try {
      const w = await this.watch(path, onChange, { signal: dl.signal });
      try {
        for (;;) {
          if (!dirty) await this.changed(dl.signal, (f) => (wake = f));
          dirty = false;
          const value = await this.readMaybe(path, dl.signal);
          if (test(value)) return value;
        }
      } finally {
        await w.unwatch().catch(() => undefined);
      }
    } finally {
      dl.dispose();
    }
  }

  private changed(signal: AbortSignal, arm: (wake: () => void) => void): Promise<void> {
    return new Promise((resolve, reject) => {
      const onAbort = (): void => reject(abortReason(signal));
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      arm(() => {
        signal.removeEventListener('abort', onAbort);
        resolve();
      });
    });
  }

  private async readMaybe(path: string, signal: AbortSignal): Promise<string | undefined> {
    try {
      return await this.read(path, { signal });
    } catch (err) {
      if (err instanceof XenError && err.code === 'ENOENT') return undefined;
      throw err;
    }
  }
}

/** The same operations inside a transaction; dead once the transaction ends. */
export class XsTransaction {
  /** Set by XenStore.transaction when it commits or aborts. */
  ended = false;

  constructor(
    private readonly xs: XenStore,
    readonly id: number,
  ) {}

  private get tx(): number {
    if (this.ended) throw new XenError('EINVAL', `transaction ${this.id} has ended`);
    return this.id;
  }

  read(path: string, wait?: XsWait): Promise<string> {
    return xsRead(this.xs, this.tx, path, wait);
  }
  write(path: string, value: string | Uint8Array, wait?: XsWait): Promise<void> {
    return xsWrite(this.xs, this.tx, path, value, wait);
  }
  list(path: string, wait?: XsWait): Promise<string[]> {
    return xsList(this.xs, this.tx, path, wait);
  }
  rm(path: string, wait?: XsWait): Promise<void> {
    return xsAck(this.xs, this.tx, XS_RM, path, wait);
  }
  mkdir(path: string, wait?: XsWait): Promise<void> {
    return xsAck(this.xs, this.tx, XS_MKDIR, path, wait);
  }
  getPerms(path: string, wait?: XsWait): Promise<XsPerm[]> {
    return xsGetPerms(this.xs, this.tx, path, wait);
  }
  setPerms(path: string, perms: readonly XsPerm[], wait?: XsWait): Promise<void> {
    return xsSetPerms(this.xs, this.tx, path, perms, wait);
  }
  getNumber(path: string, wait?: XsWait): Promise<number> {
    return xsGetNumber(this.xs, this.tx, path, wait);
  }
  setNumber(path: string, value: number, wait?: XsWait): Promise<void> {
    return xsWrite(this.xs, this.tx, path, String(value), wait);
  }
}

// The operations, shared by XenStore and XsTransaction.

const ignore = (): void => undefined;

function xsRead(xs: XenStore, tx: number, path: string, wait?: XsWait): Promise<string> {
  return xs.request(XS_READ, tx, joinStrings([path]), wait, fromBytes);
}

function xsWrite(xs: XenStore, tx: number, path: string, value: string | Uint8Array, wait?: XsWait): Promise<void> {
  return xs.request(XS_WRITE, tx, joinWrite(path, value), wait, ignore);
}

function xsList(xs: XenStore, tx: number, path: string, wait?: XsWait): Promise<string[]> {
  return xs.request(XS_DIRECTORY, tx, joinStrings([path]), wait, splitStrings);
}

function xsAck(xs: XenStore, tx: number, type: number, path: string, wait?: XsWait): Promise<void> {
  return xs.request(type, tx, joinStrings([path]), wait, ignore);
}

async function xsGetPerms(xs: XenStore, tx: number, path: string, wait?: XsWait): Promise<XsPerm[]> {
  const rsp = await xs.cmd(XS_GET_PERMS, tx, joinStrings([path]), wait);
  try {
    return splitStrings(rsp).map(parsePerm);
  } catch {
    throw new XenError('EIO', `xenstored sent malformed permissions for ${path}`);
  }
}

async function xsSetPerms(xs: XenStore, tx: number, path: string, perms: readonly XsPerm[], wait?: XsWait): Promise<void> {
  if (perms.length === 0) throw new XenError('EINVAL', 'setPerms needs at least the owner entry');
  await xs.cmd(XS_SET_PERMS, tx, joinStrings([path, ...perms.map(formatPerm)]), wait);
}

/** A decimal value (OpenBSD xs_getnum); EINVAL when the node holds something else. */
async function xsGetNumber(xs: XenStore, tx: number, path: string, wait?: XsWait): Promise<number> {
  const value = await xsRead(xs, tx, path, wait);
  if (!/^-?\d+$/.test(value)) throw new XenError('EINVAL', `${path} holds ${JSON.stringify(value)}, not a number`);
  const n = Number(value);
  if (!Number.isSafeInteger(n)) throw new XenError('EINVAL', `${path} holds ${value}, out of range`);
  return n;
}
