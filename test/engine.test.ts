// The engine through its TypeScript face (issue #2, "must show" 3, 4 and 7): an NF4 base computes
// exactly the float model whose weights are their dequantized values; PEFT save → load round trips
// bit for bit with PEFT's key names and config fields; malformed inputs fail with clear, coded errors.

import { execFile } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine } from '../src/engine/engine.js';
import { makeModel } from '../src/engine/make-model.js';
import { native } from '../src/engine/native.js';
import { createLoraConfig, loraKey, writeAdapterConfig } from '../src/engine/peft-config.js';
import { rng } from './helpers/random.js';

const CLI = join(import.meta.dirname, '..', 'bin', 'tuneserve.js');

function maxRelDiff(a: Float32Array, b: Float32Array): number {
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    num = Math.max(num, Math.abs(a[i]! - b[i]!));
    den = Math.max(den, Math.abs(b[i]!));
  }
  return num / den;
}

describe('engine', () => {
  let dir: string;
  let engine: Engine;
  const prompt = [128000, 9906, 1917, 0, 578, 4062, 14198, 39935, 35308, 927];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-engine-'));
    await makeModel({ preset: 'tiny', outDir: join(dir, 'tiny'), seed: 5 });
    engine = await Engine.load(join(dir, 'tiny'), { quant: 'nf4', device: 'cpu', log: () => {} });
  }, 120_000);

  afterAll(async () => {
    engine?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('an NF4 base computes the float forward of its dequantized weights (within 1e-5)', async () => {
    // Write a float32 copy of the model whose block linear weights are dequant(NF4(W)).
    const a = native();
    const src = join(dir, 'tiny', 'model.safetensors');
    const tensors = a.safetensorsHeader(src).tensors.map((t) => {
      let data = a.safetensorsReadF32(src, t.name);
      if (/\.(q|k|v|o|gate|up|down)_proj\.weight$/.test(t.name)) data = a.nf4Quantize(data, t.shape[0]!, t.shape[1]!).dequantized;
      return { name: t.name, dtype: 'F32' as const, shape: t.shape, data };
    });
    const deqDir = join(dir, 'tiny-deq');
    await makeModel({ preset: 'tiny', outDir: deqDir, seed: 5 }); // config + tokenizer files
    a.safetensorsWrite(join(deqDir, 'model.safetensors'), tensors, { format: 'pt' });
    const float = await Engine.load(deqDir, { quant: 'none', device: 'cpu', log: () => {} });
    try {
      const adapter = engine.createAdapter(createLoraConfig({ r: 4, alpha: 8, targets: 'all-linear' }), 1);
      const adapterF = float.createAdapter(createLoraConfig({ r: 4, alpha: 8, targets: 'all-linear' }), 1);
      for (const [e, f] of [[null, null], [adapter, adapterF]] as const) {
        const q = await engine.logits(prompt, e);
        const ref = await float.logits(prompt, f);
        // Same products in the same order up to the panel blocking of the fused NF4 kernels: float32
        // summation-order noise only (~1e-7); a wrong level, nibble or absmax would be O(1e-1).
        expect(maxRelDiff(q, ref)).toBeLessThan(1e-5);
      }
      // And the quantization really changed the weights: the original float model differs.
      const orig = await Engine.load(join(dir, 'tiny'), { quant: 'none', device: 'cpu', log: () => {} });
      try {
        expect(maxRelDiff(await orig.logits(prompt), await float.logits(prompt))).toBeGreaterThan(1e-3);
      } finally {
        orig.close();
      }
    } finally {
      float.close();
    }
  });

  it('PEFT save → load gives identical outputs, with PEFT key names and config fields', async () => {
    const adapter = engine.createAdapter(createLoraConfig({ r: 8, alpha: 16, dropout: 0.1, targets: 'q_proj,v_proj,down_proj' }), 3);
    const ids = Int32Array.from(prompt);
    await engine.train(adapter, [{ ids, labels: ids }], { lr: 1e-2, steps: 3, epochs: 1, batchSize: 1, gradAccum: 1, scheduler: 'constant', warmupSteps: 0, weightDecay: 0, maxGradNorm: 1, seed: 1, shuffle: false });
    await engine.saveAdapter(adapter, join(dir, 'saved'));
    const loaded = await engine.loadAdapter(join(dir, 'saved'));
    const before = await engine.logits(prompt, adapter);
    const after = await engine.logits(prompt, loaded);
    expect(after).toEqual(before);
    expect(maxRelDiff(before, await engine.logits(prompt))).toBeGreaterThan(1e-4); // the adapter matters

    const config = JSON.parse(await readFile(join(dir, 'saved', 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
    expect(config).toMatchObject({ peft_type: 'LORA', task_type: 'CAUSAL_LM', r: 8, lora_alpha: 16, lora_dropout: 0.1, target_modules: ['q_proj', 'v_proj', 'down_proj'], bias: 'none', use_rslora: false, use_dora: false, fan_in_fan_out: false, init_lora_weights: true, modules_to_save: null, rank_pattern: {}, alpha_pattern: {}, layers_to_transform: null, revision: null });
    const keys = native().safetensorsHeader(join(dir, 'saved', 'adapter_model.safetensors')).tensors.map((t) => `${t.name}:${t.shape.join('x')}`);
    expect(keys).toContain('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight:8x64');
    expect(keys).toContain('base_model.model.model.layers.1.mlp.down_proj.lora_B.weight:64x8');
    expect(keys.length).toBe(2 * 3 * 2);
  });

  it('training is deterministic for a seed (shuffle, dropout masks, A init), and the seed matters', async () => {
    const examples = [prompt, prompt.slice(0, 6), prompt.slice(2)].map((p) => ({ ids: Int32Array.from(p), labels: Int32Array.from(p) }));
    const run = async (seed: number) => {
      const adapter = engine.createAdapter(createLoraConfig({ r: 4, alpha: 8, dropout: 0.2, targets: 'all-linear' }), seed);
      const losses: number[] = [];
      await engine.train(adapter, examples, { lr: 1e-2, steps: 4, epochs: 1, batchSize: 2, gradAccum: 1, scheduler: 'linear', warmupSteps: 1, weightDecay: 0.01, maxGradNorm: 1, seed, shuffle: true }, { onStep: (e) => losses.push(e.loss) });
      const tensors = await engine.adapterTensors(adapter);
      engine.removeAdapter(adapter);
      return { losses, tensors };
    };
    const a = await run(11), b = await run(11), c = await run(12);
    expect(b.losses).toEqual(a.losses);
    expect(b.tensors).toEqual(a.tensors);
    expect(c.losses).not.toEqual(a.losses);
  });

  it('LoRA dropout: gradients match finite differences of the loss under the same masks', async () => {
    // The masks are a hash of (seed, step, layer, module, row, column): the forward and the backward
    // (and the recomputed forward) must see the same one. A loss-only pass with a perturbed A, same
    // seed and step, gives the central difference.
    const c = engine.config;
    const a = native();
    const lora = createLoraConfig({ r: 4, alpha: 8, dropout: 0.3, targets: 'q_proj,down_proj' });
    const r = rng(21);
    const base: Record<string, { shape: number[]; data: Float32Array }> = {};
    for (let l = 0; l < c.numLayers; l++) {
      base[loraKey(l, 'q_proj', 'A')] = { shape: [4, c.hiddenSize], data: Float32Array.from({ length: 4 * c.hiddenSize }, () => (r() * 2 - 1) * 0.2) };
      base[loraKey(l, 'q_proj', 'B')] = { shape: [c.numHeads * c.headDim, 4], data: Float32Array.from({ length: c.numHeads * c.headDim * 4 }, () => (r() * 2 - 1) * 0.5) };
      base[loraKey(l, 'down_proj', 'A')] = { shape: [4, c.intermediateSize], data: Float32Array.from({ length: 4 * c.intermediateSize }, () => (r() * 2 - 1) * 0.2) };
      base[loraKey(l, 'down_proj', 'B')] = { shape: [c.hiddenSize, 4], data: Float32Array.from({ length: c.hiddenSize * 4 }, () => (r() * 2 - 1) * 0.5) };
    }
    const load = async (key?: string, index?: number, delta = 0) => {
      const folder = join(dir, `dropout-${key ?? 'base'}-${delta}`);
      await mkdir(folder, { recursive: true });
      a.safetensorsWrite(join(folder, 'adapter_model.safetensors'), Object.entries(base).map(([name, t]) => {
        const data = Float32Array.from(t.data);
        if (name === key) data[index!] += delta;
        return { name, dtype: 'F32' as const, shape: t.shape, data };
      }), { format: 'pt' });
      await writeAdapterConfig(folder, lora);
      return engine.loadAdapter(folder);
    };
    const ids = Int32Array.from(prompt);
    const batch = { B: 1, T: ids.length, ids, labels: ids };
    const pass = { lossScale: 1, recompute: true, dropout: 0.3, dropoutSeed: 5, dropoutStep: 2 };
    const adapter = await load();
    const { grads } = await engine.native.trainPass(batch, adapter.slot, pass);
    const noDropout = await engine.native.trainPass(batch, adapter.slot, { ...pass, dropout: 0 });
    const eps = 1e-2;
    for (const key of [loraKey(0, 'q_proj', 'A'), loraKey(1, 'down_proj', 'A'), loraKey(1, 'q_proj', 'B')]) {
      const g = grads![key]!;
      let index = 0;
      for (let i = 1; i < g.length; i++) if (Math.abs(g[i]!) > Math.abs(g[index]!)) index = i;
      expect(Math.abs(g[index]! - noDropout.grads![key]![index]!)).toBeGreaterThan(1e-3 * Math.abs(g[index]!)); // dropout matters
      const plus = await load(key, index, eps), minus = await load(key, index, -eps);
      const lossPlus = (await engine.native.trainPass(batch, plus.slot, { ...pass, backward: false })).loss;
      const lossMinus = (await engine.native.trainPass(batch, minus.slot, { ...pass, backward: false })).loss;
      engine.removeAdapter(plus);
      engine.removeAdapter(minus);
      // float32 forward: the summed loss (~100) carries ~1e-5 absolute noise, i.e. ~1e-3 on the
      // difference quotient; the curvature term over ±1e-2 is of the same order. 2% + 2e-3 is far
      // below what a mask mismatch between forward and backward does (tens of percent or more).
      expect(Math.abs((lossPlus - lossMinus) / (2 * eps) - g[index]!), key).toBeLessThan(0.02 * Math.abs(g[index]!) + 2e-3);
    }
    engine.removeAdapter(adapter);
  });

  it('refuses an adapter whose shapes do not fit the base (ADAPTER_MISMATCH)', async () => {
    await makeModel({ preset: 'small', outDir: join(dir, 'small'), seed: 1 });
    const small = await Engine.load(join(dir, 'small'), { quant: 'none', device: 'cpu', log: () => {} });
    try {
      const a = small.createAdapter(createLoraConfig({ r: 4, alpha: 8, targets: 'q_proj' }), 1);
      await small.saveAdapter(a, join(dir, 'small-adapter'));
    } finally {
      small.close();
    }
    await expect(engine.loadAdapter(join(dir, 'small-adapter'))).rejects.toMatchObject({ code: 'ADAPTER_MISMATCH', message: expect.stringMatching(/q_proj\.lora_A\.weight has shape \[4, 256\], this base needs \[4, 64\]/) });
  });

  it('refuses bad generation inputs with INVALID_ARGUMENT naming the field', async () => {
    await expect(engine.generate({ promptIds: [1, 999999], maxTokens: 4 })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('prompt_ids[1]') });
    await expect(engine.generate({ promptIds: [1], maxTokens: 0 })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('max_tokens') });
    await expect(engine.generate({ promptIds: [1], maxTokens: 4, topP: 0 })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  });

  it('cancels a generation between steps and a training run between micro-steps', async () => {
    const controller = new AbortController();
    let seen = 0;
    const r = await engine.generate({ promptIds: prompt, maxTokens: 10_000, stopIds: [] }, { signal: controller.signal, onTokens: (ids) => { seen += ids.length; if (seen >= 3) controller.abort(); } });
    expect(r.finishReason).toBe('cancelled');
    expect(r.completionTokens).toBeLessThan(20);
    const adapter = engine.createAdapter(createLoraConfig({ r: 2, alpha: 4, targets: 'q_proj' }), 1);
    const stop = new AbortController();
    const ids = Int32Array.from(prompt);
    const summary = await engine.train(adapter, [{ ids, labels: ids }], { lr: 1e-3, steps: 100_000, epochs: 1, batchSize: 1, gradAccum: 1, scheduler: 'constant', warmupSteps: 0, weightDecay: 0, maxGradNorm: 1, seed: 1, shuffle: false }, { signal: stop.signal, onStep: (e) => { if (e.step === 2) stop.abort(); } });
    expect(summary.cancelled).toBe(true);
    expect(summary.steps).toBeLessThan(10);
  });

  it('the CLI reports malformed inputs with their code and where they are', async () => {
    const run = promisify(execFile);
    const fail = async (...args: string[]) => {
      try {
        await run(process.execPath, [CLI, ...args], { env: process.env });
      } catch (e) {
        const err = e as { code: number; stderr: string };
        return { exit: err.code, stderr: err.stderr };
      }
      throw new Error(`expected ${args[0]} to fail`);
    };
    // A bad JSONL row: named by file and line.
    await writeFile(join(dir, 'bad.jsonl'), '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n');
    const badRow = await fail('train', '--model', join(dir, 'tiny'), '--data', join(dir, 'bad.jsonl'), '--out', join(dir, 'x'), '--steps', '1');
    expect(badRow.exit).toBe(1);
    expect(badRow.stderr).toMatch(/\[INVALID_DATASET\] .*bad\.jsonl:2: .*completion/);
    // A truncated shard: named by file and problem.
    const broken = join(dir, 'broken');
    await makeModel({ preset: 'tiny', outDir: broken, seed: 5 });
    const shard = await readFile(join(broken, 'model.safetensors'));
    await writeFile(join(broken, 'model.safetensors'), shard.subarray(0, shard.length - 1000));
    const truncated = await fail('generate', '--model', broken, '--prompt', 'hi', '--device', 'cpu');
    expect(truncated.stderr).toMatch(/\[INVALID_SAFETENSORS\] .*model\.safetensors/);
    // A config.json missing a required field.
    await copyFile(join(dir, 'tiny', 'model.safetensors'), join(broken, 'model.safetensors'));
    const config = JSON.parse(await readFile(join(broken, 'config.json'), 'utf8')) as Record<string, unknown>;
    delete config.num_attention_heads;
    await writeFile(join(broken, 'config.json'), JSON.stringify(config));
    const missing = await fail('generate', '--model', broken, '--prompt', 'hi', '--device', 'cpu');
    expect(missing.stderr).toMatch(/\[INVALID_CONFIG\] .*config\.json.*num_attention_heads/);
    // A flag with a bad value.
    const flag = await fail('train', '--model', join(dir, 'tiny'), '--data', join(dir, 'bad.jsonl'), '--out', join(dir, 'x'), '--lr', 'fast');
    expect(flag.stderr).toMatch(/\[INVALID_ARGUMENT\] --lr must be a number/);
  });
});
