// TEST DOUBLE of EnginePort, for the server's own tests only (ids, errors, queue, persistence,
// backpressure, cancellation). It is deterministic and does no machine learning: a byte-level
// tokenizer, generations that spell out a scripted text one token per step, training that counts
// rows (through the real row validator) and reports a falling loss, merges that write placeholder files. End-to-end tests against
// the real engine live elsewhere.

import { createHash } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { parseRowLine } from '../../src/engine/rows.js';
import type {
  AdapterConfig,
  AdapterPoolState,
  AdapterServingStats,
  AdapterVersionSource,
  ChatMessage,
  DatasetReport,
  Detokenizer,
  EngineErrorCode,
  EnginePort,
  GenerateResult,
  GenerateSpec,
  MergeResult,
  MergeSpec,
  ModelInfo,
  TargetModule,
  TokenizerPort,
  TrainEvent,
  ResumePoint,
  TrainedAdapter,
  TrainResult,
  TrainSpec,
} from '../../src/server/engine-port.js';

/** Byte tokens 0..255, then the specials. */
export const BOS = 256;
export const EOT = 257;
export const END_OF_TEXT = 258;
/** A token whose text is 1 KiB of "w" (a stand-in for long tokens, to fill transport windows). */
export const WIDE = 299;
export const WIDE_TEXT = 'w'.repeat(1024);
export const VOCAB_SIZE = 300;
/** The double's "hidden size"; adapter weight files record the one they were made for. */
export const HIDDEN = 64;

export function engineError(code: EngineErrorCode, message: string): Error & { code: EngineErrorCode } {
  return Object.assign(new Error(message), { code });
}

const encoder = new TextEncoder();

class ByteDetokenizer implements Detokenizer {
  private readonly decoder = new TextDecoder('utf-8');
  push(ids: readonly number[]): string {
    let text = '';
    for (const id of ids) {
      if (id < 256) text += this.decoder.decode(Uint8Array.of(id), { stream: true });
      else if (id === WIDE) text += this.decoder.decode() + WIDE_TEXT;
    }
    return text;
  }
  flush(): string {
    return this.decoder.decode();
  }
}

/** A byte-level tokenizer: one token per UTF-8 byte; chat is "role: content\n" per message. */
export const byteTokenizer: TokenizerPort = {
  encode(text, { addBos }) {
    return [...(addBos ? [BOS] : []), ...encoder.encode(text)];
  },
  encodeChat(messages: readonly ChatMessage[], { addGenerationPrompt }) {
    const text = messages.map((m) => `${m.role}: ${m.content}\n`).join('') + (addGenerationPrompt ? 'assistant: ' : '');
    return [BOS, ...encoder.encode(text)];
  },
  decode(ids) {
    return new TextDecoder().decode(Uint8Array.from(ids.filter((id) => id < 256)));
  },
  createDetokenizer: () => new ByteDetokenizer(),
  hasChatTemplate: true,
  eosIds: [EOT, END_OF_TEXT],
};

/** The text a generation spells out unless a test scripts another. */
export function defaultScript(spec: GenerateSpec): string {
  const prompt = byteTokenizer.decode([...spec.promptIds]);
  return `[${spec.adapter ?? 'base'}] ${prompt.slice(-12)}`;
}

/** Knobs and records of the double. */
export interface DoubleSettings {
  /** Milliseconds per generated token (0: one event-loop turn). */
  decodeStepMs: number;
  /** Milliseconds per optimizer step (0: one event-loop turn). */
  trainStepMs: number;
  /** Milliseconds per merged tensor. */
  mergeTensorMs: number;
  /** Tensors a merge writes. */
  mergeTensors: number;
  adapterSlots: number;
  /** The text (then EOT) each generation produces. */
  script: (spec: GenerateSpec) => string;
  /** Token ids (then EOT) each generation produces; overrides script when set. */
  scriptIds: ((spec: GenerateSpec) => number[]) | null;
  /** Tokens reported per decode step (onTokens call). */
  tokensPerStep: number;
  /** When set, the next generate() rejects with this code. */
  failNextGenerate: EngineErrorCode | null;
}

/** What the double saw. */
export interface DoubleRecords {
  /** Every path handed to the engine. */
  paths: string[];
  /** Per generation: tokens emitted after its signal fired (the double stops at the next step). */
  tokensAfterAbort: number[];
  /** Per finished generation: how it ended. */
  results: GenerateResult[];
  generations: GenerateSpec[];
  trainSpecs: TrainSpec[];
  /** The checkpoint step each train() call continued from (null: a fresh start). */
  resumes: (number | null)[];
  /** Adapter files the double read to bring a version into its pool (a trained, adopted one needs none). */
  adapterReads: string[];
}

/** One version in the double's pool. */
interface DoubleVersion {
  source: AdapterVersionSource;
  tier: 'disk' | 'host' | 'device';
  pinned: boolean;
  users: number;
  lastUsed: number;
  stats: AdapterServingStats;
  /** A trained adapter kept from its job: in memory, nothing to read. */
  inMemory: boolean;
}

function zeroStats(): AdapterServingStats {
  return {
    requests: 0, inputTokens: 0, outputTokens: 0, hits: 0, hostHits: 0, loads: 0, loadSeconds: 0, lastLoadSeconds: 0,
    placements: 0, placeSeconds: 0, evictions: 0, hostEvictions: 0, loadFailures: 0,
  };
}

/** The files of a placeholder PEFT folder the double accepts (or refuses, for another hidden size). */
export function doubleAdapterFiles(options: { rank?: number; hidden?: number; targets?: TargetModule[] } = {}): Record<string, Buffer> {
  const rank = options.rank ?? 8;
  return {
    'adapter_config.json': Buffer.from(
      JSON.stringify({
        peft_type: 'LORA',
        task_type: 'CAUSAL_LM',
        r: rank,
        lora_alpha: 2 * rank,
        lora_dropout: 0.05,
        target_modules: options.targets ?? ['q_proj', 'v_proj'],
        use_rslora: false,
      }),
    ),
    'adapter_model.safetensors': Buffer.from(`double-weights hidden=${options.hidden ?? HIDDEN}\n`.repeat(4)),
  };
}

/** Writes the placeholder PEFT folder. */
export async function writeDoubleAdapter(dir: string, options: { rank?: number; hidden?: number; targets?: TargetModule[] } = {}): Promise<void> {
  await fs.mkdir(dir, { recursive: true });
  for (const [name, bytes] of Object.entries(doubleAdapterFiles(options))) await fs.writeFile(path.join(dir, name), bytes);
}

async function readDoubleAdapter(dir: string): Promise<AdapterConfig> {
  let config: Record<string, unknown>;
  let weights: string;
  try {
    config = JSON.parse(await fs.readFile(path.join(dir, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
    weights = await fs.readFile(path.join(dir, 'adapter_model.safetensors'), 'utf8');
  } catch (error) {
    throw engineError('ADAPTER_INVALID', `cannot read adapter in ${dir}: ${(error as Error).message}`);
  }
  if (config.peft_type !== 'LORA') throw engineError('ADAPTER_INVALID', `${dir}/adapter_config.json is not a LoRA config`);
  if (!weights.startsWith('double-weights')) throw engineError('ADAPTER_INVALID', `${dir}/adapter_model.safetensors is not a safetensors file`);
  if (!weights.startsWith(`double-weights hidden=${HIDDEN}\n`)) {
    throw engineError('ADAPTER_MISMATCH', `${dir}: lora_A of q_proj has 128 columns, the base has hidden size ${HIDDEN}`);
  }
  return {
    rank: config.r as number,
    alpha: config.lora_alpha as number,
    dropout: config.lora_dropout as number,
    targetModules: config.target_modules as TargetModule[],
    useRslora: config.use_rslora === true,
  };
}

const wait = (ms: number): Promise<void> =>
  new Promise((resolve) => (ms > 0 ? setTimeout(resolve, ms) : setImmediate(resolve)));

/** The deterministic engine double. */
export class EngineDouble implements EnginePort {
  readonly tokenizer = byteTokenizer;
  readonly settings: DoubleSettings;
  readonly records: DoubleRecords = {
    paths: [],
    tokensAfterAbort: [],
    results: [],
    generations: [],
    trainSpecs: [],
    resumes: [],
    adapterReads: [],
  };
  /** The pool: versions by key, in device slots (at most adapterSlots), host memory or on disk. */
  private readonly pool = new Map<string, DoubleVersion>();
  private readonly trained = new Map<number, AdapterConfig>();
  private nextTrained = 1;
  private tick = 0;
  private waiting = 0;
  /** Wakes waiters when a slot may have freed up. */
  private slotWaiters = new Set<() => void>();

  constructor(settings: Partial<DoubleSettings> = {}) {
    this.settings = {
      decodeStepMs: 0,
      trainStepMs: 0,
      mergeTensorMs: 0,
      mergeTensors: 6,
      adapterSlots: 2,
      script: defaultScript,
      scriptIds: null,
      tokensPerStep: 1,
      failNextGenerate: null,
      ...settings,
    };
  }

  modelInfo(): ModelInfo {
    return {
      name: 'double',
      config: {
        hiddenSize: HIDDEN,
        intermediateSize: 128,
        numLayers: 2,
        numAttentionHeads: 4,
        numKeyValueHeads: 2,
        headDim: 16,
        vocabSize: VOCAB_SIZE,
        maxPositionEmbeddings: 8192,
        ropeTheta: 500000,
        ropeScalingType: 'llama3',
        rmsNormEps: 1e-5,
        tieWordEmbeddings: true,
      },
      sourceDtype: 'f32',
      quantization: 'nf4',
      device: 'cpu (test double)',
      computeDtype: 'f32',
      memory: {
        weightsBytes: 1000,
        adapterPoolBytes: 200,
        kvCacheBytes: 300,
        trainingWorkspaceBytes: 0,
        deviceTotalBytes: 1 << 30,
        deviceFreeBytes: 1 << 29,
        stepWorkspaceBytes: 400,
        backendScratchBytes: 0,
        kvCacheBlocks: 64,
        kvBlockSize: 16,
        kvCacheBlocksUsed: 0,
      },
      fingerprint: 'f'.repeat(64),
      maxSeqLen: 8192,
      adapterSlots: this.settings.adapterSlots,
      scheduling: 'test double: one generation step or one training step per event-loop turn',
      schedulingPolicy: { targetInterTokenMs: 0, minTrainingShare: 0.1 },
      scheduler: { trainingShare: 0, generationStepMs: 0, trainingStepMs: 0, deferredMicroSteps: 0 },
      pool: {
        deviceSlots: this.settings.adapterSlots,
        resident: [...this.pool.values()].filter((v) => v.tier === 'device').length,
        pinned: [...this.pool.values()].filter((v) => v.pinned).length,
        hostBytes: 0,
        hostBudgetBytes: 0,
        waitingRequests: this.waiting,
        stats: [...this.pool.values()].reduce((sum, v) => {
          for (const key of Object.keys(sum) as (keyof AdapterServingStats)[]) sum[key] += v.stats[key];
          return sum;
        }, zeroStats()),
      },
    };
  }

  async inspectAdapter(dir: string): Promise<AdapterConfig> {
    this.records.paths.push(dir);
    return readDoubleAdapter(dir);
  }

  registerAdapter(key: string, source: AdapterVersionSource): void {
    this.records.paths.push(source.dir);
    const known = this.pool.get(key);
    if (known?.source.contentHash === source.contentHash) return;
    this.pool.set(key, { source, tier: 'disk', pinned: false, users: 0, lastUsed: ++this.tick, stats: zeroStats(), inMemory: false });
  }

  adoptTrainedAdapter(key: string, trained: TrainedAdapter, source: AdapterVersionSource): void {
    if (!this.trained.delete(trained.handle)) throw engineError('INVALID_ARGUMENT', `no trained adapter ${trained.handle}`);
    this.pool.set(key, { source, tier: 'host', pinned: false, users: 0, lastUsed: ++this.tick, stats: zeroStats(), inMemory: true });
  }

  discardTrainedAdapter(trained: TrainedAdapter): void {
    this.trained.delete(trained.handle);
  }

  async loadAdapter(key: string, options: { signal: AbortSignal }): Promise<void> {
    const version = await this.acquire(key, options.signal, false);
    version.users -= 1;
    this.wakeSlotWaiters();
  }

  async unloadAdapter(key: string): Promise<void> {
    this.pool.delete(key);
    this.wakeSlotWaiters();
  }

  pinAdapter(key: string, pinned: boolean): void {
    const version = this.pool.get(key);
    if (!version) throw engineError('ADAPTER_NOT_LOADED', `${key} is not registered`);
    const others = [...this.pool.values()].filter((v) => v.pinned && v !== version).length;
    if (pinned && others + 1 >= this.settings.adapterSlots) throw engineError('PIN_LIMIT', 'one slot must stay unpinned');
    version.pinned = pinned;
  }

  loadedAdapters(): string[] {
    return [...this.pool].filter(([, v]) => v.tier === 'device').map(([key]) => key);
  }

  adapterPoolStates(): Map<string, AdapterPoolState> {
    return new Map([...this.pool].map(([key, v]) => [key, { tier: v.tier, pinned: v.pinned, loading: false, stats: { ...v.stats } }]));
  }

  private wakeSlotWaiters(): void {
    const waiters = [...this.slotWaiters];
    this.slotWaiters.clear();
    for (const wake of waiters) wake();
  }

  /** A version in a device slot with one more user: read when on disk, the LRU idle slot taken, waiting while none is idle. */
  private async acquire(key: string, signal: AbortSignal, count: boolean): Promise<DoubleVersion> {
    for (;;) {
      const version = this.pool.get(key);
      if (!version) throw engineError('ADAPTER_NOT_LOADED', `${key} is not registered`);
      if (version.tier === 'disk') {
        this.records.adapterReads.push(version.source.dir);
        try {
          await readDoubleAdapter(version.source.dir);
        } catch (error) {
          version.stats.loadFailures += 1;
          throw engineError('ADAPTER_LOAD_FAILED', (error as Error).message);
        }
        version.tier = 'host';
        version.stats.loads += 1;
      }
      if (version.tier === 'device') {
        if (count) version.stats.hits += 1;
      } else {
        const resident = [...this.pool.values()].filter((v) => v.tier === 'device');
        if (resident.length >= this.settings.adapterSlots) {
          const idle = resident.filter((v) => v.users === 0 && !v.pinned).sort((x, y) => x.lastUsed - y.lastUsed)[0];
          if (!idle) {
            // Every slot is busy: wait for a release (or the caller's signal).
            if (signal.aborted) throw engineError('CANCELLED', 'cancelled while waiting for an adapter slot');
            this.waiting += 1;
            await new Promise<void>((resolve) => {
              const wake = () => { signal.removeEventListener('abort', wake); this.slotWaiters.delete(wake); resolve(); };
              this.slotWaiters.add(wake);
              signal.addEventListener('abort', wake, { once: true });
            });
            this.waiting -= 1;
            continue;
          }
          idle.tier = 'host';
          idle.stats.evictions += 1;
        }
        version.tier = 'device';
        version.stats.placements += 1;
        if (count) version.stats.hostHits += 1;
      }
      version.users += 1;
      version.lastUsed = ++this.tick;
      return version;
    }
  }

  async train(spec: TrainSpec, options: { onEvent(event: TrainEvent): void; signal: AbortSignal; resume?: ResumePoint }): Promise<TrainResult> {
    this.records.paths.push(spec.datasetPath, spec.outDir, spec.checkpointDir, ...(spec.initAdapterDir ? [spec.initAdapterDir] : []));
    this.records.trainSpecs.push(spec);
    const lines = (await fs.readFile(spec.datasetPath, 'utf8')).split('\n').filter((line) => line.trim() !== '');
    const bad = lines.findIndex((line) => line.includes('"FAIL"'));
    if (bad !== -1) throw engineError('INVALID_DATASET', `${spec.datasetPath}:${bad + 1}: the row asks to fail`);
    // The report as the real engine computes it, with one token per byte (+ BOS) and no truncation.
    const rowsByKind: DatasetReport['rowsByKind'] = { text: 0, promptCompletion: 0, messages: 0, alpaca: 0, sharegpt: 0, tokenIds: 0 };
    for (const line of lines) rowsByKind[parseRowLine(line, VOCAB_SIZE).kind] += 1;
    const lengths = lines.map((line) => Buffer.byteLength(line) + 1);
    const longest = Math.max(...lengths);
    options.onEvent({
      kind: 'dataset',
      report: {
        rows: lines.length,
        blankLines: 0,
        rowsByKind,
        maxSeqLen: spec.maxSeqLen,
        tokens: lengths.reduce((a, b) => a + b, 0),
        scoredTokens: lengths.reduce((a, b) => a + b - 1, 0),
        truncatedRows: 0,
        truncatedTokens: 0,
        longestRow: { tokens: longest, line: lengths.indexOf(longest) + 1 },
        scoredFraction: { min: 1, minLine: 1, mean: 1 },
      },
    });
    const evalExamples = Math.floor(lines.length * spec.evalFraction);
    const perStep = spec.batchSize * spec.gradAccum;
    const totalSteps = spec.maxSteps > 0 ? spec.maxSteps : Math.max(1, Math.ceil(((lines.length - evalExamples) * spec.epochs) / perStep));
    options.onEvent({ kind: 'started', totalSteps, trainExamples: lines.length - evalExamples, evalExamples });
    const started = Date.now();
    let loss = 2;
    // Checkpoints as the real engine lays them out (checkpoint-<step> with trainer_state.json), one at
    // a cancel too; a resume continues after its checkpoint's step.
    const checkpoint = async (step: number) => {
      const dir = path.join(spec.checkpointDir, `checkpoint-${step}`);
      await writeDoubleAdapter(dir, { rank: spec.rank, targets: spec.targetModules });
      await fs.writeFile(path.join(dir, 'trainer_state.json'), JSON.stringify({ format: 1, step }));
      options.onEvent({ kind: 'checkpoint', step, dir });
    };
    this.records.resumes.push(options.resume?.step ?? null);
    for (let step = (options.resume?.step ?? 0) + 1; step <= totalSteps; step += 1) {
      await wait(this.settings.trainStepMs);
      if (options.signal.aborted) {
        if (step > 1) await checkpoint(step - 1);
        throw engineError('CANCELLED', 'training cancelled');
      }
      loss = 2 / (1 + step);
      const elapsedSeconds = (Date.now() - started) / 1000;
      options.onEvent({
        kind: 'step',
        step,
        totalSteps,
        epoch: (step * perStep) / Math.max(1, lines.length - evalExamples),
        loss,
        gradNorm: 1 / step,
        learningRate: spec.learningRate,
        tokensPerSecond: 1000,
        elapsedSeconds,
        etaSeconds: (elapsedSeconds / step) * (totalSteps - step),
      });
      if (evalExamples > 0 && (step === totalSteps || (spec.evalEvery > 0 && step % spec.evalEvery === 0))) {
        options.onEvent({ kind: 'eval', step, loss: loss * 1.1 });
      }
      if (spec.checkpointEvery > 0 && step % spec.checkpointEvery === 0) await checkpoint(step);
    }
    await writeDoubleAdapter(spec.outDir, { rank: spec.rank, targets: spec.targetModules });
    const files = Object.entries(doubleAdapterFiles({ rank: spec.rank, targets: spec.targetModules })).map(([name, bytes]) => ({
      name, sizeBytes: bytes.length, sha256: createHash('sha256').update(bytes).digest('hex'),
    }));
    const handle = this.nextTrained++;
    this.trained.set(handle, { rank: spec.rank, alpha: spec.alpha, dropout: spec.dropout, targetModules: spec.targetModules, useRslora: false });
    return {
      files,
      trained: { handle },
      finalLoss: loss,
      evalLoss: evalExamples > 0 ? loss * 1.1 : null,
      steps: totalSteps,
      tokens: totalSteps * perStep * 10,
      stoppedEarly: false,
      bestStep: evalExamples > 0 ? totalSteps : null,
      bestEvalLoss: evalExamples > 0 ? loss * 1.1 : null,
      forgettingBaseLoss: null,
      forgettingLoss: null,
      guardInterventions: 0,
      config: { rank: spec.rank, alpha: spec.alpha, dropout: spec.dropout, targetModules: spec.targetModules, useRslora: false },
    };
  }

  async generate(
    spec: GenerateSpec,
    options: { onTokens(ids: readonly number[]): void; signal: AbortSignal },
  ): Promise<GenerateResult> {
    this.records.generations.push(spec);
    const failure = this.settings.failNextGenerate;
    if (failure !== null) {
      this.settings.failNextGenerate = null;
      throw engineError(failure, 'injected failure');
    }
    const adapter = spec.adapter === null ? null : await this.acquire(spec.adapter, options.signal, true);
    try {
      if (adapter) {
        adapter.stats.requests += 1;
        adapter.stats.inputTokens += spec.promptIds.length;
      }
      const result = await this.decode(spec, options);
      if (adapter) adapter.stats.outputTokens += result.completionTokens;
      return result;
    } finally {
      if (adapter) {
        adapter.users -= 1;
        adapter.lastUsed = ++this.tick;
        this.wakeSlotWaiters();
      }
    }
  }

  private async decode(spec: GenerateSpec, options: { onTokens(ids: readonly number[]): void; signal: AbortSignal }): Promise<GenerateResult> {
    // The scripted text then EOT, repeated (as a model ignoring EOS would go on) until maxTokens.
    const script = [...(this.settings.scriptIds?.(spec) ?? encoder.encode(this.settings.script(spec))), EOT];
    const ids: number[] = [];
    const record = this.records.tokensAfterAbort.push(0) - 1;
    let finishReason: GenerateResult['finishReason'] = 'length';
    let index = 0;
    decoding: while (ids.length < spec.maxTokens) {
      await wait(this.settings.decodeStepMs);
      if (options.signal.aborted) {
        finishReason = 'cancelled';
        break;
      }
      const step: number[] = [];
      let stopped = false;
      while (step.length < this.settings.tokensPerStep && ids.length + step.length < spec.maxTokens) {
        const id = script[index % script.length] ?? EOT;
        index += 1;
        step.push(id);
        if (spec.stopIds.includes(id)) {
          stopped = true;
          break;
        }
      }
      ids.push(...step);
      options.onTokens(step);
      if (options.signal.aborted) this.records.tokensAfterAbort[record] = (this.records.tokensAfterAbort[record] ?? 0) + step.length;
      if (stopped) {
        finishReason = 'stop';
        break decoding;
      }
    }
    const result = { ids, finishReason, promptTokens: spec.promptIds.length, completionTokens: ids.length };
    this.records.results.push(result);
    return result;
  }

  async merge(
    spec: MergeSpec,
    options: { onProgress(progress: { tensor: string; index: number; total: number }): void; signal: AbortSignal },
  ): Promise<MergeResult> {
    this.records.paths.push(spec.adapterDir, spec.outDir);
    await readDoubleAdapter(spec.adapterDir);
    await fs.mkdir(spec.outDir, { recursive: true });
    const total = this.settings.mergeTensors;
    let bytes = 0;
    for (let index = 1; index <= total; index += 1) {
      await wait(this.settings.mergeTensorMs);
      if (options.signal.aborted) throw engineError('CANCELLED', 'merge cancelled');
      const line = `tensor ${index} ${spec.dtype} ${spec.into}\n`;
      await fs.appendFile(path.join(spec.outDir, 'model.safetensors'), line);
      bytes += line.length;
      options.onProgress({ tensor: `model.layers.${index}.weight`, index, total });
    }
    await fs.writeFile(path.join(spec.outDir, 'config.json'), '{}');
    return {
      bytes: bytes + 2,
      tensorCount: total,
      fidelity: { maxAbsLogitDiff: 0.001, meanAbsLogitDiff: 0.0001, probeTokens: 16, top1Agreement: 1 },
    };
  }
}
