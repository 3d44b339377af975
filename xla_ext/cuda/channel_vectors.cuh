// Code shared by the CUDA kernels in which one sub-warp owns one sample's bilinear weights
// (deform_conv_kernels.cu, dcnv3_kernels.cu): the channel loops over vectors of V channels, the
// sub-warp indexing, and the launch: vector width, lanes, grid and template constants.
//
// A sub-warp is a power-of-two group of `lanes` lanes (at most a warp); lane l walks the channel
// vectors l, l + lanes, ... of the group's channels. Index arithmetic is 64-bit.

#ifndef FLAXDCN_XLA_EXT_CUDA_CHANNEL_VECTORS_CUH_
#define FLAXDCN_XLA_EXT_CUDA_CHANNEL_VECTORS_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "xla_ext/common/base.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cuda/accumulate.h"
#include "xla_ext/cuda/common.cuh"

namespace flaxdcn {
namespace cuda {

// The unit (sample, or position and group) of this thread's sub-warp, and its lane.
__device__ __forceinline__ int64_t SubWarpUnit(int lanes) {
  return int64_t{blockIdx.x} * (kBlockThreads / lanes) + threadIdx.x / lanes;
}
__device__ __forceinline__ int SubWarpLane(int lanes) { return threadIdx.x & (lanes - 1); }

// acc[i] += sum_q weight_q * image[pixel_q * p.channels + c + i] over the corners of `s` inside
// the image, for the V channels from c.
//
// The helpers read sizes from the kernel's `p` itself (not copies passed by value), so that
// inlined they compile to the code, and the register count, of the loop written in the kernel.
template <typename T, int V, typename Params>
__device__ __forceinline__ void AccumulateCorners(const Params& p, const ConvSample<Acc<T>>& s,
                                                  const T* image, int64_t c, Acc<T> (&acc)[V]) {
  using A = Acc<T>;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (s.pixel[q] < 0) continue;
    A v[V];
    LoadVec<T, V>(image + s.pixel[q] * p.channels + c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += s.weight[q] * v[i];
  }
}

// The backward of one sample over this lane's channel vectors of its group: adds
// grad[c] * weight_q to grad-input at input element image_base + pixel_q * p.channels + c for every
// corner inside the image, and dots[q] += sum_c grad[c] * input[...] (this lane's share of the
// four reductions; the caller sums them over the sub-warp).
template <typename T, int V, Accumulate M, typename Params>
__device__ __forceinline__ void ScatterAndReduceVectors(
    const Params& p, const ConvSample<Acc<T>>& s, int lane, int lanes, int64_t group_channels,
    const T* __restrict__ grad, const T* __restrict__ input, int64_t image_base,
    const GradAccumulator<Acc<T>>& acc, const FixedScale& scale, Acc<T> (&dots)[4]) {
  using A = Acc<T>;
  for (int64_t c = int64_t{lane} * V; c < group_channels; c += int64_t{lanes} * V) {
    A gv[V];
    LoadVec<T, V>(grad + c, gv);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (s.pixel[q] < 0) continue;
      const int64_t base = image_base + s.pixel[q] * p.channels + c;
      A v[V];
      LoadVec<T, V>(input + base, v);
      A d = A(0);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        d += gv[i] * v[i];
        AccumulateAdd<M>(acc, scale, base + i, gv[i] * s.weight[q]);
      }
      dots[q] += d;
    }
  }
}

// The widest vector that divides the group's channels and keeps every access aligned.
template <typename T, typename Params>
int VectorWidth(const Params& p, std::initializer_list<const void*> pointers) {
  constexpr int kWide = kWideVec<T>;
  if (p.group_channels() % kWide != 0) return 1;
  for (const void* ptr : pointers) {
    if (ptr != nullptr && !Aligned(ptr, kWide * sizeof(T))) return 1;
  }
  return kWide;
}

// The runtime choices of a launch as template constants. WithWidth calls
// launch(std::integral_constant<int, V>{}) with V the vector `width` (kWideVec<T> or 1);
// WithWidthAndMode adds std::integral_constant<Accumulate, M>{}, M the accumulation mode.
template <typename T, typename Launch>
void WithWidth(int width, Launch&& launch) {
  if (width == kWideVec<T>) {
    launch(std::integral_constant<int, kWideVec<T>>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename T, typename Launch>
void WithWidthAndMode(int width, bool deterministic, Launch&& launch) {
  WithWidth<T>(width, [&](auto v) {
    if (deterministic) {
      launch(v, std::integral_constant<Accumulate, Accumulate::kFixedPoint>{});
    } else {
      launch(v, std::integral_constant<Accumulate, Accumulate::kAtomic>{});
    }
  });
}

// Launches a kernel whose sub-warps own one unit each (`units` of them) and walk the group's
// channels in vectors: the vector width fits the group's channels and `vector_pointers`, and
// launch(v, lanes, grid) enqueues the kernel with V = decltype(v)::value.
template <typename T, typename Params, typename Launch>
cudaError_t LaunchSubWarps(const Params& p, int64_t units,
                           std::initializer_list<const void*> vector_pointers, Launch&& launch) {
  const int width = VectorWidth<T>(p, vector_pointers);
  const int lanes = SubWarpLanes(p.group_channels() / width);
  unsigned int grid;
  if (cudaError_t e = GridFor(units, lanes, &grid); e != cudaSuccess) return e;
  WithWidth<T>(width, [&](auto v) { launch(v, lanes, grid); });
  return cudaGetLastError();
}

// Launches the backward kernel of an op whose sub-warps own one sample each (p.samples() of
// them), accumulating grad-input into `buffers`: the vector width fits the group's channels and
// `vector_pointers`, and launch(Tag<T>{}, v, mode, lanes, grid, acc) enqueues the kernel with
// V = decltype(v)::value, M = decltype(mode)::value and acc, the GradAccumulator<Acc<T>>.
template <typename Params, typename Launch>
cudaError_t LaunchSampleBackward(ElementType type, const Params& p, bool deterministic,
                                 const GradBuffers& buffers,
                                 std::initializer_list<const void*> vector_pointers,
                                 Launch&& launch) {
  return DispatchType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    const int width = VectorWidth<T>(p, vector_pointers);
    const int lanes = SubWarpLanes(p.group_channels() / width);
    unsigned int grid;
    if (cudaError_t e = GridFor(p.samples(), lanes, &grid); e != cudaSuccess) return e;
    const GradAccumulator<A> acc{static_cast<A*>(buffers.atomic), buffers.fixed,
                                 static_cast<A*>(buffers.special), buffers.scale};
    WithWidthAndMode<T>(width, deterministic, [&](auto v, auto mode) {
      launch(tag, v, mode, lanes, grid, acc);
    });
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CUDA_CHANNEL_VECTORS_CUH_
