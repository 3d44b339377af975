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

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdcnDcnv3Cuda, flaxdcn::Dcnv3<flaxdcn::CudaContext>,
                              flaxdcn::Dcnv3Binding<flaxdcn::CudaContext>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdcnDcnv3BwdCuda, flaxdcn::Dcnv3Bwd<flaxdcn::CudaContext>,
                              flaxdcn::Dcnv3BwdBinding<flaxdcn::CudaContext>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdcnDcnv4Cuda, flaxdcn::Dcnv4<flaxdcn::CudaContext>,
                              flaxdcn::Dcnv4Binding<flaxdcn::CudaContext>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdcnDcnv4BwdCuda, flaxdcn::Dcnv4Bwd<flaxdcn::CudaContext>,
                              flaxdcn::Dcnv4BwdBinding<flaxdcn::CudaContext>());
