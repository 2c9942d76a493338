// Found by test/reliability/faults.test.ts: a job killed while saving its adapter resumes from its newest
// checkpoint, which is at its last step when checkpoint_every divides the step count. The trainer then has
// no step to run; the job must still report the steps, final loss and latest evaluation of the run it
// completes (the checkpoint carries them: trainer_state.json's last_loss and last_eval_loss).

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine, type TrainHyperparameters } from '../src/engine/engine.js';
import { makeModel } from '../src/engine/make-model.js';
import { createLoraConfig } from '../src/engine/peft-config.js';

describe('resuming from a checkpoint at the last step', () => {
  let dir: string;
  let engine: Engine;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-final-step-'));
    await makeModel({ preset: 'tiny', outDir: join(dir, 'tiny'), seed: 2 });
    engine = await Engine.load(join(dir, 'tiny'), { quant: 'nf4', device: 'cpu', log: () => {} });
  }, 120_000);
  afterAll(async () => {
    engine?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('reports the steps and final loss of the run it completes', async () => {
    const examples = Array.from({ length: 4 }, (_, i) => {
      const ids = Int32Array.from({ length: 6 + i }, (_, t) => 1000 + 37 * t + i);
      return { ids, labels: Int32Array.from(ids) };
    });
    const hyper: TrainHyperparameters = { lr: 5e-3, steps: 2, epochs: 1, batchSize: 2, gradAccum: 1, scheduler: 'constant', warmupSteps: 0, weightDecay: 0, maxGradNorm: 1, seed: 1, shuffle: false };
    const lora = createLoraConfig({ r: 2, alpha: 4, targets: ['q_proj'] });
    const adapter = engine.createAdapter(lora, 3);
    const evalExamples = examples.slice(0, 2);
    const full = await engine.train(adapter, examples, { ...hyper, evalExamples, checkpointDir: join(dir, 'ckpt'), checkpointEvery: 1 });
    engine.removeAdapter(adapter);
    const resumed = await engine.resumeAdapter(join(dir, 'ckpt', 'checkpoint-2'));
    const summary = await engine.train(resumed, examples, { ...hyper, evalExamples, resumeFrom: join(dir, 'ckpt', 'checkpoint-2') });
    engine.removeAdapter(resumed);
    expect(summary.cancelled).toBe(false);
    expect(full.evalLoss).not.toBeNull();
    expect({ steps: summary.steps, finalLoss: summary.finalLoss, evalLoss: summary.evalLoss })
      .toEqual({ steps: 2, finalLoss: full.finalLoss, evalLoss: full.evalLoss });
  }, 120_000);
});
