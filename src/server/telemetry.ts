// OpenTelemetry metrics of the server, named after the semantic conventions: rpc.server.call.duration
// for every RPC, the gen_ai.server.* latencies and gen_ai.client.token.usage for generations, and
// a few tuneserve.* gauges. A Prometheus endpoint serves them when a metrics port is configured.

import { metrics as otelMetrics, type Attributes, type Histogram, type Meter, type Counter } from '@opentelemetry/api';
import { PrometheusExporter } from '@opentelemetry/exporter-prometheus';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { MeterProvider, type IMetricReader } from '@opentelemetry/sdk-metrics';

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
  activeGenerations(): number;
}

/** Facts about one finished generation. */
export interface GenerationMeasurement {
  /** "chat" or "text_completion". */
  operation: string;
  /** Adapter id, or "" for the base. */
  adapter: string;
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

  private constructor(
    private readonly provider: MeterProvider | null,
    private readonly meter: Meter,
  ) {
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
  }

  /**
   * Creates the instruments. With `prometheus`, a MeterProvider with a Prometheus exporter on
   * that port; otherwise instruments come from the global MeterProvider (a no-op unless the
   * process registered an SDK before starting the server).
   */
  static async create(prometheus: PrometheusOptions | null, extraReaders: IMetricReader[] = []): Promise<Telemetry> {
    if (prometheus === null && extraReaders.length === 0) {
      return new Telemetry(null, otelMetrics.getMeter('tuneserve'));
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
    return new Telemetry(provider, provider.getMeter('tuneserve'));
  }

  /** Registers the gauges read at each collection. */
  observe(sources: GaugeSources): void {
    const gauge = (name: string, description: string, unit: string, read: () => number): void => {
      this.meter.createObservableGauge(name, { description, unit }).addCallback((result) => result.observe(read()));
    };
    gauge('tuneserve.training.jobs.queued', 'Training jobs waiting', '{job}', sources.queuedJobs);
    gauge('tuneserve.training.jobs.running', 'Training jobs running', '{job}', sources.runningJobs);
    gauge('tuneserve.adapters.loaded', 'Adapters in the device pool', '{adapter}', sources.loadedAdapters);
    gauge('tuneserve.generations.active', 'Generations in progress', '{request}', sources.activeGenerations);
  }

  /** Records one finished RPC. */
  recordCall(service: string, method: string, statusCode: number, seconds: number): void {
    this.callDuration.record(seconds, {
      'rpc.system': 'grpc',
      'rpc.service': service,
      'rpc.method': method,
      'rpc.grpc.status_code': statusCode,
    });
  }

  /** Records one finished generation. */
  recordGeneration(m: GenerationMeasurement): void {
    const base: Attributes = {
      'gen_ai.operation.name': m.operation,
      'gen_ai.system': 'tuneserve',
      'gen_ai.request.model': m.model,
      'tuneserve.adapter': m.adapter,
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
