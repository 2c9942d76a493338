// The narrow face of the engine that the gRPC server is written against: model facts, the
// tokenizer, the adapter pool, training, generation and merging. The real engine (src/engine)
// implements it; the server never reaches past it.
//
// Conventions: paths handed to the engine are absolute, already resolved under the data root by
// the server; the engine trusts them. Failures are Errors whose `code` is an EngineErrorCode
// (see engineErrorCodes); anything else is treated as an internal error. Token ids are
// non-negative integers below ModelConfig.vocabSize.

/** Stable error codes the engine puts on the `code` property of the Errors it throws. */
export const engineErrorCodes = [
  /** An argument the server passed is out of range (a server bug or a limit the server missed). */
  'INVALID_ARGUMENT',
  /** A dataset row is malformed; the message names the line number. */
  'INVALID_DATASET',
  /**
   * An adapter folder is not a PEFT LoRA adapter the engine supports (the engine's INVALID_CONFIG,
   * INVALID_SAFETENSORS or UNSUPPORTED, when raised about an adapter folder).
   */
  'ADAPTER_INVALID',
  /** An adapter's shapes or modules do not fit the loaded base. */
  'ADAPTER_MISMATCH',
  /** A stored file's bytes changed on disk since it was stored (src/engine/integrity.ts). */
  'INTEGRITY_MISMATCH',
  /** generate() named an adapter that is not in the pool. */
  'ADAPTER_NOT_LOADED',
  /** An adapter's files failed to load when a request needed it (that request fails alone). */
  'ADAPTER_LOAD_FAILED',
  /** A request's logits came out non-finite (its adapter's weights, most likely); it fails alone. */
  'NUMERICAL_ERROR',
  /** Pinning would leave no unpinned slot in the adapter pool. */
  'PIN_LIMIT',
  /** No free adapter slot, no KV-cache room now, or no memory for a training workspace (transient). */
  'RESOURCE_EXHAUSTED',
  /** A request larger than the engine could ever hold (prompt + max_tokens beyond the whole KV cache). */
  'CAPACITY_EXCEEDED',
  /** The operation stopped because its AbortSignal fired (train and merge reject with it). */
  'CANCELLED',
  /** Reading or writing a file failed (disk full, permissions); the message names the file. */
  'IO_ERROR',
] as const;

/** One of engineErrorCodes. */
export type EngineErrorCode = (typeof engineErrorCodes)[number];

/** The shape of an Error thrown by the engine. */
export interface EngineError extends Error {
  code: EngineErrorCode;
}

/** Names of the Llama linear modules that can carry LoRA weights. */
export const targetModuleNames = [
  'q_proj',
  'k_proj',
  'v_proj',
  'o_proj',
  'gate_proj',
  'up_proj',
  'down_proj',
] as const;

/** One of targetModuleNames. */
export type TargetModule = (typeof targetModuleNames)[number];

/** Llama architecture fields of the model's config.json. */
export interface ModelConfig {
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number;
  vocabSize: number;
  maxPositionEmbeddings: number;
  ropeTheta: number;
  /** rope_scaling.rope_type ("llama3"), or null when the config has none. */
  ropeScalingType: string | null;
  rmsNormEps: number;
  tieWordEmbeddings: boolean;
}

/** Device memory budget in bytes (RAM for the CPU device). */
export interface MemoryUsage {
  weightsBytes: number;
  adapterPoolBytes: number;
  kvCacheBytes: number;
  /** Workspace of the training run in progress; 0 when none runs. */
  trainingWorkspaceBytes: number;
  deviceTotalBytes: number;
  deviceFreeBytes: number;
  /** The workspace of one generation step, reserved at start. */
  stepWorkspaceBytes: number;
  /** The backend's own scratch (dequantized weights, sampling buffers). */
  backendScratchBytes: number;
  /** KV-cache blocks in the pool, positions per block, and blocks held by generations now. */
  kvCacheBlocks: number;
  kvBlockSize: number;
  kvCacheBlocksUsed: number;
  /** The memory plan of the running training job; absent when none runs. */
  trainingPlan?: TrainingMemoryPlan;
}

/**
 * The memory plan of one training job in bytes (proto TrainingMemoryPlan): the base, the backend's
 * scratch and the adapter's weights are resident and shared with serving; the job needs jobBytes more.
 */
export interface TrainingMemoryPlan {
  batchSize: number;
  seqLen: number;
  rank: number;
  targetModules: string[];
  recompute: boolean;
  baseBytes: number;
  backendScratchBytes: number;
  dequantBufferBytes: number;
  adapterWeightsBytes: number;
  adapterStateBytes: number;
  workspaceBytes: number;
  inputsBytes: number;
  savedActivationsBytes: number;
  layerWorkingSetBytes: number;
  headBytes: number;
  headSharedBytes: number;
  jobBytes: number;
  peakBytes: number;
  freeBytes: number;
  description: string;
}

/** Where an adapter version is in the engine's pool. */
export type AdapterTier = 'disk' | 'host' | 'device';

/** What the pool counted for one adapter version (or a sum of several). */
export interface AdapterServingStats {
  requests: number;
  inputTokens: number;
  outputTokens: number;
  /** Requests that found it in a device slot. */
  hits: number;
  /** Requests that had it placed from host memory, without a file read. */
  hostHits: number;
  /** Reads of its files into host memory, their total and latest seconds. */
  loads: number;
  loadSeconds: number;
  lastLoadSeconds: number;
  /** Copies from host memory into a device slot and their total seconds. */
  placements: number;
  placeSeconds: number;
  evictions: number;
  hostEvictions: number;
  loadFailures: number;
}

/** One adapter version in the pool. */
export interface AdapterPoolState {
  tier: AdapterTier;
  pinned: boolean;
  /** Its file is being read. */
  loading: boolean;
  stats: AdapterServingStats;
}

/** The pool as a whole. */
export interface AdapterPoolStatus {
  deviceSlots: number;
  resident: number;
  pinned: number;
  hostBytes: number;
  /** 0: no limit. */
  hostBudgetBytes: number;
  /** Generations waiting for their adapter (being read, or no free slot yet). */
  waitingRequests: number;
  /** Every version's counters since start, summed. */
  stats: AdapterServingStats;
}

/** How generation and training share the engine (see native/model/executor.h ServingPolicy). */
export interface SchedulingPolicy {
  /** 0: one training micro-step after every generation step. */
  targetInterTokenMs: number;
  minTrainingShare: number;
}

/** What the scheduler measured. */
export interface SchedulerStatus {
  /** Training's share of the busy time over the last seconds. */
  trainingShare: number;
  generationStepMs: number;
  trainingStepMs: number;
  deferredMicroSteps: number;
}

/** The adapter a finished training run left in the engine's memory (TrainResult.trained); opaque. */
export interface TrainedAdapter {
  readonly handle: number;
}

/** What the server knows of a stored adapter version when it makes it known to the pool. */
export interface AdapterVersionSource {
  /** The version's folder (its adapter_model.safetensors is read on first use). */
  dir: string;
  contentHash: string;
  config: AdapterConfig;
}

/** Facts about the loaded base model. memory is read fresh on every call. */
export interface ModelInfo {
  /** The model folder's base name, or "demo" for the built-in demo model. */
  name: string;
  config: ModelConfig;
  /** Precision of the weights on disk. */
  sourceDtype: 'f32' | 'bf16' | 'f16';
  /** Quantization of the base weights in device memory. */
  quantization: 'none' | 'nf4';
  /** The device in words, e.g. "cpu (avx512, 16 threads)" or "cuda: NVIDIA H200 (sm_90, 132 SMs), bf16 compute, ...". */
  device: string;
  /** Element type of activations and the KV cache. */
  computeDtype: 'f32' | 'bf16';
  memory: MemoryUsage;
  /** Hex SHA-256 of config.json and the weights index (tensor names, shapes, dtypes). */
  fingerprint: string;
  /** Longest sequence (prompt + completion, or training row) the engine accepts, in tokens. */
  maxSeqLen: number;
  /** Slots of the device adapter pool. */
  adapterSlots: number;
  /** One sentence on how generation and training share the device. */
  scheduling: string;
  schedulingPolicy: SchedulingPolicy;
  scheduler: SchedulerStatus;
  pool: AdapterPoolStatus;
}

/** One chat turn; roles are those the model's chat template knows. */
export interface ChatMessage {
  role: string;
  content: string;
}

/** Turns token ids into text incrementally, never splitting a UTF-8 character. */
export interface Detokenizer {
  /** Adds ids; returns the text they complete (may be '' while a character is incomplete). */
  push(ids: readonly number[]): string;
  /** Returns whatever text is still held back (an incomplete character becomes U+FFFD). */
  flush(): string;
}

/** The model's tokenizer and chat template. */
export interface TokenizerPort {
  /**
   * Encodes plain text. Special-token text inside it (e.g. "<|eot_id|>") is encoded as plain
   * text, never as a control token. With addBos the result starts with exactly one BOS.
   */
  encode(text: string, options: { addBos: boolean }): readonly number[];
  /**
   * Renders messages with the model's chat template (BOS included) and encodes them; message
   * content is encoded as plain text. Throws code INVALID_ARGUMENT when the template rejects
   * the messages (e.g. an unknown role) or the model has no chat template.
   */
  encodeChat(messages: readonly ChatMessage[], options: { addGenerationPrompt: boolean }): readonly number[];
  /** Decodes ids to text, special tokens omitted. */
  decode(ids: readonly number[]): string;
  /** A fresh incremental decoder for one generation. */
  createDetokenizer(): Detokenizer;
  /** Whether the model ships a chat template (encodeChat works). */
  readonly hasChatTemplate: boolean;
  /** Ids that end generation (<|eot_id|>, <|eom_id|>, <|end_of_text|> for Llama 3 instruct). */
  readonly eosIds: readonly number[];
}

/** LoRA settings of an adapter, as in its adapter_config.json. */
export interface AdapterConfig {
  rank: number;
  alpha: number;
  dropout: number;
  targetModules: TargetModule[];
  useRslora: boolean;
}

/** Hyperparameters and files of one training run (the flags of `tuneserve train`). */
export interface TrainSpec {
  /** JSONL dataset file (rows: text, prompt/completion, messages, alpaca, sharegpt, input_ids/labels). */
  datasetPath: string;
  /** Folder to create and write the final PEFT adapter into; it does not exist yet. */
  outDir: string;
  /** Folder (exists, empty) for checkpoints; the engine writes one subfolder per checkpoint. */
  checkpointDir: string;
  /** PEFT folder to continue from (its rank, alpha and targets apply), or null. */
  initAdapterDir: string | null;
  rank: number;
  alpha: number;
  dropout: number;
  targetModules: TargetModule[];
  learningRate: number;
  /** Optimizer steps; 0 means as many as `epochs` passes over the training rows take. */
  maxSteps: number;
  epochs: number;
  batchSize: number;
  gradAccum: number;
  /** Rows longer than this many tokens are truncated. */
  maxSeqLen: number;
  scheduler: 'constant' | 'linear' | 'cosine';
  warmupSteps: number;
  weightDecay: number;
  /** Global-norm clipping threshold; 0 disables clipping. */
  maxGradNorm: number;
  seed: number;
  shuffle: boolean;
  /** Fraction of rows held out for evaluation (0 = none). */
  evalFraction: number;
  /** Evaluate every this many steps and after the last; 0 = only after the last. */
  evalEvery: number;
  /** Write a checkpoint every this many steps; 0 = only at a cancel or shutdown. */
  checkpointEvery: number;
  /** The guard's policies and spike threshold (0 = spike detection off). */
  nonfinitePolicy: GuardPolicy;
  spikeFactor: number;
  spikePolicy: GuardPolicy;
  /** Early stopping after this many evaluations without improvement (0 = never), and its margin. */
  earlyStoppingPatience: number;
  earlyStoppingMinDelta: number;
  /** End with the best evaluation's weights. */
  keepBest: boolean;
  /** Score the general-text set with the base and the adapter (the forgetting check). */
  forgettingCheck: boolean;
  forgettingWarnThreshold: number;
  /** Packing of short rows (src/engine/packing.ts); jobs stored before it existed have none and run unpacked. */
  packing?: 'auto' | 'on' | 'off';
}

/** What the guard does with a step that went wrong. */
export type GuardPolicy = 'fail' | 'skip' | 'rollback';

/** Where a run continues from, for EnginePort.train. */
export interface ResumePoint {
  /** The checkpoint folder (a PEFT folder plus optimizer and trainer state). */
  dir: string;
  /** Its optimizer step. */
  step: number;
}

/** Row formats of a training file (see the upload's row rules). */
export type RowFormat = 'text' | 'promptCompletion' | 'messages' | 'alpaca' | 'sharegpt' | 'tokenIds';

/**
 * What the training rows hold after tokenization and truncation (src/engine/dataset.ts's
 * DatasetReport has this shape). The engine refuses a row with nothing scored, so every row counts.
 */
export interface DatasetReport {
  /** Rows (non-blank lines). */
  rows: number;
  blankLines: number;
  rowsByKind: Record<RowFormat, number>;
  /** The truncation length applied. */
  maxSeqLen: number;
  /** Tokens of all rows after truncation. */
  tokens: number;
  /** Targets that take loss (label not -100, position 0 excluded). */
  scoredTokens: number;
  truncatedRows: number;
  truncatedTokens: number;
  /** The longest row before truncation and its 1-based line. */
  longestRow: { tokens: number; line: number };
  /** Per row scored / (tokens − 1): the lowest (and its line) and the mean. */
  scoredFraction: { min: number; minLine: number; mean: number };
  /** The packing decision for the training rows (src/engine/packing.ts's PackingReport has this shape). */
  packing?: { enabled: boolean; reason: string; sequences: number; rows: number; fill: number };
}

/**
 * Progress of a training run, reported in this order: dataset (once the rows are tokenized), started,
 * then steps/evals/checkpoints.
 */
export type TrainEvent =
  | { kind: 'dataset'; report: DatasetReport }
  | { kind: 'started'; totalSteps: number; trainExamples: number; evalExamples: number; schedulingPolicy?: SchedulingPolicy }
  | {
      kind: 'step';
      step: number;
      totalSteps: number;
      epoch: number;
      loss: number;
      gradNorm: number;
      learningRate: number;
      tokensPerSecond: number;
      elapsedSeconds: number;
      etaSeconds: number;
      /** Share of the engine's busy time the job got since the previous step (the rest: generation). */
      deviceShare?: number;
      generationSteps?: number;
      deferredMicroSteps?: number;
    }
  | { kind: 'eval'; step: number; loss: number; forgettingLoss?: number; forgettingBaseLoss?: number }
  | { kind: 'checkpoint'; step: number; dir: string }
  | { kind: 'guard'; step: number; action: 'skip' | 'rollback'; reason: string; rolledBackTo: number }
  | { kind: 'warning'; code: string; message: string };

/** What a finished training run measured. */
export interface TrainResult {
  finalLoss: number;
  /** Loss on the held-out rows after the last step, or null without an eval split. */
  evalLoss: number | null;
  steps: number;
  /** Loss-bearing tokens processed over the whole run. */
  tokens: number;
  stoppedEarly: boolean;
  /** The best evaluation, or null without an eval split. */
  bestStep: number | null;
  bestEvalLoss: number | null;
  /** The forgetting check's losses (base alone, adapter at the end), or null without it. */
  forgettingBaseLoss: number | null;
  forgettingLoss: number | null;
  guardInterventions: number;
  /** The adapter written to outDir. */
  config: AdapterConfig;
  /** The files written to outDir, hashed from memory as they were written. */
  files: { name: string; sizeBytes: number; sha256: string }[];
  /**
   * The trained adapter, still in the engine's memory: adoptTrainedAdapter() serves it from there;
   * otherwise discardTrainedAdapter() frees it.
   */
  trained: TrainedAdapter;
}

/** One generation, in token ids. */
export interface GenerateSpec {
  promptIds: Int32Array;
  /** The key of an adapter version known to the pool, or null for the base alone. */
  adapter: string | null;
  /** Most tokens to generate; promptIds.length + maxTokens <= maxSeqLen. */
  maxTokens: number;
  /** 0 = greedy. */
  temperature: number;
  /** 0 = disabled. */
  topK: number;
  /** 1 = disabled. */
  topP: number;
  /** 1 = disabled. */
  repetitionPenalty: number;
  /** Sampler seed, 0 to 2^32 - 1. */
  seed: number;
  /** Generation stops after producing one of these (the id is included in the output). */
  stopIds: readonly number[];
}

/** The end of one generation. */
export interface GenerateResult {
  /** Every generated id, a final stop id included. */
  ids: readonly number[];
  /** stop: a stop id was produced; length: maxTokens reached; cancelled: the signal fired. */
  finishReason: 'stop' | 'length' | 'cancelled';
  promptTokens: number;
  completionTokens: number;
}

/** One merge: the adapter folder added into the base weights, written as a new model folder. */
export interface MergeSpec {
  adapterDir: string;
  /** Folder to create (it does not exist yet) for the merged Hugging Face model. */
  outDir: string;
  dtype: 'bf16' | 'f16' | 'f32';
  /** original: the full-precision source shards; dequantized: dequant(NF4(W)). */
  into: 'original' | 'dequantized';
}

/** The end of a merge. */
export interface MergeResult {
  /** Total bytes written under outDir. */
  bytes: number;
  tensorCount: number;
  /** Merged model vs base + adapter on a short probe prompt. */
  fidelity: {
    maxAbsLogitDiff: number;
    meanAbsLogitDiff: number;
    probeTokens: number;
    /** Fraction of probe positions whose argmax agrees, 0 to 1. */
    top1Agreement: number;
  };
}

/** What the gRPC server needs from the engine. */
export interface EnginePort {
  /** Facts about the loaded base; cheap, memory figures current. */
  modelInfo(): ModelInfo;

  /** The model's tokenizer and chat template. */
  readonly tokenizer: TokenizerPort;

  /**
   * Reads an adapter folder and checks it against the loaded base without taking a pool slot.
   * Rejects ADAPTER_INVALID or ADAPTER_MISMATCH.
   */
  inspectAdapter(dir: string): Promise<AdapterConfig>;

  /**
   * Makes a stored adapter version known to the pool under `key` without reading it: its first use
   * reads it in the background. The same key with the same content hash is a no-op; another hash
   * replaces the old entry (requests running on it keep it to their end). Rejects ADAPTER_INVALID
   * when the pool cannot take it (e.g. a rank above the engine's maximum).
   */
  registerAdapter(key: string, source: AdapterVersionSource): void;

  /**
   * Serves the adapter a training run left in memory under `key`, without reading its files; `source`
   * says where those files are now (to read them again if the host tier drops it).
   */
  adoptTrainedAdapter(key: string, trained: TrainedAdapter, source: AdapterVersionSource): void;

  /** Frees a trained adapter that will not be served. */
  discardTrainedAdapter(trained: TrainedAdapter): void;

  /**
   * Brings a registered adapter version into a device slot, evicting the least recently used idle one
   * when needed, and waiting while every slot is busy (the signal stops the wait: CANCELLED). Rejects
   * ADAPTER_LOAD_FAILED when its files do not load, ADAPTER_NOT_LOADED when the key is unknown.
   */
  loadAdapter(key: string, options: { signal: AbortSignal }): Promise<void>;

  /** Forgets an adapter version (every tier); the server calls it only when no generation uses it. */
  unloadAdapter(key: string): Promise<void>;

  /** Pins (never evicted) or unpins a registered version; PIN_LIMIT when no slot would stay unpinned. */
  pinAdapter(key: string, pinned: boolean): void;

  /** Keys of the versions in a device slot. */
  loadedAdapters(): string[];

  /** Every registered version's pool state, by key. */
  adapterPoolStates(): Map<string, AdapterPoolState>;

  /**
   * Runs one training run (the server runs at most one at a time) and writes the adapter to
   * spec.outDir. With options.resume, continues from that checkpoint (same spec as the run that wrote
   * it, else CHECKPOINT_MISMATCH). Reports progress through onEvent (on the event loop). Rejects
   * CANCELLED soon after the signal fires (between optimizer steps; a checkpoint event for the last
   * completed step comes first when spec.checkpointDir is set), INVALID_DATASET, RESOURCE_EXHAUSTED,
   * TRAINING_DIVERGED (the guard's fail policy), ...
   */
  train(
    spec: TrainSpec,
    options: { onEvent(event: TrainEvent): void; signal: AbortSignal; resume?: ResumePoint },
  ): Promise<TrainResult>;

  /**
   * Generates tokens; calls onTokens with each batch of new ids (on the event loop, in order).
   * When the signal fires it stops within one decode step, frees its KV-cache room and resolves
   * with finishReason 'cancelled'. A version not in a device slot is read and placed first (the
   * request waits). Rejects ADAPTER_NOT_LOADED (key unknown), ADAPTER_LOAD_FAILED, NUMERICAL_ERROR,
   * RESOURCE_EXHAUSTED (the engine's queue is full).
   */
  generate(
    spec: GenerateSpec,
    options: { onTokens(ids: readonly number[]): void; signal: AbortSignal },
  ): Promise<GenerateResult>;

  /**
   * Merges an adapter into the base weights, tensor by tensor, reporting each tensor written.
   * Rejects CANCELLED (leaving a partial outDir the server removes), ADAPTER_MISMATCH, IO_ERROR.
   */
  merge(
    spec: MergeSpec,
    options: {
      /** index: tensors written so far (1 to total), tensor: the one just written. */
      onProgress(progress: { tensor: string; index: number; total: number }): void;
      signal: AbortSignal;
    },
  ): Promise<MergeResult>;
}
