#!/usr/bin/env node
// The `xenpv` command.

import { parseArgs } from 'node:util';
import { XenError } from '../errors.js';
import { run } from './run.js';

const USAGE = `usage: xenpv <command> [options]

commands:
  run <cfg>... [--json] [--duration S]
      boot a host with dom0, create the domains of the xl-style configs, wait
      until they shut down (or S seconds pass), print each guest's console
      output prefixed with its name; exit 0 when every guest powered off.
  help
      this text.
`;

function fail(err: unknown): never {
  const e = err instanceof XenError ? err : new XenError('EINVAL', (err as Error).message);
  process.stderr.write(`xenpv: ${e.message}\n`);
  process.exit(2);
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'run': {
      const { values, positionals } = parseArgs({
        args: rest,
        allowPositionals: true,
        options: { json: { type: 'boolean', default: false }, duration: { type: 'string' } },
      });
      if (positionals.length === 0) throw new XenError('EINVAL', 'run needs at least one config file');
      const duration = values.duration === undefined ? undefined : Number(values.duration);
      if (duration !== undefined && !(duration > 0)) throw new XenError('EINVAL', `--duration must be a positive number of seconds, not ${values.duration}`);
      return run(positionals, { json: values.json === true, durationS: duration });
    }
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
    default:
      throw new XenError('EINVAL', `unknown command ${command}; see xenpv help`);
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => fail(err),
);
