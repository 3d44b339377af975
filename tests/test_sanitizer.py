"""The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

A small C++ driver calls the kernel functions of xla_ext/cpu/deform_conv_kernels.cc,
xla_ext/cpu/roi_pool_kernels.cc and xla_ext/cpu/ms_deform_attn_kernels.cc directly, on exactly
sized heap buffers, with huge, infinite and NaN offsets and sampling locations, RoIs outside the
image (and of every degenerate kind) and invalid batch indices, in both RoI forms ([R, 5] and per
image), for every element type.
Any out-of-bounds access, float-to-int overflow or other undefined behaviour aborts the run; the
driver also checks that every output is finite.
"""

import os
import subprocess

import pytest
from host_build_testing import host_compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <vector>

#include "xla_ext/cpu/deform_conv_kernels.h"
#include "xla_ext/cpu/ms_deform_attn_kernels.h"
#include "xla_ext/cpu/roi_pool_kernels.h"

namespace fd = flaxdcn;

// Exactly sized heap buffers, so that the sanitizer sees any access one past the end.
template <typename T>
struct Buffer {
  explicit Buffer(int64_t n) : size(n), data(new T[n > 0 ? n : 1]) {}
  int64_t size;
  std::unique_ptr<T[]> data;
  T* get() { return data.get(); }
};

template <typename T>
float ToFloat(T x) { return static_cast<float>(fd::Element<T>::Load(x)); }

template <typename T>
bool AllFinite(Buffer<T>& b, const char* what) {
  for (int64_t i = 0; i < b.size; ++i) {
    if (!std::isfinite(ToFloat(b.get()[i]))) {
      std::fprintf(stderr, "non-finite %s at %lld\n", what, static_cast<long long>(i));
      return false;
    }
  }
  return true;
}

const double kNan = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();
// Offsets that land exactly on the boundary rule's edges, just inside them (the last row and
// column), far outside, or nowhere at all.
const double kSpecial[] = {kNan, kInf, -kInf, 1e30, -1e30, 3e38, -3e38, 9.3e18, -9.3e18,
                           2147483648.0, -1.0, 0.0, 5.0, 4.0, -0.5, 1e-30, 0.25, 65504.0,
                           0.5, 1.5, 2.5, 3.5, 4.5, 5.5, -1.5, 3.75};
const int64_t kSpecials = sizeof(kSpecial) / sizeof(kSpecial[0]);

template <typename T>
T Make(double x) { return fd::Element<T>::Store(static_cast<fd::AccType<T>>(x)); }

// One deformable im2col and its backward; offset i is kSpecial[(7 i + shift) % kSpecials].
template <typename T>
bool Conv(int64_t shift) {
  fd::ConvParams p{};
  p.batch = 2; p.height = 5; p.width = 4; p.channels = 6;
  p.kernel_h = 3; p.kernel_w = 2; p.stride_h = 2; p.stride_w = 1; p.pad_h = 1; p.pad_w = 0;
  p.dilation_h = 2; p.dilation_w = 1; p.offset_groups = 3; p.has_mask = true;
  p.out_height = 2; p.out_width = 5;
  const int64_t gk = p.offset_groups * p.kernel_points();
  Buffer<T> input(p.batch * p.height * p.width * p.channels);
  Buffer<T> offset(p.batch * p.positions() * gk * 2), mask(p.batch * p.positions() * gk);
  Buffer<T> columns(p.batch * p.positions() * p.kernel_points() * p.channels);
  for (int64_t i = 0; i < input.size; ++i) input.get()[i] = Make<T>(std::sin(0.7 * i));
  for (int64_t i = 0; i < offset.size; ++i) {
    offset.get()[i] = Make<T>(kSpecial[(i * 7 + shift) % kSpecials]);
  }
  for (int64_t i = 0; i < mask.size; ++i) mask.get()[i] = Make<T>(0.5 + 0.4 * std::cos(1.3 * i));
  for (int64_t i = 0; i < columns.size; ++i) columns.get()[i] = Make<T>(std::cos(0.3 * i));
  fd::DeformIm2colCpu<T>(p, input.get(), offset.get(), mask.get(), columns.get(), 0,
                         p.batch * p.positions());
  Buffer<T> grad_input(input.size), grad_offset(offset.size), grad_mask(mask.size);
  for (int64_t blocks : {1, 2}) {
    Buffer<fd::AccType<T>> partial(p.samples() * blocks * 4);
    for (int64_t task = 0; task < p.batch * p.offset_groups * blocks; ++task) {
      fd::DeformIm2colBackwardInputCpu<T>(p, blocks, task, columns.get(), input.get(),
                                          offset.get(), mask.get(), grad_input.get(),
                                          partial.get());
    }
    fd::DeformIm2colBackwardCoordCpu<T>(p, blocks, partial.get(), offset.get(), mask.get(),
                                        grad_offset.get(), grad_mask.get(), 0,
                                        p.batch * p.positions());
  }
  // Fresh forward: the backward above used the columns buffer as a cotangent.
  fd::DeformIm2colCpu<T>(p, input.get(), offset.get(), mask.get(), columns.get(), 0,
                         p.batch * p.positions());
  return AllFinite(columns, "columns") && AllFinite(grad_input, "grad_input") &&
         AllFinite(grad_offset, "grad_offset") && AllFinite(grad_mask, "grad_mask");
}

// per_image: the same boxes as rois [N, R / N, 4] (the index column dropped, image r / (R / N)).
template <typename T>
bool Roi(int64_t sampling_ratio, bool per_image) {
  using A = fd::AccType<T>;
  fd::RoiPoolParams p{};
  p.batch = 2; p.height = 5; p.width = 6; p.channels = 3; p.out_height = 3; p.out_width = 2;
  p.spatial_scale = 0.5; p.sampling_ratio = sampling_ratio; p.gamma = 0.1; p.has_offsets = true;
  const double rois_data[][5] = {
      {0, 1, 1, 9, 7}, {1, -20, -20, 40, 30}, {0, 30, 30, 50, 40}, {1, 9, 9, 2, 2},
      {0, 3, 3, 3, 3}, {-1, 1, 1, 5, 5}, {2, 1, 1, 5, 5}, {kNan, 1, 1, 5, 5},
      {1e30, 1, 1, 5, 5}, {0, kNan, 1, 5, 5}, {1, 1, 1, kInf, 5}, {0, -kInf, -kInf, kInf, kInf},
      {0, -1e8, -1e8, 1e8, 1e8}, {1, -1e30, -1e30, 1e30, 1e30}, {0.9, -3, -3, -1, -1},
      {1, 11, 9, 13, 11}};
  p.rois = sizeof(rois_data) / sizeof(rois_data[0]);
  p.rois_per_image = per_image ? p.rois / p.batch : 0;
  const int64_t width = per_image ? 4 : 5;
  Buffer<A> rois(p.rois * width);
  for (int64_t i = 0; i < rois.size; ++i) {
    rois.get()[i] = static_cast<A>(rois_data[i / width][i % width + 5 - width]);
  }
  Buffer<T> features(p.batch * p.height * p.width * p.channels);
  Buffer<T> offset(p.bins() * 2), pooled(p.bins() * p.channels);
  for (int64_t i = 0; i < features.size; ++i) features.get()[i] = Make<T>(std::sin(0.9 * i));
  for (int64_t i = 0; i < offset.size; ++i) {
    offset.get()[i] = Make<T>(i % 3 ? std::sin(1.1 * i) : kSpecial[(i * 5) % kSpecials]);
  }
  fd::DeformRoiPoolCpu<T>(p, features.get(), rois.get(), offset.get(), pooled.get(), 0, p.bins());
  Buffer<A> grad_acc(features.size);
  for (int64_t i = 0; i < grad_acc.size; ++i) grad_acc.get()[i] = 0;
  for (int64_t c = 0; c < p.channels; c += 2) {
    const int64_t end = c + 2 < p.channels ? c + 2 : p.channels;
    fd::DeformRoiPoolBackwardFeaturesCpu<T>(p, pooled.get(), rois.get(), offset.get(),
                                            grad_acc.get(), c, end);
  }
  Buffer<T> grad_features(features.size), grad_offset(offset.size);
  fd::StoreCpu<T>(grad_acc.get(), grad_features.get(), 0, features.size);
  fd::DeformRoiPoolBackwardOffsetCpu<T>(p, pooled.get(), features.get(), rois.get(), offset.get(),
                                        grad_offset.get(), 0, p.bins());
  return AllFinite(pooled, "pooled") && AllFinite(grad_features, "grad_features") &&
         AllFinite(grad_offset, "grad_offset");
}

// One multi-scale deformable attention and its backward (one and two channel blocks: D = 17 takes
// the forward's 16-channel chunks and their tail); location i is kSpecial[(7 i + shift) %
// kSpecials], scaled by 0.2 at every other i so that many land inside the levels.
template <typename T>
bool Msda(int64_t shift) {
  using A = fd::AccType<T>;
  fd::MsDeformAttnParams p{};
  p.batch = 2; p.queries = 5; p.heads = 3; p.head_channels = 17; p.points = 2; p.levels = 3;
  p.channels = p.heads * p.head_channels;
  const int64_t sizes[][2] = {{5, 3}, {2, 4}, {1, 1}};
  for (int64_t l = 0; l < p.levels; ++l) {
    p.height[l] = sizes[l][0];
    p.width[l] = sizes[l][1];
    p.level_start[l] = p.values;
    p.values += sizes[l][0] * sizes[l][1];
  }
  Buffer<T> value(p.batch * p.values * p.channels), weights(p.samples());
  Buffer<A> locations(2 * p.samples());
  Buffer<T> out(p.units() * p.head_channels);
  for (int64_t i = 0; i < value.size; ++i) value.get()[i] = Make<T>(std::sin(0.7 * i));
  for (int64_t i = 0; i < locations.size; ++i) {
    locations.get()[i] = static_cast<A>(kSpecial[(i * 7 + shift) % kSpecials] * (i % 2 ? 1 : 0.2));
  }
  for (int64_t i = 0; i < weights.size; ++i) weights.get()[i] = Make<T>(0.5 + 0.4 * std::cos(i));
  for (int64_t i = 0; i < out.size; ++i) out.get()[i] = Make<T>(std::cos(0.3 * i));
  Buffer<T> grad_value(value.size), grad_weights(weights.size);
  Buffer<A> grad_locations(locations.size);
  for (int64_t blocks : {1, 2}) {  // one block: no stage 2
    Buffer<A> partial(blocks > 1 ? p.samples() * blocks * 4 : 0);
    for (int64_t task = 0; task < p.batch * p.heads * blocks; ++task) {
      fd::MsDeformAttnBackwardValueCpu<T>(p, blocks, task, out.get(), value.get(),
                                          locations.get(), weights.get(), grad_value.get(),
                                          blocks > 1 ? partial.get() : nullptr,
                                          blocks > 1 ? nullptr : grad_locations.get(),
                                          blocks > 1 ? nullptr : grad_weights.get());
    }
    if (blocks > 1) {
      fd::MsDeformAttnBackwardSamplingCpu<T>(p, blocks, partial.get(), locations.get(),
                                             weights.get(), grad_locations.get(),
                                             grad_weights.get(), 0, p.batch * p.queries);
    }
  }
  // The forward after the backward, which used the out buffer as a cotangent.
  fd::MsDeformAttnCpu<T>(p, value.get(), locations.get(), weights.get(), out.get(), 0,
                         p.batch * p.queries);
  bool finite = true;
  for (int64_t i = 0; i < grad_locations.size; ++i) {
    if (!std::isfinite(static_cast<double>(grad_locations.get()[i]))) {
      std::fprintf(stderr, "non-finite grad_locations at %lld\n", static_cast<long long>(i));
      finite = false;
    }
  }
  return finite && AllFinite(out, "msda out") && AllFinite(grad_value, "msda grad_value") &&
         AllFinite(grad_weights, "msda grad_weights");
}

template <typename T>
bool All() {
  for (int64_t shift = 0; shift < kSpecials; ++shift) {
    if (!Conv<T>(shift) || !Msda<T>(shift)) return false;
  }
  return Roi<T>(0, false) && Roi<T>(2, false) && Roi<T>(0, true) && Roi<T>(2, true);
}

int main() {
  const bool ok = All<float>() && All<double>() && All<fd::Float16>() && All<fd::BFloat16>();
  return ok ? 0 : 1;
}
"""

#: The op families whose CPU kernels (xla_ext/cpu/<op>_kernels.cc) the driver calls.
KERNEL_OPS = ("deform_conv", "roi_pool", "ms_deform_attn")
FLAGS = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer",
         "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]


@pytest.mark.slow
def test_cpu_kernels_under_sanitizers(tmp_path):
  compiler = host_compiler()
  if compiler is None:
    pytest.skip("no C++ compiler (set CXX) to build the sanitizer driver")
  probe = tmp_path / "probe.cc"
  probe.write_text("int main() { return 0; }\n")
  if subprocess.run([compiler, *FLAGS, str(probe), "-o", str(tmp_path / "probe")],
                    capture_output=True).returncode != 0:
    pytest.skip(f"{compiler} cannot build with -fsanitize=address,undefined here")
  driver = tmp_path / "driver.cc"
  driver.write_text(DRIVER)
  binary = tmp_path / "driver"
  build = subprocess.run(
      [compiler, *FLAGS, f"-I{ROOT}", str(driver),
       *(os.path.join(ROOT, "xla_ext", "cpu", f"{op}_kernels.cc") for op in KERNEL_OPS),
       "-o", str(binary)], capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-6000:]
  env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
             UBSAN_OPTIONS="print_stacktrace=1")
  run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300, env=env)
  assert run.returncode == 0, run.stderr[-6000:]
  assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr, run.stderr
