// xen/io/console.h: the console page. Not a DEFINE_RING_TYPES ring: two byte
// rings whose sizes are powers of two, with their indices after them.

import { array, struct, u32, u8 } from './layout.js';

export const XENCONS_RING_IDX = u32;

export const xencons_interface = struct('xencons_interface', 3088, [
  ['in', array(u8, 1024)],
  ['out', array(u8, 2048)],
  ['in_cons', XENCONS_RING_IDX],
  ['in_prod', XENCONS_RING_IDX],
  ['out_cons', XENCONS_RING_IDX],
  ['out_prod', XENCONS_RING_IDX],
]);
