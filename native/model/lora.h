// LoRA adapters with PEFT semantics, and the one place in the engine where they are applied.
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

// Dropout context of one forward pass; a null context (or p == 0) means no dropout (inference).
struct DropoutContext {
  float p = 0.f;
  uint64_t seed = 0;
  uint64_t step = 0;  // differs per micro-step so masks differ
};

// The rows [row_begin, row_end) of a pass that use one adapter (inference batches mix adapters).
struct LoraSegment {
  int64_t row_begin = 0, row_end = 0;
  const LoraAdapter* adapter = nullptr;  // null: base only
};

// y[M,out] += s · B · A · dropout(x) for every segment's rows, module (layer, target).
void lora_forward(float* y, const float* x, const std::vector<LoraSegment>& segments, int layer, int target,
                  const DropoutContext* dropout);
// Backward of the above for a single training adapter over all M rows: accumulates dA, dB and adds the
// input gradient into dx[M,in].
void lora_backward(float* dx, LoraAdapter& adapter, const float* dy, const float* x, int64_t M, int layer, int target,
                   const DropoutContext* dropout);

}  // namespace ts
