"""An independent NumPy float64 loop reference of ``flaxdcn.deform_conv2d`` (the contract of
docs/ops/deform_conv.md).

Written from the contract, not from the library: explicit loops over batch, output position,
offset group and kernel point; the bilinear rule spelled out corner by corner; channels of one
offset group handled as a vector (they share one sample). Slow on purpose; use tiny shapes.
"""

from __future__ import annotations

import math

import numpy as np


def bilinear(image: np.ndarray, h: float, w: float) -> np.ndarray:
  """Bilinear read of ``image [H, W, C]`` at ``(h, w)`` with the zero-padding rule of
  docs/ops/deform_conv.md.

  0 when ``h <= -1``, ``h >= H``, ``w <= -1`` or ``w >= W`` (also for NaN); otherwise each of the
  four neighbouring pixels contributes only if it lies inside the image.
  """
  height, width, channels = image.shape
  out = np.zeros(channels, np.float64)
  if not (-1 < h < height and -1 < w < width):  # False for NaN too.
    return out
  h0, w0 = math.floor(h), math.floor(w)
  lh, lw = h - h0, w - w0
  corners = ((h0, w0, (1 - lh) * (1 - lw)), (h0, w0 + 1, (1 - lh) * lw),
             (h0 + 1, w0, lh * (1 - lw)), (h0 + 1, w0 + 1, lh * lw))
  for r, c, weight in corners:
    if 0 <= r < height and 0 <= c < width:
      out += weight * image[r, c]
  return out


def explicit_padding(padding, in_size, kernel_size, strides, dilation):
  """``((lo, hi), (lo, hi))`` from any padding spec of the contract (lax's meaning of SAME)."""
  if isinstance(padding, str):
    pads = []
    for n, k, s, d in zip(in_size, kernel_size, strides, dilation):
      window = (k - 1) * d + 1
      if padding.upper() == "VALID":
        pads.append((0, 0))
      else:  # SAME: output ceil(n / s), extra padding on the high side.
        out = -(-n // s)
        total = max((out - 1) * s + window - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  if all(isinstance(p, int) for p in padding):
    return tuple((p, p) for p in padding)
  return tuple(tuple(p) for p in padding)


def pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def deform_conv2d(inputs, offsets, kernel, mask=None, bias=None, *, strides=1, padding="VALID",
                  kernel_dilation=1, feature_group_count=1, offset_group_count=1) -> np.ndarray:
  """Loop reference of ``deform_conv2d`` (docs/ops/deform_conv.md) in float64.

  Args:
    inputs: ``[N, H, W, C]``.
    offsets: ``[N, Ho, Wo, G * kh * kw * 2]`` in order ``(g, i, j, (dy, dx))``.
    kernel: ``[kh, kw, C // F, O]``.
    mask: ``[N, Ho, Wo, G * kh * kw]`` in order ``(g, i, j)`` or None.
    bias: ``[O]`` or None.

  Returns:
    ``[N, Ho, Wo, O]`` float64.
  """
  x = np.asarray(inputs, np.float64)
  off = np.asarray(offsets, np.float64)
  wgt = np.asarray(kernel, np.float64)
  n, height, width, channels = x.shape
  kh, kw, cin_group, out_features = wgt.shape
  fg, og = feature_group_count, offset_group_count
  assert cin_group * fg == channels and channels % og == 0 and out_features % fg == 0
  sh, sw = pair(strides)
  dh, dw = pair(kernel_dilation)
  (ph, ph_hi), (pw, pw_hi) = explicit_padding(padding, (height, width), (kh, kw), (sh, sw),
                                              (dh, dw))
  ho = (height + ph + ph_hi - ((kh - 1) * dh + 1)) // sh + 1
  wo = (width + pw + pw_hi - ((kw - 1) * dw + 1)) // sw + 1
  assert off.shape == (n, ho, wo, og * kh * kw * 2), (off.shape, (n, ho, wo, og * kh * kw * 2))
  m = None if mask is None else np.asarray(mask, np.float64)
  if m is not None:
    assert m.shape == (n, ho, wo, og * kh * kw)
  cg = channels // og            # channels per offset group
  out_group = out_features // fg  # output channels per feature group

  # Sampled values [N, Ho, Wo, kh, kw, C].
  cols = np.zeros((n, ho, wo, kh, kw, channels), np.float64)
  for b in range(n):
    for y in range(ho):
      for xo in range(wo):
        for g in range(og):
          for i in range(kh):
            for j in range(kw):
              k = (g * kh + i) * kw + j
              dy, dx = off[b, y, xo, 2 * k], off[b, y, xo, 2 * k + 1]
              h = y * sh - ph + i * dh + dy
              w = xo * sw - pw + j * dw + dx
              val = bilinear(x[b, :, :, g * cg:(g + 1) * cg], h, w)
              if m is not None:
                val = val * m[b, y, xo, k]
              cols[b, y, xo, i, j, g * cg:(g + 1) * cg] = val

  out = np.zeros((n, ho, wo, out_features), np.float64)
  for f in range(fg):
    c_slice = slice(f * cin_group, (f + 1) * cin_group)
    o_slice = slice(f * out_group, (f + 1) * out_group)
    out[..., o_slice] = np.einsum("nyxijc,ijco->nyxo", cols[..., c_slice], wgt[..., o_slice])
  if bias is not None:
    out = out + np.asarray(bias, np.float64)
  return out


def numerical_grad(fn, x: np.ndarray, cotangent: np.ndarray, eps: float) -> np.ndarray:
  """Central difference of ``sum(fn(x) * cotangent)`` w.r.t. every entry of ``x`` (float64).

  Exact up to rounding where ``fn`` is linear (inputs, kernel, mask, bias) and, away from integer
  sample coordinates, for offsets too (the bilinear read is piecewise linear in each coordinate).
  """
  x = np.array(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    saved = x[idx]
    x[idx] = saved + eps
    plus = np.sum(fn(x) * cotangent)
    x[idx] = saved - eps
    minus = np.sum(fn(x) * cotangent)
    x[idx] = saved
    grad[idx] = (plus - minus) / (2 * eps)
  return grad


# --- Random test cases -----------------------------------------------------------------------

class Case:
  """Geometry of one test case; ``kwargs()`` are the keyword arguments of ``deform_conv2d``."""

  def __init__(self, n, h, w, c, o, kernel, *, strides=1, padding="VALID", dilation=1, fg=1,
               og=1):
    self.n, self.h, self.w, self.c, self.o, self.kernel = n, h, w, c, o, tuple(kernel)
    self.strides, self.padding, self.dilation, self.fg, self.og = (strides, padding, dilation,
                                                                   fg, og)

  def kwargs(self) -> dict:
    return dict(strides=self.strides, padding=self.padding, kernel_dilation=self.dilation,
                feature_group_count=self.fg, offset_group_count=self.og)

  @property
  def explicit_padding(self):
    return explicit_padding(self.padding, (self.h, self.w), self.kernel, pair(self.strides),
                            pair(self.dilation))

  @property
  def out_size(self) -> tuple[int, int]:
    out = []
    for n, k, s, d, (lo, hi) in zip((self.h, self.w), self.kernel, pair(self.strides),
                                    pair(self.dilation), self.explicit_padding):
      out.append((n + lo + hi - ((k - 1) * d + 1)) // s + 1)
    return tuple(out)

  @property
  def num_points(self) -> int:
    return self.og * self.kernel[0] * self.kernel[1]

  def __repr__(self):
    return (f"Case(n={self.n}, h={self.h}, w={self.w}, c={self.c}, o={self.o}, "
            f"kernel={self.kernel}, {self.kwargs()})")


def make_args(case: Case, seed: int = 0, *, mask: bool = True, bias: bool = True,
              smooth: bool = False, offset_scale: float = 2.0) -> dict:
  """Random float64 arguments of ``deform_conv2d`` for ``case`` (a dict of NumPy arrays).

  ``smooth``: every offset has a fractional part in [0.2, 0.8], so no sample lies within 0.2 of an
  integer coordinate (where the bilinear read has kinks) and finite differences are valid.
  """
  rng = np.random.RandomState(seed)
  ho, wo = case.out_size
  kh, kw = case.kernel
  off_shape = (case.n, ho, wo, case.num_points * 2)
  if smooth:
    offsets = (rng.randint(-2, 3, size=off_shape) + rng.uniform(0.2, 0.8, size=off_shape))
  else:
    offsets = rng.uniform(-offset_scale, offset_scale, size=off_shape)
  args = dict(
      inputs=rng.normal(size=(case.n, case.h, case.w, case.c)),
      offsets=offsets,
      kernel=rng.normal(size=(kh, kw, case.c // case.fg, case.o)) / np.sqrt(kh * kw * case.c),
      mask=rng.uniform(0.1, 1.0, size=(case.n, ho, wo, case.num_points)) if mask else None,
      bias=rng.normal(size=(case.o,)) if bias else None,
  )
  return args


def cast(args: dict, dtype) -> dict:
  """``args`` with every array cast to ``dtype`` (None entries kept)."""
  return {k: None if v is None else np.asarray(v).astype(dtype) for k, v in args.items()}


def reference(case: Case, args: dict) -> np.ndarray:
  """The loop reference for ``case`` on ``args`` (any float dtype; computed in float64)."""
  args = {k: None if v is None else np.asarray(v).astype(np.float64) for k, v in args.items()}
  return deform_conv2d(**args, **case.kwargs())
