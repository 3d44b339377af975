// Grad-input accumulation buffers of the CUDA backward kernels: workspace layout, preparation and
// the final conversion into the gradient's dtype.
//
// Grad-input accumulation (a scatter: any sample may hit any pixel) has two modes:
//  - atomic (default): float atomics into a float32 buffer (into grad-input itself for float32 and
//    float64). Fast; the summation order, hence the last bits, vary from run to run.
//  - deterministic: every contribution is rounded to 64-bit fixed point, scaled from a bound of
//    the largest possible sum computed on the device (max |cotangent| x max |mask| x the most
//    samples that can reach one pixel), and added with integer atomics, which commute. The result
//    is bitwise reproducible; its error is at most 2^-62 of that bound per contribution. Non-finite
//    contributions are summed separately (Inf/NaN absorb, so that sum is order-independent too).
//    Cost: one extra pass over the cotangent for its maximum, 64-bit atomics, a final conversion
//    pass, and 8 + sizeof(accumulator) bytes of workspace per grad-input element.

#ifndef FLAXDCN_XLA_EXT_CUDA_ACCUMULATE_H_
#define FLAXDCN_XLA_EXT_CUDA_ACCUMULATE_H_

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "xla_ext/common/base.h"

namespace flaxdcn {

// Alignment of the backward launchers' workspace: the most XLA's scratch allocator grants (it
// rejects larger alignments), and all the kernels need (16-byte vectors at the widest).
constexpr size_t kWorkspaceAlignment = 16;

namespace cuda {

struct FixedScale;  // common.cuh

struct GradBuffers {
  void* atomic;                 // atomic mode: accumulation-type sums (grad itself for f32/f64)
  unsigned long long* fixed;    // fixed-point mode: 64-bit sums
  void* special;                // fixed-point mode: non-finite sums, accumulation type
  unsigned long long* max_bits;  // fixed-point mode: [2] bit patterns of max |.| as double
  FixedScale* scale;            // fixed-point mode: fixed-point units per unit
};

// Workspace bytes for a gradient of `elements` elements.
size_t GradWorkspaceBytes(ElementType type, int64_t elements, bool deterministic);

// Lays the buffers out in `workspace` and zeroes them.
cudaError_t PrepareGrad(cudaStream_t stream, ElementType type, int64_t elements,
                        bool deterministic, void* workspace, void* grad, GradBuffers* buffers);

// Fixed-point mode: max_bits[slot] = max |x| over the finite entries of x[0, n).
cudaError_t LaunchMaxAbs(cudaStream_t stream, ElementType type, const void* x, int64_t n,
                         unsigned long long* max_bits, int slot);

// Fixed-point mode: scale = 2^(62 - e) with max_bits[0] * (max_bits[1] if use_second, else 1)
// * factor < 2^e, so that any sum of `factor` contributions bounded by the product of the two
// maxima fits in 63 bits. Exact for every finite maximum, from 0 and subnormals to DBL_MAX.
cudaError_t LaunchFixedPointScale(cudaStream_t stream, const GradBuffers& buffers,
                                  bool use_second, double factor);

// Fixed-point mode: the scale of sums of `factor` contributions, each at most max |cotangent|
// (over its `cotangent_count` values) times max |mask| (over its `mask_count` values; 1 when
// `mask` is null): LaunchMaxAbs into slots 0 and 1, then LaunchFixedPointScale.
cudaError_t LaunchContributionScale(cudaStream_t stream, ElementType type,
                                    const GradBuffers& buffers, const void* cotangent,
                                    int64_t cotangent_count, const void* mask,
                                    int64_t mask_count, double factor);

// Writes the gradient in its dtype from the accumulation buffers.
cudaError_t FinishGrad(cudaStream_t stream, ElementType type, int64_t elements,
                       bool deterministic, const GradBuffers& buffers, void* grad);

}  // namespace cuda
}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CUDA_ACCUMULATE_H_
