// PEFT adapter_config.json: the fields PEFT writes, reading PEFT's own files, refusing what the
// engine does not implement, and PEFT's tensor key names.

import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLlamaConfig } from '../src/engine/model-folder.js';
import { presetConfigJson } from '../src/engine/make-model.js';
import {
  adapterConfigJson,
  createLoraConfig,
  loraKey,
  loraTensorShapes,
  parseAdapterConfig,
  parseLoraKey,
  readAdapterConfig,
  resolveTargets,
  writeAdapterConfig,
} from '../src/engine/peft-config.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'tuneserve-peft-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** adapter_config.json as PEFT 0.13 saved it for a LoraConfig(r=16, lora_alpha=32, target_modules="all-linear") on Llama. */
const peftWritten = {
  alpha_pattern: {},
  auto_mapping: null,
  base_model_name_or_path: 'meta-llama/Llama-3.1-8B',
  bias: 'none',
  fan_in_fan_out: false,
  inference_mode: true,
  init_lora_weights: true,
  layer_replication: null,
  layers_pattern: null,
  layers_to_transform: null,
  loftq_config: {},
  lora_alpha: 32,
  lora_dropout: 0.05,
  megatron_config: null,
  megatron_core: 'megatron.core',
  modules_to_save: null,
  peft_type: 'LORA',
  r: 16,
  rank_pattern: {},
  revision: null,
  target_modules: ['down_proj', 'o_proj', 'k_proj', 'q_proj', 'gate_proj', 'up_proj', 'v_proj'],
  task_type: 'CAUSAL_LM',
  use_dora: false,
  use_rslora: false,
};

describe('LoraConfig', () => {
  it('computes scaling alpha/r, or alpha/√r with rslora', () => {
    expect(createLoraConfig({ r: 16, alpha: 32, targets: 'q_proj,v_proj' })).toEqual({ r: 16, alpha: 32, dropout: 0, targets: ['q_proj', 'v_proj'], useRslora: false, scaling: 2 });
    expect(createLoraConfig({ r: 16, alpha: 32, targets: ['v_proj', 'q_proj'], useRslora: true }).scaling).toBe(8);
  });

  it('expands all-linear to the seven Llama modules in canonical order', () => {
    expect(resolveTargets('all-linear')).toEqual(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
    expect(resolveTargets(['down_proj', 'q_proj'])).toEqual(['q_proj', 'down_proj']);
    expect(() => resolveTargets('q_proj,lm_head')).toThrow(/"lm_head" is not one of/);
    expect(() => resolveTargets('')).toThrow(/empty/);
  });

  it('refuses bad numbers', () => {
    expect(() => createLoraConfig({ r: 0, alpha: 16, targets: 'q_proj' })).toThrow(/rank r must be a positive integer/);
    expect(() => createLoraConfig({ r: 8, alpha: -1, targets: 'q_proj' })).toThrow(/lora_alpha/);
    expect(() => createLoraConfig({ r: 8, alpha: 16, dropout: 1, targets: 'q_proj' })).toThrow(/lora_dropout must be in \[0, 1\)/);
  });
});

describe('adapter_config.json', () => {
  it('writes every field PEFT writes, keys sorted, target_modules expanded to a list', async () => {
    const lora = createLoraConfig({ r: 16, alpha: 32, dropout: 0.05, targets: 'all-linear' });
    await writeAdapterConfig(dir, lora, { baseModelNameOrPath: 'meta-llama/Llama-3.1-8B' });
    const text = await readFile(join(dir, 'adapter_config.json'), 'utf8');
    const written = JSON.parse(text);
    expect(Object.keys(written)).toEqual(Object.keys(peftWritten));
    expect({ ...written, target_modules: [...written.target_modules].sort() }).toEqual({ ...peftWritten, target_modules: [...peftWritten.target_modules].sort() });
    expect(Object.keys(written)).toEqual([...Object.keys(written)].sort());
  });

  it('reads what PEFT writes, and round-trips its own files', async () => {
    const parsed = parseAdapterConfig(peftWritten);
    expect(parsed.lora).toEqual({ r: 16, alpha: 32, dropout: 0.05, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], useRslora: false, scaling: 2 });
    expect(parsed.baseModelNameOrPath).toBe('meta-llama/Llama-3.1-8B');
    expect(parseAdapterConfig({ ...peftWritten, target_modules: 'all-linear' }).lora.targets).toHaveLength(7);

    const lora = createLoraConfig({ r: 4, alpha: 8, dropout: 0, targets: 'q_proj,v_proj', useRslora: true });
    await writeAdapterConfig(dir, lora);
    expect((await readAdapterConfig(dir)).lora).toEqual(lora);
  });

  const refusals: Array<[string, Record<string, unknown>, string, RegExp]> = [
    ['DoRA', { use_dora: true }, 'UNSUPPORTED', /"use_dora" is true; DoRA is not supported/],
    ['a rank pattern', { rank_pattern: { q_proj: 8 } }, 'UNSUPPORTED', /"rank_pattern" is not empty/],
    ['an alpha pattern', { alpha_pattern: { 'model.layers.0.self_attn.q_proj': 4 } }, 'UNSUPPORTED', /"alpha_pattern" is not empty/],
    ['trained biases', { bias: 'lora_only' }, 'UNSUPPORTED', /"bias" is "lora_only"; only "none"/],
    ['extra saved modules', { modules_to_save: ['lm_head'] }, 'UNSUPPORTED', /"modules_to_save" is set/],
    ['a layer subset', { layers_to_transform: [0, 1] }, 'UNSUPPORTED', /"layers_to_transform" is set/],
    ['a regex target', { target_modules: '.*q_proj' }, 'UNSUPPORTED', /regular expression/],
    ['a non-Llama target', { target_modules: ['q_proj', 'lm_head'] }, 'UNSUPPORTED', /"lm_head" is not one of/],
    ['fan_in_fan_out', { fan_in_fan_out: true }, 'UNSUPPORTED', /"fan_in_fan_out" is true/],
    ['another PEFT type', { peft_type: 'IA3' }, 'INVALID_CONFIG', /"peft_type" must be "LORA"/],
    ['another task type', { task_type: 'SEQ_CLS' }, 'INVALID_CONFIG', /"task_type" must be "CAUSAL_LM"/],
    ['a bad rank', { r: 0 }, 'INVALID_CONFIG', /"r" must be a positive integer/],
    ['a string alpha', { lora_alpha: '16' }, 'INVALID_CONFIG', /"lora_alpha" must be a positive number/],
  ];
  for (const [label, change, code, message] of refusals) {
    it(`refuses ${label} (${code})`, async () => {
      await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ ...peftWritten, ...change }));
      const error = await readAdapterConfig(dir).catch((e: unknown) => e);
      expect(error).toMatchObject({ code });
      expect((error as Error).message).toMatch(message);
      expect((error as Error).message).toContain(join(dir, 'adapter_config.json'));
    });
  }
});

describe('tensor keys', () => {
  it('uses PEFT key names, attention modules under self_attn and MLP ones under mlp', () => {
    expect(loraKey(3, 'q_proj', 'A')).toBe('base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight');
    expect(loraKey(0, 'down_proj', 'B')).toBe('base_model.model.model.layers.0.mlp.down_proj.lora_B.weight');
    expect(parseLoraKey('base_model.model.model.layers.12.mlp.gate_proj.lora_B.weight')).toEqual({ layer: 12, target: 'gate_proj', matrix: 'B' });
    expect(parseLoraKey('base_model.model.model.layers.1.mlp.q_proj.lora_A.weight')).toBeNull();
    expect(parseLoraKey('base_model.model.lm_head.lora_A.weight')).toBeNull();
  });

  it('gives A [r, in] and B [out, r] for every layer and target', () => {
    const config = parseLlamaConfig(presetConfigJson('small'));
    const shapes = loraTensorShapes(config, { r: 8, targets: ['k_proj', 'down_proj'] });
    expect(shapes.size).toBe(4 * 2 * 2);
    expect(shapes.get(loraKey(0, 'k_proj', 'A'))).toEqual([8, 256]);
    expect(shapes.get(loraKey(0, 'k_proj', 'B'))).toEqual([128, 8]);
    expect(shapes.get(loraKey(3, 'down_proj', 'A'))).toEqual([8, 768]);
    expect(shapes.get(loraKey(3, 'down_proj', 'B'))).toEqual([256, 8]);
  });
});
