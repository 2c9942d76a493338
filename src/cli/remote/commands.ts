// The remote subcommands (info, train, generate, merge, jobs, adapters, datasets) and the flags each
// takes besides the common ones.

import { Metadata, status, type CallOptions } from '@grpc/grpc-js';
import { EngineError } from '../../engine/errors.js';
import { Adapter, MergeBase, MergeDtype } from '../../gen/tuneserve/v1/adapters.js';
import { Dataset } from '../../gen/tuneserve/v1/datasets.js';
import { ChatMessage, GenerateRequest } from '../../gen/tuneserve/v1/generation.js';
import { GetModelInfoResponse } from '../../gen/tuneserve/v1/model.js';
import { GetJobResponse, Job, JobState, TrainRequest } from '../../gen/tuneserve/v1/training.js';
import { describeFile, exportAdapterFolder, importAdapterFolder, uploadDatasetFile, type TuneClients } from '../../client/index.js';
import { choice, count, float, required, text, type Flags } from '../flags.js';
import { type CommandIo, unary, isServiceError } from './calls.js';
import { datasetIdFor, ensureDataset, type Generation, generateText, mergeAdapter, describeMerge } from './operations.js';
import { positional, trainingConfigFromFlags, TRAINING_FLAGS } from './flag-sets.js';
import { formatSeconds, formatBytes, formatTable, jobStateLabel, finishReasonLabel, adapterRow, ADAPTER_HEADER, describeAdapter, jobRow, describeJob, describeModel } from './render.js';
import { followJob, reportJobOutcome } from './jobs.js';

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
    case 'resume': {
      const jobId = positional(c.positionals, 1, 'job id');
      const { job } = await unary(training, training.resumeJob, { jobId }, c.unaryTimeoutMs);
      if (json) io.stdout.write(`${JSON.stringify(job ? Job.toJSON(job) : {})}\n`);
      else io.stdout.write(`job ${jobId}: ${job ? jobStateLabel(job.state) : 'queued'} again from its checkpoint at step ${job?.lastCheckpointStep ?? 0}; watch it with \`tuneserve remote jobs watch ${jobId}\`\n`);
      return;
    }
    default:
      throw new EngineError('INVALID_ARGUMENT', `unknown jobs action ${JSON.stringify(action)} (list, get, watch, cancel, resume)`, { field: 'action' });
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
export const SUBCOMMANDS = {
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
export const MAX_POSITIONALS: Record<keyof typeof SUBCOMMANDS, number> = { info: 0, train: 0, generate: 0, merge: 0, jobs: 2, adapters: 3, datasets: 2 };
