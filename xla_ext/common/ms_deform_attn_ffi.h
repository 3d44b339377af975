// FFI of the multi-scale deformable attention targets (flaxdcn_ms_deform_attn and its _bwd), one
// definition for every backend: the attributes as a struct, the buffer checks that make a
// MsDeformAttnParams (the level starts derived from the spatial shapes), the bindings and the
// handler bodies. A backend implements the launches as overloads on its context and defines the
// handler symbols in <backend>/ms_deform_attn_ffi.cc (see common/deform_conv_ffi.h).

#ifndef FLAXDCN_XLA_EXT_COMMON_MS_DEFORM_ATTN_FFI_H_
#define FLAXDCN_XLA_EXT_COMMON_MS_DEFORM_ATTN_FFI_H_

#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/ffi_helpers.h"
#include "xla_ext/common/ms_deform_attn.h"

namespace flaxdcn {

// The attributes of flaxdcn_ms_deform_attn: the levels' sizes.
struct MsDeformAttnAttrs {
  ffi::Span<const int64_t> spatial_shapes;  // (H_0, W_0, H_1, W_1, ...): L pairs
};

// The attributes of its backward: the forward's and `deterministic`.
struct MsDeformAttnBwdAttrs : MsDeformAttnAttrs {
  bool deterministic;
};

}  // namespace flaxdcn

// Decoded by name (see common/deform_conv_ffi.h).
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ::flaxdcn::MsDeformAttnAttrs,
    StructMember<Span<const int64_t>>("spatial_shapes"));  // int64 [2 L]: (H_l, W_l) pairs
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ::flaxdcn::MsDeformAttnBwdAttrs,
    StructMember<Span<const int64_t>>("spatial_shapes"),  // as the forward's
    StructMember<bool>("deterministic"));  // CUDA: fixed-point grad-value sums, no float atomics
                                           // (the CPU backward always is deterministic)

namespace flaxdcn {

// Checks value [N, S, M, D] and the spatial shapes (1 to kMsDeformAttnMaxLevels pairs of sizes
// >= 1 whose sum_l H_l * W_l is S), sampling_locations [N, Lq, M, L, P, 2] in the accumulation
// type (float64 for float64 value, float32 otherwise), attention_weights [N, Lq, M, L, P] and
// `out` [N, Lq, M, D] (the forward's output or the backward's cotangent), both in the dtype of
// value; derives the level starts.
inline ffi::ErrorOr<MsDeformAttnParams> MakeMsDeformAttnParams(
    const char* op, const ffi::AnyBuffer& value, const ffi::AnyBuffer& locations,
    const ffi::AnyBuffer& weights, const char* out_name, const ffi::AnyBuffer& out,
    const MsDeformAttnAttrs& a) {
  const std::string prefix = std::string(op) + ": ";
  const ffi::DataType dtype = value.element_type();
  if (!ToElementType(dtype)) {
    return Invalid(prefix + "unsupported dtype; expected float32, float64, float16 or bfloat16");
  }
  if (weights.element_type() != dtype || out.element_type() != dtype) {
    return Invalid(prefix + "attention_weights and " + out_name + " must have the dtype of value");
  }
  const ffi::DataType acc = dtype == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (locations.element_type() != acc) {
    return Invalid(prefix + "sampling_locations must be float64 for a float64 value and float32 "
                            "otherwise");
  }
  const auto v = value.dimensions();
  if (v.size() != 4) {
    return Invalid(prefix + "value has shape " + ShapeString(v) + ", expected [N, S, M, D]");
  }
  const auto loc = locations.dimensions();
  if (loc.size() != 6) {
    return Invalid(prefix + "sampling_locations has shape " + ShapeString(loc) +
                   ", expected [N, Lq, M, L, P, 2]");
  }
  const int64_t pairs = static_cast<int64_t>(a.spatial_shapes.size());
  if (pairs % 2 != 0 || pairs < 2 || pairs > 2 * kMsDeformAttnMaxLevels) {
    return Invalid(prefix + "spatial_shapes must hold 1 to " +
                   std::to_string(kMsDeformAttnMaxLevels) + " pairs (H, W), got " +
                   std::to_string(pairs) + " numbers");
  }
  MsDeformAttnParams p{};
  p.batch = v[0];
  p.values = v[1];
  p.heads = v[2];
  p.head_channels = v[3];
  p.channels = p.heads * p.head_channels;
  p.queries = loc[1];
  p.levels = pairs / 2;
  p.points = loc[4];
  // Sizes up to 2^31 keep every product and the sum below within int64.
  constexpr int64_t kMaxSize = int64_t{1} << 31;
  int64_t start = 0;
  std::string shapes;
  for (int64_t l = 0; l < p.levels; ++l) {
    const int64_t h = a.spatial_shapes[2 * l], w = a.spatial_shapes[2 * l + 1];
    shapes += (l ? ", (" : "(") + std::to_string(h) + ", " + std::to_string(w) + ")";
    if (h < 1 || w < 1 || h > kMaxSize || w > kMaxSize) {
      return Invalid(prefix + "spatial_shapes must be in [1, 2^31], got level " +
                     std::to_string(l) + " of size (" + std::to_string(h) + ", " +
                     std::to_string(w) + ")");
    }
    p.height[l] = h;
    p.width[l] = w;
    p.level_start[l] = start;
    start += h * w;
  }
  if (start != p.values) {
    return Invalid(prefix + "spatial_shapes " + shapes + " hold " + std::to_string(start) +
                   " values in all, but value has shape " + ShapeString(v) + " with S = " +
                   std::to_string(p.values) + " rows");
  }
  for (ffi::Error e :
       {ExpectShape(op, "sampling_locations", loc,
                    {p.batch, p.queries, p.heads, p.levels, p.points, 2}),
        ExpectShape(op, "attention_weights", weights.dimensions(),
                    {p.batch, p.queries, p.heads, p.levels, p.points}),
        ExpectShape(op, out_name, out.dimensions(),
                    {p.batch, p.queries, p.heads, p.head_channels})}) {
    if (e.failure()) return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  return p;
}

// The grads: like their primals, in the primals' dtypes.
inline ffi::Error CheckMsDeformAttnGradBuffers(const char* op, const ffi::AnyBuffer& value,
                                               const ffi::AnyBuffer& locations,
                                               const ffi::AnyBuffer& weights,
                                               const ffi::AnyBuffer& grad_value,
                                               const ffi::AnyBuffer& grad_locations,
                                               const ffi::AnyBuffer& grad_weights) {
  if (grad_value.element_type() != value.element_type() ||
      grad_locations.element_type() != locations.element_type() ||
      grad_weights.element_type() != weights.element_type()) {
    return ffi::Error::InvalidArgument(std::string(op) +
                                       ": each gradient must have the dtype of its primal");
  }
  for (ffi::Error e :
       {ExpectSameShape(op, "grad_value", grad_value.dimensions(), value.dimensions()),
        ExpectSameShape(op, "grad_sampling_locations", grad_locations.dimensions(),
                        locations.dimensions()),
        ExpectSameShape(op, "grad_attention_weights", grad_weights.dimensions(),
                        weights.dimensions())}) {
    if (e.failure()) return e;
  }
  return ffi::Error::Success();
}

// The backends' launches, on checked buffers: value, attention_weights, out and their gradients
// of element type `type`, sampling_locations and its gradient in the accumulation type; errors
// name `op`.
ffi::Error RunMsDeformAttn(ffi::ThreadPool& device, const char* op, ElementType type,
                           const MsDeformAttnParams& p, const void* value, const void* locations,
                           const void* weights, void* out);
ffi::Error RunMsDeformAttn(CudaContext& device, const char* op, ElementType type,
                           const MsDeformAttnParams& p, const void* value, const void* locations,
                           const void* weights, void* out);
ffi::Error RunMsDeformAttnBackward(ffi::ThreadPool& device, const char* op, ElementType type,
                                   const MsDeformAttnParams& p, bool deterministic,
                                   const void* grad_out, const void* value, const void* locations,
                                   const void* weights, void* grad_value, void* grad_locations,
                                   void* grad_weights);
ffi::Error RunMsDeformAttnBackward(CudaContext& device, const char* op, ElementType type,
                                   const MsDeformAttnParams& p, bool deterministic,
                                   const void* grad_out, const void* value, const void* locations,
                                   const void* weights, void* grad_value, void* grad_locations,
                                   void* grad_weights);

// The handler bodies, one per target for every backend; `Device` is the backend's context.
template <typename Device>
ffi::Error MsDeformAttn(ffi::AnyBuffer value, ffi::AnyBuffer locations, ffi::AnyBuffer weights,
                        ffi::Result<ffi::AnyBuffer> out, MsDeformAttnAttrs attrs, Device device) {
  constexpr char kOp[] = "flaxdcn_ms_deform_attn";
  auto params = MakeMsDeformAttnParams(kOp, value, locations, weights, "output", *out, attrs);
  if (!params) return params.error();
  return RunMsDeformAttn(device, kOp, *ToElementType(value.element_type()), *params,
                         value.untyped_data(), locations.untyped_data(), weights.untyped_data(),
                         out->untyped_data());
}

template <typename Device>
ffi::Error MsDeformAttnBwd(ffi::AnyBuffer grad_out, ffi::AnyBuffer value,
                           ffi::AnyBuffer locations, ffi::AnyBuffer weights,
                           ffi::Result<ffi::AnyBuffer> grad_value,
                           ffi::Result<ffi::AnyBuffer> grad_locations,
                           ffi::Result<ffi::AnyBuffer> grad_weights, MsDeformAttnBwdAttrs attrs,
                           Device device) {
  constexpr char kOp[] = "flaxdcn_ms_deform_attn_bwd";
  auto params = MakeMsDeformAttnParams(kOp, value, locations, weights, "grad_out", grad_out,
                                       attrs);
  if (!params) return params.error();
  if (ffi::Error e = CheckMsDeformAttnGradBuffers(kOp, value, locations, weights, *grad_value,
                                                  *grad_locations, *grad_weights);
      e.failure()) {
    return e;
  }
  return RunMsDeformAttnBackward(device, kOp, *ToElementType(value.element_type()), *params,
                                 attrs.deterministic, grad_out.untyped_data(),
                                 value.untyped_data(), locations.untyped_data(),
                                 weights.untyped_data(), grad_value->untyped_data(),
                                 grad_locations->untyped_data(), grad_weights->untyped_data());
}

// The bindings: buffers, attributes, then the backend's context.
template <typename Device>
auto MsDeformAttnBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()       // value              [N, S, M, D]
      .Arg<ffi::AnyBuffer>()       // sampling_locations [N, Lq, M, L, P, 2] (x, y), float32/64
      .Arg<ffi::AnyBuffer>()       // attention_weights  [N, Lq, M, L, P]
      .Ret<ffi::AnyBuffer>()       // out                [N, Lq, M, D]
      .Attrs<MsDeformAttnAttrs>()  // spatial_shapes (above)
      .Ctx<Device>();              // the backend: XLA:CPU's pool, or XLA's CUDA stream
}

template <typename Device>
auto MsDeformAttnBwdBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()          // grad_out                [N, Lq, M, D]
      .Arg<ffi::AnyBuffer>()          // value                   [N, S, M, D]
      .Arg<ffi::AnyBuffer>()          // sampling_locations      [N, Lq, M, L, P, 2]
      .Arg<ffi::AnyBuffer>()          // attention_weights       [N, Lq, M, L, P]
      .Ret<ffi::AnyBuffer>()          // grad_value              shape of value
      .Ret<ffi::AnyBuffer>()          // grad_sampling_locations shape of sampling_locations
      .Ret<ffi::AnyBuffer>()          // grad_attention_weights  shape of attention_weights
      .Attrs<MsDeformAttnBwdAttrs>()  // the forward's and deterministic (above)
      .Ctx<Device>();                 // the backend, with CUDA's workspace allocator
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_MS_DEFORM_ATTN_FFI_H_
