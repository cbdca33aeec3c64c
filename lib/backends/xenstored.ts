// dom0's xenstored, transport-agnostic: one Xenstored holds the store, the
// introduced domains and every connection; a transport (the shared ring of a
// domain, XenstoredRing below, or later the unix socket) calls connect() and
// hands each whole request to receive(). Requests are answered in order,
// synchronously; watch events go out as changes are made.
//
// Mirrors C xenstored (tools/xenstore/xenstored_core.c, _watch.c,
// _transaction.c, _domain.c) in what goes on the wire: XS_ERROR carries the
// errno name, "OK" acks, watches fire once when set, relative paths live
// under /local/domain/<domid>.

import {
  XENSTORE_PAYLOAD_MAX,
  XS_CONTROL,
  XS_DIRECTORY,
  XS_DIRECTORY_PART,
  XS_ERROR,
  XS_GET_DOMAIN_PATH,
  XS_GET_PERMS,
  XS_INTRODUCE,
  XS_IS_DOMAIN_INTRODUCED,
  XS_MKDIR,
  XS_READ,
  XS_RELEASE,
  XS_RESET_WATCHES,
  XS_RESUME,
  XS_RM,
  XS_SET_PERMS,
  XS_SET_TARGET,
  XS_TRANSACTION_END,
  XS_TRANSACTION_START,
  XS_UNWATCH,
  XS_WATCH,
  XS_WATCH_EVENT,
  XS_WRITE,
  xsd_errors,
} from '../abi/xs_wire.js';
import { XenError } from '../errors.js';
import type { Page } from '../hypervisor/page.js';
import { logger, type Log } from '../log.js';
import { XsRing } from '../xenstore/ring.js';
import {
  countStrings,
  formatPerm,
  joinStrings,
  oneString,
  parsePerm,
  splitFirst,
  splitStrings,
  type XsMessage,
  type XsPerm,
} from '../xenstore/wire.js';
import {
  NO_NODE,
  XsDb,
  countOwners,
  canonicalize,
  domainPath,
  initialRoot,
  isChild,
  permFor,
  type XsCaller,
  type XsNode,
} from './xenstored-store.js';

/**
 * C xenstored's quotas (xenstored_core.c quota_*), per domain. Privileged
 * connections (dom0, the socket) are exempt, as C exempts them through
 * domain_is_unprivileged(); maxPendingEvents applies to everyone.
 */
export type XenstoredLimits = {
  /** Nodes a domain owns (quota_nb_entry_per_domain); ENOSPC beyond. */
  maxNodes: number;
  /** A node's record: header, permissions, value, child names (quota_max_entry_size); ENOSPC at or above. */
  maxNodeSizeBytes: number;
  /** ACL entries besides the owner's (quota_nb_perms_per_node); ENOSPC beyond. */
  maxPermsPerNode: number;
  /** Watches one connection may hold (quota_nb_watch_per_domain); E2BIG beyond. */
  maxWatches: number;
  /** Open transactions per connection (quota_max_transaction); ENOSPC beyond. */
  maxTransactions: number;
  /** Replies not yet on a domain's ring before xenstored stops reading it (quota_req_outstanding); no error, back-pressure. */
  maxOutstanding: number;
  /** Watch events held for a connection whose transport is backlogged; newer ones are dropped. */
  maxPendingEvents: number;
};

export type XenstoredOptions = {
  /**
   * XS_INTRODUCE from a privileged caller: map the domain's store page (gfn)
   * and bind its event channel, typically by building a XenstoredRing. Throw
   * a XenError to refuse. Without it the domain is only marked introduced.
   */
  introduce?: ((domid: number, gfn: number, evtchn: number) => void) | undefined;
  /** XS_RELEASE: undo what introduce did (its connections are already closed). */
  release?: ((domid: number) => void) | undefined;
  limits?: Partial<XenstoredLimits> | undefined;
};

export type XsConnectOptions = {
  /** Default: domid 0 is privileged. Socket clients connect as privileged dom0. */
  privileged?: boolean | undefined;
  /** Called once when xenstored closes the connection (XS_RELEASE, or close()). */
  onClose?: (() => void) | undefined;
};

/** Hand one message to the peer; false means "backlogged, I will call drain()". */
export type XsSend = (msg: XsMessage) => boolean | void;

export const DEFAULT_LIMITS: Readonly<XenstoredLimits> = {
  maxNodes: 1000,
  maxNodeSizeBytes: 2048,
  maxPermsPerNode: 5,
  maxWatches: 128,
  maxTransactions: 10,
  maxOutstanding: 20,
  maxPendingEvents: 256,
};
const PRIVILEGED_ONLY = new Set([XS_CONTROL, XS_INTRODUCE, XS_RELEASE, XS_IS_DOMAIN_INTRODUCED, XS_RESUME, XS_SET_TARGET]);
const IGNORES_TX = new Set([XS_WATCH, XS_UNWATCH]);
const WIRE_ERRORS = new Set(xsd_errors.map((e) => e.errstring));
const OK = joinStrings(['OK']);
const DOMID_MAX = 0x7fef; // DOMID_FIRST_RESERVED - 1

type TxOp =
  | { kind: 'write'; path: string; value: Uint8Array }
  | { kind: 'mkdir'; path: string }
  | { kind: 'rm'; path: string }
  | { kind: 'setPerms'; path: string; perms: readonly XsPerm[] };

type XsTx = { id: number; db: XsDb; accessed: Map<string, number>; ops: TxOp[] };

type XsWatchEntry = {
  /** As the client gave it: events for relative watches come back relative. */
  given: string;
  /** Canonical absolute path, or the special "@..." name. */
  node: string;
  token: string;
  relative: boolean;
};

function parseDomid(s: string | undefined): number {
  if (s === undefined || !/^\d{1,5}$/.test(s) || Number(s) > DOMID_MAX) {
    throw new XenError('EINVAL', `bad domid ${JSON.stringify(s)}`);
  }
  return Number(s);
}

/** The one string of a single-argument request (C onearg): exactly one NUL, at the end. */
function oneArg(payload: Uint8Array): string {
  const arg = oneString(payload);
  if (arg === undefined) throw new XenError('EINVAL', 'expected one NUL-terminated argument');
  return arg;
}

function wireErrorName(err: unknown, log: Log): string {
  if (err instanceof XenError) return WIRE_ERRORS.has(err.code) ? err.code : 'EINVAL';
  log('internal error: %O', err);
  return 'EIO';
}

export class Xenstored {
  readonly limits: XenstoredLimits;
  readonly log: Log;
  private readonly opts: XenstoredOptions;
  private genCounter = 0;
  private readonly nextGen = (): number => ++this.genCounter;
  /** The live store; transactions fork it. */
  readonly db: XsDb;
  private readonly connections = new Set<XsConnection>();
  private readonly introduced = new Set<number>([0]);
  private readonly targets = new Map<number, number>();

  constructor(opts: XenstoredOptions = {}) {
    this.opts = opts;
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.log = logger('xenstored');
    const root = initialRoot(this.nextGen);
    this.db = new XsDb(root, this.nextGen, {
      fire: (path, perms, exact) => this.fireWatches(path, perms, exact),
    }, countOwners(root), this.limits);
  }

  /** A new client: a domain's ring, or a socket. Its replies and events go to `send`. */
  connect(domid: number, send: XsSend, opts: XsConnectOptions = {}): XsConnection {
    const conn = new XsConnection(this, domid, opts.privileged ?? domid === 0, send, opts.onClose);
    this.connections.add(conn);
    return conn;
  }

  isIntroduced(domid: number): boolean {
    return this.introduced.has(domid);
  }

  /** @internal for XsConnection */
  forget(conn: XsConnection): void {
    this.connections.delete(conn);
  }

  /** @internal: the caller a connection acts as, with its XS_SET_TARGET target. */
  caller(conn: XsConnection): XsCaller {
    return { domid: conn.domid, privileged: conn.privileged, target: this.targets.get(conn.domid) };
  }

  /** C xenstored fire_watches: every connection's matching watches that may see the node. */
  fireWatches(path: string, perms: readonly (readonly XsPerm[])[], exact: boolean): void {
    for (const conn of this.connections) {
      const caller = this.caller(conn);
      if (!perms.some((p) => permFor(caller, p).read)) continue;
      conn.fire(path, exact);
    }
  }

  /** @introduceDomain, @releaseDomain: to everyone watching that name. */
  fireSpecial(name: string): void {
    for (const conn of this.connections) conn.fire(name, true);
  }

  /** A fork of the live store for a transaction; it records what it looks at. */
  forkDb(accessed: Map<string, number>): XsDb {
    // What a node was when the transaction began, not after the transaction's
    // own changes: a node it removed and wrote again is no conflict.
    const start = this.db.root;
    return new XsDb(start, this.nextGen, {
      touch: (path) => {
        if (!accessed.has(path)) accessed.set(path, peekRoot(start, path)?.gen ?? NO_NODE);
      },
    }, new Map(this.db.owned), this.limits);
  }

  /**
   * Commit: if no node the transaction looked at has changed since, replay
   * its operations on a fork of the live store, then publish the fork and
   * fire the watches it collected. All or nothing; EAGAIN on conflict.
   */
  commit(caller: XsCaller, tx: XsTx): void {
    for (const [path, gen] of tx.accessed) {
      const now = peek(this.db, path)?.gen ?? NO_NODE;
      if (now !== gen) throw new XenError('EAGAIN', `transaction ${tx.id}: ${path} changed`);
    }
    const events: [string, readonly (readonly XsPerm[])[], boolean][] = [];
    const scratch = new XsDb(this.db.root, this.nextGen, { fire: (...e) => events.push(e) }, new Map(this.db.owned), this.limits);
    try {
      for (const op of tx.ops) applyOp(scratch, caller, op);
    } catch (err) {
      this.log('transaction %d replay failed: %O', tx.id, err);
      throw new XenError('EAGAIN', `transaction ${tx.id}: replay failed`);
    }
    this.db.root = scratch.root;
    this.db.owned = scratch.owned;
    for (const [path, perms, exact] of events) this.fireWatches(path, perms, exact);
  }

  // --- domains (C xenstored_domain.c) ---

  introduce(domid: number, gfn: number, evtchn: number): void {
    if (this.introduced.has(domid)) return; // C re-binds the channel; our owner keeps its binding
    this.opts.introduce?.(domid, gfn, evtchn);
    this.introduced.add(domid);
    this.fireSpecial('@introduceDomain');
  }

  release(domid: number): void {
    if (domid === 0) throw new XenError('EINVAL', 'cannot release dom0');
    if (!this.introduced.has(domid)) throw new XenError('ENOENT', `domain ${domid} not introduced`);
    this.introduced.delete(domid);
    this.targets.delete(domid);
    for (const conn of [...this.connections]) if (conn.domid === domid && !conn.privileged) conn.close();
    this.db.forgetDomain(domid);
    this.opts.release?.(domid);
    this.fireSpecial('@releaseDomain');
  }

  setTarget(domid: number, target: number): void {
    if (!this.introduced.has(domid) || !this.introduced.has(target)) throw new XenError('ENOENT', 'domain not introduced');
    this.targets.set(domid, target);
  }
}

/** Look a node up without recording the access. */
function peek(db: XsDb, path: string): { gen: number } | undefined {
  return peekRoot(db.root, path);
}

function peekRoot(root: XsNode, path: string): { gen: number } | undefined {
  let node = root;
  if (path === '/') return node;
  for (const name of path.slice(1).split('/')) {
    const child = node.children.get(name);
    if (child === undefined) return undefined;
    node = child;
  }
  return node;
}

function applyOp(db: XsDb, caller: XsCaller, op: TxOp): void {
  switch (op.kind) {
    case 'write':
      return db.write(caller, op.path, op.value);
    case 'mkdir':
      return db.mkdir(caller, op.path);
    case 'rm':
      return db.rm(caller, op.path);
    case 'setPerms':
      return db.setPerms(caller, op.path, op.perms);
  }
}

/** One client of xenstored (C struct connection). */
export class XsConnection {
  private readonly log: Log;
  private readonly watches: XsWatchEntry[] = [];
  private readonly txs = new Map<number, XsTx>();
  private nextTxId = 1;
  private readonly pendingEvents: XsMessage[] = [];
  private backlogged = false;
  private droppedEvents = 0;
  /** Something to send right after the current request's reply. */
  private afterReply: (() => void) | undefined;
  closed = false;

  constructor(
    private readonly xsd: Xenstored,
    readonly domid: number,
    readonly privileged: boolean,
    private readonly send: XsSend,
    private readonly onClose: (() => void) | undefined,
  ) {
    this.log = logger('xenstored', `dom${domid}`);
  }

  /** One whole request from the transport; the answer goes out before this returns. */
  receive(msg: XsMessage): void {
    if (this.closed) return;
    let type = msg.type;
    let payload: Uint8Array;
    try {
      payload = this.process(msg);
      if (payload.length > XENSTORE_PAYLOAD_MAX) throw new XenError('E2BIG', 'reply too large');
    } catch (err) {
      type = XS_ERROR;
      payload = joinStrings([wireErrorName(err, this.log)]);
    }
    this.output({ type, req_id: msg.req_id, tx_id: msg.tx_id, payload });
    const after = this.afterReply;
    this.afterReply = undefined;
    if (type !== XS_ERROR) after?.();
  }

  /** The transport has room again: send the watch events held back. */
  drain(): void {
    this.backlogged = false;
    while (!this.backlogged && !this.closed) {
      const ev = this.pendingEvents.shift();
      if (ev === undefined) break;
      this.output(ev);
    }
  }

  /** The guest reconnected its ring: forget its watches, transactions and held events (C domain_conn_reset). */
  reset(): void {
    this.watches.length = 0;
    this.txs.clear();
    this.pendingEvents.length = 0;
    this.backlogged = false;
  }

  /** Drop watches and transactions and stop answering (C ignore_connection). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watches.length = 0;
    this.txs.clear();
    this.pendingEvents.length = 0;
    this.xsd.forget(this);
    this.onClose?.();
  }

  private output(msg: XsMessage): void {
    if (this.send(msg) === false) this.backlogged = true;
  }

  /** C xenstored process_message: privilege, then the transaction, then the operation. */
  private process(msg: XsMessage): Uint8Array {
    if (PRIVILEGED_ONLY.has(msg.type) && !this.privileged) throw new XenError('EACCES', 'privileged operation');
    let tx: XsTx | undefined;
    if (!IGNORES_TX.has(msg.type) && msg.tx_id !== 0) {
      tx = this.txs.get(msg.tx_id);
      if (tx === undefined) throw new XenError('ENOENT', `no transaction ${msg.tx_id}`);
    }
    return this.dispatch(msg.type, msg.payload, tx);
  }

  private dispatch(type: number, payload: Uint8Array, tx: XsTx | undefined): Uint8Array {
    const caller = this.xsd.caller(this);
    const db = tx?.db ?? this.xsd.db;
    switch (type) {
      case XS_READ:
        return db.read(caller, this.path(oneArg(payload)));
      case XS_DIRECTORY:
        return joinStrings(db.directory(caller, this.path(oneArg(payload))));
      case XS_DIRECTORY_PART:
        return this.directoryPart(db, caller, payload);
      case XS_GET_PERMS:
        return joinStrings(db.getPerms(caller, this.path(oneArg(payload))).map(formatPerm));
      case XS_WRITE:
      case XS_MKDIR:
      case XS_RM:
      case XS_SET_PERMS:
        return this.modify(db, caller, tx, parseModify(type, payload, (p) => this.path(p)));
      case XS_WATCH:
        return this.watch(payload);
      case XS_UNWATCH:
        return this.unwatch(payload);
      case XS_RESET_WATCHES:
        this.watches.length = 0;
        this.txs.clear();
        return OK;
      case XS_TRANSACTION_START:
        return this.transactionStart(payload, tx);
      case XS_TRANSACTION_END:
        return this.transactionEnd(payload, tx);
      default:
        return this.domainOp(type, payload);
    }
  }

  private domainOp(type: number, payload: Uint8Array): Uint8Array {
    const args = splitStrings(payload);
    switch (type) {
      case XS_GET_DOMAIN_PATH:
        return joinStrings([domainPath(parseDomid(oneArg(payload)))]);
      case XS_IS_DOMAIN_INTRODUCED:
        return joinStrings([this.xsd.isIntroduced(parseDomid(oneArg(payload))) ? 'T' : 'F']);
      case XS_INTRODUCE: {
        if (countStrings(payload) < 3) throw new XenError('EINVAL', 'INTRODUCE needs domid, gfn and evtchn');
        const [gfn, evtchn] = [Number(args[1]), Number(args[2])];
        if (!Number.isSafeInteger(gfn) || gfn < 0 || !Number.isInteger(evtchn) || evtchn <= 0) {
          throw new XenError('EINVAL', 'bad gfn or event channel');
        }
        this.xsd.introduce(parseDomid(args[0]), gfn, evtchn);
        return OK;
      }
      case XS_RELEASE:
        this.xsd.release(parseDomid(oneArg(payload)));
        return OK;
      case XS_RESUME:
        if (!this.xsd.isIntroduced(parseDomid(oneArg(payload)))) throw new XenError('ENOENT', 'domain not introduced');
        return OK;
      case XS_SET_TARGET:
        if (countStrings(payload) !== 2) throw new XenError('EINVAL', 'SET_TARGET needs domid and target');
        this.xsd.setTarget(parseDomid(args[0]), parseDomid(args[1]));
        return OK;
      case XS_CONTROL:
        throw new XenError('ENOSYS', 'XS_CONTROL is not implemented');
      default:
        throw new XenError('EINVAL', `unknown message type ${type}`);
    }
  }

  /** A request path made absolute under this connection's domain. */
  private path(given: string): string {
    return canonicalize(this.domid, given);
  }

  private modify(db: XsDb, caller: XsCaller, tx: XsTx | undefined, op: TxOp): Uint8Array {
    applyOp(db, caller, op);
    tx?.ops.push(op);
    return OK;
  }

  private directoryPart(db: XsDb, caller: XsCaller, payload: Uint8Array): Uint8Array {
    const [path, offset] = splitStrings(payload);
    if (countStrings(payload) !== 2 || path === undefined || !/^\d+$/.test(offset ?? '')) {
      throw new XenError('EINVAL', 'DIRECTORY_PART needs a path and an offset');
    }
    return db.directoryPart(caller, this.path(path), Number(offset));
  }

  // --- watches (C xenstored_watch.c) ---

  private watch(payload: Uint8Array): Uint8Array {
    const entry = this.watchEntry(payload);
    if (this.watches.some((w) => w.node === entry.node && w.token === entry.token)) {
      throw new XenError('EEXIST', `watch ${entry.given} ${entry.token} exists`);
    }
    if (!this.privileged && this.watches.length >= this.xsd.limits.maxWatches) throw new XenError('E2BIG', 'too many watches');
    this.watches.push(entry);
    // C do_watch acks first, then fires once so the client need not read first.
    this.afterReply = () => this.event(entry, entry.given);
    return OK;
  }

  private unwatch(payload: Uint8Array): Uint8Array {
    const entry = this.watchEntry(payload);
    const i = this.watches.findIndex((w) => w.node === entry.node && w.token === entry.token);
    if (i < 0) throw new XenError('ENOENT', `no watch ${entry.given} ${entry.token}`);
    this.watches.splice(i, 1);
    return OK;
  }

  private watchEntry(payload: Uint8Array): XsWatchEntry {
    const [given, token] = splitStrings(payload);
    if (countStrings(payload) !== 2 || given === undefined || token === undefined) {
      throw new XenError('EINVAL', 'WATCH needs a path and a token');
    }
    if (given.startsWith('@')) {
      if (!isValidSpecial(given)) throw new XenError('EINVAL', `invalid watch path ${given}`);
      return { given, node: given, token, relative: false };
    }
    return { given, node: this.path(given), token, relative: !given.startsWith('/') };
  }

  /** @internal: a change at `path`; send an event for each matching watch. */
  fire(path: string, exact: boolean): void {
    if (this.closed) return;
    for (const w of this.watches) {
      if (exact ? w.node === path : isChild(path, w.node)) this.event(w, this.eventPath(w, path));
    }
  }

  private eventPath(w: XsWatchEntry, path: string): string {
    if (!w.relative) return path;
    const home = `${domainPath(this.domid)}/`;
    return path.startsWith(home) ? path.slice(home.length) : path;
  }

  private event(w: XsWatchEntry, path: string): void {
    if (this.closed) return;
    const msg: XsMessage = { type: XS_WATCH_EVENT, req_id: 0, tx_id: 0, payload: joinStrings([path, w.token]) };
    if (!this.backlogged && this.pendingEvents.length === 0) {
      this.output(msg);
    } else if (this.pendingEvents.length < this.xsd.limits.maxPendingEvents) {
      this.pendingEvents.push(msg);
    } else if (this.droppedEvents++ === 0) {
      this.log('dropping watch events: %d pending', this.pendingEvents.length);
    }
  }

  // --- transactions (C xenstored_transaction.c) ---

  private transactionStart(payload: Uint8Array, tx: XsTx | undefined): Uint8Array {
    if (tx !== undefined) throw new XenError('EBUSY', 'transactions do not nest');
    oneArg(payload);
    if (!this.privileged && this.txs.size >= this.xsd.limits.maxTransactions) throw new XenError('ENOSPC', 'too many transactions');
    let id = this.nextTxId;
    while (id === 0 || this.txs.has(id)) id = (id + 1) >>> 0;
    this.nextTxId = (id + 1) >>> 0;
    const accessed = new Map<string, number>();
    this.txs.set(id, { id, db: this.xsd.forkDb(accessed), accessed, ops: [] });
    return joinStrings([String(id)]);
  }

  private transactionEnd(payload: Uint8Array, tx: XsTx | undefined): Uint8Array {
    if (tx === undefined) throw new XenError('ENOENT', 'no transaction to end');
    const arg = oneArg(payload);
    if (arg !== 'T' && arg !== 'F') throw new XenError('EINVAL', 'TRANSACTION_END takes T or F');
    this.txs.delete(tx.id);
    if (arg === 'T') this.xsd.commit(this.xsd.caller(this), tx);
    return OK;
  }
}

function isValidSpecial(name: string): boolean {
  return /^@[A-Za-z0-9\-/_@]+$/.test(name) && name.length <= 2048;
}

function parseModify(type: number, payload: Uint8Array, path: (given: string) => string): TxOp {
  switch (type) {
    case XS_WRITE: {
      const split = splitFirst(payload);
      if (split === undefined) throw new XenError('EINVAL', 'WRITE needs a path');
      return { kind: 'write', path: path(split[0]), value: split[1].slice() };
    }
    case XS_MKDIR:
      return { kind: 'mkdir', path: path(oneArg(payload)) };
    case XS_RM:
      return { kind: 'rm', path: path(oneArg(payload)) };
    default: {
      const [given, ...perms] = splitStrings(payload);
      if (countStrings(payload) < 2 || given === undefined) throw new XenError('EINVAL', 'SET_PERMS needs a path and permissions');
      return { kind: 'setPerms', path: path(given), perms: perms.map(parsePerm) };
    }
  }
}

/**
 * xenstored's end of a domain's store ring (C xenstored_domain.c): bytes from
 * the guest's page go through the decoder into a connection, answers and
 * events go back. The owner maps the page, binds the event channel, passes
 * its notify here and calls intr() when the channel fires.
 */
export class XenstoredRing {
  readonly conn: XsConnection;
  private readonly ring: XsRing;

  constructor(xsd: Xenstored, domid: number, page: Page, notify: () => void) {
    const log = logger('xenstored', `ring${domid}`);
    this.conn = xsd.connect(domid, (msg) => this.ring.send(msg), { onClose: () => this.ring.close() });
    this.ring = new XsRing({
      page,
      side: 'back',
      notify,
      deliver: (msg) => this.conn.receive(msg),
      // A guest that breaks the protocol loses its connection; others go on.
      broken: () => this.conn.close(),
      // Stop taking requests from a guest that does not read its answers.
      highWaterBytes: 2 * (XENSTORE_PAYLOAD_MAX + 16),
      highWaterMessages: this.conn.privileged ? undefined : xsd.limits.maxOutstanding,
      drained: () => this.conn.drain(),
      reconnect: () => this.conn.reset(),
      log,
      traceName: `xenstored.dom${domid}`,
    });
  }

  /** The guest's event; false when it brought nothing (a spurious event). */
  intr(): boolean {
    return this.ring.intr();
  }

  /** Set once the guest broke the protocol or the connection was closed. */
  get error(): XenError | undefined {
    return this.ring.error;
  }

  close(): void {
    this.conn.close();
  }
}
