// vCPU hotplug, the guest's half (Linux drivers/xen/cpu_hotplug.c): a watch
// on cpu/ in the domain's tree; each cpu/<n>/availability of "online" or
// "offline" brings vCPU n up or down with VCPUOP_up or VCPUOP_down. The
// toolstack writes the nodes (`xenpv vcpu-set`) and sees the result in the
// hypervisor's count of online vCPUs. vCPU 0 runs this kernel and stays up.

import { __HYPERVISOR_vcpu_op } from '../abi/xen.js';
import { VCPUOP_down, VCPUOP_is_up, VCPUOP_up } from '../abi/vcpu.js';
import { XenError } from '../errors.js';
import { errnoName } from '../hypervisor/errno.js';
import type { XenSoftc } from './xen.js';

/** vCPUs a domain may have (vcpu_info slots in shared_info). */
const MAX_VCPUS = 32;

function isUp(sc: XenSoftc, vcpuid: number): boolean | null {
  const rc = sc.hypercall(__HYPERVISOR_vcpu_op, VCPUOP_is_up, { vcpuid });
  return rc < 0 ? null : rc === 1;
}

/** The vCPUs that are up now. */
export function vcpusOnline(sc: XenSoftc): number {
  let n = 0;
  for (let v = 0; v < MAX_VCPUS; v++) {
    const up = isUp(sc, v);
    if (up === null) break;
    if (up) n++;
  }
  return n;
}

// vcpu_hotplug: make vCPU `v` match its availability node.
async function vcpuHotplug(sc: XenSoftc, v: number): Promise<void> {
  const want = await sc.xs.read(`cpu/${v}/availability`).catch(() => null);
  if (want !== 'online' && want !== 'offline') return;
  const up = isUp(sc, v);
  if (up === null || up === (want === 'online') || (v === 0 && want === 'offline')) return;
  const rc = sc.hypercall(__HYPERVISOR_vcpu_op, want === 'online' ? VCPUOP_up : VCPUOP_down, { vcpuid: v });
  if (rc !== 0) throw new XenError(errnoName(-rc), `vcpu ${v} ${want} failed (${rc})`);
  sc.log('vcpu %d %s', v, want);
}

/** setup_cpu_watcher: the watch fires once at once, which applies what the toolstack set at build. */
export async function watchCpus(sc: XenSoftc, onChange: () => void = () => undefined): Promise<void> {
  await sc.xs.watch('cpu', 'cpu-hotplug', () => {
    void (async () => {
      const cpus = await sc.xs.list('cpu').catch(() => [] as string[]);
      for (const c of cpus) {
        const v = Number(c);
        if (Number.isInteger(v) && v >= 0 && v < MAX_VCPUS) await vcpuHotplug(sc, v).catch((err: Error) => sc.log('%s', err.message));
      }
      onChange();
    })();
  });
}
