// `xenpv fuzz xenstore`: a guest that abuses xenstored, and the checks that
// xenstored holds. Everything runs in one thread and one turn of the event
// loop per step, driven by a seeded generator, so a seed replays a run
// exactly (the digest of every byte the guests received proves it).
//
// Cast: domain 5, the attacker, speaks raw bytes on its store page (valid
// requests, quota bursts, permission probes, malformed headers, partial
// messages, deaf spells that leave answers unread, reconnects mid-message);
// domain 6, a bystander, keeps private nodes and reads and writes its own
// through a well-behaved client; dom0 probes the store directly. Secrets
// carry a marker that must never reach the attacker in any reply or event.

import { createHash, type Hash } from 'node:crypto';
import { offsetOf } from '../abi/layout.js';
import {
  XENSTORE_CONNECTED, XENSTORE_RECONNECT, XENSTORE_RING_SIZE, XS_CONTROL, XS_DIRECTORY, XS_DIRECTORY_PART, XS_ERROR,
  XS_GET_DOMAIN_PATH, XS_GET_PERMS, XS_INTRODUCE, XS_IS_DOMAIN_INTRODUCED, XS_MKDIR, XS_READ, XS_RELEASE, XS_RESET_WATCHES,
  XS_RESUME, XS_RM, XS_SET_PERMS, XS_SET_TARGET, XS_TRANSACTION_END, XS_TRANSACTION_START, XS_UNWATCH, XS_WATCH,
  XS_WATCH_EVENT, XS_WRITE, xenstore_domain_interface as intf, xsd_errors,
} from '../abi/xs_wire.js';
import { DEFAULT_LIMITS, Xenstored, XenstoredRing, type XenstoredLimits, type XsConnection } from '../backends/xenstored.js';
import { FramePage, MemoryViews, PAGE_SIZE } from '../hypervisor/page.js';
import { XsRing } from '../xenstore/ring.js';
import { XsDecoder, encodeMessage, joinStrings, joinWrite, splitStrings, type XsMessage } from '../xenstore/wire.js';
import { MAX_VIOLATIONS, type FuzzReport } from './report.js';
import { Rng } from './rng.js';

export type { FuzzReport };

const ATTACKER = 5;
const BYSTANDER = 6;
const MARKER = Buffer.from('S3CR3T');
const REQ = offsetOf(intf, 'req');
const RSP = offsetOf(intf, 'rsp');
const REQ_CONS = offsetOf(intf, 'req_cons');
const REQ_PROD = offsetOf(intf, 'req_prod');
const RSP_CONS = offsetOf(intf, 'rsp_cons');
const RSP_PROD = offsetOf(intf, 'rsp_prod');
const ERROR = offsetOf(intf, 'error');
const CONNECTION = offsetOf(intf, 'connection');
const MASK = XENSTORE_RING_SIZE - 1;
const CANARY = 0xa5;
const TAIL_CANARY = 0x5a;
const PROBE_EVERY = 64;
const CANARY_EVERY = 1024;
const MAX_OUT_BYTES = 1 << 18;
const WIRE_ERRORS = new Set(xsd_errors.map((e) => e.errstring));

export type XenstoreFuzzOptions = {
  seed: number;
  steps: number;
  /** A dom0 or bystander request answered later than this breaks the latency invariant. */
  latencyBoundMs?: number;
  limits?: Partial<XenstoredLimits>;
  onProgress?: (step: number) => void;
  /** The xenstored under attack; a test hands in a deliberately weakened one to see the harness catch it. */
  makeXenstored?: (limits: Partial<XenstoredLimits> | undefined) => Xenstored;
};

type Mode = 'mixed' | 'nodes' | 'watches' | 'tx' | 'deaf' | 'storm' | 'garbage' | 'probe' | 'reconnect' | 'reintroduce';
const MODE_WEIGHTS: Record<Mode, number> = {
  mixed: 30, nodes: 8, watches: 6, tx: 6, deaf: 6, storm: 6, garbage: 6, probe: 20, reconnect: 3, reintroduce: 1,
};

/** What a request must get back: `fail` for anything the attacker may not do. */
type Pending = { type: number; mustFail: string | null };

const PRIVILEGED = [XS_CONTROL, XS_INTRODUCE, XS_RELEASE, XS_IS_DOMAIN_INTRODUCED, XS_RESUME, XS_SET_TARGET];
const READS = new Set([XS_READ, XS_DIRECTORY, XS_DIRECTORY_PART, XS_GET_PERMS]);
const WRITES = new Set([XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS]);

/** The attacker's page: three pages of memory, the store page in the middle, canaries around it. */
class RawGuest {
  readonly mem = new MemoryViews(new SharedArrayBuffer(3 * PAGE_SIZE));
  readonly page = new FramePage(this.mem, 1, true);
  /** What we put in req[]; xenstored must never write there. */
  readonly reqShadow = new Uint8Array(XENSTORE_RING_SIZE);
  server!: XenstoredRing;
  prod = 0;
  cons = 0;
  decoder = new XsDecoder();
  out: Uint8Array[] = [];
  outBytes = 0;
  deaf = false;
  private readonly scratch = new Uint8Array(XENSTORE_RING_SIZE);

  constructor() {
    this.mem.u8.fill(CANARY, 0, PAGE_SIZE);
    this.mem.u8.fill(CANARY, 2 * PAGE_SIZE);
    this.resetPage();
  }

  /** A fresh page for a new introduction: zero intf, canary after it. */
  resetPage(): void {
    this.mem.u8.fill(0, PAGE_SIZE, PAGE_SIZE + intf.size);
    this.mem.u8.fill(TAIL_CANARY, PAGE_SIZE + intf.size, 2 * PAGE_SIZE);
    this.reqShadow.fill(0);
    this.resetShadows();
  }

  /** Indices back to zero (a reconnect); req[] keeps its bytes, and so does our copy of it. */
  resetShadows(): void {
    this.prod = 0;
    this.cons = 0;
    this.decoder = new XsDecoder();
    this.out = [];
    this.outBytes = 0;
  }

  queue(bytes: Uint8Array): boolean {
    if (this.outBytes + bytes.length > MAX_OUT_BYTES) return false;
    this.out.push(bytes);
    this.outBytes += bytes.length;
    return true;
  }

  /** Move queued bytes onto req[] as far as xenstored has made room. */
  push(): boolean {
    let moved = false;
    while (this.out.length > 0) {
      const head = this.out[0]!;
      const free = XENSTORE_RING_SIZE - ((this.prod - this.page.load32(REQ_CONS)) >>> 0);
      const n = Math.max(0, Math.min(free, head.length));
      for (let i = 0; i < n; i++) {
        const at = (this.prod + i) & MASK;
        this.page.store8(REQ + at, head[i]!);
        this.reqShadow[at] = head[i]!;
      }
      if (n === 0) break;
      moved = true;
      this.prod = (this.prod + n) >>> 0;
      this.outBytes -= n;
      if (n === head.length) this.out.shift();
      else this.out[0] = head.subarray(n);
    }
    if (moved) this.page.store32(REQ_PROD, this.prod);
    return moved;
  }

  /** Take what xenstored produced; null when it produced more than a ring. */
  pull(): XsMessage[] | null {
    if (this.deaf) return [];
    const avail = (this.page.load32(RSP_PROD) - this.cons) >>> 0;
    if (avail > XENSTORE_RING_SIZE) return null;
    for (let i = 0; i < avail; i++) this.scratch[i] = this.page.load8(RSP + ((this.cons + i) & MASK));
    this.cons = (this.cons + avail) >>> 0;
    this.page.store32(RSP_CONS, this.cons);
    return this.decoder.feed(this.scratch.subarray(0, avail));
  }
}

/** A well-behaved guest on its own page: one request, one synchronous answer. */
class Bystander {
  private readonly ring: XsRing;
  private readonly got: XsMessage[] = [];
  private reqId = 1;

  constructor(xsd: Xenstored, private readonly hash: Hash) {
    const page = new FramePage(new MemoryViews(new SharedArrayBuffer(PAGE_SIZE)), 0, true);
    let server: XenstoredRing | undefined;
    this.ring = new XsRing({ page, side: 'front', notify: () => server?.intr(), deliver: (m) => this.got.push(m) });
    server = new XenstoredRing(xsd, BYSTANDER, page, () => this.ring.intr());
  }

  request(type: number, ...args: string[]): XsMessage | undefined {
    const reqId = this.reqId++;
    this.ring.send({ type, req_id: reqId, tx_id: 0, payload: payloadOf(type, args) });
    this.ring.intr();
    for (const m of this.got.splice(0)) {
      digestMessage(this.hash, m);
      if (m.req_id === reqId && m.type !== XS_WATCH_EVENT) return m;
    }
    return undefined;
  }
}

const digestHeader = Buffer.alloc(12);

/** A request's payload: a WRITE's value is raw bytes after the path's NUL, every other argument NUL-terminated. */
function payloadOf(type: number, args: readonly string[]): Uint8Array {
  return type === XS_WRITE && args.length === 2 ? joinWrite(args[0]!, args[1]!) : joinStrings(args);
}

function digestMessage(hash: Hash, m: XsMessage): void {
  const hdr = digestHeader;
  hdr.writeUInt32LE(m.type, 0);
  hdr.writeUInt32LE(m.req_id, 4);
  hdr.writeUInt32LE(m.payload.length, 8);
  hash.update(hdr);
  hash.update(m.payload);
}

function text(m: XsMessage | undefined): string | undefined {
  if (m === undefined || m.type === XS_ERROR) return undefined;
  return Buffer.from(m.payload).toString('latin1');
}

export class XenstoreFuzz {
  readonly report: FuzzReport;
  private readonly rng: Rng;
  private readonly xsd: Xenstored;
  private readonly hash = createHash('sha256');
  private readonly guest = new RawGuest();
  private readonly bystander: Bystander;
  private readonly dom0: { conn: XsConnection; reply: XsMessage | undefined };
  private readonly pending = new Map<number, Pending>();
  private readonly tokens = new Set<string>();
  private readonly latencyBoundMs: number;
  /** The quotas the run asked for; the harness holds xenstored to these, not to what it says it has. */
  private readonly limits: XenstoredLimits;
  private step = 0;
  private reqId = 1;
  private mode: Mode = 'mixed';
  private modeLeft = 0;
  /** Garbage went out since the last reset: replies can no longer be matched to requests. */
  private desynced = false;
  private watchesHeld = 0;
  private openTx: number[] = [];
  private mayReadShared = true;
  private counter = 0;
  private nodeSeq = 0;

  constructor(private readonly opts: XenstoreFuzzOptions) {
    this.rng = new Rng(opts.seed);
    this.latencyBoundMs = opts.latencyBoundMs ?? 1000;
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.report = {
      harness: 'xenstore', seed: opts.seed, steps: 0, ms: 0, actions: {}, refusals: {}, ringBreaks: 0,
      maxProbeLatencyMs: 0, violations: [], digest: '',
    };
    this.xsd = opts.makeXenstored?.(opts.limits) ?? new Xenstored({ limits: opts.limits });
    const dom0 = { conn: undefined as unknown as XsConnection, reply: undefined as XsMessage | undefined };
    dom0.conn = this.xsd.connect(0, (m) => {
      if (m.type !== XS_WATCH_EVENT) dom0.reply = m;
    });
    this.dom0 = dom0;
    this.populate();
    this.bystander = new Bystander(this.xsd, this.hash);
    this.introduceAttacker();
  }

  private violation(what: string): void {
    if (this.report.violations.length < MAX_VIOLATIONS) this.report.violations.push({ step: this.step, what });
  }

  /** dom0's own request, answered before receive() returns. */
  private dom0Request(type: number, ...args: string[]): XsMessage {
    this.dom0.reply = undefined;
    this.dom0.conn.receive({ type, req_id: 1, tx_id: 0, payload: payloadOf(type, args) });
    const reply = this.dom0.reply as XsMessage | undefined;
    if (reply === undefined) throw new Error('dom0 got no answer');
    return reply;
  }

  private dom0Node(path: string, value: string | null, perms: string[]): void {
    if (value === null) this.dom0Request(XS_MKDIR, path);
    else this.dom0Request(XS_WRITE, path, value);
    this.dom0Request(XS_SET_PERMS, path, ...perms);
  }

  /** The tree the run starts from: homes, the bystander's secrets, a node shared with the attacker. */
  private populate(): void {
    this.dom0Node('/tool/private', null, ['n0']);
    this.dom0Node('/tool/private/S3CR3T-probe', 'S3CR3T-0', ['n0']);
    this.dom0Node(`/local/domain/${BYSTANDER}`, null, [`n${BYSTANDER}`]);
    this.dom0Node(`/local/domain/${BYSTANDER}/private`, null, [`n${BYSTANDER}`]);
    for (let i = 0; i < 8; i++) this.dom0Node(`/local/domain/${BYSTANDER}/private/S3CR3T-${i}`, `S3CR3T value ${i}`, [`n${BYSTANDER}`]);
    this.dom0Node(`/local/domain/${BYSTANDER}/shared`, 'shared', [`n${BYSTANDER}`, `r${ATTACKER}`]);
    this.dom0Node(`/local/domain/${BYSTANDER}/data`, null, [`n${BYSTANDER}`]);
    this.xsd.introduce(BYSTANDER, 0, 0);
  }

  /** What the toolstack does for a (new) attacker domain: a home it owns and its store ring. */
  private introduceAttacker(): void {
    this.dom0Node(`/local/domain/${ATTACKER}`, null, [`n${ATTACKER}`]);
    this.xsd.introduce(ATTACKER, 0, 0);
    this.guest.resetPage();
    this.guest.server = new XenstoredRing(this.xsd, ATTACKER, this.guest.page, () => undefined);
    this.resetTracking();
  }

  private resetTracking(): void {
    this.pending.clear();
    this.tokens.clear();
    this.desynced = false;
    this.watchesHeld = 0;
    this.openTx = [];
  }

  run(): FuzzReport {
    const start = performance.now();
    for (this.step = 0; this.step < this.opts.steps; this.step++) {
      const t0 = performance.now();
      this.attack();
      this.exchange();
      if (this.step % PROBE_EVERY === PROBE_EVERY - 1) this.probe();
      if (this.step % CANARY_EVERY === CANARY_EVERY - 1) this.checkPage();
      const took = performance.now() - t0;
      if (took > this.latencyBoundMs) this.violation(`step took ${took.toFixed(1)} ms`);
      if (this.step % 10_000 === 9_999) this.opts.onProgress?.(this.step + 1);
    }
    this.probe();
    this.checkPage();
    this.report.steps = this.opts.steps;
    this.report.ms = Math.round(performance.now() - start);
    this.report.digest = this.hash.digest('hex');
    return this.report;
  }

  private count(map: Record<string, number>, key: string): void {
    map[key] = (map[key] ?? 0) + 1;
  }

  /** One attacker action: stay in the current mode for a while, then pick another. */
  private attack(): void {
    if (this.modeLeft <= 0) {
      this.mode = this.rng.weighted(MODE_WEIGHTS);
      this.modeLeft = this.mode === 'nodes' || this.mode === 'watches' ? this.rng.range(50, 1200) : this.rng.range(1, 200);
      this.guest.deaf = this.mode === 'deaf' || (this.mode === 'storm' && this.rng.chance(0.5));
    }
    this.modeLeft--;
    this.count(this.report.actions, this.mode);
    switch (this.mode) {
      case 'nodes':
        {
        // Spread over directories: a directory's record counts its child names against the node size quota.
        const n = this.nodeSeq++ % 2000;
        return this.send(XS_WRITE, 0, null, `data/d${n % 50}/q${n}`, 'x'.repeat(this.rng.int(64)));
      }
      case 'watches':
        return this.watchOwn();
      case 'tx':
        return this.transaction();
      case 'storm':
        if (this.rng.chance(0.05)) return this.watchOwn();
        return this.send(XS_WRITE, 0, null, `data/s${this.rng.int(8)}`, String(this.step));
      case 'garbage':
        return this.garbage();
      case 'probe':
        return this.permissionProbe();
      case 'reconnect':
        this.modeLeft = 0;
        return this.reconnect();
      case 'reintroduce':
        this.modeLeft = 0;
        return this.reintroduce();
      default:
        return this.mixed();
    }
  }

  private send(type: number, txId: number, mustFail: string | null, ...args: string[]): void {
    this.sendRaw(type, txId, payloadOf(type, args), mustFail);
  }

  private sendRaw(type: number, txId: number, payload: Uint8Array, mustFail: string | null): void {
    if (payload.length > 4096) payload = payload.subarray(0, 4096);
    const reqId = this.reqId++ >>> 0;
    if (!this.guest.queue(encodeMessage({ type, req_id: reqId, tx_id: txId, payload }))) {
      this.count(this.report.actions, 'queue-full');
      return;
    }
    if (!this.desynced) this.pending.set(reqId, { type, mustFail });
  }

  private watchOwn(): void {
    const token = `t${this.rng.int(400)}`;
    this.tokens.add(token);
    this.send(XS_WATCH, 0, null, this.rng.pick(['data', `/local/domain/${ATTACKER}`, 'data/s1', `data/w${this.rng.int(300)}`]), token);
  }

  private transaction(): void {
    if (this.openTx.length === 0 || this.rng.chance(0.4)) return this.send(XS_TRANSACTION_START, 0, null, '');
    const tx = this.rng.pick(this.openTx);
    if (this.rng.chance(0.3)) {
      this.openTx = this.openTx.filter((t) => t !== tx);
      return this.send(XS_TRANSACTION_END, tx, null, this.rng.pick(['T', 'F']));
    }
    const path = `data/t${this.rng.int(16)}`;
    if (this.rng.chance(0.5)) return this.send(XS_WRITE, tx, null, path, String(this.step));
    return this.send(XS_READ, tx, null, path);
  }

  /** A path to aim at and what the attacker may do there. */
  private target(): { path: string; read: boolean; write: boolean } {
    const own = { read: true, write: true };
    const none = { read: false, write: false };
    const r = this.rng.int(100);
    if (r < 35) return { path: this.rng.pick(['data', `data/a${this.rng.int(20)}`, `data/s${this.rng.int(8)}`]), ...own };
    if (r < 45) return { path: `/local/domain/${ATTACKER}/x${this.rng.int(20)}`, ...own };
    if (r < 55) return { path: `/local/domain/${BYSTANDER}/shared`, read: this.mayReadShared, write: false };
    if (r < 75) {
      const p = this.rng.pick(['', '/private', '/private/x', '/data', '/data/counter', '/nonexistent']);
      return { path: `/local/domain/${BYSTANDER}${p}`, ...none };
    }
    if (r < 85) return { path: this.rng.pick(['/', '/tool', '/tool/private', '/local', '/local/domain', '/local/domain/0']), ...none };
    const bad = ['bad//path', 'trailing/', 'sp ace', `/local/domain/${ATTACKER}/${'y'.repeat(3100)}`, '', '@introduceDomain', '\u00ff\u0001'];
    return { path: this.rng.pick(bad), read: true, write: true };
  }

  private permissionProbe(): void {
    const t = this.target();
    const type = this.rng.pick([XS_READ, XS_DIRECTORY, XS_GET_PERMS, XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS]);
    const denied = READS.has(type) ? !t.read : !t.write;
    const why = denied ? `${type} on ${t.path.slice(0, 60)}` : null;
    if (type === XS_WRITE) return this.send(type, 0, why, t.path, 'w');
    if (type === XS_SET_PERMS) {
      const owner = this.rng.pick([ATTACKER, ATTACKER, 0, BYSTANDER]);
      // XSA-352: only a privileged domain hands a node to another owner.
      const handOff = owner !== ATTACKER ? `SET_PERMS owner ${owner} on ${t.path.slice(0, 60)}` : null;
      return this.send(type, 0, why ?? handOff, t.path, `n${owner}`, `r${this.rng.pick([0, BYSTANDER, ATTACKER])}`);
    }
    return this.send(type, 0, why, t.path);
  }

  private mixed(): void {
    if (this.rng.chance(0.1)) {
      const type = this.rng.pick(PRIVILEGED);
      return this.send(type, 0, `privileged op ${type}`, String(this.rng.pick([0, ATTACKER, BYSTANDER, 77])), '1', '2');
    }
    const type = this.rng.pick([
      XS_READ, XS_WRITE, XS_MKDIR, XS_RM, XS_DIRECTORY, XS_DIRECTORY_PART, XS_GET_PERMS, XS_WATCH, XS_UNWATCH,
      XS_RESET_WATCHES, XS_GET_DOMAIN_PATH, XS_TRANSACTION_START, 23, 99, 0xffff,
    ]);
    const t = this.target();
    const denied = READS.has(type) ? !t.read : WRITES.has(type) ? !t.write : false;
    const txId = this.rng.chance(0.05) ? this.rng.u32() : 0;
    switch (type) {
      case XS_WRITE:
        return this.send(type, txId, denied ? `WRITE ${t.path.slice(0, 60)}` : null, t.path, 'v'.repeat(this.rng.int(3000)));
      case XS_WATCH:
      case XS_UNWATCH: {
        const token = `t${this.rng.int(400)}`;
        if (type === XS_WATCH) this.tokens.add(token);
        return this.send(type, 0, null, t.path, token);
      }
      case XS_DIRECTORY_PART:
        return this.send(type, txId, denied ? `DIRECTORY_PART ${t.path.slice(0, 60)}` : null, t.path, String(this.rng.int(3)));
      default:
        return this.send(type, txId, denied ? `${type} on ${t.path.slice(0, 60)}` : null, t.path);
    }
  }

  /** Bytes that do not frame: random headers, lengths over the limit, messages cut short. */
  private garbage(): void {
    this.desynced = true;
    this.pending.clear();
    const kind = this.rng.int(4);
    const bytes = new Uint8Array(kind === 0 ? this.rng.range(1, 64) : 16 + this.rng.int(48));
    this.rng.fill(bytes);
    const view = new DataView(bytes.buffer);
    if (kind === 1 && bytes.length >= 16) view.setUint32(12, 4097 + this.rng.int(1 << 20), true); // over XENSTORE_PAYLOAD_MAX
    if (kind === 2 && bytes.length >= 16) view.setUint32(12, this.rng.int(4096), true); // a message cut short
    if (kind === 3 && bytes.length >= 16) view.setUint32(0, this.rng.pick([XS_READ, XS_WRITE, XS_WATCH]), true);
    this.guest.queue(bytes);
  }

  /** Half a message, then connection = XENSTORE_RECONNECT, as a guest resuming would. */
  private reconnect(): void {
    if (this.guest.server.error !== undefined) return this.reintroduce();
    const msg = encodeMessage({ type: XS_WRITE, req_id: 0, tx_id: 0, payload: joinStrings(['data/r', 'half']) });
    this.guest.queue(msg.subarray(0, this.rng.range(1, msg.length - 1)));
    this.guest.push();
    this.guest.page.store32(CONNECTION, XENSTORE_RECONNECT);
    this.intr();
    if (this.guest.page.load32(CONNECTION) !== XENSTORE_CONNECTED) this.violation('xenstored did not finish a reconnect');
    for (const at of [REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD]) {
      if (this.guest.page.load32(at) !== 0) this.violation(`reconnect left index at ${at} non-zero`);
    }
    this.guest.resetShadows();
    this.resetTracking();
  }

  /** The toolstack's answer to a guest whose ring is dead: release it, clean up, introduce it again. */
  private reintroduce(): void {
    this.dom0Request(XS_RM, `/local/domain/${ATTACKER}`);
    this.dom0Request(XS_RELEASE, String(ATTACKER));
    this.mayReadShared = false; // XSA-322: a released domain's id left every ACL
    this.introduceAttacker();
  }

  private intr(): void {
    try {
      this.guest.server.intr();
    } catch (err) {
      this.violation(`xenstored threw: ${(err as Error).message}`);
    }
  }

  /** Let both ends move until neither does. */
  private exchange(): void {
    for (let round = 0; round < 16; round++) {
      const pushed = this.guest.push();
      this.intr();
      const msgs = this.guest.pull();
      if (msgs === null) {
        this.violation('xenstored produced more than a ring of responses');
        return this.reintroduce();
      }
      if (this.guest.decoder.error !== undefined) this.violation(`xenstored's responses do not frame: ${this.guest.decoder.error.message}`);
      for (const m of msgs) this.check(m);
      if (!pushed && msgs.length === 0) break;
    }
    if (this.guest.server.error !== undefined || this.guest.page.load32(ERROR) !== 0) {
      this.report.ringBreaks++;
      this.reintroduce();
    }
  }

  /** Every message the attacker gets: no secret in it, and it answers what was asked. */
  private check(m: XsMessage): void {
    digestMessage(this.hash, m);
    if (Buffer.from(m.payload.buffer, m.payload.byteOffset, m.payload.length).indexOf(MARKER) >= 0) {
      this.violation(`a secret reached the attacker (type ${m.type})`);
    }
    if (m.type === XS_WATCH_EVENT) {
      const token = splitStrings(m.payload)[1];
      if (!this.desynced && (token === undefined || !this.tokens.has(token))) this.violation(`watch event with token ${token} never set`);
      return;
    }
    if (m.type === XS_ERROR) {
      const name = splitStrings(m.payload)[0] ?? '';
      if (!WIRE_ERRORS.has(name)) this.violation(`error reply ${JSON.stringify(name)} is not an errno name`);
      this.count(this.report.refusals, name);
    }
    if (this.desynced) return;
    const p = this.pending.get(m.req_id);
    if (p === undefined) return this.violation(`reply to req_id ${m.req_id}, never sent or answered twice`);
    this.pending.delete(m.req_id);
    if (m.type !== XS_ERROR && m.type !== p.type) this.violation(`reply type ${m.type} to a request of type ${p.type}`);
    if (m.type !== XS_ERROR && p.mustFail !== null) this.violation(`allowed: ${p.mustFail}`);
    if (p.type === XS_WATCH && m.type !== XS_ERROR) this.watchesHeld++;
    if (p.type === XS_UNWATCH && m.type !== XS_ERROR) this.watchesHeld--;
    if (p.type === XS_RESET_WATCHES && m.type !== XS_ERROR) this.watchesHeld = 0;
    if (p.type === XS_TRANSACTION_START && m.type !== XS_ERROR) this.openTx.push(Number(text(m)?.replace(/\0$/, '')));
  }

  /** dom0 and the bystander are served, in time, and nothing of theirs changed; quotas hold. */
  private probe(): void {
    const t0 = performance.now();
    const n = String(++this.counter);
    const secret = text(this.dom0Request(XS_READ, '/tool/private/S3CR3T-probe'));
    if (secret !== 'S3CR3T-0') this.violation(`dom0's node changed: ${secret}`);
    if (this.bystander.request(XS_WRITE, 'data/counter', n)?.type !== XS_WRITE) this.violation('bystander write refused');
    if (text(this.bystander.request(XS_READ, 'data/counter')) !== n) this.violation('bystander read back something else');
    const k = this.counter % 8;
    const mine = text(this.bystander.request(XS_READ, `private/S3CR3T-${k}`));
    if (mine !== `S3CR3T value ${k}`) this.violation(`bystander's private node changed: ${mine}`);
    // A write there fires watches: the attacker's must not hear of it.
    this.bystander.request(XS_WRITE, `private/S3CR3T-${k}`, `S3CR3T value ${k}`);
    const shared = text(this.bystander.request(XS_READ, 'shared'));
    if (shared !== 'shared') this.violation(`bystander's shared node changed: ${shared}`);
    const owned = this.xsd.db.owned.get(ATTACKER) ?? 0;
    if (owned > this.limits.maxNodes) this.violation(`attacker owns ${owned} nodes, quota ${this.limits.maxNodes}`);
    if (!this.desynced && this.watchesHeld > this.limits.maxWatches) this.violation(`attacker holds ${this.watchesHeld} watches`);
    const ms = performance.now() - t0;
    this.report.maxProbeLatencyMs = Math.max(this.report.maxProbeLatencyMs, Math.round(ms * 1000) / 1000);
    if (ms > this.latencyBoundMs) this.violation(`dom0 and bystander answered in ${ms.toFixed(1)} ms`);
  }

  /** xenstored wrote only where the interface lets it: not req[], not past the struct, not the pages around. */
  private checkPage(): void {
    const u8 = this.guest.mem.u8;
    for (let i = 0; i < PAGE_SIZE; i++) {
      if (u8[i] !== CANARY || u8[2 * PAGE_SIZE + i] !== CANARY) return this.violation('a write outside the store page');
    }
    for (let i = PAGE_SIZE + intf.size; i < 2 * PAGE_SIZE; i++) {
      if (u8[i] !== TAIL_CANARY) return this.violation('a write past xenstore_domain_interface');
    }
    for (let i = 0; i < XENSTORE_RING_SIZE; i++) {
      if (u8[PAGE_SIZE + REQ + i] !== this.guest.reqShadow[i]) return this.violation('xenstored wrote into req[]');
    }
  }
}

export function fuzzXenstore(opts: XenstoreFuzzOptions): FuzzReport {
  return new XenstoreFuzz(opts).run();
}
