// The domU kernel: what a guest's vCPU 0 starts in. xen_attach, probe, watches,
// then the guest image. The image's stdout is the PV console; an exception
// out of it is a crash (the host records SHUTDOWN_crash).

import { isAbsolute, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { XenError } from '../errors.js';
import { Guest, type GuestImage, type ShutdownReason } from '../guest/guest.js';
import type { KernelContext } from '../hypervisor/runner.js';
import { probeDevices, watchHotplug, watchShutdown, xenAttach } from './xen.js';
import { watchCpus } from './cpu.js';
import { readResumeRecord, xenSuspend } from './suspend.js';

/** `resume`: the frame of the resume record of a restored domain (lib/xen/suspend.ts). */
export type GuestArgs = { name: string; image: string; extra: string; resume?: number };

function imageUrl(image: string): string {
  return pathToFileURL(isAbsolute(image) ? image : resolve(image)).href;
}

export async function main(ctx: KernelContext): Promise<void> {
  const args = ctx.args as GuestArgs;
  // Before the page allocator hands out (and zeroes) the frame it lies in.
  const record = args.resume === undefined ? undefined : readResumeRecord(ctx.hv.domain(ctx.domid)!.mem, args.resume);
  const { sc } = xenAttach(ctx, args.name, args.extra);
  // The image's stdout is the PV console (where the runner can route it); stderr stays the kernel's log.
  ctx.routeStdout((chunk) => sc.console.write(chunk));
  await probeDevices(sc);
  const guest = new Guest(sc, args.extra);
  if (record !== undefined) guest.resumeState = record.image;
  await watchHotplug(sc, () => guest.devicesChangedNow());
  await watchShutdown(sc, (reason) => {
    if (reason === 'suspend') void xenSuspend(sc, guest.suspendHooks()).catch((err: Error) => sc.log('suspend failed: %s', err.message));
    else void guest.requested(reason as ShutdownReason);
  });
  await watchCpus(sc);
  const mod = (await ctx.load(imageUrl(args.image))) as Partial<GuestImage>;
  if (typeof mod.main !== 'function') throw new XenError('ENOEXEC', `${args.image} exports no main(guest)`);
  await mod.main(guest);
  await guest.shutdown('poweroff');
}
