"""What the multi-device tests share: running a ``*_multidevice_script.py`` in its own process.

The scripts set ``--xla_force_host_platform_device_count`` themselves (8 CPU devices) before jax
starts, so a device count inherited from this process's ``XLA_FLAGS`` is removed.
"""

import os
import pathlib
import subprocess
import sys


def run_multidevice_script(script: pathlib.Path, implementation: str, timeout: int = 600):
  """Runs ``python script implementation`` on the CPU platform; fails with its output unless it
  exits 0."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      flag for flag in env.get("XLA_FLAGS", "").split()
      if not flag.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(script), implementation], env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, (
      f"{script.name} {implementation} failed (rc={proc.returncode}):\n"
      f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
