// dom0's bridge seen from outside: a capture read back by tshark, and a UDP
// uplink that a socket of the test joins, exchanging raw Ethernet frames
// with a guest.

import t from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createSocket, type Socket } from 'node:dgram';
import { join } from 'node:path';
import { csumAdd, csumFold } from '../lib/ether.js';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { Machine } from '../lib/machine.js';
import { pathToFileURL } from 'node:url';
import { guestImage, helloCode, root, runGuests, tempDir, udpFrameCode } from './net-fixtures.js';
import { netnsSkip, run } from './fixtures/netns.js';

const dir = tempDir('xenpv-bridge-');
const tshark = spawnSync('tshark', ['--version'], { encoding: 'utf8' });

t.test('a bridge and a vif captured to pcap files that tshark reads back field by field', { skip: tshark.status === 0 ? false : 'tshark is not installed (Debian package tshark)' }, async (t) => {
  const body = `${helloCode}${udpFrameCode}
export async function main(guest) {
  const [n] = guest.nets();
  const me = n.mac[5], other = me === 1 ? 2 : 1;
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0, 3, other]);
  const ip = (x) => Uint8Array.from([10, 0, 0, x]);
  let got = 0;
  const done = new Promise((resolve) => n.onFrame((f) => {
    if (f[12] !== 0x08 || f[23] !== 17) return;
    got++;
    if (me === 2) void n.send(udpFrame(peer, n.mac, ip(me), ip(other), (f[36] << 8) | f[37], (f[34] << 8) | f[35], f.subarray(42)));
    if (got === 5) resolve();
  }));
  await meet(n, peer);
  if (me === 1) for (let i = 0; i < 5; i++) await n.send(udpFrame(peer, n.mac, ip(me), ip(other), 1000 + i, 2000 + i, new Uint8Array(10 + i * 100).fill(i)));
  await Promise.race([done, new Promise((r) => setTimeout(r, 20000))]);
  await n.drain();
  console.log('udp frames ' + got);
}
`;
  const bridgePcap = join(dir, 'xenbr0.pcap');
  const vifPcap = join(dir, 'vif.pcap');
  const a = guestImage(dir, 'cap1', body, `vif = [ 'mac=00:16:3e:00:03:01,pcap=vif.pcap' ]`);
  const b = guestImage(dir, 'cap2', body, `vif = [ 'mac=00:16:3e:00:03:02' ]`);
  const exits = await runGuests([a, b], { bridges: { xenbr0: { pcap: bridgePcap } } });
  for (const e of exits) t.match(e.console, /^udp frames 5$/m, e.console);
  const fields = ['eth.src', 'eth.dst', 'ip.src', 'ip.dst', 'udp.srcport', 'udp.dstport', 'udp.length', 'frame.len'];
  const read = (file: string): string[][] => {
    const r = spawnSync('tshark', ['-r', file, '-Y', 'udp', '-T', 'fields', ...fields.flatMap((f) => ['-e', f])], { encoding: 'utf8' });
    t.equal(r.status, 0, r.stderr);
    return r.stdout.trim().split('\n').map((l) => l.split('\t'));
  };
  const want: string[][] = [];
  for (let i = 0; i < 5; i++) {
    const len = 10 + i * 100;
    want.push(['00:16:3e:00:03:01', '00:16:3e:00:03:02', '10.0.0.1', '10.0.0.2', `${1000 + i}`, `${2000 + i}`, `${8 + len}`, `${42 + len}`]);
    want.push(['00:16:3e:00:03:02', '00:16:3e:00:03:01', '10.0.0.2', '10.0.0.1', `${2000 + i}`, `${1000 + i}`, `${8 + len}`, `${42 + len}`]);
  }
  const sorted = (rows: string[][]): string[] => rows.map((r) => r.join(' ')).sort();
  t.same(sorted(read(bridgePcap)), sorted(want), 'the bridge saw every UDP frame, both ways, field for field');
  t.same(sorted(read(vifPcap)), sorted(want), 'the vif saw its own frames, both ways');
});

/** A port no one listens on now (the OS picks it). */
async function freePort(): Promise<number> {
  const s = createSocket('udp4');
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', r));
  const port = s.address().port;
  await new Promise<void>((r) => s.close(r));
  return port;
}

t.test('a UDP uplink: raw Ethernet frames in datagrams to and from a guest', async (t) => {
  const sock: Socket = createSocket('udp4');
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', r));
  t.teardown(() => sock.close());
  const mine = sock.address().port;
  const theirs = await freePort();
  const received: Buffer[] = [];
  sock.on('message', (m) => received.push(m));
  const guest = guestImage(dir, 'uplinked', `${udpFrameCode}
export async function main(guest) {
  const [n] = guest.nets();
  let echoed = 0;
  const done = new Promise((resolve) => n.onFrame((f) => {
    if (f[12] !== 0x88 || f[13] !== 0xb5) return;
    if (f[14] === 0xff) return resolve();
    const r = f.slice(); r.set(f.subarray(6, 12), 0); r.set(n.mac, 6);
    void n.send(r).then(() => echoed++);
  }));
  // A UDP frame with the checksum left to dom0: it leaves through the uplink completed.
  const out = udpFrame(Uint8Array.from([2, 0, 0, 0, 0, 0x99]), n.mac, Uint8Array.from([10, 0, 0, 5]), Uint8Array.from([10, 0, 0, 9]), 7, 9, new Uint8Array(33).fill(7));
  const hello = setInterval(() => void n.send(out, { checksumOffload: true }), 50);
  // A TCP frame of 10,000 payload bytes handed over whole (GSO): it leaves the uplink as segments.
  const tcp = new Uint8Array(54 + 10000);
  tcp.set(out.subarray(0, 14)); tcp[14] = 0x45; tcp[16] = (tcp.length - 14) >> 8; tcp[17] = (tcp.length - 14) & 255; tcp[22] = 64; tcp[23] = 6;
  tcp.set(out.subarray(26, 34), 26); tcp[46] = 0x50; tcp[47] = 0x18;
  for (let i = 54; i < tcp.length; i++) tcp[i] = i & 0xff;
  let s = 0; for (let i = 14; i < 34; i += 2) s += (tcp[i] << 8) | tcp[i + 1]; while (s > 0xffff) s = (s & 0xffff) + (s >>> 16); s = ~s & 0xffff; tcp[24] = s >> 8; tcp[25] = s & 255;
  await n.send(tcp, { checksumOffload: true, gso: { type: 'tcpv4', mss: 1000 } });
  await Promise.race([done, new Promise((r) => setTimeout(r, 30000))]);
  clearInterval(hello);
  await n.drain();
  console.log('echoed ' + echoed);
}
`, `vif = [ 'mac=00:16:3e:00:04:01' ]`);
  const remote = { addr: '127.0.0.1', port: theirs };
  const exits = await runGuests([guest], { uplinks: { xenbr0: `udp:${theirs}:127.0.0.1:${mine}` } }, async () => {
    // The guest's own frame through the uplink says it is up.
    for (let i = 0; i < 600 && received.length === 0; i++) await new Promise((r) => setTimeout(r, 50));
    for (let i = 0; i < 20; i++) {
      const f = Buffer.alloc(60 + i * 50);
      f.set([0x00, 0x16, 0x3e, 0, 4, 1], 0);
      f.set([0x02, 0, 0, 0, 0, 0x99], 6);
      f[12] = 0x88; f[13] = 0xb5; f[14] = i;
      sock.send(f, remote.port, remote.addr);
      await new Promise((r) => setTimeout(r, 5));
    }
    for (let i = 0; i < 200 && received.filter((m) => m[13] === 0xb5).length < 20; i++) await new Promise((r) => setTimeout(r, 50));
    const stop = Buffer.alloc(60);
    stop.set([0x00, 0x16, 0x3e, 0, 4, 1], 0);
    stop[12] = 0x88; stop[13] = 0xb5; stop[14] = 0xff;
    sock.send(stop, remote.port, remote.addr);
  });
  t.equal(exits[0]!.reason, 'poweroff', exits[0]!.console);
  t.match(exits[0]!.console, /^echoed 20$/m);
  const echoes = received.filter((m) => m[12] === 0x88 && m[13] === 0xb5);
  t.same(echoes.map((m) => m[14]).sort((a, b) => a! - b!), Array.from({ length: 20 }, (_, i) => i), 'every frame came back once');
  t.ok(echoes.every((m) => m.length === 60 + m[14]! * 50 && m.subarray(0, 6).equals(Buffer.from([2, 0, 0, 0, 0, 0x99]))), 'whole, to our address');
  const udp = received.find((m) => m[12] === 0x08 && m[23] === 17);
  t.ok(udp !== undefined, 'the guest\'s UDP frame arrived');
  const l4 = udp!.subarray(34);
  const sum = csumFold(csumAdd(udp!, 34, l4.length, csumAdd(udp!, 26, 8) + 17 + l4.length));
  t.not(udp![40]! | udp![41]!, 0, 'the UDP checksum was filled in');
  t.equal(sum, 0, 'and it verifies');
  const segs = received.filter((m) => m[12] === 0x08 && m[23] === 6);
  t.equal(segs.length, 10, 'the GSO frame left as ten segments');
  let payload = Buffer.alloc(0);
  for (const seg of segs) {
    const l4len = seg.length - 34;
    t.equal(csumFold(csumAdd(seg, 34, l4len, csumAdd(seg, 26, 8) + 6 + l4len)), 0, 'each with a good TCP checksum');
    t.equal(seg.readUInt32BE(38), payload.length, 'and its sequence number');
    payload = Buffer.concat([payload, seg.subarray(54)]);
  }
  t.ok(payload.length === 10000 && payload.every((b, i) => b === ((i + 54) & 0xff)), 'the payload whole, in order');
});

t.test('examples/ping: two guests ping each other and exchange UDP through the CLI, captured on the way', async (t) => {
  const pcap = join(dir, 'ping.pcap');
  const cli = join(root, 'dist/lib/cli/main.js');
  const r = spawnSync(process.execPath, [cli, 'run', join(root, 'examples/ping/ping-a.cfg'), join(root, 'examples/ping/ping-b.cfg'), '--pcap', `xenbr0=${pcap}`],
    { encoding: 'utf8', timeout: 120_000 });
  t.equal(r.status, 0, r.stdout + r.stderr);
  for (const [name, peer] of [['ping-a', '10.0.0.3'], ['ping-b', '10.0.0.2']] as const) {
    t.match(r.stdout, new RegExp(`^${name}: ping ${peer.replace(/\./g, '\\.')}: reply 2 in [\\d.]+ ms$`, 'm'), `${name} got its replies`);
    t.match(r.stdout, new RegExp(`^${name}: udp ${peer.replace(/\./g, '\\.')}:7 echoed "hello from ${name}"$`, 'm'));
  }
  if (tshark.status !== 0) return;
  const icmp = spawnSync('tshark', ['-r', pcap, '-Y', 'icmp.type == 0', '-T', 'fields', '-e', 'ip.src'], { encoding: 'utf8' });
  t.same([...new Set(icmp.stdout.trim().split('\n'))].sort(), ['10.0.0.2', '10.0.0.3'], 'echo replies both ways on the bridge');
});

t.test('a DHCP server on the bridge gives a guest its address (ip=dhcp)', async (t) => {
  const guest = guestImage(dir, 'dhcpc', `
import { IpInterface } from '${pathToFileURL(join(root, 'dist/lib/guest/ip.js')).href}';
export async function main(guest) {
  const [n] = guest.nets();
  const ip = new IpInterface(n, { name: n.name });
  await ip.configure(guest.extra, { timeoutMs: 30000 });
  console.log('address ' + ip.address + '/' + ip.prefixLength);
  console.log('server answers ping: ' + ((await ip.ping('10.0.0.1', { timeoutMs: 2000 })) >= 0));
  ip.close();
}
`, `extra = "ip=dhcp"\nvif = [ 'mac=00:16:3e:00:08:01' ]`);
  const [e] = await runGuests([guest], { bridges: { xenbr0: { dhcp: { range: '10.0.0.100-10.0.0.199' } } } });
  t.equal(e!.reason, 'poweroff', e!.console);
  t.match(e!.console, /^address 10\.0\.0\.1\d\d\/24$/m);
  t.match(e!.console, /^server answers ping: true$/m);
});

t.test('Linux in a network namespace, its TAP device bridged by socat to the UDP uplink, pings examples/netecho and gets its UDP echo', { skip: netnsSkip() }, async (t) => {
  const tag = `${process.pid % 100000}`;
  const ns = `xenpv-net-${tag}`;
  const tap = `xpnet${tag}`;
  const uplinkPort = await freePort();
  const socatPort = await freePort();
  const cfg = join(dir, 'netecho.cfg');
  writeFileSync(cfg, `name = "netecho"\nmemory = 32\nkernel = "${join(root, 'examples/netecho/netecho.mjs')}"\n`
    + `extra = "ip=10.232.0.2/24"\nvif = [ 'mac=00:16:3e:00:09:02' ]\n`);
  let socat: ChildProcess | null = null;
  const lines: string[] = [];
  const m = await Machine.boot({ uplinks: { xenbr0: `udp:${uplinkPort}:127.0.0.1:${socatPort}` }, onConsole: (_d, _n, text) => lines.push(text) });
  t.teardown(async () => {
    socat?.kill();
    await run(['ip', 'netns', 'del', ns]);
    await m.stop();
  });
  t.equal((await run(['ip', 'netns', 'add', ns])).status, 0);
  socat = spawn('socat', [`TUN,tun-type=tap,iff-no-pi,tun-name=${tap}`, `UDP:127.0.0.1:${uplinkPort},bind=127.0.0.1:${socatPort}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  let socatErr = '';
  socat.stderr!.on('data', (d) => (socatErr += d));
  for (let i = 0; i < 50 && (await run(['ip', 'link', 'show', tap])).status !== 0; i++) await new Promise((r) => setTimeout(r, 50));
  const inNs = (args: string[], input?: string): ReturnType<typeof run> => run(['ip', 'netns', 'exec', ns, ...args], input);
  const moved = await run(['ip', 'link', 'set', tap, 'netns', ns]);
  t.equal(moved.status, 0, moved.stderr + socatErr);
  for (const cmd of [['ip', 'link', 'set', 'lo', 'up'], ['ip', 'addr', 'add', '10.232.0.1/24', 'dev', tap], ['ip', 'link', 'set', tap, 'up']]) {
    const r = await inNs(cmd);
    t.equal(r.status, 0, `${cmd.join(' ')}: ${r.stderr}`);
  }
  const domid = await m.create(loadDomainConfig(cfg));
  for (let i = 0; i < 200 && !lines.join('').includes('echoing UDP port 7'); i++) await new Promise((r) => setTimeout(r, 50));
  const ping = await inNs(['ping', '-c', '3', '-i', '0.2', '-W', '2', '10.232.0.2']);
  t.equal(ping.status, 0, ping.stdout + ping.stderr);
  t.match(ping.stdout, /3 packets transmitted, 3 received/);
  const big = await inNs(['ping', '-c', '1', '-s', '1472', '-M', 'do', '-W', '2', '10.232.0.2']);
  t.equal(big.status, 0, `a 1500-byte ping: ${big.stdout}${big.stderr}`);
  const udp = await inNs(['socat', '-t', '2', '-', 'UDP:10.232.0.2:7'], 'echo me');
  t.equal(udp.status, 0, udp.stderr);
  t.equal(udp.stdout, 'echo me');
  const neigh = await inNs(['ip', 'neigh', 'show', '10.232.0.2']);
  t.match(neigh.stdout, /lladdr 00:16:3e:00:09:02/, 'Linux learnt the guest\'s MAC by ARP');
  await m.requestShutdown(domid);
  const exit = await m.waitExit(domid, AbortSignal.timeout(30_000));
  t.equal(exit.reason, 'poweroff');
  t.match(exit.console, /^echoed 1 datagrams, answered [4-9]\d* pings$/m);
});

t.test('the network benchmark (bench/net.ts) measures frames reaching a guest and a dom0 sink', async (t) => {
  const { NET_METRICS, netBench } = await import('../bench/net.js');
  const r = await netBench(1, 100, 100);
  t.ok(r !== null);
  for (const name of NET_METRICS) {
    t.equal(r![name].length, 1, name);
    t.ok(r![name][0]! > 0, `${name}: frames arrived`);
  }
});
