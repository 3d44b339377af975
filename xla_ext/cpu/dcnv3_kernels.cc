#include "xla_ext/cpu/dcnv3_kernels.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla_ext/common/dcnv3.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cpu/channel_rows.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {
namespace {

// The sample of position np = n * Ho * Wo + y * Wo + x, group g and point k (column i, row j),
// with its mask value.
template <typename T>
ConvSample<AccType<T>> LoadSample(const Dcnv3Params& p, const T* offset, const T* mask,
                                  int64_t np, int64_t y, int64_t x, int64_t g, int64_t k,
                                  int64_t i, int64_t j, AccType<T>* mask_value) {
  using A = AccType<T>;
  using E = Element<T>;
  const T* off = offset + np * p.offset_stride + g * p.offset_group_stride + 2 * k;
  const A m = E::Load(mask[np * p.mask_stride + g * p.mask_group_stride + k]);
  A h, w;
  Dcnv3Location<A>(p, y, x, i, j, E::Load(off[0]), E::Load(off[1]), &h, &w);
  *mask_value = m;
  return MakeConvSample<A>(h, w, m, p.height, p.width);
}

// (i, j) of every point.
std::vector<int64_t> PointTable(const Dcnv3Params& p) {
  std::vector<int64_t> table(2 * p.points());
  for (int64_t k = 0; k < p.points(); ++k) Dcnv3Point(p, k, &table[2 * k], &table[2 * k + 1]);
  return table;
}

}  // namespace

template <typename T>
void Dcnv3Cpu(const Dcnv3Params& p, const T* input, const T* offset, const T* mask, T* out,
              int64_t begin, int64_t end) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t positions = p.positions();
  const int64_t points = p.points();
  const int64_t group_channels = p.group_channels();
  const std::vector<int64_t> table = PointTable(p);
  const std::vector<T> zeros(group_channels, E::Store(A(0)));  // the zero padding
  std::vector<A> acc(group_channels);
  for (int64_t np = begin; np < end; ++np) {
    const int64_t n = np / positions;
    const int64_t y = (np - n * positions) / p.out_width;
    const int64_t x = np - n * positions - y * p.out_width;
    const T* image = input + n * p.height * p.width * p.channels;
    for (int64_t g = 0; g < p.groups; ++g) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t k = 0; k < points; ++k) {
        A m;
        const ConvSample<A> s =
            LoadSample(p, offset, mask, np, y, x, g, k, table[2 * k], table[2 * k + 1], &m);
        if (!s.valid) continue;
        const T* in[4];
        for (int q = 0; q < 4; ++q) {
          in[q] = s.pixel[q] >= 0 ? image + s.pixel[q] * p.channels + g * group_channels
                                  : zeros.data();
        }
        AccumulateBilinearRow(group_channels, in[0], in[1], in[2], in[3], s.weight, acc.data());
      }
      T* dst = out + np * p.channels + g * group_channels;
      for (int64_t c = 0; c < group_channels; ++c) dst[c] = E::Store(acc[c]);
    }
  }
}

template <typename T>
void Dcnv3BackwardInputCpu(const Dcnv3Params& p, int64_t blocks, int64_t task, const T* grad_out,
                           const T* input, const T* offset, const T* mask, T* grad_input,
                           AccType<T>* partial) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t positions = p.positions();
  const int64_t points = p.points();
  const int64_t group_channels = p.group_channels();
  const int64_t pixels = p.height * p.width;
  const auto [n, g, b, c_begin, width] = ChannelBlockOf(task, blocks, p.groups, group_channels);
  const std::vector<int64_t> table = PointTable(p);

  // The block's grad-input region, `width` channels per pixel, plus four sink rows for the
  // writes of corners outside the image (so the four output rows never alias).
  std::vector<A> acc(pixels * width + 4 * width, A(0));
  A* sink = acc.data() + pixels * width;
  const std::vector<T> zeros(width, E::Store(A(0)));
  std::vector<A> grad(width);
  const T* image = input + n * pixels * p.channels + c_begin;
  int64_t np = n * positions;
  for (int64_t y = 0; y < p.out_height; ++y) {
    for (int64_t x = 0; x < p.out_width; ++x, ++np) {
      const T* gsrc = grad_out + np * p.channels + c_begin;
      for (int64_t c = 0; c < width; ++c) grad[c] = E::Load(gsrc[c]);
      for (int64_t k = 0; k < points; ++k) {
        const int64_t sample = (np * p.groups + g) * points + k;
        A* dots = partial + (sample * blocks + b) * 4;
        A m;
        const ConvSample<A> s =
            LoadSample(p, offset, mask, np, y, x, g, k, table[2 * k], table[2 * k + 1], &m);
        if (!s.valid) {
          std::fill_n(dots, 4, A(0));
          continue;
        }
        const T* in[4];
        A* dst[4];
        for (int q = 0; q < 4; ++q) {
          const bool inside = s.pixel[q] >= 0;
          in[q] = inside ? image + s.pixel[q] * p.channels : zeros.data();
          dst[q] = inside ? acc.data() + s.pixel[q] * width : sink + q * width;
        }
        ScatterAndReduce(width, grad.data(), in[0], in[1], in[2], in[3], s.weight, dst[0], dst[1],
                         dst[2], dst[3], dots);
      }
    }
  }
  StoreBlock(pixels, width, p.channels, acc.data(), grad_input + n * pixels * p.channels + c_begin);
}

template <typename T>
void Dcnv3BackwardCoordCpu(const Dcnv3Params& p, int64_t blocks, const AccType<T>* partial,
                           const T* offset, const T* mask, T* grad_offset, T* grad_mask,
                           int64_t begin, int64_t end) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t positions = p.positions();
  const int64_t points = p.points();
  const std::vector<int64_t> table = PointTable(p);
  const A scale = A(p.offset_scale);
  for (int64_t np = begin; np < end; ++np) {
    const int64_t n = np / positions;
    const int64_t y = (np - n * positions) / p.out_width;
    const int64_t x = np - n * positions - y * p.out_width;
    if (p.pad_channels_begin > 0) {
      std::fill(grad_offset + np * p.offset_stride + p.pad_channels_begin,
                grad_offset + (np + 1) * p.offset_stride, E::Store(A(0)));
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      for (int64_t k = 0; k < points; ++k) {
        const int64_t sample = (np * p.groups + g) * points + k;
        A m;
        const ConvSample<A> s =
            LoadSample(p, offset, mask, np, y, x, g, k, table[2 * k], table[2 * k + 1], &m);
        A dots[4] = {0, 0, 0, 0};
        for (int64_t b = 0; b < blocks; ++b) {
          for (int q = 0; q < 4; ++q) dots[q] += partial[(sample * blocks + b) * 4 + q];
        }
        const ConvSampleGrad<A> grad = ConvSampleBackward(s, m, dots);
        T* off = grad_offset + np * p.offset_stride + g * p.offset_group_stride + 2 * k;
        off[0] = E::Store(grad.w * scale);  // d / d dx = d / d w * s
        off[1] = E::Store(grad.h * scale);
        grad_mask[np * p.mask_stride + g * p.mask_group_stride + k] = E::Store(grad.mask);
      }
    }
  }
}

#define FLAXDCN_INSTANTIATE_DCNV3_CPU(T)                                                        \
  template void Dcnv3Cpu<T>(const Dcnv3Params&, const T*, const T*, const T*, T*, int64_t,     \
                            int64_t);                                                          \
  template void Dcnv3BackwardInputCpu<T>(const Dcnv3Params&, int64_t, int64_t, const T*,       \
                                         const T*, const T*, const T*, T*, AccType<T>*);       \
  template void Dcnv3BackwardCoordCpu<T>(const Dcnv3Params&, int64_t, const AccType<T>*,       \
                                         const T*, const T*, T*, T*, int64_t, int64_t);

FLAXDCN_INSTANTIATE_DCNV3_CPU(float)
FLAXDCN_INSTANTIATE_DCNV3_CPU(double)
FLAXDCN_INSTANTIATE_DCNV3_CPU(Float16)
FLAXDCN_INSTANTIATE_DCNV3_CPU(BFloat16)

#undef FLAXDCN_INSTANTIATE_DCNV3_CPU

}  // namespace flaxdcn
