// createServer: the tuneserve gRPC server over an engine. It listens at once (health answers
// NOT_SERVING and every RPC UNAVAILABLE until the engine is ready), serves the five tuneserve.v1
// services plus grpc.health.v1 (and reflection when asked), and shuts down gracefully: health
// NOT_SERVING and new calls refused, the running training job interrupted (resumable), then
// tryShutdown raced with a grace timer, then forceShutdown.

import { Server, ServerCredentials } from '@grpc/grpc-js';
import type { TracerProvider } from '@opentelemetry/api';
import type { IMetricReader } from '@opentelemetry/sdk-metrics';
import { HealthImplementation, type ServingStatus } from 'grpc-health-check';
import { readFileSync } from 'node:fs';
import { AdapterServiceService } from '../gen/tuneserve/v1/adapters.js';
import { DatasetServiceService } from '../gen/tuneserve/v1/datasets.js';
import { GenerationServiceService } from '../gen/tuneserve/v1/generation.js';
import { ModelServiceService } from '../gen/tuneserve/v1/model.js';
import { TrainingServiceService } from '../gen/tuneserve/v1/training.js';
import { AdapterRegistry, publishedAdapterOf } from './adapter-registry.js';
import { KeyStore, type KeySource } from './auth.js';
import { adapterService } from './adapter-service.js';
import { defaultLimits, MAX_CHUNK_BYTES, type ServerLimits, type ServiceContext } from './context.js';
import { DataRoot } from './data-root.js';
import { datasetService } from './dataset-service.js';
import { DatasetStore } from './datasets.js';
import type { EnginePort } from './engine-port.js';
import { unavailable } from './errors.js';
import { generationService } from './generation-service.js';
import { JobQueue, type JobQueueDependencies } from './job-queue.js';
import { JobStore } from './job-store.js';
import { createLogger, type Logger } from './logger.js';
import { modelService } from './model-service.js';
import { addReflection } from './reflection.js';
import { RpcRunner } from './rpc.js';
import type { StatusSnapshot, StatusSource } from './status-page.js';
import { Telemetry, type PrometheusOptions } from './telemetry.js';
import { tenantOf } from './auth.js';
import { trainingService } from './training-service.js';

/** Fully qualified names of the tuneserve services (health checks may name each). */
export const SERVICE_NAMES = [
  'tuneserve.v1.TrainingService',
  'tuneserve.v1.DatasetService',
  'tuneserve.v1.GenerationService',
  'tuneserve.v1.AdapterService',
  'tuneserve.v1.ModelService',
] as const;

/** How to start a server. */
export interface ServerOptions {
  /** The engine, or a promise of it while the model loads (the server answers UNAVAILABLE until then). */
  engine: EnginePort | Promise<EnginePort>;
  /** Folder for everything the server stores; created when missing. */
  dataRoot: string;
  /** Folder for merged models; default <dataRoot>/exports. */
  exportRoot?: string;
  /** Interface to listen on; default 0.0.0.0. */
  host?: string;
  /** Port; default 50051; 0 picks a free one (see TuneServer.port). */
  port?: number;
  /** TLS (mutual TLS with clientCa), or plaintext, which must be asked for. */
  transport: TransportOptions;
  /** API keys (a keys file, or the deprecated token list); absent: no authentication. */
  keys?: KeySource | null;
  /**
   * Also serve grpc.health.v1 (only) on this plaintext port, for Kubernetes gRPC probes, which cannot
   * use TLS; 0 picks a free one (see TuneServer.healthPort). Absent: none.
   */
  healthPort?: number | null;
  /** Serve grpc.reflection (v1 and v1alpha); default false. */
  reflection?: boolean;
  /** Serve Prometheus metrics on this port; default off. */
  metrics?: PrometheusOptions | null;
  /** Extra OpenTelemetry metric readers (e.g. an in-memory reader in tests). */
  metricReaders?: IMetricReader[];
  /** Where spans go; default the global provider (the SDK's under `tuneserve serve`). */
  tracerProvider?: TracerProvider;
  /** Overrides of the default limits. */
  limits?: Partial<ServerLimits>;
  logger?: Logger;
  /** How long close() lets calls in flight finish before cancelling them; default 10 s. */
  shutdownGraceMs?: number;
  /** How long close() keeps refusing calls (health NOT_SERVING) before closing connections; default 0. */
  drainDelayMs?: number;
}

/** PEM files of the gRPC port's TLS: its certificate chain and key, and for mutual TLS the client CA. */
export interface TlsFiles {
  cert: Buffer;
  key: Buffer;
  /** Clients must present a certificate signed by this CA bundle. */
  clientCa?: Buffer;
}

/** How the gRPC port is secured. */
export type TransportOptions = { tls: TlsFiles } | { plaintext: true };

/** grpc-js credentials for a transport choice. */
export function serverCredentials(transport: TransportOptions): ServerCredentials {
  if ('plaintext' in transport) return ServerCredentials.createInsecure();
  const { cert, key, clientCa } = transport.tls;
  return ServerCredentials.createSsl(clientCa ?? null, [{ cert_chain: cert, private_key: key }], clientCa !== undefined);
}

/** A running server. */
export interface TuneServer {
  /** The bound port. */
  readonly port: number;
  /** The bound health-only port, or null. */
  readonly healthPort: number | null;
  /** Resolves once the engine is ready and every service is SERVING; rejects if loading failed. */
  readonly ready: Promise<void>;
  /** Drains and stops the server (idempotent); the engine is left to its owner. */
  close(options?: { graceMs?: number; drainDelayMs?: number }): Promise<void>;
  /** What the status page shows (startStatusPage). */
  readonly status: StatusSource;
}

type Lifecycle = 'loading' | 'serving' | 'failed' | 'draining' | 'closed';

function packageVersion(): string {
  try {
    const text = readFileSync(new URL('../../package.json', import.meta.url), 'utf8');
    return (JSON.parse(text) as { version?: string }).version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Starts a tuneserve server. */
export async function createServer(options: ServerOptions): Promise<TuneServer> {
  // Observe the engine promise at once: a load failure must not surface as an unhandled rejection.
  const engineLoad = Promise.resolve(options.engine);
  engineLoad.catch(() => {});
  const logger = options.logger ?? createLogger();
  const limits: ServerLimits = { ...defaultLimits, ...options.limits };
  const dataRoot = await DataRoot.open(options.dataRoot, options.exportRoot);
  const store = new JobStore(dataRoot.databasePath, Date.now, (job) => publishedAdapterOf(dataRoot, job));
  const telemetry = await Telemetry.create(options.metrics ?? null, options.metricReaders ?? [], options.tracerProvider ?? null);
  const keys = options.keys ? KeyStore.open(options.keys, logger) : null;
  if (options.keys && 'tokens' in options.keys) {
    logger.warn({ tokens: options.keys.tokens.length }, 'TUNESERVE_AUTH_TOKENS is deprecated: each token is an admin key of tenant "default"; use a keys file');
  }

  let engine: EnginePort | null = null;
  let lifecycle: Lifecycle = 'loading';
  const requireEngine = (): EnginePort => {
    if (engine === null) throw unavailable('MODEL_LOADING', 'the model is still loading');
    return engine;
  };

  const datasets = new DatasetStore(dataRoot, limits.maxDatasetBytes, logger);
  const adapters = new AdapterRegistry(dataRoot, requireEngine, logger);
  const queue = new JobQueue({
    store,
    dataRoot,
    datasets,
    adapters,
    logger,
    telemetry,
    maxQueuedJobs: limits.maxQueuedJobs,
  });
  const context: ServiceContext = {
    engine: requireEngine,
    dataRoot,
    store,
    queue,
    datasets,
    adapters,
    telemetry,
    logger,
    limits,
    generations: { active: 0 },
    merge: { current: null },
    serverVersion: packageVersion(),
  };

  const rpc = new RpcRunner({
    gate: () => {
      switch (lifecycle) {
        case 'serving':
          return null;
        case 'loading':
          return unavailable('MODEL_LOADING', 'the model is still loading', 5000);
        case 'failed':
          return unavailable('MODEL_LOAD_FAILED', 'the model failed to load; see the server log', 30_000);
        case 'draining':
        case 'closed':
          return unavailable('SERVER_DRAINING', 'the server is shutting down; retry on another replica');
      }
    },
    keys,
    telemetry,
    logger,
    redact: (message) => dataRoot.redact(message),
  });

  const server = new Server({
    'grpc.max_receive_message_length': Math.max(4 * 1024 * 1024, limits.maxInlineDatasetBytes + 64 * 1024, MAX_CHUNK_BYTES + 64 * 1024),
  });
  server.addService(TrainingServiceService, trainingService(context, rpc));
  server.addService(DatasetServiceService, datasetService(context, rpc));
  server.addService(GenerationServiceService, generationService(context, rpc));
  server.addService(AdapterServiceService, adapterService(context, rpc));
  server.addService(ModelServiceService, modelService(context, rpc));

  const health = new HealthImplementation(
    Object.fromEntries(['', ...SERVICE_NAMES].map((name) => [name, 'NOT_SERVING' as ServingStatus])),
  );
  health.addToServer(server);
  const setHealth = (value: ServingStatus): void => {
    for (const name of ['', ...SERVICE_NAMES]) health.setStatus(name, value);
  };
  if (options.reflection === true) await addReflection(server);

  const host = options.host ?? '0.0.0.0';
  const address = host.includes(':') ? `[${host}]:${options.port ?? 50051}` : `${host}:${options.port ?? 50051}`;
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(address, serverCredentials(options.transport), (error, bound) =>
      error ? reject(error) : resolve(bound),
    );
  });
  // grpc.health.v1 alone on a plaintext port, for kubelet gRPC probes (they cannot speak TLS).
  let healthServer: Server | null = null;
  let healthPort: number | null = null;
  if (options.healthPort !== undefined && options.healthPort !== null) {
    healthServer = new Server();
    health.addToServer(healthServer);
    const healthAddress = host.includes(':') ? `[${host}]:${options.healthPort}` : `${host}:${options.healthPort}`;
    healthPort = await new Promise<number>((resolve, reject) => {
      healthServer!.bindAsync(healthAddress, ServerCredentials.createInsecure(), (error, bound) => (error ? reject(error) : resolve(bound)));
    });
  }
  logger.info(
    {
      address: host,
      port,
      healthPort,
      transport: 'plaintext' in options.transport ? 'plaintext' : options.transport.tls.clientCa ? 'mutual-tls' : 'tls',
      keys: keys?.size ?? null,
      reflection: options.reflection === true,
    },
    'listening',
  );

  const ready = engineLoad.then(
    (loaded) => {
      if (lifecycle !== 'loading') return;
      engine = loaded;
      queue.start(loaded);
      telemetry.observe({
        queuedJobs: () => queue.queuedCount,
        runningJobs: () => queue.runningCount,
        loadedAdapters: () => loaded.loadedAdapters().length,
        adapterSlots: () => loaded.modelInfo().adapterSlots,
        activeGenerations: () => context.generations.active,
        memory: () => loaded.modelInfo().memory,
        adapterPool: () => ({ versions: loaded.adapterPoolStates(), status: loaded.modelInfo().pool }),
        scheduler: () => {
          const info = loaded.modelInfo();
          return { policy: info.schedulingPolicy, status: info.scheduler };
        },
      });
      lifecycle = 'serving';
      setHealth('SERVING');
      const info = loaded.modelInfo();
      logger.info({ model: info.name, device: info.device, quantization: info.quantization }, 'serving');
    },
    (error: unknown) => {
      if (lifecycle === 'loading') lifecycle = 'failed';
      logger.error({ error: error instanceof Error ? (error.stack ?? error.message) : String(error) }, 'model failed to load');
      throw error;
    },
  );
  ready.catch(() => {});

  let closing: Promise<void> | null = null;
  const close = (closeOptions: { graceMs?: number; drainDelayMs?: number } = {}): Promise<void> => {
    closing ??= (async () => {
      const graceMs = closeOptions.graceMs ?? options.shutdownGraceMs ?? 10_000;
      const drainDelayMs = closeOptions.drainDelayMs ?? options.drainDelayMs ?? 0;
      lifecycle = 'draining';
      setHealth('NOT_SERVING');
      logger.info({ graceMs, drainDelayMs }, 'draining');
      if (drainDelayMs > 0) await sleep(drainDelayMs);
      await Promise.race([queue.shutdown(), sleep(graceMs)]);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          logger.warn('grace period over; cancelling calls still in flight');
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      healthServer?.forceShutdown();
      lifecycle = 'closed';
      await sleep(0);
      store.close();
      keys?.close();
      await telemetry.shutdown();
      logger.info('stopped');
    })();
    return closing;
  };

  const status: StatusSource = {
    snapshot: async (): Promise<StatusSnapshot> => {
      const info = engine?.modelInfo() ?? null;
      const m = info?.memory;
      const adapterViews = engine === null ? [] : await adapters.list();
      return {
        state: lifecycle,
        model: info === null ? null : { name: info.name, device: info.device, quantization: info.quantization },
        memory: m === undefined ? null : {
          deviceTotalBytes: m.deviceTotalBytes,
          deviceFreeBytes: m.deviceFreeBytes,
          uses: {
            weights: m.weightsBytes, adapter_pool: m.adapterPoolBytes, kv_cache: m.kvCacheBytes, training_workspace: m.trainingWorkspaceBytes,
            step_workspace: m.stepWorkspaceBytes, backend_scratch: m.backendScratchBytes,
          },
          kvCacheBlocks: m.kvCacheBlocks,
          kvCacheBlocksUsed: m.kvCacheBlocksUsed,
        },
        pool: engine === null || info === null ? null : {
          slots: info.adapterSlots,
          loaded: engine.loadedAdapters(),
          pinned: info.pool.pinned,
          hostBytes: info.pool.hostBytes,
          hostBudgetBytes: info.pool.hostBudgetBytes,
          waitingRequests: info.pool.waitingRequests,
          hits: info.pool.stats.hits,
          hostHits: info.pool.stats.hostHits,
          loads: info.pool.stats.loads,
          evictions: info.pool.stats.evictions,
          trainingShare: info.scheduler.trainingShare,
        },
        adapters: adapterViews.map((a) => ({ adapterId: a.adapterId, tenant: tenantOf(a), shared: a.shared === true, loaded: a.loaded, finalLoss: a.metrics?.finalLoss ?? null })),
        jobs: store.list({ states: [], limit: 50, beforeOrdinal: null }).map((j) => ({
          jobId: j.jobId, state: j.state, adapterId: j.adapterId, tenant: j.tenant, step: j.lastStep?.step ?? 0, totalSteps: j.totalSteps,
          loss: j.lastStep?.loss ?? null, evalLoss: j.metrics?.evalLoss ?? null, createTime: j.createTime,
        })),
        queue: { queued: queue.queuedCount, running: queue.runningCount },
      };
    },
    jobExists: (jobId) => store.get(jobId) !== null,
    follow: (jobId, afterSequence, signal) => queue.follow(jobId, afterSequence, signal),
  };

  return { port, healthPort, ready, close, status };
}
