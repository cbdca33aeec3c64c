// What `xenpv run` shows besides the guests' consoles: a status line while
// the guests run, and at the end a table of each guest's devices with their
// counters. Both take the counters from dom0's backends, where `xenpv top`
// takes them (the table from the last sample dom0 took as each guest went).

import type { DeviceStats } from '../backends/toolstack.js';
import type { DomainTop } from '../machine.js';

/** A guest as the status line and the table know it. */
export type GuestStatus = { name: string; domid: number | null; exit: string | null; devices: DeviceStats[] };

/** xvda for 51712: Linux's and libxl's numbering of xvd disks; the number otherwise. */
export function vdevName(devid: number): string {
  const letters = (n: number): string => (n < 26 ? '' : letters(Math.floor(n / 26) - 1)) + String.fromCharCode(97 + (n % 26));
  if (devid >> 8 === 202) return `xvd${letters((devid >> 4) & 15)}`;
  if ((devid & (1 << 28)) !== 0) return `xvd${letters((devid >> 8) & 0xfffff)}`;
  return String(devid);
}

const count = (d: DeviceStats, key: string): number => d.counters[key] ?? 0;

/** One guest in the status line: its interfaces' frames in and out, its disks' sectors written and read. */
function guestPart(g: GuestStatus): string {
  if (g.exit !== null) return `${g.name}: ${g.exit}`;
  if (g.domid === null) return `${g.name}: starting`;
  const parts: string[] = [];
  for (const d of g.devices) {
    // netback's rx is what the guest sent, its tx what the guest received.
    if (d.type === 'vif') parts.push(`vif${d.devid} in ${count(d, 'txPackets')} out ${count(d, 'rxPackets')}`);
    else if (d.type === 'vbd') parts.push(`${vdevName(d.devid)} w ${count(d, 'wr_sect')} r ${count(d, 'rd_sect')}`);
  }
  return `${g.name}: ${parts.length === 0 ? 'running' : parts.join(', ')}`;
}

/** The status line: seconds since the start, then each guest. */
export function statusLine(elapsedMs: number, guests: GuestStatus[]): string {
  return `[${(elapsedMs / 1000).toFixed(1).padStart(5)} s] ${guests.map(guestPart).join(' | ')}`;
}

/**
 * The status line of a run on `out`: on a terminal it is redrawn in place
 * at the bottom (console lines go above it); elsewhere each sample is a
 * line of its own, every `plainEvery`th sample.
 */
export class StatusLine {
  private shown = '';
  private samples = 0;
  private readonly started = Date.now();

  constructor(
    private readonly out: NodeJS.WriteStream,
    readonly guests: GuestStatus[],
    private readonly plainEvery = 2,
  ) {}

  get tty(): boolean {
    return this.out.isTTY === true;
  }

  /** Take a sample of `xenpv top` (guests not in it keep what they had). */
  update(rows: DomainTop[]): void {
    for (const g of this.guests) {
      const row = rows.find((r) => r.domid === g.domid);
      if (row !== undefined && g.exit === null) g.devices = row.devices;
    }
    this.samples++;
    if (this.tty) this.draw();
    else if (this.samples % this.plainEvery === 0) this.out.write(`xenpv: ${statusLine(Date.now() - this.started, this.guests)}\n`);
  }

  /** Around other output on the same terminal: take the line away, then put it back. */
  clear(): void {
    if (this.tty && this.shown !== '') this.out.write('\r\x1b[K');
  }

  draw(): void {
    if (!this.tty) return;
    const columns = this.out.columns ?? 0;
    const width = columns > 20 ? columns - 1 : 79;
    this.shown = statusLine(Date.now() - this.started, this.guests).slice(0, width);
    this.out.write(`\r\x1b[K${this.shown}`);
  }

  /** The end: the line goes, for the results and the table. */
  done(): void {
    this.clear();
    this.shown = '';
  }
}

function table(head: string[], rows: string[][]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]): string => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ').trimEnd();
  return [line(head), ...rows.map(line)].join('\n') + '\n';
}

/**
 * The end-of-run table: each vif (frames and bytes the guest received and
 * sent, frames for it dropped, bad requests) and each vbd (requests,
 * sectors, bad requests). Empty when no guest had either.
 */
export function deviceTable(guests: GuestStatus[]): string {
  const vifs: string[][] = [];
  const vbds: string[][] = [];
  for (const g of guests) {
    for (const d of g.devices) {
      const c = (k: string): string => String(count(d, k));
      if (d.type === 'vif') vifs.push([`${g.name} vif ${d.devid}`, c('txPackets'), c('txBytes'), c('rxPackets'), c('rxBytes'), c('txDropped'), c('txErrors')]);
      if (d.type === 'vbd') vbds.push([`${g.name} vbd ${vdevName(d.devid)}`, c('rd_req'), c('wr_req'), c('f_req'), c('rd_sect'), c('wr_sect'), c('bad_req')]);
    }
  }
  let out = '';
  if (vifs.length > 0) out += table(['DEVICE', 'FRAMES IN', 'BYTES IN', 'FRAMES OUT', 'BYTES OUT', 'DROPS', 'ERRORS'], vifs);
  if (vbds.length > 0) out += (out === '' ? '' : '\n') + table(['DEVICE', 'READS', 'WRITES', 'FLUSHES', 'SECTORS READ', 'SECTORS WRITTEN', 'ERRORS'], vbds);
  return out;
}
