// The multi-scale deformable attention targets on CUDA: the launches of
// common/ms_deform_attn_ffi.h on XLA's stream (ms_deform_attn_kernels.h), and the handler symbols.

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/common/ms_deform_attn.h"
#include "xla_ext/common/ms_deform_attn_ffi.h"
#include "xla_ext/cuda/ffi_context.h"
#include "xla_ext/cuda/ms_deform_attn_kernels.h"

namespace flaxdcn {

ffi::Error RunMsDeformAttn(CudaContext& device, const char* op, ElementType type,
                           const MsDeformAttnParams& p, const void* value, const void* locations,
                           const void* weights, void* out) {
  return CudaStatus(LaunchMsDeformAttn(device.stream, type, p, value, locations, weights, out),
                    op);
}

ffi::Error RunMsDeformAttnBackward(CudaContext& device, const char* op, ElementType type,
                                   const MsDeformAttnParams& p, bool deterministic,
                                   const void* grad_out, const void* value, const void* locations,
                                   const void* weights, void* grad_value, void* grad_locations,
                                   void* grad_weights) {
  auto workspace = Workspace(device, MsDeformAttnBackwardWorkspace(type, p, deterministic), op);
  if (!workspace) return workspace.error();
  return CudaStatus(LaunchMsDeformAttnBackward(device.stream, type, p, deterministic, grad_out,
                                               value, locations, weights, grad_value,
                                               grad_locations, grad_weights, *workspace),
                    op);
}

}  // namespace flaxdcn

FLAXDCN_DEFINE_HANDLER(MsDeformAttn, Cuda, flaxdcn::CudaContext);
FLAXDCN_DEFINE_HANDLER(MsDeformAttnBwd, Cuda, flaxdcn::CudaContext);
