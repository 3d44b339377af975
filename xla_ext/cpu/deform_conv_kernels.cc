#include "xla_ext/cpu/deform_conv_kernels.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cpu/channel_rows.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {
namespace {

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
  const auto [n, g, b, c_begin, width] =
      ChannelBlockOf(task, blocks, p.offset_groups, group_channels);

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
    StoreBlock(pixels, width, p.channels, acc, grad_input + n * pixels * p.channels + c_begin);
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
