// Wraps handlers into grpc-js call handlers, doing for every RPC what is the same for all: refuse
// while the server is loading or draining (UNAVAILABLE), check the bearer token when one is
// configured, watch cancellation and the deadline, turn any error into one status with rich
// details, and record rpc.server.call.duration.

import {
  status,
  type handleClientStreamingCall,
  type handleServerStreamingCall,
  type handleUnaryCall,
  type Metadata,
  type ServerReadableStream,
  type ServerUnaryCall,
  type ServerWritableStream,
} from '@grpc/grpc-js';
import { createHash, timingSafeEqual } from 'node:crypto';
import { ServiceError, toGrpcStatus, toServiceError } from './errors.js';
import type { Logger } from './logger.js';
import { CallWatch, readMessages, StreamWriter } from './streams.js';
import type { Telemetry } from './telemetry.js';

/** What every wrapped call needs from the server. */
export interface RpcEnvironment {
  /** UNAVAILABLE while loading or draining, else null. */
  gate(): ServiceError | null;
  /** Accepted bearer tokens; empty means no authentication. */
  authTokens: readonly string[];
  telemetry: Telemetry;
  logger: Logger;
  /** Removes server paths from messages sent to clients. */
  redact(message: string): string;
}

const digest = (value: string): Buffer => createHash('sha256').update(value).digest();

/** Builds the call handlers of the tuneserve services. */
export class RpcRunner {
  private readonly tokenDigests: Buffer[];

  constructor(private readonly environment: RpcEnvironment) {
    this.tokenDigests = environment.authTokens.map(digest);
  }

  /** A unary handler: request in, response out. */
  unary<Request, Response>(
    service: string,
    method: string,
    handler: (request: Request, call: ServerUnaryCall<Request, Response>, watch: CallWatch) => Promise<Response>,
  ): handleUnaryCall<Request, Response> {
    return (call, callback) => {
      const started = performance.now();
      const watch = new CallWatch(call);
      void (async () => {
        try {
          this.admit(call.metadata);
          const response = await handler(call.request, call, watch);
          watch.throwIfStopped();
          this.finish(service, method, started, status.OK);
          callback(null, response);
        } catch (error) {
          const failure = this.failure(error, watch, `${service}/${method}`);
          this.finish(service, method, started, failure.code);
          callback(toGrpcStatus(failure));
        } finally {
          watch.dispose();
        }
      })();
    };
  }

  /** A server-streaming handler: request in, messages written through a backpressure-aware writer. */
  serverStream<Request, Response>(
    service: string,
    method: string,
    handler: (
      request: Request,
      writer: StreamWriter<Response>,
      call: ServerWritableStream<Request, Response>,
      watch: CallWatch,
    ) => Promise<void>,
  ): handleServerStreamingCall<Request, Response> {
    return (call) => {
      const started = performance.now();
      const watch = new CallWatch(call);
      const writer = new StreamWriter<Response>(call as ServerWritableStream<unknown, Response>, watch, () =>
        this.environment.telemetry.countDrainWait(method),
      );
      void (async () => {
        try {
          this.admit(call.metadata);
          await handler(call.request, writer, call, watch);
          watch.throwIfStopped();
          this.finish(service, method, started, status.OK);
          call.end();
        } catch (error) {
          const failure = this.failure(error, watch, `${service}/${method}`);
          this.finish(service, method, started, failure.code);
          call.emit('error', toGrpcStatus(failure));
        } finally {
          watch.dispose();
        }
      })();
    };
  }

  /** A client-streaming handler: messages read in order, one response. */
  clientStream<Request, Response>(
    service: string,
    method: string,
    handler: (messages: AsyncGenerator<Request>, call: ServerReadableStream<Request, Response>, watch: CallWatch) => Promise<Response>,
  ): handleClientStreamingCall<Request, Response> {
    return (call, callback) => {
      const started = performance.now();
      const watch = new CallWatch(call);
      void (async () => {
        try {
          this.admit(call.metadata);
          const response = await handler(readMessages<Request>(call, watch), call, watch);
          watch.throwIfStopped();
          this.finish(service, method, started, status.OK);
          callback(null, response);
        } catch (error) {
          const failure = this.failure(error, watch, `${service}/${method}`);
          this.finish(service, method, started, failure.code);
          callback(toGrpcStatus(failure));
        } finally {
          watch.dispose();
        }
      })();
    };
  }

  /** Refuses the call when the server is not serving or the credential is missing or wrong. */
  private admit(metadata: Metadata): void {
    const refusal = this.environment.gate();
    if (refusal) throw refusal;
    if (this.tokenDigests.length === 0) return;
    const header = metadata.get('authorization')[0];
    const token = typeof header === 'string' && header.startsWith('Bearer ') ? header.slice(7) : null;
    const presented = token === null ? null : digest(token);
    if (presented === null || !this.tokenDigests.some((known) => timingSafeEqual(known, presented))) {
      throw new ServiceError(
        status.UNAUTHENTICATED,
        'UNAUTHENTICATED',
        'a valid "authorization: Bearer <token>" metadata entry is required',
      );
    }
  }

  /** The error to report: the call's own outcome (cancel, deadline) first, then the thrown error. */
  private failure(error: unknown, watch: CallWatch, context: string): ServiceError {
    return watch.error() ?? toServiceError(error, this.environment.logger, context, this.environment.redact);
  }

  private finish(service: string, method: string, started: number, code: status): void {
    this.environment.telemetry.recordCall(`tuneserve.v1.${service}`, method, code, (performance.now() - started) / 1000);
  }
}
