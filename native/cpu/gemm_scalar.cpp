// Portable kernels of the CPU matrix products, for CPUs without AVX2 (and non-x86 builds): the same
// blocked loop nest as the SIMD sets with a 4x16 micro-kernel written as plain loops the compiler
// vectorizes for the baseline ISA, plus small-M and NF4 paths with one-lane "groups" (see
// gemm_kernels.h: L = 1, slot s <-> weight s ^ 1 within each 8-weight group).
#include <cstring>

#define TS_TARGET
#include "cpu/gemm_blocked.h"

namespace ts::cpu::detail {
namespace {

struct Tile4x16 {
  static constexpr int MR = 4, NR = 16;
  static constexpr int64_t KC = 256, MC = 128, NC = 2048;
  static constexpr bool A_RESIDENT = false;

  static void kernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha, float beta,
                     int mv, int nv) {
    float acc[MR][NR] = {};
    for (int64_t k = 0; k < kc; k++, a += MR, b += NR)
      for (int r = 0; r < MR; r++)
        for (int j = 0; j < NR; j++) acc[r][j] += a[r] * b[j];
    for (int r = 0; r < mv; r++)
      for (int j = 0; j < nv; j++) {
        float* out = c + r * ldc + j;
        *out = beta == 0.f ? alpha * acc[r][j] : alpha * acc[r][j] + beta * *out;
      }
  }
  static void pack_a(const Operand& a, int64_t i, int mv, int64_t k0, int64_t kc, float* dst) {
    pack_a_generic<MR>(a, i, mv, k0, kc, dst);
  }
  static void pack_b(const GemmProblem& p, int64_t k0, int64_t kc, int64_t j, int nv, float* dst) {
    pack_b_generic<NR>(p, k0, kc, j, nv, dst);
  }
};

void gemm_small_m(const GemmProblem& p, int64_t j0, int64_t j1) {
  const float* B = p.b.data;
  for (int64_t m = 0; m < p.M; m++) {
    const float* x = p.a.data + m * p.a.ld;
    float* c = p.c + m * p.ldc;
    if (p.b.trans) {  // dot products with rows of B [N, K]
      for (int64_t j = j0; j < j1; j++) {
        const float* row = B + j * p.b.ld;
        float s = 0.f;
        for (int64_t k = 0; k < p.K; k++) s += x[k] * row[k];
        c[j] = p.beta == 0.f ? p.alpha * s : p.alpha * s + p.beta * c[j];
      }
    } else {  // rows of B [K, N] accumulated into C[m, j0:j1]
      for (int64_t j = j0; j < j1; j++) c[j] = p.beta == 0.f ? 0.f : p.beta * c[j];
      for (int64_t k = 0; k < p.K; k++) {
        const float s = p.alpha * x[k];
        const float* row = B + k * p.b.ld;
        for (int64_t j = j0; j < j1; j++) c[j] += s * row[j];
      }
    }
  }
}

// Level of the weight in slot s of the 8-weight group starting at code byte `codes`.
inline float slot_level(const uint8_t* codes, int s) {
  const uint8_t byte = codes[s >> 1];
  return NF4_LEVELS[(s & 1) ? (byte >> 4) : (byte & 15)];  // slot s = weight s ^ 1: odd slots are even weights
}

void nf4_nt_small(float* y, int64_t ldy, const float* xp, int64_t Kp, const NF4View& w, int64_t M, float beta,
                  int64_t n0, int64_t n1) {
  const int64_t K = w.cols;
  Nf4Absmax absmax(w);
  for (int64_t n = n0; n < n1; n++)
    for (int64_t m = 0; m < M; m++) {
      const float* x = xp + m * Kp;
      float s = 0.f;
      for (int64_t b = 0; b < K / NF4_BLOCK; b++) {
        const uint8_t* codes = w.codes + (n * K + b * NF4_BLOCK) / 2;
        float t = 0.f;
        for (int i = 0; i < NF4_BLOCK; i++) t += x[b * NF4_BLOCK + i] * slot_level(codes + (i / 8) * 4, i % 8);
        s += t * absmax((n * K) / NF4_BLOCK + b);
      }
      float* out = y + m * ldy + n;
      *out = beta == 0.f ? s : s + beta * *out;
    }
}

void nf4_nn_small(float* dxp, int64_t ldp, const float* dy, const NF4View& w, int64_t M, int64_t g0, int64_t g1) {
  const int64_t N = w.rows, K = w.cols;
  Nf4Absmax block_absmax(w);
  for (int64_t m = 0; m < M; m++) std::memset(dxp + m * ldp + g0 * 8, 0, size_t(g1 - g0) * 8 * sizeof(float));
  for (int64_t n = 0; n < N; n++)
    for (int64_t g = g0; g < g1; g++) {
      const int64_t e = n * K + g * 8;
      const uint8_t* codes = w.codes + e / 2;
      const float absmax = block_absmax(e / NF4_BLOCK);
      for (int64_t m = 0; m < M; m++) {
        const float scale = absmax * dy[m * N + n];
        float* acc = dxp + m * ldp + g * 8;
        for (int s = 0; s < 8; s++) acc[s] += slot_level(codes, s) * scale;
      }
    }
}

const KernelSet SCALAR_SET = {
    "scalar", 1, Tile4x16::MR, Tile4x16::NR, int(Tile4x16::NC), gemm_block_t<Tile4x16>, gemm_small_m, nf4_nt_small, nf4_nn_small,
};

}  // namespace

const KernelSet& kernels_scalar() { return SCALAR_SET; }

}  // namespace ts::cpu::detail
