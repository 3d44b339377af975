"""Pieces shared by the convolution-like modules (DCN and Deformable Kernels)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def spatial_pair(module: nn.Module, value: Any, name: str) -> tuple[int, int]:
  """``value`` (an int or a pair) as ``(h, w)``; a ValueError naming ``module``'s attribute."""
  pair = (value,) * 2 if isinstance(value, int) else tuple(value)
  if len(pair) != 2:
    raise ValueError(f"{type(module).__name__}: {name} must be an int or a pair, got {value!r}.")
  return pair  # type: ignore[return-value]


def flatten_batch(module: nn.Module, inputs: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  """``[*batch, H, W, C] -> [N, H, W, C]`` and ``batch`` (none at all is allowed, as in
  ``flax.linen.Conv``)."""
  if inputs.ndim < 3:
    raise ValueError(f"{type(module).__name__}: inputs has shape {inputs.shape}, expected "
                     "[*batch, H, W, C].")
  return inputs.reshape((-1,) + inputs.shape[-3:]), inputs.shape[:-3]


def kernel_and_bias(module: nn.Module, spatial: tuple[int, int], in_features: int
                    ) -> tuple[jax.Array, jax.Array | None]:
  """The ``kernel [*spatial, C // feature_group_count, features]`` and ``bias [features]`` (or
  None without ``use_bias``) parameters of a convolution-like ``module``, in ``param_dtype``."""
  groups = module.feature_group_count
  if in_features % groups:
    raise ValueError(f"{type(module).__name__}: inputs has {in_features} channels, not divisible "
                     f"by feature_group_count={groups}.")
  kernel = module.param("kernel", module.kernel_init,
                        spatial + (in_features // groups, module.features), module.param_dtype)
  bias = (module.param("bias", module.bias_init, (module.features,), module.param_dtype)
          if module.use_bias else None)
  return kernel, bias
