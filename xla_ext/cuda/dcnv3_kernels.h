// CUDA kernels of DCNv3 / DCNv4 as host functions that enqueue work on a stream. No XLA types
// here: the FFI handlers (dcnv3_ffi.cc) decode buffers and call these. The grad-input
// accumulation modes (atomic, or deterministic fixed point) are accumulate.h's.

#ifndef FLAXDCN_XLA_EXT_CUDA_DCNV3_KERNELS_H_
#define FLAXDCN_XLA_EXT_CUDA_DCNV3_KERNELS_H_

#include <cstddef>

#include <cuda_runtime_api.h>

#include "xla_ext/common/base.h"
#include "xla_ext/common/dcnv3.h"

namespace flaxdcn {

// out [N, Ho, Wo, C]. `mask` is DCNv3's mask buffer, or DCNv4's offset_mask + 2P elements (the
// strides of `p` address both layouts).
cudaError_t LaunchDcnv3(cudaStream_t stream, ElementType type, const Dcnv3Params& p,
                        const void* input, const void* offset, const void* mask, void* out);

// Bytes of device workspace LaunchDcnv3Backward needs.
size_t Dcnv3BackwardWorkspace(ElementType type, const Dcnv3Params& p, bool deterministic);

// grad-inputs, grad-offsets and grad-mask (DCNv4: grad_offset_mask and grad_offset_mask + 2P,
// its padding channels set to 0) from grad_out. `workspace` holds Dcnv3BackwardWorkspace(...)
// bytes, kWorkspaceAlignment-aligned.
cudaError_t LaunchDcnv3Backward(cudaStream_t stream, ElementType type, const Dcnv3Params& p,
                                bool deterministic, const void* grad_out, const void* input,
                                const void* offset, const void* mask, void* grad_input,
                                void* grad_offset, void* grad_mask, void* workspace);

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CUDA_DCNV3_KERNELS_H_
