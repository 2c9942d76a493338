// Operations the remote commands share with `tuneserve demo`: a dataset uploaded once per content,
// one generation read to its end, a merge followed to its result.

import { Metadata, status, type CallOptions } from '@grpc/grpc-js';
import { basename } from 'node:path';
import { EngineError } from '../../engine/errors.js';
import { MergeAndUnloadResponse, MergeBase, MergeDtype, MergeResult } from '../../gen/tuneserve/v1/adapters.js';
import { Dataset } from '../../gen/tuneserve/v1/datasets.js';
import { FinishReason, GenerateRequest, type GenerateResponse, type TokenUsage } from '../../gen/tuneserve/v1/generation.js';
import { describeFile, uploadDatasetFile, type TuneClients } from '../../client/index.js';
import { text } from '../flags.js';
import { ProgressBar } from '../progress.js';
import { type CommandIo, unary, isServiceError } from './calls.js';
import { formatSeconds, formatBytes } from './render.js';

/** A dataset id derived from a file's name and content: "memorize-20-1a2b3c4d". */
export function datasetIdFor(file: string, sha256: string): string {
  const stem = basename(file).replace(/\.jsonl?$/i, '').toLowerCase().replace(/[^a-z0-9._-]+/g, '-').replace(/\.\.+/g, '.').replace(/^[^a-z0-9]+/, '');
  return `${stem.slice(0, 50) || 'dataset'}-${sha256.slice(0, 8)}`;
}

/**
 * Makes sure the file is on the server as a dataset: reuses a dataset with the same id and
 * content, otherwise uploads it. Returns the dataset and whether it was uploaded now.
 */
export async function ensureDataset(clients: TuneClients, file: string, datasetId?: string): Promise<{ dataset: Dataset; uploaded: boolean }> {
  const { sha256 } = await describeFile(file);
  const id = datasetId ?? datasetIdFor(file, sha256);
  try {
    const existing = await unary(clients.datasets, clients.datasets.getDataset, { datasetId: id });
    if (existing.dataset && existing.dataset.sha256 === sha256) return { dataset: existing.dataset, uploaded: false };
  } catch (error) {
    if (!isServiceError(error) || error.code !== status.NOT_FOUND) throw error;
  }
  return { dataset: await uploadDatasetFile(clients, id, file), uploaded: true };
}

/** What one Generate call produced. */
export interface Generation {
  text: string;
  tokenIds: number[];
  finishReason: FinishReason;
  usage: TokenUsage | undefined;
  seconds: number;
  /** Seconds until the first non-empty text arrived. */
  firstTextSeconds: number | null;
}

/** Runs one Generate call to its end, handing each text delta to `onText`. */
export async function generateText(
  clients: TuneClients,
  request: Partial<GenerateRequest>,
  options: { timeoutMs?: number | null; onText?: (text: string) => void; signal?: AbortSignal } = {},
): Promise<Generation> {
  const started = performance.now();
  const callOptions: Partial<CallOptions> = options.timeoutMs ? { deadline: new Date(Date.now() + options.timeoutMs) } : {};
  const call = clients.generation.generate(GenerateRequest.fromPartial(request), new Metadata(), callOptions);
  const cancel = (): void => call.cancel();
  options.signal?.addEventListener('abort', cancel, { once: true });
  const result: Generation = { text: '', tokenIds: [], finishReason: FinishReason.FINISH_REASON_UNSPECIFIED, usage: undefined, seconds: 0, firstTextSeconds: null };
  try {
    for await (const message of call as AsyncIterable<GenerateResponse>) {
      if (message.text) {
        result.firstTextSeconds ??= (performance.now() - started) / 1000;
        result.text += message.text;
        options.onText?.(message.text);
      }
      result.tokenIds.push(...message.tokenIds);
      if (message.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) result.finishReason = message.finishReason;
      if (message.usage) result.usage = message.usage;
    }
  } finally {
    options.signal?.removeEventListener('abort', cancel);
  }
  result.seconds = (performance.now() - started) / 1000;
  return result;
}

/** Runs MergeAndUnload to its end with a progress bar (or JSON lines); returns the result. */
export async function mergeAdapter(
  clients: TuneClients,
  request: { adapterId: string; outputName: string; dtype?: MergeDtype; base?: MergeBase; unloadAdapter?: boolean },
  io: CommandIo,
  options: { json?: boolean; timeoutMs?: number | null } = {},
): Promise<MergeResult> {
  const callOptions: Partial<CallOptions> = options.timeoutMs ? { deadline: new Date(Date.now() + options.timeoutMs) } : {};
  const stream = clients.adapters.mergeAndUnload({
    adapterId: request.adapterId, outputName: request.outputName, dtype: request.dtype ?? MergeDtype.MERGE_DTYPE_UNSPECIFIED,
    base: request.base ?? MergeBase.MERGE_BASE_UNSPECIFIED, unloadAdapter: request.unloadAdapter ?? false,
  }, new Metadata(), callOptions);
  const bar = options.json ? null : new ProgressBar(io.stderr as NodeJS.WriteStream);
  let result: MergeResult | undefined;
  try {
    for await (const message of stream as AsyncIterable<MergeAndUnloadResponse>) {
      if (options.json) io.stdout.write(`${JSON.stringify(MergeAndUnloadResponse.toJSON(message))}\n`);
      if (message.progress) bar?.update(message.progress.tensorsDone, message.progress.tensorCount, message.progress.tensorName);
      if (message.result) result = message.result;
    }
  } finally {
    bar?.done();
  }
  if (!result) throw new EngineError('INTERNAL', 'the merge stream ended without a result');
  return result;
}

/** The merge result in two lines: folder, size, tensors; fidelity. */
export function describeMerge(result: MergeResult): string {
  const f = result.fidelity;
  return `merged into export folder "${result.outputName}": ${formatBytes(result.sizeBytes)}, ${result.tensorCount} tensors, ${formatSeconds(result.elapsedSeconds)}` +
    `${result.adapterUnloaded ? ', adapter unloaded' : ''}\n` +
    (f ? `fidelity vs base+adapter on a ${f.probeTokens}-token probe: max |Δlogit| ${f.maxAbsLogitDiff.toExponential(3)}, ` +
      `mean ${f.meanAbsLogitDiff.toExponential(3)}, top-1 agreement ${(f.top1Agreement * 100).toFixed(1)}%\n` : '');
}
