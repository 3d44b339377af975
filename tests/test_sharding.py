"""``deform_conv2d`` and per-image ``deform_roi_pool`` on 8 CPU devices: batch-sharded ``jit``
without all-gathers (and ``pmap`` for the convolution).

The device count is fixed by ``XLA_FLAGS`` before jax initialises, so the checks run in one
subprocess per implementation (tests/multidevice_script.py and tests/roi_multidevice_script.py
hold them and say what they are).
"""

import pathlib

import pytest
from multidevice_testing import run_multidevice_script

#: Long integration tests: run by .ci/run after the default suite (pytest -m extended).
pytestmark = pytest.mark.extended

SCRIPT = pathlib.Path(__file__).with_name("multidevice_script.py")
ROI_SCRIPT = pathlib.Path(__file__).with_name("roi_multidevice_script.py")


@pytest.mark.slow
def test_batch_sharded_jit_and_pmap(implementation):
  run_multidevice_script(SCRIPT, implementation)


@pytest.mark.slow
def test_per_image_roi_pool_batch_sharded(implementation):
  """Per-image RoI pooling and ModulatedDeformRoIPool on 8 devices: no all-gather, forward and
  backward (tests/roi_multidevice_script.py says what it checks)."""
  run_multidevice_script(ROI_SCRIPT, implementation)

