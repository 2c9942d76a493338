// The frozen base model in memory: float32 or NF4 linear weights, float32 embeddings and norms.
// Loaded tensor by tensor from Hugging Face safetensors shards (F32/BF16/F16 converted to float32),
// quantizing each linear weight right after it is read so the float copy of the whole model never
// exists at once.
#pragma once
#include <array>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/nf4.h"
#include "model/config.h"

namespace ts {

// A frozen linear layer y = x·Wᵀ, W [out, in], stored as float32 or NF4.
struct Linear {
  int out = 0, in = 0;
  bool quantized = false;
  std::vector<float> w;  // (out, in) when !quantized
  NF4Matrix q;           // when quantized
  size_t bytes() const { return quantized ? q.bytes() : w.size() * sizeof(float); }
};

struct LayerWeights {
  std::vector<float> attn_norm;  // (H) input_layernorm
  std::vector<float> mlp_norm;   // (H) post_attention_layernorm
  std::array<Linear, NUM_TARGETS> lin;  // q (NH*D,H) k,v (NKV*D,H) o (H,NH*D) gate,up (I,H) down (H,I)
};

struct LlamaWeights {
  LlamaConfig cfg;
  std::string quant;              // "none" or "nf4"
  std::vector<float> embed;       // (V, H)
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // (H)
  std::vector<float> lm_head;     // (V, H); empty when tied (embed is used)
  const float* lm_head_ptr() const { return cfg.tied ? embed.data() : lm_head.data(); }
  size_t bytes() const;
};

// Loads the base model from `files` (all shards; a tensor is looked up by name across them).
// quant: "none" or "nf4" (linear weights of the blocks only; embeddings, norms, lm_head stay float32).
// Throws EngineError INVALID_SAFETENSORS / INVALID_CONFIG (missing tensor, wrong shape) naming the file.
LlamaWeights load_llama_weights(const LlamaConfig& cfg, const std::vector<std::string>& files, const std::string& quant);

// The base as a backend's ops see it. On the CPU backend the views alias the host LlamaWeights (kept
// alive by `host`); elsewhere everything is copied into one backend buffer: NF4 codes and absmax as
// they are, dense tensors (embeddings, norms, lm_head, unquantized linears) in the backend's
// weight_dtype().
struct BackendWeights {
  struct Layer {
    Tensor attn_norm, mlp_norm;                 // (1, H)
    std::array<LinearView, NUM_TARGETS> lin;    // as LayerWeights::lin
  };
  LlamaConfig cfg;
  std::string quant;
  Tensor embed;         // (V, H)
  Tensor final_norm;    // (1, H)
  LinearView lm_head;   // (V, H) dense; the embedding table when tied
  std::vector<Layer> layers;
  size_t bytes = 0;     // backend memory holding them (the host bytes when aliased)
  std::shared_ptr<const LlamaWeights> host;  // set when the views alias host memory
  Buffer storage;       // set when they were copied
};
BackendWeights place_weights(Backend& backend, std::shared_ptr<const LlamaWeights> host);

// Whether a linear weight with rows of `in` is stored in NF4 under `quant` (NF4 blocks never span
// rows: a row length that is not a multiple of 64 stays dense).
inline bool quantizes(const std::string& quant, int in) { return quant == "nf4" && in % NF4_BLOCK == 0; }
// The bytes place_weights allocates for a base of `cfg` in a backend that copies it (dense tensors in
// `dense`): the config alone decides, so a memory plan can be made without the weights.
size_t placed_weight_bytes(const LlamaConfig& cfg, const std::string& quant, DType dense);
// The same layout in `backend` without weights: one uninitialised allocation and the views over it,
// NF4 absmax_mean 0 (the GPU training benchmark fills it with random values, no host copy of the model).
BackendWeights allocate_weights(Backend& backend, const LlamaConfig& cfg, const std::string& quant);

// Hugging Face name of a block's linear weight, e.g. "model.layers.3.self_attn.q_proj.weight".
std::string hf_linear_name(int layer, int target);

}  // namespace ts
