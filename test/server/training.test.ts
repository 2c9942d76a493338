// Training over gRPC with the engine test double: the event stream, jobs that outlive their
// streams, WatchJob replay + follow, FIFO queueing, cancellation, failure reasons, and a restart
// that keeps every job's history and marks the running one interrupted.

import { status } from '@grpc/grpc-js';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { JobState, TrainingConfig, type JobEvent, type TrainRequest } from '../../src/gen/tuneserve/v1/training.js';
import { EngineDouble } from './engine-double.js';
import { call, collect, eventually, expectError, expectStatus, startHarness, upload, type Harness } from './harness.js';

const rows = (n: number): string => Array.from({ length: n }, (_, i) => JSON.stringify({ prompt: `q${i}`, completion: `a${i}` })).join('\n');

const trainRequest = (fields: Partial<TrainRequest>): TrainRequest => ({
  jobId: '',
  adapterId: 'bot',
  initAdapterId: '',
  detach: false,
  ...fields,
});

const kinds = (events: JobEvent[]): string[] =>
  events.map((e) => Object.keys(e).find((k) => !['jobId', 'sequence', 'time'].includes(k) && e[k as keyof JobEvent] !== undefined) ?? '?');

describe('training', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  it('streams queued, the dataset report, started, every step, evals, checkpoints and completed; the adapter appears', async () => {
    harness = await startHarness();
    const { clients } = harness;
    await upload(clients, 'qa', rows(16));
    const { messages, error } = await collect(
      clients.training.train(
        trainRequest({ jobId: 'job-1', datasetId: 'qa', config: TrainingConfig.fromPartial({ maxSteps: 4, evalFraction: 0.25, evalEvery: 2, checkpointEvery: 2 }) }),
      ),
    );
    expect(error).toBeNull();
    const events = messages.map((m) => m.event as JobEvent);
    expect(kinds(events)).toEqual(['queued', 'datasetReport', 'started', 'step', 'step', 'evaluation', 'checkpoint', 'step', 'step', 'evaluation', 'checkpoint', 'completed']);
    expect(events.map((e) => e.sequence)).toEqual(events.map((_, i) => i + 1));
    // The double counts one token per byte plus BOS: rows are {"prompt":"qN","completion":"aN"}.
    const lengths = rows(16).split('\n').map((line) => line.length + 1);
    expect(events[1]?.datasetReport).toEqual({
      rows: 16,
      rowsByFormat: { text: 0, promptCompletion: 16, messages: 0, alpaca: 0, sharegpt: 0, tokenIds: 0 },
      tokens: lengths.reduce((a, b) => a + b, 0),
      scoredTokens: lengths.reduce((a, b) => a + b - 1, 0),
      maxSeqLen: 2048,
      truncatedRows: 0,
      truncatedTokens: 0,
      longestRowTokens: 36,
      longestRowLine: 11,
      minScoredFraction: 1,
      minScoredFractionLine: 1,
      meanScoredFraction: 1,
      blankLines: 0,
      // The double does not pack (packing is the real engine's; test/packing.test.ts).
      packingEnabled: false,
      packingReason: '',
      trainingSequences: 0,
      sequenceFill: 0,
    });
    expect(events[2]?.started).toEqual({ totalSteps: 4, trainExamples: 12, evalExamples: 4 });
    expect(events.at(-1)?.completed?.adapterId).toBe('bot');

    const { adapter } = await call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'bot' });
    expect(adapter).toMatchObject({ adapterId: 'bot', jobId: 'job-1', matchesBase: true, loaded: false });
    expect(adapter?.metrics?.steps).toBe(4);
    expect(adapter?.config?.rank).toBe(16);

    const { job, steps, evaluations } = await call(clients.training.getJob, clients.training, { jobId: 'job-1', includeHistory: true });
    expect(job?.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(job?.config).toMatchObject({ rank: 16, alpha: 32, learningRate: 2e-4, batchSize: 4, gradAccum: 4, shuffle: true, maxGradNorm: 1 });
    expect(steps.map((s) => s.step)).toEqual([1, 2, 3, 4]);
    expect(evaluations.map((e) => e.step)).toEqual([2, 4]);
    // Every path the engine was given lies under the data root.
    const root = await fs.realpath(harness.dataRoot);
    for (const seen of harness.engine.records.paths) expect(seen.startsWith(`${root}${path.sep}`), seen).toBe(true);
  });

  it('keeps a job running when its client disconnects, and WatchJob replays then follows it', async () => {
    harness = await startHarness({ engine: new EngineDouble({ trainStepMs: 25 }) });
    const { clients } = harness;
    await upload(clients, 'qa', rows(4));
    const stream = clients.training.train(trainRequest({ jobId: 'long', datasetId: 'qa', config: TrainingConfig.fromPartial({ maxSteps: 20 }) }));
    const seen: JobEvent[] = [];
    await new Promise<void>((resolve) => {
      stream.on('data', (message: { event: JobEvent }) => {
        seen.push(message.event);
        if (seen.length === 3) resolve();
      });
      stream.on('error', () => {});
    });
    stream.cancel();

    const { job } = await call(clients.training.getJob, clients.training, { jobId: 'long', includeHistory: false });
    expect(job?.state).toBe(JobState.JOB_STATE_RUNNING);

    // Re-attach from the middle: no gaps, no duplicates, ends with the completion.
    const after = seen.at(-1)?.sequence ?? 0;
    const watched = await collect(clients.training.watchJob({ jobId: 'long', afterSequence: after }));
    expect(watched.error).toBeNull();
    const sequences = watched.messages.map((m) => m.event?.sequence);
    expect(sequences[0]).toBe(after + 1);
    expect(sequences).toEqual(sequences.map((_, i) => after + 1 + i));
    expect(watched.messages.at(-1)?.event?.completed?.adapterId).toBe('bot');

    // A full replay of a finished job returns the same events.
    const replay = await collect(clients.training.watchJob({ jobId: 'long', afterSequence: 0 }));
    expect(replay.messages.length).toBe(after + watched.messages.length);
    expect(kinds(replay.messages.map((m) => m.event as JobEvent)).filter((k) => k === 'step')).toHaveLength(20);
  });

  it('runs jobs one at a time in order, detached submissions included', async () => {
    harness = await startHarness({ engine: new EngineDouble({ trainStepMs: 5 }) });
    const { clients } = harness;
    await upload(clients, 'qa', rows(4));
    const first = await collect(clients.training.train(trainRequest({ jobId: 'first', adapterId: 'a1', datasetId: 'qa', detach: true, config: TrainingConfig.fromPartial({ maxSteps: 5 }) })));
    const second = await collect(clients.training.train(trainRequest({ jobId: 'second', adapterId: 'a2', datasetId: 'qa', detach: true, config: TrainingConfig.fromPartial({ maxSteps: 2 }) })));
    expect(first.messages.map((m) => m.event?.queued?.queuePosition)).toEqual([0]);
    expect(second.messages.map((m) => m.event?.queued?.queuePosition)).toEqual([0]);
    await collect(clients.training.watchJob({ jobId: 'second', afterSequence: 0 }));
    const [a, b] = await Promise.all(
      ['first', 'second'].map((jobId) => call(clients.training.getJob, clients.training, { jobId, includeHistory: false })),
    );
    expect(a?.job?.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(b?.job?.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    // FIFO: the second started only after the first ended.
    expect((b?.job?.startTime?.getTime() ?? 0) >= (a?.job?.endTime?.getTime() ?? Infinity)).toBe(true);

    const listed = await call(clients.training.listJobs, clients.training, { pageSize: 1, pageToken: '', states: [] });
    expect(listed.jobs.map((j) => j.jobId)).toEqual(['second']);
    const next = await call(clients.training.listJobs, clients.training, { pageSize: 1, pageToken: listed.nextPageToken, states: [] });
    expect(next.jobs.map((j) => j.jobId)).toEqual(['first']);
    expect(next.nextPageToken).toBe('');
  });

  it('cancels queued and running jobs; a running job stops between steps and leaves no adapter', async () => {
    harness = await startHarness({ engine: new EngineDouble({ trainStepMs: 20 }) });
    const { clients } = harness;
    await upload(clients, 'qa', rows(4));
    const running = collect(clients.training.train(trainRequest({ jobId: 'run', adapterId: 'r', datasetId: 'qa', config: TrainingConfig.fromPartial({ maxSteps: 1000 }) })));
    await eventually(async () => {
      const job = await call(clients.training.getJob, clients.training, { jobId: 'run', includeHistory: false }).catch(() => null);
      return job?.job?.state === JobState.JOB_STATE_RUNNING;
    });
    await collect(clients.training.train(trainRequest({ jobId: 'wait', adapterId: 'w', datasetId: 'qa', detach: true })));
    const cancelledQueued = await call(clients.training.cancelJob, clients.training, { jobId: 'wait' });
    expect(cancelledQueued.job?.state).toBe(JobState.JOB_STATE_CANCELLED);

    await eventually(async () => (await call(clients.training.getJob, clients.training, { jobId: 'run', includeHistory: false })).job?.lastStep);
    await call(clients.training.cancelJob, clients.training, { jobId: 'run' });
    const { messages, error } = await running;
    expect(error).toBeNull();
    const last = messages.at(-1)?.event;
    expect(last?.cancelled?.stepsCompleted).toBeGreaterThan(0);
    expect(last?.cancelled?.stepsCompleted).toBeLessThan(1000);
    await expectStatus(call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'r' }), status.NOT_FOUND, { reason: 'ADAPTER_NOT_FOUND' });
    // The id is free again.
    await collect(clients.training.train(trainRequest({ jobId: 'again', adapterId: 'r', datasetId: 'qa', config: TrainingConfig.fromPartial({ maxSteps: 1 }) })));
  });

  it('reports an engine failure with its reason and no server paths', async () => {
    harness = await startHarness();
    const { clients } = harness;
    const inline = Buffer.from('{"text":"ok"}\n{"text":"FAIL"}\n');
    const { messages } = await collect(clients.training.train(trainRequest({ jobId: 'bad', inlineJsonl: inline })));
    const failed = messages.at(-1)?.event?.failed;
    expect(failed?.reason).toBe('INVALID_DATASET');
    expect(failed?.message).toContain('<data-root>/jobs/bad/inline.jsonl:2');
    expect(failed?.message).not.toContain(harness.dataRoot);
    const { job } = await call(clients.training.getJob, clients.training, { jobId: 'bad', includeHistory: false });
    expect(job).toMatchObject({ state: JobState.JOB_STATE_FAILED, failureReason: 'INVALID_DATASET' });
  });

  it('continues an adapter with its LoRA shape and refuses a conflicting rank', async () => {
    harness = await startHarness();
    const { clients } = harness;
    await upload(clients, 'qa', rows(4));
    await collect(clients.training.train(trainRequest({ adapterId: 'base-run', datasetId: 'qa', config: TrainingConfig.fromPartial({ rank: 4, maxSteps: 1 }) })));
    const continued = await collect(
      clients.training.train(trainRequest({ adapterId: 'more', datasetId: 'qa', initAdapterId: 'base-run', config: TrainingConfig.fromPartial({ maxSteps: 1 }) })),
    );
    expect(continued.messages.at(-1)?.event?.completed).toBeDefined();
    expect(harness.engine.records.trainSpecs[1]).toMatchObject({ rank: 4, alpha: 8 });
    expect(harness.engine.records.trainSpecs[1]?.initAdapterDir).toMatch(/adapters\/base-run$/);
    const conflict = await collect(
      clients.training.train(trainRequest({ adapterId: 'other', datasetId: 'qa', initAdapterId: 'base-run', config: TrainingConfig.fromPartial({ rank: 8 }) })),
    );
    expectError(conflict.error, status.INVALID_ARGUMENT, { field: 'config.rank' });
  });
});

describe('restart', () => {
  it('keeps every job and its loss curve, marks the running job interrupted and re-queues waiting ones', async () => {
    const first = await startHarness({ engine: new EngineDouble({ trainStepMs: 20 }) });
    const { clients, sandbox } = first;
    try {
      await upload(clients, 'qa', rows(4));
      await collect(clients.training.train(trainRequest({ jobId: 'done', adapterId: 'd', datasetId: 'qa', config: TrainingConfig.fromPartial({ maxSteps: 3 }) })));
      await collect(clients.training.train(trainRequest({ jobId: 'busy', adapterId: 'b', datasetId: 'qa', detach: true, config: TrainingConfig.fromPartial({ maxSteps: 10_000, checkpointEvery: 2 }) })));
      await collect(clients.training.train(trainRequest({ jobId: 'later', adapterId: 'l', datasetId: 'qa', detach: true, config: TrainingConfig.fromPartial({ maxSteps: 2 }) })));
      await eventually(async () => {
        const { job } = await call(clients.training.getJob, clients.training, { jobId: 'busy', includeHistory: false });
        return (job?.lastCheckpointStep ?? 0) >= 2;
      });
      await first.stop();

      const second = await startHarness({ sandbox, engine: new EngineDouble() });
      try {
        const c = second.clients;
        const done = await call(c.training.getJob, c.training, { jobId: 'done', includeHistory: true });
        expect(done.job?.state).toBe(JobState.JOB_STATE_SUCCEEDED);
        expect(done.steps.map((s) => s.loss)).toEqual([1, 2 / 3, 0.5]);

        const busy = await call(c.training.getJob, c.training, { jobId: 'busy', includeHistory: true });
        expect(busy.job?.state).toBe(JobState.JOB_STATE_INTERRUPTED);
        expect(busy.job?.lastCheckpointStep).toBeGreaterThanOrEqual(2);
        expect(busy.steps.length).toBeGreaterThanOrEqual(2);
        const replay = await collect(c.training.watchJob({ jobId: 'busy', afterSequence: 0 }));
        expect(replay.messages.at(-1)?.event?.interrupted?.lastCheckpointStep).toBe(busy.job?.lastCheckpointStep);

        // The job that was waiting runs after the restart.
        const later = await collect(c.training.watchJob({ jobId: 'later', afterSequence: 0 }));
        expect(later.messages.at(-1)?.event?.completed?.adapterId).toBe('l');
        const { adapters } = await call(c.adapters.listAdapters, c.adapters, { pageSize: 0, pageToken: '', loadedOnly: false });
        expect(adapters.map((a) => a.adapterId)).toEqual(['d', 'l']);

        // ResumeJob continues the interrupted job from its last checkpoint: a resumed event, then the
        // steps after it; its history keeps the first run's events.
        const from = busy.job!.lastCheckpointStep;
        const resumed = await call(c.training.resumeJob, c.training, { jobId: 'busy' });
        expect([JobState.JOB_STATE_QUEUED, JobState.JOB_STATE_RUNNING]).toContain(resumed.job?.state);  // the queue is empty: it may start at once
        await eventually(async () => {
          const { job } = await call(c.training.getJob, c.training, { jobId: 'busy', includeHistory: false });
          return (job?.lastStep?.step ?? 0) >= from + 2;
        });
        await call(c.training.cancelJob, c.training, { jobId: 'busy' });
        const history = (await collect(c.training.watchJob({ jobId: 'busy', afterSequence: 0 }))).messages.map((m) => m.event!);
        const resumedAt = history.findIndex((e) => e.resumed !== undefined);
        expect(history[resumedAt - 1]?.interrupted).toBeDefined();
        expect(history[resumedAt]?.resumed?.checkpointStep).toBe(from);
        expect(history.slice(resumedAt).find((e) => e.step !== undefined)?.step?.step).toBe(from + 1);
        expect(history.at(-1)?.cancelled).toBeDefined();
        // Cancelled with a checkpoint of its last step: resumable again; a succeeded job is not.
        const again = await call(c.training.getJob, c.training, { jobId: 'busy', includeHistory: false });
        expect(again.job?.lastCheckpointStep).toBeGreaterThan(from);
        await expectStatus(call(c.training.resumeJob, c.training, { jobId: 'done' }), status.FAILED_PRECONDITION, { reason: 'JOB_NOT_RESUMABLE' });
      } finally {
        await second.dispose();
      }
    } finally {
      await first.dispose();
    }
  });
});
