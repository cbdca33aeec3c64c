// lib/abi against Xen's public headers: generate a C program from the
// registry, compile it with gcc against /usr/include/xen, and compare every
// size, offset and constant. x86_64 layouts and constants are printed by the
// program; x86_32 layouts are read out of `gcc -m32 -S` assembly, so no
// 32-bit libc is needed.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { constants, includes, strings, structs } from '../../lib/abi/abi.js';
import type { Arch, StructEntry } from '../../lib/abi/abi.js';
import { GNTTABOP_error_msgs } from '../../lib/abi/grant_table.js';
import { __CONST_RING_SIZE } from '../../lib/abi/ring.js';
import { xsd_errors } from '../../lib/abi/xs_wire.js';

const XEN_H = '/usr/include/xen/xen.h';
const PAGE_BYTES = 4096;

function gccMissing(): string | undefined {
  const gcc = spawnSync('gcc', ['--version'], { encoding: 'utf8' });
  if (gcc.error !== undefined || gcc.status !== 0) return 'gcc is not installed';
  if (!existsSync(XEN_H)) return `${XEN_H} is missing (apt-get install libxen-dev)`;
  return undefined;
}

function entries(arch: Arch): [string, StructEntry][] {
  return Object.entries(structs).filter(([, s]) => s.arch === arch);
}

function ctype(s: StructEntry): string {
  return `${s.kind} ${s.tag}`;
}

/** The DEFINE_RING_TYPES name of a shared ring struct (`netif_tx` of netif_tx_sring). */
function ringName(s: StructEntry): string | undefined {
  return s.kind === 'struct' && s.tag.endsWith('_sring') ? s.tag.slice(0, -'_sring'.length) : undefined;
}

function prologue(freestanding: boolean): string[] {
  return [
    '#define __XEN_INTERFACE_VERSION__ 0x00040e00',
    '#include <stdint.h>',
    '#include <stddef.h>',
    // xs_wire.h compiles its xsd_errors[] table only when EINVAL is defined.
    ...(freestanding ? [] : ['#include <stdio.h>', '#include <errno.h>']),
    ...includes.map((h) => `#include <${h}>`),
  ];
}

/** x86_64: a program printing one tab-separated record per number. */
function source64(): string {
  const out = [
    ...prologue(false),
    'static void pc(const char *name, int neg, long long s, unsigned long long u) {',
    '  if (neg) printf("C\\t%s\\t%lld\\n", name, s); else printf("C\\t%s\\t%llu\\n", name, u);',
    '}',
    '#define PC(x) pc(#x, (x) < 0, (long long)(x), (unsigned long long)(x))',
    '#define PS(key, T) printf("S\\t%s\\t%zu\\n", key, sizeof(T))',
    '#define PF(key, T, m) printf("F\\t%s\\t%zu\\t%zu\\n", key, offsetof(T, m), sizeof(((T *)0)->m))',
    'static const char *const gnttab_msgs[] = GNTTABOP_error_msgs;',
    'int main(void) {',
  ];
  for (const [key, s] of entries('x86_64')) {
    out.push(`  PS("${key}", ${ctype(s)});`);
    for (const field of Object.keys(s.fields)) out.push(`  PF("${key}.${field}", ${ctype(s)}, ${field});`);
    const ring = ringName(s);
    if (ring !== undefined) out.push(`  printf("R\\t${key}\\t%zu\\n", (size_t)__CONST_RING_SIZE(${ring}, ${PAGE_BYTES}));`);
  }
  for (const name of Object.keys(constants)) out.push(`  PC(${name});`);
  for (const name of Object.keys(strings)) out.push(`  printf("T\\t${name}\\t%s\\n", ${name});`);
  out.push(
    '  for (size_t i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)',
    '    printf("E\\t%zu\\t%d\\t%s\\n", i, xsd_errors[i].errnum, xsd_errors[i].errstring);',
    '  for (size_t i = 0; i < sizeof(gnttab_msgs) / sizeof(gnttab_msgs[0]); i++)',
    '    printf("M\\t%zu\\t%s\\n", i, gnttab_msgs[i]);',
    '  return 0;',
    '}',
  );
  return out.join('\n') + '\n';
}

/** x86_32: one array of numbers, named by `keys` in the same order. */
function source32(): { text: string; keys: string[] } {
  const keys: string[] = [];
  const values: string[] = [];
  for (const [key, s] of entries('x86_32')) {
    keys.push(`S\t${key}`);
    values.push(`sizeof(${ctype(s)})`);
    for (const field of Object.keys(s.fields)) {
      keys.push(`F\t${key}.${field}`);
      values.push(`offsetof(${ctype(s)}, ${field})`, `sizeof(((${ctype(s)} *)0)->${field})`);
    }
    const ring = ringName(s);
    if (ring !== undefined) {
      keys.push(`R\t${key}`);
      values.push(`__CONST_RING_SIZE(${ring}, ${PAGE_BYTES})`);
    }
  }
  const text = [
    ...prologue(true),
    'const unsigned int abi32[] = {',
    `  ${values.length},`,
    ...values.map((v) => `  ${v},`),
    '};',
  ].join('\n') + '\n';
  return { text, keys };
}

/** The initialisers of `abi32` in gcc's assembly: .long N, or .zero N for runs of zeros. */
function parseAsm(asm: string): number[] {
  const lines = asm.split('\n');
  const start = lines.findIndex((l) => l.trim() === 'abi32:');
  if (start < 0) throw new Error('abi32: label not found in the assembly');
  const values: number[] = [];
  for (const line of lines.slice(start + 1)) {
    const m = /^\s*\.(long|zero)\s+(\d+)\s*$/.exec(line);
    if (m === null) break;
    const n = Number(m[2]);
    if (m[1] === 'long') values.push(n);
    else for (let i = 0; i < n / 4; i++) values.push(0);
  }
  return values;
}

type Measured = {
  sizes: Map<string, number>;
  fields: Map<string, { offset: number; size: number }>;
  rings: Map<string, number>;
};

function emptyMeasured(): Measured {
  return { sizes: new Map(), fields: new Map(), rings: new Map() };
}

function gcc(dir: string, args: string[]): string | undefined {
  const r = spawnSync('gcc', args, { cwd: dir, encoding: 'utf8' });
  if (r.status === 0) return undefined;
  const errors = r.stderr.split('\n').filter((l) => l.includes('error'));
  return (errors.length > 0 ? errors.slice(0, 40) : [r.stderr]).join('\n');
}

/** Every difference between lib/abi and the measured layouts, one message naming the field each. */
function compareLayouts(arch: Arch, m: Measured): { fields: number; mismatches: string[] } {
  let fields = 0;
  const mismatches: string[] = [];
  for (const [key, s] of entries(arch)) {
    const size = m.sizes.get(key);
    if (size !== s.size) mismatches.push(`sizeof(${ctype(s)}) [${key}]: lib/abi ${s.size}, C ${String(size)}`);
    for (const [name, f] of Object.entries(s.fields)) {
      fields++;
      const c = m.fields.get(`${key}.${name}`);
      if (c === undefined) mismatches.push(`${key}.${name}: not measured`);
      else if (c.offset !== f.offset || c.size !== f.size) {
        mismatches.push(`${key}.${name}: lib/abi offset ${f.offset} size ${f.size}, C offset ${c.offset} size ${c.size}`);
      }
    }
    const ring = ringName(s);
    if (ring !== undefined) {
      const ours = __CONST_RING_SIZE(s, PAGE_BYTES);
      const c = m.rings.get(key);
      if (c !== ours) mismatches.push(`__CONST_RING_SIZE(${ring}, ${PAGE_BYTES}): lib/abi ${ours}, C ${String(c)}`);
    }
  }
  return { fields, mismatches: mismatches.map((msg) => `${arch} ${msg}`) };
}

type Tables = { strings: Map<string, string>; xsdErrors: string[]; gnttabMsgs: string[]; constants: Map<string, bigint> };

function parse64(stdout: string): { m: Measured; tables: Tables } {
  const m = emptyMeasured();
  const tables: Tables = { strings: new Map(), xsdErrors: [], gnttabMsgs: [], constants: new Map() };
  for (const line of stdout.split('\n')) {
    const [kind = '', key = '', a = '', b = ''] = line.split('\t');
    if (kind === 'S') m.sizes.set(key, Number(a));
    else if (kind === 'F') m.fields.set(key, { offset: Number(a), size: Number(b) });
    else if (kind === 'R') m.rings.set(key, Number(a));
    else if (kind === 'C') tables.constants.set(key, BigInt(a));
    else if (kind === 'T') tables.strings.set(key, a);
    else if (kind === 'E') tables.xsdErrors.push(`${a} ${b}`);
    else if (kind === 'M') tables.gnttabMsgs.push(a);
  }
  return { m, tables };
}

function parse32(keys: string[], values: number[]): Measured {
  const m = emptyMeasured();
  let i = 1;
  const next = (): number => values[i++] ?? Number.NaN;
  for (const k of keys) {
    const [kind = '', key = ''] = k.split('\t');
    if (kind === 'S') m.sizes.set(key, next());
    else if (kind === 'F') m.fields.set(key, { offset: next(), size: next() });
    else if (kind === 'R') m.rings.set(key, next());
  }
  return m;
}

function compareConstants(measured: Map<string, bigint>): string[] {
  const mismatches: string[] = [];
  for (const [name, value] of Object.entries(constants)) {
    const c = measured.get(name);
    const exact = typeof value === 'bigint' || Number.isSafeInteger(value);
    if (c === undefined || !exact || BigInt(value) !== c) {
      mismatches.push(`constant ${name}: lib/abi ${String(value)}, C ${String(c)}`);
    }
  }
  return mismatches;
}

function compareTables(tables: Tables): string[] {
  const mismatches: string[] = [];
  for (const [name, value] of Object.entries(strings)) {
    const c = tables.strings.get(name);
    if (c !== value) mismatches.push(`string ${name}: lib/abi "${value}", C "${String(c)}"`);
  }
  const ours = xsd_errors.map((e) => `${e.errnum} ${e.errstring}`);
  ours.forEach((e, i) => {
    if (tables.xsdErrors[i] !== e) mismatches.push(`xsd_errors[${i}]: lib/abi "${e}", C "${String(tables.xsdErrors[i])}"`);
  });
  if (tables.xsdErrors.length !== ours.length) mismatches.push(`xsd_errors[]: C has ${tables.xsdErrors.length} entries`);
  if (GNTTABOP_error_msgs.join('|') !== tables.gnttabMsgs.join('|')) {
    mismatches.push(`GNTTABOP_error_msgs: C has ${JSON.stringify(tables.gnttabMsgs)}`);
  }
  return mismatches;
}

const totals = { structs: 0, constants: 0, fields: 0, mismatches: 0 };

const skip = gccMissing();
if (skip !== undefined) {
  t.skip(`abi conformance: ${skip}`, () => {});
} else {
  const started = performance.now();
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-abi-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));

  t.test('x86_64 layouts and constants', async (t) => {
    writeFileSync(join(dir, 'abi64.c'), source64());
    const err = gcc(dir, ['-std=gnu11', '-O0', '-w', '-o', 'abi64', 'abi64.c']);
    if (err !== undefined) {
      totals.mismatches++;
      return t.fail(`gcc could not compile the registry:\n${err}`);
    }
    const run = spawnSync(join(dir, 'abi64'), { encoding: 'utf8' });
    t.equal(run.status, 0, 'the measuring program ran');
    const { m, tables } = parse64(run.stdout);
    const layouts = compareLayouts('x86_64', m);
    const mismatches = [...layouts.mismatches, ...compareConstants(tables.constants), ...compareTables(tables)];
    for (const msg of mismatches) t.fail(msg);
    t.equal(mismatches.length, 0, 'x86_64: lib/abi agrees with the headers');
    totals.structs += entries('x86_64').length;
    totals.constants += Object.keys(constants).length;
    totals.fields += layouts.fields;
    totals.mismatches += mismatches.length;
    t.ok(totals.structs >= 60 && totals.constants >= 300, 'at least 60 structs/unions and 300 constants');
  });

  t.test('x86_32 layouts (blkif protocol x86_32-abi)', async (t) => {
    const { text, keys } = source32();
    writeFileSync(join(dir, 'abi32.c'), text);
    const err = gcc(dir, ['-std=gnu11', '-m32', '-ffreestanding', '-O0', '-w', '-S', '-o', 'abi32.s', 'abi32.c']);
    if (err !== undefined) {
      totals.mismatches++;
      return t.fail(`gcc -m32 could not compile the registry:\n${err}`);
    }
    const values = parseAsm(readFileSync(join(dir, 'abi32.s'), 'utf8'));
    t.equal(values.length, (values[0] ?? 0) + 1, 'every value was read out of the assembly');
    const m = parse32(keys, values);
    t.equal(m.sizes.get('blkif_request_x86_32'), 108, 'C: sizeof(struct blkif_request) is 108 on i386');
    t.equal(m.fields.get('blkif_request_x86_32.sector_number')?.offset, 12, 'C: i386 sector_number at 12');
    t.equal(m.sizes.get('blkif_response_x86_32'), 12, 'C: sizeof(struct blkif_response) is 12 on i386');
    t.equal(m.rings.get('blkif_sring_x86_32'), 32, 'C: 32 blkif requests per page on i386 too');
    const layouts = compareLayouts('x86_32', m);
    for (const msg of layouts.mismatches) t.fail(msg);
    t.equal(layouts.mismatches.length, 0, 'x86_32: lib/abi agrees with the headers');
    totals.structs += entries('x86_32').length;
    totals.fields += layouts.fields;
    totals.mismatches += layouts.mismatches.length;
  });

  t.test('summary', async (t) => {
    const ms = Math.round(performance.now() - started);
    t.comment(`compared ${totals.structs} structs/unions, ${totals.constants} constants, ${totals.fields} fields, ${totals.mismatches} mismatches (${ms} ms)`);
    t.equal(totals.mismatches, 0, 'no mismatches');
  });
}
