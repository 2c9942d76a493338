// EnginePort over the real engine (src/engine): the one place where the server's view of the
// engine (names, error codes, events) is translated into the engine's API. The server layer calls
// down into the engine through this class only.

import { createHash } from 'node:crypto';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { writeFileAtomic } from '../engine/atomic-file.js';
import { Engine, type Adapter, type AdapterState, type EngineOptions } from '../engine/engine.js';
import { loadDataset } from '../engine/dataset.js';
import type { NativeTrainingPlan } from '../engine/native.js';
import { applyPacking } from '../engine/packing.js';
import { EngineError, hasErrorCode } from '../engine/errors.js';
import { mergeAdapterFolder, mergeFidelity } from '../engine/merge.js';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, adapterConfigJson, createLoraConfig, loraTensorShapes, readAdapterConfig, type LoraConfig } from '../engine/peft-config.js';
import { readSafetensorsHeader } from '../engine/safetensors.js';
import type {
  AdapterConfig, AdapterPoolState, AdapterServingStats, AdapterVersionSource, ChatMessage, EnginePort, GenerateResult, GenerateSpec,
  MergeResult, MergeSpec, ModelInfo, ResumePoint, TokenizerPort, TrainedAdapter, TrainEvent, TrainResult, TrainSpec, TrainingMemoryPlan,
} from './engine-port.js';

export interface NativeEnginePortOptions extends EngineOptions {
  /** Name reported by GetModelInfo; default the folder's base name. */
  name?: string;
  /** Device slots of the adapter pool (serving, training jobs and merge probes share them). */
  adapterSlots?: number;
  /** Longest prompt + completion (or training row) accepted, in tokens. */
  maxSeqLen?: number;
}

/** dtypes of adapter weights the engine loads. */
const ADAPTER_DTYPES = ['F32', 'BF16', 'F16', 'F64'];

function schedulingSentence(targetInterTokenMs: number, minTrainingShare: number): string {
  const turn = 'One executor thread runs all model work: each turn advances every active generation by one token ' +
    '(continuous batching, each sequence with its own adapter)';
  if (targetInterTokenMs <= 0) return `${turn}, then runs one training micro-batch, so generation keeps streaming while a job trains.`;
  return `${turn}; while generations run, a training micro-batch follows only when both fit in the ${targetInterTokenMs} ms ` +
    `inter-token target, or when training's share of the busy time falls below ${Math.round(minTrainingShare * 100)}%.`;
}

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

function fromPortConfig(c: AdapterConfig): LoraConfig {
  return createLoraConfig({ r: c.rank, alpha: c.alpha, dropout: c.dropout, targets: c.targetModules, useRslora: c.useRslora });
}

function toPortStats(s: AdapterState['stats']): AdapterServingStats {
  return {
    requests: s.requests, inputTokens: s.tokensIn, outputTokens: s.tokensOut, hits: s.hits, hostHits: s.hostHits, loads: s.loads,
    loadSeconds: s.loadSeconds, lastLoadSeconds: s.lastLoadSeconds, placements: s.placements, placeSeconds: s.placeSeconds,
    evictions: s.evictions, hostEvictions: s.hostEvictions, loadFailures: s.loadFailures,
  };
}

/** Codes the engine gives a failed adapter load, as the port reports them. */
const LOAD_FAILURE_CODES = new Set(['INVALID_SAFETENSORS', 'ADAPTER_MISMATCH', 'IO_ERROR', 'NOT_FOUND', 'INVALID_CONFIG', 'UNSUPPORTED']);

/** Re-labels engine errors with the EnginePort's codes for the context they happened in. */
function portError(e: unknown, context: 'adapter' | 'dataset' | 'serving' | 'pin' | 'other'): Error {
  if (!hasErrorCode(e)) return e instanceof Error ? e : new Error(String(e));
  const code = e.code;
  let mapped = code;
  if (context === 'adapter' && ['INVALID_CONFIG', 'INVALID_SAFETENSORS', 'UNSUPPORTED', 'NOT_FOUND', 'INVALID_ARGUMENT'].includes(code)) mapped = 'ADAPTER_INVALID';
  if (context === 'serving' && LOAD_FAILURE_CODES.has(code)) mapped = 'ADAPTER_LOAD_FAILED';
  if (code === 'FAILED_PRECONDITION' && context === 'pin') mapped = 'PIN_LIMIT';
  if (context === 'dataset' && ['NOT_FOUND'].includes(code)) mapped = 'INVALID_DATASET';
  if (mapped === code) return e;
  return new EngineError(mapped, e.message, undefined, { cause: e });
}

export class NativeEnginePort implements EnginePort {
  readonly tokenizer: TokenizerPort;
  /** Registered adapter versions by key, with the content hash they were registered with. */
  private readonly adapters = new Map<string, { adapter: Adapter; contentHash: string }>();
  /** Adapters of finished training runs, not yet adopted or discarded. */
  private readonly trained = new Map<number, Adapter>();
  private readonly maxSeqLen: number;

  private constructor(
    readonly engine: Engine,
    private readonly name: string,
    private readonly fingerprint: string,
    options: NativeEnginePortOptions,
  ) {
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
    const engine = await Engine.load(modelDir, { ...options, adapterSlots: options.adapterSlots ?? 16, maxSeqLen: options.maxSeqLen ?? 8192 });
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
    const pool = this.engine.poolStats();
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
        adapterPoolBytes: Math.max(plan.adapterPoolBytes, pool.deviceBytes, info.device === 'cpu' ? pool.hostBytes : 0),
        kvCacheBytes: plan.kvCacheBytes,
        trainingWorkspaceBytes: stats.trainingWorkspaceBytes, deviceTotalBytes: stats.deviceTotalBytes,
        deviceFreeBytes: stats.deviceFreeBytes, stepWorkspaceBytes: plan.workspaceBytes,
        backendScratchBytes: plan.backendScratchBytes, kvCacheBlocks: plan.kvBlocks, kvBlockSize: plan.kvBlockSize,
        kvCacheBlocksUsed: stats.kvBlocksUsed,
        ...(stats.trainingPlan ? { trainingPlan: portTrainingPlan(stats.trainingPlan) } : {}),
      },
      fingerprint: this.fingerprint,
      maxSeqLen: this.maxSeqLen,
      adapterSlots: pool.slots,
      scheduling: schedulingSentence(stats.scheduler.targetInterTokenMs, stats.scheduler.minTrainingShare),
      schedulingPolicy: { targetInterTokenMs: stats.scheduler.targetInterTokenMs, minTrainingShare: stats.scheduler.minTrainingShare },
      scheduler: {
        trainingShare: stats.scheduler.trainingShare, generationStepMs: stats.scheduler.generationStepMs,
        trainingStepMs: stats.scheduler.trainingStepMs, deferredMicroSteps: stats.scheduler.deferredMicroSteps,
      },
      pool: {
        deviceSlots: pool.slots, resident: pool.resident, pinned: pool.pinned, hostBytes: pool.hostBytes, hostBudgetBytes: pool.hostBudget,
        waitingRequests: stats.waitingForAdapter, stats: toPortStats(pool.stats),
      },
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

  registerAdapter(key: string, source: AdapterVersionSource): void {
    const known = this.adapters.get(key);
    if (known?.contentHash === source.contentHash) return;
    let adapter: Adapter;
    try {
      adapter = this.engine.registerAdapter(fromPortConfig(source.config), join(source.dir, ADAPTER_WEIGHTS_FILE));
    } catch (e) {
      throw portError(e, 'adapter');
    }
    // Another content under the same key (a deleted and re-made adapter): requests on the old one keep it.
    if (known) this.engine.removeAdapter(known.adapter);
    this.adapters.set(key, { adapter, contentHash: source.contentHash });
  }

  adoptTrainedAdapter(key: string, trained: TrainedAdapter, source: AdapterVersionSource): void {
    const adapter = this.trained.get(trained.handle);
    if (!adapter) throw new EngineError('INVALID_ARGUMENT', `no trained adapter ${trained.handle} is waiting to be adopted`);
    this.trained.delete(trained.handle);
    this.engine.setAdapterFile(adapter, join(source.dir, ADAPTER_WEIGHTS_FILE));
    const known = this.adapters.get(key);
    if (known) this.engine.removeAdapter(known.adapter);
    this.adapters.set(key, { adapter, contentHash: source.contentHash });
  }

  discardTrainedAdapter(trained: TrainedAdapter): void {
    const adapter = this.trained.get(trained.handle);
    if (!adapter) return;
    this.trained.delete(trained.handle);
    this.engine.removeAdapter(adapter);
  }

  async loadAdapter(key: string, options: { signal: AbortSignal }): Promise<void> {
    const known = this.adapters.get(key);
    if (!known) throw new EngineError('ADAPTER_NOT_LOADED', `adapter ${key} is not registered with the pool`);
    await this.engine.warmAdapter(known.adapter, options.signal).catch((e: unknown) => { throw portError(e, 'serving'); });
  }

  async unloadAdapter(key: string): Promise<void> {
    const known = this.adapters.get(key);
    if (!known) return;
    this.adapters.delete(key);
    this.engine.removeAdapter(known.adapter);
  }

  pinAdapter(key: string, pinned: boolean): void {
    const known = this.adapters.get(key);
    if (!known) throw new EngineError('ADAPTER_NOT_LOADED', `adapter ${key} is not registered with the pool`);
    try {
      this.engine.pinAdapter(known.adapter, pinned);
    } catch (e) {
      throw portError(e, 'pin');
    }
  }

  loadedAdapters(): string[] {
    return [...this.adapterPoolStates()].filter(([, s]) => s.tier === 'device').map(([key]) => key);
  }

  adapterPoolStates(): Map<string, AdapterPoolState> {
    const byId = new Map(this.engine.adapterStates().map((s) => [s.id, s]));
    const out = new Map<string, AdapterPoolState>();
    for (const [key, { adapter }] of this.adapters) {
      const s = byId.get(adapter.slot);
      if (s) out.set(key, { tier: s.tier, pinned: s.pinned, loading: s.loading, stats: toPortStats(s.stats) });
    }
    return out;
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
      const policy = engine.native.stats().scheduler;
      options.onEvent({
        kind: 'started', totalSteps, trainExamples: trainRows.length, evalExamples: evalExamples.length,
        schedulingPolicy: { targetInterTokenMs: policy.targetInterTokenMs, minTrainingShare: policy.minTrainingShare },
      });
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
          options.onEvent({
            kind: 'step', step: e.step, totalSteps: e.totalSteps, epoch: e.epoch, loss: e.loss, gradNorm: e.gradNorm, learningRate: e.lr,
            tokensPerSecond: e.tokensPerS, elapsedSeconds: e.elapsedS, etaSeconds: e.etaS,
            ...(e.share ? { deviceShare: e.share.share, generationSteps: e.share.generationSteps, deferredMicroSteps: e.share.deferredMicroSteps } : {}),
          });
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
      // Train-to-serve: the adapter stays in the pool, and its files are made from that copy in memory,
      // hashed there and written atomically (never read back).
      const files = await this.writeAdapterFiles(adapter, spec.outDir);
      this.trained.set(adapter.slot, adapter);
      return {
        finalLoss: summary.finalLoss, evalLoss: summary.evalLoss, steps: summary.steps, tokens: summary.tokens,
        stoppedEarly: summary.stoppedEarly, bestStep: summary.bestStep > 0 ? summary.bestStep : null, bestEvalLoss: summary.bestEvalLoss,
        forgettingBaseLoss: summary.forgettingBaseLoss, forgettingLoss: summary.forgettingLoss, guardInterventions: summary.interventions,
        config: toPortConfig(adapter.config), files, trained: { handle: adapter.slot },
      };
    } catch (e) {
      engine.removeAdapter(adapter);
      throw portError(e, 'other');
    }
  }

  /** adapter_config.json and adapter_model.safetensors of an adapter in memory, written into dir. */
  private async writeAdapterFiles(adapter: Adapter, dir: string): Promise<TrainResult['files']> {
    const config = Buffer.from(`${JSON.stringify(adapterConfigJson(adapter.config, { baseModelNameOrPath: this.engine.folder.dir }), null, 2)}\n`);
    const weights = await this.engine.adapterSafetensors(adapter);
    await mkdir(dir, { recursive: true });
    const files: TrainResult['files'] = [];
    for (const [name, bytes] of [[ADAPTER_CONFIG_FILE, config], [ADAPTER_WEIGHTS_FILE, weights]] as const) {
      await writeFileAtomic(join(dir, name), bytes);
      files.push({ name, sizeBytes: bytes.byteLength, sha256: createHash('sha256').update(bytes).digest('hex') });
    }
    return files;
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
      adapter = this.adapters.get(spec.adapter)?.adapter ?? null;
      if (!adapter) throw new EngineError('ADAPTER_NOT_LOADED', `adapter ${spec.adapter} is not registered with the pool`);
    }
    const r = await this.engine.generate({
      promptIds: Array.from(spec.promptIds), adapter, maxTokens: spec.maxTokens, temperature: spec.temperature, topK: spec.topK,
      topP: spec.topP, repetitionPenalty: spec.repetitionPenalty, seed: spec.seed, stopIds: spec.stopIds,
    }, { onTokens: (ids) => options.onTokens(ids), signal: options.signal }).catch((e: unknown) => { throw portError(e, 'serving'); });
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
