// The CUDA backend's entry point, in plain C++ so the addon and CPU-only builds include it unchanged.
// Implemented by cuda/cuda_backend.cu when nvcc built the CUDA sources (TUNESERVE_WITH_CUDA), and by
// cuda/cuda_unavailable.cpp otherwise (which refuses with DEVICE_UNAVAILABLE).
#pragma once
#include <memory>
#include <string>

#include "core/backend.h"

namespace ts::cuda {

struct CudaBackendOptions {
  int device = 0;
  // Float32 activations, KV cache and dense weights with float32 matrix products: the parity check
  // mode, whose greedy ids equal the CPU backend's. Default: bf16 with float32 accumulation.
  bool float32_compute = false;
  // Where libcublasLt is; empty: TUNESERVE_CUBLASLT, then the sonames libcublasLt.so.13 / .12 / .so.
  std::string cublaslt_path;
};

// Throws EngineError DEVICE_UNAVAILABLE naming what is missing (no CUDA in this build, no device,
// no cuBLASLt library).
std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options);

}  // namespace ts::cuda
