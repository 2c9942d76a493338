// Issue #8, "must show" 2 and 3, with the real engine (tiny random model, NF4 base) behind the real gRPC
// server on 127.0.0.1:
// - train-to-serve: the adapter of a finished job answers within 1 s of its completed event without
//   reading its files: they are overwritten with garbage at the completed event, and the request still
//   succeeds (a read would fail it), the pool counts no load, and the manifest's hashes are those of
//   the real bytes; put back and reloaded from disk, the adapter generates the very same tokens;
// - a request started on v1 finishes on v1 while v2 is published mid-stream; new requests get v2;
// - an adapter deleted and made again under the same id and version serves its new weights, not the
//   old version's state;
// - an adapter whose file went bad fails its own request (ADAPTER_LOAD_FAILED), not its neighbours'.

import { status } from '@grpc/grpc-js';
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { GenerateRequest, type GenerateResponse } from '../../src/gen/tuneserve/v1/generation.js';
import { LrScheduler, TrainingConfig, type JobEvent } from '../../src/gen/tuneserve/v1/training.js';
import { AdapterTier } from '../../src/gen/tuneserve/v1/adapters.js';
import { randomAdapterFiles } from '../../src/loadgen/adapters.js';
import { startRealServer, type RealServer } from '../helpers/real-server.js';
import { call, collect, connect, expectError, importAdapter, type Clients } from '../server/harness.js';

describe('adapter versions and train-to-serve over the real engine', () => {
  let real: RealServer;
  let clients: Clients;

  beforeAll(async () => {
    real = await startRealServer({ preset: 'tiny', seed: 21 });
    clients = connect(real.server.port);
  }, 300_000);

  afterAll(async () => {
    clients?.close();
    await real?.dispose();
  });

  const files = (seed: number) => randomAdapterFiles(real.engine.engine.config, { rank: 8, seed, scale: 0.3, targets: 'all-linear' });
  const request = (adapterId: string, maxTokens: number) =>
    GenerateRequest.fromPartial({ text: 'The quick brown fox', adapterId, maxTokens, temperature: 0, ignoreEos: true, returnTokenIds: true });
  const generate = async (adapterId: string, maxTokens = 24) => {
    const { messages, error } = await collect(clients.generation.generate(request(adapterId, maxTokens)));
    expect(error).toBeNull();
    return { ids: messages.flatMap((m) => m.tokenIds), last: messages.at(-1)! };
  };
  const folderOf = (adapterId: string) => join(real.sandbox, 'data', 'adapters', adapterId);

  it('serves a just-trained adapter within 1 s of its completed event, from memory, without reading its files', async () => {
    const rows = ['{"prompt":"Q: red?","completion":" A: apple"}', '{"prompt":"Q: blue?","completion":" A: sky"}'].join('\n');
    const config = TrainingConfig.fromPartial({
      rank: 8, alpha: 16, dropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'], learningRate: 5e-2, maxSteps: 4, batchSize: 2,
      gradAccum: 1, scheduler: LrScheduler.LR_SCHEDULER_CONSTANT, seed: 3,
    });
    const stream = clients.training.train({ jobId: 'tts', adapterId: 'fresh', inlineJsonl: Buffer.from(rows), initAdapterId: '', detach: false, newVersion: false, config });
    const served = await new Promise<{ afterCompletedMs: number; ids: number[]; weights: Buffer; version: number }>((resolve, reject) => {
      stream.on('error', reject);
      stream.on('data', (message: { event?: JobEvent }) => {
        if (!message.event?.completed) return;
        const completedAt = performance.now();
        void (async () => {
          // Anything reading the published weights from here on reads garbage and fails.
          const weightsFile = join(folderOf('fresh'), 'adapter_model.safetensors');
          const weights = await readFile(weightsFile);
          await writeFile(weightsFile, 'not a safetensors file');
          let firstAt = 0;
          const g = clients.generation.generate(request('fresh', 16));
          const messages: GenerateResponse[] = [];
          g.on('data', (m: GenerateResponse) => {
            if (firstAt === 0 && m.tokenIds.length > 0) firstAt = performance.now();
            messages.push(m);
          });
          g.on('error', reject);
          g.on('end', () => resolve({
            afterCompletedMs: firstAt - completedAt, ids: messages.flatMap((m) => m.tokenIds), weights, version: messages.at(-1)!.adapterVersion,
          }));
        })().catch(reject);
      });
    });
    expect(served.ids).toHaveLength(16);
    expect(served.version).toBe(1);
    expect(served.afterCompletedMs).toBeLessThan(1000);
    const { adapter } = await call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'fresh' });
    expect(adapter?.versions[0]).toMatchObject({ tier: AdapterTier.ADAPTER_TIER_DEVICE, stats: { loads: 0, loadFailures: 0, requests: 1 } });
    // Durable and honest: the manifest hashes are the real bytes' (hashed in memory before writing).
    const record = JSON.parse(await readFile(join(folderOf('fresh'), 'tuneserve.json'), 'utf8')) as { files: { name: string; sha256: string; sizeBytes: number }[] };
    const manifest = record.files.find((f) => f.name === 'adapter_model.safetensors')!;
    expect(manifest).toEqual({ name: 'adapter_model.safetensors', sizeBytes: served.weights.length, sha256: createHash('sha256').update(served.weights).digest('hex') });
    // Put back and read from disk (dropped from the pool first): the same adapter, the same tokens.
    await writeFile(join(folderOf('fresh'), 'adapter_model.safetensors'), served.weights);
    await call(clients.adapters.unloadAdapter, clients.adapters, { adapterId: 'fresh' });
    expect((await generate('fresh', 16)).ids).toEqual(served.ids);
    const after = (await call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'fresh' })).adapter!;
    expect(after.versions[0]?.stats?.loads).toBe(1);
    // And it is the trained adapter, not the base.
    expect((await generate('', 16)).ids).not.toEqual(served.ids);
  });

  it('a request started on v1 finishes on v1 while v2 is published; a deleted and re-made version serves its new weights', async () => {
    await importAdapter(clients, 'bot', { files: files(1) });
    const v1 = await generate('bot@v1', 300);
    let finished = false;
    const running = collect(clients.generation.generate(request('bot', 300))).then((r) => { finished = true; return r; });
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect((await importAdapter(clients, 'bot', { files: files(2), newVersion: true })).adapter?.version).toBe(2);
    expect(finished).toBe(false);  // v2 was published while the request was still decoding
    const { messages, error } = await running;
    expect(error).toBeNull();
    expect(messages.at(-1)?.adapterVersion).toBe(1);
    expect(messages.flatMap((m) => m.tokenIds)).toEqual(v1.ids);
    const latest = await generate('bot', 300);
    expect(latest.last.adapterVersion).toBe(2);
    expect(latest.ids).toEqual((await generate('bot@v2', 300)).ids);
    expect(latest.ids).not.toEqual(v1.ids);

    // Delete and make again: the same key bot@v1, other weights. Served are the new ones.
    await call(clients.adapters.deleteAdapter, clients.adapters, { adapterId: 'bot' });
    await importAdapter(clients, 'bot', { files: files(3) });
    await importAdapter(clients, 'ref3', { files: files(3) });
    const remade = await generate('bot@v1', 300);
    expect(remade.ids).toEqual((await generate('ref3', 300)).ids);
    expect(remade.ids).not.toEqual(v1.ids);
  });

  it('an adapter whose file went bad on disk fails its own request with INTEGRITY_MISMATCH; the request beside it goes on', async () => {
    // The bytes are checked against the manifest before the pool first reads a version (integrity.ts), so
    // the damaged file never reaches the engine; the pool's own ADAPTER_LOAD_FAILED path (and its
    // loadFailures counter) is tested in test/adapter-pool.test.ts.
    await importAdapter(clients, 'good', { files: files(5) });
    await importAdapter(clients, 'bad', { files: files(6) });
    const alone = await generate('good', 60);
    await writeFile(join(folderOf('bad'), 'adapter_model.safetensors'), Buffer.alloc(64, 1));
    const [good, bad] = await Promise.all([collect(clients.generation.generate(request('good', 60))), collect(clients.generation.generate(request('bad', 60)))]);
    expect(good.error).toBeNull();
    expect(good.messages.flatMap((m) => m.tokenIds)).toEqual(alone.ids);
    expectError(bad.error, status.DATA_LOSS, { reason: 'INTEGRITY_MISMATCH' });
    expect(bad.error?.details).toContain('adapter_model.safetensors');
    // Refused again on the next request: a failed check is not remembered as passed.
    const again = await collect(clients.generation.generate(request('bad', 60)));
    expectError(again.error, status.DATA_LOSS, { reason: 'INTEGRITY_MISMATCH' });
    const { adapter } = await call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'bad' });
    expect(adapter?.stats?.loads).toBe(0);
  });
});
