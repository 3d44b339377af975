"""Flax NNX modules for deformable convolution (DCNv1 and DCNv2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike, PromoteDtypeFn

from flaxdcn._module_common import flatten_batch, spatial_pair
from flaxdcn.nnx._common import check_channels, kernel_and_bias, sow
from flaxdcn.ops.deform_conv import deform_conv2d

Array = jax.Array

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class _DeformConvBase(nnx.Module):
  """Shared constructor and forward pass of :class:`DeformConv` and :class:`ModulatedDeformConv`;
  subclasses choose whether the offset head also predicts a mask."""

  modulated = False

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | Sequence[int],
      strides: int | Sequence[int] = 1,
      *,
      padding: PaddingLike = "SAME",
      kernel_dilation: int | Sequence[int] = 1,
      feature_group_count: int = 1,
      use_bias: bool = True,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      precision: PrecisionLike = None,
      kernel_init: Initializer = default_kernel_init,
      bias_init: Initializer = default_bias_init,
      offset_group_count: int = 1,
      implementation: str | None = None,
      deterministic_backward: bool = False,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      rngs: nnx.Rngs,
  ):
    kernel_size = spatial_pair(self, kernel_size, "kernel_size")
    self.kernel, self.bias = kernel_and_bias(
        self, kernel_size, in_features, out_features, feature_group_count=feature_group_count,
        use_bias=use_bias, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
        kernel_metadata=kernel_metadata, bias_metadata=bias_metadata, rngs=rngs)
    k = kernel_size[0] * kernel_size[1] * offset_group_count
    zeros = nnx.initializers.zeros_init()
    self.conv_offset = nnx.Conv(
        in_features, (3 if self.modulated else 2) * k, kernel_size, strides, padding=padding,
        kernel_dilation=kernel_dilation, dtype=dtype, param_dtype=param_dtype,
        precision=precision, kernel_init=zeros, bias_init=zeros, rngs=rngs)

    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.offset_group_count = offset_group_count
    self.implementation = implementation
    self.deterministic_backward = deterministic_backward
    self.promote_dtype = promote_dtype

  def __call__(self, inputs: Array) -> Array:
    """Applies the deformable convolution.

    Args:
      inputs: ``[*batch, H, W, in_features]``, channels last. Batch dimensions are flattened
        into one (none at all is allowed, as in ``flax.nnx.Conv``).

    Returns:
      ``[*batch, Ho, Wo, out_features]``. Under ``nnx.capture(..., nnx.Intermediate)`` the
      predicted offsets ``[*batch, Ho, Wo, G * kh * kw * 2]`` (and, for the modulated layer, the
      mask ``[*batch, Ho, Wo, G * kh * kw]``) are sown as ``"offsets"`` (``"mask"``).
    """
    check_channels(self, inputs, self.in_features)
    inputs, batch_shape = flatten_batch(self, inputs)
    k = self.kernel_size[0] * self.kernel_size[1] * self.offset_group_count
    head = self.conv_offset(inputs)
    offsets, mask = head[..., :2 * k], None
    sow(self, "offsets", offsets.reshape(batch_shape + offsets.shape[1:]))
    if self.modulated:
      mask = jax.nn.sigmoid(head[..., 2 * k:])
      sow(self, "mask", mask.reshape(batch_shape + mask.shape[1:]))

    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    offsets = offsets.astype(inputs.dtype)
    mask = None if mask is None else mask.astype(inputs.dtype)
    y = deform_conv2d(
        inputs, offsets, kernel, mask, bias, strides=self.strides, padding=self.padding,
        kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
        offset_group_count=self.offset_group_count, precision=self.precision,
        implementation=self.implementation, deterministic_backward=self.deterministic_backward)
    return y.reshape(batch_shape + y.shape[1:])


class DeformConv(_DeformConvBase):
  """Deformable convolution (DCNv1) with its own offset head, the NNX twin of
  :class:`flaxdcn.DeformConv`.

  A zero-initialised ``nnx.Conv`` ``conv_offset`` with the main convolution's geometry predicts
  the offsets from the same input, so at initialisation the layer equals ``flax.nnx.Conv`` with
  the same ``kernel`` and ``bias``. The parameters are those of the linen module, leaf for leaf
  (see :func:`flaxdcn.nnx.load_linen_params`).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn.nnx
    >>> layer = flaxdcn.nnx.DeformConv(4, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, flaxdcn.nnx.linen_params(layer))
    {'bias': (8,), 'conv_offset': {'bias': (18,), 'kernel': (3, 3, 4, 18)}, 'kernel': (3, 3, 4, 8)}
    >>> x = jnp.ones((2, 16, 16, 4))
    >>> layer(x).shape
    (2, 16, 16, 8)
    >>> y, intermediates = nnx.capture(layer, nnx.Intermediate)(x)
    >>> intermediates["offsets"][0].shape
    (2, 16, 16, 18)

  Args:
    in_features: number of input channels ``C``.
    out_features: number of output channels.
    kernel_size: int or ``(kh, kw)`` (an int is both axes: the layer is 2-D only).
    strides: int or ``(sh, sw)`` (default 1).
    padding: ``"SAME"`` (default), ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``.
    kernel_dilation: int or ``(dh, dw)`` (default 1).
    feature_group_count: groups of input channels, each with its own kernel slice (default 1).
    use_bias: whether to add a bias (default True).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the matrix products (``jax.lax.Precision``).
    kernel_init: initialiser of ``kernel`` ``[kh, kw, C // feature_group_count, out_features]``.
    bias_init: initialiser of ``bias`` ``[out_features]``.
    offset_group_count: groups of input channels that share one set of offsets (default 1).
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.deform_conv2d`).
    deterministic_backward: bitwise-reproducible native CUDA backward (see
      :func:`flaxdcn.deform_conv2d`).
    promote_dtype: function to promote ``(inputs, kernel, bias)`` to one dtype, as in
      ``flax.nnx.Conv``.
    kernel_metadata: metadata of the ``kernel`` ``nnx.Param``, e.g. ``{"out_sharding": ...}``
      (the zero-initialised offset head carries none).
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    rngs: the random number generators of the parameter initialisers.

  References:
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
  """


class ModulatedDeformConv(_DeformConvBase):
  """Modulated deformable convolution (DCNv2) with its own offset-and-mask head, the NNX twin
  of :class:`flaxdcn.ModulatedDeformConv`.

  The zero-initialised head ``conv_offset`` predicts ``3 * G * kh * kw`` channels: the first
  ``2 * G * kh * kw`` are the offsets, the rest pass through a sigmoid to give the mask (mmcv's
  ``ModulatedDeformConv2dPack`` layout). At initialisation every mask value is sigmoid(0) = 0.5,
  so the layer equals 0.5 x the plain convolution term + bias.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn.nnx
    >>> layer = flaxdcn.nnx.ModulatedDeformConv(4, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, flaxdcn.nnx.linen_params(layer))
    {'bias': (8,), 'conv_offset': {'bias': (27,), 'kernel': (3, 3, 4, 27)}, 'kernel': (3, 3, 4, 8)}
    >>> x = jnp.ones((2, 16, 16, 4))
    >>> y, intermediates = nnx.capture(layer, nnx.Intermediate)(x)
    >>> y.shape, intermediates["mask"][0].shape
    ((2, 16, 16, 8), (2, 16, 16, 9))

  Args:
    in_features: number of input channels ``C``.
    out_features: number of output channels.
    kernel_size: int or ``(kh, kw)`` (an int is both axes: the layer is 2-D only).
    strides: int or ``(sh, sw)`` (default 1).
    padding: ``"SAME"`` (default), ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``.
    kernel_dilation: int or ``(dh, dw)`` (default 1).
    feature_group_count: groups of input channels, each with its own kernel slice (default 1).
    use_bias: whether to add a bias (default True).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the matrix products (``jax.lax.Precision``).
    kernel_init: initialiser of ``kernel`` ``[kh, kw, C // feature_group_count, out_features]``.
    bias_init: initialiser of ``bias`` ``[out_features]``.
    offset_group_count: groups of input channels that share one set of offsets and mask
      (default 1).
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.deform_conv2d`).
    deterministic_backward: bitwise-reproducible native CUDA backward (see
      :func:`flaxdcn.deform_conv2d`).
    promote_dtype: function to promote ``(inputs, kernel, bias)`` to one dtype, as in
      ``flax.nnx.Conv``.
    kernel_metadata: metadata of the ``kernel`` ``nnx.Param``, e.g. ``{"out_sharding": ...}``
      (the zero-initialised offset head carries none).
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    rngs: the random number generators of the parameter initialisers.

  References:
    - Zhu et al., `Deformable ConvNets v2: More Deformable, Better Results
      <https://arxiv.org/abs/1811.11168>`_, CVPR 2019.
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
  """

  modulated = True
