// Debian's xenstore-utils and Xen's own test-xenstore against our xenstored,
// over the unix socket of a booted host (XENSTORED_PATH). Skipped, visibly,
// only where the tools are not installed; .ci/run installs them.

import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine } from '../../lib/machine.js';

const TEST_XENSTORE = '/usr/lib/xen-4.17/bin/test-xenstore';
const TOOLS = ['xenstore-write', 'xenstore-read', 'xenstore-exists', 'xenstore-list', 'xenstore-ls', 'xenstore-rm', 'xenstore-chmod', 'xenstore-watch'];

function have(tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
}

const missing = [...TOOLS.filter((x) => !have(x)), ...(existsSync(TEST_XENSTORE) ? [] : [TEST_XENSTORE])];
if (missing.length > 0) {
  t.comment(`SKIP: missing ${missing.join(', ')} (apt-get install xenstore-utils xen-utils-4.17)`);
  t.pass('skipped: tools missing');
} else {
  const rundir = mkdtempSync(join(tmpdir(), 'xenpv-conf-'));
  const machine = await Machine.boot({ rundir });
  t.teardown(() => machine.stop());
  const env = { ...process.env, XENSTORED_PATH: machine.socketPath! };

  const xs = (tool: string, ...args: string[]): { status: number | null; out: string; err: string } => {
    const r = spawnSync(tool, args, { env, encoding: 'utf8', timeout: 20_000 });
    return { status: r.status, out: r.stdout, err: r.stderr };
  };

  t.test('write, read, exists, list, ls, chmod, rm', async (t) => {
    t.equal(xs('xenstore-write', '/tool/conf/a', 'one', '/tool/conf/b/c', 'two words').status, 0);
    t.same(xs('xenstore-read', '/tool/conf/a', '/tool/conf/b/c'), { status: 0, out: 'one\ntwo words\n', err: '' });
    t.equal(xs('xenstore-exists', '/tool/conf/b').status, 0);
    t.equal(xs('xenstore-exists', '/tool/conf/nope').status, 1);
    t.equal(xs('xenstore-read', '/tool/conf/nope').status, 1);
    t.same(xs('xenstore-list', '/tool/conf').out.split('\n').filter(Boolean).sort(), ['a', 'b']);
    t.equal(xs('xenstore-ls', '/tool/conf').out, 'a = "one"\nb = ""\n c = "two words"\n');
    t.equal(xs('xenstore-chmod', '/tool/conf/a', 'n0', 'r1', 'w2').status, 0);
    t.match(xs('xenstore-ls', '-p', '/tool/conf').out, /^a = "one" .*\(n0,r1,w2\)$/m);
    t.equal(xs('xenstore-rm', '/tool/conf/b').status, 0);
    t.equal(xs('xenstore-exists', '/tool/conf/b/c').status, 1, 'rm takes the subtree');
    t.equal(xs('xenstore-rm', '/tool/conf').status, 0);
    t.equal(xs('xenstore-list', '/tool/conf').status, 1);
  });

  t.test('watch: fires once when set, then for a write below the path', async (t) => {
    const w = spawn('xenstore-watch', ['-n', '2', '/tool/watched'], { env });
    let out = '';
    w.stdout.on('data', (b: Buffer) => (out += b.toString()));
    const done = new Promise<number | null>((resolve) => w.on('exit', resolve));
    const deadline = Date.now() + 10_000;
    while (!out.includes('/tool/watched') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    t.equal(xs('xenstore-write', '/tool/watched/leaf', 'x').status, 0);
    const timer = setTimeout(() => w.kill(), 10_000);
    t.equal(await done, 0, 'exited after two events');
    clearTimeout(timer);
    t.equal(out, '/tool/watched\n/tool/watched/leaf\n');
  });

  t.test("Xen's test-xenstore, every test, 100 iterations", async (t) => {
    const list = spawnSync(TEST_XENSTORE, ['-l'], { env, encoding: 'utf8' });
    t.equal(list.status, 0);
    const r = spawnSync(TEST_XENSTORE, ['-i', '100'], { env, encoding: 'utf8', timeout: 120_000 });
    t.equal(r.status, 0, 'every test passed');
    t.ok(list.stdout.split('\n').filter((l) => /\S/.test(l)).length >= 12, 'the 12 tests of Xen 4.17 were listed');
    t.comment(`test-xenstore -i 100:\n${r.stdout.trim()}\n${r.stderr.trim()}`);
  });
}
