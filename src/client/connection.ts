// Connecting to a tuneserve server: channel credentials (TLS by default, mutual TLS with a client
// certificate, plaintext only when asked for), the API key sent as "authorization: Bearer <key>" on
// every call, and the five generated grpc-js clients sharing one channel. connect() wraps them in the
// typed promise/async-iterator face with deadlines and retries (typed-service.ts); createClients()
// returns the generated clients themselves for code that wants grpc-js directly.

import { credentials, InterceptingCall, type ChannelCredentials, type ChannelOptions, type ClientOptions as GrpcClientOptions, type Interceptor } from '@grpc/grpc-js';
import { AdapterServiceClient, AdapterServiceService } from '../gen/tuneserve/v1/adapters.js';
import { DatasetServiceClient, DatasetServiceService } from '../gen/tuneserve/v1/datasets.js';
import { GenerationServiceClient, GenerationServiceService } from '../gen/tuneserve/v1/generation.js';
import { ModelServiceClient, ModelServiceService } from '../gen/tuneserve/v1/model.js';
import { TrainingServiceClient, TrainingServiceService } from '../gen/tuneserve/v1/training.js';
import { defaultRetryPolicy, type RetryPolicy } from './retry.js';
import { typedService, type CallDefaults, type TypedService } from './typed-service.js';

/** How to reach a server. */
export interface ConnectOptions {
  /** API key, sent as "authorization: Bearer <key>" metadata on every call. */
  apiKey?: string;
  /** @deprecated the same as apiKey (the old name of the bearer token). */
  token?: string;
  /**
   * TLS settings: the CA bundle that signed the server's certificate (default: the system's
   * roots), and for mutual TLS the client's certificate chain and key (PEM).
   */
  tls?: { ca?: Buffer; cert?: Buffer; key?: Buffer };
  /** Connect without TLS (a server started with --plaintext, or a mesh sidecar on localhost). */
  plaintext?: boolean;
  /** Ready-made channel credentials; overrides tls and plaintext. */
  credentials?: ChannelCredentials;
  /** grpc-js channel options. */
  channelOptions?: ChannelOptions;
  /** Deadline of each unary call and retry policy (connect() only). */
  defaults?: Partial<CallDefaults>;
}

/** The five generated clients sharing one channel. */
export interface TuneClients {
  training: TrainingServiceClient;
  datasets: DatasetServiceClient;
  generation: GenerationServiceClient;
  adapters: AdapterServiceClient;
  model: ModelServiceClient;
  /** Closes the channel. */
  close(): void;
}

/** The channel credentials the options ask for: TLS unless plaintext is explicit. */
export function channelCredentials(options: ConnectOptions): ChannelCredentials {
  if (options.credentials) return options.credentials;
  if (options.plaintext === true) {
    if (options.tls) throw new Error('choose tls or plaintext, not both');
    return credentials.createInsecure();
  }
  const tls = options.tls ?? {};
  if ((tls.cert === undefined) !== (tls.key === undefined)) throw new Error('tls.cert and tls.key go together (mutual TLS)');
  return credentials.createSsl(tls.ca ?? null, tls.key ?? null, tls.cert ?? null);
}

/** An interceptor that adds the API key to every call. */
function apiKeyInterceptor(key: string): Interceptor {
  // An interceptor rather than call credentials: grpc-js sends those only over TLS, and inside a
  // mesh the hop to the server is often plaintext.
  const authorization = `Bearer ${key}`;
  return (callOptions, nextCall) =>
    new InterceptingCall(nextCall(callOptions), {
      start(metadata, listener, next) {
        metadata.set('authorization', authorization);
        next(metadata, listener);
      },
    });
}

/** The generated grpc-js clients on one channel to "host:port". */
export function createClients(address: string, options: ConnectOptions = {}): TuneClients {
  const channel = channelCredentials(options);
  const key = options.apiKey ?? options.token;
  const interceptors: Interceptor[] = key === undefined ? [] : [apiKeyInterceptor(key)];
  const own: Partial<GrpcClientOptions> = { ...options.channelOptions, interceptors };
  const training = new TrainingServiceClient(address, channel, own);
  const shared: Partial<GrpcClientOptions> = { ...own, channelOverride: training.getChannel() };
  return {
    training,
    datasets: new DatasetServiceClient(address, channel, shared),
    generation: new GenerationServiceClient(address, channel, shared),
    adapters: new AdapterServiceClient(address, channel, shared),
    model: new ModelServiceClient(address, channel, shared),
    close: () => training.close(),
  };
}

/** The typed client: every unary RPC a promise, every server stream an async iterable. */
export interface TuneClient {
  training: TypedService<typeof TrainingServiceService>;
  datasets: TypedService<typeof DatasetServiceService>;
  generation: TypedService<typeof GenerationServiceService>;
  adapters: TypedService<typeof AdapterServiceService>;
  model: TypedService<typeof ModelServiceService>;
  /** The generated clients on the same channel (client-streaming uploads, or plain grpc-js use). */
  raw: TuneClients;
  close(): void;
}

/** Default deadline of a unary call. */
export const DEFAULT_DEADLINE_MS = 30_000;

/**
 * Connects to "host:port". Unary calls get a deadline (default 30 s) and are retried on UNAVAILABLE
 * and on RESOURCE_EXHAUSTED that carries RetryInfo, waiting as long as the server says.
 */
export function connect(address: string, options: ConnectOptions = {}): TuneClient {
  const raw = createClients(address, options);
  const defaults: CallDefaults = {
    deadlineMs: options.defaults?.deadlineMs ?? DEFAULT_DEADLINE_MS,
    retry: options.defaults?.retry === undefined ? defaultRetryPolicy : options.defaults.retry,
  };
  return {
    training: typedService(raw.training, TrainingServiceService, defaults),
    datasets: typedService(raw.datasets, DatasetServiceService, defaults),
    generation: typedService(raw.generation, GenerationServiceService, defaults),
    adapters: typedService(raw.adapters, AdapterServiceService, defaults),
    model: typedService(raw.model, ModelServiceService, defaults),
    raw,
    close: () => raw.close(),
  };
}

export type { RetryPolicy };
