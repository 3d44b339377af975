// XLA FFI handlers of the CPU kernels: buffer checks, dtype dispatch and the thread pool.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/cpu_kernels.h"
#include "xla_ext/cpu_types.h"
#include "xla_ext/ffi_common.h"
#include "xla_ext/ops.h"
#include "xla_ext/params.h"

namespace flaxdcn {
namespace {

// Runs fn(0), ..., fn(tasks - 1) on the caller and up to pool-size - 1 helpers of XLA's intra-op
// pool. Tasks are claimed from a shared counter, so the call never waits for a helper that has not
// started (the pool may be busy or run tasks inline); the state is shared with the helpers, so a
// helper that starts after the call returned finds no task left and touches nothing else.
// Returns false when a task ran out of memory (the kernels' scratch vectors may throw
// std::bad_alloc; no exception crosses a thread or the FFI boundary).
class ParallelFor {
 public:
  [[nodiscard]] static bool Run(ffi::ThreadPool& pool, int64_t tasks,
                                std::function<void(int64_t)> fn) {
    auto state = std::make_shared<ParallelFor>(tasks, std::move(fn));
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Work(); });
    state->Work();
    std::unique_lock<std::mutex> lock(state->mu_);
    state->all_done_.wait(lock, [&] { return state->done_ == state->tasks_; });
    return !state->failed_.load();
  }

  ParallelFor(int64_t tasks, std::function<void(int64_t)> fn)
      : tasks_(tasks), fn_(std::move(fn)) {}

 private:
  void Work() {
    int64_t finished = 0;
    for (int64_t t = next_.fetch_add(1); t < tasks_; t = next_.fetch_add(1)) {
      try {
        fn_(t);
      } catch (const std::bad_alloc&) {
        failed_.store(true);
      }
      ++finished;
    }
    if (finished == 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    done_ += finished;
    if (done_ == tasks_) all_done_.notify_all();
  }

  const int64_t tasks_;
  const std::function<void(int64_t)> fn_;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  std::condition_variable all_done_;
  int64_t done_ = 0;
};

// Runs fn(begin, end) over [0, size) split into contiguous chunks, a few per thread so that
// uneven chunks balance out.
[[nodiscard]] bool ParallelRanges(ffi::ThreadPool& pool, int64_t size,
                                  const std::function<void(int64_t, int64_t)>& fn) {
  if (size <= 0) return true;
  const int64_t chunks = std::min<int64_t>(size, 4 * std::max<int64_t>(1, pool.num_threads()));
  return ParallelFor::Run(
      pool, chunks, [&](int64_t t) { fn(size * t / chunks, size * (t + 1) / chunks); });
}

ffi::Error OutOfMemory(const char* op) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    std::string(op) + ": out of host memory for the kernel's scratch buffers");
}

// Calls fn(T{}) with T the stored element type of `dtype`; fn returns whether it succeeded (its
// allocations may fail).
template <typename Fn>
ffi::Error DispatchCpu(const char* op, ffi::DataType dtype, Fn&& fn) {
  bool ok = false;
  try {
    switch (dtype) {
      case ffi::DataType::F32:
        ok = fn(float{});
        break;
      case ffi::DataType::F64:
        ok = fn(double{});
        break;
      case ffi::DataType::F16:
        ok = fn(Float16{});
        break;
      case ffi::DataType::BF16:
        ok = fn(BFloat16{});
        break;
      default:
        return ffi::Error::InvalidArgument(std::string(op) + ": unsupported dtype");
    }
  } catch (const std::bad_alloc&) {
    ok = false;
  }
  return ok ? ffi::Error::Success() : OutOfMemory(op);
}

template <typename T>
const T* Data(const ffi::AnyBuffer& b) {
  return reinterpret_cast<const T*>(b.untyped_data());
}
template <typename T>
T* Data(ffi::Result<ffi::AnyBuffer>& b) {
  return reinterpret_cast<T*>(b->untyped_data());
}

// The (image, offset group, channel block) partition of the conv backward. Channels are split
// only when there are fewer than kTargetTasks (image, group) pairs, since every block repeats the
// per-sample work. The partition depends on the shapes only, never on the thread count, so the
// channel reductions are summed in the same order on every machine.
int64_t ConvBackwardBlocks(const ConvParams& p) {
  constexpr int64_t kTargetTasks = 8;
  constexpr int64_t kMinBlockChannels = 16;
  const int64_t group_channels = p.group_channels();
  if (group_channels == 0) return 1;
  const int64_t images = std::max<int64_t>(1, p.batch * p.offset_groups);
  int64_t blocks = (kTargetTasks + images - 1) / images;
  blocks = std::max<int64_t>(1, std::min(blocks, group_channels / kMinBlockChannels));
  const int64_t width = (group_channels + blocks - 1) / blocks;
  return (group_channels + width - 1) / width;  // no empty block
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
