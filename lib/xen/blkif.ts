// The blkif wire under each `protocol` a frontend may name (Linux
// blkif_common.h: the native x86_64 layout and the i386 one, whose u64
// fields are 4-byte aligned): where each field of a request and a response
// sits, one table for xbf and blkback. The fuzz harnesses keep their own
// reading of the header (lib/fuzz/blkwire.ts), apart from this one.

import {
  BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT, blkif_request, blkif_request_discard,
  blkif_request_discard_x86_32, blkif_request_indirect, blkif_request_indirect_x86_32, blkif_request_segment,
  blkif_request_x86_32, blkif_response, blkif_response_x86_32,
} from '../abi/blkif.js';
import { offsetOf, type Layout } from '../abi/layout.js';
import { XEN_IO_PROTO_ABI_X86_32, XEN_IO_PROTO_ABI_X86_64 } from '../abi/protocols.js';
import { blkif_sring, blkif_sring_entry, blkif_sring_entry_x86_32, blkif_sring_x86_32 } from '../abi/ring.js';
import type { RingType } from '../trace/trace.js';

export type BlkifWire = {
  protocol: string;
  /** What a trace decodes the slots as. */
  ringType: RingType;
  sring: Layout;
  /** sizeof(union blkif_sring_entry): one slot. */
  entryBytes: number;
  /** sizeof(blkif_response): what an answer takes of its slot. */
  rspBytes: number;
  /**
   * A request's fixed part and its first segment: all of a read or write of
   * one page and all of a discard, and enough of any request to know how
   * long it is (its operation and nr_segments).
   */
  reqHeadBytes: number;
  /** sizeof(blkif_request_discard), sizeof(blkif_request_indirect). */
  discardBytes: number;
  indBytes: number;
  reqNrSegments: number;
  reqHandle: number;
  reqId: number;
  reqSector: number;
  reqSeg: number;
  discardFlag: number;
  discardHandle: number;
  discardId: number;
  discardSector: number;
  discardNrSectors: number;
  indOp: number;
  indNrSegments: number;
  indId: number;
  indSector: number;
  indHandle: number;
  indGrefs: number;
  rspId: number;
  rspOperation: number;
  rspStatus: number;
};

function wireOf(
  protocol: string, ringType: RingType, req: Layout, discard: Layout, ind: Layout, rsp: Layout, sring: Layout, entry: Layout,
): BlkifWire {
  return {
    protocol, ringType, sring, entryBytes: entry.size, rspBytes: rsp.size,
    reqHeadBytes: offsetOf(req, 'seg') + blkif_request_segment.size, discardBytes: discard.size, indBytes: ind.size,
    reqNrSegments: offsetOf(req, 'nr_segments'), reqHandle: offsetOf(req, 'handle'), reqId: offsetOf(req, 'id'),
    reqSector: offsetOf(req, 'sector_number'), reqSeg: offsetOf(req, 'seg'),
    discardFlag: offsetOf(discard, 'flag'), discardHandle: offsetOf(discard, 'handle'), discardId: offsetOf(discard, 'id'),
    discardSector: offsetOf(discard, 'sector_number'), discardNrSectors: offsetOf(discard, 'nr_sectors'),
    indOp: offsetOf(ind, 'indirect_op'), indNrSegments: offsetOf(ind, 'nr_segments'), indId: offsetOf(ind, 'id'),
    indSector: offsetOf(ind, 'sector_number'), indHandle: offsetOf(ind, 'handle'), indGrefs: offsetOf(ind, 'indirect_grefs'),
    rspId: offsetOf(rsp, 'id'), rspOperation: offsetOf(rsp, 'operation'), rspStatus: offsetOf(rsp, 'status'),
  };
}

/** The layouts by the `protocol` string of the frontend's xenstore directory. */
export const BLKIF_WIRES: ReadonlyMap<string, BlkifWire> = new Map([
  [XEN_IO_PROTO_ABI_X86_64, wireOf(
    XEN_IO_PROTO_ABI_X86_64, 'blkif', blkif_request, blkif_request_discard, blkif_request_indirect, blkif_response,
    blkif_sring, blkif_sring_entry,
  )],
  [XEN_IO_PROTO_ABI_X86_32, wireOf(
    XEN_IO_PROTO_ABI_X86_32, 'blkif_x86_32', blkif_request_x86_32, blkif_request_discard_x86_32, blkif_request_indirect_x86_32,
    blkif_response_x86_32, blkif_sring_x86_32, blkif_sring_entry_x86_32,
  )],
]);

/**
 * How many bytes of the request whose head is in `req` its operation uses:
 * the segments it names (at most BLKIF_MAX_SEGMENTS_PER_REQUEST; more is a
 * malformed request, which needs none of them), or the whole indirect or
 * discard struct.
 */
export function requestBytes(w: BlkifWire, req: Uint8Array): number {
  const op = req[0]!;
  if (op === BLKIF_OP_INDIRECT) return w.indBytes;
  if (op === BLKIF_OP_DISCARD) return w.discardBytes;
  return w.reqSeg + Math.min(req[w.reqNrSegments]!, BLKIF_MAX_SEGMENTS_PER_REQUEST) * blkif_request_segment.size;
}

/** A u64 field read as a Number: sector numbers and counts are below 2^53 (larger fail the range checks). */
export function getU64(view: DataView, at: number): number {
  return view.getUint32(at, true) + view.getUint32(at + 4, true) * 0x1_0000_0000;
}

/** A u64 field written from a Number as two little-endian words (no BigInt on the data path). */
export function putU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, value >>> 0, true);
  view.setUint32(at + 4, Math.floor(value / 0x1_0000_0000), true);
}
