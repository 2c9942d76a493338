// The memory plan of one engine process, made once at start from the configuration and the backend's
// free memory: the base weights, the adapter pool, the inference workspace of one step, and the paged
// KV cache from what remains (its share of that remainder, unless a size is configured). What is left
// after the plan stays free for training jobs, whose workspaces are planned when each job starts
// (model/trainer.h). Reported by GetModelInfo.
#pragma once
#include <cstdint>
#include <string>

#include "core/backend.h"
#include "model/config.h"

namespace ts {

struct ExecutorOptions {
  int max_active_sequences = 16;  // sequences decoded together; more wait in the queue
  int prefill_chunk = 512;        // prompt rows processed per step (bounds a step's latency)
  int max_seq_len = 0;            // longest prompt + completion of one sequence; 0: max_position_embeddings
  int max_queued = 1024;          // sequences waiting for admission beyond which submit is refused
  int adapter_slots = 24;         // adapters resident at once (serving and training together)
  int max_lora_rank = 256;        // largest rank an adapter may have (sizes the per-step LoRA scratch)
  uint64_t adapter_pool_bytes = 0;  // 0: no byte budget on the CPU; on CUDA 1/8 of free memory after weights
  uint64_t kv_cache_bytes = 0;    // 0: the KV share below
  double kv_share = 0.0;          // share of the memory left after weights, adapters and workspace; 0: backend default
  int kv_block_size = 16;         // positions per KV block
  bool step_graphs = true;        // capture decode steps as graphs where the backend supports them
};

struct MemoryPlan {
  uint64_t total = 0, free_at_start = 0;  // the backend's memory when the plan was made
  uint64_t weights = 0;
  uint64_t backend_scratch = 0;     // the backend's own scratch (dequantization, sampling buffers)
  int adapter_slots = 0;
  uint64_t adapter_budget = 0;      // bytes adapters may take (0: no limit)
  uint64_t adapter_pool = 0;        // that budget plus the pool's slot table
  uint64_t workspace = 0;           // the inference step's workspace
  int kv_block_size = 0;
  int64_t kv_blocks = 0;            // including the reserved scratch block
  uint64_t kv_block_bytes = 0;      // k and v of one block over all layers
  uint64_t kv_cache = 0;
  int max_seq_len = 0;
  int max_blocks_per_sequence = 0;
  std::string describe() const;     // one line for logs
};

// Sizes everything but the weights (already placed, `weights_bytes`) and the backend's scratch for
// `options` on a backend with `free` bytes left after them. Throws RESOURCE_EXHAUSTED when not even one sequence of max_seq_len
// fits, naming the numbers.
MemoryPlan plan_memory(const LlamaConfig& cfg, DeviceKind device, DType act, const ExecutorOptions& options,
                       uint64_t total, uint64_t free, uint64_t weights_bytes);

// What the backend must reserve for its own scratch for a model of `cfg` run with `options`.
ScratchPlan scratch_plan(const LlamaConfig& cfg, const ExecutorOptions& options, int64_t max_quantized_weight_elems);

}  // namespace ts
