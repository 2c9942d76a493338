// Issue #3, "must show" 1 and 2, with the real engine: a real server on 127.0.0.1 over the small random
// model (NF4 base) and the generated grpc-js clients. Upload → Train (streamed events) → the adapter
// appears → Generate with it reproduces the trained completions → MergeAndUnload → the merged folder
// loads in the engine and generates the same greedy text. Then concurrent Generate calls with two
// different adapters and none each get their own output, identical to single-request runs.

import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine } from '../../src/engine/engine.js';
import { GenerateRequest, type GenerateResponse } from '../../src/gen/tuneserve/v1/generation.js';
import { JobState, LrScheduler, TrainingConfig, type JobEvent } from '../../src/gen/tuneserve/v1/training.js';
import { MergeBase, MergeDtype } from '../../src/gen/tuneserve/v1/adapters.js';
import { startRealServer, type RealServer } from '../helpers/real-server.js';
import { call, collect, connect, upload, type Clients } from '../server/harness.js';

interface Row { prompt: string; completion: string }
const DATA = join(import.meta.dirname, '..', '..', 'data', 'memorize-20.jsonl');

// The memorization recipe of the engine's acceptance test (test/acceptance.test.ts).
const memorize = (fields: Partial<TrainingConfig> = {}) => TrainingConfig.fromPartial({
  rank: 16, alpha: 32, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  learningRate: 2e-3, epochs: 40, batchSize: 4, gradAccum: 1, scheduler: LrScheduler.LR_SCHEDULER_CONSTANT, seed: 7, maxGradNorm: 1, ...fields,
});

describe('gRPC service over the real engine', () => {
  let real: RealServer;
  let clients: Clients;
  let rows: Row[];

  beforeAll(async () => {
    real = await startRealServer({ preset: 'small', seed: 11 });
    clients = connect(real.server.port);
    rows = (await readFile(DATA, 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as Row);
    await upload(clients, 'memorize', await readFile(DATA));
  }, 300_000);

  afterAll(async () => {
    clients?.close();
    await real?.dispose();
  });

  const generate = async (prompt: string, adapterId: string): Promise<{ text: string; ids: number[]; last: GenerateResponse }> => {
    const { messages, error } = await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: prompt, adapterId, maxTokens: 24, temperature: 0, returnTokenIds: true })));
    expect(error).toBeNull();
    return { text: messages.map((m) => m.text).join(''), ids: messages.flatMap((m) => m.tokenIds), last: messages.at(-1)! };
  };

  it('trains over a stream, the adapter appears, generation reproduces, merge round-trips', async () => {
    const { messages, error } = await collect(clients.training.train({ jobId: 'mem-1', adapterId: 'mem', datasetId: 'memorize', initAdapterId: '', detach: false, config: memorize() }));
    expect(error).toBeNull();
    const events = messages.map((m) => m.event as JobEvent);
    expect(events[0]?.queued).toBeDefined();
    // The dataset report comes before the job starts: every row of the memorization set is scored.
    expect(events[1]?.datasetReport?.rows).toBe(rows.length);
    expect(events[1]?.datasetReport?.scoredTokens).toBeGreaterThan(0);
    expect(events.find((e) => e.started)?.started?.totalSteps).toBe(200);
    const steps = events.filter((e) => e.step).map((e) => e.step!);
    expect(steps.map((s) => s.step)).toEqual(Array.from({ length: 200 }, (_, i) => i + 1));
    expect(steps[0]!.loss).toBeGreaterThan(3);
    expect(steps.at(-1)!.loss).toBeLessThan(0.1);
    expect(steps.every((s) => s.tokensPerSecond > 0 && s.learningRate === 2e-3)).toBe(true);
    expect(events.at(-1)?.completed?.adapterId).toBe('mem');

    const { adapter } = await call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'mem' });
    expect(adapter).toMatchObject({ adapterId: 'mem', jobId: 'mem-1', matchesBase: true });
    const { job } = await call(clients.training.getJob, clients.training, { jobId: 'mem-1', includeHistory: false });
    expect(job?.state).toBe(JobState.JOB_STATE_SUCCEEDED);

    // Generate loads the stored adapter into a slot on first use.
    const served: string[] = [];
    for (const row of rows) {
      const g = await generate(row.prompt, 'mem');
      served.push(g.text);
    }
    expect(served).toEqual(rows.map((r) => r.completion));
    // The base alone does not know them.
    const base = await generate(rows[0]!.prompt, '');
    expect(base.text).not.toBe(rows[0]!.completion);

    // MergeAndUnload into the dequantized NF4 weights (what the adapter trained against), f32 output.
    const merge = await collect(clients.adapters.mergeAndUnload({ adapterId: 'mem', outputName: 'mem-merged', dtype: MergeDtype.MERGE_DTYPE_F32, base: MergeBase.MERGE_BASE_DEQUANTIZED, unloadAdapter: true }));
    expect(merge.error).toBeNull();
    const result = merge.messages.at(-1)!.result!;
    expect(merge.messages.filter((m) => m.progress).length).toBeGreaterThan(10);
    expect(result.outputName).toBe('mem-merged');
    expect(result.adapterUnloaded).toBe(true);
    expect(result.fidelity!.top1Agreement).toBe(1);
    // Only the output dtype's rounding separates the merged model from base + adapter here.
    expect(result.fidelity!.maxAbsLogitDiff).toBeLessThan(1e-3);

    const merged = await Engine.load(join(real.sandbox, 'data', 'exports', 'mem-merged'), { quant: 'none', device: 'cpu', log: () => {} });
    try {
      for (const [i, row] of rows.slice(0, 5).entries()) {
        const r = await merged.generate({ promptIds: merged.tokenizer.encode(row.prompt, { addBos: true }), maxTokens: 24 });
        expect(merged.tokenizer.decode(r.ids, { skipSpecialTokens: true }), `row ${i}`).toBe(row.completion);
      }
    } finally {
      merged.close();
    }
  }, 900_000);

  it('concurrent requests with different adapters (and none) each get their own adapter\'s output', async () => {
    // A second adapter on a shifted dataset: the same prompts, other completions.
    const shifted = rows.map((r, i) => ({ prompt: r.prompt, completion: rows[(i + 7) % rows.length]!.completion }));
    await upload(clients, 'shifted', shifted.map((r) => JSON.stringify(r)).join('\n'));
    const trained = await collect(clients.training.train({ jobId: 'shift-1', adapterId: 'shift', datasetId: 'shifted', initAdapterId: '', detach: false, config: memorize({ seed: 8 }) }));
    expect(trained.error).toBeNull();
    await call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'mem' });
    await call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'shift' });

    const prompts = rows.slice(0, 4).map((r) => r.prompt);
    const single: Record<string, string[]> = {};
    for (const id of ['mem', 'shift', '']) {
      single[id] = [];
      for (const p of prompts) single[id]!.push((await generate(p, id)).text);
    }
    expect(single.mem).toEqual(rows.slice(0, 4).map((r) => r.completion));
    expect(single.shift).toEqual(shifted.slice(0, 4).map((r) => r.completion));

    // All twelve at once: the engine batches them into shared decode steps with mixed adapters.
    const jobs = ['mem', 'shift', ''].flatMap((id) => prompts.map(async (p, i) => ({ id, i, text: (await generate(p, id)).text })));
    for (const r of await Promise.all(jobs)) expect(r.text, `${r.id || 'base'} #${r.i}`).toBe(single[r.id]![r.i]);
  }, 900_000);

  it('trains a chat dataset, packed, with the forgetting check; Generate\'s chat prompt answers the held-in questions', async () => {
    // Support answers in the model's own chat template: loss on the assistant turns only. With
    // max_seq_len 128 the ~40-token conversations pack two or three to a sequence (auto: an
    // epoch-based job); the general-text set is scored before and after (the forgetting check).
    const file = join(import.meta.dirname, '..', 'fixtures', 'chat-support.jsonl');
    const chats = (await readFile(file, 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { messages: { role: string; content: string }[] });
    await upload(clients, 'support', await readFile(file));
    const { messages, error } = await collect(clients.training.train({
      jobId: 'chat-1', adapterId: 'support', datasetId: 'support', initAdapterId: '', detach: false,
      config: memorize({ maxSeqLen: 128, batchSize: 1, epochs: 60, forgettingCheck: true }),
    }));
    expect(error).toBeNull();
    const events = messages.map((m) => m.event as JobEvent);
    const report = events.find((e) => e.datasetReport)!.datasetReport!;
    expect(report.rowsByFormat?.messages).toBe(chats.length);
    expect(report.packingEnabled).toBe(true);
    expect(report.trainingSequences).toBeLessThanOrEqual(chats.length / 2);
    expect(report.packingReason).toMatch(/^auto: /);
    expect(events.find((e) => e.started)?.started?.trainExamples).toBe(chats.length);
    const completed = events.at(-1)?.completed;
    expect(completed?.adapterId).toBe('support');
    // The forgetting figure is in the job summary: the base's general-text loss and the adapter's.
    const metrics = completed!.metrics!;
    expect(metrics.forgettingBaseLoss).toBeGreaterThan(0);
    expect(metrics.forgettingLoss).toBeGreaterThan(0);
    const { job } = await call(clients.training.getJob, clients.training, { jobId: 'chat-1', includeHistory: false });
    expect(job?.metrics?.forgettingLoss).toBe(metrics.forgettingLoss);

    for (const chat of chats) {
      const question = chat.messages.filter((m) => m.role === 'user');
      const { messages: pieces, error: genError } = await collect(clients.generation.generate(GenerateRequest.fromPartial({
        chat: { messages: question }, adapterId: 'support', maxTokens: 32, temperature: 0,
      })));
      expect(genError).toBeNull();
      expect(pieces.map((m) => m.text).join(''), question[0]!.content).toBe(chat.messages.at(-1)!.content);
    }
  }, 900_000);
});
