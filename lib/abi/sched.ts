// xen/sched.h: SCHEDOP_* of __HYPERVISOR_sched_op and the SHUTDOWN_* reasons.

import { i32, struct, u32, u64 } from './layout.js';
import { domid_t, XEN_GUEST_HANDLE } from './xen.js';

export const SCHEDOP_yield = 0;
export const SCHEDOP_block = 1;
export const SCHEDOP_shutdown = 2;
export const SCHEDOP_poll = 3;
export const SCHEDOP_remote_shutdown = 4;
export const SCHEDOP_shutdown_code = 5;
export const SCHEDOP_watchdog = 6;
export const SCHEDOP_pin_override = 7;

export const sched_shutdown = struct('sched_shutdown', 4, [
  ['reason', u32],
]);

export const sched_poll = struct('sched_poll', 24, [
  ['ports', XEN_GUEST_HANDLE],
  ['nr_ports', u32],
  ['timeout', u64],
]);

export const sched_remote_shutdown = struct('sched_remote_shutdown', 8, [
  ['domain_id', domid_t],
  ['reason', u32],
]);

export const sched_watchdog = struct('sched_watchdog', 8, [
  ['id', u32],
  ['timeout', u32],
]);

export const sched_pin_override = struct('sched_pin_override', 4, [
  ['pcpu', i32],
]);

export const SHUTDOWN_poweroff = 0;
export const SHUTDOWN_reboot = 1;
export const SHUTDOWN_suspend = 2;
export const SHUTDOWN_crash = 3;
export const SHUTDOWN_watchdog = 4;
export const SHUTDOWN_soft_reset = 5;
export const SHUTDOWN_MAX = 5;
