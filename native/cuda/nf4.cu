// NF4 kernels (cuda/ops.cuh): dequantization (prefill and training take dequant + matrix product) and
// the fused product for small M (decoding), which reads the 4-bit codes once and never materialises
// the weight. Decoding follows core/nf4.h bit for bit: w = level[code] · absmax, element 2i in the high
// nibble, absmax = mean + q · (scale / 127) rounded as two separate float32 operations (no FMA).
#include "cuda/ops.cuh"

namespace ts::cuda {

namespace {

// The 16 NF4 levels of core/nf4.cpp (REFERENCE.md values), for device code.
__device__ const float kNf4Levels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

// The double-quantized absmax of block b, exactly as nf4_block_absmax computes it on the host.
__device__ __forceinline__ float block_absmax(const NF4View& w, int64_t b) {
  const float step = w.absmax_scale[b / NF4_DQ_GROUP] / 127.f;
  return __fadd_rn(w.absmax_mean, __fmul_rn(float(w.absmax_q[b]), step));
}

// out[e] = level[code(e)] · absmax(e / 64), one thread per code byte (two weights)
template <typename T>
__global__ void nf4_dequantize_kernel(T* out, NF4View w) {
  const int64_t bytes = w.rows * w.cols / 2;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < bytes; i += (int64_t)gridDim.x * blockDim.x) {
    const uint8_t c = w.codes[i];
    const float a = block_absmax(w, (2 * i) / NF4_BLOCK);
    out[2 * i] = from_float<T>(kNf4Levels[c >> 4] * a);
    out[2 * i + 1] = from_float<T>(kNf4Levels[c & 15] * a);
  }
}

// Eight consecutive activations as float32.
__device__ __forceinline__ void load8(const float* p, float v[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float v[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);  // one 16-byte load
  bf16 h[8];
  memcpy(h, &raw, sizeof h);  // not a pointer cast: reading a uint4 through bf16 lvalues breaks strict aliasing
  for (int i = 0; i < 8; i++) v[i] = __bfloat162float(h[i]);
}

constexpr int WARPS = 8;          // output rows per block, one per warp
constexpr int LANE_WEIGHTS = 32;  // weights a lane decodes per step: 16 code bytes, half an absmax block

// y[m, n] = Σ_k x[m, k] · W[n, k] + beta · y[m, n]  for m < M <= MAXM; one warp per output row n.
// Lane l of the warp decodes weights [k0, k0 + 32) with k0 = 32 (l + 32 j): one 16-byte load of codes,
// one absmax, a byte -> (level, level) table in shared memory, and the activations of those 32 columns
// for every row m; partial sums are scaled by the block's absmax once, then summed across the warp.
template <typename T, typename Y, int MAXM>
__global__ void __launch_bounds__(WARPS * 32) nf4_nt_kernel(Y* y, const T* x, NF4View w, int M, float beta) {
  __shared__ float2 pair_levels[256];  // code byte -> (level of the high nibble, level of the low nibble)
  for (int i = threadIdx.x; i < 256; i += blockDim.x) pair_levels[i] = make_float2(kNf4Levels[i >> 4], kNf4Levels[i & 15]);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t N = w.rows, K = w.cols;
  const int64_t n = (int64_t)blockIdx.x * WARPS + warp;
  if (n >= N) return;
  const uint8_t* row = w.codes + n * (K / 2);
  float acc[MAXM];
  for (int m = 0; m < MAXM; m++) acc[m] = 0.f;
  for (int64_t k0 = (int64_t)lane * LANE_WEIGHTS; k0 < K; k0 += 32 * LANE_WEIGHTS) {
    const uint4 packed = *reinterpret_cast<const uint4*>(row + k0 / 2);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&packed);
    const float absmax = block_absmax(w, (n * K + k0) / NF4_BLOCK);
    float part[MAXM];
    for (int m = 0; m < MAXM; m++) part[m] = 0.f;
    for (int q = 0; q < LANE_WEIGHTS / 8; q++) {  // 8 weights = 4 code bytes at a time
      float2 lv[4];
      for (int j = 0; j < 4; j++) lv[j] = pair_levels[bytes[4 * q + j]];
      for (int m = 0; m < MAXM; m++) {
        if (m >= M) break;
        float xv[8];
        load8(x + (int64_t)m * K + k0 + 8 * q, xv);
        float s = part[m];
        for (int j = 0; j < 4; j++) s += lv[j].x * xv[2 * j] + lv[j].y * xv[2 * j + 1];
        part[m] = s;
      }
    }
    for (int m = 0; m < MAXM; m++) acc[m] += part[m] * absmax;
  }
  for (int m = 0; m < MAXM; m++) {
    if (m >= M) break;
    const float total = warp_sum(acc[m]);
    if (lane == 0) {
      Y* out = y + (int64_t)m * N + n;
      *out = from_float<Y>(beta == 0.f ? total : total + beta * to_float(*out));
    }
  }
}

template <typename T, typename Y, int MAXM>
void launch_nt(Y* y, const T* x, const NF4View& w, int64_t M, float beta, cudaStream_t stream) {
  const unsigned blocks = unsigned((w.rows + WARPS - 1) / WARPS);
  TS_LAUNCH((nf4_nt_kernel<T, Y, MAXM>), blocks, WARPS * 32, 0, stream)(y, x, w, int(M), beta);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

template <typename T>
void nf4_dequantize(T* out, const NF4View& w, cudaStream_t stream) {
  const int64_t bytes = w.rows * w.cols / 2;
  if (bytes == 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>((bytes + 255) / 256, 65535));
  TS_LAUNCH(nf4_dequantize_kernel<T>, blocks, 256, 0, stream)(out, w);
  CUDA_CHECK_LAUNCH();
}

template <typename T, typename Y>
void nf4_matmul_nt(Y* y, const T* x, const NF4View& w, int64_t M, float beta, cudaStream_t stream) {
  require(M >= 1 && M <= NF4_FUSED_MAX_M, "INTERNAL", "nf4_matmul_nt: M out of the fused range");
  require(w.cols % NF4_BLOCK == 0, "INTERNAL", "nf4_matmul_nt: K must be a multiple of 64");
  if (w.rows == 0) return;
  // The kernel keeps MAXM accumulators per thread: pick the smallest instance that holds M.
  if (M <= 1) launch_nt<T, Y, 1>(y, x, w, M, beta, stream);
  else if (M <= 2) launch_nt<T, Y, 2>(y, x, w, M, beta, stream);
  else if (M <= 4) launch_nt<T, Y, 4>(y, x, w, M, beta, stream);
  else if (M <= 8) launch_nt<T, Y, 8>(y, x, w, M, beta, stream);
  else launch_nt<T, Y, 16>(y, x, w, M, beta, stream);
}

template void nf4_dequantize<float>(float*, const NF4View&, cudaStream_t);
template void nf4_dequantize<bf16>(bf16*, const NF4View&, cudaStream_t);
template void nf4_matmul_nt<float, float>(float*, const float*, const NF4View&, int64_t, float, cudaStream_t);
template void nf4_matmul_nt<bf16, bf16>(bf16*, const bf16*, const NF4View&, int64_t, float, cudaStream_t);
template void nf4_matmul_nt<bf16, float>(float*, const bf16*, const NF4View&, int64_t, float, cudaStream_t);

}  // namespace ts::cuda
