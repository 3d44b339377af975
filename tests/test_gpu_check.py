"""The one-call GPU check (.ci/gpu-check), everything but the GPU itself: without a GPU it stops
at once with a clear message and exit status 2; its dry run collects the test selections and
writes its files; the benchmark shapes it names exist."""

import os
import re
import subprocess

import pytest

from flaxdcn import _ffi, benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "gpu-check")


def _run(tmp_path, *args):
  env = dict(os.environ, OUT=str(tmp_path))
  return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.skipif(_ffi._gpu_backend_present(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_clearly(tmp_path):
  result = _run(tmp_path)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "gpu-check: cannot run here: no CUDA GPU visible to jax" in result.stdout
  assert "== build" not in result.stdout  # nothing expensive was started
  assert (tmp_path / "gpu-check.log").read_text() == result.stdout
  environment = (tmp_path / "environment.txt").read_text()
  assert re.search(r"^jax: \d", environment, re.M), environment


@pytest.mark.extended  # collects the whole suite in a subprocess: run by .ci/run after it
def test_dry_run_collects_the_cuda_selections(tmp_path):
  result = _run(tmp_path, "--collect-only")
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  counts = [int(n) for n in re.findall(r"^(\d+)/\d+ tests collected", result.stdout, re.M)]
  assert len(counts) == 2, result.stdout[-4000:]
  cuda, sanitizer = counts
  assert cuda >= 40 and 1 <= sanitizer <= 8, counts
  assert "gpu-check: all steps passed" in result.stdout


def test_benchmark_shapes_exist():
  script = open(SCRIPT).read()
  shapes = re.search(r"--shapes (\S+)", script).group(1).split(",")
  assert shapes == ["R1", "G1", "G1g4", "G2", "P1"]
  for name in shapes:
    assert name in benchmark.SHAPES or name in benchmark.ROI_SHAPES, name
