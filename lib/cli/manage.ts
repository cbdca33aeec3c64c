// The xl-like commands that manage a running host over its control socket:
// create, list, destroy, shutdown, reboot, pause, unpause, vcpu-set,
// vcpu-pin, vcpu-list,
// block-attach, block-detach, block-list, network-attach, network-detach,
// network-list (console and top have their own files). Each takes --rundir;
// without it the default rundir of `host start`.
// Exit status: 0 done, 1 the host refused (its error code is printed), 2 a
// bad argument or config.

import { parseArgs } from 'node:util';
import { resolve } from 'node:path';
import { XenError } from '../errors.js';
import { checkDomainFiles, loadDomainConfig } from '../backends/xlcfg.js';
import type { DomainExit } from '../backends/toolstack.js';
import type { DeviceInfo } from '../backends/devices.js';
import type { DomainRow, VcpuRow } from '../machine.js';
import { formatCpuList, parseCpuList } from '../hypervisor/affinity.js';
import { ControlClient } from './control-client.js';
import { defaultRundir } from './host.js';
import { consoleAttach } from './console.js';
import { top } from './top.js';

type Parsed = { values: Record<string, string | boolean | undefined>; positionals: string[]; rundir: string };
type Options = Record<string, { type: 'string' | 'boolean'; short?: string }>;

/** Parse a command's arguments: `want` positionals (names for the usage line), its options, --rundir. */
function parse(command: string, argv: string[], want: string[], options: Options = {}, optional = 0): Parsed {
  const { values, positionals } = parseArgs({ args: argv, allowPositionals: true, options: { ...options, rundir: { type: 'string' } } });
  if (positionals.length > want.length || positionals.length < want.length - optional) {
    throw new XenError('EINVAL', `usage: xenpv ${command} ${want.join(' ')}`);
  }
  const v = values as Record<string, string | boolean | undefined>;
  return { values: v, positionals, rundir: typeof v['rundir'] === 'string' ? v['rundir'] : defaultRundir() };
}

/** Run `fn` with a client of the host; the host's refusals print and give status 1. */
async function withHost(rundir: string, fn: (c: ControlClient) => Promise<number | void>): Promise<number> {
  let c: ControlClient | null = null;
  try {
    c = await ControlClient.connect(rundir);
    return (await fn(c)) ?? 0;
  } catch (err) {
    if (!(err instanceof XenError)) throw err;
    process.stderr.write(`xenpv: ${err.message}\n`);
    return 1;
  } finally {
    c?.close();
  }
}

/** xl list's layout (xl_list.c). */
export function formatList(rows: DomainRow[]): string {
  const lines = ['Name                                        ID   Mem VCPUs\tState\tTime(s)'];
  for (const r of rows) {
    lines.push(`${r.name.padEnd(40)} ${String(r.domid).padStart(5)} ${String(Math.round(r.memoryMiB)).padStart(5)} ${String(r.vcpus).padStart(5)}     ${r.state}  ${r.timeS.toFixed(1).padStart(8)}`);
  }
  return lines.join('\n') + '\n';
}

/**
 * xl vcpu-list's columns, one row per domain (its vCPUs share one thread):
 * the CPU the thread last ran on, and the CPUs it may run on, "all" when
 * that is every CPU of the host.
 */
export function formatVcpuList(rows: VcpuRow[]): string {
  const lines = ['Name                                        ID VCPUs   CPU Affinity'];
  for (const r of rows) {
    const allowed = r.allowed === null ? '-' : r.everyCpu ? 'all' : formatCpuList(r.allowed);
    lines.push(`${r.name.padEnd(40)} ${String(r.domid).padStart(5)} ${String(r.vcpus).padStart(5)} ${String(r.cpu ?? '-').padStart(5)} ${allowed}`);
  }
  return lines.join('\n') + '\n';
}

function formatBlockList(rows: { name: string; devices: DeviceInfo[] }[]): string {
  const lines = ['Name             Vdev  Dev   BE  state be-state evt-ch ring-ref BE-path'];
  const dash = (v: number | null): string => (v === null ? '-' : String(v));
  for (const r of rows) {
    for (const d of r.devices) {
      lines.push(`${r.name.padEnd(16)} ${String(d.devid).padEnd(5)} ${(d.backend['dev'] ?? '-').padEnd(5)} ${String(d.backendId).padEnd(3)} `
        + `${dash(d.frontendState).padEnd(5)} ${dash(d.backendState).padEnd(8)} ${dash(d.eventChannel).padEnd(6)} ${dash(d.ringRef).padEnd(8)} ${d.backendPath}`);
    }
  }
  return lines.join('\n') + '\n';
}

/** xl network-list's columns, and each interface's MAC and bridge. */
function formatNetworkList(rows: { name: string; devices: DeviceInfo[] }[]): string {
  const lines = ['Name             Idx BE  MAC               bridge   state be-state BE-path'];
  const dash = (v: number | null): string => (v === null ? '-' : String(v));
  for (const r of rows) {
    for (const d of r.devices) {
      lines.push(`${r.name.padEnd(16)} ${String(d.devid).padEnd(3)} ${String(d.backendId).padEnd(3)} ${(d.backend['mac'] ?? '-').padEnd(17)} `
        + `${(d.backend['bridge'] ?? '-').padEnd(8)} ${dash(d.frontendState).padEnd(5)} ${dash(d.backendState).padEnd(8)} ${d.backendPath}`);
    }
  }
  return lines.join('\n') + '\n';
}

type Command = (argv: string[]) => Promise<number>;

/** `list` and `vcpu-list`: the host's rows, only NAME's when given (ESRCH when none), as a table or --json. */
function rows<R extends { name: string; domid: number }>(command: string, format: (rows: R[]) => string): Command {
  return (argv) => {
    const p = parse(command, argv, ['NAME'], { json: { type: 'boolean' } }, 1);
    return withHost(p.rundir, async (c) => {
      let all = (await c.call(command)) as R[];
      const name = p.positionals[0];
      if (name !== undefined) {
        all = all.filter((r) => r.name === name || String(r.domid) === name);
        if (all.length === 0) throw new XenError('ESRCH', `no domain ${name}`);
      }
      process.stdout.write(p.values['json'] === true ? JSON.stringify(all, null, 2) + '\n' : format(all));
    });
  };
}

/** A command that names one domain and calls one operation with it. */
function simple(command: string, op: string): Command {
  return (argv) => {
    const p = parse(command, argv, ['NAME']);
    return withHost(p.rundir, async (c) => void (await c.call(op, { domain: p.positionals[0] })));
  };
}

export const manageCommands: Record<string, Command> = {
  create: (argv) => {
    const p = parse('create', argv, ['CFG'], { console: { type: 'boolean', short: 'c' } });
    const file = resolve(p.positionals[0]!);
    checkDomainFiles(loadDomainConfig(file), file); // a bad config is a usage error here, before the host sees it
    return withHost(p.rundir, async (c) => {
      const r = (await c.call('create', { config: file })) as { domid: number; name: string };
      process.stdout.write(`${r.name}: domid ${r.domid}\n`);
      if (p.values['console'] === true) return consoleAttach(c, r.name);
    });
  },
  list: rows('list', formatList),
  destroy: simple('destroy', 'destroy'),
  reboot: simple('reboot', 'reboot'),
  pause: simple('pause', 'pause'),
  unpause: simple('unpause', 'unpause'),
  shutdown: (argv) => {
    const p = parse('shutdown', argv, ['NAME'], { wait: { type: 'boolean', short: 'w' } });
    const wait = p.values['wait'] === true;
    return withHost(p.rundir, async (c) => {
      const r = (await c.call('shutdown', { domain: p.positionals[0], wait })) as { exit: DomainExit } | null;
      if (r !== null) process.stdout.write(`${r.exit.name} (domid ${r.exit.domid}): ${r.exit.reason}\n`);
    });
  },
  'vcpu-set': (argv) => {
    const p = parse('vcpu-set', argv, ['NAME', 'N']);
    const count = Number(p.positionals[1]);
    if (!Number.isInteger(count) || count < 1) throw new XenError('EINVAL', `vcpu-set: N must be a whole number from 1, not ${p.positionals[1]}`);
    return withHost(p.rundir, async (c) => void (await c.call('vcpu-set', { domain: p.positionals[0], count })));
  },
  // xl vcpu-pin DOMAIN VCPU CPUS; a domain's vCPUs share one thread, so VCPU, when given, is "all".
  'vcpu-pin': (argv) => {
    const p = parse('vcpu-pin', argv, ['NAME', '[all]', 'CPUS'], {}, 1);
    if (p.positionals.length === 3 && p.positionals[1] !== 'all') {
      throw new XenError('EINVAL', `vcpu-pin: a domain's vCPUs share one thread, so pin them all (VCPU "all"), not ${p.positionals[1]}`);
    }
    const cpus = p.positionals[p.positionals.length - 1]!;
    parseCpuList(cpus); // the syntax is a usage error here; the host checks its CPUs
    return withHost(p.rundir, async (c) => void (await c.call('vcpu-pin', { domain: p.positionals[0], cpus })));
  },
  'vcpu-list': rows('vcpu-list', formatVcpuList),
  'block-attach': (argv) => {
    const p = parse('block-attach', argv, ['NAME', 'SPEC']);
    return withHost(p.rundir, async (c) => void (await c.call('block-attach', { domain: p.positionals[0], spec: p.positionals[1], cwd: process.cwd() })));
  },
  'block-detach': (argv) => {
    const p = parse('block-detach', argv, ['NAME', 'DEVID']);
    return withHost(p.rundir, async (c) => {
      const r = (await c.call('block-detach', { domain: p.positionals[0], devid: p.positionals[1] })) as { forced: boolean };
      if (r.forced) process.stderr.write(`xenpv: the guest did not answer in time; ${p.positionals[1]} was removed by force\n`);
    });
  },
  'block-list': (argv) => {
    const p = parse('block-list', argv, ['NAME'], { json: { type: 'boolean' } }, 1);
    const name = p.positionals[0];
    return withHost(p.rundir, async (c) => {
      const rows = (await c.call('block-list', name === undefined ? {} : { domain: name })) as { name: string; devices: DeviceInfo[] }[];
      process.stdout.write(p.values['json'] === true ? JSON.stringify(rows, null, 2) + '\n' : formatBlockList(rows));
    });
  },
  'network-attach': (argv) => {
    const p = parse('network-attach', argv, ['NAME', 'SPEC']);
    return withHost(p.rundir, async (c) => {
      const r = (await c.call('network-attach', { domain: p.positionals[0], spec: p.positionals[1], cwd: process.cwd() })) as { devid: number; mac: string };
      process.stdout.write(`${p.positionals[0]}: vif ${r.devid} ${r.mac}\n`);
    });
  },
  'network-detach': (argv) => {
    const p = parse('network-detach', argv, ['NAME', 'DEVID']);
    const devid = Number(p.positionals[1]);
    if (!/^\d+$/.test(p.positionals[1]!) || devid > 65535) throw new XenError('EINVAL', `network-detach: DEVID must be a whole number, not ${p.positionals[1]}`);
    return withHost(p.rundir, async (c) => {
      const r = (await c.call('network-detach', { domain: p.positionals[0], devid })) as { forced: boolean };
      if (r.forced) process.stderr.write(`xenpv: the guest did not answer in time; vif ${devid} was removed by force\n`);
    });
  },
  'network-list': (argv) => {
    const p = parse('network-list', argv, ['NAME'], { json: { type: 'boolean' } }, 1);
    const name = p.positionals[0];
    return withHost(p.rundir, async (c) => {
      const rows = (await c.call('network-list', name === undefined ? {} : { domain: name })) as { name: string; devices: DeviceInfo[] }[];
      process.stdout.write(p.values['json'] === true ? JSON.stringify(rows, null, 2) + '\n' : formatNetworkList(rows));
    });
  },
  save: (argv) => {
    const p = parse('save', argv, ['NAME', 'FILE']);
    const file = resolve(p.positionals[1]!);
    return withHost(p.rundir, async (c) => {
      const r = (await c.call('save', { domain: p.positionals[0], file })) as { pages: number };
      process.stdout.write(`${p.positionals[0]}: saved to ${file} (${r.pages} pages)\n`);
    });
  },
  restore: (argv) => {
    const p = parse('restore', argv, ['FILE']);
    return withHost(p.rundir, async (c) => {
      const r = (await c.call('restore', { file: resolve(p.positionals[0]!) })) as { domid: number; name: string };
      process.stdout.write(`${r.name}: domid ${r.domid}\n`);
    });
  },
  console: (argv) => {
    const p = parse('console', argv, ['NAME']);
    return withHost(p.rundir, (c) => consoleAttach(c, p.positionals[0]!));
  },
  top: (argv) => {
    const p = parse('top', argv, [], { once: { type: 'boolean' }, json: { type: 'boolean' }, delay: { type: 'string', short: 'd' } });
    const delayS = p.values['delay'] === undefined ? 1 : Number(p.values['delay']);
    if (!(delayS >= 0.1 && delayS <= 3600)) throw new XenError('EINVAL', `--delay must be 0.1 to 3600 seconds, not ${String(p.values['delay'])}`);
    return withHost(p.rundir, (c) => top(c, { once: p.values['once'] === true, json: p.values['json'] === true, delayS }));
  },
};

/** `xenpv host status`. */
export function hostStatus(rundir: string): Promise<number> {
  return withHost(rundir, async (c) => {
    const s = (await c.call('status')) as { pid: number; rundir: string; uptimeS: number; domains: number; xenstored: string | null };
    process.stdout.write(`pid ${s.pid}, up ${s.uptimeS} s, ${s.domains} domains (Domain-0 included)\nrundir ${s.rundir}\nxenstored ${s.xenstored ?? '-'}\n`);
  });
}
