// CUDA kernels of the deformable im2col (DCNv1 / DCNv2), as host functions that enqueue work on a
// stream. No XLA types here: the FFI handlers (deform_conv_ffi.cc) decode buffers and call these.
// The grad-input accumulation modes (atomic, or deterministic fixed point) are accumulate.h's.

#ifndef FLAXDCN_XLA_EXT_CUDA_DEFORM_CONV_KERNELS_H_
#define FLAXDCN_XLA_EXT_CUDA_DEFORM_CONV_KERNELS_H_

#include <cstddef>

#include <cuda_runtime_api.h>

#include "xla_ext/common/base.h"
#include "xla_ext/common/deform_conv.h"

namespace flaxdcn {

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

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CUDA_DEFORM_CONV_KERNELS_H_
