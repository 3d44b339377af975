// CPU kernels of the deformable im2col (DCNv1 / DCNv2): plain computations on raw pointers,
// templated on the stored element type (float, double, Float16, BFloat16). Each function computes
// one slice of the work (a range of positions, one task of a fixed partition); the FFI handlers
// (deform_conv_ffi.cc) spread the slices over threads. Every slice writes a disjoint part of the
// outputs, so results do not depend on the threads.

#ifndef FLAXDCN_XLA_EXT_CPU_DEFORM_CONV_KERNELS_H_
#define FLAXDCN_XLA_EXT_CPU_DEFORM_CONV_KERNELS_H_

#include <cstdint>

#include "xla_ext/common/deform_conv.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {

// Columns [N, Ho, Wo, K, C] for output positions [begin, end) of the N * Ho * Wo positions.
// `mask` is ignored unless p.has_mask.
template <typename T>
void DeformIm2colCpu(const ConvParams& p, const T* input, const T* offset, const T* mask,
                     T* columns, int64_t begin, int64_t end);

// Backward, stage 1 of 2, task `task` of the partition (image n, offset group g, channel block b)
// with `blocks` blocks per group: writes grad-input for the block's channels of image n (the
// region is fully overwritten) and, for each sample of (n, g), the block's four channel
// reductions <grad_column, input corner q> into partial[(sample * blocks + b) * 4 + q].
template <typename T>
void DeformIm2colBackwardInputCpu(const ConvParams& p, int64_t blocks, int64_t task,
                                  const T* grad_columns, const T* input, const T* offset,
                                  const T* mask, T* grad_input, AccType<T>* partial);

// Backward, stage 2 of 2: grad-offset and grad-mask of the samples of output positions
// [begin, end), summing the blocks' partial reductions in block order. `grad_mask` is ignored
// unless p.has_mask.
template <typename T>
void DeformIm2colBackwardCoordCpu(const ConvParams& p, int64_t blocks, const AccType<T>* partial,
                                  const T* offset, const T* mask, T* grad_offset, T* grad_mask,
                                  int64_t begin, int64_t end);

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CPU_DEFORM_CONV_KERNELS_H_
