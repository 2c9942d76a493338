// The CPU sampler: turns one row of logits into the next token: repetition penalty, temperature, top-k, top-p, then a
// seeded draw (or argmax when temperature == 0). Semantics follow Hugging Face generate():
//   repetition penalty (CTRL): for every token id already in the context, logit > 0 ? logit / p : logit * p
//   temperature: logits / t;  top-k: keep the k largest;  top-p: keep the smallest set of most likely
//   tokens whose probability sums to >= top_p (always at least one).
#pragma once
#include <cstdint>
#include <vector>

#include "core/sampling.h"

namespace ts::cpu {

// Where the one uniform draw of a sampled token comes from: the request's stream (taken only when a
// draw happens, so the stream advances exactly as before), or a value drawn beforehand by the caller
// (the executor draws it on the host so the CUDA sampler uses the very same number).
struct UniformSource {
  SamplerRng* rng = nullptr;
  double fixed = 0.0;
  double next() { return rng ? rng->uniform() : fixed; }
};

// logits (V) is modified in place (penalty, temperature). `context` is every token id of the prompt
// and of what was generated so far (for the repetition penalty).
int32_t sample_token(float* logits, int V, const SamplingParams& params, const std::vector<int32_t>& context,
                     UniformSource u);

}  // namespace ts::cpu
