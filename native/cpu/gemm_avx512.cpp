// AVX-512 kernels of the CPU matrix products (AVX-512F/DQ/BW/VL + FMA): the 14x32 micro-kernel and its
// packing routines for the blocked sgemm, the small-M (decode) float path, and the fused NF4 paths.
// Compiled with per-function target attributes (no -march), picked at run time by gemm.cpp.
#include <immintrin.h>

// GCC 12 reports the self-initialized _mm512_undefined_* inside its own intrinsics headers as
// "(maybe) uninitialized" once they are inlined here; the warning is a known false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include <cstring>

#define TS_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#include "cpu/gemm_blocked.h"

namespace ts::cpu::detail {
namespace {

// In-place transpose of a 16x16 block held as 16 row vectors: afterwards r[c] is column c.
TS_TARGET inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // per 128-bit lane: r_i0 r_{i+1}0 r_i1 r_{i+1}1
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  //                    r_i2 r_{i+1}2 r_i3 r_{i+1}3
  }
  for (int i = 0; i < 16; i += 4) {  // rows i..i+3 of columns {c, c+4, c+8, c+12} in the 4 lanes
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);      // column 0 (+4, +8, +12)
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);  // column 1
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 2; h++) {  // h = 0: rows 0..7, h = 1: rows 8..15
    const int i = 8 * h;
    for (int c = 0; c < 4; c++) {
      t[i + c] = _mm512_shuffle_f32x4(r[i + c], r[i + 4 + c], 0x88);      // columns c, c+8
      t[i + 4 + c] = _mm512_shuffle_f32x4(r[i + c], r[i + 4 + c], 0xDD);  // columns c+4, c+12
    }
  }
  for (int c = 0; c < 8; c++) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xDD);
  }
}

TS_TARGET inline __mmask16 first_lanes(int n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

TS_TARGET inline __m512 nf4_lut() { return _mm512_loadu_ps(NF4_LEVELS); }

// 16 dequantized weights in natural order from 8 code bytes (high nibble first): each byte is doubled,
// widened to two lanes and shifted by 4 / 0, and vpermps reads only the low 4 bits of the index.
TS_TARGET inline __m512 nf4_decode16(const uint8_t* codes, __m512 lut, __m512 absmax) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  const __m512i lanes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
  const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  return _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srlv_epi32(lanes, shifts), lut), absmax);
}

struct Tile14x32 {
  static constexpr int MR = 14, NR = 32;
  // The A sliver MR x KC = 14 KiB stays in L1 (48 KiB) while the B panel KC x NC = 1 MiB streams past
  // it from L2 (2 MiB); see bench/kernels/README.md for the blockings and loop orders measured.
  static constexpr int64_t KC = 256, MC = 336, NC = 1024;
  static constexpr bool A_RESIDENT = true;

  // C[0:mv, 0:nv] = alpha * Σ_k a[k,:]ᵀ b[k,:] + beta * C (beta == 0: C not read), computing only the
  // first ROWS (>= mv) rows of the tile, and only its first 16 columns when !WIDE (nv <= 16): a short
  // last tile (M = 8 when MR = 14, a LoRA rank of 16) costs only what it has.
  // a: (kc, 14) packed, b: (kc, 32) packed and 64-byte aligned. Full tile: 28 accumulators + 2 B vectors.
  template <int ROWS, bool WIDE>
  TS_TARGET static void kernel_tile(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                                    float beta, int mv, int nv) {
    // The C tile (rows ldc apart) is touched only after the k loop: start fetching it now.
    for (int r = 0; r < mv; r++) {
      __builtin_prefetch(c + r * ldc, 1, 3);
      __builtin_prefetch(c + r * ldc + nv - 1, 1, 3);
    }
    __m512 c0[ROWS], c1[ROWS];
#pragma GCC unroll 14
    for (int r = 0; r < ROWS; r++) c0[r] = c1[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
      const __m512 b0 = _mm512_load_ps(b), b1 = WIDE ? _mm512_load_ps(b + 16) : b0;
#pragma GCC unroll 14
      for (int r = 0; r < ROWS; r++) {
        const __m512 av = _mm512_set1_ps(a[r]);
        c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
        if (WIDE) c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
      }
      a += MR;
      b += NR;
    }
    const __mmask16 m0 = first_lanes(nv), m1 = first_lanes(nv - 16 > 0 ? nv - 16 : 0);
    const __m512 va = _mm512_set1_ps(alpha);
    if (beta == 0.f) {
#pragma GCC unroll 14
      for (int r = 0; r < ROWS; r++) {
        if (r >= mv) break;
        _mm512_mask_storeu_ps(c + r * ldc, m0, _mm512_mul_ps(c0[r], va));
        if (WIDE) _mm512_mask_storeu_ps(c + r * ldc + 16, m1, _mm512_mul_ps(c1[r], va));
      }
    } else {
      const __m512 vb = _mm512_set1_ps(beta);
#pragma GCC unroll 14
      for (int r = 0; r < ROWS; r++) {
        if (r >= mv) break;
        float* cr = c + r * ldc;
        const __m512 old0 = _mm512_maskz_loadu_ps(m0, cr);
        _mm512_mask_storeu_ps(cr, m0, _mm512_fmadd_ps(c0[r], va, _mm512_mul_ps(old0, vb)));
        if (WIDE) {
          const __m512 old1 = _mm512_maskz_loadu_ps(m1, cr + 16);
          _mm512_mask_storeu_ps(cr + 16, m1, _mm512_fmadd_ps(c1[r], va, _mm512_mul_ps(old1, vb)));
        }
      }
    }
  }

  template <bool WIDE>
  TS_TARGET static void kernel_rows(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                                    float beta, int mv, int nv) {
    switch ((mv + 1) / 2) {
      case 7: kernel_tile<14, WIDE>(kc, a, b, c, ldc, alpha, beta, mv, nv); break;
      case 6: kernel_tile<12, WIDE>(kc, a, b, c, ldc, alpha, beta, mv, nv); break;
      case 5: kernel_tile<10, WIDE>(kc, a, b, c, ldc, alpha, beta, mv, nv); break;
      case 4: kernel_tile<8, WIDE>(kc, a, b, c, ldc, alpha, beta, mv, nv); break;
      case 3: kernel_tile<6, WIDE>(kc, a, b, c, ldc, alpha, beta, mv, nv); break;
      case 2: kernel_tile<4, WIDE>(kc, a, b, c, ldc, alpha, beta, mv, nv); break;
      default: kernel_tile<2, WIDE>(kc, a, b, c, ldc, alpha, beta, mv, nv); break;
    }
  }

  TS_TARGET static void kernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                               float beta, int mv, int nv) {
    if (nv > 16) kernel_rows<true>(kc, a, b, c, ldc, alpha, beta, mv, nv);
    else kernel_rows<false>(kc, a, b, c, ldc, alpha, beta, mv, nv);
  }

  // dst[k*14 + r] = op(A)(i + r, k0 + k), zero rows past mv.
  TS_TARGET static void pack_a(const Operand& a, int64_t i, int mv, int64_t k0, int64_t kc, float* dst) {
    const __mmask16 rows = first_lanes(mv);
    if (a.trans) {  // op(A)(i+r, k) = A[k, i+r]: 14 contiguous floats per k
      const float* src = a.data + k0 * a.ld + i;
      for (int64_t k = 0; k < kc; k++)
        _mm512_mask_storeu_ps(dst + k * MR, 0x3FFF, _mm512_maskz_loadu_ps(rows, src + k * a.ld));
      return;
    }
    // rows of A run along k: transpose 16-wide k strips of up to 14 rows
    const float* src = a.data + i * a.ld + k0;
    for (int64_t k = 0; k < kc; k += 16) {
      const __mmask16 cols = first_lanes(int(kc - k));
      __m512 r[16];
      for (int q = 0; q < 16; q++) r[q] = q < mv ? _mm512_maskz_loadu_ps(cols, src + q * a.ld + k) : _mm512_setzero_ps();
      transpose16(r);
      const int n = kc - k < 16 ? int(kc - k) : 16;
      for (int t = 0; t < n; t++) _mm512_mask_storeu_ps(dst + (k + t) * MR, 0x3FFF, r[t]);
    }
  }

  // dst[k*32 + c] = op(B)(k0 + k, j + c), zero columns past nv. dst is 64-byte aligned.
  TS_TARGET static void pack_b(const GemmProblem& p, int64_t k0, int64_t kc, int64_t j, int nv, float* dst) {
    if (p.b_nf4) {
      const NF4View& w = *p.b_nf4;
      const __m512 lut = nf4_lut();
      if (p.b_nf4_trans && kc % NF4_BLOCK == 0 && k0 % NF4_BLOCK == 0) {
        // op(B)(k, j+c) = W[j+c, k]: decode 16 weights of each of 32 rows (one absmax each: 16 | 64),
        // transpose into k-major order. The rows' absmax values for this K panel first: (32, KC/64).
        float amax[NR][KC / NF4_BLOCK];
        for (int c = 0; c < nv; c++) {
          Nf4Absmax absmax(w);
          const int64_t b0 = ((j + c) * w.cols + k0) / NF4_BLOCK;
          for (int64_t i = 0; i < kc / NF4_BLOCK; i++) amax[c][i] = absmax(b0 + i);
        }
        for (int64_t k = 0; k < kc; k += 16) {
          for (int half = 0; half < 2; half++) {
            __m512 r[16];
            for (int q = 0; q < 16; q++) {
              const int c = 16 * half + q;
              if (c < nv) {
                const int64_t e = (j + c) * w.cols + k0 + k;
                r[q] = nf4_decode16(w.codes + e / 2, lut, _mm512_set1_ps(amax[c][k / NF4_BLOCK]));
              } else {
                r[q] = _mm512_setzero_ps();
              }
            }
            transpose16(r);
            for (int t = 0; t < 16; t++) _mm512_store_ps(dst + (k + t) * NR + 16 * half, r[t]);
          }
        }
        return;
      }
      if (!p.b_nf4_trans && nv == NR && j % 32 == 0) {
        // op(B)(k, j+c) = W[k, j+c]: 32 consecutive weights of one row, one block (32 | 64)
        Nf4Absmax absmax(w);
        for (int64_t k = 0; k < kc; k++) {
          const int64_t e = (k0 + k) * w.cols + j;
          const __m512 amax = _mm512_set1_ps(absmax(e / NF4_BLOCK));
          _mm512_store_ps(dst + k * NR, nf4_decode16(w.codes + e / 2, lut, amax));
          _mm512_store_ps(dst + k * NR + 16, nf4_decode16(w.codes + e / 2 + 8, lut, amax));
        }
        return;
      }
      pack_b_generic<NR>(p, k0, kc, j, nv, dst);  // unaligned partition edges (not produced by gemm.cpp)
      return;
    }
    const Operand& b = p.b;
    if (!b.trans) {  // rows of op(B) are rows of B: copy 32 floats per k
      const __mmask16 m0 = first_lanes(nv), m1 = first_lanes(nv - 16 > 0 ? nv - 16 : 0);
      const float* src = b.data + k0 * b.ld + j;
      for (int64_t k = 0; k < kc; k++) {
        _mm512_store_ps(dst + k * NR, _mm512_maskz_loadu_ps(m0, src + k * b.ld));
        _mm512_store_ps(dst + k * NR + 16, _mm512_maskz_loadu_ps(m1, src + k * b.ld + 16));
      }
      return;
    }
    // op(B)(k, j+c) = B[j+c, k]: transpose 16x16 blocks of the 32 rows
    const float* src = b.data + j * b.ld + k0;
    for (int64_t k = 0; k < kc; k += 16) {
      const __mmask16 cols = first_lanes(int(kc - k));
      const int n = kc - k < 16 ? int(kc - k) : 16;
      for (int half = 0; half < 2; half++) {
        __m512 r[16];
        for (int q = 0; q < 16; q++) {
          const int c = 16 * half + q;
          r[q] = c < nv ? _mm512_maskz_loadu_ps(cols, src + c * b.ld + k) : _mm512_setzero_ps();
        }
        transpose16(r);
        for (int t = 0; t < n; t++) _mm512_store_ps(dst + (k + t) * NR + 16 * half, r[t]);
      }
    }
  }
};

// ---- small M (decode, small batches) with float B; op(A) = x, rows at x + m*ldx. No packing: B is
// streamed from memory once, a few of its rows (or a 64-column strip) at a time, and every chunk of up to
// 6 x rows passes over that piece while it is in L1/L2. ----

// Lane q of the result = the sum of the 16 lanes of v[q].
TS_TARGET inline __m128 reduce4(const __m512 v[4]) {
  __m256 h[4];
  for (int q = 0; q < 4; q++) h[q] = _mm256_add_ps(_mm512_castps512_ps256(v[q]), _mm512_extractf32x8_ps(v[q], 1));
  const __m256 h01 = _mm256_hadd_ps(h[0], h[1]), h23 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 sum = _mm256_hadd_ps(h01, h23);  // per 128-bit half: the 4 partial sums
  return _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
}

// C[m, j+q] (m < MB, q < rows) = alpha * x[m,:]·B[j+q,:] + beta * C, with br[q] = row j+q of B [N, K].
template <int MB>
TS_TARGET void dot_tile(const GemmProblem& p, const float* x, int64_t ldx, const float* const br[4], float* c,
                        int rows) {
  const int64_t K = p.K;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; m++)
    for (int q = 0; q < 4; q++) acc[m][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = first_lanes(int(K - k < 16 ? K - k : 16));
    __m512 bv[4];
    for (int q = 0; q < 4; q++) bv[q] = _mm512_maskz_loadu_ps(mk, br[q] + k);
    for (int m = 0; m < MB; m++) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * ldx + k);
      for (int q = 0; q < 4; q++) acc[m][q] = _mm512_fmadd_ps(xv, bv[q], acc[m][q]);
    }
  }
  const __mmask8 mq = __mmask8((1u << rows) - 1);
  for (int m = 0; m < MB; m++) {
    float* out = c + m * p.ldc;
    __m128 r = _mm_mul_ps(reduce4(acc[m]), _mm_set1_ps(p.alpha));
    if (p.beta != 0.f) r = _mm_add_ps(r, _mm_mul_ps(_mm_maskz_loadu_ps(mq, out), _mm_set1_ps(p.beta)));
    _mm_mask_storeu_ps(out, mq, r);
  }
}

// C[m, j:j+64] (m < MB) = alpha * Σ_k x[m,k] B[k, j:j+64] + beta * C over the columns `mj` selects.
template <int MB>
TS_TARGET void axpy_tile(const GemmProblem& p, const float* x, int64_t ldx, int64_t j, const __mmask16 mj[4],
                         float* c) {
  const int64_t K = p.K, ldb = p.b.ld;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; m++)
    for (int v = 0; v < 4; v++) acc[m][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    const float* row = p.b.data + k * ldb + j;
    _mm_prefetch(reinterpret_cast<const char*>(row + 8 * ldb), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row + 8 * ldb + 32), _MM_HINT_T0);
    __m512 bv[4];
    for (int v = 0; v < 4; v++) bv[v] = _mm512_maskz_loadu_ps(mj[v], row + 16 * v);
    for (int m = 0; m < MB; m++) {
      const __m512 xs = _mm512_set1_ps(x[m * ldx + k]);
      for (int v = 0; v < 4; v++) acc[m][v] = _mm512_fmadd_ps(xs, bv[v], acc[m][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(p.alpha), vb = _mm512_set1_ps(p.beta);
  for (int m = 0; m < MB; m++)
    for (int v = 0; v < 4; v++) {
      float* out = c + m * p.ldc + 16 * v;
      __m512 r = _mm512_mul_ps(acc[m][v], va);
      if (p.beta != 0.f) r = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mj[v], out), vb, r);
      _mm512_mask_storeu_ps(out, mj[v], r);
    }
}

#define TS_SMALL_M_DISPATCH(fn, mb, ...)    \
  switch (mb) {                             \
    case 1: fn<1>(__VA_ARGS__); break;      \
    case 2: fn<2>(__VA_ARGS__); break;      \
    case 3: fn<3>(__VA_ARGS__); break;      \
    case 4: fn<4>(__VA_ARGS__); break;      \
    case 5: fn<5>(__VA_ARGS__); break;      \
    default: fn<6>(__VA_ARGS__); break;     \
  }

TS_TARGET void gemm_small_m(const GemmProblem& p, int64_t j0, int64_t j1) {
  const float* x = p.a.data;
  const int64_t ldx = p.a.ld;
  if (p.b.trans) {  // B is [N, K]: four of its rows at a time
    for (int64_t j = j0; j < j1; j += 4) {
      const int rows = j1 - j < 4 ? int(j1 - j) : 4;
      const float* br[4];
      for (int q = 0; q < 4; q++) br[q] = p.b.data + (q < rows ? j + q : j) * p.b.ld;
      for (int64_t m0 = 0; m0 < p.M; m0 += 6) {
        const int mb = p.M - m0 < 6 ? int(p.M - m0) : 6;
        TS_SMALL_M_DISPATCH(dot_tile, mb, p, x + m0 * ldx, ldx, br, p.c + m0 * p.ldc + j, rows)
      }
    }
    return;
  }
  for (int64_t j = j0; j < j1; j += 64) {  // B is [K, N]: a 64-column strip at a time
    __mmask16 mj[4];
    for (int v = 0; v < 4; v++) {
      const int64_t left = j1 - j - 16 * v;
      mj[v] = first_lanes(left > 0 ? int(left < 16 ? left : 16) : 0);
    }
    for (int64_t m0 = 0; m0 < p.M; m0 += 6) {
      const int mb = p.M - m0 < 6 ? int(p.M - m0) : 6;
      TS_SMALL_M_DISPATCH(axpy_tile, mb, p, x + m0 * ldx, ldx, j, mj, p.c + m0 * p.ldc + j)
    }
  }
}

#undef TS_SMALL_M_DISPATCH

// ---- fused NF4 (small M). A lane group is 64 code bytes = 128 weights = two absmax blocks: lanes 0..7
// belong to the first block, lanes 8..15 to the second (see gemm_kernels.h for the slot order). ----

// Group g of a row whose codes start at `codes` and whose first block is b0: the 16 code dwords (the
// upper 8 zero for a half group, when the row ends 64 weights into it) and the per-lane absmax vector.
TS_TARGET inline __m512i nf4_group(const uint8_t* codes, int64_t b0, int64_t g, bool half, Nf4Absmax& absmax,
                                   __m512* scale) {
  const __m512 a0 = _mm512_set1_ps(absmax(b0 + 2 * g));
  if (half) {
    *scale = a0;
    return _mm512_maskz_loadu_epi32(0x00FF, codes + 64 * g);
  }
  *scale = _mm512_mask_broadcastss_ps(a0, 0xFF00, _mm_set_ss(absmax(b0 + 2 * g + 1)));
  return _mm512_loadu_si512(codes + 64 * g);
}

// y[m, n] for MB rows of xp (slot order, (MB, Kp) at xp + m*Kp): per group, the 8 level vectors are
// decoded once and dotted with each x row; the absmax is applied to the group's partial sum.
template <int MB>
TS_TARGET void nf4_nt_rows(float* y, int64_t ldy, const float* xp, int64_t Kp, const NF4View& w, float beta,
                           int64_t n0, int64_t n1) {
  const __m512 lut = nf4_lut();
  const int64_t K = w.cols, groups = (K + 127) / 128;
  Nf4Absmax absmax(w);
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* codes = w.codes + n * (K / 2);
    const int64_t b0 = n * (K / NF4_BLOCK);
    __m512 acc[MB];
    for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
      __m512 scale;
      const __m512i group = nf4_group(codes, b0, g, K - 128 * g < 128, absmax, &scale);
      __m512 level[8];
      for (int s = 0; s < 8; s++)
        level[s] = _mm512_permutexvar_ps(_mm512_srli_epi32(group, 4 * s), lut);  // slot s*16 + d
      for (int m = 0; m < MB; m++) {
        const float* xg = xp + m * Kp + g * 128;
        __m512 t0 = _mm512_mul_ps(level[0], _mm512_loadu_ps(xg));
        __m512 t1 = _mm512_mul_ps(level[1], _mm512_loadu_ps(xg + 16));
        for (int s = 2; s < 8; s += 2) {
          t0 = _mm512_fmadd_ps(level[s], _mm512_loadu_ps(xg + 16 * s), t0);
          t1 = _mm512_fmadd_ps(level[s + 1], _mm512_loadu_ps(xg + 16 * s + 16), t1);
        }
        acc[m] = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), scale, acc[m]);
      }
    }
    for (int m = 0; m < MB; m++) {
      float* out = y + m * ldy + n;
      const float s = _mm512_reduce_add_ps(acc[m]);
      *out = beta == 0.f ? s : s + beta * *out;
    }
  }
}

TS_TARGET void nf4_nt_small(float* y, int64_t ldy, const float* xp, int64_t Kp, const NF4View& w, int64_t M,
                            float beta, int64_t n0, int64_t n1) {
  // Rows of W in chunks that stay in L1 while every 4-row slice of x passes over them.
  const int64_t chunk = w.cols >= 8192 ? 4 : 16;
  for (int64_t nc = n0; nc < n1; nc += chunk) {
    const int64_t ne = nc + chunk < n1 ? nc + chunk : n1;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mb = M - m0 < 4 ? int(M - m0) : 4;
      float* ym = y + m0 * ldy;
      const float* xm = xp + m0 * Kp;
      switch (mb) {
        case 1: nf4_nt_rows<1>(ym, ldy, xm, Kp, w, beta, nc, ne); break;
        case 2: nf4_nt_rows<2>(ym, ldy, xm, Kp, w, beta, nc, ne); break;
        case 3: nf4_nt_rows<3>(ym, ldy, xm, Kp, w, beta, nc, ne); break;
        default: nf4_nt_rows<4>(ym, ldy, xm, Kp, w, beta, nc, ne); break;
      }
    }
  }
}

// dxp[m, slots of groups g0..g1) = Σ_n dy[m, n] W[n, :] in slot order; rows of W streamed two at a time
// so each accumulator load/store carries two FMAs.
TS_TARGET void nf4_nn_small(float* dxp, int64_t ldp, const float* dy, const NF4View& w, int64_t M, int64_t g0,
                            int64_t g1) {
  const __m512 lut = nf4_lut();
  const int64_t N = w.rows, K = w.cols;
  Nf4Absmax absmax0(w), absmax1(w);
  for (int64_t m = 0; m < M; m++) std::memset(dxp + m * ldp + g0 * 128, 0, size_t(g1 - g0) * 128 * sizeof(float));
  for (int64_t n = 0; n < N; n += 2) {
    const bool pair = n + 1 < N;
    const uint8_t* row0 = w.codes + n * (K / 2);
    const int64_t b0 = n * (K / NF4_BLOCK);
    for (int64_t g = g0; g < g1; g++) {
      const bool half = K - 128 * g < 128;
      __m512 amax0, amax1 = _mm512_setzero_ps();
      const __m512i codes0 = nf4_group(row0, b0, g, half, absmax0, &amax0);
      const __m512i codes1 =
          pair ? nf4_group(row0 + K / 2, b0 + K / NF4_BLOCK, g, half, absmax1, &amax1) : _mm512_setzero_si512();
      for (int64_t m = 0; m < M; m++) {
        const __m512 s0 = _mm512_mul_ps(amax0, _mm512_set1_ps(dy[m * N + n]));
        const __m512 s1 = pair ? _mm512_mul_ps(amax1, _mm512_set1_ps(dy[m * N + n + 1])) : _mm512_setzero_ps();
        float* acc = dxp + m * ldp + g * 128;
        for (int s = 0; s < 8; s++) {
          __m512 v = _mm512_load_ps(acc + 16 * s);
          v = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes0, 4 * s), lut), s0, v);
          v = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes1, 4 * s), lut), s1, v);
          _mm512_store_ps(acc + 16 * s, v);
        }
      }
    }
  }
}

const KernelSet AVX512_SET = {
    "avx512", 16, Tile14x32::MR, Tile14x32::NR, int(Tile14x32::NC), gemm_block_t<Tile14x32>, gemm_small_m, nf4_nt_small, nf4_nn_small,
};

}  // namespace

const KernelSet* kernels_avx512() { return &AVX512_SET; }

}  // namespace ts::cpu::detail
