"""``flaxdcn.ops.deformable_kernel.deformable_kernel_conv2d`` against plain convolutions of scope
crops and the loop reference of tests/reference_deformable_kernel.py.

Every numeric test runs both variants: ``global`` (offsets ``[N, K * 2]``) and ``local`` (offsets
``[N, Ho, Wo, K * 2]``), which take different code paths.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import flaxdcn.ops.deformable_kernel as dkm
import reference_deformable_kernel as ref
from flaxdcn.ops.deform_conv import columns_matmul
from flaxdcn.ops.deformable_kernel import deformable_kernel_conv2d
from tolerances import assert_close

DN = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Case:
  """One geometry: sizes, kernel and scope, explicit padding (so the reference can use it)."""
  n: int
  h: int
  w: int
  c: int
  o: int
  kernel_size: tuple[int, int]
  scope_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  dilation: tuple[int, int] = (1, 1)
  groups: int = 1

  @property
  def num_points(self) -> int:
    return self.kernel_size[0] * self.kernel_size[1]

  @property
  def out_size(self) -> tuple[int, int]:
    return tuple(
        (n + lo + hi - (k - 1) * d - 1) // s + 1
        for n, (lo, hi), k, d, s in zip((self.h, self.w), self.padding, self.kernel_size,
                                        self.dilation, self.strides))

  @property
  def base(self) -> tuple[float, float]:
    """Scope coordinates of kernel point (0, 0) at zero offset."""
    return tuple((s - k) / 2 for s, k in zip(self.scope_size, self.kernel_size))

  def kwargs(self) -> dict:
    return dict(kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
                kernel_dilation=self.dilation, feature_group_count=self.groups)

  def ref_kwargs(self) -> dict:
    return dict(kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
                dilation=self.dilation, groups=self.groups)

  def offsets_shape(self, variant: str) -> tuple[int, ...]:
    k2 = 2 * self.num_points
    return (self.n, k2) if variant == "global" else (self.n, *self.out_size, k2)


#: Scope minus kernel is even in every case here, so zero offsets read an exact crop.
CASES = [
    pytest.param(Case(2, 6, 5, 3, 4, (3, 3), (5, 5), padding=((1, 1), (1, 1))),
                 id="3x3-in-5x5-pad1"),
    pytest.param(Case(2, 7, 6, 4, 6, (3, 2), (5, 4), strides=(2, 1), padding=((1, 0), (0, 2)),
                      dilation=(2, 1), groups=2), id="3x2-in-5x4-s21-p10_02-d21-F2"),
    pytest.param(Case(1, 5, 6, 4, 8, (3, 3), (3, 5), strides=(1, 2), padding=((2, 1), (0, 1)),
                      groups=4), id="3x3-in-3x5-s12-depthwise-x2"),
    pytest.param(Case(2, 6, 5, 4, 4, (3, 3), (5, 5), strides=(2, 1), padding=((1, 1), (0, 2)),
                      dilation=(1, 2), groups=4), id="3x3-in-5x5-s21-d12-depthwise"),
    pytest.param(Case(2, 4, 5, 3, 2, (1, 1), (3, 3)), id="1x1-in-3x3-VALID"),
]
VARIANTS = ["global", "local"]


def make_args(case: Case, variant: str, *, seed: int, offsets: str = "random",
              bias: bool = True) -> dict:
  """float64 NumPy arguments. ``offsets``: ``"zero"``, ``"random"`` (fractional, scale 1.5, many
  samples off the scope) or ``"smooth"`` (every sample coordinate 0.2 to 0.8 away from an integer,
  so finite differences never straddle a bilinear kink)."""
  rng = np.random.default_rng(seed)
  shape = case.offsets_shape(variant)
  if offsets == "zero":
    off = np.zeros(shape)
  elif offsets == "random":
    off = 1.5 * rng.standard_normal(shape)
  else:
    base = np.stack(np.meshgrid(np.arange(case.kernel_size[0]) + case.base[0],
                                np.arange(case.kernel_size[1]) + case.base[1], indexing="ij"),
                    -1).reshape(-1)
    target = rng.integers(-1, max(case.scope_size), shape) + rng.uniform(0.2, 0.8, shape)
    off = target - base
  return dict(
      inputs=rng.standard_normal((case.n, case.h, case.w, case.c)),
      offsets=off,
      kernel=rng.standard_normal((*case.scope_size, case.c // case.groups, case.o)),
      bias=rng.standard_normal((case.o,)) if bias else None)


def _op(args: dict, case: Case, dtype=jnp.float32, **kwargs) -> jax.Array:
  """The op on ``args`` cast to ``dtype``, jitted (compiles far faster than op by op)."""
  fn = functools.partial(deformable_kernel_conv2d, **case.kwargs(), **kwargs)
  return jax.jit(fn)(**{k: None if v is None else jnp.asarray(v, dtype) for k, v in args.items()})


def _reference(args: dict, case: Case) -> np.ndarray:
  return ref.deformable_kernel_conv2d(args["inputs"], args["offsets"], args["kernel"],
                                      args["bias"], **case.ref_kwargs())


def _conv(inputs, kernel, case: Case, bias=None) -> np.ndarray:
  """``lax.conv_general_dilated`` in float64 NumPy with ``case``'s geometry."""
  with jax.enable_x64(True):
    out = lax.conv_general_dilated(
        jnp.asarray(inputs, jnp.float64), jnp.asarray(kernel, jnp.float64), case.strides,
        case.padding, rhs_dilation=case.dilation, dimension_numbers=DN,
        feature_group_count=case.groups)
    out = np.asarray(out)
  return out if bias is None else out + bias


def _crop(scope: np.ndarray, case: Case, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
  """The ``kernel_size`` window of the zero-padded scope at the centred position + ``shift``."""
  (kh, kw), (bh, bw) = case.kernel_size, case.base
  pad = max(case.scope_size) + max(abs(s) for s in shift)
  padded = np.pad(scope, ((pad, pad), (pad, pad), (0, 0), (0, 0)))
  top, left = int(bh) + shift[0] + pad, int(bw) + shift[1] + pad
  return padded[top:top + kh, left:left + kw]


# --- Forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_zero_offsets_equal_centred_crop_conv(case, variant):
  args = make_args(case, variant, seed=0, offsets="zero")
  out = _op(args, case)
  assert out.shape == (case.n, *case.out_size, case.o)
  assert out.dtype == jnp.float32
  assert_close(out, _conv(args["inputs"], _crop(args["kernel"], case), case, args["bias"]))


@pytest.mark.parametrize("shift", [(1, -1), (0, 2), (-2, 1)], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_integer_shift_equals_shifted_crop_conv(variant, shift):
  """Every kernel point moved by the same integer ``(dy, dx)``: the conv with the shifted crop.

  ``(0, 2)`` and ``(-2, 1)`` push part of the grid off the 5 x 5 scope: those taps read zero.
  """
  case = Case(2, 6, 7, 4, 6, (3, 3), (5, 5), strides=(1, 2), padding=((1, 1), (0, 1)), groups=2)
  args = make_args(case, variant, seed=1, offsets="zero")
  args["offsets"] = np.broadcast_to(np.array(shift, np.float64),
                                    args["offsets"].shape[:-1] + (case.num_points, 2)
                                    ).reshape(args["offsets"].shape)
  expected = _conv(args["inputs"], _crop(args["kernel"], case, shift), case, args["bias"])
  assert_close(_op(args, case), expected)


#: Scope minus kernel odd on both axes: the base grid sits at half-integer scope coordinates.
ODD_CASE = Case(2, 5, 6, 3, 2, (2, 3), (3, 4), padding=((1, 0), (1, 1)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_odd_scope_margin_uses_half_integer_centre(variant):
  """Zero offsets read each kernel tap halfway between four scope taps: the conv with the mean of
  the four neighbouring crops."""
  case = ODD_CASE
  args = make_args(case, variant, seed=2, offsets="zero")
  scope = args["kernel"]
  kernel = sum(scope[a:a + 2, b:b + 3] for a in (0, 1) for b in (0, 1)) / 4
  assert_close(_op(args, case), _conv(args["inputs"], kernel, case, args["bias"]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES + [pytest.param(ODD_CASE, id="2x3-in-3x4-odd-margin")])
def test_fractional_offsets_match_reference(case, variant):
  args = make_args(case, variant, seed=3)
  assert_close(_op(args, case), _reference(args, case))


def test_global_equals_local_with_offsets_broadcast():
  """The two code paths agree when every output position gets its image's offsets."""
  case = Case(3, 6, 5, 4, 6, (3, 2), (4, 5), strides=(2, 1), padding=((1, 1), (0, 1)), groups=2)
  args = make_args(case, "global", seed=4)
  local = dict(args, offsets=np.broadcast_to(args["offsets"][:, None, None],
                                             case.offsets_shape("local")))
  assert_close(_op(args, case), _op(local, case))


@pytest.mark.parametrize("channels, groups, out_features, per_position", [
    pytest.param(6, 1, 4, False, id="F1"),
    pytest.param(6, 2, 4, False, id="F2"),
    pytest.param(6, 3, 6, False, id="F3-Cg2"),
    pytest.param(6, 6, 6, True, id="depthwise"),
    pytest.param(6, 6, 12, False, id="depthwise-x2"),
])
def test_local_algorithms_agree(channels, groups, out_features, per_position):
  """Scattering columns into scope slots and resampling per-position kernels are the same sum;
  the cost rule picks the per-position kernels for plain depthwise layers only (the public tests
  run both through the cases above)."""
  k, scope_size = 6, (4, 5)
  s = scope_size[0] * scope_size[1]
  assert dkm.per_position_kernels_are_cheaper(
      k, s, channels, channels // groups, out_features) == per_position
  rng = np.random.default_rng(13)
  beta = jnp.asarray(rng.uniform(size=(2, 3, 4, s, k)), jnp.float32)
  columns = jnp.asarray(rng.standard_normal((2, 3, 4, k, channels)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((*scope_size, channels // groups, out_features)),
                       jnp.float32)
  scattered = columns_matmul(dkm.scatter_columns(beta, columns), kernel, groups,
                              lax.Precision.HIGHEST)
  assert_close(dkm._per_position_kernels(columns, beta, kernel, groups), scattered)


def test_reference_self_check():
  """The loop reference with zero offsets against lax (guards the oracle, not the library)."""
  case = CASES[1].values[0]
  args = make_args(case, "local", seed=5, offsets="zero")
  np.testing.assert_allclose(
      _reference(args, case), _conv(args["inputs"], _crop(args["kernel"], case), case,
                                    args["bias"]), rtol=1e-12, atol=1e-12)


#: One case per local algorithm: scattered columns (F=2) and per-position kernels (depthwise).
ALGORITHM_CASES = [CASES[1], CASES[3]]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ALGORITHM_CASES)
def test_low_precision(case, variant, dtype):
  """16-bit inputs: output in that dtype, close to the reference on the rounded inputs."""
  args = make_args(case, variant, seed=6)
  rounded = {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in args.items()}
  out = _op(args, case, dtype)
  assert out.dtype == dtype
  assert_close(out, _reference(rounded, case), dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float64(variant):
  case = CASES[1].values[0]
  args = make_args(case, variant, seed=7)
  with jax.enable_x64(True):
    out = _op(args, case, jnp.float64)
    assert out.dtype == jnp.float64
    assert_close(out, _reference(args, case), jnp.float64)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ALGORITHM_CASES)
def test_far_and_non_finite_offsets_read_zero(case, variant):
  """Samples far outside the scope, at +-inf or NaN read a zero kernel: output = bias, and the
  gradients stay finite."""
  args = make_args(case, variant, seed=8)
  values = np.array([1e7, -1e7, np.inf, -np.inf, np.nan])
  args["offsets"] = values[np.arange(args["offsets"].size) % values.size].reshape(
      args["offsets"].shape)
  assert_close(_op(args, case), np.broadcast_to(args["bias"], (case.n, *case.out_size, case.o)))
  names = ("inputs", "offsets", "kernel")
  grads = jax.jit(jax.grad(
      lambda *a: jnp.sum(deformable_kernel_conv2d(*a, **case.kwargs()) ** 2),
      argnums=(0, 1, 2)))(*(jnp.asarray(args[k], jnp.float32) for k in names))
  for name, g in zip(names, grads):
    assert np.all(np.isfinite(g)), name


def test_empty_batch():
  case = dataclasses.replace(CASES[1].values[0], n=0)
  for variant in VARIANTS:
    out = _op(make_args(case, variant, seed=9), case)
    assert out.shape == (0, *case.out_size, case.o) and out.dtype == jnp.float32


# --- Transformations ----------------------------------------------------------------------------

#: Gradient geometry: small, but with stride, padding, dilation, groups and a rectangular scope.
GRAD_CASES = [
    pytest.param(Case(2, 5, 4, 4, 4, (3, 2), (5, 4), strides=(2, 1), padding=((1, 0), (0, 1)),
                      dilation=(1, 2), groups=2), id="3x2-in-5x4-F2"),
    pytest.param(Case(1, 4, 4, 3, 3, (2, 2), (3, 3), padding=((1, 0), (0, 1)), groups=3),
                 id="2x2-in-3x3-depthwise"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_check_grads_float64(case, variant):
  """``check_grads`` (reverse mode, float64) w.r.t. inputs, offsets, scope kernel and bias."""
  args = make_args(case, variant, seed=10, offsets="smooth")
  names = ("inputs", "offsets", "kernel", "bias")
  f = jax.jit(lambda *a: deformable_kernel_conv2d(*a, **case.kwargs()))
  with jax.enable_x64(True):
    check_grads(f, tuple(jnp.asarray(args[k], jnp.float64) for k in names), order=1,
                modes=("rev",))


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_jit_grad(variant):
  """vmap over an extra leading axis equals a loop over it, for the op and its gradient, and
  grad of the vmapped op equals the per-slice gradients."""
  case = CASES[1].values[0]
  slices = [make_args(case, variant, seed=11 + s, bias=False) for s in range(2)]
  names = ("inputs", "offsets", "kernel")
  stacked = [jnp.asarray(np.stack([a[k] for a in slices]), jnp.float32) for k in names]
  op = functools.partial(deformable_kernel_conv2d, **case.kwargs())

  def loss(*a):
    return jnp.sum(jnp.sin(op(*a)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  batched = jax.jit(jax.vmap(op))(*stacked)
  batched_grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(*stacked)
  grads_of_batched = jax.jit(jax.grad(lambda *a: jnp.sum(jax.vmap(loss)(*a)),
                                      argnums=(0, 1, 2)))(*stacked)
  for s in range(2):
    one = [x[s] for x in stacked]
    assert_close(batched[s], jax.jit(op)(*one))
    for name, b, gb, g in zip(names, batched_grads, grads_of_batched, grad(*one)):
      assert_close(b[s], g, err_msg=name)
      assert_close(gb[s], g, err_msg=name)


# --- Errors -------------------------------------------------------------------------------------

def _bad_calls():
  x = np.zeros((2, 6, 6, 4), np.float32)
  scope = np.zeros((5, 5, 4, 6), np.float32)
  local = np.zeros((2, 4, 4, 18), np.float32)
  g = np.zeros((2, 18), np.float32)
  ok = dict(inputs=x, offsets=local, kernel=scope, kernel_size=3)
  cases = [
      (dict(inputs=x[0]), ValueError, r"inputs has shape \(6, 6, 4\), expected \[N, H, W, C\]"),
      (dict(kernel=scope[0]), ValueError, r"kernel has shape \(5, 4, 6\), expected \[Sh, Sw"),
      (dict(kernel_size=(3, 6)), ValueError,
       r"kernel has shape \(5, 5, 4, 6\), expected a scope of at least \[3, 6, \.\.\.\]"),
      (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int or a pair"),
      (dict(kernel_size=0), ValueError, r"kernel_size must be >= 1"),
      (dict(kernel=np.zeros((5, 5, 2, 6), np.float32)), ValueError,
       r"kernel has shape \(5, 5, 2, 6\), expected \[5, 5, 4, O\]"),
      (dict(feature_group_count=3), ValueError, r"4 channels .* feature_group_count=3"),
      (dict(kernel=np.zeros((5, 5, 2, 5), np.float32), feature_group_count=2), ValueError,
       r"O divisible by feature_group_count"),
      (dict(offsets=local[..., :9]), ValueError,
       r"offsets has shape \(2, 4, 4, 9\), expected \(2, 18\) or \(2, 4, 4, 18\)"),
      (dict(offsets=g[:1]), ValueError, r"offsets has shape \(1, 18\), expected \(2, 18\)"),
      (dict(offsets=local[:, :3], padding=1), ValueError,
       r"offsets has shape \(2, 3, 4, 18\), expected \(2, 18\) or \(2, 6, 6, 18\)"),
      (dict(bias=np.zeros((5,), np.float32)), ValueError,
       r"bias has shape \(5,\), expected \(6,\)"),
      (dict(padding="FULL"), ValueError, r"padding must be"),
      (dict(inputs=np.zeros((2, 2, 2, 4), np.float32)), ValueError, r"output would be empty"),
      (dict(inputs=x.astype(np.int32)), TypeError, r"inputs must be a floating-point array"),
      (dict(offsets=local.astype(np.int32)), TypeError, r"offsets must be a floating-point"),
      (dict(implementation="cuda"), ValueError, r"implementation must be None, 'xla' or 'ffi'"),
      (dict(implementation="ffi"), NotImplementedError, r"no native kernel|have none"),
  ]
  return [pytest.param({**ok, **bad}, error, match, id=match[:40]) for bad, error, match in cases]


@pytest.mark.parametrize("kwargs, error, match", _bad_calls())
def test_bad_arguments_raise(kwargs, error, match):
  with pytest.raises(error, match=match):
    deformable_kernel_conv2d(**kwargs)


def test_implementations_none_and_xla_agree():
  case = CASES[0].values[0]
  args = make_args(case, "local", seed=12)
  np.testing.assert_array_equal(_op(args, case, implementation=None),
                                _op(args, case, implementation="xla"))
