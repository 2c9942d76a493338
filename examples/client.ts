// How another backend service calls tuneserve from TypeScript with the client SDK ('tuneserve/client'):
// connect with an API key (TLS by default; plaintext here because the test server is local), ask
// what model is served, upload a dataset, train an adapter while following its event stream,
// generate with the adapter as a stream of text, and read an error's rich status details. Every
// unary call has a deadline (30 s unless the call says otherwise) and is retried when the server
// answers UNAVAILABLE or RESOURCE_EXHAUSTED with RetryInfo, waiting as long as it says. CI runs it
// against a real server (test/examples/client-example.test.ts); run it yourself with
//   npm run build && npx tsc -p examples/tsconfig.json && node examples/dist/examples/client.js 127.0.0.1:50051

import { writeFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

import {
  connect, GenerateRequest, isServiceError, LrScheduler, status, statusDetailsOf, TrainingConfig, TrainRequest, uploadDatasetFile,
  type ConnectOptions,
} from 'tuneserve/client';

/** What the example did, for whoever runs it (the CI test checks it). */
export interface ExampleResult {
  modelName: string;
  datasetId: string;
  jobId: string;
  adapterId: string;
  finalLoss: number;
  generatedText: string;
  /** The ErrorInfo reason of the deliberate mistake at the end (ADAPTER_NOT_FOUND). */
  errorReason: string;
}

export interface ExampleOptions {
  /** Optimizer steps to train; the CI test keeps it small. */
  steps?: number;
  /** API key, when the server has keys (--auth-keys-file). */
  apiKey?: string;
  /** How to connect; default plaintext (a local server started with --plaintext). */
  connection?: ConnectOptions;
  log?: (line: string) => void;
}

/** Training rows: a few prompt/completion pairs in the JSONL the server accepts. */
const ROWS = [
  { prompt: 'Q: Which team owns the ledger service?', completion: ' A: Team Heron.' },
  { prompt: 'Q: Which team owns the search index?', completion: ' A: Team Kestrel.' },
  { prompt: 'Q: Which team owns the mail relay?', completion: ' A: Team Osprey.' },
  { prompt: 'Q: Which team owns the payments API?', completion: ' A: Team Plover.' },
];

/** One line for logs: status name, ErrorInfo reason, message, the fields a bad request names. */
function explain(error: unknown): string {
  if (!isServiceError(error)) return String(error);
  const details = statusDetailsOf(error); // null when the failure came from the transport, not the server
  const fields = details?.fieldViolations.map((v) => `${v.field}: ${v.description}`).join('; ');
  return `${status[error.code]} ${details?.reason ?? ''} ${error.details}${fields ? ` (${fields})` : ''}`;
}

export async function main(address: string, options: ExampleOptions = {}): Promise<ExampleResult> {
  const log = options.log ?? ((line: string) => console.log(line));
  const tune = connect(address, { ...(options.connection ?? { plaintext: true }), ...(options.apiKey ? { apiKey: options.apiKey } : {}) });
  const suffix = Date.now().toString(36); // ids are ours to choose; these must not exist yet
  const scratch = await mkdtemp(join(tmpdir(), 'tuneserve-example-'));

  try {
    // 1. What is served.
    const info = await tune.model.getModelInfo({}, { deadlineMs: 5000, requestId: `example-${suffix}-info` });
    log(`model ${info.modelName}: ${info.architecture?.numLayers} layers on ${info.device}; max_seq_len ${info.limits?.maxSeqLen}`);

    // 2. Upload a dataset from a file: header (id, size, SHA-256) first, then the bytes in chunks.
    //    The server keeps it only if every byte and every row checks out.
    const file = join(scratch, 'rows.jsonl');
    await writeFile(file, ROWS.map((row) => JSON.stringify(row)).join('\n') + '\n');
    const datasetId = `example-rows-${suffix}`;
    const dataset = await uploadDatasetFile(tune, datasetId, file);
    log(`uploaded dataset ${datasetId}: ${dataset.rowCount} rows`);

    // 3. Train: the stream carries queued, the dataset report, started, one event per optimizer
    //    step, then completed or failed. The job belongs to the server: if this stream breaks,
    //    WatchJob re-attaches.
    const adapterId = `example-${suffix}`;
    const request = TrainRequest.fromPartial({
      jobId: `job-${suffix}`, // our id makes a retried Train safe: a duplicate gets ALREADY_EXISTS
      adapterId,
      datasetId,
      config: TrainingConfig.fromPartial({
        rank: 8, alpha: 16, dropout: 0, targetModules: ['all-linear'], learningRate: 2e-3,
        scheduler: LrScheduler.LR_SCHEDULER_CONSTANT, maxSteps: options.steps ?? 30, batchSize: 4, gradAccum: 1,
      }),
    });
    let finalLoss = Number.NaN;
    for await (const { event } of tune.training.train(request)) {
      if (event?.step) log(`step ${event.step.step}/${event.step.totalSteps} loss ${event.step.loss.toFixed(4)}`);
      if (event?.completed) finalLoss = event.completed.metrics?.finalLoss ?? Number.NaN;
      if (event?.failed) throw new Error(`training failed: ${event.failed.reason}: ${event.failed.message}`);
      if (event?.cancelled || event?.interrupted) throw new Error(`training ended early (job ${event.jobId})`);
    }
    log(`adapter ${adapterId} ready, final loss ${finalLoss.toFixed(4)}`);

    // 4. Generate with the adapter, streaming text deltas; the last message has the finish reason
    //    and token usage. Aborting the signal (or the deadline passing) stops generation at once.
    const row = ROWS[0] as (typeof ROWS)[number];
    let generatedText = '';
    const generation = tune.generation.generate(
      GenerateRequest.fromPartial({ text: row.prompt, adapterId, maxTokens: 16, temperature: 0 }),
      { deadlineMs: 60_000 },
    );
    for await (const message of generation) {
      generatedText += message.text;
      if (message.usage) log(`generated ${message.usage.completionTokens} tokens: ${JSON.stringify(generatedText)}`);
    }

    // 5. Errors: the status code says what kind of failure, ErrorInfo.reason says exactly which.
    let errorReason = '';
    try {
      for await (const message of tune.generation.generate(GenerateRequest.fromPartial({ text: row.prompt, adapterId: 'no-such-adapter' }), { deadlineMs: 10_000 })) {
        void message;
      }
    } catch (error) {
      log(`as expected: ${explain(error)}`);
      if (!isServiceError(error) || error.code !== status.NOT_FOUND) throw error;
      errorReason = statusDetailsOf(error)?.reason ?? '';
    }

    return { modelName: info.modelName, datasetId, jobId: request.jobId, adapterId, finalLoss, generatedText, errorReason };
  } catch (error) {
    log(`failed: ${explain(error)}`);
    throw error;
  } finally {
    tune.close();
    await rm(scratch, { recursive: true, force: true });
  }
}

// Run directly: node examples/dist/examples/client.js [host:port]
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv[2] ?? process.env.TUNESERVE_ADDR ?? '127.0.0.1:50051', {
    ...(process.env.TUNESERVE_API_KEY ? { apiKey: process.env.TUNESERVE_API_KEY } : {}),
  }).then(
    (result) => console.log(JSON.stringify(result)),
    () => (process.exitCode = 1),
  );
}
