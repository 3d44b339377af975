// The deformable im2col targets on CUDA: the launches of common/deform_conv_ffi.h on XLA's stream
// (deform_conv_kernels.h), and the handler symbols.

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/deform_conv_ffi.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/cuda/deform_conv_kernels.h"
#include "xla_ext/cuda/ffi_context.h"

namespace flaxdcn {

ffi::Error RunDeformIm2col(CudaContext& device, const char* op, ElementType type,
                           const ConvParams& p, const void* input, const void* offset,
                           const void* mask, void* columns) {
  return CudaStatus(LaunchDeformIm2col(device.stream, type, p, input, offset, mask, columns), op);
}

ffi::Error RunDeformIm2colBackward(CudaContext& device, const char* op, ElementType type,
                                   const ConvParams& p, bool deterministic,
                                   const void* grad_columns, const void* input,
                                   const void* offset, const void* mask, void* grad_input,
                                   void* grad_offset, void* grad_mask) {
  auto workspace =
      Workspace(device, DeformIm2colBackwardWorkspace(type, p, deterministic), op);
  if (!workspace) return workspace.error();
  return CudaStatus(LaunchDeformIm2colBackward(device.stream, type, p, deterministic,
                                               grad_columns, input, offset, mask, grad_input,
                                               grad_offset, grad_mask, *workspace),
                    op);
}

}  // namespace flaxdcn

FLAXDCN_DEFINE_HANDLER(DeformIm2col, Cuda, flaxdcn::CudaContext);
FLAXDCN_DEFINE_HANDLER(DeformIm2colBwd, Cuda, flaxdcn::CudaContext);
