// CpuBackend (cpu_backend.h): tensors are host memory; every op checks float32, contiguous rows and
// matching shapes, then runs the CPU kernel.
#include "cpu/cpu_backend.h"

#include <sys/sysinfo.h>

#include <cstdlib>
#include <cstring>
#include <fstream>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"
#include "cpu/lora.h"
#include "cpu/ops.h"
#include "cpu/sampler.h"

namespace ts::cpu {

namespace {

// A float32, contiguous host tensor, or an error naming the op and argument.
float* f32(const Tensor& t, const char* op, const char* arg) {
  require(t.device == DeviceKind::CPU && t.dtype == DType::F32 && t.contiguous(), "INTERNAL",
          std::string("cpu backend: ") + op + "(" + arg + ") needs a contiguous float32 host tensor");
  return static_cast<float*>(t.data);
}

void same_shape(const Tensor& a, const Tensor& b, const char* op) {
  require(a.rows == b.rows && a.cols == b.cols, "INTERNAL", std::string("cpu backend: ") + op + ": shapes differ");
}

// Memory the process may still use: the cgroup limit when one is set, else the machine's free RAM.
MemoryInfo host_memory() {
  struct sysinfo si{};
  MemoryInfo mi;
  if (sysinfo(&si) == 0) {
    mi.total = uint64_t(si.totalram) * si.mem_unit;
    mi.free = (uint64_t(si.freeram) + uint64_t(si.bufferram)) * si.mem_unit;
  }
  std::ifstream limit("/sys/fs/cgroup/memory.max"), usage("/sys/fs/cgroup/memory.current");
  uint64_t max = 0, used = 0;
  if (limit >> max && usage >> used && max > used && max < mi.total) {
    mi.total = max;
    mi.free = max - used;
  }
  return mi;
}

class CpuBackend final : public Backend {
 public:
  DeviceKind device() const override { return DeviceKind::CPU; }
  std::string description() const override {
    return std::string("cpu (") + gemm_kernel_name() + ", " + std::to_string(num_threads()) + " threads)";
  }
  DType compute_dtype() const override { return DType::F32; }
  DType weight_dtype() const override { return DType::F32; }
  MemoryInfo memory_info() const override { return host_memory(); }

  void* allocate(size_t bytes) override {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p && bytes > 0)
      throw EngineError("RESOURCE_EXHAUSTED", "cpu backend: cannot allocate " + std::to_string(bytes) + " bytes");
    return p;
  }
  void release(void* p) override { std::free(p); }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
  void fill_zero(void* dst, size_t bytes) override { std::memset(dst, 0, bytes); }
  void synchronize() override {}

  void embedding(Tensor out, const int32_t* ids, Tensor table) override {
    require(out.cols == table.cols, "INTERNAL", "cpu backend: embedding: width differs from the table");
    embedding_forward(f32(out, "embedding", "out"), ids, f32(table, "embedding", "table"), out.rows, int(out.cols));
  }
  void rmsnorm_forward(Tensor out, float* rstd, Tensor x, Tensor w, float eps) override {
    same_shape(out, x, "rmsnorm_forward");
    cpu::rmsnorm_forward(f32(out, "rmsnorm_forward", "out"), rstd, f32(x, "rmsnorm_forward", "x"),
                         f32(w, "rmsnorm_forward", "w"), x.rows, int(x.cols), eps);
  }
  void rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor w, const float* rstd, bool accumulate) override {
    same_shape(dx, x, "rmsnorm_backward");
    same_shape(dout, x, "rmsnorm_backward");
    cpu::rmsnorm_backward(f32(dx, "rmsnorm_backward", "dx"), f32(dout, "rmsnorm_backward", "dout"),
                          f32(x, "rmsnorm_backward", "x"), f32(w, "rmsnorm_backward", "w"), rstd, x.rows, int(x.cols),
                          accumulate);
  }
  void rope(Tensor x, const int32_t* pos, const RopeView& rope, int nheads, bool inverse) override {
    require(x.cols == int64_t(nheads) * rope.D, "INTERNAL", "cpu backend: rope: width is not nheads * D");
    rope_apply(f32(x, "rope", "x"), pos, rope, x.rows, nheads, inverse);
  }
  void swiglu_forward(Tensor out, Tensor gate, Tensor up) override {
    same_shape(out, gate, "swiglu_forward");
    same_shape(up, gate, "swiglu_forward");
    cpu::swiglu_forward(f32(out, "swiglu_forward", "out"), f32(gate, "swiglu_forward", "gate"),
                        f32(up, "swiglu_forward", "up"), gate.rows, int(gate.cols));
  }
  void swiglu_backward(Tensor dgate, Tensor dup, Tensor dout, Tensor gate, Tensor up) override {
    same_shape(dgate, gate, "swiglu_backward");
    same_shape(dup, gate, "swiglu_backward");
    same_shape(dout, gate, "swiglu_backward");
    cpu::swiglu_backward(f32(dgate, "swiglu_backward", "dgate"), f32(dup, "swiglu_backward", "dup"),
                         f32(dout, "swiglu_backward", "dout"), f32(gate, "swiglu_backward", "gate"),
                         f32(up, "swiglu_backward", "up"), gate.rows, int(gate.cols));
  }
  void add(Tensor x, Tensor y) override {
    same_shape(x, y, "add");
    add_inplace(f32(x, "add", "x"), f32(y, "add", "y"), x.numel());
  }
  void linear_forward(Tensor y, Tensor x, const LinearView& w, float beta) override {
    require(x.cols == w.in && y.cols == w.out && y.rows == x.rows, "INTERNAL", "cpu backend: linear_forward: shapes");
    if (w.quantized) matmul_nf4_nt(f32(y, "linear_forward", "y"), f32(x, "linear_forward", "x"), w.nf4, x.rows, beta);
    else
      sgemm(false, true, x.rows, w.out, w.in, 1.f, f32(x, "linear_forward", "x"), w.in,
            f32(w.dense, "linear_forward", "w"), w.in, beta, f32(y, "linear_forward", "y"), w.out);
  }
  void linear_backward_input(Tensor dx, Tensor dy, const LinearView& w, float beta) override {
    require(dy.cols == w.out && dx.cols == w.in && dx.rows == dy.rows, "INTERNAL",
            "cpu backend: linear_backward_input: shapes");
    if (w.quantized)
      matmul_nf4_nn(f32(dx, "linear_backward_input", "dx"), f32(dy, "linear_backward_input", "dy"), w.nf4, dy.rows, beta);
    else
      sgemm(false, false, dy.rows, w.in, w.out, 1.f, f32(dy, "linear_backward_input", "dy"), w.out,
            f32(w.dense, "linear_backward_input", "w"), w.in, beta, f32(dx, "linear_backward_input", "dx"), w.in);
  }
  void matmul(Tensor C, bool trans_a, Tensor A, bool trans_b, Tensor B, float alpha, float beta) override {
    const int64_t M = trans_a ? A.cols : A.rows, K = trans_a ? A.rows : A.cols, N = trans_b ? B.rows : B.cols;
    require((trans_b ? B.cols : B.rows) == K && C.rows == M && C.cols == N, "INTERNAL", "cpu backend: matmul: shapes");
    sgemm(trans_a, trans_b, M, N, K, alpha, f32(A, "matmul", "A"), A.ld, f32(B, "matmul", "B"), B.ld, beta,
          f32(C, "matmul", "C"), C.ld);
  }
  void lora_forward(Tensor y, Tensor x, const LoraApply& lora, const LoraScratch& s) override {
    cpu::lora_forward(f32(y, "lora_forward", "y"), f32(x, "lora_forward", "x"), lora, f32(s.u, "lora_forward", "u"),
                      lora.dropout.p > 0.f ? f32(s.xd, "lora_forward", "xd") : nullptr);
  }
  void lora_backward(Tensor dx, float* dA, float* dB, Tensor dy, Tensor x, const LoraModuleView& m,
                     const LoraDropout& dropout, const LoraScratch& s) override {
    cpu::lora_backward(f32(dx, "lora_backward", "dx"), dA, dB, f32(dy, "lora_backward", "dy"),
                       f32(x, "lora_backward", "x"), x.rows, m, dropout, f32(s.u, "lora_backward", "u"),
                       f32(s.du, "lora_backward", "du"), f32(s.dxd, "lora_backward", "dxd"),
                       dropout.p > 0.f ? f32(s.xd, "lora_backward", "xd") : nullptr);
  }
  void attention_forward(Tensor out, float* lse, Tensor q, Tensor k, Tensor v, const AttentionShape& s) override {
    cpu::attention_forward(f32(out, "attention_forward", "out"), lse, f32(q, "attention_forward", "q"),
                           f32(k, "attention_forward", "k"), f32(v, "attention_forward", "v"), s);
  }
  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor out, const float* lse, Tensor q,
                          Tensor k, Tensor v, const AttentionShape& s) override {
    cpu::attention_backward(f32(dq, "attention_backward", "dq"), f32(dk, "attention_backward", "dk"),
                            f32(dv, "attention_backward", "dv"), f32(dout, "attention_backward", "dout"),
                            f32(out, "attention_backward", "out"), lse, f32(q, "attention_backward", "q"),
                            f32(k, "attention_backward", "k"), f32(v, "attention_backward", "v"), s);
  }
  void kv_write(const KVLayerView& kv, Tensor k, Tensor v, const int32_t* slot) override {
    require(kv.dtype == DType::F32 && k.cols == kv.KVD && v.cols == kv.KVD, "INTERNAL", "cpu backend: kv_write: shapes");
    cpu::kv_write(kv, f32(k, "kv_write", "k"), f32(v, "kv_write", "v"), slot, k.rows);
  }
  void attention_paged(Tensor out, Tensor q, const KVLayerView& kv, const PagedRows& rows, int NH, int NKV,
                       int D) override {
    require(kv.dtype == DType::F32, "INTERNAL", "cpu backend: attention_paged: the cache must be float32");
    cpu::attention_paged(f32(out, "attention_paged", "out"), f32(q, "attention_paged", "q"), kv, rows, q.rows, NH, NKV,
                         D);
  }
  void gather_rows(Tensor out, Tensor in, const int32_t* index) override {
    require(out.cols == in.cols, "INTERNAL", "cpu backend: gather_rows: widths differ");
    cpu::gather_rows(f32(out, "gather_rows", "out"), f32(in, "gather_rows", "in"), index, out.rows, out.cols);
  }
  void scatter_rows(Tensor out, Tensor in, const int32_t* index) override {
    require(out.cols == in.cols, "INTERNAL", "cpu backend: scatter_rows: widths differ");
    cpu::scatter_rows(f32(out, "scatter_rows", "out"), f32(in, "scatter_rows", "in"), index, in.rows, in.cols);
  }
  void cross_entropy(double* loss_sum, Tensor logits, const int32_t* targets, float scale) override {
    *loss_sum += cross_entropy_forward_backward(f32(logits, "cross_entropy", "logits"), targets, logits.rows,
                                                int(logits.cols), scale);
  }
  void sum_squares(double* acc, const float* x, int64_t n) override { cpu::sum_squares(acc, x, n); }
  void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& step) override {
    adamw_update(p, g, m, v, n, step);
  }
  void sample(int32_t* host_ids, Tensor logits, const SampleRow* rows) override {
    float* x = f32(logits, "sample", "logits");
    static const std::vector<int32_t> no_context;
    for (int64_t i = 0; i < logits.rows; i++) {
      const SampleRow& r = rows[i];
      host_ids[i] = sample_token(x + i * logits.cols, int(logits.cols), r.params, r.context ? *r.context : no_context,
                                 UniformSource{r.rng, 0.0});
    }
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace ts::cpu
