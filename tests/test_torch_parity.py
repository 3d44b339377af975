"""flaxdcn against torchvision, the parity oracle (``pytest -m torch``; skipped without torch).

``deform_conv2d`` against ``torchvision.ops.deform_conv2d`` and ``deform_roi_pool(offsets=None)``
against ``torchvision.ops.roi_align(aligned=True)``: the forward and the gradient of every
differentiable argument, in float64 and float32, for every implementation, on torchvision's own
odd test geometry (batch 0 and 33), a seeded random-configuration matrix, and offsets or boxes
snapped to integers and to the ``-1`` / ``H`` boundaries of the sampling rule.

The one known difference: a sample whose coordinate is exactly -1 reads 0 in both, but
torchvision's offset gradient there is the derivative from the right (the image row or column 0
weighs in), while flaxdcn (like mmcv and the original DCN) treats ``h <= -1`` as outside and
returns 0. The conv tests locate those entries, require flaxdcn's to be exactly 0 and
torchvision's to be exactly that one-sided derivative (flaxdcn's gradient with the sample moved
to -0.5, where the read is linear in the coordinate on (-1, 0)), and match everything else.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxdcn
from tolerances import assert_close

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]
CONV_QUANTITIES = ("out", "inputs", "offsets", "mask", "kernel", "bias")


# --- Configurations ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConvConfig:
  """One ``deform_conv2d`` geometry (torchvision pads symmetrically, so padding is ``(ph, pw)``)
  and how the offsets are drawn: ``"normal"``, ``"integer"`` (rounded) or ``"boundary"``
  (about half the sample coordinates snapped to -1, 0, H - 1 or H, the rest integer)."""
  name: str
  n: int
  c: int
  h: int
  w: int
  o: int
  kernel: tuple[int, int]
  stride: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  dilation: tuple[int, int] = (1, 1)
  fg: int = 1
  og: int = 1
  mask: bool = True
  bias: bool = True
  offsets: str = "normal"
  seed: int = 0

  @property
  def out_size(self) -> tuple[int, int]:
    return tuple((size + 2 * p - (d * (k - 1) + 1)) // s + 1 for size, p, d, k, s in zip(
        (self.h, self.w), self.padding, self.dilation, self.kernel, self.stride))

  def __str__(self):
    return (f"{self.name}: N={self.n} {self.h}x{self.w} C={self.c}->O={self.o} "
            f"k={self.kernel} s={self.stride} p={self.padding} d={self.dilation} F={self.fg} "
            f"G={self.og} mask={self.mask} bias={self.bias} offsets={self.offsets}")


def _torchvision_odd(n: int, **changes) -> ConvConfig:
  """torchvision's TestDeformConv geometry: 6 -> 2 channels, 5x4 input, 3x2 kernel, stride (2, 1),
  padding (1, 0), dilation (2, 1), 2 weight groups, 3 offset groups."""
  return dataclasses.replace(ConvConfig(
      f"torchvision-b{n}", n, 6, 5, 4, 2, (3, 2), stride=(2, 1), padding=(1, 0),
      dilation=(2, 1), fg=2, og=3), **changes)


def _random_conv_configs(count: int, seed: int = 0) -> list[ConvConfig]:
  """``count`` seeded random geometries with at least one output position."""
  rng = np.random.default_rng(seed)
  configs = []
  while len(configs) < count:
    fg, og = (int(v) for v in rng.choice([1, 1, 2, 3], size=2))
    c = int(np.lcm(fg, og) * rng.integers(1, 3))
    config = ConvConfig(
        f"random-{len(configs)}", int(rng.integers(1, 4)), c, int(rng.integers(3, 10)),
        int(rng.integers(3, 10)), int(fg * rng.integers(1, 4)),
        tuple(int(v) for v in rng.integers(1, 4, size=2)),
        stride=tuple(int(v) for v in rng.integers(1, 3, size=2)),
        padding=tuple(int(v) for v in rng.integers(0, 3, size=2)),
        dilation=tuple(int(v) for v in rng.integers(1, 3, size=2)), fg=fg, og=og,
        mask=bool(rng.random() < 0.7), bias=bool(rng.random() < 0.7),
        seed=len(configs) + 1)
    if min(config.out_size) >= 1:
      configs.append(config)
  return configs


CONV_CONFIGS = [
    _torchvision_odd(33),
    _torchvision_odd(0),
    *_random_conv_configs(6),
    ConvConfig("integer", 2, 4, 7, 6, 3, (3, 3), padding=(1, 1), og=2, offsets="integer", seed=11),
    ConvConfig("boundary", 2, 4, 6, 7, 3, (3, 3), padding=(1, 1), og=2, offsets="boundary",
               seed=12),
    _torchvision_odd(5, name="torchvision-boundary", offsets="boundary", seed=13),
    ConvConfig("boundary-v1", 1, 3, 5, 5, 2, (2, 3), stride=(2, 1), padding=(2, 1), og=3,
               mask=False, bias=False, offsets="boundary", seed=14),
]


def _sample_coordinates(config: ConvConfig, offsets: np.ndarray) -> np.ndarray:
  """``[N, Ho, Wo, G, kh, kw, 2]`` sample coordinates ``(h, w)`` of ``offsets`` (float64; exact
  for the snapped offsets, which are integers)."""
  (ho, wo), (kh, kw) = config.out_size, config.kernel
  base_h = (np.arange(ho) * config.stride[0] - config.padding[0])[:, None] + (
      np.arange(kh) * config.dilation[0])  # [Ho, kh]
  base_w = (np.arange(wo) * config.stride[1] - config.padding[1])[:, None] + (
      np.arange(kw) * config.dilation[1])  # [Wo, kw]
  off = np.asarray(offsets, np.float64).reshape(config.n, ho, wo, config.og, kh, kw, 2)
  h = base_h[None, :, None, None, :, None] + off[..., 0]
  w = base_w[None, None, :, None, None, :] + off[..., 1]
  return np.stack([h, w], axis=-1)


def conv_arguments(config: ConvConfig) -> dict[str, np.ndarray | None]:
  """float64 arguments (flaxdcn layouts) and the output cotangent of ``config``."""
  rng = np.random.default_rng(config.seed)
  (ho, wo), (kh, kw) = config.out_size, config.kernel
  points = config.og * kh * kw
  offsets = rng.normal(scale=1.5, size=(config.n, ho, wo, points * 2))
  if config.offsets in ("integer", "boundary"):
    offsets = np.round(offsets)
  if config.offsets == "boundary":
    zero = np.zeros_like(offsets)
    base = _sample_coordinates(config, zero).reshape(offsets.shape)  # coordinates at offset 0
    limits = np.tile([config.h, config.w], points)  # H for dy entries, W for dx entries
    targets = np.choose(rng.integers(0, 4, size=offsets.shape),
                        [-1.0 + zero, zero, limits - 1.0 + zero, limits + zero])
    offsets = np.where(rng.random(offsets.shape) < 0.5, targets - base, offsets)
  return dict(
      inputs=rng.random((config.n, config.h, config.w, config.c)),
      offsets=offsets,
      kernel=rng.normal(size=(kh, kw, config.c // config.fg, config.o)),
      mask=rng.normal(size=(config.n, ho, wo, points)) if config.mask else None,
      bias=rng.normal(size=(config.o,)) if config.bias else None,
      cotangent=rng.normal(size=(config.n, ho, wo, config.o)))


# --- deform_conv2d -------------------------------------------------------------------------------

def _from_torch(tensor, *perm):
  return None if tensor is None else tensor.detach().numpy().transpose(perm)


def torchvision_conv(config: ConvConfig, args: dict, dtype) -> dict[str, np.ndarray | None]:
  """torchvision's forward and gradients, moved to flaxdcn's layouts."""
  tdtype = {np.float64: torch.float64, np.float32: torch.float32}[dtype]

  def leaf(name, *perm):
    value = args[name]
    if value is None:
      return None
    return torch.tensor(np.ascontiguousarray(value.transpose(perm)), dtype=tdtype,
                        requires_grad=name != "cotangent")

  nchw = (0, 3, 1, 2)
  x, offsets, mask = leaf("inputs", *nchw), leaf("offsets", *nchw), leaf("mask", *nchw)
  weight, bias, cotangent = leaf("kernel", 3, 2, 0, 1), leaf("bias", 0), leaf("cotangent", *nchw)
  out = torchvision.ops.deform_conv2d(x, offsets, weight, bias, stride=config.stride,
                                      padding=config.padding, dilation=config.dilation, mask=mask)
  wrt = [t for t in (x, offsets, mask, weight, bias) if t is not None]
  grads = dict(zip([t for t in (x, offsets, mask, weight, bias) if t is not None],
                   torch.autograd.grad(out, wrt, cotangent, allow_unused=True)))
  grad = lambda t, *perm: None if t is None else _from_torch(grads[t], *perm)  # noqa: E731
  return dict(out=_from_torch(out, 0, 2, 3, 1), inputs=grad(x, 0, 2, 3, 1),
              offsets=grad(offsets, 0, 2, 3, 1), mask=grad(mask, 0, 2, 3, 1),
              kernel=grad(weight, 2, 3, 1, 0), bias=grad(bias, 0))


@functools.lru_cache(maxsize=None)
def _conv_vjp(config: ConvConfig, implementation: str, has_mask: bool, has_bias: bool):
  """jitted ``(inputs, offsets, kernel, mask, bias, cotangent) -> (out, grads)``."""

  def fn(inputs, offsets, kernel, mask, bias):
    return flaxdcn.deform_conv2d(
        inputs, offsets, kernel, mask if has_mask else None, bias if has_bias else None,
        strides=config.stride, padding=config.padding, kernel_dilation=config.dilation,
        feature_group_count=config.fg, offset_group_count=config.og,
        implementation=implementation)

  @jax.jit
  def run(inputs, offsets, kernel, mask, bias, cotangent):
    out, vjp = jax.vjp(fn, inputs, offsets, kernel, mask, bias)
    return out, vjp(cotangent)

  return run


def flaxdcn_conv(config: ConvConfig, args: dict, dtype, implementation: str
                 ) -> dict[str, np.ndarray | None]:
  """flaxdcn's forward and gradients (``args["offsets"]`` may be overridden by the caller)."""
  has_mask, has_bias = args["mask"] is not None, args["bias"] is not None
  with jax.enable_x64(dtype == np.float64):
    cast = lambda v: jnp.zeros((1,), dtype) if v is None else jnp.asarray(v, dtype)  # noqa: E731
    out, grads = _conv_vjp(config, implementation, has_mask, has_bias)(
        *(cast(args[k]) for k in ("inputs", "offsets", "kernel", "mask", "bias", "cotangent")))
    out, grads = np.asarray(out), [np.asarray(g) for g in grads]
  return dict(out=out, inputs=grads[0], offsets=grads[1], kernel=grads[2],
              mask=grads[3] if has_mask else None, bias=grads[4] if has_bias else None)


def conv_comparison(config: ConvConfig, dtype, implementation: str):
  """``(ours, theirs, at_minus_one, right_derivative)``: both results, the offset-gradient entries
  whose own coordinate is exactly -1 (boolean, flaxdcn's offsets layout), and there the
  derivative from the right, as flaxdcn computes it with those coordinates moved to -0.5."""
  args = conv_arguments(config)
  args = {k: None if v is None else v.astype(dtype) for k, v in args.items()}
  ours = flaxdcn_conv(config, args, dtype, implementation)
  theirs = torchvision_conv(config, args, dtype)
  coordinates = _sample_coordinates(config, args["offsets"])
  at_minus_one = (coordinates == -1.0).reshape(args["offsets"].shape)
  right = np.zeros_like(ours["offsets"])
  for axis in (0, 1):  # move the dy entries, then the dx entries, each with the other kept
    moved = at_minus_one & (np.arange(at_minus_one.shape[-1]) % 2 == axis)
    if moved.any():
      shifted = flaxdcn_conv(config, args | {"offsets": args["offsets"] + 0.5 * moved}, dtype,
                             implementation)
      right = np.where(moved, shifted["offsets"], right)
  return ours, theirs, at_minus_one, right


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: c.name)
def test_deform_conv2d_matches_torchvision(config, dtype, implementation):
  ours, theirs, at_minus_one, right = conv_comparison(config, dtype, implementation)
  assert ours["out"].shape == theirs["out"].shape == (config.n, *config.out_size, config.o)
  for name in CONV_QUANTITIES:
    assert (ours[name] is None) == (theirs[name] is None), name
    if ours[name] is None:
      continue
    assert ours[name].dtype == dtype, name
    mine, want = ours[name], theirs[name]
    if name == "offsets":  # the documented difference, checked below
      mine, want = np.where(at_minus_one, 0.0, mine), np.where(at_minus_one, 0.0, want)
    assert_close(mine, want, dtype, err_msg=f"{name} of {config}")
  assert np.all(ours["offsets"][at_minus_one] == 0.0)
  assert_close(theirs["offsets"][at_minus_one], right[at_minus_one], dtype,
               err_msg=f"torchvision's offset gradient at -1 is the right derivative ({config})")
  if config.offsets == "boundary":  # the difference exists here and is not trivially zero
    assert np.abs(theirs["offsets"][at_minus_one]).max() > 0.1
  if config.n:
    assert np.abs(theirs["out"]).max() > 0.1


# --- deform_roi_pool (no offsets) against roi_align --------------------------------------------

@dataclasses.dataclass(frozen=True)
class RoIConfig:
  """Features, RoI count and pooling geometry; ``boxes`` is ``"random"`` (inside and across the
  border, every fourth tiny, every fifth of negative size) or ``"boundary"`` (every sample on an
  integer coordinate, many exactly on -1, 0, H - 1 or H)."""
  name: str
  n: int
  c: int
  h: int
  w: int
  rois: int
  output_size: tuple[int, int]
  spatial_scale: float = 1.0
  sampling_ratio: int = 0
  boxes: str = "random"
  seed: int = 0

  def __str__(self):
    return (f"{self.name}: N={self.n} {self.h}x{self.w} C={self.c} R={self.rois} "
            f"out={self.output_size} scale={self.spatial_scale} "
            f"sampling_ratio={self.sampling_ratio} boxes={self.boxes}")


def _random_roi_configs(count: int, seed: int = 1) -> list[RoIConfig]:
  rng = np.random.default_rng(seed)
  return [RoIConfig(f"random-{i}", int(rng.integers(1, 4)), int(rng.integers(1, 6)),
                    int(rng.integers(4, 16)), int(rng.integers(4, 16)), int(rng.integers(3, 13)),
                    tuple(int(v) for v in rng.integers(1, 5, size=2)),
                    spatial_scale=float(rng.choice([1.0, 0.5, 0.25])),
                    sampling_ratio=int(rng.choice([0, 0, 1, 2, 3])), seed=i + 1)
          for i in range(count)]


ROI_CONFIGS = [
    *_random_roi_configs(6),
    RoIConfig("no-rois", 2, 3, 6, 5, 0, (2, 2)),
    RoIConfig("boundary", 2, 3, 6, 7, 24, (2, 3), sampling_ratio=1, boxes="boundary", seed=9),
    RoIConfig("boundary-1x1", 1, 2, 5, 4, 16, (1, 1), sampling_ratio=1, boxes="boundary",
              seed=10),
]


def roi_arguments(config: RoIConfig) -> dict[str, np.ndarray]:
  """float64 features ``[N, H, W, C]``, boxes ``[R, 5]`` and the output cotangent."""
  rng = np.random.default_rng(config.seed)
  oh, ow = config.output_size
  index = rng.integers(0, config.n, size=(config.rois, 1)).astype(np.float64)
  if config.boxes == "random":
    extent = np.array([config.w, config.h]) / config.spatial_scale
    start = rng.uniform(-0.3, 0.9, size=(config.rois, 2)) * extent
    size = rng.uniform(0.05, 0.8, size=(config.rois, 2)) * extent
    size[1::4] *= 0.02  # tiny boxes
    size[2::5] *= -0.2  # negative sizes (an empty adaptive grid)
    corners = np.concatenate([start, start + size], axis=1)
  else:  # bins of 2 pixels at scale 1: samples at start + 1, start + 3, ... (start an integer)
    start = np.stack([rng.integers(-3, config.w + 1, size=config.rois),
                      rng.integers(-3, config.h + 1, size=config.rois)], axis=1) + 0.5
    corners = np.concatenate([start, start + 2 * np.array([ow, oh])], axis=1)
  return dict(features=rng.normal(size=(config.n, config.h, config.w, config.c)),
              rois=np.concatenate([index, corners], axis=1),
              cotangent=rng.normal(size=(config.rois, oh, ow, config.c)))


def torchvision_roi_align(config: RoIConfig, args: dict, dtype) -> dict[str, np.ndarray]:
  tdtype = {np.float64: torch.float64, np.float32: torch.float32}[dtype]
  features = torch.tensor(np.ascontiguousarray(args["features"].transpose(0, 3, 1, 2)),
                          dtype=tdtype, requires_grad=True)
  rois = torch.tensor(args["rois"], dtype=tdtype)
  out = torchvision.ops.roi_align(features, rois, config.output_size,
                                  spatial_scale=config.spatial_scale,
                                  sampling_ratio=config.sampling_ratio, aligned=True)
  cotangent = torch.tensor(np.ascontiguousarray(args["cotangent"].transpose(0, 3, 1, 2)),
                           dtype=tdtype)
  (grad,) = torch.autograd.grad(out, [features], cotangent, allow_unused=True)
  grad = torch.zeros_like(features) if grad is None else grad  # no RoIs: unused
  return dict(out=_from_torch(out, 0, 2, 3, 1), features=_from_torch(grad, 0, 2, 3, 1))


def flaxdcn_roi_pool(config: RoIConfig, args: dict, dtype, implementation: str
                     ) -> dict[str, np.ndarray]:
  with jax.enable_x64(dtype == np.float64):
    fn = functools.partial(flaxdcn.deform_roi_pool, output_size=config.output_size,
                           spatial_scale=config.spatial_scale,
                           sampling_ratio=config.sampling_ratio, implementation=implementation)

    @jax.jit
    def run(features, rois, cotangent):
      out, vjp = jax.vjp(lambda f: fn(f, rois), features)
      return out, vjp(cotangent)[0]

    out, grad = run(*(jnp.asarray(args[k], dtype) for k in ("features", "rois", "cotangent")))
    return dict(out=np.asarray(out), features=np.asarray(grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ROI_CONFIGS, ids=lambda c: c.name)
def test_deform_roi_pool_matches_roi_align(config, dtype, implementation):
  args = {k: v.astype(dtype) for k, v in roi_arguments(config).items()}
  ours = flaxdcn_roi_pool(config, args, dtype, implementation)
  theirs = torchvision_roi_align(config, args, dtype)
  assert ours["out"].shape == theirs["out"].shape == (config.rois, *config.output_size, config.c)
  for name in ("out", "features"):
    assert ours[name].dtype == dtype
    assert_close(ours[name], theirs[name], dtype, err_msg=f"{name} of {config}")
  if config.rois:
    assert np.abs(theirs["features"]).max() > 0.1
  if config.boxes == "boundary":  # this draw puts samples on -1 and on H and W
    oh, ow = config.output_size
    rois = args["rois"].astype(np.float64)
    ys = (rois[:, 2] - 0.5)[:, None] + 1.0 + 2.0 * np.arange(oh)
    xs = (rois[:, 1] - 0.5)[:, None] + 1.0 + 2.0 * np.arange(ow)
    assert {-1.0, config.h} <= set(ys.ravel()) and {-1.0, config.w} <= set(xs.ravel())
