// The channel loops of the CPU kernels, on rows of contiguous channels (channels last): the
// bilinear read of one sample's four corner rows, and its backward (the scatter of a cotangent
// row into four grad rows and the four dot products that give the sample's coordinate gradient).
// Shared by the deformable im2col, RoI pooling and DCNv3 kernels; each computes in the
// accumulation type of T, one expression per channel in a fixed order, so results do not depend
// on the kernel that calls them.

#ifndef FLAXDCN_XLA_EXT_CPU_CHANNEL_ROWS_H_
#define FLAXDCN_XLA_EXT_CPU_CHANNEL_ROWS_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "xla_ext/cpu/types.h"

namespace flaxdcn {

// Interleaved partial sums of the channel reductions (a multiple of the SIMD width).
constexpr int kLanes = 8;

// out[c] = Store(sum_q weight[q] * in_q[c]) for c in [0, width).
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

// acc[c] += sum_q weight[q] * in_q[c] for c in [0, width).
template <typename T>
inline void AccumulateBilinearRow(int64_t width, const T* __restrict in0, const T* __restrict in1,
                                  const T* __restrict in2, const T* __restrict in3,
                                  const AccType<T>* weight, AccType<T>* __restrict acc) {
  using A = AccType<T>;
  using E = Element<T>;
  const A w0 = weight[0], w1 = weight[1], w2 = weight[2], w3 = weight[3];
  for (int64_t c = 0; c < width; ++c) {
    acc[c] += w0 * E::Load(in0[c]) + w1 * E::Load(in1[c]) + w2 * E::Load(in2[c]) +
              w3 * E::Load(in3[c]);
  }
}

// For c in [0, width): out_q[c] += grad[c] * weight[q], and dots[q] = sum_c grad[c] * in_q[c].
// `grad` holds elements of G: T as stored, or its accumulation type (a row loaded once for
// several samples). The reductions run in kLanes interleaved partial sums, added in lane order at
// the end, so the loop vectorises without reassociating float math. The restrict-qualified
// parameters state what the callers guarantee: the four output rows are distinct pixels (or
// distinct sink rows).
template <typename G, typename T>
inline void ScatterAndReduce(int64_t width, const G* __restrict grad, const T* __restrict in0,
                             const T* __restrict in1, const T* __restrict in2,
                             const T* __restrict in3, const AccType<T>* weight,
                             AccType<T>* __restrict out0, AccType<T>* __restrict out1,
                             AccType<T>* __restrict out2, AccType<T>* __restrict out3,
                             AccType<T>* dots) {
  using A = AccType<T>;
  using E = Element<T>;
  static_assert(std::is_same_v<AccType<G>, A>, "grad in T or in its accumulation type");
  const A w0 = weight[0], w1 = weight[1], w2 = weight[2], w3 = weight[3];
  A p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= width; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A gv = Element<G>::Load(grad[c + l]);
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
    const A gv = Element<G>::Load(grad[c]);
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

// Task `task` of a backward's (image, group, channel block) partition, `blocks` blocks of each
// group's `group_channels` channels (parallel.h's BackwardChannelBlocks): image n, group g, and
// the block's channels [begin, begin + width) of the C channels.
struct ChannelBlock {
  int64_t n, g, b, begin, width;
};

inline ChannelBlock ChannelBlockOf(int64_t task, int64_t blocks, int64_t groups,
                                   int64_t group_channels) {
  const int64_t block_width = (group_channels + blocks - 1) / blocks;
  ChannelBlock k;
  k.b = task % blocks;
  k.g = (task / blocks) % groups;
  k.n = task / (blocks * groups);
  k.begin = k.g * group_channels + k.b * block_width;
  k.width = std::min(block_width, group_channels - k.b * block_width);
  return k;
}

// dst[pixel * channels + c] = Store(acc[pixel * width + c]) for the `pixels` rows of `width`
// channels of a block's accumulation buffer.
template <typename T>
inline void StoreBlock(int64_t pixels, int64_t width, int64_t channels, const AccType<T>* acc,
                       T* dst) {
  for (int64_t pixel = 0; pixel < pixels; ++pixel) {
    for (int64_t c = 0; c < width; ++c) {
      dst[pixel * channels + c] = Element<T>::Store(acc[pixel * width + c]);
    }
  }
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_CPU_CHANNEL_ROWS_H_
