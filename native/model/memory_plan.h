// The memory plan of one engine process, made once at start from the configuration and the backend's
// free memory: the base weights, the adapter pool, the inference workspace of one step, and the paged
// KV cache from what remains (its share of that remainder, unless a size is configured). What is left
// after the plan stays free for training jobs, each planned when it starts (TrainingMemoryPlan below):
// a job that does not fit is refused, naming the numbers. Both are reported by GetModelInfo.
#pragma once
#include <cstdint>
#include <string>

#include "core/backend.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/lora.h"

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
  uint64_t training_memory_bytes = 0;  // most a training job may take (0: what the backend has free)
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

// ------------------------------------------------------------------------------------------ training

// What a training job is planned for: its largest pass and its adapter, on a backend.
struct TrainingShape {
  int B = 0, T = 0;          // the largest pass: B sequences of T tokens
  LoraSpec lora;             // rank, targets and dropout of the trained adapter
  bool recompute = true;     // gradient checkpointing
  int ce_chunk_rows = TrainPassOptions{}.ce_chunk_rows;
};

// The memory of one training job, planned before it starts from the config, its shape and the backend's
// memory. What is already resident (the frozen base, the backend's scratch, the adapter's A and B in the
// adapter pool) is shared with serving and not counted again; the job needs `job` bytes more.
struct TrainingMemoryPlan {
  TrainingShape shape;
  DeviceKind device = DeviceKind::CPU;
  DType act = DType::F32;         // activation dtype
  // Resident before the job, shared with serving.
  uint64_t base = 0;              // the frozen base weights
  uint64_t backend_scratch = 0;   // the backend's own scratch, reserved at start
  uint64_t dequant_buffer = 0;    // the part of it a pass uses: the largest NF4 weight dequantized, or a
                                  // chunk of float32 logits converted to the compute dtype (0 on the CPU)
  uint64_t adapter_weights = 0;   // A and B, float32, in the adapter pool
  // The job's own.
  uint64_t adapter_state = 0;     // gradients and AdamW moments, float32: 3 x adapter_weights
  TrainWorkspaceParts workspace;  // the passes' arena, by part (model/llama.h)
  uint64_t job = 0;               // adapter_state + workspace.total: what must be free when the job starts
  // The backend's memory when the plan was made.
  uint64_t in_use = 0;            // already in use (from the config alone: base + backend scratch + adapter)
  uint64_t free = 0;              // free, or the engine's limit for training when lower (0 when planned
                                  // from the config alone)
  uint64_t peak = 0;              // in_use + job
  bool fits() const { return job <= free; }
  std::string describe() const;   // every part, in MiB
};

// The bytes of an adapter's A and B (float32) for `lora` on a base of `cfg`.
uint64_t lora_weight_bytes(const LlamaConfig& cfg, const LoraSpec& lora);

// Plans a job of `shape` from the config alone: the base as place_weights lays it out for `quant` in a
// backend that copies it, dense tensors and activations in `act` (bf16 on CUDA, f32 on the CPU); the
// backend's scratch is `backend_scratch` bytes, or just the dequantization buffer when 0 (the CPU
// needs none). in_use = base + scratch + adapter weights; free stays 0.
TrainingMemoryPlan plan_training_memory(const LlamaConfig& cfg, DeviceKind device, DType act, const std::string& quant,
                                        const TrainingShape& shape, uint64_t backend_scratch = 0);
// Plans a job of `shape` on a running model: its placed base, the scratch its backend reserved, and
// the backend's memory now.
TrainingMemoryPlan plan_training_memory(const LlamaModel& model, const TrainingShape& shape);
// Throws RESOURCE_EXHAUSTED naming the numbers unless the plan fits.
void require_fits(const TrainingMemoryPlan& plan);

}  // namespace ts
