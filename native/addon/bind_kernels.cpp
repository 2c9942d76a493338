// Registers the kernels part of the addon's JS surface: sgemm on Float32Arrays, an NF4 matmul check,
// and the thread-pool / kernel-selection knobs. All calls are synchronous (tests, the kernel lab and
// start-up configuration), never the serving path.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "addon/bindings.h"
#include "core/nf4.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"
#include "cpu/gemm_kernels.h"

namespace ts::addon {

namespace {

[[noreturn]] void bad_argument(const char* fn, const std::string& what) {
  throw EngineError("INVALID_ARGUMENT", std::string(fn) + ": " + what);
}

// A JS number that is an integer in [0, 2^53].
int64_t arg_index(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name) {
  if (info.Length() <= i || !info[i].IsNumber()) bad_argument(fn, std::string(name) + " must be a number");
  const double d = info[i].As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 9007199254740992.0) || d != std::floor(d))
    bad_argument(fn, std::string(name) + " must be a non-negative integer");
  return int64_t(d);
}

float arg_float(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name) {
  if (info.Length() <= i || !info[i].IsNumber()) bad_argument(fn, std::string(name) + " must be a number");
  return float(info[i].As<Napi::Number>().DoubleValue());
}

bool arg_bool(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name) {
  if (info.Length() <= i || !info[i].IsBoolean()) bad_argument(fn, std::string(name) + " must be a boolean");
  return info[i].As<Napi::Boolean>().Value();
}

Napi::Float32Array arg_f32(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name) {
  if (info.Length() <= i || !info[i].IsTypedArray() || info[i].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    bad_argument(fn, std::string(name) + " must be a Float32Array");
  return info[i].As<Napi::Float32Array>();
}

// Elements a row-major rows x cols view with leading dimension ld spans: (rows-1)*ld + cols.
int64_t span(int64_t rows, int64_t cols, int64_t ld) { return rows == 0 || cols == 0 ? 0 : (rows - 1) * ld + cols; }

void check_view(const Napi::Float32Array& a, int64_t rows, int64_t cols, int64_t ld, const char* fn, const char* name) {
  if (ld < std::max<int64_t>(1, cols))
    bad_argument(fn, std::string("leading dimension of ") + name + " (" + std::to_string(ld) + ") is less than its row length " +
                         std::to_string(cols));
  const int64_t need = span(rows, cols, ld);
  if (int64_t(a.ElementLength()) < need)
    bad_argument(fn, std::string(name) + " has " + std::to_string(a.ElementLength()) + " elements, the view needs " +
                         std::to_string(need));
}

// sgemm(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc): C = alpha·op(A)·op(B) + beta·C
// in place, row-major, cblas semantics (op(A) is [M,K], op(B) is [K,N]).
Napi::Value Sgemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const char* fn = "sgemm";
    const bool ta = arg_bool(info, 0, fn, "transA"), tb = arg_bool(info, 1, fn, "transB");
    const int64_t M = arg_index(info, 2, fn, "M"), N = arg_index(info, 3, fn, "N"), K = arg_index(info, 4, fn, "K");
    const float alpha = arg_float(info, 5, fn, "alpha");
    Napi::Float32Array A = arg_f32(info, 6, fn, "A");
    const int64_t lda = arg_index(info, 7, fn, "lda");
    Napi::Float32Array B = arg_f32(info, 8, fn, "B");
    const int64_t ldb = arg_index(info, 9, fn, "ldb");
    const float beta = arg_float(info, 10, fn, "beta");
    Napi::Float32Array C = arg_f32(info, 11, fn, "C");
    const int64_t ldc = arg_index(info, 12, fn, "ldc");
    if (ta) check_view(A, K, M, lda, fn, "A");  // A is [K, M] when transposed
    else check_view(A, M, K, lda, fn, "A");
    if (tb) check_view(B, N, K, ldb, fn, "B");
    else check_view(B, K, N, ldb, fn, "B");
    check_view(C, M, N, ldc, fn, "C");
    cpu::sgemm(ta, tb, M, N, K, alpha, A.Data(), lda, B.Data(), ldb, beta, C.Data(), ldc);
    return env.Undefined();
  });
}

Napi::Float32Array to_js(Napi::Env env, const std::vector<float>& v) {
  Napi::Float32Array a = Napi::Float32Array::New(env, v.size());
  if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(float));
  return a;
}

// nf4MatmulCheck(w [N,K], N, K, x [M,K], M, dy? [M,N]) -> { y, yRef, dx, dxRef, wDequant }
// Quantizes w to NF4, then runs the engine's NF4 products (fused for small M, panel-dequantizing for
// large M) and, as the reference, sgemm on the fully dequantized matrix:
//   y  = x·Wᵀ (matmul_nf4_nt)   yRef  = sgemm(x, Wdeqᵀ)
//   dx = dy·W (matmul_nf4_nn)   dxRef = sgemm(dy, Wdeq)      dy defaults to yRef.
// The outputs start as NaN, so a path that read them with beta = 0 would show.
Napi::Value Nf4MatmulCheck(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const char* fn = "nf4MatmulCheck";
    Napi::Float32Array w = arg_f32(info, 0, fn, "w");
    const int64_t N = arg_index(info, 1, fn, "N"), K = arg_index(info, 2, fn, "K");
    Napi::Float32Array x = arg_f32(info, 3, fn, "x");
    const int64_t M = arg_index(info, 4, fn, "M");
    if (K == 0 || K % NF4_BLOCK != 0) bad_argument(fn, "K must be a positive multiple of 64");
    if (int64_t(w.ElementLength()) != N * K) bad_argument(fn, "w must have N*K elements");
    if (int64_t(x.ElementLength()) != M * K) bad_argument(fn, "x must have M*K elements");
    const bool has_dy = info.Length() > 5 && !info[5].IsUndefined();
    Napi::Float32Array dy_js;
    if (has_dy) {
      dy_js = arg_f32(info, 5, fn, "dy");
      if (int64_t(dy_js.ElementLength()) != M * N) bad_argument(fn, "dy must have M*N elements");
    }

    const NF4Matrix q = nf4_quantize(w.Data(), N, K);
    std::vector<float> wdq(size_t(N * K));
    nf4_dequantize_rows(q.view(), 0, N, wdq.data());

    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> y(size_t(M * N), nan), y_ref(size_t(M * N), nan);
    cpu::matmul_nf4_nt(y.data(), x.Data(), q.view(), M, 0.f);
    cpu::sgemm(false, true, M, N, K, 1.f, x.Data(), std::max<int64_t>(K, 1), wdq.data(), K, 0.f, y_ref.data(),
               std::max<int64_t>(N, 1));

    const float* dy = has_dy ? dy_js.Data() : y_ref.data();
    std::vector<float> dx(size_t(M * K), nan), dx_ref(size_t(M * K), nan);
    cpu::matmul_nf4_nn(dx.data(), dy, q.view(), M, 0.f);
    cpu::sgemm(false, false, M, K, N, 1.f, dy, std::max<int64_t>(N, 1), wdq.data(), K, 0.f, dx_ref.data(), K);

    Napi::Object out = Napi::Object::New(env);
    out.Set("y", to_js(env, y));
    out.Set("yRef", to_js(env, y_ref));
    out.Set("dx", to_js(env, dx));
    out.Set("dxRef", to_js(env, dx_ref));
    out.Set("wDequant", to_js(env, wdq));
    return out;
  });
}

Napi::Value GemmKernelName(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), cpu::gemm_kernel_name());
}

// setGemmKernel(name) -> boolean: "avx512" | "avx2" | "scalar" | "openblas" | "auto"; false when that
// kernel set is unavailable on this machine (nothing changes then).
Napi::Value SetGemmKernel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    if (info.Length() < 1 || !info[0].IsString()) bad_argument("setGemmKernel", "name must be a string");
    return Napi::Boolean::New(env, cpu::detail::select_kernels(info[0].As<Napi::String>().Utf8Value()));
  });
}

// setThreads(n): resizes the pool; n <= 0 means all cores (TUNESERVE_THREADS, else the usable cores).
Napi::Value SetThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    if (info.Length() < 1 || !info[0].IsNumber()) bad_argument("setThreads", "n must be a number");
    const double n = info[0].As<Napi::Number>().DoubleValue();
    if (!(n == std::floor(n)) || n > 4096) bad_argument("setThreads", "n must be an integer <= 4096");
    set_num_threads(int(n));
    return env.Undefined();
  });
}

Napi::Value NumThreads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), num_threads()); }

}  // namespace

void init_kernels(Napi::Env env, Napi::Object exports) {
  exports.Set("sgemm", Napi::Function::New(env, Sgemm, "sgemm"));
  exports.Set("nf4MatmulCheck", Napi::Function::New(env, Nf4MatmulCheck, "nf4MatmulCheck"));
  exports.Set("gemmKernelName", Napi::Function::New(env, GemmKernelName, "gemmKernelName"));
  exports.Set("setGemmKernel", Napi::Function::New(env, SetGemmKernel, "setGemmKernel"));
  exports.Set("setThreads", Napi::Function::New(env, SetThreads, "setThreads"));
  exports.Set("numThreads", Napi::Function::New(env, NumThreads, "numThreads"));
}

}  // namespace ts::addon
