"""Shared pytest configuration: the implementations every core test runs over."""

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


@pytest.fixture
def msda_implementation(implementation):
  """``implementation`` for ``ms_deform_attn`` and its modules: ``"ffi"`` is skipped while
  flaxdcn has no native ``ms_deform_attn`` kernels (tests/test_ms_deform_attn.py checks that it
  then raises)."""
  from flaxdcn.ops import ms_deform_attn  # pylint: disable=import-outside-toplevel

  native = ms_deform_attn._NATIVE_OP is not None  # pylint: disable=protected-access
  if implementation == "ffi" and not native:
    pytest.skip("flaxdcn has no native ms_deform_attn kernels yet (implementation='ffi' raises: "
                "test_ffi_without_native_kernels_raises)")
  return implementation
