// cuda_probe() for builds without CUDA (no nvcc where the addon was built): reports compiled=false.
#include "cuda/device.h"

#ifndef TUNESERVE_WITH_CUDA
namespace ts {

CudaProbe cuda_probe() {
  CudaProbe probe;
  probe.compiled = false;
  probe.error = "built without CUDA (nvcc was not found when the addon was compiled)";
  return probe;
}

}  // namespace ts
#endif
