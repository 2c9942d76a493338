// LoRA forward/backward on the CPU (cpu/lora.h): two thin matrix products per module and segment.
#include "cpu/lora.h"

#include <cstring>

#include "core/counter_rng.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"

namespace ts::cpu {

namespace {

// v[rows, in] *= mask / (1 - p), mask_i = (u_i >= p); rows are numbered from row0 for the hash. The
// forward applies it to a copy of x, the backward to the input gradient: one mask, never stored.
void dropout_in_place(float* v, int64_t rows, int in, int64_t row0, const LoraDropout& d) {
  const float keep_scale = 1.f / (1.f - d.p);
  parallel_for(rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++)
      for (int i = 0; i < in; i++) {
        uint64_t idx = (uint64_t)(row0 + m) * (uint64_t)in + i;
        v[m * in + i] = counter_uniform(d.key, idx) >= d.p ? v[m * in + i] * keep_scale : 0.f;
      }
  });
}

}  // namespace

void lora_forward(float* y, const float* x, const LoraApply& lora, float* u, float* xd) {
  for (const LoraSegment& seg : lora.segments) {
    const LoraModuleView& m = seg.module;
    const int64_t rows = seg.row_end - seg.row_begin;
    if (!m.A || rows <= 0) continue;
    const float* xs = x + seg.row_begin * m.in;
    if (lora.dropout.p > 0.f) {
      std::memcpy(xd, xs, rows * m.in * sizeof(float));
      dropout_in_place(xd, rows, m.in, seg.row_begin, lora.dropout);
      xs = xd;
    }
    // u[rows, r] = xd · Aᵀ ;  y[rows, out] += s · u · Bᵀ
    sgemm(false, true, rows, m.r, m.in, 1.f, xs, m.in, m.A, m.in, 0.f, u, m.r);
    sgemm(false, true, rows, m.out, m.r, m.scaling, u, m.r, m.B, m.r, 1.f, y + seg.row_begin * m.out, m.out);
  }
}

void lora_backward(float* dx, float* dA, float* dB, const float* dy, const float* x, int64_t M,
                   const LoraModuleView& m, const LoraDropout& dropout, float* u, float* du, float* dxd, float* xd) {
  const float s = m.scaling;
  const float* xs = x;
  if (dropout.p > 0.f) {
    std::memcpy(xd, x, M * m.in * sizeof(float));
    dropout_in_place(xd, M, m.in, 0, dropout);
    xs = xd;
  }
  sgemm(false, true, M, m.r, m.in, 1.f, xs, m.in, m.A, m.in, 0.f, u, m.r);      // u = xd·Aᵀ
  sgemm(true, false, m.out, m.r, M, s, dy, m.out, u, m.r, 1.f, dB, m.r);        // dB += s·dyᵀ·u
  sgemm(false, false, M, m.r, m.out, s, dy, m.out, m.B, m.r, 0.f, du, m.r);     // du = s·dy·B
  sgemm(true, false, m.r, m.in, M, 1.f, du, m.r, xs, m.in, 1.f, dA, m.in);      // dA += duᵀ·xd
  sgemm(false, false, M, m.in, m.r, 1.f, du, m.r, m.A, m.in, 0.f, dxd, m.in);   // dxd = du·A
  if (dropout.p > 0.f) dropout_in_place(dxd, M, m.in, 0, dropout);              // same mask
  for (int64_t i = 0; i < M * m.in; i++) dx[i] += dxd[i];
}

}  // namespace ts::cpu
