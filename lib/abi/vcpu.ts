// xen/vcpu.h: VCPUOP_* of __HYPERVISOR_vcpu_op (runstate, timers, vcpu_info placement).

import { array, i32, struct, u32, u64, union } from './layout.js';
import { XEN_GUEST_HANDLE } from './xen.js';

export const VCPUOP_initialise = 0;
export const VCPUOP_up = 1;
export const VCPUOP_down = 2;
export const VCPUOP_is_up = 3;
export const VCPUOP_get_runstate_info = 4;

export const vcpu_runstate_info = struct('vcpu_runstate_info', 48, [
  ['state', i32],
  ['state_entry_time', u64],
  ['time', array(u64, 4)],
]);

// Set in state_entry_time while Xen updates the area.
export const XEN_RUNSTATE_UPDATE = 1n << 63n;

export const RUNSTATE_running = 0;
export const RUNSTATE_runnable = 1;
export const RUNSTATE_blocked = 2;
export const RUNSTATE_offline = 3;

export const VCPUOP_register_runstate_memory_area = 5;

export const vcpu_register_runstate_memory_area = struct('vcpu_register_runstate_memory_area', 8, [
  ['addr', union([
    ['h', XEN_GUEST_HANDLE],
    ['v', u64],
    ['p', u64],
  ])],
]);

export const VCPUOP_set_periodic_timer = 6;
export const VCPUOP_stop_periodic_timer = 7;

export const vcpu_set_periodic_timer = struct('vcpu_set_periodic_timer', 8, [
  ['period_ns', u64],
]);

export const VCPUOP_set_singleshot_timer = 8;
export const VCPUOP_stop_singleshot_timer = 9;

export const vcpu_set_singleshot_timer = struct('vcpu_set_singleshot_timer', 16, [
  ['timeout_abs_ns', u64],
  ['flags', u32],
]);

export const _VCPU_SSHOTTMR_future = 0;
export const VCPU_SSHOTTMR_future = 1 << _VCPU_SSHOTTMR_future;

export const VCPUOP_register_vcpu_info = 10;

export const vcpu_register_vcpu_info = struct('vcpu_register_vcpu_info', 16, [
  ['mfn', u64],
  ['offset', u32],
  ['rsvd', u32],
]);

export const VCPUOP_send_nmi = 11;
export const VCPUOP_get_physid = 12;

export const vcpu_get_physid = struct('vcpu_get_physid', 8, [
  ['phys_id', u64],
]);

export const VCPUOP_register_vcpu_time_memory_area = 13;

export const vcpu_register_time_memory_area = struct('vcpu_register_time_memory_area', 8, [
  ['addr', union([
    ['h', XEN_GUEST_HANDLE],
    ['v', u64],
    ['p', u64],
  ])],
]);
