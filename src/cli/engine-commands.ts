// The engine commands of the `tuneserve` CLI: make-model, train, generate, merge. Their flag names
// are a contract with scripts outside the project (issue #2); add flags, never rename them.

import { access } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

import { Engine, type Adapter } from '../engine/engine.js';
import { EngineError } from '../engine/errors.js';
import { loadDataset, type DatasetReport } from '../engine/dataset.js';
import { applyPacking, type PackingReport } from '../engine/packing.js';
import { makeModel, MODEL_PRESETS, type ModelPreset } from '../engine/make-model.js';
import { mergeAdapterFolder, mergeFidelity, type MergeDtype, type MergeInto } from '../engine/merge.js';
import { readLlamaConfig, type LlamaConfig } from '../engine/model-folder.js';
import { createLoraConfig, readAdapterConfig } from '../engine/peft-config.js';
import { choice, float, integer, required, text as str, type Flags } from './flags.js';
import { ProgressBar } from './progress.js';

// Defaults applied on top of the shared flag readers.
function number(flags: Flags, name: string, fallback: number, kind: 'int' | 'float' = 'float'): number {
  return (kind === 'int' ? integer(flags, name) : float(flags, name)) ?? fallback;
}

function oneOf<T extends string>(flags: Flags, name: string, allowed: readonly T[], fallback: T): T {
  return choice(flags, name, allowed) ?? fallback;
}

const ENGINE_FLAGS = {
  quant: { type: 'string' },
  device: { type: 'string' },
  'cuda-compute': { type: 'string' },
  threads: { type: 'string' },
} as const;

function engineOptions(flags: Flags) {
  const threads = number(flags, 'threads', 0, 'int');
  return {
    quant: oneOf(flags, 'quant', ['nf4', 'none'] as const, 'nf4'),
    device: oneOf(flags, 'device', ['cpu', 'cuda', 'auto'] as const, 'auto'),
    cudaCompute: oneOf(flags, 'cuda-compute', ['bf16', 'f32'] as const, 'bf16'),
    ...(threads > 0 ? { threads } : {}),
  };
}

export async function makeModelCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, strict: true, options: { preset: { type: 'string' }, out: { type: 'string' }, seed: { type: 'string' }, layers: { type: 'string' }, dtype: { type: 'string' } } });
  const preset = oneOf(values, 'preset', MODEL_PRESETS, 'tiny') as ModelPreset;
  const outDir = required(values, 'out');
  const layers = number(values, 'layers', 0, 'int');
  const dtype = str(values, 'dtype');
  const made = await makeModel({
    preset, outDir, seed: number(values, 'seed', 0, 'int'),
    ...(layers > 0 ? { numLayers: layers } : {}),
    ...(dtype ? { dtype: oneOf(values, 'dtype', ['float32', 'bfloat16', 'float16'] as const, 'float32') } : {}),
  });
  process.stdout.write(`made ${preset} model in ${made.dir}: ${made.shards.length} shard(s), ${(made.totalBytes / 1e6).toFixed(1)} MB of weights\n`);
}

export async function trainCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv, strict: true,
    options: {
      model: { type: 'string' }, data: { type: 'string' }, out: { type: 'string' },
      rank: { type: 'string' }, alpha: { type: 'string' }, dropout: { type: 'string' }, targets: { type: 'string' }, rslora: { type: 'boolean' },
      lr: { type: 'string' }, steps: { type: 'string' }, epochs: { type: 'string' }, 'batch-size': { type: 'string' }, 'grad-accum': { type: 'string' },
      'max-seq-len': { type: 'string' }, scheduler: { type: 'string' }, 'warmup-steps': { type: 'string' }, 'weight-decay': { type: 'string' },
      'max-grad-norm': { type: 'string' }, seed: { type: 'string' }, 'no-shuffle': { type: 'boolean' }, 'init-adapter': { type: 'string' },
      'no-gradient-checkpointing': { type: 'boolean' }, json: { type: 'boolean' },
      'checkpoint-dir': { type: 'string' }, 'checkpoint-every': { type: 'string' }, resume: { type: 'string' },
      'nonfinite-policy': { type: 'string' }, 'spike-factor': { type: 'string' }, 'spike-policy': { type: 'string' },
      packing: { type: 'string' },
      ...ENGINE_FLAGS,
    },
  });
  const modelDir = required(values, 'model');
  const dataFile = required(values, 'data');
  const outDir = required(values, 'out');
  const seed = number(values, 'seed', 42, 'int');
  // Every flag is checked before the model is loaded: a typo fails in milliseconds, not after the
  // load. Of the model only config.json is read for that (--max-seq-len).
  const options = engineOptions(values);
  const steps = number(values, 'steps', 0, 'int');
  const hyper = {
    lr: number(values, 'lr', 2e-4), ...(steps > 0 ? { steps } : {}), epochs: number(values, 'epochs', 1, 'int'),
    batchSize: number(values, 'batch-size', 4, 'int'), gradAccum: number(values, 'grad-accum', 1, 'int'),
    scheduler: oneOf(values, 'scheduler', ['constant', 'linear', 'cosine'] as const, 'linear'),
    warmupSteps: number(values, 'warmup-steps', 0, 'int'), weightDecay: number(values, 'weight-decay', 0),
    maxGradNorm: number(values, 'max-grad-norm', 1), seed, shuffle: values['no-shuffle'] !== true,
    gradientCheckpointing: values['no-gradient-checkpointing'] !== true,
    ...(str(values, 'checkpoint-dir') ? { checkpointDir: resolve(str(values, 'checkpoint-dir')!), checkpointEvery: number(values, 'checkpoint-every', 0, 'int') } : {}),
    nonfinitePolicy: oneOf(values, 'nonfinite-policy', ['fail', 'skip', 'rollback'] as const, 'rollback'),
    spikeFactor: number(values, 'spike-factor', 0),
    spikePolicy: oneOf(values, 'spike-policy', ['fail', 'skip', 'rollback'] as const, 'skip'),
  };
  checkTrainHyperparameters(hyper);
  const packingMode = oneOf(values, 'packing', ['auto', 'on', 'off'] as const, 'auto');
  // --resume CHECKPOINT: continue a run that was stopped (Ctrl-C writes a checkpoint when
  // --checkpoint-dir is given); the same flags and data as that run are required.
  const resumeFrom = str(values, 'resume');
  if (resumeFrom && str(values, 'init-adapter')) throw new EngineError('INVALID_ARGUMENT', '--resume and --init-adapter exclude each other', { field: 'resume' });
  if (resumeFrom) await access(join(resumeFrom, 'trainer_state.json')).catch((e: unknown) => { throw new EngineError('NOT_FOUND', `--resume: ${resumeFrom} is not a checkpoint folder (no trainer_state.json)`, { field: 'resume' }, { cause: e }); });
  const maxSeqLenFlag = integer(values, 'max-seq-len');
  const init = str(values, 'init-adapter');
  const lora = init ? null : withFlagNames(() => createLoraConfig({
    r: number(values, 'rank', 16, 'int'), alpha: number(values, 'alpha', 32), dropout: number(values, 'dropout', 0.05),
    targets: str(values, 'targets') ?? 'q_proj,k_proj,v_proj,o_proj', useRslora: values.rslora === true,
  }));
  const maxSeqLen = checkMaxSeqLenFlag(maxSeqLenFlag, await readLlamaConfig(modelDir));
  if (init) await readAdapterConfig(init);
  await access(dataFile).catch((e: unknown) => { throw new EngineError('NOT_FOUND', `--data: cannot read ${dataFile}`, { field: 'data' }, { cause: e }); });
  const engine = await Engine.load(modelDir, options);
  try {
    const dataset = await loadDataset(dataFile, engine.tokenizer, { maxSeqLen, vocabSize: engine.config.vocabSize });
    // With --init-adapter (or --resume), that adapter's rank, alpha and targets apply.
    const adapter: Adapter = resumeFrom ? await engine.resumeAdapter(resumeFrom) : lora ? engine.createAdapter(lora, seed) : await engine.loadAdapter(init!);
    const packed = applyPacking(dataset.examples, {
      packing: packingMode === 'auto' ? undefined : packingMode === 'on', maxSeqLen, sequencesPerStep: hyper.batchSize * hyper.gradAccum, fixedSteps: steps > 0,
    });
    const report = { ...dataset.report, packing: packed.report };
    if (values.json) process.stdout.write(`${JSON.stringify({ dataset_report: report })}\n`);
    else process.stderr.write(`${formatDatasetReport(report)}\n`);
    process.stderr.write(`training on ${report.rows} examples, LoRA r=${adapter.config.r} alpha=${adapter.config.alpha} on ${adapter.config.targets.join(',')}, ${engine.quant} base on ${engine.device}\n`);
    const bar = values.json ? null : new ProgressBar(process.stderr);
    const controller = new AbortController();
    const onSigint = () => controller.abort();
    process.once('SIGINT', onSigint);
    const summary = await engine.train(adapter, packed.examples, { ...hyper, ...(resumeFrom ? { resumeFrom: resolve(resumeFrom) } : {}) }, {
      signal: controller.signal,
      onStep: (e) => {
        if (e.guardAction) process.stderr.write(`\nguard: ${e.guardAction} at step ${e.step} (${e.guardReason})${e.guardAction === 'rollback' ? `, continuing from step ${e.rolledBackTo}` : ''}\n`);
        if (values.json) {
          process.stdout.write(`${JSON.stringify({ step: e.step, loss: e.loss, grad_norm: e.gradNorm, lr: e.lr, tokens_per_s: e.tokensPerS, epoch: e.epoch, total_steps: e.totalSteps, elapsed_s: e.elapsedS, ...(e.checkpoint ? { checkpoint: e.checkpoint } : {}) })}\n`);
        } else {
          bar?.update(e.step, e.totalSteps, `loss ${e.loss.toFixed(4)}  lr ${e.lr.toExponential(2)}  ${e.tokensPerS.toFixed(0)} tok/s`);
        }
      },
    });
    process.off('SIGINT', onSigint);
    bar?.done();
    await engine.saveAdapter(adapter, outDir);
    process.stderr.write(`${summary.cancelled ? 'cancelled' : 'done'} after ${summary.steps} steps, final loss ${summary.finalLoss.toFixed(4)}, ${summary.seconds.toFixed(1)} s; adapter written to ${outDir}\n`);
    if (summary.cancelCheckpoint) process.stderr.write(`resume with: --resume ${summary.cancelCheckpoint} (and the same flags and data)\n`);
  } finally {
    engine.close();
  }
}

/** Refuses optimizer flags the engine would refuse after the load, naming the flag. */
export function checkTrainHyperparameters(hyper: { lr: number; epochs: number; batchSize: number; gradAccum: number; weightDecay: number; maxGradNorm: number }): void {
  const refuse = (flag: string, problem: string) => new EngineError('INVALID_ARGUMENT', `--${flag} ${problem}`, { field: flag });
  if (!(hyper.lr > 0)) throw refuse('lr', `must be above 0, got ${hyper.lr}`);
  if (hyper.epochs < 1) throw refuse('epochs', `must be at least 1, got ${hyper.epochs}`);
  if (hyper.batchSize < 1) throw refuse('batch-size', `must be at least 1, got ${hyper.batchSize}`);
  if (hyper.gradAccum < 1) throw refuse('grad-accum', `must be at least 1, got ${hyper.gradAccum}`);
  if (!(hyper.weightDecay >= 0)) throw refuse('weight-decay', `must be 0 or more, got ${hyper.weightDecay}`);
  if (!(hyper.maxGradNorm >= 0)) throw refuse('max-grad-norm', `must be 0 (no clipping) or more, got ${hyper.maxGradNorm}`);
}

/** --max-seq-len against the model's max_position_embeddings; absent: min(2048, that). */
export function checkMaxSeqLenFlag(value: number | undefined, config: LlamaConfig): number {
  const limit = config.maxPositionEmbeddings;
  if (value === undefined) return Math.min(2048, limit);
  if (value < 2) throw new EngineError('INVALID_ARGUMENT', `--max-seq-len is ${value}; a training sequence needs at least 2 tokens (position 0 is never a target)`, { field: 'max-seq-len' });
  if (value > limit) throw new EngineError('INVALID_ARGUMENT', `--max-seq-len is ${value}, above the model's max_position_embeddings (${limit})`, { field: 'max-seq-len' });
  return value;
}

/** Runs `build`, renaming the LoRA fields in its INVALID_ARGUMENT errors to the flags that set them. */
function withFlagNames<T>(build: () => T): T {
  const flags: Record<string, string> = { r: 'rank', lora_alpha: 'alpha', lora_dropout: 'dropout', target_modules: 'targets' };
  try {
    return build();
  } catch (error) {
    const field = (error as EngineError).details?.field;
    if (!(error instanceof EngineError) || typeof field !== 'string' || flags[field] === undefined) throw error;
    throw new EngineError('INVALID_ARGUMENT', `--${flags[field]}: ${error.message}`, { field: flags[field] }, { cause: error });
  }
}

/** The dataset report in a few human lines. */
export function formatDatasetReport(report: DatasetReport & { packing?: PackingReport }): string {
  const kinds = Object.entries(report.rowsByKind).filter(([, n]) => n > 0).map(([kind, n]) => `${n} ${kind}`).join(', ');
  const percent = (fraction: number) => `${(fraction * 100).toFixed(1)}%`;
  const p = report.packing;
  return [
    `dataset: ${report.rows} rows (${kinds}), ${report.tokens} tokens, ${report.scoredTokens} scored`,
    `  longest row ${report.longestRow.tokens} tokens (line ${report.longestRow.line}); ${report.truncatedRows} rows truncated to ${report.maxSeqLen} (${report.truncatedTokens} tokens cut)`,
    `  scored per row: mean ${percent(report.scoredFraction.mean)}, min ${percent(report.scoredFraction.min)} (line ${report.scoredFraction.minLine})`,
    ...(p ? [`  packing ${p.enabled ? 'on' : 'off'} (${p.reason}): ${p.rows} rows in ${p.sequences} sequences, ${percent(p.fill)} full`] : []),
  ].join('\n');
}

export async function generateCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv, strict: true,
    options: {
      model: { type: 'string' }, adapter: { type: 'string' }, prompt: { type: 'string' }, 'prompt-ids': { type: 'string' }, chat: { type: 'boolean' },
      'max-tokens': { type: 'string' }, temperature: { type: 'string' }, 'top-k': { type: 'string' }, 'top-p': { type: 'string' },
      'repetition-penalty': { type: 'string' }, seed: { type: 'string' }, 'ignore-eos': { type: 'boolean' }, json: { type: 'boolean' }, ...ENGINE_FLAGS,
    },
  });
  const modelDir = required(values, 'model');
  const prompt = str(values, 'prompt');
  const promptIdsFlag = str(values, 'prompt-ids');
  if ((prompt === undefined) === (promptIdsFlag === undefined)) throw new EngineError('INVALID_ARGUMENT', 'give exactly one of --prompt and --prompt-ids', { field: 'prompt' });
  // Flags are checked before the model is loaded.
  const sampling = {
    maxTokens: number(values, 'max-tokens', 64, 'int'), temperature: number(values, 'temperature', 0),
    topK: number(values, 'top-k', 0, 'int'), topP: number(values, 'top-p', 1), repetitionPenalty: number(values, 'repetition-penalty', 1),
    seed: number(values, 'seed', 0, 'int'), ...(values['ignore-eos'] ? { stopIds: [] } : {}),
  };
  const givenIds = promptIdsFlag?.split(',').map((s, i) => {
    const n = Number(s.trim());
    if (s.trim() === '' || !Number.isSafeInteger(n)) throw new EngineError('INVALID_ARGUMENT', `--prompt-ids: item ${i + 1} (${JSON.stringify(s)}) is not an integer`, { field: 'prompt-ids' });
    return n;
  });
  const engine = await Engine.load(modelDir, engineOptions(values));
  try {
    const adapterDir = str(values, 'adapter');
    const adapter = adapterDir ? await engine.loadAdapter(adapterDir) : null;
    let promptIds: number[];
    if (givenIds !== undefined) {
      promptIds = givenIds;
    } else if (values.chat) {
      promptIds = engine.tokenizer.encodeChat([{ role: 'user', content: prompt! }], { addGenerationPrompt: true }).ids;
    } else {
      // Plain text, as the server's Generate and training rows read it ("<|eot_id|>" stays text).
      promptIds = engine.tokenizer.encodeText(prompt!, { addBos: true });
    }
    const detok = engine.tokenizer.detokenizer({ skipSpecialTokens: true });
    const controller = new AbortController();
    const onSigint = () => controller.abort();
    process.once('SIGINT', onSigint);
    const result = await engine.generate({ promptIds, adapter, ...sampling }, { signal: controller.signal, onTokens: (ids) => process.stdout.write(detok.pushAll(ids)) });
    process.off('SIGINT', onSigint);
    process.stdout.write(detok.flush());
    const decodeTps = result.decodeSeconds > 0 ? (result.completionTokens - 1) / result.decodeSeconds : 0;
    if (values.json) {
      process.stdout.write(`\n${JSON.stringify({ ids: result.ids, text: engine.tokenizer.decode(result.ids, { skipSpecialTokens: true }), finish_reason: result.finishReason, prompt_tokens: result.promptTokens, completion_tokens: result.completionTokens, decode_tokens_per_s: decodeTps })}\n`);
    } else {
      process.stdout.write('\n');
      process.stderr.write(`[${result.finishReason}; ${result.promptTokens} prompt + ${result.completionTokens} generated tokens; ${decodeTps.toFixed(1)} tokens/s decoding]\n`);
    }
  } finally {
    engine.close();
  }
}

export async function mergeCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv, strict: true,
    options: { model: { type: 'string' }, adapter: { type: 'string' }, out: { type: 'string' }, dtype: { type: 'string' }, into: { type: 'string' }, 'no-fidelity': { type: 'boolean' }, json: { type: 'boolean' }, ...ENGINE_FLAGS },
  });
  const modelDir = required(values, 'model');
  const adapterDir = required(values, 'adapter');
  const outDir = required(values, 'out');
  const dtype = oneOf(values, 'dtype', ['bf16', 'f16', 'f32'] as const, 'bf16') as MergeDtype;
  const into = oneOf(values, 'into', ['original', 'dequantized'] as const, 'original') as MergeInto;
  const bar = values.json ? null : new ProgressBar(process.stderr);
  const report = await mergeAdapterFolder({ modelDir, adapterDir, outDir, dtype, into }, { onProgress: (p) => bar?.update(p.index, p.total, p.tensor) });
  bar?.done();
  let fidelity = null;
  if (values['no-fidelity'] !== true) {
    // base + adapter as they were trained (quantized per --quant) against the merged folder
    const engine = await Engine.load(modelDir, engineOptions(values));
    try {
      fidelity = await mergeFidelity(engine, await engine.loadAdapter(adapterDir), report.outDir);
    } finally {
      engine.close();
    }
  }
  if (values.json) {
    process.stdout.write(`${JSON.stringify({ ...report, fidelity })}\n`);
  } else {
    process.stdout.write(`merged ${report.mergedTensors} of ${report.tensors} tensors into ${report.outDir} (${dtype}, into ${into}, ${(report.bytes / 1e6).toFixed(1)} MB)\n`);
    if (fidelity) process.stdout.write(`fidelity vs base+adapter on a ${fidelity.probeTokens}-token probe: max |Δlogit| ${fidelity.maxAbsLogitDiff.toExponential(3)}, mean ${fidelity.meanAbsLogitDiff.toExponential(3)}, top-1 agreement ${(fidelity.top1Agreement * 100).toFixed(1)}%\n`);
  }
}
