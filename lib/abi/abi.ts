// The registry of lib/abi: every named layout and every numeric constant of
// the header files, keyed by their C names, built from the files' exports so
// that there is one source of truth. The conformance test compiles it against
// Xen's headers; code that touches the wire imports the header files directly.

import type { Field, Layout } from './layout.js';
import * as xen from './xen.js';
import * as event_channel from './event_channel.js';
import * as grant_table from './grant_table.js';
import * as memory from './memory.js';
import * as hvm from './hvm.js';
import * as sched from './sched.js';
import * as vcpu from './vcpu.js';
import * as version from './version.js';
import * as features from './features.js';
import * as errno from './errno.js';
import * as ring from './ring.js';
import * as netif from './netif.js';
import * as blkif from './blkif.js';
import * as xs_wire from './xs_wire.js';
import * as xenbus from './xenbus.js';
import * as console from './console.js';
import * as protocols from './protocols.js';

export type Arch = 'x86_64' | 'x86_32';

export type StructEntry = {
  readonly size: number;
  readonly align: number;
  readonly fields: Readonly<Record<string, Field>>;
  readonly kind: 'struct' | 'union';
  /** The C tag; the key differs from it only by the `_x86_32` suffix. */
  readonly tag: string;
  readonly arch: Arch;
  /** The lib/abi file that exports it, named after the C header. */
  readonly file: string;
};

/** Each file of lib/abi, the C headers it mirrors, and its exports. */
const files: readonly {
  readonly file: string;
  readonly include: readonly string[];
  readonly exports: Readonly<Record<string, unknown>>;
}[] = [
  { file: 'xen', include: ['xen/xen.h'], exports: xen },
  { file: 'event_channel', include: ['xen/event_channel.h'], exports: event_channel },
  { file: 'grant_table', include: ['xen/grant_table.h'], exports: grant_table },
  { file: 'memory', include: ['xen/memory.h'], exports: memory },
  { file: 'hvm', include: ['xen/hvm/hvm_op.h', 'xen/hvm/params.h'], exports: hvm },
  { file: 'sched', include: ['xen/sched.h'], exports: sched },
  { file: 'vcpu', include: ['xen/vcpu.h'], exports: vcpu },
  { file: 'version', include: ['xen/version.h'], exports: version },
  { file: 'features', include: ['xen/features.h'], exports: features },
  { file: 'errno', include: ['xen/errno.h'], exports: errno },
  { file: 'ring', include: ['xen/io/ring.h'], exports: ring },
  { file: 'netif', include: ['xen/io/netif.h'], exports: netif },
  { file: 'blkif', include: ['xen/io/blkif.h'], exports: blkif },
  { file: 'xs_wire', include: ['xen/io/xs_wire.h'], exports: xs_wire },
  { file: 'xenbus', include: ['xen/io/xenbus.h'], exports: xenbus },
  { file: 'console', include: ['xen/io/console.h'], exports: console },
  { file: 'protocols', include: ['xen/io/protocols.h'], exports: protocols },
];

/** The C headers behind lib/abi, as `#include <...>` paths (Debian: libxen-dev). */
export const includes: readonly string[] = Object.freeze(files.flatMap((f) => f.include));

const X86_32_SUFFIX = '_x86_32';

function isLayout(value: unknown): value is Layout {
  return typeof value === 'object' && value !== null && 'size' in value && 'fields' in value;
}

function archOf(name: string, tag: string): Arch {
  if (name === tag) return 'x86_64';
  if (name === tag + X86_32_SUFFIX) return 'x86_32';
  throw new Error(`abi: export ${name} lays out C tag ${tag}`);
}

function build(): {
  structs: Record<string, StructEntry>;
  constants: Record<string, number | bigint>;
  strings: Record<string, string>;
} {
  const structs: Record<string, StructEntry> = {};
  const constants: Record<string, number | bigint> = {};
  const strings: Record<string, string> = {};
  const seen = new Set<string>();
  for (const { file, exports } of files) {
    for (const [name, value] of Object.entries(exports)) {
      // Type aliases (domid_t = u16) and sring_header have no C tag and are not registered.
      if (isLayout(value) && value.c === undefined) continue;
      if (seen.has(name)) throw new Error(`abi: ${name} is exported by two header files`);
      seen.add(name);
      if (typeof value === 'number' || typeof value === 'bigint') {
        constants[name] = value;
      } else if (typeof value === 'string') {
        strings[name] = value;
      } else if (isLayout(value) && value.c !== undefined) {
        const { kind, tag } = value.c;
        const arch = archOf(name, tag);
        structs[name] = { size: value.size, align: value.align, fields: value.fields, kind, tag, arch, file };
      }
    }
  }
  return { structs, constants, strings };
}

const registry = build();

/** Named structs and unions by C tag (x86_32 layouts as `<tag>_x86_32`). */
export const structs: Readonly<Record<string, StructEntry>> = Object.freeze(registry.structs);

/** Macro and enumerator values by C name. */
export const constants: Readonly<Record<string, number | bigint>> = Object.freeze(registry.constants);

/** String macros (XEN_IO_PROTO_ABI_*, XS_WRITE_*) by C name. */
export const strings: Readonly<Record<string, string>> = Object.freeze(registry.strings);
