// The model shapes the GPU benchmarks build in device memory (random weights): "tiny" for a quick
// smoke run, anything else Llama 3 / 3.1 8B.
#pragma once

#include <string>

#include "model/config.h"

namespace ts {

inline LlamaConfig bench_shape(const std::string& preset) {
  LlamaConfig c;
  if (preset == "tiny") {
    c.H = 256, c.I = 768, c.L = 2, c.NH = 8, c.NKV = 4, c.D = 32, c.V = 2048;
  } else {  // Llama 3 / 3.1 8B
    c.H = 4096, c.I = 14336, c.L = 32, c.NH = 32, c.NKV = 8, c.D = 128, c.V = 128256;
  }
  c.rope_llama3 = true;
  c.max_pos = 131072;
  return c;
}

}  // namespace ts
