// The host's control socket, <rundir>/control: the toolstack's operations as
// a JSON API, which every `xenpv` command but `run` and `disk` uses. One JSON
// object per line each way. A request is
//   {"id": 1, "op": "list", "args": {}}
// and its reply carries the same id and either a result or a coded error:
//   {"id": 1, "result": [...]}
//   {"id": 1, "error": {"code": "ESRCH", "message": "ESRCH: no domain web"}}
// Replies may come out of order: a `shutdown` with "wait" answers when the
// domain has gone. A line that is not JSON gets EPROTO with id null and the
// connection stays; a line over MAX_LINE_BYTES gets EMSGSIZE and the
// connection closes. Waits end when their client disconnects.

import { rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { isAbsolute } from 'node:path';
import { XenError, errorShape } from '../errors.js';
import { logger } from '../log.js';
import type { Machine, DomainRow } from '../machine.js';
import { consolePaths } from './concentrator.js';
import { checkDomainFiles, loadDomainConfig, parseDiskSpec, parseNicSpec, vdevToDevid } from './xlcfg.js';
import { listenUnix } from './stale-socket.js';
import { parseCpuList } from '../hypervisor/affinity.js';

const log = logger('control');

export const MAX_LINE_BYTES = 64 * 1024;
/** Requests one client may have in flight; more get EAGAIN. */
const MAX_IN_FLIGHT = 32;
const MAX_CLIENTS = 64;

type Args = Record<string, unknown>;
type Op = (args: Args, signal: AbortSignal) => Promise<unknown>;

// --- arguments ----------------------------------------------------------------------

function str(args: Args, key: string): string {
  const v = args[key];
  if (typeof v !== 'string' || v === '') throw new XenError('EINVAL', `${key}: want a non-empty string`);
  return v;
}

function int(args: Args, key: string, min: number, max: number): number {
  const v = args[key];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new XenError('EINVAL', `${key}: want a whole number from ${min} to ${max}`);
  return v;
}

function bool(args: Args, key: string): boolean {
  const v = args[key];
  if (v === undefined) return false;
  if (typeof v !== 'boolean') throw new XenError('EINVAL', `${key}: want true or false`);
  return v;
}

function absolute(args: Args, key: string): string {
  const path = str(args, key);
  if (!isAbsolute(path)) throw new XenError('EINVAL', `${key}: want an absolute path, not ${path}`);
  return path;
}

// --- the operations -------------------------------------------------------------------

/** The host's state the operations need besides the machine. */
export type ControlHost = { machine: Machine; rundir: string; startedAt: number };

/** A domain named by `args.domain`: its name or its domid, as xl takes either. ESRCH when none. */
async function domain(host: ControlHost, args: Args, allowDom0 = false): Promise<DomainRow> {
  const v = args['domain'];
  if (typeof v !== 'string' && typeof v !== 'number') throw new XenError('EINVAL', 'domain: want a name or a domid');
  const rows = await host.machine.list();
  const row = rows.find((r) => r.name === v || r.domid === v || (typeof v === 'string' && /^\d+$/.test(v) && r.domid === Number(v)));
  if (row === undefined) throw new XenError('ESRCH', `no domain ${v}`);
  if (row.domid === 0 && !allowDom0) throw new XenError('EPERM', 'Domain-0 is the host itself');
  return row;
}

function devidOf(args: Args): number {
  const v = args['devid'];
  if (typeof v === 'number' && Number.isInteger(v) && v > 0) return v;
  if (typeof v === 'string') {
    const n = /^\d+$/.test(v) ? Number(v) : vdevToDevid(v);
    if (n !== null && n > 0) return n;
  }
  throw new XenError('EINVAL', 'devid: want a device number or a vdev such as xvdb');
}

export function controlOps(host: ControlHost): Record<string, Op> {
  const m = host.machine;
  return {
    status: async () => ({
      pid: process.pid,
      rundir: host.rundir,
      uptimeS: Math.round((Date.now() - host.startedAt) / 1000),
      domains: (await m.list()).length,
      xenstored: m.socketPath ?? null,
    }),
    create: async (args) => {
      const file = absolute(args, 'config');
      const spec = loadDomainConfig(file);
      checkDomainFiles(spec, file);
      return { domid: await m.create(spec), name: spec.name };
    },
    list: () => m.list(),
    top: () => m.top(),
    destroy: async (args) => void (await m.destroy((await domain(host, args)).domid)),
    shutdown: async (args, signal) => {
      const d = await domain(host, args);
      const wait = bool(args, 'wait') ? m.waitExit(d.domid, signal) : null;
      // Waiting from before the request: a quick guest may be gone before the reply comes.
      wait?.catch(() => undefined);
      await m.requestShutdown(d.domid, 'poweroff');
      return wait === null ? null : { exit: await wait };
    },
    reboot: async (args) => void (await m.requestShutdown((await domain(host, args)).domid, 'reboot')),
    pause: async (args) => void (await m.pause((await domain(host, args)).domid, true)),
    unpause: async (args) => void (await m.pause((await domain(host, args)).domid, false)),
    'vcpu-set': async (args) => void (await m.vcpuSet((await domain(host, args)).domid, int(args, 'count', 1, 1024))),
    // dom0 too: pinning it away from the guests is what Xen's dom0_vcpus_pin is for.
    'vcpu-pin': async (args) => {
      await m.vcpuPin((await domain(host, args, true)).domid, parseCpuList(str(args, 'cpus')));
    },
    'vcpu-list': () => m.vcpuList(),
    console: async (args) => {
      const d = await domain(host, args);
      return { domid: d.domid, name: d.name, ...consolePaths(host.rundir, d.name) };
    },
    'block-attach': async (args) => {
      const d = await domain(host, args);
      const disk = parseDiskSpec(str(args, 'spec'), args['cwd'] === undefined ? host.rundir : absolute(args, 'cwd'));
      await m.blockAttach(d.domid, disk);
      return { devid: disk.devid, vdev: disk.vdev };
    },
    save: async (args) => m.save((await domain(host, args)).domid, absolute(args, 'file')),
    restore: async (args) => m.restore(absolute(args, 'file')),
    'block-detach': async (args) => m.blockDetach((await domain(host, args)).domid, devidOf(args)),
    'block-list': async (args) => {
      const rows = args['domain'] === undefined ? (await m.list()).filter((r) => r.domid !== 0) : [await domain(host, args)];
      const out = [];
      for (const r of rows) out.push({ domid: r.domid, name: r.name, devices: await m.blockList(r.domid).catch(() => []) });
      return out;
    },
    // xl network-attach: the next free devid, as libxl picks it.
    'network-attach': async (args) => {
      const d = await domain(host, args);
      const used = (await m.networkList(d.domid)).map((x) => x.devid);
      const devid = used.length === 0 ? 0 : Math.max(...used) + 1;
      const nic = parseNicSpec(str(args, 'spec'), args['cwd'] === undefined ? host.rundir : absolute(args, 'cwd'), devid, d.name);
      await m.networkAttach(d.domid, nic);
      return { devid, mac: nic.mac };
    },
    'network-detach': async (args) => m.networkDetach((await domain(host, args)).domid, int(args, 'devid', 0, 65535)),
    'network-list': async (args) => {
      const rows = args['domain'] === undefined ? (await m.list()).filter((r) => r.domid !== 0) : [await domain(host, args)];
      const out = [];
      for (const r of rows) out.push({ domid: r.domid, name: r.name, devices: await m.networkList(r.domid).catch(() => []) });
      return out;
    },
  };
}

// --- the socket -----------------------------------------------------------------------

export class ControlServer {
  private readonly clients = new Set<Socket>();

  private constructor(
    readonly path: string,
    private readonly server: Server,
  ) {}

  /** Listen on `path`; a stale socket left by a dead host is replaced, a live one is EADDRINUSE. */
  static async listen(path: string, ops: Record<string, Op>): Promise<ControlServer> {
    // Half-open: a client may send its requests, end its side, and still read the replies.
    const server = createServer({ allowHalfOpen: true });
    const self = new ControlServer(path, server);
    server.maxConnections = MAX_CLIENTS;
    server.on('connection', (sock) => self.accept(sock, ops));
    await listenUnix(server, path, 'host', log);
    return self;
  }

  private accept(sock: Socket, ops: Record<string, Op>): void {
    this.clients.add(sock);
    const gone = new AbortController();
    let buffered = '';
    let inFlight = 0;
    let ended = false;
    const reply = (msg: object): void => {
      if (!sock.destroyed) sock.write(JSON.stringify(msg) + '\n');
      if (ended && inFlight === 0) sock.end();
    };
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buffered += chunk;
      for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (line.trim() === '') continue;
        if (inFlight >= MAX_IN_FLIGHT) {
          reply({ id: idOf(line), error: errorShape(new XenError('EAGAIN', `${MAX_IN_FLIGHT} requests in flight already`)) });
          continue;
        }
        inFlight++;
        void serve(line, ops, gone.signal).then((r) => {
          inFlight--;
          reply(r);
        });
      }
      if (Buffer.byteLength(buffered) > MAX_LINE_BYTES) {
        reply({ id: null, error: errorShape(new XenError('EMSGSIZE', `a request line is longer than ${MAX_LINE_BYTES} bytes`)) });
        sock.end();
        buffered = '';
      }
    });
    sock.on('end', () => {
      ended = true;
      if (inFlight === 0) sock.end();
    });
    sock.on('error', (err) => log('client: %s', err.message));
    sock.on('close', () => {
      this.clients.delete(sock);
      gone.abort(new XenError('ECANCELED', 'the client went away'));
    });
  }

  async close(): Promise<void> {
    for (const sock of this.clients) sock.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.path, { force: true });
  }
}

/** The id of a request line, if it has one we can read, for replies to requests we refuse unread. */
function idOf(line: string): unknown {
  try {
    const v: unknown = JSON.parse(line);
    return typeof v === 'object' && v !== null && 'id' in v ? (v as { id: unknown }).id : null;
  } catch {
    return null;
  }
}

/** One request line to its reply. */
async function serve(line: string, ops: Record<string, Op>, signal: AbortSignal): Promise<object> {
  let req: unknown;
  try {
    req = JSON.parse(line);
  } catch (err) {
    return { id: null, error: errorShape(new XenError('EPROTO', `not JSON: ${(err as Error).message}`)) };
  }
  if (typeof req !== 'object' || req === null || Array.isArray(req)) {
    return { id: null, error: errorShape(new XenError('EINVAL', 'a request is a JSON object {id, op, args}')) };
  }
  const r = req as { id?: unknown; op?: unknown; args?: unknown };
  const id = r.id ?? null;
  try {
    if (typeof r.op !== 'string') throw new XenError('EINVAL', 'op: want the name of an operation');
    const op = Object.hasOwn(ops, r.op) ? ops[r.op] : undefined;
    if (op === undefined) throw new XenError('ENOSYS', `no operation ${r.op}; known: ${Object.keys(ops).join(', ')}`);
    const args = r.args ?? {};
    if (typeof args !== 'object' || args === null || Array.isArray(args)) throw new XenError('EINVAL', 'args: want a JSON object');
    const result = await op(args as Args, signal);
    return { id, result: result ?? null };
  } catch (err) {
    log('%s failed: %s', String(r.op), (err as Error).message);
    return { id, error: errorShape(err) };
  }
}
