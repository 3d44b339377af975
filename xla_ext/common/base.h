// What every native file needs: the host/device function qualifier and the element types.
//
// The problem descriptions (common/<op>.h) are plain structs of 64-bit sizes: every index product
// (pixel * channels, sample * channels, batch * height * width * channels) is formed in int64_t,
// because a batch of feature maps easily passes 2^31 elements while each factor stays small.

#ifndef FLAXDCN_XLA_EXT_COMMON_BASE_H_
#define FLAXDCN_XLA_EXT_COMMON_BASE_H_

#include <cstdint>

// Functions shared by host and device code.
#if defined(__CUDACC__)
#define FLAXDCN_HD __host__ __device__ __forceinline__
#else
#define FLAXDCN_HD inline
#endif

namespace flaxdcn {

// Element types of the arrays a kernel reads and writes.
enum class ElementType { kF32, kF64, kF16, kBF16 };

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_BASE_H_
