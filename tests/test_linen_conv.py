"""``flaxdcn.DeformConv`` and ``flaxdcn.ModulatedDeformConv`` against ``flax.linen.Conv``, the
loop reference and the contract of docs/ops/deform_conv.md and docs/modules.md
(zero-initialised offset head, parameter layout, dtypes)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import flaxdcn
import flaxdcn.linen.conv
import flaxdcn.ops.deform_conv
import reference as ref
from reference import Case
from tolerances import assert_close

#: Module geometry attributes (kernel_size, strides, padding, kernel_dilation, groups).
GEOMETRIES = [
    pytest.param(dict(kernel_size=(3, 3)), id="3x3-SAME"),
    pytest.param(dict(kernel_size=(3, 2), strides=(2, 1), padding=((1, 0), (0, 2)),
                      kernel_dilation=(2, 1), feature_group_count=2, offset_group_count=3),
                 id="3x2-s21-p10_02-d21-F2-G3"),
    pytest.param(dict(kernel_size=(1, 1), padding="VALID", offset_group_count=2), id="1x1-G2"),
    pytest.param(dict(kernel_size=(2, 2), strides=2, kernel_dilation=(1, 2)), id="2x2-s2-d12-SAME"),
    pytest.param(dict(kernel_size=(2, 3), strides=2, padding=(1, 2), kernel_dilation=2,
                      feature_group_count=3), id="2x3-s2-p12-d2-F3"),
]
FEATURES = 6
X_SHAPE = (2, 7, 6, 6)
MODULES = [pytest.param(flaxdcn.DeformConv, id="DeformConv"),
           pytest.param(flaxdcn.ModulatedDeformConv, id="ModulatedDeformConv")]


def _x(shape=X_SHAPE, seed=0):
  return jnp.asarray(np.random.RandomState(seed).normal(size=shape), jnp.float32)


def _params(layer, x, seed=0, head_scale=0.0):
  """Random parameters with the module's tree (from ``eval_shape`` of its ``init``: nothing is
  compiled, which keeps these tests fast); the offset head scaled by ``head_scale`` (0: as at
  init, which ``test_parameter_tree`` checks)."""
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  rng = np.random.RandomState(seed)
  def make(path, leaf):
    value = rng.normal(size=leaf.shape)
    if "conv_offset" in jax.tree_util.keystr(path):
      value = value * head_scale
    elif len(leaf.shape) == 4:  # the kernel: unit-variance outputs
      value = value / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(make, shapes)


def _conv_attrs(geometry):
  """The attributes ``nn.Conv`` shares with the deformable modules."""
  return {k: v for k, v in geometry.items() if k != "offset_group_count"}


def _case(geometry, x_shape, features=FEATURES):
  """The reference ``Case`` of a module geometry on inputs of ``x_shape``."""
  kernel = geometry["kernel_size"]
  return Case(x_shape[0], x_shape[1], x_shape[2], x_shape[3], features, kernel,
              strides=geometry.get("strides", 1), padding=geometry.get("padding", "SAME"),
              dilation=geometry.get("kernel_dilation", 1),
              fg=geometry.get("feature_group_count", 1), og=geometry.get("offset_group_count", 1))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_deform_conv_at_init_equals_conv(geometry, implementation):
  x = _x()
  layer = flaxdcn.DeformConv(FEATURES, **geometry, implementation=implementation)
  params = _params(layer, x, seed=0)
  conv = nn.Conv(FEATURES, **_conv_attrs(geometry), precision=lax.Precision.HIGHEST)
  expected = conv.apply({"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x)
  out = jax.jit(layer.apply)({"params": params}, x)
  assert out.shape == expected.shape
  assert_close(out, expected, jnp.float32)


@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_modulated_at_init_is_half_conv_plus_bias(geometry, implementation):
  x = _x()
  layer = flaxdcn.ModulatedDeformConv(FEATURES, **geometry, implementation=implementation)
  params = _params(layer, x, seed=1)
  conv = nn.Conv(FEATURES, **_conv_attrs(geometry), use_bias=False,
                 precision=lax.Precision.HIGHEST)
  expected = 0.5 * conv.apply({"params": {"kernel": params["kernel"]}}, x) + params["bias"]
  assert_close(jax.jit(layer.apply)({"params": params}, x), expected, jnp.float32)


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("module, head_factor", [
    pytest.param(flaxdcn.DeformConv, 2, id="DeformConv"),
    pytest.param(flaxdcn.ModulatedDeformConv, 3, id="ModulatedDeformConv"),
])
def test_parameter_tree(module, head_factor, use_bias, implementation):
  # Constant initialisers (no RNG to compile); they must reach the main kernel and bias only.
  layer = module(4, (3, 2), feature_group_count=2, offset_group_count=3, use_bias=use_bias,
                 kernel_init=nn.initializers.constant(0.5),
                 bias_init=nn.initializers.constant(0.25), implementation=implementation)
  params = jax.jit(layer.init)(jax.random.key(0), _x((1, 5, 5, 6)))["params"]
  shapes = jax.tree_util.tree_map(jnp.shape, params)
  k = 3 * 3 * 2  # offset_group_count * kh * kw
  expected = {"kernel": (3, 2, 3, 4),
              "conv_offset": {"kernel": (3, 2, 6, head_factor * k), "bias": (head_factor * k,)}}
  if use_bias:
    expected["bias"] = (4,)
  assert shapes == expected
  for leaf in jax.tree_util.tree_leaves(params["conv_offset"]):
    assert not np.any(np.asarray(leaf)), "the offset head must be zero-initialised"
  np.testing.assert_array_equal(params["kernel"], 0.5)
  if use_bias:
    np.testing.assert_array_equal(params["bias"], 0.25)


@pytest.mark.parametrize("dtype, param_dtype, x_dtype", [
    pytest.param(None, jnp.float32, jnp.bfloat16, id="infer-f32params-bf16x"),
    pytest.param(jnp.bfloat16, jnp.float32, jnp.float32, id="bf16-f32params-f32x"),
    pytest.param(None, jnp.bfloat16, jnp.float32, id="infer-bf16params-f32x"),
    pytest.param(jnp.float16, jnp.float32, jnp.float32, id="f16-f32params-f32x"),
])
@pytest.mark.parametrize("module", MODULES)
def test_dtypes_like_nn_conv(module, dtype, param_dtype, x_dtype, implementation):
  """Parameters in ``param_dtype``; output dtype and values as ``nn.Conv``'s with the same
  dtype settings (at init, where the offsets are zero)."""
  x = _x((1, 5, 6, 4)).astype(x_dtype)
  geometry = dict(kernel_size=(3, 3), padding="SAME")
  layer = module(4, **geometry, dtype=dtype, param_dtype=param_dtype,
                 implementation=implementation)
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      jax.eval_shape(layer.init, jax.random.key(0), x)):
    assert leaf.dtype == param_dtype, jax.tree_util.keystr(path)
  params = _params(layer, x, seed=2)
  conv = nn.Conv(4, **geometry, dtype=dtype, param_dtype=param_dtype, use_bias=False)
  conv_term = conv.apply({"params": {"kernel": params["kernel"]}}, x)
  scale = 0.5 if module is flaxdcn.ModulatedDeformConv else 1.0
  expected_dtype = nn.Conv(4, **geometry, dtype=dtype, param_dtype=param_dtype).apply(
      {"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x).dtype
  out = jax.jit(layer.apply)({"params": params}, x)
  assert out.dtype == expected_dtype
  expected = scale * conv_term.astype(jnp.float32) + params["bias"].astype(jnp.float32)
  assert_close(out, expected, out.dtype)


@pytest.mark.parametrize("geometry, module", [
    pytest.param(*GEOMETRIES[1].values, flaxdcn.DeformConv, id=f"DeformConv-{GEOMETRIES[1].id}")
] + [pytest.param(*g.values, flaxdcn.ModulatedDeformConv, id=f"ModulatedDeformConv-{g.id}")
     for g in GEOMETRIES])
def test_attributes_reach_the_op(geometry, module, implementation):
  """With a random offset head: the head's offsets/mask computed by hand, then the loop reference
  with the module's kernel and bias and its strides/padding/dilation/groups."""
  x = _x()
  layer = module(FEATURES, **geometry, implementation=implementation)
  apply = jax.jit(layer.apply)
  params = _params(layer, x, seed=3)
  init_out = apply({"params": params}, x)
  params = _params(layer, x, seed=3, head_scale=0.3)
  out = apply({"params": params}, x)

  case = _case(geometry, X_SHAPE)
  head = lax.conv_general_dilated(
      x, params["conv_offset"]["kernel"], ref.pair(case.strides), case.explicit_padding,
      rhs_dilation=ref.pair(case.dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST) + params["conv_offset"]["bias"]
  head = np.asarray(head, np.float64)
  k = case.num_points
  mask = None
  if module is flaxdcn.ModulatedDeformConv:
    mask = 1 / (1 + np.exp(-head[..., 2 * k:]))
  expected = ref.reference(case, dict(inputs=x, offsets=head[..., :2 * k],
                                      kernel=params["kernel"], mask=mask, bias=params["bias"]))
  assert_close(out, expected, jnp.float32)
  # ... and the head really matters.
  assert np.max(np.abs(np.asarray(out) - np.asarray(init_out))) > 0.05


@pytest.mark.parametrize("module", MODULES)
def test_sown_offsets_and_mask(module, implementation):
  """The head's offsets (and mask) are sown as intermediates, with the head's channel layout."""
  x = _x()
  layer = module(FEATURES, (3, 3), offset_group_count=2, implementation=implementation)
  params = _params(layer, x, seed=4, head_scale=0.3)
  _, state = layer.apply({"params": params}, x[None], mutable=["intermediates"])
  sown = state["intermediates"]
  head = lax.conv_general_dilated(
      x, params["conv_offset"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST) + params["conv_offset"]["bias"]
  k = 2 * 3 * 3
  (offsets,) = sown["offsets"]
  assert offsets.shape == (1,) + X_SHAPE[:3] + (2 * k,)
  assert_close(offsets[0], head[..., :2 * k], jnp.float32)
  if module is flaxdcn.ModulatedDeformConv:
    (mask,) = sown["mask"]
    assert_close(mask[0], jax.nn.sigmoid(head[..., 2 * k:]), jnp.float32)
  else:
    assert "mask" not in sown


@pytest.mark.parametrize("dy, dx", [(1, 0), (0, -1)], ids=["dy=+1", "dx=-1"])
@pytest.mark.parametrize("module", MODULES)
def test_offset_head_bias_shifts_the_image(module, dy, dx, implementation):
  """A head bias of (dy, dx) at every kernel point = ``nn.Conv`` of the image shifted by (dy, dx);
  for DCNv2 a mask bias b scales the conv term by sigmoid(b). Checks the head's channel layout
  (offsets (g, i, j, (dy, dx)) first, then the mask) without the loop reference."""
  x = _x((2, 6, 5, 4))
  layer = module(3, (3, 3), padding="VALID", implementation=implementation)
  params = _params(layer, x, seed=5)
  k = 9
  head_bias = np.zeros(params["conv_offset"]["bias"].shape, np.float32)
  head_bias[0:2 * k:2] = dy
  head_bias[1:2 * k:2] = dx
  scale = 1.0
  if module is flaxdcn.ModulatedDeformConv:
    head_bias[2 * k:] = 1.5
    scale = 1 / (1 + np.exp(-1.5))
  params = {**params, "conv_offset": {**params["conv_offset"], "bias": jnp.asarray(head_bias)}}
  xs = np.zeros_like(np.asarray(x))
  height, width = x.shape[1:3]
  xs[:, max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = \
      np.asarray(x)[:, max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)]
  conv = nn.Conv(3, (3, 3), padding="VALID", use_bias=False, precision=lax.Precision.HIGHEST)
  expected = scale * conv.apply({"params": {"kernel": params["kernel"]}}, xs) + params["bias"]
  assert_close(jax.jit(layer.apply)({"params": params}, x), expected, jnp.float32)


@pytest.mark.parametrize("module", MODULES)
def test_unbatched_and_extra_batch_dims(module, implementation):
  x = _x((2, 3, 5, 6, 4))
  layer = module(3, (3, 3), strides=(2, 1), implementation=implementation)
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


@pytest.mark.parametrize("kwargs, x_shape, match", [
    pytest.param(dict(kernel_size=(3, 3, 3)), (1, 5, 5, 4), r"kernel_size", id="kernel-size-3"),
    pytest.param(dict(kernel_size=(3, 3)), (5, 4), r"inputs has shape \(5, 4\)", id="rank-2"),
    pytest.param(dict(kernel_size=(3, 3), feature_group_count=3), (1, 5, 5, 4),
                 r"4 channels.*feature_group_count=3", id="groups"),
    pytest.param(dict(kernel_size=(3, 3), offset_group_count=3), (1, 5, 5, 4),
                 r"offset_group_count=3", id="offset-groups"),
])
@pytest.mark.parametrize("module", MODULES)
def test_module_errors(module, kwargs, x_shape, match, implementation):
  layer = module(4, **kwargs, implementation=implementation)
  with pytest.raises(ValueError, match=match):
    jax.jit(layer.init)(jax.random.key(0), jnp.ones(x_shape))
