// Call plumbing shared by every handler: an AbortSignal that fires when the client cancels or the
// client's deadline passes, a stream writer that honours backpressure (write() false → wait for
// 'drain'), a coalescing writer for streams whose messages can merge, and a reader for client
// streams.

import type { ServerWritableStream } from '@grpc/grpc-js';
import type { EventEmitter } from 'node:events';
import { cancelled, deadlineExceeded, type ServiceError } from './errors.js';

/** Why a call stopped early. */
export type CallOutcome = 'cancelled' | 'deadline';

/** Watches one call for cancellation and its deadline. */
export class CallWatch {
  private readonly controller = new AbortController();
  private stoppedBy: CallOutcome | null = null;
  private readonly timer: NodeJS.Timeout | null = null;
  private readonly deadline: number;
  private readonly onCancelled = (): void => {
    this.stop(Date.now() >= this.deadline ? 'deadline' : 'cancelled');
  };

  constructor(
    private readonly call: EventEmitter & { getDeadline(): Date | number; cancelled?: boolean },
    now: () => number = Date.now,
  ) {
    const deadline = call.getDeadline();
    this.deadline = deadline instanceof Date ? deadline.getTime() : deadline;
    call.on('cancelled', this.onCancelled);
    if (Number.isFinite(this.deadline)) {
      const remaining = this.deadline - now();
      this.timer = setTimeout(() => this.stop('deadline'), Math.max(0, remaining));
    }
    if (call.cancelled === true) this.onCancelled();
  }

  /** Fires when the client cancels or its deadline passes. */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** Why the call stopped, or null while it is live. */
  get outcome(): CallOutcome | null {
    return this.stoppedBy;
  }

  /** Milliseconds left before the client's deadline (Infinity without one). */
  get remainingMs(): number {
    return this.deadline - Date.now();
  }

  /** The error matching the outcome (CANCELLED or DEADLINE_EXCEEDED), or null while live. */
  error(): ServiceError | null {
    if (this.stoppedBy === 'deadline') return deadlineExceeded();
    if (this.stoppedBy === 'cancelled') return cancelled();
    return null;
  }

  /** Throws CANCELLED / DEADLINE_EXCEEDED when the call has stopped. */
  throwIfStopped(): void {
    const error = this.error();
    if (error) throw error;
  }

  /** Stops watching (the handler has finished). */
  dispose(): void {
    if (this.timer) clearTimeout(this.timer);
    this.call.off('cancelled', this.onCancelled);
  }

  private stop(outcome: CallOutcome): void {
    if (this.stoppedBy !== null) return;
    this.stoppedBy = outcome;
    this.controller.abort(outcome);
  }
}

/** Writes to a server stream, waiting for 'drain' whenever write() returns false. */
export class StreamWriter<T> {
  /** How many times a write had to wait for 'drain'. */
  drainWaits = 0;

  constructor(
    private readonly call: ServerWritableStream<unknown, T>,
    private readonly watch: CallWatch,
    private readonly onDrainWait: () => void = () => {},
  ) {}

  /** Sends one message; resolves when the stream can take more. Throws once the call stopped. */
  async write(message: T): Promise<void> {
    this.watch.throwIfStopped();
    if (this.call.write(message)) return;
    this.drainWaits += 1;
    this.onDrainWait();
    await new Promise<void>((resolve) => {
      const done = (): void => {
        this.call.off('drain', done);
        this.watch.signal.removeEventListener('abort', done);
        resolve();
      };
      this.call.on('drain', done);
      this.watch.signal.addEventListener('abort', done);
    });
    this.watch.throwIfStopped();
  }
}

/**
 * Sends messages that can be merged (text deltas, progress): while the stream is blocked by
 * backpressure, pushed messages are merged into one pending message instead of queueing, so
 * memory stays bounded however slowly the client reads.
 */
export class CoalescingWriter<T> {
  private pending: T | null = null;
  private pumping: Promise<void> | null = null;
  private failure: unknown = null;

  constructor(
    private readonly writer: StreamWriter<T>,
    /** Merges a newer message into an older pending one. */
    private readonly merge: (older: T, newer: T) => T,
  ) {}

  /** Queues a message (merging it into the pending one, if any) and starts sending. */
  push(message: T): void {
    if (this.failure !== null) return;
    this.pending = this.pending === null ? message : this.merge(this.pending, message);
    this.pumping ??= this.pump();
  }

  /** Waits until everything pushed has been written; rethrows a write failure. */
  async flush(): Promise<void> {
    while (this.pumping) await this.pumping;
    if (this.failure !== null) throw this.failure;
  }

  private async pump(): Promise<void> {
    try {
      while (this.pending !== null) {
        const message = this.pending;
        this.pending = null;
        await this.writer.write(message);
      }
    } catch (error) {
      this.failure = error;
      this.pending = null;
    } finally {
      this.pumping = null;
    }
  }
}

/**
 * Iterates the messages of a client stream until the client half-closes. Throws CANCELLED or
 * DEADLINE_EXCEEDED if the call stops first.
 */
export async function* readMessages<T>(stream: AsyncIterable<unknown>, watch: CallWatch): AsyncGenerator<T> {
  try {
    for await (const message of stream) {
      watch.throwIfStopped();
      yield message as T;
    }
  } catch (error) {
    watch.throwIfStopped();
    throw error;
  }
  watch.throwIfStopped();
}
