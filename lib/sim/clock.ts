// What the deterministic runner gives a process in place of the outside
// world: virtual time and seeded entropy. While a simulation owns the
// process, the timer and clock globals (setTimeout, setInterval,
// setImmediate and their clears, Date.now and new Date(), performance.now,
// AbortSignal.timeout) read and schedule on the simulation's clock, so
// kernels, backends and guest images all see virtual time and a timer fires
// at the step the scheduler chooses, never when the host happens to get to
// it; and Math.random, crypto.getRandomValues and node:crypto's randomBytes,
// randomFillSync, randomInt and randomUUID draw from the seed. uninstall()
// puts the real ones back.
//
// Not covered: process.hrtime, and timers a module took from node:timers
// before the simulation started (those stay real; lib/ uses the globals).

import { createRequire, syncBuiltinESMExports } from 'node:module';
import { XenError } from '../errors.js';

const nodeCrypto = createRequire(import.meta.url)('node:crypto') as Record<string, unknown>;
const CRYPTO_NAMES = ['randomBytes', 'randomFillSync', 'randomInt', 'randomUUID'] as const;

/** The real globals, taken when this module loads, before any simulation. */
export const real = {
  setTimeout: globalThis.setTimeout,
  clearTimeout: globalThis.clearTimeout,
  setInterval: globalThis.setInterval,
  clearInterval: globalThis.clearInterval,
  setImmediate: globalThis.setImmediate,
  clearImmediate: globalThis.clearImmediate,
  Date: globalThis.Date,
  abortTimeout: AbortSignal.timeout,
  mathRandom: Math.random,
  getRandomValues: globalThis.crypto.getRandomValues.bind(globalThis.crypto),
  crypto: Object.fromEntries(CRYPTO_NAMES.map((n) => [n, nodeCrypto[n]])),
} as const;

/** Node's TIMEOUT_MAX: longer or invalid delays become 1 ms, as Node makes them. */
const TIMEOUT_MAX = 2 ** 31 - 1;

/** A virtual timer, shaped like Node's Timeout so code may ref, unref, refresh or clear it. */
export class VirtualTimer {
  cancelled = false;
  private refed = true;

  constructor(
    private readonly clock: ClockOwner,
    readonly id: number,
    /** The domain whose code set it (the one the scheduler was running). */
    readonly owner: number,
    public due: number,
    readonly delayMs: number,
    readonly repeat: boolean,
    readonly fire: () => void,
  ) {}

  ref(): this {
    this.refed = true;
    return this;
  }

  unref(): this {
    this.refed = false;
    return this;
  }

  hasRef(): boolean {
    return this.refed;
  }

  refresh(): this {
    this.clock.rearm(this, this.clock.now() + this.delayMs);
    return this;
  }

  close(): this {
    this.clock.cancel(this);
    return this;
  }

  [Symbol.toPrimitive](): number {
    return this.id;
  }
}

/** What the clock needs from the scheduler that owns it. */
export type ClockOwner = {
  /** Virtual milliseconds since the simulation began. */
  now(): number;
  /** The wall-clock time (ms since the epoch) at virtual time 0. */
  readonly epochMs: number;
  /** Queue a new timer for the domain running now. */
  add(fire: () => void, delayMs: number, repeat: boolean): VirtualTimer;
  rearm(t: VirtualTimer, due: number): void;
  cancel(t: VirtualTimer): void;
  byId(id: number): VirtualTimer | undefined;
  /** The seeded entropy: a u32 per call. */
  entropy(): number;
};

function delay(ms: unknown): number {
  const n = Number(ms);
  return n >= 1 && n <= TIMEOUT_MAX ? n : 1;
}

type Callback = (...args: unknown[]) => void;

let installed: ClockOwner | null = null;

function clear(t: unknown): void {
  if (installed === null) return;
  if (t instanceof VirtualTimer) installed.cancel(t);
  else if (typeof t === 'number') {
    const v = installed.byId(t);
    if (v !== undefined) installed.cancel(v);
  } else real.clearTimeout(t as NodeJS.Timeout);
}

function makeDate(owner: ClockOwner): DateConstructor {
  const RealDate = real.Date;
  // Called with new: a Date of virtual now, or of the arguments; called plainly: the string of virtual now.
  function VirtualDate(this: unknown, ...args: unknown[]): Date | string {
    const now = owner.epochMs + owner.now();
    if (new.target === undefined) return new RealDate(now).toString();
    return args.length === 0 ? new RealDate(now) : new RealDate(...(args as [number]));
  }
  VirtualDate.prototype = RealDate.prototype;
  VirtualDate.now = (): number => Math.floor(owner.epochMs + owner.now());
  VirtualDate.parse = RealDate.parse;
  VirtualDate.UTC = RealDate.UTC;
  return VirtualDate as unknown as DateConstructor;
}

function fill<T extends ArrayBufferView | null>(owner: ClockOwner, view: T): T {
  if (view === null) return view;
  const bytes = new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
  for (let i = 0; i < bytes.length; i++) bytes[i] = owner.entropy() & 0xff;
  return view;
}

/** node:crypto's random functions over the seed; callbacks are called on a virtual immediate. */
function seededCrypto(owner: ClockOwner): Record<(typeof CRYPTO_NAMES)[number], unknown> {
  const later = <T>(cb: unknown, value: T): T | undefined => {
    if (typeof cb !== 'function') return value;
    globalThis.setImmediate(() => (cb as (e: null, v: T) => void)(null, value));
    return undefined;
  };
  const randomInt = (a: number, b?: unknown, cb?: unknown): number | undefined => {
    const [min, max, callback] = typeof b === 'number' ? [a, b, cb] : [0, a, b];
    return later(callback, min + Math.floor((owner.entropy() / 0x100000000) * (max - min)));
  };
  const randomUUID = (): string => {
    const b = fill(owner, Buffer.alloc(16));
    b[6] = (b[6]! & 0x0f) | 0x40;
    b[8] = (b[8]! & 0x3f) | 0x80;
    const h = b.toString('hex');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  };
  return {
    randomBytes: (size: number, cb?: unknown) => later(cb, fill(owner, Buffer.alloc(size))),
    randomFillSync: <T extends ArrayBufferView>(view: T) => fill(owner, view),
    randomInt,
    randomUUID,
  };
}

function setCrypto(fns: Record<string, unknown>): void {
  for (const n of CRYPTO_NAMES) nodeCrypto[n] = fns[n];
  syncBuiltinESMExports();
}

/** Replace the clock and entropy globals with `owner`'s; one simulation at a time. */
export function install(owner: ClockOwner): void {
  if (installed !== null) throw new XenError('EBUSY', 'a deterministic simulation already owns this process');
  installed = owner;
  const g = globalThis as Record<string, unknown>;
  const arm = (repeat: boolean) => (fn: Callback, ms?: unknown, ...args: unknown[]): VirtualTimer => {
    if (typeof fn !== 'function') throw new TypeError('The "callback" argument must be of type function');
    return owner.add(() => fn(...args), delay(ms), repeat);
  };
  g.setTimeout = arm(false);
  g.setInterval = arm(true);
  g.setImmediate = (fn: Callback, ...args: unknown[]): VirtualTimer => owner.add(() => fn(...args), 0, false);
  g.clearTimeout = clear;
  g.clearInterval = clear;
  g.clearImmediate = clear;
  g.Date = makeDate(owner);
  performance.now = (): number => owner.now();
  Math.random = (): number => owner.entropy() / 0x100000000;
  globalThis.crypto.getRandomValues = <T extends ArrayBufferView | null>(view: T): T => fill(owner, view);
  setCrypto(seededCrypto(owner));
  AbortSignal.timeout = (ms: number): AbortSignal => {
    const c = new AbortController();
    // Node's AbortSignal.timeout does not keep the process alive, nor this one the simulation.
    owner.add(() => c.abort(new DOMException('The operation was aborted due to timeout', 'TimeoutError')), Math.max(0, ms), false).unref();
    return c.signal;
  };
}

export function uninstall(owner: ClockOwner): void {
  if (installed !== owner) return;
  installed = null;
  const g = globalThis as Record<string, unknown>;
  g.setTimeout = real.setTimeout;
  g.clearTimeout = real.clearTimeout;
  g.setInterval = real.setInterval;
  g.clearInterval = real.clearInterval;
  g.setImmediate = real.setImmediate;
  g.clearImmediate = real.clearImmediate;
  g.Date = real.Date;
  delete (performance as { now?: unknown }).now;
  AbortSignal.timeout = real.abortTimeout;
  Math.random = real.mathRandom;
  globalThis.crypto.getRandomValues = real.getRandomValues;
  setCrypto(real.crypto);
}
