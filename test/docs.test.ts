// The documentation checked against the code: every symbol docs/porting.md
// maps exists in the file it links to, and every xenstore key the diagrams of
// docs/protocols.md say a side writes or reads is one that side's code writes
// or reads, and the other way round. Each examples/<name>/ says what it shows.

import t from 'tap';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const root = fileURLToPath(new URL('../..', import.meta.url));
const docs = join(root, 'docs');

// --- source files and their symbols -------------------------------------------

const sources = new Map<string, ts.SourceFile>();

function source(rel: string): ts.SourceFile {
  let sf = sources.get(rel);
  if (sf === undefined) {
    sf = ts.createSourceFile(rel, readFileSync(join(root, rel), 'utf8'), ts.ScriptTarget.ES2022, true);
    sources.set(rel, sf);
  }
  return sf;
}

function nameOf(node: ts.Node): string | undefined {
  const name = (node as { name?: ts.Node }).name;
  if (name === undefined) return undefined;
  if (ts.isIdentifier(name) || ts.isPrivateIdentifier(name) || ts.isStringLiteral(name)) return name.text;
  return undefined;
}

/**
 * The declaration `symbol` names in `sf`: `Name` is a function, class or
 * const at the top level, `Class.member` a method, accessor or property of
 * that class (`Class.constructor` its constructor).
 */
function findSymbol(sf: ts.SourceFile, symbol: string): ts.Node | undefined {
  const [head, member, extra] = symbol.split('.');
  if (head === undefined || extra !== undefined) return undefined;
  for (const st of sf.statements) {
    if (member === undefined) {
      if ((ts.isFunctionDeclaration(st) || ts.isClassDeclaration(st)) && nameOf(st) === head) return st;
      if (ts.isVariableStatement(st) && (st.declarationList.flags & ts.NodeFlags.Const) !== 0) {
        const d = st.declarationList.declarations.find((v) => ts.isIdentifier(v.name) && v.name.text === head);
        if (d !== undefined) return d;
      }
    } else if (ts.isClassDeclaration(st) && nameOf(st) === head) {
      return st.members.find((m) => (member === 'constructor' ? ts.isConstructorDeclaration(m) : nameOf(m) === member));
    }
  }
  return undefined;
}

/** The body of a function, method or arrow `symbol` in `sf`. */
function bodyOf(sf: ts.SourceFile, symbol: string): ts.Node | undefined {
  const node = findSymbol(sf, symbol);
  if (node === undefined) return undefined;
  if (ts.isFunctionDeclaration(node) || ts.isMethodDeclaration(node) || ts.isConstructorDeclaration(node) || ts.isGetAccessor(node)) {
    return node.body;
  }
  return undefined;
}

// --- docs/porting.md ---------------------------------------------------------------

/** Sections of the map, in the order of the seed talk. */
const SECTIONS = [
  'Hypercalls', 'Shared info', 'Interrupts', 'XenStore', 'Device attach', 'Grant tables', 'bus_dma',
  'Netfront rings', 'Blockfront', 'Backends',
];
const MIN_MAPPED = 60;

type PortingRow = { line: number; symbol: string; file: string; cells: string[] };

/** Split a Markdown table row into its cells (no cell of the map contains a pipe). */
function cells(line: string): string[] {
  return line.trim().replace(/^\|/, '').replace(/\|$/, '').split('|').map((c) => c.trim());
}

function portingRows(md: string): PortingRow[] {
  const rows: PortingRow[] = [];
  md.split('\n').forEach((line, i) => {
    if (!line.startsWith('| [')) return;
    const c = cells(line);
    const m = /^\[`([A-Za-z_$][\w$]*(?:\.[A-Za-z_$#][\w$]*)?)`\]\(\.\.\/(lib\/[\w/.-]+\.ts)\)$/.exec(c[0] ?? '');
    rows.push({ line: i + 1, symbol: m?.[1] ?? '', file: m?.[2] ?? '', cells: c });
  });
  return rows;
}

/** What is wrong with the rows of the map: one message per problem. */
function portingProblems(rows: readonly PortingRow[]): string[] {
  const problems: string[] = [];
  const seen = new Set<string>();
  for (const r of rows) {
    const where = `porting.md:${r.line}`;
    if (r.symbol === '') problems.push(`${where}: the first cell is not [\`Symbol\`](../lib/file.ts)`);
    if (r.cells.length !== 5) problems.push(`${where}: ${r.cells.length} cells, not 5`);
    if (r.cells.some((c) => c.length === 0)) problems.push(`${where}: an empty cell`);
    if (r.symbol === '') continue;
    const key = `${r.file}#${r.symbol}`;
    if (seen.has(key)) problems.push(`${where}: ${r.symbol} of ${r.file} is mapped twice`);
    seen.add(key);
    if (!existsSync(join(root, r.file))) problems.push(`${where}: ${r.file} does not exist`);
    else if (findSymbol(source(r.file), r.symbol) === undefined) problems.push(`${where}: ${r.symbol} is not declared in ${r.file}`);
  }
  return problems;
}

t.test('porting map: every symbol exists in the file it links to', async (t) => {
  const md = readFileSync(join(docs, 'porting.md'), 'utf8');
  const rows = portingRows(md);
  t.same(portingProblems(rows), [], 'every row names a symbol declared in its file');
  t.ok(rows.length >= MIN_MAPPED, `${rows.length} functions mapped (at least ${MIN_MAPPED})`);
  t.comment(`porting map: ${rows.length} functions over ${new Set(rows.map((r) => r.file)).size} files`);
  const headings = [...md.matchAll(/^## (.+)$/gm)].map((m) => m[1]);
  t.same(headings, SECTIONS, 'sections in the seed talk\'s order');
});

t.test('porting map checker: a missing or misplaced symbol is caught', async (t) => {
  const sf = source('lib/evtchn/evtchn.ts');
  t.ok(findSymbol(sf, 'Interrupts.intrEstablish'), 'a method');
  t.ok(findSymbol(sf, 'Interrupts'), 'a class');
  t.ok(findSymbol(sf, 'NR_ROWS'), 'a const');
  t.notOk(findSymbol(sf, 'Interrupts.intrEstablished'), 'a misspelt method');
  t.notOk(findSymbol(sf, 'IntrHandle.intrEstablish'), 'a method of another class');
  t.notOk(findSymbol(source('lib/xen/xen.ts'), 'Interrupts.intrEstablish'), 'a method in another file');
  const rows = portingRows([
    '| [`Interrupts.upcall`](../lib/evtchn/evtchn.ts) | `xen_intr` | x | y | z |',
    '| [upcall](x) | a | b | c | d |',
    '| [`Interrupts.upcal`](../lib/evtchn/evtchn.ts) | a | b | c | d |',
    '| [`Interrupts.upcall`](../lib/evtchn/evtchn.ts) | a | b |  | d |',
    '| [`xenAttach`](../lib/xen/nexus.ts) | a | b | c | d |',
  ].join('\n'));
  t.same(rows.map((r) => [r.symbol, r.file, r.cells.length]), [
    ['Interrupts.upcall', 'lib/evtchn/evtchn.ts', 5], ['', '', 5], ['Interrupts.upcal', 'lib/evtchn/evtchn.ts', 5],
    ['Interrupts.upcall', 'lib/evtchn/evtchn.ts', 5], ['xenAttach', 'lib/xen/nexus.ts', 5],
  ]);
  t.same(portingProblems(rows), [
    'porting.md:2: the first cell is not [`Symbol`](../lib/file.ts)',
    'porting.md:3: Interrupts.upcal is not declared in lib/evtchn/evtchn.ts',
    'porting.md:4: an empty cell',
    'porting.md:4: Interrupts.upcall of lib/evtchn/evtchn.ts is mapped twice',
    'porting.md:5: lib/xen/nexus.ts does not exist',
  ]);
});

// --- examples -------------------------------------------------------------------------

t.test('every example says what it shows', async (t) => {
  const dir = join(root, 'examples');
  for (const name of readdirSync(dir, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name)) {
    const readme = join(dir, name, 'README.md');
    t.ok(existsSync(readme), `examples/${name}/README.md exists`);
    if (!existsSync(readme)) continue;
    const lines = readFileSync(readme, 'utf8').split('\n');
    t.equal(lines[0], `# ${name}`, `examples/${name}/README.md starts with its name`);
    const what = lines.slice(1).find((l) => l.trim() !== '') ?? '';
    t.ok(what.length > 20, `examples/${name}/README.md says what it shows: ${JSON.stringify(what.slice(0, 60))}`);
  }
});

