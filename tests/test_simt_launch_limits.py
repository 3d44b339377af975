"""Grids past gridDim.x's limit under the SIMT emulation of tests/test_simt.py.

``GridFor`` turns a unit count into blocks of ``kBlockThreads``. Past 2^31 - 1 blocks a launch
is invalid, and a count past 2^32 would wrap to a small grid that silently skips work: every
launcher must instead return ``cudaErrorInvalidConfiguration`` and launch nothing. The problems
here are described, not allocated (a grid of 2^31 blocks covers 2^39 samples at 256 a block):
each has one input element, so nothing the launchers may touch before the grid is known is
large, and AddressSanitizer stops any kernel that would read past the small buffers. The
deterministic backward modes first reduce max |grad| over every column, which no such problem
can supply; they are left out.

The driver below is compiled with the CUDA sources of ``xla_ext/`` (every ``.cu`` file); the
headers it needs are found by what they declare, wherever they live under ``xla_ext/``.
"""

import glob
import os
import re
import subprocess

import pytest

import test_simt as simt_harness

pytestmark = pytest.mark.simt

DRIVER = r"""
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>

#include "simt.h"
{includes}

namespace fd = flaxdcn;

namespace {{

void Report(const char* what, cudaError_t status, int64_t launches_before) {{
  std::printf("%s %s %" PRId64 "\n", what, cudaGetErrorName(status),
              simt::LaunchCount() - launches_before);
}}

void* Buffer() {{
  void* p = nullptr;
  if (cudaMalloc(&p, 4096) != cudaSuccess) std::abort();
  std::memset(p, 0, 4096);
  return p;
}}

}}  // namespace

int main() {{
  // GridFor at its boundary: 2^31 - 1 blocks of 256 units (1 lane) or 8 units (32 lanes).
  const int64_t kMax = 2147483647;
  const struct {{ int64_t units; int lanes; }} grids[] = {{
      {{kMax * 256, 1}}, {{kMax * 256 + 1, 1}}, {{kMax * 8, 32}}, {{kMax * 8 + 1, 32}},
      {{int64_t{{1}} << 40, 1}}, {{INT64_MAX, 1}}, {{INT64_MAX, 32}}, {{1, 1}}}};
  for (const auto& g : grids) {{
    unsigned int grid = 12345;
    const cudaError_t status = fd::cuda::GridFor(g.units, g.lanes, &grid);
    std::printf("GridFor %" PRId64 " %d %s %u\n", g.units, g.lanes, cudaGetErrorName(status),
                grid);
  }}

  void* a = Buffer();  // every operand: one element, or unused
  void* b = Buffer();
  void* c = Buffer();
  void* d = Buffer();
  void* e = Buffer();
  void* f = Buffer();
  void* g = Buffer();
  // Units 2^39 (2^31 blocks: one past the limit) and 2^40 (2^32 blocks: wraps to 0 in 32 bits).
  for (const int64_t rows : {{int64_t{{1}} << 19, int64_t{{1}} << 20}}) {{
    const std::string tag = rows == (int64_t{{1}} << 19) ? "2^31" : "2^32";
    int64_t before;

    fd::ConvParams conv{{}};
    conv.batch = conv.height = conv.width = conv.channels = 1;
    conv.out_height = rows;
    conv.out_width = int64_t{{1}} << 20;
    conv.kernel_h = conv.kernel_w = conv.stride_h = conv.stride_w = 1;
    conv.dilation_h = conv.dilation_w = conv.offset_groups = 1;
    conv.has_mask = true;
    before = simt::LaunchCount();
    Report(("conv-forward-" + tag).c_str(),
           fd::LaunchDeformIm2col(nullptr, fd::ElementType::kF32, conv, a, b, c, d), before);
    before = simt::LaunchCount();
    Report(("conv-backward-" + tag).c_str(),
           fd::LaunchDeformIm2colBackward(nullptr, fd::ElementType::kF32, conv, false, a, b, c,
                                          d, e, f, g, nullptr),
           before);

    fd::RoiPoolParams roi{{}};
    roi.batch = roi.height = roi.width = roi.channels = roi.rois = 1;
    roi.out_height = rows;
    roi.out_width = int64_t{{1}} << 20;
    roi.spatial_scale = 1.0;
    roi.gamma = 0.1;
    roi.has_offsets = true;
    before = simt::LaunchCount();
    Report(("roi-forward-" + tag).c_str(),
           fd::LaunchDeformRoiPool(nullptr, fd::ElementType::kF32, roi, a, b, c, d), before);
    before = simt::LaunchCount();
    Report(("roi-backward-" + tag).c_str(),
           fd::LaunchDeformRoiPoolBackward(nullptr, fd::ElementType::kF32, roi, false, a, b, c, d,
                                           e, f, nullptr),
           before);

    for (const bool v4 : {{false, true}}) {{
      fd::Dcnv3Params p{{}};
      p.batch = p.height = p.width = p.channels = p.groups = 1;
      p.out_height = rows;
      p.out_width = int64_t{{1}} << 20;
      p.kernel_h = p.kernel_w = p.stride_h = p.stride_w = p.dilation_h = p.dilation_w = 1;
      p.offset_scale = 1.0;
      // DCNv3: offsets (strides 2, 2), mask (1, 1). DCNv4: one row of 8 per position, 3 used.
      p.offset_stride = v4 ? 8 : 2;
      p.offset_group_stride = v4 ? 3 : 2;
      p.mask_stride = v4 ? 8 : 1;
      p.mask_group_stride = v4 ? 3 : 1;
      p.pad_channels_begin = v4 ? 3 : 0;
      const std::string name = std::string(v4 ? "dcnv4" : "dcnv3");
      before = simt::LaunchCount();
      Report((name + "-forward-" + tag).c_str(),
             fd::LaunchDcnv3(nullptr, fd::ElementType::kF32, p, a, b, c, d), before);
      before = simt::LaunchCount();
      Report((name + "-backward-" + tag).c_str(),
             fd::LaunchDcnv3Backward(nullptr, fd::ElementType::kF32, p, false, a, b, c, d, e, f,
                                     g, nullptr),
             before);
    }}
  }}
  return 0;
}}
"""

#: What each header must declare (one header each; several may be the same file).
DECLARATIONS = (r"cudaError_t GridFor\(", r"cudaError_t LaunchDeformIm2col\(",
                r"cudaError_t LaunchDeformRoiPool\(", r"cudaError_t LaunchDcnv3\(")


def _headers(root):
  headers = []
  candidates = sorted(glob.glob(os.path.join(root, "xla_ext", "**", "*.h"), recursive=True)
                      + glob.glob(os.path.join(root, "xla_ext", "**", "*.cuh"), recursive=True))
  for declaration in DECLARATIONS:
    found = []
    for path in candidates:
      with open(path) as f:
        if re.search(declaration, f.read()):
          found.append(os.path.relpath(path, root))
    assert len(found) == 1, (declaration, found)
    if found[0] not in headers:
      headers.append(found[0])
  return headers


@pytest.fixture(scope="session")
def limits_driver(tmp_path_factory):
  root = simt_harness.SOURCES
  folder = tmp_path_factory.mktemp("launch_limits")
  includes = "\n".join(f'#include "{h}"' for h in _headers(root))
  (folder / "launch_limits.cc").write_text(DRIVER.format(includes=includes))
  cuda = sorted(os.path.relpath(p, root)
                for p in glob.glob(os.path.join(root, "xla_ext", "**", "*.cu"), recursive=True))
  assert cuda, root
  return simt_harness._session_build(  # pylint: disable=protected-access
      [(root, path) for path in cuda], [(str(folder), "launch_limits.cc")])


def test_grids_past_the_launch_limit_are_errors_not_launches(limits_driver):
  run = subprocess.run([limits_driver], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
  assert run.returncode == 0, run.stderr[-6000:]
  lines = [line.split() for line in run.stdout.splitlines()]
  grid_for = [line[1:] for line in lines if line[0] == "GridFor"]
  limit = 2**31 - 1
  assert grid_for == [
      [str(limit * 256), "1", "cudaSuccess", str(limit)],
      [str(limit * 256 + 1), "1", "cudaErrorInvalidConfiguration", "12345"],
      [str(limit * 8), "32", "cudaSuccess", str(limit)],
      [str(limit * 8 + 1), "32", "cudaErrorInvalidConfiguration", "12345"],
      [str(2**40), "1", "cudaErrorInvalidConfiguration", "12345"],
      [str(2**63 - 1), "1", "cudaErrorInvalidConfiguration", "12345"],
      [str(2**63 - 1), "32", "cudaErrorInvalidConfiguration", "12345"],
      ["1", "1", "cudaSuccess", "1"],
  ], run.stdout
  launchers = {line[0]: line[1:] for line in lines if line[0] != "GridFor"}
  names = [f"{op}-{way}-{tag}" for tag in ("2^31", "2^32")
           for op in ("conv", "roi", "dcnv3", "dcnv4") for way in ("forward", "backward")]
  assert sorted(launchers) == sorted(names), run.stdout
  wrong = {k: v for k, v in launchers.items() if v != ["cudaErrorInvalidConfiguration", "0"]}
  assert not wrong, f"not an error, or launched (status, launches): {wrong}"
