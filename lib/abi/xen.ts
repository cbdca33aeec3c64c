// xen/xen.h with xen-compat.h, arch-x86/xen.h and arch-x86/xen-x86_64.h,
// x86_64 guest view at __XEN_INTERFACE_VERSION__ 0x00040e00.

import { array, i8, record, struct, u16, u32, u64, u8, union } from './layout.js';

// xen-compat.h
export const __XEN_LATEST_INTERFACE_VERSION__ = 0x00040e00;
export const __XEN_INTERFACE_VERSION__ = __XEN_LATEST_INTERFACE_VERSION__;

// arch-x86/xen-x86_64.h
export const FLAT_RING3_CS32 = 0xe023;
export const FLAT_RING3_CS64 = 0xe033;
export const FLAT_RING3_DS32 = 0xe02b;
export const FLAT_RING3_DS64 = 0x0000;
export const FLAT_RING3_SS32 = 0xe02b;
export const FLAT_RING3_SS64 = 0xe02b;
export const FLAT_KERNEL_DS64 = FLAT_RING3_DS64;
export const FLAT_KERNEL_DS32 = FLAT_RING3_DS32;
export const FLAT_KERNEL_DS = FLAT_KERNEL_DS64;
export const FLAT_KERNEL_CS64 = FLAT_RING3_CS64;
export const FLAT_KERNEL_CS32 = FLAT_RING3_CS32;
export const FLAT_KERNEL_CS = FLAT_KERNEL_CS64;
export const FLAT_KERNEL_SS64 = FLAT_RING3_SS64;
export const FLAT_KERNEL_SS32 = FLAT_RING3_SS32;
export const FLAT_KERNEL_SS = FLAT_KERNEL_SS64;
export const FLAT_USER_DS64 = FLAT_RING3_DS64;
export const FLAT_USER_DS32 = FLAT_RING3_DS32;
export const FLAT_USER_DS = FLAT_USER_DS64;
export const FLAT_USER_CS64 = FLAT_RING3_CS64;
export const FLAT_USER_CS32 = FLAT_RING3_CS32;
export const FLAT_USER_CS = FLAT_USER_CS64;
export const FLAT_USER_SS64 = FLAT_RING3_SS64;
export const FLAT_USER_SS32 = FLAT_RING3_SS32;
export const FLAT_USER_SS = FLAT_USER_SS64;
export const __HYPERVISOR_VIRT_START = 0xffff800000000000n;
export const __HYPERVISOR_VIRT_END = 0xffff880000000000n;
export const __MACH2PHYS_VIRT_START = 0xffff800000000000n;
export const __MACH2PHYS_VIRT_END = 0xffff804000000000n;
export const HYPERVISOR_VIRT_START = __HYPERVISOR_VIRT_START;
export const HYPERVISOR_VIRT_END = __HYPERVISOR_VIRT_END;
export const MACH2PHYS_VIRT_START = __MACH2PHYS_VIRT_START;
export const MACH2PHYS_VIRT_END = __MACH2PHYS_VIRT_END;
export const MACH2PHYS_NR_ENTRIES = Number((MACH2PHYS_VIRT_END - MACH2PHYS_VIRT_START) >> 3n);
export const SEGBASE_FS = 0;
export const SEGBASE_GS_USER = 1;
export const SEGBASE_GS_KERNEL = 2;
export const SEGBASE_GS_USER_SEL = 3;
export const _VGCF_in_syscall = 8;
export const VGCF_in_syscall = 1 << _VGCF_in_syscall;
export const VGCF_IN_SYSCALL = VGCF_in_syscall;

/** unsigned long and pointers: 8 bytes on x86_64. */
const unsigned_long = u64;

// Padded so that sizeof(vcpu_info) is 64 on both x86 ABIs.
export const arch_vcpu_info = struct('arch_vcpu_info', 16, [
  ['cr2', unsigned_long],
  ['pad', unsigned_long],
]);

// arch-x86/xen.h
export const xen_pfn_t = u64;
export const XEN_HAVE_PV_GUEST_ENTRY = 1;
export const XEN_HAVE_PV_UPCALL_MASK = 1;
export const FIRST_RESERVED_GDT_PAGE = 14;
export const FIRST_RESERVED_GDT_BYTE = FIRST_RESERVED_GDT_PAGE * 4096;
export const FIRST_RESERVED_GDT_ENTRY = FIRST_RESERVED_GDT_BYTE / 8;
export const XEN_LEGACY_MAX_VCPUS = 32;
export const xen_ulong_t = u64;
export const VGCF_I387_VALID = 1 << 0;
export const VGCF_IN_KERNEL = 1 << 2;
export const _VGCF_i387_valid = 0;
export const VGCF_i387_valid = 1 << _VGCF_i387_valid;
export const _VGCF_in_kernel = 2;
export const VGCF_in_kernel = 1 << _VGCF_in_kernel;
export const _VGCF_failsafe_disables_events = 3;
export const VGCF_failsafe_disables_events = 1 << _VGCF_failsafe_disables_events;
export const _VGCF_syscall_disables_events = 4;
export const VGCF_syscall_disables_events = 1 << _VGCF_syscall_disables_events;
export const _VGCF_online = 5;
export const VGCF_online = 1 << _VGCF_online;

export const arch_shared_info = struct('arch_shared_info', 48, [
  ['max_pfn', unsigned_long],
  ['pfn_to_mfn_frame_list_list', xen_pfn_t],
  ['nmi_reason', unsigned_long],
  ['p2m_cr3', unsigned_long],
  ['p2m_vaddr', unsigned_long],
  ['p2m_generation', unsigned_long],
]);

export const XEN_CPUID_NO_SUBLEAF = 0xffffffff;
export const XEN_HVM_DEBUGCONS_IOPORT = 0xe9;

// xen.h
/** XEN_GUEST_HANDLE(type): a struct holding one pointer. */
export const XEN_GUEST_HANDLE = u64;

export const __HYPERVISOR_set_trap_table = 0;
export const __HYPERVISOR_mmu_update = 1;
export const __HYPERVISOR_set_gdt = 2;
export const __HYPERVISOR_stack_switch = 3;
export const __HYPERVISOR_set_callbacks = 4;
export const __HYPERVISOR_fpu_taskswitch = 5;
export const __HYPERVISOR_sched_op_compat = 6;
export const __HYPERVISOR_platform_op = 7;
export const __HYPERVISOR_set_debugreg = 8;
export const __HYPERVISOR_get_debugreg = 9;
export const __HYPERVISOR_update_descriptor = 10;
export const __HYPERVISOR_memory_op = 12;
export const __HYPERVISOR_multicall = 13;
export const __HYPERVISOR_update_va_mapping = 14;
export const __HYPERVISOR_set_timer_op = 15;
export const __HYPERVISOR_event_channel_op_compat = 16;
export const __HYPERVISOR_xen_version = 17;
export const __HYPERVISOR_console_io = 18;
export const __HYPERVISOR_physdev_op_compat = 19;
export const __HYPERVISOR_grant_table_op = 20;
export const __HYPERVISOR_vm_assist = 21;
export const __HYPERVISOR_update_va_mapping_otherdomain = 22;
export const __HYPERVISOR_iret = 23;
export const __HYPERVISOR_vcpu_op = 24;
export const __HYPERVISOR_set_segment_base = 25;
export const __HYPERVISOR_mmuext_op = 26;
export const __HYPERVISOR_xsm_op = 27;
export const __HYPERVISOR_nmi_op = 28;
export const __HYPERVISOR_sched_op = 29;
export const __HYPERVISOR_callback_op = 30;
export const __HYPERVISOR_xenoprof_op = 31;
export const __HYPERVISOR_event_channel_op = 32;
export const __HYPERVISOR_physdev_op = 33;
export const __HYPERVISOR_hvm_op = 34;
export const __HYPERVISOR_sysctl = 35;
export const __HYPERVISOR_domctl = 36;
export const __HYPERVISOR_kexec_op = 37;
export const __HYPERVISOR_tmem_op = 38;
export const __HYPERVISOR_argo_op = 39;
export const __HYPERVISOR_xenpmu_op = 40;
export const __HYPERVISOR_dm_op = 41;
export const __HYPERVISOR_hypfs_op = 42;
export const __HYPERVISOR_arch_0 = 48;
export const __HYPERVISOR_arch_1 = 49;
export const __HYPERVISOR_arch_2 = 50;
export const __HYPERVISOR_arch_3 = 51;
export const __HYPERVISOR_arch_4 = 52;
export const __HYPERVISOR_arch_5 = 53;
export const __HYPERVISOR_arch_6 = 54;
export const __HYPERVISOR_arch_7 = 55;

export const VIRQ_TIMER = 0;
export const VIRQ_DEBUG = 1;
export const VIRQ_CONSOLE = 2;
export const VIRQ_DOM_EXC = 3;
export const VIRQ_TBUF = 4;
export const VIRQ_DEBUGGER = 6;
export const VIRQ_XENOPROF = 7;
export const VIRQ_CON_RING = 8;
export const VIRQ_PCPU_STATE = 9;
export const VIRQ_MEM_EVENT = 10;
export const VIRQ_ARGO = 11;
export const VIRQ_ENOMEM = 12;
export const VIRQ_XENPMU = 13;
export const VIRQ_ARCH_0 = 16;
export const VIRQ_ARCH_1 = 17;
export const VIRQ_ARCH_2 = 18;
export const VIRQ_ARCH_3 = 19;
export const VIRQ_ARCH_4 = 20;
export const VIRQ_ARCH_5 = 21;
export const VIRQ_ARCH_6 = 22;
export const VIRQ_ARCH_7 = 23;
export const NR_VIRQS = 24;

export const MMU_NORMAL_PT_UPDATE = 0;
export const MMU_MACHPHYS_UPDATE = 1;
export const MMU_PT_UPDATE_PRESERVE_AD = 2;
export const MMU_PT_UPDATE_NO_TRANSLATE = 3;

export const MMUEXT_PIN_L1_TABLE = 0;
export const MMUEXT_PIN_L2_TABLE = 1;
export const MMUEXT_PIN_L3_TABLE = 2;
export const MMUEXT_PIN_L4_TABLE = 3;
export const MMUEXT_UNPIN_TABLE = 4;
export const MMUEXT_NEW_BASEPTR = 5;
export const MMUEXT_TLB_FLUSH_LOCAL = 6;
export const MMUEXT_INVLPG_LOCAL = 7;
export const MMUEXT_TLB_FLUSH_MULTI = 8;
export const MMUEXT_INVLPG_MULTI = 9;
export const MMUEXT_TLB_FLUSH_ALL = 10;
export const MMUEXT_INVLPG_ALL = 11;
export const MMUEXT_FLUSH_CACHE = 12;
export const MMUEXT_SET_LDT = 13;
export const MMUEXT_NEW_USER_BASEPTR = 15;
export const MMUEXT_CLEAR_PAGE = 16;
export const MMUEXT_COPY_PAGE = 17;
export const MMUEXT_FLUSH_CACHE_GLOBAL = 18;
export const MMUEXT_MARK_SUPER = 19;
export const MMUEXT_UNMARK_SUPER = 20;

export const mmuext_op = struct('mmuext_op', 24, [
  ['cmd', u32],
  ['arg1', union([
    ['mfn', xen_pfn_t],
    ['linear_addr', unsigned_long],
  ])],
  ['arg2', union([
    ['nr_ents', u32],
    ['vcpumask', XEN_GUEST_HANDLE],
    ['src_mfn', xen_pfn_t],
  ])],
]);

// Typed unsigned long in C (xen_mk_ulong).
export const UVMF_NONE = 0n << 0n;
export const UVMF_TLB_FLUSH = 1n << 0n;
export const UVMF_INVLPG = 2n << 0n;
export const UVMF_FLUSHTYPE_MASK = 3n << 0n;
export const UVMF_MULTI = 0n << 2n;
export const UVMF_LOCAL = 0n << 2n;
export const UVMF_ALL = 1n << 2n;

export const CONSOLEIO_write = 0;
export const CONSOLEIO_read = 1;

export const VMASST_CMD_enable = 0;
export const VMASST_CMD_disable = 1;
export const VMASST_TYPE_4gb_segments = 0;
export const VMASST_TYPE_4gb_segments_notify = 1;
export const VMASST_TYPE_writable_pagetables = 2;
export const VMASST_TYPE_pae_extended_cr3 = 3;
export const VMASST_TYPE_architectural_iopl = 4;
export const VMASST_TYPE_runstate_update_flag = 5;
export const VMASST_TYPE_m2p_strict = 32;

export const DOMID_FIRST_RESERVED = 0x7ff0;
export const DOMID_SELF = 0x7ff0;
export const DOMID_IO = 0x7ff1;
export const DOMID_XEN = 0x7ff2;
export const DOMID_COW = 0x7ff3;
export const DOMID_INVALID = 0x7ff4;
export const DOMID_IDLE = 0x7fff;
export const DOMID_MASK = 0x7fff;

export const domid_t = u16;

export const mmu_update = struct('mmu_update', 16, [
  ['ptr', u64],
  ['val', u64],
]);

export const multicall_entry = struct('multicall_entry', 64, [
  ['op', xen_ulong_t],
  ['result', xen_ulong_t],
  ['args', array(xen_ulong_t, 6)],
]);

export const vcpu_time_info = struct('vcpu_time_info', 32, [
  ['version', u32],
  ['pad0', u32],
  ['tsc_timestamp', u64],
  ['system_time', u64],
  ['tsc_to_system_mul', u32],
  ['tsc_shift', i8],
  ['flags', u8],
  ['pad1', array(u8, 2)],
]);

export const XEN_PVCLOCK_TSC_STABLE_BIT = 1 << 0;
export const XEN_PVCLOCK_GUEST_STOPPED = 1 << 1;

export const vcpu_info = struct('vcpu_info', 64, [
  ['evtchn_upcall_pending', u8],
  ['evtchn_upcall_mask', u8],
  ['evtchn_pending_sel', xen_ulong_t],
  ['arch', arch_vcpu_info],
  ['time', vcpu_time_info],
]);

// evtchn_pending/evtchn_mask hold sizeof(xen_ulong_t) * 8 words: 4096 ports.
export const shared_info = struct('shared_info', 3136, [
  ['vcpu_info', array(vcpu_info, XEN_LEGACY_MAX_VCPUS)],
  ['evtchn_pending', array(xen_ulong_t, 64)],
  ['evtchn_mask', array(xen_ulong_t, 64)],
  ['wc_version', u32],
  ['wc_sec', u32],
  ['wc_nsec', u32],
  ['wc_sec_hi', u32],
  ['arch', arch_shared_info],
]);

export const MAX_GUEST_CMDLINE = 1024;

export const start_info = struct('start_info', 1168, [
  ['magic', array(u8, 32)],
  ['nr_pages', unsigned_long],
  ['shared_info', unsigned_long],
  ['flags', u32],
  ['store_mfn', xen_pfn_t],
  ['store_evtchn', u32],
  ['console', union([
    ['domU', record([
      ['mfn', xen_pfn_t],
      ['evtchn', u32],
    ])],
    ['dom0', record([
      ['info_off', u32],
      ['info_size', u32],
    ])],
  ])],
  ['pt_base', unsigned_long],
  ['nr_pt_frames', unsigned_long],
  ['mfn_list', unsigned_long],
  ['mod_start', unsigned_long],
  ['mod_len', unsigned_long],
  ['cmd_line', array(i8, MAX_GUEST_CMDLINE)],
  ['first_p2m_pfn', unsigned_long],
  ['nr_p2m_frames', unsigned_long],
]);

export const SIF_PRIVILEGED = 1 << 0;
export const SIF_INITDOMAIN = 1 << 1;
export const SIF_MULTIBOOT_MOD = 1 << 2;
export const SIF_MOD_START_PFN = 1 << 3;
export const SIF_VIRT_P2M_4TOOLS = 1 << 4;
export const SIF_PM_MASK = 0xff << 8;

export const xen_multiboot_mod_list = struct('xen_multiboot_mod_list', 16, [
  ['mod_start', u32],
  ['mod_end', u32],
  ['cmdline', u32],
  ['pad', u32],
]);

export const XEN_VGATYPE_TEXT_MODE_3 = 0x03;
export const XEN_VGATYPE_VESA_LFB = 0x23;
export const XEN_VGATYPE_EFI_LFB = 0x70;

export const dom0_vga_console_info = struct('dom0_vga_console_info', 40, [
  ['video_type', u8],
  ['u', union([
    ['text_mode_3', record([
      ['font_height', u16],
      ['cursor_x', u16],
      ['cursor_y', u16],
      ['rows', u16],
      ['columns', u16],
    ])],
    ['vesa_lfb', record([
      ['width', u16],
      ['height', u16],
      ['bytes_per_line', u16],
      ['bits_per_pixel', u16],
      ['lfb_base', u32],
      ['lfb_size', u32],
      ['red_pos', u8],
      ['red_size', u8],
      ['green_pos', u8],
      ['green_size', u8],
      ['blue_pos', u8],
      ['blue_size', u8],
      ['rsvd_pos', u8],
      ['rsvd_size', u8],
      ['gbl_caps', u32],
      ['mode_attrs', u16],
      ['pad', u16],
      ['ext_lfb_base', u32],
    ])],
  ])],
]);
