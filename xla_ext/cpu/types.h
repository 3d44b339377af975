// Host element types: float16 and bfloat16 storage with round-to-nearest-even conversions, and
// the per-element load/store the CPU kernels use (accumulation in float, double for double).

#ifndef FLAXDCN_XLA_EXT_CPU_TYPES_H_
#define FLAXDCN_XLA_EXT_CPU_TYPES_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace flaxdcn {

// IEEE binary16 and bfloat16 as stored by XLA (16-bit payloads, same layout as uint16_t).
struct Float16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return BitsFloat(sign | 0x7f800000u | (mantissa << 13));  // Inf, NaN
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return BitsFloat(sign | FloatBits(magnitude));
  }
  return BitsFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t FloatToHalf(float f) {
  uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;  // NaN stays a (quiet) NaN
  if (u >= 0x47800000u) return sign | 0x7c00u;  // |f| >= 65536 (and Inf): Inf
  if (u < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5 puts the 10 fraction bits of the
    // subnormal result at the bottom of the float's mantissa, rounded to nearest even by the FPU.
    const float shifted = BitsFloat(u) + 0.5f;
    return sign | static_cast<uint16_t>(FloatBits(shifted) - FloatBits(0.5f));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even; a carry
  // out of the mantissa correctly bumps the exponent (up to Inf).
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // (15 - 127) << 23, plus the rounding bias 0xfff
  return sign | static_cast<uint16_t>(u >> 13);
}

inline float BFloat16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

inline uint16_t FloatToBFloat16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Load/Store between a stored element T and its accumulation type Acc.
template <typename T>
struct Element {
  using Acc = T;
  static Acc Load(T x) { return x; }
  static T Store(Acc x) { return x; }
};

template <>
struct Element<Float16> {
  using Acc = float;
  static float Load(Float16 x) { return HalfToFloat(x.bits); }
  static Float16 Store(float x) { return Float16{FloatToHalf(x)}; }
};

template <>
struct Element<BFloat16> {
  using Acc = float;
  static float Load(BFloat16 x) { return BFloat16ToFloat(x.bits); }
  static BFloat16 Store(float x) { return BFloat16{FloatToBFloat16(x)}; }
};

template <typename T>
using AccType = typename Element<T>::Acc;

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CPU_TYPES_H_
