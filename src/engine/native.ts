// The native addon's JS surface, typed once. Everything here is implemented in native/addon/*.cpp;
// callers validate arguments before crossing (the C++ side trusts shapes and ranges it is given).

import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeModelConfig {
  H: number; I: number; L: number; NH: number; NKV: number; D: number; V: number;
  rmsEps: number; ropeTheta: number;
  ropeLlama3: boolean; ropeFactor: number; ropeLowFreqFactor: number; ropeHighFreqFactor: number; ropeOriginalMaxPos: number;
  tied: boolean; maxPos: number;
}

export interface NativeLoraSpec {
  r: number;
  alpha: number;
  dropout: number;
  rslora: boolean;
  targets: string[]; // PEFT module names
}

export type GuardPolicy = 'fail' | 'skip' | 'rollback';

/** The training guard: what to do on a non-finite loss or gradient, and on a loss spike (spikeFactor × the recent mean; 0 = off). */
export interface GuardSettings {
  nonfinitePolicy?: GuardPolicy;
  spikeFactor?: number;
  spikePolicy?: GuardPolicy;
  /** Each rollback multiplies the learning rate by this. */
  rollbackLrFactor?: number;
  /** More interventions than this fail the job. */
  maxInterventions?: number;
  /** Fault injection for tests: poison the gradients of this optimizer step, once. */
  injectNonfiniteStep?: number;
}

export interface NativeTrainHyper extends GuardSettings {
  lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; maxGradNorm: number;
  scheduler: 'constant' | 'linear' | 'cosine'; warmupSteps: number; batchSize: number; gradAccum: number;
  epochs: number; maxSteps: number; seed: number; shuffle: boolean; recompute: boolean; padId: number;
  /** Evaluate on evalExamples (and score forgettingExamples) every N steps and after the last. */
  evalEvery?: number;
  earlyStoppingPatience?: number;
  earlyStoppingMinDelta?: number;
  /** End with the weights of the best evaluation instead of the last. */
  keepBest?: boolean;
  /** Write <checkpointDir>/checkpoint-<step> (a PEFT folder plus optimizer and trainer state) every N steps. */
  checkpointEvery?: number;
  checkpointDir?: string;
  /** The adapter_config.json every checkpoint carries. */
  adapterConfigJson?: string;
  /** Recorded in checkpoints; resuming requires the same. */
  configHash?: string;
  dataHash?: string;
  /** A checkpoint folder to continue from (the adapter must have been loaded from it). */
  resumeFrom?: string;
}

/** What training got of the executor since the previous optimizer step (native/model/executor.h ShareReport). */
export interface NativeShareReport {
  trainingSeconds: number; generationSeconds: number; share: number; generationSteps: number; deferredMicroSteps: number;
}

export interface NativeStepReport {
  step: number; totalSteps: number; epoch: number; loss: number; gradNorm: number; lr: number;
  tokens: number; targets: number; seconds: number;
  /** Present on step events of train(), absent in the final report. */
  share?: NativeShareReport;
  /** Mean eval token loss, present on the steps that evaluated. */
  evalLoss?: number;
  /** Mean token loss of the forgetting set with the adapter, and with the base alone, on those steps. */
  forgettingLoss?: number;
  forgettingBaseLoss?: number;
  /** Folder of the checkpoint written after this step (or, in the final report of a cancelled job, at the cancel). */
  checkpoint?: string;
  /** The guard intervened: the batch was skipped, or training rolled back to `rolledBackTo`. */
  guardAction?: 'skip' | 'rollback';
  guardReason?: string;
  rolledBackTo?: number;
  stoppedEarly?: boolean;
  bestStep?: number;
  bestEvalLoss?: number;
}

export interface NativeGenerateSpec {
  slot: number; // 0: base model only
  promptIds: Int32Array;
  maxTokens: number; temperature: number; topK: number; topP: number; repetitionPenalty: number; seed: number;
  stopIds: number[];
}

export interface NativeGenerateResult {
  ids: Int32Array;
  finishReason: 'stop' | 'length' | 'cancelled';
  promptTokens: number;
  prefillSeconds: number;
  decodeSeconds: number;
}

export interface NativeJob<T> { id: number; promise: Promise<T> }

/**
 * One training sequence. docStart (packed sequences, see packing.ts) gives, per token, the index of
 * the first token of its document: attention, positions and loss stay within each document.
 */
export interface NativeTrainExample { ids: Int32Array; labels: Int32Array; docStart?: Int32Array }

/** The memory plan the engine made at start (native/model/memory_plan.h), in bytes. */
export interface NativeMemoryPlan {
  totalBytes: number; freeBytesAtStart: number; weightsBytes: number; backendScratchBytes: number;
  adapterSlots: number; adapterPoolBytes: number; workspaceBytes: number;
  kvBlockSize: number; kvBlocks: number; kvBlockBytes: number; kvCacheBytes: number;
}

/** Counters of one adapter in the pool (native/model/adapter_pool.h AdapterStats). */
export interface NativeAdapterStats {
  requests: number; tokensIn: number; tokensOut: number; hits: number; hostHits: number; loads: number;
  loadSeconds: number; lastLoadSeconds: number; placements: number; placeSeconds: number; lastPlaceSeconds: number;
  evictions: number; hostEvictions: number; loadFailures: number;
}

export type NativeAdapterTier = 'disk' | 'host' | 'device';

export interface NativeAdapterState {
  id: number; tier: NativeAdapterTier; pinned: boolean; loading: boolean; training: boolean; users: number; bytes: number;
  failureCode?: string; failure?: string; stats: NativeAdapterStats;
}

export interface NativePoolStats {
  slots: number; resident: number; pinned: number; adapters: number; loading: number;
  hostBytes: number; hostBudget: number; deviceBytes: number; deviceBudget: number; stats: NativeAdapterStats;
}

export interface NativeServingPolicy { targetInterTokenMs: number; minTrainingShare: number }

export interface NativeSchedulerStats extends NativeServingPolicy {
  generationStepMs: number; trainingStepMs: number; trainingShare: number; generationSeconds: number; trainingSeconds: number;
  microSteps: number; deferredMicroSteps: number;
}

/**
 * The memory plan of one training job (native/model/memory_plan.h TrainingMemoryPlan), in bytes. The
 * base, the backend's scratch and the adapter's A/B are resident and shared with serving; the job
 * needs jobBytes more: the adapter's gradients and AdamW moments plus its workspace, whose parts are
 * inputs, saved activations, the layer working set and the lm_head + cross-entropy chunk (headBytes,
 * of which headSharedBytes lie over the layer working set).
 */
export interface NativeTrainingPlan {
  batchSize: number; seqLen: number; rank: number; targets: string[]; recompute: boolean; computeDtype: 'F32' | 'BF16';
  baseBytes: number; backendScratchBytes: number; dequantBufferBytes: number; adapterWeightsBytes: number;
  adapterStateBytes: number; inputsBytes: number; savedActivationsBytes: number; layerWorkingSetBytes: number;
  headBytes: number; headSharedBytes: number; workspaceBytes: number; jobBytes: number;
  inUseBytes: number; freeBytes: number; peakBytes: number; fits: boolean;
  /** Every part in one line, as the refusal of a job that does not fit names them. */
  description: string;
}

/** The shape a training plan is made for: the largest pass (batch x tokens) and the adapter. */
export interface NativeTrainingShape { batchSize: number; seqLen: number; lora: NativeLoraSpec; recompute?: boolean }

export interface NativeEngine {
  info(): {
    quant: string; weightBytes: number; device: 'cpu' | 'cuda'; deviceDescription: string; computeDtype: 'F32' | 'BF16';
    gemmKernel: string; threads: number; vocabSize: number; numLayers: number; maxActiveSequences: number;
    prefillChunk: number; maxSeqLen: number; stepGraphs: boolean; memoryPlan: NativeMemoryPlan;
  };
  stats(): {
    activeSequences: number; queuedSequences: number; training: boolean; kvBytes: number; kvBlocksUsed: number;
    kvBlocksTotal: number; trainingWorkspaceBytes: number; graphSteps: number; eagerSteps: number;
    deviceTotalBytes: number; deviceFreeBytes: number; adapters: number;
    /** Queued generations whose adapter is being read or waits for a slot. */
    waitingForAdapter: number;
    scheduler: NativeSchedulerStats;
    /** The memory plan of the running training job, when one runs. */
    trainingPlan?: NativeTrainingPlan;
  };
  /** The memory plan a training job of this shape would get now. */
  planTraining(shape: NativeTrainingShape): NativeTrainingPlan;
  createAdapter(lora: NativeLoraSpec, seed: number): number;
  /** Reads the file on a thread of its own into the host tier (remembering the file for reloads). */
  loadAdapter(lora: NativeLoraSpec, file: string): Promise<number>;
  /** The disk tier: nothing is read until the adapter is first used. */
  registerAdapter(lora: NativeLoraSpec, file: string): number;
  setAdapterFile(slot: number, file: string): void;
  /** Resolves once the adapter holds a device slot (waiting like a generation does); cancel(id) stops waiting. */
  warmAdapter(slot: number): NativeJob<void>;
  pinAdapter(slot: number, pinned: boolean): void;
  adapterStats(): NativeAdapterState[];
  poolStats(): NativePoolStats;
  setPolicy(policy: Partial<NativeServingPolicy>): void;
  /** Bytes of the host tier (0: no limit). */
  setHostBudget(bytes: number): void;
  saveAdapter(slot: number, file: string): Promise<void>;
  removeAdapter(slot: number): void;
  adapterTensors(slot: number, grads?: boolean): Promise<Record<string, Float32Array>>;
  logits(ids: Int32Array, slot: number): Promise<Float32Array>;
  trainPass(
    batch: { B: number; T: number; ids: Int32Array; labels: Int32Array; docStart?: Int32Array },
    slot: number,
    options?: { backward?: boolean; recompute?: boolean; lossScale?: number; dropout?: number; dropoutSeed?: number; dropoutStep?: number },
  ): Promise<{ loss: number; targets: number; grads?: Record<string, Float32Array> }>;
  train(spec: { slot: number; examples: NativeTrainExample[]; evalExamples?: NativeTrainExample[]; forgettingExamples?: NativeTrainExample[]; hyper: NativeTrainHyper }, onStep: (r: NativeStepReport) => void): NativeJob<NativeStepReport & { cancelled: boolean }>;
  generate(spec: NativeGenerateSpec, onTokens: (ids: Int32Array) => void): NativeJob<NativeGenerateResult>;
  cancel(id: number): void;
  close(): void;
}

export interface NativeMergeSpec {
  config: NativeModelConfig;
  shards: string[];
  outDir: string;
  adapterFile: string;
  lora: NativeLoraSpec;
  dtype: 'bf16' | 'f16' | 'f32';
  into: 'original' | 'dequantized';
}

export interface NativeMergeResult {
  files: string[];
  bytes: number;
  tensors: number;
  mergedTensors: number;
  weightMap: Record<string, string>;
}

export interface CudaProbe {
  compiled: boolean;
  deviceCount: number;
  error: string;
  devices: { index: number; name: string; totalMemory: number; freeMemory: number; computeCapability: string; multiprocessors: number; kernelOk: boolean; error: string }[];
}

export interface NativeAddon {
  loadModel(spec: {
    config: NativeModelConfig; files: string[]; quant: 'none' | 'nf4'; device: 'cpu' | 'cuda';
    /** CUDA only: float32 activations and products (the parity check mode) instead of bf16. */
    float32Compute?: boolean;
    threads?: number; maxActiveSequences?: number; prefillChunk?: number; maxSeqLen?: number; adapterSlots?: number;
    maxLoraRank?: number; kvCacheBytes?: number; stepGraphs?: boolean;
    /** Most a training job may take (default: what the device has free beside the serving pool). */
    trainingMemoryBytes?: number;
  }): Promise<NativeEngine>;
  /** A training job's memory plan from the config alone (no weights, no device); freeBytes is 0. */
  planTrainingMemory(spec: NativeTrainingShape & {
    config: NativeModelConfig; quant: 'none' | 'nf4'; device: 'cpu' | 'cuda'; computeDtype: 'f32' | 'bf16';
    /** The backend's own scratch; default: the dequantization buffer alone. */
    backendScratchBytes?: number;
  }): NativeTrainingPlan;
  lrMultiplier(scheduler: string, step: number, warmup: number, total: number): number;
  mergeAdapter(spec: NativeMergeSpec, onProgress: (p: { tensor: string; index: number; total: number; merged: boolean }) => void): { promise: Promise<NativeMergeResult>; cancel(): void };
  sampleToken(logits: Float32Array, params: { temperature: number; topK: number; topP: number; repetitionPenalty: number; seed: number }, context: Int32Array, draws: number): Int32Array;
  safetensorsHeader(path: string): { tensors: { name: string; dtype: string; shape: number[]; begin: number; end: number }[]; metadata: Record<string, string> };
  safetensorsReadF32(path: string, name: string): Float32Array;
  safetensorsWrite(path: string, tensors: { name: string; dtype: 'F32' | 'BF16' | 'F16'; shape: number[]; data: Float32Array }[], metadata?: Record<string, string>): void;
  nf4Quantize(w: Float32Array, rows: number, cols: number): { codes: Uint8Array; packed: Uint8Array; absmax: Float32Array; absmaxDq: Float32Array; dequantized: Float32Array; absmaxMean: number; groupScales: Float32Array };
  cudaProbe(): CudaProbe;
  gemmKernelName(): string;
  /** Forces a kernel set (tests, the kernel lab); false when it is not available on this CPU. */
  setGemmKernel(name: 'avx512' | 'avx2' | 'scalar' | 'openblas' | 'auto'): boolean;
  /** Quantizes w to NF4 and runs the fused NF4 products next to sgemm on the dequantized matrix. */
  nf4MatmulCheck(w: Float32Array, N: number, K: number, x: Float32Array, M: number, dy?: Float32Array): { y: Float32Array; yRef: Float32Array; dx: Float32Array; dxRef: Float32Array; wDequant: Float32Array };
  setThreads(n: number): void;
  numThreads(): number;
  sgemm(transA: boolean, transB: boolean, M: number, N: number, K: number, alpha: number, A: Float32Array, lda: number, B: Float32Array, ldb: number, beta: number, C: Float32Array, ldc: number): void;
}

let cached: NativeAddon | null = null;

/** Loads build/Release/tuneserve_native.node (built by `npm ci` through node-gyp). */
export function native(): NativeAddon {
  if (cached) return cached;
  const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
  // TUNESERVE_NATIVE_ADDON points at another build of the addon (e.g. a debug or CUDA build).
  const file = process.env.TUNESERVE_NATIVE_ADDON ?? join(root, 'build', 'Release', 'tuneserve_native.node');
  if (!existsSync(file)) throw new Error(`the native engine is not built (${file} is missing): run \`npm ci\` or \`npx node-gyp rebuild\``);
  cached = createRequire(import.meta.url)(file) as NativeAddon;
  return cached;
}
