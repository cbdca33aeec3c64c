// The xenpv CLI against a host daemon, end to end: domains come and go.
// `host start`, then each management command as a separate process over the
// control socket: create and list, shutdown, reboot and destroy, what a
// crash does under each on_crash, config errors, and the control socket
// spoken raw with bad requests. One host serves the whole file (test/cli-host.ts);
// test/cli-guest.test.ts (console, pause, vcpus, top) and
// test/cli-disk.test.ts (block hotplug, save and restore) have hosts of their own.

import t from 'tap';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createConnection, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { CliHost, cli, until, type Result, type Row } from './cli-host.js';

const h = new CliHost(t, 'xenpv-cli-');

/** Raw control socket: send lines, read reply lines. */
async function rawControl(): Promise<{ send(line: string): void; next(): Promise<Record<string, unknown>>; closed: Promise<void>; sock: Socket }> {
  const sock = createConnection(join(h.rundir, 'control'));
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

t.test('host status; create two guests; list as a table and as JSON', async (t) => {
  t.match(await h.ok(['host', 'status']), /^pid \d+, up \d+ s, 1 domains/);
  t.match(await h.ok(['create', h.cfg('alpha')]), /^alpha: domid \d+$/m);
  t.match(await h.ok(['create', h.cfg('beta', '', 'vcpus = 2\n')]), /^beta: domid \d+$/m);
  await h.waitLog('alpha', /boot alpha/);
  await h.waitLog('beta', /boot beta/);
  const table = await h.ok(['list']);
  const lines = table.trimEnd().split('\n');
  t.equal(lines[0], 'Name                                        ID   Mem VCPUs\tState\tTime(s)');
  t.match(lines[1], /^Domain-0 {32} {5}0 +16 +1 {5}[r-][b-]----\s+\d+\.\d$/);
  t.match(lines[2], /^alpha {35} +\d+ +32 +1 {5}[r-][b-]----\s+\d+\.\d$/);
  t.match(lines[3], /^beta {36} +\d+ +32 +2 {5}[r-][b-]----\s+\d+\.\d$/);
  const rows = JSON.parse(await h.ok(['list', '--json'])) as Row[];
  t.same(rows.map((r) => r.name), ['Domain-0', 'alpha', 'beta']);
  t.match(rows[2], { memoryMiB: 32, vcpus: 2, maxVcpus: 2 });
  t.ok(rows.every((r) => typeof r.timeS === 'number' && r.timeS >= 0), 'Time(s) for each');
  const again = await h.xenpv(['create', h.cfg('alpha')]);
  t.equal(again.status, 1);
  t.match(again.stderr, /^xenpv: EEXIST: /, 'names are unique');
  t.match(await h.ok(['list', 'beta']), /^beta /m);
  const none = await h.xenpv(['list', 'gamma']);
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

t.test('shutdown -w, reboot (the image runs again under a new domid), destroy', async (t) => {
  const before = (await h.row('alpha'))!.domid;
  await h.ok(['reboot', 'alpha']);
  const after = await until('alpha back under a new domid', async () => {
    const r = await h.row('alpha');
    return r !== undefined && r.domid !== before ? r : undefined;
  });
  await h.waitLog('alpha', new RegExp(`boot alpha ${after.domid}`));
  t.match(h.log('alpha'), /asked to reboot/);
  t.match(await h.ok(['shutdown', '-w', 'alpha']), new RegExp(`^alpha \\(domid ${after.domid}\\): poweroff$`, 'm'));
  t.equal(await h.row('alpha'), undefined, 'on_poweroff=destroy: gone');
  await h.ok(['destroy', 'beta']);
  t.same((await h.list()).map((r) => r.name), ['Domain-0']);
});

t.test('a crash: on_crash destroy, restart and preserve; dom0 and the other guest carry on', async (t) => {
  await h.ok(['create', h.cfg('bystander')]);
  for (const action of ['destroy', 'restart', 'preserve']) {
    const name = `crash-${action}`;
    const out = await h.ok(['create', h.cfg(name, '', `on_crash = "${action}"\n`)]);
    const domid = Number(/domid (\d+)/.exec(out)![1]);
    await h.waitLog(name, /boot/);
    const c = spawn(process.execPath, [cli, 'console', name, '--rundir', h.rundir], { stdio: ['pipe', 'ignore', 'ignore'] });
    c.stdin.write('crash\n');
    const r = await until(`${name} handled`, async () => {
      const rows = await h.list();
      const now = rows.find((x) => x.name === name);
      if (action === 'destroy') return now === undefined ? 'gone' : undefined;
      if (action === 'restart') return now !== undefined && now.domid !== domid ? now : undefined;
      return now?.state === '----c-' ? now : undefined;
    });
    c.kill();
    if (action === 'restart') await h.waitLog(name, new RegExp(`boot ${name} ${(r as Row).domid}`));
    if (action === 'preserve') {
      t.equal((r as Row).domid, domid, 'preserved under its domid');
      const busy = await h.xenpv(['pause', name]);
      t.match(busy.stderr, /EINVAL/, 'a crashed domain does not run');
      await h.ok(['destroy', name]);
      t.equal(await h.row(name), undefined);
    }
    if (action === 'restart') await h.ok(['destroy', name]);
    t.pass(`on_crash=${action}`);
  }
  t.match((await h.row('bystander'))?.state, /^[r-][b-]----$/, 'the other guest runs');
  const c = spawn(process.execPath, [cli, 'console', 'bystander', '--rundir', h.rundir], { stdio: ['pipe', 'ignore', 'ignore'] });
  await until('the other guest answers', () => {
    c.stdin.write('hello\n');
    return /echo: hello/.test(h.log('bystander'));
  });
  c.kill();
  await h.ok(['destroy', 'bystander']);
});

t.test('config errors name the file, the line and the key', async (t) => {
  const bad = join(h.dir, 'bad.cfg');
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
    const r = await h.xenpv(['create', bad]);
    t.equal(r.status, 2, body);
    t.match(r.stderr, re);
  }
  const port = createServer().listen(0, '127.0.0.1');
  await new Promise((r) => port.once('listening', r));
  const busy = (port.address() as { port: number }).port;
  const r = await h.xenpv(['create', h.cfg('clash', '', `console_port = ${busy}\n`)]);
  port.close();
  t.equal(r.status, 1);
  t.match(r.stderr, /EADDRINUSE/, 'a console port in use fails the create');
  t.equal(await h.row('clash'), undefined, 'and leaves nothing behind');
});

t.test('without a host: ESRCH', async (t) => {
  const r = await new Promise<Result>((resolve) => {
    const child = spawn(process.execPath, [cli, 'list', '--rundir', join(h.dir, 'nohost')]);
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('close', (status) => resolve({ status, stdout: '', stderr }));
  });
  t.equal(r.status, 1);
  t.match(r.stderr, /ESRCH: no host is running/);
});
