// Llama 3 written once against the backend interface (core/backend.h): the training pass (forward,
// chunked cross-entropy, backward through the frozen base into LoRA gradients, optional per-layer
// recompute) and the inference step over the paged KV cache (prefill chunks and decode tokens of many
// sequences, each with its own adapter). Every buffer a pass uses is carved from an Arena whose size
// was planned by running the same carve function on a measuring arena (plan_* below).
#pragma once
#include <cstdint>
#include <vector>

#include "core/backend.h"
#include "model/kv_cache.h"
#include "model/lora.h"
#include "model/weights.h"

namespace ts {

struct LlamaModel {
  Backend* be = nullptr;
  BackendWeights w;
  RopeView rope;        // cos/sin (P, D/2) in backend memory
  Buffer rope_storage;
  uint64_t backend_scratch = 0;  // what the backend reserved for its own scratch (the memory plan)
  uint64_t training_limit = 0;   // most a training job may take (0: what the backend has free)
  const LlamaConfig& cfg() const { return w.cfg; }
  // Makes the rotary tables cover [0, positions). Grows geometrically; a captured step graph bakes the
  // table's address, so whoever captures sizes it first for the longest sequence it will run.
  void ensure_rope(int64_t positions);
};
// Computes the rotary tables for [0, P) (inv_freq with llama3 scaling, float32 angles as transformers).
void rope_tables(const LlamaConfig& cfg, int64_t P, std::vector<float>* cos, std::vector<float>* sin);

// ------------------------------------------------------------------------------------------ training

// B sequences of T tokens (right-padded by the caller; padding positions carry label -100).
// labels use Hugging Face's convention: same length as ids, unshifted; position t is trained to
// predict labels[t + 1]; -100 ignored.
// Packing: with doc_start, a sequence holds several documents; row t belongs to the document starting
// at doc_start[t], attends only within it (block-diagonal causal mask), has position t - doc_start[t],
// and a document's last row is not scored against the next document's first token. Each document's
// loss and gradients are then those of the document alone.
struct TrainBatch {
  int B = 0, T = 0;
  std::vector<int32_t> ids;        // (B*T)
  std::vector<int32_t> labels;     // (B*T)
  std::vector<int32_t> doc_start;  // (B*T), or empty: one document per sequence
  int64_t count_targets() const;
};

struct TrainPassOptions {
  bool backward = true;          // false: loss only
  bool recompute = true;         // gradient checkpointing: keep only each layer's input, recompute in backward
  float loss_scale = 1.f;        // gradients are of (sum of token losses) * loss_scale
  int ce_chunk_rows = 128;       // rows of logits materialized at once (never (B*T, V))
  DropoutContext dropout;        // p = 0: none
};

// The parts of a training pass's workspace in bytes, as the pass lays it out (one arena; see
// model/memory_plan.h for the whole job).
struct TrainWorkspaceParts {
  size_t inputs = 0;             // token ids, positions, document starts, scored rows and targets (M each),
                                 // the loss sum
  size_t saved_activations = 0;  // the input of each layer and the final stream, (L+1)·M·H; without
                                 // recompute every layer's activations too
  size_t layer_working_set = 0;  // the stream's gradient (M,H), the LoRA scratch, one layer's activations
                                 // (with recompute) and its gradients
  size_t head = 0;               // final norm, one chunk of float32 logits (chunk,V), its rows and gradients
  size_t head_shared = 0;        // bytes of `head` laid over the layer working set (never live together)
  size_t total = 0;              // inputs + saved + layer working set + head - head_shared
};

// The workspace of a training pass over batches of up to B x T rows, with compute dtype `act`, for an
// adapter of rank up to lora.r over lora.target_mask (r 0: no adapter) — from the config alone.
TrainWorkspaceParts plan_train_parts(const LlamaConfig& c, DType act, int B, int T, const LoraSpec& lora,
                                     const TrainPassOptions& opt);
size_t plan_train_workspace(const LlamaModel& m, int B, int T, const LoraSpec& lora, const TrainPassOptions& opt);

// Returns the sum of the token cross-entropies of the batch. With opt.backward, accumulates
// loss_scale · d(sum)/d(A,B) into the adapter's dA/dB (its tensors must have gradients). `ws` holds
// at least plan_train_workspace() bytes for this batch shape; it is reset here.
double llama_train_pass(LlamaModel& m, const AdapterTensors* adapter, const TrainBatch& batch,
                        const TrainPassOptions& opt, Arena& ws);

// ----------------------------------------------------------------------------------------- inference

// The adapter of a range of rows in an inference step.
struct AdapterRows {
  int64_t row_begin = 0, row_end = 0;
  const AdapterTensors* adapter = nullptr;  // null: base only
  int slot = -1;                            // its slot in the adapter pool (the per-row LoRA form)
};

// The host description of one inference step. Rows of a sequence are contiguous and in position
// order; row m writes its k/v at position pos[m] of sequence row_seq[m] and attends to [0, pos[m]].
struct InferenceBatch {
  std::vector<int32_t> tokens, pos, row_seq;   // (M)
  std::vector<int32_t> block_tables;           // (S, max_blocks) block ids, position order, 0-padded
  int max_blocks = 0;
  std::vector<AdapterRows> adapters;           // covering the rows that use an adapter
  std::vector<int32_t> logit_rows;             // rows whose logits are wanted
  const LoraModuleView* slot_modules = nullptr;  // (L, NUM_TARGETS, slots) the pool's slot table
  int slots = 0;
  int64_t rows() const { return int64_t(tokens.size()); }
  int64_t sequences() const { return max_blocks > 0 ? int64_t(block_tables.size()) / max_blocks : 0; }
};

// The buffers of one inference step; carve_inference lays them out for the given sizes.
struct InferenceWorkspace {
  int64_t M = 0, S = 0, n_logits = 0;
  int max_blocks = 0, max_rank = 0;
  Tensor x, xn, q, k, v, att, tmp, g, u;  // (M, H|NH·D|NKV·D|I), compute dtype
  Tensor lora_u;                          // (M, max_rank) float32
  int32_t *ids, *pos, *slot, *row_seq, *len, *tables, *row_slot, *logit_index;
  Tensor xl, xnl;                         // (n_logits, H)
  Tensor logits;                          // (n_logits, V) float32
};
InferenceWorkspace carve_inference(Arena& a, const LlamaConfig& c, DType act, int64_t M, int64_t S, int max_blocks,
                                   int64_t n_logits, int max_rank);
size_t plan_inference_workspace(const LlamaConfig& c, DType act, int64_t M, int64_t S, int max_blocks, int64_t n_logits,
                                int max_rank);

// Uploads the step's inputs (ids, positions, cache slots, block tables, lengths, adapter slots) into
// the workspace. Host-side checks happen here (token ids in the vocabulary, positions inside the
// block tables).
void stage_inference(LlamaModel& m, const InferenceBatch& b, const InferenceWorkspace& ws, const KVPool& kv);
// Runs the step's ops only (what a captured step graph replays); logits land in ws.logits.
// `b` provides the host-side LoRA segments; rows of ws beyond b.rows() are padding.
void run_inference(LlamaModel& m, const InferenceBatch& b, const InferenceWorkspace& ws, const KVPool& kv);

}  // namespace ts
