"""The multi-scale deformable attention CUDA launchers (``xla_ext/cuda/ms_deform_attn_kernels.cu``)
under the SIMT emulation of tests/test_simt.py, against the CPU kernels
(``xla_ext/cpu/ms_deform_attn_kernels.cc``).

The build, the driver, the case files and the comparisons are tests/test_simt.py's; the driver's
cases are ``tests/simt/ms_deform_attn_cases.cc``. Each case runs the forward and both backward
modes under two block orders on garbage-filled outputs: the CUDA results must match the CPU
kernels within ``tests/tolerances.py``, the forward and the sampling gradients must be bitwise
equal across orders, and so must every deterministic-mode gradient. ``pytest -m simt`` selects
these tests.
"""

import numpy as np
import pytest

from test_simt import DTYPE_PARAMS, DTYPES, Case, _as, _bitwise, _run, driver  # noqa: F401
from tolerances import assert_close

pytestmark = pytest.mark.simt

#: (N, Lq, M, D, levels, P). Odd level shapes down to 1 x 1, H != W; D of 1, 2, 4, 5, 8, 16, 24,
#: 32, 33 and 136 take the wide-vector and scalar paths with 1 to 32 lanes per sample (a lane walks
#: several vectors at 136); M and P of 1.
CASES = {
    "3-levels-D2": (2, 5, 3, 2, ((5, 7), (3, 2), (1, 1)), 2),
    "M1-D1-P1": (1, 6, 1, 1, ((4, 3), (2, 5)), 1),
    "D4-1x1": (2, 4, 2, 4, ((1, 1),), 3),
    "D5-9x2": (1, 7, 2, 5, ((9, 2), (1, 3)), 2),
    "D8": (2, 4, 2, 8, ((6, 4), (3, 2)), 2),
    "D16-4-levels": (1, 5, 3, 16, ((7, 5), (4, 3), (2, 2), (1, 1)), 2),
    "D24": (1, 3, 2, 24, ((3, 5), (2, 1)), 3),
    "D32-M1-P1": (1, 6, 1, 32, ((5, 6), (3, 3)), 1),
    "D33": (1, 3, 2, 33, ((4, 3), (2, 2), (1, 1)), 2),
    "D136": (1, 2, 1, 136, ((3, 4),), 2),
}

#: No images, no queries, no points, no channels: every output comes back fully written.
EMPTY_CASES = {
    "no-images": (0, 4, 2, 8, ((3, 2), (1, 1)), 2),
    "no-queries": (2, 0, 2, 8, ((3, 2),), 2),
    "no-points": (1, 3, 2, 8, ((3, 2), (2, 2)), 0),
    "no-channels": (1, 3, 2, 0, ((3, 2), (2, 2)), 2),
}


def _special(size):
  """Pixel coordinates on the boundary rule's edges, on pixel centres and just inside, and
  locations that are huge or not finite (the last five are used as locations directly)."""
  return [-1.0, -1 + 2**-20, -0.5, 0.0, size - 1.0, size - 0.5, size - 2**-20, float(size),
          2.25, 1e30, -1e30, np.inf, -np.inf, np.nan]


def msda_case(dtype, geometry, *, seed=0, misalign=0):
  n, lq, m, d, shapes, p = geometry
  s = sum(h * w for h, w in shapes)
  levels = len(shapes)
  rng = np.random.default_rng(seed)
  value = rng.normal(size=(n, s, m, d))
  locations = rng.uniform(-0.2, 1.2, size=(n, lq, m, levels, p, 2))
  # A quarter of the coordinates are special: on the edges of the boundary rule, on pixel
  # centres, huge, infinite or NaN.
  sizes = np.array([(w, h) for h, w in shapes], np.float64)  # [L, 2] as (x, y)
  pick = rng.uniform(size=locations.shape) < 1 / 4
  for lvl in range(levels):
    for axis in range(2):
      table = np.asarray(_special(int(sizes[lvl, axis])))
      chosen = table[rng.integers(len(table), size=locations[..., lvl, :, axis].shape)]
      finite = np.abs(chosen) < 1e29
      with np.errstate(invalid="ignore"):
        as_location = np.where(finite, (chosen + 0.5) / sizes[lvl, axis], chosen)
      locations[..., lvl, :, axis] = np.where(pick[..., lvl, :, axis], as_location,
                                              locations[..., lvl, :, axis])
  weights = rng.uniform(-1.0, 1.0, size=(n, lq, m, levels, p))
  cotangent = rng.normal(size=(n, lq, m, d))
  acc = "f64" if dtype == "f64" else "f32"
  arrays = dict(value=_as(dtype, value), locations=_as(acc, locations),
                weights=_as(dtype, weights), cotangent=_as(dtype, cotangent))
  return Case("ms_deform_attn", dtype, arrays, batch=n, queries=lq, heads=m, head_channels=d,
              points=p, spatial_shapes=",".join(str(v) for hw in shapes for v in hw),
              misalign=misalign)


def _compare(case, cuda_name, cpu_name, what, dtype):
  cuda, cpu = case.out(cuda_name, DTYPES[dtype]), case.out(cpu_name, DTYPES[dtype])
  assert cuda.shape == cpu.shape, what
  assert np.all(np.isfinite(cuda.astype(np.float64))), f"{what}: not finite ({case})"
  assert_close(cuda, cpu, DTYPES[dtype], err_msg=f"{what} ({case})")


def check(case):
  acc = "f64" if case.dtype == "f64" else "f32"
  names = {"grad_value": case.dtype, "grad_locations": acc, "grad_weights": case.dtype}
  _compare(case, "cuda_out_a", "cpu_out", "out", case.dtype)
  for mode in ("atomic", "det"):
    for name, dtype in names.items():
      _compare(case, f"cuda_{mode}_{name}_a", f"cpu_{name}", f"{mode} {name}", dtype)
  _bitwise(case, "cuda_out_a", "cuda_out_b", "out")
  for name in ("grad_locations", "grad_weights"):
    _bitwise(case, f"cuda_atomic_{name}_a", f"cuda_atomic_{name}_b", f"atomic {name}")
  for name in names:
    _bitwise(case, f"cuda_det_{name}_a", f"cuda_det_{name}_b", f"deterministic {name}")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_ms_deform_attn_launchers_match_cpu(driver, tmp_path, dtype):
  """Every case, 16-byte-aligned and misaligned (scalar path) buffers."""
  cases = [msda_case(dtype, geometry, seed=i) for i, geometry in enumerate(CASES.values())]
  cases += [msda_case(dtype, CASES[name], seed=20 + i, misalign=1)
            for i, name in enumerate(["D8", "D16-4-levels", "D32-M1-P1"])]
  for case in _run(driver, cases, tmp_path):
    check(case)
    # The special locations drop some samples and keep others: both kinds are exercised.
    grads = case.out("cuda_det_grad_weights_a").astype(np.float64)
    assert np.any(grads == 0) and np.any(grads != 0), case


def test_ms_deform_attn_empty_axes_write_every_output(driver, tmp_path):
  cases = [msda_case("f32", geometry, seed=i) for i, geometry in enumerate(EMPTY_CASES.values())]
  for case in _run(driver, cases, tmp_path):
    check(case)
    for mode in ("atomic", "det"):
      for name in ("grad_value", "grad_locations", "grad_weights"):
        assert np.all(case.out(f"cuda_{mode}_{name}_a").astype(np.float64) == 0), (name, case)
