// Packing (issue 9): short rows placed into one sequence with a block-diagonal causal mask and
// positions restarting at each row. With the real engine on the CPU backend, a packed batch gives each
// row the loss and LoRA gradients it has alone, and training on packed sequences gives the adapter that
// training on the same rows unpacked, in the same steps, gives. Plus the placement and the `auto` rule.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine, type Adapter } from '../src/engine/engine.js';
import { makeModel } from '../src/engine/make-model.js';
import type { NativeTrainExample } from '../src/engine/native.js';
import { applyPacking, packedExample, packRows } from '../src/engine/packing.js';
import { createLoraConfig } from '../src/engine/peft-config.js';
import { rng } from './helpers/random.js';

/** Rows of random ids; row i ignores its first i % 3 labels (a prompt), so some rows score all tokens. */
function makeRows(lengths: number[], seed: number, vocab: number): NativeTrainExample[] {
  const r = rng(seed);
  return lengths.map((n, i) => {
    const ids = Int32Array.from({ length: n }, () => 1 + Math.floor(r() * (vocab - 1)));
    const labels = Int32Array.from(ids, (id, t) => (t < i % 3 ? -100 : id));
    return { ids, labels };
  });
}

/** Largest |a - b| over largest |b|, across every tensor. */
function relDiff(a: Record<string, Float32Array>, b: Record<string, Float32Array>): number {
  let num = 0, den = 0;
  for (const key of Object.keys(b)) {
    const x = a[key]!, y = b[key]!;
    for (let i = 0; i < y.length; i++) {
      num = Math.max(num, Math.abs(x[i]! - y[i]!));
      den = Math.max(den, Math.abs(y[i]!));
    }
  }
  return num / den;
}

function sumGrads(list: Record<string, Float32Array>[]): Record<string, Float32Array> {
  const out: Record<string, Float32Array> = {};
  for (const g of list)
    for (const [key, v] of Object.entries(g)) {
      const acc = (out[key] ??= new Float32Array(v.length));
      for (let i = 0; i < v.length; i++) acc[i]! += v[i]!;
    }
  return out;
}

describe('packRows and applyPacking', () => {
  it('places every row once, first-fit decreasing, within the sequence length, deterministically', () => {
    const lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 10];
    const bins = packRows(lengths, 12);
    expect(bins.flat().sort((a, b) => a - b)).toEqual(lengths.map((_, i) => i));
    for (const bin of bins) expect(bin.reduce((n, i) => n + lengths[i]!, 0)).toBeLessThanOrEqual(12);
    // 55 tokens need at least 5 sequences of 12; first-fit decreasing reaches it here.
    expect(bins.length).toBe(5);
    expect(packRows(lengths, 12)).toEqual(bins);
    expect(() => packRows([13], 12)).toThrow(/packing needs 1 to 12/);
  });

  it('writes each document\'s start for its tokens and keeps ids and labels as given', () => {
    const rows = makeRows([3, 4, 2], 1, 100);
    const p = packedExample(rows);
    expect(Array.from(p.docStart)).toEqual([0, 0, 0, 3, 3, 3, 3, 7, 7]);
    expect(Array.from(p.ids)).toEqual(rows.flatMap((r) => Array.from(r.ids)));
    expect(Array.from(p.labels)).toEqual(rows.flatMap((r) => Array.from(r.labels)));
  });

  it('auto packs epoch-based jobs of short rows and says why it does not otherwise', () => {
    const rows = makeRows(Array.from({ length: 40 }, (_, i) => 5 + (i % 7)), 2, 100);
    const auto = (fields: Partial<Parameters<typeof applyPacking>[1]>) =>
      applyPacking(rows, { packing: undefined, maxSeqLen: 64, sequencesPerStep: 2, fixedSteps: false, ...fields }).report;
    const on = auto({});
    expect(on.enabled).toBe(true);
    expect(on.rows).toBe(40);
    expect(on.sequences).toBeLessThanOrEqual(Math.ceil(rows.reduce((n, r) => n + r.ids.length, 0) / 64) + 1);
    expect(on.fill).toBeGreaterThan(0.8);
    expect(auto({ fixedSteps: true })).toMatchObject({ enabled: false, sequences: 40, reason: expect.stringMatching(/max_steps/) });
    expect(auto({ maxSeqLen: 11 })).toMatchObject({ enabled: false, reason: expect.stringMatching(/per 11-token sequence/) });
    expect(auto({ sequencesPerStep: 16 })).toMatchObject({ enabled: false, reason: expect.stringMatching(/one optimizer step of 16/) });
    expect(applyPacking(rows, { packing: true, maxSeqLen: 64, sequencesPerStep: 16, fixedSteps: true }).report.enabled).toBe(true);
    expect(applyPacking(rows, { packing: false, maxSeqLen: 64, sequencesPerStep: 1, fixedSteps: false }).report).toMatchObject({ enabled: false, reason: 'packing is off in the job config' });
  });
});

describe('packed batches on the real engine (CPU backend)', () => {
  let dir: string;
  let engine: Engine;
  let adapter: Adapter;
  let vocab: number;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-packing-'));
    await makeModel({ preset: 'tiny', outDir: join(dir, 'tiny'), seed: 12 });
    engine = await Engine.load(join(dir, 'tiny'), { quant: 'nf4', device: 'cpu', log: () => {} });
    vocab = engine.config.vocabSize;
    // An adapter whose B is not zero, so the gradients of A are not zero either.
    adapter = engine.createAdapter(createLoraConfig({ r: 4, alpha: 8, dropout: 0, targets: 'all-linear' }), 3);
    await engine.train(adapter, makeRows([12, 9, 15, 7], 40, vocab), {
      lr: 2e-2, steps: 3, epochs: 1, batchSize: 2, gradAccum: 1, scheduler: 'constant', warmupSteps: 0, weightDecay: 0, maxGradNorm: 0, seed: 1, shuffle: false,
    });
  }, 120_000);

  afterAll(async () => {
    engine?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  const pass = async (batch: { B: number; T: number; ids: Int32Array; labels: Int32Array; docStart?: Int32Array }) => {
    const r = await engine.native.trainPass(batch, adapter.slot, { lossScale: 1, recompute: true, dropout: 0 });
    return { loss: r.loss, targets: r.targets as number, grads: r.grads! };
  };
  const alone = (row: NativeTrainExample) => pass({ B: 1, T: row.ids.length, ids: row.ids, labels: row.labels });

  it('gives each row its own loss and gradients, and the batch their sums', async () => {
    const rows = makeRows([11, 6, 14, 3], 7, vocab);
    const packed = packedExample(rows);
    const batch = { B: 1, T: packed.ids.length, ...packed };
    const separate = await Promise.all(rows.map(alone));
    const whole = await pass(batch);
    // float32 sums of ~40 token losses in another order: a few ulp of ~100.
    expect(whole.targets).toBe(separate.reduce((n, s) => n + s.targets, 0));
    expect(Math.abs(whole.loss - separate.reduce((n, s) => n + s.loss, 0))).toBeLessThan(1e-4);
    // Gradients are sums over rows of float32 products; 1e-5 of the largest entry is ~100 ulp.
    expect(relDiff(whole.grads, sumGrads(separate.map((s) => s.grads)))).toBeLessThan(1e-5);

    // Row by row: the packed batch with only row k's labels kept is row k alone.
    let at = 0;
    for (const [k, row] of rows.entries()) {
      const labels = new Int32Array(packed.labels.length).fill(-100);
      labels.set(row.labels, at);
      at += row.ids.length;
      const one = await pass({ ...batch, labels });
      expect(Math.abs(one.loss - separate[k]!.loss), `row ${k}`).toBeLessThan(1e-5 * Math.max(1, separate[k]!.loss));
      expect(relDiff(one.grads, separate[k]!.grads), `row ${k}`).toBeLessThan(1e-5);
    }

    // Without doc starts the same tokens attend across rows at shifted positions: not the same.
    const unmasked = await pass({ B: 1, T: batch.T, ids: batch.ids, labels: batch.labels });
    // ... and score each row's first token from the row before when its label is set.
    expect(unmasked.targets).toBe(whole.targets + rows.slice(1).filter((r) => r.labels[0] !== -100).length);
    expect(relDiff(unmasked.grads, whole.grads)).toBeGreaterThan(1e-2);
  });

  it('pads packed sequences of different lengths in one batch', async () => {
    const rows = makeRows([5, 8, 4, 9, 3], 9, vocab);
    const a = packedExample(rows.slice(0, 2)), b = packedExample(rows.slice(2));
    const T = Math.max(a.ids.length, b.ids.length);
    const pad = (x: Int32Array, fill: number | null) => {
      const out = new Int32Array(T).fill(fill ?? x[x.length - 1]!);
      out.set(x);
      return out;
    };
    const batch = {
      B: 2, T,
      ids: Int32Array.from([...pad(a.ids, 0), ...pad(b.ids, 0)]),
      labels: Int32Array.from([...pad(a.labels, -100), ...pad(b.labels, -100)]),
      docStart: Int32Array.from([...pad(a.docStart, null), ...pad(b.docStart, null)]),
    };
    const whole = await pass(batch);
    const separate = await Promise.all(rows.map(alone));
    expect(Math.abs(whole.loss - separate.reduce((n, s) => n + s.loss, 0))).toBeLessThan(1e-4);
    expect(relDiff(whole.grads, sumGrads(separate.map((s) => s.grads)))).toBeLessThan(1e-5);
  });

  it('refuses doc starts that do not describe documents', async () => {
    const rows = makeRows([4, 4], 3, vocab);
    const p = packedExample(rows);
    const bad = Int32Array.from(p.docStart);
    bad[5] = 2;
    await expect(pass({ B: 1, T: 8, ids: p.ids, labels: p.labels, docStart: bad })).rejects.toThrow(/doc_start\[0\]\[5\] = 2/);
  });

  it('trains the same adapter from packed sequences as from the rows unpacked in the same steps', async () => {
    const rows = makeRows([10, 7, 12, 5, 9, 6, 8, 11], 21, vocab);
    const hyper = { lr: 1e-2, steps: 4, epochs: 1, gradAccum: 1, scheduler: 'linear' as const, warmupSteps: 1, weightDecay: 0.01, maxGradNorm: 1, seed: 5, shuffle: false };
    const lora = createLoraConfig({ r: 4, alpha: 8, dropout: 0, targets: 'all-linear' });
    // Unpacked: batches of two rows; packed: the same two rows in one sequence, one per batch.
    const unpacked = engine.createAdapter(lora, 8);
    const packed = engine.createAdapter(lora, 8);
    try {
      const u = await engine.train(unpacked, rows, { ...hyper, batchSize: 2 });
      const sequences = [0, 2, 4, 6].map((i) => packedExample(rows.slice(i, i + 2)));
      const p = await engine.train(packed, sequences, { ...hyper, batchSize: 1 });
      expect(p.steps).toBe(4);
      // Same mean token loss per step up to float32 summation order.
      expect(Math.abs(p.finalLoss - u.finalLoss)).toBeLessThan(1e-5 * u.finalLoss);
      // Four AdamW steps amplify ~1e-7 gradient differences where second moments are small.
      expect(relDiff(await engine.adapterTensors(packed), await engine.adapterTensors(unpacked))).toBeLessThan(1e-4);
    } finally {
      engine.removeAdapter(unpacked);
      engine.removeAdapter(packed);
    }
  });
});
