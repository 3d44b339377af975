// CPU kernels of multi-scale deformable attention: plain computations on raw pointers, templated
// on the stored element type T (float, double, Float16, BFloat16); sampling locations and their
// gradient are in the accumulation type AccType<T>. Each function computes one slice of the work;
// every slice writes a disjoint part of the outputs, so results do not depend on the threads.

#ifndef FLAXDCN_XLA_EXT_CPU_MS_DEFORM_ATTN_KERNELS_H_
#define FLAXDCN_XLA_EXT_CPU_MS_DEFORM_ATTN_KERNELS_H_

#include <cstdint>

#include "xla_ext/common/ms_deform_attn.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {

// out [N, Lq, M, D] for the (image, query) rows [begin, end) of the N * Lq rows: for each head,
// every sample's bilinear read times its attention weight, summed over levels and points in a
// D-channel accumulator (nothing is materialised per sample).
template <typename T>
void MsDeformAttnCpu(const MsDeformAttnParams& p, const T* value, const AccType<T>* locations,
                     const T* weights, T* out, int64_t begin, int64_t end);

// Backward, stage 1 of 2, task `task` of the partition (image n, head m, channel block b) with
// `blocks` blocks per head (parallel.h's BackwardChannelBlocks): writes grad-value for the block's
// channels of image n and head m (the region is fully overwritten). With one block the task has
// every channel of its samples and writes their grad-locations and grad-weights itself (`partial`
// is unused, and there is no stage 2); otherwise it writes each sample's block of the four
// channel reductions <grad_out, value corner q> into partial[(sample * blocks + b) * 4 + q].
template <typename T>
void MsDeformAttnBackwardValueCpu(const MsDeformAttnParams& p, int64_t blocks, int64_t task,
                                  const T* grad_out, const T* value, const AccType<T>* locations,
                                  const T* weights, T* grad_value, AccType<T>* partial,
                                  AccType<T>* grad_locations, T* grad_weights);

// Backward, stage 2 of 2 (blocks > 1): grad-locations and grad-weights of the samples of the
// (image, query) rows [begin, end), summing the blocks' partials in block order (the sums of one
// block are those stage 1 forms itself).
template <typename T>
void MsDeformAttnBackwardSamplingCpu(const MsDeformAttnParams& p, int64_t blocks,
                                     const AccType<T>* partial, const AccType<T>* locations,
                                     const T* weights, AccType<T>* grad_locations,
                                     T* grad_weights, int64_t begin, int64_t end);

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CPU_MS_DEFORM_ATTN_KERNELS_H_
