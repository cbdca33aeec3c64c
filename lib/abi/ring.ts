// xen/io/ring.h and the DEFINE_RING_TYPES() instances of io/netif.h and
// io/blkif.h. Only the shared page is here; the front/back ring structs of
// the header are private to each end (they hold a pointer to the page).

import { array, offsetOf, record, sizeOf, struct, u32, u8, union, unionOf } from './layout.js';
import type { Layout, Member } from './layout.js';
import {
  netif_rx_request, netif_rx_response, netif_tx_request, netif_tx_response,
  xen_netif_ctrl_request, xen_netif_ctrl_response,
} from './netif.js';
import {
  blkif_request, blkif_request_x86_32, blkif_response, blkif_response_x86_32,
} from './blkif.js';

export const RING_IDX = u32;

const sring_header_members: readonly Member[] = [
  ['req_prod', RING_IDX],
  ['req_event', RING_IDX],
  ['rsp_prod', RING_IDX],
  ['rsp_event', RING_IDX],
  ['pvt', union([
    ['netif', record([['smartpoll_active', u8]])],
    ['tapif_user', record([['msg', u8]])],
    ['pvt_pad', array(u8, 4)],
  ])],
  ['__pad', array(u8, 44)],
];

/**
 * The first 64 bytes of every struct *_sring; ring[] starts at 64. C gives
 * this part no name of its own.
 */
export const sring_header = record(sring_header_members);

/** struct name##_sring: the header, then ring[1] (sizeof counts one entry). */
function sring(tag: string, sizeBytes: number, entry: Layout): Layout {
  return struct(tag, sizeBytes, [...sring_header_members, ['ring', array(entry, 1)]]);
}

/**
 * __CONST_RING_SIZE(name, size): entries of a ring whose shared page is
 * sizeBytes long, rounded down to a power of two.
 */
export function __CONST_RING_SIZE(sringLayout: Layout, sizeBytes: number): number {
  const n = Math.floor((sizeBytes - offsetOf(sringLayout, 'ring')) / sizeOf(sringLayout, 'ring'));
  return n < 1 ? 0 : 2 ** (31 - Math.clz32(n));
}

export const XEN_PAGE_SHIFT = 12;

// io/netif.h: DEFINE_RING_TYPES(xen_netif_ctrl, ...)
export const xen_netif_ctrl_sring_entry = unionOf('xen_netif_ctrl_sring_entry', 16, [
  ['req', xen_netif_ctrl_request],
  ['rsp', xen_netif_ctrl_response],
]);
export const xen_netif_ctrl_sring = sring('xen_netif_ctrl_sring', 80, xen_netif_ctrl_sring_entry);

// io/netif.h: DEFINE_RING_TYPES(netif_tx, ...)
export const netif_tx_sring_entry = unionOf('netif_tx_sring_entry', 12, [
  ['req', netif_tx_request],
  ['rsp', netif_tx_response],
]);
export const netif_tx_sring = sring('netif_tx_sring', 76, netif_tx_sring_entry);

// io/netif.h: DEFINE_RING_TYPES(netif_rx, ...)
export const netif_rx_sring_entry = unionOf('netif_rx_sring_entry', 8, [
  ['req', netif_rx_request],
  ['rsp', netif_rx_response],
]);
export const netif_rx_sring = sring('netif_rx_sring', 72, netif_rx_sring_entry);

// io/blkif.h: DEFINE_RING_TYPES(blkif, ...)
export const blkif_sring_entry = unionOf('blkif_sring_entry', 112, [
  ['req', blkif_request],
  ['rsp', blkif_response],
]);
export const blkif_sring = sring('blkif_sring', 176, blkif_sring_entry);

// The blkif ring of an x86_32 frontend: 108-byte entries, still 32 of them.
export const blkif_sring_entry_x86_32 = unionOf('blkif_sring_entry', 108, [
  ['req', blkif_request_x86_32],
  ['rsp', blkif_response_x86_32],
]);
export const blkif_sring_x86_32 = sring('blkif_sring', 172, blkif_sring_entry_x86_32);
