// The domctls the toolstack uses beyond create and destroy (pause, unpause,
// resume after a suspend), VCPUOP_up/down/is_up, and the counters `top`
// reads, called as the hypervisor's callers call them: no threads, the
// domains' states set where a started vCPU would have set them.

import t from 'tap';
import { __HYPERVISOR_event_channel_op, __HYPERVISOR_grant_table_op, __HYPERVISOR_sched_op, __HYPERVISOR_vcpu_op, DOMID_SELF } from '../lib/abi/xen.js';
import { GNTMAP_host_map, GNTTABOP_map_grant_ref, GNTTABOP_unmap_grant_ref, GTF_permit_access } from '../lib/abi/grant_table.js';
import { EVTCHNOP_alloc_unbound } from '../lib/abi/event_channel.js';
import { SCHEDOP_shutdown, SHUTDOWN_poweroff, SHUTDOWN_suspend } from '../lib/abi/sched.js';
import { VCPUOP_down, VCPUOP_is_up, VCPUOP_up } from '../lib/abi/vcpu.js';
import { XEN_EBUSY, XEN_EINVAL, XEN_ENOENT, XEN_EPERM, XEN_ESRCH } from '../lib/abi/errno.js';
import { D, DomainState, HOST_AWAKE, VCPU_AWAKE } from '../lib/hypervisor/domain.js';
import { openPorts } from '../lib/hypervisor/evtchn.js';
import { grantCounts } from '../lib/hypervisor/grant.js';
import { Host } from '../lib/hypervisor/host.js';
import { Vcpu } from '../lib/hypervisor/vcpu.js';

function setup(): { host: Host; dom0: number; a: number; b: number } {
  const host = new Host();
  host.createDomain({ name: 'Domain-0', memoryMiB: 4, privileged: true }, 0);
  const a = host.createDomain({ name: 'a', memoryMiB: 4, vcpus: 3 }).domid;
  const b = host.createDomain({ name: 'b', memoryMiB: 4 }).domid;
  for (const id of [0, a, b]) Atomics.store(host.domain(id).ctl, D.state, DomainState.running);
  return { host, dom0: 0, a, b };
}

t.test('pause and unpause: privileged, of another running domain only', async (t) => {
  const { host, a, b } = setup();
  const hv = host.hv;
  const dom0 = host.domain(0);
  t.equal(hv.pauseDomain(host.domain(b), a), -XEN_EPERM, 'a guest may not pause another');
  t.equal(hv.pauseDomain(dom0, 0), -XEN_EINVAL, 'nor dom0 itself');
  t.equal(hv.pauseDomain(dom0, 0x7000), -XEN_ESRCH);
  t.equal(hv.unpauseDomain(dom0, a), -XEN_EINVAL, 'unpause of a running domain');
  t.equal(hv.pauseDomain(dom0, a), 0);
  t.match(hv.getDomainInfo(dom0, a), { state: 'paused' });
  t.equal(hv.pauseDomain(dom0, a), -XEN_EINVAL, 'paused twice');
  t.equal(hv.unpauseDomain(dom0, a), 0);
  t.match(hv.getDomainInfo(dom0, a), { state: 'running' });
});

t.test('a paused vCPU holds in halt until unpaused, and the held time is kept apart', async (t) => {
  const { host, a } = setup();
  const d = host.domain(a);
  const vcpu = new Vcpu(d, 0);
  t.equal(host.hv.pauseDomain(host.domain(0), a), 0);
  // Unpause from a timer that cannot run while this thread is held: a worker does it.
  const { Worker } = await import('node:worker_threads');
  const w = new Worker(`const { workerData } = require('node:worker_threads');
    const ctl = new Int32Array(workerData);
    setTimeout(() => { Atomics.store(ctl, ${D.state}, ${DomainState.running}); Atomics.notify(ctl, ${D.state}); }, 150);`,
  { eval: true, workerData: d.control });
  const start = performance.now();
  vcpu.kick();
  await vcpu.halt();
  const held = performance.now() - start;
  await w.terminate();
  t.ok(held >= 140, `held ${held.toFixed(0)} ms`);
  t.ok(Atomics.load(d.ctl, D.pausedMs) >= 140, 'counted as paused, not as CPU time');
});

t.test('VCPUOP_up, VCPUOP_down, VCPUOP_is_up; getdomaininfo counts the vCPUs online', async (t) => {
  const { host, a } = setup();
  const hv = host.hv;
  const d = host.domain(a);
  const op = (cmd: number, vcpuid: number): number => hv.hypercall(d, __HYPERVISOR_vcpu_op, cmd, { vcpuid });
  t.match(hv.getDomainInfo(host.domain(0), a), { nr_online_vcpus: 3, max_vcpu_id: 2 });
  t.equal(op(VCPUOP_down, 2), 0);
  t.equal(op(VCPUOP_is_up, 2), 0);
  t.equal(op(VCPUOP_is_up, 1), 1);
  t.match(hv.getDomainInfo(host.domain(0), a), { nr_online_vcpus: 2 });
  t.equal(op(VCPUOP_down, 0), -XEN_EBUSY, 'vCPU 0 runs the kernel');
  t.equal(op(VCPUOP_up, 3), -XEN_ENOENT, 'beyond max_vcpus');
  t.equal(op(VCPUOP_up, -1), -XEN_ENOENT);
  t.equal(op(VCPUOP_up, 2), 0);
  t.match(hv.getDomainInfo(host.domain(0), a), { nr_online_vcpus: 3 });
});

t.test('SCHEDOP_shutdown(suspend) records the frame and returns 1 once resumed; resume refuses anything else', async (t) => {
  const { host, a, b } = setup();
  const hv = host.hv;
  const dom0 = host.domain(0);
  t.equal(hv.resumeDomain(dom0, a), -XEN_EINVAL, 'a running domain');
  const d = host.domain(a);
  d.setAwake(0, 1);
  const awakeWord = d.vcpuWord(0, VCPU_AWAKE);
  const { Worker } = await import('node:worker_threads');
  const w = new Worker(`const { parentPort, workerData } = require('node:worker_threads');
    const ctl = new Int32Array(workerData.control);
    const hostWords = new Int32Array(workerData.host);
    const until = Date.now() + 5000;
    while (Atomics.load(ctl, ${D.state}) !== ${DomainState.shutdown} && Date.now() < until);
    setTimeout(() => {
      parentPort.postMessage([Atomics.load(ctl, ${awakeWord}), Atomics.load(hostWords, ${HOST_AWAKE}), Atomics.load(ctl, ${D.inHypercall})]);
      Atomics.store(ctl, ${D.state}, ${DomainState.running});
      Atomics.notify(ctl, ${D.state});
    }, 50);`,
  { eval: true, workerData: { control: d.control, host: hv.host.buffer } });
  const seen = new Promise((resolve) => w.once('message', resolve));
  // The hypercall blocks this thread until the worker resumes the domain as resumeDomain would.
  const rc = hv.hypercall(d, __HYPERVISOR_sched_op, SCHEDOP_shutdown, { reason: SHUTDOWN_suspend, srec: 77 });
  t.same(await seen, [0, 0, 0], 'while suspended the vCPU is not counted awake, nor inside the hypervisor (a destroy need not wait for it)');
  t.equal(Atomics.load(d.ctl, D.inHypercall), 0, 'out of the hypercall once resumed');
  t.equal(Atomics.load(d.ctl, awakeWord), 1, 'and is again once resumed');
  await w.terminate();
  t.equal(rc, 1, 'cancelled: the guest runs on');
  t.equal(Atomics.load(d.ctl, D.suspendRecord), 77);
  t.equal(hv.hypercall(host.domain(b), __HYPERVISOR_sched_op, SCHEDOP_shutdown, { reason: SHUTDOWN_poweroff }), 0);
  t.equal(hv.resumeDomain(dom0, b), -XEN_EINVAL, 'a powered-off domain does not resume');
  t.equal(hv.resumeDomain(host.domain(a), b), -XEN_EPERM);
});

t.test('the counters top shows: ports open, grants granted and pinned, mappings held', async (t) => {
  const { host, a } = setup();
  const d = host.domain(a);
  const before = openPorts(d);
  const op = { dom: DOMID_SELF, remote_dom: 0, port: 0 };
  t.equal(host.hv.hypercall(d, __HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, op), 0);
  t.equal(openPorts(d), before + 1);
  t.same(grantCounts(d), { granted: 0, pinned: 0, mapped: 0 }, 'a fresh domain grants nothing');
  // Grant ref 5 of a's frame 0 to dom0 (frame and domid, then flags), then dom0 maps it.
  const entry = d.ctl[D.grantFrames]! * 4096 + 5 * 8;
  const view = new DataView(d.memory);
  view.setUint32(entry + 4, 10, true);
  view.setUint16(entry + 2, 0, true);
  view.setUint16(entry, GTF_permit_access, true);
  t.same(grantCounts(d), { granted: 1, pinned: 0, mapped: 0 });
  const dom0 = host.domain(0);
  const map = { host_addr: 0n, flags: GNTMAP_host_map, ref: 5, dom: a, status: -1, handle: -1, dev_bus_addr: 0n, page: null };
  host.hv.hypercall(dom0, __HYPERVISOR_grant_table_op, GNTTABOP_map_grant_ref, map);
  t.equal(map.status, 0);
  t.same(grantCounts(d), { granted: 1, pinned: 1, mapped: 0 }, 'pinned by the mapper');
  t.equal(grantCounts(dom0).mapped, 1, 'and held by dom0');
  host.hv.hypercall(dom0, __HYPERVISOR_grant_table_op, GNTTABOP_unmap_grant_ref, { host_addr: 0n, dev_bus_addr: 0n, handle: map.handle, status: 0 });
  t.same(grantCounts(d), { granted: 1, pinned: 0, mapped: 0 });
  t.equal(grantCounts(dom0).mapped, 0);
});

t.test('a destroy stops a domain only once its thread is out of the hypervisor, and a dying domain enters it no more', async (t) => {
  const { host, a } = setup();
  const d = host.domain(a);
  const call = host.hv.entry(a);
  const unbound = { dom: DOMID_SELF, remote_dom: 0, port: 0 };
  t.equal(call(__HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, unbound), 0);
  t.equal(Atomics.load(d.ctl, D.inHypercall), 0, 'the count is 0 between hypercalls');
  // As if a's thread were inside a hypercall, holding the hypervisor's locks.
  Atomics.add(d.ctl, D.inHypercall, 1);
  let gone = false;
  const destroying = host.destroy(a).then(() => (gone = true));
  await new Promise((r) => setTimeout(r, 50));
  t.equal(gone, false, 'the destroy waits');
  t.equal(Atomics.load(d.ctl, D.state), DomainState.dying);
  t.not(host.hv.domain(a), undefined, 'nothing torn down yet');
  t.equal(call(__HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, { ...unbound }), -XEN_ESRCH, 'a new hypercall does not enter (outside its own thread: ESRCH)');
  t.equal(Atomics.load(d.ctl, D.inHypercall), 1, 'and leaves the count as it was');
  Atomics.sub(d.ctl, D.inHypercall, 1);
  await destroying;
  t.ok(gone, 'the destroy ends once the thread is out');
  t.equal(host.hv.domain(a), undefined);
});
