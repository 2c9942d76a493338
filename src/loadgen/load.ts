// A load generator for a tuneserve server: a real gRPC client driving Generate streams with seeded
// Poisson arrivals over a set of adapters, at most N streams at once, with random client cancels and
// deadlines, and an account of every request: completed, cancelled by us, failed (by status code),
// lost (a stream that ended without its final message, or whose token count disagrees with the usage
// it reports) and hung (no end within its deadline, or its expected time, plus a grace period).
// Latencies: time to first token (from sending) and inter-token time (a message's gap spread over the
// tokens it carries). bench/serve.mjs runs it for `npm run bench:serve`; tests can run it too.

import { Metadata, status, type ClientReadableStream, type ServiceError } from '@grpc/grpc-js';
import type { TuneClients } from '../client/connection.js';
import { GenerateRequest, type GenerateResponse } from '../gen/tuneserve/v1/generation.js';
import { seededRandom } from './random.js';

/** What to send. */
export interface LoadOptions {
  clients: TuneClients;
  /** Adapter references to draw from, uniformly ('' is the base model). */
  adapters: readonly string[];
  /** Requests to send in all. */
  requests: number;
  /** Mean arrivals per second (Poisson). */
  ratePerSecond: number;
  /** Most streams open at once; arrivals beyond wait on the client (time to first token counts from the send). */
  streams: number;
  seed: number;
  /** Prompt length in tokens, uniform in [min, max]; ids drawn from [idBase, idBase + idRange) (default 1000, 50,000). */
  promptTokens: { min: number; max: number };
  maxTokens: { min: number; max: number };
  idBase?: number;
  idRange?: number;
  /** Share of requests the client cancels after a random number of tokens. */
  cancelFraction?: number;
  /** Share of requests sent with a deadline, uniform in deadlineMs. */
  deadlineFraction?: number;
  deadlineMs?: { min: number; max: number };
  /**
   * A request is hung when it has not ended this long after its deadline, or, without one, after
   * expectedMsPerToken × max_tokens + this grace (default 30 s).
   */
  hungGraceMs?: number;
  expectedMsPerToken?: number;
  /** Metadata for every call (e.g. the API key). */
  metadata?: () => Metadata;
}

/** What one request did. */
export interface RequestRecord {
  adapter: string;
  sentAt: number;
  firstTokenAt: number | null;
  endedAt: number | null;
  tokens: number;
  outcome: 'completed' | 'cancelled' | 'failed' | 'lost' | 'hung';
  /** The gRPC status name when failed. */
  code: string | null;
  /** The adapter version the server reported (0 for the base). */
  adapterVersion: number;
  cancelAfter: number | null;
  deadlineMs: number | null;
}

export interface Percentiles {
  count: number;
  p50: number;
  p99: number;
  max: number;
}

export interface LoadReport {
  sent: number;
  completed: number;
  cancelled: number;
  failed: Record<string, number>;
  lost: number;
  hung: number;
  ttftMs: Percentiles;
  interTokenMs: Percentiles;
  outputTokens: number;
  wallSeconds: number;
  outputTokensPerSecond: number;
  records: RequestRecord[];
}

/** Nearest-rank percentiles of a sample (zeros for an empty one). */
export function percentiles(values: readonly number[]): Percentiles {
  if (values.length === 0) return { count: 0, p50: 0, p99: 0, max: 0 };
  const sorted = [...values].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
  return { count: sorted.length, p50: at(0.5), p99: at(0.99), max: sorted[sorted.length - 1]! };
}

const statusNames = new Map(Object.entries(status).filter(([, v]) => typeof v === 'number').map(([k, v]) => [v as number, k]));

/** Runs one load and accounts for every request. */
export async function runLoad(options: LoadOptions): Promise<LoadReport> {
  const random = seededRandom(options.seed);
  const between = (range: { min: number; max: number }) => range.min + Math.floor(random() * (range.max - range.min + 1));
  const idBase = options.idBase ?? 1000, idRange = options.idRange ?? 50_000;
  const grace = options.hungGraceMs ?? 30_000;
  const perToken = options.expectedMsPerToken ?? 1000;
  const records: RequestRecord[] = [];
  const gaps: number[] = [];
  // Every random choice is drawn up front, so a seed gives the same requests whatever the timing.
  const plan = Array.from({ length: options.requests }, () => {
    const wait = -Math.log(1 - random()) / options.ratePerSecond;
    const adapter = options.adapters[Math.floor(random() * options.adapters.length)] ?? '';
    const prompt = Array.from({ length: between(options.promptTokens) }, () => idBase + Math.floor(random() * idRange));
    const maxTokens = between(options.maxTokens);
    const cancel = random() < (options.cancelFraction ?? 0);
    const cancelAfter = cancel ? 1 + Math.floor(random() * Math.max(1, maxTokens - 1)) : null;
    const deadline = random() < (options.deadlineFraction ?? 0);
    const deadlineMs = deadline && options.deadlineMs ? between(options.deadlineMs) : null;
    return { wait, adapter, prompt, maxTokens, cancelAfter, deadlineMs };
  });

  let open = 0;
  const freed: (() => void)[] = [];
  const slot = async () => {
    while (open >= options.streams) await new Promise<void>((resolve) => freed.push(resolve));
    open += 1;
  };
  const release = () => {
    open -= 1;
    freed.shift()?.();
  };

  const started = performance.now();
  const running: Promise<void>[] = [];
  let clock = started;
  for (const p of plan) {
    clock += p.wait * 1000;
    const delay = clock - performance.now();
    if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay));
    await slot();
    running.push(send(p).finally(release));
  }
  await Promise.all(running);
  const wallSeconds = (performance.now() - started) / 1000;

  function send(p: (typeof plan)[number]): Promise<void> {
    const record: RequestRecord = {
      adapter: p.adapter, sentAt: performance.now(), firstTokenAt: null, endedAt: null, tokens: 0, outcome: 'lost', code: null,
      adapterVersion: 0, cancelAfter: p.cancelAfter, deadlineMs: p.deadlineMs,
    };
    records.push(record);
    const request = GenerateRequest.fromPartial({
      tokenIds: { ids: p.prompt }, adapterId: p.adapter, maxTokens: p.maxTokens, temperature: 0, ignoreEos: true, returnTokenIds: true,
    });
    const callOptions = p.deadlineMs === null ? {} : { deadline: Date.now() + p.deadlineMs };
    const stream: ClientReadableStream<GenerateResponse> = options.clients.generation.generate(request, options.metadata?.() ?? new Metadata(), callOptions);
    return new Promise<void>((resolve) => {
      let last = record.sentAt;
      let final: GenerateResponse | null = null;
      let cancelled = false;
      let settled = false;
      const hungAfter = (p.deadlineMs ?? perToken * p.maxTokens) + grace;
      const timer = setTimeout(() => finish('hung', null), hungAfter);
      function finish(outcome: RequestRecord['outcome'], code: string | null): void {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        record.endedAt = performance.now();
        record.outcome = outcome;
        record.code = code;
        if (outcome === 'hung') stream.cancel();
        resolve();
      }
      stream.on('data', (message: GenerateResponse) => {
        const now = performance.now();
        const n = message.tokenIds.length;
        if (n > 0) {
          if (record.firstTokenAt === null) record.firstTokenAt = now;
          else for (let i = 0; i < n; i++) gaps.push((now - last) / n);
          last = now;
          record.tokens += n;
        }
        if (message.usage !== undefined) {
          final = message;
          record.adapterVersion = message.adapterVersion;
        }
        if (p.cancelAfter !== null && !cancelled && record.tokens >= p.cancelAfter) {
          cancelled = true;
          stream.cancel();
        }
      });
      stream.on('error', (error: ServiceError) => {
        if (cancelled && error.code === status.CANCELLED) finish('cancelled', null);
        else finish('failed', statusNames.get(error.code) ?? String(error.code));
      });
      stream.on('end', () => {
        // Whole: a final message whose usage counts exactly the tokens that arrived.
        const whole = final !== null && (final as GenerateResponse).usage?.completionTokens === record.tokens;
        finish(whole ? (cancelled ? 'cancelled' : 'completed') : 'lost', null);
      });
    });
  }

  const failed: Record<string, number> = {};
  for (const r of records) if (r.outcome === 'failed') failed[r.code ?? 'UNKNOWN'] = (failed[r.code ?? 'UNKNOWN'] ?? 0) + 1;
  const outputTokens = records.reduce((sum, r) => sum + r.tokens, 0);
  return {
    sent: records.length,
    completed: records.filter((r) => r.outcome === 'completed').length,
    cancelled: records.filter((r) => r.outcome === 'cancelled').length,
    failed,
    lost: records.filter((r) => r.outcome === 'lost').length,
    hung: records.filter((r) => r.outcome === 'hung').length,
    ttftMs: percentiles(records.filter((r) => r.firstTokenAt !== null).map((r) => r.firstTokenAt! - r.sentAt)),
    interTokenMs: percentiles(gaps),
    outputTokens,
    wallSeconds,
    outputTokensPerSecond: outputTokens / wallSeconds,
    records,
  };
}
