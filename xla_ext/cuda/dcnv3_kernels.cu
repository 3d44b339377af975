// CUDA kernels of DCNv3 / DCNv4, channels last, on the sampling core of common/sampling.h.
//
// Forward: one sub-warp (a power-of-two group of lanes, at most a warp) owns one (position,
// group): it walks the group's channels in vectors of V, and for each vector sums every point's
// bilinear read times its mask in registers: no columns are materialised. Backward: one sub-warp
// per sample (position, group, point), as in the DCN backward: the grad-input scatter of
// grad_out times the corner weights, and the four channel reductions that give grad-offset and
// grad-mask. Index arithmetic is 64-bit.

#include <cuda_runtime.h>

#include <cstdint>

#include "xla_ext/common/base.h"
#include "xla_ext/common/dcnv3.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cuda/accumulate.h"
#include "xla_ext/cuda/channel_vectors.cuh"
#include "xla_ext/cuda/common.cuh"
#include "xla_ext/cuda/dcnv3_kernels.h"

namespace flaxdcn {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ ConvSample<Acc<T>> LoadDcnv3Sample(const Dcnv3Params& p, int64_t np,
                                                              int64_t g, int64_t k,
                                                              const T* offset, const T* mask,
                                                              Acc<T>* mask_value) {
  using A = Acc<T>;
  const int64_t pos = np % p.positions();
  const int64_t y = pos / p.out_width, x = pos % p.out_width;
  int64_t i, j;
  Dcnv3Point(p, k, &i, &j);
  const T* off = offset + np * p.offset_stride + g * p.offset_group_stride + 2 * k;
  const A m = ToAcc<T>(mask[np * p.mask_stride + g * p.mask_group_stride + k]);
  A h, w;
  Dcnv3Location<A>(p, y, x, i, j, ToAcc<T>(off[0]), ToAcc<T>(off[1]), &h, &w);
  *mask_value = m;
  return MakeConvSample<A>(h, w, m, p.height, p.width);
}

// At most 64 registers (four blocks per SM), as the DCN im2col: a gather, spill-free within 64.
template <typename T, int V>
__global__ void __launch_bounds__(kBlockThreads, MinBlocks(64))
    Dcnv3Kernel(Dcnv3Params p, int lanes, const T* __restrict__ input,
                const T* __restrict__ offset, const T* __restrict__ mask, T* __restrict__ out) {
  using A = Acc<T>;
  const int lane = SubWarpLane(lanes);
  const int64_t unit = SubWarpUnit(lanes);
  if (unit >= p.batch * p.positions() * p.groups) return;
  const int64_t g = unit % p.groups;
  const int64_t np = unit / p.groups;
  const int64_t n = np / p.positions();
  const int64_t group_channels = p.group_channels();
  const T* image = input + n * p.height * p.width * p.channels + g * group_channels;
  T* dst = out + np * p.channels + g * group_channels;
  for (int64_t c = int64_t{lane} * V; c < group_channels; c += int64_t{lanes} * V) {
    A acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = A(0);
    for (int64_t k = 0; k < p.points(); ++k) {
      A m;
      const ConvSample<A> s = LoadDcnv3Sample(p, np, g, k, offset, mask, &m);
      if (!s.valid) continue;
      AccumulateCorners<T, V>(p, s, image, c, acc);
    }
    StoreVec<T, V>(dst + c, acc);
  }
}

// At most 80 registers (three blocks per SM), as the DCN backward: float64 and the wide half-type
// fixed-point variants spill within 64.
template <typename T, int V, Accumulate M>
__global__ void __launch_bounds__(kBlockThreads, MinBlocks(80))
    Dcnv3BackwardKernel(Dcnv3Params p, int lanes, const T* __restrict__ grad_out,
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
  int64_t k = 0, g = 0, np = 0;
  if (active) {
    k = sample % p.points();
    g = (sample / p.points()) % p.groups;
    np = sample / (p.points() * p.groups);
    s = LoadDcnv3Sample(p, np, g, k, offset, mask, &m);
  }
  if (active && s.valid) {
    const int64_t group_channels = p.group_channels();
    const int64_t n = np / p.positions();
    const int64_t image_base = n * p.height * p.width * p.channels + g * group_channels;
    ScatterAndReduceVectors<T, V, M>(p, s, lane, lanes, group_channels,
                                     grad_out + np * p.channels + g * group_channels, input,
                                     image_base, acc, scale, dots);
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) dots[q] = SubWarpSum(dots[q], lanes);
  if (active && lane == 0) {
    const ConvSampleGrad<A> gr = ConvSampleBackward(s, m, dots);
    const A offset_scale = A(p.offset_scale);
    T* off = grad_offset + np * p.offset_stride + g * p.offset_group_stride + 2 * k;
    off[0] = FromAcc<T>(gr.w * offset_scale);  // d / d dx = d / d w * s
    off[1] = FromAcc<T>(gr.h * offset_scale);
    grad_mask[np * p.mask_stride + g * p.mask_group_stride + k] = FromAcc<T>(gr.mask);
  }
}

// Zeroes bytes [begin, pitch) of each of `rows` rows of `pitch` bytes (DCNv4's padding channels).
__global__ void __launch_bounds__(kBlockThreads)
    ZeroRowTailsKernel(unsigned char* data, int64_t rows, int64_t pitch, int64_t begin) {
  const int64_t width = pitch - begin;
  const int64_t i = int64_t{blockIdx.x} * kBlockThreads + threadIdx.x;
  if (i >= rows * width) return;
  data[(i / width) * pitch + begin + i % width] = 0;
}

// out[sample] = mask of sample ((np * G + g) * P + k), byte by byte (`width` bytes each).
__global__ void __launch_bounds__(kBlockThreads)
    GatherMaskKernel(Dcnv3Params p, const unsigned char* mask, unsigned char* out,
                     int64_t width) {
  const int64_t i = int64_t{blockIdx.x} * kBlockThreads + threadIdx.x;
  if (i >= p.samples() * width) return;
  const int64_t sample = i / width, byte = i % width;
  const int64_t k = sample % p.points();
  const int64_t g = (sample / p.points()) % p.groups;
  const int64_t np = sample / (p.points() * p.groups);
  out[i] = mask[(np * p.mask_stride + g * p.mask_group_stride + k) * width + byte];
}

}  // namespace
}  // namespace cuda

cudaError_t LaunchDcnv3(cudaStream_t stream, ElementType type, const Dcnv3Params& p,
                        const void* input, const void* offset, const void* mask, void* out) {
  using namespace cuda;  // NOLINT
  const int64_t units = p.batch * p.positions() * p.groups;
  if (units == 0 || p.channels == 0) return cudaSuccess;
  return DispatchType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* in = static_cast<const T*>(input);
    const auto* off = static_cast<const T*>(offset);
    const auto* msk = static_cast<const T*>(mask);
    auto* dst = static_cast<T*>(out);
    return LaunchSubWarps<T>(p, units, {input, out}, [&](auto v, int lanes, unsigned grid) {
      constexpr int kV = decltype(v)::value;
      Dcnv3Kernel<T, kV><<<grid, kBlockThreads, 0, stream>>>(p, lanes, in, off, msk, dst);
    });
  });
}

namespace {

// DCNv4's mask values lie inside offset_mask; the fixed-point bound needs their maximum alone
// (the offsets may be huge), so the deterministic backward first gathers them, contiguously, at
// the front of the workspace. Zero bytes for DCNv3, whose mask is its own buffer.
size_t GatheredMaskBytes(ElementType type, const Dcnv3Params& p, bool deterministic) {
  const bool packed = p.mask_stride == p.offset_stride;  // DCNv4 (DCNv3: G*P vs 2*G*P)
  if (!deterministic || !packed) return 0;
  const size_t bytes = p.samples() * cuda::ElementBytes(type);
  return (bytes + 15) / 16 * 16;  // keeps the accumulation buffers 16-byte aligned
}

}  // namespace

size_t Dcnv3BackwardWorkspace(ElementType type, const Dcnv3Params& p, bool deterministic) {
  return GatheredMaskBytes(type, p, deterministic) +
         cuda::GradWorkspaceBytes(type, p.batch * p.height * p.width * p.channels,
                                  deterministic);
}

cudaError_t LaunchDcnv3Backward(cudaStream_t stream, ElementType type, const Dcnv3Params& p,
                                bool deterministic, const void* grad_out, const void* input,
                                const void* offset, const void* mask, void* grad_input,
                                void* grad_offset, void* grad_mask, void* workspace) {
  using namespace cuda;  // NOLINT
  const int64_t elements = p.batch * p.height * p.width * p.channels;
  const int64_t rows = p.batch * p.positions();
  const size_t bytes = ElementBytes(type);
  if (p.pad_channels_begin > 0 && rows > 0) {
    // DCNv4's padding channels: the tail of every row of grad_offset_mask.
    const int64_t width = (p.offset_stride - p.pad_channels_begin) * bytes;
    unsigned int grid;
    if (cudaError_t e = GridFor(rows * width, 1, &grid); e != cudaSuccess) return e;
    ZeroRowTailsKernel<<<grid, kBlockThreads, 0, stream>>>(
        static_cast<unsigned char*>(grad_offset), rows, p.offset_stride * bytes,
        p.pad_channels_begin * bytes);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (p.samples() == 0) {
    return elements == 0 ? cudaSuccess : cudaMemsetAsync(grad_input, 0, elements * bytes, stream);
  }
  if (p.channels == 0) {
    // No channel to reduce (and no input element): the sampling gradients are zero. The mask of
    // DCNv4 lies inside grad_offset's rows, so clearing whole rows covers it.
    if (cudaError_t e = cudaMemsetAsync(grad_offset, 0, rows * p.offset_stride * bytes, stream);
        e != cudaSuccess) {
      return e;
    }
    const bool packed = p.mask_stride == p.offset_stride;  // DCNv4 (DCNv3: G*P vs 2*G*P)
    return packed ? cudaSuccess
                  : cudaMemsetAsync(grad_mask, 0, rows * p.mask_stride * bytes, stream);
  }
  const size_t gathered = GatheredMaskBytes(type, p, deterministic);
  void* grad_workspace = static_cast<unsigned char*>(workspace) + gathered;
  GradBuffers buffers;
  if (cudaError_t e = PrepareGrad(stream, type, elements, deterministic, grad_workspace,
                                  grad_input, &buffers);
      e != cudaSuccess) {
    return e;
  }
  if (deterministic) {
    const void* mask_values = mask;  // DCNv3: [N, Ho, Wo, G * P], contiguous
    if (gathered > 0) {
      const int64_t width = bytes;
      unsigned int grid;
      if (cudaError_t e = GridFor(p.samples() * width, 1, &grid); e != cudaSuccess) return e;
      GatherMaskKernel<<<grid, kBlockThreads, 0, stream>>>(
          p, static_cast<const unsigned char*>(mask), static_cast<unsigned char*>(workspace),
          width);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
      mask_values = workspace;
    }
    // Each grad-input element receives at most one corner weight (<= |mask|) from each of the
    // Ho * Wo * P samples of its image and group.
    if (cudaError_t e = LaunchContributionScale(stream, type, buffers, grad_out,
                                                rows * p.channels, mask_values, p.samples(),
                                                double(p.positions()) * double(p.points()));
        e != cudaSuccess) {
      return e;
    }
  }
  cudaError_t status = LaunchSampleBackward(
      type, p, deterministic, buffers, {grad_out, input},
      [&](auto tag, auto v, auto mode, int lanes, unsigned int grid, const auto& acc) {
        using T = typename decltype(tag)::type;
        constexpr int kV = decltype(v)::value;
        constexpr Accumulate kMode = decltype(mode)::value;
        Dcnv3BackwardKernel<T, kV, kMode><<<grid, kBlockThreads, 0, stream>>>(
            p, lanes, static_cast<const T*>(grad_out), static_cast<const T*>(input),
            static_cast<const T*>(offset), static_cast<const T*>(mask), acc,
            static_cast<T*>(grad_offset), static_cast<T*>(grad_mask));
      });
  if (status != cudaSuccess) return status;
  return FinishGrad(stream, type, elements, deterministic, buffers, grad_input);
}

}  // namespace flaxdcn
