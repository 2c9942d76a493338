// Attention on the GPU, mirroring cpu/ops.cpp: paged attention of inference rows over the KV cache,
// and the causal (optionally packed) GQA attention of training with its flash-attention-2 style
// backward. T is the activation type (float in the check mode, bf16); every score, softmax and
// accumulation is float32. Softmax runs in the base-2 domain (scores pre-multiplied by log2(e)/√D,
// exp2f), which is the same function as the CPU's natural exp up to float rounding.
//
// Shape letters: M inference rows, B sequences of T tokens, NH query heads, NKV kv heads, D head dim,
// G = NH / NKV query heads per kv head, KVD = NKV·D, QD = NH·D.
//
// Fast paths: D in {64, 128} (and G in {1, 2, 4, 8} for the paged kernel) with 16-byte aligned
// tensors. Any other even D up to 256 (or misaligned pointers) runs a simple warp-per-row kernel
// that is correct but slow.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "cuda/ops.cuh"

namespace ts::cuda {

namespace {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr int MAX_D = 256;                  // largest head dim any path supports
constexpr int GENERIC_DIMS = MAX_D / WARP;  // dims per lane in the warp-per-row kernels

__host__ __device__ constexpr int log2_int(int x) { return x <= 1 ? 0 : 1 + log2_int(x / 2); }

// Sixteen bytes of T (8 bf16 or 4 float): one vector load or store.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / int(sizeof(T));
  T v[N];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Per-device limits, read once per device (cudaGetDeviceProperties is slow on some drivers).
struct DeviceLimits {
  int multiprocessors = 0;
  size_t shared_optin = 0;  // bytes of dynamic shared memory a block may opt in to
};
DeviceLimits device_limits() {
  constexpr int MAX_DEVICES = 64;
  static std::atomic<int> sms[MAX_DEVICES];
  static std::atomic<long long> optin[MAX_DEVICES];
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  DeviceLimits limits;
  if (device >= 0 && device < MAX_DEVICES && sms[device].load() > 0) {
    limits.multiprocessors = sms[device].load();
    limits.shared_optin = size_t(optin[device].load());
    return limits;
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  limits.multiprocessors = prop.multiProcessorCount;
  limits.shared_optin = prop.sharedMemPerBlockOptin;
  if (device >= 0 && device < MAX_DEVICES) {
    optin[device].store((long long)limits.shared_optin);
    sms[device].store(limits.multiprocessors);
  }
  return limits;
}

// Lets `kernel` use more than the default 48 KiB of dynamic shared memory (per device, so per call).
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <typename T>
constexpr DType dtype_of() {
  return std::is_same<T, float>::value ? DType::F32 : DType::BF16;
}

// ==== paged attention (inference) ====================================================================
//
// For every row m and query head h (kv head kh = h / G), over the n = len[m] cached positions of the
// row's sequence (position j at cache row table[j / block_size]·block_size + j % block_size):
//   s_j = q[m, h]·k[j, kh] / √D
//   out[m, h] = Σ_j softmax(s)_j · v[j, kh]          (n == 0: out = 0, as on the CPU)
//
// Fast kernel: one block per (m, kh) serving the G query heads of the group, so K and V are read once
// per group. Warps take 32-position chunks round robin and keep their own online-softmax state
// (running max m, sum l, accumulator acc per head); the block merges the warp states at the end:
//   M = max_w m_w ;  out = Σ_w acc_w·2^(m_w − M) / Σ_w l_w·2^(m_w − M)
// Inside a chunk, LPP lanes share a position: each loads 16-byte vectors of K (coalesced along the
// row), forms G partial dot products, and a butterfly reduce-scatter leaves one head's full score
// per lane. The chunk's scores go to shared memory, one lane per position takes the softmax step,
// then the same lanes stream V with the probabilities read back from shared memory.

constexpr int PAGED_CHUNK = 32;  // positions per warp chunk (one per lane in the softmax step)
constexpr int PAGED_MAX_WARPS = 16;
// With G = 8 the query and accumulator registers (2·G·ELEMS floats per lane) need more than the 128
// registers a 512-thread block allows, so those kernels run at most 8 warps.
__host__ __device__ constexpr int paged_max_warps(int G) { return G >= 8 ? 8 : PAGED_MAX_WARPS; }
constexpr size_t PAGED_SHARED_BUDGET = 48 * 1024;  // stays under the default limit: no opt-in needed

template <typename T, int D, int G>
struct PagedLayout {
  static constexpr int VEC = Vec16<T>::N;                // elements per 16-byte vector
  static constexpr int NV = D / VEC;                     // vectors per head row
  static constexpr int LPP = NV < WARP ? NV : WARP;      // lanes per position
  static constexpr int VPL = NV / LPP;                   // vectors per lane
  static constexpr int PPI = WARP / LPP;                 // positions per warp step
  static constexpr int STEPS = PAGED_CHUNK / PPI;        // warp steps per chunk
  static constexpr int LOG_LPP = log2_int(LPP);
  static constexpr int LOG_G = log2_int(G);
  static constexpr int ELEMS = VPL * VEC;                // elements of a head row one lane holds
  static_assert(D % VEC == 0 && (NV & (NV - 1)) == 0, "head row must be a power-of-two number of vectors");
  static_assert(G <= LPP && (G & (G - 1)) == 0, "reduce-scatter needs a power-of-two G <= lanes per position");
  // Shared floats per warp: cache rows of the chunk (as int), scores/probabilities (G, CHUNK),
  // the warp's final state (G, D + 2): acc, then m, then l.
  static constexpr int WARP_FLOATS = PAGED_CHUNK + G * PAGED_CHUNK + G * (D + 2);
};

// On entry each lane of a position group (LPP lanes, xor-butterfly partners) holds G partial dot
// products; on exit it holds the full dot product of head part >> (LOG_LPP − LOG_G). Halving the heads
// at each of the first LOG_G steps costs G − 1 shuffles where G all-reduces would cost G·LOG_LPP.
template <int G, int LPP>
__device__ __forceinline__ float reduce_scatter_heads(const float (&partial)[G], int part) {
  constexpr int LOG_LPP = log2_int(LPP), LOG_G = log2_int(G);
  float v[G];
#pragma unroll
  for (int g = 0; g < G; g++) v[g] = partial[g];
#pragma unroll
  for (int step = 0; step < LOG_LPP; step++) {
    const int o = LPP >> (step + 1);
    if (step < LOG_G) {
      const int half = G >> (step + 1);
      const bool upper = (part & o) != 0;
#pragma unroll
      for (int i = 0; i < half; i++) {
        const float send = upper ? v[i] : v[i + half];
        const float keep = upper ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(FULL_MASK, send, o);
      }
    } else {
      v[0] += __shfl_xor_sync(FULL_MASK, v[0], o);
    }
  }
  return v[0];
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(paged_max_warps(G) * WARP)
    attention_paged_kernel(T* out,                 // (M, NH·D)
                           const T* q,             // (M, NH·D)
                           const T* k_cache,       // (num_blocks·block_size, KVD)
                           const T* v_cache,       // (num_blocks·block_size, KVD)
                           PagedRows rows, int block_size, int KVD, int NH, float scale_log2) {
  using L = PagedLayout<T, D, G>;
  const int m = blockIdx.x, kh = blockIdx.y;
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, warps = blockDim.x / WARP;
  const int sub = lane / L::LPP, part = lane % L::LPP;  // position within a warp step, lane within it
  TS_DYNAMIC_SHARED(float, smem);
  int* chunk_rows = reinterpret_cast<int*>(smem) + warp * PAGED_CHUNK;           // (CHUNK) cache rows
  float* scores = smem + warps * PAGED_CHUNK + warp * G * PAGED_CHUNK;           // (G, CHUNK)
  float* merge = smem + warps * (PAGED_CHUNK + G * PAGED_CHUNK);                 // (warps, G, D + 2)

  const int n = rows.len[m];
  const int32_t* table = rows.block_tables + int64_t(rows.row_seq[m]) * rows.max_blocks;
  const int64_t head_offset = int64_t(kh) * D;

  float qf[G][L::ELEMS];
#pragma unroll
  for (int g = 0; g < G; g++) {
    const T* qh = q + (int64_t(m) * NH + kh * G + g) * D;
#pragma unroll
    for (int v = 0; v < L::VPL; v++) {
      const Vec16<T> x = load16(qh + (part + v * L::LPP) * L::VEC);
#pragma unroll
      for (int e = 0; e < L::VEC; e++) qf[g][v * L::VEC + e] = to_float(x.v[e]);
    }
  }
  float acc[G][L::ELEMS];
  float m_run[G], l_part[G];  // m: warp-uniform running max (log2 domain); l: this lane's share of the sum
#pragma unroll
  for (int g = 0; g < G; g++) {
    m_run[g] = -INFINITY;
    l_part[g] = 0.f;
#pragma unroll
    for (int e = 0; e < L::ELEMS; e++) acc[g][e] = 0.f;
  }

  const int chunks = (n + PAGED_CHUNK - 1) / PAGED_CHUNK;
  for (int c = warp; c < chunks; c += warps) {
    const int base = c * PAGED_CHUNK;
    {
      const int pos = base + lane;
      chunk_rows[lane] = pos < n ? table[pos / block_size] * block_size + pos % block_size : 0;
    }
    __syncwarp();

    // Scores of the chunk (log2 domain), -inf past the end.
#pragma unroll
    for (int step = 0; step < L::STEPS; step++) {
      const int j = step * L::PPI + sub;
      const bool valid = base + j < n;
      float dot[G];
#pragma unroll
      for (int g = 0; g < G; g++) dot[g] = 0.f;
      if (valid) {
        const T* kr = k_cache + int64_t(chunk_rows[j]) * KVD + head_offset;
#pragma unroll
        for (int v = 0; v < L::VPL; v++) {
          const Vec16<T> x = load16(kr + (part + v * L::LPP) * L::VEC);
#pragma unroll
          for (int e = 0; e < L::VEC; e++) {
            const float kx = to_float(x.v[e]);
#pragma unroll
            for (int g = 0; g < G; g++) dot[g] += qf[g][v * L::VEC + e] * kx;
          }
        }
      }
      const float full = reduce_scatter_heads<G, L::LPP>(dot, part);
      if ((part & ((1 << (L::LOG_LPP - L::LOG_G)) - 1)) == 0)
        scores[(part >> (L::LOG_LPP - L::LOG_G)) * PAGED_CHUNK + j] = valid ? full * scale_log2 : -INFINITY;
    }
    __syncwarp();

    // Online-softmax step: lane j owns position j; probabilities replace the scores.
#pragma unroll
    for (int g = 0; g < G; g++) {
      const float s = scores[g * PAGED_CHUNK + lane];
      const float m_new = fmaxf(m_run[g], warp_max(s));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no finite score yet: avoid -inf − -inf
      const float alpha = exp2f(m_run[g] - m_use);
      const float p = exp2f(s - m_use);
      scores[g * PAGED_CHUNK + lane] = p;
      l_part[g] = l_part[g] * alpha + p;
#pragma unroll
      for (int e = 0; e < L::ELEMS; e++) acc[g][e] *= alpha;
      m_run[g] = m_new;
    }
    __syncwarp();

    // acc += p_j · v_j over the chunk.
#pragma unroll
    for (int step = 0; step < L::STEPS; step++) {
      const int j = step * L::PPI + sub;
      if (base + j < n) {
        const T* vr = v_cache + int64_t(chunk_rows[j]) * KVD + head_offset;
        float p[G];
#pragma unroll
        for (int g = 0; g < G; g++) p[g] = scores[g * PAGED_CHUNK + j];
#pragma unroll
        for (int v = 0; v < L::VPL; v++) {
          const Vec16<T> x = load16(vr + (part + v * L::LPP) * L::VEC);
#pragma unroll
          for (int e = 0; e < L::VEC; e++) {
            const float vx = to_float(x.v[e]);
#pragma unroll
            for (int g = 0; g < G; g++) acc[g][v * L::VEC + e] += p[g] * vx;
          }
        }
      }
    }
    __syncwarp();  // the next chunk overwrites chunk_rows and scores
  }

  // The lanes of different position slots accumulated different positions into the same dims.
#pragma unroll
  for (int o = L::LPP; o < WARP; o <<= 1) {
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
      for (int e = 0; e < L::ELEMS; e++) acc[g][e] += __shfl_xor_sync(FULL_MASK, acc[g][e], o);
    }
  }
  float* mine = merge + warp * G * (D + 2);
#pragma unroll
  for (int g = 0; g < G; g++) {
    const float l = warp_sum(l_part[g]);
    if (sub == 0) {
#pragma unroll
      for (int v = 0; v < L::VPL; v++) {
#pragma unroll
        for (int e = 0; e < L::VEC; e++) mine[g * (D + 2) + (part + v * L::LPP) * L::VEC + e] = acc[g][v * L::VEC + e];
      }
    }
    if (lane == 0) {
      mine[g * (D + 2) + D] = m_run[g];
      mine[g * (D + 2) + D + 1] = l;
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    float mx = -INFINITY;
    for (int w = 0; w < warps; w++) mx = fmaxf(mx, merge[(w * G + g) * (D + 2) + D]);
    float total = 0.f, o = 0.f;
    if (mx > -INFINITY) {
      for (int w = 0; w < warps; w++) {
        const float* st = merge + (w * G + g) * (D + 2);
        const float f = exp2f(st[D] - mx);  // a warp with no positions has m = -inf: weight 0
        total += st[D + 1] * f;
        o += st[d] * f;
      }
    }
    out[(int64_t(m) * NH + kh * G + g) * D + d] = from_float<T>(total > 0.f ? o / total : 0.f);
  }
}

// Any even D <= 256 and any G: one warp per (row m, query head h), lanes over D, one position at a time.
template <typename T>
__global__ void attention_paged_generic_kernel(T* out,            // (M, NH·D)
                                               const T* q,        // (M, NH·D)
                                               const T* k_cache,  // (num_blocks·block_size, KVD)
                                               const T* v_cache,  // (num_blocks·block_size, KVD)
                                               PagedRows rows, int64_t M, int block_size, int KVD, int NH, int G,
                                               int D, float scale_log2) {
  const int warps = blockDim.x / WARP, lane = threadIdx.x % WARP;
  const int64_t item = int64_t(blockIdx.x) * warps + threadIdx.x / WARP;
  if (item >= M * NH) return;  // the whole warp leaves together
  const int64_t m = item / NH;
  const int h = int(item % NH), kh = h / G;
  const int n = rows.len[m];
  const int32_t* table = rows.block_tables + int64_t(rows.row_seq[m]) * rows.max_blocks;
  float qf[GENERIC_DIMS], acc[GENERIC_DIMS];
#pragma unroll
  for (int i = 0; i < GENERIC_DIMS; i++) {
    const int d = lane + i * WARP;
    qf[i] = d < D ? to_float(q[(m * NH + h) * D + d]) : 0.f;
    acc[i] = 0.f;
  }
  float m_run = -INFINITY, l = 0.f;
  for (int j = 0; j < n; j++) {
    const int64_t row = int64_t(table[j / block_size]) * block_size + j % block_size;
    const T* kr = k_cache + row * KVD + int64_t(kh) * D;
    const T* vr = v_cache + row * KVD + int64_t(kh) * D;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < GENERIC_DIMS; i++) {
      const int d = lane + i * WARP;
      if (d < D) dot += qf[i] * to_float(kr[d]);
    }
    const float s = warp_sum(dot) * scale_log2;
    const float m_new = fmaxf(m_run, s);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_run - m_use), p = exp2f(s - m_use);
    l = l * alpha + p;
#pragma unroll
    for (int i = 0; i < GENERIC_DIMS; i++) {
      const int d = lane + i * WARP;
      acc[i] = acc[i] * alpha + (d < D ? p * to_float(vr[d]) : 0.f);
    }
    m_run = m_new;
  }
#pragma unroll
  for (int i = 0; i < GENERIC_DIMS; i++) {
    const int d = lane + i * WARP;
    if (d < D) out[(m * NH + h) * D + d] = from_float<T>(l > 0.f ? acc[i] / l : 0.f);
  }
}

template <typename T, int D, int G>
void launch_paged(T* out, const T* q, const KVLayerView& kv, const PagedRows& rows, int64_t M, int NH, int NKV,
                  float scale_log2, cudaStream_t stream) {
  using L = PagedLayout<T, D, G>;
  // Small decode batches leave most SMs idle (one block per (row, kv head)); more warps per block then
  // keep more loads in flight on the SMs that do work.
  int warps = M * NKV < device_limits().multiprocessors ? paged_max_warps(G) : 8;
  const int fit = int(PAGED_SHARED_BUDGET / (L::WARP_FLOATS * sizeof(float)));
  warps = std::max(1, std::min(warps, fit));
  const size_t shared = size_t(warps) * L::WARP_FLOATS * sizeof(float);
  TS_LAUNCH((attention_paged_kernel<T, D, G>), dim3(unsigned(M), unsigned(NKV)), warps * WARP, shared, stream)(
      out, q, static_cast<const T*>(kv.k), static_cast<const T*>(kv.v), rows, kv.block_size, kv.KVD, NH, scale_log2);
  CUDA_CHECK_LAUNCH();
}

template <typename T, int D>
bool launch_paged_for_d(T* out, const T* q, const KVLayerView& kv, const PagedRows& rows, int64_t M, int NH, int NKV,
                        float scale_log2, cudaStream_t stream) {
  switch (NH / NKV) {
    case 1: launch_paged<T, D, 1>(out, q, kv, rows, M, NH, NKV, scale_log2, stream); return true;
    case 2: launch_paged<T, D, 2>(out, q, kv, rows, M, NH, NKV, scale_log2, stream); return true;
    case 4: launch_paged<T, D, 4>(out, q, kv, rows, M, NH, NKV, scale_log2, stream); return true;
    case 8: launch_paged<T, D, 8>(out, q, kv, rows, M, NH, NKV, scale_log2, stream); return true;
    default: return false;
  }
}

void check_attention_args(int NH, int NKV, int D, const char* what) {
  require(NH > 0 && NKV > 0 && NH % NKV == 0, "INVALID_ARGUMENT",
          std::string(what) + ": NH (" + std::to_string(NH) + ") must be a positive multiple of NKV (" +
              std::to_string(NKV) + ")");
  require(D > 0 && D % 2 == 0 && D <= MAX_D, "INVALID_ARGUMENT",
          std::string(what) + ": head dim " + std::to_string(D) + " must be even and at most 256");
}

// ==== training attention ==============================================================================
//
// Rows b·T + t; row t of sequence b attends to keys j in [s_t, t], s_t = doc_start[b·T + t] (0 when
// doc_start is null). With S_tj = q_t·k_j / √D and P = softmax_j(S):
//   forward    out_t = Σ_j P_tj v_j ;  lse_t = log Σ_j exp(S_tj)                (lse saved, (B, NH, T))
//   backward   P_tj = exp(S_tj − lse_t) ; dP_tj = dout_t·v_j ; Δ_t = dout_t·out_t ; dS_tj = P_tj (dP_tj − Δ_t)
//              dq_t = Σ_j dS_tj k_j / √D
//              dk_j = Σ_{h in group, t} dS_tj q_t / √D ;  dv_j = Σ_{h in group, t} P_tj dout_t
//
// Tiles live in shared memory as float, rows padded by 4 floats so that 16 lanes reading 16 rows at
// the same column hit different banks while float4 reads stay aligned.

constexpr int PAD = 4;
constexpr int TILE_THREADS = 256;  // 16 × 16 threads: tx along keys / head dims, ty along query rows

// Loads `rows` rows (row `row0` on, `valid` of them real, the rest zero) of D elements with a row
// stride of `stride` elements into dst (rows, D + PAD) as float.
template <typename T, int D>
__device__ __forceinline__ void load_tile(float* dst, const T* src, int64_t stride, int row0, int valid, int rows) {
  constexpr int VEC = Vec16<T>::N, NV = D / VEC;
  for (int i = threadIdx.x; i < rows * NV; i += blockDim.x) {
    const int r = i / NV, dv = i % NV;
    float* o = dst + r * (D + PAD) + dv * VEC;
    if (r < valid) {
      const Vec16<T> x = load16(src + int64_t(row0 + r) * stride + dv * VEC);
#pragma unroll
      for (int e = 0; e < VEC; e++) o[e] = to_float(x.v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; e++) o[e] = 0.f;
    }
  }
}

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float component(float4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

__device__ __forceinline__ int warp_min_int(int v) {
  for (int o = WARP / 2; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// ---- forward: one block per (query tile of 64 rows, head h, sequence b), key tiles of 64 -----------
//
// Flash-attention 2 in SIMT: for each key tile from the tile's lowest document start to its last row,
// S = Q·Kᵀ (each thread a 4 × 4 cell block: rows ty + 16i, keys tx + 16j), masked, then the online
// softmax per row (the row's 16 threads share one half-warp: max by shuffles, the sum kept per thread
// and added once at the end), P to shared memory, acc = acc·α + P·V. K and V take turns in one buffer
// so that D = 128 fits in 85 KB of shared memory (sm_89 allows 99 KB per block).

constexpr int FWD_BQ = 64, FWD_BK = 64;

template <int D>
constexpr size_t forward_shared_bytes() {
  // Q tile, one K-or-V tile (K, then V into the same buffer), P tile, doc-start minimum.
  return sizeof(float) * (FWD_BQ * (D + PAD) + FWD_BK * (D + PAD) + FWD_BQ * (FWD_BK + PAD)) + 16;
}

template <typename T, int D>
__global__ void __launch_bounds__(TILE_THREADS)
    attention_forward_kernel(T* out,        // (B·T, NH·D)
                             float* lse,    // (B, NH, T)
                             const T* q,    // (B·T, NH·D)
                             const T* k,    // (B·T, NKV·D)
                             const T* v,    // (B·T, NKV·D)
                             AttentionShape s, float scale_log2) {
  constexpr int DC = D / 64;  // float4 column chunks per thread in the output tile
  const int seq_len = s.T, NH = s.NH, G = s.NH / s.NKV;
  const int64_t QD = int64_t(NH) * D, KVD = int64_t(s.NKV) * D;
  const int q0 = blockIdx.x * FWD_BQ, h = blockIdx.y, b = blockIdx.z, kh = h / G;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  TS_DYNAMIC_SHARED(float, smem);
  float* qs = smem;                           // (BQ, D + PAD)
  float* kvs = qs + FWD_BQ * (D + PAD);       // (BK, D + PAD): K, then V
  float* ps = kvs + FWD_BK * (D + PAD);       // (BQ, BK + PAD)
  int* lowest_start = reinterpret_cast<int*>(ps + FWD_BQ * (FWD_BK + PAD));

  const int rows_valid = min(FWD_BQ, seq_len - q0);
  const T* q_base = q + int64_t(b) * seq_len * QD + int64_t(h) * D;
  const T* k_base = k + int64_t(b) * seq_len * KVD + int64_t(kh) * D;
  const T* v_base = v + int64_t(b) * seq_len * KVD + int64_t(kh) * D;
  if (threadIdx.x == 0) *lowest_start = INT_MAX;
  load_tile<T, D>(qs, q_base, QD, q0, rows_valid, FWD_BQ);

  // This thread's rows r_i = ty + 16i: their first key, INT_MAX past the sequence.
  int start[4];
  int my_lowest = INT_MAX;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int t = q0 + ty + 16 * i;
    start[i] = t < seq_len ? (s.doc_start ? s.doc_start[int64_t(b) * seq_len + t] : 0) : INT_MAX;
    my_lowest = min(my_lowest, start[i]);
  }
  __syncthreads();
  if (tx == 0) atomicMin(lowest_start, my_lowest);
  __syncthreads();
  const int k_begin = (*lowest_start / FWD_BK) * FWD_BK;
  const int k_end = min(q0 + FWD_BQ, seq_len);

  float m_run[4], l_part[4], acc[4][DC][4];
#pragma unroll
  for (int i = 0; i < 4; i++) {
    m_run[i] = -INFINITY;
    l_part[i] = 0.f;
#pragma unroll
    for (int c = 0; c < DC; c++) acc[i][c][0] = acc[i][c][1] = acc[i][c][2] = acc[i][c][3] = 0.f;
  }

  for (int k0 = k_begin; k0 < k_end; k0 += FWD_BK) {
    __syncthreads();  // the previous tile's V is no longer read
    load_tile<T, D>(kvs, k_base, KVD, k0, min(FWD_BK, seq_len - k0), FWD_BK);
    __syncthreads();

    float sc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
      float4 qv[4], kv4[4];
#pragma unroll
      for (int i = 0; i < 4; i++) qv[i] = load4(qs + (ty + 16 * i) * (D + PAD) + d);
#pragma unroll
      for (int j = 0; j < 4; j++) kv4[j] = load4(kvs + (tx + 16 * j) * (D + PAD) + d);
#pragma unroll
      for (int i = 0; i < 4; i++) {
#pragma unroll
        for (int j = 0; j < 4; j++) sc[i][j] += dot4(qv[i], kv4[j]);
      }
    }

#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int t = q0 + ty + 16 * i;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int key = k0 + tx + 16 * j;
        const bool valid = t < seq_len && key <= t && key >= start[i];
        sc[i][j] = valid ? sc[i][j] * scale_log2 : -INFINITY;
        mx = fmaxf(mx, sc[i][j]);
      }
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, o));  // the row's 16 lanes
      const float m_new = fmaxf(m_run[i], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[i] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const float p = exp2f(sc[i][j] - m_use);
        ps[(ty + 16 * i) * (FWD_BK + PAD) + tx + 16 * j] = p;
        sum += p;
      }
      l_part[i] = l_part[i] * alpha + sum;
      m_run[i] = m_new;
#pragma unroll
      for (int c = 0; c < DC; c++) {
        acc[i][c][0] *= alpha;
        acc[i][c][1] *= alpha;
        acc[i][c][2] *= alpha;
        acc[i][c][3] *= alpha;
      }
    }
    __syncthreads();  // K no longer read; P complete
    load_tile<T, D>(kvs, v_base, KVD, k0, min(FWD_BK, seq_len - k0), FWD_BK);
    __syncthreads();

#pragma unroll 2
    for (int c0 = 0; c0 < FWD_BK; c0 += 4) {
      float4 pv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) pv[i] = load4(ps + (ty + 16 * i) * (FWD_BK + PAD) + c0);
#pragma unroll
      for (int cc = 0; cc < 4; cc++) {
#pragma unroll
        for (int c = 0; c < DC; c++) {
          const float4 vv = load4(kvs + (c0 + cc) * (D + PAD) + c * 64 + tx * 4);
#pragma unroll
          for (int i = 0; i < 4; i++) {
            const float p = component(pv[i], cc);
            acc[i][c][0] += p * vv.x;
            acc[i][c][1] += p * vv.y;
            acc[i][c][2] += p * vv.z;
            acc[i][c][3] += p * vv.w;
          }
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; i++) {
    float l = l_part[i];
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) l += __shfl_xor_sync(FULL_MASK, l, o);
    const int t = q0 + ty + 16 * i;
    if (t >= seq_len) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;  // l == 0 only for a row with no key (invalid doc_start)
    T* o = out + (int64_t(b) * seq_len + t) * QD + int64_t(h) * D;
#pragma unroll
    for (int c = 0; c < DC; c++) {
#pragma unroll
      for (int e = 0; e < 4; e++) o[c * 64 + tx * 4 + e] = from_float<T>(acc[i][c][e] * inv);
    }
    if (tx == 0) lse[(int64_t(b) * NH + h) * seq_len + t] = l > 0.f ? (m_run[i] + log2f(l)) * LN2 : -INFINITY;
  }
}

// ---- backward: dk/dv over key tiles, dq over query tiles (each output owned by one block) -----------
//
// Two kernels, no scratch and no atomics: one block per (key tile, kv head, b) loops over the group's G
// heads and the query tiles at or after its keys, accumulating dk and dv in registers; one block per
// (query tile, head, b) loops over its key tiles for dq. Both recompute S and dP (P from the saved lse)
// and Δ_t = dout_t·out_t, so nothing of size (T, T) or (B, NH, T) beyond lse is ever stored; the price
// is computing S and dP twice.

constexpr int BWD_B = 32;  // rows of every backward tile (query and key)

template <int D>
constexpr size_t backward_shared_bytes() {
  // Four (32, D + PAD) tiles, two (32, 32 + PAD) tiles, and per-row start / lse·log2e / Δ, tile minimum.
  return sizeof(float) * (4 * BWD_B * (D + PAD) + 2 * BWD_B * (BWD_B + PAD) + 3 * BWD_B) + 16;
}

// The first key of each row of a query tile (INT_MAX past the sequence) into row_start and the
// tile's lowest into *tile_lowest; synchronizes, then returns that lowest first key.
__device__ __forceinline__ int backward_row_starts(int* row_start, int* tile_lowest, const AttentionShape& s, int b,
                                                   int q0) {
  if (threadIdx.x / WARP == 0) {
    const int lane = threadIdx.x % WARP, t = q0 + lane;
    const int start = t < s.T ? (s.doc_start ? s.doc_start[int64_t(b) * s.T + t] : 0) : INT_MAX;
    row_start[lane] = start;
    const int lowest = warp_min_int(start);
    if (lane == 0) *tile_lowest = lowest;
  }
  __syncthreads();
  return *tile_lowest;
}

// lse·log2(e) and Δ = dout·out of each row of a query tile for head h (dout from the shared tile, out
// from memory). Needs the dout tile loaded and synchronized; synchronizes before returning.
template <typename T, int D>
__device__ __forceinline__ void backward_row_stats(float* row_lse, float* row_delta, const float* douts, const T* out,
                                                   const float* lse, const AttentionShape& s, int b, int h, int q0) {
  const int seq_len = s.T, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, warps = blockDim.x / WARP;
  const int64_t QD = int64_t(s.NH) * D;
  if (warp == 0) {
    const int t = q0 + lane;
    row_lse[lane] = t < seq_len ? lse[(int64_t(b) * s.NH + h) * seq_len + t] * LOG2E : 0.f;
  }
  for (int r = warp; r < BWD_B; r += warps) {
    const int t = q0 + r;
    float d = 0.f;
    if (t < seq_len) {
      const T* o = out + (int64_t(b) * seq_len + t) * QD + int64_t(h) * D;
      for (int c = lane; c < D; c += WARP) d += douts[r * (D + PAD) + c] * to_float(o[c]);
    }
    d = warp_sum(d);
    if (lane == 0) row_delta[r] = d;
  }
  __syncthreads();
}

// S = Q·Kᵀ and dP = dO·Vᵀ for this thread's 2 × 2 cells (rows ty + 16i, keys tx + 16j), then
// P = exp(S − lse) and dS = P (dP − Δ) / √D under the causal / document mask.
template <int D>
__device__ __forceinline__ void backward_scores(float (&p)[2][2], float (&ds)[2][2], const float* qs,
                                                const float* douts, const float* ks, const float* vs,
                                                const int* row_start, const float* row_lse, const float* row_delta,
                                                int q0, int k0, int seq_len, float scale, float scale_log2) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float sc[2][2] = {{0.f, 0.f}, {0.f, 0.f}}, dp[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll 4
  for (int d = 0; d < D; d += 4) {
    float4 qv[2], ov[2], kv4[2], vv[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
      qv[i] = load4(qs + (ty + 16 * i) * (D + PAD) + d);
      ov[i] = load4(douts + (ty + 16 * i) * (D + PAD) + d);
      kv4[i] = load4(ks + (tx + 16 * i) * (D + PAD) + d);
      vv[i] = load4(vs + (tx + 16 * i) * (D + PAD) + d);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
      for (int j = 0; j < 2; j++) {
        sc[i][j] += dot4(qv[i], kv4[j]);
        dp[i][j] += dot4(ov[i], vv[j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int r = ty + 16 * i, t = q0 + r;
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const int key = k0 + tx + 16 * j;
      const bool valid = t < seq_len && key <= t && key >= row_start[r];
      p[i][j] = valid ? exp2f(sc[i][j] * scale_log2 - row_lse[r]) : 0.f;
      ds[i][j] = p[i][j] * (dp[i][j] - row_delta[r]) * scale;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(TILE_THREADS)
    attention_backward_dkdv_kernel(T* dk,            // (B·T, NKV·D)
                                   T* dv,            // (B·T, NKV·D)
                                   const T* dout,    // (B·T, NH·D)
                                   const T* out,     // (B·T, NH·D)
                                   const float* lse, // (B, NH, T)
                                   const T* q,       // (B·T, NH·D)
                                   const T* k,       // (B·T, NKV·D)
                                   const T* v,       // (B·T, NKV·D)
                                   AttentionShape s, float scale, float scale_log2) {
  constexpr int DC = D / 64;
  const int seq_len = s.T, G = s.NH / s.NKV;
  const int64_t QD = int64_t(s.NH) * D, KVD = int64_t(s.NKV) * D;
  const int k0 = blockIdx.x * BWD_B, kh = blockIdx.y, b = blockIdx.z;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  TS_DYNAMIC_SHARED(float, smem);
  float* ks = smem;                        // (32, D + PAD)
  float* vs = ks + BWD_B * (D + PAD);      // (32, D + PAD)
  float* qs = vs + BWD_B * (D + PAD);      // (32, D + PAD)
  float* douts = qs + BWD_B * (D + PAD);   // (32, D + PAD)
  float* ps = douts + BWD_B * (D + PAD);   // (32, 32 + PAD) P
  float* dss = ps + BWD_B * (BWD_B + PAD); // (32, 32 + PAD) dS
  int* row_start = reinterpret_cast<int*>(dss + BWD_B * (BWD_B + PAD));
  float* row_lse = reinterpret_cast<float*>(row_start + BWD_B);
  float* row_delta = row_lse + BWD_B;
  int* tile_lowest = reinterpret_cast<int*>(row_delta + BWD_B);

  const int keys_valid = min(BWD_B, seq_len - k0);
  const int key_last = k0 + keys_valid - 1;
  load_tile<T, D>(ks, k + int64_t(b) * seq_len * KVD + int64_t(kh) * D, KVD, k0, keys_valid, BWD_B);
  load_tile<T, D>(vs, v + int64_t(b) * seq_len * KVD + int64_t(kh) * D, KVD, k0, keys_valid, BWD_B);

  // This thread's dk/dv cells: keys ty + 16i, dims c·64 + tx·4 + e.
  float dk_acc[2][DC][4], dv_acc[2][DC][4];
#pragma unroll
  for (int i = 0; i < 2; i++) {
#pragma unroll
    for (int c = 0; c < DC; c++) {
#pragma unroll
      for (int e = 0; e < 4; e++) dk_acc[i][c][e] = dv_acc[i][c][e] = 0.f;
    }
  }

  for (int g = 0; g < G; g++) {
    const int h = kh * G + g;
    const T* q_base = q + int64_t(b) * seq_len * QD + int64_t(h) * D;
    const T* dout_base = dout + int64_t(b) * seq_len * QD + int64_t(h) * D;
    // Query rows before k0 never see these keys (causal); BWD_B divides k0.
    for (int q0 = k0; q0 < seq_len; q0 += BWD_B) {
      __syncthreads();  // the previous tile is no longer read
      // Every row of the tile starting its document after these keys (packing): nothing to load.
      if (backward_row_starts(row_start, tile_lowest, s, b, q0) > key_last) continue;
      const int rows_valid = min(BWD_B, seq_len - q0);
      load_tile<T, D>(qs, q_base, QD, q0, rows_valid, BWD_B);
      load_tile<T, D>(douts, dout_base, QD, q0, rows_valid, BWD_B);
      __syncthreads();
      backward_row_stats<T, D>(row_lse, row_delta, douts, out, lse, s, b, h, q0);

      float p[2][2], ds[2][2];
      backward_scores<D>(p, ds, qs, douts, ks, vs, row_start, row_lse, row_delta, q0, k0, seq_len, scale, scale_log2);
#pragma unroll
      for (int i = 0; i < 2; i++) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
          ps[(ty + 16 * i) * (BWD_B + PAD) + tx + 16 * j] = p[i][j];
          dss[(ty + 16 * i) * (BWD_B + PAD) + tx + 16 * j] = ds[i][j];
        }
      }
      __syncthreads();

      // dv[key] += Σ_r P[r, key] dout[r] ; dk[key] += Σ_r dS[r, key] q[r]   (keys ty + 16i)
#pragma unroll 4
      for (int r = 0; r < BWD_B; r++) {
        float pk[2], dsk[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
          pk[i] = ps[r * (BWD_B + PAD) + ty + 16 * i];
          dsk[i] = dss[r * (BWD_B + PAD) + ty + 16 * i];
        }
#pragma unroll
        for (int c = 0; c < DC; c++) {
          const float4 o4 = load4(douts + r * (D + PAD) + c * 64 + tx * 4);
          const float4 q4 = load4(qs + r * (D + PAD) + c * 64 + tx * 4);
#pragma unroll
          for (int i = 0; i < 2; i++) {
            dv_acc[i][c][0] += pk[i] * o4.x;
            dv_acc[i][c][1] += pk[i] * o4.y;
            dv_acc[i][c][2] += pk[i] * o4.z;
            dv_acc[i][c][3] += pk[i] * o4.w;
            dk_acc[i][c][0] += dsk[i] * q4.x;
            dk_acc[i][c][1] += dsk[i] * q4.y;
            dk_acc[i][c][2] += dsk[i] * q4.z;
            dk_acc[i][c][3] += dsk[i] * q4.w;
          }
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int key = k0 + ty + 16 * i;
    if (key >= seq_len) continue;
    const int64_t row = (int64_t(b) * seq_len + key) * KVD + int64_t(kh) * D;
#pragma unroll
    for (int c = 0; c < DC; c++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        dk[row + c * 64 + tx * 4 + e] = from_float<T>(dk_acc[i][c][e]);
        dv[row + c * 64 + tx * 4 + e] = from_float<T>(dv_acc[i][c][e]);
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(TILE_THREADS)
    attention_backward_dq_kernel(T* dq,            // (B·T, NH·D)
                                 const T* dout,    // (B·T, NH·D)
                                 const T* out,     // (B·T, NH·D)
                                 const float* lse, // (B, NH, T)
                                 const T* q,       // (B·T, NH·D)
                                 const T* k,       // (B·T, NKV·D)
                                 const T* v,       // (B·T, NKV·D)
                                 AttentionShape s, float scale, float scale_log2) {
  constexpr int DC = D / 64;
  const int seq_len = s.T, G = s.NH / s.NKV;
  const int64_t QD = int64_t(s.NH) * D, KVD = int64_t(s.NKV) * D;
  const int q0 = blockIdx.x * BWD_B, h = blockIdx.y, b = blockIdx.z, kh = h / G;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  TS_DYNAMIC_SHARED(float, smem);
  float* ks = smem;
  float* vs = ks + BWD_B * (D + PAD);
  float* qs = vs + BWD_B * (D + PAD);
  float* douts = qs + BWD_B * (D + PAD);
  float* dss = douts + BWD_B * (D + PAD) + BWD_B * (BWD_B + PAD);  // same layout as dk/dv (P slot unused)
  int* row_start = reinterpret_cast<int*>(dss + BWD_B * (BWD_B + PAD));
  float* row_lse = reinterpret_cast<float*>(row_start + BWD_B);
  float* row_delta = row_lse + BWD_B;
  int* tile_lowest = reinterpret_cast<int*>(row_delta + BWD_B);

  const int rows_valid = min(BWD_B, seq_len - q0);
  load_tile<T, D>(qs, q + int64_t(b) * seq_len * QD + int64_t(h) * D, QD, q0, rows_valid, BWD_B);
  load_tile<T, D>(douts, dout + int64_t(b) * seq_len * QD + int64_t(h) * D, QD, q0, rows_valid, BWD_B);
  const int lowest = backward_row_starts(row_start, tile_lowest, s, b, q0);  // synchronizes: the tiles are loaded
  backward_row_stats<T, D>(row_lse, row_delta, douts, out, lse, s, b, h, q0);
  const int k_begin = (min(lowest, seq_len) / BWD_B) * BWD_B;
  const int k_end = q0 + rows_valid;
  const T* k_base = k + int64_t(b) * seq_len * KVD + int64_t(kh) * D;
  const T* v_base = v + int64_t(b) * seq_len * KVD + int64_t(kh) * D;

  float dq_acc[2][DC][4];  // rows ty + 16i, dims c·64 + tx·4 + e
#pragma unroll
  for (int i = 0; i < 2; i++) {
#pragma unroll
    for (int c = 0; c < DC; c++) dq_acc[i][c][0] = dq_acc[i][c][1] = dq_acc[i][c][2] = dq_acc[i][c][3] = 0.f;
  }
  for (int k0 = k_begin; k0 < k_end; k0 += BWD_B) {
    __syncthreads();
    const int keys_valid = min(BWD_B, seq_len - k0);
    load_tile<T, D>(ks, k_base, KVD, k0, keys_valid, BWD_B);
    load_tile<T, D>(vs, v_base, KVD, k0, keys_valid, BWD_B);
    __syncthreads();
    float p[2][2], ds[2][2];
    backward_scores<D>(p, ds, qs, douts, ks, vs, row_start, row_lse, row_delta, q0, k0, seq_len, scale, scale_log2);
#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
      for (int j = 0; j < 2; j++) dss[(ty + 16 * i) * (BWD_B + PAD) + tx + 16 * j] = ds[i][j];
    }
    __syncthreads();
#pragma unroll 4
    for (int c0 = 0; c0 < BWD_B; c0++) {
      float dsr[2];
#pragma unroll
      for (int i = 0; i < 2; i++) dsr[i] = dss[(ty + 16 * i) * (BWD_B + PAD) + c0];
#pragma unroll
      for (int c = 0; c < DC; c++) {
        const float4 k4 = load4(ks + c0 * (D + PAD) + c * 64 + tx * 4);
#pragma unroll
        for (int i = 0; i < 2; i++) {
          dq_acc[i][c][0] += dsr[i] * k4.x;
          dq_acc[i][c][1] += dsr[i] * k4.y;
          dq_acc[i][c][2] += dsr[i] * k4.z;
          dq_acc[i][c][3] += dsr[i] * k4.w;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int t = q0 + ty + 16 * i;
    if (t >= seq_len) continue;
    T* o = dq + (int64_t(b) * seq_len + t) * QD + int64_t(h) * D;
#pragma unroll
    for (int c = 0; c < DC; c++) {
#pragma unroll
      for (int e = 0; e < 4; e++) o[c * 64 + tx * 4 + e] = from_float<T>(dq_acc[i][c][e]);
    }
  }
}

// ---- generic D: one warp per row, lanes over D (correct for any even D <= 256, slow) ---------------

template <typename T>
__device__ __forceinline__ void load_row(float (&x)[GENERIC_DIMS], const T* p, int D) {
  const int lane = threadIdx.x % WARP;
#pragma unroll
  for (int i = 0; i < GENERIC_DIMS; i++) {
    const int d = lane + i * WARP;
    x[i] = d < D ? to_float(p[d]) : 0.f;
  }
}
__device__ __forceinline__ float row_dot(const float (&a)[GENERIC_DIMS], const float (&b)[GENERIC_DIMS]) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < GENERIC_DIMS; i++) s += a[i] * b[i];
  return warp_sum(s);
}
template <typename T>
__device__ __forceinline__ void store_row(T* p, const float (&x)[GENERIC_DIMS], int D) {
  const int lane = threadIdx.x % WARP;
#pragma unroll
  for (int i = 0; i < GENERIC_DIMS; i++) {
    const int d = lane + i * WARP;
    if (d < D) p[d] = from_float<T>(x[i]);
  }
}

constexpr int GENERIC_WARPS = 4;

// One warp per (b, t, h).
template <typename T>
__global__ void attention_forward_generic_kernel(T* out,        // (B·T, NH·D)
                                                 float* lse,    // (B, NH, T)
                                                 const T* q,    // (B·T, NH·D)
                                                 const T* k,    // (B·T, NKV·D)
                                                 const T* v,    // (B·T, NKV·D)
                                                 AttentionShape s, int D, float scale_log2) {
  const int64_t item = int64_t(blockIdx.x) * GENERIC_WARPS + threadIdx.x / WARP;
  const int seq_len = s.T, NH = s.NH, G = s.NH / s.NKV;
  if (item >= int64_t(s.B) * seq_len * NH) return;
  const int h = int(item % NH), t = int(item / NH % seq_len), b = int(item / NH / seq_len), kh = h / G;
  const int64_t QD = int64_t(NH) * D, KVD = int64_t(s.NKV) * D, row = int64_t(b) * seq_len + t;
  const int start = s.doc_start ? s.doc_start[row] : 0;
  float qf[GENERIC_DIMS], kf[GENERIC_DIMS], vf[GENERIC_DIMS], acc[GENERIC_DIMS] = {};
  load_row(qf, q + row * QD + int64_t(h) * D, D);
  float m_run = -INFINITY, l = 0.f;
  for (int j = start; j <= t; j++) {
    const int64_t key = (int64_t(b) * seq_len + j) * KVD + int64_t(kh) * D;
    load_row(kf, k + key, D);
    load_row(vf, v + key, D);
    const float sc = row_dot(qf, kf) * scale_log2;
    const float m_new = fmaxf(m_run, sc);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_run - m_use), p = exp2f(sc - m_use);
    l = l * alpha + p;
#pragma unroll
    for (int i = 0; i < GENERIC_DIMS; i++) acc[i] = acc[i] * alpha + p * vf[i];
    m_run = m_new;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int i = 0; i < GENERIC_DIMS; i++) acc[i] *= inv;
  store_row(out + row * QD + int64_t(h) * D, acc, D);
  if (threadIdx.x % WARP == 0)
    lse[(int64_t(b) * NH + h) * seq_len + t] = l > 0.f ? (m_run + log2f(l)) * LN2 : -INFINITY;
}

// One warp per (b, t, h): dq_t.
template <typename T>
__global__ void attention_backward_dq_generic_kernel(T* dq,             // (B·T, NH·D)
                                                     const T* dout,     // (B·T, NH·D)
                                                     const T* out,      // (B·T, NH·D)
                                                     const float* lse,  // (B, NH, T)
                                                     const T* q,        // (B·T, NH·D)
                                                     const T* k,        // (B·T, NKV·D)
                                                     const T* v,        // (B·T, NKV·D)
                                                     AttentionShape s, int D, float scale, float scale_log2) {
  const int64_t item = int64_t(blockIdx.x) * GENERIC_WARPS + threadIdx.x / WARP;
  const int seq_len = s.T, NH = s.NH, G = s.NH / s.NKV;
  if (item >= int64_t(s.B) * seq_len * NH) return;
  const int h = int(item % NH), t = int(item / NH % seq_len), b = int(item / NH / seq_len), kh = h / G;
  const int64_t QD = int64_t(NH) * D, KVD = int64_t(s.NKV) * D, row = int64_t(b) * seq_len + t;
  const int start = s.doc_start ? s.doc_start[row] : 0;
  float qf[GENERIC_DIMS], of[GENERIC_DIMS], kf[GENERIC_DIMS], vf[GENERIC_DIMS], acc[GENERIC_DIMS] = {};
  load_row(qf, q + row * QD + int64_t(h) * D, D);
  load_row(of, dout + row * QD + int64_t(h) * D, D);
  load_row(kf, out + row * QD + int64_t(h) * D, D);
  const float delta = row_dot(of, kf);
  const float l2 = lse[(int64_t(b) * NH + h) * seq_len + t] * LOG2E;
  for (int j = start; j <= t; j++) {
    const int64_t key = (int64_t(b) * seq_len + j) * KVD + int64_t(kh) * D;
    load_row(kf, k + key, D);
    load_row(vf, v + key, D);
    const float p = exp2f(row_dot(qf, kf) * scale_log2 - l2);
    const float ds = p * (row_dot(of, vf) - delta) * scale;
#pragma unroll
    for (int i = 0; i < GENERIC_DIMS; i++) acc[i] += ds * kf[i];
  }
  store_row(dq + row * QD + int64_t(h) * D, acc, D);
}

// One warp per (b, key j, kv head): dk_j and dv_j over the group's heads and the rows that see j.
template <typename T>
__global__ void attention_backward_dkdv_generic_kernel(T* dk,             // (B·T, NKV·D)
                                                       T* dv,             // (B·T, NKV·D)
                                                       const T* dout,     // (B·T, NH·D)
                                                       const T* out,      // (B·T, NH·D)
                                                       const float* lse,  // (B, NH, T)
                                                       const T* q,        // (B·T, NH·D)
                                                       const T* k,        // (B·T, NKV·D)
                                                       const T* v,        // (B·T, NKV·D)
                                                       AttentionShape s, int D, float scale, float scale_log2) {
  const int64_t item = int64_t(blockIdx.x) * GENERIC_WARPS + threadIdx.x / WARP;
  const int seq_len = s.T, NH = s.NH, NKV = s.NKV, G = s.NH / s.NKV;
  if (item >= int64_t(s.B) * seq_len * NKV) return;
  const int kh = int(item % NKV), j = int(item / NKV % seq_len), b = int(item / NKV / seq_len);
  const int64_t QD = int64_t(NH) * D, KVD = int64_t(NKV) * D;
  const int64_t key = (int64_t(b) * seq_len + j) * KVD + int64_t(kh) * D;
  float kf[GENERIC_DIMS], vf[GENERIC_DIMS], qf[GENERIC_DIMS], of[GENERIC_DIMS], ot[GENERIC_DIMS];
  float dk_acc[GENERIC_DIMS] = {}, dv_acc[GENERIC_DIMS] = {};
  load_row(kf, k + key, D);
  load_row(vf, v + key, D);
  for (int g = 0; g < G; g++) {
    const int h = kh * G + g;
    for (int t = j; t < seq_len; t++) {
      const int64_t row = int64_t(b) * seq_len + t;
      if (s.doc_start && s.doc_start[row] > j) continue;
      load_row(qf, q + row * QD + int64_t(h) * D, D);
      load_row(of, dout + row * QD + int64_t(h) * D, D);
      load_row(ot, out + row * QD + int64_t(h) * D, D);
      const float p = exp2f(row_dot(qf, kf) * scale_log2 - lse[(int64_t(b) * NH + h) * seq_len + t] * LOG2E);
      const float ds = p * (row_dot(of, vf) - row_dot(of, ot)) * scale;
#pragma unroll
      for (int i = 0; i < GENERIC_DIMS; i++) {
        dv_acc[i] += p * of[i];
        dk_acc[i] += ds * qf[i];
      }
    }
  }
  store_row(dk + key, dk_acc, D);
  store_row(dv + key, dv_acc, D);
}

template <typename T, int D>
void launch_forward_tiled(T* out, float* lse, const T* q, const T* k, const T* v, const AttentionShape& s,
                          float scale_log2, cudaStream_t stream) {
  constexpr size_t shared = forward_shared_bytes<D>();
  allow_shared(attention_forward_kernel<T, D>, shared);
  const dim3 grid(blocks_for(s.T, FWD_BQ), unsigned(s.NH), unsigned(s.B));
  TS_LAUNCH((attention_forward_kernel<T, D>), grid, TILE_THREADS, shared, stream)(out, lse, q, k, v, s, scale_log2);
  CUDA_CHECK_LAUNCH();
}

template <typename T, int D>
void launch_backward_tiled(T* dq, T* dk, T* dv, const T* dout, const T* out, const float* lse, const T* q, const T* k,
                           const T* v, const AttentionShape& s, float scale, float scale_log2, cudaStream_t stream) {
  constexpr size_t shared = backward_shared_bytes<D>();
  allow_shared(attention_backward_dkdv_kernel<T, D>, shared);
  allow_shared(attention_backward_dq_kernel<T, D>, shared);
  const dim3 kv_grid(blocks_for(s.T, BWD_B), unsigned(s.NKV), unsigned(s.B));
  TS_LAUNCH((attention_backward_dkdv_kernel<T, D>), kv_grid, TILE_THREADS, shared, stream)(dk, dv, dout, out, lse, q, k,
                                                                                         v, s, scale, scale_log2);
  CUDA_CHECK_LAUNCH();
  const dim3 q_grid(blocks_for(s.T, BWD_B), unsigned(s.NH), unsigned(s.B));
  TS_LAUNCH((attention_backward_dq_kernel<T, D>), q_grid, TILE_THREADS, shared, stream)(dq, dout, out, lse, q, k, v, s,
                                                                                      scale, scale_log2);
  CUDA_CHECK_LAUNCH();
}

// The tiled training kernels need D in {64, 128}, 16-byte aligned tensors and room for their tiles.
template <typename T>
bool tiled_training_ok(const AttentionShape& s, size_t shared, std::initializer_list<const void*> tensors) {
  if (s.D != 64 && s.D != 128) return false;
  if (shared > device_limits().shared_optin) return false;
  for (const void* p : tensors)
    if (!aligned16(p)) return false;
  return true;
}

}  // namespace

// ==== launchers =======================================================================================

template <typename T>
void attention_paged(T* out, const T* q, const KVLayerView& kv, const PagedRows& rows, int64_t M, int NH, int NKV,
                     int D, cudaStream_t stream) {
  check_attention_args(NH, NKV, D, "attention_paged");
  require(kv.dtype == dtype_of<T>(), "INVALID_ARGUMENT",
          "attention_paged: KV cache dtype does not match the activations");
  require(kv.KVD == NKV * D && kv.block_size > 0, "INVALID_ARGUMENT",
          "attention_paged: KV layer view does not match NKV·D");
  if (M <= 0) return;
  const float scale_log2 = (1.f / std::sqrt(float(D))) * LOG2E;
  const bool aligned = aligned16(q) && aligned16(kv.k) && aligned16(kv.v);
  bool launched = false;
  if (aligned && D == 64) launched = launch_paged_for_d<T, 64>(out, q, kv, rows, M, NH, NKV, scale_log2, stream);
  if (aligned && D == 128) launched = launch_paged_for_d<T, 128>(out, q, kv, rows, M, NH, NKV, scale_log2, stream);
  if (!launched) {
    const int64_t items = M * NH;
    TS_LAUNCH(attention_paged_generic_kernel<T>, unsigned((items + GENERIC_WARPS - 1) / GENERIC_WARPS),
              GENERIC_WARPS * WARP, 0, stream)(out, q, static_cast<const T*>(kv.k), static_cast<const T*>(kv.v),
                                               rows, M, kv.block_size, kv.KVD, NH, NH / NKV, D, scale_log2);
    CUDA_CHECK_LAUNCH();
  }
}

template <typename T>
void attention_forward(T* out, float* lse, const T* q, const T* k, const T* v, const AttentionShape& s,
                       cudaStream_t stream) {
  check_attention_args(s.NH, s.NKV, s.D, "attention_forward");
  if (s.B <= 0 || s.T <= 0) return;
  const float scale_log2 = (1.f / std::sqrt(float(s.D))) * LOG2E;
  const size_t shared = s.D == 128 ? forward_shared_bytes<128>() : forward_shared_bytes<64>();
  if (tiled_training_ok<T>(s, shared, {out, q, k, v})) {
    if (s.D == 64) launch_forward_tiled<T, 64>(out, lse, q, k, v, s, scale_log2, stream);
    else launch_forward_tiled<T, 128>(out, lse, q, k, v, s, scale_log2, stream);
    return;
  }
  const int64_t items = int64_t(s.B) * s.T * s.NH;
  TS_LAUNCH(attention_forward_generic_kernel<T>, unsigned((items + GENERIC_WARPS - 1) / GENERIC_WARPS),
            GENERIC_WARPS * WARP, 0, stream)(out, lse, q, k, v, s, s.D, scale_log2);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const float* lse, const T* q, const T* k,
                        const T* v, const AttentionShape& s, cudaStream_t stream) {
  check_attention_args(s.NH, s.NKV, s.D, "attention_backward");
  if (s.B <= 0 || s.T <= 0) return;
  const float scale = 1.f / std::sqrt(float(s.D)), scale_log2 = scale * LOG2E;
  const size_t shared = s.D == 128 ? backward_shared_bytes<128>() : backward_shared_bytes<64>();
  if (tiled_training_ok<T>(s, shared, {dq, dk, dv, dout, q, k, v})) {
    if (s.D == 64) launch_backward_tiled<T, 64>(dq, dk, dv, dout, out, lse, q, k, v, s, scale, scale_log2, stream);
    else launch_backward_tiled<T, 128>(dq, dk, dv, dout, out, lse, q, k, v, s, scale, scale_log2, stream);
    return;
  }
  const int64_t q_items = int64_t(s.B) * s.T * s.NH, kv_items = int64_t(s.B) * s.T * s.NKV;
  TS_LAUNCH(attention_backward_dkdv_generic_kernel<T>, unsigned((kv_items + GENERIC_WARPS - 1) / GENERIC_WARPS),
            GENERIC_WARPS * WARP, 0, stream)(dk, dv, dout, out, lse, q, k, v, s, s.D, scale, scale_log2);
  CUDA_CHECK_LAUNCH();
  TS_LAUNCH(attention_backward_dq_generic_kernel<T>, unsigned((q_items + GENERIC_WARPS - 1) / GENERIC_WARPS),
            GENERIC_WARPS * WARP, 0, stream)(dq, dout, out, lse, q, k, v, s, s.D, scale, scale_log2);
  CUDA_CHECK_LAUNCH();
}

#define TS_INSTANTIATE_ATTENTION(T)                                                                                  \
  template void attention_paged<T>(T*, const T*, const KVLayerView&, const PagedRows&, int64_t, int, int, int,        \
                                   cudaStream_t);                                                                     \
  template void attention_forward<T>(T*, float*, const T*, const T*, const T*, const AttentionShape&, cudaStream_t);  \
  template void attention_backward<T>(T*, T*, T*, const T*, const T*, const float*, const T*, const T*, const T*,     \
                                      const AttentionShape&, cudaStream_t);
TS_INSTANTIATE_ATTENTION(float)
TS_INSTANTIATE_ATTENTION(bf16)
#undef TS_INSTANTIATE_ATTENTION

}  // namespace ts::cuda
