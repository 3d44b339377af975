"""``flaxdcn.nnx``: the NNX modules against their linen twins (through ``load_linen_params`` and
``linen_params``), the zero-initialised identities, and the NNX transforms (``nnx.jit`` with
``nnx.Optimizer``, ``split``/``merge``, ``vmap``/``scan`` over a stack of layers, ``remat``,
``capture``)."""

from __future__ import annotations

import contextlib
import functools
import pathlib
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import flaxdcn
import flaxdcn.nnx
from flaxdcn.ops.roi_pool import deform_roi_pool
from multidevice_testing import run_multidevice_script
from tolerances import assert_close

C, OUT = 6, 6
X_SHAPE = (2, 7, 6, C)

#: kind -> (NNX class, linen class); the kinds share one geometry table each.
CONV = {"DeformConv": (flaxdcn.nnx.DeformConv, flaxdcn.DeformConv),
        "ModulatedDeformConv": (flaxdcn.nnx.ModulatedDeformConv, flaxdcn.ModulatedDeformConv)}
DK = {"GlobalDeformableKernel": (flaxdcn.nnx.GlobalDeformableKernel,
                                 flaxdcn.GlobalDeformableKernel),
      "LocalDeformableKernel": (flaxdcn.nnx.LocalDeformableKernel, flaxdcn.LocalDeformableKernel)}
ROI = {"DeformRoIPool": (flaxdcn.nnx.DeformRoIPool, flaxdcn.DeformRoIPool),
       "ModulatedDeformRoIPool": (flaxdcn.nnx.ModulatedDeformRoIPool,
                                  flaxdcn.ModulatedDeformRoIPool)}

CONV_GEOMETRIES = {
    "3x3-SAME": dict(kernel_size=(3, 3)),
    "3x2-s21-p10_02-d21-F2-G3": dict(kernel_size=(3, 2), strides=(2, 1),
                                     padding=((1, 0), (0, 2)), kernel_dilation=(2, 1),
                                     feature_group_count=2, offset_group_count=3),
    "2x3-s2-p12-d2-F3-nobias": dict(kernel_size=(2, 3), strides=2, padding=(1, 2),
                                    kernel_dilation=2, feature_group_count=3, use_bias=False),
}
DK_GEOMETRIES = {
    "3x3-in-5x5-SAME": dict(kernel_size=(3, 3), scope_size=(5, 5)),
    "3x2-in-5x4-s21-p10_02-d21-F2": dict(kernel_size=(3, 2), scope_size=(5, 4), strides=(2, 1),
                                         padding=((1, 0), (0, 2)), kernel_dilation=(2, 1),
                                         feature_group_count=2),
    "3-in-5-s2-depthwise": dict(kernel_size=3, scope_size=5, strides=2, feature_group_count=6),
}
ROI_GEOMETRIES = {
    "2x3-scale0.5": dict(output_size=(2, 3), spatial_scale=0.5, gamma=0.2,
                         deform_fc_channels=8),
    "3-sr2": dict(output_size=3, sampling_ratio=2, deform_fc_channels=5),
}

#: (dtype, param_dtype, inputs dtype) of the dtype cases; "f64" runs under x64.
DTYPES = {"f32": (None, jnp.float32, jnp.float32),
          "bf16": (jnp.bfloat16, jnp.float32, jnp.float32),
          "bf16-params": (None, jnp.bfloat16, jnp.bfloat16),
          "f64": (None, jnp.float64, jnp.float64)}

#: (kind, geometry, dtype case, implementation): every module in several geometries and dtype
#: cases; None is the default implementation (the native kernel where it is built), "xla" the
#: pure-jnp one (the jnp RoI pooling compiles slowly, so its dtype cases use the default).
CASES = [
    *[(kind, geometry, "f32", None) for kind in CONV for geometry in CONV_GEOMETRIES],
    *[(kind, "3x3-SAME", dtype, "xla") for kind in CONV
      for dtype in ("bf16", "bf16-params", "f64")],
    *[(kind, geometry, "f32", None) for kind in DK for geometry in DK_GEOMETRIES],
    *[(kind, "3x2-in-5x4-s21-p10_02-d21-F2", dtype, None) for kind in DK
      for dtype in ("bf16", "f64")],
    *[(kind, geometry, "f32", None) for kind in ROI for geometry in ROI_GEOMETRIES],
    *[(kind, "2x3-scale0.5", dtype, None) for kind in ROI for dtype in ("bf16-params", "f64")],
]


def _init(key, shape, dtype=jnp.float32):
  """A kernel initialiser from numpy (unit-variance outputs; the key is unused): building a
  module then compiles no random-number program, which keeps these tests fast."""
  del key
  rng = np.random.RandomState(int(np.prod(shape)) % 1000)
  return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), dtype)


def _x64(dtype_case):
  return jax.enable_x64(True) if dtype_case == "f64" else contextlib.nullcontext()


def _rois(seed=0, n=2, num_rois=5):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(-2, 5, (num_rois, 2))
  size = rng.uniform(2, 7, (num_rois, 2))
  return np.concatenate([rng.integers(0, n, (num_rois, 1)), xy, xy + size], axis=1)


def _build(kind, geometry, dtype_case, implementation=None, seed=0, abstract=False):
  """The NNX module, its linen twin and the call arguments of one case (parameters as at init,
  or, with ``abstract``, shapes only: nothing is computed, for the tests that load weights)."""
  dtype, param_dtype, x_dtype = DTYPES[dtype_case]
  construct = nnx.eval_shape if abstract else (lambda f: f())
  common = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_init)
  if kind in CONV or kind in DK:
    geometry = CONV_GEOMETRIES[geometry] if kind in CONV else DK_GEOMETRIES[geometry]
    attrs = dict(geometry, **common) if kind in DK else dict(
        geometry, **common, implementation=implementation)
    nnx_cls, linen_cls = CONV[kind] if kind in CONV else DK[kind]
    module = construct(lambda: nnx_cls(C, OUT, **attrs, rngs=nnx.Rngs(seed)))
    twin = linen_cls(OUT, **attrs)
    x = np.random.RandomState(seed).normal(size=X_SHAPE)
    return module, twin, (jnp.asarray(x, x_dtype),)
  attrs = dict(ROI_GEOMETRIES[geometry], **common, implementation=implementation)
  nnx_cls, linen_cls = ROI[kind]
  module = construct(lambda: nnx_cls(C, **attrs, rngs=nnx.Rngs(seed)))
  twin = linen_cls(**attrs)
  features = np.random.RandomState(seed).normal(size=(2, 8, 9, C))
  return module, twin, (jnp.asarray(features, x_dtype), jnp.asarray(_rois(seed), x_dtype))


def _random_linen_params(twin, args, seed=0, head_scale=1.0):
  """Random parameters in the linen tree of ``twin`` (``eval_shape`` of its ``init``), kernels
  scaled to unit-variance outputs, the zero-initialised heads too, by ``head_scale``."""
  shapes = jax.eval_shape(twin.init, jax.random.key(0), *args)["params"]
  rng = np.random.RandomState(seed)

  def make(path, leaf):
    value = rng.normal(size=leaf.shape)
    if len(leaf.shape) > 1:
      value = value / np.sqrt(np.prod(leaf.shape[:-1]))
    name = jax.tree_util.keystr(path)
    if any(head in name for head in ("conv_offset", "fc_offset", "offset_fc_4", "mask_fc_2")):
      value = value * head_scale
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def _call(module, *args):
  return nnx.jit(lambda m, *a: m(*a))(module, *args)


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype and a.shape == e.shape
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(e, np.float64))


@pytest.mark.parametrize("kind, geometry, dtype_case, implementation", CASES)
def test_equals_linen_with_the_same_weights(kind, geometry, dtype_case, implementation):
  """Linen weights loaded into the NNX module give bitwise the linen output and sown values, and
  come back unchanged from ``linen_params``."""
  with _x64(dtype_case):
    module, twin, args = _build(kind, geometry, dtype_case, implementation, abstract=True)
    params = _random_linen_params(twin, args, seed=1)
    flaxdcn.nnx.load_linen_params(module, params)
    _assert_trees_equal(flaxdcn.nnx.linen_params(module), params)

    expected, sown = jax.jit(lambda p, *a: twin.apply({"params": p}, *a, mutable=["intermediates"])
                             )(params, *args)
    out, captured = nnx.jit(nnx.capture(lambda m, *a: m(*a), nnx.Intermediate))(module, *args)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(out, np.float64), np.asarray(expected, np.float64))
    _assert_trees_equal(nnx.to_pure_dict(captured), sown.get("intermediates", {}))


@pytest.mark.parametrize("kind", [*CONV, *DK, *ROI])
def test_linen_params_initialise_the_linen_twin(kind):
  """The other direction: an NNX module's weights, as a linen ``params`` tree, give the linen
  twin the NNX output; the tree is the twin's own (names, shapes, dtypes)."""
  geometry = {**dict.fromkeys(CONV, "3x2-s21-p10_02-d21-F2-G3"),
              **dict.fromkeys(DK, "3x3-in-5x5-SAME"), **dict.fromkeys(ROI, "2x3-scale0.5")}[kind]
  module, twin, args = _build(kind, geometry, "f32", abstract=True)
  flaxdcn.nnx.load_linen_params(module, _random_linen_params(twin, args, seed=2))
  params = flaxdcn.nnx.linen_params(module)
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), params)
          == jax.tree.map(lambda a: (a.shape, a.dtype),
                          jax.eval_shape(twin.init, jax.random.key(0), *args)["params"]))
  np.testing.assert_array_equal(jax.jit(twin.apply)({"params": params}, *args),
                                _call(module, *args))


@pytest.mark.parametrize("kind", list(CONV))
@pytest.mark.parametrize("geometry", ["3x3-SAME", "3x2-s21-p10_02-d21-F2-G3"])
def test_conv_at_init_equals_nnx_conv(kind, geometry, implementation):
  """Zero-initialised offset head: ``DeformConv`` is ``nnx.Conv`` with its kernel and bias, and
  ``ModulatedDeformConv`` is 0.5 x the conv term + bias."""
  module, _, (x,) = _build(kind, geometry, "f32", implementation)
  module.bias = nnx.Param(jnp.linspace(-1, 1, OUT)) if module.use_bias else module.bias
  attrs = {k: v for k, v in CONV_GEOMETRIES[geometry].items() if k != "offset_group_count"}
  conv = nnx.eval_shape(lambda: nnx.Conv(C, OUT, **attrs, precision=lax.Precision.HIGHEST,
                                         rngs=nnx.Rngs(0)))
  conv.kernel = module.kernel
  conv.bias = module.bias
  plain = _call(conv, x)
  bias = module.bias[...] if module.use_bias else 0.0
  expected = plain if kind == "DeformConv" else 0.5 * (plain - bias) + bias
  assert_close(_call(module, x), expected, jnp.float32)


@pytest.mark.parametrize("kind", list(DK))
def test_deformable_kernel_at_init_equals_nnx_conv_with_centred_crop(kind):
  module, _, (x,) = _build(kind, "3x2-in-5x4-s21-p10_02-d21-F2", "f32")
  geometry = DK_GEOMETRIES["3x2-in-5x4-s21-p10_02-d21-F2"]
  attrs = {k: v for k, v in geometry.items() if k != "scope_size"}
  conv = nnx.eval_shape(lambda: nnx.Conv(C, OUT, **attrs, precision=lax.Precision.HIGHEST,
                                         rngs=nnx.Rngs(0)))
  conv.kernel = nnx.Param(module.kernel[1:4, 1:3])
  conv.bias = module.bias
  assert_close(_call(module, x), _call(conv, x), jnp.float32)


@pytest.mark.parametrize("kind, factor", [("DeformRoIPool", 1.0), ("ModulatedDeformRoIPool", 0.5)])
def test_roi_pool_at_init_is_plain_pooling(kind, factor, implementation):
  module, _, (features, rois) = _build(kind, "2x3-scale0.5", "f32", implementation)
  pool = {k: v for k, v in ROI_GEOMETRIES["2x3-scale0.5"].items() if k != "deform_fc_channels"}
  plain = jax.jit(functools.partial(deform_roi_pool, **pool, implementation=implementation))(
      features, rois)
  assert_close(_call(module, features, rois), factor * plain, jnp.float32)


@pytest.mark.parametrize("kind", list(ROI))
def test_per_image_boxes_equal_linen(kind):
  """Per-image boxes ``[N, Ri, 4]`` (with a padding box) reach the op as in linen."""
  module, twin, (features, _) = _build(kind, "2x3-scale0.5", "f32", None, abstract=True)
  boxes = _rois(seed=9, num_rois=6)[:, 1:].reshape(2, 3, 4)
  boxes[1, 2] = 0.0  # an empty box: padding
  boxes = jnp.asarray(boxes, jnp.float32)
  params = _random_linen_params(twin, (features, boxes), seed=9)
  flaxdcn.nnx.load_linen_params(module, params)
  out = _call(module, features, boxes)
  assert out.shape == (2, 3, 2, 3, C)
  np.testing.assert_array_equal(out, jax.jit(twin.apply)({"params": params}, features, boxes))


@pytest.mark.parametrize("kind", [*CONV, *DK])
def test_unbatched_and_extra_batch_dims(kind):
  geometry = "3x3-SAME" if kind in CONV else "3x3-in-5x5-SAME"
  module, twin, (x,) = _build(kind, geometry, "f32", abstract=True)
  flaxdcn.nnx.load_linen_params(module, _random_linen_params(twin, (x,), seed=3))
  y = _call(module, x)
  assert_close(_call(module, x[0]), y[0], jnp.float32)
  x4 = jnp.stack([x, x[::-1]])
  assert_close(_call(module, x4), jnp.stack([y, y[::-1]]), jnp.float32)


def test_sown_only_under_capture():
  """Like linen's ``sow`` into an immutable collection, a plain call stores nothing (no state
  change, no warning); under ``nnx.capture`` the offsets and mask are the head's outputs."""
  module, twin, (x,) = _build("ModulatedDeformConv", "3x3-SAME", "f32", abstract=True)
  flaxdcn.nnx.load_linen_params(module, _random_linen_params(twin, (x,), seed=4))
  before = nnx.graphdef(module)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _call(module, x)
  assert nnx.graphdef(module) == before
  assert not nnx.to_flat_state(nnx.state(module, nnx.Intermediate))
  _, captured = nnx.jit(nnx.capture(lambda m, x: m(x), nnx.Intermediate))(module, x)
  head = _call(module.conv_offset, x)
  (offsets,), (mask,) = captured["offsets"].get_value(), captured["mask"].get_value()
  np.testing.assert_array_equal(offsets, head[..., :18])
  np.testing.assert_array_equal(mask, jax.nn.sigmoid(head[..., 18:]))
  assert nnx.graphdef(module) == before


def test_load_linen_params_checks_names_and_shapes_and_keeps_dtypes():
  module = flaxdcn.nnx.DeformConv(4, 5, (3, 2), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  params = {"kernel": np.ones((3, 2, 4, 5), np.float64), "bias": np.arange(5.0),
            "conv_offset": {"kernel": np.zeros((3, 2, 4, 12), np.float32),
                            "bias": np.zeros(12, np.float32)}}
  flaxdcn.nnx.load_linen_params(module, flax.core.freeze(params))
  assert module.kernel[...].dtype == jnp.bfloat16 and module.bias[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(module.bias[...], np.arange(5.0))

  with pytest.raises(ValueError, match=r"no 'conv_offset/kernel' \(expected shape "
                                       r"\(3, 2, 4, 12\)\)"):
    flaxdcn.nnx.load_linen_params(module, {**params, "conv_offset": {"bias": np.zeros(12)}})
  with pytest.raises(ValueError, match=r"an unexpected 'params/kernel'"):
    flaxdcn.nnx.load_linen_params(module, {**params, "params": {"kernel": np.ones(2)}})
  with pytest.raises(ValueError, match=r"'bias' of shape \(6,\), expected \(5,\)"):
    flaxdcn.nnx.load_linen_params(module, {**params, "bias": np.zeros(6)})
  # A failed load changes nothing.
  np.testing.assert_array_equal(module.bias[...], np.arange(5.0))


@pytest.mark.parametrize("make, x_shape, match", [
    (lambda: flaxdcn.nnx.DeformConv(6, 4, 3, feature_group_count=4, rngs=nnx.Rngs(0)), None,
     r"DeformConv: in_features=6 is not divisible by feature_group_count=4"),
    (lambda: flaxdcn.nnx.ModulatedDeformConv(6, 4, (3, 3, 3), rngs=nnx.Rngs(0)), None,
     r"ModulatedDeformConv: kernel_size must be an int or a pair"),
    (lambda: flaxdcn.nnx.LocalDeformableKernel(6, 4, 3, scope_size=(5, 2), rngs=nnx.Rngs(0)),
     None, r"LocalDeformableKernel: scope_size \(5, 2\) must be at least kernel_size"),
    (lambda: flaxdcn.nnx.DeformConv(6, 4, 3, rngs=nnx.Rngs(0)), (2, 5, 5, 4),
     r"DeformConv: inputs has shape \(2, 5, 5, 4\) with 4 channels, expected in_features=6"),
    (lambda: flaxdcn.nnx.GlobalDeformableKernel(6, 4, 3, rngs=nnx.Rngs(0)), (5, 6),
     r"GlobalDeformableKernel: inputs has shape \(5, 6\), expected \[\*batch, H, W, C\]"),
    (lambda: flaxdcn.nnx.DeformRoIPool(6, 2, deform_fc_channels=4, rngs=nnx.Rngs(0)),
     (2, 5, 5, 3), r"DeformRoIPool: features has shape \(2, 5, 5, 3\) with 3 channels"),
])
def test_errors_name_the_argument(make, x_shape, match):
  with pytest.raises(ValueError, match=match):
    module = make()
    args = (jnp.ones(x_shape),)
    if isinstance(module, flaxdcn.nnx.DeformRoIPool):
      args += (jnp.asarray(_rois(), jnp.float32),)
    module(*args)


def test_kernel_metadata_carries_the_partitioning():
  """As in ``flax.nnx.Conv``: ``kernel_metadata`` (or ``nnx.with_partitioning`` around the
  initialiser) annotates the kernel and bias; the zero-initialised head stays unannotated."""
  mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    module = nnx.eval_shape(lambda: flaxdcn.nnx.ModulatedDeformConv(
        4, 8, 3, kernel_metadata={"out_sharding": (None, None, None, "model")},
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
        rngs=nnx.Rngs(0)))
  P = jax.sharding.PartitionSpec
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(module)))
  assert specs["kernel"] == P(None, None, None, "model")
  assert specs["bias"] == P("model")
  assert specs["conv_offset"]["kernel"] == P()


class _Net(nnx.Module):
  """Every conv-like module in a chain, and a ModulatedDeformRoIPool head on the result."""

  def __init__(self, implementation, rngs):
    init = dict(kernel_init=_init, rngs=rngs)
    self.dcn = flaxdcn.nnx.ModulatedDeformConv(3, 6, 3, implementation=implementation, **init)
    self.dcn1 = flaxdcn.nnx.DeformConv(6, 6, (3, 2), strides=(1, 2), offset_group_count=2,
                                       implementation=implementation, **init)
    self.local = flaxdcn.nnx.LocalDeformableKernel(6, 6, 3, scope_size=5,
                                                   feature_group_count=6, **init)
    self.glob = flaxdcn.nnx.GlobalDeformableKernel(6, 4, 2, scope_size=4, **init)
    self.roi = flaxdcn.nnx.ModulatedDeformRoIPool(4, 2, deform_fc_channels=8,
                                                  implementation=implementation, **init)

  def __call__(self, x, rois):
    x = nnx.relu(self.dcn(x))
    x = nnx.relu(self.dcn1(x))
    x = nnx.relu(self.local(x))
    return self.roi(self.glob(x), rois)


def test_nnx_jit_optimizer_training_lowers_the_loss():
  """``nnx.jit`` + ``nnx.Optimizer`` (optax): the loss falls and every offset head learns (with
  the default implementations; the numerics of both are the other tests' job)."""
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 3)), jnp.float32)
  rois = jnp.asarray(_rois(seed=5, num_rois=4), jnp.float32)
  target = jnp.asarray(rng.normal(size=(4, 2, 2, 4)), jnp.float32)
  model = _Net(None, nnx.Rngs(0))
  heads = ("conv_offset", "fc_offset", "offset_fc_4", "mask_fc_2")
  initial = {k: np.asarray(v) for k, v in
             flax.traverse_util.flatten_dict(flaxdcn.nnx.linen_params(model), sep="/").items()}
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, rois, target):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x, rois) - target) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, x, rois, target)) for _ in range(20)]
  assert losses[-1] < 0.7 * losses[0], losses
  final = flax.traverse_util.flatten_dict(flaxdcn.nnx.linen_params(model), sep="/")
  for key, value in initial.items():
    if any(head in key for head in heads):
      assert np.any(np.asarray(final[key]) != value), f"{key} did not learn"


def test_split_merge_and_a_pure_jax_function():
  module, twin, (x,) = _build("ModulatedDeformConv", "3x2-s21-p10_02-d21-F2-G3", "f32",
                              abstract=True)
  flaxdcn.nnx.load_linen_params(module, _random_linen_params(twin, (x,), seed=6))
  graphdef, state = nnx.split(module)
  _assert_trees_equal(nnx.to_pure_dict(state), flaxdcn.nnx.linen_params(module))
  y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_array_equal(y, _call(module, x))
  np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), module(x))


STACK = 3


def _stack(implementation):
  """``STACK`` DeformConv layers with stacked parameters (``nnx.vmap`` over the constructor),
  their offset heads made non-zero; and the same layers one by one."""

  @nnx.jit
  @nnx.split_rngs(splits=STACK)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return flaxdcn.nnx.DeformConv(C, C, 3, offset_group_count=2, implementation=implementation,
                                  rngs=rngs)

  stack = create(nnx.Rngs(0))
  assert stack.kernel.shape == (STACK, 3, 3, C, C)
  head = stack.conv_offset.kernel
  head[...] = 0.3 * jax.random.normal(jax.random.key(1), head.shape) / np.sqrt(9 * C)
  params = flaxdcn.nnx.linen_params(stack)
  layers = []
  for i in range(STACK):
    layer = nnx.eval_shape(lambda: flaxdcn.nnx.DeformConv(
        C, C, 3, offset_group_count=2, implementation=implementation, rngs=nnx.Rngs(0)))
    flaxdcn.nnx.load_linen_params(layer, jax.tree.map(lambda a: a[i], params))
    layers.append(layer)
  return stack, layers


def test_vmap_and_scan_over_a_stack_of_layers(implementation):
  stack, layers = _stack(implementation)
  x = jnp.asarray(np.random.RandomState(7).normal(size=X_SHAPE), jnp.float32)

  @nnx.jit
  @nnx.vmap(in_axes=(0, None))
  def each(layer, x):
    return layer(x)

  @nnx.jit
  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def chain(layer, x):
    return nnx.relu(layer(x))

  assert_close(each(stack, x), jnp.stack([_call(layer, x) for layer in layers]), jnp.float32)
  expected = x
  for layer in layers:
    expected = nnx.relu(_call(layer, expected))
  assert_close(chain(stack, x), expected, jnp.float32)


def test_remat_gives_the_same_gradients(implementation):
  module, twin, (x,) = _build("ModulatedDeformConv", "3x3-SAME", "f32", implementation,
                              abstract=True)
  flaxdcn.nnx.load_linen_params(module, _random_linen_params(twin, (x,), seed=8))

  def loss(module, x, remat):
    forward = nnx.remat(lambda m, x: m(x)) if remat else (lambda m, x: m(x))
    return jnp.sum(jnp.sin(forward(module, x)))

  grads = {remat: nnx.jit(nnx.grad(loss), static_argnums=2)(module, x, remat)
           for remat in (False, True)}
  for g, e in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
    assert_close(g, e, jnp.float32)
  graphdef, state = nnx.split(module)
  jaxpr = jax.make_jaxpr(jax.grad(lambda s: loss(nnx.merge(graphdef, s), x, True)))(state)
  assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


@pytest.mark.extended  # a multi-device subprocess: run by .ci/run after the default suite
@pytest.mark.slow
def test_batch_sharded_nnx_jit_step(implementation):
  """tests/nnx_multidevice_script.py on 8 CPU devices (see its docstring for the checks)."""
  run_multidevice_script(pathlib.Path(__file__).with_name("nnx_multidevice_script.py"),
                         implementation)
