// When and how long to wait before calling again. A call is retried when the server says it
// may succeed later: UNAVAILABLE (the server is loading its model or draining; another replica may
// answer) and RESOURCE_EXHAUSTED that carries RetryInfo (a queue, the generation slots or the
// adapter pool is full for now). The wait is RetryInfo's delay when the server sent one, else an
// exponential backoff with jitter; no wait runs past the call's deadline.

import { status, type ServiceError } from '@grpc/grpc-js';
import { statusDetailsOf } from '../server/status-details.js';

export interface RetryPolicy {
  /** Attempts in all, the first included. */
  maxAttempts: number;
  /** Backoff without RetryInfo: initial delay, doubling up to maxBackoffMs, ±20% jitter. */
  initialBackoffMs: number;
  maxBackoffMs: number;
  /** Longest RetryInfo delay to honour; a longer one ends the retries (the error is returned). */
  maxRetryDelayMs: number;
}

export const defaultRetryPolicy: RetryPolicy = { maxAttempts: 4, initialBackoffMs: 200, maxBackoffMs: 5_000, maxRetryDelayMs: 60_000 };

export function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as { code?: unknown }).code === 'number' && 'metadata' in error;
}

/**
 * Milliseconds to wait before attempt number `attempt + 1`, or null when the error is not to be
 * retried (wrong code, no attempts left, or the wait would pass the deadline).
 */
export function retryDelay(error: unknown, attempt: number, policy: RetryPolicy, deadline: number, now = Date.now()): number | null {
  if (!isServiceError(error) || attempt >= policy.maxAttempts) return null;
  const hinted = statusDetailsOf(error)?.retryAfterMs ?? null;
  let wait: number;
  if (error.code === status.RESOURCE_EXHAUSTED && hinted !== null) wait = hinted;
  else if (error.code === status.UNAVAILABLE) {
    wait = hinted ?? Math.min(policy.maxBackoffMs, policy.initialBackoffMs * 2 ** (attempt - 1)) * (0.8 + 0.4 * Math.random());
  } else return null;
  if (wait > policy.maxRetryDelayMs || now + wait >= deadline) return null;
  return wait;
}

export const sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
  new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', abort);
      resolve();
    }, ms);
    const abort = (): void => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', abort, { once: true });
  });
