// KVPool (kv_cache.h): the block pool and its free list.
#include "model/kv_cache.h"

#include <algorithm>

#include "core/error.h"

namespace ts {

size_t KVPool::block_bytes(const LlamaConfig& cfg, int block_size, DType dtype) {
  return 2 * size_t(cfg.L) * size_t(block_size) * size_t(cfg.NKV) * size_t(cfg.D) * dtype_size(dtype);
}

KVPool::KVPool(Backend& backend, const LlamaConfig& cfg, int block_size, int64_t num_blocks)
    : L_(cfg.L), KVD_(cfg.NKV * cfg.D), block_size_(block_size), num_blocks_(num_blocks), dtype_(backend.compute_dtype()) {
  require(block_size > 0 && num_blocks >= 2, "INVALID_ARGUMENT",
          "the KV cache needs at least 2 blocks (one is reserved); got " + std::to_string(num_blocks));
  const size_t half = block_bytes(cfg, block_size, dtype_) / 2 * size_t(num_blocks);
  k_ = Buffer(backend, half);
  v_ = Buffer(backend, half);
  // A position is always written before it is read, except in the scratch block, which padding rows
  // of a captured step read: zero it (in every layer) so those reads are finite. The rest is left
  // untouched, so host memory behind a large CPU pool is only committed as sequences fill it.
  const size_t block = block_bytes(cfg, block_size, dtype_) / 2 / size_t(cfg.L);
  const size_t layer = block * size_t(num_blocks);
  for (int l = 0; l < cfg.L; l++) {
    backend.fill_zero(static_cast<char*>(k_.data()) + size_t(l) * layer, block);
    backend.fill_zero(static_cast<char*>(v_.data()) + size_t(l) * layer, block);
  }
  free_.reserve(size_t(num_blocks - 1));
  for (int64_t b = num_blocks - 1; b >= 1; b--) free_.push_back(int32_t(b));  // block 1 is handed out first
}

KVLayerView KVPool::layer(int l) const {
  KVLayerView v;
  const size_t layer_bytes = size_t(num_blocks_) * size_t(block_size_) * size_t(KVD_) * dtype_size(dtype_);
  v.k = static_cast<char*>(k_.data()) + size_t(l) * layer_bytes;
  v.v = static_cast<char*>(v_.data()) + size_t(l) * layer_bytes;
  v.dtype = dtype_;
  v.block_size = block_size_;
  v.num_blocks = num_blocks_;
  v.KVD = KVD_;
  return v;
}

int64_t KVPool::free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return int64_t(free_.size());
}

bool KVPool::allocate(int64_t n, std::vector<int32_t>* table) {
  std::lock_guard<std::mutex> lock(mu_);
  if (n > int64_t(free_.size())) return false;
  for (int64_t i = 0; i < n; i++) {
    table->push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void KVPool::release(std::vector<int32_t>* table) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.insert(free_.end(), table->rbegin(), table->rend());
  table->clear();
}

}  // namespace ts
