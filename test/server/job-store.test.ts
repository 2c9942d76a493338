// The SQLite job store: events and the job row move together, late events after the end are
// dropped, and reopening after a crash marks running jobs interrupted while keeping their history.

import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { JobStore, type Hyperparameters } from '../../src/server/job-store.js';
import { makeSandbox } from './harness.js';

const config: Hyperparameters = {
  rank: 8, alpha: 16, dropout: 0.05, targetModules: ['q_proj'], learningRate: 2e-4, maxSteps: 3, epochs: 1,
  batchSize: 1, gradAccum: 1, maxSeqLen: 128, scheduler: 'linear', warmupSteps: 0, weightDecay: 0, maxGradNorm: 1,
  seed: 0, shuffle: true, evalFraction: 0, evalEvery: 0, checkpointEvery: 0,
};

const step = (n: number) => ({
  kind: 'step' as const, step: n, totalSteps: 3, epoch: n / 3, loss: 1 / n, gradNorm: 1, learningRate: 2e-4,
  tokensPerSecond: 10, elapsedSeconds: n, etaSeconds: 3 - n,
});

describe('JobStore', () => {
  let sandbox = '';
  afterEach(async () => {
    if (sandbox) await fs.rm(sandbox, { recursive: true, force: true });
  });

  it('keeps history and marks a job that was running as interrupted on reopen', async () => {
    sandbox = await makeSandbox();
    const file = path.join(sandbox, 'jobs.db');
    const store = new JobStore(file);
    store.insert({ jobId: 'a', tenant: 'default', adapterId: 'x', datasetId: 'd', datasetPath: 'datasets/d/data.jsonl', initAdapterId: null, config }, 0, 1000);
    store.markRunning('a', 1001);
    store.append('a', { kind: 'started', totalSteps: 3, trainExamples: 3, evalExamples: 0 }, 1002);
    store.append('a', step(1), 1003);
    store.append('a', { kind: 'checkpoint', step: 1 }, 1004);
    store.append('a', step(2), 1005);
    store.insert({ jobId: 'b', tenant: 'default', adapterId: 'y', datasetId: 'd', datasetPath: 'datasets/d/data.jsonl', initAdapterId: null, config }, 0, 1006);
    store.close(); // a crash: no final event for 'a'

    const reopened = new JobStore(file, () => 2000);
    const job = reopened.get('a');
    expect(job).toMatchObject({ state: 'interrupted', lastCheckpointStep: 1, totalSteps: 3, endTime: 2000, lastSequence: 6 });
    expect(job?.lastStep?.step).toBe(2);
    expect(reopened.eventsOfKind('a', 'step').map((e) => e.data.loss)).toEqual([1, 0.5]);
    expect(reopened.eventsAfter('a', 0, 100).map((e) => e.data.kind)).toEqual([
      'queued', 'started', 'step', 'checkpoint', 'step', 'interrupted',
    ]);
    expect(reopened.get('b')?.state).toBe('queued');
    expect(reopened.append('a', step(3), 2001)).toBeNull();
    expect(reopened.list({ states: [], limit: 10, beforeOrdinal: null }).map((j) => j.jobId)).toEqual(['b', 'a']);
    reopened.close();
  });

  it('marks a job that had published its adapter before the crash as completed (found by the reliability faults suite)', async () => {
    // SIGKILL between the adapter's publish and the completion record left the job interrupted with its
    // adapter stored, and ResumeJob then refused it (ALREADY_EXISTS) for ever.
    sandbox = await makeSandbox();
    const file = path.join(sandbox, 'jobs.db');
    const store = new JobStore(file);
    for (const jobId of ['done', 'cut']) {
      store.insert({ jobId, tenant: 'default', adapterId: `${jobId}-adapter`, datasetId: 'd', datasetPath: 'datasets/d/data.jsonl', initAdapterId: null, config }, 0, 1000);
      store.markRunning(jobId, 1001);
      store.append(jobId, step(1), 1002);
    }
    store.close();
    const metrics = { finalLoss: 0.5, evalLoss: null, steps: 3, tokens: 30, trainSeconds: 2, stoppedEarly: false, bestStep: null, bestEvalLoss: null, forgettingBaseLoss: null, forgettingLoss: null, guardInterventions: 0 };
    const reopened = new JobStore(file, () => 2000, (job) => (job.jobId === 'done' ? { adapterId: job.adapterId, metrics } : null));
    expect(reopened.get('done')?.state).toBe('succeeded');
    expect(reopened.eventsAfter('done', 0, 100).at(-1)?.data).toEqual({ kind: 'completed', adapterId: 'done-adapter', metrics });
    expect(reopened.get('cut')?.state).toBe('interrupted');
    reopened.close();
  });
});
