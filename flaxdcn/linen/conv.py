"""Flax linen modules for deformable convolution (DCNv1 and DCNv2)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike

from flaxdcn.linen._common import flatten_batch, kernel_and_bias, spatial_pair
from flaxdcn.ops.deform_conv import deform_conv2d

Array = jax.Array

default_kernel_init = nn.initializers.lecun_normal()


class _DeformConvBase(nn.Module):
  """Shared attributes and the forward pass of :class:`DeformConv` and
  :class:`ModulatedDeformConv`; subclasses choose whether the offset head also predicts a mask."""

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: PaddingLike = "SAME"
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  offset_group_count: int = 1
  implementation: str | None = None
  deterministic_backward: bool = False

  modulated = False

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Applies the deformable convolution.

    Args:
      inputs: ``[*batch, H, W, C]``, channels last. Batch dimensions are flattened into one (none
        at all is allowed, as in ``flax.linen.Conv``).

    Returns:
      ``[*batch, Ho, Wo, features]``. The predicted offsets ``[*batch, Ho, Wo, G * kh * kw * 2]``
      (and, for the modulated layer, the mask ``[*batch, Ho, Wo, G * kh * kw]``) are sown into the
      ``"intermediates"`` collection as ``"offsets"`` (``"mask"``): pass
      ``mutable=["intermediates"]`` to ``apply`` to read them.
    """
    kernel_size = spatial_pair(self, self.kernel_size, "kernel_size")
    inputs, batch_shape = flatten_batch(self, inputs)
    kernel, bias = kernel_and_bias(self, kernel_size, inputs.shape[-1])

    k = kernel_size[0] * kernel_size[1] * self.offset_group_count
    head = nn.Conv(
        (3 if self.modulated else 2) * k, kernel_size, strides=self.strides,
        padding=self.padding, kernel_dilation=self.kernel_dilation, dtype=self.dtype,
        param_dtype=self.param_dtype, precision=self.precision,
        kernel_init=nn.initializers.zeros_init(), bias_init=nn.initializers.zeros_init(),
        name="conv_offset")(inputs)
    offsets, mask = head[..., :2 * k], None
    self.sow("intermediates", "offsets", offsets.reshape(batch_shape + offsets.shape[1:]))
    if self.modulated:
      mask = jax.nn.sigmoid(head[..., 2 * k:])
      self.sow("intermediates", "mask", mask.reshape(batch_shape + mask.shape[1:]))

    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    offsets = offsets.astype(inputs.dtype)
    mask = None if mask is None else mask.astype(inputs.dtype)
    y = deform_conv2d(
        inputs, offsets, kernel, mask, bias, strides=self.strides, padding=self.padding,
        kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
        offset_group_count=self.offset_group_count, precision=self.precision,
        implementation=self.implementation, deterministic_backward=self.deterministic_backward)
    return y.reshape(batch_shape + y.shape[1:])


class DeformConv(_DeformConvBase):
  """Deformable convolution (DCNv1) with its own offset head.

  A zero-initialised convolution ``conv_offset`` with the main convolution's geometry predicts the
  offsets from the same input, so at initialisation the layer equals ``flax.linen.Conv`` with the
  same ``kernel`` and ``bias``. Parameter layout follows mmcv's ``DeformConv2dPack`` with the
  channel axis moved last, so PyTorch checkpoints convert by an OIHW -> HWIO transpose.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> layer = flaxdcn.DeformConv(features=8, kernel_size=(3, 3))
    >>> x = jnp.ones((2, 16, 16, 4))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'bias': (8,), 'conv_offset': {'bias': (18,), 'kernel': (3, 3, 4, 18)}, 'kernel': (3, 3, 4, 8)}}
    >>> layer.apply(variables, x).shape
    (2, 16, 16, 8)

  Attributes:
    features: number of output channels.
    kernel_size: int or ``(kh, kw)``.
    strides: int or ``(sh, sw)`` (default 1).
    padding: ``"SAME"`` (default), ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``.
    kernel_dilation: int or ``(dh, dw)`` (default 1).
    feature_group_count: groups of input channels, each with its own kernel slice (default 1).
    use_bias: whether to add a bias (default True).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the matrix products (``jax.lax.Precision``).
    kernel_init: initialiser of ``kernel`` ``[kh, kw, C // feature_group_count, features]``.
    bias_init: initialiser of ``bias`` ``[features]``.
    offset_group_count: groups of input channels that share one set of offsets (default 1).
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.deform_conv2d`).
    deterministic_backward: bitwise-reproducible native CUDA backward (see
      :func:`flaxdcn.deform_conv2d`).

  References:
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
  """


class ModulatedDeformConv(_DeformConvBase):
  """Modulated deformable convolution (DCNv2) with its own offset-and-mask head.

  The zero-initialised head ``conv_offset`` predicts ``3 * G * kh * kw`` channels: the first
  ``2 * G * kh * kw`` are the offsets, the rest pass through a sigmoid to give the mask (mmcv's
  ``ModulatedDeformConv2dPack`` layout). At initialisation every mask value is sigmoid(0) = 0.5, so
  the layer equals 0.5 x the plain convolution term + bias.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> layer = flaxdcn.ModulatedDeformConv(features=8, kernel_size=(3, 3))
    >>> x = jnp.ones((2, 16, 16, 4))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'bias': (8,), 'conv_offset': {'bias': (27,), 'kernel': (3, 3, 4, 27)}, 'kernel': (3, 3, 4, 8)}}
    >>> layer.apply(variables, x).shape
    (2, 16, 16, 8)

  Attributes:
    features: number of output channels.
    kernel_size: int or ``(kh, kw)``.
    strides: int or ``(sh, sw)`` (default 1).
    padding: ``"SAME"`` (default), ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``.
    kernel_dilation: int or ``(dh, dw)`` (default 1).
    feature_group_count: groups of input channels, each with its own kernel slice (default 1).
    use_bias: whether to add a bias (default True).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the matrix products (``jax.lax.Precision``).
    kernel_init: initialiser of ``kernel`` ``[kh, kw, C // feature_group_count, features]``.
    bias_init: initialiser of ``bias`` ``[features]``.
    offset_group_count: groups of input channels that share one set of offsets and mask
      (default 1).
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.deform_conv2d`).
    deterministic_backward: bitwise-reproducible native CUDA backward (see
      :func:`flaxdcn.deform_conv2d`).

  References:
    - Zhu et al., `Deformable ConvNets v2: More Deformable, Better Results
      <https://arxiv.org/abs/1811.11168>`_, CVPR 2019.
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
  """

  modulated = True
