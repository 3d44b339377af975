"""NumPy float64 loop reference for Deformable Kernels, written from the formula.

``O[n, y, x] = sum_{i, j} I[n, y * sh - pad_h + i * dh, x * sw - pad_w + j * dw] . W(u, v) + b``,
``u = i + (Sh - kh) / 2 + dy``, ``v = j + (Sw - kw) / 2 + dx``; ``W(u, v)`` is the bilinear read of
the scope with DCN's rule (0 outside ``(-1, Sh) x (-1, Sw)``; a tap counts only inside the scope),
and pixels outside the image are 0. Deliberately slow and obvious: one output position, one kernel
point at a time.
"""

from __future__ import annotations

import math

import numpy as np


def sample_scope(scope: np.ndarray, u: float, v: float) -> np.ndarray:
  """Bilinear read of ``scope [Sh, Sw, ...]`` at ``(u, v)``; zeros outside."""
  s_h, s_w = scope.shape[:2]
  out = np.zeros(scope.shape[2:], np.float64)
  if not (-1 < u < s_h and -1 < v < s_w):
    return out
  u0, v0 = math.floor(u), math.floor(v)
  for a in (u0, u0 + 1):
    for b in (v0, v0 + 1):
      if 0 <= a < s_h and 0 <= b < s_w:
        out += (1 - abs(u - a)) * (1 - abs(v - b)) * scope[a, b]
  return out


def deformable_kernel_conv2d(inputs, offsets, scope, bias=None, *, kernel_size, strides=(1, 1),
                             padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1) -> np.ndarray:
  """Deformable Kernels convolution.

  Args:
    inputs: ``[N, H, W, C]``.
    offsets: ``[N, K * 2]`` (one kernel per image) or ``[N, Ho, Wo, K * 2]`` (one per position),
      order ``(i, j, (dy, dx))``.
    scope: ``[Sh, Sw, C // groups, O]``.
    bias: ``[O]`` or None.
    kernel_size, strides, dilation: ``(h, w)`` pairs.
    padding: ``((lo, hi), (lo, hi))``.
    groups: feature groups.

  Returns:
    ``[N, Ho, Wo, O]`` float64.
  """
  inputs, offsets, scope = (np.asarray(a, np.float64) for a in (inputs, offsets, scope))
  n, height, width, channels = inputs.shape
  s_h, s_w, group_in, out_features = scope.shape
  (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
  (ph, ph_hi), (pw, pw_hi) = padding
  ho = (height + ph + ph_hi - (kh - 1) * dh - 1) // sh + 1
  wo = (width + pw + pw_hi - (kw - 1) * dw - 1) // sw + 1
  group_out = out_features // groups
  out = np.zeros((n, ho, wo, out_features), np.float64)
  for b in range(n):
    for y in range(ho):
      for x in range(wo):
        off = offsets[b] if offsets.ndim == 2 else offsets[b, y, x]
        for i in range(kh):
          for j in range(kw):
            h, w = y * sh - ph + i * dh, x * sw - pw + j * dw
            if not (0 <= h < height and 0 <= w < width):
              continue
            dy, dx = off[2 * (i * kw + j)], off[2 * (i * kw + j) + 1]
            tap = sample_scope(scope, i + (s_h - kh) / 2 + dy, j + (s_w - kw) / 2 + dx)
            for g in range(groups):
              pixel = inputs[b, h, w, g * group_in:(g + 1) * group_in]
              out[b, y, x, g * group_out:(g + 1) * group_out] += (
                  pixel @ tap[:, g * group_out:(g + 1) * group_out])
  if bias is not None:
    out += np.asarray(bias, np.float64)
  return out
