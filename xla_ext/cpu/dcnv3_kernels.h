// CPU kernels of DCNv3 / DCNv4: plain computations on raw pointers, templated on the stored
// element type (float, double, Float16, BFloat16). Each function computes one slice of the work;
// every slice writes a disjoint part of the outputs, so results do not depend on the threads.

#ifndef FLAXDCN_XLA_EXT_CPU_DCNV3_KERNELS_H_
#define FLAXDCN_XLA_EXT_CPU_DCNV3_KERNELS_H_

#include <cstdint>

#include "xla_ext/common/dcnv3.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {

// out [N, Ho, Wo, C] for output positions [begin, end) of the N * Ho * Wo positions: each
// sample is read with DCN's bilinear rule, weighted by its mask and summed over the points,
// without materialising columns.
template <typename T>
void Dcnv3Cpu(const Dcnv3Params& p, const T* input, const T* offset, const T* mask, T* out,
              int64_t begin, int64_t end);

// Backward, stage 1 of 2, task `task` of the partition (image n, group g, channel block b) with
// `blocks` blocks per group: writes grad-input for the block's channels of image n (the region is
// fully overwritten) and, for each sample of (n, g), the block's four channel reductions
// <grad_out, input corner q> into partial[(sample * blocks + b) * 4 + q], sample =
// (np * G + g) * P + k.
template <typename T>
void Dcnv3BackwardInputCpu(const Dcnv3Params& p, int64_t blocks, int64_t task, const T* grad_out,
                           const T* input, const T* offset, const T* mask, T* grad_input,
                           AccType<T>* partial);

// Backward, stage 2 of 2: grad-offset and grad-mask (same strides as offset and mask) of the
// samples of positions [begin, end), summing the blocks' partials in block order; DCNv4's
// padding channels get 0.
template <typename T>
void Dcnv3BackwardCoordCpu(const Dcnv3Params& p, int64_t blocks, const AccType<T>* partial,
                           const T* offset, const T* mask, T* grad_offset, T* grad_mask,
                           int64_t begin, int64_t end);

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CPU_DCNV3_KERNELS_H_
