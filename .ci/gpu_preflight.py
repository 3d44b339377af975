"""The Python half of .ci/gpu-check's preflight, run by the interpreter the check uses.

Checks what the selected steps need, before any of them spends time, and prints one line per
check::

  ok       <name>: <detail>
  missing  <name>: <what is missing and why the check needs it>
  optional <name>: <detail>            (absent, and the check runs without it)

then writes the facts the report needs (versions, the GPU as jax sees it, flaxdcn's build) to
``--json``. Exit status 0 when nothing required is missing, 1 otherwise; .ci/gpu-check adds its own
checks (``python -m pip``, nvcc, compute-sanitizer) and decides.

  python .ci/gpu_preflight.py --steps build,tests,sanitizers,benchmark --json facts.json
  python .ci/gpu_preflight.py --build-info build.json   # flaxdcn.build_info() after the build
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

#: Distributions whose versions go into the report (absent ones are reported as absent).
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax",
            "optax", "numpy", "torch", "torchvision", "pytest", "pytest-xdist",
            "scikit-build-core", "pybind11")


class Report:
  """The lines printed and whether anything required is missing."""

  def __init__(self):
    self.missing = False

  def ok(self, name: str, detail: str = "") -> None:
    print(f"ok       {name + ':':23s} {detail}".rstrip(), flush=True)

  def miss(self, name: str, detail: str) -> None:
    self.missing = True
    print(f"missing  {name + ':':23s} {detail}", flush=True)

  def optional(self, name: str, detail: str) -> None:
    print(f"optional {name + ':':23s} {detail}", flush=True)


def _version_tuple(text: str) -> tuple[int, ...]:
  return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def build_minimums(repo: str) -> dict[str, str]:
  """The least versions pyproject.toml asks of the build: ``>=`` bounds of [build-system]
  requires (jaxlib's aside: the GPU machine's own jaxlib is the one to build against) and
  [tool.scikit-build] cmake.version."""
  try:
    import tomllib
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
      config = tomllib.load(f)
  except (ImportError, OSError, ValueError):  # Python 3.10, or no pyproject: no bounds to check
    return {}
  minimums = {}
  for requirement in config.get("build-system", {}).get("requires", []):
    match = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement)
    if match and match.group(1) != "jaxlib":
      minimums[match.group(1).replace("-", "_")] = match.group(2)
  cmake = config.get("tool", {}).get("scikit-build", {}).get("cmake", {}).get("version", "")
  if cmake.startswith(">="):
    minimums["cmake"] = cmake[2:]
  return minimums


def _import(report: Report, name: str, why: str, required: bool = True, minimum: str = ""):
  try:
    module = importlib.import_module(name)
  except Exception as e:  # noqa: BLE001 - any failure to import is what the check reports.
    detail = f"import {name} failed ({type(e).__name__}: {e}); {why}"
    (report.miss if required else report.optional)(name, detail)
    return None
  version = str(getattr(module, "__version__", ""))
  if minimum and version and _version_tuple(version) < _version_tuple(minimum):
    report.miss(name, f"version {version}, pyproject.toml asks for {minimum} or newer; {why}")
    return None
  report.ok(name, version)
  return module


def _cmake(report: Report, minimum: str) -> None:
  """cmake on PATH or from the cmake package (scikit-build-core takes either; it would download
  one otherwise, and the GPU machine has no network)."""
  exe = shutil.which("cmake")
  if exe is None:
    try:
      import cmake
      exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except Exception:  # noqa: BLE001 - no cmake package either: reported below.
      exe = None
  if exe is None:
    report.miss("cmake", "neither on PATH nor the cmake package: the build runs it")
    return
  try:
    text = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError) as e:
    report.miss("cmake", f"{exe} --version failed ({e})")
    return
  found = re.search(r"version (\S+)", text)
  version = found.group(1) if found else "unknown"
  if minimum and found and _version_tuple(version) < _version_tuple(minimum):
    report.miss("cmake", f"{exe} is {version}, pyproject.toml asks for {minimum} or newer")
  else:
    report.ok("cmake", f"{version} ({exe})")


def _writable(report: Report, name: str, path: str, why: str) -> None:
  probe = path
  while probe and not os.path.exists(probe):  # an install target may not exist yet
    probe = os.path.dirname(probe)
  if probe and os.access(probe, os.W_OK):
    report.ok(name, path)
  else:
    report.miss(name, f"{path} is not writable; {why}")


def _versions() -> dict[str, str | None]:
  out = {}
  for name in VERSIONS:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def preflight(steps: set[str], repo: str) -> tuple[Report, dict]:
  report = Report()
  facts: dict = {"python": platform.python_version(), "executable": sys.executable}
  if "build" in steps:
    include = sysconfig.get_paths()["include"]
    if os.path.exists(os.path.join(include, "Python.h")):
      report.ok("Python.h", include)
    else:
      report.miss("Python.h", f"not in {include} (sysconfig's include path): the build compiles "
                  "the pybind11 module against it (install the Python development headers)")
    _writable(report, "site-packages", sysconfig.get_paths()["purelib"],
              "pip install -e . writes its editable finder there")
    _writable(report, "build/", os.path.join(repo, "build"), "the build directory of the wheel")
    minimums = build_minimums(repo)
    _import(report, "scikit_build_core", "the build backend (--no-build-isolation: nothing can "
            "be installed on the GPU machine)", minimum=minimums.get("scikit_build_core", ""))
    _import(report, "pybind11", "the native module's bindings",
            minimum=minimums.get("pybind11", ""))
    _cmake(report, minimums.get("cmake", ""))
    jaxlib = _import(report, "jaxlib", "the build compiles against its XLA FFI headers")
    if jaxlib is not None:
      header = os.path.join(os.path.dirname(jaxlib.__file__), "include", "xla", "ffi", "api",
                            "ffi.h")
      if os.path.exists(header):
        report.ok("XLA FFI headers", os.path.dirname(header))
      else:
        report.miss("XLA FFI headers", f"no {header}: the build compiles against it")
  if steps & {"build", "tests", "sanitizers", "benchmark"}:
    _import(report, "flax", "flaxdcn's modules import it")
  if steps & {"tests", "sanitizers"}:
    _import(report, "optax", "test modules import it at collection")
    _import(report, "pytest", "the tests and sanitizer steps run pytest")
  if "tests" in steps:
    _import(report, "xdist", "without it the CUDA tests run in one process", required=False)
  if "benchmark" in steps:
    for name in ("torch", "torchvision"):
      _import(report, name, "the benchmark has no torchvision column without it", required=False)
  jax = _import(report, "jax", "every GPU step runs it")
  if jax is not None and steps:
    try:
      devices = jax.devices("cuda")
    except Exception as e:  # noqa: BLE001 - the message is the report.
      report.miss("CUDA device", f"jax sees no CUDA device ({type(e).__name__}: {e}); run this on "
                  "a GPU machine, or pass --collect-only for a dry run")
    else:
      device = devices[0]
      capability = getattr(device, "compute_capability", None)
      facts.update(device=device.device_kind, device_count=len(devices),
                   compute_capability=capability)
      report.ok("CUDA device", f"{device.device_kind} x {len(devices)}, compute capability "
                f"{capability}")
  if steps and "build" not in steps:
    info = build_info()
    facts["build_info"] = info
    if info.get("cuda"):
      report.ok("flaxdcn CUDA build", f"architectures {info.get('cuda_architectures')}")
    else:
      report.miss("flaxdcn CUDA build", f"flaxdcn has no CUDA kernels ({info.get('error', info)}); "
                  "add the build step (--only build,...)")
  facts["versions"] = _versions()
  return report, facts


def build_info() -> dict:
  try:
    import flaxdcn
    return dict(flaxdcn.build_info())
  except Exception as e:  # noqa: BLE001 - reported, not raised: the report still gets written.
    return {"cuda": False, "error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", default="", help="comma-separated steps the check will run")
  parser.add_argument("--json", help="write the facts here")
  parser.add_argument("--repo", default=os.getcwd(), help="the repository root")
  parser.add_argument("--build-info", metavar="PATH",
                      help="only write flaxdcn.build_info() to PATH (exit 1 without CUDA kernels)")
  args = parser.parse_args(argv)
  if args.build_info:
    info = build_info()
    with open(args.build_info, "w") as f:
      json.dump(info, f, default=str)
    print("build_info:", info)
    return 0 if info.get("cuda") else 1
  report, facts = preflight({s for s in args.steps.split(",") if s}, args.repo)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(facts, f, indent=1, default=str)
  return 1 if report.missing else 0


if __name__ == "__main__":
  sys.exit(main())
