// `xenpv trace FILE [--json] [--pcapng OUT]`: decode a trace that
// `xenpv run --trace FILE` recorded, one event per line in sequence order.

import { parseArgs } from 'node:util';
import { XenError } from '../errors.js';
import { formatEvent, readTrace, type TraceEvent } from '../trace/decode.js';
import { writeTracePcapng } from '../trace/pcapng.js';

function jsonLine(e: TraceEvent): string {
  return JSON.stringify(e.type === 'frame' ? { ...e, bytes: Buffer.from(e.bytes).toString('hex') } : e);
}

export async function trace(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { json: { type: 'boolean', default: false }, pcapng: { type: 'string' } },
  });
  const [file, ...extra] = positionals;
  if (file === undefined || extra.length > 0) throw new XenError('EINVAL', 'usage: xenpv trace FILE [--json] [--pcapng OUT]');
  const t = readTrace(file);
  if (values.pcapng !== undefined) {
    const { frames, interfaces } = writeTracePcapng(t, values.pcapng);
    process.stderr.write(`xenpv: ${frames} frames on ${interfaces} interfaces written to ${values.pcapng}\n`);
    return 0;
  }
  const lines: string[] = [];
  for (const e of t.events) {
    lines.push(values.json === true ? jsonLine(e) : formatEvent(e));
    if (lines.length === 1024) {
      process.stdout.write(lines.join('\n') + '\n');
      lines.length = 0;
    }
  }
  // The command exits when this returns: wait until a pipe has taken everything.
  await new Promise((resolve) => process.stdout.write(lines.length > 0 ? lines.join('\n') + '\n' : '', resolve));
  if (t.truncatedBytes > 0) process.stderr.write(`xenpv: ${t.truncatedBytes} bytes at the end are not a whole block (the run did not end cleanly)\n`);
  return 0;
}
