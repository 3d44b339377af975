"""Multi-process data-parallel training (``jax.distributed``): 2 processes x 2 CPU devices train
exactly as 1 process x 4 devices, with no all-gather of the batch (tests/multiprocess_script.py).
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tolerances import assert_close

#: Long integration tests: run by .ci/run after the default suite (pytest -m extended).
pytestmark = pytest.mark.extended

SCRIPT = pathlib.Path(__file__).resolve().parent / "multiprocess_script.py"
#: Seconds any process may take; past it every process of the run is killed.
TIMEOUT_S = 900


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  return dict(env, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _run_all(commands: list[list[str]], env: dict[str, str], logs: pathlib.Path) -> None:
  """Runs the commands together; kills all of them if one fails or the time runs out."""
  procs = []
  try:
    for i, cmd in enumerate(commands):
      log = open(logs / f"process{i}.log", "w")
      procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, _ in procs:
      proc.wait(timeout=TIMEOUT_S)
      if proc.returncode != 0:
        break
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  for i, (proc, _) in enumerate(procs):
    assert proc.returncode == 0, (f"process {i} of {len(procs)} exited with {proc.returncode}:\n"
                                  + (logs / f"process{i}.log").read_text()[-4000:])


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  single, multi = tmp_path / "single.npz", tmp_path / "multi.npz"
  _run_all([[sys.executable, str(SCRIPT), str(single)]], _env(4), tmp_path)
  address = f"127.0.0.1:{_free_port()}"
  _run_all([[sys.executable, str(SCRIPT), str(multi), "--coordinator-address", address,
             "--num-processes", "2", "--process-id", str(i)] for i in range(2)],
           _env(2), tmp_path)
  expected, actual = np.load(single), np.load(multi)
  assert set(actual.files) == set(expected.files)
  assert "xla/loss" in expected.files
  for name in expected.files:
    assert_close(actual[name], expected[name], np.float32, err_msg=name)
  for implementation in {name.split("/")[0] for name in expected.files}:
    losses = expected[f"{implementation}/loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses   # it trains
