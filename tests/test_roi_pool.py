"""``deform_roi_pool`` against the loop reference of tests/reference_roi_pool.py and
docs/ops/roi_pool.md.

Core tests take the ``implementation`` fixture, so the native path is covered once it is built.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flaxdcn
import reference_roi_pool as ref
from flaxdcn.ops import _xla_roi_pool
from flaxdcn.ops.roi_pool import deform_roi_pool
from tolerances import assert_close


class Case:
  """Shapes and static parameters of one pooling problem."""

  def __init__(self, n, height, width, channels, num_rois, output_size, spatial_scale=1.0,
               sampling_ratio=0, gamma=0.1):
    self.n, self.height, self.width, self.channels = n, height, width, channels
    self.num_rois, self.output_size = num_rois, output_size
    self.spatial_scale, self.sampling_ratio, self.gamma = spatial_scale, sampling_ratio, gamma

  def kwargs(self):
    return dict(output_size=self.output_size, spatial_scale=self.spatial_scale,
                sampling_ratio=self.sampling_ratio, gamma=self.gamma)


def mixed_rois(rng, case):
  """RoIs of every kind, in input-image coordinates: ordinary, tiny (< 1 feature pixel), huge
  (several times the image, starting outside it), negative size, entirely outside, and exactly on
  the image border."""
  s = case.spatial_scale
  img_h, img_w = case.height / s, case.width / s
  kinds = np.arange(case.num_rois) % 6
  x1 = rng.uniform(0, 0.7, case.num_rois) * img_w
  y1 = rng.uniform(0, 0.7, case.num_rois) * img_h
  w = rng.uniform(0.1, 0.9, case.num_rois) * img_w
  h = rng.uniform(0.1, 0.9, case.num_rois) * img_h
  tiny = kinds == 1
  w[tiny], h[tiny] = rng.uniform(0.001, 0.3, (2, tiny.sum())) / s
  huge = kinds == 2
  x1[huge] = -rng.uniform(0.5, 2, huge.sum()) * img_w
  y1[huge] = -rng.uniform(0.5, 2, huge.sum()) * img_h
  w[huge], h[huge] = rng.uniform(3, 6, (2, huge.sum())) * max(img_w, img_h)
  negative = kinds == 3
  w[negative], h[negative] = -rng.uniform(0.01, 0.5, (2, negative.sum())) * img_w
  outside = kinds == 4
  x1[outside] = img_w + rng.uniform(2, 5, outside.sum()) / s
  border = kinds == 5
  x1[border], y1[border], w[border], h[border] = 0.0, 0.0, img_w, img_h
  batch = rng.integers(0, case.n, case.num_rois)
  return np.stack([batch, x1, y1, x1 + w, y1 + h], axis=1)


def make_args(case, seed, *, offsets=True, mask=False, offset_scale=0.7):
  rng = np.random.default_rng(seed)
  oh, ow = case.output_size
  return {
      "features": rng.normal(size=(case.n, case.height, case.width, case.channels)),
      "rois": mixed_rois(rng, case),
      "offsets": rng.normal(size=(case.num_rois, oh, ow, 2)) * offset_scale if offsets else None,
      "mask": rng.uniform(0.1, 1.0, (case.num_rois, oh, ow)) if mask else None,
  }


def as_dtype(args, dtype):
  """Arguments rounded to ``dtype`` (rois to its compute dtype) as NumPy float64 values, so the
  reference sees exactly what the implementation sees."""
  roi_dtype = np.float64 if dtype == jnp.float64 else np.float32
  out = {}
  for k, v in args.items():
    if v is None:
      out[k] = None
    else:
      out[k] = np.asarray(jnp.asarray(v, roi_dtype if k == "rois" else dtype), np.float64)
  return out


def to_jnp(args, dtype):
  roi_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  return {k: None if v is None else jnp.asarray(v, roi_dtype if k == "rois" else dtype)
          for k, v in args.items()}


def run(args, case, implementation, **kwargs):
  fn = functools.partial(deform_roi_pool, **case.kwargs(), implementation=implementation, **kwargs)
  return jax.jit(fn)(**args)


def expected(args, case, **kwargs):
  return ref.deform_roi_pool(**args, **case.kwargs(), **kwargs)


CASES = [
    pytest.param(Case(2, 11, 14, 3, 24, (7, 7)), id="7x7-adaptive"),
    pytest.param(Case(2, 9, 13, 4, 20, (3, 2), spatial_scale=1 / 16), id="3x2-adaptive-s1/16"),
    pytest.param(Case(1, 10, 8, 2, 17, (2, 3), spatial_scale=0.5, sampling_ratio=2),
                 id="2x3-sr2-s0.5"),
    pytest.param(Case(3, 6, 7, 5, 9, (7, 7), spatial_scale=1 / 16, sampling_ratio=1, gamma=0.3),
                 id="7x7-sr1-s1/16-gamma0.3"),
    pytest.param(Case(2, 1, 1, 2, 12, (2, 2)), id="1x1-image"),
    pytest.param(Case(2, 4, 4, 2, 7, (2, 2), sampling_ratio=2), id="4x4-image-sr2"),
]

VARIANTS = [
    pytest.param(False, False, id="plain"),
    pytest.param(True, False, id="v1"),
    pytest.param(True, True, id="modulated"),
]


# --- Forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("offsets, mask", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case, offsets, mask, implementation):
  args = as_dtype(make_args(case, seed=1, offsets=offsets, mask=mask), jnp.float32)
  out = run(to_jnp(args, jnp.float32), case, implementation)
  oh, ow = case.output_size
  assert out.shape == (case.num_rois, oh, ow, case.channels)
  assert out.dtype == jnp.float32
  assert_close(out, expected(args, case), jnp.float32)


@pytest.mark.parametrize("sampling_ratio", [0, 3])
def test_linear_features_pool_to_bin_centres(sampling_ratio, implementation):
  """On features linear in (y, x) bilinear reads are exact, and a bin (whose samples stay inside
  the image) is the feature at its shifted centre: worked out by hand, for the reference too."""
  height, width, oh, ow, gamma = 20, 24, 3, 4, 0.1
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  features = np.stack([2.0 * y + 0.5 * x + 1.0, -1.0 * y + 3.0 * x], axis=-1)[None]
  rois = np.array([[0, 3.7, 2.9, 17.4, 15.3], [0, 6.2, 5.1, 9.9, 8.6]])
  rng = np.random.default_rng(3)
  offsets = rng.uniform(-0.5, 0.5, (2, oh, ow, 2))
  start_w, start_h = rois[:, 1] - 0.5, rois[:, 2] - 0.5
  roi_w, roi_h = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
  cy = (start_h[:, None, None] + roi_h[:, None, None] * (
      (np.arange(oh)[:, None] + 0.5) / oh + gamma * offsets[..., 0]))
  cx = (start_w[:, None, None] + roi_w[:, None, None] * (
      (np.arange(ow) + 0.5) / ow + gamma * offsets[..., 1]))
  by_hand = np.stack([2.0 * cy + 0.5 * cx + 1.0, -1.0 * cy + 3.0 * cx], axis=-1)
  kwargs = dict(output_size=(oh, ow), sampling_ratio=sampling_ratio, gamma=gamma)
  np.testing.assert_allclose(ref.deform_roi_pool(features, rois, offsets, **kwargs), by_hand,
                             rtol=1e-12, atol=1e-12)
  with jax.enable_x64(True):
    out = jax.jit(functools.partial(deform_roi_pool, **kwargs, implementation=implementation))(
        jnp.asarray(features), jnp.asarray(rois), jnp.asarray(offsets))
  assert_close(out, by_hand, jnp.float64)


def test_offsets_none_zero_and_mask_ones(implementation):
  case = CASES[0].values[0]
  args = make_args(case, seed=2, offsets=False)
  plain = run(to_jnp(args, jnp.float32), case, implementation)
  oh, ow = case.output_size
  zeros = jnp.zeros((case.num_rois, oh, ow, 2))
  ones = jnp.ones((case.num_rois, oh, ow))
  with_zeros = run(to_jnp(args, jnp.float32) | {"offsets": zeros, "mask": ones}, case,
                   implementation)
  assert_close(with_zeros, plain, jnp.float32)


def test_offsets_layout_is_dy_dx(implementation):
  """``offsets[..., 0]`` moves bins along y by ``gamma * roi_h * dy``, ``[..., 1]`` along x."""
  y, x = np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij")
  features = jnp.asarray(np.stack([y, x], axis=-1)[None], jnp.float32)
  rois = jnp.array([[0, 4.5, 4.5, 8.5, 6.5]], jnp.float32)  # roi_w = 4, roi_h = 2
  shift = jnp.zeros((1, 1, 1, 2)).at[..., 0].set(1.0)
  pool = jax.jit(functools.partial(deform_roi_pool, features, rois, output_size=1, gamma=0.5,
                                   implementation=implementation))
  base, moved_y, moved_x = (pool(o) for o in (jnp.zeros((1, 1, 1, 2)), shift, shift[..., ::-1]))
  np.testing.assert_allclose(moved_y - base, [[[[1.0, 0.0]]]], atol=1e-5)  # 0.5 * 2 * 1 along y
  np.testing.assert_allclose(moved_x - base, [[[[0.0, 2.0]]]], atol=1e-5)  # 0.5 * 4 * 1 along x


def test_mask_scales_bins(implementation):
  case = CASES[1].values[0]
  args = make_args(case, seed=4, mask=True)
  args_f32 = to_jnp(args, jnp.float32)
  masked = run(args_f32, case, implementation)
  unmasked = run(args_f32 | {"mask": None}, case, implementation)
  assert_close(masked, unmasked * args_f32["mask"][..., None], jnp.float32)


# --- RoIs, offsets and batch indices at the extremes -------------------------------------------

def test_extreme_rois_float64(implementation):
  """Every kind of RoI, offsets large enough to push bins out (and outside RoIs in), in float64
  against the reference; negative-size RoIs have an empty grid and give exact zeros."""
  case = Case(2, 9, 12, 3, 30, (3, 4), spatial_scale=0.5)
  args = make_args(case, seed=5, mask=True, offset_scale=4.0)
  with jax.enable_x64(True):
    out = run(to_jnp(args, jnp.float64), case, implementation)
  want = expected(args, case)
  assert_close(out, want, jnp.float64)
  kinds = np.arange(case.num_rois) % 6
  assert np.all(np.asarray(out)[kinds == 3] == 0)
  assert np.any(np.asarray(out)[kinds == 2] != 0)  # huge RoIs still see the image


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_special_rois(sampling_ratio, implementation):
  """Hand-picked RoIs: zero size, sub-pixel, far larger than the image, partly and fully outside,
  exactly the image, hanging over the bottom-right edge (samples clamped to the last row)."""
  rng = np.random.default_rng(6)
  features = rng.normal(size=(2, 7, 9, 2))
  rois = np.array([
      [0, 3.0, 3.0, 3.0, 3.0],          # zero size: empty adaptive grid
      [1, 2.3, 4.1, 2.31, 4.12],        # sub-pixel
      [0, -500.0, -300.0, 900.0, 700.0],  # far larger than the image
      [1, -6.0, -5.0, 3.3, 2.2],        # partly outside, top-left
      [0, 20.0, 1.0, 30.0, 6.0],        # fully outside, right
      [1, 0.0, 0.0, 9.0, 7.0],          # exactly the image
      [0, 5.2, 4.3, 11.7, 8.9],         # over the bottom-right edge
      [1, 4.0, 5.0, 1.0, 2.0],          # negative size
  ])
  offsets = rng.normal(size=(8, 3, 3, 2))
  kwargs = dict(output_size=(3, 3), sampling_ratio=sampling_ratio)
  with jax.enable_x64(True):
    out = jax.jit(functools.partial(deform_roi_pool, **kwargs, implementation=implementation))(
        jnp.asarray(features), jnp.asarray(rois), jnp.asarray(offsets))
  assert_close(out, ref.deform_roi_pool(features, rois, offsets, **kwargs), jnp.float64)
  assert np.all(np.asarray(out)[4] == 0)
  if sampling_ratio == 0:
    assert np.all(np.asarray(out)[[0, 7]] == 0)


def test_batch_index_truncated_and_out_of_range_zero(implementation):
  """``rois[:, 0]`` is truncated toward zero (mmcv's C cast); outside ``[0, N)`` or NaN: zeros and
  no gradient."""
  rng = np.random.default_rng(7)
  features = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  box = [0.5, 0.5, 5.0, 4.5]
  rois = jnp.array([[i] + box for i in (1.7, -0.5, 0.0, 2.0, -1.0, np.nan, 7.0)], jnp.float32)
  pool = jax.jit(functools.partial(deform_roi_pool, output_size=2, implementation=implementation))
  out = pool(features, rois)
  want = pool(features, jnp.array([[i] + box for i in (1, 0, 0, 0, 0, 0, 0)], jnp.float32))
  assert_close(out[:3], want[:3], jnp.float32)
  assert np.all(np.asarray(out[3:]) == 0)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(pool(f, rois.at[:3, 0].set(-1)))))(features)
  assert np.all(np.asarray(grad) == 0)


def test_nonfinite_rois_pool_zeros_with_zero_offset_gradient(implementation):
  """A RoI with a NaN/Inf corner pools zeros; its offsets get a zero (not NaN) gradient and the
  other RoIs are unaffected."""
  rng = np.random.default_rng(9)
  features = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  rois = jnp.array([[0, 1, 1, 6, 6], [1, np.nan, 1, 5, 5], [0, 1, np.inf, 5, 5],
                    [1, 0.5, 2, 7, 6.5]], jnp.float32)
  offsets = jnp.asarray(rng.uniform(-0.3, 0.3, size=(4, 2, 2, 2)), jnp.float32)
  pool = functools.partial(deform_roi_pool, output_size=2, implementation=implementation)
  out = jax.jit(pool)(features, rois, offsets)
  assert np.all(np.asarray(out[1:3]) == 0)
  finite = jax.jit(pool)(features, rois[jnp.array([0, 3])], offsets[jnp.array([0, 3])])
  np.testing.assert_array_equal(np.asarray(out[jnp.array([0, 3])]), np.asarray(finite))
  grad = jax.jit(jax.grad(lambda o: jnp.sum(pool(features, rois, o) ** 2)))(offsets)
  assert np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grad[1:3]) == 0)
  assert np.any(np.asarray(grad[0]) != 0)


def test_nonfinite_offsets_stay_in_their_bin(implementation):
  """Inf/NaN/huge offsets zero their own bin, leave every other bin as it was, and give finite
  gradients (zero for the offending offsets)."""
  case = CASES[0].values[0]
  args = to_jnp(make_args(case, seed=8, mask=True), jnp.float32)
  bad = args["offsets"]
  bad = bad.at[0, 1, 2, 0].set(jnp.nan).at[3, 0, 0, 1].set(jnp.inf).at[5, 6, 6, 0].set(-jnp.inf)
  bad = bad.at[6, 2, 2, 1].set(1e30).at[7, 3, 3, 0].set(-3e38)
  broken = np.zeros(bad.shape[:3], bool)
  broken[0, 1, 2] = broken[3, 0, 0] = broken[5, 6, 6] = broken[6, 2, 2] = broken[7, 3, 3] = True
  good = run(args, case, implementation)
  out = run(args | {"offsets": bad}, case, implementation)
  assert np.all(np.asarray(out)[broken] == 0)
  np.testing.assert_array_equal(np.asarray(out)[~broken], np.asarray(good)[~broken])

  def loss(features, offsets, mask):
    return jnp.sum(deform_roi_pool(features, args["rois"], offsets, mask, **case.kwargs(),
                                   implementation=implementation) ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(args["features"], bad, args["mask"])
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[1])[broken] == 0)


def test_no_rois_and_no_images(implementation):
  case = CASES[0].values[0]
  args = to_jnp(make_args(case, seed=9, mask=True), jnp.float32)
  empty = {"features": args["features"], "rois": jnp.zeros((0, 5)),
           "offsets": jnp.zeros((0, 7, 7, 2)), "mask": jnp.zeros((0, 7, 7))}
  out = run(empty, case, implementation)
  assert out.shape == (0, 7, 7, case.channels) and out.dtype == jnp.float32
  grad = jax.grad(lambda f: jnp.sum(run(empty | {"features": f}, case, implementation)))(
      args["features"])
  assert grad.shape == args["features"].shape and not np.any(np.asarray(grad))
  no_images = run(args | {"features": jnp.zeros((0, 11, 14, 3))}, case, implementation)
  assert no_images.shape == (case.num_rois, 7, 7, 3) and not np.any(np.asarray(no_images))


def test_rois_not_differentiated(implementation):
  case = CASES[0].values[0]
  args = to_jnp(make_args(case, seed=10), jnp.float32)
  grad = jax.grad(lambda r: jnp.sum(run(args | {"rois": r}, case, implementation)))(args["rois"])
  assert not np.any(np.asarray(grad))


def test_integer_rois_accepted(implementation):
  features = jnp.ones((1, 8, 8, 2))
  out = jax.jit(functools.partial(deform_roi_pool, output_size=2, implementation=implementation))(
      features, jnp.array([[0, 1, 1, 6, 6]]))
  np.testing.assert_allclose(out, np.ones((1, 2, 2, 2)), rtol=1e-6)


# --- The adaptive ladder -----------------------------------------------------------------------

def test_ladder_every_branch_and_subchunks(monkeypatch):
  """Adaptive RoIs of every size on one image: several chunks, each on its own branch of the
  ladder (crops of 8, 16 and 32 pixels and the whole image), forward and gradients in float64
  against the reference; then again with sub-chunked branches (a tiny memory budget)."""
  case = Case(2, 40, 36, 2, 70, (3, 3))
  args = make_args(case, seed=11, mask=True, offset_scale=0.3)
  rng = np.random.default_rng(11)
  sizes = rng.choice([3.0, 10.0, 25.0, 45.0, 200.0], case.num_rois) * rng.uniform(0.9, 1.1, 70)
  args["rois"][:, 3:] = args["rois"][:, 1:3] + sizes[:, None]
  cotangent = rng.normal(size=(case.num_rois, 3, 3, case.channels))
  want, want_grads = expected(args, case, cotangent=cotangent)

  configs, branches = [], []
  pool = _xla_roi_pool._pool

  def spy(config, features, origin_h, origin_w, plan, branch):
    configs.append(config)
    jax.debug.callback(lambda b: branches.append(np.asarray(b)), branch)
    return pool(config, features, origin_h, origin_w, plan, branch)

  monkeypatch.setattr(_xla_roi_pool, "_pool", spy)
  monkeypatch.setattr(_xla_roi_pool, "_CHUNK", 8)  # nine chunks
  with jax.enable_x64(True):
    jargs = to_jnp(args, jnp.float64)
    for budget in (_xla_roi_pool._BUDGET, 4000):
      monkeypatch.setattr(_xla_roi_pool, "_BUDGET", budget)

      @jax.jit
      def pool_and_vjp(features, offsets, mask, cotangent):
        out, vjp = jax.vjp(lambda f, o, m: deform_roi_pool(
            f, jargs["rois"], o, m, **case.kwargs(), implementation="xla"), features, offsets,
            mask)
        return out, vjp(cotangent)
      out, grads = pool_and_vjp(jargs["features"], jargs["offsets"], jargs["mask"],
                                jnp.asarray(cotangent))
      assert_close(out, want, jnp.float64)
      for got, name in zip(grads, ("features", "offsets", "mask")):
        assert_close(got, want_grads[name], jnp.float64, err_msg=name)
  config, small_config = configs
  branch = branches[0]

  assert [k[1:] for k in config.kinds] == [(8, 8), (16, 16), (32, 32), (40, 36)]
  assert set(branch.tolist()) == {0, 1, 2, 3}
  assert max(small_config.sub) < 8 and min(small_config.sub) == 1


# --- Gradients -------------------------------------------------------------------------------

GRAD_CASES = [CASES[0], CASES[2], CASES[4], CASES[5]]


@pytest.mark.parametrize("offsets, mask", VARIANTS)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_vjp_matches_reference_float64(case, offsets, mask, implementation):
  """Gradients w.r.t. features, offsets and mask against the reference's hand-derived exact
  derivative (including the along-edge derivative of samples clamped to the last row/column)."""
  args = make_args(case, seed=12, offsets=offsets, mask=mask, offset_scale=1.5)
  names = [k for k in ("features", "offsets", "mask") if args[k] is not None]
  cotangent = np.random.default_rng(13).normal(size=(case.num_rois, *case.output_size,
                                                     case.channels))
  _, want = expected(args, case, cotangent=cotangent)
  with jax.enable_x64(True):
    jargs = to_jnp(args, jnp.float64)

    def f(*values):
      return deform_roi_pool(**(jargs | dict(zip(names, values))), **case.kwargs(),
                             implementation=implementation)
    _, vjp = jax.vjp(jax.jit(f), *(jargs[k] for k in names))
    grads = vjp(jnp.asarray(cotangent))
  for name, got in zip(names, grads):
    assert got.dtype == jnp.float64
    assert_close(got, want[name], jnp.float64, err_msg=name)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_check_grads_float64(sampling_ratio, implementation):
  """``check_grads`` (reverse mode against finite differences) w.r.t. features, offsets and mask,
  at sample positions at least 1e-3 pixel away from every kink (all kinks lie on integers)."""
  case = Case(2, 8, 9, 2, 6, (2, 3), spatial_scale=0.5, sampling_ratio=sampling_ratio)
  rng = np.random.default_rng(14)
  rois = np.stack([rng.integers(0, 2, 6), rng.uniform(-4, 6, 6), rng.uniform(-4, 5, 6),
                   rng.uniform(10, 20, 6), rng.uniform(9, 18, 6)], axis=1)
  offsets = rng.normal(size=(6, 2, 3, 2))
  ys, xs = ref.sample_positions(rois, offsets, **case.kwargs())
  for v in (ys, xs):
    assert np.min(np.abs(v - np.round(v))) > 1e-3, "test data: a sample sits on a kink"
  args = (rng.normal(size=(2, 8, 9, 2)), offsets, rng.uniform(0.2, 1, (6, 2, 3)))

  with jax.enable_x64(True):
    f = jax.jit(lambda features, offsets, mask: deform_roi_pool(
        features, jnp.asarray(rois), offsets, mask, **case.kwargs(), implementation=implementation))
    check_grads(f, tuple(jnp.asarray(a) for a in args), order=1, modes=("rev",), eps=1e-6)


def test_along_edge_derivative_kept(implementation):
  """Samples clamped to the last row still move along x: the x-offset gradient is the finite
  difference of the forward (mmcv's CUDA backward returns 0 here)."""
  features = np.random.default_rng(15).normal(size=(1, 5, 6, 1))
  rois = np.array([[0, 1.2, 4.7, 3.1, 5.3]])  # every sample at y in (H - 1, H]
  with jax.enable_x64(True):
    def pool(offsets):
      return deform_roi_pool(features, rois, offsets, output_size=1,
                             implementation=implementation).sum()
    offsets = jnp.array([[[[0.0, 0.3]]]])
    grad = jax.jit(jax.grad(pool))(offsets)[0, 0, 0, 1]
    eps = 1e-6
    step = jnp.array([[[[0.0, eps]]]])
    numeric = (jax.jit(pool)(offsets + step) - jax.jit(pool)(offsets - step)) / (2 * eps)
  assert abs(float(grad)) > 1e-3
  np.testing.assert_allclose(float(grad), float(numeric), rtol=1e-6)


# --- Dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_dtypes(case, dtype, implementation):
  args = as_dtype(make_args(case, seed=16, mask=True), dtype)
  out = run(to_jnp(args, dtype), case, implementation)
  assert out.dtype == dtype
  assert_close(out, expected(args, case), dtype)


def test_float64(implementation):
  case = CASES[1].values[0]
  args = make_args(case, seed=17, mask=True)
  with jax.enable_x64(True):
    out = run(to_jnp(args, jnp.float64), case, implementation)
  assert out.dtype == jnp.float64
  assert_close(out, expected(args, case), jnp.float64)


@pytest.mark.parametrize("dtypes, result", [
    ((jnp.bfloat16, jnp.float32, None), jnp.float32),
    ((jnp.float16, jnp.float16, jnp.float32), jnp.float32),
    ((jnp.bfloat16, None, jnp.bfloat16), jnp.bfloat16),
], ids=["bf16-features-f32-offsets", "f16-f32-mask", "bf16-plain-mask"])
def test_mixed_dtypes(dtypes, result, implementation):
  """The result is the promoted dtype of features, offsets and mask; rois never take part."""
  case = CASES[0].values[0]
  args = make_args(case, seed=18, offsets=dtypes[1] is not None, mask=dtypes[2] is not None)
  cast = {k: None if args[k] is None else jnp.asarray(args[k], d)
          for k, d in zip(("features", "offsets", "mask"), dtypes)}
  cast["rois"] = jnp.asarray(args["rois"], jnp.float16)  # cast to the compute dtype first
  out = run(cast, case, implementation)
  assert out.dtype == result
  rounded = {k: None if v is None else np.asarray(v, np.float64) for k, v in cast.items()}
  assert_close(out, expected(rounded, case), result)


def _computed_dtypes(jaxpr) -> set:
  """Dtypes of every value computed by ``jaxpr`` and its sub-jaxprs."""
  out = set()
  for eqn in jaxpr.eqns:
    out |= {v.aval.dtype for v in eqn.outvars if hasattr(v.aval, "dtype")}
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _computed_dtypes(sub)
  return out


def test_no_float64_in_float32_program(implementation):
  """With x64 enabled, float32 (or bfloat16) arguments give a program without float64 values,
  forward and backward (float64 rois included: they are cast to float32 first)."""
  case = CASES[0].values[0]
  args = make_args(case, seed=19, mask=True)
  with jax.enable_x64(True):
    for dtype in (jnp.float32, jnp.bfloat16):
      jargs = to_jnp(args, dtype) | {"rois": jnp.asarray(args["rois"], jnp.float64)}

      def loss(features, offsets, mask):
        out = deform_roi_pool(features, jargs["rois"], offsets, mask, **case.kwargs(),
                              implementation=implementation)
        return jnp.sum(out.astype(jnp.float32))
      closed = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
          jargs["features"], jargs["offsets"], jargs["mask"])
      assert jnp.float64 not in _computed_dtypes(closed.jaxpr), dtype


def test_low_precision_grads(implementation):
  """Gradients in float16/bfloat16 have that dtype and match float32 gradients computed from the
  same rounded values."""
  case = CASES[2].values[0]
  cotangent = np.random.default_rng(20).normal(size=(case.num_rois, *case.output_size,
                                                     case.channels))

  @jax.jit
  def grads(features, offsets, mask, rois):
    def loss(f, o, m):
      out = deform_roi_pool(f, rois, o, m, **case.kwargs(), implementation=implementation)
      return jnp.sum(out.astype(jnp.float32) * cotangent)
    return jax.grad(loss, argnums=(0, 1, 2))(features, offsets, mask)

  for dtype in (jnp.float16, jnp.bfloat16):
    args = as_dtype(make_args(case, seed=21, mask=True), dtype)
    low = grads(**to_jnp(args, dtype))
    high = grads(**to_jnp(args, jnp.float32))
    for name, lo, hi in zip(("features", "offsets", "mask"), low, high):
      assert lo.dtype == dtype, name
      assert_close(lo, hi, dtype, err_msg=f"{np.dtype(dtype).name} {name}")


# --- Transformations -------------------------------------------------------------------------

def test_vmap_jit_grad(implementation):
  """vmap over a leading axis of features, rois, offsets and mask (and over rois and offsets with
  shared features) equals a loop of single calls, forward and backward."""
  case = Case(2, 7, 8, 3, 10, (3, 2), spatial_scale=0.5)
  batch = [to_jnp(make_args(case, seed=22 + i, mask=True), jnp.float32) for i in range(3)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *batch)
  pool = functools.partial(deform_roi_pool, **case.kwargs(), implementation=implementation)
  names = ("features", "rois", "offsets", "mask")
  single = jax.jit(pool)

  out = jax.jit(jax.vmap(pool))(*(stacked[k] for k in names))
  shared = jax.jit(jax.vmap(pool, in_axes=(None, 0, 0, 0)))(
      batch[0]["features"], *(stacked[k] for k in names[1:]))
  for i, args in enumerate(batch):
    assert_close(out[i], single(*(args[k] for k in names)), jnp.float32)
    assert_close(shared[i], single(batch[0]["features"], *(args[k] for k in names[1:])),
                 jnp.float32)

  def loss(features, rois, offsets, mask):
    return jnp.sum(pool(features, rois, offsets, mask) ** 2)
  grad = jax.grad(loss, argnums=(0, 2, 3))
  batched = jax.jit(jax.vmap(grad))(*(stacked[k] for k in names))
  of_vmap = jax.jit(jax.grad(lambda *a: jnp.sum(jax.vmap(loss)(*a)), argnums=(0, 2, 3)))(
      *(stacked[k] for k in names))
  for i, args in enumerate(batch):
    for b, v, s in zip(batched, of_vmap, jax.jit(grad)(*(args[k] for k in names))):
      assert_close(b[i], s, jnp.float32)
      assert_close(v[i], s, jnp.float32)


def test_default_implementation():
  """``implementation=None`` (native where built, else the jnp fallback) agrees with "xla":
  forward, gradients and vmap."""
  case = CASES[0].values[0]
  args = to_jnp(make_args(case, seed=26, mask=True), jnp.float32)
  out = run(args, case, None)
  assert_close(out, run(args, case, "xla"), jnp.float32)

  def grads(impl):
    def loss(features, offsets, mask):
      return jnp.sum(deform_roi_pool(features, args["rois"], offsets, mask, **case.kwargs(),
                                     implementation=impl) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(args["features"], args["offsets"],
                                                      args["mask"])
  for a, b in zip(grads(None), grads("xla")):
    assert_close(a, b, jnp.float32)
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), args)
  batched = jax.vmap(functools.partial(deform_roi_pool, **case.kwargs()))(**stacked)
  assert_close(batched[1], out, jnp.float32)


def test_public_export():
  assert flaxdcn.deform_roi_pool is deform_roi_pool


# --- Argument errors -------------------------------------------------------------------------

OK_ARGS = dict(features=np.zeros((2, 8, 9, 3), np.float32), rois=np.zeros((4, 5), np.float32),
               offsets=np.zeros((4, 3, 2, 2), np.float32), mask=np.zeros((4, 3, 2), np.float32))


@pytest.mark.parametrize("override, kwargs, match", [
    ({"features": np.zeros((8, 9, 3))}, {},
     r"features has shape \(8, 9, 3\), expected \[N, H, W, C\]"),
    ({"features": np.zeros((2, 0, 9, 3))}, {},
     r"features has shape \(2, 0, 9, 3\), expected .*H, W >= 1"),
    ({"rois": np.zeros((4, 4))}, {}, r"rois has shape \(4, 4\), expected \[R, 5\]"),
    ({"rois": np.zeros((5,))}, {}, r"rois has shape \(5,\), expected \[R, 5\]"),
    ({"offsets": np.zeros((4, 3, 2, 3))}, {},
     r"offsets has shape \(4, 3, 2, 3\), expected \(4, 3, 2, 2\)"),
    ({"offsets": np.zeros((4, 2, 3, 2))}, {},
     r"offsets has shape \(4, 2, 3, 2\), expected \(4, 3, 2, 2\)"),
    ({"offsets": np.zeros((3, 3, 2, 2))}, {},
     r"offsets has shape \(3, 3, 2, 2\), expected \(4, 3, 2, 2\)"),
    ({"mask": np.zeros((4, 3, 2, 1))}, {}, r"mask has shape \(4, 3, 2, 1\), expected \(4, 3, 2\)"),
    ({}, {"output_size": (3, 0)}, r"output_size must be >= 1"),
    ({}, {"output_size": (3, 2, 1)}, r"output_size must be an int or a pair"),
    ({}, {"sampling_ratio": -1}, r"sampling_ratio must be an int >= 0"),
    ({}, {"sampling_ratio": 1.5}, r"sampling_ratio must be an int >= 0"),
    ({}, {"spatial_scale": 0.0}, r"spatial_scale must be a finite float > 0"),
    ({}, {"spatial_scale": float("inf")}, r"spatial_scale must be a finite float > 0"),
    ({}, {"gamma": float("nan")}, r"gamma must be a finite float"),
    ({}, {"implementation": "cuda"}, r"implementation must be None, 'xla' or 'ffi'"),
], ids=["features-rank", "features-empty", "rois-width", "rois-rank", "offsets-channels",
        "offsets-swapped", "offsets-rois", "mask-rank", "output-size-0", "output-size-3",
        "sampling-negative", "sampling-float", "scale-0", "scale-inf", "gamma-nan",
        "implementation"])
def test_bad_arguments_raise_value_error(override, kwargs, match):
  with pytest.raises(ValueError, match=match):
    deform_roi_pool(**(OK_ARGS | override), **({"output_size": (3, 2)} | kwargs))


@pytest.mark.parametrize("name", ["features", "offsets", "mask"])
def test_integer_arguments_raise_type_error(name):
  with pytest.raises(TypeError, match=f"{name} must be a floating-point array"):
    deform_roi_pool(**(OK_ARGS | {name: OK_ARGS[name].astype(np.int32)}), output_size=(3, 2))


def test_complex_rois_raise_type_error():
  with pytest.raises(TypeError, match="rois must be a real"):
    deform_roi_pool(**(OK_ARGS | {"rois": OK_ARGS["rois"].astype(np.complex64)}),
                    output_size=(3, 2))


# --- Per-image RoIs [N, Ri, 4] ------------------------------------------------------------------

def per_image_args(case, seed, *, mask=True, offset_scale=0.7):
  """``[N, Ri, ...]`` arguments (``case.num_rois`` boxes per image) of every kind, with padding
  boxes: all zeros, ``x2 < x1``, zero height and NaN; the negative-size boxes of
  :func:`mixed_rois` are padding too."""
  rng = np.random.default_rng(seed)
  n, ri = case.n, case.num_rois
  oh, ow = case.output_size
  boxes = mixed_rois(rng, Case(n, case.height, case.width, case.channels, n * ri,
                               case.output_size, case.spatial_scale))[:, 1:].reshape(n, ri, 4)
  boxes[0, 0] = 0.0
  boxes[-1, -1] = [5.0, 1.0, 2.0, 8.0]
  boxes[-1, 1] = [1.0, 3.0, 6.0, 3.0]
  boxes[0, -1, 2] = np.nan
  return {
      "features": rng.normal(size=(n, case.height, case.width, case.channels)),
      "rois": boxes,
      "offsets": rng.normal(size=(n, ri, oh, ow, 2)) * offset_scale,
      "mask": rng.uniform(0.1, 1.0, (n, ri, oh, ow)) if mask else None,
  }


def padding_boxes(boxes):
  return ~((boxes[..., 0] < boxes[..., 2]) & (boxes[..., 1] < boxes[..., 3]))


def as_rows(args):
  """The same problem in the ``[R, 5]`` form, padding boxes given batch index -1."""
  boxes = np.asarray(args["rois"], np.float64)
  n, ri = boxes.shape[:2]
  index = np.where(padding_boxes(boxes), -1.0, np.arange(n)[:, None])
  flat = lambda a: None if a is None else np.asarray(a).reshape((n * ri,) + a.shape[2:])
  return {"features": args["features"],
          "rois": np.concatenate([index[..., None], boxes], axis=-1).reshape(n * ri, 5),
          "offsets": flat(args["offsets"]), "mask": flat(args["mask"])}


PER_IMAGE_CASES = [
    pytest.param(Case(3, 11, 14, 3, 8, (3, 3)), id="3x3-adaptive"),
    pytest.param(Case(2, 9, 13, 4, 7, (2, 3), spatial_scale=0.5, sampling_ratio=2),
                 id="2x3-sr2-s0.5"),
]


@pytest.mark.parametrize("case", PER_IMAGE_CASES)
def test_per_image_matches_reference_float64(case, implementation):
  """Per-image boxes pool like the ``[R, 5]`` rows of the loop reference with the image as batch
  index; padding boxes pool zeros and get zero offset and mask gradients, forward and VJP."""
  args = per_image_args(case, seed=40)
  n, ri, oh, ow = case.n, case.num_rois, *case.output_size
  cotangent = np.random.default_rng(41).normal(size=(n, ri, oh, ow, case.channels))
  rows = as_rows(args)
  want, want_grads = expected(rows, case, cotangent=cotangent.reshape(n * ri, oh, ow, -1))
  pad = padding_boxes(args["rois"])
  assert pad.sum() >= 4 and (~pad).sum() >= 8, "test data"
  with jax.enable_x64(True):
    jargs = to_jnp(args, jnp.float64)
    f = jax.jit(lambda features, offsets, mask: deform_roi_pool(
        features, jargs["rois"], offsets, mask, **case.kwargs(), implementation=implementation))
    out, vjp = jax.vjp(f, jargs["features"], jargs["offsets"], jargs["mask"])
    grads = vjp(jnp.asarray(cotangent))
  assert out.shape == (n, ri, oh, ow, case.channels)
  assert_close(out, want.reshape(out.shape), jnp.float64)
  assert np.all(np.asarray(out)[pad] == 0)
  for name, got in zip(("features", "offsets", "mask"), grads):
    assert_close(got, want_grads[name].reshape(got.shape), jnp.float64, err_msg=name)
    if name != "features":
      assert np.all(np.asarray(got)[pad] == 0), name


def test_per_image_padding_gives_zero_feature_gradient(implementation):
  """Images whose boxes are all padding get no feature gradient, whatever the offsets."""
  case = Case(2, 6, 7, 2, 3, (2, 2), sampling_ratio=2)
  args = to_jnp(per_image_args(case, seed=42), jnp.float32)
  rois = args["rois"].at[1].set(jnp.array([[0.0, 0, 0, 0], [4, 4, 4, 9], [jnp.nan, 0, 5, 5]]))
  loss = lambda f, o, m: jnp.sum(deform_roi_pool(f, rois, o, m, **case.kwargs(),
                                                 implementation=implementation) ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(args["features"], args["offsets"],
                                                     args["mask"])
  assert np.all(np.asarray(grads[0][1]) == 0)
  assert np.any(np.asarray(grads[0][0]) != 0)
  assert np.all(np.asarray(grads[1][1]) == 0) and np.all(np.asarray(grads[2][1]) == 0)


def test_per_image_vmap_jit_grad(implementation):
  """vmap of the per-image form (all arguments batched, or features shared) equals a loop of
  single calls, forward and backward."""
  case = Case(2, 7, 8, 3, 4, (3, 2), spatial_scale=0.5)
  batch = [to_jnp(per_image_args(case, seed=43 + i), jnp.float32) for i in range(3)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *batch)
  pool = functools.partial(deform_roi_pool, **case.kwargs(), implementation=implementation)
  names = ("features", "rois", "offsets", "mask")
  single = jax.jit(pool)
  out = jax.jit(jax.vmap(pool))(*(stacked[k] for k in names))
  shared = jax.jit(jax.vmap(pool, in_axes=(None, 0, 0, 0)))(
      batch[0]["features"], *(stacked[k] for k in names[1:]))
  for i, args in enumerate(batch):
    assert_close(out[i], single(*(args[k] for k in names)), jnp.float32)
    assert_close(shared[i], single(batch[0]["features"], *(args[k] for k in names[1:])),
                 jnp.float32)

  def loss(features, rois, offsets, mask):
    return jnp.sum(pool(features, rois, offsets, mask) ** 2)
  grad = jax.grad(loss, argnums=(0, 2, 3))
  batched = jax.jit(jax.vmap(grad))(*(stacked[k] for k in names))
  for i, args in enumerate(batch):
    for b, s in zip(batched, jax.jit(grad)(*(args[k] for k in names))):
      assert_close(b[i], s, jnp.float32)


def test_per_image_empty():
  features = jnp.ones((2, 5, 5, 3))
  assert deform_roi_pool(features, jnp.zeros((2, 0, 4)), output_size=2).shape == (2, 0, 2, 2, 3)
  assert deform_roi_pool(jnp.ones((0, 5, 5, 3)), jnp.zeros((0, 4, 4)),
                         output_size=2).shape == (0, 4, 2, 2, 3)


PER_IMAGE_OK = dict(features=np.zeros((2, 8, 9, 3), np.float32),
                    rois=np.zeros((2, 4, 4), np.float32),
                    offsets=np.zeros((2, 4, 3, 2, 2), np.float32),
                    mask=np.zeros((2, 4, 3, 2), np.float32))


@pytest.mark.parametrize("override, match", [
    ({"rois": np.zeros((3, 4, 4))},
     r"rois has shape \(3, 4, 4\), expected \[R, 5\] or \[N, Ri, 4\] with N = 2 \(features\)"),
    ({"rois": np.zeros((2, 4, 5))},
     r"rois has shape \(2, 4, 5\), expected \[R, 5\] or \[N, Ri, 4\]"),
    ({"rois": np.zeros((2, 4, 4, 1))}, r"rois has shape \(2, 4, 4, 1\), expected \[R, 5\] or"),
    ({"offsets": np.zeros((8, 3, 2, 2))},
     r"offsets has shape \(8, 3, 2, 2\), expected \(2, 4, 3, 2, 2\) \(\[N, Ri, oh, ow, 2\]"),
    ({"offsets": np.zeros((2, 4, 2, 3, 2))}, r"offsets has shape \(2, 4, 2, 3, 2\), expected"),
    ({"mask": np.zeros((2, 4, 3))},
     r"mask has shape \(2, 4, 3\), expected \(2, 4, 3, 2\) \(\[N, Ri, oh, ow\]\)"),
], ids=["rois-images", "rois-width", "rois-rank", "offsets-flat", "offsets-swapped", "mask"])
def test_per_image_bad_shapes(override, match):
  with pytest.raises(ValueError, match=match):
    deform_roi_pool(**(PER_IMAGE_OK | override), output_size=(3, 2))
