"""flaxdcn's multi-scale deformable attention against torch (``pytest -m torch``; skipped
without torch).

The oracle is written here from the semantics of Deformable DETR's ``ms_deform_attn_core_pytorch``:
per level, ``torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)`` on ``2 * locations - 1``, weighted by the attention weights and summed. The
op is compared forward and in the gradient of every argument (float64 and float32, every
implementation), on random locations and on locations snapped to pixel centres and to the
``-1`` / ``H`` boundaries of the sampling rule; the module against a torch ``MSDeformAttn``
written the same way (Deformable DETR's ``forward`` and ``_reset_parameters``), after
:func:`flaxdcn.convert.msda_params_from_torch`.

The one known difference is torchvision's (tests/test_torch_parity.py): where a coordinate is
exactly -1, the sample reads 0 in both, but ``grid_sample``'s location gradient is the
derivative from the right (pixel 0 weighs in), while flaxdcn (like Deformable DETR's CUDA
kernel) treats ``h <= -1`` as outside and returns 0. The tests locate those entries, require
flaxdcn's to be exactly 0 and torch's to be that one-sided derivative (flaxdcn's gradient with
the coordinate moved to -0.5, where the read is linear on (-1, 0)), and match everything else.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxdcn
from flaxdcn.convert import msda_params_from_torch
from tolerances import assert_close

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
F = torch.nn.functional

DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]
ARGS = ("value", "sampling_locations", "attention_weights")


def torch_msda(value, spatial_shapes, sampling_locations, attention_weights):
  """``ms_deform_attn_core_pytorch`` from its semantics: ``[N, Lq, M * D]``."""
  n, _, m, d = value.shape
  _, lq, _, _, p, _ = sampling_locations.shape
  grids = 2 * sampling_locations - 1
  out, start = 0, 0
  for level, (h, w) in enumerate(spatial_shapes):
    # [N, H*W, M, D] -> [N*M, D, H, W]
    v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
    # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
    g = grids[:, :, :, level].transpose(1, 2).reshape(n * m, lq, p, 2)
    sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    a = attention_weights[:, :, :, level].transpose(1, 2).reshape(n * m, 1, lq, p)
    out = out + (sampled * a).sum(-1)  # [N*M, D, Lq]
    start += h * w
  return out.reshape(n, m * d, lq).transpose(1, 2)


# --- The op --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OpConfig:
  """Sizes and how the locations are drawn: ``"normal"`` (uniform, partly off the maps) or
  ``"boundary"`` (about half the coordinates snapped to the pixel coordinates -1, 0, H - 1, H or
  a pixel centre; the levels have power-of-two sizes so these are exact in both)."""
  name: str
  n: int
  lq: int
  m: int
  d: int
  shapes: tuple[tuple[int, int], ...]
  p: int
  locations: str = "normal"
  seed: int = 0


OP_CONFIGS = [
    OpConfig("odd-levels", 2, 5, 3, 4, ((5, 7), (3, 2), (1, 1)), 2, seed=1),
    OpConfig("D33-P1", 1, 4, 2, 33, ((6, 4), (2, 3)), 1, seed=2),
    OpConfig("M1-D1", 2, 3, 1, 1, ((4, 5), (1, 2)), 3, seed=3),
    OpConfig("batch-0", 0, 3, 2, 4, ((3, 3),), 2, seed=4),
    OpConfig("boundary", 2, 6, 2, 3, ((4, 8), (2, 2), (1, 1)), 3, locations="boundary", seed=5),
    OpConfig("boundary-2", 1, 8, 3, 2, ((8, 4), (1, 2)), 2, locations="boundary", seed=6),
]


def op_arguments(config: OpConfig) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(config.seed)
  levels = len(config.shapes)
  s = sum(h * w for h, w in config.shapes)
  shape = (config.n, config.lq, config.m, levels, config.p)
  locations = rng.uniform(-0.2, 1.2, shape + (2,))
  if config.locations == "boundary":
    sizes = np.array([(w, h) for h, w in config.shapes], np.float64)[:, None, :]  # [L, 1, 2]
    pixel = np.choose(rng.integers(0, 5, shape + (2,)),
                      [np.full(shape + (2,), -1.0), np.zeros(shape + (2,)),
                       np.broadcast_to(sizes - 1, shape + (2,)),
                       np.broadcast_to(sizes, shape + (2,)),
                       np.floor(rng.uniform(0, 1, shape + (2,)) * sizes)])
    locations = np.where(rng.random(shape + (2,)) < 0.5, (pixel + 0.5) / sizes, locations)
  return dict(value=rng.normal(size=(config.n, s, config.m, config.d)),
              sampling_locations=locations,
              attention_weights=rng.uniform(0.1, 1.0, shape),
              cotangent=rng.normal(size=(config.n, config.lq, config.m * config.d)))


def torch_op(config: OpConfig, args: dict, dtype) -> dict[str, np.ndarray]:
  tdtype = {np.float64: torch.float64, np.float32: torch.float32}[dtype]
  leaves = {k: torch.tensor(args[k], dtype=tdtype, requires_grad=True) for k in ARGS}
  out = torch_msda(leaves["value"], config.shapes, leaves["sampling_locations"],
                   leaves["attention_weights"])
  if out.numel() == 0:
    return dict(out=out.detach().numpy(), **{k: np.zeros_like(args[k], dtype) for k in ARGS})
  grads = torch.autograd.grad(out, [leaves[k] for k in ARGS],
                              torch.tensor(args["cotangent"], dtype=tdtype))
  return dict(out=out.detach().numpy(), **{k: g.numpy() for k, g in zip(ARGS, grads)})


@functools.lru_cache(maxsize=None)
def _op_vjp(shapes, implementation):
  def fn(value, locations, weights):
    return flaxdcn.ms_deform_attn(value, shapes, locations, weights,
                                  implementation=implementation)

  @jax.jit
  def run(value, locations, weights, cotangent):
    out, vjp = jax.vjp(fn, value, locations, weights)
    return out, vjp(cotangent)

  return run


def flaxdcn_op(config: OpConfig, args: dict, dtype, implementation) -> dict[str, np.ndarray]:
  with jax.enable_x64(dtype == np.float64):
    out, grads = _op_vjp(config.shapes, implementation)(
        *(jnp.asarray(args[k], dtype) for k in ARGS + ("cotangent",)))
    return dict(out=np.asarray(out), **{k: np.asarray(g) for k, g in zip(ARGS, grads)})


def _pixel_coordinates(config: OpConfig, locations: np.ndarray) -> np.ndarray:
  sizes = np.array([(w, h) for h, w in config.shapes], np.float64)[:, None, :]
  return locations * sizes - 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", OP_CONFIGS, ids=lambda c: c.name)
def test_op_matches_grid_sample(config, dtype, implementation):
  args = {k: v.astype(dtype) for k, v in op_arguments(config).items()}
  ours = flaxdcn_op(config, args, dtype, implementation)
  theirs = torch_op(config, args, dtype)
  assert ours["out"].shape == theirs["out"].shape == (config.n, config.lq, config.m * config.d)
  assert_close(ours["out"], theirs["out"], dtype, err_msg="out")
  for name in ("value", "attention_weights"):
    assert_close(ours[name], theirs[name], dtype, err_msg=name)
  locations = args["sampling_locations"]
  at_minus_one = _pixel_coordinates(config, locations.astype(np.float64)) == -1
  if config.locations == "boundary":
    assert at_minus_one.any(), "the boundary configuration must put coordinates on -1"
  np.testing.assert_array_equal(ours["sampling_locations"][at_minus_one], 0)
  # grid_sample's derivative from the right where a coordinate is -1: flaxdcn's with that
  # coordinate alone moved to -0.5 (location 0); the other gradients are flaxdcn's own.
  expected = ours["sampling_locations"].copy()
  for axis in (0, 1):
    selected = at_minus_one[..., axis]
    if selected.any():
      moved = locations.copy()
      moved[..., axis] = np.where(selected, 0, moved[..., axis])
      right = flaxdcn_op(config, args | {"sampling_locations": moved}, dtype,
                         implementation)["sampling_locations"]
      expected[..., axis] = np.where(selected, right[..., axis], expected[..., axis])
  assert_close(theirs["sampling_locations"], expected, dtype, err_msg="sampling_locations")


# --- The module ----------------------------------------------------------------------------------

class TorchMSDeformAttn(torch.nn.Module):
  """Deformable DETR's ``MSDeformAttn`` written from its definition (attribute names, forward,
  ``_reset_parameters``), with :func:`torch_msda` as the sampling."""

  def __init__(self, d_model, n_levels, n_heads, n_points):
    super().__init__()
    self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
    self.sampling_offsets = torch.nn.Linear(d_model, n_heads * n_levels * n_points * 2)
    self.attention_weights = torch.nn.Linear(d_model, n_heads * n_levels * n_points)
    self.value_proj = torch.nn.Linear(d_model, d_model)
    self.output_proj = torch.nn.Linear(d_model, d_model)
    self.reset_parameters()

  def reset_parameters(self):
    init = torch.nn.init
    init.constant_(self.sampling_offsets.weight, 0.0)
    thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2).repeat(
        1, self.n_levels, self.n_points, 1)
    for i in range(self.n_points):
      grid[:, :, i, :] *= i + 1
    with torch.no_grad():
      self.sampling_offsets.bias.copy_(grid.view(-1))
    init.constant_(self.attention_weights.weight, 0.0)
    init.constant_(self.attention_weights.bias, 0.0)
    init.xavier_uniform_(self.value_proj.weight)
    init.constant_(self.value_proj.bias, 0.0)
    init.xavier_uniform_(self.output_proj.weight)
    init.constant_(self.output_proj.bias, 0.0)

  def forward(self, query, reference_points, input_flatten, spatial_shapes,
              input_padding_mask=None):
    n, lq, _ = query.shape
    s = input_flatten.shape[1]
    m, levels, points = self.n_heads, self.n_levels, self.n_points
    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
      value = value.masked_fill(input_padding_mask[..., None], 0.0)
    value = value.view(n, s, m, self.d_model // m)
    offsets = self.sampling_offsets(query).view(n, lq, m, levels, points, 2)
    weights = self.attention_weights(query).view(n, lq, m, levels * points)
    weights = F.softmax(weights, -1).view(n, lq, m, levels, points)
    if reference_points.shape[-1] == 2:
      shapes = torch.tensor(spatial_shapes, dtype=query.dtype)
      normaliser = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
      locations = (reference_points[:, :, None, :, None, :]
                   + offsets / normaliser[None, None, None, :, None, :])
    else:
      locations = (reference_points[:, :, None, :, None, :2]
                   + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
    return self.output_proj(torch_msda(value, spatial_shapes, locations, weights))


def test_module_initialisation_matches_torch():
  """The deterministic parts of ``_reset_parameters``. Torch computes the grid in float32 and
  lands a few float32 ulps off its exact values (2.999998 for 3); flaxdcn's is the exact grid
  rounded once."""
  module = TorchMSDeformAttn(16, 3, 8, 4)
  linen = flaxdcn.MSDeformAttn(num_heads=8, num_levels=3, num_points=4)
  shapes = ((4, 4), (2, 2), (1, 1))
  args = (jnp.zeros((1, 2, 16)), jnp.zeros((1, 2, 3, 2)), jnp.zeros((1, 21, 16)))
  params = jax.jit(linen.init, static_argnums=4)(jax.random.key(0), *args, shapes)["params"]
  converted = msda_params_from_torch(module.state_dict())
  for name in ("sampling_offsets", "attention_weights"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(np.asarray(params[name][leaf]), converted[name][leaf],
                                 rtol=2e-6, atol=1e-6, err_msg=f"{name}/{leaf}")
  for name in ("value_proj", "output_proj"):
    bound = np.sqrt(6 / 32)
    assert np.abs(converted[name]["kernel"]).max() <= bound
    assert np.abs(np.asarray(params[name]["kernel"])).max() <= bound


MODULE_CONFIGS = [
    pytest.param(dict(n_heads=2, n_levels=3, n_points=2), 2, False, id="ref2"),
    pytest.param(dict(n_heads=4, n_levels=3, n_points=3), 4, True, id="ref4-mask"),
    pytest.param(dict(n_heads=1, n_levels=3, n_points=1), 2, True, id="ref2-mask-M1-P1"),
]


@pytest.mark.parametrize("kwargs, ref_dim, mask", MODULE_CONFIGS)
def test_module_matches_torch(kwargs, ref_dim, mask, implementation):
  """A randomised torch module, converted: the same output in float64, and the same gradients
  of every parameter and input."""
  shapes = ((5, 7), (3, 2), (1, 1))
  c, n, lq = 4 * kwargs["n_heads"], 2, 4
  s = sum(h * w for h, w in shapes)
  module = TorchMSDeformAttn(c, **kwargs).double()
  gen = torch.Generator().manual_seed(7)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)
  rng = np.random.default_rng(8)
  query, inputs = rng.normal(size=(n, lq, c)), rng.normal(size=(n, s, c))
  reference = rng.uniform(0.1, 0.9, (n, lq, 3, ref_dim))
  padding = rng.random((n, s)) < 0.3 if mask else None
  cot = rng.normal(size=(n, lq, c))

  tensors = [torch.tensor(a, requires_grad=True) for a in (query, reference, inputs)]
  out = module(*tensors, shapes, None if padding is None else torch.tensor(padding))
  grads = torch.autograd.grad(out, tensors + list(module.parameters()), torch.tensor(cot))
  names = [name for name, _ in module.named_parameters()]
  theirs = dict(zip(["query", "reference_points", "input_flatten"] + names,
                    [g.numpy() for g in grads]))

  params = msda_params_from_torch(module.state_dict())
  layer = flaxdcn.MSDeformAttn(num_heads=kwargs["n_heads"], num_levels=kwargs["n_levels"],
                               num_points=kwargs["n_points"], implementation=implementation)
  with jax.enable_x64(True):
    def fn(params, query, reference, inputs):
      return layer.apply({"params": params}, query, reference, inputs, shapes,
                         None if padding is None else jnp.asarray(padding))

    ours, vjp = jax.vjp(fn, jax.tree.map(jnp.asarray, params), *(jnp.asarray(a) for a in
                                                                   (query, reference, inputs)))
    grad_params, *grad_inputs = vjp(jnp.asarray(cot))
    assert ours.dtype == jnp.float64
    assert_close(ours, out.detach().numpy(), jnp.float64, err_msg="out")
    for name, g in zip(["query", "reference_points", "input_flatten"], grad_inputs):
      assert_close(g, theirs[name], jnp.float64, err_msg=name)
    back = {f"{layer_name}.{'weight' if leaf == 'kernel' else 'bias'}":
            np.asarray(v).T if leaf == "kernel" else np.asarray(v)
            for layer_name, leaves in grad_params.items() for leaf, v in leaves.items()}
    assert sorted(back) == sorted(names)
    for name in names:
      assert_close(back[name], theirs[name], jnp.float64, err_msg=name)
