// What CUDA sees on this machine: compiled in or not, the devices, and whether a kernel actually runs
// on each. Plain C++ (no CUDA types) so the addon and the CPU-only build include it unchanged.
// Implemented by cuda/device.cu when nvcc built the CUDA sources (TUNESERVE_WITH_CUDA), otherwise by
// core/cuda_probe_fallback.cpp.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ts {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  uint64_t total_memory = 0;   // bytes
  uint64_t free_memory = 0;    // bytes, at probe time (after the probe's own context was created)
  int cc_major = 0, cc_minor = 0;  // compute capability, e.g. 9.0 for H100/H200
  int multiprocessors = 0;
  bool kernel_ok = false;      // the probe's vector-add kernel ran and produced the right sums
  std::string error;           // why kernel_ok is false ("" when it is true)
};

struct CudaProbe {
  bool compiled = false;       // the CUDA sources were built into this addon
  int device_count = 0;
  std::string error;           // cudaGetDeviceCount's error ("" when it succeeded), or why not compiled
  std::vector<CudaDeviceInfo> devices;  // (device_count)
};

// Never throws and never crashes on a machine without a driver: failures land in `error` fields.
// Creates a CUDA context on every device (a few hundred MB each); call it once at start-up.
CudaProbe cuda_probe();

}  // namespace ts
