"""``flaxdcn.convert``: PyTorch (torchvision, mmcv) state dicts to flaxdcn parameters.

Without torch: hand-checkable layouts, a round trip through a synthetic state dict and the error
messages. With torch (``pytest -m torch``): torch models written here in mmcv's Pack layout, on
``torchvision.ops``, converted and run by flaxdcn.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxdcn
import flaxdcn.nnx
from flaxdcn.convert import conv_params_from_torch, roi_pool_params_from_torch
from tolerances import assert_close

CONV_MODULES = [pytest.param(flaxdcn.DeformConv, id="DeformConv"),
                pytest.param(flaxdcn.ModulatedDeformConv, id="ModulatedDeformConv")]
ROI_MODULES = [pytest.param(flaxdcn.DeformRoIPool, id="DeformRoIPool"),
               pytest.param(flaxdcn.ModulatedDeformRoIPool, id="ModulatedDeformRoIPool")]


# --- Hand-checkable layouts --------------------------------------------------------------------

def test_conv_weights_are_oihw_to_hwio():
  o, i, kh, kw = 4, 3, 2, 3
  weight = np.arange(o * i * kh * kw, dtype=np.float32).reshape(o, i, kh, kw)
  head = -np.arange(18 * i * kh * kw, dtype=np.float32).reshape(18, i, kh, kw)
  state = {"weight": weight, "bias": np.arange(o, dtype=np.float32),
           "conv_offset.weight": head, "conv_offset.bias": np.arange(18, dtype=np.float32)}
  params = conv_params_from_torch(state)
  assert params["kernel"].shape == (kh, kw, i, o)
  assert params["conv_offset"]["kernel"].shape == (kh, kw, i, 18)
  for a, b, c, d in itertools.product(range(kh), range(kw), range(i), range(o)):
    assert params["kernel"][a, b, c, d] == weight[d, c, a, b]
  for a, b, c, d in itertools.product(range(kh), range(kw), range(i), range(18)):
    assert params["conv_offset"]["kernel"][a, b, c, d] == head[d, c, a, b]
  np.testing.assert_array_equal(params["bias"], state["bias"])
  np.testing.assert_array_equal(params["conv_offset"]["bias"], state["conv_offset.bias"])
  assert params["kernel"].dtype == np.float32
  weight[0, 0, 0, 0] = 100.0  # the result owns its arrays
  assert params["kernel"][0, 0, 0, 0] == 0.0


def test_torchvision_layer_without_bias_or_head():
  params = conv_params_from_torch({"weight": np.ones((6, 2, 3, 3), np.float16)})
  assert list(params) == ["kernel"]
  assert params["kernel"].shape == (3, 3, 2, 6) and params["kernel"].dtype == np.float16


def _shifted_conv(x, weight, bias, dy):
  """PyTorch's conv (cross-correlation; 3x3 OIHW kernel, padding 1, stride 1) of NHWC ``x``
  with every sample read ``dy`` rows lower: what a constant offset ``dy`` samples. The zero padding
  moves with the samples (a sample at row -1 + dy reads row dy - 1 of the image)."""
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1 + dy), (1, 1), (0, 0)))[:, dy:]
  out = np.zeros((n, h, w, weight.shape[0]))
  for i, j in itertools.product(range(3), range(3)):
    out += np.einsum("nyxc,oc->nyxo", padded[:, i:i + h, j:j + w], weight[:, :, i, j])
  return out + bias


@pytest.mark.parametrize("module", CONV_MODULES)
def test_mmcv_head_channels_are_offsets_then_mask(module, implementation):
  """A head with zero weight and a bias of dy = 1 at every kernel point (mmcv's even channels,
  dx in the odd ones left 0) and, for the modulated head, mask logits log(3) after the 18 offset
  channels reads the image one row lower, times sigmoid(log 3) = 0.75."""
  modulated = module is flaxdcn.ModulatedDeformConv
  rng = np.random.default_rng(0)
  weight, bias = rng.normal(size=(5, 2, 3, 3)), rng.normal(size=5)
  head_bias = np.zeros(27 if modulated else 18)
  head_bias[0:18:2] = 1.0
  head_bias[18:] = np.log(3.0)
  state = {"layer.weight": weight, "layer.bias": bias, "other.weight": np.zeros(3),
           "layer.conv_offset.weight": np.zeros((head_bias.size, 2, 3, 3)),
           "layer.conv_offset.bias": head_bias}
  x = rng.normal(size=(2, 6, 7, 2))
  with jax.enable_x64(True):
    params = conv_params_from_torch(state, prefix="layer.")
    layer = module(5, 3, padding=1, param_dtype=jnp.float64, implementation=implementation)
    out = jax.jit(layer.apply)({"params": params}, jnp.asarray(x))
  factor = 0.75 if modulated else 1.0
  want = factor * (_shifted_conv(x, weight, bias, 1) - bias) + bias
  assert_close(out, want, jnp.float64)


def test_roi_pool_reorderings_by_index():
  """Every converted entry is where the README's formulas put it: input row ``(i, j, c)`` of the
  first layers is mmcv's column ``(c, i, j)``; output ``(i, j, 0 = dy, 1 = dx)`` of the last
  offset layer is mmcv's row ``(1 = y, i, j)`` / ``(0 = x, i, j)``."""
  channels, (oh, ow), fc = 3, (2, 4), 5
  rng = np.random.default_rng(1)
  shapes = {"offset_fc.0": (fc, channels * oh * ow), "offset_fc.2": (fc, fc),
            "offset_fc.4": (2 * oh * ow, fc), "mask_fc.0": (fc, channels * oh * ow),
            "mask_fc.2": (oh * ow, fc)}
  state = {}
  for name, shape in shapes.items():
    state[f"roi.{name}.weight"] = rng.normal(size=shape)
    state[f"roi.{name}.bias"] = rng.normal(size=shape[:1])
  p = roi_pool_params_from_torch(state, "roi", output_size=(oh, ow), channels=channels)
  assert sorted(p) == ["mask_fc_0", "mask_fc_2", "offset_fc_0", "offset_fc_2", "offset_fc_4"]
  for i, j, c, f in itertools.product(range(oh), range(ow), range(channels), range(fc)):
    row, column = (i * ow + j) * channels + c, (c * oh + i) * ow + j
    for flax_name, mmcv_name in (("offset_fc_0", "offset_fc.0"), ("mask_fc_0", "mask_fc.0")):
      assert p[flax_name]["kernel"][row, f] == state[f"roi.{mmcv_name}.weight"][f, column]
  for i, j, f in itertools.product(range(oh), range(ow), range(fc)):
    for axis, mmcv_channel in ((0, 1), (1, 0)):  # (dy, dx) <- mmcv's (x, y) channels
      out, mmcv_row = (i * ow + j) * 2 + axis, (mmcv_channel * oh + i) * ow + j
      assert p["offset_fc_4"]["kernel"][f, out] == state["roi.offset_fc.4.weight"][mmcv_row, f]
      assert p["offset_fc_4"]["bias"][out] == state["roi.offset_fc.4.bias"][mmcv_row]
    assert p["mask_fc_2"]["kernel"][f, i * ow + j] == state["roi.mask_fc.2.weight"][i * ow + j, f]
  np.testing.assert_array_equal(p["offset_fc_2"]["kernel"], state["roi.offset_fc.2.weight"].T)
  for name in ("offset_fc_0", "offset_fc_2", "mask_fc_0", "mask_fc_2"):
    mmcv_name = name.replace("_fc_", "_fc.")
    np.testing.assert_array_equal(p[name]["bias"], state[f"roi.{mmcv_name}.bias"])


# --- Round trip through a synthetic state dict ---------------------------------------------------

def _random_like(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def _to_torch_conv(params, prefix):
  """The inverse of the conversion, by explicit index maps: flax HWIO -> torch OIHW."""
  state = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [k.key for k in path]
    key = prefix + ".".join(names).replace("kernel", "weight")
    value = np.asarray(value)
    state[key] = np.einsum("hwio->oihw", value) if names[-1] == "kernel" else value
  return state


@pytest.mark.parametrize("module", CONV_MODULES)
@pytest.mark.parametrize("use_bias, groups", [(True, (1, 1)), (False, (2, 3))],
                         ids=["bias-F1-G1", "nobias-F2-G3"])
def test_conv_round_trip(module, use_bias, groups):
  feature_groups, offset_groups = groups
  layer = module(4, (3, 2), use_bias=use_bias, feature_group_count=feature_groups,
                 offset_group_count=offset_groups)
  x = jnp.ones((1, 5, 5, 6))
  params = _random_like(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
  state = _to_torch_conv(params, "model.block.dcn.")
  state["model.block.dcn_other.weight"] = np.zeros((1, 1, 1, 1))
  back = conv_params_from_torch(state, "model.block.dcn", offset_group_count=offset_groups)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def _to_torch_roi(params, output_size, channels):
  """The inverse of the RoI head conversion, by explicit index maps."""
  oh, ow = output_size
  state = {}
  for name, layer in params.items():
    kernel, bias = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
    weight = kernel.T
    if name.endswith("fc_0"):  # input rows (i, j, c) -> columns (c, i, j)
      weight = np.einsum("ijcf->fcij", kernel.reshape(oh, ow, channels, -1)).reshape(
          kernel.shape[1], -1)
    if name == "offset_fc_4":  # outputs (i, j, (dy, dx)) -> rows ((x, y), i, j)
      weight = np.einsum("fija->aijf", kernel.reshape(-1, oh, ow, 2))[::-1].reshape(-1,
                                                                                   kernel.shape[0])
      bias = np.einsum("ija->aij", bias.reshape(oh, ow, 2))[::-1].reshape(-1)
    key = name.replace("_fc_", "_fc.")
    state[f"{key}.weight"], state[f"{key}.bias"] = weight, bias
  return state


@pytest.mark.parametrize("module", ROI_MODULES)
def test_roi_pool_round_trip(module):
  output_size, channels = (2, 3), 4
  layer = module(output_size=output_size, deform_fc_channels=6)
  features = jnp.ones((1, 8, 8, channels))
  rois = jnp.array([[0, 1.0, 1.0, 6.0, 7.0]])
  params = _random_like(jax.eval_shape(layer.init, jax.random.key(0), features, rois)["params"])
  state = _to_torch_roi(params, output_size, channels)
  back = roi_pool_params_from_torch(state, output_size=output_size, channels=channels)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("module", ["DeformConv", "ModulatedDeformConv"])
def test_conv_checkpoint_into_nnx(module):
  """A converted mmcv-layout state dict loads into the NNX twin through
  ``flaxdcn.nnx.load_linen_params`` and gives the linen module's output with the same tree."""
  width = 27 if module == "ModulatedDeformConv" else 18
  rng = np.random.default_rng(4)
  state = {"weight": rng.normal(size=(5, 3, 3, 3)), "bias": rng.normal(size=5),
           "conv_offset.weight": 0.2 * rng.normal(size=(width, 3, 3, 3)),
           "conv_offset.bias": rng.normal(size=width)}
  params = conv_params_from_torch(state)
  layer = getattr(flaxdcn.nnx, module)(3, 5, (3, 3), strides=2, padding=1, rngs=nnx.Rngs(0))
  flaxdcn.nnx.load_linen_params(layer, params)
  x = jnp.asarray(rng.normal(size=(2, 9, 8, 3)), jnp.float32)
  want = jax.jit(getattr(flaxdcn, module)(5, (3, 3), strides=2, padding=1).apply)(
      {"params": params}, x)
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(layer, x), want)
  np.testing.assert_array_equal(layer.conv_offset.kernel[...],
                                np.float32(state["conv_offset.weight"].transpose(2, 3, 1, 0)))


class _FakeTensor:
  """Duck-types the torch tensor methods the converters use (torch itself is not needed)."""

  def __init__(self, array):
    self.array, self.dtype = array, f"torch.{array.dtype}"

  def detach(self):
    return self

  def cpu(self):
    return self

  def numpy(self):
    return self.array


def test_tensor_like_values_are_read_without_torch():
  weight = np.random.default_rng(0).normal(size=(2, 1, 3, 3)).astype(np.float32)
  params = conv_params_from_torch({"weight": _FakeTensor(weight)})
  np.testing.assert_array_equal(params["kernel"], weight.transpose(2, 3, 1, 0))
  weight[:] = 0  # a copy, not a view of the tensor's memory
  assert np.abs(params["kernel"]).max() > 0


# --- Errors ------------------------------------------------------------------------------------

def _conv_state(head_width=18, **changes):
  state = {"weight": np.zeros((4, 2, 3, 3)), "bias": np.zeros(4),
           "conv_offset.weight": np.zeros((head_width, 4, 3, 3)),
           "conv_offset.bias": np.zeros(head_width)}
  state.update(changes)
  return {k: v for k, v in state.items() if v is not None}


@pytest.mark.parametrize("state, kwargs, match", [
    ({}, {}, r"no key 'weight' \(expected shape \(\?, \?, \?, \?\) = \[O, C/F, kh, kw\]\)"),
    (_conv_state(), {"prefix": "backbone"}, r"no key 'backbone.weight'"),
    (_conv_state(weight=np.zeros((4, 2, 3))), {},
     r"state_dict\['weight'\] has shape \(4, 2, 3\), expected \(\?, \?, \?, \?\)"),
    (_conv_state(bias=np.zeros(5)), {}, r"state_dict\['bias'\] has shape \(5,\), expected \(4,\)"),
    (_conv_state(20), {}, r"'conv_offset.weight'\] has shape \(20, 4, 3, 3\), expected "
                          r"\(18 or 27, C, 3, 3\)"),
    (_conv_state(18), {"offset_group_count": 2},
     r"has shape \(18, 4, 3, 3\), expected \(36 or 54, C, 3, 3\) .* offset_group_count = 2"),
    (_conv_state(**{"conv_offset.weight": np.zeros((18, 4, 2, 3))}), {},
     r"has shape \(18, 4, 2, 3\), expected \(\?, \?, 3, 3\)"),
    (_conv_state(**{"conv_offset.weight": np.zeros((18, 3, 3, 3))}), {},
     r"C a multiple of weight's C/F = 2"),
    (_conv_state(**{"conv_offset.bias": None}), {},
     r"no key 'conv_offset.bias' \(expected shape \(18,\).*keys under prefix '': "
     r"bias, conv_offset.weight, weight"),
    (_conv_state(**{"conv_offset.weight": None}), {}, r"no key 'conv_offset.weight'"),
    (_conv_state(), {"offset_group_count": 0}, r"offset_group_count must be an int >= 1"),
])
def test_conv_errors(state, kwargs, match):
  with pytest.raises(ValueError, match=r"conv_params_from_torch: .*" + match):
    conv_params_from_torch(state, **kwargs)


def _roi_state(**changes):
  fc, pooled, bins = 5, 4 * 2 * 3, 2 * 3
  shapes = {"offset_fc.0": (fc, pooled), "offset_fc.2": (fc, fc), "offset_fc.4": (2 * bins, fc),
            "mask_fc.0": (fc, pooled), "mask_fc.2": (bins, fc)}
  state = {}
  for name, shape in shapes.items():
    state[name + ".weight"], state[name + ".bias"] = np.zeros(shape), np.zeros(shape[0])
  state.update(changes)
  return {k: v for k, v in state.items() if v is not None}


@pytest.mark.parametrize("state, kwargs, match", [
    (_roi_state(), {"channels": 3},
     r"'offset_fc.0.weight'\] has shape \(5, 24\), expected \(\?, 18\) = \[fc, C·oh·ow\] for "
     r"C = 3, output_size = \(2, 3\)"),
    (_roi_state(**{"offset_fc.2.weight": np.zeros((5, 4))}), {},
     r"'offset_fc.2.weight'\] has shape \(5, 4\), expected \(5, 5\) = \[fc, fc\] for fc = 5"),
    (_roi_state(**{"offset_fc.4.bias": np.zeros(6)}), {},
     r"'offset_fc.4.bias'\] has shape \(6,\), expected \(12,\)"),
    (_roi_state(**{"mask_fc.2.bias": None}), {},
     r"no key 'mask_fc.2.bias' \(expected shape \(6,\)"),
    (_roi_state(**{"offset_fc.4.weight": None}), {}, r"no key 'offset_fc.4.weight' \(expected "
                                                     r"shape \(12, 5\)"),
    (_roi_state(), {"channels": 0}, r"channels must be an int >= 1"),
    (_roi_state(), {"output_size": (2, 0)}, r"output_size must be >= 1"),
])
def test_roi_pool_errors(state, kwargs, match):
  kwargs = {"output_size": (2, 3), "channels": 4} | kwargs
  with pytest.raises(ValueError, match=r"roi_pool_params_from_torch: .*" + match):
    roi_pool_params_from_torch(state, **kwargs)


def test_state_dict_must_be_a_mapping():
  with pytest.raises(TypeError, match=r"conv_params_from_torch: state_dict must be a mapping"):
    conv_params_from_torch([("weight", np.zeros((1, 1, 1, 1)))])


# --- Against torch models (pytest -m torch) ----------------------------------------------------

def _torch():
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  return torch, torchvision


def _mmcv_conv_pack(torch, torchvision, in_channels, out_channels, kernel_size, *, stride,
                    padding, dilation, groups, deform_groups, modulated, bias):
  """A torch module laid out like mmcv's (Modulated)DeformConv2dPack, on
  ``torchvision.ops.deform_conv2d``: ``weight``, ``bias``, and a ``conv_offset`` conv whose first
  ``2 * G * kh * kw`` channels are the offsets and, when modulated, the rest the mask logits."""
  kh, kw = kernel_size
  points = deform_groups * kh * kw

  class Pack(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.weight = torch.nn.Parameter(
          torch.randn(out_channels, in_channels // groups, kh, kw, dtype=torch.float64))
      self.bias = (torch.nn.Parameter(torch.randn(out_channels, dtype=torch.float64))
                   if bias else None)
      self.conv_offset = torch.nn.Conv2d(in_channels, (3 if modulated else 2) * points,
                                         kernel_size, stride, padding, dilation, bias=True,
                                         dtype=torch.float64)

    def forward(self, x):
      head = self.conv_offset(x)
      offset, mask = head[:, :2 * points], None
      if modulated:
        mask = torch.sigmoid(head[:, 2 * points:])
      return torchvision.ops.deform_conv2d(x, offset, self.weight, self.bias, stride=stride,
                                           padding=padding, dilation=dilation, mask=mask)

  return Pack()


@pytest.mark.torch
@pytest.mark.parametrize("module", CONV_MODULES)
@pytest.mark.parametrize("geometry", [
    dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
         deform_groups=1, bias=True),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
         deform_groups=3, bias=False),
], ids=["3x3-p1", "3x2-s21-p10-d21-F2-G3"])
def test_torch_mmcv_conv_pack(module, geometry, implementation):
  torch, torchvision = _torch()
  torch.manual_seed(0)
  modulated = module is flaxdcn.ModulatedDeformConv
  pack = _mmcv_conv_pack(torch, torchvision, 6, 4, modulated=modulated, **geometry)
  with torch.no_grad():  # offsets of a few pixels, a mask away from 0.5
    pack.conv_offset.weight.normal_(0.0, 0.3)
    pack.conv_offset.bias.normal_(0.0, 1.0)
  x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
  want = pack(x).detach().numpy().transpose(0, 2, 3, 1)

  params = conv_params_from_torch(pack.state_dict(), offset_group_count=geometry["deform_groups"])
  layer = module(4, geometry["kernel_size"], strides=geometry["stride"],
                 padding=geometry["padding"], kernel_dilation=geometry["dilation"],
                 feature_group_count=geometry["groups"],
                 offset_group_count=geometry["deform_groups"], use_bias=geometry["bias"],
                 param_dtype=jnp.float64, implementation=implementation)
  with jax.enable_x64(True):
    out = jax.jit(layer.apply)({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert np.abs(want).max() > 1.0
  assert_close(out, want, jnp.float64)


def _torch_deform_roi_pool(torch, torchvision, features, rois, offset, *, output_size,
                           spatial_scale, sampling_ratio, gamma):
  """mmcv's deform_roi_pool in torch, from its definition: bin ``(i, j)`` of RoI ``r`` is bin
  ``(i, j)`` of RoIAlign (``torchvision.ops.roi_align(aligned=True)``) over the RoI moved by
  ``gamma * (roi_w * offset[r, 0, i, j], roi_h * offset[r, 1, i, j])`` feature pixels (mmcv's
  offsets: channel 0 is x). The move keeps the RoI's size, hence its sub-grid, up to rounding:
  RoIs whose size is a multiple of the output size could flip ``ceil`` and are avoided."""
  oh, ow = output_size

  def align(boxes):
    return torchvision.ops.roi_align(features, boxes, output_size, spatial_scale=spatial_scale,
                                     sampling_ratio=sampling_ratio, aligned=True)

  if offset is None:
    return align(rois)
  num = rois.shape[0]
  size_w = (rois[:, 3] - rois[:, 1])[:, None, None]
  size_h = (rois[:, 4] - rois[:, 2])[:, None, None]
  shift_x = gamma * size_w * offset[:, 0]  # image coordinates: roi_w * scale / scale
  shift_y = gamma * size_h * offset[:, 1]
  boxes = rois[:, None, None, :].expand(num, oh, ow, 5)
  shift = torch.stack([torch.zeros_like(shift_x), shift_x, shift_y, shift_x, shift_y], dim=-1)
  pooled = align((boxes + shift).reshape(-1, 5)).reshape(num, oh, ow, -1, oh, ow)
  i, j = torch.meshgrid(torch.arange(oh), torch.arange(ow), indexing="ij")
  return pooled[:, i, j, :, i, j].permute(2, 3, 0, 1)  # [oh, ow, R, C] -> [R, C, oh, ow]


def _mmcv_roi_pack(torch, torchvision, channels, *, output_size, deform_fc_channels, modulated,
                   **pool_kwargs):
  """A torch module laid out like mmcv's (Modulated)DeformRoIPoolPack (state-dict names, the
  (C, oh, ow) flattening, offsets viewed as [R, 2, oh, ow], the mask head's sigmoid)."""
  oh, ow = output_size
  nn = torch.nn

  class Pack(nn.Module):

    def __init__(self):
      super().__init__()
      fc = deform_fc_channels
      self.offset_fc = nn.Sequential(
          nn.Linear(oh * ow * channels, fc), nn.ReLU(), nn.Linear(fc, fc), nn.ReLU(),
          nn.Linear(fc, oh * ow * 2)).double()
      if modulated:
        self.mask_fc = nn.Sequential(nn.Linear(oh * ow * channels, fc), nn.ReLU(),
                                     nn.Linear(fc, oh * ow), nn.Sigmoid()).double()

    def forward(self, features, rois):
      def pool(offset):
        return _torch_deform_roi_pool(torch, torchvision, features, rois, offset,
                                      output_size=output_size, **pool_kwargs)

      x = pool(None).reshape(rois.shape[0], -1)
      out = pool(self.offset_fc(x).view(-1, 2, oh, ow))
      if modulated:
        out = out * self.mask_fc(x).view(-1, 1, oh, ow)
      return out

  return Pack()


@pytest.mark.torch
@pytest.mark.parametrize("module", ROI_MODULES)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_torch_mmcv_roi_pool_pack(module, sampling_ratio, implementation):
  torch, torchvision = _torch()
  torch.manual_seed(1)
  channels, output_size, fc = 3, (3, 2), 8
  pool = dict(spatial_scale=0.5, sampling_ratio=sampling_ratio, gamma=0.1)
  modulated = module is flaxdcn.ModulatedDeformRoIPool
  pack = _mmcv_roi_pack(torch, torchvision, channels, output_size=output_size,
                        deform_fc_channels=fc, modulated=modulated, **pool)
  with torch.no_grad():  # mmcv zero-initialises the last layers: make them count
    for p in pack.parameters():
      p.normal_(0.0, 0.5)
  features = torch.randn(2, channels, 10, 12, dtype=torch.float64)
  rois = torch.tensor([[0, 1.3, 2.1, 15.7, 17.2], [1, 4.4, 0.2, 21.9, 9.6],
                       [1, -3.1, 5.3, 8.2, 23.7], [0, 10.1, 10.7, 13.8, 12.9]],
                      dtype=torch.float64)
  want = pack(features, rois).detach().numpy().transpose(0, 2, 3, 1)

  params = roi_pool_params_from_torch(pack.state_dict(), output_size=output_size,
                                      channels=channels)
  layer = module(output_size=output_size, deform_fc_channels=fc, param_dtype=jnp.float64,
                 implementation=implementation, **pool)
  with jax.enable_x64(True):
    out = jax.jit(layer.apply)({"params": params},
                               jnp.asarray(features.numpy().transpose(0, 2, 3, 1)),
                               jnp.asarray(rois.numpy()))
  assert np.abs(want).max() > 0.1
  assert_close(out, want, jnp.float64)


@pytest.mark.torch
def test_torch_tensors_of_any_dtype_and_grad():
  torch, _ = _torch()
  weight = torch.randn(4, 2, 3, 3, requires_grad=True)
  params = conv_params_from_torch({"weight": weight, "bias": torch.randn(4).bfloat16()})
  np.testing.assert_array_equal(params["kernel"], weight.detach().numpy().transpose(2, 3, 1, 0))
  assert params["bias"].dtype == jnp.bfloat16


@pytest.mark.torch
@pytest.mark.parametrize("modulated", [False, True], ids=["DeformConv", "ModulatedDeformConv"])
def test_torch_checkpoint_into_nnx(modulated):
  """A torch model's state dict, converted and loaded into the NNX twins with
  ``flaxdcn.nnx.load_linen_params``, gives the torch model's outputs (conv and RoI Pack)."""
  torch, torchvision = _torch()
  torch.manual_seed(2)
  geometry = dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1,
                  deform_groups=2, bias=True)
  pack = _mmcv_conv_pack(torch, torchvision, 4, 6, modulated=modulated, **geometry)
  with torch.no_grad():
    pack.conv_offset.weight.normal_(0.0, 0.3)
    pack.conv_offset.bias.normal_(0.0, 1.0)
  x = torch.randn(2, 4, 9, 10, dtype=torch.float64)

  channels, output_size, fc = 3, (2, 3), 8
  pool_kwargs = dict(spatial_scale=0.5, sampling_ratio=0, gamma=0.1)
  roi_pack = _mmcv_roi_pack(torch, torchvision, channels, output_size=output_size,
                            deform_fc_channels=fc, modulated=modulated, **pool_kwargs)
  with torch.no_grad():
    for p in roi_pack.parameters():
      p.normal_(0.0, 0.5)
  features = torch.randn(2, channels, 10, 12, dtype=torch.float64)
  rois = torch.tensor([[0, 1.3, 2.1, 15.7, 17.2], [1, -3.1, 5.3, 8.2, 23.7]], dtype=torch.float64)

  with jax.enable_x64(True):
    conv = (flaxdcn.nnx.ModulatedDeformConv if modulated else flaxdcn.nnx.DeformConv)(
        4, 6, (3, 3), strides=2, padding=1, offset_group_count=2, param_dtype=jnp.float64,
        rngs=nnx.Rngs(0))
    pool = (flaxdcn.nnx.ModulatedDeformRoIPool if modulated else flaxdcn.nnx.DeformRoIPool)(
        channels, output_size, deform_fc_channels=fc, param_dtype=jnp.float64,
        rngs=nnx.Rngs(0), **pool_kwargs)
    flaxdcn.nnx.load_linen_params(
        conv, conv_params_from_torch(pack.state_dict(), offset_group_count=2))
    flaxdcn.nnx.load_linen_params(pool, roi_pool_params_from_torch(
        roi_pack.state_dict(), output_size=output_size, channels=channels))
    out = conv(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    pooled = pool(jnp.asarray(features.numpy().transpose(0, 2, 3, 1)), jnp.asarray(rois.numpy()))
  assert_close(out, pack(x).detach().numpy().transpose(0, 2, 3, 1), jnp.float64)
  assert_close(pooled, roi_pack(features, rois).detach().numpy().transpose(0, 2, 3, 1),
               jnp.float64)
