// The typed face of one service, derived from its generated definition (ts-proto's
// outputServices=grpc-js): each unary RPC becomes `(request, options?) => Promise<Response>` and each
// server-streaming RPC `(request, options?) => AsyncIterable<Response>`, with a deadline, an optional
// x-request-id and AbortSignal, and retries as retry.ts decides (a stream is retried only before its
// first message). Client-streaming RPCs (uploads) are the file helpers' job (files.ts).

import { Metadata, type Client, type ClientReadableStream, type ServiceError } from '@grpc/grpc-js';
import { retryDelay, sleep, type RetryPolicy } from './retry.js';

/** Per-call settings. */
export interface CallOptions {
  /** Milliseconds from now until the deadline (default: the client's, 30 s for unary calls, none for streams). */
  deadlineMs?: number;
  /** An absolute deadline; overrides deadlineMs. */
  deadline?: Date;
  /** Cancels the call (CANCELLED). */
  signal?: AbortSignal;
  /** Sent as x-request-id; the server puts it on its log lines and the call's span. */
  requestId?: string;
  /** Extra metadata. */
  metadata?: Metadata;
  /** This call's retry policy; false: no retries. */
  retry?: RetryPolicy | false;
}

/** What the client applies when a call says nothing. */
export interface CallDefaults {
  deadlineMs: number;
  retry: RetryPolicy | false;
}

interface MethodDefinition {
  path: string;
  requestStream: boolean;
  responseStream: boolean;
  requestSerialize(value: never): Buffer;
  responseDeserialize(value: Buffer): unknown;
}

type RequestOf<M> = M extends { requestSerialize(value: infer R): Buffer } ? R : never;
type ResponseOf<M> = M extends { responseDeserialize(value: Buffer): infer R } ? R : never;

/** A service's unary and server-streaming RPCs, typed from its definition. */
export type TypedService<D> = {
  [K in keyof D as D[K] extends { requestStream: false } ? K : never]: D[K] extends { responseStream: false }
    ? (request: RequestOf<D[K]>, options?: CallOptions) => Promise<ResponseOf<D[K]>>
    : (request: RequestOf<D[K]>, options?: CallOptions) => AsyncIterable<ResponseOf<D[K]>>;
};

function metadataOf(options: CallOptions): Metadata {
  const metadata = options.metadata?.clone() ?? new Metadata();
  if (options.requestId !== undefined) metadata.set('x-request-id', options.requestId);
  return metadata;
}

function deadlineOf(options: CallOptions, fallbackMs: number | null): number {
  if (options.deadline) return options.deadline.getTime();
  const ms = options.deadlineMs ?? fallbackMs;
  return ms === null ? Infinity : Date.now() + ms;
}

/** Builds the typed face of one service over a generated client. */
export function typedService<D extends Record<string, MethodDefinition>>(client: Client, definition: D, defaults: CallDefaults): TypedService<D> {
  const face: Record<string, unknown> = {};
  for (const [name, method] of Object.entries(definition)) {
    if (method.requestStream) continue;
    const serialize = method.requestSerialize as (value: unknown) => Buffer;
    const deserialize = method.responseDeserialize;
    if (!method.responseStream) {
      face[name] = async (request: unknown, options: CallOptions = {}): Promise<unknown> => {
        const deadline = deadlineOf(options, defaults.deadlineMs);
        const policy = options.retry ?? defaults.retry;
        for (let attempt = 1; ; attempt += 1) {
          try {
            return await new Promise((resolve, reject) => {
              const call = client.makeUnaryRequest(method.path, serialize, deserialize, request, metadataOf(options), { deadline },
                (error: ServiceError | null, response?: unknown) => (error ? reject(error) : resolve(response)));
              options.signal?.addEventListener('abort', () => call.cancel(), { once: true });
            });
          } catch (error) {
            const wait = policy === false ? null : retryDelay(error, attempt, policy, deadline);
            if (wait === null || options.signal?.aborted) throw error;
            await sleep(wait, options.signal);
          }
        }
      };
    } else {
      face[name] = (request: unknown, options: CallOptions = {}): AsyncIterable<unknown> => ({
        async *[Symbol.asyncIterator]() {
          const deadline = deadlineOf(options, null);
          const policy = options.retry ?? defaults.retry;
          for (let attempt = 1; ; attempt += 1) {
            const stream: ClientReadableStream<unknown> = client.makeServerStreamRequest(method.path, serialize, deserialize, request, metadataOf(options), { deadline });
            const cancel = (): void => stream.cancel();
            options.signal?.addEventListener('abort', cancel, { once: true });
            let received = false;
            try {
              for await (const message of stream) {
                received = true;
                yield message;
              }
              return;
            } catch (error) {
              const wait = policy === false || received ? null : retryDelay(error, attempt, policy, deadline);
              if (wait === null || options.signal?.aborted) throw error;
              await sleep(wait, options.signal);
            } finally {
              options.signal?.removeEventListener('abort', cancel);
              stream.cancel();
            }
          }
        },
      });
    }
  }
  return face as TypedService<D>;
}
