// Issue 9, the engine's part: training that can be trusted, on the real engine (tiny model, CPU).
//  - exact resume: a job cancelled mid-run (a checkpoint at the cancel) or resumed from a periodic
//    checkpoint ends with the same adapter bytes and losses as the uninterrupted job; a resume under
//    another configuration or dataset is refused (CHECKPOINT_MISMATCH);
//  - the guard: an injected non-finite gradient is rolled back to the last good state with a lower
//    LR and the job completes (policy rollback), is dropped (skip), or fails the job (fail);
//  - evaluation: early stopping with patience, and keep_best ending with the best evaluation's weights;
//  - the forgetting check: a general-text set scored with the base and with the adapter.
// Checks are equalities (same code, same data, same order on the CPU backend give identical floats),
// except where noted.

import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine, type TrainHyperparameters } from '../src/engine/engine.js';
import { makeModel } from '../src/engine/make-model.js';
import { createLoraConfig } from '../src/engine/peft-config.js';
import { rng } from './helpers/random.js';

describe('training an enterprise can trust (engine)', () => {
  let dir: string;
  let engine: Engine;
  const lora = createLoraConfig({ r: 4, alpha: 8, dropout: 0.1, targets: 'all-linear' });
  // Eight rows of different lengths: shuffling, padding and two epochs all matter.
  const examples = Array.from({ length: 8 }, (_, i) => {
    const r = rng(100 + i);
    const ids = Int32Array.from({ length: 5 + 3 * i }, () => 1000 + Math.floor(r() * 5000));
    return { ids, labels: Int32Array.from(ids) };
  });
  const hyper: TrainHyperparameters = {
    lr: 5e-3, steps: 6, epochs: 1, batchSize: 3, gradAccum: 2, scheduler: 'linear', warmupSteps: 1,
    weightDecay: 0.01, maxGradNorm: 1, seed: 5, shuffle: true,
  };

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-trust-'));
    await makeModel({ preset: 'tiny', outDir: join(dir, 'tiny'), seed: 2 });
    engine = await Engine.load(join(dir, 'tiny'), { quant: 'nf4', device: 'cpu', log: () => {} });
  }, 120_000);
  afterAll(async () => {
    engine?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  /** Trains a fresh adapter (seed 9) to the end; returns its tensors and per-step losses. */
  async function uninterrupted(extra: Partial<TrainHyperparameters> = {}) {
    const adapter = engine.createAdapter(lora, 9);
    const losses: number[] = [];
    const summary = await engine.train(adapter, examples, { ...hyper, ...extra }, { onStep: (e) => losses.push(e.loss) });
    const tensors = await engine.adapterTensors(adapter);
    engine.removeAdapter(adapter);
    return { summary, losses, tensors };
  }

  it('resumes exactly: cancelled at step 4 and resumed ends bit-identical to the uninterrupted run', async () => {
    const want = await uninterrupted();
    // Cancel as soon as step 4 is reported (the executor may already be inside step 5: the checkpoint
    // is of the last completed step either way).
    const ckpt = join(dir, 'cancel-ckpt');
    const adapter = engine.createAdapter(lora, 9);
    const controller = new AbortController();
    const first: number[] = [];
    const part = await engine.train(adapter, examples, { ...hyper, checkpointDir: ckpt }, {
      signal: controller.signal,
      onStep: (e) => {
        first.push(e.loss);
        if (e.step === 4) controller.abort();
      },
    });
    engine.removeAdapter(adapter);
    expect(part).toMatchObject({ cancelled: true, steps: 4, cancelCheckpoint: join(ckpt, 'checkpoint-4') });
    const folders = await readdir(ckpt);
    expect(folders).toEqual(['checkpoint-4']);
    const files = (await readdir(join(ckpt, 'checkpoint-4'))).sort();
    expect(files).toEqual(['adapter_config.json', 'adapter_model.safetensors', 'optimizer.safetensors', 'trainer_state.json']);
    const state = JSON.parse(await readFile(join(ckpt, 'checkpoint-4', 'trainer_state.json'), 'utf8')) as { step: number };
    expect(state.step).toBe(4);

    const resumed = await engine.resumeAdapter(join(ckpt, 'checkpoint-4'));
    const rest: number[] = [];
    await engine.train(resumed, examples, { ...hyper, resumeFrom: join(ckpt, 'checkpoint-4') }, { onStep: (e) => rest.push(e.loss) });
    const got = await engine.adapterTensors(resumed);
    engine.removeAdapter(resumed);
    expect([...first.slice(0, 4), ...rest]).toEqual(want.losses);
    expect(got).toEqual(want.tensors);
  }, 120_000);

  it('resumes exactly from a periodic checkpoint, and refuses another configuration or dataset', async () => {
    const want = await uninterrupted();
    const ckpt = join(dir, 'periodic');
    const adapter = engine.createAdapter(lora, 9);
    await engine.train(adapter, examples, { ...hyper, checkpointDir: ckpt, checkpointEvery: 3 });
    engine.removeAdapter(adapter);
    expect((await readdir(ckpt)).sort()).toEqual(['checkpoint-3', 'checkpoint-6']);
    const from = join(ckpt, 'checkpoint-3');

    const resumed = await engine.resumeAdapter(from);
    await engine.train(resumed, examples, { ...hyper, resumeFrom: from });
    expect(await engine.adapterTensors(resumed)).toEqual(want.tensors);
    engine.removeAdapter(resumed);

    const other = await engine.resumeAdapter(from);
    await expect(engine.train(other, examples, { ...hyper, lr: 1e-3, resumeFrom: from })).rejects.toMatchObject({
      code: 'CHECKPOINT_MISMATCH', message: expect.stringMatching(/another training configuration/),
    });
    const shuffledData = [...examples].reverse();
    await expect(engine.train(other, shuffledData, { ...hyper, resumeFrom: from })).rejects.toMatchObject({
      code: 'CHECKPOINT_MISMATCH', message: expect.stringMatching(/another dataset/),
    });
    engine.removeAdapter(other);
  }, 120_000);

  it('rolls back an injected non-finite gradient to the last checkpoint with a lower LR, and completes', async () => {
    const adapter = engine.createAdapter(lora, 9);
    const events: { step: number; loss: number; lr: number; guardAction?: string; rolledBackTo?: number }[] = [];
    const summary = await engine.train(adapter, examples, {
      ...hyper, checkpointDir: join(dir, 'rollback'), checkpointEvery: 2, injectNonfiniteStep: 3,
    }, { onStep: (e) => events.push(e) });
    engine.removeAdapter(adapter);
    const rollback = events.find((e) => e.guardAction === 'rollback')!;
    expect(rollback).toMatchObject({ step: 3, rolledBackTo: 2, guardReason: 'non-finite gradient norm' });
    expect(events.map((e) => e.step)).toEqual([1, 2, 3, 3, 4, 5, 6]);  // step 3 failed, rolled back to 2, redone
    const after = events.slice(events.indexOf(rollback) + 1);
    const before = events.slice(0, events.indexOf(rollback));
    // The replayed step 3 uses half the LR the first attempt would have had (linear schedule, same step).
    expect(after[0]!.lr).toBeCloseTo(events[1]!.lr * (4 / 5) * 0.5, 12);
    expect([...before, ...after].every((e) => Number.isFinite(e.loss) && e.guardAction === undefined)).toBe(true);
    expect(summary.steps).toBe(6);
    expect(summary.interventions).toBe(1);
    const tensors = await engine.adapterTensors(await engine.resumeAdapter(join(dir, 'rollback', 'checkpoint-6')));
    expect(Object.values(tensors).every((t) => t.every(Number.isFinite))).toBe(true);
  }, 120_000);

  it('skips a non-finite batch (policy skip) and fails the job (policy fail)', async () => {
    const skipped: { step: number; guardAction?: string; guardReason?: string }[] = [];
    const adapter = engine.createAdapter(lora, 9);
    const summary = await engine.train(adapter, examples, { ...hyper, injectNonfiniteStep: 2, nonfinitePolicy: 'skip' }, { onStep: (e) => skipped.push(e) });
    expect(skipped.map((e) => e.step)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(skipped[1]).toMatchObject({ guardAction: 'skip', guardReason: 'non-finite gradient norm' });
    expect(summary.interventions).toBe(1);
    const tensors = await engine.adapterTensors(adapter);
    expect(Object.values(tensors).every((t) => t.every(Number.isFinite))).toBe(true);
    await expect(engine.train(adapter, examples, { ...hyper, injectNonfiniteStep: 2, nonfinitePolicy: 'fail' })).rejects.toMatchObject({
      code: 'TRAINING_DIVERGED', message: expect.stringMatching(/non-finite gradient norm at step 2/),
    });
    engine.removeAdapter(adapter);
  }, 120_000);

  it('stops early after `patience` evaluations without improvement, and keep_best ends on the best weights', async () => {
    // min_delta is unreachable, so only the first evaluation counts as an improvement: with patience 2
    // the job stops at the third evaluation (step 6 of 12), and keep_best restores step 2's weights.
    const evalExamples = examples.slice(0, 3);
    const adapter = engine.createAdapter(lora, 9);
    const events: { step: number; evalLoss?: number; stoppedEarly?: boolean; bestStep?: number }[] = [];
    const summary = await engine.train(adapter, examples, {
      ...hyper, steps: 12, evalExamples, evalEvery: 2, earlyStoppingPatience: 2, earlyStoppingMinDelta: 1e9, keepBest: true,
    }, { onStep: (e) => events.push(e) });
    expect(events.filter((e) => e.evalLoss !== undefined).map((e) => e.step)).toEqual([2, 4, 6]);
    expect(events.at(-1)).toMatchObject({ step: 6, stoppedEarly: true, bestStep: 2 });
    expect(summary).toMatchObject({ steps: 6, stoppedEarly: true, bestStep: 2 });
    const best = await engine.adapterTensors(adapter);
    engine.removeAdapter(adapter);
    // The weights after exactly 2 steps of the same 12-step schedule.
    const two = engine.createAdapter(lora, 9);
    const probe: Record<string, Float32Array>[] = [];
    const controller = new AbortController();
    await engine.train(two, examples, { ...hyper, steps: 12 }, {
      signal: controller.signal,
      onStep: (e) => { if (e.step === 2) controller.abort(); },
    });
    probe.push(await engine.adapterTensors(two));
    engine.removeAdapter(two);
    // A and B after step 2 (the cancel discards any partial third step: the weights are step 2's).
    for (const key of Object.keys(best)) expect(best[key]).toEqual(probe[0]![key]);
  }, 120_000);

  it('scores the forgetting set with the base at the start and with the adapter at each evaluation', async () => {
    const general = examples.slice(5).map((e) => ({ ids: e.ids.map((x) => x + 7), labels: e.labels.map((x) => x + 7) }));
    const adapter = engine.createAdapter(lora, 9);
    const events: { step: number; forgettingLoss?: number; forgettingBaseLoss?: number }[] = [];
    const summary = await engine.train(adapter, examples, { ...hyper, lr: 5e-2, forgettingExamples: general, evalEvery: 3 }, { onStep: (e) => events.push(e) });
    engine.removeAdapter(adapter);
    const scored = events.filter((e) => e.forgettingLoss !== undefined);
    expect(scored.map((e) => e.step)).toEqual([3, 6]);
    const base = scored[0]!.forgettingBaseLoss!;
    expect(scored.every((e) => e.forgettingBaseLoss === base)).toBe(true);
    // The base's loss on random ids is about ln(V) ≈ 11.8; the adapter moved it (it trained at a high LR).
    expect(base).toBeGreaterThan(8);
    expect(Math.abs(summary.forgettingLoss! - base)).toBeGreaterThan(1e-3);
    expect(summary.forgettingBaseLoss).toBe(base);
  }, 120_000);
});
