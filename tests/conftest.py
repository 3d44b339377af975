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
