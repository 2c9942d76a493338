// plan_memory (memory_plan.h).
#include "model/memory_plan.h"

#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "model/kv_cache.h"
#include "model/llama.h"

namespace ts {

std::string MemoryPlan::describe() const {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "weights %.1f MiB, backend scratch %.1f MiB, adapter pool %d slots %.1f MiB, step workspace %.1f MiB, KV cache %lld blocks x %d "
                "positions (%.1f MiB), %.1f MiB of %.1f MiB free at start",
                weights / 1048576.0, backend_scratch / 1048576.0, adapter_slots, adapter_pool / 1048576.0, workspace / 1048576.0,
                (long long)kv_blocks, kv_block_size, kv_cache / 1048576.0, free_at_start / 1048576.0, total / 1048576.0);
  return buf;
}

MemoryPlan plan_memory(const LlamaConfig& cfg, DeviceKind device, DType act, const ExecutorOptions& o, uint64_t total,
                       uint64_t free, uint64_t weights_bytes) {
  require(o.max_active_sequences > 0 && o.prefill_chunk > 0 && o.adapter_slots > 0 && o.kv_block_size > 0 &&
              o.max_lora_rank > 0,
          "INVALID_ARGUMENT", "engine limits must be positive");
  MemoryPlan p;
  p.total = total;
  p.free_at_start = free;
  p.weights = weights_bytes;
  p.max_seq_len = o.max_seq_len > 0 ? std::min(o.max_seq_len, cfg.max_pos) : cfg.max_pos;
  p.kv_block_size = o.kv_block_size;
  p.max_blocks_per_sequence = int(KVPool::blocks_for(p.max_seq_len, o.kv_block_size));
  p.workspace = plan_inference_workspace(cfg, act, int64_t(o.prefill_chunk) + o.max_active_sequences,
                                         o.max_active_sequences, p.max_blocks_per_sequence, o.max_active_sequences,
                                         o.max_lora_rank);
  uint64_t left = free > p.workspace ? free - p.workspace : 0;
  p.adapter_slots = o.adapter_slots;
  const uint64_t table = uint64_t(cfg.L) * NUM_TARGETS * uint64_t(o.adapter_slots) * sizeof(LoraModuleView);
  const uint64_t budget = o.adapter_pool_bytes > 0 ? o.adapter_pool_bytes : device == DeviceKind::CPU ? 0 : left / 8;
  p.adapter_budget = budget;
  p.adapter_pool = budget + table;
  left = left > p.adapter_pool ? left - p.adapter_pool : 0;
  p.kv_block_bytes = KVPool::block_bytes(cfg, o.kv_block_size, act);
  // Enough for every active sequence at full length (plus the scratch block), unless memory is short.
  const int64_t wanted = int64_t(o.max_active_sequences) * p.max_blocks_per_sequence + 1;
  int64_t blocks = wanted;
  if (o.kv_cache_bytes > 0) {
    blocks = int64_t(o.kv_cache_bytes / p.kv_block_bytes);
  } else {
    const double share = o.kv_share > 0 ? o.kv_share : device == DeviceKind::CPU ? 0.25 : 0.5;
    blocks = std::min<int64_t>(wanted, int64_t(double(left) * share / double(p.kv_block_bytes)));
  }
  if (blocks < 2)
    throw EngineError("RESOURCE_EXHAUSTED",
                      std::string("no room for a KV cache: ") + std::to_string(left >> 20) + " MiB left after weights (" +
                          std::to_string(weights_bytes >> 20) + " MiB), adapters and workspace; one block takes " +
                          std::to_string(p.kv_block_bytes >> 10) + " KiB");
  p.kv_blocks = blocks;
  p.kv_cache = uint64_t(blocks) * p.kv_block_bytes;
  return p;
}

ScratchPlan scratch_plan(const LlamaConfig& cfg, const ExecutorOptions& o, int64_t max_quantized_weight_elems) {
  ScratchPlan s;
  s.max_weight_elems = max_quantized_weight_elems;
  s.max_logit_rows = std::max<int64_t>(o.max_active_sequences, TrainPassOptions{}.ce_chunk_rows);
  s.vocab = cfg.V;
  s.max_sample_rows = o.max_active_sequences;
  const int64_t seq = o.max_seq_len > 0 ? std::min(o.max_seq_len, cfg.max_pos) : cfg.max_pos;
  s.max_context_ids = int64_t(o.max_active_sequences) * seq;
  return s;
}

}  // namespace ts
