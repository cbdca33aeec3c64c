// xen/grant_table.h: grant entries (v1, v2), GNTTABOP_* argument structs,
// GNTMAP_* flags and the GNTST_* status codes.

import { array, i16, record, struct, u16, u32, u64, union, unionOf } from './layout.js';
import { domid_t, xen_pfn_t, XEN_GUEST_HANDLE } from './xen.js';

export const grant_ref_t = u32;

export const grant_entry_v1 = struct('grant_entry_v1', 8, [
  ['flags', u16],
  ['domid', domid_t],
  ['frame', u32],
]);

export const GNTTAB_NR_RESERVED_ENTRIES = 8;
export const GNTTAB_RESERVED_CONSOLE = 0;
export const GNTTAB_RESERVED_XENSTORE = 1;

export const GTF_invalid = 0 << 0;
export const GTF_permit_access = 1 << 0;
export const GTF_accept_transfer = 2 << 0;
export const GTF_transitive = 3 << 0;
export const GTF_type_mask = 3 << 0;
export const _GTF_readonly = 2;
export const GTF_readonly = 1 << _GTF_readonly;
export const _GTF_reading = 3;
export const GTF_reading = 1 << _GTF_reading;
export const _GTF_writing = 4;
export const GTF_writing = 1 << _GTF_writing;
export const _GTF_PWT = 5;
export const GTF_PWT = 1 << _GTF_PWT;
export const _GTF_PCD = 6;
export const GTF_PCD = 1 << _GTF_PCD;
export const _GTF_PAT = 7;
export const GTF_PAT = 1 << _GTF_PAT;
export const _GTF_sub_page = 8;
export const GTF_sub_page = 1 << _GTF_sub_page;
export const _GTF_transfer_committed = 2;
export const GTF_transfer_committed = 1 << _GTF_transfer_committed;
export const _GTF_transfer_completed = 3;
export const GTF_transfer_completed = 1 << _GTF_transfer_completed;

export const grant_entry_header = struct('grant_entry_header', 4, [
  ['flags', u16],
  ['domid', domid_t],
]);

export const grant_entry_v2 = unionOf('grant_entry_v2', 16, [
  ['hdr', grant_entry_header],
  ['full_page', record([
    ['hdr', grant_entry_header],
    ['pad0', u32],
    ['frame', u64],
  ])],
  ['sub_page', record([
    ['hdr', grant_entry_header],
    ['page_off', u16],
    ['length', u16],
    ['frame', u64],
  ])],
  ['transitive', record([
    ['hdr', grant_entry_header],
    ['trans_domid', domid_t],
    ['pad0', u16],
    ['gref', grant_ref_t],
  ])],
  ['__spacer', array(u32, 4)],
]);

export const grant_status_t = u16;

export const GNTTABOP_map_grant_ref = 0;
export const GNTTABOP_unmap_grant_ref = 1;
export const GNTTABOP_setup_table = 2;
export const GNTTABOP_dump_table = 3;
export const GNTTABOP_transfer = 4;
export const GNTTABOP_copy = 5;
export const GNTTABOP_query_size = 6;
export const GNTTABOP_unmap_and_replace = 7;
export const GNTTABOP_set_version = 8;
export const GNTTABOP_get_status_frames = 9;
export const GNTTABOP_get_version = 10;
export const GNTTABOP_swap_grant_ref = 11;
export const GNTTABOP_cache_flush = 12;

export const grant_handle_t = u32;

export const gnttab_map_grant_ref = struct('gnttab_map_grant_ref', 32, [
  ['host_addr', u64],
  ['flags', u32],
  ['ref', grant_ref_t],
  ['dom', domid_t],
  ['status', i16],
  ['handle', grant_handle_t],
  ['dev_bus_addr', u64],
]);

export const gnttab_unmap_grant_ref = struct('gnttab_unmap_grant_ref', 24, [
  ['host_addr', u64],
  ['dev_bus_addr', u64],
  ['handle', grant_handle_t],
  ['status', i16],
]);

export const gnttab_setup_table = struct('gnttab_setup_table', 24, [
  ['dom', domid_t],
  ['nr_frames', u32],
  ['status', i16],
  ['frame_list', XEN_GUEST_HANDLE],
]);

export const gnttab_dump_table = struct('gnttab_dump_table', 4, [
  ['dom', domid_t],
  ['status', i16],
]);

export const gnttab_transfer = struct('gnttab_transfer', 24, [
  ['mfn', xen_pfn_t],
  ['domid', domid_t],
  ['ref', grant_ref_t],
  ['status', i16],
]);

export const _GNTCOPY_source_gref = 0;
export const GNTCOPY_source_gref = 1 << _GNTCOPY_source_gref;
export const _GNTCOPY_dest_gref = 1;
export const GNTCOPY_dest_gref = 1 << _GNTCOPY_dest_gref;

// Declared inside struct gnttab_copy in C; the tag still has file scope.
export const gnttab_copy_ptr = struct('gnttab_copy_ptr', 16, [
  ['u', union([
    ['ref', grant_ref_t],
    ['gmfn', xen_pfn_t],
  ])],
  ['domid', domid_t],
  ['offset', u16],
]);

export const gnttab_copy = struct('gnttab_copy', 40, [
  ['source', gnttab_copy_ptr],
  ['dest', gnttab_copy_ptr],
  ['len', u16],
  ['flags', u16],
  ['status', i16],
]);

export const gnttab_query_size = struct('gnttab_query_size', 16, [
  ['dom', domid_t],
  ['nr_frames', u32],
  ['max_nr_frames', u32],
  ['status', i16],
]);

export const gnttab_unmap_and_replace = struct('gnttab_unmap_and_replace', 24, [
  ['host_addr', u64],
  ['new_addr', u64],
  ['handle', grant_handle_t],
  ['status', i16],
]);

export const gnttab_set_version = struct('gnttab_set_version', 4, [
  ['version', u32],
]);

export const gnttab_get_status_frames = struct('gnttab_get_status_frames', 16, [
  ['nr_frames', u32],
  ['dom', domid_t],
  ['status', i16],
  ['frame_list', XEN_GUEST_HANDLE],
]);

export const gnttab_get_version = struct('gnttab_get_version', 8, [
  ['dom', domid_t],
  ['pad', u16],
  ['version', u32],
]);

export const gnttab_swap_grant_ref = struct('gnttab_swap_grant_ref', 12, [
  ['ref_a', grant_ref_t],
  ['ref_b', grant_ref_t],
  ['status', i16],
]);

export const GNTTAB_CACHE_CLEAN = 1 << 0;
export const GNTTAB_CACHE_INVAL = 1 << 1;
export const GNTTAB_CACHE_SOURCE_GREF = 0x80000000;

export const gnttab_cache_flush = struct('gnttab_cache_flush', 16, [
  ['a', union([
    ['dev_bus_addr', u64],
    ['ref', grant_ref_t],
  ])],
  ['offset', u16],
  ['length', u16],
  ['op', u32],
]);

export const _GNTMAP_device_map = 0;
export const GNTMAP_device_map = 1 << _GNTMAP_device_map;
export const _GNTMAP_host_map = 1;
export const GNTMAP_host_map = 1 << _GNTMAP_host_map;
export const _GNTMAP_readonly = 2;
export const GNTMAP_readonly = 1 << _GNTMAP_readonly;
export const _GNTMAP_application_map = 3;
export const GNTMAP_application_map = 1 << _GNTMAP_application_map;
export const _GNTMAP_contains_pte = 4;
export const GNTMAP_contains_pte = 1 << _GNTMAP_contains_pte;
export const _GNTMAP_guest_avail0 = 16;
export const GNTMAP_guest_avail_mask = 0xffff0000;

// Negative, carried in the int16_t status fields.
export const GNTST_okay = 0;
export const GNTST_general_error = -1;
export const GNTST_bad_domain = -2;
export const GNTST_bad_gntref = -3;
export const GNTST_bad_handle = -4;
export const GNTST_bad_virt_addr = -5;
export const GNTST_bad_dev_addr = -6;
export const GNTST_no_device_space = -7;
export const GNTST_permission_denied = -8;
export const GNTST_bad_page = -9;
export const GNTST_bad_copy_arg = -10;
export const GNTST_address_too_big = -11;
export const GNTST_eagain = -12;
export const GNTST_no_space = -13;

/** Indexed by -GNTST_*. */
export const GNTTABOP_error_msgs: readonly string[] = [
  'okay',
  'undefined error',
  'unrecognised domain id',
  'invalid grant reference',
  'invalid mapping handle',
  'invalid virtual address',
  'invalid device address',
  'no spare translation slot in the I/O MMU',
  'permission denied',
  'bad page',
  'copy arguments cross page boundary',
  'page address size too large',
  'operation not done; try again',
  'out of space',
];
