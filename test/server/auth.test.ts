// API keys, scopes and tenants against a real server (engine double) with a keys file:
// - every RPC of every tuneserve service, called with a key of each scope: refused with
//   PERMISSION_DENIED exactly when RPC_SCOPES says the scope is not enough, and never otherwise
//   (the call then fails later, on its empty request, or succeeds); no key or an unknown key is
//   UNAUTHENTICATED for every RPC;
// - tenants: one tenant's datasets, adapters and jobs are invisible and unusable to another
//   (PERMISSION_DENIED, absent from lists) until marked shared; shared ones are usable but only
//   their tenant may change them; an admin key sees everything;
// - the keys file is re-read while the server runs: a new key works and a removed key stops working
//   without a restart, and a broken file leaves the loaded keys in force.

import { Client, credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { AdapterServiceService } from '../../src/gen/tuneserve/v1/adapters.js';
import { DatasetServiceService } from '../../src/gen/tuneserve/v1/datasets.js';
import { GenerateRequest } from '../../src/gen/tuneserve/v1/generation.js';
import { ModelServiceService } from '../../src/gen/tuneserve/v1/model.js';
import { GenerationServiceService } from '../../src/gen/tuneserve/v1/generation.js';
import { TrainingConfig, TrainingServiceService } from '../../src/gen/tuneserve/v1/training.js';
import { hashKey, newKey, RPC_SCOPES, type Scope } from '../../src/server/auth.js';
import { createClients, statusDetailsOf, type TuneClients } from '../../src/client/index.js';
import { call, collect, eventually, expectStatus, importAdapter, makeSandbox, sha256, startHarness, upload, type Harness } from './harness.js';

const SERVICES = {
  ModelService: ModelServiceService,
  GenerationService: GenerationServiceService,
  AdapterService: AdapterServiceService,
  DatasetService: DatasetServiceService,
  TrainingService: TrainingServiceService,
};

interface KeySpec {
  id: string;
  tenant: string;
  scopes: Scope[];
}
const KEYS: KeySpec[] = [
  { id: 'ops', tenant: 'ops', scopes: ['admin'] },
  { id: 'acme-gen', tenant: 'acme', scopes: ['generate'] },
  { id: 'acme-train', tenant: 'acme', scopes: ['train'] },
  { id: 'globex-gen', tenant: 'globex', scopes: ['generate'] },
  { id: 'globex-train', tenant: 'globex', scopes: ['train'] },
];

async function writeKeys(file: string, specs: KeySpec[], secrets: Map<string, string>): Promise<void> {
  for (const spec of specs) if (!secrets.has(spec.id)) secrets.set(spec.id, newKey());
  const keys = specs.map((spec) => ({ id: spec.id, sha256: hashKey(secrets.get(spec.id)!), tenant: spec.tenant, scopes: spec.scopes }));
  await fs.writeFile(`${file}.tmp`, JSON.stringify({ keys }));
  await fs.rename(`${file}.tmp`, file); // as a Kubernetes Secret update swaps the file
}

/** Calls any RPC with an empty request (an empty protobuf message is valid for every type). */
function rawCall(client: Client, rpc: { path: string; requestStream: boolean; responseStream: boolean }, key: string | null): Promise<ServiceError | null> {
  const metadata = new Metadata();
  if (key !== null) metadata.set('authorization', `Bearer ${key}`);
  const serialize = (): Buffer => Buffer.alloc(0);
  const deserialize = (bytes: Buffer): Buffer => bytes;
  const options = { deadline: new Date(Date.now() + 5000) };
  return new Promise((resolve) => {
    if (rpc.requestStream) {
      const stream = client.makeClientStreamRequest(rpc.path, serialize, deserialize, metadata, options, (error) => resolve(error ?? null));
      stream.end();
    } else if (rpc.responseStream) {
      const stream = client.makeServerStreamRequest(rpc.path, serialize, deserialize, Buffer.alloc(0), metadata, options);
      stream.on('data', () => {});
      stream.on('error', (error: ServiceError) => resolve(error));
      stream.on('end', () => resolve(null));
    } else {
      client.makeUnaryRequest(rpc.path, serialize, deserialize, Buffer.alloc(0), metadata, options, (error) => resolve(error ?? null));
    }
  });
}

describe('API keys, scopes and tenants', () => {
  let harness: Harness | null = null;
  const opened: { close(): void }[] = [];
  afterEach(async () => {
    for (const c of opened.splice(0)) c.close();
    await harness?.dispose();
    harness = null;
  });

  const start = async (options: { allowErrorLogs?: boolean } = {}) => {
    const sandbox = await makeSandbox();
    const keysFile = path.join(sandbox, 'keys.json');
    const secrets = new Map<string, string>();
    await writeKeys(keysFile, KEYS, secrets);
    harness = await startHarness({ sandbox, server: { keys: { file: keysFile, reloadMs: 100 } }, ...options });
    const as = (id: string): TuneClients => {
      const clients = createClients(`127.0.0.1:${harness!.server.port}`, { apiKey: secrets.get(id)!, plaintext: true });
      opened.push(clients);
      return clients;
    };
    return { keysFile, secrets, as };
  };

  it('lists every RPC of the services in RPC_SCOPES', () => {
    const rpcs = Object.entries(SERVICES).flatMap(([service, definition]) =>
      Object.values(definition).map((rpc) => `${service}/${rpc.path.split('/').at(-1)}`),
    );
    expect(rpcs.sort()).toEqual(Object.keys(RPC_SCOPES).sort());
  });

  it('refuses each RPC without a valid key, and outside the key\'s scopes, and only then', async () => {
    const { secrets } = await start();
    const raw = new Client(`127.0.0.1:${harness!.server.port}`, credentials.createInsecure());
    opened.push(raw);
    for (const [service, definition] of Object.entries(SERVICES)) {
      for (const rpc of Object.values(definition)) {
        const name = `${service}/${rpc.path.split('/').at(-1)}`;
        for (const key of [null, 'tsk_not-a-key']) {
          const error = await rawCall(raw, rpc, key);
          expect({ name, key, code: error?.code }).toEqual({ name, key, code: status.UNAUTHENTICATED });
        }
        for (const spec of KEYS) {
          const error = await rawCall(raw, rpc, secrets.get(spec.id)!);
          const allowed = spec.scopes.includes('admin') || RPC_SCOPES[name]!.some((scope) => spec.scopes.includes(scope));
          const code = error?.code ?? status.OK;
          if (allowed) expect([status.PERMISSION_DENIED, status.UNAUTHENTICATED], `${name} with ${spec.id}`).not.toContain(code);
          else {
            expect({ name, key: spec.id, code }).toEqual({ name, key: spec.id, code: status.PERMISSION_DENIED });
            expect(statusDetailsOf(error!)?.reason).toBe('SCOPE_MISSING');
          }
        }
      }
    }
  });

  it('keeps each tenant to its own datasets, adapters and jobs, plus shared ones; admin sees all', async () => {
    const { as } = await start();
    const acmeTrain = as('acme-train');
    const acmeGen = as('acme-gen');
    const globexTrain = as('globex-train');
    const globexGen = as('globex-gen');
    const ops = as('ops');

    // Acme's private dataset and adapter.
    await upload(acmeTrain, 'acme-rows', '{"text":"acme only"}\n');
    expect((await importAdapter(acmeTrain, 'acme-bot')).adapter).toMatchObject({ tenant: 'acme', shared: false });
    const { dataset } = await call(acmeTrain.datasets.getDataset, acmeTrain.datasets, { datasetId: 'acme-rows' });
    expect(dataset).toMatchObject({ tenant: 'acme', shared: false });

    // Globex cannot see or use them.
    await expectStatus(call(globexTrain.datasets.getDataset, globexTrain.datasets, { datasetId: 'acme-rows' }), status.PERMISSION_DENIED, { reason: 'TENANT_MISMATCH' });
    expect((await call(globexTrain.datasets.listDatasets, globexTrain.datasets, { pageSize: 0, pageToken: '' })).datasets).toEqual([]);
    await expectStatus(call(globexGen.adapters.getAdapter, globexGen.adapters, { adapterId: 'acme-bot' }), status.PERMISSION_DENIED, { reason: 'TENANT_MISMATCH' });
    expect((await call(globexGen.adapters.listAdapters, globexGen.adapters, { pageSize: 0, pageToken: '', loadedOnly: false })).adapters).toEqual([]);
    const generateWith = (clients: TuneClients, adapterId: string) =>
      collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'hi', adapterId, maxTokens: 4 })));
    expect((await generateWith(globexGen, 'acme-bot')).error?.code).toBe(status.PERMISSION_DENIED);
    const train = (clients: TuneClients, jobId: string, datasetId: string, initAdapterId = '') =>
      collect(clients.training.train({ jobId, adapterId: `${jobId}-out`, datasetId, initAdapterId, detach: false, config: TrainingConfig.fromPartial({ maxSteps: 2 }) }));
    expect((await train(globexTrain, 'steal', 'acme-rows')).error?.code).toBe(status.PERMISSION_DENIED);
    await expectStatus(call(globexTrain.adapters.deleteAdapter, globexTrain.adapters, { adapterId: 'acme-bot' }), status.PERMISSION_DENIED);
    await expectStatus(call(globexTrain.datasets.deleteDataset, globexTrain.datasets, { datasetId: 'acme-rows' }), status.PERMISSION_DENIED);

    // Acme uses its own: generate with its adapter, train on its dataset; the job and the new adapter are Acme's.
    expect((await generateWith(acmeGen, 'acme-bot')).error).toBeNull();
    expect((await train(acmeTrain, 'acme-job', 'acme-rows')).error).toBeNull();
    const { adapter: trained } = await call(acmeGen.adapters.getAdapter, acmeGen.adapters, { adapterId: 'acme-job-out' });
    expect(trained).toMatchObject({ tenant: 'acme', shared: false, jobId: 'acme-job' });
    await expectStatus(call(globexTrain.training.getJob, globexTrain.training, { jobId: 'acme-job', includeHistory: false }), status.PERMISSION_DENIED);
    await expectStatus(call(globexTrain.training.cancelJob, globexTrain.training, { jobId: 'acme-job' }), status.PERMISSION_DENIED);
    expect((await collect(globexTrain.training.watchJob({ jobId: 'acme-job', afterSequence: 0 }))).error?.code).toBe(status.PERMISSION_DENIED);
    const listJobs = (clients: TuneClients) => call(clients.training.listJobs, clients.training, { pageSize: 0, pageToken: '', states: [] });
    expect((await listJobs(globexTrain)).jobs).toEqual([]);
    expect((await listJobs(acmeTrain)).jobs.map((j) => j.jobId)).toEqual(['acme-job']);

    // Shared: Globex may use Acme's adapter, but not change it; only Acme (or admin) may share.
    await expectStatus(call(globexTrain.adapters.setAdapterShared, globexTrain.adapters, { adapterId: 'acme-bot', shared: true }), status.PERMISSION_DENIED);
    const shared = await call(acmeTrain.adapters.setAdapterShared, acmeTrain.adapters, { adapterId: 'acme-bot', shared: true });
    expect(shared.adapter).toMatchObject({ tenant: 'acme', shared: true });
    expect((await generateWith(globexGen, 'acme-bot')).error).toBeNull();
    expect((await call(globexGen.adapters.listAdapters, globexGen.adapters, { pageSize: 0, pageToken: '', loadedOnly: false })).adapters.map((a) => a.adapterId)).toEqual(['acme-bot']);
    const notOwner = await expectStatus(call(globexTrain.adapters.deleteAdapter, globexTrain.adapters, { adapterId: 'acme-bot' }), status.PERMISSION_DENIED);
    expect(notOwner.reason).toBe('NOT_OWNER');
    // A shared adapter can start another tenant's training run; the result belongs to that tenant.
    await upload(globexTrain, 'globex-rows', '{"text":"globex"}\n');
    expect((await train(globexTrain, 'globex-job', 'globex-rows', 'acme-bot')).error).toBeNull();
    expect((await call(globexGen.adapters.getAdapter, globexGen.adapters, { adapterId: 'globex-job-out' })).adapter?.tenant).toBe('globex');
    // A dataset shared at upload is visible to the other tenant.
    await new Promise<void>((resolve, reject) => {
      const stream = acmeTrain.datasets.uploadDataset((error) => (error ? reject(error) : resolve()));
      const bytes = Buffer.from('{"text":"for everyone"}\n');
      stream.write({ header: { datasetId: 'acme-public', sizeBytes: bytes.length, sha256: sha256(bytes), shared: true } });
      stream.write({ chunk: bytes });
      stream.end();
    });
    expect((await call(globexTrain.datasets.getDataset, globexTrain.datasets, { datasetId: 'acme-public' })).dataset?.shared).toBe(true);

    // The admin key sees every tenant's things.
    expect((await listJobs(ops)).jobs.map((j) => j.jobId).sort()).toEqual(['acme-job', 'globex-job']);
    expect((await call(ops.datasets.listDatasets, ops.datasets, { pageSize: 0, pageToken: '' })).datasets.map((d) => d.datasetId).sort()).toEqual(['acme-public', 'acme-rows', 'globex-rows']);
    await call(ops.adapters.deleteAdapter, ops.adapters, { adapterId: 'globex-job-out' });
  });

  it('re-reads the keys file: new keys work and removed keys stop, without a restart; a broken file changes nothing', async () => {
    const { keysFile, secrets, as } = await start({ allowErrorLogs: true });
    const info = (clients: TuneClients) => call(clients.model.getModelInfo, clients.model, {});
    const before = as('acme-gen');
    expect((await info(before)).modelName).toBe('double');

    await writeKeys(keysFile, [...KEYS.filter((k) => k.id !== 'acme-gen'), { id: 'initech-gen', tenant: 'initech', scopes: ['generate'] }], secrets);
    const after = as('initech-gen');
    await eventually(async () => (await info(after).then(() => true, () => false)), 5000);
    await expectStatus(info(as('acme-gen')), status.UNAUTHENTICATED);

    await fs.writeFile(keysFile, '{"keys": [{"id": "x"}]}');
    await eventually(() => harness!.logger.lines.some((l) => l.message === 'keys file invalid; keeping the keys loaded'), 5000);
    expect((await info(after)).modelName).toBe('double');
    // The log line names the problem, never a key or a hash.
    const line = harness!.logger.lines.find((l) => l.message === 'keys file invalid; keeping the keys loaded')!;
    expect(String(line.fields.error)).toContain('keys.0');
    for (const secret of secrets.values()) expect(line.raw).not.toContain(secret);
  });
});
