// EnginePort over the real engine (src/engine): the one place where the server's view of the
// engine (names, error codes, events) is translated into the engine's API. The server layer calls
// down into the engine through this class only.

import { createHash } from 'node:crypto';
import { readFile, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { Engine, type Adapter, type EngineOptions } from '../engine/engine.js';
import { loadDataset } from '../engine/dataset.js';
import type { NativeTrainingPlan } from '../engine/native.js';
import { applyPacking } from '../engine/packing.js';
import { EngineError, hasErrorCode } from '../engine/errors.js';
import { mergeAdapterFolder, mergeFidelity } from '../engine/merge.js';
import { ADAPTER_WEIGHTS_FILE, createLoraConfig, loraTensorShapes, readAdapterConfig, type LoraConfig } from '../engine/peft-config.js';
import { readSafetensorsHeader } from '../engine/safetensors.js';
import type {
  AdapterConfig, ChatMessage, EnginePort, GenerateResult, GenerateSpec, MergeResult, MergeSpec, ModelInfo,
  ResumePoint, TokenizerPort, TrainEvent, TrainResult, TrainSpec, TrainingMemoryPlan,
} from './engine-port.js';

export interface NativeEnginePortOptions extends EngineOptions {
  /** Name reported by GetModelInfo; default the folder's base name. */
  name?: string;
  /** Adapters that may be loaded at once (besides the one a training run uses). */
  adapterSlots?: number;
  /** Longest prompt + completion (or training row) accepted, in tokens. */
  maxSeqLen?: number;
}

/** dtypes of adapter weights the engine loads. */
const ADAPTER_DTYPES = ['F32', 'BF16', 'F16', 'F64'];

/** Engine pool slots beyond the serving slots: training jobs' adapters and merge fidelity probes. */
const ENGINE_EXTRA_SLOTS = 8;

const SCHEDULING =
  'One executor thread runs all model work: each turn advances every active generation by one token ' +
  '(continuous batching, each sequence with its own adapter), then runs one training micro-batch, so ' +
  'generation keeps streaming while a job trains.';

function portTrainingPlan(p: NativeTrainingPlan): TrainingMemoryPlan {
  return {
    batchSize: p.batchSize, seqLen: p.seqLen, rank: p.rank, targetModules: p.targets, recompute: p.recompute,
    baseBytes: p.baseBytes, backendScratchBytes: p.backendScratchBytes, dequantBufferBytes: p.dequantBufferBytes,
    adapterWeightsBytes: p.adapterWeightsBytes, adapterStateBytes: p.adapterStateBytes, workspaceBytes: p.workspaceBytes,
    inputsBytes: p.inputsBytes, savedActivationsBytes: p.savedActivationsBytes, layerWorkingSetBytes: p.layerWorkingSetBytes,
    headBytes: p.headBytes, headSharedBytes: p.headSharedBytes, jobBytes: p.jobBytes, peakBytes: p.peakBytes,
    freeBytes: p.freeBytes, description: p.description,
  };
}

function toPortConfig(l: LoraConfig): AdapterConfig {
  return { rank: l.r, alpha: l.alpha, dropout: l.dropout, targetModules: [...l.targets], useRslora: l.useRslora };
}

/** Re-labels engine errors with the EnginePort's codes for the context they happened in. */
function portError(e: unknown, context: 'adapter' | 'dataset' | 'other'): Error {
  if (!hasErrorCode(e)) return e instanceof Error ? e : new Error(String(e));
  const code = e.code;
  let mapped = code;
  if (context === 'adapter' && ['INVALID_CONFIG', 'INVALID_SAFETENSORS', 'UNSUPPORTED', 'NOT_FOUND', 'INVALID_ARGUMENT'].includes(code)) mapped = 'ADAPTER_INVALID';
  if (context === 'dataset' && ['NOT_FOUND'].includes(code)) mapped = 'INVALID_DATASET';
  if (mapped === code) return e;
  return new EngineError(mapped, e.message, undefined, { cause: e });
}

export class NativeEnginePort implements EnginePort {
  readonly tokenizer: TokenizerPort;
  private readonly adapters = new Map<string, Adapter>();
  private readonly adapterSlots: number;
  private readonly maxSeqLen: number;

  private constructor(
    readonly engine: Engine,
    private readonly name: string,
    private readonly fingerprint: string,
    options: NativeEnginePortOptions,
  ) {
    this.adapterSlots = options.adapterSlots ?? 16;
    this.maxSeqLen = Math.min(options.maxSeqLen ?? 8192, engine.config.maxPositionEmbeddings);
    const tok = engine.tokenizer;
    this.tokenizer = {
      encode: (text, { addBos }) => tok.encodeText(text, { addBos }),
      encodeChat: (messages: readonly ChatMessage[], { addGenerationPrompt }) => {
        try {
          return tok.encodeChat(messages, { addGenerationPrompt }).ids;
        } catch (e) {
          throw new EngineError('INVALID_ARGUMENT', (e as Error).message, undefined, { cause: e });
        }
      },
      decode: (ids) => tok.decode(ids, { skipSpecialTokens: true }),
      createDetokenizer: () => {
        const d = tok.detokenizer({ skipSpecialTokens: true });
        return { push: (ids) => d.pushAll(ids), flush: () => d.flush() };
      },
      hasChatTemplate: true, // the model's chat_template, or the built-in Llama 3 one when it has none
      eosIds: tok.stopTokenIds,
    };
  }

  /** Loads the model folder and computes its fingerprint (config.json + the weights' index). */
  static async open(modelDir: string, options: NativeEnginePortOptions = {}): Promise<NativeEnginePort> {
    // The engine's pool also holds the adapters of running training jobs and merge fidelity probes.
    const engine = await Engine.load(modelDir, {
      ...options, adapterSlots: (options.adapterSlots ?? 16) + ENGINE_EXTRA_SLOTS, maxSeqLen: options.maxSeqLen ?? 8192,
    });
    const hash = createHash('sha256');
    hash.update(await readFile(join(engine.folder.dir, 'config.json')));
    for (const shard of engine.folder.shards) {
      const header = await readSafetensorsHeader(shard);
      for (const [name, t] of header.tensors) hash.update(`${name}:${t.dtype}:${t.shape.join('x')}\n`);
    }
    return new NativeEnginePort(engine, options.name ?? basename(engine.folder.dir), hash.digest('hex'), options);
  }

  close(): void {
    this.engine.close();
  }

  modelInfo(): ModelInfo {
    const c = this.engine.config;
    const info = this.engine.native.info();
    const stats = this.engine.native.stats();
    const plan = info.memoryPlan;
    let adapterBytes = 0;
    for (const a of this.adapters.values()) adapterBytes += [...loraTensorShapes(c, a.config).values()].reduce((s, [n, m]) => s + n * m * 4, 0);
    return {
      name: this.name,
      config: {
        hiddenSize: c.hiddenSize, intermediateSize: c.intermediateSize, numLayers: c.numLayers, numAttentionHeads: c.numHeads,
        numKeyValueHeads: c.numKvHeads, headDim: c.headDim, vocabSize: c.vocabSize, maxPositionEmbeddings: c.maxPositionEmbeddings,
        ropeTheta: c.ropeTheta, ropeScalingType: c.ropeScaling ? 'llama3' : null, rmsNormEps: c.rmsNormEps, tieWordEmbeddings: c.tieWordEmbeddings,
      },
      sourceDtype: c.torchDtype === 'bfloat16' ? 'bf16' : c.torchDtype === 'float16' ? 'f16' : 'f32',
      quantization: this.engine.quant,
      device: `${info.device}: ${info.deviceDescription}`,
      computeDtype: info.computeDtype === 'BF16' ? 'bf16' : 'f32',
      memory: {
        weightsBytes: info.weightBytes,
        // A byte budget of 0 (the CPU backend, whose adapters stay in host memory) reports what they hold.
        adapterPoolBytes: Math.max(plan.adapterPoolBytes, adapterBytes),
        kvCacheBytes: plan.kvCacheBytes,
        trainingWorkspaceBytes: stats.trainingWorkspaceBytes, deviceTotalBytes: stats.deviceTotalBytes,
        deviceFreeBytes: stats.deviceFreeBytes, stepWorkspaceBytes: plan.workspaceBytes,
        backendScratchBytes: plan.backendScratchBytes, kvCacheBlocks: plan.kvBlocks, kvBlockSize: plan.kvBlockSize,
        kvCacheBlocksUsed: stats.kvBlocksUsed,
        ...(stats.trainingPlan ? { trainingPlan: portTrainingPlan(stats.trainingPlan) } : {}),
      },
      fingerprint: this.fingerprint,
      maxSeqLen: this.maxSeqLen,
      adapterSlots: this.adapterSlots,
      scheduling: SCHEDULING,
    };
  }

  async inspectAdapter(dir: string): Promise<AdapterConfig> {
    try {
      const { lora } = await readAdapterConfig(dir);
      const header = await readSafetensorsHeader(join(dir, ADAPTER_WEIGHTS_FILE));
      const want = loraTensorShapes(this.engine.config, lora);
      for (const [key, shape] of want) {
        const t = header.tensors.get(key);
        if (!t) throw new EngineError('ADAPTER_MISMATCH', `${ADAPTER_WEIGHTS_FILE}: tensor ${key} is missing`);
        if (t.shape.join(',') !== shape.join(',')) {
          throw new EngineError('ADAPTER_MISMATCH', `${ADAPTER_WEIGHTS_FILE}: tensor ${key} has shape [${t.shape.join(', ')}], this base needs [${shape.join(', ')}]`);
        }
        // What the native loader converts (core/safetensors.h read_f32); found by the reliability fuzzer.
        if (!ADAPTER_DTYPES.includes(t.dtype)) {
          throw new EngineError('UNSUPPORTED', `${ADAPTER_WEIGHTS_FILE}: tensor ${key} has dtype ${t.dtype}; adapter weights must be ${ADAPTER_DTYPES.join(', ')}`);
        }
      }
      for (const key of header.tensors.keys()) {
        if (!want.has(key)) throw new EngineError('ADAPTER_MISMATCH', `${ADAPTER_WEIGHTS_FILE}: unexpected tensor ${key} for this base`);
      }
      return toPortConfig(lora);
    } catch (e) {
      throw portError(e, 'adapter');
    }
  }

  async loadAdapter(name: string, dir: string): Promise<AdapterConfig> {
    if (this.adapters.has(name)) return toPortConfig(this.adapters.get(name)!.config);
    if (this.adapters.size >= this.adapterSlots) {
      throw new EngineError('RESOURCE_EXHAUSTED', `all ${this.adapterSlots} adapter slots are in use; unload one first`);
    }
    try {
      const adapter = await this.engine.loadAdapter(dir);
      this.adapters.set(name, adapter);
      return toPortConfig(adapter.config);
    } catch (e) {
      throw portError(e, 'adapter');
    }
  }

  async unloadAdapter(name: string): Promise<void> {
    const a = this.adapters.get(name);
    if (!a) return;
    this.adapters.delete(name);
    this.engine.removeAdapter(a);
  }

  loadedAdapters(): string[] {
    return [...this.adapters.keys()];
  }

  async train(spec: TrainSpec, options: { onEvent(event: TrainEvent): void; signal: AbortSignal; resume?: ResumePoint }): Promise<TrainResult> {
    const engine = this.engine;
    let dataset;
    try {
      dataset = await loadDataset(spec.datasetPath, engine.tokenizer, { maxSeqLen: Math.min(spec.maxSeqLen, this.maxSeqLen), vocabSize: engine.config.vocabSize });
    } catch (e) {
      throw portError(e, 'dataset');
    }
    // Hold out a seeded random evalFraction of the rows (at least one train row stays).
    const order = dataset.examples.map((_, i) => i);
    let state = (spec.seed >>> 0) || 1;
    for (let i = order.length - 1; i > 0; i--) {
      state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
      const j = state % (i + 1);
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    const nEval = spec.evalFraction > 0 ? Math.min(order.length - 1, Math.max(1, Math.round(order.length * spec.evalFraction))) : 0;
    const evalSet = new Set(order.slice(0, nEval));
    const trainRows = dataset.examples.filter((_, i) => !evalSet.has(i));
    const evalExamples = dataset.examples.filter((_, i) => evalSet.has(i));
    // Packing after the split: held-out rows stay whole rows, and the report says what the job trains on.
    const maxSeqLen = dataset.report.maxSeqLen;
    const packing = applyPacking(trainRows, {
      packing: spec.packing === 'on' ? true : spec.packing === 'auto' ? undefined : false,
      maxSeqLen, sequencesPerStep: spec.batchSize * spec.gradAccum, fixedSteps: spec.maxSteps > 0,
    });
    const trainExamples = packing.examples;
    options.onEvent({ kind: 'dataset', report: { ...dataset.report, packing: packing.report } });
    const forgettingExamples = spec.forgettingCheck ? await this.generalText() : [];

    let adapter: Adapter;
    try {
      adapter = options.resume ? await engine.resumeAdapter(options.resume.dir)
        : spec.initAdapterDir ? await engine.loadAdapter(spec.initAdapterDir)
        : engine.createAdapter(createLoraConfig({ r: spec.rank, alpha: spec.alpha, dropout: spec.dropout, targets: spec.targetModules }), spec.seed);
    } catch (e) {
      throw portError(e, spec.initAdapterDir || options.resume ? 'adapter' : 'other');
    }
    try {
      const stepsPerEpoch = Math.ceil(Math.ceil(trainExamples.length / spec.batchSize) / spec.gradAccum);
      const totalSteps = spec.maxSteps > 0 ? spec.maxSteps : stepsPerEpoch * spec.epochs;
      options.onEvent({ kind: 'started', totalSteps, trainExamples: trainRows.length, evalExamples: evalExamples.length });
      let warnedForgetting = false;
      const summary = await engine.train(adapter, trainExamples, {
        lr: spec.learningRate, ...(spec.maxSteps > 0 ? { steps: spec.maxSteps } : {}), epochs: spec.epochs,
        batchSize: spec.batchSize, gradAccum: spec.gradAccum, scheduler: spec.scheduler, warmupSteps: spec.warmupSteps,
        weightDecay: spec.weightDecay, maxGradNorm: spec.maxGradNorm, seed: spec.seed, shuffle: spec.shuffle,
        evalExamples, evalEvery: spec.evalEvery, checkpointEvery: spec.checkpointEvery, checkpointDir: spec.checkpointDir,
        ...(options.resume ? { resumeFrom: options.resume.dir } : {}),
        // Jobs stored before these settings existed run with the defaults.
        nonfinitePolicy: spec.nonfinitePolicy ?? 'rollback', spikeFactor: spec.spikeFactor ?? 0, spikePolicy: spec.spikePolicy ?? 'skip',
        earlyStoppingPatience: spec.earlyStoppingPatience ?? 0, earlyStoppingMinDelta: spec.earlyStoppingMinDelta ?? 0,
        keepBest: spec.keepBest ?? false, forgettingExamples,
      }, {
        signal: options.signal,
        onStep: (e) => {
          if (e.guardAction) {
            options.onEvent({ kind: 'guard', step: e.step, action: e.guardAction, reason: e.guardReason ?? '', rolledBackTo: e.rolledBackTo ?? 0 });
            if (e.guardAction === 'rollback') return;  // no step was taken: training continues from rolledBackTo
          }
          options.onEvent({ kind: 'step', step: e.step, totalSteps: e.totalSteps, epoch: e.epoch, loss: e.loss, gradNorm: e.gradNorm, learningRate: e.lr, tokensPerSecond: e.tokensPerS, elapsedSeconds: e.elapsedS, etaSeconds: e.etaS });
          if (e.evalLoss !== undefined || e.forgettingLoss !== undefined) {
            options.onEvent({
              kind: 'eval', step: e.step, loss: e.evalLoss ?? 0,
              ...(e.forgettingLoss === undefined ? {} : { forgettingLoss: e.forgettingLoss, forgettingBaseLoss: e.forgettingBaseLoss! }),
            });
          }
          if (e.forgettingLoss !== undefined && !warnedForgetting) {
            const increase = e.forgettingLoss - e.forgettingBaseLoss!;
            if (increase > spec.forgettingWarnThreshold) {
              warnedForgetting = true;
              options.onEvent({ kind: 'warning', code: 'FORGETTING', message: `after step ${e.step} the general-text loss is ${e.forgettingLoss.toFixed(3)} nats per token, ${increase.toFixed(3)} above the base's ${e.forgettingBaseLoss!.toFixed(3)} (threshold ${spec.forgettingWarnThreshold}): the adapter is unlearning general language; consider a lower learning rate, fewer steps or a smaller rank` });
            }
          }
          if (e.checkpoint) options.onEvent({ kind: 'checkpoint', step: e.step, dir: e.checkpoint });
        },
      });
      if (summary.cancelled) {
        if (summary.cancelCheckpoint) options.onEvent({ kind: 'checkpoint', step: summary.steps, dir: summary.cancelCheckpoint });
        throw new EngineError('CANCELLED', 'training was cancelled');
      }
      await engine.saveAdapter(adapter, spec.outDir);
      return {
        finalLoss: summary.finalLoss, evalLoss: summary.evalLoss, steps: summary.steps, tokens: summary.tokens,
        stoppedEarly: summary.stoppedEarly, bestStep: summary.bestStep > 0 ? summary.bestStep : null, bestEvalLoss: summary.bestEvalLoss,
        forgettingBaseLoss: summary.forgettingBaseLoss, forgettingLoss: summary.forgettingLoss, guardInterventions: summary.interventions,
        config: toPortConfig(adapter.config),
      };
    } catch (e) {
      throw portError(e, 'other');
    } finally {
      engine.removeAdapter(adapter);
    }
  }

  /** The shipped general-text set (data/general-text.jsonl) as examples, for the forgetting check. */
  private async generalText(): Promise<{ ids: Int32Array; labels: Int32Array }[]> {
    const file = fileURLToPath(new URL('../../data/general-text.jsonl', import.meta.url));
    const set = await loadDataset(file, this.engine.tokenizer, { maxSeqLen: this.maxSeqLen, vocabSize: this.engine.config.vocabSize });
    return set.examples;
  }

  async generate(spec: GenerateSpec, options: { onTokens(ids: readonly number[]): void; signal: AbortSignal }): Promise<GenerateResult> {
    let adapter: Adapter | null = null;
    if (spec.adapter !== null) {
      adapter = this.adapters.get(spec.adapter) ?? null;
      if (!adapter) throw new EngineError('ADAPTER_NOT_LOADED', `adapter ${spec.adapter} is not loaded`);
    }
    const r = await this.engine.generate({
      promptIds: Array.from(spec.promptIds), adapter, maxTokens: spec.maxTokens, temperature: spec.temperature, topK: spec.topK,
      topP: spec.topP, repetitionPenalty: spec.repetitionPenalty, seed: spec.seed, stopIds: spec.stopIds,
    }, { onTokens: (ids) => options.onTokens(ids), signal: options.signal }).catch((e: unknown) => { throw portError(e, 'other'); });
    return { ids: r.ids, finishReason: r.finishReason, promptTokens: r.promptTokens, completionTokens: r.completionTokens };
  }

  async merge(spec: MergeSpec, options: { onProgress(progress: { tensor: string; index: number; total: number }): void; signal: AbortSignal }): Promise<MergeResult> {
    let report;
    try {
      report = await mergeAdapterFolder(
        { modelDir: this.engine.folder.dir, adapterDir: spec.adapterDir, outDir: spec.outDir, dtype: spec.dtype, into: spec.into },
        { onProgress: (p) => options.onProgress({ tensor: p.tensor, index: p.index, total: p.total }), signal: options.signal },
      );
    } catch (e) {
      throw portError(e, 'adapter');
    }
    // Fidelity: base + adapter as served here vs the merged folder, on a probe prompt.
    const adapter = await this.engine.loadAdapter(spec.adapterDir).catch((e: unknown) => { throw portError(e, 'adapter'); });
    try {
      const f = await mergeFidelity(this.engine, adapter, report.outDir);
      return { bytes: report.bytes, tensorCount: report.tensors, fidelity: { maxAbsLogitDiff: f.maxAbsLogitDiff, meanAbsLogitDiff: f.meanAbsLogitDiff, probeTokens: f.probeTokens, top1Agreement: f.top1Agreement } };
    } catch (e) {
      await rm(report.outDir, { recursive: true, force: true });
      throw portError(e, 'other');
    } finally {
      this.engine.removeAdapter(adapter);
    }
  }
}
