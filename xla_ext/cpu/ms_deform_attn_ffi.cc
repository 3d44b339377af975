// The multi-scale deformable attention targets on the CPU: the launches of
// common/ms_deform_attn_ffi.h, which partition each kernel over XLA's thread pool (parallel.h),
// and the handler symbols.

#include <algorithm>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/common/ms_deform_attn.h"
#include "xla_ext/common/ms_deform_attn_ffi.h"
#include "xla_ext/cpu/ms_deform_attn_kernels.h"
#include "xla_ext/cpu/parallel.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {

ffi::Error RunMsDeformAttn(ffi::ThreadPool& pool, const char* op, ElementType type,
                           const MsDeformAttnParams& p, const void* value, const void* locations,
                           const void* weights, void* out) {
  return DispatchCpu(op, type, [&](auto tag) {
    using T = decltype(tag);
    using A = AccType<T>;
    return ParallelRanges(pool, p.batch * p.queries, [&](int64_t begin, int64_t end) {
      MsDeformAttnCpu<T>(p, As<T>(value), As<A>(locations), As<T>(weights), As<T>(out), begin,
                         end);
    });
  });
}

ffi::Error RunMsDeformAttnBackward(ffi::ThreadPool& pool, const char* op, ElementType type,
                                   const MsDeformAttnParams& p, bool /*deterministic: always*/,
                                   const void* grad_out, const void* value, const void* locations,
                                   const void* weights, void* grad_value, void* grad_locations,
                                   void* grad_weights) {
  return DispatchCpu(op, type, [&](auto tag) {
    using T = decltype(tag);
    using A = AccType<T>;
    if (p.head_channels == 0) {
      // No channel to reduce: the sampling gradients are zero (grad_value is empty).
      std::fill_n(As<A>(grad_locations), p.samples() * 2, A(0));
      std::fill_n(As<T>(grad_weights), p.samples(), Element<T>::Store(A(0)));
      return true;
    }
    // The (image, head, channel block) partition of stage 1: each task owns a disjoint region of
    // grad_value, so the scatter needs no atomics and sums in one fixed order.
    const int64_t blocks = BackwardChannelBlocks(p.head_channels, p.batch * p.heads);
    const int64_t tasks = p.batch * p.heads * blocks;
    if (blocks == 1) {  // each task also finishes the sampling gradients of its samples
      return ParallelFor::Run(pool, tasks, [&](int64_t task) {
        MsDeformAttnBackwardValueCpu<T>(p, 1, task, As<T>(grad_out), As<T>(value),
                                        As<A>(locations), As<T>(weights), As<T>(grad_value),
                                        nullptr, As<A>(grad_locations), As<T>(grad_weights));
      });
    }
    // Every entry is written by stage 1 before stage 2 reads it.
    std::unique_ptr<A[]> partial(new A[p.samples() * blocks * 4]);
    return ParallelFor::Run(pool, tasks,
                            [&](int64_t task) {
                              MsDeformAttnBackwardValueCpu<T>(
                                  p, blocks, task, As<T>(grad_out), As<T>(value),
                                  As<A>(locations), As<T>(weights), As<T>(grad_value),
                                  partial.get(), nullptr, nullptr);
                            }) &&
           ParallelRanges(pool, p.batch * p.queries, [&](int64_t begin, int64_t end) {
             MsDeformAttnBackwardSamplingCpu<T>(p, blocks, partial.get(), As<A>(locations),
                                                As<T>(weights), As<A>(grad_locations),
                                                As<T>(grad_weights), begin, end);
           });
  });
}

}  // namespace flaxdcn

FLAXDCN_DEFINE_HANDLER(MsDeformAttn, Cpu, xla::ffi::ThreadPool);
FLAXDCN_DEFINE_HANDLER(MsDeformAttnBwd, Cpu, xla::ffi::ThreadPool);
