#include "xla_ext/cpu/deform_conv_kernels.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "xla_ext/cpu/types.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/sampling.h"

namespace flaxdcn {
namespace {

// Interleaved partial sums of the channel reductions (a multiple of the SIMD width).
constexpr int kLanes = 8;

// The sample of output (y, x) of position np = n * Ho * Wo + y * Wo + x, kernel point (i, j) and
// offset group g, with its mask. Callers iterate y, x, i, j directly: no division per sample.
template <typename T>
ConvSample<AccType<T>> LoadConvSample(const ConvParams& p, const T* offset, const T* mask,
                                      int64_t np, int64_t y, int64_t x, int64_t i, int64_t j,
                                      int64_t g, AccType<T>* mask_value) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t kernel_points = p.kernel_points();
  const int64_t channel = g * kernel_points + i * p.kernel_w + j;  // (g, i, j) order
  const int64_t base = np * p.offset_groups * kernel_points + channel;
  const A m = p.has_mask ? E::Load(mask[base]) : A(1);
  const A h = A(ConvBaseRow(p, y, i)) + E::Load(offset[base * 2]);
  const A w = A(ConvBaseCol(p, x, j)) + E::Load(offset[base * 2 + 1]);
  *mask_value = m;
  return MakeConvSample<A>(h, w, m, p.height, p.width);
}

// For c in [0, width): out_q[c] += grad[c] * weight[q], and dots[q] = sum_c grad[c] * in_q[c].
// The reductions run in kLanes interleaved partial sums, added in lane order at the end, so the
// loop vectorises without reassociating float math. The restrict-qualified parameters state what
// the callers guarantee: the four output rows are distinct pixels (or distinct sink rows).
template <typename T>
inline void ScatterAndReduce(int64_t width, const T* __restrict grad, const T* __restrict in0,
                             const T* __restrict in1, const T* __restrict in2,
                             const T* __restrict in3, const AccType<T>* weight,
                             AccType<T>* __restrict out0, AccType<T>* __restrict out1,
                             AccType<T>* __restrict out2, AccType<T>* __restrict out3,
                             AccType<T>* dots) {
  using A = AccType<T>;
  using E = Element<T>;
  const A w0 = weight[0], w1 = weight[1], w2 = weight[2], w3 = weight[3];
  A p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= width; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A gv = E::Load(grad[c + l]);
      p0[l] += gv * E::Load(in0[c + l]);
      p1[l] += gv * E::Load(in1[c + l]);
      p2[l] += gv * E::Load(in2[c + l]);
      p3[l] += gv * E::Load(in3[c + l]);
      out0[c + l] += gv * w0;
      out1[c + l] += gv * w1;
      out2[c + l] += gv * w2;
      out3[c + l] += gv * w3;
    }
  }
  for (int l = 0; c < width; ++c, ++l) {
    const A gv = E::Load(grad[c]);
    p0[l] += gv * E::Load(in0[c]);
    p1[l] += gv * E::Load(in1[c]);
    p2[l] += gv * E::Load(in2[c]);
    p3[l] += gv * E::Load(in3[c]);
    out0[c] += gv * w0;
    out1[c] += gv * w1;
    out2[c] += gv * w2;
    out3[c] += gv * w3;
  }
  A d0 = 0, d1 = 0, d2 = 0, d3 = 0;
  for (int l = 0; l < kLanes; ++l) {
    d0 += p0[l];
    d1 += p1[l];
    d2 += p2[l];
    d3 += p3[l];
  }
  dots[0] = d0;
  dots[1] = d1;
  dots[2] = d2;
  dots[3] = d3;
}

// out[c] = sum_q weight[q] * in_q[c] for c in [0, width).
template <typename T>
inline void BilinearRow(int64_t width, const T* __restrict in0, const T* __restrict in1,
                        const T* __restrict in2, const T* __restrict in3,
                        const AccType<T>* weight, T* __restrict out) {
  using A = AccType<T>;
  using E = Element<T>;
  const A w0 = weight[0], w1 = weight[1], w2 = weight[2], w3 = weight[3];
  for (int64_t c = 0; c < width; ++c) {
    out[c] = E::Store(w0 * E::Load(in0[c]) + w1 * E::Load(in1[c]) + w2 * E::Load(in2[c]) +
                      w3 * E::Load(in3[c]));
  }
}

}  // namespace

template <typename T>
void DeformIm2colCpu(const ConvParams& p, const T* input, const T* offset, const T* mask,
                     T* columns, int64_t begin, int64_t end) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t positions = p.positions();
  const int64_t kernel_points = p.kernel_points();
  const int64_t group_channels = p.group_channels();
  const std::vector<T> zeros(group_channels, E::Store(A(0)));  // the zero padding
  for (int64_t np = begin; np < end; ++np) {
    const int64_t n = np / positions;
    const int64_t y = (np - n * positions) / p.out_width;
    const int64_t x = np - n * positions - y * p.out_width;
    const T* image = input + n * p.height * p.width * p.channels;
    T* out = columns + np * kernel_points * p.channels;
    for (int64_t i = 0; i < p.kernel_h; ++i) {
      for (int64_t j = 0; j < p.kernel_w; ++j) {
        for (int64_t g = 0; g < p.offset_groups; ++g, out += group_channels) {
          A m;
          const ConvSample<A> s = LoadConvSample(p, offset, mask, np, y, x, i, j, g, &m);
          const T* corner[4];
          for (int q = 0; q < 4; ++q) {
            corner[q] = s.pixel[q] >= 0 ? image + s.pixel[q] * p.channels + g * group_channels
                                        : zeros.data();
          }
          BilinearRow(group_channels, corner[0], corner[1], corner[2], corner[3], s.weight, out);
        }
      }
    }
  }
}

template <typename T>
void DeformIm2colBackwardInputCpu(const ConvParams& p, int64_t blocks, int64_t task,
                                  const T* grad_columns, const T* input, const T* offset,
                                  const T* mask, T* grad_input, AccType<T>* partial) {
  using A = AccType<T>;
  using E = Element<T>;
  // Accumulating straight into grad_input needs T to be the accumulation type.
  constexpr bool kDirect = std::is_same_v<T, A>;
  const int64_t positions = p.positions();
  const int64_t kernel_points = p.kernel_points();
  const int64_t group_channels = p.group_channels();
  const int64_t pixels = p.height * p.width;
  const int64_t block_width = (group_channels + blocks - 1) / blocks;
  const int64_t b = task % blocks;
  const int64_t g = (task / blocks) % p.offset_groups;
  const int64_t n = task / (blocks * p.offset_groups);
  const int64_t c_begin = g * group_channels + b * block_width;
  const int64_t width = std::min(block_width, group_channels - b * block_width);

  // The block's grad-input region: rows of `width` channels, one per pixel.
  std::vector<A> local(kDirect ? 0 : pixels * width, A(0));
  A* acc;
  int64_t stride;
  if constexpr (kDirect) {
    acc = grad_input + n * pixels * p.channels + c_begin;
    stride = p.channels;
    for (int64_t pixel = 0; pixel < pixels; ++pixel) {
      std::fill_n(acc + pixel * stride, width, A(0));
    }
  } else {
    acc = local.data();
    stride = width;
  }
  // Reads of corners outside the image come from `zeros`, writes go to the `sink` rows (one per
  // corner, so the four output rows never alias).
  const std::vector<T> zeros(width, E::Store(A(0)));
  std::vector<A> sink(4 * width);

  const T* image = input + n * pixels * p.channels + c_begin;
  int64_t np = n * positions;
  for (int64_t y = 0; y < p.out_height; ++y) {
    for (int64_t x = 0; x < p.out_width; ++x, ++np) {
      for (int64_t i = 0; i < p.kernel_h; ++i) {
        for (int64_t j = 0; j < p.kernel_w; ++j) {
          const int64_t k = i * p.kernel_w + j;
          const int64_t sample = (np * kernel_points + k) * p.offset_groups + g;
          A* dots = partial + (sample * blocks + b) * 4;
          A m;
          const ConvSample<A> s = LoadConvSample(p, offset, mask, np, y, x, i, j, g, &m);
          if (!s.valid) {
            std::fill_n(dots, 4, A(0));
            continue;
          }
          const T* grad = grad_columns + (np * kernel_points + k) * p.channels + c_begin;
          const T* in[4];
          A* out[4];
          for (int q = 0; q < 4; ++q) {
            const bool inside = s.pixel[q] >= 0;
            in[q] = inside ? image + s.pixel[q] * p.channels : zeros.data();
            out[q] = inside ? acc + s.pixel[q] * stride : sink.data() + q * width;
          }
          ScatterAndReduce(width, grad, in[0], in[1], in[2], in[3], s.weight, out[0], out[1],
                           out[2], out[3], dots);
        }
      }
    }
  }
  if constexpr (!kDirect) {
    T* dst = grad_input + n * pixels * p.channels + c_begin;
    for (int64_t pixel = 0; pixel < pixels; ++pixel) {
      for (int64_t c = 0; c < width; ++c) {
        dst[pixel * p.channels + c] = E::Store(acc[pixel * width + c]);
      }
    }
  }
}

template <typename T>
void DeformIm2colBackwardCoordCpu(const ConvParams& p, int64_t blocks, const AccType<T>* partial,
                                  const T* offset, const T* mask, T* grad_offset, T* grad_mask,
                                  int64_t begin, int64_t end) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t positions = p.positions();
  const int64_t kernel_points = p.kernel_points();
  for (int64_t np = begin; np < end; ++np) {
    const int64_t n = np / positions;
    const int64_t y = (np - n * positions) / p.out_width;
    const int64_t x = np - n * positions - y * p.out_width;
    for (int64_t i = 0; i < p.kernel_h; ++i) {
      for (int64_t j = 0; j < p.kernel_w; ++j) {
        const int64_t k = i * p.kernel_w + j;
        for (int64_t g = 0; g < p.offset_groups; ++g) {
          const int64_t sample = (np * kernel_points + k) * p.offset_groups + g;
          A m;
          const ConvSample<A> s = LoadConvSample(p, offset, mask, np, y, x, i, j, g, &m);
          A dots[4] = {0, 0, 0, 0};
          for (int64_t b = 0; b < blocks; ++b) {
            for (int q = 0; q < 4; ++q) dots[q] += partial[(sample * blocks + b) * 4 + q];
          }
          const ConvSampleGrad<A> grad = ConvSampleBackward(s, m, dots);
          const int64_t channel = np * p.offset_groups * kernel_points + g * kernel_points + k;
          grad_offset[channel * 2] = E::Store(grad.h);
          grad_offset[channel * 2 + 1] = E::Store(grad.w);
          if (p.has_mask) grad_mask[channel] = E::Store(grad.mask);
        }
      }
    }
  }
}

#define FLAXDCN_INSTANTIATE_CPU(T)                                                                \
  template void DeformIm2colCpu<T>(const ConvParams&, const T*, const T*, const T*, T*, int64_t, \
                                   int64_t);                                                     \
  template void DeformIm2colBackwardInputCpu<T>(const ConvParams&, int64_t, int64_t, const T*,   \
                                                const T*, const T*, const T*, T*,                \
                                                AccType<T>*);                                    \
  template void DeformIm2colBackwardCoordCpu<T>(const ConvParams&, int64_t, const AccType<T>*,   \
                                                const T*, const T*, T*, T*, int64_t, int64_t);

FLAXDCN_INSTANTIATE_CPU(float)
FLAXDCN_INSTANTIATE_CPU(double)
FLAXDCN_INSTANTIATE_CPU(Float16)
FLAXDCN_INSTANTIATE_CPU(BFloat16)

#undef FLAXDCN_INSTANTIATE_CPU

}  // namespace flaxdcn
