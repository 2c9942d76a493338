// How another backend service calls tuneserve from TypeScript with the generated grpc-js clients:
// connect (with a bearer token when the server wants one), ask what model is served, upload a
// dataset, train an adapter while following its event stream, generate with the adapter as a
// stream of text, and handle errors through their rich status details, with a deadline on every
// call and retries where the server says a retry will succeed. CI runs it against a real server
// (test/examples/client-example.test.ts); run it yourself with
//   npx tsc -p examples/tsconfig.json && node examples/dist/examples/client.js 127.0.0.1:50051
//
// In your own service, generate the clients from proto/tuneserve/v1 with ts-proto
// (outputServices=grpc-js, see buf.gen.yaml) and import them from there; statusDetailsOf decodes
// the google.rpc.Status trailer (ErrorInfo, BadRequest, RetryInfo) and is a dozen lines to copy.

import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { createHash } from 'node:crypto';
import { pathToFileURL } from 'node:url';

import { DatasetServiceClient } from '../src/gen/tuneserve/v1/datasets.js';
import { GenerateRequest, GenerationServiceClient, type GenerateResponse } from '../src/gen/tuneserve/v1/generation.js';
import { ModelServiceClient, type GetModelInfoResponse } from '../src/gen/tuneserve/v1/model.js';
import { LrScheduler, TrainingConfig, TrainingServiceClient, TrainRequest, type TrainResponse } from '../src/gen/tuneserve/v1/training.js';
import { statusDetailsOf } from '../src/server/status-details.js';

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
  /** Bearer token, when the server runs with TUNESERVE_AUTH_TOKENS. */
  token?: string;
  log?: (line: string) => void;
}

/** Training rows: a few prompt/completion pairs in the JSONL the server accepts. */
const ROWS = [
  { prompt: 'Q: Which team owns the ledger service?', completion: ' A: Team Heron.' },
  { prompt: 'Q: Which team owns the search index?', completion: ' A: Team Kestrel.' },
  { prompt: 'Q: Which team owns the mail relay?', completion: ' A: Team Osprey.' },
  { prompt: 'Q: Which team owns the payments API?', completion: ' A: Team Plover.' },
];

const seconds = (n: number): number => Date.now() + n * 1000; // a grpc-js deadline: an absolute time

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as ServiceError).code === 'number';
}

/** One line for logs: status name, ErrorInfo reason, message, the fields a bad request names. */
function explain(error: unknown): string {
  if (!isServiceError(error)) return String(error);
  const details = statusDetailsOf(error); // null when the failure came from the transport, not the server
  const fields = details?.fieldViolations.map((v) => `${v.field}: ${v.description}`).join('; ');
  return `${status[error.code]} ${details?.reason ?? ''} ${error.details}${fields ? ` (${fields})` : ''}`;
}

/**
 * Runs a call again while the server answers UNAVAILABLE (model still loading, or draining: try
 * again, possibly on another replica) or RESOURCE_EXHAUSTED with a RetryInfo hint (a queue or the
 * adapter pool is full for now), waiting as long as RetryInfo says, else with backoff.
 */
async function withRetries<T>(call: () => Promise<T>, attempts = 5): Promise<T> {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await call();
    } catch (error) {
      const retryAfterMs = isServiceError(error) ? statusDetailsOf(error)?.retryAfterMs ?? null : null;
      const retryable = isServiceError(error) &&
        (error.code === status.UNAVAILABLE || (error.code === status.RESOURCE_EXHAUSTED && retryAfterMs !== null));
      if (!retryable || attempt === attempts) throw error;
      await sleep((retryAfterMs ?? 250 * 2 ** attempt) * (1 + Math.random() * 0.2));
    }
  }
}

export async function main(address: string, options: ExampleOptions = {}): Promise<ExampleResult> {
  const log = options.log ?? ((line: string) => console.log(line));
  // Plaintext inside the cluster (the mesh terminates TLS); use credentials.createSsl() otherwise.
  const channel = credentials.createInsecure();
  const model = new ModelServiceClient(address, channel);
  const datasets = new DatasetServiceClient(address, channel);
  const training = new TrainingServiceClient(address, channel);
  const generation = new GenerationServiceClient(address, channel);
  // Auth is one metadata entry on every call.
  const metadata = new Metadata();
  if (options.token) metadata.set('authorization', `Bearer ${options.token}`);
  const suffix = Date.now().toString(36); // ids are ours to choose; these must not exist yet

  try {
    // 1. What is served. Every call gets a deadline: gRPC has none by default.
    const info = await withRetries(() => new Promise<GetModelInfoResponse>((resolve, reject) => {
      model.getModelInfo({}, metadata, { deadline: seconds(5) }, (error, response) => (error ? reject(error) : resolve(response)));
    }));
    log(`model ${info.modelName}: ${info.architecture?.numLayers} layers on ${info.device}; max_seq_len ${info.limits?.maxSeqLen}`);

    // 2. Upload a dataset: a client stream, header (id, size, SHA-256) first, then the bytes in
    //    chunks of at most 2 MiB. The server keeps it only if every byte and every row checks out.
    const file = Buffer.from(ROWS.map((row) => JSON.stringify(row)).join('\n') + '\n');
    const datasetId = `example-rows-${suffix}`;
    const dataset = await new Promise<{ rowCount: number }>((resolve, reject) => {
      const upload = datasets.uploadDataset(metadata, { deadline: seconds(60) }, (error, response) =>
        error ? reject(error) : resolve({ rowCount: response.dataset?.rowCount ?? 0 }),
      );
      upload.write({ header: { datasetId, sizeBytes: file.length, sha256: createHash('sha256').update(file).digest('hex') } });
      for (let offset = 0; offset < file.length; offset += 1024 * 1024) upload.write({ chunk: file.subarray(offset, offset + 1024 * 1024) });
      upload.end();
    });
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
    for await (const { event } of training.train(request, metadata) as AsyncIterable<TrainResponse>) {
      if (event?.step) log(`step ${event.step.step}/${event.step.totalSteps} loss ${event.step.loss.toFixed(4)}`);
      if (event?.completed) finalLoss = event.completed.metrics?.finalLoss ?? Number.NaN;
      if (event?.failed) throw new Error(`training failed: ${event.failed.reason}: ${event.failed.message}`);
      if (event?.cancelled || event?.interrupted) throw new Error(`training ended early (job ${event.jobId})`);
    }
    log(`adapter ${adapterId} ready, final loss ${finalLoss.toFixed(4)}`);

    // 4. Generate with the adapter, streaming text deltas; the last message has the finish reason
    //    and token usage. Cancelling the call (or its deadline passing) stops generation at once.
    const row = ROWS[0] as (typeof ROWS)[number];
    let generatedText = '';
    const stream = generation.generate(
      GenerateRequest.fromPartial({ text: row.prompt, adapterId, maxTokens: 16, temperature: 0 }),
      metadata,
      { deadline: seconds(60) },
    );
    for await (const message of stream as AsyncIterable<GenerateResponse>) {
      generatedText += message.text;
      if (message.usage) log(`generated ${message.usage.completionTokens} tokens: ${JSON.stringify(generatedText)}`);
    }

    // 5. Errors: the status code says what kind of failure, ErrorInfo.reason says exactly which.
    let errorReason = '';
    try {
      for await (const message of generation.generate(GenerateRequest.fromPartial({ text: row.prompt, adapterId: 'no-such-adapter' }), metadata, { deadline: seconds(10) })) {
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
    for (const client of [model, datasets, training, generation]) client.close();
  }
}

// Run directly: node examples/dist/examples/client.js [host:port]
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv[2] ?? process.env.TUNESERVE_ADDR ?? '127.0.0.1:50051', {
    ...(process.env.TUNESERVE_TOKEN ? { token: process.env.TUNESERVE_TOKEN } : {}),
  }).then(
    (result) => console.log(JSON.stringify(result)),
    () => (process.exitCode = 1),
  );
}
