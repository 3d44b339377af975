#include "xla_ext/cpu/ms_deform_attn_kernels.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "xla_ext/common/ms_deform_attn.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cpu/channel_rows.h"
#include "xla_ext/cpu/types.h"

// x86-64 builds with GCC or Clang carry an AVX2 copy of the kernels (see ForwardAvx2);
// -DFLAXDCN_CPU_AVX2=0 leaves it out (tests/test_cpu_simd.py compares the two builds).
#ifndef FLAXDCN_CPU_AVX2
#if defined(__x86_64__) && defined(__GNUC__)
#define FLAXDCN_CPU_AVX2 1
#else
#define FLAXDCN_CPU_AVX2 0
#endif
#endif

// A kernel body, inlined into each of its target-specific copies (and so compiled for each).
#define FLAXDCN_CPU_KERNEL_BODY inline __attribute__((always_inline))

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

// The location and attention-weight gradients of sample `sample` on `level` from its four
// channel reductions dots[q] = <grad_out, value corner q>.
template <typename T>
void WriteSamplingGrads(const MsDeformAttnParams& p, const ConvSample<AccType<T>>& s,
                        AccType<T> weight, const AccType<T>* dots, int64_t sample, int64_t level,
                        AccType<T>* grad_locations, T* grad_weights) {
  using A = AccType<T>;
  const ConvSampleGrad<A> g = ConvSampleBackward(s, weight, dots);
  // d / dx = d / dw * W and d / dy = d / dh * H (w = x * W - 0.5).
  grad_locations[2 * sample] = g.w * A(p.width[level]);
  grad_locations[2 * sample + 1] = g.h * A(p.height[level]);
  grad_weights[sample] = Element<T>::Store(g.mask);
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

template <typename T>
FLAXDCN_CPU_KERNEL_BODY void Forward(const MsDeformAttnParams& p, const T* value,
                                     const AccType<T>* locations, const T* weights, T* out,
                                     int64_t begin, int64_t end) {
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
FLAXDCN_CPU_KERNEL_BODY void BackwardValue(const MsDeformAttnParams& p, int64_t blocks,
                                           int64_t task, const T* grad_out, const T* value,
                                           const AccType<T>* locations, const T* weights,
                                           T* grad_value, AccType<T>* partial,
                                           AccType<T>* grad_locations, T* grad_weights) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t d = p.head_channels;
  const auto [n, m, b, c_begin, width] = ChannelBlockOf(task, blocks, p.heads, d);
  const bool whole = blocks == 1;  // the task sees every channel: it finishes its samples

  // The block's grad-value region, `width` channels per value row, plus four sink rows for the
  // writes of corners outside a level (so the four output rows never alias).
  std::vector<A> acc(p.values * width + 4 * width, A(0));
  A* sink = acc.data() + p.values * width;
  const std::vector<T> zeros(width, E::Store(A(0)));
  // The cotangent row of a query in the accumulation type (read in place where T is that type).
  constexpr bool kConvert = !std::is_same_v<T, A>;
  std::vector<A> converted(kConvert ? width : 0);
  const T* image = value + n * p.values * p.channels + c_begin;
  // The valid samples of one query: their corner rows in value and in the block's accumulator
  // (prefetched while the next are formed), and what their sampling gradients need.
  struct Scatter {
    const T* in[4];
    A* out[4];
    A corner[4];  // the bilinear weights times the attention weight
    A frac_h;
    A frac_w;
    A weight;  // the attention weight
    int64_t sample;
    int64_t level;
  };
  const int64_t per_unit = p.levels * p.points;
  std::vector<Scatter> scatters(per_unit);
  constexpr int64_t kLineElements = 64 / sizeof(A);  // elements of A per cache line
  for (int64_t q = 0; q < p.queries; ++q) {
    const int64_t unit = (n * p.queries + q) * p.heads + m;
    const T* gsrc = grad_out + unit * d + (c_begin - m * d);
    if (q + 2 < p.queries) {
      // A task walks one head's samples, M * L * P apart from query to query: a stride the
      // hardware prefetcher misses at every page.
      const int64_t ahead = (unit + 2 * p.heads) * per_unit;
      for (int64_t i = 0; i < 2 * per_unit; i += kLineElements) {
        __builtin_prefetch(locations + 2 * ahead + i);
      }
      for (int64_t i = 0; i < per_unit; i += kLineElements) {
        __builtin_prefetch(weights + ahead + i);
      }
      __builtin_prefetch(gsrc + 2 * p.heads * d);
    }
    int64_t count = 0;
    for (int64_t l = 0; l < p.levels; ++l) {
      const int64_t start = p.level_start[l];
      for (int64_t k = 0; k < p.points; ++k) {
        const int64_t sample = (unit * p.levels + l) * p.points + k;
        A weight;
        const ConvSample<A> s = LoadSample(p, locations, weights, sample, l, &weight);
        if (!s.valid) {
          const A zero_dots[4] = {A(0), A(0), A(0), A(0)};
          if (whole) {
            WriteSamplingGrads(p, s, weight, zero_dots, sample, l, grad_locations, grad_weights);
          } else {
            std::copy_n(zero_dots, 4, partial + (sample * blocks + b) * 4);
          }
          continue;
        }
        Scatter& e = scatters[count++];
        e.frac_h = s.frac_h;
        e.frac_w = s.frac_w;
        e.weight = weight;
        e.sample = sample;
        e.level = l;
        for (int q4 = 0; q4 < 4; ++q4) {
          e.corner[q4] = s.weight[q4];
          const bool inside = s.pixel[q4] >= 0;
          const int64_t row = start + s.pixel[q4];
          e.in[q4] = inside ? image + row * p.channels : zeros.data();
          e.out[q4] = inside ? acc.data() + row * width : sink + q4 * width;
          __builtin_prefetch(e.in[q4]);
          __builtin_prefetch(e.out[q4], 1);
        }
      }
    }
    const A* grad;
    if constexpr (kConvert) {
      for (int64_t c = 0; c < width; ++c) converted[c] = E::Load(gsrc[c]);
      grad = converted.data();
    } else {
      grad = gsrc;
    }
    for (int64_t i = 0; i < count; ++i) {
      const Scatter& e = scatters[i];
      A dots[4];
      ScatterAndReduce(width, grad, e.in[0], e.in[1], e.in[2], e.in[3], e.corner, e.out[0],
                       e.out[1], e.out[2], e.out[3], dots);
      if (whole) {
        ConvSample<A> s{};  // what the backward of a valid read needs
        s.valid = true;
        s.frac_h = e.frac_h;
        s.frac_w = e.frac_w;
        WriteSamplingGrads(p, s, e.weight, dots, e.sample, e.level, grad_locations,
                           grad_weights);
      } else {
        std::copy_n(dots, 4, partial + (e.sample * blocks + b) * 4);
      }
    }
  }
  StoreBlock(p.values, width, p.channels, acc.data(),
             grad_value + n * p.values * p.channels + c_begin);
}

#if FLAXDCN_CPU_AVX2
// The kernels compiled once more for AVX2 (8-float vectors): the same operations in the same
// order, without fused multiply-adds (FMA is not part of the target), so both builds compute the
// same bits; the one a CPU runs is chosen when called.
template <typename T>
__attribute__((target("avx2"))) void ForwardAvx2(const MsDeformAttnParams& p, const T* value,
                                                 const AccType<T>* locations, const T* weights,
                                                 T* out, int64_t begin, int64_t end) {
  Forward<T>(p, value, locations, weights, out, begin, end);
}

template <typename T>
__attribute__((target("avx2"))) void BackwardValueAvx2(
    const MsDeformAttnParams& p, int64_t blocks, int64_t task, const T* grad_out, const T* value,
    const AccType<T>* locations, const T* weights, T* grad_value, AccType<T>* partial,
    AccType<T>* grad_locations, T* grad_weights) {
  BackwardValue<T>(p, blocks, task, grad_out, value, locations, weights, grad_value, partial,
                   grad_locations, grad_weights);
}

bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

}  // namespace

template <typename T>
void MsDeformAttnCpu(const MsDeformAttnParams& p, const T* value, const AccType<T>* locations,
                     const T* weights, T* out, int64_t begin, int64_t end) {
#if FLAXDCN_CPU_AVX2
  if (HasAvx2()) return ForwardAvx2<T>(p, value, locations, weights, out, begin, end);
#endif
  Forward<T>(p, value, locations, weights, out, begin, end);
}

template <typename T>
void MsDeformAttnBackwardValueCpu(const MsDeformAttnParams& p, int64_t blocks, int64_t task,
                                  const T* grad_out, const T* value, const AccType<T>* locations,
                                  const T* weights, T* grad_value, AccType<T>* partial,
                                  AccType<T>* grad_locations, T* grad_weights) {
#if FLAXDCN_CPU_AVX2
  if (HasAvx2()) {
    return BackwardValueAvx2<T>(p, blocks, task, grad_out, value, locations, weights, grad_value,
                                partial, grad_locations, grad_weights);
  }
#endif
  BackwardValue<T>(p, blocks, task, grad_out, value, locations, weights, grad_value, partial,
                   grad_locations, grad_weights);
}

template <typename T>
void MsDeformAttnBackwardSamplingCpu(const MsDeformAttnParams& p, int64_t blocks,
                                     const AccType<T>* partial, const AccType<T>* locations,
                                     const T* weights, AccType<T>* grad_locations,
                                     T* grad_weights, int64_t begin, int64_t end) {
  using A = AccType<T>;
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
          WriteSamplingGrads(p, s, weight, dots, sample, l, grad_locations, grad_weights);
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
                                                const T*, T*, AccType<T>*, AccType<T>*, T*);   \
  template void MsDeformAttnBackwardSamplingCpu<T>(const MsDeformAttnParams&, int64_t,          \
                                                   const AccType<T>*, const AccType<T>*,       \
                                                   const T*, AccType<T>*, T*, int64_t, int64_t);

FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU(float)
FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU(double)
FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU(Float16)
FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU(BFloat16)

#undef FLAXDCN_INSTANTIATE_MS_DEFORM_ATTN_CPU

}  // namespace flaxdcn
