// Conversions from the server's stored records to the generated tuneserve.v1 messages. Handlers
// speak records internally and messages on the wire; this file is the only place they meet.

import { tenantOf } from './auth.js';
import { AdapterSource, AdapterTier, type Adapter } from '../gen/tuneserve/v1/adapters.js';
import type { AdapterServingStats as AdapterServingStatsMessage, TrainingMetrics } from '../gen/tuneserve/v1/common.js';
import type { Dataset } from '../gen/tuneserve/v1/datasets.js';
import {
  GuardPolicy,
  JobState,
  LrScheduler,
  type DatasetReport as DatasetReportMessage,
  type EvalResult,
  type Job,
  type JobEvent,
  type TrainingConfig,
  type TrainingStep,
} from '../gen/tuneserve/v1/training.js';
import type { AdapterView } from './adapter-registry.js';
import type { DatasetRecord } from './datasets.js';
import type { AdapterConfig, AdapterServingStats, AdapterTier as Tier, DatasetReport } from './engine-port.js';
import type {
  Hyperparameters,
  JobEventData,
  JobEventRecord,
  JobRecord,
  JobState as StoredJobState,
  StepRecord,
  TrainingMetricsRecord,
} from './job-store.js';

const jobStates: Record<StoredJobState, JobState> = {
  queued: JobState.JOB_STATE_QUEUED,
  running: JobState.JOB_STATE_RUNNING,
  succeeded: JobState.JOB_STATE_SUCCEEDED,
  failed: JobState.JOB_STATE_FAILED,
  cancelled: JobState.JOB_STATE_CANCELLED,
  interrupted: JobState.JOB_STATE_INTERRUPTED,
};

/** The stored state for a wire state, or null for UNSPECIFIED/unknown values. */
export function storedJobState(state: JobState): StoredJobState | null {
  for (const [stored, wire] of Object.entries(jobStates)) if (wire === state) return stored as StoredJobState;
  return null;
}

const schedulers: Record<Hyperparameters['scheduler'], LrScheduler> = {
  constant: LrScheduler.LR_SCHEDULER_CONSTANT,
  linear: LrScheduler.LR_SCHEDULER_LINEAR,
  cosine: LrScheduler.LR_SCHEDULER_COSINE,
};

/** Hyperparameters in force as a TrainingConfig message. */
export function toTrainingConfig(config: Hyperparameters): TrainingConfig {
  return {
    rank: config.rank,
    alpha: config.alpha,
    dropout: config.dropout,
    targetModules: [...config.targetModules],
    learningRate: config.learningRate,
    maxSteps: config.maxSteps,
    epochs: config.epochs,
    batchSize: config.batchSize,
    gradAccum: config.gradAccum,
    maxSeqLen: config.maxSeqLen,
    scheduler: schedulers[config.scheduler],
    warmupSteps: config.warmupSteps,
    weightDecay: config.weightDecay,
    maxGradNorm: config.maxGradNorm,
    seed: config.seed,
    shuffle: config.shuffle,
    evalFraction: config.evalFraction,
    evalEvery: config.evalEvery,
    checkpointEvery: config.checkpointEvery,
    // Jobs stored before these settings existed ran with their defaults.
    nonfinitePolicy: guardPolicies[config.nonfinitePolicy ?? 'rollback'],
    spikeFactor: config.spikeFactor ?? 0,
    spikePolicy: guardPolicies[config.spikePolicy ?? 'skip'],
    earlyStoppingPatience: config.earlyStoppingPatience ?? 0,
    earlyStoppingMinDelta: config.earlyStoppingMinDelta ?? 0,
    keepBest: config.keepBest ?? false,
    forgettingCheck: config.forgettingCheck ?? false,
    forgettingWarnThreshold: config.forgettingWarnThreshold ?? 0.25,
    // Unset is auto; a job stored before packing existed ran unpacked.
    packing: config.packing === undefined ? false : config.packing === 'auto' ? undefined : config.packing === 'on',
  };
}

const guardPolicies: Record<Hyperparameters['nonfinitePolicy'], GuardPolicy> = {
  fail: GuardPolicy.GUARD_POLICY_FAIL,
  skip: GuardPolicy.GUARD_POLICY_SKIP,
  rollback: GuardPolicy.GUARD_POLICY_ROLLBACK,
};

/** The stored scheduler name for a wire value (UNSPECIFIED → linear), or null when unknown. */
export function storedScheduler(value: LrScheduler): Hyperparameters['scheduler'] | null {
  if (value === LrScheduler.LR_SCHEDULER_UNSPECIFIED) return 'linear';
  for (const [name, wire] of Object.entries(schedulers)) if (wire === value) return name as Hyperparameters['scheduler'];
  return null;
}

/** Training metrics as a message. */
export function toTrainingMetrics(metrics: TrainingMetricsRecord): TrainingMetrics {
  return {
    finalLoss: metrics.finalLoss,
    ...(metrics.evalLoss === null ? {} : { evalLoss: metrics.evalLoss }),
    steps: metrics.steps,
    tokens: metrics.tokens,
    trainSeconds: metrics.trainSeconds,
    stoppedEarly: metrics.stoppedEarly ?? false,
    ...(metrics.bestStep == null ? {} : { bestStep: metrics.bestStep }),
    ...(metrics.bestEvalLoss == null ? {} : { bestEvalLoss: metrics.bestEvalLoss }),
    ...(metrics.forgettingBaseLoss == null ? {} : { forgettingBaseLoss: metrics.forgettingBaseLoss }),
    ...(metrics.forgettingLoss == null ? {} : { forgettingLoss: metrics.forgettingLoss }),
    guardInterventions: metrics.guardInterventions ?? 0,
  };
}

/** One step as a message. */
export function toTrainingStep(step: StepRecord): TrainingStep {
  return {
    step: step.step,
    totalSteps: step.totalSteps,
    epoch: step.epoch,
    loss: step.loss,
    gradNorm: step.gradNorm,
    learningRate: step.learningRate,
    tokensPerSecond: step.tokensPerSecond,
    elapsedSeconds: step.elapsedSeconds,
    etaSeconds: step.etaSeconds,
    // Steps stored before the scheduler reported its share: unknown, reported as 0.
    deviceShare: step.deviceShare ?? 0,
    generationSteps: step.generationSteps ?? 0,
    deferredMicroSteps: step.deferredMicroSteps ?? 0,
  };
}

/** A stored job as a Job message; queuePosition comes from the live queue. */
export function toJob(job: JobRecord, queuePosition: number): Job {
  return {
    jobId: job.jobId,
    state: jobStates[job.state],
    adapterId: job.adapterId,
    datasetId: job.datasetId ?? '',
    initAdapterId: job.initAdapterId ?? '',
    config: toTrainingConfig(job.config),
    createTime: new Date(job.createTime),
    startTime: job.startTime === null ? undefined : new Date(job.startTime),
    endTime: job.endTime === null ? undefined : new Date(job.endTime),
    queuePosition: job.state === 'queued' ? queuePosition : 0,
    totalSteps: job.totalSteps,
    lastStep: job.lastStep === null ? undefined : toTrainingStep(job.lastStep),
    metrics: job.metrics === null ? undefined : toTrainingMetrics(job.metrics),
    failureReason: job.failureReason ?? '',
    failureMessage: job.failureMessage ?? '',
    lastCheckpointStep: job.lastCheckpointStep,
    lastSequence: job.lastSequence,
    newVersion: job.newVersion,
  };
}

/** A stored event as a JobEvent message. */
export function toJobEvent(event: JobEventRecord): JobEvent {
  const wire: JobEvent = { jobId: event.jobId, sequence: event.sequence, time: new Date(event.time) };
  const data = event.data;
  switch (data.kind) {
    case 'queued':
      wire.queued = { queuePosition: data.queuePosition };
      break;
    case 'dataset':
      wire.datasetReport = toDatasetReport(data.report);
      break;
    case 'started':
      wire.started = {
        totalSteps: data.totalSteps, trainExamples: data.trainExamples, evalExamples: data.evalExamples,
        schedulingPolicy: data.schedulingPolicy,
      };
      break;
    case 'step':
      wire.step = toTrainingStep(data);
      break;
    case 'eval':
      wire.evaluation = toEvalResult(data);
      break;
    case 'guard':
      wire.guard = { step: data.step, action: data.action, reason: data.reason, rolledBackTo: data.rolledBackTo };
      break;
    case 'warning':
      wire.warning = { code: data.code, message: data.message };
      break;
    case 'resumed':
      wire.resumed = { checkpointStep: data.checkpointStep };
      break;
    case 'checkpoint':
      wire.checkpoint = { step: data.step };
      break;
    case 'completed':
      wire.completed = {
        adapterId: data.adapterId, metrics: toTrainingMetrics(data.metrics), adapterVersion: data.version ?? 1, contentHash: data.contentHash ?? '',
      };
      break;
    case 'failed':
      wire.failed = { reason: data.reason, message: data.message };
      break;
    case 'cancelled':
      wire.cancelled = { stepsCompleted: data.stepsCompleted };
      break;
    case 'interrupted':
      wire.interrupted = { lastStep: data.lastStep, lastCheckpointStep: data.lastCheckpointStep };
      break;
  }
  return wire;
}

/** An evaluation as a message, with the forgetting figures when the job has the check. */
export function toEvalResult(data: Extract<JobEventData, { kind: 'eval' }>): EvalResult {
  return {
    step: data.step,
    loss: data.loss,
    ...(data.forgettingLoss === undefined || data.forgettingBaseLoss === undefined
      ? {}
      : {
          forgettingLoss: data.forgettingLoss,
          forgettingBaseLoss: data.forgettingBaseLoss,
          forgettingIncrease: data.forgettingLoss - data.forgettingBaseLoss,
        }),
  };
}

/** A dataset report as a message. */
export function toDatasetReport(report: DatasetReport): DatasetReportMessage {
  const kinds = report.rowsByKind;
  return {
    rows: report.rows,
    rowsByFormat: {
      text: kinds.text,
      promptCompletion: kinds.promptCompletion,
      messages: kinds.messages,
      alpaca: kinds.alpaca,
      sharegpt: kinds.sharegpt,
      tokenIds: kinds.tokenIds,
    },
    tokens: report.tokens,
    scoredTokens: report.scoredTokens,
    maxSeqLen: report.maxSeqLen,
    truncatedRows: report.truncatedRows,
    truncatedTokens: report.truncatedTokens,
    longestRowTokens: report.longestRow.tokens,
    longestRowLine: report.longestRow.line,
    minScoredFraction: report.scoredFraction.min,
    minScoredFractionLine: report.scoredFraction.minLine,
    meanScoredFraction: report.scoredFraction.mean,
    blankLines: report.blankLines,
    packingEnabled: report.packing?.enabled ?? false,
    packingReason: report.packing?.reason ?? '',
    trainingSequences: report.packing?.sequences ?? 0,
    sequenceFill: report.packing?.fill ?? 0,
  };
}

/** A stored dataset as a message. */
export function toDataset(record: DatasetRecord): Dataset {
  return {
    datasetId: record.datasetId,
    sizeBytes: record.sizeBytes,
    sha256: record.sha256,
    rowCount: record.rowCount,
    createTime: new Date(record.createTime),
    tenant: tenantOf(record),
    shared: record.shared === true,
  };
}

const tiers: Record<Tier, AdapterTier> = {
  disk: AdapterTier.ADAPTER_TIER_DISK,
  host: AdapterTier.ADAPTER_TIER_HOST,
  device: AdapterTier.ADAPTER_TIER_DEVICE,
};

/** The pool's counters as a message. */
export function toServingStats(s: AdapterServingStats): AdapterServingStatsMessage {
  return {
    requests: s.requests, inputTokens: s.inputTokens, outputTokens: s.outputTokens, hits: s.hits, hostHits: s.hostHits,
    loads: s.loads, loadSeconds: s.loadSeconds, lastLoadSeconds: s.lastLoadSeconds, evictions: s.evictions,
    hostEvictions: s.hostEvictions, loadFailures: s.loadFailures, placements: s.placements, placeSeconds: s.placeSeconds,
  };
}

function toLoraConfig(config: AdapterConfig): Adapter['config'] {
  return {
    rank: config.rank,
    alpha: config.alpha,
    dropout: config.dropout,
    targetModules: [...config.targetModules],
    useRslora: config.useRslora,
  };
}

const sources = (source: 'trained' | 'imported'): AdapterSource =>
  source === 'trained' ? AdapterSource.ADAPTER_SOURCE_TRAINED : AdapterSource.ADAPTER_SOURCE_IMPORTED;

/** A stored adapter as a message. */
export function toAdapter(view: AdapterView, baseFingerprint: string): Adapter {
  return {
    adapterId: view.adapterId,
    config: toLoraConfig(view.config),
    baseFingerprint: view.baseFingerprint,
    matchesBase: view.baseFingerprint === baseFingerprint,
    loaded: view.loaded,
    createTime: new Date(view.createTime),
    source: sources(view.source),
    jobId: view.jobId ?? '',
    metrics: view.metrics === null ? undefined : toTrainingMetrics(view.metrics),
    sizeBytes: view.sizeBytes,
    tenant: tenantOf(view),
    shared: view.shared === true,
    version: view.version,
    contentHash: view.contentHash,
    versions: view.versions.map((v) => ({
      version: v.version,
      contentHash: v.contentHash,
      createTime: new Date(v.createTime),
      source: sources(v.source),
      jobId: v.jobId ?? '',
      sizeBytes: v.sizeBytes,
      tier: v.pool === null ? AdapterTier.ADAPTER_TIER_UNSPECIFIED : tiers[v.pool.tier],
      pinned: v.pool?.pinned ?? false,
      stats: v.pool === null ? undefined : toServingStats(v.pool.stats),
      config: toLoraConfig(v.config),
      metrics: v.metrics === null ? undefined : toTrainingMetrics(v.metrics),
    })),
    aliases: Object.entries(view.aliases)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([name, alias]) => ({ name, version: alias.version, history: [...alias.history] })),
    stats: toServingStats(view.stats),
    tier: view.tier === null ? AdapterTier.ADAPTER_TIER_UNSPECIFIED : tiers[view.tier],
  };
}
