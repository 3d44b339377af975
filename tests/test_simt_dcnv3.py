"""The DCNv3 / DCNv4 CUDA launchers (``xla_ext/cuda/dcnv3_kernels.cu``) under the SIMT emulation
of tests/test_simt.py, against the CPU kernels (``xla_ext/cpu/dcnv3_kernels.cc``).

The build, the driver, the case files and the comparisons are tests/test_simt.py's; the driver's
cases are ``tests/simt/dcnv3_cases.cc``. Each case runs the forward and both backward modes under
two block orders on garbage-filled outputs: the CUDA results must match the CPU kernels within
``tests/tolerances.py``, the forward and the sampling gradients must be bitwise equal across
orders, and so must every deterministic-mode gradient. ``pytest -m simt`` selects these tests.
"""

import numpy as np
import pytest

from test_simt import DTYPE_PARAMS, Case, _as, _bitwise, _compare, _run, driver  # noqa: F401

pytestmark = pytest.mark.simt

#: (N, H, W, C, G, (kh, kw), (sh, sw), (ph, pw), (dh, dw), offset_scale, remove_center).
#: Group channels 1, 2, 4, 5, 8, 16, 24, 32 and 33: wide-vector and scalar paths, 1 to 32 lanes.
CASES = {
    "odd-G3-Cg2": (2, 7, 6, 6, 3, (3, 3), (2, 1), (1, 0), (2, 1), 0.7, False),
    "remove_center-Cg4": (1, 5, 6, 8, 2, (3, 5), (1, 1), (2, 1), (1, 1), 1.3, True),
    "2x3-Cg1": (1, 5, 6, 4, 4, (2, 3), (1, 1), (0, 2), (1, 1), 1.0, False),
    "d2-Cg5": (1, 6, 5, 5, 1, (3, 3), (1, 1), (1, 1), (2, 2), 2.0, True),
    "Cg8": (2, 4, 5, 16, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
    "Cg16-s12": (1, 5, 6, 64, 4, (1, 3), (1, 2), (0, 1), (1, 1), 0.5, False),
    "Cg24": (1, 4, 4, 48, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, True),
    "Cg32": (1, 4, 3, 32, 1, (3, 3), (2, 2), (1, 1), (1, 1), 1.0, False),
    "Cg33": (1, 3, 4, 33, 1, (3, 3), (1, 1), (1, 1), (1, 1), 0.8, False),
}

#: No samples (an empty batch) and no channels: every gradient comes back fully written.
EMPTY_CASES = {
    "no-images": (0, 4, 4, 4, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
    "no-channels": (1, 4, 4, 0, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
}


def _special(size):
  return [-1.0, -1 + 2**-20, -0.5, 0.0, size - 1.0, size - 0.5, float(size), 1e30, -1e30,
          np.inf, -np.inf, np.nan]


def dcnv3_case(dtype, geometry, layout, *, seed=0, misalign=0):
  n, h, w, c, g, (kh, kw), (sh, sw), (ph, pw), (dh, dw), scale, remove_center = geometry
  ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
  wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
  p = kh * kw - int(remove_center)
  rng = np.random.default_rng(seed)
  inputs = rng.normal(size=(n, h, w, c))
  offsets = 2.0 * rng.normal(size=(n, ho, wo, g, p, 2))
  # A quarter of the offsets are special values: the boundary coordinates (which a centre point
  # with offset_scale 1 samples exactly), huge, infinite or NaN.
  pick = rng.uniform(size=offsets.shape) < 1 / 4
  values = np.asarray(_special(h))[rng.integers(len(_special(h)), size=offsets.shape)]
  offsets = np.where(pick, values, offsets)
  mask = rng.uniform(-1.0, 1.0, size=(n, ho, wo, g, p))
  cotangent = rng.normal(size=(n, ho, wo, c))
  if layout == 3:
    arrays = dict(offset=offsets.reshape(n, ho, wo, g * p * 2), mask=mask.reshape(n, ho, wo, g * p))
  else:
    d = -(-g * p * 3 // 8) * 8
    packed = np.concatenate([offsets.reshape(n, ho, wo, g, 2 * p), mask], -1)  # per group
    packed = packed.reshape(n, ho, wo, g * p * 3)
    padding = rng.normal(size=(n, ho, wo, d - g * p * 3)) * 1e3  # ignored
    arrays = dict(offset=np.concatenate([packed, padding], -1), mask=np.zeros(0))
  arrays = {k: _as(dtype, v) for k, v in dict(input=inputs, cotangent=cotangent,
                                                **arrays).items()}
  return Case("dcnv3", dtype, arrays, batch=n, height=h, width=w, channels=c, out_height=ho,
              out_width=wo, kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw, pad_h=ph,
              pad_w=pw, dilation_h=dh, dilation_w=dw, groups=g, offset_scale=repr(scale),
              remove_center=int(remove_center), layout=layout, misalign=misalign)


def check(case):
  _compare(case, "cuda_out_a", "cpu_out", "out")
  names = ("grad_input", "grad_offset") + (("grad_mask",) if case.spec["layout"] == 3 else ())
  for mode in ("atomic", "det"):
    for name in names:
      _compare(case, f"cuda_{mode}_{name}_a", f"cpu_{name}", f"{mode} {name}")
  _bitwise(case, "cuda_out_a", "cuda_out_b", "out")
  for name in names[1:]:
    _bitwise(case, f"cuda_atomic_{name}_a", f"cuda_atomic_{name}_b", f"atomic {name}")
  for name in names:
    _bitwise(case, f"cuda_det_{name}_a", f"cuda_det_{name}_b", f"deterministic {name}")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_dcnv3_launchers_match_cpu(driver, tmp_path, dtype):
  """Both layouts, every case, 16-byte-aligned and misaligned (scalar path) buffers."""
  cases = [dcnv3_case(dtype, geometry, layout, seed=i)
           for i, geometry in enumerate(CASES.values()) for layout in (3, 4)]
  cases += [dcnv3_case(dtype, CASES[name], layout, seed=20 + i, misalign=1)
            for i, name in enumerate(["Cg8", "Cg24"]) for layout in (3, 4)]
  for case in _run(driver, cases, tmp_path):
    check(case)
    if case.spec["layout"] == 4:  # the padding channels' gradient is written, as zeros
      pad = case.spec["groups"] * (case.spec["kernel_h"] * case.spec["kernel_w"]
                                   - case.spec["remove_center"]) * 3
      for mode in ("atomic", "det"):
        grad = case.out(f"cuda_{mode}_grad_offset_a").reshape(
            -1, -(-pad // 8) * 8).astype(np.float64)
        assert np.all(grad[:, pad:] == 0), case


def test_dcnv3_empty_axes_write_zero_gradients(driver, tmp_path):
  cases = [dcnv3_case("f32", geometry, layout, seed=i)
           for i, geometry in enumerate(EMPTY_CASES.values()) for layout in (3, 4)]
  for case in _run(driver, cases, tmp_path):
    check(case)
    for mode in ("atomic", "det"):
      assert np.all(case.out(f"cuda_{mode}_grad_offset_a").astype(np.float64) == 0), case
