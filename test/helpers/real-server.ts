// A real tuneserve server for end-to-end tests: a random model made in a temp sandbox, the real
// engine behind NativeEnginePort, and the gRPC server on 127.0.0.1 (port 0). dispose() stops it,
// frees the engine, checks no unknown failure reached the error log, and removes the sandbox.

import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';

import { makeModel, type ModelPreset } from '../../src/engine/make-model.js';
import { NativeEnginePort } from '../../src/server/native-engine-port.js';
import { createServer, type TuneServer } from '../../src/server/server.js';
import { makeSandbox, recordingLogger } from '../server/harness.js';

export interface RealServer {
  sandbox: string;
  engine: NativeEnginePort;
  server: TuneServer;
  /** "127.0.0.1:<port>" */
  address: string;
  logger: ReturnType<typeof recordingLogger>;
  dispose(): Promise<void>;
}

export async function startRealServer(options: { preset: ModelPreset; seed: number; quant?: 'nf4' | 'none' }): Promise<RealServer> {
  const sandbox = await makeSandbox();
  await makeModel({ preset: options.preset, outDir: join(sandbox, 'model'), seed: options.seed });
  const engine = await NativeEnginePort.open(join(sandbox, 'model'), { quant: options.quant ?? 'nf4', device: 'cpu', log: () => {} });
  const logger = recordingLogger();
  const server = await createServer({ engine, dataRoot: join(sandbox, 'data'), host: '127.0.0.1', port: 0, transport: { plaintext: true }, logger, shutdownGraceMs: 2000 });
  await server.ready;
  return {
    sandbox, engine, server, logger, address: `127.0.0.1:${server.port}`,
    dispose: async () => {
      await server.close({ graceMs: 500 });
      engine.close();
      expect(logger.lines.filter((line) => line.level === 'error')).toEqual([]);
      await rm(sandbox, { recursive: true, force: true });
    },
  };
}
