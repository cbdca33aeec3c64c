// Where the fields of blkif requests and responses sit under each `protocol`
// (blkif.h, native x86_64 and the i386 layout), as the fuzz harnesses lay
// them out and read them: their own reading of the header, apart from the
// driver's and the backend's.

import {
  blkif_request, blkif_request_discard, blkif_request_discard_x86_32, blkif_request_indirect, blkif_request_indirect_x86_32,
  blkif_request_x86_32, blkif_response, blkif_response_x86_32,
} from '../abi/blkif.js';
import { offsetOf, type Layout } from '../abi/layout.js';
import { XEN_IO_PROTO_ABI_X86_32, XEN_IO_PROTO_ABI_X86_64 } from '../abi/protocols.js';
import { __CONST_RING_SIZE, blkif_sring, blkif_sring_x86_32 } from '../abi/ring.js';
import { PAGE_SIZE } from '../hypervisor/page.js';

export type BlkWire = {
  protocol: string;
  entryBytes: number;
  ringSize: (order: number) => number;
  nrSegments: number; handle: number; id: number; sector: number; seg: number;
  discardFlag: number; discardId: number; discardSector: number; discardNrSectors: number;
  indOp: number; indNrSegments: number; indId: number; indSector: number; indHandle: number; indGrefs: number;
  rspId: number; rspOperation: number; rspStatus: number;
};

function wireOf(protocol: string, req: Layout, discard: Layout, ind: Layout, rsp: Layout, sring: Layout): BlkWire {
  return {
    protocol, entryBytes: req.size, ringSize: (order) => __CONST_RING_SIZE(sring, PAGE_SIZE << order),
    nrSegments: offsetOf(req, 'nr_segments'), handle: offsetOf(req, 'handle'), id: offsetOf(req, 'id'),
    sector: offsetOf(req, 'sector_number'), seg: offsetOf(req, 'seg'),
    discardFlag: offsetOf(discard, 'flag'), discardId: offsetOf(discard, 'id'), discardSector: offsetOf(discard, 'sector_number'),
    discardNrSectors: offsetOf(discard, 'nr_sectors'),
    indOp: offsetOf(ind, 'indirect_op'), indNrSegments: offsetOf(ind, 'nr_segments'), indId: offsetOf(ind, 'id'),
    indSector: offsetOf(ind, 'sector_number'), indHandle: offsetOf(ind, 'handle'), indGrefs: offsetOf(ind, 'indirect_grefs'),
    rspId: offsetOf(rsp, 'id'), rspOperation: offsetOf(rsp, 'operation'), rspStatus: offsetOf(rsp, 'status'),
  };
}

export const BLK_WIRES: ReadonlyMap<string, BlkWire> = new Map([
  [XEN_IO_PROTO_ABI_X86_64, wireOf(XEN_IO_PROTO_ABI_X86_64, blkif_request, blkif_request_discard, blkif_request_indirect, blkif_response, blkif_sring)],
  [XEN_IO_PROTO_ABI_X86_32, wireOf(XEN_IO_PROTO_ABI_X86_32, blkif_request_x86_32, blkif_request_discard_x86_32,
    blkif_request_indirect_x86_32, blkif_response_x86_32, blkif_sring_x86_32)],
]);

export function putU64(v: DataView, at: number, x: bigint): void {
  v.setUint32(at, Number(x & 0xffffffffn), true);
  v.setUint32(at + 4, Number((x >> 32n) & 0xffffffffn), true);
}

/** A u64 field as a Number: exact below 2^53, which every sector of these disks is. */
export function getU64(v: DataView, at: number): number {
  return v.getUint32(at, true) + v.getUint32(at + 4, true) * 0x1_0000_0000;
}
