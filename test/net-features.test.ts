// Network features end to end: hotplug, multi-queue and split event
// channels with their fallback, the credit scheduler, multicast control.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { guestImage, heldByDom0, helloCode, runGuests, tempDir, udpFrameCode } from './net-fixtures.js';

const dir = tempDir('xenpv-net-features-');

t.test('hotplug: network-detach releases every grant, port and mapping; network-attach brings the interface back', async (t) => {
  const guest = guestImage(dir, 'plug', `${helloCode}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function pingPong(n, peer, count) {
  let echoed = 0;
  const got = new Promise((resolve) => n.onFrame((f) => { if (f[13] === 0xb5 && ++echoed === count) resolve(); }));
  for (let i = 0; i < count; i++) {
    const f = new Uint8Array(200 + i); f.set(peer, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = 0xb5;
    await n.send(f);
  }
  await Promise.race([got, sleep(20000)]);
  return echoed;
}
async function until(test) { for (let i = 0; i < 600 && !test(); i++) await sleep(50); return test(); }
export async function main(guest) {
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 5, 2]);
  let [n] = guest.nets();
  await meet(n, peer);
  console.log('before: echoed ' + await pingPong(n, peer, 10));
  const old = n;
  console.log('detached ' + await until(() => guest.nets().length === 0) + ', link ' + (old.up ? 'up' : 'down'));
  try { await old.send(new Uint8Array(60)); } catch (err) { console.log('old interface: ' + err.code); }
  await until(() => guest.nets().length === 1);
  [n] = guest.nets();
  await meet(n, peer);
  console.log('after: echoed ' + await pingPong(n, peer, 10));
  const bye = new Uint8Array(60); bye.set(peer, 0); bye.set(n.mac, 6); bye[12] = 0x88; bye[13] = 0xb8;
  await n.send(bye);
  await n.drain();
}
`, `vif = [ 'mac=00:16:3e:00:05:01' ]`);
  const peer = guestImage(dir, 'plugpeer', `
export async function main(guest) {
  const [n] = guest.nets();
  await new Promise((resolve) => {
    n.onFrame((f) => {
      if (f[12] !== 0x88) return;
      if (f[13] === 0xb8) return resolve();
      if (f[13] !== 0xb5 && f[13] !== 0xb6) return;
      const r = f.slice(); r.set(f.subarray(6, 12), 0); r.set(n.mac, 6);
      void n.send(r);
    });
    setTimeout(resolve, 60000);
  });
}
`, `vif = [ 'mac=00:16:3e:00:05:02' ]`);
  const bare = guestImage(dir, 'bare', `export async function main() { await new Promise((r) => setTimeout(r, 3000)); }`, '');
  const consoles = new Map<number, string>();
  const seen = (domid: number, re: RegExp): boolean => re.test(consoles.get(domid) ?? '');
  const waitFor = async (domid: number, re: RegExp): Promise<boolean> => {
    for (let i = 0; i < 600 && !seen(domid, re); i++) await new Promise((r) => setTimeout(r, 50));
    return seen(domid, re);
  };
  const { Machine } = await import('../lib/machine.js');
  const { loadDomainConfig } = await import('../lib/backends/xlcfg.js');
  const m = await Machine.boot({ onConsole: (d, _n, text) => consoles.set(d, (consoles.get(d) ?? '') + text) });
  t.teardown(() => m.stop());
  const g = await m.create(loadDomainConfig(guest));
  const p = await m.create(loadDomainConfig(peer));
  const b = await m.create(loadDomainConfig(bare));
  const baseline = heldByDom0(m, b);
  t.ok(await waitFor(g, /^before: echoed 10$/m), 'traffic before the detach');
  const attached = heldByDom0(m, g);
  t.ok(attached.grants > baseline.grants && attached.ports > baseline.ports && attached.mappings > baseline.mappings, 'the vif holds grants, ports and mappings');
  t.equal((await m.networkDetach(g, 0)).forced, false, 'the guest answered the removal handshake');
  let after = heldByDom0(m, g);
  for (let i = 0; i < 200 && JSON.stringify(after) !== JSON.stringify(baseline); i++) {
    await new Promise((r) => setTimeout(r, 50));
    after = heldByDom0(m, g);
  }
  t.same(after, baseline, 'after the detach the guest holds toward dom0 exactly what a guest without a vif does');
  t.ok(await waitFor(g, /^detached true, link down$/m), 'the guest saw its interface go');
  t.ok(await waitFor(g, /^old interface: ENETDOWN$/m), 'the old interface refuses to send');
  await m.networkAttach(g, { devid: 0, mac: '00:16:3e:00:05:01', bridge: 'xenbr0', mtu: 1500, rate: null, trusted: true, pcap: null, backend: null });
  const exit = await m.waitExit(g, AbortSignal.timeout(60_000));
  t.equal(exit.reason, 'poweroff', exit.console);
  t.match(exit.console, /^after: echoed 10$/m, 'traffic after the reattach');
  await m.waitExit(p, AbortSignal.timeout(60_000));
  await m.waitExit(b, AbortSignal.timeout(60_000));
});

t.test('multi-queue and split event channels when offered, one queue and one channel when not', async (t) => {
  const sender = (flows: number): string => `${helloCode}${udpFrameCode}
export async function main(guest) {
  const [n] = guest.nets();
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 6, 2]);
  await meet(n, peer);
  const fe = n.path;
  const keys = await guest.xenstore.list(fe);
  console.log('queues ' + n.queuesInUse + ', num-queues node ' + keys.includes('multi-queue-num-queues') + ', queue-0 ' + keys.includes('queue-0')
    + ', split ' + (await guest.xenstore.list(n.queuesInUse > 1 ? fe + '/queue-0' : fe)).includes('event-channel-tx'));
  for (let i = 0; i < 400; i++) await n.send(udpFrame(peer, n.mac, Uint8Array.from([10, 0, 0, 1]), Uint8Array.from([10, 0, 0, 2]), 5000 + (i % ${flows}), 7, new Uint8Array(100)));
  await n.drain();
}
`;
  const receiver = `${helloCode}
export async function main(guest) {
  const [n] = guest.nets();
  const queues = new Set();
  let got = 0;
  const done = new Promise((resolve) => n.onFrame((f, info) => { if (f[12] === 0x08) { queues.add(info.queue); if (++got === 400) resolve(); } }));
  await meet(n, Uint8Array.from([0x00, 0x16, 0x3e, 0, 6, 1]));
  await Promise.race([done, new Promise((r) => setTimeout(r, 30000))]);
  console.log('received ' + got + ' on ' + queues.size + ' queue(s) of ' + n.queuesInUse);
}
`;
  const s4 = guestImage(dir, 'mq1', sender(16), `extra = "xen_netfront.max_queues=4"\nvif = [ 'mac=00:16:3e:00:06:01' ]`);
  const r4 = guestImage(dir, 'mq2', receiver, `vcpus = 2\nvif = [ 'mac=00:16:3e:00:06:02' ]`);
  const [a, b] = await runGuests([s4, r4]);
  t.match(a!.console, /^queues 4, num-queues node true, queue-0 true, split true$/m, a!.console);
  t.match(b!.console, /^received 400 on 2 queue\(s\) of 2$/m, 'one queue per vCPU by default; flows spread over both');
  const [c, d] = await runGuests([s4, r4], { netback: { maxQueues: 1 } });
  t.match(c!.console, /^queues 1, num-queues node false, queue-0 false, split true$/m, 'a backend offering one queue gets the flat layout');
  t.match(d!.console, /^received 400 on 1 queue\(s\) of 1$/m);
});

/**
 * Guest 2 counts the frames guest 1 sends it through a limited vif, as many
 * as `extra` says. The sender waits for netback's answers (drain) and
 * reports how long that took, or with "off" after the count powers off as
 * soon as the last frame is on its ring.
 */
const rateImage = `${helloCode}
export async function main(guest) {
  const [n] = guest.nets();
  const [count, mode] = guest.extra.split(' ');
  const frames = Number(count);
  const me = n.mac[5];
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, n.mac[4], me === 1 ? 2 : 1]);
  if (me === 2) {
    let got = 0, first = 0;
    const done = new Promise((resolve) => n.onFrame((f) => {
      if (f[13] !== 0xb5) return;
      if (got++ === 0) first = Date.now();
      if (got === frames) resolve();
    }));
    await meet(n, peer);
    await Promise.race([done, new Promise((r) => setTimeout(r, 60000))]);
    console.log('received ' + got + ' over ' + (Date.now() - first) + ' ms');
    return;
  }
  await meet(n, peer);
  const start = Date.now();
  for (let i = 0; i < frames; i++) { const f = new Uint8Array(1000); f.set(peer, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = 0xb5; await n.send(f); }
  if (mode === 'off') return;
  // netback answers a frame once it passed the credit check: drain() waits for the last.
  await n.drain(30000);
  console.log('sent ' + frames + ' in ' + (Date.now() - start) + ' ms');
  await new Promise((r) => setTimeout(r, 500));
}
`;

t.test('rate: the credit scheduler holds a vif to its bytes per interval', async (t) => {
  // 800Kb/s@50ms: 5,000 bytes of credit every 50 ms.
  const a = guestImage(dir, 'rate1', rateImage, `extra = "250"\nvif = [ 'mac=00:16:3e:00:07:01,rate=800Kb/s@50ms' ]`);
  const b = guestImage(dir, 'rate2', rateImage, `extra = "250"\nvif = [ 'mac=00:16:3e:00:07:02' ]`);
  const [rx, tx] = await runGuests([b, a]);
  t.match(rx!.console, /^received 250 over \d+ ms$/m, rx!.console);
  const m = /^sent 250 in (\d+) ms$/m.exec(tx!.console);
  t.ok(m !== null, tx!.console);
  // Credit left unspent adds up, as in Linux's tx_add_credit, to at most 131,072 bytes: the hellos
  // sent while the peer boots (60 bytes every 20 ms) add 5,000 each interval and spend little. So
  // 131,072 of the 250,000 bytes may pass at once, the other 118,928 need 24 more refills at least
  // 50 ms apart: 1,200 ms at least, however long the peer took (unlimited it takes a few ms).
  // Less 10 ms for the rounding of the two clocks (dom0 times the credit, the guest the send).
  t.ok(Number(m![1]) >= 1190, `the limit spread the frames over ${m![1]} ms`);
});

t.test('a guest that powers off right after sending: the kernel lets netback answer its TX ring first, so the frames still go', async (t) => {
  // The sender's limit keeps its frames on the ring for up to a second; it returns as soon as the last is on it.
  const a = guestImage(dir, 'off1', rateImage, `extra = "100 off"\nvif = [ 'mac=00:16:3e:00:08:01,rate=800Kb/s@50ms' ]`);
  const b = guestImage(dir, 'off2', rateImage, `extra = "100"\nvif = [ 'mac=00:16:3e:00:08:02' ]`);
  const [rx, tx] = await runGuests([b, a]);
  t.equal(tx!.reason, 'poweroff', tx!.console);
  t.match(rx!.console, /^received 100 over \d+ ms$/m, 'every frame reached the peer');
});

t.test('multicast control: netback passes a group only to a frontend that joined it', async (t) => {
  const image = `${helloCode}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function main(guest) {
  const [n] = guest.nets();
  const me = n.mac[5];
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 0x0a, me === 1 ? 2 : 1]);
  const group = Uint8Array.from([0x01, 0x00, 0x5e, 0x00, 0x00, 0x42]);
  const rounds = [];
  let got = 0;
  n.onFrame((f) => { if (f[12] === 0x88 && f[13] === 0xb9) got++; if (f[12] === 0x88 && f[13] === 0xba) rounds.push(f[14]); });
  await meet(n, peer);
  const say = (type, v) => { const f = new Uint8Array(60); f.set(type === 0xb9 ? group : peer, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = type; f[14] = v; return n.send(f); };
  if (me === 1) {
    // Three rounds of 10 frames to the group; the receiver says when it is ready for each.
    for (let r = 0; r < 3; r++) {
      while (!rounds.includes(r)) await sleep(10);
      for (let i = 0; i < 10; i++) await say(0xb9, i);
      await say(0xba, 10 + r);
    }
    await n.drain();
    return;
  }
  console.log('multicast control ' + n.features.multicastControl);
  const counts = [];
  for (const step of ['before', 'joined', 'left']) {
    if (step === 'joined') await n.joinMulticast('01:00:5e:00:00:42');
    if (step === 'left') await n.leaveMulticast(group);
    const r = counts.length;
    got = 0;
    await say(0xba, r);
    while (!rounds.includes(10 + r)) await sleep(10);
    await sleep(100);
    counts.push(step + ' ' + got);
  }
  console.log(counts.join(', '));
  try { await n.joinMulticast('00:16:3e:00:00:01'); } catch (err) { console.log('unicast join: ' + err.code); }
}
`;
  const a = guestImage(dir, 'mc1', image, `vif = [ 'mac=00:16:3e:00:0a:01' ]`);
  const b = guestImage(dir, 'mc2', image, `vif = [ 'mac=00:16:3e:00:0a:02' ]`);
  const [, rx] = await runGuests([a, b]);
  t.equal(rx!.reason, 'poweroff', rx!.console);
  t.match(rx!.console, /^multicast control true$/m);
  t.match(rx!.console, /^before 0, joined 10, left 0$/m, 'filtered until joined, and again after leaving');
  t.match(rx!.console, /^unicast join: EINVAL$/m);
});


t.test('xenpv network-attach, network-list and network-detach against a host daemon', async (t) => {
  const root = fileURLToPath(new URL('../..', import.meta.url));
  const cli = join(root, 'dist/lib/cli/main.js');
  const rundir = join(dir, 'run');
  const xenpv = (args: string[]): { status: number | null; stdout: string; stderr: string } =>
    spawnSync(process.execPath, [cli, ...args, '--rundir', rundir], { encoding: 'utf8', timeout: 60_000 });
  t.equal(xenpv(['host', 'start']).status, 0);
  t.teardown(() => void xenpv(['host', 'stop']));
  const cfg = guestImage(dir, 'plugcli', `
export async function main(guest) {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  await sleep(60000); // the host goes first
}
`, '');
  t.equal(xenpv(['create', cfg]).status, 0);
  const attach = xenpv(['network-attach', 'plugcli', 'mac=00:16:3e:00:0c:01,bridge=xenbr1']);
  t.equal(attach.status, 0, attach.stderr);
  t.match(attach.stdout, /^plugcli: vif 0 00:16:3e:00:0c:01$/m);
  let rows: { devices: { devid: number; frontendState: number; backendState: number; backend: Record<string, string> }[] }[] = [];
  for (let i = 0; i < 200; i++) {
    rows = JSON.parse(xenpv(['network-list', 'plugcli', '--json']).stdout) as typeof rows;
    if (rows[0]?.devices[0]?.frontendState === 4 && rows[0].devices[0].backendState === 4) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  t.equal(rows[0]!.devices[0]!.backend['bridge'], 'xenbr1');
  t.equal(rows[0]!.devices[0]!.frontendState, 4, 'both ends Connected');
  t.match(xenpv(['network-list', 'plugcli']).stdout, /^plugcli +0 +0 +00:16:3e:00:0c:01 xenbr1 +4 +4 /m);
  const detach = xenpv(['network-detach', 'plugcli', '0']);
  t.equal(detach.status, 0, detach.stderr);
  t.equal(detach.stderr, '', 'the guest answered the removal handshake');
  t.same((JSON.parse(xenpv(['network-list', 'plugcli', '--json']).stdout) as typeof rows)[0]!.devices, [], 'no vif left');
  t.equal(xenpv(['network-detach', 'plugcli', '0']).status, 1, 'a vif that is not there is refused');
  t.equal(xenpv(['network-attach', 'plugcli', 'colour=red']).status, 1, 'a bad spec is refused');
});
