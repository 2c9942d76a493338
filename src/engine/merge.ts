// MergeAndUnload: folds a PEFT adapter into the base model's original weights and writes a standard
// Hugging Face folder (shards, index, config, generation config, tokenizer files) that vLLM/TGI load
// as-is. The native side streams the shards tensor by tensor; this side lays out the folder, which is
// built beside its destination and renamed into place. mergeFidelity() then measures how far the
// merged model's logits are from base + adapter on a probe prompt.

import { readFile, rm, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';

import { Engine, nativeConfig, nativeLora, type Adapter } from './engine.js';
import { EngineError } from './errors.js';
import { loadModelFolder } from './model-folder.js';
import { awaitCancellable } from './cancel.js';
import { native } from './native.js';
import { ADAPTER_WEIGHTS_FILE, readAdapterConfig } from './peft-config.js';
import { readSafetensorsHeader } from './safetensors.js';
import { replaceFolder, tempFolderBeside, writeFileAtomic } from './atomic-file.js';
import { writeModelManifest } from './integrity.js';

export type MergeDtype = 'bf16' | 'f16' | 'f32';
export type MergeInto = 'original' | 'dequantized';

const TORCH_DTYPE: Record<MergeDtype, string> = { bf16: 'bfloat16', f16: 'float16', f32: 'float32' };
const COPIED_FILES = ['generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'];

export interface MergeOptions {
  modelDir: string;
  adapterDir: string;
  outDir: string;
  dtype?: MergeDtype;
  into?: MergeInto;
}

export interface MergeProgress {
  tensor: string;
  index: number;
  total: number;
  merged: boolean;
}

export interface MergeReport {
  outDir: string;
  files: string[];
  bytes: number;
  tensors: number;
  mergedTensors: number;
  dtype: MergeDtype;
  into: MergeInto;
}

export async function mergeAdapterFolder(
  options: MergeOptions,
  handlers: { onProgress?: (p: MergeProgress) => void; signal?: AbortSignal } = {},
): Promise<MergeReport> {
  const dtype = options.dtype ?? 'bf16';
  const into = options.into ?? 'original';
  if (!(dtype in TORCH_DTYPE)) throw new EngineError('INVALID_ARGUMENT', `dtype must be bf16, f16 or f32, got ${dtype}`, { field: 'dtype' });
  if (into !== 'original' && into !== 'dequantized') throw new EngineError('INVALID_ARGUMENT', `into must be original or dequantized, got ${String(into)}`, { field: 'into' });
  const folder = await loadModelFolder(options.modelDir);
  const { lora } = await readAdapterConfig(options.adapterDir);
  const adapterFile = join(options.adapterDir, ADAPTER_WEIGHTS_FILE);
  await stat(adapterFile).catch((e: unknown) => { throw new EngineError('NOT_FOUND', `missing ${adapterFile}`, { file: adapterFile }, { cause: e }); });
  const target = resolve(options.outDir);
  if (target === folder.dir) throw new EngineError('INVALID_ARGUMENT', 'the merge output must not be the base model folder', { field: 'out' });
  const tmp = await tempFolderBeside(target);
  try {
    const job = native().mergeAdapter(
      { config: nativeConfig(folder.config), shards: folder.shards, outDir: tmp, adapterFile, lora: nativeLora(lora), dtype, into },
      (p) => handlers.onProgress?.(p),
    );
    const result = await awaitCancellable(job.promise, () => job.cancel(), handlers.signal);

    // config.json as the source's, with the dtype of the written weights.
    const config = JSON.parse(await readFile(join(folder.dir, 'config.json'), 'utf8')) as Record<string, unknown>;
    config.torch_dtype = TORCH_DTYPE[dtype];
    await writeFileAtomic(join(tmp, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
    for (const name of COPIED_FILES) {
      const src = join(folder.dir, name);
      // Written durably like the rest (a plain copy is not fsynced before the folder is published).
      if (await exists(src)) await writeFileAtomic(join(tmp, name), await readFile(src));
    }
    if (result.files.length > 1 || (await exists(join(folder.dir, 'model.safetensors.index.json')))) {
      let totalSize = 0;
      for (const f of result.files) {
        const header = await readSafetensorsHeader(join(tmp, f));
        for (const t of header.tensors.values()) totalSize += t.dataOffsets[1] - t.dataOffsets[0];
      }
      const weightMap = Object.fromEntries(Object.entries(result.weightMap).sort(([a], [b]) => a.localeCompare(b)));
      await writeFileAtomic(join(tmp, 'model.safetensors.index.json'), `${JSON.stringify({ metadata: { total_size: totalSize }, weight_map: weightMap }, null, 2)}\n`);
    }
    // The manifest later loads are checked against (integrity.ts).
    await writeModelManifest(tmp);
    await replaceFolder(tmp, target);
    return { outDir: target, files: result.files, bytes: result.bytes, tensors: result.tensors, mergedTensors: result.mergedTensors, dtype, into };
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
}

export interface MergeFidelity {
  probeTokens: number;
  /** max |merged − (base + adapter)| over all probe logits. */
  maxAbsLogitDiff: number;
  meanAbsLogitDiff: number;
  /** max |diff| / max |base + adapter logit|. */
  relativeMaxDiff: number;
  /** Fraction of probe positions whose argmax token agrees. */
  top1Agreement: number;
}

export const DEFAULT_PROBE = 'The quick brown fox jumps over the lazy dog. Merging must not change what the model says.';

/**
 * Compares the merged folder (loaded unquantized) with `engine` + `adapter` on a probe prompt. With
 * an NF4 base, "original" merges carry the NF4 quantization error into the comparison; "dequantized"
 * merges differ only by the output dtype's rounding.
 */
const PROBE_KV_CACHE_BYTES = 64 * 1024 * 1024;

export async function mergeFidelity(engine: Engine, adapter: Adapter, mergedDir: string, probe = DEFAULT_PROBE): Promise<MergeFidelity> {
  const ids = engine.tokenizer.encode(probe, { addBos: true });
  const reference = await engine.logits(ids, adapter);
  // The merged model runs on the serving engine's backend too, with a cache just big enough for the probe.
  const merged = await Engine.load(mergedDir, {
    quant: 'none', device: engine.device, cudaCompute: engine.cudaCompute, maxActiveSequences: 1, adapterSlots: 1,
    maxSeqLen: ids.length, kvCacheBytes: PROBE_KV_CACHE_BYTES, log: () => {},
    verifyIntegrity: false, // its manifest was just taken from these very bytes
  });
  try {
    const got = await merged.logits(ids, null);
    const V = engine.config.vocabSize;
    let maxAbs = 0, sumAbs = 0, maxRef = 0, agree = 0;
    for (let t = 0; t < ids.length; t++) {
      let argA = 0, argB = 0;
      for (let v = 0; v < V; v++) {
        const i = t * V + v;
        const d = Math.abs(got[i]! - reference[i]!);
        maxAbs = Math.max(maxAbs, d);
        sumAbs += d;
        maxRef = Math.max(maxRef, Math.abs(reference[i]!));
        if (reference[i]! > reference[t * V + argA]!) argA = v;
        if (got[i]! > got[t * V + argB]!) argB = v;
      }
      agree += argA === argB ? 1 : 0;
    }
    return { probeTokens: ids.length, maxAbsLogitDiff: maxAbs, meanAbsLogitDiff: sumAbs / reference.length, relativeMaxDiff: maxRef > 0 ? maxAbs / maxRef : 0, top1Agreement: agree / ids.length };
  } finally {
    merged.close();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}
