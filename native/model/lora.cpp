// LoRA adapters (lora.h): creation, PEFT safetensors I/O, dropout keys.
#include "model/lora.h"

#include <cmath>
#include <cstring>
#include <set>

#include "core/error.h"
#include "core/safetensors.h"
#include "core/counter_rng.h"

namespace ts {

LoraDropout DropoutContext::at(int layer, int target) const {
  return LoraDropout{p, p > 0.f ? lora_dropout_key(seed, step, layer, target) : 0};
}

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
      const uint64_t key = splitmix64_hash(seed * 1000003ull + (uint64_t)l * NUM_TARGETS + t);
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

}  // namespace ts
