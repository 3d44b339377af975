// FFI of the DCNv3 / DCNv4 targets (flaxdcn_dcnv3, flaxdcn_dcnv4 and their _bwd), one definition
// for every backend: the attributes as a struct, the buffer checks that make a Dcnv3Params, the
// bindings and the handler bodies. Both layouts run on one pair of launches (DCNv4's mask is a
// view into its offset_mask); a backend implements them as overloads on its context and defines
// the handler symbols, in <backend>/dcnv3_ffi.cc (see common/deform_conv_ffi.h).

#ifndef FLAXDCN_XLA_EXT_COMMON_DCNV3_FFI_H_
#define FLAXDCN_XLA_EXT_COMMON_DCNV3_FFI_H_

#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/dcnv3.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/deform_conv_ffi.h"
#include "xla_ext/common/ffi_helpers.h"

namespace flaxdcn {

// The attributes of flaxdcn_dcnv3 and flaxdcn_dcnv4: the window, groups and sampling options.
struct Dcnv3Attrs : ConvWindow {
  int64_t groups;
  double offset_scale;
  bool remove_center;
};

// The attributes of their backward: the forward's and `deterministic`.
struct Dcnv3BwdAttrs : Dcnv3Attrs {
  bool deterministic;
};

}  // namespace flaxdcn

// Decoded by name (see common/deform_conv_ffi.h): the window, then DCNv3's own.
#define FLAXDCN_DCNV3_ATTRS                                                     \
  FLAXDCN_CONV_WINDOW_ATTRS,                                                    \
      StructMember<int64_t>("groups"),      /* G */                             \
      StructMember<double>("offset_scale"), /* s */                             \
      StructMember<bool>("remove_center")   /* skip the kernel centre */

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::flaxdcn::Dcnv3Attrs, FLAXDCN_DCNV3_ATTRS);
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ::flaxdcn::Dcnv3BwdAttrs, FLAXDCN_DCNV3_ATTRS,
    StructMember<bool>("deterministic"));  // CUDA: fixed-point grad-input sums, no float atomics
                                           // (the CPU backward always is deterministic)

#undef FLAXDCN_DCNV3_ATTRS

namespace flaxdcn {

// Checks inputs [N, H, W, C] and out [N, Ho, Wo, C] (the forward's output or the backward's
// cotangent, which fixes Ho and Wo), then the sampling arguments: DCNv3 (`mask` non-null)
// offsets [N, Ho, Wo, G * P * 2] and mask [N, Ho, Wo, G * P]; DCNv4 (`mask` null) offset_mask
// [N, Ho, Wo, D], D = G * P * 3 rounded up to a multiple of 8. One floating dtype throughout.
inline ffi::ErrorOr<Dcnv3Params> MakeDcnv3Params(const char* op, const ffi::AnyBuffer& input,
                                                 const ffi::AnyBuffer& out,
                                                 const ffi::AnyBuffer& offset,
                                                 const ffi::AnyBuffer* mask,
                                                 const Dcnv3Attrs& a) {
  const std::string prefix = std::string(op) + ": ";
  const ffi::DataType dtype = input.element_type();
  if (!ToElementType(dtype)) {
    return Invalid(prefix + "unsupported dtype; expected float32, float64, float16 or bfloat16");
  }
  if (out.element_type() != dtype || offset.element_type() != dtype ||
      (mask != nullptr && mask->element_type() != dtype)) {
    return Invalid(prefix + "all buffers must share one dtype");
  }
  Dcnv3Params p;
  static_cast<ConvWindow&>(p) = a;
  p.groups = a.groups;
  p.offset_scale = a.offset_scale;
  p.remove_center = a.remove_center;
  const auto o = out.dimensions();
  if (ffi::Error e = SetConvShape(op, a, a.groups, "groups", input, "output", o,
                                  "[N, Ho, Wo, C]", &p);
      e.failure()) {
    return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  if (a.remove_center && (a.kernel_h % 2 == 0 || a.kernel_w % 2 == 0 ||
                          a.kernel_h * a.kernel_w == 1)) {
    return Invalid(prefix + "remove_center needs an odd kernel larger than 1 x 1");
  }
  if (ffi::Error e = ExpectShape(op, "output", o, {p.batch, p.out_height, p.out_width,
                                                    p.channels});
      e.failure()) {
    return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  SetDcnv3Layout(&p, mask == nullptr);
  if (mask != nullptr) {
    for (ffi::Error e :
         {ExpectShape(op, "offsets", offset.dimensions(),
                      {p.batch, p.out_height, p.out_width, p.offset_stride}),
          ExpectShape(op, "mask", mask->dimensions(),
                      {p.batch, p.out_height, p.out_width, p.mask_stride})}) {
      if (e.failure()) return ffi::Unexpected<ffi::Error>(std::move(e));
    }
  } else if (ffi::Error e = ExpectShape(op, "offset_mask", offset.dimensions(),
                                        {p.batch, p.out_height, p.out_width, p.offset_stride});
             e.failure()) {
    return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  return p;
}

// DCNv3 (mask non-null) or DCNv4 grads: like their primals, in the primals' dtype.
inline ffi::Error CheckDcnv3GradBuffers(const char* op, const ffi::AnyBuffer& input,
                                        const ffi::AnyBuffer& offset, const ffi::AnyBuffer* mask,
                                        const ffi::AnyBuffer& grad_input,
                                        const ffi::AnyBuffer& grad_offset,
                                        const ffi::AnyBuffer* grad_mask) {
  const ffi::DataType dtype = input.element_type();
  if (grad_input.element_type() != dtype || grad_offset.element_type() != dtype ||
      (grad_mask != nullptr && grad_mask->element_type() != dtype)) {
    return ffi::Error::InvalidArgument(std::string(op) + ": all buffers must share one dtype");
  }
  if (ffi::Error e = ExpectSameShape(op, "grad_inputs", grad_input.dimensions(),
                                     input.dimensions());
      e.failure()) {
    return e;
  }
  if (ffi::Error e = ExpectSameShape(op, mask ? "grad_offsets" : "grad_offset_mask",
                                     grad_offset.dimensions(), offset.dimensions());
      e.failure()) {
    return e;
  }
  if (mask != nullptr) {
    return ExpectSameShape(op, "grad_mask", grad_mask->dimensions(), mask->dimensions());
  }
  return ffi::Error::Success();
}

// The backends' launches, on checked buffers of element type `type`. `mask` is DCNv3's mask
// buffer or DCNv4's offset_mask + 2P elements, `grad_mask` likewise (the strides of `p` address
// both layouts); errors name `op`.
ffi::Error RunDcnv3(ffi::ThreadPool& device, const char* op, ElementType type,
                    const Dcnv3Params& p, const void* input, const void* offset, const void* mask,
                    void* out);
ffi::Error RunDcnv3(CudaContext& device, const char* op, ElementType type, const Dcnv3Params& p,
                    const void* input, const void* offset, const void* mask, void* out);
ffi::Error RunDcnv3Backward(ffi::ThreadPool& device, const char* op, ElementType type,
                            const Dcnv3Params& p, bool deterministic, const void* grad_out,
                            const void* input, const void* offset, const void* mask,
                            void* grad_input, void* grad_offset, void* grad_mask);
ffi::Error RunDcnv3Backward(CudaContext& device, const char* op, ElementType type,
                            const Dcnv3Params& p, bool deterministic, const void* grad_out,
                            const void* input, const void* offset, const void* mask,
                            void* grad_input, void* grad_offset, void* grad_mask);

// The handler bodies, one per target for every backend; `Device` is the backend's context.
template <typename Device>
ffi::Error Dcnv3(ffi::AnyBuffer input, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                 ffi::Result<ffi::AnyBuffer> out, Dcnv3Attrs attrs, Device device) {
  constexpr char kOp[] = "flaxdcn_dcnv3";
  auto params = MakeDcnv3Params(kOp, input, *out, offset, &mask, attrs);
  if (!params) return params.error();
  return RunDcnv3(device, kOp, *ToElementType(input.element_type()), *params,
                  input.untyped_data(), offset.untyped_data(), mask.untyped_data(),
                  out->untyped_data());
}

template <typename Device>
ffi::Error Dcnv3Bwd(ffi::AnyBuffer grad_out, ffi::AnyBuffer input, ffi::AnyBuffer offset,
                    ffi::AnyBuffer mask, ffi::Result<ffi::AnyBuffer> grad_input,
                    ffi::Result<ffi::AnyBuffer> grad_offset,
                    ffi::Result<ffi::AnyBuffer> grad_mask, Dcnv3BwdAttrs attrs, Device device) {
  constexpr char kOp[] = "flaxdcn_dcnv3_bwd";
  auto params = MakeDcnv3Params(kOp, input, grad_out, offset, &mask, attrs);
  if (!params) return params.error();
  if (ffi::Error e = CheckDcnv3GradBuffers(kOp, input, offset, &mask, *grad_input, *grad_offset,
                                           &(*grad_mask));
      e.failure()) {
    return e;
  }
  return RunDcnv3Backward(device, kOp, *ToElementType(input.element_type()), *params,
                          attrs.deterministic, grad_out.untyped_data(), input.untyped_data(),
                          offset.untyped_data(), mask.untyped_data(), grad_input->untyped_data(),
                          grad_offset->untyped_data(), grad_mask->untyped_data());
}

template <typename Device>
ffi::Error Dcnv4(ffi::AnyBuffer input, ffi::AnyBuffer offset_mask,
                 ffi::Result<ffi::AnyBuffer> out, Dcnv3Attrs attrs, Device device) {
  constexpr char kOp[] = "flaxdcn_dcnv4";
  auto params = MakeDcnv3Params(kOp, input, *out, offset_mask, nullptr, attrs);
  if (!params) return params.error();
  return RunDcnv3(device, kOp, *ToElementType(input.element_type()), *params,
                  input.untyped_data(), offset_mask.untyped_data(),
                  DataAt(offset_mask, 2 * params->points()), out->untyped_data());
}

template <typename Device>
ffi::Error Dcnv4Bwd(ffi::AnyBuffer grad_out, ffi::AnyBuffer input, ffi::AnyBuffer offset_mask,
                    ffi::Result<ffi::AnyBuffer> grad_input,
                    ffi::Result<ffi::AnyBuffer> grad_offset_mask, Dcnv3BwdAttrs attrs,
                    Device device) {
  constexpr char kOp[] = "flaxdcn_dcnv4_bwd";
  auto params = MakeDcnv3Params(kOp, input, grad_out, offset_mask, nullptr, attrs);
  if (!params) return params.error();
  if (ffi::Error e = CheckDcnv3GradBuffers(kOp, input, offset_mask, nullptr, *grad_input,
                                           *grad_offset_mask, nullptr);
      e.failure()) {
    return e;
  }
  const int64_t mask_at = 2 * params->points();  // the first mask value of each group's 3P
  return RunDcnv3Backward(device, kOp, *ToElementType(input.element_type()), *params,
                          attrs.deterministic, grad_out.untyped_data(), input.untyped_data(),
                          offset_mask.untyped_data(), DataAt(offset_mask, mask_at),
                          grad_input->untyped_data(), grad_offset_mask->untyped_data(),
                          DataAt(*grad_offset_mask, mask_at));
}

// The bindings: buffers, attributes, then the backend's context (the handler bodies' last
// parameter; XLA decodes contexts in any position).
template <typename Device>
auto Dcnv3Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // inputs  [N, H, W, C]
      .Arg<ffi::AnyBuffer>()  // offsets [N, Ho, Wo, G * P * 2] (g, p, (dx, dy))
      .Arg<ffi::AnyBuffer>()  // mask    [N, Ho, Wo, G * P] (g, p)
      .Ret<ffi::AnyBuffer>()  // out     [N, Ho, Wo, C]
      .Attrs<Dcnv3Attrs>()    // kh, kw, sh, sw, ph, pw, dh, dw, G, s, remove_center (above)
      .Ctx<Device>();         // the backend: XLA:CPU's pool, or XLA's CUDA stream
}

template <typename Device>
auto Dcnv3BwdBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // grad_out     [N, Ho, Wo, C]
      .Arg<ffi::AnyBuffer>()  // inputs       [N, H, W, C]
      .Arg<ffi::AnyBuffer>()  // offsets      [N, Ho, Wo, G * P * 2]
      .Arg<ffi::AnyBuffer>()  // mask         [N, Ho, Wo, G * P]
      .Ret<ffi::AnyBuffer>()  // grad_inputs  [N, H, W, C]
      .Ret<ffi::AnyBuffer>()  // grad_offsets shape of offsets
      .Ret<ffi::AnyBuffer>()  // grad_mask    shape of mask
      .Attrs<Dcnv3BwdAttrs>()  // the forward's and deterministic (named above)
      .Ctx<Device>();         // the backend, with CUDA's workspace allocator
}

template <typename Device>
auto Dcnv4Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // inputs      [N, H, W, C]
      .Arg<ffi::AnyBuffer>()  // offset_mask [N, Ho, Wo, D]: per group 2P offsets, P mask
      .Ret<ffi::AnyBuffer>()  // out         [N, Ho, Wo, C]
      .Attrs<Dcnv3Attrs>()    // as DCNv3's (named above)
      .Ctx<Device>();         // the backend: XLA:CPU's pool, or XLA's CUDA stream
}

template <typename Device>
auto Dcnv4BwdBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // grad_out         [N, Ho, Wo, C]
      .Arg<ffi::AnyBuffer>()  // inputs           [N, H, W, C]
      .Arg<ffi::AnyBuffer>()  // offset_mask      [N, Ho, Wo, D]
      .Ret<ffi::AnyBuffer>()  // grad_inputs      [N, H, W, C]
      .Ret<ffi::AnyBuffer>()  // grad_offset_mask [N, Ho, Wo, D] (0 in the padding)
      .Attrs<Dcnv3BwdAttrs>()  // the forward's and deterministic (named above)
      .Ctx<Device>();         // the backend, with CUDA's workspace allocator
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_DCNV3_FFI_H_
