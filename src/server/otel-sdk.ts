// Starts the OpenTelemetry Node SDK for `tuneserve serve`, configured by the standard OTEL_*
// variables, before any gRPC module is loaded (the serve command imports the server only after
// this resolves). The server's spans and metrics then go to whatever the SDK exports to:
//
//   traces:  OTEL_TRACES_EXPORTER (otlp, console, zipkin, none), OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT,
//            OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (http/protobuf, http/json, grpc)
//   metrics: OTEL_METRICS_EXPORTER (otlp, prometheus, console, none), OTEL_EXPORTER_PROMETHEUS_PORT/HOST,
//            OTEL_METRIC_EXPORT_INTERVAL; --metrics-port N is shorthand for adding prometheus on port N
//   both:    OTEL_SERVICE_NAME (default tuneserve), OTEL_RESOURCE_ATTRIBUTES, OTEL_SDK_DISABLED
//
// One deliberate difference from the SDK's defaults: an exporter variable left unset means "otlp"
// only when an OTLP endpoint is configured, and "none" otherwise, so a server started without a
// collector does not retry exports to localhost:4318 forever. Logs stay with pino (stderr); the SDK's
// log exporter is off unless OTEL_LOGS_EXPORTER asks for it.
//
// No instrumentation packages are registered: the span of every RPC is made by the server's one RPC
// wrapper (src/server/rpc.ts), which knows the request id, tenant and adapter and skips health checks.
// Starting the SDK first still matters for anything an operator adds through the SDK, and it is the
// order the OpenTelemetry docs require.

import { createRequire } from 'node:module';
import { envDetector, hostDetector } from '@opentelemetry/resources';
import { NodeSDK } from '@opentelemetry/sdk-node';

/** What the serve command's configuration adds to the OTEL_* variables. */
export interface OpenTelemetryOptions {
  /** --metrics-port: a Prometheus endpoint on this port (0: none beyond OTEL_METRICS_EXPORTER). */
  metricsPort: number;
  metricsHost: string;
}

/** A started SDK; shutdown() flushes spans and metrics. */
export interface OpenTelemetryHandle {
  shutdown(): Promise<void>;
  /** The exporters in use, for the startup log line. */
  traces: string;
  metrics: string;
}

/** Whether a module of @grpc/grpc-js is already loaded (the SDK must come first). */
export function grpcAlreadyLoaded(): boolean {
  const cache = createRequire(import.meta.url).cache;
  return Object.keys(cache).some((file) => file.includes(`${'@grpc'}/grpc-js`));
}

/** Starts the SDK from the environment plus the configuration's Prometheus port. */
export function startOpenTelemetry(options: OpenTelemetryOptions, env: NodeJS.ProcessEnv = process.env): OpenTelemetryHandle {
  if (grpcAlreadyLoaded()) {
    throw new Error('OpenTelemetry must start before @grpc/grpc-js is loaded (src/cli/serve-command.ts imports the server lazily)');
  }
  const otlpEndpoint = (signal: 'TRACES' | 'METRICS'): boolean =>
    Boolean(env.OTEL_EXPORTER_OTLP_ENDPOINT || env[`OTEL_EXPORTER_OTLP_${signal}_ENDPOINT`]);
  env.OTEL_SERVICE_NAME ||= 'tuneserve';
  env.OTEL_TRACES_EXPORTER ||= otlpEndpoint('TRACES') ? 'otlp' : 'none';
  env.OTEL_LOGS_EXPORTER ||= 'none';
  const metricExporters = new Set((env.OTEL_METRICS_EXPORTER || (otlpEndpoint('METRICS') ? 'otlp' : 'none')).split(',').map((s) => s.trim()));
  if (options.metricsPort > 0) {
    metricExporters.delete('none');
    metricExporters.add('prometheus');
    env.OTEL_EXPORTER_PROMETHEUS_PORT = String(options.metricsPort);
    env.OTEL_EXPORTER_PROMETHEUS_HOST = options.metricsHost;
  }
  env.OTEL_METRICS_EXPORTER = [...metricExporters].join(',');

  const sdk = new NodeSDK({
    // Not the process detector: it would put the command line (paths, flags) on every span.
    resourceDetectors: [envDetector, hostDetector],
    instrumentations: [],
  });
  sdk.start();
  return {
    shutdown: () => sdk.shutdown(),
    traces: env.OTEL_TRACES_EXPORTER,
    metrics: env.OTEL_METRICS_EXPORTER,
  };
}
