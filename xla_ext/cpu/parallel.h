// Helpers of the CPU launches (cpu/<op>_ffi.cc): the thread pool, dtype dispatch, buffer access
// and the shape-only partition of the backward scatters (shared by every CPU target).

#ifndef FLAXDCN_XLA_EXT_CPU_PARALLEL_H_
#define FLAXDCN_XLA_EXT_CPU_PARALLEL_H_

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
#include "xla_ext/common/base.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {

namespace ffi = ::xla::ffi;

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
[[nodiscard]] inline bool ParallelRanges(ffi::ThreadPool& pool, int64_t size,
                                  const std::function<void(int64_t, int64_t)>& fn) {
  if (size <= 0) return true;
  const int64_t chunks = std::min<int64_t>(size, 4 * std::max<int64_t>(1, pool.num_threads()));
  return ParallelFor::Run(
      pool, chunks, [&](int64_t t) { fn(size * t / chunks, size * (t + 1) / chunks); });
}

inline ffi::Error OutOfMemory(const char* op) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    std::string(op) + ": out of host memory for the kernel's scratch buffers");
}

// Calls fn(T{}) with T the stored element type of `type`; fn returns whether it succeeded (its
// allocations may fail).
template <typename Fn>
ffi::Error DispatchCpu(const char* op, ElementType type, Fn&& fn) {
  bool ok = false;
  try {
    switch (type) {
      case ElementType::kF32:
        ok = fn(float{});
        break;
      case ElementType::kF64:
        ok = fn(double{});
        break;
      case ElementType::kF16:
        ok = fn(Float16{});
        break;
      case ElementType::kBF16:
        ok = fn(BFloat16{});
        break;
    }
  } catch (const std::bad_alloc&) {
    ok = false;
  }
  return ok ? ffi::Error::Success() : OutOfMemory(op);
}

// A buffer's data as elements of T.
template <typename T>
const T* As(const void* data) {
  return static_cast<const T*>(data);
}
template <typename T>
T* As(void* data) {
  return static_cast<T*>(data);
}

// Channel blocks per group of a backward scatter partitioned by (image, group, channel block).
// Channels are split only when there are fewer than kTargetTasks (image, group) pairs, since
// every block repeats the per-sample work. The partition depends on the shapes only, never on the
// thread count, so the channel reductions are summed in the same order on every machine.
inline int64_t BackwardChannelBlocks(int64_t group_channels, int64_t image_groups) {
  constexpr int64_t kTargetTasks = 8;
  constexpr int64_t kMinBlockChannels = 16;
  if (group_channels == 0) return 1;
  const int64_t images = std::max<int64_t>(1, image_groups);
  int64_t blocks = (kTargetTasks + images - 1) / images;
  blocks = std::max<int64_t>(1, std::min(blocks, group_channels / kMinBlockChannels));
  const int64_t width = (group_channels + blocks - 1) / blocks;
  return (group_channels + width - 1) / width;  // no empty block
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CPU_PARALLEL_H_
