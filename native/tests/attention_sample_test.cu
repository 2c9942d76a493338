// The CUDA attention kernels (paged inference attention, training forward/backward) and the CUDA
// sampler (native/cuda/attention.cu, sample.cu) against the CPU reference ops (cpu/ops.cpp,
// cpu/sampler.cpp) on seeded random inputs. Builds both ways (from the repository root):
//   g++ -std=c++17 -O1 -Wall -Wno-unknown-pragmas -DTS_CUDA_EMU -Inative -x c++
//       native/tests/attention_sample_test.cu native/cuda/attention.cu native/cuda/sample.cu
//       native/cuda/emu/cuda_emu.cpp native/cpu/ops.cpp native/cpu/sampler.cpp native/core/sampling.cpp
//       native/core/thread_pool.cpp native/core/backend.cpp native/core/dtype.cpp -lpthread
//       -o /tmp/attention_sample_test
//   nvcc -std=c++17 -O3 -Inative -gencode=arch=compute_90a,code=sm_90a native/tests/attention_sample_test.cu
//       native/cuda/attention.cu native/cuda/sample.cu native/cpu/ops.cpp native/cpu/sampler.cpp
//       native/core/sampling.cpp native/core/thread_pool.cpp native/core/backend.cpp native/core/dtype.cpp
//       -o /tmp/attention_sample_test
// Prints one line per check and exits 1 if any fails (about 25 s in the emulator on one core). On a GPU
// (the nvcc build) it then times the paged kernel on Llama-3-8B decode shapes, the training kernels
// and the sampler (median of repeated launches, CUDA events).
//
// Tolerances (err = max |gpu − cpu| / max |cpu| over the tensor; l2 = ‖gpu − cpu‖ / ‖cpu‖):
//   float32 activations: both sides compute in float32 and differ only in summation order and in exp
//     (exp2f of prescaled scores vs exp): a D-term dot product or an n-term softmax sum differs by
//     ~√n·2⁻²⁴ relative, a few 1e-7 to 5e-6 for the sizes here (measured); err <= 1e-5 keeps a 2–40×
//     margin and still fails on any indexing or masking error (those are 1e-2 and up).
//   bf16 activations: inputs are rounded to bf16 once and given to both sides, so the only new error
//     is the GPU rounding its float32 result to bf16: at most 2⁻⁸·|x| per element (bf16's unit
//     roundoff, 8 significant bits), plus the float32 difference above before that rounding. Every
//     element must satisfy |gpu − cpu| <= 2⁻⁸·|cpu| + 1e-5·max|cpu|; lse (float32 in both modes) the
//     float32 bound.
//   sampling: greedy must be exact; sampled tokens must be equal on every row where nudging u by ±1e-9
//     or top_p by one float ulp does not change the CPU's token (u·Σw within ~1e-12 of a boundary is
//     where float-vs-fixed-point summation may legitimately disagree; see cuda/sample.cu), and on the
//     "exact ties" rows (equal logits, dyadic u and top_p) always. The logits left in place must equal
//     the CPU's bit for bit (NaN where the CPU has NaN).
//   Every output buffer starts as NaN (all-ones bytes), so an element the kernel does not write fails.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "core/dtype.h"
#include "core/sampling.h"
#include "cpu/ops.h"
#include "cpu/sampler.h"
#include "cuda/ops.cuh"

namespace {

using ts::cuda::bf16;
using F = std::vector<float>;
using I32 = std::vector<int32_t>;

int failures = 0;

std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

void report(const std::string& name, bool ok, const std::string& detail) {
  std::printf("%s  %-58s %s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.c_str());
  std::fflush(stdout);
  if (!ok) failures++;
}

// Seeded inputs from the engine's generator (xoshiro256**), the same on every machine.
class Random {
 public:
  explicit Random(uint64_t seed) : rng_(seed) {}
  double uniform() { return rng_.uniform(); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(rng_.uniform()); }
  int integer(int lo, int hi) { return lo + int(rng_.uniform() * (hi - lo)); }  // [lo, hi)
  float normal() {  // Box-Muller
    const double a = 1.0 - rng_.uniform(), b = rng_.uniform();
    return float(std::sqrt(-2.0 * std::log(a)) * std::cos(6.283185307179586 * b));
  }
  F vec(int64_t n, float lo, float hi) {
    F v(static_cast<size_t>(n));
    for (float& x : v) x = uniform(lo, hi);
    return v;
  }

 private:
  ts::SamplerRng rng_;
};

// ---- device memory --------------------------------------------------------------------------------

template <typename T>
constexpr bool IS_BF16 = std::is_same<T, bf16>::value;

template <typename T>
const char* type_name() {
  return IS_BF16<T> ? "bf16" : "f32";
}

// The values of x as T holds them (bf16: rounded to nearest even), as floats.
template <typename T>
F representable(F x) {
  if (IS_BF16<T>)
    for (float& v : x) v = ts::bf16_to_f32(ts::f32_to_bf16(v));
  return x;
}

// A device array of T with the values of x (already representable in T).
template <typename T>
T* upload(const F& x) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(1, x.size()) * sizeof(T)));
  if (IS_BF16<T>) {
    std::vector<uint16_t> bits(x.size());  // (n)
    for (size_t i = 0; i < x.size(); i++) bits[i] = ts::f32_to_bf16(x[i]);
    CUDA_CHECK(cudaMemcpy(d, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
  } else {
    CUDA_CHECK(cudaMemcpy(d, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  return d;
}
template <typename T>
F download(const T* d, size_t n) {
  F out(n);
  if (IS_BF16<T>) {
    std::vector<uint16_t> bits(n);  // (n)
    CUDA_CHECK(cudaMemcpy(bits.data(), d, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) out[i] = ts::bf16_to_f32(bits[i]);
  } else {
    CUDA_CHECK(cudaMemcpy(out.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  }
  return out;
}
// Uninitialised output: all-ones bytes are NaN in float32 and bf16, -1 in int32.
template <typename T>
T* poisoned(size_t n) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(1, n) * sizeof(T)));
  CUDA_CHECK(cudaMemset(d, 0xff, std::max<size_t>(1, n) * sizeof(T)));
  return d;
}
I32 download_ints(const int32_t* d, size_t n) {
  I32 out(n);
  CUDA_CHECK(cudaMemcpy(out.data(), d, n * sizeof(int32_t), cudaMemcpyDeviceToHost));
  return out;
}
int32_t* upload_ints(const I32& x) {
  int32_t* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(1, x.size()) * sizeof(int32_t)));
  CUDA_CHECK(cudaMemcpy(d, x.data(), x.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  return d;
}

// ---- comparisons ----------------------------------------------------------------------------------

struct Comparison {
  double err = 0, l2 = 0;    // max |d| / max |ref|, ‖d‖ / ‖ref‖
  int64_t non_finite = 0;    // elements where either side is not finite (unwritten outputs are NaN)
  int64_t over_bf16 = 0;     // elements over the bf16 per-element bound
  bool ok = false;
  std::string detail() const {
    std::string s = fmt("err %.2e l2 %.2e", err, l2);
    if (non_finite) s += fmt(" non-finite %lld", (long long)non_finite);
    if (over_bf16) s += fmt(" over-bound %lld", (long long)over_bf16);
    return s;
  }
};

constexpr double F32_TOL = 1e-5;
constexpr double BF16_ROUNDING = 1.0 / 256;  // 2⁻⁸: bf16 unit roundoff (8 significant bits), relative

// bf16_output: `got` was rounded to bf16 by the kernel, so each element gets the rounding bound.
Comparison compare(const F& got, const F& ref, bool bf16_output) {
  Comparison c;
  double num = 0, den = 0, mx = 0, mref = 0;
  for (size_t i = 0; i < ref.size(); i++) {
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) {
      c.non_finite++;
      continue;
    }
    const double d = double(got[i]) - ref[i];
    num += d * d;
    den += double(ref[i]) * ref[i];
    mx = std::max(mx, std::fabs(d));
    mref = std::max(mref, std::fabs(double(ref[i])));
  }
  c.err = mref > 0 ? mx / mref : mx;
  c.l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  if (bf16_output) {
    for (size_t i = 0; i < ref.size(); i++) {
      if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) continue;
      const double bound = BF16_ROUNDING * std::fabs(double(ref[i])) + F32_TOL * mref;
      if (std::fabs(double(got[i]) - ref[i]) > bound) c.over_bf16++;
    }
    c.ok = c.non_finite == 0 && c.over_bf16 == 0;
  } else {
    c.ok = c.non_finite == 0 && c.err <= F32_TOL;
  }
  return c;
}

// ---- paged attention ------------------------------------------------------------------------------

struct PagedCase {
  const char* name;
  int NH, NKV, D, block_size;
  std::vector<int> seq_lens;  // tokens cached per sequence
  // rows: (sequence, len) pairs
  std::vector<std::pair<int, int>> rows;
};

template <typename T>
void check_paged(const PagedCase& pc, uint64_t seed) {
  Random rng(seed);
  const int NH = pc.NH, NKV = pc.NKV, D = pc.D, bs = pc.block_size, KVD = NKV * D;
  const int S = int(pc.seq_lens.size()), M = int(pc.rows.size());
  int max_blocks = 1, used_blocks = 0;
  for (int L : pc.seq_lens) {
    max_blocks = std::max(max_blocks, (L + bs - 1) / bs);
    used_blocks += (L + bs - 1) / bs;
  }
  const int num_blocks = used_blocks + 3;  // a few blocks no sequence owns
  // Block ids in a random order: tables are neither sorted nor contiguous.
  I32 perm(static_cast<size_t>(num_blocks));
  for (int i = 0; i < num_blocks; i++) perm[size_t(i)] = i;
  for (int i = num_blocks - 1; i > 0; i--) std::swap(perm[size_t(i)], perm[size_t(rng.integer(0, i + 1))]);
  I32 tables(size_t(S) * max_blocks, -1);  // (S, max_blocks)
  int next = 0;
  for (int s = 0; s < S; s++)
    for (int b = 0; b < (pc.seq_lens[size_t(s)] + bs - 1) / bs; b++)
      tables[size_t(s) * max_blocks + b] = perm[size_t(next++)];
  // Cache rows that hold a position of some sequence get values; every other row is NaN, so a read
  // outside the table or past a sequence's end poisons the output.
  const size_t cache_elems = size_t(num_blocks) * bs * KVD;
  F kc(cache_elems, NAN), vc(cache_elems, NAN);  // (num_blocks·block_size, KVD)
  for (int s = 0; s < S; s++) {
    for (int p = 0; p < pc.seq_lens[size_t(s)]; p++) {
      const size_t row = size_t(tables[size_t(s) * max_blocks + p / bs]) * bs + p % bs;
      for (int i = 0; i < KVD; i++) {
        kc[row * KVD + i] = rng.uniform(-2.f, 2.f);
        vc[row * KVD + i] = rng.uniform(-1.f, 1.f);
      }
    }
  }
  kc = representable<T>(kc);
  vc = representable<T>(vc);
  F q = rng.vec(int64_t(M) * NH * D, -2.f, 2.f);  // (M, NH·D)
  for (int h = 0; h < NH; h += 3)                 // sharper rows: the running max moves between chunks
    for (int d = 0; d < D; d++) q[size_t(h) * D + d] *= 4.f;
  q = representable<T>(q);
  I32 row_seq(static_cast<size_t>(M)), len(static_cast<size_t>(M));
  for (int m = 0; m < M; m++) {
    row_seq[size_t(m)] = pc.rows[size_t(m)].first;
    len[size_t(m)] = pc.rows[size_t(m)].second;
  }

  F ref(size_t(M) * NH * D);  // (M, NH·D)
  ts::KVLayerView host_kv{kc.data(), vc.data(), ts::DType::F32, bs, num_blocks, KVD};
  ts::PagedRows host_rows{nullptr, row_seq.data(), tables.data(), len.data(), max_blocks};
  ts::cpu::attention_paged(ref.data(), q.data(), host_kv, host_rows, M, NH, NKV, D);

  T* dk = upload<T>(kc);
  T* dvv = upload<T>(vc);
  T* dq = upload<T>(q);
  T* dout = poisoned<T>(ref.size());
  int32_t* d_tables = upload_ints(tables);
  int32_t* d_row_seq = upload_ints(row_seq);
  int32_t* d_len = upload_ints(len);
  ts::KVLayerView kv{dk, dvv, IS_BF16<T> ? ts::DType::BF16 : ts::DType::F32, bs, num_blocks, KVD};
  ts::PagedRows rows{nullptr, d_row_seq, d_tables, d_len, max_blocks};
  ts::cuda::attention_paged(dout, dq, kv, rows, M, NH, NKV, D, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const Comparison c = compare(download(dout, ref.size()), ref, IS_BF16<T>);
  report(fmt("paged %s %s", type_name<T>(), pc.name), c.ok, c.detail());
  for (void* p : {static_cast<void*>(dk), static_cast<void*>(dvv), static_cast<void*>(dq), static_cast<void*>(dout),
                  static_cast<void*>(d_tables), static_cast<void*>(d_row_seq), static_cast<void*>(d_len)})
    CUDA_CHECK(cudaFree(p));
}

std::vector<PagedCase> paged_cases() {
  std::vector<PagedCase> cases;
  // Decode: one row per sequence at its full length (1, not a block multiple, several chunks, 0).
  cases.push_back(
      {"decode D128 G4 bs16 len 1/333/1000/0", 8, 2, 128, 16, {1, 333, 1000}, {{0, 1}, {1, 333}, {2, 1000}, {1, 0}}});
  cases.push_back({"decode D64 G1 bs16 len 17/250", 4, 4, 64, 16, {17, 250}, {{0, 17}, {1, 250}}});
  cases.push_back({"decode D128 G2 bs32 len 100/517", 4, 2, 128, 32, {100, 517}, {{1, 517}, {0, 100}}});
  cases.push_back({"decode D64 G8 bs16 len 129", 8, 1, 64, 16, {129}, {{0, 129}}});
  cases.push_back({"decode D128 G4 bs16 len 5001 (8B heads)", 32, 8, 128, 16, {5001}, {{0, 5001}}});
  // Prefill: rows of one sequence at positions 0..47 (len p + 1), then decode rows of another.
  {
    PagedCase pc{"prefill D128 G8 bs16 48 rows + 2 decode", 8, 1, 128, 16, {48, 300}, {}};
    for (int p = 0; p < 48; p++) pc.rows.push_back({0, p + 1});
    pc.rows.push_back({1, 70});
    pc.rows.push_back({1, 300});
    cases.push_back(pc);
  }
  {
    PagedCase pc{"prefill D64 G2 bs8 40 rows from 100", 4, 2, 64, 8, {140}, {}};
    for (int p = 100; p < 140; p++) pc.rows.push_back({0, p + 1});
    cases.push_back(pc);
  }
  // The generic kernel: a head dim outside {64, 128}, and a G outside {1, 2, 4, 8}.
  cases.push_back({"generic D96 G3 bs16 len 50/200", 6, 2, 96, 16, {50, 200}, {{0, 50}, {1, 200}}});
  cases.push_back({"generic D128 G3 bs16 len 90", 12, 4, 128, 16, {90}, {{0, 90}}});
  cases.push_back({"generic D2 G1 bs4 len 33", 2, 2, 2, 4, {33}, {{0, 33}}});
  return cases;
}

// ---- training attention ---------------------------------------------------------------------------

struct TrainCase {
  const char* name;
  int B, T, NH, NKV, D;
  std::vector<int> docs;  // document lengths packed into each sequence, repeated; empty: no doc_start
};

template <typename T>
void check_training(const TrainCase& tc, uint64_t seed) {
  Random rng(seed);
  const int B = tc.B, seq_len = tc.T, NH = tc.NH, NKV = tc.NKV, D = tc.D;
  const int64_t rows = int64_t(B) * seq_len, QD = int64_t(NH) * D, KVD = int64_t(NKV) * D;
  I32 doc_start;
  if (!tc.docs.empty()) {
    doc_start.resize(size_t(rows));
    for (int b = 0; b < B; b++) {
      int start = 0, doc = int(b % tc.docs.size()), left = tc.docs[size_t(doc)];
      for (int t = 0; t < seq_len; t++) {
        if (left == 0) {
          start = t;
          doc = (doc + 1) % int(tc.docs.size());
          left = tc.docs[size_t(doc)];
        }
        doc_start[size_t(b) * seq_len + t] = start;
        left--;
      }
    }
  }
  F q = rng.vec(rows * QD, -2.f, 2.f), k = rng.vec(rows * KVD, -2.f, 2.f), v = rng.vec(rows * KVD, -1.f, 1.f);
  for (int64_t r = 0; r < rows; r += 7)  // sharper rows: the running max moves between key tiles
    for (int64_t i = 0; i < QD; i++) q[size_t(r * QD + i)] *= 4.f;
  q = representable<T>(q);
  k = representable<T>(k);
  v = representable<T>(v);
  const F dout = representable<T>(rng.vec(rows * QD, -1.f, 1.f));

  ts::AttentionShape host_shape{B, seq_len, NH, NKV, D, doc_start.empty() ? nullptr : doc_start.data()};
  F out_ref(static_cast<size_t>(rows * QD)), lse_ref(size_t(B) * NH * seq_len);
  ts::cpu::attention_forward(out_ref.data(), lse_ref.data(), q.data(), k.data(), v.data(), host_shape);

  T* d_q = upload<T>(q);
  T* d_k = upload<T>(k);
  T* d_v = upload<T>(v);
  int32_t* d_doc = doc_start.empty() ? nullptr : upload_ints(doc_start);
  ts::AttentionShape shape{B, seq_len, NH, NKV, D, d_doc};
  T* d_out = poisoned<T>(out_ref.size());
  float* d_lse = poisoned<float>(lse_ref.size());
  ts::cuda::attention_forward(d_out, d_lse, d_q, d_k, d_v, shape, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const Comparison co = compare(download(d_out, out_ref.size()), out_ref, IS_BF16<T>);
  const Comparison cl = compare(download(d_lse, lse_ref.size()), lse_ref, false);
  report(fmt("forward %s %s: out", type_name<T>(), tc.name), co.ok, co.detail());
  report(fmt("forward %s %s: lse", type_name<T>(), tc.name), cl.ok, cl.detail());

  // The backward gets the same forward results on both sides: the CPU's out as T holds it, its lse.
  const F out_t = representable<T>(out_ref);
  F dq_ref(static_cast<size_t>(rows * QD)), dk_ref(static_cast<size_t>(rows * KVD)),
      dv_ref(static_cast<size_t>(rows * KVD));
  ts::cpu::attention_backward(dq_ref.data(), dk_ref.data(), dv_ref.data(), dout.data(), out_t.data(), lse_ref.data(),
                              q.data(), k.data(), v.data(), host_shape);
  T* d_dout = upload<T>(dout);
  T* d_out_t = upload<T>(out_t);
  float* d_lse_ref = upload<float>(lse_ref);
  T* d_dq = poisoned<T>(dq_ref.size());
  T* d_dk = poisoned<T>(dk_ref.size());
  T* d_dv = poisoned<T>(dv_ref.size());
  ts::cuda::attention_backward(d_dq, d_dk, d_dv, d_dout, d_out_t, d_lse_ref, d_q, d_k, d_v, shape, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const Comparison cq = compare(download(d_dq, dq_ref.size()), dq_ref, IS_BF16<T>);
  const Comparison ck = compare(download(d_dk, dk_ref.size()), dk_ref, IS_BF16<T>);
  const Comparison cv = compare(download(d_dv, dv_ref.size()), dv_ref, IS_BF16<T>);
  report(fmt("backward %s %s: dq", type_name<T>(), tc.name), cq.ok, cq.detail());
  report(fmt("backward %s %s: dk", type_name<T>(), tc.name), ck.ok, ck.detail());
  report(fmt("backward %s %s: dv", type_name<T>(), tc.name), cv.ok, cv.detail());
  for (void* p : {static_cast<void*>(d_q), static_cast<void*>(d_k), static_cast<void*>(d_v), static_cast<void*>(d_doc),
                  static_cast<void*>(d_out), static_cast<void*>(d_lse), static_cast<void*>(d_dout),
                  static_cast<void*>(d_out_t), static_cast<void*>(d_lse_ref), static_cast<void*>(d_dq),
                  static_cast<void*>(d_dk), static_cast<void*>(d_dv)})
    CUDA_CHECK(cudaFree(p));
}

std::vector<TrainCase> training_cases() {
  return {
      {"B2 T100 G2 D64 causal", 2, 100, 4, 2, 64, {}},
      {"B1 T130 G4 D128 docs 40/1/60/29", 1, 130, 4, 1, 128, {40, 1, 60, 29}},
      {"B2 T77 G1 D128 docs 33/20", 2, 77, 2, 2, 128, {33, 20}},
      {"B1 T97 G2 D64 docs 70/27", 1, 97, 2, 1, 64, {70, 27}},
      {"B1 T300 G4 D128 docs 150/7/143", 1, 300, 8, 2, 128, {150, 7, 143}},
      {"generic B1 T50 G2 D96 docs 31/19", 1, 50, 4, 2, 96, {31, 19}},
      {"generic B2 T20 G1 D2 causal", 2, 20, 2, 2, 2, {}},
  };
}

// ---- sampling -------------------------------------------------------------------------------------

struct SampleCase {
  F logits;  // (V)
  ts::SamplingParams params;
  I32 context;
  double u = 0;
  std::string kind;
  // Every weight and sum exact on both sides (equal logits): ties at the nucleus and draw boundaries
  // are then defined, and the row is compared even where a nudge would move the CPU's token.
  bool exact = false;
};

// A row of logits of one of several shapes, with random sampling parameters.
SampleCase random_sample_case(Random& rng, int V, int kind) {
  SampleCase c;
  c.logits.resize(size_t(V));
  const float sigma = std::vector<float>{1.f, 3.f, 8.f}[size_t(rng.integer(0, 3))];
  switch (kind) {
    case 0:
      c.kind = "normal";
      for (float& x : c.logits) x = sigma * rng.normal();
      break;
    case 1:  // many exact ties
      c.kind = "ties";
      for (float& x : c.logits) x = std::round(2.f * rng.normal()) / 2.f;
      break;
    case 2:  // a few dominant tokens
      c.kind = "peaked";
      for (float& x : c.logits) x = rng.normal();
      for (int i = 0; i < 3; i++) c.logits[size_t(rng.integer(0, V))] = 12.f + rng.uniform(0.f, 3.f);
      break;
    case 3:  // NaN and -inf among normal values
      c.kind = "nan/-inf";
      for (float& x : c.logits) {
        const double r = rng.uniform();
        x = r < 0.05 ? NAN : r < 0.1 ? -INFINITY : sigma * rng.normal();
      }
      break;
    case 4:  // all -inf but one
      c.kind = "one finite";
      std::fill(c.logits.begin(), c.logits.end(), -INFINITY);
      c.logits[size_t(rng.integer(0, V))] = rng.normal();
      break;
    case 5:  // nothing finite
      c.kind = "none finite";
      for (float& x : c.logits) x = rng.uniform() < 0.5 ? NAN : -INFINITY;
      break;
    default:  // all equal, +0 and -0 mixed (equal values: ranked by id)
      c.kind = "all equal";
      for (float& x : c.logits) x = rng.uniform() < 0.5 ? 0.f : -0.f;
      break;
  }
  const float temperatures[] = {0.f, 0.f, 0.7f, 1.f, 1.3f};
  const int top_ks[] = {0, 0, 1, 5, 50, V, V + 3};
  const float top_ps[] = {1.f, 1.f, 0.9f, 0.5f, 0.95f, 1e-7f, 0.f};
  const float penalties[] = {1.f, 1.f, 1.3f, 0.8f};
  c.params.temperature = temperatures[rng.integer(0, 5)];
  c.params.top_k = top_ks[rng.integer(0, 7)];
  c.params.top_p = top_ps[rng.integer(0, 7)];
  c.params.repetition_penalty = penalties[rng.integer(0, 4)];
  const int context_len = rng.integer(0, 40);
  for (int i = 0; i < context_len; i++) c.context.push_back(rng.integer(0, std::min(V, 60)));  // duplicates likely
  c.u = rng.uniform();
  return c;
}

int cpu_sample(const SampleCase& c, F* logits_after, double u, float top_p) {
  F x = c.logits;
  ts::SamplingParams p = c.params;
  p.top_p = top_p;
  const int token = ts::cpu::sample_token(x.data(), int(x.size()), p, c.context, ts::cpu::UniformSource{nullptr, u});
  if (logits_after) *logits_after = x;
  return token;
}

bool same_bits_or_both_nan(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return ua == ub;
}

struct SampleStats {
  int greedy = 0, greedy_wrong = 0, sampled = 0, sampled_wrong = 0, boundary = 0, boundary_equal = 0, logits_wrong = 0;
  std::string first_problem;
};

// Samples every case on the GPU in one launch (all rows share V) and compares with the CPU sampler.
void run_sample_cases(const std::vector<SampleCase>& cases, SampleStats& st) {
  const int n = int(cases.size()), V = int(cases[0].logits.size());
  F all(size_t(n) * V);
  I32 context;
  std::vector<ts::cuda::DeviceSampleRow> rows(static_cast<size_t>(n));
  for (int i = 0; i < n; i++) {
    const SampleCase& c = cases[size_t(i)];
    std::copy(c.logits.begin(), c.logits.end(), all.begin() + int64_t(i) * V);
    ts::cuda::DeviceSampleRow& r = rows[size_t(i)];
    r.temperature = c.params.temperature;
    r.top_k = c.params.top_k;
    r.top_p = c.params.top_p;
    r.repetition_penalty = c.params.repetition_penalty;
    r.u = c.u;
    r.context_begin = int64_t(context.size());
    context.insert(context.end(), c.context.begin(), c.context.end());
    r.context_end = int64_t(context.size());
  }
  float* d_logits = upload<float>(all);
  int32_t* d_context = upload_ints(context);
  ts::cuda::DeviceSampleRow* d_rows = nullptr;
  CUDA_CHECK(cudaMalloc(&d_rows, rows.size() * sizeof(ts::cuda::DeviceSampleRow)));
  CUDA_CHECK(cudaMemcpy(d_rows, rows.data(), rows.size() * sizeof(ts::cuda::DeviceSampleRow), cudaMemcpyHostToDevice));
  int32_t* d_ids = poisoned<int32_t>(size_t(n));
  const size_t scratch_bytes = ts::cuda::sample_scratch_bytes(n, V);
  void* d_scratch = poisoned<unsigned char>(scratch_bytes);
  ts::cuda::sample_rows(d_ids, d_logits, d_rows, d_context, n, V, d_scratch, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const I32 ids = download_ints(d_ids, size_t(n));
  const F after = download(d_logits, all.size());

  for (int i = 0; i < n; i++) {
    const SampleCase& c = cases[size_t(i)];
    F cpu_after;
    const int want = cpu_sample(c, &cpu_after, c.u, c.params.top_p);
    const int got = ids[size_t(i)];
    for (int j = 0; j < V; j++) {
      if (!same_bits_or_both_nan(after[size_t(i) * V + j], cpu_after[size_t(j)])) {
        st.logits_wrong++;
        if (st.first_problem.empty())
          st.first_problem = fmt("row %d (%s): logit %d is %g, CPU %g", i, c.kind.c_str(), j,
                                 double(after[size_t(i) * V + j]), double(cpu_after[size_t(j)]));
        break;
      }
    }
    const bool greedy = !(c.params.temperature > 0.f);
    if (greedy) {
      st.greedy++;
      if (got != want) {
        st.greedy_wrong++;
        if (st.first_problem.empty())
          st.first_problem = fmt("greedy row %d (%s): token %d, CPU %d", i, c.kind.c_str(), got, want);
      }
      continue;
    }
    // A row whose CPU token moves when u moves by 1e-9 or top_p by one ulp sits on a boundary.
    const double eps = 1e-9;
    const bool boundary =
        cpu_sample(c, nullptr, std::max(0.0, c.u - eps), c.params.top_p) != want ||
        cpu_sample(c, nullptr, std::min(c.u + eps, 1.0 - 0x1.0p-53), c.params.top_p) != want ||
        (c.params.top_p < 1.f && (cpu_sample(c, nullptr, c.u, std::nextafter(c.params.top_p, 0.f)) != want ||
                                  cpu_sample(c, nullptr, c.u, std::nextafter(c.params.top_p, 1.f)) != want));
    if (boundary && !c.exact) {
      st.boundary++;
      st.boundary_equal += got == want;
      continue;
    }
    st.sampled++;
    if (got != want) {
      st.sampled_wrong++;
      if (st.first_problem.empty())
        st.first_problem = fmt("sampled row %d (%s, t %g k %d p %g rp %g u %.17g): token %d, CPU %d", i, c.kind.c_str(),
                               double(c.params.temperature), c.params.top_k, double(c.params.top_p),
                               double(c.params.repetition_penalty), c.u, got, want);
    }
  }
  for (void* p : {static_cast<void*>(d_logits), static_cast<void*>(d_context), static_cast<void*>(d_rows),
                  static_cast<void*>(d_ids), d_scratch})
    CUDA_CHECK(cudaFree(p));
}

void report_samples(const std::string& name, const SampleStats& st) {
  const bool ok = st.greedy_wrong == 0 && st.sampled_wrong == 0 && st.logits_wrong == 0 && st.greedy + st.sampled > 0;
  report(name, ok,
         fmt("greedy %d/%d, sampled %d/%d equal; %d boundary rows not compared (%d equal anyway); %d rows with "
             "other logits%s%s",
             st.greedy - st.greedy_wrong, st.greedy, st.sampled - st.sampled_wrong, st.sampled, st.boundary,
             st.boundary_equal, st.logits_wrong, st.first_problem.empty() ? "" : "; first: ",
             st.first_problem.c_str()));
}

void check_sampling_random(int V, int rows, uint64_t seed, const char* name) {
  Random rng(seed);
  std::vector<SampleCase> cases;
  for (int i = 0; i < rows; i++) cases.push_back(random_sample_case(rng, V, i % 7));
  SampleStats st;
  run_sample_cases(cases, st);
  report_samples(name, st);
}

// Hand-picked edge cases on one vocabulary.
void check_sampling_edges() {
  const int V = 3001;
  Random rng(77);
  std::vector<SampleCase> cases, exact;
  auto base = [&](float t, int k, float p, float penalty, double u) {
    SampleCase c;
    c.logits.resize(size_t(V));
    for (float& x : c.logits) x = 2.f * rng.normal();
    c.params.temperature = t;
    c.params.top_k = k;
    c.params.top_p = p;
    c.params.repetition_penalty = penalty;
    c.u = u;
    c.kind = "edge";
    return c;
  };
  for (double u : {0.0, 0.25, 0.5, 0.999, 1.0 - 0x1.0p-53}) {
    cases.push_back(base(1.f, 1, 1.f, 1.f, u));          // k = 1: the top token
    cases.push_back(base(1.f, V, 1.f, 1.f, u));          // k = V: off
    cases.push_back(base(1.f, V + 10, 0.9f, 1.f, u));    // k > V: off
    cases.push_back(base(0.8f, 0, 1e-9f, 1.f, u));       // tiny top_p: the top token only
    cases.push_back(base(0.8f, 0, 0.f, 1.f, u));         // top_p 0: the top token only
    cases.push_back(base(1.2f, 40, 0.7f, 1.f, u));       // top-k then top-p
    cases.push_back(base(1.f, 0, 0.999f, 1.f, u));       // a nucleus of most of the vocabulary
    cases.push_back(base(1.f, 2000, 1.f, 1.f, u));       // a large top-k
  }
  {  // k = 1 with the maximum tied: every tied token stays, drawn in id order
    for (double u : {0.1, 0.6, 0.95}) {
      SampleCase c = base(1.f, 1, 1.f, 1.f, u);
      c.logits[10] = c.logits[700] = c.logits[2999] = 50.f;
      cases.push_back(c);
    }
  }
  {  // top-k boundary value tied across many tokens
    SampleCase c = base(1.f, 3, 1.f, 1.f, 0.7);
    for (float& x : c.logits) x = std::min(x, 1.f);
    cases.push_back(c);
  }
  {  // greedy: ties at the max resolve to the lowest id; NaN never wins
    SampleCase c = base(0.f, 0, 1.f, 1.f, 0.3);
    c.logits[5] = NAN;
    c.logits[100] = c.logits[90] = 30.f;
    cases.push_back(c);
    SampleCase d = base(0.f, 0, 1.f, 1.f, 0.3);
    for (float& x : d.logits) x = NAN;
    cases.push_back(d);  // all NaN: token 0
    SampleCase e = base(-1.f, 0, 1.f, 1.3f, 0.3);  // negative temperature: greedy, after the penalty
    e.context = {3, 3, 3, 4, 4, 2999};
    e.logits[3] = 40.f;
    e.logits[4] = -40.f;
    e.logits[2999] = 39.f;
    cases.push_back(e);
  }
  {  // repetition penalty with repeated ids, positive and negative logits, sampled
    SampleCase c = base(1.f, 0, 1.f, 1.5f, 0.42);
    c.context = {0, 0, 1, 1, 1, 7, 2000, 7, 2000, 3000};
    c.logits[0] = 5.f;
    c.logits[1] = -5.f;
    cases.push_back(c);
  }
  {  // all -inf but one, sampled with every filter
    SampleCase c = base(0.9f, 10, 0.5f, 1.f, 0.77);
    std::fill(c.logits.begin(), c.logits.end(), -INFINITY);
    c.logits[1234] = -3.f;
    cases.push_back(c);
  }
  {  // NaN logits while sampling: replaced by -inf
    SampleCase c = base(1.f, 0, 0.9f, 1.f, 0.66);
    for (int i = 0; i < V; i += 3) c.logits[size_t(i)] = NAN;
    cases.push_back(c);
  }
  // Exact ties: 1000 equal weights (every sum an integer on both sides), so top_p·Z and u·Z land exactly
  // on cumulative boundaries: a token is kept iff the weight before it is < top_p·Z, drawn iff the
  // weight through it is > u·Z.
  // u is dyadic so that the CPU's double u·Z is exact too (0.999·Z would round).
  for (float top_p : {0.5f, 0.25f, 0.999f, 1.f}) {
    for (double u : {0.0, 0.25, 0.5, 1023.0 / 1024}) {
      for (int half : {0, 1}) {  // all tokens, or the even ids only (odd ids -inf)
        SampleCase c = base(1.f, 0, top_p, 1.f, u);
        c.logits.assign(1000, 0.f);
        if (half)
          for (size_t i = 1; i < c.logits.size(); i += 2) c.logits[i] = -INFINITY;
        c.kind = "exact ties";
        c.exact = true;
        exact.push_back(c);
      }
    }
  }
  SampleStats st;
  run_sample_cases(cases, st);
  run_sample_cases(exact, st);
  report_samples("sample edges (k=1, k>=V, tiny top_p, ties, NaN, -inf)", st);
}

// ---- timing (GPU only) ------------------------------------------------------------------------------

#ifndef TS_CUDA_EMU
template <typename Launch>
double median_us(Launch launch, int reps) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; i++) launch();
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> times;
  for (int i = 0; i < reps; i++) {
    CUDA_CHECK(cudaEventRecord(start));
    launch();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1e3);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Llama-3-8B decode: NH 32, NKV 8, D 128, bf16 cache of block size 16, `rows` sequences of `len` tokens.
void time_paged(int rows_n, int len) {
  const int NH = 32, NKV = 8, D = 128, bs = 16, KVD = NKV * D;
  const int blocks_per_seq = (len + bs - 1) / bs, num_blocks = rows_n * blocks_per_seq;
  Random rng(5);
  I32 tables(static_cast<size_t>(rows_n) * blocks_per_seq), row_seq(static_cast<size_t>(rows_n)),
      lens(static_cast<size_t>(rows_n), len);
  for (size_t i = 0; i < tables.size(); i++) tables[i] = int32_t(i);
  for (size_t i = tables.size() - 1; i > 0; i--) std::swap(tables[i], tables[size_t(rng.integer(0, int(i) + 1))]);
  for (int m = 0; m < rows_n; m++) row_seq[size_t(m)] = m;
  const F cache = representable<bf16>(rng.vec(int64_t(num_blocks) * bs * KVD, -1.f, 1.f));
  bf16* dk = upload<bf16>(cache);
  bf16* dv = upload<bf16>(cache);
  bf16* dq = upload<bf16>(representable<bf16>(rng.vec(int64_t(rows_n) * NH * D, -1.f, 1.f)));
  bf16* dout = poisoned<bf16>(size_t(rows_n) * NH * D);
  int32_t* d_tables = upload_ints(tables);
  int32_t* d_row_seq = upload_ints(row_seq);
  int32_t* d_len = upload_ints(lens);
  ts::KVLayerView kv{dk, dv, ts::DType::BF16, bs, num_blocks, KVD};
  ts::PagedRows rows{nullptr, d_row_seq, d_tables, d_len, blocks_per_seq};
  const double us = median_us([&] { ts::cuda::attention_paged(dout, dq, kv, rows, rows_n, NH, NKV, D, nullptr); }, 50);
  const double bytes = double(rows_n) * len * KVD * 2 /*K and V*/ * 2 /*bf16*/;
  std::printf("time  paged decode bf16 %d row(s) x %d positions, NH 32 NKV 8 D 128: %.1f us, %.0f GB/s of K+V\n",
              rows_n, len, us, bytes / us * 1e-3);
  for (void* p : {static_cast<void*>(dk), static_cast<void*>(dv), static_cast<void*>(dq), static_cast<void*>(dout),
                  static_cast<void*>(d_tables), static_cast<void*>(d_row_seq), static_cast<void*>(d_len)})
    CUDA_CHECK(cudaFree(p));
}

void time_training(int B, int seq_len, int NH, int NKV, int D) {
  const int64_t rows = int64_t(B) * seq_len, QD = int64_t(NH) * D, KVD = int64_t(NKV) * D;
  Random rng(6);
  bf16* q = upload<bf16>(representable<bf16>(rng.vec(rows * QD, -1.f, 1.f)));
  bf16* k = upload<bf16>(representable<bf16>(rng.vec(rows * KVD, -1.f, 1.f)));
  bf16* v = upload<bf16>(representable<bf16>(rng.vec(rows * KVD, -1.f, 1.f)));
  bf16* dout = upload<bf16>(representable<bf16>(rng.vec(rows * QD, -1.f, 1.f)));
  bf16* out = poisoned<bf16>(size_t(rows * QD));
  float* lse = poisoned<float>(size_t(B) * NH * seq_len);
  bf16* dq = poisoned<bf16>(size_t(rows * QD));
  bf16* dk = poisoned<bf16>(size_t(rows * KVD));
  bf16* dv = poisoned<bf16>(size_t(rows * KVD));
  ts::AttentionShape s{B, seq_len, NH, NKV, D, nullptr};
  const double fwd = median_us([&] { ts::cuda::attention_forward(out, lse, q, k, v, s, nullptr); }, 10);
  const double bwd =
      median_us([&] { ts::cuda::attention_backward(dq, dk, dv, dout, out, lse, q, k, v, s, nullptr); }, 10);
  const double flops = 4.0 * B * NH * (double(seq_len) * (seq_len + 1) / 2) * D;  // QKᵀ and PV, causal half
  std::printf("time  training attention bf16 B %d T %d NH %d NKV %d D %d: forward %.0f us (%.1f TFLOP/s), "
              "backward %.0f us (%.1f TFLOP/s at 2.5x the forward's FLOPs)\n",
              B, seq_len, NH, NKV, D, fwd, flops / fwd * 1e-6, bwd, 2.5 * flops / bwd * 1e-6);
  for (void* p : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(dout),
                  static_cast<void*>(out), static_cast<void*>(lse), static_cast<void*>(dq), static_cast<void*>(dk),
                  static_cast<void*>(dv)})
    CUDA_CHECK(cudaFree(p));
}

void time_sampling(int n, float temperature, int top_k, float top_p) {
  const int V = 128256;
  Random rng(7);
  F logits(size_t(n) * V);
  for (float& x : logits) x = 3.f * rng.normal();
  float* d_logits = upload<float>(logits);
  float* d_work = poisoned<float>(logits.size());
  std::vector<ts::cuda::DeviceSampleRow> rows(static_cast<size_t>(n));
  for (auto& r : rows) {
    r.temperature = temperature;
    r.top_k = top_k;
    r.top_p = top_p;
    r.u = rng.uniform();
  }
  ts::cuda::DeviceSampleRow* d_rows = nullptr;
  CUDA_CHECK(cudaMalloc(&d_rows, rows.size() * sizeof(ts::cuda::DeviceSampleRow)));
  CUDA_CHECK(cudaMemcpy(d_rows, rows.data(), rows.size() * sizeof(ts::cuda::DeviceSampleRow), cudaMemcpyHostToDevice));
  int32_t* d_ids = poisoned<int32_t>(size_t(n));
  void* d_scratch = poisoned<unsigned char>(ts::cuda::sample_scratch_bytes(n, V));
  // Each launch samples a fresh copy: the kernel rewrites the logits in place.
  const double copy_us = median_us(
      [&] { CUDA_CHECK(cudaMemcpyAsync(d_work, d_logits, logits.size() * 4, cudaMemcpyDeviceToDevice)); }, 20);
  const double us = median_us(
      [&] {
        CUDA_CHECK(cudaMemcpyAsync(d_work, d_logits, logits.size() * 4, cudaMemcpyDeviceToDevice));
        ts::cuda::sample_rows(d_ids, d_work, d_rows, nullptr, n, V, d_scratch, nullptr);
      },
      20);
  std::printf("time  sample %d row(s) x V %d, temperature %g top_k %d top_p %g: %.1f us\n", n, V, double(temperature),
              top_k, double(top_p), us - copy_us);
  for (void* p : {static_cast<void*>(d_logits), static_cast<void*>(d_work), static_cast<void*>(d_rows),
                  static_cast<void*>(d_ids), d_scratch})
    CUDA_CHECK(cudaFree(p));
}
#endif

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    uint64_t seed = 1;
    for (const PagedCase& pc : paged_cases()) {
      check_paged<float>(pc, seed);
      check_paged<bf16>(pc, seed++);
    }
    for (const TrainCase& tc : training_cases()) {
      check_training<float>(tc, seed);
      check_training<bf16>(tc, seed++);
    }
    check_sampling_random(1000, 140, 11, "sample random rows, V 1000");
    check_sampling_random(5003, 70, 12, "sample random rows, V 5003");
    check_sampling_random(128256, 28, 13, "sample random rows, V 128256");
    check_sampling_edges();
    // Production-sized shapes (about 15 s of the emulator's time): a long packed training sequence, a
    // long causal one, a 20000-position decode with Llama-3-8B heads, a batch of full-vocabulary rows.
    check_training<bf16>({"B1 T2048 G4 D128 docs 700/900/448", 1, 2048, 8, 2, 128, {700, 900, 448}}, 100);
    check_training<float>({"B1 T1024 G2 D64 causal", 1, 1024, 4, 2, 64, {}}, 101);
    check_paged<bf16>({"decode D128 G4 bs16 len 20000", 32, 8, 128, 16, {20000}, {{0, 20000}}}, 102);
    check_paged<float>({"decode D128 G4 bs16 len 20000", 32, 8, 128, 16, {20000}, {{0, 20000}}}, 102);
    check_sampling_random(128256, 64, 103, "sample random rows, V 128256 (x64)");
#ifndef TS_CUDA_EMU
    time_paged(1, 4096);
    time_paged(8, 4096);
    time_paged(64, 4096);
    time_paged(1, 32768);
    time_training(1, 2048, 32, 8, 128);
    time_training(4, 2048, 32, 8, 128);
    time_sampling(1, 0.f, 0, 1.f);
    time_sampling(8, 0.8f, 0, 1.f);
    time_sampling(8, 0.8f, 50, 0.9f);
    time_sampling(8, 0.8f, 0, 0.9f);
    time_sampling(64, 0.8f, 0, 0.95f);
#endif
  } catch (const std::exception& e) {
    report("unexpected exception", false, e.what());
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s: %d check(s) failed (%.1f s)\n", failures ? "FAILED" : "OK", failures, seconds);
  return failures ? 1 : 0;
}
