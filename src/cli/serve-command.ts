// `tuneserve serve`: one process, one base model, the gRPC service on a port. The configuration
// (flags, TUNESERVE_* variables, a JSON file; src/server/config.ts) is read and validated first;
// then OpenTelemetry starts, and only then are the server's modules (and so @grpc/grpc-js) loaded.
// With no --model it serves the built-in demo model (the "small" random Llama 3 preset with the real
// tokenizer), made under the data root on first start. The engine loads in the background so health
// checks answer (NOT_SERVING) while it does; SIGTERM/SIGINT drain and stop the server (calls in
// flight, generations included, finish within graceMs), then free the engine.

import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

import { makeModel } from '../engine/make-model.js';
import { configFlagOptions, describeConfig, loadConfig, settingsHelp, type ServeConfig } from '../server/config.js';
import { createLogger } from '../server/logger.js';
import { startOpenTelemetry } from '../server/otel-sdk.js';

export const DEMO_MODEL_SEED = 20260101;

/** The demo model's folder under a data root, made on first use. */
export async function ensureDemoModel(dataRoot: string, log: (line: string) => void): Promise<string> {
  const dir = join(resolve(dataRoot), 'models', 'demo');
  if (!existsSync(join(dir, 'config.json'))) {
    log(`making the built-in demo model (small Llama 3 preset, random weights) in ${dir}`);
    await makeModel({ preset: 'small', outDir: dir, seed: DEMO_MODEL_SEED });
  }
  return dir;
}

export async function serveCommand(argv: string[], io: { stdout: NodeJS.WritableStream } = process): Promise<void> {
  const { values } = parseArgs({ args: argv, strict: true, options: { ...configFlagOptions(), help: { type: 'boolean', short: 'h' } } }) as {
    values: Record<string, string | boolean | undefined>;
  };
  if (values.help === true) {
    io.stdout.write(settingsHelp());
    return;
  }
  const { config, sources, file } = loadConfig({ flags: values, env: process.env });
  if (values['print-config'] === true) {
    io.stdout.write(`${JSON.stringify({ configFile: file, settings: describeConfig(config, sources) }, null, 2)}\n`);
    return;
  }
  const otel = startOpenTelemetry({ metricsPort: config.metricsPort, metricsHost: config.metricsHost });
  await runServer(config, otel);
}

/** Starts the engine and the server from a validated configuration, and serves until a signal. */
async function runServer(config: ServeConfig, otel: ReturnType<typeof startOpenTelemetry>): Promise<void> {
  // Loaded only now: OpenTelemetry is running before @grpc/grpc-js is imported.
  const [{ createServer }, { NativeEnginePort }, { startStatusPage }] = await Promise.all([
    import('../server/server.js'),
    import('../server/native-engine-port.js'),
    import('../server/status-page.js'),
  ]);
  const logger = createLogger({ level: config.logLevel });
  const dataRoot = resolve(config.dataRoot);

  const enginePromise = (async () => {
    const modelDir = config.model ?? (await ensureDemoModel(dataRoot, (line) => logger.info(line)));
    return NativeEnginePort.open(modelDir, {
      quant: config.quant, device: config.device, cudaCompute: config.cudaCompute,
      ...(config.threads > 0 ? { threads: config.threads } : {}),
      ...(config.kvCacheMb > 0 ? { kvCacheBytes: config.kvCacheMb * 1048576 } : {}),
      ...(config.model ? {} : { name: 'demo' }),
      adapterSlots: config.adapterSlots, maxSeqLen: config.maxSeqLen,
      ...(config.adapterHostMb > 0 ? { adapterHostBytes: config.adapterHostMb * 1048576 } : {}),
      servingPolicy: { targetInterTokenMs: config.interTokenTargetMs, minTrainingShare: config.minTrainingSharePercent / 100 },
      log: (line) => logger.info(line),
    });
  })();
  const transport = config.plaintext
    ? { plaintext: true as const }
    : {
        tls: {
          cert: readFileSync(config.tlsCert!), key: readFileSync(config.tlsKey!),
          ...(config.tlsClientCa === undefined ? {} : { clientCa: readFileSync(config.tlsClientCa) }),
        },
      };
  const keys = config.authKeysFile !== undefined
    ? { file: config.authKeysFile, reloadMs: config.authReloadMs }
    : config.authTokens.length > 0 ? { tokens: config.authTokens } : null;
  if (keys === null) logger.warn('no API keys configured (authKeysFile): every caller is an admin of tenant "default"');
  const server = await createServer({
    engine: enginePromise, dataRoot, ...(config.exportRoot ? { exportRoot: resolve(config.exportRoot) } : {}),
    host: config.host, port: config.port, ...(config.healthPort > 0 ? { healthPort: config.healthPort } : {}), transport, keys, reflection: config.reflection, logger,
    limits: { maxConcurrentGenerations: config.maxConcurrentGenerations, maxQueuedJobs: config.maxQueuedJobs },
    shutdownGraceMs: config.graceMs, drainDelayMs: config.drainDelayMs,
  });
  const statusPage = config.statusPort > 0 ? await startStatusPage(server.status, { host: config.statusHost, port: config.statusPort }) : null;
  logger.info(
    { port: server.port, dataRoot, traces: otel.traces, metrics: otel.metrics, statusPort: statusPage?.port ?? null },
    'tuneserve listening',
  );

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, 'shutting down');
    await statusPage?.close();
    await server.close();
    (await enginePromise.catch(() => null))?.close();
    await otel.shutdown().catch(() => {});
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  try {
    await server.ready; // the server logs "serving" with the model's facts
  } catch (e) {
    await server.close();
    throw e;
  }
  await new Promise<never>(() => {}); // serve until a signal
}
