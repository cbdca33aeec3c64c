// EVTCHNOP_close leaves the port's pending bit set. Xen clears it when the
// port is freed (evtchn_free: "Clear pending event to avoid unexpected
// behavior on re-bind"), so the next owner of the port number starts clean.
// Here the stale bit survives close; alloc_unbound hands out the lowest free
// port, so the next channel gets it: unmasking delivers an event nobody sent,
// and if the guest unmasks in memory, the first real send finds the bit
// already set and raises nothing (evtchn_2l_set_pending returns early).

import t from 'tap';

import { offsetOf } from '../../lib/abi/layout.js';
import { EVTCHNOP_alloc_unbound, EVTCHNOP_bind_interdomain, EVTCHNOP_close, EVTCHNOP_send, EVTCHNOP_unmask } from '../../lib/abi/event_channel.js';
import { __HYPERVISOR_event_channel_op, DOMID_SELF, shared_info, vcpu_info } from '../../lib/abi/xen.js';
import { VCPU_WAKE } from '../../lib/hypervisor/domain.js';
import { Host } from '../../lib/hypervisor/host.js';
import { PAGE_SIZE } from '../../lib/hypervisor/page.js';

const PENDING = offsetOf(shared_info, 'evtchn_pending');
const MASK = offsetOf(shared_info, 'evtchn_mask');
const UPCALL_PENDING = offsetOf(shared_info, 'vcpu_info') + offsetOf(vcpu_info, 'evtchn_upcall_pending');

function setup() {
  const host = new Host();
  const a = host.createDomain({ name: 'a', memoryMiB: 1 }).domid;
  const b = host.createDomain({ name: 'b', memoryMiB: 1 }).domid;
  const da = host.domain(a);
  const ev = (domid: number, cmd: number, arg: object) => host.hv.entry(domid)(__HYPERVISOR_event_channel_op, cmd, arg);
  const si = () => da.sharedInfoGfn * PAGE_SIZE;
  const bit = (base: number, port: number) => ((da.mem.u8[si() + base + (port >> 3)] ?? 0) >> (port & 7)) & 1;
  /** a offers a port to b, b binds it; returns both ends. */
  const channel = () => {
    const alloc = { dom: DOMID_SELF, remote_dom: b, port: 0 };
    if (ev(a, EVTCHNOP_alloc_unbound, alloc) !== 0) throw new Error('alloc_unbound');
    const bind = { remote_dom: a, remote_port: alloc.port, local_port: 0 };
    if (ev(b, EVTCHNOP_bind_interdomain, bind) !== 0) throw new Error('bind_interdomain');
    return { pa: alloc.port, pb: bind.local_port };
  };
  return {
    a, b, ev, channel,
    pending: (port: number) => bit(PENDING, port),
    upcall: () => Atomics.load(da.mem.u8, si() + UPCALL_PENDING),
    woken: () => Atomics.load(da.ctl, da.vcpuWord(0, VCPU_WAKE)),
    unmaskInMemory: (port: number) => Atomics.and(da.mem.u8, si() + MASK + (port >> 3), ~(1 << (port & 7)) & 0xff),
  };
}

/** A channel whose a-end is pending (b sent, a's port is masked), then closed by a. */
function closedWhilePending() {
  const s = setup();
  const first = s.channel();
  s.ev(s.b, EVTCHNOP_send, { port: first.pb });
  if (s.pending(first.pa) !== 1) throw new Error('the send did not set pending');
  if (s.ev(s.a, EVTCHNOP_close, { port: first.pa }) !== 0) throw new Error('close');
  return { ...s, first };
}

// Fixed: close() clears the port's pending bit, as Xen evtchn_free does.

t.test('close clears the pending bit of the port it frees', async (t) => {
  const { first, pending } = closedWhilePending();
  t.equal(pending(first.pa), 0, 'not pending after close');
});

t.test('the next channel on a reused port number starts with no event', async (t) => {
  const s = closedWhilePending();
  const second = s.channel();
  t.equal(second.pa, s.first.pa, 'alloc_unbound reused the port number');
  t.equal(s.ev(s.a, EVTCHNOP_unmask, { port: second.pa }), 0);
  t.equal(s.upcall(), 0, 'unmasking the new port delivers nothing nobody sent');
});

t.test('the first send on a reused, unmasked port raises an upcall', async (t) => {
  const s = closedWhilePending();
  const second = s.channel();
  t.equal(second.pa, s.first.pa, 'alloc_unbound reused the port number');
  s.unmaskInMemory(second.pa); // as a guest that unmasks without a hypercall (Linux, same-vCPU case)
  t.equal(s.ev(s.b, EVTCHNOP_send, { port: second.pb }), 0);
  t.equal(s.upcall(), 1, 'evtchn_upcall_pending set');
  t.equal(s.woken(), 1, 'vCPU kicked');
});
