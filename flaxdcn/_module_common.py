"""Argument handling shared by the linen and the NNX modules (no framework types)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxdcn._geometry import MsDeformAttnGeometry


def spatial_pair(module: Any, value: Any, name: str) -> tuple[int, int]:
  """``value`` (an int or a pair) as ``(h, w)``; a ValueError naming ``module``'s attribute."""
  pair = (value,) * 2 if isinstance(value, int) else tuple(value)
  if len(pair) != 2:
    raise ValueError(f"{type(module).__name__}: {name} must be an int or a pair, got {value!r}.")
  return pair  # type: ignore[return-value]


def flatten_batch(module: Any, inputs: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  """``[*batch, H, W, C] -> [N, H, W, C]`` and ``batch`` (none at all is allowed, as in
  ``flax.linen.Conv``)."""
  if inputs.ndim < 3:
    raise ValueError(f"{type(module).__name__}: inputs has shape {inputs.shape}, expected "
                     "[*batch, H, W, C].")
  return inputs.reshape((-1,) + inputs.shape[-3:]), inputs.shape[:-3]


# Multi-scale deformable attention (MSDeformAttn, linen and NNX).


def msda_offset_grid(num_heads: int, num_levels: int, num_points: int) -> np.ndarray:
  """Deformable DETR's initial ``sampling_offsets`` bias ``[M * L * P * 2]``, order
  ``(m, l, p, (x, y))``: head ``m`` points along the angle ``2 pi m / M``, the direction scaled
  so that its larger coordinate is 1, and point ``p`` lies ``p + 1`` such steps out (the same on
  every level). Computed in float64."""
  thetas = np.arange(num_heads, dtype=np.float64) * (2 * np.pi / num_heads)
  grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
  grid = grid / np.abs(grid).max(-1, keepdims=True)
  scale = np.arange(1, num_points + 1, dtype=np.float64)[:, None]
  grid = np.broadcast_to(grid[:, None, None, :] * scale, (num_heads, num_levels, num_points, 2))
  return grid.reshape(-1)


def msda_offset_grid_init(num_heads: int, num_levels: int, num_points: int):
  """A Flax initialiser ``(key, shape, dtype) -> array`` of :func:`msda_offset_grid`."""

  def init(key, shape, dtype=jnp.float32):
    del key
    grid = msda_offset_grid(num_heads, num_levels, num_points)
    if tuple(shape) != grid.shape:
      raise ValueError(f"the sampling_offsets bias must have shape {grid.shape}, got {shape}.")
    return jnp.asarray(grid, dtype)

  return init


def msda_check_heads(module: Any, channels: int, num_heads: int, what: str) -> int:
  """``channels // num_heads``; a ValueError quoting both numbers unless it divides."""
  if channels % num_heads:
    raise ValueError(f"{type(module).__name__}: {what}={channels} is not divisible by "
                     f"num_heads={num_heads}.")
  return channels // num_heads


def msda_check_inputs(module: Any, query: jax.Array, reference_points: jax.Array,
                      input_flatten: jax.Array, spatial_shapes: Any,
                      input_padding_mask: jax.Array | None, num_levels: int,
                      channels: int) -> tuple[tuple[int, int], ...]:
  """Checks the arguments of ``MSDeformAttn.__call__`` and returns the static spatial shapes.

  ``query [N, Lq, C]``, ``reference_points [N, Lq, L, 2 or 4]``, ``input_flatten [N, S, C]``,
  ``input_padding_mask [N, S]`` or None, ``L = num_levels`` pairs of ``spatial_shapes``.
  """
  name = type(module).__name__
  geometry = MsDeformAttnGeometry.create(spatial_shapes, fn=name)

  def bad(arg: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{name}: {arg} has shape {tuple(jnp.shape(value))}, expected {expected}.")

  if jnp.ndim(query) != 3 or jnp.shape(query)[-1] != channels:
    raise bad("query", query, f"[N, Lq, C] with C={channels}")
  n, lq, _ = jnp.shape(query)
  if geometry.num_levels != num_levels:
    raise ValueError(f"{name}: spatial_shapes has {geometry.num_levels} levels "
                     f"{geometry.spatial_shapes}, but num_levels={num_levels}.")
  if (jnp.ndim(reference_points) != 4 or jnp.shape(reference_points)[:3] != (n, lq, num_levels)
      or jnp.shape(reference_points)[-1] not in (2, 4)):
    raise bad("reference_points", reference_points,
              f"[N, Lq, L, 2] or [N, Lq, L, 4] = ({n}, {lq}, {num_levels}, 2 or 4)")
  s = geometry.num_values
  if tuple(jnp.shape(input_flatten)) != (n, s, channels):
    raise bad("input_flatten", input_flatten,
              f"[N, S, C] = {(n, s, channels)} (S = sum of H * W over spatial_shapes "
              f"{geometry.spatial_shapes})")
  if input_padding_mask is not None and tuple(jnp.shape(input_padding_mask)) != (n, s):
    raise bad("input_padding_mask", input_padding_mask, f"[N, S] = {(n, s)}")
  return geometry.spatial_shapes


def msda_sampling_locations(reference_points: jax.Array, offsets: jax.Array,
                            spatial_shapes: tuple[tuple[int, int], ...], num_points: int,
                            dtype: Any) -> jax.Array:
  """Deformable DETR's sampling locations ``[N, Lq, M, L, P, 2]`` in ``dtype``.

  ``offsets [N, Lq, M, L, P, 2]`` (``(x, y)``, pixels of each level) are added to 2-d reference
  points ``[N, Lq, L, 2]`` divided by ``(W_l, H_l)``, or to the centres of 4-d reference boxes
  ``[N, Lq, L, 4]`` ``(cx, cy, w, h)`` times ``(w, h) / (2 P)``.
  """
  ref = reference_points.astype(dtype)[:, :, None, :, None, :]
  offsets = offsets.astype(dtype)
  if reference_points.shape[-1] == 2:
    normaliser = jnp.asarray([(w, h) for h, w in spatial_shapes], dtype)[:, None, :]
    return ref + offsets / normaliser
  return ref[..., :2] + offsets / num_points * ref[..., 2:] * 0.5
