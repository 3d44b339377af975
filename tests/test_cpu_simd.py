"""The AVX2 copies of the CPU kernels compute the same bits as the baseline x86-64 build.

``xla_ext/cpu/ms_deform_attn_kernels.cc`` compiles its kernels twice on x86-64, once for the
baseline instruction set and once for AVX2 (chosen when called, where the CPU has it), with the
same operations in the same order and no fused multiply-add. A small driver runs the forward and
both backward stages on every element type, with boundary and non-finite locations, built with
and without the AVX2 copy (``-DFLAXDCN_CPU_AVX2=0``); the outputs must be equal bit for bit.
"""

import os
import platform
import re
import subprocess

import pytest
from host_build_testing import host_compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "xla_ext/cpu/ms_deform_attn_kernels.h"

namespace fd = flaxdcn;

template <typename T>
void Print(const std::vector<T>& v) {
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(T); ++i) std::printf("%02x", bytes[i]);
  std::printf("\n");
}

// D = 40: two 16-channel chunks and a tail in the forward; blocks 1 and 3 in the backward.
template <typename T>
void Run() {
  using A = fd::AccType<T>;
  fd::MsDeformAttnParams p{};
  p.batch = 2; p.queries = 9; p.heads = 3; p.head_channels = 40; p.points = 3; p.levels = 3;
  p.channels = p.heads * p.head_channels;
  const int64_t sizes[][2] = {{7, 5}, {3, 4}, {1, 1}};
  for (int64_t l = 0; l < p.levels; ++l) {
    p.height[l] = sizes[l][0];
    p.width[l] = sizes[l][1];
    p.level_start[l] = p.values;
    p.values += sizes[l][0] * sizes[l][1];
  }
  const double special[] = {NAN, INFINITY, -INFINITY, 1e30, 0.0, 1.0, 0.5, -0.1, 0.1, 0.25};
  std::vector<T> value(p.batch * p.values * p.channels), weights(p.samples());
  std::vector<T> cot(p.units() * p.head_channels), out(cot.size());
  std::vector<A> locations(2 * p.samples());
  for (size_t i = 0; i < value.size(); ++i) value[i] = fd::Element<T>::Store(A(std::sin(0.37 * i)));
  for (size_t i = 0; i < weights.size(); ++i) weights[i] = fd::Element<T>::Store(A(std::cos(i)));
  for (size_t i = 0; i < cot.size(); ++i) cot[i] = fd::Element<T>::Store(A(std::sin(1.3 * i)));
  for (size_t i = 0; i < locations.size(); ++i) {
    locations[i] = i % 7 == 0 ? A(special[(i / 7) % 10]) : A(0.6 + 0.7 * std::sin(0.91 * i));
  }
  fd::MsDeformAttnCpu<T>(p, value.data(), locations.data(), weights.data(), out.data(), 0,
                         p.batch * p.queries);
  Print(out);
  for (int64_t blocks : {1, 3}) {
    std::vector<T> grad_value(value.size()), grad_weights(weights.size());
    std::vector<A> grad_locations(locations.size()), partial(p.samples() * blocks * 4);
    for (int64_t task = 0; task < p.batch * p.heads * blocks; ++task) {
      fd::MsDeformAttnBackwardValueCpu<T>(
          p, blocks, task, cot.data(), value.data(), locations.data(), weights.data(),
          grad_value.data(), partial.data(), blocks == 1 ? grad_locations.data() : nullptr,
          blocks == 1 ? grad_weights.data() : nullptr);
    }
    if (blocks > 1) {
      fd::MsDeformAttnBackwardSamplingCpu<T>(p, blocks, partial.data(), locations.data(),
                                             weights.data(), grad_locations.data(),
                                             grad_weights.data(), 0, p.batch * p.queries);
    }
    Print(grad_value);
    Print(grad_locations);
    Print(grad_weights);
  }
}

int main() {
  Run<float>();
  Run<double>();
  Run<fd::Float16>();
  Run<fd::BFloat16>();
  return 0;
}
"""


def _has_avx2():
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  with open("/proc/cpuinfo") as f:
    return re.search(r"^flags\s*:.*\bavx2\b", f.read(), re.M) is not None


@pytest.mark.skipif(not _has_avx2(), reason="needs an x86-64 CPU with AVX2 (Linux)")
def test_avx2_kernels_compute_the_baseline_bits(tmp_path):
  compiler = host_compiler()
  if compiler is None:
    pytest.skip("no C++ compiler (set CXX)")
  source = tmp_path / "driver.cc"
  source.write_text(DRIVER)
  outputs = []
  for name, flags in (("avx2", []), ("baseline", ["-DFLAXDCN_CPU_AVX2=0"])):
    binary = tmp_path / name
    build = subprocess.run(
        [compiler, "-std=c++17", "-O3", *flags, f"-I{ROOT}", str(source),
         os.path.join(ROOT, "xla_ext", "cpu", "ms_deform_attn_kernels.cc"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    outputs.append(run.stdout.splitlines())
  avx2, baseline = outputs
  assert len(avx2) == len(baseline) == 4 * 7
  for i, (a, b) in enumerate(zip(avx2, baseline)):
    assert a == b, f"output {i} (dtype {i // 7}) differs between the AVX2 and baseline builds"
