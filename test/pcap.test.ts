import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PcapWriter } from '../lib/pcap.js';

const tshark = spawnSync('tshark', ['--version'], { encoding: 'utf8' });

/** A broadcast Ethernet frame of `length` bytes with an experimental EtherType and a counting payload. */
function frame(length: number, seq: number): Uint8Array {
  const f = new Uint8Array(length);
  f.fill(0xff, 0, 6);
  f.set([0x02, 0, 0, 0, 0, seq & 0xff], 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  for (let i = 14; i < length; i++) f[i] = (i + seq) & 0xff;
  return f;
}

t.test('tshark reads back every frame with its length and time', { skip: tshark.status === 0 ? false : 'tshark is not installed (Debian package tshark)' }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-pcap-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'c.pcap');
  const lengths = [60, 61, 1514, 9000, 65535 + 14];
  {
    using w = new PcapWriter(path);
    lengths.forEach((n, i) => w.write(frame(n, i), 1_700_000_000_000_000_000n + BigInt(i) * 1_500n));
    t.equal(w.frames, lengths.length);
  }
  const r = spawnSync('tshark', ['-r', path, '-T', 'fields', '-e', 'frame.len', '-e', 'frame.time_epoch', '-e', 'eth.src', '-e', 'eth.type'], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr);
  const rows = r.stdout.trim().split('\n').map((l) => l.split('\t'));
  t.same(rows.map((r) => Number(r[0])), lengths);
  t.match(rows[1]![1], /^1700000000\.0000015/, 'nanosecond timestamps');
  t.same(rows.map((r) => r[2]), lengths.map((_, i) => `02:00:00:00:00:0${i}`));
  t.same(new Set(rows.map((r) => r[3])), new Set(['0x88b5']));
});

t.test('a pcap in a missing directory is an error with a code; a closed writer refuses frames', async (t) => {
  t.throws(() => new PcapWriter('/nonexistent-dir/x.pcap'), { code: 'ENOENT' });
  const dir = mkdtempSync(join(tmpdir(), 'xenpv-pcap-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const w = new PcapWriter(join(dir, 'x.pcap'));
  w.close();
  t.throws(() => w.write(frame(60, 0)), { code: 'EBADF' });
});
