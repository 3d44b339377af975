"""``flaxdcn.deform_conv2d`` against the loop reference of tests/reference.py and
docs/ops/deform_conv.md.

Every test takes the ``implementation`` fixture, so the native path is covered once it is built.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import flaxdcn
import reference as ref
from flaxdcn import _ffi
from reference import Case
from tolerances import assert_close

WIDE = Case(1, 5, 6, 74, 5, (3, 3), padding=1, og=2)

#: Deliberately odd geometries (torchvision's test shapes and more).
CASES = [
    pytest.param(Case(2, 7, 6, 6, 4, (3, 2), strides=(2, 1), padding=((1, 0), (0, 2)),
                      dilation=(2, 1), fg=2, og=3), id="3x2-s21-p10_02-d21-F2-G3"),
    pytest.param(Case(2, 5, 8, 4, 3, (3, 3), strides=2, padding="SAME", og=2), id="3x3-s2-SAME-G2"),
    pytest.param(Case(1, 4, 5, 3, 2, (1, 1), padding="VALID", og=3), id="1x1-VALID-G3"),
    pytest.param(Case(1, 6, 5, 4, 6, (2, 3), padding=1, dilation=2, fg=2), id="2x3-p1-d2-F2"),
    pytest.param(Case(2, 5, 6, 4, 4, (3, 1), strides=(1, 2), padding=(2, 0), fg=4),
                 id="3x1-s12-p20-depthwise"),
    # 37 channels per offset group: channel loops past any SIMD width with a ragged tail, and
    # channel-blocked backward kernels (a native CPU backward splits >= 32 channels per group).
    pytest.param(WIDE, id="wide-C74-G2"),
]

#: (mask, bias): DCNv1 without bias, DCNv2 with bias.
VARIANTS = [
    pytest.param(False, False, id="v1"),
    pytest.param(True, True, id="v2-bias"),
]


def _op(args, case, implementation, *, jit=True, **kwargs):
  """``deform_conv2d(**args)`` with ``case``'s geometry, jitted by default (compiles ~10x faster
  than running op by op)."""
  fn = functools.partial(flaxdcn.deform_conv2d, **case.kwargs(), implementation=implementation,
                         **kwargs)
  return (jax.jit(fn) if jit else fn)(**args)


def _jnp(args, dtype=None):
  return {k: None if v is None else jnp.asarray(v, dtype) for k, v in args.items()}


# --- Forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, bias", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case, mask, bias, implementation):
  args = ref.make_args(case, seed=1, mask=mask, bias=bias, offset_scale=3.0)
  out = _op(_jnp(args, jnp.float32), case, implementation)
  assert out.shape == (case.n, *case.out_size, case.o)
  assert out.dtype == jnp.float32
  assert_close(out, ref.reference(case, args), jnp.float32)


def test_reference_self_check():
  """The loop reference itself against plain convolution (guards the oracle, not the library)."""
  case = Case(2, 7, 6, 6, 4, (3, 2), strides=(2, 1), padding=((1, 0), (0, 2)), dilation=(2, 1),
              fg=2, og=3)
  args = ref.make_args(case, seed=0)
  args["offsets"] = np.zeros_like(args["offsets"])
  args["mask"] = None
  expected = lax.conv_general_dilated(
      args["inputs"], args["kernel"], case.strides, case.explicit_padding,
      rhs_dilation=case.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=case.fg, precision=lax.Precision.HIGHEST) + args["bias"]
  np.testing.assert_allclose(ref.reference(case, args), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_zero_offsets_equal_conv(case, implementation):
  """Zero offsets give ``lax.conv_general_dilated`` with the same geometry (a mask of ones too:
  ``test_mask_none_equals_mask_of_ones``)."""
  args = ref.make_args(case, seed=2, mask=False)
  args["offsets"] = np.zeros_like(args["offsets"])
  args = _jnp(args, jnp.float32)
  out = _op(args, case, implementation)
  padding = case.padding if isinstance(case.padding, str) else case.explicit_padding
  expected = lax.conv_general_dilated(
      args["inputs"], args["kernel"], ref.pair(case.strides), padding,
      rhs_dilation=ref.pair(case.dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=case.fg, precision=lax.Precision.HIGHEST) + args["bias"]
  assert_close(out, expected, jnp.float32)


def _shift(x, dy, dx):
  """``x[n, h + dy, w + dx, c]`` with zeros outside the image (integer shifts)."""
  out = np.zeros_like(x)
  _, height, width, _ = x.shape
  for h in range(height):
    for w in range(width):
      if 0 <= h + dy < height and 0 <= w + dx < width:
        out[:, h, w] = x[:, h + dy, w + dx]
  return out


def test_integer_offsets_per_group_are_shifts(implementation):
  """Offsets (dy, dx) constant per offset group = a plain conv of each group's shifted channels.

  Checks the (dy, dx) order and the channel -> offset-group assignment without the loop reference.
  """
  case = Case(2, 5, 6, 6, 4, (3, 3), og=3)  # VALID: every undeformed sample is in the image.
  shifts = [(1, 0), (0, -2), (-1, 1)]  # (dy, dx) of offset groups 0, 1, 2.
  args = ref.make_args(case, seed=3, mask=False, bias=False)
  offsets = np.zeros_like(args["offsets"]).reshape(case.n, 3, 4, 3, 9, 2)
  for g, (dy, dx) in enumerate(shifts):
    offsets[..., g, :, 0] = dy
    offsets[..., g, :, 1] = dx
  args["offsets"] = offsets.reshape(args["offsets"].shape)
  x = args["inputs"]
  shifted = np.concatenate([_shift(x[..., 2 * g:2 * g + 2], dy, dx)
                            for g, (dy, dx) in enumerate(shifts)], axis=-1)
  expected = lax.conv_general_dilated(
      shifted, args["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)
  assert_close(_op(_jnp(args, jnp.float32), case, implementation), expected, jnp.float32)


def test_boundary_samples(implementation):
  """Samples exactly on -1, H, W, on integers and just inside the border, worked out by hand."""
  height, width = 4, 4
  x = np.arange(1, height * width * 2 + 1, dtype=np.float64).reshape(1, height, width, 2)
  # (target sample point, expected value as a function of x[h, w]) per output position.
  targets = [
      ((-1, 1), lambda p: 0 * p(0, 0)),                # h == -1: dropped
      ((4, 1), lambda p: 0 * p(0, 0)),                 # h == H
      ((1, -1), lambda p: 0 * p(0, 0)),                # w == -1
      ((1, 4), lambda p: 0 * p(0, 0)),                 # w == W
      ((-1, -1), lambda p: 0 * p(0, 0)),
      ((0, 0), lambda p: p(0, 0)),                     # integers: the pixel itself
      ((3, 3), lambda p: p(3, 3)),                     # the last pixel, exactly
      ((1, 2), lambda p: p(1, 2)),
      ((-0.5, 1), lambda p: 0.5 * p(0, 1)),            # corner row -1 reads 0
      ((3.5, 2), lambda p: 0.5 * p(3, 2)),             # corner row H reads 0
      ((1, -0.25), lambda p: 0.75 * p(1, 0)),
      ((1.5, 3.75), lambda p: 0.125 * (p(1, 3) + p(2, 3))),
      ((-0.75, 2), lambda p: 0.25 * p(0, 2)),
      ((3.75, 0), lambda p: 0.25 * p(3, 0)),
      ((2.25, 1.5), lambda p: 0.375 * (p(2, 1) + p(2, 2)) + 0.125 * (p(3, 1) + p(3, 2))),
      ((-0.999, 3.999), lambda p: 0.001 * 0.001 * p(0, 3)),
  ]
  offsets = np.zeros((1, height, width, 2))
  expected = np.zeros((1, height, width, 2))
  for pos, ((th, tw), value) in enumerate(targets):
    y, xo = divmod(pos, width)
    offsets[0, y, xo] = (th - y, tw - xo)
    expected[0, y, xo] = value(lambda h, w: x[0, h, w])
  kernel = np.eye(2).reshape(1, 1, 2, 2)
  case = Case(1, height, width, 2, 2, (1, 1))
  args = dict(inputs=x, offsets=offsets, kernel=kernel, mask=None, bias=None)
  np.testing.assert_allclose(ref.reference(case, args), expected, rtol=1e-12, atol=1e-12)
  out = _op(_jnp(args, jnp.float32), case, implementation)
  assert_close(out, expected, jnp.float32)
  with jax.enable_x64(True):
    out = _op(_jnp(args, jnp.float64), case, implementation)
    assert out.dtype == jnp.float64
    assert_close(out, expected, jnp.float64)


def test_mask_none_equals_mask_of_ones(implementation):
  case = CASES[0].values[0]
  args = _jnp(ref.make_args(case, seed=4, mask=False), jnp.float32)
  ones = jnp.ones((case.n, *case.out_size, case.num_points))
  assert_close(_op(args, case, implementation), _op({**args, "mask": ones}, case, implementation),
               jnp.float32)


@pytest.mark.parametrize("precision", [
    pytest.param(None, id="None"),
    pytest.param(lax.Precision.HIGHEST, id="HIGHEST"),
    pytest.param("highest", id="str"),
    pytest.param((lax.Precision.DEFAULT, lax.Precision.HIGHEST), id="pair"),
    pytest.param([lax.Precision.DEFAULT, lax.Precision.HIGHEST], id="list"),
])
def test_precision_accepted(precision, implementation):
  case = CASES[1].values[0]
  args = ref.make_args(case, seed=5)
  out = _op(_jnp(args, jnp.float32), case, implementation, precision=precision)
  assert_close(out, ref.reference(case, args), jnp.float32)


def test_default_implementation(implementation):
  """``implementation=None`` (auto) gives the same result as the explicit one."""
  case = CASES[0].values[0]
  args = _jnp(ref.make_args(case, seed=6), jnp.float32)
  auto = jax.jit(functools.partial(flaxdcn.deform_conv2d, **case.kwargs()))
  assert_close(auto(**args), _op(args, case, implementation), jnp.float32)


# --- Batch sizes ---------------------------------------------------------------------------

def test_batch_size_zero(implementation):
  case = Case(0, 5, 4, 4, 6, (3, 2), strides=(2, 1), padding=1, fg=2, og=2)
  args = _jnp(ref.make_args(case, seed=7), jnp.float32)
  fn = jax.jit(lambda a: _op(a, case, implementation))
  out = fn(args)
  assert out.shape == (0, 3, 5, 6) and out.dtype == jnp.float32
  grads = jax.grad(lambda a: jnp.sum(fn(a)))(args)
  for name, g in grads.items():
    assert g.shape == args[name].shape, name
    assert not np.any(np.asarray(g)), name


def test_batch_size_33(implementation):
  """Forward against the reference; each example's gradients equal those of a batch of one (an
  implementation that splits the batch into chunks must not mix or drop examples)."""
  case = Case(33, 3, 3, 2, 2, (2, 2), og=2)
  args = ref.make_args(case, seed=8)
  out = _op(_jnp(args, jnp.float32), case, implementation)
  assert out.shape == (33, 2, 2, 2)
  assert_close(out, ref.reference(case, args), jnp.float32)
  cot = jnp.asarray(np.random.RandomState(18).normal(size=out.shape), jnp.float32)
  @jax.jit
  def grads(a, cot):
    return jax.grad(lambda a: jnp.sum(_op(a, case, implementation, jit=False) * cot))(a)
  full = grads(_jnp(args, jnp.float32), cot)
  for i in (0, 16, 32):
    one = grads({k: v[i:i + 1] if k in ("inputs", "offsets", "mask") else v
                 for k, v in _jnp(args, jnp.float32).items()}, cot[i:i + 1])
    for name in ("inputs", "offsets", "mask"):
      assert_close(full[name][i:i + 1], one[name], jnp.float32, err_msg=f"example {i}: {name}")


def test_offset_grad_at_integer_samples_is_upper_difference(implementation):
  """At integer sample points (zero offsets: every layer at init) the bilinear read has a kink;
  the gradient is the one-sided difference towards +h/+w (``floor`` picks the lower corner), the
  convention of torchvision and mmcv. All implementations must agree on it."""
  case = Case(1, 4, 5, 2, 3, (2, 2), og=2)
  args = ref.make_args(case, seed=19)
  args["offsets"] = np.zeros_like(args["offsets"])
  cot = np.random.RandomState(20).normal(size=(1, *case.out_size, 3))
  grads = jax.jit(jax.grad(lambda a: jnp.sum(_op(a, case, implementation, jit=False) * cot)))(
      _jnp(args, jnp.float32))
  base = np.sum(ref.reference(case, args) * cot)
  expected = np.zeros_like(args["offsets"])
  for idx in np.ndindex(*expected.shape):
    offsets = args["offsets"].copy()
    offsets[idx] = 1e-6
    expected[idx] = (np.sum(ref.reference(case, {**args, "offsets": offsets}) * cot) - base) / 1e-6
  assert_close(grads["offsets"], expected, jnp.float32)


def test_no_float64_in_float32_program(implementation):
  """With x64 enabled, float32 (and bfloat16) arguments give float32 (bfloat16) results and a
  program without float64 values, forward and backward (a leak would halve GPU throughput)."""
  case = CASES[0].values[0]
  with jax.enable_x64(True):
    for dtype in (jnp.float32, jnp.bfloat16):
      args = _jnp(ref.make_args(case, seed=21), dtype)
      fn = functools.partial(flaxdcn.deform_conv2d, **case.kwargs(), implementation=implementation)
      jaxpr = str(jax.make_jaxpr(jax.value_and_grad(
          lambda a: jnp.sum(fn(**a).astype(jnp.float32))))(args))
      assert "f64" not in jaxpr, [line for line in jaxpr.splitlines() if "f64" in line][:5]
      assert jax.eval_shape(lambda a: fn(**a), args).dtype == dtype


def test_float64_argument_promotes(implementation):
  """One float64 argument (under x64) makes the whole computation float64."""
  case = CASES[1].values[0]
  args = ref.make_args(case, seed=22)
  with jax.enable_x64(True):
    a = {k: jnp.asarray(v, jnp.float64 if k == "mask" else jnp.float32) for k, v in args.items()}
    out = _op(a, case, implementation)
    assert out.dtype == jnp.float64
    assert_close(out, ref.reference(case, a), jnp.float64)


# --- Huge, Inf and NaN offsets -------------------------------------------------------------

_BAD = [  # (y, x, kernel point k, 0 for dy / 1 for dx, value)
    (1, 1, 0, 0, 1e30), (2, 3, 4, 1, -1e30), (0, 0, 2, 0, np.inf), (3, 2, 8, 1, -np.inf),
    (4, 4, 5, 0, np.nan), (2, 2, 3, 0, np.nan), (2, 2, 3, 1, np.nan),
]


def test_extreme_offsets(implementation):
  """Huge/Inf/NaN offsets drop their sample; nothing else is affected, values nor gradients."""
  case = Case(1, 5, 5, 2, 3, (3, 3), padding=1)
  args = ref.make_args(case, seed=9, smooth=True)
  far = dict(args, offsets=args["offsets"].copy())  # the same samples dropped by a finite offset
  bad_pairs = np.zeros(args["offsets"].shape[:3] + (9,), bool)
  for y, x, k, d, value in _BAD:
    args["offsets"][0, y, x, 2 * k + d] = value
    far["offsets"][0, y, x, 2 * k + d] = -100.0
    bad_pairs[0, y, x, k] = True
  expected = ref.reference(case, far)
  np.testing.assert_array_equal(ref.reference(case, args), expected)

  cot = np.random.RandomState(10).normal(size=expected.shape)
  def loss(a):
    return jnp.sum(_op(a, case, implementation, jit=False) * cot)
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  for jit in (False, True):  # op by op too: no fusion to hide a 0 * NaN
    out = _op(_jnp(args, jnp.float32), case, implementation, jit=jit)
    assert_close(out, expected, jnp.float32)
  _, grads = value_and_grad(_jnp(args, jnp.float32))
  _, far_grads = value_and_grad(_jnp(far, jnp.float32))
  for name in ("inputs", "kernel", "mask", "bias"):
    assert np.all(np.isfinite(grads[name])), name
    assert_close(grads[name], far_grads[name], jnp.float32, err_msg=name)
  g_off = np.asarray(grads["offsets"]).reshape(bad_pairs.shape + (2,))
  g_far = np.asarray(far_grads["offsets"]).reshape(bad_pairs.shape + (2,))
  assert_close(g_off[~bad_pairs], g_far[~bad_pairs], jnp.float32, err_msg="other offsets")
  # A sample dropped by a huge or infinite offset is locally constant in both its offsets.
  pairs = args["offsets"].reshape(bad_pairs.shape + (2,))
  for y, x, k, _, _ in _BAD:
    if not np.any(np.isnan(pairs[0, y, x, k])):
      np.testing.assert_array_equal(g_off[0, y, x, k], 0, err_msg=str((y, x, k)))


# --- Dtypes --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
def test_dtypes(dtype, implementation):
  case = CASES[0].values[0]
  args = ref.cast(ref.make_args(case, seed=11), dtype)  # the reference sees the rounded values
  out = _op(_jnp(args), case, implementation)
  assert out.dtype == dtype
  assert_close(out, ref.reference(case, args), dtype)


def test_low_precision_grads(implementation):
  """Gradients in float16/bfloat16: their dtype, and their values against float32 ones computed
  from the same rounded values."""
  case = CASES[0].values[0]
  cot = np.random.RandomState(13).normal(size=(case.n, *case.out_size, case.o))
  @jax.jit
  def grads(a):
    return jax.grad(lambda a: jnp.sum(_op(a, case, implementation).astype(jnp.float32) * cot))(a)
  for dtype in (jnp.float16, jnp.bfloat16):
    args = ref.cast(ref.make_args(case, seed=12), dtype)
    low, high = grads(_jnp(args, dtype)), grads(_jnp(args, jnp.float32))
    for name in low:
      assert low[name].dtype == dtype, (dtype, name)
      assert_close(low[name], high[name], dtype, err_msg=f"{np.dtype(dtype).name} {name}")


@pytest.mark.parametrize("dtypes, expected", [
    pytest.param(dict(inputs=jnp.bfloat16, kernel=jnp.float32), jnp.float32,
                 id="bf16-in-f32-kernel"),
    pytest.param(dict(inputs=jnp.float16, kernel=jnp.bfloat16), jnp.float32,
                 id="f16-in-bf16-kernel"),
    pytest.param(dict(mask=jnp.bfloat16, bias=jnp.float16), jnp.float32,
                 id="f32-bf16-mask-f16-bias"),
    pytest.param(dict(inputs=jnp.bfloat16, offsets=jnp.bfloat16, kernel=jnp.bfloat16,
                      mask=jnp.bfloat16, bias=jnp.float32), jnp.float32, id="bf16-f32-bias"),
    pytest.param(dict(offsets=jnp.float16, inputs=jnp.float16, kernel=jnp.float16,
                      mask=jnp.float16, bias=jnp.float16), jnp.float16, id="all-f16"),
])
def test_mixed_dtypes(dtypes, expected, implementation):
  """The output has the promoted dtype of all array arguments, and the right values."""
  case = CASES[1].values[0]
  args = ref.make_args(case, seed=14)
  args = {k: v if k not in dtypes else v.astype(dtypes[k]) for k, v in args.items()}
  out = _op({k: jnp.asarray(v) for k, v in args.items()}, case, implementation)
  assert out.dtype == expected
  assert_close(out, ref.reference(case, args), expected)


# --- Gradients -----------------------------------------------------------------------------

GRAD_CASES = [
    pytest.param(Case(1, 5, 4, 6, 4, (3, 2), strides=(2, 1), padding=((1, 0), (0, 2)),
                      dilation=(2, 1), fg=2, og=3), id="3x2-s21-p10_02-d21-F2-G3"),
    pytest.param(Case(2, 4, 4, 2, 3, (2, 2), padding="SAME"), id="2x2-SAME"),
]


@pytest.mark.parametrize("case, mask", [
    pytest.param(GRAD_CASES[0].values[0], True, id=f"{GRAD_CASES[0].id}-v2"),
    pytest.param(GRAD_CASES[1].values[0], False, id=f"{GRAD_CASES[1].id}-v1"),
    pytest.param(WIDE, True, id="wide-C74-G2-v2"),
])
def test_check_grads_float64(case, mask, implementation):
  """``check_grads`` in float64 w.r.t. inputs, offsets, mask, kernel and bias."""
  args = ref.make_args(case, seed=15, mask=mask, smooth=True)
  names = [k for k, v in args.items() if v is not None]
  def f(*arrays):
    return _op(dict(zip(names, arrays)), case, implementation)
  with jax.enable_x64(True):
    check_grads(f, tuple(jnp.asarray(args[k], jnp.float64) for k in names), order=1,
                modes=("rev",))


@pytest.mark.parametrize("case", GRAD_CASES)
def test_grads_match_reference_central_difference(case, implementation):
  """Gradients w.r.t. offsets and mask against the loop reference (the others are linear and
  covered by ``check_grads``)."""
  args = ref.make_args(case, seed=16, smooth=True)
  cot = np.random.RandomState(17).normal(size=(case.n, *case.out_size, case.o))
  with jax.enable_x64(True):
    grads = jax.grad(lambda a: jnp.sum(_op(a, case, implementation) * cot))(
        _jnp(args, jnp.float64))
  for name in ("offsets", "mask"):
    def fn(value, name=name):
      return ref.reference(case, {**args, name: value})
    expected = ref.numerical_grad(fn, args[name], cot, eps=1e-4)
    # Central differences are exact here up to rounding (piecewise linear in each argument).
    np.testing.assert_allclose(grads[name], expected, rtol=1e-7, atol=1e-8, err_msg=name)


def test_deterministic_backward(implementation):
  """``deterministic_backward=True``: bitwise equal gradients run to run, equal to the default
  ones within float32 tolerance."""
  case = GRAD_CASES[0].values[0]
  args = _jnp(ref.make_args(case, seed=23, smooth=True), jnp.float32)
  cot = np.random.RandomState(24).normal(size=(case.n, *case.out_size, case.o))
  @functools.partial(jax.jit, static_argnames="deterministic")
  def grads(a, deterministic):
    return jax.grad(lambda a: jnp.sum(_op(a, case, implementation, jit=False,
                                          deterministic_backward=deterministic) * cot))(a)
  first, second = grads(args, True), grads(args, True)
  default = grads(args, False)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert_close(first[name], default[name], jnp.float32, err_msg=name)


# --- Errors --------------------------------------------------------------------------------

def _good():
  return dict(inputs=jnp.ones((2, 5, 6, 4)), offsets=jnp.zeros((2, 3, 4, 18)),
              kernel=jnp.ones((3, 3, 4, 8)), mask=jnp.ones((2, 3, 4, 9)), bias=jnp.ones((8,)))


SHAPE_ERRORS = [
    pytest.param(dict(inputs=jnp.ones((5, 6, 4))), {}, r"inputs has shape \(5, 6, 4\)",
                 id="inputs-rank3"),
    pytest.param(dict(kernel=jnp.ones((3, 3, 4))), {}, r"kernel has shape \(3, 3, 4\)",
                 id="kernel-rank3"),
    pytest.param(dict(kernel=jnp.ones((3, 3, 3, 8))), {},
                 r"kernel has shape \(3, 3, 3, 8\), expected \[3, 3, 4, O\]", id="kernel-cin"),
    pytest.param(dict(kernel=jnp.ones((3, 3, 4, 8))), dict(feature_group_count=2),
                 r"kernel has shape \(3, 3, 4, 8\), expected \[3, 3, 2, O\]",
                 id="kernel-cin-groups"),
    pytest.param(dict(kernel=jnp.ones((3, 3, 2, 7))), dict(feature_group_count=2),
                 r"kernel has shape \(3, 3, 2, 7\).*feature_group_count", id="cout-groups"),
    pytest.param(dict(offsets=jnp.zeros((2, 3, 4, 16))), {},
                 r"offsets has shape \(2, 3, 4, 16\), expected \(2, 3, 4, 18\)",
                 id="offsets-channels"),
    pytest.param(dict(offsets=jnp.zeros((2, 4, 4, 18))), {},
                 r"offsets has shape \(2, 4, 4, 18\), expected \(2, 3, 4, 18\)",
                 id="offsets-spatial"),
    pytest.param(dict(offsets=jnp.zeros((1, 3, 4, 18))), {},
                 r"offsets has shape \(1, 3, 4, 18\), expected \(2, 3, 4, 18\)",
                 id="offsets-batch"),
    pytest.param(dict(offsets=jnp.zeros((3, 4, 18))), {}, r"offsets has shape \(3, 4, 18\)",
                 id="offsets-rank3"),
    pytest.param(dict(offsets=jnp.zeros((2, 3, 4, 9, 2))), {},
                 r"offsets has shape \(2, 3, 4, 9, 2\)", id="offsets-rank5"),
    pytest.param({}, dict(offset_group_count=2),
                 r"offsets has shape \(2, 3, 4, 18\), expected \(2, 3, 4, 36\)",
                 id="offsets-groups"),
    pytest.param(dict(mask=jnp.ones((2, 3, 4, 18))), {},
                 r"mask has shape \(2, 3, 4, 18\), expected \(2, 3, 4, 9\)", id="mask-channels"),
    pytest.param(dict(mask=jnp.ones((2, 3, 4))), {}, r"mask has shape \(2, 3, 4\)",
                 id="mask-rank3"),
    pytest.param(dict(bias=jnp.ones((7,))), {}, r"bias has shape \(7,\), expected \(8,\)",
                 id="bias-size"),
    pytest.param(dict(bias=jnp.ones((1, 8))), {}, r"bias has shape \(1, 8\)", id="bias-rank2"),
    pytest.param({}, dict(feature_group_count=3), r"4 channels.*feature_group_count=3",
                 id="channels-feature-groups"),
    pytest.param({}, dict(offset_group_count=3), r"4 channels.*offset_group_count=3",
                 id="channels-offset-groups"),
    pytest.param({}, dict(feature_group_count=0), r"feature_group_count", id="feature-groups-0"),
    pytest.param({}, dict(offset_group_count=0), r"offset_group_count", id="offset-groups-0"),
    pytest.param(dict(kernel=jnp.ones((7, 3, 4, 8))), {}, r"smaller than the dilated kernel",
                 id="empty-output"),
    pytest.param({}, dict(padding="FULL"), r"padding must be .*'FULL'", id="padding-str"),
    pytest.param({}, dict(padding=(1, 2, 3)), r"padding must be .*\(1, 2, 3\)", id="padding-3"),
    pytest.param({}, dict(padding=((1, 2), (3,))), r"padding must be", id="padding-ragged"),
    pytest.param({}, dict(padding=((1, 2), (3, 4), (5, 6))), r"padding must be", id="padding-3d"),
    pytest.param({}, dict(padding=1.5), r"padding must be .*1\.5", id="padding-float"),
    pytest.param({}, dict(padding=None), r"padding must be .*None", id="padding-None"),
    pytest.param({}, dict(strides=0), r"strides must be >= 1, got 0", id="strides-0"),
    pytest.param({}, dict(strides=(1, -1)), r"strides must be >= 1", id="strides-negative"),
    pytest.param({}, dict(strides=(1, 1, 1)), r"strides must be an int or a pair", id="strides-3"),
    pytest.param({}, dict(strides=(2,)), r"strides must be an int or a pair", id="strides-1"),
    pytest.param({}, dict(kernel_dilation=0), r"kernel_dilation must be >= 1",
                 id="dilation-0"),
    pytest.param({}, dict(kernel_dilation=(1, 2, 1)), r"kernel_dilation must be an int or a pair",
                 id="dilation-3"),
]


@pytest.mark.parametrize("override, kwargs, match", SHAPE_ERRORS)
def test_bad_arguments_raise_value_error(override, kwargs, match, implementation):
  args = {**_good(), **override}
  with pytest.raises(ValueError, match=match):
    flaxdcn.deform_conv2d(**args, **kwargs, implementation=implementation)


@pytest.mark.parametrize("kwargs", [dict(strides=1.5), dict(kernel_dilation="2")],
                         ids=["strides-float", "dilation-str"])
def test_bad_geometry_type(kwargs, implementation):
  name = next(iter(kwargs))
  with pytest.raises((TypeError, ValueError), match=name):
    flaxdcn.deform_conv2d(**_good(), **kwargs, implementation=implementation)


@pytest.mark.parametrize("name", ["inputs", "offsets", "kernel", "mask", "bias"])
def test_integer_arguments_raise_type_error(name, implementation):
  args = _good()
  args[name] = args[name].astype(jnp.int32)
  with pytest.raises(TypeError, match=rf"{name} must be a floating-point array.*int32"):
    flaxdcn.deform_conv2d(**args, implementation=implementation)


@pytest.mark.parametrize("bad", ["cuda", "XLA", "", "pallas"])
def test_bad_implementation_raises(bad):
  with pytest.raises(ValueError, match=rf"implementation must be .*{bad!r}"):
    flaxdcn.deform_conv2d(**_good(), implementation=bad)


@pytest.mark.skipif(_ffi.available("cpu"), reason="the native CPU kernels are built")
def test_ffi_unavailable_raises_clearly():
  with pytest.raises(RuntimeError, match=r"deform_conv2d: implementation='ffi'.*native"):
    flaxdcn.deform_conv2d(**_good(), implementation="ffi")
