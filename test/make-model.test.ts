// make-model: the tiny preset's files, config.json fields, tensor names, shapes and dtypes (read
// back with the safetensors header reader), init statistics, determinism, sharding and overrides.

import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fillNormalChunk, makeModel, presetConfigJson, type MadeModel } from '../src/engine/make-model.js';
import { expectedTensorShapes, loadModelFolder } from '../src/engine/model-folder.js';
import { bfloat16ToFloat32, float32ToBfloat16, readSafetensorsHeader, readTensorAsFloat32 } from '../src/engine/safetensors.js';
import { LlamaTokenizer } from '../src/engine/tokenizer.js';

let root: string;
let tiny: MadeModel;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'tuneserve-make-model-'));
  tiny = await makeModel({ preset: 'tiny', outDir: join(root, 'tiny'), seed: 7 });
}, 120_000);
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const sha256 = async (path: string) => createHash('sha256').update(await readFile(path)).digest('hex');

describe('tiny preset', () => {
  it('writes a complete Hugging Face folder', async () => {
    expect((await readdir(tiny.dir)).sort()).toEqual(['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    expect(tiny.shards).toEqual([join(tiny.dir, 'model.safetensors')]);
  });

  it('writes config.json as transformers does for Llama 3.1/3.2', async () => {
    const config = JSON.parse(await readFile(join(tiny.dir, 'config.json'), 'utf8'));
    expect(config).toMatchObject({
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      hidden_size: 64,
      intermediate_size: 192,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      head_dim: 16,
      vocab_size: 128256,
      tie_word_embeddings: true,
      torch_dtype: 'float32',
      bos_token_id: 128000,
      eos_token_id: [128001, 128008, 128009],
      max_position_embeddings: 131072,
      rope_theta: 500000,
      rms_norm_eps: 1e-5,
      rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
      hidden_act: 'silu',
      attention_bias: false,
      mlp_bias: false,
    });
    const generation = JSON.parse(await readFile(join(tiny.dir, 'generation_config.json'), 'utf8'));
    expect(generation).toMatchObject({ bos_token_id: 128000, eos_token_id: [128001, 128008, 128009] });
  });

  it('holds exactly the expected tensors with their shapes, in F32', async () => {
    const header = await readSafetensorsHeader(join(tiny.dir, 'model.safetensors'));
    const expected = expectedTensorShapes(tiny.config);
    expect(expected.has('lm_head.weight')).toBe(false); // tied
    expect([...header.tensors.keys()].sort()).toEqual([...expected.keys()].sort());
    for (const [name, entry] of header.tensors) {
      expect(entry.dtype).toBe('F32');
      expect(entry.shape).toEqual(expected.get(name));
    }
    expect(header.tensors.get('model.embed_tokens.weight')!.shape).toEqual([128256, 64]);
    expect(header.tensors.get('model.layers.1.self_attn.k_proj.weight')!.shape).toEqual([32, 64]);
    expect(header.metadata).toEqual({ format: 'pt' });
  });

  it('initializes norms to 1 and the rest as normal(0, 0.02)', async () => {
    const path = join(tiny.dir, 'model.safetensors');
    expect((await readTensorAsFloat32(path, 'model.norm.weight')).every((v) => v === 1)).toBe(true);
    expect((await readTensorAsFloat32(path, 'model.layers.0.input_layernorm.weight')).every((v) => v === 1)).toBe(true);
    // 8.2 M samples: the standard error of the mean is 0.02/√n ≈ 7e-6 and of the std ≈ 5e-6, so
    // 1e-4 bounds are > 10 standard errors wide yet catch a wrong scale or offset.
    const embedding = await readTensorAsFloat32(path, 'model.embed_tokens.weight');
    let sum = 0;
    let sumSquares = 0;
    for (const v of embedding) {
      sum += v;
      sumSquares += v * v;
    }
    const mean = sum / embedding.length;
    const std = Math.sqrt(sumSquares / embedding.length - mean * mean);
    expect(Math.abs(mean)).toBeLessThan(1e-4);
    expect(Math.abs(std - 0.02)).toBeLessThan(1e-4);
  });

  it('loads as a model folder with the real Llama 3 tokenizer', async () => {
    const folder = await loadModelFolder(tiny.dir);
    expect(folder.config).toEqual(tiny.config);
    expect(folder.config.headDim).toBe(16);
    const tokenizer = await LlamaTokenizer.fromFolder(tiny.dir);
    expect(tokenizer.encode('Hello world!', { addBos: false })).toEqual([9906, 1917, 0]);
  }, 60_000);
});

describe('determinism', () => {
  it('gives byte-identical weights for the same seed and different ones for another seed', async () => {
    const same = await makeModel({ preset: 'tiny', outDir: join(root, 'tiny-again'), seed: 7 });
    const other = await makeModel({ preset: 'tiny', outDir: join(root, 'tiny-other'), seed: 8 });
    const reference = await sha256(tiny.shards[0]!);
    expect(await sha256(same.shards[0]!)).toBe(reference);
    expect(await sha256(other.shards[0]!)).not.toBe(reference);
  }, 120_000);

  it('makes each tensor depend only on (seed, name), so fewer layers keep the same first layers', async () => {
    const short = await makeModel({ preset: 'tiny', outDir: join(root, 'tiny-1-layer'), seed: 7, numLayers: 1 });
    expect(short.config.numLayers).toBe(1);
    const name = 'model.layers.0.mlp.up_proj.weight';
    expect(await readTensorAsFloat32(short.shards[0]!, name)).toEqual(await readTensorAsFloat32(tiny.shards[0]!, name));
  }, 120_000);

  it('gives the same weights whatever the number of worker threads, in every dtype', async () => {
    const threaded = await makeModel({ preset: 'tiny', outDir: join(root, 'tiny-threads'), seed: 7, threads: 2 });
    expect(await sha256(threaded.shards[0]!)).toBe(await sha256(tiny.shards[0]!));
    // The workers also encode BF16 / F16 themselves: same bytes as the main thread's encoding.
    for (const dtype of ['bfloat16', 'float16'] as const) {
      const inWorkers = await makeModel({ preset: 'tiny', outDir: join(root, `tiny-${dtype}-threads`), seed: 7, dtype, threads: 3 });
      const onMain = await makeModel({ preset: 'tiny', outDir: join(root, `tiny-${dtype}-main`), seed: 7, dtype, threads: 0 });
      expect(await sha256(inWorkers.shards[0]!)).toBe(await sha256(onMain.shards[0]!));
    }
  }, 120_000);

  it('draws each chunk from its own stream of (seed, name, chunk)', () => {
    const draw = (seed: number, nameHash: number, chunk: number) => {
      const values = new Float32Array(64);
      fillNormalChunk(values, 1, seed, nameHash, chunk);
      return values;
    };
    const first = draw(42, 1, 0);
    expect(draw(42, 1, 0)).toEqual(first);
    expect(draw(42, 2, 0)).not.toEqual(first);
    expect(draw(42, 1, 1)).not.toEqual(first);
    expect(draw(42 + 2 ** 32, 1, 0)).not.toEqual(first); // seeds above 32 bits count too
  });
});

describe('sharding and dtype', () => {
  it('writes BF16 shards with an index when they exceed maxShardBytes, and the folder loads', async () => {
    const made = await makeModel({ preset: 'tiny', outDir: join(root, 'tiny-sharded'), seed: 7, dtype: 'bfloat16', maxShardBytes: 8_000_000 });
    const files = (await readdir(made.dir)).filter((name) => name.startsWith('model'));
    // embed_tokens alone is 16.4 MB in BF16, so it gets a shard and the rest share another.
    expect(files.sort()).toEqual(['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']);
    const index = JSON.parse(await readFile(join(made.dir, 'model.safetensors.index.json'), 'utf8'));
    expect(index.metadata.total_size).toBe(made.totalBytes);
    expect(index.weight_map['model.embed_tokens.weight']).toBe('model-00001-of-00002.safetensors');
    expect(index.weight_map['model.norm.weight']).toBe('model-00002-of-00002.safetensors');
    const folder = await loadModelFolder(made.dir);
    expect(folder.config.torchDtype).toBe('bfloat16');
    expect(folder.shards).toHaveLength(2);
    const header = await readSafetensorsHeader(folder.shards[1]!);
    expect([...header.tensors.values()].every((entry) => entry.dtype === 'BF16')).toBe(true);
    // BF16 of the same seed is exactly the F32 weights rounded to bf16.
    const name = 'model.layers.0.self_attn.q_proj.weight';
    const rounded = await readTensorAsFloat32(folder.weightMap.get(name)!, name);
    const exact = await readTensorAsFloat32(tiny.shards[0]!, name);
    expect(rounded).toEqual(bfloat16ToFloat32(float32ToBfloat16(exact)));

    // Remaking it unsharded in the same folder removes the stale shards and index.
    await makeModel({ preset: 'tiny', outDir: made.dir, seed: 7 });
    expect((await readdir(made.dir)).filter((name) => name.startsWith('model'))).toEqual(['model.safetensors']);
  }, 120_000);

  it('describes the 8B shape exactly (without writing it)', () => {
    expect(presetConfigJson('llama3-8b-shape')).toMatchObject({
      hidden_size: 4096,
      intermediate_size: 14336,
      num_hidden_layers: 32,
      num_attention_heads: 32,
      num_key_value_heads: 8,
      head_dim: 128,
      vocab_size: 128256,
      tie_word_embeddings: false,
      torch_dtype: 'bfloat16',
    });
    expect(presetConfigJson('small')).toMatchObject({ hidden_size: 256, intermediate_size: 768, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 4, head_dim: 32, tie_word_embeddings: false });
    expect(presetConfigJson('llama3-8b-shape', { numLayers: 2 }).num_hidden_layers).toBe(2);
    expect(() => presetConfigJson('huge' as 'tiny')).toThrow(/unknown preset "huge"/);
  });
});
