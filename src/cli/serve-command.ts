// `tuneserve serve`: one process, one base model, the gRPC service on a port. With no --model it
// serves the built-in demo model (the "small" random Llama 3 preset with the real tokenizer), made
// under the data root on first start. The engine loads in the background so health checks answer
// (NOT_SERVING) while it does; SIGTERM/SIGINT drain and stop the server, then free the engine.

import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

import { makeModel } from '../engine/make-model.js';
import { choice, integer } from './flags.js';
import { jsonLogger } from '../server/logger.js';
import { NativeEnginePort } from '../server/native-engine-port.js';
import { createServer } from '../server/server.js';

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

export async function serveCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv, strict: true,
    options: {
      model: { type: 'string' }, 'data-root': { type: 'string' }, 'export-root': { type: 'string' }, port: { type: 'string' }, host: { type: 'string' },
      quant: { type: 'string' }, device: { type: 'string' }, 'cuda-compute': { type: 'string' }, threads: { type: 'string' },
      'metrics-port': { type: 'string' }, 'kv-cache-mb': { type: 'string' },
      reflection: { type: 'boolean' }, 'adapter-slots': { type: 'string' }, 'max-seq-len': { type: 'string' },
      'grace-ms': { type: 'string' }, 'drain-delay-ms': { type: 'string' },
    },
  });
  const logger = jsonLogger();
  const dataRoot = resolve(values['data-root'] ?? process.env.TUNESERVE_DATA_ROOT ?? 'tuneserve-data');
  const quant = choice(values, 'quant', ['nf4', 'none'] as const) ?? 'nf4';
  const device = choice(values, 'device', ['cpu', 'cuda', 'auto'] as const) ?? 'auto';
  const cudaCompute = choice(values, 'cuda-compute', ['bf16', 'f32'] as const) ?? 'bf16';
  const kvCacheMb = integer(values, 'kv-cache-mb') ?? 0;
  const threads = integer(values, 'threads') ?? 0;
  const metricsPort = integer(values, 'metrics-port') ?? 0;
  const authTokens = (process.env.TUNESERVE_AUTH_TOKENS ?? '').split(',').map((t) => t.trim()).filter(Boolean);

  const enginePromise = (async () => {
    const modelDir = values.model ?? (await ensureDemoModel(dataRoot, (line) => logger.info(line)));
    return NativeEnginePort.open(modelDir, {
      quant, device, cudaCompute, ...(threads > 0 ? { threads } : {}), ...(kvCacheMb > 0 ? { kvCacheBytes: kvCacheMb * 1048576 } : {}),
      ...(values.model ? {} : { name: 'demo' }),
      adapterSlots: integer(values, 'adapter-slots') ?? 16, maxSeqLen: integer(values, 'max-seq-len') ?? 8192,
      log: (line) => logger.info(line),
    });
  })();
  const server = await createServer({
    engine: enginePromise, dataRoot, ...(values['export-root'] ? { exportRoot: resolve(values['export-root']) } : {}),
    host: values.host ?? '0.0.0.0', port: (integer(values, 'port') ?? 50051), authTokens, reflection: values.reflection === true,
    metrics: metricsPort > 0 ? { port: metricsPort } : null, logger,
    shutdownGraceMs: (integer(values, 'grace-ms') ?? 10_000), drainDelayMs: (integer(values, 'drain-delay-ms') ?? 0),
  });
  logger.info('tuneserve listening', { port: server.port, dataRoot, auth: authTokens.length > 0 });

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info('shutting down', { signal });
    await server.close();
    (await enginePromise.catch(() => null))?.close();
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
