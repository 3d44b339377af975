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

// One sample's read: the rows of its four corners (the zero row for a corner outside its level)
// and their bilinear weights times the attention weight.
template <typename T>
struct CornerRows {
  const T* row[4];
  AccType<T> weight[4];
};

// acc[c] += sum_q weight_q * row_q[c] over `samples` reads, for the `Width` channels from c0,
// sample by sample in order: the sums of AccumulateBilinearRow (channel_rows.h), with the
// accumulator of a whole chunk of channels in registers.
template <int Width, typename T>
inline void AccumulateChunk(const CornerRows<T>* reads, int64_t samples, int64_t c0,
                            AccType<T>* acc) {
  using A = AccType<T>;
  using E = Element<T>;
  A sum[Width];
  for (int c = 0; c < Width; ++c) sum[c] = acc[c];
  for (int64_t i = 0; i < samples; ++i) {
    const CornerRows<T>& r = reads[i];
    const T* in0 = r.row[0] + c0;
    const T* in1 = r.row[1] + c0;
    const T* in2 = r.row[2] + c0;
    const T* in3 = r.row[3] + c0;
    for (int c = 0; c < Width; ++c) {
      sum[c] += r.weight[0] * E::Load(in0[c]) + r.weight[1] * E::Load(in1[c]) +
                r.weight[2] * E::Load(in2[c]) + r.weight[3] * E::Load(in3[c]);
    }
  }
  for (int c = 0; c < Width; ++c) acc[c] = sum[c];
}

}  // namespace

template <typename T>
void MsDeformAttnCpu(const MsDeformAttnParams& p, const T* value, const AccType<T>* locations,
                     const T* weights, T* out, int64_t begin, int64_t end) {
  using A = AccType<T>;
  using E = Element<T>;
  // Channels summed in registers at once (a multiple of the SIMD width).
  constexpr int kChunk = 16;
  const int64_t d = p.head_channels;
  if (d == 0) return;  // out is empty
  const std::vector<T> zeros(d, E::Store(A(0)));  // the zero padding
  // The valid reads of one (n, q, m): each sample's location and weights are formed once, then
  // applied to every channel.
  std::vector<CornerRows<T>> reads(p.levels * p.points);
  A acc[kChunk];
  for (int64_t row = begin; row < end; ++row) {  // row = n * Lq + q
    const int64_t n = row / p.queries;
    for (int64_t m = 0; m < p.heads; ++m) {
      const T* image = value + n * p.values * p.channels + m * d;
      const int64_t unit = row * p.heads + m;
      int64_t count = 0;
      for (int64_t l = 0; l < p.levels; ++l) {
        const T* level = image + p.level_start[l] * p.channels;
        for (int64_t k = 0; k < p.points; ++k) {
          A weight;
          const int64_t sample = (unit * p.levels + l) * p.points + k;
          const ConvSample<A> s = LoadSample(p, locations, weights, sample, l, &weight);
          if (!s.valid) continue;
          CornerRows<T>& r = reads[count++];
          for (int q = 0; q < 4; ++q) {
            r.row[q] = s.pixel[q] >= 0 ? level + s.pixel[q] * p.channels : zeros.data();
            r.weight[q] = s.weight[q];
            __builtin_prefetch(r.row[q]);
            __builtin_prefetch(r.row[q] + d - 1);
          }
        }
      }
      T* dst = out + unit * d;
      for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
        std::fill_n(acc, kChunk, A(0));
        const int64_t width = std::min<int64_t>(kChunk, d - c0);
        if (width == kChunk) {
          AccumulateChunk<kChunk>(reads.data(), count, c0, acc);
        } else {
          for (int64_t i = 0; i < count; ++i) {
            const CornerRows<T>& r = reads[i];
            AccumulateBilinearRow(width, r.row[0] + c0, r.row[1] + c0, r.row[2] + c0,
                                  r.row[3] + c0, r.weight, acc);
          }
        }
        for (int64_t c = 0; c < width; ++c) dst[c0 + c] = E::Store(acc[c]);
      }
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
  // The valid samples of one query: their corner rows in value and in the block's accumulator
  // (prefetched while the next are formed) and weights, and where their dots go.
  struct Scatter {
    const T* in[4];
    A* out[4];
    A weight[4];
    A* dots;
  };
  const int64_t per_unit = p.levels * p.points;
  std::vector<Scatter> scatters(per_unit);
  constexpr int64_t kLineFloats = 64 / sizeof(A);  // elements of A per cache line
  for (int64_t q = 0; q < p.queries; ++q) {
    const int64_t unit = (n * p.queries + q) * p.heads + m;
    const T* gsrc = grad_out + unit * d + (c_begin - m * d);
    for (int64_t c = 0; c < width; ++c) grad[c] = E::Load(gsrc[c]);
    if (q + 2 < p.queries) {
      // A task walks one head's samples, M * L * P apart from query to query: a stride the
      // hardware prefetcher misses at every page.
      const int64_t ahead = (unit + 2 * p.heads) * per_unit;
      for (int64_t i = 0; i < 2 * per_unit; i += kLineFloats) {
        __builtin_prefetch(locations + 2 * ahead + i);
      }
      for (int64_t i = 0; i < per_unit; i += kLineFloats) __builtin_prefetch(weights + ahead + i);
      __builtin_prefetch(gsrc + 2 * p.heads * d);
    }
    int64_t count = 0;
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
        Scatter& e = scatters[count++];
        e.dots = dots;
        for (int q4 = 0; q4 < 4; ++q4) {
          const bool inside = s.pixel[q4] >= 0;
          const int64_t row = start + s.pixel[q4];
          e.in[q4] = inside ? image + row * p.channels : zeros.data();
          e.out[q4] = inside ? acc.data() + row * width : sink + q4 * width;
          e.weight[q4] = s.weight[q4];
          __builtin_prefetch(e.in[q4]);
          __builtin_prefetch(e.out[q4], 1);
        }
      }
    }
    for (int64_t i = 0; i < count; ++i) {
      const Scatter& e = scatters[i];
      ScatterAndReduce(width, grad.data(), e.in[0], e.in[1], e.in[2], e.in[3], e.weight, e.out[0],
                       e.out[1], e.out[2], e.out[3], e.dots);
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
