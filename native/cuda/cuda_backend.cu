// The CUDA backend (cuda_backend.h): one device, one non-blocking stream that every op is queued on,
// bf16 activations / KV cache / dense weights with float32 accumulation (or float32 throughout in the
// check mode), NF4 weights as the CPU holds them, LoRA weights, gradients and optimizer state in
// float32. Large products go to cuBLASLt (loaded at run time); products with mixed operand types
// (LoRA) and the emulator build use the tiled kernel of gemm.cu. Decode steps can be captured as CUDA
// graphs: while capturing, LoRA takes its per-row slot form so the graph serves any adapter mix.
#include "cuda/cuda_backend.h"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "cuda/cublaslt.cuh"
#include "cuda/ops.cuh"

namespace ts::cuda {

namespace {

constexpr size_t BLAS_WORKSPACE = 32u << 20;  // cuBLASLt's recommended workspace on Hopper

std::string mib(uint64_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& o) : device_(o.device), f32_(o.float32_compute) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw EngineError("DEVICE_UNAVAILABLE", std::string("no usable CUDA device: ") + cudaGetErrorString(e));
    }
    require(o.device >= 0 && o.device < count, "DEVICE_UNAVAILABLE",
            "CUDA device " + std::to_string(o.device) + " does not exist (" + std::to_string(count) + " found)");
    CUDA_CHECK(cudaSetDevice(device_));
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
#ifdef TS_CUDA_EMU
    const bool reference_gemm = true;
#else
    const char* gemm = std::getenv("TUNESERVE_GEMM");
    const bool reference_gemm = gemm && std::string(gemm) == "reference";
#endif
    if (!reference_gemm) blas_ = std::make_unique<CublasLt>(o.cublaslt_path);
    description_ = std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
                   std::to_string(prop.multiProcessorCount) + " SMs), " + (f32_ ? "float32" : "bf16") +
                   " compute, " + (blas_ ? "cuBLASLt " + std::to_string(blas_->version()) : "reference gemm");
  }

  ~CudaBackend() override {
    for (cudaGraphExec_t g : graphs_)
      if (g) cudaGraphExecDestroy(g);
    free_scratch();
    if (stream_) cudaStreamDestroy(stream_);
  }

  // ---- identity and memory ----
  DeviceKind device() const override { return DeviceKind::CUDA; }
  std::string description() const override { return description_; }
  DType compute_dtype() const override { return f32_ ? DType::F32 : DType::BF16; }
  DType weight_dtype() const override { return compute_dtype(); }
  MemoryInfo memory_info() const override {
    size_t free = 0, total = 0;
    CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return MemoryInfo{total, free};
  }
  void* allocate(size_t bytes) override {
    void* p = nullptr;
    if (bytes == 0) return nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t free = 0, total = 0;
      cudaMemGetInfo(&free, &total);
      throw EngineError("RESOURCE_EXHAUSTED", "cannot allocate " + mib(bytes) + " of device memory (" + mib(free) +
                                                  " free of " + mib(total) + "): " + cudaGetErrorString(e));
    }
    return p;
  }
  void release(void* p) override {
    if (p) cudaFree(p);
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  void fill_zero(void* dst, size_t bytes) override {
    if (bytes) CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream_));
  }
  void synchronize() override { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  size_t reserve_scratch(const ScratchPlan& plan) override {
    synchronize();
    free_scratch();
    staging_bytes_ = staging_bytes(plan, compute_dtype());
    staging_ = allocate(staging_bytes_);
    if (blas_) blas_ws_ = allocate(BLAS_WORKSPACE);
    sample_rows_cap_ = std::max<int64_t>(1, plan.max_sample_rows);
    context_cap_ = std::max<int64_t>(1, plan.max_context_ids);
    sample_scratch_bytes_ = sample_scratch_bytes(sample_rows_cap_, std::max(1, plan.vocab));
    sample_rows_ = static_cast<DeviceSampleRow*>(allocate(size_t(sample_rows_cap_) * sizeof(DeviceSampleRow)));
    sample_ids_ = static_cast<int32_t*>(allocate(size_t(sample_rows_cap_) * sizeof(int32_t)));
    context_ = static_cast<int32_t*>(allocate(size_t(context_cap_) * sizeof(int32_t)));
    sample_scratch_ = allocate(sample_scratch_bytes_);
    return staging_bytes_ + (blas_ ? BLAS_WORKSPACE : 0) + size_t(sample_rows_cap_) * (sizeof(DeviceSampleRow) + 4) +
           size_t(context_cap_) * 4 + sample_scratch_bytes_;
  }

  // ---- ops ----
  void embedding(Tensor out, const int32_t* ids, Tensor table) override {
    if (f32_) embedding_forward(ptr<float>(out), ids, ptr<float>(table), out.rows, int(out.cols), stream_);
    else embedding_forward(ptr<bf16>(out), ids, ptr<bf16>(table), out.rows, int(out.cols), stream_);
  }
  void rmsnorm_forward(Tensor out, float* rstd, Tensor x, Tensor w, float eps) override {
    if (f32_) cuda::rmsnorm_forward(ptr<float>(out), rstd, ptr<float>(x), ptr<float>(w), x.rows, int(x.cols), eps, stream_);
    else cuda::rmsnorm_forward(ptr<bf16>(out), rstd, ptr<bf16>(x), ptr<bf16>(w), x.rows, int(x.cols), eps, stream_);
  }
  void rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor w, const float* rstd, bool accumulate) override {
    if (f32_)
      cuda::rmsnorm_backward(ptr<float>(dx), ptr<float>(dout), ptr<float>(x), ptr<float>(w), rstd, x.rows, int(x.cols),
                             accumulate, stream_);
    else
      cuda::rmsnorm_backward(ptr<bf16>(dx), ptr<bf16>(dout), ptr<bf16>(x), ptr<bf16>(w), rstd, x.rows, int(x.cols),
                             accumulate, stream_);
  }
  void rope(Tensor x, const int32_t* pos, const RopeView& rope, int nheads, bool inverse) override {
    if (f32_) rope_apply(ptr<float>(x), pos, rope, x.rows, nheads, inverse, stream_);
    else rope_apply(ptr<bf16>(x), pos, rope, x.rows, nheads, inverse, stream_);
  }
  void swiglu_forward(Tensor out, Tensor gate, Tensor up) override {
    if (f32_) cuda::swiglu_forward(ptr<float>(out), ptr<float>(gate), ptr<float>(up), gate.numel(), stream_);
    else cuda::swiglu_forward(ptr<bf16>(out), ptr<bf16>(gate), ptr<bf16>(up), gate.numel(), stream_);
  }
  void swiglu_backward(Tensor dgate, Tensor dup, Tensor dout, Tensor gate, Tensor up) override {
    if (f32_)
      cuda::swiglu_backward(ptr<float>(dgate), ptr<float>(dup), ptr<float>(dout), ptr<float>(gate), ptr<float>(up),
                            gate.numel(), stream_);
    else
      cuda::swiglu_backward(ptr<bf16>(dgate), ptr<bf16>(dup), ptr<bf16>(dout), ptr<bf16>(gate), ptr<bf16>(up),
                            gate.numel(), stream_);
  }
  void add(Tensor x, Tensor y) override {
    if (f32_) add_inplace(ptr<float>(x), ptr<float>(y), x.numel(), stream_);
    else add_inplace(ptr<bf16>(x), ptr<bf16>(y), x.numel(), stream_);
  }

  void linear_forward(Tensor y, Tensor x, const LinearView& w, float beta) override {
    require(x.cols == w.in && y.cols == w.out && y.rows == x.rows && x.contiguous() && y.contiguous(), "INTERNAL",
            "cuda backend: linear_forward: shapes");
    const int64_t M = x.rows;
    if (M == 0) return;
    if (w.quantized && M <= NF4_FUSED_MAX_M) {  // decoding: the fused product reads the 4-bit codes once
      if (f32_) nf4_matmul_nt(ptr<float>(y), ptr<float>(x), w.nf4, M, beta, stream_);
      else if (y.dtype == DType::F32) nf4_matmul_nt(y.f32(), ptr<bf16>(x), w.nf4, M, beta, stream_);
      else nf4_matmul_nt(ptr<bf16>(y), ptr<bf16>(x), w.nf4, M, beta, stream_);
      return;
    }
    const void* W = w.quantized ? dequantized(w.nf4) : w.dense.data;
    product(false, true, M, w.out, w.in, 1.f, x.data, x.dtype, w.in, W, compute_dtype(), w.in, beta, y.data, y.dtype,
            w.out);
  }

  void linear_backward_input(Tensor dx, Tensor dy, const LinearView& w, float beta) override {
    require(dy.cols == w.out && dx.cols == w.in && dx.rows == dy.rows && dx.contiguous() && dy.contiguous(), "INTERNAL",
            "cuda backend: linear_backward_input: shapes");
    if (dy.rows == 0) return;
    const void* W = w.quantized ? dequantized(w.nf4) : w.dense.data;
    const void* dy_data = dy.data;
    DType dy_type = dy.dtype;
    if (dy_type != compute_dtype() && !w.quantized && size_t(dy.numel()) * dtype_size(compute_dtype()) <= staging_bytes_) {
      // float32 dlogits through the bf16 lm_head: rounded to bf16 (as mixed-precision training does) so
      // cuBLASLt takes the product.
      convert(static_cast<bf16*>(staging_), dy.f32(), dy.numel(), stream_);
      dy_data = staging_;
      dy_type = compute_dtype();
    }
    product(false, false, dy.rows, w.in, w.out, 1.f, dy_data, dy_type, w.out, W, compute_dtype(), w.in, beta, dx.data,
            dx.dtype, w.in);
  }

  void matmul(Tensor C, bool trans_a, Tensor A, bool trans_b, Tensor B, float alpha, float beta) override {
    const int64_t M = trans_a ? A.cols : A.rows, K = trans_a ? A.rows : A.cols, N = trans_b ? B.rows : B.cols;
    require((trans_b ? B.cols : B.rows) == K && C.rows == M && C.cols == N, "INTERNAL", "cuda backend: matmul: shapes");
    product(trans_a, trans_b, M, N, K, alpha, A.data, A.dtype, A.ld, B.data, B.dtype, B.ld, beta, C.data, C.dtype, C.ld);
  }

  void lora_forward(Tensor y, Tensor x, const LoraApply& lora, const LoraScratch& s) override {
    if (lora.row_slot && lora.slot_modules) {
      // The per-row form: one mapping in device memory picks each row's adapter (what graphs replay).
      if (f32_) {
        lora_shrink_rows(s.u.f32(), ptr<float>(x), lora.row_slot, lora.slot_modules, x.rows, int(x.cols), int(s.u.cols),
                         lora.dropout, stream_);
        lora_expand_rows(ptr<float>(y), s.u.f32(), lora.row_slot, lora.slot_modules, y.rows, int(y.cols), int(s.u.cols),
                         stream_);
      } else {
        lora_shrink_rows(s.u.f32(), ptr<bf16>(x), lora.row_slot, lora.slot_modules, x.rows, int(x.cols), int(s.u.cols),
                         lora.dropout, stream_);
        lora_expand_rows(ptr<bf16>(y), s.u.f32(), lora.row_slot, lora.slot_modules, y.rows, int(y.cols), int(s.u.cols),
                         stream_);
      }
      return;
    }
    require(!capturing_, "INTERNAL", "cuda backend: a captured step must use the per-row LoRA form");
    for (const LoraSegment& seg : lora.segments) {
      const LoraModuleView& m = seg.module;
      const int64_t rows = seg.row_end - seg.row_begin;
      if (!m.A || rows <= 0) continue;
      const size_t act = dtype_size(x.dtype);
      const void* xs = static_cast<const char*>(x.data) + size_t(seg.row_begin * m.in) * act;
      DType xs_type = x.dtype;
      if (lora.dropout.p > 0.f) {
        float* xd = s.xd.f32();
        to_f32(xd, xs, xs_type, rows * m.in);
        lora_dropout(xd, rows, m.in, seg.row_begin, lora.dropout, stream_);
        xs = xd;
        xs_type = DType::F32;
      }
      float* u = s.u.f32();
      // u[rows, r] = xd · Aᵀ ;  y[rows, out] += s · u · Bᵀ
      product(false, true, rows, m.r, m.in, 1.f, xs, xs_type, m.in, m.A, DType::F32, m.in, 0.f, u, DType::F32, m.r);
      void* ys = static_cast<char*>(y.data) + size_t(seg.row_begin * m.out) * dtype_size(y.dtype);
      product(false, true, rows, m.out, m.r, m.scaling, u, DType::F32, m.r, m.B, DType::F32, m.r, 1.f, ys, y.dtype, m.out);
    }
  }

  void lora_backward(Tensor dx, float* dA, float* dB, Tensor dy, Tensor x, const LoraModuleView& m,
                     const LoraDropout& dropout, const LoraScratch& s) override {
    const int64_t M = x.rows;
    if (M == 0) return;
    const void* xs = x.data;
    DType xs_type = x.dtype;
    if (dropout.p > 0.f) {
      to_f32(s.xd.f32(), x.data, x.dtype, M * m.in);
      lora_dropout(s.xd.f32(), M, m.in, 0, dropout, stream_);
      xs = s.xd.data;
      xs_type = DType::F32;
    }
    float* u = s.u.f32();
    float* du = s.du.f32();
    float* dxd = s.dxd.f32();
    product(false, true, M, m.r, m.in, 1.f, xs, xs_type, m.in, m.A, DType::F32, m.in, 0.f, u, DType::F32, m.r);  // u = xd·Aᵀ
    product(true, false, m.out, m.r, M, m.scaling, dy.data, dy.dtype, m.out, u, DType::F32, m.r, 1.f, dB, DType::F32,
            m.r);  // dB += s·dyᵀ·u
    product(false, false, M, m.r, m.out, m.scaling, dy.data, dy.dtype, m.out, m.B, DType::F32, m.r, 0.f, du, DType::F32,
            m.r);  // du = s·dy·B
    product(true, false, m.r, m.in, M, 1.f, du, DType::F32, m.r, xs, xs_type, m.in, 1.f, dA, DType::F32,
            m.in);  // dA += duᵀ·xd
    product(false, false, M, m.in, m.r, 1.f, du, DType::F32, m.r, m.A, DType::F32, m.in, 0.f, dxd, DType::F32,
            m.in);  // dxd = du·A
    lora_dropout(dxd, M, m.in, 0, dropout, stream_);  // the same mask (a no-op without dropout)
    if (f32_) add_inplace(ptr<float>(dx), dxd, M * m.in, stream_);
    else accumulate_f32(ptr<bf16>(dx), dxd, M * m.in, stream_);
  }

  void attention_forward(Tensor out, float* lse, Tensor q, Tensor k, Tensor v, const AttentionShape& s) override {
    if (f32_) cuda::attention_forward(ptr<float>(out), lse, ptr<float>(q), ptr<float>(k), ptr<float>(v), s, stream_);
    else cuda::attention_forward(ptr<bf16>(out), lse, ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), s, stream_);
  }
  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor out, const float* lse, Tensor q,
                          Tensor k, Tensor v, const AttentionShape& s) override {
    if (f32_)
      cuda::attention_backward(ptr<float>(dq), ptr<float>(dk), ptr<float>(dv), ptr<float>(dout), ptr<float>(out), lse,
                               ptr<float>(q), ptr<float>(k), ptr<float>(v), s, stream_);
    else
      cuda::attention_backward(ptr<bf16>(dq), ptr<bf16>(dk), ptr<bf16>(dv), ptr<bf16>(dout), ptr<bf16>(out), lse,
                               ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), s, stream_);
  }
  void kv_write(const KVLayerView& kv, Tensor k, Tensor v, const int32_t* slot) override {
    require(kv.dtype == compute_dtype() && k.cols == kv.KVD && v.cols == kv.KVD, "INTERNAL",
            "cuda backend: kv_write: shapes or dtype");
    if (f32_)
      cuda::kv_write(static_cast<float*>(kv.k), static_cast<float*>(kv.v), ptr<float>(k), ptr<float>(v), slot, k.rows,
                     kv.KVD, stream_);
    else
      cuda::kv_write(static_cast<bf16*>(kv.k), static_cast<bf16*>(kv.v), ptr<bf16>(k), ptr<bf16>(v), slot, k.rows,
                     kv.KVD, stream_);
  }
  void attention_paged(Tensor out, Tensor q, const KVLayerView& kv, const PagedRows& rows, int NH, int NKV,
                       int D) override {
    require(kv.dtype == compute_dtype(), "INTERNAL", "cuda backend: attention_paged: cache dtype");
    if (f32_) cuda::attention_paged(ptr<float>(out), ptr<float>(q), kv, rows, q.rows, NH, NKV, D, stream_);
    else cuda::attention_paged(ptr<bf16>(out), ptr<bf16>(q), kv, rows, q.rows, NH, NKV, D, stream_);
  }
  void gather_rows(Tensor out, Tensor in, const int32_t* index) override {
    require(out.dtype == in.dtype && out.cols == in.cols, "INTERNAL", "cuda backend: gather_rows: shapes");
    if (in.dtype == DType::F32) cuda::gather_rows(out.f32(), in.f32(), index, out.rows, out.cols, stream_);
    else cuda::gather_rows(ptr<bf16>(out), ptr<bf16>(in), index, out.rows, out.cols, stream_);
  }
  void scatter_rows(Tensor out, Tensor in, const int32_t* index) override {
    require(out.dtype == in.dtype && out.cols == in.cols, "INTERNAL", "cuda backend: scatter_rows: shapes");
    if (in.dtype == DType::F32) cuda::scatter_rows(out.f32(), in.f32(), index, in.rows, in.cols, stream_);
    else cuda::scatter_rows(ptr<bf16>(out), ptr<bf16>(in), index, in.rows, in.cols, stream_);
  }
  void cross_entropy(double* loss_sum, Tensor logits, const int32_t* targets, float scale) override {
    cuda::cross_entropy(loss_sum, logits.f32(), targets, logits.rows, int(logits.cols), scale, stream_);
  }
  void sum_squares(double* acc, const float* x, int64_t n) override { cuda::sum_squares(acc, x, n, stream_); }
  void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& step) override {
    cuda::adamw(p, g, m, v, n, step, stream_);
  }

  void sample(int32_t* host_ids, Tensor logits, const SampleRow* rows) override {
    const int64_t n = logits.rows;
    if (n == 0) return;
    require(n <= sample_rows_cap_, "INTERNAL", "cuda backend: more rows to sample than reserved");
    std::vector<DeviceSampleRow> dev(static_cast<size_t>(n));
    std::vector<int32_t> context;
    for (int64_t i = 0; i < n; i++) {
      const SampleRow& r = rows[i];
      DeviceSampleRow& d = dev[size_t(i)];
      d.temperature = r.params.temperature;
      d.top_k = r.params.top_k;
      d.top_p = r.params.top_p;
      d.repetition_penalty = r.params.repetition_penalty;
      // The request's one draw per sampled token, from its own stream: the same number the CPU uses.
      d.u = r.params.temperature > 0.f && r.rng ? r.rng->uniform() : 0.0;
      d.context_begin = d.context_end = int64_t(context.size());
      if (r.params.repetition_penalty != 1.f && r.context) {
        context.insert(context.end(), r.context->begin(), r.context->end());
        d.context_end = int64_t(context.size());
      }
    }
    require(int64_t(context.size()) <= context_cap_, "RESOURCE_EXHAUSTED",
            "cuda backend: the repetition penalty's contexts exceed the reserved buffer");
    upload(sample_rows_, dev.data(), dev.size() * sizeof(DeviceSampleRow));
    upload(context_, context.data(), context.size() * sizeof(int32_t));
    sample_rows(sample_ids_, logits.f32(), sample_rows_, context_, n, int(logits.cols), sample_scratch_, stream_);
    download(host_ids, sample_ids_, size_t(n) * sizeof(int32_t));
  }

  // ---- graphs ----
  bool supports_graphs() const override { return true; }
  void graph_begin_capture() override {
    CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    capturing_ = true;
  }
  int graph_end_capture() override {
    capturing_ = false;
    cudaGraph_t graph = nullptr;
    CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    CUDA_CHECK(e);
    graphs_.push_back(exec);
    return int(graphs_.size()) - 1;
  }
  void graph_launch(int graph) override {
    require(graph >= 0 && graph < int(graphs_.size()) && graphs_[size_t(graph)], "INTERNAL", "no such graph");
    CUDA_CHECK(cudaGraphLaunch(graphs_[size_t(graph)], stream_));
  }
  void graph_destroy(int graph) override {
    if (graph < 0 || graph >= int(graphs_.size()) || !graphs_[size_t(graph)]) return;
    cudaGraphExecDestroy(graphs_[size_t(graph)]);
    graphs_[size_t(graph)] = nullptr;
  }

 private:
  template <typename T>
  T* ptr(const Tensor& t) const {
    constexpr DType want = std::is_same<T, float>::value ? DType::F32 : DType::BF16;
    require(t.dtype == want && t.device == DeviceKind::CUDA, "INTERNAL",
            std::string("cuda backend: a tensor is ") + dtype_name(t.dtype) + ", " + dtype_name(want) + " was expected");
    return static_cast<T*>(t.data);
  }

  // W dequantized into the staging buffer (valid until the next op that uses it).
  const void* dequantized(const NF4View& w) {
    const size_t bytes = size_t(w.rows * w.cols) * dtype_size(compute_dtype());
    require(bytes <= staging_bytes_, "INTERNAL",
            "cuda backend: the dequantization scratch (" + mib(staging_bytes_) + ") is smaller than a weight (" +
                mib(bytes) + "): reserve_scratch was not given the largest linear");
    if (f32_) nf4_dequantize(static_cast<float*>(staging_), w, stream_);
    else nf4_dequantize(static_cast<bf16*>(staging_), w, stream_);
    return staging_;
  }

  void to_f32(float* out, const void* in, DType type, int64_t n) {
    if (type == DType::F32) copy(out, in, size_t(n) * sizeof(float));
    else convert(out, static_cast<const bf16*>(in), n, stream_);
  }

  // C = alpha·op(A)·op(B) + beta·C for any mix of float / bf16 operands: cuBLASLt when it takes the
  // types (A and B alike; C float32 or their type), else the tiled kernel.
  void product(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const void* A, DType at, int64_t lda,
               const void* B, DType bt, int64_t ldb, float beta, void* C, DType ct, int64_t ldc) {
    if (M == 0 || N == 0) return;
    if (blas_ && at == bt && (ct == at || ct == DType::F32) && K > 0) {
      blas_->matmul(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, at, ct, blas_ws_, BLAS_WORKSPACE, stream_);
      return;
    }
    auto f = [](DType t) { return t == DType::F32; };
#define TS_GEMM(TA, TB, TC)                                                                                          \
  gemm_reference(ta, tb, M, N, K, alpha, static_cast<const TA*>(A), lda, static_cast<const TB*>(B), ldb, beta,      \
                 static_cast<TC*>(C), ldc, stream_)
    if (f(at) && f(bt) && f(ct)) TS_GEMM(float, float, float);
    else if (!f(at) && !f(bt) && !f(ct)) TS_GEMM(bf16, bf16, bf16);
    else if (!f(at) && !f(bt) && f(ct)) TS_GEMM(bf16, bf16, float);
    else if (f(at) && !f(bt) && f(ct)) TS_GEMM(float, bf16, float);
    else if (!f(at) && f(bt) && f(ct)) TS_GEMM(bf16, float, float);
    else if (f(at) && f(bt) && !f(ct)) TS_GEMM(float, float, bf16);
    else if (f(at) && !f(bt) && !f(ct)) TS_GEMM(float, bf16, bf16);
    else TS_GEMM(bf16, float, bf16);
#undef TS_GEMM
  }

  void free_scratch() {
    for (void* p : {staging_, blas_ws_, static_cast<void*>(sample_rows_), static_cast<void*>(sample_ids_),
                    static_cast<void*>(context_), sample_scratch_})
      release(p);
    staging_ = blas_ws_ = sample_scratch_ = nullptr;
    sample_rows_ = nullptr;
    sample_ids_ = context_ = nullptr;
    staging_bytes_ = 0;
  }

  int device_ = 0;
  bool f32_ = false;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<CublasLt> blas_;
  std::string description_;
  bool capturing_ = false;
  std::vector<cudaGraphExec_t> graphs_;
  // Scratch reserved by reserve_scratch.
  void* staging_ = nullptr;  // dequantized weights, or bf16 copies of float32 operands
  size_t staging_bytes_ = 0;
  void* blas_ws_ = nullptr;
  DeviceSampleRow* sample_rows_ = nullptr;
  int32_t* sample_ids_ = nullptr;
  int32_t* context_ = nullptr;
  void* sample_scratch_ = nullptr;
  int64_t sample_rows_cap_ = 0, context_cap_ = 0;
  size_t sample_scratch_bytes_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(options);
}

}  // namespace ts::cuda
