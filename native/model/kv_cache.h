// The paged KV cache: one pool of fixed-size blocks per process, in the backend's memory, shared by all
// sequences; each sequence owns a list of blocks (its block table) covering its positions in order.
// The pool is sized once at start (model/memory_plan.h) and never grows. Block 0 is reserved as a
// scratch block that padding rows of a captured step write into, so it is never handed out.
//
// Layout of each of k and v: (L, num_blocks, block_size, KVD), KVD = NKV·D, compute dtype.
#pragma once
#include <cstdint>
#include <mutex>
#include <vector>

#include "core/backend.h"
#include "model/config.h"

namespace ts {

class KVPool {
 public:
  static constexpr int DEFAULT_BLOCK_SIZE = 16;  // positions per block
  // Bytes one block takes, k and v over all layers.
  static size_t block_bytes(const LlamaConfig& cfg, int block_size, DType dtype);
  static int64_t blocks_for(int64_t positions, int block_size) { return (positions + block_size - 1) / block_size; }

  KVPool(Backend& backend, const LlamaConfig& cfg, int block_size, int64_t num_blocks);

  KVLayerView layer(int l) const;
  int block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t usable_blocks() const { return num_blocks_ - 1; }  // without the scratch block
  int64_t free_blocks() const;
  size_t bytes() const { return k_.bytes() + v_.bytes(); }

  // Takes n blocks (appended to *table), or returns false and takes none when fewer are free.
  bool allocate(int64_t n, std::vector<int32_t>* table);
  // Returns the blocks of a table to the pool and clears it.
  void release(std::vector<int32_t>* table);

 private:
  int L_, KVD_, block_size_;
  int64_t num_blocks_;
  DType dtype_;
  Buffer k_, v_;
  mutable std::mutex mu_;
  std::vector<int32_t> free_;  // free block ids; taken from the back
};

}  // namespace ts
