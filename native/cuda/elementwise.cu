// Elementwise and row-copy kernels (cuda/ops.cuh): embedding, add, SwiGLU, RoPE, row gather/scatter,
// KV-cache writes, dtype conversion. All bandwidth-bound; arithmetic in float32 whatever T is.
#include "cuda/ops.cuh"

namespace ts::cuda {

namespace {

constexpr int THREADS = 256;

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than needed.
unsigned grid_for(int64_t n) { return unsigned(std::min<int64_t>(std::max<int64_t>(1, (n + THREADS - 1) / THREADS), 65535)); }

// out[m, :] = table[ids[m], :]          one block per row
template <typename T>
__global__ void embedding_kernel(T* out, const int32_t* ids, const T* table, int H) {
  const int64_t m = blockIdx.x;
  const T* src = table + (int64_t)ids[m] * H;
  T* dst = out + m * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) dst[i] = src[i];
}

// x[i] += y[i]
template <typename T>
__global__ void add_kernel(T* x, const T* y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x[i] = from_float<T>(to_float(x[i]) + to_float(y[i]));
}

// x[i] += y[i], y float32
template <typename T>
__global__ void accumulate_f32_kernel(T* x, const float* y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x[i] = from_float<T>(to_float(x[i]) + y[i]);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// out[i] = silu(gate[i]) · up[i]
template <typename T>
__global__ void swiglu_forward_kernel(T* out, const T* gate, const T* up, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g * sigmoid(g) * to_float(up[i]));
  }
}

// h = silu(g)·u ; silu'(g) = σ(g)(1 + g(1 - σ(g)))  =>  dup = dout·g·σ(g), dgate = dout·u·σ(g)(1 + g(1 - σ(g)))
template <typename T>
__global__ void swiglu_backward_kernel(T* dgate, T* dup, const T* dout, const T* gate, const T* up, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    // Every input is read before an output is written: the op may run in place.
    const float g = to_float(gate[i]), u = to_float(up[i]), sg = sigmoid(g), d = to_float(dout[i]);
    dup[i] = from_float<T>(d * g * sg);
    dgate[i] = from_float<T>(d * u * sg * (1.f + g * (1.f - sg)));
  }
}

// One thread per (row, head, i < D/2): (x1, x2) = (x[i], x[i + D/2]) ->
//   (x1·cos - x2·sin, x2·cos + x1·sin), sin negated for the inverse rotation.
template <typename T>
__global__ void rope_kernel(T* x, const int32_t* pos, const float* cos_table, const float* sin_table, int64_t M,
                            int nheads, int D, float sign) {
  const int half = D / 2;
  const int64_t total = M * nheads * half;
  for (int64_t it = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; it < total; it += (int64_t)gridDim.x * blockDim.x) {
    const int i = int(it % half);
    const int64_t mh = it / half;  // row * nheads + head
    const int64_t m = mh / nheads;
    const int64_t p = pos[m];
    const float c = cos_table[p * half + i], s = sign * sin_table[p * half + i];
    T* v = x + mh * D;
    const float x1 = to_float(v[i]), x2 = to_float(v[i + half]);
    v[i] = from_float<T>(x1 * c - x2 * s);
    v[i + half] = from_float<T>(x2 * c + x1 * s);
  }
}

// out[i, :] = in[index[i], :]           one block per output row
template <typename T>
__global__ void gather_rows_kernel(T* out, const T* in, const int32_t* index, int64_t cols) {
  const int64_t i = blockIdx.x;
  const T* src = in + (int64_t)index[i] * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) out[i * cols + c] = src[c];
}

// out[index[i], :] = in[i, :]
template <typename T>
__global__ void scatter_rows_kernel(T* out, const T* in, const int32_t* index, int64_t cols) {
  const int64_t i = blockIdx.x;
  T* dst = out + (int64_t)index[i] * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = in[i * cols + c];
}

// k_cache[slot[m], :] = k[m, :], likewise v     one block per row
template <typename T>
__global__ void kv_write_kernel(T* k_cache, T* v_cache, const T* k, const T* v, const int32_t* slot, int KVD) {
  const int64_t m = blockIdx.x;
  const int64_t dst = (int64_t)slot[m] * KVD;
  for (int c = threadIdx.x; c < KVD; c += blockDim.x) {
    k_cache[dst + c] = k[m * KVD + c];
    v_cache[dst + c] = v[m * KVD + c];
  }
}

template <typename To, typename Ti>
__global__ void convert_kernel(To* out, const Ti* in, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_float<To>(to_float(in[i]));
}

}  // namespace

template <typename T>
void embedding_forward(T* out, const int32_t* ids, const T* table, int64_t M, int H, cudaStream_t stream) {
  if (M == 0) return;
  TS_LAUNCH(embedding_kernel<T>, unsigned(M), THREADS, 0, stream)(out, ids, table, H);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void add_inplace(T* x, const T* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  TS_LAUNCH(add_kernel<T>, grid_for(n), THREADS, 0, stream)(x, y, n);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void accumulate_f32(T* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  TS_LAUNCH(accumulate_f32_kernel<T>, grid_for(n), THREADS, 0, stream)(x, y, n);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  TS_LAUNCH(swiglu_forward_kernel<T>, grid_for(n), THREADS, 0, stream)(out, gate, up, n);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  TS_LAUNCH(swiglu_backward_kernel<T>, grid_for(n), THREADS, 0, stream)(dgate, dup, dout, gate, up, n);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void rope_apply(T* x, const int32_t* pos, const RopeView& rope, int64_t M, int nheads, bool inverse,
                cudaStream_t stream) {
  const int64_t n = M * nheads * (rope.D / 2);
  if (n == 0) return;
  TS_LAUNCH(rope_kernel<T>, grid_for(n), THREADS, 0, stream)(x, pos, rope.cos, rope.sin, M, nheads, rope.D,
                                                             inverse ? -1.f : 1.f);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void gather_rows(T* out, const T* in, const int32_t* index, int64_t n, int64_t cols, cudaStream_t stream) {
  if (n == 0) return;
  TS_LAUNCH(gather_rows_kernel<T>, unsigned(n), THREADS, 0, stream)(out, in, index, cols);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void scatter_rows(T* out, const T* in, const int32_t* index, int64_t n, int64_t cols, cudaStream_t stream) {
  if (n == 0) return;
  TS_LAUNCH(scatter_rows_kernel<T>, unsigned(n), THREADS, 0, stream)(out, in, index, cols);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void kv_write(T* k_cache, T* v_cache, const T* k, const T* v, const int32_t* slot, int64_t M, int KVD,
              cudaStream_t stream) {
  if (M == 0) return;
  TS_LAUNCH(kv_write_kernel<T>, unsigned(M), THREADS, 0, stream)(k_cache, v_cache, k, v, slot, KVD);
  CUDA_CHECK_LAUNCH();
}

template <typename To, typename Ti>
void convert(To* out, const Ti* in, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  TS_LAUNCH((convert_kernel<To, Ti>), grid_for(n), THREADS, 0, stream)(out, in, n);
  CUDA_CHECK_LAUNCH();
}

#define TS_INSTANTIATE(T)                                                                                          \
  template void embedding_forward<T>(T*, const int32_t*, const T*, int64_t, int, cudaStream_t);                     \
  template void add_inplace<T>(T*, const T*, int64_t, cudaStream_t);                                                \
  template void accumulate_f32<T>(T*, const float*, int64_t, cudaStream_t);                                         \
  template void swiglu_forward<T>(T*, const T*, const T*, int64_t, cudaStream_t);                                   \
  template void swiglu_backward<T>(T*, T*, const T*, const T*, const T*, int64_t, cudaStream_t);                    \
  template void rope_apply<T>(T*, const int32_t*, const RopeView&, int64_t, int, bool, cudaStream_t);               \
  template void gather_rows<T>(T*, const T*, const int32_t*, int64_t, int64_t, cudaStream_t);                       \
  template void scatter_rows<T>(T*, const T*, const int32_t*, int64_t, int64_t, cudaStream_t);                      \
  template void kv_write<T>(T*, T*, const T*, const T*, const int32_t*, int64_t, int, cudaStream_t);
TS_INSTANTIATE(float)
TS_INSTANTIATE(bf16)
#undef TS_INSTANTIATE
template void convert<float, bf16>(float*, const bf16*, int64_t, cudaStream_t);
template void convert<bf16, float>(bf16*, const float*, int64_t, cudaStream_t);
template void convert<float, float>(float*, const float*, int64_t, cudaStream_t);

}  // namespace ts::cuda
