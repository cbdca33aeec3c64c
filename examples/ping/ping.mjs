// Two of these on one bridge ping each other and exchange UDP, then power
// off together. The interface is the guest's first vif (guest.nets()); the
// IP layer (xenpv/ip) sits on it and takes its address from `extra`
// ("ip=10.0.0.2/24 peer=10.0.0.3"). Each serves UDP echo on port 7 and
// waits on port 9 for the peer's word that it is done too.

import { IpInterface } from 'xenpv/ip';

const TRIES = 100;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Ask until answered: the peer may still be booting. */
async function retry(what, fn) {
  for (let i = 1; ; i++) {
    try {
      return await fn();
    } catch (err) {
      if (i === TRIES) throw new Error(`${what}: ${err.message}`);
      await sleep(100);
    }
  }
}

export async function main(guest) {
  const [net] = guest.nets();
  if (net === undefined) throw new Error('no network interface');
  const peer = /(?:^|\s)peer=(\S+)/.exec(guest.extra)?.[1];
  if (peer === undefined) throw new Error('extra has no peer=');
  const ip = new IpInterface(net, { name: net.name });
  await ip.configure(guest.extra);
  console.log(`${net.name} ${net.macText} mtu ${net.mtu}: ${ip.address}/${ip.prefixLength}`);

  const echo = ip.bind(7);
  echo.onMessage(({ address, port, data }) => void echo.send(address, port, data));
  const done = ip.bind(9);
  let peerDone = false;
  // "done?" says a guest is done and asks; "done!" answers. A guest answers
  // only once it is done itself (so the peer does not power off while this
  // one still needs its echoes), and never answers an answer (so the two
  // sockets do not keep replying to each other).
  let selfDone = false;
  done.onMessage(({ address, port, data }) => {
    peerDone = true;
    if (selfDone && new TextDecoder().decode(data) === 'done?') void done.send(address, port, new TextEncoder().encode('done!'));
  });

  for (let seq = 0; seq < 3; seq++) {
    const rtt = await retry(`ping ${peer}`, () => ip.ping(peer, { timeoutMs: 500 }));
    console.log(`ping ${peer}: reply ${seq} in ${rtt.toFixed(2)} ms`);
  }
  const udp = ip.bind(0);
  const text = `hello from ${guest.name}`;
  const reply = await retry(`udp ${peer}:7`, async () => {
    await udp.send(peer, 7, new TextEncoder().encode(text));
    return udp.receive({ timeoutMs: 500 });
  });
  console.log(`udp ${peer}:7 echoed "${new TextDecoder().decode(reply.data)}"`);

  // Stay up until the peer has its replies as well.
  selfDone = true;
  // Say it at least once: the peer may have been done and waiting all along.
  await retry(`peer ${peer} done`, async () => {
    await done.send(peer, 9, new TextEncoder().encode('done?'));
    if (peerDone) return;
    await sleep(100);
    if (!peerDone) throw new Error('not yet');
  });
  await net.drain(); // the peer's last answer may still be on the ring
  console.log('done');
  ip.close();
}
