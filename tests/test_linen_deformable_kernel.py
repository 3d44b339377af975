"""``GlobalDeformableKernel`` and ``LocalDeformableKernel`` against ``flax.linen.Conv`` (at
initialisation) and the loop reference of tests/reference_deformable_kernel.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import flaxdcn.linen.deformable_kernel
import flaxdcn.ops.deformable_kernel
import reference_deformable_kernel as ref
from flaxdcn.linen.deformable_kernel import GlobalDeformableKernel, LocalDeformableKernel
from tolerances import assert_close

#: Module geometry attributes; scope minus kernel is even, so zero offsets read an exact crop.
GEOMETRIES = [
    pytest.param(dict(kernel_size=(3, 3), scope_size=(5, 5)), id="3x3-in-5x5-SAME"),
    pytest.param(dict(kernel_size=(3, 2), scope_size=(5, 4), strides=(2, 1),
                      padding=((1, 0), (0, 2)), kernel_dilation=(2, 1), feature_group_count=2),
                 id="3x2-in-5x4-s21-p10_02-d21-F2"),
    pytest.param(dict(kernel_size=3, scope_size=5, strides=2, feature_group_count=6),
                 id="3x3-in-5x5-s2-depthwise"),
    pytest.param(dict(kernel_size=(2, 2), scope_size=(4, 2), padding="VALID"),
                 id="2x2-in-4x2-VALID"),
]
FEATURES = 6
X_SHAPE = (2, 7, 6, 6)
MODULES = [pytest.param(GlobalDeformableKernel, id="Global"),
           pytest.param(LocalDeformableKernel, id="Local")]
HEADS = ("fc_offset", "conv_offset")


def _x(shape=X_SHAPE, seed=0):
  return jnp.asarray(np.random.RandomState(seed).normal(size=shape), jnp.float32)


def _params(layer, x, seed=0, head_scale=0.0):
  """Random parameters with the module's tree (from ``eval_shape``: nothing compiled); the offset
  head scaled by ``head_scale`` (0: as at init)."""
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  rng = np.random.RandomState(seed)

  def make(path, leaf):
    value = rng.normal(size=leaf.shape)
    if any(head in jax.tree_util.keystr(path) for head in HEADS):
      value = value * head_scale
    elif len(leaf.shape) == 4:  # the scope: unit-variance outputs
      value = value / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def _crop(scope, kernel_size):
  (kh, kw), (s_h, s_w) = kernel_size, scope.shape[:2]
  top, left = (s_h - kh) // 2, (s_w - kw) // 2
  return scope[top:top + kh, left:left + kw]


def _conv_attrs(geometry):
  """The attributes ``nn.Conv`` shares with the Deformable Kernels modules (``nn.Conv`` reads an
  int ``kernel_size`` as a 1-D kernel; the modules, like ``DeformConv``, as square)."""
  attrs = {k: v for k, v in geometry.items() if k != "scope_size"}
  return {**attrs, "kernel_size": _pair(attrs["kernel_size"])}


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("module", MODULES)
def test_at_init_equals_conv_with_centred_crop(module, geometry):
  x = _x()
  layer = module(FEATURES, **geometry)
  params = _params(layer, x, seed=0)
  kernel_size = _pair(geometry["kernel_size"])
  conv = nn.Conv(FEATURES, **_conv_attrs(geometry), precision=lax.Precision.HIGHEST)
  expected = conv.apply(
      {"params": {"kernel": _crop(params["kernel"], kernel_size), "bias": params["bias"]}}, x)
  out = jax.jit(layer.apply)({"params": params}, x)
  assert out.shape == expected.shape
  assert_close(out, expected, jnp.float32)


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("module", MODULES)
def test_parameter_tree(module, use_bias):
  # Constant initialisers: they must reach the scope and the bias only, never the head.
  layer = module(4, (3, 2), scope_size=(5, 4), feature_group_count=2, use_bias=use_bias,
                 kernel_init=nn.initializers.constant(0.5),
                 bias_init=nn.initializers.constant(0.25))
  params = jax.jit(layer.init)(jax.random.key(0), _x((1, 5, 5, 6)))["params"]
  shapes = jax.tree_util.tree_map(jnp.shape, params)
  k2 = 3 * 2 * 2
  head = ({"fc_offset": {"kernel": (6, k2), "bias": (k2,)}} if module is GlobalDeformableKernel
          else {"conv_offset": {"kernel": (3, 2, 6, k2), "bias": (k2,)}})
  expected = {"kernel": (5, 4, 3, 4), **head}
  if use_bias:
    expected["bias"] = (4,)
  assert shapes == expected
  for leaf in jax.tree_util.tree_leaves(params[next(iter(head))]):
    assert not np.any(np.asarray(leaf)), "the offset head must be zero-initialised"
  np.testing.assert_array_equal(params["kernel"], 0.5)
  if use_bias:
    np.testing.assert_array_equal(params["bias"], 0.25)


@pytest.mark.parametrize("module", MODULES)
def test_default_scope_is_kernel_size(module):
  x = _x((1, 6, 5, 4))
  layer = module(3, (3, 2))
  params = _params(layer, x, seed=1)
  assert params["kernel"].shape == (3, 2, 4, 3)
  conv = nn.Conv(3, (3, 2), precision=lax.Precision.HIGHEST)
  expected = conv.apply({"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x)
  assert_close(jax.jit(layer.apply)({"params": params}, x), expected, jnp.float32)


@pytest.mark.parametrize("geometry", GEOMETRIES[1:3])
@pytest.mark.parametrize("module", MODULES)
def test_attributes_reach_the_op(module, geometry):
  """With a random offset head: the head's offsets computed by hand (and sown by the module), then
  the loop reference with the module's scope, bias, strides, padding, dilation and groups."""
  x = _x()
  layer = module(FEATURES, **geometry)
  apply = jax.jit(layer.apply)
  init_out = apply({"params": _params(layer, x, seed=3)}, x)
  params = _params(layer, x, seed=3, head_scale=0.3)
  out = apply({"params": params}, x)

  kernel_size = _pair(geometry["kernel_size"])
  strides = _pair(geometry.get("strides", 1))
  dilation = _pair(geometry.get("kernel_dilation", 1))
  padding = geometry.get("padding", "SAME")
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    padding = tuple(lax.padtype_to_pads(x.shape[1:3], window, strides, padding))
  x64 = np.asarray(x, np.float64)
  if module is GlobalDeformableKernel:
    head = params["fc_offset"]
    offsets = x64.mean(axis=(1, 2)) @ np.asarray(head["kernel"], np.float64) + head["bias"]
  else:
    head = params["conv_offset"]
    offsets = np.asarray(lax.conv_general_dilated(
        x, head["kernel"], strides, padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
        + head["bias"], np.float64)
  expected = ref.deformable_kernel_conv2d(
      x64, offsets, params["kernel"], params["bias"], kernel_size=kernel_size, strides=strides,
      padding=padding, dilation=dilation, groups=geometry.get("feature_group_count", 1))
  assert_close(out, expected, jnp.float32)
  # ... and the head really matters.
  assert np.max(np.abs(np.asarray(out) - np.asarray(init_out))) > 0.05
  # The offsets are sown as intermediates, exactly as the head predicts them.
  _, state = layer.apply({"params": params}, x, mutable=["intermediates"])
  (sown,) = state["intermediates"]["offsets"]
  assert_close(sown, offsets, jnp.float32)


@pytest.mark.parametrize("dtype, param_dtype, x_dtype", [
    pytest.param(None, jnp.float32, jnp.bfloat16, id="infer-f32params-bf16x"),
    pytest.param(jnp.bfloat16, jnp.float32, jnp.float32, id="bf16-f32params-f32x"),
    pytest.param(None, jnp.bfloat16, jnp.float32, id="infer-bf16params-f32x"),
    pytest.param(jnp.float16, jnp.float32, jnp.float32, id="f16-f32params-f32x"),
])
@pytest.mark.parametrize("module", MODULES)
def test_dtypes_like_nn_conv(module, dtype, param_dtype, x_dtype):
  """Parameters in ``param_dtype``; output dtype and values as ``nn.Conv``'s with the same dtype
  settings and the centred crop (at init)."""
  x = _x((1, 5, 6, 4)).astype(x_dtype)
  layer = module(4, (3, 3), scope_size=5, dtype=dtype, param_dtype=param_dtype)
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      jax.eval_shape(layer.init, jax.random.key(0), x)):
    assert leaf.dtype == param_dtype, jax.tree_util.keystr(path)
  params = _params(layer, x, seed=2)
  conv = nn.Conv(4, (3, 3), dtype=dtype, param_dtype=param_dtype)
  conv_params = {"params": {"kernel": _crop(params["kernel"], (3, 3)), "bias": params["bias"]}}
  expected = conv.apply(conv_params, x)
  out = jax.jit(layer.apply)({"params": params}, x)
  assert out.dtype == expected.dtype
  assert_close(out, expected.astype(jnp.float32), out.dtype)


@pytest.mark.parametrize("module", MODULES)
def test_unbatched_and_extra_batch_dims(module):
  x = _x((2, 3, 5, 6, 4))
  layer = module(3, (3, 3), scope_size=(5, 4), strides=(2, 1))
  params = _params(layer, x[0, 0], seed=6, head_scale=0.3)
  apply = jax.jit(layer.apply)
  flat = apply({"params": params}, x.reshape((6, 5, 6, 4)))
  assert flat.shape == (6, 3, 6, 3)
  many = apply({"params": params}, x)
  assert many.shape == (2, 3, 3, 6, 3)
  assert_close(many.reshape(flat.shape), flat, jnp.float32)
  single = apply({"params": params}, x[1, 2])
  assert single.shape == (3, 6, 3)
  assert_close(single, flat[5], jnp.float32)


@pytest.mark.parametrize("module", MODULES)
def test_training_lowers_the_loss_and_moves_the_offsets(module):
  """A few Adam steps on a regression target: the loss goes down and the zero-initialised offset
  head learns (its gradient is not cut off at Δk = 0)."""
  x = _x((4, 8, 8, 4), seed=7)
  target = _x((4, 8, 8, 4), seed=8)
  layer = module(4, (3, 3), scope_size=(5, 5), feature_group_count=2)
  params = jax.jit(layer.init)(jax.random.key(0), x)["params"]
  optimizer = optax.adam(3e-2)

  def loss_fn(p):
    return jnp.mean((layer.apply({"params": p}, x) - target) ** 2)

  @jax.jit
  def step(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  state = optimizer.init(params)
  losses = []
  for _ in range(6):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses
  head = params["fc_offset" if module is GlobalDeformableKernel else "conv_offset"]
  assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(head)) > 1e-3


@pytest.mark.parametrize("kwargs, x_shape, error, match", [
    pytest.param(dict(kernel_size=(3, 3), scope_size=(5, 2)), (1, 5, 5, 4), ValueError,
                 r"scope_size \(5, 2\) must be at least kernel_size \(3, 3\)", id="small-scope"),
    pytest.param(dict(kernel_size=(3, 3, 3)), (1, 5, 5, 4), ValueError, r"kernel_size",
                 id="kernel-size-3"),
    pytest.param(dict(kernel_size=3, scope_size=(5, 5, 5)), (1, 5, 5, 4), ValueError,
                 r"scope_size must be an int or a pair", id="scope-size-3"),
    pytest.param(dict(kernel_size=(3, 3)), (5, 4), ValueError, r"inputs has shape \(5, 4\)",
                 id="rank-2"),
    pytest.param(dict(kernel_size=(3, 3), feature_group_count=3), (1, 5, 5, 4), ValueError,
                 r"4 channels.*feature_group_count=3", id="groups"),
    pytest.param(dict(kernel_size=(3, 3), implementation="ffi"), (1, 5, 5, 4),
                 NotImplementedError, r"implementation='ffi'", id="ffi"),
])
@pytest.mark.parametrize("module", MODULES)
def test_module_errors(module, kwargs, x_shape, error, match):
  layer = module(4, **kwargs)
  with pytest.raises(error, match=match):
    jax.jit(layer.init)(jax.random.key(0), jnp.ones(x_shape))
