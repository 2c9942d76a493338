// The CUDA entry points for builds without CUDA (no nvcc where the addon was compiled): the probe
// reports compiled=false and the backend refuses with DEVICE_UNAVAILABLE.
#ifndef TUNESERVE_WITH_CUDA
#include "core/error.h"
#include "cuda/cuda_backend.h"
#include "cuda/device.h"

namespace ts {

CudaProbe cuda_probe() {
  CudaProbe probe;
  probe.compiled = false;
  probe.error = "built without CUDA (nvcc was not found when the addon was compiled)";
  return probe;
}

namespace cuda {

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions&) {
  throw EngineError("DEVICE_UNAVAILABLE", "this build has no CUDA backend (nvcc was not found at build time)");
}

}  // namespace cuda
}  // namespace ts
#endif
