// A frame of XEN_NETIF_NR_SLOTS_MIN slots with a GSO extra, from a frontend
// that lays out its own requests, reaches a guest whose xnf asked for SG and
// GSO: netback hands it over slot for slot, 18 data slots and the extra's
// slot, and xnf takes it whole (the extra's slot is not a data slot, as in
// Linux netfront) instead of breaking its interface.

import t from 'tap';
import { guestImage, helloCode, lib, rawFrontCode, runGuests, tempDir } from './net-fixtures.js';

const dir = tempDir('xenpv-net-rx-slots-');

t.test('18 data slots and a GSO extra on RX: xnf hands the frame up and stays up', async (t) => {
  const sender = guestImage(dir, 'sender', `${helloCode}${rawFrontCode}
import { xnfInterfaces } from '${lib('drivers/xnf/xnf.js')}';
const NETTXF_more_data = 4, NETTXF_extra_info = 8;
export async function main(guest) {
  const [n] = guest.nets();
  await meet(n, Uint8Array.from([0x00, 0x16, 0x3e, 0, 2, 2]));
  const q = xnfInterfaces(guest.sc)[0].queues[0];
  const slots = 18, each = 100;
  for (let i = 0; i < slots; i++) {
    const page = q.txBufs[i].page;
    for (let j = 0; j < each; j++) page[j] = (i * 7 + j) & 255;
    if (i === 0) { page.fill(0xff, 0, 6); page.set(n.mac, 6); page[12] = 0x88; page[13] = 0xb5; }
  }
  const reqs = [{ gref: gref(q, 0), id: 0, size: slots * each, flags: NETTXF_more_data | NETTXF_extra_info }, { extra: 1, size: 1448, gsoType: 1 }];
  for (let i = 1; i < slots; i++) reqs.push({ gref: gref(q, i), id: i, size: each, flags: i < slots - 1 ? NETTXF_more_data : 0 });
  txRaw(q, reqs);
  guest.sc.intr.intrSignal(q.txIh);
  await new Promise((r) => setTimeout(r, 3000));
}
`, `vif = [ 'mac=00:16:3e:00:02:01' ]`);
  const receiver = guestImage(dir, 'receiver', `${helloCode}
export async function main(guest) {
  const [n] = guest.nets();
  let got = 0, good = 0, gso = 0;
  n.onFrame((f, info) => {
    if (f[12] !== 0x88 || f[13] !== 0xb5) return;
    got++;
    let ok = f.length === 1800;
    for (let i = 0; i < 18 && ok; i++) for (let j = i === 0 ? 14 : 0; j < 100; j++) if (f[i * 100 + j] !== ((i * 7 + j) & 255)) { ok = false; break; }
    if (ok) good++;
    if (info.gsoType === 1 && info.gsoSize === 1448) gso++;
  });
  await meet(n, Uint8Array.from([0x00, 0x16, 0x3e, 0, 2, 1]));
  await new Promise((r) => setTimeout(r, 3000));
  console.log('got ' + got + ' intact ' + good + ' gso ' + gso + ' up ' + n.up + ' rxErrors ' + n.counters().rxErrors);
}
`, `vif = [ 'mac=00:16:3e:00:02:02' ]`);
  const [, r] = await runGuests([sender, receiver]);
  t.equal(r!.reason, 'poweroff', r!.console);
  t.match(r!.console, /^got 1 intact 1 gso 1 up true rxErrors 0$/m, 'the frame arrived whole with its GSO info, the interface up');
});
