// Element types of safetensors files: sizes, names, and exact float16/bfloat16 <-> float32 conversion.
// All conversions round to nearest even; the file formats are little-endian, as is every host we target.
#include "core/dtype.h"

#include "core/error.h"

namespace ts {

static_assert(sizeof(float) == 4 && sizeof(double) == 8, "IEEE float32/float64 expected");

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: case DType::U64: return 8;
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: case DType::U16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: case DType::F8_E4M3: case DType::F8_E5M2: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
    case DType::U64: return "U64";
    case DType::U32: return "U32";
    case DType::U16: return "U16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E5M2: return "F8_E5M2";
  }
  return "?";
}

bool dtype_from_name(const std::string& name, DType* out) {
  static const struct { const char* name; DType type; } table[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16}, {"F64", DType::F64},
      {"I64", DType::I64}, {"I32", DType::I32}, {"I16", DType::I16},   {"I8", DType::I8},
      {"U8", DType::U8},   {"BOOL", DType::BOOL}, {"U64", DType::U64}, {"U32", DType::U32},
      {"U16", DType::U16}, {"F8_E4M3", DType::F8_E4M3}, {"F8_E5M2", DType::F8_E5M2},
  };
  for (const auto& e : table) {
    if (name == e.name) {
      *out = e.type;
      return true;
    }
  }
  return false;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t u;
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24, exact in float32
    float f = float(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else if (exponent == 31) {
    u = sign | 0x7f800000u | (mantissa << 13);  // inf, or NaN with its payload
  } else {
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // quiet NaN
  // 65520 = 0x477ff000 is halfway between 65504 (max half) and 65536; ties go to even = inf.
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);
  if (a >= 0x38800000u) {
    // normal half: round the 13 dropped mantissa bits to nearest even, then rebias 127 -> 15
    // (a carry out of the mantissa correctly bumps the exponent).
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return uint16_t(sign | ((r - 0x38000000u) >> 13));
  }
  // subnormal half: value / 2^-24 rounded to nearest even. Below 2^-25 everything rounds to 0
  // (exactly 2^-25 is a tie and 0 is the even neighbour).
  int e = int(a >> 23);
  if (e < 102) return sign;
  uint32_t m = (a & 0x7fffffu) | 0x800000u;  // 24-bit significand: value = m * 2^(e-150)
  int shift = 126 - e;                        // 14..24
  uint32_t q = m >> shift;
  uint32_t rem = m & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) q++;  // q may reach 0x400: the smallest normal
  return uint16_t(sign | q);
}

void convert_to_f32(float* dst, const void* src, DType t, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(src);  // may be unaligned: load through memcpy
  switch (t) {
    case DType::F32:
      std::memcpy(dst, p, n * 4);
      return;
    case DType::F16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      return;
    case DType::BF16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      return;
    case DType::F64:
      for (size_t i = 0; i < n; i++) {
        double d;
        std::memcpy(&d, p + 8 * i, 8);
        dst[i] = float(d);
      }
      return;
    default:
      throw EngineError("UNSUPPORTED",
                        std::string("cannot convert ") + dtype_name(t) + " to float32 (not a float type)");
  }
}

void convert_from_f32(void* dst, const float* src, DType t, size_t n) {
  uint8_t* p = static_cast<uint8_t*>(dst);
  switch (t) {
    case DType::F32:
      std::memcpy(p, src, n * 4);
      return;
    case DType::F16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h = f32_to_f16(src[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
      return;
    case DType::BF16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h = f32_to_bf16(src[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
      return;
    default:
      throw EngineError("UNSUPPORTED",
                        std::string("cannot convert float32 to ") + dtype_name(t) + " (only F32, F16, BF16)");
  }
}

}  // namespace ts
