// The frames of a trace as pcapng (the capture format tshark and wireshark
// read; IETF draft-ietf-opsawg-pcapng): a section header, one interface
// description per guest network interface the frames went through (named
// after the device, described by its domain, nanosecond resolution), and an
// enhanced packet block per frame whose epb_flags give its direction as the
// guest sees it: outbound what it sent, inbound what it received.

import { writeFileSync } from 'node:fs';
import { XenError } from '../errors.js';
import type { Trace, TraceEvent } from './decode.js';

const SHB = 0x0a0d0d0a;
const IDB = 0x00000001;
const EPB = 0x00000006;
const BYTE_ORDER_MAGIC = 0x1a2b3c4d;
const LINKTYPE_ETHERNET = 1;
const OPT_COMMENT = 1;
const IF_NAME = 2;
const IF_DESCRIPTION = 3;
const IF_TSRESOL = 9;
const EPB_FLAGS = 2;
const EPB_INBOUND = 1;
const EPB_OUTBOUND = 2;

type Option = { code: number; value: Uint8Array };

function pad4(n: number): number {
  return (n + 3) & ~3;
}

function optionBytes(options: readonly Option[]): number {
  return options.reduce((n, o) => n + 4 + pad4(o.value.length), 0) + (options.length > 0 ? 4 : 0);
}

/** A block: type, total length, body, options, total length again. */
function block(type: number, body: Uint8Array, options: readonly Option[]): Buffer {
  const total = 12 + pad4(body.length) + optionBytes(options);
  const b = Buffer.alloc(total);
  b.writeUInt32LE(type, 0);
  b.writeUInt32LE(total, 4);
  b.set(body, 8);
  let at = 8 + pad4(body.length);
  for (const o of options) {
    b.writeUInt16LE(o.code, at);
    b.writeUInt16LE(o.value.length, at + 2);
    b.set(o.value, at + 4);
    at += 4 + pad4(o.value.length);
  }
  if (options.length > 0) at += 4; // opt_endofopt: code 0, length 0, already zero
  b.writeUInt32LE(total, at);
  return b;
}

function text(s: string): Uint8Array {
  return Buffer.from(s, 'utf8');
}

function u32(v: number): Uint8Array {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v, 0);
  return b;
}

/** The pcapng bytes of every frame in `trace`, and how many frames and interfaces. */
export function tracePcapng(trace: Trace): { bytes: Buffer; frames: number; interfaces: number } {
  const shbBody = Buffer.alloc(16);
  shbBody.writeUInt32LE(BYTE_ORDER_MAGIC, 0);
  shbBody.writeUInt16LE(1, 4);
  shbBody.writeUInt16LE(0, 6);
  shbBody.writeBigInt64LE(-1n, 8); // section length not given
  const parts: Buffer[] = [block(SHB, shbBody, [{ code: OPT_COMMENT, value: text('xenpv trace') }])];
  const ifaces = new Map<string, number>();
  const epochNs = BigInt(Math.round(trace.header.epochMs * 1e6));
  let frames = 0;
  for (const e of trace.events) {
    if (e.type !== 'frame') continue;
    const name = e.device ?? 'net';
    const key = `${e.domid}:${name}`;
    let id = ifaces.get(key);
    if (id === undefined) {
      ifaces.set(key, (id = ifaces.size));
      parts.push(interfaceBlock(name, e));
    }
    parts.push(packetBlock(id, epochNs + BigInt(Math.round(e.timeNs)), e));
    frames++;
  }
  return { bytes: Buffer.concat(parts), frames, interfaces: ifaces.size };
}

function interfaceBlock(name: string, e: TraceEvent): Buffer {
  const body = Buffer.alloc(8);
  body.writeUInt16LE(LINKTYPE_ETHERNET, 0);
  body.writeUInt32LE(0, 4); // no snap length
  return block(IDB, body, [
    { code: IF_NAME, value: text(name) },
    { code: IF_DESCRIPTION, value: text(e.domid === null ? 'xenpv machine' : `xenpv dom${e.domid}`) },
    { code: IF_TSRESOL, value: Uint8Array.of(9) },
  ]);
}

function packetBlock(id: number, ns: bigint, e: Extract<TraceEvent, { type: 'frame' }>): Buffer {
  const body = Buffer.alloc(20 + e.bytes.length);
  body.writeUInt32LE(id, 0);
  body.writeUInt32LE(Number(ns >> 32n), 4);
  body.writeUInt32LE(Number(ns & 0xffffffffn), 8);
  body.writeUInt32LE(e.bytes.length, 12);
  body.writeUInt32LE(Math.max(e.length, e.bytes.length), 16);
  body.set(e.bytes, 20);
  return block(EPB, body, [{ code: EPB_FLAGS, value: u32(e.dir === 'from-guest' ? EPB_OUTBOUND : EPB_INBOUND) }]);
}

/** Write the frames of `trace` to `path` as pcapng. */
export function writeTracePcapng(trace: Trace, path: string): { frames: number; interfaces: number } {
  const { bytes, frames, interfaces } = tracePcapng(trace);
  try {
    writeFileSync(path, bytes);
  } catch (err) {
    throw new XenError((err as { code?: string }).code ?? 'EIO', `pcapng ${path}: ${(err as Error).message}`);
  }
  return { frames, interfaces };
}
