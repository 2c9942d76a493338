// Cross-entropy, the squared gradient norm and AdamW (cuda/ops.cuh), float32 data with the CPU ops'
// formulas. Gradients and the norm are deterministic (fixed reduction trees); the loss sum adds the
// rows' losses with atomics, so its last bits (1e-16 relative) may vary between runs. It is reported,
// never fed back into training.
#include "cuda/ops.cuh"

namespace ts::cuda {

namespace {

constexpr int CE_THREADS = 512;

// Row m of logits (V) with target y = targets[m] (< 0: ignored):
//   loss_m = max + log Σ exp(x - max) - x[y]          summed in double into *loss_sum
//   with scale != 0: x = softmax(x)·scale - onehot(y)·scale    (ignored rows: x = 0)
__global__ void __launch_bounds__(CE_THREADS)
    cross_entropy_kernel(double* loss_sum, float* logits, const int32_t* targets, int V, float scale) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const int64_t m = blockIdx.x;
  float* x = logits + m * V;
  const int32_t y = targets[m];
  if (y < 0) {
    if (scale != 0.f)
      for (int i = threadIdx.x; i < V; i += blockDim.x) x[i] = 0.f;
    return;
  }
  // Read before block_max: its barrier orders this read before any thread overwrites x below.
  const float target_logit = x[y];
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, x[i]);
  mx = block_max(mx, fscratch);
  double sum = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float e = expf(x[i] - mx);
    if (scale != 0.f) x[i] = e;  // kept in place for the gradient, as the CPU op does
    sum += e;
  }
  sum = block_sum(sum, dscratch);
  if (threadIdx.x == 0) atomicAdd(loss_sum, (double)mx + log(sum) - (double)target_logit);
  if (scale == 0.f) return;
  const float s = (float)(scale / sum);
  for (int i = threadIdx.x; i < V; i += blockDim.x) x[i] = i == y ? x[i] * s - scale : x[i] * s;
}

// *acc += Σ x[i]²: one block, so the reduction tree (and the result) is the same on every run.
__global__ void sum_squares_kernel(double* acc, const float* x, int64_t n) {
  __shared__ double scratch[32];
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += (double)x[i] * x[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *acc += s;
}

// torch.optim.AdamW with the host-computed scalars of AdamWStep (see core/backend.h)
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, AdamWStep s) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float gi = g[i] * s.clip;
    float pi = p[i] * s.decay;
    const float mi = s.beta1 * m[i] + (1.f - s.beta1) * gi;
    const float vi = s.beta2 * v[i] + (1.f - s.beta2) * gi * gi;
    pi -= s.step_size * mi / (sqrtf(vi) / s.sqrt_bc2 + s.eps);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace

void cross_entropy(double* loss_sum, float* logits, const int32_t* targets, int64_t M, int V, float scale,
                   cudaStream_t stream) {
  if (M == 0) return;
  TS_LAUNCH(cross_entropy_kernel, unsigned(M), CE_THREADS, 0, stream)(loss_sum, logits, targets, V, scale);
  CUDA_CHECK_LAUNCH();
}

void sum_squares(double* acc, const float* x, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  TS_LAUNCH(sum_squares_kernel, 1, 1024, 0, stream)(acc, x, n);
  CUDA_CHECK_LAUNCH();
}

void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& step, cudaStream_t stream) {
  if (n == 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>((n + 255) / 256, 65535));
  TS_LAUNCH(adamw_kernel, blocks, 256, 0, stream)(p, g, m, v, n, step);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ts::cuda
