// The DCNv3 / DCNv4 targets on CUDA: the launches of common/dcnv3_ffi.h on XLA's stream
// (dcnv3_kernels.h), and the handler symbols.

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/dcnv3.h"
#include "xla_ext/common/dcnv3_ffi.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/cuda/dcnv3_kernels.h"
#include "xla_ext/cuda/ffi_context.h"

namespace flaxdcn {

ffi::Error RunDcnv3(CudaContext& device, const char* op, ElementType type, const Dcnv3Params& p,
                    const void* input, const void* offset, const void* mask, void* out) {
  return CudaStatus(LaunchDcnv3(device.stream, type, p, input, offset, mask, out), op);
}

ffi::Error RunDcnv3Backward(CudaContext& device, const char* op, ElementType type,
                            const Dcnv3Params& p, bool deterministic, const void* grad_out,
                            const void* input, const void* offset, const void* mask,
                            void* grad_input, void* grad_offset, void* grad_mask) {
  auto workspace = Workspace(device, Dcnv3BackwardWorkspace(type, p, deterministic), op);
  if (!workspace) return workspace.error();
  return CudaStatus(LaunchDcnv3Backward(device.stream, type, p, deterministic, grad_out, input,
                                        offset, mask, grad_input, grad_offset, grad_mask,
                                        *workspace),
                    op);
}

}  // namespace flaxdcn

FLAXDCN_DEFINE_HANDLER(Dcnv3, Cuda, flaxdcn::CudaContext);
FLAXDCN_DEFINE_HANDLER(Dcnv3Bwd, Cuda, flaxdcn::CudaContext);
FLAXDCN_DEFINE_HANDLER(Dcnv4, Cuda, flaxdcn::CudaContext);
FLAXDCN_DEFINE_HANDLER(Dcnv4Bwd, Cuda, flaxdcn::CudaContext);
