// The sampling core shared by the CPU and the CUDA kernels: where a sample reads, with which
// bilinear weights, and the derivative of that read with respect to its coordinates.
//
// Everything here is per sample (one set of weights), never per channel: the kernels apply the
// weights to contiguous channel vectors (channels-last layout). `A` is the accumulation and
// coordinate type: float for float32/float16/bfloat16 data, double for float64.
//
// Corner order q: 0 = (top, left), 1 = (top, right), 2 = (bottom, left), 3 = (bottom, right).

#ifndef FLAXDCN_XLA_EXT_COMMON_SAMPLING_H_
#define FLAXDCN_XLA_EXT_COMMON_SAMPLING_H_

#include <math.h>

#include <cstdint>
#include <type_traits>

#include "xla_ext/common/base.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/roi_pool.h"

namespace flaxdcn {

// a * b rounded to A on its own, never fused with an addition that takes it. nvcc contracts
// x + a * b into one fused multiply-add (one rounding), and so does a host compiler with FMA
// hardware under -ffp-contract=fast (GCC's default outside ISO mode: aarch64, or x86-64 with
// -mfma), while a baseline x86-64 build rounds twice. Sample coordinates decide which pixels a
// read takes (floor, truncation, the range tests): the shared code forms every product that feeds
// a coordinate here, so that CPU, CUDA and emulated builds compute each coordinate bit for bit
// alike, two roundings everywhere. On the device, __fmul_rn / __dmul_rn are never contracted; on
// the host, an empty asm that may rewrite the product hides it from the contraction.
template <typename A>
FLAXDCN_HD A MulRn(A a, A b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<A, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  A product = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || (defined(__i386__) && defined(__SSE2__)))
  __asm__("" : "+x"(product));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(product));
#elif defined(__GNUC__)
  __asm__("" : "+m"(product));
#else
  volatile A opaque = product;
  product = opaque;
#endif
  return product;
#endif
}

FLAXDCN_HD float Floor(float x) { return floorf(x); }
FLAXDCN_HD double Floor(double x) { return floor(x); }
FLAXDCN_HD float Ceil(float x) { return ceilf(x); }
FLAXDCN_HD double Ceil(double x) { return ceil(x); }

// ---------------------------------------------------------------------------------------------
// Deformable convolution: bilinear read of the zero-padded image.
//
// Boundary rule: a sample with h <= -1, h >= H, w <= -1 or w >= W reads 0 and has zero gradient;
// inside that range each of the four corners contributes only if it lies in the image. The tests
// are written so that a NaN coordinate compares false and lands in the dropped case, and the
// integer corner rows are only formed after the range check, so huge, Inf or NaN offsets never
// produce an out-of-range pixel index.
// ---------------------------------------------------------------------------------------------

template <typename A>
struct ConvSample {
  int64_t pixel[4];  // row * W + column of each corner; -1 for a corner outside the image
  A weight[4];       // bilinear weight times mask; 0 for a corner outside the image
  A frac_h;          // h - floor(h)
  A frac_w;          // w - floor(w)
  bool valid;        // -1 < h < H and -1 < w < W
};

template <typename A>
FLAXDCN_HD ConvSample<A> MakeConvSample(A h, A w, A mask, int64_t height, int64_t width) {
  ConvSample<A> s;
  s.valid = h > A(-1) && h < A(height) && w > A(-1) && w < A(width);
  if (!s.valid) {
    for (int q = 0; q < 4; ++q) {
      s.pixel[q] = -1;
      s.weight[q] = A(0);
    }
    s.frac_h = s.frac_w = A(0);
    return s;
  }
  // h is in (-1, H), so floor(h) is an integer in [-1, H - 1]: the cast is exact.
  const A h0 = Floor(h);
  const A w0 = Floor(w);
  const int64_t row = static_cast<int64_t>(h0);
  const int64_t col = static_cast<int64_t>(w0);
  s.frac_h = h - h0;
  s.frac_w = w - w0;
  // Same association as the jnp implementation: ((1 - lh) * m) * (1 - lw), ...
  const A top = (A(1) - s.frac_h) * mask;
  const A bottom = s.frac_h * mask;
  const A left = A(1) - s.frac_w;
  const A right = s.frac_w;
  const bool has_top = row >= 0;
  const bool has_bottom = row + 1 < height;
  const bool has_left = col >= 0;
  const bool has_right = col + 1 < width;
  const int64_t base = row * width + col;
  s.pixel[0] = has_top && has_left ? base : -1;
  s.pixel[1] = has_top && has_right ? base + 1 : -1;
  s.pixel[2] = has_bottom && has_left ? base + width : -1;
  s.pixel[3] = has_bottom && has_right ? base + width + 1 : -1;
  s.weight[0] = s.pixel[0] >= 0 ? top * left : A(0);
  s.weight[1] = s.pixel[1] >= 0 ? top * right : A(0);
  s.weight[2] = s.pixel[2] >= 0 ? bottom * left : A(0);
  s.weight[3] = s.pixel[3] >= 0 ? bottom * right : A(0);
  return s;
}

// Sample coordinates of sample (y, x, i, j) before the offset is added.
FLAXDCN_HD int64_t ConvBaseRow(const ConvParams& p, int64_t y, int64_t i) {
  return y * p.stride_h - p.pad_h + i * p.dilation_h;
}
FLAXDCN_HD int64_t ConvBaseCol(const ConvParams& p, int64_t x, int64_t j) {
  return x * p.stride_w - p.pad_w + j * p.dilation_w;
}

template <typename A>
struct ConvSampleGrad {
  A h;     // d value / d dy
  A w;     // d value / d dx
  A mask;  // d value / d mask
};

// Gradients of `value = sum_q weight_q * v_q` given dot[q] = <grad_column, image[corner q]>, the
// channel reductions of the cotangent against each corner (0 for corners outside the image).
template <typename A>
FLAXDCN_HD ConvSampleGrad<A> ConvSampleBackward(const ConvSample<A>& s, A mask, const A dot[4]) {
  if (!s.valid) return {A(0), A(0), A(0)};
  const A lh = s.frac_h;
  const A lw = s.frac_w;
  ConvSampleGrad<A> g;
  g.mask = (A(1) - lh) * ((A(1) - lw) * dot[0] + lw * dot[1]) +
           lh * ((A(1) - lw) * dot[2] + lw * dot[3]);
  g.h = mask * ((A(1) - lw) * (dot[2] - dot[0]) + lw * (dot[3] - dot[1]));
  g.w = mask * ((A(1) - lh) * (dot[1] - dot[0]) + lh * (dot[3] - dot[2]));
  return g;
}

// ---------------------------------------------------------------------------------------------
// Deformable RoI pooling (mmcv DeformRoIPool): RoIAlign reads averaged over a sub-grid per bin.
//
// Boundary rule of RoIAlign: 0 outside [-1, H] x [-1, W] (NaN falls out of the range check);
// inside, a coordinate below 0 reads row/column 0 and one at or past H - 1 (W - 1) reads the last
// row/column, and a clamped coordinate does not move the read (its slope is 0). These are the
// exact derivatives of the forward read.
// ---------------------------------------------------------------------------------------------

template <typename A>
struct RoiSample {
  int64_t pixel[4];  // corner pixels; coincide pairwise where a coordinate is clamped
  A weight[4];       // bilinear weights (all 0 when the sample is outside)
  A frac_h;          // ly
  A frac_w;          // lx
  A slope_h;         // 1 where the read moves with y, 0 where y is clamped
  A slope_w;
  bool valid;
};

template <typename A>
FLAXDCN_HD RoiSample<A> MakeRoiSample(A y, A x, int64_t height, int64_t width) {
  RoiSample<A> s;
  s.valid = y >= A(-1) && y <= A(height) && x >= A(-1) && x <= A(width);
  if (!s.valid) {
    for (int q = 0; q < 4; ++q) {
      s.pixel[q] = 0;
      s.weight[q] = A(0);
    }
    s.frac_h = s.frac_w = s.slope_h = s.slope_w = A(0);
    return s;
  }
  s.slope_h = s.slope_w = A(1);
  if (y <= A(0)) {
    y = A(0);
    s.slope_h = A(0);
  }
  if (x <= A(0)) {
    x = A(0);
    s.slope_w = A(0);
  }
  // y is in [0, H] here, so the truncation is exact and in range.
  int64_t y_low = static_cast<int64_t>(y);
  int64_t x_low = static_cast<int64_t>(x);
  int64_t y_high = y_low + 1;
  int64_t x_high = x_low + 1;
  if (y_low >= height - 1) {
    y_low = y_high = height - 1;
    y = A(y_low);
    s.slope_h = A(0);
  }
  if (x_low >= width - 1) {
    x_low = x_high = width - 1;
    x = A(x_low);
    s.slope_w = A(0);
  }
  s.frac_h = y - A(y_low);
  s.frac_w = x - A(x_low);
  const A hy = A(1) - s.frac_h;
  const A hx = A(1) - s.frac_w;
  s.pixel[0] = y_low * width + x_low;
  s.pixel[1] = y_low * width + x_high;
  s.pixel[2] = y_high * width + x_low;
  s.pixel[3] = y_high * width + x_high;
  s.weight[0] = hy * hx;
  s.weight[1] = hy * s.frac_w;
  s.weight[2] = s.frac_h * hx;
  s.weight[3] = s.frac_h * s.frac_w;
  return s;
}

// d value / d y and d value / d x of one read, given dot[q] = <grad_pooled, features[corner q]>.
template <typename A>
FLAXDCN_HD void RoiSampleBackward(const RoiSample<A>& s, const A dot[4], A* grad_y, A* grad_x) {
  if (!s.valid) {
    *grad_y = *grad_x = A(0);
    return;
  }
  const A ly = s.frac_h;
  const A lx = s.frac_w;
  *grad_y = s.slope_h * ((A(1) - lx) * (dot[2] - dot[0]) + lx * (dot[3] - dot[1]));
  *grad_x = s.slope_w * ((A(1) - ly) * (dot[1] - dot[0]) + ly * (dot[3] - dot[2]));
}

// Whether x is finite (neither Inf nor NaN), on host and device alike.
template <typename A>
FLAXDCN_HD bool IsFinite(A x) {
  return x - x == A(0);
}

// Geometry of one output bin: a sub-grid of grid_h x grid_w reads at
// (origin_h + (iy + 0.5) * step_h, origin_w + (ix + 0.5) * step_w), averaged.
template <typename A>
struct RoiBin {
  bool valid;        // finite RoI naming an image of the batch, finite origin, non-empty sub-grid
  int64_t image;     // that image
  A origin_h;        // start + bin index * bin size + gamma * roi size * offset
  A origin_w;
  A step_h;          // bin size / grid
  A step_w;
  A roi_h;           // RoI size (scales the normalised offset)
  A roi_w;
  A scale;           // 1 / max(grid_h * grid_w, 1); the grid is fixed before the offset applies
  // The only samples that can read inside [-1, H] x [-1, W]; the sub-grid itself may be huge.
  int64_t iy_begin;
  int64_t iy_end;
  int64_t ix_begin;
  int64_t ix_end;
};

// Samples [begin, end) of a sub-grid of `grid` samples at origin + (i + 0.5) * step that can land
// in [-1, size]: at most (size + 1) / step + 4 of them, and step > 1/2 for adaptive grids of two or
// more samples, so the loop is bounded by the image, not by the RoI. One sample of margin on each
// side absorbs rounding; the per-sample range test stays exact.
template <typename A>
FLAXDCN_HD void SampleRange(A origin, A step, A grid, int64_t size, int64_t* begin,
                            int64_t* end) {
  A lo = A(0);
  A hi = grid;
  if (step > A(0)) {
    const A first = Floor((A(-1) - origin) / step - A(0.5)) - A(1);
    const A last = Ceil((A(size) - origin) / step - A(0.5)) + A(2);
    if (first > lo) lo = first;
    if (last < hi) hi = last;
  }
  // Past 2^52 sample indices are not exact in any float type; such a RoI reads nothing.
  if (!(hi > lo) || !(lo < A(4503599627370496.0))) {
    *begin = *end = 0;
    return;
  }
  *begin = static_cast<int64_t>(lo);
  *end = static_cast<int64_t>(hi);
}

// Bin (ph, pw) of RoI r shifted by its normalised offset (dy, dx) (ignored unless p.has_offsets).
// `rois` holds rows (batch_index, x1, y1, x2, y2), or, when p.rois_per_image > 0, rows
// (x1, y1, x2, y2) of image r / rois_per_image; there an empty box (not x1 < x2 and y1 < y2: the
// padding of a fixed number of boxes per image) reads nothing.
template <typename A>
FLAXDCN_HD RoiBin<A> MakeRoiBin(const A* rois, int64_t r, int64_t ph, int64_t pw, A dy, A dx,
                                const RoiPoolParams& p) {
  RoiBin<A> b;
  const bool per_image = p.rois_per_image > 0;
  const A* box = per_image ? rois + r * 4 : rois + r * 5 + 1;  // (x1, y1, x2, y2)
  bool ok = true;
  for (int k = 0; k < 4; ++k) ok = ok && IsFinite(box[k]);
  if (per_image) {
    ok = ok && box[0] < box[2] && box[1] < box[3];
    b.image = r / p.rois_per_image;
  } else {
    // The batch index is truncated toward zero, as a C cast would; outside [0, N): no image.
    const A index = rois[r * 5];
    ok = ok && IsFinite(index) && index > A(-1) && index < A(p.batch);
    b.image = ok ? static_cast<int64_t>(index) : 0;
  }
  // Products that feed a coordinate round on their own (MulRn): no build fuses them.
  const A scale = A(p.spatial_scale);
  const A start_w = MulRn(box[0], scale) - A(0.5);
  const A start_h = MulRn(box[1], scale) - A(0.5);
  const A end_w = MulRn(box[2], scale) - A(0.5);
  const A end_h = MulRn(box[3], scale) - A(0.5);
  b.roi_w = end_w - start_w;
  b.roi_h = end_h - start_h;
  const A bin_h = b.roi_h / A(p.out_height);
  const A bin_w = b.roi_w / A(p.out_width);
  const A grid_h = p.sampling_ratio > 0 ? A(p.sampling_ratio) : Ceil(bin_h);
  const A grid_w = p.sampling_ratio > 0 ? A(p.sampling_ratio) : Ceil(bin_w);
  ok = ok && IsFinite(bin_h) && IsFinite(bin_w) && grid_h > A(0) && grid_w > A(0);
  b.origin_h = start_h + MulRn(A(ph), bin_h);
  b.origin_w = start_w + MulRn(A(pw), bin_w);
  if (p.has_offsets) {
    const A gamma = A(p.gamma);
    b.origin_h = b.origin_h + MulRn(gamma * b.roi_h, dy);
    b.origin_w = b.origin_w + MulRn(gamma * b.roi_w, dx);
  }
  ok = ok && IsFinite(b.origin_h) && IsFinite(b.origin_w);
  b.valid = ok;
  if (!ok) {
    b.origin_h = b.origin_w = b.roi_h = b.roi_w = b.scale = A(0);
    b.step_h = b.step_w = A(1);
    b.iy_begin = b.iy_end = b.ix_begin = b.ix_end = 0;
    return b;
  }
  b.step_h = bin_h / grid_h;
  b.step_w = bin_w / grid_w;
  const A count = grid_h * grid_w;
  b.scale = A(1) / (count > A(1) ? count : A(1));
  SampleRange(b.origin_h, b.step_h, grid_h, p.height, &b.iy_begin, &b.iy_end);
  SampleRange(b.origin_w, b.step_w, grid_w, p.width, &b.ix_begin, &b.ix_end);
  return b;
}

// Coordinate of sample i of a sub-grid (the product rounded on its own, see MulRn).
template <typename A>
FLAXDCN_HD A RoiSampleCoord(A origin, A step, int64_t i) {
  return origin + MulRn(A(i) + A(0.5), step);
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_SAMPLING_H_
