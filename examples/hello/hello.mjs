// A guest image: an ES module whose main(guest) runs once the kernel has
// attached its devices. Its stdout is the PV console.

export async function main(guest) {
  console.log(`hello from domU ${guest.domid}`);
  const devices = guest.devices();
  if (devices.length === 0) console.log('devices: none');
  for (const d of devices) console.log(`device ${d.path}: ${d.driver ?? 'no driver'} (backend ${d.backendId})`);
  console.log(`name ${await guest.xenstore.read('name')}, extra "${guest.extra}"`);
  await guest.shutdown('poweroff');
}
