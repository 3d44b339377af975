// CUDA kernels of the deformable im2col and its backward, channels last.
//
// One sub-warp (a power-of-two group of lanes, at most a warp) owns one sample (n, y, x, i, j, g):
// it computes the sample's bilinear weights once and walks the group's channels in vectors of V
// (16-byte loads where the channel count and pointers allow), accumulating in float (double for
// float64). Index arithmetic is 64-bit: sample * channels passes 2^31 for moderately large
// batches.

#include <cuda_runtime.h>

#include <cstdint>

#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cuda/accumulate.h"
#include "xla_ext/cuda/channel_vectors.cuh"
#include "xla_ext/cuda/common.cuh"
#include "xla_ext/cuda/deform_conv_kernels.h"

namespace flaxdcn {
namespace cuda {
namespace {

struct SampleIndex {
  int64_t n;    // image
  int64_t np;   // n * Ho * Wo + position
  int64_t pos;  // y * Wo + x
  int64_t k;    // i * kw + j
  int64_t g;    // offset group
};

// Samples are numbered ((np * K) + k) * G + g: the order of the columns, so that neighbouring
// sub-warps write neighbouring channel vectors.
__device__ __forceinline__ SampleIndex DecodeSample(const ConvParams& p, int64_t sample) {
  SampleIndex s;
  s.g = sample % p.offset_groups;
  s.k = (sample / p.offset_groups) % p.kernel_points();
  s.np = sample / (p.offset_groups * p.kernel_points());
  s.n = s.np / p.positions();
  s.pos = s.np % p.positions();
  return s;
}

template <typename T>
__device__ __forceinline__ ConvSample<Acc<T>> LoadSample(const ConvParams& p,
                                                         const SampleIndex& s, const T* offset,
                                                         const T* mask, Acc<T>* mask_value) {
  using A = Acc<T>;
  const int64_t points = p.kernel_points();
  const int64_t channel = s.np * p.offset_groups * points + s.g * points + s.k;  // (g, i, j)
  const A m = p.has_mask ? ToAcc<T>(mask[channel]) : A(1);
  const int64_t y = s.pos / p.out_width, x = s.pos % p.out_width;
  const int64_t i = s.k / p.kernel_w, j = s.k % p.kernel_w;
  const A h = A(ConvBaseRow(p, y, i)) + ToAcc<T>(offset[channel * 2]);
  const A w = A(ConvBaseCol(p, x, j)) + ToAcc<T>(offset[channel * 2 + 1]);
  *mask_value = m;
  return MakeConvSample<A>(h, w, m, p.height, p.width);
}

// At most 64 registers (four blocks per SM): a gather needs the resident warps to hide its loads,
// and no variant spills within 64.
template <typename T, int V>
__global__ void __launch_bounds__(kBlockThreads, MinBlocks(64))
    DeformIm2colKernel(ConvParams p, int lanes, const T* __restrict__ input,
                       const T* __restrict__ offset, const T* __restrict__ mask,
                       T* __restrict__ columns) {
  using A = Acc<T>;
  const int lane = SubWarpLane(lanes);
  const int64_t sample = SubWarpUnit(lanes);
  if (sample >= p.samples()) return;
  const SampleIndex si = DecodeSample(p, sample);
  A m;
  const ConvSample<A> s = LoadSample(p, si, offset, mask, &m);
  const int64_t group_channels = p.group_channels();
  const T* image = input + si.n * p.height * p.width * p.channels + si.g * group_channels;
  T* out = columns + sample * group_channels;
  for (int64_t c = int64_t{lane} * V; c < group_channels; c += int64_t{lanes} * V) {
    A acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = A(0);
    AccumulateCorners<T, V>(p, s, image, c, acc);
    StoreVec<T, V>(out + c, acc);
  }
}

// At most 80 registers (three blocks per SM): float64 and the wide half-type fixed-point variants
// spill within 64.
template <typename T, int V, Accumulate M>
__global__ void __launch_bounds__(kBlockThreads, MinBlocks(80))
    DeformIm2colBackwardKernel(ConvParams p, int lanes, const T* __restrict__ grad_columns,
                               const T* __restrict__ input, const T* __restrict__ offset,
                               const T* __restrict__ mask, GradAccumulator<Acc<T>> acc,
                               T* __restrict__ grad_offset, T* __restrict__ grad_mask) {
  using A = Acc<T>;
  const int lane = SubWarpLane(lanes);
  const int64_t sample = SubWarpUnit(lanes);
  // Inactive lanes stay to the end: the sub-warp reduction needs every lane of the warp.
  const bool active = sample < p.samples();
  const FixedScale scale = M == Accumulate::kFixedPoint ? *acc.scale : FixedScale{0.0, 0.0};
  A dots[4] = {A(0), A(0), A(0), A(0)};
  A m = A(1);
  ConvSample<A> s;
  SampleIndex si;
  if (active) {
    si = DecodeSample(p, sample);
    s = LoadSample(p, si, offset, mask, &m);
  }
  if (active && s.valid) {
    const int64_t group_channels = p.group_channels();
    const int64_t image_base = si.n * p.height * p.width * p.channels + si.g * group_channels;
    ScatterAndReduceVectors<T, V, M>(p, s, lane, lanes, group_channels,
                                     grad_columns + sample * group_channels, input, image_base,
                                     acc, scale, dots);
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) dots[q] = SubWarpSum(dots[q], lanes);
  if (active && lane == 0) {
    const ConvSampleGrad<A> g = ConvSampleBackward(s, m, dots);
    const int64_t channel =
        si.np * p.offset_groups * p.kernel_points() + si.g * p.kernel_points() + si.k;
    grad_offset[channel * 2] = FromAcc<T>(g.h);
    grad_offset[channel * 2 + 1] = FromAcc<T>(g.w);
    if (p.has_mask) grad_mask[channel] = FromAcc<T>(g.mask);
  }
}

}  // namespace
}  // namespace cuda

cudaError_t LaunchDeformIm2col(cudaStream_t stream, ElementType type, const ConvParams& p,
                               const void* input, const void* offset, const void* mask,
                               void* columns) {
  using namespace cuda;  // NOLINT
  if (p.samples() == 0 || p.channels == 0) return cudaSuccess;
  return DispatchType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* in = static_cast<const T*>(input);
    const auto* off = static_cast<const T*>(offset);
    const auto* msk = static_cast<const T*>(mask);
    auto* out = static_cast<T*>(columns);
    return LaunchSubWarps<T>(p, p.samples(), {input, columns},
                             [&](auto v, int lanes, unsigned grid) {
      constexpr int kV = decltype(v)::value;
      DeformIm2colKernel<T, kV><<<grid, kBlockThreads, 0, stream>>>(p, lanes, in, off, msk, out);
    });
  });
}

size_t DeformIm2colBackwardWorkspace(ElementType type, const ConvParams& p, bool deterministic) {
  return cuda::GradWorkspaceBytes(type, p.batch * p.height * p.width * p.channels, deterministic);
}

cudaError_t LaunchDeformIm2colBackward(cudaStream_t stream, ElementType type, const ConvParams& p,
                                       bool deterministic, const void* grad_columns,
                                       const void* input, const void* offset, const void* mask,
                                       void* grad_input, void* grad_offset, void* grad_mask,
                                       void* workspace) {
  using namespace cuda;  // NOLINT
  const int64_t elements = p.batch * p.height * p.width * p.channels;
  const size_t bytes = ElementBytes(type);
  if (p.samples() == 0) {
    // Nothing reads the inputs (and there are no offsets or mask): their gradient is zero.
    return elements == 0 ? cudaSuccess
                         : cudaMemsetAsync(grad_input, 0, elements * bytes, stream);
  }
  if (p.channels == 0) {
    // No channel to reduce (and no input element): grad-offsets and grad-mask are zero.
    if (cudaError_t e = cudaMemsetAsync(grad_offset, 0, p.samples() * 2 * bytes, stream);
        e != cudaSuccess) {
      return e;
    }
    return p.has_mask ? cudaMemsetAsync(grad_mask, 0, p.samples() * bytes, stream) : cudaSuccess;
  }
  GradBuffers buffers;
  if (cudaError_t e = PrepareGrad(stream, type, elements, deterministic, workspace, grad_input,
                                  &buffers);
      e != cudaSuccess) {
    return e;
  }
  if (deterministic) {
    // Each grad-input element receives at most one corner weight (<= |mask|) from each of the
    // Ho * Wo * K samples of its image and group.
    if (cudaError_t e = LaunchContributionScale(
            stream, type, buffers, grad_columns, p.samples() * p.group_channels(),
            p.has_mask ? mask : nullptr, p.samples(),
            double(p.positions()) * double(p.kernel_points()));
        e != cudaSuccess) {
      return e;
    }
  }
  cudaError_t status = LaunchSampleBackward(
      type, p, deterministic, buffers, {grad_columns, input},
      [&](auto tag, auto v, auto mode, int lanes, unsigned int grid, const auto& acc) {
        using T = typename decltype(tag)::type;
        constexpr int kV = decltype(v)::value;
        constexpr Accumulate kMode = decltype(mode)::value;
        DeformIm2colBackwardKernel<T, kV, kMode><<<grid, kBlockThreads, 0, stream>>>(
            p, lanes, static_cast<const T*>(grad_columns), static_cast<const T*>(input),
            static_cast<const T*>(offset), static_cast<const T*>(mask), acc,
            static_cast<T*>(grad_offset), static_cast<T*>(grad_mask));
      });
  if (status != cudaSuccess) return status;
  return FinishGrad(stream, type, elements, deterministic, buffers, grad_input);
}

}  // namespace flaxdcn
