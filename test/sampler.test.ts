// The sampler (native/model/sampler.cpp) against Hugging Face generate() semantics: greedy argmax,
// temperature, top-k, top-p (nucleus), the CTRL repetition penalty, their order (penalty, temperature,
// top-k, top-p), and seeding.
//
// Statistical checks use Pearson's chi-square with the critical value for a false-alarm probability of
// 1e-6 (Wilson–Hilferty approximation, accurate to a few percent at these degrees of freedom), and
// every expected bin count is >= 100, well inside the approximation's validity (>= 5). The draws are
// seeded, so a given build passes or fails deterministically; the bound says how unlikely it is that a
// correct sampler lands on a failing seed, while a wrong distribution (e.g. temperature applied twice,
// or top-p over the untruncated distribution) overshoots it by orders of magnitude at these sizes.
import { native as loadNative } from '../src/engine/native.js';
import { describe, expect, it } from 'vitest';
import { rng } from './helpers/random.js';

interface SamplingParams {
  temperature?: number;
  topK?: number;
  topP?: number;
  repetitionPenalty?: number;
  seed?: number | bigint;
}
interface NativeSampler {
  sampleToken(logits: Float32Array, params: SamplingParams, context: Int32Array, draws: number): Int32Array;
}
const native = loadNative() as unknown as NativeSampler;

const NONE = new Int32Array(0);

function sample(logits: ArrayLike<number>, params: SamplingParams, draws: number, context: number[] = []): Int32Array {
  return native.sampleToken(Float32Array.from(logits), params, Int32Array.from(context), draws);
}

function gaussians(n: number, seed: number, scale = 1): Float32Array {
  const u = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = scale * Math.sqrt(-2 * Math.log(1 - u())) * Math.cos(2 * Math.PI * u());
  return out;
}

function softmax(x: ArrayLike<number>, t = 1): number[] {
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) max = Math.max(max, x[i]! / t);
  const e = Array.from(x, (v) => Math.exp(v / t - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

function counts(draws: Int32Array, V: number): number[] {
  const c = new Array<number>(V).fill(0);
  for (const d of draws) c[d]!++;
  return c;
}

// Upper 1e-6 quantile of chi-square with k degrees of freedom (Wilson–Hilferty; z = 4.7534).
function chiSquareCritical(k: number): number {
  const z = 4.7534;
  const a = 2 / (9 * k);
  return k * (1 - a + z * Math.sqrt(a)) ** 3;
}

// Pearson's statistic of the observed counts against probabilities `p` over the bins `support`.
function chiSquare(observed: number[], p: number[], support: number[], n: number): number {
  let x2 = 0;
  for (const i of support) {
    const expected = n * p[i]!;
    expect(expected).toBeGreaterThanOrEqual(100);  // keeps the chi-square approximation valid
    x2 += (observed[i]! - expected) ** 2 / expected;
  }
  return x2;
}

function argmax(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[best]!) best = i;
  return best;
}

describe('greedy (temperature 0)', () => {
  it('is the argmax over a Llama 3 sized vocabulary', () => {
    const logits = gaussians(128256, 1, 3);
    const draws = native.sampleToken(logits, { temperature: 0, seed: 7 }, NONE, 3);
    expect(Array.from(draws)).toEqual([argmax(logits), argmax(logits), argmax(logits)]);
  });

  it('takes the lowest index on ties (torch.argmax) and ignores top-k / top-p / seed', () => {
    expect(sample([1, 5, 3, 5, 5], { temperature: 0 }, 1)[0]).toBe(1);
    expect(sample([1, 5, 3, 5, 5], { temperature: 0, topK: 1, topP: 0.1, seed: 99 }, 1)[0]).toBe(1);
  });
});

describe('temperature', () => {
  const logits = [1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.25, -0.25];
  for (const t of [0.7, 1.0, 1.8]) {
    it(`draws follow softmax(logits / ${t})`, () => {
      const n = 40000;
      const draws = sample(logits, { temperature: t, seed: 1234 }, n);
      const p = softmax(Float32Array.from(logits), t);
      const support = logits.map((_, i) => i);
      const x2 = chiSquare(counts(draws, logits.length), p, support, n);
      expect(x2).toBeLessThan(chiSquareCritical(support.length - 1));
    });
  }

  it('a wrong temperature is detected by the same bound (the check has power)', () => {
    const n = 40000;
    const draws = sample(logits, { temperature: 0.7, seed: 1234 }, n);
    const wrong = softmax(Float32Array.from(logits), 0.8);
    const x2 = chiSquare(counts(draws, logits.length), wrong, logits.map((_, i) => i), n);
    expect(x2).toBeGreaterThan(chiSquareCritical(logits.length - 1));
  });
});

describe('top-k', () => {
  it('never returns a token outside the k best, and samples them by softmax', () => {
    const V = 1000;
    const k = 10;
    const logits = gaussians(V, 2);
    const order = Array.from(logits.keys()).sort((a, b) => logits[b]! - logits[a]!);
    const best = order.slice(0, k);
    const n = 30000;
    const t = 1.5;
    const draws = native.sampleToken(logits, { temperature: t, topK: k, seed: 5 }, NONE, n);
    const inBest = new Set(best);
    for (const d of draws) expect(inBest.has(d)).toBe(true);
    // Renormalized softmax over the k best.
    const kept = softmax(best.map((i) => logits[i]!), t);
    const p = new Array<number>(V).fill(0);
    best.forEach((i, j) => (p[i] = kept[j]!));
    const x2 = chiSquare(counts(draws, V), p, best, n);
    expect(x2).toBeLessThan(chiSquareCritical(k - 1));
  });

  it('uses selection correctly on a 128256-token vocabulary', () => {
    const logits = gaussians(128256, 3, 2);
    const order = Array.from(logits.keys()).sort((a, b) => logits[b]! - logits[a]!);
    const best = new Set(order.slice(0, 50));
    const draws = native.sampleToken(logits, { temperature: 1, topK: 50, seed: 11 }, NONE, 500);
    for (const d of draws) expect(best.has(d)).toBe(true);
  }, 60_000);

  it('keeps every token tied with the k-th value (HF: remove x < k-th largest)', () => {
    // k = 2: the 2nd largest value is 4, shared by tokens 1, 2, 3; all three stay, token 4 goes.
    const draws = sample([5, 4, 4, 4, 1], { temperature: 1, topK: 2, seed: 3 }, 4000);
    const c = counts(draws, 5);
    expect(c[4]).toBe(0);
    for (const i of [0, 1, 2, 3]) expect(c[i]).toBeGreaterThan(0);
  });

  it('topK >= V is off', () => {
    const draws = sample([0, 0, 0], { temperature: 1, topK: 3, seed: 3 }, 3000);
    for (const c of counts(draws, 3)) expect(c).toBeGreaterThan(800);
  });
});

describe('top-p (nucleus)', () => {
  const probs = [0.5, 0.3, 0.15, 0.05];
  const logits = probs.map(Math.log);

  it('keeps the minimal set whose probability reaches top_p', () => {
    // top_p 0.75: {0} has 0.5 < 0.75, {0, 1} has 0.8 >= 0.75, so token 2 (and 3) are out.
    const n = 20000;
    const draws = sample(logits, { temperature: 1, topP: 0.75, seed: 9 }, n);
    const c = counts(draws, 4);
    expect(c[2]).toBe(0);
    expect(c[3]).toBe(0);
    const x2 = chiSquare(c, [0.5 / 0.8, 0.3 / 0.8, 0, 0], [0, 1], n);
    expect(x2).toBeLessThan(chiSquareCritical(1));
  });

  it('keeps only the top token when it alone reaches top_p, and at least one token when top_p is 0', () => {
    expect(new Set(sample(logits, { temperature: 1, topP: 0.4, seed: 9 }, 2000))).toEqual(new Set([0]));
    expect(new Set(sample(logits, { temperature: 1, topP: 0, seed: 9 }, 2000))).toEqual(new Set([0]));
  });

  it('includes the token that crosses top_p', () => {
    // top_p 0.85: {0, 1} has 0.8 < 0.85, so token 2 joins; {0, 1, 2} has 0.95, so token 3 stays out.
    const c = counts(sample(logits, { temperature: 1, topP: 0.85, seed: 9 }, 20000), 4);
    expect(c[2]).toBeGreaterThan(0);
    expect(c[3]).toBe(0);
  });

  it('is computed after temperature (HF order: Temperature, TopK, TopP)', () => {
    // At t = 2 the probabilities become ∝ √p = 0.379, 0.294, 0.207, 0.120: {0, 1} has 0.673 < 0.75, so
    // token 2 joins. Were top-p applied before the temperature, token 2 would never appear.
    const c = counts(sample(logits, { temperature: 2, topP: 0.75, seed: 9 }, 20000), 4);
    expect(c[2]).toBeGreaterThan(0);
    expect(c[3]).toBe(0);
  });

  it('is computed over the top-k survivors (HF order: TopK before TopP)', () => {
    // p = 0.4, 0.3, 0.2, 0.1, top-k 3 renormalizes to 0.444, 0.333, 0.222: {0, 1} has 0.778 >= 0.72, so
    // token 2 is out. Over the untruncated distribution {0, 1} would have 0.7 < 0.72 and keep token 2.
    const c = counts(sample([0.4, 0.3, 0.2, 0.1].map(Math.log), { temperature: 1, topK: 3, topP: 0.72, seed: 4 }, 20000), 4);
    expect(c[0]).toBeGreaterThan(0);
    expect(c[1]).toBeGreaterThan(0);
    expect(c[2]).toBe(0);
    expect(c[3]).toBe(0);
  });

  it('finds the exact nucleus boundary in a 128256-token vocabulary', () => {
    // 120 leading tokens at nearly equal, distinct logits, then the rest of the vocabulary at -3: the
    // nucleus for top_p 0.0155 is ~100 of the 120 (their mass is ~1.9% of the total), each kept token
    // has probability ~1/100, so 2500 draws hit the last member with probability 1 - e^-25, while its
    // near-equal successors would show up just as often were the boundary one token late.
    const V = 128256;
    const logits = new Float32Array(V).fill(-3);
    for (let i = 0; i < 120; i++) logits[i] = -1e-3 * i;
    const topP = 0.0155;
    const w = Array.from(logits, (x) => Math.exp(x));
    const total = w.reduce((a, b) => a + b, 0);
    let size = 0;  // a token is kept iff the mass ranked before it is < top_p · total
    for (let prefix = 0; size === 0 || prefix < topP * total; size++) prefix += w[size]!;
    expect(size).toBeGreaterThan(80);
    expect(size).toBeLessThan(115);
    const draws = native.sampleToken(logits, { temperature: 1, topP, seed: 21 }, NONE, 2500);
    let max = 0;
    for (const d of draws) max = Math.max(max, d);
    expect(max).toBe(size - 1);
  }, 120_000);
});

describe('repetition penalty (CTRL, as HF RepetitionPenaltyLogitsProcessor)', () => {
  it('divides a positive logit of a context token by the penalty', () => {
    const logits = [2.0, 1.5, 0.1];
    expect(sample(logits, { temperature: 0 }, 1)[0]).toBe(0);
    expect(sample(logits, { temperature: 0, repetitionPenalty: 2 }, 1, [0])[0]).toBe(1);    // 2 / 2 = 1 < 1.5
    expect(sample(logits, { temperature: 0, repetitionPenalty: 1.2 }, 1, [0])[0]).toBe(0);  // 2 / 1.2 = 1.67 > 1.5
  });

  it('multiplies a negative logit of a context token by the penalty', () => {
    // -1 * 2 = -2 < -1.5 flips the choice; dividing (-0.5) would not.
    expect(sample([-1.0, -1.5, -3.0], { temperature: 0, repetitionPenalty: 2 }, 1, [0])[0]).toBe(1);
  });

  it('leaves tokens outside the context alone and penalizes a repeated id once', () => {
    expect(sample([2.0, 1.5, 0.1], { temperature: 0, repetitionPenalty: 2 }, 1, [2, 2])[0]).toBe(0);
    // 3 / 1.4 = 2.14 > 2 keeps token 0; applying the penalty per occurrence (3 / 1.4³ = 1.09) would flip it.
    expect(sample([3.0, 2.0], { temperature: 0, repetitionPenalty: 1.4 }, 1, [0, 0, 0])[0]).toBe(0);
  });

  it('is applied before sampling too (a penalized favourite loses its mass)', () => {
    // Token 0 at logit 5 dominates; a penalty of 100 brings it to 0.05, below the other tokens at 1.
    const c = counts(sample([5, 1, 1], { temperature: 1, repetitionPenalty: 100, seed: 8 }, 5000, [0]), 3);
    expect(c[0]).toBeLessThan(5000 * 0.3);
  });

  it('rejects a context id outside the vocabulary', () => {
    expect(() => sample([1, 2], { temperature: 0, repetitionPenalty: 1.3 }, 1, [2])).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
    );
  });
});

describe('seeding', () => {
  const logits = gaussians(5000, 4);
  const params = { temperature: 1, topK: 200, topP: 0.9, seed: 42 };

  it('the same seed gives the same draws, another seed other draws', () => {
    const a = native.sampleToken(logits, params, NONE, 1000);
    const b = native.sampleToken(logits, params, NONE, 1000);
    const c = native.sampleToken(logits, { ...params, seed: 43 }, NONE, 1000);
    expect(Array.from(a)).toEqual(Array.from(b));
    expect(Array.from(a)).not.toEqual(Array.from(c));
  });

  it('one stream: the first draws of a longer run are the shorter run', () => {
    const short = native.sampleToken(logits, params, NONE, 100);
    const long = native.sampleToken(logits, params, NONE, 300);
    expect(Array.from(long.subarray(0, 100))).toEqual(Array.from(short));
  });

  it('accepts a 64-bit bigint seed', () => {
    const a = native.sampleToken(logits, { ...params, seed: 0xffffffffffffffffn }, NONE, 50);
    const b = native.sampleToken(logits, { ...params, seed: 0xffffffffffffffffn }, NONE, 50);
    expect(Array.from(a)).toEqual(Array.from(b));
  });
});
