// What every CUDA source of the engine includes: the CUDA headers (or, in the CPU emulation build,
// cuda/emu/cuda_emu.h, which provides the same names), error checks that report file:line, the
// launch macro, and small device helpers (bf16 <-> float, warp and block reductions).
//
// The kernels are plain CUDA with three conventions, so the same .cu files also compile as C++ for
// the emulator that CI runs them on (no GPU there):
//   - launches are written TS_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...);
//   - dynamic shared memory is declared with TS_DYNAMIC_SHARED(type, name);
//   - no __constant__ memory, no cub / cooperative_groups / inline PTX outside `#ifndef TS_CUDA_EMU`.
#pragma once

#ifdef TS_CUDA_EMU
#include "cuda/emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

#include "core/error.h"

#ifdef TS_CUDA_EMU
#define TS_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::ts::emu::Launch(#kernel, kernel, dim3(grid), dim3(block), (shared_bytes), (stream))
#define TS_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::ts::emu::dynamic_shared())
#else
#define TS_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<(grid), (block), (shared_bytes), (stream)>>>
#define TS_DYNAMIC_SHARED(type, name)                        \
  extern __shared__ __align__(16) unsigned char ts_smem_[]; \
  type* name = reinterpret_cast<type*>(ts_smem_)
#endif

namespace ts::cuda {

// Throws EngineError CUDA_ERROR naming the call and where it was made.
inline void check(cudaError_t e, const char* what, const char* file, int line) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a sticky launch error so the next call reports its own
  throw EngineError("CUDA_ERROR", std::string(what) + " failed at " + file + ":" + std::to_string(line) + ": " +
                                      cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

}  // namespace ts::cuda

// CUDA_CHECK(cudaMalloc(...)): throws with the call's text and file:line when it fails.
#define CUDA_CHECK(expr) ::ts::cuda::check((expr), #expr, __FILE__, __LINE__)
// After a launch: reports a bad configuration (grid, block, shared memory) at the launch site.
#define CUDA_CHECK_LAUNCH() ::ts::cuda::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

namespace ts::cuda {

using bf16 = __nv_bfloat16;

// Loads and stores of activations, which are float (float32-compute check mode) or bf16.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16(x); }  // round to nearest even

constexpr int WARP = 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `scratch` is __shared__ memory of at least 32 elements; the call synchronizes the block twice.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = lane < warps ? scratch[lane] : T(0);
  return warp_sum(total);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(m);
}

inline unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace ts::cuda
