// Grad-input accumulation buffers of the CUDA backward kernels (see cuda_kernels.h for the two
// modes): workspace layout, preparation and the final conversion into the gradient's dtype.

#ifndef FLAXDCN_XLA_EXT_CUDA_ACCUMULATE_H_
#define FLAXDCN_XLA_EXT_CUDA_ACCUMULATE_H_

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "xla_ext/common/base.h"

namespace flaxdcn {
namespace cuda {

struct FixedScale;  // cuda_common.cuh

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

// Writes the gradient in its dtype from the accumulation buffers.
cudaError_t FinishGrad(cudaStream_t stream, ElementType type, int64_t elements,
                       bool deterministic, const GradBuffers& buffers, void* grad);

}  // namespace cuda
}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CUDA_ACCUMULATE_H_
