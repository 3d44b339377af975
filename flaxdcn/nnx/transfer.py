"""Weights between the NNX modules and their linen twins: ``nnx.state(module, nnx.Param)``
corresponds leaf for leaf to the linen ``params`` tree, under the same names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util


def linen_params(module: nnx.Module) -> dict[str, Any]:
  """The parameters of ``module`` as the ``params`` tree of its linen twin.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn, flaxdcn.nnx
    >>> layer = flaxdcn.nnx.DeformConv(4, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 9, 9, 4))
    >>> params = flaxdcn.nnx.linen_params(layer)
    >>> y = flaxdcn.DeformConv(8, (3, 3)).apply({"params": params}, x)
    >>> bool(jnp.all(y == layer(x)))
    True

  Args:
    module: any ``nnx.Module`` (a flaxdcn NNX module, or a model made of them).

  Returns:
    A nested dict of arrays, keyed by attribute name (``{"kernel": ..., "bias": ...,
    "conv_offset": {"kernel": ..., "bias": ...}}`` for :class:`flaxdcn.nnx.DeformConv`). The
    arrays are the module's own (no copy).
  """
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def load_linen_params(module: nnx.Module, params: Mapping[str, Any]) -> None:
  """Writes a linen ``params`` tree into ``module``'s parameters, in place.

  ``params`` must name exactly the module's parameters with their shapes, e.g. the
  ``variables["params"]`` of the linen twin, or the result of :mod:`flaxdcn.convert` for a
  PyTorch checkpoint. Each value is cast to the ``param_dtype`` of the parameter it replaces
  (a float32 checkpoint loads into a bfloat16 model) and keeps its sharding.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn, flaxdcn.nnx
    >>> x = jnp.ones((2, 9, 9, 4))
    >>> variables = flaxdcn.ModulatedDeformConv(8, (3, 3)).init(jax.random.key(0), x)
    >>> layer = flaxdcn.nnx.ModulatedDeformConv(4, 8, (3, 3), rngs=nnx.Rngs(1))
    >>> flaxdcn.nnx.load_linen_params(layer, variables["params"])
    >>> bool(jnp.all(layer.kernel[...] == variables["params"]["kernel"]))
    True
    >>> flaxdcn.nnx.load_linen_params(layer, {"kernel": jnp.zeros((3, 3, 4, 8))})
    Traceback (most recent call last):
      ...
    ValueError: load_linen_params: params has no 'bias' (expected shape (8,)), no 'conv_offset/bias' (expected shape (27,)), no 'conv_offset/kernel' (expected shape (3, 3, 4, 27)).

  Args:
    module: the ``nnx.Module`` to update.
    params: nested mapping of names to arrays (jax or numpy), keyed like :func:`linen_params`.

  Raises:
    ValueError: a parameter is missing from ``params``, ``params`` has a key the module lacks,
      or a shape differs; the message names each such key and the expected shape.
  """
  state = nnx.state(module, nnx.Param)
  expected = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
  given = traverse_util.flatten_dict(_as_dict(params), sep="/")
  problems = [f"no {key!r} (expected shape {tuple(jnp.shape(value))})"
              for key, value in expected.items() if key not in given]
  problems += [f"an unexpected {key!r}" for key in given if key not in expected]
  problems += [f"{key!r} of shape {tuple(np.shape(given[key]))}, expected "
               f"{tuple(jnp.shape(value))}" for key, value in expected.items()
               if key in given and np.shape(given[key]) != jnp.shape(value)]
  if problems:
    raise ValueError(f"load_linen_params: params has {', '.join(problems)}.")
  new = {key: _like(given[key], value) for key, value in expected.items()}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new, sep="/"))
  nnx.update(module, state)


def _as_dict(tree: Any) -> Any:
  """Nested mappings (``dict``, ``FrozenDict``, ...) as nested dicts."""
  if isinstance(tree, Mapping):
    return {key: _as_dict(value) for key, value in tree.items()}
  return tree


def _like(value: Any, current: Any) -> jax.Array:
  """``value`` in the dtype of ``current``, on ``current``'s devices and sharding."""
  value = jnp.asarray(value, dtype=jnp.result_type(current))
  if isinstance(current, jax.Array) and not isinstance(current, jax.core.Tracer):
    value = jax.device_put(value, current.sharding)
  return value
