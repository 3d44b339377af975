"""Float64 loop reference of DCNv3 / DCNv4, written from the semantics of issue 12 (independent of
flaxdcn's implementation: no folding into DCN offsets, no shared code).

For output ``(y, x)``, kernel column ``i`` (0..kw-1), kernel row ``j`` (0..kh-1) and group ``g``,
point ``p = i * kh + j`` (skipping ``(kw // 2, kh // 2)`` with ``remove_center``), the sample is
read at::

  w = x * sw - pw + c_w + (i * dw - c_w + dx) * s
  h = y * sh - ph + c_h + (j * dh - c_h + dy) * s,   c = (d * (k - 1)) // 2

with DCN's bilinear rule (0 unless -1 < h < H and -1 < w < W; corners outside contribute 0),
and ``out[n, y, x, g * Cg + c] = sum_p mask[g, p] * sample_p[g * Cg + c]``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class V3Case:
  n: int
  h: int
  w: int
  c: int
  g: int
  kernel: tuple[int, int]  # (kh, kw)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (1, 1)  # symmetric (ph, pw)
  dilation: tuple[int, int] = (1, 1)
  offset_scale: float = 1.0
  remove_center: bool = False

  def __post_init__(self):
    for name in ("kernel", "strides", "padding", "dilation"):
      value = getattr(self, name)
      if isinstance(value, int):
        object.__setattr__(self, name, (value, value))

  @property
  def points(self) -> int:
    return self.kernel[0] * self.kernel[1] - int(self.remove_center)

  @property
  def out_size(self) -> tuple[int, int]:
    return tuple((n + 2 * p - (d * (k - 1) + 1)) // s + 1 for n, p, d, k, s in zip(
        (self.h, self.w), self.padding, self.dilation, self.kernel, self.strides))

  @property
  def d(self) -> int:
    return math.ceil(self.g * self.points * 3 / 8) * 8

  def kwargs(self) -> dict:
    return dict(kernel_size=self.kernel, strides=self.strides, padding=self.padding,
                kernel_dilation=self.dilation, group_count=self.g,
                offset_scale=self.offset_scale, remove_center=self.remove_center)


def point_list(case: V3Case) -> list[tuple[int, int]]:
  """``(i, j)`` (column, row) of each point, in point order."""
  kh, kw = case.kernel
  points = [(i, j) for i in range(kw) for j in range(kh)]
  if case.remove_center:
    points.remove((kw // 2, kh // 2))
  return points


def bilinear(image: np.ndarray, h: float, w: float) -> np.ndarray:
  """DCN's read of ``image [H, W, Cg]`` at ``(h, w)``."""
  height, width = image.shape[:2]
  out = np.zeros(image.shape[2], np.float64)
  if not (-1 < h < height and -1 < w < width):  # NaN compares false: dropped
    return out
  h0, w0 = math.floor(h), math.floor(w)
  lh, lw = h - h0, w - w0
  for r, c, weight in ((h0, w0, (1 - lh) * (1 - lw)), (h0, w0 + 1, (1 - lh) * lw),
                       (h0 + 1, w0, lh * (1 - lw)), (h0 + 1, w0 + 1, lh * lw)):
    if 0 <= r < height and 0 <= c < width:
      out += weight * image[r, c]
  return out


def dcnv3(case: V3Case, inputs, offsets, mask) -> np.ndarray:
  """``[N, Ho, Wo, C]`` in float64 from DCNv3-layout arguments."""
  inputs = np.asarray(inputs, np.float64)
  offsets = np.asarray(offsets, np.float64)
  mask = np.asarray(mask, np.float64)
  (kh, kw), (sh, sw), (ph, pw), (dh, dw) = case.kernel, case.strides, case.padding, case.dilation
  c_h, c_w = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
  ho, wo = case.out_size
  cg = case.c // case.g
  s = case.offset_scale
  points = point_list(case)
  out = np.zeros((case.n, ho, wo, case.c), np.float64)
  for n in range(case.n):
    for y in range(ho):
      for x in range(wo):
        for g in range(case.g):
          image = inputs[n, :, :, g * cg:(g + 1) * cg]
          acc = np.zeros(cg, np.float64)
          for p, (i, j) in enumerate(points):
            dx = offsets[n, y, x, (g * case.points + p) * 2]
            dy = offsets[n, y, x, (g * case.points + p) * 2 + 1]
            with np.errstate(invalid="ignore", over="ignore"):
              w = x * sw - pw + c_w + (i * dw - c_w + dx) * s
              h = y * sh - ph + c_h + (j * dh - c_h + dy) * s
            m = mask[n, y, x, g * case.points + p]
            if m != 0:
              acc += m * bilinear(image, h, w)
          out[n, y, x, g * cg:(g + 1) * cg] = acc
  return out


def dcnv4(case: V3Case, inputs, offset_mask) -> np.ndarray:
  """``[N, Ho, Wo, C]`` in float64 from a DCNv4 ``offset_mask [N, Ho, Wo, D]``."""
  offset_mask = np.asarray(offset_mask, np.float64)
  p = case.points
  offsets = np.zeros(offset_mask.shape[:3] + (case.g * p * 2,))
  mask = np.zeros(offset_mask.shape[:3] + (case.g * p,))
  for g in range(case.g):
    base = g * 3 * p
    offsets[..., g * p * 2:(g + 1) * p * 2] = offset_mask[..., base:base + 2 * p]
    mask[..., g * p:(g + 1) * p] = offset_mask[..., base + 2 * p:base + 3 * p]
  return dcnv3(case, inputs, offsets, mask)


def make_args(case: V3Case, seed: int = 0, *, offset_magnitude: float = 2.0) -> dict:
  """Random float64 ``inputs``, ``offsets`` (uniform in +-offset_magnitude) and ``mask``."""
  rng = np.random.default_rng(seed)
  ho, wo = case.out_size
  gp = case.g * case.points
  return dict(
      inputs=rng.standard_normal((case.n, case.h, case.w, case.c)),
      offsets=rng.uniform(-offset_magnitude, offset_magnitude, (case.n, ho, wo, gp * 2)),
      mask=rng.uniform(-1.0, 1.0, (case.n, ho, wo, gp)),
  )


def pack_offset_mask(case: V3Case, offsets, mask, padding_value: float = 0.0) -> np.ndarray:
  """DCNv4's ``offset_mask`` from DCNv3-layout offsets and mask; padding channels set to
  ``padding_value``."""
  p = case.points
  out = np.full(np.shape(offsets)[:3] + (case.d,), padding_value, np.float64)
  for g in range(case.g):
    base = g * 3 * p
    out[..., base:base + 2 * p] = offsets[..., g * p * 2:(g + 1) * p * 2]
    out[..., base + 2 * p:base + 3 * p] = mask[..., g * p:(g + 1) * p]
  return out
