// The flags the remote commands share (connection, deadline, output) and the training flags that
// become a TrainingConfig; unset flags stay unset so the server's defaults apply.

import { EngineError } from '../../engine/errors.js';
import { LrScheduler, TrainingConfig } from '../../gen/tuneserve/v1/training.js';
import { choice, count, float, text, type Flags } from '../flags.js';

export function positional(positionals: string[], index: number, what: string): string {
  const value = positionals[index];
  if (value === undefined || value === '') throw new EngineError('INVALID_ARGUMENT', `missing ${what}`, { field: what });
  return value;
}

export const COMMON_FLAGS = {
  addr: { type: 'string' },
  'api-key': { type: 'string' },
  token: { type: 'string' },
  plaintext: { type: 'boolean' },
  'tls-ca': { type: 'string' },
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  timeout: { type: 'string' },
  json: { type: 'boolean' },
} as const;

export const TRAINING_FLAGS = {
  rank: { type: 'string' }, alpha: { type: 'string' }, dropout: { type: 'string' }, targets: { type: 'string' }, lr: { type: 'string' },
  steps: { type: 'string' }, epochs: { type: 'string' }, 'batch-size': { type: 'string' }, 'grad-accum': { type: 'string' },
  'max-seq-len': { type: 'string' }, scheduler: { type: 'string' }, 'warmup-steps': { type: 'string' }, 'weight-decay': { type: 'string' },
  'max-grad-norm': { type: 'string' }, seed: { type: 'string' }, 'no-shuffle': { type: 'boolean' }, 'eval-fraction': { type: 'string' },
  'eval-every': { type: 'string' }, 'checkpoint-every': { type: 'string' }, packing: { type: 'string' },
} as const;

export const SCHEDULERS = { constant: LrScheduler.LR_SCHEDULER_CONSTANT, linear: LrScheduler.LR_SCHEDULER_LINEAR, cosine: LrScheduler.LR_SCHEDULER_COSINE } as const;

/** The TrainingConfig the training flags describe; unset flags stay 0/absent (server defaults). */
export function trainingConfigFromFlags(flags: Flags): TrainingConfig {
  const scheduler = choice(flags, 'scheduler', ['constant', 'linear', 'cosine'] as const);
  const targets = text(flags, 'targets');
  const dropout = float(flags, 'dropout');
  const maxGradNorm = float(flags, 'max-grad-norm');
  const packing = choice(flags, 'packing', ['auto', 'on', 'off'] as const);
  return TrainingConfig.fromPartial({
    rank: count(flags, 'rank') ?? 0,
    alpha: float(flags, 'alpha') ?? 0,
    ...(dropout !== undefined ? { dropout } : {}),
    targetModules: targets === undefined ? [] : targets.split(',').map((t) => t.trim()).filter(Boolean),
    learningRate: float(flags, 'lr') ?? 0,
    maxSteps: count(flags, 'steps') ?? 0,
    epochs: count(flags, 'epochs') ?? 0,
    batchSize: count(flags, 'batch-size') ?? 0,
    gradAccum: count(flags, 'grad-accum') ?? 0,
    maxSeqLen: count(flags, 'max-seq-len') ?? 0,
    scheduler: scheduler ? SCHEDULERS[scheduler] : LrScheduler.LR_SCHEDULER_UNSPECIFIED,
    warmupSteps: count(flags, 'warmup-steps') ?? 0,
    weightDecay: float(flags, 'weight-decay') ?? 0,
    ...(maxGradNorm !== undefined ? { maxGradNorm } : {}),
    seed: count(flags, 'seed') ?? 0,
    ...(flags['no-shuffle'] === true ? { shuffle: false } : {}),
    evalFraction: float(flags, 'eval-fraction') ?? 0,
    evalEvery: count(flags, 'eval-every') ?? 0,
    checkpointEvery: count(flags, 'checkpoint-every') ?? 0,
    ...(packing === 'on' || packing === 'off' ? { packing: packing === 'on' } : {}),
  });
}
