"""``flaxdcn.ms_deform_attn`` against the float64 loop reference of tests/reference_msda.py
(written from issue 17's semantics).

Tests that take the ``implementation`` fixture (tests/conftest.py) run on every
implementation (``"ffi"``: the native kernels, where built).
"""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flaxdcn
from flaxdcn import _ffi
import reference_msda as ref
from multidevice_testing import run_multidevice_script
from cuda_testing import assert_same_on_gpu_and_cpu, on_device, requires_gpu
from reference_msda import MsdaCase
from tolerances import assert_close


#: Odd level shapes down to 1 x 1, H != W, D from 1 to 33, M and P of 1.
CASES = [
    pytest.param(MsdaCase(2, 5, 3, 4, ((5, 7), (3, 2), (1, 1)), 2), id="3-levels-to-1x1"),
    pytest.param(MsdaCase(1, 4, 1, 1, ((4, 3), (2, 5)), 1), id="M1-D1-P1"),
    pytest.param(MsdaCase(1, 3, 2, 33, ((6, 4), (3, 2), (2, 1), (1, 1)), 3), id="D33-4-levels"),
    pytest.param(MsdaCase(2, 6, 2, 8, ((1, 1),), 4), id="one-1x1-level"),
    pytest.param(MsdaCase(1, 7, 4, 5, ((9, 2),), 1), id="9x2-P1"),
]

ARGS = ("value", "sampling_locations", "attention_weights")


def _op(case, implementation, **kwargs):
  return functools.partial(_call, shapes=case.shapes, implementation=implementation, **kwargs)


def _call(value, locations, weights, *, shapes, **kwargs):
  return flaxdcn.ms_deform_attn(value, shapes, locations, weights, **kwargs)


def _jnp(args, dtype):
  return [jnp.asarray(args[k], dtype) for k in ARGS]


def _cotangent(case, seed):
  return np.random.default_rng(seed).standard_normal((case.n, case.lq, case.m * case.d))


def _grads(case, implementation, args, cot, dtype):
  """jitted gradients of ``sum(out * cot)``, as a dict like :func:`reference_msda.vjp`'s."""
  fn = _op(case, implementation)
  loss_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32  # half losses in float32

  def loss(*a):
    return jnp.sum(fn(*a).astype(loss_dtype) * cot)

  return dict(zip(ARGS, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*_jnp(args, dtype))))


# --- Forward and gradients against the reference ------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, implementation):
  args = ref.make_args(case, seed=1)
  out = jax.jit(_op(case, implementation))(*_jnp(args, jnp.float32))
  assert out.shape == (case.n, case.lq, case.m * case.d) and out.dtype == jnp.float32
  assert_close(out, ref.ms_deform_attn(case, **args), jnp.float32)


@pytest.mark.parametrize("case", CASES)
def test_grads_match_reference(case, implementation):
  args = ref.make_args(case, seed=2)
  cot = _cotangent(case, 3)
  grads = _grads(case, implementation, args, cot, jnp.float32)
  expected = ref.vjp(case, **args, cotangent=cot)
  for name in ARGS:
    assert_close(grads[name], expected[name], jnp.float32, err_msg=name)


def test_reference_self_check():
  """The loop reference against hand-known results (guards the oracle): a location on a pixel
  centre reads that pixel, (0, 0) reads a quarter of the corner pixel, a location just off the
  map reads 0; and its gradients against central differences at a smooth point."""
  case = MsdaCase(1, 4, 1, 2, ((3, 5),), 1)
  value = np.arange(30, dtype=np.float64).reshape(1, 15, 1, 2) + 1
  locations = np.array([[(2.5 / 5, 1.5 / 3)], [(0.0, 0.0)], [(-0.2, 0.5)], [(1.0, 1.0)]]
                       ).reshape(1, 4, 1, 1, 1, 2)
  weights = np.full((1, 4, 1, 1, 1), 2.0)
  out = ref.ms_deform_attn(case, value, locations, weights).reshape(4, 2)
  np.testing.assert_allclose(out[0], 2 * value[0, 1 * 5 + 2, 0])
  np.testing.assert_allclose(out[1], 2 * 0.25 * value[0, 0, 0])
  np.testing.assert_allclose(out[2], 0)
  np.testing.assert_allclose(out[3], 2 * 0.25 * value[0, 14, 0])

  case = MsdaCase(1, 2, 2, 3, ((4, 3), (2, 2)), 2)
  args = _smooth_args(case, 4)
  cot = _cotangent(case, 5)
  grads = ref.vjp(case, **args, cotangent=cot)
  eps = 1e-6
  for name in ARGS:
    flat = args[name].reshape(-1)
    for i in np.random.default_rng(6).choice(flat.size, 6, replace=False):
      plus, minus = flat.copy(), flat.copy()
      plus[i] += eps
      minus[i] -= eps
      f = lambda v: np.sum(ref.ms_deform_attn(  # noqa: E731
          case, **(args | {name: v.reshape(args[name].shape)})) * cot)
      numeric = (f(plus) - f(minus)) / (2 * eps)
      np.testing.assert_allclose(grads[name].reshape(-1)[i], numeric, rtol=1e-6, atol=1e-7,
                                 err_msg=f"{name}[{i}]")


def test_default_implementation(implementation):
  case = CASES[0].values[0]
  args = _jnp(ref.make_args(case, seed=7), jnp.float32)
  auto = jax.jit(_op(case, None))(*args)
  assert_close(auto, jax.jit(_op(case, implementation))(*args), jnp.float32)


def test_more_levels_than_the_native_kernels_take():
  """Past ``_ffi.MSDA_MAX_LEVELS`` levels ``implementation=None`` runs the jnp path and "ffi"
  raises, naming the limit."""
  levels = _ffi.MSDA_MAX_LEVELS + 1
  case = MsdaCase(1, 3, 2, 4, ((1, 1),) * (levels - 1) + ((2, 3),), 1)
  args = ref.make_args(case, seed=22)
  out = jax.jit(_op(case, None))(*_jnp(args, jnp.float32))
  assert_close(out, ref.ms_deform_attn(case, **args), jnp.float32)
  with pytest.raises(ValueError, match=rf"ms_deform_attn: the native kernels take at most "
                     rf"{_ffi.MSDA_MAX_LEVELS} levels, got {levels}"):
    _op(case, "ffi")(*_jnp(args, jnp.float32))


# --- Exact locations, boundaries, non-finite locations -------------------------------------------

#: Levels whose sizes make every special location below exact in binary floating point.
EXACT = MsdaCase(1, 12, 1, 3, ((4, 2), (1, 1), (2, 8)), 1)


def _exact_locations(case: MsdaCase) -> np.ndarray:
  """Per query, one location per level: on 0 and 1, on pixel centres (integer pixel
  coordinates), on the -1 and H / W boundaries and just inside them, in x and y."""
  locations = np.zeros((1, case.lq, 1, case.levels, 1, 2))
  for lvl, (height, width) in enumerate(case.shapes):
    x_of = lambda w, width=width: (w + 0.5) / width  # noqa: E731 - pixel w -> location x
    y_of = lambda h, height=height: (h + 0.5) / height  # noqa: E731
    table = [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (x_of(0), y_of(0)),
             (x_of(width - 1), y_of(height - 1)), (x_of(-1), y_of(0)), (x_of(0), y_of(-1)),
             (x_of(width), y_of(0)), (x_of(0), y_of(height)), (x_of(-0.75), y_of(height - 0.25)),
             (x_of(width - 1), y_of(-0.5)), (x_of(width / 2), y_of(height / 2))]
    locations[0, :, 0, lvl, 0] = table[:case.lq]
  return locations


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_exact_and_boundary_locations(dtype, implementation):
  """Locations on 0, 1, pixel centres and the -1 / H boundaries: the reference's values and its
  cell-convention gradients (exact coordinates, so both read the same cells)."""
  case = EXACT
  rng = np.random.default_rng(8)
  args = dict(value=rng.standard_normal((1, case.s, 1, case.d)),
              sampling_locations=_exact_locations(case),
              attention_weights=rng.uniform(0.5, 1.5, (1, case.lq, 1, case.levels, 1)))
  coordinates = [args["sampling_locations"][..., lvl, :, :] * np.array([w, h]) - 0.5
                 for lvl, (h, w) in enumerate(case.shapes)]
  assert all(np.all(c == np.round(c * 4) / 4) for c in coordinates), "coordinates not exact"
  cot = _cotangent(case, 9)
  expected = ref.ms_deform_attn(case, **args)
  expected_grads = ref.vjp(case, **args, cotangent=cot)
  assert not np.any(expected[0, 5:9]), "samples on the -1 / H / W boundaries read 0"
  with jax.enable_x64(dtype == jnp.float64):
    out = jax.jit(_op(case, implementation))(*_jnp(args, dtype))
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    grads = _grads(case, implementation, args, cot, dtype)
  for name in ARGS:
    assert_close(grads[name], expected_grads[name], dtype, err_msg=name)
  # On the -1 boundary the gradient is 0 (outside), not the derivative from the right.
  loc_grad = np.asarray(grads["sampling_locations"])
  np.testing.assert_array_equal(loc_grad[0, 5, 0, :, 0, 0], 0)
  np.testing.assert_array_equal(loc_grad[0, 6, 0, :, 0, 1], 0)


_BAD = [  # (query, head, level, point, 0 for x / 1 for y, value)
    (0, 0, 0, 0, 0, 1e30), (1, 1, 1, 1, 1, -1e30), (2, 0, 2, 0, 0, np.inf),
    (2, 1, 0, 1, 1, -np.inf), (3, 0, 1, 0, 0, np.nan), (4, 1, 2, 1, 1, np.nan),
]


def test_non_finite_locations(implementation):
  """Huge, Inf and NaN locations drop their sample: values and every other gradient are those of
  a finite far-away location; their own gradients and their attention weights' are 0."""
  case = MsdaCase(1, 5, 2, 4, ((5, 3), (2, 4), (1, 1)), 2)
  args = ref.make_args(case, seed=10)
  far = dict(args, sampling_locations=args["sampling_locations"].copy())
  bad = np.zeros(args["attention_weights"].shape, bool)
  for q, m, lvl, p, axis, value in _BAD:
    args["sampling_locations"][0, q, m, lvl, p, axis] = value
    far["sampling_locations"][0, q, m, lvl, p, axis] = -100.0
    bad[0, q, m, lvl, p] = True
  expected = ref.ms_deform_attn(case, **far)
  np.testing.assert_array_equal(ref.ms_deform_attn(case, **args), expected)
  cot = _cotangent(case, 11)
  out = jax.jit(_op(case, implementation))(*_jnp(args, jnp.float32))
  assert_close(out, expected, jnp.float32)
  grads = _grads(case, implementation, args, cot, jnp.float32)
  far_grads = _grads(case, implementation, far, cot, jnp.float32)
  for name in ARGS:
    assert np.all(np.isfinite(grads[name])), name
  assert_close(grads["value"], far_grads["value"], jnp.float32)
  np.testing.assert_array_equal(np.asarray(grads["attention_weights"])[bad], 0)
  np.testing.assert_array_equal(np.asarray(grads["sampling_locations"])[bad], 0)
  assert_close(np.asarray(grads["attention_weights"])[~bad],
               np.asarray(far_grads["attention_weights"])[~bad], jnp.float32)
  assert_close(np.asarray(grads["sampling_locations"])[~bad],
               np.asarray(far_grads["sampling_locations"])[~bad], jnp.float32)


# --- Gradients -----------------------------------------------------------------------------------

def _smooth_args(case, seed):
  """Random arguments whose every sample is at least 0.2 pixels away from integer coordinates
  (bilinear reads are smooth there); some samples straddle the edges of the maps."""
  args = ref.make_args(case, seed=seed)
  rng = np.random.default_rng(seed + 100)
  shape = args["sampling_locations"].shape[:-1]
  sizes = np.array([(w, h) for h, w in case.shapes], np.float64)[:, None, :]  # [L, 1, 2]
  pixel = np.floor(rng.uniform(-1, sizes, shape + (2,)))  # -1 .. size - 1
  coordinate = pixel + rng.uniform(0.2, 0.8, shape + (2,))
  args["sampling_locations"] = (coordinate + 0.5) / sizes
  return args


GRAD_CASES = [
    pytest.param(MsdaCase(2, 3, 2, 3, ((3, 4), (2, 1), (1, 1)), 2), id="3-levels"),
    pytest.param(MsdaCase(1, 4, 1, 5, ((5, 2),), 1), id="M1-P1"),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_grads_float64(case, implementation):
  args = _smooth_args(case, 12)
  with jax.enable_x64(True):
    check_grads(jax.jit(_op(case, implementation)), tuple(_jnp(args, jnp.float64)),
                order=1, modes=("rev",), eps=1e-6, atol=1e-5, rtol=1e-5)


def test_backward_reproducible(implementation):
  """Two runs of the backward agree bitwise, with and without deterministic_backward."""
  case = CASES[2].values[0]
  args = _jnp(ref.make_args(case, seed=13), jnp.float32)
  cot = jnp.asarray(_cotangent(case, 14), jnp.float32)
  results = []
  for deterministic in (False, True, True):
    fn = _op(case, implementation, deterministic_backward=deterministic)
    results.append(jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2)))(*args))
  for other in results[1:]:
    for name, got, want in zip(ARGS, other, results[0]):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), name)


_ONE_CPU_SCRIPT = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before jax sizes its thread pool
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
import test_ms_deform_attn as t
np.savez(sys.argv[2], *t._cpu_backward_grads())
"""


def _cpu_backward_grads():
  """The native CPU gradients of a problem whose backward has more tasks (images x heads x
  channel blocks: D = 33 is split in two) than this machine has cores."""
  case = MsdaCase(3, 7, 3, 33, ((5, 7), (3, 2), (1, 1)), 2)
  args = _jnp(ref.make_args(case, seed=23), jnp.float32)
  cot = jnp.asarray(_cotangent(case, 24), jnp.float32)
  fn = _op(case, "ffi")
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2)))(*args)
  return [np.asarray(g) for g in grads]


@pytest.mark.skipif(not _ffi.available("cpu") or not hasattr(os, "sched_setaffinity"),
                    reason="needs the native CPU kernels and sched_setaffinity")
def test_cpu_backward_is_deterministic_across_thread_counts(tmp_path):
  """The CPU backward partitions its scatter by (image, head, channel block), a split fixed by
  the shapes: the gradients computed by XLA's thread pool on one core equal, bit for bit, those
  computed here on every core."""
  here = _cpu_backward_grads()
  out = tmp_path / "one_cpu.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # cwd: `python -c` puts the working directory first on sys.path, and the checkout's flaxdcn
  # (no compiled module in a non-editable install) must not shadow the installed one.
  proc = subprocess.run([sys.executable, "-c", _ONE_CPU_SCRIPT, str(pathlib.Path(__file__).parent),
                         str(out)], env=env, capture_output=True, text=True, timeout=600,
                        check=False, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(out) as one_cpu:
    for name, got, want in zip(ARGS, (one_cpu[f"arr_{i}"] for i in range(3)), here):
      np.testing.assert_array_equal(got, want, name)


# --- Dtypes, batch sizes, transforms -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_half_dtypes(dtype, implementation):
  """Half value and weights, float32 accumulation. Locations in float32 are used unrounded;
  locations in the half dtype are read as given."""
  case = CASES[0].values[0]
  args = ref.make_args(case, seed=15)
  rounded = {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in args.items()}
  fn = jax.jit(_op(case, implementation))
  value, weights = (jnp.asarray(args[k], dtype) for k in ("value", "attention_weights"))
  out = fn(value, jnp.asarray(args["sampling_locations"], jnp.float32), weights)
  assert out.dtype == dtype
  locations32 = np.asarray(jnp.asarray(args["sampling_locations"], jnp.float32), np.float64)
  assert_close(out, ref.ms_deform_attn(case, rounded["value"], locations32,
                                       rounded["attention_weights"]), dtype)
  out = fn(*_jnp(args, dtype))
  assert out.dtype == dtype
  assert_close(out, ref.ms_deform_attn(case, **rounded), dtype)
  cot = _cotangent(case, 16)
  grads = _grads(case, implementation, rounded, cot, dtype)
  expected = ref.vjp(case, **rounded, cotangent=cot)
  for name in ("value", "attention_weights"):
    assert grads[name].dtype == dtype
    assert_close(grads[name], expected[name], dtype, err_msg=name)


def test_dtype_promotion_and_no_float64_leak(implementation):
  case = CASES[1].values[0]
  args = ref.make_args(case, seed=17)
  with jax.enable_x64(True):
    value, locations, weights = _jnp(args, jnp.float32)
    out = _op(case, implementation)(value, locations, jnp.asarray(weights, jnp.float64))
    assert out.dtype == jnp.float64
    # float64 locations with float32 value and weights: read in float32, result float32.
    out = _op(case, implementation)(value, jnp.asarray(args["sampling_locations"]), weights)
    assert out.dtype == jnp.float32
    assert_close(out, ref.ms_deform_attn(case, **args), jnp.float32)
    fn = _op(case, implementation)
    jaxpr = str(jax.make_jaxpr(jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2)))(
        value, locations, weights))
    assert "f64" not in jaxpr, [line for line in jaxpr.splitlines() if "f64" in line][:5]


def test_empty_sizes(implementation):
  """Batch 0, no queries, no points: empty or zero results, and gradients of the right shapes."""
  for case in (MsdaCase(0, 5, 2, 4, ((3, 2), (1, 1)), 2), MsdaCase(2, 0, 2, 4, ((3, 2),), 2),
               MsdaCase(2, 3, 2, 4, ((3, 2),), 0)):
    args = _jnp(ref.make_args(case), jnp.float32)
    fn = _op(case, implementation)
    out = jax.jit(fn)(*args)
    assert out.shape == (case.n, case.lq, case.m * case.d)
    np.testing.assert_array_equal(np.asarray(out), 0)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))(*args)
    assert [g.shape for g in grads] == [a.shape for a in args]


def test_vmap(implementation):
  case = MsdaCase(2, 4, 2, 3, ((3, 4), (2, 1)), 2)
  stacked = [ref.make_args(case, seed=s) for s in (18, 19, 20)]
  batched = [jnp.asarray(np.stack([a[k] for a in stacked]), jnp.float32) for k in ARGS]
  fn = _op(case, implementation)
  out = jax.jit(jax.vmap(fn))(*batched)
  for b, a in enumerate(stacked):
    assert_close(out[b], ref.ms_deform_attn(case, **a), jnp.float32, err_msg=f"member {b}")
  # vmap of grad against a loop of grads; and one value shared by every member.
  loss = lambda *a: jnp.sum(fn(*a) ** 2)  # noqa: E731
  grad = jax.grad(loss, argnums=(0, 1, 2))
  vg = jax.jit(jax.vmap(grad))(*batched)
  for b in range(3):
    for name, got, want in zip(ARGS, vg, jax.jit(grad)(*(a[b] for a in batched))):
      assert_close(got[b], want, jnp.float32, err_msg=f"{name} member {b}")
  shared = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0)))(batched[0][0], *batched[1:])
  for b, a in enumerate(stacked):
    assert_close(shared[b], ref.ms_deform_attn(case, stacked[0]["value"],
                                               a["sampling_locations"], a["attention_weights"]),
                 jnp.float32)


def test_spatial_shapes_forms(implementation):
  """A tuple, a list and a numpy array of shapes give the same result; under jit the shapes are
  static (closed over, or a static argument)."""
  case = CASES[0].values[0]
  args = _jnp(ref.make_args(case, seed=21), jnp.float32)
  expected = ref.ms_deform_attn(case, **ref.make_args(case, seed=21))
  for shapes in (case.shapes, [list(s) for s in case.shapes], np.array(case.shapes),
                 np.array(case.shapes, np.int32)):
    out = flaxdcn.ms_deform_attn(args[0], shapes, *args[1:], implementation=implementation)
    assert_close(out, expected, jnp.float32, err_msg=repr(shapes))
  static = jax.jit(flaxdcn.ms_deform_attn, static_argnames=("spatial_shapes", "implementation"))
  out = static(args[0], spatial_shapes=case.shapes, sampling_locations=args[1],
               attention_weights=args[2], implementation=implementation)
  assert_close(out, expected, jnp.float32)
  with pytest.raises(TypeError, match="spatial_shapes must be static Python ints .* got a traced "
                     "array"):
    jax.jit(flaxdcn.ms_deform_attn)(args[0], jnp.array(case.shapes), *args[1:])


# --- Errors --------------------------------------------------------------------------------------

def test_errors():
  shapes = ((4, 3), (2, 2))  # S = 16
  value = jnp.ones((2, 16, 3, 4))
  loc = jnp.zeros((2, 5, 3, 2, 4, 2))
  attw = jnp.zeros((2, 5, 3, 2, 4))
  op = flaxdcn.ms_deform_attn
  with pytest.raises(ValueError, match=r"ms_deform_attn: value has shape \(16, 3, 4\), expected "
                     r"\[N, S, M, D\] \(rank 4\)"):
    op(value[0], shapes, loc, attw)
  with pytest.raises(ValueError, match=r"value has shape \(2, 16, 3, 4\) with S=16 rows, but "
                     r"spatial_shapes \(\(4, 3\), \(2, 3\)\) hold 4\*3 \+ 2\*3 = 18"):
    op(value, ((4, 3), (2, 3)), loc, attw)
  with pytest.raises(ValueError, match=r"sampling_locations has shape \(2, 5, 3, 2, 4\), "
                     r"expected \[N, Lq, M, L, P, 2\] \(rank 6\)"):
    op(value, shapes, loc[..., 0], attw)
  with pytest.raises(ValueError, match=r"sampling_locations has shape \(2, 5, 3, 2, 4, 3\)"):
    op(value, shapes, jnp.zeros((2, 5, 3, 2, 4, 3)), attw)
  with pytest.raises(ValueError, match=r"sampling_locations has shape \(2, 5, 3, 1, 4, 2\) with "
                     r"L=1 levels, but spatial_shapes has 2"):
    op(value, shapes, loc[:, :, :, :1], attw[:, :, :, :1])
  with pytest.raises(ValueError, match=r"sampling_locations has shape \(1, 5, 3, 2, 4, 2\), "
                     r"expected \(2, 5, 3, 2, 4, 2\) .*N=2, M=3"):
    op(value, shapes, loc[:1], attw[:1])
  with pytest.raises(ValueError, match=r"sampling_locations has shape \(2, 5, 2, 2, 4, 2\), "
                     r"expected \(2, 5, 3, 2, 4, 2\)"):
    op(value, shapes, loc[:, :, :2], attw[:, :, :2])
  with pytest.raises(ValueError, match=r"attention_weights has shape \(2, 4, 3, 2, 4\), expected "
                     r"\(2, 5, 3, 2, 4\)"):
    op(value, shapes, loc, attw[:, :4])
  with pytest.raises(ValueError, match=r"attention_weights has shape \(2, 5, 3, 2, 3\), expected "
                     r"\(2, 5, 3, 2, 4\)"):
    op(value, shapes, loc, attw[..., :3])
  with pytest.raises(ValueError, match=r"attention_weights has shape \(2, 5, 3, 2, 4, 1\)"):
    op(value, shapes, loc, attw[..., None])
  with pytest.raises(ValueError, match=r"spatial_shapes must be L >= 1 pairs \(H, W\) \(shape "
                     r"\[L, 2\]\), got shape \(3,\)"):
    op(value, (4, 3, 2), loc, attw)
  with pytest.raises(ValueError, match=r"spatial_shapes must be L >= 1 pairs .* got shape \(0,\)"):
    op(value, (), loc, attw)
  with pytest.raises(ValueError, match=r"spatial_shapes must be >= 1, got \[\[16, 1\], \[0, 2\]\]"):
    op(value, ((16, 1), (0, 2)), loc, attw)
  with pytest.raises(ValueError, match=r"spatial_shapes must be L pairs \(H, W\)"):
    op(value, ((4, 3), (2,)), loc, attw)
  with pytest.raises(TypeError, match=r"spatial_shapes must hold ints, got dtype float64"):
    op(value, ((4.0, 3.0), (2.0, 2.0)), loc, attw)
  with pytest.raises(TypeError, match=r"ms_deform_attn: value must be a floating-point array"):
    op(value.astype(jnp.int32), shapes, loc, attw)
  with pytest.raises(TypeError, match=r"sampling_locations must be a floating-point array"):
    op(value, shapes, loc.astype(jnp.int32), attw)
  with pytest.raises(TypeError, match=r"attention_weights must be a floating-point array"):
    op(value, shapes, loc, attw.astype(bool))
  with pytest.raises(ValueError, match="implementation must be None, 'xla' or 'ffi'"):
    op(value, shapes, loc, attw, implementation="cuda")
  assert op(value, shapes, loc, attw).shape == (2, 5, 12)


# --- Sharding ------------------------------------------------------------------------------------

SCRIPT = pathlib.Path(__file__).with_name("msda_multidevice_script.py")


@pytest.mark.extended  # a multi-device subprocess: run by .ci/run after the default suite
@pytest.mark.slow
def test_batch_sharded_jit(implementation):
  run_multidevice_script(SCRIPT, implementation)


# --- CUDA ----------------------------------------------------------------------------------------
# Collected everywhere, skipped without a GPU; .ci/gpu-check runs every ``cuda`` test of tests/
# (conftest.py runs their float32 matmuls at full precision). The ``compute_sanitizer`` tests are
# the small subset it also runs under compute-sanitizer.

cuda = pytest.mark.cuda
GPU_DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.float16, id="f16"),
              pytest.param(jnp.bfloat16, id="bf16")]
#: The compute-sanitizer subset: the scalar kernels in float32 (D = 2) and the vector kernels in
#: bfloat16 (D = 8).
SANITIZER_CASES = [pytest.param(jnp.float32, CASES[0].values[0], id="f32-D2"),
                   pytest.param(jnp.bfloat16, CASES[3].values[0], id="bf16-D8")]


def _device_problem(case, dtype, seed, device, locations_dtype=None):
  """``(value, sampling_locations, attention_weights)`` and an output cotangent on ``device``:
  the locations in ``locations_dtype`` (default: the compute dtype of ``dtype``), the rest in
  ``dtype``."""
  args = ref.make_args(case, seed=seed)
  if locations_dtype is None:
    locations_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  value, weights, cot = on_device(device, args["value"], args["attention_weights"],
                                  _cotangent(case, seed + 1), dtype=dtype)
  (locations,) = on_device(device, args["sampling_locations"], dtype=locations_dtype)
  return (value, locations, weights), cot


def _vjp_program(case, implementation, deterministic):
  """A jitted ``(*primals, cotangent) -> (out, grads)`` of ``flaxdcn.ms_deform_attn``."""
  fn = _op(case, implementation, deterministic_backward=deterministic)

  def run(*args):
    out, vjp = jax.vjp(fn, *args[:-1])
    return out, vjp(args[-1])
  return jax.jit(run)


def _assert_native_matches_xla(case, dtype, deterministic, primals, cot):
  """The native forward and every gradient against the jnp path on the primals' device; a
  deterministic backward is bitwise equal across two runs."""
  native = _vjp_program(case, "ffi", deterministic)
  out, grads = native(*primals, cot)
  out_xla, grads_xla = _vjp_program(case, "xla", deterministic)(*primals, cot)
  assert out.dtype == dtype
  assert_close(out, out_xla, dtype, err_msg="output")
  for name, g, g_xla, primal in zip(ARGS, grads, grads_xla, primals):
    assert g.dtype == primal.dtype, name
    assert_close(g, g_xla, dtype, err_msg=name)
  if deterministic:
    for name, a, b in zip(ARGS, grads, native(*primals, cot)[1]):
      np.testing.assert_array_equal(a, b, err_msg=f"{name}, second run")


@cuda
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_ms_deform_attn_matches_xla(case, dtype, deterministic):
  """CUDA forward and gradients (atomic and fixed-point grad-value sums) against the jnp path on
  the GPU; scalar (D = 1, 3, 5, 33) and vector (D = 8) kernels."""
  primals, cot = _device_problem(case, dtype, 30, jax.devices("gpu")[0])
  _assert_native_matches_xla(case, dtype, deterministic, primals, cot)


@cuda
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_ms_deform_attn_non_finite_locations(deterministic):
  """NaN, +-Inf and +-1e30 locations on the GPU: the jnp path's values and gradients, all
  finite."""
  case = MsdaCase(1, 5, 2, 4, ((5, 3), (2, 4), (1, 1)), 2)
  primals, cot = _device_problem(case, jnp.float32, 32, jax.devices("cpu")[0])
  locations = np.array(primals[1])
  for q, m, lvl, p, axis, value in _BAD:
    locations[0, q, m, lvl, p, axis] = value
  gpu = jax.devices("gpu")[0]
  primals = on_device(gpu, primals[0], locations, primals[2])
  (cot,) = on_device(gpu, cot)
  _assert_native_matches_xla(case, jnp.float32, deterministic, primals, cot)
  _, grads = _vjp_program(case, "ffi", deterministic)(*primals, cot)
  for name, g in zip(ARGS, grads):
    assert np.all(np.isfinite(np.asarray(g))), name


@cuda
@pytest.mark.compute_sanitizer
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype, case", SANITIZER_CASES)
def test_cuda_ms_deform_attn_separate_programs(dtype, case, deterministic):
  """CUDA against the CPU kernels, forward and backward compiled as separate programs (whole
  operand buffers for compute-sanitizer); the locations in ``dtype`` too, so that every
  gradient has it."""
  primals, cot = _device_problem(case, dtype, 34, jax.devices("cpu")[0], locations_dtype=dtype)
  fn = _op(case, "ffi", deterministic_backward=deterministic)
  assert_same_on_gpu_and_cpu(fn, primals, cot, dtype)
