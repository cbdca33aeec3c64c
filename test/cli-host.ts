// A host daemon for the CLI tests: `xenpv host start` in a fresh directory
// before a file's tests and `host stop` after them, with what those tests
// share: running the CLI as a process against that host, polling, the
// console logs, the JSON API for polls, and one guest image (guest.mjs)
// that echoes console input and does what its `extra` asks. Each test file
// that uses it gets a host of its own, so the files run in parallel.

import type { Test } from 'tap';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ControlClient } from '../lib/cli/control-client.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
export const cli = join(root, 'dist/lib/cli/main.js');

export type Result = { status: number | null; stdout: string; stderr: string };
export type Row = { domid: number; name: string; memoryMiB: number; vcpus: number; maxVcpus: number; state: string; timeS: number };
export type Top = Row & { ports: number; granted: number; pinned: number; mapped: number; devices: { type: string; devid: number; counters: Record<string, number> }[] };

/** Poll `fn` until it returns something other than undefined/false, bounded. */
export async function until<T>(what: string, fn: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// The guest image; `extra` says what it does besides echoing console input:
// `writer` writes a pattern to its first disk until told `stop`, `tick`
// prints a tick every 20 ms; a disk that appears is written from a
// disk.buffer() array (so its own pages are granted too), read back and
// checked; `crash` on the console throws, `vcpus` prints the online count.
const GUEST_IMAGE = `
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
  const known = new Map(guest.disks().map((d) => [d.path, d]));
  guest.onDevicesChanged(async () => {
    const now = guest.disks();
    for (const d of now) {
      if (known.has(d.path)) continue;
      known.set(d.path, d);
      console.log('attached ' + d.path + ' ' + d.sectors);
      const data = d.buffer(64 * 512);
      for (let i = 0; i < 64; i++) data.set(pattern(i), i * 512);
      await d.write(0, data);
      const back = await d.read(0, 64);
      console.log(d.path + (Buffer.compare(Buffer.from(back), Buffer.from(data)) === 0 ? ' verified' : ' MISMATCH'));
    }
    for (const [p, gone] of [...known]) {
      if (now.some((d) => d.path === p)) continue;
      known.delete(p);
      let again = 'ok';
      try { gone.buffer(512); } catch (err) { again = err.code; }
      console.log('detached ' + p + ' buffer ' + again);
    }
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
`;

export class CliHost {
  /** Configs, images and saves go here; the host's rundir is `run` in it. */
  readonly dir: string;
  readonly rundir: string;
  // Polls go over the JSON API on one connection; the commands under test run as processes.
  private api: ControlClient | null = null;

  /** A host for the tests of `t` (the file's root): started before them, stopped after. */
  constructor(t: Test, prefix: string) {
    this.dir = mkdtempSync(join(tmpdir(), prefix));
    this.rundir = join(this.dir, 'run');
    writeFileSync(join(this.dir, 'guest.mjs'), GUEST_IMAGE);
    t.before(async () => {
      const r = await this.xenpv(['host', 'start']);
      if (r.status !== 0) throw new Error(`host start: ${r.stderr}`);
    });
    t.teardown(async () => {
      this.api?.close();
      await this.xenpv(['host', 'stop']);
    });
  }

  /** Run `xenpv ARGS --rundir <ours>` (no rundir for `disk`); `input` is written to its stdin. */
  xenpv(args: string[], input?: string): Promise<Result> {
    return new Promise((resolve) => {
      const where = args[0] === 'disk' ? [] : ['--rundir', this.rundir];
      const child = spawn(process.execPath, [cli, ...args, ...where], { stdio: ['pipe', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
      child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
      child.on('close', (status) => resolve({ status, stdout, stderr }));
      child.stdin.end(input);
    });
  }

  /** `xenpv ARGS`, which must succeed: its stdout. */
  async ok(args: string[]): Promise<string> {
    const r = await this.xenpv(args);
    if (r.status !== 0) throw new Error(`xenpv ${args.join(' ')}: status ${r.status}: ${r.stderr}`);
    return r.stdout;
  }

  /** A guest.mjs config in the directory. */
  cfg(name: string, extra = '', more = ''): string {
    const file = join(this.dir, `${name}.cfg`);
    writeFileSync(file, `name = "${name}"\nmemory = 32\nkernel = "guest.mjs"\nextra = "${extra}"\n${more}`);
    return file;
  }

  logPath(name: string): string {
    return join(this.rundir, 'console', `${name}.log`);
  }

  /** What the domain's console wrote so far. */
  log(name: string): string {
    return existsSync(this.logPath(name)) ? readFileSync(this.logPath(name), 'utf8') : '';
  }

  waitLog(name: string, re: RegExp): Promise<RegExpMatchArray> {
    return until(`${re} in the console of ${name}`, () => this.log(name).match(re) ?? undefined);
  }

  async list(): Promise<Row[]> {
    this.api ??= await ControlClient.connect(this.rundir);
    return (await this.api.call('list')) as Row[];
  }

  async row(name: string): Promise<Row | undefined> {
    return (await this.list()).find((r) => r.name === name);
  }

  async topOnce(): Promise<Top[]> {
    this.api ??= await ControlClient.connect(this.rundir);
    return (await this.api.call('top')) as Top[];
  }
}
