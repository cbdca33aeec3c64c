// A pcap capture file (the libpcap format that tshark and tcpdump read):
// a 24-byte global header, then a 16-byte record header before each frame.
// Nanosecond timestamps (magic 0xa1b23c4d), LINKTYPE_ETHERNET. Writes are
// synchronous so a capture is complete the moment the frame was handed on;
// the two headers are preallocated, so a frame costs no allocation.

import { closeSync, openSync, writeSync } from 'node:fs';
import { XenError } from './errors.js';

const PCAP_MAGIC_NS = 0xa1b23c4d;
const LINKTYPE_ETHERNET = 1;
const SNAPLEN = 262144;
const GLOBAL_HEADER_BYTES = 24;
const RECORD_HEADER_BYTES = 16;

export class PcapWriter {
  private fd: number;
  private readonly record = new Uint8Array(RECORD_HEADER_BYTES);
  private readonly view = new DataView(this.record.buffer);
  frames = 0;

  /** Create (or truncate) `path` and write the global header. */
  constructor(readonly path: string) {
    try {
      this.fd = openSync(path, 'w');
    } catch (err) {
      throw new XenError((err as { code?: string }).code ?? 'EIO', `pcap ${path}: ${(err as Error).message}`);
    }
    const header = new DataView(new ArrayBuffer(GLOBAL_HEADER_BYTES));
    header.setUint32(0, PCAP_MAGIC_NS, true);
    header.setUint16(4, 2, true); // version 2.4
    header.setUint16(6, 4, true);
    header.setUint32(16, SNAPLEN, true);
    header.setUint32(20, LINKTYPE_ETHERNET, true);
    writeSync(this.fd, new Uint8Array(header.buffer));
  }

  /** Append one Ethernet frame; `timeNs` defaults to the wall clock. */
  write(frame: Uint8Array, timeNs: bigint = process.hrtime.bigint() + EPOCH_OFFSET_NS): void {
    if (this.fd < 0) throw new XenError('EBADF', `pcap ${this.path} is closed`);
    const captured = Math.min(frame.length, SNAPLEN);
    this.view.setUint32(0, Number(timeNs / 1_000_000_000n), true);
    this.view.setUint32(4, Number(timeNs % 1_000_000_000n), true);
    this.view.setUint32(8, captured, true);
    this.view.setUint32(12, frame.length, true);
    writeSync(this.fd, this.record);
    writeSync(this.fd, frame, 0, captured);
    this.frames++;
  }

  close(): void {
    if (this.fd < 0) return;
    closeSync(this.fd);
    this.fd = -1;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** hrtime counts from an arbitrary point; this offset turns it into Unix time once, at load. */
const EPOCH_OFFSET_NS = BigInt(Date.now()) * 1_000_000n - process.hrtime.bigint();
