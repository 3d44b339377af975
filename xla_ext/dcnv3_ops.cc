// XLA FFI handlers of the DCNv3 / DCNv4 CPU kernels: buffer checks, dtype dispatch and the
// thread pool.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/cpu_dcnv3_kernels.h"
#include "xla_ext/cpu_types.h"
#include "xla_ext/dcnv3_ffi.h"
#include "xla_ext/dcnv3_ops.h"
#include "xla_ext/dcnv3_params.h"

namespace flaxdcn {
namespace {

// Runs fn(0), ..., fn(tasks - 1) on the caller and up to pool-size - 1 helpers. Tasks are
// claimed from a shared counter, so the call never waits for a helper that has not started; the
// state is shared, so a late helper finds no task and touches nothing else. Returns false when a
// task ran out of memory (no exception crosses a thread or the FFI boundary).
class TaskPool {
 public:
  [[nodiscard]] static bool Run(ffi::ThreadPool& pool, int64_t tasks,
                                std::function<void(int64_t)> fn) {
    if (tasks <= 0) return true;
    auto state = std::make_shared<TaskPool>(tasks, std::move(fn));
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Work(); });
    state->Work();
    std::unique_lock<std::mutex> lock(state->mu_);
    state->all_done_.wait(lock, [&] { return state->done_ == state->tasks_; });
    return !state->failed_.load();
  }

  TaskPool(int64_t tasks, std::function<void(int64_t)> fn) : tasks_(tasks), fn_(std::move(fn)) {}

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

// fn(begin, end) over [0, size) in a few contiguous chunks per thread.
[[nodiscard]] bool Ranges(ffi::ThreadPool& pool, int64_t size,
                          const std::function<void(int64_t, int64_t)>& fn) {
  if (size <= 0) return true;
  const int64_t chunks = std::min<int64_t>(size, 4 * std::max<int64_t>(1, pool.num_threads()));
  return TaskPool::Run(pool, chunks,
                       [&](int64_t t) { fn(size * t / chunks, size * (t + 1) / chunks); });
}

// Calls fn(T{}) with T the stored element type; fn returns whether it succeeded.
template <typename Fn>
ffi::Error Dispatch(const char* op, ffi::DataType dtype, Fn&& fn) {
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
  if (ok) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    std::string(op) + ": out of host memory for the kernel's scratch buffers");
}

template <typename T>
const T* Data(const ffi::AnyBuffer& b) {
  return reinterpret_cast<const T*>(b.untyped_data());
}
template <typename T>
T* Data(ffi::Result<ffi::AnyBuffer>& b) {
  return reinterpret_cast<T*>(b->untyped_data());
}

// Channel blocks per group of the backward: split only when there are fewer than kTargetTasks
// (image, group) pairs, since every block repeats the per-sample work. Depends on the shapes
// only, never on the thread count, so reductions are summed in the same order everywhere.
int64_t BackwardBlocks(const Dcnv3Params& p) {
  constexpr int64_t kTargetTasks = 8;
  constexpr int64_t kMinBlockChannels = 16;
  const int64_t group_channels = p.group_channels();
  if (group_channels == 0) return 1;
  const int64_t images = std::max<int64_t>(1, p.batch * p.groups);
  int64_t blocks = (kTargetTasks + images - 1) / images;
  blocks = std::max<int64_t>(1, std::min(blocks, group_channels / kMinBlockChannels));
  const int64_t width = (group_channels + blocks - 1) / blocks;
  return (group_channels + width - 1) / width;  // no empty block
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
  return Ranges(pool, p.batch * p.positions(), [&](int64_t begin, int64_t end) {
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
  return TaskPool::Run(pool, p.batch * p.groups * blocks,
                       [&](int64_t task) {
                         Dcnv3BackwardInputCpu<T>(p, blocks, task, grad_out, input, offset, mask,
                                                  grad_input, partial.get());
                       }) &&
         Ranges(pool, p.batch * p.positions(), [&](int64_t begin, int64_t end) {
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
  return Dispatch(kOp, input.element_type(), [&](auto tag) {
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
  return Dispatch(kOp, input.element_type(), [&](auto tag) {
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
  return Dispatch(kOp, input.element_type(), [&](auto tag) {
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
  return Dispatch(kOp, input.element_type(), [&](auto tag) {
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
