// Llama 3 forward and backward on the CPU backend: the training pass (forward, chunked cross-entropy,
// backward through the frozen base into LoRA gradients, optional per-layer recompute) and the
// inference pass over KV caches (prefill and decode of many sequences, each with its own adapter).
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/ops.h"
#include "model/lora.h"
#include "model/weights.h"

namespace ts {

struct LlamaModel {
  LlamaWeights w;
  std::vector<float> rope_cos, rope_sin;  // (P, D/2)
  cpu::RopeTable rope;
  void ensure_rope(int64_t positions);    // grows the rotary tables to cover [0, positions)
};
// Computes the rotary tables for [0, P) (inv_freq with llama3 scaling, float32 angles as transformers).
void rope_tables(const LlamaConfig& cfg, int64_t P, std::vector<float>* cos, std::vector<float>* sin);

// B sequences of T tokens (right-padded by the caller; padding positions carry label -100).
// labels use Hugging Face's convention: same length as ids, unshifted; position t is trained to
// predict labels[t + 1]; -100 ignored.
struct TrainBatch {
  int B = 0, T = 0;
  std::vector<int32_t> ids;     // (B*T)
  std::vector<int32_t> labels;  // (B*T)
  int64_t count_targets() const;
};

struct TrainPassOptions {
  bool backward = true;          // false: loss only
  bool recompute = true;         // gradient checkpointing: keep only each layer's input, recompute in backward
  float loss_scale = 1.f;        // gradients are of (sum of token losses) * loss_scale
  int ce_chunk_rows = 128;       // rows of logits materialized at once (never (B*T, V))
  DropoutContext dropout;        // p = 0: none
};

// Returns the sum of the token cross-entropies of the batch. With backward, accumulates
// loss_scale * d(sum)/d(A,B) into adapter's dA/dB (the adapter must have enable_training()).
double llama_train_pass(LlamaModel& m, LoraAdapter* adapter, const TrainBatch& batch, const TrainPassOptions& opt);

// Logits (T, V) of one sequence, no cache (for tests and fidelity probes).
void llama_logits(LlamaModel& m, const LoraAdapter* adapter, const int32_t* ids, int T, float* logits);

// Key/value cache of one sequence: (L, cap, NKV*D) for k and v.
struct KVCache {
  int L = 0, KVD = 0;
  int64_t cap = 0;
  int64_t len = 0;  // positions filled
  std::vector<float> k, v;
  void init(const LlamaConfig& cfg, int64_t capacity);
  float* k_at(int layer, int64_t pos) { return k.data() + ((int64_t)layer * cap + pos) * KVD; }
  float* v_at(int layer, int64_t pos) { return v.data() + ((int64_t)layer * cap + pos) * KVD; }
  size_t bytes() const { return (k.size() + v.size()) * sizeof(float); }
};

// One token of one sequence in an inference step. Rows of a sequence are contiguous and in position
// order; the row's k/v are written at `pos` of its cache, then it attends to [0, pos].
struct InferenceRow {
  KVCache* cache = nullptr;
  int32_t pos = 0;
  int32_t token = 0;
};
// Runs an inference step. `segments` give each row range's adapter. logits (logit_rows.size(), V)
// receives the logits of the listed rows (e.g. the last prompt row of each sequence).
void llama_infer(LlamaModel& m, const std::vector<InferenceRow>& rows, const std::vector<LoraSegment>& segments,
                 const std::vector<int64_t>& logit_rows, float* logits);

}  // namespace ts
