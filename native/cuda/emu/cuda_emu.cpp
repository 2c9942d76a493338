// The CUDA emulator's scheduler (blocks in order, a block's threads as fibers) and runtime API subset.
// What it is for and what it leaves out: cuda_emu.h.
#include "cuda/emu/cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__) || defined(TS_EMU_UCONTEXT)
#define TS_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#else
// Saves the callee-saved registers (SysV x86-64) on the current stack, stores the stack pointer in
// *save_sp, then restores the registers saved on `load_sp` and returns into that context. A fresh
// context is a stack whose top holds six zero registers and the address of its entry function.
// swapcontext does the same plus two sigprocmask system calls, which made it ~90x slower (2.3 us
// against 25 ns per switch pair here): a barrier of a 1024-thread block costs 2048 switches.
extern "C" void ts_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl ts_emu_switch
  .hidden ts_emu_switch
  .type ts_emu_switch, @function
ts_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ts_emu_switch, .-ts_emu_switch
)");
#endif

struct CUgraph_st {
  std::vector<std::function<void()>> ops;
};
struct CUgraphExec_st {
  std::shared_ptr<const std::vector<std::function<void()>>> ops;  // shared with graphs that captured a launch of it
};
struct CUstream_st {
  unsigned flags = 0;
  std::unique_ptr<CUgraph_st> capture;  // the graph being recorded, while the stream captures
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  bool invalidated = false;  // an illegal call happened during the capture: EndCapture fails
};
struct CUevent_st {
  std::chrono::steady_clock::time_point when;
  bool recorded = false;
};

namespace ts::emu {

Builtins builtins;

namespace {

constexpr size_t kSharedOptin = 227 * 1024;  // H100/H200: the most dynamic shared memory per block

[[noreturn]] __attribute__((format(printf, 1, 2))) void die(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fputs("cuda_emu: ", stderr);
  std::vfprintf(stderr, fmt, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::fflush(stderr);
  std::abort();
}

size_t env_size(const char* name, size_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  unsigned long long x = std::strtoull(v, &end, 10);
  if (*end || x == 0) die("%s=%s is not a positive integer", name, v);
  return size_t(x);
}

// ---- Fibers -----------------------------------------------------------------------------------------

#ifdef TS_EMU_USE_UCONTEXT
struct Context {
  ucontext_t uc;
};
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;  // entry never returns
  makecontext(&c.uc, entry, 0);
}
#else
struct Context {
  void* sp = nullptr;
};
void switch_context(Context& from, Context& to) { ts_emu_switch(&from.sp, to.sp); }
void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  *--sp = nullptr;  // entry's return address: it never returns; keeps rsp = 8 mod 16 on entry, as after a call
  *--sp = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; i++) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  c.sp = sp;
}
#endif

enum class State : uint8_t { Ready, AtSync, AtWarp, Done };

struct Thread {
  Context ctx;
  char* stack = nullptr;  // stack_bytes() above a PROT_NONE guard page
  uint3 idx = {0, 0, 0};  // threadIdx in the running grid's blocks
  State state = State::Ready;
  Op op = Op::SyncWarp;  // the collective waited at (state AtWarp), with its operands below
  unsigned mask = 0;
  int param = 0, width = 32;
  uint64_t in = 0, out = 0;
};

// The running grid. A fiber gives up control only when it waits (syncthreads, warp_collective) or
// returns, straight to the next ready thread of its block in index order, round robin; control goes
// back to `scheduler` only when no thread is ready: the block is done, or deadlocked.
struct Scheduler {
  const Grid* grid = nullptr;
  std::vector<Thread> threads;  // grows to the largest block seen; stacks are reused across launches
  int n = 0, live = 0, arrived = 0, current = 0;  // arrived: threads waiting at __syncthreads
  struct Warp {
    unsigned at_collective, returned;  // lane bits: a collective's test is O(1) until all have come
  } warps[32];
  void* dynamic_shared = nullptr;
  Context scheduler;
} S;

const size_t page_bytes = size_t(sysconf(_SC_PAGESIZE));

size_t stack_bytes() {
  static const size_t bytes = (env_size("TS_EMU_STACK_KB", 128) * 1024 + page_bytes - 1) / page_bytes * page_bytes;
  return bytes;
}

void ensure_threads(int n) {
  while (int(S.threads.size()) < n) {
    const size_t bytes = stack_bytes(), page = page_bytes;
    void* base = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(base, page, PROT_NONE) != 0) die("cannot map a %zu-byte fiber stack", bytes);
    S.threads.emplace_back();
    S.threads.back().stack = static_cast<char*>(base) + page;
  }
}

const char* op_name(Op op) {
  switch (op) {
    case Op::SyncWarp: return "__syncwarp";
    case Op::Shfl: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
  }
  return "?";
}

std::string where() {
  const uint3 b = builtins.block_idx;
  char buf[160];
  std::snprintf(buf, sizeof buf, "kernel '%s' block (%u,%u,%u)", S.grid->name, b.x, b.y, b.z);
  return buf;
}

Thread& running_thread(const char* what) {
  if (!S.grid) die("%s called outside a kernel", what);
  return S.threads[S.current];
}

unsigned lanes_of_warp(int warp) {  // the lanes that exist: the last warp of a block may be partial
  const int n = S.n - warp * 32;
  return n >= 32 ? ~0u : (1u << n) - 1;
}

void resume(Context& from, int t) {
  S.current = t;
  builtins.thread_idx = S.threads[t].idx;
  switch_context(from, S.threads[t].ctx);
}

// Called by a thread that waits or has returned; returns once another thread made it ready again.
void wait(Thread& self) {
  const int me = S.current;
  int t = me;
  do t = t + 1 == S.n ? 0 : t + 1;
  while (t != me && S.threads[t].state != State::Ready);
  if (t == me) switch_context(self.ctx, S.scheduler);
  else resume(self.ctx, t);
}

void release_block_barrier() {
  for (int t = 0; t < S.n; t++)
    if (S.threads[t].state == State::AtSync) S.threads[t].state = State::Ready;
  S.arrived = 0;
}

// The lane a shuffle reads, as PTX shfl.sync defines it for CUDA's width argument: segments of `width`
// lanes; a source outside the segment (up: below it; down, xor: above it) means the lane's own value.
int source_lane(Op op, int lane, int param, int width) {
  const int b = param & 31, first = lane & ~(width - 1), last = first | (width - 1);
  switch (op) {
    case Op::Shfl: return first | (b & (width - 1));
    case Op::ShflUp: return lane - b >= first ? lane - b : lane;
    case Op::ShflDown: return lane + b <= last ? lane + b : lane;
    default: return (lane ^ b) <= last ? lane ^ b : lane;
  }
}

// Completes the collective (op, mask) of `warp` if every live lane of the mask waits at it: computes
// every lane's result first, then makes them all ready, so no lane can run ahead and change its operand
// before the others have read it.
bool try_complete(int warp, Op op, unsigned mask) {
  if (((S.warps[warp].at_collective | S.warps[warp].returned) & mask) != mask) return false;
  Thread* lanes = &S.threads[warp * 32];
  unsigned group = 0, vote = 0;
  for (unsigned m = mask; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    if (lanes[l].state == State::Done) continue;
    if (lanes[l].state != State::AtWarp || lanes[l].op != op || lanes[l].mask != mask) return false;
    group |= 1u << l;
    if (lanes[l].in) vote |= 1u << l;
  }
  for (unsigned m = group; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    Thread& t = lanes[l];
    switch (op) {
      case Op::SyncWarp: t.out = 0; break;
      case Op::Ballot: t.out = vote; break;
      case Op::Any: t.out = vote != 0; break;
      case Op::All: t.out = vote == group; break;
      default: {
        // A source lane that takes no part holds an undefined value on a GPU: poison it.
        const int src = source_lane(op, l, t.param, t.width);
        t.out = src == l ? t.in : (group >> src & 1) ? lanes[src].in : ~uint64_t(0);
      }
    }
  }
  for (unsigned m = group; m; m &= m - 1) lanes[__builtin_ctz(m)].state = State::Ready;
  S.warps[warp].at_collective &= ~group;
  return true;
}

void fiber_main() {
  S.grid->body();
  Thread& self = S.threads[S.current];
  self.state = State::Done;
  S.live--;
  // A returned thread no longer counts: the barrier, or a collective of its warp, may now be complete.
  if (S.arrived > 0 && S.arrived == S.live) release_block_barrier();
  const int warp = S.current / 32;
  S.warps[warp].returned |= 1u << S.current % 32;
  for (unsigned m = S.warps[warp].at_collective; m; m &= m - 1) {
    const Thread& t = S.threads[warp * 32 + __builtin_ctz(m)];
    if (t.state == State::AtWarp) try_complete(warp, t.op, t.mask);  // may have completed with an earlier lane
  }
  wait(self);  // never resumed: the next block restarts this context
}

[[noreturn]] void report_deadlock() {
  // Every live thread waits. Within one warp, lanes at different barriers (some at __syncthreads, some
  // at a shuffle, or at collectives with different masks) wait for each other forever: divergence.
  std::string detail;
  for (int warp = 0; warp * 32 < S.n && detail.empty(); warp++) {
    std::vector<std::pair<std::string, unsigned>> groups;  // (barrier, lanes waiting at it)
    for (int l = 0; l < 32 && warp * 32 + l < S.n; l++) {
      const Thread& t = S.threads[warp * 32 + l];
      if (t.state == State::Done) continue;
      char name[64];
      if (t.state == State::AtSync) std::snprintf(name, sizeof name, "__syncthreads()");
      else std::snprintf(name, sizeof name, "%s(mask 0x%08x)", op_name(t.op), t.mask);
      size_t g = 0;
      while (g < groups.size() && groups[g].first != name) g++;
      if (g == groups.size()) groups.emplace_back(name, 0u);
      groups[g].second |= 1u << l;
    }
    if (groups.size() < 2) continue;
    detail = ": warp " + std::to_string(warp) + " diverged, its lanes wait at different barriers:";
    for (const auto& [name, lanes] : groups) {
      char buf[96];
      std::snprintf(buf, sizeof buf, " lanes 0x%08x at %s;", lanes, name.c_str());
      detail += buf;
    }
    detail.pop_back();
  }
  die("deadlock in %s, no thread can continue%s", where().c_str(), detail.c_str());
}

void run_block() {
  S.live = S.n;
  S.arrived = 0;
  for (auto& w : S.warps) w = {0, 0};
  for (int t = 0; t < S.n; t++) {
    S.threads[t].state = State::Ready;
    start_context(S.threads[t].ctx, S.threads[t].stack, stack_bytes(), fiber_main);
  }
  resume(S.scheduler, 0);
  if (S.live > 0) report_deadlock();
}

void run_grid(const Grid& g) {
  if (S.grid) die("%s launches kernel '%s': dynamic parallelism is not emulated", where().c_str(), g.name);
  S.grid = &g;
  S.n = int(g.block.x * g.block.y * g.block.z);
  ensure_threads(S.n);
  const dim3 b = g.block;
  for (int t = 0; t < S.n; t++) S.threads[t].idx = {t % b.x, t / b.x % b.y, t / (b.x * b.y)};  // x fastest, as warps
  std::vector<float4> shared((g.shared_bytes + 15) / 16);  // float4: 16-byte aligned
  S.dynamic_shared = g.shared_bytes ? shared.data() : nullptr;
  builtins.block_dim = g.block;
  builtins.grid_dim = g.grid;
  for (unsigned z = 0; z < g.grid.z; z++)
    for (unsigned y = 0; y < g.grid.y; y++)
      for (unsigned x = 0; x < g.grid.x; x++) {
        builtins.block_idx = {x, y, z};
        if (g.shared_bytes) std::memset(S.dynamic_shared, 0xff, g.shared_bytes);  // uninitialised: NaN / -1
        run_block();
      }
  S.grid = nullptr;
}

// ---- Runtime state ----------------------------------------------------------------------------------

struct Runtime {
  size_t capacity = env_size("TS_EMU_DEVICE_MB", 4096) << 20, used = 0;
  std::unordered_map<void*, size_t> allocations;  // pointer -> bytes counted against capacity
  cudaError_t last_error = cudaSuccess;
  std::vector<CUstream_st*> capturing;
};
Runtime& rt() {
  static Runtime r;
  return r;
}

cudaError_t fail(cudaError_t e) {
  rt().last_error = e;
  return e;
}

// Outside relaxed mode, calls that could not be recorded into the graph are refused during a capture,
// and the capture is invalidated.
cudaError_t refuse_during_capture() {
  bool refused = false;
  for (CUstream_st* s : rt().capturing)
    if (s->mode != cudaStreamCaptureModeRelaxed) refused = s->invalidated = true;
  return refused ? fail(cudaErrorStreamCaptureUnsupported) : cudaSuccess;
}

// Runs `op` now, or records it when `stream` captures.
template <typename F>
cudaError_t submit(cudaStream_t stream, F&& op) {
  if (stream && stream->capture) {
    stream->capture->ops.emplace_back(std::forward<F>(op));
    return cudaSuccess;
  }
  if (!stream) {  // the legacy stream would have to wait for every blocking stream, a capturing one too
    bool implicit = false;
    for (CUstream_st* s : rt().capturing)
      if (!(s->flags & cudaStreamNonBlocking)) implicit = s->invalidated = true;
    if (implicit) return fail(cudaErrorStreamCaptureImplicit);
  }
  op();
  return cudaSuccess;
}

}  // namespace

// ---- Kernel-side entry points -----------------------------------------------------------------------

void launch(Grid g, cudaStream_t stream) {
  const dim3 b = g.block, n = g.grid;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64 || n.x == 0 || n.y == 0 ||
      n.z == 0 || n.x > unsigned(INT_MAX) || n.y > 65535 || n.z > 65535 || g.shared_bytes > kSharedOptin) {
    fail(cudaErrorInvalidConfiguration);
    return;
  }
  submit(stream, [g = std::move(g)] { run_grid(g); });
}

void* dynamic_shared() { return S.dynamic_shared; }

void syncthreads() {
  Thread& self = running_thread("__syncthreads");
  self.state = State::AtSync;
  if (++S.arrived == S.live) release_block_barrier();
  else wait(self);
}

uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int param, int width) {
  Thread& self = running_thread(op_name(op));
  const int lane = S.current % 32, warp = S.current / 32;
  if (width < 1 || width > 32 || (width & (width - 1)))
    die("%s thread %d: %s width %d is not a power of two in [1, 32]", where().c_str(), S.current, op_name(op), width);
  mask &= lanes_of_warp(warp);
  if (!(mask >> lane & 1))
    die("%s thread %d: %s with mask 0x%08x, which leaves out the calling lane %d", where().c_str(), S.current,
        op_name(op), mask, lane);
  self.state = State::AtWarp;
  self.op = op;
  self.mask = mask;
  self.in = value;
  self.param = param;
  self.width = width;
  S.warps[warp].at_collective |= 1u << lane;
  if (!try_complete(warp, op, mask)) wait(self);
  return self.out;
}

unsigned live_lanes() {
  running_thread("__activemask");
  return lanes_of_warp(S.current / 32) & ~S.warps[S.current / 32].returned;
}

}  // namespace ts::emu

// ---- Runtime API ------------------------------------------------------------------------------------

using ts::emu::fail;
using ts::emu::rt;

namespace {
struct ErrorText {
  cudaError_t e;
  const char *name, *text;
};
constexpr ErrorText kErrors[] = {
    {cudaSuccess, "cudaSuccess", "no error"},
    {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
    {cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation", "out of memory"},
    {cudaErrorInvalidConfiguration, "cudaErrorInvalidConfiguration", "invalid configuration argument"},
    {cudaErrorInvalidMemcpyDirection, "cudaErrorInvalidMemcpyDirection", "invalid copy direction for memcpy"},
    {cudaErrorInvalidDevice, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {cudaErrorInvalidResourceHandle, "cudaErrorInvalidResourceHandle", "invalid resource handle"},
    {cudaErrorIllegalState, "cudaErrorIllegalState", "the operation cannot be performed in the present state"},
    {cudaErrorNotSupported, "cudaErrorNotSupported", "operation not supported"},
    {cudaErrorStreamCaptureUnsupported, "cudaErrorStreamCaptureUnsupported", "operation not permitted when stream is capturing"},
    {cudaErrorStreamCaptureInvalidated, "cudaErrorStreamCaptureInvalidated", "operation failed due to a previous error during capture"},
    {cudaErrorStreamCaptureImplicit, "cudaErrorStreamCaptureImplicit", "operation would make the legacy stream depend on a capturing blocking stream"},
};
const ErrorText* find_error(cudaError_t e) {
  for (const ErrorText& t : kErrors)
    if (t.e == e) return &t;
  return nullptr;
}
}  // namespace

const char* cudaGetErrorName(cudaError_t e) { return find_error(e) ? find_error(e)->name : "unrecognized error code"; }
const char* cudaGetErrorString(cudaError_t e) { return find_error(e) ? find_error(e)->text : "unrecognized error code"; }
cudaError_t cudaGetLastError() {
  const cudaError_t e = rt().last_error;
  rt().last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return rt().last_error; }

cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return fail(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice); }
cudaError_t cudaGetDevice(int* device) {
  if (!device) return fail(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (!prop) return fail(cudaErrorInvalidValue);
  if (device != 0) return fail(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "CUDA emulator (CPU)");
  prop->totalGlobalMem = rt().capacity;
  prop->sharedMemPerBlock = 48 * 1024;
  prop->sharedMemPerBlockOptin = ts::emu::kSharedOptin;
  prop->sharedMemPerMultiprocessor = 228 * 1024;
  prop->regsPerBlock = 65536;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = INT_MAX;
  prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 132;
  prop->maxThreadsPerMultiProcessor = 2048;
  prop->l2CacheSize = 50 << 20;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return ts::emu::refuse_during_capture(); }
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute, int) {
  return func ? cudaSuccess : fail(cudaErrorInvalidValue);
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  if (!ptr) return fail(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (cudaError_t e = ts::emu::refuse_during_capture()) return e;
  if (bytes == 0) return cudaSuccess;
  auto& r = rt();
  if (bytes > r.capacity - r.used) return fail(cudaErrorMemoryAllocation);
  const size_t rounded = (bytes + 255) & ~size_t(255);  // capacity and used are multiples of 256
  void* p = std::aligned_alloc(256, rounded);
  if (!p) return fail(cudaErrorMemoryAllocation);
  std::memset(p, 0xff, rounded);  // uninitialised device memory reads as NaN / -1
  r.allocations[p] = rounded;
  r.used += rounded;
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaFree(void* ptr) {
  if (cudaError_t e = ts::emu::refuse_during_capture()) return e;
  if (!ptr) return cudaSuccess;
  auto& r = rt();
  auto it = r.allocations.find(ptr);
  if (it == r.allocations.end()) return fail(cudaErrorInvalidValue);
  r.used -= it->second;
  r.allocations.erase(it);
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  if (!free_bytes || !total_bytes) return fail(cudaErrorInvalidValue);
  *free_bytes = rt().capacity - rt().used;
  *total_bytes = rt().capacity;
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  if (unsigned(kind) > cudaMemcpyDefault) return fail(cudaErrorInvalidMemcpyDirection);
  if (bytes == 0) return cudaSuccess;
  if (!dst || !src) return fail(cudaErrorInvalidValue);
  return ts::emu::submit(stream, [=] { std::memcpy(dst, src, bytes); });
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (cudaError_t e = ts::emu::refuse_during_capture()) return e;
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  if (!ptr) return fail(cudaErrorInvalidValue);
  return ts::emu::submit(stream, [=] { std::memset(ptr, value, bytes); });
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  if (cudaError_t e = ts::emu::refuse_during_capture()) return e;
  return cudaMemsetAsync(ptr, value, bytes, nullptr);
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  if (!stream) return fail(cudaErrorInvalidValue);
  *stream = new CUstream_st;
  (*stream)->flags = flags;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (!stream) return fail(cudaErrorInvalidResourceHandle);
  auto& c = rt().capturing;
  c.erase(std::remove(c.begin(), c.end(), stream), c.end());
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (!stream) return ts::emu::refuse_during_capture();
  if (!stream->capture) return cudaSuccess;
  stream->invalidated = true;
  return fail(cudaErrorStreamCaptureUnsupported);
}

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  if (!event) return fail(cudaErrorInvalidValue);
  *event = new CUevent_st;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (!event) return fail(cudaErrorInvalidResourceHandle);
  return ts::emu::submit(stream, [event] {
    event->when = std::chrono::steady_clock::now();
    event->recorded = true;
  });
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) { return event ? cudaSuccess : fail(cudaErrorInvalidResourceHandle); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms) return fail(cudaErrorInvalidValue);
  if (!start || !end || !start->recorded || !end->recorded) return fail(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (!event) return fail(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  if (!stream) return fail(cudaErrorStreamCaptureUnsupported);  // the legacy stream cannot capture
  if (stream->capture) return fail(cudaErrorIllegalState);
  stream->capture = std::make_unique<CUgraph_st>();
  stream->mode = mode;
  stream->invalidated = false;
  rt().capturing.push_back(stream);
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  if (!graph) return fail(cudaErrorInvalidValue);
  *graph = nullptr;
  if (!stream || !stream->capture) return fail(cudaErrorIllegalState);
  auto& c = rt().capturing;
  c.erase(std::remove(c.begin(), c.end(), stream), c.end());
  std::unique_ptr<CUgraph_st> g = std::move(stream->capture);
  if (stream->invalidated) return fail(cudaErrorStreamCaptureInvalidated);
  *graph = g.release();
  return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  if (!status) return fail(cudaErrorInvalidValue);
  *status = !stream || !stream->capture ? cudaStreamCaptureStatusNone
            : stream->invalidated       ? cudaStreamCaptureStatusInvalidated
                                        : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  if (!exec || !graph) return fail(cudaErrorInvalidValue);
  *exec = new CUgraphExec_st{std::make_shared<const std::vector<std::function<void()>>>(graph->ops)};
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  if (!exec) return fail(cudaErrorInvalidValue);
  return ts::emu::submit(stream, [ops = exec->ops] {
    for (const auto& op : *ops) op();
  });
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  if (!exec) return fail(cudaErrorInvalidValue);
  delete exec;
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  if (!graph) return fail(cudaErrorInvalidValue);
  delete graph;
  return cudaSuccess;
}
