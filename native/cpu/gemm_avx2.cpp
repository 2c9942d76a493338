// AVX2+FMA kernels of the CPU matrix products: the 6x16 micro-kernel and packing for the blocked sgemm,
// the small-M (decode) float path and the fused NF4 paths. The baseline for x86-64 CPUs without
// AVX-512; compiled with per-function target attributes and picked at run time by gemm.cpp.
#include <immintrin.h>

#include <cstring>

#define TS_TARGET __attribute__((target("avx2,fma")))
#include "cpu/gemm_blocked.h"

namespace ts::cpu::detail {
namespace {

// In-place transpose of an 8x8 block held as 8 row vectors: afterwards r[c] is column c.
TS_TARGET inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int c = 0; c < 4; c++) {
    r[c] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x31);
  }
}

// Lane mask for the first n (0..8) of 8 floats, for maskload / maskstore.
TS_TARGET inline __m256i first_lanes8(int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n < 0 ? 0 : n), idx);
}

TS_TARGET inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NF4 level lookup of 8 lanes: vpermps covers 8 entries, so look up both halves of the table and pick
// by bit 3 of the index (moved to the sign bit for blendv). Bits above 3 of `index` are ignored.
TS_TARGET inline __m256 nf4_lookup8(__m256i index, __m256 lut_lo, __m256 lut_hi) {
  const __m256 lo = _mm256_permutevar8x32_ps(lut_lo, index), hi = _mm256_permutevar8x32_ps(lut_hi, index);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

// 8 dequantized weights in natural order from 4 code bytes (high nibble first).
TS_TARGET inline __m256 nf4_decode8(const uint8_t* codes, __m256 lut_lo, __m256 lut_hi, __m256 absmax) {
  int32_t word;
  std::memcpy(&word, codes, 4);
  const __m128i bytes = _mm_cvtsi32_si128(word);
  const __m256i lanes = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
  const __m256i index = _mm256_srlv_epi32(lanes, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0));
  return _mm256_mul_ps(nf4_lookup8(index, lut_lo, lut_hi), absmax);
}

struct Tile6x16 {
  static constexpr int MR = 6, NR = 16;
  // B sliver KC x 16 = 16 KiB in L1; A block 144 x 256 = 144 KiB in L2.
  static constexpr int64_t KC = 256, MC = 144, NC = 4096;
  static constexpr bool A_RESIDENT = false;

  // C[0:mv, 0:nv] = alpha * Σ_k a[k,:]ᵀ b[k,:] + beta * C over the first ROWS (>= mv) rows of the tile;
  // full tile: 12 accumulators + 2 B vectors.
  template <int ROWS>
  TS_TARGET static void kernel_rows(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                               float beta, int mv, int nv) {
    __m256 c0[ROWS], c1[ROWS];
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; r++) c0[r] = c1[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
      const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
      for (int r = 0; r < ROWS; r++) {
        const __m256 av = _mm256_broadcast_ss(a + r);
        c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
        c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
      }
      a += MR;
      b += NR;
    }
    const __m256i m0 = first_lanes8(nv), m1 = first_lanes8(nv - 8);
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; r++) {
      if (r >= mv) break;
      float* cr = c + r * ldc;
      __m256 r0 = _mm256_mul_ps(c0[r], va), r1 = _mm256_mul_ps(c1[r], va);
      if (beta != 0.f) {
        r0 = _mm256_fmadd_ps(_mm256_maskload_ps(cr, m0), vb, r0);
        r1 = _mm256_fmadd_ps(_mm256_maskload_ps(cr + 8, m1), vb, r1);
      }
      _mm256_maskstore_ps(cr, m0, r0);
      _mm256_maskstore_ps(cr + 8, m1, r1);
    }
  }

  TS_TARGET static void kernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                               float beta, int mv, int nv) {
    if (mv > 4) kernel_rows<6>(kc, a, b, c, ldc, alpha, beta, mv, nv);
    else if (mv > 2) kernel_rows<4>(kc, a, b, c, ldc, alpha, beta, mv, nv);
    else kernel_rows<2>(kc, a, b, c, ldc, alpha, beta, mv, nv);
  }

  TS_TARGET static void pack_a(const Operand& a, int64_t i, int mv, int64_t k0, int64_t kc, float* dst) {
    pack_a_generic<MR>(a, i, mv, k0, kc, dst);  // 6-row strips: scalar gathers vectorize poorly either way
  }

  // dst[k*16 + c] = op(B)(k0 + k, j + c); dst is 32-byte aligned.
  TS_TARGET static void pack_b(const GemmProblem& p, int64_t k0, int64_t kc, int64_t j, int nv, float* dst) {
    if (p.b_nf4) {
      const NF4View& w = *p.b_nf4;
      const __m256 lut_lo = _mm256_loadu_ps(NF4_LEVELS), lut_hi = _mm256_loadu_ps(NF4_LEVELS + 8);
      if (p.b_nf4_trans && kc % NF4_BLOCK == 0 && k0 % NF4_BLOCK == 0) {
        float amax[NR][KC / NF4_BLOCK];  // (16, KC/64) absmax of each row's blocks in this K panel
        for (int c = 0; c < nv; c++) {
          Nf4Absmax absmax(w);
          const int64_t b0 = ((j + c) * w.cols + k0) / NF4_BLOCK;
          for (int64_t i = 0; i < kc / NF4_BLOCK; i++) amax[c][i] = absmax(b0 + i);
        }
        for (int64_t k = 0; k < kc; k += 8)
          for (int half = 0; half < 2; half++) {
            __m256 r[8];
            for (int q = 0; q < 8; q++) {
              const int c = 8 * half + q;
              if (c < nv) {
                const int64_t e = (j + c) * w.cols + k0 + k;
                r[q] = nf4_decode8(w.codes + e / 2, lut_lo, lut_hi, _mm256_set1_ps(amax[c][k / NF4_BLOCK]));
              } else {
                r[q] = _mm256_setzero_ps();
              }
            }
            transpose8(r);
            for (int t = 0; t < 8; t++) _mm256_store_ps(dst + (k + t) * NR + 8 * half, r[t]);
          }
        return;
      }
      if (!p.b_nf4_trans && nv == NR && j % 16 == 0) {
        Nf4Absmax absmax(w);
        for (int64_t k = 0; k < kc; k++) {
          const int64_t e = (k0 + k) * w.cols + j;
          const __m256 amax = _mm256_set1_ps(absmax(e / NF4_BLOCK));
          _mm256_store_ps(dst + k * NR, nf4_decode8(w.codes + e / 2, lut_lo, lut_hi, amax));
          _mm256_store_ps(dst + k * NR + 8, nf4_decode8(w.codes + e / 2 + 4, lut_lo, lut_hi, amax));
        }
        return;
      }
      pack_b_generic<NR>(p, k0, kc, j, nv, dst);
      return;
    }
    const Operand& b = p.b;
    if (!b.trans) {
      const __m256i m0 = first_lanes8(nv), m1 = first_lanes8(nv - 8);
      const float* src = b.data + k0 * b.ld + j;
      for (int64_t k = 0; k < kc; k++) {
        _mm256_store_ps(dst + k * NR, _mm256_maskload_ps(src + k * b.ld, m0));
        _mm256_store_ps(dst + k * NR + 8, _mm256_maskload_ps(src + k * b.ld + 8, m1));
      }
      return;
    }
    const float* src = b.data + j * b.ld + k0;
    for (int64_t k = 0; k < kc; k += 8) {
      const int n = kc - k < 8 ? int(kc - k) : 8;
      const __m256i cols = first_lanes8(n);
      for (int half = 0; half < 2; half++) {
        __m256 r[8];
        for (int q = 0; q < 8; q++) {
          const int c = 8 * half + q;
          r[q] = c < nv ? _mm256_maskload_ps(src + c * b.ld + k, cols) : _mm256_setzero_ps();
        }
        transpose8(r);
        for (int t = 0; t < n; t++) _mm256_store_ps(dst + (k + t) * NR + 8 * half, r[t]);
      }
    }
  }
};

// ---- small M (decode, small batches) with float B; op(A) = x, rows at x + m*ldx. No packing: B is
// streamed once, 4 rows (or a 32-column strip) at a time, and every pair of x rows passes over that piece
// while it is in cache. Two x rows x 4 accumulators keep within the 16 ymm registers. ----

// Lane q of the result = the sum of the 8 lanes of v[q].
TS_TARGET inline __m128 reduce4(const __m256 v[4]) {
  const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 sum = _mm256_hadd_ps(h01, h23);
  return _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
}

template <int MB>
TS_TARGET void dot_tile(const GemmProblem& p, const float* x, int64_t ldx, const float* const br[4], float* c,
                        int rows) {
  const int64_t K = p.K;
  __m256 acc[MB][4];
  for (int m = 0; m < MB; m++)
    for (int q = 0; q < 4; q++) acc[m][q] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256i mk = first_lanes8(int(K - k < 8 ? K - k : 8));
    __m256 bv[4];
    for (int q = 0; q < 4; q++) bv[q] = _mm256_maskload_ps(br[q] + k, mk);
    for (int m = 0; m < MB; m++) {
      const __m256 xv = _mm256_maskload_ps(x + m * ldx + k, mk);
      for (int q = 0; q < 4; q++) acc[m][q] = _mm256_fmadd_ps(xv, bv[q], acc[m][q]);
    }
  }
  for (int m = 0; m < MB; m++) {
    alignas(16) float r[4];
    _mm_store_ps(r, _mm_mul_ps(reduce4(acc[m]), _mm_set1_ps(p.alpha)));
    float* out = c + m * p.ldc;
    for (int q = 0; q < rows; q++) out[q] = p.beta == 0.f ? r[q] : r[q] + p.beta * out[q];
  }
}

template <int MB>
TS_TARGET void axpy_tile(const GemmProblem& p, const float* x, int64_t ldx, int64_t j, const __m256i mj[4], float* c) {
  const int64_t K = p.K, ldb = p.b.ld;
  __m256 acc[MB][4];
  for (int m = 0; m < MB; m++)
    for (int v = 0; v < 4; v++) acc[m][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    const float* row = p.b.data + k * ldb + j;
    _mm_prefetch(reinterpret_cast<const char*>(row + 8 * ldb), _MM_HINT_T0);
    __m256 bv[4];
    for (int v = 0; v < 4; v++) bv[v] = _mm256_maskload_ps(row + 8 * v, mj[v]);
    for (int m = 0; m < MB; m++) {
      const __m256 xs = _mm256_broadcast_ss(x + m * ldx + k);
      for (int v = 0; v < 4; v++) acc[m][v] = _mm256_fmadd_ps(xs, bv[v], acc[m][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(p.alpha), vb = _mm256_set1_ps(p.beta);
  for (int m = 0; m < MB; m++)
    for (int v = 0; v < 4; v++) {
      float* out = c + m * p.ldc + 8 * v;
      __m256 r = _mm256_mul_ps(acc[m][v], va);
      if (p.beta != 0.f) r = _mm256_fmadd_ps(_mm256_maskload_ps(out, mj[v]), vb, r);
      _mm256_maskstore_ps(out, mj[v], r);
    }
}

TS_TARGET void gemm_small_m(const GemmProblem& p, int64_t j0, int64_t j1) {
  const float* x = p.a.data;
  const int64_t ldx = p.a.ld;
  if (p.b.trans) {
    for (int64_t j = j0; j < j1; j += 4) {
      const int rows = j1 - j < 4 ? int(j1 - j) : 4;
      const float* br[4];
      for (int q = 0; q < 4; q++) br[q] = p.b.data + (q < rows ? j + q : j) * p.b.ld;
      for (int64_t m0 = 0; m0 < p.M; m0 += 2) {
        float* c = p.c + m0 * p.ldc + j;
        if (p.M - m0 >= 2) dot_tile<2>(p, x + m0 * ldx, ldx, br, c, rows);
        else dot_tile<1>(p, x + m0 * ldx, ldx, br, c, rows);
      }
    }
    return;
  }
  for (int64_t j = j0; j < j1; j += 32) {
    __m256i mj[4];
    for (int v = 0; v < 4; v++) {
      const int64_t left = j1 - j - 8 * v;
      mj[v] = first_lanes8(left > 0 ? int(left < 8 ? left : 8) : 0);
    }
    for (int64_t m0 = 0; m0 < p.M; m0 += 2) {
      float* c = p.c + m0 * p.ldc + j;
      if (p.M - m0 >= 2) axpy_tile<2>(p, x + m0 * ldx, ldx, j, mj, c);
      else axpy_tile<1>(p, x + m0 * ldx, ldx, j, mj, c);
    }
  }
}

// ---- fused NF4 (small M). A lane group is 32 code bytes = 64 weights = exactly one absmax block. ----

template <int MB>
TS_TARGET void nf4_nt_rows(float* y, int64_t ldy, const float* xp, int64_t Kp, const NF4View& w, float beta,
                           int64_t n0, int64_t n1) {
  const __m256 lut_lo = _mm256_loadu_ps(NF4_LEVELS), lut_hi = _mm256_loadu_ps(NF4_LEVELS + 8);
  const int64_t blocks = w.cols / NF4_BLOCK;
  Nf4Absmax block_absmax(w);
  for (int64_t n = n0; n < n1; n++) {
    __m256 acc[MB];
    for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < blocks; g++) {
      const int64_t b = n * blocks + g;
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + b * 32));
      const __m256 absmax = _mm256_set1_ps(block_absmax(b));
      __m256 level[8];
      for (int s = 0; s < 8; s++) level[s] = nf4_lookup8(_mm256_srli_epi32(codes, 4 * s), lut_lo, lut_hi);
      for (int m = 0; m < MB; m++) {
        const float* xg = xp + m * Kp + g * 64;
        __m256 t0 = _mm256_mul_ps(level[0], _mm256_loadu_ps(xg));
        __m256 t1 = _mm256_mul_ps(level[1], _mm256_loadu_ps(xg + 8));
        for (int s = 2; s < 8; s += 2) {
          t0 = _mm256_fmadd_ps(level[s], _mm256_loadu_ps(xg + 8 * s), t0);
          t1 = _mm256_fmadd_ps(level[s + 1], _mm256_loadu_ps(xg + 8 * s + 8), t1);
        }
        acc[m] = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), absmax, acc[m]);
      }
    }
    for (int m = 0; m < MB; m++) {
      float* out = y + m * ldy + n;
      const float s = hsum8(acc[m]);
      *out = beta == 0.f ? s : s + beta * *out;
    }
  }
}

TS_TARGET void nf4_nt_small(float* y, int64_t ldy, const float* xp, int64_t Kp, const NF4View& w, int64_t M,
                            float beta, int64_t n0, int64_t n1) {
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

TS_TARGET void nf4_nn_small(float* dxp, int64_t ldp, const float* dy, const NF4View& w, int64_t M, int64_t g0,
                            int64_t g1) {
  const __m256 lut_lo = _mm256_loadu_ps(NF4_LEVELS), lut_hi = _mm256_loadu_ps(NF4_LEVELS + 8);
  const int64_t N = w.rows, blocks = w.cols / NF4_BLOCK;
  Nf4Absmax block_absmax(w);
  for (int64_t m = 0; m < M; m++) std::memset(dxp + m * ldp + g0 * 64, 0, size_t(g1 - g0) * 64 * sizeof(float));
  for (int64_t n = 0; n < N; n++) {
    for (int64_t g = g0; g < g1; g++) {
      const int64_t b = n * blocks + g;
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + b * 32));
      const float absmax = block_absmax(b);
      __m256 level[8];
      for (int s = 0; s < 8; s++) level[s] = nf4_lookup8(_mm256_srli_epi32(codes, 4 * s), lut_lo, lut_hi);
      for (int64_t m = 0; m < M; m++) {
        const __m256 scale = _mm256_set1_ps(absmax * dy[m * N + n]);
        float* acc = dxp + m * ldp + g * 64;
        for (int s = 0; s < 8; s++)
          _mm256_storeu_ps(acc + 8 * s, _mm256_fmadd_ps(level[s], scale, _mm256_loadu_ps(acc + 8 * s)));
      }
    }
  }
}

const KernelSet AVX2_SET = {
    "avx2", 8, Tile6x16::MR, Tile6x16::NR, int(Tile6x16::NC), gemm_block_t<Tile6x16>, gemm_small_m, nf4_nt_small, nf4_nn_small,
};

}  // namespace

const KernelSet* kernels_avx2() { return &AVX2_SET; }

}  // namespace ts::cpu::detail
