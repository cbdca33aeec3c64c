// C struct layout for the Xen public headers: members are listed in C order
// with their types, offsets are derived by C's alignment rules, and the total
// size the header has is asserted at load, so a wrong member fails at import.

export type Field = { readonly offset: number; readonly size: number };

/** What C calls a named layout: `struct tag` or `union tag`. */
export type CType = { readonly kind: 'struct' | 'union'; readonly tag: string };

export type Layout = {
  readonly size: number;
  readonly align: number;
  readonly fields: Readonly<Record<string, Field>>;
  /** Set by struct() and unionOf(); absent on scalars, arrays and anonymous bodies. */
  readonly c?: CType;
};

export type Member = readonly [name: string, type: Layout];

function scalar(sizeBytes: number, align = sizeBytes): Layout {
  return { size: sizeBytes, align, fields: {} };
}

export const u8 = scalar(1);
export const u16 = scalar(2);
export const u32 = scalar(4);
export const u64 = scalar(8);
/** uint64_t inside an i386 struct: 8 bytes, 4-byte aligned. */
export const u64_x86_32 = scalar(8, 4);
export const i8 = u8;
export const i16 = u16;
export const i32 = u32;
export const i64 = u64;

function alignUp(value: number, align: number): number {
  return Math.ceil(value / align) * align;
}

/** T name[count]: one field of its whole size; element members are not listed. */
export function array(type: Layout, count: number): Layout {
  return { size: type.size * count, align: type.align, fields: {} };
}

function nest(into: Record<string, Field>, name: string, base: number, type: Layout): void {
  into[name] = { offset: base, size: type.size };
  for (const [sub, f] of Object.entries(type.fields)) {
    into[`${name}.${sub}`] = { offset: base + f.offset, size: f.size };
  }
}

/** An anonymous or nested struct body. */
export function record(members: readonly Member[]): Layout {
  const fields: Record<string, Field> = {};
  let offset = 0;
  let align = 1;
  for (const [name, type] of members) {
    offset = alignUp(offset, type.align);
    nest(fields, name, offset, type);
    offset += type.size;
    align = Math.max(align, type.align);
  }
  return { size: alignUp(offset, align), align, fields };
}

/** A union body: every member at offset 0. */
export function union(members: readonly Member[]): Layout {
  const fields: Record<string, Field> = {};
  let size = 0;
  let align = 1;
  for (const [name, type] of members) {
    nest(fields, name, 0, type);
    size = Math.max(size, type.size);
    align = Math.max(align, type.align);
  }
  return { size: alignUp(size, align), align, fields };
}

function checked(c: CType, sizeBytes: number, layout: Layout): Layout {
  if (layout.size !== sizeBytes) {
    throw new Error(`abi: ${c.tag} lays out to ${layout.size} bytes, the header says ${sizeBytes}`);
  }
  return Object.freeze({ ...layout, fields: Object.freeze({ ...layout.fields }), c: Object.freeze(c) });
}

/** A named struct whose size is checked against the header's sizeof. */
export function struct(tag: string, sizeBytes: number, members: readonly Member[]): Layout {
  return checked({ kind: 'struct', tag }, sizeBytes, record(members));
}

/** A named union whose size is checked against the header's sizeof. */
export function unionOf(tag: string, sizeBytes: number, members: readonly Member[]): Layout {
  return checked({ kind: 'union', tag }, sizeBytes, union(members));
}

/** The offset of a member; throws at load for a name the layout lacks. */
export function offsetOf(layout: Layout, name: string): number {
  const f = layout.fields[name];
  if (f === undefined) throw new Error(`abi: no member ${name}`);
  return f.offset;
}

/** The size of a member; throws at load for a name the layout lacks. */
export function sizeOf(layout: Layout, name: string): number {
  const f = layout.fields[name];
  if (f === undefined) throw new Error(`abi: no member ${name}`);
  return f.size;
}
