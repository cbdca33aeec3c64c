// `npm run docs`: the API reference of the package, one Markdown file per
// module of package.json's "exports", written from the TypeScript sources by
// the compiler's own checker (no documentation generator to install). Each
// module gets its header comment, then every export in source order with its
// signature and doc comment; a class lists its public members.
//
//   node dist/tools/apidoc.js [--out DIR] [--package FILE]
//
// Problems (an export whose source is missing, a module with nothing
// exported, a compiler diagnostic in a documented module) are warnings on
// stderr, and any warning makes the exit status 1.

import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import ts from 'typescript';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');

type Module = { name: string; subpath: string; file: string; out: string };

const FORMAT = ts.TypeFormatFlags.NoTruncation | ts.TypeFormatFlags.UseSingleQuotesForStringLiteralType;

/** The modules of an "exports" map: `./dist/lib/x.js` is built from `lib/x.ts`. */
function modulesOf(pkgFile: string, warn: (msg: string) => void): Module[] {
  const pkg = JSON.parse(readFileSync(pkgFile, 'utf8')) as { name: string; exports?: Record<string, string> };
  const out: Module[] = [];
  for (const [subpath, target] of Object.entries(pkg.exports ?? {})) {
    if (!target.endsWith('.js')) continue;
    const m = /^\.\/dist\/(.+)\.js$/.exec(target);
    if (m === null) {
      warn(`${subpath}: ${target} is not under ./dist`);
      continue;
    }
    const name = subpath === '.' ? pkg.name : `${pkg.name}/${subpath.slice(2)}`;
    out.push({ name, subpath, file: join(root, `${m[1]}.ts`), out: `${name.replace(/\//g, '-')}.md` });
  }
  return out;
}

/** The file's leading `//` comment block, as prose. */
function headerComment(sf: ts.SourceFile): string {
  const lines: string[] = [];
  for (const line of sf.text.split('\n')) {
    if (!line.startsWith('//')) break;
    lines.push(line.replace(/^\/\/ ?/, ''));
  }
  return lines.join('\n').trim();
}

function docOf(symbol: ts.Symbol, checker: ts.TypeChecker): string {
  const text = ts.displayPartsToString(symbol.getDocumentationComment(checker)).trim();
  const tags = symbol.getJsDocTags(checker).map((t) => `@${t.name} ${ts.displayPartsToString(t.text ?? [])}`.trim());
  return [text, ...tags].filter((s) => s !== '').join('\n\n');
}

function isInternal(symbol: ts.Symbol, checker: ts.TypeChecker): boolean {
  return symbol.getJsDocTags(checker).some((t) => t.name === 'internal');
}

function isPublic(decl: ts.Declaration): boolean {
  const name = ts.getNameOfDeclaration(decl);
  if (name !== undefined && ts.isPrivateIdentifier(name)) return false;
  const flags = ts.getCombinedModifierFlags(decl);
  return (flags & (ts.ModifierFlags.Private | ts.ModifierFlags.Protected)) === 0;
}

function code(text: string): string {
  return ['```ts', text, '```'].join('\n');
}

/** The call signatures of a function or method, as the checker prints them. */
function signatures(name: string, symbol: ts.Symbol, decl: ts.Node, checker: ts.TypeChecker): string {
  const type = checker.getTypeOfSymbolAtLocation(symbol, decl);
  return type.getCallSignatures().map((s) => `${name}${checker.signatureToString(s, decl, FORMAT)}`).join('\n');
}

function memberLine(member: ts.Symbol, decl: ts.Declaration, checker: ts.TypeChecker): string | null {
  const name = member.getName();
  const isStatic = (ts.getCombinedModifierFlags(decl) & ts.ModifierFlags.Static) !== 0 ? 'static ' : '';
  if (ts.isMethodDeclaration(decl)) return `${isStatic}${signatures(name, member, decl, checker)}`;
  if (ts.isGetAccessor(decl) || ts.isSetAccessor(decl) || ts.isPropertyDeclaration(decl) || ts.isParameter(decl)) {
    const readonly = ts.isGetAccessor(decl) || (ts.getCombinedModifierFlags(decl) & ts.ModifierFlags.Readonly) !== 0 ? 'readonly ' : '';
    return `${isStatic}${readonly}${name}: ${checker.typeToString(checker.getTypeOfSymbolAtLocation(member, decl), decl, FORMAT)}`;
  }
  return null;
}

function classSection(name: string, symbol: ts.Symbol, decl: ts.ClassDeclaration, checker: ts.TypeChecker): string[] {
  const heritage = (decl.heritageClauses ?? []).map((h) => h.getText()).join(' ');
  const out = [`### class ${name}`, '', docOf(symbol, checker)];
  const ctor = checker.getTypeOfSymbolAtLocation(symbol, decl).getConstructSignatures();
  const lines = ctor.map((s) => `new ${name}${checker.signatureToString(s, decl, FORMAT).replace(/: [^:]+$/, '')}`);
  if (heritage !== '') lines.unshift(`class ${name} ${heritage}`);
  const members: string[] = [];
  const seen = new Set<string>();
  const all = [...(symbol.members?.values() ?? []), ...(symbol.exports?.values() ?? [])];
  for (const member of all) {
    const d = member.declarations?.[0];
    if (d === undefined || !isPublic(d) || isInternal(member, checker) || member.getName() === '__constructor') continue;
    if (seen.has(member.getName())) continue;
    seen.add(member.getName());
    const line = memberLine(member, d, checker);
    if (line === null) continue;
    const doc = ts.displayPartsToString(member.getDocumentationComment(checker)).trim();
    members.push(doc === '' ? line : `/** ${doc.replace(/\n/g, ' ')} */\n${line}`);
  }
  out.push('', code([...lines, ...(members.length > 0 ? ['', ...members] : [])].join('\n')));
  return out;
}

/** One export: a heading, its signature, its doc comment. */
function exportSection(symbol: ts.Symbol, checker: ts.TypeChecker): string[] {
  const target = (symbol.flags & ts.SymbolFlags.Alias) !== 0 ? checker.getAliasedSymbol(symbol) : symbol;
  const name = symbol.getName();
  const decl = target.declarations?.[0];
  if (decl === undefined) return [`### ${name}`];
  if (ts.isClassDeclaration(decl)) return classSection(name, target, decl, checker);
  const doc = docOf(target, checker);
  if (ts.isFunctionDeclaration(decl)) {
    return [`### function ${name}`, '', doc, '', code(signatures(`function ${name}`, target, decl, checker))];
  }
  if (ts.isInterfaceDeclaration(decl) || ts.isTypeAliasDeclaration(decl)) {
    const kind = ts.isInterfaceDeclaration(decl) ? 'interface' : 'type';
    return [`### ${kind} ${name}`, '', doc, '', code(decl.getText().replace(/^export /, ''))];
  }
  if (ts.isVariableDeclaration(decl)) {
    const type = checker.typeToString(checker.getTypeOfSymbolAtLocation(target, decl), decl, FORMAT);
    return [`### const ${name}`, '', doc, '', code(`const ${name}: ${type}`)];
  }
  return [`### ${name}`, '', doc];
}

function position(symbol: ts.Symbol, checker: ts.TypeChecker): [string, number] {
  const target = (symbol.flags & ts.SymbolFlags.Alias) !== 0 ? checker.getAliasedSymbol(symbol) : symbol;
  const d = target.declarations?.[0];
  return [d?.getSourceFile().fileName ?? '', d?.getStart() ?? 0];
}

function moduleDoc(m: Module, sf: ts.SourceFile, checker: ts.TypeChecker, warn: (msg: string) => void): { text: string; count: number } {
  const moduleSymbol = checker.getSymbolAtLocation(sf);
  const exports = moduleSymbol === undefined ? [] : checker.getExportsOfModule(moduleSymbol).filter((s) => !isInternal(s, checker));
  if (exports.length === 0) warn(`${m.name}: exports nothing`);
  exports.sort((a, b) => {
    const [fa, pa] = position(a, checker);
    const [fb, pb] = position(b, checker);
    return fa === fb ? pa - pb : fa < fb ? -1 : 1;
  });
  const src = relative(root, m.file);
  const parts = [`# ${m.name}`, '', `Source: [${src}](../../${src})`, '', headerComment(sf), ''];
  for (const s of exports) parts.push(...exportSection(s, checker), '');
  return { text: `${parts.join('\n').replace(/\n{3,}/g, '\n\n').trim()}\n`, count: exports.length };
}

function main(): number {
  const { values } = parseArgs({ options: { out: { type: 'string' }, package: { type: 'string' } } });
  const outDir = resolve(values.out ?? join(root, 'docs/api'));
  const warnings: string[] = [];
  const warn = (msg: string): void => void warnings.push(msg);
  const modules = modulesOf(resolve(values.package ?? join(root, 'package.json')), warn);
  const present = modules.filter((m) => {
    try {
      readFileSync(m.file);
      return true;
    } catch {
      warn(`${m.name}: no source ${relative(root, m.file)}`);
      return false;
    }
  });
  const config = ts.getParsedCommandLineOfConfigFile(join(root, 'tsconfig.json'), {}, { ...ts.sys, onUnRecoverableConfigFileDiagnostic: () => undefined });
  const program = ts.createProgram(present.map((m) => m.file), { ...config?.options, noEmit: true });
  const checker = program.getTypeChecker();
  const host: ts.FormatDiagnosticsHost = { getCanonicalFileName: (f) => f, getCurrentDirectory: () => root, getNewLine: () => '\n' };
  for (const d of ts.getPreEmitDiagnostics(program)) warn(ts.formatDiagnostic(d, host).trim());

  rmSync(outDir, { recursive: true, force: true });
  mkdirSync(outDir, { recursive: true });
  const index = ['# API reference', '', 'Generated by `npm run docs` from the TypeScript sources; one page per module of the package.', '',
    '| module | source | exports |', '|---|---|---|'];
  for (const m of present) {
    const sf = program.getSourceFile(m.file);
    if (sf === undefined) {
      warn(`${m.name}: not in the program`);
      continue;
    }
    const { text, count } = moduleDoc(m, sf, checker, warn);
    writeFileSync(join(outDir, m.out), text);
    index.push(`| [${m.name}](${m.out}) | \`${relative(root, m.file)}\` | ${count} |`);
  }
  writeFileSync(join(outDir, 'README.md'), `${index.join('\n')}\n`);
  for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
  process.stdout.write(`${present.length} modules written to ${outDir}, ${warnings.length} warnings\n`);
  return warnings.length === 0 ? 0 : 1;
}

process.exitCode = main();
