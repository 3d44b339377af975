// Host stand-in for the toolkit's cuda_bf16.h (used only where no CUDA toolkit is installed): the
// storage type and the round-to-nearest-even conversions the kernels call, on the CPU kernels'
// bfloat16 conversions (xla_ext/cpu/types.h).

#ifndef FLAXDCN_TESTS_SIMT_FALLBACK_CUDA_BF16_H_
#define FLAXDCN_TESTS_SIMT_FALLBACK_CUDA_BF16_H_

#include "cuda_fp16.h"
#include "vector_types.h"
#include "xla_ext/cpu/types.h"

struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 b) { return flaxdcn::BFloat16ToFloat(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{flaxdcn::FloatToBFloat16(f)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __nv_bfloat162{a, b};
}
inline float2 __bfloat1622float2(__nv_bfloat162 b) {
  return float2{__bfloat162float(b.x), __bfloat162float(b.y)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

#endif  // FLAXDCN_TESTS_SIMT_FALLBACK_CUDA_BF16_H_
