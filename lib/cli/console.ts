// `xenpv console NAME`: attach the terminal to a guest's console through the
// concentrator's unix socket. Output goes to stdout; what is typed goes to
// the guest (the terminal is raw, so Ctrl-C reaches the guest as in xl
// console). Ctrl-] detaches. The session ends when the console closes (the
// domain went away); the end of stdin alone does not end it, so a script
// may feed input and keep reading.

import { createConnection } from 'node:net';
import { XenError } from '../errors.js';
import type { ControlClient } from './control-client.js';

/** Ctrl-], the escape of xl console and telnet. */
const DETACH = 0x1d;

export async function consoleAttach(c: ControlClient, name: string): Promise<number> {
  const info = (await c.call('console', { domain: name })) as { socket: string; name: string; domid: number };
  const sock = createConnection(info.socket);
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', (err: NodeJS.ErrnoException) => reject(new XenError(err.code === 'ENOENT' ? 'ESRCH' : (err.code ?? 'EIO'), `console of ${info.name}: ${err.message}`)));
  });
  const stdin = process.stdin;
  const tty = stdin.isTTY === true;
  if (tty) {
    stdin.setRawMode(true);
    process.stderr.write(`Connected to ${info.name} (domid ${info.domid}). Escape character is '^]'.\r\n`);
  }
  return new Promise<number>((resolve) => {
    const done = (code: number): void => {
      stdin.off('data', onInput);
      if (tty) stdin.setRawMode(false);
      stdin.pause();
      sock.destroy();
      resolve(code);
    };
    const onInput = (chunk: Buffer): void => {
      const at = chunk.indexOf(DETACH);
      if (at < 0) {
        sock.write(chunk);
        return;
      }
      if (at > 0) sock.write(chunk.subarray(0, at));
      sock.end(() => done(0));
    };
    stdin.on('data', onInput);
    sock.on('data', (chunk: Buffer) => process.stdout.write(chunk));
    sock.on('error', () => undefined);
    sock.on('close', () => {
      if (tty) process.stderr.write(`\r\nThe console of ${info.name} closed.\r\n`);
      done(0);
    });
  });
}
