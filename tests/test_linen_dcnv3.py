"""The DCNv3 / DCNv4 linen modules: behaviour at initialisation, a float64 numpy composition
written here from InternImage's module structure (with the loop reference for the op), the
converters, and (``pytest -m torch``) torch re-implementations of the official modules, whose
sampling is ``grid_sample(align_corners=False, padding_mode="zeros")`` as in InternImage's
``dcnv3_core_pytorch``, converted with :mod:`flaxdcn.convert` and compared.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxdcn
import reference_dcnv3 as ref
from flaxdcn.convert import dcnv3_params_from_torch, dcnv4_params_from_torch
from reference_dcnv3 import V3Case
from tolerances import assert_close


def _random_params(variables, seed, scale=0.3):
  """Every parameter replaced by a seeded normal draw (so the zero-initialised heads matter)."""
  leaves, tree = jax.tree.flatten(variables["params"])
  rng = np.random.default_rng(seed)
  return {"params": jax.tree.unflatten(
      tree, [jnp.asarray(rng.normal(size=l.shape) * scale, l.dtype) for l in leaves])}


def _np(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


# --- Numpy composition of the modules ---------------------------------------------------------

def _dense(p, x):
  return x @ p["kernel"] + p.get("bias", 0.0)


def _depthwise(p, x):
  """Depthwise conv, stride 1, padding (k - 1) // 2, kernel [k, k, 1, C]."""
  k = p["kernel"].shape[0]
  pad = (k - 1) // 2
  n, h, w, c = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = h + 2 * pad - k + 1, w + 2 * pad - k + 1
  out = np.zeros((n, ho, wo, c))
  for r in range(k):
    for s in range(k):
      out += padded[:, r:r + ho, s:s + wo] * p["kernel"][r, s, 0]
  return out + p["bias"]


def _layer_norm(p, x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _gate(params, query, x, x_proj, groups):
  s = 1 / (1 + np.exp(-(query @ params["center_feature_scale_proj_weight"].T
                        + params["center_feature_scale_proj_bias"])))
  s = np.repeat(s, x.shape[-1] // groups, axis=-1)
  return x * (1 - s) + x_proj * s


def numpy_dcnv3(params, x, case: V3Case, center_feature_scale):
  proj = _dense(params["input_proj"], x)
  x1 = _gelu(_layer_norm(params["dw_norm"], _depthwise(params["dw_conv"], x)))
  offsets = _dense(params["offset"], x1)
  logits = _dense(params["mask"], x1).reshape(x1.shape[:3] + (case.g, case.points))
  mask = np.exp(logits - logits.max(-1, keepdims=True))
  mask = (mask / mask.sum(-1, keepdims=True)).reshape(x1.shape[:3] + (-1,))
  out = ref.dcnv3(case, proj, offsets, mask)
  if center_feature_scale:
    out = _gate(params, x1, out, proj, case.g)
  return _dense(params["output_proj"], out)


def numpy_dcnv4(params, x, case: V3Case, center_feature_scale):
  value = _dense(params["value_proj"], x) if "value_proj" in params else x
  head_in = _depthwise(params["offset_mask_dw"], x) if "offset_mask_dw" in params else x
  out = ref.dcnv4(case, value, _dense(params["offset_mask"], head_in))
  if center_feature_scale:
    out = _gate(params, out, out, value, case.g)
  return _dense(params["output_proj"], out) if "output_proj" in params else out


V3_MODULES = [
    pytest.param(dict(kernel_size=3, group_count=2), id="k3-G2"),
    pytest.param(dict(kernel_size=3, group_count=3, dw_kernel_size=5, center_feature_scale=True,
                      remove_center=True, offset_scale=0.5), id="k3-G3-dw5-cfs-rc-s0.5"),
    pytest.param(dict(kernel_size=5, padding=2, kernel_dilation=1, group_count=1), id="k5-G1"),
]


def _case(kwargs, shape):
  k = kwargs.get("kernel_size", 3)
  return V3Case(shape[0], shape[1], shape[2], shape[3], kwargs["group_count"], (k, k),
                padding=kwargs.get("padding", 1), dilation=kwargs.get("kernel_dilation", 1),
                offset_scale=kwargs.get("offset_scale", 1.0),
                remove_center=kwargs.get("remove_center", False))


@pytest.mark.parametrize("kwargs", V3_MODULES)
def test_dcnv3_matches_numpy_composition(kwargs, implementation):
  shape = (2, 5, 6, 6)
  x = np.random.default_rng(0).normal(size=shape)
  layer = flaxdcn.DCNv3(**kwargs, implementation=implementation)
  variables = _random_params(jax.jit(layer.init)(jax.random.key(0), jnp.zeros(shape)), seed=1)
  out = jax.jit(layer.apply)(variables, jnp.asarray(x, jnp.float32))
  expected = numpy_dcnv3(_np(variables["params"]), x, _case(kwargs, shape),
                         kwargs.get("center_feature_scale", False))
  assert_close(out, expected, jnp.float32)


V4_MODULES = [
    pytest.param(dict(kernel_size=3, group_count=2), id="k3-G2"),
    pytest.param(dict(kernel_size=3, group_count=3, dw_kernel_size=3, center_feature_scale=True,
                      remove_center=True, output_bias=False, offset_scale=1.5),
                 id="k3-G3-dw3-cfs-rc-nobias-s1.5"),
    pytest.param(dict(kernel_size=3, group_count=2, without_pointwise=True), id="no-pointwise"),
]


@pytest.mark.parametrize("kwargs", V4_MODULES)
def test_dcnv4_matches_numpy_composition(kwargs, implementation):
  shape = (2, 5, 6, 6)
  x = np.random.default_rng(2).normal(size=shape)
  layer = flaxdcn.DCNv4(**kwargs, implementation=implementation)
  variables = _random_params(jax.jit(layer.init)(jax.random.key(0), jnp.zeros(shape)), seed=3)
  params = variables["params"]
  assert ("bias" in params.get("output_proj", {})) == kwargs.get("output_bias", True) or (
      kwargs.get("without_pointwise", False))
  out = jax.jit(layer.apply)(variables, jnp.asarray(x, jnp.float32))
  expected = numpy_dcnv4(_np(params), x, _case(kwargs, shape),
                         kwargs.get("center_feature_scale", False))
  assert_close(out, expected, jnp.float32)


def test_initialisation(implementation):
  """DCNv3 starts as a box filter (softmax(0) = 1/P over the points) between its projections;
  DCNv4 (mask 0) starts at output_proj's bias; both heads are zero."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 5, 4, 4)), jnp.float32)
  layer = flaxdcn.DCNv3(group_count=2, implementation=implementation)
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  p = variables["params"]
  for head in ("offset", "mask"):
    assert not np.any(p[head]["kernel"]) and not np.any(p[head]["bias"])
  proj = x @ p["input_proj"]["kernel"] + p["input_proj"]["bias"]
  padded = jnp.pad(proj, ((0, 0), (1, 1), (1, 1), (0, 0)))
  box = sum(padded[:, r:r + 5, c:c + 4] for r in range(3) for c in range(3)) / 9
  expected = box @ p["output_proj"]["kernel"] + p["output_proj"]["bias"]
  assert_close(jax.jit(layer.apply)(variables, x), expected, jnp.float32)

  layer4 = flaxdcn.DCNv4(group_count=2, implementation=implementation)
  variables4 = jax.jit(layer4.init)(jax.random.key(1), x)
  assert not np.any(variables4["params"]["offset_mask"]["kernel"])
  np.testing.assert_array_equal(jax.jit(layer4.apply)(variables4, x), 0)


def test_batch_dims_and_intermediates():
  layer = flaxdcn.DCNv3(group_count=2, implementation="xla")
  x = jnp.ones((2, 3, 5, 5, 4))
  variables = jax.jit(layer.init)(jax.random.key(0), x)
  y, state = jax.jit(lambda v, x: layer.apply(v, x, mutable=["intermediates"]))(variables, x)
  assert y.shape == x.shape
  assert state["intermediates"]["softmax_mask"][0].shape == (2, 3, 5, 5, 18)
  np.testing.assert_allclose(state["intermediates"]["softmax_mask"][0], 1 / 9, rtol=1e-6)
  layer4 = flaxdcn.DCNv4(group_count=2, implementation="xla")
  y4, state4 = jax.jit(lambda x: layer4.apply(layer4.init(jax.random.key(0), x), x,
                                              mutable=["intermediates"]))(x)
  assert y4.shape == x.shape and state4["intermediates"]["predicted_offset_mask"][0].shape[-1] == 56


def test_errors():
  with pytest.raises(ValueError, match="not divisible by group_count=4"):
    jax.eval_shape(flaxdcn.DCNv3(group_count=4).init, jax.random.key(0), jnp.ones((1, 5, 5, 6)))
  with pytest.raises(ValueError, match="remove_center needs an odd kernel size"):
    jax.eval_shape(flaxdcn.DCNv4(kernel_size=2, group_count=1, remove_center=True).init,
                   jax.random.key(0), jnp.ones((1, 5, 5, 6)))
  with pytest.raises(ValueError, match="offsets has shape"):  # stride 2: offsets at input size
    jax.eval_shape(flaxdcn.DCNv3(group_count=1, strides=2).init, jax.random.key(0),
                   jnp.ones((1, 6, 6, 2)))


# --- Converters (no torch) ---------------------------------------------------------------------

def _torch_state_dict_v3(params):
  """The InternImage state dict of a linen DCNv3 tree (the inverse of the converter)."""
  t = lambda a: np.ascontiguousarray(np.asarray(a).T)
  sd = {}
  for name in ("input_proj", "offset", "mask", "output_proj"):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = t(params[name]["kernel"]), params[name]["bias"]
  sd["dw_conv.0.weight"] = np.transpose(params["dw_conv"]["kernel"], (3, 2, 0, 1))
  sd["dw_conv.0.bias"] = params["dw_conv"]["bias"]
  sd["dw_conv.1.1.weight"] = params["dw_norm"]["scale"]
  sd["dw_conv.1.1.bias"] = params["dw_norm"]["bias"]
  for k in ("center_feature_scale_proj_weight", "center_feature_scale_proj_bias"):
    if k in params:
      sd[k] = params[k]
  return {k: np.asarray(v) for k, v in sd.items()}


def test_dcnv3_converter_round_trip():
  layer = flaxdcn.DCNv3(group_count=2, center_feature_scale=True, dw_kernel_size=5)
  params = _random_params(jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1, 5, 5, 4))),
                          5)["params"]
  sd = {f"blocks.0.dcn.{k}": v for k, v in _torch_state_dict_v3(params).items()}
  back = dcnv3_params_from_torch(sd, prefix="blocks.0.dcn")
  jax.tree.map(np.testing.assert_array_equal, back, _np(params))
  assert np.shape(back["dw_conv"]["kernel"]) == (5, 5, 1, 4)
  with pytest.raises(ValueError, match=r"dcnv3_params_from_torch: state_dict\['offset.weight'\] "
                     r"has shape \(36, 4\), expected \(34, 4\)"):
    dcnv3_params_from_torch({**_torch_state_dict_v3(params), "mask.weight": np.zeros((17, 4)),
                             "mask.bias": np.zeros(17)})


def test_dcnv4_converter_layouts():
  rng = np.random.default_rng(6)
  sd = {"value_proj.weight": rng.normal(size=(4, 4)), "value_proj.bias": rng.normal(size=4),
        "offset_mask.weight": rng.normal(size=(56, 4)), "offset_mask.bias": rng.normal(size=56),
        "output_proj.weight": rng.normal(size=(4, 4)),
        "offset_mask_dw.weight": rng.normal(size=(4, 1, 3, 3)),
        "offset_mask_dw.bias": rng.normal(size=4)}
  p = dcnv4_params_from_torch(sd)
  np.testing.assert_array_equal(p["offset_mask"]["kernel"], sd["offset_mask.weight"].T)
  np.testing.assert_array_equal(p["offset_mask_dw"]["kernel"][1, 2, 0],
                                sd["offset_mask_dw.weight"][:, 0, 1, 2])
  assert "bias" not in p["output_proj"]
  layer = flaxdcn.DCNv4(group_count=2, dw_kernel_size=3, output_bias=False)
  assert layer.apply({"params": p}, jnp.ones((1, 5, 5, 4))).shape == (1, 5, 5, 4)
  with pytest.raises(ValueError, match="multiple of 8"):
    dcnv4_params_from_torch({**sd, "offset_mask.weight": np.zeros((54, 4))})


# --- Torch re-implementations (pytest -m torch) -------------------------------------------------

def _torch_modules():
  """Torch re-implementations of InternImage's DCNv3_pytorch and DCNv4, written from the
  semantics (attribute names as in the official code), sampling by grid_sample."""
  torch = pytest.importorskip("torch")
  nn, F = torch.nn, torch.nn.functional

  def core(x, offsets, mask, k, pad, dilation, groups, offset_scale, remove_center):
    """The official formulation: normalised reference points and kernel grid, sampling by
    grid_sample(align_corners=False, padding_mode='zeros') of the padded input."""
    n, h, w, c = x.shape
    x = F.pad(x, [0, 0, pad, pad, pad, pad])
    hp, wp = h + 2 * pad, w + 2 * pad
    ho, wo = hp - (dilation * (k - 1) + 1) + 1, wp - (dilation * (k - 1) + 1) + 1
    centre = (dilation * (k - 1)) // 2
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(centre + 0.5, centre + 0.5 + ho - 1, ho, dtype=x.dtype),
        torch.linspace(centre + 0.5, centre + 0.5 + wo - 1, wo, dtype=x.dtype), indexing="ij")
    ref = torch.stack((ref_x.reshape(-1) / wp, ref_y.reshape(-1) / hp), -1).reshape(1, ho, wo, 1, 2)
    gx, gy = torch.meshgrid(
        torch.linspace(-centre, -centre + (k - 1) * dilation, k, dtype=x.dtype),
        torch.linspace(-centre, -centre + (k - 1) * dilation, k, dtype=x.dtype), indexing="ij")
    grid = torch.stack([gx / wp, gy / hp], -1).reshape(-1, 2)  # column-major points
    if remove_center:
      grid = torch.cat([grid[:k * k // 2], grid[k * k // 2 + 1:]])
    p = grid.shape[0]
    grid = grid.repeat(groups, 1).reshape(1, 1, 1, groups * p, 2)
    norm = torch.tensor([wp, hp], dtype=x.dtype)
    loc = ref + grid * offset_scale + offsets.reshape(n, ho, wo, groups * p, 2) * offset_scale / norm
    value = x.reshape(n, hp * wp, groups, c // groups).transpose(1, 2).reshape(
        n * groups, hp * wp, c // groups).transpose(1, 2).reshape(n * groups, c // groups, hp, wp)
    sgrid = (2 * loc - 1).reshape(n, ho * wo, groups, p, 2).transpose(1, 2).reshape(
        n * groups, ho * wo, p, 2)
    sampled = F.grid_sample(value, sgrid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)                   # [N*G, Cg, Ho*Wo, P]
    m = mask.reshape(n, ho * wo, groups, p).transpose(1, 2).reshape(n * groups, 1, ho * wo, p)
    out = (sampled * m).sum(-1).reshape(n, c, ho * wo)
    return out.transpose(1, 2).reshape(n, ho, wo, c)

  class CenterFeatureScaleModule(nn.Module):
    def forward(self, query, weight, bias):
      return F.linear(query, weight=weight, bias=bias).sigmoid()

  class ToChannelsLast(nn.Module):
    def forward(self, x):
      return x.permute(0, 2, 3, 1)

  class DCNv3(nn.Module):
    def __init__(self, channels, kernel_size=3, dw_kernel_size=None, pad=1, group=4,
                 offset_scale=1.0, center_feature_scale=False, remove_center=False):
      super().__init__()
      dw = kernel_size if dw_kernel_size is None else dw_kernel_size
      self.args = (kernel_size, pad, 1, group, offset_scale, remove_center)
      self.group, self.channels, self.cfs = group, channels, center_feature_scale
      points = kernel_size * kernel_size - int(remove_center)
      self.dw_conv = nn.Sequential(
          nn.Conv2d(channels, channels, dw, 1, (dw - 1) // 2, groups=channels),
          nn.Sequential(ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6)), nn.GELU())
      self.offset = nn.Linear(channels, group * points * 2)
      self.mask = nn.Linear(channels, group * points)
      self.input_proj = nn.Linear(channels, channels)
      self.output_proj = nn.Linear(channels, channels)
      if center_feature_scale:
        self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
        self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self.center_feature_scale_module = CenterFeatureScaleModule()

    def forward(self, x):
      n, h, w, _ = x.shape
      proj = self.input_proj(x)
      x1 = self.dw_conv(x.permute(0, 3, 1, 2))
      offset = self.offset(x1)
      mask = F.softmax(self.mask(x1).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1)
      out = core(proj, offset, mask, *self.args[:2], self.args[2], *self.args[3:])
      if self.cfs:
        s = self.center_feature_scale_module(x1, self.center_feature_scale_proj_weight,
                                             self.center_feature_scale_proj_bias)
        s = s[..., None].repeat(1, 1, 1, 1, self.channels // self.group).flatten(-2)
        out = out * (1 - s) + proj * s
      return self.output_proj(out)

  class DCNv4(nn.Module):
    def __init__(self, channels, kernel_size=3, pad=1, group=4, offset_scale=1.0,
                 dw_kernel_size=None, center_feature_scale=False, remove_center=False,
                 output_bias=True, without_pointwise=False):
      super().__init__()
      self.args = (kernel_size, pad, 1, group, offset_scale, remove_center)
      self.group, self.channels, self.cfs = group, channels, center_feature_scale
      self.points = kernel_size * kernel_size - int(remove_center)
      self.dw, self.without_pointwise = dw_kernel_size, without_pointwise
      if dw_kernel_size is not None:
        self.offset_mask_dw = nn.Conv2d(channels, channels, dw_kernel_size, 1,
                                        (dw_kernel_size - 1) // 2, groups=channels)
      self.offset_mask = nn.Linear(channels, int(math.ceil(group * self.points * 3 / 8) * 8))
      if not without_pointwise:
        self.value_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels, bias=output_bias)
      if center_feature_scale:
        self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
        self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self.center_feature_scale_module = CenterFeatureScaleModule()

    def forward(self, x):
      n, h, w, _ = x.shape
      value = x if self.without_pointwise else self.value_proj(x)
      head_in = x if self.dw is None else self.offset_mask_dw(
          x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
      om = self.offset_mask(head_in)
      g, p = self.group, self.points
      used = om[..., :g * p * 3].reshape(n, h, w, g, 3 * p)
      offsets = used[..., :2 * p].reshape(n, h, w, -1)
      mask = used[..., 2 * p:].reshape(n, h, w, -1)
      out = core(value, offsets, mask, *self.args[:2], self.args[2], *self.args[3:])
      if self.cfs:
        s = self.center_feature_scale_module(out, self.center_feature_scale_proj_weight,
                                             self.center_feature_scale_proj_bias)
        s = s[..., None].repeat(1, 1, 1, 1, self.channels // self.group).flatten(-2)
        out = out * (1 - s) + value * s
      return out if self.without_pointwise else self.output_proj(out)

  return torch, DCNv3, DCNv4


def _randomise(torch, module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)
  return module


@pytest.mark.torch
@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(group=2), id="G2"),
    pytest.param(dict(group=3, dw_kernel_size=5, center_feature_scale=True, remove_center=True,
                      offset_scale=0.7), id="G3-dw5-cfs-rc"),
])
def test_dcnv3_matches_torch(kwargs, implementation):
  torch, TorchDCNv3, _ = _torch_modules()
  module = _randomise(torch, TorchDCNv3(6, **kwargs).double(), seed=7)
  x = np.random.default_rng(8).normal(size=(2, 5, 7, 6))
  expected = module(torch.from_numpy(x)).detach().numpy()
  params = dcnv3_params_from_torch(module.state_dict())
  layer = flaxdcn.DCNv3(group_count=kwargs["group"], dw_kernel_size=kwargs.get("dw_kernel_size"),
                        center_feature_scale=kwargs.get("center_feature_scale", False),
                        remove_center=kwargs.get("remove_center", False),
                        offset_scale=kwargs.get("offset_scale", 1.0),
                        implementation=implementation)
  with jax.enable_x64(True):
    out = jax.jit(layer.apply)({"params": params}, jnp.asarray(x))
    assert out.dtype == jnp.float64
    assert_close(out, expected, jnp.float64)


@pytest.mark.torch
@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(group=2), id="G2"),
    pytest.param(dict(group=3, dw_kernel_size=3, center_feature_scale=True, remove_center=True,
                      output_bias=False, offset_scale=1.3), id="G3-dw3-cfs-rc-nobias"),
    pytest.param(dict(group=1, without_pointwise=True), id="without_pointwise"),
])
def test_dcnv4_matches_torch(kwargs, implementation):
  torch, _, TorchDCNv4 = _torch_modules()
  module = _randomise(torch, TorchDCNv4(6, **kwargs).double(), seed=9)
  x = np.random.default_rng(10).normal(size=(2, 5, 7, 6))
  expected = module(torch.from_numpy(x)).detach().numpy()
  params = dcnv4_params_from_torch(module.state_dict())
  layer = flaxdcn.DCNv4(group_count=kwargs["group"], dw_kernel_size=kwargs.get("dw_kernel_size"),
                        center_feature_scale=kwargs.get("center_feature_scale", False),
                        remove_center=kwargs.get("remove_center", False),
                        output_bias=kwargs.get("output_bias", True),
                        without_pointwise=kwargs.get("without_pointwise", False),
                        offset_scale=kwargs.get("offset_scale", 1.0),
                        implementation=implementation)
  with jax.enable_x64(True):
    out = jax.jit(layer.apply)({"params": params}, jnp.asarray(x))
    assert_close(out, expected, jnp.float64)
