"""Shared pytest configuration: the implementations every core test runs over, and full float32
matmuls for the ``cuda`` tests."""

import jax
import pytest

from flaxdcn import _ffi

#: Every core test is parametrised over these; "ffi" is skipped where no native CPU kernel is built.
IMPLEMENTATIONS = [
    pytest.param("xla", id="xla"),
    pytest.param("ffi", id="ffi", marks=pytest.mark.skipif(
        not _ffi.available("cpu"), reason="native CPU kernels not built")),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
  return request.param


@pytest.fixture(autouse=True)
def _cuda_tests_at_full_float32(request):
  """``cuda`` tests compare float32 results at float32 tolerances; on a GPU JAX's default float32
  matmul is TF32 (about 1e-3 relative), so every matmul they trace, the jnp reference paths'
  included, runs at full float32."""
  if request.node.get_closest_marker("cuda") is None:
    yield
    return
  with jax.default_matmul_precision("highest"):
    yield
