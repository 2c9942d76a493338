// The adapter pool and the executor around it, through the engine's TypeScript face on the CPU backend
// (issue #8, "must show" 1 and 5, and the isolation and scheduling parts): a mixed batch of 8 adapters
// of different ranks plus the base gives every request the greedy ids it gets alone; LRU eviction,
// pins and the host tier; a request waits for a slot instead of failing; loads run off the executor
// thread (a load blocked on a FIFO does not stop a running decode); a bad adapter file or non-finite
// logits fail that request alone; the serving policy holds training back and reports its share.

import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine, type Adapter, type StepEvent } from '../src/engine/engine.js';
import { makeModel } from '../src/engine/make-model.js';
import { createLoraConfig, type LoraConfig } from '../src/engine/peft-config.js';
import { randomAdapterFiles, type RandomAdapterOptions } from '../src/loadgen/adapters.js';

const GREEDY = { temperature: 0, stopIds: [] as number[] };

function promptOf(length: number, seed: number): number[] {
  // Ordinary (non-special) token ids, different per prompt.
  return Array.from({ length }, (_, i) => 1000 + ((seed * 7919 + i * 104729) % 50000));
}

describe('adapter pool', () => {
  let dir: string;
  let modelDir: string;
  let engine: Engine;

  /** Writes a random PEFT folder; returns it with its config. */
  const writeAdapter = async (name: string, options: RandomAdapterOptions): Promise<{ dir: string; config: LoraConfig }> => {
    const folder = join(dir, name);
    await mkdir(folder, { recursive: true });
    for (const [file, bytes] of Object.entries(randomAdapterFiles(engine.config, options))) await writeFile(join(folder, file), bytes);
    const config = createLoraConfig({ r: options.rank, alpha: options.alpha ?? 2 * options.rank, targets: options.targets ?? 'q_proj,k_proj,v_proj,o_proj' });
    return { dir: folder, config };
  };
  const register = async (e: Engine, name: string, options: RandomAdapterOptions): Promise<Adapter> => {
    const a = await writeAdapter(name, options);
    return e.registerAdapter(a.config, join(a.dir, 'adapter_model.safetensors'));
  };
  const state = (e: Engine, a: Adapter) => e.adapterStates().find((s) => s.id === a.slot)!;
  const generate = (e: Engine, adapter: Adapter | null, prompt: number[], maxTokens = 8) =>
    e.generate({ promptIds: prompt, adapter, maxTokens, ...GREEDY });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-pool-'));
    modelDir = join(dir, 'tiny');
    await makeModel({ preset: 'tiny', outDir: modelDir, seed: 8 });
    engine = await Engine.load(modelDir, { quant: 'nf4', device: 'cpu', adapterSlots: 16, log: () => {} });
  }, 120_000);

  afterAll(async () => {
    engine?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('a mixed batch (8 adapters of ranks 1 to 64 + the base, prompts of 3 to 50 tokens) gives each request its greedy ids alone', async () => {
    const ranks = [1, 2, 3, 4, 8, 16, 32, 64];
    const adapters: (Adapter | null)[] = [];
    for (const [i, rank] of ranks.entries()) {
      adapters.push(await register(engine, `mixed-${i}`, { rank, seed: 100 + i, scale: 0.2, targets: i % 2 === 0 ? 'q_proj,k_proj,v_proj,o_proj' : 'all-linear' }));
    }
    adapters.push(null);
    const prompts = [3, 50, 7, 26, 12, 41, 19, 33, 9].map((length, i) => promptOf(length, i));
    const alone = [];
    for (const [i, a] of adapters.entries()) alone.push(await generate(engine, a, prompts[i]!, 10));
    // Every adapter changes the model: its logits on its prompt differ from the base's.
    const base = await Promise.all(prompts.slice(0, 8).map((p) => engine.logits(p)));
    for (const [i, a] of adapters.slice(0, 8).entries()) {
      const with_ = await engine.logits(prompts[i]!, a);
      let diff = 0;
      for (let k = 0; k < with_.length; k++) diff = Math.max(diff, Math.abs(with_[k]! - base[i]![k]!));
      expect(diff, `adapter ${i}`).toBeGreaterThan(1e-3);
    }
    for (const a of adapters) if (a) await engine.warmAdapter(a);
    const stepsBefore = engine.info().eagerSteps;
    const together = await Promise.all(adapters.map((a, i) => generate(engine, a, prompts[i]!, 10)));
    const steps = engine.info().eagerSteps - stepsBefore;
    // Alone: 9 × (1 prefill + 9 decode) = 90 steps; batched, the 9 requests share about 10.
    expect(steps).toBeLessThanOrEqual(20);
    for (const [i] of adapters.entries()) {
      expect(together[i]!.ids, `request ${i}`).toEqual(alone[i]!.ids);
      expect(together[i]!.finishReason).toBe('length');
    }
    for (const a of adapters) if (a) engine.removeAdapter(a);
  });

  it('LRU: the least recently used idle adapter leaves its slot; pins keep one; the host tier saves re-reads and has a budget', async () => {
    const small = await Engine.load(modelDir, { quant: 'nf4', device: 'cpu', adapterSlots: 2, log: () => {} });
    try {
      const [a, b, c] = [await register(small, 'lru-a', { rank: 4, seed: 1 }), await register(small, 'lru-b', { rank: 4, seed: 2 }), await register(small, 'lru-c', { rank: 4, seed: 3 })] as const;
      const p = promptOf(6, 1);
      expect(state(small, a).tier).toBe('disk');
      const firstA = await generate(small, a, p);
      await generate(small, b, p);
      expect([state(small, a).tier, state(small, b).tier]).toEqual(['device', 'device']);
      await generate(small, c, p);  // the pool is full: a, least recently used, leaves its slot
      expect([state(small, a).tier, state(small, b).tier, state(small, c).tier]).toEqual(['host', 'device', 'device']);
      expect(state(small, a).stats).toMatchObject({ evictions: 1, loads: 1 });
      // Back from the host tier: no second read, same output.
      expect((await generate(small, a, p)).ids).toEqual(firstA.ids);
      expect(state(small, a).stats).toMatchObject({ loads: 1, hostHits: 1, hits: 0 });
      expect(state(small, b).tier).toBe('host');  // b was the least recently used
      expect((await generate(small, a, p)).ids).toEqual(firstA.ids);
      expect(state(small, a).stats.hits).toBe(1);

      // a pinned: b and c take turns in the other slot, a stays.
      small.pinAdapter(a, true);
      await generate(small, b, p);
      await generate(small, c, p);
      await generate(small, b, p);
      expect(state(small, a)).toMatchObject({ tier: 'device', pinned: true });
      expect(state(small, a).stats.evictions).toBe(1);
      // One slot must stay unpinned.
      expect(() => small.pinAdapter(b, true)).toThrow(expect.objectContaining({ code: 'FAILED_PRECONDITION' }));
      small.pinAdapter(a, false);

      // The host tier's budget: idle host copies beyond it are dropped and read again on their next use.
      small.native.setHostBudget(1);
      await generate(small, b, p);
      expect(state(small, c).tier).toBe('disk');
      expect(state(small, c).stats.hostEvictions).toBe(1);
      await generate(small, c, p);
      expect(state(small, c).stats.loads).toBe(2);
      const totals = small.poolStats();
      expect(totals).toMatchObject({ slots: 2, resident: 2, hostBudget: 1 });
      expect(totals.stats.evictions).toBeGreaterThanOrEqual(5);
      expect(totals.stats.requests).toBe(10);
    } finally {
      small.close();
    }
  });

  it('a request for an adapter with no free slot waits for one (draining the busiest) and then runs, instead of failing', async () => {
    const small = await Engine.load(modelDir, { quant: 'nf4', device: 'cpu', adapterSlots: 2, log: () => {} });
    try {
      const [a, b, c] = [await register(small, 'wait-a', { rank: 4, seed: 11 }), await register(small, 'wait-b', { rank: 4, seed: 12 }), await register(small, 'wait-c', { rank: 4, seed: 13 })] as const;
      const p = promptOf(5, 2);
      const cAlone = await generate(small, c, p, 6);
      await generate(small, a, p, 1);  // c is now the least recently used: a and b take the slots
      await generate(small, b, p, 1);
      expect(state(small, c).tier).toBe('host');
      let aDone = false;
      const longA = generate(small, a, p, 150).then((r) => { aDone = true; return r; });
      const longB = generate(small, b, p, 400);
      await new Promise((resolve) => setTimeout(resolve, 50));
      const waitingC = generate(small, c, p, 6);
      // While both slots are busy, c waits (it does not fail) ...
      const seen = await new Promise<number>((resolve) => {
        const poll = setInterval(() => {
          const waiting = small.info().waitingForAdapter;
          if (waiting > 0) { clearInterval(poll); resolve(waiting); }
        }, 2);
      });
      expect(seen).toBe(1);
      // ... a (used least recently) takes no new requests; once its running one ends, c gets its slot.
      const r = await waitingC;
      expect(r.ids).toEqual(cAlone.ids);
      expect(aDone).toBe(true);
      expect((await longB).finishReason).toBe('length');
      expect((await longA).finishReason).toBe('length');
      expect(state(small, a).stats.evictions).toBe(1);
    } finally {
      small.close();
    }
  });

  it('a load blocked on its file does not stop running decodes; its failure fails only its own request', async () => {
    const prompt = promptOf(8, 3);
    const baseAlone = await generate(engine, null, prompt, 60);
    const fifo = join(dir, 'blocked.safetensors');
    execFileSync('mkfifo', [fifo]);
    // The loader thread's open() of a FIFO blocks until a writer opens it.
    const blocked = engine.registerAdapter(createLoraConfig({ r: 4, alpha: 8, targets: 'q_proj' }), fifo);
    let tokens = 0;
    let onToken: (() => void) | null = null;
    const running = engine.generate({ promptIds: prompt, maxTokens: 60, ...GREEDY }, { onTokens: (ids) => { tokens += ids.length; onToken?.(); } });
    const until = (n: number) => new Promise<void>((resolve) => { onToken = () => { if (tokens >= n) resolve(); }; onToken(); });
    await until(5);
    const failing = generate(engine, blocked, prompt, 4);
    failing.catch(() => {});
    await until(40);  // 35 more decode steps while the load is stuck
    expect(state(engine, blocked)).toMatchObject({ loading: true, tier: 'disk' });
    expect(tokens).toBeLessThan(60);
    const writer = await open(fifo, 'w');
    await writer.close();
    await expect(failing).rejects.toMatchObject({ code: expect.stringMatching(/^(INVALID_SAFETENSORS|IO_ERROR)$/) });
    expect((await running).ids).toEqual(baseAlone.ids);
    expect(state(engine, blocked).stats.loadFailures).toBe(1);
    engine.removeAdapter(blocked);
  });

  it('an adapter whose file is not safetensors, or whose weights make NaN, fails its request alone; the batch goes on', async () => {
    const good = [await register(engine, 'iso-good-1', { rank: 8, seed: 31 }), await register(engine, 'iso-good-2', { rank: 2, seed: 32, targets: 'all-linear' })];
    const nan = await register(engine, 'iso-nan', { rank: 4, seed: 33, poison: true });
    const garbageDir = join(dir, 'iso-garbage');
    await mkdir(garbageDir, { recursive: true });
    await writeFile(join(garbageDir, 'adapter_model.safetensors'), Buffer.alloc(4096, 7));
    const garbage = engine.registerAdapter(createLoraConfig({ r: 4, alpha: 8, targets: 'q_proj' }), join(garbageDir, 'adapter_model.safetensors'));
    const prompts = [promptOf(4, 5), promptOf(17, 6), promptOf(9, 7)];
    const alone = [await generate(engine, good[0]!, prompts[0]!, 12), await generate(engine, good[1]!, prompts[1]!, 12), await generate(engine, null, prompts[2]!, 12)];
    for (const a of [...good, nan]) await engine.warmAdapter(a);
    const results = await Promise.allSettled([
      generate(engine, good[0]!, prompts[0]!, 12), generate(engine, good[1]!, prompts[1]!, 12), generate(engine, null, prompts[2]!, 12),
      generate(engine, nan, prompts[1]!, 12), generate(engine, garbage, prompts[0]!, 12),
    ]);
    for (let i = 0; i < 3; i++) {
      expect(results[i]!.status).toBe('fulfilled');
      expect((results[i] as PromiseFulfilledResult<{ ids: number[] }>).value.ids).toEqual(alone[i]!.ids);
    }
    expect(results[3]).toMatchObject({ status: 'rejected', reason: { code: 'NUMERICAL_ERROR' } });
    expect(results[4]).toMatchObject({ status: 'rejected', reason: { code: 'INVALID_SAFETENSORS' } });
    // The engine still serves the failed adapters' neighbours afterwards.
    expect((await generate(engine, good[0]!, prompts[0]!, 12)).ids).toEqual(alone[0]!.ids);
    for (const a of [...good, nan, garbage]) engine.removeAdapter(a);
  });

  it('the serving policy holds training micro-steps back while generating, and reports the share training got', async () => {
    const examples = [0, 1, 2, 3].map((i) => {
      const ids = Int32Array.from(promptOf(40, 50 + i));
      return { ids, labels: ids };
    });
    const hyper = { lr: 1e-3, steps: 6, epochs: 1, batchSize: 2, gradAccum: 1, scheduler: 'constant' as const, warmupSteps: 0, weightDecay: 0, maxGradNorm: 1, seed: 1, shuffle: false };
    const run = async (policy: { targetInterTokenMs: number; minTrainingShare: number }) => {
      engine.setServingPolicy(policy);
      const stop = new AbortController();
      const decoding = engine.generate({ promptIds: promptOf(6, 9), maxTokens: 4000, ...GREEDY }, { signal: stop.signal });
      const adapter = engine.createAdapter(createLoraConfig({ r: 4, alpha: 8, targets: 'q_proj,v_proj' }), 1);
      const shares: NonNullable<StepEvent['share']>[] = [];
      await engine.train(adapter, examples, hyper, { onStep: (e) => shares.push(e.share!) });
      stop.abort();
      await decoding;
      engine.removeAdapter(adapter);
      return shares;
    };
    const alternate = await run({ targetInterTokenMs: 0, minTrainingShare: 0.2 });
    // An unreachable target: training runs only to keep its share of the busy time near 20%.
    const held = await run({ targetInterTokenMs: 0.001, minTrainingShare: 0.2 });
    const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;
    expect(alternate).toHaveLength(6);
    expect(held).toHaveLength(6);
    expect(alternate.every((s) => s.deferredMicroSteps === 0 && s.trainingSeconds > 0)).toBe(true);
    expect(alternate.slice(1).every((s) => s.generationSteps === 1)).toBe(true);
    expect(held.slice(1).every((s) => s.deferredMicroSteps > 0)).toBe(true);
    // Alternating, a micro-step (forward + backward of 2 × 40 tokens) follows each one-token decode
    // step, so training takes most of the time; held back, it gets about the minimum share. The
    // window is a 5 s exponential average, so single steps wander; the means are far apart.
    expect(mean(alternate.map((s) => s.share))).toBeGreaterThan(0.5);
    expect(mean(held.slice(1).map((s) => s.share))).toBeLessThan(0.45);
    expect(mean(held.map((s) => s.generationSteps))).toBeGreaterThan(3 * mean(alternate.map((s) => s.generationSteps)));
    const scheduler = engine.info().scheduler;
    expect(scheduler).toMatchObject({ targetInterTokenMs: 0.001, minTrainingShare: 0.2 });
    expect(scheduler.deferredMicroSteps).toBeGreaterThan(0);
    expect(scheduler.trainingStepMs).toBeGreaterThan(0);
    engine.setServingPolicy({ targetInterTokenMs: 0 });
  });
});
