// The training benchmark of the CUDA backend (issue 7, "must show" 3): QLoRA training steps through the
// Trainer exactly as a job runs them (forward with LoRA, chunked cross-entropy, backward through the
// frozen NF4 base with per-layer recompute, clipping, AdamW), on the Llama-3-8B shape with random
// weights made straight in device memory (the base's layout from its config, filled tensor by tensor;
// no model file, no host copy of the model), batch 2 x 2,048, r 16 on q/k/v/o. In one run:
//   - training tokens/s (median step) and the loss of the first and last step (finite, sane);
//   - peak device memory: every allocation the engine makes (what torch.cuda.max_memory_allocated
//     counts for the peer), beside the memory plan's prediction and cudaMemGetInfo's view;
//   - model FLOPs utilisation over a bf16 matrix product's peak measured here (cuBLASLt, 8192^3);
//   - where a step's time goes: matrix products, attention, NF4 dequantization, the rest — from one
//     extra step with a synchronize after every op (its total is longer than a plain step by that
//     overhead; the shares are what counts). Dequantization happens inside the NF4 products, so it is
//     measured apart: per weight shape, a product through the NF4 weight minus the same product
//     through a dense bf16 weight, times the NF4 products of that shape in the step.
// Prints one JSON object per measurement, then a table. Absolute figures mean something only on the
// GPU machine; `--preset tiny` runs the same code on a tiny shape (under the emulator too).
// bench/gpu/hf_train.py measures the Hugging Face + PEFT peer on the same shape in the same device call.
//
// Model FLOPs per token (the convention of the issue: forward + recompute + activation backward):
//   6 · N_blocks                      the block linears: forward, recompute, input gradient (2 each);
//                                     the frozen base has no weight gradient
//   + 4 · V · H                       lm_head: forward and input gradient (it is not recomputed)
//   + L · 4 · 2 · NH · D · (T + 1)    causal attention: QKᵀ and PV over (t + 1) keys on average
//                                     (T + 1)/2, 2 FLOPs per multiply-add; forward, recompute and a
//                                     backward of twice the forward
// LoRA's own products (r = 16) add under 0.5% and are left out, as the peer's figure leaves them out.
//
// usage: bench-training [--preset llama3-8b|tiny] [--batch N] [--seq N] [--rank N] [--targets qkvo|all]
//                       [--dropout P] [--steps N] [--warmup N] [--cuda-compute bf16|f32] [--no-recompute]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/counter_rng.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "cuda/cuda_backend.h"
#include "model/adapter_pool.h"
#include "model/memory_plan.h"
#include "model/trainer.h"

#include "bench_shapes.h"

namespace {

using namespace ts;
using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// ---- a backend that counts allocations and, when asked, times every op ----------------------------

enum Category { MATMUL, ATTENTION, REST, NUM_CATEGORIES };

// Delegates everything to `in`. Allocations are counted (current and peak bytes, the backend's own
// scratch included); with `timing` each op is followed by a synchronize and its wall time goes to its
// category, and the NF4 products are counted per weight shape.
class Probe final : public Backend {
 public:
  explicit Probe(Backend& in) : in_(in) {}

  bool timing = false;
  double seconds[NUM_CATEGORIES] = {};
  std::map<std::pair<int, int>, int> nf4_products;  // (out, in) -> products through that NF4 shape
  uint64_t current = 0, peak = 0;

  void reset_timing() {
    std::fill(seconds, seconds + NUM_CATEGORIES, 0.0);
    nf4_products.clear();
  }

  DeviceKind device() const override { return in_.device(); }
  std::string description() const override { return in_.description(); }
  DType compute_dtype() const override { return in_.compute_dtype(); }
  DType weight_dtype() const override { return in_.weight_dtype(); }
  MemoryInfo memory_info() const override { return in_.memory_info(); }
  void* allocate(size_t bytes) override {
    void* p = in_.allocate(bytes);
    if (p) sizes_[p] = bytes;
    count(int64_t(bytes));
    return p;
  }
  void release(void* p) override {
    auto it = sizes_.find(p);
    if (it != sizes_.end()) {
      count(-int64_t(it->second));
      sizes_.erase(it);
    }
    in_.release(p);
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    Op op(*this, REST);
    in_.upload(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override {
    Op op(*this, REST);
    in_.download(dst, src, bytes);
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    Op op(*this, REST);
    in_.copy(dst, src, bytes);
  }
  void fill_zero(void* dst, size_t bytes) override {
    Op op(*this, REST);
    in_.fill_zero(dst, bytes);
  }
  void synchronize() override { in_.synchronize(); }
  size_t reserve_scratch(const ScratchPlan& plan) override {
    count(-int64_t(scratch_));
    scratch_ = in_.reserve_scratch(plan);
    count(int64_t(scratch_));
    return scratch_;
  }

  void embedding(Tensor out, const int32_t* ids, Tensor table) override {
    Op op(*this, REST);
    in_.embedding(out, ids, table);
  }
  void rmsnorm_forward(Tensor out, float* rstd, Tensor x, Tensor w, float eps) override {
    Op op(*this, REST);
    in_.rmsnorm_forward(out, rstd, x, w, eps);
  }
  void rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor w, const float* rstd, bool accumulate) override {
    Op op(*this, REST);
    in_.rmsnorm_backward(dx, dout, x, w, rstd, accumulate);
  }
  void rope(Tensor x, const int32_t* pos, const RopeView& rope, int nheads, bool inverse) override {
    Op op(*this, REST);
    in_.rope(x, pos, rope, nheads, inverse);
  }
  void swiglu_forward(Tensor out, Tensor gate, Tensor up) override {
    Op op(*this, REST);
    in_.swiglu_forward(out, gate, up);
  }
  void swiglu_backward(Tensor dgate, Tensor dup, Tensor dout, Tensor gate, Tensor up) override {
    Op op(*this, REST);
    in_.swiglu_backward(dgate, dup, dout, gate, up);
  }
  void add(Tensor x, Tensor y) override {
    Op op(*this, REST);
    in_.add(x, y);
  }
  void linear_forward(Tensor y, Tensor x, const LinearView& w, float beta) override {
    Op op(*this, MATMUL);
    note_nf4(w);
    in_.linear_forward(y, x, w, beta);
  }
  void linear_backward_input(Tensor dx, Tensor dy, const LinearView& w, float beta) override {
    Op op(*this, MATMUL);
    note_nf4(w);
    in_.linear_backward_input(dx, dy, w, beta);
  }
  void matmul(Tensor C, bool trans_a, Tensor A, bool trans_b, Tensor B, float alpha, float beta) override {
    Op op(*this, MATMUL);
    in_.matmul(C, trans_a, A, trans_b, B, alpha, beta);
  }
  void lora_forward(Tensor y, Tensor x, const LoraApply& lora, const LoraScratch& scratch) override {
    Op op(*this, MATMUL);
    in_.lora_forward(y, x, lora, scratch);
  }
  void lora_backward(Tensor dx, float* dA, float* dB, Tensor dy, Tensor x, const LoraModuleView& module,
                     const LoraDropout& dropout, const LoraScratch& scratch) override {
    Op op(*this, MATMUL);
    in_.lora_backward(dx, dA, dB, dy, x, module, dropout, scratch);
  }
  void attention_forward(Tensor out, float* lse, Tensor q, Tensor k, Tensor v, const AttentionShape& s) override {
    Op op(*this, ATTENTION);
    in_.attention_forward(out, lse, q, k, v, s);
  }
  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor out, const float* lse, Tensor q,
                          Tensor k, Tensor v, const AttentionShape& s) override {
    Op op(*this, ATTENTION);
    in_.attention_backward(dq, dk, dv, dout, out, lse, q, k, v, s);
  }
  void kv_write(const KVLayerView& kv, Tensor k, Tensor v, const int32_t* slot) override {
    Op op(*this, ATTENTION);
    in_.kv_write(kv, k, v, slot);
  }
  void attention_paged(Tensor out, Tensor q, const KVLayerView& kv, const PagedRows& rows, int NH, int NKV,
                       int D) override {
    Op op(*this, ATTENTION);
    in_.attention_paged(out, q, kv, rows, NH, NKV, D);
  }
  void gather_rows(Tensor out, Tensor in, const int32_t* index) override {
    Op op(*this, REST);
    in_.gather_rows(out, in, index);
  }
  void scatter_rows(Tensor out, Tensor in, const int32_t* index) override {
    Op op(*this, REST);
    in_.scatter_rows(out, in, index);
  }
  void cross_entropy(double* loss_sum, Tensor logits, const int32_t* targets, float scale) override {
    Op op(*this, REST);
    in_.cross_entropy(loss_sum, logits, targets, scale);
  }
  void sum_squares(double* acc, const float* x, int64_t n) override {
    Op op(*this, REST);
    in_.sum_squares(acc, x, n);
  }
  void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& step) override {
    Op op(*this, REST);
    in_.adamw(p, g, m, v, n, step);
  }
  void sample(int32_t* host_ids, Tensor logits, const SampleRow* rows) override {
    Op op(*this, REST);
    in_.sample(host_ids, logits, rows);
  }

 private:
  struct Op {
    Probe& p;
    Category c;
    Clock::time_point t0;
    Op(Probe& probe, Category category) : p(probe), c(category), t0(Clock::now()) {}
    ~Op() {
      if (!p.timing) return;
      p.in_.synchronize();
      p.seconds[c] += since(t0);
    }
  };
  void count(int64_t delta) {
    current = uint64_t(int64_t(current) + delta);
    peak = std::max(peak, current);
  }
  void note_nf4(const LinearView& w) {
    if (timing && w.quantized) nf4_products[{w.out, w.in}]++;
  }

  Backend& in_;
  std::unordered_map<void*, size_t> sizes_;
  size_t scratch_ = 0;
};

// ---- random weights, made in device memory ---------------------------------------------------------

// Uploads n elements made by gen(i) (host chunks of at most 16 Mi elements; never the whole model).
template <typename T, typename Gen>
void fill(Backend& be, void* dst, int64_t n, Gen gen) {
  const int64_t chunk = int64_t(1) << 24;
  std::vector<T> host(size_t(std::min(n, chunk)));
  for (int64_t b = 0; b < n; b += chunk) {
    const int64_t m = std::min(chunk, n - b);
    parallel_for(m, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; i++) host[size_t(i)] = gen(b + i);
    });
    be.upload(static_cast<char*>(dst) + size_t(b) * sizeof(T), host.data(), size_t(m) * sizeof(T));
  }
  be.synchronize();  // the host chunk is reused
}

// A dense tensor of uniform [-scale, scale) values (scale 0: all ones, for norms), in its dtype.
void fill_dense(Backend& be, const Tensor& t, float scale, uint64_t key) {
  auto value = [=](int64_t i) { return scale == 0.f ? 1.f : (2.f * counter_uniform(key, uint64_t(i)) - 1.f) * scale; };
  if (t.dtype == DType::F32) fill<float>(be, t.data, t.numel(), value);
  else fill<uint16_t>(be, t.data, t.numel(), [&](int64_t i) { return f32_to_bf16(value(i)); });
}

// Random NF4 codes and block absmax values around 0.05 (weights of magnitude ~0.02, as a trained
// model's), as bench_serving makes them.
void fill_nf4(Backend& be, NF4View& w, uint64_t key) {
  fill<uint8_t>(be, const_cast<uint8_t*>(w.codes), w.rows * w.cols / 2,
                [=](int64_t i) { return uint8_t(splitmix64_hash(key ^ uint64_t(i))); });
  fill<int8_t>(be, const_cast<int8_t*>(w.absmax_q), w.nblocks(),
               [=](int64_t i) { return int8_t(int(splitmix64_hash(key + 1 + uint64_t(i)) % 255) - 127); });
  fill<float>(be, const_cast<float*>(w.absmax_scale), (w.nblocks() + NF4_DQ_GROUP - 1) / NF4_DQ_GROUP,
              [](int64_t) { return 0.02f; });
  w.absmax_mean = 0.05f;
}

BackendWeights random_base(Backend& be, const LlamaConfig& c) {
  BackendWeights w = allocate_weights(be, c, "nf4");
  fill_dense(be, w.embed, 1.f, 1);
  if (!c.tied) fill_dense(be, w.lm_head.dense, 0.03f, 2);
  fill_dense(be, w.final_norm, 0.f, 0);
  for (int l = 0; l < c.L; l++) {
    fill_dense(be, w.layers[l].attn_norm, 0.f, 0);
    fill_dense(be, w.layers[l].mlp_norm, 0.f, 0);
    for (int t = 0; t < NUM_TARGETS; t++) {
      LinearView& lin = w.layers[l].lin[t];
      require(lin.quantized, "INTERNAL", "bench-training: every block linear of the preset is NF4");
      fill_nf4(be, lin.nf4, 1000 + uint64_t(l) * 16 + t);
    }
  }
  return w;
}

std::shared_ptr<LoraAdapter> random_adapter(const LlamaConfig& c, int r, uint32_t targets, float dropout) {
  LoraSpec spec;
  spec.r = r;
  spec.alpha = 2.f * r;
  spec.dropout = dropout;
  spec.target_mask = targets;
  auto a = lora_create(c, spec, 7);
  // B non-zero, so the first step's gradients flow through the low-rank path too.
  for (auto& layer : a->mods)
    for (auto& m : layer)
      for (size_t i = 0; i < m.B.size(); i++) m.B[i] = 0.01f * (2.f * counter_uniform(8, i) - 1.f);
  return a;
}

// ---- output ------------------------------------------------------------------------------------------

struct Row {
  std::string metric, value, note;
};
std::vector<Row> table;

void emit(const std::string& metric, double value, const std::string& unit, const std::string& note = "") {
  std::printf("{\"metric\": \"%s\", \"value\": %.6g, \"unit\": \"%s\"}\n", metric.c_str(), value, unit.c_str());
  std::fflush(stdout);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4g %s", value, unit.c_str());
  table.push_back({metric, buf, note});
}

std::string fmt(const char* f, double a, double b = 0, double c = 0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, a, b, c);
  return buf;
}

// Seconds of fn() after one warm-up, median of `reps`, each followed by a synchronize.
template <typename F>
double time_op(Backend& be, int reps, F fn) {
  fn();
  be.synchronize();
  std::vector<double> t;
  for (int i = 0; i < reps; i++) {
    const auto t0 = Clock::now();
    fn();
    be.synchronize();
    t.push_back(since(t0));
  }
  return median(t);
}

// A (rows, cols) tensor of random values in backend memory, in `dtype` (its Buffer in `keep`).
Tensor random_tensor(Backend& be, std::vector<Buffer>& keep, int64_t rows, int64_t cols, DType dtype, uint64_t key) {
  keep.emplace_back(be, size_t(rows * cols) * dtype_size(dtype));
  Tensor t = make_tensor(keep.back().data(), dtype, rows, cols, be.device());
  fill_dense(be, t, 1.f, key);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "llama3-8b", compute = "bf16", targets_name = "qkvo";
  int batch = -1, seq = -1, rank = 16, steps = -1, warmup = -1;
  float dropout = 0.05f;  // the peer's (and QLoRA's) LoRA dropout
  bool recompute = true;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw EngineError("INVALID_ARGUMENT", a + " needs a value");
      return argv[++i];
    };
    if (a == "--preset") preset = next();
    else if (a == "--batch") batch = std::stoi(next());
    else if (a == "--seq") seq = std::stoi(next());
    else if (a == "--rank") rank = std::stoi(next());
    else if (a == "--targets") targets_name = next();
    else if (a == "--dropout") dropout = std::stof(next());
    else if (a == "--steps") steps = std::stoi(next());
    else if (a == "--warmup") warmup = std::stoi(next());
    else if (a == "--cuda-compute") compute = next();
    else if (a == "--no-recompute") recompute = false;
    else {
      std::fprintf(stderr,
                   "usage: bench-training [--preset llama3-8b|tiny] [--batch N] [--seq N] [--rank N] [--targets qkvo|all]\n"
                   "                      [--dropout P] [--steps N] [--warmup N] [--cuda-compute bf16|f32] [--no-recompute]\n");
      return 2;
    }
  }
  const bool tiny = preset == "tiny";
  if (batch < 0) batch = 2;
  if (seq < 0) seq = tiny ? 64 : 2048;
  if (steps < 0) steps = tiny ? 2 : 5;
  if (warmup < 0) warmup = tiny ? 1 : 2;
  const uint32_t qkvo = (1u << Q) | (1u << K) | (1u << V_PROJ) | (1u << O);
  const uint32_t targets = targets_name == "all" ? (1u << NUM_TARGETS) - 1 : qkvo;
  try {
    const LlamaConfig c = bench_shape(preset);
    cuda::CudaBackendOptions co;
    co.float32_compute = compute == "f32";
    std::unique_ptr<Backend> device = cuda::make_cuda_backend(co);
    const MemoryInfo at_start = device->memory_info();  // after the context, before any allocation
    Probe be(*device);
    std::printf("{\"note\": \"%s; %s, batch %d x %d, r %d on %s, dropout %.2f, %s\"}\n", device->description().c_str(),
                preset.c_str(), batch, seq, rank, targets_name.c_str(), double(dropout),
                recompute ? "recompute" : "no recompute");

    // The base, random, in device memory; the backend's scratch as the executor reserves it.
    auto t0 = Clock::now();
    LlamaModel model;
    model.be = &be;
    model.w = random_base(be, c);
    ExecutorOptions eo;
    eo.max_active_sequences = 1;
    eo.max_seq_len = seq;
    int64_t largest = 0;
    for (const auto& layer : model.w.layers)
      for (const LinearView& lin : layer.lin) largest = std::max<int64_t>(largest, int64_t(lin.out) * lin.in);
    model.backend_scratch = be.reserve_scratch(scratch_plan(c, eo, largest));
    model.ensure_rope(seq);
    std::printf("{\"note\": \"random NF4 base (%.1f MiB) made in device memory in %.1f s\"}\n", model.w.bytes / 1048576.0,
                since(t0));

    AdapterPool pool(be, c, 1, 0);
    const int id = pool.add(random_adapter(c, rank, targets, dropout));
    pool.maintain();
    AdapterPool::Handle adapter = pool.get(id);

    // A fresh batch of random tokens for every step, every token scored.
    const int total_steps = warmup + steps + 1;  // + the profiled step
    std::vector<TrainExample> examples(size_t(batch) * total_steps);
    for (size_t e = 0; e < examples.size(); e++) {
      examples[e].ids.resize(size_t(seq));
      for (int t = 0; t < seq; t++) examples[e].ids[size_t(t)] = int32_t(splitmix64_hash(e * 1000003 + t) % uint64_t(c.V));
      examples[e].labels = examples[e].ids;
    }
    TrainHyper h;
    h.lr = 2e-4;
    h.batch_size = batch;
    h.grad_accum = 1;
    h.max_steps = total_steps;
    h.scheduler = "constant";
    h.shuffle = false;
    h.recompute = recompute;

    // The plan from the config alone (with the scratch the backend reserved): what the job should take.
    TrainingShape ts;
    ts.B = batch;
    ts.T = seq;
    ts.lora = adapter->host->spec;
    ts.recompute = recompute;
    const TrainingMemoryPlan predicted =
        plan_training_memory(c, DeviceKind::CUDA, be.compute_dtype(), "nf4", ts, model.backend_scratch);
    std::printf("{\"note\": \"memory plan: %s\"}\n", predicted.describe().c_str());

    std::vector<double> step_seconds;
    double first_loss = 0, last_loss = 0;
    uint64_t min_free = at_start.free;
    double profiled = 0, categories[NUM_CATEGORIES] = {};
    std::map<std::pair<int, int>, int> nf4_products;
    {
      Trainer trainer(model, pool, adapter, examples, h);
      for (int s = 0; s < total_steps; s++) {
        const bool profile = s == total_steps - 1;
        be.reset_timing();
        be.timing = profile;
        StepReport r;
        const auto s0 = Clock::now();
        while (!trainer.micro_step(&r)) {
        }
        be.synchronize();
        const double secs = since(s0);
        be.timing = false;
        require(std::isfinite(r.loss) && std::isfinite(r.grad_norm), "INTERNAL",
                "bench-training: step " + std::to_string(s + 1) + " has a non-finite loss or gradient norm");
        min_free = std::min<uint64_t>(min_free, be.memory_info().free);
        if (s == 0) first_loss = r.loss;
        last_loss = r.loss;
        if (profile) {
          profiled = secs;
          std::copy(be.seconds, be.seconds + NUM_CATEGORIES, categories);
          nf4_products = be.nf4_products;
        } else if (s >= warmup) {
          step_seconds.push_back(secs);
        }
        std::printf("{\"step\": %d, \"loss\": %.5f, \"grad_norm\": %.4g, \"seconds\": %.4f%s}\n", s + 1, r.loss, r.grad_norm,
                    secs, profile ? ", \"profiled\": true" : s < warmup ? ", \"warmup\": true" : "");
        std::fflush(stdout);
      }
      std::printf("{\"note\": \"the job's own plan: %s\"}\n", trainer.memory_plan().describe().c_str());
    }
    const double step = median(step_seconds);
    const double tokens = double(batch) * seq;
    const double tps = tokens / step;
    emit("train_tokens_per_s", tps, "tokens/s", fmt("median of %.0f steps of %.0f tokens", double(steps), tokens));
    emit("train_step_s", step, "s");
    emit("loss_first_last", first_loss, "nats", fmt("last %.4f (random data: near ln V = %.3f)", last_loss, std::log(double(c.V))));

    // Memory: the engine's allocations (the headline), the plan's prediction, the device's view.
    const double GiB = 1073741824.0;
    emit("peak_device_memory", be.peak / GiB, "GiB", "every engine allocation, base included (as max_memory_allocated)");
    emit("plan_peak", predicted.peak / GiB, "GiB",
         fmt("predicted from the config; measured - predicted = %.1f MiB (rope tables, slot table, norm scalar)",
             (double(be.peak) - double(predicted.peak)) / 1048576.0));
    emit("device_used_peak", double(at_start.free - min_free) / GiB, "GiB",
         "cudaMemGetInfo: free at start - lowest free after a step (allocator granularity, cuBLASLt)");

    // The bf16 matrix peak: 8192^3 through the same product path (cuBLASLt), median of 10.
    std::vector<Buffer> keep;
    const int64_t n = tiny ? 256 : 8192;
    double peak_flops = 0;
    {
      Tensor A = random_tensor(*device, keep, n, n, DType::BF16, 21), B = random_tensor(*device, keep, n, n, DType::BF16, 22);
      keep.emplace_back(*device, size_t(n * n) * 2);
      Tensor C = make_tensor(keep.back().data(), DType::BF16, n, n, device->device());
      const double t = time_op(*device, 10, [&] { device->matmul(C, false, A, true, B, 1.f, 0.f); });
      peak_flops = 2.0 * double(n) * n * n / t;
      keep.clear();
    }
    emit("bf16_matmul_peak", peak_flops / 1e12, "TFLOP/s", fmt("%.0f^3, bf16 in and out", double(n)));
    double n_blocks = 0;
    for (int t = 0; t < NUM_TARGETS; t++) {
      int out = 0, in = 0;
      target_shape(c, t, &out, &in);
      n_blocks += double(out) * in * c.L;
    }
    const double flops_per_token =
        6.0 * n_blocks + 4.0 * double(c.V) * c.H + double(c.L) * 4.0 * 2.0 * c.NH * c.D * (double(seq) + 1.0);
    emit("model_flops_per_token", flops_per_token / 1e9, "GFLOP", "6 N_blocks + 4 V H + attention (see the header)");
    emit("mfu", tps * flops_per_token / peak_flops, "", "model FLOPs/s over the bf16 matrix peak above");

    // Dequantization per NF4 weight shape: a product through the NF4 weight minus the same product
    // through a dense weight of that shape (M = the step's rows, random operands).
    const DType act = device->compute_dtype();
    double dequant = 0;
    for (const auto& [key, count] : nf4_products) {
      const auto [out, in] = key;
      const LinearView* nf4 = nullptr;
      for (const LinearView& lin : model.w.layers[0].lin)
        if (lin.out == out && lin.in == in) nf4 = &lin;
      require(nf4 != nullptr, "INTERNAL", "bench-training: no NF4 weight of a counted shape");
      LinearView dense;
      dense.out = out;
      dense.in = in;
      dense.dense = random_tensor(*device, keep, out, in, act, 31);
      Tensor x = random_tensor(*device, keep, int64_t(tokens), in, act, 32);
      keep.emplace_back(*device, size_t(tokens * out) * dtype_size(act));
      Tensor y = make_tensor(keep.back().data(), act, int64_t(tokens), out, device->device());
      const double t_nf4 = time_op(*device, 5, [&] { device->linear_forward(y, x, *nf4, 0.f); });
      const double t_dense = time_op(*device, 5, [&] { device->linear_forward(y, x, dense, 0.f); });
      dequant += count * std::max(0.0, t_nf4 - t_dense);
      std::printf("{\"note\": \"NF4 %dx%d: %d products in the step, dequantization %.3f ms each (NF4 %.3f ms, dense %.3f ms)\"}\n",
                  out, in, count, 1e3 * std::max(0.0, t_nf4 - t_dense), 1e3 * t_nf4, 1e3 * t_dense);
      keep.clear();
    }
    // The profiled step's time by category; host work between ops (batching, scheduling) goes to the rest.
    double ops = 0;
    for (double s : categories) ops += s;
    const double parts[] = {categories[MATMUL] - dequant, categories[ATTENTION], dequant,
                            categories[REST] + std::max(0.0, profiled - ops)};
    const char* names[] = {"time_matmul", "time_attention", "time_dequant", "time_rest"};
    for (int i = 0; i < 4; i++)
      emit(names[i], 100.0 * parts[i] / profiled, "%",
           fmt("%.1f ms of the profiled step (%.1f ms; a plain step %.1f ms)", 1e3 * parts[i], 1e3 * profiled, 1e3 * step));

    std::printf("\n%-24s %-20s %s\n", "metric", "value", "note");
    for (const Row& r : table) std::printf("%-24s %-20s %s\n", r.metric.c_str(), r.value.c_str(), r.note.c_str());
  } catch (const EngineError& err) {
    std::fprintf(stderr, "bench-training: [%s] %s\n", err.code.c_str(), err.what());
    return 1;
  } catch (const std::exception& err) {
    std::fprintf(stderr, "bench-training: %s\n", err.what());
    return 1;
  }
  return 0;
}
