// xen/hvm/hvm_op.h (HVMOP_* of __HYPERVISOR_hvm_op) and xen/hvm/params.h
// (HVM_PARAM_*), which includes it. The altp2m structs are left out.

import { array, struct, u16, u32, u64, u8 } from './layout.js';
import { domid_t } from './xen.js';

// hvm/hvm_op.h
export const HVMOP_set_param = 0;
export const HVMOP_get_param = 1;

export const xen_hvm_param = struct('xen_hvm_param', 16, [
  ['domid', domid_t],
  ['pad', u16],
  ['index', u32],
  ['value', u64],
]);

export const HVMOP_flush_tlbs = 5;

// enum hvmmem_type_t
export const HVMMEM_ram_rw = 0;
export const HVMMEM_ram_ro = 1;
export const HVMMEM_mmio_dm = 2;
export const HVMMEM_unused = 3;
export const HVMMEM_ioreq_server = 4;

export const HVMOP_pagetable_dying = 9;

export const xen_hvm_pagetable_dying = struct('xen_hvm_pagetable_dying', 16, [
  ['domid', domid_t],
  ['pad', array(u16, 3)],
  ['gpa', u64],
]);

export const HVMOP_get_time = 10;

export const xen_hvm_get_time = struct('xen_hvm_get_time', 8, [
  ['now', u64],
]);

export const HVMOP_xentrace = 11;

// extra is TRACE_EXTRA_MAX (7, trace.h) 32-bit words.
export const xen_hvm_xentrace = struct('xen_hvm_xentrace', 32, [
  ['event', u16],
  ['extra_bytes', u16],
  ['extra', array(u8, 7 * 4)],
]);

export const HVMOP_get_mem_type = 15;

export const xen_hvm_get_mem_type = struct('xen_hvm_get_mem_type', 16, [
  ['domid', domid_t],
  ['mem_type', u16],
  ['pad', array(u16, 2)],
  ['pfn', u64],
]);

export const HVMOP_set_evtchn_upcall_vector = 23;

export const xen_hvm_evtchn_upcall_vector = struct('xen_hvm_evtchn_upcall_vector', 8, [
  ['vcpu', u32],
  ['vector', u8],
]);

export const HVMOP_guest_request_vm_event = 24;
export const HVMOP_altp2m = 25;
export const HVMOP_ALTP2M_INTERFACE_VERSION = 0x00000001;

// hvm/params.h
export const HVM_PARAM_CALLBACK_IRQ = 0;
// The value of HVM_PARAM_CALLBACK_IRQ carries its type in bits 63:56.
export const HVM_PARAM_CALLBACK_IRQ_TYPE_MASK = 0xff00000000000000n;
export const HVM_PARAM_CALLBACK_TYPE_GSI = 0;
export const HVM_PARAM_CALLBACK_TYPE_PCI_INTX = 1;
export const HVM_PARAM_CALLBACK_TYPE_VECTOR = 2;

export const HVM_PARAM_STORE_PFN = 1;
export const HVM_PARAM_STORE_EVTCHN = 2;
export const HVM_PARAM_IOREQ_PFN = 5;
export const HVM_PARAM_BUFIOREQ_PFN = 6;

export const HVM_PARAM_VIRIDIAN = 9;
export const _HVMPV_base_freq = 0;
export const HVMPV_base_freq = 1 << _HVMPV_base_freq;
export const _HVMPV_no_freq = 1;
export const HVMPV_no_freq = 1 << _HVMPV_no_freq;
export const _HVMPV_time_ref_count = 2;
export const HVMPV_time_ref_count = 1 << _HVMPV_time_ref_count;
export const _HVMPV_reference_tsc = 3;
export const HVMPV_reference_tsc = 1 << _HVMPV_reference_tsc;
export const _HVMPV_hcall_remote_tlb_flush = 4;
export const HVMPV_hcall_remote_tlb_flush = 1 << _HVMPV_hcall_remote_tlb_flush;
export const _HVMPV_apic_assist = 5;
export const HVMPV_apic_assist = 1 << _HVMPV_apic_assist;
export const _HVMPV_crash_ctl = 6;
export const HVMPV_crash_ctl = 1 << _HVMPV_crash_ctl;
export const _HVMPV_synic = 7;
export const HVMPV_synic = 1 << _HVMPV_synic;
export const _HVMPV_stimer = 8;
export const HVMPV_stimer = 1 << _HVMPV_stimer;
export const _HVMPV_hcall_ipi = 9;
export const HVMPV_hcall_ipi = 1 << _HVMPV_hcall_ipi;
export const _HVMPV_ex_processor_masks = 10;
export const HVMPV_ex_processor_masks = 1 << _HVMPV_ex_processor_masks;
export const _HVMPV_no_vp_limit = 11;
export const HVMPV_no_vp_limit = 1 << _HVMPV_no_vp_limit;
export const _HVMPV_cpu_hotplug = 12;
export const HVMPV_cpu_hotplug = 1 << _HVMPV_cpu_hotplug;
export const HVMPV_feature_mask =
  HVMPV_base_freq |
  HVMPV_no_freq |
  HVMPV_time_ref_count |
  HVMPV_reference_tsc |
  HVMPV_hcall_remote_tlb_flush |
  HVMPV_apic_assist |
  HVMPV_crash_ctl |
  HVMPV_synic |
  HVMPV_stimer |
  HVMPV_hcall_ipi |
  HVMPV_ex_processor_masks |
  HVMPV_no_vp_limit |
  HVMPV_cpu_hotplug;

export const HVM_PARAM_TIMER_MODE = 10;
export const HVMPTM_delay_for_missed_ticks = 0;
export const HVMPTM_no_delay_for_missed_ticks = 1;
export const HVMPTM_no_missed_ticks_pending = 2;
export const HVMPTM_one_missed_tick_pending = 3;

export const HVM_PARAM_HPET_ENABLED = 11;
export const HVM_PARAM_IDENT_PT = 12;
export const HVM_PARAM_ACPI_S_STATE = 14;
export const HVM_PARAM_VM86_TSS = 15;
export const HVM_PARAM_VPT_ALIGN = 16;
export const HVM_PARAM_CONSOLE_PFN = 17;
export const HVM_PARAM_CONSOLE_EVTCHN = 18;
export const HVM_PARAM_ACPI_IOPORTS_LOCATION = 19;
export const HVM_PARAM_PAGING_RING_PFN = 27;
export const HVM_PARAM_MONITOR_RING_PFN = 28;
export const HVM_PARAM_SHARING_RING_PFN = 29;
export const HVM_PARAM_TRIPLE_FAULT_REASON = 31;
export const HVM_PARAM_IOREQ_SERVER_PFN = 32;
export const HVM_PARAM_NR_IOREQ_SERVER_PAGES = 33;
export const HVM_PARAM_VM_GENERATION_ID_ADDR = 34;

export const HVM_PARAM_ALTP2M = 35;
export const XEN_ALTP2M_disabled = 0;
export const XEN_ALTP2M_mixed = 1;
export const XEN_ALTP2M_external = 2;
export const XEN_ALTP2M_limited = 3;

export const HVM_PARAM_X87_FIP_WIDTH = 36;
export const HVM_PARAM_VM86_TSS_SIZED = 37;

export const HVM_PARAM_MCA_CAP = 38;
export const XEN_HVM_MCA_CAP_LMCE = 1n << 0n;
export const XEN_HVM_MCA_CAP_MASK = XEN_HVM_MCA_CAP_LMCE;

export const HVM_NR_PARAMS = 39;
