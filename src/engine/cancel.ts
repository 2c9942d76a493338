// Ties a caller's AbortSignal to a native job: an abort (before or during the job) calls `cancel`,
// which the native side honours at its next step boundary; the job's failure becomes an EngineError.

import { toEngineError } from './errors.js';

export async function awaitCancellable<T>(promise: Promise<T>, cancel: () => void, signal?: AbortSignal): Promise<T> {
  signal?.addEventListener('abort', cancel, { once: true });
  if (signal?.aborted) cancel();
  try {
    return await promise;
  } catch (e) {
    throw toEngineError(e);
  } finally {
    signal?.removeEventListener('abort', cancel);
  }
}
