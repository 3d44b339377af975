#include "xla_ext/cpu/ms_deform_attn_kernels.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla_ext/common/ms_deform_attn.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cpu/channel_rows.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {
namespace {

// The sample `sample` on `level`: its bilinear read weighted by its attention weight.
template <typename T>
ConvSample<AccType<T>> LoadSample(const MsDeformAttnParams& p, const AccType<T>* locations,
                                  const T* weights, int64_t sample, int64_t level,
                                  AccType<T>* weight) {
  using A = AccType<T>;
  *weight = Element<T>::Load(weights[sample]);
  return MsDeformAttnSample<A>(p, level, locations[2 * sample], locations[2 * sample + 1],
                               *weight);
}

}  // namespace

template <typename T>
void MsDeformAttnCpu(const MsDeformAttnParams& p, const T* value, const AccType<T>* locations,
                     const T* weights, T* out, int64_t begin, int64_t end) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t d = p.head_channels;
  const std::vector<T> zeros(d, E::Store(A(0)));  // the zero padding
  std::vector<A> acc(d);
  for (int64_t row = begin; row < end; ++row) {  // row = n * Lq + q
    const int64_t n = row / p.queries;
    for (int64_t m = 0; m < p.heads; ++m) {
      const T* image = value + n * p.values * p.channels + m * d;
      const int64_t unit = row * p.heads + m;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t l = 0; l < p.levels; ++l) {
        const T* level = image + p.level_start[l] * p.channels;
        for (int64_t k = 0; k < p.points; ++k) {
          A weight;
          const int64_t sample = (unit * p.levels + l) * p.points + k;
          const ConvSample<A> s = LoadSample(p, locations, weights, sample, l, &weight);
          if (!s.valid) continue;
          const T* in[4];
          for (int q = 0; q < 4; ++q) {
            in[q] = s.pixel[q] >= 0 ? level + s.pixel[q] * p.channels : zeros.data();
          }
          AccumulateBilinearRow(d, in[0], in[1], in[2], in[3], s.weight, acc.data());
        }
      }
      T* dst = out + unit * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = E::Store(acc[c]);
    }
  }
}

template <typename T>
void MsDeformAttnBackwardValueCpu(const MsDeformAttnParams& p, int64_t blocks, int64_t task,
                                  const T* grad_out, const T* value, const AccType<T>* locations,
                                  const T* weights, T* grad_value, AccType<T>* partial) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t d = p.head_channels;
  const auto [n, m, b, c_begin, width] = ChannelBlockOf(task, blocks, p.heads, d);

  // The block's grad-value region, `width` channels per value row, plus four sink rows for the
  // writes of corners outside a level (so the four output rows never alias).
  std::vector<A> acc(p.values * width + 4 * width, A(0));
  A* sink = acc.data() + p.values * width;
  const std::vector<T> zeros(width, E::Store(A(0)));
  std::vector<A> grad(width);
  const T* image = value + n * p.values * p.channels + c_begin;
  for (int64_t q = 0; q < p.queries; ++q) {
    const int64_t unit = (n * p.queries + q) * p.heads + m;
    const T* gsrc = grad_out + unit * d + (c_begin - m * d);
    for (int64_t c = 0; c < width; ++c) grad[c] = E::Load(gsrc[c]);
    for (int64_t l = 0; l < p.levels; ++l) {
      const int64_t start = p.level_start[l];
      for (int64_t k = 0; k < p.points; ++k) {
        const int64_t sample = (unit * p.levels + l) * p.points + k;
        A* dots = partial + (sample * blocks + b) * 4;
        A weight;
        const ConvSample<A> s = LoadSample(p, locations, weights, sample, l, &weight);
        if (!s.valid) {
          std::fill_n(dots, 4, A(0));
          continue;
        }
        const T* in[4];
        A* dst[4];
        for (int q4 = 0; q4 < 4; ++q4) {
          const bool inside = s.pixel[q4] >= 0;
          const int64_t row = start + s.pixel[q4];
          in[q4] = inside ? image + row * p.channels : zeros.data();
          dst[q4] = inside ? acc.data() + row * width : sink + q4 * width;
        }
        ScatterAndReduce(width, grad.data(), in[0], in[1], in[2], in[3], s.weight, dst[0], dst[1],
                         dst[2], dst[3], dots);
      }
    }
  }
  StoreBlock(p.values, width, p.channels, acc.data(),
             grad_value + n * p.values * p.channels + c_begin);
}

template <typename T>
void MsDeformAttnBackwardSamplingCpu(const MsDeformAttnParams& p, int64_t blocks,
                                     const AccType<T>* partial, const AccType<T>* locations,
                                     const T* weights, AccType<T>* grad_locations,
                                     T* grad_weights, int64_t begin, int64_t end) {
  using A = AccType<T>;
  using E = Element<T>;
  for (int64_t row = begin; row < end; ++row) {  // row = n * Lq + q
    for (int64_t m = 0; m < p.heads; ++m) {
      const int64_t unit = row * p.heads + m;
      for (int64_t l = 0; l < p.levels; ++l) {
        for (int64_t k = 0; k < p.points; ++k) {
          const int64_t sample = (unit * p.levels + l) * p.points + k;
          A weight;
          const ConvSample<A> s = LoadSample(p, locations, weights, sample, l, &weight);
          A dots[4] = {0, 0, 0, 0};
          for (int64_t b = 0; b < blocks; ++b) {
            for (int q = 0; q < 4; ++q) dots[q] += partial[(sample * blocks + b) * 4 + q];
          }
          const ConvSampleGrad<A> g = ConvSampleBackward(s, weight, dots);
          // d / dx = d / dw * W and d / dy = d / dh * H (w = x * W - 0.5).
          grad_locations[2 * sample] = g.w * A(p.width[l]);
          grad_locations[2 * sample + 1] = g.h * A(p.height[l]);
          grad_weights[sample] = E::Store(g.mask);
        }
      }
    }
  }
}

#define FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU(T)                                                \
  template void MsDeformAttnCpu<T>(const MsDeformAttnParams&, const T*, const AccType<T>*,      \
                                   const T*, T*, int64_t, int64_t);                            \
  template void MsDeformAttnBackwardValueCpu<T>(const MsDeformAttnParams&, int64_t, int64_t,    \
                                                const T*, const T*, const AccType<T>*,         \
                                                const T*, T*, AccType<T>*);                    \
  template void MsDeformAttnBackwardSamplingCpu<T>(const MsDeformAttnParams&, int64_t,          \
                                                   const AccType<T>*, const AccType<T>*,       \
                                                   const T*, AccType<T>*, T*, int64_t, int64_t);

FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU(float)
FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU(double)
FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU(Float16)
FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU(BFloat16)

#undef FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU

}  // namespace flaxdcn
