// A guest that configures its first interface from `extra` ("ip=10.0.0.2/24"
// or "ip=dhcp"), answers ARP and ping (the IP layer does), and echoes every
// UDP datagram on port 7 back to its sender, until it is asked to shut down.

import { IpInterface } from 'xenpv/ip';

export async function main(guest) {
  const [net] = guest.nets();
  if (net === undefined) throw new Error('no network interface');
  const ip = new IpInterface(net, { name: net.name });
  await ip.configure(guest.extra);
  let echoed = 0;
  const echo = ip.bind(7);
  echo.onMessage(({ address, port, data }) => {
    echoed++;
    void echo.send(address, port, data).catch(() => undefined);
  });
  console.log(`netecho ${ip.address}/${ip.prefixLength} on ${net.name} ${net.macText}: echoing UDP port 7`);
  guest.onShutdownRequest(() => {
    console.log(`echoed ${echoed} datagrams, answered ${ip.counters.echoRequests} pings`);
    ip.close();
  });
  await new Promise(() => {}); // serve until the toolstack asks for a shutdown
}
