"""The release artefacts: ``python -m build`` makes an sdist and, from it, a wheel with the CPU and
CUDA kernels; ``auditwheel`` names its manylinux policy and retags it; the wheel installs into a
fresh virtual environment with no compiler on ``PATH`` and runs every native op there
(tests/wheel_check_script.py).

Marker ``wheel``, deselected by default (a CUDA build takes minutes): .ci/run runs
``pytest -m wheel`` after the test command. The build needs nvcc (the wheel must carry the CUDA
kernels), and the fresh environment installs jax and flax from the package index.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile

import pytest

from flaxdcn import _ffi

pytestmark = pytest.mark.wheel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = pathlib.Path(__file__).resolve().parent / "wheel_check_script.py"
VERSION = "0.1.0"
#: Sources a build reads, by suffix.
SOURCE_SUFFIXES = {".py", ".pyi", ".h", ".hpp", ".cc", ".cu", ".cuh"}
#: Environment variables that could lead a build (or the check) to tools or a source tree.
BUILD_ENV = ("CC", "CXX", "CUDACXX", "CUDAHOSTCXX", "CUDA_HOME", "CUDA_PATH", "PYTHONPATH",
             "VIRTUAL_ENV", "LD_LIBRARY_PATH")
#: The basic tools the fresh environment's ``PATH`` keeps (none of them builds code).
BASIC_TOOLS = ("sh", "bash", "env", "cat", "ls", "uname", "ldconfig")
#: Seconds for a build (CMake, the C++ and CUDA kernels) and for an install or check.
BUILD_TIMEOUT_S = 1800
STEP_TIMEOUT_S = 900


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
  out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  assert out.returncode == 0, (f"{' '.join(map(str, cmd))} exited with {out.returncode}:\n"
                               f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
  return out


def _sources(folder: str) -> set[str]:
  """The source files under ``folder`` of the tree, relative to the root."""
  return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
          if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts}


def _timed(timings: dict[str, float], name: str, cmd, **kwargs) -> subprocess.CompletedProcess:
  start = time.perf_counter()
  out = _run(cmd, **kwargs)
  timings[name] = round(time.perf_counter() - start, 1)
  return out


@pytest.fixture(scope="module")
def timings():
  """Seconds per step, printed at the end (``pytest -m wheel -s`` shows them, and the sizes of
  the sdist and the wheel)."""
  steps: dict[str, float] = {}
  yield steps
  print("\nwheel check timings (s):", steps)


@pytest.fixture(scope="module")
def dist(tmp_path_factory, timings) -> pathlib.Path:
  """``python -m build`` of the source tree: the sdist, and the wheel built from that sdist."""
  if shutil.which("nvcc") is None:
    pytest.skip("the release wheel carries the CUDA kernels: building it needs nvcc on PATH")
  out = tmp_path_factory.mktemp("dist")
  env = dict(os.environ, FLAXDCN_CUDA="ON")   # a missing CUDA compiler fails the build
  _timed(timings, "python -m build", [sys.executable, "-m", "build", "--outdir", str(out),
                                      str(ROOT)], env=env, timeout=BUILD_TIMEOUT_S)
  print("\nbuilt:", {p.name: p.stat().st_size for p in sorted(out.iterdir())})
  return out


def _wheel(folder: pathlib.Path) -> pathlib.Path:
  (wheel,) = folder.glob("*.whl")
  return wheel


def test_sdist_holds_everything_a_build_reads(dist):
  with tarfile.open(dist / f"flaxdcn-{VERSION}.tar.gz") as sdist:
    names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
  needed = {"pyproject.toml", "CMakeLists.txt", "LICENSE", "README.md"}
  needed |= _sources("xla_ext") | _sources("flaxdcn")
  assert "xla_ext/module.cc" in needed and "flaxdcn/_ffi.py" in needed
  assert needed <= names, sorted(needed - names)
  assert not any(n.startswith(("build/", "runs/", "dist/")) or n.endswith((".so", ".o", ".pyc"))
                 for n in names), sorted(names)


def test_wheel_from_the_sdist_carries_every_module_and_the_native_kernels(dist):
  tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
  platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
  wheel = _wheel(dist)
  assert wheel.name == f"flaxdcn-{VERSION}-{tag}-{tag}-{platform}.whl"
  info = f"flaxdcn-{VERSION}.dist-info/"
  expected = {p for p in _sources("flaxdcn") if p.endswith((".py", ".pyi"))}
  expected |= {"flaxdcn/_native" + sysconfig.get_config_var("EXT_SUFFIX")}
  expected |= {info + name for name in ("METADATA", "WHEEL", "RECORD", "licenses/LICENSE")}
  with zipfile.ZipFile(wheel) as archive:
    names = {n for n in archive.namelist() if not n.endswith("/")}
    metadata = archive.read(info + "METADATA").decode()
  assert names == expected, (sorted(names - expected), sorted(expected - names))
  for dependency in ("jax>=0.10.2", "jaxlib>=0.10.2", "flax>=0.10", "numpy>=1.24"):
    assert f"Requires-Dist: {dependency}\n" in metadata


@pytest.fixture(scope="module")
def repaired(dist, tmp_path_factory, timings) -> tuple[pathlib.Path, str]:
  """``auditwheel repair`` of the wheel: (the repaired wheel, the policy ``auditwheel show``
  named)."""
  auditwheel = [sys.executable, "-m", "auditwheel"]
  shown = _timed(timings, "auditwheel show", auditwheel + ["show", str(_wheel(dist))],
                 timeout=STEP_TIMEOUT_S)
  text = " ".join(shown.stdout.split())
  match = re.search(r'consistent with the following platform tag: "(manylinux_2_\d+_x86_64)"',
                    text)
  assert match, shown.stdout
  out = tmp_path_factory.mktemp("repaired")
  # --patcher none: the module needs no library grafted in (the CUDA runtime is static), so
  # nothing is patched; a dependency that had to be grafted would fail here.
  _timed(timings, "auditwheel repair", auditwheel + [
      "repair", "--patcher", "none", "--plat", match.group(1), "-w", str(out),
      str(_wheel(dist))], timeout=STEP_TIMEOUT_S)
  return _wheel(out), match.group(1)


def test_auditwheel_retags_the_wheel_unchanged(dist, repaired):
  wheel, policy = repaired
  assert wheel.name.endswith(f"-{policy}.whl")
  with zipfile.ZipFile(_wheel(dist)) as original, zipfile.ZipFile(wheel) as fixed:
    files = lambda archive: {n for n in archive.namelist() if not n.endswith("/")}
    assert files(fixed) == files(original)   # no flaxdcn.libs/: nothing grafted
    for name in files(original):
      if "dist-info/" not in name:
        assert fixed.read(name) == original.read(name), name
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheel_info = fixed.read(f"flaxdcn-{VERSION}.dist-info/WHEEL").decode()
  assert f"Tag: {tag}-{tag}-{policy}\n" in wheel_info, wheel_info


def _toolless_env(tmp: pathlib.Path, venv: pathlib.Path) -> dict[str, str]:
  """The environment of a machine without a toolchain: ``PATH`` is the virtual environment's
  ``bin`` and a folder of basic tools; no variable names a compiler or a CUDA install."""
  tools = tmp / "basic-tools"
  tools.mkdir()
  for tool in BASIC_TOOLS:
    found = shutil.which(tool)
    if found:
      (tools / tool).symlink_to(found)
  env = {k: v for k, v in os.environ.items()
         if k not in BUILD_ENV and not k.startswith(("CMAKE", "FLAXDCN", "JAX_", "XLA_"))}
  env.update(PATH=f"{venv / 'bin'}{os.pathsep}{tools}", JAX_PLATFORMS="cpu")
  return env


def test_wheel_installs_and_runs_every_native_op_without_a_toolchain(repaired, tmp_path, timings):
  wheel, _ = repaired
  venv = tmp_path / "venv"
  env = _toolless_env(tmp_path, venv)
  _timed(timings, "venv", [sys.executable, "-m", "venv", str(venv)], env=env,
         timeout=STEP_TIMEOUT_S)
  python = str(venv / "bin" / "python")
  # Wheels only: neither flaxdcn nor any dependency may be built from source here.
  _timed(timings, "pip install", [python, "-m", "pip", "install", "--quiet", "--only-binary",
                                  ":all:", str(wheel)], env=env, cwd=tmp_path,
         timeout=STEP_TIMEOUT_S)
  out = tmp_path / "check.json"
  _timed(timings, "check", [python, str(SCRIPT), str(out)], env=env, cwd=tmp_path,
         timeout=STEP_TIMEOUT_S)
  result = json.loads(out.read_text())
  assert pathlib.Path(result["flaxdcn"]).is_relative_to(venv), result["flaxdcn"]
  assert not any(result["path_tools"].values()), result["path_tools"]
  assert result["build_info"]["cpu"] and result["build_info"]["cuda"], result["build_info"]
  native = {op.name for op in _ffi._OPS}  # pylint: disable=protected-access
  assert set(result["checked"]) == native, result["checked"]
  targets = {t for r in result["checked"].values() for t in r["targets"]}
  assert targets == {op.target for op in _ffi._OPS}  # pylint: disable=protected-access
