// XLA FFI handlers of the DCNv3 / DCNv4 CUDA kernels: buffer checks and launches on XLA's
// stream.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/cuda/dcnv3_kernels.h"
#include "xla_ext/common/dcnv3_ffi.h"
#include "xla_ext/common/dcnv3_handlers.h"
#include "xla_ext/common/dcnv3.h"

namespace flaxdcn {
namespace {

ffi::Error Status(cudaError_t status, const char* op) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(op) + ": CUDA error: " + cudaGetErrorString(status));
}

// Device workspace from XLA's allocator (nullptr for zero bytes). 16-byte alignment: all the
// kernels need, and the most the allocator grants.
ffi::ErrorOr<void*> Scratch(ffi::ScratchAllocator& scratch, size_t bytes, const char* op) {
  if (bytes == 0) return static_cast<void*>(nullptr);
  std::optional<void*> buffer = scratch.Allocate(bytes, 16);
  if (!buffer.has_value()) {
    return ffi::Unexpected<ffi::Error>(ffi::Error(
        ffi::ErrorCode::kResourceExhausted,
        std::string(op) + ": could not allocate " + std::to_string(bytes) + " bytes of workspace"));
  }
  return *buffer;
}

Dcnv3Attrs Attrs(int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                 int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                 int64_t groups, double offset_scale, bool remove_center) {
  return {kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
          offset_scale, remove_center};
}

// `base` advanced by `elements` elements of `buffer`'s dtype.
const void* Advance(const ffi::AnyBuffer& buffer, int64_t elements) {
  return static_cast<const char*>(buffer.untyped_data()) +
         elements * static_cast<int64_t>(ffi::ByteWidth(buffer.element_type()));
}
void* Advance(ffi::Result<ffi::AnyBuffer>& buffer, int64_t elements) {
  return static_cast<char*>(buffer->untyped_data()) +
         elements * static_cast<int64_t>(ffi::ByteWidth(buffer->element_type()));
}

ffi::Error Dcnv3CudaImpl(cudaStream_t stream, ffi::AnyBuffer input, ffi::AnyBuffer offset,
                         ffi::AnyBuffer mask, ffi::Result<ffi::AnyBuffer> out, int64_t kernel_h,
                         int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                         int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups,
                         double offset_scale, bool remove_center) {
  constexpr char kOp[] = "flaxdcn_dcnv3";
  auto params = MakeDcnv3Params(kOp, input, *out, offset, &mask,
                                Attrs(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                      dilation_h, dilation_w, groups, offset_scale,
                                      remove_center));
  if (!params) return params.error();
  return Status(LaunchDcnv3(stream, *ToElementType(input.element_type()), *params,
                            input.untyped_data(), offset.untyped_data(), mask.untyped_data(),
                            out->untyped_data()),
                kOp);
}

ffi::Error Dcnv3BwdCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                            ffi::AnyBuffer grad_out, ffi::AnyBuffer input, ffi::AnyBuffer offset,
                            ffi::AnyBuffer mask, ffi::Result<ffi::AnyBuffer> grad_input,
                            ffi::Result<ffi::AnyBuffer> grad_offset,
                            ffi::Result<ffi::AnyBuffer> grad_mask, int64_t kernel_h,
                            int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                            int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                            int64_t groups, double offset_scale, bool remove_center,
                            bool deterministic) {
  constexpr char kOp[] = "flaxdcn_dcnv3_bwd";
  auto params = MakeDcnv3Params(kOp, input, grad_out, offset, &mask,
                                Attrs(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                      dilation_h, dilation_w, groups, offset_scale,
                                      remove_center));
  if (!params) return params.error();
  if (ffi::Error e = CheckDcnv3GradBuffers(kOp, input, offset, &mask, *grad_input, *grad_offset,
                                           &(*grad_mask));
      e.failure()) {
    return e;
  }
  const ElementType type = *ToElementType(input.element_type());
  auto workspace = Scratch(scratch, Dcnv3BackwardWorkspace(type, *params, deterministic), kOp);
  if (!workspace) return workspace.error();
  return Status(LaunchDcnv3Backward(stream, type, *params, deterministic, grad_out.untyped_data(),
                                    input.untyped_data(), offset.untyped_data(),
                                    mask.untyped_data(), grad_input->untyped_data(), grad_offset->untyped_data(),
                                    grad_mask->untyped_data(), *workspace),
                kOp);
}

ffi::Error Dcnv4CudaImpl(cudaStream_t stream, ffi::AnyBuffer input, ffi::AnyBuffer offset_mask,
                         ffi::Result<ffi::AnyBuffer> out, int64_t kernel_h, int64_t kernel_w,
                         int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                         int64_t dilation_h, int64_t dilation_w, int64_t groups,
                         double offset_scale, bool remove_center) {
  constexpr char kOp[] = "flaxdcn_dcnv4";
  auto params = MakeDcnv3Params(kOp, input, *out, offset_mask, nullptr,
                                Attrs(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                      dilation_h, dilation_w, groups, offset_scale,
                                      remove_center));
  if (!params) return params.error();
  return Status(LaunchDcnv3(stream, *ToElementType(input.element_type()), *params,
                            input.untyped_data(), offset_mask.untyped_data(),
                            Advance(offset_mask, 2 * params->points()), out->untyped_data()),
                kOp);
}

ffi::Error Dcnv4BwdCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                            ffi::AnyBuffer grad_out, ffi::AnyBuffer input,
                            ffi::AnyBuffer offset_mask, ffi::Result<ffi::AnyBuffer> grad_input,
                            ffi::Result<ffi::AnyBuffer> grad_offset_mask, int64_t kernel_h,
                            int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                            int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                            int64_t groups, double offset_scale, bool remove_center,
                            bool deterministic) {
  constexpr char kOp[] = "flaxdcn_dcnv4_bwd";
  auto params = MakeDcnv3Params(kOp, input, grad_out, offset_mask, nullptr,
                                Attrs(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                      dilation_h, dilation_w, groups, offset_scale,
                                      remove_center));
  if (!params) return params.error();
  if (ffi::Error e = CheckDcnv3GradBuffers(kOp, input, offset_mask, nullptr, *grad_input,
                                           *grad_offset_mask, nullptr);
      e.failure()) {
    return e;
  }
  const ElementType type = *ToElementType(input.element_type());
  auto workspace = Scratch(scratch, Dcnv3BackwardWorkspace(type, *params, deterministic), kOp);
  if (!workspace) return workspace.error();
  const int64_t shift = 2 * params->points();
  return Status(
      LaunchDcnv3Backward(stream, type, *params, deterministic, grad_out.untyped_data(),
                          input.untyped_data(), offset_mask.untyped_data(),
                          Advance(offset_mask, shift), grad_input->untyped_data(), grad_offset_mask->untyped_data(),
                          Advance(grad_offset_mask, shift), *workspace),
      kOp);
}

}  // namespace
}  // namespace flaxdcn

// The attributes shared by every DCNv3 / DCNv4 target, after the buffers.
#define FLAXDCN_DCNV3_ATTRS(bind)                                                        \
  bind.Attr<int64_t>("kernel_h")          /* kh */                                       \
      .Attr<int64_t>("kernel_w")          /* kw */                                       \
      .Attr<int64_t>("stride_h")          /* sh */                                       \
      .Attr<int64_t>("stride_w")          /* sw */                                       \
      .Attr<int64_t>("pad_h")             /* padding before row 0 */                     \
      .Attr<int64_t>("pad_w")             /* padding before column 0 */                  \
      .Attr<int64_t>("dilation_h")        /* dh */                                       \
      .Attr<int64_t>("dilation_w")        /* dw */                                       \
      .Attr<int64_t>("groups")            /* G */                                        \
      .Attr<double>("offset_scale")       /* s */                                        \
      .Attr<bool>("remove_center")        /* skip the kernel centre */

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDcnv3Cuda, flaxdcn::Dcnv3CudaImpl,
    FLAXDCN_DCNV3_ATTRS(xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream: every launch goes here
        .Arg<xla::ffi::AnyBuffer>()    // inputs  [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()    // offsets [N, Ho, Wo, G * P * 2] (g, p, (dx, dy))
        .Arg<xla::ffi::AnyBuffer>()    // mask    [N, Ho, Wo, G * P] (g, p)
        .Ret<xla::ffi::AnyBuffer>()));  // out     [N, Ho, Wo, C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDcnv3BwdCuda, flaxdcn::Dcnv3BwdCudaImpl,
    FLAXDCN_DCNV3_ATTRS(xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream: every launch goes here
        .Ctx<xla::ffi::ScratchAllocator>()  // workspace of the grad-input accumulation
        .Arg<xla::ffi::AnyBuffer>()    // grad_out     [N, Ho, Wo, C]
        .Arg<xla::ffi::AnyBuffer>()    // inputs       [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()    // offsets      [N, Ho, Wo, G * P * 2]
        .Arg<xla::ffi::AnyBuffer>()    // mask         [N, Ho, Wo, G * P]
        .Ret<xla::ffi::AnyBuffer>()    // grad_inputs  [N, H, W, C]
        .Ret<xla::ffi::AnyBuffer>()    // grad_offsets shape of offsets
        .Ret<xla::ffi::AnyBuffer>())   // grad_mask    shape of mask
        .Attr<bool>("deterministic"));  // fixed-point grad-input sums instead of float atomics

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDcnv4Cuda, flaxdcn::Dcnv4CudaImpl,
    FLAXDCN_DCNV3_ATTRS(xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream: every launch goes here
        .Arg<xla::ffi::AnyBuffer>()    // inputs      [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()    // offset_mask [N, Ho, Wo, D]: per group 2P offsets, P mask
        .Ret<xla::ffi::AnyBuffer>()));  // out         [N, Ho, Wo, C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDcnv4BwdCuda, flaxdcn::Dcnv4BwdCudaImpl,
    FLAXDCN_DCNV3_ATTRS(xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream: every launch goes here
        .Ctx<xla::ffi::ScratchAllocator>()  // workspace of the grad-input accumulation
        .Arg<xla::ffi::AnyBuffer>()    // grad_out         [N, Ho, Wo, C]
        .Arg<xla::ffi::AnyBuffer>()    // inputs           [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()    // offset_mask      [N, Ho, Wo, D]
        .Ret<xla::ffi::AnyBuffer>()    // grad_inputs      [N, H, W, C]
        .Ret<xla::ffi::AnyBuffer>())   // grad_offset_mask [N, Ho, Wo, D] (0 in the padding)
        .Attr<bool>("deterministic"));  // fixed-point grad-input sums instead of float atomics
