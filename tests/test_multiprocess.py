"""Multi-process data-parallel training (``jax.distributed``): 2 processes x 2 CPU devices train
exactly as 1 process x 4 devices, with no all-gather of the batch (tests/multiprocess_script.py);
and 2 processes resume the ResNet-DCN example from an Orbax checkpoint written by 1 process.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tolerances import assert_close

#: Long integration tests: run by .ci/run after the default suite (pytest -m extended).
pytestmark = pytest.mark.extended

SCRIPT = pathlib.Path(__file__).resolve().parent / "multiprocess_script.py"
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "resnet_dcn" / "train.py"
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


#: A tiny run of the ResNet-DCN example: 2 steps per epoch of 8 digits.
EXAMPLE_ARGS = ["--model", "dcn", "--steps", "2", "--batch-size", "8", "--train-size", "16",
                "--test-size", "8", "--eval-batch-size", "8"]


@pytest.mark.slow
def test_two_processes_resume_a_checkpoint_written_by_one(tmp_path):
  """The example trains 2 epochs in 1 process on 1 device; a copy of its run without the last
  checkpoint (a stop during epoch 2) resumes in 2 processes x 1 device, which read the Orbax
  checkpoint of epoch 1 into their shardings, and ends as the uninterrupted run ends."""
  for module in ("orbax.checkpoint", "optax", "tqdm", "matplotlib", "mlxtend"):
    pytest.importorskip(module, reason="the examples extra is missing")
  example = [sys.executable, str(EXAMPLE), *EXAMPLE_ARGS, "--epochs", "2"]
  one, two = tmp_path / "one", tmp_path / "two"
  _run_all([example + ["--workdir", str(one)]], _env(1), tmp_path)
  shutil.copytree(one, two)
  shutil.rmtree(two / "dcn" / "checkpoints" / "4")
  address = f"127.0.0.1:{_free_port()}"
  _run_all([example + ["--resume", "--workdir", str(two), "--coordinator-address", address,
                       "--num-processes", "2", "--process-id", str(i)] for i in range(2)],
           _env(1), tmp_path)
  assert "2 cpu device(s) in 2 processes" in (tmp_path / "process0.log").read_text()

  expected, actual = (json.loads((d / "results.json").read_text())["dcn"] for d in (one, two))
  assert expected["processes"] == 1 and actual["processes"] == 2
  assert [r["epoch"] for r in actual["history"]] == [1, 2]
  assert actual["history"][0] == expected["history"][0]   # epoch 1: the checkpoint's metadata
  for key, value in expected["history"][1].items():
    if key != "wall_time_s":
      assert_close(actual["history"][1][key], value, np.float32, err_msg=key)
  steps = sorted(int(p.name) for p in (two / "dcn" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
