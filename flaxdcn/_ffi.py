"""The one file that talks to ``jax.ffi``.

Native kernels are not built yet: every native entry point falls back to the pure-jnp
implementation when it is given one (``implementation=None``) and raises otherwise.
"""

from __future__ import annotations


def available(platform: str) -> bool:
  """Whether native kernels were built for ``platform`` ("cpu" or "cuda")."""
  del platform
  return False


def _unavailable(op: str) -> RuntimeError:
  return RuntimeError(
      f"{op}: implementation='ffi' needs the native kernels, and this flaxdcn build has none; "
      "use implementation=None or 'xla'.")


def deform_im2col(inputs, offsets, mask, geometry, *, deterministic_backward, fallback):
  del deterministic_backward
  if fallback is None:
    raise _unavailable("deform_conv2d")
  return fallback(inputs, offsets, mask, geometry)
