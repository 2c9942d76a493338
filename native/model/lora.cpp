// LoRA adapters (lora.h): creation, PEFT safetensors I/O, and the forward/backward of the low-rank path.
#include "model/lora.h"

#include <cmath>
#include <cstring>
#include <set>

#include "core/error.h"
#include "core/safetensors.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"

namespace ts {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform [0,1) from a counter: the same (key, index) always gives the same value.
inline float counter_uniform(uint64_t key, uint64_t index) {
  return (float)(splitmix64(key ^ splitmix64(index)) >> 40) * (1.0f / 16777216.0f);
}

uint64_t dropout_key(const DropoutContext& d, int layer, int target) {
  return splitmix64(splitmix64(splitmix64(d.seed) ^ d.step) ^ ((uint64_t)layer << 8 | (uint64_t)target));
}

// v[rows, in] *= mask / (1 - p), mask_i = (u_i >= p); rows are numbered from row0 for the hash. The
// forward applies it to a copy of x, the backward to the input gradient: one mask, never stored.
void dropout_in_place(float* v, int64_t rows, int in, int64_t row0, const DropoutContext& d, int layer, int target) {
  const uint64_t key = dropout_key(d, layer, target);
  const float keep_scale = 1.f / (1.f - d.p);
  parallel_for(rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++)
      for (int i = 0; i < in; i++) {
        uint64_t idx = (uint64_t)(row0 + m) * (uint64_t)in + i;
        v[m * in + i] = counter_uniform(key, idx) >= d.p ? v[m * in + i] * keep_scale : 0.f;
      }
  });
}

// xd = dropout(x) for rows [0, rows) numbered from row0.
void apply_dropout(std::vector<float>& xd, const float* x, int64_t rows, int in, int64_t row0, const DropoutContext& d,
                   int layer, int target) {
  xd.assign(x, x + rows * in);
  dropout_in_place(xd.data(), rows, in, row0, d, layer, target);
}

bool dropout_active(const DropoutContext* d) { return d && d->p > 0.f; }

}  // namespace

int64_t LoraAdapter::num_params() const {
  int64_t n = 0;
  for (const auto& layer : mods)
    for (const auto& m : layer) n += (int64_t)m.A.size() + (int64_t)m.B.size();
  return n;
}

void LoraAdapter::enable_training() {
  for (auto& layer : mods)
    for (auto& m : layer) {
      if (m.A.empty()) continue;
      m.dA.assign(m.A.size(), 0.f);
      m.dB.assign(m.B.size(), 0.f);
      m.mA.assign(m.A.size(), 0.f);
      m.vA.assign(m.A.size(), 0.f);
      m.mB.assign(m.B.size(), 0.f);
      m.vB.assign(m.B.size(), 0.f);
    }
}

void LoraAdapter::zero_grad() {
  for (auto& layer : mods)
    for (auto& m : layer) {
      std::fill(m.dA.begin(), m.dA.end(), 0.f);
      std::fill(m.dB.begin(), m.dB.end(), 0.f);
    }
}

static std::shared_ptr<LoraAdapter> lora_alloc(const LlamaConfig& cfg, const LoraSpec& spec) {
  require(spec.r > 0, "INVALID_ARGUMENT", "LoRA rank r must be positive");
  require(spec.target_mask != 0, "INVALID_ARGUMENT", "LoRA needs at least one target module");
  require(spec.dropout >= 0.f && spec.dropout < 1.f, "INVALID_ARGUMENT", "lora_dropout must be in [0, 1)");
  auto a = std::make_shared<LoraAdapter>();
  a->spec = spec;
  a->scaling = spec.rslora ? spec.alpha / std::sqrt((float)spec.r) : spec.alpha / (float)spec.r;
  a->L = cfg.L;
  a->mods.resize(cfg.L);
  for (int l = 0; l < cfg.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!a->has(t)) continue;
      LoraModule& m = a->mods[l][t];
      m.r = spec.r;
      target_shape(cfg, t, &m.out, &m.in);
      m.A.assign((size_t)m.r * m.in, 0.f);
      m.B.assign((size_t)m.out * m.r, 0.f);
    }
  return a;
}

std::shared_ptr<LoraAdapter> lora_create(const LlamaConfig& cfg, const LoraSpec& spec, uint64_t seed) {
  auto a = lora_alloc(cfg, spec);
  for (int l = 0; l < cfg.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!a->has(t)) continue;
      LoraModule& m = a->mods[l][t];
      // kaiming_uniform_(a=√5) on A (r, in): bound = gain·√(3/fan_in) with gain = √(2/(1+5)) = 1/√in.
      const float bound = 1.f / std::sqrt((float)m.in);
      const uint64_t key = splitmix64(seed * 1000003ull + (uint64_t)l * NUM_TARGETS + t);
      for (size_t i = 0; i < m.A.size(); i++) m.A[i] = (2.f * counter_uniform(key, i) - 1.f) * bound;
    }
  return a;
}

std::string peft_key(int layer, int target, char which) {
  const char* group = target <= O ? "self_attn" : "mlp";
  return "base_model.model.model.layers." + std::to_string(layer) + "." + group + "." + target_name(target) +
         ".lora_" + which + ".weight";
}

std::shared_ptr<LoraAdapter> lora_load(const LlamaConfig& cfg, const LoraSpec& spec, const std::string& file) {
  SafetensorsReader reader(file);
  auto a = lora_alloc(cfg, spec);
  std::set<std::string> expected;
  for (int l = 0; l < cfg.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!a->has(t)) continue;
      LoraModule& m = a->mods[l][t];
      for (char which : {'A', 'B'}) {
        std::string key = peft_key(l, t, which);
        expected.insert(key);
        const TensorInfo* info = reader.find(key);
        require(info != nullptr, "ADAPTER_MISMATCH", file + ": tensor " + key + " is missing (the adapter config targets " +
                                                         target_name(t) + " on every layer)");
        std::vector<int64_t> want = which == 'A' ? std::vector<int64_t>{m.r, m.in} : std::vector<int64_t>{m.out, m.r};
        if (info->shape != want) {
          std::string got;
          for (size_t i = 0; i < info->shape.size(); i++) got += (i ? ", " : "") + std::to_string(info->shape[i]);
          throw EngineError("ADAPTER_MISMATCH", file + ": tensor " + key + " has shape [" + got + "], this base needs [" +
                                                    std::to_string(want[0]) + ", " + std::to_string(want[1]) +
                                                    "]: the adapter was trained for another base model or rank");
        }
        reader.read_f32(*info, which == 'A' ? m.A.data() : m.B.data());
      }
    }
  for (const auto& t : reader.tensors())
    require(expected.count(t.name) > 0, "ADAPTER_MISMATCH",
            file + ": unexpected tensor " + t.name + " (not a LoRA weight of the configured target modules of this base)");
  return a;
}

void lora_save(const LoraAdapter& adapter, const std::string& file) {
  std::vector<TensorDecl> decls;
  std::vector<const std::vector<float>*> data;
  for (int l = 0; l < adapter.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!adapter.has(t)) continue;
      const LoraModule& m = adapter.mod(l, t);
      decls.push_back({peft_key(l, t, 'A'), DType::F32, {m.r, m.in}});
      data.push_back(&m.A);
      decls.push_back({peft_key(l, t, 'B'), DType::F32, {m.out, m.r}});
      data.push_back(&m.B);
    }
  write_safetensors(file, decls, {{"format", "pt"}}, [&](size_t i, std::vector<uint8_t>& bytes) {
    bytes.resize(data[i]->size() * sizeof(float));
    std::memcpy(bytes.data(), data[i]->data(), bytes.size());
  });
}

void lora_forward(float* y, const float* x, const std::vector<LoraSegment>& segments, int layer, int target,
                  const DropoutContext* dropout) {
  std::vector<float> xd, u;
  for (const LoraSegment& seg : segments) {
    const LoraAdapter* a = seg.adapter;
    if (!a || !a->has(target)) continue;
    const LoraModule& m = a->mod(layer, target);
    const int64_t rows = seg.row_end - seg.row_begin;
    if (rows <= 0) continue;
    const float* xs = x + seg.row_begin * m.in;
    if (dropout_active(dropout)) {
      apply_dropout(xd, xs, rows, m.in, seg.row_begin, *dropout, layer, target);
      xs = xd.data();
    }
    u.resize((size_t)rows * m.r);
    // u[rows, r] = xd · Aᵀ ;  y[rows, out] += s · u · Bᵀ
    cpu::sgemm(false, true, rows, m.r, m.in, 1.f, xs, m.in, m.A.data(), m.in, 0.f, u.data(), m.r);
    cpu::sgemm(false, true, rows, m.out, m.r, a->scaling, u.data(), m.r, m.B.data(), m.r, 1.f, y + seg.row_begin * m.out,
               m.out);
  }
}

void lora_backward(float* dx, LoraAdapter& adapter, const float* dy, const float* x, int64_t M, int layer, int target,
                   const DropoutContext* dropout) {
  if (!adapter.has(target)) return;
  LoraModule& m = adapter.mod(layer, target);
  const float s = adapter.scaling;
  std::vector<float> xd, u((size_t)M * m.r), du((size_t)M * m.r), dxd((size_t)M * m.in);
  const float* xs = x;
  if (dropout_active(dropout)) {
    apply_dropout(xd, x, M, m.in, 0, *dropout, layer, target);
    xs = xd.data();
  }
  cpu::sgemm(false, true, M, m.r, m.in, 1.f, xs, m.in, m.A.data(), m.in, 0.f, u.data(), m.r);  // u = xd·Aᵀ
  cpu::sgemm(true, false, m.out, m.r, M, s, dy, m.out, u.data(), m.r, 1.f, m.dB.data(), m.r);   // dB += s·dyᵀ·u
  cpu::sgemm(false, false, M, m.r, m.out, s, dy, m.out, m.B.data(), m.r, 0.f, du.data(), m.r);  // du = s·dy·B
  cpu::sgemm(true, false, m.r, m.in, M, 1.f, du.data(), m.r, xs, m.in, 1.f, m.dA.data(), m.in);  // dA += duᵀ·xd
  cpu::sgemm(false, false, M, m.in, m.r, 1.f, du.data(), m.r, m.A.data(), m.in, 0.f, dxd.data(), m.in);  // dxd = du·A
  if (dropout_active(dropout)) dropout_in_place(dxd.data(), M, m.in, 0, *dropout, layer, target);  // same mask
  for (size_t i = 0; i < dxd.size(); i++) dx[i] += dxd[i];
}

}  // namespace ts
