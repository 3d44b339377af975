"""PyTorch checkpoints in, flaxdcn parameters out (torchvision, mmcv and InternImage layouts).

Each function takes a mapping of names to arrays (a PyTorch ``state_dict()`` of tensors, or of
numpy arrays: torch is never imported) and returns the linen ``params`` tree of the matching
flaxdcn module as numpy arrays (copies, in the checkpoint's dtype). A ``prefix`` picks one layer
out of a whole model's state dict (``"backbone.layer4.0.conv2"``, with or without the trailing
dot); keys outside it are ignored.

The layouts are PyTorch's with the channel axis moved last: convolution weights go from OIHW to
HWIO, ``Linear`` weights are transposed, and the deformable RoI pooling heads get two
reorderings because mmcv flattens a pooled RoI as ``(C, oh, ow)`` and orders its offsets
``(dx, dy)``. For the NNX modules, load the converted tree with
:func:`flaxdcn.nnx.load_linen_params` (``load_linen_params(module, conv_params_from_torch(sd))``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxdcn._geometry import pair

Params = dict[str, Any]


def conv_params_from_torch(state_dict: Mapping[str, Any], prefix: str = "", *,
                           offset_group_count: int = 1) -> Params:
  """The ``params`` of :class:`~flaxdcn.DeformConv` / :class:`~flaxdcn.ModulatedDeformConv` from
  a torchvision or mmcv deformable convolution.

  Reads ``weight`` ``[O, C/F, kh, kw]`` and, where present, ``bias`` ``[O]`` (torchvision
  ``DeformConv2d``; the result then holds ``kernel`` and ``bias`` only, for
  :func:`flaxdcn.deform_conv2d` or a layer whose offsets come from elsewhere), and mmcv's offset
  head ``conv_offset.weight`` ``[2·G·kh·kw or 3·G·kh·kw, C, kh, kw]`` and ``conv_offset.bias``
  (``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``). The head's width says which module the
  tree is for: ``2·G·kh·kw`` offsets are :class:`~flaxdcn.DeformConv`'s, ``3·G·kh·kw`` (offsets,
  then mask logits) are :class:`~flaxdcn.ModulatedDeformConv`'s, with ``G = offset_group_count``
  (mmcv's ``deform_groups``). Both orders match flaxdcn's, so every weight is an OIHW -> HWIO
  transpose. ``F`` (torch's ``groups``, flaxdcn's ``feature_group_count``) is ``C`` over the
  weight's second axis.

  Build the flax layer with torch's padding as an int or pair (``padding=1``): ``"SAME"`` pads
  strided layers asymmetrically, PyTorch never does.

  Example usage::

    >>> import numpy as np
    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> from flaxdcn.convert import conv_params_from_torch
    >>> rng = np.random.default_rng(0)
    >>> state_dict = {  # mmcv ModulatedDeformConv2dPack(4, 8, 3, padding=1), as numpy arrays
    ...     "dcn.weight": rng.normal(size=(8, 4, 3, 3)), "dcn.bias": np.zeros(8),
    ...     "dcn.conv_offset.weight": rng.normal(size=(27, 4, 3, 3)),
    ...     "dcn.conv_offset.bias": np.zeros(27)}
    >>> params = conv_params_from_torch(state_dict, prefix="dcn")
    >>> jax.tree_util.tree_map(np.shape, params)
    {'bias': (8,), 'conv_offset': {'bias': (27,), 'kernel': (3, 3, 4, 27)}, 'kernel': (3, 3, 4, 8)}
    >>> layer = flaxdcn.ModulatedDeformConv(8, (3, 3), padding=1)
    >>> layer.apply({"params": params}, jnp.ones((1, 6, 6, 4))).shape
    (1, 6, 6, 8)

  Args:
    state_dict: names to arrays: torch tensors (any device; read with ``.detach().cpu()``),
      numpy or JAX arrays.
    prefix: the layer's name in ``state_dict`` (``""``: the keys are ``weight``, ...).
    offset_group_count: ``G``, to read the head's width (default 1).

  Returns:
    ``{"kernel": [kh, kw, C/F, O], "bias": [O], "conv_offset": {"kernel": [kh, kw, C, K],
    "bias": [K]}}``, without ``bias`` or ``conv_offset`` when the checkpoint has none.

  Raises:
    ValueError: a missing key or a tensor of the wrong shape (the message names the key and the
      expected shape).
  """
  fn = "conv_params_from_torch"
  if (not isinstance(offset_group_count, (int, np.integer)) or isinstance(offset_group_count, bool)
      or offset_group_count < 1):
    raise ValueError(f"{fn}: offset_group_count must be an int >= 1, got "
                     f"{offset_group_count!r}.")
  layer = TorchLayer(fn, state_dict, prefix)
  weight = layer.array("weight", (None,) * 4, "[O, C/F, kh, kw]")
  out_features, group_features, kh, kw = weight.shape
  params: Params = {"kernel": oihw_to_hwio(weight)}
  if "bias" in layer:
    params["bias"] = layer.array("bias", (out_features,), "[O]")

  if "conv_offset.weight" in layer or "conv_offset.bias" in layer:
    points = offset_group_count * kh * kw
    shape = (f"{2 * points} or {3 * points}", "C", kh, kw)
    layout = (f"[2·G·kh·kw (offsets) or 3·G·kh·kw (offsets, then mask logits), C, kh, kw] for "
              f"G = offset_group_count = {offset_group_count}, C a multiple of weight's "
              f"C/F = {group_features}")
    head = layer.array("conv_offset.weight", (None, None, kh, kw), layout)
    width, in_features = head.shape[:2]
    if (width not in (2 * points, 3 * points) or in_features % group_features
        or out_features % (in_features // group_features)):
      raise layer.shape_error("conv_offset.weight", head.shape, shape, layout)
    params["conv_offset"] = {
        "kernel": oihw_to_hwio(head),
        "bias": layer.array("conv_offset.bias", (width,), "[K], K the width of conv_offset.weight")}
  return params


def roi_pool_params_from_torch(state_dict: Mapping[str, Any], prefix: str = "", *,
                               output_size: int | Sequence[int], channels: int) -> Params:
  """The ``params`` of :class:`~flaxdcn.DeformRoIPool` / :class:`~flaxdcn.ModulatedDeformRoIPool`
  from mmcv's ``DeformRoIPoolPack`` / ``ModulatedDeformRoIPoolPack``.

  mmcv's ``nn.Sequential`` indices become flax names (``offset_fc.0`` -> ``offset_fc_0``, also
  ``offset_fc_2``, ``offset_fc_4``, ``mask_fc_0``, ``mask_fc_2``); the mask head is read when the
  checkpoint has one (the modulated Pack). ``Linear`` weights ``[out, in]`` are transposed to
  ``Dense`` kernels ``[in, out]``, with two reorderings (``fc = deform_fc_channels``, read from
  the checkpoint):

  - mmcv flattens the pooled RoI as ``(C, oh, ow)``, flaxdcn as ``(oh, ow, C)``: the input rows
    of ``offset_fc.0`` and ``mask_fc.0`` are permuted,
    ``weight.reshape(fc, C, oh, ow).transpose(2, 3, 1, 0).reshape(oh * ow * C, fc)``;
  - mmcv's offsets are ``[R, 2, oh, ow]`` with channel 0 the x offset, flaxdcn's ``[R, oh, ow, 2]``
    as ``(dy, dx)``: the outputs of ``offset_fc.4`` are reordered,
    ``weight.reshape(2, oh, ow, fc)[::-1].transpose(1, 2, 0, 3).reshape(-1, fc).T`` and
    ``bias.reshape(2, oh, ow)[::-1].transpose(1, 2, 0).reshape(-1)``.

  ``offset_fc.2`` and ``mask_fc.2`` (outputs in ``(oh, ow)`` order in both) are plain transposes.

  Example usage::

    >>> import numpy as np
    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> from flaxdcn.convert import roi_pool_params_from_torch
    >>> rng = np.random.default_rng(0)
    >>> shapes = {"offset_fc.0": (16, 4 * 3 * 3), "offset_fc.2": (16, 16),
    ...           "offset_fc.4": (3 * 3 * 2, 16)}  # mmcv DeformRoIPoolPack(3, 4, 16)
    >>> state_dict = {f"{k}.{p}": rng.normal(size=s if p == "weight" else s[:1])
    ...               for k, s in shapes.items() for p in ("weight", "bias")}
    >>> params = roi_pool_params_from_torch(state_dict, output_size=3, channels=4)
    >>> jax.tree_util.tree_map(np.shape, params)["offset_fc_4"]
    {'bias': (18,), 'kernel': (16, 18)}
    >>> layer = flaxdcn.DeformRoIPool(output_size=3, deform_fc_channels=16)
    >>> rois = jnp.array([[0, 1.0, 2.0, 12.0, 9.0]])
    >>> layer.apply({"params": params}, jnp.ones((1, 16, 16, 4)), rois).shape
    (1, 3, 3, 4)

  Args:
    state_dict: names to arrays: torch tensors (any device), numpy or JAX arrays.
    prefix: the layer's name in ``state_dict`` (e.g.
      ``"roi_head.bbox_roi_extractor.roi_layers.0"``).
    output_size: mmcv's ``output_size``: ``oh`` and ``ow``, an int or a pair.
    channels: ``C``, mmcv's ``output_channels`` (the feature channels).

  Returns:
    ``{"offset_fc_0": {"kernel": [oh·ow·C, fc], "bias": [fc]}, "offset_fc_2": ...,
    "offset_fc_4": {"kernel": [fc, oh·ow·2], "bias": [oh·ow·2]}}``, plus ``mask_fc_0``
    ``[oh·ow·C, fc]`` and ``mask_fc_2`` ``[fc, oh·ow]`` for a modulated checkpoint.

  Raises:
    ValueError: a missing key or a tensor of the wrong shape (the message names the key and the
      expected shape), or a bad ``output_size`` or ``channels``.
  """
  fn = "roi_pool_params_from_torch"
  oh, ow = pair(output_size, "output_size", fn=fn)
  if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool) or channels < 1:
    raise ValueError(f"{fn}: channels must be an int >= 1, got {channels!r}.")
  layer = TorchLayer(fn, state_dict, prefix)
  bins, pooled = oh * ow, oh * ow * channels
  first_layout = f"[fc, C·oh·ow] for C = {channels}, output_size = ({oh}, {ow})"
  fc = layer.array("offset_fc.0.weight", (None, pooled), first_layout).shape[0]

  def linear(name: str, out: int, inp: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A ``Linear``'s weight ``[out, inp]`` and bias ``[out]``; ``what`` names the two sizes."""
    weight = layer.array(f"{name}.weight", (out, inp), f"[{what}] for fc = {fc}")
    return weight, layer.array(f"{name}.bias", (out,), f"[{what.split(',')[0]}]")

  def first_kernel(weight: np.ndarray) -> np.ndarray:
    return weight.reshape(fc, channels, oh, ow).transpose(2, 3, 1, 0).reshape(pooled, fc)

  w0, b0 = linear("offset_fc.0", fc, pooled, "fc, C·oh·ow")
  w2, b2 = linear("offset_fc.2", fc, fc, "fc, fc")
  w4, b4 = linear("offset_fc.4", 2 * bins, fc, "2·oh·ow, fc")
  params: Params = {
      "offset_fc_0": {"kernel": first_kernel(w0), "bias": b0},
      "offset_fc_2": {"kernel": dense_kernel(w2), "bias": b2},
      "offset_fc_4": {
          "kernel": dense_kernel(w4.reshape(2, oh, ow, fc)[::-1].transpose(1, 2, 0, 3)
                                 .reshape(2 * bins, fc)),
          "bias": np.ascontiguousarray(b4.reshape(2, oh, ow)[::-1].transpose(1, 2, 0)
                                       .reshape(2 * bins))},
  }
  if any(f"mask_fc.{i}.{p}" in layer for i in (0, 2) for p in ("weight", "bias")):
    m0, c0 = linear("mask_fc.0", fc, pooled, "fc, C·oh·ow")
    m2, c2 = linear("mask_fc.2", bins, fc, "oh·ow, fc")
    params["mask_fc_0"] = {"kernel": first_kernel(m0), "bias": c0}
    params["mask_fc_2"] = {"kernel": dense_kernel(m2), "bias": c2}
  return params


# Shared by the converters.


def oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
  """A PyTorch convolution weight ``[O, I, kh, kw]`` as a Flax kernel ``[kh, kw, I, O]``."""
  return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
  """A PyTorch ``Linear`` weight ``[out, in]`` as a Flax ``Dense`` kernel ``[in, out]``."""
  return np.ascontiguousarray(np.transpose(weight))


def to_numpy(value: Any) -> np.ndarray:
  """A copy of ``value`` (a torch tensor, read without importing torch, or anything
  ``np.array`` takes) as a numpy array; bfloat16 tensors stay bfloat16."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly.
      return value.float().numpy().astype(jnp.bfloat16)
    return np.array(value.numpy())
  return np.array(value)


class TorchLayer:
  """The tensors of one layer of a PyTorch state dict: ``prefix + name`` lookups whose errors
  name the function, the key and the expected shape."""

  def __init__(self, fn: str, state_dict: Mapping[str, Any], prefix: str):
    if not isinstance(state_dict, Mapping):
      raise TypeError(f"{fn}: state_dict must be a mapping of names to arrays, got "
                      f"{type(state_dict).__name__}.")
    if not isinstance(prefix, str):
      raise TypeError(f"{fn}: prefix must be a str, got {prefix!r}.")
    self.fn, self.state_dict = fn, state_dict
    self.prefix = prefix + "." if prefix and not prefix.endswith(".") else prefix

  def __contains__(self, name: str) -> bool:
    return self.prefix + name in self.state_dict

  def array(self, name: str, shape: tuple[int | None, ...], layout: str) -> np.ndarray:
    """``state_dict[prefix + name]`` as a numpy array of ``shape`` (None: any size)."""
    key = self.prefix + name
    if key not in self.state_dict:
      present = sorted(k[len(self.prefix):] for k in self.state_dict if k.startswith(self.prefix))
      shown = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "")
      raise ValueError(f"{self.fn}: state_dict has no key {key!r} (expected shape "
                       f"{_shape_text(shape)} = {layout}); "
                       f"keys under prefix {self.prefix!r}: {shown or 'none'}.")
    value = to_numpy(self.state_dict[key])
    if value.ndim != len(shape) or any(s is not None and s != v
                                       for s, v in zip(shape, value.shape)):
      raise self.shape_error(name, value.shape, shape, layout)
    return value

  def shape_error(self, name: str, got: tuple[int, ...], shape: tuple[int | str | None, ...],
                  layout: str) -> ValueError:
    """A ValueError: ``state_dict[prefix + name]`` has shape ``got``, expected ``shape`` (None:
    any size), which is ``layout``."""
    return ValueError(f"{self.fn}: state_dict[{self.prefix + name!r}] has shape {tuple(got)}, "
                      f"expected {_shape_text(shape)} = {layout}.")


def _shape_text(shape: tuple[int | str | None, ...]) -> str:
  return "(" + ", ".join("?" if s is None else str(s) for s in shape) + (
      ",)" if len(shape) == 1 else ")")


# DCNv3 (InternImage) and DCNv4 (FlashInternImage).


def _linear_params(layer: TorchLayer, name: str, out: int | None, inp: int, what: str,
                   bias: bool = True) -> Params:
  """``Linear`` ``name`` (weight ``[out, inp]``) as ``{"kernel": [inp, out], "bias": [out]}``."""
  weight = layer.array(f"{name}.weight", (out, inp), f"[{what}]")
  params: Params = {"kernel": dense_kernel(weight)}
  if bias:
    params["bias"] = layer.array(f"{name}.bias", (weight.shape[0],), f"[{what.split(',')[0]}]")
  return params


def _depthwise_params(layer: TorchLayer, name: str, channels: int) -> Params:
  """Depthwise ``Conv2d`` ``name`` (weight ``[C, 1, k, k]``) as a ``nn.Conv`` tree."""
  weight = layer.array(f"{name}.weight", (channels, 1, None, None), "[C, 1, k, k]")
  return {"kernel": oihw_to_hwio(weight),
          "bias": layer.array(f"{name}.bias", (channels,), "[C]")}


def _center_feature_scale_params(layer: TorchLayer, params: Params, channels: int) -> None:
  if "center_feature_scale_proj_weight" in layer:
    weight = layer.array("center_feature_scale_proj_weight", (None, channels), "[G, C]")
    params["center_feature_scale_proj_weight"] = weight
    params["center_feature_scale_proj_bias"] = layer.array(
        "center_feature_scale_proj_bias", (weight.shape[0],), "[G]")


def dcnv3_params_from_torch(state_dict: Mapping[str, Any], prefix: str = "") -> Params:
  """The ``params`` of :class:`~flaxdcn.DCNv3` from InternImage's ``DCNv3`` / ``DCNv3_pytorch``.

  Every name is kept except the ``nn.Sequential`` ``dw_conv``: its conv ``dw_conv.0`` becomes
  ``dw_conv`` and its LayerNorm ``dw_conv.1.1`` becomes ``dw_norm`` (``weight`` -> ``scale``).
  ``Linear`` weights are transposed, the depthwise weight goes OIHW -> HWIO; the offset and mask
  channel orders are the op's, so nothing is reordered. ``center_feature_scale_proj_weight``
  ``[G, C]`` and ``_bias`` ``[G]`` are copied as they are, when present.

  Example usage::

    >>> import numpy as np
    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> from flaxdcn.convert import dcnv3_params_from_torch
    >>> rng = np.random.default_rng(0)
    >>> c, gp = 8, 2 * 9  # DCNv3(channels=8, group=2, kernel_size=3)
    >>> shapes = {"input_proj.weight": (c, c), "input_proj.bias": (c,),
    ...           "dw_conv.0.weight": (c, 1, 3, 3), "dw_conv.0.bias": (c,),
    ...           "dw_conv.1.1.weight": (c,), "dw_conv.1.1.bias": (c,),
    ...           "offset.weight": (2 * gp, c), "offset.bias": (2 * gp,),
    ...           "mask.weight": (gp, c), "mask.bias": (gp,),
    ...           "output_proj.weight": (c, c), "output_proj.bias": (c,)}
    >>> state_dict = {k: rng.normal(size=s) for k, s in shapes.items()}
    >>> params = dcnv3_params_from_torch(state_dict)
    >>> params["dw_norm"]["scale"].shape, params["offset"]["kernel"].shape
    ((8,), (8, 36))
    >>> flaxdcn.DCNv3(group_count=2).apply({"params": params}, jnp.ones((1, 5, 5, 8))).shape
    (1, 5, 5, 8)

  Args:
    state_dict: names to arrays: torch tensors (any device), numpy or JAX arrays.
    prefix: the layer's name in ``state_dict`` (e.g. ``"levels.0.blocks.0.dcn"``).

  Returns:
    ``{"input_proj", "dw_conv", "dw_norm", "offset", "mask", "output_proj"}`` (and the two
    ``center_feature_scale_proj_*`` arrays) as linen trees.

  Raises:
    ValueError: a missing key or a tensor of the wrong shape (named with its expected shape).
  """
  layer = TorchLayer("dcnv3_params_from_torch", state_dict, prefix)
  channels = layer.array("input_proj.weight", (None, None), "[C, C]").shape[1]
  params: Params = {
      "input_proj": _linear_params(layer, "input_proj", channels, channels, "C, C"),
      "dw_conv": _depthwise_params(layer, "dw_conv.0", channels),
      "dw_norm": {"scale": layer.array("dw_conv.1.1.weight", (channels,), "[C]"),
                  "bias": layer.array("dw_conv.1.1.bias", (channels,), "[C]")},
      "offset": _linear_params(layer, "offset", None, channels, "G·P·2, C"),
      "mask": _linear_params(layer, "mask", None, channels, "G·P, C"),
      "output_proj": _linear_params(layer, "output_proj", channels, channels, "C, C"),
  }
  if 2 * params["mask"]["kernel"].shape[1] != params["offset"]["kernel"].shape[1]:
    raise layer.shape_error("offset.weight", params["offset"]["kernel"].shape[::-1],
                            (2 * params["mask"]["kernel"].shape[1], channels),
                            "[G·P·2, C], twice mask.weight's rows")
  _center_feature_scale_params(layer, params, channels)
  return params


def dcnv4_params_from_torch(state_dict: Mapping[str, Any], prefix: str = "") -> Params:
  """The ``params`` of :class:`~flaxdcn.DCNv4` from FlashInternImage's ``DCNv4`` module.

  Names are kept (``value_proj``, ``offset_mask``, ``output_proj`` and, where the checkpoint has
  them, ``offset_mask_dw`` and ``center_feature_scale_proj_*``). ``Linear`` weights are
  transposed and the depthwise weight goes OIHW -> HWIO; ``offset_mask``'s ``D`` outputs (with
  their padding channels) keep their order. Build the module with ``dw_kernel_size`` when the
  tree has ``offset_mask_dw``, ``without_pointwise=True`` when it has no ``value_proj``, and
  ``output_bias=False`` when ``output_proj`` has no bias.

  Example usage::

    >>> import numpy as np
    >>> import jax.numpy as jnp
    >>> import flaxdcn
    >>> from flaxdcn.convert import dcnv4_params_from_torch
    >>> rng = np.random.default_rng(0)
    >>> c, d = 8, 56  # DCNv4(channels=8, group=2): 2 * 9 * 3 = 54, padded to 56
    >>> shapes = {"value_proj.weight": (c, c), "value_proj.bias": (c,),
    ...           "offset_mask.weight": (d, c), "offset_mask.bias": (d,),
    ...           "output_proj.weight": (c, c), "output_proj.bias": (c,)}
    >>> params = dcnv4_params_from_torch({k: rng.normal(size=s) for k, s in shapes.items()})
    >>> params["offset_mask"]["kernel"].shape
    (8, 56)
    >>> flaxdcn.DCNv4(group_count=2).apply({"params": params}, jnp.ones((1, 5, 5, 8))).shape
    (1, 5, 5, 8)

  Args:
    state_dict: names to arrays: torch tensors (any device), numpy or JAX arrays.
    prefix: the layer's name in ``state_dict``.

  Returns:
    The linen ``params`` tree of :class:`~flaxdcn.DCNv4`.

  Raises:
    ValueError: a missing key or a tensor of the wrong shape (named with its expected shape).
  """
  layer = TorchLayer("dcnv4_params_from_torch", state_dict, prefix)
  head = layer.array("offset_mask.weight", (None, None), "[D, C]")
  width, channels = head.shape
  if width % 8:
    raise layer.shape_error("offset_mask.weight", head.shape, ("D", channels),
                            "[D, C], D = G·P·3 rounded up to a multiple of 8")
  params: Params = {"offset_mask": _linear_params(layer, "offset_mask", width, channels, "D, C")}
  if "value_proj.weight" in layer:
    params["value_proj"] = _linear_params(layer, "value_proj", channels, channels, "C, C")
    params["output_proj"] = _linear_params(layer, "output_proj", channels, channels, "C, C",
                                           bias="output_proj.bias" in layer)
  if "offset_mask_dw.weight" in layer:
    params["offset_mask_dw"] = _depthwise_params(layer, "offset_mask_dw", channels)
  _center_feature_scale_params(layer, params, channels)
  return params


# Multi-scale deformable attention (Deformable DETR, mmcv).


def msda_params_from_torch(state_dict: Mapping[str, Any], prefix: str = "") -> Params:
  """The ``params`` of :class:`~flaxdcn.MSDeformAttn` from Deformable DETR's ``MSDeformAttn``
  or mmcv's ``MultiScaleDeformableAttention``.

  Both have the four ``Linear`` layers ``sampling_offsets`` ``[M·L·P·2, C]``,
  ``attention_weights`` ``[M·L·P, C]``, ``value_proj`` and ``output_proj`` ``[C, C]`` (with
  biases) and nothing else; their weights are transposed into ``Dense`` kernels. The output
  orders ``(m, l, p, (x, y))`` and ``(m, l, p)`` are flaxdcn's, so nothing is reordered. Build
  the module with the checkpoint's ``n_heads`` / ``num_heads``, ``n_levels`` / ``num_levels`` and
  ``n_points`` / ``num_points``: the widths fix only their product.

  mmcv's module also adds ``query_pos`` to the query, applies dropout and adds the residual
  (``identity``) to its output; :class:`~flaxdcn.MSDeformAttn` is the attention alone (Deformable
  DETR's module), so do those around it. mmcv's ``value_proj_ratio`` other than 1 (a value width
  other than ``C``) has no flaxdcn counterpart and is reported as a shape error.

  Example usage::

    >>> import numpy as np
    >>> import jax.numpy as jnp
    >>> import flaxdcn
    >>> from flaxdcn.convert import msda_params_from_torch
    >>> rng = np.random.default_rng(0)
    >>> c, mlp = 16, 2 * 2 * 3  # MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    >>> shapes = {"sampling_offsets.weight": (2 * mlp, c), "sampling_offsets.bias": (2 * mlp,),
    ...           "attention_weights.weight": (mlp, c), "attention_weights.bias": (mlp,),
    ...           "value_proj.weight": (c, c), "value_proj.bias": (c,),
    ...           "output_proj.weight": (c, c), "output_proj.bias": (c,)}
    >>> state_dict = {f"encoder.0.attn.{k}": rng.normal(size=s) for k, s in shapes.items()}
    >>> params = msda_params_from_torch(state_dict, prefix="encoder.0.attn")
    >>> params["sampling_offsets"]["kernel"].shape
    (16, 24)
    >>> layer = flaxdcn.MSDeformAttn(num_heads=2, num_levels=2, num_points=3)
    >>> query, reference_points = jnp.ones((1, 4, c)), jnp.full((1, 4, 2, 2), 0.5)
    >>> layer.apply({"params": params}, query, reference_points, jnp.ones((1, 13, c)),
    ...             ((3, 3), (2, 2))).shape
    (1, 4, 16)

  Args:
    state_dict: names to arrays: torch tensors (any device), numpy or JAX arrays.
    prefix: the layer's name in ``state_dict`` (e.g.
      ``"transformer.encoder.layers.0.self_attn"``).

  Returns:
    ``{"sampling_offsets", "attention_weights", "value_proj", "output_proj"}``, each
    ``{"kernel": [in, out], "bias": [out]}``.

  Raises:
    ValueError: a missing key or a tensor of the wrong shape (named with its expected shape).
  """
  layer = TorchLayer("msda_params_from_torch", state_dict, prefix)
  channels = layer.array("value_proj.weight", (None, None), "[C, C]").shape[1]
  value_proj = _linear_params(layer, "value_proj", channels, channels, "C, C")
  output_proj = _linear_params(layer, "output_proj", channels, channels, "C, C")
  params: Params = {
      "sampling_offsets": _linear_params(layer, "sampling_offsets", None, channels, "M·L·P·2, C"),
      "attention_weights": _linear_params(layer, "attention_weights", None, channels,
                                          "M·L·P, C"),
      "value_proj": value_proj,
      "output_proj": output_proj,
  }
  samples = params["attention_weights"]["kernel"].shape[1]
  if params["sampling_offsets"]["kernel"].shape[1] != 2 * samples:
    raise layer.shape_error("sampling_offsets.weight",
                            params["sampling_offsets"]["kernel"].shape[::-1],
                            (2 * samples, channels),
                            "[M·L·P·2, C], twice attention_weights.weight's rows")
  return params
