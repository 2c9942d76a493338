// NF4 quantization with double-quantized absmax (see nf4.h for the format). This is the reference
// implementation: the CUDA dequantize kernels and test/reference/nf4_ref.py must agree with it bit for bit.
//
// Arithmetic, all in float32 unless said otherwise (the Python reference mirrors each step):
//   absmax[b]  = max_j |w[64b + j]|                                   (exact)
//   index      = #{ i : w / absmax[b] > mid[i] },  mid[i] = (L[i] + L[i+1]) * 0.5f
//                (the division is IEEE float32 division; bitsandbytes multiplies by 1/absmax, which
//                can differ by one ulp at exact ties and overflows for subnormal absmax)
//   mean       = float( (sum_b double(absmax[b]), summed in block order) / nblocks )
//   d[b]       = absmax[b] - mean
//   scale[g]   = max_{b in g} |d[b]|
//   q[b]       = clamp(rint((127 * d[b]) / scale[g]), -127, 127)    (0 when scale[g] == 0)
//   absmax'[b] = mean + q[b] * (scale[g] / 127)
#include "core/nf4.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "core/thread_pool.h"

namespace ts {

const float NF4_LEVELS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

namespace {

// (15) float32 midpoints between consecutive levels; equal to bitsandbytes' decision-tree constants
// (their double midpoints rounded to float32 give the same values).
struct Midpoints {
  float m[15];
  Midpoints() {
    for (int i = 0; i < 15; i++) m[i] = (NF4_LEVELS[i] + NF4_LEVELS[i + 1]) * 0.5f;
  }
};
const Midpoints& midpoints() {
  static const Midpoints mids;
  return mids;
}

}  // namespace

uint8_t nf4_nearest(float x) {
  const float* mid = midpoints().m;
  int index = 0;
  for (int i = 0; i < 15; i++) index += x > mid[i];  // strict: a value on a midpoint stays low
  return uint8_t(index);
}

NF4Matrix nf4_quantize(const float* w, int64_t rows, int64_t cols, std::vector<float>* absmax_out) {
  if (rows < 0 || cols <= 0 || cols % NF4_BLOCK != 0)
    throw EngineError("INVALID_ARGUMENT", "nf4_quantize: shape [" + std::to_string(rows) + ", " + std::to_string(cols) +
                                              "] needs rows >= 0 and cols a positive multiple of 64");
  int64_t n = 0;
  if (__builtin_mul_overflow(rows, cols, &n)) throw EngineError("INVALID_ARGUMENT", "nf4_quantize: rows * cols overflows");

  NF4Matrix m;
  m.rows = rows;
  m.cols = cols;
  const int64_t nblocks = m.nblocks();
  m.codes.assign(size_t(n / 2), 0);
  std::vector<float> absmax(static_cast<size_t>(nblocks));  // (nblocks) exact max |w| per block

  // Blocks are independent: quantize them in parallel (results do not depend on the split).
  const float* mid = midpoints().m;
  parallel_for(nblocks, 256, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; b++) {
      const float* block = w + b * NF4_BLOCK;
      float amax = 0.f;
      for (int j = 0; j < NF4_BLOCK; j++) {
        if (!std::isfinite(block[j]))
          throw EngineError("INVALID_ARGUMENT", "nf4_quantize: non-finite weight at index " + std::to_string(b * NF4_BLOCK + j));
        amax = std::fmax(amax, std::fabs(block[j]));
      }
      absmax[size_t(b)] = amax;
      uint8_t* out = m.codes.data() + b * (NF4_BLOCK / 2);
      if (amax == 0.f) {
        for (int j = 0; j < NF4_BLOCK / 2; j++) out[j] = 0x77;  // index 7 = level 0.0 in both nibbles
        continue;
      }
      for (int j = 0; j < NF4_BLOCK; j += 2) {
        float x0 = block[j] / amax, x1 = block[j + 1] / amax;
        int i0 = 0, i1 = 0;
        for (int k = 0; k < 15; k++) {
          i0 += x0 > mid[k];
          i1 += x1 > mid[k];
        }
        out[j / 2] = uint8_t((i0 << 4) | i1);  // element 2i in the high nibble
      }
    }
  });

  // Double quantization of the absmax values: mean-subtracted, symmetric linear int8 per group of 256.
  double sum = 0;
  for (float a : absmax) sum += double(a);
  m.absmax_mean = nblocks > 0 ? float(sum / double(nblocks)) : 0.f;
  const int64_t ngroups = (nblocks + NF4_DQ_GROUP - 1) / NF4_DQ_GROUP;
  m.absmax_q.assign(size_t(nblocks), 0);
  m.absmax_scale.assign(size_t(ngroups), 0.f);
  for (int64_t g = 0; g < ngroups; g++) {
    const int64_t b0 = g * NF4_DQ_GROUP, b1 = std::min<int64_t>(b0 + NF4_DQ_GROUP, nblocks);
    float scale = 0.f;
    for (int64_t b = b0; b < b1; b++) scale = std::fmax(scale, std::fabs(absmax[size_t(b)] - m.absmax_mean));
    m.absmax_scale[size_t(g)] = scale;
    if (scale == 0.f) continue;  // every absmax in the group equals the mean exactly: q = 0 is exact
    for (int64_t b = b0; b < b1; b++) {
      float d = absmax[size_t(b)] - m.absmax_mean;
      float q = std::nearbyint((127.f * d) / scale);  // round half to even, as numpy's rint
      m.absmax_q[size_t(b)] = int8_t(std::fmin(127.f, std::fmax(-127.f, q)));
    }
  }

  if (absmax_out) *absmax_out = std::move(absmax);
  return m;
}

float nf4_block_absmax(const NF4View& m, int64_t block) {
  const float scale = m.absmax_scale[size_t(block / NF4_DQ_GROUP)];
  return m.absmax_mean + float(m.absmax_q[size_t(block)]) * (scale / 127.f);
}

void nf4_dequantize_rows(const NF4View& m, int64_t row_begin, int64_t row_end, float* out) {
  const int64_t b0 = row_begin * m.cols / NF4_BLOCK, b1 = row_end * m.cols / NF4_BLOCK;
  for (int64_t b = b0; b < b1; b++) {
    const float amax = nf4_block_absmax(m, b);
    const uint8_t* codes = m.codes + b * (NF4_BLOCK / 2);
    float* dst = out + (b - b0) * NF4_BLOCK;
    for (int j = 0; j < NF4_BLOCK / 2; j++) {
      dst[2 * j] = NF4_LEVELS[codes[j] >> 4] * amax;
      dst[2 * j + 1] = NF4_LEVELS[codes[j] & 15] * amax;
    }
  }
}

}  // namespace ts
