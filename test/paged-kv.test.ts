// Issue 6, "must show" 3: the paged KV cache. Generation through the block pool gives bit-identical
// greedy ids to the engine before it (commit d1852e3, one contiguous cache per sequence): the fixture
// was made by test/fixtures/paged-kv/scenario.mjs on that build and the same scenario runs here, one
// request at a time and as one mixed batch of 8 adapters + the base, also with the pool's free list
// scrambled first. Equality is exact, not approximate: the paged cache changes where keys and values
// live, not a single arithmetic operation. Then the memory plan on a tiny pool: a request longer than
// the whole cache is refused (CAPACITY_EXCEEDED), requests that fit one by one but not together wait
// for room and all complete, and the plan's figures are reported.

import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine } from '../src/engine/engine.js';
import { makeModel } from '../src/engine/make-model.js';
import { runScenario } from './fixtures/paged-kv/scenario.mjs';

const ROOT = join(import.meta.dirname, '..');
const FIXTURE = join(import.meta.dirname, 'fixtures', 'paged-kv', 'contiguous-d1852e3.json');

type Ids = { single: number[][]; batch: number[][] };

describe('paged KV cache', () => {
  let work: string;
  let fixture: Ids;

  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'tuneserve-paged-'));
    fixture = JSON.parse(await readFile(FIXTURE, 'utf8')) as Ids;
  });
  afterAll(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('gives the contiguous cache\'s greedy ids bit for bit: single requests and a batch of 8 adapters + base', async () => {
    const got = await runScenario(ROOT, join(work, 'plain'));
    expect(got.single).toEqual(fixture.single);
    expect(got.batch).toEqual(fixture.batch);
    // The scenario is not degenerate: the adapters steer generation to different tokens.
    expect(new Set(fixture.single.map((ids) => ids.join(','))).size).toBe(fixture.single.length);
  }, 300_000);

  it('gives the same ids when the sequences\' blocks come from a scrambled free list', async () => {
    const got = await runScenario(ROOT, join(work, 'scrambled'), { scramble: true });
    expect(got.single).toEqual(fixture.single);
    expect(got.batch).toEqual(fixture.batch);
  }, 300_000);

  describe('on a tiny pool', () => {
    let engine: Engine;
    // tiny preset: 2 layers x 2 kv heads x 16 dims, float32, k and v: 8 KiB per block of 16 positions.
    const BLOCK = 2 * 2 * 2 * 16 * 16 * 4;

    beforeAll(async () => {
      await makeModel({ preset: 'tiny', outDir: join(work, 'tiny'), seed: 3 });
      engine = await Engine.load(join(work, 'tiny'), { quant: 'nf4', device: 'cpu', kvCacheBytes: 5 * BLOCK, log: () => {} });
    }, 120_000);
    afterAll(() => engine?.close());

    it('reports the plan: 5 blocks of 16 positions, one reserved', () => {
      const plan = engine.native.info().memoryPlan;
      expect(plan.kvBlocks).toBe(5);
      expect(plan.kvBlockSize).toBe(16);
      expect(plan.kvBlockBytes).toBe(BLOCK);
      expect(plan.kvCacheBytes).toBe(5 * BLOCK);
      expect(engine.native.stats().kvBlocksTotal).toBe(4);
    });

    it('refuses a request longer than the whole cache with CAPACITY_EXCEEDED, naming the numbers', async () => {
      // 60 + 10 positions = 5 blocks > 4 usable.
      const err = await engine.generate({ promptIds: Array.from({ length: 60 }, (_, i) => 1000 + i), maxTokens: 10 }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'CAPACITY_EXCEEDED' });
      expect((err as Error).message).toMatch(/needs 5 KV-cache blocks; this engine's whole cache holds 4/);
    });

    it('queues requests that fit one by one but not together; all complete, as they would alone', async () => {
      // Each needs 2 blocks (20 + 12 positions); four of them need 8 > 4: at most two run at once.
      const prompts = [0, 1, 2, 3].map((k) => Array.from({ length: 20 }, (_, i) => 500 + 37 * k + i));
      const alone = [];
      for (const p of prompts) alone.push((await engine.generate({ promptIds: p, maxTokens: 12, stopIds: [] })).ids);
      const together = await Promise.all(prompts.map((p) => engine.generate({ promptIds: p, maxTokens: 12, stopIds: [] })));
      expect(together.map((g) => g.ids)).toEqual(alone);
      expect(engine.native.stats().kvBlocksUsed).toBe(0);  // every block came back
    });
  });
});
