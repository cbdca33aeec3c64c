// The documentation checked against the code: every symbol docs/porting.md
// maps exists in the file it links to, and every xenstore key the diagrams of
// docs/protocols.md say a side writes or reads is one that side's code writes
// or reads, and the other way round. Each examples/<name>/ says what it shows.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
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

/** The code of `symbol` in `sf`: a function's or method's body, a property's or const's initializer. */
function bodyOf(sf: ts.SourceFile, symbol: string): ts.Node | undefined {
  const node = findSymbol(sf, symbol);
  if (node === undefined) return undefined;
  if (ts.isFunctionDeclaration(node) || ts.isMethodDeclaration(node) || ts.isConstructorDeclaration(node) || ts.isGetAccessor(node)) {
    return node.body;
  }
  if (ts.isPropertyDeclaration(node) || ts.isVariableDeclaration(node)) return node.initializer;
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

// --- docs/protocols.md -------------------------------------------------------------

/** xenstore verbs of the diagrams and the client methods that perform them. */
const VERBS = ['write', 'mkdir', 'rm', 'read', 'wait', 'watch'] as const;
type Verb = (typeof VERBS)[number];
const METHOD_VERB: Record<string, Verb> = {
  write: 'write', setNumber: 'write', mkdir: 'mkdir', rm: 'rm', read: 'read', getNumber: 'read', awaitState: 'wait', watch: 'watch',
};
/** A xenstore client or transaction: `xs`, `sc.xs`, `this.xs`, `t`. */
const XS_RECEIVER = /(^|\.)(xs|t)$/;
/** Xen names a diagram may put in a message; the sender's code must use each. */
const XEN_NAME = /\b(?:(?:EVTCHNOP|GNTTABOP|HVMOP|XENMEM|XENVER|SCHEDOP|HVM_PARAM|GNTTAB_RESERVED|VIRQ|SHUTDOWN|XENMAPSPACE|XS)_\w+|XenbusState[A-Za-z]+)/g;
const MESSAGE = /^\s*([A-Za-z]\w*)\s*(?:-{1,2}>>|-{1,2}>|-{1,2}x|-{1,2}\))\s*([A-Za-z]\w*)\s*:\s*(.*)$/;

/** The key a path names: what follows its last placeholder, or the whole path when none is followed by a key. */
function keyOf(pattern: string): string {
  const at = pattern.lastIndexOf('<*>/');
  const key = at < 0 ? pattern : pattern.slice(at + 4);
  // A placeholder in front of the name is a prefix such as `queue-N/`: `${dir}ring-ref` is ring-ref.
  return key.startsWith('<*>') && key.length > 3 ? key.slice(3) : key;
}

type Side = { id: string; scopes: { file: string; symbols: string[] }[] };
type Diagram = { line: number; title: string; sides: Map<string, Side>; ops: Map<string, Set<string>>; names: Map<string, Set<string>> };

function addTo(map: Map<string, Set<string>>, id: string, value: string): void {
  let set = map.get(id);
  if (set === undefined) map.set(id, (set = new Set()));
  set.add(value);
}

/** Every ```mermaid block of `md` with its `%% side` lines, its xenstore operations and the Xen names per sender. */
function diagrams(md: string): Diagram[] {
  const out: Diagram[] = [];
  const lines = md.split('\n');
  let title = '';
  let d: Diagram | null = null;
  lines.forEach((line, i) => {
    if (line.startsWith('## ')) title = line.slice(3);
    if (line.trim() === '```mermaid') {
      d = { line: i + 1, title, sides: new Map(), ops: new Map(), names: new Map() };
      return;
    }
    if (d === null) return;
    if (line.trim() === '```') {
      out.push(d);
      d = null;
      return;
    }
    const side = /^\s*%% side (\w+) (\S+)((?: \S+)+)$/.exec(line);
    if (side !== null) {
      const [, id, file, symbols] = side as unknown as [string, string, string, string];
      const s = d.sides.get(id) ?? { id, scopes: [] };
      s.scopes.push({ file, symbols: symbols.trim().split(' ') });
      d.sides.set(id, s);
      return;
    }
    const m = MESSAGE.exec(line);
    if (m === null) return;
    const [, from, , text] = m as unknown as [string, string, string, string];
    for (const name of text.match(XEN_NAME) ?? []) addTo(d.names, from, name);
    const words = /^(\w+) (.+)$/.exec(text.trim());
    if (words === null || !(VERBS as readonly string[]).includes(words[1]!)) return;
    const verb = words[1]!;
    words[2]!.split(/,\s*/).forEach((item, n) => {
      const path = item.trim().split(/[=<>]/)[0]!.trim().replace(/\$\w+/g, '<*>');
      addTo(d!.ops, from, `${verb} ${n === 0 ? keyOf(path) : path}`);
    });
  });
  return out;
}

/** A call's path argument as a pattern: literal text, `<*>` for each substitution; null when it is not literal. */
function pathPattern(arg: ts.Expression | undefined): string | null {
  if (arg === undefined) return null;
  if (ts.isStringLiteral(arg) || ts.isNoSubstitutionTemplateLiteral(arg)) return arg.text;
  if (ts.isTemplateExpression(arg)) return arg.head.text + arg.templateSpans.map((sp) => `<*>${sp.literal.text}`).join('');
  return null;
}

/**
 * The key identifier of a path that is exactly `${base}/${key}`: a key the
 * code does not spell out here. Inside a helper, whose parameter it is, the
 * callers name it; elsewhere (a loop over a table) it stands for "some key".
 */
function dynamicKey(arg: ts.Expression | undefined): string | null {
  if (arg === undefined || !ts.isTemplateExpression(arg) || arg.head.text !== '' || arg.templateSpans.length !== 2) return null;
  const [base, key] = arg.templateSpans as unknown as [ts.TemplateSpan, ts.TemplateSpan];
  if (base.literal.text !== '/' || key.literal.text !== '' || !ts.isIdentifier(key.expression)) return null;
  return key.expression.text;
}

/** Whether `name` is a parameter of the function that contains `node`. */
function isParameter(node: ts.Node, name: string): boolean {
  for (let n = node.parent; n !== undefined; n = n.parent) {
    if (ts.isFunctionLike(n)) return n.parameters.some((p) => ts.isIdentifier(p.name) && p.name.text === name);
  }
  return false;
}

function isString(e: ts.Expression | undefined): e is ts.StringLiteral {
  return e !== undefined && (ts.isStringLiteral(e) || ts.isNoSubstitutionTemplateLiteral(e));
}

/** A node table entry's verb: `[name, null, perms]` makes a directory, anything else writes a value. */
function tableVerb(value: ts.Expression | undefined): Verb {
  return value !== undefined && value.kind === ts.SyntaxKind.NullKeyword ? 'mkdir' : 'write';
}

/** `xs.<method>(...)` on a xenstore client or transaction: the verb, or undefined. */
function xsVerb(node: ts.CallExpression, sf: ts.SourceFile): Verb | undefined {
  if (!ts.isPropertyAccessExpression(node.expression)) return undefined;
  const verb = METHOD_VERB[node.expression.name.text];
  return verb !== undefined && XS_RECEIVER.test(node.expression.expression.getText(sf)) ? verb : undefined;
}

/** A function whose parameters may name keys: `feature(xnf, 'feature-sg', 0)` reads feature-sg. */
type Helper = { params: string[]; body: ts.Node; keys: Map<number, Verb> };

function helperOf(fn: ts.SignatureDeclarationBase & { body?: ts.Node | undefined }): Helper | null {
  if (fn.body === undefined) return null;
  const params = fn.parameters.map((p) => (ts.isIdentifier(p.name) ? p.name.text : ''));
  return { params, body: fn.body, keys: new Map() };
}

/**
 * The key helpers `bodies` can call: the top-level functions of their files
 * and the arrow functions bound to a const inside them. A parameter is a key
 * when it ends a client call's path (`${base}/${key}`) or is passed on as a
 * key to another helper.
 */
function keyHelpers(files: readonly ts.SourceFile[], bodies: readonly ts.Node[]): Map<string, Helper> {
  const helpers = new Map<string, Helper>();
  for (const sf of files) {
    for (const st of sf.statements) {
      if (ts.isFunctionDeclaration(st) && st.name !== undefined) {
        const h = helperOf(st);
        if (h !== null) helpers.set(st.name.text, h);
      }
    }
  }
  const arrows = (node: ts.Node): void => {
    if (ts.isVariableDeclaration(node) && ts.isIdentifier(node.name) && node.initializer !== undefined && ts.isArrowFunction(node.initializer)) {
      const h = helperOf(node.initializer);
      if (h !== null) helpers.set(node.name.text, h);
    }
    ts.forEachChild(node, arrows);
  };
  for (const b of bodies) arrows(b);
  for (let changed = true; changed; ) {
    changed = false;
    for (const h of helpers.values()) {
      const visit = (node: ts.Node): void => {
        if (ts.isCallExpression(node)) {
          const sf = node.getSourceFile();
          const verb = xsVerb(node, sf);
          const key = verb === undefined ? null : dynamicKey(node.arguments[0]);
          if (verb !== undefined && key !== null && h.params.includes(key) && !h.keys.has(h.params.indexOf(key))) {
            h.keys.set(h.params.indexOf(key), verb);
            changed = true;
          }
          const callee = ts.isIdentifier(node.expression) ? helpers.get(node.expression.text) : undefined;
          for (const [j, v] of callee?.keys ?? []) {
            const arg = node.arguments[j];
            if (arg !== undefined && ts.isIdentifier(arg) && h.params.includes(arg.text) && !h.keys.has(h.params.indexOf(arg.text))) {
              h.keys.set(h.params.indexOf(arg.text), v);
              changed = true;
            }
          }
        }
        ts.forEachChild(node, visit);
      };
      visit(h.body);
    }
  }
  return helpers;
}

/** The node a value sits in, past `as`, `satisfies` and parentheses: `[['rate', r] as Entry]` and `nodes.push(['rate', r])` are table entries. */
function outside(node: ts.Node): ts.Node {
  let p = node.parent;
  while (ts.isAsExpression(p) || ts.isSatisfiesExpression(p) || ts.isParenthesizedExpression(p) || ts.isTypeAssertionExpression(p)) p = p.parent;
  return p;
}

/**
 * The xenstore operations in `body`: client calls `xs.<method>(path, ...)`;
 * calls of key helpers with a literal key; and the node tables a side writes
 * through one call per entry: `['key', value, perms]` entries (in an array or pushed onto one),
 * `['a', 'b'].map((n) => [n, value, perms])`, and `nodes.set('key', value)`
 * on a Map named `nodes`. `problems` gets every client call whose path is
 * neither literal nor `${base}/${key}`, since its key cannot be read.
 */
function codeOps(body: ts.Node, sf: ts.SourceFile, helpers: ReadonlyMap<string, Helper>, ops: Set<string>, names: Set<string>, problems: string[]): void {
  const mapped = new Set<ts.Node>();
  const visit = (node: ts.Node): void => {
    if (ts.isIdentifier(node)) names.add(node.text);
    if (ts.isCallExpression(node)) {
      const verb = xsVerb(node, sf);
      const dynamic = dynamicKey(node.arguments[0]);
      if (verb !== undefined && (dynamic === null || !isParameter(node, dynamic))) {
        const pattern = pathPattern(node.arguments[0]);
        if (pattern === null) problems.push(`cannot read the key of ${node.getText(sf).slice(0, 60)}`);
        else ops.add(`${verb} ${keyOf(pattern)}`);
      }
      const helper = ts.isIdentifier(node.expression) ? helpers.get(node.expression.text) : undefined;
      for (const [j, v] of helper?.keys ?? []) {
        const arg = node.arguments[j];
        if (isString(arg)) ops.add(`${v} ${arg.text}`);
      }
      if (ts.isPropertyAccessExpression(node.expression)) {
        const method = node.expression.name.text;
        const receiver = node.expression.expression;
        const fn = node.arguments[0];
        if (method === 'map' && ts.isArrayLiteralExpression(receiver) && receiver.elements.every(isString) && fn !== undefined && ts.isArrowFunction(fn)) {
          let result: ts.Node = fn.body;
          while (ts.isParenthesizedExpression(result)) result = result.expression;
          if (ts.isArrayLiteralExpression(result)) {
            const v = tableVerb(result.elements[1]);
            for (const e of receiver.elements) ops.add(`${v} ${(e as ts.StringLiteral).text}`);
            mapped.add(receiver);
          }
        }
        if (method === 'set' && ts.isIdentifier(receiver) && /(^n|N)odes$/.test(receiver.text)) {
          const pattern = pathPattern(node.arguments[0]);
          if (pattern !== null) ops.add(`write ${keyOf(pattern)}`);
        }
      }
    }
    if (ts.isArrayLiteralExpression(node) && !mapped.has(node) && node.elements.length >= 2 && node.elements.length <= 3) {
      const around = outside(node);
      const pushed = ts.isCallExpression(around) && ts.isPropertyAccessExpression(around.expression) && around.expression.name.text === 'push';
      const first = node.elements[0];
      if ((ts.isArrayLiteralExpression(around) || pushed) && isString(first)) {
        ops.add(`${tableVerb(node.elements[1])} ${first.text === '' ? '<*>' : first.text}`);
      }
    }
    ts.forEachChild(node, visit);
  };
  visit(body);
}

/** For each side of a diagram: what the diagram says against what the code does. */
function protocolProblems(d: Diagram): string[] {
  const problems: string[] = [];
  const where = `protocols.md:${d.line} (${d.title})`;
  if (d.sides.size === 0) problems.push(`${where}: no %% side lines`);
  for (const side of d.sides.values()) {
    const code = new Set<string>();
    const names = new Set<string>();
    const bodies: { sf: ts.SourceFile; body: ts.Node }[] = [];
    for (const scope of side.scopes) {
      if (!existsSync(join(root, scope.file))) {
        problems.push(`${where}: ${side.id}: ${scope.file} does not exist`);
        continue;
      }
      const sf = source(scope.file);
      for (const symbol of scope.symbols) {
        const body = bodyOf(sf, symbol);
        if (body === undefined) problems.push(`${where}: ${side.id}: no ${symbol} with a body in ${scope.file}`);
        else bodies.push({ sf, body });
      }
    }
    const helpers = keyHelpers([...new Set(bodies.map((b) => b.sf))], bodies.map((b) => b.body));
    const unread: string[] = [];
    for (const { sf, body } of bodies) codeOps(body, sf, helpers, code, names, unread);
    problems.push(...unread.map((m) => `${where}: ${side.id}: ${m}`));
    const drawn = d.ops.get(side.id) ?? new Set<string>();
    for (const op of drawn) if (!code.has(op)) problems.push(`${where}: ${side.id} draws "${op}", its code does not do it`);
    for (const op of code) if (!drawn.has(op)) problems.push(`${where}: ${side.id}'s code does "${op}", the diagram does not draw it`);
    for (const name of d.names.get(side.id) ?? []) {
      if (!names.has(name)) problems.push(`${where}: ${side.id} names ${name}, its code does not use it`);
    }
  }
  return problems;
}

t.test('protocol diagrams: each side writes and reads exactly the keys its code does', async (t) => {
  const md = readFileSync(join(docs, 'protocols.md'), 'utf8');
  const all = diagrams(md);
  const required = [
    'Domain build and xenstore introduction', 'The vbd: xenbus states and keys', 'The vif: xenbus states and keys', 'control/shutdown', 'Console',
  ];
  const titles = all.map((d) => d.title);
  t.same(required.filter((r) => !titles.includes(r)), [], 'every handshake is drawn');
  for (const d of all) {
    t.same(protocolProblems(d), [], `${d.title}: the diagram matches the code`);
    const ops = [...d.ops.values()].reduce((n, s) => n + s.size, 0);
    t.comment(`${d.title}: ${d.sides.size} sides checked, ${ops} xenstore operations`);
  }
});

t.test('protocol checker: a renamed, missing or extra key is caught', async (t) => {
  const diagram = (body: string): Diagram => diagrams(['## x', '```mermaid', 'sequenceDiagram', body, '```'].join('\n'))[0]!;
  const good = [
    '  %% side FE test/fixtures/protocol-side.ts connect',
    '  FE->>XSD: wait $be/state>=2',
    '  FE->>XSD: read $be/feature-persistent, max-ring-page-order',
    '  FE->>XSD: write $fe/protocol=x86_64-abi, ring-ref, event-channel, queue-dir, queue-order, $k, state=3',
    '  FE->>XSD: rm /local/domain/0/backend/vbd/$fe',
  ].join('\n');
  t.same(protocolProblems(diagram(good)), [], 'every way of naming a key is read: client calls, helpers, node tables');
  t.same(protocolProblems(diagram(good.replace('event-channel', 'evtchn'))), [
    'protocols.md:2 (x): FE draws "write evtchn", its code does not do it',
    'protocols.md:2 (x): FE\'s code does "write event-channel", the diagram does not draw it',
  ], 'a renamed key');
  t.same(protocolProblems(diagram(good.replace(', max-ring-page-order', ''))), [
    'protocols.md:2 (x): FE\'s code does "read max-ring-page-order", the diagram does not draw it',
  ], 'a key left out');
  t.same(protocolProblems(diagram(`${good}\n  FE->>XSD: write $fe/feature-persistent`)), [
    'protocols.md:2 (x): FE draws "write feature-persistent", its code does not do it',
  ], 'a key the code does not write');
  t.same(protocolProblems(diagram(good.replace('wait $be', 'read $be'))), [
    'protocols.md:2 (x): FE draws "read state", its code does not do it',
    'protocols.md:2 (x): FE\'s code does "wait state", the diagram does not draw it',
  ], 'the wrong verb');
  t.same(protocolProblems(diagram(`${good}\n  FE->>HV: EVTCHNOP_bind_interdomain`)), [
    'protocols.md:2 (x): FE names EVTCHNOP_bind_interdomain, its code does not use it',
  ], 'a hypercall the side does not make');
  t.same(protocolProblems(diagram(good.replace(' connect', ' connects'))).slice(0, 1), [
    'protocols.md:2 (x): FE: no connects with a body in test/fixtures/protocol-side.ts',
  ], 'a function that is not there');
  t.same(protocolProblems(diagram('  %% side FE test/fixtures/protocol-side.ts opaque')), [
    'protocols.md:2 (x): FE: cannot read the key of xs.read(path)',
  ], 'a path that is not literal');
});

// --- npm run docs ----------------------------------------------------------------------

const apidoc = join(root, 'dist/tools/apidoc.js');

t.test('npm run docs: a page per exported module, without warnings', async (t) => {
  const out = mkdtempSync(join(tmpdir(), 'xenpv-apidoc-'));
  const r = spawnSync(process.execPath, [apidoc, '--out', out], { encoding: 'utf8' });
  t.equal(r.stderr, '', 'no warnings');
  t.equal(r.status, 0, 'exit status 0');
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { name: string; exports: Record<string, string> };
  const pages = Object.keys(pkg.exports).filter((s) => s !== './package.json')
    .map((s) => (s === '.' ? pkg.name : `${pkg.name}/${s.slice(2)}`).replace(/\//g, '-') + '.md');
  t.same(readdirSync(out).sort(), [...pages, 'README.md'].sort(), 'one page per module and an index');
  const evtchn = readFileSync(join(out, 'xenpv-evtchn.md'), 'utf8');
  t.match(evtchn, 'intrEstablish(port: number, remoteDomid: number, handler: IntrHandler, name: string): IntrHandle', 'a method with its signature');
  t.match(evtchn, 'xen_intr_establish: attach `handler` to `port`', 'its doc comment');
  t.notMatch(evtchn, 'setMask', 'no private members');
  t.match(readFileSync(join(out, 'xenpv.md'), 'utf8'), 'static boot(opts?: MachineOptions): Promise<Machine>', 'a static method');
});

t.test('npm run docs: an export without a source is a warning and exit status 1', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-apidoc-'));
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'xenpv', exports: { './nope': './dist/lib/nope.js' } }));
  const r = spawnSync(process.execPath, [apidoc, '--out', join(dir, 'api'), '--package', join(dir, 'package.json')], { encoding: 'utf8' });
  t.equal(r.status, 1);
  t.equal(r.stderr, 'warning: xenpv/nope: no source lib/nope.ts\n');
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

