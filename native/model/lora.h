// LoRA adapters with PEFT semantics: the host copy (master weights, PEFT files) and the views a backend
// computes with. They are applied in one place, model/llama.cpp's project() / project_backward().
//
//   y[m] += s · B · A · dropout(x[m])      A (r, in), B (out, r), s = alpha / r  (alpha / √r with rslora)
//
// A starts kaiming-uniform(a=√5) = U(-1/√in, 1/√in), B starts at zero (so a new adapter is a no-op).
// Dropout masks are not stored: they are regenerated from a counter-based hash of
// (seed, step, layer, target, row, column), so a recomputed forward sees the very same mask.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "model/config.h"

namespace ts {

struct LoraModule {
  int r = 0, in = 0, out = 0;
  std::vector<float> A, B;    // (r, in), (out, r)
  std::vector<float> dA, dB;  // gradients, same shapes (allocated for training only)
  std::vector<float> mA, vA, mB, vB;  // AdamW moments (training only)
};

struct LoraSpec {
  int r = 16;
  float alpha = 32.f;
  float dropout = 0.f;
  bool rslora = false;
  uint32_t target_mask = 0;  // bit t set = target t (config.h Target) adapted
};

struct LoraAdapter {
  LoraSpec spec;
  float scaling = 0.f;  // alpha / r, or alpha / √r
  int L = 0;
  std::vector<std::array<LoraModule, NUM_TARGETS>> mods;  // (L) per layer; empty modules where not targeted
  bool has(int t) const { return (spec.target_mask >> t) & 1u; }
  LoraModule& mod(int layer, int t) { return mods[layer][t]; }
  const LoraModule& mod(int layer, int t) const { return mods[layer][t]; }
  int64_t num_params() const;
  void enable_training();  // allocates gradients and AdamW moments
  void zero_grad();
};

// New adapter for the base: A kaiming-uniform from `seed` (deterministic), B zero.
std::shared_ptr<LoraAdapter> lora_create(const LlamaConfig& cfg, const LoraSpec& spec, uint64_t seed);
// Loads adapter_model.safetensors (PEFT key names) for the given spec; every targeted module must be
// present with shapes that fit the base, else EngineError ADAPTER_MISMATCH naming the tensor.
std::shared_ptr<LoraAdapter> lora_load(const LlamaConfig& cfg, const LoraSpec& spec, const std::string& file);
// Writes adapter_model.safetensors (float32, PEFT key names) atomically.
void lora_save(const LoraAdapter& adapter, const std::string& file);
// PEFT key of a module's A or B weight.
std::string peft_key(int layer, int target, char which);

// Dropout of one training micro-step; p == 0 means none (inference). The mask of module (layer,
// target) is keyed by lora_dropout_key(seed, step, layer, target) (core/counter_rng.h).
struct DropoutContext {
  float p = 0.f;
  uint64_t seed = 0;
  uint64_t step = 0;  // differs per micro-step so masks differ
  LoraDropout at(int layer, int target) const;
};

// An adapter's tensors in a backend's memory, per (layer, target): A and B and, while it trains, the
// gradients dA, dB and the AdamW moments. On the CPU backend they alias the host LoraAdapter's own
// vectors (training updates it in place); on CUDA they are device copies (see AdapterPool).
struct AdapterTensors {
  struct Module {
    LoraModuleView view;  // view.A == nullptr where the adapter does not target the module
    float* A = nullptr;
    float* B = nullptr;
    float *dA = nullptr, *dB = nullptr;                          // training only
    float *mA = nullptr, *vA = nullptr, *mB = nullptr, *vB = nullptr;  // training only
  };
  int L = 0;
  std::vector<std::array<Module, NUM_TARGETS>> mods;  // (L)
  const Module& mod(int layer, int target) const { return mods[layer][target]; }
};

}  // namespace ts
