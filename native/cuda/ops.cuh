// The CUDA kernels of the op set (core/backend.h), as launchers with the CPU ops' names and argument
// order (outputs, inputs, weights, sizes) plus a stream. One .cu per op family:
//   elementwise.cu  embedding, add, swiglu, rope, row gather/scatter, KV write
//   norm.cu         rmsnorm forward/backward
//   nf4.cu          NF4 dequantize, fused NF4 products for small M
//   gemm.cu         a tiled SIMT matrix product (mixed operand types, float32 accumulation)
//   attention.cu    paged attention (inference), causal attention forward/backward (training)
//   lora.cu         per-row LoRA shrink/expand over adapter slots
//   loss.cu         cross-entropy, sum of squares, AdamW
//   sample.cu       sampling (greedy, temperature, top-k, top-p, repetition penalty)
// T is the activation type: float (the float32-compute check mode) or bf16. Every launcher checks its
// launch (CUDA_CHECK_LAUNCH), so a bad configuration is reported where it happened.
#pragma once
#include <cstdint>

#include "core/backend.h"
#include "cuda/common.cuh"

namespace ts::cuda {

// ---- elementwise.cu ----
// out[m] = table[ids[m]]   (M, H)
template <typename T>
void embedding_forward(T* out, const int32_t* ids, const T* table, int64_t M, int H, cudaStream_t stream);
// x[i] += y[i]
template <typename T>
void add_inplace(T* x, const T* y, int64_t n, cudaStream_t stream);
// x[i] += y[i] with y float32 (LoRA input gradients into bf16 activations)
template <typename T>
void accumulate_f32(T* x, const float* y, int64_t n, cudaStream_t stream);
// out = silu(gate) · up ; the backward from dout
template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, int64_t n, cudaStream_t stream);
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, int64_t n, cudaStream_t stream);
// Rotates x (M, nheads·D) in place, rotate_half convention, row m at position pos[m].
template <typename T>
void rope_apply(T* x, const int32_t* pos, const RopeView& rope, int64_t M, int nheads, bool inverse, cudaStream_t stream);
// out[i] = in[index[i]] / out[index[i]] = in[i]   (n rows of `cols`)
template <typename T>
void gather_rows(T* out, const T* in, const int32_t* index, int64_t n, int64_t cols, cudaStream_t stream);
template <typename T>
void scatter_rows(T* out, const T* in, const int32_t* index, int64_t n, int64_t cols, cudaStream_t stream);
// k/v rows (M, KVD) into cache rows slot[m]
template <typename T>
void kv_write(T* k_cache, T* v_cache, const T* k, const T* v, const int32_t* slot, int64_t M, int KVD,
              cudaStream_t stream);
// out[i] = (To) in[i]
template <typename To, typename Ti>
void convert(To* out, const Ti* in, int64_t n, cudaStream_t stream);

// ---- norm.cu ----
template <typename T>
void rmsnorm_forward(T* out, float* rstd, const T* x, const T* w, int64_t M, int H, float eps, cudaStream_t stream);
template <typename T>
void rmsnorm_backward(T* dx, const T* dout, const T* x, const T* w, const float* rstd, int64_t M, int H, bool accumulate,
                      cudaStream_t stream);

// ---- nf4.cu ----
// out (rows, cols) = dequant(W)
template <typename T>
void nf4_dequantize(T* out, const NF4View& w, cudaStream_t stream);
// Largest M the fused products take; above it, dequantize + matrix product.
constexpr int64_t NF4_FUSED_MAX_M = 16;
// y[m, n] = Σ_k x[m, k] · W[n, k] + beta · y[m, n]   (M <= NF4_FUSED_MAX_M; W read once)
template <typename T, typename Y>
void nf4_matmul_nt(Y* y, const T* x, const NF4View& w, int64_t M, float beta, cudaStream_t stream);

// ---- gemm.cu ----
// C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C, row-major with leading dimensions, float32
// accumulation; beta == 0 never reads C.
template <typename TA, typename TB, typename TC>
void gemm_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const TA* A, int64_t lda,
                    const TB* B, int64_t ldb, float beta, TC* C, int64_t ldc, cudaStream_t stream);

// ---- attention.cu ----
template <typename T>
void attention_paged(T* out, const T* q, const KVLayerView& kv, const PagedRows& rows, int64_t M, int NH, int NKV, int D,
                     cudaStream_t stream);
template <typename T>
void attention_forward(T* out, float* lse, const T* q, const T* k, const T* v, const AttentionShape& s,
                       cudaStream_t stream);
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const float* lse, const T* q, const T* k,
                        const T* v, const AttentionShape& s, cudaStream_t stream);

// ---- lora.cu ----
// u[i, 0:r] = dropout(x[i]) · A[a]ᵀ for the adapter a = slots[row_slot[i]] of each row (rows with
// slot -1, or whose adapter lacks this module, get nothing); u is (M, max_rank) float32.
template <typename T>
void lora_shrink_rows(float* u, const T* x, const int32_t* row_slot, const LoraModuleView* slots, int64_t M, int in,
                      int max_rank, const LoraDropout& dropout, cudaStream_t stream);
// y[i] += s[a] · u[i, 0:r] · B[a]ᵀ   (same rows as lora_shrink_rows)
template <typename T>
void lora_expand_rows(T* y, const float* u, const int32_t* row_slot, const LoraModuleView* slots, int64_t M, int out,
                      int max_rank, cudaStream_t stream);
// v[rows, in] (float32) *= dropout mask / (1 - p), rows numbered from row0 (the CPU's dropout_in_place)
void lora_dropout(float* v, int64_t rows, int in, int64_t row0, const LoraDropout& dropout, cudaStream_t stream);

// ---- loss.cu ----
// *loss_sum += Σ token losses; logits (M, V) float32 become (softmax - onehot)·scale when scale != 0
void cross_entropy(double* loss_sum, float* logits, const int32_t* targets, int64_t M, int V, float scale,
                   cudaStream_t stream);
// *acc += Σ x[i]², double
void sum_squares(double* acc, const float* x, int64_t n, cudaStream_t stream);
void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& step, cudaStream_t stream);

// ---- sample.cu ----
// Per-row sampling parameters in device memory; u is the row's uniform draw (host-drawn).
struct DeviceSampleRow {
  float temperature = 0.f;
  int top_k = 0;
  float top_p = 1.f;
  float repetition_penalty = 1.f;
  double u = 0.0;
  int64_t context_begin = 0, context_end = 0;  // the row's ids in the context array (penalty only)
};
// ids[i] = the token sampled from logits row i (modified in place); `context` holds every row's seen
// ids back to back; `scratch` is at least sample_scratch_bytes(n, V) bytes.
size_t sample_scratch_bytes(int64_t n, int V);
void sample_rows(int32_t* ids, float* logits, const DeviceSampleRow* rows, const int32_t* context, int64_t n, int V,
                 void* scratch, cudaStream_t stream);

}  // namespace ts::cuda
