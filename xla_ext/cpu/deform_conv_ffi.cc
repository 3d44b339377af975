// The deformable im2col targets on the CPU: the launches of common/deform_conv_ffi.h, which
// partition each kernel over XLA's thread pool (parallel.h), and the handler symbols.

#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/deform_conv_ffi.h"
#include "xla_ext/common/handlers.h"
#include "xla_ext/cpu/deform_conv_kernels.h"
#include "xla_ext/cpu/parallel.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {

ffi::Error RunDeformIm2col(ffi::ThreadPool& pool, const char* op, ElementType type,
                           const ConvParams& p, const void* input, const void* offset,
                           const void* mask, void* columns) {
  return DispatchCpu(op, type, [&](auto tag) {
    using T = decltype(tag);
    return ParallelRanges(pool, p.batch * p.positions(), [&](int64_t begin, int64_t end) {
      DeformIm2colCpu<T>(p, As<T>(input), As<T>(offset), As<T>(mask), As<T>(columns), begin,
                         end);
    });
  });
}

ffi::Error RunDeformIm2colBackward(ffi::ThreadPool& pool, const char* op, ElementType type,
                                   const ConvParams& p, bool /*deterministic: always*/,
                                   const void* grad_columns, const void* input,
                                   const void* offset, const void* mask, void* grad_input,
                                   void* grad_offset, void* grad_mask) {
  // The (image, offset group, channel block) partition of stage 1.
  const int64_t blocks = BackwardChannelBlocks(p.group_channels(), p.batch * p.offset_groups);
  return DispatchCpu(op, type, [&](auto tag) {
    using T = decltype(tag);
    using A = AccType<T>;
    // Every entry is written by stage 1 before stage 2 reads it.
    std::unique_ptr<A[]> partial(new A[p.samples() * blocks * 4]);
    return ParallelFor::Run(pool, p.batch * p.offset_groups * blocks,
                            [&](int64_t task) {
                              DeformIm2colBackwardInputCpu<T>(
                                  p, blocks, task, As<T>(grad_columns), As<T>(input),
                                  As<T>(offset), As<T>(mask), As<T>(grad_input), partial.get());
                            }) &&
           ParallelRanges(pool, p.batch * p.positions(), [&](int64_t begin, int64_t end) {
             DeformIm2colBackwardCoordCpu<T>(p, blocks, partial.get(), As<T>(offset),
                                             As<T>(mask), As<T>(grad_offset), As<T>(grad_mask),
                                             begin, end);
           });
  });
}

}  // namespace flaxdcn

FLAXDCN_DEFINE_HANDLER(DeformIm2col, Cpu, xla::ffi::ThreadPool);
FLAXDCN_DEFINE_HANDLER(DeformIm2colBwd, Cpu, xla::ffi::ThreadPool);
