"""What the ``cuda`` tests share: the GPU skip condition, moving arrays to the GPU, and full
float32 on torch's side.

Every ``@pytest.mark.cuda`` test is collected everywhere and skips without a GPU; ``.ci/gpu-check``
selects them with ``pytest -m cuda tests/``, so a new op family's CUDA tests need only the marker.
JAX's side of their float32 matmuls is pinned to full precision by conftest.py (on a GPU JAX's
default float32 matmul is TF32).
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest

from flaxdcn import _ffi
from tolerances import assert_close


def gpu_available() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


#: Skips a test unless jax sees a CUDA GPU and the CUDA kernels are built.
requires_gpu = pytest.mark.skipif(not (_ffi.available("cuda") and gpu_available()),
                                  reason="needs a CUDA GPU and the CUDA build of the kernels")


def on_device(device, *arrays, dtype=None):
  """``arrays`` (None stays None) as ``dtype`` (default: their own) on ``device``."""
  return tuple(None if a is None else jax.device_put(jnp.asarray(a, dtype), device)
               for a in arrays)


@contextlib.contextmanager
def torch_full_float32(torch):
  """torch's float32 matmuls and cuDNN convolutions without TF32 inside the block."""
  saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  try:
    yield
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def vjp_in_separate_programs(fn, primals, cotangent, device):
  """``fn(*primals)`` and its VJP at ``cotangent``, on ``device``, the forward and the backward
  compiled as two programs.

  A native call's operands and results are then program arguments and results rather than slices
  of XLA's one temporary buffer: separate allocations under
  ``XLA_PYTHON_CLIENT_ALLOCATOR=platform``, so compute-sanitizer's memcheck sees an access past
  any of them, and initcheck a read of what no one wrote.
  """
  out, vjp = jax.vjp(jax.jit(fn), *on_device(device, *primals))
  return out, vjp(*on_device(device, cotangent))


def assert_same_on_gpu_and_cpu(fn, primals, cotangent, dtype):
  """``fn``'s native CUDA calls equal its native CPU calls within ``dtype``'s tolerance, forward
  and VJP, each side compiled as separate forward and backward programs; every result has
  ``dtype``."""
  gpu = vjp_in_separate_programs(fn, primals, cotangent, jax.devices("gpu")[0])
  cpu = vjp_in_separate_programs(fn, primals, cotangent, jax.devices("cpu")[0])
  for got, want in zip(jax.tree_util.tree_leaves(gpu), jax.tree_util.tree_leaves(cpu)):
    assert got.dtype == dtype
    assert_close(got, want, dtype)
