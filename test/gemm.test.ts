// The CPU matrix products (native/cpu/gemm*.cpp) through the addon: sgemm in all four transposition
// combinations, odd sizes, padded leading dimensions, alpha/beta, beta = 0 over NaN, the small-M
// (decode) path and shapes that cross every cache-blocking boundary, each compared with a float64
// reference, on every kernel set this CPU can run (AVX-512, AVX2, scalar, and OpenBLAS when it loads);
// then the NF4 products (fused small-M and panel-dequantizing paths) against sgemm and float64 on the
// dequantized matrix.
import { native as loadNative } from "../src/engine/native.js";
import { afterAll, describe, expect, it } from "vitest";

interface Nf4Check {
  y: Float32Array; // (M, N) matmul_nf4_nt
  yRef: Float32Array; // (M, N) sgemm on the dequantized W
  dx: Float32Array; // (M, K) matmul_nf4_nn
  dxRef: Float32Array; // (M, K)
  wDequant: Float32Array; // (N, K)
}
interface NativeKernels {
  sgemm(transA: boolean, transB: boolean, M: number, N: number, K: number, alpha: number, A: Float32Array, lda: number,
    B: Float32Array, ldb: number, beta: number, C: Float32Array, ldc: number): void;
  nf4MatmulCheck(w: Float32Array, N: number, K: number, x: Float32Array, M: number, dy?: Float32Array): Nf4Check;
  gemmKernelName(): string;
  setGemmKernel(name: string): boolean;
  setThreads(n: number): void;
  numThreads(): number;
}

const native = loadNative() as unknown as NativeKernels;

// Deterministic uniform [-1, 1) floats (mulberry32).
function random(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = ((t ^ (t >>> 14)) >>> 0) / 2 ** 31 - 1;
  }
  return out;
}

// float32 unit roundoff.
const U = 2 ** -24;

interface Case {
  ta: boolean;
  tb: boolean;
  M: number;
  N: number;
  K: number;
  alpha: number;
  beta: number;
  pad?: number; // extra elements per row in lda, ldb, ldc
}

// Runs sgemm on random operands and returns the worst error relative to its bound, which must be <= 1.
// Tolerance: each float32 output is alpha·Σ_k a·b (K products summed in some order, then scaled) plus
// beta·C; the standard bound for a float32 dot product of length K in any summation order is
// γ_K·Σ|a·b| with γ_K ≈ K·u, u = 2⁻²⁴, plus a few roundings for alpha, beta and the final add. So the
// bound is (K + 4)·u·(|alpha|·Σ|a·b| + |beta·C|) (the float64 reference's own error is ~2⁻⁵³K, negligible).
// It also checks that padding between rows of C (ldc > N) is untouched.
function runCase(c: Case, seed: number): number {
  const pad = c.pad ?? 0;
  const [aRows, aCols] = c.ta ? [c.K, c.M] : [c.M, c.K];
  const [bRows, bCols] = c.tb ? [c.N, c.K] : [c.K, c.N];
  const lda = aCols + pad, ldb = bCols + pad, ldc = c.N + pad;
  const A = random(Math.max(1, aRows * lda), seed);
  const B = random(Math.max(1, bRows * ldb), seed + 1);
  const C0 = random(Math.max(1, c.M * ldc), seed + 2);
  const C = C0.slice();
  if (c.beta === 0) for (let i = 0; i < c.M; i++) C.fill(NaN, i * ldc, i * ldc + c.N); // must not be read
  native.sgemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, A, Math.max(1, lda), B, Math.max(1, ldb), c.beta, C, Math.max(1, ldc));
  let worst = 0;
  for (let i = 0; i < c.M; i++) {
    for (let j = 0; j < c.N; j++) {
      let sum = 0, abs = 0;
      for (let k = 0; k < c.K; k++) {
        const a = c.ta ? A[k * lda + i]! : A[i * lda + k]!;
        const b = c.tb ? B[j * ldb + k]! : B[k * ldb + j]!;
        sum += a * b;
        abs += Math.abs(a * b);
      }
      const old = c.beta === 0 ? 0 : c.beta * C0[i * ldc + j]!;
      const ref = c.alpha * sum + old;
      const bound = (c.K + 4) * U * (Math.abs(c.alpha) * abs + Math.abs(old)) + 1e-30;
      const got = C[i * ldc + j]!;
      const err = Number.isFinite(got) ? Math.abs(got - ref) / bound : Infinity;
      worst = Math.max(worst, err);
    }
    for (let j = c.N; j < ldc; j++) if (C[i * ldc + j] !== C0[i * ldc + j]) worst = Infinity; // padding written
  }
  return worst;
}

const TRANS: [boolean, boolean][] = [[false, false], [false, true], [true, false], [true, true]];
const kernelSets = ["avx512", "avx2", "scalar", "openblas"].filter((name) => native.setGemmKernel(name));
native.setGemmKernel("auto");
afterAll(() => {
  native.setGemmKernel("auto");
  native.setThreads(0);
});

describe("thread pool", () => {
  it("resizes and reports its size", () => {
    const initial = native.numThreads();
    expect(initial).toBeGreaterThanOrEqual(1);
    native.setThreads(3);
    expect(native.numThreads()).toBe(3);
    native.setThreads(0);
    expect(native.numThreads()).toBe(initial);
  });
});

describe("sgemm argument checks", () => {
  it("rejects views larger than their arrays and short leading dimensions", () => {
    const small = new Float32Array(4);
    const C = new Float32Array(4);
    expect(() => native.sgemm(false, false, 2, 2, 3, 1, small, 3, small, 2, 0, C, 2)).toThrow(/elements/);
    expect(() => native.sgemm(false, false, 2, 2, 2, 1, small, 1, small, 2, 0, C, 2)).toThrow(/leading dimension/);
    try {
      native.sgemm(false, false, 2, 2, 2, 1, small, 2, small, 2, 0, C, 1);
    } catch (e) {
      expect((e as { code?: string }).code).toBe("INVALID_ARGUMENT");
    }
  });
});

describe.each(kernelSets)("sgemm on the %s kernels", (set) => {
  const use = () => expect(native.setGemmKernel(set)).toBe(true);

  it("matches float64 for all transpositions over odd sizes", () => {
    use();
    const sizes = [1, 7, 33, 65];
    let seed = 1;
    for (const [ta, tb] of TRANS)
      for (const M of sizes)
        for (const N of sizes)
          for (const K of sizes) {
            const err = runCase({ ta, tb, M, N, K, alpha: 1, beta: 0 }, seed++);
            expect(err, `ta=${ta} tb=${tb} M=${M} N=${N} K=${K}`).toBeLessThanOrEqual(1);
          }
  });

  it("handles alpha, beta, padded leading dimensions and beta = 0 over NaN", () => {
    use();
    const cases: Case[] = [];
    for (const [ta, tb] of TRANS) {
      cases.push({ ta, tb, M: 17, N: 257, K: 33, alpha: -0.5, beta: 1, pad: 3 });
      cases.push({ ta, tb, M: 257, N: 7, K: 65, alpha: 2, beta: 0.25, pad: 5 });
      cases.push({ ta, tb, M: 33, N: 65, K: 257, alpha: 1, beta: 0, pad: 1 });
      cases.push({ ta, tb, M: 3, N: 129, K: 40, alpha: 1.5, beta: -1, pad: 2 }); // small-M path
    }
    let seed = 100;
    for (const c of cases) expect(runCase(c, seed++), JSON.stringify(c)).toBeLessThanOrEqual(1);
  });

  it("takes the small-M path (M <= 8, decode) for either layout of B, and the blocked one just above", () => {
    use();
    let seed = 200;
    for (const [ta, tb] of TRANS)
      for (const M of [1, 2, 3, 5, 8, 9])
        for (const [N, K] of [[1, 1], [300, 257], [1000, 64]] as const) {
          const c = { ta, tb, M, N, K, alpha: 1, beta: M % 2 ? 0 : 0.5 };
          expect(runCase(c, seed++), JSON.stringify(c)).toBeLessThanOrEqual(1);
        }
  });

  it("crosses the cache-blocking boundaries (K > KC, M > MC, N > NC)", () => {
    use();
    // KC = 256 (beta must apply on the first K panel only), MC = 336 / 144, NC = 4096 / 2048.
    const cases: Case[] = [
      { ta: false, tb: true, M: 20, N: 33, K: 600, alpha: 1, beta: 0.5 },
      { ta: true, tb: false, M: 350, N: 40, K: 9, alpha: 1, beta: 0 },
      { ta: false, tb: false, M: 6, N: 4200, K: 5, alpha: 1, beta: 1 },
      { ta: true, tb: true, M: 31, N: 2100, K: 3, alpha: -1, beta: 0 },
    ];
    let seed = 300;
    for (const c of cases) expect(runCase(c, seed++), JSON.stringify(c)).toBeLessThanOrEqual(1);
  });

  it("gives the same answers on 1 and 3 threads (other partitions of C)", () => {
    use();
    try {
      for (const threads of [1, 3]) {
        native.setThreads(threads);
        let seed = 400;
        for (const [ta, tb] of TRANS)
          expect(runCase({ ta, tb, M: 67, N: 130, K: 70, alpha: 1, beta: 0.5, pad: 1 }, seed++)).toBeLessThanOrEqual(1);
      }
    } finally {
      native.setThreads(0);
    }
  });

  it("K = 0 or alpha = 0 scales C by beta, and beta = 0 clears NaN", () => {
    use();
    const A = new Float32Array(16).fill(NaN), B = new Float32Array(16).fill(NaN);
    const C = new Float32Array([1, 2, 3, 4]);
    native.sgemm(false, false, 2, 2, 0, 1, A, 1, B, 2, 2, C, 2);
    expect(Array.from(C)).toEqual([2, 4, 6, 8]);
    C.fill(NaN);
    native.sgemm(false, false, 2, 2, 0, 1, A, 1, B, 2, 0, C, 2);
    expect(Array.from(C)).toEqual([0, 0, 0, 0]);
  });
});

describe("NF4 matmul against sgemm on the dequantized weight", () => {
  // y and yRef compute the same products of float32 numbers (x, level·absmax) in different orders (the
  // fused path also factors absmax out of each 64-block sum), so each is within (K + 4)·u·Σ|x·w| of the
  // exact value and they differ by at most twice that. The float64 check of yRef ties both to the math.
  function check(M: number, N: number, K: number, seed: number) {
    const w = random(N * K, seed).map((v, i) => v * (1 + (i % 97) / 10)); // blocks of differing absmax
    const x = random(M * K, seed + 1);
    const dy = random(M * N, seed + 2);
    const r = native.nf4MatmulCheck(w, N, K, x, M, dy);
    let worst = 0;
    for (let m = 0; m < M; m++)
      for (let n = 0; n < N; n++) {
        let sum = 0, abs = 0;
        for (let k = 0; k < K; k++) {
          const p = x[m * K + k]! * r.wDequant[n * K + k]!;
          sum += p;
          abs += Math.abs(p);
        }
        const bound = (K + 4) * U * abs + 1e-30;
        const got = r.y[m * N + n]!, ref = r.yRef[m * N + n]!;
        worst = Math.max(worst, Math.abs(ref - sum) / bound, Math.abs(got - ref) / (2 * bound));
        if (!Number.isFinite(got)) worst = Infinity;
      }
    for (let m = 0; m < M; m++)
      for (let k = 0; k < K; k++) {
        let sum = 0, abs = 0;
        for (let n = 0; n < N; n++) {
          const p = dy[m * N + n]! * r.wDequant[n * K + k]!;
          sum += p;
          abs += Math.abs(p);
        }
        const bound = (N + 4) * U * abs + 1e-30;
        const got = r.dx[m * K + k]!, ref = r.dxRef[m * K + k]!;
        worst = Math.max(worst, Math.abs(ref - sum) / bound, Math.abs(got - ref) / (2 * bound));
        if (!Number.isFinite(got)) worst = Infinity;
      }
    return worst;
  }

  const ownSets = kernelSets.filter((s) => s !== "openblas");
  it.each(ownSets)("fused small-M and panel paths agree on the %s kernels", (set) => {
    expect(native.setGemmKernel(set)).toBe(true);
    // K = 192 ends in half of a 128-weight AVX-512 lane group. Fused paths: x·Wᵀ for M <= 12, dy·W for
    // M <= 4; above them (and M = 37) the dequantizing panel path.
    for (const [M, N, K] of [[1, 96, 192], [1, 3, 64], [4, 33, 256], [5, 40, 128], [12, 40, 192], [13, 40, 128], [37, 70, 320]] as const)
      expect(check(M, N, K, M * 1000 + N), `M=${M} N=${N} K=${K}`).toBeLessThanOrEqual(1);
  });

  it("rejects K that is not a multiple of 64", () => {
    expect(() => native.nf4MatmulCheck(new Float32Array(60), 1, 60, new Float32Array(60), 1)).toThrow(/multiple of 64/);
  });
});
