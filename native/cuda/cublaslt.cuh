// cuBLASLt, loaded at run time (dlopen by soname; TUNESERVE_CUBLASLT names a path) so the addon builds
// where only nvcc exists and runs on any node whose image has the CUDA libraries. The few types and
// enum values used are declared here with the values of NVIDIA's cublasLt.h (stable since CUDA 11),
// because the build machines have no cuBLAS headers.
//
// The engine's matrices are row-major; cuBLASLt is column-major. A row-major C[M,N] = op(A)·op(B) is
// the column-major Cᵀ[N,M] = op(B)ᵀ·op(A)ᵀ, so matmul() swaps the operands and reads every row-major
// matrix as its column-major transpose (same memory, same leading dimension).
#pragma once
#include <cstdint>
#include <string>

#include "core/dtype.h"
#include "cuda/common.cuh"

namespace ts::cuda {

class CublasLt {
 public:
  // Loads the library and creates a handle; throws EngineError DEVICE_UNAVAILABLE naming every path
  // tried when none loads (explicit_path first, then TUNESERVE_CUBLASLT, then the sonames).
  explicit CublasLt(const std::string& explicit_path);
  ~CublasLt();
  CublasLt(const CublasLt&) = delete;
  CublasLt& operator=(const CublasLt&) = delete;

  const std::string& library() const { return library_; }
  size_t version() const { return version_; }

  // C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C, row-major. A and B share a type (F32 or BF16);
  // C is F32 or A's type; float32 accumulation (CUBLAS_COMPUTE_32F: no TF32). Uses `workspace`.
  void matmul(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A, int64_t lda,
              const void* B, int64_t ldb, float beta, void* C, int64_t ldc, DType ab, DType c, void* workspace,
              size_t workspace_bytes, cudaStream_t stream);

 private:
  struct Api;
  void* lib_ = nullptr;
  Api* api_ = nullptr;
  void* handle_ = nullptr;
  std::string library_;
  size_t version_ = 0;
};

}  // namespace ts::cuda
