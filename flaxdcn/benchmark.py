"""Speed and memory of flaxdcn's ops against dense convolution and torchvision, in one run.

Usage::

  python -m flaxdcn.benchmark                       # R1 on the default device, float32
  python -m flaxdcn.benchmark --shapes R1,G1,G2 --dtypes float32,bfloat16 --json out.json
  python -m flaxdcn.benchmark --help

Every case is jitted and warmed up, then all cases of one shape are timed in interleaved
repetitions (one call each, round robin) and reported as medians, so slow drifts of the machine
hit every row alike. ``x dense`` is the median over that of a dense ``lax.conv_general_dilated``
of the same shape and pass (forward, or forward+backward with gradients for every differentiable
input); the Deformable Kernels rows are measured against a dense convolution with the scope-sized
kernel (column ``dense is``). ``x peer`` is the ratio to ``torchvision.ops.deform_conv2d``
measured in the same run on the same device, when torch and torchvision are importable.
``temp MiB`` is XLA's compiled temporary allocation (``memory_analysis``), the per-program
peak-memory figure every backend reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import flaxdcn
from flaxdcn import _ffi


@dataclasses.dataclass(frozen=True)
class ConvShape:
  """One deformable-convolution benchmark shape (channels last, 'SAME'-style padding)."""
  name: str
  batch: int
  size: int
  in_features: int
  out_features: int
  kernel: int = 3
  offset_groups: int = 1
  description: str = ""


SHAPES = {
    s.name: s for s in [
        ConvShape("R1", 8, 28, 64, 64, description="reference CPU shape"),
        ConvShape("G1", 8, 50, 256, 256, description="ResNet-50 stage 4 at 800 px"),
        ConvShape("G1g4", 8, 50, 256, 256, offset_groups=4, description="G1, 4 offset groups"),
        ConvShape("G2", 32, 56, 64, 64, description="ResNet stage 1 at 224 px"),
    ]
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Case:
  """A function to time: ``fn(*args)`` is jitted; ``grad_argnums`` are differentiated."""
  shape: str
  dtype: str
  op: str
  impl: str
  fn: Callable[..., Any]
  args: tuple[Any, ...]
  grad_argnums: tuple[int, ...]
  baseline: str = "dense"


def _conv_cases(shape: ConvShape, dtype_name: str, impls: Sequence[str]) -> list[Case]:
  dtype = DTYPES[dtype_name]
  k = shape.kernel
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (shape.batch, shape.size, shape.size, shape.in_features), dtype)
  w = (jax.random.normal(keys[1], (k, k, shape.in_features, shape.out_features), dtype)
       / np.sqrt(k * k * shape.in_features)).astype(dtype)
  kk = k * k * shape.offset_groups
  offsets = jax.random.normal(keys[2], (shape.batch, shape.size, shape.size, 2 * kk), dtype)
  mask = jax.nn.sigmoid(jax.random.normal(keys[3], (shape.batch, shape.size, shape.size, kk),
                                          dtype))
  pad = k // 2

  def dense(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  cases = [Case(shape.name, dtype_name, "conv", "dense", dense, (x, w), (0, 1))]
  for impl in impls:
    if impl == "torchvision":
      continue

    def dcn(x, offsets, mask, w, impl=impl):
      return flaxdcn.deform_conv2d(x, offsets, w, mask, padding=pad,
                                   offset_group_count=shape.offset_groups, implementation=impl)

    cases.append(Case(shape.name, dtype_name, "deform_conv2d", impl, dcn, (x, offsets, mask, w),
                      (0, 1, 2, 3)))
  return cases


def _deformable_kernel_cases(shape: ConvShape, dtype_name: str, scope: int = 5) -> list[Case]:
  """Both Deformable Kernels modules (kernel ``shape.kernel`` in a ``scope``-sized scope) against a
  dense convolution with a ``scope``-sized kernel; offset heads perturbed away from zero so the
  kernel is really resampled."""
  dtype = DTYPES[dtype_name]
  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (shape.batch, shape.size, shape.size, shape.in_features), dtype)
  w = (jax.random.normal(keys[1], (scope, scope, shape.in_features, shape.out_features), dtype)
       / np.sqrt(scope * scope * shape.in_features)).astype(dtype)
  pad = scope // 2

  def dense(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  baseline = f"conv{scope}x{scope}"
  cases = [Case(shape.name, dtype_name, baseline, "dense", dense, (x, w), (0, 1), baseline)]
  for cls in (flaxdcn.GlobalDeformableKernel, flaxdcn.LocalDeformableKernel):
    module = cls(shape.out_features, shape.kernel, scope_size=scope, padding="SAME", dtype=dtype)
    params = jax.jit(module.init)(keys[2], x)["params"]
    head = next(k for k in params if k.endswith("_offset"))
    params = dict(params)
    params[head] = jax.tree_util.tree_map(
        lambda p: 0.05 * jax.random.normal(keys[3], p.shape, p.dtype), params[head])
    cases.append(Case(shape.name, dtype_name, cls.__name__, "xla",
                      lambda p, x, m=module: m.apply({"params": p}, x), (params, x), (0, 1),
                      baseline))
  return cases


def _forward_backward(fn: Callable[..., Any], argnums: tuple[int, ...], args) -> Callable:
  """``args -> grads`` of ``<fn(args), cotangent>`` (a fixed random cotangent, so XLA cannot
  simplify the backward of a plain sum)."""
  out = jax.eval_shape(fn, *args)
  cotangent = jax.random.normal(jax.random.key(1), out.shape, out.dtype)

  def loss(*a):
    return jnp.vdot(fn(*a).astype(jnp.float32), cotangent.astype(jnp.float32))

  return jax.grad(loss, argnums=argnums)


def _temp_mib(jitted, args) -> float | None:
  try:
    analysis = jitted.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20
  except Exception:  # noqa: BLE001 - backends without memory analysis report nothing.
    return None


def _time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds of each ``fn()``; every fn returns only when its work has finished."""
  for fn in fns.values():  # warm-up: compile and first-touch.
    fn()
    fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _torchvision_fns(shape: ConvShape, dtype_name: str, device: str
                     ) -> dict[str, Callable[[], Any]] | None:
  """torchvision.ops.deform_conv2d at the same shape, NCHW, on ``device``; None if unavailable."""
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  tdev = "cuda" if device == "gpu" and torch.cuda.is_available() else "cpu"
  if device == "gpu" and tdev != "cuda":
    return None
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
      dtype_name]
  g = torch.Generator(device="cpu").manual_seed(0)
  k, kk = shape.kernel, shape.kernel ** 2 * shape.offset_groups
  n, s = shape.batch, shape.size

  def rand(*size):
    return torch.randn(*size, generator=g).to(device=tdev, dtype=tdtype).requires_grad_(True)

  x, w = rand(n, shape.in_features, s, s), rand(shape.out_features, shape.in_features, k, k)
  off, mask = rand(n, 2 * kk, s, s), rand(n, kk, s, s)
  cot = torch.randn(n, shape.out_features, s, s, generator=g).to(device=tdev, dtype=tdtype)
  sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)

  def forward():
    with torch.no_grad():
      out = torchvision.ops.deform_conv2d(x, off, w, padding=k // 2, mask=torch.sigmoid(mask))
    sync()
    return out

  def forward_backward():
    out = torchvision.ops.deform_conv2d(x, off, w, padding=k // 2, mask=torch.sigmoid(mask))
    grads = torch.autograd.grad(out, (x, off, mask, w), cot)
    sync()
    return grads

  return {"fwd": forward, "fwd+bwd": forward_backward}


def run(shapes: Sequence[str], dtypes: Sequence[str], impls: Sequence[str], repeats: int,
        backward: bool = True, deformable_kernels: bool = True) -> list[dict[str, Any]]:
  """Measures every (shape, dtype) and returns one row per (op, implementation, pass)."""
  device = jax.devices()[0].platform
  rows: list[dict[str, Any]] = []
  for shape_name in shapes:
    shape = SHAPES[shape_name]
    for dtype_name in dtypes:
      cases = _conv_cases(shape, dtype_name, impls)
      if deformable_kernels:
        cases += _deformable_kernel_cases(shape, dtype_name)
      fns: dict[str, Callable[[], Any]] = {}
      meta: dict[str, tuple[Case, str, float | None]] = {}
      for case in cases:
        passes = {"fwd": case.fn}
        if backward:
          passes["fwd+bwd"] = _forward_backward(case.fn, case.grad_argnums, case.args)
        for pass_name, fn in passes.items():
          jitted = jax.jit(fn)
          key = f"{case.op}/{case.impl}/{pass_name}"
          fns[key] = (lambda jitted=jitted, args=case.args:
                      jax.block_until_ready(jitted(*args)))
          meta[key] = (case, pass_name, _temp_mib(jitted, case.args))
      peer = (_torchvision_fns(shape, dtype_name, device) if "torchvision" in impls else None)
      if peer is not None:
        for pass_name, fn in peer.items():
          if backward or pass_name == "fwd":
            fns[f"deform_conv2d/torchvision/{pass_name}"] = fn
      medians = _time_interleaved(fns, repeats)
      for key, seconds in medians.items():
        op, impl, pass_name = key.split("/")
        baseline = meta[key][0].baseline if key in meta else "dense"
        dense = medians[f"{'conv' if baseline == 'dense' else baseline}/dense/{pass_name}"]
        tv = medians.get(f"{op}/torchvision/{pass_name}")
        rows.append(dict(
            shape=shape_name, dtype=dtype_name, op=op, implementation=impl, pass_=pass_name,
            ms=seconds * 1e3, baseline=baseline, ratio_dense=seconds / dense,
            ratio_peer=(seconds / tv) if tv and impl not in ("torchvision", "dense") else None,
            temp_mib=meta[key][2] if key in meta else None))
  return rows


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  info = dict(date=datetime.date.today().isoformat(), device=str(device.device_kind),
              platform=device.platform, jax=jax.__version__, jaxlib=jax.lib.__version__
              if hasattr(jax.lib, "__version__") else None, flaxdcn=flaxdcn.__version__,
              python=platform.python_version(), cpu=platform.processor() or platform.machine(),
              native=_ffi.build_info() if hasattr(_ffi, "build_info") else None)
  try:
    import jaxlib
    info["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  try:
    import torch
    import torchvision
    info["torch"], info["torchvision"] = torch.__version__, torchvision.__version__
  except ImportError:
    pass
  return info


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  header = ("shape", "dtype", "op", "impl", "pass", "ms", "x dense", "dense is", "x peer",
            "temp MiB")
  lines = [header]
  for r in rows:
    lines.append((
        r["shape"], r["dtype"], r["op"], r["implementation"], r["pass_"], f"{r['ms']:.2f}",
        f"{r['ratio_dense']:.2f}", "conv" if r["baseline"] == "dense" else r["baseline"],
        "" if r["ratio_peer"] is None else f"{r['ratio_peer']:.3f}",
        "" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"))
  widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
  out = []
  for j, line in enumerate(lines):
    out.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
    if j == 0:
      out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(out)


def default_implementations() -> list[str]:
  platform_name = jax.devices()[0].platform
  impls = ["xla"]
  if _ffi.available("cuda" if platform_name == "gpu" else platform_name):
    impls.append("ffi")
  impls.append("torchvision")
  return impls


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m flaxdcn.benchmark", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="shapes:\n" + "\n".join(
          f"  {s.name:5s} N={s.batch}, {s.size}x{s.size}, {s.in_features}->{s.out_features}, "
          f"{s.kernel}x{s.kernel}, offset groups {s.offset_groups}, mask on ({s.description})"
          for s in SHAPES.values()))
  on_gpu = jax.devices()[0].platform == "gpu"
  parser.add_argument("--shapes", default="R1,G1,G1g4,G2" if on_gpu else "R1",
                      help="comma-separated shape names (default: R1 on CPU, all on GPU)")
  parser.add_argument("--dtypes", default="float32",
                      help=f"comma-separated, of {', '.join(DTYPES)} (default float32)")
  parser.add_argument("--implementations", default=",".join(default_implementations()),
                      help="comma-separated, of xla, ffi, torchvision (default: all available)")
  parser.add_argument("--repeats", type=int, default=30, help="timed calls per case (median)")
  parser.add_argument("--forward-only", action="store_true", help="skip forward+backward")
  parser.add_argument("--no-deformable-kernels", action="store_true",
                      help="skip the Deformable Kernels rows (measured against a dense conv with "
                      "the scope-sized kernel)")
  parser.add_argument("--json", metavar="PATH", help="also write environment and rows as JSON")
  args = parser.parse_args(argv)

  shapes = [s for s in args.shapes.split(",") if s]
  dtypes = [d for d in args.dtypes.split(",") if d]
  impls = [i for i in args.implementations.split(",") if i]
  for name, values, allowed in (("shape", shapes, SHAPES), ("dtype", dtypes, DTYPES),
                                ("implementation", impls, ("xla", "ffi", "torchvision"))):
    bad = [v for v in values if v not in allowed]
    if bad:
      parser.error(f"unknown {name} {bad}; choose from {list(allowed)}")

  env = environment()
  rows = run(shapes, dtypes, impls, args.repeats, backward=not args.forward_only,
             deformable_kernels=not args.no_deformable_kernels)
  print(" ".join(f"{k}={v}" for k, v in env.items() if k != "native"))
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  sys.exit(main())
