// The Llama block's elementwise and attention ops on the CPU, float32, multithreaded. Forward and
// backward come in pairs with arguments ordered outputs, inputs, weights, sizes (llm.c style). The
// CPU versions are the readable reference the CUDA versions will be checked against.
#pragma once
#include <cstdint>

#include "core/backend.h"

namespace ts::cpu {

// out[m, :] = table[ids[m], :]   (M rows of H floats)
void embedding_forward(float* out, const int32_t* ids, const float* table, int64_t M, int H);

// out[M,H] = x * rsqrt(mean(x²) + eps) * w ; rstd[M] saved for the backward.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t M, int H, float eps);
// dx[M,H] (+)= d/dx of the above given dout; w frozen (no weight gradient). accumulate: dx += instead of =.
void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, const float* rstd, int64_t M,
                      int H, bool accumulate);

// Rotates x[M, nheads*D] in place; row m is at position pos[m]. inverse = true applies the transpose
// rotation (the backward of the forward rotation). Tables: Hugging Face rotate_half convention.
void rope_apply(float* x, const int32_t* pos, const RopeView& rope, int64_t M, int nheads, bool inverse);

// out[M,I] = silu(gate) * up
void swiglu_forward(float* out, const float* gate, const float* up, int64_t M, int I);
// dgate, dup [M,I] from dout; gate/up are the forward inputs.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t M, int I);

// x[i] += y[i], i < n
void add_inplace(float* x, const float* y, int64_t n);

// Causal grouped-query attention over B sequences of T tokens (training layout, rows b*T + t):
//   out[b,t,h,:] = Σ_{s<=j<=t} softmax_j(q[b,t,h]·k[b,j,h/G] / √D) v[b,j,h/G],  G = NH/NKV,
// s = doc_start[b*T+t] when packing (a block-diagonal causal mask), else 0.
// q (B*T, NH*D), k/v (B*T, NKV*D) already rotated; lse (B, NH, T) saved log-sum-exp for the backward,
// which recomputes the probabilities instead of storing the (T, T) matrices.
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v, const AttentionShape& s);
// dq (B*T, NH*D), dk/dv (B*T, NKV*D) overwritten.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                        const float* q, const float* k, const float* v, const AttentionShape& s);

// Writes k/v rows (M, KVD) into the paged cache: cache row slot[m] of kv.k / kv.v (float32 pool).
void kv_write(const KVLayerView& kv, const float* k, const float* v, const int32_t* slot, int64_t M);
// Attention of M query rows (inference) over the paged cache: row m attends to positions [0, len[m]) of
// sequence row_seq[m], found through its block table.
void attention_paged(float* out, const float* q, const KVLayerView& kv, const PagedRows& rows, int64_t M, int NH,
                     int NKV, int D);

// out[i, :] = in[index[i], :] and out[index[i], :] = in[i, :], rows of `cols` floats, i < n.
void gather_rows(float* out, const float* in, const int32_t* index, int64_t n, int64_t cols);
void scatter_rows(float* out, const float* in, const int32_t* index, int64_t n, int64_t cols);

// Cross-entropy over rows of logits (M, V) with targets (M) (-100 = ignored). Returns the sum of token
// losses over non-ignored rows; overwrites logits with d(sum·scale)/dlogits = (softmax - onehot)·scale
// for non-ignored rows and 0 for ignored ones.
double cross_entropy_forward_backward(float* logits, const int32_t* targets, int64_t M, int V, float scale);

// *acc += Σ x[i]², accumulated in double in index order.
void sum_squares(double* acc, const float* x, int64_t n);
// torch.optim.AdamW on n parameters (see AdamWStep in core/backend.h).
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& step);

}  // namespace ts::cpu
