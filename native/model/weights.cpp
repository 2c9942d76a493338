// Loading the frozen base (weights.h): tensor lookup across shards, shape checks, NF4 on load.
#include "model/weights.h"

#include <map>
#include <memory>

#include "core/error.h"
#include "core/safetensors.h"
#include "cpu/gemm.h"

namespace ts {

void linear_forward(float* y, const float* x, const Linear& W, int64_t M, float beta) {
  if (W.quantized) cpu::matmul_nf4_nt(y, x, W.q, M, beta);
  else cpu::sgemm(false, true, M, W.out, W.in, 1.f, x, W.in, W.w.data(), W.in, beta, y, W.out);
}

void linear_backward_input(float* dx, const float* dy, const Linear& W, int64_t M, float beta) {
  if (W.quantized) cpu::matmul_nf4_nn(dx, dy, W.q, M, beta);
  else cpu::sgemm(false, false, M, W.in, W.out, 1.f, dy, W.out, W.w.data(), W.in, beta, dx, W.in);
}

size_t LlamaWeights::bytes() const {
  size_t n = (embed.size() + final_norm.size() + lm_head.size()) * sizeof(float);
  for (const auto& l : layers) {
    n += (l.attn_norm.size() + l.mlp_norm.size()) * sizeof(float);
    for (const auto& lin : l.lin) n += lin.bytes();
  }
  return n;
}

std::string hf_linear_name(int layer, int target) {
  const char* group = target <= O ? "self_attn" : "mlp";
  return "model.layers." + std::to_string(layer) + "." + group + "." + target_name(target) + ".weight";
}

namespace {

// Finds tensors by name across all shards of a model.
struct ShardSet {
  std::vector<std::unique_ptr<SafetensorsReader>> readers;
  std::map<std::string, std::pair<const SafetensorsReader*, const TensorInfo*>> index;

  explicit ShardSet(const std::vector<std::string>& files) {
    for (const auto& f : files) {
      readers.push_back(std::make_unique<SafetensorsReader>(f));
      for (const auto& t : readers.back()->tensors()) index[t.name] = {readers.back().get(), &t};
    }
  }

  // Reads `name` as float32 after checking its shape is exactly `shape`.
  std::vector<float> read(const std::string& name, std::vector<int64_t> shape) const {
    auto it = index.find(name);
    require(it != index.end(), "INVALID_MODEL", "tensor " + name + " is missing from the model's safetensors files");
    const TensorInfo& t = *it->second.second;
    if (t.shape != shape) {
      auto str = [](const std::vector<int64_t>& s) {
        std::string o = "[";
        for (size_t i = 0; i < s.size(); i++) o += (i ? ", " : "") + std::to_string(s[i]);
        return o + "]";
      };
      throw EngineError("INVALID_MODEL", it->second.first->path() + ": tensor " + name + " has shape " + str(t.shape) +
                                             ", the config implies " + str(shape));
    }
    std::vector<float> out(t.numel());
    it->second.first->read_f32(t, out.data());
    return out;
  }
  bool has(const std::string& name) const { return index.count(name) > 0; }
};

}  // namespace

LlamaWeights load_llama_weights(const LlamaConfig& cfg, const std::vector<std::string>& files, const std::string& quant) {
  require(quant == "none" || quant == "nf4", "INVALID_ARGUMENT", "quant must be 'none' or 'nf4', got '" + quant + "'");
  require(!files.empty(), "INVALID_MODEL", "no safetensors files given");
  ShardSet shards(files);
  LlamaWeights w;
  w.cfg = cfg;
  w.quant = quant;
  const int64_t H = cfg.H, V = cfg.V;
  w.embed = shards.read("model.embed_tokens.weight", {V, H});
  w.final_norm = shards.read("model.norm.weight", {H});
  if (!cfg.tied) w.lm_head = shards.read("lm_head.weight", {V, H});
  w.layers.resize(cfg.L);
  for (int l = 0; l < cfg.L; l++) {
    LayerWeights& lw = w.layers[l];
    std::string p = "model.layers." + std::to_string(l) + ".";
    lw.attn_norm = shards.read(p + "input_layernorm.weight", {H});
    lw.mlp_norm = shards.read(p + "post_attention_layernorm.weight", {H});
    for (int t = 0; t < NUM_TARGETS; t++) {
      Linear& lin = lw.lin[t];
      target_shape(cfg, t, &lin.out, &lin.in);
      std::vector<float> f = shards.read(hf_linear_name(l, t), {lin.out, lin.in});
      // NF4 blocks never span rows; a row length that is not a multiple of 64 stays float32.
      if (quant == "nf4" && lin.in % NF4_BLOCK == 0) {
        lin.q = nf4_quantize(f.data(), lin.out, lin.in);
        lin.quantized = true;
      } else {
        lin.w = std::move(f);
      }
    }
  }
  return w;
}

}  // namespace ts
