// What a generation request asks of the sampler, and its random stream. The semantics of sampling
// (Hugging Face generate(): repetition penalty, temperature, top-k, top-p, one draw) are documented
// beside the CPU implementation, cpu/sampler.h; the CUDA kernel follows the same rules.
#pragma once
#include <cstdint>

namespace ts {

struct SamplingParams {
  float temperature = 0.f;          // 0: greedy
  int top_k = 0;                    // 0: off
  float top_p = 1.f;                // 1: off
  float repetition_penalty = 1.f;   // 1: off
  uint64_t seed = 0;
};

// Per-request random stream (xoshiro256**), seeded by splitmix64(seed); deterministic across runs.
// A sampled token (temperature > 0) consumes exactly one uniform() draw.
struct SamplerRng {
  uint64_t s[4];
  explicit SamplerRng(uint64_t seed = 0);
  uint64_t next();
  double uniform();  // [0, 1)
};

}  // namespace ts
