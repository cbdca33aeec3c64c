// Hypercalls return a negated Xen errno; callers turn it into an error code by name.

import * as errno from '../abi/errno.js';

const names = new Map<number, string>();
for (const [name, value] of Object.entries(errno)) {
  if (typeof value === 'number' && name.startsWith('XEN_E')) names.set(value, name.slice(4));
}

/** `ENOENT` for XEN_ENOENT's value; `EIO` for a number the header does not name. */
export function errnoName(value: number): string {
  return names.get(value) ?? 'EIO';
}
