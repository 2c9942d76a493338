// Integrity at load (src/engine/integrity.ts): a merged model folder carries tuneserve-manifest.json,
// and a file of it whose bytes change on disk afterwards (one bit, same size) is refused when the
// folder is loaded, naming the file; a folder without a manifest (a download) loads as before. The
// adapter side (tuneserve.json's manifest, checked by every load through the server) is in
// test/server/files.test.ts; on a real serve process in test/reliability/faults.test.ts.

import { readFile, writeFile, mkdtemp, rm, readdir, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine } from '../src/engine/engine.js';
import { digestFiles, MODEL_MANIFEST_FILE, verifyFiles } from '../src/engine/integrity.js';
import { makeModel } from '../src/engine/make-model.js';
import { mergeAdapterFolder } from '../src/engine/merge.js';
import { loadModelFolder } from '../src/engine/model-folder.js';
import { createLoraConfig } from '../src/engine/peft-config.js';

describe('integrity of stored files at load', () => {
  let dir: string;
  let merged: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-integrity-'));
    await makeModel({ preset: 'tiny', outDir: join(dir, 'model'), seed: 2 });
    const engine = await Engine.load(join(dir, 'model'), { device: 'cpu', quant: 'nf4', maxSeqLen: 32, log: () => {} });
    try {
      const adapter = engine.createAdapter(createLoraConfig({ r: 2, alpha: 4, targets: ['q_proj'] }), 1);
      await engine.saveAdapter(adapter, join(dir, 'adapter'));
    } finally {
      engine.close();
    }
    merged = (await mergeAdapterFolder({ modelDir: join(dir, 'model'), adapterDir: join(dir, 'adapter'), outDir: join(dir, 'merged'), dtype: 'f32' })).outDir;
  }, 300_000);
  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('a merge writes a manifest of every file of the folder', async () => {
    const manifest = JSON.parse(await readFile(join(merged, MODEL_MANIFEST_FILE), 'utf8')) as { files: { name: string }[] };
    const names = (await readdir(merged)).filter((name) => name !== MODEL_MANIFEST_FILE).sort();
    expect(manifest.files.map((f) => f.name)).toEqual(names);
    expect(names).toEqual(expect.arrayContaining(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']));
    await expect(loadModelFolder(merged)).resolves.toMatchObject({ dir: merged });
  });

  it('one bit changed in a shard (same size) is refused at load, naming the file; the base without a manifest loads', async () => {
    const shard = join(merged, 'model.safetensors');
    const original = await readFile(shard);
    const changed = Buffer.from(original);
    changed[Math.floor(changed.length / 2)] ^= 0x10;
    await writeFile(shard, changed);
    try {
      const error = await loadModelFolder(merged).catch((e: unknown) => e);
      expect(error).toMatchObject({ code: 'INTEGRITY_MISMATCH' });
      expect((error as Error).message).toMatch(/: model\.safetensors has changed \(SHA-256 [0-9a-f]{12}…, stored [0-9a-f]{12}…\) since it was stored; restore it or store it again$/);
      await expect(Engine.load(merged, { device: 'cpu', quant: 'none', log: () => {} })).rejects.toMatchObject({ code: 'INTEGRITY_MISMATCH' });
      await expect(loadModelFolder(join(dir, 'model'))).resolves.toMatchObject({ shards: [join(dir, 'model', 'model.safetensors')] });
    } finally {
      await writeFile(shard, original);
    }
    await expect(loadModelFolder(merged)).resolves.toMatchObject({ dir: merged });
  });

  it('names a missing file, a file of another size and a damaged manifest', async () => {
    const files = await digestFiles(merged, ['config.json', 'generation_config.json']);
    await expect(verifyFiles(merged, [...files, { name: 'gone.json', sizeBytes: 1, sha256: '0'.repeat(64) }], 'model m')).rejects.toThrow(/^model m: gone\.json is missing since it was stored/);
    const config = await readFile(join(merged, 'config.json'));
    await truncate(join(merged, 'config.json'), config.length - 1);
    await expect(verifyFiles(merged, files, 'model m')).rejects.toThrow(`model m: config.json is ${config.length - 1} bytes, not the ${config.length} it had since it was stored`);
    await writeFile(join(merged, 'config.json'), config);
    const manifest = await readFile(join(merged, MODEL_MANIFEST_FILE));
    await writeFile(join(merged, MODEL_MANIFEST_FILE), '{"files": 3}');
    await expect(loadModelFolder(merged)).rejects.toMatchObject({ code: 'INTEGRITY_MISMATCH', message: expect.stringMatching(/tuneserve-manifest\.json is damaged/) });
    await writeFile(join(merged, MODEL_MANIFEST_FILE), manifest);
  });
});
