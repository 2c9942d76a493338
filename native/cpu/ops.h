// The Llama block's elementwise and attention ops on the CPU, float32, multithreaded. Forward and
// backward come in pairs with arguments ordered outputs, inputs, weights, sizes (llm.c style). The
// CPU versions are the readable reference the CUDA versions will be checked against.
#pragma once
#include <cstdint>

namespace ts::cpu {

// out[M,H] = x * rsqrt(mean(x²) + eps) * w ; rstd[M] saved for the backward.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t M, int H, float eps);
// dx[M,H] (+)= d/dx of the above given dout; w frozen (no weight gradient). accumulate: dx += instead of =.
void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, const float* rstd, int64_t M,
                      int H, bool accumulate);

// Rotary tables for positions [0, P): cos/sin (P, D/2), Hugging Face rotate_half convention with the
// optional "llama3" frequency scaling; angles computed in float32 like transformers does.
struct RopeTable {
  int D = 0;
  int64_t P = 0;
  float* cos = nullptr;  // (P, D/2)
  float* sin = nullptr;  // (P, D/2)
};
// Rotates x[M, nheads*D] in place; row m is at position pos[m]. inverse = true applies the transpose
// rotation (the backward of the forward rotation).
void rope_apply(float* x, const int32_t* pos, const RopeTable& rope, int64_t M, int nheads, bool inverse);

// out[M,I] = silu(gate) * up
void swiglu_forward(float* out, const float* gate, const float* up, int64_t M, int I);
// dgate, dup [M,I] from dout; gate/up are the forward inputs.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t M, int I);

// Causal grouped-query attention over B sequences of T tokens (training layout, rows b*T + t):
//   out[b,t,h,:] = Σ_{j<=t} softmax_j(q[b,t,h]·k[b,j,h/G] / √D) v[b,j,h/G],  G = NH/NKV.
// q (B*T, NH*D), k/v (B*T, NKV*D) already rotated; lse (B, NH, T) saved log-sum-exp for the backward,
// which recomputes the probabilities instead of storing the (T, T) matrices.
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v, int B, int T, int NH,
                       int NKV, int D);
// dq (B*T, NH*D), dk/dv (B*T, NKV*D) overwritten.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                        const float* q, const float* k, const float* v, int B, int T, int NH, int NKV, int D);

// Attention of `M` query rows against per-row KV caches (inference): row m attends to cache positions
// [0, len[m]) of its sequence; k_rows[m]/v_rows[m] point at that sequence's cache for this layer,
// laid out (positions, NKV*D).
void attention_decode(float* out, const float* q, const float* const* k_rows, const float* const* v_rows,
                      const int32_t* len, int64_t M, int NH, int NKV, int D);

// Cross-entropy over rows of logits (M, V) with targets (M) (-100 = ignored). Returns the sum of token
// losses over non-ignored rows; overwrites logits with d(sum·scale)/dlogits = (softmax - onehot)·scale
// for non-ignored rows and 0 for ignored ones.
double cross_entropy_forward_backward(float* logits, const int32_t* targets, int64_t M, int V, float scale);

}  // namespace ts::cpu
