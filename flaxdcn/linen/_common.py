"""Pieces shared by the convolution-like modules (DCN and Deformable Kernels)."""

from __future__ import annotations

import flax.linen as nn
import jax

from flaxdcn._module_common import flatten_batch as flatten_batch
from flaxdcn._module_common import spatial_pair as spatial_pair


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
