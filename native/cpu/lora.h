// The LoRA path on the CPU, float32 (semantics in core/backend.h, LoraApply):
//   forward   y[i] += s · (dropout(x[i]) · Aᵀ) · Bᵀ         per segment of rows sharing one adapter
//   backward  dB += s · dyᵀ · u ; du = s · dy · B ; dA += duᵀ · xd ; dx += dropout(du · A)
// with u = xd · Aᵀ and xd = dropout(x) regenerated from the counter hash (never stored).
#pragma once
#include <cstdint>

#include "core/backend.h"

namespace ts::cpu {

// y (M, out) += the LoRA delta of each segment; scratch u (M, max_rank), xd (M, in) when dropout.
void lora_forward(float* y, const float* x, const LoraApply& lora, float* u, float* xd);
// One adapter over all M rows; scratch u, du (M, r), dxd (M, in), xd (M, in) when dropout.
void lora_backward(float* dx, float* dA, float* dB, const float* dy, const float* x, int64_t M,
                   const LoraModuleView& m, const LoraDropout& dropout, float* u, float* du, float* dxd, float* xd);

}  // namespace ts::cpu
