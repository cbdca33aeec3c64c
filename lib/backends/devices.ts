// Device hotplug in dom0's toolstack, after libxl_device.c. A device is a
// frontend directory in the guest's tree, a backend directory in dom0's,
// both written in one transaction, and a backend driver that serves it.
// Removal is the xenbus handshake (libxl__initiate_device_generic_remove):
// the backend goes Closing with online 0; the frontend answers Closing; the
// backend driver lets go of the ring and port and goes Closed; the frontend
// frees its grants and port and goes Closed; then both directories go. A
// frontend that does not answer in time is removed by force, as libxl does.
// One generic path: each device type brings its node writer and its backend
// (vbd: blkback; vif: netback).

import { XenbusStateClosed, XenbusStateClosing, XenbusStateInitialising } from '../abi/xenbus.js';
import { XenError } from '../errors.js';
import { logger } from '../log.js';
import type { XsPerm } from '../xenstore/wire.js';
import type { XenStore, XsTransaction } from '../xenstore/xenstore.js';

const log = logger('toolstack', 'devices');

/** How long the frontend has to answer each step of removal (libxl's LIBXL_DESTROY_TIMEOUT). */
export const DEVICE_REMOVE_TIMEOUT_MS = 10_000;

/** One kind of device: its xenstore nodes and its backend driver in dom0. */
export type DeviceKind<S> = {
  /** The directory name under device/ and backend/: 'vbd', 'vif'. */
  type: string;
  devid(spec: S): number;
  frontendNodes(domid: number, spec: S): [string, string][];
  backendNodes(domid: number, spec: S): [string, string][];
  /** Start the backend driver for a device whose nodes are written. */
  start(domid: number, spec: S): Promise<void>;
  /** Stop one backend driver: ring and port let go, backend state Closed. */
  stop(domid: number, devid: number): Promise<void>;
  /** Stop every backend driver of a domain (its destruction). */
  stopAll(domid: number): Promise<void>;
};

export function frontendPath(domid: number, type: string, devid: number): string {
  return `/local/domain/${domid}/device/${type}/${devid}`;
}

export function backendPath(domid: number, type: string, devid: number): string {
  return `/local/domain/0/backend/${type}/${domid}/${devid}`;
}

/** A node under a base path: its name ('' for the base), its value (null: a directory) and permissions. */
export type XsNodeSpec = [name: string, value: string | null, perms: XsPerm[]];

/** Write `nodes` under `base` in a transaction, each with its permissions. */
export async function writeTree(t: XsTransaction, base: string, nodes: readonly XsNodeSpec[]): Promise<void> {
  for (const [name, value, perms] of nodes) {
    const path = name === '' ? base : `${base}/${name}`;
    if (value === null) await t.mkdir(path);
    else await t.write(path, value);
    await t.setPerms(path, perms);
  }
}

// libxl__device_generic_add: frontend and backend nodes in one transaction, then the backend driver.
export async function deviceAdd<S>(xs: XenStore, domid: number, kind: DeviceKind<S>, spec: S): Promise<void> {
  const devid = kind.devid(spec);
  const fe = frontendPath(domid, kind.type, devid);
  const be = backendPath(domid, kind.type, devid);
  // The guest owns its frontend and dom0 may read it; dom0 owns the backend and the guest may read it.
  const fePerms: XsPerm[] = [{ domid, perm: 'n' }, { domid: 0, perm: 'r' }];
  const bePerms: XsPerm[] = [{ domid: 0, perm: 'n' }, { domid, perm: 'r' }];
  const tree = (nodes: [string, string][], perms: XsPerm[]): XsNodeSpec[] => [
    ['', null, perms],
    ...nodes.map(([k, v]): XsNodeSpec => [k, v, perms]),
  ];
  await xs.transaction(async (t) => {
    if ((await t.read(`${be}/state`).catch(() => null)) !== null) throw new XenError('EEXIST', `${kind.type} ${devid} of domain ${domid} exists`);
    await writeTree(t, fe, tree([['backend', be], ['backend-id', '0'], ...kind.frontendNodes(domid, spec)], fePerms));
    await writeTree(t, be, tree([['frontend', fe], ['frontend-id', String(domid)], ...kind.backendNodes(domid, spec)], bePerms));
  });
  try {
    await kind.start(domid, spec);
  } catch (err) {
    await removeNodes(xs, domid, kind.type, devid);
    throw err;
  }
}

/** The end of a device: both its directories. */
async function removeNodes(xs: XenStore, domid: number, type: string, devid: number): Promise<void> {
  await xs.rm(`/local/domain/${domid}/device/${type}/${devid}`).catch(() => undefined);
  await xs.rm(`/local/domain/0/backend/${type}/${domid}/${devid}`).catch(() => undefined);
}

async function stateOf(xs: XenStore, path: string): Promise<number | null> {
  try {
    return Number(await xs.read(`${path}/state`));
  } catch {
    return null;
  }
}

/** Wait, bounded, for the frontend to reach one of `states` (or vanish); false on timeout. */
async function awaitFrontend(xs: XenStore, fe: string, states: number[], signal: AbortSignal | undefined): Promise<boolean> {
  try {
    await xs.awaitState(`${fe}/state`, (v) => v === undefined || states.includes(Number(v)), { timeoutMs: DEVICE_REMOVE_TIMEOUT_MS, signal });
    return true;
  } catch (err) {
    if (err instanceof XenError && err.code === 'ETIMEDOUT') return false;
    throw err;
  }
}

/**
 * The removal handshake; resolves with whether the frontend had to be
 * forced (it did not answer within DEVICE_REMOVE_TIMEOUT_MS). ENODEV when
 * the domain has no such device.
 */
export async function deviceRemove<S>(
  xs: XenStore, domid: number, kind: DeviceKind<S>, devid: number, signal?: AbortSignal,
): Promise<{ forced: boolean }> {
  const fe = frontendPath(domid, kind.type, devid);
  const be = backendPath(domid, kind.type, devid);
  if ((await stateOf(xs, be)) === null) throw new XenError('ENODEV', `domain ${domid} has no ${kind.type} ${devid}`);
  await xs.transaction(async (t) => {
    await t.write(`${be}/online`, '0');
    await t.write(`${be}/state`, String(XenbusStateClosing));
  });
  let forced = false;
  const feState = await stateOf(xs, fe);
  // A frontend that never left Initialising has nothing to give back.
  const answers = feState !== null && feState !== XenbusStateInitialising && feState !== XenbusStateClosed;
  if (answers && !(await awaitFrontend(xs, fe, [XenbusStateClosing, XenbusStateClosed], signal))) forced = true;
  await kind.stop(domid, devid);
  if (answers && !forced && !(await awaitFrontend(xs, fe, [XenbusStateClosed], signal))) forced = true;
  await removeNodes(xs, domid, kind.type, devid);
  log('%s %d of domain %d removed%s', kind.type, devid, domid, forced ? ' (forced: the frontend did not answer)' : '');
  return { forced };
}

/** A device as `block-list` shows it: the frontend's and the backend's view. */
export type DeviceInfo = {
  type: string;
  devid: number;
  backendId: number;
  /** The frontend's and backend's xenbus states (null: node missing). */
  frontendState: number | null;
  backendState: number | null;
  /** event-channel and ring-ref as the frontend published them (null before it connects). */
  eventChannel: number | null;
  ringRef: number | null;
  backendPath: string;
  /** The backend's own nodes (params, mode, dev, type, ... for a vbd). */
  backend: Record<string, string>;
};

async function readOr(xs: XenStore, path: string): Promise<string | null> {
  return xs.read(path).catch(() => null);
}

/** The devices of `type` a domain has, from xenstore: what the toolstack wrote and the frontend answered. */
export async function deviceList(xs: XenStore, domid: number, type: string): Promise<DeviceInfo[]> {
  const base = `/local/domain/0/backend/${type}/${domid}`;
  const devids = await xs.list(base).catch(() => [] as string[]);
  const out: DeviceInfo[] = [];
  for (const id of devids.map(Number).filter(Number.isInteger).sort((a, b) => a - b)) {
    const be = `${base}/${id}`;
    const fe = frontendPath(domid, type, id);
    const backend: Record<string, string> = {};
    for (const k of await xs.list(be).catch(() => [] as string[])) {
      const v = await readOr(xs, `${be}/${k}`);
      if (v !== null) backend[k] = v;
    }
    const num = (v: string | null): number | null => (v === null || v === '' || !Number.isFinite(Number(v)) ? null : Number(v));
    out.push({
      type, devid: id, backendId: 0,
      frontendState: num(await readOr(xs, `${fe}/state`)),
      backendState: num(backend['state'] ?? null),
      eventChannel: num(await readOr(xs, `${fe}/event-channel`)),
      ringRef: num(await readOr(xs, `${fe}/ring-ref`)),
      backendPath: be,
      backend,
    });
  }
  return out;
}
