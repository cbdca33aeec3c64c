// Hypercall arguments. A C guest passes a pointer to a struct that Xen copies
// in and out; here the caller passes an object with the struct's member names
// and the hypervisor fills the OUT members in place, so a call reads as in C:
//   const op = { dom: DOMID_SELF, remote_dom: 0, port: 0 };
//   hypercall(__HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, op); op.port
// The return value is 0 or a negated Xen errno, as Xen returns it.
// A batch passes an array and a count, as C passes a pointer and a count:
//   hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_copy, ops, n)
// does the first n of ops, each with its own status.

import type { Page, ReadPage } from './page.js';

export type Hypercall = (op: number, cmd: number, arg?: object, count?: number) => number;

export type evtchn_alloc_unbound = { dom: number; remote_dom: number; port: number };
export type evtchn_bind_interdomain = { remote_dom: number; remote_port: number; local_port: number };
export type evtchn_bind_virq = { virq: number; vcpu: number; port: number };
export type evtchn_close = { port: number };
export type evtchn_send = { port: number };
export type evtchn_unmask = { port: number };
export type evtchn_bind_vcpu = { port: number; vcpu: number };
export type evtchn_status = {
  dom: number;
  port: number;
  status: number;
  vcpu: number;
  u: { unbound: { dom: number }; interdomain: { dom: number; port: number }; virq: number };
};

export type gnttab_map_grant_ref = {
  host_addr: bigint;
  flags: number;
  ref: number;
  dom: number;
  status: number;
  handle: number;
  dev_bus_addr: bigint;
  /** The mapping itself, where C finds the frame at host_addr: a Page, or a ReadPage for GNTMAP_readonly. */
  page: Page | ReadPage | null;
};
export type gnttab_unmap_grant_ref = { host_addr: bigint; dev_bus_addr: bigint; handle: number; status: number };
export type gnttab_copy_ptr = { u: { ref: number; gmfn: number }; domid: number; offset: number };
export type gnttab_copy = { source: gnttab_copy_ptr; dest: gnttab_copy_ptr; len: number; flags: number; status: number };
export type gnttab_setup_table = { dom: number; nr_frames: number; status: number; frame_list: number[] };
export type gnttab_query_size = { dom: number; nr_frames: number; max_nr_frames: number; status: number };

export type xen_add_to_physmap = { domid: number; size: number; space: number; idx: number; gpfn: number };
/** XENMEM_add_to_physmap_batch with XENMAPSPACE_gmfn_foreign: a privileged domain maps another's frames. */
export type xen_add_to_physmap_batch = {
  domid: number;
  space: number;
  size: number;
  u: { foreign_domid: number };
  idxs: number[];
  gpfns: number[];
  errs: number[];
  /** The mapped frames, where C would find them at gpfns. */
  pages: (Page | null)[];
};
export type xen_memory_map = { nr_entries: number; buffer: { addr: number; size: number; type: number }[] };
export type xen_memory_reservation = { domid: number; nr_extents: number };

export type xen_hvm_param = { domid: number; index: number; value: bigint };

/**
 * `srec` is HYPERVISOR_suspend's third argument, which C passes beside the
 * struct (a PV guest's start_info frame): here the frame of the resume record
 * a suspending kernel leaves for its restore.
 */
export type sched_shutdown = { reason: number; srec?: number };
export type vcpu_op = { vcpuid: number };
export type sched_remote_shutdown = { domain_id: number; reason: number };
export type sched_poll = { ports: number[]; nr_ports: number; timeout: bigint };

export type xen_extraversion = { extraversion: string };
export type xen_feature_info = { submap_idx: number; submap: number };

/** XEN_DOMCTL_getdomaininfo's answer, the part a toolstack reads. */
export type xen_domctl_getdomaininfo = {
  domain: number;
  flags: number;
  tot_pages: number;
  max_pages: number;
  nr_online_vcpus: number;
  max_vcpu_id: number;
  shutdown_reason: number;
  state: string;
  /** vCPU 0 is halted, waiting for an event (xl's "b"). */
  blocked: boolean;
};
