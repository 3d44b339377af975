"""Deformable RoI pooling (mmcv's ``DeformRoIPool``; modulated with a mask): the public function,
its argument checks and the dispatch between the native kernels (:mod:`flaxdcn._ffi`) and the
pure-jnp implementation (:mod:`flaxdcn.ops._xla_roi_pool`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxdcn import _ffi
from flaxdcn._geometry import (RoIPoolGeometry, check_implementation, compute_dtype, pair,
                               result_dtype, shape_error)
from flaxdcn.ops import _xla_roi_pool

_FN = "deform_roi_pool"


def deform_roi_pool(
    features: jax.Array,
    rois: jax.Array,
    offsets: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    output_size: int | tuple[int, int] = (7, 7),
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    implementation: str | None = None,
    deterministic_backward: bool = False,
) -> jax.Array:
  r"""Deformable RoI pooling, channels last (mmcv's ``DeformRoIPool``; modulated with ``mask``).

  RoIAlign-style average pooling in which every output bin may be shifted by its own offset, a
  fraction of the RoI size: bin ``(i, j)`` moves by ``gamma * (roi_h * dy, roi_w * dx)``.

  Shapes use these letters: ``N`` batch, ``H, W`` feature size, ``C`` channels, ``R`` RoIs,
  ``oh, ow`` output size.

  For RoI ``(b, x1, y1, x2, y2)`` (mmcv's convention, no rounding, no minimum size)::

    start_h = y1 * spatial_scale - 0.5          roi_h = (y2 - y1) * spatial_scale
    bin_h = roi_h / oh                          grid_h = sampling_ratio or ceil(roi_h / oh)
    y(i, iy) = start_h + gamma * roi_h * dy[i, j] + i * bin_h + (iy + 0.5) * bin_h / grid_h

  and ``x`` likewise with ``dx`` and ``w``; the sub-grid size is fixed before the offset is
  applied. Each sample is read by the RoIAlign rule: 0 when ``y < -1``, ``y > H``, ``x < -1`` or
  ``x > W``; otherwise ``y`` and ``x`` are clamped into ``[0, H - 1] x [0, W - 1]`` and read
  bilinearly. A bin is the mean of its ``grid_h * grid_w`` samples (0 when the grid is empty, e.g.
  a RoI of negative or zero size with ``sampling_ratio=0``), times ``mask[r, i, j]``.

  The RoI's batch index ``rois[:, 0]`` is truncated toward zero (mmcv's C cast); a RoI whose index
  is outside ``[0, N)`` or that has a non-finite coordinate pools zeros. Bins whose shifted
  position is not finite (Inf/NaN offsets) are 0 with zero gradient, and never affect other bins.

  *Per-image RoIs.* ``rois`` may instead be ``[N, Ri, 4]``: ``Ri`` boxes ``(x1, y1, x2, y2)`` per
  image, the image implied by the leading axis; then offsets are ``[N, Ri, oh, ow, 2]``, mask
  ``[N, Ri, oh, ow]`` and the result ``[N, Ri, oh, ow, C]``. Every operand and the result lead
  with the image axis, so under ``jit`` with batch-sharded inputs each device pools its own images
  (the native custom call is batch partitionable; the jnp implementation maps over the images),
  with no gather of the features. A *padding box* (detectors pad to a fixed ``Ri``) is any box
  that is not ``x1 < x2 and y1 < y2``, e.g. all zeros, or one with a non-finite coordinate: it
  pools zeros and passes zero gradients, whatever ``sampling_ratio`` (in the ``[R, 5]`` form a
  zero-size box with ``sampling_ratio > 0`` samples its corner, as mmcv's does).

  Layout and conversion from mmcv: mmcv's ``offset`` is ``[R, 2, oh, ow]`` with channel 0 the
  *x* (width) offset and channel 1 the *y* offset; here it is ``[R, oh, ow, 2]`` as ``(dy, dx)``:
  ``offsets = mmcv_offset[:, ::-1].transpose(0, 2, 3, 1)``.

  Gradients flow to ``features``, ``offsets`` and ``mask``; ``rois`` are treated as constants
  (``stop_gradient``). The gradient is the exact derivative of the forward: mmcv's CUDA backward
  drops the derivative along the edge for samples clamped to the last row or column
  (``y > H - 1``); this one keeps it.

  Example usage::

    >>> import jax.numpy as jnp
    >>> import flaxdcn
    >>> features = jnp.ones((2, 32, 32, 16))
    >>> rois = jnp.array([[0, 4.0, 4.0, 20.0, 28.0], [1, 0.0, 0.0, 31.0, 31.0]])
    >>> offsets = jnp.zeros((2, 7, 7, 2))          # zero offsets: RoIAlign
    >>> flaxdcn.deform_roi_pool(features, rois, offsets).shape
    (2, 7, 7, 16)
    >>> boxes = jnp.array([[[4.0, 4.0, 20.0, 28.0], [0.0, 0.0, 0.0, 0.0]],   # 2nd: padding
    ...                    [[0.0, 0.0, 31.0, 31.0], [8.0, 2.0, 16.0, 9.0]]])
    >>> flaxdcn.deform_roi_pool(features, boxes, output_size=(3, 3)).shape   # per-image RoIs
    (2, 2, 3, 3, 16)

  Args:
    features: ``[N, H, W, C]``.
    rois: ``[R, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or per-image boxes ``[N, Ri, 4]``
      ``(x1, y1, x2, y2)``, in input-image coordinates (scaled by ``spatial_scale``). Cast to the
      compute dtype (float32; float64 for float64 features).
    offsets: ``[R, oh, ow, 2]`` (per image ``[N, Ri, oh, ow, 2]``) normalised ``(dy, dx)`` per
      bin, or None for plain RoIAlign-style pooling.
    mask: ``[R, oh, ow]`` (per image ``[N, Ri, oh, ow]``) modulation multiplied into every bin, or
      None.
    output_size: ``oh`` and ``ow``: an int or a pair (default ``(7, 7)``).
    spatial_scale: factor from input-image to feature coordinates, e.g. ``1 / 16`` (> 0).
    sampling_ratio: samples per bin and axis; 0 (default) for ``ceil(roi_size / output_size)``.
    gamma: scale of the offsets (default 0.1).
    implementation: ``None`` (the native kernel where it was built for the platform, else
      ``"xla"``), ``"xla"`` (pure jnp) or ``"ffi"`` (native; an error where it is not built).
    deterministic_backward: make the native CUDA backward bitwise reproducible (no float
      atomics; slower). The ``"xla"`` implementation follows XLA's
      ``--xla_gpu_deterministic_ops``.

  Returns:
    ``[R, oh, ow, C]`` (per image ``[N, Ri, oh, ow, C]``) in the promoted dtype of ``features``,
    ``offsets`` and ``mask``. Sampling coordinates and accumulation are float32 (float64 for
    float64 inputs).

  Raises:
    ValueError: wrong rank or shape of an argument, or a bad ``output_size``, ``spatial_scale``,
      ``sampling_ratio`` or ``gamma``.
    TypeError: non-floating ``features``, ``offsets`` or ``mask``; non-real ``rois``.

  References:
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
    - Zhu et al., `Deformable ConvNets v2: More Deformable, Better Results
      <https://arxiv.org/abs/1811.11168>`_, CVPR 2019.
  """
  check_implementation(implementation, fn=_FN)
  dtype = result_dtype(_FN, features=features, offsets=offsets, mask=mask)
  rois_dtype = jnp.result_type(rois)
  if not (jnp.issubdtype(rois_dtype, jnp.floating) or jnp.issubdtype(rois_dtype, jnp.integer)):
    raise TypeError(f"{_FN}: rois must be a real (floating or integer) array, got dtype "
                    f"{rois_dtype}.")
  geometry = _check_arguments(features, rois, offsets, mask, output_size, spatial_scale,
                              sampling_ratio, gamma)
  n, _, _, channels = jnp.shape(features)
  leading = tuple(jnp.shape(rois)[:-1])  # (R,) or (N, Ri)
  if math.prod(leading) == 0 or channels == 0 or n == 0:
    return jnp.zeros((*leading, *geometry.output_size, channels), dtype)

  features = jnp.asarray(features, dtype)
  rois = lax.stop_gradient(jnp.asarray(rois, compute_dtype(dtype)))
  offsets = None if offsets is None else jnp.asarray(offsets, dtype)
  if implementation == "xla":
    out = _xla_roi_pool.deform_roi_pool_xla(features, rois, offsets, geometry)
  else:
    fallback = _xla_roi_pool.deform_roi_pool_xla if implementation is None else None
    out = _ffi.deform_roi_pool(features, rois, offsets, geometry,
                               deterministic_backward=deterministic_backward, fallback=fallback)
  if mask is not None:
    out = out * jnp.asarray(mask, dtype)[..., None]
  return out


def _check_arguments(features, rois, offsets, mask, output_size, spatial_scale, sampling_ratio,
                     gamma) -> RoIPoolGeometry:
  if jnp.ndim(features) != 4:
    raise shape_error(_FN, "features", jnp.shape(features), "[N, H, W, C] (rank 4)")
  _, height, width, _ = jnp.shape(features)
  if min(height, width) < 1:
    raise shape_error(_FN, "features", jnp.shape(features), "[N, H, W, C] with H, W >= 1")
  if jnp.ndim(rois) == 3:
    if jnp.shape(rois)[0] != jnp.shape(features)[0] or jnp.shape(rois)[2] != 4:
      raise shape_error(_FN, "rois", jnp.shape(rois),
                        f"[R, 5] or [N, Ri, 4] with N = {jnp.shape(features)[0]} (features)",
                        "per-image boxes (x1, y1, x2, y2)")
  elif jnp.ndim(rois) != 2 or jnp.shape(rois)[1] != 5:
    raise shape_error(_FN, "rois", jnp.shape(rois), "[R, 5] or [N, Ri, 4]",
                      "rows (batch_index, x1, y1, x2, y2), or per-image boxes (x1, y1, x2, y2)")
  leading = tuple(jnp.shape(rois)[:-1])
  per_image = len(leading) == 2
  oh, ow = pair(output_size, "output_size", fn=_FN)
  if (not isinstance(sampling_ratio, (int, np.integer)) or isinstance(sampling_ratio, bool)
      or sampling_ratio < 0):
    raise ValueError(f"{_FN}: sampling_ratio must be an int >= 0 (0: adaptive), got "
                     f"{sampling_ratio!r}.")
  for name, value, positive in (("spatial_scale", spatial_scale, True), ("gamma", gamma, False)):
    try:
      value = float(value)
    except (TypeError, ValueError):
      raise ValueError(f"{_FN}: {name} must be a float, got {value!r}.") from None
    if not math.isfinite(value) or (positive and value <= 0):
      raise ValueError(f"{_FN}: {name} must be a finite float{' > 0' if positive else ''}, got "
                       f"{value!r}.")
  letters = "[N, Ri, oh, ow" if per_image else "[R, oh, ow"
  if offsets is not None and tuple(jnp.shape(offsets)) != (*leading, oh, ow, 2):
    raise shape_error(_FN, "offsets", jnp.shape(offsets), str((*leading, oh, ow, 2)),
                      f"{letters}, 2] as (dy, dx)")
  if mask is not None and tuple(jnp.shape(mask)) != (*leading, oh, ow):
    raise shape_error(_FN, "mask", jnp.shape(mask), str((*leading, oh, ow)), f"{letters}]")
  return RoIPoolGeometry((int(height), int(width)), (oh, ow), float(spatial_scale),
                         int(sampling_ratio), float(gamma))
