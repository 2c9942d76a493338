// The CPU matrix products (gemm.h): argument handling, the choice of kernel set (AVX-512, AVX2+FMA or
// scalar by CPUID at run time; optionally OpenBLAS through dlopen), and the split of the work over the
// thread pool. The kernels themselves live in gemm_avx512.cpp / gemm_avx2.cpp / gemm_scalar.cpp.
//
// Paths:
//   sgemm, M <= SMALL_M          A gathered to rows, columns of C split over threads, B streamed once
//   sgemm, larger M              C cut into tm x tn rectangles (one per thread), each run by the
//                                cache-blocked kernel with its own packing buffers
//   matmul_nf4_*, M <= NF4_*_SMALL_M fused dequantize+dot (nt) / dequantize+axpy (nn) over slot-ordered
//                                activations, W read once
//   matmul_nf4_*, larger M       the blocked kernel, dequantizing W while packing its panels
#include "cpu/gemm.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/gemm_kernels.h"

namespace ts::cpu {
namespace detail {

// Per-thread scratch: a few 64-byte aligned buffers that grow on demand and are freed at thread exit.
float* scratch(int slot, size_t floats) {
  struct Buffers {
    float* ptr[4] = {};
    size_t size[4] = {};
    ~Buffers() {
      for (float* p : ptr) std::free(p);
    }
  };
  thread_local Buffers buffers;
  if (buffers.size[slot] < floats) {
    std::free(buffers.ptr[slot]);
    buffers.size[slot] = 0;
    const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    buffers.ptr[slot] = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!buffers.ptr[slot])
      throw EngineError("OUT_OF_MEMORY", "gemm: cannot allocate " + std::to_string(bytes) + " bytes of scratch");
    buffers.size[slot] = floats;
  }
  return buffers.ptr[slot];
}

}  // namespace detail

namespace {

using detail::GemmProblem;
using detail::KernelSet;
using detail::Operand;

// Largest M that takes the small-M (matrix-vector style) paths; above it the blocked kernel wins
// (bench/kernels/README.md has the crossover measurements).
constexpr int64_t SMALL_M = 8;
constexpr int64_t NF4_NT_SMALL_M = 12;
constexpr int64_t NF4_NN_SMALL_M = 4;

// ---- OpenBLAS, optional, loaded at run time (TUNESERVE_BLAS=openblas) ----

enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112 };
using cblas_sgemm_fn = void (*)(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A,
                                int lda, const float* B, int ldb, float beta, float* C, int ldc);

struct OpenBlas {
  cblas_sgemm_fn sgemm = nullptr;
  void (*set_num_threads)(int) = nullptr;
  std::string name;                 // "openblas:<core>"
  std::atomic<int> threads{0};      // what OpenBLAS was last told; follows ts::num_threads()
};

OpenBlas* load_openblas() {
  static OpenBlas blas;
  static bool tried = false;
  if (tried) return blas.sgemm ? &blas : nullptr;
  tried = true;
  const char* path = std::getenv("TUNESERVE_OPENBLAS_PATH");
  void* lib = dlopen(path && *path ? path : "libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::fprintf(stderr, "tuneserve: TUNESERVE_BLAS=openblas but %s does not load (%s); using the own kernel\n",
                 path && *path ? path : "libopenblas.so.0", dlerror());
    return nullptr;
  }
  blas.sgemm = reinterpret_cast<cblas_sgemm_fn>(dlsym(lib, "cblas_sgemm"));
  blas.set_num_threads = reinterpret_cast<void (*)(int)>(dlsym(lib, "openblas_set_num_threads"));
  auto corename = reinterpret_cast<const char* (*)()>(dlsym(lib, "openblas_get_corename"));
  blas.name = std::string("openblas:") + (corename ? corename() : "?");
  return blas.sgemm ? &blas : nullptr;
}

// ---- kernel selection ----

const KernelSet* best_own_kernels() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    if (const KernelSet* k = detail::kernels_avx512()) return k;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    if (const KernelSet* k = detail::kernels_avx2()) return k;
#endif
  return &detail::kernels_scalar();
}

struct Selection {
  std::atomic<const KernelSet*> own{nullptr};
  std::atomic<OpenBlas*> blas{nullptr};
};

Selection& selection() {
  static Selection* s = [] {
    auto* sel = new Selection();
    sel->own.store(best_own_kernels());
    // TUNESERVE_BLAS: "own" (default): the kernels here; "openblas": OpenBLAS for sgemm; "auto": the
    // kernels here unless this CPU only gets the scalar set and OpenBLAS loads (e.g. a non-x86 host).
    const char* mode = std::getenv("TUNESERVE_BLAS");
    if (mode && std::strcmp(mode, "openblas") == 0) sel->blas.store(load_openblas());
    if (mode && std::strcmp(mode, "auto") == 0 && sel->own.load() == &detail::kernels_scalar())
      sel->blas.store(load_openblas());
    return sel;
  }();
  return *s;
}

const KernelSet& own_kernels() { return *selection().own.load(std::memory_order_relaxed); }

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C = beta * C over an M x N view (beta == 0 writes zeros without reading).
void scale_c(float* c, int64_t M, int64_t N, int64_t ldc, float beta) {
  for (int64_t i = 0; i < M; i++) {
    float* row = c + i * ldc;
    if (beta == 0.f) std::memset(row, 0, size_t(N) * sizeof(float));
    else if (beta != 1.f)
      for (int64_t j = 0; j < N; j++) row[j] *= beta;
  }
}

// Splits C into tm x tn rectangles, one per task, and runs the blocked kernel on each. The split
// minimizes an estimate of one task's time in cycles: its multiply-adds (32 per cycle) plus its packing
// (about half a cycle per element; A once per NC panel of columns, B once; dequantizing NF4 B costs
// about 3x a float copy).
void run_blocked(const KernelSet& ks, const GemmProblem& p) {
  const int64_t MR = ks.MR, NR = ks.NR;
  const double macs = double(p.M) * double(p.N) * double(p.K);
  // Under ~100k multiply-adds a pool round trip costs more than it saves.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(ts::num_threads(), int64_t(macs / 131072)));
  const double b_cost = p.b_nf4 ? 1.5 : 0.5;
  int64_t best_tm = 1, best_tn = tasks, best_rows = p.M, best_cols = p.N;
  double best = -1;
  for (int64_t tn = 1; tn <= tasks; tn++) {
    if (tasks % tn) continue;
    const int64_t tm = tasks / tn;
    const int64_t rows = round_up((p.M + tm - 1) / tm, MR), cols = round_up((p.N + tn - 1) / tn, NR);
    const int64_t used = ((p.M + rows - 1) / rows) * ((p.N + cols - 1) / cols);
    const double cost = double(rows) * double(cols) * double(p.K) / 32.0 +
                        0.5 * double(rows) * double(p.K) * double((cols + ks.NC - 1) / ks.NC) + b_cost * double(cols) * double(p.K) +
                        (used < tasks ? 1e-3 : 0.0);  // prefer splits that keep every task busy
    if (best < 0 || cost < best) best = cost, best_tm = tm, best_tn = tn, best_rows = rows, best_cols = cols;
  }
  const int64_t tn = best_tn, rows = best_rows, cols = best_cols;
  ts::parallel_for(best_tm * tn, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const int64_t i0 = (t / tn) * rows, j0 = (t % tn) * cols;
      const int64_t i1 = std::min(p.M, i0 + rows), j1 = std::min(p.N, j0 + cols);
      if (i0 < i1 && j0 < j1) ks.gemm_block(p, i0, i1, j0, j1);
    }
  });
}

void run_small_m(const KernelSet& ks, GemmProblem p) {
  if (p.a.trans) {  // gather op(A) (M, K) into rows: A is [K, M] here, M <= SMALL_M
    float* rows = detail::scratch(2, size_t(p.M * p.K));
    for (int64_t k = 0; k < p.K; k++)
      for (int64_t m = 0; m < p.M; m++) rows[m * p.K + k] = p.a.data[k * p.a.ld + m];
    p.a = Operand{rows, p.K, false};
  }
  // Units of 64 columns; a chunk should carry >= ~64k multiply-adds to be worth a thread.
  const int64_t unit = 64, units = (p.N + unit - 1) / unit;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, unit * p.K * p.M));
  ts::parallel_for(units, grain, [&](int64_t u0, int64_t u1) {
    ks.gemm_small_m(p, u0 * unit, std::min(p.N, u1 * unit));
  });
}

bool fits_int(int64_t v) { return v >= 0 && v <= 0x7fffffff; }

void check_nf4(const NF4View& w, const char* what) {
  require(w.cols > 0 && w.cols % NF4_BLOCK == 0 && w.rows >= 0, "INVALID_ARGUMENT",
          std::string(what) + ": NF4 weight must have cols a positive multiple of 64");
  require(w.codes != nullptr && w.absmax_q != nullptr && w.absmax_scale != nullptr, "INVALID_ARGUMENT",
          std::string(what) + ": NF4 weight has no data");
}

}  // namespace

namespace detail {

// Selects the kernel set by name ("avx512", "avx2", "scalar", "openblas", or "auto" for the best own
// set); returns false when that set is not available on this CPU / machine. Used by tests and the lab.
bool select_kernels(const std::string& name) {
  Selection& sel = selection();
  if (name == "openblas") {
    OpenBlas* blas = load_openblas();
    if (!blas) return false;
    sel.blas.store(blas);
    return true;
  }
  const KernelSet* k = nullptr;
  if (name == "auto") k = best_own_kernels();
  else if (name == "scalar") k = &kernels_scalar();
#if defined(__x86_64__) || defined(__i386__)
  else if (name == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) k = kernels_avx2();
  else if (name == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    k = kernels_avx512();
#endif
  if (!k) return false;
  sel.blas.store(nullptr);
  sel.own.store(k);
  return true;
}

}  // namespace detail

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  require(M >= 0 && N >= 0 && K >= 0, "INVALID_ARGUMENT", "sgemm: negative dimension");
  require(ldc >= std::max<int64_t>(1, N), "INVALID_ARGUMENT", "sgemm: ldc < N");
  require(lda >= std::max<int64_t>(1, trans_a ? M : K), "INVALID_ARGUMENT", "sgemm: lda too small");
  require(ldb >= std::max<int64_t>(1, trans_b ? K : N), "INVALID_ARGUMENT", "sgemm: ldb too small");
  if (M == 0 || N == 0) return;
  if (K == 0 || alpha == 0.f) {
    scale_c(C, M, N, ldc, beta);
    return;
  }
  if (OpenBlas* blas = selection().blas.load(std::memory_order_relaxed)) {
    if (fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
      const int threads = ts::num_threads();
      if (blas->set_num_threads && blas->threads.exchange(threads) != threads) blas->set_num_threads(threads);
      blas->sgemm(CBLAS_ROW_MAJOR, trans_a ? CBLAS_TRANS : CBLAS_NO_TRANS, trans_b ? CBLAS_TRANS : CBLAS_NO_TRANS, int(M),
                  int(N), int(K), alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
      return;
    }
  }
  GemmProblem p;
  p.M = M, p.N = N, p.K = K, p.alpha = alpha, p.beta = beta;
  p.a = Operand{A, lda, trans_a};
  p.b = Operand{B, ldb, trans_b};
  p.c = C, p.ldc = ldc;
  const KernelSet& ks = own_kernels();
  if (M <= SMALL_M) run_small_m(ks, p);
  else run_blocked(ks, p);
}

void matmul_nf4_nt(float* y, const float* x, const NF4View& w, int64_t M, float beta) {
  check_nf4(w, "matmul_nf4_nt");
  const int64_t N = w.rows, K = w.cols;
  if (M <= 0 || N == 0) return;
  const KernelSet& ks = own_kernels();
  if (M <= NF4_NT_SMALL_M) {
    // x in slot order, zero padded to whole lane groups
    const int lanes = ks.nf4_lanes;
    const int64_t group = 8 * lanes, Kp = round_up(K, group);
    float* xp = detail::scratch(2, size_t(M * Kp));
    for (int64_t m = 0; m < M; m++)
      for (int64_t g = 0; g < Kp; g += group)
        for (int64_t slot = 0; slot < group; slot++) {
          const int64_t k = g + detail::nf4_slot_to_weight(slot, lanes);
          xp[m * Kp + g + slot] = k < K ? x[m * K + k] : 0.f;
        }
    // a chunk of rows should carry >= ~64k multiply-adds
    const int64_t grain = std::max<int64_t>(1, 65536 / (K * M));
    ts::parallel_for(N, grain, [&](int64_t n0, int64_t n1) { ks.nf4_nt_small(y, N, xp, Kp, w, M, beta, n0, n1); });
    return;
  }
  GemmProblem p;
  p.M = M, p.N = N, p.K = K, p.alpha = 1.f, p.beta = beta;
  p.a = Operand{x, K, false};
  p.b_nf4 = &w, p.b_nf4_trans = true;
  p.c = y, p.ldc = N;
  run_blocked(ks, p);
}

void matmul_nf4_nn(float* dx, const float* dy, const NF4View& w, int64_t M, float beta) {
  check_nf4(w, "matmul_nf4_nn");
  const int64_t N = w.rows, K = w.cols;
  if (M <= 0) return;
  if (N == 0) {
    scale_c(dx, M, K, K, beta);
    return;
  }
  const KernelSet& ks = own_kernels();
  if (M <= NF4_NN_SMALL_M) {
    const int lanes = ks.nf4_lanes;
    const int64_t group = 8 * lanes, Kp = round_up(K, group), groups = Kp / group;
    float* dxp = detail::scratch(3, size_t(M * Kp));  // (M, Kp) products in slot order
    const int64_t grain = std::max<int64_t>(1, 65536 / (N * M * group));
    ts::parallel_for(groups, grain, [&](int64_t g0, int64_t g1) {
      ks.nf4_nn_small(dxp, Kp, dy, w, M, g0, g1);
      for (int64_t m = 0; m < M; m++)
        for (int64_t g = g0; g < g1; g++)
          for (int64_t slot = 0; slot < group; slot++) {
            const int64_t k = g * group + detail::nf4_slot_to_weight(slot, lanes);
            if (k >= K) continue;
            const float v = dxp[m * Kp + g * group + slot];
            float* out = dx + m * K + k;
            *out = beta == 0.f ? v : v + beta * *out;
          }
    });
    return;
  }
  GemmProblem p;
  p.M = M, p.N = K, p.K = N, p.alpha = 1.f, p.beta = beta;
  p.a = Operand{dy, N, false};
  p.b_nf4 = &w, p.b_nf4_trans = false;
  p.c = dx, p.ldc = K;
  run_blocked(ks, p);
}

const char* gemm_kernel_name() {
  Selection& sel = selection();
  if (const OpenBlas* blas = sel.blas.load()) return blas->name.c_str();
  return sel.own.load()->name;
}

}  // namespace ts::cpu
