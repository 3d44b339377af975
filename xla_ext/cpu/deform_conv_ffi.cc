// XLA FFI handlers of the CPU kernels: buffer checks and the partition of each kernel over
// XLA's thread pool (cpu_parallel.h).

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/cpu/deform_conv_kernels.h"
#include "xla_ext/cpu/parallel.h"
#include "xla_ext/cpu/types.h"
#include "xla_ext/common/ffi_helpers.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/common/base.h"

namespace flaxdcn {
namespace {

// The (image, offset group, channel block) partition of the conv backward.
int64_t ConvBackwardBlocks(const ConvParams& p) {
  return BackwardChannelBlocks(p.group_channels(), p.batch * p.offset_groups);
}

ffi::Error DeformIm2colCpuImpl(ffi::ThreadPool pool, ffi::AnyBuffer input, ffi::AnyBuffer offset,
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
  return DispatchCpu(kOp, input.element_type(), [&](auto tag) {
    using T = decltype(tag);
    return ParallelRanges(pool, p.batch * p.positions(), [&](int64_t begin, int64_t end) {
      DeformIm2colCpu<T>(p, Data<T>(input), Data<T>(offset), Data<T>(mask), Data<T>(columns),
                         begin, end);
    });
  });
}

ffi::Error DeformIm2colBwdCpuImpl(ffi::ThreadPool pool, ffi::AnyBuffer grad_columns,
                                  ffi::AnyBuffer input, ffi::AnyBuffer offset,
                                  ffi::AnyBuffer mask, ffi::Result<ffi::AnyBuffer> grad_input,
                                  ffi::Result<ffi::AnyBuffer> grad_offset,
                                  ffi::Result<ffi::AnyBuffer> grad_mask, int64_t kernel_h,
                                  int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                  int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                  int64_t dilation_w, int64_t offset_groups,
                                  bool /*deterministic: the CPU backward always is*/) {
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
  const int64_t blocks = ConvBackwardBlocks(p);
  return DispatchCpu(kOp, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = AccType<T>;
    // Every entry is written by stage 1 before stage 2 reads it.
    std::unique_ptr<A[]> partial(new A[p.samples() * blocks * 4]);
    return ParallelFor::Run(pool, p.batch * p.offset_groups * blocks,
                            [&](int64_t task) {
                              DeformIm2colBackwardInputCpu<T>(
                                  p, blocks, task, Data<T>(grad_columns), Data<T>(input),
                                  Data<T>(offset), Data<T>(mask), Data<T>(grad_input),
                                  partial.get());
                            }) &&
           ParallelRanges(pool, p.batch * p.positions(), [&](int64_t begin, int64_t end) {
             DeformIm2colBackwardCoordCpu<T>(p, blocks, partial.get(), Data<T>(offset),
                                             Data<T>(mask), Data<T>(grad_offset),
                                             Data<T>(grad_mask), begin, end);
           });
  });
}

ffi::Error DeformRoiPoolCpuImpl(ffi::ThreadPool pool, ffi::AnyBuffer features,
                                ffi::AnyBuffer rois, ffi::AnyBuffer offset,
                                ffi::Result<ffi::AnyBuffer> pooled, double spatial_scale,
                                int64_t sampling_ratio, double gamma) {
  constexpr char kOp[] = "flaxdcn_deform_roi_pool";
  auto params = MakeRoiPoolParams(kOp, features, rois, offset, spatial_scale, sampling_ratio,
                                  gamma);
  if (!params) return params.error();
  const RoiPoolParams& p = *params;
  if (ffi::Error e = CheckRoiPoolBuffers(kOp, p, features, *pooled); e.failure()) return e;
  return DispatchCpu(kOp, features.element_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = AccType<T>;
    return ParallelRanges(pool, p.bins(), [&](int64_t begin, int64_t end) {
      DeformRoiPoolCpu<T>(p, Data<T>(features), Data<A>(rois), Data<T>(offset), Data<T>(pooled),
                          begin, end);
    });
  });
}

ffi::Error DeformRoiPoolBwdCpuImpl(ffi::ThreadPool pool, ffi::AnyBuffer grad_pooled,
                                   ffi::AnyBuffer features, ffi::AnyBuffer rois,
                                   ffi::AnyBuffer offset,
                                   ffi::Result<ffi::AnyBuffer> grad_features,
                                   ffi::Result<ffi::AnyBuffer> grad_offset, double spatial_scale,
                                   int64_t sampling_ratio, double gamma,
                                   bool /*deterministic: the CPU backward always is*/) {
  constexpr char kOp[] = "flaxdcn_deform_roi_pool_bwd";
  auto params = MakeRoiPoolParams(kOp, features, rois, offset, spatial_scale, sampling_ratio,
                                  gamma);
  if (!params) return params.error();
  const RoiPoolParams& p = *params;
  if (ffi::Error e = CheckRoiPoolBwdBuffers(kOp, p, grad_pooled, features, offset,
                                            *grad_features, *grad_offset);
      e.failure()) {
    return e;
  }
  const ffi::DataType dtype = features.element_type();
  return DispatchCpu(kOp, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = AccType<T>;
    constexpr bool kDirect = std::is_same_v<T, A>;
    const int64_t size = p.batch * p.height * p.width * p.channels;
    // Half types accumulate in a float buffer; float and double accumulate in place.
    std::unique_ptr<A[]> buffer(kDirect ? nullptr : new A[size]);
    A* acc = kDirect ? reinterpret_cast<A*>(Data<T>(grad_features)) : buffer.get();
    // Channel blocks own disjoint channels; each accumulates the bins in bin order.
    constexpr int64_t kBlockChannels = 16;
    const int64_t blocks = (p.channels + kBlockChannels - 1) / kBlockChannels;
    bool ok = ParallelRanges(pool, size, [&](int64_t begin, int64_t end) {
                std::fill(acc + begin, acc + end, A(0));
              }) &&
              ParallelFor::Run(pool, blocks, [&](int64_t b) {
                DeformRoiPoolBackwardFeaturesCpu<T>(
                    p, Data<T>(grad_pooled), Data<A>(rois), Data<T>(offset), acc,
                    b * kBlockChannels, std::min(p.channels, (b + 1) * kBlockChannels));
              });
    if (ok && !kDirect) {
      ok = ParallelRanges(pool, size, [&](int64_t begin, int64_t end) {
        StoreCpu<T>(acc, Data<T>(grad_features), begin, end);
      });
    }
    if (ok && p.has_offsets) {
      ok = ParallelRanges(pool, p.bins(), [&](int64_t begin, int64_t end) {
        DeformRoiPoolBackwardOffsetCpu<T>(p, Data<T>(grad_pooled), Data<T>(features),
                                          Data<A>(rois), Data<T>(offset), Data<T>(grad_offset),
                                          begin, end);
      });
    }
    return ok;
  });
}

}  // namespace
}  // namespace flaxdcn

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDeformIm2colCpu, flaxdcn::DeformIm2colCpuImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()       // XLA:CPU intra-op thread pool
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
    FlaxdcnDeformIm2colBwdCpu, flaxdcn::DeformIm2colBwdCpuImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()       // XLA:CPU intra-op thread pool
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
        .Attr<bool>("deterministic"));     // CUDA: no float atomics (ignored: CPU always is)

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDeformRoiPoolCpu, flaxdcn::DeformRoiPoolCpuImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()     // XLA:CPU intra-op thread pool
        .Arg<xla::ffi::AnyBuffer>()      // features [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()      // rois     [R, 5] (batch index, x1, y1, x2, y2), f32/f64,
                                         //          or per image [N, Ri, 4] (x1, y1, x2, y2)
        .Arg<xla::ffi::AnyBuffer>()      // offsets  [R, Ho, Wo, 2] (dy, dx), [R, Ho, Wo, 0]: none
        .Ret<xla::ffi::AnyBuffer>()      // pooled   [R, Ho, Wo, C] (per image: R -> N, Ri)
        .Attr<double>("spatial_scale")   // feature pixels per input pixel
        .Attr<int64_t>("sampling_ratio") // > 0: fixed sub-grid; else ceil(bin size)
        .Attr<double>("gamma"));         // offset scale

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlaxdcnDeformRoiPoolBwdCpu, flaxdcn::DeformRoiPoolBwdCpuImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()     // XLA:CPU intra-op thread pool
        .Arg<xla::ffi::AnyBuffer>()      // grad_pooled   [R, Ho, Wo, C]
        .Arg<xla::ffi::AnyBuffer>()      // features      [N, H, W, C]
        .Arg<xla::ffi::AnyBuffer>()      // rois          [R, 5] or per image [N, Ri, 4]
        .Arg<xla::ffi::AnyBuffer>()      // offsets       [R, Ho, Wo, 2] or [R, Ho, Wo, 0]
        .Ret<xla::ffi::AnyBuffer>()      // grad_features [N, H, W, C]
        .Ret<xla::ffi::AnyBuffer>()      // grad_offsets  shape of offsets
        .Attr<double>("spatial_scale")   // feature pixels per input pixel
        .Attr<int64_t>("sampling_ratio") // > 0: fixed sub-grid; else ceil(bin size)
        .Attr<double>("gamma")           // offset scale
        .Attr<bool>("deterministic"));   // CUDA: no float atomics (ignored: CPU always is)
