// The xl.cfg subset xenpv understands: `key = value` lines where a value is a
// "string", a 'string', a number, or a [list, of, values] that may span lines;
// `#` starts a comment. Every error names the file, the line and the key.

import { existsSync, readFileSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { XenError } from '../errors.js';
import { createHash } from 'node:crypto';
import { formatMac, parseMac } from '../ether.js';
import type { DiskSpec, DomainSpec, NicSpec } from './toolstack.js';
import { parseCpuList } from '../hypervisor/affinity.js';

export type XlValue = string | number | XlValue[];
export type XlEntry = { key: string; value: XlValue; line: number };

const MAX_CONFIG_BYTES = 1 << 20;
const IGNORED = new Set(['type', 'builder', 'uuid', 'maxmem', 'boot', 'serial', 'vnc', 'sdl', 'device_model_version']);
const KNOWN = new Set(['name', 'memory', 'vcpus', 'maxvcpus', 'cpus', 'kernel', 'extra', 'on_poweroff', 'on_reboot', 'on_crash', 'disk', 'vif', 'console_port']);
const ACTIONS = ['destroy', 'restart', 'preserve'] as const;

class Parser {
  private at = 0;
  line = 1;

  constructor(
    private readonly text: string,
    private readonly file: string,
  ) {}

  fail(message: string, key?: string): never {
    throw new XenError('ECONFIG', `${this.file}:${this.line}:${key === undefined ? '' : ` ${key}:`} ${message}`);
  }

  private skip(newlines: boolean): void {
    for (;;) {
      const c = this.text[this.at];
      if (c === '#') {
        while (this.at < this.text.length && this.text[this.at] !== '\n') this.at++;
      } else if (c === ' ' || c === '\t' || c === '\r' || (newlines && c === '\n')) {
        if (c === '\n') this.line++;
        this.at++;
      } else {
        return;
      }
    }
  }

  entries(): XlEntry[] {
    const out: XlEntry[] = [];
    for (;;) {
      this.skip(true);
      if (this.at >= this.text.length) return out;
      const line = this.line;
      const m = /^[A-Za-z_][A-Za-z0-9_]*/.exec(this.text.slice(this.at, this.at + 128));
      if (m === null) this.fail(`expected a key, found ${JSON.stringify(this.text.slice(this.at, this.at + 10))}`);
      const key = m[0];
      this.at += key.length;
      this.skip(false);
      if (this.text[this.at] !== '=') this.fail('expected "="', key);
      this.at++;
      this.skip(false);
      const value = this.value(key);
      this.skip(false);
      const c = this.text[this.at];
      if (c === ';') this.at++;
      else if (c !== undefined && c !== '\n') this.fail(`unexpected ${JSON.stringify(c)} after the value`, key);
      out.push({ key, value, line });
    }
  }

  private value(key: string): XlValue {
    const c = this.text[this.at];
    if (c === '"' || c === "'") return this.string(key, c);
    if (c === '[') return this.list(key);
    const m = /^-?(0x[0-9a-fA-F]+|\d+)/.exec(this.text.slice(this.at, this.at + 32));
    if (m === null) this.fail('expected a string, a number or a list', key);
    this.at += m[0].length;
    return Number(m[0]);
  }

  private string(key: string, quote: string): string {
    const end = this.text.indexOf(quote, this.at + 1);
    const nl = this.text.indexOf('\n', this.at + 1);
    if (end < 0 || (nl >= 0 && nl < end)) this.fail('unterminated string', key);
    const s = this.text.slice(this.at + 1, end);
    this.at = end + 1;
    return s;
  }

  private list(key: string): XlValue[] {
    this.at++;
    const items: XlValue[] = [];
    for (;;) {
      this.skip(true);
      if (this.text[this.at] === ']') {
        this.at++;
        return items;
      }
      if (this.at >= this.text.length) this.fail('unterminated list', key);
      items.push(this.value(key));
      this.skip(true);
      if (this.text[this.at] === ',') this.at++;
      else if (this.text[this.at] !== ']') this.fail('expected "," or "]" in the list', key);
    }
  }
}

export function parseXl(text: string, file: string): XlEntry[] {
  return new Parser(text, file).entries();
}

function want<T extends string>(e: XlEntry, file: string, allowed: readonly T[]): T {
  if (typeof e.value !== 'string' || !(allowed as readonly string[]).includes(e.value)) {
    throw new XenError('ECONFIG', `${file}:${e.line}: ${e.key}: must be one of ${allowed.join(', ')}`);
  }
  return e.value as T;
}

function positive(e: XlEntry, file: string, max: number): number {
  if (typeof e.value !== 'number' || !Number.isInteger(e.value) || e.value < 1 || e.value > max) {
    throw new XenError('ECONFIG', `${file}:${e.line}: ${e.key}: must be a whole number from 1 to ${max}`);
  }
  return e.value;
}

function text(e: XlEntry, file: string): string {
  if (typeof e.value !== 'string') throw new XenError('ECONFIG', `${file}:${e.line}: ${e.key}: must be a string`);
  return e.value;
}

/**
 * `cpus = "0-3,^2"`: the host CPUs the domain may run on. xl also takes a
 * list, one set per vCPU; here a domain's vCPUs share one thread, so one set.
 */
function cpus(e: XlEntry, file: string): number[] {
  if (Array.isArray(e.value)) throw new XenError('ECONFIG', `${file}:${e.line}: cpus: a domain's vCPUs share one thread, so give one CPU list ("0-1"), not a list per vCPU`);
  try {
    return parseCpuList(String(e.value));
  } catch (err) {
    throw new XenError('ECONFIG', `${file}:${e.line}: ${(err as XenError).message.replace(/^EINVAL: /, '')}`);
  }
}

/** Read an xl config file into a DomainSpec; `kernel` is resolved against the file's folder. */
export function loadDomainConfig(file: string): DomainSpec {
  let raw: Buffer;
  try {
    raw = readFileSync(file);
  } catch (err) {
    throw new XenError('ENOENT', `${file}: ${(err as Error).message}`);
  }
  if (raw.length > MAX_CONFIG_BYTES) throw new XenError('ECONFIG', `${file}: larger than ${MAX_CONFIG_BYTES} bytes`);
  const spec: Partial<DomainSpec> = { memoryMiB: 128, vcpus: 1, extra: '', onPoweroff: 'destroy', onReboot: 'restart', onCrash: 'destroy' };
  const lines = new Map<string, number>();
  for (const e of parseXl(raw.toString('utf8'), file)) {
    if (lines.has(e.key)) throw new XenError('ECONFIG', `${file}:${e.line}: ${e.key}: set twice (first on line ${lines.get(e.key)})`);
    lines.set(e.key, e.line);
    if (IGNORED.has(e.key)) continue;
    if (!KNOWN.has(e.key)) throw new XenError('ECONFIG', `${file}:${e.line}: ${e.key}: unknown key`);
    setKey(spec, e, file);
  }
  const at = (key: string): string => `${file}${lines.has(key) ? `:${lines.get(key)}` : ''}: ${key}`;
  if (spec.name === undefined || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(spec.name)) {
    throw new XenError('ECONFIG', `${at('name')}: required, 1-64 letters, digits, ".", "_" or "-", starting with a letter or digit`);
  }
  if (spec.kernel === undefined) throw new XenError('ECONFIG', `${file}: kernel: required (the guest image module)`);
  if (spec.maxVcpus !== undefined && spec.maxVcpus < spec.vcpus!) throw new XenError('ECONFIG', `${at('maxvcpus')}: ${spec.maxVcpus} is less than vcpus (${spec.vcpus})`);
  for (const n of spec.vifs ?? []) if (n.mac === '') n.mac = derivedMac(spec.name, n.devid);
  checkMacs(spec.vifs ?? [], (message) => {
    throw new XenError('ECONFIG', `${at('vif')}: ${message}`);
  });
  return spec as DomainSpec;
}

/** What `create` checks beyond the syntax: the files the config names exist. */
export function checkDomainFiles(spec: DomainSpec, file: string): void {
  if (!existsSync(spec.kernel)) throw new XenError('ECONFIG', `${file}: kernel: ${spec.kernel}: no such file`);
  for (const d of spec.disks ?? []) {
    if (d.type === 'file' && !existsSync(d.params)) throw new XenError('ECONFIG', `${file}: disk: ${d.vdev}: ${d.params}: no such file`);
  }
}

/** One key's value into the spec. */
function setKey(spec: Partial<DomainSpec>, e: XlEntry, file: string): void {
  switch (e.key) {
    case 'name': spec.name = text(e, file); break;
    case 'memory': spec.memoryMiB = positive(e, file, 65536); break;
    case 'vcpus': spec.vcpus = positive(e, file, 32); break;
    case 'maxvcpus': spec.maxVcpus = positive(e, file, 32); break;
    case 'cpus': spec.cpus = cpus(e, file); break;
    case 'extra': spec.extra = text(e, file); break;
    case 'kernel': {
      const k = text(e, file);
      spec.kernel = isAbsolute(k) ? k : resolve(dirname(file), k);
      break;
    }
    case 'disk': spec.disks = disks(e, file); break;
    case 'vif': spec.vifs = vifs(e, file); break;
    case 'on_poweroff': spec.onPoweroff = want(e, file, ACTIONS); break;
    case 'on_reboot': spec.onReboot = want(e, file, ACTIONS); break;
    case 'on_crash': spec.onCrash = want(e, file, ACTIONS); break;
    case 'console_port': spec.consolePort = positive(e, file, 65535); break;
  }
}

const SIZE_UNITS: Record<string, number> = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 };

/** "64M", "1G", "4096": bytes, a whole number of 512-byte sectors; EINVAL otherwise. */
export function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)i?B?$/i.exec(text.trim());
  const bytes = m === null ? NaN : Number(m[1]) * SIZE_UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(bytes) || bytes <= 0 || bytes % 512 !== 0) {
    throw new XenError('EINVAL', `size ${JSON.stringify(text)}: want a positive number of bytes with K, M, G or T, a multiple of 512`);
  }
  return bytes;
}

/**
 * The devid Linux and libxl give a vdev (blkif_vdev_t / xen_vbd ids):
 * xvdX is 202<<8 | disk<<4 for the first 16 disks, then the extended form.
 */
export function vdevToDevid(vdev: string): number | null {
  const m = /^xvd([a-z]+)$/.exec(vdev);
  if (m === null) return null;
  let disk = 0;
  for (const c of m[1]!) disk = disk * 26 + (c.charCodeAt(0) - 96);
  disk -= 1;
  if (disk < 16) return (202 << 8) | (disk << 4);
  return disk < 1 << 20 ? (1 << 28) | (disk << 8) : null;
}

const DISK_KEYS = ['target', 'format', 'vdev', 'access'] as const;
/** Keywords that stand alone in a disk spec: `cdrom` (devtype=cdrom), `trusted`, `untrusted`. */
const DISK_FLAGS = new Set(['cdrom', 'trusted', 'untrusted']);

// libxl's disk spec (xl-disk-configuration.txt): key=value items, or the
// positional target,format,vdev,access; a `target=` item takes the rest.
function disk(item: string, fail: (message: string) => never, dir: string): DiskSpec {
  const v: Partial<Record<(typeof DISK_KEYS)[number], string>> = {};
  const flags = new Set<string>();
  let rest = item.trim();
  for (let pos = 0; rest !== ''; ) {
    const isTarget = rest.startsWith('target=');
    const comma = isTarget ? -1 : rest.indexOf(',');
    const part = (comma < 0 ? rest : rest.slice(0, comma)).trim();
    rest = comma < 0 ? '' : rest.slice(comma + 1).trim();
    const eq = part.indexOf('=');
    let key: string;
    let value: string;
    if (DISK_FLAGS.has(part)) {
      flags.add(part);
      continue;
    } else if (eq < 0) {
      key = DISK_KEYS[pos++] ?? fail(`too many positional parameters in ${JSON.stringify(item)}`);
      value = part;
    } else {
      key = part.slice(0, eq).trim();
      value = part.slice(eq + 1).trim();
    }
    if (key === 'devtype') {
      if (value !== 'cdrom' && value !== 'disk') fail(`devtype ${value}: want disk or cdrom`);
      if (value === 'cdrom') flags.add('cdrom');
      continue;
    }
    if (key === 'backendtype' || key === 'backend') continue;
    if (!(DISK_KEYS as readonly string[]).includes(key)) fail(`unknown disk parameter ${key}`);
    v[key as (typeof DISK_KEYS)[number]] = value;
  }
  const format = v.format ?? 'raw';
  if (format !== 'raw' && format !== 'memory' && format !== 'null') fail(`format ${format}: want raw, memory or null`);
  if (v.vdev === undefined) fail('vdev is required');
  const devid = vdevToDevid(v.vdev) ?? fail(`vdev ${v.vdev}: want xvda, xvdb, ...`);
  const access = v.access ?? (flags.has('cdrom') ? 'ro' : 'rw');
  if (!['r', 'ro', 'w', 'rw'].includes(access)) fail(`access ${access}: want r, ro, w or rw`);
  if (flags.has('cdrom') && (access === 'w' || access === 'rw')) fail('a cdrom is read-only');
  if (flags.has('trusted') && flags.has('untrusted')) fail('both trusted and untrusted');
  if (v.target === undefined || v.target === '') fail('target is required');
  let params: string;
  if (format === 'raw') params = isAbsolute(v.target) ? v.target : resolve(dir, v.target);
  else {
    try {
      params = String(parseSize(v.target));
    } catch (err) {
      fail((err as Error).message.replace(/^EINVAL: /, ''));
    }
  }
  const spec: DiskSpec = { vdev: v.vdev, devid, type: format === 'raw' ? 'file' : format, params, readOnly: access === 'r' || access === 'ro' };
  if (flags.has('cdrom')) spec.cdrom = true;
  if (flags.has('untrusted')) spec.trusted = false;
  return spec;
}

/** One disk spec as `block-attach` takes it; a relative target is taken from `dir`. EINVAL names what is wrong. */
export function parseDiskSpec(item: string, dir: string): DiskSpec {
  return disk(item, (message) => {
    throw new XenError('EINVAL', `disk spec ${JSON.stringify(item)}: ${message}`);
  }, dir);
}

function disks(e: XlEntry, file: string): DiskSpec[] {
  const fail = (message: string): never => {
    throw new XenError('ECONFIG', `${file}:${e.line}: disk: ${message}`);
  };
  if (!Array.isArray(e.value) || e.value.some((x) => typeof x !== 'string')) fail('must be a list of strings');
  const out = (e.value as string[]).map((item) => disk(item, fail, dirname(file)));
  const seen = new Set<number>();
  for (const d of out) {
    if (seen.has(d.devid)) fail(`vdev ${d.vdev} given twice`);
    seen.add(d.devid);
  }
  return out;
}

const VIF_KEYS = ['mac', 'bridge', 'rate', 'trusted', 'pcap', 'mtu', 'backend'] as const;
/** libxl keys that mean nothing here (no hotplug scripts, no emulated NIC). */
const VIF_IGNORED = new Set(['script', 'type', 'model', 'vifname', 'ip', 'gatewaydev']);
const RATE_UNITS: Record<string, number> = { '': 1, K: 1e3, M: 1e6, G: 1e9 };
const DEFAULT_RATE_INTERVAL_US = 50_000;

/**
 * libxlu's vif rate: `<n>[KMG](b|B)/s[@<n>(s|ms|us)]`, bits or bytes per
 * second over an interval (50 ms by default); what netback reads as
 * "bytes,usec" (bytes per interval).
 */
export function parseRate(text: string): { bytes: number; usec: number } {
  const m = /^(\d+)([kKmMgG]?)([bB])\/s(?:@(\d+)(s|ms|us))?$/.exec(text.trim());
  if (m === null) throw new XenError('EINVAL', `rate ${JSON.stringify(text)}: want <n>[K|M|G]b/s or B/s, optionally @<n>s|ms|us`);
  const perSec = (Number(m[1]) * RATE_UNITS[m[2]!.toUpperCase()]!) / (m[3] === 'b' ? 8 : 1);
  const usec = m[4] === undefined ? DEFAULT_RATE_INTERVAL_US : Number(m[4]) * (m[5] === 's' ? 1e6 : m[5] === 'ms' ? 1e3 : 1);
  const bytes = Math.floor((perSec * usec) / 1e6);
  if (!Number.isSafeInteger(bytes) || bytes < 1 || usec < 1 || usec > 60e6) {
    throw new XenError('EINVAL', `rate ${JSON.stringify(text)}: gives ${bytes} bytes per ${usec} us`);
  }
  return { bytes, usec };
}

/**
 * The MAC of a vif without `mac=`: the Xen OUI 00:16:3e, then 23 bits of
 * SHA-256 over the domain name and the devid (libxl draws them at random).
 * So a run replays under --seed, and a guest keeps its address (and its
 * DHCP lease) across restarts, save and restore.
 */
export function derivedMac(domainName: string, devid: number): string {
  const h = createHash('sha256').update(`${domainName}/vif/${devid}`).digest();
  return formatMac(Uint8Array.from([0x00, 0x16, 0x3e, h[0]! & 0x7f, h[1]!, h[2]!]));
}

// xl-network-configuration: comma-separated key=value items.
function vif(item: string, fail: (message: string) => never, dir: string, devid: number): NicSpec {
  const v: Partial<Record<(typeof VIF_KEYS)[number], string>> = {};
  for (const raw of item.split(',')) {
    const part = raw.trim();
    if (part === '') continue;
    const eq = part.indexOf('=');
    if (eq < 0) fail(`${JSON.stringify(part)}: want key=value`);
    const key = part.slice(0, eq).trim();
    const value = part.slice(eq + 1).trim();
    if (VIF_IGNORED.has(key)) continue;
    if (!(VIF_KEYS as readonly string[]).includes(key)) fail(`unknown vif parameter ${key}`);
    if (v[key as (typeof VIF_KEYS)[number]] !== undefined) fail(`${key} given twice`);
    v[key as (typeof VIF_KEYS)[number]] = value;
  }
  const attempt = <T>(f: () => T): T => {
    try {
      return f();
    } catch (err) {
      return fail((err as Error).message.replace(/^EINVAL: /, ''));
    }
  };
  // Without mac= the MAC is derived once the domain's name is known (derivedMac).
  const mac = v.mac === undefined ? '' : formatMac(attempt(() => parseMac(v.mac!)));
  if (v.mac !== undefined && (parseMac(mac)[0]! & 1) !== 0) fail(`mac ${v.mac} is a multicast address`);
  const bridge = v.bridge ?? 'xenbr0';
  if (!/^[A-Za-z0-9._-]{1,15}$/.test(bridge)) fail(`bridge ${JSON.stringify(bridge)}: 1-15 of A-Za-z0-9._-`);
  const mtu = v.mtu === undefined ? 1500 : Number(v.mtu);
  if (!Number.isInteger(mtu) || mtu < 68 || mtu > 65521) fail(`mtu ${v.mtu}: want 68..65521`);
  if (v.trusted !== undefined && !['0', '1'].includes(v.trusted)) fail(`trusted ${v.trusted}: want 0 or 1`);
  if (v.pcap === '' || v.backend === '') fail(`${v.pcap === '' ? 'pcap' : 'backend'} needs a value`);
  return {
    devid, mac, bridge, mtu,
    rate: v.rate === undefined ? null : attempt(() => parseRate(v.rate!)),
    trusted: v.trusted !== '0',
    pcap: v.pcap === undefined ? null : isAbsolute(v.pcap) ? v.pcap : resolve(dir, v.pcap),
    backend: v.backend ?? null,
  };
}

/**
 * One vif spec as `network-attach` takes it, for interface `devid` of the
 * domain `domainName`; a relative pcap is taken from `dir`. EINVAL names what is wrong.
 */
export function parseNicSpec(item: string, dir: string, devid: number, domainName: string): NicSpec {
  const nic = vif(item, (message) => {
    throw new XenError('EINVAL', `vif spec ${JSON.stringify(item)}: ${message}`);
  }, dir, devid);
  if (nic.mac === '') nic.mac = derivedMac(domainName, devid);
  return nic;
}

function vifs(e: XlEntry, file: string): NicSpec[] {
  const fail = (message: string): never => {
    throw new XenError('ECONFIG', `${file}:${e.line}: vif: ${message}`);
  };
  if (!Array.isArray(e.value) || e.value.some((x) => typeof x !== 'string')) fail('must be a list of strings');
  const out = (e.value as string[]).map((item, devid) => vif(item, fail, dirname(file), devid));
  checkMacs(out, fail);
  return out;
}

function checkMacs(nics: NicSpec[], fail: (message: string) => never): void {
  const seen = new Set<string>();
  for (const n of nics) {
    if (n.mac !== '' && seen.has(n.mac)) fail(`mac ${n.mac} given twice`);
    seen.add(n.mac);
  }
}
