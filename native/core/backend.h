// The backend interface: the op set the Llama model is written against once, implemented by the CPU
// backend (native/cpu, float32, the oracle) and the CUDA backend (native/cuda, bf16 activations with
// float32 accumulation, or float32 in its check mode). The model never includes either backend.
//
// Memory: a backend hands out raw allocations in its own memory (Buffer owns one). Everything a pass
// uses is planned before it runs and carved out of an Arena; ops never allocate (the CPU matrix
// kernels keep their own per-thread packing scratch, which is not model state). Pointers and tensors
// passed to ops live in the backend's memory; int32 index arrays too (the model uploads them).
//
// Shape letters (as everywhere in native/): M rows of a pass, H hidden, I intermediate, V vocab,
// NH query heads, NKV kv heads, D head dim, r LoRA rank, B sequences, T tokens per sequence.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/nf4.h"
#include "core/sampling.h"

namespace ts {

enum class DeviceKind { CPU, CUDA };
inline const char* device_name(DeviceKind d) { return d == DeviceKind::CPU ? "cpu" : "cuda"; }

// A non-owning view of a row-major matrix in some backend's memory.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  int64_t ld = 0;  // elements from one row to the next (>= cols)
  DeviceKind device = DeviceKind::CPU;

  int64_t numel() const { return rows * cols; }
  bool contiguous() const { return ld == cols; }
  float* f32() const;  // data as float*; throws unless dtype is F32
  // Rows [begin, end) of this view.
  Tensor rows_view(int64_t begin, int64_t end) const;
};
// A (rows, cols) view at `data`, contiguous.
Tensor make_tensor(void* data, DType dtype, int64_t rows, int64_t cols, DeviceKind device);

class Backend;

// One allocation in a backend's memory, freed with it. Move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& backend, size_t bytes);
  ~Buffer();
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  Backend* backend_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Carves aligned pieces out of one region, in order; reset() starts over. A measuring arena (no
// region) hands out null views and only counts, so the code that carves a pass's workspace is also
// the code that plans its size: run it once measuring, allocate used(), run it again for real.
class Arena {
 public:
  static constexpr size_t ALIGN = 256;  // cuBLASLt and vector loads want 16; 256 keeps rows apart
  static Arena measuring(DeviceKind device);
  Arena() = default;
  Arena(void* base, size_t capacity, DeviceKind device, std::string name);

  void reset() { used_ = 0; }
  // Moves the carving point (<= capacity). Buffers whose lifetimes never overlap share memory this way:
  // carve one set, seek back, carve the other over it, then seek past the larger.
  void seek(size_t used);
  void* take_bytes(size_t bytes);  // throws RESOURCE_EXHAUSTED when the region is too small
  Tensor take(int64_t rows, int64_t cols, DType dtype);
  template <typename T>
  T* take_array(int64_t n) {
    return static_cast<T*>(take_bytes(size_t(n) * sizeof(T)));
  }
  size_t used() const { return used_; }
  size_t peak() const { return peak_; }
  size_t capacity() const { return capacity_; }
  bool is_measuring() const { return measuring_; }
  DeviceKind device() const { return device_; }

 private:
  char* base_ = nullptr;
  size_t capacity_ = 0, used_ = 0, peak_ = 0;
  bool measuring_ = false;
  DeviceKind device_ = DeviceKind::CPU;
  std::string name_;
};

// ---- weights and caches as the ops see them (all pointers in backend memory) -----------------------

// A frozen linear weight W [out, in]: dense (F32 or BF16) or NF4 with double-quantized absmax.
struct LinearView {
  int out = 0, in = 0;
  bool quantized = false;
  Tensor dense;  // (out, in) when !quantized
  NF4View nf4;   // when quantized
};

// Rotary tables cos/sin (P, D/2), float32, Hugging Face rotate_half convention.
struct RopeView {
  int D = 0;
  int64_t P = 0;
  const float* cos = nullptr;
  const float* sin = nullptr;
};

// Shape of the training attention: B sequences of T rows each (row b*T + t). doc_start, when set,
// packs several documents into one sequence: row t attends to rows [doc_start[b*T+t], t] of its
// sequence (a block-diagonal causal mask); null means every row attends to [0, t].
struct AttentionShape {
  int B = 0, T = 0, NH = 0, NKV = 0, D = 0;
  const int32_t* doc_start = nullptr;  // (B*T) or null
};

// One layer of the paged KV pool: k and v are (num_blocks, block_size, KVD) in the backend's
// activation dtype; position p of a sequence lives in block table[p / block_size], row p % block_size.
struct KVLayerView {
  void* k = nullptr;
  void* v = nullptr;
  DType dtype = DType::F32;
  int block_size = 0;
  int64_t num_blocks = 0;
  int KVD = 0;  // NKV * D
};

// Where the rows of an inference step read and write the paged cache.
struct PagedRows {
  const int32_t* slot = nullptr;          // (M) cache row written by row m: block * block_size + offset
  const int32_t* row_seq = nullptr;       // (M) index of the row's sequence in block_tables
  const int32_t* block_tables = nullptr;  // (S, max_blocks) block ids of each sequence, in position order
  const int32_t* len = nullptr;           // (M) row m attends to its sequence's positions [0, len[m])
  int max_blocks = 0;
};

// One LoRA module (A (r, in), B (out, r), float32) of one adapter.
struct LoraModuleView {
  int r = 0, in = 0, out = 0;
  float scaling = 0.f;  // alpha / r, or alpha / √r with rslora
  const float* A = nullptr;
  const float* B = nullptr;
};

// Dropout on the LoRA input (training only): keep element (row, col) iff
// counter_uniform(key, row * in + col) >= p (core/counter_rng.h), kept values scaled by 1 / (1 - p).
struct LoraDropout {
  float p = 0.f;
  uint64_t key = 0;  // lora_dropout_key(seed, step, layer, target)
};

// The LoRA delta of one (layer, target) over the rows of a pass:
//   y[i] += s[a] · (dropout(x[i]) · A[a]ᵀ) · B[a]ᵀ    a = the adapter of row i (rows without one: nothing)
// Backends pick their form: `segments` (host, contiguous row ranges, one module each) or the
// per-row form `row_slot` + `slot_modules` (backend memory; what a captured CUDA graph replays).
struct LoraSegment {
  int64_t row_begin = 0, row_end = 0;
  LoraModuleView module;  // module.A == nullptr: base only
};
struct LoraApply {
  std::vector<LoraSegment> segments;              // host
  const int32_t* row_slot = nullptr;              // (M) adapter slot of each row, -1 none
  const LoraModuleView* slot_modules = nullptr;   // (slots) each slot's module for this (layer, target)
  int max_rank = 0;                               // largest r among the modules
  LoraDropout dropout;
};
// Scratch of the LoRA ops, carved by the caller: u (M, max_rank) float32; xd (M, in) float32 for the
// dropped-out input (only with dropout); du (M, r) and dxd (M, in) float32 for the backward.
struct LoraScratch {
  Tensor u, xd, du, dxd;
};

// torch.optim.AdamW's update with the scalars precomputed on the host (see model/trainer.cpp):
//   g' = g·clip; p *= decay; m = b1·m + (1-b1)·g'; v = b2·v + (1-b2)·g'²; p -= step_size·m / (√v/sqrt_bc2 + eps)
struct AdamWStep {
  float clip = 1.f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float step_size = 0.f;  // lr / (1 - beta1^t)
  float sqrt_bc2 = 1.f;   // sqrt(1 - beta2^t)
  float decay = 1.f;      // 1 - lr · weight_decay
};

// One row to sample: its params, the ids it has seen (for the repetition penalty) and the request's
// random stream, from which a sampled token (temperature > 0) takes exactly one uniform draw.
struct SampleRow {
  SamplingParams params;
  const std::vector<int32_t>* context = nullptr;
  SamplerRng* rng = nullptr;
};

// What the backend's own scratch must hold, reserved once at start so that no op allocates: dequantized
// weights for large products through a quantized linear, staging for large float32 operands, and the
// sampler's per-step buffers.
struct ScratchPlan {
  int64_t max_weight_elems = 0;   // largest quantized linear, out · in
  int64_t max_logit_rows = 0;     // rows of float32 logits an op may see at once
  int vocab = 0;
  int64_t max_sample_rows = 0;    // rows sampled in one step
  int64_t max_context_ids = 0;    // ids the repetition penalty may look at in one step, all rows
};

// Bytes of the staging buffer of a backend that dequantizes for large products: the largest quantized
// weight, or a chunk of float32 logits converted for a product, in the compute dtype `act`.
inline size_t staging_bytes(const ScratchPlan& p, DType act) {
  const int64_t elems = p.max_weight_elems > p.max_logit_rows * p.vocab ? p.max_weight_elems : p.max_logit_rows * p.vocab;
  return size_t(elems) * dtype_size(act);
}

struct MemoryInfo {
  uint64_t total = 0, free = 0;  // bytes of the backend's memory (device memory for CUDA, RAM for the CPU)
};

class Backend {
 public:
  virtual ~Backend() = default;

  // ---- identity and memory ----
  virtual DeviceKind device() const = 0;
  virtual std::string description() const = 0;  // e.g. "cpu avx512, 2 threads" / "NVIDIA H200 (sm_90)"
  // Activation and KV-cache dtype: F32 on the CPU; BF16 on CUDA (F32 in its check mode).
  virtual DType compute_dtype() const = 0;
  // The dtype dense weights (embeddings, norms, lm_head, unquantized linears) are stored in.
  virtual DType weight_dtype() const = 0;
  virtual MemoryInfo memory_info() const = 0;
  virtual void* allocate(size_t bytes) = 0;  // throws EngineError RESOURCE_EXHAUSTED
  virtual void release(void* p) = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;  // waits for queued ops
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(void* dst, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // Reserves the backend's own scratch for `plan` (replacing an earlier reservation); returns its bytes.
  virtual size_t reserve_scratch(const ScratchPlan& plan) { return 0; }

  // ---- the model's ops (outputs, inputs, weights, sizes) ----
  // out[m] = table[ids[m]]  (ids already checked against the vocabulary by the caller)
  virtual void embedding(Tensor out, const int32_t* ids, Tensor table) = 0;
  // out = x · rsqrt(mean(x²) + eps) · w ; rstd (M) saved when not null
  virtual void rmsnorm_forward(Tensor out, float* rstd, Tensor x, Tensor w, float eps) = 0;
  // dx (+)= d/dx given dout (w frozen)
  virtual void rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor w, const float* rstd, bool accumulate) = 0;
  // Rotates x (M, nheads·D) in place; row m at position pos[m]; inverse = the transpose rotation.
  virtual void rope(Tensor x, const int32_t* pos, const RopeView& rope, int nheads, bool inverse) = 0;
  // out = silu(gate) · up
  virtual void swiglu_forward(Tensor out, Tensor gate, Tensor up) = 0;
  // May run in place (dgate == gate, dup == up): the training pass does, to hold no (M, I) gradients.
  virtual void swiglu_backward(Tensor dgate, Tensor dup, Tensor dout, Tensor gate, Tensor up) = 0;
  // x += y
  virtual void add(Tensor x, Tensor y) = 0;
  // y = x · Wᵀ + beta·y
  virtual void linear_forward(Tensor y, Tensor x, const LinearView& w, float beta) = 0;
  // dx = dy · W + beta·dx   (the input gradient through a frozen weight)
  virtual void linear_backward_input(Tensor dx, Tensor dy, const LinearView& w, float beta) = 0;
  // C = alpha·op(A)·op(B) + beta·C over float32 tensors (LoRA gradients, tests)
  virtual void matmul(Tensor C, bool trans_a, Tensor A, bool trans_b, Tensor B, float alpha, float beta) = 0;
  // See LoraApply. y += the LoRA delta of every row.
  virtual void lora_forward(Tensor y, Tensor x, const LoraApply& lora, const LoraScratch& scratch) = 0;
  // Backward of the LoRA path of one training adapter over all M rows: dA += ..., dB += ..., and
  // dx += the input gradient through the low-rank path (with the same dropout mask).
  virtual void lora_backward(Tensor dx, float* dA, float* dB, Tensor dy, Tensor x, const LoraModuleView& module,
                             const LoraDropout& dropout, const LoraScratch& scratch) = 0;
  // Causal GQA attention over the training layout; lse (B, NH, T) saved for the backward, which
  // recomputes the probabilities (never stores (T, T)).
  virtual void attention_forward(Tensor out, float* lse, Tensor q, Tensor k, Tensor v, const AttentionShape& s) = 0;
  virtual void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor out, const float* lse, Tensor q,
                                  Tensor k, Tensor v, const AttentionShape& s) = 0;
  // Writes k, v (M, KVD) of an inference step into the paged cache rows slot[m].
  virtual void kv_write(const KVLayerView& kv, Tensor k, Tensor v, const int32_t* slot) = 0;
  // out (M, NH·D) = attention of q over the cached positions [0, len[m]) of each row's sequence.
  virtual void attention_paged(Tensor out, Tensor q, const KVLayerView& kv, const PagedRows& rows, int NH, int NKV,
                               int D) = 0;
  // out[i] = in[index[i]] / out[index[i]] = in[i]  (row gathers for chunked cross-entropy and logits)
  virtual void gather_rows(Tensor out, Tensor in, const int32_t* index) = 0;
  virtual void scatter_rows(Tensor out, Tensor in, const int32_t* index) = 0;
  // Cross-entropy of float32 logits (M, V) against targets (M, -100 ignored): *loss_sum (a double in
  // backend memory) += Σ token losses; with scale != 0 the logits become (softmax - onehot)·scale
  // (0 on ignored rows).
  virtual void cross_entropy(double* loss_sum, Tensor logits, const int32_t* targets, float scale) = 0;
  // *acc (a double in backend memory) += Σ x[i]²
  virtual void sum_squares(double* acc, const float* x, int64_t n) = 0;
  virtual void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& step) = 0;
  // The next token of each row of float32 logits (n, V) (modified in place), into host memory.
  virtual void sample(int32_t* host_ids, Tensor logits, const SampleRow* rows) = 0;

  // ---- captured step graphs (CUDA graphs); backends without them run every step eagerly ----
  virtual bool supports_graphs() const { return false; }
  virtual void graph_begin_capture() {}
  virtual int graph_end_capture() { return -1; }  // id of the captured graph
  virtual void graph_launch(int graph) {}
  virtual void graph_destroy(int graph) {}
};

}  // namespace ts
