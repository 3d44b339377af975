"""Flax NNX modules for Deformable Kernels (Gao et al., 2019): global and local DK."""

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
from flaxdcn.ops.deformable_kernel import deformable_kernel_conv2d

Array = jax.Array

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class _DeformableKernelBase(nnx.Module):
  """Shared constructor and forward pass of :class:`GlobalDeformableKernel` and
  :class:`LocalDeformableKernel`; ``local`` chooses the zero-initialised offset head (a conv
  with the main geometry, or a global average pool and a linear layer)."""

  local = False

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
      scope_size: int | Sequence[int] | None = None,
      implementation: str | None = None,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      rngs: nnx.Rngs,
  ):
    kernel_size = spatial_pair(self, kernel_size, "kernel_size")
    scope_size = (kernel_size if scope_size is None
                  else spatial_pair(self, scope_size, "scope_size"))
    if scope_size[0] < kernel_size[0] or scope_size[1] < kernel_size[1]:
      raise ValueError(f"{type(self).__name__}: scope_size {scope_size} must be at least "
                       f"kernel_size {kernel_size} on both axes.")
    self.kernel, self.bias = kernel_and_bias(
        self, scope_size, in_features, out_features, feature_group_count=feature_group_count,
        use_bias=use_bias, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
        kernel_metadata=kernel_metadata, bias_metadata=bias_metadata, rngs=rngs)
    zeros = nnx.initializers.zeros_init()
    head = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=zeros,
                bias_init=zeros, rngs=rngs)
    num_offsets = kernel_size[0] * kernel_size[1] * 2
    if self.local:
      self.conv_offset = nnx.Conv(in_features, num_offsets, kernel_size, strides,
                                  padding=padding, kernel_dilation=kernel_dilation, **head)
    else:
      self.fc_offset = nnx.Linear(in_features, num_offsets, **head)

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
    self.scope_size = scope_size
    self.implementation = implementation
    self.promote_dtype = promote_dtype

  def __call__(self, inputs: Array) -> Array:
    """Applies the Deformable Kernels convolution.

    Args:
      inputs: ``[*batch, H, W, in_features]``, channels last. Batch dimensions are flattened
        into one (none at all is allowed, as in ``flax.nnx.Conv``).

    Returns:
      ``[*batch, Ho, Wo, out_features]``. Under ``nnx.capture(..., nnx.Intermediate)`` the
      predicted offsets (``[*batch, kh * kw * 2]`` global, ``[*batch, Ho, Wo, kh * kw * 2]``
      local) are sown as ``"offsets"``.
    """
    check_channels(self, inputs, self.in_features)
    inputs, batch_shape = flatten_batch(self, inputs)
    if self.local:
      offsets = self.conv_offset(inputs)
    else:
      offsets = self.fc_offset(jnp.mean(inputs, axis=(1, 2)))
    sow(self, "offsets", offsets.reshape(batch_shape + offsets.shape[1:]))

    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    y = deformable_kernel_conv2d(
        inputs, offsets.astype(inputs.dtype), kernel, bias, kernel_size=self.kernel_size,
        strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, precision=self.precision,
        implementation=self.implementation)
    return y.reshape(batch_shape + y.shape[1:])


class GlobalDeformableKernel(_DeformableKernelBase):
  """Global Deformable Kernels: one kernel per image, resampled from a larger scope; the NNX
  twin of :class:`flaxdcn.GlobalDeformableKernel`.

  The offsets ``[N, kh * kw * 2]`` come from a global average pool of the input and a
  zero-initialised ``nnx.Linear`` ``fc_offset`` (no non-linearity, as in the paper), so at
  initialisation every image uses the centred ``kernel_size`` crop of the scope ``kernel``: the
  layer equals ``flax.nnx.Conv`` with that crop and the same ``bias`` (see
  :func:`flaxdcn.deformable_kernel_conv2d` for the half-integer centre of an odd margin).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn.nnx
    >>> layer = flaxdcn.nnx.GlobalDeformableKernel(4, 8, (3, 3), scope_size=(5, 5),
    ...                                            rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, flaxdcn.nnx.linen_params(layer))
    {'bias': (8,), 'fc_offset': {'bias': (18,), 'kernel': (4, 18)}, 'kernel': (5, 5, 4, 8)}
    >>> layer(jnp.ones((2, 16, 16, 4))).shape
    (2, 16, 16, 8)

  Args:
    in_features: number of input channels ``C``.
    out_features: number of output channels.
    kernel_size: int or ``(kh, kw)``: the size of the resampled kernel.
    strides: int or ``(sh, sw)`` (default 1).
    padding: ``"SAME"`` (default), ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``.
    kernel_dilation: int or ``(dh, dw)`` (default 1): spacing of the data samples.
    feature_group_count: groups of input channels, each with its own scope slice (default 1).
    use_bias: whether to add a bias (default True).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the matrix products (``jax.lax.Precision``).
    kernel_init: initialiser of the scope ``kernel [Sh, Sw, C // feature_group_count,
      out_features]`` (its fan-in counts the whole scope).
    bias_init: initialiser of ``bias`` ``[out_features]``.
    scope_size: int or ``(Sh, Sw)``, at least ``kernel_size`` (default: ``kernel_size``).
    implementation: ``None`` or ``"xla"``; ``"ffi"`` raises, as there is no native Deformable
      Kernels kernel (see :func:`flaxdcn.deformable_kernel_conv2d`).
    promote_dtype: function to promote ``(inputs, kernel, bias)`` to one dtype, as in
      ``flax.nnx.Conv``.
    kernel_metadata: metadata of the scope ``kernel`` ``nnx.Param`` (the offset head carries
      none).
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    rngs: the random number generators of the parameter initialisers.

  References:
    - Gao et al., `Deformable Kernels: Adapting Effective Receptive Fields for Object
      Deformation <https://arxiv.org/abs/1910.02940>`_, ICLR 2020.
  """


class LocalDeformableKernel(_DeformableKernelBase):
  """Local Deformable Kernels: one kernel per output position, resampled from a larger scope;
  the NNX twin of :class:`flaxdcn.LocalDeformableKernel`.

  A zero-initialised ``nnx.Conv`` ``conv_offset`` with the main convolution's geometry predicts
  offsets ``[N, Ho, Wo, kh * kw * 2]`` from the same input, so at initialisation the layer
  equals ``flax.nnx.Conv`` with the centred ``kernel_size`` crop of the scope ``kernel`` and the
  same ``bias``. One ``(dy, dx)`` per kernel point is shared by all channels.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn.nnx
    >>> layer = flaxdcn.nnx.LocalDeformableKernel(4, 8, (3, 3), scope_size=(5, 5),
    ...                                           feature_group_count=2, rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, flaxdcn.nnx.linen_params(layer))
    {'bias': (8,), 'conv_offset': {'bias': (18,), 'kernel': (3, 3, 4, 18)}, 'kernel': (5, 5, 2, 8)}
    >>> layer(jnp.ones((2, 16, 16, 4))).shape
    (2, 16, 16, 8)

  Args:
    in_features: number of input channels ``C``.
    out_features: number of output channels.
    kernel_size: int or ``(kh, kw)``: the size of the resampled kernel.
    strides: int or ``(sh, sw)`` (default 1).
    padding: ``"SAME"`` (default), ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``.
    kernel_dilation: int or ``(dh, dw)`` (default 1): spacing of the data samples.
    feature_group_count: groups of input channels, each with its own scope slice (default 1).
    use_bias: whether to add a bias (default True).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the matrix products (``jax.lax.Precision``).
    kernel_init: initialiser of the scope ``kernel [Sh, Sw, C // feature_group_count,
      out_features]`` (its fan-in counts the whole scope).
    bias_init: initialiser of ``bias`` ``[out_features]``.
    scope_size: int or ``(Sh, Sw)``, at least ``kernel_size`` (default: ``kernel_size``).
    implementation: ``None`` or ``"xla"``; ``"ffi"`` raises, as there is no native Deformable
      Kernels kernel (see :func:`flaxdcn.deformable_kernel_conv2d`).
    promote_dtype: function to promote ``(inputs, kernel, bias)`` to one dtype, as in
      ``flax.nnx.Conv``.
    kernel_metadata: metadata of the scope ``kernel`` ``nnx.Param`` (the offset head carries
      none).
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    rngs: the random number generators of the parameter initialisers.

  References:
    - Gao et al., `Deformable Kernels: Adapting Effective Receptive Fields for Object
      Deformation <https://arxiv.org/abs/1910.02940>`_, ICLR 2020.
  """

  local = True
