// Adapter versions and aliases through the real gRPC server (engine double, which prints the pool key
// "<id>@v<N>" a request ran on, so every response says which version served it):
// - import and train with new_version publish the next immutable, content-hashed version; without it
//   an existing id is ALREADY_EXISTS; only the adapter's tenant may add a version;
// - id, id@vN, id@latest and id@alias resolve as documented; bad references are INVALID_ARGUMENT;
// - an alias moves atomically under concurrent requests (each runs whole on the old or the new
//   version, and the response names it), rolls back through its history, and survives a restart;
// - a version a job trained is served from the engine's memory (the double records no read of it).

import { Metadata, status } from '@grpc/grpc-js';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { GenerateRequest, type GenerateResponse } from '../../src/gen/tuneserve/v1/generation.js';
import { TrainingConfig, type JobEvent } from '../../src/gen/tuneserve/v1/training.js';
import { hashKey, newKey } from '../../src/server/auth.js';
import { createClients } from '../../src/client/index.js';
import { doubleAdapterFiles, EngineDouble } from './engine-double.js';
import { call, collect, expectError, expectStatus, importAdapter, makeSandbox, startHarness, upload, type Clients, type Harness } from './harness.js';

const text = (messages: GenerateResponse[]) => messages.map((m) => m.text).join('');

describe('adapter versions and aliases', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  const generate = (clients: Clients, adapterId: string, maxTokens = 64) =>
    collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'ping', adapterId, maxTokens, temperature: 0 })));
  const get = async (clients: Clients, adapterId: string) => (await call(clients.adapters.getAdapter, clients.adapters, { adapterId })).adapter!;

  it('new_version publishes the next immutable version; references pick versions; bad ones are refused', async () => {
    harness = await startHarness({ engine: new EngineDouble({ adapterSlots: 4 }) });
    const { clients } = harness;
    const v1 = (await importAdapter(clients, 'bot', { files: doubleAdapterFiles({ rank: 4 }) })).adapter!;
    expect(v1).toMatchObject({ version: 1, versions: [{ version: 1 }] });
    await expectStatus(importAdapter(clients, 'bot', { files: doubleAdapterFiles({ rank: 8 }) }), status.ALREADY_EXISTS);
    const v2 = (await importAdapter(clients, 'bot', { files: doubleAdapterFiles({ rank: 8 }), newVersion: true })).adapter!;
    expect(v2.version).toBe(2);
    expect(v2.versions.map((v) => [v.version, v.config?.rank])).toEqual([[1, 4], [2, 8]]);
    expect(v2.contentHash).toMatch(/^[0-9a-f]{64}$/);
    expect(v2.contentHash).not.toBe(v1.contentHash);
    expect(v2.versions[0]!.contentHash).toBe(v1.contentHash);  // v1 did not change
    // The same content again is a new version with the same hash: the hash is of the content.
    const v3 = (await importAdapter(clients, 'bot', { files: doubleAdapterFiles({ rank: 4 }), newVersion: true })).adapter!;
    expect(v3.version).toBe(3);
    expect(v3.contentHash).toBe(v1.contentHash);
    // new_version on an id that does not exist makes version 1.
    expect((await importAdapter(clients, 'fresh', { newVersion: true })).adapter?.version).toBe(1);
    // Stored where the layout says, each version whole.
    expect((await fs.readdir(path.join(harness.dataRoot, 'adapters', 'bot', 'versions'))).sort()).toEqual(['v2', 'v3']);

    for (const [ref, key, version] of [['bot', 'bot@v3', 3], ['bot@latest', 'bot@v3', 3], ['bot@v1', 'bot@v1', 1], ['bot@v2', 'bot@v2', 2]] as const) {
      const { messages, error } = await generate(clients, ref);
      expect(error).toBeNull();
      expect(text(messages)).toBe(`[${key}] ping`);
      expect(messages.at(-1)?.adapterVersion).toBe(version);
    }
    expectError((await generate(clients, 'bot@v9')).error, status.NOT_FOUND);
    expectError((await generate(clients, 'bot@prod')).error, status.NOT_FOUND);
    for (const bad of ['bot@', 'bot@V1', 'bot@v0', '@v1', 'bot@v1@v2', 'bot@../x', 'bot@Prod']) {
      expectError((await generate(clients, bad)).error, status.INVALID_ARGUMENT, { field: 'adapter_id' });
    }
    for (const alias of ['latest', 'v2', 'Prod', '']) {
      await expectStatus(call(clients.adapters.setAdapterAlias, clients.adapters, { adapterId: 'bot', alias, version: 1 }), status.INVALID_ARGUMENT, { field: 'alias' });
    }
    await expectStatus(call(clients.adapters.setAdapterAlias, clients.adapters, { adapterId: 'bot', alias: 'prod', version: 7 }), status.NOT_FOUND);

    // Per-version pool state and counters, and their sum.
    const after = await get(clients, 'bot');
    expect(after.versions.map((v) => v.stats?.requests)).toEqual([1, 1, 2]);
    expect(after.stats?.requests).toBe(4);
    // Export names a version: its own files.
    const exported = await collect(clients.adapters.exportAdapter({ adapterId: 'bot@v2', chunkSize: 0 }));
    expect(exported.messages[0]?.header?.adapter).toMatchObject({ version: 2, config: { rank: 8 } });
  });

  it('an alias moves atomically under concurrent requests, rolls back through its history, and survives a restart', async () => {
    const sandbox = await makeSandbox();
    harness = await startHarness({ sandbox, engine: new EngineDouble({ adapterSlots: 4, decodeStepMs: 1 }) });
    let { clients } = harness;
    await importAdapter(clients, 'support', { files: doubleAdapterFiles({ rank: 4 }) });
    await importAdapter(clients, 'support', { files: doubleAdapterFiles({ rank: 8 }), newVersion: true });
    const setAlias = (version: number) => call(clients.adapters.setAdapterAlias, clients.adapters, { adapterId: 'support', alias: 'prod', version });
    expect((await setAlias(1)).adapter?.aliases).toEqual([{ name: 'prod', version: 1, history: [] }]);

    // Requests keep arriving while the alias flips between v1 and v2: each one runs whole on one version.
    const flips: Promise<unknown>[] = [];
    const requests: Promise<{ messages: GenerateResponse[]; error: unknown }>[] = [];
    for (let i = 0; i < 60; i++) {
      requests.push(generate(clients, 'support@prod', 40));
      if (i % 6 === 5) flips.push(setAlias(i % 12 === 5 ? 2 : 1));
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    await Promise.all(flips);
    const results = await Promise.all(requests);
    const seen = new Set<number>();
    for (const { messages, error } of results) {
      expect(error).toBeNull();
      const version = messages.at(-1)!.adapterVersion;
      seen.add(version);
      // 40 tokens of "[support@vN] ping" then EOT, repeated: never a mix of two versions.
      const unit = `[support@v${version}] ping`;
      expect(text(messages).split(unit).join('')).toBe('');
    }
    expect(seen).toEqual(new Set([1, 2]));

    // History: 1 → 2 → 1 → 2 → 1 ... ends on 1 (the last flip); rollbacks walk it back.
    let view = await get(clients, 'support');
    const prod = view.aliases.find((a) => a.name === 'prod')!;
    expect(prod.version).toBe(1);
    expect(prod.history).toEqual([1, 2, 1, 2, 1, 2, 1, 2, 1, 2]);
    view = (await call(clients.adapters.rollbackAdapterAlias, clients.adapters, { adapterId: 'support', alias: 'prod' })).adapter!;
    expect(view.aliases.find((a) => a.name === 'prod')).toMatchObject({ version: 2, history: [1, 2, 1, 2, 1, 2, 1, 2, 1] });
    expect((await generate(clients, 'support@prod')).messages.at(-1)?.adapterVersion).toBe(2);
    await call(clients.adapters.setAdapterAlias, clients.adapters, { adapterId: 'support', alias: 'canary', version: 2 });
    await expectStatus(call(clients.adapters.rollbackAdapterAlias, clients.adapters, { adapterId: 'support', alias: 'canary' }), status.FAILED_PRECONDITION, { reason: 'NO_ALIAS_HISTORY' });

    // A restart reads versions and aliases back from disk.
    await harness.stop();
    harness = await startHarness({ sandbox, engine: new EngineDouble({ adapterSlots: 4 }) });
    ({ clients } = harness);
    expect((await generate(clients, 'support@prod')).messages.at(-1)?.adapterVersion).toBe(2);
    expect((await generate(clients, 'support@canary')).messages.at(-1)?.adapterVersion).toBe(2);
    expect((await generate(clients, 'support')).messages.at(-1)?.adapterVersion).toBe(2);
    expect((await get(clients, 'support')).versions.map((v) => v.version)).toEqual([1, 2]);
    await call(clients.adapters.deleteAdapterAlias, clients.adapters, { adapterId: 'support', alias: 'canary' });
    expectError((await generate(clients, 'support@canary')).error, status.NOT_FOUND);
  });

  it('a job with new_version publishes the next version, served from memory; only the adapter\'s tenant may add versions', async () => {
    const sandbox = await makeSandbox();
    const keysFile = path.join(sandbox, 'keys.json');
    const secrets = { acme: newKey(), globex: newKey() };
    await fs.writeFile(keysFile, JSON.stringify({ keys: [
      { id: 'acme', sha256: hashKey(secrets.acme), tenant: 'acme', scopes: ['train', 'generate'] },
      { id: 'globex', sha256: hashKey(secrets.globex), tenant: 'globex', scopes: ['train', 'generate'] },
    ] }));
    const engine = new EngineDouble({ adapterSlots: 4 });
    harness = await startHarness({ sandbox, engine, server: { keys: { file: keysFile, reloadMs: 100 } } });
    const acme = createClients(`127.0.0.1:${harness.server.port}`, { apiKey: secrets.acme, plaintext: true });
    const globex = createClients(`127.0.0.1:${harness.server.port}`, { apiKey: secrets.globex, plaintext: true });
    try {
      await upload(acme, 'rows', '{"text":"one"}\n{"text":"two"}\n');
      const train = (clients: Clients, jobId: string, newVersion: boolean) =>
        collect(clients.training.train({ jobId, adapterId: 'bot', datasetId: 'rows', initAdapterId: '', detach: false, newVersion, config: TrainingConfig.fromPartial({ maxSteps: 2 }) }));
      const first = await train(acme, 'j1', false);
      expect(first.error).toBeNull();
      const completed = (events: { event?: JobEvent }[]) => events.map((m) => m.event?.completed).find((c) => c !== undefined);
      expect(completed(first.messages)).toMatchObject({ adapterId: 'bot', adapterVersion: 1 });
      expectError((await train(acme, 'j2', false)).error, status.ALREADY_EXISTS);
      expectError((await train(globex, 'j3', true)).error, status.PERMISSION_DENIED);
      const second = await train(acme, 'j4', true);
      expect(second.error).toBeNull();
      const done = completed(second.messages)!;
      expect(done).toMatchObject({ adapterVersion: 2 });
      const view = (await call(acme.adapters.getAdapter, acme.adapters, { adapterId: 'bot' })).adapter!;
      expect(view.versions.map((v) => [v.version, v.jobId])).toEqual([[1, 'j1'], [2, 'j4']]);
      expect(view.contentHash).toBe(done.contentHash);
      // Served from the engine's memory: the pool read no file of either trained version.
      const served = await collect(acme.generation.generate(GenerateRequest.fromPartial({ text: 'hi', adapterId: 'bot', maxTokens: 4 })));
      expect(served.messages.at(-1)?.adapterVersion).toBe(2);
      expect(engine.records.adapterReads).toEqual([]);
      const metadata = new Metadata();
      metadata.set('authorization', `Bearer ${secrets.globex}`);
      await expectStatus(importAdapter(harness.clients, 'bot', { newVersion: true, metadata }), status.PERMISSION_DENIED);
      await expectStatus(call(globex.adapters.setAdapterAlias, globex.adapters, { adapterId: 'bot', alias: 'prod', version: 1 }), status.PERMISSION_DENIED);
    } finally {
      acme.close();
      globex.close();
    }
  });
});
