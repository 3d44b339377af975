"""The one-call GPU check (.ci/gpu-check), everything but the GPU itself.

The script runs here against stand-ins on PATH: ``nvidia-smi``, ``nvcc``, ``compute-sanitizer`` and
a ``python`` that answers ``-m pip``, ``-m pytest`` and ``-m flaxdcn.benchmark`` as each test tells
it (succeed, fail, or sleep past any budget) and runs the real .ci/gpu_preflight.py on stand-in
modules. ``GPU_CHECK_SCALE`` shrinks every budget to a few percent, so that a run takes seconds
and a stand-in that sleeps is cut by its step's budget like a slow step on the GPU machine.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from flaxdcn import _ffi, benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "gpu-check")
sys.path.insert(0, os.path.join(ROOT, ".ci"))
import gpu_report  # noqa: E402  (.ci/gpu_report.py)

#: The budgets of a stub run, and its whole budget (330 s at scale 1).
SCALE = 0.05
TOTAL = 330 * SCALE

#: Node ids the stand-in pytest collects: every family, and the sanitizer subset.
NODEIDS = """\
tests/test_ffi.py::test_cuda_im2col_matches_xla[f32-odd-G3-False]
tests/test_ffi.py::test_cuda_im2col_matches_xla[f32-odd-G3-True]
tests/test_ffi.py::test_cuda_roi_pool_matches_xla[f32-False-C5]
tests/test_ffi.py::test_cuda_matches_torchvision
tests/test_ffi.py::test_cuda_im2col_separate_programs[f32-odd-G3-False]
tests/test_ffi.py::test_cuda_roi_pool_separate_programs[rows-f32-C5-False]
tests/test_ffi.py::test_cuda_roi_pool_separate_programs[per_image-f32-C5-False]
tests/test_dcnv3.py::test_cuda_dcnv3_matches_xla[f32-3x3-False]
tests/test_dcnv3.py::test_cuda_dcnv4_matches_xla_and_padding_channels[f32-3x3-False]
tests/test_dcnv3.py::test_cuda_separate_programs[dcnv3-f32-Cg2-False]
tests/test_dcnv3.py::test_cuda_separate_programs[dcnv4-f32-Cg2-False]
tests/test_cuda_driver.py::test_build_info_reports_the_driver
"""

PYTHON_STUB = r"""#!/usr/bin/env bash
# The GPU machine's python, as far as .ci/gpu-check uses it.
echo "python $*" >> "$STUB_LOG"
if [ "${1:-}" = -m ]; then
  module=$2
  shift 2
  case "$module" in
    pip)
      if [ "${1:-}" = --version ]; then
        [ -n "${STUB_NO_PIP:-}" ] && { echo "No module named pip" >&2; exit 1; }
        echo "pip 24.0 (stub)"
        exit 0
      fi
      echo "pip $* FLAXDCN_CUDA=${FLAXDCN_CUDA:-}" \
        "FLAXDCN_CUDA_ARCHITECTURES=${FLAXDCN_CUDA_ARCHITECTURES:-}" >> "$STUB_LOG"
      case "${STUB_BUILD:-ok}" in
        fail) echo "error: the stub build fails"; exit 1 ;;
        sleep) exec sleep 600 ;;
      esac
      exit 0 ;;
    pytest) exec "$STUB_REAL_PYTHON" "$STUB_DIR/fake_pytest.py" "$@" ;;
    flaxdcn.benchmark) exec "$STUB_REAL_PYTHON" "$STUB_DIR/fake_benchmark.py" "$@" ;;
  esac
  echo "stub python: unexpected -m $module" >&2
  exit 99
fi
case "${1:-}" in
  *gpu_preflight.py)
    PYTHONPATH=$STUB_DIR/modules exec "$STUB_REAL_PYTHON" -S "$STUB_DIR/boot.py" "$@" ;;
esac
exec "$STUB_REAL_PYTHON" "$@"
"""

FAKE_PYTEST = r"""
import os, sys, time
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1] if flag in args else None
markexpr, k = value("-m") or "", value("-k")
junit = next((a.split("=", 1)[1] for a in args if a.startswith("--junitxml=")), None)
ids = [a for a in args if "::" in a]
if not ids:
  ids = open(os.environ["STUB_NODEIDS"]).read().split()
  if "compute_sanitizer" in markexpr:
    ids = [i for i in ids if "separate_programs" in i]
  if k:
    ids = [i for i in ids if k in i]
if "--collect-only" in args:
  print("\n".join(ids) + f"\n\n{len(ids)}/20 tests collected")
  sys.exit(0 if ids else 5)
if not ids:
  sys.exit(5)
tool = os.environ.get("STUB_UNDER_SANITIZER")
mode = os.environ.get("STUB_PYTEST_" + tool.upper() if tool else "STUB_TESTS", "ok")
failed = 0
for i, nodeid in enumerate(ids):
  if mode == "sleep" and i == 1:
    time.sleep(600)
  outcome = "FAILED" if mode == "fail" and i == 1 else "PASSED"
  failed += outcome == "FAILED"
  print(f"{nodeid} {outcome}", flush=True)
if junit:
  cases = "".join(f'<testcase name="{i}">' + ("<failure/>" if mode == "fail" and n == 1 else "")
                  + "</testcase>" for n, i in enumerate(ids))
  open(junit, "w").write(f"<testsuites><testsuite>{cases}</testsuite></testsuites>")
sys.exit(1 if failed else 0)
"""

FAKE_BENCHMARK = r"""
import json, os, sys, time
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
shape, dtype, path = value("--shapes"), value("--dtypes"), value("--json")
if os.environ.get("STUB_BENCH_ONLY", f"{shape} {dtype}") == f"{shape} {dtype}":
  mode = os.environ.get("STUB_BENCH", "ok")
  if mode == "sleep":
    time.sleep(600)
  if mode == "fail":
    print("Traceback: the stub benchmark fails")
    sys.exit(1)
rows = [dict(shape=shape, dtype=dtype, op=op, implementation=impl, pass_="fwd", ms=1.5,
             baseline="conv/dense" if impl != "dense" else "", ratio_dense=1.2, ratio_peer=None,
             temp_mib=3.0) for op, impl in (("conv", "dense"), ("deform_conv2d", "ffi"))]
json.dump({"environment": {"device": "NVIDIA H200"}, "rows": rows}, open(path, "w"))
print(f"| {shape} | {dtype} | ... |")
"""

SANITIZER_STUB = r"""#!/usr/bin/env bash
allocator=${XLA_PYTHON_CLIENT_ALLOCATOR:-}
echo "compute-sanitizer XLA_PYTHON_CLIENT_ALLOCATOR=$allocator $*" >> "$STUB_LOG"
if [ "${1:-}" = --version ]; then echo "Version 2025.3.1 (stub)"; exit 0; fi
tool=memcheck log=/dev/stdout
while [ $# -gt 0 ]; do
  case "$1" in
    --tool) tool=$2; shift 2 ;;
    --log-file) log=$2; shift 2 ;;
    --kernel-name | --report-api-errors | --print-limit) shift 2 ;;
    --*) echo "stub compute-sanitizer: unknown option $1"; exit 98 ;;
    *) break ;;
  esac
done
mode_var="STUB_${tool^^}"
mode=${!mode_var:-ok}
[ "$mode" = sleep ] && exec sleep 600
echo "========= COMPUTE-SANITIZER" > "$log"
STUB_UNDER_SANITIZER=$tool "$@"
status=$?
n=0
if [ "$mode" = error ] || [ "$mode" = foreign ]; then
  kernel="void flaxdcn::cuda::(anonymous namespace)::Dcnv3Kernel<float, 4>(flaxdcn::Dcnv3Params)"
  [ "$mode" = foreign ] && kernel="loop_add_fusion"
  printf '%s\n' "========= Invalid __global__ read of size 16 bytes" \
    "=========     at $kernel+0x1a0" "=========     by thread (3,0,0) in block (0,0,0)" \
    "=========" >> "$log"
  n=1
fi
echo "========= ERROR SUMMARY: $n errors" >> "$log"
exit $status
"""

NVIDIA_SMI_STUB = r"""#!/usr/bin/env bash
echo "nvidia-smi $*" >> "$STUB_LOG"
echo "NVIDIA H200, 580.159.04, 143771 MiB, ${STUB_COMPUTE_CAP:-9.0}, ${STUB_COMPUTE_MODE:-Default}"
"""

NVCC_STUB = r"""#!/usr/bin/env bash
echo "nvcc $*" >> "$STUB_LOG"
printf 'nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n'
"""

BOOT = r"""
import os, runpy, sys, sysconfig
paths = sysconfig.get_paths()
paths.update(include=os.environ["STUB_INCLUDE"], purelib=os.environ["STUB_PURELIB"])
sysconfig.get_paths = lambda *args, **kwargs: dict(paths)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

CMAKE_STUB = r"""#!/usr/bin/env bash
echo "cmake version ${STUB_CMAKE_VERSION:-3.31.6}"
"""

#: Stand-in modules for the preflight: each fails to import when named in STUB_MISSING, and has
#: version STUB_VERSION_<name> (default 99.0).
MODULE = "import _stub; _stub.check(__name__); __version__ = _stub.version(__name__)\n"
MODULES = {
    "_stub.py": textwrap.dedent("""\
        import os
        def check(name):
          if name in os.environ.get("STUB_MISSING", "").split(","):
            raise ImportError(f"No module named {name!r}")
        def version(name):
          return os.environ.get(f"STUB_VERSION_{name}", "99.0")
        """),
    "jaxlib/__init__.py": MODULE,
    "jaxlib/include/xla/ffi/api/ffi.h": "",
    "jax/__init__.py": MODULE + textwrap.dedent("""\
        import os
        class _Device:
          device_kind = "NVIDIA H200"
          compute_capability = "9.0"
        def devices(backend=None):
          if os.environ.get("STUB_NO_GPU"):
            raise RuntimeError("Unknown backend cuda")
          return [_Device()]
        """),
    "flaxdcn/__init__.py": MODULE + textwrap.dedent("""\
        import os
        def build_info():
          return {"cpu": True, "cuda": not os.environ.get("STUB_NO_CUDA_BUILD"),
                  "cuda_architectures": "90-real", "cuda_runtime": (13, 0),
                  "cuda_driver": (13, 0)}
        """),
    **{f"{name}.py": MODULE for name in ("flax", "optax", "scikit_build_core", "pybind11",
                                          "pytest", "xdist", "torch", "torchvision")},
}

#: The system tools .ci/gpu-check and the stubs use: the rest of PATH, so that nothing else of this
#: machine (its nvcc, cmake) stands in for a stub that a test leaves out.
TOOLS = ("bash", "env", "timeout", "awk", "sed", "grep", "tee", "tar", "gzip", "mktemp", "date",
         "nproc", "wc", "head", "tail", "tr", "sleep", "dirname", "rm", "mkdir", "cat", "python3")

STUBS = {"python": PYTHON_STUB, "compute-sanitizer": SANITIZER_STUB,
         "nvidia-smi": NVIDIA_SMI_STUB, "nvcc": NVCC_STUB, "cmake": CMAKE_STUB}


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("stubs")
  for name, text in STUBS.items():
    (root / name).write_text(text)
    (root / name).chmod(0o755)
  for name, text in [("fake_pytest.py", FAKE_PYTEST), ("fake_benchmark.py", FAKE_BENCHMARK),
                     ("boot.py", BOOT), ("nodeids.txt", NODEIDS)]:
    (root / name).write_text(text)
  for name, text in MODULES.items():
    (root / "modules" / name).parent.mkdir(parents=True, exist_ok=True)
    (root / "modules" / name).write_text(text)
  (root / "tools").mkdir()
  for name in TOOLS:
    (root / "tools" / name).symlink_to(shutil.which(name))
  (root / "include").mkdir()
  (root / "include" / "Python.h").write_text("")
  (root / "site-packages").mkdir()
  return root


class Run:
  """One run of .ci/gpu-check against the stubs: its output, status, files and stub calls."""

  def __init__(self, stub_dir, tmp_path, *args, omit=(), **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in STUBS:
      if name not in omit:
        (bin_dir / name).symlink_to(stub_dir / name)
    self.out = tmp_path / "out"
    self.log = tmp_path / "calls.log"
    environ = dict(
        os.environ, PATH=f"{bin_dir}:{stub_dir / 'tools'}", PYTHON=str(bin_dir / "python"),
        OUT=str(self.out), GPU_CHECK_SCALE=str(SCALE), STUB_LOG=str(self.log),
        STUB_DIR=str(stub_dir), STUB_REAL_PYTHON=sys.executable,
        STUB_NODEIDS=str(stub_dir / "nodeids.txt"), STUB_INCLUDE=str(stub_dir / "include"),
        STUB_PURELIB=str(stub_dir / "site-packages"), TMPDIR=str(tmp_path))
    environ.update(env)
    begin = time.monotonic()
    result = subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=environ, capture_output=True,
                            text=True, timeout=120)
    self.seconds = time.monotonic() - begin
    self.status, self.stdout = result.returncode, result.stdout + result.stderr
    self.calls = self.log.read_text().splitlines() if self.log.exists() else []

  def step(self, name):
    """The summary's result column of step ``name`` (None if it is not listed)."""
    match = re.search(rf"^{re.escape(name)} +(\S.*?)  +\d", self.stdout, re.M)
    return match and match.group(1)

  def calls_of(self, word):
    return [c for c in self.calls if c.startswith(word)]

  def __repr__(self):
    return f"exit {self.status}\n{self.stdout[-6000:]}"


@pytest.fixture
def run(stub_dir, tmp_path):
  return lambda *args, **kw: Run(stub_dir, tmp_path, *args, **kw)


def test_every_step_passes(run):
  r = run()
  assert r.status == 0, r
  for name in ("preflight", "build", "tests", "sanitizers", "benchmark"):
    assert r.step(name) == "passed", (name, r)
  assert "gpu-check: all steps passed" in r.stdout
  assert (r.out / "gpu-check.log").read_text() == r.stdout
  # The build: this GPU's architecture only, all cores, nothing fetched.
  (pip,) = [c for c in r.calls if c.startswith("pip install")]
  assert "--no-build-isolation --no-deps --no-index -e ." in pip, pip
  assert "FLAXDCN_CUDA=on FLAXDCN_CUDA_ARCHITECTURES=90-real" in pip, pip
  # The tests: every cuda test of tests/, no grep for files; in 8 xdist workers.
  (tests,) = [c for c in r.calls_of("python -m pytest") if "--collect-only" not in c
              and "::" not in c]
  assert tests.endswith(" tests/") and "-m cuda" in tests and "-n 8" in tests, tests
  assert re.search(r"^tests +passed +[\d.]+ s +[\d.]+ s +12 passed", r.stdout, re.M), r
  # The sanitizers: three tools on the platform allocator; initcheck sees every kernel.
  tools = r.calls_of("compute-sanitizer XLA_PYTHON_CLIENT_ALLOCATOR=platform --tool")
  assert sorted(re.search(r"--tool (\w+)", c).group(1) for c in tools) == [
      "initcheck", "memcheck", "synccheck"], r.calls
  for call in tools:
    assert ("kns=flaxdcn" in call) == ("initcheck" not in call), call
    assert call.count("separate_programs") == 5, call  # the subset, by node id
  # The benchmark: the four default groups first, then more while time is left.
  groups = [re.search(r"--shapes (\S+) --dtypes (\S+)", c).groups()
            for c in r.calls_of("python -m flaxdcn.benchmark")]
  assert groups[:4] == [("G1", "float32"), ("G1g4", "float32"), ("P1", "float32"),
                        ("G1", "bfloat16")], groups
  assert len(groups) == 11, groups
  rows = json.loads((r.out / "benchmark.json").read_text())["rows"]
  assert len(rows) == 2 * len(groups)
  # What comes back: six files, the report among them.
  assert sorted(p.name for p in r.out.iterdir()) == [
      "benchmark.json", "gpu-check-logs.tar.gz", "gpu-check.log", "gpu-table.md",
      "pytest-cuda.xml", "summary.json"]
  table = (r.out / "gpu-table.md").read_text()
  for fact in ("| device | NVIDIA H200 (compute capability 9.0, 143771 MiB) |",
               "| driver | 580.159.04 (CUDA 13.0) |", "| command | `bash .ci/gpu-check` |",
               "Cuda compilation tools, release 13.0", "flaxdcn built for 90-real",
               "| G1 | bfloat16 | deform_conv2d | ffi | fwd | 1.50 | 1.20 | conv |",
               "| sanitizers | passed |"):
    assert fact in table, (fact, table)
  summary = json.loads((r.out / "summary.json").read_text())
  assert [s["step"] for s in summary["steps"]] == ["preflight", "build", "tests", "sanitizers",
                                                   "benchmark"]
  with tarfile.open(r.out / "gpu-check-logs.tar.gz") as tar:
    names = {os.path.basename(n) for n in tar.getnames()}
  assert {"build.log", "tests.log", "sanitizer-memcheck.txt", "bench-G1-float32.json"} <= names


def test_a_slow_step_is_cut_and_the_others_keep_their_time(run):
  r = run(STUB_TESTS="sleep")
  assert r.status == 3, r
  assert r.step("tests") == "cut at its budget", r
  assert re.search(r"^tests .* 1 passed before the cut", r.stdout, re.M), r
  tests_seconds = float(re.search(r"^tests +cut at its budget +([\d.]+) s", r.stdout, re.M)[1])
  assert tests_seconds <= 75 * SCALE + 0.5, r
  assert r.step("sanitizers") == "passed" and r.step("benchmark") == "passed", r
  assert "not everything ran: tests" in r.stdout
  assert r.seconds < TOTAL + 3, r  # the total holds


def test_a_slow_sanitizer_is_cut_alone(run):
  tool = "initcheck"
  r = run(STUB_INITCHECK="sleep")
  assert r.status == 3, r
  assert r.step("sanitizers") == "cut at its budget", r
  assert f"{tool} cut" in r.stdout
  others = {"memcheck", "synccheck", "initcheck"} - {tool}
  assert all(f"{other} passed" in r.stdout for other in others), r
  assert r.step("benchmark") == "passed", r


def test_failures_are_failures_and_the_rest_still_runs(run):
  r = run(STUB_TESTS="fail", STUB_MEMCHECK="error", STUB_INITCHECK="foreign")
  assert r.status == 1, r
  assert r.step("tests") == "failed (pytest exit 1)", r
  assert re.search(r"^tests .* 11 passed, 1 failed", r.stdout, re.M), r
  assert r.step("sanitizers") == "failed", r
  assert "memcheck failed (5 passed; 1 errors in flaxdcn)" in r.stdout, r
  assert "initcheck passed (5 passed; 0 errors in flaxdcn, 1 elsewhere" in r.stdout, r
  assert "Dcnv3Kernel<float, 4>" in r.stdout  # the error itself is shown
  assert r.step("benchmark") == "passed", r
  assert "gpu-check: FAILED: tests sanitizers" in r.stdout


@pytest.mark.parametrize("mode, status, result", [
    ("fail", 1, "failed (pip exit 1)"), ("sleep", 3, "cut at its budget")])
def test_without_a_build_nothing_else_runs(run, mode, status, result):
  r = run(STUB_BUILD=mode)
  assert r.status == status, r
  assert r.step("build") == result, r
  for name in ("tests", "sanitizers", "benchmark"):
    assert r.step(name) == "skipped: no build", (name, r)
  assert not r.calls_of("compute-sanitizer XLA_PYTHON_CLIENT_ALLOCATOR=platform")
  assert not r.calls_of("python -m flaxdcn")


def test_the_benchmark_never_fails_the_run_for_time(run):
  r = run(STUB_BENCH="sleep", STUB_BENCH_ONLY="G1g4 float32")
  assert r.status == 0, r
  assert r.step("benchmark") == "partial (time)", r
  assert re.search(r"cut at the time limit: G1g4 float32", r.stdout), r
  assert r.seconds < TOTAL + 3, r


def test_a_benchmark_error_is_reported(run):
  r = run(STUB_BENCH="fail", STUB_BENCH_ONLY="P1 float32")
  assert r.status == 1, r
  assert r.step("benchmark") == "failed", r
  assert "failed: P1 float32 (exit 1)" in r.stdout, r


def _not_writable(tmp_path):
  """A directory this process cannot write (root writes through modes: /proc then)."""
  path = tmp_path / "read-only"
  path.mkdir()
  path.chmod(0o555)
  for candidate in (str(path), "/proc/1"):
    if not os.access(candidate, os.W_OK):
      return os.path.join(candidate, "site-packages")
  pytest.skip("no unwritable directory here")


@pytest.mark.parametrize("what, env, omit, message", [
    ("pip", dict(STUB_NO_PIP="1"), (), "pip: "),
    ("Python.h", dict(STUB_INCLUDE="/nonexistent"), (), "Python.h: not in /nonexistent"),
    ("site-packages", None, (), "site-packages: "),
    ("flax", dict(STUB_MISSING="flax"), (), "flax: import flax failed"),
    ("optax", dict(STUB_MISSING="optax"), (), "optax: import optax failed"),
    ("scikit_build_core", dict(STUB_MISSING="scikit_build_core"), (),
     "scikit_build_core: import scikit_build_core failed"),
    ("pybind11", dict(STUB_MISSING="pybind11"), (), "pybind11: import pybind11 failed"),
    ("old scikit-build-core", dict(STUB_VERSION_scikit_build_core="0.9.1"), (),
     "scikit_build_core: version 0.9.1, pyproject.toml asks for 0.10 or newer"),
    ("cmake", {}, ("cmake",), "cmake: neither on PATH nor the cmake package"),
    ("old cmake", dict(STUB_CMAKE_VERSION="3.22.1"), (), "pyproject.toml asks for 3.24 or newer"),
    ("jaxlib", dict(STUB_MISSING="jaxlib"), (), "jaxlib: import jaxlib failed"),
    ("nvcc", {}, ("nvcc",), "nvcc: not on PATH"),
    ("compute-sanitizer", {}, ("compute-sanitizer",), "compute-sanitizer: not on PATH"),
    ("GPU", dict(STUB_NO_GPU="1"), (), "CUDA device: jax sees no CUDA device"),
    ("python", dict(PYTHON="/nonexistent/python3"), (), "python: no interpreter"),
])
def test_the_preflight_names_what_is_missing(run, tmp_path, what, env, omit, message):
  if env is None:
    env = dict(STUB_PURELIB=_not_writable(tmp_path))
  r = run(omit=omit, **env)
  assert r.status == 2, r
  assert "gpu-check: cannot run here: missing:" in r.stdout, r
  missing = r.stdout.split("cannot run here: missing:")[1].split("\n==")[0]
  assert message in missing, (message, r)
  assert len(re.findall(r"^  - ", missing, re.M)) == 1, r  # that one and nothing else
  assert "== build" not in r.stdout and not r.calls_of("pip install")  # nothing was spent
  assert r.step("preflight") == "cannot run: missing prerequisites", r
  assert (r.out / "gpu-table.md").exists()


def test_only_and_k_narrow_what_runs(run):
  """No build step: no nvcc needed, the existing CUDA build is checked instead; -k reaches both
  test steps; the left-out steps' budgets go to the selected ones."""
  r = run("--only", "tests,sanitizers", "-k", "roi", omit=("nvcc",))
  assert r.status == 0, r
  assert r.step("build") is None and r.step("benchmark") is None, r
  assert not r.calls_of("pip install") and not r.calls_of("python -m flaxdcn.benchmark")
  assert re.search(r"^ok +flaxdcn CUDA build:", r.stdout, re.M), r
  runs = [c for c in r.calls_of("python -m pytest") if "--collect-only" not in c]
  assert len(runs) == 4, runs  # the tests, and one run under each sanitizer
  assert "-k roi" in runs[0], runs
  for call in runs[1:]:
    assert re.findall(r"tests/\S+::\S+", call) == [
        "tests/test_ffi.py::test_cuda_roi_pool_separate_programs[rows-f32-C5-False]",
        "tests/test_ffi.py::test_cuda_roi_pool_separate_programs[per_image-f32-C5-False]"], call
  budgets = {name: float(m) for name, m in re.findall(
      r"^(tests|sanitizers) +passed +[\d.]+ s +([\d.]+) s", r.stdout, re.M)}
  assert budgets["tests"] > 75 * SCALE and budgets["sanitizers"] > 70 * SCALE, r
  assert budgets["tests"] + budgets["sanitizers"] <= (330 - 25 - 5) * SCALE + 0.1, r
  assert "| command | `bash .ci/gpu-check --only tests,sanitizers -k roi` |" in (
      r.out / "gpu-table.md").read_text()


def test_only_without_a_cuda_build_stops_in_the_preflight(run):
  r = run("--only", "tests", STUB_NO_CUDA_BUILD="1")
  assert r.status == 2, r
  assert "flaxdcn CUDA build: flaxdcn has no CUDA kernels" in r.stdout, r


def test_a_k_that_selects_nothing(run):
  r = run("--only", "tests,sanitizers", "-k", "nothing_matches")
  assert r.status == 1, r
  assert r.step("tests") == "failed: no test selected", r
  assert r.step("sanitizers") == "skipped: no test selected", r


def test_collect_only_with_stubs(run):
  r = run("--collect-only", "-k", "dcnv", STUB_NO_GPU="1", omit=("compute-sanitizer",))
  assert r.status == 0, r
  assert "a real run would stop here" in r.stdout and "jax sees no CUDA device" in r.stdout
  assert re.search(r"^  dcnv3 +2 ", r.stdout, re.M) and re.search(r"^  dcnv4 +2 ", r.stdout,
                                                                    re.M), r
  assert not r.calls_of("pip install")
  assert not r.calls_of("compute-sanitizer XLA_PYTHON_CLIENT_ALLOCATOR=platform")
  assert "(dry run" in (r.out / "gpu-table.md").read_text()


@pytest.mark.parametrize("args, message", [
    (("--only", "tests,lint"), "unknown step 'lint'"), (("--fast",), "unknown argument '--fast'")])
def test_bad_arguments(run, args, message):
  r = run(*args)
  assert r.status == 2 and message in r.stdout, r


def test_help():
  result = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
  assert result.returncode == 0
  assert "--only STEP[,STEP]" in result.stdout and "Exit status" in result.stdout


# --- The report's readers ------------------------------------------------------------------------

def test_sanitizer_log_attribution(tmp_path):
  log = tmp_path / "log.txt"
  log.write_text(textwrap.dedent("""\
      ========= COMPUTE-SANITIZER
      ========= Uninitialized __global__ memory read of size 4 bytes
      =========     at void flaxdcn::cuda::DeformIm2colKernel<float, 4>(...)+0x90
      =========     by thread (0,0,0) in block (0,0,0)
      =========
      ========= Uninitialized __global__ memory read of size 4 bytes
      =========     at input_reduce_fusion+0x40
      =========
      ========= Host API memory access error at host access to 0x7f00 of size 8 bytes
      =========     Saved host backtrace up to driver entry point at error
      =========         Host Frame: flaxdcn::cuda::LaunchDeformIm2col in _native.so
      =========
      ========= ERROR SUMMARY: 5 errors
      """))
  counts = gpu_report.sanitizer_counts(str(log))
  assert (counts["errors"], counts["shown"], counts["flaxdcn"], counts["elsewhere"]) == (5, 3, 2, 1)
  assert gpu_report.format_sanitizer(counts) == (
      "2 errors in flaxdcn, 1 elsewhere (not counted; see the log), 2 not shown")
  assert gpu_report.sanitizer_counts(str(tmp_path / "absent"))["summary"] is False


def test_families_and_counts(tmp_path):
  assert [gpu_report.family(i) for i in NODEIDS.split()] == [
      "conv", "conv", "roi_pool", "conv", "conv", "roi_pool", "roi_pool", "dcnv3", "dcnv4",
      "dcnv3", "dcnv4", "driver"]
  assert gpu_report.family("tests/test_msda.py::test_cuda_ms_deform_attn_matches_xla") == (
      "ms_deform_attn")
  log = tmp_path / "pytest.log"
  log.write_text("[gw0] [ 50%] PASSED tests/a.py::test_x[1]\ntests/a.py::test_y FAILED [100%]\n"
                 "tests/a.py::test_z SKIPPED (no GPU)\n")
  assert gpu_report.format_counts(gpu_report.pytest_counts(str(log))) == (
      "1 passed, 1 failed, 1 skipped before the cut")


def test_benchmark_groups_are_benchmark_shapes():
  script = open(SCRIPT).read()
  groups = [g for line in re.findall(r"^(?:default|extra)_groups=\((.*)\)$", script, re.M)
            for g in re.findall(r'"([^"]+)"', line)]
  assert groups[:4] == ["G1 float32", "G1g4 float32", "P1 float32", "G1 bfloat16"]
  shapes = {**benchmark.SHAPES, **benchmark.ROI_SHAPES, **benchmark.DCNV3_SHAPES,
            **benchmark.MSDA_SHAPES}
  for group in groups:
    shape, dtype = group.split()
    assert shape in shapes and dtype in benchmark.DTYPES, group


# --- On this machine, for real -------------------------------------------------------------------

@pytest.mark.skipif(_ffi._gpu_backend_present(), reason="this machine has a GPU")
def test_without_a_gpu_the_real_preflight_stops_clearly(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, TMPDIR=str(tmp_path))
  result = subprocess.run(["bash", SCRIPT, "--only", "benchmark"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stdout + result.stderr
  assert re.search(r"^  - CUDA device: jax sees no CUDA device", result.stdout, re.M), (
      result.stdout)
  assert "== benchmark" not in result.stdout  # nothing expensive was started
  facts = json.loads((tmp_path / "summary.json").read_text())["facts"]
  assert re.match(r"\d", facts["versions"]["jax"]), facts


@pytest.mark.extended  # collects the whole suite twice in subprocesses: run by .ci/run after it
def test_dry_run_lists_every_family(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, TMPDIR=str(tmp_path))
  result = subprocess.run(["bash", SCRIPT, "--collect-only"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  sections = result.stdout.split("== collect: ")[1:]
  assert len(sections) == 2, result.stdout[-4000:]
  for section, families in zip(sections, [("conv", "roi_pool", "dcnv3", "dcnv4", "driver"),
                                          ("conv", "roi_pool", "dcnv3", "dcnv4")]):
    for name in families:
      count = re.search(rf"^  {name} +(\d+)", section, re.M)
      assert count and int(count.group(1)) > 0, (name, section)
