"""Multi-scale deformable attention (Deformable DETR): the public function, its argument checks
and the dispatch between the native kernels (:mod:`flaxdcn._ffi`) and the pure-jnp
implementation (:mod:`flaxdcn.ops._xla_ms_deform_attn`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flaxdcn import _ffi
from flaxdcn._geometry import (MsDeformAttnGeometry, check_implementation, compute_dtype,
                               result_dtype, shape_error)
from flaxdcn.ops import _xla_ms_deform_attn

_FN = "ms_deform_attn"


def ms_deform_attn(
    value: jax.Array,
    spatial_shapes: Any,
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    implementation: str | None = None,
    deterministic_backward: bool = False,
) -> jax.Array:
  r"""Multi-scale deformable attention (Deformable DETR's ``MSDeformAttnFunction``).

  .. math::
     y_{q m} = \sum_{l, p} A_{q m l p} \, v^{(l)}_m(\phi_l(x_{q m l p}))

  Every head ``m`` of query ``q`` reads ``P`` bilinear samples on each of ``L`` feature maps
  (levels) and sums them, weighted by its attention weights.

  Shapes use these letters: ``N`` batch, ``Lq`` queries, ``M`` heads, ``D`` channels per head,
  ``L`` levels of sizes ``(H_l, W_l)``, ``S = sum_l H_l * W_l`` value rows, ``P`` points per head
  and level.

  ``value`` holds the levels one after another, each flattened row-major::

    value[n, level_start_index[l] + h * W_l + w, m, :]   is pixel (h, w) of level l, head m
    level_start_index[l] = sum_{k < l} H_k * W_k          (derived from spatial_shapes)

  Location ``(x, y)`` in ``[0, 1]`` on level ``l`` (``(0, 0)`` the top-left corner of the map,
  ``(1, 1)`` the bottom-right one) is read at pixel coordinates::

    w = x * W_l - 0.5        h = y * H_l - 0.5

  by bilinear interpolation with zero padding: each of the four neighbouring pixels contributes
  only if it lies inside the map, so a sample with ``h <= -1``, ``h >= H_l``, ``w <= -1`` or
  ``w >= W_l`` contributes 0. This is ``torch.nn.functional.grid_sample(mode="bilinear",
  padding_mode="zeros", align_corners=False)`` on ``2 * (x, y) - 1``, i.e. Deformable DETR's
  ``ms_deform_attn_core_pytorch``. A location that is not finite contributes 0, and its
  gradients (and its attention weight's) are 0. Where a coordinate is exactly an integer, the
  gradient is that of the cell ``[floor(h), floor(h) + 1]`` (``[floor(w), floor(w) + 1]``) it
  lies in: the convention of Deformable DETR's CUDA kernels and of the DCN ops.

  Example usage::

    >>> import jax.numpy as jnp
    >>> import flaxdcn
    >>> shapes = ((4, 6), (2, 3))                      # L = 2 levels, S = 24 + 6 = 30
    >>> value = jnp.ones((2, 30, 8, 16))               # N = 2, M = 8 heads, D = 16
    >>> locations = jnp.full((2, 5, 8, 2, 3, 2), 0.5)  # Lq = 5 queries, P = 3 points
    >>> weights = jnp.full((2, 5, 8, 2, 3), 1 / 6)     # sum to 1 over L * P
    >>> y = flaxdcn.ms_deform_attn(value, shapes, locations, weights)
    >>> y.shape
    (2, 5, 128)
    >>> round(float(y[0, 0, 0]), 6)
    1.0

  Args:
    value: ``[N, S, M, D]``.
    spatial_shapes: the ``L`` pairs ``(H_l, W_l)`` as static Python ints: a tuple or list of
      pairs, or an integer numpy array ``[L, 2]`` (a traced array is an error: the sizes fix the
      shapes of the computation).
    sampling_locations: ``[N, Lq, M, L, P, 2]``, ``(x, y)`` normalised to ``[0, 1]`` on each
      level. Any floating dtype: read in the compute dtype (float32; float64 for a float64
      ``value``), not rounded to a half ``value`` dtype.
    attention_weights: ``[N, Lq, M, L, P]``, used as given (Deformable DETR applies a softmax
      over ``L * P`` before the op).
    implementation: ``None`` (the native kernels where they were built for the platform, else
      ``"xla"``), ``"xla"`` (pure jnp) or ``"ffi"`` (native; an error where it is not built).
    deterministic_backward: make the native CUDA backward bitwise reproducible (no float
      atomics; slower). The native CPU kernels are always deterministic; the ``"xla"``
      implementation follows XLA's own ``--xla_gpu_deterministic_ops``.

  Returns:
    ``[N, Lq, M * D]`` (heads then channels) in the promoted dtype of ``value`` and
    ``attention_weights``. Coordinates and sums are float32 (float64 for float64).

  Raises:
    ValueError: a wrong rank, ``N``, ``Lq``, ``M``, ``L`` or ``P`` that disagree between the
      arguments, ``spatial_shapes`` that are not ``L >= 1`` positive pairs or whose
      ``sum H_l * W_l`` is not ``S``.
    TypeError: a non-floating array argument, or ``spatial_shapes`` that are traced or not
      integers.

  References:
    Zhu, Su, Lu, Li, Wang, Dai. *Deformable DETR: Deformable Transformers for End-to-End Object
    Detection*. ICLR 2021. https://arxiv.org/abs/2010.04159
  """
  check_implementation(implementation, fn=_FN)
  dtype = result_dtype(_FN, value=value, attention_weights=attention_weights)
  result_dtype(_FN, sampling_locations=sampling_locations)
  geometry = MsDeformAttnGeometry.create(spatial_shapes, fn=_FN)
  _check_shapes(value, sampling_locations, attention_weights, geometry)
  n, s, m, d = jnp.shape(value)
  lq = jnp.shape(sampling_locations)[1]
  points = jnp.shape(sampling_locations)[4]
  if 0 in (n, lq, m, d, points):
    return jnp.zeros((n, lq, m * d), dtype)
  value = jnp.asarray(value, dtype)
  attention_weights = jnp.asarray(attention_weights, dtype)
  sampling_locations = jnp.asarray(sampling_locations, compute_dtype(dtype))
  if implementation == "xla":
    out = _xla_ms_deform_attn.ms_deform_attn(value, sampling_locations, attention_weights,
                                             geometry)
  else:
    fallback = _xla_ms_deform_attn.ms_deform_attn if implementation is None else None
    out = _ffi.ms_deform_attn(value, sampling_locations, attention_weights, geometry,
                              deterministic_backward=deterministic_backward, fallback=fallback)
  return out.reshape(n, lq, m * d)


# --- Checks --------------------------------------------------------------------------------------

def _check_shapes(value, sampling_locations, attention_weights,
                  geometry: MsDeformAttnGeometry) -> None:
  if jnp.ndim(value) != 4:
    raise shape_error(_FN, "value", jnp.shape(value), "[N, S, M, D] (rank 4)")
  n, s, m, d = jnp.shape(value)
  shapes = geometry.spatial_shapes
  if s != geometry.num_values:
    terms = " + ".join(f"{h}*{w}" for h, w in shapes)
    raise ValueError(f"{_FN}: value has shape {tuple(jnp.shape(value))} with S={s} rows, but "
                     f"spatial_shapes {shapes} hold {terms} = {geometry.num_values}.")
  loc_shape = tuple(jnp.shape(sampling_locations))
  if len(loc_shape) != 6 or loc_shape[-1] != 2:
    raise shape_error(_FN, "sampling_locations", loc_shape, "[N, Lq, M, L, P, 2] (rank 6)")
  levels = geometry.num_levels
  if loc_shape[3] != levels:
    raise ValueError(f"{_FN}: sampling_locations has shape {loc_shape} with L={loc_shape[3]} "
                     f"levels, but spatial_shapes has {levels}: {shapes}.")
  lq, points = loc_shape[1], loc_shape[4]
  expected = (n, lq, m, levels, points, 2)
  if loc_shape != expected:
    raise shape_error(_FN, "sampling_locations", loc_shape, str(expected),
                      f"[N, Lq, M, L, P, 2] with N={n}, M={m} from value {tuple(jnp.shape(value))}")
  w_shape = tuple(jnp.shape(attention_weights))
  if w_shape != expected[:-1]:
    raise shape_error(_FN, "attention_weights", w_shape, str(expected[:-1]),
                      f"[N, Lq, M, L, P] as sampling_locations {loc_shape}")
