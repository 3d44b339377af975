"""``deform_conv2d`` and per-image ``deform_roi_pool`` on 8 CPU devices: batch-sharded ``jit``
without all-gathers (and ``pmap`` for the convolution).

The device count is fixed by ``XLA_FLAGS`` before jax initialises, so the checks run in one
subprocess per implementation (tests/multidevice_script.py and tests/roi_multidevice_script.py
hold them and say what they are).
"""

import os
import pathlib
import subprocess
import sys

import pytest

#: Long integration tests: run by .ci/run after the default suite (pytest -m extended).
pytestmark = pytest.mark.extended

SCRIPT = pathlib.Path(__file__).with_name("multidevice_script.py")
ROI_SCRIPT = pathlib.Path(__file__).with_name("roi_multidevice_script.py")


@pytest.mark.slow
def test_batch_sharded_jit_and_pmap(implementation):
  _run(SCRIPT, implementation)


@pytest.mark.slow
def test_per_image_roi_pool_batch_sharded(implementation):
  """Per-image RoI pooling and ModulatedDeformRoIPool on 8 devices: no all-gather, forward and
  backward (tests/roi_multidevice_script.py says what it checks)."""
  _run(ROI_SCRIPT, implementation)


def _run(script, implementation):
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      flag for flag in env.get("XLA_FLAGS", "").split()
      if not flag.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(script), implementation], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, (
      f"{script.name} {implementation} failed (rc={proc.returncode}):\n"
      f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
