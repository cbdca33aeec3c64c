// The domU kernel: the thread entry of a guest. xen_attach, probe, watches,
// then the guest image. The image's stdout is the PV console; an exception
// out of it is a crash (the host records SHUTDOWN_crash).

import { isAbsolute, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { XenError } from '../errors.js';
import { Guest, type GuestImage, type ShutdownReason } from '../guest/guest.js';
import type { KernelContext } from '../hypervisor/thread.js';
import { probeDevices, watchHotplug, watchShutdown, xenAttach } from './xen.js';

export type GuestArgs = { name: string; image: string; extra: string };

function imageUrl(image: string): string {
  return pathToFileURL(isAbsolute(image) ? image : resolve(image)).href;
}

export async function main(ctx: KernelContext): Promise<void> {
  const args = ctx.args as GuestArgs;
  const { sc } = xenAttach(ctx, args.name, args.extra);
  // The image's stdout is the PV console; stderr stays the kernel's log.
  process.stdout.write = ((chunk: string | Uint8Array): boolean => {
    sc.console.write(chunk);
    return true;
  }) as typeof process.stdout.write;
  await probeDevices(sc);
  const guest = new Guest(sc, args.extra);
  await watchHotplug(sc, () => undefined);
  await watchShutdown(sc, (reason) => void guest.requested(reason as ShutdownReason));
  const mod = (await import(imageUrl(args.image))) as Partial<GuestImage>;
  if (typeof mod.main !== 'function') throw new XenError('ENOEXEC', `${args.image} exports no main(guest)`);
  await mod.main(guest);
  await guest.shutdown('poweroff');
}
