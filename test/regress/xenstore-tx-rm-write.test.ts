// A transaction that removes a node and writes it (or a child) again used
// to fail with EAGAIN every time: the write recorded the node as missing,
// its state inside the transaction, and the commit compared that with the
// live store, where the node still existed. The access is now recorded as
// the node was when the transaction began.

import t from 'tap';
import { Xenstored } from '../../lib/backends/xenstored.js';
import { attach } from '../xenstore-harness.js';

t.test('rm then write of the same node in one transaction commits', async (t) => {
  const { xs } = attach(new Xenstored({}), 0);
  await xs.write('/a/b/c', '1');
  await xs.transaction(async (tx) => {
    await tx.rm('/a/b');
    await tx.write('/a/b/c', '2');
  }, { retries: 0 });
  t.equal(await xs.read('/a/b/c'), '2');
  await xs.transaction(async (tx) => {
    await tx.rm('/a/b/c');
    await tx.write('/a/b/c', '3');
  }, { retries: 0 });
  t.equal(await xs.read('/a/b/c'), '3');
});

t.test('a node changed outside the transaction is still a conflict', async (t) => {
  const { xs } = attach(new Xenstored({}), 0);
  await xs.write('/a/b', '1');
  let first = true;
  await t.rejects(xs.transaction(async (tx) => {
    await tx.read('/a/b');
    if (first) await xs.write('/a/b', 'changed');
    first = false;
    await tx.write('/a/b', '2');
  }, { retries: 0 }), { code: 'EAGAIN' });
  t.equal(await xs.read('/a/b'), 'changed');
});
