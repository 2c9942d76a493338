// Resolves a TrainRequest's TrainingConfig into the hyperparameters a job runs with: defaults for
// absent fields (the seed recipe of QLoRA practice: r 16, alpha 2r, dropout 0.05, q/k/v/o,
// lr 2e-4, batch 4 × accumulation 4), the init adapter's LoRA shape when continuing one, and
// every limit checked before the job is queued with an INVALID_ARGUMENT that names the field:
// max_seq_len against the model's max_position_embeddings (and the server's own limit), target
// modules against the linear modules the model's layers have.

import { GuardPolicy, type TrainingConfig } from '../gen/tuneserve/v1/training.js';
import { targetModuleNames, type AdapterConfig, type TargetModule } from './engine-port.js';
import { invalidArgument } from './errors.js';
import type { Hyperparameters } from './job-store.js';
import { storedScheduler } from './wire.js';

const DEFAULT_TARGETS: TargetModule[] = ['q_proj', 'k_proj', 'v_proj', 'o_proj'];
const MAX_STEPS = 1_000_000;

function checkInteger(field: string, value: number, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw invalidArgument(`config.${field}`, `must be an integer from ${min} to ${max}, got ${value}`);
  }
  return value;
}

function checkNumber(field: string, value: number, check: (v: number) => boolean, range: string): number {
  if (!Number.isFinite(value) || !check(value)) throw invalidArgument(`config.${field}`, `must be ${range}, got ${value}`);
  return value;
}

/** The model limits a job is checked against (GetModelInfo's). */
export interface ModelLimits {
  /** config.json's max_position_embeddings. */
  maxPositionEmbeddings: number;
  /** The longest sequence this server accepts (at most maxPositionEmbeddings). */
  maxSeqLen: number;
}

/**
 * Parses target_modules: names from targetModuleNames (every Llama decoder layer has each of these
 * linear modules, and no other) or the single value "all-linear".
 */
export function resolveTargets(values: readonly string[]): TargetModule[] {
  if (values.length === 1 && values[0] === 'all-linear') return [...targetModuleNames];
  const targets: TargetModule[] = [];
  values.forEach((value, index) => {
    if (value === 'all-linear') throw invalidArgument(`config.target_modules[${index}]`, 'is "all-linear", which must be the only value');
    if (!(targetModuleNames as readonly string[]).includes(value)) {
      throw invalidArgument(
        `config.target_modules[${index}]`,
        `${JSON.stringify(value)} is not a linear module of this model's layers; they are ${targetModuleNames.join(', ')} (or give the single value "all-linear")`,
      );
    }
    if (targets.includes(value as TargetModule)) throw invalidArgument(`config.target_modules[${index}]`, `repeats ${value}`);
    targets.push(value as TargetModule);
  });
  return targets;
}

/** max_seq_len: 0 for the default, else from 2 (a row needs a target after position 0) to the limits. */
function checkMaxSeqLen(value: number, limits: ModelLimits): number {
  const field = 'config.max_seq_len';
  if (!Number.isInteger(value) || value < 0) throw invalidArgument(field, `must be a whole number of tokens, got ${value}`);
  if (value === 0) return Math.min(2048, limits.maxSeqLen);
  if (value < 2) throw invalidArgument(field, `is ${value}; a training sequence needs at least 2 tokens (position 0 is never a target)`);
  if (value > limits.maxPositionEmbeddings) {
    throw invalidArgument(field, `is ${value}, above the model's max_position_embeddings (${limits.maxPositionEmbeddings})`);
  }
  if (value > limits.maxSeqLen) {
    throw invalidArgument(field, `is ${value}, above this server's max_seq_len (${limits.maxSeqLen}; the model's max_position_embeddings is ${limits.maxPositionEmbeddings})`);
  }
  return value;
}

/**
 * The hyperparameters a job runs with. `init` is the LoRA shape of the adapter being continued
 * (its rank, alpha and targets apply; a different explicit value is refused); `limits` are the
 * model's and the server's.
 */
export function resolveHyperparameters(
  config: TrainingConfig | undefined,
  init: AdapterConfig | null,
  limits: ModelLimits,
): Hyperparameters {
  const c = config ?? ({} as Partial<TrainingConfig>);
  const rankRequested = checkInteger('rank', c.rank ?? 0, 0, 256);
  const alphaRequested = checkNumber('alpha', c.alpha ?? 0, (v) => v >= 0 && v <= 4096, 'from 0 (default) to 4096');
  const targetsRequested = resolveTargets(c.targetModules ?? []);

  let rank: number;
  let alpha: number;
  let targetModules: TargetModule[];
  if (init !== null) {
    if (rankRequested !== 0 && rankRequested !== init.rank) {
      throw invalidArgument('config.rank', `is ${rankRequested} but the init adapter has rank ${init.rank}; leave it 0`);
    }
    if (alphaRequested !== 0 && alphaRequested !== init.alpha) {
      throw invalidArgument('config.alpha', `is ${alphaRequested} but the init adapter has alpha ${init.alpha}; leave it 0`);
    }
    const same =
      targetsRequested.length === init.targetModules.length && targetsRequested.every((t) => init.targetModules.includes(t));
    if (targetsRequested.length > 0 && !same) {
      throw invalidArgument('config.target_modules', `differ from the init adapter's (${init.targetModules.join(', ')}); leave them empty`);
    }
    rank = init.rank;
    alpha = init.alpha;
    targetModules = [...init.targetModules];
  } else {
    rank = rankRequested === 0 ? 16 : rankRequested;
    alpha = alphaRequested === 0 ? 2 * rank : alphaRequested;
    targetModules = targetsRequested.length === 0 ? [...DEFAULT_TARGETS] : targetsRequested;
  }

  const scheduler = storedScheduler(c.scheduler ?? 0);
  if (scheduler === null) throw invalidArgument('config.scheduler', `is not a known LrScheduler value (${c.scheduler})`);
  const maxSteps = checkInteger('max_steps', c.maxSteps ?? 0, 0, MAX_STEPS);
  const epochsRequested = checkInteger('epochs', c.epochs ?? 0, 0, 1000);
  const maxSeqLen = checkMaxSeqLen(c.maxSeqLen ?? 0, limits);

  return {
    rank,
    alpha,
    dropout: checkNumber('dropout', c.dropout ?? 0.05, (v) => v >= 0 && v < 1, 'from 0 to below 1'),
    targetModules,
    learningRate: checkNumber('learning_rate', c.learningRate || 2e-4, (v) => v > 0 && v <= 1, 'above 0 and at most 1'),
    maxSteps,
    epochs: epochsRequested === 0 ? 1 : epochsRequested,
    batchSize: checkInteger('batch_size', c.batchSize || 4, 1, 1024),
    gradAccum: checkInteger('grad_accum', c.gradAccum || 4, 1, 1024),
    maxSeqLen,
    scheduler,
    warmupSteps: checkInteger('warmup_steps', c.warmupSteps ?? 0, 0, MAX_STEPS),
    weightDecay: checkNumber('weight_decay', c.weightDecay ?? 0, (v) => v >= 0 && v <= 1, 'from 0 to 1'),
    maxGradNorm: checkNumber('max_grad_norm', c.maxGradNorm ?? 1, (v) => v >= 0 && v <= 1e6, 'from 0 to 1e6'),
    seed: checkInteger('seed', c.seed ?? 0, 0, 0xffffffff),
    shuffle: c.shuffle ?? true,
    evalFraction: checkNumber('eval_fraction', c.evalFraction ?? 0, (v) => v >= 0 && v <= 0.5, 'from 0 to 0.5'),
    evalEvery: checkInteger('eval_every', c.evalEvery ?? 0, 0, MAX_STEPS),
    checkpointEvery: checkInteger('checkpoint_every', c.checkpointEvery ?? 0, 0, MAX_STEPS),
    nonfinitePolicy: resolvePolicy('nonfinite_policy', c.nonfinitePolicy ?? GuardPolicy.GUARD_POLICY_UNSPECIFIED, 'rollback'),
    spikeFactor: checkNumber('spike_factor', c.spikeFactor ?? 0, (v) => v === 0 || (v > 1 && v <= 100), '0 (off) or above 1 and at most 100'),
    spikePolicy: resolvePolicy('spike_policy', c.spikePolicy ?? GuardPolicy.GUARD_POLICY_UNSPECIFIED, 'skip'),
    earlyStoppingPatience: needsEval('early_stopping_patience', checkInteger('early_stopping_patience', c.earlyStoppingPatience ?? 0, 0, 1000), c),
    earlyStoppingMinDelta: checkNumber('early_stopping_min_delta', c.earlyStoppingMinDelta ?? 0, (v) => v >= 0 && v <= 10, 'from 0 to 10'),
    keepBest: needsEval('keep_best', c.keepBest ?? false, c),
    forgettingCheck: c.forgettingCheck ?? false,
    forgettingWarnThreshold: checkNumber('forgetting_warn_threshold', c.forgettingWarnThreshold || 0.25, (v) => v > 0 && v <= 100, 'above 0 and at most 100'),
    packing: c.packing === undefined ? 'auto' : c.packing ? 'on' : 'off',
  };
}

const policies: Record<GuardPolicy, Hyperparameters['nonfinitePolicy'] | null> = {
  [GuardPolicy.GUARD_POLICY_UNSPECIFIED]: null,
  [GuardPolicy.GUARD_POLICY_FAIL]: 'fail',
  [GuardPolicy.GUARD_POLICY_SKIP]: 'skip',
  [GuardPolicy.GUARD_POLICY_ROLLBACK]: 'rollback',
  [GuardPolicy.UNRECOGNIZED]: null,
};

function resolvePolicy(field: string, value: GuardPolicy, fallback: Hyperparameters['nonfinitePolicy']): Hyperparameters['nonfinitePolicy'] {
  if (value === GuardPolicy.GUARD_POLICY_UNSPECIFIED) return fallback;
  const policy = policies[value];
  if (!policy) throw invalidArgument(`config.${field}`, `is not a known GuardPolicy value (${value})`);
  return policy;
}

/** A setting that only means something with an eval split: refused without one (it would do nothing). */
function needsEval<T extends number | boolean>(field: string, value: T, c: Partial<TrainingConfig>): T {
  if (value && !(c.evalFraction ?? 0)) throw invalidArgument(`config.${field}`, 'needs eval_fraction above 0 (it acts on evaluations)');
  return value;
}
