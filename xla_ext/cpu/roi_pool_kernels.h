// CPU kernels of deformable RoI pooling: plain computations on raw pointers, templated on the
// stored element type (float, double, Float16, BFloat16). Each function computes one slice of the
// work (a range of bins, a block of channels); the FFI handlers (roi_pool_ffi.cc) spread the
// slices over threads. Every slice writes a disjoint part of the outputs, so results do not depend
// on the threads.

#ifndef FLAXDCN_XLA_EXT_CPU_ROI_POOL_KERNELS_H_
#define FLAXDCN_XLA_EXT_CPU_ROI_POOL_KERNELS_H_

#include <cstdint>

#include "xla_ext/common/roi_pool.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {

// Pooled [R, Ho, Wo, C] for bins [begin, end) of the R * Ho * Wo bins.
template <typename T>
void DeformRoiPoolCpu(const RoiPoolParams& p, const T* features, const AccType<T>* rois,
                      const T* offset, T* pooled, int64_t begin, int64_t end);

// Backward, grad-features for channels [channel_begin, channel_end): accumulates every bin, in
// bin order, into `grad_features` [N, H, W, C] in the accumulation type; the caller zeroes it.
template <typename T>
void DeformRoiPoolBackwardFeaturesCpu(const RoiPoolParams& p, const T* grad_pooled,
                                      const AccType<T>* rois, const T* offset,
                                      AccType<T>* grad_features, int64_t channel_begin,
                                      int64_t channel_end);

// Backward, grad-offset of bins [begin, end) (reductions over all channels).
template <typename T>
void DeformRoiPoolBackwardOffsetCpu(const RoiPoolParams& p, const T* grad_pooled,
                                    const T* features, const AccType<T>* rois, const T* offset,
                                    T* grad_offset, int64_t begin, int64_t end);

// out[i] = Store(in[i]) for i in [begin, end).
template <typename T>
void StoreCpu(const AccType<T>* in, T* out, int64_t begin, int64_t end);

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CPU_ROI_POOL_KERNELS_H_
