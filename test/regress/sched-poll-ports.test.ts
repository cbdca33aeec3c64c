// SCHEDOP_poll must reject a port the domain cannot have (Xen do_poll:
// port >= d->max_evtchns -> -EINVAL). poll() passes every port straight to
// isPending(), which indexes evtchn_pending without a bound: port 4096 reads
// the first bit of evtchn_mask (set for every fresh domain), so the poll
// returns at once as if an event were pending; ports 1024..4095 read bits no
// port owns, and a negative port reads vcpu_info[31].

import t from 'tap';

import { XEN_EINVAL } from '../../lib/abi/errno.js';
import { SCHEDOP_poll } from '../../lib/abi/sched.js';
import { __HYPERVISOR_sched_op } from '../../lib/abi/xen.js';
import { MAX_EVTCHNS } from '../../lib/hypervisor/domain.js';
import { Host } from '../../lib/hypervisor/host.js';

// Fixed: poll() refuses port numbers outside the domain's range.

t.test('SCHEDOP_poll on a port out of range is -EINVAL', async (t) => {
  const host = new Host();
  const hc = host.hv.entry(host.createDomain({ name: 'a', memoryMiB: 1 }).domid);
  // A deadline in the past, so a poll that wrongly accepts the port still returns at once.
  for (const port of [MAX_EVTCHNS, 4096, -1, 1.5]) {
    t.equal(hc(__HYPERVISOR_sched_op, SCHEDOP_poll, { ports: [port], nr_ports: 1, timeout: 1n }), -XEN_EINVAL, `port ${port}`);
  }
});
