"""Type stub of the compiled module (``xla_ext/module.cc``): handler capsules and build facts."""

from typing import Any

def registrations() -> dict[str, dict[str, Any]]:
  """``{platform: {FFI target name: handler capsule}}`` of the kernels in this build; platforms
  are ``"cpu"`` and, in CUDA builds, ``"CUDA"`` (``jax.ffi.register_ffi_target``'s names)."""

def build_info() -> dict[str, Any]:
  """``cpu``, ``cuda`` (bools) and ``ffi_api`` (``(major, minor)``); CUDA builds add
  ``cuda_runtime`` (``(major, minor)``), ``cuda_architectures`` (str) and ``cuda_driver``
  (``(major, minor)``, or None without a driver)."""
