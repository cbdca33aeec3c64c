// xen_suspend and xen_resume (Linux drivers/xen/manage.c do_suspend): the
// toolstack writes "suspend" to control/shutdown; the kernel asks the image
// for the state it wants back, quiesces every driver (I/O in flight
// completes, new I/O waits), leaves a resume record in its own RAM and calls
// SCHEDOP_shutdown(SHUTDOWN_suspend) with the record's frame as the third
// argument, as a PV kernel passes its start_info. The toolstack then writes
// the domain's memory to a file and destroys it. The hypercall returns only
// when the toolstack cancels (resumes the domain in place): drivers resume
// and the image is told.
//
// A domain restored from the file runs a new kernel thread: the JavaScript
// heap of the old one cannot be written to a file, so what carries over is
// the memory and, through the record, the image's state. The new kernel
// reads the record before it allocates a page (readResumeRecord), attaches
// its devices afresh (the frontends connect to the new backends) and hands
// the image its state.

import { __HYPERVISOR_sched_op } from '../abi/xen.js';
import { SCHEDOP_shutdown, SHUTDOWN_suspend } from '../abi/sched.js';
import { XenError } from '../errors.js';
import { PAGE_SIZE, type MemoryViews } from '../hypervisor/page.js';
import { eachDriver, type XenSoftc } from './xen.js';

const MAGIC = 'XPVRESUM';
/** Magic, then the JSON's length in bytes (u32 LE). */
const HEADER_BYTES = 12;
const MAX_RECORD_BYTES = 16 << 20;
const RECORD_VERSION = 1;

/** What a suspending kernel leaves for its restore. */
export type ResumeRecord = { version: number; image: unknown };

/** The image's part: its state out on suspend, and back when a cancelled suspend resumes in place. */
export type SuspendHooks = {
  suspend(): Promise<unknown>;
  resumed(state: unknown): void;
};

function encode(record: ResumeRecord): Uint8Array {
  const json = Buffer.from(JSON.stringify(record) ?? 'null', 'utf8');
  if (json.length > MAX_RECORD_BYTES) throw new XenError('E2BIG', `resume record of ${json.length} bytes`);
  const out = new Uint8Array(HEADER_BYTES + json.length);
  out.set(Buffer.from(MAGIC, 'latin1'), 0);
  new DataView(out.buffer).setUint32(8, json.length, true);
  out.set(json, HEADER_BYTES);
  return out;
}

/** The record at frame `gfn` of this domain's memory; EINVAL when there is none. */
export function readResumeRecord(mem: MemoryViews, gfn: number): ResumeRecord {
  if (!Number.isInteger(gfn) || gfn < 1 || gfn >= mem.nrPages) throw new XenError('EINVAL', `resume record frame ${gfn}`);
  const at = gfn * PAGE_SIZE;
  const head = mem.u8.subarray(at, at + HEADER_BYTES);
  const len = new DataView(head.buffer, head.byteOffset, HEADER_BYTES).getUint32(8, true);
  if (Buffer.from(head.subarray(0, 8)).toString('latin1') !== MAGIC || len > MAX_RECORD_BYTES || at + HEADER_BYTES + len > mem.u8.length) {
    throw new XenError('EINVAL', `no resume record at frame ${gfn}`);
  }
  const record = JSON.parse(Buffer.from(mem.u8.subarray(at + HEADER_BYTES, at + HEADER_BYTES + len)).toString('utf8')) as ResumeRecord;
  if (record.version !== RECORD_VERSION) throw new XenError('EINVAL', `resume record version ${String(record.version)}`);
  return record;
}

// do_suspend: image, drivers, record, hypercall; and on a cancelled suspend, the reverse.
export async function xenSuspend(sc: XenSoftc, image: SuspendHooks): Promise<void> {
  const state = await image.suspend();
  await eachDriver(sc, 'suspend');
  const bytes = encode({ version: RECORD_VERSION, image: state });
  const pages = Math.ceil(bytes.length / PAGE_SIZE);
  const gfn = sc.physmem.alloc(pages);
  sc.mem.u8.set(bytes, gfn * PAGE_SIZE);
  await sc.console.drained(2000);
  sc.log('suspending, resume record at frame %d (%d bytes)', gfn, bytes.length);
  const rc = sc.hypercall(__HYPERVISOR_sched_op, SCHEDOP_shutdown, { reason: SHUTDOWN_suspend, srec: gfn });
  // Here only when the toolstack resumed this domain in place (rc 1: cancelled).
  sc.physmem.free(gfn, pages);
  if (rc < 0) sc.log('SCHEDOP_shutdown(suspend) failed: %d', rc);
  sc.log('suspend cancelled: resuming');
  await eachDriver(sc, 'resume');
  image.resumed(state);
}
