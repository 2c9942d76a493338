// A minimal loopback load driver for the reliability suite: Generate streams at a fixed concurrency,
// each with one behaviour (read to the end, cancel after a random delay, a short deadline, or a slow
// reader that pauses between messages), and the accounting that the load figures need: every request
// ends with a status or is counted lost; one that ends later than its deadline (or 60 s) plus a grace
// is counted hung. Stand-in until issue 8's load generator (bench:serve) is on main; it then replaces this.

import { Metadata, status, type ClientReadableStream, type ServiceError } from '@grpc/grpc-js';
import type { TuneClients } from '../../src/client/index.js';
import { GenerateRequest, type GenerateResponse } from '../../src/gen/tuneserve/v1/generation.js';
import { statusDetailsOf } from '../../src/server/status-details.js';
import { Random } from './random.js';

export type Behaviour = 'read' | 'cancel' | 'deadline' | 'slow';

export interface LoadFigures {
  sent: number;
  completed: number;
  failedByCode: Record<string, number>;
  byBehaviour: Record<Behaviour, number>;
  lost: number;
  hung: number;
  latencyMs: { p50: number; p99: number };
  firstTokenMs: { p50: number; p99: number };
}

/** How long past its deadline (or past NO_DEADLINE_MS) a request may end before it counts as hung. */
const GRACE_MS = 5_000;
const NO_DEADLINE_MS = 60_000;

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return 0;
  return Math.round(sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!);
}

/** Runs `requests` Generate calls, `concurrency` at a time; resolves when every one has ended (or was given up on). */
export async function runGenerateLoad(
  clients: TuneClients,
  options: { requests: number; concurrency: number; seed: number; adapters: string[]; maxTokens: [number, number] },
): Promise<LoadFigures> {
  const figures: LoadFigures = {
    sent: 0, completed: 0, failedByCode: {}, byBehaviour: { read: 0, cancel: 0, deadline: 0, slow: 0 }, lost: 0, hung: 0,
    latencyMs: { p50: 0, p99: 0 }, firstTokenMs: { p50: 0, p99: 0 },
  };
  const latencies: number[] = [];
  const firstTokens: number[] = [];
  let next = 0;

  const one = async (index: number): Promise<void> => {
    const random = new Random(options.seed * 100_003 + index);
    const behaviour = random.pick<Behaviour>(['read', 'read', 'cancel', 'deadline', 'slow']);
    figures.byBehaviour[behaviour]++;
    const request = GenerateRequest.fromPartial({
      text: random.pick(['Hello', 'Q: what is 2+2?', 'Tell me a story about a fox.', 'naïve café <|eot_id|> text']),
      adapterId: random.pick(options.adapters), maxTokens: random.int(options.maxTokens[0], options.maxTokens[1]),
      temperature: random.pick([0, 0.7, 1.2]), seed: random.below(1000), returnTokenIds: true,
    });
    const deadlineMs = behaviour === 'deadline' ? random.int(20, 600) : null;
    const started = performance.now();
    const call: ClientReadableStream<GenerateResponse> = clients.generation.generate(request, new Metadata(), deadlineMs === null ? {} : { deadline: Date.now() + deadlineMs });
    figures.sent++;
    let first: number | null = null;
    const outcome = new Promise<{ code: number; retryAfterMs: number | null }>((resolve) => {
      call.on('data', () => {
        first ??= performance.now() - started;
        if (behaviour === 'slow') {
          call.pause();
          setTimeout(() => call.resume(), random.int(20, 200));
        }
      });
      call.on('error', (error: ServiceError) => resolve({ code: error.code, retryAfterMs: statusDetailsOf(error)?.retryAfterMs ?? null }));
      call.on('end', () => resolve({ code: status.OK, retryAfterMs: null }));
    });
    if (behaviour === 'cancel') setTimeout(() => call.cancel(), random.int(0, 300));
    const limit = (deadlineMs ?? NO_DEADLINE_MS) + GRACE_MS;
    const watchdog = new Promise<'late'>((resolve) => setTimeout(() => resolve('late'), limit));
    const first_ = await Promise.race([outcome, watchdog]);
    if (first_ === 'late') {
      // Not answered in time: hung if it answers later, lost if it never does.
      const settled = await Promise.race([outcome, new Promise<'never'>((resolve) => setTimeout(() => resolve('never'), 30_000))]);
      if (settled === 'never') {
        figures.lost++;
        call.cancel();
        return;
      }
      figures.hung++;
    }
    const { code, retryAfterMs } = await outcome;
    const elapsed = performance.now() - started;
    if (code === status.OK) {
      figures.completed++;
      latencies.push(elapsed);
      if (first !== null) firstTokens.push(first);
    } else {
      figures.failedByCode[status[code]!] = (figures.failedByCode[status[code]!] ?? 0) + 1;
      // As a client should: a refusal with RetryInfo holds this worker back for the delay it names.
      if (retryAfterMs !== null) await new Promise((resolve) => setTimeout(resolve, Math.min(retryAfterMs, 2000)));
    }
  };

  const worker = async (): Promise<void> => {
    while (next < options.requests) await one(next++);
  };
  await Promise.all(Array.from({ length: options.concurrency }, worker));
  latencies.sort((a, b) => a - b);
  firstTokens.sort((a, b) => a - b);
  figures.latencyMs = { p50: percentile(latencies, 50), p99: percentile(latencies, 99) };
  figures.firstTokenMs = { p50: percentile(firstTokens, 50), p99: percentile(firstTokens, 99) };
  return figures;
}
