// Fuzzing of the files a model folder and a PEFT adapter folder are made of, through the code that
// reads them for real:
// - adapter folders (adapter_config.json mutated field by field, adapter_model.safetensors with tensors
//   dropped, added, reshaped, retyped, filled with NaN, or cut short) go through the import check
//   (NativeEnginePort.inspectAdapter) and the native load (lora_load) of a real engine; whatever loads
//   must generate. The two must agree: an adapter the import accepts and the engine cannot load would be
//   stored and then unusable.
// - model folders (config.json, generation_config.json and a weights index mutated) go through
//   loadModelFolder; a sample of the accepted ones is loaded by the engine and generates.
// Each case must be accepted or refused with an EngineError carrying a code; no other outcome passes.

import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine } from '../../src/engine/engine.js';
import { makeModel } from '../../src/engine/make-model.js';
import { loadModelFolder } from '../../src/engine/model-folder.js';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, createLoraConfig, loraTensorShapes } from '../../src/engine/peft-config.js';
import { DTYPE_BYTES, readSafetensorsHeader, readTensorAsFloat32 } from '../../src/engine/safetensors.js';
import type { AdapterConfig } from '../../src/server/engine-port.js';
import { NativeEnginePort } from '../../src/server/native-engine-port.js';
import { caseCount, codedError, FULL, fuzz } from '../helpers/fuzz.js';
import { mutateJson } from '../helpers/json-mutator.js';
import type { Random } from '../helpers/random.js';

interface RawTensor { name: string; dtype: string; shape: number[]; data: Buffer<ArrayBufferLike> }

/** A safetensors file from raw tensors (any dtype, any shape: the bytes are what the caller gives). */
function safetensorsBytes(tensors: RawTensor[]): Buffer {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.length] };
    offset += t.data.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const padded = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(padded.length));
  return Buffer.concat([length, padded, ...tensors.map((t) => t.data)]);
}

const LORA_FIELDS = ['peft_type', 'task_type', 'r', 'lora_alpha', 'lora_dropout', 'target_modules', 'bias', 'use_rslora', 'use_dora', 'fan_in_fan_out',
  'init_lora_weights', 'modules_to_save', 'rank_pattern', 'alpha_pattern', 'layers_to_transform', 'base_model_name_or_path', 'inference_mode', 'lora_bias',
  'layer_replication', 'trainable_token_indices', 'revision'];
const MODEL_FIELDS = ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim', 'vocab_size',
  'rms_norm_eps', 'rope_theta', 'rope_scaling', 'rope_scaling.factor', 'rope_scaling.rope_type', 'rope_scaling.low_freq_factor', 'rope_scaling.high_freq_factor',
  'rope_scaling.original_max_position_embeddings', 'tie_word_embeddings', 'max_position_embeddings', 'bos_token_id', 'eos_token_id', 'torch_dtype', 'dtype',
  'architectures', 'model_type', 'hidden_act', 'attention_bias', 'mlp_bias', 'pad_token_id'];

describe('model and adapter folders under fuzzing', () => {
  let sandbox: string;
  let port: NativeEnginePort;
  let baseAdapterConfig: Record<string, unknown>;
  let baseTensors: RawTensor[];
  let modelConfig: Record<string, unknown>;
  let generationConfig: Record<string, unknown>;

  beforeAll(async () => {
    sandbox = await mkdtemp(join(tmpdir(), 'tuneserve-config-fuzz-'));
    await makeModel({ preset: 'tiny', outDir: join(sandbox, 'model'), seed: 5 });
    port = await NativeEnginePort.open(join(sandbox, 'model'), { quant: 'nf4', device: 'cpu', maxSeqLen: 64, adapterSlots: 2, log: () => {} });
    // The valid adapter every mutation starts from: r 4 on q_proj and v_proj, with trained-looking B.
    const engine = port.engine;
    const adapter = engine.createAdapter(createLoraConfig({ r: 4, alpha: 8, targets: ['q_proj', 'v_proj'] }), 3);
    await engine.saveAdapter(adapter, join(sandbox, 'adapter'));
    engine.removeAdapter(adapter);
    baseAdapterConfig = JSON.parse(await readFile(join(sandbox, 'adapter', ADAPTER_CONFIG_FILE), 'utf8')) as Record<string, unknown>;
    const file = join(sandbox, 'adapter', ADAPTER_WEIGHTS_FILE);
    const header = await readSafetensorsHeader(file);
    baseTensors = [];
    for (const [name, entry] of header.tensors) {
      const values = await readTensorAsFloat32(file, name, header);
      for (let i = 0; i < values.length; i++) if (values[i] === 0) values[i] = 0.01 * Math.sin(i);
      baseTensors.push({ name, dtype: 'F32', shape: entry.shape, data: Buffer.from(values.buffer) });
    }
    modelConfig = JSON.parse(await readFile(join(sandbox, 'model', 'config.json'), 'utf8')) as Record<string, unknown>;
    generationConfig = JSON.parse(await readFile(join(sandbox, 'model', 'generation_config.json'), 'utf8')) as Record<string, unknown>;
  }, 300_000);

  afterAll(async () => {
    port?.close();
    if (sandbox) await rm(sandbox, { recursive: true, force: true });
  });

  /** Mutated adapter weights: the base tensors with one kind of damage (or none). */
  function adapterTensors(random: Random): { tensors: RawTensor[] | Buffer; what: string } {
    const tensors = baseTensors.map((t) => ({ ...t, shape: [...t.shape], data: Buffer.from(t.data) }));
    const t = random.pick(tensors);
    switch (random.below(10)) {
      case 0: tensors.splice(tensors.indexOf(t), 1); return { tensors, what: `${t.name} dropped` };
      case 1: {
        const name = random.pick(['base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight', 'base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight', 'base_model.model.lm_head.lora_A.weight', 'extra']);
        tensors.push({ name, dtype: 'F32', shape: [4, 64], data: Buffer.alloc(4 * 64 * 4) });
        return { tensors, what: `${name} added` };
      }
      case 2: t.shape = random.pick([[t.shape[1]!, t.shape[0]!], [t.shape[0]! + 1, t.shape[1]!], [t.shape[0]! * t.shape[1]!], [...t.shape, 1]]); t.data = Buffer.alloc(t.shape.reduce((a, b) => a * b, 1) * 4); return { tensors, what: `${t.name} reshaped to [${t.shape.join(',')}]` };
      case 3: {
        const dtype = random.pick(['F16', 'BF16', 'F64', 'I8', 'U8', 'I64', 'BOOL', 'F8_E4M3']);
        t.dtype = dtype;
        t.data = random.bytes(t.shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[dtype]!);
        return { tensors, what: `${t.name} as ${dtype}` };
      }
      case 4: {
        const poison = random.pick([NaN, Infinity, -Infinity, 3e38, 1e-45]);
        const values = new Float32Array(t.data.buffer, t.data.byteOffset, t.data.length / 4);
        for (let i = 0; i < values.length; i += random.int(1, 7)) values[i] = poison;
        return { tensors, what: `${t.name} holds ${poison}` };
      }
      case 5: {
        const bytes = safetensorsBytes(tensors);
        return { tensors: bytes.subarray(0, random.below(bytes.length)), what: 'file cut short' };
      }
      case 6: return { tensors: random.bytes(random.below(64)), what: 'random bytes' };
      case 7: { // a consistent adapter of another rank (the config may or may not say so)
        for (const x of tensors) {
          x.shape = x.name.includes('lora_A') ? [8, x.shape[1]!] : [x.shape[0]!, 8];
          x.data = Buffer.alloc(x.shape[0]! * x.shape[1]! * 4);
        }
        return { tensors, what: 'rank 8 weights' };
      }
      default: return { tensors, what: 'weights unchanged' };
    }
  }

  it('regression: the import check refuses adapter weights of a dtype the engine cannot load', async () => {
    // Found by the fuzzer below: the import accepted U8/BOOL/I8/F8 weights, stored them, and every
    // later load failed.
    const dir = join(sandbox, 'u8-adapter');
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(baseAdapterConfig));
    const tensors = baseTensors.map((t, i) => (i === 0 ? { ...t, dtype: 'U8', data: t.data.subarray(0, t.data.length / 4) } : t));
    await writeFile(join(dir, ADAPTER_WEIGHTS_FILE), safetensorsBytes(tensors));
    const error = await port.inspectAdapter(dir).catch((e: unknown) => e);
    expect(error).toMatchObject({ code: 'ADAPTER_INVALID' });
    expect((error as Error).message).toMatch(/has dtype U8; adapter weights must be F32, BF16, F16, F64/);
  });

  it('adapter folders: the import check and the engine agree, and what loads generates', async () => {
    const dir = join(sandbox, 'case-adapter');
    await mkdir(dir, { recursive: true });
    const summary = await fuzz({
      name: 'PEFT adapter folders (adapter_config.json + adapter_model.safetensors)', id: 'adapter-folder', seed: 11,
      cases: { bounded: 400, full: 3000 },
      make: (random) => {
        const config = random.chance(0.75) ? mutateJson(random, baseAdapterConfig, LORA_FIELDS) : { bytes: Buffer.from(JSON.stringify(baseAdapterConfig)), what: 'config unchanged' };
        const weights = random.chance(0.5) ? adapterTensors(random) : { tensors: baseTensors, what: 'weights unchanged' };
        const missing = random.chance(0.03) ? random.pick([ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]) : null;
        return { config, weights, missing };
      },
      describe: (c) => `${c.config.what}; ${c.weights.what}${c.missing ? `; ${c.missing} missing` : ''}`,
      clearError: codedError,
      run: async (c, index) => {
        await rm(join(dir, ADAPTER_CONFIG_FILE), { force: true });
        await rm(join(dir, ADAPTER_WEIGHTS_FILE), { force: true });
        if (c.missing !== ADAPTER_CONFIG_FILE) await writeFile(join(dir, ADAPTER_CONFIG_FILE), c.config.bytes);
        if (c.missing !== ADAPTER_WEIGHTS_FILE) await writeFile(join(dir, ADAPTER_WEIGHTS_FILE), Buffer.isBuffer(c.weights.tensors) ? c.weights.tensors : safetensorsBytes(c.weights.tensors));
        // The import check, and the engine's own load (adapter_config.json and weights, as for a job's
        // init adapter or a merge); then the pool's load of what both accept, under the checked config.
        let config: AdapterConfig | null = null;
        const inspected = await port.inspectAdapter(dir).then((c) => { config = c; return null; }, (e: unknown) => e);
        const engineLoad = await port.engine.loadAdapter(dir).then((a) => { port.engine.removeAdapter(a); return null; }, (e: unknown) => e);
        if ((inspected === null) !== (engineLoad === null)) {
          return { failure: `the import check ${inspected === null ? 'accepts' : `refuses (${String(inspected)})`} but the engine ${engineLoad === null ? 'loads it' : `refuses (${String(engineLoad)})`}` };
        }
        if (engineLoad !== null) {
          if (codedError(inspected) === null) return { failure: `the import check threw an unclear error: ${String(inspected)}` };
          throw engineLoad;
        }
        const key = `fuzz@v${index}`;
        try {
          port.registerAdapter(key, { dir, contentHash: `case-${index}`, config: config! });
          await port.loadAdapter(key, { signal: new AbortController().signal });
          const r = await port.generate({ promptIds: Int32Array.from([128000, 9906, 1917]), adapter: key, maxTokens: 2, temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: 0, stopIds: [] }, { onTokens: () => {}, signal: new AbortController().signal });
          if (r.ids.length !== 2 || r.ids.some((id) => !(id >= 0 && id < 128256))) return { failure: `generation with the adapter returned ids ${JSON.stringify(r.ids)}` };
        } catch (error) {
          // Weights the import check takes may still give non-finite logits (NaN in B): that request
          // fails alone with its code (NUMERICAL_ERROR), by design; anything unclear is a failure.
          if (codedError(error) === null) return { failure: `the pool could not serve what the import check accepted: ${String(error)}` };
          throw error;
        } finally {
          await port.unloadAdapter(key);
        }
        return 'accepted';
      },
    });
    expect(summary.crashes).toEqual([]);
    expect(summary.hangs).toEqual([]);
    expect(summary.accepted).toBeGreaterThan(0);
    expect(summary.rejected).toBeGreaterThan(summary.cases / 4);
  }, 1_800_000);

  it('model folders: config.json, generation_config.json and the weights index', async () => {
    const dir = join(sandbox, 'case-model');
    await mkdir(dir, { recursive: true });
    for (const name of ['model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json']) {
      await symlink(join(sandbox, 'model', name), join(dir, name)).catch(() => {});
    }
    // Loading an accepted folder into the engine takes seconds (the tokenizer): a sample of them.
    const engineLoads = FULL ? 60 : 6;
    let loads = 0;
    const summary = await fuzz({
      name: 'model folders (config.json, generation_config.json, index)', id: 'model-folder', seed: 12,
      cases: { bounded: 600, full: 4000 },
      make: (random) => {
        const config = random.chance(0.85) ? mutateJson(random, modelConfig, MODEL_FIELDS) : { bytes: Buffer.from(JSON.stringify(modelConfig)), what: 'config unchanged' };
        const generation = random.chance(0.15) ? mutateJson(random, generationConfig, ['eos_token_id', 'bos_token_id', 'max_new_tokens']) : null;
        const shard = random.pick(['model.safetensors', '../model/model.safetensors', '/etc/passwd', 'absent.safetensors', 'tokenizer.json', '']);
        const index = random.chance(0.1)
          ? Buffer.from(JSON.stringify(random.chance(0.8) ? { metadata: {}, weight_map: { 'model.embed_tokens.weight': shard, 'model.norm.weight': 'model.safetensors' } } : random.pick([{ weight_map: [] }, { weight_map: {} }, {}, []])))
          : null;
        return { config, generation, index };
      },
      describe: (c) => `${c.config.what}${c.generation ? `; generation_config: ${c.generation.what}` : ''}${c.index ? `; index ${c.index.toString().slice(0, 120)}` : ''}`,
      clearError: codedError,
      run: async (c) => {
        await writeFile(join(dir, 'config.json'), c.config.bytes);
        await writeFile(join(dir, 'generation_config.json'), c.generation?.bytes ?? JSON.stringify(generationConfig));
        await rm(join(dir, 'model.safetensors.index.json'), { force: true });
        if (c.index) await writeFile(join(dir, 'model.safetensors.index.json'), c.index);
        await loadModelFolder(dir);
        if (loads < engineLoads) {
          loads++;
          const engine = await Engine.load(dir, { quant: 'nf4', device: 'cpu', maxSeqLen: 16, maxActiveSequences: 1, adapterSlots: 1, log: () => {} });
          try {
            const r = await engine.generate({ promptIds: [128000, 9906], maxTokens: 2, stopIds: [] });
            if (r.ids.length !== 2) return { failure: `generated ${r.ids.length} ids instead of 2` };
          } finally {
            engine.close();
          }
        }
        return 'accepted';
      },
    });
    expect(summary.crashes).toEqual([]);
    expect(summary.hangs).toEqual([]);
    expect(summary.accepted).toBeGreaterThan(summary.cases / 20);
    expect(summary.rejected).toBeGreaterThan(summary.cases / 4);
  }, 3_600_000);
});
