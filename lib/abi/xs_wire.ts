// xen/io/xs_wire.h: the xenstore message header, message types, error names
// and the shared page a domain talks to xenstored through.

import { array, struct, u32, u8 } from './layout.js';

// enum xsd_sockmsg_type
export const XS_CONTROL = 0;
export const XS_DEBUG = XS_CONTROL;
export const XS_DIRECTORY = 1;
export const XS_READ = 2;
export const XS_GET_PERMS = 3;
export const XS_WATCH = 4;
export const XS_UNWATCH = 5;
export const XS_TRANSACTION_START = 6;
export const XS_TRANSACTION_END = 7;
export const XS_INTRODUCE = 8;
export const XS_RELEASE = 9;
export const XS_GET_DOMAIN_PATH = 10;
export const XS_WRITE = 11;
export const XS_MKDIR = 12;
export const XS_RM = 13;
export const XS_SET_PERMS = 14;
export const XS_WATCH_EVENT = 15;
export const XS_ERROR = 16;
export const XS_IS_DOMAIN_INTRODUCED = 17;
export const XS_RESUME = 18;
export const XS_SET_TARGET = 19;
// 20 was XS_RESTRICT, removed.
export const XS_RESET_WATCHES = XS_SET_TARGET + 2;
export const XS_DIRECTORY_PART = 22;
export const XS_TYPE_COUNT = 23;
export const XS_INVALID = 0xffff;

export const XS_WRITE_NONE = 'NONE';
export const XS_WRITE_CREATE = 'CREATE';
export const XS_WRITE_CREATE_EXCL = 'CREATE|EXCL';

/**
 * XS_ERROR replies carry errstring; errnum is the host's errno (Linux
 * numbers, as the C table is built from <errno.h>). New entries go at the end.
 */
export const xsd_errors: readonly { readonly errnum: number; readonly errstring: string }[] = [
  { errnum: 22, errstring: 'EINVAL' },
  { errnum: 13, errstring: 'EACCES' },
  { errnum: 17, errstring: 'EEXIST' },
  { errnum: 21, errstring: 'EISDIR' },
  { errnum: 2, errstring: 'ENOENT' },
  { errnum: 12, errstring: 'ENOMEM' },
  { errnum: 28, errstring: 'ENOSPC' },
  { errnum: 5, errstring: 'EIO' },
  { errnum: 39, errstring: 'ENOTEMPTY' },
  { errnum: 38, errstring: 'ENOSYS' },
  { errnum: 30, errstring: 'EROFS' },
  { errnum: 16, errstring: 'EBUSY' },
  { errnum: 11, errstring: 'EAGAIN' },
  { errnum: 106, errstring: 'EISCONN' },
  { errnum: 7, errstring: 'E2BIG' },
  { errnum: 1, errstring: 'EPERM' },
];

export const xsd_sockmsg = struct('xsd_sockmsg', 16, [
  ['type', u32],
  ['req_id', u32],
  ['tx_id', u32],
  ['len', u32],
]);

// enum xs_watch_type: the fields of an XS_WATCH_EVENT payload.
export const XS_WATCH_PATH = 0;
export const XS_WATCH_TOKEN = 1;

export const XENSTORE_RING_SIZE = 1024;

export const XENSTORE_RING_IDX = u32;

export const xenstore_domain_interface = struct('xenstore_domain_interface', 2076, [
  ['req', array(u8, XENSTORE_RING_SIZE)],
  ['rsp', array(u8, XENSTORE_RING_SIZE)],
  ['req_cons', XENSTORE_RING_IDX],
  ['req_prod', XENSTORE_RING_IDX],
  ['rsp_cons', XENSTORE_RING_IDX],
  ['rsp_prod', XENSTORE_RING_IDX],
  ['server_features', u32],
  ['connection', u32],
  ['error', u32],
]);

export const XENSTORE_PAYLOAD_MAX = 4096;
export const XENSTORE_ABS_PATH_MAX = 3072;
export const XENSTORE_REL_PATH_MAX = 2048;

export const XENSTORE_SERVER_FEATURE_RECONNECTION = 1;
export const XENSTORE_SERVER_FEATURE_ERROR = 2;

export const XENSTORE_CONNECTED = 0;
export const XENSTORE_RECONNECT = 1;

export const XENSTORE_ERROR_NONE = 0;
export const XENSTORE_ERROR_COMM = 1;
export const XENSTORE_ERROR_RINGIDX = 2;
export const XENSTORE_ERROR_PROTO = 3;
