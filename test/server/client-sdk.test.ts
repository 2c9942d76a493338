// The client SDK (src/client, published as 'tuneserve/client') against real servers on 127.0.0.1:
// the package entry resolves by name; retries wait as long as the server's RetryInfo says (not the
// SDK's own shorter backoff) and never past the call's deadline; deadlines, cancellation, the API
// key and x-request-id reach the server. Timings use the server's own hints (1 s for generation
// capacity, 5 s while the model loads) with generous margins on the slow side only.

import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { status, type ServiceError } from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import { connect, GenerateRequest, statusDetailsOf, type TuneClient } from '../../src/client/index.js';
import { ensureDistFresh, ROOT } from '../helpers/dist.js';
import { EngineDouble } from './engine-double.js';
import { startHarness, type Harness } from './harness.js';

const failureOf = async (promise: Promise<unknown>): Promise<ServiceError> => {
  const error = await promise.then(() => null, (e: ServiceError) => e);
  expect(error, 'the call should have failed').not.toBeNull();
  return error as ServiceError;
};

const drain = async (stream: AsyncIterable<unknown>): Promise<number> => {
  let count = 0;
  for await (const _ of stream) count += 1;
  return count;
};

describe('client SDK', () => {
  let harness: Harness | null = null;
  let tune: TuneClient | null = null;
  afterEach(async () => {
    tune?.close();
    tune = null;
    await harness?.dispose();
    harness = null;
  });

  it('is importable as tuneserve/client (package.json "exports")', async () => {
    await ensureDistFresh();
    const script = "const m = await import('tuneserve/client'); console.log(JSON.stringify([typeof m.connect, typeof m.GenerateRequest.fromPartial, typeof m.statusDetailsOf, typeof m.uploadDatasetFile]));";
    const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script], { cwd: ROOT });
    expect(JSON.parse(stdout)).toEqual(['function', 'function', 'function', 'function']);
  }, 180_000);

  it('retries a unary call after the RetryInfo delay while the model loads, within the deadline', async () => {
    let ready: (engine: EngineDouble) => void = () => {};
    harness = await startHarness({ server: { engine: new Promise<EngineDouble>((resolve) => (ready = resolve)) } });
    setTimeout(() => ready(new EngineDouble()), 300);
    tune = connect(`127.0.0.1:${harness.server.port}`, { plaintext: true });
    const started = Date.now();
    const info = await tune.model.getModelInfo({}, { deadlineMs: 15_000 });
    expect(info.modelName).toBe('double');
    // MODEL_LOADING carries a 5 s RetryInfo; the SDK's own backoff would have retried after 200 ms.
    expect(Date.now() - started).toBeGreaterThanOrEqual(4900);
  }, 30_000);

  it('does not wait past the deadline, and not at all with retries off', async () => {
    harness = await startHarness({ server: { engine: new Promise<EngineDouble>(() => {}) } });
    tune = connect(`127.0.0.1:${harness.server.port}`, { plaintext: true, defaults: { deadlineMs: 1000 } });
    let started = Date.now();
    const error = await failureOf(tune.model.getModelInfo({}));
    expect(error.code).toBe(status.UNAVAILABLE);
    expect(statusDetailsOf(error)?.retryAfterMs).toBe(5000);
    expect(Date.now() - started).toBeLessThan(900);
    started = Date.now();
    expect((await failureOf(tune.model.getModelInfo({}, { retry: false, deadlineMs: 60_000 }))).code).toBe(status.UNAVAILABLE);
    expect(Date.now() - started).toBeLessThan(900);
  });

  it('retries a stream refused before its first message after the RetryInfo delay (generation capacity)', async () => {
    harness = await startHarness({ engine: new EngineDouble({ decodeStepMs: 60 }), server: { limits: { maxConcurrentGenerations: 1 } } });
    tune = connect(`127.0.0.1:${harness.server.port}`, { plaintext: true });
    const request = (maxTokens: number) => GenerateRequest.fromPartial({ text: 'x', maxTokens, ignoreEos: true });
    const first = drain(tune.generation.generate(request(20))); // about 1.2 s of decoding
    await new Promise((resolve) => setTimeout(resolve, 100));
    // Without retries the second is refused with the server's hint.
    const refused = await failureOf(drain(tune.generation.generate(request(2), { retry: false })));
    expect(refused.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(statusDetailsOf(refused)?.retryAfterMs).toBe(1000);
    // With retries it waits (1 s per the hint, twice at most) and then runs.
    const started = Date.now();
    expect(await drain(tune.generation.generate(request(2)))).toBeGreaterThan(0);
    expect(Date.now() - started).toBeGreaterThanOrEqual(950);
    await first;
  });

  it('sends the API key and x-request-id, applies stream deadlines and cancels on abort', async () => {
    harness = await startHarness({ engine: new EngineDouble({ decodeStepMs: 50 }), server: { keys: { tokens: ['k3y'] } } });
    const address = `127.0.0.1:${harness.server.port}`;
    const keyless = connect(address, { plaintext: true });
    const started = Date.now();
    expect((await failureOf(keyless.model.getModelInfo({}))).code).toBe(status.UNAUTHENTICATED);
    expect(Date.now() - started).toBeLessThan(500); // not retried
    keyless.close();

    tune = connect(address, { plaintext: true, apiKey: 'k3y' });
    expect((await tune.model.getModelInfo({}, { requestId: 'sdk-req-1' })).modelName).toBe('double');
    expect(harness.logger.lines.some((l) => l.fields.requestId === 'sdk-req-1')).toBe(true);

    const long = GenerateRequest.fromPartial({ text: 'x', maxTokens: 200, ignoreEos: true });
    expect((await failureOf(drain(tune.generation.generate(long, { deadlineMs: 300 })))).code).toBe(status.DEADLINE_EXCEEDED);
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 200);
    expect((await failureOf(drain(tune.generation.generate(long, { signal: controller.signal })))).code).toBe(status.CANCELLED);
  });
});
