// `xenpv host start|stop`: a host that outlives the command. start spawns a
// detached `xenpv host daemon`, which boots a Machine, opens the control
// socket (lib/backends/control.ts), writes its pid file and reports the
// xenstored socket over the IPC channel, then drops the channel; stop
// signals the pid and waits for the daemon to clean up.

import { spawn } from 'node:child_process';
import { mkdirSync, openSync, closeSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { XenError } from '../errors.js';
import { Machine, type MachineOptions } from '../machine.js';
import { ControlServer, controlOps } from '../backends/control.js';

const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 15_000;

/** $XDG_RUNTIME_DIR/xenpv when the session has one, else /tmp/xenpv-<uid>. */
export function defaultRundir(): string {
  const xdg = process.env['XDG_RUNTIME_DIR'];
  if (xdg !== undefined && xdg !== '') return join(xdg, 'xenpv');
  return join(tmpdir(), `xenpv-${process.getuid?.() ?? 0}`);
}

/** The host's control socket. */
export function controlPath(rundir: string): string {
  return join(rundir, 'control');
}

function pidFile(rundir: string): string {
  return join(rundir, 'xenpv.pid');
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The running daemon's pid, or null (a pid file naming a dead process is stale and removed). */
export function runningPid(rundir: string): number | null {
  let text: string;
  try {
    text = readFileSync(pidFile(rundir), 'utf8');
  } catch {
    return null;
  }
  const pid = Number(text.trim());
  if (Number.isInteger(pid) && pid > 0 && isAlive(pid)) return pid;
  rmSync(pidFile(rundir), { force: true });
  return null;
}

type Ready = { socketPath: string } | { error: string };

/** Spawn the daemon and wait for its word; resolves with the socket path. */
export async function hostStart(rundir: string, cli: string, configFile?: string): Promise<string> {
  const pid = runningPid(rundir);
  if (pid !== null) throw new XenError('EEXIST', `a host is already running in ${rundir} (pid ${pid})`);
  mkdirSync(rundir, { recursive: true, mode: 0o700 });
  const logFd = openSync(join(rundir, 'host.log'), 'a');
  const args = [cli, 'host', 'daemon', '--rundir', rundir, ...(configFile === undefined ? [] : ['--config', configFile])];
  const child = spawn(process.execPath, args, {
    detached: true,
    stdio: ['ignore', logFd, logFd, 'ipc'],
  });
  closeSync(logFd);
  const ready = await new Promise<Ready>((resolve) => {
    const timer = setTimeout(() => resolve({ error: 'ETIMEDOUT: the host did not come up' }), START_TIMEOUT_MS);
    child.once('message', (m) => {
      clearTimeout(timer);
      resolve(m as Ready);
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ error: `EIO: the host exited (status ${code}); see ${join(rundir, 'host.log')}` });
    });
  });
  child.removeAllListeners();
  if (child.connected) child.disconnect();
  child.unref();
  if ('error' in ready) {
    if (child.exitCode === null) child.kill('SIGTERM');
    const [code = 'EIO', ...rest] = ready.error.split(': ');
    throw new XenError(code, rest.join(': '));
  }
  return ready.socketPath;
}

/** The detached process itself: boot, publish, run until SIGTERM/SIGINT. */
export async function hostDaemon(rundir: string, opts: MachineOptions = {}): Promise<void> {
  let machine: Machine;
  try {
    machine = await Machine.boot({ ...opts, rundir });
  } catch (err) {
    process.send?.({ error: (err as Error).message } satisfies Ready);
    process.exit(1);
  }
  let control: ControlServer;
  try {
    control = await ControlServer.listen(controlPath(rundir), controlOps({ machine, rundir, startedAt: Date.now() }));
  } catch (err) {
    await machine.stop();
    process.send?.({ error: (err as Error).message } satisfies Ready);
    process.exit(1);
  }
  writeFileSync(pidFile(rundir), `${process.pid}\n`);
  let stopping = false;
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    void control.close().then(() => machine.stop()).finally(() => {
      rmSync(pidFile(rundir), { force: true });
      process.exit(0);
    });
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.on('disconnect', () => undefined);
  process.send?.({ socketPath: machine.socketPath ?? '' } satisfies Ready);
  // Signals, not the event loop, end this process.
  setInterval(() => undefined, 1 << 30);
}

/** Signal the daemon and wait, bounded, until it has gone. */
export async function hostStop(rundir: string): Promise<number> {
  const pid = runningPid(rundir);
  if (pid === null) throw new XenError('ESRCH', `no host is running in ${rundir}`);
  process.kill(pid, 'SIGTERM');
  const deadline = Date.now() + STOP_TIMEOUT_MS;
  while (isAlive(pid)) {
    if (Date.now() > deadline) throw new XenError('ETIMEDOUT', `host pid ${pid} did not stop within ${STOP_TIMEOUT_MS} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
  rmSync(pidFile(rundir), { force: true });
  return pid;
}

export function cliPath(): string {
  return fileURLToPath(new URL('./main.js', import.meta.url));
}
