// OpenTelemetry metrics and the tracer of the server. Metrics are named after the semantic
// conventions: rpc.server.call.duration for every RPC, the gen_ai.server.* latencies and
// gen_ai.client.token.usage for generations (labelled with the adapter and the tenant); training
// progress per job and adapter (loss, learning rate, tokens/s, step); and gauges read from the
// engine at each collection: queue depth, KV-cache blocks, device memory by use, the adapter pool
// (per adapter version: requests, tokens, hits, loads and their time, evictions, tier) and the
// scheduler (the serving policy and the share training gets).
// Under `tuneserve serve` instruments come from the global providers that the OpenTelemetry SDK
// registered (src/server/otel-sdk.ts); tests pass their own readers, or a Prometheus port, and get a
// MeterProvider of their own.

import {
  metrics as otelMetrics,
  trace,
  type Attributes,
  type Counter,
  type Gauge,
  type Histogram,
  type Meter,
  type ObservableResult,
  type Tracer,
  type TracerProvider,
} from '@opentelemetry/api';
import { PrometheusExporter } from '@opentelemetry/exporter-prometheus';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { MeterProvider, type IMetricReader } from '@opentelemetry/sdk-metrics';
import type { AdapterPoolState, AdapterPoolStatus, AdapterServingStats, SchedulerStatus, SchedulingPolicy } from './engine-port.js';

/** Where to expose Prometheus metrics. */
export interface PrometheusOptions {
  port: number;
  /** Interface to listen on; default all. */
  host?: string;
}

/** Observed values the server reports on every scrape. */
export interface GaugeSources {
  queuedJobs(): number;
  runningJobs(): number;
  loadedAdapters(): number;
  adapterSlots(): number;
  activeGenerations(): number;
  /** Every adapter version the pool knows, by key "<id>@v<N>", and the pool as a whole. */
  adapterPool(): { versions: Map<string, AdapterPoolState>; status: AdapterPoolStatus };
  /** The serving policy and what the scheduler measured. */
  scheduler(): { policy: SchedulingPolicy; status: SchedulerStatus };
  /** The engine's memory figures (EnginePort.modelInfo().memory), read once per collection. */
  memory(): {
    weightsBytes: number;
    adapterPoolBytes: number;
    kvCacheBytes: number;
    trainingWorkspaceBytes: number;
    stepWorkspaceBytes: number;
    backendScratchBytes: number;
    deviceTotalBytes: number;
    deviceFreeBytes: number;
    kvCacheBlocks: number;
    kvCacheBlocksUsed: number;
  };
}

/** One optimizer step of a training job. */
export interface TrainingStepMeasurement {
  jobId: string;
  adapter: string;
  tenant: string;
  step: number;
  loss: number;
  learningRate: number;
  tokensPerSecond: number;
  /** Share of the engine's busy time the job got since its previous step, when the engine reports it. */
  deviceShare?: number;
}

/** Facts about one finished generation. */
export interface GenerationMeasurement {
  /** "chat" or "text_completion". */
  operation: string;
  /** Adapter id, or "" for the base. */
  adapter: string;
  /** Tenant of the caller. */
  tenant: string;
  model: string;
  /** Seconds from request to first token, or null when none came. */
  timeToFirstToken: number | null;
  /** Mean seconds per output token after the first, or null with fewer than two tokens. */
  timePerOutputToken: number | null;
  /** Seconds the whole generation took. */
  duration: number;
  inputTokens: number;
  outputTokens: number;
  /** error.type attribute on failure, e.g. the gRPC status name. */
  errorType: string | null;
}

// Bucket boundaries from the OpenTelemetry GenAI and RPC semantic conventions.
const durationBuckets = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];
const firstTokenBuckets = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10];
const perTokenBuckets = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5];
const tokenBuckets = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864];

/** The server's instruments. */
export class Telemetry {
  private readonly callDuration: Histogram;
  private readonly timeToFirstToken: Histogram;
  private readonly timePerOutputToken: Histogram;
  private readonly requestDuration: Histogram;
  private readonly tokenUsage: Histogram;
  private readonly drainWaits: Counter;
  private readonly trainingLoss: Gauge;
  private readonly trainingLearningRate: Gauge;
  private readonly trainingTokensPerSecond: Gauge;
  private readonly trainingStep: Gauge;
  private readonly trainingSteps: Counter;
  private readonly trainingEvalLoss: Gauge;
  private readonly trainingForgettingLoss: Gauge;
  private readonly trainingDeviceShare: Gauge;
  /** The tracer of the server's spans. */
  readonly tracer: Tracer;

  private constructor(
    private readonly provider: MeterProvider | null,
    private readonly meter: Meter,
    tracerProvider: TracerProvider | null,
  ) {
    this.tracer = (tracerProvider ?? trace.getTracerProvider()).getTracer('tuneserve');
    this.callDuration = meter.createHistogram('rpc.server.call.duration', {
      description: 'Duration of server RPC calls',
      unit: 's',
      advice: { explicitBucketBoundaries: durationBuckets },
    });
    this.timeToFirstToken = meter.createHistogram('gen_ai.server.time_to_first_token', {
      description: 'Time to generate the first token of a response',
      unit: 's',
      advice: { explicitBucketBoundaries: firstTokenBuckets },
    });
    this.timePerOutputToken = meter.createHistogram('gen_ai.server.time_per_output_token', {
      description: 'Time per output token after the first',
      unit: 's',
      advice: { explicitBucketBoundaries: perTokenBuckets },
    });
    this.requestDuration = meter.createHistogram('gen_ai.server.request.duration', {
      description: 'Generative AI server request duration',
      unit: 's',
      advice: { explicitBucketBoundaries: durationBuckets },
    });
    this.tokenUsage = meter.createHistogram('gen_ai.client.token.usage', {
      description: 'Input and output tokens used per request',
      unit: '{token}',
      advice: { explicitBucketBoundaries: tokenBuckets },
    });
    this.drainWaits = meter.createCounter('tuneserve.stream.drain_waits', {
      description: "Server-stream writes that waited for 'drain' (client reading slower than the server writes)",
      unit: '{wait}',
    });
    // Training progress: last value per job and adapter (a loss curve per job in Prometheus/Grafana).
    this.trainingLoss = meter.createGauge('tuneserve.training.loss', { description: 'Training loss of the last optimizer step', unit: '1' });
    this.trainingLearningRate = meter.createGauge('tuneserve.training.learning_rate', {
      description: 'Learning rate of the last optimizer step',
      unit: '1',
    });
    this.trainingTokensPerSecond = meter.createGauge('tuneserve.training.tokens_per_second', {
      description: 'Training throughput of the last optimizer step',
      unit: '{token}/s',
    });
    this.trainingStep = meter.createGauge('tuneserve.training.step', { description: 'Last optimizer step of the job', unit: '{step}' });
    this.trainingSteps = meter.createCounter('tuneserve.training.steps', { description: 'Optimizer steps taken', unit: '{step}' });
    this.trainingEvalLoss = meter.createGauge('tuneserve.training.eval_loss', { description: 'Loss on the held-out rows at the last evaluation', unit: '1' });
    this.trainingDeviceShare = meter.createGauge('tuneserve.training.device_share', {
      description: "Share of the engine's busy time the job got over its last step (the rest went to generation)",
      unit: '1',
    });
    this.trainingForgettingLoss = meter.createGauge('tuneserve.training.forgetting_loss', {
      description: "Loss on general text at the last evaluation (the forgetting check), with the base model's as tuneserve.phase=base",
      unit: '1',
    });
  }

  /**
   * Creates the instruments. With `prometheus`, a MeterProvider with a Prometheus exporter on
   * that port; otherwise instruments come from the global MeterProvider (a no-op unless the
   * process registered an SDK before starting the server).
   */
  static async create(
    prometheus: PrometheusOptions | null,
    extraReaders: IMetricReader[] = [],
    tracerProvider: TracerProvider | null = null,
  ): Promise<Telemetry> {
    if (prometheus === null && extraReaders.length === 0) {
      return new Telemetry(null, otelMetrics.getMeter('tuneserve'), tracerProvider);
    }
    const readers: IMetricReader[] = [...extraReaders];
    if (prometheus !== null) {
      const exporter = new PrometheusExporter({
        port: prometheus.port,
        ...(prometheus.host === undefined ? {} : { host: prometheus.host }),
        preventServerStart: true,
      });
      await exporter.startServer();
      readers.push(exporter);
    }
    const provider = new MeterProvider({ readers, resource: resourceFromAttributes({ 'service.name': 'tuneserve' }) });
    return new Telemetry(provider, provider.getMeter('tuneserve'), tracerProvider);
  }

  /** Registers the gauges read at each collection. */
  observe(sources: GaugeSources): void {
    const gauge = (name: string, description: string, unit: string, read: (result: ObservableResult) => void): void => {
      this.meter.createObservableGauge(name, { description, unit }).addCallback(read);
    };
    const value = (read: () => number) => (result: ObservableResult) => result.observe(read());
    gauge('tuneserve.training.jobs.queued', 'Training jobs waiting (the queue depth)', '{job}', value(sources.queuedJobs));
    gauge('tuneserve.training.jobs.running', 'Training jobs running', '{job}', value(sources.runningJobs));
    gauge('tuneserve.generations.active', 'Generations in progress', '{request}', value(sources.activeGenerations));
    this.observePool(sources);
    gauge('tuneserve.kv_cache.blocks', 'KV-cache blocks in the pool', '{block}', value(() => sources.memory().kvCacheBlocks));
    gauge('tuneserve.kv_cache.blocks.used', 'KV-cache blocks held by generations now', '{block}', value(() => sources.memory().kvCacheBlocksUsed));
    gauge('tuneserve.device.memory.total', 'Device memory (host RAM for the CPU device)', 'By', value(() => sources.memory().deviceTotalBytes));
    gauge('tuneserve.device.memory.free', 'Device memory free', 'By', value(() => sources.memory().deviceFreeBytes));
    gauge('tuneserve.device.memory.usage', 'Device memory the engine holds, by use', 'By', (result) => {
      const m = sources.memory();
      const uses: Record<string, number> = {
        weights: m.weightsBytes,
        adapter_pool: m.adapterPoolBytes,
        kv_cache: m.kvCacheBytes,
        training_workspace: m.trainingWorkspaceBytes,
        step_workspace: m.stepWorkspaceBytes,
        backend_scratch: m.backendScratchBytes,
      };
      for (const [use, bytes] of Object.entries(uses)) result.observe(bytes, { 'tuneserve.memory.use': use });
    });
  }

  /**
   * The adapter pool: gauges of the pool as a whole, and per adapter version (labels tuneserve.adapter
   * and tuneserve.adapter.version) the counters it keeps and the tier it is in; then the scheduler.
   */
  private observePool(sources: GaugeSources): void {
    const m = this.meter;
    m.createObservableGauge('tuneserve.adapters.loaded', { description: 'Adapter versions in a device slot', unit: '{adapter}' })
      .addCallback((result) => result.observe(sources.loadedAdapters()));
    m.createObservableGauge('tuneserve.adapters.slots', { description: 'Slots of the device adapter pool', unit: '{adapter}' })
      .addCallback((result) => result.observe(sources.adapterSlots()));
    m.createObservableGauge('tuneserve.adapters.pinned', { description: 'Pinned adapter versions', unit: '{adapter}' })
      .addCallback((result) => result.observe(sources.adapterPool().status.pinned));
    m.createObservableGauge('tuneserve.adapters.waiting', { description: 'Generations waiting for their adapter (being read, or no free slot)', unit: '{request}' })
      .addCallback((result) => result.observe(sources.adapterPool().status.waitingRequests));
    m.createObservableGauge('tuneserve.adapters.host.memory', { description: 'Bytes of adapters in the host tier, and its budget (0: none)', unit: 'By' })
      .addCallback((result) => {
        const status = sources.adapterPool().status;
        result.observe(status.hostBytes, { 'tuneserve.memory.use': 'used' });
        result.observe(status.hostBudgetBytes, { 'tuneserve.memory.use': 'budget' });
      });
    m.createObservableGauge('tuneserve.adapters.tier', { description: 'Adapter versions known to the pool, by tier', unit: '{adapter}' })
      .addCallback((result) => {
        const counts: Record<string, number> = { disk: 0, host: 0, device: 0 };
        for (const state of sources.adapterPool().versions.values()) counts[state.tier]! += 1;
        for (const [tier, count] of Object.entries(counts)) result.observe(count, { 'tuneserve.adapter.tier': tier });
      });

    const perVersion = (
      name: string,
      description: string,
      unit: string,
      read: (s: AdapterServingStats) => [number, Attributes][],
    ): void => {
      m.createObservableCounter(name, { description, unit }).addCallback((result) => {
        for (const [key, state] of sources.adapterPool().versions) {
          const at = key.lastIndexOf('@v');
          const version = { 'tuneserve.adapter': key.slice(0, at), 'tuneserve.adapter.version': key.slice(at + 2) };
          for (const [value, attributes] of read(state.stats)) result.observe(value, { ...version, ...attributes });
        }
      });
    };
    perVersion('tuneserve.adapter.requests', 'Generation requests per adapter version', '{request}', (s) => [[s.requests, {}]]);
    perVersion('tuneserve.adapter.tokens', 'Prompt (input) and generated (output) tokens per adapter version', '{token}', (s) => [
      [s.inputTokens, { 'gen_ai.token.type': 'input' }],
      [s.outputTokens, { 'gen_ai.token.type': 'output' }],
    ]);
    perVersion('tuneserve.adapter.hits', 'Requests that found their adapter in a device slot (tier device) or placed it from host memory (tier host)', '{request}', (s) => [
      [s.hits, { 'tuneserve.adapter.tier': 'device' }],
      [s.hostHits, { 'tuneserve.adapter.tier': 'host' }],
    ]);
    perVersion('tuneserve.adapter.loads', 'Reads of an adapter version from disk into host memory', '{load}', (s) => [[s.loads, {}]]);
    perVersion('tuneserve.adapter.load.time', 'Seconds spent reading adapter versions from disk', 's', (s) => [[s.loadSeconds, {}]]);
    perVersion('tuneserve.adapter.evictions', 'Adapter versions moved out of a device slot (tier device) or out of host memory (tier host)', '{eviction}', (s) => [
      [s.evictions, { 'tuneserve.adapter.tier': 'device' }],
      [s.hostEvictions, { 'tuneserve.adapter.tier': 'host' }],
    ]);
    perVersion('tuneserve.adapter.load.failures', 'Reads of an adapter version that failed (the requests waiting for it failed)', '{load}', (s) => [[s.loadFailures, {}]]);
    m.createObservableGauge('tuneserve.adapter.resident', { description: 'The tier an adapter version is in: 0 disk, 1 host, 2 device', unit: '1' })
      .addCallback((result) => {
        const rank: Record<string, number> = { disk: 0, host: 1, device: 2 };
        for (const [key, state] of sources.adapterPool().versions) {
          const at = key.lastIndexOf('@v');
          result.observe(rank[state.tier]!, { 'tuneserve.adapter': key.slice(0, at), 'tuneserve.adapter.version': key.slice(at + 2) });
        }
      });

    m.createObservableGauge('tuneserve.scheduler.training_share', { description: "Training's share of the engine's busy time over the last seconds", unit: '1' })
      .addCallback((result) => result.observe(sources.scheduler().status.trainingShare));
    m.createObservableGauge('tuneserve.scheduler.policy', {
      description: 'The serving policy: the inter-token target in seconds (0: alternate generation and training steps) and the minimum training share',
      unit: '1',
    }).addCallback((result) => {
      const { policy } = sources.scheduler();
      result.observe(policy.targetInterTokenMs / 1000, { 'tuneserve.policy.setting': 'inter_token_target_seconds' });
      result.observe(policy.minTrainingShare, { 'tuneserve.policy.setting': 'min_training_share' });
    });
    m.createObservableGauge('tuneserve.scheduler.step.time', { description: 'Moving average of one generation step and one training micro-step', unit: 's' })
      .addCallback((result) => {
        const { status } = sources.scheduler();
        result.observe(status.generationStepMs / 1000, { 'tuneserve.phase': 'generation' });
        result.observe(status.trainingStepMs / 1000, { 'tuneserve.phase': 'training' });
      });
    m.createObservableCounter('tuneserve.scheduler.deferred_micro_steps', { description: 'Turns in which the policy held training back for generation', unit: '{step}' })
      .addCallback((result) => result.observe(sources.scheduler().status.deferredMicroSteps));
  }

  /** Records one evaluation of a training job (and the forgetting check when it ran). */
  recordTrainingEval(m: { jobId: string; adapter: string; tenant: string; loss: number; forgettingLoss?: number; forgettingBaseLoss?: number }): void {
    const attributes: Attributes = { 'tuneserve.job': m.jobId, 'tuneserve.adapter': m.adapter, 'tuneserve.tenant': m.tenant };
    this.trainingEvalLoss.record(m.loss, attributes);
    if (m.forgettingLoss !== undefined) this.trainingForgettingLoss.record(m.forgettingLoss, { ...attributes, 'tuneserve.phase': 'adapter' });
    if (m.forgettingBaseLoss !== undefined) this.trainingForgettingLoss.record(m.forgettingBaseLoss, { ...attributes, 'tuneserve.phase': 'base' });
  }

  /** Records one optimizer step of a training job. */
  recordTrainingStep(m: TrainingStepMeasurement): void {
    const attributes: Attributes = { 'tuneserve.job': m.jobId, 'tuneserve.adapter': m.adapter, 'tuneserve.tenant': m.tenant };
    this.trainingLoss.record(m.loss, attributes);
    this.trainingLearningRate.record(m.learningRate, attributes);
    this.trainingTokensPerSecond.record(m.tokensPerSecond, attributes);
    this.trainingStep.record(m.step, attributes);
    if (m.deviceShare !== undefined) this.trainingDeviceShare.record(m.deviceShare, attributes);
    this.trainingSteps.add(1, { 'tuneserve.adapter': m.adapter, 'tuneserve.tenant': m.tenant });
  }

  /** Records one finished RPC. */
  recordCall(service: string, method: string, statusCode: number, seconds: number, tenant: string): void {
    this.callDuration.record(seconds, {
      'rpc.system': 'grpc',
      'rpc.service': service,
      'rpc.method': method,
      'rpc.grpc.status_code': statusCode,
      'tuneserve.tenant': tenant,
    });
  }

  /** Records one finished generation. */
  recordGeneration(m: GenerationMeasurement): void {
    const base: Attributes = {
      'gen_ai.operation.name': m.operation,
      'gen_ai.system': 'tuneserve',
      'gen_ai.request.model': m.model,
      'tuneserve.adapter': m.adapter,
      'tuneserve.tenant': m.tenant,
    };
    const attributes: Attributes = m.errorType === null ? base : { ...base, 'error.type': m.errorType };
    this.requestDuration.record(m.duration, attributes);
    if (m.timeToFirstToken !== null) this.timeToFirstToken.record(m.timeToFirstToken, base);
    if (m.timePerOutputToken !== null) this.timePerOutputToken.record(m.timePerOutputToken, base);
    if (m.errorType === null) {
      this.tokenUsage.record(m.inputTokens, { ...base, 'gen_ai.token.type': 'input' });
      this.tokenUsage.record(m.outputTokens, { ...base, 'gen_ai.token.type': 'output' });
    }
  }

  /** Counts one write that had to wait for 'drain'. */
  countDrainWait(method: string): void {
    this.drainWaits.add(1, { 'rpc.method': method });
  }

  /** Stops the exporter (and its HTTP server). */
  async shutdown(): Promise<void> {
    await this.provider?.shutdown();
  }
}
