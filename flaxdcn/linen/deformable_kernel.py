"""Flax linen modules for Deformable Kernels (Gao et al., 2019): global and local DK."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike

from flaxdcn.linen._common import flatten_batch, kernel_and_bias, spatial_pair
from flaxdcn.ops.deformable_kernel import deformable_kernel_conv2d

Array = jax.Array

default_kernel_init = nn.initializers.lecun_normal()


class _DeformableKernelBase(nn.Module):
  """Shared attributes and the forward pass of :class:`GlobalDeformableKernel` and
  :class:`LocalDeformableKernel`; ``local`` chooses the zero-initialised offset head (a conv
  with the main geometry, or a global average pool and a dense layer)."""

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
  scope_size: int | Sequence[int] | None = None
  implementation: str | None = None

  local = False

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Applies the Deformable Kernels convolution.

    Args:
      inputs: ``[*batch, H, W, C]``, channels last. Batch dimensions are flattened into one (none
        at all is allowed, as in ``flax.linen.Conv``).

    Returns:
      ``[*batch, Ho, Wo, features]``. The predicted offsets (``[*batch, kh * kw * 2]`` global,
      ``[*batch, Ho, Wo, kh * kw * 2]`` local) are sown into the ``"intermediates"`` collection as
      ``"offsets"``: pass ``mutable=["intermediates"]`` to ``apply`` to read them.
    """
    kernel_size = spatial_pair(self, self.kernel_size, "kernel_size")
    scope_size = (kernel_size if self.scope_size is None
                  else spatial_pair(self, self.scope_size, "scope_size"))
    if scope_size[0] < kernel_size[0] or scope_size[1] < kernel_size[1]:
      raise ValueError(f"{type(self).__name__}: scope_size {scope_size} must be at least "
                       f"kernel_size {kernel_size} on both axes.")
    inputs, batch_shape = flatten_batch(self, inputs)
    kernel, bias = kernel_and_bias(self, scope_size, inputs.shape[-1])
    head = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                kernel_init=nn.initializers.zeros_init(), bias_init=nn.initializers.zeros_init())
    num_offsets = kernel_size[0] * kernel_size[1] * 2
    if self.local:
      offsets = nn.Conv(num_offsets, kernel_size, strides=self.strides, padding=self.padding,
                        kernel_dilation=self.kernel_dilation, name="conv_offset", **head)(inputs)
    else:
      offsets = nn.Dense(num_offsets, name="fc_offset", **head)(jnp.mean(inputs, axis=(1, 2)))
    self.sow("intermediates", "offsets", offsets.reshape(batch_shape + offsets.shape[1:]))

    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = deformable_kernel_conv2d(
        inputs, offsets.astype(inputs.dtype), kernel, bias, kernel_size=kernel_size,
        strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, precision=self.precision,
        implementation=self.implementation)
    return y.reshape(batch_shape + y.shape[1:])


class GlobalDeformableKernel(_DeformableKernelBase):
  """Global Deformable Kernels: one kernel per image, resampled from a larger scope.

  The offsets ``[N, kh * kw * 2]`` come from a global average pool of the input and a
  zero-initialised dense layer ``fc_offset`` (no non-linearity, as in the paper), so at
  initialisation every image uses the centred ``kernel_size`` crop of the scope ``kernel``: the
  layer equals ``flax.linen.Conv`` with that crop and the same ``bias`` (see
  :func:`flaxdcn.deformable_kernel_conv2d` for the half-integer centre of an odd margin).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> layer = flaxdcn.GlobalDeformableKernel(features=8, kernel_size=(3, 3), scope_size=(5, 5))
    >>> x = jnp.ones((2, 16, 16, 4))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'bias': (8,), 'fc_offset': {'bias': (18,), 'kernel': (4, 18)}, 'kernel': (5, 5, 4, 8)}}
    >>> layer.apply(variables, x).shape
    (2, 16, 16, 8)

  Attributes:
    features: number of output channels.
    kernel_size: int or ``(kh, kw)``: the size of the resampled kernel.
    strides: int or ``(sh, sw)`` (default 1).
    padding: ``"SAME"`` (default), ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``.
    kernel_dilation: int or ``(dh, dw)`` (default 1): spacing of the data samples.
    feature_group_count: groups of input channels, each with its own scope slice (default 1).
    use_bias: whether to add a bias (default True).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the matrix products (``jax.lax.Precision``).
    kernel_init: initialiser of the scope ``kernel [Sh, Sw, C // feature_group_count, features]``
      (its fan-in counts the whole scope).
    bias_init: initialiser of ``bias`` ``[features]``.
    scope_size: int or ``(Sh, Sw)``, at least ``kernel_size`` (default: ``kernel_size``).
    implementation: ``None`` or ``"xla"``; ``"ffi"`` raises, as there is no native Deformable
      Kernels kernel (see :func:`flaxdcn.deformable_kernel_conv2d`).

  References:
    - Gao et al., `Deformable Kernels: Adapting Effective Receptive Fields for Object
      Deformation <https://arxiv.org/abs/1910.02940>`_, ICLR 2020.
  """


class LocalDeformableKernel(_DeformableKernelBase):
  """Local Deformable Kernels: one kernel per output position, resampled from a larger scope.

  A zero-initialised convolution ``conv_offset`` with the main convolution's geometry predicts
  offsets ``[N, Ho, Wo, kh * kw * 2]`` from the same input, so at initialisation the layer equals
  ``flax.linen.Conv`` with the centred ``kernel_size`` crop of the scope ``kernel`` and the same
  ``bias``. Works for any ``feature_group_count``; one ``(dy, dx)`` per kernel point is shared by
  all channels.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> layer = flaxdcn.LocalDeformableKernel(features=8, kernel_size=(3, 3), scope_size=(5, 5),
    ...                                       feature_group_count=2)
    >>> x = jnp.ones((2, 16, 16, 4))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'bias': (8,), 'conv_offset': {'bias': (18,), 'kernel': (3, 3, 4, 18)}, 'kernel': (5, 5, 2, 8)}}
    >>> layer.apply(variables, x).shape
    (2, 16, 16, 8)

  Attributes:
    features: number of output channels.
    kernel_size: int or ``(kh, kw)``: the size of the resampled kernel.
    strides: int or ``(sh, sw)`` (default 1).
    padding: ``"SAME"`` (default), ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``.
    kernel_dilation: int or ``(dh, dw)`` (default 1): spacing of the data samples.
    feature_group_count: groups of input channels, each with its own scope slice (default 1).
    use_bias: whether to add a bias (default True).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the matrix products (``jax.lax.Precision``).
    kernel_init: initialiser of the scope ``kernel [Sh, Sw, C // feature_group_count, features]``
      (its fan-in counts the whole scope).
    bias_init: initialiser of ``bias`` ``[features]``.
    scope_size: int or ``(Sh, Sw)``, at least ``kernel_size`` (default: ``kernel_size``).
    implementation: ``None`` or ``"xla"``; ``"ffi"`` raises, as there is no native Deformable
      Kernels kernel (see :func:`flaxdcn.deformable_kernel_conv2d`).

  References:
    - Gao et al., `Deformable Kernels: Adapting Effective Receptive Fields for Object
      Deformation <https://arxiv.org/abs/1910.02940>`_, ICLR 2020.
  """

  local = True
