"""The Flax RoI pooling modules: parameters, initial equalities, dtypes, mmcv conversion and
training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference_roi_pool as ref
from flaxdcn.linen.roi_pool import DeformRoIPool, ModulatedDeformRoIPool
from flaxdcn.ops.roi_pool import deform_roi_pool
from tolerances import assert_close

MODULES = [pytest.param(DeformRoIPool, id="DeformRoIPool"),
           pytest.param(ModulatedDeformRoIPool, id="ModulatedDeformRoIPool")]

POOL = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=0, gamma=0.2)


def make_inputs(seed=0, n=2, height=9, width=11, channels=3, num_rois=5):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(n, height, width, channels)).astype(np.float32)
  xy = rng.uniform(-2, 12, (num_rois, 2))
  size = rng.uniform(3, 14, (num_rois, 2))
  rois = np.concatenate([rng.integers(0, n, (num_rois, 1)), xy, xy + size], axis=1)
  return jnp.asarray(features), jnp.asarray(rois, jnp.float32)


@pytest.mark.parametrize("module", MODULES)
def test_param_tree(module):
  features, rois = make_inputs()
  layer = module(**POOL, deform_fc_channels=8)
  variables = jax.jit(layer.init)(jax.random.key(0), features, rois)
  shapes = jax.tree_util.tree_map(jnp.shape, variables["params"])
  want = {"offset_fc_0": {"kernel": (2 * 3 * 3, 8), "bias": (8,)},
          "offset_fc_2": {"kernel": (8, 8), "bias": (8,)},
          "offset_fc_4": {"kernel": (8, 2 * 3 * 2), "bias": (2 * 3 * 2,)}}
  if module is ModulatedDeformRoIPool:
    want |= {"mask_fc_0": {"kernel": (2 * 3 * 3, 8), "bias": (8,)},
             "mask_fc_2": {"kernel": (8, 2 * 3), "bias": (2 * 3,)}}
  assert shapes == want
  params = variables["params"]
  for last in ("offset_fc_4", "mask_fc_2"):
    if last in params:
      assert not np.any(np.asarray(params[last]["kernel"]))
      assert not np.any(np.asarray(params[last]["bias"]))
  assert np.any(np.asarray(params["offset_fc_0"]["kernel"]))


@pytest.mark.parametrize("module, factor", [(DeformRoIPool, 1.0), (ModulatedDeformRoIPool, 0.5)],
                         ids=["DeformRoIPool", "ModulatedDeformRoIPool"])
def test_init_equals_plain_pooling(module, factor, implementation):
  """Zero-initialised last layers: plain pooling at init (x sigmoid(0) = 0.5 with a mask)."""
  features, rois = make_inputs(seed=1)
  layer = module(**POOL, deform_fc_channels=16, implementation=implementation)
  variables = layer.init(jax.random.key(1), features, rois)
  out = jax.jit(layer.apply)(variables, features, rois)
  plain = deform_roi_pool(features, rois, **POOL, implementation=implementation)
  assert out.shape == (5, 2, 3, 3)
  assert_close(out, factor * plain, jnp.float32)


def test_heads_feed_offsets_and_mask_in_layout(implementation):
  """The last layers' outputs are ``(ph, pw, (dy, dx))`` offsets and ``(ph, pw)`` mask logits."""
  features, rois = make_inputs(seed=2)
  layer = ModulatedDeformRoIPool(**POOL, deform_fc_channels=4, implementation=implementation)
  params = layer.init(jax.random.key(2), features, rois)["params"]
  rng = np.random.default_rng(2)
  offsets = rng.normal(size=(2, 3, 2))
  logits = rng.normal(size=(2, 3))
  params["offset_fc_4"]["bias"] = jnp.asarray(offsets.reshape(-1), jnp.float32)
  params["mask_fc_2"]["bias"] = jnp.asarray(logits.reshape(-1), jnp.float32)
  out = jax.jit(layer.apply)({"params": params}, features, rois)
  want = ref.deform_roi_pool(features, rois, np.broadcast_to(offsets, (5, 2, 3, 2)),
                             np.broadcast_to(1 / (1 + np.exp(-logits)), (5, 2, 3)), **POOL)
  assert_close(out, want, jnp.float32)


def _mmcv_pack_forward(features_nchw, rois, weights, output_size, modulated, **pool_kwargs):
  """mmcv's (Modulated)DeformRoIPoolPack.forward in NumPy, in mmcv's own layouts: NCHW features,
  torch ``Linear`` weights ``[out, in]``, the pooled RoI flattened as (C, oh, ow), offsets viewed as
  ``[R, 2, oh, ow]`` with channel 0 read as the x offset (as mmcv's kernel does)."""
  oh, ow = output_size
  features = features_nchw.transpose(0, 2, 3, 1)

  def pool(offset_nchw=None):
    offsets = None if offset_nchw is None else offset_nchw[:, ::-1].transpose(0, 2, 3, 1)
    out = ref.deform_roi_pool(features, rois, offsets, output_size=output_size, **pool_kwargs)
    return out.transpose(0, 3, 1, 2)  # [R, C, oh, ow]

  def linear(x, name):
    return x @ weights[name + ".weight"].T + weights[name + ".bias"]

  x = pool().reshape(len(rois), -1)
  h = np.maximum(linear(x, "offset_fc.0"), 0)
  h = np.maximum(linear(h, "offset_fc.2"), 0)
  offset = linear(h, "offset_fc.4").reshape(len(rois), 2, oh, ow)
  out = pool(offset)
  if modulated:
    m = np.maximum(linear(x, "mask_fc.0"), 0)
    mask = 1 / (1 + np.exp(-linear(m, "mask_fc.2")))
    out = out * mask.reshape(len(rois), 1, oh, ow)
  return out.transpose(0, 2, 3, 1)


def _convert_mmcv(weights, channels, output_size, fc):
  """The conversion documented in the module docstrings."""
  oh, ow = output_size

  def first(w):
    return w.reshape(fc, channels, oh, ow).transpose(2, 3, 1, 0).reshape(oh * ow * channels, fc)

  params = {
      "offset_fc_0": {"kernel": first(weights["offset_fc.0.weight"]),
                      "bias": weights["offset_fc.0.bias"]},
      "offset_fc_2": {"kernel": weights["offset_fc.2.weight"].T,
                      "bias": weights["offset_fc.2.bias"]},
      "offset_fc_4": {
          "kernel": weights["offset_fc.4.weight"].reshape(2, oh, ow, fc)[::-1]
                    .transpose(1, 2, 0, 3).reshape(-1, fc).T,
          "bias": weights["offset_fc.4.bias"].reshape(2, oh, ow)[::-1].transpose(1, 2, 0)
                  .reshape(-1)},
  }
  if "mask_fc.0.weight" in weights:
    params["mask_fc_0"] = {"kernel": first(weights["mask_fc.0.weight"]),
                           "bias": weights["mask_fc.0.bias"]}
    params["mask_fc_2"] = {"kernel": weights["mask_fc.2.weight"].T,
                           "bias": weights["mask_fc.2.bias"]}
  return jax.tree_util.tree_map(jnp.asarray, params)


@pytest.mark.parametrize("module", MODULES)
def test_mmcv_checkpoint_conversion(module):
  """Random mmcv-layout weights, converted as documented, give mmcv's forward."""
  channels, fc, output_size = 3, 6, (2, 3)
  oh, ow = output_size
  features, rois = make_inputs(seed=3, channels=channels)
  rng = np.random.default_rng(3)
  shapes = {"offset_fc.0": (fc, channels * oh * ow), "offset_fc.2": (fc, fc),
            "offset_fc.4": (2 * oh * ow, fc)}
  if module is ModulatedDeformRoIPool:
    shapes |= {"mask_fc.0": (fc, channels * oh * ow), "mask_fc.2": (oh * ow, fc)}
  weights = {}
  for name, shape in shapes.items():
    weights[name + ".weight"] = rng.normal(size=shape) * 0.3
    weights[name + ".bias"] = rng.normal(size=shape[:1]) * 0.3
  pool = {k: v for k, v in POOL.items() if k != "output_size"}
  with jax.enable_x64(True):
    layer = module(output_size=output_size, **pool, deform_fc_channels=fc,
                   param_dtype=jnp.float64, implementation="xla")
    params = _convert_mmcv(weights, channels, output_size, fc)
    out = jax.jit(layer.apply)({"params": params}, features.astype(jnp.float64),
                               rois.astype(jnp.float64))
  want = _mmcv_pack_forward(np.asarray(features, np.float64).transpose(0, 3, 1, 2),
                            np.asarray(rois, np.float64), weights, output_size,
                            module is ModulatedDeformRoIPool, **pool)
  assert np.abs(want).max() > 0.1
  assert_close(out, want, jnp.float64)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("features_dtype, dtype, param_dtype, result", [
    (jnp.float32, None, jnp.float32, jnp.float32),
    (jnp.bfloat16, None, jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float32, jnp.float32),
    (jnp.float32, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
], ids=["f32", "bf16-features", "f32-compute", "bf16-everything"])
def test_dtypes(module, features_dtype, dtype, param_dtype, result):
  features, rois = make_inputs(seed=4)
  features = features.astype(features_dtype)
  layer = module(**POOL, deform_fc_channels=8, dtype=dtype, param_dtype=param_dtype)
  variables = layer.init(jax.random.key(4), features, rois)
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == param_dtype
  out = jax.jit(layer.apply)(variables, features, rois)
  assert out.dtype == result
  factor = 0.5 if module is ModulatedDeformRoIPool else 1.0
  plain = deform_roi_pool(features.astype(jnp.float32), rois, **POOL)
  assert_close(out, factor * plain, result)


@pytest.mark.parametrize("module", MODULES)
def test_per_image_rois(module, implementation):
  """Per-image boxes ``[N, Ri, 4]`` give the outputs and gradients of the same boxes as
  ``[R, 5]`` rows; padding boxes pool zeros and add nothing to any gradient."""
  features, _ = make_inputs(seed=5)
  rng = np.random.default_rng(5)
  corner = rng.uniform(-2, 10, (2, 4, 2))
  boxes = np.concatenate([corner, corner + rng.uniform(3, 12, (2, 4, 2))], axis=-1)
  boxes[0, 3] = 0.0
  boxes[1, 0] = [6.0, 2.0, 1.0, 9.0]
  valid = (boxes[..., 0] < boxes[..., 2]) & (boxes[..., 1] < boxes[..., 3])
  index = np.broadcast_to(np.arange(2.0)[:, None, None], (2, 4, 1))
  rows = jnp.asarray(np.concatenate([index, boxes], axis=-1)[valid], jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  layer = module(**POOL, deform_fc_channels=8, implementation=implementation)
  variables = layer.init(jax.random.key(5), features, boxes)
  # Non-zero last layers: offsets and mask depend on the parameters.
  variables = jax.tree_util.tree_map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(6), a.shape), variables)
  out = jax.jit(layer.apply)(variables, features, boxes)
  assert out.shape == (2, 4, 2, 3, 3)
  assert_close(out[valid], jax.jit(layer.apply)(variables, features, rows), jnp.float32)
  assert not np.any(np.asarray(out)[~valid])

  def loss(v, f, r):
    return jnp.sum(jnp.sin(layer.apply(v, f, r)))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  for got, want in zip(jax.tree_util.tree_leaves(grad(variables, features, boxes)),
                       jax.tree_util.tree_leaves(grad(variables, features, rows))):
    assert_close(got, want, jnp.float32)


def test_bad_features_rank():
  features, rois = make_inputs()
  with pytest.raises(ValueError, match=r"DeformRoIPool: features has shape \(9, 11, 3\)"):
    DeformRoIPool(**POOL).init(jax.random.key(0), features[0], rois)


class _Detector(nn.Module):
  """A toy RoI head: conv features, deformable RoI pooling, a per-RoI regression."""
  pool: type

  @nn.compact
  def __call__(self, images, rois):
    x = nn.relu(nn.Conv(4, (3, 3))(images))
    x = self.pool(output_size=(3, 3), spatial_scale=0.5, deform_fc_channels=16)(x, rois)
    return nn.Dense(1)(x.reshape(x.shape[0], -1))[:, 0]


@pytest.mark.parametrize("module", MODULES)
def test_training_reduces_loss(module):
  """A few Adam steps on a toy detector: the loss goes down and the offset head learns."""
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  xy = rng.uniform(0, 20, (12, 2))
  size = rng.uniform(4, 12, (12, 2))
  rois = jnp.asarray(np.concatenate([rng.integers(0, 2, (12, 1)), xy, xy + size], axis=1),
                     jnp.float32)
  targets = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
  model = _Detector(module)
  params = model.init(jax.random.key(5), images, rois)["params"]
  optimizer = optax.adam(3e-2)
  state = optimizer.init(params)

  def loss_fn(params):
    return jnp.mean((model.apply({"params": params}, images, rois) - targets) ** 2)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(15):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  pool_name = module.__name__ + "_0"
  assert np.any(np.asarray(params[pool_name]["offset_fc_4"]["kernel"]))
