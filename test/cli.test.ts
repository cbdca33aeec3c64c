// The xenpv CLI against a host daemon, end to end: `host start`, then every
// management command as a separate process over the control socket, guests
// in their own workers, the console concentrator's sockets, and the control
// socket spoken raw with bad requests. One host serves the whole file.

import t from 'tap';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createConnection, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ControlClient } from '../lib/cli/control-client.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const cli = join(root, 'dist/lib/cli/main.js');
const dir = mkdtempSync(join(tmpdir(), 'xenpv-cli-'));
const rundir = join(dir, 'run');

type Result = { status: number | null; stdout: string; stderr: string };

/** Run `xenpv ARGS --rundir <ours>`; `input` is written to its stdin. */
function xenpv(args: string[], input?: string): Promise<Result> {
  return new Promise((resolve) => {
    const where = args[0] === 'disk' ? [] : ['--rundir', rundir];
    const child = spawn(process.execPath, [cli, ...args, ...where], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('close', (status) => resolve({ status, stdout, stderr }));
    child.stdin.end(input);
  });
}

async function ok(args: string[]): Promise<string> {
  const r = await xenpv(args);
  if (r.status !== 0) throw new Error(`xenpv ${args.join(' ')}: status ${r.status}: ${r.stderr}`);
  return r.stdout;
}

/** Poll `fn` until it returns something other than undefined/false, bounded. */
async function until<T>(what: string, fn: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const logPath = (name: string): string => join(rundir, 'console', `${name}.log`);
const log = (name: string): string => (existsSync(logPath(name)) ? readFileSync(logPath(name), 'utf8') : '');
const waitLog = (name: string, re: RegExp): Promise<RegExpMatchArray> => until(`${re} in the console of ${name}`, () => log(name).match(re) ?? undefined);

type Row = { domid: number; name: string; memoryMiB: number; vcpus: number; maxVcpus: number; state: string; timeS: number };
type Top = Row & { ports: number; granted: number; pinned: number; mapped: number; devices: { type: string; devid: number; counters: Record<string, number> }[] };

// Polls go over the JSON API on one connection; the commands under test run as processes.
let api: ControlClient | null = null;

async function list(): Promise<Row[]> {
  api ??= await ControlClient.connect(rundir);
  return (await api.call('list')) as Row[];
}

async function row(name: string): Promise<Row | undefined> {
  return (await list()).find((r) => r.name === name);
}

async function topOnce(): Promise<Top[]> {
  api ??= await ControlClient.connect(rundir);
  return (await api.call('top')) as Top[];
}

async function topOnceCli(): Promise<Top[]> {
  return JSON.parse(await ok(['top', '--once', '--json'])) as Top[];
}

// One guest image for every test; `extra` says what it does besides echoing console input.
const image = join(dir, 'guest.mjs');
writeFileSync(image, `
const pattern = (lba) => { const b = new Uint8Array(512); b.fill((lba * 7 + 1) & 255); new DataView(b.buffer).setUint32(0, lba, true); return b; };
export async function main(guest) {
  const opts = new Set(guest.extra.split(' '));
  console.log('boot ' + guest.name + ' ' + guest.domid);
  guest.onShutdownRequest((r) => console.log('asked to ' + r));
  let writing = opts.has('writer');
  let ops = 0;
  let stopped;
  const writer = (async () => {
    const disk = guest.disks()[0];
    while (writing) {
      const lba = (ops * 8) % disk.sectors;
      const data = new Uint8Array(8 * 512);
      for (let i = 0; i < 8; i++) data.set(pattern(lba + i), i * 512);
      await disk.write(lba, data);
      ops++;
      await new Promise((r) => setTimeout(r, 2));
    }
    console.log('stopped after ' + ops + ' writes');
  });
  if (writing) stopped = writer();
  const known = new Set(guest.disks().map((d) => d.path));
  guest.onDevicesChanged(async () => {
    const now = guest.disks();
    for (const d of now) {
      if (known.has(d.path)) continue;
      known.add(d.path);
      console.log('attached ' + d.path + ' ' + d.sectors);
      const data = new Uint8Array(64 * 512);
      for (let i = 0; i < 64; i++) data.set(pattern(i), i * 512);
      await d.write(0, data);
      const back = await d.read(0, 64);
      console.log(d.path + (Buffer.compare(Buffer.from(back), Buffer.from(data)) === 0 ? ' verified' : ' MISMATCH'));
    }
    for (const p of [...known]) if (!now.some((d) => d.path === p)) { known.delete(p); console.log('detached ' + p); }
  });
  let buf = '';
  guest.onInput((text) => {
    buf += text;
    for (let nl = buf.indexOf('\\n'); nl >= 0; nl = buf.indexOf('\\n')) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (line === 'crash') setTimeout(() => { throw new Error('guest bug'); });
      else if (line === 'vcpus') console.log('vcpus ' + guest.vcpus());
      else if (line === 'stop') { writing = false; }
      else console.log('echo: ' + line);
    }
  });
  if (opts.has('tick')) { let n = 0; setInterval(() => console.log('tick ' + n++), 20); }
  await new Promise(() => {});
}
`);

function cfg(name: string, extra = '', more = ''): string {
  const file = join(dir, `${name}.cfg`);
  writeFileSync(file, `name = "${name}"\nmemory = 32\nkernel = "guest.mjs"\nextra = "${extra}"\n${more}`);
  return file;
}

/** Raw control socket: send lines, read reply lines. */
async function rawControl(): Promise<{ send(line: string): void; next(): Promise<Record<string, unknown>>; closed: Promise<void>; sock: Socket }> {
  const sock = createConnection(join(rundir, 'control'));
  await new Promise<void>((r) => sock.once('connect', () => r()));
  let buf = '';
  const lines: string[] = [];
  let wake: (() => void) | null = null;
  sock.setEncoding('utf8');
  sock.on('data', (c: string) => {
    buf += c;
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      lines.push(buf.slice(0, nl));
      buf = buf.slice(nl + 1);
    }
    wake?.();
  });
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  return {
    sock,
    closed,
    send: (line) => sock.write(line + '\n'),
    next: async () => {
      while (lines.length === 0) await new Promise<void>((r) => (wake = r));
      return JSON.parse(lines.shift()!) as Record<string, unknown>;
    },
  };
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

t.before(async () => {
  const r = await xenpv(['host', 'start']);
  if (r.status !== 0) throw new Error(`host start: ${r.stderr}`);
});
t.teardown(async () => {
  api?.close();
  await xenpv(['host', 'stop']);
});

t.test('host status; create two guests; list as a table and as JSON', async (t) => {
  t.match(await ok(['host', 'status']), /^pid \d+, up \d+ s, 1 domains/);
  t.match(await ok(['create', cfg('alpha')]), /^alpha: domid \d+$/m);
  t.match(await ok(['create', cfg('beta', '', 'vcpus = 2\n')]), /^beta: domid \d+$/m);
  await waitLog('alpha', /boot alpha/);
  await waitLog('beta', /boot beta/);
  const table = await ok(['list']);
  const lines = table.trimEnd().split('\n');
  t.equal(lines[0], 'Name                                        ID   Mem VCPUs\tState\tTime(s)');
  t.match(lines[1], /^Domain-0 {32} {5}0 +16 +1 {5}[r-][b-]----\s+\d+\.\d$/);
  t.match(lines[2], /^alpha {35} +\d+ +32 +1 {5}[r-][b-]----\s+\d+\.\d$/);
  t.match(lines[3], /^beta {36} +\d+ +32 +2 {5}[r-][b-]----\s+\d+\.\d$/);
  const rows = JSON.parse(await ok(['list', '--json'])) as Row[];
  t.same(rows.map((r) => r.name), ['Domain-0', 'alpha', 'beta']);
  t.match(rows[2], { memoryMiB: 32, vcpus: 2, maxVcpus: 2 });
  t.ok(rows.every((r) => typeof r.timeS === 'number' && r.timeS >= 0), 'Time(s) for each');
  const again = await xenpv(['create', cfg('alpha')]);
  t.equal(again.status, 1);
  t.match(again.stderr, /^xenpv: EEXIST: /, 'names are unique');
  t.match(await ok(['list', 'beta']), /^beta /m);
  const none = await xenpv(['list', 'gamma']);
  t.equal(none.status, 1);
  t.match(none.stderr, /ESRCH/);
});

t.test('bad requests on the control socket get coded errors; the socket goes on', async (t) => {
  const c = await rawControl();
  c.send('this is not json');
  t.match(await c.next(), { id: null, error: { code: 'EPROTO' } });
  c.send('[1,2]');
  t.match(await c.next(), { id: null, error: { code: 'EINVAL' } });
  c.send(JSON.stringify({ id: 1, op: 'frobnicate' }));
  t.match(await c.next(), { id: 1, error: { code: 'ENOSYS' } });
  c.send(JSON.stringify({ id: 2, op: 'destroy', args: {} }));
  t.match(await c.next(), { id: 2, error: { code: 'EINVAL' } });
  c.send(JSON.stringify({ id: 3, op: 'destroy', args: { domain: 'nosuch' } }));
  t.match(await c.next(), { id: 3, error: { code: 'ESRCH' } });
  c.send(JSON.stringify({ id: 4, op: 'destroy', args: { domain: 0 } }));
  t.match(await c.next(), { id: 4, error: { code: 'EPERM' } }, 'Domain-0 cannot be destroyed');
  c.send(JSON.stringify({ id: 5, op: 'vcpu-set', args: { domain: 'alpha', count: 'many' } }));
  t.match(await c.next(), { id: 5, error: { code: 'EINVAL' } });
  c.send(JSON.stringify({ id: 6, op: 'create', args: { config: 'relative.cfg' } }));
  t.match(await c.next(), { id: 6, error: { code: 'EINVAL' } });
  c.send(JSON.stringify({ id: 7, op: 'block-attach', args: { domain: 'alpha', spec: 'vdev=sda,target=x' } }));
  t.match(await c.next(), { id: 7, error: { code: 'EINVAL' } });
  c.send(JSON.stringify({ id: 8, op: 'toString' }));
  t.match(await c.next(), { id: 8, error: { code: 'ENOSYS' } }, 'no inherited names');
  c.send(JSON.stringify({ id: 'x', op: 'list' }));
  t.match(await c.next(), { id: 'x', result: [{ name: 'Domain-0' }] }, 'the connection still serves');
  c.sock.write('x'.repeat(70 * 1024));
  t.match(await c.next(), { id: null, error: { code: 'EMSGSIZE' } });
  await c.closed;
  const half = await rawControl();
  half.send(JSON.stringify({ id: 9, op: 'status' }));
  half.sock.end();
  t.match(await half.next(), { id: 9, result: { pid: Number } }, 'a client that ended its side still gets its reply');
  await half.closed;
});

t.test('console: two readers on the unix socket and one on console_port see the same output; Ctrl-] detaches', async (t) => {
  const port = await freePort();
  await ok(['create', cfg('talker', '', `console_port = ${port}\n`)]);
  await waitLog('talker', /boot talker/);
  const readers = [0, 1].map(() => {
    const child = spawn(process.execPath, [cli, 'console', 'talker', '--rundir', rundir], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    const exited = new Promise<number | null>((r) => child.on('close', r));
    return { child, out: () => out, exited };
  });
  const tcp = createConnection(port, '127.0.0.1');
  let tcpOut = '';
  tcp.on('data', (b: Buffer) => (tcpOut += b.toString()));
  // Until every reader is attached, what is typed may echo before one of them sees it.
  let n = 0;
  await until('every reader attached', () => {
    readers[0]!.child.stdin.write(`ping ${n++}\n`);
    return readers.every((r) => /echo: ping \d+/.test(r.out())) && /echo: ping \d+/.test(tcpOut);
  });
  tcp.write('from tcp\n');
  await until('the TCP reader\'s input echoed to all', () => readers.every((r) => r.out().includes('echo: from tcp')) && tcpOut.includes('echo: from tcp'));
  readers[1]!.child.stdin.write('from two\n');
  await until('reader two\'s input echoed to all', () => readers[0]!.out().includes('echo: from two') && tcpOut.includes('echo: from two'));
  t.match(log('talker'), /echo: from tcp\r?\n/, 'the log has it too');
  readers[0]!.child.stdin.write('\x1d');
  t.equal(await readers[0]!.exited, 0, 'Ctrl-] detaches with status 0');
  readers[1]!.child.stdin.write('still here\n');
  await until('the other reader still attached', () => readers[1]!.out().includes('echo: still here'));
  await ok(['destroy', 'talker']);
  t.equal(await readers[1]!.exited, 0, 'a reader ends when the domain goes');
  tcp.destroy();
  t.notOk(existsSync(join(rundir, 'console', 'talker.sock')), 'the socket goes with the domain');
  t.match(log('talker'), /boot talker/, 'the log stays');
  const none = await xenpv(['console', 'nosuch']);
  t.equal(none.status, 1);
  t.match(none.stderr, /ESRCH/);
  const attached = spawn(process.execPath, [cli, 'create', cfg('attached'), '-c', '--rundir', rundir], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  attached.stdout.on('data', (b: Buffer) => (out += b.toString()));
  await until('create -c attached', () => {
    attached.stdin.write('typed\n');
    return out.includes('echo: typed');
  });
  attached.stdin.write('\x1d');
  t.equal(await new Promise((r) => attached.on('close', r)), 0, 'create -c: the console until Ctrl-]');
  t.match(out, /^attached: domid \d+$/m);
  await ok(['destroy', 'attached']);
});

t.test('pause stops the guest, timers and all; unpause resumes it', async (t) => {
  await ok(['create', cfg('ticker', 'tick')]);
  await waitLog('ticker', /tick 3\b/);
  await ok(['pause', 'ticker']);
  t.match((await row('ticker'))?.state, /^--p---$/);
  await new Promise((r) => setTimeout(r, 200)); // a tick in flight lands
  const size = statSync(logPath('ticker')).size;
  await new Promise((r) => setTimeout(r, 500));
  t.equal(statSync(logPath('ticker')).size, size, 'no output while paused');
  const again = await xenpv(['pause', 'ticker']);
  t.equal(again.status, 1);
  t.match(again.stderr, /EINVAL/, 'a paused domain cannot be paused');
  await ok(['unpause', 'ticker']);
  await until('ticks again', () => statSync(logPath('ticker')).size > size);
  t.match((await row('ticker'))?.state, /^[r-][b-]----$/);
  await ok(['destroy', 'ticker']);
});

t.test('vcpu-set: the guest onlines and offlines vCPUs up to maxvcpus', async (t) => {
  await ok(['create', cfg('cpus', '', 'vcpus = 1\nmaxvcpus = 4\n')]);
  await waitLog('cpus', /boot cpus/);
  await until('1 of 4 online', async () => (await row('cpus'))?.vcpus === 1);
  t.match(await row('cpus'), { vcpus: 1, maxVcpus: 4 });
  await ok(['vcpu-set', 'cpus', '3']);
  await until('3 online', async () => (await row('cpus'))?.vcpus === 3);
  const c = spawn(process.execPath, [cli, 'console', 'cpus', '--rundir', rundir], { stdio: ['pipe', 'ignore', 'ignore'] });
  await until('the guest counts 3', () => {
    c.stdin.write('vcpus\n');
    return /vcpus 3/.test(log('cpus'));
  });
  c.kill();
  await ok(['vcpu-set', 'cpus', '1']);
  await until('1 online', async () => (await row('cpus'))?.vcpus === 1);
  const tooMany = await xenpv(['vcpu-set', 'cpus', '5']);
  t.equal(tooMany.status, 1);
  t.match(tooMany.stderr, /EINVAL/);
  const bad = await xenpv(['vcpu-set', 'cpus', 'lots']);
  t.equal(bad.status, 2);
  await ok(['destroy', 'cpus']);
});

t.test('shutdown -w, reboot (the image runs again under a new domid), destroy', async (t) => {
  const before = (await row('alpha'))!.domid;
  await ok(['reboot', 'alpha']);
  const after = await until('alpha back under a new domid', async () => {
    const r = await row('alpha');
    return r !== undefined && r.domid !== before ? r : undefined;
  });
  await waitLog('alpha', new RegExp(`boot alpha ${after.domid}`));
  t.match(log('alpha'), /asked to reboot/);
  t.match(await ok(['shutdown', '-w', 'alpha']), new RegExp(`^alpha \\(domid ${after.domid}\\): poweroff$`, 'm'));
  t.equal(await row('alpha'), undefined, 'on_poweroff=destroy: gone');
  await ok(['destroy', 'beta']);
  t.same((await list()).map((r) => r.name), ['Domain-0']);
});

t.test('a crash: on_crash destroy, restart and preserve; dom0 and the other guest carry on', async (t) => {
  await ok(['create', cfg('bystander')]);
  for (const action of ['destroy', 'restart', 'preserve']) {
    const name = `crash-${action}`;
    const out = await ok(['create', cfg(name, '', `on_crash = "${action}"\n`)]);
    const domid = Number(/domid (\d+)/.exec(out)![1]);
    await waitLog(name, /boot/);
    const c = spawn(process.execPath, [cli, 'console', name, '--rundir', rundir], { stdio: ['pipe', 'ignore', 'ignore'] });
    c.stdin.write('crash\n');
    const r = await until(`${name} handled`, async () => {
      const rows = await list();
      const now = rows.find((x) => x.name === name);
      if (action === 'destroy') return now === undefined ? 'gone' : undefined;
      if (action === 'restart') return now !== undefined && now.domid !== domid ? now : undefined;
      return now?.state === '----c-' ? now : undefined;
    });
    c.kill();
    if (action === 'restart') await waitLog(name, new RegExp(`boot ${name} ${(r as Row).domid}`));
    if (action === 'preserve') {
      t.equal((r as Row).domid, domid, 'preserved under its domid');
      const busy = await xenpv(['pause', name]);
      t.match(busy.stderr, /EINVAL/, 'a crashed domain does not run');
      await ok(['destroy', name]);
      t.equal(await row(name), undefined);
    }
    if (action === 'restart') await ok(['destroy', name]);
    t.pass(`on_crash=${action}`);
  }
  t.match((await row('bystander'))?.state, /^[r-][b-]----$/, 'the other guest runs');
  const c = spawn(process.execPath, [cli, 'console', 'bystander', '--rundir', rundir], { stdio: ['pipe', 'ignore', 'ignore'] });
  await until('the other guest answers', () => {
    c.stdin.write('hello\n');
    return /echo: hello/.test(log('bystander'));
  });
  c.kill();
  await ok(['destroy', 'bystander']);
});

t.test('block-attach and block-detach while the guest writes; every grant, port and node comes back', async (t) => {
  const img = join(dir, 'a.img');
  t.equal((await xenpv(['disk', 'create', img, '4M'])).status, 0);
  await ok(['create', cfg('disks', 'writer', `disk = ['a.img,raw,xvda,rw']\n`)]);
  await waitLog('disks', /boot disks/);
  await ok(['block-attach', 'disks', 'format=memory, vdev=xvdb, target=1M']);
  await waitLog('disks', /attached device\/vbd\/51728 2048\r?\n/);
  await waitLog('disks', /device\/vbd\/51728 verified/);
  const listed = JSON.parse(await ok(['block-list', 'disks', '--json'])) as { name: string; devices: { devid: number; frontendState: number; backendState: number }[] }[];
  t.match(listed, [{ name: 'disks', devices: [{ devid: 51712, frontendState: 4, backendState: 4 }, { devid: 51728, frontendState: 4, backendState: 4 }] }]);
  t.match(await ok(['block-list', 'disks']), /^disks +51728 xvdb +0 +4 +4 /m);
  await ok(['block-detach', 'disks', 'xvdb']);
  await waitLog('disks', /detached device\/vbd\/51728/);
  // The writer on xvda went on all along; now stop it and count what is held.
  const c = spawn(process.execPath, [cli, 'console', 'disks', '--rundir', rundir], { stdio: ['pipe', 'ignore', 'ignore'] });
  c.stdin.write('stop\n');
  const writes = Number((await waitLog('disks', /stopped after (\d+) writes/))[1]);
  c.kill();
  t.ok(writes > 0, `${writes} writes`);
  const held = async (): Promise<number[]> => {
    const rows = await topOnce();
    const g = rows.find((r) => r.name === 'disks')!;
    const d0 = rows.find((r) => r.domid === 0)!;
    return [g.granted, g.pinned, g.ports, d0.mapped, d0.ports];
  };
  const base = await held();
  await ok(['block-attach', 'disks', 'format=memory, vdev=xvdb, target=1M']);
  await until('xvdb attached again', () => (log('disks').match(/device\/vbd\/51728 verified/g) ?? []).length === 2);
  const plugged = await held();
  t.ok(plugged.every((v, i) => v > base[i]!), `ring grants pinned by blkback, a port each side: ${base} -> ${plugged}`);
  const stats = (await topOnce()).find((r) => r.name === 'disks')!.devices;
  t.match(stats.find((d) => d.type === 'vbd' && d.devid === 51728)?.counters, { wr_req: 1, rd_req: 1, wr_sect: 64, rd_sect: 64 });
  t.ok((stats.find((d) => d.type === 'vbd' && d.devid === 51712)?.counters['wr_req'] ?? 0) >= writes, 'xvda counted every write');
  t.ok((stats.find((d) => d.type === 'console')?.counters['out_bytes'] ?? 0) > 0, 'console bytes');
  t.same(await ok(['block-detach', 'disks', '51728']), '');
  await until('xvdb detached again', () => (log('disks').match(/detached device\/vbd\/51728/g) ?? []).length === 2);
  t.same(await held(), base, 'every grant and port let go');
  const after = JSON.parse(await ok(['block-list', 'disks', '--json'])) as { devices: { devid: number }[] }[];
  t.same(after[0]!.devices.map((d) => d.devid), [51712], 'the nodes are gone');
  const missing = await xenpv(['block-detach', 'disks', 'xvdc']);
  t.equal(missing.status, 1);
  t.match(missing.stderr, /ENODEV/);
  const twice = await xenpv(['block-attach', 'disks', 'format=memory, vdev=xvda, target=1M']);
  t.equal(twice.status, 1);
  t.match(twice.stderr, /EEXIST/);
  await ok(['destroy', 'disks']);
  const data = readFileSync(img);
  let bad = 0;
  for (let lba = 0; lba < Math.min(writes * 8, data.length / 512); lba++) {
    if (data.readUInt32LE(lba * 512) !== lba || data[lba * 512 + 4] !== ((lba * 7 + 1) & 255)) bad++;
  }
  t.equal(bad, 0, 'every sector the writer wrote is in the file');
});

t.test('top --once --json and the live table', async (t) => {
  await ok(['create', cfg('watched')]);
  await waitLog('watched', /boot/);
  const rows = await topOnceCli();
  const w = rows.find((r) => r.name === 'watched')!;
  t.match(w, { memoryMiB: 32, vcpus: 1, maxVcpus: 1 });
  t.ok(w.ports >= 2 && w.granted >= 2, 'console and xenstore at least');
  t.match(w.devices, [{ type: 'console', devid: 0 }]);
  const live = spawn(process.execPath, [cli, 'top', '-d', '0.2', '--rundir', rundir], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  live.stdout.on('data', (b: Buffer) => (out += b.toString()));
  await until('two refreshes', () => (out.match(/\x1b\[H\x1b\[2J/g) ?? []).length >= 2);
  live.kill('SIGINT');
  t.equal(await new Promise((r) => live.on('close', r)), 0);
  t.match(out, /NAME STATE +CPU\(sec\) CPU\(%\)/);
  t.match(out, /watched -*[rb-]-+ +\d+\.\d +\d+\.\d/, 'a CPU(%) once there are two samples');
  await ok(['destroy', 'watched']);
});

// The saver keeps 48 writes in flight (more than xbf has ring slots) and hands over only how many it issued:
// writes still in flight at suspend must complete (xbf quiesces) or the check fails.
const saver = join(dir, 'saver.mjs');
writeFileSync(saver, `
const pattern = (lba) => { const b = new Uint8Array(512); b.fill((lba * 13 + 5) & 255); new DataView(b.buffer).setUint32(0, lba, true); return b; };
const chunk = (n) => { const d = new Uint8Array(8 * 512); for (let i = 0; i < 8; i++) d.set(pattern(n * 8 + i), i * 512); return d; };
export async function main(guest) {
  const disk = guest.disks()[0];
  const total = disk.sectors / 8;
  let next = guest.resumeState?.next ?? 0;
  console.log((guest.resumeState === undefined ? 'boot' : 'resumed') + ' at ' + next);
  let stop = false;
  guest.onSuspend(() => { stop = true; console.log('suspending at ' + next); return { next }; });
  const inflight = new Set();
  while (next < total && !stop) {
    const p = disk.write(next * 8, chunk(next)).finally(() => inflight.delete(p));
    inflight.add(p);
    next++;
    if (inflight.size >= 48) await Promise.race(inflight);
    if (next % 64 === 0) console.log('wrote ' + next);
    await new Promise((r) => setTimeout(r, 4));
  }
  if (stop) return new Promise(() => {});
  await Promise.all(inflight);
  let bad = 0;
  for (let n = 0; n < total; n++) if (Buffer.compare(Buffer.from(await disk.read(n * 8, 8)), Buffer.from(chunk(n))) !== 0) bad++;
  console.log('verified ' + total + ', ' + bad + ' bad');
}
`);

t.test('save and restore with a disk writer running: the guest carries on, nothing lost', async (t) => {
  const img = join(dir, 'save.img');
  t.equal((await xenpv(['disk', 'create', img, '2M'])).status, 0);
  const file = join(dir, 'saver.cfg');
  writeFileSync(file, `name = "saver"\nmemory = 32\nkernel = "saver.mjs"\ndisk = ['save.img,raw,xvda,rw']\n`);
  await ok(['create', file]);
  await waitLog('saver', /wrote 64\b/);
  const saved = join(dir, 'saver.save');
  t.match(await ok(['save', 'saver', saved]), /^saver: saved to .*saver\.save \(\d+ pages\)$/m);
  t.equal(await row('saver'), undefined, 'the saved domain is gone');
  const at = Number((await waitLog('saver', /suspending at (\d+)/))[1]);
  t.ok(at >= 64 && at < 512, `suspended at ${at} of 512`);
  const [magic, header] = readFileSync(saved, 'latin1').split('\n', 2);
  t.equal(magic, 'XENPV-SAVE 1');
  t.match(JSON.parse(header!), { spec: { name: 'saver', disks: [{ vdev: 'xvda' }] }, nrPages: 8192 });
  const restored = await ok(['restore', saved]);
  t.match(restored, /^saver: domid \d+$/m);
  await waitLog('saver', new RegExp(`resumed at ${at}\\b`));
  t.match((await waitLog('saver', /verified (\d+), (\d+) bad/))[0], 'verified 512, 0 bad');
  await until('the restored guest powered off', async () => (await row('saver')) === undefined);
  const data = readFileSync(img);
  let bad = 0;
  for (let lba = 0; lba < data.length / 512; lba++) {
    if (data.readUInt32LE(lba * 512) !== lba || data[lba * 512 + 4] !== ((lba * 13 + 5) & 255)) bad++;
  }
  t.equal(bad, 0, 'the backing file holds every sector');
});

t.test('save and restore refuse what they cannot do, and the guest runs on', async (t) => {
  await ok(['create', cfg('keeper')]);
  await waitLog('keeper', /boot keeper/);
  const nodir = await xenpv(['save', 'keeper', join(dir, 'no', 'such', 'dir', 'x.save')]);
  t.equal(nodir.status, 1);
  t.match(nodir.stderr, /ENOENT/);
  t.match((await row('keeper'))?.state, /^[r-][b-]----$/, 'still running');
  const nobody = await xenpv(['save', 'nosuch', join(dir, 'x.save')]);
  t.match(nobody.stderr, /ESRCH/);
  const junk = join(dir, 'junk.save');
  writeFileSync(junk, 'XENPV-SAVE 1\n{"spec": {"name": "../evil"}}\n');
  const bad = await xenpv(['restore', junk]);
  t.equal(bad.status, 1);
  t.match(bad.stderr, /EINVAL: .*not a xenpv save file/);
  writeFileSync(junk, 'hello\n');
  t.match((await xenpv(['restore', junk])).stderr, /EINVAL/);
  t.match((await xenpv(['restore', join(dir, 'missing.save')])).stderr, /ENOENT/);
  const saved = join(dir, 'keeper.save');
  await ok(['block-attach', 'keeper', 'format=memory, vdev=xvdc, target=1M']);
  await ok(['save', 'keeper', saved]);
  await ok(['restore', saved]);
  const disks = JSON.parse(await ok(['block-list', 'keeper', '--json'])) as { devices: { devid: number }[] }[];
  t.same(disks[0]!.devices.map((d) => d.devid), [51744], 'a hotplugged disk is part of the saved config');
  const clash = await xenpv(['restore', saved]);
  t.equal(clash.status, 1);
  t.match(clash.stderr, /EEXIST/, 'a second restore of the same guest: its name is taken');
  await waitLog('keeper', /boot keeper \d+[\s\S]*boot keeper \d+/);
  await ok(['destroy', 'keeper']);
});

t.test('config errors name the file, the line and the key', async (t) => {
  const bad = join(dir, 'bad.cfg');
  const cases: [string, RegExp][] = [
    ['name = "x"\nkernel = "guest.mjs"\nmemory = "lots"\n', /ECONFIG: .*bad\.cfg:3: memory: must be a whole number/],
    ['name = "x"\nkernel = "guest.mjs"\ncolour = 3\n', /ECONFIG: .*bad\.cfg:3: colour: unknown key/],
    ['name = "x"\nkernel = "guest.mjs"\non_crash = "explode"\n', /ECONFIG: .*bad\.cfg:3: on_crash: must be one of destroy, restart, preserve/],
    ['name = "x"\nkernel = "guest.mjs"\nvcpus = 4\nmaxvcpus = 2\n', /ECONFIG: .*bad\.cfg:4: maxvcpus: 2 is less than vcpus/],
    ['name = "x"\nkernel = "guest.mjs"\nconsole_port = 70000\n', /ECONFIG: .*bad\.cfg:3: console_port: must be a whole number from 1 to 65535/],
    ['name = "x y"\nkernel = "guest.mjs"\n', /ECONFIG: .*bad\.cfg:1: name: required/],
    ['name = "x"\nkernel = "nosuch.mjs"\n', /ECONFIG: .*bad\.cfg: kernel: .*nosuch\.mjs: no such file/],
    ['name = "x"\nname = "y"\nkernel = "guest.mjs"\n', /ECONFIG: .*bad\.cfg:2: name: set twice \(first on line 1\)/],
    ['name = "x"\nkernel = "guest.mjs"\ndisk = [\'vdev=xvda, target=nosuch.img\']\n', /ECONFIG: .*bad\.cfg: disk: xvda: .*nosuch\.img: no such file/],
  ];
  for (const [body, re] of cases) {
    writeFileSync(bad, body);
    const r = await xenpv(['create', bad]);
    t.equal(r.status, 2, body);
    t.match(r.stderr, re);
  }
  const port = createServer().listen(0, '127.0.0.1');
  await new Promise((r) => port.once('listening', r));
  const busy = (port.address() as { port: number }).port;
  const r = await xenpv(['create', cfg('clash', '', `console_port = ${busy}\n`)]);
  port.close();
  t.equal(r.status, 1);
  t.match(r.stderr, /EADDRINUSE/, 'a console port in use fails the create');
  t.equal(await row('clash'), undefined, 'and leaves nothing behind');
});

t.test('without a host: ESRCH', async (t) => {
  const r = await new Promise<Result>((resolve) => {
    const child = spawn(process.execPath, [cli, 'list', '--rundir', join(dir, 'nohost')]);
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('close', (status) => resolve({ status, stdout: '', stderr }));
  });
  t.equal(r.status, 1);
  t.match(r.stderr, /ESRCH: no host is running/);
});
