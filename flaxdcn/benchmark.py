"""Speed and memory of flaxdcn's ops against dense convolution and torchvision, in one run.

Usage::

  python -m flaxdcn.benchmark                       # R1, R2, P1, A1 on the CPU (float32)
  python -m flaxdcn.benchmark --shapes R1,G1,G2 --dtypes float32,bfloat16 --json out.json
  python -m flaxdcn.benchmark --help

Every case is jitted and warmed up, then all cases of one shape are timed in interleaved
rounds (each case in turn: one untimed call, then a few timed calls in a row) and reported as
medians, so slow drifts of the machine hit every row alike. ``x base`` is the median over that of the row named in ``base``, same shape
and pass (forward, or forward+backward with gradients for every differentiable input):
``deform_conv2d`` against a dense ``lax.conv_general_dilated``, the Deformable Kernels modules
against a dense convolution with the scope-sized kernel, ``deform_roi_pool`` (modulated) against
plain RoI pooling, ``ms_deform_attn`` against its own pure-jnp implementation (``xla``). ``x peer``
is the ratio to the PyTorch peer measured in the same run on the same device, when torch and
torchvision are importable: torchvision's ``deform_conv2d`` and ``roi_align``, and for
``ms_deform_attn`` Deformable DETR's ``ms_deform_attn_core_pytorch`` (``grid_sample`` per level,
the reference every port of Deformable DETR starts from).
``temp MiB`` is XLA's compiled temporary allocation (``memory_analysis``), the per-program
peak-memory figure every backend reports; ``input MiB`` the size of the op's input feature map
(``[N, H, W, C]``; the value of ``ms_deform_attn``), and ``temp / input`` their ratio.
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
        ConvShape("R2", 4, 56, 128, 128, description="larger CPU shape, 8x R1's multiply-adds"),
        ConvShape("G1", 8, 50, 256, 256, description="ResNet-50 stage 4 at 800 px"),
        ConvShape("G1g4", 8, 50, 256, 256, offset_groups=4, description="G1, 4 offset groups"),
        ConvShape("G2", 32, 56, 64, 64, description="ResNet stage 1 at 224 px"),
    ]
}


@dataclasses.dataclass(frozen=True)
class RoIShape:
  """One deformable RoI pooling benchmark shape (features at ``1 / stride`` of the image)."""
  name: str
  batch: int
  size: int
  channels: int
  rois: int
  output: int = 7
  stride: int = 16
  description: str = ""


#: DCNv3 / DCNv4 shapes (G = offset_groups), measured against a depthwise 3x3 convolution; the
#: conv shapes get these rows too, with G = 4.
DCNV3_SHAPES = {
    s.name: s for s in [
        ConvShape("V1", 8, 56, 64, 64, offset_groups=4,
                  description="InternImage-like DCNv3/DCNv4 layer, against a depthwise conv"),
    ]
}


ROI_SHAPES = {
    s.name: s for s in [
        RoIShape("P1", 2, 50, 256, 512, description="Faster R-CNN head at 800 px"),
    ]
}


@dataclasses.dataclass(frozen=True)
class MsdaShape:
  """One multi-scale deformable attention shape: ``N`` images, ``L`` levels, ``Lq`` queries
  (None: one per value row, ``Lq = S``, the encoder's self-attention), ``M`` heads of ``D``
  channels, ``P`` points per head and level."""
  name: str
  batch: int
  levels: tuple[tuple[int, int], ...]
  queries: int | None = None
  heads: int = 8
  head_dim: int = 32
  points: int = 4
  description: str = ""

  @property
  def num_values(self) -> int:
    return sum(h * w for h, w in self.levels)

  @property
  def num_queries(self) -> int:
    return self.num_values if self.queries is None else self.queries


#: Deformable DETR's encoder at 800 x 1067 (strides 8 to 64), and its decoder's 300 queries.
_DETR_LEVELS = ((100, 134), (50, 67), (25, 34), (13, 17))

MSDA_SHAPES = {
    s.name: s for s in [
        MsdaShape("A1", 2, ((32, 32), (16, 16), (8, 8), (4, 4)),
                  description="CPU encoder self-attention, Lq = S = 1360"),
        MsdaShape("A2", 2, _DETR_LEVELS,
                  description="Deformable DETR encoder at 800x1067, Lq = S = 17821"),
        MsdaShape("A3", 2, _DETR_LEVELS, queries=300,
                  description="Deformable DETR decoder, 300 queries on A2's value"),
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
  baseline: str = "conv/dense"  # op/impl of the row every ratio of this case is taken against
  input_arg: int = 0  # the argument that is the op's input feature map (``input MiB``)


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


def _dcnv3_cases(shape: ConvShape, dtype_name: str, impls: Sequence[str], groups: int
                 ) -> list[Case]:
  """``dcnv3`` and ``dcnv4`` (3x3, padding 1) against a depthwise 3x3 ``lax.conv_general_dilated``
  (``feature_group_count = C``): the same sampling footprint without the deformation."""
  dtype = DTYPES[dtype_name]
  n, size, c, points = shape.batch, shape.size, shape.in_features, 9
  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (n, size, size, c), dtype)
  w = (jax.random.normal(keys[1], (3, 3, 1, c), dtype) / 3).astype(dtype)
  offsets = jax.random.normal(keys[2], (n, size, size, groups * points * 2), dtype)
  logits = jax.random.normal(keys[3], (n, size, size, groups, points))
  mask = jax.nn.softmax(logits, -1).reshape(n, size, size, groups * points).astype(dtype)
  width = -(-groups * points * 3 // 8) * 8
  packed = jnp.concatenate([offsets.reshape(n, size, size, groups, 2 * points),
                            mask.reshape(n, size, size, groups, points)], -1)
  offset_mask = jnp.pad(packed.reshape(n, size, size, -1),
                        ((0, 0), (0, 0), (0, 0), (0, width - groups * points * 3)))

  def depthwise(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=c)

  base = "dwconv/dense"
  cases = [Case(shape.name, dtype_name, "dwconv", "dense", depthwise, (x, w), (0, 1), base)]
  for impl in impls:
    if impl == "torchvision":
      continue
    kw = dict(kernel_size=3, padding=1, group_count=groups, implementation=impl)
    cases.append(Case(shape.name, dtype_name, "dcnv3", impl,
                      lambda x, o, m, kw=kw: flaxdcn.dcnv3(x, o, m, **kw), (x, offsets, mask),
                      (0, 1, 2), base))
    cases.append(Case(shape.name, dtype_name, "dcnv4", impl,
                      lambda x, om, kw=kw: flaxdcn.dcnv4(x, om, **kw), (x, offset_mask), (0, 1),
                      base))
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

  op = f"conv{scope}x{scope}"
  baseline = f"{op}/dense"
  cases = [Case(shape.name, dtype_name, op, "dense", dense, (x, w), (0, 1), baseline)]
  for cls in (flaxdcn.GlobalDeformableKernel, flaxdcn.LocalDeformableKernel):
    module = cls(shape.out_features, shape.kernel, scope_size=scope, padding="SAME", dtype=dtype)
    params = jax.jit(module.init)(keys[2], x)["params"]
    head = next(k for k in params if k.endswith("_offset"))
    params = dict(params)
    params[head] = jax.tree_util.tree_map(
        lambda p: 0.05 * jax.random.normal(keys[3], p.shape, p.dtype), params[head])
    cases.append(Case(shape.name, dtype_name, cls.__name__, "xla",
                      lambda p, x, m=module: m.apply({"params": p}, x), (params, x), (0, 1),
                      baseline, input_arg=1))
  return cases


def _roi_cases(shape: RoIShape, dtype_name: str, impls: Sequence[str]) -> list[Case]:
  """Modulated deformable RoI pooling against plain RoI pooling (no offsets, no mask) of the
  default implementation; mmcv's defaults (adaptive sub-grid, gamma 0.1)."""
  dtype = DTYPES[dtype_name]
  features, rois = _roi_inputs(shape)
  features = features.astype(dtype)
  keys = jax.random.split(jax.random.key(3), 2)
  out = shape.output
  offsets = (0.3 * jax.random.normal(keys[0], (shape.rois, out, out, 2))).astype(dtype)
  mask = jax.nn.sigmoid(jax.random.normal(keys[1], (shape.rois, out, out))).astype(dtype)
  kwargs = dict(output_size=out, spatial_scale=1 / shape.stride)

  def plain(features):
    return flaxdcn.deform_roi_pool(features, rois, **kwargs)

  baseline = "roi_pool_plain/default"
  cases = [Case(shape.name, dtype_name, "roi_pool_plain", "default", plain, (features,), (0,),
                baseline)]
  for impl in impls:
    if impl == "torchvision":
      continue

    def pool(features, offsets, mask, impl=impl):
      return flaxdcn.deform_roi_pool(features, rois, offsets, mask, **kwargs,
                                     implementation=impl)

    cases.append(Case(shape.name, dtype_name, "deform_roi_pool", impl, pool,
                      (features, offsets, mask), (0, 1, 2), baseline))
  return cases


def _msda_inputs(shape: MsdaShape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """float32 ``value [N, S, M, D]``, ``sampling_locations [N, Lq, M, L, P, 2]`` (uniform on the
  maps) and ``attention_weights [N, Lq, M, L, P]`` (a softmax over ``L * P``)."""
  rng = np.random.default_rng(5)
  n, lq, m, levels, p = (shape.batch, shape.num_queries, shape.heads, len(shape.levels),
                         shape.points)
  value = rng.standard_normal((n, shape.num_values, m, shape.head_dim), np.float32)
  locations = rng.random((n, lq, m, levels, p, 2), np.float32)
  logits = rng.standard_normal((n, lq, m, levels * p), np.float32)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = (weights / weights.sum(-1, keepdims=True)).reshape(n, lq, m, levels, p)
  return value, locations, weights


def _msda_cases(shape: MsdaShape, dtype_name: str, impls: Sequence[str]) -> list[Case]:
  """``ms_deform_attn`` by each implementation, measured against the pure-jnp one."""
  dtype = DTYPES[dtype_name]
  value, locations, weights = _msda_inputs(shape)
  args = (jnp.asarray(value, dtype), jnp.asarray(locations), jnp.asarray(weights, dtype))
  baseline = "ms_deform_attn/xla"
  cases = []
  for impl in impls:
    if impl == "torchvision":
      continue

    def attn(value, locations, weights, impl=impl):
      return flaxdcn.ms_deform_attn(value, shape.levels, locations, weights,
                                    implementation=impl)

    cases.append(Case(shape.name, dtype_name, "ms_deform_attn", impl, attn, args, (0, 1, 2),
                      baseline))
  return cases


def _roi_inputs(shape: RoIShape) -> tuple[jax.Array, jax.Array]:
  """Features ``[N, S, S, C]`` and ``shape.rois`` boxes of 16 to 400 pixels inside the image."""
  keys = jax.random.split(jax.random.key(4), 4)
  image = shape.size * shape.stride
  features = jax.random.normal(keys[0], (shape.batch, shape.size, shape.size, shape.channels))
  size = jnp.exp(jax.random.uniform(keys[1], (shape.rois, 2), minval=np.log(16),
                                    maxval=np.log(400)))
  corner = jax.random.uniform(keys[2], (shape.rois, 2)) * (image - size)
  index = jax.random.randint(keys[3], (shape.rois, 1), 0, shape.batch).astype(jnp.float32)
  rois = jnp.concatenate([index, corner, corner + size], axis=1)
  return features, rois


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


def _time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, rounds: int = 5
                      ) -> dict[str, float]:
  """Median seconds of each ``fn()``; every fn returns only when its work has finished.

  The cases take turns in ``rounds`` rounds; in each round a case runs once untimed, then
  ``repeats / rounds`` timed calls in a row. Taking turns spreads slow drifts of the machine over
  every case; the untimed call and the short runs keep one case's memory traffic (XLA:CPU
  allocates its temporaries per call, and large ones come from fresh pages) out of the next
  case's timings.
  """
  for fn in fns.values():  # compile and first-touch.
    fn()
  per_round = max(1, -(-repeats // rounds))
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      fn()
      for _ in range(per_round):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _torch(device: str):
  """``(torch, torchvision, torch device)`` for the JAX ``device`` platform, or None."""
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  if device == "gpu":
    return (torch, torchvision, "cuda") if torch.cuda.is_available() else None
  return torch, torchvision, "cpu"


def _torch_timers(forward: Callable[[], Any], forward_backward: Callable[[], Any], torch, tdev
                  ) -> dict[str, Callable[[], Any]]:
  sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)

  def fwd():
    with torch.no_grad():
      forward()
    sync()

  def fwd_bwd():
    forward_backward()
    sync()

  return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _torchvision_conv(shape: ConvShape, dtype_name: str, device: str
                      ) -> dict[str, Callable[[], Any]] | None:
  """torchvision.ops.deform_conv2d at the same shape, NCHW, on ``device``; None if unavailable."""
  found = _torch(device)
  if found is None:
    return None
  torch, torchvision, tdev = found
  tdtype = getattr(torch, dtype_name)
  g = torch.Generator(device="cpu").manual_seed(0)
  k, kk = shape.kernel, shape.kernel ** 2 * shape.offset_groups
  n, s = shape.batch, shape.size

  def rand(*size):
    return torch.randn(*size, generator=g).to(device=tdev, dtype=tdtype).requires_grad_(True)

  x, w = rand(n, shape.in_features, s, s), rand(shape.out_features, shape.in_features, k, k)
  off, mask = rand(n, 2 * kk, s, s), rand(n, kk, s, s)
  cot = torch.randn(n, shape.out_features, s, s, generator=g).to(device=tdev, dtype=tdtype)

  def forward():
    return torchvision.ops.deform_conv2d(x, off, w, padding=k // 2, mask=torch.sigmoid(mask))

  def forward_backward():
    return torch.autograd.grad(forward(), (x, off, mask, w), cot)

  return _torch_timers(forward, forward_backward, torch, tdev)


def _torchvision_roi_align(shape: RoIShape, dtype_name: str, device: str
                           ) -> dict[str, Callable[[], Any]] | None:
  """torchvision.ops.roi_align (aligned, adaptive sub-grid) on the same features and boxes."""
  found = _torch(device)
  if found is None:
    return None
  torch, torchvision, tdev = found
  features, rois = (np.asarray(a) for a in _roi_inputs(shape))
  x = torch.from_numpy(features.transpose(0, 3, 1, 2).copy()).to(
      device=tdev, dtype=getattr(torch, dtype_name)).requires_grad_(True)
  boxes = torch.from_numpy(np.array(rois)).to(device=tdev, dtype=x.dtype)  # a writable copy
  cot = torch.randn(shape.rois, shape.channels, shape.output, shape.output,
                    generator=torch.Generator(device="cpu").manual_seed(0)).to(tdev, x.dtype)

  def forward():
    return torchvision.ops.roi_align(x, boxes, shape.output, spatial_scale=1 / shape.stride,
                                     sampling_ratio=-1, aligned=True)

  def forward_backward():
    return torch.autograd.grad(forward(), (x,), cot)

  return _torch_timers(forward, forward_backward, torch, tdev)


def torch_ms_deform_attn(torch, value, spatial_shapes, sampling_locations, attention_weights):
  """Deformable DETR's ``ms_deform_attn_core_pytorch`` (its ``grid_sample`` reference): value
  ``[N, S, M, D]``, locations ``[N, Lq, M, L, P, 2]``, weights ``[N, Lq, M, L, P]`` ->
  ``[N, Lq, M * D]``."""
  functional = torch.nn.functional
  n, _, m, d = value.shape
  _, lq, _, levels, p, _ = sampling_locations.shape
  values = value.split([h * w for h, w in spatial_shapes], dim=1)
  grids = 2 * sampling_locations - 1
  sampled = []
  for level, (h, w) in enumerate(spatial_shapes):
    v = values[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
    g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
    sampled.append(functional.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                          align_corners=False))  # [N*M, D, Lq, P]
  weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, levels * p)
  out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
  return out.transpose(1, 2).contiguous()


def _torch_msda(shape: MsdaShape, dtype_name: str, device: str
                ) -> dict[str, Callable[[], Any]] | None:
  """:func:`torch_ms_deform_attn` on the same inputs, on ``device``; None where torch is not
  importable or has no ``grid_sample`` for the dtype there."""
  found = _torch(device)
  if found is None:
    return None
  torch, _, tdev = found
  tdtype = getattr(torch, dtype_name)
  value, locations, weights = (torch.from_numpy(a).to(device=tdev, dtype=tdtype)
                               .requires_grad_(True) for a in _msda_inputs(shape))
  cot = torch.randn(shape.batch, shape.num_queries, shape.heads * shape.head_dim,
                    generator=torch.Generator(device="cpu").manual_seed(0)).to(tdev, tdtype)

  def forward():
    return torch_ms_deform_attn(torch, value, shape.levels, locations, weights)

  def forward_backward():
    return torch.autograd.grad(forward(), (value, locations, weights), cot)

  try:
    with torch.no_grad():
      torch_ms_deform_attn(torch, value[:1], shape.levels, locations[:1, :1], weights[:1, :1])
  except RuntimeError:  # e.g. no grid_sample kernel for this dtype on this device
    return None
  return _torch_timers(forward, forward_backward, torch, tdev)


def _groups(shapes: Sequence[str], dtypes: Sequence[str], impls: Sequence[str], device: str,
            deformable_kernels: bool):
  """``(shape, dtype, cases, peers)`` for every requested shape and dtype; ``peers`` maps an op to
  ``(peer op, peer implementation, timers)`` of the PyTorch rows it is compared with."""
  for shape_name in shapes:
    for dtype_name in dtypes:
      peers = {}
      if shape_name in MSDA_SHAPES:
        shape = MSDA_SHAPES[shape_name]
        cases = _msda_cases(shape, dtype_name, impls)
        if "torchvision" in impls:
          peers["ms_deform_attn"] = ("grid_sample", "torch",
                                     _torch_msda(shape, dtype_name, device))
      elif shape_name in ROI_SHAPES:
        shape = ROI_SHAPES[shape_name]
        cases = _roi_cases(shape, dtype_name, impls)
        if "torchvision" in impls:
          peers["deform_roi_pool"] = ("roi_align", "torchvision",
                                      _torchvision_roi_align(shape, dtype_name, device))
      elif shape_name in DCNV3_SHAPES:
        shape = DCNV3_SHAPES[shape_name]
        cases = _dcnv3_cases(shape, dtype_name, impls, shape.offset_groups)
      else:
        shape = SHAPES[shape_name]
        cases = _conv_cases(shape, dtype_name, impls)
        cases += _dcnv3_cases(shape, dtype_name, impls, 4)
        if deformable_kernels:
          cases += _deformable_kernel_cases(shape, dtype_name)
        if "torchvision" in impls:
          peers["deform_conv2d"] = ("deform_conv2d", "torchvision",
                                    _torchvision_conv(shape, dtype_name, device))
      yield shape_name, dtype_name, cases, {k: v for k, v in peers.items() if v[2] is not None}


def run(shapes: Sequence[str], dtypes: Sequence[str], impls: Sequence[str], repeats: int,
        backward: bool = True, deformable_kernels: bool = True) -> list[dict[str, Any]]:
  """Measures every (shape, dtype) and returns one row per (op, implementation, pass)."""
  device = jax.devices()[0].platform
  passes = ("fwd", "fwd+bwd") if backward else ("fwd",)
  rows: list[dict[str, Any]] = []
  for shape_name, dtype_name, cases, peers in _groups(shapes, dtypes, impls, device,
                                                      deformable_kernels):
    fns: dict[str, Callable[[], Any]] = {}
    temp: dict[str, float | None] = {}
    input_mib: dict[str, float] = {}
    baseline: dict[str, str] = {}
    for case in cases:
      fn_of_pass = {"fwd": case.fn,
                    "fwd+bwd": _forward_backward(case.fn, case.grad_argnums, case.args)}
      for pass_name in passes:
        jitted = jax.jit(fn_of_pass[pass_name])
        key = f"{case.op}/{case.impl}/{pass_name}"
        fns[key] = (lambda jitted=jitted, args=case.args:
                    jax.block_until_ready(jitted(*args)))
        temp[key] = _temp_mib(jitted, case.args)
        input_mib[key] = case.args[case.input_arg].nbytes / 2**20
        baseline[key] = f"{case.baseline}/{pass_name}"
    peer_of: dict[str, str] = {}
    for op, (peer_op, peer_impl, timers) in peers.items():
      for pass_name in passes:
        key = f"{peer_op}/{peer_impl}/{pass_name}"
        fns[key] = timers[pass_name]
        peer_of[f"{op}/{pass_name}"] = key
        baseline[key] = ""
    medians = _time_interleaved(fns, repeats)
    for key, seconds in medians.items():
      op, impl, pass_name = key.split("/")
      base = medians.get(baseline[key])
      peer = medians.get(peer_of.get(f"{op}/{pass_name}", ""))
      rows.append(dict(
          shape=shape_name, dtype=dtype_name, op=op, implementation=impl, pass_=pass_name,
          ms=seconds * 1e3, baseline=baseline[key].rsplit("/", 2)[0] if base else "",
          ratio_dense=seconds / base if base else None,
          ratio_peer=seconds / peer if peer and key not in peer_of.values() else None,
          temp_mib=temp.get(key), input_mib=input_mib.get(key),
          temp_per_input=(temp[key] / input_mib[key]
                          if temp.get(key) is not None and input_mib.get(key) else None)))
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
  header = ("shape", "dtype", "op", "impl", "pass", "ms", "x base", "base", "x peer", "temp MiB",
            "input MiB", "temp / input")
  lines = [header]
  fmt = lambda value, spec: "" if value is None else format(value, spec)
  for r in rows:
    lines.append((
        r["shape"], r["dtype"], r["op"], r["implementation"], r["pass_"], f"{r['ms']:.2f}",
        fmt(r["ratio_dense"], ".2f"), r["baseline"].split("/")[0], fmt(r["ratio_peer"], ".3f"),
        fmt(r["temp_mib"], ".1f"), fmt(r.get("input_mib"), ".1f"),
        fmt(r.get("temp_per_input"), ".2f")))
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
      epilog="shapes (deform_conv2d, and Deformable Kernels with a 5x5 scope):\n" + "\n".join(
          f"  {s.name:5s} N={s.batch}, {s.size}x{s.size}, {s.in_features}->{s.out_features}, "
          f"{s.kernel}x{s.kernel}, offset groups {s.offset_groups}, mask on ({s.description})"
          for s in SHAPES.values())
      + "\nshapes (modulated deform_roi_pool against plain RoI pooling and torchvision's "
        "roi_align):\n" + "\n".join(
          f"  {s.name:5s} N={s.batch}, {s.size}x{s.size}, {s.channels} channels, R={s.rois}, "
          f"{s.output}x{s.output}, spatial_scale 1/{s.stride}, adaptive sub-grid "
          f"({s.description})" for s in ROI_SHAPES.values())
      + "\nshapes (dcnv3 and dcnv4, 3x3, against a depthwise 3x3 conv; every conv shape above "
        "adds these rows with G=4):\n" + "\n".join(
          f"  {s.name:5s} N={s.batch}, {s.size}x{s.size}, C={s.in_features}, "
          f"G={s.offset_groups} ({s.description})" for s in DCNV3_SHAPES.values())
      + "\nshapes (ms_deform_attn against its jnp implementation and Deformable DETR's "
        "grid_sample reference):\n" + "\n".join(
          f"  {s.name:5s} N={s.batch}, levels {', '.join(f'{h}x{w}' for h, w in s.levels)}, "
          f"Lq={s.num_queries}, M={s.heads}, D={s.head_dim}, P={s.points} ({s.description})"
          for s in MSDA_SHAPES.values()))
  on_gpu = jax.devices()[0].platform == "gpu"
  parser.add_argument("--shapes", default="R1,G1,G1g4,G2,P1,A2" if on_gpu else "R1,R2,P1,A1",
                      help="comma-separated shape names (default: R1,R2,P1,A1 on CPU; "
                      "R1,G1,G1g4,G2,P1,A2 on GPU)")
  parser.add_argument("--dtypes", default="float32",
                      help=f"comma-separated, of {', '.join(DTYPES)} (default float32)")
  parser.add_argument("--implementations", default=",".join(default_implementations()),
                      help="comma-separated, of xla, ffi, torchvision (the PyTorch peers; "
                      "default: all available)")
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
  all_shapes = {**SHAPES, **ROI_SHAPES, **DCNV3_SHAPES, **MSDA_SHAPES}
  for name, values, allowed in (("shape", shapes, all_shapes),
                                ("dtype", dtypes, DTYPES),
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
