// The main job: `npm start` runs examples/demo (two guests that take
// addresses over DHCP, ping each other, exchange UDP, write and verify their
// disks and power off) and ends with a table of dom0's device counters.
// This runs the very command, from a checkout without the disk images.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../..', import.meta.url));
const demo = join(root, 'examples/demo');
const images = ['demo-a.img', 'demo-b.img'].map((f) => join(demo, f));

/** `npm start` as a user runs it (through the npm that runs this test, when there is one). */
function npmStart(): { status: number | null; stdout: string; stderr: string } {
  const npm = process.env['npm_execpath'];
  const [cmd, args] = npm !== undefined && npm.endsWith('.js') ? [process.execPath, [npm, 'start']] : ['npm', ['start']];
  return spawnSync(cmd, args, { cwd: root, encoding: 'utf8', timeout: 90_000, env: { ...process.env, DEBUG: '' } });
}

/** A row of the table: the device's name, then its numbers. */
function tableRow(out: string, device: string): number[] | undefined {
  const m = new RegExp(`^${device} +([\\d ]+)$`, 'm').exec(out);
  return m?.[1]!.trim().split(/ +/).map(Number);
}

t.test('npm start: the demo from a fresh checkout, end to end', async (t) => {
  t.same(JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).scripts.start.match(/run .*examples\/demo\/\*\.cfg/)?.length, 1, 'npm start runs examples/demo/*.cfg');
  for (const f of images) rmSync(f, { force: true });
  const r = npmStart();
  t.equal(r.status, 0, r.stdout + r.stderr);
  for (const f of images) t.equal(existsSync(f) ? statSync(f).size : 0, 4 << 20, `${f} made by prestart`);

  const leases = new Map<string, string>();
  for (const [name, mac] of [['demo-a', '00:16:3e:00:0d:0a'], ['demo-b', '00:16:3e:00:0d:0b']] as const) {
    const m = new RegExp(`^${name}: xnf0 ${mac}: (10\\.0\\.0\\.(\\d+))/24 \\(DHCP from 10\\.0\\.0\\.1\\)$`, 'm').exec(r.stdout);
    t.ok(m !== null && Number(m[2]) >= 100 && Number(m[2]) <= 199, `${name} has an address from dom0's DHCP range: ${m?.[1]}`);
    if (m !== null) leases.set(name, m[1]!);
    t.match(r.stdout, new RegExp(`^${name}: disk device/vbd/51712: wrote, flushed and verified 8192 sectors$`, 'm'));
    t.match(r.stdout, new RegExp(`^${name} \\(domid \\d+\\): poweroff$`, 'm'));
  }
  t.not(leases.get('demo-a'), leases.get('demo-b'), 'two addresses');
  for (const [name, peer] of [['demo-a', 'demo-b'], ['demo-b', 'demo-a']] as const) {
    const at = (leases.get(peer) ?? '?').replace(/\./g, '\\.');
    t.match(r.stdout, new RegExp(`^${name}: peer ${peer} is ${at}$`, 'm'), `${name} found ${peer} at its lease`);
    t.match(r.stdout, new RegExp(`^${name}: ping ${at}: reply 2 in [\\d.]+ ms$`, 'm'));
    t.match(r.stdout, new RegExp(`^${name}: udp ${at}:7: 20 datagrams \\(14001 bytes\\) echoed intact$`, 'm'));
  }

  t.match(r.stdout, /^DEVICE +FRAMES IN +BYTES IN +FRAMES OUT +BYTES OUT +DROPS +ERRORS$/m);
  t.match(r.stdout, /^DEVICE +READS +WRITES +FLUSHES +SECTORS READ +SECTORS WRITTEN +ERRORS$/m);
  for (const name of ['demo-a', 'demo-b']) {
    const vif = tableRow(r.stdout, `${name} vif 0`);
    t.equal(vif?.length, 6, `${name}'s vif row`);
    const [framesIn, bytesIn, framesOut, bytesOut, drops, errors] = vif ?? [];
    // DHCP, the peer search, 3 pings and 20 datagrams each way, echoes, the end: at least 3 + 20 + 20 frames.
    t.ok(framesIn! >= 43 && framesOut! >= 43, `${name}: ${framesIn} frames in, ${framesOut} out`);
    t.ok(bytesIn! >= 14001 * 2 && bytesOut! >= 14001 * 2, `${name}: ${bytesIn} bytes in, ${bytesOut} out`);
    t.same([drops, errors], [0, 0], `${name}: nothing dropped`);
    const vbd = tableRow(r.stdout, `${name} vbd xvda`);
    t.equal(vbd?.length, 6, `${name}'s vbd row`);
    const [reads, writes, flushes, sectorsRead, sectorsWritten, bad] = vbd ?? [];
    t.ok(reads! > 0 && writes! > 0 && flushes! >= 1, `${name}: ${reads} reads, ${writes} writes, ${flushes} flushes`);
    t.same([sectorsRead, sectorsWritten, bad], [8192, 8192, 0], `${name}: the whole disk written and read back`);
  }
});

t.test('the demo fails clearly: a guest whose peer never comes is destroyed at --duration, status 1 with the reason', async (t) => {
  const cli = join(root, 'dist/lib/cli/main.js');
  const r = spawnSync(process.execPath, [cli, 'run', '--dhcp', 'xenbr0=10.0.0.100-10.0.0.199', '--duration', '3', join(demo, 'demo-a.cfg')],
    { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.status, 1);
  t.match(r.stdout, /^demo-a \(domid 1\): destroyed$/m);
  t.match(r.stderr, /^xenpv: demo-a: destroyed \(every guest must power off\)$/m);
  t.match(r.stderr, /^xenpv: \[ *[\d.]+ s\] demo-a: /m, 'progress lines while it ran');
  const vbd = tableRow(r.stdout, 'demo-a vbd xvda');
  t.ok(vbd !== undefined && vbd[4] === 8192, `the table still shows its disk's counters as it was destroyed: ${vbd}`);
});

t.test('the demo under the deterministic runner with faults (spurious events, delays, deschedules): both guests power off, the table whole, and it replays', async (t) => {
  const cli = join(root, 'dist/lib/cli/main.js');
  const digests: Array<string | undefined> = [];
  for (const run of ['first run', 'replay']) {
    // No vbd-restart fault: a restarted backend's counters start over, and the table is to show the whole disk.
    const r = spawnSync(process.execPath, [cli, 'run', '--dhcp', 'xenbr0=10.0.0.100-10.0.0.199', '--seed', '7', '--faults', 'spurious,delay,deschedule', join(demo, 'demo-a.cfg'), join(demo, 'demo-b.cfg')],
      { encoding: 'utf8', timeout: 60_000 });
    t.equal(r.status, 0, `${run}: ${r.stdout}${r.stderr}`);
    for (const name of ['demo-a', 'demo-b']) t.match(r.stdout, new RegExp(`^${name} vbd xvda +\\d+ +\\d+ +\\d+ +8192 +8192 +0$`, 'm'));
    const m = /\nxenpv: seed 7: \d+ steps, [\d.]+ ms virtual, \d+ faults, digest ([0-9a-f]{64})\n$/.exec(r.stdout);
    t.ok(m !== null, `${run}: the digest line`);
    digests.push(m?.[1]);
  }
  t.equal(digests[1], digests[0], 'seed 7 replays: the same digest');
});
