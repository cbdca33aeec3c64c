// `xl save` and `xl restore` in dom0's toolstack (libxl's save helper and
// domain_restore). Save asks the guest to suspend (control/shutdown =
// suspend; lib/xen/suspend.ts is the guest's half), waits, bounded, until
// the hypervisor reports it shut down for suspend, then writes the domain's
// configuration and the RAM pages that are not all zero to the file, and
// destroys the domain. Restore builds a new domain from the configuration
// (new backends for its disks), writes the pages back and starts its kernel
// with the resume record's frame. The file is written before the guest is
// asked anything, so a path that cannot be written costs the guest nothing;
// a write that fails later resumes the guest in place.
//
// The file: the line "XENPV-SAVE 1", one line of JSON
//   {"spec": DomainSpec, "nrPages": n, "ramPages": r, "record": gfn}
// and then for each page a u32 LE frame number and its 4096 bytes; a frame
// number of 0xffffffff ends it.

import { closeSync, fstatSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { XenError } from '../errors.js';
import { PAGE_SIZE, type Page } from '../hypervisor/page.js';
import { logger } from '../log.js';
import type { XenStore } from '../xenstore/xenstore.js';
import type { DomainSpec, LifecycleAction } from './toolstack.js';

const log = logger('toolstack', 'save');

const MAGIC = 'XENPV-SAVE 1\n';
const END = 0xffffffff;
const SUSPEND_TIMEOUT_MS = 30_000;
const BATCH_PAGES = 256;
const MAX_HEADER_BYTES = 1 << 20;

/** A domain as save and restore need to see it. */
export type SaveDomain = { domid: number; spec: DomainSpec; onSuspended: (() => void) | null };

/** What save and restore need of the toolstack. */
export type SaveHost = {
  readonly xs: XenStore;
  running(domid: number): SaveDomain;
  mapForeign(domid: number, gfns: number[]): Page[];
  /** Total frames of the domain, the RAM frames below the builder's special pages, the suspend record. */
  frames(domid: number): { nrPages: number; ramPages: number; record: number };
  resumeDomain(domid: number): void;
  finish(m: SaveDomain, reason: string, action: LifecycleAction | 'saved'): Promise<void>;
  build(spec: DomainSpec): Promise<SaveDomain>;
  start(m: SaveDomain, resume: number): Promise<void>;
  discard(m: SaveDomain): Promise<void>;
};

type Header = { spec: DomainSpec; nrPages: number; ramPages: number; record: number };

/** Ask the guest to suspend; resolves once it has (ETIMEDOUT, and the guest runs on, if it does not). */
async function suspend(host: SaveHost, m: SaveDomain): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const suspended = new Promise<void>((resolve, reject) => {
    m.onSuspended = resolve;
    timer = setTimeout(() => reject(new XenError('ETIMEDOUT', `${m.spec.name} did not suspend within ${SUSPEND_TIMEOUT_MS} ms`)), SUSPEND_TIMEOUT_MS);
  });
  try {
    await host.xs.write(`/local/domain/${m.domid}/control/shutdown`, 'suspend');
    await suspended;
  } finally {
    clearTimeout(timer);
    m.onSuspended = null;
  }
}

function writeAll(fd: number, bytes: Uint8Array): void {
  for (let done = 0; done < bytes.length; ) done += writeSync(fd, bytes, done, bytes.length - done);
}

/** The RAM pages that are not all zero, each after its frame number. */
function writePages(host: SaveHost, fd: number, domid: number, ramPages: number): number {
  const page = new Uint8Array(PAGE_SIZE);
  const words = new BigUint64Array(page.buffer);
  const gfnBytes = new Uint8Array(4);
  const gfnView = new DataView(gfnBytes.buffer);
  let written = 0;
  for (let first = 0; first < ramPages; first += BATCH_PAGES) {
    const gfns = Array.from({ length: Math.min(BATCH_PAGES, ramPages - first) }, (_, i) => first + i);
    const mapped = host.mapForeign(domid, gfns);
    for (let i = 0; i < gfns.length; i++) {
      mapped[i]!.read(0, page);
      if (words.every((w) => w === 0n)) continue;
      gfnView.setUint32(0, gfns[i]!, true);
      writeAll(fd, gfnBytes);
      writeAll(fd, page);
      written++;
    }
  }
  gfnView.setUint32(0, END, true);
  writeAll(fd, gfnBytes);
  return written;
}

/** `xl save NAME FILE`: the domain suspends, its memory and config go to `file`, the domain goes. */
export async function saveDomain(host: SaveHost, domid: number, file: string): Promise<{ pages: number }> {
  const m = host.running(domid);
  let fd: number;
  try {
    fd = openSync(file, 'w', 0o600);
  } catch (err) {
    throw new XenError((err as NodeJS.ErrnoException).code ?? 'EIO', `${file}: ${(err as Error).message}`);
  }
  let pages: number;
  try {
    await suspend(host, m);
    try {
      const f = host.frames(domid);
      const header: Header = { spec: m.spec, nrPages: f.nrPages, ramPages: f.ramPages, record: f.record };
      writeAll(fd, Buffer.from(MAGIC + JSON.stringify(header) + '\n', 'utf8'));
      pages = writePages(host, fd, domid, f.ramPages);
    } catch (err) {
      log('writing %s failed, %s resumes: %s', file, m.spec.name, (err as Error).message);
      host.resumeDomain(domid);
      throw err;
    }
  } catch (err) {
    // Only a file of ours goes: `file` may name a device.
    if (fstatSync(fd).isFile()) rmSync(file, { force: true });
    closeSync(fd);
    throw err instanceof XenError ? err : new XenError((err as NodeJS.ErrnoException).code ?? 'EIO', `${file}: ${(err as Error).message}`);
  }
  closeSync(fd);
  log('%s saved to %s: %d pages', m.spec.name, file, pages);
  await host.finish(m, 'suspend', 'saved');
  return { pages };
}

/** Reads a save file in order, bounded, with errors that say what is wrong with it. */
class SaveReader {
  private readonly buf = Buffer.alloc(64 * 1024);
  private have = 0;
  private at = 0;

  constructor(
    private readonly fd: number,
    private readonly file: string,
  ) {}

  private fill(): boolean {
    if (this.at > 0) {
      this.buf.copy(this.buf, 0, this.at, this.have);
      this.have -= this.at;
      this.at = 0;
    }
    const n = readSync(this.fd, this.buf, this.have, this.buf.length - this.have, null);
    this.have += n;
    return n > 0;
  }

  bad(message: string): XenError {
    return new XenError('EINVAL', `${this.file}: not a xenpv save file: ${message}`);
  }

  line(max: number): string {
    let text = '';
    for (;;) {
      const nl = this.buf.indexOf(10, this.at);
      if (nl >= 0 && nl < this.have) {
        text += this.buf.toString('utf8', this.at, nl);
        this.at = nl + 1;
        return text;
      }
      text += this.buf.toString('utf8', this.at, this.have);
      this.at = this.have;
      if (text.length > max) throw this.bad('a header line too long');
      if (!this.fill()) throw this.bad('it ends in its header');
    }
  }

  bytes(n: number): Buffer {
    while (this.have - this.at < n) if (!this.fill()) throw this.bad('it ends in a page');
    const out = this.buf.subarray(this.at, this.at + n);
    this.at += n;
    return out;
  }
}

function checkHeader(h: unknown, r: SaveReader): Header {
  const o = h as Partial<Header>;
  const s = o.spec as Partial<DomainSpec> | undefined;
  const whole = (v: unknown, min: number): boolean => typeof v === 'number' && Number.isInteger(v) && v >= min;
  if (typeof h !== 'object' || h === null || s === undefined || typeof s !== 'object') throw r.bad('no configuration');
  if (typeof s.name !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(s.name) || typeof s.kernel !== 'string' || typeof s.extra !== 'string') throw r.bad('configuration');
  if (!whole(s.memoryMiB, 1) || !whole(s.vcpus, 1) || !whole(o.nrPages, 1) || !whole(o.ramPages, 1) || !whole(o.record, 1)) throw r.bad('sizes');
  if (s.cpus !== undefined && (!Array.isArray(s.cpus) || !s.cpus.every((c) => whole(c, 0)))) throw r.bad('cpus');
  if (o.ramPages! > o.nrPages! || o.record! >= o.ramPages!) throw r.bad('frames');
  return o as Header;
}

/** `xl restore FILE`: a new domain from the file; its kernel resumes from the record. */
export async function restoreDomain(host: SaveHost, file: string): Promise<{ domid: number; name: string }> {
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch (err) {
    throw new XenError((err as NodeJS.ErrnoException).code ?? 'EIO', `${file}: ${(err as Error).message}`);
  }
  try {
    const r = new SaveReader(fd, file);
    if (r.line(MAGIC.length) + '\n' !== MAGIC) throw r.bad('no XENPV-SAVE line');
    let header: Header;
    try {
      header = checkHeader(JSON.parse(r.line(MAX_HEADER_BYTES)), r);
    } catch (err) {
      throw err instanceof XenError ? err : r.bad((err as Error).message);
    }
    const m = await host.build(header.spec);
    try {
      const f = host.frames(m.domid);
      if (f.nrPages !== header.nrPages || f.ramPages !== header.ramPages) throw r.bad(`${header.nrPages} pages, the new domain has ${f.nrPages}`);
      let pages = 0;
      for (let gfn = r.bytes(4).readUInt32LE(0); gfn !== END; gfn = r.bytes(4).readUInt32LE(0)) {
        if (gfn >= f.ramPages) throw r.bad(`frame ${gfn} beyond RAM`);
        host.mapForeign(m.domid, [gfn])[0]!.write(0, r.bytes(PAGE_SIZE));
        pages++;
      }
      log('%s restored from %s: %d pages', header.spec.name, file, pages);
    } catch (err) {
      await host.discard(m);
      throw err;
    }
    await host.start(m, header.record);
    return { domid: m.domid, name: header.spec.name };
  } finally {
    closeSync(fd);
  }
}
