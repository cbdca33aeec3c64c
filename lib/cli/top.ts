// `xenpv top`: per-domain and per-device counters, after xentop. Live, the
// screen is redrawn in place every --delay seconds with rates computed from
// the previous sample; q or Ctrl-C quits. `--once` takes one sample;
// `--json` prints samples as JSON (one line each when live).

import type { DomainTop } from '../machine.js';
import type { ControlClient } from './control-client.js';

export type TopOptions = { once: boolean; json: boolean; delayS: number };

type Sample = { at: number; rows: DomainTop[] };

function key(r: DomainTop, type: string, devid: number): string {
  return `${r.domid}/${type}/${devid}`;
}

/** The table for one sample; rates against `prev` when there is one. */
export function formatTop(s: Sample, prev: Sample | null): string {
  const dt = prev === null ? 0 : (s.at - prev.at) / 1000;
  const before = new Map<string, Record<string, number>>();
  const cpuBefore = new Map<number, number>();
  for (const r of prev?.rows ?? []) {
    cpuBefore.set(r.domid, r.timeS);
    for (const d of r.devices) before.set(key(r, d.type, d.devid), d.counters);
  }
  const lines = [
    `xenpv top - ${new Date(s.at).toLocaleTimeString()}, ${s.rows.length} domains`,
    `${'NAME'.padStart(16)} STATE  ${'CPU(sec)'.padStart(9)} ${'CPU(%)'.padStart(6)} ${'MEM(MiB)'.padStart(8)} VCPUS PORTS GRANTS PINNED MAPPED`,
  ];
  for (const r of s.rows) {
    const was = cpuBefore.get(r.domid);
    const pct = dt > 0 && was !== undefined ? (((r.timeS - was) / dt) * 100).toFixed(1) : '-';
    lines.push(`${r.name.slice(0, 16).padStart(16)} ${r.state} ${r.timeS.toFixed(1).padStart(9)} ${pct.padStart(6)} ${String(Math.round(r.memoryMiB)).padStart(8)} `
      + `${`${r.vcpus}/${r.maxVcpus}`.padStart(5)} ${String(r.ports).padStart(5)} ${String(r.granted).padStart(6)} ${String(r.pinned).padStart(6)} ${String(r.mapped).padStart(6)}`);
    for (const d of r.devices) {
      const old = before.get(key(r, d.type, d.devid));
      const fields = Object.entries(d.counters).map(([k, v]) => {
        const rate = dt > 0 && old?.[k] !== undefined ? ` (${Math.round((v - old[k]!) / dt)}/s)` : '';
        return `${k} ${v}${rate}`;
      });
      lines.push(`${''.padStart(18)}${d.type} ${d.devid}: ${fields.join('  ')}`);
    }
  }
  return lines.join('\n') + '\n';
}

export async function top(c: ControlClient, opts: TopOptions): Promise<number> {
  const sample = async (): Promise<Sample> => ({ at: Date.now(), rows: (await c.call('top')) as DomainTop[] });
  if (opts.once) {
    const s = await sample();
    process.stdout.write(opts.json ? JSON.stringify(s.rows, null, 2) + '\n' : formatTop(s, null));
    return 0;
  }
  const stdin = process.stdin;
  const tty = stdin.isTTY === true && !opts.json;
  let quit: () => void = () => undefined;
  const stopped = new Promise<void>((resolve) => (quit = resolve));
  const onKey = (b: Buffer): void => {
    if (b.includes(0x71) || b.includes(0x03)) quit(); // q, Ctrl-C
  };
  if (tty) {
    stdin.setRawMode(true);
    stdin.on('data', onKey);
  }
  process.once('SIGINT', quit);
  let prev: Sample | null = null;
  try {
    for (;;) {
      const s = await sample();
      if (opts.json) process.stdout.write(JSON.stringify({ at: s.at, domains: s.rows }) + '\n');
      else process.stdout.write(`\x1b[H\x1b[2J${formatTop(s, prev)}`);
      prev = s;
      let timer: NodeJS.Timeout | undefined;
      const next = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), opts.delayS * 1000)));
      const goOn = await Promise.race([next, stopped.then(() => false)]);
      clearTimeout(timer);
      if (!goOn) return 0;
    }
  } finally {
    process.off('SIGINT', quit);
    if (tty) {
      stdin.off('data', onKey);
      stdin.setRawMode(false);
      stdin.pause();
    }
  }
}
