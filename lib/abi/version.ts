// xen/version.h: XENVER_* of __HYPERVISOR_xen_version.

import { array, struct, u32, u8 } from './layout.js';
import { xen_ulong_t } from './xen.js';

export const XENVER_version = 0;

export const XENVER_extraversion = 1;
export const XEN_EXTRAVERSION_LEN = 16;

export const XENVER_compile_info = 2;

export const xen_compile_info = struct('xen_compile_info', 144, [
  ['compiler', array(u8, 64)],
  ['compile_by', array(u8, 16)],
  ['compile_domain', array(u8, 32)],
  ['compile_date', array(u8, 32)],
]);

export const XENVER_capabilities = 3;
export const XEN_CAPABILITIES_INFO_LEN = 1024;

export const XENVER_changeset = 4;
export const XEN_CHANGESET_INFO_LEN = 64;

export const XENVER_platform_parameters = 5;

export const xen_platform_parameters = struct('xen_platform_parameters', 8, [
  ['virt_start', xen_ulong_t],
]);

export const XENVER_get_features = 6;

export const xen_feature_info = struct('xen_feature_info', 8, [
  ['submap_idx', u32],
  ['submap', u32],
]);

export const XENVER_pagesize = 7;
export const XENVER_guest_handle = 8;
export const XENVER_commandline = 9;
export const XENVER_build_id = 10;

// buf[] is a flexible array member that follows len.
export const xen_build_id = struct('xen_build_id', 4, [
  ['len', u32],
]);
