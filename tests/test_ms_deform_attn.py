"""``flaxdcn.ms_deform_attn`` against the float64 loop reference of tests/reference_msda.py
(written from issue 17's semantics).

Tests that take the ``msda_implementation`` fixture (tests/conftest.py) run on every
implementation; ``"ffi"`` is skipped while flaxdcn has no native ``ms_deform_attn`` kernels (and
:func:`test_ffi_without_native_kernels_raises` checks that it then raises).
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
from flaxdcn.ops import ms_deform_attn as msda_module
import reference_msda as ref
from reference_msda import MsdaCase
from tolerances import assert_close

NATIVE = msda_module._NATIVE_OP is not None  # pylint: disable=protected-access


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
def test_matches_reference(case, msda_implementation):
  args = ref.make_args(case, seed=1)
  out = jax.jit(_op(case, msda_implementation))(*_jnp(args, jnp.float32))
  assert out.shape == (case.n, case.lq, case.m * case.d) and out.dtype == jnp.float32
  assert_close(out, ref.ms_deform_attn(case, **args), jnp.float32)


@pytest.mark.parametrize("case", CASES)
def test_grads_match_reference(case, msda_implementation):
  args = ref.make_args(case, seed=2)
  cot = _cotangent(case, 3)
  grads = _grads(case, msda_implementation, args, cot, jnp.float32)
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


def test_default_implementation(msda_implementation):
  case = CASES[0].values[0]
  args = _jnp(ref.make_args(case, seed=7), jnp.float32)
  auto = jax.jit(_op(case, None))(*args)
  assert_close(auto, jax.jit(_op(case, msda_implementation))(*args), jnp.float32)


@pytest.mark.skipif(NATIVE, reason="flaxdcn has native ms_deform_attn kernels")
def test_ffi_without_native_kernels_raises():
  case = CASES[0].values[0]
  args = _jnp(ref.make_args(case), jnp.float32)
  with pytest.raises(NotImplementedError, match=r"ms_deform_attn: implementation='ffi' needs the "
                     r"native kernels .* Use implementation=None"):
    _op(case, "ffi")(*args)


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
def test_exact_and_boundary_locations(dtype, msda_implementation):
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
    out = jax.jit(_op(case, msda_implementation))(*_jnp(args, dtype))
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    grads = _grads(case, msda_implementation, args, cot, dtype)
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


def test_non_finite_locations(msda_implementation):
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
  out = jax.jit(_op(case, msda_implementation))(*_jnp(args, jnp.float32))
  assert_close(out, expected, jnp.float32)
  grads = _grads(case, msda_implementation, args, cot, jnp.float32)
  far_grads = _grads(case, msda_implementation, far, cot, jnp.float32)
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
def test_grads_float64(case, msda_implementation):
  args = _smooth_args(case, 12)
  with jax.enable_x64(True):
    check_grads(jax.jit(_op(case, msda_implementation)), tuple(_jnp(args, jnp.float64)),
                order=1, modes=("rev",), eps=1e-6, atol=1e-5, rtol=1e-5)


def test_backward_reproducible(msda_implementation):
  """Two runs of the backward agree bitwise, with and without deterministic_backward."""
  case = CASES[2].values[0]
  args = _jnp(ref.make_args(case, seed=13), jnp.float32)
  cot = jnp.asarray(_cotangent(case, 14), jnp.float32)
  results = []
  for deterministic in (False, True, True):
    fn = _op(case, msda_implementation, deterministic_backward=deterministic)
    results.append(jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2)))(*args))
  for other in results[1:]:
    for name, got, want in zip(ARGS, other, results[0]):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), name)


# --- Dtypes, batch sizes, transforms -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_half_dtypes(dtype, msda_implementation):
  """Half value and weights, float32 accumulation. Locations in float32 are used unrounded;
  locations in the half dtype are read as given."""
  case = CASES[0].values[0]
  args = ref.make_args(case, seed=15)
  rounded = {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in args.items()}
  fn = jax.jit(_op(case, msda_implementation))
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
  grads = _grads(case, msda_implementation, rounded, cot, dtype)
  expected = ref.vjp(case, **rounded, cotangent=cot)
  for name in ("value", "attention_weights"):
    assert grads[name].dtype == dtype
    assert_close(grads[name], expected[name], dtype, err_msg=name)


def test_dtype_promotion_and_no_float64_leak(msda_implementation):
  case = CASES[1].values[0]
  args = ref.make_args(case, seed=17)
  with jax.enable_x64(True):
    value, locations, weights = _jnp(args, jnp.float32)
    out = _op(case, msda_implementation)(value, locations, jnp.asarray(weights, jnp.float64))
    assert out.dtype == jnp.float64
    # float64 locations with float32 value and weights: read in float32, result float32.
    out = _op(case, msda_implementation)(value, jnp.asarray(args["sampling_locations"]), weights)
    assert out.dtype == jnp.float32
    assert_close(out, ref.ms_deform_attn(case, **args), jnp.float32)
    fn = _op(case, msda_implementation)
    jaxpr = str(jax.make_jaxpr(jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2)))(
        value, locations, weights))
    assert "f64" not in jaxpr, [line for line in jaxpr.splitlines() if "f64" in line][:5]


def test_empty_sizes(msda_implementation):
  """Batch 0, no queries, no points: empty or zero results, and gradients of the right shapes."""
  for case in (MsdaCase(0, 5, 2, 4, ((3, 2), (1, 1)), 2), MsdaCase(2, 0, 2, 4, ((3, 2),), 2),
               MsdaCase(2, 3, 2, 4, ((3, 2),), 0)):
    args = _jnp(ref.make_args(case), jnp.float32)
    fn = _op(case, msda_implementation)
    out = jax.jit(fn)(*args)
    assert out.shape == (case.n, case.lq, case.m * case.d)
    np.testing.assert_array_equal(np.asarray(out), 0)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))(*args)
    assert [g.shape for g in grads] == [a.shape for a in args]


def test_vmap(msda_implementation):
  case = MsdaCase(2, 4, 2, 3, ((3, 4), (2, 1)), 2)
  stacked = [ref.make_args(case, seed=s) for s in (18, 19, 20)]
  batched = [jnp.asarray(np.stack([a[k] for a in stacked]), jnp.float32) for k in ARGS]
  fn = _op(case, msda_implementation)
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


def test_spatial_shapes_forms(msda_implementation):
  """A tuple, a list and a numpy array of shapes give the same result; under jit the shapes are
  static (closed over, or a static argument)."""
  case = CASES[0].values[0]
  args = _jnp(ref.make_args(case, seed=21), jnp.float32)
  expected = ref.ms_deform_attn(case, **ref.make_args(case, seed=21))
  for shapes in (case.shapes, [list(s) for s in case.shapes], np.array(case.shapes),
                 np.array(case.shapes, np.int32)):
    out = flaxdcn.ms_deform_attn(args[0], shapes, *args[1:], implementation=msda_implementation)
    assert_close(out, expected, jnp.float32, err_msg=repr(shapes))
  static = jax.jit(flaxdcn.ms_deform_attn, static_argnames=("spatial_shapes", "implementation"))
  out = static(args[0], spatial_shapes=case.shapes, sampling_locations=args[1],
               attention_weights=args[2], implementation=msda_implementation)
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
def test_batch_sharded_jit(msda_implementation):
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      flag for flag in env.get("XLA_FLAGS", "").split()
      if not flag.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(SCRIPT), msda_implementation], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, (
      f"msda_multidevice_script.py {msda_implementation} failed (rc={proc.returncode}):\n"
      f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
