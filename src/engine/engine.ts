// The TypeScript face of the engine: one loaded base model (folder + tokenizer + native weights),
// adapters in slots (PEFT folders in and out), training, generation and logits. Every long operation
// runs on the native executor thread; this class validates inputs and translates to/from it.

import { createHash } from 'node:crypto';
import { rm, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';

import { EngineError, toEngineError } from './errors.js';
import { loadModelFolder, type LlamaConfig, type ModelFolder } from './model-folder.js';
import {
  native, type GuardSettings, type NativeAdapterState, type NativeEngine, type NativeLoraSpec, type NativeModelConfig, type NativePoolStats,
  type NativeServingPolicy, type NativeStepReport, type NativeTrainExample, type NativeTrainHyper, type NativeTrainingPlan,
} from './native.js';
import { ADAPTER_WEIGHTS_FILE, adapterConfigJson, loraTensorShapes, readAdapterConfig, writeAdapterConfig, type LoraConfig } from './peft-config.js';
import { encodeSafetensors } from './safetensors.js';
import { LlamaTokenizer } from './tokenizer.js';
import { awaitCancellable } from './cancel.js';
import { resolveDevice, type Device, type DeviceChoice } from './device.js';
import { replaceFolder, tempFolderBeside } from './atomic-file.js';

export type Quantization = 'none' | 'nf4';

export interface EngineOptions {
  quant?: Quantization;
  device?: DeviceChoice;
  /** CUDA: bf16 activations with float32 accumulation (default), or float32 throughout (the check mode). */
  cudaCompute?: 'bf16' | 'f32';
  threads?: number;
  maxActiveSequences?: number;
  /** Longest prompt + completion of one generation, in tokens (default: max_position_embeddings). */
  maxSeqLen?: number;
  /** Device slots of the engine's adapter pool, serving and training together. */
  adapterSlots?: number;
  /** Bytes of the pool's host tier (adapters kept in host memory out of a slot); 0 or absent: no limit. */
  adapterHostBytes?: number;
  /** How generation and training share the executor (see native/model/executor.h ServingPolicy). */
  servingPolicy?: Partial<NativeServingPolicy>;
  /** Size of the paged KV cache; default: a share of the memory left after weights and workspace. */
  kvCacheBytes?: number;
  /** Most a training job may take; default: what the device has free beside the serving pool. */
  trainingMemoryBytes?: number;
  /** Where to send the one-line notices (device fallback). Default: stderr. */
  log?: (line: string) => void;
  /** Check a stored folder against its manifest (integrity.ts); default true. */
  verifyIntegrity?: boolean;
}

export function nativeConfig(c: LlamaConfig): NativeModelConfig {
  return {
    H: c.hiddenSize, I: c.intermediateSize, L: c.numLayers, NH: c.numHeads, NKV: c.numKvHeads, D: c.headDim, V: c.vocabSize,
    rmsEps: c.rmsNormEps, ropeTheta: c.ropeTheta,
    ropeLlama3: c.ropeScaling !== null,
    ropeFactor: c.ropeScaling?.factor ?? 8,
    ropeLowFreqFactor: c.ropeScaling?.lowFreqFactor ?? 1,
    ropeHighFreqFactor: c.ropeScaling?.highFreqFactor ?? 4,
    ropeOriginalMaxPos: c.ropeScaling?.originalMaxPositionEmbeddings ?? 8192,
    tied: c.tieWordEmbeddings, maxPos: c.maxPositionEmbeddings,
  };
}

export function nativeLora(l: LoraConfig): NativeLoraSpec {
  return { r: l.r, alpha: l.alpha, dropout: l.dropout, rslora: l.useRslora, targets: [...l.targets] };
}

/** An adapter occupying a slot of the engine. */
export interface Adapter {
  readonly slot: number;
  readonly config: LoraConfig;
}

/** A training run's settings; the guard's are GuardSettings. */
export interface TrainHyperparameters extends GuardSettings {
  lr: number;
  steps?: number; // > 0 overrides epochs
  epochs: number;
  batchSize: number;
  gradAccum: number;
  scheduler: 'constant' | 'linear' | 'cosine';
  warmupSteps: number;
  weightDecay: number;
  maxGradNorm: number; // 0: no clipping
  seed: number;
  shuffle: boolean;
  gradientCheckpointing?: boolean;
  beta1?: number;
  beta2?: number;
  eps?: number;
  /** Held-out examples scored every evalEvery steps and after the last. */
  evalExamples?: readonly { ids: Int32Array; labels: Int32Array }[];
  evalEvery?: number;
  /** Stop after this many evaluations without an improvement of more than earlyStoppingMinDelta. */
  earlyStoppingPatience?: number;
  earlyStoppingMinDelta?: number;
  /** End with the weights of the best evaluation instead of the last. */
  keepBest?: boolean;
  /** General text scored with the base at the start and with the adapter at each evaluation. */
  forgettingExamples?: readonly { ids: Int32Array; labels: Int32Array }[];
  /**
   * Checkpoints go to <checkpointDir>/checkpoint-<step> every checkpointEvery steps, and at a cancel:
   * each a PEFT folder plus the optimizer and trainer state a resume continues from.
   */
  checkpointEvery?: number;
  checkpointDir?: string;
  /** A checkpoint folder to continue from; `adapter` must be loaded from it (resumeAdapter). */
  resumeFrom?: string;
}

export interface StepEvent extends NativeStepReport {
  tokensPerS: number;
  elapsedS: number;
  etaS: number;
}

export type { NativeAdapterState as AdapterState, NativePoolStats as PoolStats, NativeServingPolicy as ServingPolicy } from './native.js';

export interface TrainSummary {
  steps: number;
  finalLoss: number;
  evalLoss: number | null;
  tokens: number;
  seconds: number;
  cancelled: boolean;
  /** Early stopping ended the job. */
  stoppedEarly: boolean;
  /** The best evaluation (step 0 when there was none). */
  bestStep: number;
  bestEvalLoss: number | null;
  /** The forgetting set's mean token loss with the base, and with the adapter at the last evaluation. */
  forgettingBaseLoss: number | null;
  forgettingLoss: number | null;
  /** Guard interventions (skipped batches and rollbacks). */
  interventions: number;
  /** The checkpoint written when the job was cancelled, if any. */
  cancelCheckpoint: string | null;
}

export interface GenerateRequest {
  promptIds: readonly number[];
  adapter?: Adapter | null;
  maxTokens: number;
  temperature?: number;
  topK?: number;
  topP?: number;
  repetitionPenalty?: number;
  seed?: number;
  /** Default: the tokenizer's stop ids (eos, <|eot_id|>, <|eom_id|>, <|end_of_text|>). [] = none. */
  stopIds?: readonly number[];
}

export interface GenerateResult {
  ids: number[];
  finishReason: 'stop' | 'length' | 'cancelled';
  promptTokens: number;
  completionTokens: number;
  prefillSeconds: number;
  decodeSeconds: number;
}

export class Engine {
  private closed = false;

  private constructor(
    readonly folder: ModelFolder,
    readonly tokenizer: LlamaTokenizer,
    readonly native: NativeEngine,
    readonly quant: Quantization,
    readonly device: Device,
    readonly cudaCompute: 'bf16' | 'f32',
  ) {}

  get config(): LlamaConfig {
    return this.folder.config;
  }

  /** Loads a Hugging Face Llama folder (validated first) into the native engine. */
  static async load(dir: string, options: EngineOptions = {}): Promise<Engine> {
    const quant = options.quant ?? 'nf4';
    if (quant !== 'none' && quant !== 'nf4') throw new EngineError('INVALID_ARGUMENT', `quant must be nf4 or none, got ${String(quant)}`);
    const device = resolveDevice(options.device ?? 'auto', options.log);
    const folder = await loadModelFolder(dir, { verify: options.verifyIntegrity ?? true });
    const tokenizer = await LlamaTokenizer.fromFolder(folder.dir);
    const cudaCompute = options.cudaCompute ?? 'bf16';
    if (cudaCompute !== 'bf16' && cudaCompute !== 'f32') throw new EngineError('INVALID_ARGUMENT', `cuda compute must be bf16 or f32, got ${String(cudaCompute)}`, { field: 'cuda_compute' });
    const spec = {
      config: nativeConfig(folder.config), files: folder.shards, quant, device, float32Compute: cudaCompute === 'f32',
      ...(options.threads ? { threads: options.threads } : {}),
      ...(options.maxActiveSequences ? { maxActiveSequences: options.maxActiveSequences } : {}),
      ...(options.maxSeqLen ? { maxSeqLen: Math.min(options.maxSeqLen, folder.config.maxPositionEmbeddings) } : {}),
      ...(options.adapterSlots ? { adapterSlots: options.adapterSlots } : {}),
      ...(options.kvCacheBytes ? { kvCacheBytes: options.kvCacheBytes } : {}),
      ...(options.trainingMemoryBytes ? { trainingMemoryBytes: options.trainingMemoryBytes } : {}),
    };
    const engine = await native().loadModel(spec).catch((e: unknown) => { throw toEngineError(e); });
    try {
      if (options.adapterHostBytes) engine.setHostBudget(options.adapterHostBytes);
      if (options.servingPolicy) engine.setPolicy(options.servingPolicy);
    } catch (e) {
      engine.close();
      throw toEngineError(e);
    }
    return new Engine(folder, tokenizer, engine, quant, device, cudaCompute);
  }

  info() {
    return { ...this.native.info(), ...this.native.stats(), config: this.config, modelDir: this.folder.dir };
  }

  /**
   * The memory plan a training job would get now: batches of batchSize rows of seqLen tokens (the
   * longest), an adapter of `config`. A job whose plan does not fit is refused with RESOURCE_EXHAUSTED.
   */
  planTraining(config: LoraConfig, shape: { batchSize: number; seqLen: number; recompute?: boolean }): NativeTrainingPlan {
    for (const [field, v] of [['batch_size', shape.batchSize], ['seq_len', shape.seqLen]] as const) {
      if (!Number.isSafeInteger(v) || v <= 0) throw new EngineError('INVALID_ARGUMENT', `${field} must be a positive integer, got ${v}`, { field });
    }
    return this.call(() => this.native.planTraining({ ...shape, lora: nativeLora(config) }));
  }

  /** A fresh adapter (A kaiming-uniform from seed, B zero) in a new slot. */
  createAdapter(config: LoraConfig, seed: number): Adapter {
    return { slot: this.call(() => this.native.createAdapter(nativeLora(config), seed)), config };
  }

  /** Loads a PEFT adapter folder; ADAPTER_MISMATCH when its shapes do not fit this base. */
  async loadAdapter(dir: string): Promise<Adapter> {
    const { lora } = await readAdapterConfig(dir);
    const file = join(dir, ADAPTER_WEIGHTS_FILE);
    await stat(file).catch((e: unknown) => { throw new EngineError('NOT_FOUND', `missing ${file}`, { file }, { cause: e }); });
    const slot = await this.native.loadAdapter(nativeLora(lora), file).catch((e: unknown) => { throw toEngineError(e); });
    return { slot, config: lora };
  }

  /**
   * Writes the adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors). The folder
   * is built beside `dir` and renamed into place, so `dir` is never half-written.
   */
  async saveAdapter(adapter: Adapter, dir: string, options: { baseModelNameOrPath?: string | null } = {}): Promise<void> {
    const target = resolve(dir);
    const tmp = await tempFolderBeside(target);
    try {
      await writeAdapterConfig(tmp, adapter.config, { baseModelNameOrPath: options.baseModelNameOrPath ?? this.folder.dir });
      await this.native.saveAdapter(adapter.slot, join(tmp, ADAPTER_WEIGHTS_FILE)).catch((e: unknown) => { throw toEngineError(e); });
      await replaceFolder(tmp, target);
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw e;
    }
  }

  /**
   * Makes an adapter file known to the pool without reading it (the disk tier): its first use reads it
   * in the background. `config` must be the adapter's own (its adapter_config.json).
   */
  registerAdapter(config: LoraConfig, file: string): Adapter {
    return { slot: this.call(() => this.native.registerAdapter(nativeLora(config), file)), config };
  }

  /** Where an adapter made in memory (a trained one) can be read again after the host tier drops it. */
  setAdapterFile(adapter: Adapter, file: string): void {
    this.call(() => this.native.setAdapterFile(adapter.slot, file));
  }

  /** Brings an adapter into a device slot, reading its file first if needed; waits while every slot is busy. */
  async warmAdapter(adapter: Adapter, signal?: AbortSignal): Promise<void> {
    const job = this.call(() => this.native.warmAdapter(adapter.slot));
    await awaitCancellable(job.promise, () => this.native.cancel(job.id), signal).catch((e: unknown) => { throw toEngineError(e); });
  }

  /** Pinned adapters are never evicted; one slot always stays unpinned (FAILED_PRECONDITION otherwise). */
  pinAdapter(adapter: Adapter, pinned: boolean): void {
    this.call(() => this.native.pinAdapter(adapter.slot, pinned));
  }

  /** Every adapter the pool knows: tier, pin, users and counters. */
  adapterStates(): NativeAdapterState[] {
    return this.native.adapterStats();
  }

  poolStats(): NativePoolStats {
    return this.native.poolStats();
  }

  setServingPolicy(policy: Partial<NativeServingPolicy>): void {
    this.call(() => this.native.setPolicy(policy));
  }

  /**
   * The adapter's adapter_model.safetensors (float32, PEFT keys) built in memory from the pool's copy,
   * so a caller can hash it and write it without reading anything back.
   */
  async adapterSafetensors(adapter: Adapter): Promise<Uint8Array> {
    const tensors = await this.native.adapterTensors(adapter.slot).catch((e: unknown) => { throw toEngineError(e); });
    const specs = [...loraTensorShapes(this.config, adapter.config)].map(([name, shape]) => {
      const values = tensors[name];
      if (values === undefined) throw new EngineError('INTERNAL', `the engine's adapter has no tensor ${name}`);
      return { name, dtype: 'F32' as const, shape, values };
    });
    return encodeSafetensors(specs, { format: 'pt' });
  }

  removeAdapter(adapter: Adapter): void {
    this.native.removeAdapter(adapter.slot);
  }

  adapterTensors(adapter: Adapter): Promise<Record<string, Float32Array>> {
    return this.native.adapterTensors(adapter.slot);
  }

  /** Logits (T × V, row-major) of one sequence, with an adapter or the base alone. */
  async logits(ids: readonly number[], adapter: Adapter | null = null): Promise<Float32Array> {
    this.checkIds(ids, 'ids');
    return this.native.logits(Int32Array.from(ids), adapter?.slot ?? 0).catch((e: unknown) => { throw toEngineError(e); });
  }

  /**
   * Trains `adapter` in place on pre-tokenized examples; one event per optimizer step. Checkpoints are
   * written whole by the native trainer (a PEFT folder with optimizer and trainer state); a job resumed
   * from one (hyper.resumeFrom) continues exactly, and is refused (CHECKPOINT_MISMATCH) when its
   * configuration or data differ from the checkpoint's.
   */
  async train(
    adapter: Adapter,
    examples: readonly NativeTrainExample[],
    hyper: TrainHyperparameters,
    handlers: { onStep?: (event: StepEvent) => void; signal?: AbortSignal } = {},
  ): Promise<TrainSummary> {
    if (examples.length === 0) throw new EngineError('INVALID_DATASET', 'the training set has no examples');
    const positive = (v: number, field: string) => {
      if (!Number.isSafeInteger(v) || v <= 0) throw new EngineError('INVALID_ARGUMENT', `${field} must be a positive integer, got ${v}`, { field });
    };
    positive(hyper.batchSize, 'batch_size');
    positive(hyper.gradAccum, 'grad_accum');
    positive(hyper.epochs, 'epochs');
    if (!(hyper.lr >= 0) || !Number.isFinite(hyper.lr)) throw new EngineError('INVALID_ARGUMENT', `lr must be a finite number >= 0, got ${hyper.lr}`, { field: 'lr' });
    if (!(hyper.maxGradNorm >= 0)) throw new EngineError('INVALID_ARGUMENT', 'max_grad_norm must be >= 0', { field: 'max_grad_norm' });
    if (!(hyper.weightDecay >= 0)) throw new EngineError('INVALID_ARGUMENT', 'weight_decay must be >= 0', { field: 'weight_decay' });
    if (!(hyper.warmupSteps >= 0)) throw new EngineError('INVALID_ARGUMENT', 'warmup_steps must be >= 0', { field: 'warmup_steps' });
    if (!['constant', 'linear', 'cosine'].includes(hyper.scheduler)) throw new EngineError('INVALID_ARGUMENT', `scheduler must be constant, linear or cosine`, { field: 'scheduler' });
    for (const [field, policy] of [['nonfinite_policy', hyper.nonfinitePolicy], ['spike_policy', hyper.spikePolicy]] as const) {
      if (policy !== undefined && !['fail', 'skip', 'rollback'].includes(policy)) throw new EngineError('INVALID_ARGUMENT', `${field} must be fail, skip or rollback`, { field });
    }
    if (hyper.spikeFactor !== undefined && !(hyper.spikeFactor === 0 || hyper.spikeFactor > 1)) throw new EngineError('INVALID_ARGUMENT', 'spike_factor must be 0 (off) or above 1', { field: 'spike_factor' });
    for (const e of examples) this.checkIds(e.ids, 'input_ids');
    for (const e of hyper.evalExamples ?? []) this.checkIds(e.ids, 'eval input_ids');
    for (const e of hyper.forgettingExamples ?? []) this.checkIds(e.ids, 'forgetting input_ids');
    const nativeHyper: NativeTrainHyper = {
      lr: hyper.lr, beta1: hyper.beta1 ?? 0.9, beta2: hyper.beta2 ?? 0.999, eps: hyper.eps ?? 1e-8,
      weightDecay: hyper.weightDecay, maxGradNorm: hyper.maxGradNorm, scheduler: hyper.scheduler, warmupSteps: hyper.warmupSteps,
      batchSize: hyper.batchSize, gradAccum: hyper.gradAccum, epochs: hyper.epochs, maxSteps: hyper.steps ?? 0,
      seed: hyper.seed, shuffle: hyper.shuffle, recompute: hyper.gradientCheckpointing ?? true,
      padId: this.tokenizer.specialIds.endOfText,
      evalEvery: hyper.evalEvery ?? 0,
      earlyStoppingPatience: hyper.earlyStoppingPatience ?? 0,
      earlyStoppingMinDelta: hyper.earlyStoppingMinDelta ?? 0,
      keepBest: hyper.keepBest ?? false,
      checkpointEvery: hyper.checkpointDir ? hyper.checkpointEvery ?? 0 : 0,
      ...(hyper.checkpointDir ? { checkpointDir: hyper.checkpointDir } : {}),
      adapterConfigJson: `${JSON.stringify(adapterConfigJson(adapter.config, { baseModelNameOrPath: this.folder.dir }), null, 2)}\n`,
      configHash: trainingConfigHash(adapter.config, hyper),
      dataHash: examplesHash(examples),
      ...(hyper.resumeFrom ? { resumeFrom: hyper.resumeFrom } : {}),
      nonfinitePolicy: hyper.nonfinitePolicy ?? 'rollback',
      spikeFactor: hyper.spikeFactor ?? 0,
      spikePolicy: hyper.spikePolicy ?? 'skip',
      rollbackLrFactor: hyper.rollbackLrFactor ?? 0.5,
      maxInterventions: hyper.maxInterventions ?? 8,
      injectNonfiniteStep: hyper.injectNonfiniteStep ?? 0,
    };
    const started = performance.now();
    let tokens = 0;
    let evalLoss: number | null = null;
    let forgettingLoss: number | null = null;
    let forgettingBaseLoss: number | null = null;
    let interventions = 0;
    const job = this.native.train({
      slot: adapter.slot,
      examples: examples.map((e) => ({ ids: e.ids, labels: e.labels, ...(e.docStart ? { docStart: e.docStart } : {}) })),
      evalExamples: (hyper.evalExamples ?? []).map((e) => ({ ids: e.ids, labels: e.labels })),
      forgettingExamples: (hyper.forgettingExamples ?? []).map((e) => ({ ids: e.ids, labels: e.labels })),
      hyper: nativeHyper,
    }, (r) => {
      tokens += r.tokens;
      if (r.evalLoss !== undefined) evalLoss = r.evalLoss;
      if (r.forgettingLoss !== undefined) {
        forgettingLoss = r.forgettingLoss;
        forgettingBaseLoss = r.forgettingBaseLoss ?? null;
      }
      if (r.guardAction) interventions++;
      const elapsedS = (performance.now() - started) / 1000;
      const perStep = elapsedS / Math.max(1, r.step);
      handlers.onStep?.({ ...r, tokensPerS: r.seconds > 0 ? r.tokens / r.seconds : 0, elapsedS, etaS: perStep * (r.totalSteps - r.step) });
    });
    const last = await awaitCancellable(job.promise, () => this.native.cancel(job.id), handlers.signal);
    return {
      steps: last.step, finalLoss: last.loss, evalLoss: evalLoss ?? last.evalLoss ?? null, tokens, seconds: (performance.now() - started) / 1000, cancelled: last.cancelled,
      stoppedEarly: last.stoppedEarly === true, bestStep: last.bestStep ?? 0, bestEvalLoss: last.bestEvalLoss ?? null,
      forgettingBaseLoss, forgettingLoss, interventions, cancelCheckpoint: last.cancelled ? last.checkpoint ?? null : null,
    };
  }

  /** Loads the adapter of a checkpoint folder, to continue training it (train with hyper.resumeFrom). */
  resumeAdapter(checkpointDir: string): Promise<Adapter> {
    return this.loadAdapter(checkpointDir);
  }

  /** Generates from token ids; onTokens receives each step's new ids as they are sampled. */
  async generate(req: GenerateRequest, handlers: { onTokens?: (ids: number[]) => void; signal?: AbortSignal } = {}): Promise<GenerateResult> {
    this.checkIds(req.promptIds, 'prompt_ids');
    if (req.promptIds.length === 0) throw new EngineError('INVALID_ARGUMENT', 'the prompt is empty', { field: 'prompt' });
    if (!Number.isSafeInteger(req.maxTokens) || req.maxTokens < 1) throw new EngineError('INVALID_ARGUMENT', `max_tokens must be a positive integer, got ${req.maxTokens}`, { field: 'max_tokens' });
    const temperature = req.temperature ?? 0;
    const topP = req.topP ?? 1;
    const topK = req.topK ?? 0;
    const repetitionPenalty = req.repetitionPenalty ?? 1;
    if (!(temperature >= 0) || !Number.isFinite(temperature)) throw new EngineError('INVALID_ARGUMENT', 'temperature must be >= 0', { field: 'temperature' });
    if (!(topP > 0 && topP <= 1)) throw new EngineError('INVALID_ARGUMENT', 'top_p must be in (0, 1]', { field: 'top_p' });
    if (!Number.isSafeInteger(topK) || topK < 0) throw new EngineError('INVALID_ARGUMENT', 'top_k must be an integer >= 0', { field: 'top_k' });
    if (!(repetitionPenalty > 0) || !Number.isFinite(repetitionPenalty)) throw new EngineError('INVALID_ARGUMENT', 'repetition_penalty must be > 0', { field: 'repetition_penalty' });
    const seed = req.seed ?? 0;
    if (!Number.isSafeInteger(seed) || seed < 0) throw new EngineError('INVALID_ARGUMENT', 'seed must be a non-negative integer', { field: 'seed' });
    const job = this.native.generate(
      {
        slot: req.adapter?.slot ?? 0, promptIds: Int32Array.from(req.promptIds), maxTokens: req.maxTokens,
        temperature, topK, topP, repetitionPenalty, seed, stopIds: [...(req.stopIds ?? this.tokenizer.stopTokenIds)],
      },
      (ids) => handlers.onTokens?.(Array.from(ids)),
    );
    const r = await awaitCancellable(job.promise, () => this.native.cancel(job.id), handlers.signal);
    return { ids: Array.from(r.ids), finishReason: r.finishReason, promptTokens: r.promptTokens, completionTokens: r.ids.length, prefillSeconds: r.prefillSeconds, decodeSeconds: r.decodeSeconds };
  }

  /** Stops the executor and frees the weights. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.native.close();
  }

  private checkIds(ids: ArrayLike<number>, field: string): void {
    const V = this.config.vocabSize;
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      if (!Number.isInteger(id) || id < 0 || id >= V) throw new EngineError('INVALID_ARGUMENT', `${field}[${i}] = ${id} is not a token id of this model (0..${V - 1})`, { field });
    }
  }

  private call<T>(fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      throw toEngineError(e);
    }
  }
}

/**
 * A fingerprint of everything that decides a training run's numbers (the LoRA config and every
 * hyperparameter that changes the updates or the data order), so that a resume under other settings
 * is refused. Evaluation, checkpoint and guard settings are left out: they do not change the updates.
 */
export function trainingConfigHash(lora: LoraConfig, h: TrainHyperparameters): string {
  const relevant = {
    lora: { r: lora.r, alpha: lora.alpha, dropout: lora.dropout, rslora: lora.useRslora, targets: [...lora.targets].sort() },
    lr: h.lr, steps: h.steps ?? 0, epochs: h.epochs, batchSize: h.batchSize, gradAccum: h.gradAccum, scheduler: h.scheduler,
    warmupSteps: h.warmupSteps, weightDecay: h.weightDecay, maxGradNorm: h.maxGradNorm, seed: h.seed, shuffle: h.shuffle,
    recompute: h.gradientCheckpointing ?? true, beta1: h.beta1 ?? 0.9, beta2: h.beta2 ?? 0.999, eps: h.eps ?? 1e-8,
  };
  return createHash('sha256').update(JSON.stringify(relevant)).digest('hex');
}

/** A fingerprint of the training examples as the engine sees them (ids, labels and packing, in order). */
export function examplesHash(examples: readonly NativeTrainExample[]): string {
  const hash = createHash('sha256');
  for (const e of examples) {
    hash.update(new Uint8Array(new Int32Array([e.ids.length]).buffer));
    hash.update(new Uint8Array(e.ids.buffer, e.ids.byteOffset, e.ids.byteLength));
    hash.update(new Uint8Array(e.labels.buffer, e.labels.byteOffset, e.labels.byteLength));
    // Unpacked examples hash as before, so checkpoints of jobs from before packing still resume.
    // A packed example adds a marker no length can equal, then its document starts.
    if (e.docStart) {
      hash.update(new Uint8Array(new Int32Array([-1]).buffer));
      hash.update(new Uint8Array(e.docStart.buffer, e.docStart.byteOffset, e.docStart.byteLength));
    }
  }
  return hash.digest('hex');
}
