// CUDA kernels of multi-scale deformable attention as host functions that enqueue work on a
// stream. No XLA types here: the FFI handlers (ms_deform_attn_ffi.cc) decode buffers and call
// these. The grad-value accumulation modes (atomic, or deterministic fixed point) are
// accumulate.h's.

#ifndef FLAXDCN_XLA_EXT_CUDA_MS_DEFORM_ATTN_KERNELS_H_
#define FLAXDCN_XLA_EXT_CUDA_MS_DEFORM_ATTN_KERNELS_H_

#include <cstddef>

#include <cuda_runtime_api.h>

#include "xla_ext/common/base.h"
#include "xla_ext/common/ms_deform_attn.h"

namespace flaxdcn {

// out [N, Lq, M, D] from value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] (in the
// accumulation type: float64 for float64, float32 otherwise) and attention_weights
// [N, Lq, M, L, P], all but the locations of element type `type`.
cudaError_t LaunchMsDeformAttn(cudaStream_t stream, ElementType type, const MsDeformAttnParams& p,
                               const void* value, const void* locations, const void* weights,
                               void* out);

// Bytes of device workspace LaunchMsDeformAttnBackward needs.
size_t MsDeformAttnBackwardWorkspace(ElementType type, const MsDeformAttnParams& p,
                                     bool deterministic);

// grad-value, grad-locations (accumulation type) and grad-weights from grad_out. `workspace`
// holds MsDeformAttnBackwardWorkspace(...) bytes, kWorkspaceAlignment-aligned.
cudaError_t LaunchMsDeformAttnBackward(cudaStream_t stream, ElementType type,
                                       const MsDeformAttnParams& p, bool deterministic,
                                       const void* grad_out, const void* value,
                                       const void* locations, const void* weights,
                                       void* grad_value, void* grad_locations,
                                       void* grad_weights, void* workspace);

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CUDA_MS_DEFORM_ATTN_KERNELS_H_
