// Per-row LoRA over adapter slots (cuda/ops.cuh): every row of a step can use a different adapter,
// chosen by a small per-row slot mapping in device memory, so a captured decode graph serves any mix
// of adapters without being re-captured. Rows without an adapter (slot -1), or whose adapter does not
// target this module (A == null), are left alone. The thin products of the segment form (prefill,
// training) go through gemm_reference in cuda_backend.cu instead.
#include "core/counter_rng.h"
#include "cuda/ops.cuh"

namespace ts::cuda {

namespace {

// u[i, j] = Σ_c dropout(x[i])[c] · A[j, c]     j < r of the row's adapter; one block per row, a warp per j
template <typename T>
__global__ void lora_shrink_kernel(float* u, const T* x, const int32_t* row_slot, const LoraModuleView* slots, int in,
                                   int max_rank, float p, uint64_t key) {
  const int64_t i = blockIdx.x;
  const int s = row_slot[i];
  if (s < 0) return;
  const LoraModuleView mod = slots[s];
  if (!mod.A) return;
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, warps = blockDim.x / WARP;
  const T* xi = x + i * in;
  const float keep = p > 0.f ? 1.f / (1.f - p) : 1.f;
  for (int j = warp; j < mod.r; j += warps) {
    const float* a = mod.A + (int64_t)j * in;
    float acc = 0.f;
    for (int c = lane; c < in; c += WARP) {
      float xv = to_float(xi[c]);
      if (p > 0.f) xv = counter_uniform(key, (uint64_t)i * (uint64_t)in + c) >= p ? xv * keep : 0.f;
      acc += xv * a[c];
    }
    acc = warp_sum(acc);
    if (lane == 0) u[i * max_rank + j] = acc;
  }
}

// y[i, c] += s · Σ_j u[i, j] · B[c, j]     grid (rows, column blocks)
template <typename T>
__global__ void lora_expand_kernel(T* y, const float* u, const int32_t* row_slot, const LoraModuleView* slots, int out,
                                   int max_rank) {
  const int64_t i = blockIdx.x;
  const int s = row_slot[i];
  if (s < 0) return;
  const LoraModuleView mod = slots[s];
  if (!mod.A) return;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= out) return;
  const float* ui = u + i * max_rank;
  const float* b = mod.B + (int64_t)c * mod.r;
  float acc = 0.f;
  for (int j = 0; j < mod.r; j++) acc += ui[j] * b[j];
  T* yi = y + i * out + c;
  *yi = from_float<T>(to_float(*yi) + mod.scaling * acc);
}

// v[m, c] *= (counter_uniform(key, (row0 + m)·in + c) >= p) / (1 - p)
__global__ void lora_dropout_kernel(float* v, int64_t rows, int in, int64_t row0, float p, uint64_t key) {
  const float keep = 1.f / (1.f - p);
  const int64_t n = rows * in;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t m = e / in, c = e % in;
    v[e] = counter_uniform(key, (uint64_t)(row0 + m) * (uint64_t)in + c) >= p ? v[e] * keep : 0.f;
  }
}

}  // namespace

template <typename T>
void lora_shrink_rows(float* u, const T* x, const int32_t* row_slot, const LoraModuleView* slots, int64_t M, int in,
                      int max_rank, const LoraDropout& dropout, cudaStream_t stream) {
  if (M == 0) return;
  TS_LAUNCH(lora_shrink_kernel<T>, unsigned(M), 128, 0, stream)(u, x, row_slot, slots, in, max_rank, dropout.p,
                                                                dropout.key);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void lora_expand_rows(T* y, const float* u, const int32_t* row_slot, const LoraModuleView* slots, int64_t M, int out,
                      int max_rank, cudaStream_t stream) {
  if (M == 0) return;
  const dim3 grid(unsigned(M), unsigned((out + 255) / 256));
  TS_LAUNCH(lora_expand_kernel<T>, grid, 256, 0, stream)(y, u, row_slot, slots, out, max_rank);
  CUDA_CHECK_LAUNCH();
}

void lora_dropout(float* v, int64_t rows, int in, int64_t row0, const LoraDropout& dropout, cudaStream_t stream) {
  const int64_t n = rows * in;
  if (n == 0 || dropout.p <= 0.f) return;
  const unsigned blocks = unsigned(std::min<int64_t>((n + 255) / 256, 65535));
  TS_LAUNCH(lora_dropout_kernel, blocks, 256, 0, stream)(v, rows, in, row0, dropout.p, dropout.key);
  CUDA_CHECK_LAUNCH();
}

template void lora_shrink_rows<float>(float*, const float*, const int32_t*, const LoraModuleView*, int64_t, int, int,
                                      const LoraDropout&, cudaStream_t);
template void lora_shrink_rows<bf16>(float*, const bf16*, const int32_t*, const LoraModuleView*, int64_t, int, int,
                                     const LoraDropout&, cudaStream_t);
template void lora_expand_rows<float>(float*, const float*, const int32_t*, const LoraModuleView*, int64_t, int, int,
                                      cudaStream_t);
template void lora_expand_rows<bf16>(bf16*, const float*, const int32_t*, const LoraModuleView*, int64_t, int, int,
                                     cudaStream_t);

}  // namespace ts::cuda
