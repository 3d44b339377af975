// CUDA kernels of deformable RoI pooling, as host functions that enqueue work on a stream. No XLA
// types here: the FFI handlers (roi_pool_ffi.cc) decode buffers and call these. The grad-features
// accumulation modes (atomic, or deterministic fixed point) are accumulate.h's.

#ifndef FLAXDCN_XLA_EXT_CUDA_ROI_POOL_KERNELS_H_
#define FLAXDCN_XLA_EXT_CUDA_ROI_POOL_KERNELS_H_

#include <cstddef>

#include <cuda_runtime_api.h>

#include "xla_ext/common/base.h"
#include "xla_ext/common/roi_pool.h"

namespace flaxdcn {

// pooled [R, Ho, Wo, C]; `rois` in the accumulation type (float64 for float64, else float32),
// offsets ignored unless p.has_offsets.
cudaError_t LaunchDeformRoiPool(cudaStream_t stream, ElementType type, const RoiPoolParams& p,
                                const void* features, const void* rois, const void* offset,
                                void* pooled);

size_t DeformRoiPoolBackwardWorkspace(ElementType type, const RoiPoolParams& p,
                                      bool deterministic);

cudaError_t LaunchDeformRoiPoolBackward(cudaStream_t stream, ElementType type,
                                        const RoiPoolParams& p, bool deterministic,
                                        const void* grad_pooled, const void* features,
                                        const void* rois, const void* offset, void* grad_features,
                                        void* grad_offset, void* workspace);

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CUDA_ROI_POOL_KERNELS_H_
