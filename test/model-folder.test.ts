// Loading a Hugging Face Llama folder: config.json parsing and its refusals, single-file and sharded
// weights, index paths that escape the folder or name missing shards, missing or misshapen tensors,
// and a tokenizer that does not belong to the model (vocab_size, bos and eos ids against config.json).

import { copyFile, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectedTensorNames, expectedTensorShapes, loadModelFolder, parseLlamaConfig, type LlamaConfig } from '../src/engine/model-folder.js';
import { writeSafetensors, type WritableDtype } from '../src/engine/safetensors.js';
import { Engine } from '../src/engine/engine.js';
import { llama3TokenizerFiles, makeModel } from '../src/engine/make-model.js';
import { LlamaTokenizer } from '../src/engine/tokenizer.js';

/** A Llama config small enough to write in milliseconds (H 8, I 16, L 2, NH 2, NKV 1, D 4, V 32). */
const microConfig = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 8,
  intermediate_size: 16,
  num_hidden_layers: 2,
  num_attention_heads: 2,
  num_key_value_heads: 1,
  vocab_size: 32,
  rms_norm_eps: 1e-5,
  rope_theta: 500000.0,
  rope_scaling: { factor: 8.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  max_position_embeddings: 131072,
  bos_token_id: 0,
  eos_token_id: 1,
  tie_word_embeddings: false,
  torch_dtype: 'bfloat16',
};

let root: string;
let folderCount = 0;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'tuneserve-model-folder-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function newFolder(config: Record<string, unknown> = microConfig): Promise<string> {
  const dir = join(root, `model-${folderCount++}`);
  await mkdir(dir);
  await writeFile(join(dir, 'config.json'), JSON.stringify(config));
  return dir;
}

function tensorsOf(config: LlamaConfig, dtype: WritableDtype = 'BF16', skip: string[] = [], reshape: Record<string, number[]> = {}) {
  return [...expectedTensorShapes(config)]
    .filter(([name]) => !skip.includes(name))
    .map(([name, shape]) => {
      const finalShape = reshape[name] ?? shape;
      return { name, dtype, shape: finalShape, values: new Float32Array(finalShape.reduce((a, b) => a * b, 1)).fill(0.5) };
    });
}

const micro = parseLlamaConfig(microConfig);

async function codeAndMessage(promise: Promise<unknown>): Promise<{ code: string; message: string }> {
  const error = (await promise.then(
    () => new Error('expected a failure'),
    (e: unknown) => e,
  )) as { code: string; message: string };
  return { code: error.code, message: error.message };
}

describe('config.json', () => {
  it('parses a Llama 3.1 config into LlamaConfig', () => {
    expect(micro).toEqual({
      hiddenSize: 8,
      intermediateSize: 16,
      numLayers: 2,
      numHeads: 2,
      numKvHeads: 1,
      headDim: 4,
      vocabSize: 32,
      rmsNormEps: 1e-5,
      ropeTheta: 500000,
      ropeScaling: { factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
      tieWordEmbeddings: false,
      maxPositionEmbeddings: 131072,
      bosTokenId: 0,
      eosTokenIds: [1],
      torchDtype: 'bfloat16',
    });
  });

  it('takes head_dim when given, eos ids from generation_config.json too, and null rope_scaling', () => {
    const config = parseLlamaConfig({ ...microConfig, head_dim: 16, rope_scaling: null, eos_token_id: [1, 2] }, 'config.json', {
      json: { eos_token_id: [2, 3] },
      file: 'generation_config.json',
    });
    expect(config.headDim).toBe(16);
    expect(config.ropeScaling).toBeNull();
    expect(config.eosTokenIds).toEqual([1, 2, 3]);
  });

  it('accepts the legacy rope_scaling "type" key', () => {
    const { rope_type: _dropped, ...legacy } = microConfig.rope_scaling;
    expect(parseLlamaConfig({ ...microConfig, rope_scaling: { ...legacy, type: 'llama3' } }).ropeScaling?.factor).toBe(8);
  });

  const refusals: Array<[string, Record<string, unknown>, RegExp]> = [
    ['a missing required field', { hidden_size: undefined }, /config\.json: "hidden_size" is missing/],
    ['a missing vocab_size', { vocab_size: undefined }, /"vocab_size" is missing/],
    ['a wrongly typed field', { num_attention_heads: '2' }, /"num_attention_heads" must be a positive integer, got "2"/],
    ['a fractional layer count', { num_hidden_layers: 2.5 }, /"num_hidden_layers" must be a positive integer/],
    ['a non-numeric eps', { rms_norm_eps: 'small' }, /"rms_norm_eps" must be a positive number/],
    ['a string tie_word_embeddings', { tie_word_embeddings: 'yes' }, /"tie_word_embeddings" must be true or false/],
    ['an unknown rope type', { rope_scaling: { rope_type: 'yarn', factor: 4 } }, /"rope_scaling" has rope_type "yarn"; only "llama3"/],
    ['an incomplete llama3 rope_scaling', { rope_scaling: { rope_type: 'llama3', factor: 8 } }, /"rope_scaling\.low_freq_factor" is missing/],
    ['another model type', { model_type: 'mistral' }, /"model_type" must be "llama", got "mistral"/],
    ['another architecture', { architectures: ['LlamaForSequenceClassification'] }, /"architectures" must include "LlamaForCausalLM"/],
    ['heads not divisible by kv heads', { num_attention_heads: 3, num_key_value_heads: 2 }, /"num_key_value_heads" \(2\) must divide num_attention_heads \(3\)/],
    ['attention biases', { attention_bias: true }, /"attention_bias" is true/],
    ['a missing eos', { eos_token_id: undefined }, /"eos_token_id" is missing/],
    ['an eos id beyond the vocabulary', { eos_token_id: [1, 40] }, /"eos_token_id" \(40\) is not below vocab_size/],
    ['an unknown dtype', { torch_dtype: 'int8' }, /"torch_dtype" must be "float32", "bfloat16" or "float16"/],
  ];
  for (const [label, change, message] of refusals) {
    it(`refuses ${label} with INVALID_CONFIG naming the file and field`, async () => {
      const dir = await newFolder({ ...microConfig, ...change });
      const { code, message: text } = await codeAndMessage(loadModelFolder(dir));
      expect(code).toBe('INVALID_CONFIG');
      expect(text).toMatch(message);
      expect(text).toContain(join(dir, 'config.json'));
    });
  }

  it('refuses config.json that is not JSON, and a folder without one', async () => {
    const dir = await newFolder();
    await writeFile(join(dir, 'config.json'), '{"hidden_size": 8,');
    expect(await codeAndMessage(loadModelFolder(dir))).toMatchObject({ code: 'INVALID_CONFIG', message: expect.stringMatching(/not valid JSON/) });
    await rm(join(dir, 'config.json'));
    expect(await codeAndMessage(loadModelFolder(dir))).toMatchObject({ code: 'NOT_FOUND', message: expect.stringContaining('config.json') });
    expect(await codeAndMessage(loadModelFolder(join(root, 'no-such-model')))).toMatchObject({ code: 'NOT_FOUND' });
  });
});

describe('expected tensors', () => {
  it('lists embeddings, 9 tensors per layer, the final norm and an untied lm_head', () => {
    const names = expectedTensorNames(micro);
    expect(names).toHaveLength(1 + 9 * 2 + 1 + 1);
    expect(names[0]).toBe('model.embed_tokens.weight');
    expect(names).toContain('model.layers.1.mlp.down_proj.weight');
    expect(names.at(-1)).toBe('lm_head.weight');
    expect(expectedTensorShapes(micro).get('model.layers.0.self_attn.k_proj.weight')).toEqual([4, 8]);
    expect(expectedTensorShapes(micro).get('model.layers.0.mlp.down_proj.weight')).toEqual([8, 16]);
    expect(expectedTensorNames({ ...micro, tieWordEmbeddings: true })).not.toContain('lm_head.weight');
  });
});

describe('weights', () => {
  it('loads a single-file model', async () => {
    const dir = await newFolder();
    await writeSafetensors(join(dir, 'model.safetensors'), tensorsOf(micro));
    await writeFile(join(dir, 'tokenizer.json'), '{}');
    const folder = await loadModelFolder(dir);
    expect(folder.shards).toEqual([join(dir, 'model.safetensors')]);
    expect(folder.weightMap.get('lm_head.weight')).toBe(join(dir, 'model.safetensors'));
    expect(folder.weightMap.size).toBe(expectedTensorNames(micro).length);
    expect(folder.tokenizerFiles).toEqual([join(dir, 'tokenizer.json')]);
  });

  async function shardedFolder(indexShardFor: (name: string, index: number) => string = (_, i) => (i < 10 ? 'a.safetensors' : 'b.safetensors')) {
    const dir = await newFolder();
    const tensors = tensorsOf(micro);
    await writeSafetensors(join(dir, 'a.safetensors'), tensors.slice(0, 10));
    await writeSafetensors(join(dir, 'b.safetensors'), tensors.slice(10));
    const weightMap = Object.fromEntries(tensors.map((t, i) => [t.name, indexShardFor(t.name, i)]));
    await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }));
    return dir;
  }

  it('loads a sharded model through its index', async () => {
    const dir = await shardedFolder();
    const folder = await loadModelFolder(dir);
    expect(folder.shards).toEqual([join(dir, 'a.safetensors'), join(dir, 'b.safetensors')]);
    expect(folder.weightMap.get('model.embed_tokens.weight')).toBe(join(dir, 'a.safetensors'));
    expect(folder.weightMap.get('lm_head.weight')).toBe(join(dir, 'b.safetensors'));
  });

  it('refuses an index entry that points outside the folder', async () => {
    const outside = await shardedFolder((name, i) => (i === 3 ? '../model-0/model.safetensors' : i < 10 ? 'a.safetensors' : 'b.safetensors'));
    expect(await codeAndMessage(loadModelFolder(outside))).toMatchObject({ code: 'INVALID_CONFIG', message: expect.stringMatching(/"\.\.\/model-0\/model\.safetensors" points outside the model folder/) });
    const absolute = await shardedFolder((name, i) => (i === 0 ? '/etc/passwd' : i < 10 ? 'a.safetensors' : 'b.safetensors'));
    expect(await codeAndMessage(loadModelFolder(absolute))).toMatchObject({ code: 'INVALID_CONFIG', message: expect.stringMatching(/"\/etc\/passwd" is not a file name inside the folder/) });
  });

  it('refuses a shard that is a symlink to a file outside the folder', async () => {
    const dir = await shardedFolder();
    const target = join(root, 'outside.safetensors');
    await writeSafetensors(target, tensorsOf(micro).slice(10));
    await rm(join(dir, 'b.safetensors'));
    await symlink(target, join(dir, 'b.safetensors'));
    expect(await codeAndMessage(loadModelFolder(dir))).toMatchObject({ code: 'INVALID_CONFIG', message: expect.stringMatching(/links outside the model folder/) });
  });

  it('refuses an index naming a missing shard', async () => {
    const dir = await shardedFolder((name, i) => (i === 12 ? 'c.safetensors' : i < 10 ? 'a.safetensors' : 'b.safetensors'));
    expect(await codeAndMessage(loadModelFolder(dir))).toMatchObject({ code: 'NOT_FOUND', message: expect.stringMatching(/shard "c\.safetensors" does not exist/) });
  });

  it('refuses an index that maps a tensor to the wrong shard', async () => {
    const dir = await shardedFolder((name, i) => (i === 2 || i >= 10 ? 'b.safetensors' : 'a.safetensors'));
    expect(await codeAndMessage(loadModelFolder(dir))).toMatchObject({ code: 'INVALID_MODEL', message: expect.stringMatching(/is mapped to .*b\.safetensors but that file does not hold it/) });
  });

  it('names a missing tensor', async () => {
    const dir = await newFolder();
    await writeSafetensors(join(dir, 'model.safetensors'), tensorsOf(micro, 'BF16', ['model.layers.1.self_attn.v_proj.weight']));
    expect(await codeAndMessage(loadModelFolder(dir))).toMatchObject({ code: 'INVALID_MODEL', message: expect.stringMatching(/tensor "model\.layers\.1\.self_attn\.v_proj\.weight" is missing/) });
  });

  it('names a tensor whose shape does not match config.json', async () => {
    const dir = await newFolder();
    await writeSafetensors(join(dir, 'model.safetensors'), tensorsOf(micro, 'F32', [], { 'model.layers.0.mlp.up_proj.weight': [16, 4] }));
    expect(await codeAndMessage(loadModelFolder(dir))).toMatchObject({ code: 'INVALID_MODEL', message: expect.stringMatching(/"model\.layers\.0\.mlp\.up_proj\.weight" has shape \[16, 4\], config\.json implies \[16, 8\]/) });
  });

  it('reports a corrupt shard as INVALID_SAFETENSORS and no weights as NOT_FOUND', async () => {
    const dir = await newFolder();
    await writeFile(join(dir, 'model.safetensors'), Buffer.from([1, 2, 3]));
    expect(await codeAndMessage(loadModelFolder(dir))).toMatchObject({ code: 'INVALID_SAFETENSORS' });
    await rm(join(dir, 'model.safetensors'));
    expect(await codeAndMessage(loadModelFolder(dir))).toMatchObject({ code: 'NOT_FOUND', message: expect.stringMatching(/no model\.safetensors or model\.safetensors\.index\.json/) });
  });
});

describe('the tokenizer against config.json', () => {
  /** A folder with the real Llama 3 tokenizer files and a Llama 3 config (no weights: fromFolder reads none). */
  async function tokenizerFolder(overrides: Record<string, unknown> = {}, tokenizerJson?: object): Promise<string> {
    const dir = await newFolder({ ...microConfig, vocab_size: 128256, bos_token_id: 128000, eos_token_id: [128001, 128008, 128009], ...overrides });
    const files = llama3TokenizerFiles();
    if (tokenizerJson === undefined) await copyFile(files.tokenizerJson, join(dir, 'tokenizer.json'));
    else await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    await copyFile(files.tokenizerConfig, join(dir, 'tokenizer_config.json'));
    return dir;
  }

  it('loads a tokenizer that matches: vocab_size, bos and every eos id agree', async () => {
    const tokenizer = await LlamaTokenizer.fromFolder(await tokenizerFolder());
    expect(tokenizer.vocabSize).toBe(128256);
  }, 60_000);

  const mismatches: Array<[string, Record<string, unknown>, string, RegExp, number, number]> = [
    ['the config of another model (Llama 2)', { vocab_size: 32000, bos_token_id: 1, eos_token_id: 2 }, 'vocab_size', /vocab_size is 32000 but the tokenizer has 128256 tokens/, 32000, 128256],
    ['a padded vocab_size', { vocab_size: 128320 }, 'vocab_size', /vocab_size is 128320 but the tokenizer has 128256 tokens/, 128320, 128256],
    ['a bos_token_id that is not <|begin_of_text|>', { bos_token_id: 1 }, 'bos_token_id', /bos_token_id is 1 \("\\""\) but the tokenizer's <\|begin_of_text\|> is 128000/, 1, 128000],
    ['an eos_token_id that is a text token', { eos_token_id: 2 }, 'eos_token_id', /eos_token_id 2 \("#"\) is not a control token of the tokenizer \(its <\|eot_id\|> is 128009\)/, 2, 128009],
  ];
  for (const [name, overrides, field, message, configValue, tokenizerValue] of mismatches) {
    it(`refuses ${name}, naming both values`, async () => {
      const dir = await tokenizerFolder(overrides);
      const error = await LlamaTokenizer.fromFolder(dir).then(() => null, (e: unknown) => e);
      expect(error).toMatchObject({ code: 'INVALID_CONFIG', details: { file: join(dir, 'config.json'), field, configValue, tokenizerValue } });
      expect((error as Error).message).toMatch(new RegExp(`^the tokenizer does not match ${join(dir, 'config.json').replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: `));
      expect((error as Error).message).toMatch(message);
    }, 60_000);
  }

  it('Engine.load refuses a model whose tokenizer lacks tokens its embedding has', async () => {
    const made = await makeModel({ preset: 'tiny', outDir: join(root, 'tiny-short-tokenizer'), seed: 1 });
    const json = JSON.parse(await readFile(llama3TokenizerFiles().tokenizerJson, 'utf8')) as { added_tokens: Array<{ id: number }> };
    json.added_tokens = json.added_tokens.filter((token) => token.id < 128250);
    await writeFile(join(made.dir, 'tokenizer.json'), JSON.stringify(json));
    expect(await codeAndMessage(Engine.load(made.dir, { quant: 'none', device: 'cpu', log: () => {} }))).toMatchObject({
      code: 'INVALID_CONFIG',
      message: expect.stringMatching(/config\.json: vocab_size is 128256 but the tokenizer has 128250 tokens$/),
    });
  }, 120_000);
});
