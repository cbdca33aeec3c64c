// xen/event_channel.h: EVTCHNOP_* argument structs, the 2-level and FIFO ABIs.

import { array, record, struct, u32, u64, u8, union } from './layout.js';
import { domid_t } from './xen.js';

export const EVTCHNOP_bind_interdomain = 0;
export const EVTCHNOP_bind_virq = 1;
export const EVTCHNOP_bind_pirq = 2;
export const EVTCHNOP_close = 3;
export const EVTCHNOP_send = 4;
export const EVTCHNOP_status = 5;
export const EVTCHNOP_alloc_unbound = 6;
export const EVTCHNOP_bind_ipi = 7;
export const EVTCHNOP_bind_vcpu = 8;
export const EVTCHNOP_unmask = 9;
export const EVTCHNOP_reset = 10;
export const EVTCHNOP_init_control = 11;
export const EVTCHNOP_expand_array = 12;
export const EVTCHNOP_set_priority = 13;

export const evtchn_port_t = u32;

export const evtchn_alloc_unbound = struct('evtchn_alloc_unbound', 8, [
  ['dom', domid_t],
  ['remote_dom', domid_t],
  ['port', evtchn_port_t],
]);

export const evtchn_bind_interdomain = struct('evtchn_bind_interdomain', 12, [
  ['remote_dom', domid_t],
  ['remote_port', evtchn_port_t],
  ['local_port', evtchn_port_t],
]);

export const evtchn_bind_virq = struct('evtchn_bind_virq', 12, [
  ['virq', u32],
  ['vcpu', u32],
  ['port', evtchn_port_t],
]);

export const BIND_PIRQ__WILL_SHARE = 1;

export const evtchn_bind_pirq = struct('evtchn_bind_pirq', 12, [
  ['pirq', u32],
  ['flags', u32],
  ['port', evtchn_port_t],
]);

export const evtchn_bind_ipi = struct('evtchn_bind_ipi', 8, [
  ['vcpu', u32],
  ['port', evtchn_port_t],
]);

export const evtchn_close = struct('evtchn_close', 4, [
  ['port', evtchn_port_t],
]);

export const evtchn_send = struct('evtchn_send', 4, [
  ['port', evtchn_port_t],
]);

export const EVTCHNSTAT_closed = 0;
export const EVTCHNSTAT_unbound = 1;
export const EVTCHNSTAT_interdomain = 2;
export const EVTCHNSTAT_pirq = 3;
export const EVTCHNSTAT_virq = 4;
export const EVTCHNSTAT_ipi = 5;

export const evtchn_status = struct('evtchn_status', 24, [
  ['dom', domid_t],
  ['port', evtchn_port_t],
  ['status', u32],
  ['vcpu', u32],
  ['u', union([
    ['unbound', record([
      ['dom', domid_t],
    ])],
    ['interdomain', record([
      ['dom', domid_t],
      ['port', evtchn_port_t],
    ])],
    ['pirq', u32],
    ['virq', u32],
  ])],
]);

export const evtchn_bind_vcpu = struct('evtchn_bind_vcpu', 8, [
  ['port', evtchn_port_t],
  ['vcpu', u32],
]);

export const evtchn_unmask = struct('evtchn_unmask', 4, [
  ['port', evtchn_port_t],
]);

export const evtchn_reset = struct('evtchn_reset', 2, [
  ['dom', domid_t],
]);

export const evtchn_init_control = struct('evtchn_init_control', 24, [
  ['control_gfn', u64],
  ['offset', u32],
  ['vcpu', u32],
  ['link_bits', u8],
  ['_pad', array(u8, 7)],
]);

export const evtchn_expand_array = struct('evtchn_expand_array', 8, [
  ['array_gfn', u64],
]);

export const evtchn_set_priority = struct('evtchn_set_priority', 8, [
  ['port', evtchn_port_t],
  ['priority', u32],
]);

// The EVTCHNOP_* argument union of the compat hypercall (__HYPERVISOR_event_channel_op_compat).
export const evtchn_op = struct('evtchn_op', 28, [
  ['cmd', u32],
  ['u', union([
    ['alloc_unbound', evtchn_alloc_unbound],
    ['bind_interdomain', evtchn_bind_interdomain],
    ['bind_virq', evtchn_bind_virq],
    ['bind_pirq', evtchn_bind_pirq],
    ['bind_ipi', evtchn_bind_ipi],
    ['close', evtchn_close],
    ['send', evtchn_send],
    ['status', evtchn_status],
    ['bind_vcpu', evtchn_bind_vcpu],
    ['unmask', evtchn_unmask],
  ])],
]);

// sizeof(xen_ulong_t) * sizeof(xen_ulong_t) * 64: 1024 on x86_32.
export const EVTCHN_2L_NR_CHANNELS = 8 * 8 * 64;

export const EVTCHN_FIFO_PRIORITY_MAX = 0;
export const EVTCHN_FIFO_PRIORITY_DEFAULT = 7;
export const EVTCHN_FIFO_PRIORITY_MIN = 15;
export const EVTCHN_FIFO_MAX_QUEUES = EVTCHN_FIFO_PRIORITY_MIN + 1;

export const event_word_t = u32;

export const EVTCHN_FIFO_PENDING = 31;
export const EVTCHN_FIFO_MASKED = 30;
export const EVTCHN_FIFO_LINKED = 29;
export const EVTCHN_FIFO_BUSY = 28;
export const EVTCHN_FIFO_LINK_BITS = 17;
export const EVTCHN_FIFO_LINK_MASK = (1 << EVTCHN_FIFO_LINK_BITS) - 1;
export const EVTCHN_FIFO_NR_CHANNELS = 1 << EVTCHN_FIFO_LINK_BITS;

export const evtchn_fifo_control_block = struct('evtchn_fifo_control_block', 72, [
  ['ready', u32],
  ['_rsvd', u32],
  ['head', array(u32, EVTCHN_FIFO_MAX_QUEUES)],
]);
