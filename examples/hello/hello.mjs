// A guest image: an ES module whose main(guest) runs once the kernel has
// attached its devices. guest.print writes a line to the PV console (its
// stdout is the console too, under the threads runner).

export async function main(guest) {
  guest.print(`hello from domU ${guest.domid}`);
  const devices = guest.devices();
  if (devices.length === 0) guest.print('devices: none');
  for (const d of devices) guest.print(`device ${d.path}: ${d.driver ?? 'no driver'} (backend ${d.backendId})`);
  guest.print(`name ${await guest.xenstore.read('name')}, extra "${guest.extra}"`);
  await guest.shutdown('poweroff');
}
