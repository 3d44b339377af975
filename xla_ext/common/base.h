// Problem descriptions shared by the CPU kernels, the CUDA kernels and the FFI handlers.
//
// Plain structs of 64-bit sizes: every index product (pixel * channels, sample * channels,
// batch * height * width * channels) is formed in int64_t, because a batch of feature maps easily
// passes 2^31 elements while each factor stays small.

#ifndef FLAXDCN_XLA_EXT_PARAMS_H_
#define FLAXDCN_XLA_EXT_PARAMS_H_

#include <cstdint>

// Functions shared by host and device code.
#if defined(__CUDACC__)
#define FLAXDCN_HD __host__ __device__ __forceinline__
#else
#define FLAXDCN_HD inline
#endif

namespace flaxdcn {

// Element types of the arrays a kernel reads and writes.
enum class ElementType { kF32, kF64, kF16, kBF16 };

// One deformable im2col: inputs [N, H, W, C], offsets [N, Ho, Wo, G * K * 2] in (g, i, j, (dy, dx))
// order, mask [N, Ho, Wo, G * K] (when has_mask), columns [N, Ho, Wo, K, C], K = kh * kw.
struct ConvParams {
  int64_t batch;
  int64_t height;
  int64_t width;
  int64_t channels;
  int64_t out_height;
  int64_t out_width;
  int64_t kernel_h;
  int64_t kernel_w;
  int64_t stride_h;
  int64_t stride_w;
  int64_t pad_h;  // padding before the first row
  int64_t pad_w;  // padding before the first column
  int64_t dilation_h;
  int64_t dilation_w;
  int64_t offset_groups;
  bool has_mask;

  FLAXDCN_HD int64_t kernel_points() const { return kernel_h * kernel_w; }
  FLAXDCN_HD int64_t positions() const { return out_height * out_width; }
  FLAXDCN_HD int64_t group_channels() const { return channels / offset_groups; }
  // One sample is one (n, y, x, i, j, g): the unit that owns a set of bilinear weights.
  FLAXDCN_HD int64_t samples() const {
    return batch * positions() * kernel_points() * offset_groups;
  }
};

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

#endif  // FLAXDCN_XLA_EXT_PARAMS_H_
