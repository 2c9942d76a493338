// The training memory plan (native/model/memory_plan.h, issue #7): its figures for the Llama-3-8B
// config (batch 2 × 2,048, r 16 on q/k/v/o, recompute, bf16 compute, NF4 base) against a hand
// calculation written out here term by term, the same calculation's variants (LoRA dropout, every
// linear adapted, no recompute) to pin down which buffers share memory, and the plan of a running
// engine: what GetModelInfo reports while a job trains, and the refusal of a job that does not fit.
// No 8B weights exist here: the plan is made from the config alone. The figures are exact (bytes):
// the plan measures the very function that lays out a pass's workspace, so any difference is a
// buffer added, dropped or resized.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine, nativeConfig } from '../src/engine/engine.js';
import type { ModelInfo, TrainingMemoryPlan } from '../src/server/engine-port.js';
import { EngineDouble } from './server/engine-double.js';
import { call, startHarness } from './server/harness.js';
import { makeModel } from '../src/engine/make-model.js';
import { native, type NativeModelConfig, type NativeTrainingPlan } from '../src/engine/native.js';
import { createLoraConfig } from '../src/engine/peft-config.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

// Llama 3 / 3.1 8B (config.json): hidden, intermediate, layers, heads, kv heads, head dim, vocab.
const H = 4096, I = 14336, L = 32, NH = 32, NKV = 8, D = 128, V = 128256;
const QD = NH * D, KVD = NKV * D;
const LLAMA3_8B: NativeModelConfig = {
  H, I, L, NH, NKV, D, V, rmsEps: 1e-5, ropeTheta: 500000, ropeLlama3: true, ropeFactor: 8, ropeLowFreqFactor: 1,
  ropeHighFreqFactor: 4, ropeOriginalMaxPos: 8192, tied: false, maxPos: 131072,
};
const QKVO = ['q_proj', 'k_proj', 'v_proj', 'o_proj'];
const ALL = [...QKVO, 'gate_proj', 'up_proj', 'down_proj'];

// Element sizes, and what the engine fixes: logits rows per cross-entropy chunk
// (TrainPassOptions.ce_chunk_rows) and the workspace arena's alignment (core/backend.h Arena::ALIGN).
const BF16 = 2, F32 = 4, I32 = 4;
const CE_CHUNK = 128;
const ALIGN = 256;

/** [out, in] of each linear of a block: q, k, v, o, gate, up, down. */
const LINEARS: Record<string, [number, number]> = {
  q_proj: [QD, H], k_proj: [KVD, H], v_proj: [KVD, H], o_proj: [H, QD], gate_proj: [I, H], up_proj: [I, H], down_proj: [H, I],
};

function plan8b(options: { batch?: number; seq?: number; targets?: string[]; dropout?: number; recompute?: boolean } = {}): NativeTrainingPlan {
  return native().planTrainingMemory({
    config: LLAMA3_8B, quant: 'nf4', device: 'cuda', computeDtype: 'bf16',
    batchSize: options.batch ?? 2, seqLen: options.seq ?? 2048, recompute: options.recompute ?? true,
    lora: { r: 16, alpha: 32, dropout: options.dropout ?? 0, rslora: false, targets: options.targets ?? QKVO },
  });
}

/** The hand calculation: every buffer of the plan with its formula. */
function handPlan(options: { targets: string[]; dropout: number; recompute: boolean }) {
  const B = 2, T = 2048, M = B * T, r = 16;
  const adapted = (t: string) => options.targets.includes(t);
  // Every buffer below is a multiple of the arena's 256-byte alignment except the loss sum (one
  // double), which the next buffer's alignment pads: only that padding appears as a separate term.
  for (const bytes of [M * I32, M * F32, M * H * BF16, M * KVD * BF16, B * NH * T * F32, M * r * F32, CE_CHUNK * V * F32, CE_CHUNK * H * BF16]) {
    expect(bytes % ALIGN).toBe(0);
  }
  const lossPad = ALIGN - 8;

  // Resident before the job (shared with serving). NF4 linears: 4 bits per weight, an int8 absmax per
  // block of 64, a float32 scale per 256 blocks (core/nf4.h); embeddings, lm_head (untied in Llama 3
  // 8B) and norms in the compute dtype.
  const nf4 = (n: number) => n / 2 + n / 64 + F32 * Math.ceil(n / 64 / 256);
  const linearsNf4 = Object.values(LINEARS).reduce((s, [out, inp]) => s + nf4(out * inp), 0);
  const base = V * H * BF16 /* embed_tokens */ + V * H * BF16 /* lm_head */ + H * BF16 /* final norm */
    + L * (2 * H * BF16 /* two norms */ + linearsNf4);
  const dequantBuffer = Math.max(I * H, CE_CHUNK * V) * BF16; // the largest NF4 weight (gate/up/down) dequantized
  const adapterWeights = L * options.targets.reduce((s, t) => s + r * (LINEARS[t]![0] + LINEARS[t]![1]), 0) * F32; // A (r, in), B (out, r)

  // The job: gradients and both AdamW moments of A and B, float32.
  const adapterState = 3 * adapterWeights;
  // Inputs: ids, positions, document starts (packing), scored rows, scored targets (int32 per row) and
  // the loss sum (a double).
  const inputs = 5 * M * I32 + 8;
  // One layer's activations, in halves: what the attention part's backward reads, and the MLP's.
  const attentionActs = M * H * BF16 /* xn1 */ + M * F32 /* rstd1 */ + M * QD * BF16 /* q */ + 2 * M * KVD * BF16 /* k, v */
    + M * QD * BF16 /* att */ + B * NH * T * F32 /* lse */;
  const ownH = adapted('down_proj'); // h is read again only by down_proj's LoRA backward, else dh takes its memory
  const mlpActs = 2 * M * H * BF16 /* x2, xn2 */ + M * F32 /* rstd2 */ + 2 * M * I * BF16 /* g, u */ + (ownH ? M * I * BF16 : 0) /* h */;
  // Saved for the backward: each layer's input and the final stream (bf16); without recompute every
  // layer's activations too.
  const saved = lossPad + (L + 1) * M * H * BF16 + (options.recompute ? 0 : L * (attentionActs + mlpActs));
  // The layer working set: the stream's gradient; LoRA's u and du (M, r) and its input-width scratch
  // dxd (+ xd with dropout), as wide as the widest adapted input; one layer's activations (recompute);
  // the MLP part's gradients — dh (M, I), with dxn (M, H) in dh's memory and SwiGLU's dgate/dup in place
  // of gate/up — under which lie the attention part's datt, dq (M, NH·D), dk, dv (M, NKV·D), dxn (M, H).
  const maxIn = Math.max(...options.targets.map((t) => LINEARS[t]![1]));
  const lora = 2 * M * r * F32 + M * maxIn * F32 + (options.dropout > 0 ? M * maxIn * F32 : 0);
  const mlpPart = (options.recompute ? mlpActs : 0) + M * I * BF16 /* dh */;
  const attentionGrads = 2 * M * QD * BF16 + 2 * M * KVD * BF16 + M * H * BF16;
  const region = lora + (options.recompute ? attentionActs : 0) + Math.max(mlpPart, attentionGrads);
  const layer = M * H * BF16 /* dx */ + region;
  // The head: final norm output and rstd, one chunk of float32 logits, the chunk's rows and their
  // gradients, and the gradient of the final norm's output; laid over the region (never live together).
  const head = M * H * BF16 + M * F32 + CE_CHUNK * V * F32 + 2 * CE_CHUNK * H * BF16 + M * H * BF16;
  const headShared = Math.min(head, region);
  const workspace = inputs + saved + layer + head - headShared;
  const job = adapterState + workspace;
  const inUse = base + dequantBuffer + adapterWeights;
  return {
    baseBytes: base, backendScratchBytes: dequantBuffer, dequantBufferBytes: dequantBuffer, adapterWeightsBytes: adapterWeights,
    adapterStateBytes: adapterState, inputsBytes: inputs, savedActivationsBytes: saved, layerWorkingSetBytes: layer,
    headBytes: head, headSharedBytes: headShared, workspaceBytes: workspace, jobBytes: job, inUseBytes: inUse,
    peakBytes: inUse + job, freeBytes: 0,
  };
}

function numbers(p: NativeTrainingPlan) {
  const { batchSize: _b, seqLen: _s, rank: _r, targets: _t, recompute: _c, computeDtype: _d, fits: _f, description: _x, ...rest } = p;
  return rest;
}

describe('training memory plan: Llama-3-8B, batch 2 x 2,048, r 16 on q/k/v/o, recompute, bf16, NF4 base', () => {
  it('equals the hand calculation, part by part', () => {
    const plan = plan8b();
    expect(numbers(plan)).toEqual(handPlan({ targets: QKVO, dropout: 0, recompute: true }));
    expect(plan).toMatchObject({ batchSize: 2, seqLen: 2048, rank: 16, targets: QKVO, recompute: true, computeDtype: 'BF16', fits: false });
    // The figures in words (what the refusal of a job names): MiB with one decimal.
    expect(plan.description).toContain('the job needs 1821.1 MiB');
    expect(plan.description).toContain('saved activations 1056.0');
    expect(plan.description).toContain('base 5438.1');
  });

  it('fits the issue\'s budget: peak <= 8 GiB including the NF4 base, with room for cuBLASLt and the sampler', () => {
    const plan = plan8b();
    // base 5.31 GiB (NF4 linears 3.35 GiB + bf16 embed_tokens and lm_head 1.96 GiB), adapter + state
    // 0.20 GiB, workspace 1.63 GiB, dequantization buffer 0.11 GiB: 7.25 GiB. The backend's other
    // scratch (cuBLASLt's 32 MiB workspace, sampling buffers of a few MiB) must fit in the rest.
    expect(plan.baseBytes / GiB).toBeCloseTo(5.311, 3);
    expect(plan.peakBytes / GiB).toBeCloseTo(7.249, 3);
    expect(plan.peakBytes + 256 * MiB).toBeLessThanOrEqual(8 * GiB);
  });

  it('LoRA dropout adds the dropped-out input copy, M x widest input, float32', () => {
    const want = handPlan({ targets: QKVO, dropout: 0.05, recompute: true });
    expect(numbers(plan8b({ dropout: 0.05 }))).toEqual(want);
    expect(want.layerWorkingSetBytes - handPlan({ targets: QKVO, dropout: 0, recompute: true }).layerWorkingSetBytes).toBe(4096 * H * F32);
  });

  it('every linear adapted: LoRA scratch as wide as down_proj\'s input, and h keeps its own memory', () => {
    expect(numbers(plan8b({ targets: ALL }))).toEqual(handPlan({ targets: ALL, dropout: 0, recompute: true }));
  });

  it('without recompute every layer\'s activations are saved', () => {
    const want = handPlan({ targets: QKVO, dropout: 0, recompute: false });
    expect(numbers(plan8b({ recompute: false }))).toEqual(want);
    // 13.5 GiB of saved activations alone, beyond the whole 8 GiB budget: why recompute is the default.
    expect(want.savedActivationsBytes / GiB).toBeCloseTo(13.55, 2);
  });

  it('grows linearly in the tokens of a micro-batch, except the adapter and the base', () => {
    const a = plan8b({ batch: 1, seq: 2048 }), b = plan8b({ batch: 2, seq: 2048 }), c = plan8b({ batch: 1, seq: 4096 });
    expect(b.adapterStateBytes).toBe(a.adapterStateBytes);
    expect(b.savedActivationsBytes - 248).toBe(2 * (a.savedActivationsBytes - 248));
    // Same rows either way; only the attention's lse (B, NH, T) is laid out per sequence, same size.
    expect(c.workspaceBytes).toBe(b.workspaceBytes);
  });
});

describe('training memory plan of a running engine (tiny model, CPU)', () => {
  let dir: string;
  let engine: Engine;
  const lora = createLoraConfig({ r: 8, alpha: 16, targets: QKVO });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-plan-'));
    await makeModel({ preset: 'tiny', outDir: join(dir, 'tiny'), seed: 5 });
    engine = await Engine.load(join(dir, 'tiny'), { quant: 'nf4', device: 'cpu', log: () => {} });
  }, 120_000);

  afterAll(async () => {
    engine?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('plans the same job parts as the config alone, with the engine\'s base and the host memory', () => {
    const plan = engine.planTraining(lora, { batchSize: 4, seqLen: 96 });
    const fromConfig = native().planTrainingMemory({
      config: nativeConfig(engine.config), quant: 'nf4', device: 'cpu', computeDtype: 'f32', batchSize: 4, seqLen: 96,
      lora: { r: 8, alpha: 16, dropout: 0, rslora: false, targets: QKVO },
    });
    for (const k of ['adapterWeightsBytes', 'adapterStateBytes', 'inputsBytes', 'savedActivationsBytes', 'layerWorkingSetBytes', 'headBytes', 'headSharedBytes', 'workspaceBytes', 'jobBytes'] as const) {
      expect(plan[k], k).toBe(fromConfig[k]);
    }
    expect(plan.baseBytes).toBe(engine.native.info().weightBytes);
    expect(plan.dequantBufferBytes).toBe(0); // the CPU dequantizes inside its kernels
    expect(plan.freeBytes).toBeGreaterThan(0);
    expect(plan.fits).toBe(true);
    expect(plan.peakBytes).toBe(plan.inUseBytes + plan.jobBytes);
  });

  it('reports the running job\'s plan in the engine\'s stats (GetModelInfo\'s memory.training_plan)', async () => {
    const adapter = engine.createAdapter(lora, 1);
    const rows = Array.from({ length: 4 }, (_, i) => ({ ids: Int32Array.from({ length: 20 + i }, (_, t) => 1000 + t), labels: Int32Array.from({ length: 20 + i }, (_, t) => 1000 + t) }));
    const seen: (NativeTrainingPlan | undefined)[] = [];
    const abort = new AbortController();
    try {
      // A job far too long to end by itself: the plan is read on its first step, then it is cancelled.
      await engine.train(adapter, rows, {
        lr: 1e-3, steps: 1_000_000, epochs: 1, batchSize: 2, gradAccum: 1, scheduler: 'constant', warmupSteps: 0, weightDecay: 0,
        maxGradNorm: 1, seed: 1, shuffle: false,
      }, { signal: abort.signal, onStep: () => { if (seen.length === 0) { seen.push(engine.native.stats().trainingPlan); abort.abort(); } } });
    } finally {
      engine.removeAdapter(adapter);
    }
    const plan = seen[0];
    expect(plan).toBeDefined();
    expect(plan).toMatchObject({ batchSize: 2, seqLen: 23, rank: 8, targets: QKVO, recompute: true });
    expect(plan!.workspaceBytes).toBe(engine.planTraining(lora, { batchSize: 2, seqLen: 23 }).workspaceBytes);
    expect(engine.native.stats().trainingPlan).toBeUndefined(); // the job ended
  });

  it('refuses a job that does not fit with RESOURCE_EXHAUSTED naming the numbers', async () => {
    const limited = await Engine.load(join(dir, 'tiny'), { quant: 'nf4', device: 'cpu', log: () => {}, trainingMemoryBytes: 1 * MiB });
    try {
      const adapter = limited.createAdapter(lora, 1);
      const plan = limited.planTraining(lora, { batchSize: 2, seqLen: 300 });
      expect(plan.freeBytes).toBe(1 * MiB);
      expect(plan.jobBytes).toBeGreaterThan(1 * MiB);
      expect(plan.fits).toBe(false);
      const ids = Int32Array.from({ length: 300 }, (_, t) => 1000 + t);
      const job = limited.train(adapter, [{ ids, labels: ids }, { ids, labels: ids }], {
        lr: 1e-3, steps: 1, epochs: 1, batchSize: 2, gradAccum: 1, scheduler: 'constant', warmupSteps: 0, weightDecay: 0, maxGradNorm: 1,
        seed: 1, shuffle: false,
      });
      await expect(job).rejects.toMatchObject({ code: 'RESOURCE_EXHAUSTED' });
      const message = await job.catch((e: Error) => e.message);
      const mib = (n: number) => (n / MiB).toFixed(1);
      expect(message).toContain(`it needs ${mib(plan.jobBytes)} MiB and cpu memory has 1.0 MiB free`);
      expect(message).toContain(`saved activations ${mib(plan.savedActivationsBytes)}`);
      expect(message).toContain(`layer working set ${mib(plan.layerWorkingSetBytes)}`);
    } finally {
      limited.close();
    }
  });
});

describe('GetModelInfo', () => {
  it('carries the running job\'s memory plan in memory.training_plan, every field', async () => {
    const p = plan8b();
    const plan: TrainingMemoryPlan = {
      batchSize: p.batchSize, seqLen: p.seqLen, rank: p.rank, targetModules: p.targets, recompute: p.recompute,
      baseBytes: p.baseBytes, backendScratchBytes: p.backendScratchBytes, dequantBufferBytes: p.dequantBufferBytes,
      adapterWeightsBytes: p.adapterWeightsBytes, adapterStateBytes: p.adapterStateBytes, workspaceBytes: p.workspaceBytes,
      inputsBytes: p.inputsBytes, savedActivationsBytes: p.savedActivationsBytes, layerWorkingSetBytes: p.layerWorkingSetBytes,
      headBytes: p.headBytes, headSharedBytes: p.headSharedBytes, jobBytes: p.jobBytes, peakBytes: p.peakBytes,
      freeBytes: 80 * GiB, description: p.description,
    };
    class Training extends EngineDouble {
      override modelInfo(): ModelInfo {
        const info = super.modelInfo();
        return { ...info, memory: { ...info.memory, trainingPlan: plan } };
      }
    }
    const harness = await startHarness({ engine: new Training() });
    try {
      const info = await call(harness.clients.model.getModelInfo, harness.clients.model, {});
      expect(info.memory?.trainingPlan).toEqual(plan);
      const idle = await startHarness();
      try {
        expect((await call(idle.clients.model.getModelInfo, idle.clients.model, {})).memory?.trainingPlan).toBeUndefined();
      } finally {
        await idle.stop();
      }
    } finally {
      await harness.stop();
    }
  });
});
