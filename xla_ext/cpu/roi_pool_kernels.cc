#include "xla_ext/cpu/roi_pool_kernels.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla_ext/common/roi_pool.h"
#include "xla_ext/common/sampling.h"
#include "xla_ext/cpu/channel_rows.h"
#include "xla_ext/cpu/types.h"

namespace flaxdcn {
namespace {

template <typename T>
RoiBin<AccType<T>> LoadRoiBin(const RoiPoolParams& p, const AccType<T>* rois, const T* offset,
                              int64_t bin) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t r = bin / (p.out_height * p.out_width);
  const int64_t ph = (bin / p.out_width) % p.out_height;
  const int64_t pw = bin % p.out_width;
  const A dy = p.has_offsets ? E::Load(offset[bin * 2]) : A(0);
  const A dx = p.has_offsets ? E::Load(offset[bin * 2 + 1]) : A(0);
  return MakeRoiBin<A>(rois, r, ph, pw, dy, dx, p);
}

}  // namespace

template <typename T>
void DeformRoiPoolCpu(const RoiPoolParams& p, const T* features, const AccType<T>* rois,
                      const T* offset, T* pooled, int64_t begin, int64_t end) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t pixels = p.height * p.width;
  std::vector<A> acc(p.channels);
  for (int64_t bin = begin; bin < end; ++bin) {
    const RoiBin<A> rb = LoadRoiBin(p, rois, offset, bin);
    std::fill(acc.begin(), acc.end(), A(0));
    const T* image = features + rb.image * pixels * p.channels;
    for (int64_t iy = rb.iy_begin; iy < rb.iy_end; ++iy) {
      const A y = RoiSampleCoord(rb.origin_h, rb.step_h, iy);
      for (int64_t ix = rb.ix_begin; ix < rb.ix_end; ++ix) {
        const A x = RoiSampleCoord(rb.origin_w, rb.step_w, ix);
        const RoiSample<A> s = MakeRoiSample(y, x, p.height, p.width);
        if (!s.valid) continue;
        AccumulateBilinearRow(p.channels, image + s.pixel[0] * p.channels,
                              image + s.pixel[1] * p.channels, image + s.pixel[2] * p.channels,
                              image + s.pixel[3] * p.channels, s.weight, acc.data());
      }
    }
    T* out = pooled + bin * p.channels;
    for (int64_t c = 0; c < p.channels; ++c) out[c] = E::Store(acc[c] * rb.scale);
  }
}

template <typename T>
void DeformRoiPoolBackwardFeaturesCpu(const RoiPoolParams& p, const T* grad_pooled,
                                      const AccType<T>* rois, const T* offset,
                                      AccType<T>* grad_features, int64_t channel_begin,
                                      int64_t channel_end) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t pixels = p.height * p.width;
  const int64_t width = channel_end - channel_begin;
  std::vector<A> grad(width);
  for (int64_t bin = 0; bin < p.bins(); ++bin) {
    const RoiBin<A> rb = LoadRoiBin(p, rois, offset, bin);
    if (rb.iy_begin == rb.iy_end || rb.ix_begin == rb.ix_end) continue;
    const T* g = grad_pooled + bin * p.channels + channel_begin;
    for (int64_t c = 0; c < width; ++c) grad[c] = E::Load(g[c]) * rb.scale;
    A* image = grad_features + rb.image * pixels * p.channels + channel_begin;
    for (int64_t iy = rb.iy_begin; iy < rb.iy_end; ++iy) {
      const A y = RoiSampleCoord(rb.origin_h, rb.step_h, iy);
      for (int64_t ix = rb.ix_begin; ix < rb.ix_end; ++ix) {
        const A x = RoiSampleCoord(rb.origin_w, rb.step_w, ix);
        const RoiSample<A> s = MakeRoiSample(y, x, p.height, p.width);
        if (!s.valid) continue;
        // Clamped corners coincide; the four updates are applied one after the other.
        for (int q = 0; q < 4; ++q) {
          A* out = image + s.pixel[q] * p.channels;
          const A w = s.weight[q];
          for (int64_t c = 0; c < width; ++c) out[c] += grad[c] * w;
        }
      }
    }
  }
}

template <typename T>
void DeformRoiPoolBackwardOffsetCpu(const RoiPoolParams& p, const T* grad_pooled,
                                    const T* features, const AccType<T>* rois, const T* offset,
                                    T* grad_offset, int64_t begin, int64_t end) {
  using A = AccType<T>;
  using E = Element<T>;
  const int64_t pixels = p.height * p.width;
  for (int64_t bin = begin; bin < end; ++bin) {
    const RoiBin<A> rb = LoadRoiBin(p, rois, offset, bin);
    A total_y = 0, total_x = 0;
    const T* g = grad_pooled + bin * p.channels;
    const T* image = features + rb.image * pixels * p.channels;
    for (int64_t iy = rb.iy_begin; iy < rb.iy_end; ++iy) {
      const A y = RoiSampleCoord(rb.origin_h, rb.step_h, iy);
      for (int64_t ix = rb.ix_begin; ix < rb.ix_end; ++ix) {
        const A x = RoiSampleCoord(rb.origin_w, rb.step_w, ix);
        const RoiSample<A> s = MakeRoiSample(y, x, p.height, p.width);
        if (!s.valid) continue;
        A dots[4];
        for (int q = 0; q < 4; ++q) {
          const T* f = image + s.pixel[q] * p.channels;
          A d = 0;
          for (int64_t c = 0; c < p.channels; ++c) d += E::Load(g[c]) * E::Load(f[c]);
          dots[q] = d;
        }
        A gy, gx;
        RoiSampleBackward(s, dots, &gy, &gx);
        total_y += gy;
        total_x += gx;
      }
    }
    // d origin / d offset = gamma * roi size; every read of the bin moves with its origin.
    const A gamma = A(p.gamma);
    grad_offset[bin * 2] = E::Store(gamma * rb.roi_h * (total_y * rb.scale));
    grad_offset[bin * 2 + 1] = E::Store(gamma * rb.roi_w * (total_x * rb.scale));
  }
}

template <typename T>
void StoreCpu(const AccType<T>* in, T* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = Element<T>::Store(in[i]);
}

#define FLAXDCN_INSTANTIATE_CPU(T)                                                                \
  template void DeformRoiPoolCpu<T>(const RoiPoolParams&, const T*, const AccType<T>*,           \
                                    const T*, T*, int64_t, int64_t);                             \
  template void DeformRoiPoolBackwardFeaturesCpu<T>(const RoiPoolParams&, const T*,              \
                                                    const AccType<T>*, const T*, AccType<T>*,    \
                                                    int64_t, int64_t);                           \
  template void DeformRoiPoolBackwardOffsetCpu<T>(const RoiPoolParams&, const T*, const T*,      \
                                                  const AccType<T>*, const T*, T*, int64_t,      \
                                                  int64_t);                                      \
  template void StoreCpu<T>(const AccType<T>*, T*, int64_t, int64_t);

FLAXDCN_INSTANTIATE_CPU(float)
FLAXDCN_INSTANTIATE_CPU(double)
FLAXDCN_INSTANTIATE_CPU(Float16)
FLAXDCN_INSTANTIATE_CPU(BFloat16)

#undef FLAXDCN_INSTANTIATE_CPU

}  // namespace flaxdcn
