// Loading the frozen base (weights.h): tensor lookup across shards, shape checks, NF4 on load; and its
// placement in a backend's memory.
#include "model/weights.h"

#include <map>
#include <memory>

#include "core/error.h"
#include "core/safetensors.h"

namespace ts {

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
      if (quantizes(quant, lin.in)) {
        lin.q = nf4_quantize(f.data(), lin.out, lin.in);
        lin.quantized = true;
      } else {
        lin.w = std::move(f);
      }
    }
  }
  return w;
}

namespace {

// Lays the base out in one region: measuring (dst == nullptr) only counts bytes; otherwise each tensor
// is converted on the host and uploaded. Dense tensors go in `dtype`, NF4 arrays as they are. A null
// source uploads nothing (the layout of a base known only by its config).
class Placer {
 public:
  Placer(Backend* be, Arena& arena, DType dtype) : be_(be), arena_(arena), dtype_(dtype) {}

  Tensor dense(const float* src, int64_t rows, int64_t cols) {
    Tensor t = arena_.take(rows, cols, dtype_);
    if (src && !arena_.is_measuring()) {
      const size_t n = size_t(rows * cols);
      if (dtype_ == DType::F32) {
        be_->upload(t.data, src, n * sizeof(float));
      } else {
        staging_.resize(n * dtype_size(dtype_));
        convert_from_f32(staging_.data(), src, dtype_, n);
        be_->upload(t.data, staging_.data(), staging_.size());
      }
    }
    return t;
  }

  template <typename T>
  const T* array(const T* src, int64_t n) {
    T* p = arena_.take_array<T>(n);
    if (src && !arena_.is_measuring()) be_->upload(p, src, size_t(n) * sizeof(T));
    return p;
  }

  // `lin` null: the shape alone.
  LinearView linear(int out, int in, bool quantized, const Linear* lin) {
    LinearView v;
    v.out = out;
    v.in = in;
    v.quantized = quantized;
    if (quantized) {
      if (lin) v.nf4 = lin->q.view();
      v.nf4.rows = out;
      v.nf4.cols = in;
      const int64_t blocks = v.nf4.nblocks();
      v.nf4.codes = array(lin ? lin->q.codes.data() : nullptr, int64_t(out) * in / 2);
      v.nf4.absmax_q = array(lin ? lin->q.absmax_q.data() : nullptr, blocks);
      v.nf4.absmax_scale = array(lin ? lin->q.absmax_scale.data() : nullptr, (blocks + NF4_DQ_GROUP - 1) / NF4_DQ_GROUP);
    } else {
      v.dense = dense(lin ? lin->w.data() : nullptr, out, in);
    }
    return v;
  }

 private:
  Backend* be_;
  Arena& arena_;
  DType dtype_;
  std::vector<uint8_t> staging_;
};

// `w` null: the layout of a base of config `c` alone.
void lay_out(BackendWeights& bw, const LlamaConfig& c, const std::string& quant, const LlamaWeights* w, Placer& place) {
  bw.embed = place.dense(w ? w->embed.data() : nullptr, c.V, c.H);
  bw.final_norm = place.dense(w ? w->final_norm.data() : nullptr, 1, c.H);
  bw.lm_head.out = c.V;
  bw.lm_head.in = c.H;
  bw.lm_head.dense = c.tied ? bw.embed : place.dense(w ? w->lm_head.data() : nullptr, c.V, c.H);
  bw.layers.resize(c.L);
  for (int l = 0; l < c.L; l++) {
    const LayerWeights* lw = w ? &w->layers[l] : nullptr;
    bw.layers[l].attn_norm = place.dense(lw ? lw->attn_norm.data() : nullptr, 1, c.H);
    bw.layers[l].mlp_norm = place.dense(lw ? lw->mlp_norm.data() : nullptr, 1, c.H);
    for (int t = 0; t < NUM_TARGETS; t++) {
      int out = 0, in = 0;
      target_shape(c, t, &out, &in);
      const Linear* lin = lw ? &lw->lin[t] : nullptr;
      bw.layers[l].lin[t] = place.linear(out, in, lin ? lin->quantized : quantizes(quant, in), lin);
    }
  }
}

// Views straight into the host vectors (CPU backend, float32).
Tensor host_view(const std::vector<float>& v, int64_t rows, int64_t cols) {
  return make_tensor(const_cast<float*>(v.data()), DType::F32, rows, cols, DeviceKind::CPU);
}

}  // namespace

BackendWeights place_weights(Backend& backend, std::shared_ptr<const LlamaWeights> host) {
  const LlamaWeights& w = *host;
  const LlamaConfig& c = w.cfg;
  BackendWeights bw;
  bw.cfg = c;
  bw.quant = w.quant;
  if (backend.device() == DeviceKind::CPU && backend.weight_dtype() == DType::F32) {
    bw.embed = host_view(w.embed, c.V, c.H);
    bw.final_norm = host_view(w.final_norm, 1, c.H);
    bw.lm_head.out = c.V;
    bw.lm_head.in = c.H;
    bw.lm_head.dense = c.tied ? bw.embed : host_view(w.lm_head, c.V, c.H);
    bw.layers.resize(c.L);
    for (int l = 0; l < c.L; l++) {
      const LayerWeights& lw = w.layers[l];
      bw.layers[l].attn_norm = host_view(lw.attn_norm, 1, c.H);
      bw.layers[l].mlp_norm = host_view(lw.mlp_norm, 1, c.H);
      for (int t = 0; t < NUM_TARGETS; t++) {
        const Linear& lin = lw.lin[t];
        LinearView& v = bw.layers[l].lin[t];
        v.out = lin.out;
        v.in = lin.in;
        v.quantized = lin.quantized;
        if (lin.quantized) v.nf4 = lin.q.view();
        else v.dense = host_view(lin.w, lin.out, lin.in);
      }
    }
    bw.bytes = w.bytes();
    bw.host = std::move(host);
    return bw;
  }
  bw.storage = Buffer(backend, placed_weight_bytes(c, w.quant, backend.weight_dtype()));
  Arena arena(bw.storage.data(), bw.storage.bytes(), backend.device(), "weights");
  Placer placing(&backend, arena, backend.weight_dtype());
  lay_out(bw, c, w.quant, &w, placing);
  bw.bytes = bw.storage.bytes();
  return bw;
}

size_t placed_weight_bytes(const LlamaConfig& cfg, const std::string& quant, DType dense) {
  BackendWeights bw;
  Arena measure = Arena::measuring(DeviceKind::CPU);
  Placer counting(nullptr, measure, dense);
  lay_out(bw, cfg, quant, nullptr, counting);
  return measure.used();
}

BackendWeights allocate_weights(Backend& backend, const LlamaConfig& cfg, const std::string& quant) {
  BackendWeights bw;
  bw.cfg = cfg;
  bw.quant = quant;
  bw.storage = Buffer(backend, placed_weight_bytes(cfg, quant, backend.weight_dtype()));
  Arena arena(bw.storage.data(), bw.storage.bytes(), backend.device(), "weights");
  Placer placing(&backend, arena, backend.weight_dtype());
  lay_out(bw, cfg, quant, nullptr, placing);
  bw.bytes = bw.storage.bytes();
  return bw;
}

}  // namespace ts
