// The deformable RoI pooling targets on CUDA: the launches of common/roi_pool_ffi.h on XLA's
// stream (roi_pool_kernels.h), and the handler symbols.

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/common/roi_pool.h"
#include "xla_ext/common/roi_pool_ffi.h"
#include "xla_ext/cuda/ffi_context.h"
#include "xla_ext/cuda/roi_pool_kernels.h"

namespace flaxdcn {

ffi::Error RunDeformRoiPool(CudaContext& device, const char* op, ElementType type,
                            const RoiPoolParams& p, const void* features, const void* rois,
                            const void* offset, void* pooled) {
  return CudaStatus(LaunchDeformRoiPool(device.stream, type, p, features, rois, offset, pooled),
                    op);
}

ffi::Error RunDeformRoiPoolBackward(CudaContext& device, const char* op, ElementType type,
                                    const RoiPoolParams& p, bool deterministic,
                                    const void* grad_pooled, const void* features,
                                    const void* rois, const void* offset, void* grad_features,
                                    void* grad_offset) {
  auto workspace =
      Workspace(device, DeformRoiPoolBackwardWorkspace(type, p, deterministic), op);
  if (!workspace) return workspace.error();
  return CudaStatus(LaunchDeformRoiPoolBackward(device.stream, type, p, deterministic,
                                                grad_pooled, features, rois, offset,
                                                grad_features, grad_offset, *workspace),
                    op);
}

}  // namespace flaxdcn

FLAXDCN_DEFINE_HANDLER(DeformRoiPool, Cuda, flaxdcn::CudaContext);
FLAXDCN_DEFINE_HANDLER(DeformRoiPoolBwd, Cuda, flaxdcn::CudaContext);
