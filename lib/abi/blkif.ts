// xen/io/blkif.h: blkfront/blkback requests and responses. The shared ring
// is in ring.ts. uint64_t is 4-byte aligned in the i386 ABI, so a 32-bit
// frontend (xenstore "protocol" = XEN_IO_PROTO_ABI_X86_32) lays requests out
// differently: those layouts are the *_x86_32 exports at the end.

import { array, i16, struct, u16, u64, u64_x86_32, u8 } from './layout.js';
import { grant_ref_t } from './grant_table.js';

export const blkif_vdev_t = u16;
export const blkif_sector_t = u64;

export const BLKIF_OP_READ = 0;
export const BLKIF_OP_WRITE = 1;
export const BLKIF_OP_WRITE_BARRIER = 2;
export const BLKIF_OP_FLUSH_DISKCACHE = 3;
export const BLKIF_OP_RESERVED_1 = 4;
export const BLKIF_OP_DISCARD = 5;
export const BLKIF_OP_INDIRECT = 6;

export const BLKIF_MAX_SEGMENTS_PER_REQUEST = 11;
export const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8;

export const blkif_request_segment = struct('blkif_request_segment', 8, [
  ['gref', grant_ref_t],
  ['first_sect', u8],
  ['last_sect', u8],
]);

export const blkif_request = struct('blkif_request', 112, [
  ['operation', u8],
  ['nr_segments', u8],
  ['handle', blkif_vdev_t],
  ['id', u64],
  ['sector_number', blkif_sector_t],
  ['seg', array(blkif_request_segment, BLKIF_MAX_SEGMENTS_PER_REQUEST)],
]);

export const BLKIF_DISCARD_SECURE = 1 << 0;

export const blkif_request_discard = struct('blkif_request_discard', 32, [
  ['operation', u8],
  ['flag', u8],
  ['handle', blkif_vdev_t],
  ['id', u64],
  ['sector_number', blkif_sector_t],
  ['nr_sectors', u64],
]);

export const blkif_request_indirect = struct('blkif_request_indirect', 64, [
  ['operation', u8],
  ['indirect_op', u8],
  ['nr_segments', u16],
  ['id', u64],
  ['sector_number', blkif_sector_t],
  ['handle', blkif_vdev_t],
  ['indirect_grefs', array(grant_ref_t, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)],
]);

export const blkif_response = struct('blkif_response', 16, [
  ['id', u64],
  ['operation', u8],
  ['status', i16],
]);

export const BLKIF_RSP_EOPNOTSUPP = -2;
export const BLKIF_RSP_ERROR = -1;
export const BLKIF_RSP_OKAY = 0;

export const VDISK_CDROM = 0x1;
export const VDISK_REMOVABLE = 0x2;
export const VDISK_READONLY = 0x4;

// The same structs as an i386 compiler lays them out (gcc -m32).
export const blkif_request_x86_32 = struct('blkif_request', 108, [
  ['operation', u8],
  ['nr_segments', u8],
  ['handle', blkif_vdev_t],
  ['id', u64_x86_32],
  ['sector_number', u64_x86_32],
  ['seg', array(blkif_request_segment, BLKIF_MAX_SEGMENTS_PER_REQUEST)],
]);

export const blkif_request_discard_x86_32 = struct('blkif_request_discard', 28, [
  ['operation', u8],
  ['flag', u8],
  ['handle', blkif_vdev_t],
  ['id', u64_x86_32],
  ['sector_number', u64_x86_32],
  ['nr_sectors', u64_x86_32],
]);

// The header adds pad under __i386__ so that the size stays 64.
export const blkif_request_indirect_x86_32 = struct('blkif_request_indirect', 64, [
  ['operation', u8],
  ['indirect_op', u8],
  ['nr_segments', u16],
  ['id', u64_x86_32],
  ['sector_number', u64_x86_32],
  ['handle', blkif_vdev_t],
  ['indirect_grefs', array(grant_ref_t, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)],
  ['pad', u64_x86_32],
]);

export const blkif_response_x86_32 = struct('blkif_response', 12, [
  ['id', u64_x86_32],
  ['operation', u8],
  ['status', i16],
]);
