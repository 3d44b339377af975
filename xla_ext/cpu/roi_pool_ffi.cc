// The deformable RoI pooling targets on the CPU: the launches of common/roi_pool_ffi.h, which
// partition each kernel over XLA's thread pool (parallel.h), and the handler symbols.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/common/roi_pool.h"
#include "xla_ext/common/roi_pool_ffi.h"
#include "xla_ext/cpu/parallel.h"
#include "xla_ext/cpu/roi_pool_kernels.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {

ffi::Error RunDeformRoiPool(ffi::ThreadPool& pool, const char* op, ElementType type,
                            const RoiPoolParams& p, const void* features, const void* rois,
                            const void* offset, void* pooled) {
  return DispatchCpu(op, type, [&](auto tag) {
    using T = decltype(tag);
    using A = AccType<T>;
    return ParallelRanges(pool, p.bins(), [&](int64_t begin, int64_t end) {
      DeformRoiPoolCpu<T>(p, As<T>(features), As<A>(rois), As<T>(offset), As<T>(pooled), begin,
                          end);
    });
  });
}

ffi::Error RunDeformRoiPoolBackward(ffi::ThreadPool& pool, const char* op, ElementType type,
                                    const RoiPoolParams& p, bool /*deterministic: always*/,
                                    const void* grad_pooled, const void* features,
                                    const void* rois, const void* offset, void* grad_features,
                                    void* grad_offset) {
  return DispatchCpu(op, type, [&](auto tag) {
    using T = decltype(tag);
    using A = AccType<T>;
    constexpr bool kDirect = std::is_same_v<T, A>;
    const int64_t size = p.batch * p.height * p.width * p.channels;
    // Half types accumulate in a float buffer; float and double accumulate in place.
    std::unique_ptr<A[]> buffer(kDirect ? nullptr : new A[size]);
    A* acc = kDirect ? reinterpret_cast<A*>(grad_features) : buffer.get();
    // Channel blocks own disjoint channels; each accumulates the bins in bin order.
    constexpr int64_t kBlockChannels = 16;
    const int64_t blocks = (p.channels + kBlockChannels - 1) / kBlockChannels;
    bool ok = ParallelRanges(pool, size, [&](int64_t begin, int64_t end) {
                std::fill(acc + begin, acc + end, A(0));
              }) &&
              ParallelFor::Run(pool, blocks, [&](int64_t b) {
                DeformRoiPoolBackwardFeaturesCpu<T>(
                    p, As<T>(grad_pooled), As<A>(rois), As<T>(offset), acc, b * kBlockChannels,
                    std::min(p.channels, (b + 1) * kBlockChannels));
              });
    if (ok && !kDirect) {
      ok = ParallelRanges(pool, size, [&](int64_t begin, int64_t end) {
        StoreCpu<T>(acc, As<T>(grad_features), begin, end);
      });
    }
    if (ok && p.has_offsets) {
      ok = ParallelRanges(pool, p.bins(), [&](int64_t begin, int64_t end) {
        DeformRoiPoolBackwardOffsetCpu<T>(p, As<T>(grad_pooled), As<T>(features), As<A>(rois),
                                          As<T>(offset), As<T>(grad_offset), begin, end);
      });
    }
    return ok;
  });
}

}  // namespace flaxdcn

FLAXDCN_DEFINE_HANDLER(DeformRoiPool, Cpu, xla::ffi::ThreadPool);
FLAXDCN_DEFINE_HANDLER(DeformRoiPoolBwd, Cpu, xla::ffi::ThreadPool);
