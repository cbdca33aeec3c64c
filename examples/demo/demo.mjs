// The guest of `npm start` (examples/demo). Each of the two guests takes an
// address over DHCP from dom0's server on xenbr0, finds its peer by a UDP
// broadcast, pings it, has UDP datagrams echoed and checked, and meanwhile
// fills its disk with a pattern, flushes, reads it back and verifies it;
// then the two wait for each other and power off. Anything that fails
// throws, which crashes the guest: `xenpv run` then exits non-zero.
//
// extra: "ip=dhcp peer=<the other guest's name>"

import { IpInterface, ipv4Format } from 'xenpv/ip';

const HELLO_PORT = 4000;
const ECHO_PORT = 7;
const DONE_PORT = 9;
const PINGS = 3;
const DATAGRAMS = 20;
const RETRY_MS = 20_000;
const CHUNK_SECTORS = 256;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const enc = (s) => new TextEncoder().encode(s);
const dec = (b) => new TextDecoder().decode(b);

/** Ask until answered, for up to 20 s: the peer may still be booting. */
async function retry(what, fn) {
  const deadline = Date.now() + RETRY_MS;
  for (;;) {
    try {
      return await fn();
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`${what}: ${err.message}`);
      await sleep(100);
    }
  }
}

/**
 * The peer's address: each guest broadcasts "hello <name>" on port 4000 and
 * answers each hello it hears with its own, unicast, so the guest that
 * booted first is found too.
 */
async function findPeer(ip, me, peerName) {
  const sock = ip.bind(HELLO_PORT);
  let found = null;
  sock.onMessage(({ address, data }) => {
    const [word, name] = dec(data).split(' ');
    if (name !== peerName) return;
    found = address;
    if (word === 'hello') void sock.send(address, HELLO_PORT, enc(`here ${me}`)).catch(() => {});
  });
  return retry(`find ${peerName}`, async () => {
    if (found === null) await sock.send('255.255.255.255', HELLO_PORT, enc(`hello ${me}`));
    await sleep(found === null ? 100 : 0);
    if (found === null) throw new Error('no answer to the broadcast');
    return found;
  });
}

/** Ping the peer, then send it datagrams of 1..1400 bytes and check each echo. */
async function talk(guest, ip, peer) {
  for (let seq = 0; seq < PINGS; seq++) {
    const rtt = await retry(`ping ${peer}`, () => ip.ping(peer, { timeoutMs: 500 }));
    guest.print(`ping ${peer}: reply ${seq} in ${rtt.toFixed(2)} ms`);
  }
  const udp = ip.bind(0);
  let bytes = 0;
  for (let i = 0; i < DATAGRAMS; i++) {
    const size = 1 + Math.floor((i * 1399) / (DATAGRAMS - 1));
    const data = new Uint8Array(size).map((_, j) => (i * 31 + j) & 0xff);
    const reply = await retry(`udp ${peer}:${ECHO_PORT}`, async () => {
      await udp.send(peer, ECHO_PORT, data);
      return udp.receive({ timeoutMs: 500 });
    });
    if (reply.data.length !== size || reply.data.some((b, j) => b !== data[j])) throw new Error(`udp datagram ${i}: the echo differs`);
    bytes += size;
  }
  udp.close();
  guest.print(`udp ${peer}:${ECHO_PORT}: ${DATAGRAMS} datagrams (${bytes} bytes) echoed intact`);
}

/** Sector n of guest `seed`'s disk holds the byte (n + seed) mod 251. */
function fill(buf, firstSector, seed) {
  for (let s = 0; s < buf.length / 512; s++) buf.fill((firstSector + s + seed) % 251, s * 512, (s + 1) * 512);
}

async function exerciseDisk(guest, disk) {
  const seed = guest.domid;
  const buf = new Uint8Array(CHUNK_SECTORS * 512);
  for (let lba = 0; lba < disk.sectors; lba += CHUNK_SECTORS) {
    const part = buf.subarray(0, Math.min(CHUNK_SECTORS, disk.sectors - lba) * 512);
    fill(part, lba, seed);
    await disk.write(lba, part);
  }
  await disk.flush();
  for (let lba = 0; lba < disk.sectors; lba += CHUNK_SECTORS) {
    const n = Math.min(CHUNK_SECTORS, disk.sectors - lba);
    const got = await disk.read(lba, n);
    const want = buf.subarray(0, n * 512);
    fill(want, lba, seed);
    const at = got.findIndex((b, i) => b !== want[i]);
    if (at >= 0) throw new Error(`disk: sector ${lba + Math.floor(at / 512)} holds ${got[at]}, want ${want[at]}`);
  }
  guest.print(`disk ${disk.path}: wrote, flushed and verified ${disk.sectors} sectors`);
}

/**
 * Port 9 carries the word that a guest is done: "done?" says so and asks,
 * "done!" answers. A guest answers only once it is done itself, so neither
 * powers off while the other still needs it, and never answers an answer, so
 * the two cannot keep replying to each other. Returns finish(peer): resolves
 * once both are done.
 */
function serveDone(ip) {
  const sock = ip.bind(DONE_PORT);
  let done = false;
  let peerDone = false;
  sock.onMessage(({ address, port, data }) => {
    peerDone = true;
    if (done && dec(data) === 'done?') void sock.send(address, port, enc('done!')).catch(() => {});
  });
  return (peer) => {
    done = true;
    // Say it at least once: the peer may have been done and waiting all along.
    return retry(`peer ${peer} done`, async () => {
      await sock.send(peer, DONE_PORT, enc('done?'));
      if (peerDone) return;
      await sleep(100);
      if (!peerDone) throw new Error('not yet');
    });
  };
}

export async function main(guest) {
  try {
    const [net] = guest.nets();
    const [disk] = guest.disks();
    if (net === undefined) throw new Error('no network interface');
    if (disk === undefined) throw new Error('no disk');
    const peerName = /(?:^|\s)peer=(\S+)/.exec(guest.extra)?.[1];
    if (peerName === undefined) throw new Error('extra has no peer=');

    const ip = new IpInterface(net, { name: net.name });
    // Serve echo and the end-of-run word from the start: the peer may be quicker.
    const echo = ip.bind(ECHO_PORT);
    echo.onMessage(({ address, port, data }) => void echo.send(address, port, data).catch(() => {}));
    const meetAtTheEnd = serveDone(ip);
    await ip.configure(guest.extra, { timeoutMs: 20_000, retransmitMs: 1000 });
    const lease = ip.dhcp?.lease;
    guest.print(`${net.name} ${net.macText}: ${ip.address}/${ip.prefixLength}${lease ? ` (DHCP from ${ipv4Format(lease.serverId)})` : ''}`);

    const diskWork = exerciseDisk(guest, disk);
    const peer = await findPeer(ip, guest.name, peerName);
    guest.print(`peer ${peerName} is ${peer}`);
    await talk(guest, ip, peer);
    await diskWork;
    await meetAtTheEnd(peer);
    await net.drain(); // the peer's last answer may still be on the ring
    ip.close();
    guest.print('done');
  } catch (err) {
    guest.print(`FAILED: ${err.message}`);
    throw err;
  }
}
