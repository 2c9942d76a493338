// NF4 quantization (native/core/nf4.cpp) through the addon, compared bit for bit with the numpy
// reference test/reference/nf4_ref.py on random and adversarial blocks, plus checks that need no
// Python: ties at the bitsandbytes decision-tree thresholds, nearest-level optimality, packing,
// dequantization and the double-quantization error bound.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { native as loadNative } from "../src/engine/native.js";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { referencePython } from "./helpers/python.js";

interface Nf4Result {
  codes: Uint8Array; // (rows*cols) one level index per weight
  packed: Uint8Array; // (rows*cols/2) two indices per byte, first in the high nibble
  absmax: Float32Array; // (nblocks) exact max |w| per block of 64
  absmaxQ: Int8Array; // (nblocks) 8-bit code of absmax - mean
  absmaxDq: Float32Array; // (nblocks) absmax after double quantization
  dequantized: Float32Array; // (rows*cols)
  absmaxMean: number;
  groupScales: Float32Array; // (ceil(nblocks/256))
}
interface NativeCore {
  nf4Quantize(w: Float32Array, rows: number, cols: number): Nf4Result;
}

const native = loadNative() as unknown as NativeCore;

// REFERENCE.md levels, as float32.
const LEVELS = new Float32Array([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
  -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]);
// bitsandbytes' dQuantizeNF4 decision-tree thresholds (csrc/kernels.cu), ascending; as float literals
// they round to float32; x > threshold picks the upper level, so a value exactly on it stays low.
const BNB_THRESHOLDS = [
  -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544, -0.23460740596055984,
  -0.13791173323988914, -0.045525018125772476, 0.03979014977812767, 0.1202552504837513, 0.2035212516784668,
  0.2920137718319893, 0.3893125355243683, 0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
].map(Math.fround);

// ---------------------------------------------------------------------------------------------------
// Inputs

function rng(seed: number): () => number {
  let s = seed | 0;
  return () => {
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t ^= t + Math.imul(t ^ (t >>> 7), 61 | t);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
function normals(n: number, seed: number, scale = 1): Float32Array {
  const rand = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u1 = rand() || 2 ** -32;
    out[i] = scale * Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * rand());
  }
  return out;
}
function uniforms(n: number, seed: number, lo: number, hi: number): Float32Array {
  const rand = rng(seed);
  return Float32Array.from({ length: n }, () => lo + (hi - lo) * rand());
}
/** The float32 neighbour of x toward +inf (up) or -inf (down); x finite and non-zero here. */
function nextFloat32(x: number, up: boolean): number {
  const f = new Float32Array([x]);
  const u = new Int32Array(f.buffer);
  u[0] = (u[0] as number) + ((x > 0) === up ? 1 : -1);
  return f[0] as number;
}

interface Case {
  name: string;
  rows: number;
  cols: number;
  w: Float32Array; // (rows, cols)
}

/** One block of 64 from a generator of its index. */
const block = (f: (j: number) => number): number[] => Array.from({ length: 64 }, (_, j) => f(j));

function midpointBlock(absmax: number): number[] {
  // absmax, then each threshold and both its float32 neighbours, all times absmax; -absmax last.
  const v: number[] = [absmax];
  for (const t of BNB_THRESHOLDS) v.push(t * absmax, nextFloat32(t, false) * absmax, nextFloat32(t, true) * absmax);
  while (v.length < 63) v.push(0);
  v.push(-absmax);
  return v;
}

const adversarialBlocks: Record<string, number[]> = {
  "all equal positive": block(() => 0.3),
  "all equal negative": block(() => -0.3),
  "one outlier": block((j) => (j === 37 ? 100 : 1e-3 * Math.sin(j))),
  "all zeros": block(() => 0),
  "signed zeros": block((j) => (j % 2 ? -0 : 0)),
  "subnormals": block((j) => (j % 3 === 0 ? -1 : 1) * (j + 1) * 1.401298464324817e-45),
  "subnormal and normal": block((j) => (j === 0 ? 1e-38 : j * 1.401298464324817e-45)),
  "negative only": Array.from(uniforms(64, 7, -1, -1e-3)),
  "midpoints, absmax 1": midpointBlock(1),
  "midpoints, absmax 2": midpointBlock(2), // power of two: w / absmax recovers each threshold exactly
  "midpoints, absmax 3": midpointBlock(3), // products round: exercises the division path
  "huge values": block((j) => (j - 31.5) * 1e36),
  "tiny normal values": block((j) => (j - 31.5) * 1e-36),
};

function cases(): Case[] {
  const out: Case[] = [
    // 37 x 512 = 296 blocks: one full double-quantization group and a partial one.
    { name: "normal(0, 0.02)", rows: 37, cols: 512, w: normals(37 * 512, 1, 0.02) },
    { name: "uniform(-1, 1)", rows: 16, cols: 128, w: uniforms(16 * 128, 2, -1, 1) },
    { name: "normal, scale 3e4", rows: 8, cols: 256, w: normals(8 * 256, 3, 3e4) },
    { name: "normal, scale 1e30", rows: 4, cols: 64, w: normals(4 * 64, 4, 1e30) },
    { name: "normal, scale 1e-30", rows: 4, cols: 192, w: normals(4 * 192, 5, 1e-30) },
    { name: "single block", rows: 1, cols: 64, w: normals(64, 6) },
    { name: "same absmax everywhere (scale 0 groups)", rows: 300, cols: 64, w: sameAbsmax(300) },
  ];
  // 600 blocks, each with its own scale 10^U(-6, 3): three groups, mean far from most blocks.
  const rand = rng(8);
  const mixed = normals(600 * 64, 9);
  for (let b = 0; b < 600; b++) {
    const s = 10 ** (rand() * 9 - 6);
    for (let j = 0; j < 64; j++) mixed[b * 64 + j] = (mixed[b * 64 + j] as number) * s;
  }
  out.push({ name: "per-block scales 1e-6..1e3", rows: 75, cols: 512, w: mixed });
  for (const [name, values] of Object.entries(adversarialBlocks)) {
    out.push({ name: `adversarial: ${name}`, rows: 1, cols: 64, w: new Float32Array(values) });
  }
  const all = Object.values(adversarialBlocks).flat();
  out.push({ name: "adversarial blocks together", rows: all.length / 64, cols: 64, w: new Float32Array(all) });
  return out;
}

function sameAbsmax(nblocks: number): Float32Array {
  const w = normals(nblocks * 64, 10, 0.1);
  for (let b = 0; b < nblocks; b++) {
    let m = 0;
    for (let j = 0; j < 64; j++) m = Math.max(m, Math.abs(w[b * 64 + j] as number));
    for (let j = 0; j < 64; j++) w[b * 64 + j] = Math.fround((w[b * 64 + j] as number) / m) * 0.25;
    w[b * 64 + (b % 64)] = b % 2 ? -0.25 : 0.25; // every block's absmax is exactly 0.25
  }
  return w;
}

// ---------------------------------------------------------------------------------------------------
// Helpers

function firstDifference(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return i;
  return -1;
}
function expectIdentical(actual: ArrayLike<number>, expected: ArrayLike<number>, label: string): void {
  const i = firstDifference(actual, expected);
  if (i >= 0) {
    expect.fail(`${label}: first difference at ${i}: got ${actual[i]}, expected ${expected[i]} (lengths ${actual.length}/${expected.length})`);
  }
}

/** Checks that hold for any input, with or without the Python reference. */
function checkInvariants(c: Case, r: Nf4Result): void {
  const nblocks = (c.rows * c.cols) / 64;
  expect(r.codes.length).toBe(c.rows * c.cols);
  expect(r.absmax.length).toBe(nblocks);
  expect(r.groupScales.length).toBe(Math.ceil(nblocks / 256));
  for (let i = 0; i < r.packed.length; i++) {
    if (r.packed[i] !== (((r.codes[2 * i] as number) << 4) | (r.codes[2 * i + 1] as number))) expect.fail(`${c.name}: packed[${i}]`);
  }
  for (let b = 0; b < nblocks; b++) {
    const amax = r.absmax[b] as number;
    const amaxDq = r.absmaxDq[b] as number;
    // Dequantization is exactly level[code] * absmax' in float32 (the product of two float32 values
    // is exact in double, so Math.fround gives the float32 product).
    for (let j = 0; j < 64; j++) {
      const i = b * 64 + j;
      const expected = Math.fround((LEVELS[r.codes[i] as number] as number) * amaxDq);
      if (!Object.is(r.dequantized[i], expected)) expect.fail(`${c.name}: dequantized[${i}] = ${r.dequantized[i]}, expected ${expected}`);
    }
    // Each index is a nearest level to w/absmax (float32 division; double then fround is exact). Ties
    // are decided at float32 midpoints, up to half a float32 ulp (< 3e-8 for |x| <= 1) from the exact
    // ones, so a level may win by that much: 1e-7 of slack.
    if (amax === 0) {
      for (let j = 0; j < 64; j++) expect(r.codes[b * 64 + j]).toBe(7);
      continue;
    }
    for (let j = 0; j < 64; j++) {
      const x = Math.fround((c.w[b * 64 + j] as number) / amax);
      const dist = Math.abs(x - (LEVELS[r.codes[b * 64 + j] as number] as number));
      for (const level of LEVELS) {
        if (Math.abs(x - level) < dist - 1e-7) expect.fail(`${c.name}: w[${b * 64 + j}]/absmax = ${x} has a nearer level ${level}`);
      }
    }
    // Double quantization error: the code step is scale/127, so rounding to the nearest code is off by
    // at most scale/254. Slack for float32 rounding (u = 2^-24 relative per operation): d = absmax - mean
    // (u*scale), 127*d/scale (2 roundings: 2u*scale once scaled back), scale/127 and q*step (2u*scale),
    // mean + q*step (u*(|mean| + scale)): about u*(|mean| + 6*scale) in all, under 8u*(|mean| + scale).
    const scale = r.groupScales[Math.floor(b / 256)] as number;
    const bound = scale / 254 + 2 ** -21 * (Math.abs(r.absmaxMean) + scale);
    if (!(Math.abs(amaxDq - amax) <= bound)) {
      expect.fail(`${c.name}: block ${b}: |absmaxDq - absmax| = ${Math.abs(amaxDq - amax)} > ${bound} (scale ${scale})`);
    }
  }
}

// ---------------------------------------------------------------------------------------------------

describe("NF4 quantization without the Python reference", () => {
  it("uses the bitsandbytes thresholds with a strict >: a value exactly on one takes the lower level", () => {
    const r = native.nf4Quantize(new Float32Array(midpointBlock(1)), 1, 64);
    expect(r.absmax[0]).toBe(1);
    for (let i = 0; i < 15; i++) {
      expect(r.codes[1 + 3 * i], `exactly on threshold ${i}`).toBe(i);
      expect(r.codes[2 + 3 * i], `just below threshold ${i}`).toBe(i);
      expect(r.codes[3 + 3 * i], `just above threshold ${i}`).toBe(i + 1);
    }
    expect(r.codes[0]).toBe(15);
    expect(r.codes[63]).toBe(0);
  });

  it("stores index 7 for all-zero blocks and dequantizes them to 0", () => {
    const w = new Float32Array(128);
    w.set(normals(64, 11), 64);
    const r = native.nf4Quantize(w, 1, 128);
    expect(Array.from(r.codes.subarray(0, 64))).toEqual(new Array(64).fill(7));
    expect(Array.from(r.packed.subarray(0, 32))).toEqual(new Array(32).fill(0x77));
    expect(Array.from(r.dequantized.subarray(0, 64)).every((v) => v === 0)).toBe(true);
  });

  it.each(cases().map((c) => [c.name, c] as const))("keeps its invariants: %s", (_name, c) => {
    checkInvariants(c, native.nf4Quantize(c.w, c.rows, c.cols));
  });

  it("makes double quantization exact when every block has the same absmax", () => {
    const w = sameAbsmax(300);
    const r = native.nf4Quantize(w, 300, 64);
    expect(r.absmaxMean).toBe(0.25);
    expect(Array.from(r.groupScales)).toEqual([0, 0]);
    expect(Array.from(r.absmaxDq).every((v) => v === 0.25)).toBe(true);
  });

  it("refuses bad shapes and non-finite weights", () => {
    const expectCode = (fn: () => unknown, re: RegExp): void => {
      let caught: (Error & { code?: string }) | undefined;
      try {
        fn();
      } catch (e) {
        caught = e as Error & { code?: string };
      }
      expect(caught?.code, caught?.message).toBe("INVALID_ARGUMENT");
      expect(caught?.message).toMatch(re);
    };
    expectCode(() => native.nf4Quantize(new Float32Array(96), 1, 96), /cols a positive multiple of 64/);
    expectCode(() => native.nf4Quantize(new Float32Array(64), 2, 64), /w has 64 elements, rows \* cols = 128/);
    const w = new Float32Array(64);
    w[5] = NaN;
    expectCode(() => native.nf4Quantize(w, 1, 64), /non-finite weight at index 5/);
    w[5] = Infinity;
    expectCode(() => native.nf4Quantize(w, 1, 64), /non-finite weight at index 5/);
  });
});

const python = referencePython();
if (!python) {
  console.warn(
    [
      "",
      "!!! SKIPPING the NF4 comparison with test/reference/nf4_ref.py: /usr/bin/python3 cannot import torch and numpy.",
      "!!! Install Debian's python3-torch (apt-get install -y python3-torch) to run it.",
      "",
    ].join("\n"),
  );
}

describe.skipIf(!python)("NF4 quantization matches the numpy reference bit for bit", () => {
  const all = cases();
  const dir = mkdtempSync(join(tmpdir(), "tuneserve-nf4-"));
  const outputs = new Map<string, { codes: Uint8Array; absmax: Float32Array; q: Int8Array; dq: Float32Array; scales: Float32Array; mean: number }>();
  const f32 = (path: string): Float32Array => {
    const b = readFileSync(path);
    return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  };

  beforeAll(() => {
    const manifest = all.map((c, i) => {
      const input = join(dir, `case${i}.f32`);
      writeFileSync(input, new Uint8Array(c.w.buffer, c.w.byteOffset, c.w.byteLength)); // little-endian host
      return { input, rows: c.rows, cols: c.cols, output: join(dir, `case${i}`) };
    });
    writeFileSync(join(dir, "manifest.json"), JSON.stringify(manifest));
    const script = fileURLToPath(new URL("./reference/nf4_ref.py", import.meta.url));
    execFileSync(python as string, [script, join(dir, "manifest.json")], { timeout: 120_000, stdio: ["ignore", "pipe", "pipe"] });
    all.forEach((c, i) => {
      const p = join(dir, `case${i}`);
      const q = readFileSync(`${p}.absmax_q.i8`);
      outputs.set(c.name, {
        codes: new Uint8Array(readFileSync(`${p}.codes.u8`)),
        absmax: f32(`${p}.absmax.f32`),
        q: new Int8Array(q.buffer.slice(q.byteOffset, q.byteOffset + q.byteLength)),
        dq: f32(`${p}.absmax_dq.f32`),
        scales: f32(`${p}.scales.f32`),
        mean: f32(`${p}.mean.f32`)[0] as number,
      });
    });
  }, 150_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  // Exact equality throughout: both sides do the same IEEE float32 operations in the same order
  // (division, comparisons, a sequential float64 sum), so any difference is a bug, not noise.
  it.each(all.map((c) => [c.name, c] as const))("%s", (_name, c) => {
    const r = native.nf4Quantize(c.w, c.rows, c.cols);
    const ref = outputs.get(c.name)!;
    expectIdentical(r.codes, ref.codes, "codes");
    expectIdentical(r.absmax, ref.absmax, "absmax");
    expect(r.absmaxMean, "absmax mean").toBe(ref.mean);
    expectIdentical(r.groupScales, ref.scales, "group scales");
    expectIdentical(r.absmaxQ, ref.q, "absmax codes");
    expectIdentical(r.absmaxDq, ref.dq, "double-quantized absmax");
  });
});
