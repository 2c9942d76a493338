// CUDA emulator: runs the engine's CUDA kernels on the CPU so CI (no GPU) can check their logic
// (indexing, synchronisation, reductions, bf16 rounding) against the CPU reference ops. It is what
// cuda/common.cuh includes under -DTS_CUDA_EMU; the kernel files compile unchanged with g++ -x c++.
// It says nothing about speed, memory coalescing, bank conflicts or true concurrency: within a block
// the threads are fibers that run one at a time between barriers, so a race between threads of a
// block that a GPU could expose (a missing __syncthreads, a non-atomic read-modify-write) may pass.
//
// Supported:
//  - __global__/__device__/__host__/__shared__ kernels launched with TS_LAUNCH; every block of a grid
//    runs in order, every thread of a block is a fiber scheduled round robin. On x86-64 a hand-written
//    context switch makes a __syncthreads round of a 256-thread block cost about 2 us; elsewhere, or
//    with -DTS_EMU_UCONTEXT, swapcontext (two system calls per switch) is ~150x slower.
//    Stacks are TS_EMU_STACK_KB (default 128) KiB each, with a guard page: an overflow is a SIGSEGV.
//  - __syncthreads; warp collectives __syncwarp, __shfl{,_up,_down,_xor}_sync (any width), __ballot_sync,
//    __any_sync, __all_sync, which wait for every live lane of their mask (exited lanes no longer
//    count). A block where no thread can continue aborts, naming the kernel, block and warp (a warp whose
//    lanes wait at different barriers: divergence); so do a lane outside its own mask and a bad width.
//  - dynamic shared memory (TS_DYNAMIC_SHARED), atomics, the bf16 type and intrinsics the kernels use,
//    vector types, and a runtime subset with CUDA's names and error codes: memory in host RAM with a
//    simulated capacity (TS_EMU_DEVICE_MB, default 4096), streams and events (synchronous), launch
//    validation with a last error, and CUDA graphs by stream capture (recorded, replayed in order).
//  - Uninitialised data is poisoned with all-ones bytes (NaN for float/bf16, -1 for integers):
//    cudaMalloc'd memory, dynamic shared memory at the start of every block, and a shuffle's result
//    when its source lane does not take part (outside the mask, exited, past the block's end), where a
//    GPU returns an undefined value. Static __shared__ arrays are not poisoned (they start zeroed and
//    keep the previous block's contents); kernels must not rely on either.
//
// Deliberately not supported: tensor-core mma/wmma, inline PTX, cuBLAS, __constant__ memory, cooperative
// groups, cub, dynamic parallelism, multiple streams running concurrently (every operation completes
// before its call returns), capture across streams (cudaStreamWaitEvent), and threads that spin-wait on
// memory written by another thread of the block (no preemption: the emulator hangs). Not thread-safe:
// use it from one host thread at a time.
#pragma once

#include <math.h>  // expf, fminf, sqrtf, ... and INFINITY in the global namespace, as device code has them

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "core/dtype.h"  // ts::f32_to_bf16: bf16 rounding is the CPU reference's, bit for bit

// ---- Qualifiers -------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))  // CUDA's own definition for GCC
// A __shared__ variable is one object for all threads of a block. Blocks run one after another and a
// block's threads are fibers of one OS thread, so a function-local static is exactly that: every fiber
// sees the same storage, and the next block reuses it (as the next block on an SM would).
#define __shared__ static

// ---- Vector types and built-in variables ------------------------------------------------------------

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace ts::emu {
struct Builtins {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern Builtins builtins;  // the running fiber's values, set by the scheduler before it resumes one
}  // namespace ts::emu

inline const uint3& threadIdx = ts::emu::builtins.thread_idx;
inline const uint3& blockIdx = ts::emu::builtins.block_idx;
inline const dim3& blockDim = ts::emu::builtins.block_dim;
inline const dim3& gridDim = ts::emu::builtins.grid_dim;
constexpr int warpSize = 32;  // a constant, not a macro: cudaDeviceProp has a member of that name

// ---- Runtime API types ------------------------------------------------------------------------------

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalState = 401,
  cudaErrorNotSupported = 801,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorStreamCaptureImplicit = 906,
};
typedef cudaError cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal = 0, cudaStreamCaptureModeThreadLocal = 1, cudaStreamCaptureModeRelaxed = 2 };
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1, cudaStreamCaptureStatusInvalidated = 2,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8, cudaFuncAttributePreferredSharedMemoryCarveout = 9 };
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01

typedef struct CUstream_st* cudaStream_t;  // nullptr: the legacy default stream
typedef struct CUevent_st* cudaEvent_t;
typedef struct CUgraph_st* cudaGraph_t;
typedef struct CUgraphExec_st* cudaGraphExec_t;

struct cudaDeviceProp {  // the fields of CUDA's struct that the emulator fills
  char name[256];
  size_t totalGlobalMem, sharedMemPerBlock, sharedMemPerBlockOptin, sharedMemPerMultiprocessor;
  int regsPerBlock, warpSize, maxThreadsPerBlock, maxThreadsDim[3], maxGridSize[3];
  int major, minor, multiProcessorCount, maxThreadsPerMultiProcessor, l2CacheSize;
};

// ---- Launch -----------------------------------------------------------------------------------------

namespace ts::emu {

// One kernel launch with its parameters frozen: `body` calls the kernel for the current fiber.
struct Grid {
  const char* name;
  dim3 grid, block;
  size_t shared_bytes;
  std::function<void()> body;
};
// Validates the configuration (a bad one sets the last error and runs nothing), then runs the grid
// now or, when `stream` is capturing, records it.
void launch(Grid grid, cudaStream_t stream);
void* dynamic_shared();  // the running block's dynamic shared memory (16-byte aligned), null if none

// What TS_LAUNCH(...) returns: called with the kernel's arguments, it converts them to the kernel's
// parameter types and copies them, as CUDA does at the launch (so a captured launch keeps them).
template <typename... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "TS_LAUNCH: wrong number of kernel arguments");
    static_assert((std::is_convertible_v<A&&, P> && ...), "TS_LAUNCH: argument not convertible to the kernel's parameter");
    std::tuple<P...> params(std::forward<A>(args)...);
    launch({name, grid, block, shared_bytes, [k = kernel, params] { std::apply(k, params); }}, stream);
  }
};
template <typename... P>
Launcher<P...> Launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes,
                      cudaStream_t stream) {
  return {name, kernel, grid, block, shared_bytes, stream};
}

// ---- Barriers and warp collectives (implemented by the scheduler in cuda_emu.cpp) ---------------------

enum class Op : uint8_t { SyncWarp, Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All };
void syncthreads();
// Waits until every live lane of `mask` has arrived at the same collective; the last to arrive computes
// every lane's result. `value`: this lane's operand as raw bits; `param`: source lane, delta or xor mask.
uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int param, int width);
unsigned live_lanes();  // lanes of the calling thread's warp that have not returned

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

}  // namespace ts::emu

inline void __syncthreads() { ts::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ts::emu::warp_collective(ts::emu::Op::SyncWarp, mask, 0, 0, 32); }
inline void __threadfence() {}  // every write is visible at once: one OS thread
inline void __threadfence_block() {}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return ts::emu::from_bits<T>(ts::emu::warp_collective(ts::emu::Op::Shfl, mask, ts::emu::to_bits(var), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ts::emu::from_bits<T>(ts::emu::warp_collective(ts::emu::Op::ShflUp, mask, ts::emu::to_bits(var), int(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ts::emu::from_bits<T>(ts::emu::warp_collective(ts::emu::Op::ShflDown, mask, ts::emu::to_bits(var), int(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return ts::emu::from_bits<T>(ts::emu::warp_collective(ts::emu::Op::ShflXor, mask, ts::emu::to_bits(var), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return unsigned(ts::emu::warp_collective(ts::emu::Op::Ballot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) { return int(ts::emu::warp_collective(ts::emu::Op::Any, mask, pred != 0, 0, 32)); }
inline int __all_sync(unsigned mask, int pred) { return int(ts::emu::warp_collective(ts::emu::Op::All, mask, pred != 0, 0, 32)); }
// Not a barrier (nor is it on a GPU): the lanes of the warp that have not returned.
inline unsigned __activemask() { return ts::emu::live_lanes(); }

// ---- Atomics: fibers switch only at barriers, so a plain read-modify-write is atomic ------------------

namespace ts::emu {
template <typename T>
T exchange(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
}  // namespace ts::emu

inline int atomicAdd(int* p, int v) { return ts::emu::exchange(p, *p + v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ts::emu::exchange(p, *p + v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return ts::emu::exchange(p, *p + v); }
inline float atomicAdd(float* p, float v) { return ts::emu::exchange(p, *p + v); }
inline double atomicAdd(double* p, double v) { return ts::emu::exchange(p, *p + v); }
inline int atomicMax(int* p, int v) { return ts::emu::exchange(p, *p > v ? *p : v); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return ts::emu::exchange(p, *p > v ? *p : v); }
inline int atomicMin(int* p, int v) { return ts::emu::exchange(p, *p < v ? *p : v); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return ts::emu::exchange(p, *p < v ? *p : v); }
inline int atomicExch(int* p, int v) { return ts::emu::exchange(p, v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return ts::emu::exchange(p, v); }
inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) { return ts::emu::exchange(p, v); }
inline float atomicExch(float* p, float v) { return ts::emu::exchange(p, v); }
inline int atomicCAS(int* p, int compare, int v) { return ts::emu::exchange(p, *p == compare ? v : *p); }
inline unsigned atomicCAS(unsigned* p, unsigned compare, unsigned v) { return ts::emu::exchange(p, *p == compare ? v : *p); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long v) {
  return ts::emu::exchange(p, *p == compare ? v : *p);
}

// ---- Math and bit intrinsics ------------------------------------------------------------------------

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline unsigned __float_as_uint(float x) { return ts::emu::from_bits<unsigned>(ts::emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ts::emu::from_bits<float>(x); }
inline int __float_as_int(float x) { return ts::emu::from_bits<int>(ts::emu::to_bits(x)); }
inline float __int_as_float(int x) { return ts::emu::from_bits<float>(ts::emu::to_bits(x)); }
template <typename T>
T __ldg(const T* p) { return *p; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }

// CUDA's integer and float min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(unsigned(a), b); }
inline unsigned max(int a, unsigned b) { return max(unsigned(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, unsigned(b)); }
inline unsigned max(unsigned a, int b) { return max(a, unsigned(b)); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---- bf16 -------------------------------------------------------------------------------------------

struct __align__(2) __nv_bfloat16 {
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits_(ts::f32_to_bf16(f)) {}  // round to nearest even, like CUDA's
  operator float() const { return ts::bf16_to_f32(bits_); }

 private:  // as in CUDA, where the bits are protected: kernels go through the intrinsics
  unsigned short bits_;
  friend __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits);
  friend unsigned short __bfloat16_as_ushort(__nv_bfloat16 h);
};
struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
  __nv_bfloat16 h;
  h.bits_ = bits;
  return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits_; }
// A GPU turns every NaN into the canonical 0x7fff; here a NaN keeps its sign and payload (quieted),
// as the CPU reference does. Compare NaN-ness, not NaN bits, between the two.
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {float(v.x), float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return float(v.y); }

// CUDA's operators on bf16 (computed in float, rounded once to bf16), so an expression has the same
// type in both builds; like CUDA, mixing bf16 and float in one operator is ambiguous.
inline __nv_bfloat16 operator+(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) + float(b); }
inline __nv_bfloat16 operator-(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) - float(b); }
inline __nv_bfloat16 operator*(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) * float(b); }
inline __nv_bfloat16 operator/(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) / float(b); }
inline __nv_bfloat16 operator-(__nv_bfloat16 a) { return __ushort_as_bfloat16(__bfloat16_as_ushort(a) ^ 0x8000u); }
inline __nv_bfloat16& operator+=(__nv_bfloat16& a, __nv_bfloat16 b) { return a = a + b; }
inline __nv_bfloat16& operator-=(__nv_bfloat16& a, __nv_bfloat16 b) { return a = a - b; }
inline __nv_bfloat16& operator*=(__nv_bfloat16& a, __nv_bfloat16 b) { return a = a * b; }
inline __nv_bfloat16& operator/=(__nv_bfloat16& a, __nv_bfloat16 b) { return a = a / b; }
inline bool operator==(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) == float(b); }
inline bool operator!=(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) != float(b); }
inline bool operator<(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) < float(b); }
inline bool operator>(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) > float(b); }
inline bool operator<=(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) <= float(b); }
inline bool operator>=(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) >= float(b); }

// ---- Runtime API ------------------------------------------------------------------------------------
// Every call completes before it returns (streams never overlap). A failing call also sets the last
// error, as in CUDA.

const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();  // returns the last error and resets it to cudaSuccess
cudaError_t cudaPeekAtLastError();

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);  // accepted, no effect
template <typename T>
cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

// Device memory is host memory, 256-byte aligned, filled with 0xff bytes.
cudaError_t cudaMalloc(void** ptr, size_t bytes);
template <typename T>
cudaError_t cudaMalloc(T** ptr, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), bytes);
}
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);

cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);  // wall clock at execution
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaEventDestroy(cudaEvent_t event);

// While a stream captures, kernel launches, cudaMemcpyAsync, cudaMemsetAsync, cudaEventRecord and
// cudaGraphLaunch on it are recorded (arguments frozen) instead of run. Outside relaxed mode, cudaMalloc,
// cudaFree, cudaMemcpy, cudaMemset and cudaDeviceSynchronize then fail with
// cudaErrorStreamCaptureUnsupported and invalidate the capture; so does synchronizing the capturing
// stream. Work on the legacy stream while a blocking stream captures fails with
// cudaErrorStreamCaptureImplicit and invalidates the capture, as on a GPU.
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
