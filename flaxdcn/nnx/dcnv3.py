"""Flax NNX modules of DCNv3 (InternImage) and DCNv4 (FlashInternImage): the twins of
:class:`flaxdcn.DCNv3` and :class:`flaxdcn.DCNv4`, parameter for parameter."""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike

from flaxdcn._module_common import flatten_batch
from flaxdcn.nnx._common import check_channels, sow
from flaxdcn.ops.dcnv3 import dcnv3, dcnv4

Array = jax.Array

default_kernel_init = nnx.initializers.xavier_uniform()
default_bias_init = nnx.initializers.zeros_init()
_zeros = nnx.initializers.zeros_init()


def _points(kernel_size: int, remove_center: bool) -> int:
  return kernel_size * kernel_size - int(remove_center)


def _depthwise(channels, size, dtype, param_dtype, precision, rngs) -> nnx.Conv:
  return nnx.Conv(channels, channels, (size, size), padding=(size - 1) // 2,
                  feature_group_count=channels, dtype=dtype, param_dtype=param_dtype,
                  precision=precision, rngs=rngs)


def _center_feature_scale(layer, query: Array, x: Array, x_proj: Array) -> Array:
  """``x * (1 - s) + x_proj * s``, ``s = sigmoid(query @ W.T + b)`` per group (see
  :func:`flaxdcn.linen.dcnv3.center_feature_scale`)."""
  weight = layer.center_feature_scale_proj_weight[...]
  bias = layer.center_feature_scale_proj_bias[...]
  query, weight, bias = dtypes.promote_dtype((query, weight, bias), dtype=layer.dtype)
  scale = jax.nn.sigmoid(jnp.einsum("...c,gc->...g", query, weight, precision=layer.precision)
                         + bias)
  scale = jnp.repeat(scale, x.shape[-1] // layer.group_count, axis=-1).astype(x.dtype)
  return x * (1 - scale) + x_proj * scale


class DCNv3(nnx.Module):
  """DCNv3, the NNX twin of :class:`flaxdcn.DCNv3` (InternImage's ``DCNv3`` module).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn.nnx
    >>> layer = flaxdcn.nnx.DCNv3(16, group_count=4, rngs=nnx.Rngs(0))
    >>> sorted(flaxdcn.nnx.linen_params(layer))
    ['dw_conv', 'dw_norm', 'input_proj', 'mask', 'offset', 'output_proj']
    >>> layer(jnp.ones((2, 9, 9, 16))).shape
    (2, 9, 9, 16)

  Args:
    in_features: the channels ``C`` of the input and the output (InternImage's ``channels``).
    kernel_size: the sampling kernel ``k`` (``k x k``; default 3).
    strides: stride of the sampling (default 1); the output must keep the input resolution.
    padding: padding of the sampling (default 1; any :func:`flaxdcn.dcnv3` form).
    kernel_dilation: dilation of the sampling kernel (default 1).
    group_count: ``G`` (default 4); ``in_features`` must be divisible by it.
    offset_scale: scale of the kernel grid and offsets around the kernel centre (default 1).
    dw_kernel_size: kernel of the depthwise conv ``dw_conv`` (None: ``kernel_size``).
    center_feature_scale: blend the output with ``input_proj``'s by a learned sigmoid gate per
      group, computed from the depthwise branch.
    remove_center: sample without the kernel centre (odd ``kernel_size``).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the linear layers and the depthwise conv.
    kernel_init: initialiser of the ``input_proj`` / ``output_proj`` kernels.
    bias_init: initialiser of their biases.
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.dcnv3`).
    deterministic_backward: bitwise-reproducible native CUDA backward.
    rngs: the random number generators of the parameter initialisers.

  References:
    - Wang et al., `InternImage: Exploring Large-Scale Vision Foundation Models with Deformable
      Convolutions <https://arxiv.org/abs/2211.05778>`_, CVPR 2023.
  """

  def __init__(self, in_features: int, kernel_size: int = 3, strides: int = 1, *,
               padding: PaddingLike = 1, kernel_dilation: int = 1, group_count: int = 4,
               offset_scale: float = 1.0, dw_kernel_size: int | None = None,
               center_feature_scale: bool = False, remove_center: bool = False,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init, implementation: str | None = None,
               deterministic_backward: bool = False, rngs: nnx.Rngs):
    c, g, p = in_features, group_count, _points(kernel_size, remove_center)
    linear = lambda out, **kw: nnx.Linear(c, out, dtype=dtype, param_dtype=param_dtype,
                                          precision=precision, rngs=rngs, **kw)
    self.input_proj = linear(c, kernel_init=kernel_init, bias_init=bias_init)
    dw = kernel_size if dw_kernel_size is None else dw_kernel_size
    self.dw_conv = _depthwise(c, dw, dtype, param_dtype, precision, rngs)
    self.dw_norm = nnx.LayerNorm(c, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.offset = linear(g * p * 2, kernel_init=_zeros, bias_init=_zeros)
    self.mask = linear(g * p, kernel_init=_zeros, bias_init=_zeros)
    self.output_proj = linear(c, kernel_init=kernel_init, bias_init=bias_init)
    if center_feature_scale:
      self.center_feature_scale_proj_weight = nnx.Param(jnp.zeros((g, c), param_dtype))
      self.center_feature_scale_proj_bias = nnx.Param(jnp.zeros((g,), param_dtype))
    self.in_features = in_features
    self.kernel_size = kernel_size
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.group_count = group_count
    self.offset_scale = offset_scale
    self.center_feature_scale = center_feature_scale
    self.remove_center = remove_center
    self.dtype = dtype
    self.precision = precision
    self.implementation = implementation
    self.deterministic_backward = deterministic_backward

  def __call__(self, inputs: Array) -> Array:
    """``[*batch, H, W, C] -> [*batch, H, W, C]``; sows ``"offsets"`` and ``"softmax_mask"``
    under ``nnx.capture(..., nnx.Intermediate)``."""
    check_channels(self, inputs, self.in_features)
    inputs, batch_shape = flatten_batch(self, inputs)
    g, p = self.group_count, _points(self.kernel_size, self.remove_center)
    x = self.input_proj(inputs)
    x1 = nnx.gelu(self.dw_norm(self.dw_conv(inputs)), approximate=False)
    offsets = self.offset(x1)
    logits = self.mask(x1)
    mask = jax.nn.softmax(logits.reshape(logits.shape[:-1] + (g, p)), -1).reshape(logits.shape)
    sow(self, "offsets", offsets.reshape(batch_shape + offsets.shape[1:]))
    sow(self, "softmax_mask", mask.reshape(batch_shape + mask.shape[1:]))
    y = dcnv3(x, offsets.astype(x.dtype), mask.astype(x.dtype), kernel_size=self.kernel_size,
              strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
              group_count=g, offset_scale=self.offset_scale, remove_center=self.remove_center,
              implementation=self.implementation,
              deterministic_backward=self.deterministic_backward)
    if self.center_feature_scale:
      y = _center_feature_scale(self, x1, y, x)
    y = self.output_proj(y)
    return y.reshape(batch_shape + y.shape[1:])


class DCNv4(nnx.Module):
  """DCNv4, the NNX twin of :class:`flaxdcn.DCNv4` (FlashInternImage's ``DCNv4`` module).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn.nnx
    >>> layer = flaxdcn.nnx.DCNv4(16, group_count=4, dw_kernel_size=3, rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, flaxdcn.nnx.linen_params(layer)["offset_mask"])
    {'bias': (112,), 'kernel': (16, 112)}
    >>> layer(jnp.ones((2, 9, 9, 16))).shape
    (2, 9, 9, 16)

  Args:
    in_features: the channels ``C`` of the input and the output (DCNv4's ``channels``).
    kernel_size: the sampling kernel ``k`` (``k x k``; default 3).
    strides: stride of the sampling (default 1); the output must keep the input resolution.
    padding: padding of the sampling (default 1; any :func:`flaxdcn.dcnv4` form).
    kernel_dilation: dilation of the sampling kernel (default 1).
    group_count: ``G`` (default 4); ``in_features`` must be divisible by it.
    offset_scale: scale of the kernel grid and offsets around the kernel centre (default 1).
    dw_kernel_size: kernel of the depthwise conv ``offset_mask_dw`` before ``offset_mask``
      (None: no depthwise conv, as in DCNv4).
    center_feature_scale: blend the op's output with ``value_proj``'s by a learned sigmoid gate
      per group, computed from the op's output (as DCNv4 does).
    remove_center: sample without the kernel centre (odd ``kernel_size``).
    output_bias: whether ``output_proj`` has a bias.
    without_pointwise: no ``value_proj`` / ``output_proj``: the op alone, with its offset head.
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the linear layers and the depthwise conv.
    kernel_init: initialiser of the ``value_proj`` / ``output_proj`` kernels.
    bias_init: initialiser of their biases.
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.dcnv4`).
    deterministic_backward: bitwise-reproducible native CUDA backward.
    rngs: the random number generators of the parameter initialisers.

  References:
    - Xiong et al., `Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for
      Vision Applications <https://arxiv.org/abs/2401.06197>`_, CVPR 2024.
    - Wang et al., `InternImage: Exploring Large-Scale Vision Foundation Models with Deformable
      Convolutions <https://arxiv.org/abs/2211.05778>`_, CVPR 2023.
  """

  def __init__(self, in_features: int, kernel_size: int = 3, strides: int = 1, *,
               padding: PaddingLike = 1, kernel_dilation: int = 1, group_count: int = 4,
               offset_scale: float = 1.0, dw_kernel_size: int | None = None,
               center_feature_scale: bool = False, remove_center: bool = False,
               output_bias: bool = True, without_pointwise: bool = False,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init, implementation: str | None = None,
               deterministic_backward: bool = False, rngs: nnx.Rngs):
    c, g, p = in_features, group_count, _points(kernel_size, remove_center)
    linear = lambda out, **kw: nnx.Linear(c, out, dtype=dtype, param_dtype=param_dtype,
                                          precision=precision, rngs=rngs, **kw)
    self.value_proj = nnx.data(None)
    self.output_proj = nnx.data(None)
    if not without_pointwise:
      self.value_proj = linear(c, kernel_init=kernel_init, bias_init=bias_init)
      self.output_proj = linear(c, kernel_init=kernel_init, bias_init=bias_init,
                                use_bias=output_bias)
    self.offset_mask_dw = nnx.data(None)
    if dw_kernel_size is not None:
      self.offset_mask_dw = _depthwise(c, dw_kernel_size, dtype, param_dtype, precision, rngs)
    self.offset_mask = linear(-(-g * p * 3 // 8) * 8, kernel_init=_zeros, bias_init=_zeros)
    if center_feature_scale:
      self.center_feature_scale_proj_weight = nnx.Param(jnp.zeros((g, c), param_dtype))
      self.center_feature_scale_proj_bias = nnx.Param(jnp.zeros((g,), param_dtype))
    self.in_features = in_features
    self.kernel_size = kernel_size
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.group_count = group_count
    self.offset_scale = offset_scale
    self.center_feature_scale = center_feature_scale
    self.remove_center = remove_center
    self.dtype = dtype
    self.precision = precision
    self.implementation = implementation
    self.deterministic_backward = deterministic_backward

  def __call__(self, inputs: Array) -> Array:
    """``[*batch, H, W, C] -> [*batch, H, W, C]``; sows ``"predicted_offset_mask"`` under
    ``nnx.capture(..., nnx.Intermediate)``."""
    check_channels(self, inputs, self.in_features)
    inputs, batch_shape = flatten_batch(self, inputs)
    x = inputs if self.value_proj is None else self.value_proj(inputs)
    head_in = inputs if self.offset_mask_dw is None else self.offset_mask_dw(inputs)
    offset_mask = self.offset_mask(head_in)
    sow(self, "predicted_offset_mask", offset_mask.reshape(batch_shape + offset_mask.shape[1:]))
    y = dcnv4(x, offset_mask.astype(x.dtype), kernel_size=self.kernel_size,
              strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
              group_count=self.group_count, offset_scale=self.offset_scale,
              remove_center=self.remove_center, implementation=self.implementation,
              deterministic_backward=self.deterministic_backward)
    if self.center_feature_scale:
      y = _center_feature_scale(self, y, y, x)
    if self.output_proj is not None:
      y = self.output_proj(y)
    return y.reshape(batch_shape + y.shape[1:])
