// NF4 (4-bit NormalFloat) weights as in QLoRA / bitsandbytes, with double-quantized absmax.
//
// A [rows, cols] matrix is cut, in row-major order, into blocks of 64 consecutive weights (cols must be
// a multiple of 64, so a block never spans two rows). Each block keeps absmax = max|w| and, per weight,
// the index of the NF4 level nearest to w/absmax. Dequantized w = NF4_LEVELS[index] * absmax.
// Double quantization: the per-block absmax values (float32) have their mean subtracted and are then
// quantized to 8 bits in groups of 256 blocks with a symmetric linear code: q = round(127 * (a - mean) /
// scale), scale = max |a - mean| over the group, so |dequant(a) - a| <= scale / 254 (half a code step).
// (bitsandbytes uses its "dynamic" 8-bit code here instead; the storage cost is the same.)
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/host_device.h"

namespace ts {

constexpr int NF4_BLOCK = 64;         // weights per absmax block
constexpr int NF4_DQ_GROUP = 256;     // absmax blocks per double-quantization group
extern const float NF4_LEVELS[16];    // the 16 levels, ascending, REFERENCE.md values

// A non-owning view of NF4 data in some backend's memory (what the matrix kernels take).
struct NF4View {
  int64_t rows = 0, cols = 0;
  const uint8_t* codes = nullptr;        // (rows*cols/2)
  const int8_t* absmax_q = nullptr;      // (nblocks)
  const float* absmax_scale = nullptr;   // (ceil(nblocks/256))
  float absmax_mean = 0.f;
  int64_t nblocks() const { return rows * cols / NF4_BLOCK; }
};

struct NF4Matrix {
  int64_t rows = 0, cols = 0;           // logical shape [rows, cols] (a linear weight: [out, in])
  std::vector<uint8_t> codes;           // (rows*cols/2) element 2i in the high nibble, 2i+1 in the low
  std::vector<int8_t> absmax_q;         // (nblocks) 8-bit code of (absmax - absmax_mean) per block
  std::vector<float> absmax_scale;      // (ceil(nblocks/256)) scale of each group of 256 blocks
  float absmax_mean = 0.f;              // mean of all block absmax values
  int64_t nblocks() const { return rows * cols / NF4_BLOCK; }
  size_t bytes() const { return codes.size() + absmax_q.size() + absmax_scale.size() * 4 + 4; }
  NF4View view() const { return {rows, cols, codes.data(), absmax_q.data(), absmax_scale.data(), absmax_mean}; }
};

// Index of the NF4 level nearest to x (x in [-1, 1]), decided as bitsandbytes' decision tree does: the
// count of float32 midpoints m with x > m (strict), so a value exactly on a midpoint takes the LOWER
// level (bitsandbytes: `if (x > 0.8614784f) return 15; else return 14;`).
uint8_t nf4_nearest(float x);

// Quantizes w (rows*cols floats). Blocks whose absmax is 0 store index 7 (level 0.0).
// Writes the undouble-quantized absmax per block to `absmax_out` when given (for tests).
NF4Matrix nf4_quantize(const float* w, int64_t rows, int64_t cols, std::vector<float>* absmax_out = nullptr);
// The absmax of block b after double quantization (what dequantization uses).
float nf4_block_absmax(const NF4View& m, int64_t block);
// Dequantizes rows [row_begin, row_end) into out ((row_end-row_begin)*cols floats).
void nf4_dequantize_rows(const NF4View& m, int64_t row_begin, int64_t row_end, float* out);

}  // namespace ts
