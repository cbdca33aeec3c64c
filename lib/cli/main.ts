#!/usr/bin/env node
// The `xenpv` command.

import { parseArgs } from 'node:util';
import { XenError } from '../errors.js';
import { run } from './run.js';
import { resolve } from 'node:path';
import { loadHostConfig } from '../backends/hostcfg.js';
import { cliPath, defaultRundir, hostDaemon, hostStart, hostStop } from './host.js';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { parseSize } from '../backends/xlcfg.js';
import { parseUplink } from '../backends/bridge.js';
import { parseDhcpdConfig } from '../backends/dhcpd.js';
import type { BridgeSetup } from '../backends/dom0.js';
import { hostStatus, manageCommands } from './manage.js';
import { fuzz } from './fuzz.js';
import { parseFaults } from '../sim/sim.js';
import { trace } from './trace.js';

const USAGE = `usage: xenpv <command> [options]

commands:
  run <cfg>... [--json] [--duration S] [--seed N [--faults LIST]] [--trace FILE]
      [--uplink BRIDGE=udp:LPORT:HOST:RPORT]... [--pcap BRIDGE=FILE]... [--dhcp BRIDGE=FIRST-LAST]...
      boot a host with dom0, create the domains of the xl-style configs, wait
      until they shut down (or S seconds pass), print each guest's console
      output prefixed with its name (and a status line on stderr), then a
      table of each vif's and vbd's counters; exit 0 when every guest
      powered off.
      --seed runs every domain in one thread under a scheduler driven by the
      seed (0..4294967295), in virtual time, and prints the seed and a digest
      of the run: the same seed replays the same run. --faults injects
      spurious,delay,deschedule,vbd-restart (a comma list, or all).
      --trace records every ring slot, event, grant operation, xenstore
      message, console chunk and network frame of the run into FILE.
      --uplink joins a bridge to a UDP peer, one Ethernet frame per datagram
      (QEMU -netdev dgram, socat); --pcap captures a bridge to FILE;
      --dhcp BRIDGE=FIRST-LAST serves DHCP on a bridge (as the subnet's .1).
  trace FILE [--json] [--pcapng OUT]
      decode a trace: one line per record (time, domain, device, what, with
      the io/*.h field names), or one JSON object per line; --pcapng writes
      the frames guests sent and received to OUT for tshark or wireshark.
  host start [--rundir DIR] [--config host.json]
      run a host (dom0, xenstored, backends) in the background; print the
      xenstored socket path (DIR/xenstored/socket). DIR defaults to
      $XDG_RUNTIME_DIR/xenpv, or /tmp/xenpv-<uid> without it. host.json
      sets xenstored's quotas: {"xenstored": {"maxNodes": 1000, ...}}.
  host stop [--rundir DIR]
      stop that host; its socket and pid file go with it.
  host status [--rundir DIR]
      the host's pid, uptime and number of domains.
  bench [--quick] [--json] [--out FILE] [--only PREFIX,...]
      measure xenpv against the limits of this runtime and its peers (the
      median of 3 runs each), print the table and the targets, and write the
      JSON report to FILE (default ./xenpv-bench.json). --quick runs 250 ms
      instead of 1 s per run; --json prints the report instead of the table;
      --only runs the metrics whose names start with a prefix (xenstore.).
  disk create FILE SIZE
      create a raw disk image of SIZE bytes (suffix K, M, G or T; a multiple
      of 512), sparse and zero-filled; EEXIST when FILE exists.
  fuzz xenstore [--seed N] [--steps M] [--json]
      a guest that abuses xenstored (quotas, permission probes, malformed
      and partial messages, unread answers, reconnects) while dom0 and a
      bystander guest check that they are served and nothing of theirs
      leaks or changes. Prints the seed; the same seed replays the run.
      Exit 1 when an invariant broke.
  fuzz frontend --device blkback [--seed N] [--steps M] [--json]
      a guest frontend that sends a real blkback malformed requests (bad
      segment counts and sectors, indirect-page abuse, refs not granted,
      read-only or granted elsewhere, floods, event storms, req_prod jumps,
      disconnects mid-request) mixed with I/O checked against a model of
      the disk; canary pages around every buffer; a bystander's disk must
      keep working. The whole host runs in one thread, so a seed replays.
  fuzz backend --device xbf [--seed N] [--steps M] [--json]
      a block backend that answers a real xbf honestly, late, out of order,
      with errors, and maliciously (unknown, duplicate or never-issued ids,
      wrong operations, junk statuses, rsp_prod ahead or behind, event
      storms, restarts, grants kept mapped): the disk must break with EIO
      and a reason, no acknowledged data may be wrong, the guest's other
      disk must keep working, and a page still mapped is never reused.
  help
      this text.

commands that manage a running host (each takes --rundir DIR):
  create CFG [-c]             create a guest from an xl config; -c attaches its console
  list [NAME] [--json]        domains as xl list shows them (Domain-0 first)
  destroy NAME                stop a domain now
  shutdown NAME [-w]          ask the guest to power off; -w waits until it has
  reboot NAME                 ask the guest to reboot
  pause NAME / unpause NAME   stop and resume the domain's vCPU
  vcpu-set NAME N             bring vCPUs 0..N-1 online, the rest offline
  vcpu-pin NAME [all] CPUS    the host CPUs the domain may run on ("0-1,^0"; "all": any)
  vcpu-list [NAME] [--json]   the CPU each domain's thread last ran on, and its affinity
  console NAME                attach to the guest's console; Ctrl-] detaches
  top [--once] [--json] [-d S]
                              per-domain and per-device counters, refreshed
  block-attach NAME SPEC      hotplug a disk (SPEC as a disk = entry)
  block-detach NAME DEVID     unplug a disk (DEVID: its number or xvdX)
  block-list [NAME] [--json]  the domain's disks and their xenbus states
  network-attach NAME SPEC    hotplug a network interface (SPEC as a vif = entry)
  network-detach NAME DEVID   unplug a network interface
  network-list [NAME] [--json]
                              the domain's interfaces and their xenbus states
  save NAME FILE              suspend the guest, write its memory and config to FILE
  restore FILE                a new domain from FILE; its guest carries on
`;

function parseSeed(text: string): number {
  const n = /^\d{1,10}$/.test(text) ? Number(text) : NaN;
  if (!(n <= 0xffffffff)) throw new XenError('EINVAL', `--seed must be an integer 0..4294967295, not ${text}`);
  return n;
}

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
        options: {
          json: { type: 'boolean', default: false },
          duration: { type: 'string' },
          seed: { type: 'string' },
          faults: { type: 'string' },
          uplink: { type: 'string', multiple: true },
          pcap: { type: 'string', multiple: true },
          dhcp: { type: 'string', multiple: true },
          trace: { type: 'string' },
        },
      });
      if (positionals.length === 0) throw new XenError('EINVAL', 'run needs at least one config file');
      const duration = values.duration === undefined ? undefined : Number(values.duration);
      if (duration !== undefined && !(duration > 0)) throw new XenError('EINVAL', `--duration must be a positive number of seconds, not ${values.duration}`);
      const seed = values.seed === undefined ? undefined : parseSeed(values.seed);
      if (values.faults !== undefined && seed === undefined) throw new XenError('EINVAL', '--faults needs --seed');
      const faults = values.faults === undefined ? undefined : parseFaults(values.faults);
      const uplinks = bridgeArgs('--uplink', values.uplink ?? []);
      for (const spec of Object.values(uplinks)) parseUplink(spec);
      const pcaps = bridgeArgs('--pcap', values.pcap ?? []);
      const bridges: Record<string, BridgeSetup> = {};
      for (const [name, file] of Object.entries(pcaps)) bridges[name] = { pcap: resolve(file) };
      for (const [name, range] of Object.entries(bridgeArgs('--dhcp', values.dhcp ?? []))) {
        bridges[name] = { ...bridges[name], dhcp: { range } };
        parseDhcpdConfig({ range });
      }
      return run(positionals, { json: values.json === true, durationS: duration, seed, faults, uplinks, bridges, trace: values.trace });
    }
    case 'trace':
      return trace(rest);
    case 'host':
      return host(rest);
    case 'disk':
      return disk(rest);
    case 'bench':
      return (await import('./bench.js')).bench(rest);
    case 'fuzz':
      return fuzz(rest);
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
    default: {
      const manage = Object.hasOwn(manageCommands, command) ? manageCommands[command] : undefined;
      if (manage === undefined) throw new XenError('EINVAL', `unknown command ${command}; see xenpv help`);
      return manage(rest);
    }
  }
}

/** `BRIDGE=VALUE` arguments by bridge name; EINVAL for a malformed or repeated one. */
function bridgeArgs(flag: string, args: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const a of args) {
    const m = /^([A-Za-z0-9._-]{1,15})=(.+)$/.exec(a);
    if (m === null) throw new XenError('EINVAL', `${flag} ${a}: want BRIDGE=VALUE`);
    if (m[1]! in out) throw new XenError('EINVAL', `${flag}: bridge ${m[1]} given twice`);
    out[m[1]!] = m[2]!;
  }
  return out;
}

async function host(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { rundir: { type: 'string' }, config: { type: 'string' } },
  });
  const [sub, ...extra] = positionals;
  if (extra.length > 0) throw new XenError('EINVAL', `host ${sub}: unexpected ${extra.join(' ')}`);
  const rundir = values.rundir ?? defaultRundir();
  // Read the config before anything starts, so a bad one is a usage error here.
  const configFile = values.config === undefined ? undefined : resolve(values.config);
  const config = configFile === undefined ? {} : loadHostConfig(configFile);
  try {
    switch (sub) {
      case 'start':
        process.stdout.write(`${await hostStart(rundir, cliPath(), configFile)}\n`);
        return 0;
      case 'stop':
        process.stdout.write(`stopped host pid ${await hostStop(rundir)}\n`);
        return 0;
      case 'status':
        return await hostStatus(rundir);
      case 'daemon':
        await hostDaemon(rundir, config);
        return new Promise<number>(() => undefined); // runs until signalled
      default:
        throw new XenError('EINVAL', `host needs start, stop or status, not ${sub ?? 'nothing'}`);
    }
  } catch (err) {
    // A host in the wrong state is not a usage error: status 1.
    if (!(err instanceof XenError) || err.code === 'EINVAL') throw err;
    process.stderr.write(`xenpv: ${err.message}\n`);
    return 1;
  }
}

// `xenpv disk create FILE SIZE`: a sparse raw image, as `truncate -s` makes one.
function disk(argv: string[]): number {
  const [sub, file, size, ...extra] = argv;
  if (sub !== 'create') throw new XenError('EINVAL', `disk needs create, not ${sub ?? 'nothing'}`);
  if (file === undefined || size === undefined || extra.length > 0) throw new XenError('EINVAL', 'usage: xenpv disk create FILE SIZE');
  const bytes = parseSize(size);
  let fd: number;
  try {
    fd = openSync(file, 'wx');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'EIO';
    process.stderr.write(`xenpv: ${code}: ${file}: ${(err as Error).message}\n`);
    return 1;
  }
  try {
    ftruncateSync(fd, bytes);
  } finally {
    closeSync(fd);
  }
  process.stdout.write(`${file}: ${bytes} bytes, ${bytes / 512} sectors\n`);
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => fail(err),
);
