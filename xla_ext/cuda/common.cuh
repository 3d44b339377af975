// Device helpers shared by the CUDA kernels: element types and their float accumulation, channel
// vectors, sub-warp reductions and the grad-input accumulators (atomic or fixed point).

#ifndef FLAXDCN_XLA_EXT_CUDA_COMMON_CUH_
#define FLAXDCN_XLA_EXT_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "xla_ext/common/base.h"
#include "xla_ext/common/sampling.h"

namespace flaxdcn {
namespace cuda {

constexpr int kBlockThreads = 256;

// Registers of one SM on sm_80 and sm_90 (64 K 32-bit registers).
constexpr int kRegistersPerSm = 65536;

// Second argument of __launch_bounds__(kBlockThreads, ...): the blocks of kBlockThreads that must
// fit on one SM at once when each thread holds `registers`, so ptxas keeps the kernel at or below
// `registers` (64, 80 or 128 here; at most 128, the register budget tests/test_cuda_resources.py
// checks in the built module) and, given a minimum, does not spill to local memory to reach a
// higher occupancy of its own accord. Without one, nvcc 13.0 picks the count itself: it spills a
// few bytes in some kernels to stay at 48 or 64 registers and gives others up to 242.
constexpr int MinBlocks(int registers) { return kRegistersPerSm / (kBlockThreads * registers); }

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) with T the device element type of `type`.
template <typename Fn>
cudaError_t DispatchType(ElementType type, Fn&& fn) {
  switch (type) {
    case ElementType::kF32:
      return fn(Tag<float>{});
    case ElementType::kF64:
      return fn(Tag<double>{});
    case ElementType::kF16:
      return fn(Tag<__half>{});
    case ElementType::kBF16:
      return fn(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Accumulation type: float for float32 and the half types, double for float64.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ Acc<T> ToAcc(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return x;
  }
}

template <typename T>
__device__ __forceinline__ T FromAcc(Acc<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// V consecutive channels, loaded and stored as one aligned vector (16 bytes at the widest).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T>
constexpr int kWideVec = 16 / sizeof(T);

template <typename T, int V>
__device__ __forceinline__ void LoadVec(const T* ptr, Acc<T> (&out)[V]) {
  const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(ptr);
  if constexpr (std::is_same_v<T, __half> && V % 2 == 0) {
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      const float2 f = __half22float2(__halves2half2(x.v[2 * i], x.v[2 * i + 1]));
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  } else if constexpr (std::is_same_v<T, __nv_bfloat16> && V % 2 == 0) {
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      const float2 f = __bfloat1622float2(__halves2bfloat162(x.v[2 * i], x.v[2 * i + 1]));
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = ToAcc<T>(x.v[i]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void StoreVec(T* ptr, const Acc<T> (&in)[V]) {
  Vec<T, V> x;
#pragma unroll
  for (int i = 0; i < V; ++i) x.v[i] = FromAcc<T>(in[i]);
  *reinterpret_cast<Vec<T, V>*>(ptr) = x;
}

// Sum over the `lanes` (a power of two <= 32) lanes of a sub-warp, in a fixed butterfly order.
// Every lane of the warp must call it.
template <typename A>
__device__ __forceinline__ A SubWarpSum(A value, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset, lanes);
  }
  return value;
}

// Lanes of the sub-warp that shares one sample: enough to cover `vectors` channel vectors, at most
// a warp.
inline int SubWarpLanes(int64_t vectors) {
  int lanes = 1;
  while (lanes < 32 && lanes < vectors) lanes *= 2;
  return lanes;
}

// Largest gridDim.x of a launch (compute capability 3.0 and newer).
constexpr int64_t kMaxGridBlocks = 2147483647;

// Blocks of kBlockThreads that cover `units` sub-warps of `lanes` lanes, in *grid. More blocks
// than one launch can have is cudaErrorInvalidConfiguration, the error CUDA gives a launch past
// its limits, and *grid is left alone: the count never wraps to a smaller grid that would skip
// units. `units` >= 0 and `lanes` a power of two <= 32, so the sum below cannot overflow.
inline cudaError_t GridFor(int64_t units, int lanes, unsigned int* grid) {
  const int64_t per_block = kBlockThreads / lanes;
  const int64_t blocks = units / per_block + (units % per_block != 0 ? 1 : 0);
  if (blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  *grid = static_cast<unsigned int>(blocks);
  return cudaSuccess;
}

inline bool Aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

inline size_t ElementBytes(ElementType type) {
  return type == ElementType::kF64 ? 8 : type == ElementType::kF32 ? 4 : 2;
}

// How grad-input contributions are summed (see accumulate.h).
enum class Accumulate { kAtomic, kFixedPoint };

// Fixed-point units per unit: 2^shift as the product of two powers of two, each a normal double
// (2^shift itself leaves the double range for bounds below 2^-962). Multiplying by one, then the
// other, is exact wherever the result can round to a nonzero unit count.
struct FixedScale {
  double first;
  double second;
};

template <typename A>
struct GradAccumulator {
  A* atomic;                 // kAtomic: [elements] in the accumulation type, zeroed
  unsigned long long* fixed;  // kFixedPoint: [elements] 64-bit two's complement, zeroed
  A* special;                // kFixedPoint: [elements] sum of the non-finite contributions, zeroed
  const FixedScale* scale;   // kFixedPoint: fixed-point units per unit (device scalar)
};

template <Accumulate M, typename A>
__device__ __forceinline__ void AccumulateAdd(const GradAccumulator<A>& acc,
                                              const FixedScale& scale, int64_t index, A value) {
  if constexpr (M == Accumulate::kAtomic) {
    atomicAdd(acc.atomic + index, value);
  } else {
    if (value == A(0)) return;
    if (!IsFinite(value)) {
      // Inf and NaN absorb finite terms, so this sum does not depend on the order either.
      atomicAdd(acc.special + index, value);
      return;
    }
    // |value| * 2^shift < 2^62 by the choice of shift: the conversion cannot overflow, and
    // integer addition is exact and commutative, hence order-independent.
    const long long units =
        __double2ll_rn(static_cast<double>(value) * scale.first * scale.second);
    atomicAdd(acc.fixed + index, static_cast<unsigned long long>(units));
  }
}

}  // namespace cuda
}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CUDA_COMMON_CUH_
