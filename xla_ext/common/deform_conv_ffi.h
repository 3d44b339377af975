// FFI of the deformable im2col targets (flaxdcn_deform_im2col, flaxdcn_deform_im2col_bwd), one
// definition for every backend: the attributes as a struct, the buffer checks that make a
// ConvParams, the binding and the handler body. A backend implements the two launches declared
// below as overloads on its context and defines the handler symbols (common/handlers.h), in
// <backend>/deform_conv_ffi.cc:
//
//   FLAXDCN_DEFINE_HANDLER(DeformIm2col, Cpu, xla::ffi::ThreadPool);  // FlaxdcnDeformIm2colCpu

#ifndef FLAXDCN_XLA_EXT_COMMON_DEFORM_CONV_FFI_H_
#define FLAXDCN_XLA_EXT_COMMON_DEFORM_CONV_FFI_H_

#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/ffi_helpers.h"

namespace flaxdcn {

// The attributes of flaxdcn_deform_im2col: the window and the offset groups.
struct DeformConvAttrs : ConvWindow {
  int64_t offset_groups;
};

// The attributes of flaxdcn_deform_im2col_bwd: the forward's and `deterministic`.
struct DeformConvBwdAttrs : DeformConvAttrs {
  bool deterministic;
};

}  // namespace flaxdcn

// The attributes decode by name from the call's attribute dictionary, which must hold exactly a
// struct's members. ConvWindow's come first in the deformable conv and DCNv3 structs:
#define FLAXDCN_CONV_WINDOW_ATTRS                                               \
  StructMember<int64_t>("kernel_h"),       /* kh */                             \
      StructMember<int64_t>("kernel_w"),   /* kw */                             \
      StructMember<int64_t>("stride_h"),   /* sh */                             \
      StructMember<int64_t>("stride_w"),   /* sw */                             \
      StructMember<int64_t>("pad_h"),      /* padding before row 0 */           \
      StructMember<int64_t>("pad_w"),      /* padding before column 0 */        \
      StructMember<int64_t>("dilation_h"), /* dh */                             \
      StructMember<int64_t>("dilation_w")  /* dw */

#define FLAXDCN_DEFORM_CONV_ATTRS \
  FLAXDCN_CONV_WINDOW_ATTRS, StructMember<int64_t>("offset_groups") /* G */

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::flaxdcn::DeformConvAttrs, FLAXDCN_DEFORM_CONV_ATTRS);
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ::flaxdcn::DeformConvBwdAttrs, FLAXDCN_DEFORM_CONV_ATTRS,
    StructMember<bool>("deterministic"));  // CUDA: fixed-point grad-input sums, no float atomics
                                           // (the CPU backward always is deterministic)

#undef FLAXDCN_DEFORM_CONV_ATTRS

namespace flaxdcn {

// Checks the window (sizes, strides and dilation >= 1) and `groups` (>= 1, `groups_name` in the
// message), inputs [N, H, W, C] and `out` of rank 4 (`out_name` with layout `out_layout` in the
// message), then sets `shape` to N, H, W, C and Ho, Wo = out's dimensions 1 and 2. Shared by the
// deformable conv and DCNv3 targets.
inline ffi::Error SetConvShape(const char* op, const ConvWindow& w, int64_t groups,
                               const char* groups_name, const ffi::AnyBuffer& input,
                               const char* out_name, ffi::AnyBuffer::Dimensions out,
                               const char* out_layout, ConvShape* shape) {
  const std::string prefix = std::string(op) + ": ";
  if (w.kernel_h < 1 || w.kernel_w < 1 || w.stride_h < 1 || w.stride_w < 1 || w.dilation_h < 1 ||
      w.dilation_w < 1 || groups < 1) {
    return ffi::Error::InvalidArgument(prefix + "kernel size, strides, dilation and " +
                                       groups_name + " must be >= 1");
  }
  const auto in = input.dimensions();
  if (in.size() != 4) {
    return ffi::Error::InvalidArgument(prefix + "inputs has shape " + ShapeString(in) +
                                       ", expected [N, H, W, C]");
  }
  if (out.size() != 4) {
    return ffi::Error::InvalidArgument(prefix + out_name + " has shape " + ShapeString(out) +
                                       ", expected " + out_layout);
  }
  shape->batch = in[0];
  shape->height = in[1];
  shape->width = in[2];
  shape->channels = in[3];
  shape->out_height = out[1];
  shape->out_width = out[2];
  if (shape->channels % groups != 0) {
    return ffi::Error::InvalidArgument(prefix + "channels " + std::to_string(shape->channels) +
                                       " not divisible by " + groups_name + " " +
                                       std::to_string(groups));
  }
  return ffi::Error::Success();
}

// Checks inputs [N, H, W, C], offsets [N, Ho, Wo, G * K * 2], mask [N, Ho, Wo, G * K] or
// [N, Ho, Wo, 0] (no mask), one floating dtype, and the geometry attributes.
inline ffi::ErrorOr<ConvParams> MakeConvParams(const char* op, const ffi::AnyBuffer& input,
                                               const ffi::AnyBuffer& offset,
                                               const ffi::AnyBuffer& mask,
                                               const DeformConvAttrs& a) {
  const std::string prefix = std::string(op) + ": ";
  if (!ToElementType(input.element_type())) {
    return Invalid(prefix + "unsupported dtype; expected float32, float64, float16 or bfloat16");
  }
  if (offset.element_type() != input.element_type() ||
      mask.element_type() != input.element_type()) {
    return Invalid(prefix + "inputs, offsets and mask must share one dtype");
  }
  ConvParams p;
  static_cast<ConvWindow&>(p) = a;
  p.offset_groups = a.offset_groups;
  const auto off = offset.dimensions();
  if (ffi::Error e = SetConvShape(op, a, a.offset_groups, "offset groups", input, "offsets", off,
                                  "[N, Ho, Wo, G * kh * kw * 2]", &p);
      e.failure()) {
    return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  const int64_t gk = p.offset_groups * p.kernel_points();
  if (ffi::Error e = ExpectShape(op, "offsets", off, {p.batch, p.out_height, p.out_width, gk * 2});
      e.failure()) {
    return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  const auto msk = mask.dimensions();
  p.has_mask = msk.size() == 4 && msk[3] != 0;
  if (ffi::Error e = ExpectShape(op, "mask", msk,
                                 {p.batch, p.out_height, p.out_width, p.has_mask ? gk : 0});
      e.failure()) {
    return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  return p;
}

// columns [N, Ho, Wo, K, C] in the dtype of inputs.
inline ffi::Error CheckIm2colBuffers(const char* op, const ConvParams& p,
                                     const ffi::AnyBuffer& input, const ffi::AnyBuffer& columns) {
  if (columns.element_type() != input.element_type()) {
    return ffi::Error::InvalidArgument(std::string(op) + ": columns dtype differs from inputs");
  }
  return ExpectShape(op, "columns", columns.dimensions(),
                     {p.batch, p.out_height, p.out_width, p.kernel_points(), p.channels});
}

// grad_columns like the columns; grad_inputs, grad_offsets, grad_mask like their primals; one
// dtype throughout.
inline ffi::Error CheckIm2colBwdBuffers(const char* op, const ConvParams& p,
                                        const ffi::AnyBuffer& grad_columns,
                                        const ffi::AnyBuffer& input, const ffi::AnyBuffer& offset,
                                        const ffi::AnyBuffer& mask,
                                        const ffi::AnyBuffer& grad_input,
                                        const ffi::AnyBuffer& grad_offset,
                                        const ffi::AnyBuffer& grad_mask) {
  const ffi::DataType dtype = input.element_type();
  if (grad_columns.element_type() != dtype || grad_input.element_type() != dtype ||
      grad_offset.element_type() != dtype || grad_mask.element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string(op) + ": all buffers must share one dtype");
  }
  for (ffi::Error e :
       {ExpectShape(op, "grad_columns", grad_columns.dimensions(),
                    {p.batch, p.out_height, p.out_width, p.kernel_points(), p.channels}),
        ExpectSameShape(op, "grad_inputs", grad_input.dimensions(), input.dimensions()),
        ExpectSameShape(op, "grad_offsets", grad_offset.dimensions(), offset.dimensions()),
        ExpectSameShape(op, "grad_mask", grad_mask.dimensions(), mask.dimensions())}) {
    if (e.failure()) return e;
  }
  return ffi::Error::Success();
}

// The backends' launches, on checked buffers of element type `type` (`mask` and `grad_mask` are
// ignored unless p.has_mask); errors name `op`.
ffi::Error RunDeformIm2col(ffi::ThreadPool& device, const char* op, ElementType type,
                           const ConvParams& p, const void* input, const void* offset,
                           const void* mask, void* columns);
ffi::Error RunDeformIm2col(CudaContext& device, const char* op, ElementType type,
                           const ConvParams& p, const void* input, const void* offset,
                           const void* mask, void* columns);
ffi::Error RunDeformIm2colBackward(ffi::ThreadPool& device, const char* op, ElementType type,
                                   const ConvParams& p, bool deterministic,
                                   const void* grad_columns, const void* input,
                                   const void* offset, const void* mask, void* grad_input,
                                   void* grad_offset, void* grad_mask);
ffi::Error RunDeformIm2colBackward(CudaContext& device, const char* op, ElementType type,
                                   const ConvParams& p, bool deterministic,
                                   const void* grad_columns, const void* input,
                                   const void* offset, const void* mask, void* grad_input,
                                   void* grad_offset, void* grad_mask);

// The handler bodies, one per target for every backend; `Device` is the backend's context.
template <typename Device>
ffi::Error DeformIm2col(ffi::AnyBuffer input, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                        ffi::Result<ffi::AnyBuffer> columns, DeformConvAttrs attrs,
                        Device device) {
  constexpr char kOp[] = "flaxdcn_deform_im2col";
  auto params = MakeConvParams(kOp, input, offset, mask, attrs);
  if (!params) return params.error();
  if (ffi::Error e = CheckIm2colBuffers(kOp, *params, input, *columns); e.failure()) return e;
  return RunDeformIm2col(device, kOp, *ToElementType(input.element_type()), *params,
                         input.untyped_data(), offset.untyped_data(), mask.untyped_data(),
                         columns->untyped_data());
}

template <typename Device>
ffi::Error DeformIm2colBwd(ffi::AnyBuffer grad_columns, ffi::AnyBuffer input,
                           ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                           ffi::Result<ffi::AnyBuffer> grad_input,
                           ffi::Result<ffi::AnyBuffer> grad_offset,
                           ffi::Result<ffi::AnyBuffer> grad_mask, DeformConvBwdAttrs attrs,
                           Device device) {
  constexpr char kOp[] = "flaxdcn_deform_im2col_bwd";
  auto params = MakeConvParams(kOp, input, offset, mask, attrs);
  if (!params) return params.error();
  if (ffi::Error e = CheckIm2colBwdBuffers(kOp, *params, grad_columns, input, offset, mask,
                                           *grad_input, *grad_offset, *grad_mask);
      e.failure()) {
    return e;
  }
  return RunDeformIm2colBackward(device, kOp, *ToElementType(input.element_type()), *params,
                                 attrs.deterministic, grad_columns.untyped_data(),
                                 input.untyped_data(), offset.untyped_data(), mask.untyped_data(),
                                 grad_input->untyped_data(), grad_offset->untyped_data(),
                                 grad_mask->untyped_data());
}

// The bindings: buffers, attributes, then the backend's context (the handler bodies' last
// parameter; XLA decodes contexts in any position).
template <typename Device>
auto DeformIm2colBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()       // inputs   [N, H, W, C]
      .Arg<ffi::AnyBuffer>()       // offsets  [N, Ho, Wo, G*kh*kw*2] (g, i, j, (dy, dx))
      .Arg<ffi::AnyBuffer>()       // mask     [N, Ho, Wo, G*kh*kw], [N, Ho, Wo, 0]: none
      .Ret<ffi::AnyBuffer>()       // columns  [N, Ho, Wo, kh * kw, C]
      .Attrs<DeformConvAttrs>()    // kh, kw, sh, sw, ph, pw, dh, dw, G (named above)
      .Ctx<Device>();              // the backend: XLA:CPU's pool, or XLA's CUDA stream
}

template <typename Device>
auto DeformIm2colBwdBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()       // grad_columns [N, Ho, Wo, kh * kw, C]
      .Arg<ffi::AnyBuffer>()       // inputs       [N, H, W, C]
      .Arg<ffi::AnyBuffer>()       // offsets      [N, Ho, Wo, G * kh * kw * 2]
      .Arg<ffi::AnyBuffer>()       // mask         [N, Ho, Wo, G*kh*kw] or [N, Ho, Wo, 0]
      .Ret<ffi::AnyBuffer>()       // grad_inputs  [N, H, W, C]
      .Ret<ffi::AnyBuffer>()       // grad_offsets [N, Ho, Wo, G * kh * kw * 2]
      .Ret<ffi::AnyBuffer>()       // grad_mask    shape of mask
      .Attrs<DeformConvBwdAttrs>()  // the forward's and deterministic (named above)
      .Ctx<Device>();              // the backend, with CUDA's workspace allocator
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_DEFORM_CONV_FFI_H_
