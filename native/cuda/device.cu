// CUDA device probe: lists the devices and runs a tiny vector-add kernel on each, checked on the host,
// so "probe ok" means kernels really launch (the right architecture was compiled in, the driver works).
#include <cuda_runtime.h>

#include <cstdio>
#include <string>
#include <vector>

#include "cuda/device.h"

namespace ts {

namespace {

// c[i] = a[i] + b[i], i in [0, n)
__global__ void probe_vector_add(float* c, const float* a, const float* b, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) c[i] = a[i] + b[i];
}

std::string describe(cudaError_t e, const char* what) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// Runs the kernel on the current device; "" on success, else what went wrong.
std::string run_vector_add() {
  const int n = 1000;  // not a multiple of the block size, so the bounds check is exercised
  std::vector<float> a(n), b(n), c(n, -1.f);  // (n) each
  for (int i = 0; i < n; i++) {
    a[i] = float(i);
    b[i] = float(2 * i + 1);  // sums are small integers: exact in float32
  }
  float *da = nullptr, *db = nullptr, *dc = nullptr;
  std::string err;
  cudaError_t e;
  if ((e = cudaMalloc(&da, n * sizeof(float))) != cudaSuccess) err = describe(e, "cudaMalloc");
  else if ((e = cudaMalloc(&db, n * sizeof(float))) != cudaSuccess) err = describe(e, "cudaMalloc");
  else if ((e = cudaMalloc(&dc, n * sizeof(float))) != cudaSuccess) err = describe(e, "cudaMalloc");
  else if ((e = cudaMemcpy(da, a.data(), n * sizeof(float), cudaMemcpyHostToDevice)) != cudaSuccess) err = describe(e, "cudaMemcpy");
  else if ((e = cudaMemcpy(db, b.data(), n * sizeof(float), cudaMemcpyHostToDevice)) != cudaSuccess) err = describe(e, "cudaMemcpy");
  else {
    probe_vector_add<<<(n + 255) / 256, 256>>>(dc, da, db, n);
    if ((e = cudaGetLastError()) != cudaSuccess) err = describe(e, "kernel launch");
    else if ((e = cudaDeviceSynchronize()) != cudaSuccess) err = describe(e, "kernel execution");
    else if ((e = cudaMemcpy(c.data(), dc, n * sizeof(float), cudaMemcpyDeviceToHost)) != cudaSuccess) err = describe(e, "cudaMemcpy");
    else {
      for (int i = 0; i < n; i++) {
        if (c[i] != float(3 * i + 1)) {
          char buf[128];
          std::snprintf(buf, sizeof buf, "vector add wrong at %d: got %g, expected %d", i, double(c[i]), 3 * i + 1);
          err = buf;
          break;
        }
      }
    }
  }
  cudaFree(da);
  cudaFree(db);
  cudaFree(dc);
  cudaGetLastError();  // leave no sticky launch error behind for the next user of this thread
  return err;
}

}  // namespace

CudaProbe cuda_probe() {
  CudaProbe probe;
  probe.compiled = true;
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    // No driver, driver too old, or no device: a normal situation for the CPU backend.
    probe.error = cudaGetErrorString(e);
    cudaGetLastError();
    return probe;
  }
  probe.device_count = count;
  int previous = -1;
  bool restore = cudaGetDevice(&previous) == cudaSuccess;
  for (int d = 0; d < count; d++) {
    CudaDeviceInfo info;
    info.index = d;
    cudaDeviceProp prop;
    if ((e = cudaGetDeviceProperties(&prop, d)) != cudaSuccess) {
      info.error = describe(e, "cudaGetDeviceProperties");
    } else {
      info.name = prop.name;
      info.total_memory = prop.totalGlobalMem;
      info.cc_major = prop.major;
      info.cc_minor = prop.minor;
      info.multiprocessors = prop.multiProcessorCount;
      size_t free_bytes = 0, total_bytes = 0;
      if ((e = cudaSetDevice(d)) != cudaSuccess) info.error = describe(e, "cudaSetDevice");
      else if ((e = cudaMemGetInfo(&free_bytes, &total_bytes)) != cudaSuccess) info.error = describe(e, "cudaMemGetInfo");
      else {
        info.free_memory = free_bytes;
        info.error = run_vector_add();
        info.kernel_ok = info.error.empty();
      }
    }
    cudaGetLastError();
    probe.devices.push_back(std::move(info));
  }
  if (restore) cudaSetDevice(previous);
  return probe;
}

}  // namespace ts
