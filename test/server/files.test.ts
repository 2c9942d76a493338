// Files over streams: dataset uploads (checksum, size limit, bad rows, atomic publish), adapter
// import/export round trips (with a slow reader), and merges written under the export root.

import { status, type ClientReadableStream } from '@grpc/grpc-js';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MergeAndUnloadRequest, MergeBase, MergeDtype, type ExportAdapterResponse } from '../../src/gen/tuneserve/v1/adapters.js';
import { GenerateRequest } from '../../src/gen/tuneserve/v1/generation.js';
import { doubleAdapterFiles, EngineDouble } from './engine-double.js';
import { call, collect, eventually, expectError, expectStatus, importAdapter, sha256, startHarness, upload, type Harness } from './harness.js';
import { TestMetricReader } from './metric-reader.js';

const ROWS = ['{"text":"héllo wörld"}', '{"prompt":"2+2=","completion":"4"}', '{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}'].join('\n');

describe('dataset uploads', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  const leftovers = async (): Promise<string[]> => [
    ...(await fs.readdir(path.join(harness!.dataRoot, 'datasets'))),
    ...(await fs.readdir(path.join(harness!.dataRoot, 'tmp'))),
  ];

  it('stores a dataset sent in small chunks, byte for byte, and lists and deletes it', async () => {
    harness = await startHarness();
    const { clients } = harness;
    const { dataset } = await upload(clients, 'qa', ROWS, { chunkSize: 5 });
    expect(dataset).toMatchObject({ datasetId: 'qa', sizeBytes: Buffer.byteLength(ROWS), sha256: sha256(ROWS), rowCount: 3 });
    expect(await fs.readFile(path.join(harness.dataRoot, 'datasets', 'qa', 'data.jsonl'), 'utf8')).toBe(ROWS);
    await upload(clients, 'b', ROWS);
    const first = await call(clients.datasets.listDatasets, clients.datasets, { pageSize: 1, pageToken: '' });
    expect(first.datasets.map((d) => d.datasetId)).toEqual(['b']);
    const second = await call(clients.datasets.listDatasets, clients.datasets, { pageSize: 1, pageToken: first.nextPageToken });
    expect(second.datasets.map((d) => d.datasetId)).toEqual(['qa']);
    expect(second.nextPageToken).toBe('');
    await call(clients.datasets.deleteDataset, clients.datasets, { datasetId: 'qa' });
    await expectStatus(call(clients.datasets.getDataset, clients.datasets, { datasetId: 'qa' }), status.NOT_FOUND);
  });

  it('refuses a checksum mismatch and keeps nothing', async () => {
    harness = await startHarness();
    await expectStatus(upload(harness.clients, 'qa', ROWS, { sha256: sha256('other') }), status.INVALID_ARGUMENT, {
      field: 'header.sha256',
      reason: 'CHECKSUM_MISMATCH',
    });
    expect(await leftovers()).toEqual([]);
  });

  it('refuses a declared size over the limit before any byte, and a stream longer than declared at the first extra byte', async () => {
    harness = await startHarness({ server: { limits: { maxDatasetBytes: 100 } } });
    const big = '{"text":"x"}\n'.repeat(20);
    const over = await expectStatus(upload(harness.clients, 'big', big), status.INVALID_ARGUMENT, {
      field: 'header.size_bytes',
      reason: 'DATASET_TOO_LARGE',
    });
    expect(over.fieldViolations[0]?.description).toContain('100 bytes');
    await expectStatus(upload(harness.clients, 'liar', big, { sizeBytes: 50 }), status.INVALID_ARGUMENT, { field: 'chunk', reason: 'SIZE_MISMATCH' });
    await expectStatus(upload(harness.clients, 'short', ROWS.slice(0, 20), { sizeBytes: 90, sha256: sha256(ROWS.slice(0, 20)) }), status.INVALID_ARGUMENT, {
      field: 'header.size_bytes',
      reason: 'SIZE_MISMATCH',
    });
    expect(await leftovers()).toEqual([]);
  });

  it('refuses a bad row with its line number, and a stream without a header', async () => {
    harness = await startHarness();
    const bad = `${ROWS}\n{"completion":"no prompt"}\n`;
    const details = await expectStatus(upload(harness.clients, 'qa', bad), status.INVALID_ARGUMENT, { field: 'chunk', reason: 'INVALID_DATASET' });
    expect(details.fieldViolations[0]?.description).toContain('line 4');
    const headless = new Promise((resolve, reject) => {
      const stream = harness!.clients.datasets.uploadDataset((error, response) => (error ? reject(error) : resolve(response)));
      stream.write({ chunk: Buffer.from(ROWS) });
      stream.end();
    });
    await expectStatus(headless, status.INVALID_ARGUMENT, { field: 'header' });
    expect(await leftovers()).toEqual([]);
  });

  it('reads line ends and a byte order mark as training does; refuses a CR inside a row (found by the rows fuzzer)', async () => {
    harness = await startHarness();
    // \r between JSON tokens is JSON whitespace, but line readers disagree on it: refused with its place.
    const cr = await expectStatus(upload(harness.clients, 'cr', `${ROWS}\n{"text":\r"split"}\n`), status.INVALID_ARGUMENT, { field: 'chunk', reason: 'INVALID_DATASET' });
    expect(cr.fieldViolations[0]?.description).toMatch(/^line 4: has a carriage return \(CR\) at character 9/);
    expect((await upload(harness.clients, 'bom', `\ufeff${ROWS}\n`)).dataset?.rowCount).toBe(3);
    expect((await upload(harness.clients, 'crlf', ROWS.split('\n').join('\r\n'))).dataset?.rowCount).toBe(3);
    expect((await leftovers()).sort()).toEqual(['bom', 'crlf']);
  });
});

describe('adapter files', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  it('imports and exports a PEFT folder byte for byte, with a slow reader', async () => {
    const reader = new TestMetricReader();
    harness = await startHarness({ server: { metricReaders: [reader] } });
    const { clients } = harness;
    // A 6 MiB "weights" file: big enough that the export must wait for the reader.
    const files = doubleAdapterFiles();
    const weights = Buffer.concat([files['adapter_model.safetensors']!, Buffer.alloc(6 * 1024 * 1024, 7)]);
    const readme = Buffer.from('# bot\n');
    const imported = await importAdapter(clients, 'bot', {
      files: { 'adapter_config.json': files['adapter_config.json']!, 'adapter_model.safetensors': weights, 'README.md': readme },
      chunkSize: 1024 * 1024,
    });
    expect(imported.adapter).toMatchObject({ adapterId: 'bot', source: 2, matchesBase: true, sizeBytes: weights.length + readme.length + files['adapter_config.json']!.length });
    expect(imported.adapter?.config).toMatchObject({ rank: 8, alpha: 16, targetModules: ['q_proj', 'v_proj'] });

    // 64 KiB chunks: the paused client buffers 16 messages (1 MiB) plus the HTTP/2 window, far
    // less than the 6 MiB file, so the server must wait for 'drain' until the client reads again.
    const stream: ClientReadableStream<ExportAdapterResponse> = clients.adapters.exportAdapter({ adapterId: 'bot', chunkSize: 64 * 1024 });
    const received: ExportAdapterResponse[] = [];
    const paused = new Promise<void>((resolve) => {
      stream.on('data', (message: ExportAdapterResponse) => {
        received.push(message);
        if (received.length === 2) {
          stream.pause();
          resolve();
        }
      });
    });
    const ended = new Promise<void>((resolve, reject) => {
      stream.on('end', () => resolve());
      stream.on('error', reject);
    });
    await paused;
    await eventually(async () => (await reader.counterTotal('tuneserve.stream.drain_waits')) > 0);
    stream.resume();
    await ended;
    const header = received[0]?.header;
    expect(header?.files.map((f) => f.name)).toEqual(['adapter_config.json', 'adapter_model.safetensors', 'README.md']);
    const bytes = new Map<string, Buffer[]>();
    for (const message of received.slice(1)) {
      const chunk = message.chunk!;
      bytes.set(chunk.name, [...(bytes.get(chunk.name) ?? []), Buffer.from(chunk.data)]);
    }
    for (const entry of header?.files ?? []) {
      const content = Buffer.concat(bytes.get(entry.name) ?? []);
      expect(content.length).toBe(entry.sizeBytes);
      expect(sha256(content)).toBe(entry.sha256);
    }
    expect(Buffer.concat(bytes.get('adapter_model.safetensors') ?? []).equals(weights)).toBe(true);
  });

  it('refuses imports whose files do not match their manifest or are not an adapter', async () => {
    harness = await startHarness();
    const { clients } = harness;
    const files = doubleAdapterFiles();
    const manifest = Object.entries(files).map(([name, bytes]) => ({ name, sizeBytes: bytes.length, sha256: sha256(bytes) }));
    await expectStatus(
      importAdapter(clients, 'x', { manifest: [manifest[0]!, { ...manifest[1]!, sha256: sha256('nope') }] }),
      status.INVALID_ARGUMENT,
      { field: 'header.files[1].sha256', reason: 'CHECKSUM_MISMATCH' },
    );
    await expectStatus(importAdapter(clients, 'x', { manifest: [manifest[0]!] }), status.INVALID_ARGUMENT, { field: 'header.files' });
    await expectStatus(
      importAdapter(clients, 'x', { manifest: [manifest[0]!, { ...manifest[1]!, name: 'adapter_model.bin' }] }),
      status.INVALID_ARGUMENT,
      { field: 'header.files[1].name' },
    );
    const garbage = { 'adapter_config.json': Buffer.from('{"peft_type":"PREFIX_TUNING"}'), 'adapter_model.safetensors': Buffer.from('zz') };
    await expectStatus(importAdapter(clients, 'x', { files: garbage }), status.INVALID_ARGUMENT, { reason: 'ADAPTER_INVALID' });
    await expectStatus(
      importAdapter(clients, 'x', { manifest: [manifest[0]!, { ...manifest[1]!, sizeBytes: 10 * 1024 ** 4 }] }),
      status.INVALID_ARGUMENT,
      { field: 'header.files[1].size_bytes', reason: 'ADAPTER_TOO_LARGE' },
    );
    expect(await fs.readdir(path.join(harness.dataRoot, 'adapters'))).toEqual([]);
    expect(await fs.readdir(path.join(harness.dataRoot, 'tmp'))).toEqual([]);
  });

  it('refuses an adapter whose bytes changed on disk since it was stored, at every load; others are unaffected', async () => {
    harness = await startHarness({ engine: new EngineDouble({ mergeTensors: 2 }) });
    const { clients, engine, dataRoot } = harness;
    await importAdapter(clients, 'bad');
    await importAdapter(clients, 'good');
    // One bit of one byte, size unchanged: only the checksum can tell.
    const weights = path.join(dataRoot, 'adapters', 'bad', 'adapter_model.safetensors');
    const bytes = await fs.readFile(weights);
    bytes[bytes.length - 1] ^= 0x01;
    await fs.writeFile(weights, bytes);
    const integrity = { reason: 'INTEGRITY_MISMATCH' };
    const loaded = await expectStatus(call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'bad' }), status.DATA_LOSS, integrity);
    expect(loaded.message).toMatch(/^adapter "bad@v1": adapter_model\.safetensors has changed \(SHA-256 [0-9a-f]{12}…, stored [0-9a-f]{12}…\) since it was stored/);
    const generated = await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'hi', adapterId: 'bad', maxTokens: 2 })));
    expect(generated.error?.code).toBe(status.DATA_LOSS);
    const exported = await collect(clients.adapters.exportAdapter({ adapterId: 'bad', chunkSize: 0 }));
    expect([exported.error?.code, exported.messages.length]).toEqual([status.DATA_LOSS, 0]);
    const merged = await collect(clients.adapters.mergeAndUnload(MergeAndUnloadRequest.fromPartial({ adapterId: 'bad', outputName: 'm' })));
    expect(merged.error?.code).toBe(status.DATA_LOSS);
    expect(engine.loadedAdapters()).toEqual([]);
    // The other adapter loads and serves.
    await call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'good' });
    expect((await collect(clients.generation.generate(GenerateRequest.fromPartial({ text: 'hi', adapterId: 'good', maxTokens: 2 })))).error).toBeNull();
    expect(engine.loadedAdapters()).toEqual(['good@v1']);
  });

  it('deletes an idle loaded adapter (unloading it first)', async () => {
    harness = await startHarness();
    const { clients, engine } = harness;
    await importAdapter(clients, 'bot');
    await call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'bot' });
    expect(engine.loadedAdapters()).toEqual(['bot@v1']);
    await call(clients.adapters.deleteAdapter, clients.adapters, { adapterId: 'bot' });
    expect(engine.loadedAdapters()).toEqual([]);
    await expectStatus(call(clients.adapters.getAdapter, clients.adapters, { adapterId: 'bot' }), status.NOT_FOUND);
  });
});

describe('merge', () => {
  let harness: Harness | null = null;
  afterEach(async () => {
    await harness?.dispose();
    harness = null;
  });

  it('streams per-tensor progress, writes the folder under the export root and unloads on request', async () => {
    harness = await startHarness({ engine: new EngineDouble({ mergeTensors: 5 }) });
    const { clients, engine } = harness;
    await importAdapter(clients, 'bot');
    await call(clients.adapters.loadAdapter, clients.adapters, { adapterId: 'bot' });
    const { messages, error } = await collect(
      clients.adapters.mergeAndUnload({
        adapterId: 'bot',
        outputName: 'bot-merged',
        dtype: MergeDtype.MERGE_DTYPE_F16,
        base: MergeBase.MERGE_BASE_DEQUANTIZED,
        unloadAdapter: true,
      }),
    );
    expect(error).toBeNull();
    const progress = messages.filter((m) => m.progress).map((m) => m.progress?.tensorsDone);
    expect(progress).toEqual([1, 2, 3, 4, 5]);
    const result = messages.at(-1)?.result;
    expect(result).toMatchObject({ outputName: 'bot-merged', tensorCount: 5, adapterUnloaded: true });
    expect(result?.fidelity).toEqual({ maxAbsLogitDiff: 0.001, meanAbsLogitDiff: 0.0001, probeTokens: 16, top1Agreement: 1 });
    const folder = path.join(harness.dataRoot, 'exports', 'bot-merged');
    expect((await fs.readdir(folder)).sort()).toEqual(['config.json', 'model.safetensors']);
    expect(await fs.readFile(path.join(folder, 'model.safetensors'), 'utf8')).toContain('tensor 5 f16 dequantized');
    expect(engine.loadedAdapters()).toEqual([]);
    const defaults = await collect(clients.adapters.mergeAndUnload({ adapterId: 'bot', outputName: 'b2', dtype: 0, base: 0, unloadAdapter: false }));
    expect(defaults.error).toBeNull();
    expect(await fs.readFile(path.join(harness.dataRoot, 'exports', 'b2', 'model.safetensors'), 'utf8')).toContain('bf16 original');
    const bad = await collect(clients.adapters.mergeAndUnload({ adapterId: 'bot', outputName: 'b3', dtype: 9 as MergeDtype, base: 0, unloadAdapter: false }));
    expectError(bad.error, status.INVALID_ARGUMENT, { field: 'dtype' });
  });

  it('writes under a separate export root when one is configured', async () => {
    const sandboxHarness = await startHarness();
    const exportRoot = path.join(sandboxHarness.sandbox, 'exports-elsewhere');
    await sandboxHarness.stop();
    harness = await startHarness({ sandbox: sandboxHarness.sandbox, server: { exportRoot } });
    await importAdapter(harness.clients, 'bot');
    const { error } = await collect(harness.clients.adapters.mergeAndUnload({ adapterId: 'bot', outputName: 'out', dtype: 0, base: 0, unloadAdapter: false }));
    expect(error).toBeNull();
    await eventually(async () => (await fs.readdir(exportRoot)).includes('out'));
  });
});
