// CUDA kernels of the deformable sampling, as host functions that enqueue work on a stream.
// No XLA types here: the FFI handlers (cuda_ops.cc) decode buffers and call these.
//
// Grad-input accumulation (a scatter: any sample may hit any pixel) has two modes:
//  - atomic (default): float atomics into a float32 buffer (into grad-input itself for float32 and
//    float64). Fast; the summation order, hence the last bits, vary from run to run.
//  - deterministic: every contribution is rounded to 64-bit fixed point, scaled from a bound of
//    the largest possible sum computed on the device (max |cotangent| x max |mask| x the most
//    samples that can reach one pixel), and added with integer atomics, which commute. The result
//    is bitwise reproducible; its error is at most 2^-62 of that bound per contribution. Non-finite
//    contributions are summed separately (Inf/NaN absorb, so that sum is order-independent too).
//    Cost: one extra pass over the cotangent for its maximum, 64-bit atomics, a final conversion
//    pass, and 8 + sizeof(accumulator) bytes of workspace per grad-input element.

#ifndef FLAXDCN_XLA_EXT_CUDA_KERNELS_H_
#define FLAXDCN_XLA_EXT_CUDA_KERNELS_H_

#include <cstddef>

#include <cuda_runtime_api.h>

#include "xla_ext/common/base.h"

namespace flaxdcn {

// Alignment of the backward launchers' workspace: the most XLA's scratch allocator grants (it
// rejects larger alignments), and all the kernels need (16-byte vectors at the widest).
constexpr size_t kWorkspaceAlignment = 16;

// columns [N, Ho, Wo, K, C] from inputs, offsets and mask (ignored unless p.has_mask).
cudaError_t LaunchDeformIm2col(cudaStream_t stream, ElementType type, const ConvParams& p,
                               const void* input, const void* offset, const void* mask,
                               void* columns);

// Bytes of device workspace LaunchDeformIm2colBackward needs (0 for float32/float64 atomics).
size_t DeformIm2colBackwardWorkspace(ElementType type, const ConvParams& p, bool deterministic);

// grad-inputs, grad-offsets and grad-mask (ignored unless p.has_mask) from grad-columns.
// `workspace` holds DeformIm2colBackwardWorkspace(...) bytes, kWorkspaceAlignment-aligned.
cudaError_t LaunchDeformIm2colBackward(cudaStream_t stream, ElementType type, const ConvParams& p,
                                       bool deterministic, const void* grad_columns,
                                       const void* input, const void* offset, const void* mask,
                                       void* grad_input, void* grad_offset, void* grad_mask,
                                       void* workspace);

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

#endif  // FLAXDCN_XLA_EXT_CUDA_KERNELS_H_
