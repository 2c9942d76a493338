// The TypeScript client helpers the CLI and other services use: one channel with a bearer token,
// dataset upload from a file, adapter folder import and export round trip, and an upload the
// server refuses mid-stream failing promptly instead of hanging on 'drain'.

import { status } from '@grpc/grpc-js';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  createClients,
  exportAdapterFolder,
  importAdapterFolder,
  statusDetailsOf,
  uploadDatasetFile,
  type TuneClients,
} from '../../src/client/index.js';
import { writeDoubleAdapter } from './engine-double.js';
import { startHarness, type Harness } from './harness.js';

describe('client helpers', () => {
  let harness: Harness | null = null;
  let clients: TuneClients | null = null;
  afterEach(async () => {
    clients?.close();
    clients = null;
    await harness?.dispose();
    harness = null;
  });

  it('upload, import and export through one authenticated channel', async () => {
    harness = await startHarness({ server: { keys: { tokens: ['t0ken'] } } });
    clients = createClients(`127.0.0.1:${harness.server.port}`, { apiKey: 't0ken', plaintext: true });
    const file = path.join(harness.sandbox, 'rows.jsonl');
    await fs.writeFile(file, '{"text":"one"}\n{"text":"two"}\n'.repeat(50_000));
    const dataset = await uploadDatasetFile(clients, 'rows', file);
    expect(dataset).toMatchObject({ datasetId: 'rows', rowCount: 100_000, sizeBytes: (await fs.stat(file)).size });

    const source = path.join(harness.sandbox, 'peft');
    await writeDoubleAdapter(source);
    await fs.writeFile(path.join(source, 'README.md'), '# card\n');
    const adapter = await importAdapterFolder(clients, 'card', source);
    expect(adapter.adapterId).toBe('card');
    const target = path.join(harness.sandbox, 'exported');
    const exported = await exportAdapterFolder(clients, 'card', target);
    expect(exported.adapterId).toBe('card');
    for (const name of ['adapter_config.json', 'adapter_model.safetensors', 'README.md']) {
      expect((await fs.readFile(path.join(target, name))).equals(await fs.readFile(path.join(source, name)))).toBe(true);
    }
  });

  it('rejects promptly when the server refuses an upload mid-stream', async () => {
    harness = await startHarness({ server: { limits: { maxDatasetBytes: 1024 } } });
    clients = createClients(`127.0.0.1:${harness.server.port}`, { plaintext: true });
    const file = path.join(harness.sandbox, 'big.jsonl');
    await fs.writeFile(file, '{"text":"x"}\n'.repeat(2_000_000));
    const error = await uploadDatasetFile(clients, 'big', file).then(
      () => null,
      (caught: unknown) => caught as Error & { code: number },
    );
    expect(error?.code).toBe(status.INVALID_ARGUMENT);
    expect(statusDetailsOf(error as never)?.reason).toBe('DATASET_TOO_LARGE');
  });
});
