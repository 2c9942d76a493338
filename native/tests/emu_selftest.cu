// Self-test of the CUDA emulator (cuda/emu/cuda_emu.h): kernels written in the engine's CUDA style,
// checked on the host. Builds both ways:
//   g++ -std=c++17 -O1 -Wall -x c++ -DTS_CUDA_EMU -Inative native/tests/emu_selftest.cu native/cuda/emu/cuda_emu.cpp -o /tmp/emu_selftest
//   nvcc -std=c++17 -Inative native/tests/emu_selftest.cu -o /tmp/emu_selftest -gencode=arch=compute_90a,code=sm_90a
// Prints one line per check; exits 1 if any fails. The divergence check needs the emulator (on a GPU
// that kernel hangs), so the nvcc build skips it.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda/common.cuh"

#ifdef TS_CUDA_EMU
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

namespace {

using ts::cuda::bf16;
constexpr unsigned FULL = 0xffffffffu;

// ---- Kernels ----------------------------------------------------------------------------------------

// Block sums of x; every thread stores the total it got (threads past n contribute 0).
__global__ void block_sum_kernel(float* sums, float* every, const float* x, int n) {
  __shared__ float scratch[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float total = ts::cuda::block_sum(i < n ? x[i] : 0.0f, scratch);
  every[i] = total;
  if (threadIdx.x == 0) sums[blockIdx.x] = total;
}

// Inclusive scan of `in` within segments of `width` lanes (8-byte values, so both halves must move).
__global__ void warp_scan_kernel(long long* out, const long long* in, int n, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % width;
  long long v = i < n ? in[i] : 0;
  for (int o = 1; o < width; o <<= 1) {
    const long long up = __shfl_up_sync(FULL, v, o, width);
    if (lane >= o) v += up;
  }
  if (i < n) out[i] = v;
}

// Shuffle source rules with and without width: out[8 * lane + k] for eight cases k.
__global__ void shuffle_rules_kernel(int* out) {
  const int lane = threadIdx.x, v = 100 + lane;
  int* o = out + 8 * lane;
  o[0] = __shfl_sync(FULL, v, 3, 8);
  o[1] = __shfl_sync(FULL, v, 9, 8);  // source lane taken modulo the width
  o[2] = __shfl_sync(FULL, v, lane + 33);
  o[3] = __shfl_up_sync(FULL, v, 2, 8);
  o[4] = __shfl_down_sync(FULL, v, 2, 8);
  o[5] = __shfl_down_sync(FULL, v, 31);
  o[6] = __shfl_xor_sync(FULL, v, 5, 8);
  o[7] = __shfl_xor_sync(FULL, v, 8, 8);  // earlier segments can be read, later ones cannot
}

// Every thread stores its warp's ballot / any / all of x > 0 (blocks of 48: the second warp is partial).
__global__ void vote_kernel(unsigned* ballots, int* any, int* all, const float* x) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool p = x[i] > 0.0f;
  ballots[i] = __ballot_sync(FULL, p);
  any[i] = __any_sync(FULL, p);
  all[i] = __all_sync(FULL, p);
}

constexpr int TILE = 32, TILE_ROWS = 8;
// out (cols x rows) = transpose of in (rows x cols), through a padded TILE x (TILE + 1) shared tile.
__global__ void transpose_kernel(float* out, const float* in, int rows, int cols) {
  TS_DYNAMIC_SHARED(float, tile);
  int x = blockIdx.x * TILE + threadIdx.x;
  for (int j = 0; j < TILE; j += TILE_ROWS) {
    const int y = blockIdx.y * TILE + threadIdx.y + j;
    if (x < cols && y < rows) tile[(threadIdx.y + j) * (TILE + 1) + threadIdx.x] = in[y * cols + x];
  }
  __syncthreads();
  x = blockIdx.y * TILE + threadIdx.x;
  for (int j = 0; j < TILE; j += TILE_ROWS) {
    const int y = blockIdx.x * TILE + threadIdx.y + j;
    if (x < rows && y < cols) out[y * rows + x] = tile[threadIdx.x * (TILE + 1) + threadIdx.y + j];
  }
}

// 16-bin histogram of v & 15: per-block bins in shared memory, then added to the global ones.
__global__ void histogram_kernel(unsigned* hist, const int* v, int n) {
  __shared__ unsigned local[16];
  if (threadIdx.x < 16) local[threadIdx.x] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) atomicAdd(&local[v[i] & 15], 1u);
  __syncthreads();
  if (threadIdx.x < 16) atomicAdd(&hist[threadIdx.x], local[threadIdx.x]);
}

// Threads >= 40 of a 64-thread block return at once; the rest still meet at __syncthreads and ballot.
__global__ void early_return_kernel(int* neighbour, unsigned* ballots) {
  __shared__ int s[64];
  const int t = threadIdx.x;
  if (t >= 40) return;
  s[t] = 3 * t;
  __syncthreads();
  neighbour[t] = s[(t + 1) % 40];
  ballots[t] = __ballot_sync(FULL, 1);
}

// bf16 conversions of x: bits of __float2bfloat16, its float, and the bf162 helpers on (x[i], x[i+1]).
__global__ void bf16_kernel(unsigned short* bits, float* back, float* pair, const float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const bf16 h = __float2bfloat16(x[i]);
  bits[i] = __bfloat16_as_ushort(h);
  back[i] = __bfloat162float(h);
  const int j = (i + 1) % n;
  const __nv_bfloat162 p = __floats2bfloat162_rn(x[i], x[j]);
  const float2 f = __bfloat1622float2(__halves2bfloat162(__float2bfloat16_rn(x[i]), __float2bfloat16_rn(x[j])));
  pair[4 * i + 0] = __low2float(p);
  pair[4 * i + 1] = __high2float(p);
  pair[4 * i + 2] = f.x;
  pair[4 * i + 3] = f.y;
}

__global__ void scale_kernel(float* y, const float* x, float scale, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i] * scale;
}
__global__ void add_kernel(float* z, float bias, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) z[i] += bias;
}
__global__ void fill_kernel(int* out, int value, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}

__global__ void barrier_loop_kernel(int* out, int rounds) {
  int acc = 0;
  for (int r = 0; r < rounds; r++) {
    __syncthreads();
    acc += r;
  }
  if (threadIdx.x == 0) *out = acc;
}
__global__ void shuffle_loop_kernel(float* out, int rounds) {
  float v = float(threadIdx.x);
  for (int r = 0; r < rounds; r++) v = __shfl_xor_sync(FULL, v, 1);
  if (threadIdx.x == 0) *out = v;
}

#ifdef TS_CUDA_EMU
// A divergence bug: half of every warp waits at __syncthreads, the other half at a shuffle.
__global__ void divergent_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) __syncthreads();
  else v = __shfl_xor_sync(FULL, v, 1);
  out[threadIdx.x] = v;
}
#endif

// ---- Host side --------------------------------------------------------------------------------------

int failures = 0;

void report(const char* name, bool ok, const std::string& detail) {
  std::printf("%s  %-44s %s\n", ok ? "PASS" : "FAIL", name, detail.c_str());
  if (!ok) failures++;
}

template <typename T>
T* device_copy(const std::vector<T>& host) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, host.size() * sizeof(T)));
  CUDA_CHECK(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
T* device_alloc(size_t n) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, n * sizeof(T)));
  return d;
}
template <typename T>
std::vector<T> host_copy(const T* d, size_t n) {
  std::vector<T> h(n);  // (n)
  CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

__attribute__((format(printf, 1, 2))) std::string fmt(const char* format, ...) {
  char buf[256];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buf, sizeof buf, format, args);
  va_end(args);
  return buf;
}

void check_block_sum() {
  const int n = 1000, threads = 256, blocks = int(ts::cuda::blocks_for(n, threads));
  std::vector<float> x(n);  // (n)
  for (int i = 0; i < n; i++) x[i] = float(i % 13 - 6);  // small integers: sums are exact
  float* dx = device_copy(x);
  float* dsums = device_alloc<float>(blocks);
  float* devery = device_alloc<float>(size_t(blocks) * threads);
  TS_LAUNCH(block_sum_kernel, blocks, threads, 0, nullptr)(dsums, devery, dx, n);
  CUDA_CHECK_LAUNCH();
  const std::vector<float> sums = host_copy(dsums, blocks), every = host_copy(devery, size_t(blocks) * threads);
  bool ok = true;
  for (int b = 0; b < blocks; b++) {
    float want = 0;
    for (int i = b * threads; i < std::min(n, (b + 1) * threads); i++) want += x[i];
    ok = ok && sums[b] == want;
    for (int t = 0; t < threads; t++) ok = ok && every[b * threads + t] == want;
  }
  report("block_sum (1000 = 3x256 + 232)", ok,
         fmt("block sums %g %g %g %g", double(sums[0]), double(sums[1]), double(sums[2]), double(sums[3])));
  CUDA_CHECK(cudaFree(dx));
  CUDA_CHECK(cudaFree(dsums));
  CUDA_CHECK(cudaFree(devery));
}

void check_warp_scan() {
  const int n = 200, threads = 64, blocks = int(ts::cuda::blocks_for(n, threads));
  std::vector<long long> in(n);  // (n)
  for (int i = 0; i < n; i++) in[i] = (long long)(i % 7 - 3) * 10000000000LL + i;  // needs all 64 bits
  long long* din = device_copy(in);
  long long* dout = device_alloc<long long>(n);
  for (int width : {32, 8}) {
    TS_LAUNCH(warp_scan_kernel, blocks, threads, 0, nullptr)(dout, din, n, width);
    CUDA_CHECK_LAUNCH();
    const std::vector<long long> out = host_copy(dout, n);
    bool ok = true;
    long long acc = 0;
    for (int i = 0; i < n; i++) {
      acc = (i % width == 0 ? 0 : acc) + in[i];
      ok = ok && out[i] == acc;
    }
    report(width == 32 ? "__shfl_up_sync scan (width 32)" : "__shfl_up_sync scan (width 8)", ok,
           fmt("out[199] = %lld", out[n - 1]));
  }
  CUDA_CHECK(cudaFree(din));
  CUDA_CHECK(cudaFree(dout));
}

void check_shuffle_rules() {
  int* d = device_alloc<int>(8 * 32);
  TS_LAUNCH(shuffle_rules_kernel, 1, 32, 0, nullptr)(d);
  CUDA_CHECK_LAUNCH();
  const std::vector<int> out = host_copy(d, 8 * 32);
  int wrong = 0;
  for (int lane = 0; lane < 32; lane++) {
    const int v = 100 + lane, seg = lane / 8 * 8, pos = lane % 8;  // the CUDA programming guide's rules
    const int want[8] = {100 + seg + 3,
                         100 + seg + 1,
                         100 + (lane + 1) % 32,
                         pos >= 2 ? v - 2 : v,
                         pos + 2 < 8 ? v + 2 : v,
                         lane == 0 ? 131 : v,
                         100 + (lane ^ 5),
                         (lane ^ 8) < lane ? 100 + (lane ^ 8) : v};
    for (int k = 0; k < 8; k++) wrong += out[8 * lane + k] != want[k];
  }
  report("shuffle source lanes (width 8 and 32)", wrong == 0, fmt("%d of 256 wrong", wrong));
  CUDA_CHECK(cudaFree(d));
}

void check_vote() {
  const int threads = 48, blocks = 2, n = threads * blocks;
  std::vector<float> x(n);  // (n)
  for (int i = 0; i < n; i++) x[i] = (i >= 80 || i % 3 == 0) ? 1.0f : -1.0f;  // block 1's partial warp: all positive
  float* dx = device_copy(x);
  unsigned* dballots = device_alloc<unsigned>(n);
  int* dany = device_alloc<int>(n);
  int* dall = device_alloc<int>(n);
  TS_LAUNCH(vote_kernel, blocks, threads, 0, nullptr)(dballots, dany, dall, dx);
  CUDA_CHECK_LAUNCH();
  const std::vector<unsigned> ballots = host_copy(dballots, n);
  const std::vector<int> any = host_copy(dany, n), all = host_copy(dall, n);
  bool ok = true;
  for (int i = 0; i < n; i++) {
    const int first = i - i % threads % 32;  // the warp's lane 0
    unsigned want = 0, lanes = 0;
    for (int l = 0; l < 32 && (first % threads) + l < threads; l++) {
      lanes |= 1u << l;
      if (x[first + l] > 0) want |= 1u << l;
    }
    ok = ok && ballots[i] == want && any[i] == (want != 0) && all[i] == (want == lanes);
  }
  report("__ballot_sync / __any / __all", ok, fmt("block 1 ballots: 0x%08x 0x%08x", ballots[48], ballots[80]));
  CUDA_CHECK(cudaFree(dx));
  CUDA_CHECK(cudaFree(dballots));
  CUDA_CHECK(cudaFree(dany));
  CUDA_CHECK(cudaFree(dall));
}

void check_transpose() {
  const int rows = 70, cols = 45;  // neither a multiple of the tile
  std::vector<float> in(rows * cols);  // (rows, cols)
  for (int i = 0; i < rows * cols; i++) in[i] = float(i);
  float* din = device_copy(in);
  float* dout = device_alloc<float>(rows * cols);
  const dim3 grid(ts::cuda::blocks_for(cols, TILE), ts::cuda::blocks_for(rows, TILE)), block(TILE, TILE_ROWS);
  TS_LAUNCH(transpose_kernel, grid, block, TILE * (TILE + 1) * sizeof(float), nullptr)(dout, din, rows, cols);
  CUDA_CHECK_LAUNCH();
  const std::vector<float> out = host_copy(dout, rows * cols);  // (cols, rows)
  int wrong = 0;
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < cols; c++) wrong += out[c * rows + r] != in[r * cols + c];
  report("transpose (dynamic shared, 70x45)", wrong == 0, fmt("%d wrong elements", wrong));
  CUDA_CHECK(cudaFree(din));
  CUDA_CHECK(cudaFree(dout));
}

void check_histogram() {
  const int n = 5000;
  std::vector<int> v(n);  // (n)
  std::vector<unsigned> want(16, 0);
  for (int i = 0; i < n; i++) {
    v[i] = (i * 7919) % 1013;
    want[v[i] & 15]++;
  }
  int* dv = device_copy(v);
  unsigned* dhist = device_alloc<unsigned>(16);
  CUDA_CHECK(cudaMemset(dhist, 0, 16 * sizeof(unsigned)));
  TS_LAUNCH(histogram_kernel, 7, 128, 0, nullptr)(dhist, dv, n);
  CUDA_CHECK_LAUNCH();
  report("atomicAdd histogram (16 bins)", host_copy(dhist, 16) == want, fmt("bin 0: %u", want[0]));
  CUDA_CHECK(cudaFree(dv));
  CUDA_CHECK(cudaFree(dhist));
}

void check_early_return() {
  int* dneighbour = device_alloc<int>(40);
  unsigned* dballots = device_alloc<unsigned>(40);
  TS_LAUNCH(early_return_kernel, 1, 64, 0, nullptr)(dneighbour, dballots);
  CUDA_CHECK_LAUNCH();
  const std::vector<int> neighbour = host_copy(dneighbour, 40);
  const std::vector<unsigned> ballots = host_copy(dballots, 40);
  bool ok = true;
  for (int t = 0; t < 40; t++) ok = ok && neighbour[t] == 3 * ((t + 1) % 40) && ballots[t] == (t < 32 ? FULL : 0xffu);
  report("returned threads leave barriers", ok, fmt("warp 1 ballot 0x%08x", ballots[39]));
  CUDA_CHECK(cudaFree(dneighbour));
  CUDA_CHECK(cudaFree(dballots));
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

void check_bf16() {
  const std::vector<float> x = {
      0.0f, -0.0f, 1.0f, -2.5f, 3.14159265f, 1e-3f, 65504.0f,
      from_bits(0x3f808000),  // 1 + 2^-8: a tie, to even (1.0)
      from_bits(0x3f818000),  // 1 + 3 * 2^-8: a tie, to even (up)
      from_bits(0x3f808001),  // just above the tie: up
      from_bits(0x3f807fff),  // just below: down
      from_bits(0x7f7fffff),  // float max: rounds to inf
      from_bits(0x7f7f0000),  // bf16 max finite: exact
      from_bits(0x7f7f7fff),  // below the tie between bf16 max and inf: max
      INFINITY, -INFINITY,
      from_bits(0x7fc00000),  // quiet NaN
      from_bits(0x7f800001),  // signalling NaN: must stay NaN (plain rounding would give inf)
      from_bits(0xffffffff),  // negative NaN, all payload bits
      from_bits(0x00000001),  // smallest denormal: to 0
      from_bits(0x00008000),  // denormal tie: to even (0)
      from_bits(0x00018000),  // denormal tie: to even (up)
      from_bits(0x000116c2),  // 1e-40
      from_bits(0x807fffff),  // largest negative denormal: rounds up into the normals
      from_bits(0x00800000),  // smallest normal
  };
  const int n = int(x.size());
  float* dx = device_copy(x);
  unsigned short* dbits = device_alloc<unsigned short>(n);
  float* dback = device_alloc<float>(n);
  float* dpair = device_alloc<float>(4 * n);
  TS_LAUNCH(bf16_kernel, 1, 64, 0, nullptr)(dbits, dback, dpair, dx, n);
  CUDA_CHECK_LAUNCH();
  const std::vector<unsigned short> bits = host_copy(dbits, n);
  const std::vector<float> back = host_copy(dback, n), pair = host_copy(dpair, 4 * n);
  auto same = [](float a, float b) { return bits_of(a) == bits_of(b); };
  int wrong = 0;
  for (int i = 0; i < n; i++) {
    const uint16_t want = ts::f32_to_bf16(x[i]);
#ifdef TS_CUDA_EMU
    const bool bits_ok = bits[i] == want;  // NaN payloads included: the emulator is the CPU reference
#else
    const bool bits_ok = std::isnan(x[i]) ? std::isnan(ts::bf16_to_f32(bits[i])) : bits[i] == want;  // GPU: canonical NaN
#endif
    const float f = ts::bf16_to_f32(bits[i]), g = ts::bf16_to_f32(ts::f32_to_bf16(x[(i + 1) % n]));
    const bool ok = bits_ok && same(back[i], f) && (std::isnan(f) || ts::f32_to_bf16(f) == bits[i]) &&
                    same(pair[4 * i], f) && same(pair[4 * i + 2], f) && same(pair[4 * i + 1], g) && same(pair[4 * i + 3], g);
    if (!ok) {
      std::printf("      bf16 of %a (0x%08x): got 0x%04x, want 0x%04x\n", double(x[i]), bits_of(x[i]), bits[i], want);
      wrong++;
    }
  }
  report("bf16 round trips (edge cases)", wrong == 0, fmt("%d of %d wrong", wrong, n));
  CUDA_CHECK(cudaFree(dx));
  CUDA_CHECK(cudaFree(dbits));
  CUDA_CHECK(cudaFree(dback));
  CUDA_CHECK(cudaFree(dpair));
}

// Two kernels and a device-to-device copy captured into a graph, replayed on new input contents: the
// results follow the contents, while the scalar arguments stay those of the capture.
void check_graph() {
  const int n = 300, threads = 128;
  const unsigned blocks = ts::cuda::blocks_for(n, threads);
  float* dx = device_alloc<float>(n);
  float* dy = device_alloc<float>(n);
  float* dz = device_alloc<float>(n);
  CUDA_CHECK(cudaMemset(dy, 0, n * sizeof(float)));
  CUDA_CHECK(cudaMemset(dz, 0, n * sizeof(float)));
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  float scale = 2.0f, bias = 0.5f;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  TS_LAUNCH(scale_kernel, blocks, threads, 0, stream)(dy, dx, scale, n);
  CUDA_CHECK(cudaMemcpyAsync(dz, dy, n * sizeof(float), cudaMemcpyDeviceToDevice, stream));
  TS_LAUNCH(add_kernel, blocks, threads, 0, stream)(dz, bias, n);
  CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const std::vector<float> z0 = host_copy(dz, n);
  bool ok = status == cudaStreamCaptureStatusActive;
  for (int i = 0; i < n; i++) ok = ok && z0[i] == 0.0f;  // recorded, not run
  report("graph capture records, runs nothing", ok, "");
  scale = 100.0f;  // changing the host variables after the capture changes nothing
  bias = 100.0f;
  int replays_ok = 0;
  for (int r = 0; r < 3; r++) {
    std::vector<float> x(n);  // (n)
    for (int i = 0; i < n; i++) x[i] = float(i + 1000 * r);
    CUDA_CHECK(cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaGraphLaunch(exec, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> z = host_copy(dz, n);
    bool same = true;
    for (int i = 0; i < n; i++) same = same && z[i] == x[i] * 2.0f + 0.5f;
    replays_ok += same;
  }
  report("graph replays x3 (new inputs, frozen args)", replays_ok == 3, fmt("%d of 3 replays right", replays_ok));

  // Outside relaxed mode cudaMalloc is refused during a capture, and the capture is invalidated.
  cudaGraph_t bad = nullptr;
  void* p = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const cudaError_t malloc_error = cudaMalloc(&p, 256);
  const cudaError_t end_error = cudaStreamEndCapture(stream, &bad);
  cudaGetLastError();
  report("cudaMalloc during capture refused", malloc_error == cudaErrorStreamCaptureUnsupported &&
                                                  end_error == cudaErrorStreamCaptureInvalidated && !bad,
         std::string(cudaGetErrorName(malloc_error)) + ", then " + cudaGetErrorName(end_error));
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  CUDA_CHECK(cudaStreamDestroy(stream));
  CUDA_CHECK(cudaFree(dx));
  CUDA_CHECK(cudaFree(dy));
  CUDA_CHECK(cudaFree(dz));
}

void check_invalid_launch() {
  const int n = 64;
  int* d = device_alloc<int>(n);
  CUDA_CHECK(cudaMemset(d, 0, n * sizeof(int)));
  TS_LAUNCH(fill_kernel, 1, 2048, 0, nullptr)(d, 7, n);
  const cudaError_t first = cudaGetLastError(), second = cudaGetLastError();
  const std::vector<int> out = host_copy(d, n);
  bool untouched = true;
  for (int v : out) untouched = untouched && v == 0;
  report("2048-thread launch refused", first == cudaErrorInvalidConfiguration && second == cudaSuccess && untouched,
         std::string(cudaGetErrorName(first)) + ", then " + cudaGetErrorName(second));

  void* huge = nullptr;
  const cudaError_t e = cudaMalloc(&huge, size_t(1) << 42);  // 4 TiB: beyond any device
  cudaGetLastError();
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  report("oversized cudaMalloc refused", e == cudaErrorMemoryAllocation && !huge && free_bytes <= total_bytes,
         std::string(cudaGetErrorName(e)) + fmt(", %zu of %zu MiB free", free_bytes >> 20, total_bytes >> 20));
  CUDA_CHECK(cudaFree(d));
}

#ifdef TS_CUDA_EMU
// The divergent kernel must abort the process with a message naming it; run it in a child process.
void check_divergence() {
  int fds[2];
  if (pipe(fds) != 0) {
    report("divergence aborts", false, "pipe failed");
    return;
  }
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    const rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    alarm(20);  // a hang (the bug not detected) ends in SIGALRM, not SIGABRT
    dup2(fds[1], 2);
    close(fds[0]);
    float* d = nullptr;
    cudaMalloc(&d, 64 * sizeof(float));
    TS_LAUNCH(divergent_kernel, 1, 64, 0, nullptr)(d);
    _exit(0);  // not reached when the emulator detects the bug
  }
  close(fds[1]);
  std::string message;
  char buf[512];
  for (ssize_t got; (got = read(fds[0], buf, sizeof buf)) > 0;) message.append(buf, size_t(got));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  while (!message.empty() && message.back() == '\n') message.pop_back();
  const bool ok = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT &&
                  message.find("kernel 'divergent_kernel'") != std::string::npos && message.find("diverged") != std::string::npos;
  report("divergence aborts", ok, "child stderr: " + message);
}
#endif

// Not a check: what one barrier round and one shuffle round cost here (best of 5 launches).
void measure() {
  int* d = device_alloc<int>(1);
  float* f = device_alloc<float>(1);
  const int rounds = 1000;
  for (int threads : {256, 1024}) {
    double sync_us = 1e30, shfl_us = 1e30;
    for (int rep = 0; rep < 5; rep++) {
      CUDA_CHECK(cudaDeviceSynchronize());
      const auto t0 = std::chrono::steady_clock::now();
      TS_LAUNCH(barrier_loop_kernel, 1, threads, 0, nullptr)(d, rounds);
      CUDA_CHECK(cudaDeviceSynchronize());
      const auto t1 = std::chrono::steady_clock::now();
      TS_LAUNCH(shuffle_loop_kernel, 1, threads, 0, nullptr)(f, rounds);
      CUDA_CHECK(cudaDeviceSynchronize());
      const auto t2 = std::chrono::steady_clock::now();
      sync_us = std::min(sync_us, std::chrono::duration<double, std::micro>(t1 - t0).count() / rounds);
      shfl_us = std::min(shfl_us, std::chrono::duration<double, std::micro>(t2 - t1).count() / rounds);
    }
    CUDA_CHECK_LAUNCH();
    std::printf("info  %4d-thread block: %.2f us per __syncthreads round, %.2f us per __shfl_xor_sync round\n", threads,
                sync_us, shfl_us);
  }
  CUDA_CHECK(cudaFree(d));
  CUDA_CHECK(cudaFree(f));
}

}  // namespace

int main() {
  try {
    check_block_sum();
    check_warp_scan();
    check_shuffle_rules();
    check_vote();
    check_transpose();
    check_histogram();
    check_early_return();
    check_bf16();
    check_graph();
    check_invalid_launch();
#ifdef TS_CUDA_EMU
    check_divergence();
#endif
    measure();
  } catch (const std::exception& e) {
    report("unexpected exception", false, e.what());
  }
  std::printf("%s: %d check(s) failed\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
