"""``deform_conv2d`` on 8 CPU devices: batch-sharded ``jit`` without all-gathers, and ``pmap``.

The device count is fixed by ``XLA_FLAGS`` before jax initialises, so the checks run in one
subprocess per implementation (tests/multidevice_script.py holds them and says what they are).
"""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("multidevice_script.py")


@pytest.mark.slow
def test_batch_sharded_jit_and_pmap(implementation):
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      flag for flag in env.get("XLA_FLAGS", "").split()
      if not flag.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(SCRIPT), implementation], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, (
      f"multidevice_script.py {implementation} failed (rc={proc.returncode}):\n"
      f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
