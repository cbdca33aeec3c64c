// xen/memory.h: XENMEM_* sub-ops of __HYPERVISOR_memory_op and their structs.

import { struct, u16, u32, u64, union, unionOf } from './layout.js';
import { domid_t, xen_pfn_t, xen_ulong_t, XEN_GUEST_HANDLE } from './xen.js';

export const XENMEM_increase_reservation = 0;
export const XENMEM_decrease_reservation = 1;
export const XENMEM_populate_physmap = 6;

export const XENMEMF_populate_on_demand = 1 << 16;
export const XENMEMF_exact_node_request = 1 << 17;
export const XENMEMF_vnode = 1 << 18;

export const xen_memory_reservation = struct('xen_memory_reservation', 32, [
  ['extent_start', XEN_GUEST_HANDLE],
  ['nr_extents', xen_ulong_t],
  ['extent_order', u32],
  ['mem_flags', u32],
  ['domid', domid_t],
]);

export const XENMEM_exchange = 11;

export const xen_memory_exchange = struct('xen_memory_exchange', 72, [
  ['in', xen_memory_reservation],
  ['out', xen_memory_reservation],
  ['nr_exchanged', xen_ulong_t],
]);

export const XENMEM_maximum_ram_page = 2;

export const xen_memory_domain = struct('xen_memory_domain', 2, [
  ['domid', domid_t],
]);

export const XENMEM_current_reservation = 3;
export const XENMEM_maximum_reservation = 4;
export const XENMEM_maximum_gpfn = 14;
export const XENMEM_machphys_mfn_list = 5;

export const xen_machphys_mfn_list = struct('xen_machphys_mfn_list', 24, [
  ['max_extents', u32],
  ['extent_start', XEN_GUEST_HANDLE],
  ['nr_extents', u32],
]);

export const XENMEM_machphys_compat_mfn_list = 25;
export const XENMEM_machphys_mapping = 12;

export const xen_machphys_mapping = struct('xen_machphys_mapping', 24, [
  ['v_start', xen_ulong_t],
  ['v_end', xen_ulong_t],
  ['max_mfn', xen_ulong_t],
]);

export const XENMAPSPACE_shared_info = 0;
export const XENMAPSPACE_grant_table = 1;
export const XENMAPSPACE_gmfn = 2;
export const XENMAPSPACE_gmfn_range = 3;
export const XENMAPSPACE_gmfn_foreign = 4;
export const XENMAPSPACE_dev_mmio = 5;

export const XENMEM_add_to_physmap = 7;

// idx | XENMAPIDX_grant_table_status asks for a v2 status frame.
export const XENMAPIDX_grant_table_status = 0x80000000;

export const xen_add_to_physmap = struct('xen_add_to_physmap', 24, [
  ['domid', domid_t],
  ['size', u16],
  ['space', u32],
  ['idx', xen_ulong_t],
  ['gpfn', xen_pfn_t],
]);

export const XENMEM_add_to_physmap_batch = 23;

export const xen_add_to_physmap_batch_extra = unionOf('xen_add_to_physmap_batch_extra', 2, [
  ['foreign_domid', domid_t],
  ['res0', u16],
]);

export const xen_add_to_physmap_batch = struct('xen_add_to_physmap_batch', 32, [
  ['domid', domid_t],
  ['space', u16],
  ['size', u16],
  ['u', xen_add_to_physmap_batch_extra],
  ['idxs', XEN_GUEST_HANDLE],
  ['gpfns', XEN_GUEST_HANDLE],
  ['errs', XEN_GUEST_HANDLE],
]);

export const XENMEM_remove_from_physmap = 15;

export const xen_remove_from_physmap = struct('xen_remove_from_physmap', 16, [
  ['domid', domid_t],
  ['gpfn', xen_pfn_t],
]);

// The buffer holds e820 entries; the public headers define no struct for them.
export const XENMEM_memory_map = 9;

export const xen_memory_map = struct('xen_memory_map', 16, [
  ['nr_entries', u32],
  ['buffer', XEN_GUEST_HANDLE],
]);

export const XENMEM_machine_memory_map = 10;
export const XENMEM_set_memory_map = 13;

export const xen_foreign_memory_map = struct('xen_foreign_memory_map', 24, [
  ['domid', domid_t],
  ['map', xen_memory_map],
]);

export const XENMEM_set_pod_target = 16;
export const XENMEM_get_pod_target = 17;

export const xen_pod_target = struct('xen_pod_target', 40, [
  ['target_pages', u64],
  ['tot_pages', u64],
  ['pod_cache_pages', u64],
  ['pod_entries', u64],
  ['domid', domid_t],
]);

export const XENMEM_acquire_resource = 28;
export const XENMEM_resource_ioreq_server = 0;
export const XENMEM_resource_grant_table = 1;
export const XENMEM_resource_vmtrace_buf = 2;
export const XENMEM_resource_grant_table_id_shared = 0;
export const XENMEM_resource_grant_table_id_status = 1;
export const XENMEM_resource_ioreq_server_frame_bufioreq = 0;

export const xen_mem_acquire_resource = struct('xen_mem_acquire_resource', 32, [
  ['domid', domid_t],
  ['type', u16],
  ['id', u32],
  ['nr_frames', u32],
  ['pad', u32],
  ['frame', u64],
  ['frame_list', XEN_GUEST_HANDLE],
]);

export const XENMEM_get_vnumainfo = 26;

export const xen_vmemrange = struct('xen_vmemrange', 24, [
  ['start', u64],
  ['end', u64],
  ['flags', u32],
  ['nid', u32],
]);

export const xen_vnuma_topology_info = struct('xen_vnuma_topology_info', 40, [
  ['domid', domid_t],
  ['pad', u16],
  ['nr_vnodes', u32],
  ['nr_vcpus', u32],
  ['nr_vmemranges', u32],
  ['vdistance', union([
    ['h', XEN_GUEST_HANDLE],
    ['pad', u64],
  ])],
  ['vcpu_to_vnode', union([
    ['h', XEN_GUEST_HANDLE],
    ['pad', u64],
  ])],
  ['vmemrange', union([
    ['h', XEN_GUEST_HANDLE],
    ['pad', u64],
  ])],
]);
