// Matrix products of the CPU backend, row-major, cblas semantics:
//   C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C      op(X) = X or Xᵀ
// Shapes as the model uses them (a linear layer's weight W is [out, in], y = x·Wᵀ):
//   forward          y[M,N]  = x[M,K]  · W[N,K]ᵀ     sgemm(false, true,  ...)
//   input gradient   dx[M,K] = dy[M,N] · W[N,K]      sgemm(false, false, ...)
//   weight gradient  dW[N,K] = dy[M,N]ᵀ · x[M,K]     sgemm(true,  false, ...)
// The kernel is cache-blocked SIMD (AVX-512 or AVX2+FMA picked at run time, scalar otherwise) and
// runs on the thread pool. beta == 0 means C is overwritten (never read, so NaN garbage is fine).
#pragma once
#include <cstdint>

#include "core/nf4.h"

namespace ts::cpu {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// y[M,N] = x[M,K] · dequant(W)[N,K]ᵀ + beta * y, with W NF4 ([N,K], K % 64 == 0). Dequantizes panels
// of W on the fly (never the whole matrix); small M (decoding, M <= 12) takes a fused dequant-dot
// path that streams the 4-bit codes once.
void matmul_nf4_nt(float* y, const float* x, const NF4View& w, int64_t M, float beta);
// dx[M,K] = dy[M,N] · dequant(W)[N,K] + beta * dx  (the input gradient through a frozen NF4 weight;
// M <= 4 fused, larger M through dequantized panels).
void matmul_nf4_nn(float* dx, const float* dy, const NF4View& w, int64_t M, float beta);

// Which kernel sgemm runs on this CPU: "avx512", "avx2", or "scalar" (or "openblas" if selected).
const char* gemm_kernel_name();

}  // namespace ts::cpu
