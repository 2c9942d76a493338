// A plain tiled SIMT matrix product (cuda/ops.cuh gemm_reference): operands of any of float / bf16,
// float32 accumulation, any transposes and leading dimensions. It serves the thin LoRA products (mixed
// operand types, which cuBLASLt does not take), the emulator build (which has no cuBLASLt), and the
// GPU checks, where it is the independent reference cuBLASLt is compared with. Not the fast path for
// the base's large products: those go to cuBLASLt.
#include "cuda/ops.cuh"

namespace ts::cuda {

namespace {

constexpr int TILE = 64;   // C tile is TILE x TILE
constexpr int BK = 16;     // K slice staged in shared memory
constexpr int THREADS = 256;  // 16 x 16 threads, each computing a 4 x 4 piece of the tile

// C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C     (row-major; beta == 0: C not read)
//   op(A)(i, k) = trans_a ? A[k·lda + i] : A[i·lda + k]
//   op(B)(k, j) = trans_b ? B[j·ldb + k] : B[k·ldb + j]
template <typename TA, typename TB, typename TC>
__global__ void __launch_bounds__(THREADS)
    gemm_tiled_kernel(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const TA* A,
                      int64_t lda, const TB* B, int64_t ldb, float beta, TC* C, int64_t ldc) {
  __shared__ float As[BK][TILE + 1];  // As[k][i]; +1 keeps column reads free of bank conflicts
  __shared__ float Bs[BK][TILE + 1];  // Bs[k][j]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = (int64_t)blockIdx.y * TILE, j0 = (int64_t)blockIdx.x * TILE;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    for (int e = threadIdx.x; e < BK * TILE; e += THREADS) {
      const int kk = e % BK, ii = e / BK;  // consecutive threads walk K: contiguous when A is not transposed
      const int64_t i = i0 + ii, k = k0 + kk;
      As[kk][ii] = i < M && k < K ? to_float(trans_a ? A[k * lda + i] : A[i * lda + k]) : 0.f;
    }
    for (int e = threadIdx.x; e < BK * TILE; e += THREADS) {
      const int jj = e % TILE, kk = e / TILE;  // consecutive threads walk N: contiguous when B is not transposed
      const int64_t j = j0 + jj, k = k0 + kk;
      Bs[kk][jj] = j < N && k < K ? to_float(trans_b ? B[j * ldb + k] : B[k * ldb + j]) : 0.f;
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk++) {
      float a[4], b[4];
      for (int r = 0; r < 4; r++) a[r] = As[kk][ty + 16 * r];
      for (int c = 0; c < 4; c++) b[c] = Bs[kk][tx + 16 * c];
      for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] += a[r] * b[c];
    }
    __syncthreads();
  }
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < 4; c++) {
      const int64_t i = i0 + ty + 16 * r, j = j0 + tx + 16 * c;
      if (i >= M || j >= N) continue;
      TC* out = C + i * ldc + j;
      const float v = alpha * acc[r][c];
      *out = from_float<TC>(beta == 0.f ? v : v + beta * to_float(*out));
    }
}

}  // namespace

template <typename TA, typename TB, typename TC>
void gemm_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const TA* A, int64_t lda,
                    const TB* B, int64_t ldb, float beta, TC* C, int64_t ldc, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  require((M + TILE - 1) / TILE <= 65535, "INTERNAL", "gemm_reference: M too large for the grid");
  const dim3 grid(unsigned((N + TILE - 1) / TILE), unsigned((M + TILE - 1) / TILE));
  TS_LAUNCH((gemm_tiled_kernel<TA, TB, TC>), grid, THREADS, 0, stream)(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb,
                                                                       beta, C, ldc);
  CUDA_CHECK_LAUNCH();
}

#define TS_INSTANTIATE(TA, TB, TC)                                                                                  \
  template void gemm_reference<TA, TB, TC>(bool, bool, int64_t, int64_t, int64_t, float, const TA*, int64_t, const TB*, \
                                           int64_t, float, TC*, int64_t, cudaStream_t);
TS_INSTANTIATE(float, float, float)
TS_INSTANTIATE(bf16, bf16, bf16)
TS_INSTANTIATE(bf16, bf16, float)
TS_INSTANTIATE(float, bf16, float)
TS_INSTANTIATE(bf16, float, float)
TS_INSTANTIATE(float, float, bf16)
TS_INSTANTIATE(float, bf16, bf16)
TS_INSTANTIATE(bf16, float, bf16)
#undef TS_INSTANTIATE

}  // namespace ts::cuda
