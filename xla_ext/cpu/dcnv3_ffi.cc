// XLA FFI handlers of the DCNv3 / DCNv4 CPU kernels: buffer checks and the partition of each
// kernel over XLA's thread pool (cpu_parallel.h).

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/cpu/dcnv3_kernels.h"
#include "xla_ext/cpu/parallel.h"
#include "xla_ext/cpu/types.h"
#include "xla_ext/common/dcnv3_ffi.h"
#include "xla_ext/common/dcnv3_handlers.h"
#include "xla_ext/common/dcnv3.h"

namespace flaxdcn {
namespace {

// The (image, group, channel block) partition of the backward.
int64_t BackwardBlocks(const Dcnv3Params& p) {
  return BackwardChannelBlocks(p.group_channels(), p.batch * p.groups);
}

Dcnv3Attrs Attrs(int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                 int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                 int64_t groups, double offset_scale, bool remove_center) {
  return {kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
          offset_scale, remove_center};
}

// The forward on raw buffers; `mask` is DCNv3's mask buffer or, for DCNv4, offset_mask + 2P.
template <typename T>
bool Forward(ffi::ThreadPool& pool, const Dcnv3Params& p, const T* input, const T* offset,
             const T* mask, T* out) {
  return ParallelRanges(pool, p.batch * p.positions(), [&](int64_t begin, int64_t end) {
    Dcnv3Cpu<T>(p, input, offset, mask, out, begin, end);
  });
}

template <typename T>
bool Backward(ffi::ThreadPool& pool, const Dcnv3Params& p, const T* grad_out, const T* input,
              const T* offset, const T* mask, T* grad_input, T* grad_offset, T* grad_mask) {
  using A = AccType<T>;
  if (p.channels == 0) {
    // No channel to reduce: every gradient is zero (grad_input is empty).
    const int64_t rows = p.batch * p.positions();
    std::fill(grad_offset, grad_offset + rows * p.offset_stride, Element<T>::Store(A(0)));
    if (grad_mask != nullptr) {
      std::fill(grad_mask, grad_mask + rows * p.mask_stride, Element<T>::Store(A(0)));
    }
    return true;
  }
  const int64_t blocks = BackwardBlocks(p);
  // Every entry is written by stage 1 before stage 2 reads it.
  std::unique_ptr<A[]> partial(new A[p.samples() * blocks * 4]);
  return ParallelFor::Run(pool, p.batch * p.groups * blocks,
                       [&](int64_t task) {
                         Dcnv3BackwardInputCpu<T>(p, blocks, task, grad_out, input, offset, mask,
                                                  grad_input, partial.get());
                       }) &&
         ParallelRanges(pool, p.batch * p.positions(), [&](int64_t begin, int64_t end) {
           Dcnv3BackwardCoordCpu<T>(p, blocks, partial.get(), offset, mask, grad_offset,
                                    grad_mask != nullptr ? grad_mask : grad_offset + 2 * p.points(),
                                    begin, end);
         });
}

ffi::Error Dcnv3CpuImpl(ffi::ThreadPool pool, ffi::AnyBuffer input, ffi::AnyBuffer offset,
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
  return DispatchCpu(kOp, input.element_type(), [&](auto tag) {
    using T = decltype(tag);
    return Forward<T>(pool, *params, Data<T>(input), Data<T>(offset), Data<T>(mask),
                      Data<T>(out));
  });
}

ffi::Error Dcnv3BwdCpuImpl(ffi::ThreadPool pool, ffi::AnyBuffer grad_out, ffi::AnyBuffer input,
                           ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                           ffi::Result<ffi::AnyBuffer> grad_input,
                           ffi::Result<ffi::AnyBuffer> grad_offset,
                           ffi::Result<ffi::AnyBuffer> grad_mask, int64_t kernel_h,
                           int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                           int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups,
                           double offset_scale, bool remove_center,
                           bool /*deterministic: the CPU backward always is*/) {
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
  return DispatchCpu(kOp, input.element_type(), [&](auto tag) {
    using T = decltype(tag);
    return Backward<T>(pool, *params, Data<T>(grad_out), Data<T>(input), Data<T>(offset),
                       Data<T>(mask), Data<T>(grad_input), Data<T>(grad_offset),
                       Data<T>(grad_mask));
  });
}

ffi::Error Dcnv4CpuImpl(ffi::ThreadPool pool, ffi::AnyBuffer input, ffi::AnyBuffer offset_mask,
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
  return DispatchCpu(kOp, input.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* om = Data<T>(offset_mask);
    return Forward<T>(pool, *params, Data<T>(input), om, om + 2 * params->points(),
                      Data<T>(out));
  });
}

ffi::Error Dcnv4BwdCpuImpl(ffi::ThreadPool pool, ffi::AnyBuffer grad_out, ffi::AnyBuffer input,
                           ffi::AnyBuffer offset_mask, ffi::Result<ffi::AnyBuffer> grad_input,
                           ffi::Result<ffi::AnyBuffer> grad_offset_mask, int64_t kernel_h,
                           int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                           int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups,
                           double offset_scale, bool remove_center,
                           bool /*deterministic: the CPU backward always is*/) {
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
  return DispatchCpu(kOp, input.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* om = Data<T>(offset_mask);
    return Backward<T>(pool, *params, Data<T>(grad_out), Data<T>(input), om,
                       om + 2 * params->points(), Data<T>(grad_input), Data<T>(grad_offset_mask),
                       nullptr);
  });
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
    FlaxdcnDcnv3Cpu, flaxdcn::Dcnv3CpuImpl,
    FLAXDCN_DCNV3_ATTRS(xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()   // XLA:CPU intra-op thread pool
        .Arg<xla::ffi::AnyBuffer>()    // inputs  [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()    // offsets [N, Ho, Wo, G * P * 2] (g, p, (dx, dy))
        .Arg<xla::ffi::AnyBuffer>()    // mask    [N, Ho, Wo, G * P] (g, p)
        .Ret<xla::ffi::AnyBuffer>()));  // out     [N, Ho, Wo, C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDcnv3BwdCpu, flaxdcn::Dcnv3BwdCpuImpl,
    FLAXDCN_DCNV3_ATTRS(xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()   // XLA:CPU intra-op thread pool
        .Arg<xla::ffi::AnyBuffer>()    // grad_out     [N, Ho, Wo, C]
        .Arg<xla::ffi::AnyBuffer>()    // inputs       [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()    // offsets      [N, Ho, Wo, G * P * 2]
        .Arg<xla::ffi::AnyBuffer>()    // mask         [N, Ho, Wo, G * P]
        .Ret<xla::ffi::AnyBuffer>()    // grad_inputs  [N, H, W, C]
        .Ret<xla::ffi::AnyBuffer>()    // grad_offsets shape of offsets
        .Ret<xla::ffi::AnyBuffer>())   // grad_mask    shape of mask
        .Attr<bool>("deterministic"));  // CUDA: no float atomics (ignored: CPU always is)

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDcnv4Cpu, flaxdcn::Dcnv4CpuImpl,
    FLAXDCN_DCNV3_ATTRS(xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()   // XLA:CPU intra-op thread pool
        .Arg<xla::ffi::AnyBuffer>()    // inputs      [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()    // offset_mask [N, Ho, Wo, D]: per group 2P offsets, P mask
        .Ret<xla::ffi::AnyBuffer>()));  // out         [N, Ho, Wo, C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDcnv4BwdCpu, flaxdcn::Dcnv4BwdCpuImpl,
    FLAXDCN_DCNV3_ATTRS(xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()   // XLA:CPU intra-op thread pool
        .Arg<xla::ffi::AnyBuffer>()    // grad_out         [N, Ho, Wo, C]
        .Arg<xla::ffi::AnyBuffer>()    // inputs           [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()    // offset_mask      [N, Ho, Wo, D]
        .Ret<xla::ffi::AnyBuffer>()    // grad_inputs      [N, H, W, C]
        .Ret<xla::ffi::AnyBuffer>())   // grad_offset_mask [N, Ho, Wo, D] (0 in the padding)
        .Attr<bool>("deterministic"));  // CUDA: no float atomics (ignored: CPU always is)
