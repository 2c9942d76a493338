// CublasLt (cublaslt.cuh): the dlopen'ed entry points and the row-major matmul on top of them.
#include "cuda/cublaslt.cuh"

#include <dlfcn.h>

#include <cstdlib>
#include <vector>

#include "core/error.h"

namespace ts::cuda {

namespace {

// From cublasLt.h / cublas_api.h / library_types.h (values fixed by NVIDIA's ABI).
using Status = int;                  // cublasStatus_t; 0 = CUBLAS_STATUS_SUCCESS
using Handle = void*;                // cublasLtHandle_t
using MatmulDesc = void*;            // cublasLtMatmulDesc_t
using MatrixLayout = void*;          // cublasLtMatrixLayout_t
using Preference = void*;            // cublasLtMatmulPreference_t
struct MatmulAlgo {                  // cublasLtMatmulAlgo_t
  uint64_t data[8];
};
struct HeuristicResult {             // cublasLtMatmulHeuristicResult_t
  MatmulAlgo algo;
  size_t workspaceSize;
  Status state;
  float wavesCount;
  int reserved[4];
};
constexpr int CUDA_R_32F = 0, CUDA_R_16BF = 14;          // cudaDataType
constexpr int CUBLAS_COMPUTE_32F = 68;                   // cublasComputeType_t
constexpr int CUBLAS_OP_N = 0, CUBLAS_OP_T = 1;          // cublasOperation_t
constexpr int DESC_TRANSA = 3, DESC_TRANSB = 4;          // cublasLtMatmulDescAttributes_t
constexpr int PREF_MAX_WORKSPACE_BYTES = 1;              // cublasLtMatmulPreferenceAttributes_t

int cuda_type(DType t) {
  require(t == DType::F32 || t == DType::BF16, "INTERNAL", std::string("cublasLt: unsupported dtype ") + dtype_name(t));
  return t == DType::F32 ? CUDA_R_32F : CUDA_R_16BF;
}

}  // namespace

struct CublasLt::Api {
  Status (*create)(Handle*);
  Status (*destroy)(Handle);
  size_t (*get_version)();
  Status (*desc_create)(MatmulDesc*, int compute, int scale);
  Status (*desc_destroy)(MatmulDesc);
  Status (*desc_set)(MatmulDesc, int attr, const void* buf, size_t size);
  Status (*layout_create)(MatrixLayout*, int type, uint64_t rows, uint64_t cols, int64_t ld);
  Status (*layout_destroy)(MatrixLayout);
  Status (*pref_create)(Preference*);
  Status (*pref_destroy)(Preference);
  Status (*pref_set)(Preference, int attr, const void* buf, size_t size);
  Status (*heuristic)(Handle, MatmulDesc, MatrixLayout, MatrixLayout, MatrixLayout, MatrixLayout, Preference, int,
                      HeuristicResult*, int*);
  Status (*matmul)(Handle, MatmulDesc, const void*, const void*, MatrixLayout, const void*, MatrixLayout, const void*,
                   const void*, MatrixLayout, void*, MatrixLayout, const MatmulAlgo*, void*, size_t, cudaStream_t);
};

namespace {

void check_status(Status s, const char* what) {
  if (s != 0) throw EngineError("CUDA_ERROR", std::string("cuBLASLt ") + what + " failed with status " + std::to_string(s));
}

template <typename F>
void bind(void* lib, const char* name, F* fn, const std::string& file) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!*fn) throw EngineError("DEVICE_UNAVAILABLE", file + " has no symbol " + name + " (not a cuBLASLt library?)");
}

}  // namespace

CublasLt::CublasLt(const std::string& explicit_path) {
#ifdef TS_CUDA_EMU
  (void)explicit_path;
  throw EngineError("DEVICE_UNAVAILABLE", "cuBLASLt is not available under the CUDA emulator");
#else
  std::vector<std::string> tried;
  std::vector<std::string> candidates;
  if (!explicit_path.empty()) candidates.push_back(explicit_path);
  if (const char* env = std::getenv("TUNESERVE_CUBLASLT"); env && *env) candidates.push_back(env);
  for (const char* soname : {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"}) candidates.push_back(soname);
  for (const std::string& c : candidates) {
    lib_ = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib_) {
      library_ = c;
      break;
    }
    const char* err = dlerror();
    tried.push_back(c + " (" + (err ? err : "not found") + ")");
  }
  if (!lib_) {
    std::string list;
    for (const auto& t : tried) list += (list.empty() ? "" : "; ") + t;
    throw EngineError("DEVICE_UNAVAILABLE",
                      "cuBLASLt was not found (tried " + list + "); set TUNESERVE_CUBLASLT to the library's path");
  }
  api_ = new Api();
  try {
    bind(lib_, "cublasLtCreate", &api_->create, library_);
    bind(lib_, "cublasLtDestroy", &api_->destroy, library_);
    bind(lib_, "cublasLtGetVersion", &api_->get_version, library_);
    bind(lib_, "cublasLtMatmulDescCreate", &api_->desc_create, library_);
    bind(lib_, "cublasLtMatmulDescDestroy", &api_->desc_destroy, library_);
    bind(lib_, "cublasLtMatmulDescSetAttribute", &api_->desc_set, library_);
    bind(lib_, "cublasLtMatrixLayoutCreate", &api_->layout_create, library_);
    bind(lib_, "cublasLtMatrixLayoutDestroy", &api_->layout_destroy, library_);
    bind(lib_, "cublasLtMatmulPreferenceCreate", &api_->pref_create, library_);
    bind(lib_, "cublasLtMatmulPreferenceDestroy", &api_->pref_destroy, library_);
    bind(lib_, "cublasLtMatmulPreferenceSetAttribute", &api_->pref_set, library_);
    bind(lib_, "cublasLtMatmulAlgoGetHeuristic", &api_->heuristic, library_);
    bind(lib_, "cublasLtMatmul", &api_->matmul, library_);
    check_status(api_->create(&handle_), "create");
    version_ = api_->get_version();
  } catch (...) {
    delete api_;
    api_ = nullptr;
    dlclose(lib_);
    lib_ = nullptr;
    throw;
  }
#endif
}

CublasLt::~CublasLt() {
  if (api_ && handle_) api_->destroy(handle_);
  delete api_;
  if (lib_) dlclose(lib_);
}

void CublasLt::matmul(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                      int64_t lda, const void* B, int64_t ldb, float beta, void* C, int64_t ldc, DType ab, DType c,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // Column-major view: C' (N x M) = op'(B') (N x K) · op'(A') (K x M), where a row-major X with ld is the
  // column-major X' = Xᵀ with the same ld. op'(B') = op(B)ᵀ: B' is Bᵀ stored, so op' = trans_b as given.
  const int tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  MatmulDesc desc = nullptr;
  MatrixLayout lb = nullptr, la = nullptr, lc = nullptr;
  Preference pref = nullptr;
  auto cleanup = [&] {
    if (pref) api_->pref_destroy(pref);
    if (lc) api_->layout_destroy(lc);
    if (la) api_->layout_destroy(la);
    if (lb) api_->layout_destroy(lb);
    if (desc) api_->desc_destroy(desc);
  };
  try {
    check_status(api_->desc_create(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
    check_status(api_->desc_set(desc, DESC_TRANSA, &tb, sizeof tb), "set TRANSA");
    check_status(api_->desc_set(desc, DESC_TRANSB, &ta, sizeof ta), "set TRANSB");
    // Stored shapes (column-major rows x cols) of the first operand B' and the second A'.
    check_status(api_->layout_create(&lb, cuda_type(ab), trans_b ? K : N, trans_b ? N : K, ldb), "layout B");
    check_status(api_->layout_create(&la, cuda_type(ab), trans_a ? M : K, trans_a ? K : M, lda), "layout A");
    check_status(api_->layout_create(&lc, cuda_type(c), N, M, ldc), "layout C");
    check_status(api_->pref_create(&pref), "PreferenceCreate");
    const uint64_t ws = workspace_bytes;
    check_status(api_->pref_set(pref, PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws), "set workspace");
    HeuristicResult result{};
    int found = 0;
    check_status(api_->heuristic(handle_, desc, lb, la, lc, lc, pref, 1, &result, &found), "AlgoGetHeuristic");
    if (found < 1)
      throw EngineError("CUDA_ERROR", "cuBLASLt has no algorithm for a " + std::to_string(M) + "x" + std::to_string(N) +
                                          "x" + std::to_string(K) + " product of " + dtype_name(ab) + " into " +
                                          dtype_name(c));
    check_status(api_->matmul(handle_, desc, &alpha, B, lb, A, la, &beta, C, lc, C, lc, &result.algo, workspace,
                              workspace_bytes, stream),
                 "Matmul");
  } catch (...) {
    cleanup();
    throw;
  }
  cleanup();
}

}  // namespace ts::cuda
