// End to end: a host with dom0 boots guests in their own workers; each guest
// attaches over event channels, grant tables and xenstore, writes to its PV
// console and shuts down. Through the Machine API and through the CLI.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const cli = join(root, 'dist/lib/cli/main.js');
const hello = join(root, 'examples/hello/hello.cfg');
const dir = mkdtempSync(join(tmpdir(), 'xenpv-boot-'));

function image(name: string, body: string): string {
  const file = join(dir, `${name}.mjs`);
  writeFileSync(file, body);
  const cfg = join(dir, `${name}.cfg`);
  writeFileSync(cfg, `name = "${name}"\nmemory = 8\nkernel = "${file}"\n`);
  return cfg;
}

const crashCfg = image('crasher', `export async function main(guest) { console.log('about to fail'); throw new Error('guest bug'); }\n`);
const waitCfg = image('waiter', `export async function main(guest) {
  guest.onShutdownRequest((reason) => console.log('asked to ' + reason));
  console.log('waiting');
  await new Promise(() => {});
}\n`);
const storeCfg = image('storer', `export async function main(guest) {
  await guest.xenstore.write('data/greeting', 'hi');
  console.log('read back ' + await guest.xenstore.read('data/greeting'));
  try { await guest.xenstore.read('/local/domain/0/name'); console.log('read dom0 node'); }
  catch (err) { console.log('dom0 node: ' + err.code); }
}\n`);

t.test('hello boots, prints its domid, powers off', async (t) => {
  const lines: string[] = [];
  const m = await Machine.boot({ onConsole: (_d, name, text) => lines.push(`${name}:${text}`) });
  t.teardown(() => m.stop());
  const domid = await m.create(loadDomainConfig(hello));
  const exit = await m.waitExit(domid);
  t.equal(exit.reason, 'poweroff');
  t.match(exit.console, new RegExp(`^hello from domU ${domid}\\n`));
  t.match(exit.console, /devices: none/);
  t.match(exit.console, /name hello, extra "greeting=hello"/);
  t.ok(lines.join('').includes('hello from domU'), 'console output arrived live too');
});

t.test('a guest uses xenstore under its own path and is refused dom0 nodes', async (t) => {
  const m = await Machine.boot();
  t.teardown(() => m.stop());
  const exit = await m.waitExit(await m.create(loadDomainConfig(storeCfg)));
  t.equal(exit.reason, 'poweroff');
  t.match(exit.console, /read back hi/);
  t.match(exit.console, /dom0 node: EACCES/);
});

t.test('control/shutdown asks a running guest to power off', async (t) => {
  let started!: () => void;
  const waiting = new Promise<void>((r) => (started = r));
  const m = await Machine.boot({ onConsole: (_d, _n, text) => text.includes('waiting') && started() });
  t.teardown(() => m.stop());
  const domid = await m.create(loadDomainConfig(waitCfg));
  await waiting; // the image has installed its handler
  await m.requestShutdown(domid, 'poweroff');
  const exit = await m.waitExit(domid);
  t.equal(exit.reason, 'poweroff');
  t.match(exit.console, /waiting\nasked to poweroff\n/);
});

t.test('a guest that throws crashes alone; dom0 and other guests go on', async (t) => {
  const m = await Machine.boot();
  t.teardown(() => m.stop());
  const bad = await m.create(loadDomainConfig(crashCfg));
  const badExit = await m.waitExit(bad);
  t.equal(badExit.reason, 'crash');
  t.match(badExit.console, /about to fail/);
  const good = await m.create(loadDomainConfig(hello));
  t.equal((await m.waitExit(good)).reason, 'poweroff', 'the next guest boots fine');
});

t.test('the xenpv bin is executable, so npx xenpv runs it', async (t) => {
  t.ok((statSync(cli).mode & 0o111) !== 0, `${cli} has an execute bit`);
  const r = spawnSync(cli, ['help'], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr);
  t.match(r.stdout, /usage: xenpv/);
});

t.test('xenpv run --json (the CLI)', async (t) => {
  const r = spawnSync(process.execPath, [cli, 'run', hello, '--json'], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { domains: { name: string; domid: number; exit: { reason: string }; console: string }[] };
  t.equal(out.domains.length, 1);
  const d = out.domains[0]!;
  t.equal(d.exit.reason, 'poweroff');
  t.match(d.console, new RegExp(`hello from domU ${d.domid}`));
});

t.test('xenpv run prints console lines prefixed with the guest name; a crash exits non-zero', async (t) => {
  const r = spawnSync(process.execPath, [cli, 'run', hello, crashCfg], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.status, 1);
  t.match(r.stdout, /^hello: hello from domU \d+$/m);
  t.match(r.stdout, /^crasher: about to fail$/m);
  t.match(r.stdout, /^crasher \(domid \d+\): crash$/m);
});

t.test('xenpv run --duration destroys a guest that does not stop', async (t) => {
  const r = spawnSync(process.execPath, [cli, 'run', waitCfg, '--json', '--duration', '1'], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.status, 1);
  t.equal((JSON.parse(r.stdout) as { domains: { exit: { reason: string } }[] }).domains[0]?.exit.reason, 'destroyed');
});

t.test('bad configs and arguments get a clear error with a code', async (t) => {
  const bad = join(dir, 'bad.cfg');
  writeFileSync(bad, 'name = "x"\nmemory = "lots"\nkernel = "k.mjs"\n');
  let r = spawnSync(process.execPath, [cli, 'run', bad], { encoding: 'utf8' });
  t.equal(r.status, 2);
  t.match(r.stderr, /ECONFIG: .*bad\.cfg:2: memory: must be a whole number/);
  writeFileSync(bad, 'name = "x"\nkernel = "k.mjs"\ncolour = 3\n');
  r = spawnSync(process.execPath, [cli, 'run', bad], { encoding: 'utf8' });
  t.match(r.stderr, /ECONFIG: .*bad\.cfg:3: colour: unknown key/);
  r = spawnSync(process.execPath, [cli, 'run', join(dir, 'missing.cfg')], { encoding: 'utf8' });
  t.match(r.stderr, /ENOENT/);
  r = spawnSync(process.execPath, [cli, 'run', hello, '--duration', 'soon'], { encoding: 'utf8' });
  t.match(r.stderr, /EINVAL: --duration/);
  r = spawnSync(process.execPath, [cli, 'frobnicate'], { encoding: 'utf8' });
  t.equal(r.status, 2);
  t.match(r.stderr, /unknown command/);
});
