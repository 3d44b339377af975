#include "xla_ext/cuda/accumulate.h"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "xla_ext/common/base.h"
#include "xla_ext/cuda/common.cuh"

namespace flaxdcn {
namespace cuda {
namespace {

size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }

size_t AccBytes(ElementType type) { return type == ElementType::kF64 ? 8 : 4; }

// Grid-stride launch shape for elementwise passes.
unsigned int ElementwiseGrid(int64_t n) {
  const int64_t blocks = (n + kBlockThreads - 1) / kBlockThreads;
  return static_cast<unsigned int>(blocks < 4096 ? blocks : 4096);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    MaxAbsKernel(const T* __restrict__ x, int64_t n, unsigned long long* max_bits) {
  double m = 0.0;
  for (int64_t i = blockIdx.x * int64_t{kBlockThreads} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kBlockThreads) {
    const double v = fabs(static_cast<double>(ToAcc<T>(x[i])));
    if (IsFinite(v) && v > m) m = v;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    m = fmax(m, __shfl_xor_sync(0xffffffffu, m, offset));
  }
  // Non-negative doubles order like their bit patterns: an integer max is exact and commutes.
  if ((threadIdx.x & 31) == 0) {
    atomicMax(max_bits, static_cast<unsigned long long>(__double_as_longlong(m)));
  }
}

// Exponent e of a finite non-negative x: x < 2^e (frexp's, with 0 for x = 0 and 1024 for
// non-finite x, which MaxAbs never produces).
__device__ __forceinline__ int BoundExponent(double x) {
  if (!(x > 0.0)) return 0;
  if (!IsFinite(x)) return 1024;
  int exponent;
  frexp(x, &exponent);
  return exponent;
}

__global__ void FixedPointScaleKernel(const unsigned long long* max_bits, bool use_second,
                                      double factor, FixedScale* scale) {
  const double first = __longlong_as_double(static_cast<long long>(max_bits[0]));
  const double second =
      use_second ? __longlong_as_double(static_cast<long long>(max_bits[1])) : 1.0;
  // A contribution is a double of magnitude at most first * second, rounded: below 2^1024 when
  // finite, and at least 2^-1074 when nonzero. The bound's exponent is formed from the factors'
  // exponents, never from their product, which can overflow or underflow.
  int exponent = BoundExponent(first) + BoundExponent(second);
  exponent = exponent < -1073 ? -1073 : exponent > 1024 ? 1024 : exponent;
  exponent += BoundExponent(factor);
  const int shift = 62 - exponent;  // in [-1026, 1135]
  scale->first = ldexp(1.0, shift - shift / 2);
  scale->second = ldexp(1.0, shift / 2);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    FinishFixedKernel(const unsigned long long* __restrict__ fixed,
                      const Acc<T>* __restrict__ special, const FixedScale* scale,
                      T* __restrict__ out, int64_t n) {
  // The scale's factors are powers of two in [2^-513, 2^568]: their inverses are exact.
  const double inverse_first = 1.0 / scale->first;
  const double inverse_second = 1.0 / scale->second;
  for (int64_t i = blockIdx.x * int64_t{kBlockThreads} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kBlockThreads) {
    const Acc<T> s = special[i];
    const double sum =
        static_cast<double>(static_cast<long long>(fixed[i])) * inverse_first * inverse_second;
    out[i] = FromAcc<T>(s != Acc<T>(0) ? s : static_cast<Acc<T>>(sum));  // NaN != 0 too
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    StoreKernel(const Acc<T>* __restrict__ acc, T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kBlockThreads} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kBlockThreads) {
    out[i] = FromAcc<T>(acc[i]);
  }
}

}  // namespace

size_t GradWorkspaceBytes(ElementType type, int64_t elements, bool deterministic) {
  const size_t n = static_cast<size_t>(elements);
  if (deterministic) {
    return AlignUp(n * 8) + AlignUp(n * AccBytes(type)) + AlignUp(2 * 8) +
           AlignUp(sizeof(FixedScale));
  }
  // Float32 and float64 accumulate into the gradient itself; half types into float32.
  return type == ElementType::kF32 || type == ElementType::kF64 ? 0 : AlignUp(n * 4);
}

cudaError_t PrepareGrad(cudaStream_t stream, ElementType type, int64_t elements,
                        bool deterministic, void* workspace, void* grad, GradBuffers* buffers) {
  *buffers = GradBuffers{};
  const size_t n = static_cast<size_t>(elements);
  char* base = static_cast<char*>(workspace);
  if (!deterministic) {
    const bool in_place = type == ElementType::kF32 || type == ElementType::kF64;
    buffers->atomic = in_place ? grad : workspace;
    return cudaMemsetAsync(buffers->atomic, 0, n * AccBytes(type), stream);
  }
  buffers->fixed = reinterpret_cast<unsigned long long*>(base);
  base += AlignUp(n * 8);
  buffers->special = base;
  base += AlignUp(n * AccBytes(type));
  buffers->max_bits = reinterpret_cast<unsigned long long*>(base);
  base += AlignUp(2 * 8);
  buffers->scale = reinterpret_cast<FixedScale*>(base);
  return cudaMemsetAsync(workspace, 0, GradWorkspaceBytes(type, elements, true), stream);
}

cudaError_t LaunchMaxAbs(cudaStream_t stream, ElementType type, const void* x, int64_t n,
                         unsigned long long* max_bits, int slot) {
  if (n == 0) return cudaSuccess;
  return DispatchType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    MaxAbsKernel<T><<<ElementwiseGrid(n), kBlockThreads, 0, stream>>>(
        static_cast<const T*>(x), n, max_bits + slot);
    return cudaGetLastError();
  });
}

cudaError_t LaunchFixedPointScale(cudaStream_t stream, const GradBuffers& buffers,
                                  bool use_second, double factor) {
  FixedPointScaleKernel<<<1, 1, 0, stream>>>(buffers.max_bits, use_second, factor, buffers.scale);
  return cudaGetLastError();
}

cudaError_t LaunchContributionScale(cudaStream_t stream, ElementType type,
                                    const GradBuffers& buffers, const void* cotangent,
                                    int64_t cotangent_count, const void* mask,
                                    int64_t mask_count, double factor) {
  if (cudaError_t e = LaunchMaxAbs(stream, type, cotangent, cotangent_count, buffers.max_bits, 0);
      e != cudaSuccess) {
    return e;
  }
  if (mask != nullptr) {
    if (cudaError_t e = LaunchMaxAbs(stream, type, mask, mask_count, buffers.max_bits, 1);
        e != cudaSuccess) {
      return e;
    }
  }
  return LaunchFixedPointScale(stream, buffers, mask != nullptr, factor);
}

cudaError_t FinishGrad(cudaStream_t stream, ElementType type, int64_t elements,
                       bool deterministic, const GradBuffers& buffers, void* grad) {
  if (elements == 0) return cudaSuccess;
  const bool in_place = type == ElementType::kF32 || type == ElementType::kF64;
  if (!deterministic && in_place) return cudaSuccess;
  return DispatchType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (deterministic) {
      FinishFixedKernel<T><<<ElementwiseGrid(elements), kBlockThreads, 0, stream>>>(
          buffers.fixed, static_cast<const Acc<T>*>(buffers.special), buffers.scale,
          static_cast<T*>(grad), elements);
    } else {
      StoreKernel<T><<<ElementwiseGrid(elements), kBlockThreads, 0, stream>>>(
          static_cast<const Acc<T>*>(buffers.atomic), static_cast<T*>(grad), elements);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace flaxdcn
