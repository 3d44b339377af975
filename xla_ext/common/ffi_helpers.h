// FFI glue shared by the CPU and CUDA handlers: shape and attribute checks that turn buffers into
// the kernels' parameter structs, with precise error messages.

#ifndef FLAXDCN_XLA_EXT_FFI_COMMON_H_
#define FLAXDCN_XLA_EXT_FFI_COMMON_H_

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"

namespace flaxdcn {

namespace ffi = ::xla::ffi;

inline std::optional<ElementType> ToElementType(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F32:
      return ElementType::kF32;
    case ffi::DataType::F64:
      return ElementType::kF64;
    case ffi::DataType::F16:
      return ElementType::kF16;
    case ffi::DataType::BF16:
      return ElementType::kBF16;
    default:
      return std::nullopt;
  }
}

inline std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline ffi::Unexpected<ffi::Error> Invalid(std::string message) {
  return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(std::move(message)));
}

inline ffi::Error ExpectShape(const char* op, const char* name, ffi::AnyBuffer::Dimensions dims,
                              std::initializer_list<int64_t> expected) {
  bool same = dims.size() == expected.size();
  size_t i = 0;
  for (int64_t e : expected) same = same && dims[i++] == e;
  if (same) return ffi::Error::Success();
  std::string want = "[";
  i = 0;
  for (int64_t e : expected) want += (i++ ? ", " : "") + std::to_string(e);
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " has shape " +
                                     ShapeString(dims) + ", expected " + want + "]");
}

inline ffi::Error ExpectSameShape(const char* op, const char* name,
                                  ffi::AnyBuffer::Dimensions dims,
                                  ffi::AnyBuffer::Dimensions expected) {
  bool same = dims.size() == expected.size();
  for (size_t i = 0; same && i < dims.size(); ++i) same = dims[i] == expected[i];
  if (same) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " has shape " +
                                     ShapeString(dims) + ", expected " + ShapeString(expected));
}

// Checks inputs [N, H, W, C], offsets [N, Ho, Wo, G * K * 2], mask [N, Ho, Wo, G * K] or
// [N, Ho, Wo, 0] (no mask), one floating dtype, and the geometry attributes.
inline ffi::ErrorOr<ConvParams> MakeConvParams(
    const char* op, const ffi::AnyBuffer& input, const ffi::AnyBuffer& offset,
    const ffi::AnyBuffer& mask, int64_t kernel_h, int64_t kernel_w, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
    int64_t offset_groups) {
  const std::string prefix = std::string(op) + ": ";
  if (!ToElementType(input.element_type())) {
    return Invalid(prefix + "unsupported dtype; expected float32, float64, "
                                                "float16 or bfloat16");
  }
  if (offset.element_type() != input.element_type() ||
      mask.element_type() != input.element_type()) {
    return Invalid(prefix + "inputs, offsets and mask must share one dtype");
  }
  if (kernel_h < 1 || kernel_w < 1 || stride_h < 1 || stride_w < 1 || dilation_h < 1 ||
      dilation_w < 1 || offset_groups < 1) {
    return Invalid(
        prefix + "kernel size, strides, dilation and offset groups must be >= 1");
  }
  const auto in = input.dimensions();
  const auto off = offset.dimensions();
  if (in.size() != 4) {
    return Invalid(prefix + "inputs has shape " + ShapeString(in) +
                                       ", expected [N, H, W, C]");
  }
  if (off.size() != 4) {
    return Invalid(prefix + "offsets has shape " + ShapeString(off) +
                                       ", expected [N, Ho, Wo, G * kh * kw * 2]");
  }
  ConvParams p;
  p.batch = in[0];
  p.height = in[1];
  p.width = in[2];
  p.channels = in[3];
  p.out_height = off[1];
  p.out_width = off[2];
  p.kernel_h = kernel_h;
  p.kernel_w = kernel_w;
  p.stride_h = stride_h;
  p.stride_w = stride_w;
  p.pad_h = pad_h;
  p.pad_w = pad_w;
  p.dilation_h = dilation_h;
  p.dilation_w = dilation_w;
  p.offset_groups = offset_groups;
  if (p.channels % offset_groups != 0) {
    return Invalid(prefix + "channels " + std::to_string(p.channels) +
                                       " not divisible by offset groups " +
                                       std::to_string(offset_groups));
  }
  const int64_t gk = offset_groups * p.kernel_points();
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

// Checks features [N, H, W, C], rois [R, 5] in the accumulation type (float64 for float64
// features, float32 otherwise), offsets [R, Ho, Wo, 2] or [R, Ho, Wo, 0] (no offsets); or the
// per-image form: rois [N, Ri, 4], offsets [N, Ri, Ho, Wo, 2] or [N, Ri, Ho, Wo, 0].
inline ffi::ErrorOr<RoiPoolParams> MakeRoiPoolParams(
    const char* op, const ffi::AnyBuffer& features, const ffi::AnyBuffer& rois,
    const ffi::AnyBuffer& offset, double spatial_scale, int64_t sampling_ratio, double gamma) {
  const std::string prefix = std::string(op) + ": ";
  const ffi::DataType dtype = features.element_type();
  if (!ToElementType(dtype)) {
    return Invalid(prefix + "unsupported dtype; expected float32, float64, "
                                                "float16 or bfloat16");
  }
  const ffi::DataType acc = dtype == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (rois.element_type() != acc) {
    return Invalid(
        prefix + "rois must be float64 for float64 features and float32 otherwise");
  }
  if (offset.element_type() != dtype) {
    return Invalid(prefix + "offsets must have the dtype of features");
  }
  const auto f = features.dimensions();
  const auto off = offset.dimensions();
  const bool per_image = rois.dimensions().size() == 3;
  if (f.size() != 4) {
    return Invalid(prefix + "features has shape " + ShapeString(f) +
                                       ", expected [N, H, W, C]");
  }
  if (off.size() != (per_image ? 5u : 4u)) {
    return Invalid(prefix + "offsets has shape " + ShapeString(off) +
                   (per_image ? ", expected [N, Ri, Ho, Wo, 2] or [N, Ri, Ho, Wo, 0]"
                              : ", expected [R, Ho, Wo, 2] or [R, Ho, Wo, 0]"));
  }
  const size_t lead = per_image ? 1 : 0;  // offsets[lead + 1:] = (Ho, Wo, 2 or 0)
  RoiPoolParams p;
  p.batch = f[0];
  p.height = f[1];
  p.width = f[2];
  p.channels = f[3];
  p.rois_per_image = per_image ? off[1] : 0;
  p.rois = per_image ? p.batch * p.rois_per_image : off[0];
  p.out_height = off[lead + 1];
  p.out_width = off[lead + 2];
  p.spatial_scale = spatial_scale;
  p.sampling_ratio = sampling_ratio;
  p.gamma = gamma;
  p.has_offsets = off[lead + 3] != 0;
  const int64_t pair = p.has_offsets ? 2 : 0;
  ffi::Error shapes =
      per_image
          ? ExpectShape(op, "offsets", off,
                        {p.batch, p.rois_per_image, p.out_height, p.out_width, pair})
          : ExpectShape(op, "offsets", off, {p.rois, p.out_height, p.out_width, pair});
  if (shapes.failure()) return ffi::Unexpected<ffi::Error>(std::move(shapes));
  shapes = per_image ? ExpectShape(op, "rois", rois.dimensions(), {p.batch, p.rois_per_image, 4})
                     : ExpectShape(op, "rois", rois.dimensions(), {p.rois, 5});
  if (shapes.failure()) return ffi::Unexpected<ffi::Error>(std::move(shapes));
  if (p.out_height < 1 || p.out_width < 1) {
    return Invalid(prefix + "output size must be >= 1");
  }
  return p;
}

// The pooled shape: [R, Ho, Wo, C], or [N, Ri, Ho, Wo, C] in the per-image form.
inline ffi::Error ExpectPooledShape(const char* op, const char* name, const RoiPoolParams& p,
                                    ffi::AnyBuffer::Dimensions dims) {
  if (p.rois_per_image > 0) {
    return ExpectShape(op, name, dims,
                       {p.batch, p.rois_per_image, p.out_height, p.out_width, p.channels});
  }
  return ExpectShape(op, name, dims, {p.rois, p.out_height, p.out_width, p.channels});
}

// The dtype and shape of every other buffer of the four targets, once the parameters are known.

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

// pooled [R, Ho, Wo, C] (per image: [N, Ri, Ho, Wo, C]) in the dtype of features.
inline ffi::Error CheckRoiPoolBuffers(const char* op, const RoiPoolParams& p,
                                      const ffi::AnyBuffer& features,
                                      const ffi::AnyBuffer& pooled) {
  if (pooled.element_type() != features.element_type()) {
    return ffi::Error::InvalidArgument(std::string(op) + ": pooled dtype differs from features");
  }
  return ExpectPooledShape(op, "pooled", p, pooled.dimensions());
}

// grad_pooled like the pooled output; grad_features, grad_offsets like their primals; all in the
// dtype of features.
inline ffi::Error CheckRoiPoolBwdBuffers(const char* op, const RoiPoolParams& p,
                                         const ffi::AnyBuffer& grad_pooled,
                                         const ffi::AnyBuffer& features,
                                         const ffi::AnyBuffer& offset,
                                         const ffi::AnyBuffer& grad_features,
                                         const ffi::AnyBuffer& grad_offset) {
  const ffi::DataType dtype = features.element_type();
  if (grad_pooled.element_type() != dtype || grad_features.element_type() != dtype ||
      grad_offset.element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string(op) +
                                       ": gradients must have the dtype of features");
  }
  for (ffi::Error e :
       {ExpectPooledShape(op, "grad_pooled", p, grad_pooled.dimensions()),
        ExpectSameShape(op, "grad_features", grad_features.dimensions(), features.dimensions()),
        ExpectSameShape(op, "grad_offsets", grad_offset.dimensions(), offset.dimensions())}) {
    if (e.failure()) return e;
  }
  return ffi::Error::Success();
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_FFI_COMMON_H_
