// FFI of the deformable RoI pooling targets (flaxdcn_deform_roi_pool, flaxdcn_deform_roi_pool_bwd),
// one definition for every backend: the attributes as a struct, the buffer checks that make a
// RoiPoolParams, the binding and the handler body. A backend implements the two launches
// declared below as overloads on its context and defines the handler symbols, in
// <backend>/roi_pool_ffi.cc (see common/deform_conv_ffi.h).

#ifndef FLAXDCN_XLA_EXT_COMMON_ROI_POOL_FFI_H_
#define FLAXDCN_XLA_EXT_COMMON_ROI_POOL_FFI_H_

#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/ffi_helpers.h"
#include "xla_ext/common/roi_pool.h"

namespace flaxdcn {

// The attributes of flaxdcn_deform_roi_pool.
struct RoiPoolAttrs {
  double spatial_scale;
  int64_t sampling_ratio;
  double gamma;
};

// The attributes of flaxdcn_deform_roi_pool_bwd: the forward's and `deterministic`.
struct RoiPoolBwdAttrs : RoiPoolAttrs {
  bool deterministic;
};

}  // namespace flaxdcn

// Decoded by name from the call's attribute dictionary, which must hold exactly these.
#define FLAXDCN_ROI_POOL_ATTRS                                                          \
  StructMember<double>("spatial_scale"),       /* feature pixels per input pixel */     \
      StructMember<int64_t>("sampling_ratio"), /* > 0: fixed sub-grid; else ceil(size) */ \
      StructMember<double>("gamma")            /* offset scale */

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::flaxdcn::RoiPoolAttrs, FLAXDCN_ROI_POOL_ATTRS);
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ::flaxdcn::RoiPoolBwdAttrs, FLAXDCN_ROI_POOL_ATTRS,
    StructMember<bool>("deterministic"));  // CUDA: fixed-point grad-feature sums, no float atomics
                                           // (the CPU backward always is deterministic)

#undef FLAXDCN_ROI_POOL_ATTRS

namespace flaxdcn {

// Checks features [N, H, W, C], rois [R, 5] in the accumulation type (float64 for float64
// features, float32 otherwise), offsets [R, Ho, Wo, 2] or [R, Ho, Wo, 0] (no offsets); or the
// per-image form: rois [N, Ri, 4], offsets [N, Ri, Ho, Wo, 2] or [N, Ri, Ho, Wo, 0].
inline ffi::ErrorOr<RoiPoolParams> MakeRoiPoolParams(const char* op,
                                                     const ffi::AnyBuffer& features,
                                                     const ffi::AnyBuffer& rois,
                                                     const ffi::AnyBuffer& offset,
                                                     const RoiPoolAttrs& a) {
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
  p.spatial_scale = a.spatial_scale;
  p.sampling_ratio = a.sampling_ratio;
  p.gamma = a.gamma;
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

// The backends' launches, on checked buffers of element type `type` (`rois` in its accumulation
// type; `offset` and `grad_offset` are ignored unless p.has_offsets); errors name `op`.
ffi::Error RunDeformRoiPool(ffi::ThreadPool& device, const char* op, ElementType type,
                            const RoiPoolParams& p, const void* features, const void* rois,
                            const void* offset, void* pooled);
ffi::Error RunDeformRoiPool(CudaContext& device, const char* op, ElementType type,
                            const RoiPoolParams& p, const void* features, const void* rois,
                            const void* offset, void* pooled);
ffi::Error RunDeformRoiPoolBackward(ffi::ThreadPool& device, const char* op, ElementType type,
                                    const RoiPoolParams& p, bool deterministic,
                                    const void* grad_pooled, const void* features,
                                    const void* rois, const void* offset, void* grad_features,
                                    void* grad_offset);
ffi::Error RunDeformRoiPoolBackward(CudaContext& device, const char* op, ElementType type,
                                    const RoiPoolParams& p, bool deterministic,
                                    const void* grad_pooled, const void* features,
                                    const void* rois, const void* offset, void* grad_features,
                                    void* grad_offset);

// The handler bodies, one per target for every backend; `Device` is the backend's context.
template <typename Device>
ffi::Error DeformRoiPool(ffi::AnyBuffer features, ffi::AnyBuffer rois, ffi::AnyBuffer offset,
                         ffi::Result<ffi::AnyBuffer> pooled, RoiPoolAttrs attrs, Device device) {
  constexpr char kOp[] = "flaxdcn_deform_roi_pool";
  auto params = MakeRoiPoolParams(kOp, features, rois, offset, attrs);
  if (!params) return params.error();
  if (ffi::Error e = CheckRoiPoolBuffers(kOp, *params, features, *pooled); e.failure()) return e;
  return RunDeformRoiPool(device, kOp, *ToElementType(features.element_type()), *params,
                          features.untyped_data(), rois.untyped_data(), offset.untyped_data(),
                          pooled->untyped_data());
}

template <typename Device>
ffi::Error DeformRoiPoolBwd(ffi::AnyBuffer grad_pooled, ffi::AnyBuffer features,
                            ffi::AnyBuffer rois, ffi::AnyBuffer offset,
                            ffi::Result<ffi::AnyBuffer> grad_features,
                            ffi::Result<ffi::AnyBuffer> grad_offset, RoiPoolBwdAttrs attrs,
                            Device device) {
  constexpr char kOp[] = "flaxdcn_deform_roi_pool_bwd";
  auto params = MakeRoiPoolParams(kOp, features, rois, offset, attrs);
  if (!params) return params.error();
  if (ffi::Error e = CheckRoiPoolBwdBuffers(kOp, *params, grad_pooled, features, offset,
                                            *grad_features, *grad_offset);
      e.failure()) {
    return e;
  }
  return RunDeformRoiPoolBackward(device, kOp, *ToElementType(features.element_type()), *params,
                                  attrs.deterministic, grad_pooled.untyped_data(),
                                  features.untyped_data(), rois.untyped_data(),
                                  offset.untyped_data(), grad_features->untyped_data(),
                                  grad_offset->untyped_data());
}

// The bindings: buffers, attributes, then the backend's context (the handler bodies' last
// parameter; XLA decodes contexts in any position).
template <typename Device>
auto DeformRoiPoolBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()    // features [N, H, W, C]
      .Arg<ffi::AnyBuffer>()    // rois     [R, 5] (batch index, x1, y1, x2, y2), f32/f64,
                                //          or per image [N, Ri, 4] (x1, y1, x2, y2)
      .Arg<ffi::AnyBuffer>()    // offsets  [R, Ho, Wo, 2] (dy, dx), [R, Ho, Wo, 0]: none
      .Ret<ffi::AnyBuffer>()    // pooled   [R, Ho, Wo, C] (per image: R -> N, Ri)
      .Attrs<RoiPoolAttrs>()    // spatial_scale, sampling_ratio, gamma (named above)
      .Ctx<Device>();           // the backend: XLA:CPU's pool, or XLA's CUDA stream
}

template <typename Device>
auto DeformRoiPoolBwdBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()     // grad_pooled   [R, Ho, Wo, C]
      .Arg<ffi::AnyBuffer>()     // features      [N, H, W, C]
      .Arg<ffi::AnyBuffer>()     // rois          [R, 5] or per image [N, Ri, 4]
      .Arg<ffi::AnyBuffer>()     // offsets       [R, Ho, Wo, 2] or [R, Ho, Wo, 0]
      .Ret<ffi::AnyBuffer>()     // grad_features [N, H, W, C]
      .Ret<ffi::AnyBuffer>()     // grad_offsets  shape of offsets
      .Attrs<RoiPoolBwdAttrs>()  // the forward's and deterministic (named above)
      .Ctx<Device>();            // the backend, with CUDA's workspace allocator
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_ROI_POOL_FFI_H_
