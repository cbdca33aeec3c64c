// An interactive guest for the management commands: it echoes what is typed
// on its console (`xenpv console echo`), says when disks come and go
// (`xenpv block-attach`), counts its vCPUs on request, and keeps a counter
// across `xenpv save` and `xenpv restore`.

export async function main(guest) {
  let lines = guest.resumeState?.lines ?? 0;
  console.log(guest.resumeState === undefined ? `echo: up as domain ${guest.domid}` : `echo: restored as domain ${guest.domid} after ${lines} lines`);
  guest.onSuspend(() => ({ lines }));
  guest.onShutdownRequest((reason) => console.log(`echo: asked to ${reason}`));
  guest.onDevicesChanged(() => console.log(`echo: disks ${guest.disks().map((d) => d.path).join(', ') || 'none'}`));
  let buf = '';
  guest.onInput((text) => {
    buf += text.replace(/\r/g, '\n');
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line === '') continue;
      lines++;
      if (line === 'vcpus') console.log(`echo: ${guest.vcpus()} vCPUs online`);
      else console.log(`echo: ${line}`);
    }
  });
  await new Promise(() => {});
}
