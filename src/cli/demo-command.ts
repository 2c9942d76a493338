// `tuneserve demo` (what `npm run demo` runs): a tour of the service in a few minutes on two CPU
// cores. It starts a server in-process on the built-in demo model (real engine, NF4 base), then,
// as an ordinary gRPC client, trains two adapters, generates with and without them, swaps them
// per request and concurrently, merges one, and ends with a table of what it did and how long.

import { status } from '@grpc/grpc-js';
import { rmSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { EngineError } from '../engine/errors.js';
import { LrScheduler, TrainingConfig, TrainRequest, type JobEvent, type TrainingStep, type TrainResponse } from '../gen/tuneserve/v1/training.js';
import { MergeDtype } from '../gen/tuneserve/v1/adapters.js';
import type { GenerateRequest } from '../gen/tuneserve/v1/generation.js';
import { createClients, type TuneClients } from '../client/index.js';
import { createLogger, type Logger } from '../server/logger.js';
import { NativeEnginePort } from '../server/native-engine-port.js';
import { createServer, type TuneServer } from '../server/server.js';
import {
  cliError, describeMerge, ensureDataset, followJob, formatBytes, formatSeconds, formatTable, generateText, isServiceError,
  mergeAdapter, throwUnlessCompleted, unary, type CommandIo, type Generation, type JobOutcome,
} from './remote-command.js';
import { ensureDemoModel } from './serve-command.js';

const DATA_DIR = fileURLToPath(new URL('../../data/', import.meta.url));
const MEMORIZE_FILE = join(DATA_DIR, 'memorize-20.jsonl');
const VOICE_FILE = join(DATA_DIR, 'demo-voice.jsonl');

/**
 * "memorize": 20 short rows, 5 steps an epoch; 30 epochs bring the loss under 0.1 (issue #2's
 * acceptance run uses the same recipe with 40). A constant, high learning rate and LoRA on every
 * linear layer make a random-weight model learn fast; dropout 0 because the point is recall.
 */
const MEMORIZE_CONFIG = TrainingConfig.fromPartial({
  rank: 16, alpha: 32, dropout: 0, targetModules: ['all-linear'], learningRate: 2e-3, scheduler: LrScheduler.LR_SCHEDULER_CONSTANT,
  epochs: 30, batchSize: 4, gradAccum: 1, seed: 7,
});

/**
 * "voice": 40 chat rows of about 80 tokens (8× the memorize set's tokens), so a step budget rather
 * than epochs: 6 epochs teach a random-weight model the voice's shape (opening, numbered steps, tip,
 * sign-off), not its English; measured: 60 steps in 1–1.5 min on 2 cores, loss 12 → about 5.
 */
const VOICE_CONFIG = TrainingConfig.fromPartial({
  rank: 16, alpha: 32, dropout: 0, targetModules: ['all-linear'], learningRate: 2e-3, scheduler: LrScheduler.LR_SCHEDULER_CONSTANT,
  maxSteps: 60, batchSize: 4, gradAccum: 1, seed: 7,
});

/** Tokens the memorized completions need (the longest is 13 tokens plus end-of-turn). */
const MEMORIZE_MAX_TOKENS = 24;
/** Enough of a voice answer to show its opening, and room for a whole one (about 80 tokens). */
const VOICE_SHORT_TOKENS = 40;
const VOICE_FULL_TOKENS = 112;

interface MemorizeRow {
  prompt: string;
  completion: string;
}

/** A generation the demo sends, with what it shows in the tables. */
interface DemoRequest {
  label: string;
  adapterId: string;
  request: Partial<GenerateRequest>;
  maxTokens: number;
}

/** Greedy decoding, so outputs compare exactly between runs. */
function greedy(request: Partial<GenerateRequest>, maxTokens: number): Partial<GenerateRequest> {
  return { ...request, maxTokens, temperature: 0 };
}

/** A training stream must end with the job completed. */
function requireCompleted(outcome: JobOutcome): void {
  throwUnlessCompleted(outcome);
  if (!outcome.last) throw new EngineError('INTERNAL', `the stream of job ${outcome.jobId} ended before the job did`);
}

/** One line of the closing table. */
interface Stage {
  step: string;
  seconds: number;
  result: string;
}

/** Text on one line, at most `width` characters. */
function clip(value: string, width: number): string {
  const flat = value.replace(/\s+/g, ' ').trim();
  const chars = [...flat];
  return chars.length <= width ? flat : `${chars.slice(0, width - 1).join('')}…`;
}

/** A server logger that stays quiet except for warnings and errors. */
function quietLogger(io: CommandIo): Logger {
  return createLogger({
    level: 'warn',
    destination: {
      write(line: string) {
        const { level, msg, time: _time, service: _service, ...fields } = JSON.parse(line) as Record<string, unknown>;
        io.stderr.write(`  [server ${String(level)}] ${String(msg)}${Object.keys(fields).length > 0 ? ` ${JSON.stringify(fields)}` : ''}\n`);
      },
    },
  });
}

/** The first adapter id from `base`, `base-2`, `base-3`... that the server does not hold (a kept data root may have the earlier run's). */
async function freeAdapterId(clients: TuneClients, base: string): Promise<string> {
  for (let n = 1; ; n += 1) {
    const id = n === 1 ? base : `${base}-${n}`;
    try {
      await unary(clients.adapters, clients.adapters.getAdapter, { adapterId: id });
    } catch (error) {
      if (isServiceError(error) && error.code === status.NOT_FOUND) return id;
      throw error;
    }
  }
}

/** The mean loss of each epoch, from the steps of a run. */
function lossPerEpoch(steps: TrainingStep[]): number[] {
  const sums = new Map<number, { total: number; count: number }>();
  for (const step of steps) {
    const epoch = Math.max(0, Math.ceil(step.epoch - 1e-9) - 1);
    const entry = sums.get(epoch) ?? { total: 0, count: 0 };
    entry.total += step.loss;
    entry.count += 1;
    sums.set(epoch, entry);
  }
  return [...sums.entries()].sort(([a], [b]) => a - b).map(([, { total, count }]) => total / count);
}

export async function demoCommand(argv: string[], io: CommandIo = { stdout: process.stdout, stderr: process.stderr }): Promise<void> {
  const { values } = parseArgs({
    args: argv, strict: true,
    options: { 'data-root': { type: 'string' }, port: { type: 'string' }, keep: { type: 'boolean' }, threads: { type: 'string' } },
  });
  const port = Number(values.port ?? '0');
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new EngineError('INVALID_ARGUMENT', '--port must be 0 to 65535', { field: 'port' });
  const threads = Number(values.threads ?? '0');
  if (!Number.isInteger(threads) || threads < 0) throw new EngineError('INVALID_ARGUMENT', '--threads must be a non-negative integer', { field: 'threads' });
  const temporary = values['data-root'] === undefined;
  const dataRoot = temporary ? await mkdtemp(join(tmpdir(), 'tuneserve-demo-')) : resolve(values['data-root'] as string);
  const removeAtEnd = temporary && values.keep !== true;

  const out = (line = ''): void => void io.stdout.write(`${line}\n`);
  const stages: Stage[] = [];
  const demoStart = performance.now();
  /** Runs one part of the tour, timing it for the closing table. */
  const stage = async <T>(step: string, run: () => Promise<T>, result: (value: T) => string): Promise<T> => {
    const started = performance.now();
    const value = await run();
    stages.push({ step, seconds: (performance.now() - started) / 1000, result: result(value) });
    return value;
  };
  let sectionNumber = 0;
  const section = (title: string): void => {
    sectionNumber += 1;
    out();
    out(`▸ ${sectionNumber}. ${title}`);
  };

  out('tuneserve demo: QLoRA fine-tuning and multi-adapter serving over gRPC, on a small random-weight Llama 3');
  out(`data root: ${dataRoot}${removeAtEnd ? ' (a temp folder, removed at the end; --keep keeps it)' : ''}`);

  // What to stop at the end, whatever happens on the way; Ctrl-C still removes a temp data root.
  const running: { engine?: NativeEnginePort; server?: TuneServer; clients?: TuneClients } = {};
  const onInterrupt = (): void => {
    io.stderr.write('\ninterrupted\n');
    if (removeAtEnd) rmSync(dataRoot, { recursive: true, force: true });
    process.exit(130);
  };
  process.once('SIGINT', onInterrupt);
  try {
    // 1. The server, as `tuneserve serve` runs it, but in this process and on 127.0.0.1.
    section('Start the server on the built-in demo model');
    const { info, address, client } = await stage('start the server', async () => {
      const modelDir = await ensureDemoModel(dataRoot, (line) => out(`  ${line}`));
      running.engine = await NativeEnginePort.open(modelDir, { quant: 'nf4', name: 'demo', log: (line) => out(`  ${line}`), ...(threads > 0 ? { threads } : {}) });
      running.server = await createServer({ engine: running.engine, dataRoot, host: '127.0.0.1', port, transport: { plaintext: true }, logger: quietLogger(io), shutdownGraceMs: 2000 });
      await running.server.ready;
      // From here on the demo is an ordinary gRPC client.
      const address = `127.0.0.1:${running.server.port}`;
      running.clients = createClients(address, { plaintext: true });
      return { info: await unary(running.clients.model, running.clients.model.getModelInfo, {}), address, client: running.clients };
    }, (r) => `${r.info.modelName}, ${r.info.architecture?.numLayers} layers, NF4 on ${r.info.device.split(':')[0]}`);
    const arch = info.architecture;
    out(`  serving "${info.modelName}" at ${address}: ${arch?.numLayers} layers, hidden ${arch?.hiddenSize}, ` +
      `vocab ${arch?.vocabSize} (the real Llama 3 tokenizer), NF4 weights ${formatBytes(info.memory?.weightsBytes ?? 0)}, ${info.device}`);
    out('  random weights: the base model writes gibberish, so any sensible text below comes from an adapter');

    // 2. Datasets travel as chunked client streams with their size and SHA-256 up front.
    section('Upload the two datasets (DatasetService.UploadDataset)');
    const [memorizeData, voiceData] = await stage('upload 2 datasets', async () => [
      (await ensureDataset(client, MEMORIZE_FILE, 'memorize-20')).dataset,
      (await ensureDataset(client, VOICE_FILE, 'demo-voice')).dataset,
    ] as const, (sets) => sets.map((d) => `${d.datasetId} (${d.rowCount} rows)`).join(', '));
    out(`  ${memorizeData.datasetId}: ${memorizeData.rowCount} prompt/completion rows, ${formatBytes(memorizeData.sizeBytes)}`);
    out(`  ${voiceData.datasetId}: ${voiceData.rowCount} chat rows in the "Nimbus support" voice, ${formatBytes(voiceData.sizeBytes)}`);

    // 3. Train streams every optimizer step; the progress bar with the loss readout is on stderr.
    const memorizeId = await freeAdapterId(client, 'memorize');
    section(`Train adapter "${memorizeId}" on ${memorizeData.datasetId} (TrainingService.Train, streaming the loss)`);
    out(`  LoRA r 16, alpha 32 on all linear layers of the NF4 base; lr 2e-3 constant; batch 4; ${MEMORIZE_CONFIG.epochs} epochs`);
    const memorizeRun = await stage(`train "${memorizeId}"`, async () => {
      const outcome = await followJob(client.training.train(TrainRequest.fromPartial({ adapterId: memorizeId, datasetId: memorizeData.datasetId, config: MEMORIZE_CONFIG })), io);
      requireCompleted(outcome);
      return outcome;
    }, (o) => `${o.steps.length} steps, loss ${o.steps[0]?.loss.toFixed(2)} → ${o.steps.at(-1)?.loss.toFixed(3)}`);
    out(`  loss by epoch: ${lossPerEpoch(memorizeRun.steps).map((l) => l.toFixed(2)).join(' ')}`);
    const lastMemorizeStep = memorizeRun.steps.at(-1);
    out(`  job ${memorizeRun.jobId}: ${memorizeRun.steps.length} steps in ${formatSeconds(lastMemorizeStep?.elapsedSeconds ?? 0)}, ` +
      `${(lastMemorizeStep?.tokensPerSecond ?? 0).toFixed(0)} tokens/s, final loss ${lastMemorizeStep?.loss.toFixed(4)}`);

    // 4. The base model against the adapter, on prompts the adapter memorized.
    const rows = (await readFile(MEMORIZE_FILE, 'utf8')).trim().split('\n').map((line) => JSON.parse(line) as MemorizeRow);
    const probes = [rows[0], rows[7], rows[13]].filter((row): row is MemorizeRow => row !== undefined);
    section(`Generate for three memorized prompts without and with "${memorizeId}" (GenerationService.Generate, greedy)`);
    const comparison = await stage('base vs adapter, 3 prompts', async () => {
      const result: { row: MemorizeRow; base: Generation; tuned: Generation }[] = [];
      for (const row of probes) {
        const base = await generateText(client, greedy({ text: row.prompt }, MEMORIZE_MAX_TOKENS));
        const tuned = await generateText(client, greedy({ text: row.prompt, adapterId: memorizeId }, MEMORIZE_MAX_TOKENS));
        result.push({ row, base, tuned });
      }
      return result;
    }, (r) => `${r.filter((c) => c.tuned.text === c.row.completion).length}/${r.length} recalled with the adapter, ` +
      `${r.filter((c) => c.base.text === c.row.completion).length}/${r.length} without`);
    io.stdout.write(formatTable([
      ['  PROMPT', 'BASE MODEL', `WITH "${memorizeId}"`, 'AS TRAINED'],
      ...comparison.map(({ row, base, tuned }) => [`  ${row.prompt}`, JSON.stringify(clip(base.text, 30)), JSON.stringify(tuned.text), tuned.text === row.completion ? 'yes' : 'no']),
    ]));

    // 5. A detached job: its Train stream ends once it is queued and the job runs without a client.
    const voiceId = await freeAdapterId(client, 'voice');
    section(`Queue adapter "${voiceId}" on ${voiceData.datasetId} detached, then re-attach with WatchJob`);
    out(`  same LoRA recipe, ${VOICE_CONFIG.maxSteps} steps (${((VOICE_CONFIG.maxSteps * VOICE_CONFIG.batchSize) / voiceData.rowCount).toFixed(0)} epochs over the chat rows)`);
    const voiceStarted = performance.now();
    let voiceJobId = '';
    const queueing = client.training.train(TrainRequest.fromPartial({ adapterId: voiceId, datasetId: voiceData.datasetId, config: VOICE_CONFIG, detach: true }));
    for await (const { event } of queueing as AsyncIterable<TrainResponse>) if (event?.queued) voiceJobId = event.jobId;
    out(`  job ${voiceJobId} queued; its Train stream has closed, the job runs on`);
    // Generation keeps serving while the job trains: one request half-way through, timed.
    const midway: { generation: Promise<Generation | Error> | null } = { generation: null };
    const voiceRun = await followJob(client.training.watchJob({ jobId: voiceJobId, afterSequence: 0 }), io, {
      onEvent: (event: JobEvent) => {
        if (event.step && midway.generation === null && event.step.step >= event.step.totalSteps / 2) {
          midway.generation = generateText(client, greedy({ text: probes[0]?.prompt ?? '', adapterId: memorizeId }, MEMORIZE_MAX_TOKENS))
            .catch((error: unknown) => (error instanceof Error ? error : new Error(String(error))));
        }
      },
    });
    requireCompleted(voiceRun);
    stages.push({
      step: `train "${voiceId}" (detached + WatchJob)`, seconds: (performance.now() - voiceStarted) / 1000,
      result: `${voiceRun.steps.length} steps, loss ${voiceRun.steps[0]?.loss.toFixed(2)} → ${voiceRun.steps.at(-1)?.loss.toFixed(3)}`,
    });
    out(`  loss by epoch: ${lossPerEpoch(voiceRun.steps).map((l) => l.toFixed(2)).join(' ')}`);
    const servedWhileTraining = await midway.generation;
    if (servedWhileTraining instanceof Error) throw servedWhileTraining;
    if (servedWhileTraining) {
      out(`  served while it trained: "${memorizeId}" answered ${JSON.stringify(servedWhileTraining.text)}, first text after ` +
        `${formatSeconds(servedWhileTraining.firstTextSeconds ?? 0)}, ${servedWhileTraining.usage?.completionTokens ?? 0} tokens in ` +
        `${formatSeconds(servedWhileTraining.seconds)} (decode steps take turns with training micro-batches)`);
    }

    // 6. The adapter is a field of each request: consecutive requests swap it, nothing is reloaded.
    section('Swap adapters on consecutive requests');
    const questions = ['How do I reset my password?', 'Can I move my VM to another region?'] as const;
    const ask = (question: string): Partial<GenerateRequest> => ({ chat: { messages: [{ role: 'user', content: question }] } });
    const memorizePrompt = probes[1]?.prompt ?? '';
    const swaps: DemoRequest[] = [
      { label: memorizePrompt, adapterId: memorizeId, request: { text: memorizePrompt }, maxTokens: MEMORIZE_MAX_TOKENS },
      { label: questions[0], adapterId: voiceId, request: ask(questions[0]), maxTokens: VOICE_SHORT_TOKENS },
      { label: probes[2]?.prompt ?? '', adapterId: memorizeId, request: { text: probes[2]?.prompt ?? '' }, maxTokens: MEMORIZE_MAX_TOKENS },
      { label: `${questions[1]} (not in the data)`, adapterId: voiceId, request: ask(questions[1]), maxTokens: VOICE_FULL_TOKENS },
    ];
    const alone = await stage('4 requests, alternating adapters', async () => {
      const results: Generation[] = [];
      for (const swap of swaps) results.push(await generateText(client, greedy({ ...swap.request, adapterId: swap.adapterId }, swap.maxTokens)));
      return results;
    }, (r) => `${formatSeconds(r.reduce((sum, g) => sum + g.seconds, 0) / r.length)} per request`);
    io.stdout.write(formatTable([
      ['  #', 'ADAPTER', 'PROMPT', 'OUTPUT', 'TIME'],
      ...swaps.map((swap, i) => [`  ${i + 1}`, swap.adapterId, clip(swap.label, 44), JSON.stringify(clip(alone[i]?.text ?? '', 60)), formatSeconds(alone[i]?.seconds ?? 0)]),
    ]));
    out(`  request 4 in full: the voice's shape on a question it never saw (its English is another matter after ${VOICE_CONFIG.maxSteps} steps):`);
    out((alone[3]?.text ?? '').trim().split('\n').map((line) => `    │ ${line}`).join('\n'));

    // 7. Concurrent requests with different adapters are decoded in one batch, each with its own
    // adapter: greedy outputs equal the single-request ones (requests 1 and 2 above, and the base
    // model's answer to the same prompt in section 4).
    section('Three concurrent requests: two adapters and the bare base, batched together');
    const concurrent: { request: DemoRequest; aloneText: string }[] = [
      { request: swaps[0] as DemoRequest, aloneText: alone[0]?.text ?? '' },
      { request: swaps[1] as DemoRequest, aloneText: alone[1]?.text ?? '' },
      { request: { ...(swaps[0] as DemoRequest), adapterId: '' }, aloneText: comparison[1]?.base.text ?? '' },
    ];
    const together = await stage('3 concurrent requests', () => Promise.all(concurrent.map(({ request: r }) => generateText(client, greedy({ ...r.request, adapterId: r.adapterId }, r.maxTokens)))),
      (r) => `${r.filter((g, i) => g.text === concurrent[i]?.aloneText).length}/3 equal to the single-request output`);
    io.stdout.write(formatTable([
      ['  ADAPTER', 'OUTPUT', 'SAME AS ALONE', 'TIME'],
      ...concurrent.map((c, i) => [`  ${c.request.adapterId || '(none)'}`, JSON.stringify(clip(together[i]?.text ?? '', 60)), together[i]?.text === c.aloneText ? 'yes' : 'NO', formatSeconds(together[i]?.seconds ?? 0)]),
    ]));

    // 8. Merge the adapter into the base weights and write a Hugging Face model folder.
    section(`Merge "${memorizeId}" into the base weights (AdapterService.MergeAndUnload, bf16)`);
    const merged = await stage(`merge "${memorizeId}"`, async () => {
      for (let n = 1; ; n += 1) {
        const outputName = n === 1 ? `${memorizeId}-merged` : `${memorizeId}-merged-${n}`;
        try {
          return await mergeAdapter(client, { adapterId: memorizeId, outputName, dtype: MergeDtype.MERGE_DTYPE_BF16 }, io);
        } catch (error) {
          if (!isServiceError(error) || error.code !== status.ALREADY_EXISTS) throw error; // a kept data root holds an earlier merge
        }
      }
    }, (r) => `${formatBytes(r.sizeBytes)}, top-1 agreement ${((r.fidelity?.top1Agreement ?? 0) * 100).toFixed(0)}%`);
    io.stdout.write(describeMerge(merged).replace(/^(?=.)/gm, '  '));
    out(`  folder: ${join(dataRoot, 'exports', merged.outputName)}`);
    out('  (merged into the original full-precision weights, as vLLM and transformers users expect; the server trained and');
    out('  generates on the NF4 base, and the figures measure that gap; an f32 merge into the dequantized base matches it)');

    // The closing table.
    out();
    out('Summary');
    io.stdout.write(formatTable([
      ['  STEP', 'TIME', 'RESULT'],
      ...stages.map((s) => [`  ${s.step}`, formatSeconds(s.seconds), s.result]),
      ['  total', formatSeconds((performance.now() - demoStart) / 1000), ''],
    ]));
    if (!removeAtEnd) {
      out(`\nkept ${dataRoot}: \`tuneserve serve --data-root ${dataRoot}\` serves it again, ` +
        '`tuneserve remote adapters list` shows its adapters');
    }
  } catch (error) {
    throw cliError(error);
  } finally {
    process.off('SIGINT', onInterrupt);
    running.clients?.close();
    await running.server?.close({ graceMs: 1000 });
    running.engine?.close();
    if (removeAtEnd) await rm(dataRoot, { recursive: true, force: true });
  }
}
