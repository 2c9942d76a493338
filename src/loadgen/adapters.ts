// Random PEFT adapters for load tests and benchmarks: the two files of a LoRA adapter folder for a
// base of given shape, made in memory from a seed (A and B both non-zero, so every adapter changes the
// model's outputs). Optionally poisoned with NaN, to exercise per-request failure isolation.

import { encodeSafetensors } from '../engine/safetensors.js';
import { adapterConfigJson, createLoraConfig, loraTensorShapes } from '../engine/peft-config.js';
import type { LlamaConfig } from '../engine/model-folder.js';
import { seededRandom } from './random.js';

/** The shape fields an adapter depends on (GetModelInfo's architecture carries them). */
export type AdapterBaseShape = Pick<LlamaConfig, 'hiddenSize' | 'intermediateSize' | 'numLayers' | 'numHeads' | 'numKvHeads' | 'headDim'>;

export interface RandomAdapterOptions {
  rank: number;
  /** Default q_proj, k_proj, v_proj, o_proj. */
  targets?: string | readonly string[];
  /** Default 2 × rank. */
  alpha?: number;
  seed: number;
  /** B's values are uniform in ±scale (default 0.05); A's in ±1/√in as PEFT initializes them. */
  scale?: number;
  /** Put a NaN into the first B matrix (the adapter loads, its outputs are not finite). */
  poison?: boolean;
}

/** adapter_config.json and adapter_model.safetensors of a random adapter, as bytes. */
export function randomAdapterFiles(base: AdapterBaseShape, options: RandomAdapterOptions): Record<'adapter_config.json' | 'adapter_model.safetensors', Buffer> {
  const lora = createLoraConfig({ r: options.rank, alpha: options.alpha ?? 2 * options.rank, dropout: 0, targets: options.targets ?? 'q_proj,k_proj,v_proj,o_proj' });
  const next = seededRandom(options.seed);
  const scale = options.scale ?? 0.05;
  let poisoned = !options.poison;
  const tensors = [...loraTensorShapes(base as LlamaConfig, lora)].map(([name, shape]) => {
    const bound = name.endsWith('lora_A.weight') ? 1 / Math.sqrt(shape[1]) : scale;
    const values = Float32Array.from({ length: shape[0] * shape[1] }, () => (2 * next() - 1) * bound);
    if (!poisoned && name.endsWith('lora_B.weight')) {
      values[0] = Number.NaN;
      poisoned = true;
    }
    return { name, dtype: 'F32' as const, shape, values };
  });
  return {
    'adapter_config.json': Buffer.from(`${JSON.stringify(adapterConfigJson(lora, { baseModelNameOrPath: null }), null, 2)}\n`),
    'adapter_model.safetensors': Buffer.from(encodeSafetensors(tensors, { format: 'pt' })),
  };
}
