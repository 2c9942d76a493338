// Kernel lab, C++ side: checks every kernel set (AVX-512, AVX2, scalar) of native/cpu/gemm*.cpp against a
// float64 reference and times sgemm and the NF4 products on the model's shapes in CPU time, so numbers
// stay comparable on a shared machine (wall-clock GFLOP/s against PyTorch: bench/kernels/gemm.mjs).
//
//   g++ -std=c++17 -O3 -Inative bench/kernels/gemm_lab.cpp native/core/thread_pool.cpp native/core/nf4.cpp
//       native/cpu/gemm.cpp native/cpu/gemm_avx512.cpp native/cpu/gemm_avx2.cpp native/cpu/gemm_scalar.cpp
//       -o /tmp/gemm_lab -lpthread -ldl                (one command line)
//   /tmp/gemm_lab check                          thread pool semantics; all kernel sets, odd shapes, all
//                                                transpositions, NF4
//   TUNESERVE_THREADS=1 /tmp/gemm_lab time [set]  GFLOP/s per core (process CPU time / threads)
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/nf4.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"
#include "cpu/gemm_kernels.h"

namespace {

std::vector<float> random_floats(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Worst |C - ref| / (Σ|a·b|·|alpha| + |beta·C0|) over C; NaN output counts as failure (returns 1e9).
double check_sgemm(bool ta, bool tb, int M, int N, int K, float alpha, float beta, int pad, unsigned seed) {
  const int lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
  auto A = random_floats(size_t(ta ? K : M) * lda + 1, seed), B = random_floats(size_t(tb ? N : K) * ldb + 1, seed + 1);
  auto C0 = random_floats(size_t(M) * ldc + 1, seed + 2), C = C0;
  if (beta == 0.f)
    for (float& x : C) x = NAN;
  ts::cpu::sgemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
  double worst = 0;
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double s = 0, abs = 0;
      for (int k = 0; k < K; k++) {
        const double p = double(ta ? A[size_t(k) * lda + i] : A[size_t(i) * lda + k]) *
                         double(tb ? B[size_t(j) * ldb + k] : B[size_t(k) * ldb + j]);
        s += p;
        abs += std::fabs(p);
      }
      const double old = beta == 0.f ? 0.0 : double(beta) * C0[size_t(i) * ldc + j];
      const double err = std::fabs(C[size_t(i) * ldc + j] - (alpha * s + old)) / (std::fabs(alpha) * abs + std::fabs(old) + 1e-30);
      worst = std::isnan(err) ? 1e9 : std::max(worst, err);
    }
  return worst;
}

double check_nf4(int M, int N, int K, unsigned seed) {
  auto w = random_floats(size_t(N) * K, seed), x = random_floats(size_t(M) * K, seed + 1), dy = random_floats(size_t(M) * N, seed + 2);
  const ts::NF4Matrix q = ts::nf4_quantize(w.data(), N, K);
  std::vector<float> wd(size_t(N) * K), y(size_t(M) * N, NAN), dx(size_t(M) * K, NAN);
  ts::nf4_dequantize_rows(q, 0, N, wd.data());
  ts::cpu::matmul_nf4_nt(y.data(), x.data(), q, M, 0.f);
  ts::cpu::matmul_nf4_nn(dx.data(), dy.data(), q, M, 0.f);
  double worst = 0;
  for (int m = 0; m < M; m++)
    for (int n = 0; n < N; n++) {
      double s = 0, abs = 0;
      for (int k = 0; k < K; k++) s += double(x[size_t(m) * K + k]) * wd[size_t(n) * K + k], abs += std::fabs(double(x[size_t(m) * K + k]) * wd[size_t(n) * K + k]);
      const double err = std::fabs(y[size_t(m) * N + n] - s) / (abs + 1e-30);
      worst = std::isnan(err) ? 1e9 : std::max(worst, err);
    }
  for (int m = 0; m < M; m++)
    for (int k = 0; k < K; k++) {
      double s = 0, abs = 0;
      for (int n = 0; n < N; n++) s += double(dy[size_t(m) * N + n]) * wd[size_t(n) * K + k], abs += std::fabs(double(dy[size_t(m) * N + n]) * wd[size_t(n) * K + k]);
      const double err = std::fabs(dx[size_t(m) * K + k] - s) / (abs + 1e-30);
      worst = std::isnan(err) ? 1e9 : std::max(worst, err);
    }
  return worst;
}

// parallel_for: every index exactly once, nested calls run inline, the first exception reaches the
// caller and the pool keeps working, concurrent callers queue; plus the cost of one dispatch.
int check_pool() {
  int failures = 0;
  for (int round = 0; round < 20000; round++) {
    const int64_t n = round % 97 + 1;
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    ts::parallel_for(n, 1 + round % 3, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; i++) hits[size_t(i)]++;
    });
    for (auto& h : hits) failures += h.load() != 1;
  }
  std::atomic<int64_t> nested{0};
  ts::parallel_for(8, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) ts::parallel_for(100, 1, [&](int64_t b2, int64_t e2) { nested += e2 - b2; });
  });
  failures += nested.load() != 800;
  bool caught = false;
  try {
    ts::parallel_for(100, 1, [](int64_t b, int64_t) {
      if (b > 0) throw std::runtime_error("chunk failed");
    });
  } catch (const std::runtime_error&) {
    caught = true;
  }
  failures += !caught;
  std::atomic<int64_t> total{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 3; t++)
    callers.emplace_back([&] {
      for (int r = 0; r < 2000; r++) ts::parallel_for(64, 1, [&](int64_t b, int64_t e) { total += e - b; });
    });
  for (auto& t : callers) t.join();
  failures += total.load() != 3 * 2000 * 64;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < 20000; r++) ts::parallel_for(ts::num_threads(), 1, [](int64_t, int64_t) {});
  const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / 20000;
  std::printf("pool    %d threads, %s, %.2f us per empty parallel_for\n", ts::num_threads(), failures ? "FAILED" : "ok", us);
  return failures;
}

int run_checks() {
  int failures = check_pool();
  for (const char* set : {"avx512", "avx2", "scalar"}) {
    if (!ts::cpu::detail::select_kernels(set)) {
      std::printf("%-7s not available on this CPU\n", set);
      continue;
    }
    double worst = 0;
    unsigned seed = 1;
    for (int t = 0; t < 4; t++)
      for (int M : {1, 2, 5, 8, 9, 14, 17, 33, 65, 300})
        for (int N : {1, 7, 33, 65, 257})
          for (int K : {1, 16, 33, 257, 300}) {
            const float beta = (M + N) % 3 == 0 ? 0.f : (M + N) % 3 == 1 ? 1.f : 0.25f;
            const double e = check_sgemm(t & 1, t & 2, M, N, K, t == 3 ? -0.5f : 1.f, beta, (M + K) % 2 ? 3 : 0, seed++);
            worst = std::max(worst, e);
            // (K + 4)·u bounds the float32 error of a K-term dot product relative to Σ|a·b| (u = 2^-24)
            if (e > (K + 4) * std::ldexp(1.0, -24)) {
              std::printf("FAIL %s sgemm ta=%d tb=%d M=%d N=%d K=%d err=%g\n", set, t & 1, (t >> 1) & 1, M, N, K, e);
              failures++;
            }
          }
    double worst_nf4 = 0;
    for (int M : {1, 4, 5, 12, 13, 37})
      for (int N : {1, 3, 100})
        for (int K : {64, 192, 320}) {
          const double e = check_nf4(M, N, K, seed++);
          worst_nf4 = std::max(worst_nf4, e);
          if (e > 2 * (std::max(N, K) + 4) * std::ldexp(1.0, -24)) {
            std::printf("FAIL %s nf4 M=%d N=%d K=%d err=%g\n", set, M, N, K, e);
            failures++;
          }
        }
    std::printf("%-7s sgemm worst relative error %.3g, NF4 %.3g\n", set, worst, worst_nf4);
  }
  ts::cpu::detail::select_kernels("auto");
  return failures ? 1 : 0;
}

double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + double(t.tv_nsec) * 1e-9;
}

// Best of 5 batches of >= 0.2 s CPU time; GFLOP/s per thread of the pool.
double time_gflops_per_core(double flop, const std::function<void()>& call) {
  call();
  double best = 1e30;
  for (int batch = 0; batch < 5; batch++) {
    int n = 0;
    const double t0 = cpu_seconds();
    double dt = 0;
    do {
      call();
      n++;
      dt = cpu_seconds() - t0;
    } while (dt < 0.2);
    best = std::min(best, dt / n);
  }
  return flop / best / 1e9 / ts::num_threads();
}

void run_timings() {
  struct Shape { const char* label; bool ta, tb; int M, N, K; };
  const Shape shapes[] = {
      {"x·Wᵀ", false, true, 512, 256, 256},   {"x·Wᵀ", false, true, 512, 1024, 1024}, {"x·Wᵀ", false, true, 512, 4096, 4096},
      {"lm_head", false, true, 512, 128256, 256}, {"dy·W", false, false, 512, 1024, 1024}, {"dyᵀ·x", true, false, 1024, 1024, 512},
      {"decode", false, true, 1, 4096, 4096},  {"batch", false, true, 4, 4096, 4096},   {"batch", false, true, 8, 4096, 4096},
      {"batch", false, true, 16, 4096, 4096},  {"batch", false, true, 64, 4096, 4096},
  };
  for (const Shape& s : shapes) {
    std::vector<float> A(size_t(s.M) * s.K, 0.5f), B(size_t(s.N) * s.K, 0.25f), C(size_t(s.M) * s.N);
    const int lda = s.ta ? s.M : s.K, ldb = s.tb ? s.K : s.N;
    const double g = time_gflops_per_core(2.0 * s.M * s.N * s.K, [&] {
      ts::cpu::sgemm(s.ta, s.tb, s.M, s.N, s.K, 1.f, A.data(), lda, B.data(), ldb, 0.f, C.data(), s.N);
    });
    std::printf("%-7s sgemm %-8s ta=%d tb=%d M=%-4d N=%-6d K=%-5d %7.1f GFLOP/s per core\n", ts::cpu::gemm_kernel_name(),
                s.label, s.ta, s.tb, s.M, s.N, s.K, g);
  }
  const int N = 4096, K = 4096;
  std::vector<float> w(size_t(N) * K);
  for (size_t i = 0; i < w.size(); i++) w[i] = std::sin(float(i) * 0.37f);
  const ts::NF4Matrix q = ts::nf4_quantize(w.data(), N, K);
  for (bool nn : {false, true})
    for (int M : {1, 4, 8, 12, 16, 32, 512}) {
      std::vector<float> x(size_t(M) * (nn ? N : K), 0.5f), y(size_t(M) * (nn ? K : N));
      const double g = time_gflops_per_core(2.0 * M * N * K, [&] {
        if (nn) ts::cpu::matmul_nf4_nn(y.data(), x.data(), q, M, 0.f);
        else ts::cpu::matmul_nf4_nt(y.data(), x.data(), q, M, 0.f);
      });
      std::printf("%-7s nf4 %s M=%-4d N=%d K=%d %7.1f GFLOP/s per core (%.1f GB/s of codes)\n", ts::cpu::gemm_kernel_name(),
                  nn ? "dy·W " : "x·Wᵀ", M, N, K, g, g / (4.0 * M));
    }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  if (mode == "check") return run_checks();
  if (argc > 2 && !ts::cpu::detail::select_kernels(argv[2])) {
    std::fprintf(stderr, "kernel set %s is not available here\n", argv[2]);
    return 1;
  }
  run_timings();
  return 0;
}
