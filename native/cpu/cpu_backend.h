// The CPU backend: the op set of core/backend.h on today's float32 kernels (cpu/ops.h, cpu/gemm.h,
// cpu/lora.h, cpu/sampler.h), multithreaded on the process-wide pool. It is the oracle every other
// backend is checked against, so it adds no math of its own: it checks dtypes and layouts and calls
// the kernels.
#pragma once
#include <memory>

#include "core/backend.h"

namespace ts::cpu {

std::unique_ptr<Backend> make_cpu_backend();

}  // namespace ts::cpu
