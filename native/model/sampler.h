// Turns one row of logits into the next token: repetition penalty, temperature, top-k, top-p, then a
// seeded draw (or argmax when temperature == 0). Semantics follow Hugging Face generate():
//   repetition penalty (CTRL): for every token id already in the context, logit > 0 ? logit / p : logit * p
//   temperature: logits / t;  top-k: keep the k largest;  top-p: keep the smallest set of most likely
//   tokens whose probability sums to >= top_p (always at least one).
#pragma once
#include <cstdint>
#include <vector>

namespace ts {

struct SamplingParams {
  float temperature = 0.f;          // 0: greedy
  int top_k = 0;                    // 0: off
  float top_p = 1.f;                // 1: off
  float repetition_penalty = 1.f;   // 1: off
  uint64_t seed = 0;
};

// Per-request random stream (xoshiro256**), seeded by splitmix64(seed); deterministic across runs.
struct SamplerRng {
  uint64_t s[4];
  explicit SamplerRng(uint64_t seed = 0);
  uint64_t next();
  double uniform();  // [0, 1)
};

// logits (V) is modified in place (penalty, temperature). `context` is every token id of the prompt
// and of what was generated so far (for the repetition penalty).
int32_t sample_token(float* logits, int V, const SamplingParams& params, const std::vector<int32_t>& context,
                     SamplerRng& rng);

}  // namespace ts
