"""The ``MSDeformAttn`` modules (linen and NNX): a float64 numpy composition written here from
Deformable DETR's ``MSDeformAttn.forward`` (with the loop reference for the op), the
initialisation of ``_reset_parameters``, the padding mask, the sown values, linen == NNX after
``load_linen_params``, training steps and the converter (torch parity: tests/test_torch_msda.py).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxdcn
import flaxdcn.nnx
import reference_msda as ref
from flaxdcn.convert import msda_params_from_torch
from reference_msda import MsdaCase
from tolerances import assert_close

SHAPES = ((5, 7), (3, 2), (1, 1))  # S = 35 + 6 + 1 = 42


def _inputs(n, lq, c, shapes, ref_dim, seed, *, mask=False):
  """``(query, reference_points, input_flatten, input_padding_mask)`` as float64 numpy."""
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  reference = rng.uniform(0.1, 0.9, (n, lq, len(shapes), ref_dim))
  if ref_dim == 4:
    reference[..., 2:] = rng.uniform(0.1, 0.6, (n, lq, len(shapes), 2))
  padding = rng.random((n, s)) < 0.3 if mask else None
  return rng.normal(size=(n, lq, c)), reference, rng.normal(size=(n, s, c)), padding


def _random_params(params, seed, scale=0.3):
  """Every parameter replaced by a seeded normal draw (so the zero-initialised layers matter)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=l.shape) * scale, l.dtype)
                                   for l in leaves])


def _np(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def numpy_msda(params, query, reference_points, inputs, shapes, padding, heads, points):
  """Deformable DETR's ``MSDeformAttn.forward`` in float64 numpy, the op by the loop reference."""
  n, lq, c = query.shape
  levels = len(shapes)
  dense = lambda name, x: x @ params[name]["kernel"] + params[name]["bias"]  # noqa: E731
  value = dense("value_proj", inputs)
  if padding is not None:
    value = np.where(padding[..., None], 0.0, value)
  value = value.reshape(n, -1, heads, c // heads)
  offsets = dense("sampling_offsets", query).reshape(n, lq, heads, levels, points, 2)
  logits = dense("attention_weights", query).reshape(n, lq, heads, levels * points)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = (weights / weights.sum(-1, keepdims=True)).reshape(n, lq, heads, levels, points)
  if reference_points.shape[-1] == 2:
    normaliser = np.array([(w, h) for h, w in shapes], np.float64)
    locations = (reference_points[:, :, None, :, None, :]
                 + offsets / normaliser[None, None, None, :, None, :])
  else:
    locations = (reference_points[:, :, None, :, None, :2]
                 + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
  case = MsdaCase(n, lq, heads, c // heads, tuple(shapes), points)
  out = ref.ms_deform_attn(case, value, locations, weights)
  return dense("output_proj", out), locations, weights


CONFIGS = [
    pytest.param(dict(num_heads=2, num_levels=3, num_points=2), 2, False, id="ref2"),
    pytest.param(dict(num_heads=3, num_levels=3, num_points=1), 4, True, id="ref4-mask-P1"),
    pytest.param(dict(num_heads=1, num_levels=3, num_points=3), 2, True, id="ref2-mask-M1"),
]


def _layer_and_params(kwargs, c, seed, implementation=None):
  layer = flaxdcn.MSDeformAttn(**kwargs, implementation=implementation)
  query, reference, inputs, _ = _inputs(2, 4, c, SHAPES, 2, 0)
  params = jax.jit(layer.init, static_argnums=4)(
      jax.random.key(0), jnp.asarray(query, jnp.float32), jnp.asarray(reference, jnp.float32),
      jnp.asarray(inputs, jnp.float32), SHAPES)["params"]
  return layer, _random_params(params, seed)


@pytest.mark.parametrize("kwargs, ref_dim, mask", CONFIGS)
def test_matches_numpy_composition(kwargs, ref_dim, mask, implementation):
  c = 6 * kwargs["num_heads"]
  layer, params = _layer_and_params(kwargs, c, seed=1, implementation=implementation)
  query, reference, inputs, padding = _inputs(2, 4, c, SHAPES, ref_dim, 2, mask=mask)
  expected, locations, weights = numpy_msda(_np(params), query, reference, inputs, SHAPES,
                                            padding, kwargs["num_heads"], kwargs["num_points"])
  args = [jnp.asarray(a, jnp.float32) for a in (query, reference, inputs)]
  apply = jax.jit(lambda p, *a: layer.apply({"params": p}, *a[:3], SHAPES, a[3],
                                            mutable=["intermediates"]))
  out, state = apply(params, *args, None if padding is None else jnp.asarray(padding))
  assert out.shape == query.shape and out.dtype == jnp.float32
  assert_close(out, expected, jnp.float32)
  sown = state["intermediates"]
  assert_close(sown["sampling_locations"][0], locations, jnp.float32)
  assert_close(sown["softmax_attention_weights"][0], weights, jnp.float32)


def test_padding_mask_hides_the_padded_values(implementation):
  """Values at padding positions never reach the output (nor get gradient)."""
  kwargs = dict(num_heads=2, num_levels=3, num_points=2)
  layer, params = _layer_and_params(kwargs, 8, seed=3, implementation=implementation)
  query, reference, inputs, padding = _inputs(2, 4, 8, SHAPES, 2, 4, mask=True)
  assert padding.any() and not padding.all()
  changed = np.where(padding[..., None], 1e3, inputs)
  f = jax.jit(lambda x: layer.apply({"params": params}, jnp.asarray(query, jnp.float32),
                                    jnp.asarray(reference, jnp.float32), x, SHAPES,
                                    jnp.asarray(padding)))
  out = f(jnp.asarray(inputs, jnp.float32))
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray(changed, jnp.float32))),
                                np.asarray(out))
  grad = jax.grad(lambda x: jnp.sum(f(x) ** 2))(jnp.asarray(inputs, jnp.float32))
  np.testing.assert_array_equal(np.asarray(grad)[padding], 0)
  assert np.any(np.asarray(grad)[~padding])


def test_initialisation_is_deformable_detrs(implementation):
  """``_reset_parameters``: zero ``sampling_offsets`` kernel with the direction grid as bias,
  zero ``attention_weights``, Xavier-uniform projections with zero biases; so at init the
  attention weights are uniform (1 / (L * P)) and the locations are the reference points plus
  the grid, in pixels of each level."""
  m, levels, points, c = 8, 3, 2, 16
  layer = flaxdcn.MSDeformAttn(num_heads=m, num_levels=levels, num_points=points,
                               implementation=implementation)
  query, reference, inputs, _ = _inputs(2, 3, c, SHAPES, 2, 5)
  args = [jnp.asarray(a, jnp.float32) for a in (query, reference, inputs)]
  params = jax.jit(layer.init, static_argnums=4)(jax.random.key(0), *args, SHAPES)["params"]
  for name in ("sampling_offsets", "attention_weights"):
    np.testing.assert_array_equal(np.asarray(params[name]["kernel"]), 0, err_msg=name)
  np.testing.assert_array_equal(np.asarray(params["attention_weights"]["bias"]), 0)
  # Heads at 0, 45, ..., 315 degrees, scaled so that the larger coordinate is 1.
  directions = np.array([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)])
  grid = directions[:, None, None, :] * np.arange(1, points + 1)[None, None, :, None]
  grid = np.broadcast_to(grid, (m, levels, points, 2)).reshape(-1)
  np.testing.assert_allclose(np.asarray(params["sampling_offsets"]["bias"]), grid, atol=1e-6)
  bound = np.sqrt(6 / (c + c))
  for name in ("value_proj", "output_proj"):
    kernel = np.asarray(params[name]["kernel"])
    assert kernel.shape == (c, c) and np.abs(kernel).max() <= bound, name
    assert 0.7 < kernel.std() / (bound / np.sqrt(3)) < 1.3, name  # uniform(-b, b): std b / sqrt 3
    np.testing.assert_array_equal(np.asarray(params[name]["bias"]), 0)
  _, state = jax.jit(lambda p, *a: layer.apply({"params": p}, *a, SHAPES,
                                               mutable=["intermediates"]))(params, *args)
  sown = state["intermediates"]
  np.testing.assert_allclose(sown["softmax_attention_weights"][0], 1 / (levels * points),
                             rtol=1e-6)
  sizes = np.array([(w, h) for h, w in SHAPES], np.float64)[None, None, None, :, None, :]
  expected = (reference[:, :, None, :, None, :]
              + grid.reshape(m, levels, points, 2)[None, None] / sizes)
  assert_close(sown["sampling_locations"][0], expected, jnp.float32)


def test_half_precision_module():
  """bfloat16 computation: the output is bfloat16, the sampling locations stay float32."""
  kwargs = dict(num_heads=2, num_levels=3, num_points=2)
  layer = flaxdcn.MSDeformAttn(**kwargs, dtype=jnp.bfloat16)
  query, reference, inputs, _ = _inputs(2, 4, 8, SHAPES, 4, 6)
  args = [jnp.asarray(a, jnp.float32) for a in (query, reference, inputs)]
  variables = jax.jit(layer.init, static_argnums=4)(jax.random.key(0), *args, SHAPES)
  params = _random_params(variables["params"], 7)
  out, state = jax.jit(lambda p, *a: layer.apply({"params": p}, *a, SHAPES,
                                                 mutable=["intermediates"]))(params, *args)
  assert out.dtype == jnp.bfloat16
  assert state["intermediates"]["sampling_locations"][0].dtype == jnp.float32
  expected, _, _ = numpy_msda(_np(params), query, reference, inputs, SHAPES, None, 2, 2)
  assert_close(out, expected, jnp.bfloat16)


def test_errors():
  layer = flaxdcn.MSDeformAttn(num_heads=4, num_levels=3, num_points=2)
  query, reference, inputs, _ = _inputs(1, 2, 8, SHAPES, 2, 0)
  init = lambda *a, layer=layer: jax.eval_shape(  # noqa: E731
      lambda: layer.init(jax.random.key(0), *a))
  q, r, x = (jnp.asarray(a, jnp.float32) for a in (query, reference, inputs))
  with pytest.raises(ValueError, match=r"MSDeformAttn: the query's channels C=6 is not divisible "
                     r"by num_heads=4"):
    init(q[..., :6], r, x[..., :6], SHAPES)
  with pytest.raises(ValueError, match=r"spatial_shapes has 2 levels \(\(5, 7\), \(3, 2\)\), but "
                     r"num_levels=3"):
    init(q, r[:, :, :2], x[:, :41], SHAPES[:2])
  with pytest.raises(ValueError, match=r"reference_points has shape \(1, 2, 3, 3\), expected "
                     r"\[N, Lq, L, 2\] or \[N, Lq, L, 4\]"):
    init(q, jnp.zeros((1, 2, 3, 3)), x, SHAPES)
  with pytest.raises(ValueError, match=r"reference_points has shape \(1, 2, 2, 2\)"):
    init(q, r[:, :, :2], x, SHAPES)
  with pytest.raises(ValueError, match=r"input_flatten has shape \(1, 40, 8\), expected \[N, S, "
                     r"C\] = \(1, 42, 8\)"):
    init(q, r, x[:, :40], SHAPES)
  with pytest.raises(ValueError, match=r"input_flatten has shape \(1, 42, 4\)"):
    init(q, r, x[..., :4], SHAPES)
  with pytest.raises(ValueError,
                     match=r"input_padding_mask has shape \(1, 41\), expected \[N, S\]"):
    init(q, r, x, SHAPES, jnp.zeros((1, 41), bool))
  with pytest.raises(ValueError, match=r"query has shape \(2, 8\), expected \[N, Lq, C\]"):
    init(q[0], r, x, SHAPES)
  with pytest.raises(TypeError, match="spatial_shapes must hold ints"):
    init(q, r, x, np.array(SHAPES, np.float32))
  with pytest.raises(ValueError, match=r"MSDeformAttn: in_features=10 is not divisible by "
                     r"num_heads=4"):
    flaxdcn.nnx.MSDeformAttn(10, num_heads=4, rngs=nnx.Rngs(0))
  nnx_layer = flaxdcn.nnx.MSDeformAttn(8, num_heads=4, num_levels=3, num_points=2,
                                       rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"query has shape \(1, 2, 6\), expected \[N, Lq, C\] with "
                     r"C=8"):
    nnx_layer(q[..., :6], r, x, SHAPES)


# --- NNX -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, ref_dim, mask", CONFIGS)
def test_nnx_matches_linen(kwargs, ref_dim, mask, implementation):
  c = 6 * kwargs["num_heads"]
  linen, params = _layer_and_params(kwargs, c, seed=8, implementation=implementation)
  layer = flaxdcn.nnx.MSDeformAttn(c, **kwargs, implementation=implementation,
                                   rngs=nnx.Rngs(0))
  assert jax.tree.map(jnp.shape, flaxdcn.nnx.linen_params(layer)) == jax.tree.map(
      jnp.shape, params)
  flaxdcn.nnx.load_linen_params(layer, params)
  query, reference, inputs, padding = _inputs(2, 4, c, SHAPES, ref_dim, 9, mask=mask)
  args = [jnp.asarray(a, jnp.float32) for a in (query, reference, inputs)]
  padding = None if padding is None else jnp.asarray(padding)
  expected, linen_state = jax.jit(lambda p, *a: linen.apply(
      {"params": p}, *a[:3], SHAPES, a[3], mutable=["intermediates"]))(params, *args, padding)
  out, sown = nnx.jit(lambda m, *a: nnx.capture(m, nnx.Intermediate)(*a[:3], SHAPES, a[3]))(
      layer, *args, padding)
  assert_close(out, expected, jnp.float32)
  for name in ("sampling_locations", "softmax_attention_weights"):
    assert_close(sown[name][0], linen_state["intermediates"][name][0], jnp.float32, err_msg=name)


def test_nnx_init_equals_linen_init_and_sows_only_under_capture():
  """Both start from Deformable DETR's deterministic parts alike (the projections are random),
  and the NNX module stores nothing when called outside ``nnx.capture``."""
  kwargs = dict(num_heads=4, num_levels=3, num_points=2)
  linen = flaxdcn.MSDeformAttn(**kwargs)
  query, reference, inputs, _ = _inputs(1, 3, 8, SHAPES, 2, 10)
  args = [jnp.asarray(a, jnp.float32) for a in (query, reference, inputs)]
  linen_params = jax.jit(linen.init, static_argnums=4)(jax.random.key(0), *args, SHAPES)["params"]
  layer = flaxdcn.nnx.MSDeformAttn(8, **kwargs, rngs=nnx.Rngs(0))
  params = flaxdcn.nnx.linen_params(layer)
  for name in ("sampling_offsets", "attention_weights"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(np.asarray(params[name][leaf]),
                                    np.asarray(linen_params[name][leaf]), f"{name}/{leaf}")
  before = jax.tree.structure(nnx.state(layer))
  layer(*args, SHAPES)
  assert jax.tree.structure(nnx.state(layer)) == before
  assert not jax.tree.leaves(nnx.state(layer, nnx.Intermediate))


# --- Training ------------------------------------------------------------------------------------

def test_linen_training_step_learns_offsets(implementation):
  """A few Adam steps on a regression target: the loss falls and the sampling offsets (kernel and
  bias) and the attention weights move."""
  kwargs = dict(num_heads=2, num_levels=3, num_points=2)
  layer = flaxdcn.MSDeformAttn(**kwargs, implementation=implementation)
  query, reference, inputs, padding = _inputs(2, 6, 8, SHAPES, 4, 11, mask=True)
  args = [jnp.asarray(a, jnp.float32) for a in (query, reference, inputs)]
  padding = jnp.asarray(padding)
  target = jnp.asarray(np.random.default_rng(12).normal(size=(2, 6, 8)), jnp.float32)
  params = jax.jit(layer.init, static_argnums=4)(jax.random.key(0), *args, SHAPES,
                                                 padding)["params"]
  optimizer = optax.adam(3e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(
        (layer.apply({"params": p}, *args, SHAPES, padding) - target) ** 2))(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  initial = params
  losses = []
  for _ in range(15):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  for key, value in flax.traverse_util.flatten_dict(initial, sep="/").items():
    moved = flax.traverse_util.flatten_dict(params, sep="/")[key]
    assert np.any(np.asarray(moved) != np.asarray(value)), f"{key} did not learn"


def test_nnx_training_step(implementation):
  layer = flaxdcn.nnx.MSDeformAttn(8, num_heads=2, num_levels=3, num_points=2,
                                   implementation=implementation, rngs=nnx.Rngs(0))
  query, reference, inputs, _ = _inputs(2, 6, 8, SHAPES, 2, 13)
  args = [jnp.asarray(a, jnp.float32) for a in (query, reference, inputs)]
  target = jnp.asarray(np.random.default_rng(14).normal(size=(2, 6, 8)), jnp.float32)
  optimizer = nnx.Optimizer(layer, optax.adam(3e-2), wrt=nnx.Param)
  offsets = np.asarray(layer.sampling_offsets.kernel[...])

  @nnx.jit
  def step(layer, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(*args, SHAPES) - target) ** 2))(layer)
    optimizer.update(layer, grads)
    return loss

  losses = [float(step(layer, optimizer)) for _ in range(15)]
  assert losses[-1] < 0.7 * losses[0], losses
  assert np.any(np.asarray(layer.sampling_offsets.kernel[...]) != offsets)


# --- Converter (no torch) ------------------------------------------------------------------------

def _torch_state_dict(params):
  """The Deformable DETR state dict of a linen MSDeformAttn tree (the converter's inverse)."""
  sd = {}
  for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
    sd[f"{name}.weight"] = np.ascontiguousarray(np.asarray(params[name]["kernel"]).T)
    sd[f"{name}.bias"] = np.asarray(params[name]["bias"])
  return sd


def test_converter_round_trip_and_errors():
  _, params = _layer_and_params(dict(num_heads=2, num_levels=3, num_points=2), 8, seed=15)
  sd = {f"encoder.layers.0.self_attn.{k}": v for k, v in _torch_state_dict(params).items()}
  back = msda_params_from_torch(sd, prefix="encoder.layers.0.self_attn.")
  jax.tree.map(np.testing.assert_array_equal, back, _np(params))
  # Torch's order (m, l, p, (x, y)) is kept: output j of the kernel is row j of the weight.
  np.testing.assert_array_equal(back["sampling_offsets"]["kernel"][:, 5],
                                sd["encoder.layers.0.self_attn.sampling_offsets.weight"][5])
  plain = _torch_state_dict(params)
  with pytest.raises(ValueError, match=r"msda_params_from_torch: state_dict has no key "
                     r"'output_proj.bias'"):
    msda_params_from_torch({k: v for k, v in plain.items() if k != "output_proj.bias"})
  with pytest.raises(ValueError, match=r"state_dict\['sampling_offsets.weight'\] has shape "
                     r"\(24, 8\), expected \(22, 8\) = \[M·L·P·2, C\], twice"):
    msda_params_from_torch({**plain, "attention_weights.weight": np.zeros((11, 8)),
                            "attention_weights.bias": np.zeros(11)})
  with pytest.raises(ValueError, match=r"state_dict\['value_proj.weight'\] has shape \(4, 8\), "
                     r"expected \(8, 8\)"):
    msda_params_from_torch({**plain, "value_proj.weight": np.zeros((4, 8))})
  with pytest.raises(ValueError, match=r"state_dict\['output_proj.weight'\] has shape \(8, 4\)"):
    msda_params_from_torch({**plain, "output_proj.weight": np.zeros((8, 4))})


def test_converted_checkpoint_into_nnx():
  _, params = _layer_and_params(dict(num_heads=2, num_levels=3, num_points=2), 8, seed=16)
  layer = flaxdcn.nnx.MSDeformAttn(8, num_heads=2, num_levels=3, num_points=2, rngs=nnx.Rngs(1))
  flaxdcn.nnx.load_linen_params(layer, msda_params_from_torch(_torch_state_dict(params)))
  np.testing.assert_array_equal(np.asarray(layer.value_proj.kernel[...]),
                                np.asarray(params["value_proj"]["kernel"]))
