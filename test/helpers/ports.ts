// Loopback ports for the servers tests start besides gRPC (which binds port 0 and reports its own).

import net from 'node:net';

/** A loopback port free right now (the metrics and status-page ports a serve process is given). */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}
