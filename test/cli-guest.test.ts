// The xenpv CLI against a host daemon, end to end: a running guest. Its
// console through the concentrator's unix socket and TCP port, several
// readers at once and `create -c`; pause and unpause; vcpu-set; vcpu-pin
// and vcpu-list; and `top`, once as JSON and live. A host of its own (test/cli-host.ts).

import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { join } from 'node:path';
import { CliHost, cli, until, type Top } from './cli-host.js';
import { hostCpus } from '../lib/hypervisor/affinity.js';

const h = new CliHost(t, 'xenpv-cli-guest-');

async function topOnceCli(): Promise<Top[]> {
  return JSON.parse(await h.ok(['top', '--once', '--json'])) as Top[];
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

t.test('console: two readers on the unix socket and one on console_port see the same output; Ctrl-] detaches', async (t) => {
  const port = await freePort();
  await h.ok(['create', h.cfg('talker', '', `console_port = ${port}\n`)]);
  await h.waitLog('talker', /boot talker/);
  const readers = [0, 1].map(() => {
    const child = spawn(process.execPath, [cli, 'console', 'talker', '--rundir', h.rundir], { stdio: ['pipe', 'pipe', 'pipe'] });
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
  t.match(h.log('talker'), /echo: from tcp\r?\n/, 'the log has it too');
  readers[0]!.child.stdin.write('\x1d');
  t.equal(await readers[0]!.exited, 0, 'Ctrl-] detaches with status 0');
  readers[1]!.child.stdin.write('still here\n');
  await until('the other reader still attached', () => readers[1]!.out().includes('echo: still here'));
  await h.ok(['destroy', 'talker']);
  t.equal(await readers[1]!.exited, 0, 'a reader ends when the domain goes');
  tcp.destroy();
  t.notOk(existsSync(join(h.rundir, 'console', 'talker.sock')), 'the socket goes with the domain');
  t.match(h.log('talker'), /boot talker/, 'the log stays');
  const none = await h.xenpv(['console', 'nosuch']);
  t.equal(none.status, 1);
  t.match(none.stderr, /ESRCH/);
  const attached = spawn(process.execPath, [cli, 'create', h.cfg('attached'), '-c', '--rundir', h.rundir], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  attached.stdout.on('data', (b: Buffer) => (out += b.toString()));
  await until('create -c attached', () => {
    attached.stdin.write('typed\n');
    return out.includes('echo: typed');
  });
  attached.stdin.write('\x1d');
  t.equal(await new Promise((r) => attached.on('close', r)), 0, 'create -c: the console until Ctrl-]');
  t.match(out, /^attached: domid \d+$/m);
  await h.ok(['destroy', 'attached']);
});

t.test('pause stops the guest, timers and all; unpause resumes it', async (t) => {
  await h.ok(['create', h.cfg('ticker', 'tick')]);
  await h.waitLog('ticker', /tick 3\b/);
  await h.ok(['pause', 'ticker']);
  t.match((await h.row('ticker'))?.state, /^--p---$/);
  await new Promise((r) => setTimeout(r, 200)); // a tick in flight lands
  const size = statSync(h.logPath('ticker')).size;
  await new Promise((r) => setTimeout(r, 500));
  t.equal(statSync(h.logPath('ticker')).size, size, 'no output while paused');
  const again = await h.xenpv(['pause', 'ticker']);
  t.equal(again.status, 1);
  t.match(again.stderr, /EINVAL/, 'a paused domain cannot be paused');
  await h.ok(['unpause', 'ticker']);
  await until('ticks again', () => statSync(h.logPath('ticker')).size > size);
  t.match((await h.row('ticker'))?.state, /^[r-][b-]----$/);
  await h.ok(['destroy', 'ticker']);
});

t.test('vcpu-set: the guest onlines and offlines vCPUs up to maxvcpus', async (t) => {
  await h.ok(['create', h.cfg('cpus', '', 'vcpus = 1\nmaxvcpus = 4\n')]);
  await h.waitLog('cpus', /boot cpus/);
  await until('1 of 4 online', async () => (await h.row('cpus'))?.vcpus === 1);
  t.match(await h.row('cpus'), { vcpus: 1, maxVcpus: 4 });
  await h.ok(['vcpu-set', 'cpus', '3']);
  await until('3 online', async () => (await h.row('cpus'))?.vcpus === 3);
  const c = spawn(process.execPath, [cli, 'console', 'cpus', '--rundir', h.rundir], { stdio: ['pipe', 'ignore', 'ignore'] });
  await until('the guest counts 3', () => {
    c.stdin.write('vcpus\n');
    return /vcpus 3/.test(h.log('cpus'));
  });
  c.kill();
  await h.ok(['vcpu-set', 'cpus', '1']);
  await until('1 online', async () => (await h.row('cpus'))?.vcpus === 1);
  const tooMany = await h.xenpv(['vcpu-set', 'cpus', '5']);
  t.equal(tooMany.status, 1);
  t.match(tooMany.stderr, /EINVAL/);
  const bad = await h.xenpv(['vcpu-set', 'cpus', 'lots']);
  t.equal(bad.status, 2);
  await h.ok(['destroy', 'cpus']);
});

t.test('vcpu-pin and vcpu-list: the CPUs a domain may run on', { skip: hostCpus().length < 2 ? 'needs two CPUs' : false }, async (t) => {
  const cpus = hostCpus();
  const last = cpus[cpus.length - 1]!;
  await h.ok(['create', h.cfg('pinned', '', `cpus = "${last}"\n`)]);
  await h.waitLog('pinned', /boot pinned/);
  const row = (table: string): string | undefined => table.split('\n').find((l) => l.startsWith('pinned '));
  const table = await h.ok(['vcpu-list']);
  t.equal(table.split('\n')[0], 'Name                                        ID VCPUs   CPU Affinity');
  t.match(table, /^Domain-0 +0 +1 +\d+ all$/m);
  t.match(row(table), new RegExp(`^pinned +\\d+ +1 +\\d+ ${last}$`));
  await h.ok(['vcpu-pin', 'pinned', 'all', String(cpus[0])]);
  t.match(row(await h.ok(['vcpu-list'])), new RegExp(` ${cpus[0]}$`));
  await h.ok(['vcpu-pin', 'pinned', 'all']);
  t.match(row(await h.ok(['vcpu-list', 'pinned'])), / all$/);
  const json = JSON.parse(await h.ok(['vcpu-list', 'pinned', '--json'])) as { cpus: number[] | null; allowed: number[]; everyCpu: boolean }[];
  t.equal(json[0]!.cpus, null, 'the set is gone');
  t.same(json[0]!.allowed, cpus, 'the thread may run anywhere');
  t.equal(json[0]!.everyCpu, true);
  // "all" is the host's judgement: a CLI that itself may run on one CPU still says it.
  const narrow = spawnSync('taskset', ['-c', String(cpus[0]), process.execPath, cli, 'vcpu-list', 'pinned', '--rundir', h.rundir], { encoding: 'utf8' });
  t.equal(narrow.status, 0, narrow.stderr);
  t.match(row(narrow.stdout), / all$/, 'a CLI under taskset');
  // Refusals: the host's (a CPU it lacks: 1), the command's own (2).
  const missing = await h.xenpv(['vcpu-pin', 'pinned', '63']);
  t.equal(missing.status, 1);
  t.match(missing.stderr, /EINVAL: cpus: CPU 63 is not one this host may run on/);
  for (const args of [['pinned', 'x'], ['pinned', '3-1'], ['pinned', '0', '1'], ['pinned']]) {
    const bad = await h.xenpv(['vcpu-pin', ...args]);
    t.equal(bad.status, 2, args.join(' '));
    t.match(bad.stderr, /EINVAL/);
  }
  t.equal((await h.xenpv(['vcpu-pin', 'nobody', '0'])).status, 1);
  await h.ok(['destroy', 'pinned']);
});

t.test('top --once --json and the live table', async (t) => {
  await h.ok(['create', h.cfg('watched')]);
  await h.waitLog('watched', /boot/);
  const rows = await topOnceCli();
  const w = rows.find((r) => r.name === 'watched')!;
  t.match(w, { memoryMiB: 32, vcpus: 1, maxVcpus: 1 });
  t.ok(w.ports >= 2 && w.granted >= 2, 'console and xenstore at least');
  t.match(w.devices, [{ type: 'console', devid: 0 }]);
  const live = spawn(process.execPath, [cli, 'top', '-d', '0.2', '--rundir', h.rundir], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  live.stdout.on('data', (b: Buffer) => (out += b.toString()));
  await until('two refreshes', () => (out.match(/\x1b\[H\x1b\[2J/g) ?? []).length >= 2);
  live.kill('SIGINT');
  t.equal(await new Promise((r) => live.on('close', r)), 0);
  t.match(out, /NAME STATE +CPU\(sec\) CPU\(%\)/);
  t.match(out, /watched -*[rb-]-+ +\d+\.\d +\d+\.\d/, 'a CPU(%) once there are two samples');
  await h.ok(['destroy', 'watched']);
});
