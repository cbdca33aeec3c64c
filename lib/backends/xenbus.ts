// What every dom0 backend does to reach a frontend, after Linux's
// xenbus_client.c and events_base.c: map a page the frontend granted,
// unmap it, and bind the frontend's event channel to a handler.

import { __HYPERVISOR_event_channel_op, __HYPERVISOR_grant_table_op } from '../abi/xen.js';
import { EVTCHNOP_bind_interdomain } from '../abi/event_channel.js';
import { GNTMAP_host_map, GNTMAP_readonly, GNTTABOP_map_grant_ref, GNTTABOP_unmap_grant_ref, GNTST_okay } from '../abi/grant_table.js';
import { XenError } from '../errors.js';
import type { IntrHandle, IntrHandler, Interrupts } from '../evtchn/evtchn.js';
import { errnoName } from '../hypervisor/errno.js';
import type { Hypercall, gnttab_map_grant_ref } from '../hypervisor/hypercall.js';
import { writablePage, type Page, type ReadPage } from '../hypervisor/page.js';

export type GrantMapping<P> = { handle: number; page: P };

function map(hypercall: Hypercall, domid: number, ref: number, readonly: boolean): GrantMapping<Page | ReadPage> {
  const op: gnttab_map_grant_ref = {
    host_addr: 0n, flags: GNTMAP_host_map | (readonly ? GNTMAP_readonly : 0), ref, dom: domid,
    status: 0, handle: -1, dev_bus_addr: 0n, page: null,
  };
  hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_map_grant_ref, op);
  if (op.status !== GNTST_okay || op.page === null) {
    throw new XenError('EACCES', `grant ${ref} of domain ${domid}: GNTST ${op.status}`);
  }
  return { handle: op.handle, page: op.page };
}

/** xenbus_map_ring_valloc: a page the frontend granted, writable. EACCES when refused. */
export function mapGrant(hypercall: Hypercall, domid: number, ref: number): GrantMapping<Page> {
  const m = map(hypercall, domid, ref, false);
  return { handle: m.handle, page: writablePage(m.page) };
}

/** The same, read-only (GNTMAP_readonly), for data the backend only reads. */
export function mapGrantReadonly(hypercall: Hypercall, domid: number, ref: number): GrantMapping<ReadPage> {
  return map(hypercall, domid, ref, true);
}

/** xenbus_unmap_ring_vfree. */
export function unmapGrant(hypercall: Hypercall, handle: number): void {
  hypercall(__HYPERVISOR_grant_table_op, GNTTABOP_unmap_grant_ref, { host_addr: 0n, dev_bus_addr: 0n, handle, status: 0 });
}

/**
 * bind_interdomain_evtchn_to_irqhandler: bind the frontend's port and attach
 * `handler`. The port stays masked until the caller's intrUnmask.
 */
export function bindInterdomain(
  hypercall: Hypercall, intr: Interrupts, domid: number, remotePort: number, handler: IntrHandler, name: string,
): IntrHandle {
  const bind = { remote_dom: domid, remote_port: remotePort, local_port: 0 };
  const rc = hypercall(__HYPERVISOR_event_channel_op, EVTCHNOP_bind_interdomain, bind);
  if (rc !== 0) throw new XenError(errnoName(-rc), `${name}: port ${remotePort} of domain ${domid}`);
  return intr.adopt(bind.local_port, handler, name);
}
