// Event channels across real worker threads: two guest kernels ping-pong
// over an interdomain port; every event must arrive or the exchange stalls.

import t from 'tap';
import { Host } from '../lib/hypervisor/host.js';

const kernel = new URL('./fixtures/evtchn-kernel.js', import.meta.url).href;

t.test('10,000 events between two domains in two threads, none lost', async (t) => {
  const rounds = 10_000;
  let pingId = -1;
  let pongId = -1;
  const done = new Promise<{ echoes: number; handled: number }>((resolve) => {
    const host = new Host({
      onMessage: (domid, m) => {
        const msg = m as { port?: number; echoes?: number; handled?: number };
        if (domid === pongId && msg.port !== undefined) host.post(pingId, { port: msg.port });
        if (domid === pingId && msg.echoes !== undefined) resolve({ echoes: msg.echoes, handled: msg.handled ?? 0 });
      },
    });
    const ping = host.createDomain({ name: 'ping', memoryMiB: 1 });
    const pong = host.createDomain({ name: 'pong', memoryMiB: 1 });
    pingId = ping.domid;
    pongId = pong.domid;
    host.start(pong.domid, kernel, { role: 'pong', peer: ping.domid, rounds });
    host.start(ping.domid, kernel, { role: 'ping', peer: pong.domid, rounds });
    t.teardown(() => host.shutdown());
  });
  const r = await done;
  t.equal(r.echoes, rounds, 'every event was echoed');
  t.equal(r.handled, rounds + 1, 'the handler ran once per event, plus the bind');
});
