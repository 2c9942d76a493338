// A Hugging Face Llama model folder, loaded and checked before any weight is read: config.json into a
// typed LlamaConfig, the safetensors shard list (single file or index), the expected tensor names and
// shapes, generation_config.json's stop ids, the tokenizer files, and whether the tokenizer belongs
// to the model (checkTokenizerMatchesConfig).

import { readFile, realpath, stat } from 'node:fs/promises';
import { isAbsolute, join, relative, resolve, sep } from 'node:path';
import { EngineError } from './errors.js';
import { verifyModelManifest } from './integrity.js';
import { readSafetensorsHeader, type SafetensorsHeader } from './safetensors.js';

export interface RopeScaling {
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

export type TorchDtype = 'float32' | 'bfloat16' | 'float16';

export interface LlamaConfig {
  hiddenSize: number; // H
  intermediateSize: number; // I
  numLayers: number; // L
  numHeads: number; // NH
  numKvHeads: number; // NKV
  headDim: number; // D: config head_dim, or hidden_size / num_attention_heads
  vocabSize: number; // V
  rmsNormEps: number;
  ropeTheta: number;
  /** null: plain RoPE; otherwise Llama 3.1's "llama3" frequency scaling (REFERENCE.md). */
  ropeScaling: RopeScaling | null;
  tieWordEmbeddings: boolean;
  maxPositionEmbeddings: number;
  bosTokenId: number;
  /** config.json's eos_token_id(s), then generation_config.json's, without repeats. */
  eosTokenIds: number[];
  torchDtype: TorchDtype;
}

export interface ModelFolder {
  /** Absolute path of the folder. */
  dir: string;
  config: LlamaConfig;
  /** Absolute paths of the safetensors files, in index order (one entry for a single-file model). */
  shards: string[];
  /** Tensor name → absolute path of the shard holding it. */
  weightMap: Map<string, string>;
  /** Absolute paths of the tokenizer files present (tokenizer.json, tokenizer_config.json, ...). */
  tokenizerFiles: string[];
}

export const LLAMA_LINEAR_MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type LlamaLinearModule = (typeof LLAMA_LINEAR_MODULES)[number];

/** Files copied along with a model (merge output, make-model) and read by the tokenizer. */
export const TOKENIZER_FILE_NAMES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'] as const;

// ---------------------------------------------------------------------------------------------
// config.json

type Json = Record<string, unknown>;

class ConfigReader {
  constructor(
    readonly file: string,
    readonly json: Json,
  ) {}

  fail(field: string, problem: string): EngineError {
    return new EngineError('INVALID_CONFIG', `${this.file}: "${field}" ${problem}`, { file: this.file, field });
  }

  has(field: string): boolean {
    return this.json[field] !== undefined && this.json[field] !== null;
  }

  positiveInteger(field: string, fallback?: number): number {
    const value = this.json[field];
    if (value === undefined || value === null) {
      if (fallback !== undefined) return fallback;
      throw this.fail(field, 'is missing');
    }
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) throw this.fail(field, `must be a positive integer, got ${JSON.stringify(value)}`);
    return value;
  }

  positiveNumber(field: string, fallback: number): number {
    const value = this.json[field];
    if (value === undefined || value === null) return fallback;
    if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) throw this.fail(field, `must be a positive number, got ${JSON.stringify(value)}`);
    return value;
  }

  boolean(field: string, fallback: boolean): boolean {
    const value = this.json[field];
    if (value === undefined || value === null) return fallback;
    if (typeof value !== 'boolean') throw this.fail(field, `must be true or false, got ${JSON.stringify(value)}`);
    return value;
  }

  /** A token id or a list of them (eos_token_id is either in Hugging Face configs). */
  tokenIds(field: string): number[] {
    const value = this.json[field];
    if (value === undefined || value === null) return [];
    const list = Array.isArray(value) ? value : [value];
    if (!list.every((id) => Number.isSafeInteger(id) && (id as number) >= 0)) throw this.fail(field, `must be a token id or a list of token ids, got ${JSON.stringify(value)}`);
    return list as number[];
  }
}

async function readJsonObject(file: string): Promise<Json> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    const missing = (error as { code?: string }).code === 'ENOENT';
    throw new EngineError(missing ? 'NOT_FOUND' : 'IO_ERROR', `${missing ? 'missing' : 'cannot read'} ${file}`, { file }, { cause: error });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw new EngineError('INVALID_CONFIG', `${file}: not valid JSON (${(error as Error).message})`, { file }, { cause: error });
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw new EngineError('INVALID_CONFIG', `${file}: not a JSON object`, { file });
  return parsed as Json;
}

/**
 * Parses config.json (and generation_config.json's eos ids when given). Optional fields take
 * transformers' LlamaConfig defaults; the structural ones (sizes, layers, heads, vocab) are required.
 */
export function parseLlamaConfig(json: Record<string, unknown>, file = 'config.json', generation?: { json: Record<string, unknown>; file: string }): LlamaConfig {
  const reader = new ConfigReader(file, json);
  const modelType = json.model_type;
  if (modelType !== 'llama') throw reader.fail('model_type', `must be "llama", got ${JSON.stringify(modelType)}`);
  if (reader.has('architectures')) {
    const architectures = json.architectures;
    if (!Array.isArray(architectures) || !architectures.includes('LlamaForCausalLM')) {
      throw reader.fail('architectures', `must include "LlamaForCausalLM", got ${JSON.stringify(architectures)}`);
    }
  }
  if (reader.has('hidden_act') && json.hidden_act !== 'silu') throw reader.fail('hidden_act', `must be "silu", got ${JSON.stringify(json.hidden_act)}`);
  for (const field of ['attention_bias', 'mlp_bias']) {
    if (reader.boolean(field, false)) throw reader.fail(field, 'is true; biases are not supported (Llama 3 has none)');
  }

  const hiddenSize = reader.positiveInteger('hidden_size');
  const intermediateSize = reader.positiveInteger('intermediate_size');
  const numLayers = reader.positiveInteger('num_hidden_layers');
  const numHeads = reader.positiveInteger('num_attention_heads');
  const numKvHeads = reader.positiveInteger('num_key_value_heads', numHeads);
  const vocabSize = reader.positiveInteger('vocab_size');
  if (numHeads % numKvHeads !== 0) throw reader.fail('num_key_value_heads', `(${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  let headDim: number;
  if (reader.has('head_dim')) {
    headDim = reader.positiveInteger('head_dim');
  } else {
    if (hiddenSize % numHeads !== 0) throw reader.fail('hidden_size', `(${hiddenSize}) is not a multiple of num_attention_heads (${numHeads}) and head_dim is absent`);
    headDim = hiddenSize / numHeads;
  }
  if (headDim % 2 !== 0) throw reader.fail('head_dim', `(${headDim}) must be even for rotary embeddings`);

  const maxPositionEmbeddings = reader.positiveInteger('max_position_embeddings', 2048);
  const bosFromConfig = reader.tokenIds('bos_token_id');
  const generationReader = generation === undefined ? undefined : new ConfigReader(generation.file, generation.json);
  const bosTokenId = bosFromConfig[0] ?? generationReader?.tokenIds('bos_token_id')[0];
  if (bosTokenId === undefined) throw reader.fail('bos_token_id', 'is missing');
  const eosTokenIds = [...new Set([...reader.tokenIds('eos_token_id'), ...(generationReader?.tokenIds('eos_token_id') ?? [])])];
  if (eosTokenIds.length === 0) throw reader.fail('eos_token_id', 'is missing (in config.json and generation_config.json)');
  for (const id of [bosTokenId, ...eosTokenIds]) {
    if (id >= vocabSize) throw reader.fail(id === bosTokenId ? 'bos_token_id' : 'eos_token_id', `(${id}) is not below vocab_size (${vocabSize})`);
  }

  // transformers ≥ 4.56 writes "dtype"; older versions "torch_dtype".
  const dtypeField = reader.has('torch_dtype') ? 'torch_dtype' : 'dtype';
  const dtypeValue = json[dtypeField] ?? 'float32';
  if (dtypeValue !== 'float32' && dtypeValue !== 'bfloat16' && dtypeValue !== 'float16') {
    throw reader.fail(dtypeField, `must be "float32", "bfloat16" or "float16", got ${JSON.stringify(dtypeValue)}`);
  }

  return {
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    vocabSize,
    rmsNormEps: reader.positiveNumber('rms_norm_eps', 1e-6),
    ropeTheta: reader.positiveNumber('rope_theta', 10000),
    ropeScaling: parseRopeScaling(reader, maxPositionEmbeddings),
    tieWordEmbeddings: reader.boolean('tie_word_embeddings', false),
    maxPositionEmbeddings,
    bosTokenId,
    eosTokenIds,
    torchDtype: dtypeValue,
  };
}

function parseRopeScaling(reader: ConfigReader, maxPositionEmbeddings: number): RopeScaling | null {
  const raw = reader.json.rope_scaling;
  if (raw === undefined || raw === null) return null;
  if (typeof raw !== 'object' || Array.isArray(raw)) throw reader.fail('rope_scaling', 'must be an object or null');
  const scaling = new ConfigReader(reader.file, raw as Json);
  // transformers reads "rope_type", and "type" from configs written before it was renamed.
  const ropeType = scaling.json.rope_type ?? scaling.json.type;
  if (ropeType === 'default') return null;
  if (ropeType !== 'llama3') {
    throw reader.fail('rope_scaling', `has rope_type ${JSON.stringify(ropeType)}; only "llama3" (or no rope_scaling) is supported`);
  }
  const field = (name: string) => `rope_scaling.${name}`;
  const number = (name: string): number => {
    const value = scaling.json[name];
    if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) throw reader.fail(field(name), value === undefined ? 'is missing' : `must be a positive number, got ${JSON.stringify(value)}`);
    return value;
  };
  const factor = number('factor');
  const lowFreqFactor = number('low_freq_factor');
  const highFreqFactor = number('high_freq_factor');
  const originalMaxPositionEmbeddings = number('original_max_position_embeddings');
  if (!Number.isSafeInteger(originalMaxPositionEmbeddings)) throw reader.fail(field('original_max_position_embeddings'), 'must be an integer');
  // The blend divides by (high − low): equal factors would divide by zero.
  if (!(highFreqFactor > lowFreqFactor)) throw reader.fail(field('high_freq_factor'), `(${highFreqFactor}) must exceed low_freq_factor (${lowFreqFactor})`);
  if (originalMaxPositionEmbeddings > maxPositionEmbeddings) {
    throw reader.fail(field('original_max_position_embeddings'), `(${originalMaxPositionEmbeddings}) exceeds max_position_embeddings (${maxPositionEmbeddings})`);
  }
  return { factor, lowFreqFactor, highFreqFactor, originalMaxPositionEmbeddings };
}

// ---------------------------------------------------------------------------------------------
// the tokenizer against config.json

/** What checkTokenizerMatchesConfig reads of a tokenizer (LlamaTokenizer has it). */
export interface TokenizerFacts {
  /** Ids that have a token (base vocabulary plus added tokens). */
  vocabSize: number;
  specialIds: { bos: number; eot: number };
  idToToken(id: number): string | undefined;
  /** Whether the id is an added (control) token rather than a piece of text. */
  isControlToken(id: number): boolean;
}

/**
 * Refuses a tokenizer that does not belong to the model (the classic fine-tuning pitfall: the ids
 * mean something else to the embedding table). INVALID_CONFIG naming both values when:
 *   - the tokenizer's vocabulary size differs from config.json's vocab_size (ids beyond the
 *     embedding, or embedding rows no token reaches);
 *   - config.json's bos_token_id is not the tokenizer's <|begin_of_text|>;
 *   - an eos_token_id of config.json / generation_config.json is not one of the tokenizer's
 *     control tokens (a Llama 2 config's eos 2 is the text token "#" to a Llama 3 tokenizer).
 */
export function checkTokenizerMatchesConfig(tokenizer: TokenizerFacts, config: LlamaConfig, configFile: string): void {
  const fail = (field: string, problem: string, values: Record<string, unknown>) =>
    new EngineError('INVALID_CONFIG', `the tokenizer does not match ${configFile}: ${problem}`, { file: configFile, field, ...values });
  const named = (id: number) => `${id} (${JSON.stringify(tokenizer.idToToken(id) ?? 'no token')})`;
  if (tokenizer.vocabSize !== config.vocabSize) {
    throw fail('vocab_size', `vocab_size is ${config.vocabSize} but the tokenizer has ${tokenizer.vocabSize} tokens`, { configValue: config.vocabSize, tokenizerValue: tokenizer.vocabSize });
  }
  if (config.bosTokenId !== tokenizer.specialIds.bos) {
    throw fail('bos_token_id', `bos_token_id is ${named(config.bosTokenId)} but the tokenizer's <|begin_of_text|> is ${tokenizer.specialIds.bos}`, {
      configValue: config.bosTokenId,
      tokenizerValue: tokenizer.specialIds.bos,
    });
  }
  for (const id of config.eosTokenIds) {
    if (!tokenizer.isControlToken(id)) {
      throw fail('eos_token_id', `eos_token_id ${named(id)} is not a control token of the tokenizer (its <|eot_id|> is ${tokenizer.specialIds.eot})`, {
        configValue: id,
        tokenizerValue: tokenizer.specialIds.eot,
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// expected weights

/** Every tensor a Llama checkpoint of this config holds, with its [out, in] (or [n]) shape. */
export function expectedTensorShapes(config: LlamaConfig): Map<string, number[]> {
  const { hiddenSize: H, intermediateSize: I, numHeads: NH, numKvHeads: NKV, headDim: D, vocabSize: V } = config;
  const shapes = new Map<string, number[]>();
  shapes.set('model.embed_tokens.weight', [V, H]);
  for (let layer = 0; layer < config.numLayers; layer++) {
    const prefix = `model.layers.${layer}`;
    shapes.set(`${prefix}.input_layernorm.weight`, [H]);
    shapes.set(`${prefix}.self_attn.q_proj.weight`, [NH * D, H]);
    shapes.set(`${prefix}.self_attn.k_proj.weight`, [NKV * D, H]);
    shapes.set(`${prefix}.self_attn.v_proj.weight`, [NKV * D, H]);
    shapes.set(`${prefix}.self_attn.o_proj.weight`, [H, NH * D]);
    shapes.set(`${prefix}.post_attention_layernorm.weight`, [H]);
    shapes.set(`${prefix}.mlp.gate_proj.weight`, [I, H]);
    shapes.set(`${prefix}.mlp.up_proj.weight`, [I, H]);
    shapes.set(`${prefix}.mlp.down_proj.weight`, [H, I]);
  }
  shapes.set('model.norm.weight', [H]);
  if (!config.tieWordEmbeddings) shapes.set('lm_head.weight', [V, H]);
  return shapes;
}

/** The names of expectedTensorShapes, in checkpoint order (embeddings, layers, norm, lm_head). */
export function expectedTensorNames(config: LlamaConfig): string[] {
  return [...expectedTensorShapes(config).keys()];
}

/** Shape of one linear module's weight, [out, in]. */
export function linearShape(config: LlamaConfig, module: LlamaLinearModule): [number, number] {
  const { hiddenSize: H, intermediateSize: I, numHeads: NH, numKvHeads: NKV, headDim: D } = config;
  switch (module) {
    case 'q_proj':
      return [NH * D, H];
    case 'k_proj':
    case 'v_proj':
      return [NKV * D, H];
    case 'o_proj':
      return [H, NH * D];
    case 'gate_proj':
    case 'up_proj':
      return [I, H];
    case 'down_proj':
      return [H, I];
  }
}

// ---------------------------------------------------------------------------------------------
// the folder

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/** Resolves `name` (from an index) inside `dir`, refusing absolute paths and escapes (also via symlinks). */
async function shardPathInside(dir: string, realDir: string, name: string, indexFile: string): Promise<string> {
  if (name.length === 0 || isAbsolute(name) || name.includes('\0')) {
    throw new EngineError('INVALID_CONFIG', `${indexFile}: shard name ${JSON.stringify(name)} is not a file name inside the folder`, { file: indexFile, shard: name });
  }
  const path = resolve(dir, name);
  const escapes = (from: string, to: string) => {
    const rel = relative(from, to);
    return rel === '' || rel.startsWith(`..${sep}`) || rel === '..' || isAbsolute(rel);
  };
  if (escapes(dir, path)) {
    throw new EngineError('INVALID_CONFIG', `${indexFile}: shard ${JSON.stringify(name)} points outside the model folder`, { file: indexFile, shard: name });
  }
  if (!(await isFile(path))) throw new EngineError('NOT_FOUND', `${indexFile}: shard ${JSON.stringify(name)} does not exist`, { file: indexFile, shard: name });
  if (escapes(realDir, await realpath(path))) {
    throw new EngineError('INVALID_CONFIG', `${indexFile}: shard ${JSON.stringify(name)} links outside the model folder`, { file: indexFile, shard: name });
  }
  return path;
}

/**
 * Loads and checks a model folder: config.json (+ generation_config.json), the weights (a single
 * model.safetensors or model.safetensors.index.json with its shards), every shard's header, and that
 * every tensor the config implies is present with the right shape. A folder tuneserve stored (it has
 * tuneserve-manifest.json) is also checked byte for byte against its manifest (integrity.ts), unless
 * `verify` is false (a caller that has just written and digested it).
 */
export async function loadModelFolder(dirArgument: string, options: { verify?: boolean } = {}): Promise<ModelFolder> {
  const dir = resolve(dirArgument);
  let realDir: string;
  try {
    if (!(await stat(dir)).isDirectory()) throw new Error('not a directory');
    realDir = await realpath(dir);
  } catch (error) {
    throw new EngineError('NOT_FOUND', `model folder ${dir} does not exist or is not a folder`, { dir }, { cause: error });
  }

  const configFile = join(dir, 'config.json');
  const configJson = await readJsonObject(configFile);
  const config = parseLlamaConfig(configJson, configFile, await readGenerationConfig(dir));

  const indexFile = join(dir, 'model.safetensors.index.json');
  const singleFile = join(dir, 'model.safetensors');
  const shards: string[] = [];
  const indexMap = new Map<string, string>();
  if (await isFile(indexFile)) {
    const index = await readJsonObject(indexFile);
    const weightMap = index.weight_map;
    if (weightMap === null || typeof weightMap !== 'object' || Array.isArray(weightMap)) {
      throw new EngineError('INVALID_CONFIG', `${indexFile}: "weight_map" must be an object of tensor name → shard file`, { file: indexFile, field: 'weight_map' });
    }
    const shardByName = new Map<string, string>();
    for (const [tensor, shardName] of Object.entries(weightMap as Json)) {
      if (typeof shardName !== 'string') {
        throw new EngineError('INVALID_CONFIG', `${indexFile}: weight_map["${tensor}"] must be a file name`, { file: indexFile, field: 'weight_map', tensor });
      }
      let shardPath = shardByName.get(shardName);
      if (shardPath === undefined) {
        shardPath = await shardPathInside(dir, realDir, shardName, indexFile);
        shardByName.set(shardName, shardPath);
        shards.push(shardPath);
      }
      indexMap.set(tensor, shardPath);
    }
    if (shards.length === 0) throw new EngineError('INVALID_CONFIG', `${indexFile}: "weight_map" is empty`, { file: indexFile, field: 'weight_map' });
  } else if (await isFile(singleFile)) {
    shards.push(singleFile);
  } else {
    throw new EngineError('NOT_FOUND', `${dir}: no model.safetensors or model.safetensors.index.json`, { dir });
  }

  // The headers are small; reading them all here turns a wrong shard into an error now rather
  // than halfway through loading gigabytes.
  const headers = new Map<string, SafetensorsHeader>();
  for (const shard of shards) headers.set(shard, await readSafetensorsHeader(shard));
  const weightMap = new Map<string, string>();
  for (const [shard, header] of headers) {
    for (const tensor of header.tensors.keys()) {
      const other = weightMap.get(tensor);
      if (other !== undefined) throw new EngineError('INVALID_MODEL', `tensor "${tensor}" is in both ${other} and ${shard}`, { tensor });
      weightMap.set(tensor, shard);
    }
  }
  for (const [tensor, shard] of indexMap) {
    if (weightMap.get(tensor) !== shard) {
      throw new EngineError('INVALID_MODEL', `${indexFile}: tensor "${tensor}" is mapped to ${shard} but that file does not hold it`, { file: indexFile, tensor });
    }
  }

  for (const [tensor, shape] of expectedTensorShapes(config)) {
    const shard = weightMap.get(tensor);
    if (shard === undefined) throw new EngineError('INVALID_MODEL', `${dir}: tensor "${tensor}" is missing from the weights`, { dir, tensor });
    const entry = headers.get(shard)!.tensors.get(tensor)!;
    if (entry.shape.length !== shape.length || entry.shape.some((dim, i) => dim !== shape[i])) {
      throw new EngineError('INVALID_MODEL', `${shard}: tensor "${tensor}" has shape [${entry.shape.join(', ')}], config.json implies [${shape.join(', ')}]`, { tensor });
    }
    if (entry.dtype !== 'F32' && entry.dtype !== 'BF16' && entry.dtype !== 'F16') {
      throw new EngineError('INVALID_MODEL', `${shard}: tensor "${tensor}" has dtype ${entry.dtype}; F32, BF16 or F16 are supported`, { tensor });
    }
  }

  if (options.verify !== false) await verifyModelManifest(dir);

  const tokenizerFiles: string[] = [];
  for (const name of TOKENIZER_FILE_NAMES) {
    const path = join(dir, name);
    if (await isFile(path)) tokenizerFiles.push(path);
  }
  return { dir, config, shards, weightMap, tokenizerFiles };
}

/** Reads and parses only the config (no weights): for tools that need sizes before loading. */
export async function readLlamaConfig(dirArgument: string): Promise<LlamaConfig> {
  const dir = resolve(dirArgument);
  const configFile = join(dir, 'config.json');
  return parseLlamaConfig(await readJsonObject(configFile), configFile, await readGenerationConfig(dir));
}

async function readGenerationConfig(dir: string): Promise<{ json: Json; file: string } | undefined> {
  const file = join(dir, 'generation_config.json');
  return (await isFile(file)) ? { json: await readJsonObject(file), file } : undefined;
}
