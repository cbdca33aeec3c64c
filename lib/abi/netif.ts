// xen/io/netif.h: netfront/netback requests and responses, the extra-info
// slots, and the control ring. The shared rings are in ring.ts. Every member
// is at most 32 bits wide, so x86_32 and x86_64 lay these out the same.

import { array, i16, offsetOf, record, struct, u16, u32, u8, union } from './layout.js';
import { grant_ref_t } from './grant_table.js';

export const XEN_NETIF_NR_SLOTS_MIN = 18;

export const _XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 0;
export const XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV4;
export const _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1;
export const XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP;
export const _XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 2;
export const XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV6;
export const _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 3;
export const XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP;

export const XEN_NETIF_CTRL_HASH_ALGORITHM_NONE = 0;
export const XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ = 1;

export const XEN_NETIF_CTRL_TYPE_INVALID = 0;
export const XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS = 1;
export const XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS = 2;
export const XEN_NETIF_CTRL_TYPE_SET_HASH_KEY = 3;
export const XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE = 4;
export const XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE = 5;
export const XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING = 6;
export const XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM = 7;
export const XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE = 8;
export const XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING = 9;
export const XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING = 10;

export const xen_netif_ctrl_request = struct('xen_netif_ctrl_request', 16, [
  ['id', u16],
  ['type', u16],
  ['data', array(u32, 3)],
]);

export const XEN_NETIF_CTRL_STATUS_SUCCESS = 0;
export const XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED = 1;
export const XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER = 2;
export const XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW = 3;

export const xen_netif_ctrl_response = struct('xen_netif_ctrl_response', 12, [
  ['id', u16],
  ['type', u16],
  ['status', u32],
  ['data', u32],
]);

export const _XEN_NETIF_CTRLF_GREF_readonly = 0;
export const XEN_NETIF_CTRLF_GREF_readonly = 1 << _XEN_NETIF_CTRLF_GREF_readonly;

export const xen_netif_gref = struct('xen_netif_gref', 8, [
  ['ref', grant_ref_t],
  ['flags', u16],
  ['status', u16],
]);

export const _NETTXF_csum_blank = 0;
export const NETTXF_csum_blank = 1 << _NETTXF_csum_blank;
export const _NETTXF_data_validated = 1;
export const NETTXF_data_validated = 1 << _NETTXF_data_validated;
export const _NETTXF_more_data = 2;
export const NETTXF_more_data = 1 << _NETTXF_more_data;
export const _NETTXF_extra_info = 3;
export const NETTXF_extra_info = 1 << _NETTXF_extra_info;

export const XEN_NETIF_MAX_TX_SIZE = 0xffff;

export const netif_tx_request = struct('netif_tx_request', 12, [
  ['gref', grant_ref_t],
  ['offset', u16],
  ['flags', u16],
  ['id', u16],
  ['size', u16],
]);

export const XEN_NETIF_EXTRA_TYPE_NONE = 0;
export const XEN_NETIF_EXTRA_TYPE_GSO = 1;
export const XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2;
export const XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3;
export const XEN_NETIF_EXTRA_TYPE_HASH = 4;
export const XEN_NETIF_EXTRA_TYPE_MAX = 5;

export const _XEN_NETIF_EXTRA_FLAG_MORE = 0;
export const XEN_NETIF_EXTRA_FLAG_MORE = 1 << _XEN_NETIF_EXTRA_FLAG_MORE;

export const XEN_NETIF_GSO_TYPE_NONE = 0;
export const XEN_NETIF_GSO_TYPE_TCPV4 = 1;
export const XEN_NETIF_GSO_TYPE_TCPV6 = 2;

// Takes a tx request or an rx response slot, so it fits the smaller (8 bytes).
export const netif_extra_info = struct('netif_extra_info', 8, [
  ['type', u8],
  ['flags', u8],
  ['u', union([
    ['gso', record([
      ['size', u16],
      ['type', u8],
      ['pad', u8],
      ['features', u16],
    ])],
    ['mcast', record([
      ['addr', array(u8, 6)],
    ])],
    ['hash', record([
      ['type', u8],
      ['algorithm', u8],
      ['value', array(u8, 4)],
    ])],
    ['pad', array(u16, 3)],
  ])],
]);

export const netif_tx_response = struct('netif_tx_response', 4, [
  ['id', u16],
  ['status', i16],
]);

export const netif_rx_request = struct('netif_rx_request', 8, [
  ['id', u16],
  ['pad', u16],
  ['gref', grant_ref_t],
]);

export const _NETRXF_data_validated = 0;
export const NETRXF_data_validated = 1 << _NETRXF_data_validated;
export const _NETRXF_csum_blank = 1;
export const NETRXF_csum_blank = 1 << _NETRXF_csum_blank;
export const _NETRXF_more_data = 2;
export const NETRXF_more_data = 1 << _NETRXF_more_data;
export const _NETRXF_extra_info = 3;
export const NETRXF_extra_info = 1 << _NETRXF_extra_info;
export const _NETRXF_gso_prefix = 4;
export const NETRXF_gso_prefix = 1 << _NETRXF_gso_prefix;

export const netif_rx_response = struct('netif_rx_response', 8, [
  ['id', u16],
  ['offset', u16],
  ['flags', u16],
  ['status', i16],
]);

// Negative statuses travel in the int16_t status of the responses.
export const NETIF_RSP_DROPPED = -2;
export const NETIF_RSP_ERROR = -1;
export const NETIF_RSP_OKAY = 0;
export const NETIF_RSP_NULL = 1;

/**
 * Member offsets that both ends of the netif rings read and write on every
 * slot (xnf, netback and the harnesses that play either end), taken from the
 * layouts above: TXQ netif_tx_request, TXP netif_tx_response, RXQ
 * netif_rx_request, RXP netif_rx_response, EXT netif_extra_info.
 */
export const netifOffsets = Object.freeze({
  TXQ_GREF: offsetOf(netif_tx_request, 'gref'),
  TXQ_OFFSET: offsetOf(netif_tx_request, 'offset'),
  TXQ_FLAGS: offsetOf(netif_tx_request, 'flags'),
  TXQ_ID: offsetOf(netif_tx_request, 'id'),
  TXQ_SIZE: offsetOf(netif_tx_request, 'size'),
  TXP_ID: offsetOf(netif_tx_response, 'id'),
  TXP_STATUS: offsetOf(netif_tx_response, 'status'),
  RXQ_ID: offsetOf(netif_rx_request, 'id'),
  RXQ_GREF: offsetOf(netif_rx_request, 'gref'),
  RXP_ID: offsetOf(netif_rx_response, 'id'),
  RXP_OFFSET: offsetOf(netif_rx_response, 'offset'),
  RXP_FLAGS: offsetOf(netif_rx_response, 'flags'),
  RXP_STATUS: offsetOf(netif_rx_response, 'status'),
  EXT_TYPE: offsetOf(netif_extra_info, 'type'),
  EXT_FLAGS: offsetOf(netif_extra_info, 'flags'),
  EXT_GSO_SIZE: offsetOf(netif_extra_info, 'u.gso.size'),
  EXT_GSO_TYPE: offsetOf(netif_extra_info, 'u.gso.type'),
  EXT_MCAST_ADDR: offsetOf(netif_extra_info, 'u.mcast.addr'),
});
