// Network hotplug through the CLI against a host daemon, while traffic
// runs: `network-attach` gives a running guest a second interface, which it
// starts talking on; `network-detach` takes interfaces away mid-stream. dom0's
// counters (`top`) show the traffic, and every grant, mapping and port comes
// back. A host of its own (test/cli-host.ts).

import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CliHost, until, type Top } from './cli-host.js';

const h = new CliHost(t, 'xenpv-cli-net-');

async function row(name: string): Promise<Top | undefined> {
  return (await h.topOnce()).find((r) => r.name === name);
}

t.test('network-attach and network-detach while traffic runs; the guest sees them, vif 0 carries on, everything comes back', async (t) => {
  // The talker sends a frame every few ms on each interface it has, to the echoer, and counts the echoes.
  writeFileSync(join(h.dir, 'talker.mjs'), `
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function main(guest) {
  const peer = Uint8Array.from([0x00, 0x16, 0x3e, 0x00, 0x0e, 0x02]);
  const running = new Set();
  const talk = (n) => {
    if (running.has(n.path)) return;
    running.add(n.path);
    let echoed = 0;
    n.onFrame((f) => { if (f[12] === 0x88 && f[13] === 0xb5 && ++echoed === 20) console.log(n.name + ' ' + n.macText + ' echoed 20'); });
    void (async () => {
      for (;;) {
        const f = new Uint8Array(300); f.set(peer, 0); f.set(n.mac, 6); f[12] = 0x88; f[13] = 0xb5;
        try { await n.send(f); } catch (err) { console.log(n.name + ' gone: ' + err.code + ' after ' + echoed + ' echoes'); running.delete(n.path); return; }
        await sleep(4);
      }
    })();
  };
  for (const n of guest.nets()) talk(n);
  guest.onDevicesChanged(() => { for (const n of guest.nets()) talk(n); });
  await new Promise(() => {});
}
`);
  writeFileSync(join(h.dir, 'echoer.mjs'), `
export async function main(guest) {
  const [n] = guest.nets();
  n.onFrame((f) => {
    if (f[12] !== 0x88 || f[13] !== 0xb5) return;
    const r = f.slice(); r.set(f.subarray(6, 12), 0); r.set(n.mac, 6);
    void n.send(r).catch(() => {});
  });
  await new Promise(() => {});
}
`);
  const netCfg = (name: string, mac: string): string => {
    const file = join(h.dir, `${name}.cfg`);
    writeFileSync(file, `name = "${name}"\nmemory = 32\nkernel = "${name}.mjs"\nvif = [ 'mac=${mac}, bridge=xenbrT' ]\n`);
    return file;
  };
  await h.ok(['create', netCfg('echoer', '00:16:3e:00:0e:02')]);
  await h.ok(['create', netCfg('talker', '00:16:3e:00:0e:01')]);
  await h.waitLog('talker', /xnf0 00:16:3e:00:0e:01 echoed 20/);
  const vif = async (devid: number): Promise<Record<string, number> | undefined> =>
    (await h.topOnce()).find((r) => r.name === 'talker')?.devices.find((d) => d.type === 'vif' && d.devid === devid)?.counters;
  const held = async (): Promise<number[]> => {
    const rows = await h.topOnce();
    const g = rows.find((r) => r.name === 'talker')!;
    const d0 = rows.find((r) => r.domid === 0)!;
    return [g.granted, g.pinned, g.ports, d0.mapped, d0.ports];
  };
  const base = await held();

  t.match(await h.ok(['network-attach', 'talker', 'mac=00:16:3e:00:0e:03, bridge=xenbrT']), /^talker: vif 1 00:16:3e:00:0e:03$/m);
  await h.waitLog('talker', /xnf1 00:16:3e:00:0e:03 echoed 20/);
  const plugged = await held();
  t.ok(plugged.every((v, i) => v > base[i]!), `vif 1's rings granted and mapped, its ports bound: ${base} -> ${plugged}`);
  const one = await vif(1);
  t.ok(one !== undefined && one['rxPackets']! >= 20 && one['txPackets']! >= 20, `dom0 counts vif 1 both ways: ${JSON.stringify(one)}`);
  const zeroBefore = (await vif(0))!['txPackets']!;

  // Unplug vif 1 while both interfaces send.
  t.same(await h.ok(['network-detach', 'talker', '1']), '', 'the guest answered the removal handshake');
  await h.waitLog('talker', /xnf1 gone: ENETDOWN after \d+ echoes/);
  const listed = JSON.parse(await h.ok(['network-list', 'talker', '--json'])) as { devices: { devid: number }[] }[];
  t.same(listed[0]!.devices.map((d) => d.devid), [0], 'only vif 0 is left');
  await until('vif 0 to carry on', async () => (await vif(0))!['txPackets']! > zeroBefore + 50);
  t.notMatch(h.log('talker'), /xnf0 gone/, 'vif 0 never stopped');
  t.same(await until('the grants and ports of vif 1 to go', async () => {
    const now = await held();
    return JSON.stringify(now) === JSON.stringify(base) ? now : undefined;
  }), base, 'every grant, mapping and port of vif 1 let go');

  // And vif 0 itself, unplugged mid-stream: the talker's loop ends, the echoer is unharmed.
  await h.ok(['network-detach', 'talker', '0']);
  await h.waitLog('talker', /xnf0 gone: ENETDOWN after \d+ echoes/);
  t.equal((await row('echoer'))?.state.includes('c'), false, 'the echoer runs on');
  await h.ok(['destroy', 'talker']);
  await h.ok(['destroy', 'echoer']);
});

t.test('vif config errors name the file, the line and the key (xenpv create, status 2)', async (t) => {
  const bad = join(h.dir, 'bad.cfg');
  const cases: [string, RegExp][] = [
    ["name = \"x\"\nkernel = \"guest.mjs\"\n\nvif = [ 'bridge=xenbr0',\n  'colour=red' ]\n", /^xenpv: ECONFIG: .*bad\.cfg:4: vif: unknown vif parameter colour$/m],
    ["name = \"x\"\nkernel = \"guest.mjs\"\nvif = [ 'mac=00:16:3e:00:00' ]\n", /^xenpv: ECONFIG: .*bad\.cfg:3: vif: .*00:16:3e:00:00/m],
    ["name = \"x\"\nkernel = \"guest.mjs\"\nvif = [ 'mac=01:00:5e:00:00:01' ]\n", /^xenpv: ECONFIG: .*bad\.cfg:3: vif: mac 01:00:5e:00:00:01 is a multicast address$/m],
    ["name = \"x\"\nkernel = \"guest.mjs\"\nvif = [ 'mtu=10' ]\n", /^xenpv: ECONFIG: .*bad\.cfg:3: vif: mtu 10: want 68\.\.65521$/m],
    ["name = \"x\"\nkernel = \"guest.mjs\"\nvif = [ 'rate=fast' ]\n", /^xenpv: ECONFIG: .*bad\.cfg:3: vif: rate "fast"/m],
    ["name = \"x\"\nkernel = \"guest.mjs\"\nvif = [ 'mac=00:16:3e:00:00:01', 'mac=00:16:3e:00:00:01' ]\n", /^xenpv: ECONFIG: .*bad\.cfg:3: vif: mac 00:16:3e:00:00:01 given twice$/m],
    ["name = \"x\"\nkernel = \"guest.mjs\"\nvif = 'bridge=xenbr0'\n", /^xenpv: ECONFIG: .*bad\.cfg:3: vif: must be a list of strings$/m],
  ];
  for (const [body, re] of cases) {
    writeFileSync(bad, body);
    const r = await h.xenpv(['create', bad]);
    t.equal(r.status, 2, body);
    t.match(r.stderr, re, body);
  }
  t.equal((await h.topOnce()).filter((r) => r.name === 'x').length, 0, 'nothing was created');
  const spec = await h.xenpv(['network-attach', 'nosuch', 'bridge=xenbr0']);
  t.equal(spec.status, 1);
  t.match(spec.stderr, /ESRCH/, 'network-attach to no domain');
});
