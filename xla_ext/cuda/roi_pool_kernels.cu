// CUDA kernels of deformable RoI pooling and its backward, channels last.
//
// One sub-warp owns one output bin: each lane walks a share of the channel vectors over the bin's
// sub-grid reads (only those that can land inside the image, see MakeRoiBin). Index arithmetic is
// 64-bit (bin * channels and pixel * channels pass 2^31 for large batches).

#include <cuda_runtime.h>

#include <cstdint>

#include "xla_ext/common/roi_pool.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cuda/accumulate.h"
#include "xla_ext/cuda/common.cuh"
#include "xla_ext/cuda/roi_pool_kernels.h"

namespace flaxdcn {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ RoiBin<Acc<T>> LoadBin(const RoiPoolParams& p, const Acc<T>* rois,
                                                  const T* offset, int64_t bin) {
  using A = Acc<T>;
  const int64_t r = bin / (p.out_height * p.out_width);
  const int64_t ph = (bin / p.out_width) % p.out_height;
  const int64_t pw = bin % p.out_width;
  const A dy = p.has_offsets ? ToAcc<T>(offset[bin * 2]) : A(0);
  const A dx = p.has_offsets ? ToAcc<T>(offset[bin * 2 + 1]) : A(0);
  return MakeRoiBin<A>(rois, r, ph, pw, dy, dx, p);
}

// At most 80 registers (three blocks per SM): the float64 variants spill within 64.
template <typename T, int V>
__global__ void __launch_bounds__(kBlockThreads, MinBlocks(80))
    DeformRoiPoolKernel(RoiPoolParams p, int lanes, const T* __restrict__ features,
                        const Acc<T>* __restrict__ rois, const T* __restrict__ offset,
                        T* __restrict__ pooled) {
  using A = Acc<T>;
  const int lane = threadIdx.x & (lanes - 1);
  const int64_t bin = int64_t{blockIdx.x} * (kBlockThreads / lanes) + threadIdx.x / lanes;
  if (bin >= p.bins()) return;
  const RoiBin<A> rb = LoadBin(p, rois, offset, bin);
  const T* image = features + rb.image * p.height * p.width * p.channels;
  for (int64_t c = int64_t{lane} * V; c < p.channels; c += int64_t{lanes} * V) {
    A acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = A(0);
    for (int64_t iy = rb.iy_begin; iy < rb.iy_end; ++iy) {
      const A y = RoiSampleCoord(rb.origin_h, rb.step_h, iy);
      for (int64_t ix = rb.ix_begin; ix < rb.ix_end; ++ix) {
        const RoiSample<A> s =
            MakeRoiSample(y, RoiSampleCoord(rb.origin_w, rb.step_w, ix), p.height, p.width);
        if (!s.valid) continue;
        // The read, then its accumulation (mmcv's order): sum_q weight_q * corner_q.
        A read[V];
#pragma unroll
        for (int i = 0; i < V; ++i) read[i] = A(0);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          A v[V];
          LoadVec<T, V>(image + s.pixel[q] * p.channels + c, v);
#pragma unroll
          for (int i = 0; i < V; ++i) read[i] += s.weight[q] * v[i];
        }
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += read[i];
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] *= rb.scale;
    StoreVec<T, V>(pooled + bin * p.channels + c, acc);
  }
}

// At most 128 registers (two blocks per SM). A bin's geometry, a read's four corners and their
// accumulator addresses stay live across the channel loop: float64 and most wide variants spill
// within 80, and without the bound ptxas spends up to 242 registers on the wide half-type ones
// (one block per SM). Within 128 no variant spills, wide vectors included.
template <typename T, int V, Accumulate M>
__global__ void __launch_bounds__(kBlockThreads, MinBlocks(128))
    DeformRoiPoolBackwardKernel(RoiPoolParams p, int lanes, const T* __restrict__ grad_pooled,
                                const T* __restrict__ features, const Acc<T>* __restrict__ rois,
                                const T* __restrict__ offset, GradAccumulator<Acc<T>> acc,
                                T* __restrict__ grad_offset) {
  using A = Acc<T>;
  const int lane = threadIdx.x & (lanes - 1);
  const int64_t bin = int64_t{blockIdx.x} * (kBlockThreads / lanes) + threadIdx.x / lanes;
  // Inactive lanes stay to the end: the sub-warp reduction needs every lane of the warp.
  const bool active = bin < p.bins();
  const FixedScale scale = M == Accumulate::kFixedPoint ? *acc.scale : FixedScale{0.0, 0.0};
  A total_y = A(0), total_x = A(0);
  RoiBin<A> rb;
  if (active) {
    rb = LoadBin(p, rois, offset, bin);
    const int64_t image_base = rb.image * p.height * p.width * p.channels;
    const T* grad = grad_pooled + bin * p.channels;
    for (int64_t iy = rb.iy_begin; iy < rb.iy_end; ++iy) {
      const A y = RoiSampleCoord(rb.origin_h, rb.step_h, iy);
      for (int64_t ix = rb.ix_begin; ix < rb.ix_end; ++ix) {
        const RoiSample<A> s =
            MakeRoiSample(y, RoiSampleCoord(rb.origin_w, rb.step_w, ix), p.height, p.width);
        if (!s.valid) continue;
        // This lane's share of <grad, features[corner q]>; the coordinate derivative is linear
        // in them, so the lanes' partial derivatives add up to the bin's.
        A dots[4] = {A(0), A(0), A(0), A(0)};
        for (int64_t c = int64_t{lane} * V; c < p.channels; c += int64_t{lanes} * V) {
          A gv[V];
          LoadVec<T, V>(grad + c, gv);
#pragma unroll
          for (int i = 0; i < V; ++i) gv[i] *= rb.scale;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int64_t base = image_base + s.pixel[q] * p.channels + c;
            if (p.has_offsets) {
              A v[V];
              LoadVec<T, V>(features + base, v);
#pragma unroll
              for (int i = 0; i < V; ++i) dots[q] += gv[i] * v[i];
            }
#pragma unroll
            for (int i = 0; i < V; ++i) AccumulateAdd<M>(acc, scale, base + i, gv[i] * s.weight[q]);
          }
        }
        A gy, gx;
        RoiSampleBackward(s, dots, &gy, &gx);
        total_y += gy;
        total_x += gx;
      }
    }
  }
  if (!p.has_offsets) return;
  total_y = SubWarpSum(total_y, lanes);
  total_x = SubWarpSum(total_x, lanes);
  if (active && lane == 0) {
    // d origin / d offset = gamma * roi size; every read of the bin moves with its origin. The
    // grad was already scaled by 1 / count.
    const A gamma = A(p.gamma);
    grad_offset[bin * 2] = FromAcc<T>(gamma * rb.roi_h * total_y);
    grad_offset[bin * 2 + 1] = FromAcc<T>(gamma * rb.roi_w * total_x);
  }
}

template <typename T>
int VectorWidth(const RoiPoolParams& p, std::initializer_list<const void*> pointers) {
  constexpr int kWide = kWideVec<T>;
  if (p.channels % kWide != 0) return 1;
  for (const void* ptr : pointers) {
    if (ptr != nullptr && !Aligned(ptr, kWide * sizeof(T))) return 1;
  }
  return kWide;
}

}  // namespace
}  // namespace cuda

cudaError_t LaunchDeformRoiPool(cudaStream_t stream, ElementType type, const RoiPoolParams& p,
                                const void* features, const void* rois, const void* offset,
                                void* pooled) {
  using namespace cuda;  // NOLINT
  if (p.bins() == 0 || p.channels == 0) return cudaSuccess;
  return DispatchType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    const int width = VectorWidth<T>(p, {features, pooled});
    const int lanes = SubWarpLanes(p.channels / width);
    unsigned int grid;
    if (cudaError_t e = GridFor(p.bins(), lanes, &grid); e != cudaSuccess) return e;
    const auto* f = static_cast<const T*>(features);
    const auto* r = static_cast<const A*>(rois);
    const auto* off = static_cast<const T*>(offset);
    auto* out = static_cast<T*>(pooled);
    if (width == kWideVec<T>) {
      DeformRoiPoolKernel<T, kWideVec<T>><<<grid, kBlockThreads, 0, stream>>>(p, lanes, f, r, off,
                                                                              out);
    } else {
      DeformRoiPoolKernel<T, 1><<<grid, kBlockThreads, 0, stream>>>(p, lanes, f, r, off, out);
    }
    return cudaGetLastError();
  });
}

size_t DeformRoiPoolBackwardWorkspace(ElementType type, const RoiPoolParams& p,
                                      bool deterministic) {
  return cuda::GradWorkspaceBytes(type, p.batch * p.height * p.width * p.channels, deterministic);
}

cudaError_t LaunchDeformRoiPoolBackward(cudaStream_t stream, ElementType type,
                                        const RoiPoolParams& p, bool deterministic,
                                        const void* grad_pooled, const void* features,
                                        const void* rois, const void* offset, void* grad_features,
                                        void* grad_offset, void* workspace) {
  using namespace cuda;  // NOLINT
  const int64_t elements = p.batch * p.height * p.width * p.channels;
  const size_t bytes = ElementBytes(type);
  if (p.bins() == 0) {
    // No bin reads the features (and there are no offsets): their gradient is zero.
    return elements == 0 ? cudaSuccess
                         : cudaMemsetAsync(grad_features, 0, elements * bytes, stream);
  }
  if (p.channels == 0) {
    // No channel to reduce (and no feature element): grad-offsets are zero.
    return p.has_offsets ? cudaMemsetAsync(grad_offset, 0, p.bins() * 2 * bytes, stream)
                         : cudaSuccess;
  }
  GradBuffers buffers;
  if (cudaError_t e = PrepareGrad(stream, type, elements, deterministic, workspace, grad_features,
                                  &buffers);
      e != cudaSuccess) {
    return e;
  }
  if (deterministic) {
    if (cudaError_t e = LaunchMaxAbs(stream, type, grad_pooled, p.bins() * p.channels,
                                     buffers.max_bits, 0);
        e != cudaSuccess) {
      return e;
    }
    // A bin spreads weights summing to at most 1 (mean of bilinear reads) over the image, so an
    // element receives at most max |grad| from each bin.
    if (cudaError_t e = LaunchFixedPointScale(stream, buffers, false, double(p.bins()));
        e != cudaSuccess) {
      return e;
    }
  }
  cudaError_t status = DispatchType(type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    const int width = VectorWidth<T>(p, {grad_pooled, features});
    const int lanes = SubWarpLanes(p.channels / width);
    unsigned int grid;
    if (cudaError_t e = GridFor(p.bins(), lanes, &grid); e != cudaSuccess) return e;
    const GradAccumulator<A> acc{static_cast<A*>(buffers.atomic), buffers.fixed,
                                 static_cast<A*>(buffers.special), buffers.scale};
    const auto* g = static_cast<const T*>(grad_pooled);
    const auto* f = static_cast<const T*>(features);
    const auto* r = static_cast<const A*>(rois);
    const auto* off = static_cast<const T*>(offset);
    auto* goff = static_cast<T*>(grad_offset);
    constexpr int kWide = kWideVec<T>;
    if (deterministic) {
      constexpr Accumulate kMode = Accumulate::kFixedPoint;
      if (width == kWide) {
        DeformRoiPoolBackwardKernel<T, kWide, kMode><<<grid, kBlockThreads, 0, stream>>>(
            p, lanes, g, f, r, off, acc, goff);
      } else {
        DeformRoiPoolBackwardKernel<T, 1, kMode><<<grid, kBlockThreads, 0, stream>>>(
            p, lanes, g, f, r, off, acc, goff);
      }
    } else {
      constexpr Accumulate kMode = Accumulate::kAtomic;
      if (width == kWide) {
        DeformRoiPoolBackwardKernel<T, kWide, kMode><<<grid, kBlockThreads, 0, stream>>>(
            p, lanes, g, f, r, off, acc, goff);
      } else {
        DeformRoiPoolBackwardKernel<T, 1, kMode><<<grid, kBlockThreads, 0, stream>>>(
            p, lanes, g, f, r, off, acc, goff);
      }
    }
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  return FinishGrad(stream, type, elements, deterministic, buffers, grad_features);
}

}  // namespace flaxdcn
