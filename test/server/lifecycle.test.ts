// The server's life: UNAVAILABLE and health NOT_SERVING while the model loads (or after it failed
// to), SERVING once ready, UNAVAILABLE while draining, graceful then forced shutdown, GetModelInfo,
// opt-in reflection and the Prometheus endpoint.

import { credentials, loadPackageDefinition, makeClientConstructor, status, type Client, type ServiceError } from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { service as healthService } from 'grpc-health-check';
import { afterEach, describe, expect, it } from 'vitest';
import { GenerateRequest } from '../../src/gen/tuneserve/v1/generation.js';
import { Quantization } from '../../src/gen/tuneserve/v1/model.js';
import { SERVICE_NAMES } from '../../src/server/server.js';
import { freePort } from '../helpers/ports.js';
import { EngineDouble } from './engine-double.js';
import { call, collect, eventually, expectStatus, startHarness, type Harness } from './harness.js';

type HealthClient = Client & {
  check(request: { service: string }, callback: (error: ServiceError | null, response: { status: string | number }) => void): void;
};

function healthClient(port: number): HealthClient {
  const Health = makeClientConstructor(healthService, 'grpc.health.v1.Health');
  return new Health(`127.0.0.1:${port}`, credentials.createInsecure()) as unknown as HealthClient;
}

function health(client: HealthClient, service: string): Promise<string> {
  return new Promise((resolve, reject) =>
    client.check({ service }, (error, response) => (error ? reject(error) : resolve(String(response.status)))),
  );
}

describe('lifecycle', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  it('answers UNAVAILABLE with health NOT_SERVING while the model loads, then serves', async () => {
    let finishLoading: (engine: EngineDouble) => void = () => {};
    const loading = new Promise<EngineDouble>((resolve) => (finishLoading = resolve));
    harness = await startHarness({ server: { engine: loading } });
    const { clients, server } = harness;
    const probe = healthClient(server.port);
    expect(await health(probe, '')).toBe('NOT_SERVING');
    expect(await health(probe, 'tuneserve.v1.GenerationService')).toBe('NOT_SERVING');
    await expectStatus(call(clients.model.getModelInfo, clients.model, {}), status.UNAVAILABLE, { reason: 'MODEL_LOADING', retry: true });

    finishLoading(new EngineDouble());
    await server.ready;
    for (const name of ['', ...SERVICE_NAMES]) expect(await health(probe, name)).toBe('SERVING');
    const info = await call(clients.model.getModelInfo, clients.model, {});
    expect(info).toMatchObject({
      modelName: 'double',
      quantization: Quantization.QUANTIZATION_NF4,
      baseFingerprint: 'f'.repeat(64),
      eosTokenIds: [257, 258],
      hasChatTemplate: true,
    });
    expect(info.limits).toMatchObject({ maxSeqLen: 8192, adapterSlots: 2, adapterSlotsUsed: 0, maxQueuedJobs: 16 });
    expect(info.scheduling).toContain('test double');
    expect(info.serverVersion).toMatch(/^\d+\.\d+\.\d+/);
    probe.close();
  });

  it('stays NOT_SERVING and says why when the model fails to load; ready rejects', async () => {
    const failing = new Promise<EngineDouble>((_, reject) => setTimeout(() => reject(new Error('bad weights')), 50));
    harness = await startHarness({ server: { engine: failing }, allowErrorLogs: true });
    await expect(harness.server.ready).rejects.toThrow('bad weights');
    await expectStatus(call(harness.clients.model.getModelInfo, harness.clients.model, {}), status.UNAVAILABLE, { reason: 'MODEL_LOAD_FAILED' });
    const probe = healthClient(harness.server.port);
    expect(await health(probe, '')).toBe('NOT_SERVING');
    probe.close();
    expect(harness.logger.lines.some((l) => l.level === 'error' && l.message === 'model failed to load')).toBe(true);
  });

  it('drains: NOT_SERVING and UNAVAILABLE for new calls while calls in flight finish', async () => {
    harness = await startHarness({ engine: new EngineDouble({ decodeStepMs: 5, trainStepMs: 10 }) });
    const { clients, server } = harness;
    const inFlight = collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'still here', maxTokens: 60, ignoreEos: true })));
    await eventually(() => harness?.engine.records.generations.length === 1);
    const probe = healthClient(server.port);
    const closing = server.close({ drainDelayMs: 1500, graceMs: 5000 });
    await eventually(async () => (await health(probe, '').catch(() => 'gone')) === 'NOT_SERVING');
    await expectStatus(call(clients.model.getModelInfo, clients.model, {}), status.UNAVAILABLE, { reason: 'SERVER_DRAINING', retry: true });
    const finished = await inFlight;
    expect(finished.error).toBeNull();
    expect(finished.messages.at(-1)?.usage?.completionTokens).toBe(60);
    await closing;
    probe.close();
  });

  it('cancels calls still running when the grace period ends', async () => {
    harness = await startHarness({ engine: new EngineDouble({ decodeStepMs: 20, script: () => 'x'.repeat(100_000) }) });
    const { clients, server, engine } = harness;
    const endless = collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'go', maxTokens: 8000 })));
    await eventually(() => engine.records.generations.length === 1);
    const started = Date.now();
    await server.close({ graceMs: 200 });
    expect(Date.now() - started).toBeLessThan(2000);
    const { error } = await endless;
    expect(error).not.toBeNull();
    await eventually(() => engine.records.results[0]?.finishReason === 'cancelled');
  });

  it('serves reflection only when enabled', async () => {
    const loaded = protoLoader.loadSync('grpc/reflection/v1/reflection.proto', {
      includeDirs: ['node_modules/@grpc/reflection/build/proto'],
    });
    const Reflection = (loadPackageDefinition(loaded) as unknown as { grpc: { reflection: { v1: { ServerReflection: new (address: string, creds: unknown) => Client & { serverReflectionInfo(): NodeJS.ReadWriteStream & { write(message: object): boolean } } } } } }).grpc.reflection.v1.ServerReflection;
    const listServices = (port: number): Promise<{ names: string[]; error: ServiceError | null }> =>
      new Promise((resolve) => {
        const client = new Reflection(`127.0.0.1:${port}`, credentials.createInsecure());
        const stream = client.serverReflectionInfo();
        const names: string[] = [];
        stream.on('data', (response: { listServicesResponse?: { service: { name: string }[] } }) => {
          names.push(...(response.listServicesResponse?.service.map((s) => s.name) ?? []));
          stream.end();
        });
        stream.on('error', (error: ServiceError) => {
          client.close();
          resolve({ names, error });
        });
        stream.on('end', () => {
          client.close();
          resolve({ names, error: null });
        });
        stream.write({ listServices: '*' });
      });

    harness = await startHarness();
    const off = await listServices(harness.server.port);
    expect(off.error?.code).toBe(status.UNIMPLEMENTED);
    await harness.dispose();

    harness = await startHarness({ server: { reflection: true } });
    const on = await listServices(harness.server.port);
    expect(on.error).toBeNull();
    for (const name of SERVICE_NAMES) expect(on.names).toContain(name);
  });

  it('exposes OpenTelemetry metrics on the Prometheus port', async () => {
    const port = await freePort();
    harness = await startHarness({ server: { metrics: { port, host: '127.0.0.1' } } });
    await call(harness.clients.model.getModelInfo, harness.clients.model, {});
    await collect(harness.clients.generation.generate(GenerateRequest.fromPartial({ text: 'metrics' })));
    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    expect(text).toMatch(/rpc_server_call_duration_count\{[^}]*rpc_method="GetModelInfo"/);
    expect(text).toMatch(/gen_ai_server_time_to_first_token_count/);
    expect(text).toMatch(/gen_ai_server_time_per_output_token_count/);
    expect(text).toMatch(/gen_ai_server_request_duration_count/);
    expect(text).toMatch(/gen_ai_client_token_usage.*gen_ai_token_type="output"/);
    expect(text).toMatch(/tuneserve_training_jobs_queued/);
    expect(text).toMatch(/service_name="tuneserve"/);
  });
});
