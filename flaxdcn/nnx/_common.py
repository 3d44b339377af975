"""Pieces shared by the NNX modules: the kernel and bias parameters and the sowing rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from flax.typing import Dtype, Initializer


def kernel_and_bias(module: nnx.Module, spatial: tuple[int, int], in_features: int,
                    out_features: int, *, feature_group_count: int, use_bias: bool,
                    param_dtype: Dtype, kernel_init: Initializer, bias_init: Initializer,
                    kernel_metadata: Mapping[str, Any], bias_metadata: Mapping[str, Any],
                    rngs: nnx.Rngs) -> tuple[nnx.Param, Any]:
  """The ``kernel [*spatial, in_features // feature_group_count, out_features]`` and
  ``bias [out_features]`` parameters of a convolution-like ``module`` (the bias an
  ``nnx.data(None)`` without ``use_bias``, as in ``flax.nnx.Conv``)."""
  if in_features % feature_group_count:
    raise ValueError(f"{type(module).__name__}: in_features={in_features} is not divisible by "
                     f"feature_group_count={feature_group_count}.")
  shape = spatial + (in_features // feature_group_count, out_features)
  kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype), **kernel_metadata)
  if not use_bias:
    return kernel, nnx.data(None)
  bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype), **bias_metadata)
  return kernel, bias


def check_channels(module: nnx.Module, inputs: jax.Array, in_features: int, *,
                   name: str = "inputs") -> None:
  """A ValueError unless the last axis of ``inputs`` (the argument ``name``) is ``in_features``
  long."""
  if inputs.shape[-1] != in_features:
    raise ValueError(f"{type(module).__name__}: {name} has shape {inputs.shape} with "
                     f"{inputs.shape[-1]} channels, expected in_features={in_features}.")


def sow(module: nnx.Module, name: str, value: jax.Array) -> None:
  """Sows ``value`` as the ``nnx.Intermediate`` ``name`` of ``module`` while ``nnx.capture``
  records it; outside ``nnx.capture`` nothing is stored.

  This is linen's rule (``sow`` stores only into a mutable ``"intermediates"`` collection).
  Without it, flax 0.12's ``Module.sow`` outside ``nnx.capture`` (deprecated) would set the value
  on the module and append to it at every call, so the module's state, and the trace of every
  ``nnx.jit`` step that calls it, would change at every step. ``nnx.capture`` marks each module
  it records with a ``__captures__`` attribute for the duration of the call.
  """
  if hasattr(module, "__captures__"):
    module.sow(nnx.Intermediate, name, value)
