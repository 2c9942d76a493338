// `tuneserve remote <command> --addr host:port`: the CLI as a client of a running tuneserve server
// (train with a live loss readout, generate, merge, jobs, adapters, datasets, info), plus the call
// helpers and renderers that `tuneserve demo` shares. Failed calls become one error line with the
// gRPC status name, the ErrorInfo reason and the field violations.

import { Metadata, status, type CallOptions, type Client, type ClientUnaryCall, type ServiceError } from '@grpc/grpc-js';
import { basename } from 'node:path';
import { parseArgs } from 'node:util';

import { EngineError } from '../engine/errors.js';
import { Adapter, AdapterSource, MergeAndUnloadResponse, MergeBase, MergeDtype, MergeResult } from '../gen/tuneserve/v1/adapters.js';
import { Dataset } from '../gen/tuneserve/v1/datasets.js';
import { ChatMessage, FinishReason, GenerateRequest, type GenerateResponse, type TokenUsage } from '../gen/tuneserve/v1/generation.js';
import { GetModelInfoResponse, Quantization } from '../gen/tuneserve/v1/model.js';
import {
  GetJobResponse, Job, JobEvent, JobState, LrScheduler, TrainingConfig, TrainRequest, type DatasetReport, type TrainResponse, type TrainingStep,
} from '../gen/tuneserve/v1/training.js';
import {
  createClients, describeFile, exportAdapterFolder, importAdapterFolder, statusDetailsOf, uploadDatasetFile, type TuneClients,
} from '../server/client.js';
import { choice, count, float, required, text, type Flags } from './flags.js';
import { ProgressBar } from './progress.js';

/** Where a command writes: stdout for results, stderr for progress and notes (tests pass their own). */
export interface CommandIo {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
}

const processIo: CommandIo = { stdout: process.stdout, stderr: process.stderr };

export const REMOTE_USAGE = `usage: tuneserve remote <command> [--addr host:port] [--token T] [--timeout SECONDS] [--json]

  info                                 the served base model, device, memory and limits
  train     (--dataset-file FILE.jsonl | --dataset ID) --adapter-id NAME [--job-id ID] [--init-adapter NAME]
            [--rank --alpha --dropout --targets LIST|all-linear --lr --steps --epochs --batch-size --grad-accum
             --max-seq-len --scheduler constant|linear|cosine --warmup-steps --weight-decay --max-grad-norm --seed
             --no-shuffle --eval-fraction --eval-every --checkpoint-every] [--detach]
  generate  (--prompt TEXT [--chat] | --messages JSON | --prompt-ids 1,2,3) [--adapter NAME] [--max-tokens N]
            [--temperature 0] [--top-k --top-p --repetition-penalty --seed --stop TEXT (repeatable) --ignore-eos]
  merge     --adapter NAME --out-name NAME [--dtype bf16|f16|f32] [--into original|dequantized] [--unload]
  jobs      list [--state queued,running,...] [--limit N] | get ID [--history] | watch ID [--after N] | cancel ID
  adapters  list [--loaded] | get ID | load ID | unload ID | delete ID | import ID DIR | export ID DIR
  datasets  list | upload FILE.jsonl [--dataset-id ID] | delete ID

  --addr defaults to $TUNESERVE_ADDR or 127.0.0.1:50051, --token to $TUNESERVE_TOKEN. --timeout is the deadline of
  each call (default 30 s for single calls, none for streams). --json prints one JSON object per event, item or
  result (generate: one object at the end). Unset training flags take the server's defaults (see TrainingConfig).
`;

// ---------------------------------------------------------------------------------------------
// Calls and errors
// ---------------------------------------------------------------------------------------------

type UnaryMethod<Request, Response> = (
  request: Request,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Response) => void,
) => ClientUnaryCall;

/** Calls a unary method of a generated client as a promise, with an optional deadline. */
export function unary<Request, Response>(
  client: Client,
  method: UnaryMethod<Request, Response>,
  request: Request,
  timeoutMs: number | null = DEFAULT_UNARY_TIMEOUT_MS,
): Promise<Response> {
  const options: Partial<CallOptions> = timeoutMs === null ? {} : { deadline: new Date(Date.now() + timeoutMs) };
  return new Promise((resolve, reject) => {
    method.call(client, request, new Metadata(), options, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

const DEFAULT_UNARY_TIMEOUT_MS = 30_000;

/** True for the errors grpc-js client calls fail with. */
export function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as { code?: unknown }).code === 'number' && 'metadata' in error;
}

/** The name of a gRPC status code, e.g. 5 → NOT_FOUND. */
export function statusName(code: number): string {
  return status[code] ?? `CODE_${code}`;
}

/**
 * One line saying why a call failed: the server's message, then its ErrorInfo reason, field
 * violations and retry hint, e.g. `ADAPTER_NOT_FOUND: adapter "x" not found`.
 */
export function describeCallError(error: ServiceError): string {
  const details = statusDetailsOf(error);
  const message = (details?.message || error.details || error.message).replace(/\s+/g, ' ').trim();
  let line = details?.reason ? `${details.reason}: ${message}` : message;
  // Violations the message does not already say (it usually names the first one).
  const violations = (details?.fieldViolations ?? []).filter((v) => !message.includes(`${v.field} ${v.description}`));
  if (violations.length > 0) line += ` [${violations.map((v) => `${v.field}: ${v.description}`).join('; ')}]`;
  if (details?.retryAfterMs != null) line += ` (retry in ${(details.retryAfterMs / 1000).toFixed(1)} s)`;
  return line;
}

/** Turns a failed call into the CLI's error (code = status name, so main prints `[NOT_FOUND] ...`). */
export function cliError(error: unknown): unknown {
  if (!isServiceError(error)) return error;
  return new EngineError(statusName(error.code), describeCallError(error), undefined, { cause: error });
}

// ---------------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------------

function positional(positionals: string[], index: number, what: string): string {
  const value = positionals[index];
  if (value === undefined || value === '') throw new EngineError('INVALID_ARGUMENT', `missing ${what}`, { field: what });
  return value;
}

const COMMON_FLAGS = {
  addr: { type: 'string' },
  token: { type: 'string' },
  timeout: { type: 'string' },
  json: { type: 'boolean' },
} as const;

const TRAINING_FLAGS = {
  rank: { type: 'string' }, alpha: { type: 'string' }, dropout: { type: 'string' }, targets: { type: 'string' }, lr: { type: 'string' },
  steps: { type: 'string' }, epochs: { type: 'string' }, 'batch-size': { type: 'string' }, 'grad-accum': { type: 'string' },
  'max-seq-len': { type: 'string' }, scheduler: { type: 'string' }, 'warmup-steps': { type: 'string' }, 'weight-decay': { type: 'string' },
  'max-grad-norm': { type: 'string' }, seed: { type: 'string' }, 'no-shuffle': { type: 'boolean' }, 'eval-fraction': { type: 'string' },
  'eval-every': { type: 'string' }, 'checkpoint-every': { type: 'string' },
} as const;

const SCHEDULERS = { constant: LrScheduler.LR_SCHEDULER_CONSTANT, linear: LrScheduler.LR_SCHEDULER_LINEAR, cosine: LrScheduler.LR_SCHEDULER_COSINE } as const;

/** The TrainingConfig the training flags describe; unset flags stay 0/absent (server defaults). */
export function trainingConfigFromFlags(flags: Flags): TrainingConfig {
  const scheduler = choice(flags, 'scheduler', ['constant', 'linear', 'cosine'] as const);
  const targets = text(flags, 'targets');
  const dropout = float(flags, 'dropout');
  const maxGradNorm = float(flags, 'max-grad-norm');
  return TrainingConfig.fromPartial({
    rank: count(flags, 'rank') ?? 0,
    alpha: float(flags, 'alpha') ?? 0,
    ...(dropout !== undefined ? { dropout } : {}),
    targetModules: targets === undefined ? [] : targets.split(',').map((t) => t.trim()).filter(Boolean),
    learningRate: float(flags, 'lr') ?? 0,
    maxSteps: count(flags, 'steps') ?? 0,
    epochs: count(flags, 'epochs') ?? 0,
    batchSize: count(flags, 'batch-size') ?? 0,
    gradAccum: count(flags, 'grad-accum') ?? 0,
    maxSeqLen: count(flags, 'max-seq-len') ?? 0,
    scheduler: scheduler ? SCHEDULERS[scheduler] : LrScheduler.LR_SCHEDULER_UNSPECIFIED,
    warmupSteps: count(flags, 'warmup-steps') ?? 0,
    weightDecay: float(flags, 'weight-decay') ?? 0,
    ...(maxGradNorm !== undefined ? { maxGradNorm } : {}),
    seed: count(flags, 'seed') ?? 0,
    ...(flags['no-shuffle'] === true ? { shuffle: false } : {}),
    evalFraction: float(flags, 'eval-fraction') ?? 0,
    evalEvery: count(flags, 'eval-every') ?? 0,
    checkpointEvery: count(flags, 'checkpoint-every') ?? 0,
  });
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/** Seconds as "42 s", "3 min 05 s". */
export function formatSeconds(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${String(Math.round(seconds - minutes * 60)).padStart(2, '0')} s`;
}

/** Bytes as "1.2 MB". */
export function formatBytes(bytes: number): string {
  if (bytes < 1000) return `${bytes} B`;
  const units = ['kB', 'MB', 'GB', 'TB'];
  let value = bytes / 1000;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

/** Left-aligned columns separated by two spaces; the first row is the header. */
export function formatTable(rows: string[][]): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, [...cell].length)));
  return rows.map((row) => row.map((cell, i) => (i === row.length - 1 ? cell : cell + ' '.repeat((widths[i] ?? 0) - [...cell].length))).join('  ').trimEnd()).join('\n') + '\n';
}

/** An enum value's name without its prefix, lower case: JOB_STATE_RUNNING → running. */
function enumLabel(name: string, prefix: string): string {
  return name.startsWith(prefix) ? name.slice(prefix.length).toLowerCase() : name.toLowerCase();
}

export function jobStateLabel(state: JobState): string {
  return enumLabel(JobState[state] ?? String(state), 'JOB_STATE_');
}

export function finishReasonLabel(reason: FinishReason): string {
  return enumLabel(FinishReason[reason] ?? String(reason), 'FINISH_REASON_');
}

/** The dataset report event in one line. */
export function datasetReportLine(r: DatasetReport): string {
  const formats = Object.entries(r.rowsByFormat ?? {}).filter(([, n]) => (n as number) > 0).map(([format, n]) => `${n} ${format}`).join(', ');
  const percent = (fraction: number) => `${(fraction * 100).toFixed(1)}%`;
  return `dataset: ${r.rows} rows (${formats}), ${r.tokens} tokens, ${r.scoredTokens} scored; longest ${r.longestRowTokens} tokens (line ${r.longestRowLine}), ` +
    `${r.truncatedRows} truncated to ${r.maxSeqLen}; scored per row mean ${percent(r.meanScoredFraction)}, min ${percent(r.minScoredFraction)} (line ${r.minScoredFractionLine})`;
}

/** The live readout after one optimizer step. */
export function stepLabel(step: TrainingStep): string {
  return `loss ${step.loss.toFixed(4)}  lr ${step.learningRate.toExponential(2)}  ${step.tokensPerSecond.toFixed(0)} tok/s  ` +
    `epoch ${step.epoch.toFixed(2)}  eta ${formatSeconds(step.etaSeconds)}`;
}

/** How a job stream ended. */
export interface JobOutcome {
  jobId: string;
  /** The last event (completed, failed, cancelled or interrupted), or null when the stream ended before one. */
  last: JobEvent | null;
  /** Every step seen, in order. */
  steps: TrainingStep[];
}

/**
 * Follows a stream of job events (Train or WatchJob): a progress bar with the loss readout on
 * stderr and one line per notable event, or one JSON object per event on stdout with --json.
 */
export async function followJob(
  stream: AsyncIterable<TrainResponse>,
  io: CommandIo,
  options: { json?: boolean; onEvent?: (event: JobEvent) => void } = {},
): Promise<JobOutcome> {
  const bar = options.json ? null : new ProgressBar(io.stderr as NodeJS.WriteStream);
  const outcome: JobOutcome = { jobId: '', last: null, steps: [] };
  const note = (line: string): void => {
    bar?.done();
    io.stderr.write(`${line}\n`);
  };
  try {
    for await (const { event } of stream) {
      if (!event) continue;
      outcome.jobId = event.jobId;
      options.onEvent?.(event);
      if (options.json) io.stdout.write(`${JSON.stringify(JobEvent.toJSON(event))}\n`);
      if (event.step) outcome.steps.push(event.step);
      if (event.completed || event.failed || event.cancelled || event.interrupted) outcome.last = event;
      if (options.json) continue;
      if (event.queued) note(`job ${event.jobId} queued${event.queued.queuePosition > 0 ? ` behind ${event.queued.queuePosition} job(s)` : ''}`);
      else if (event.datasetReport) note(datasetReportLine(event.datasetReport));
      else if (event.started) note(`job ${event.jobId} started: ${event.started.totalSteps} steps over ${event.started.trainExamples} examples${event.started.evalExamples ? ` (${event.started.evalExamples} held out)` : ''}`);
      else if (event.step) bar?.update(event.step.step, event.step.totalSteps, stepLabel(event.step));
      else if (event.evaluation) note(`eval after step ${event.evaluation.step}: loss ${event.evaluation.loss.toFixed(4)}`);
      else if (event.checkpoint) note(`checkpoint saved at step ${event.checkpoint.step}`);
    }
  } finally {
    bar?.done();
  }
  return outcome;
}

/** Prints how a job ended; throws (non-zero exit) unless it completed or the stream left it running. */
export function reportJobOutcome(outcome: JobOutcome, io: CommandIo, json: boolean): void {
  throwUnlessCompleted(outcome);
  const completed = outcome.last?.completed;
  if (!completed || json) return;
  const m = completed.metrics;
  const first = outcome.steps[0];
  io.stdout.write(`adapter "${completed.adapterId}" trained by job ${outcome.jobId}: ${m?.steps ?? 0} steps, ` +
    `${first ? `loss ${first.loss.toFixed(4)} → ` : 'final loss '}${(m?.finalLoss ?? 0).toFixed(4)}` +
    `${m?.evalLoss !== undefined ? `, eval loss ${m.evalLoss.toFixed(4)}` : ''}, ${m?.tokens ?? 0} tokens, ${formatSeconds(m?.trainSeconds ?? 0)}\n`);
}

/**
 * Throws the CLI error for a job that failed, was cancelled or was interrupted. A stream without a
 * last event (a detached Train, or one that closed early) left the job running: no error.
 */
export function throwUnlessCompleted(outcome: JobOutcome): void {
  const last = outcome.last;
  if (!last || last.completed) return;
  if (last.failed) throw new EngineError('JOB_FAILED', `job ${last.jobId} failed: ${last.failed.reason}: ${last.failed.message.replace(/\s+/g, ' ')}`);
  if (last.cancelled) throw new EngineError('CANCELLED', `job ${last.jobId} was cancelled after ${last.cancelled.stepsCompleted} steps`);
  if (last.interrupted) {
    throw new EngineError('INTERRUPTED', `job ${last.jobId} was interrupted at step ${last.interrupted.lastStep} (last checkpoint: step ${last.interrupted.lastCheckpointStep})`);
  }
}

function adapterRow(a: Adapter): string[] {
  const c = a.config;
  return [
    a.adapterId,
    a.loaded ? 'yes' : 'no',
    a.matchesBase ? 'yes' : 'NO',
    c ? String(c.rank) : '',
    c ? String(c.alpha) : '',
    c ? c.targetModules.join(',') : '',
    enumLabel(AdapterSource[a.source] ?? '', 'ADAPTER_SOURCE_'),
    formatBytes(a.sizeBytes),
    a.metrics ? a.metrics.finalLoss.toFixed(4) : '',
    a.createTime ? a.createTime.toISOString().slice(0, 19).replace('T', ' ') : '',
  ];
}

const ADAPTER_HEADER = ['ADAPTER', 'LOADED', 'FITS BASE', 'RANK', 'ALPHA', 'TARGETS', 'SOURCE', 'SIZE', 'FINAL LOSS', 'CREATED'];

function describeAdapter(a: Adapter): string {
  const c = a.config;
  const lines = [
    `adapter      ${a.adapterId}`,
    `source       ${enumLabel(AdapterSource[a.source] ?? '', 'ADAPTER_SOURCE_')}${a.jobId ? ` (job ${a.jobId})` : ''}`,
    `created      ${a.createTime?.toISOString() ?? '?'}`,
    `loaded       ${a.loaded ? 'yes (in a device pool slot)' : 'no'}`,
    `base         ${a.baseFingerprint.slice(0, 16)}… ${a.matchesBase ? '(matches the served base)' : '(built for ANOTHER base)'}`,
    `size         ${formatBytes(a.sizeBytes)}`,
  ];
  if (c) lines.push(`lora         r ${c.rank}, alpha ${c.alpha}${c.useRslora ? ' (rslora)' : ''}, dropout ${c.dropout}, on ${c.targetModules.join(',')}`);
  if (a.metrics) {
    const m = a.metrics;
    lines.push(`metrics      ${m.steps} steps, final loss ${m.finalLoss.toFixed(4)}${m.evalLoss !== undefined ? `, eval loss ${m.evalLoss.toFixed(4)}` : ''}, ${m.tokens} tokens, ${formatSeconds(m.trainSeconds)}`);
  }
  return `${lines.join('\n')}\n`;
}

function jobRow(j: Job): string[] {
  return [
    j.jobId,
    jobStateLabel(j.state),
    j.adapterId,
    j.totalSteps > 0 ? `${j.lastStep?.step ?? 0}/${j.totalSteps}` : '',
    j.lastStep ? j.lastStep.loss.toFixed(4) : '',
    j.datasetId || 'inline',
    j.createTime ? j.createTime.toISOString().slice(0, 19).replace('T', ' ') : '',
  ];
}

function describeJob(response: GetJobResponse): string {
  const j = response.job;
  if (!j) return '';
  const lines = [
    `job          ${j.jobId}`,
    `state        ${jobStateLabel(j.state)}${j.state === JobState.JOB_STATE_QUEUED ? ` (${j.queuePosition} ahead)` : ''}`,
    `adapter      ${j.adapterId}${j.initAdapterId ? ` (continues ${j.initAdapterId})` : ''}`,
    `dataset      ${j.datasetId || 'inline rows'}`,
    `created      ${j.createTime?.toISOString() ?? '?'}`,
  ];
  if (j.startTime) lines.push(`started      ${j.startTime.toISOString()}`);
  if (j.endTime) lines.push(`ended        ${j.endTime.toISOString()}`);
  if (j.lastStep) lines.push(`progress     step ${j.lastStep.step}/${j.totalSteps}, ${stepLabel(j.lastStep)}`);
  if (j.metrics) lines.push(`metrics      final loss ${j.metrics.finalLoss.toFixed(4)}, ${j.metrics.steps} steps, ${j.metrics.tokens} tokens, ${formatSeconds(j.metrics.trainSeconds)}`);
  if (j.failureReason) lines.push(`failure      ${j.failureReason}: ${j.failureMessage}`);
  if (j.lastCheckpointStep > 0) lines.push(`checkpoint   step ${j.lastCheckpointStep}`);
  const c = j.config;
  if (c) {
    lines.push(`config       r ${c.rank}, alpha ${c.alpha}, dropout ${c.dropout ?? '?'}, ${c.targetModules.join(',')}; lr ${c.learningRate} ` +
      `${enumLabel(LrScheduler[c.scheduler] ?? '', 'LR_SCHEDULER_')}, batch ${c.batchSize} × ${c.gradAccum}, ` +
      `${c.maxSteps > 0 ? `${c.maxSteps} steps` : `${c.epochs} epoch(s)`}, seed ${c.seed}`);
  }
  let out = `${lines.join('\n')}\n`;
  if (response.steps.length > 0) {
    out += `\n${formatTable([['STEP', 'EPOCH', 'LOSS', 'GRAD NORM', 'LR', 'TOK/S'], ...response.steps.map((s) => [
      String(s.step), s.epoch.toFixed(2), s.loss.toFixed(4), s.gradNorm.toFixed(3), s.learningRate.toExponential(2), s.tokensPerSecond.toFixed(0),
    ])])}`;
  }
  for (const e of response.evaluations) out += `eval after step ${e.step}: loss ${e.loss.toFixed(4)}\n`;
  return out;
}

function describeModel(info: GetModelInfoResponse): string {
  const a = info.architecture;
  const m = info.memory;
  const l = info.limits;
  const lines = [
    `model        ${info.modelName} (${info.sourceDtype} weights, ${enumLabel(Quantization[info.quantization] ?? '', 'QUANTIZATION_')} in memory)`,
  ];
  if (a) lines.push(`architecture ${a.numLayers} layers, hidden ${a.hiddenSize}, mlp ${a.intermediateSize}, heads ${a.numAttentionHeads}/${a.numKeyValueHeads} × ${a.headDim}, vocab ${a.vocabSize}, context ${a.maxPositionEmbeddings}`);
  lines.push(`device       ${info.device}`);
  if (m) lines.push(`memory       weights ${formatBytes(m.weightsBytes)}, adapters ${formatBytes(m.adapterPoolBytes)}, kv cache ${formatBytes(m.kvCacheBytes)}, free ${formatBytes(m.deviceFreeBytes)} of ${formatBytes(m.deviceTotalBytes)}`);
  if (l) lines.push(`limits       max_seq_len ${l.maxSeqLen}, adapter slots ${l.adapterSlotsUsed}/${l.adapterSlots}, ${l.maxConcurrentGenerations} concurrent generations, ${l.maxQueuedJobs} queued jobs`);
  lines.push(`fingerprint  ${info.baseFingerprint}`, `chat         ${info.hasChatTemplate ? 'yes' : 'no'}`, `scheduling   ${info.scheduling}`, `server       ${info.serverVersion}`);
  return `${lines.join('\n')}\n`;
}

// ---------------------------------------------------------------------------------------------
// Operations shared with `tuneserve demo`
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Subcommands
// ---------------------------------------------------------------------------------------------

interface Context {
  clients: TuneClients;
  flags: Flags;
  positionals: string[];
  io: CommandIo;
  json: boolean;
  /** Deadline of single calls, ms. */
  unaryTimeoutMs: number;
  /** Deadline of streams, ms, or null for none. */
  streamTimeoutMs: number | null;
}

async function infoCommand(c: Context): Promise<void> {
  const info = await unary(c.clients.model, c.clients.model.getModelInfo, {}, c.unaryTimeoutMs);
  c.io.stdout.write(c.json ? `${JSON.stringify(GetModelInfoResponse.toJSON(info))}\n` : describeModel(info));
}

async function trainRemote(c: Context): Promise<void> {
  const adapterId = required(c.flags, 'adapter-id');
  const file = text(c.flags, 'dataset-file');
  const datasetFlag = text(c.flags, 'dataset');
  if ((file === undefined) === (datasetFlag === undefined)) throw new EngineError('INVALID_ARGUMENT', 'give exactly one of --dataset-file and --dataset', { field: 'dataset' });
  let datasetId = datasetFlag as string;
  if (file !== undefined) {
    const { dataset, uploaded } = await ensureDataset(c.clients, file, text(c.flags, 'dataset-id'));
    datasetId = dataset.datasetId;
    if (!c.json) c.io.stderr.write(`${uploaded ? 'uploaded' : 'reusing'} dataset ${dataset.datasetId} (${dataset.rowCount} rows, ${formatBytes(dataset.sizeBytes)})\n`);
  }
  const request = TrainRequest.fromPartial({
    jobId: text(c.flags, 'job-id') ?? '', adapterId, datasetId, config: trainingConfigFromFlags(c.flags),
    initAdapterId: text(c.flags, 'init-adapter') ?? '', detach: c.flags.detach === true,
  });
  const callOptions: Partial<CallOptions> = c.streamTimeoutMs ? { deadline: new Date(Date.now() + c.streamTimeoutMs) } : {};
  const stream = c.clients.training.train(request, new Metadata(), callOptions);
  // The job belongs to the server: leaving the stream does not stop it, so say how to find it again.
  let jobId = request.jobId;
  const onInterrupt = (): void => {
    c.io.stderr.write(`\nleft the stream; job ${jobId || '(not yet queued)'} keeps running on the server: ` +
      `watch it with \`tuneserve remote jobs watch ${jobId}\`, stop it with \`tuneserve remote jobs cancel ${jobId}\`\n`);
    stream.cancel();
  };
  process.once('SIGINT', onInterrupt);
  try {
    const outcome = await followJob(stream, c.io, { json: c.json, onEvent: (event) => (jobId = event.jobId) });
    if (request.detach && !c.json) c.io.stdout.write(`job ${outcome.jobId} queued (detached); follow it with \`tuneserve remote jobs watch ${outcome.jobId}\`\n`);
    reportJobOutcome(outcome, c.io, c.json);
  } catch (error) {
    if (isServiceError(error) && error.code === status.CANCELLED) return; // we left on SIGINT
    throw error;
  } finally {
    process.off('SIGINT', onInterrupt);
  }
}

/** The prompt part of a GenerateRequest from --prompt [--chat] | --messages | --prompt-ids. */
function promptFromFlags(flags: Flags): Partial<GenerateRequest> {
  const prompt = text(flags, 'prompt');
  const messages = text(flags, 'messages');
  const ids = text(flags, 'prompt-ids');
  if ([prompt, messages, ids].filter((v) => v !== undefined).length !== 1) {
    throw new EngineError('INVALID_ARGUMENT', 'give exactly one of --prompt, --messages and --prompt-ids', { field: 'prompt' });
  }
  if (prompt !== undefined) return flags.chat === true ? { chat: { messages: [{ role: 'user', content: prompt }] } } : { text: prompt };
  if (ids !== undefined) {
    return {
      tokenIds: {
        ids: ids.split(',').map((item, i) => {
          const n = Number(item.trim());
          if (item.trim() === '' || !Number.isInteger(n) || n < 0) throw new EngineError('INVALID_ARGUMENT', `--prompt-ids: item ${i + 1} (${JSON.stringify(item)}) is not a token id`, { field: 'prompt-ids' });
          return n;
        }),
      },
    };
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(messages as string);
  } catch (error) {
    throw new EngineError('INVALID_ARGUMENT', `--messages is not JSON: ${(error as Error).message}`, { field: 'messages' });
  }
  const list = Array.isArray(parsed) ? parsed : (parsed as { messages?: unknown } | null)?.messages;
  if (!Array.isArray(list) || !list.every((m) => typeof m?.role === 'string' && typeof m?.content === 'string')) {
    throw new EngineError('INVALID_ARGUMENT', '--messages must be a JSON array of {"role","content"} objects (or {"messages":[...]})', { field: 'messages' });
  }
  return { chat: { messages: list.map((m: { role: string; content: string }) => ChatMessage.fromPartial({ role: m.role, content: m.content })) } };
}

async function generateRemote(c: Context): Promise<void> {
  const topP = float(c.flags, 'top-p');
  const penalty = float(c.flags, 'repetition-penalty');
  const seed = count(c.flags, 'seed');
  const stops = c.flags.stop;
  const request: Partial<GenerateRequest> = {
    ...promptFromFlags(c.flags),
    adapterId: text(c.flags, 'adapter') ?? '',
    maxTokens: count(c.flags, 'max-tokens') ?? 0,
    temperature: float(c.flags, 'temperature') ?? 0, // greedy by default, like `tuneserve generate`
    topK: count(c.flags, 'top-k') ?? 0,
    ...(topP !== undefined ? { topP } : {}),
    ...(penalty !== undefined ? { repetitionPenalty: penalty } : {}),
    ...(seed !== undefined ? { seed } : {}),
    stopSequences: Array.isArray(stops) ? stops : [],
    ignoreEos: c.flags['ignore-eos'] === true,
    returnTokenIds: c.json,
  };
  const controller = new AbortController();
  const onInterrupt = (): void => controller.abort();
  process.once('SIGINT', onInterrupt);
  let result: Generation;
  try {
    result = await generateText(c.clients, request, {
      timeoutMs: c.streamTimeoutMs, signal: controller.signal, onText: c.json ? undefined : (delta) => c.io.stdout.write(delta),
    });
  } catch (error) {
    if (isServiceError(error) && error.code === status.CANCELLED && controller.signal.aborted) {
      c.io.stderr.write('\n[cancelled]\n');
      return;
    }
    throw error;
  } finally {
    process.off('SIGINT', onInterrupt);
  }
  const usage = result.usage;
  const decodeTps = usage && result.seconds > 0 ? usage.completionTokens / result.seconds : 0;
  if (c.json) {
    c.io.stdout.write(`${JSON.stringify({
      text: result.text, tokenIds: result.tokenIds, finishReason: finishReasonLabel(result.finishReason),
      usage: { promptTokens: usage?.promptTokens ?? 0, completionTokens: usage?.completionTokens ?? 0, totalTokens: usage?.totalTokens ?? 0 },
      adapterId: request.adapterId, seconds: Number(result.seconds.toFixed(3)),
    })}\n`);
  } else {
    c.io.stdout.write('\n');
    c.io.stderr.write(`[${finishReasonLabel(result.finishReason)}; ${usage?.promptTokens ?? 0} prompt + ${usage?.completionTokens ?? 0} generated tokens; ` +
      `${formatSeconds(result.seconds)}, ${decodeTps.toFixed(1)} tokens/s]\n`);
  }
}

const MERGE_DTYPES = { bf16: MergeDtype.MERGE_DTYPE_BF16, f16: MergeDtype.MERGE_DTYPE_F16, f32: MergeDtype.MERGE_DTYPE_F32 } as const;
const MERGE_BASES = { original: MergeBase.MERGE_BASE_ORIGINAL, dequantized: MergeBase.MERGE_BASE_DEQUANTIZED } as const;

async function mergeRemote(c: Context): Promise<void> {
  const dtype = choice(c.flags, 'dtype', ['bf16', 'f16', 'f32'] as const) ?? 'bf16';
  const into = choice(c.flags, 'into', ['original', 'dequantized'] as const) ?? 'original';
  const result = await mergeAdapter(c.clients, {
    adapterId: required(c.flags, 'adapter'), outputName: required(c.flags, 'out-name'), dtype: MERGE_DTYPES[dtype], base: MERGE_BASES[into],
    unloadAdapter: c.flags.unload === true,
  }, c.io, { json: c.json, timeoutMs: c.streamTimeoutMs });
  if (!c.json) c.io.stdout.write(describeMerge(result));
}

const JOB_STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted'] as const;

async function jobsRemote(c: Context): Promise<void> {
  const [action = 'list'] = c.positionals;
  const { clients, io, json } = c;
  const training = clients.training;
  switch (action) {
    case 'list': {
      const states = (text(c.flags, 'state') ?? '').split(',').map((s) => s.trim()).filter(Boolean).map((s) => {
        if (!(JOB_STATES as readonly string[]).includes(s)) throw new EngineError('INVALID_ARGUMENT', `--state must list states from ${JOB_STATES.join(', ')}, got ${JSON.stringify(s)}`, { field: 'state' });
        return JobState[`JOB_STATE_${s.toUpperCase()}` as keyof typeof JobState];
      });
      const limit = count(c.flags, 'limit') ?? 50;
      const jobs: Job[] = [];
      let pageToken = '';
      do {
        const page = await unary(training, training.listJobs, { pageSize: Math.min(limit - jobs.length, 1000), pageToken, states }, c.unaryTimeoutMs);
        jobs.push(...page.jobs);
        pageToken = page.nextPageToken;
      } while (pageToken && jobs.length < limit);
      if (json) for (const job of jobs) io.stdout.write(`${JSON.stringify(Job.toJSON(job))}\n`);
      else if (jobs.length === 0) io.stdout.write('no jobs\n');
      else io.stdout.write(formatTable([['JOB', 'STATE', 'ADAPTER', 'STEP', 'LOSS', 'DATASET', 'CREATED'], ...jobs.map(jobRow)]));
      return;
    }
    case 'get': {
      const response = await unary(training, training.getJob, { jobId: positional(c.positionals, 1, 'job id'), includeHistory: c.flags.history === true }, c.unaryTimeoutMs);
      io.stdout.write(json ? `${JSON.stringify(GetJobResponse.toJSON(response))}\n` : describeJob(response));
      return;
    }
    case 'watch': {
      const callOptions: Partial<CallOptions> = c.streamTimeoutMs ? { deadline: new Date(Date.now() + c.streamTimeoutMs) } : {};
      const stream = training.watchJob({ jobId: positional(c.positionals, 1, 'job id'), afterSequence: count(c.flags, 'after') ?? 0 }, new Metadata(), callOptions);
      const onInterrupt = (): void => stream.cancel();
      process.once('SIGINT', onInterrupt);
      try {
        reportJobOutcome(await followJob(stream, io, { json }), io, json);
      } catch (error) {
        if (isServiceError(error) && error.code === status.CANCELLED) return;
        throw error;
      } finally {
        process.off('SIGINT', onInterrupt);
      }
      return;
    }
    case 'cancel': {
      const { job } = await unary(training, training.cancelJob, { jobId: positional(c.positionals, 1, 'job id') }, c.unaryTimeoutMs);
      if (json) io.stdout.write(`${JSON.stringify(job ? Job.toJSON(job) : {})}\n`);
      else if (job) io.stdout.write(`job ${job.jobId}: ${jobStateLabel(job.state)}${job.state === JobState.JOB_STATE_RUNNING ? ' (stops after the current step)' : ''}\n`);
      return;
    }
    default:
      throw new EngineError('INVALID_ARGUMENT', `unknown jobs action ${JSON.stringify(action)} (list, get, watch, cancel)`, { field: 'action' });
  }
}

async function adaptersRemote(c: Context): Promise<void> {
  const [action = 'list'] = c.positionals;
  const { clients, io, json } = c;
  const adapters = clients.adapters;
  const printAdapter = (adapter: Adapter | undefined, verb: string): void => {
    if (!adapter) return;
    io.stdout.write(json ? `${JSON.stringify(Adapter.toJSON(adapter))}\n` : `${verb} adapter "${adapter.adapterId}"\n`);
  };
  switch (action) {
    case 'list': {
      const found: Adapter[] = [];
      let pageToken = '';
      do {
        const page = await unary(adapters, adapters.listAdapters, { pageSize: 1000, pageToken, loadedOnly: c.flags.loaded === true }, c.unaryTimeoutMs);
        found.push(...page.adapters);
        pageToken = page.nextPageToken;
      } while (pageToken);
      if (json) for (const adapter of found) io.stdout.write(`${JSON.stringify(Adapter.toJSON(adapter))}\n`);
      else if (found.length === 0) io.stdout.write('no adapters\n');
      else io.stdout.write(formatTable([ADAPTER_HEADER, ...found.map(adapterRow)]));
      return;
    }
    case 'get': {
      const { adapter } = await unary(adapters, adapters.getAdapter, { adapterId: positional(c.positionals, 1, 'adapter id') }, c.unaryTimeoutMs);
      if (adapter) io.stdout.write(json ? `${JSON.stringify(Adapter.toJSON(adapter))}\n` : describeAdapter(adapter));
      return;
    }
    case 'load':
      printAdapter((await unary(adapters, adapters.loadAdapter, { adapterId: positional(c.positionals, 1, 'adapter id') }, c.unaryTimeoutMs)).adapter, 'loaded');
      return;
    case 'unload':
      printAdapter((await unary(adapters, adapters.unloadAdapter, { adapterId: positional(c.positionals, 1, 'adapter id') }, c.unaryTimeoutMs)).adapter, 'unloaded');
      return;
    case 'delete': {
      const adapterId = positional(c.positionals, 1, 'adapter id');
      await unary(adapters, adapters.deleteAdapter, { adapterId }, c.unaryTimeoutMs);
      io.stdout.write(json ? `${JSON.stringify({ adapterId, deleted: true })}\n` : `deleted adapter "${adapterId}"\n`);
      return;
    }
    case 'import': {
      const adapter = await importAdapterFolder(clients, positional(c.positionals, 1, 'adapter id'), positional(c.positionals, 2, 'folder'));
      io.stdout.write(json ? `${JSON.stringify(Adapter.toJSON(adapter))}\n` : `imported adapter "${adapter.adapterId}" (${formatBytes(adapter.sizeBytes)}${adapter.matchesBase ? '' : ', built for ANOTHER base'})\n`);
      return;
    }
    case 'export': {
      const folder = positional(c.positionals, 2, 'folder');
      const adapter = await exportAdapterFolder(clients, positional(c.positionals, 1, 'adapter id'), folder);
      io.stdout.write(json ? `${JSON.stringify({ ...(Adapter.toJSON(adapter) as object), folder })}\n` : `exported adapter "${adapter.adapterId}" to ${folder} (${formatBytes(adapter.sizeBytes)})\n`);
      return;
    }
    default:
      throw new EngineError('INVALID_ARGUMENT', `unknown adapters action ${JSON.stringify(action)} (list, get, load, unload, delete, import, export)`, { field: 'action' });
  }
}

async function datasetsRemote(c: Context): Promise<void> {
  const [action = 'list'] = c.positionals;
  const { clients, io, json } = c;
  const datasets = clients.datasets;
  switch (action) {
    case 'list': {
      const found: Dataset[] = [];
      let pageToken = '';
      do {
        const page = await unary(datasets, datasets.listDatasets, { pageSize: 1000, pageToken }, c.unaryTimeoutMs);
        found.push(...page.datasets);
        pageToken = page.nextPageToken;
      } while (pageToken);
      if (json) for (const dataset of found) io.stdout.write(`${JSON.stringify(Dataset.toJSON(dataset))}\n`);
      else if (found.length === 0) io.stdout.write('no datasets\n');
      else io.stdout.write(formatTable([['DATASET', 'ROWS', 'SIZE', 'SHA-256', 'CREATED'], ...found.map((d) => [
        d.datasetId, String(d.rowCount), formatBytes(d.sizeBytes), `${d.sha256.slice(0, 16)}…`, d.createTime?.toISOString().slice(0, 19).replace('T', ' ') ?? '',
      ])]));
      return;
    }
    case 'upload': {
      const file = positional(c.positionals, 1, 'file');
      const datasetId = text(c.flags, 'dataset-id') ?? datasetIdFor(file, (await describeFile(file)).sha256);
      const dataset = await uploadDatasetFile(clients, datasetId, file);
      io.stdout.write(json ? `${JSON.stringify(Dataset.toJSON(dataset))}\n` : `uploaded dataset ${dataset.datasetId} (${dataset.rowCount} rows, ${formatBytes(dataset.sizeBytes)})\n`);
      return;
    }
    case 'delete': {
      const datasetId = positional(c.positionals, 1, 'dataset id');
      await unary(datasets, datasets.deleteDataset, { datasetId }, c.unaryTimeoutMs);
      io.stdout.write(json ? `${JSON.stringify({ datasetId, deleted: true })}\n` : `deleted dataset ${datasetId}\n`);
      return;
    }
    default:
      throw new EngineError('INVALID_ARGUMENT', `unknown datasets action ${JSON.stringify(action)} (list, upload, delete)`, { field: 'action' });
  }
}

/** Each subcommand: its handler and the flags it takes besides the common ones. */
const SUBCOMMANDS = {
  info: { run: infoCommand, flags: {} },
  train: {
    run: trainRemote,
    flags: {
      'dataset-file': { type: 'string' }, dataset: { type: 'string' }, 'dataset-id': { type: 'string' }, 'adapter-id': { type: 'string' },
      'job-id': { type: 'string' }, 'init-adapter': { type: 'string' }, detach: { type: 'boolean' }, ...TRAINING_FLAGS,
    },
  },
  generate: {
    run: generateRemote,
    flags: {
      prompt: { type: 'string' }, chat: { type: 'boolean' }, messages: { type: 'string' }, 'prompt-ids': { type: 'string' }, adapter: { type: 'string' },
      'max-tokens': { type: 'string' }, temperature: { type: 'string' }, 'top-k': { type: 'string' }, 'top-p': { type: 'string' },
      'repetition-penalty': { type: 'string' }, seed: { type: 'string' }, stop: { type: 'string', multiple: true }, 'ignore-eos': { type: 'boolean' },
    },
  },
  merge: {
    run: mergeRemote,
    flags: { adapter: { type: 'string' }, 'out-name': { type: 'string' }, dtype: { type: 'string' }, into: { type: 'string' }, unload: { type: 'boolean' } },
  },
  jobs: { run: jobsRemote, flags: { state: { type: 'string' }, limit: { type: 'string' }, history: { type: 'boolean' }, after: { type: 'string' } } },
  adapters: { run: adaptersRemote, flags: { loaded: { type: 'boolean' } } },
  datasets: { run: datasetsRemote, flags: { 'dataset-id': { type: 'string' } } },
} as const;

/** Positional arguments each subcommand takes at most (action and its operands). */
const MAX_POSITIONALS: Record<keyof typeof SUBCOMMANDS, number> = { info: 0, train: 0, generate: 0, merge: 0, jobs: 2, adapters: 3, datasets: 2 };

/** `tuneserve remote <command> ...`. */
export async function remoteCommand(argv: string[], io: CommandIo = processIo): Promise<void> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    io.stdout.write(REMOTE_USAGE);
    if (name === undefined) throw new EngineError('INVALID_ARGUMENT', 'missing remote command', { field: 'command' });
    return;
  }
  if (!Object.hasOwn(SUBCOMMANDS, name)) {
    throw new EngineError('INVALID_ARGUMENT', `unknown remote command ${JSON.stringify(name)} (${Object.keys(SUBCOMMANDS).join(', ')})`, { field: 'command' });
  }
  const subcommand = SUBCOMMANDS[name as keyof typeof SUBCOMMANDS];
  const { values, positionals } = parseArgs({ args: rest, strict: true, allowPositionals: true, options: { ...COMMON_FLAGS, ...subcommand.flags } });
  const flags = values as Flags;
  if (positionals.length > MAX_POSITIONALS[name as keyof typeof SUBCOMMANDS]) {
    throw new EngineError('INVALID_ARGUMENT', `unexpected argument ${JSON.stringify(positionals.at(-1))}`, { field: 'command' });
  }
  const timeoutSeconds = float(flags, 'timeout');
  if (timeoutSeconds !== undefined && timeoutSeconds <= 0) throw new EngineError('INVALID_ARGUMENT', '--timeout must be above 0 seconds', { field: 'timeout' });
  const address = text(flags, 'addr') ?? process.env.TUNESERVE_ADDR ?? '127.0.0.1:50051';
  const token = text(flags, 'token') ?? process.env.TUNESERVE_TOKEN;
  const clients = createClients(address, token ? { token } : {});
  try {
    await subcommand.run({
      clients, flags, positionals, io, json: flags.json === true,
      unaryTimeoutMs: timeoutSeconds !== undefined ? timeoutSeconds * 1000 : DEFAULT_UNARY_TIMEOUT_MS,
      streamTimeoutMs: timeoutSeconds !== undefined ? timeoutSeconds * 1000 : null,
    });
  } catch (error) {
    throw cliError(error);
  } finally {
    clients.close();
  }
}
