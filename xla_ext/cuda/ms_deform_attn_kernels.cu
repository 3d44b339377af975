// CUDA kernels of multi-scale deformable attention, channels last, on the sampling core of
// common/sampling.h.
//
// Forward: one sub-warp (a power-of-two group of lanes, at most a warp) owns one (image, query,
// head): it walks the head's D channels in vectors of V, and for each vector sums every level's
// and point's bilinear read times its attention weight in registers; nothing is materialised per
// sample. Each lane forms a sample's location and weights once for its vectors of channels.
// Backward: one sub-warp per sample (image, query, head, level, point), as in the DCN backward:
// the grad-value scatter of grad_out times the corner weights (float atomics, or fixed point),
// and the four channel reductions that give the location and attention-weight gradients. Index
// arithmetic is 64-bit.

#include <cuda_runtime.h>

#include <cstdint>

#include "xla_ext/common/base.h"
#include "xla_ext/common/ms_deform_attn.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cuda/accumulate.h"
#include "xla_ext/cuda/channel_vectors.cuh"
#include "xla_ext/cuda/common.cuh"
#include "xla_ext/cuda/ms_deform_attn_kernels.h"

namespace flaxdcn {
namespace cuda {
namespace {

// At most 64 registers (four blocks per SM), as the DCN im2col and DCNv3 forward: a gather.
template <typename T, int V>
__global__ void __launch_bounds__(kBlockThreads, MinBlocks(64))
    MsDeformAttnKernel(MsDeformAttnParams p, int lanes, const T* __restrict__ value,
                       const Acc<T>* __restrict__ locations, const T* __restrict__ weights,
                       T* __restrict__ out) {
  using A = Acc<T>;
  const int lane = SubWarpLane(lanes);
  const int64_t unit = SubWarpUnit(lanes);  // (n * Lq + q) * M + m
  if (unit >= p.units()) return;
  const int64_t m = unit % p.heads;
  const int64_t n = unit / (p.queries * p.heads);
  const int64_t d = p.head_channels;
  const T* image = value + n * p.values * p.channels + m * d;
  const int64_t first = unit * p.levels * p.points;  // the unit's first sample
  T* dst = out + unit * d;
  for (int64_t c = int64_t{lane} * V; c < d; c += int64_t{lanes} * V) {
    A acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = A(0);
    int64_t sample = first;
    for (int64_t l = 0; l < p.levels; ++l) {
      const T* level = image + p.level_start[l] * p.channels;
      for (int64_t k = 0; k < p.points; ++k, ++sample) {
        const ConvSample<A> s =
            MsDeformAttnSample<A>(p, l, locations[2 * sample], locations[2 * sample + 1],
                                  ToAcc<T>(weights[sample]));
        if (!s.valid) continue;
        AccumulateCorners<T, V>(p, s, level, c, acc);
      }
    }
    StoreVec<T, V>(dst + c, acc);
  }
}

// At most 80 registers (three blocks per SM), as the DCN and DCNv3 backward.
template <typename T, int V, Accumulate M>
__global__ void __launch_bounds__(kBlockThreads, MinBlocks(80))
    MsDeformAttnBackwardKernel(MsDeformAttnParams p, int lanes, const T* __restrict__ grad_out,
                               const T* __restrict__ value, const Acc<T>* __restrict__ locations,
                               const T* __restrict__ weights, GradAccumulator<Acc<T>> acc,
                               Acc<T>* __restrict__ grad_locations,
                               T* __restrict__ grad_weights) {
  using A = Acc<T>;
  const int lane = SubWarpLane(lanes);
  const int64_t sample = SubWarpUnit(lanes);
  // Inactive lanes stay to the end: the sub-warp reduction needs every lane of the warp.
  const bool active = sample < p.samples();
  const FixedScale scale = M == Accumulate::kFixedPoint ? *acc.scale : FixedScale{0.0, 0.0};
  A dots[4] = {A(0), A(0), A(0), A(0)};
  A weight = A(0);
  ConvSample<A> s;
  int64_t l = 0, unit = 0;
  if (active) {
    l = (sample / p.points) % p.levels;
    unit = sample / (p.points * p.levels);
    weight = ToAcc<T>(weights[sample]);
    s = MsDeformAttnSample<A>(p, l, locations[2 * sample], locations[2 * sample + 1], weight);
  }
  if (active && s.valid) {
    const int64_t d = p.head_channels;
    const int64_t m = unit % p.heads;
    const int64_t n = unit / (p.queries * p.heads);
    const int64_t image_base = (n * p.values + p.level_start[l]) * p.channels + m * d;
    ScatterAndReduceVectors<T, V, M>(p, s, lane, lanes, d, grad_out + unit * d, value,
                                     image_base, acc, scale, dots);
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) dots[q] = SubWarpSum(dots[q], lanes);
  if (active && lane == 0) {
    const ConvSampleGrad<A> g = ConvSampleBackward(s, weight, dots);
    // d / dx = d / dw * W and d / dy = d / dh * H (w = x * W - 0.5).
    grad_locations[2 * sample] = g.w * A(p.width[l]);
    grad_locations[2 * sample + 1] = g.h * A(p.height[l]);
    grad_weights[sample] = FromAcc<T>(g.mask);
  }
}

}  // namespace
}  // namespace cuda

cudaError_t LaunchMsDeformAttn(cudaStream_t stream, ElementType type, const MsDeformAttnParams& p,
                               const void* value, const void* locations, const void* weights,
                               void* out) {
  using namespace cuda;  // NOLINT
  if (p.units() == 0 || p.head_channels == 0) return cudaSuccess;  // out is empty
  return DispatchType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    const auto* val = static_cast<const T*>(value);
    const auto* loc = static_cast<const A*>(locations);
    const auto* wts = static_cast<const T*>(weights);
    auto* dst = static_cast<T*>(out);
    return LaunchSubWarps<T>(p, p.units(), {value, out}, [&](auto v, int lanes, unsigned grid) {
      constexpr int kV = decltype(v)::value;
      MsDeformAttnKernel<T, kV><<<grid, kBlockThreads, 0, stream>>>(p, lanes, val, loc, wts, dst);
    });
  });
}

size_t MsDeformAttnBackwardWorkspace(ElementType type, const MsDeformAttnParams& p,
                                     bool deterministic) {
  return cuda::GradWorkspaceBytes(type, p.batch * p.values * p.channels, deterministic);
}

cudaError_t LaunchMsDeformAttnBackward(cudaStream_t stream, ElementType type,
                                       const MsDeformAttnParams& p, bool deterministic,
                                       const void* grad_out, const void* value,
                                       const void* locations, const void* weights,
                                       void* grad_value, void* grad_locations,
                                       void* grad_weights, void* workspace) {
  using namespace cuda;  // NOLINT
  const int64_t elements = p.batch * p.values * p.channels;
  const size_t bytes = ElementBytes(type);
  const size_t acc_bytes = type == ElementType::kF64 ? 8 : 4;  // the locations' element
  if (p.samples() == 0) {
    // No sample (and no sampling gradient): grad_value is zero.
    return elements == 0 ? cudaSuccess : cudaMemsetAsync(grad_value, 0, elements * bytes, stream);
  }
  if (p.head_channels == 0) {
    // No channel to reduce (and no value element): the sampling gradients are zero.
    if (cudaError_t e = cudaMemsetAsync(grad_locations, 0, p.samples() * 2 * acc_bytes, stream);
        e != cudaSuccess) {
      return e;
    }
    return cudaMemsetAsync(grad_weights, 0, p.samples() * bytes, stream);
  }
  GradBuffers buffers;
  if (cudaError_t e = PrepareGrad(stream, type, elements, deterministic, workspace, grad_value,
                                  &buffers);
      e != cudaSuccess) {
    return e;
  }
  if (deterministic) {
    // Each grad-value element of level l receives at most one corner weight (<= |attention
    // weight|) from each of the Lq * P samples of its image, head and level.
    if (cudaError_t e = LaunchContributionScale(stream, type, buffers, grad_out,
                                                p.units() * p.head_channels, weights, p.samples(),
                                                double(p.queries) * double(p.points));
        e != cudaSuccess) {
      return e;
    }
  }
  cudaError_t status = LaunchSampleBackward(
      type, p, deterministic, buffers, {grad_out, value},
      [&](auto tag, auto v, auto mode, int lanes, unsigned int grid, const auto& acc) {
        using T = typename decltype(tag)::type;
        using A = Acc<T>;
        constexpr int kV = decltype(v)::value;
        constexpr Accumulate kMode = decltype(mode)::value;
        MsDeformAttnBackwardKernel<T, kV, kMode><<<grid, kBlockThreads, 0, stream>>>(
            p, lanes, static_cast<const T*>(grad_out), static_cast<const T*>(value),
            static_cast<const A*>(locations), static_cast<const T*>(weights), acc,
            static_cast<A*>(grad_locations), static_cast<T*>(grad_weights));
      });
  if (status != cudaSuccess) return status;
  return FinishGrad(stream, type, elements, deterministic, buffers, grad_value);
}

}  // namespace flaxdcn
