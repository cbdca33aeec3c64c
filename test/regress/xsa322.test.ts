// XSA-322: when a domain is released its id leaves every ACL, so a new domain
// that later gets the same id inherits no access to old nodes.

import t from 'tap';
import { XS_GET_PERMS, XS_INTRODUCE, XS_READ, XS_RELEASE, XS_SET_PERMS, XS_WRITE } from '../../lib/abi/xs_wire.js';
import { Xenstored } from '../../lib/backends/xenstored.js';
import { splitStrings } from '../../lib/xenstore/wire.js';
import { direct } from '../xenstore-harness.js';

const strings = (m: { payload: Uint8Array }): string[] => splitStrings(m.payload);

t.test('a released domain loses every permission it was given and every node it owned', async (t) => {
  const xsd = new Xenstored();
  const d0 = direct(xsd, 0);
  t.same(strings(d0.req(XS_INTRODUCE, 0, '5', '1', '1')), ['OK']);
  d0.req(XS_WRITE, 0, '/backend/shared', 'secret');
  t.same(strings(d0.req(XS_SET_PERMS, 0, '/backend/shared', 'n0', 'r5', 'r7')), ['OK']);
  d0.req(XS_WRITE, 0, '/backend/given', 'x');
  t.same(strings(d0.req(XS_SET_PERMS, 0, '/backend/given', 'r5', 'w7')), ['OK']);
  const d5 = direct(xsd, 5);
  t.same(strings(d5.req(XS_READ, 0, '/backend/shared')), ['secret'], 'domain 5 may read before its release');

  t.same(strings(d0.req(XS_RELEASE, 0, '5')), ['OK']);
  t.same(strings(d0.req(XS_GET_PERMS, 0, '/backend/shared')), ['n0', 'r7'], 'its entry is gone, the others stay');
  t.same(strings(d0.req(XS_GET_PERMS, 0, '/backend/given')), ['r0', 'w7'], 'a node it owned passes to dom0');

  // A new domain 5: nothing of the old one's access is left to it.
  t.same(strings(d0.req(XS_INTRODUCE, 0, '5', '2', '2')), ['OK']);
  const again = direct(xsd, 5);
  t.same(strings(again.req(XS_READ, 0, '/backend/shared')), ['EACCES']);
});
