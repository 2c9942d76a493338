// The README's TypeScript client example (examples/client.ts) type-checks and runs to the end
// against a real server: the real engine over a tiny random Llama 3 model on 127.0.0.1, trained
// for 3 steps (enough to show the event stream; the tiny model learns nothing in that time). The
// example imports 'tuneserve/client' (package.json "exports", i.e. dist/), so dist/ is rebuilt first
// when stale and the example is imported after that.

import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ensureDistFresh } from '../helpers/dist.js';
import { startRealServer, type RealServer } from '../helpers/real-server.js';
import { call, connect } from '../server/harness.js';

const ROOT = join(import.meta.dirname, '..', '..');

describe('examples/client.ts', () => {
  let real: RealServer;
  let main: typeof import('../../examples/client.js').main;

  beforeAll(async () => {
    await ensureDistFresh();
    ({ main } = await import('../../examples/client.js'));
    real = await startRealServer({ preset: 'tiny', seed: 3 });
  }, 300_000);

  afterAll(async () => {
    await real?.dispose();
  });

  it('type-checks (vitest only strips types)', async () => {
    await promisify(execFile)(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(ROOT, 'examples', 'tsconfig.json'), '--noEmit'], { cwd: ROOT });
  }, 180_000);

  it('connects, uploads, trains, generates with the adapter and reads an error\'s details', async () => {
    const lines: string[] = [];
    const result = await main(real.address, { steps: 3, log: (line) => lines.push(line) });
    expect(result.modelName).toBe('model');
    expect(Number.isFinite(result.finalLoss)).toBe(true);
    expect(result.errorReason).toBe('ADAPTER_NOT_FOUND');
    expect(lines.filter((line) => line.startsWith('step '))).toHaveLength(3);
    expect(lines.some((line) => line.startsWith('generated '))).toBe(true);
    expect(lines.at(-1)).toMatch(/^as expected: NOT_FOUND ADAPTER_NOT_FOUND /);
    // The adapter it trained is on the server, made by its job.
    const clients = connect(real.server.port);
    try {
      const { adapter } = await call(clients.adapters.getAdapter, clients.adapters, { adapterId: result.adapterId });
      expect(adapter).toMatchObject({ adapterId: result.adapterId, jobId: result.jobId, loaded: true });
    } finally {
      clients.close();
    }
  }, 180_000);
});
