// merge_and_unload: folds a LoRA adapter into the base weights, W' = W + s·B·A, computed in float32 and
// written in the requested dtype, streaming the base model's original shards tensor by tensor (one
// tensor in memory at a time), one output shard per input shard with the same file name and tensor
// order. Mode "dequantized" merges into dequant(NF4(W)) — the weights the adapter was trained
// against on an NF4 base — instead of the original W.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/dtype.h"
#include "model/config.h"
#include "model/lora.h"

namespace ts {

struct MergeSpec {
  LlamaConfig cfg;
  std::vector<std::string> shards;     // absolute paths of the base model's shards
  std::string out_dir;                 // existing folder; shard files are written here atomically
  const LoraAdapter* adapter = nullptr;
  DType dtype = DType::BF16;           // output dtype of every floating tensor
  bool into_dequantized = false;       // merge into dequant(NF4(W)) for the quantizable linear weights
  Backend* host = nullptr;             // a host-memory (CPU) backend for the products
};

struct MergeProgress {
  std::string tensor;
  int64_t index = 0, total = 0;  // tensors done (1-based) of all tensors
  bool merged = false;           // whether this tensor received an adapter delta
};

struct MergeResult {
  std::vector<std::string> files;   // output shard file names (same as the inputs')
  int64_t bytes = 0;                // total bytes written
  int64_t tensors = 0, merged_tensors = 0;
  std::vector<std::pair<std::string, std::string>> weight_map;  // tensor name -> output file name
};

// `cancelled` is polled between tensors (throws EngineError CANCELLED, leaving no partial shard).
MergeResult merge_adapter(const MergeSpec& spec, const std::function<void(const MergeProgress&)>& progress,
                          const std::function<bool()>& cancelled);

}  // namespace ts
