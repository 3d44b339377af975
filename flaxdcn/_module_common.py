"""Argument handling shared by the linen and the NNX modules (no framework types)."""

from __future__ import annotations

from typing import Any

import jax


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
