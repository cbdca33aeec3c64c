// `xenpv run`: one host for the length of a command. Guests' console lines
// are printed as they arrive, prefixed with the guest's name; with --json a
// summary is printed at the end instead.

import { loadDomainConfig } from '../backends/xlcfg.js';
import type { DomainExit, DomainSpec } from '../backends/toolstack.js';
import { XenError } from '../errors.js';
import { Machine } from '../machine.js';

export type RunOptions = { json: boolean; durationS: number | undefined };

type Result = { name: string; domid: number | null; exit: { reason: string }; console: string };

/** Splits console text into whole lines per guest, so prefixes land at line starts. */
class LinePrinter {
  private readonly partial = new Map<number, string>();

  write(domid: number, name: string, text: string): void {
    const lines = ((this.partial.get(domid) ?? '') + text).split('\n');
    this.partial.set(domid, lines.pop() ?? '');
    for (const line of lines) process.stdout.write(`${name}: ${line}\n`);
  }

  flush(domid: number, name: string): void {
    const rest = this.partial.get(domid);
    if (rest !== undefined && rest !== '') process.stdout.write(`${name}: ${rest}\n`);
    this.partial.delete(domid);
  }
}

export async function run(files: string[], opts: RunOptions): Promise<number> {
  const specs: DomainSpec[] = files.map((f) => loadDomainConfig(f));
  const printer = new LinePrinter();
  const machine = await Machine.boot({
    onConsole: (domid, name, text) => {
      if (!opts.json) printer.write(domid, name, text);
    },
  });
  const results: Result[] = [];
  try {
    const created: { spec: DomainSpec; domid: number }[] = [];
    for (const spec of specs) {
      try {
        created.push({ spec, domid: await machine.create(spec) });
      } catch (err) {
        const code = err instanceof XenError ? err.code : 'EIO';
        results.push({ name: spec.name, domid: null, exit: { reason: `create failed: ${code}` }, console: '' });
        if (!opts.json) process.stderr.write(`xenpv: ${spec.name}: ${(err as Error).message}\n`);
      }
    }
    const deadline = opts.durationS === undefined ? null : AbortSignal.timeout(opts.durationS * 1000);
    for (const { spec, domid } of created) {
      let exit: DomainExit;
      // A restarted guest (on_reboot/on_crash = restart) runs on under a new domid.
      let current = domid;
      try {
        exit = await machine.waitExit(current, deadline ?? undefined);
        while (exit.restartedAs !== undefined) exit = await machine.waitExit((current = exit.restartedAs), deadline ?? undefined);
      } catch {
        await machine.destroy(current).catch(() => undefined);
        exit = { domid: current, name: spec.name, reason: 'destroyed', console: '' };
      }
      if (!opts.json) printer.flush(domid, spec.name);
      results.push({ name: spec.name, domid, exit: { reason: exit.reason }, console: exit.console });
    }
  } finally {
    await machine.stop();
  }
  if (opts.json) process.stdout.write(JSON.stringify({ domains: results }, null, 2) + '\n');
  else for (const r of results) process.stdout.write(`${r.name} (domid ${r.domid ?? '-'}): ${r.exit.reason}\n`);
  return results.every((r) => r.exit.reason === 'poweroff') ? 0 : 1;
}
