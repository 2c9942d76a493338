// test-backend-ops: every op of the backend interface (core/backend.h) on random inputs, on every
// backend this build has, checked against the CPU backend: llama.cpp's test-backend-ops for this
// engine's op set. A plain executable (no Node); test/backend-ops.test.ts runs it in CI.
//
//   cpu       the oracle itself: forward ops against naive double-precision references written here,
//             backward ops against central finite differences of those references (the scalar loss
//             L = Σ w ⊙ out with random w, all in double)
//   cuda      the CUDA backend (built with -DTS_CUDA=real), in float32-compute ("f32") and bf16 mode
//   cuda-emu  the same CUDA sources on the CPU emulator (-DTS_CUDA=emu)
//   cpu-self  the parity harness itself, a second CPU backend as the target (every error must be 0)
// A non-CPU backend gets the very inputs the CPU gets (rounded to bf16 first for every tensor it stores
// in bf16, so only the op's own arithmetic differs) and its outputs are compared with the CPU op's.
//
// Errors: l2 = ‖got − ref‖₂ / ‖ref‖₂ and max = max|got − ref| / max|ref|, both relative to the output's
// scale; a check passes when both are within its tolerance (stated, with why, next to each).
// Every output buffer is poisoned (all-ones bytes: NaN in float32 and bf16) and followed by a poisoned
// guard before the op; afterwards every element must have been written (unless the op accumulates into
// it), nothing may be NaN or Inf, and the guard must be intact. Ops never allocate: the test allocates
// through Backend::allocate (Buffer) and hands the ops views.
//
// Usage: test-backend-ops [--backend cpu|cuda|cuda-emu|all|cpu-self] [--mode f32|bf16|both]
//                         [--op NAME[,NAME...]] [--perf [--shapes tiny|small|llama3-8b]] [--seed N] [--list]
// Prints one line per (backend, mode, op, shape) and a summary table last; exits 1 on any failure or
// when a requested backend cannot start. --perf times every op instead (median µs and GB/s or GFLOP/s;
// Llama-3-8B shapes on the GPU, scaled-down ones on the CPU and the emulator) and checks nothing.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/counter_rng.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/nf4.h"
#include "core/sampling.h"
#include "cpu/cpu_backend.h"
#include "model/config.h"
#include "model/llama.h"

#if defined(TUNESERVE_WITH_CUDA) || defined(TS_CUDA_EMU)
#include "cuda/cuda_backend.h"
#endif

namespace {

using ts::AdamWStep;
using ts::AttentionShape;
using ts::Backend;
using ts::Buffer;
using ts::DType;
using ts::KVLayerView;
using ts::LinearView;
using ts::LoraApply;
using ts::LoraDropout;
using ts::LoraModuleView;
using ts::LoraScratch;
using ts::LoraSegment;
using ts::NF4Matrix;
using ts::NF4View;
using ts::PagedRows;
using ts::RopeView;
using ts::SampleRow;
using ts::SamplerRng;
using ts::SamplingParams;
using ts::Tensor;

using V = std::vector<double>;
using F = std::vector<float>;
using I32 = std::vector<int32_t>;

constexpr uint8_t POISON = 0xFF;     // all-ones bytes: NaN in float32 and bf16, -1 in int32
constexpr size_t GUARD_BYTES = 256;  // poisoned bytes after every allocation; an op must not touch them

std::string format(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

V to_double(const F& v) { return V(v.begin(), v.end()); }

// ---- random inputs -----------------------------------------------------------------------------------

// Test inputs from the engine's seeded generator (xoshiro256**, core/sampling.h): one seed, the same
// inputs on every machine and for every backend of a run.
class Random {
 public:
  explicit Random(uint64_t seed) : rng_(seed) {}
  double uniform() { return rng_.uniform(); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(rng_.uniform()); }
  int integer(int lo, int hi) { return lo + int(rng_.uniform() * (hi - lo)); }  // [lo, hi)
  F vec(int64_t n, float lo = -1.f, float hi = 1.f) {
    F v(static_cast<size_t>(n));
    for (float& x : v) x = uniform(lo, hi);
    return v;
  }
  I32 ints(int64_t n, int lo, int hi) {
    I32 v(static_cast<size_t>(n));
    for (int32_t& x : v) x = integer(lo, hi);
    return v;
  }
  // k distinct values of [lo, hi) in random order.
  I32 distinct(int k, int lo, int hi) {
    I32 all;
    for (int i = lo; i < hi; i++) all.push_back(i);
    for (int i = 0; i < k; i++) std::swap(all[size_t(i)], all[size_t(integer(i, int(all.size())))]);
    all.resize(size_t(k));
    return all;
  }

 private:
  SamplerRng rng_;
};

// ---- checks and reports ------------------------------------------------------------------------------

struct Tolerance {
  double l2, max;
};
constexpr Tolerance EXACT{0, 0};

// Parity tolerances of a backend against the CPU op on identical inputs, per compute mode. Notation:
// u = 2⁻²⁴ ≈ 6e-8, float32's unit roundoff; b = 2⁻⁸ ≈ 3.9e-3, bf16's (8 significant bits), so rounding a
// float32 result to bf16 moves it by at most b·|x| and by ~b/√7 ≈ 1.5e-3 in l2 (errors spread over a
// binade).
//   copies (embedding, gathers, the KV write) move bits: EXACT in both modes.
//   float32 elementwise: a handful of roundings, and CUDA's expf/rsqrtf/division are within 2 ulp of
//     glibc's: a few u per element.
constexpr Tolerance F32_ELEMENTWISE{1e-6, 2e-6};
//   float32 reductions (dot products, norms, softmax sums) in another order: the error of a K-term sum
//     is ~√K·u typically and K·u at worst; K <= ~1000 here.
constexpr Tolerance F32_REDUCTION{1e-5, 5e-5};
//   a float32 result rounded once to bf16 (b per element; the max allows a second rounding of an
//     intermediate), plus the float32 differences above.
constexpr Tolerance BF16_ROUNDED{3e-3, 8e-3};
//   products whose operands are rounded to bf16 inside the op (an NF4 weight dequantized to bf16,
//     attention probabilities rounded to bf16 for the P·V product, float32 gradients rounded for a bf16
//     matrix product): each operand adds up to b relative per term, which averages over the reduction
//     (l2 ≈ 1.5e-3 per rounded operand), plus the output rounding.
constexpr Tolerance BF16_PRODUCT{6e-3, 1.6e-2};

struct Parity {
  Tolerance f32, bf16;
};

struct Report {
  std::string backend, mode, op, shape;
  struct Err {
    std::string what;
    double l2, max;
    Tolerance tol;
    bool ok() const { return l2 <= tol.l2 && max <= tol.max; }  // NaN fails
    double ratio() const {
      auto r = [](double e, double t) { return t > 0 ? e / t : (e > 0 ? INFINITY : 0.0); };
      if (!(l2 == l2) || !(max == max)) return INFINITY;
      return std::max(r(l2, tol.l2), r(max, tol.max));
    }
  };
  std::vector<Err> errs;
  std::vector<std::string> problems;  // unwritten or non-finite outputs, guard overwrites, exceptions
  double ms = 0;                      // wall time of the case (both backends and the references)

  void problem(const std::string& p) { problems.push_back(p); }
  bool pass() const {
    if (!problems.empty()) return false;
    for (const Err& e : errs)
      if (!e.ok()) return false;
    return true;
  }
  const Err* worst() const {
    const Err* w = nullptr;
    for (const Err& e : errs)
      if (!w || e.ratio() > w->ratio()) w = &e;
    return w;
  }
  void compare(const std::string& what, const V& got, const V& ref, Tolerance tol) {
    if (got.size() != ref.size()) {
      problem(what + format(": %zu values, %zu expected", got.size(), ref.size()));
      return;
    }
    double num = 0, den = 0, mx = 0, mref = 0;
    bool finite = true;
    for (size_t i = 0; i < got.size(); i++) {
      if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) {
        finite = false;
        continue;
      }
      const double d = got[i] - ref[i];
      num += d * d;
      den += ref[i] * ref[i];
      mx = std::max(mx, std::fabs(d));
      mref = std::max(mref, std::fabs(ref[i]));
    }
    Err e{what, den > 0 ? std::sqrt(num / den) : std::sqrt(num), mref > 0 ? mx / mref : mx, tol};
    if (!finite) e.l2 = e.max = NAN;
    errs.push_back(e);
  }
};

// ---- a backend as the test drives it -----------------------------------------------------------------

// Allocations (kept until reset()), typed uploads, poisoned outputs with guards, checked downloads.
class Dev {
 public:
  explicit Dev(Backend& backend) : be(backend), act(backend.compute_dtype()), wt(backend.weight_dtype()) {}
  Backend& be;
  const DType act, wt;  // activation / KV-cache dtype, dense weight dtype

  void reset() {
    buffers_.clear();
    sizes_.clear();
  }
  // `bytes` of backend memory followed by the guard, all poisoned.
  void* alloc(size_t bytes) {
    buffers_.emplace_back(be, bytes + GUARD_BYTES);
    void* p = buffers_.back().data();
    sizes_[p] = bytes;
    const std::vector<uint8_t> poison(bytes + GUARD_BYTES, POISON);
    be.upload(p, poison.data(), poison.size());
    return p;
  }
  // Host float values stored as dt (F32 or BF16).
  void write(void* dst, const F& v, DType dt) {
    if (dt == DType::F32) {
      be.upload(dst, v.data(), v.size() * sizeof(float));
    } else {
      std::vector<uint8_t> staging(v.size() * ts::dtype_size(dt));
      ts::convert_from_f32(staging.data(), v.data(), dt, v.size());
      be.upload(dst, staging.data(), staging.size());
    }
  }
  Tensor upload(const F& v, int64_t rows, int64_t cols, DType dt) {
    if (int64_t(v.size()) != rows * cols) throw std::logic_error("test: upload of a wrongly sized vector");
    void* p = alloc(size_t(rows * cols) * ts::dtype_size(dt));
    write(p, v, dt);
    return ts::make_tensor(p, dt, rows, cols, be.device());
  }
  float* upload_f32(const F& v) { return upload(v, 1, int64_t(v.size()), DType::F32).f32(); }
  template <typename T>
  T* array(const std::vector<T>& v) {
    void* p = alloc(std::max<size_t>(1, v.size()) * sizeof(T));
    if (!v.empty()) be.upload(p, v.data(), v.size() * sizeof(T));
    return static_cast<T*>(p);
  }
  Tensor output(int64_t rows, int64_t cols, DType dt) {
    return ts::make_tensor(alloc(size_t(rows * cols) * ts::dtype_size(dt)), dt, rows, cols, be.device());
  }
  float* output_f32(int64_t n) { return static_cast<float*>(alloc(size_t(n) * sizeof(float))); }

  // n elements of dt at p, as doubles; `untouched` marks elements whose bytes are still the poison. A
  // touched guard is reported.
  V fetch(const void* p, int64_t n, DType dt, Report& r, const std::string& name, std::vector<uint8_t>* untouched) {
    const size_t es = ts::dtype_size(dt), bytes = size_t(n) * es;
    auto it = sizes_.find(const_cast<void*>(p));
    const bool guarded = it != sizes_.end() && it->second == bytes;
    std::vector<uint8_t> raw(bytes + (guarded ? GUARD_BYTES : 0));
    be.download(raw.data(), p, raw.size());
    if (guarded)
      for (size_t i = bytes; i < raw.size(); i++)
        if (raw[i] != POISON) {
          r.problem(name + ": wrote past its end (guard byte " + std::to_string(i - bytes) + " changed)");
          break;
        }
    V out(static_cast<size_t>(n));
    if (untouched) untouched->assign(size_t(n), 0);
    for (int64_t i = 0; i < n; i++) {
      const uint8_t* e = raw.data() + size_t(i) * es;
      if (untouched) (*untouched)[size_t(i)] = std::all_of(e, e + es, [](uint8_t b) { return b == POISON; });
      if (dt == DType::F32) {
        float f;
        std::memcpy(&f, e, 4);
        out[size_t(i)] = f;
      } else if (dt == DType::BF16) {
        uint16_t h;
        std::memcpy(&h, e, 2);
        out[size_t(i)] = ts::bf16_to_f32(h);
      } else if (dt == DType::F64) {
        std::memcpy(&out[size_t(i)], e, 8);
      } else {
        throw std::logic_error("test: fetch of an unsupported dtype");
      }
    }
    return out;
  }
  // An output that the op must have written completely with finite values.
  V read(const void* p, int64_t n, DType dt, Report& r, const std::string& name) {
    std::vector<uint8_t> untouched;
    V v = fetch(p, n, dt, r, name, &untouched);
    const int64_t unwritten = std::count(untouched.begin(), untouched.end(), uint8_t(1));
    int64_t nonfinite = 0;
    for (size_t i = 0; i < v.size(); i++) nonfinite += !untouched[i] && !std::isfinite(v[i]);
    if (unwritten) r.problem(name + format(": %lld of %lld elements never written", (long long)unwritten, (long long)n));
    if (nonfinite) r.problem(name + format(": %lld of %lld elements NaN or Inf", (long long)nonfinite, (long long)n));
    return v;
  }
  V read(const Tensor& t, Report& r, const std::string& name) { return read(t.data, t.numel(), t.dtype, r, name); }

 private:
  std::vector<Buffer> buffers_;
  std::map<void*, size_t> sizes_;
};

using Outputs = std::vector<std::pair<std::string, V>>;

// One backend in one mode running the op tests. The oracle session (target == null) checks the CPU
// backend against the references; a parity session checks `target` against the CPU backend.
struct Session {
  std::string backend, mode;
  Dev* cpu = nullptr;
  Dev* target = nullptr;
  Random rng{1};
  std::vector<Report>* reports = nullptr;

  bool oracle() const { return target == nullptr; }
  bool bf16() const { return mode == "bf16"; }
  DType act() const { return target ? target->act : DType::F32; }
  DType wt() const { return target ? target->wt : DType::F32; }
  // Host values as the target stores dtype dt (bf16: rounded to nearest even), so both backends compute
  // on identical inputs.
  static F as(DType dt, F v) {
    if (dt == DType::BF16)
      for (float& x : v) x = ts::bf16_to_f32(ts::f32_to_bf16(x));
    return v;
  }
  F act_vec(F v) const { return as(act(), std::move(v)); }
  F wt_vec(F v) const { return as(wt(), std::move(v)); }

  void run(const std::string& op, const std::string& shape, const std::function<void(Report&)>& body);
  // The target's outputs against the CPU's, output by output.
  void parity(Report& r, const Outputs& want, const Outputs& got, const std::vector<Parity>& tol) const {
    for (size_t i = 0; i < want.size() && i < got.size(); i++)
      r.compare(want[i].first, got[i].second, want[i].second, bf16() ? tol[i].bf16 : tol[i].f32);
  }
};

void print_report(const Report& r) {
  const Report::Err* w = r.worst();
  std::printf("%s  %-8s %-4s  %-21s %-44s", r.pass() ? "PASS" : "FAIL", r.backend.c_str(), r.mode.c_str(),
              r.op.c_str(), r.shape.c_str());
  if (w)
    std::printf("  %-18s l2 %.1e  max %.1e  tol %.0e/%.0e", w->what.c_str(), w->l2, w->max, w->tol.l2, w->tol.max);
  std::printf("  %.0f ms\n", r.ms);
  if (!r.pass()) {
    for (const Report::Err& e : r.errs)
      if (!e.ok())
        std::printf("        %s: l2 %.3e max %.3e exceeds tol %.1e/%.1e\n", e.what.c_str(), e.l2, e.max, e.tol.l2,
                    e.tol.max);
    for (const std::string& p : r.problems) std::printf("        %s\n", p.c_str());
  }
  std::fflush(stdout);
}

void Session::run(const std::string& op, const std::string& shape, const std::function<void(Report&)>& body) {
  Report r{backend, mode, op, shape, {}, {}, 0};
  const auto start = std::chrono::steady_clock::now();
  try {
    body(r);
  } catch (const std::exception& e) {
    r.problem(std::string("threw: ") + e.what());
  }
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  cpu->reset();
  if (target) target->reset();
  print_report(r);
  reports->push_back(std::move(r));
}

// ---- references in double precision (naive loops) ----------------------------------------------------

namespace ref {

// out = x · w / √(mean(x²) + eps), rstd = 1 / √(mean(x²) + eps) per row.
void rmsnorm(V& out, V& rstd, const V& x, const V& w, int64_t M, int H, double eps) {
  out.assign(size_t(M * H), 0);
  rstd.assign(size_t(M), 0);
  for (int64_t m = 0; m < M; m++) {
    double ss = 0;
    for (int i = 0; i < H; i++) ss += x[size_t(m * H + i)] * x[size_t(m * H + i)];
    rstd[size_t(m)] = 1 / std::sqrt(ss / H + eps);
    for (int i = 0; i < H; i++) out[size_t(m * H + i)] = x[size_t(m * H + i)] * rstd[size_t(m)] * w[size_t(i)];
  }
}

// Hugging Face rotate_half rotation of every head of every row, by the (float32) tables of its position.
void rope(V& x, const I32& pos, const F& cos, const F& sin, int64_t M, int nheads, int D, bool inverse) {
  const int half = D / 2;
  for (int64_t m = 0; m < M; m++)
    for (int h = 0; h < nheads; h++)
      for (int i = 0; i < half; i++) {
        const double c = cos[size_t(pos[size_t(m)]) * half + i], s = (inverse ? -1 : 1) * double(sin[size_t(pos[size_t(m)]) * half + i]);
        double& x1 = x[size_t((m * nheads + h) * D + i)];
        double& x2 = x[size_t((m * nheads + h) * D + i + half)];
        const double a = x1, b = x2;
        x1 = a * c - b * s;
        x2 = b * c + a * s;
      }
}

V swiglu(const V& gate, const V& up) {
  V out(gate.size());
  for (size_t i = 0; i < gate.size(); i++) out[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
  return out;
}

// Causal GQA attention, rows b*T + t; row t attends to [doc_start (or 0), t].
void attention(V& out, V& lse, const V& q, const V& k, const V& v, int B, int T, int NH, int NKV, int D,
               const I32& doc_start) {
  const int G = NH / NKV, QD = NH * D, KVD = NKV * D;
  out.assign(size_t(B) * T * QD, 0);
  lse.assign(size_t(B) * NH * T, 0);
  V s(static_cast<size_t>(T));
  for (int b = 0; b < B; b++)
    for (int h = 0; h < NH; h++)
      for (int t = 0; t < T; t++) {
        const int j0 = doc_start.empty() ? 0 : doc_start[size_t(b * T + t)];
        const double* qt = &q[size_t(b * T + t) * QD + h * D];
        double mx = -INFINITY;
        for (int j = j0; j <= t; j++) {
          const double* kj = &k[size_t(b * T + j) * KVD + (h / G) * D];
          double d = 0;
          for (int i = 0; i < D; i++) d += qt[i] * kj[i];
          s[size_t(j)] = d / std::sqrt(double(D));
          mx = std::max(mx, s[size_t(j)]);
        }
        double sum = 0;
        for (int j = j0; j <= t; j++) sum += std::exp(s[size_t(j)] - mx);
        const double l = mx + std::log(sum);
        lse[size_t(b * NH + h) * T + t] = l;
        for (int j = j0; j <= t; j++) {
          const double p = std::exp(s[size_t(j)] - l);
          for (int i = 0; i < D; i++)
            out[size_t(b * T + t) * QD + h * D + i] += p * v[size_t(b * T + j) * KVD + (h / G) * D + i];
        }
      }
}

// C = alpha · op(A) · op(B) + beta · C   (C may be empty when beta == 0)
V matmul(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const V& A, const V& B, double beta,
         const V& C) {
  V out(size_t(M * N));
  for (int64_t i = 0; i < M; i++)
    for (int64_t j = 0; j < N; j++) {
      double d = 0;
      for (int64_t k = 0; k < K; k++) d += A[size_t(ta ? k * M + i : i * K + k)] * B[size_t(tb ? j * K + k : k * N + j)];
      out[size_t(i * N + j)] = alpha * d + (beta != 0 ? beta * C[size_t(i * N + j)] : 0);
    }
  return out;
}

// Σ over rows with a target (not -100) of logsumexp(row) − row[target].
double cross_entropy(const V& logits, const I32& targets, int64_t M, int Vocab) {
  double total = 0;
  for (int64_t m = 0; m < M; m++) {
    if (targets[size_t(m)] < 0) continue;
    const double* row = &logits[size_t(m * Vocab)];
    const double mx = *std::max_element(row, row + Vocab);
    double sum = 0;
    for (int i = 0; i < Vocab; i++) sum += std::exp(row[i] - mx);
    total += mx + std::log(sum) - row[targets[size_t(m)]];
  }
  return total;
}

// The dropout of the LoRA input (core/backend.h LoraDropout): keep iff counter_uniform >= p, scale 1/(1-p).
double dropout(double x, int64_t row, int in, int col, const LoraDropout& d) {
  if (!(d.p > 0)) return x;
  return ts::counter_uniform(d.key, uint64_t(row) * uint64_t(in) + uint64_t(col)) >= d.p ? x / (1.0 - d.p) : 0.0;
}

struct LoraModule {
  int r = 0;
  double scaling = 0;
  V A, B;  // (r, in), (out, r)
};
// y[i] + s · B · A · dropout(x[i]) over rows [begin, end).
void lora(V& y, const V& x, int64_t begin, int64_t end, int in, int out, const LoraModule& m, const LoraDropout& d) {
  for (int64_t i = begin; i < end; i++) {
    V u(size_t(m.r), 0);
    for (int k = 0; k < m.r; k++)
      for (int c = 0; c < in; c++) u[size_t(k)] += m.A[size_t(k * in + c)] * dropout(x[size_t(i * in + c)], i, in, c, d);
    for (int o = 0; o < out; o++) {
      double s = 0;
      for (int k = 0; k < m.r; k++) s += m.B[size_t(o * m.r + k)] * u[size_t(k)];
      y[size_t(i * out + o)] += m.scaling * s;
    }
  }
}

}  // namespace ref

// ---- finite differences -------------------------------------------------------------------------------

// Indices of the elements whose gradient is checked: all of them up to `most`, else `most` at random
// including the first and the last.
std::vector<int64_t> fd_points(int64_t n, Random& rng, int64_t most) {
  std::vector<int64_t> p;
  if (n <= most) {
    for (int64_t i = 0; i < n; i++) p.push_back(i);
    return p;
  }
  std::set<int64_t> s{0, n - 1};
  while (int64_t(s.size()) < most) s.insert(int64_t(rng.uniform() * double(n)));
  return std::vector<int64_t>(s.begin(), s.end());
}

// Compares `got` (a gradient computed by the op, float32) with central differences of loss() (in double)
// with respect to x, at fd_points. The step h = 1e-4·max(1, |x|): the truncation error h²/6·|L'''| is
// ~1e-9 relative and the rounding error ~1e-16·|L|/h ~ 1e-11, so the differences are exact to ~1e-8
// relative and the tolerance measures the op's float32 error alone.
void fd_check(Report& r, Random& rng, const std::string& what, const V& got, V& x, const std::function<double()>& loss,
              Tolerance tol, int64_t most = 1500) {
  const std::vector<int64_t> points = fd_points(int64_t(x.size()), rng, most);
  V want, have;
  for (int64_t i : points) {
    const double x0 = x[size_t(i)], h = 1e-4 * std::max(1.0, std::fabs(x0));
    x[size_t(i)] = x0 + h;
    const double up = loss();
    x[size_t(i)] = x0 - h;
    const double down = loss();
    x[size_t(i)] = x0;
    want.push_back((up - down) / (2 * h));
    have.push_back(got[size_t(i)]);
  }
  r.compare(what + " vs FD", have, want, tol);
}

// How many points a check can afford when one evaluation of its loss costs `cost` operations (an exp
// counts ~20): ~1e8 operations per checked tensor (a fraction of a second), between 48 and 1500 points.
int64_t fd_budget(double cost) { return int64_t(std::max(48.0, std::min(1500.0, 1e8 / std::max(1.0, cost)))); }

double dot(const V& a, const V& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
  return s;
}

V minus(const V& a, const V& b) {
  V d(a.size());
  for (size_t i = 0; i < a.size(); i++) d[i] = a[i] - b[i];
  return d;
}

// ---- the op tests ---------------------------------------------------------------------------------------
// Each runs its op on the CPU and (parity) on the target through the same `run` lambda, so both get the
// same inputs, layouts and poisoned outputs. Oracle tolerances are for the float32 CPU op against a
// double reference; they are stated in units of u = 2⁻²⁴ per rounding step of the op.

void test_embedding(Session& s) {
  struct Shape {
    int V, H;
    int64_t M;
  };
  for (Shape sh : {Shape{50, 128, 7}, Shape{1000, 96, 33}})
    s.run("embedding", format("V=%d H=%d M=%lld", sh.V, sh.H, (long long)sh.M), [&](Report& r) {
      const F table = s.wt_vec(s.rng.vec(int64_t(sh.V) * sh.H));
      I32 ids = s.rng.ints(sh.M, 0, sh.V);
      ids.front() = 0;
      ids.back() = sh.V - 1;  // both ends of the table
      auto run = [&](Dev& d) -> Outputs {
        Tensor out = d.output(sh.M, sh.H, d.act);
        d.be.embedding(out, d.array(ids), d.upload(table, sh.V, sh.H, d.wt));
        return {{"out", d.read(out, r, "out")}};
      };
      const Outputs c = run(*s.cpu);
      if (s.oracle()) {
        V want;
        for (int32_t id : ids) want.insert(want.end(), table.begin() + int64_t(id) * sh.H, table.begin() + int64_t(id + 1) * sh.H);
        r.compare("out", c[0].second, want, EXACT);  // a copy
      } else {
        s.parity(r, c, run(*s.target), {{EXACT, EXACT}});
      }
    });
}

// Rows of x at very different scales: 1e-3 makes mean(x²) ≈ 3e-7 comparable to eps = 1e-5, so eps is
// checked, not just the normalization.
F rms_rows(Random& rng, int64_t M, int H, const std::vector<float>& scales) {
  F x = rng.vec(M * H);
  for (int64_t m = 0; m < M; m++)
    for (int i = 0; i < H; i++) x[size_t(m * H + i)] *= scales[size_t(m) % scales.size()];
  return x;
}

void test_rmsnorm_forward(Session& s) {
  struct Shape {
    int64_t M;
    int H;
    bool rstd;
  };
  const float eps = 1e-5f;
  for (Shape sh : {Shape{6, 256, true}, Shape{33, 96, true}, Shape{4, 128, false}, Shape{3, 4096, true}})
    s.run("rmsnorm_forward", format("M=%lld H=%d eps=1e-5%s", (long long)sh.M, sh.H, sh.rstd ? "" : " no-rstd"),
          [&](Report& r) {
            const F x = s.act_vec(rms_rows(s.rng, sh.M, sh.H, {1.f, 1e-3f, 30.f}));
            const F w = s.wt_vec(s.rng.vec(sh.H, 0.5f, 1.5f));
            auto run = [&](Dev& d) -> Outputs {
              Tensor out = d.output(sh.M, sh.H, d.act);
              float* rstd = sh.rstd ? d.output_f32(sh.M) : nullptr;
              d.be.rmsnorm_forward(out, rstd, d.upload(x, sh.M, sh.H, d.act), d.upload(w, 1, sh.H, d.wt), eps);
              Outputs o{{"out", d.read(out, r, "out")}};
              if (rstd) o.push_back({"rstd", d.read(rstd, sh.M, DType::F32, r, "rstd")});
              return o;
            };
            const Outputs c = run(*s.cpu);
            if (s.oracle()) {
              V out, rstd;
              ref::rmsnorm(out, rstd, to_double(x), to_double(w), sh.M, sh.H, double(eps));
              // rstd: the sum of squares is double, then ~4 float32 roundings (cast, + eps, sqrt, 1/x):
              // ≤ 4u ≈ 2.4e-7 per row; out adds two products: ≤ 6u ≈ 3.6e-7 per element.
              r.compare("out", c[0].second, out, {1e-6, 1e-6});
              if (sh.rstd) r.compare("rstd", c[1].second, rstd, {1e-6, 1e-6});
            } else {
              // rstd is float32 in both modes, from identical (rounded) inputs: a reduction over H.
              s.parity(r, c, run(*s.target), {{F32_REDUCTION, BF16_ROUNDED}, {F32_REDUCTION, F32_REDUCTION}});
            }
          });
}

void test_rmsnorm_backward(Session& s) {
  struct Shape {
    int64_t M;
    int H;
    bool accumulate;
  };
  const float eps = 1e-5f;
  for (Shape sh : {Shape{5, 64, false}, Shape{6, 64, true}, Shape{9, 256, true}, Shape{3, 4096, false}})
    s.run("rmsnorm_backward", format("M=%lld H=%d%s", (long long)sh.M, sh.H, sh.accumulate ? " accumulate" : ""),
          [&](Report& r) {
            // Moderate row scales: the gradient grows as 1/scale, and rows of 1e-3 would dominate the norm.
            const F x = s.act_vec(rms_rows(s.rng, sh.M, sh.H, {1.f, 0.05f, 3.f}));
            const F w = s.wt_vec(s.rng.vec(sh.H, 0.5f, 1.5f));
            const F dout = s.act_vec(s.rng.vec(sh.M * sh.H));
            const F dx0 = s.act_vec(s.rng.vec(sh.M * sh.H));
            // rstd as the model has it: saved by the CPU forward on these inputs (float32).
            F rstd(static_cast<size_t>(sh.M));
            {
              Dev& d = *s.cpu;
              float* rs = d.output_f32(sh.M);
              d.be.rmsnorm_forward(d.output(sh.M, sh.H, d.act), rs, d.upload(x, sh.M, sh.H, d.act),
                                   d.upload(w, 1, sh.H, d.wt), eps);
              d.be.download(rstd.data(), rs, rstd.size() * sizeof(float));
            }
            auto run = [&](Dev& d) -> Outputs {
              Tensor dx = sh.accumulate ? d.upload(dx0, sh.M, sh.H, d.act) : d.output(sh.M, sh.H, d.act);
              d.be.rmsnorm_backward(dx, d.upload(dout, sh.M, sh.H, d.act), d.upload(x, sh.M, sh.H, d.act),
                                    d.upload(w, 1, sh.H, d.wt), d.upload_f32(rstd), sh.accumulate);
              return {{"dx", d.read(dx, r, "dx")}};
            };
            const Outputs c = run(*s.cpu);
            if (s.oracle()) {
              V xd = to_double(x);
              const V wd = to_double(w), dd = to_double(dout);
              auto loss = [&] {
                V out, rs;
                ref::rmsnorm(out, rs, xd, wd, sh.M, sh.H, double(eps));
                return dot(dd, out);
              };
              // dx = r·w·dy − x·r³/H·Σ w·dy·x: float32 with the dot product in double, ~5 roundings per
              // element (≤ 3e-7); the two terms partly cancel, which can amplify that in single elements.
              // Observed over 25 seeds: l2 1.6e-7, max 2.9e-7.
              fd_check(r, s.rng, "dx", sh.accumulate ? minus(c[0].second, to_double(dx0)) : c[0].second, xd, loss,
                       {1e-6, 2e-6}, fd_budget(double(sh.M) * sh.H));
            } else {
              s.parity(r, c, run(*s.target), {{F32_REDUCTION, BF16_ROUNDED}});
            }
          });
}

// Llama-3 rotary tables (rope_theta 500000, "llama3" scaling) from model/llama.h, so all three frequency
// regimes of the scaling (kept, interpolated, divided by the factor) are exercised.
ts::LlamaConfig rope_config(int D) {
  ts::LlamaConfig c;
  c.D = D;
  c.rope_theta = 500000.f;
  c.rope_llama3 = true;
  c.rope_factor = 8.f;
  c.rope_low_freq_factor = 1.f;
  c.rope_high_freq_factor = 4.f;
  c.rope_original_max_pos = 8192;
  return c;
}

void test_rope(Session& s) {
  struct Shape {
    int64_t M;
    int nheads, D;
  };
  for (Shape sh : {Shape{11, 3, 32}, Shape{4, 8, 64}})
    s.run("rope", format("M=%lld nheads=%d D=%d P=9000 fwd+inverse", (long long)sh.M, sh.nheads, sh.D), [&](Report& r) {
      const int64_t P = 9000, cols = int64_t(sh.nheads) * sh.D;
      F cos, sin;
      ts::rope_tables(rope_config(sh.D), P, &cos, &sin);
      I32 pos = s.rng.ints(sh.M, 0, int(P));
      pos.front() = 0;
      pos.back() = int(P - 1);
      const F x = s.act_vec(s.rng.vec(sh.M * cols));
      const F w = s.act_vec(s.rng.vec(sh.M * cols));  // the FD loss weights, rotated back by the inverse
      auto run = [&](Dev& d) -> Outputs {
        const RopeView view{sh.D, P, d.upload_f32(cos), d.upload_f32(sin)};
        const int32_t* dpos = d.array(pos);
        Tensor fwd = d.upload(x, sh.M, cols, d.act), inv = d.upload(w, sh.M, cols, d.act);
        d.be.rope(fwd, dpos, view, sh.nheads, false);
        d.be.rope(inv, dpos, view, sh.nheads, true);
        return {{"forward", d.read(fwd, r, "forward")}, {"inverse", d.read(inv, r, "inverse")}};
      };
      const Outputs c = run(*s.cpu);
      if (s.oracle()) {
        V want = to_double(x);
        ref::rope(want, pos, cos, sin, sh.M, sh.nheads, sh.D, false);
        // Two products and a sum per element from float32 tables: ≤ 3u plus cancellation.
        r.compare("forward", c[0].second, want, {1e-6, 1e-6});
        // The inverse is the backward: dL/dx of L = Σ w ⊙ rope(x).
        V xd = to_double(x);
        const V wd = to_double(w);
        auto loss = [&] {
          V y = xd;
          ref::rope(y, pos, cos, sin, sh.M, sh.nheads, sh.D, false);
          return dot(wd, y);
        };
        fd_check(r, s.rng, "inverse", c[1].second, xd, loss, {1e-6, 1e-6}, fd_budget(double(sh.M) * cols));
      } else {
        s.parity(r, c, run(*s.target), {{F32_ELEMENTWISE, BF16_ROUNDED}, {F32_ELEMENTWISE, BF16_ROUNDED}});
      }
    });
}

void test_swiglu_forward(Session& s) {
  struct Shape {
    int64_t M;
    int I;
    bool in_place;
  };
  for (Shape sh : {Shape{7, 320, false}, Shape{5, 64, true}, Shape{3, 14336, false}})
    s.run("swiglu_forward", format("M=%lld I=%d%s", (long long)sh.M, sh.I, sh.in_place ? " out=gate" : ""),
          [&](Report& r) {
            const F gate = s.act_vec(s.rng.vec(sh.M * sh.I, -8.f, 8.f));  // both saturated ends of silu
            const F up = s.act_vec(s.rng.vec(sh.M * sh.I));
            auto run = [&](Dev& d) -> Outputs {
              Tensor g = d.upload(gate, sh.M, sh.I, d.act);
              Tensor out = sh.in_place ? g : d.output(sh.M, sh.I, d.act);  // the model runs it in place
              d.be.swiglu_forward(out, g, d.upload(up, sh.M, sh.I, d.act));
              return {{"out", d.read(out, r, "out")}};
            };
            const Outputs c = run(*s.cpu);
            if (s.oracle()) {
              // exp (≤1 ulp), 1 + e, the division, two products: ≤ 5u ≈ 3e-7 per element.
              r.compare("out", c[0].second, ref::swiglu(to_double(gate), to_double(up)), {1e-6, 1e-6});
            } else {
              s.parity(r, c, run(*s.target), {{F32_ELEMENTWISE, BF16_ROUNDED}});
            }
          });
}

void test_swiglu_backward(Session& s) {
  struct Shape {
    int64_t M;
    int I;
    bool in_place;
  };
  for (Shape sh : {Shape{7, 320, false}, Shape{2, 64, false}, Shape{5, 192, true}, Shape{3, 14336, false}})
    s.run("swiglu_backward", format("M=%lld I=%d%s", (long long)sh.M, sh.I, sh.in_place ? " dgate=gate dup=up" : ""),
          [&](Report& r) {
            const F gate = s.act_vec(s.rng.vec(sh.M * sh.I, -8.f, 8.f));
            const F up = s.act_vec(s.rng.vec(sh.M * sh.I));
            const F dout = s.act_vec(s.rng.vec(sh.M * sh.I));
            auto run = [&](Dev& d) -> Outputs {
              Tensor g = d.upload(gate, sh.M, sh.I, d.act), u = d.upload(up, sh.M, sh.I, d.act);
              // The training pass runs it in place (its (M, I) gradients overwrite gate and up).
              Tensor dgate = sh.in_place ? g : d.output(sh.M, sh.I, d.act);
              Tensor dup = sh.in_place ? u : d.output(sh.M, sh.I, d.act);
              d.be.swiglu_backward(dgate, dup, d.upload(dout, sh.M, sh.I, d.act), g, u);
              return {{"dgate", d.read(dgate, r, "dgate")}, {"dup", d.read(dup, r, "dup")}};
            };
            const Outputs c = run(*s.cpu);
            if (s.oracle()) {
              V g = to_double(gate), u = to_double(up);
              const V w = to_double(dout);
              auto loss = [&] { return dot(w, ref::swiglu(g, u)); };
              // σ(g)·(1 + g·(1 − σ(g))) in float32: ~8 roundings; 1 − σ loses relative accuracy for large g
              // but is then multiplied by g and added to 1, so each element stays within ~1e-6.
              fd_check(r, s.rng, "dgate", c[0].second, g, loss, {1e-6, 2e-6}, fd_budget(20.0 * sh.M * sh.I));
              fd_check(r, s.rng, "dup", c[1].second, u, loss, {1e-6, 2e-6}, fd_budget(20.0 * sh.M * sh.I));
            } else {
              s.parity(r, c, run(*s.target), {{F32_ELEMENTWISE, BF16_ROUNDED}, {F32_ELEMENTWISE, BF16_ROUNDED}});
            }
          });
}

void test_add(Session& s) {
  for (int64_t M : {7, 1})
    s.run("add", format("M=%lld H=256", (long long)M), [&](Report& r) {
      const int H = 256;
      const F x = s.act_vec(s.rng.vec(M * H)), y = s.act_vec(s.rng.vec(M * H));
      auto run = [&](Dev& d) -> Outputs {
        Tensor tx = d.upload(x, M, H, d.act);
        d.be.add(tx, d.upload(y, M, H, d.act));
        return {{"x", d.read(tx, r, "x")}};
      };
      Outputs c = run(*s.cpu);
      // float32 addition is correctly rounded: the exact (double) sum rounded to float32 is the only
      // right answer. A bf16 backend adds in float32 and rounds once more: the CPU's sum rounded to bf16.
      if (s.oracle()) {
        V want(x.size());
        for (size_t i = 0; i < x.size(); i++) want[i] = float(double(x[i]) + double(y[i]));
        r.compare("x", c[0].second, want, EXACT);
      } else {
        if (s.act() == DType::BF16)
          for (double& v : c[0].second) v = ts::bf16_to_f32(ts::f32_to_bf16(float(v)));
        s.parity(r, c, run(*s.target), {{EXACT, EXACT}});
      }
    });
}

// ---- linear layers (dense and NF4) and matmul ----

struct LinearCase {
  const char* kind;  // "dense", "nf4", "dense-f32io" (the lm_head: float32 logits / logit gradients)
  int64_t M;
  int out, in;
  float beta;
};

// A frozen weight W (out, in): float values (as the target stores them) or NF4, with the dense values
// the reference uses (the NF4 dequantization, core/nf4.h).
struct Weight {
  bool nf4 = false;
  int out = 0, in = 0;
  F dense;  // (out, in): the values the op multiplies with
  NF4Matrix q;
};
Weight make_weight(Session& s, bool nf4, int out, int in) {
  Weight w;
  w.nf4 = nf4;
  w.out = out;
  w.in = in;
  F values = s.rng.vec(int64_t(out) * in, -0.2f, 0.2f);
  if (nf4) {
    w.q = ts::nf4_quantize(values.data(), out, in);
    w.dense.resize(values.size());
    ts::nf4_dequantize_rows(w.q.view(), 0, out, w.dense.data());
  } else {
    w.dense = s.wt_vec(values);
  }
  return w;
}
LinearView upload_weight(Dev& d, const Weight& w) {
  LinearView v;
  v.out = w.out;
  v.in = w.in;
  v.quantized = w.nf4;
  if (w.nf4) {
    v.nf4 = w.q.view();
    v.nf4.codes = d.array(w.q.codes);
    v.nf4.absmax_q = d.array(w.q.absmax_q);
    v.nf4.absmax_scale = d.array(w.q.absmax_scale);
  } else {
    v.dense = d.upload(w.dense, w.out, w.in, d.wt);
  }
  return v;
}

const std::vector<LinearCase> LINEAR_CASES = {
    {"dense", 1, 80, 192, 0.f},       {"dense", 37, 80, 192, 0.f}, {"dense", 9, 80, 192, 0.5f},
    {"nf4", 3, 80, 192, 0.f},         {"nf4", 17, 80, 192, 0.f},   {"nf4", 40, 96, 128, 0.f},
    {"nf4", 5, 80, 192, 1.f},         {"dense-f32io", 6, 200, 128, 0.f},
    // across the 64 x 64 tiles of the device products and the fused path's largest M
    {"dense", 70, 130, 320, 0.f},     {"nf4", 16, 130, 320, 0.f},  {"nf4", 70, 130, 320, 0.5f},
};

void test_linear_forward(Session& s) {
  for (const LinearCase& lc : LINEAR_CASES)
    s.run("linear_forward", format("%s M=%lld out=%d in=%d beta=%g", lc.kind, (long long)lc.M, lc.out, lc.in, lc.beta),
          [&](Report& r) {
            const bool nf4 = std::string(lc.kind) == "nf4", f32_out = std::string(lc.kind) == "dense-f32io";
            const Weight w = make_weight(s, nf4, lc.out, lc.in);
            const F x = s.act_vec(s.rng.vec(lc.M * lc.in));
            const DType ydt = f32_out ? DType::F32 : s.act();
            const F y0 = Session::as(ydt, s.rng.vec(lc.M * lc.out));
            auto run = [&](Dev& d) -> Outputs {
              const DType dt = f32_out ? DType::F32 : d.act;
              // beta == 0: y is poisoned and must not be read.
              Tensor y = lc.beta != 0 ? d.upload(y0, lc.M, lc.out, dt) : d.output(lc.M, lc.out, dt);
              d.be.linear_forward(y, d.upload(x, lc.M, lc.in, d.act), upload_weight(d, w), lc.beta);
              return {{"y", d.read(y, r, "y")}};
            };
            const Outputs c = run(*s.cpu);
            if (s.oracle()) {
              // A float32 dot product of K = in ≤ 192 terms (FMA, blocked order): ~√K·u ≈ 1e-6 typical,
              // K·u ≈ 1e-5 bound. Observed over 25 seeds: l2 2.6e-7, max 8.1e-7.
              r.compare("y", c[0].second,
                        ref::matmul(false, true, lc.M, lc.out, lc.in, 1, to_double(x), to_double(w.dense), lc.beta,
                                    to_double(y0)),
                        {2e-6, 5e-6});
            } else {
              // bf16: one rounding of the output, or none for float32 logits; an NF4 weight dequantized to
              // bf16 adds a rounded operand.
              const Tolerance bf16 = f32_out ? F32_REDUCTION : nf4 ? BF16_PRODUCT : BF16_ROUNDED;
              s.parity(r, c, run(*s.target), {{F32_REDUCTION, bf16}});
            }
          });
}

void test_linear_backward_input(Session& s) {
  for (const LinearCase& lc : LINEAR_CASES)
    s.run("linear_backward_input",
          format("%s M=%lld out=%d in=%d beta=%g", lc.kind, (long long)lc.M, lc.out, lc.in, lc.beta), [&](Report& r) {
            const bool nf4 = std::string(lc.kind) == "nf4", f32_dy = std::string(lc.kind) == "dense-f32io";
            const Weight w = make_weight(s, nf4, lc.out, lc.in);
            const F dy = Session::as(f32_dy ? DType::F32 : s.act(), s.rng.vec(lc.M * lc.out));
            const F dx0 = s.act_vec(s.rng.vec(lc.M * lc.in));
            auto run = [&](Dev& d) -> Outputs {
              Tensor dx = lc.beta != 0 ? d.upload(dx0, lc.M, lc.in, d.act) : d.output(lc.M, lc.in, d.act);
              d.be.linear_backward_input(dx, d.upload(dy, lc.M, lc.out, f32_dy ? DType::F32 : d.act), upload_weight(d, w),
                                         lc.beta);
              return {{"dx", d.read(dx, r, "dx")}};
            };
            const Outputs c = run(*s.cpu);
            if (s.oracle()) {
              V xd(size_t(lc.M * lc.in), 0.5);  // L is linear in x: where it is evaluated does not matter
              const V wd = to_double(w.dense), dyd = to_double(dy);
              auto loss = [&] { return dot(dyd, ref::matmul(false, true, lc.M, lc.out, lc.in, 1, xd, wd, 0, {})); };
              V got = c[0].second;
              for (size_t i = 0; i < got.size(); i++) got[i] -= double(lc.beta) * dx0[i];
              // A float32 dot product of K = out terms, as the forward.
              fd_check(r, s.rng, "dx", got, xd, loss, {2e-6, 5e-6}, fd_budget(double(lc.M) * lc.out * lc.in));
            } else {
              // bf16: float32 logit gradients may be rounded to bf16 for the product (a rounded operand).
              const Tolerance bf16 = f32_dy || nf4 ? BF16_PRODUCT : BF16_ROUNDED;
              s.parity(r, c, run(*s.target), {{F32_REDUCTION, bf16}});
            }
          });
}

void test_matmul(Session& s) {
  struct Case {
    bool ta, tb;
    int64_t M, N, K;
    float alpha, beta;
  };
  const Case cases[] = {{false, false, 13, 24, 40, 0.7f, 0.f}, {false, true, 13, 24, 40, 0.7f, 0.f},
                        {true, false, 13, 24, 40, 0.7f, 0.f},  {true, true, 13, 24, 40, 0.7f, 0.f},
                        {false, true, 70, 33, 65, 1.f, 1.3f},  {true, false, 5, 300, 96, 1.f, 1.f}};
  for (const Case& k : cases)
    s.run("matmul",
          format("%c%c M=%lld N=%lld K=%lld alpha=%g beta=%g", k.ta ? 'T' : 'N', k.tb ? 'T' : 'N', (long long)k.M,
                 (long long)k.N, (long long)k.K, k.alpha, k.beta),
          [&](Report& r) {
            const F A = s.rng.vec(k.M * k.K), B = s.rng.vec(k.K * k.N), C0 = s.rng.vec(k.M * k.N);
            auto run = [&](Dev& d) -> Outputs {
              // float32 tensors in every mode (LoRA gradients).
              Tensor C = k.beta != 0 ? d.upload(C0, k.M, k.N, DType::F32) : d.output(k.M, k.N, DType::F32);
              d.be.matmul(C, k.ta, d.upload(A, k.ta ? k.K : k.M, k.ta ? k.M : k.K, DType::F32), k.tb,
                          d.upload(B, k.tb ? k.N : k.K, k.tb ? k.K : k.N, DType::F32), k.alpha, k.beta);
              return {{"C", d.read(C, r, "C")}};
            };
            const Outputs c = run(*s.cpu);
            if (s.oracle()) {
              r.compare("C", c[0].second,
                        ref::matmul(k.ta, k.tb, k.M, k.N, k.K, k.alpha, to_double(A), to_double(B), k.beta, to_double(C0)),
                        {2e-6, 5e-6});  // as linear_forward
            } else {
              // The interface says float32 in both modes: bf16 (or TF32) operands would fail here on purpose.
              s.parity(r, c, run(*s.target), {{F32_REDUCTION, F32_REDUCTION}});
            }
          });
}

// ---- LoRA ----

struct HostModule {
  int r = 0;
  float scaling = 0;
  F A, B;  // (r, in), (out, r)
};
HostModule make_module(Random& rng, int r, int in, int out, float scaling) {
  HostModule m;
  m.r = r;
  m.scaling = scaling;
  m.A = rng.vec(int64_t(r) * in, -0.3f, 0.3f);
  m.B = rng.vec(int64_t(out) * r, -0.5f, 0.5f);
  return m;
}
LoraModuleView upload_module(Dev& d, const HostModule& m, int in, int out) {
  LoraModuleView v;
  v.r = m.r;
  v.in = in;
  v.out = out;
  v.scaling = m.scaling;
  v.A = d.upload_f32(m.A);
  v.B = d.upload_f32(m.B);
  return v;
}
ref::LoraModule ref_module(const HostModule& m) { return {m.r, double(m.scaling), to_double(m.A), to_double(m.B)}; }

void test_lora_forward(Session& s) {
  const int64_t M = 20;
  const int in = 96, out = 80;
  // Forms: "segments" alone (what a training pass gives) and "both" (what an inference step gives:
  // segments and the per-row slot mapping; a backend may use either). The CPU always takes the segments.
  for (float p : {0.f, 0.25f})
    for (bool per_row : {false, true})
    s.run("lora_forward",
          format("M=%lld in=%d out=%d rows 0-6:r=8 7-10:none 11-19:r=4 p=%g %s", (long long)M, in, out, p,
                 per_row ? "segments+per-row" : "segments"),
          [&](Report& r) {
            const HostModule a = make_module(s.rng, 8, in, out, 2.f), b = make_module(s.rng, 4, in, out, 0.5f);
            const F x = s.act_vec(s.rng.vec(M * in));
            const F y0 = s.act_vec(s.rng.vec(M * out));
            const LoraDropout drop{p, ts::lora_dropout_key(7, 3, 1, ts::GATE)};
            auto run = [&](Dev& d) -> Outputs {
              const LoraModuleView va = upload_module(d, a, in, out), vb = upload_module(d, b, in, out);
              LoraApply lora;
              lora.segments = {{0, 7, va}, {7, 11, LoraModuleView{}}, {11, 20, vb}};
              if (per_row) {  // slot 1 is an empty slot; rows 7-10 have none (-1)
                I32 row_slot(static_cast<size_t>(M), -1);
                for (int i = 0; i < 7; i++) row_slot[size_t(i)] = 0;
                for (int i = 11; i < 20; i++) row_slot[size_t(i)] = 2;
                lora.row_slot = d.array(row_slot);
                lora.slot_modules = d.array(std::vector<LoraModuleView>{va, LoraModuleView{}, vb});
              }
              lora.max_rank = 8;
              lora.dropout = drop;
              LoraScratch scratch;
              scratch.u = d.output(M, 8, DType::F32);
              if (p > 0) scratch.xd = d.output(M, in, DType::F32);
              Tensor y = d.upload(y0, M, out, d.act);
              d.be.lora_forward(y, d.upload(x, M, in, d.act), lora, scratch);
              return {{"y", d.read(y, r, "y")}};
            };
            const Outputs c = run(*s.cpu);
            // Rows without an adapter are left alone, bit for bit.
            if (s.oracle()) {
              const V kept(c[0].second.begin() + 7 * out, c[0].second.begin() + 11 * out);
              V want = to_double(y0);
              const V xd = to_double(x);
              ref::lora(want, xd, 0, 7, in, out, ref_module(a), drop);
              ref::lora(want, xd, 11, 20, in, out, ref_module(b), drop);
              // Two float32 products (K = in, then K = r) added to y: ~√K·u each (observed 1.2e-7/1.8e-7).
              r.compare("y", c[0].second, want, {1e-6, 2e-6});
              r.compare("rows 7-10 unchanged", kept, V(want.begin() + 7 * out, want.begin() + 11 * out), EXACT);
            } else {
              const Outputs t = run(*s.target);
              s.parity(r, c, t, {{F32_REDUCTION, BF16_ROUNDED}});
              r.compare("rows 7-10 unchanged", V(t[0].second.begin() + 7 * out, t[0].second.begin() + 11 * out),
                        V(y0.begin() + 7 * out, y0.begin() + 11 * out), EXACT);
            }
          });
}

void test_lora_backward(Session& s) {
  const int64_t M = 12;
  const int in = 64, out = 48, rank = 4;
  for (float p : {0.f, 0.3f})
    s.run("lora_backward", format("M=%lld in=%d out=%d r=%d p=%g", (long long)M, in, out, rank, p), [&](Report& r) {
      const HostModule m = make_module(s.rng, rank, in, out, 2.f);
      const F x = s.act_vec(s.rng.vec(M * in)), dy = s.act_vec(s.rng.vec(M * out));
      const F dx0 = s.act_vec(s.rng.vec(M * in));
      const F dA0 = s.rng.vec(int64_t(rank) * in), dB0 = s.rng.vec(int64_t(out) * rank);
      const LoraDropout drop{p, ts::lora_dropout_key(11, 5, 2, ts::Q)};
      auto run = [&](Dev& d) -> Outputs {
        const LoraModuleView v = upload_module(d, m, in, out);
        LoraScratch scratch;
        scratch.u = d.output(M, rank, DType::F32);
        scratch.du = d.output(M, rank, DType::F32);
        scratch.dxd = d.output(M, in, DType::F32);
        if (p > 0) scratch.xd = d.output(M, in, DType::F32);
        Tensor dx = d.upload(dx0, M, in, d.act);  // dx, dA and dB accumulate
        float* dA = d.upload_f32(dA0);
        float* dB = d.upload_f32(dB0);
        d.be.lora_backward(dx, dA, dB, d.upload(dy, M, out, d.act), d.upload(x, M, in, d.act), v, drop, scratch);
        return {{"dx", d.read(dx, r, "dx")},
                {"dA", d.read(dA, rank * in, DType::F32, r, "dA")},
                {"dB", d.read(dB, out * rank, DType::F32, r, "dB")}};
      };
      const Outputs c = run(*s.cpu);
      if (s.oracle()) {
        V xd = to_double(x);
        ref::LoraModule rm = ref_module(m);
        const V w = to_double(dy);
        auto loss = [&] {
          V y(size_t(M * out), 0);
          ref::lora(y, xd, 0, M, in, out, rm, drop);
          return dot(w, y);
        };
        // Chains of two float32 products (K ≤ max(M, in, out) = 64) and the += : a few √K·u
        // (observed over 25 seeds: l2 2.1e-7, max 3.0e-7).
        const Tolerance tol{1e-6, 2e-6};
        const int64_t most = fd_budget(double(M) * rank * (in + out));
        fd_check(r, s.rng, "dx", minus(c[0].second, to_double(dx0)), xd, loss, tol, most);
        fd_check(r, s.rng, "dA", minus(c[1].second, to_double(dA0)), rm.A, loss, tol, most);
        fd_check(r, s.rng, "dB", minus(c[2].second, to_double(dB0)), rm.B, loss, tol, most);
      } else {
        // dA and dB are float32 (the LoRA master gradients) in both modes: float32 tolerance, a little
        // wider for sums over M in another order; a bf16 intermediate there would fail on purpose.
        s.parity(r, c, run(*s.target),
                 {{F32_REDUCTION, BF16_ROUNDED}, {F32_REDUCTION, {1e-4, 5e-4}}, {F32_REDUCTION, {1e-4, 5e-4}}});
      }
    });
}

// ---- attention ----

struct AttnShape {
  int B, T, NH, NKV, D;
  bool packed;
};
std::string attn_label(const AttnShape& a) {
  return format("B=%d T=%d NH=%d NKV=%d D=%d%s", a.B, a.T, a.NH, a.NKV, a.D, a.packed ? " packed" : "");
}
// Document starts of packed sequences: boundaries at random, and one in the middle of the first sequence.
I32 doc_starts(Random& rng, int B, int T) {
  I32 ds(size_t(B) * T);
  for (int b = 0; b < B; b++) {
    int start = 0;
    for (int t = 0; t < T; t++) {
      if (t > 0 && (rng.uniform() < 0.2 || (b == 0 && t == T / 2))) start = t;
      ds[size_t(b * T + t)] = start;
    }
  }
  return ds;
}

void test_attention_forward(Session& s) {
  // Small head dims take the CUDA backend's generic kernels; D = 64 and 128 (Llama 3) its tiled ones,
  // with T across several 64-row tiles, GQA groups of 4 (Llama-3-8B) and packed documents.
  for (AttnShape a : {AttnShape{2, 13, 4, 2, 16, false}, AttnShape{2, 17, 4, 1, 32, true}, AttnShape{3, 1, 2, 2, 8, false},
                      AttnShape{2, 150, 4, 1, 64, true}, AttnShape{1, 100, 8, 2, 128, false}, AttnShape{1, 70, 2, 1, 128, true}})
    s.run("attention_forward", attn_label(a), [&](Report& r) {
      const int64_t M = int64_t(a.B) * a.T, QD = a.NH * a.D, KVD = a.NKV * a.D;
      const F q = s.act_vec(s.rng.vec(M * QD, -2.f, 2.f));  // scores of a few units: a peaked softmax
      const F k = s.act_vec(s.rng.vec(M * KVD)), v = s.act_vec(s.rng.vec(M * KVD));
      const I32 ds = a.packed ? doc_starts(s.rng, a.B, a.T) : I32{};
      auto run = [&](Dev& d) -> Outputs {
        Tensor out = d.output(M, QD, d.act);
        float* lse = d.output_f32(int64_t(a.B) * a.NH * a.T);
        const AttentionShape shape{a.B, a.T, a.NH, a.NKV, a.D, a.packed ? d.array(ds) : nullptr};
        d.be.attention_forward(out, lse, d.upload(q, M, QD, d.act), d.upload(k, M, KVD, d.act), d.upload(v, M, KVD, d.act),
                               shape);
        return {{"out", d.read(out, r, "out")}, {"lse", d.read(lse, int64_t(a.B) * a.NH * a.T, DType::F32, r, "lse")}};
      };
      const Outputs c = run(*s.cpu);
      if (s.oracle()) {
        V out, lse;
        ref::attention(out, lse, to_double(q), to_double(k), to_double(v), a.B, a.T, a.NH, a.NKV, a.D, ds);
        // float32 scores (K = D), exp, sums of ≤ T terms: a few √K·u; lse adds the log and max.
        r.compare("out", c[0].second, out, {1e-6, 2e-6});
        r.compare("lse", c[1].second, lse, {1e-6, 2e-6});
      } else {
        // lse stays float32 in both modes, from identical inputs.
        s.parity(r, c, run(*s.target), {{F32_REDUCTION, BF16_PRODUCT}, {F32_REDUCTION, F32_REDUCTION}});
      }
    });
}

void test_attention_backward(Session& s) {
  // As the forward: generic kernels at small D, the tiled ones (32-row tiles) at D = 64 and 128.
  for (AttnShape a : {AttnShape{1, 7, 4, 2, 8, false}, AttnShape{2, 9, 2, 1, 8, true}, AttnShape{1, 20, 4, 2, 16, true},
                      AttnShape{1, 75, 4, 1, 64, true}, AttnShape{1, 45, 2, 1, 128, false},
                      AttnShape{1, 40, 4, 2, 128, true}})
    s.run("attention_backward", attn_label(a), [&](Report& r) {
      const int64_t M = int64_t(a.B) * a.T, QD = a.NH * a.D, KVD = a.NKV * a.D, NL = int64_t(a.B) * a.NH * a.T;
      const F q = s.act_vec(s.rng.vec(M * QD, -2.f, 2.f));
      const F k = s.act_vec(s.rng.vec(M * KVD)), v = s.act_vec(s.rng.vec(M * KVD));
      const F dout = s.act_vec(s.rng.vec(M * QD));
      const I32 ds = a.packed ? doc_starts(s.rng, a.B, a.T) : I32{};
      // out and lse as the model has them: saved by the forward (the CPU's, on these inputs).
      F out(size_t(M * QD)), lse(static_cast<size_t>(NL));
      {
        Dev& d = *s.cpu;
        Tensor o = d.output(M, QD, DType::F32);
        float* l = d.output_f32(NL);
        d.be.attention_forward(o, l, d.upload(q, M, QD, DType::F32), d.upload(k, M, KVD, DType::F32),
                               d.upload(v, M, KVD, DType::F32), AttentionShape{a.B, a.T, a.NH, a.NKV, a.D, a.packed ? d.array(ds) : nullptr});
        d.be.download(out.data(), o.data, out.size() * sizeof(float));
        d.be.download(lse.data(), l, lse.size() * sizeof(float));
        out = s.act_vec(out);
      }
      auto run = [&](Dev& d) -> Outputs {
        Tensor dq = d.output(M, QD, d.act), dk = d.output(M, KVD, d.act), dv = d.output(M, KVD, d.act);
        const AttentionShape shape{a.B, a.T, a.NH, a.NKV, a.D, a.packed ? d.array(ds) : nullptr};
        d.be.attention_backward(dq, dk, dv, d.upload(dout, M, QD, d.act), d.upload(out, M, QD, d.act), d.upload_f32(lse),
                                d.upload(q, M, QD, d.act), d.upload(k, M, KVD, d.act), d.upload(v, M, KVD, d.act), shape);
        return {{"dq", d.read(dq, r, "dq")}, {"dk", d.read(dk, r, "dk")}, {"dv", d.read(dv, r, "dv")}};
      };
      const Outputs c = run(*s.cpu);
      if (s.oracle()) {
        V qd = to_double(q), kd = to_double(k), vd = to_double(v);
        const V w = to_double(dout);
        auto loss = [&] {
          V o, l;
          ref::attention(o, l, qd, kd, vd, a.B, a.T, a.NH, a.NKV, a.D, ds);
          return dot(w, o);
        };
        // Recomputed probabilities exp(s − lse) from float32 scores and lse (~√D·u·|s|), dP − δ with
        // cancellation, sums over ≤ T keys: a few 1e-7 (observed over 25 seeds: l2 2.4e-7, max 3.8e-7).
        const Tolerance tol{2e-6, 4e-6};
        const int64_t most = fd_budget(double(a.B) * a.NH * a.T * a.T * a.D);  // reruns the whole naive attention
        fd_check(r, s.rng, "dq", c[0].second, qd, loss, tol, most);
        fd_check(r, s.rng, "dk", c[1].second, kd, loss, tol, most);
        fd_check(r, s.rng, "dv", c[2].second, vd, loss, tol, most);
      } else {
        s.parity(r, c, run(*s.target), {{F32_REDUCTION, BF16_PRODUCT}, {F32_REDUCTION, BF16_PRODUCT}, {F32_REDUCTION, BF16_PRODUCT}});
      }
    });
}

// ---- the paged KV cache ----

void test_kv_write(Session& s) {
  const int num_blocks = 10, bs = 4, KVD = 32;
  const int64_t M = 7;
  s.run("kv_write", format("blocks=%d block_size=%d KVD=%d M=%lld", num_blocks, bs, KVD, (long long)M), [&](Report& r) {
    const int64_t rows = int64_t(num_blocks) * bs;
    const I32 slot = s.rng.distinct(int(M), 0, int(rows));
    const F k = s.act_vec(s.rng.vec(M * KVD)), v = s.act_vec(s.rng.vec(M * KVD));
    auto run = [&](Dev& d) {
      KVLayerView kv;
      kv.dtype = d.act;
      kv.block_size = bs;
      kv.num_blocks = num_blocks;
      kv.KVD = KVD;
      kv.k = d.alloc(size_t(rows * KVD) * ts::dtype_size(d.act));  // poisoned: unwritten rows must stay so
      kv.v = d.alloc(size_t(rows * KVD) * ts::dtype_size(d.act));
      d.be.kv_write(kv, d.upload(k, M, KVD, d.act), d.upload(v, M, KVD, d.act), d.array(slot));
      for (int which = 0; which < 2; which++) {
        const char* name = which ? "v cache" : "k cache";
        std::vector<uint8_t> untouched;
        const V cache = d.fetch(which ? kv.v : kv.k, rows * KVD, d.act, r, name, &untouched);
        const F& src = which ? v : k;
        V got, want;
        int64_t stray = 0, missing = 0;
        for (int64_t row = 0; row < rows; row++) {
          const auto it = std::find(slot.begin(), slot.end(), int32_t(row));
          for (int i = 0; i < KVD; i++) {
            const size_t e = size_t(row * KVD + i);
            if (it == slot.end()) {
              stray += !untouched[e];
            } else {
              missing += untouched[e];
              got.push_back(untouched[e] ? NAN : cache[e]);
              want.push_back(src[size_t((it - slot.begin()) * KVD + i)]);
            }
          }
        }
        if (stray) r.problem(std::string(name) + format(": %lld elements written outside the given slots", (long long)stray));
        if (missing) r.problem(std::string(name) + format(": %lld elements of the given slots never written", (long long)missing));
        r.compare(name, got, want, EXACT);  // a copy, in both modes
      }
    };
    run(*s.cpu);
    if (!s.oracle()) run(*s.target);
  });
}

struct PagedCase {
  int bs, num_blocks, NH, NKV, D;
  std::vector<int> lens;                          // (S) positions cached per sequence
  std::vector<std::pair<int, int>> query_rows;    // (M) (sequence, position): attends to [0, position]
};

void test_attention_paged(Session& s) {
  const PagedCase cases[] = {
      {4, 16, 4, 2, 16, {1, 9, 14}, {{0, 0}, {1, 8}, {2, 10}, {2, 11}, {2, 12}, {2, 13}}},  // decode + a prefill chunk
      {16, 8, 8, 2, 32, {40, 17}, {{0, 39}, {1, 16}}},
      // D = 128 and 64 take the CUDA backend's specialized kernels (32-position chunks): GQA groups of 4
      // and 8, contexts across several chunks, a prefill chunk of rows of one sequence.
      {16, 24, 8, 2, 128, {100, 37, 1}, {{0, 99}, {1, 36}, {2, 0}, {0, 90}, {0, 91}, {0, 92}}},
      {16, 12, 32, 4, 64, {70, 33}, {{0, 69}, {0, 40}, {1, 32}}},
  };
  for (const PagedCase& pc : cases)
    s.run("attention_paged",
          format("block_size=%d NH=%d NKV=%d D=%d seqs=%zu M=%zu", pc.bs, pc.NH, pc.NKV, pc.D, pc.lens.size(),
                 pc.query_rows.size()),
          [&](Report& r) {
            const int S = int(pc.lens.size()), KVD = pc.NKV * pc.D, QD = pc.NH * pc.D;
            const int64_t M = int64_t(pc.query_rows.size()), cache_rows = int64_t(pc.num_blocks) * pc.bs;
            int max_blocks = 0;
            for (int n : pc.lens) max_blocks = std::max(max_blocks, (n + pc.bs - 1) / pc.bs);
            // Block tables: distinct blocks in random order, never block 0 (the reserved scratch block).
            const I32 blocks = s.rng.distinct(S * max_blocks, 1, pc.num_blocks);
            I32 tables(size_t(S) * max_blocks, 0);
            std::vector<F> kseq(static_cast<size_t>(S)), vseq(static_cast<size_t>(S));  // (len, KVD) each: the contiguous copy
            I32 write_slot;                                    // cache row of every cached position
            F kall, vall;
            for (int sq = 0; sq < S; sq++) {
              const int nb = (pc.lens[size_t(sq)] + pc.bs - 1) / pc.bs;
              for (int b = 0; b < nb; b++) tables[size_t(sq * max_blocks + b)] = blocks[size_t(sq * max_blocks + b)];
              kseq[size_t(sq)] = s.act_vec(s.rng.vec(int64_t(pc.lens[size_t(sq)]) * KVD));
              vseq[size_t(sq)] = s.act_vec(s.rng.vec(int64_t(pc.lens[size_t(sq)]) * KVD));
              for (int p = 0; p < pc.lens[size_t(sq)]; p++)
                write_slot.push_back(tables[size_t(sq * max_blocks + p / pc.bs)] * pc.bs + p % pc.bs);
              kall.insert(kall.end(), kseq[size_t(sq)].begin(), kseq[size_t(sq)].end());
              vall.insert(vall.end(), vseq[size_t(sq)].begin(), vseq[size_t(sq)].end());
            }
            I32 slot, row_seq, len;
            for (auto [sq, p] : pc.query_rows) {
              slot.push_back(tables[size_t(sq * max_blocks + p / pc.bs)] * pc.bs + p % pc.bs);
              row_seq.push_back(sq);
              len.push_back(p + 1);
            }
            const F q = s.act_vec(s.rng.vec(M * QD, -2.f, 2.f));
            // with_kv_write: the oracle fills the cache through kv_write (the two ops together, as the
            // model uses them); parity sessions upload the cache image, so attention_paged is checked on
            // its own. Rows no sequence owns stay poisoned: reading them would make the output NaN.
            auto run = [&](Dev& d, bool with_kv_write) -> Outputs {
              KVLayerView kv;
              kv.dtype = d.act;
              kv.block_size = pc.bs;
              kv.num_blocks = pc.num_blocks;
              kv.KVD = KVD;
              kv.k = d.alloc(size_t(cache_rows * KVD) * ts::dtype_size(d.act));
              kv.v = d.alloc(size_t(cache_rows * KVD) * ts::dtype_size(d.act));
              const int64_t W = int64_t(write_slot.size());
              if (with_kv_write) {
                d.be.kv_write(kv, d.upload(kall, W, KVD, d.act), d.upload(vall, W, KVD, d.act), d.array(write_slot));
              } else {
                for (int64_t i = 0; i < W; i++) {
                  const size_t row_bytes = size_t(KVD) * ts::dtype_size(d.act), at = size_t(write_slot[size_t(i)]) * row_bytes;
                  d.write(static_cast<char*>(kv.k) + at, F(kall.begin() + i * KVD, kall.begin() + (i + 1) * KVD), d.act);
                  d.write(static_cast<char*>(kv.v) + at, F(vall.begin() + i * KVD, vall.begin() + (i + 1) * KVD), d.act);
                }
              }
              const PagedRows rows{d.array(slot), d.array(row_seq), d.array(tables), d.array(len), max_blocks};
              Tensor out = d.output(M, QD, d.act);
              d.be.attention_paged(out, d.upload(q, M, QD, d.act), kv, rows, pc.NH, pc.NKV, pc.D);
              return {{"out", d.read(out, r, "out")}};
            };
            const Outputs c = run(*s.cpu, s.oracle());
            if (s.oracle()) {
              // Naive attention of each row over the contiguous copy of its sequence's first len positions.
              V want;
              for (int64_t m = 0; m < M; m++) {
                const int sq = row_seq[size_t(m)], n = len[size_t(m)];
                V o, l;
                // One query against n keys is row n−1 of a causal attention over n rows whose other
                // queries are zero; take that row.
                V qrows(size_t(n) * QD, 0.0);
                for (int i = 0; i < QD; i++) qrows[size_t((n - 1) * QD + i)] = q[size_t(m * QD + i)];
                ref::attention(o, l, qrows, to_double(F(kseq[size_t(sq)].begin(), kseq[size_t(sq)].begin() + int64_t(n) * KVD)),
                               to_double(F(vseq[size_t(sq)].begin(), vseq[size_t(sq)].begin() + int64_t(n) * KVD)), 1, n,
                               pc.NH, pc.NKV, pc.D, {});
                want.insert(want.end(), o.begin() + int64_t(n - 1) * QD, o.begin() + int64_t(n) * QD);
              }
              r.compare("out", c[0].second, want, {2e-6, 4e-6});  // as attention_forward, longer rows
            } else {
              s.parity(r, c, run(*s.target, false), {{F32_REDUCTION, BF16_PRODUCT}});
            }
          });
}

// ---- row gathers ----

void test_gather_rows(Session& s) {
  const int64_t R = 20, C = 96, n = 9;
  s.run("gather_rows", format("in=%lldx%lld n=%lld (repeats)", (long long)R, (long long)C, (long long)n), [&](Report& r) {
    const F in = s.act_vec(s.rng.vec(R * C));
    I32 index = s.rng.ints(n, 0, int(R));
    index[1] = index[0];  // a repeated row
    index.back() = int(R - 1);
    auto run = [&](Dev& d) -> Outputs {
      Tensor out = d.output(n, C, d.act);
      d.be.gather_rows(out, d.upload(in, R, C, d.act), d.array(index));
      return {{"out", d.read(out, r, "out")}};
    };
    const Outputs c = run(*s.cpu);
    if (s.oracle()) {
      V want;
      for (int32_t i : index) want.insert(want.end(), in.begin() + i * C, in.begin() + (i + 1) * C);
      r.compare("out", c[0].second, want, EXACT);
    } else {
      s.parity(r, c, run(*s.target), {{EXACT, EXACT}});
    }
  });
}

void test_scatter_rows(Session& s) {
  const int64_t R = 20, C = 96, n = 9;
  s.run("scatter_rows", format("out=%lldx%lld n=%lld", (long long)R, (long long)C, (long long)n), [&](Report& r) {
    const F in = s.act_vec(s.rng.vec(n * C));
    const I32 index = s.rng.distinct(int(n), 0, int(R));
    auto run = [&](Dev& d) {
      Tensor out = d.output(R, C, d.act);  // poisoned: rows outside index must stay so
      d.be.scatter_rows(out, d.upload(in, n, C, d.act), d.array(index));
      std::vector<uint8_t> untouched;
      const V all = d.fetch(out.data, R * C, d.act, r, "out", &untouched);
      V got, want;
      int64_t stray = 0, missing = 0;
      for (int64_t row = 0; row < R; row++) {
        const auto it = std::find(index.begin(), index.end(), int32_t(row));
        for (int64_t i = 0; i < C; i++) {
          if (it == index.end()) {
            stray += !untouched[size_t(row * C + i)];
          } else {
            missing += untouched[size_t(row * C + i)];
            got.push_back(untouched[size_t(row * C + i)] ? NAN : all[size_t(row * C + i)]);
            want.push_back(in[size_t((it - index.begin()) * C + i)]);
          }
        }
      }
      if (stray) r.problem(format("out: %lld elements written outside the indexed rows", (long long)stray));
      if (missing) r.problem(format("out: %lld elements of the indexed rows never written", (long long)missing));
      r.compare("out", got, want, EXACT);
    };
    run(*s.cpu);
    if (!s.oracle()) run(*s.target);
  });
}

// ---- loss, norms, optimizer, sampling ----

void test_cross_entropy(Session& s) {
  struct Shape {
    int64_t M;
    int V;
    float scale;
  };
  for (Shape sh : {Shape{9, 1000, 0.f}, Shape{9, 1000, 0.125f}, Shape{3, 5000, 1.f}, Shape{2, 32000, 0.5f}})
    s.run("cross_entropy", format("M=%lld V=%d scale=%g", (long long)sh.M, sh.V, sh.scale), [&](Report& r) {
      const F logits = s.rng.vec(sh.M * sh.V, -4.f, 4.f);  // float32 in every mode
      I32 targets = s.rng.ints(sh.M, 0, sh.V);
      targets.front() = 0;
      targets.back() = sh.V - 1;
      if (sh.M > 5) targets[2] = targets[5] = -100;  // ignored rows
      const double loss0 = 1.5;                        // the op adds to *loss_sum
      auto run = [&](Dev& d) -> Outputs {
        Tensor t = d.upload(logits, sh.M, sh.V, DType::F32);
        double* loss = static_cast<double*>(d.alloc(sizeof(double)));
        d.be.upload(loss, &loss0, sizeof loss0);
        d.be.cross_entropy(loss, t, d.array(targets), sh.scale);
        return {{"loss", d.read(loss, 1, DType::F64, r, "loss")}, {"logits", d.read(t, r, "logits")}};
      };
      const Outputs c = run(*s.cpu);
      if (s.oracle()) {
        V x = to_double(logits);
        // Per row: float32 max and exps summed in double, log in double: ~2u·|logsumexp| per row.
        r.compare("loss", c[0].second, {loss0 + ref::cross_entropy(x, targets, sh.M, sh.V)}, {1e-6, 1e-6});
        if (sh.scale == 0) {
          r.compare("logits unchanged", c[1].second, x, EXACT);
        } else {
          // (softmax − onehot)·scale: a float32 exp, a product and a sum per element.
          auto loss = [&] { return double(sh.scale) * ref::cross_entropy(x, targets, sh.M, sh.V); };
          fd_check(r, s.rng, "gradient", c[1].second, x, loss, {1e-6, 2e-6}, fd_budget(20.0 * sh.M * sh.V));
        }
      } else {
        // float32 logits in both modes; the row sums may run in float32 on the device: a reduction.
        s.parity(r, c, run(*s.target), {{{1e-6, 1e-6}, {1e-6, 1e-6}}, {F32_REDUCTION, F32_REDUCTION}});
      }
    });
}

void test_sum_squares(Session& s) {
  const int64_t n = 10007;
  s.run("sum_squares", format("n=%lld then n=1, acc=2.5", (long long)n), [&](Report& r) {
    const F x = s.rng.vec(n), y = s.rng.vec(1, 2.f, 3.f);
    const double acc0 = 2.5;
    auto run = [&](Dev& d) -> Outputs {
      double* acc = static_cast<double*>(d.alloc(sizeof(double)));
      d.be.upload(acc, &acc0, sizeof acc0);
      d.be.sum_squares(acc, d.upload_f32(x), n);
      d.be.sum_squares(acc, d.upload_f32(y), 1);  // accumulates across calls
      return {{"acc", d.read(acc, 1, DType::F64, r, "acc")}};
    };
    const Outputs c = run(*s.cpu);
    if (s.oracle()) {
      double want = acc0;
      for (float v : x) want += double(v) * v;
      want += double(y[0]) * y[0];
      // Products of two floats are exact in double; only the double additions round (n·2⁻⁵³ ≈ 1e-12).
      r.compare("acc", c[0].second, {want}, {1e-12, 1e-12});
    } else {
      // A device may square and add in float32 within a block before the double accumulation:
      // ~√(block)·u ≈ 1e-6, 256·u ≈ 1.5e-5 at worst.
      s.parity(r, c, run(*s.target), {{{2e-5, 2e-5}, {2e-5, 2e-5}}});
    }
  });
}

void test_adamw(Session& s) {
  const int64_t n = 1000;
  const int steps = 3;
  // The engine's hyperparameters are float32 (model/trainer.h: betas 0.9f, 0.999f), and the trainer
  // uses those values everywhere, bias corrections included; torch with betas = (0.9f, 0.999f) does the
  // same. (Against torch's default betas = (0.9, 0.999) the second moment differs by 1.3e-5 relative,
  // because 1 − 0.999f = 9.9998713e-4, not 1e-3.)
  const double lr = 1e-2, wd = 0.1, b1 = double(0.9f), b2 = double(0.999f);
  const float clip = 0.7f, eps = 1e-8f;
  s.run("adamw", format("n=%lld steps=%d lr=%g wd=%g clip=%g", (long long)n, steps, lr, wd, clip), [&](Report& r) {
    const F p0 = s.rng.vec(n);
    std::vector<F> g;
    for (int t = 0; t < steps; t++) {
      g.push_back(s.rng.vec(n, -0.1f, 0.1f));
      g.back()[size_t(t)] = 0.f;  // a zero gradient: the update is m / (√v + eps) of older steps
    }
    // The host scalars exactly as model/trainer.cpp computes them.
    auto step_of = [&](int t) {
      AdamWStep st;
      st.clip = clip;
      st.beta1 = float(b1);
      st.beta2 = float(b2);
      st.eps = eps;
      st.step_size = float(lr / (1 - std::pow(b1, t)));
      st.sqrt_bc2 = float(std::sqrt(1 - std::pow(b2, t)));
      st.decay = float(1 - lr * wd);
      return st;
    };
    auto run = [&](Dev& d) -> Outputs {
      float* p = d.upload_f32(p0);
      float* m = d.upload_f32(F(size_t(n), 0.f));
      float* v = d.upload_f32(F(size_t(n), 0.f));
      for (int t = 1; t <= steps; t++) d.be.adamw(p, d.upload_f32(g[size_t(t - 1)]), m, v, n, step_of(t));
      return {{"p", d.read(p, n, DType::F32, r, "p")}, {"m", d.read(m, n, DType::F32, r, "m")},
              {"v", d.read(v, n, DType::F32, r, "v")}};
    };
    const Outputs c = run(*s.cpu);
    if (s.oracle()) {
      // torch.optim.AdamW (single-tensor, no amsgrad) in double, the gradient scaled by the clip
      // coefficient first (torch.nn.utils.clip_grad_norm_).
      V p = to_double(p0), m(size_t(n), 0), v(size_t(n), 0);
      for (int t = 1; t <= steps; t++)
        for (int64_t i = 0; i < n; i++) {
          const double gi = double(g[size_t(t - 1)][size_t(i)]) * double(clip);
          p[size_t(i)] *= 1 - lr * wd;
          m[size_t(i)] = b1 * m[size_t(i)] + (1 - b1) * gi;
          v[size_t(i)] = b2 * v[size_t(i)] + (1 - b2) * gi * gi;
          const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
          p[size_t(i)] -= lr / bc1 * m[size_t(i)] / (std::sqrt(v[size_t(i)]) / std::sqrt(bc2) + double(eps));
        }
      // ~10 float32 roundings per element and step, compounding over 3 steps: a few 1e-7. A wrong bias
      // correction or decay moves p by ~lr = 1e-2 relative to the update, far outside.
      r.compare("p", c[0].second, p, {1e-6, 2e-6});
      r.compare("m", c[1].second, m, {1e-6, 2e-6});
      r.compare("v", c[2].second, v, {1e-6, 2e-6});
    } else {
      s.parity(r, c, run(*s.target), {{F32_ELEMENTWISE, F32_ELEMENTWISE}, {F32_ELEMENTWISE, F32_ELEMENTWISE},
                                      {F32_ELEMENTWISE, F32_ELEMENTWISE}});
    }
  });
}

void test_sample(Session& s) {
  struct Row {
    const char* what;
    SamplingParams params;
  };
  auto params = [](float t, int k, float p, float penalty, uint64_t seed) {
    SamplingParams sp;
    sp.temperature = t;
    sp.top_k = k;
    sp.top_p = p;
    sp.repetition_penalty = penalty;
    sp.seed = seed;
    return sp;
  };
  const std::vector<Row> rows = {
      {"greedy tie", params(0, 0, 1, 1, 1)},        {"greedy", params(0, 0, 1, 1, 2)},
      {"greedy penalty", params(0, 0, 1, 1.3f, 3)}, {"temperature", params(0.7f, 0, 1, 1, 4)},
      {"top-k", params(1.f, 20, 1, 1, 5)},          {"top-p", params(0.9f, 0, 0.8f, 1, 6)},
      {"all", params(0.8f, 50, 0.9f, 1.2f, 7)},
  };
  const int64_t n = int64_t(rows.size());
  for (int Vocab : {1000, 50000})
  s.run("sample", format("n=%lld V=%d greedy/penalty/temperature/top-k/top-p", (long long)n, Vocab), [&](Report& r) {
    F logits = s.rng.vec(n * Vocab, -3.f, 3.f);
    logits[17] = logits[300] = 10.f;  // row 0: two equal maxima, the lower id wins
    // Contexts whose ids include the row's largest logit, so the penalty changes the greedy choice.
    std::vector<I32> context(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; i++) {
      context[size_t(i)] = s.rng.ints(30, 0, Vocab);
      const float* row = &logits[size_t(i * Vocab)];
      context[size_t(i)].push_back(int32_t(std::max_element(row, row + Vocab) - row));
    }
    struct Result {
      I32 ids;
      std::vector<SamplerRng> rngs;
    };
    auto run = [&](Dev& d) -> Result {
      Result res;
      for (const Row& row : rows) res.rngs.emplace_back(row.params.seed);
      std::vector<SampleRow> srows(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; i++) srows[size_t(i)] = {rows[size_t(i)].params, &context[size_t(i)], &res.rngs[size_t(i)]};
      res.ids.assign(size_t(n), -1);
      d.be.sample(res.ids.data(), d.upload(logits, n, Vocab, DType::F32), srows.data());
      return res;
    };
    const Result c = run(*s.cpu);
    auto ids_of = [](const Result& res) { return V(res.ids.begin(), res.ids.end()); };
    // Whether each row's stream advanced by exactly the draws it should have taken (1 if sampled).
    auto draws_ok = [&](const Result& res, Report& rep) {
      for (int64_t i = 0; i < n; i++) {
        SamplerRng expect(rows[size_t(i)].params.seed);
        if (rows[size_t(i)].params.temperature > 0) expect.next();
        if (std::memcmp(expect.s, res.rngs[size_t(i)].s, sizeof expect.s) != 0)
          rep.problem(format("row %lld (%s): the random stream did not advance by exactly %d draw(s)", (long long)i,
                             rows[size_t(i)].what, rows[size_t(i)].params.temperature > 0 ? 1 : 0));
      }
    };
    for (int64_t i = 0; i < n; i++)
      if (c.ids[size_t(i)] < 0 || c.ids[size_t(i)] >= Vocab) r.problem(format("row %lld: id %d out of range", (long long)i, c.ids[size_t(i)]));
    if (s.oracle()) {
      draws_ok(c, r);
      // Greedy rows against a naive argmax (after the CTRL repetition penalty), lowest id on ties.
      V got, want;
      for (int64_t i = 0; i < n; i++) {
        const SamplingParams& sp = rows[size_t(i)].params;
        if (sp.temperature > 0) continue;
        F row(logits.begin() + i * Vocab, logits.begin() + (i + 1) * Vocab);
        if (sp.repetition_penalty != 1.f)
          for (int32_t id : std::set<int32_t>(context[size_t(i)].begin(), context[size_t(i)].end()))
            row[size_t(id)] = row[size_t(id)] < 0 ? row[size_t(id)] * sp.repetition_penalty : row[size_t(id)] / sp.repetition_penalty;
        got.push_back(c.ids[size_t(i)]);
        want.push_back(double(std::max_element(row.begin(), row.end()) - row.begin()));
      }
      r.compare("greedy ids", got, want, EXACT);
      // The sampled top-k row must pick one of the 20 largest logits.
      const float* row4 = &logits[size_t(4 * Vocab)];
      F sorted(row4, row4 + Vocab);
      std::nth_element(sorted.begin(), sorted.begin() + 19, sorted.end(), std::greater<float>());
      if (row4[c.ids[4]] < sorted[19]) r.problem("top-k row: sampled a token outside the top 20");
    } else {
      const Result t = run(*s.target);
      draws_ok(t, r);
      // Same logits, parameters and uniform draw: the same token (a float32 softmax boundary sitting
      // exactly on u would be a 1e-7 coincidence).
      r.compare("ids", ids_of(t), ids_of(c), EXACT);
    }
  });
}

// ---- memory and graphs (not ops, but everything above relies on them) ----

void test_memory(Session& s) {
  s.run("memory", "upload/copy/fill_zero/download 1000 B", [&](Report& r) {
    Dev& d = s.oracle() ? *s.cpu : *s.target;
    std::vector<uint8_t> bytes(1000);
    for (uint8_t& b : bytes) b = uint8_t(s.rng.integer(0, 255));  // never the poison byte
    void* a = d.alloc(bytes.size());
    void* b = d.alloc(bytes.size());
    d.be.upload(a, bytes.data(), bytes.size());
    d.be.copy(b, a, bytes.size());
    d.be.fill_zero(static_cast<char*>(b) + 100, 300);
    d.be.synchronize();
    std::vector<uint8_t> back(bytes.size() + GUARD_BYTES);
    d.be.download(back.data(), b, back.size());
    std::vector<uint8_t> want = bytes;
    std::fill(want.begin() + 100, want.begin() + 400, 0);
    want.resize(back.size(), POISON);
    int64_t wrong = 0;
    for (size_t i = 0; i < back.size(); i++) wrong += back[i] != want[i];
    if (wrong) r.problem(format("%lld bytes differ (guard included)", (long long)wrong));
    r.compare("bytes", V(back.begin(), back.end()), V(want.begin(), want.end()), EXACT);
  });
}

// A captured add, launched twice, must equal two eager adds. Backends without graphs have nothing to test.
void test_graph(Session& s) {
  Dev& d = s.oracle() ? *s.cpu : *s.target;
  if (!d.be.supports_graphs()) {
    std::printf("----  %-8s %-4s  %-21s not supported by this backend (steps run eagerly)\n", s.backend.c_str(),
                s.mode.c_str(), "graph");
    return;
  }
  s.run("graph", "capture add, launch twice", [&](Report& r) {
    const int64_t M = 4, H = 64;
    const F x = s.act_vec(s.rng.vec(M * H)), y = s.act_vec(s.rng.vec(M * H));
    Tensor tx = d.upload(x, M, H, d.act), ty = d.upload(y, M, H, d.act);
    d.be.graph_begin_capture();
    d.be.add(tx, ty);
    const int graph = d.be.graph_end_capture();
    d.be.graph_launch(graph);
    d.be.graph_launch(graph);
    const V got = d.read(tx, r, "x");
    d.be.graph_destroy(graph);
    Tensor ex = d.upload(x, M, H, d.act);
    d.be.add(ex, ty);
    d.be.add(ex, ty);
    r.compare("x", got, d.read(ex, r, "eager x"), EXACT);
  });
}

// ---- the op list --------------------------------------------------------------------------------------

struct OpTest {
  const char* name;  // the Backend method it tests (or "memory" / "graph")
  void (*run)(Session&);
};
const std::vector<OpTest>& op_tests() {
  static const std::vector<OpTest> tests = {
      {"memory", test_memory},
      {"embedding", test_embedding},
      {"rmsnorm_forward", test_rmsnorm_forward},
      {"rmsnorm_backward", test_rmsnorm_backward},
      {"rope", test_rope},
      {"swiglu_forward", test_swiglu_forward},
      {"swiglu_backward", test_swiglu_backward},
      {"add", test_add},
      {"linear_forward", test_linear_forward},
      {"linear_backward_input", test_linear_backward_input},
      {"matmul", test_matmul},
      {"lora_forward", test_lora_forward},
      {"lora_backward", test_lora_backward},
      {"attention_forward", test_attention_forward},
      {"attention_backward", test_attention_backward},
      {"kv_write", test_kv_write},
      {"attention_paged", test_attention_paged},
      {"gather_rows", test_gather_rows},
      {"scatter_rows", test_scatter_rows},
      {"cross_entropy", test_cross_entropy},
      {"sum_squares", test_sum_squares},
      {"adamw", test_adamw},
      {"sample", test_sample},
      {"graph", test_graph},
  };
  return tests;
}

// ---- timing mode ----------------------------------------------------------------------------------------

// Shapes of the timing mode. llama3-8b: Llama-3-8B's layer sizes, a training micro-batch of 2048 tokens,
// 16 decode rows over 2048 cached positions, rank-16 LoRA. small/tiny: the same ops scaled for a CPU or
// the emulator.
struct PerfShapes {
  const char* name;
  int H, I, NH, NKV, D, V, B, T, decode_rows, context, rank, chunk;
  int64_t params;  // optimizer elements (LoRA parameters)
};
const PerfShapes PERF_SHAPES[] = {
    {"tiny", 128, 384, 4, 2, 32, 2048, 1, 64, 4, 64, 8, 16, 1 << 16},
    {"small", 512, 1408, 8, 2, 64, 8192, 1, 128, 8, 256, 16, 64, 1 << 20},
    {"llama3-8b", 4096, 14336, 32, 8, 128, 128256, 1, 2048, 16, 2048, 16, 128, int64_t(20) << 20},
};

struct PerfRow {
  std::string backend, mode, op, shape;
  double us, rate;
  const char* unit;
};

class Perf {
 public:
  Perf(Session& s, Dev& d, const PerfShapes& sh, std::vector<PerfRow>& out) : s_(s), d_(d), sh_(sh), out_(out) {}

  // Device memory filled with a repeating random pattern (never zeros, never NaN), in chunks so the
  // largest tables need no host copy of their own size.
  Tensor random(int64_t rows, int64_t cols, DType dt, float lo = -1.f, float hi = 1.f) {
    Tensor t = ts::make_tensor(d_.alloc(size_t(rows * cols) * ts::dtype_size(dt)), dt, rows, cols, d_.be.device());
    const int64_t n = rows * cols, chunk = std::min<int64_t>(n, 1 << 20);
    if (pattern_.size() != size_t(chunk) || pattern_lo_ != lo || pattern_hi_ != hi) {
      pattern_ = s_.rng.vec(chunk, lo, hi);
      pattern_lo_ = lo;
      pattern_hi_ = hi;
    }
    for (int64_t at = 0; at < n; at += chunk) {
      const int64_t m = std::min(chunk, n - at);
      d_.write(static_cast<char*>(t.data) + size_t(at) * ts::dtype_size(dt), F(pattern_.begin(), pattern_.begin() + m), dt);
    }
    return t;
  }
  float* random_f32(int64_t n, float lo = -1.f, float hi = 1.f) { return random(1, n, DType::F32, lo, hi).f32(); }

  // Median time of fn over the repetitions after a warm-up; rate = bytes/s (GB/s) or flop/s (GFLOP/s).
  void time(const char* op, const std::string& shape, double bytes, double flops, const std::function<void()>& fn) {
    const bool slow = s_.backend != "cuda";
    const int warmup = slow ? 1 : 3, reps = slow ? 5 : 20;
    PerfRow row{s_.backend, s_.mode, op, shape, 0, 0, flops > 0 ? "GFLOP/s" : "GB/s"};
    try {
      for (int i = 0; i < warmup; i++) fn();
      d_.be.synchronize();
      std::vector<double> us;
      for (int i = 0; i < reps; i++) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        d_.be.synchronize();
        us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(us.begin(), us.end());
      row.us = us[us.size() / 2];
      row.rate = (flops > 0 ? flops : bytes) / (row.us * 1e-6) / 1e9;
      std::printf("PERF  %-8s %-4s  %-21s %-44s %12.1f us  %9.2f %s\n", row.backend.c_str(), row.mode.c_str(), op,
                  shape.c_str(), row.us, row.rate, row.unit);
    } catch (const std::exception& e) {
      row.us = NAN;
      std::printf("PERF  %-8s %-4s  %-21s %-44s threw: %s\n", row.backend.c_str(), row.mode.c_str(), op, shape.c_str(),
                  e.what());
    }
    std::fflush(stdout);
    out_.push_back(row);
  }

  void run_all(const std::set<std::string>& only);

 private:
  Session& s_;
  Dev& d_;
  const PerfShapes& sh_;
  std::vector<PerfRow>& out_;
  F pattern_;
  float pattern_lo_ = 0, pattern_hi_ = 0;
};

void Perf::run_all(const std::set<std::string>& only) {
  const PerfShapes& p = sh_;
  Backend& be = d_.be;
  const DType act = d_.act;
  const double es = double(ts::dtype_size(act));
  const int64_t M = int64_t(p.B) * p.T, QD = int64_t(p.NH) * p.D, KVD = int64_t(p.NKV) * p.D;
  auto want = [&](const char* op) { return only.empty() || only.count(op); };
  auto ids_of = [&](int64_t n, int hi) { return d_.array(s_.rng.ints(n, 0, hi)); };
  auto nf4_weight = [&](int out, int in) {
    const F w = s_.rng.vec(int64_t(out) * in, -0.05f, 0.05f);
    const NF4Matrix q = ts::nf4_quantize(w.data(), out, in);
    LinearView v;
    v.out = out;
    v.in = in;
    v.quantized = true;
    v.nf4 = q.view();
    v.nf4.codes = d_.array(q.codes);
    v.nf4.absmax_q = d_.array(q.absmax_q);
    v.nf4.absmax_scale = d_.array(q.absmax_scale);
    return v;
  };
  const std::string mh = format("M=%lld H=%d", (long long)M, p.H), mi = format("M=%lld I=%d", (long long)M, p.I);

  if (want("embedding")) {
    Tensor table = random(p.V, p.H, d_.wt), out = random(M, p.H, act);
    const int32_t* ids = ids_of(M, p.V);
    time("embedding", format("V=%d ", p.V) + mh, 2.0 * M * p.H * es, 0, [&] { be.embedding(out, ids, table); });
  }
  if (want("rmsnorm_forward") || want("rmsnorm_backward")) {
    Tensor x = random(M, p.H, act), w = random(1, p.H, d_.wt, 0.5f, 1.5f), out = random(M, p.H, act);
    float* rstd = random_f32(M, 0.5f, 1.5f);
    if (want("rmsnorm_forward"))
      time("rmsnorm_forward", mh, 2.0 * M * p.H * es, 0, [&] { be.rmsnorm_forward(out, rstd, x, w, 1e-5f); });
    Tensor dout = random(M, p.H, act), dx = random(M, p.H, act);
    if (want("rmsnorm_backward"))
      time("rmsnorm_backward", mh, 3.0 * M * p.H * es, 0, [&] { be.rmsnorm_backward(dx, dout, x, w, rstd, false); });
  }
  if (want("rope")) {
    F cos, sin;
    ts::rope_tables(rope_config(p.D), p.T, &cos, &sin);
    const RopeView view{p.D, p.T, d_.upload_f32(cos), d_.upload_f32(sin)};
    I32 pos(static_cast<size_t>(M));
    for (int64_t i = 0; i < M; i++) pos[size_t(i)] = int32_t(i % p.T);
    const int32_t* dpos = d_.array(pos);
    Tensor q = random(M, QD, act);
    time("rope", format("M=%lld NH=%d D=%d", (long long)M, p.NH, p.D), 2.0 * M * QD * es, 0,
         [&] { be.rope(q, dpos, view, p.NH, false); });
  }
  if (want("swiglu_forward") || want("swiglu_backward")) {
    Tensor g = random(M, p.I, act, -4, 4), u = random(M, p.I, act), out = random(M, p.I, act);
    if (want("swiglu_forward")) time("swiglu_forward", mi, 3.0 * M * p.I * es, 0, [&] { be.swiglu_forward(out, g, u); });
    Tensor dg = random(M, p.I, act), du = random(M, p.I, act);
    if (want("swiglu_backward"))
      time("swiglu_backward", mi, 5.0 * M * p.I * es, 0, [&] { be.swiglu_backward(dg, du, out, g, u); });
  }
  if (want("add")) {
    Tensor x = random(M, p.H, act, -1e-3f, 1e-3f), y = random(M, p.H, act, -1e-3f, 1e-3f);
    time("add", mh, 3.0 * M * p.H * es, 0, [&] { be.add(x, y); });
  }
  if (want("linear_forward") || want("linear_backward_input")) {
    const LinearView gate = nf4_weight(p.I, p.H);
    Tensor x = random(M, p.H, act), y = random(M, p.I, act), dx = random(M, p.H, act);
    if (want("linear_forward")) {
      time("linear_forward", format("nf4 gate M=%lld out=%d in=%d", (long long)M, p.I, p.H), 0, 2.0 * M * p.I * p.H,
           [&] { be.linear_forward(y, x, gate, 0.f); });
      Tensor xd = random(p.decode_rows, p.H, act), yd = random(p.decode_rows, p.I, act);
      // Decoding reads every weight once: the 4-bit codes and absmax bytes per second.
      time("linear_forward", format("nf4 gate decode M=%d", p.decode_rows), double(p.I) * p.H * (0.5 + 1.0 / 64), 0,
           [&] { be.linear_forward(yd, xd, gate, 0.f); });
      LinearView head;
      head.out = p.V;
      head.in = p.H;
      head.dense = random(p.V, p.H, d_.wt, -0.05f, 0.05f);
      Tensor xs = random(p.chunk, p.H, act), logits = random(p.chunk, p.V, DType::F32);
      time("linear_forward", format("dense lm_head M=%d V=%d", p.chunk, p.V), 0, 2.0 * p.chunk * p.V * p.H,
           [&] { be.linear_forward(logits, xs, head, 0.f); });
    }
    if (want("linear_backward_input"))
      time("linear_backward_input", format("nf4 gate M=%lld out=%d in=%d", (long long)M, p.I, p.H), 0,
           2.0 * M * p.I * p.H, [&] { be.linear_backward_input(dx, y, gate, 0.f); });
  }
  if (want("matmul")) {
    float* du = random_f32(M * p.rank);
    Tensor tdu = ts::make_tensor(du, DType::F32, M, p.rank, be.device());
    Tensor x = random(M, p.H, DType::F32), dA = random(p.rank, p.H, DType::F32);
    time("matmul", format("TN dA r=%d in=%d M=%lld", p.rank, p.H, (long long)M), 0, 2.0 * p.rank * p.H * M,
         [&] { be.matmul(dA, true, tdu, false, x, 1.f, 1.f); });
  }
  if (want("lora_forward") || want("lora_backward")) {
    LoraModuleView mv;
    mv.r = p.rank;
    mv.in = p.H;
    mv.out = p.I;
    mv.scaling = 2.f;
    mv.A = random_f32(int64_t(p.rank) * p.H, -0.02f, 0.02f);
    mv.B = random_f32(int64_t(p.I) * p.rank, -0.02f, 0.02f);
    Tensor x = random(M, p.H, act), y = random(M, p.I, act);
    LoraScratch sc;
    sc.u = random(M, p.rank, DType::F32);
    sc.du = random(M, p.rank, DType::F32);
    sc.dxd = random(M, p.H, DType::F32);
    LoraApply lora;
    lora.segments = {{0, M, mv}};
    lora.row_slot = d_.array(I32(size_t(M), 0));
    lora.slot_modules = d_.array(std::vector<LoraModuleView>{mv});
    lora.max_rank = p.rank;
    const std::string shape = format("M=%lld in=%d out=%d r=%d", (long long)M, p.H, p.I, p.rank);
    if (want("lora_forward"))
      time("lora_forward", shape, 0, 2.0 * M * p.rank * (p.H + p.I), [&] { be.lora_forward(y, x, lora, sc); });
    float* dA = random_f32(int64_t(p.rank) * p.H);
    float* dB = random_f32(int64_t(p.I) * p.rank);
    Tensor dx = random(M, p.H, act);
    if (want("lora_backward"))
      time("lora_backward", shape, 0, 2.0 * M * p.rank * (3.0 * p.H + 2.0 * p.I),
           [&] { be.lora_backward(dx, dA, dB, y, x, mv, LoraDropout{}, sc); });
  }
  if (want("attention_forward") || want("attention_backward")) {
    const AttentionShape shape{p.B, p.T, p.NH, p.NKV, p.D, nullptr};
    Tensor q = random(M, QD, act), k = random(M, KVD, act), v = random(M, KVD, act), out = random(M, QD, act);
    float* lse = random_f32(int64_t(p.B) * p.NH * p.T);
    const std::string label = format("B=%d T=%d NH=%d NKV=%d D=%d", p.B, p.T, p.NH, p.NKV, p.D);
    const double causal = double(p.B) * p.NH * double(p.T) * p.T * p.D;  // T²·D per head, halved by the mask, ×2 flops
    be.attention_forward(out, lse, q, k, v, shape);  // out and lse as the backward gets them
    if (want("attention_forward"))
      time("attention_forward", label, 0, 2.0 * causal, [&] { be.attention_forward(out, lse, q, k, v, shape); });
    Tensor dout = random(M, QD, act), dq = random(M, QD, act), dk = random(M, KVD, act), dv = random(M, KVD, act);
    if (want("attention_backward"))
      time("attention_backward", label, 0, 5.0 * causal,
           [&] { be.attention_backward(dq, dk, dv, dout, out, lse, q, k, v, shape); });
  }
  if (want("kv_write") || want("attention_paged")) {
    const int bs = 16, R = p.decode_rows, blocks_per = (p.context + bs - 1) / bs;
    const int64_t num_blocks = 1 + int64_t(R) * blocks_per;
    KVLayerView kv;
    kv.dtype = act;
    kv.block_size = bs;
    kv.num_blocks = num_blocks;
    kv.KVD = int(KVD);
    kv.k = random(num_blocks * bs, KVD, act).data;
    kv.v = random(num_blocks * bs, KVD, act).data;
    I32 tables, slot, row_seq, len;
    for (int r = 0; r < R; r++) {
      for (int b = 0; b < blocks_per; b++) tables.push_back(1 + r * blocks_per + b);
      slot.push_back((1 + r * blocks_per) * bs + (p.context - 1));
      row_seq.push_back(r);
      len.push_back(p.context);
    }
    const PagedRows rows{d_.array(slot), d_.array(row_seq), d_.array(tables), d_.array(len), blocks_per};
    Tensor k = random(R, KVD, act), v = random(R, KVD, act), q = random(R, QD, act), out = random(R, QD, act);
    if (want("kv_write"))
      time("kv_write", format("M=%d KVD=%lld", R, (long long)KVD), 4.0 * R * KVD * es, 0,
           [&] { be.kv_write(kv, k, v, rows.slot); });
    if (want("attention_paged"))
      time("attention_paged", format("M=%d context=%d NH=%d NKV=%d D=%d", R, p.context, p.NH, p.NKV, p.D),
           2.0 * R * p.context * KVD * es, 0, [&] { be.attention_paged(out, q, kv, rows, p.NH, p.NKV, p.D); });
  }
  if (want("gather_rows") || want("scatter_rows")) {
    Tensor all = random(M, p.H, act), some = random(p.chunk, p.H, act);
    const int32_t* index = d_.array(s_.rng.distinct(p.chunk, 0, int(M)));
    const std::string label = format("rows=%d of %lld H=%d", p.chunk, (long long)M, p.H);
    if (want("gather_rows"))
      time("gather_rows", label, 2.0 * p.chunk * p.H * es, 0, [&] { be.gather_rows(some, all, index); });
    if (want("scatter_rows"))
      time("scatter_rows", label, 2.0 * p.chunk * p.H * es, 0, [&] { be.scatter_rows(all, some, index); });
  }
  if (want("cross_entropy")) {
    Tensor logits = random(p.chunk, p.V, DType::F32, -4, 4);
    double* loss = static_cast<double*>(d_.alloc(sizeof(double)));
    be.fill_zero(loss, sizeof(double));
    const int32_t* targets = ids_of(p.chunk, p.V);
    time("cross_entropy", format("M=%d V=%d", p.chunk, p.V), 2.0 * p.chunk * p.V * 4, 0,
         [&] { be.cross_entropy(loss, logits, targets, 1e-3f); });
  }
  if (want("sum_squares") || want("adamw")) {
    float* pr = random_f32(p.params);
    float* g = random_f32(p.params, -1e-3f, 1e-3f);
    float* m = random_f32(p.params, -1e-3f, 1e-3f);
    float* v = random_f32(p.params, 0, 1e-6f);
    double* acc = static_cast<double*>(d_.alloc(sizeof(double)));
    be.fill_zero(acc, sizeof(double));
    const std::string label = format("n=%lld", (long long)p.params);
    if (want("sum_squares")) time("sum_squares", label, 4.0 * p.params, 0, [&] { be.sum_squares(acc, g, p.params); });
    AdamWStep st;
    st.step_size = 1e-4f;
    if (want("adamw")) time("adamw", label, 28.0 * p.params, 0, [&] { be.adamw(pr, g, m, v, p.params, st); });
  }
  if (want("sample")) {
    const int R = p.decode_rows;
    Tensor logits = random(R, p.V, DType::F32, -4, 4);
    std::vector<SamplerRng> rngs;
    for (int i = 0; i < R; i++) rngs.emplace_back(uint64_t(i));
    const I32 context = s_.rng.ints(64, 0, p.V);
    for (bool top_p : {false, true}) {
      std::vector<SampleRow> rows(static_cast<size_t>(R));
      for (int i = 0; i < R; i++) {
        rows[size_t(i)].params.temperature = top_p ? 0.8f : 0.f;
        rows[size_t(i)].params.top_p = top_p ? 0.9f : 1.f;
        rows[size_t(i)].params.repetition_penalty = 1.1f;
        rows[size_t(i)].context = &context;
        rows[size_t(i)].rng = &rngs[size_t(i)];
      }
      I32 ids(static_cast<size_t>(R));
      time("sample", format("M=%d V=%d %s", R, p.V, top_p ? "top-p 0.9" : "greedy"), double(R) * p.V * 4, 0,
           [&] { be.sample(ids.data(), logits, rows.data()); });
    }
  }
}

// ---- main -----------------------------------------------------------------------------------------------

// The backend scratch the op tests need (Backend::reserve_scratch; ops never allocate): the largest NF4
// weight dequantized for a product (130 x 320), float32 logits of up to 64 rows x 50000 (cross_entropy,
// the lm_head's float32 gradients, sampling), 16 sampled rows with their penalty contexts.
ts::ScratchPlan test_scratch_plan() {
  ts::ScratchPlan plan;
  plan.max_weight_elems = 130 * 320;
  plan.max_logit_rows = 64;
  plan.vocab = 50000;
  plan.max_sample_rows = 16;
  plan.max_context_ids = 1024;
  return plan;
}
ts::ScratchPlan perf_scratch_plan(const PerfShapes& p) {
  ts::ScratchPlan plan;
  plan.max_weight_elems = int64_t(p.I) * p.H;
  plan.max_logit_rows = std::max(p.chunk, p.decode_rows);
  plan.vocab = p.V;
  plan.max_sample_rows = p.decode_rows;
  plan.max_context_ids = int64_t(p.decode_rows) * 64;
  return plan;
}

const char* USAGE =
    "usage: test-backend-ops [--backend cpu|cuda|cuda-emu|all|cpu-self] [--mode f32|bf16|both]\n"
    "                        [--op NAME[,NAME...]] [--perf [--shapes tiny|small|llama3-8b]] [--seed N] [--list]\n"
    "  cpu       the CPU backend against double-precision references and finite differences\n"
    "  cuda      the CUDA backend against the CPU backend (a -DTS_CUDA=real build)\n"
    "  cuda-emu  the CUDA backend on the CPU emulator against the CPU backend (a -DTS_CUDA=emu build)\n"
    "  all       cpu and the CUDA variant this build has\n"
    "  cpu-self  the parity harness itself, with a second CPU backend as the target (every error is 0)\n";

// The CUDA variant this executable was built with (at most one).
std::vector<std::string> compiled_backends() {
  std::vector<std::string> b{"cpu"};
#if defined(TS_CUDA_EMU)
  b.push_back("cuda-emu");
#elif defined(TUNESERVE_WITH_CUDA)
  b.push_back("cuda");
#endif
  return b;
}

std::unique_ptr<Backend> make_cuda(bool float32_compute) {
#if defined(TUNESERVE_WITH_CUDA) || defined(TS_CUDA_EMU)
  ts::cuda::CudaBackendOptions options;
  options.float32_compute = float32_compute;
  return ts::cuda::make_cuda_backend(options);
#else
  (void)float32_compute;
  throw ts::EngineError("DEVICE_UNAVAILABLE", "built without a CUDA backend (configure with -DTS_CUDA=emu or real)");
#endif
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t comma = s.find(',', at);
    const std::string part = s.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    if (!part.empty()) out.push_back(part);
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return out;
}

void print_summary(const std::vector<Report>& reports, const std::vector<std::string>& unavailable) {
  std::printf("\n== summary\n%-8s %-4s  %-21s %5s %6s  %s\n", "backend", "mode", "op", "cases", "failed", "worst error/tolerance");
  std::vector<std::string> keys;
  std::map<std::string, std::vector<const Report*>> groups;
  for (const Report& r : reports) {
    const std::string key = r.backend + "\t" + r.mode + "\t" + r.op;
    if (!groups.count(key)) keys.push_back(key);
    groups[key].push_back(&r);
  }
  int failed = 0;
  for (const std::string& key : keys) {
    const auto& g = groups[key];
    int f = 0;
    double worst = 0;
    for (const Report* r : g) {
      f += !r->pass();
      for (const Report::Err& e : r->errs) worst = std::max(worst, e.ratio());
    }
    failed += f;
    std::printf("%-8s %-4s  %-21s %5zu %6d  %.2f%s\n", g[0]->backend.c_str(), g[0]->mode.c_str(), g[0]->op.c_str(),
                g.size(), f, worst, f ? "  FAIL" : "");
  }
  for (const std::string& u : unavailable) std::printf("UNAVAILABLE  %s\n", u.c_str());
  std::printf("== %zu cases, %d failed%s\n", reports.size(), failed,
              unavailable.empty() ? "" : ", and a requested backend could not start");
}

}  // namespace

int main(int argc, char** argv) {
  std::string backend = "cpu", mode = "both", shapes_name;
  std::set<std::string> only;
  bool perf = false, list = false;
  uint64_t seed = 1;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n%s", a.c_str(), USAGE);
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--backend") backend = value();
    else if (a == "--mode") mode = value();
    else if (a == "--op") for (const std::string& o : split(value())) only.insert(o);
    else if (a == "--perf") perf = true;
    else if (a == "--shapes") shapes_name = value();
    else if (a == "--seed") seed = std::strtoull(value().c_str(), nullptr, 10);
    else if (a == "--list") list = true;
    else if (a == "-h" || a == "--help") {
      std::printf("%s", USAGE);
      return 0;
    } else {
      std::fprintf(stderr, "unknown argument %s\n%s", a.c_str(), USAGE);
      return 2;
    }
  }
  const std::vector<std::string> compiled = compiled_backends();
  if (list) {
    std::printf("ops:");
    for (const OpTest& t : op_tests()) std::printf(" %s", t.name);
    std::printf("\nbackends in this build:");
    for (const std::string& b : compiled) std::printf(" %s", b.c_str());
    std::printf("\nmodes (CUDA): f32 bf16\nperf shapes:");
    for (const PerfShapes& p : PERF_SHAPES) std::printf(" %s", p.name);
    std::printf("\n");
    return 0;
  }
  if (backend != "cpu" && backend != "cuda" && backend != "cuda-emu" && backend != "all" && backend != "cpu-self") {
    std::fprintf(stderr, "unknown backend %s\n%s", backend.c_str(), USAGE);
    return 2;
  }
  if (mode != "f32" && mode != "bf16" && mode != "both") {
    std::fprintf(stderr, "unknown mode %s\n%s", mode.c_str(), USAGE);
    return 2;
  }
  for (const std::string& o : only) {
    bool known = false;
    for (const OpTest& t : op_tests()) known |= o == t.name;
    if (!known) {
      std::fprintf(stderr, "unknown op %s (--list shows them)\n", o.c_str());
      return 2;
    }
  }
  const PerfShapes* forced_shapes = nullptr;
  for (const PerfShapes& p : PERF_SHAPES)
    if (shapes_name == p.name) forced_shapes = &p;
  if (!shapes_name.empty() && !forced_shapes) {
    std::fprintf(stderr, "unknown shapes %s (--list shows them)\n", shapes_name.c_str());
    return 2;
  }

  const std::vector<std::string> backends = backend == "all" ? compiled : std::vector<std::string>{backend};
  const std::vector<std::string> modes = mode == "both" ? std::vector<std::string>{"f32", "bf16"} : std::vector<std::string>{mode};
  std::unique_ptr<Backend> cpu_backend = ts::cpu::make_cpu_backend();
  Dev cpu(*cpu_backend);
  std::printf("test-backend-ops: seed %llu, oracle %s\n", (unsigned long long)seed, cpu_backend->description().c_str());

  std::vector<Report> reports;
  std::vector<PerfRow> perf_rows;
  std::vector<std::string> unavailable;
  const auto start = std::chrono::steady_clock::now();
  for (const std::string& b : backends) {
    const bool is_cpu = b == "cpu", is_self = b == "cpu-self";
    for (const std::string& m : is_cpu || is_self ? std::vector<std::string>{"f32"} : modes) {
      const PerfShapes& shapes = forced_shapes ? *forced_shapes
                                 : b == "cuda"  ? PERF_SHAPES[2]
                                 : b == "cpu"   ? PERF_SHAPES[1]
                                                : PERF_SHAPES[0];
      const ts::ScratchPlan plan = perf ? perf_scratch_plan(shapes) : test_scratch_plan();
      cpu_backend->reserve_scratch(plan);
      std::unique_ptr<Backend> cuda_backend;
      std::unique_ptr<Dev> target;
      if (is_self) {
        cuda_backend = ts::cpu::make_cpu_backend();
        target = std::make_unique<Dev>(*cuda_backend);
        std::printf("== cpu-self: the parity harness with a second CPU backend as the target\n");
      } else if (!is_cpu) {
        const bool here = std::find(compiled.begin(), compiled.end(), b) != compiled.end();
        try {
          if (!here)
            throw ts::EngineError("DEVICE_UNAVAILABLE", "this build has no " + b + " backend (configure with -DTS_CUDA=" +
                                                            (b == "cuda" ? "real" : "emu") + ")");
          cuda_backend = make_cuda(m == "f32");
          cuda_backend->reserve_scratch(plan);
        } catch (const std::exception& e) {
          unavailable.push_back(b + " " + m + ": " + e.what());
          std::printf("UNAVAILABLE  %s %s: %s\n", b.c_str(), m.c_str(), e.what());
          continue;
        }
        target = std::make_unique<Dev>(*cuda_backend);
        std::printf("== %s %s: %s (compute %s, weights %s)\n", b.c_str(), m.c_str(), cuda_backend->description().c_str(),
                    ts::dtype_name(target->act), ts::dtype_name(target->wt));
      } else {
        std::printf("== cpu (the oracle) against double-precision references and finite differences\n");
      }
      Session s;
      s.backend = b;
      s.mode = m;
      s.cpu = &cpu;
      s.target = target.get();
      s.rng = Random(seed);
      s.reports = &reports;
      if (perf) {
        Dev& d = target ? *target : cpu;
        Perf p(s, d, shapes, perf_rows);
        try {
          p.run_all(only);
        } catch (const std::exception& e) {
          std::printf("PERF  %s %s: setup threw: %s\n", b.c_str(), m.c_str(), e.what());
        }
        d.reset();
        continue;
      }
      for (const OpTest& t : op_tests())
        if (only.empty() || only.count(t.name)) t.run(s);
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (perf) {
    std::printf("\n== timing (median of the repetitions, after a warm-up)\n");
    for (const PerfRow& r : perf_rows)
      std::printf("%-8s %-4s  %-21s %-44s %12.1f us  %9.2f %s\n", r.backend.c_str(), r.mode.c_str(), r.op.c_str(),
                  r.shape.c_str(), r.us, r.rate, r.unit);
    std::printf("== %.1f s\n", seconds);
    return unavailable.empty() ? 0 : 1;
  }
  print_summary(reports, unavailable);
  std::printf("== %.1f s\n", seconds);
  bool ok = unavailable.empty();
  for (const Report& r : reports) ok &= r.pass();
  return ok ? 0 : 1;
}
