// The serving benchmark of the CUDA backend (issue 6, "must show" 7), through the Executor exactly as
// the service runs it: Llama-3-8B shape with an NF4 base whose codes are random (made on the host in
// the layout nf4_quantize produces; no float model exists, no download), in one run:
//   - copy bandwidth of the device (the roofline's denominator) and the bytes one decode step reads;
//   - single-stream decode tokens/s, base and with a LoRA adapter, against that roofline;
//   - batched decode throughput of 8 sequences with 8 distinct adapters vs the same 8 with one;
//   - time to first token when a request switches between resident adapters vs staying on one;
//   - prefill tokens/s for a 2,048-token prompt.
// Prints one JSON object per measurement, then a table. Absolute figures mean something only on the
// GPU machine; `--preset tiny` runs the same code on a tiny shape (under the emulator too), to check
// the benchmark itself.
//
// usage: bench-serving [--preset llama3-8b|tiny] [--decode-tokens N] [--cuda-compute bf16|f32]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "core/counter_rng.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "cuda/cuda_backend.h"
#include "model/executor.h"

#include "bench_shapes.h"

namespace {

using namespace ts;
using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Uniform [-scale, scale) values from a counter hash, filled in parallel.
void fill_uniform(std::vector<float>& v, size_t n, float scale, uint64_t key) {
  v.resize(n);
  parallel_for(int64_t(n), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) v[size_t(i)] = (2.f * counter_uniform(key, uint64_t(i)) - 1.f) * scale;
  });
}

// An NF4 matrix in nf4_quantize's layout with random codes and absmax values around 0.05 (weights of
// magnitude ~0.02, as in a trained model): what a decode step reads, without quantizing anything.
NF4Matrix random_nf4(int64_t rows, int64_t cols, uint64_t key) {
  NF4Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.codes.resize(size_t(rows * cols / 2));
  parallel_for(int64_t(m.codes.size() / 8), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const uint64_t bits = splitmix64_hash(key ^ uint64_t(i));
      std::memcpy(&m.codes[size_t(i) * 8], &bits, 8);
    }
  });
  const int64_t blocks = m.nblocks();
  m.absmax_q.resize(size_t(blocks));
  for (int64_t b = 0; b < blocks; b++) m.absmax_q[size_t(b)] = int8_t(int(splitmix64_hash(key + 1 + b) % 255) - 127);
  m.absmax_mean = 0.05f;
  m.absmax_scale.assign(size_t((blocks + NF4_DQ_GROUP - 1) / NF4_DQ_GROUP), 0.02f);
  return m;
}

std::shared_ptr<const LlamaWeights> random_model(const LlamaConfig& c) {
  auto w = std::make_shared<LlamaWeights>();
  w->cfg = c;
  w->quant = "nf4";
  fill_uniform(w->embed, size_t(c.V) * c.H, 1.f, 1);
  fill_uniform(w->lm_head, size_t(c.V) * c.H, 0.03f, 2);
  w->final_norm.assign(size_t(c.H), 1.f);
  w->layers.resize(size_t(c.L));
  for (int l = 0; l < c.L; l++) {
    LayerWeights& lw = w->layers[size_t(l)];
    lw.attn_norm.assign(size_t(c.H), 1.f);
    lw.mlp_norm.assign(size_t(c.H), 1.f);
    for (int t = 0; t < NUM_TARGETS; t++) {
      Linear& lin = lw.lin[size_t(t)];
      target_shape(c, t, &lin.out, &lin.in);
      lin.quantized = true;
      lin.q = random_nf4(lin.out, lin.in, 1000 + uint64_t(l) * 16 + t);
    }
  }
  return w;
}

std::shared_ptr<LoraAdapter> adapter_qkvo(const LlamaConfig& c, int r, uint64_t seed) {
  LoraSpec spec;
  spec.r = r;
  spec.alpha = 2.f * r;
  spec.target_mask = (1u << Q) | (1u << K) | (1u << V_PROJ) | (1u << O);
  auto a = lora_create(c, spec, seed);
  for (auto& layer : a->mods)
    for (auto& m : layer)
      for (size_t i = 0; i < m.B.size(); i++) m.B[i] = 0.01f * (2.f * counter_uniform(seed, i) - 1.f);
  return a;
}

struct Run {
  std::vector<GenerationResult> results;
  double seconds = 0;  // wall time of the whole batch
};

// Submits all requests at once and waits for all of them.
Run generate(Executor& e, const std::vector<int>& adapters, const std::vector<std::vector<int32_t>>& prompts,
             int max_tokens) {
  std::vector<std::future<GenerationResult>> futures;
  const auto t0 = Clock::now();
  for (size_t i = 0; i < prompts.size(); i++) {
    GenerationRequest req;
    req.prompt = prompts[i];
    req.max_tokens = max_tokens;
    if (adapters[i] > 0) req.adapter = e.adapter(adapters[i]);
    auto p = std::make_shared<std::promise<GenerationResult>>();
    futures.push_back(p->get_future());
    GenerationCallbacks cb;
    cb.on_done = [p](const GenerationResult& r) { p->set_value(r); };
    cb.on_error = [p](const std::string& code, const std::string& msg) {
      p->set_exception(std::make_exception_ptr(EngineError(code, msg)));
    };
    e.submit_generation(std::move(req), std::move(cb));
  }
  Run run;
  for (auto& f : futures) run.results.push_back(f.get());
  run.seconds = since(t0);
  return run;
}

double decode_tokens_per_s(const GenerationResult& r) {
  return r.decode_seconds > 0 ? double(r.ids.size() - 1) / r.decode_seconds : 0.0;
}

struct Row {
  std::string metric, value, note;
};
std::vector<Row> table;

void emit(const std::string& metric, double value, const std::string& unit, const std::string& note = "") {
  std::printf("{\"metric\": \"%s\", \"value\": %.6g, \"unit\": \"%s\"}\n", metric.c_str(), value, unit.c_str());
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4g %s", value, unit.c_str());
  table.push_back({metric, buf, note});
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "llama3-8b", compute = "bf16";
  int decode_tokens = 256;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--preset" && i + 1 < argc) preset = argv[++i];
    else if (a == "--decode-tokens" && i + 1 < argc) decode_tokens = std::stoi(argv[++i]);
    else if (a == "--cuda-compute" && i + 1 < argc) compute = argv[++i];
    else {
      std::fprintf(stderr, "usage: bench-serving [--preset llama3-8b|tiny] [--decode-tokens N] [--cuda-compute bf16|f32]\n");
      return 2;
    }
  }
  try {
    const LlamaConfig c = bench_shape(preset);
    auto t0 = Clock::now();
    auto weights = random_model(c);
    std::printf("{\"note\": \"random %s NF4 model made on the host in %.1f s\"}\n", preset.c_str(), since(t0));
    cuda::CudaBackendOptions co;
    co.float32_compute = compute == "f32";
    ExecutorOptions o;
    o.max_active_sequences = 8;
    o.prefill_chunk = 2048;
    o.max_seq_len = 4096;
    o.adapter_slots = 12;
    t0 = Clock::now();
    Executor e(cuda::make_cuda_backend(co), weights, o);
    weights.reset();
    std::printf("{\"note\": \"placed on %s in %.1f s; plan: %s\"}\n", e.backend().description().c_str(), since(t0),
                e.memory_plan().describe().c_str());

    // Copy bandwidth: device-to-device copies of 1 GiB (read + write counted), median of 5.
    Backend& be = e.backend();
    const size_t bytes = preset == "tiny" ? (64u << 20) : (1u << 30);
    std::vector<double> bw;
    {
      Buffer a(be, bytes), b(be, bytes);
      be.fill_zero(a.data(), bytes);
      be.copy(b.data(), a.data(), bytes);
      be.synchronize();
      for (int i = 0; i < 5; i++) {
        const auto c0 = Clock::now();
        be.copy(b.data(), a.data(), bytes);
        be.synchronize();
        bw.push_back(2.0 * double(bytes) / since(c0));
      }
    }
    std::sort(bw.begin(), bw.end());
    const double copy_bw = bw[bw.size() / 2];
    emit("copy_bandwidth", copy_bw / 1e9, "GB/s", "device-to-device, read + write");
    // One decode step reads every block weight (codes + absmax), the lm_head, the norms and one
    // embedding row; everything else (KV of a short context, activations) is small beside them.
    const BackendWeights& w = e.weights();
    const double step_bytes = double(w.bytes) - double(c.V) * c.H * dtype_size(w.embed.dtype) + double(c.H) * 2;
    const double roofline = copy_bw / step_bytes;
    emit("decode_roofline", roofline, "tokens/s", "copy bandwidth / bytes read per token");

    const int a1 = e.add_adapter(adapter_qkvo(c, 16, 11));
    std::vector<int> eight;
    for (int k = 0; k < 8; k++) eight.push_back(e.add_adapter(adapter_qkvo(c, 16, 100 + k)));
    std::vector<int32_t> prompt16(16);
    for (int i = 0; i < 16; i++) prompt16[size_t(i)] = 1000 + 7 * i;

    generate(e, {0}, {prompt16}, 8);  // warm-up: captures the decode graph of bucket 1
    const double base = decode_tokens_per_s(generate(e, {0}, {prompt16}, decode_tokens).results[0]);
    emit("decode_batch1_base", base, "tokens/s", "share of roofline " + std::to_string(base / roofline));
    const double lora = decode_tokens_per_s(generate(e, {a1}, {prompt16}, decode_tokens).results[0]);
    emit("decode_batch1_lora_r16_qkvo", lora, "tokens/s", "share of roofline " + std::to_string(lora / roofline));

    // Batched: 8 sequences, one adapter for all vs 8 distinct ones. Throughput over the whole batch.
    std::vector<std::vector<int32_t>> prompts8(8, prompt16);
    generate(e, eight, prompts8, 8);  // warm-up (bucket 8)
    auto throughput = [&](const Run& r) {
      double tokens = 0, decode = 0;
      for (const auto& g : r.results) {
        tokens += double(g.ids.size() - 1);
        decode = std::max(decode, g.decode_seconds);
      }
      return tokens / decode;
    };
    const double same = throughput(generate(e, std::vector<int>(8, eight[0]), prompts8, decode_tokens));
    const double mixed = throughput(generate(e, eight, prompts8, decode_tokens));
    emit("decode_batch8_one_adapter", same, "tokens/s");
    emit("decode_batch8_eight_adapters", mixed, "tokens/s", "ratio to one adapter " + std::to_string(mixed / same));

    // Time to first token when switching adapters: alternate between two resident adapters vs repeat
    // one; the prompt and everything else equal. Median of 9 each.
    std::vector<int32_t> prompt128(128);
    for (int i = 0; i < 128; i++) prompt128[size_t(i)] = int32_t((2000 + 3 * i) % c.V);
    auto ttft = [&](bool switching) {
      std::vector<double> t;
      for (int k = 0; k < 9; k++) {
        const int id = switching ? eight[size_t(k % 2)] : eight[0];
        t.push_back(generate(e, {id}, {prompt128}, 1).results[0].prefill_seconds);
      }
      std::sort(t.begin(), t.end());
      return t[4];
    };
    ttft(false);
    const double stay = ttft(false), sw = ttft(true);
    emit("ttft_128_same_adapter", stay * 1e3, "ms");
    emit("ttft_128_switching_adapters", sw * 1e3, "ms", "added by switching " + std::to_string((sw - stay) * 1e3) + " ms");

    // Prefill of a 2,048-token prompt (one step: prefill_chunk is 2,048).
    std::vector<int32_t> prompt2k(2048);
    for (int i = 0; i < 2048; i++) prompt2k[size_t(i)] = int32_t((i * 7919) % c.V);
    generate(e, {0}, {prompt2k}, 1);
    const double pre = generate(e, {0}, {prompt2k}, 1).results[0].prefill_seconds;
    emit("prefill_2048", 2048.0 / pre, "tokens/s");
    const auto st = e.stats();
    std::printf("{\"note\": \"decode steps from graphs %lld, eager %lld\"}\n", (long long)st.graph_steps,
                (long long)st.eager_steps);

    std::printf("\n%-32s %-20s %s\n", "metric", "value", "note");
    for (const Row& r : table) std::printf("%-32s %-20s %s\n", r.metric.c_str(), r.value.c_str(), r.note.c_str());
  } catch (const EngineError& err) {
    std::fprintf(stderr, "bench-serving: [%s] %s\n", err.code.c_str(), err.what());
    return 1;
  }
  return 0;
}
