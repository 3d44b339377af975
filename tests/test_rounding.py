"""Sample coordinates round alike in every build: no fused multiply-add in the shared sampling code.

nvcc contracts ``a + b * s`` into one fused multiply-add (one rounding) unless told otherwise,
and so does a host compiler with FMA hardware under ``-ffp-contract=fast``; a baseline x86-64
build rounds twice. Where the sum is a sample coordinate, the two can fall on either side of an
integer and read other pixels. The shared code (``MulRn`` in the sampling header) rounds each
product on its own; these tests hold both compilers to it:

* device: the coordinate functions compiled to PTX (``nvcc -ptx``, sm_80) contain no ``fma``,
  and no multiply without a rounding mode feeds an addition (ptxas may fuse exactly those);
* host: built with ``-O2 -ffp-contract=fast`` (and ``-mfma`` on x86-64), crafted inputs whose
  fused and twice-rounded coordinates lie on either side of 0 give the twice-rounded one.

The headers are found by what they define, so the tests follow the sources wherever they live
under ``xla_ext/``.
"""

import glob
import os
import platform
import re
import shutil
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The tree whose ``xla_ext/`` is compiled (a copy with the fix reverted, say).
SOURCES = os.path.abspath(os.environ.get("FLAXDCN_ROUNDING_SOURCES", ROOT))


def _header(definition):
  """Path, relative to SOURCES, of the one header under xla_ext/ that holds `definition`."""
  found = []
  for path in sorted(glob.glob(os.path.join(SOURCES, "xla_ext", "**", "*.h"), recursive=True)):
    with open(path) as f:
      if re.search(definition, f.read()):
        found.append(os.path.relpath(path, SOURCES))
  assert len(found) == 1, (definition, found)
  return found[0]


def _includes():
  return "\n".join(f'#include "{_header(d)}"' for d in (
      r"FLAXDCN_HD void Dcnv3Location\(", r"FLAXDCN_HD RoiBin<A> MakeRoiBin\(",
      r"FLAXDCN_HD A RoiSampleCoord\(", r"FLAXDCN_HD void MsDeformAttnLocation\("))


# --- Device: PTX -------------------------------------------------------------------------------

KERNELS = """
#include <cstdint>
{includes}

using namespace flaxdcn;

template <typename A>
__device__ void Locations(const Dcnv3Params& p, const int64_t* ints, const A* reals, A* out) {{
  Dcnv3Location<A>(p, ints[0], ints[1], ints[2], ints[3], reals[0], reals[1], &out[0], &out[1]);
}}

template <typename A>
__device__ void RoiCoords(const RoiPoolParams& p, const A* rois, const int64_t* ints,
                          const A* reals, A* out, int64_t* out_ints) {{
  const RoiBin<A> b = MakeRoiBin<A>(rois, ints[0], ints[1], ints[2], reals[0], reals[1], p);
  out[0] = RoiSampleCoord(b.origin_h, b.step_h, ints[3]);
  out[1] = RoiSampleCoord(b.origin_w, b.step_w, ints[4]);
  out[2] = b.scale;
  out[3] = b.roi_h;
  out[4] = b.roi_w;
  out_ints[0] = b.iy_begin;
  out_ints[1] = b.iy_end;
  out_ints[2] = b.ix_begin;
  out_ints[3] = b.ix_end;
  out_ints[4] = b.valid;
}}

template <typename A>
__device__ void MsdaLocations(const int64_t* ints, const A* reals, A* out) {{
  MsDeformAttnLocation<A>(reals[0], reals[1], ints[0], ints[1], &out[0], &out[1]);
}}

extern "C" __global__ void MsdaLocationF32(const int64_t* i, const float* r, float* o) {{
  MsdaLocations<float>(i, r, o);
}}
extern "C" __global__ void MsdaLocationF64(const int64_t* i, const double* r, double* o) {{
  MsdaLocations<double>(i, r, o);
}}
extern "C" __global__ void Dcnv3LocationF32(Dcnv3Params p, const int64_t* i, const float* r,
                                            float* o) {{
  Locations<float>(p, i, r, o);
}}
extern "C" __global__ void Dcnv3LocationF64(Dcnv3Params p, const int64_t* i, const double* r,
                                            double* o) {{
  Locations<double>(p, i, r, o);
}}
extern "C" __global__ void RoiCoordsF32(RoiPoolParams p, const float* rois, const int64_t* i,
                                        const float* r, float* o, int64_t* oi) {{
  RoiCoords<float>(p, rois, i, r, o, oi);
}}
extern "C" __global__ void RoiCoordsF64(RoiPoolParams p, const double* rois, const int64_t* i,
                                        const double* r, double* o, int64_t* oi) {{
  RoiCoords<double>(p, rois, i, r, o, oi);
}}
"""

ENTRIES = ("Dcnv3LocationF32", "Dcnv3LocationF64", "RoiCoordsF32", "RoiCoordsF64",
           "MsdaLocationF32", "MsdaLocationF64")

_INSTRUCTION = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z]+)((?:\.[a-z0-9]+)*)\s+([^;]*);", re.M)


def contraction_hazards(ptx):
  """Per entry, the PTX instructions that fuse, or that ptxas may fuse, a multiply into an add.

  ``fma``/``mad`` on f32/f64 are fused already. ``mul.f32``/``mul.f64`` without a rounding mode
  (``.rn``, ``.rz``, ``.rm``, ``.rp``) may be contracted by ptxas with an ``add``/``sub`` that
  reads its result; a multiply with a rounding mode never is.
  """
  hazards = {}
  for entry, body in re.findall(r"\.entry\s+(\w+)\s*\(.*?\)\s*\{(.*?)\n\}", ptx, re.S):
    found, bare = [], {}
    instructions = _INSTRUCTION.findall(body)
    for op, mods, operands in instructions:
      mods = mods.split(".")[1:]
      floating = "f32" in mods or "f64" in mods
      if not floating:
        continue
      if op in ("fma", "mad"):
        found.append(f"{op}.{'.'.join(mods)} {operands}")
      elif op == "mul" and not {"rn", "rz", "rm", "rp"} & set(mods):
        bare[operands.split(",")[0].strip()] = f"{op}.{'.'.join(mods)} {operands}"
    for op, mods, operands in instructions:
      if op in ("add", "sub") and ("f32" in mods or "f64" in mods):
        for source in [s.strip() for s in operands.split(",")[1:]]:
          if source in bare:
            found.append(f"{bare[source]} -> {op}{mods} {operands}")
    hazards[entry] = found
  return hazards


def _nvcc_ptx(tmp_path):
  nvcc = shutil.which("nvcc")
  if nvcc is None:
    pytest.skip("no nvcc on PATH")
  source = tmp_path / "rounding.cu"
  source.write_text(KERNELS.format(includes=_includes()))
  ptx = tmp_path / "rounding.ptx"
  run = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_80", "-ptx", f"-I{SOURCES}",
                        str(source), "-o", str(ptx)], capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  return ptx.read_text()


def test_device_coordinates_have_no_fused_multiply_add(tmp_path):
  hazards = contraction_hazards(_nvcc_ptx(tmp_path))
  assert sorted(hazards) == sorted(ENTRIES), sorted(hazards)
  fused = {entry: found for entry, found in hazards.items() if found}
  assert not fused, f"fused or fusable multiply-adds in the coordinate arithmetic: {fused}"


PLANTED_PTX = """
.visible .entry fused(
\t.param .u64 fused_param_0
)
{
\tfma.rn.f32 \t%f3, %f1, %f2, %f4;
\tmul.rn.f32 \t%f5, %f1, %f2;
\tadd.f32 \t%f6, %f5, %f4;
}
.visible .entry bare(
\t.param .u64 bare_param_0
)
{
\tmul.f64 \t%fd3, %fd1, %fd2;
\tadd.f64 \t%fd4, %fd0, %fd3;
\tmul.f32 \t%f7, %f1, %f2;
\tmul.rn.f32 \t%f8, %f7, %f2;
}
"""


def test_the_ptx_check_names_planted_hazards():
  hazards = contraction_hazards(PLANTED_PTX)
  assert hazards["fused"] == ["fma.rn.f32 %f3, %f1, %f2, %f4"], hazards
  # A bare multiply feeding an add is a hazard; one feeding only a multiply is not.
  assert hazards["bare"] == ["mul.f64 %fd3, %fd1, %fd2 -> add.f64 %fd4, %fd0, %fd3"], hazards


# --- Host: a build that contracts --------------------------------------------------------------

HOST = """
#include <cstdio>
#include <cstdlib>
{includes}

// argv: offset_scale dy origin step i x size (C hexadecimal floats and integers).
int main(int argc, char** argv) {{
  if (argc != 8) return 2;
  flaxdcn::Dcnv3Params p{{}};
  p.kernel_h = p.kernel_w = 3;
  p.stride_h = p.stride_w = p.dilation_h = p.dilation_w = 1;
  p.pad_h = p.pad_w = 4;
  p.groups = 1;
  p.offset_scale = std::strtod(argv[1], nullptr);
  const float d = std::strtof(argv[2], nullptr);
  float h, w;
  // Output (0, 0), point (1, 1): h = (0 - 4 + 1) + (1 - 1 + dy) * s = -3 + dy * s; w likewise.
  flaxdcn::Dcnv3Location<float>(p, 0, 0, 1, 1, d, d, &h, &w);
  const float c = flaxdcn::RoiSampleCoord<float>(std::strtof(argv[3], nullptr),
                                                 std::strtof(argv[4], nullptr),
                                                 std::strtoll(argv[5], nullptr, 10));
  // An MSDA location x on a size x size level: w = x * size - 0.5, h likewise.
  const float x = std::strtof(argv[6], nullptr);
  const int64_t size = std::strtoll(argv[7], nullptr, 10);
  float mh, mw;
  flaxdcn::MsDeformAttnLocation<float>(x, x, size, size, &mh, &mw);
  std::printf("%a %a %a %a %a\\n", h, w, c, mh, mw);
  return 0;
}}
"""

#: Crafted so that the exact product is 3 - delta, 0 < delta <= 2^-23: rounded on its own it is 3
#: (the coordinate -3 + 3 = 0), fused with the -3 it is -delta (floor -1, another row).
OFFSET_SCALE = 1.7                       # float32 0x1.b33334p+0
DY = float(np.float32(1.764705777168274))  # 0x1.c3c3c2p+0
ORIGIN, STEP, INDEX = -3.0, float(np.float32(0.24)), 12  # (12 + 0.5) * 0x1.eb851ep-3
#: x * 25 = 0.5 - 1.1e-8 exactly: 0.5 rounded on its own (w = 0), -1.1e-8 fused with the -0.5
#: (floor -1: the pixel column to the left).
MSDA_X, MSDA_SIZE = float(np.float32(0.02)), 25  # 0x1.47ae14p-6


def _twice_rounded(a, x, y):
  f = np.float32
  return float(f(f(a) + f(f(x) * f(y))))


def _fused(a, x, y):
  # float32 products are exact in float64; the sum rounds once, to float32.
  return float(np.float32(float(np.float32(a)) + float(np.float32(x)) * float(np.float32(y))))


def _contracting_flags():
  machine = platform.machine().lower()
  if machine in ("x86_64", "amd64"):
    with open("/proc/cpuinfo") as f:
      if not re.search(r"^flags\s*:.*\bfma\b", f.read(), re.M):
        pytest.skip("this x86-64 CPU has no FMA instructions")
    return ["-mfma"]
  if machine in ("aarch64", "arm64"):
    return []  # FMA is part of the base architecture
  pytest.skip(f"no known FMA flags for {machine}")


def test_host_build_with_fma_contraction_rounds_twice(tmp_path):
  compiler = next((shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++")
                   if c and shutil.which(c)), None)
  if compiler is None:
    pytest.skip("no host C++ compiler")
  flags = _contracting_flags()
  expected = [_twice_rounded(-3.0, DY, OFFSET_SCALE)] * 2 + [
      _twice_rounded(ORIGIN, INDEX + 0.5, STEP)] + [_twice_rounded(-0.5, MSDA_X, MSDA_SIZE)] * 2
  fused = [_fused(-3.0, DY, OFFSET_SCALE)] * 2 + [_fused(ORIGIN, INDEX + 0.5, STEP)] + [
      _fused(-0.5, MSDA_X, MSDA_SIZE)] * 2
  # The inputs tell the two apart, on either side of 0.
  assert expected == [0.0] * 5 and all(-1e-6 < v < 0 for v in fused), (expected, fused)
  source = tmp_path / "host.cc"
  source.write_text(HOST.format(includes=_includes()))
  binary = tmp_path / "host"
  run = subprocess.run([compiler, "-std=c++17", "-O2", "-ffp-contract=fast", *flags,
                        f"-I{SOURCES}", str(source), "-o", str(binary)],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-4000:]
  args = [float(np.float32(OFFSET_SCALE)).hex(), DY.hex(), ORIGIN.hex(), STEP.hex(), str(INDEX),
          MSDA_X.hex(), str(MSDA_SIZE)]
  out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  got = [float.fromhex(v) for v in out.stdout.split()]
  assert got == expected, f"got {got}, twice rounded {expected}, fused {fused}"
