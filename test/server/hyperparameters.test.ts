// A TrainRequest's config resolved and checked before the job is queued: max_seq_len against the
// model's max_position_embeddings and the server's limit, target modules against the modules the
// model's layers have, each refusal an INVALID_ARGUMENT naming the field.

import { describe, expect, it } from 'vitest';
import { TrainingConfig } from '../../src/gen/tuneserve/v1/training.js';
import { ServiceError } from '../../src/server/errors.js';
import { resolveHyperparameters, type ModelLimits } from '../../src/server/hyperparameters.js';

const limits: ModelLimits = { maxPositionEmbeddings: 8192, maxSeqLen: 4096 };

function refusal(config: Partial<TrainingConfig>, modelLimits = limits): { field: string; description: string } {
  try {
    resolveHyperparameters(TrainingConfig.fromPartial(config), null, modelLimits);
  } catch (error) {
    expect(error).toBeInstanceOf(ServiceError);
    return (error as ServiceError).details.fieldViolations![0]!;
  }
  throw new Error('expected a refusal');
}

describe('max_seq_len', () => {
  it('defaults to min(2048, the server limit) and accepts values up to it', () => {
    expect(resolveHyperparameters(undefined, null, limits).maxSeqLen).toBe(2048);
    expect(resolveHyperparameters(undefined, null, { maxPositionEmbeddings: 1024, maxSeqLen: 1024 }).maxSeqLen).toBe(1024);
    expect(resolveHyperparameters(TrainingConfig.fromPartial({ maxSeqLen: 4096 }), null, limits).maxSeqLen).toBe(4096);
    expect(resolveHyperparameters(TrainingConfig.fromPartial({ maxSeqLen: 2 }), null, limits).maxSeqLen).toBe(2);
  });

  it('refuses more than the model\'s max_position_embeddings, naming both numbers', () => {
    expect(refusal({ maxSeqLen: 8193 })).toEqual({ field: 'config.max_seq_len', description: "is 8193, above the model's max_position_embeddings (8192)" });
  });

  it('refuses more than the server allows, naming the server limit and the model\'s', () => {
    expect(refusal({ maxSeqLen: 5000 })).toEqual({
      field: 'config.max_seq_len',
      description: "is 5000, above this server's max_seq_len (4096; the model's max_position_embeddings is 8192)",
    });
  });

  it('refuses a single token (nothing could be scored)', () => {
    expect(refusal({ maxSeqLen: 1 })).toEqual({ field: 'config.max_seq_len', description: 'is 1; a training sequence needs at least 2 tokens (position 0 is never a target)' });
  });
});

describe('target_modules', () => {
  it('accepts the layers\' linear modules and "all-linear"', () => {
    expect(resolveHyperparameters(TrainingConfig.fromPartial({ targetModules: ['v_proj', 'down_proj'] }), null, limits).targetModules).toEqual(['v_proj', 'down_proj']);
    expect(resolveHyperparameters(TrainingConfig.fromPartial({ targetModules: ['all-linear'] }), null, limits).targetModules).toHaveLength(7);
  });

  it('refuses modules the model does not have, naming the entry', () => {
    for (const [targets, field, name] of [
      [['q_proj', 'lm_head'], 'config.target_modules[1]', '"lm_head"'],
      [['attn'], 'config.target_modules[0]', '"attn"'],
      [['self_attn.q_proj'], 'config.target_modules[0]', '"self_attn.q_proj"'],
    ] as const) {
      expect(refusal({ targetModules: [...targets] })).toEqual({
        field,
        description: `${name} is not a linear module of this model's layers; they are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (or give the single value "all-linear")`,
      });
    }
  });

  it('refuses "all-linear" among other names, and repeats', () => {
    expect(refusal({ targetModules: ['q_proj', 'all-linear'] })).toEqual({ field: 'config.target_modules[1]', description: 'is "all-linear", which must be the only value' });
    expect(refusal({ targetModules: ['q_proj', 'q_proj'] })).toEqual({ field: 'config.target_modules[1]', description: 'repeats q_proj' });
  });
});
