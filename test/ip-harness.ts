// A scripted Ethernet segment for the IP tests: a hub whose ports are Links
// of the shape a guest's net interface and a bridge port offer. A frame sent
// on one port reaches every other port on a later turn of the event loop (as
// across a real link), as a fresh copy. A test can watch every frame (to
// write a pcap), rewrite or drop frames in flight, and send raw bytes into a
// port as a hostile peer would.

import type { Link } from '../lib/guest/ip.js';

export type HubPort = Link & {
  /** Frames this port sent. */
  sent: number;
  /** Put raw bytes on the wire as if this port sent them. */
  inject(frame: Uint8Array): void;
  /** Disconnect from the hub. */
  unplug(): void;
};

export type Hub = {
  port(mac: number | Uint8Array, mtu?: number): HubPort;
  /** Sees every frame as it is sent, before any rewrite. */
  onWire: ((frame: Uint8Array, from: HubPort) => void) | null;
  /** Rewrites (returns a frame) or drops (returns null) a frame in flight. */
  rewrite: ((frame: Uint8Array, from: HubPort) => Uint8Array | null) | null;
  /** Resolves when no frame is in flight. */
  idle(): Promise<void>;
};

export function macBytes(mac: number): Uint8Array {
  const b = new Uint8Array(6);
  let m = mac;
  for (let i = 5; i >= 0; i--) {
    b[i] = m % 256;
    m = Math.floor(m / 256);
  }
  return b;
}

export function hub(): Hub {
  const ports = new Set<HubPort & { handlers: Set<(f: Uint8Array) => void> }>();
  let inFlight = 0;
  let idleWaiters: Array<() => void> = [];
  const h: Hub = {
    onWire: null,
    rewrite: null,
    port(mac, mtu = 1500) {
      const handlers = new Set<(f: Uint8Array) => void>();
      const p = {
        mac: typeof mac === 'number' ? macBytes(mac) : mac,
        mtu,
        sent: 0,
        handlers,
        send(frame: Uint8Array): void {
          p.sent++;
          carry(frame.slice(), p);
        },
        inject(frame: Uint8Array): void {
          carry(frame.slice(), p);
        },
        onFrame(handler: (f: Uint8Array) => void): () => void {
          handlers.add(handler);
          return () => handlers.delete(handler);
        },
        unplug(): void {
          ports.delete(p);
        },
      };
      ports.add(p);
      return p;
    },
    idle() {
      return inFlight === 0 ? new Promise((r) => setImmediate(r)) : new Promise((r) => idleWaiters.push(r));
    },
  };
  function carry(frame: Uint8Array, from: HubPort): void {
    h.onWire?.(frame, from);
    const f = h.rewrite === null ? frame : h.rewrite(frame, from);
    if (f === null) return;
    inFlight++;
    setImmediate(() => {
      for (const p of ports) if (p !== from) for (const handler of p.handlers) handler(f.slice());
      if (--inFlight === 0) {
        const w = idleWaiters;
        idleWaiters = [];
        for (const r of w) setImmediate(r);
      }
    });
  }
  return h;
}
