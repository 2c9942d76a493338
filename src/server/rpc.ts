// Wraps handlers into grpc-js call handlers, doing for every RPC what is the same for all, in one
// place: refuse while the server is loading or draining (UNAVAILABLE), take the request id from
// "x-request-id" metadata (or make one) and echo it back, authenticate the API key and check the
// RPC's scope, open the RPC's span (parented to a W3C traceparent in the metadata), watch
// cancellation and the deadline, turn any error into one status with rich details, log the call
// with its request id, and record rpc.server.call.duration. Handlers get one CallContext.

import {
  status,
  Metadata,
  type handleClientStreamingCall,
  type handleServerStreamingCall,
  type handleUnaryCall,
  type ServerReadableStream,
  type ServerUnaryCall,
  type ServerWritableStream,
} from '@grpc/grpc-js';
import { context as otelContext, propagation, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace, type Attributes, type Span, type TextMapGetter } from '@opentelemetry/api';
import { randomUUID } from 'node:crypto';
import type { EventEmitter } from 'node:events';
import { ANONYMOUS, authorize, type KeyStore, type Principal } from './auth.js';
import { ServiceError, toGrpcStatus, toServiceError } from './errors.js';
import type { Logger } from './logger.js';
import { CallWatch, readMessages, StreamWriter } from './streams.js';
import type { Telemetry } from './telemetry.js';

/** What every wrapped call needs from the server. */
export interface RpcEnvironment {
  /** UNAVAILABLE while loading or draining, else null. */
  gate(): ServiceError | null;
  /** The API keys; null: no authentication (every caller is an admin of the default tenant). */
  keys: KeyStore | null;
  telemetry: Telemetry;
  logger: Logger;
  /** Removes server paths from messages sent to clients. */
  redact(message: string): string;
}

/** One call as its handler sees it. */
export interface CallContext {
  /** From the caller's "x-request-id" metadata, or made here; on every log line and the span. */
  readonly requestId: string;
  /** Who is calling (tenant and scopes). */
  readonly principal: Principal;
  /** The server's logger with this call's request id, service and method. */
  readonly log: Logger;
  /** The RPC's span; child spans hang under it. */
  readonly span: Span;
  /** Cancellation and deadline of the call. */
  readonly watch: CallWatch;
  /** Fires when the client cancels or its deadline passes. */
  readonly signal: AbortSignal;
  /** Records what the call is about on the span (e.g. tuneserve.adapter, tuneserve.job). */
  annotate(attributes: Attributes): void;
  /** Starts a child span of the RPC's span (end it yourself). */
  startSpan(name: string, attributes?: Attributes): Span;
}

/** Longest request id taken from metadata; longer or odd ones are replaced by a fresh one. */
const MAX_REQUEST_ID = 128;
const requestIdRule = /^[\x21-\x7e]{1,128}$/;

const metadataGetter: TextMapGetter<Metadata> = {
  keys: (carrier) => Object.keys(carrier.getMap()),
  get: (carrier, key) => {
    const values = carrier.get(key).filter((v): v is string => typeof v === 'string');
    return values.length === 0 ? undefined : values.length === 1 ? values[0] : values;
  },
};

type AnyCall = EventEmitter & {
  metadata: Metadata;
  getDeadline(): Date | number;
  sendMetadata(metadata: Metadata): void;
  cancelled?: boolean;
};

/** Builds the call handlers of the tuneserve services. */
export class RpcRunner {
  constructor(private readonly environment: RpcEnvironment) {}

  /** A unary handler: request in, response out. */
  unary<Request, Response>(
    service: string,
    method: string,
    handler: (request: Request, context: CallContext, call: ServerUnaryCall<Request, Response>) => Promise<Response>,
  ): handleUnaryCall<Request, Response> {
    return (call, callback) => {
      let response: Response;
      this.run(service, method, call, async (context) => {
        response = await handler(call.request, context, call);
      }, (failure) => (failure ? callback(failure) : callback(null, response)));
    };
  }

  /** A server-streaming handler: request in, messages written through a backpressure-aware writer. */
  serverStream<Request, Response>(
    service: string,
    method: string,
    handler: (request: Request, writer: StreamWriter<Response>, context: CallContext, call: ServerWritableStream<Request, Response>) => Promise<void>,
  ): handleServerStreamingCall<Request, Response> {
    return (call) => {
      this.run(service, method, call, async (context) => {
        const writer = new StreamWriter<Response>(call as ServerWritableStream<unknown, Response>, context.watch, () =>
          this.environment.telemetry.countDrainWait(method),
        );
        await handler(call.request, writer, context, call);
      }, (failure) => (failure ? call.emit('error', failure) : call.end()));
    };
  }

  /** A client-streaming handler: messages read in order, one response. */
  clientStream<Request, Response>(
    service: string,
    method: string,
    handler: (messages: AsyncGenerator<Request>, context: CallContext, call: ServerReadableStream<Request, Response>) => Promise<Response>,
  ): handleClientStreamingCall<Request, Response> {
    return (call, callback) => {
      let response: Response;
      this.run(service, method, call, async (context) => {
        response = await handler(readMessages<Request>(call, context.watch), context, call);
      }, (failure) => (failure ? callback(failure) : callback(null, response)));
    };
  }

  /** What every kind of call does around its handler; `finish` sends the response or the status. */
  private run(
    service: string,
    method: string,
    call: AnyCall,
    body: (context: CallContext) => Promise<void>,
    finish: (failure: ReturnType<typeof toGrpcStatus> | null) => void,
  ): void {
    const { telemetry, logger } = this.environment;
    const started = performance.now();
    const fullService = `tuneserve.v1.${service}`;
    const given = call.metadata.get('x-request-id')[0];
    const requestId = typeof given === 'string' && given.length <= MAX_REQUEST_ID && requestIdRule.test(given) ? given : randomUUID();
    const echoed = new Metadata();
    echoed.set('x-request-id', requestId);
    call.sendMetadata(echoed);

    const parent = propagation.extract(ROOT_CONTEXT, call.metadata, metadataGetter);
    const span = telemetry.tracer.startSpan(
      `${fullService}/${method}`,
      {
        kind: SpanKind.SERVER,
        attributes: { 'rpc.system': 'grpc', 'rpc.service': fullService, 'rpc.method': method, 'tuneserve.request_id': requestId },
      },
      parent,
    );
    const spanContext = trace.setSpan(parent, span);
    const watch = new CallWatch(call);
    let log = logger.child({ requestId, rpc: `${service}/${method}` });
    let principal: Principal = ANONYMOUS;
    let tenantAttributes: Attributes = {};
    const context: CallContext = {
      requestId,
      get principal() {
        return principal;
      },
      get log() {
        return log;
      },
      span,
      watch,
      signal: watch.signal,
      annotate: (attributes) => span.setAttributes(attributes),
      startSpan: (name, attributes) => telemetry.tracer.startSpan(name, { attributes: { ...tenantAttributes, ...attributes } }, spanContext),
    };

    void otelContext.with(spanContext, async () => {
      let code: status = status.OK;
      let failure: ServiceError | null = null;
      try {
        const refusal = this.environment.gate();
        if (refusal) throw refusal;
        if (this.environment.keys !== null) {
          principal = this.environment.keys.authenticate(call.metadata);
          tenantAttributes = { 'tuneserve.tenant': principal.tenant };
          span.setAttributes({ 'tuneserve.tenant': principal.tenant, 'tuneserve.key_id': principal.keyId });
          log = log.child({ tenant: principal.tenant, keyId: principal.keyId });
        }
        authorize(principal, service, method);
        await body(context);
        watch.throwIfStopped();
      } catch (error) {
        failure = watch.error() ?? toServiceError(error, log, `${service}/${method}`, this.environment.redact);
        code = failure.code;
      } finally {
        watch.dispose();
      }
      const seconds = (performance.now() - started) / 1000;
      telemetry.recordCall(fullService, method, code, seconds, principal.tenant);
      span.setAttribute('rpc.grpc.status_code', code);
      if (failure !== null) {
        span.setStatus({ code: SpanStatusCode.ERROR, message: failure.reason });
        span.setAttribute('error.type', failure.reason);
        log.info({ code: status[code], reason: failure.reason, ms: Math.round(seconds * 1000) }, 'call failed');
      } else {
        log.debug({ ms: Math.round(seconds * 1000) }, 'call done');
      }
      span.end();
      finish(failure === null ? null : toGrpcStatus(failure));
    });
  }
}
