"""A loop reference for deformable RoI pooling, written from mmcv's semantics
(docs/ops/roi_pool.md).

NumPy, float64, one sample at a time: the oracle the jnp and native implementations are tested
against. It follows mmcv's ``deform_roi_pool`` kernel statement by statement in the channels-last
layout of flaxdcn (offsets ``[R, oh, ow, 2]`` as ``(dy, dx)``), and differentiates it by hand:
the exact derivative of the forward, including the derivative along the clamped last row/column
that mmcv's CUDA backward drops.
"""

from __future__ import annotations

import math

import numpy as np


def _bilinear(image, y, x):
  """mmcv's ``bilinear_interpolate`` on ``image`` ``[H, W, C]``, with its partial derivatives.

  Returns:
    ``(value [C], d value / dy [C], d value / dx [C], corners)`` where ``corners`` lists
    ``(row, col, weight)``.
  """
  height, width, channels = image.shape
  zero = np.zeros(channels)
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return zero, zero, zero, []
  dy_scale = dx_scale = 1.0
  if y <= 0:
    y, dy_scale = 0.0, 0.0
  if x <= 0:
    x, dx_scale = 0.0, 0.0
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_high = y_low = height - 1
    y, dy_scale = float(y_low), 0.0
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_high = x_low = width - 1
    x, dx_scale = float(x_low), 0.0
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  v1, v2 = image[y_low, x_low], image[y_low, x_high]
  v3, v4 = image[y_high, x_low], image[y_high, x_high]
  value = hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4
  d_y = dy_scale * (hx * (v3 - v1) + lx * (v4 - v2))
  d_x = dx_scale * (hy * (v2 - v1) + ly * (v4 - v3))
  corners = [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx),
             (y_high, x_high, ly * lx)]
  return value, d_y, d_x, corners


def _roi_geometry(roi, spatial_scale, output_size, sampling_ratio):
  oh, ow = output_size
  start_w = roi[1] * spatial_scale - 0.5
  start_h = roi[2] * spatial_scale - 0.5
  end_w = roi[3] * spatial_scale - 0.5
  end_h = roi[4] * spatial_scale - 0.5
  roi_w, roi_h = end_w - start_w, end_h - start_h
  grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / oh))
  grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / ow))
  return start_h, start_w, roi_h, roi_w, roi_h / oh, roi_w / ow, grid_h, grid_w


def deform_roi_pool(features, rois, offsets=None, mask=None, *, output_size=(7, 7),
                    spatial_scale=1.0, sampling_ratio=0, gamma=0.1, cotangent=None):
  """Forward (and, given ``cotangent`` ``[R, oh, ow, C]``, the VJP) of deformable RoI pooling.

  Args:
    features: ``[N, H, W, C]``.
    rois: ``[R, 5]`` ``(batch_index, x1, y1, x2, y2)``.
    offsets: ``[R, oh, ow, 2]`` ``(dy, dx)`` or None.
    mask: ``[R, oh, ow]`` or None.

  Returns:
    ``out [R, oh, ow, C]``, or ``(out, grads)`` with ``grads`` a dict of ``features``, ``offsets``
    and ``mask`` gradients (None for absent arguments) when ``cotangent`` is given.
  """
  features = np.asarray(features, np.float64)
  rois = np.asarray(rois, np.float64)
  n, _, _, channels = features.shape
  oh, ow = output_size
  num_rois = rois.shape[0]
  out = np.zeros((num_rois, oh, ow, channels))
  grad_features = np.zeros_like(features)
  grad_offsets = None if offsets is None else np.zeros((num_rois, oh, ow, 2))
  grad_mask = None if mask is None else np.zeros((num_rois, oh, ow))
  for r in range(num_rois):
    roi = rois[r]
    if not np.all(np.isfinite(roi)):
      continue
    b = int(roi[0])  # C cast: truncation toward zero
    if b < 0 or b >= n:
      continue
    start_h, start_w, roi_h, roi_w, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
        roi, spatial_scale, output_size, sampling_ratio)
    count = max(grid_h * grid_w, 1)
    image = features[b]
    for ph in range(oh):
      for pw in range(ow):
        y0, x0 = start_h, start_w
        if offsets is not None:
          y0 = y0 + gamma * roi_h * offsets[r, ph, pw, 0]
          x0 = x0 + gamma * roi_w * offsets[r, ph, pw, 1]
        if not (np.isfinite(y0) and np.isfinite(x0)):
          continue
        total = np.zeros(channels)
        d_y0 = np.zeros(channels)
        d_x0 = np.zeros(channels)
        samples = []
        for iy in range(grid_h):
          y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
          for ix in range(grid_w):
            x = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            value, d_y, d_x, corners = _bilinear(image, y, x)
            total += value
            d_y0 += d_y
            d_x0 += d_x
            samples.extend(corners)
        pooled = total / count
        m = 1.0 if mask is None else float(mask[r, ph, pw])
        out[r, ph, pw] = pooled * m
        if cotangent is None:
          continue
        g = np.asarray(cotangent[r, ph, pw], np.float64)
        for row, col, weight in samples:
          grad_features[b, row, col] += g * m * weight / count
        if grad_offsets is not None:
          grad_offsets[r, ph, pw, 0] += gamma * roi_h * m * np.dot(g, d_y0) / count
          grad_offsets[r, ph, pw, 1] += gamma * roi_w * m * np.dot(g, d_x0) / count
        if grad_mask is not None:
          grad_mask[r, ph, pw] = np.dot(g, pooled)
  if cotangent is None:
    return out
  return out, {"features": grad_features, "offsets": grad_offsets, "mask": grad_mask}


def sample_positions(rois, offsets=None, *, output_size=(7, 7), spatial_scale=1.0,
                     sampling_ratio=0, gamma=0.1):
  """All sample coordinates ``(y, x)`` of all bins (for choosing inputs away from kinks)."""
  rois = np.asarray(rois, np.float64)
  oh, ow = output_size
  ys, xs = [], []
  for r, roi in enumerate(rois):
    start_h, start_w, roi_h, roi_w, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
        roi, spatial_scale, output_size, sampling_ratio)
    for ph in range(oh):
      for pw in range(ow):
        y0, x0 = start_h, start_w
        if offsets is not None:
          y0 = y0 + gamma * roi_h * offsets[r, ph, pw, 0]
          x0 = x0 + gamma * roi_w * offsets[r, ph, pw, 1]
        ys.extend(y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h for iy in range(grid_h))
        xs.extend(x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w for ix in range(grid_w))
  return np.array(ys), np.array(xs)
