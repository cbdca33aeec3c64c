// How fast guests come up, and what each costs in memory. A guest counts as
// up when its image starts: the kernel runs the image only after every
// device it probed is attached, and an xbf attach ends when the backend is
// Connected. The image then says so on its console. Each guest has a vbd;
// the scale.boot32 also gives each a vif, which joins the config
// below once the netfront exists.

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';

export const SCALE_GUESTS = 32;
const GUEST_MEMORY_MIB = 32;
const UP = 'UP';

// Up, then idle until destroyed (the vCPU's idle loop keeps the thread alive).
const GUEST = `export async function main(guest) {
  console.log('${UP}');
  await new Promise(() => undefined);
}
`;

export type ScaleResult = { boot1Ms: number[]; boot32S: number[]; rssPerGuestMiB: number[] };

class Booter {
  private readonly up = new Map<number, () => void>();
  private readonly early = new Set<number>();
  m!: Machine;

  onConsole(domid: number, text: string): void {
    if (!text.includes(UP)) return;
    const done = this.up.get(domid);
    if (done === undefined) this.early.add(domid);
    else done();
  }

  /** Create a guest; resolves once it says it is up. */
  async boot(cfgPath: string, name: string): Promise<number> {
    const domid = await this.m.create({ ...loadDomainConfig(cfgPath), name });
    if (this.early.delete(domid)) return domid;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`guest ${name} (${domid}) not up in 60 s`)), 60_000);
      this.up.set(domid, () => {
        clearTimeout(timer);
        this.up.delete(domid);
        resolve();
      });
    });
    return domid;
  }
}

/** Boot one guest `runs` times, then SCALE_GUESTS at once `runs` times; each guest with one vbd (null storage). */
export async function scaleBench(runs: number): Promise<ScaleResult> {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-bench-scale-'));
  const booter = new Booter();
  const m = await Machine.boot({ onConsole: (domid, _name, text) => booter.onConsole(domid, text) });
  booter.m = m;
  const out: ScaleResult = { boot1Ms: [], boot32S: [], rssPerGuestMiB: [] };
  try {
    writeFileSync(join(dir, 'up.mjs'), GUEST);
    const cfg = join(dir, 'up.cfg');
    writeFileSync(cfg, `name = "up"\nmemory = ${GUEST_MEMORY_MIB}\nkernel = "up.mjs"\ndisk = [ 'format=null, vdev=xvda, access=rw, target=64M' ]\n`);
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      const domid = await booter.boot(cfg, `up${i}`);
      out.boot1Ms.push(performance.now() - t0);
      await m.destroy(domid);
    }
    for (let i = 0; i < runs; i++) {
      const rss0 = process.memoryUsage().rss;
      const t0 = performance.now();
      const domids = await Promise.all(Array.from({ length: SCALE_GUESTS }, (_, g) => booter.boot(cfg, `up${i}-${g}`)));
      out.boot32S.push((performance.now() - t0) / 1000);
      out.rssPerGuestMiB.push((process.memoryUsage().rss - rss0) / SCALE_GUESTS / (1 << 20));
      for (const domid of domids) await m.destroy(domid);
    }
    return out;
  } finally {
    await m.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
