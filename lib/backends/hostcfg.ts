// The host config (`xenpv host start --config host.json`): JSON with the
// settings of the host as a whole: xenstored's quotas, and the CPUs dom0 may
// run on (Xen's dom0_vcpus_pin; a CPU list in xl.cfg's `cpus` syntax):
//   { "xenstored": { "maxNodes": 1000, "maxWatches": 128, ... },
//     "dom0": { "cpus": "0" } }
// Every error names the file and the key.

import { readFileSync } from 'node:fs';
import { XenError } from '../errors.js';
import type { XenstoredLimits } from './xenstored.js';
import { parseCpuList } from '../hypervisor/affinity.js';

/** The host config as Machine options. */
export type HostConfig = { xenstored?: Partial<XenstoredLimits>; dom0Cpus?: number[] };

const XENSTORED_KEYS: readonly (keyof XenstoredLimits)[] = [
  'maxNodes', 'maxNodeSizeBytes', 'maxPermsPerNode', 'maxWatches', 'maxTransactions', 'maxOutstanding', 'maxPendingEvents',
];
const MAX_VALUE = 1_000_000;
const MAX_CONFIG_BYTES = 1 << 16;

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Check a parsed host config; `file` names it in errors. */
export function parseHostConfig(value: unknown, file: string): HostConfig {
  const fail = (key: string, message: string): never => {
    throw new XenError('ECONFIG', `${file}: ${key}: ${message}`);
  };
  if (!isRecord(value)) fail('(top)', 'must be a JSON object');
  const top = value as Record<string, unknown>;
  const config: HostConfig = {};
  for (const [key, v] of Object.entries(top)) {
    if (key !== 'xenstored' && key !== 'dom0') fail(key, 'unknown key; known: xenstored, dom0');
    if (!isRecord(v)) fail(key, 'must be an object');
    if (key === 'dom0') {
      for (const [k, c] of Object.entries(v as Record<string, unknown>)) {
        if (k !== 'cpus') fail(`dom0.${k}`, 'unknown key; known: cpus');
        if (typeof c !== 'string') fail('dom0.cpus', 'must be a CPU list such as "0" or "0-1"');
        try {
          config.dom0Cpus = parseCpuList(c as string);
        } catch (err) {
          fail('dom0.cpus', (err as Error).message.replace(/^EINVAL: /, ''));
        }
      }
      continue;
    }
    const limits: Partial<XenstoredLimits> = {};
    for (const [k, n] of Object.entries(v as Record<string, unknown>)) {
      if (!(XENSTORED_KEYS as readonly string[]).includes(k)) fail(`xenstored.${k}`, `unknown key; known: ${XENSTORED_KEYS.join(', ')}`);
      if (typeof n !== 'number' || !Number.isInteger(n) || n < 1 || n > MAX_VALUE) fail(`xenstored.${k}`, `must be a whole number from 1 to ${MAX_VALUE}`);
      limits[k as keyof XenstoredLimits] = n as number;
    }
    config.xenstored = limits;
  }
  return config;
}

export function loadHostConfig(file: string): HostConfig {
  let text: string;
  try {
    const raw = readFileSync(file);
    if (raw.length > MAX_CONFIG_BYTES) throw new XenError('ECONFIG', `${file}: larger than ${MAX_CONFIG_BYTES} bytes`);
    text = raw.toString('utf8');
  } catch (err) {
    if (err instanceof XenError) throw err;
    throw new XenError('ENOENT', `${file}: ${(err as Error).message}`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new XenError('ECONFIG', `${file}: not JSON: ${(err as Error).message}`);
  }
  return parseHostConfig(value, file);
}
