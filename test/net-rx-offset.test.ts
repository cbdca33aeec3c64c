// Where netback puts a received frame in the frontend's page. A frame of at
// most HEADER_BYTES is copied into dom0's header buffers on its way, at a
// different offset for each frame; it must still land at the start of the
// receiver's page, as Linux's netback puts it (rsp->offset 0), so that xnf's
// view of each buffer stays the same from frame to frame. One thread (the
// fuzz World pumps dom0 and both guests).

import t from 'tap';
import { HEADER_BYTES } from '../lib/backends/bridge.js';
import type { NicSpec } from '../lib/backends/toolstack.js';
import { xnfInterfaces } from '../lib/drivers/xnf/xnf.js';
import { __CONST_RING_SIZE, netif_rx_sring } from '../lib/abi/ring.js';
import { PAGE_SIZE } from '../lib/hypervisor/page.js';
import { World } from '../lib/fuzz/world.js';

const NEVER_MS = 1e9;
/** xnf's receive buffers: one per slot of the RX ring. */
const XNF_RX_DESC = __CONST_RING_SIZE(netif_rx_sring, PAGE_SIZE);

function nic(mac: string): NicSpec {
  return { devid: 0, mac, bridge: 'xenbr0', mtu: 1500, rate: null, trusted: true, pcap: null, backend: null };
}

t.test('frames of one slot land at offset 0 of the receiver\'s page, each buffer seen through one view', async (t) => {
  const netback = { drainTimeoutMs: NEVER_MS, stallTimeoutMs: NEVER_MS, holdMs: NEVER_MS, maxQueues: 1 };
  const world = new World({ net: { netback, ageingMs: NEVER_MS }, dom0MemoryMiB: 24 });
  const tx = xnfInterfaces(await world.createGuest({ name: 'sender', vifs: [nic('00:16:3e:00:09:01')] }))[0]!;
  const rx = xnfInterfaces(await world.createGuest({ name: 'receiver', vifs: [nic('00:16:3e:00:09:02')] }))[0]!;
  const offsets = new Map<number, number>();
  const views = new Set<Uint8Array>();
  let intact = 0;
  rx.input = (f) => {
    const at = f.byteOffset % PAGE_SIZE;
    offsets.set(at, (offsets.get(at) ?? 0) + 1);
    if (f.length === 64) views.add(f);
    if (f[12] === 0x88 && f[13] === 0xb5 && f[14] === (f.length & 0xff) && f[f.length - 1] === 0x5a) intact++;
  };
  // Three times round the receiver's ring: small frames through dom0's header buffers, then larger ones straight from the sender's pages.
  const sizes = [...Array<number>(3 * XNF_RX_DESC).fill(64), ...Array<number>(XNF_RX_DESC).fill(HEADER_BYTES), 60, 1000, 1514];
  const sent = sizes.map((size) => {
    const f = new Uint8Array(size);
    f.set(rx.mac, 0);
    f.set(tx.mac, 6);
    f[12] = 0x88;
    f[13] = 0xb5;
    f[14] = size & 0xff;
    f[size - 1] = 0x5a;
    return tx.send(f);
  });
  await world.run(Promise.all(sent), 'sends');
  await world.settle();
  t.equal(intact, sizes.length, 'every frame arrived whole');
  t.same([...offsets], [[0, sizes.length]], 'every frame at offset 0 of its page');
  t.ok(views.size <= XNF_RX_DESC, `${views.size} views for ${3 * XNF_RX_DESC} 64-byte frames: at most one per receive buffer`);
});
