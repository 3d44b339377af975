// The deformable RoI pooling problem, shared by the CPU kernels, the CUDA kernels and the FFI
// handlers. The bin geometry and the bilinear read are in sampling.h.

#ifndef FLAXDCN_XLA_EXT_COMMON_ROI_POOL_H_
#define FLAXDCN_XLA_EXT_COMMON_ROI_POOL_H_

#include <cstdint>

#include "xla_ext/common/base.h"

namespace flaxdcn {

// One deformable RoI pooling: features [N, H, W, C], rois [R, 5] = (batch_index, x1, y1, x2, y2)
// in the accumulation type, offsets [R, Ho, Wo, 2] as (dy, dx) (when has_offsets), pooled
// [R, Ho, Wo, C]. Per-image form (rois_per_image > 0): rois [N, rois_per_image, 4] =
// (x1, y1, x2, y2) of image r / rois_per_image, R = N * rois_per_image, the other buffers laid out
// as [R, ...] all the same.
struct RoiPoolParams {
  int64_t batch;
  int64_t height;
  int64_t width;
  int64_t channels;
  int64_t rois;
  int64_t out_height;
  int64_t out_width;
  double spatial_scale;
  int64_t sampling_ratio;  // > 0: fixed sub-grid per bin; otherwise ceil(bin size)
  double gamma;
  bool has_offsets;
  int64_t rois_per_image = 0;  // 0: rois [R, 5] with a batch index; > 0: rois [N, this, 4]

  FLAXDCN_HD int64_t bins() const { return rois * out_height * out_width; }
};

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_ROI_POOL_H_
