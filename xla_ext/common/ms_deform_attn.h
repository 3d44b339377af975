// Multi-scale deformable attention (Deformable DETR): the problem description and the sample
// location, shared by the CPU kernels, the CUDA kernels and the FFI handlers. The bilinear read
// is DCN's (sampling.h): each level is a zero-padded image, the attention weight its mask.

#ifndef FLAXDCN_XLA_EXT_COMMON_MS_DEFORM_ATTN_H_
#define FLAXDCN_XLA_EXT_COMMON_MS_DEFORM_ATTN_H_

#include <cstdint>

#include "xla_ext/common/base.h"
#include "xla_ext/common/sampling.h"

namespace flaxdcn {

// The most levels one call takes: the level table travels in the parameters (by value, into the
// CUDA kernels' parameter space), so its size is fixed. Deformable DETR and its descendants use 4
// or 5.
constexpr int64_t kMsDeformAttnMaxLevels = 16;

// value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] as (x, y) in the accumulation type,
// attention_weights [N, Lq, M, L, P], out [N, Lq, M, D]. Level l occupies value rows
// [level_start[l], level_start[l] + height[l] * width[l]), row-major (h, w).
//
// One sample is one (n, q, m, l, p), numbered in that order: its location is at
// sampling_locations[2 * sample] (x, then y), its weight at attention_weights[sample]. The names
// `channels` and `group_channels()` are those of the channel helpers shared with the conv kernels
// (a value row holds M heads of D channels, as an input pixel holds G groups).
struct MsDeformAttnParams {
  int64_t batch;          // N
  int64_t values;         // S = sum_l height[l] * width[l]
  int64_t heads;          // M
  int64_t head_channels;  // D
  int64_t channels;       // M * D: the stride of one value row
  int64_t queries;        // Lq
  int64_t levels;         // L, at most kMsDeformAttnMaxLevels
  int64_t points;         // P
  int64_t height[kMsDeformAttnMaxLevels];
  int64_t width[kMsDeformAttnMaxLevels];
  int64_t level_start[kMsDeformAttnMaxLevels];

  FLAXDCN_HD int64_t group_channels() const { return head_channels; }
  // (n, q, m): the rows of the output, each the sum over L * P samples.
  FLAXDCN_HD int64_t units() const { return batch * queries * heads; }
  FLAXDCN_HD int64_t samples() const { return units() * levels * points; }
};

// Pixel coordinates of location (x, y) on a level of height x width (grid_sample with
// align_corners=False): w = x * W - 0.5, h = y * H - 0.5. The products round on their own in
// every build (MulRn): a fused multiply-add could move a coordinate that lies just below an
// integer onto it, which moves the read by a pixel.
template <typename A>
FLAXDCN_HD void MsDeformAttnLocation(A x, A y, int64_t height, int64_t width, A* h, A* w) {
  *w = MulRn(x, A(width)) - A(0.5);
  *h = MulRn(y, A(height)) - A(0.5);
}

// The bilinear read of location (x, y) on `level`, weighted by the attention weight `weight`.
// Invalid (weights and corners all dropped) when h <= -1, h >= H, w <= -1 or w >= W, or when a
// coordinate is not finite (NaN fails every comparison, and +-Inf fails the range).
template <typename A>
FLAXDCN_HD ConvSample<A> MsDeformAttnSample(const MsDeformAttnParams& p, int64_t level, A x, A y,
                                            A weight) {
  A h, w;
  MsDeformAttnLocation(x, y, p.height[level], p.width[level], &h, &w);
  return MakeConvSample<A>(h, w, weight, p.height[level], p.width[level]);
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_MS_DEFORM_ATTN_H_
