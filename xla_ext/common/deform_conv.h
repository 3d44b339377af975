// The deformable im2col problem (DCNv1 / DCNv2) and the convolution window it shares with DCNv3,
// used by the CPU kernels, the CUDA kernels and the FFI handlers. The bilinear read is in
// sampling.h.

#ifndef FLAXDCN_XLA_EXT_COMMON_DEFORM_CONV_H_
#define FLAXDCN_XLA_EXT_COMMON_DEFORM_CONV_H_

#include <cstdint>

#include "xla_ext/common/base.h"

namespace flaxdcn {

// The sliding window of a convolution. The attributes of the deformable conv and DCNv3 targets
// decode into it (common/<op>_ffi.h), and their problems extend it.
struct ConvWindow {
  int64_t kernel_h;
  int64_t kernel_w;
  int64_t stride_h;
  int64_t stride_w;
  int64_t pad_h;  // padding before the first row
  int64_t pad_w;  // padding before the first column
  int64_t dilation_h;
  int64_t dilation_w;
};

// The feature maps of a convolution: inputs [N, H, W, C], outputs [N, Ho, Wo, ...].
struct ConvShape {
  int64_t batch;
  int64_t height;
  int64_t width;
  int64_t channels;
  int64_t out_height;
  int64_t out_width;

  FLAXDCN_HD int64_t positions() const { return out_height * out_width; }
};

// One deformable im2col: inputs [N, H, W, C], offsets [N, Ho, Wo, G * K * 2] in (g, i, j, (dy, dx))
// order, mask [N, Ho, Wo, G * K] (when has_mask), columns [N, Ho, Wo, K, C], K = kh * kw.
struct ConvParams : ConvShape, ConvWindow {
  int64_t offset_groups;
  bool has_mask;

  FLAXDCN_HD int64_t kernel_points() const { return kernel_h * kernel_w; }
  FLAXDCN_HD int64_t group_channels() const { return channels / offset_groups; }
  // One sample is one (n, y, x, i, j, g): the unit that owns a set of bilinear weights.
  FLAXDCN_HD int64_t samples() const {
    return batch * positions() * kernel_points() * offset_groups;
  }
};

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_DEFORM_CONV_H_
