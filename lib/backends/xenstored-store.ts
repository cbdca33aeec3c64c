// xenstored's database: a tree of nodes, each with a value, permissions and
// children, and the operations on it with C xenstored's semantics (do_read,
// do_write, do_mkdir, do_rm, do_get_perms, do_set_perms, send_directory).
//
// Nodes are immutable and updates copy the path from the root, so a
// transaction's snapshot is just the root it started from. Every node carries
// the generation at which its value, permissions or child list last changed;
// a transaction records the generation of each node it looked at and commits
// only if none moved meanwhile.

import { XENSTORE_ABS_PATH_MAX, XENSTORE_PAYLOAD_MAX, XENSTORE_REL_PATH_MAX } from '../abi/xs_wire.js';
import { XenError } from '../errors.js';
import { canRead, canWrite, joinStrings, toBytes, type XsPerm } from '../xenstore/wire.js';

export type XsNode = {
  readonly value: Uint8Array;
  readonly perms: readonly XsPerm[];
  readonly children: ReadonlyMap<string, XsNode>;
  readonly gen: number;
};

/** Who asks: a domain (and the domain it is a device model for, XS_SET_TARGET); dom0 is privileged. */
export type XsCaller = { readonly domid: number; readonly privileged: boolean; readonly target?: number | undefined };

/** The generation recorded for a node that does not exist. */
export const NO_NODE = -1;

export type XsDbHooks = {
  /** A transaction's db records every node an operation looks at. */
  touch?: ((path: string, gen: number) => void) | undefined;
  /**
   * The live db fires watches: on `path` and its ancestors' watchers, or on
   * `path` alone when `exact`. A watcher must be able to read the node under
   * one of `perms` (before or after the change).
   */
  fire?: ((path: string, perms: readonly (readonly XsPerm[])[], exact: boolean) => void) | undefined;
};

/**
 * C xenstored's per-domain node quotas, checked only for unprivileged
 * callers as C's domain_is_unprivileged() does; each answers ENOSPC.
 */
export type XsQuota = {
  /** Nodes a domain may own (C quota_nb_entry_per_domain). */
  maxNodes: number;
  /** A node's record size, value and child names included (C quota_max_entry_size). */
  maxNodeSizeBytes: number;
  /** ACL entries beyond the owner's (C quota_nb_perms_per_node). */
  maxPermsPerNode: number;
};

/** Nodes per owning domain; a fork of the store carries a copy. */
export type XsOwned = Map<number, number>;

/** C struct xs_tdb_record_hdr: u64 generation, u32 num_perms, datalen, childlen, padded to 8. */
const RECORD_HDR_BYTES = 24;
/** C struct xs_permissions: perm and domid, 4 bytes each. */
const PERM_BYTES = 8;

/** C write_node_raw's data.dsize: header, permissions, value, NUL-ended child names. */
export function nodeSizeBytes(value: Uint8Array, nrPerms: number, childNames: Iterable<string>): number {
  let size = RECORD_HDR_BYTES + nrPerms * PERM_BYTES + value.length;
  for (const name of childNames) size += name.length + 1;
  return size;
}

/** Count every node of a tree by owner, for a store built from scratch. */
export function countOwners(root: XsNode): XsOwned {
  const owned: XsOwned = new Map();
  const add = (n: XsNode): void => {
    const owner = n.perms[0]?.domid ?? 0;
    owned.set(owner, (owned.get(owner) ?? 0) + 1);
  };
  add(root);
  forEachDescendant('/', root, (_p, n) => add(n));
  return owned;
}

const EMPTY = new Uint8Array(0);
const NO_CHILDREN: ReadonlyMap<string, XsNode> = new Map();
const VALID_CHARS = /^[A-Za-z0-9\-/_@]*$/;
const LOCAL_DOMAIN = /^\/local\/domain\/\d{1,5}\//;

export function domainPath(domid: number): string {
  return `/local/domain/${domid}`;
}

const SLASH = 0x2f;
/** The characters of a node name besides "/": A-Z a-z 0-9 - _ @ (VALID_CHARS), by char code. */
const NAME_CHAR = new Uint8Array(128);
for (let c = 0; c < 128; c++) NAME_CHAR[c] = c !== SLASH && VALID_CHARS.test(String.fromCharCode(c)) ? 1 : 0;

/** C xenstored is_valid_nodename: absolute, no "//", no trailing "/", bounded length, plain characters. */
export function isValidNodename(path: string): boolean {
  const n = path.length;
  if (n === 0 || path.charCodeAt(0) !== SLASH || n > XENSTORE_ABS_PATH_MAX) return false;
  if (n > 1 && path.charCodeAt(n - 1) === SLASH) return false;
  for (let i = 1, prev = SLASH; i < n; i++) {
    const c = path.charCodeAt(i);
    if (c === SLASH ? prev === SLASH : c >= 128 || NAME_CHAR[c] === 0) return false;
    prev = c;
  }
  // Below a domain's home the limit counts from the home; only a long path can reach it.
  if (n <= XENSTORE_REL_PATH_MAX) return true;
  const localOff = LOCAL_DOMAIN.exec(path)?.[0].length ?? 0;
  return n <= localOff + XENSTORE_REL_PATH_MAX;
}

/** A request's path made absolute (relative ones live under the caller's home); EINVAL if malformed. */
export function canonicalize(domid: number, path: string): string {
  const abs = path.startsWith('/') ? path : `${domainPath(domid)}/${path}`;
  if (!isValidNodename(abs)) throw new XenError('EINVAL', `invalid path ${JSON.stringify(path.slice(0, 80))}`);
  return abs;
}

export function parentOf(path: string): string {
  const slash = path.lastIndexOf('/');
  return slash <= 0 ? '/' : path.slice(0, slash);
}

function partsOf(path: string): string[] {
  return path === '/' ? [] : path.slice(1).split('/');
}

function childPath(path: string, name: string): string {
  return path === '/' ? `/${name}` : `${path}/${name}`;
}

/** Watch matching: `path` is `watched` or below it. */
export function isChild(path: string, watched: string): boolean {
  return watched === '/' || path === watched || path.startsWith(`${watched}/`);
}

type Access = { read: boolean; write: boolean; owner: boolean };

const ALL: Access = Object.freeze({ read: true, write: true, owner: true });
const NONE: Access = Object.freeze({ read: false, write: false, owner: false });

/** C xenstored perm_for_conn: owner and privileged get everything, then the ACL, then the default. */
export function permFor(caller: XsCaller, perms: readonly XsPerm[]): Access {
  const owner = perms[0];
  if (owner === undefined) return NONE;
  const isMe = (domid: number): boolean => domid === caller.domid || domid === caller.target;
  if (caller.privileged || isMe(owner.domid)) return ALL;
  const entry = perms.slice(1).find((p) => isMe(p.domid)) ?? owner;
  return { read: canRead(entry.perm), write: canWrite(entry.perm), owner: false };
}

export function newNode(value: Uint8Array, perms: readonly XsPerm[], gen: number): XsNode {
  return { value, perms, children: NO_CHILDREN, gen };
}

type Need = 'read' | 'write' | 'owner';

export class XsDb {
  constructor(
    public root: XsNode,
    private readonly nextGen: () => number,
    private readonly hooks: XsDbHooks = {},
    public owned: XsOwned = countOwners(root),
    private readonly quota: XsQuota | undefined = undefined,
  ) {}

  private own(domid: number | undefined, delta: number): void {
    const id = domid ?? 0;
    const n = (this.owned.get(id) ?? 0) + delta;
    if (n > 0) this.owned.set(id, n);
    else this.owned.delete(id);
  }

  /** C write_node_raw's size check: ENOSPC for an unprivileged writer over quota_max_entry_size. */
  private checkSize(caller: XsCaller, path: string, value: Uint8Array, nrPerms: number, childNames: Iterable<string>): void {
    if (this.quota === undefined || caller.privileged) return;
    if (nodeSizeBytes(value, nrPerms, childNames) >= this.quota.maxNodeSizeBytes) {
      throw new XenError('ENOSPC', `${path}: node would exceed ${this.quota.maxNodeSizeBytes} bytes`);
    }
  }

  /** The node at an absolute path, recorded as looked at. */
  lookup(path: string): XsNode | undefined {
    let node: XsNode | undefined = this.root;
    // Name by name, without splitting the path into an array.
    for (let start = 1; path !== '/' && node !== undefined; ) {
      const slash = path.indexOf('/', start);
      node = node.children.get(slash < 0 ? path.slice(start) : path.slice(start, slash));
      if (slash < 0) break;
      start = slash + 1;
    }
    this.hooks.touch?.(path, node?.gen ?? NO_NODE);
    return node;
  }

  /**
   * C xenstored get_node: the node if the caller may `need` it. When it is
   * missing or forbidden and the nearest existing ancestor does not grant
   * `need` either, the answer is EACCES, so a domain learns nothing about
   * trees it cannot see.
   */
  access(caller: XsCaller, path: string, need: Need): XsNode {
    const node = this.lookup(path);
    let code = 'ENOENT';
    if (node !== undefined) {
      const a = permFor(caller, node.perms);
      if (a[need] && (need !== 'owner' || a.write)) return node;
      code = 'EACCES';
    }
    if (code === 'ENOENT' && !this.parentsGrant(caller, path, need)) code = 'EACCES';
    throw new XenError(code, `${path}: ${code === 'ENOENT' ? 'no such node' : 'permission denied'}`);
  }

  /** The node, or undefined when it is missing but its nearest ancestor would let the caller create it. */
  private accessOrMissing(caller: XsCaller, path: string, need: Need): XsNode | undefined {
    try {
      return this.access(caller, path, need);
    } catch (err) {
      if (err instanceof XenError && err.code === 'ENOENT') return undefined;
      throw err;
    }
  }

  /** C xenstored ask_parents. */
  private parentsGrant(caller: XsCaller, path: string, need: Need): boolean {
    let at = path;
    while (at !== '/') {
      at = parentOf(at);
      const node = this.lookup(at);
      if (node !== undefined) return permFor(caller, node.perms)[need === 'read' ? 'read' : 'write'];
    }
    return false;
  }

  read(caller: XsCaller, path: string): Uint8Array {
    return this.access(caller, path, 'read').value;
  }

  directory(caller: XsCaller, path: string): string[] {
    return [...this.access(caller, path, 'read').children.keys()];
  }

  /**
   * C xenstored send_directory_part: the node's generation, then whole child
   * names from byte `offset` of the NUL-joined list as fit in a payload, with
   * an extra NUL once the list is finished.
   */
  directoryPart(caller: XsCaller, path: string, offset: number): Uint8Array {
    const node = this.access(caller, path, 'read');
    const gen = joinStrings([String(node.gen)]);
    const names = [...node.children.keys()].map((n) => toBytes(`${n}\0`));
    const maxLen = XENSTORE_PAYLOAD_MAX - gen.length - 1;
    const chunks: Uint8Array[] = [gen];
    let at = 0;
    let len = 0;
    let done = true;
    for (const name of names) {
      if (at >= offset) {
        if (len + name.length > maxLen) {
          done = false;
          break;
        }
        chunks.push(name);
        len += name.length;
      }
      at += name.length;
    }
    if (done) chunks.push(new Uint8Array(1));
    return concat(chunks);
  }

  getPerms(caller: XsCaller, path: string): readonly XsPerm[] {
    return this.access(caller, path, 'read').perms;
  }

  /** C xenstored do_write: replace the value, or create the node and any missing ancestors. */
  write(caller: XsCaller, path: string, value: Uint8Array): void {
    const node = this.accessOrMissing(caller, path, 'write');
    let perms: readonly XsPerm[];
    if (node === undefined) {
      perms = this.create(caller, path, value).perms;
    } else {
      this.checkSize(caller, path, value, node.perms.length, node.children.keys());
      this.replace(path, { ...node, value, gen: this.nextGen() });
      perms = node.perms;
    }
    this.hooks.fire?.(path, [perms], false);
  }

  /** C xenstored do_mkdir: an existing node is fine and fires nothing. */
  mkdir(caller: XsCaller, path: string): void {
    if (this.accessOrMissing(caller, path, 'write') !== undefined) return;
    const created = this.create(caller, path, EMPTY);
    this.hooks.fire?.(path, [created.perms], false);
  }

  /**
   * C xenstored do_rm: removing a missing node whose parent exists is fine.
   * Watchers of the node and its ancestors hear of the node, watchers of
   * each removed descendant hear of that descendant.
   */
  rm(caller: XsCaller, path: string): void {
    const node = this.accessOrMissing(caller, path, 'write');
    if (node === undefined) {
      if (path !== '/' && this.lookup(parentOf(path)) !== undefined) return;
      throw new XenError('ENOENT', `${path}: no such node`);
    }
    if (path === '/') throw new XenError('EINVAL', 'cannot remove /');
    const fire = this.hooks.fire;
    if (fire !== undefined) {
      fire(path, [node.perms], false);
      forEachDescendant(path, node, (p, n) => fire(p, [n.perms], true));
    }
    this.own(node.perms[0]?.domid, -1);
    forEachDescendant(path, node, (_p, n) => this.own(n.perms[0]?.domid, -1));
    this.replace(path, undefined);
  }

  /** C xenstored do_set_perms: owner or privileged only; only the privileged change the owner. */
  setPerms(caller: XsCaller, path: string, perms: readonly XsPerm[]): void {
    if (perms.length === 0) throw new XenError('EINVAL', 'no permissions given');
    const node = this.access(caller, path, 'owner');
    if (!caller.privileged && perms[0]?.domid !== node.perms[0]?.domid) {
      throw new XenError('EPERM', `${path}: only a privileged domain changes the owner`);
    }
    if (this.quota !== undefined && !caller.privileged && perms.length > this.quota.maxPermsPerNode + 1) {
      throw new XenError('ENOSPC', `${path}: more than ${this.quota.maxPermsPerNode} permissions besides the owner's`);
    }
    this.checkSize(caller, path, node.value, perms.length, node.children.keys());
    this.own(node.perms[0]?.domid, -1);
    this.own(perms[0]?.domid, +1);
    this.replace(path, { ...node, perms, gen: this.nextGen() });
    this.hooks.fire?.(path, [node.perms, perms], false);
  }

  /**
   * XSA-322: a released domain's id leaves every ACL, so a later domain that
   * gets the same id inherits no access. An entry naming it goes; a node it
   * owned passes to dom0, keeping its default permission. No watch fires.
   */
  forgetDomain(domid: number): void {
    const strip = (node: XsNode): XsNode => {
      let children = node.children;
      for (const [name, child] of node.children) {
        const next = strip(child);
        if (next === child) continue;
        if (children === node.children) children = new Map(node.children);
        (children as Map<string, XsNode>).set(name, next);
      }
      const mentions = node.perms.some((p) => p.domid === domid);
      if (!mentions && children === node.children) return node;
      let perms = node.perms;
      if (mentions) {
        const [owner, ...rest] = node.perms;
        const head = owner !== undefined && owner.domid === domid ? { domid: 0, perm: owner.perm } : owner;
        perms = [...(head === undefined ? [] : [head]), ...rest.filter((p) => p.domid !== domid)];
      }
      return { ...node, perms, children, gen: mentions ? this.nextGen() : node.gen };
    };
    this.root = strip(this.root);
    this.owned = countOwners(this.root);
  }

  /**
   * C xenstored construct_node: missing ancestors and the node itself, each
   * inheriting its parent's permissions; an unprivileged creator becomes
   * the owner. An unprivileged creator is held to its node quota (C
   * domain_nbentry, ENOSPC) and the parent to its size quota.
   */
  private create(caller: XsCaller, path: string, value: Uint8Array): XsNode {
    const missing: string[] = [];
    let at = path;
    let parent: XsNode | undefined;
    for (;;) {
      missing.unshift(at);
      at = parentOf(at);
      parent = this.lookup(at);
      if (parent !== undefined) break;
    }
    this.checkCreate(caller, at, parent, missing, value);
    let perms = parent.perms;
    let created = parent;
    for (const p of missing) {
      if (!caller.privileged) perms = [{ ...(perms[0] ?? { perm: 'n' }), domid: caller.domid }, ...perms.slice(1)];
      created = newNode(p === path ? value : EMPTY, perms, this.nextGen());
      this.own(perms[0]?.domid, +1);
      this.replace(p, created);
    }
    return created;
  }

  /** Before creating `missing` under the existing `parent` at `at`: the quotas C checks on the way. */
  private checkCreate(caller: XsCaller, at: string, parent: XsNode, missing: readonly string[], value: Uint8Array): void {
    const quota = this.quota;
    if (quota === undefined || caller.privileged) return;
    if ((this.owned.get(caller.domid) ?? 0) + missing.length > quota.maxNodes) {
      throw new XenError('ENOSPC', `domain ${caller.domid} would own more than ${quota.maxNodes} nodes`);
    }
    const first = missing[0] ?? at;
    const name = first.slice(first.lastIndexOf('/') + 1);
    this.checkSize(caller, at, parent.value, parent.perms.length, [...parent.children.keys(), name]);
    const last = missing[missing.length - 1] ?? at;
    this.checkSize(caller, last, value, parent.perms.length, []);
  }

  /** Put `node` at `path` (or remove what is there), copying the path from the root. */
  private replace(path: string, node: XsNode | undefined): void {
    const parts = partsOf(path);
    if (parts.length === 0) {
      if (node === undefined) throw new XenError('EINVAL', 'cannot remove /');
      this.root = node;
      return;
    }
    this.root = this.replaceIn(this.root, parts, 0, node);
  }

  private replaceIn(at: XsNode, parts: readonly string[], i: number, leaf: XsNode | undefined): XsNode {
    const name = parts[i] ?? '';
    const children = new Map(at.children);
    const had = children.has(name);
    if (i === parts.length - 1) {
      if (leaf === undefined) children.delete(name);
      else children.set(name, leaf);
    } else {
      const child = at.children.get(name);
      if (child === undefined) throw new XenError('EIO', `store: no node ${parts.slice(0, i + 1).join('/')} on the way down`);
      children.set(name, this.replaceIn(child, parts, i + 1, leaf));
    }
    // A node's generation moves when its child list does, not when a descendant's value does.
    const gen = had === children.has(name) ? at.gen : this.nextGen();
    return { ...at, children, gen };
  }
}

function forEachDescendant(path: string, node: XsNode, f: (path: string, node: XsNode) => void): void {
  for (const [name, child] of node.children) {
    const p = childPath(path, name);
    forEachDescendant(p, child, f);
    f(p, child);
  }
}

function concat(chunks: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** The tree xenstored starts with: /, /tool/xenstored and /local/domain, all owned by dom0, no access for others. */
export function initialRoot(nextGen: () => number): XsNode {
  const perms: readonly XsPerm[] = [{ domid: 0, perm: 'n' }];
  const leaf = (children: [string, XsNode][] = []): XsNode => ({
    value: EMPTY,
    perms,
    children: new Map(children),
    gen: nextGen(),
  });
  return leaf([
    ['tool', leaf([['xenstored', leaf()]])],
    ['local', leaf([['domain', leaf()]])],
  ]);
}
