// Every error status the service promises, provoked over the wire, each with its google.rpc
// details; and hostile ids refused by every RPC that takes one, with nothing outside the data
// root read or written.

import { Metadata, status } from '@grpc/grpc-js';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { GenerateRequest } from '../../src/gen/tuneserve/v1/generation.js';
import { LrScheduler, TrainingConfig, type TrainRequest } from '../../src/gen/tuneserve/v1/training.js';
import { EngineError } from '../../src/engine/errors.js';
import { isStorageFull, toServiceError } from '../../src/server/errors.js';
import { EngineDouble } from './engine-double.js';
import {
  call,
  collect,
  eventually,
  expectError,
  expectStatus,
  hostileIds,
  importAdapter,
  recordingLogger,
  sha256,
  startHarness,
  tree,
  upload,
  type Harness,
} from './harness.js';

const train = (fields: Partial<TrainRequest>): TrainRequest => ({ jobId: '', adapterId: 'bot', initAdapterId: '', detach: false, ...fields });
const ROWS = '{"text":"a"}\n{"text":"b"}\n';

describe('error statuses', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  it('INVALID_ARGUMENT names the field (training config)', async () => {
    harness = await startHarness();
    const { clients } = harness;
    await upload(clients, 'qa', ROWS);
    const cases: [Partial<TrainingConfig>, string][] = [
      [{ rank: 1000 }, 'config.rank'],
      [{ learningRate: -1 }, 'config.learning_rate'],
      [{ dropout: 1 }, 'config.dropout'],
      [{ targetModules: ['attn'] }, 'config.target_modules[0]'],
      [{ batchSize: 5000 }, 'config.batch_size'],
      [{ maxSeqLen: 100_000 }, 'config.max_seq_len'],
      [{ evalFraction: 0.9 }, 'config.eval_fraction'],
      [{ scheduler: 42 as LrScheduler }, 'config.scheduler'],
      [{ maxGradNorm: -1 }, 'config.max_grad_norm'],
    ];
    for (const [config, field] of cases) {
      const { error } = await collect(clients.training.train(train({ datasetId: 'qa', config: TrainingConfig.fromPartial(config) })));
      expectError(error, status.INVALID_ARGUMENT, { field });
    }
    const both = await collect(clients.training.train(train({ datasetId: 'qa', inlineJsonl: Buffer.from(ROWS) })));
    expectError(both.error, status.INVALID_ARGUMENT, { field: 'dataset' });
    const badRow = await collect(clients.training.train(train({ inlineJsonl: Buffer.from('{"text":"a"}\nnot json\n') })));
    const details = expectError(badRow.error, status.INVALID_ARGUMENT, { field: 'inline_jsonl', reason: 'INVALID_DATASET' });
    expect(details.fieldViolations[0]?.description).toContain('line 2');
    const page = call(clients.training.listJobs, clients.training, { pageSize: 0, pageToken: 'garbage', states: [] });
    await expectStatus(page, status.INVALID_ARGUMENT, { field: 'page_token' });
    expect(harness.engine.records.trainSpecs).toHaveLength(0);
  });

  it('NOT_FOUND for unknown jobs, datasets and adapters', async () => {
    harness = await startHarness();
    const { clients } = harness;
    await expectStatus(call(clients.training.getJob, clients.training, { jobId: 'nope', includeHistory: false }), status.NOT_FOUND, { reason: 'JOB_NOT_FOUND' });
    expectError((await collect(clients.training.watchJob({ jobId: 'nope', afterSequence: 0 }))).error, status.NOT_FOUND);
    await expectStatus(call(clients.training.cancelJob, clients.training, { jobId: 'nope' }), status.NOT_FOUND);
    await expectStatus(call(clients.datasets.deleteDataset, clients.datasets, { datasetId: 'nope' }), status.NOT_FOUND, { reason: 'DATASET_NOT_FOUND' });
    await expectStatus(call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'nope' }), status.NOT_FOUND, { reason: 'ADAPTER_NOT_FOUND' });
    expectError((await collect(clients.training.train(train({ datasetId: 'nope' })))).error, status.NOT_FOUND, { reason: 'DATASET_NOT_FOUND' });
    expectError((await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'x', adapterId: 'nope' })))).error, status.NOT_FOUND);
    expectError((await collect(clients.adapters.exportAdapter({ adapterId: 'nope', chunkSize: 0 }))).error, status.NOT_FOUND);
  });

  it('ALREADY_EXISTS for taken dataset, adapter, job and export names', async () => {
    harness = await startHarness();
    const { clients } = harness;
    await upload(clients, 'qa', ROWS);
    await expectStatus(upload(clients, 'qa', ROWS), status.ALREADY_EXISTS, { reason: 'DATASET_ALREADY_EXISTS' });
    await importAdapter(clients, 'bot');
    await expectStatus(importAdapter(clients, 'bot'), status.ALREADY_EXISTS, { reason: 'ADAPTER_ALREADY_EXISTS' });
    expectError((await collect(clients.training.train(train({ datasetId: 'qa' })))).error, status.ALREADY_EXISTS);
    await collect(clients.training.train(train({ jobId: 'j1', adapterId: 'fresh', datasetId: 'qa', config: TrainingConfig.fromPartial({ maxSteps: 1 }) })));
    const again = await collect(clients.training.train(train({ jobId: 'j1', adapterId: 'other', datasetId: 'qa' })));
    expectError(again.error, status.ALREADY_EXISTS, { reason: 'JOB_ALREADY_EXISTS' });
    await collect(clients.adapters.mergeAndUnload({ adapterId: 'bot', outputName: 'merged', dtype: 0, base: 0, unloadAdapter: false }));
    const merged = await collect(clients.adapters.mergeAndUnload({ adapterId: 'bot', outputName: 'merged', dtype: 0, base: 0, unloadAdapter: false }));
    expectError(merged.error, status.ALREADY_EXISTS, { reason: 'EXPORT_ALREADY_EXISTS' });
  });

  it('FAILED_PRECONDITION for wrong state: dataset in use, job ended, adapter for another base, adapter in use', async () => {
    const double = () => new EngineDouble({ trainStepMs: 20, decodeStepMs: 10, script: () => 'z'.repeat(1000) });
    harness = await startHarness({ engine: double() });
    let { clients } = harness;
    await upload(clients, 'qa', ROWS);
    await collect(clients.training.train(train({ jobId: 'busy', datasetId: 'qa', detach: true, config: TrainingConfig.fromPartial({ maxSteps: 1000 }) })));
    await expectStatus(call(clients.datasets.deleteDataset, clients.datasets, { datasetId: 'qa' }), status.FAILED_PRECONDITION, { reason: 'DATASET_IN_USE' });
    await call(clients.training.cancelJob, clients.training, { jobId: 'busy' });
    await eventually(async () => (await call(clients.training.getJob, clients.training, { jobId: 'busy', includeHistory: false })).job?.endTime);
    await expectStatus(call(clients.training.cancelJob, clients.training, { jobId: 'busy' }), status.FAILED_PRECONDITION, { reason: 'JOB_ALREADY_ENDED' });
    await call(clients.datasets.deleteDataset, clients.datasets, { datasetId: 'qa' });

    // Shapes for another base: refused at import, nothing stored.
    await expectStatus(importAdapter(clients, 'wide', { hidden: 128 }), status.FAILED_PRECONDITION, { reason: 'ADAPTER_MISMATCH' });
    await expectStatus(call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'wide' }), status.NOT_FOUND);

    // An adapter recorded against another base fingerprint: refused at load and for training.
    await importAdapter(clients, 'old');
    const metadataFile = path.join(harness.dataRoot, 'adapters', 'old', 'tuneserve.json');
    const metadata = JSON.parse(await fs.readFile(metadataFile, 'utf8')) as { baseFingerprint: string };
    await fs.writeFile(metadataFile, JSON.stringify({ ...metadata, baseFingerprint: '0'.repeat(64) }));
    // A stored version's record is read once (versions never change): a restart, as onto another base, reads it again.
    await harness.stop();
    harness = await startHarness({ engine: double(), sandbox: harness.sandbox });
    ({ clients } = harness);
    await expectStatus(call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'old' }), status.FAILED_PRECONDITION, { reason: 'BASE_MISMATCH' });
    const { adapter } = await call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'old' });
    expect(adapter?.matchesBase).toBe(false);

    // In use by a generation: cannot unload or delete until it ends.
    await importAdapter(clients, 'live');
    const generation = clients.generation.generate(GenerateRequest.fromPartial({ text: 'x', adapterId: 'live', maxTokens: 1000 }));
    await new Promise<void>((resolve) => generation.once('data', () => resolve()));
    generation.on('error', () => {});
    await expectStatus(call(clients.adapters.unloadAdapter, clients.adapters, { adapterId: 'live' }), status.FAILED_PRECONDITION, { reason: 'ADAPTER_IN_USE' });
    await expectStatus(call(clients.adapters.deleteAdapter, clients.adapters, { adapterId: 'live' }), status.FAILED_PRECONDITION, { reason: 'ADAPTER_IN_USE' });
    generation.cancel();
    await eventually(async () => {
      try {
        await call(clients.adapters.unloadAdapter, clients.adapters, { adapterId: 'live' });
        return true;
      } catch {
        return false;
      }
    });
  });

  it('RESOURCE_EXHAUSTED with a retry hint: training queue, generation capacity, merge slot (a full adapter pool evicts instead)', async () => {
    harness = await startHarness({
      engine: new EngineDouble({ trainStepMs: 20, decodeStepMs: 10, mergeTensorMs: 50, mergeTensors: 100, adapterSlots: 2, script: () => 'q'.repeat(1000) }),
      server: { limits: { maxQueuedJobs: 1, maxConcurrentGenerations: 1 } },
    });
    const { clients } = harness;
    await upload(clients, 'qa', ROWS);
    const long = TrainingConfig.fromPartial({ maxSteps: 1000 });
    await collect(clients.training.train(train({ jobId: 'running', adapterId: 'r', datasetId: 'qa', detach: true, config: long })));
    await eventually(async () => (await call(clients.training.getJob, clients.training, { jobId: 'running', includeHistory: false })).job?.startTime);
    await collect(clients.training.train(train({ jobId: 'waiting', adapterId: 'w', datasetId: 'qa', detach: true, config: long })));
    const full = await collect(clients.training.train(train({ jobId: 'refused', adapterId: 'x', datasetId: 'qa', config: long })));
    const queueDetails = expectError(full.error, status.RESOURCE_EXHAUSTED, { reason: 'TRAINING_QUEUE_FULL', retry: true });
    expect(queueDetails.metadata.max_queued_jobs).toBe('1');

    const first = clients.generation.generate(GenerateRequest.fromPartial({ text: 'x', maxTokens: 1000 }));
    await new Promise<void>((resolve) => first.once('data', () => resolve()));
    first.on('error', () => {});
    const second = await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'y' })));
    expectError(second.error, status.RESOURCE_EXHAUSTED, { reason: 'GENERATION_CAPACITY', retry: true });
    first.cancel();

    // A full adapter pool is no refusal: the least recently used idle adapter leaves its slot. Pinning
    // every slot is refused instead (one must stay free for the others).
    for (const id of ['a1', 'a2', 'a3']) await importAdapter(clients, id);
    await call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'a1' });
    await call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'a2' });
    const { adapter: a3 } = await call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'a3' });
    expect(a3?.loaded).toBe(true);
    const { adapter: a1 } = await call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'a1' });
    expect(a1).toMatchObject({ loaded: false, stats: { evictions: 1 } });
    await call(clients.adapters.pinAdapter, clients.adapters, { adapterId: 'a2', pinned: true });
    await expectStatus(call(clients.adapters.pinAdapter, clients.adapters, { adapterId: 'a3', pinned: true }), status.FAILED_PRECONDITION, { reason: 'PIN_LIMIT' });

    const merging = clients.adapters.mergeAndUnload({ adapterId: 'a1', outputName: 'm1', dtype: 0, base: 0, unloadAdapter: false });
    await new Promise<void>((resolve) => merging.once('data', () => resolve()));
    merging.on('error', () => {});
    const busy = await collect(clients.adapters.mergeAndUnload({ adapterId: 'a2', outputName: 'm2', dtype: 0, base: 0, unloadAdapter: false }));
    expectError(busy.error, status.RESOURCE_EXHAUSTED, { reason: 'MERGE_IN_PROGRESS', retry: true });
    merging.cancel();

    // Transient engine refusals (KV cache full) keep their retry hint.
    harness.engine.settings.failNextGenerate = 'RESOURCE_EXHAUSTED';
    await eventually(async () => {
      const refused = await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'z' })));
      return refused.error?.code === status.RESOURCE_EXHAUSTED;
    });
  });

  it('CANCELLED and DEADLINE_EXCEEDED on unary and streaming calls leave the server healthy', async () => {
    harness = await startHarness({ engine: new EngineDouble({ mergeTensorMs: 30, mergeTensors: 50 }) });
    const { clients } = harness;
    await importAdapter(clients, 'bot');
    const merge = clients.adapters.mergeAndUnload({ adapterId: 'bot', outputName: 'out', dtype: 0, base: 0, unloadAdapter: false }, new Metadata(), {
      deadline: Date.now() + 400,
    });
    const { messages, error } = await collect(merge);
    expect(messages.length).toBeGreaterThan(0);
    expectError(error, status.DEADLINE_EXCEEDED);
    // The partial merge is gone and the merge slot is free again.
    await eventually(async () => (await fs.readdir(path.join(harness!.dataRoot, 'exports'))).length === 0);
    const ok = await collect(clients.adapters.mergeAndUnload({ adapterId: 'bot', outputName: 'out', dtype: 0, base: 0, unloadAdapter: true }));
    expect(ok.messages.at(-1)?.result?.outputName).toBe('out');

    const cancelled = clients.adapters.mergeAndUnload({ adapterId: 'bot', outputName: 'out2', dtype: 0, base: 0, unloadAdapter: false });
    const cancelledResult = collect(cancelled);
    cancelled.once('data', () => cancelled.cancel());
    expectError((await cancelledResult).error, status.CANCELLED);
    await eventually(async () => !(await fs.readdir(path.join(harness!.dataRoot, 'exports'))).includes('out2'));
  });

  it('UNAUTHENTICATED without the bearer token when tokens are configured', async () => {
    harness = await startHarness({ server: { keys: { tokens: ['s3cret'] } } });
    const { clients } = harness;
    await expectStatus(call(clients.model.getModelInfo, clients.model, {}), status.UNAUTHENTICATED, { reason: 'UNAUTHENTICATED' });
    const wrong = new Metadata();
    wrong.set('authorization', 'Bearer nope');
    await expectStatus(call(clients.model.getModelInfo, clients.model, {}, {}, wrong), status.UNAUTHENTICATED);
    const right = new Metadata();
    right.set('authorization', 'Bearer s3cret');
    const info = await call(clients.model.getModelInfo, clients.model, {}, {}, right);
    expect(info.modelName).toBe('double');
  });

  it('INTERNAL with a generic message for unexpected failures, logged in full', async () => {
    const engine = new EngineDouble();
    engine.generate = async () => {
      throw new TypeError('boom at /secret/path');
    };
    harness = await startHarness({ engine, allowErrorLogs: true });
    const { error } = await collect(harness.clients.generation.generate(GenerateRequest.fromPartial({ text: 'x' })));
    expectError(error, status.INTERNAL, { reason: 'INTERNAL' });
    expect(error?.details).toBe('internal error');
    expect(harness.logger.lines.some((l) => l.level === 'error' && String(l.fields?.error).includes('boom'))).toBe(true);
  });
});

describe('hostile ids', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  it('are refused by every RPC that takes an id, and nothing outside the data root is touched', async () => {
    harness = await startHarness();
    const { clients, sandbox, dataRoot, engine } = harness;
    // A decoy next to the data root, shaped like what a traversal would reach.
    const decoy = path.join(sandbox, 'x');
    await fs.mkdir(decoy);
    await fs.writeFile(path.join(decoy, 'adapter_config.json'), '{"peft_type":"LORA"}');
    const outsideBefore = await tree(sandbox).then((files) => files.filter((f) => !f.startsWith('data/')));
    const decoyStat = await fs.stat(path.join(decoy, 'adapter_config.json'));

    await upload(clients, 'qa', ROWS);
    await importAdapter(clients, 'good');
    for (const id of hostileIds) {
      const field = (name: string) => ({ field: name });
      await expectStatus(call(clients.adapters.getAdapter, clients.adapters, { adapterId: id }), status.INVALID_ARGUMENT, field('adapter_id'));
      await expectStatus(call(clients.adapters.loadAdapter, clients.adapters, { adapterId: id }), status.INVALID_ARGUMENT, field('adapter_id'));
      await expectStatus(call(clients.adapters.unloadAdapter, clients.adapters, { adapterId: id }), status.INVALID_ARGUMENT, field('adapter_id'));
      await expectStatus(call(clients.adapters.deleteAdapter, clients.adapters, { adapterId: id }), status.INVALID_ARGUMENT, field('adapter_id'));
      expectError((await collect(clients.adapters.exportAdapter({ adapterId: id, chunkSize: 0 }))).error, status.INVALID_ARGUMENT, field('adapter_id'));
      await expectStatus(importAdapter(clients, id), status.INVALID_ARGUMENT, field('header.adapter_id'));
      const mergeOut = await collect(clients.adapters.mergeAndUnload({ adapterId: 'good', outputName: id, dtype: 0, base: 0, unloadAdapter: false }));
      expectError(mergeOut.error, status.INVALID_ARGUMENT, field('output_name'));
      const mergeIn = await collect(clients.adapters.mergeAndUnload({ adapterId: id, outputName: 'fine', dtype: 0, base: 0, unloadAdapter: false }));
      expectError(mergeIn.error, status.INVALID_ARGUMENT, field('adapter_id'));
      expectError((await collect(clients.training.train(train({ adapterId: id, datasetId: 'qa' })))).error, status.INVALID_ARGUMENT, field('adapter_id'));
      expectError((await collect(clients.training.train(train({ datasetId: id })))).error, status.INVALID_ARGUMENT, field('dataset_id'));
      if (id !== '') {
        // Empty means "none" for these optional ids (the base model, a fresh adapter, a server-chosen job id).
        expectError((await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'x', adapterId: id })))).error, status.INVALID_ARGUMENT, field('adapter_id'));
        expectError((await collect(clients.training.train(train({ datasetId: 'qa', initAdapterId: id })))).error, status.INVALID_ARGUMENT, field('init_adapter_id'));
        expectError((await collect(clients.training.train(train({ jobId: id, datasetId: 'qa' })))).error, status.INVALID_ARGUMENT, field('job_id'));
      }
      await expectStatus(call(clients.training.getJob, clients.training, { jobId: id, includeHistory: false }), status.INVALID_ARGUMENT, field('job_id'));
      await expectStatus(call(clients.training.cancelJob, clients.training, { jobId: id }), status.INVALID_ARGUMENT, field('job_id'));
      expectError((await collect(clients.training.watchJob({ jobId: id, afterSequence: 0 }))).error, status.INVALID_ARGUMENT, field('job_id'));
      await expectStatus(upload(clients, id, ROWS), status.INVALID_ARGUMENT, field('header.dataset_id'));
      await expectStatus(call(clients.datasets.getDataset, clients.datasets, { datasetId: id }), status.INVALID_ARGUMENT, field('dataset_id'));
      await expectStatus(call(clients.datasets.deleteDataset, clients.datasets, { datasetId: id }), status.INVALID_ARGUMENT, field('dataset_id'));
    }
    // Import file names are a fixed set: no path can sneak in through the manifest either.
    const sneaky = { '../adapter_config.json': Buffer.from('{}'), 'adapter_model.safetensors': Buffer.from('x') };
    await expectStatus(importAdapter(clients, 'sneaky', { files: sneaky }), status.INVALID_ARGUMENT, { field: 'header.files[0].name' });
    const chunkOutside = importAdapter(clients, 'sneaky2', {
      files: { 'adapter_config.json': Buffer.from('{}'), 'adapter_model.safetensors': Buffer.from('x'), '/etc/passwd': Buffer.from('x') },
      manifest: [
        { name: 'adapter_config.json', sizeBytes: 2, sha256: sha256('{}') },
        { name: 'adapter_model.safetensors', sizeBytes: 1, sha256: sha256('x') },
      ],
    });
    await expectStatus(chunkOutside, status.INVALID_ARGUMENT, { field: 'chunk.name' });

    // Nothing outside the data root changed, and the engine only ever saw paths inside it.
    expect(await tree(sandbox).then((files) => files.filter((f) => !f.startsWith('data/')))).toEqual(outsideBefore);
    expect((await fs.stat(path.join(decoy, 'adapter_config.json'))).mtimeMs).toBe(decoyStat.mtimeMs);
    const root = await fs.realpath(dataRoot);
    for (const seen of engine.records.paths) expect(seen.startsWith(`${root}${path.sep}`), seen).toBe(true);
    // Failed imports and uploads left no residue.
    expect(await fs.readdir(path.join(dataRoot, 'tmp'))).toEqual([]);
    expect((await fs.readdir(path.join(dataRoot, 'adapters'))).sort()).toEqual(['good']);
  });
});

describe('a full data volume', () => {
  // Found by the reliability faults suite (test/reliability/faults.test.ts): ENOSPC was an INTERNAL
  // "failed to read or write a file". Whatever layer meets it, the client gets one clear answer.
  const logger = recordingLogger();
  const full = [
    Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' }),
    new EngineError('IO_ERROR', '/data/x.safetensors.tmp-1-0: write failed: No space left on device'),
    new EngineError('IO_ERROR', 'cannot write /data/x', { path: '/data/x' }, { cause: Object.assign(new Error('quota'), { code: 'EDQUOT' }) }),
    Object.assign(new Error('database or disk is full'), { code: 'SQLITE_FULL' }),
  ];
  it.each(full.map((error) => [error.message, error]))('%s → RESOURCE_EXHAUSTED STORAGE_FULL with a retry hint', (_message, error) => {
    const mapped = toServiceError(error, logger, 'test');
    expect([mapped.code, mapped.reason, mapped.details.retryAfterMs]).toEqual([status.RESOURCE_EXHAUSTED, 'STORAGE_FULL', 60_000]);
    expect(isStorageFull(error)).toBe(true);
  });
  it('other I/O errors stay INTERNAL IO_ERROR', () => {
    const mapped = toServiceError(new EngineError('IO_ERROR', 'read failed: Input/output error'), logger, 'test');
    expect([mapped.code, mapped.reason]).toEqual([status.INTERNAL, 'IO_ERROR']);
  });
});
