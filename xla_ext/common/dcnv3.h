// DCNv3 / DCNv4 problem description and the sample location, shared by the CPU kernels, the CUDA
// kernels and the FFI handlers. The window is DCN's (deform_conv.h), and so is the bilinear read
// (sampling.h).

#ifndef FLAXDCN_XLA_EXT_COMMON_DCNV3_H_
#define FLAXDCN_XLA_EXT_COMMON_DCNV3_H_

#include <cstdint>

#include "xla_ext/common/base.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/sampling.h"

namespace flaxdcn {

// inputs [N, H, W, C] -> out [N, Ho, Wo, C]; G groups of C / G channels; P points.
//
// Offsets and mask are addressed by strides, so one kernel serves both layouts:
//   dx of (position np, group g, point k) at offset[np * offset_stride + g * offset_group_stride
//   + 2 * k], dy one further; its mask at mask[np * mask_stride + g * mask_group_stride + k].
// DCNv3: offsets [N, Ho, Wo, G * P * 2] (strides G*P*2, 2P), mask [N, Ho, Wo, G * P] (G*P, P).
// DCNv4: one offset_mask [N, Ho, Wo, D] (strides D, 3P for both), mask = offset_mask + 2P, and
// the channels [3GP, D) of each position are padding (their gradient is written as 0).
struct Dcnv3Params : ConvShape, ConvWindow {
  int64_t groups;
  double offset_scale;
  bool remove_center;
  int64_t offset_stride;
  int64_t offset_group_stride;
  int64_t mask_stride;
  int64_t mask_group_stride;
  int64_t pad_channels_begin;  // DCNv4: [begin, offset_stride) of each row are padding; else 0

  FLAXDCN_HD int64_t points() const {
    return kernel_h * kernel_w - (remove_center ? 1 : 0);
  }
  FLAXDCN_HD int64_t group_channels() const { return channels / groups; }
  // One sample is one (n, y, x, g, k): the unit that owns a set of bilinear weights.
  FLAXDCN_HD int64_t samples() const { return batch * positions() * groups * points(); }
};

// Sets the strides of `p` (whose shapes and geometry are set) for DCNv3's offsets and mask
// (dcnv4 false) or DCNv4's offset_mask, D = G * P * 3 rounded up to a multiple of 8 (dcnv4 true).
inline void SetDcnv3Layout(Dcnv3Params* p, bool dcnv4) {
  const int64_t points = p->points();
  const int64_t gp = p->groups * points;
  if (!dcnv4) {
    p->offset_stride = gp * 2;
    p->offset_group_stride = points * 2;
    p->mask_stride = gp;
    p->mask_group_stride = points;
    p->pad_channels_begin = 0;
  } else {
    const int64_t d = (gp * 3 + 7) / 8 * 8;
    p->offset_stride = p->mask_stride = d;
    p->offset_group_stride = p->mask_group_stride = points * 3;
    p->pad_channels_begin = gp * 3 < d ? gp * 3 : 0;
  }
}

// Kernel column i and row j of point k: column-major (k = i * kh + j), skipping the centre
// (kw / 2, kh / 2) -- index kh * kw / 2 for odd kernels -- with remove_center.
FLAXDCN_HD void Dcnv3Point(const Dcnv3Params& p, int64_t k, int64_t* i, int64_t* j) {
  if (p.remove_center && k >= p.kernel_h * p.kernel_w / 2) ++k;
  *i = k / p.kernel_h;
  *j = k % p.kernel_h;
}

// Sample location of output (y, x), point (i, j), offset (dx, dy):
//   w = x * sw - pw + c_w + (i * dw - c_w + dx) * s,  c_w = (dw * (kw - 1)) / 2; h likewise.
// The product rounds on its own in every build (MulRn): with s != 1 a fused multiply-add (nvcc's
// default) can land a sample on the other side of an integer than separate roundings do, which
// moves the read by a pixel and its offset gradient by O(1).
template <typename A>
FLAXDCN_HD void Dcnv3Location(const Dcnv3Params& p, int64_t y, int64_t x, int64_t i, int64_t j,
                              A dx, A dy, A* h, A* w) {
  const int64_t c_h = (p.dilation_h * (p.kernel_h - 1)) / 2;
  const int64_t c_w = (p.dilation_w * (p.kernel_w - 1)) / 2;
  const A s = A(p.offset_scale);
  *h = A(y * p.stride_h - p.pad_h + c_h) + MulRn(A(j * p.dilation_h - c_h) + dy, s);
  *w = A(x * p.stride_w - p.pad_w + c_w) + MulRn(A(i * p.dilation_w - c_w) + dx, s);
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_DCNV3_H_
