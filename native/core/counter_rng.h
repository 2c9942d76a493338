// Counter-based random numbers shared by the CPU and CUDA backends: the same (key, index) always gives
// the same value, so a dropout mask is never stored (a recomputed forward and the backward regenerate
// it) and both backends draw identical masks.
#pragma once
#include <cstdint>

#include "core/host_device.h"

namespace ts {

TS_HD inline uint64_t splitmix64_hash(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform [0, 1) with 24 random bits (exact in float32).
TS_HD inline float counter_uniform(uint64_t key, uint64_t index) {
  return (float)(splitmix64_hash(key ^ splitmix64_hash(index)) >> 40) * (1.0f / 16777216.0f);
}

// The key of the LoRA dropout mask of one module in one micro-step of a training run.
TS_HD inline uint64_t lora_dropout_key(uint64_t seed, uint64_t step, int layer, int target) {
  return splitmix64_hash(splitmix64_hash(splitmix64_hash(seed) ^ step) ^ ((uint64_t)layer << 8 | (uint64_t)target));
}

}  // namespace ts
