// FFI checks of the DCNv3 / DCNv4 targets, shared by the CPU and CUDA handlers: buffers and
// attributes to a Dcnv3Params, with precise error messages.

#ifndef FLAXDCN_XLA_EXT_DCNV3_FFI_H_
#define FLAXDCN_XLA_EXT_DCNV3_FFI_H_

#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/dcnv3.h"
#include "xla_ext/common/ffi_helpers.h"

namespace flaxdcn {

// The geometry attributes of every DCNv3 / DCNv4 target.
struct Dcnv3Attrs {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups;
  double offset_scale;
  bool remove_center;
};

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
  if (a.kernel_h < 1 || a.kernel_w < 1 || a.stride_h < 1 || a.stride_w < 1 || a.dilation_h < 1 ||
      a.dilation_w < 1 || a.groups < 1) {
    return Invalid(prefix + "kernel size, strides, dilation and groups must be >= 1");
  }
  if (a.remove_center && (a.kernel_h % 2 == 0 || a.kernel_w % 2 == 0 ||
                          a.kernel_h * a.kernel_w == 1)) {
    return Invalid(prefix + "remove_center needs an odd kernel larger than 1 x 1");
  }
  const auto in = input.dimensions();
  const auto o = out.dimensions();
  if (in.size() != 4) {
    return Invalid(prefix + "inputs has shape " + ShapeString(in) + ", expected [N, H, W, C]");
  }
  if (o.size() != 4) {
    return Invalid(prefix + "output has shape " + ShapeString(o) + ", expected [N, Ho, Wo, C]");
  }
  Dcnv3Params p;
  p.batch = in[0];
  p.height = in[1];
  p.width = in[2];
  p.channels = in[3];
  p.out_height = o[1];
  p.out_width = o[2];
  p.kernel_h = a.kernel_h;
  p.kernel_w = a.kernel_w;
  p.stride_h = a.stride_h;
  p.stride_w = a.stride_w;
  p.pad_h = a.pad_h;
  p.pad_w = a.pad_w;
  p.dilation_h = a.dilation_h;
  p.dilation_w = a.dilation_w;
  p.groups = a.groups;
  p.offset_scale = a.offset_scale;
  p.remove_center = a.remove_center;
  if (p.channels % p.groups != 0) {
    return Invalid(prefix + "channels " + std::to_string(p.channels) +
                   " not divisible by groups " + std::to_string(p.groups));
  }
  if (ffi::Error e = ExpectShape(op, "output", o, {p.batch, p.out_height, p.out_width,
                                                    p.channels});
      e.failure()) {
    return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  const int64_t points = p.points();
  const int64_t gp = p.groups * points;
  if (mask != nullptr) {
    p.offset_stride = gp * 2;
    p.offset_group_stride = points * 2;
    p.mask_stride = gp;
    p.mask_group_stride = points;
    p.pad_channels_begin = 0;
    for (ffi::Error e :
         {ExpectShape(op, "offsets", offset.dimensions(),
                      {p.batch, p.out_height, p.out_width, gp * 2}),
          ExpectShape(op, "mask", mask->dimensions(), {p.batch, p.out_height, p.out_width, gp})}) {
      if (e.failure()) return ffi::Unexpected<ffi::Error>(std::move(e));
    }
  } else {
    const int64_t d = (gp * 3 + 7) / 8 * 8;
    p.offset_stride = p.mask_stride = d;
    p.offset_group_stride = p.mask_group_stride = points * 3;
    p.pad_channels_begin = gp * 3 < d ? gp * 3 : 0;
    if (ffi::Error e = ExpectShape(op, "offset_mask", offset.dimensions(),
                                   {p.batch, p.out_height, p.out_width, d});
        e.failure()) {
      return ffi::Unexpected<ffi::Error>(std::move(e));
    }
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

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_DCNV3_FFI_H_
