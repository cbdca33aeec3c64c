// Shared by the network tests: guest images written to a temporary folder,
// configs for them, and a machine that runs them to the end.

import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine, type MachineOptions } from '../lib/machine.js';
import type { DomainExit } from '../lib/backends/toolstack.js';

export const root = fileURLToPath(new URL('../..', import.meta.url));
/** Import specifiers of modules a scripted image reaches into. */
export const lib = (path: string): string => pathToFileURL(join(root, 'dist/lib', path)).href;

export function tempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** Write `<name>.mjs` and `<name>.cfg` (the given extra config lines) into `dir`; returns the cfg path. */
export function guestImage(dir: string, name: string, body: string, cfg: string, memoryMiB = 32): string {
  const image = join(dir, `${name}.mjs`);
  writeFileSync(image, body);
  const file = join(dir, `${name}.cfg`);
  writeFileSync(file, `name = "${name}"\nmemory = ${memoryMiB}\nkernel = "${image}"\n${cfg}\n`);
  return file;
}

/** Boot, create the configs in order, wait for all to end, stop; the exits in the same order. */
export async function runGuests(cfgs: string[], opts: MachineOptions = {}, during?: (m: Machine, domids: number[]) => Promise<void>): Promise<DomainExit[]> {
  const m = await Machine.boot(opts);
  try {
    const domids: number[] = [];
    for (const c of cfgs) domids.push(await m.create(loadDomainConfig(c)));
    if (during !== undefined) await during(m, domids);
    const exits: DomainExit[] = [];
    for (const d of domids) exits.push(await m.waitExit(d, AbortSignal.timeout(240_000)));
    return exits;
  } finally {
    await m.stop();
  }
}

/**
 * Image code both peers of an exchange share: wait until the peer answers a
 * hello (so no frame goes out before it listens), with a bound.
 */
export const helloCode = `
async function meet(n, peer, timeoutMs = 60000) {
  let ready = false;
  const hello = new Uint8Array(60);
  hello.set(peer, 0); hello.set(n.mac, 6); hello[12] = 0x88; hello[13] = 0xb6;
  const off = n.onFrame((f) => {
    if (f[12] === 0x88 && f[13] === 0xb6 && !ready) { ready = true; void n.send(hello).catch(() => {}); }
  });
  const until = Date.now() + timeoutMs;
  while (!ready) {
    if (Date.now() > until) throw new Error('peer never answered');
    await n.send(hello);
    await new Promise((r) => setTimeout(r, 20));
  }
  return off;
}
`;
