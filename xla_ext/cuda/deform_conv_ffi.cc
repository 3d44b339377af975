// XLA FFI handlers of the CUDA kernels: buffer checks and launches on XLA's stream.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/cuda/deform_conv_kernels.h"
#include "xla_ext/common/ffi_helpers.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/common/base.h"

namespace flaxdcn {
namespace {

ffi::Error CudaStatus(cudaError_t status, const char* op) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(op) + ": CUDA error: " + cudaGetErrorString(status));
}

// Device workspace from XLA's allocator (nullptr for zero bytes). XLA rejects alignments above
// 16 bytes, and reports no reason through ScratchAllocator: the message names the request.
ffi::ErrorOr<void*> Workspace(ffi::ScratchAllocator& scratch, size_t bytes, const char* op) {
  if (bytes == 0) return static_cast<void*>(nullptr);
  std::optional<void*> buffer = scratch.Allocate(bytes, kWorkspaceAlignment);
  if (!buffer.has_value()) {
    return ffi::Unexpected<ffi::Error>(ffi::Error(
        ffi::ErrorCode::kResourceExhausted,
        std::string(op) + ": XLA's scratch allocator refused " + std::to_string(bytes) +
            " bytes of device workspace aligned to " + std::to_string(kWorkspaceAlignment) +
            " bytes (out of device memory?)"));
  }
  return *buffer;
}

ffi::Error DeformIm2colCudaImpl(cudaStream_t stream, ffi::AnyBuffer input, ffi::AnyBuffer offset,
                                ffi::AnyBuffer mask, ffi::Result<ffi::AnyBuffer> columns,
                                int64_t kernel_h, int64_t kernel_w, int64_t stride_h,
                                int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                int64_t dilation_h, int64_t dilation_w, int64_t offset_groups) {
  constexpr char kOp[] = "flaxdcn_deform_im2col";
  auto params = MakeConvParams(kOp, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w,
                               pad_h, pad_w, dilation_h, dilation_w, offset_groups);
  if (!params) return params.error();
  const ConvParams& p = *params;
  if (ffi::Error e = CheckIm2colBuffers(kOp, p, input, *columns); e.failure()) return e;
  return CudaStatus(LaunchDeformIm2col(stream, *ToElementType(input.element_type()), p,
                                       input.untyped_data(), offset.untyped_data(),
                                       mask.untyped_data(), columns->untyped_data()),
                    kOp);
}

ffi::Error DeformIm2colBwdCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                                   ffi::AnyBuffer grad_columns, ffi::AnyBuffer input,
                                   ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                                   ffi::Result<ffi::AnyBuffer> grad_input,
                                   ffi::Result<ffi::AnyBuffer> grad_offset,
                                   ffi::Result<ffi::AnyBuffer> grad_mask, int64_t kernel_h,
                                   int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                   int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                   int64_t dilation_w, int64_t offset_groups,
                                   bool deterministic) {
  constexpr char kOp[] = "flaxdcn_deform_im2col_bwd";
  auto params = MakeConvParams(kOp, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w,
                               pad_h, pad_w, dilation_h, dilation_w, offset_groups);
  if (!params) return params.error();
  const ConvParams& p = *params;
  if (ffi::Error e = CheckIm2colBwdBuffers(kOp, p, grad_columns, input, offset, mask,
                                           *grad_input, *grad_offset, *grad_mask);
      e.failure()) {
    return e;
  }
  const ffi::DataType dtype = input.element_type();
  const ElementType type = *ToElementType(dtype);
  auto workspace = Workspace(scratch, DeformIm2colBackwardWorkspace(type, p, deterministic), kOp);
  if (!workspace) return workspace.error();
  return CudaStatus(
      LaunchDeformIm2colBackward(stream, type, p, deterministic, grad_columns.untyped_data(),
                                 input.untyped_data(), offset.untyped_data(),
                                 mask.untyped_data(), grad_input->untyped_data(),
                                 grad_offset->untyped_data(), grad_mask->untyped_data(),
                                 *workspace),
      kOp);
}

ffi::Error DeformRoiPoolCudaImpl(cudaStream_t stream, ffi::AnyBuffer features,
                                 ffi::AnyBuffer rois, ffi::AnyBuffer offset,
                                 ffi::Result<ffi::AnyBuffer> pooled, double spatial_scale,
                                 int64_t sampling_ratio, double gamma) {
  constexpr char kOp[] = "flaxdcn_deform_roi_pool";
  auto params =
      MakeRoiPoolParams(kOp, features, rois, offset, spatial_scale, sampling_ratio, gamma);
  if (!params) return params.error();
  const RoiPoolParams& p = *params;
  if (ffi::Error e = CheckRoiPoolBuffers(kOp, p, features, *pooled); e.failure()) return e;
  return CudaStatus(LaunchDeformRoiPool(stream, *ToElementType(features.element_type()), p,
                                        features.untyped_data(), rois.untyped_data(),
                                        offset.untyped_data(), pooled->untyped_data()),
                    kOp);
}

ffi::Error DeformRoiPoolBwdCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                                    ffi::AnyBuffer grad_pooled, ffi::AnyBuffer features,
                                    ffi::AnyBuffer rois, ffi::AnyBuffer offset,
                                    ffi::Result<ffi::AnyBuffer> grad_features,
                                    ffi::Result<ffi::AnyBuffer> grad_offset, double spatial_scale,
                                    int64_t sampling_ratio, double gamma, bool deterministic) {
  constexpr char kOp[] = "flaxdcn_deform_roi_pool_bwd";
  auto params =
      MakeRoiPoolParams(kOp, features, rois, offset, spatial_scale, sampling_ratio, gamma);
  if (!params) return params.error();
  const RoiPoolParams& p = *params;
  if (ffi::Error e = CheckRoiPoolBwdBuffers(kOp, p, grad_pooled, features, offset,
                                            *grad_features, *grad_offset);
      e.failure()) {
    return e;
  }
  const ffi::DataType dtype = features.element_type();
  const ElementType type = *ToElementType(dtype);
  auto workspace =
      Workspace(scratch, DeformRoiPoolBackwardWorkspace(type, p, deterministic), kOp);
  if (!workspace) return workspace.error();
  return CudaStatus(
      LaunchDeformRoiPoolBackward(stream, type, p, deterministic, grad_pooled.untyped_data(),
                                  features.untyped_data(), rois.untyped_data(),
                                  offset.untyped_data(), grad_features->untyped_data(),
                                  grad_offset->untyped_data(), *workspace),
      kOp);
}

}  // namespace
}  // namespace flaxdcn

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDeformIm2colCuda, flaxdcn::DeformIm2colCudaImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream: every launch goes here
        .Arg<xla::ffi::AnyBuffer>()        // inputs   [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()        // offsets  [N, Ho, Wo, G*kh*kw*2] (g, i, j, (dy, dx))
        .Arg<xla::ffi::AnyBuffer>()        // mask     [N, Ho, Wo, G*kh*kw], [N, Ho, Wo, 0]: none
        .Ret<xla::ffi::AnyBuffer>()        // columns  [N, Ho, Wo, kh * kw, C]
        .Attr<int64_t>("kernel_h")         // kh
        .Attr<int64_t>("kernel_w")         // kw
        .Attr<int64_t>("stride_h")         // sh
        .Attr<int64_t>("stride_w")         // sw
        .Attr<int64_t>("pad_h")            // padding before row 0
        .Attr<int64_t>("pad_w")            // padding before column 0
        .Attr<int64_t>("dilation_h")       // dh
        .Attr<int64_t>("dilation_w")       // dw
        .Attr<int64_t>("offset_groups"));  // G

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDeformIm2colBwdCuda, flaxdcn::DeformIm2colBwdCudaImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream: every launch goes here
        .Ctx<xla::ffi::ScratchAllocator>()  // workspace of the grad-input accumulation
        .Arg<xla::ffi::AnyBuffer>()        // grad_columns [N, Ho, Wo, kh * kw, C]
        .Arg<xla::ffi::AnyBuffer>()        // inputs       [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()        // offsets      [N, Ho, Wo, G * kh * kw * 2]
        .Arg<xla::ffi::AnyBuffer>()        // mask         [N, Ho, Wo, G*kh*kw] or [N, Ho, Wo, 0]
        .Ret<xla::ffi::AnyBuffer>()        // grad_inputs  [N, H, W, C]
        .Ret<xla::ffi::AnyBuffer>()        // grad_offsets [N, Ho, Wo, G * kh * kw * 2]
        .Ret<xla::ffi::AnyBuffer>()        // grad_mask    shape of mask
        .Attr<int64_t>("kernel_h")         // kh
        .Attr<int64_t>("kernel_w")         // kw
        .Attr<int64_t>("stride_h")         // sh
        .Attr<int64_t>("stride_w")         // sw
        .Attr<int64_t>("pad_h")            // padding before row 0
        .Attr<int64_t>("pad_w")            // padding before column 0
        .Attr<int64_t>("dilation_h")       // dh
        .Attr<int64_t>("dilation_w")       // dw
        .Attr<int64_t>("offset_groups")    // G
        .Attr<bool>("deterministic"));     // fixed-point grad-input sums instead of float atomics

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDeformRoiPoolCuda, flaxdcn::DeformRoiPoolCudaImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream: every launch goes here
        .Arg<xla::ffi::AnyBuffer>()      // features [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()      // rois     [R, 5] (batch index, x1, y1, x2, y2), f32/f64,
                                         //          or per image [N, Ri, 4] (x1, y1, x2, y2)
        .Arg<xla::ffi::AnyBuffer>()      // offsets  [R, Ho, Wo, 2] (dy, dx), [R, Ho, Wo, 0]: none
        .Ret<xla::ffi::AnyBuffer>()      // pooled   [R, Ho, Wo, C] (per image: R -> N, Ri)
        .Attr<double>("spatial_scale")   // feature pixels per input pixel
        .Attr<int64_t>("sampling_ratio") // > 0: fixed sub-grid; else ceil(bin size)
        .Attr<double>("gamma"));         // offset scale

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDeformRoiPoolBwdCuda, flaxdcn::DeformRoiPoolBwdCudaImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream: every launch goes here
        .Ctx<xla::ffi::ScratchAllocator>()  // workspace of the grad-features accumulation
        .Arg<xla::ffi::AnyBuffer>()      // grad_pooled   [R, Ho, Wo, C]
        .Arg<xla::ffi::AnyBuffer>()      // features      [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()      // rois          [R, 5] or per image [N, Ri, 4]
        .Arg<xla::ffi::AnyBuffer>()      // offsets       [R, Ho, Wo, 2] or [R, Ho, Wo, 0]
        .Ret<xla::ffi::AnyBuffer>()      // grad_features [N, H, W, C]
        .Ret<xla::ffi::AnyBuffer>()      // grad_offsets  shape of offsets
        .Attr<double>("spatial_scale")   // feature pixels per input pixel
        .Attr<int64_t>("sampling_ratio") // > 0: fixed sub-grid; else ceil(bin size)
        .Attr<double>("gamma")           // offset scale
        .Attr<bool>("deterministic"));   // fixed-point grad-feature sums instead of float atomics
