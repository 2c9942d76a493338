// Element types found in Hugging Face safetensors files and their conversion to/from float32.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace ts {

// Every dtype the safetensors format defines, so any valid file opens; only F32/F16/BF16/F64 convert.
enum class DType { F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL, U64, U32, U16, F8_E4M3, F8_E5M2 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);          // safetensors spelling: "F32", "BF16", ...
bool dtype_from_name(const std::string& name, DType* out);

// bf16: the top 16 bits of a float32; rounding to nearest even on the way down, NaN kept NaN.
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);  // round to nearest even, overflow to inf

// Converts n elements of `src` (type t) to float32. Integer and bool types are refused (throws).
void convert_to_f32(float* dst, const void* src, DType t, size_t n);
// Converts n float32 values into `dst` of type t (F32, F16 or BF16).
void convert_from_f32(void* dst, const float* src, DType t, size_t n);

}  // namespace ts
