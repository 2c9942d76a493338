// PEFT LoRA adapter configuration: adapter_config.json read, validated and written with the fields
// PEFT writes, the typed LoraConfig the engine uses, and PEFT's tensor key names.

import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { EngineError } from './errors.js';
import { LLAMA_LINEAR_MODULES, linearShape, type LlamaConfig, type LlamaLinearModule } from './model-folder.js';
import { writeFileAtomic } from './atomic-file.js';

export type LoraTarget = LlamaLinearModule;

/** Every Llama linear layer; what PEFT's "all-linear" expands to for LlamaForCausalLM (lm_head excluded). */
export const ALL_LINEAR_TARGETS: readonly LoraTarget[] = LLAMA_LINEAR_MODULES;

export const ADAPTER_CONFIG_FILE = 'adapter_config.json';
export const ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors';

export interface LoraConfig {
  r: number;
  alpha: number;
  dropout: number;
  /** In canonical order: q, k, v, o, gate, up, down. */
  targets: LoraTarget[];
  useRslora: boolean;
  /** alpha / r, or alpha / √r with rslora. */
  scaling: number;
}

export interface AdapterConfigFile {
  lora: LoraConfig;
  baseModelNameOrPath: string | null;
  inferenceMode: boolean;
}

export function loraScaling(r: number, alpha: number, useRslora: boolean): number {
  return useRslora ? alpha / Math.sqrt(r) : alpha / r;
}

/** "all-linear", a comma list ("q_proj,v_proj") or a list of module names → canonical target list. */
export function resolveTargets(value: string | readonly string[], field = 'target_modules'): LoraTarget[] {
  const names = typeof value === 'string' ? (value.trim() === 'all-linear' ? [...ALL_LINEAR_TARGETS] : value.split(',').map((name) => name.trim())) : [...value];
  if (names.length === 0 || (names.length === 1 && names[0] === '')) throw new EngineError('INVALID_ARGUMENT', `${field} is empty`, { field });
  for (const name of names) {
    if (typeof name !== 'string' || !(LLAMA_LINEAR_MODULES as readonly string[]).includes(name)) {
      throw new EngineError('INVALID_ARGUMENT', `${field}: ${JSON.stringify(name)} is not one of ${LLAMA_LINEAR_MODULES.join(', ')} (or all-linear)`, { field });
    }
  }
  return LLAMA_LINEAR_MODULES.filter((module) => names.includes(module));
}

/** Validates the numbers and builds a LoraConfig (scaling computed). */
export function createLoraConfig(options: { r: number; alpha: number; dropout?: number; targets: string | readonly string[]; useRslora?: boolean }): LoraConfig {
  const { r, alpha } = options;
  const dropout = options.dropout ?? 0;
  const useRslora = options.useRslora ?? false;
  if (!Number.isSafeInteger(r) || r <= 0) throw new EngineError('INVALID_ARGUMENT', `rank r must be a positive integer, got ${r}`, { field: 'r' });
  if (!Number.isFinite(alpha) || alpha <= 0) throw new EngineError('INVALID_ARGUMENT', `lora_alpha must be a positive number, got ${alpha}`, { field: 'lora_alpha' });
  if (!Number.isFinite(dropout) || dropout < 0 || dropout >= 1) throw new EngineError('INVALID_ARGUMENT', `lora_dropout must be in [0, 1), got ${dropout}`, { field: 'lora_dropout' });
  return { r, alpha, dropout, targets: resolveTargets(options.targets), useRslora, scaling: loraScaling(r, alpha, useRslora) };
}

/**
 * Parses adapter_config.json. Features that change what the weights mean and that the engine does
 * not implement (DoRA, bias training, per-module rank/alpha patterns, layer subsets, extra saved
 * modules) are refused with UNSUPPORTED rather than silently ignored.
 */
export function parseAdapterConfig(json: Record<string, unknown>, file = ADAPTER_CONFIG_FILE): AdapterConfigFile {
  const fail = (field: string, problem: string, code: 'INVALID_CONFIG' | 'UNSUPPORTED' = 'INVALID_CONFIG') =>
    new EngineError(code, `${file}: "${field}" ${problem}`, { file, field });
  const isEmpty = (value: unknown) =>
    value === undefined || value === null || (Array.isArray(value) && value.length === 0) || (typeof value === 'object' && value !== null && Object.keys(value).length === 0);

  if (json.peft_type !== 'LORA') throw fail('peft_type', `must be "LORA", got ${JSON.stringify(json.peft_type)}`);
  if (json.task_type !== undefined && json.task_type !== null && json.task_type !== 'CAUSAL_LM') {
    throw fail('task_type', `must be "CAUSAL_LM", got ${JSON.stringify(json.task_type)}`);
  }
  const r = json.r;
  if (typeof r !== 'number' || !Number.isSafeInteger(r) || r <= 0) throw fail('r', `must be a positive integer, got ${JSON.stringify(r)}`);
  // PEFT's default lora_alpha is 8 and lora_dropout 0.0 when a config omits them.
  const alpha = json.lora_alpha ?? 8;
  if (typeof alpha !== 'number' || !Number.isFinite(alpha) || alpha <= 0) throw fail('lora_alpha', `must be a positive number, got ${JSON.stringify(alpha)}`);
  const dropout = json.lora_dropout ?? 0;
  if (typeof dropout !== 'number' || !(dropout >= 0 && dropout < 1)) throw fail('lora_dropout', `must be a number in [0, 1), got ${JSON.stringify(dropout)}`);
  const useRslora = json.use_rslora ?? false;
  if (typeof useRslora !== 'boolean') throw fail('use_rslora', 'must be true or false');

  const targetModules = json.target_modules;
  let targets: LoraTarget[];
  if (typeof targetModules === 'string' && targetModules !== 'all-linear') {
    throw fail('target_modules', `is the regular expression ${JSON.stringify(targetModules)}; only a list of module names or "all-linear" is supported`, 'UNSUPPORTED');
  }
  if (typeof targetModules !== 'string' && !(Array.isArray(targetModules) && targetModules.every((name) => typeof name === 'string'))) {
    throw fail('target_modules', 'must be a list of module names or "all-linear"');
  }
  try {
    targets = resolveTargets(targetModules as string | string[], `${file}: "target_modules"`);
  } catch (error) {
    // A module outside the seven Llama linears (lm_head, embed_tokens) is valid PEFT, not supported here.
    throw new EngineError('UNSUPPORTED', (error as Error).message, { file, field: 'target_modules' });
  }

  if ((json.bias ?? 'none') !== 'none') throw fail('bias', `is ${JSON.stringify(json.bias)}; only "none" is supported`, 'UNSUPPORTED');
  if (json.use_dora === true) throw fail('use_dora', 'is true; DoRA is not supported', 'UNSUPPORTED');
  if (json.fan_in_fan_out === true) throw fail('fan_in_fan_out', 'is true; Llama linear weights are [out, in], so it must be false', 'UNSUPPORTED');
  if (json.lora_bias === true) throw fail('lora_bias', 'is true; LoRA biases are not supported', 'UNSUPPORTED');
  for (const field of ['rank_pattern', 'alpha_pattern']) {
    if (!isEmpty(json[field])) throw fail(field, `is not empty; per-module ${field === 'rank_pattern' ? 'ranks' : 'alphas'} are not supported`, 'UNSUPPORTED');
  }
  for (const field of ['modules_to_save', 'layers_to_transform', 'layer_replication', 'trainable_token_indices']) {
    if (!isEmpty(json[field])) throw fail(field, `is set (${JSON.stringify(json[field])}); not supported: it must be null`, 'UNSUPPORTED');
  }

  const base = json.base_model_name_or_path;
  if (base !== undefined && base !== null && typeof base !== 'string') throw fail('base_model_name_or_path', 'must be a string or null');
  const inferenceMode = json.inference_mode ?? true;
  if (typeof inferenceMode !== 'boolean') throw fail('inference_mode', 'must be true or false');
  return {
    lora: { r, alpha, dropout, targets, useRslora, scaling: loraScaling(r, alpha, useRslora) },
    baseModelNameOrPath: typeof base === 'string' ? base : null,
    inferenceMode,
  };
}

export async function readAdapterConfig(adapterDir: string): Promise<AdapterConfigFile> {
  const file = join(adapterDir, ADAPTER_CONFIG_FILE);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    throw new EngineError('NOT_FOUND', `missing ${file}`, { file }, { cause: error });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new EngineError('INVALID_CONFIG', `${file}: not valid JSON (${(error as Error).message})`, { file }, { cause: error });
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) throw new EngineError('INVALID_CONFIG', `${file}: not a JSON object`, { file });
  return parseAdapterConfig(json as Record<string, unknown>, file);
}

/**
 * adapter_config.json as PEFT writes it for a LoRA on LlamaForCausalLM (keys sorted, as PEFT's
 * json.dumps(sort_keys=True) does; target_modules expanded to a list even for all-linear).
 */
export function adapterConfigJson(lora: LoraConfig, options: { baseModelNameOrPath?: string | null; inferenceMode?: boolean } = {}): Record<string, unknown> {
  const fields: Record<string, unknown> = {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: options.baseModelNameOrPath ?? null,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: options.inferenceMode ?? true,
    init_lora_weights: true,
    layer_replication: null,
    layers_pattern: null,
    layers_to_transform: null,
    loftq_config: {},
    lora_alpha: lora.alpha,
    lora_dropout: lora.dropout,
    megatron_config: null,
    megatron_core: 'megatron.core',
    modules_to_save: null,
    peft_type: 'LORA',
    r: lora.r,
    rank_pattern: {},
    revision: null,
    target_modules: [...lora.targets],
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: lora.useRslora,
  };
  return Object.fromEntries(Object.keys(fields).sort().map((key) => [key, fields[key]]));
}

/** Writes adapter_config.json into adapterDir atomically. */
export async function writeAdapterConfig(adapterDir: string, lora: LoraConfig, options: { baseModelNameOrPath?: string | null; inferenceMode?: boolean } = {}): Promise<void> {
  await writeFileAtomic(join(adapterDir, ADAPTER_CONFIG_FILE), `${JSON.stringify(adapterConfigJson(lora, options), null, 2)}\n`);
}

// ---------------------------------------------------------------------------------------------
// tensor keys

export function moduleGroup(target: LoraTarget): 'self_attn' | 'mlp' {
  return target === 'gate_proj' || target === 'up_proj' || target === 'down_proj' ? 'mlp' : 'self_attn';
}

/** PEFT's key for a LoRA matrix: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight. */
export function loraKey(layer: number, target: LoraTarget, matrix: 'A' | 'B'): string {
  return `base_model.model.model.layers.${layer}.${moduleGroup(target)}.${target}.lora_${matrix}.weight`;
}

const LORA_KEY_PATTERN = /^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)\.weight$/;

/** Inverse of loraKey; null for any other key (or a module under the wrong group). */
export function parseLoraKey(key: string): { layer: number; target: LoraTarget; matrix: 'A' | 'B' } | null {
  const match = LORA_KEY_PATTERN.exec(key);
  if (match === null) return null;
  const target = match[3] as LoraTarget;
  if (moduleGroup(target) !== match[2]) return null;
  return { layer: Number(match[1]), target, matrix: match[4] as 'A' | 'B' };
}

/** Every key an adapter for this base holds, with its shape: A [r, in], B [out, r]. */
export function loraTensorShapes(config: LlamaConfig, lora: Pick<LoraConfig, 'r' | 'targets'>): Map<string, [number, number]> {
  const shapes = new Map<string, [number, number]>();
  for (let layer = 0; layer < config.numLayers; layer++) {
    for (const target of lora.targets) {
      const [outFeatures, inFeatures] = linearShape(config, target);
      shapes.set(loraKey(layer, target, 'A'), [lora.r, inFeatures]);
      shapes.set(loraKey(layer, target, 'B'), [outFeatures, lora.r]);
    }
  }
  return shapes;
}
