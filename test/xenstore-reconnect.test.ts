// Ring reconnection (xenstore-ring.txt, C domain_conn_reset): a guest that
// sets connection = XENSTORE_RECONNECT gets a clean ring and a clean
// connection, and can talk to xenstored again from index zero.

import t from 'tap';
import { offsetOf } from '../lib/abi/layout.js';
import {
  XENSTORE_CONNECTED,
  XENSTORE_RECONNECT,
  XENSTORE_SERVER_FEATURE_RECONNECTION,
  XS_ERROR,
  XS_MKDIR,
  XS_SET_PERMS,
  XS_TRANSACTION_START,
  XS_WATCH,
  XS_WRITE,
  xenstore_domain_interface as intf,
} from '../lib/abi/xs_wire.js';
import { Xenstored, XenstoredRing } from '../lib/backends/xenstored.js';
import { XsRing } from '../lib/xenstore/ring.js';
import { joinStrings, joinWrite, splitStrings, type XsMessage } from '../lib/xenstore/wire.js';
import { direct, newPage } from './xenstore-harness.js';

const at = (name: string): number => offsetOf(intf, name);

t.test('XENSTORE_RECONNECT resets the ring and the connection', async (t) => {
  const xsd = new Xenstored();
  const dom0 = direct(xsd, 0);
  dom0.req(XS_MKDIR, 0, '/local/domain/5');
  dom0.req(XS_SET_PERMS, 0, '/local/domain/5', 'n5');
  const page = newPage();
  const got: XsMessage[] = [];
  let front: XsRing | null = null;
  const server = new XenstoredRing(xsd, 5, page, () => front?.intr());
  const newFront = (): XsRing => new XsRing({ page, side: 'front', notify: () => server.intr(), deliver: (m) => got.push(m) });
  front = newFront();
  t.ok((page.load32(at('server_features')) & XENSTORE_SERVER_FEATURE_RECONNECTION) !== 0, 'the server offers reconnection');

  front.send({ type: XS_WATCH, req_id: 1, tx_id: 0, payload: joinStrings(['data', 'tok']) });
  front.send({ type: XS_TRANSACTION_START, req_id: 2, tx_id: 0, payload: joinStrings(['']) });
  t.equal(got.length, 3, 'watch OK, its first event, transaction id');
  const txId = Number(splitStrings(got.find((m) => m.req_id === 2)!.payload)[0]);
  // Half a header left on the ring: the reset must discard it.
  page.write(at('req') + (page.load32(at('req_prod')) & 1023), new Uint8Array([XS_WRITE, 0, 0, 0]));
  page.store32(at('req_prod'), page.load32(at('req_prod')) + 4);

  page.store32(at('connection'), XENSTORE_RECONNECT);
  front = null;
  server.intr();
  for (const name of ['req_cons', 'req_prod', 'rsp_cons', 'rsp_prod', 'error']) t.equal(page.load32(at(name)), 0, `${name} is 0`);
  t.equal(page.load32(at('connection')), XENSTORE_CONNECTED);

  got.length = 0;
  front = newFront();
  front.send({ type: XS_WRITE, req_id: 3, tx_id: txId, payload: joinWrite('data/x', '1') });
  t.equal(got[0]?.type, XS_ERROR, 'the old transaction is gone');
  t.same(splitStrings(got[0]!.payload), ['ENOENT']);
  got.length = 0;
  dom0.req(XS_WRITE, 0, '/local/domain/5/data/y', '2');
  t.equal(got.length, 0, 'the old watch is gone');
  front.send({ type: XS_WRITE, req_id: 4, tx_id: 0, payload: joinWrite('/local/domain/5/z', '3') });
  t.same(got.map((m) => [m.req_id, splitStrings(m.payload)]), [[4, ['OK']]], 'requests work again from index 0');
});
