// Host stand-in for the toolkit's cuda_fp16.h (used only where no CUDA toolkit is installed): the
// storage type and the round-to-nearest-even conversions the kernels call, on the CPU kernels'
// IEEE binary16 conversions (xla_ext/cpu/types.h).

#ifndef FLAXDCN_TESTS_SIMT_FALLBACK_CUDA_FP16_H_
#define FLAXDCN_TESTS_SIMT_FALLBACK_CUDA_FP16_H_

#include "vector_types.h"
#include "xla_ext/cpu/types.h"

struct alignas(2) __half {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};

inline float __half2float(__half h) { return flaxdcn::HalfToFloat(h.__x); }
inline __half __float2half_rn(float f) { return __half{flaxdcn::FloatToHalf(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline float2 __half22float2(__half2 h) {
  return float2{__half2float(h.x), __half2float(h.y)};
}
inline __half2 __floats2half2_rn(float a, float b) {
  return __half2{__float2half_rn(a), __float2half_rn(b)};
}

#endif  // FLAXDCN_TESTS_SIMT_FALLBACK_CUDA_FP16_H_
