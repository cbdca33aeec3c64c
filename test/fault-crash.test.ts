// Fault: a guest that crashes in the middle of its I/O. dom0 must take back
// everything the dead domain had in the host: no grant of its pages stays
// mapped, no port names it, no xenstore node of it or for it is left, and
// no ACL anywhere names its domid. A new guest that gets the same domid then
// inherits nothing (XSA-322): not the old one's access to another guest's
// node, not its nodes. And the hypervisor hands a domid out again only once
// nothing of its last domain is left in any live domain's tables.

import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound } from '../lib/abi/event_channel.js';
import { GNTMAP_host_map, GNTTABOP_map_grant_ref, GNTTABOP_unmap_grant_ref, GNTST_okay } from '../lib/abi/grant_table.js';
import { XS_DIRECTORY, XS_ERROR, XS_GET_PERMS } from '../lib/abi/xs_wire.js';
import { __HYPERVISOR_grant_table_op } from '../lib/abi/xen.js';
import { loadDomainConfig } from '../lib/backends/xlcfg.js';
import { portsOf } from '../lib/hypervisor/evtchn.js';
import { mappingsOf } from '../lib/hypervisor/grant.js';
import { Host } from '../lib/hypervisor/host.js';
import type { gnttab_map_grant_ref } from '../lib/hypervisor/hypercall.js';
import { HOST } from '../lib/hypervisor/hypervisor.js';
import { Machine } from '../lib/machine.js';
import { GrantTable } from '../lib/gnttab/gnttab.js';
import { PhysMem } from '../lib/xen/physmem.js';
import { XsDecoder, encodeMessage, joinStrings, splitStrings, type XsMessage } from '../lib/xenstore/wire.js';

const root = fileURLToPath(new URL('../..', import.meta.url));

/** dom0's view of xenstore through xenstored's socket: one request at a time. */
class SocketClient {
  private readonly decoder = new XsDecoder();
  private waiting: ((m: XsMessage) => void) | null = null;
  private reqId = 1;

  private constructor(private readonly sock: Socket) {
    sock.on('data', (b: Buffer) => {
      for (const m of this.decoder.feed(b)) this.waiting?.(m);
    });
  }

  static open(path: string): Promise<SocketClient> {
    return new Promise((resolve, reject) => {
      const sock = createConnection(path, () => resolve(new SocketClient(sock)));
      sock.once('error', reject);
    });
  }

  request(type: number, path: string): Promise<string[] | string> {
    return new Promise((resolve) => {
      this.waiting = (m) => resolve(m.type === XS_ERROR ? splitStrings(m.payload)[0] ?? 'EIO' : splitStrings(m.payload));
      this.sock.write(encodeMessage({ type, req_id: this.reqId++, tx_id: 0, payload: joinStrings([path]) }));
    });
  }

  /** Every node under `path`, with its permissions. */
  async walk(path: string, out: Map<string, string[]>): Promise<void> {
    const perms = await this.request(XS_GET_PERMS, path);
    if (typeof perms === 'string') return;
    out.set(path, perms);
    const kids = await this.request(XS_DIRECTORY, path);
    if (typeof kids === 'string') return;
    for (const k of kids) if (k !== '') await this.walk(path === '/' ? `/${k}` : `${path}/${k}`, out);
  }

  close(): void {
    this.sock.destroy();
  }
}

const owner = `
export async function main(guest) {
  const xs = guest.xenstore;
  const peer = Number(/peer=(\\d+)/.exec(guest.extra)[1]);
  const node = '/local/domain/' + guest.domid + '/data/shared';
  await xs.write(node, 'secret-of-owner');
  await xs.setPerms(node, [{ domid: guest.domid, perm: 'n' }, { domid: peer, perm: 'r' }]);
  console.log('shared with ' + peer);
  await new Promise(() => undefined);
}
`;

const victim = `
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function main(guest) {
  const xs = guest.xenstore;
  const owner = Number(/owner=(\\d+)/.exec(guest.extra)[1]);
  let secret;
  for (let i = 0; i < 1000 && secret === undefined; i++) {
    secret = await xs.read('/local/domain/' + owner + '/data/shared').catch(() => undefined);
    if (secret === undefined) await sleep(10);
  }
  console.log('read ' + secret);
  await xs.write('data/mine', 'old');
  await xs.watch('/local/domain/' + owner + '/data', () => undefined);
  const [disk] = guest.disks();
  const writes = [];
  for (let i = 0; i < 64; i++) writes.push(disk.write(i * 8, new Uint8Array(4096).fill(i)).catch(() => undefined));
  await Promise.race(writes);
  console.log('crashing with writes in flight');
  throw new Error('a deliberate crash in the middle of I/O');
}
`;

const successor = `
export async function main(guest) {
  const xs = guest.xenstore;
  const owner = Number(/owner=(\\d+)/.exec(guest.extra)[1]);
  const code = (p) => xs.read(p).then((v) => 'read ' + v, (e) => e.code);
  console.log('shared: ' + await code('/local/domain/' + owner + '/data/shared'));
  console.log('mine: ' + await code('data/mine'));
}
`;

t.test('a guest that crashes mid-I/O leaves nothing behind, and its domid inherits nothing (XSA-322)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-fault-crash-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const cfg = (name: string, image: string, extra: string, disk = ''): string => {
    writeFileSync(join(dir, `${name}.mjs`), image);
    const file = join(dir, `${name}.cfg`);
    writeFileSync(file, `name = "${name}"\nmemory = 32\nkernel = "${name}.mjs"\nextra = "${extra}"\non_crash = "destroy"\n${disk}`);
    return file;
  };
  writeFileSync(join(dir, 'victim.img'), new Uint8Array(1 << 20));
  const consoles = new Map<string, string>();
  const m = await Machine.boot({ rundir: dir, onConsole: (_d, name, text) => consoles.set(name, (consoles.get(name) ?? '') + text) });
  const xs = await SocketClient.open(m.socketPath!);
  try {
    // Domids go in order: the owner gets 1, the victim 2.
    const ownerId = await m.create(loadDomainConfig(cfg('owner', owner, 'peer=2')));
    const victimId = await m.create(loadDomainConfig(cfg('victim', victim, `owner=${ownerId}`, "disk = ['format=raw, vdev=xvda, target=victim.img']\n")));
    t.same([ownerId, victimId], [1, 2]);
    const exit = await m.waitExit(victimId, AbortSignal.timeout(60_000));
    t.equal(exit.reason, 'crash');
    t.match(exit.console, /read secret-of-owner/, 'the victim had read access to the owner\'s node');
    t.match(exit.console, /crashing with writes in flight/);

    // The hypervisor's tables: nothing of the dead domain in dom0 or the owner.
    t.equal(m.host.hv.domain(victimId), undefined, 'the domain is gone');
    for (const domid of [0, ownerId]) {
      const d = m.host.hv.domain(domid)!;
      t.same(mappingsOf(d).filter((x) => x.domid === victimId), [], `domain ${domid} maps no grant of it`);
      const ports = portsOf(d).filter((p) => (p.state === EVTCHNSTAT_interdomain || p.state === EVTCHNSTAT_unbound) && p.remote === victimId);
      t.same(ports, [], `domain ${domid} has no port to it`);
    }

    // xenstore: no node of it or for it, and no ACL naming it.
    const nodes = new Map<string, string[]>();
    await xs.walk('/', nodes);
    t.ok(nodes.size > 20, `${nodes.size} nodes walked`);
    const mention = new RegExp(`/${victimId}(/|$)`);
    t.same([...nodes.keys()].filter((p) => p.startsWith(`/local/domain/${victimId}`) || (p.includes('/backend/') && mention.test(p))), [], 'no node of it');
    const acl = [...nodes].filter(([, perms]) => perms.some((p) => Number(p.slice(1)) === victimId)).map(([p]) => p);
    t.same(acl, [], 'no ACL names its domid');

    // A new guest with the same domid, as when the domid rover wraps around.
    Atomics.store(m.host.hv.host, HOST.nextDomid, victimId - 1);
    const successorId = await m.create(loadDomainConfig(cfg('successor', successor, `owner=${ownerId}`)));
    t.equal(successorId, victimId, 'the domid is used again');
    const after = await m.waitExit(successorId, AbortSignal.timeout(60_000));
    t.match(after.console, /^shared: EACCES$/m, 'no read access to the node the old domain could read');
    t.match(after.console, /^mine: ENOENT$/m, 'none of the old domain\'s nodes');
    await m.requestShutdown(ownerId, 'poweroff');
    await m.waitExit(ownerId, AbortSignal.timeout(30_000));
  } finally {
    xs.close();
    await m.stop();
  }
});

t.test('a domid is used again only once no live domain maps its pages or holds a port to it', async (t) => {
  const host = new Host();
  const a = host.createDomain({ name: 'a', memoryMiB: 4 }).domid;
  const b = host.createDomain({ name: 'b', memoryMiB: 4 }).domid;
  const da = host.domain(a);
  const gt = new GrantTable(host.hv.entry(a), da.mem, new PhysMem(da.mem, da.specialBase), 'a', { removeRetries: 0 });
  gt.init();
  const ref = gt.alloc();
  gt.enter(ref, b, 100);
  const op: gnttab_map_grant_ref = { host_addr: 0n, flags: GNTMAP_host_map, ref, dom: a, status: 0, handle: -1, dev_bus_addr: 0n, page: null };
  host.hv.entry(b)(__HYPERVISOR_grant_table_op, GNTTABOP_map_grant_ref, op);
  t.equal(op.status, GNTST_okay);
  await host.destroy(a);
  t.equal(host.hv.domain(a), undefined);
  t.throws(() => host.createDomain({ name: 'again', memoryMiB: 4 }, a), { code: 'EEXIST' }, 'b still maps a page of the old domain');
  Atomics.store(host.hv.host, HOST.nextDomid, a - 1);
  const next = host.createDomain({ name: 'next', memoryMiB: 4 }).domid;
  t.not(next, a, 'the rover skips it');
  host.hv.entry(b)(__HYPERVISOR_grant_table_op, GNTTABOP_unmap_grant_ref, { host_addr: 0n, dev_bus_addr: 0n, handle: op.handle, status: 0 });
  const again = host.createDomain({ name: 'again', memoryMiB: 4 }, a);
  t.equal(again.generation, 1, 'a new domain of that domid');
  t.equal(host.hv.domain(a)?.generation, 1);
  t.not(host.hv.domain(a)?.memory, da.memory, 'with memory of its own');
  t.throws(() => host.createDomain({ name: 'twice', memoryMiB: 4 }, a), { code: 'EEXIST' }, 'and only one at a time');
});
