// The DCNv3 / DCNv4 targets on the CPU: the launches of common/dcnv3_ffi.h, which partition each
// kernel over XLA's thread pool (parallel.h), and the handler symbols.

#include <algorithm>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/dcnv3.h"
#include "xla_ext/common/dcnv3_ffi.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/cpu/dcnv3_kernels.h"
#include "xla_ext/cpu/parallel.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {

ffi::Error RunDcnv3(ffi::ThreadPool& pool, const char* op, ElementType type,
                    const Dcnv3Params& p, const void* input, const void* offset, const void* mask,
                    void* out) {
  return DispatchCpu(op, type, [&](auto tag) {
    using T = decltype(tag);
    return ParallelRanges(pool, p.batch * p.positions(), [&](int64_t begin, int64_t end) {
      Dcnv3Cpu<T>(p, As<T>(input), As<T>(offset), As<T>(mask), As<T>(out), begin, end);
    });
  });
}

ffi::Error RunDcnv3Backward(ffi::ThreadPool& pool, const char* op, ElementType type,
                            const Dcnv3Params& p, bool /*deterministic: always*/,
                            const void* grad_out, const void* input, const void* offset,
                            const void* mask, void* grad_input, void* grad_offset,
                            void* grad_mask) {
  return DispatchCpu(op, type, [&](auto tag) {
    using T = decltype(tag);
    using A = AccType<T>;
    const int64_t rows = p.batch * p.positions();
    if (p.channels == 0) {
      // No channel to reduce: every gradient is zero (grad_input is empty). DCNv4's mask lies
      // inside grad_offset's rows, so clearing whole rows covers it.
      const T zero = Element<T>::Store(A(0));
      std::fill_n(As<T>(grad_offset), rows * p.offset_stride, zero);
      const bool packed = p.mask_stride == p.offset_stride;  // DCNv4 (DCNv3: G*P vs 2*G*P)
      if (!packed) std::fill_n(As<T>(grad_mask), rows * p.mask_stride, zero);
      return true;
    }
    // The (image, group, channel block) partition of stage 1.
    const int64_t blocks = BackwardChannelBlocks(p.group_channels(), p.batch * p.groups);
    // Every entry is written by stage 1 before stage 2 reads it.
    std::unique_ptr<A[]> partial(new A[p.samples() * blocks * 4]);
    return ParallelFor::Run(pool, p.batch * p.groups * blocks,
                            [&](int64_t task) {
                              Dcnv3BackwardInputCpu<T>(p, blocks, task, As<T>(grad_out),
                                                       As<T>(input), As<T>(offset), As<T>(mask),
                                                       As<T>(grad_input), partial.get());
                            }) &&
           ParallelRanges(pool, rows, [&](int64_t begin, int64_t end) {
             Dcnv3BackwardCoordCpu<T>(p, blocks, partial.get(), As<T>(offset), As<T>(mask),
                                      As<T>(grad_offset), As<T>(grad_mask), begin, end);
           });
  });
}

}  // namespace flaxdcn

FLAXDCN_DEFINE_HANDLER(Dcnv3, Cpu, xla::ffi::ThreadPool);
FLAXDCN_DEFINE_HANDLER(Dcnv3Bwd, Cpu, xla::ffi::ThreadPool);
FLAXDCN_DEFINE_HANDLER(Dcnv4, Cpu, xla::ffi::ThreadPool);
FLAXDCN_DEFINE_HANDLER(Dcnv4Bwd, Cpu, xla::ffi::ThreadPool);
