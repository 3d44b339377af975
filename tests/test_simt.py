"""The CUDA kernels of ``xla_ext/`` compiled for the host and run under a SIMT emulation.

The real ``.cu`` sources of the checkout (``xla_ext/cuda/``, or those of ``$FLAXDCN_SIMT_SOURCES``,
a tree holding an ``xla_ext/``) are compiled by the host C++ compiler with AddressSanitizer and
UndefinedBehaviorSanitizer, against ``tests/simt/simt.h``: the CUDA programming model as
cooperative fibers, with blocks in a shuffled order and every warp intrinsic a synchronisation
point that fails unless every lane it names reaches it (see that header for the full list of
violations it reports). One C++ driver (``tests/simt/driver.{h,cc}``, the case format and
emulated device buffers, plus a ``tests/simt/<op>_cases.cc`` per op family) runs each CUDA launcher
and the CPU kernels (``xla_ext/cpu/<op>_kernels.cc``) on the same inputs, with two block orders;
the tests compare the results within ``tests/tolerances.py`` and the deterministic mode bitwise
across the orders. This file tests the emulation itself, the deformable im2col and RoI pooling
launchers and the accumulation helpers; tests/test_simt_<op>.py the other op families.

The only source change the emulation needs is made here, on copies: ``kernel<<<cfg>>>(args)``
becomes ``::simt::Launch(&kernel, ...cfg)(args)`` and ``__shared__`` declarations become static
variables the emulation tracks (``_rewrite``). The driver is linked once per session from
objects cached in the temporary directory by the digest of their source and every header, so an
edit to one ``.cu`` file recompiles that file alone. ``pytest -m simt`` selects these tests.

Plugging in a new op family ``<op>`` (its ``xla_ext/cuda/<op>_kernels.cu`` and CPU reference
``xla_ext/cpu/<op>_kernels.cc``):
  1. add ``"<op>"`` to ``OPS``: its CUDA and CPU kernels, its CUDA FFI handlers (for the opt-in
     run on the emulated handlers) and ``tests/simt/<op>_cases.cc`` join the one driver;
  2. write ``tests/simt/<op>_cases.cc``: a ``Run<Op>(const Spec&)`` that reads the inputs with
     ``ReadArray``, runs the CPU reference, copies the inputs to ``DeviceBuffer``s and runs the
     launchers (their header has no XLA types) under both block orders (``ForEachBlockOrder``) on
     garbage-filled outputs, and writes every result with ``WriteArray``; register it with
     ``FLAXDCN_SIMT_CASE("<op>", Run<Op>)``;
  3. in ``tests/test_simt_<op>.py``, build ``Case(op, dtype, arrays, **spec)`` objects, run them
     all in one ``_run`` with the ``driver`` fixture and compare with ``_compare``
     (``assert_close``) and ``_bitwise`` where the kernel promises order independence.
  Device intrinsics the new code needs and ``tests/simt/simt.h`` lacks are added there (warp
  intrinsics through ``simt::Sync``); a missing one is a compile error, never a silent no-op.
"""

import concurrent.futures
import hashlib
import math
import os
import re
import subprocess
import tempfile
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from host_build_testing import host_compiler
from tolerances import assert_close

pytestmark = pytest.mark.simt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMT_DIR = os.path.join(ROOT, "tests", "simt")
#: The tree whose ``xla_ext/`` is compiled (a copy with a planted bug, say).
SOURCES = os.path.abspath(os.environ.get("FLAXDCN_SIMT_SOURCES", ROOT))
#: The native op families: each has ``xla_ext/{cpu,cuda}/<op>_kernels.*``,
#: ``xla_ext/cuda/<op>_ffi.cc`` and ``tests/simt/<op>_cases.cc``.
OPS = ("deform_conv", "roi_pool", "dcnv3", "ms_deform_attn")
#: The CUDA translation units under test, in ``xla_ext/``.
CUDA_SOURCES = ["cuda/accumulate.cu", *(f"cuda/{op}_kernels.cu" for op in OPS)]
FLAGS = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wno-unknown-pragmas",
         "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]

DTYPES = {"f32": np.dtype(np.float32), "f64": np.dtype(np.float64),
          "f16": np.dtype(np.float16), "bf16": np.dtype(jnp.bfloat16)}
DTYPE_PARAMS = [pytest.param(name, id=name) for name in DTYPES]


# --- Build -------------------------------------------------------------------------------------

def _toolkit_include():
  """The CUDA toolkit's include directory if its fp16/bf16 headers compile on the host."""
  for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
    if home and os.path.exists(os.path.join(home, "include", "cuda_bf16.h")):
      return os.path.join(home, "include")
  return None


def _kernel_start(text, end):
  """Start of the kernel expression (``name<T, V>``) that ends just before ``text[end]``."""
  i, depth = end, 0
  while i > 0:
    c = text[i - 1]
    if c == ">":
      depth += 1
    elif c == "<":
      depth -= 1
    elif depth == 0 and not (c.isalnum() or c in "_:"):
      break
    elif depth > 0 and c in ";{}()":
      break
    i -= 1
  return i


def _rewrite(text, path):
  """The two source changes the host compiler needs; line numbers are kept."""
  out, pos = [], 0
  for m in re.finditer(r"<<<(.*?)>>>", text, re.S):
    start = _kernel_start(text, m.start())
    kernel = text[start:m.start()]
    name = " ".join(kernel.split()).replace('"', "")
    out += [text[pos:start],
            f'::simt::Launch(&{kernel}, "{name}", __FILE__, __LINE__, {m.group(1)})']
    pos = m.end()
  out.append(text[pos:])
  text = "".join(out)
  text = re.sub(
      r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s*)?([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;",
      r"\1* \2 = ::simt::DynamicShared<\1>(__FILE__, __LINE__);", text)
  text = re.sub(
      r"__shared__\s+(?:__align__\(\s*(\d+)\s*\)\s*)?([\w:<>, ]+?)\s+(\w+)((?:\s*\[[^\]]*\])*)\s*;",
      lambda m: (f"alignas({m.group(1)}) " if m.group(1) else "")
      + f"static {m.group(2)} {m.group(3)}{m.group(4)}; ::simt::DeclareShared("
      f"&{m.group(3)}, sizeof({m.group(3)}), __FILE__, __LINE__);", text)
  return f'#line 1 "{path}"\n' + text


def _headers(include):
  """Every header a unit may include, as one digest (with the flags and the toolkit's path)."""
  paths = []
  for folder in (os.path.join(SOURCES, "xla_ext"), SIMT_DIR):
    for parent, dirs, names in os.walk(folder):
      dirs.sort()
      paths += [os.path.join(parent, n) for n in sorted(names) if n.endswith((".h", ".cuh"))]
  return _digest(*paths, extra=" ".join([*FLAGS, str(include)]))


def _build(cache_dir, compiler, cuda_sources, host_sources, include=None, flags=FLAGS,
           extra_includes=(), shared=False):
  """Links the rewritten CUDA sources and the host sources with the emulation (simt.cc).

  Sources are (root, path relative to root) pairs. Objects are cached in `cache_dir` by the
  digest of their source and of every header, so a change to one .cu file recompiles that file
  alone.
  """
  os.makedirs(cache_dir, exist_ok=True)
  includes = [f"-I{os.path.join(SIMT_DIR, 'include')}", f"-I{SIMT_DIR}", f"-I{SOURCES}"]
  includes.append(f"-I{include}" if include else f"-I{os.path.join(SIMT_DIR, 'fallback')}")
  includes += [f"-I{path}" for path in extra_includes]
  headers = _headers(include) + " ".join(flags)
  units = []
  # Units name their files relative to the tree: a copy of the tree reuses the objects.
  for root, path in cuda_sources:
    with open(os.path.join(root, path)) as f:
      units.append((_unit_name(path).replace(".cu", ".simt.cc"), _rewrite(f.read(), path)))
  for root, path in [*host_sources, (ROOT, "tests/simt/simt.cc")]:
    with open(os.path.join(root, path)) as f:
      units.append((_unit_name(path), f'#line 1 "{path}"\n' + f.read()))

  def compile_one(unit):
    name, text = unit
    key = hashlib.sha256((headers + name + text).encode()).hexdigest()[:20]
    obj = os.path.join(cache_dir, f"{name}.{key}.o")
    if os.path.exists(obj):
      return obj, None
    # Private names until the object is complete: concurrent sessions may build the same one.
    private = os.path.join(cache_dir, f"{name}.{key}.{os.getpid()}.{threading.get_ident()}")
    with open(private + ".cc", "w") as f:
      f.write(text)
    run = subprocess.run([compiler, *flags, *includes, "-c", private + ".cc", "-o",
                          private + ".o"], capture_output=True, text=True, timeout=900)
    if run.returncode == 0:
      os.replace(private + ".o", obj)
    os.remove(private + ".cc")
    return obj, run

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(compile_one, units))
  errors = [run.stderr for _, run in results if run is not None and run.returncode != 0]
  assert not errors, "\n".join(errors)[-8000:]
  objects = [obj for obj, _ in results]
  binary = os.path.join(cache_dir, ("module-" if shared else "driver-") + hashlib.sha256(
      " ".join(objects).encode()).hexdigest()[:20] + (".so" if shared else ""))
  if not os.path.exists(binary):
    private = f"{binary}.{os.getpid()}"
    link = subprocess.run([compiler, *flags, *(["-shared"] if shared else []), *objects, "-o",
                           private],
                          capture_output=True, text=True, timeout=300)
    assert link.returncode == 0, link.stderr[-8000:]
    os.replace(private, binary)
  return binary


def _unit_name(path):
  """A file name for the unit of `path` (relative to its tree): cpu/ and cuda/ share file names."""
  return path.replace("/", "_")


def _digest(*paths, extra=""):
  """Digest of the files' names (relative to their tree, the last two parts) and contents."""
  h = hashlib.sha256(extra.encode())
  for path in paths:
    h.update("/".join(path.split(os.sep)[-2:]).encode())
    with open(path, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def _session_build(cuda_sources, host_sources):
  compiler = host_compiler()
  if compiler is None:
    pytest.skip("no host C++ compiler (set CXX) to build the SIMT emulation")
  cache = os.path.join(tempfile.gettempdir(), "flaxdcn-simt-cache")
  return _build(cache, compiler, cuda_sources, host_sources, include=_toolkit_include())


@pytest.fixture(scope="session")
def driver():
  """The driver binary of every op family, built once per session from cached objects (in the
  temporary directory, by the digest of their inputs)."""
  return _session_build(
      [(SOURCES, f"xla_ext/{name}") for name in CUDA_SOURCES],
      [*((SOURCES, f"xla_ext/cpu/{op}_kernels.cc") for op in OPS),
       *((ROOT, f"tests/simt/{name}") for name in ("driver.cc", "accumulate_cases.cc")),
       *((ROOT, f"tests/simt/{op}_cases.cc") for op in OPS)])


@pytest.fixture(scope="session")
def selftest():
  return _session_build([(ROOT, "tests/simt/selftest.cu")], [])


# --- Running cases -----------------------------------------------------------------------------

class Case:
  """One driver job: a spec, its input arrays, and (after `_run`) its outputs."""

  def __init__(self, op, dtype, arrays, **spec):
    self.op, self.dtype, self.arrays = op, dtype, arrays
    self.spec = {"op": op, "dtype": dtype, "misalign": 0, "seed_a": 1, "seed_b": 2, **spec}
    self.dir = None

  def out(self, name, dtype=None):
    path = os.path.join(self.dir, f"{name}.bin")
    return np.fromfile(path, dtype=DTYPES[self.dtype] if dtype is None else dtype)

  def __repr__(self):
    return " ".join(f"{k}={v}" for k, v in self.spec.items())


def _run(driver, cases, tmp_path):
  """Runs every case through the driver (two processes); fails on any emulation report."""
  for i, case in enumerate(cases):
    case.dir = str(tmp_path / f"case{i}")
    os.makedirs(case.dir)
    with open(os.path.join(case.dir, "spec.txt"), "w") as f:
      f.writelines(f"{k} {v}\n" for k, v in case.spec.items())
    for name, array in case.arrays.items():
      array.tofile(os.path.join(case.dir, f"{name}.bin"))
  env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
             UBSAN_OPTIONS="print_stacktrace=1")
  halves = [cases[0::2], cases[1::2]]

  def run(part):
    return subprocess.run([driver, *(c.dir for c in part)], capture_output=True, text=True,
                          timeout=600, env=env)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = list(pool.map(run, [h for h in halves if h]))
  for part, result in zip(halves, runs):
    if result.returncode != 0:
      pytest.fail(f"driver exited with {result.returncode} on one of:\n"
                  + "\n".join(map(repr, part)) + "\n" + result.stderr[-6000:], pytrace=False)
  return cases


def _as(dtype_name, array):
  with np.errstate(over="ignore"):  # 1e30 is Inf in float16
    return np.asarray(array).astype(DTYPES[dtype_name])


def _acc(dtype_name):
  return np.float64 if dtype_name == "f64" else np.float32


def _compare(case, cuda_name, cpu_name, what):
  cuda = case.out(cuda_name)
  cpu = case.out(cpu_name)
  assert cuda.shape == cpu.shape, what
  assert_close(cuda, cpu, DTYPES[case.dtype], err_msg=f"{what} ({case})")


def _bitwise(case, name_a, name_b, what):
  a, b = case.out(name_a).view(np.uint8), case.out(name_b).view(np.uint8)
  assert np.array_equal(a, b), f"{what} differs between block orders ({case})"


# --- The emulation itself ----------------------------------------------------------------------

#: Scenarios of tests/simt/selftest.cu: None where the kernel is correct (and its result is
#: checked), else what the emulation or a sanitizer must report.
SELFTEST = {
    "block_sum": None,
    "shuffles": None,
    "dynamic_shared_opt_in": None,
    "block_order": None,
    "dynamic_shared_no_opt_in": "past 48 KiB without cudaFuncSetAttribute",
    "exited_lane": "names lane 20 of warp 0, which has exited",
    "divergent": "waits at __shfl_xor_sync at tests/simt/selftest.cu:",
    "partial_warp": "names lane 16 of warp 1, which does not exist",
    "barrier_after_exit": "__syncthreads at tests/simt/selftest.cu:",
    "grid_y": "past the limits (2^31 - 1, 65535, 65535)",
    "grid_x": "past the limits (2^31 - 1, 65535, 65535)",
    "block_threads": "past the limits (1024, 1024, 64; 1024 threads)",
    "empty_grid": "empty grid",
    "misaligned": "misaligned address",
    "out_of_bounds": "AddressSanitizer: ",
}


@pytest.mark.parametrize("scenario", list(SELFTEST))
def test_emulation_catches_what_a_gpu_would_not_forgive(selftest, scenario):
  """Correct kernels compute the right result; every kind of violation the issue lists stops
  the run with a message naming it."""
  run = subprocess.run([selftest, scenario], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
  expected = SELFTEST[scenario]
  if expected is None:
    assert run.returncode == 0, run.stderr[-4000:]
  else:
    assert run.returncode != 0 and expected in run.stderr, run.stderr[-4000:]


# --- Convolution sampling ----------------------------------------------------------------------

#: (N, H, W, C, (kh, kw), (sh, sw), ((pad top, bottom), (left, right)), (dh, dw), G, mask).
#: Group channels 1, 2, 4, 5, 12, 33, 48 and 136 take the wide-vector and scalar paths with 1 to
#: 32 lanes per sample (a lane walks several vectors at 136), in every dtype.
CONV_CASES = {
    "odd-G3": (2, 7, 6, 6, (3, 2), (2, 1), ((1, 0), (0, 2)), (2, 1), 3, True),
    "same": (3, 5, 5, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, False),
    "C48": (1, 6, 5, 48, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, True),
    "C40-G2": (1, 4, 7, 40, (2, 2), (1, 2), ((0, 0), (0, 0)), (1, 1), 2, False),
    "1x1-Cg5": (2, 3, 4, 10, (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 2, True),
    "Cg136": (1, 3, 4, 272, (2, 2), (1, 1), ((0, 1), (1, 0)), (1, 1), 2, True),
    "Cg1": (2, 5, 4, 3, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 3, True),
    "Cg33-stride2": (1, 4, 4, 33, (2, 2), (2, 2), ((1, 0), (0, 1)), (1, 1), 1, False),
}

#: Zero-size axes: no output rows (no sample), no channels, no images, no input rows.
CONV_EMPTY_CASES = {
    "no-samples": (1, 2, 5, 4, (3, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, True),
    "no-channels": (2, 4, 4, 0, (2, 2), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, True),
    "no-images": (0, 4, 4, 4, (2, 2), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, False),
    "no-rows": (1, 0, 3, 4, (2, 2), (1, 1), ((1, 1), (0, 0)), (1, 1), 2, True),
}


def _special_coordinates(size):
  """Coordinates at and around the boundary rule's edges for an axis of `size`."""
  return [-1.0, -1 + 2**-20, -0.5, 0.0, 1.0, size - 1.0, size - 0.5, size - 2**-20, float(size),
          2.25, 1e30, -1e30, np.inf, -np.inf, np.nan]


def conv_case(dtype, geometry, *, seed=0, misalign=0, cotangent_scale=1.0, mask_scale=1.0):
  n, h, w, c, (kh, kw), (sh, sw), ((pt, pb), (pl, pr)), (dh, dw), g, has_mask = geometry
  ho = max(0, (h + pt + pb - dh * (kh - 1) - 1) // sh + 1)
  wo = max(0, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)
  k = kh * kw
  rng = np.random.default_rng(seed)
  inputs = rng.normal(size=(n, h, w, c))
  offsets = 2.0 * rng.normal(size=(n, ho, wo, g, kh, kw, 2))
  # A third of the samples land on special coordinates: exactly on the boundary rule's edges,
  # integers, huge, infinite or NaN.
  base_h = (np.arange(ho)[:, None, None, None] * sh - pt + np.arange(kh)[None, None, :, None] * dh)
  base_w = (np.arange(wo)[None, :, None, None] * sw - pl + np.arange(kw)[None, None, None, :] * dw)
  special_h, special_w = _special_coordinates(h), _special_coordinates(w)
  pick = rng.uniform(size=offsets.shape[:-1]) < 1 / 3
  th = np.asarray(special_h)[rng.integers(len(special_h), size=offsets.shape[:-1])]
  tw = np.asarray(special_w)[rng.integers(len(special_w), size=offsets.shape[:-1])]
  with np.errstate(invalid="ignore"):
    bh = np.broadcast_to(base_h[:, :, None], offsets.shape[1:-1])
    bw = np.broadcast_to(base_w[:, :, None], offsets.shape[1:-1])
    offsets[..., 0] = np.where(pick, th - bh, offsets[..., 0])
    offsets[..., 1] = np.where(pick, tw - bw, offsets[..., 1])
  mask = mask_scale * rng.uniform(0.2, 1.0, size=(n, ho, wo, g * k)) if has_mask else None
  cotangent = cotangent_scale * rng.normal(size=(n, ho, wo, k, c))
  arrays = dict(input=_as(dtype, inputs), offset=_as(dtype, offsets.reshape(n, ho, wo, g * k * 2)),
                mask=_as(dtype, mask if has_mask else np.zeros(0)),
                cotangent=_as(dtype, cotangent))
  return Case("conv", dtype, arrays, batch=n, height=h, width=w, channels=c, out_height=ho,
              out_width=wo, kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw, pad_h=pt,
              pad_w=pl, dilation_h=dh, dilation_w=dw, offset_groups=g,
              has_mask=int(has_mask), misalign=misalign)


def check_conv(case):
  """CUDA (both modes, both orders) against the CPU kernels; bitwise where promised."""
  _compare(case, "cuda_columns_a", "cpu_columns", "columns")
  for mode in ("atomic", "det"):
    for name in ("grad_input", "grad_offset", "grad_mask"):
      _compare(case, f"cuda_{mode}_{name}_a", f"cpu_{name}", f"{mode} {name}")
  _bitwise(case, "cuda_columns_a", "cuda_columns_b", "columns")
  for name in ("grad_offset", "grad_mask"):
    _bitwise(case, f"cuda_atomic_{name}_a", f"cuda_atomic_{name}_b", f"atomic {name}")
  for name in ("grad_input", "grad_offset", "grad_mask"):
    _bitwise(case, f"cuda_det_{name}_a", f"cuda_det_{name}_b", f"deterministic {name}")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_conv_launchers_match_cpu(driver, tmp_path, dtype):
  """Every conv case, with 16-byte-aligned and misaligned (scalar path) buffers."""
  cases = [conv_case(dtype, geometry, seed=i, misalign=0)
           for i, geometry in enumerate(CONV_CASES.values())]
  cases += [conv_case(dtype, CONV_CASES[name], seed=10 + i, misalign=1)
            for i, name in enumerate(["odd-G3", "C48", "Cg136"])]
  for case in _run(driver, cases, tmp_path):
    check_conv(case)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_conv_empty_axes_write_zero_gradients(driver, tmp_path, dtype):
  """No samples, channels, images or rows: every gradient comes back fully written (the buffers
  start as NaN), in both modes."""
  cases = [conv_case(dtype, geometry, seed=i) for i, geometry in enumerate(
      CONV_EMPTY_CASES.values())]
  for case in _run(driver, cases, tmp_path):
    check_conv(case)
    for mode in ("atomic", "det"):
      assert np.all(case.out(f"cuda_{mode}_grad_input_a").astype(np.float64) == 0), case


def test_conv_fixed_point_extremes(driver, tmp_path):
  """float64 fixed point stays exact to the dtype's tolerance for cotangents of 1e-300 (the
  scale 2^(62 - e) alone would overflow) and for a bound past the double range."""
  tiny = conv_case("f64", CONV_CASES["odd-G3"], seed=3, cotangent_scale=1e-300)
  huge = conv_case("f64", CONV_CASES["C48"], seed=4, cotangent_scale=1e300, mask_scale=1e7)
  subnormal = conv_case("f64", CONV_CASES["same"], seed=5, cotangent_scale=1e-310)
  _run(driver, [tiny, huge, subnormal], tmp_path)
  for case, scale in ((tiny, 1e-300), (huge, 1.0), (subnormal, 1e-310)):
    cpu = case.out("cpu_grad_input")
    assert np.all(np.isfinite(cpu)) and np.max(np.abs(cpu)) > 0, case
    for order in ("a", "b"):
      det = case.out(f"cuda_det_grad_input_{order}")
      # Relative to the gradient's own scale: the absolute tolerance would pass anything here.
      assert_close(det / scale, cpu / scale, np.float64, err_msg=f"deterministic ({case})")
    _bitwise(case, "cuda_det_grad_input_a", "cuda_det_grad_input_b", "deterministic grad_input")


# --- RoI pooling -------------------------------------------------------------------------------

#: RoIs inside, across and outside the image, degenerate and reversed, with fractional, negative,
#: past-the-batch and non-finite batch indices or corners (feature map 9 x 11, spatial scale 0.5).
ROIS = np.array([
    [0, 2.3, 3.1, 15.2, 12.7], [1, -6.0, -4.0, 30.0, 26.0], [0, 4.0, 4.0, 4.5, 5.0],
    [1, 9.0, 8.0, 3.0, 2.0], [0.7, 0.0, 0.0, 21.0, 17.0], [-0.5, 1.0, 1.0, 5.0, 5.0],
    [2, 1.0, 1.0, 5.0, 5.0], [-1, 1.0, 1.0, 5.0, 5.0], [1, 40.0, 30.0, 60.0, 50.0],
    [0, -30.0, -20.0, -2.5, -1.5], [1, 17.5, 13.0, 23.0, 19.0], [np.nan, 1.0, 1.0, 5.0, 5.0],
    [0, 1.0, np.inf, 5.0, 5.0], [1, -1e30, -1e30, 1e30, 1e30], [0, 3.0, 3.0, 3.0, 3.0]])


def roi_case(dtype, channels, sampling_ratio, *, has_offsets=True, rois=ROIS, seed=0,
             misalign=0, size=(9, 11), out=(3, 2)):
  rng = np.random.default_rng(seed)
  n_rois = len(rois)
  features = rng.normal(size=(2, *size, channels))
  offsets = 2 * rng.normal(size=(n_rois, *out, 2))
  if n_rois >= 2 and out[0] >= 2 and out[1] >= 1:
    offsets[0, 0, 0] = (np.nan, 0.5)
    offsets[1, 1, 0] = (np.inf, -np.inf)
  cotangent = rng.normal(size=(n_rois, *out, channels))
  arrays = dict(features=_as(dtype, features),
                rois=np.asarray(rois, _acc(dtype)).reshape(-1),
                offset=_as(dtype, offsets if has_offsets else np.zeros(0)),
                cotangent=_as(dtype, cotangent))
  return Case("roi", dtype, arrays, batch=2, height=size[0], width=size[1], channels=channels,
              rois=n_rois, out_height=out[0], out_width=out[1], spatial_scale=0.5,
              sampling_ratio=sampling_ratio, gamma=0.1, has_offsets=int(has_offsets),
              misalign=misalign)


def check_roi(case):
  _compare(case, "cuda_pooled_a", "cpu_pooled", "pooled")
  for mode in ("atomic", "det"):
    for name in ("grad_features", "grad_offset"):
      _compare(case, f"cuda_{mode}_{name}_a", f"cpu_{name}", f"{mode} {name}")
  _bitwise(case, "cuda_pooled_a", "cuda_pooled_b", "pooled")
  _bitwise(case, "cuda_atomic_grad_offset_a", "cuda_atomic_grad_offset_b", "atomic grad_offset")
  for name in ("grad_features", "grad_offset"):
    _bitwise(case, f"cuda_det_{name}_a", f"cuda_det_{name}_b", f"deterministic {name}")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_roi_launchers_match_cpu(driver, tmp_path, dtype):
  """Adaptive and fixed sub-grids, with and without offsets; 1 to 132 channels (wide and scalar
  vectors, 1 to 32 lanes), aligned and misaligned."""
  cases = [roi_case(dtype, c, ratio, has_offsets=offsets, seed=i)
           for i, (c, ratio, offsets) in enumerate([
               (5, 0, True), (5, 2, False), (1, 2, True), (8, 0, True), (40, 2, True),
               (132, 0, False), (16, 1, True)])]
  cases += [roi_case(dtype, c, 2, seed=20 + c, misalign=1) for c in (8, 40)]
  for case in _run(driver, cases, tmp_path):
    check_roi(case)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_roi_empty_axes_write_zero_gradients(driver, tmp_path, dtype):
  """No RoI, no bin or no channel: gradients come back fully written (zero)."""
  cases = [roi_case(dtype, 4, 2, rois=np.zeros((0, 5))),
           roi_case(dtype, 4, 0, out=(0, 2)),
           roi_case(dtype, 0, 2)]
  for case in _run(driver, cases, tmp_path):
    check_roi(case)
    for mode in ("atomic", "det"):
      assert np.all(case.out(f"cuda_{mode}_grad_features_a").astype(np.float64) == 0), case


# --- The accumulation helpers ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_max_abs(driver, tmp_path, dtype):
  """max |x| over the finite entries, for sizes around a block and a warp, into either slot."""
  cases = []
  for i, n in enumerate([1, 31, 256, 257, 3001]):
    x = np.random.default_rng(i).normal(size=n) * 3.0
    x[::7] = np.inf
    x[1::11] = -np.inf
    x[2::13] = np.nan
    cases.append(Case("maxabs", dtype, {"x": _as(dtype, x)}, n=n, slot=i % 2, misalign=i % 2))
  for case in _run(driver, cases, tmp_path):
    x = case.arrays["x"].astype(np.float64)
    finite = np.abs(x[np.isfinite(x)])
    expected = finite.max(initial=0.0)
    got = case.out("cuda_max_bits", np.float64)
    slot = case.spec["slot"]
    assert got[slot] == expected and got[1 - slot] == 0.0, (case, got, expected)


#: (max |cotangent|, max |mask| or None, factor): zero, subnormal, tiny, unit, huge and largest.
SCALE_CASES = [(0.0, None, 1.0), (5e-324, None, 1.0), (1e-300, None, 9.0), (1e-300, 1e-20, 6.0),
               (1.0, None, 1.0), (0.75, 0.5, 48.0), (3.0, 1.0, 2.0**40), (1e300, None, 9.0),
               (1e300, 1e10, 64.0), (np.finfo(np.float64).max, np.finfo(np.float64).max, 9.0),
               (5e-324, 5e-324, 1.0)]


def test_fixed_point_scale(driver, tmp_path):
  """The scale is a normal power-of-two pair whose product 2^s puts the bound of any sum just
  under 2^62: s = 62 - e for the smallest e with (the largest possible contribution) * factor
  < 2^e, however tiny or huge the maxima."""
  cases = []
  for first, second, factor in SCALE_CASES:
    bits = lambda v: format(int(np.float64(v).view(np.uint64)), "x")
    cases.append(Case("scale", "f64", {}, first_bits=bits(first),
                      second_bits=bits(1.0 if second is None else second),
                      use_second=int(second is not None), factor=repr(factor)))
  for case, (first, second, factor) in zip(_run(driver, cases, tmp_path), SCALE_CASES):
    s1, s2 = case.out("cuda_scale", np.float64)
    for s in (s1, s2):
      assert np.isfinite(s) and s >= np.finfo(np.float64).tiny and math.frexp(s)[0] == 0.5, case
    shift = (math.frexp(s1)[1] - 1) + (math.frexp(s2)[1] - 1)
    # The largest contribution: the product of the maxima, rounded, within the double range.
    e = sum(math.frexp(v)[1] if v > 0 else 0 for v in (first, 1.0 if second is None else second))
    e = min(max(e, -1073), 1024) + math.frexp(factor)[1]
    assert shift == 62 - e, (case, shift, e)
    # Exact check that the bound fits: product * factor * 2^shift < 2^62 (in fractions).
    from fractions import Fraction
    bound = Fraction(first) * Fraction(1.0 if second is None else second) * Fraction(factor)
    bound = min(bound, Fraction(2) ** 1024 * Fraction(factor))
    assert bound * Fraction(2) ** shift < Fraction(2) ** 62, case


def test_workspace_alignment_is_what_xla_grants(driver, tmp_path):
  """XLA's scratch allocator rejects alignments above 16 bytes: the CUDA launches ask for
  kWorkspaceAlignment (xla_ext/cuda/ffi_context.h), which must not exceed that. Every emulated
  backward above ran on a workspace 16 bytes past a 256-byte boundary, so nothing needs more."""
  (case,) = _run(driver, [Case("info", "f32", {})], tmp_path)
  with open(os.path.join(case.dir, "info.txt")) as f:
    info = dict(line.split() for line in f)
  assert int(info["workspace_alignment"]) <= 16
  with open(os.path.join(SOURCES, "xla_ext", "cuda", "ffi_context.h")) as f:
    handlers = f.read()
  requests = re.findall(r"\.Allocate\(([^)]*)\)", handlers)
  assert requests and all(r.split(",")[-1].strip() == "kWorkspaceAlignment" for r in requests), \
      requests


# --- The host fp16/bf16 headers used where no CUDA toolkit is installed ------------------------

def _is_nan_half(bits, exponent_mask, mantissa_mask):
  return ((bits & exponent_mask) == exponent_mask) & ((bits & mantissa_mask) != 0)


def test_fallback_fp16_bf16_match_the_toolkit(tmp_path):
  """tests/simt/fallback's conversions equal the toolkit's on every half and bfloat16 and on a
  sweep of floats with the rounding ties (NaN payloads aside)."""
  compiler, include = host_compiler(), _toolkit_include()
  if compiler is None:
    pytest.skip("no host C++ compiler (set CXX)")
  if include is None:
    pytest.skip("no CUDA toolkit to compare the fallback headers with")
  tables = []
  for name, folder in (("toolkit", include), ("fallback", os.path.join(SIMT_DIR, "fallback"))):
    binary = str(tmp_path / name)
    build = subprocess.run([compiler, "-std=c++17", "-O1", f"-I{folder}", f"-I{SOURCES}",
                            os.path.join(SIMT_DIR, "fp16_table.cc"), "-o", binary],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    tables.append(np.frombuffer(subprocess.run([binary], capture_output=True, timeout=60,
                                               check=True).stdout, np.uint32))
  toolkit, fallback = tables
  widened_t, widened_f = toolkit[:2 * 65536].view(np.float32), fallback[:2 * 65536].view(np.float32)
  np.testing.assert_array_equal(widened_f, widened_t)  # NaN == NaN here
  narrowed_t, narrowed_f = toolkit[2 * 65536:], fallback[2 * 65536:]
  nan_t = np.concatenate([_is_nan_half(narrowed_t[0::2], 0x7c00, 0x3ff)[:, None],
                          _is_nan_half(narrowed_t[1::2], 0x7f80, 0x7f)[:, None]], 1).ravel()
  nan_f = np.concatenate([_is_nan_half(narrowed_f[0::2], 0x7c00, 0x3ff)[:, None],
                          _is_nan_half(narrowed_f[1::2], 0x7f80, 0x7f)[:, None]], 1).ravel()
  np.testing.assert_array_equal(nan_f, nan_t)
  np.testing.assert_array_equal(narrowed_f[~nan_t], narrowed_t[~nan_t])


def test_kernels_compile_against_the_fallback_headers(tmp_path):
  """Where no toolkit is installed the emulation uses tests/simt/fallback: the CUDA sources must
  compile against it too."""
  compiler = host_compiler()
  if compiler is None:
    pytest.skip("no host C++ compiler (set CXX)")
  includes = [f"-I{os.path.join(SIMT_DIR, 'include')}", f"-I{SIMT_DIR}", f"-I{SOURCES}",
              f"-I{os.path.join(SIMT_DIR, 'fallback')}"]
  for name in CUDA_SOURCES:
    unit = tmp_path / _unit_name(name).replace(".cu", ".simt.cc")
    with open(os.path.join(SOURCES, "xla_ext", name)) as f:
      unit.write_text(_rewrite(f.read(), f"xla_ext/{name}"))
    run = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-Wall",
                          "-Wno-unknown-pragmas", *includes, str(unit)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]


# --- The CUDA FFI handlers, from JAX ------------------------------------------------------------

#: The suites that run on the emulated CUDA handlers, and the selection: every test of
#: test_ffi.py and the ``[ffi]`` tests of test_dcnv3.py and test_ms_deform_attn.py, but the check
#: that the real build compiled CUDA and the CPU-only promises that both backward modes agree
#: bitwise.
FFI_SUITES = ("tests/test_ffi.py", "tests/test_dcnv3.py", "tests/test_ms_deform_attn.py")
FFI_SELECTION = ("ffi and not cuda_kernels_compiled and not cpu_backward_is_deterministic "
                 "and not backward_reproducible")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FLAXDCN_SIMT_FFI") != "1",
                    reason="opt-in (FLAXDCN_SIMT_FFI=1): past the CI budget of the simt tests")
def test_ffi_suite_on_the_emulated_cuda_handlers(tmp_path):
  """tests/test_ffi.py, test_dcnv3.py and test_ms_deform_attn.py (ffi against the jnp
  implementation and loops: gradients, vmap, jit, sharding) with ``flaxdcn._native`` replaced by the CUDA FFI handlers
  (xla_ext/cuda/<op>_ffi.cc) and the CUDA kernels under the emulation, registered as CPU targets
  (tests/simt/native.cc). Their device allocator rejects alignments above 16 bytes, as XLA's
  does. ``$FLAXDCN_SIMT_FFI_K`` replaces the ``-k`` selection."""
  import sys
  import sysconfig

  import jax.ffi
  import pybind11

  compiler = host_compiler()
  if compiler is None:
    pytest.skip("no host C++ compiler (set CXX) to build the SIMT emulation")
  flags = ["-std=c++17", "-O1", "-g", "-fPIC", "-fvisibility=hidden", "-DFLAXDCN_WITH_CUDA",
           "-Wall", "-Wno-unknown-pragmas"]
  module = _build(os.path.join(tempfile.gettempdir(), "flaxdcn-simt-cache"), compiler,
                  [(SOURCES, f"xla_ext/{name}") for name in CUDA_SOURCES],
                  [*((SOURCES, f"xla_ext/cuda/{op}_ffi.cc") for op in OPS),
                   (ROOT, "tests/simt/native.cc")],
                  include=_toolkit_include(), flags=flags, shared=True,
                  extra_includes=[pybind11.get_include(), sysconfig.get_paths()["include"],
                                  jax.ffi.include_dir()])
  env = dict(os.environ, FLAXDCN_SIMT_NATIVE=module,
             PYTHONPATH=os.pathsep.join([SIMT_DIR, os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "simt_native_plugin",
                        "-p", "no:cacheprovider", *FFI_SUITES, "-k",
                        os.environ.get("FLAXDCN_SIMT_FFI_K", FFI_SELECTION)],
                       capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
  assert run.returncode == 0, (run.stdout + run.stderr)[-8000:]
  assert re.search(r"\b\d+ passed", run.stdout), run.stdout[-2000:]
