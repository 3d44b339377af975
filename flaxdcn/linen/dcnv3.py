"""Flax linen modules of DCNv3 (InternImage) and DCNv4 (FlashInternImage)."""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike

from flaxdcn.linen._common import flatten_batch
from flaxdcn.ops.dcnv3 import dcnv3, dcnv4

Array = jax.Array

#: InternImage initialises ``input_proj`` / ``value_proj`` and ``output_proj`` with
#: ``xavier_uniform_`` and zero biases.
default_kernel_init = nn.initializers.xavier_uniform()


def _num_points(kernel_size: int, remove_center: bool) -> int:
  return kernel_size * kernel_size - int(remove_center)


def center_feature_scale(module: nn.Module, query: Array, x: Array, x_proj: Array,
                         groups: int) -> Array:
  """``x * (1 - s) + x_proj * s`` with ``s = sigmoid(query @ W.T + b)`` per group, each group's
  value shared by its ``C // G`` channels. ``W [G, C]`` and ``b [G]`` are InternImage's
  ``center_feature_scale_proj_weight`` / ``_bias`` (torch layout), zero-initialised."""
  channels = query.shape[-1]
  weight = module.param("center_feature_scale_proj_weight", nn.initializers.zeros_init(),
                        (groups, channels), module.param_dtype)
  bias = module.param("center_feature_scale_proj_bias", nn.initializers.zeros_init(),
                      (groups,), module.param_dtype)
  query, weight, bias = promote_dtype(query, weight, bias, dtype=module.dtype)
  scale = jax.nn.sigmoid(jnp.einsum("...c,gc->...g", query, weight, precision=module.precision)
                         + bias)
  scale = jnp.repeat(scale, x.shape[-1] // groups, axis=-1).astype(x.dtype)
  return x * (1 - scale) + x_proj * scale


class DCNv3(nn.Module):
  """DCNv3, the operator of InternImage (``ops_dcnv3.modules.DCNv3``), channels last.

  ``input_proj`` (a linear layer) gives the sampled values; a depthwise ``dw_kernel_size`` conv
  ``dw_conv``, a LayerNorm ``dw_norm`` (eps 1e-6) and an exact GELU feed the zero-initialised
  linears ``offset`` and ``mask``; the mask is a softmax over the ``P`` points of each group;
  then :func:`flaxdcn.dcnv3` and ``output_proj``. With zero offset and mask weights the layer
  starts as a ``kernel_size`` box filter (weights ``1 / P``) between the two projections.

  Parameter names mirror the PyTorch attribute names (``dw_conv.0`` is ``dw_conv`` here and
  ``dw_conv.1.1`` is ``dw_norm``): see :func:`flaxdcn.convert.dcnv3_params_from_torch`.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> layer = flaxdcn.DCNv3(kernel_size=3, group_count=4)
    >>> x = jnp.ones((2, 9, 9, 16))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables["params"])  # doctest: +NORMALIZE_WHITESPACE
    {'dw_conv': {'bias': (16,), 'kernel': (3, 3, 1, 16)},
     'dw_norm': {'bias': (16,), 'scale': (16,)},
     'input_proj': {'bias': (16,), 'kernel': (16, 16)},
     'mask': {'bias': (36,), 'kernel': (16, 36)},
     'offset': {'bias': (72,), 'kernel': (16, 72)},
     'output_proj': {'bias': (16,), 'kernel': (16, 16)}}
    >>> layer.apply(variables, x).shape
    (2, 9, 9, 16)

  Attributes:
    kernel_size: the sampling kernel ``k`` (``k x k``, InternImage's ``kernel_size``).
    strides: stride of the sampling (InternImage's ``stride``). The offsets are predicted at the
      input resolution, so the output must keep it.
    padding: padding of the sampling (InternImage's ``pad``; any :func:`flaxdcn.dcnv3` form).
    kernel_dilation: dilation of the sampling kernel (InternImage's ``dilation``).
    group_count: ``G`` (InternImage's ``group``); the channels must be divisible by it.
    offset_scale: scale of the kernel grid and offsets around the kernel centre.
    dw_kernel_size: kernel of the depthwise conv (None: ``kernel_size``).
    center_feature_scale: blend the output with ``input_proj``'s by a learned sigmoid gate
      per group, computed from the depthwise branch.
    remove_center: sample without the kernel centre (odd ``kernel_size``).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters.
    precision: precision of the linear layers and the depthwise conv.
    kernel_init: initialiser of the ``input_proj`` / ``output_proj`` kernels.
    bias_init: initialiser of their biases.
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.dcnv3`).
    deterministic_backward: bitwise-reproducible native CUDA backward.

  References:
    - Wang et al., `InternImage: Exploring Large-Scale Vision Foundation Models with Deformable
      Convolutions <https://arxiv.org/abs/2211.05778>`_, CVPR 2023.
  """

  kernel_size: int = 3
  strides: int | tuple[int, int] = 1
  padding: PaddingLike = 1
  kernel_dilation: int | tuple[int, int] = 1
  group_count: int = 4
  offset_scale: float = 1.0
  dw_kernel_size: int | None = None
  center_feature_scale: bool = False
  remove_center: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  implementation: str | None = None
  deterministic_backward: bool = False

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Applies DCNv3.

    Args:
      inputs: ``[*batch, H, W, C]``, channels last (batch dimensions are flattened into one).

    Returns:
      ``[*batch, H, W, C]``. The offsets ``[.., G * P * 2]`` and the mask after the softmax
      ``[.., G * P]`` are sown into ``"intermediates"`` as ``"offsets"`` and ``"softmax_mask"``
      (``"mask"`` names the linear layer).
    """
    inputs, batch_shape = flatten_batch(self, inputs)
    channels = inputs.shape[-1]
    groups, points = self.group_count, _num_points(self.kernel_size, self.remove_center)
    dense = lambda features, name, **kw: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        name=name, **kw)
    x = dense(channels, "input_proj", kernel_init=self.kernel_init,
              bias_init=self.bias_init)(inputs)
    x_proj = x
    dw = self.kernel_size if self.dw_kernel_size is None else self.dw_kernel_size
    x1 = nn.Conv(channels, (dw, dw), padding=(dw - 1) // 2, feature_group_count=channels,
                 dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                 name="dw_conv")(inputs)
    x1 = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="dw_norm")(x1)
    x1 = nn.gelu(x1, approximate=False)
    zeros = nn.initializers.zeros_init()
    offsets = dense(groups * points * 2, "offset", kernel_init=zeros, bias_init=zeros)(x1)
    logits = dense(groups * points, "mask", kernel_init=zeros, bias_init=zeros)(x1)
    mask = jax.nn.softmax(logits.reshape(logits.shape[:-1] + (groups, points)), axis=-1)
    mask = mask.reshape(logits.shape)
    self.sow("intermediates", "offsets", offsets.reshape(batch_shape + offsets.shape[1:]))
    self.sow("intermediates", "softmax_mask", mask.reshape(batch_shape + mask.shape[1:]))
    x = dcnv3(x, offsets.astype(x.dtype), mask.astype(x.dtype), kernel_size=self.kernel_size,
              strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
              group_count=groups, offset_scale=self.offset_scale,
              remove_center=self.remove_center, implementation=self.implementation,
              deterministic_backward=self.deterministic_backward)
    if self.center_feature_scale:
      x = center_feature_scale(self, x1, x, x_proj, groups)
    x = dense(channels, "output_proj", kernel_init=self.kernel_init,
              bias_init=self.bias_init)(x)
    return x.reshape(batch_shape + x.shape[1:])


class DCNv4(nn.Module):
  """DCNv4, the operator of FlashInternImage (``DCNv4.modules.DCNv4``), channels last.

  ``value_proj`` (a linear layer) gives the sampled values; the zero-initialised linear
  ``offset_mask`` of width ``D`` (``G * P * 3`` rounded up to a multiple of 8), on the input or
  on the depthwise conv ``offset_mask_dw`` of it, gives offsets and mask in
  :func:`flaxdcn.dcnv4`'s layout, used without softmax; then the op and ``output_proj``. At
  initialisation the mask is 0, so the layer outputs ``output_proj``'s bias.

  Parameter names mirror the PyTorch attribute names: see
  :func:`flaxdcn.convert.dcnv4_params_from_torch`.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> layer = flaxdcn.DCNv4(kernel_size=3, group_count=4, dw_kernel_size=3)
    >>> x = jnp.ones((2, 9, 9, 16))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables["params"])  # doctest: +NORMALIZE_WHITESPACE
    {'offset_mask': {'bias': (112,), 'kernel': (16, 112)},
     'offset_mask_dw': {'bias': (16,), 'kernel': (3, 3, 1, 16)},
     'output_proj': {'bias': (16,), 'kernel': (16, 16)},
     'value_proj': {'bias': (16,), 'kernel': (16, 16)}}
    >>> layer.apply(variables, x).shape
    (2, 9, 9, 16)

  Attributes:
    kernel_size: the sampling kernel ``k`` (``k x k``).
    strides: stride of the sampling; the output must keep the input resolution.
    padding: padding of the sampling (DCNv4's ``pad``).
    kernel_dilation: dilation of the sampling kernel.
    group_count: ``G`` (DCNv4's ``group``).
    offset_scale: scale of the kernel grid and offsets around the kernel centre.
    dw_kernel_size: kernel of the depthwise conv ``offset_mask_dw`` before ``offset_mask``
      (None: no depthwise conv, as in DCNv4).
    center_feature_scale: blend the op's output with ``value_proj``'s by a learned sigmoid gate
      per group, computed from the op's output (as DCNv4 does).
    remove_center: sample without the kernel centre (odd ``kernel_size``).
    output_bias: whether ``output_proj`` has a bias.
    without_pointwise: no ``value_proj`` / ``output_proj``: the op alone, with its offset head.
    dtype: the dtype of the computation.
    param_dtype: the dtype of the parameters.
    precision: precision of the linear layers and the depthwise conv.
    kernel_init: initialiser of the ``value_proj`` / ``output_proj`` kernels.
    bias_init: initialiser of their biases.
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.dcnv4`).
    deterministic_backward: bitwise-reproducible native CUDA backward.

  References:
    - Xiong et al., `Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for
      Vision Applications <https://arxiv.org/abs/2401.06197>`_, CVPR 2024.
    - Wang et al., `InternImage: Exploring Large-Scale Vision Foundation Models with Deformable
      Convolutions <https://arxiv.org/abs/2211.05778>`_, CVPR 2023.
  """

  kernel_size: int = 3
  strides: int | tuple[int, int] = 1
  padding: PaddingLike = 1
  kernel_dilation: int | tuple[int, int] = 1
  group_count: int = 4
  offset_scale: float = 1.0
  dw_kernel_size: int | None = None
  center_feature_scale: bool = False
  remove_center: bool = False
  output_bias: bool = True
  without_pointwise: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  implementation: str | None = None
  deterministic_backward: bool = False

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Applies DCNv4.

    Args:
      inputs: ``[*batch, H, W, C]``, channels last (batch dimensions are flattened into one).

    Returns:
      ``[*batch, H, W, C]``. The predicted ``offset_mask`` ``[.., D]`` is sown into
      ``"intermediates"`` as ``"predicted_offset_mask"`` (``"offset_mask"`` names the linear
      layer).
    """
    inputs, batch_shape = flatten_batch(self, inputs)
    channels = inputs.shape[-1]
    groups, points = self.group_count, _num_points(self.kernel_size, self.remove_center)
    width = -(-groups * points * 3 // 8) * 8
    dense = lambda features, name, **kw: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        name=name, **kw)
    x = inputs
    if not self.without_pointwise:
      x = dense(channels, "value_proj", kernel_init=self.kernel_init,
                bias_init=self.bias_init)(x)
    head_in = inputs
    if self.dw_kernel_size is not None:
      dw = self.dw_kernel_size
      head_in = nn.Conv(channels, (dw, dw), padding=(dw - 1) // 2, feature_group_count=channels,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        precision=self.precision, name="offset_mask_dw")(inputs)
    zeros = nn.initializers.zeros_init()
    offset_mask = dense(width, "offset_mask", kernel_init=zeros, bias_init=zeros)(head_in)
    self.sow("intermediates", "predicted_offset_mask",
             offset_mask.reshape(batch_shape + offset_mask.shape[1:]))
    x_proj = x
    x = dcnv4(x, offset_mask.astype(x.dtype), kernel_size=self.kernel_size,
              strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
              group_count=groups, offset_scale=self.offset_scale,
              remove_center=self.remove_center, implementation=self.implementation,
              deterministic_backward=self.deterministic_backward)
    if self.center_feature_scale:
      x = center_feature_scale(self, x, x, x_proj, groups)
    if not self.without_pointwise:
      x = dense(channels, "output_proj", kernel_init=self.kernel_init,
                bias_init=self.bias_init, use_bias=self.output_bias)(x)
    return x.reshape(batch_shape + x.shape[1:])
