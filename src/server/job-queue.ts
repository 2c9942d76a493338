// The training queue: jobs run one at a time in submission order, each event is stored before
// anyone sees it, and jobs belong to the server rather than to the stream that started them.
// Watchers read the store from a sequence number onward and then wait for new events, so a
// replay and the live tail join without gaps or duplicates, and a slow watcher leaves its
// backlog in SQLite rather than in memory.
//
// Telemetry: every step is recorded as training metrics per job and adapter, and a job has two
// spans under the span of the Train call that submitted it: training.queued (submitted → started)
// and training.run (started → ended).

import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import type { AdapterRegistry } from './adapter-registry.js';
import { writeFileAtomic } from '../engine/atomic-file.js';
import { DataRoot } from './data-root.js';
import type { DatasetStore } from './datasets.js';
import type { EnginePort, TrainEvent } from './engine-port.js';
import {
  alreadyExists,
  failedPrecondition,
  isEngineError,
  notFound,
  isStorageFull,
  resourceExhausted,
  STORAGE_FULL,
  unavailable,
} from './errors.js';
import {
  terminalStates,
  type Hyperparameters,
  type JobEventData,
  type JobEventRecord,
  type JobRecord,
  type JobStore,
} from './job-store.js';
import type { Logger } from './logger.js';
import type { Telemetry } from './telemetry.js';
import { context as otelContext, SpanStatusCode, type Context, type Span } from '@opentelemetry/api';

/** A job to queue; ids and hyperparameters already validated. */
export interface JobSubmission {
  jobId: string;
  /** The tenant of the key that submitted it (it owns the job and the adapter it makes). */
  tenant: string;
  /** The submitting call's trace context: the job's spans hang under it. */
  trace?: Context;
  adapterId: string;
  /** An uploaded dataset, or rows carried in the request. */
  dataset: { datasetId: string } | { inlineJsonl: Uint8Array };
  initAdapterId: string | null;
  config: Hyperparameters;
  /** Publish the next version of adapterId when it exists (TrainRequest.new_version). */
  newVersion?: boolean;
}

/** What the queue needs around it. */
export interface JobQueueDependencies {
  store: JobStore;
  dataRoot: DataRoot;
  datasets: DatasetStore;
  adapters: AdapterRegistry;
  logger: Logger;
  maxQueuedJobs: number;
  now?: () => number;
  /** Training metrics and the job spans; absent in tests that do not look. */
  telemetry?: Telemetry;
}

interface RunningJob {
  jobId: string;
  span: Span | null;
  controller: AbortController;
  /** Why the run is being stopped, if it is. */
  stop: 'cancel' | 'shutdown' | null;
  done: Promise<void>;
}

const INLINE_DATASET_FILE = 'inline.jsonl';
/** Checkpoints kept per job (the newest ones): enough to survive one being written when the process dies. */
const KEEP_CHECKPOINTS = 2;
const EVENTS_PER_READ = 256;

/** The one-at-a-time training queue. */
export class JobQueue {
  private readonly pending: string[] = [];
  private running: RunningJob | null = null;
  private readonly waiters = new Map<string, Set<() => void>>();
  private readonly submitting = new Set<string>();
  private engine: EnginePort | null = null;
  /** Spans of queued jobs submitted since this server started (training.queued). */
  private readonly queuedSpans = new Map<string, { span: Span; parent: Context }>();
  private accepting = true;
  private readonly now: () => number;

  constructor(private readonly deps: JobQueueDependencies) {
    this.now = deps.now ?? Date.now;
  }

  /** Starts running jobs on the engine, first those left queued when the server last stopped. */
  start(engine: EnginePort): void {
    this.engine = engine;
    for (const job of this.deps.store.inState('queued')) {
      if (!job.newVersion) this.deps.adapters.reserveUnchecked(job.adapterId);
      this.pending.push(job.jobId);
    }
    if (this.pending.length > 0) this.deps.logger.info({ jobs: this.pending.length }, 're-queued jobs');
    this.pump();
  }

  /** Jobs waiting. */
  get queuedCount(): number {
    return this.pending.length;
  }

  /** Jobs running (0 or 1). */
  get runningCount(): number {
    return this.running === null ? 0 : 1;
  }

  /** Jobs ahead of a queued job, or 0 when it is not queued. */
  queuePosition(jobId: string): number {
    return Math.max(0, this.pending.indexOf(jobId));
  }

  /**
   * Queues a job. RESOURCE_EXHAUSTED when the queue is full, ALREADY_EXISTS for a taken job or
   * adapter id, NOT_FOUND for a missing dataset or init adapter, UNAVAILABLE while draining.
   */
  async submit(submission: JobSubmission): Promise<JobRecord> {
    const { store, adapters, datasets, dataRoot, maxQueuedJobs } = this.deps;
    if (!this.accepting) throw unavailable('SERVER_DRAINING', 'the server is shutting down');
    if (this.pending.length + this.submitting.size >= maxQueuedJobs) {
      throw resourceExhausted(
        'TRAINING_QUEUE_FULL',
        `the training queue is full (${maxQueuedJobs} jobs waiting)`,
        this.retryHintMs(),
        { max_queued_jobs: String(maxQueuedJobs) },
      );
    }
    const { jobId } = submission;
    if (this.submitting.has(jobId) || store.get(jobId) !== null) throw alreadyExists('job', jobId);
    this.submitting.add(jobId);
    // A new version does not reserve the id: the adapter stays visible and serving while it trains.
    const reserves = submission.newVersion !== true;
    try {
      if (reserves) await adapters.reserve(submission.adapterId);
      try {
        let datasetPath: string;
        let datasetId: string | null = null;
        if ('datasetId' in submission.dataset) {
          datasetId = submission.dataset.datasetId;
          datasetPath = path.relative(dataRoot.root, await datasets.dataFile(datasetId));
        } else {
          datasetPath = path.relative(dataRoot.root, path.join(dataRoot.entry('jobs', jobId), INLINE_DATASET_FILE));
        }
        if (submission.initAdapterId !== null) adapters.checkBase(await adapters.get(submission.initAdapterId));
        const jobFolder = dataRoot.entry('jobs', jobId);
        await fs.mkdir(path.join(jobFolder, 'checkpoints'), { recursive: true });
        if ('inlineJsonl' in submission.dataset) {
          await writeFileAtomic(path.join(jobFolder, INLINE_DATASET_FILE), submission.dataset.inlineJsonl);
        }
        if (!this.accepting) throw unavailable('SERVER_DRAINING', 'the server is shutting down');
        const record = store.insert(
          {
            jobId,
            tenant: submission.tenant,
            adapterId: submission.adapterId,
            datasetId,
            datasetPath,
            initAdapterId: submission.initAdapterId,
            config: submission.config,
            newVersion: submission.newVersion === true,
          },
          this.pending.length,
          this.now(),
        );
        this.pending.push(jobId);
        if (this.deps.telemetry && submission.trace) {
          const span = this.deps.telemetry.tracer.startSpan('training.queued', { attributes: jobAttributes(record) }, submission.trace);
          this.queuedSpans.set(jobId, { span, parent: submission.trace });
        }
        this.deps.logger.info({ jobId, adapterId: submission.adapterId, tenant: submission.tenant, position: this.pending.length - 1 }, 'job queued');
        this.pump();
        return record;
      } catch (error) {
        if (reserves) adapters.unreserve(submission.adapterId);
        throw error;
      }
    } finally {
      this.submitting.delete(jobId);
    }
  }

  /**
   * Cancels a job: a queued one ends at once, a running one stops between optimizer steps.
   * NOT_FOUND, or FAILED_PRECONDITION when it has already ended.
   */
  cancel(jobId: string): JobRecord {
    const job = this.require(jobId);
    if (terminalStates.has(job.state)) {
      throw failedPrecondition('JOB_ALREADY_ENDED', `job ${JSON.stringify(jobId)} has already ended (${job.state})`, {
        job_id: jobId,
        state: job.state,
      });
    }
    const index = this.pending.indexOf(jobId);
    if (index !== -1) {
      this.pending.splice(index, 1);
      this.endQueuedSpan(jobId, 'cancelled');
      this.record(jobId, { kind: 'cancelled', stepsCompleted: 0 });
      if (!job.newVersion) this.deps.adapters.unreserve(job.adapterId);
      this.deps.logger.info({ jobId }, 'job cancelled while queued');
    } else if (this.running?.jobId === jobId) {
      this.running.stop ??= 'cancel';
      this.running.controller.abort('cancel');
      this.deps.logger.info({ jobId }, 'job cancellation requested');
    }
    return this.require(jobId);
  }

  /**
   * Queues an interrupted, cancelled or failed job again, to continue from its last checkpoint.
   * NOT_FOUND; FAILED_PRECONDITION JOB_NOT_RESUMABLE (succeeded, queued, running) or NO_CHECKPOINT;
   * ALREADY_EXISTS when its adapter id was taken meanwhile; RESOURCE_EXHAUSTED when the queue is full.
   */
  async resume(jobId: string): Promise<JobRecord> {
    const { store, adapters, maxQueuedJobs } = this.deps;
    if (!this.accepting) throw unavailable('SERVER_DRAINING', 'the server is shutting down');
    const job = this.require(jobId);
    if (!['interrupted', 'cancelled', 'failed'].includes(job.state)) {
      throw failedPrecondition('JOB_NOT_RESUMABLE', `job ${JSON.stringify(jobId)} is ${job.state}; only an interrupted, cancelled or failed job can be resumed`, {
        job_id: jobId, state: job.state,
      });
    }
    const checkpoint = await this.latestCheckpoint(jobId);
    if (checkpoint === null) {
      throw failedPrecondition('NO_CHECKPOINT', `job ${JSON.stringify(jobId)} has no checkpoint to continue from (it stopped before its first step, or checkpoint_every was 0 and it was killed)`, {
        job_id: jobId,
      });
    }
    if (this.pending.length + this.submitting.size >= maxQueuedJobs) {
      throw resourceExhausted('TRAINING_QUEUE_FULL', `the training queue is full (${maxQueuedJobs} jobs waiting)`, this.retryHintMs(), {
        max_queued_jobs: String(maxQueuedJobs),
      });
    }
    if (!job.newVersion) await adapters.reserve(job.adapterId);
    const event = store.resume(jobId, checkpoint.step, this.now());
    if (event === null) {
      if (!job.newVersion) adapters.unreserve(job.adapterId);
      throw failedPrecondition('JOB_NOT_RESUMABLE', `job ${JSON.stringify(jobId)} changed state meanwhile`, { job_id: jobId });
    }
    this.wake(jobId);
    this.pending.push(jobId);
    this.deps.logger.info({ jobId, checkpointStep: checkpoint.step }, 'job resumed');
    this.pump();
    return this.require(jobId);
  }

  /** The job's newest complete checkpoint folder, or null. */
  private async latestCheckpoint(jobId: string): Promise<{ dir: string; step: number } | null> {
    const folder = path.join(this.deps.dataRoot.entry('jobs', jobId), 'checkpoints');
    const names = await fs.readdir(folder).catch(() => [] as string[]);
    const steps = names.map((n) => /^checkpoint-(\d+)$/.exec(n)).filter((m): m is RegExpExecArray => m !== null).map((m) => Number(m[1]));
    for (const step of steps.sort((a, b) => b - a)) {
      const dir = path.join(folder, `checkpoint-${step}`);
      // A folder is published whole (renamed into place), so trainer_state.json in it means complete.
      if (await fs.stat(path.join(dir, 'trainer_state.json')).then(() => true, () => false)) return { dir, step };
    }
    return null;
  }

  /** Keeps the job's newest `keep` checkpoints and removes the older ones. */
  private async pruneCheckpoints(jobId: string, keep: number): Promise<void> {
    const folder = path.join(this.deps.dataRoot.entry('jobs', jobId), 'checkpoints');
    const names = await fs.readdir(folder).catch(() => [] as string[]);
    const steps = names.map((n) => /^checkpoint-(\d+)$/.exec(n)).filter((m): m is RegExpExecArray => m !== null).map((m) => Number(m[1]));
    for (const step of steps.sort((a, b) => b - a).slice(keep)) {
      await fs.rm(path.join(folder, `checkpoint-${step}`), { recursive: true, force: true });
    }
  }

  /** Whether a queued or running job reads this dataset. */
  datasetInUse(datasetId: string): boolean {
    return this.activeJobs().some((job) => job.datasetId === datasetId);
  }

  /** Why an adapter cannot be deleted now (a live job continues from it), or null. */
  adapterBlocker(adapterId: string): string | null {
    const job = this.activeJobs().find((j) => j.initAdapterId === adapterId);
    return job ? `is the starting point of job ${JSON.stringify(job.jobId)} (${job.state})` : null;
  }

  /**
   * Yields a job's events after `afterSequence`: first the stored history, then new events as
   * they are stored, until the job's last event. Ends early (without error) when the signal fires.
   */
  async *follow(jobId: string, afterSequence: number, signal: AbortSignal): AsyncGenerator<JobEventRecord> {
    let sequence = afterSequence;
    while (!signal.aborted) {
      const events = this.deps.store.eventsAfter(jobId, sequence, EVENTS_PER_READ);
      for (const event of events) {
        yield event;
        sequence = event.sequence;
        // A final event ends the stream, unless the job was resumed after it (more events follow).
        if (isFinal(event.data) && this.require(jobId).lastSequence <= sequence) return;
      }
      if (events.length === EVENTS_PER_READ) continue;
      const job = this.require(jobId);
      // Events stored while the last batch was being yielded are read before waiting: their wake-up
      // has already happened.
      if (job.lastSequence > sequence) continue;
      if (terminalStates.has(job.state)) return;
      await this.changed(jobId, signal);
    }
  }

  /**
   * Stops taking jobs and stops the running one; it is recorded as interrupted (resumable from
   * its checkpoints). Queued jobs stay queued in the store and run after the next start.
   */
  async shutdown(): Promise<void> {
    this.accepting = false;
    for (const jobId of this.pending) this.endQueuedSpan(jobId, 'server shutting down');
    this.pending.length = 0;
    const running = this.running;
    if (running) {
      running.stop = 'shutdown';
      running.controller.abort('shutdown');
      await running.done;
    }
  }

  /** Queued and running jobs (a stopped run that is still cleaning up no longer counts). */
  private activeJobs(): JobRecord[] {
    const ids = [...this.pending, ...(this.running ? [this.running.jobId] : [])];
    return ids
      .map((id) => this.deps.store.get(id))
      .filter((job): job is JobRecord => job !== null && !terminalStates.has(job.state));
  }

  private require(jobId: string): JobRecord {
    const job = this.deps.store.get(jobId);
    if (!job) throw notFound('job', jobId);
    return job;
  }

  /** Suggested wait before retrying a refused submission: the running job's remaining time. */
  private retryHintMs(): number {
    const eta = this.running ? this.deps.store.get(this.running.jobId)?.lastStep?.etaSeconds : undefined;
    return Math.min(3_600_000, Math.max(5_000, Math.round((eta ?? 60) * 1000)));
  }

  /** Stores an event and wakes the job's watchers. */
  private record(jobId: string, data: JobEventData): void {
    const stored = this.deps.store.append(jobId, data, this.now());
    if (stored === null) return;
    this.wake(jobId);
  }

  /** Wakes the job's watchers (a new event was stored). */
  private wake(jobId: string): void {
    const waiters = this.waiters.get(jobId);
    if (waiters) {
      this.waiters.delete(jobId);
      for (const wake of waiters) wake();
    }
  }

  /** Resolves at the job's next event, or when the signal fires. */
  private changed(jobId: string, signal: AbortSignal): Promise<void> {
    return new Promise<void>((resolve) => {
      let waiters = this.waiters.get(jobId);
      if (!waiters) {
        waiters = new Set();
        this.waiters.set(jobId, waiters);
      }
      const wake = (): void => {
        signal.removeEventListener('abort', wake);
        this.waiters.get(jobId)?.delete(wake);
        resolve();
      };
      waiters.add(wake);
      signal.addEventListener('abort', wake);
    });
  }

  private pump(): void {
    if (this.running !== null || this.engine === null || !this.accepting) return;
    const jobId = this.pending.shift();
    if (jobId === undefined) return;
    const controller = new AbortController();
    const queued = this.queuedSpans.get(jobId);
    this.endQueuedSpan(jobId, null);
    const job = this.deps.store.get(jobId);
    const span =
      this.deps.telemetry && job
        ? this.deps.telemetry.tracer.startSpan('training.run', { attributes: jobAttributes(job) }, queued?.parent ?? otelContext.active())
        : null;
    const running: RunningJob = { jobId, span, controller, stop: null, done: Promise.resolve() };
    this.running = running;
    running.done = this.run(running, this.engine).finally(() => {
      const ended = this.deps.store.get(jobId);
      if (running.span) {
        running.span.setAttribute('tuneserve.job.state', ended?.state ?? 'unknown');
        running.span.setAttribute('tuneserve.job.steps', ended?.lastStep?.step ?? 0);
        if (ended?.state === 'failed') running.span.setStatus({ code: SpanStatusCode.ERROR, message: ended.failureReason ?? 'failed' });
        running.span.end();
      }
      this.running = null;
      this.pump();
    });
  }

  /** Ends a queued job's training.queued span (why: null when it starts running). */
  private endQueuedSpan(jobId: string, why: string | null): void {
    const queued = this.queuedSpans.get(jobId);
    if (!queued) return;
    this.queuedSpans.delete(jobId);
    if (why !== null) queued.span.setAttribute('tuneserve.job.ended_while_queued', why);
    queued.span.end();
  }

  private async run(running: RunningJob, engine: EnginePort): Promise<void> {
    const { store, dataRoot, adapters, logger } = this.deps;
    const job = this.require(running.jobId);
    const startTime = this.now();
    store.markRunning(job.jobId, startTime);
    logger.info({ jobId: job.jobId }, 'job started');
    let workFolder: string | null = null;
    let lastStep = 0;
    let outcome: 'succeeded' | 'failed' | 'cancelled' | 'interrupted' = 'failed';
    try {
      workFolder = await dataRoot.tempFolder(`job-${job.jobId}`);
      const outDir = path.join(workFolder, 'adapter');
      const jobFolder = dataRoot.entry('jobs', job.jobId);
      // A resumed job (its last event before this run is 'resumed') continues from its newest checkpoint.
      const resumed = job.lastSequence > 1 && store.eventsAfter(job.jobId, job.lastSequence - 1, 1)[0]?.data.kind === 'resumed';
      const resume = resumed ? await this.latestCheckpoint(job.jobId) : null;
      if (resume) lastStep = resume.step;
      const result = await engine.train(
        {
          ...job.config,
          datasetPath: path.join(dataRoot.root, job.datasetPath),
          outDir,
          checkpointDir: path.join(jobFolder, 'checkpoints'),
          initAdapterDir: job.initAdapterId === null ? null : await adapters.verifiedFolder(job.initAdapterId),
        },
        {
          signal: running.controller.signal,
          ...(resume ? { resume } : {}),
          onEvent: (event) => {
            // Everything the engine reports happened, stop requested or not: a step that finished
            // while the stop was on its way is in the checkpoint of the stop, so it is in the history
            // too (a resume continues right after it, with no gap).
            if (event.kind === 'step') {
              lastStep = event.step;
              this.deps.telemetry?.recordTrainingStep({
                jobId: job.jobId,
                adapter: job.adapterId,
                tenant: job.tenant,
                step: event.step,
                loss: event.loss,
                learningRate: event.learningRate,
                tokensPerSecond: event.tokensPerSecond,
                ...(event.deviceShare === undefined ? {} : { deviceShare: event.deviceShare }),
              });
            } else if (event.kind === 'eval') {
              this.deps.telemetry?.recordTrainingEval({
                jobId: job.jobId,
                adapter: job.adapterId,
                tenant: job.tenant,
                loss: event.loss,
                ...(event.forgettingLoss === undefined ? {} : { forgettingLoss: event.forgettingLoss }),
                ...(event.forgettingBaseLoss === undefined ? {} : { forgettingBaseLoss: event.forgettingBaseLoss }),
              });
            } else if (event.kind === 'started') {
              running.span?.setAttribute('tuneserve.job.total_steps', event.totalSteps);
            }
            this.record(job.jobId, fromTrainEvent(event));
            if (event.kind === 'checkpoint') void this.pruneCheckpoints(job.jobId, KEEP_CHECKPOINTS);
          },
        },
      );
      if (running.stop !== null) {
        engine.discardTrainedAdapter(result.trained);
        throw new Error('stopped');
      }
      const metrics = {
        finalLoss: result.finalLoss,
        evalLoss: result.evalLoss,
        steps: result.steps,
        tokens: result.tokens,
        trainSeconds: (this.now() - startTime) / 1000,
        stoppedEarly: result.stoppedEarly,
        bestStep: result.bestStep,
        bestEvalLoss: result.bestEvalLoss,
        forgettingBaseLoss: result.forgettingBaseLoss,
        forgettingLoss: result.forgettingLoss,
        guardInterventions: result.guardInterventions,
      };
      // Train-to-serve: the files were written from the engine's copy (hashed in memory); once they are
      // published, that same copy serves the new version, so no file is read back.
      let published;
      try {
        published = await adapters.publish(outDir, {
          adapterId: job.adapterId,
          source: 'trained',
          jobId: job.jobId,
          createTime: this.now(),
          baseFingerprint: engine.modelInfo().fingerprint,
          config: result.config,
          metrics,
          tenant: job.tenant,
          shared: false,
        }, result.files, { newVersion: job.newVersion });
        if (!job.newVersion) adapters.unreserve(job.adapterId);  // visible before the completed event
        adapters.adoptTrained(published, result.trained);
      } catch (error) {
        engine.discardTrainedAdapter(result.trained);
        throw error;
      }
      this.record(job.jobId, { kind: 'completed', adapterId: job.adapterId, metrics, version: published.version, contentHash: published.contentHash });
      outcome = 'succeeded';
      logger.info({ jobId: job.jobId, adapterId: job.adapterId, finalLoss: result.finalLoss }, 'job succeeded');
    } catch (error) {
      if (running.stop === 'cancel') {
        this.record(job.jobId, { kind: 'cancelled', stepsCompleted: lastStep });
        outcome = 'cancelled';
        logger.info({ jobId: job.jobId, steps: lastStep }, 'job cancelled');
      } else if (running.stop === 'shutdown') {
        const stored = store.get(job.jobId);
        this.record(job.jobId, {
          kind: 'interrupted',
          lastStep,
          lastCheckpointStep: stored?.lastCheckpointStep ?? 0,
        });
        outcome = 'interrupted';
        logger.info({ jobId: job.jobId, steps: lastStep }, 'job interrupted by shutdown');
      } else {
        const { reason, message } = failureOf(error, dataRoot);
        if (reason === 'INTERNAL') logger.error({ jobId: job.jobId, error: String((error as Error)?.stack ?? error) }, 'job failed');
        else logger.warn({ jobId: job.jobId, reason, message }, 'job failed');
        this.record(job.jobId, { kind: 'failed', reason, message });
      }
    } finally {
      if (!job.newVersion) adapters.unreserve(job.adapterId);
      if (workFolder !== null) await fs.rm(workFolder, { recursive: true, force: true });
      // Checkpoints only matter for a run that may be resumed (cancelled, failed and interrupted ones may).
      if (outcome === 'succeeded') {
        await fs.rm(path.join(dataRoot.entry('jobs', job.jobId), 'checkpoints'), { recursive: true, force: true });
      }
    }
  }
}

/** Span attributes of a job. */
function jobAttributes(job: JobRecord): Record<string, string> {
  return { 'tuneserve.job': job.jobId, 'tuneserve.adapter': job.adapterId, 'tuneserve.tenant': job.tenant };
}

/** Whether an event ends its job. */
export function isFinal(data: JobEventData): boolean {
  return data.kind === 'completed' || data.kind === 'failed' || data.kind === 'cancelled' || data.kind === 'interrupted';
}

/** The stored form of an engine progress event. */
function fromTrainEvent(event: TrainEvent): JobEventData {
  switch (event.kind) {
    case 'dataset':
      return { kind: 'dataset', report: event.report };
    case 'started':
      return event;
    case 'step':
      return event;
    case 'eval':
      return {
        kind: 'eval', step: event.step, loss: event.loss,
        ...(event.forgettingLoss === undefined ? {} : { forgettingLoss: event.forgettingLoss, forgettingBaseLoss: event.forgettingBaseLoss! }),
      };
    case 'checkpoint':
      return { kind: 'checkpoint', step: event.step };
    case 'guard':
      return event;
    case 'warning':
      return event;
  }
}

/** The reason and message a failed job records: engine codes as they are, the rest INTERNAL. */
function failureOf(error: unknown, dataRoot: DataRoot): { reason: string; message: string } {
  if (isStorageFull(error)) return { ...STORAGE_FULL };
  if (isEngineError(error)) {
    if (error.code === 'IO_ERROR') return { reason: 'IO_ERROR', message: 'the server failed to read or write a file' };
    return { reason: error.code, message: dataRoot.redact(error.message) };
  }
  if (error instanceof Error && 'reason' in error && typeof error.reason === 'string') {
    return { reason: error.reason, message: error.message };
  }
  return { reason: 'INTERNAL', message: 'internal error' };
}
