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
  readonly fields: Readonly<Record<string, Field>>;
  readonly kind: 'struct' | 'union';
  /** The C tag; the key differs from it only by the `_x86_32` suffix. */
  readonly tag: string;
  readonly arch: Arch;
  /** The lib/abi file (named after the header) that exports it. */
  readonly header: string;
};

/** Modules in include order, keyed by file name. */
const headers: Readonly<Record<string, Readonly<Record<string, unknown>>>> = {
  xen, event_channel, grant_table, memory, hvm, sched, vcpu, version, features,
  errno, ring, netif, blkif, xs_wire, xenbus, console, protocols,
};

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
  for (const [header, mod] of Object.entries(headers)) {
    for (const [name, value] of Object.entries(mod)) {
      // Layout aliases (domid_t = u16) are shared objects; only named values must be unique.
      if (isLayout(value) && value.c === undefined) continue;
      if (seen.has(name)) throw new Error(`abi: ${name} is exported by two header files`);
      seen.add(name);
      if (typeof value === 'number' || typeof value === 'bigint') {
        constants[name] = value;
      } else if (typeof value === 'string') {
        strings[name] = value;
      } else if (isLayout(value) && value.c !== undefined) {
        const { kind, tag } = value.c;
        structs[name] = { size: value.size, fields: value.fields, kind, tag, arch: archOf(name, tag), header };
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
