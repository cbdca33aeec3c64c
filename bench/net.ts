// Network figures: guest to guest through netback and the bridge
// (net.g2g.*: 64-byte frames, 1500-byte frames, 64 KiB with SG/GSO) and a
// guest to a dom0 sink (net.g2d.1500.gbps). They need the netfront (xnf) and
// netback; until those exist netBench() returns null and `xenpv bench`
// lists the metrics as pending. The harness (lib/cli/bench.ts) already
// knows their names, units and targets: fill in netBench only.

export const NET_METRICS = ['net.g2g.64.mpps', 'net.g2g.1500.gbps', 'net.g2g.65536.gbps', 'net.g2d.1500.gbps'] as const;

export type NetMetric = (typeof NET_METRICS)[number];

/** Each metric's `runs` values, measured for `ms` each; null while the network drivers are missing. */
export async function netBench(_runs: number, _ms: number): Promise<Record<NetMetric, number[]> | null> {
  return null;
}

/** Why netBench gives nothing yet. */
export const NET_PENDING = 'pending: needs the netfront (xnf) and netback';
