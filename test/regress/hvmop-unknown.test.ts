// An HVMOP this hypervisor does not implement must return -ENOSYS, as Xen's
// do_hvm_op does in its default case. hvmOp() reads its argument as an
// xen_hvm_param (domid, index) before it looks at the sub-op, so an unknown
// sub-op with its own struct gets -EPERM or -EINVAL instead. Linux asks for
// HVMOP_set_evtchn_upcall_vector and falls back on -ENOSYS; here it is told
// -EPERM.

import t from 'tap';

import { HVMOP_pagetable_dying, HVMOP_set_evtchn_upcall_vector } from '../../lib/abi/hvm.js';
import { XEN_ENOSYS } from '../../lib/abi/errno.js';
import { __HYPERVISOR_hvm_op, DOMID_SELF } from '../../lib/abi/xen.js';
import { Host } from '../../lib/hypervisor/host.js';

// Fixed: hvmOp() answers an unknown sub-op with -ENOSYS before looking at its argument.

t.test('unknown HVMOPs with their own argument structs return -ENOSYS', async (t) => {
  const host = new Host();
  const hc = host.hv.entry(host.createDomain({ name: 'a', memoryMiB: 1 }).domid);
  t.equal(hc(__HYPERVISOR_hvm_op, HVMOP_set_evtchn_upcall_vector, { vcpu: 0, vector: 0xf3 }), -XEN_ENOSYS, 'xen_hvm_evtchn_upcall_vector');
  t.equal(hc(__HYPERVISOR_hvm_op, HVMOP_pagetable_dying, { domid: DOMID_SELF, gpa: 0n }), -XEN_ENOSYS, 'xen_hvm_pagetable_dying');
});
