"""Flax NNX module of multi-scale deformable attention: the twin of :class:`flaxdcn.MSDeformAttn`,
parameter for parameter."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, PrecisionLike

from flaxdcn._geometry import compute_dtype
from flaxdcn._module_common import (msda_check_heads, msda_check_inputs, msda_offset_grid_init,
                                    msda_sampling_locations)
from flaxdcn.nnx._common import sow
from flaxdcn.ops.ms_deform_attn import ms_deform_attn

Array = jax.Array


class MSDeformAttn(nnx.Module):
  """Multi-scale deformable attention, the NNX twin of :class:`flaxdcn.MSDeformAttn`
  (Deformable DETR's ``MSDeformAttn``, ``d_model = in_features``).

  The ``nnx.Linear`` layers ``sampling_offsets``, ``attention_weights``, ``value_proj`` and
  ``output_proj`` hold the linen module's parameters leaf for leaf, with Deformable DETR's
  initialisation (see :class:`flaxdcn.MSDeformAttn`); :func:`flaxdcn.nnx.load_linen_params`
  loads a linen tree or :func:`flaxdcn.convert.msda_params_from_torch`'s.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn.nnx
    >>> layer = flaxdcn.nnx.MSDeformAttn(32, num_heads=4, num_levels=2, num_points=3,
    ...                                  rngs=nnx.Rngs(0))
    >>> sorted(flaxdcn.nnx.linen_params(layer))
    ['attention_weights', 'output_proj', 'sampling_offsets', 'value_proj']
    >>> shapes = ((8, 6), (4, 3))
    >>> query, inputs = jnp.ones((2, 5, 32)), jnp.ones((2, 60, 32))
    >>> boxes = jnp.tile(jnp.array([0.5, 0.5, 0.2, 0.3]), (2, 5, 2, 1))  # (cx, cy, w, h)
    >>> y, intermediates = nnx.capture(layer, nnx.Intermediate)(query, boxes, inputs, shapes)
    >>> y.shape, intermediates["softmax_attention_weights"][0].shape
    ((2, 5, 32), (2, 5, 4, 2, 3))

  Args:
    in_features: the channels ``C`` of the query, the input and the output (Deformable DETR's
      ``d_model``); divisible by ``num_heads``.
    num_heads: the heads ``M`` (default 8).
    num_levels: the feature levels ``L`` (default 4).
    num_points: the sampling points ``P`` per head and level (default 4).
    dtype: the dtype of the computation (default: inferred from inputs and params).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the four linear layers.
    implementation: ``None``, ``"xla"`` or ``"ffi"``, as in :func:`flaxdcn.ms_deform_attn`.
    deterministic_backward: bitwise-reproducible native CUDA backward.
    rngs: the random number generators of the parameter initialisers.

  References:
    Zhu, Su, Lu, Li, Wang, Dai. *Deformable DETR: Deformable Transformers for End-to-End Object
    Detection*. ICLR 2021. https://arxiv.org/abs/2010.04159
  """

  def __init__(self, in_features: int, *, num_heads: int = 8, num_levels: int = 4,
               num_points: int = 4, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
               implementation: str | None = None, deterministic_backward: bool = False,
               rngs: nnx.Rngs):
    msda_check_heads(self, in_features, num_heads, "in_features")
    samples = num_heads * num_levels * num_points
    linear = functools.partial(nnx.Linear, in_features, dtype=dtype, param_dtype=param_dtype,
                               precision=precision, rngs=rngs)
    zeros = nnx.initializers.zeros_init()
    xavier = nnx.initializers.xavier_uniform()
    self.sampling_offsets = linear(
        samples * 2, kernel_init=zeros,
        bias_init=msda_offset_grid_init(num_heads, num_levels, num_points))
    self.attention_weights = linear(samples, kernel_init=zeros, bias_init=zeros)
    self.value_proj = linear(in_features, kernel_init=xavier, bias_init=zeros)
    self.output_proj = linear(in_features, kernel_init=xavier, bias_init=zeros)
    self.in_features = in_features
    self.num_heads = num_heads
    self.num_levels = num_levels
    self.num_points = num_points
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.implementation = implementation
    self.deterministic_backward = deterministic_backward

  def __call__(self, query: Array, reference_points: Array, input_flatten: Array,
               spatial_shapes: Any, input_padding_mask: Array | None = None) -> Array:
    """``[N, Lq, C]`` as :meth:`flaxdcn.MSDeformAttn.__call__`; sows ``"sampling_locations"``
    and ``"softmax_attention_weights"`` under ``nnx.capture(..., nnx.Intermediate)``."""
    m, levels, points = self.num_heads, self.num_levels, self.num_points
    channels = self.in_features
    shapes = msda_check_inputs(self, query, reference_points, input_flatten, spatial_shapes,
                               input_padding_mask, levels, channels)
    n, lq, _ = query.shape
    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
      value = jnp.where(jnp.asarray(input_padding_mask, bool)[..., None], 0, value)
    value = value.reshape(n, -1, m, channels // m)
    offsets = self.sampling_offsets(query)
    logits = self.attention_weights(query)
    cdt = compute_dtype(value.dtype)
    weights = jax.nn.softmax(logits.reshape(n, lq, m, levels * points).astype(cdt), axis=-1)
    weights = weights.reshape(n, lq, m, levels, points)
    locations = msda_sampling_locations(
        reference_points, offsets.reshape(n, lq, m, levels, points, 2), shapes, points, cdt)
    sow(self, "sampling_locations", locations)
    sow(self, "softmax_attention_weights", weights)
    out = ms_deform_attn(value, shapes, locations, weights.astype(value.dtype),
                         implementation=self.implementation,
                         deterministic_backward=self.deterministic_backward)
    return self.output_proj(out)
