"""The CUDA driver check: the kernels link CUDA's runtime statically and need a driver of at least
its major version. Without a GPU backend nothing is checked and nothing warns; with one and an old
(or no) driver, ``implementation=None`` lowers the jnp path with one warning and ``"ffi"`` raises,
both naming the driver's and the runtime's CUDA versions.
"""

import ctypes.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxdcn
from flaxdcn import _ffi

# ``cuda``: .ci/gpu-check's ``pytest -m cuda`` runs these on the GPU machine too, where the real
# driver is checked; they need the CUDA build, not a GPU.
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not _ffi.available("cuda"), reason="CUDA kernels not built")]

NATIVE_CALL = "custom_call @flaxdcn_deform_im2col("


def _lower_for_cuda(implementation):
  """The ``jit`` lowering of a gradient for ``cuda`` (it needs no CUDA backend)."""
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.float32)
  offsets = jnp.asarray(rng.normal(size=(2, 5, 6, 18)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 3)), jnp.float32)
  fn = jax.jit(jax.grad(lambda x, o, k: jnp.sum(flaxdcn.deform_conv2d(
      x, o, k, padding="SAME", implementation=implementation)), argnums=(0, 1, 2)))
  return fn.trace(inputs, offsets, kernel).lower(lowering_platforms=("cuda",)).as_text()


@pytest.fixture
def fresh_check():
  """Clears the cached driver verdict (and the once-only warning) around a test."""
  _ffi._cuda_driver_problem.cache_clear()
  _ffi._warn_cuda_fallback.cache_clear()
  yield
  _ffi._cuda_driver_problem.cache_clear()
  _ffi._warn_cuda_fallback.cache_clear()


@pytest.fixture
def old_driver(monkeypatch, fresh_check):
  """A GPU backend whose driver supports CUDA 12.8 only."""
  info = dict(_ffi.build_info(), cuda_driver=(12, 8))
  monkeypatch.setattr(_ffi, "_gpu_backend_present", lambda: True)
  monkeypatch.setattr(_ffi, "build_info", lambda: info)
  return info


def test_build_info_reports_the_driver():
  info = flaxdcn.build_info()
  driver = info["cuda_driver"]
  assert driver is None or (len(driver) == 2 and all(isinstance(v, int) for v in driver))
  if ctypes.util.find_library("cuda") is None:  # this machine has no driver library at all
    assert driver is None, info


def test_no_gpu_backend_no_check_no_warning(fresh_check):
  """CPU-only machines (this one): lowering for cuda keeps the native call and never warns."""
  if _ffi._gpu_backend_present():
    pytest.skip("this machine has a CUDA backend")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert _ffi._cuda_driver_problem() is None
    module = _lower_for_cuda(None)
  assert NATIVE_CALL in module and "flaxdcn_deform_im2col_bwd" in module


def test_old_driver_default_falls_back_with_one_warning(old_driver):
  with pytest.warns(RuntimeWarning, match=r"driver for CUDA 12\.8.*CUDA 13\.0 runtime") as record:
    module = _lower_for_cuda(None)
    _lower_for_cuda(None)  # a second program: no second warning
  assert len([w for w in record if "flaxdcn" in str(w.message)]) == 1
  assert "flaxdcn_deform_im2col" not in module  # the jnp path, forward and backward


def test_old_driver_ffi_raises_naming_both_versions(old_driver):
  with pytest.raises(RuntimeError, match=r"implementation='ffi' cannot run the CUDA kernels: "
                                         r"this machine has a driver for CUDA 12\.8.*CUDA 13\.0"):
    _lower_for_cuda("ffi")


def test_gpu_backend_without_driver_library(monkeypatch, fresh_check):
  """The no-driver branch with a GPU backend: the same fallback, saying no driver was found."""
  info = dict(_ffi.build_info(), cuda_driver=None)
  monkeypatch.setattr(_ffi, "_gpu_backend_present", lambda: True)
  monkeypatch.setattr(_ffi, "build_info", lambda: info)
  assert "no CUDA driver" in _ffi._cuda_driver_problem()
  with pytest.raises(RuntimeError, match="no CUDA driver"):
    _lower_for_cuda("ffi")


def test_current_driver_keeps_the_native_call(monkeypatch, fresh_check):
  info = dict(_ffi.build_info())
  info["cuda_driver"] = (info["cuda_runtime"][0], 2)  # same major version, newer minor
  monkeypatch.setattr(_ffi, "_gpu_backend_present", lambda: True)
  monkeypatch.setattr(_ffi, "build_info", lambda: info)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert NATIVE_CALL in _lower_for_cuda("ffi")
