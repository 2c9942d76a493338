// RMSNorm forward/backward (cuda/ops.cuh), one block per row. The row's reductions are accumulated in
// double like the CPU op's, so the float32-compute mode differs from it only in summation order.
#include "cuda/ops.cuh"

namespace ts::cuda {

namespace {

constexpr int THREADS = 256;

// out[m] = x[m] · r · w,  r = 1 / sqrt(mean(x[m]²) + eps); rstd[m] = r when rstd != null
template <typename T>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* x, const T* w, int H, float eps) {
  __shared__ double scratch[32];
  const int64_t m = blockIdx.x;
  const T* xm = x + m * H;
  double ss = 0;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const double v = to_float(xm[i]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf((float)(ss / H) + eps);
  if (rstd && threadIdx.x == 0) rstd[m] = r;
  T* om = out + m * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) om[i] = from_float<T>(to_float(w[i]) * (to_float(xm[i]) * r));
}

// y_i = w_i x_i r  =>  dx_i = r w_i dy_i - x_i r³/H Σ_j w_j dy_j x_j   (dx += with accumulate)
template <typename T>
__global__ void rmsnorm_backward_kernel(T* dx, const T* dout, const T* x, const T* w, const float* rstd, int H,
                                        bool accumulate) {
  __shared__ double scratch[32];
  const int64_t m = blockIdx.x;
  const T* xm = x + m * H;
  const T* dm = dout + m * H;
  const float r = rstd[m];
  double dot = 0;
  for (int i = threadIdx.x; i < H; i += blockDim.x)
    dot += (double)to_float(w[i]) * to_float(dm[i]) * to_float(xm[i]);
  dot = block_sum(dot, scratch);
  const float c = (float)(dot * r * r * r / H);
  T* gm = dx + m * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const float g = r * to_float(w[i]) * to_float(dm[i]) - to_float(xm[i]) * c;
    gm[i] = from_float<T>(accumulate ? to_float(gm[i]) + g : g);
  }
}

}  // namespace

template <typename T>
void rmsnorm_forward(T* out, float* rstd, const T* x, const T* w, int64_t M, int H, float eps, cudaStream_t stream) {
  if (M == 0) return;
  TS_LAUNCH(rmsnorm_forward_kernel<T>, unsigned(M), THREADS, 0, stream)(out, rstd, x, w, H, eps);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void rmsnorm_backward(T* dx, const T* dout, const T* x, const T* w, const float* rstd, int64_t M, int H, bool accumulate,
                      cudaStream_t stream) {
  if (M == 0) return;
  TS_LAUNCH(rmsnorm_backward_kernel<T>, unsigned(M), THREADS, 0, stream)(dx, dout, x, w, rstd, H, accumulate);
  CUDA_CHECK_LAUNCH();
}

template void rmsnorm_forward<float>(float*, float*, const float*, const float*, int64_t, int, float, cudaStream_t);
template void rmsnorm_forward<bf16>(bf16*, float*, const bf16*, const bf16*, int64_t, int, float, cudaStream_t);
template void rmsnorm_backward<float>(float*, const float*, const float*, const float*, const float*, int64_t, int, bool,
                                      cudaStream_t);
template void rmsnorm_backward<bf16>(bf16*, const bf16*, const bf16*, const bf16*, const float*, int64_t, int, bool,
                                     cudaStream_t);

}  // namespace ts::cuda
