"""``flaxdcn.dcnv3`` / ``flaxdcn.dcnv4`` against the float64 loop reference of
tests/reference_dcnv3.py (written from issue 12's semantics).

Every test takes the ``implementation`` fixture, so the native kernels run through the same
checks as the jnp path.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flaxdcn
import reference_dcnv3 as ref
from multidevice_testing import run_multidevice_script
from cuda_testing import assert_same_on_gpu_and_cpu, on_device, requires_gpu
from reference_dcnv3 import V3Case
from tolerances import assert_close

#: Odd geometries; group widths Cg from 1 to 32 channels.
CASES = [
    pytest.param(V3Case(2, 7, 6, 6, 3, (3, 3), strides=(2, 1), padding=(1, 0), dilation=(2, 1),
                        offset_scale=0.7), id="3x3-s21-p10-d21-s0.7-G3-Cg2"),
    pytest.param(V3Case(1, 5, 6, 8, 2, (3, 5), padding=(2, 1), offset_scale=1.3,
                        remove_center=True), id="3x5-remove_center-s1.3-G2-Cg4"),
    pytest.param(V3Case(1, 5, 6, 4, 4, (2, 3), padding=(0, 2)), id="2x3-p02-G4-Cg1"),
    pytest.param(V3Case(1, 6, 5, 5, 1, (3, 3), padding=1, dilation=2, remove_center=True,
                        offset_scale=2.0), id="3x3-d2-remove_center-s2-G1-Cg5"),
    pytest.param(V3Case(1, 4, 5, 64, 2, (1, 3), strides=(1, 2), padding=(0, 1)),
                 id="1x3-s12-G2-Cg32"),
    pytest.param(V3Case(2, 5, 5, 37, 1, (3, 3), padding=1, offset_scale=0.25),
                 id="3x3-G1-Cg37"),
]


def _v3(args, case, implementation, *, jit=True, **kwargs):
  fn = functools.partial(flaxdcn.dcnv3, **case.kwargs(), implementation=implementation, **kwargs)
  return (jax.jit(fn) if jit else fn)(args["inputs"], args["offsets"], args["mask"])


def _v4(inputs, offset_mask, case, implementation, *, jit=True, **kwargs):
  fn = functools.partial(flaxdcn.dcnv4, **case.kwargs(), implementation=implementation, **kwargs)
  return (jax.jit(fn) if jit else fn)(inputs, offset_mask)


def _jnp(args, dtype):
  return {k: jnp.asarray(v, dtype) for k, v in args.items()}


# --- Forward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_dcnv3_matches_reference(case, implementation):
  args = ref.make_args(case, seed=1)
  out = _v3(_jnp(args, jnp.float32), case, implementation)
  assert out.shape == (case.n, *case.out_size, case.c) and out.dtype == jnp.float32
  assert_close(out, ref.dcnv3(case, **args), jnp.float32)


@pytest.mark.parametrize("case", CASES)
def test_dcnv4_matches_reference(case, implementation):
  args = ref.make_args(case, seed=2)
  # Garbage in the padding channels: they must be ignored.
  offset_mask = ref.pack_offset_mask(case, args["offsets"], args["mask"], padding_value=1e3)
  out = _v4(jnp.asarray(args["inputs"], jnp.float32), jnp.asarray(offset_mask, jnp.float32),
            case, implementation)
  assert out.shape == (case.n, *case.out_size, case.c)
  expected = ref.dcnv4(case, args["inputs"], offset_mask)
  np.testing.assert_allclose(expected, ref.dcnv3(case, **args), rtol=1e-12, atol=1e-12)
  assert_close(out, expected, jnp.float32)


def test_reference_self_check():
  """The loop reference against hand-known results (guards the oracle): zero offsets and a mask
  of ones give a box sum; ``offset_scale`` scales the kernel grid around its centre."""
  case = V3Case(1, 5, 6, 2, 1, (3, 3), padding=1)
  x = np.random.default_rng(0).standard_normal((1, 5, 6, 2))
  offsets = np.zeros((1, 5, 6, 18))
  out = ref.dcnv3(case, x, offsets, np.ones((1, 5, 6, 9)))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  box = sum(padded[:, r:r + 5, c:c + 6] for r in range(3) for c in range(3))
  np.testing.assert_allclose(out, box, rtol=1e-12, atol=1e-12)
  # offset_scale 2 with a 3x3 kernel: the grid of a 3x3 kernel with dilation 2.
  scaled = ref.dcnv3(V3Case(1, 5, 6, 2, 1, (3, 3), padding=1, offset_scale=2.0), x, offsets,
                     np.ones((1, 5, 6, 9)))
  padded2 = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  box2 = sum(padded2[:, r:r + 5, c:c + 6] for r in (0, 2, 4) for c in (0, 2, 4))
  np.testing.assert_allclose(scaled, box2, rtol=1e-12, atol=1e-12)


def test_point_order_and_offset_pairs(implementation):
  """One point at a time: point p = i * kh + j (i the column) reads column i and row j, and its
  offset pair is (dx, dy). Checked without the loop reference, by integer shifts."""
  kh, kw = 3, 5
  case = V3Case(1, 6, 7, 2, 1, (kh, kw), padding=(1, 2))
  x = np.random.default_rng(3).standard_normal((1, 6, 7, 2)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (3, 3), (4, 4), (0, 0)))
  for p in (0, 1, kh, 2 * kh + 1, kh * kw - 1):
    i, j = divmod(p, kh)
    mask = np.zeros((1, 6, 7, kh * kw), np.float32)
    mask[..., p] = 1
    offsets = np.zeros((1, 6, 7, kh * kw * 2), np.float32)
    offsets[..., 2 * p] = 1.0   # dx = +1
    offsets[..., 2 * p + 1] = -1.0  # dy = -1
    out = _v3(dict(inputs=x, offsets=offsets, mask=mask), case, implementation)
    # h = y - 1 + j - 1 (dy), w = x - 2 + i + 1 (dx), in padded coordinates (+3, +4).
    expected = padded[:, 3 - 2 + j:3 - 2 + j + 6, 4 - 1 + i:4 - 1 + i + 7]
    assert_close(out, expected, jnp.float32, err_msg=f"point {p}")


def test_remove_center_skips_the_centre(implementation):
  """With remove_center, 8 points remain and none reads the centre: a mask of ones gives the
  3x3 box sum minus the pixel itself."""
  case = V3Case(1, 5, 4, 3, 1, (3, 3), padding=1, remove_center=True)
  x = np.random.default_rng(4).standard_normal((1, 5, 4, 3)).astype(np.float32)
  out = _v3(dict(inputs=x, offsets=np.zeros((1, 5, 4, 16), np.float32),
                 mask=np.ones((1, 5, 4, 8), np.float32)), case, implementation)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  box = sum(padded[:, r:r + 5, c:c + 4] for r in range(3) for c in range(3))
  assert_close(out, box - x, jnp.float32)


def test_default_implementation(implementation):
  case = CASES[0].values[0]
  args = _jnp(ref.make_args(case, seed=5), jnp.float32)
  auto = _v3(args, case, None)
  assert_close(auto, _v3(args, case, implementation), jnp.float32)


# --- Boundaries and extreme offsets --------------------------------------------------------------

def test_boundary_samples(implementation):
  """Samples exactly at -1, H and W read 0; just inside they read the border pixels' share."""
  height, width = 4, 5
  case = V3Case(1, height, width, 2, 1, (1, 1), padding=(0, 0))
  x = np.arange(1, height * width * 2 + 1, dtype=np.float64).reshape(1, height, width, 2)
  targets = [(-1, 1), (height, 2), (1, -1), (2, width), (-0.5, 1), (3.5, 2), (1, -0.25),
             (2, 4.75), (0, 0), (3, 4), (-0.999, 3.999), (2.25, 1.5)]
  offsets = np.zeros((1, height, width, 2))
  for pos, (th, tw) in enumerate(targets):
    y, xo = divmod(pos, width)
    offsets[0, y, xo] = (tw - xo, th - y)  # (dx, dy)
  mask = np.ones((1, height, width, 1))
  args = dict(inputs=x, offsets=offsets, mask=mask)
  expected = ref.dcnv3(case, **args)
  assert not np.any(expected[0, 0, :4]), "samples at -1, H, -1, W read 0"
  assert_close(_v3(_jnp(args, jnp.float32), case, implementation), expected, jnp.float32)
  with jax.enable_x64(True):
    out = _v3(_jnp(args, jnp.float64), case, implementation)
    assert out.dtype == jnp.float64
    assert_close(out, expected, jnp.float64)


_BAD = [  # (y, x, point, 0 for dx / 1 for dy, value)
    (1, 1, 0, 0, 1e30), (2, 3, 4, 1, -1e30), (0, 0, 2, 0, np.inf), (3, 2, 8, 1, -np.inf),
    (4, 4, 5, 0, np.nan), (2, 2, 3, 0, np.nan), (2, 2, 3, 1, np.nan),
]


def test_extreme_offsets(implementation):
  """Huge, Inf and NaN offsets drop their sample; values and every other gradient are those of a
  finite far-away offset, and gradients stay finite."""
  case = V3Case(1, 5, 5, 4, 2, (3, 3), padding=1)
  args = ref.make_args(case, seed=6)
  far = dict(args, offsets=args["offsets"].copy())
  bad = np.zeros(args["offsets"].shape[:3] + (2, 9), bool)
  for y, x, p, d, value in _BAD:
    args["offsets"][0, y, x, 2 * p + d] = value          # group 0
    far["offsets"][0, y, x, 2 * p + d] = -100.0
    bad[0, y, x, 0, p] = True
  expected = ref.dcnv3(case, **far)
  np.testing.assert_array_equal(ref.dcnv3(case, **args), expected)
  cot = np.random.default_rng(7).standard_normal(expected.shape)

  def loss(a):
    return jnp.sum(_v3(a, case, implementation, jit=False) * cot)

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  assert_close(_v3(_jnp(args, jnp.float32), case, implementation, jit=False), expected,
               jnp.float32)
  _, grads = value_and_grad(_jnp(args, jnp.float32))
  _, far_grads = value_and_grad(_jnp(far, jnp.float32))
  for name in ("inputs", "mask"):
    assert np.all(np.isfinite(grads[name])), name
    assert_close(grads[name], far_grads[name], jnp.float32, err_msg=name)
  g = np.asarray(grads["offsets"]).reshape(bad.shape + (2,))
  g_far = np.asarray(far_grads["offsets"]).reshape(bad.shape + (2,))
  assert_close(g[~bad], g_far[~bad], jnp.float32, err_msg="other offsets")
  pairs = args["offsets"].reshape(bad.shape + (2,))
  for y, x, p, _, _ in _BAD:
    if not np.any(np.isnan(pairs[0, y, x, 0, p])):
      np.testing.assert_array_equal(g[0, y, x, 0, p], 0, err_msg=str((y, x, p)))


# --- Gradients -----------------------------------------------------------------------------------

def _smooth_args(case, seed):
  """Offsets that keep every sample away from pixel edges (bilinear reads are smooth there)."""
  args = ref.make_args(case, seed=seed, offset_magnitude=0.3)
  args["offsets"] = args["offsets"] + 0.5 / max(case.offset_scale, 1e-3)
  return args


GRAD_CASES = [
    pytest.param(V3Case(1, 5, 4, 4, 2, (3, 3), strides=(2, 1), padding=1, dilation=(1, 2),
                        offset_scale=0.8), id="3x3-s21-d12-s0.8"),
    pytest.param(V3Case(2, 4, 5, 3, 1, (1, 3), padding=(0, 1), remove_center=True),
                 id="1x3-remove_center"),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_dcnv3_grads_float64(case, implementation):
  args = _smooth_args(case, 8)
  with jax.enable_x64(True):
    a = _jnp(args, jnp.float64)
    fn = jax.jit(functools.partial(flaxdcn.dcnv3, **case.kwargs(), implementation=implementation))
    check_grads(fn, (a["inputs"], a["offsets"], a["mask"]), order=1, modes=("rev",),
                eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", GRAD_CASES)
def test_dcnv4_grads_float64_and_padding_channels(case, implementation):
  args = _smooth_args(case, 9)
  offset_mask = ref.pack_offset_mask(case, args["offsets"], args["mask"], padding_value=0.5)
  assert case.d > case.g * case.points * 3, "the case must have padding channels"
  with jax.enable_x64(True):
    x, om = jnp.asarray(args["inputs"]), jnp.asarray(offset_mask)
    fn = jax.jit(functools.partial(flaxdcn.dcnv4, **case.kwargs(), implementation=implementation))
    check_grads(fn, (x, om), order=1, modes=("rev",), eps=1e-6, atol=1e-5, rtol=1e-5)
    cot = jnp.asarray(np.random.default_rng(10).standard_normal((case.n, *case.out_size, case.c)))
    grad = jax.grad(lambda om: jnp.sum(fn(x, om) * cot))(om)
    used = case.g * case.points * 3
    np.testing.assert_array_equal(np.asarray(grad[..., used:]), 0)
    assert np.any(np.asarray(grad[..., :used]))


def test_grads_match_between_layouts(implementation):
  """dcnv4's gradient is dcnv3's, packed into offset_mask (float32)."""
  case = CASES[1].values[0]
  args = ref.make_args(case, seed=11)
  a = _jnp(args, jnp.float32)
  cot = jnp.asarray(np.random.default_rng(12).standard_normal((case.n, *case.out_size, case.c)),
                    jnp.float32)
  g3 = jax.jit(jax.grad(lambda a: jnp.sum(_v3(a, case, implementation, jit=False) * cot)))(a)
  om = jnp.asarray(ref.pack_offset_mask(case, args["offsets"], args["mask"]), jnp.float32)
  gx, gom = jax.jit(jax.grad(
      lambda x, om: jnp.sum(_v4(x, om, case, implementation, jit=False) * cot),
      argnums=(0, 1)))(a["inputs"], om)
  assert_close(gx, g3["inputs"], jnp.float32)
  packed = ref.pack_offset_mask(case, np.asarray(g3["offsets"]), np.asarray(g3["mask"]))
  assert_close(gom, packed, jnp.float32)


def test_backward_reproducible(implementation):
  """Two runs of the backward agree bitwise, with and without deterministic_backward (the CPU
  backward always sums in a fixed order)."""
  case = CASES[4].values[0]
  args = _jnp(ref.make_args(case, seed=18), jnp.float32)
  cot = jnp.asarray(np.random.default_rng(19).standard_normal((case.n, *case.out_size, case.c)),
                    jnp.float32)
  results = []
  for deterministic in (False, True, True):
    fn = functools.partial(flaxdcn.dcnv3, **case.kwargs(), implementation=implementation,
                           deterministic_backward=deterministic)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(fn(a["inputs"], a["offsets"], a["mask"]) * cot)))
    results.append(grad(args))
  for other in results[1:]:
    for name in ("inputs", "offsets", "mask"):
      np.testing.assert_array_equal(np.asarray(other[name]), np.asarray(results[0][name]), name)


# --- Dtypes, batch sizes, transforms -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_half_dtypes(dtype, implementation):
  case = CASES[0].values[0]
  args = {k: np.asarray(jnp.asarray(v, dtype), np.float64)
          for k, v in ref.make_args(case, seed=13).items()}  # the reference sees rounded values
  out = _v3(_jnp(args, dtype), case, implementation)
  assert out.dtype == dtype
  assert_close(out, ref.dcnv3(case, **args), dtype)


def test_dtype_promotion_and_no_float64_leak(implementation):
  case = CASES[2].values[0]
  args = ref.make_args(case, seed=14)
  with jax.enable_x64(True):
    mixed = {k: jnp.asarray(v, jnp.float64 if k == "mask" else jnp.float32)
             for k, v in args.items()}
    out = _v3(mixed, case, implementation)
    assert out.dtype == jnp.float64
    assert_close(out, ref.dcnv3(case, **{k: np.asarray(v) for k, v in mixed.items()}),
                 jnp.float64)
    a = _jnp(args, jnp.float32)
    fn = functools.partial(flaxdcn.dcnv3, **case.kwargs(), implementation=implementation)
    jaxpr = str(jax.make_jaxpr(jax.value_and_grad(
        lambda a: jnp.sum(fn(a["inputs"], a["offsets"], a["mask"]))))(a))
    assert "f64" not in jaxpr, [line for line in jaxpr.splitlines() if "f64" in line][:5]


def test_batch_size_zero(implementation):
  case = V3Case(0, 5, 4, 4, 2, (3, 3))
  args = _jnp(ref.make_args(case), jnp.float32)
  out = _v3(args, case, implementation)
  assert out.shape == (0, 5, 4, 4)
  om = jnp.zeros((0, 5, 4, case.d))
  assert _v4(args["inputs"], om, case, implementation).shape == (0, 5, 4, 4)


def test_vmap(implementation):
  case = V3Case(2, 5, 4, 4, 2, (3, 3), strides=(1, 2), remove_center=True)
  stacked = [ref.make_args(case, seed=s) for s in (15, 16, 17)]
  batched = {k: jnp.asarray(np.stack([a[k] for a in stacked]), jnp.float32) for k in stacked[0]}
  fn = functools.partial(flaxdcn.dcnv3, **case.kwargs(), implementation=implementation)
  out = jax.jit(jax.vmap(fn))(batched["inputs"], batched["offsets"], batched["mask"])
  for b, a in enumerate(stacked):
    assert_close(out[b], ref.dcnv3(case, **a), jnp.float32, err_msg=f"member {b}")
  # vmap of grad against a loop of grads; and an unbatched input shared by every member.
  loss = lambda x, o, m: jnp.sum(fn(x, o, m) ** 2)
  vg = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(
      batched["inputs"], batched["offsets"], batched["mask"])
  grad_one = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  for b in range(3):
    one = grad_one(*(batched[k][b] for k in ("inputs", "offsets", "mask")))
    for got, want in zip(vg, one):
      assert_close(got[b], want, jnp.float32)
  shared = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0)))(batched["inputs"][0], batched["offsets"],
                                              batched["mask"])
  for b, a in enumerate(stacked):
    assert_close(shared[b], ref.dcnv3(case, stacked[0]["inputs"], a["offsets"], a["mask"]),
                 jnp.float32)


# --- Errors --------------------------------------------------------------------------------------

def test_errors():
  x = jnp.ones((1, 5, 5, 4))
  off, msk = jnp.zeros((1, 5, 5, 2 * 9 * 2)), jnp.zeros((1, 5, 5, 2 * 9))
  kw = dict(kernel_size=3, padding=1, group_count=2)
  with pytest.raises(ValueError, match=r"dcnv3: inputs has shape \(5, 5, 4\)"):
    flaxdcn.dcnv3(x[0], off, msk, **kw)
  with pytest.raises(ValueError, match="not divisible by group_count=3"):
    flaxdcn.dcnv3(x, off, msk, kernel_size=3, padding=1, group_count=3)
  with pytest.raises(ValueError, match=r"dcnv3: offsets has shape \(1, 5, 5, 18\), expected "
                     r"\(1, 5, 5, 36\)"):
    flaxdcn.dcnv3(x, off[..., :18], msk, **kw)
  with pytest.raises(ValueError, match=r"dcnv3: mask has shape"):
    flaxdcn.dcnv3(x, off, msk[..., :9], **kw)
  with pytest.raises(ValueError, match="remove_center needs an odd kernel size"):
    flaxdcn.dcnv3(x, off, msk, kernel_size=(2, 3), group_count=2, remove_center=True)
  with pytest.raises(ValueError, match="1 x 1 kernel leaves no kernel point"):
    flaxdcn.dcnv3(x, off, msk, kernel_size=1, group_count=2, remove_center=True)
  with pytest.raises(TypeError, match="offset_scale must be a real number"):
    flaxdcn.dcnv3(x, off, msk, **kw, offset_scale=jnp.float32(1.0))
  with pytest.raises(TypeError, match="dcnv3: mask must be a floating-point array"):
    flaxdcn.dcnv3(x, off, msk.astype(jnp.int32), **kw)
  with pytest.raises(ValueError, match="implementation must be None, 'xla' or 'ffi'"):
    flaxdcn.dcnv3(x, off, msk, **kw, implementation="cuda")
  with pytest.raises(ValueError, match="the output would be empty"):
    flaxdcn.dcnv3(x, off, msk, kernel_size=7, group_count=2)
  # D = 2 * 9 * 3 = 54 -> 56.
  with pytest.raises(ValueError, match=r"dcnv4: offset_mask has shape \(1, 5, 5, 54\), expected "
                     r"\(1, 5, 5, 56\).*multiple of 8"):
    flaxdcn.dcnv4(x, jnp.zeros((1, 5, 5, 54)), **kw)
  assert flaxdcn.dcnv4(x, jnp.zeros((1, 5, 5, 56)), **kw).shape == (1, 5, 5, 4)


# --- Sharding ------------------------------------------------------------------------------------

SCRIPT = pathlib.Path(__file__).with_name("dcnv3_multidevice_script.py")


@pytest.mark.extended  # a multi-device subprocess: run by .ci/run after the default suite
@pytest.mark.slow
def test_batch_sharded_jit(implementation):
  run_multidevice_script(SCRIPT, implementation, timeout=300)


# --- CUDA ----------------------------------------------------------------------------------------
# Collected everywhere, skipped without a GPU; .ci/gpu-check runs every ``cuda`` test of tests/.
# The ``compute_sanitizer`` tests are the small subset it also runs under compute-sanitizer.

cuda = pytest.mark.cuda
GPU_DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.float16, id="f16"),
              pytest.param(jnp.bfloat16, id="bf16")]
#: The cases whose offset_mask has padding channels (D > 3GP).
V4_CASES = [c for c in CASES if c.values[0].d > c.values[0].g * c.values[0].points * 3]
#: The compute-sanitizer subset: the scalar kernels in float32 (2 channels per group) and the
#: vector kernels in bfloat16 (32 channels per group); both have DCNv4 padding channels.
SANITIZER_CASES = [pytest.param(jnp.float32, CASES[0].values[0], id="f32-Cg2"),
                   pytest.param(jnp.bfloat16, CASES[4].values[0], id="bf16-Cg32")]


def _cuda_problem(case, dtype, seed, padding_value=0.5):
  """Inputs, offsets, mask, the DCNv4 offset_mask (padding channels set to ``padding_value``)
  and an output cotangent, in ``dtype`` on the GPU."""
  args = ref.make_args(case, seed=seed)
  offset_mask = ref.pack_offset_mask(case, args["offsets"], args["mask"], padding_value)
  cotangent = np.random.default_rng(seed + 1).standard_normal((case.n, *case.out_size, case.c))
  return on_device(jax.devices("gpu")[0], args["inputs"], args["offsets"], args["mask"],
                   offset_mask, cotangent, dtype=dtype)


def _vjp_program(op, case, implementation, deterministic):
  """A jitted ``(*primals, cotangent) -> (out, grads)`` of ``flaxdcn.<op>``."""
  fn = functools.partial(getattr(flaxdcn, op), **case.kwargs(), implementation=implementation,
                         deterministic_backward=deterministic)

  def run(*args):
    out, vjp = jax.vjp(fn, *args[:-1])
    return out, vjp(args[-1])
  return jax.jit(run)


def _assert_matches_xla(op, case, dtype, deterministic, primals, cotangent):
  """The CUDA forward and every gradient against the jnp path on the GPU; a deterministic backward
  is bitwise equal across two runs. Returns the CUDA gradients."""
  native = _vjp_program(op, case, "ffi", deterministic)
  out, grads = native(*primals, cotangent)
  out_xla, grads_xla = _vjp_program(op, case, "xla", deterministic)(*primals, cotangent)
  assert out.dtype == dtype
  assert_close(out, out_xla, dtype, err_msg="output")
  for i, (g, g_xla) in enumerate(zip(grads, grads_xla)):
    assert g.dtype == dtype
    assert_close(g, g_xla, dtype, err_msg=f"gradient {i}")
  if deterministic:
    for i, (a, b) in enumerate(zip(grads, native(*primals, cotangent)[1])):
      np.testing.assert_array_equal(a, b, err_msg=f"gradient {i}, second run")
  return grads


@cuda
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_dcnv3_matches_xla(case, dtype, deterministic):
  inputs, offsets, mask, _, cotangent = _cuda_problem(case, dtype, seed=21)
  _assert_matches_xla("dcnv3", case, dtype, deterministic, (inputs, offsets, mask), cotangent)


@cuda
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", V4_CASES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_dcnv4_matches_xla_and_padding_channels(case, dtype, deterministic):
  """As DCNv3, on the packed layout; the padding channels (set to 0.5) get a zero gradient."""
  inputs, _, _, offset_mask, cotangent = _cuda_problem(case, dtype, seed=23)
  _, grad_offset_mask = _assert_matches_xla("dcnv4", case, dtype, deterministic,
                                            (inputs, offset_mask), cotangent)
  used = case.g * case.points * 3
  np.testing.assert_array_equal(np.asarray(grad_offset_mask[..., used:], np.float32), 0)
  assert np.any(np.asarray(grad_offset_mask[..., :used], np.float32))


@cuda
@pytest.mark.compute_sanitizer
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype, case", SANITIZER_CASES)
@pytest.mark.parametrize("op", ["dcnv3", "dcnv4"])
def test_cuda_separate_programs(op, dtype, case, deterministic):
  inputs, offsets, mask, offset_mask, cotangent = _cuda_problem(case, dtype, seed=25)
  fn = functools.partial(getattr(flaxdcn, op), **case.kwargs(), implementation="ffi",
                         deterministic_backward=deterministic)
  primals = (inputs, offsets, mask) if op == "dcnv3" else (inputs, offset_mask)
  assert_same_on_gpu_and_cpu(fn, primals, cotangent, dtype)
