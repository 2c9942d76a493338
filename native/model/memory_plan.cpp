// plan_memory and plan_training_memory (memory_plan.h).
#include "model/memory_plan.h"

#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "model/kv_cache.h"
#include "model/llama.h"
#include "model/weights.h"

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

// ------------------------------------------------------------------------------------------ training

uint64_t lora_weight_bytes(const LlamaConfig& cfg, const LoraSpec& lora) {
  uint64_t per_layer = 0;  // float32 elements of A (r, in) and B (out, r) over the targets
  for (int t = 0; t < NUM_TARGETS; t++) {
    if (!((lora.target_mask >> t) & 1u)) continue;
    int out = 0, in = 0;
    target_shape(cfg, t, &out, &in);
    per_layer += uint64_t(lora.r) * (uint64_t(in) + uint64_t(out));
  }
  return per_layer * uint64_t(cfg.L) * sizeof(float);
}

namespace {

// The parts that depend on the config and the shape alone.
TrainingMemoryPlan plan_job(const LlamaConfig& cfg, DeviceKind device, DType act, const std::string& quant,
                            const TrainingShape& shape) {
  require(shape.B > 0 && shape.T > 0 && shape.lora.r > 0 && shape.lora.target_mask != 0, "INVALID_ARGUMENT",
          "a training plan needs a batch, a sequence length, a rank and targets");
  TrainingMemoryPlan p;
  p.shape = shape;
  p.device = device;
  p.act = act;
  if (device != DeviceKind::CPU) {
    // Large products through an NF4 weight dequantize it whole; the lm_head's backward converts a
    // chunk of float32 logit gradients (backend.h staging_bytes).
    ScratchPlan s;
    for (int t = 0; t < NUM_TARGETS; t++) {
      int out = 0, in = 0;
      target_shape(cfg, t, &out, &in);
      if (quantizes(quant, in)) s.max_weight_elems = std::max<int64_t>(s.max_weight_elems, int64_t(out) * in);
    }
    s.max_logit_rows = shape.ce_chunk_rows;
    s.vocab = cfg.V;
    p.dequant_buffer = staging_bytes(s, act);
  }
  p.adapter_weights = lora_weight_bytes(cfg, shape.lora);
  p.adapter_state = 3 * p.adapter_weights;
  TrainPassOptions opt;
  opt.recompute = shape.recompute;
  opt.ce_chunk_rows = shape.ce_chunk_rows;
  opt.dropout.p = shape.lora.dropout;
  p.workspace = plan_train_parts(cfg, act, shape.B, shape.T, shape.lora, opt);
  p.job = p.adapter_state + p.workspace.total;
  return p;
}

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", bytes / 1048576.0);
  return buf;
}

}  // namespace

TrainingMemoryPlan plan_training_memory(const LlamaConfig& cfg, DeviceKind device, DType act, const std::string& quant,
                                        const TrainingShape& shape, uint64_t backend_scratch) {
  TrainingMemoryPlan p = plan_job(cfg, device, act, quant, shape);
  p.base = placed_weight_bytes(cfg, quant, act);
  p.backend_scratch = backend_scratch > 0 ? backend_scratch : p.dequant_buffer;
  p.in_use = p.base + p.backend_scratch + p.adapter_weights;
  p.peak = p.in_use + p.job;
  return p;
}

TrainingMemoryPlan plan_training_memory(const LlamaModel& m, const TrainingShape& shape) {
  Backend& be = *m.be;
  TrainingMemoryPlan p = plan_job(m.cfg(), be.device(), be.compute_dtype(), m.w.quant, shape);
  p.base = m.w.bytes;
  p.backend_scratch = m.backend_scratch;
  const MemoryInfo mem = be.memory_info();
  p.free = m.training_limit > 0 ? std::min<uint64_t>(mem.free, m.training_limit) : mem.free;
  p.in_use = mem.total > mem.free ? mem.total - mem.free : 0;
  p.peak = p.in_use + p.job;
  return p;
}

std::string TrainingMemoryPlan::describe() const {
  std::string targets;
  for (int t = 0; t < NUM_TARGETS; t++)
    if ((shape.lora.target_mask >> t) & 1u) targets += std::string(targets.empty() ? "" : ",") + target_name(t);
  const TrainWorkspaceParts& w = workspace;
  std::string s = "batch " + std::to_string(shape.B) + " x " + std::to_string(shape.T) + " tokens, r " +
                  std::to_string(shape.lora.r) + " on " + targets + (shape.recompute ? ", recompute" : ", no recompute") +
                  ", " + dtype_name(act) + " activations: the job needs " + mib(job) +
                  " MiB = adapter gradients + AdamW moments " + mib(adapter_state) + " + workspace " + mib(w.total) +
                  " (inputs " + mib(w.inputs) + ", saved activations " + mib(w.saved_activations) +
                  ", layer working set " + mib(w.layer_working_set) + ", lm_head + cross-entropy chunk " + mib(w.head) +
                  " of which " + mib(w.head_shared) + " over the layer working set); resident: base " + mib(base) +
                  ", backend scratch " + mib(backend_scratch) + " (dequantization buffer " + mib(dequant_buffer) +
                  "), adapter weights " + mib(adapter_weights) + "; peak " + mib(peak) + " MiB";
  if (free > 0) s += "; " + mib(free) + " MiB free";
  return s;
}

void require_fits(const TrainingMemoryPlan& p) {
  if (p.fits()) return;
  throw EngineError("RESOURCE_EXHAUSTED", std::string("the training job does not fit: it needs ") + mib(p.job) +
                                              " MiB and " + device_name(p.device) + " memory has " + mib(p.free) +
                                              " MiB free (" + p.describe() + ")");
}

}  // namespace ts
