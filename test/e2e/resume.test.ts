// Issue 9, "must show": a training job killed with SIGKILL mid-run and resumed after a server restart
// ends with the same adapter bytes as an uninterrupted run. Real `tuneserve serve` processes on
// 127.0.0.1 over one data root: the first trains a reference job to the end, then starts the same job
// under another id and is killed (SIGKILL: no drain, no checkpoint at the stop) after its second
// periodic checkpoint; the second process finds the job interrupted, ResumeJob continues it from its
// newest checkpoint, and the two adapters are compared byte for byte (same code, data, seed and thread
// count on the CPU backend give identical floats).

import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { createClients, type TuneClients } from '../../src/client/index.js';
import { makeModel } from '../../src/engine/make-model.js';
import { JobState, TrainingConfig } from '../../src/gen/tuneserve/v1/training.js';
import { startServe, type ServeProcess } from '../helpers/serve-process.js';
import { call, collect, eventually, upload } from '../server/harness.js';

interface Served {
  process: ServeProcess;
  clients: TuneClients;
}

/** Starts `tuneserve serve` (plaintext, on a free port) over a model and a data root. */
async function serve(model: string, dataRoot: string): Promise<Served> {
  const process = await startServe(['--model', model, '--data-root', dataRoot, '--host', '127.0.0.1', '--plaintext', '--device', 'cpu', '--threads', '2'], {});
  return { process, clients: createClients(`127.0.0.1:${process.port}`, { plaintext: true }) };
}

async function stop(served: Served, signal: NodeJS.Signals): Promise<void> {
  served.clients.close();
  if (served.process.child.exitCode !== null) return;
  served.process.child.kill(signal);
  await served.process.exited;
}

describe('resume after SIGKILL (real serve processes)', () => {
  let dir: string;
  const running: Served[] = [];
  // 12 steps, a checkpoint every 3: killed after checkpoint 6, resumed from it (steps 7-12 redone
  // from the checkpoint, whatever step the process reached before dying).
  const config = TrainingConfig.fromPartial({
    rank: 4, alpha: 8, dropout: 0.1, targetModules: ['all-linear'], learningRate: 5e-3, maxSteps: 12, batchSize: 2,
    gradAccum: 2, seed: 3, checkpointEvery: 3,
  });
  const rows = Array.from({ length: 10 }, (_, i) => JSON.stringify({ prompt: `Q: what is item ${i}?`, completion: ` A: item ${i} is the ${i % 3 === 0 ? 'red' : 'blue'} one.` })).join('\n');

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-resume-'));
    await makeModel({ preset: 'tiny', outDir: join(dir, 'model'), seed: 8 });
  }, 120_000);
  afterAll(async () => {
    for (const s of running) await stop(s, 'SIGKILL');
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('ends with the same adapter bytes as the uninterrupted job', async () => {
    const first = await serve(join(dir, 'model'), join(dir, 'data'));
    running.push(first);
    const c1 = first.clients;
    await upload(c1, 'qa', `${rows}\n`);
    const reference = await collect(c1.training.train({ jobId: 'reference', adapterId: 'ref', datasetId: 'qa', initAdapterId: '', detach: false, config }));
    expect(reference.error).toBeNull();
    expect(reference.messages.at(-1)?.event?.completed?.adapterId).toBe('ref');

    await collect(c1.training.train({ jobId: 'killed', adapterId: 'resumed', datasetId: 'qa', initAdapterId: '', detach: true, config }));
    await eventually(async () => {
      const { job } = await call(c1.training.getJob, c1.training, { jobId: 'killed', includeHistory: false });
      return (job?.lastCheckpointStep ?? 0) >= 6;
    }, 120_000);
    await stop(first, 'SIGKILL');

    const second = await serve(join(dir, 'model'), join(dir, 'data'));
    running.push(second);
    const c2 = second.clients;
    const { job: interrupted } = await call(c2.training.getJob, c2.training, { jobId: 'killed', includeHistory: false });
    expect(interrupted?.state).toBe(JobState.JOB_STATE_INTERRUPTED);
    const from = interrupted!.lastCheckpointStep;
    expect(from).toBeGreaterThanOrEqual(6);
    await call(c2.training.resumeJob, c2.training, { jobId: 'killed' });
    const history = await collect(c2.training.watchJob({ jobId: 'killed', afterSequence: 0 }));
    const events = history.messages.map((m) => m.event!);
    expect(events.at(-1)?.completed?.adapterId).toBe('resumed');
    const resumedAt = events.findIndex((e) => e.resumed !== undefined);
    expect(events[resumedAt]?.resumed?.checkpointStep).toBe(from);
    expect(events.slice(resumedAt).filter((e) => e.step).map((e) => e.step!.step)).toEqual(
      Array.from({ length: 12 - from }, (_, i) => from + 1 + i),
    );

    const bytes = (id: string) => readFile(join(dir, 'data', 'adapters', id, 'adapter_model.safetensors'));
    const [want, got] = await Promise.all([bytes('ref'), bytes('resumed')]);
    expect(got.length).toBe(want.length);
    expect(got.equals(want)).toBe(true);
    await stop(second, 'SIGTERM');
  }, 600_000);

  it('checkpoints at SIGTERM: the interrupted job resumes from the step it stopped at to the same bytes', async () => {
    const first = await serve(join(dir, 'model'), join(dir, 'data'));
    running.push(first);
    const c1 = first.clients;
    // No periodic checkpoints: the only one is written when the shutdown stops the run.
    const noPeriodic = { ...config, checkpointEvery: 0 };
    await collect(c1.training.train({ jobId: 'stopped', adapterId: 'after-term', datasetId: 'qa', initAdapterId: '', detach: true, config: noPeriodic }));
    await eventually(async () => {
      const { job } = await call(c1.training.getJob, c1.training, { jobId: 'stopped', includeHistory: false });
      return (job?.lastStep?.step ?? 0) >= 2;
    }, 120_000);
    await stop(first, 'SIGTERM');
    expect(await first.process.exited).toBe(0);

    const second = await serve(join(dir, 'model'), join(dir, 'data'));
    running.push(second);
    const c2 = second.clients;
    const { job, steps } = await call(c2.training.getJob, c2.training, { jobId: 'stopped', includeHistory: true });
    expect(job?.state).toBe(JobState.JOB_STATE_INTERRUPTED);
    // The history is intact: every step up to the stop, in order.
    const stoppedAt = steps.length;
    expect(steps.map((s) => s.step)).toEqual(Array.from({ length: stoppedAt }, (_, i) => i + 1));
    expect(job!.lastCheckpointStep).toBe(stoppedAt);
    expect(stoppedAt).toBeLessThan(12);
    await call(c2.training.resumeJob, c2.training, { jobId: 'stopped' });
    const history = await collect(c2.training.watchJob({ jobId: 'stopped', afterSequence: 0 }));
    expect(history.messages.at(-1)?.event?.completed?.adapterId).toBe('after-term');
    const bytes = (id: string) => readFile(join(dir, 'data', 'adapters', id, 'adapter_model.safetensors'));
    expect((await bytes('after-term')).equals(await bytes('ref'))).toBe(true);
    await stop(second, 'SIGTERM');
  }, 600_000);
});
