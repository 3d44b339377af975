"""Float64 loop reference of multi-scale deformable attention, written from the semantics of
issue 17 (Deformable DETR's ``ms_deform_attn_core_pytorch``; no code shared with flaxdcn).

``value [N, S, M, D]`` holds the levels one after another, level ``l`` flattened row-major from
row ``sum_{k<l} H_k * W_k``. Location ``(x, y)`` on level ``l`` is read at pixel::

  w = x * W_l - 0.5,   h = y * H_l - 0.5

by bilinear interpolation in which each of the four corners contributes only if it lies inside
the level (a sample with ``h <= -1``, ``h >= H_l``, ``w <= -1`` or ``w >= W_l``, or a non-finite
one, contributes 0), and ``out[n, q, m * D + c] = sum_{l, p} A[n, q, m, l, p] * sample[c]``.

:func:`vjp` gives the gradients of ``sum(out * cotangent)`` with the derivative of the cell
``[floor(h), floor(h) + 1] x [floor(w), floor(w) + 1]`` the sample lies in (at an integer
coordinate too), and 0 for every dropped sample.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class MsdaCase:
  n: int
  lq: int
  m: int
  d: int
  shapes: tuple[tuple[int, int], ...]
  p: int

  @property
  def levels(self) -> int:
    return len(self.shapes)

  @property
  def s(self) -> int:
    return sum(h * w for h, w in self.shapes)

  @property
  def starts(self) -> list[int]:
    return [int(v) for v in np.cumsum([0] + [h * w for h, w in self.shapes[:-1]])]

  def __str__(self):
    return (f"N={self.n} Lq={self.lq} M={self.m} D={self.d} P={self.p} "
            f"levels={'/'.join(f'{h}x{w}' for h, w in self.shapes)}")


def make_args(case: MsdaCase, seed: int = 0, *, margin: float = 0.15) -> dict[str, np.ndarray]:
  """Random float64 ``value``, ``sampling_locations`` (uniform in ``[-margin, 1 + margin]``, so
  some samples fall off the maps) and positive ``attention_weights``."""
  rng = np.random.default_rng(seed)
  return dict(
      value=rng.standard_normal((case.n, case.s, case.m, case.d)),
      sampling_locations=rng.uniform(-margin, 1 + margin,
                                     (case.n, case.lq, case.m, case.levels, case.p, 2)),
      attention_weights=rng.uniform(0.1, 1.0, (case.n, case.lq, case.m, case.levels, case.p)))


def _corners(h: float, w: float, height: int, width: int):
  """``(row, col, weight, d weight / dh, d weight / dw)`` of the corners inside the map, or []
  for a dropped sample."""
  if not (-1 < h < height and -1 < w < width):  # NaN compares false: dropped
    return []
  h0, w0 = math.floor(h), math.floor(w)
  lh, lw = h - h0, w - w0
  out = []
  for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
    r, c = h0 + dr, w0 + dc
    if 0 <= r < height and 0 <= c < width:
      wh, dwh = (lh, 1.0) if dr else (1 - lh, -1.0)
      ww, dww = (lw, 1.0) if dc else (1 - lw, -1.0)
      out.append((r, c, wh * ww, dwh * ww, wh * dww))
  return out


def _levels(case: MsdaCase, value: np.ndarray):
  """``value`` as a list of ``[N, H_l, W_l, M, D]`` maps."""
  return [value[:, start:start + h * w].reshape(case.n, h, w, case.m, case.d)
          for (h, w), start in zip(case.shapes, case.starts)]


def ms_deform_attn(case: MsdaCase, value, sampling_locations, attention_weights) -> np.ndarray:
  """``[N, Lq, M * D]`` in float64."""
  value, loc, attw = (np.asarray(a, np.float64) for a in
                      (value, sampling_locations, attention_weights))
  maps = _levels(case, value)
  out = np.zeros((case.n, case.lq, case.m, case.d))
  for n in range(case.n):
    for q in range(case.lq):
      for m in range(case.m):
        for lvl, (height, width) in enumerate(case.shapes):
          for p in range(case.p):
            x, y = loc[n, q, m, lvl, p]
            h, w = y * height - 0.5, x * width - 0.5
            for r, c, weight, _, _ in _corners(h, w, height, width):
              out[n, q, m] += attw[n, q, m, lvl, p] * weight * maps[lvl][n, r, c, m]
  return out.reshape(case.n, case.lq, case.m * case.d)


def vjp(case: MsdaCase, value, sampling_locations, attention_weights, cotangent
        ) -> dict[str, np.ndarray]:
  """Gradients of ``sum(ms_deform_attn(...) * cotangent)`` for each argument (float64)."""
  value, loc, attw = (np.asarray(a, np.float64) for a in
                      (value, sampling_locations, attention_weights))
  cot = np.asarray(cotangent, np.float64).reshape(case.n, case.lq, case.m, case.d)
  maps = _levels(case, value)
  grad_maps = [np.zeros_like(level) for level in maps]
  grad_loc = np.zeros_like(loc)
  grad_attw = np.zeros_like(attw)
  for n in range(case.n):
    for q in range(case.lq):
      for m in range(case.m):
        g = cot[n, q, m]
        for lvl, (height, width) in enumerate(case.shapes):
          for p in range(case.p):
            x, y = loc[n, q, m, lvl, p]
            a = attw[n, q, m, lvl, p]
            h, w = y * height - 0.5, x * width - 0.5
            for r, c, weight, dh, dw in _corners(h, w, height, width):
              v = maps[lvl][n, r, c, m]
              grad_maps[lvl][n, r, c, m] += a * weight * g
              grad_attw[n, q, m, lvl, p] += weight * (v @ g)
              grad_loc[n, q, m, lvl, p, 0] += a * dw * width * (v @ g)
              grad_loc[n, q, m, lvl, p, 1] += a * dh * height * (v @ g)
  grad_value = np.concatenate([gm.reshape(case.n, -1, case.m, case.d) for gm in grad_maps], 1)
  return dict(value=grad_value, sampling_locations=grad_loc, attention_weights=grad_attw)
