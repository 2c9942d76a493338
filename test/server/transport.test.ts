// TLS and mutual TLS on the gRPC port, with certificates made by openssl for this run: a client that
// trusts the server's CA gets through; a plaintext client, a client that trusts another CA, and (with
// mutual TLS) a client with no certificate or one signed by another CA are all refused. grpc-js
// reports a failed handshake as UNAVAILABLE; the deadline only keeps a broken case from hanging.

import { credentials, makeClientConstructor, status, type ServiceError } from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import { rmSync } from 'node:fs';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { createClients, type TuneClients } from '../../src/client/index.js';
import { makeTestPki, opensslMissing, type TestPki } from '../helpers/certificates.js';
import { call, startHarness, type Harness } from './harness.js';

const missing = opensslMissing();
if (missing !== null && process.env.CI) throw new Error(`CI needs openssl for the TLS tests: ${missing}`);
if (missing !== null) console.warn(`\n!!! SKIPPING the TLS tests: ${missing}\n`);

describe.skipIf(missing !== null)('TLS and mutual TLS', () => {
  const pki: TestPki = missing === null ? makeTestPki() : (null as never);
  let harness: Harness | null = null;
  const opened: TuneClients[] = [];
  afterEach(async () => {
    for (const c of opened.splice(0)) c.close();
    await harness?.dispose();
    harness = null;
  });
  afterAll(() => {
    if (pki) rmSync(pki.folder, { recursive: true, force: true });
  });

  const client = (port: number, channel: Parameters<typeof createClients>[1]['credentials']): TuneClients => {
    // The server certificate names 127.0.0.1 and localhost; connecting by IP checks the IP SAN.
    const clients = createClients(`127.0.0.1:${port}`, { ...(channel ? { credentials: channel } : {}) });
    opened.push(clients);
    return clients;
  };
  const info = (clients: TuneClients) =>
    call(clients.model.getModelInfo, clients.model, {}, { deadline: new Date(Date.now() + 5000) });
  const refused = async (clients: TuneClients): Promise<ServiceError> => {
    const error = await info(clients).then(() => null, (e: ServiceError) => e);
    expect(error, 'the call should have been refused').not.toBeNull();
    return error as ServiceError;
  };

  it('TLS: a client trusting the CA connects; plaintext and a client trusting another CA are refused', async () => {
    harness = await startHarness({ server: { transport: { tls: { cert: pki.server.cert, key: pki.server.key } } } });
    const { port } = harness.server;
    expect((await info(client(port, credentials.createSsl(pki.ca.cert)))).modelName).toBe('double');
    expect((await refused(client(port, credentials.createInsecure()))).code).toBe(status.UNAVAILABLE);
    expect((await refused(client(port, credentials.createSsl(pki.rogueCa.cert)))).code).toBe(status.UNAVAILABLE);
  });

  it('with TLS, a plaintext health-only port answers the probes (kubelet gRPC probes cannot use TLS) and nothing else', async () => {
    harness = await startHarness({ server: { transport: { tls: { cert: pki.server.cert, key: pki.server.key } }, healthPort: 0 } });
    await harness.server.ready;
    const healthPort = harness.server.healthPort!;
    expect(healthPort).toBeGreaterThan(0);
    const Health = makeClientConstructor(healthService, 'grpc.health.v1.Health');
    const probe = new Health(`127.0.0.1:${healthPort}`, credentials.createInsecure()) as unknown as {
      check(request: { service: string }, callback: (error: ServiceError | null, response: { status: string | number }) => void): void;
      close(): void;
    };
    const reply = await new Promise<{ status: string | number }>((resolve, reject) => probe.check({ service: 'tuneserve.v1.GenerationService' }, (e, r) => (e ? reject(e) : resolve(r))));
    expect(String(reply.status)).toBe('SERVING');
    probe.close();
    // The tuneserve services are not on that port.
    expect((await refused(client(healthPort, credentials.createInsecure()))).code).toBe(status.UNIMPLEMENTED);
  });

  it('mutual TLS: only a client certificate signed by the client CA gets through', async () => {
    harness = await startHarness({
      server: { transport: { tls: { cert: pki.server.cert, key: pki.server.key, clientCa: pki.ca.cert } } },
    });
    const { port } = harness.server;
    const good = credentials.createSsl(pki.ca.cert, pki.client.key, pki.client.cert);
    expect((await info(client(port, good))).modelName).toBe('double');
    // No client certificate at all.
    expect((await refused(client(port, credentials.createSsl(pki.ca.cert)))).code).toBe(status.UNAVAILABLE);
    // A certificate from a CA the server does not trust.
    const rogue = credentials.createSsl(pki.ca.cert, pki.rogueClient.key, pki.rogueClient.cert);
    expect((await refused(client(port, rogue))).code).toBe(status.UNAVAILABLE);
    // The server's own certificate is not a client certificate (extendedKeyUsage serverAuth only).
    const wrongUsage = credentials.createSsl(pki.ca.cert, pki.server.key, pki.server.cert);
    expect((await refused(client(port, wrongUsage))).code).toBe(status.UNAVAILABLE);
  });
});
