// Following a job's event stream (Train or WatchJob): a progress bar with the loss readout, or one
// JSON object per event, and the exit status a job's ending gives the command.

import { EngineError } from '../../engine/errors.js';
import { JobEvent, type TrainResponse, type TrainingStep } from '../../gen/tuneserve/v1/training.js';
import { ProgressBar } from '../progress.js';
import { type CommandIo } from './calls.js';
import { formatSeconds, datasetReportLine, stepLabel } from './render.js';

/** How a job stream ended. */
export interface JobOutcome {
  jobId: string;
  /** The last event (completed, failed, cancelled or interrupted), or null when the stream ended before one. */
  last: JobEvent | null;
  /** Every step seen, in order. */
  steps: TrainingStep[];
}

/**
 * Follows a stream of job events (Train or WatchJob): a progress bar with the loss readout on
 * stderr and one line per notable event, or one JSON object per event on stdout with --json.
 */
export async function followJob(
  stream: AsyncIterable<TrainResponse>,
  io: CommandIo,
  options: { json?: boolean; onEvent?: (event: JobEvent) => void } = {},
): Promise<JobOutcome> {
  const bar = options.json ? null : new ProgressBar(io.stderr as NodeJS.WriteStream);
  const outcome: JobOutcome = { jobId: '', last: null, steps: [] };
  const note = (line: string): void => {
    bar?.done();
    io.stderr.write(`${line}\n`);
  };
  try {
    for await (const { event } of stream) {
      if (!event) continue;
      outcome.jobId = event.jobId;
      options.onEvent?.(event);
      if (options.json) io.stdout.write(`${JSON.stringify(JobEvent.toJSON(event))}\n`);
      if (event.step) outcome.steps.push(event.step);
      if (event.completed || event.failed || event.cancelled || event.interrupted) outcome.last = event;
      if (options.json) continue;
      if (event.queued) note(`job ${event.jobId} queued${event.queued.queuePosition > 0 ? ` behind ${event.queued.queuePosition} job(s)` : ''}`);
      else if (event.datasetReport) note(datasetReportLine(event.datasetReport));
      else if (event.started) note(`job ${event.jobId} started: ${event.started.totalSteps} steps over ${event.started.trainExamples} examples${event.started.evalExamples ? ` (${event.started.evalExamples} held out)` : ''}`);
      else if (event.step) bar?.update(event.step.step, event.step.totalSteps, stepLabel(event.step));
      else if (event.evaluation) note(`eval after step ${event.evaluation.step}: loss ${event.evaluation.loss.toFixed(4)}`);
      else if (event.checkpoint) note(`checkpoint saved at step ${event.checkpoint.step}`);
    }
  } finally {
    bar?.done();
  }
  return outcome;
}

/** Prints how a job ended; throws (non-zero exit) unless it completed or the stream left it running. */
export function reportJobOutcome(outcome: JobOutcome, io: CommandIo, json: boolean): void {
  throwUnlessCompleted(outcome);
  const completed = outcome.last?.completed;
  if (!completed || json) return;
  const m = completed.metrics;
  const first = outcome.steps[0];
  io.stdout.write(`adapter "${completed.adapterId}" trained by job ${outcome.jobId}: ${m?.steps ?? 0} steps, ` +
    `${first ? `loss ${first.loss.toFixed(4)} → ` : 'final loss '}${(m?.finalLoss ?? 0).toFixed(4)}` +
    `${m?.evalLoss !== undefined ? `, eval loss ${m.evalLoss.toFixed(4)}` : ''}, ${m?.tokens ?? 0} tokens, ${formatSeconds(m?.trainSeconds ?? 0)}\n`);
}

/**
 * Throws the CLI error for a job that failed, was cancelled or was interrupted. A stream without a
 * last event (a detached Train, or one that closed early) left the job running: no error.
 */
export function throwUnlessCompleted(outcome: JobOutcome): void {
  const last = outcome.last;
  if (!last || last.completed) return;
  if (last.failed) throw new EngineError('JOB_FAILED', `job ${last.jobId} failed: ${last.failed.reason}: ${last.failed.message.replace(/\s+/g, ' ')}`);
  if (last.cancelled) throw new EngineError('CANCELLED', `job ${last.jobId} was cancelled after ${last.cancelled.stepsCompleted} steps`);
  if (last.interrupted) {
    throw new EngineError('INTERRUPTED', `job ${last.jobId} was interrupted at step ${last.interrupted.lastStep} (last checkpoint: step ${last.interrupted.lastCheckpointStep})`);
  }
}
