// Internal interface between gemm.cpp (argument handling, dispatch, threading) and the per-ISA kernel
// files gemm_avx512.cpp / gemm_avx2.cpp / gemm_scalar.cpp. Not part of the engine's public API.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/nf4.h"

namespace ts::cpu::detail {

// A float matrix operand: op(X)(r, c) = trans ? data[c*ld + r] : data[r*ld + c].
struct Operand {
  const float* data = nullptr;
  int64_t ld = 0;
  bool trans = false;
};

// C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C (beta == 0: C is not read).
// op(B) is either the float operand `b` or, when b_nf4 is set, the dequantized NF4 weight W with
// op(B)(k, j) = b_nf4_trans ? W[j, k] : W[k, j].
struct GemmProblem {
  int64_t M = 0, N = 0, K = 0;
  float alpha = 1.f, beta = 0.f;
  Operand a, b;
  const NF4View* b_nf4 = nullptr;
  bool b_nf4_trans = false;
  float* c = nullptr;
  int64_t ldc = 0;
};

// NF4 fused paths work on "lane groups": one vector of L 32-bit lanes loaded from 4L code bytes holds
// 8L weights; shifting it right by 4s (s = 0..7) puts in each lane d the nibble of weight 8d + (s ^ 1)
// (the low nibble of a byte is the odd element), so the kernels see the weights in the order
//   slot s*L + d  <->  weight 8d + (s ^ 1)      within each group of 8L weights.
// gemm.cpp permutes activations into that order (nf4_permute) and back (nf4_unpermute).
inline int64_t nf4_slot_to_weight(int64_t slot, int lanes) {
  int64_t s = slot / lanes, d = slot % lanes;
  return 8 * d + (s ^ 1);
}

// The absmax of an NF4 block after double quantization, mean + q * (scale / 127): the float32
// expression of nf4_block_absmax in nf4.cpp, bit for bit. The empty asm makes the product a rounded
// value of its own: in the FMA-enabled kernel files the compiler would otherwise fuse it with the add
// (one rounding instead of two) and differ from nf4.cpp in the last bit.
inline float nf4_absmax_value(float mean, int8_t q, float step) {
  float product = float(q) * step;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(product));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(product));
#else
  volatile float keep = product;
  product = keep;
#endif
  return mean + product;
}

// Block absmax values for blocks visited mostly in increasing order: scale / 127 (a division) is
// recomputed only when the 256-block group changes.
struct Nf4Absmax {
  const NF4View& w;
  int64_t group = -1;
  float step = 0.f;
  explicit Nf4Absmax(const NF4View& m) : w(m) {}
  float operator()(int64_t block) {
    const int64_t g = block / NF4_DQ_GROUP;
    if (g != group) {
      group = g;
      step = w.absmax_scale[size_t(g)] / 127.f;
    }
    return nf4_absmax_value(w.absmax_mean, w.absmax_q[size_t(block)], step);
  }
};

struct KernelSet {
  const char* name;
  int nf4_lanes;  // L above: 16 (AVX-512), 8 (AVX2), 1 (scalar)
  int MR, NR;     // micro-tile of gemm_block (partitions keep column starts multiples of NR)
  int NC;         // gemm_block's column panel: A is packed again for each NC columns
  // C[i0:i1, j0:j1] by cache blocking, panel packing and the register-tiled micro-kernel; one thread.
  void (*gemm_block)(const GemmProblem& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
  // C[0:M, j0:j1] for small M with float B, A not transposed (op(A) = A): op(B) is streamed once.
  void (*gemm_small_m)(const GemmProblem& p, int64_t j0, int64_t j1);
  // y[m, n] = Σ_k x[m,k] W[n,k] + beta*y[m, n] for n in [n0, n1), m < M; xp is x in slot order,
  // (M, Kp) with Kp = K rounded up to 8L and zero padded; y is (M, ldy).
  void (*nf4_nt_small)(float* y, int64_t ldy, const float* xp, int64_t Kp, const NF4View& w, int64_t M,
                       float beta, int64_t n0, int64_t n1);
  // dxp[m, slot] = Σ_n dy[m,n] W[n, k(slot)] for the slots of groups [g0, g1) (8L weights each), written
  // (overwritten) at dxp + m*ldp + slot; dy is (M, N) contiguous.
  void (*nf4_nn_small)(float* dxp, int64_t ldp, const float* dy, const NF4View& w, int64_t M, int64_t g0,
                       int64_t g1);
};

const KernelSet& kernels_scalar();
const KernelSet* kernels_avx2();    // nullptr when the compiler could not build it
const KernelSet* kernels_avx512();  // nullptr when the compiler could not build it

// Selects the kernel set sgemm and the NF4 products use: "avx512", "avx2", "scalar", "openblas" (sgemm
// only; the NF4 paths keep the own set) or "auto" (the best own set for this CPU). Returns false, changing
// nothing, when that set is unavailable here. For tests and the kernel lab; not thread-safe against
// products running at the same time.
bool select_kernels(const std::string& name);

// Per-thread, 64-byte aligned scratch memory that only grows; `slot` keeps simultaneous uses apart.
float* scratch(int slot, size_t floats);

}  // namespace ts::cpu::detail
