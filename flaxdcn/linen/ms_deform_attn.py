"""Flax linen module of multi-scale deformable attention (Deformable DETR's ``MSDeformAttn``)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike

from flaxdcn._geometry import compute_dtype
from flaxdcn._module_common import (msda_check_heads, msda_check_inputs, msda_offset_grid_init,
                                    msda_sampling_locations)
from flaxdcn.ops.ms_deform_attn import ms_deform_attn

Array = jax.Array


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention, Deformable DETR's ``MSDeformAttn`` module.

  A thin shell around :func:`flaxdcn.ms_deform_attn`: ``value_proj`` projects the flattened
  feature maps (padding positions zeroed), the linear layers ``sampling_offsets`` and
  ``attention_weights`` read each query's ``P`` offsets per head and level and its attention
  weights (a softmax over the ``L * P`` samples of each head), the op samples and sums, and
  ``output_proj`` projects the heads back to ``C`` channels.

  Offsets are in pixels of each level: with 2-d reference points ``(x, y)`` in ``[0, 1]`` the
  location is ``reference + offset / (W_l, H_l)``; with 4-d reference boxes ``(cx, cy, w, h)`` it
  is ``(cx, cy) + offset / P * (w, h) / 2``, so the initial offsets (below) span the box.

  Parameters and initialisation are Deformable DETR's (``_reset_parameters``), named after its
  attributes (also mmcv's ``MultiScaleDeformableAttention``'s; see
  :func:`flaxdcn.convert.msda_params_from_torch`): ``sampling_offsets`` (kernel
  ``[C, M * L * P * 2]`` in torch's ``(m, l, p, (x, y))`` order, zero; bias the direction grid:
  head ``m`` points along the angle ``2 pi m / M``, scaled so that the larger coordinate is 1,
  times ``p + 1`` for point ``p``), ``attention_weights`` (``[C, M * L * P]``, zero kernel and
  bias: uniform attention at first), ``value_proj`` and ``output_proj`` (``[C, C]``,
  Xavier-uniform kernels, zero biases).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> layer = flaxdcn.MSDeformAttn(num_heads=4, num_levels=2, num_points=3)
    >>> shapes = ((8, 6), (4, 3))                       # S = 48 + 12 = 60
    >>> query = jnp.ones((2, 5, 32))                    # N = 2, Lq = 5, C = 32
    >>> reference_points = jnp.full((2, 5, 2, 2), 0.5)  # (x, y) per level
    >>> inputs = jnp.ones((2, 60, 32))
    >>> variables = layer.init(jax.random.key(0), query, reference_points, inputs, shapes)
    >>> jax.tree.map(jnp.shape, variables["params"])  # doctest: +NORMALIZE_WHITESPACE
    {'attention_weights': {'bias': (24,), 'kernel': (32, 24)},
     'output_proj': {'bias': (32,), 'kernel': (32, 32)},
     'sampling_offsets': {'bias': (48,), 'kernel': (32, 48)},
     'value_proj': {'bias': (32,), 'kernel': (32, 32)}}
    >>> y, state = layer.apply(variables, query, reference_points, inputs, shapes,
    ...                        mutable=["intermediates"])
    >>> y.shape
    (2, 5, 32)
    >>> state["intermediates"]["sampling_locations"][0].shape  # [N, Lq, M, L, P, 2]
    (2, 5, 4, 2, 3, 2)

  Attributes:
    num_heads: ``M``; the channels ``C`` must be divisible by it.
    num_levels: ``L``, the feature maps attended to.
    num_points: ``P``, samples per head and level.
    dtype: the dtype of the computation (default: inferred from inputs and params). Sampling
      locations are computed in float32 (float64 for float64) whatever it is.
    param_dtype: the dtype of the parameters.
    precision: precision of the linear layers.
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.ms_deform_attn`).
    deterministic_backward: bitwise-reproducible native CUDA backward.

  References:
    Zhu, Su, Lu, Li, Wang, Dai. *Deformable DETR: Deformable Transformers for End-to-End Object
    Detection*. ICLR 2021. https://arxiv.org/abs/2010.04159
  """

  num_heads: int = 8
  num_levels: int = 4
  num_points: int = 4
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  implementation: str | None = None
  deterministic_backward: bool = False

  @nn.compact
  def __call__(self, query: Array, reference_points: Array, input_flatten: Array,
               spatial_shapes: Any, input_padding_mask: Array | None = None) -> Array:
    """Applies multi-scale deformable attention (Deformable DETR's ``MSDeformAttn.forward``).

    Args:
      query: ``[N, Lq, C]``.
      reference_points: ``[N, Lq, L, 2]`` points ``(x, y)`` in ``[0, 1]`` on each level, or
        ``[N, Lq, L, 4]`` boxes ``(cx, cy, w, h)``.
      input_flatten: ``[N, S, C]``, the ``L`` feature maps flattened row-major and
        concatenated in level order (``S = sum_l H_l * W_l``).
      spatial_shapes: the ``L`` static pairs ``(H_l, W_l)`` (see
        :func:`flaxdcn.ms_deform_attn`); Deformable DETR's ``level_start_index`` is derived.
      input_padding_mask: ``[N, S]`` bool, True at padding positions (their values are
        zeroed), or None.

    Returns:
      ``[N, Lq, C]``. The sampling locations ``[N, Lq, M, L, P, 2]`` and the attention weights
      after the softmax ``[N, Lq, M, L, P]`` are sown into ``"intermediates"`` as
      ``"sampling_locations"`` and ``"softmax_attention_weights"`` (``"attention_weights"``
      names the linear layer).
    """
    m, levels, points = self.num_heads, self.num_levels, self.num_points
    channels = jnp.shape(query)[-1]
    head_dim = msda_check_heads(self, channels, m, "the query's channels C")
    shapes = msda_check_inputs(self, query, reference_points, input_flatten, spatial_shapes,
                               input_padding_mask, levels, channels)
    n, lq, _ = query.shape
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              precision=self.precision)
    zeros = nn.initializers.zeros_init()
    xavier = nn.initializers.xavier_uniform()

    value = dense(channels, kernel_init=xavier, bias_init=zeros, name="value_proj")(input_flatten)
    if input_padding_mask is not None:
      value = jnp.where(jnp.asarray(input_padding_mask, bool)[..., None], 0, value)
    value = value.reshape(n, -1, m, head_dim)
    offsets = dense(m * levels * points * 2, kernel_init=zeros,
                    bias_init=msda_offset_grid_init(m, levels, points),
                    name="sampling_offsets")(query)
    logits = dense(m * levels * points, kernel_init=zeros, bias_init=zeros,
                   name="attention_weights")(query)
    cdt = compute_dtype(value.dtype)
    weights = jax.nn.softmax(logits.reshape(n, lq, m, levels * points).astype(cdt), axis=-1)
    weights = weights.reshape(n, lq, m, levels, points)
    locations = msda_sampling_locations(
        reference_points, offsets.reshape(n, lq, m, levels, points, 2), shapes, points, cdt)
    self.sow("intermediates", "sampling_locations", locations)
    self.sow("intermediates", "softmax_attention_weights", weights)
    out = ms_deform_attn(value, shapes, locations, weights.astype(value.dtype),
                         implementation=self.implementation,
                         deterministic_backward=self.deterministic_backward)
    return dense(channels, kernel_init=xavier, bias_init=zeros, name="output_proj")(out)
