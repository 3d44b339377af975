"""DCNv3 (InternImage) and DCNv4 (FlashInternImage): deformable sampling summed over points."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax.typing import PaddingLike

from flaxdcn import _ffi
from flaxdcn._geometry import (ConvGeometry, Dcnv3Geometry, check_implementation,
                               pair, result_dtype, shape_error)
from flaxdcn.ops import _xla_dcnv3


def dcnv3(
    inputs: jax.Array,
    offsets: jax.Array,
    mask: jax.Array,
    *,
    kernel_size: int | tuple[int, int],
    strides: int | tuple[int, int] = 1,
    padding: PaddingLike = 0,
    kernel_dilation: int | tuple[int, int] = 1,
    group_count: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    implementation: str | None = None,
    deterministic_backward: bool = False,
) -> jax.Array:
  r"""DCNv3 sampling (InternImage's ``dcnv3_core``), channels last.

  .. math::
     y(p)_{g c} = \sum_k m_{g k}(p) \, x_{g c}(p + p_k + \Delta p_{g k}(p))

  A mask-weighted sum over the kernel points of bilinear samples, one set of offsets and mask
  per channel group, and no kernel weights (the DCNv3 module puts linear layers around it).

  Shapes use these letters: ``N`` batch, ``H, W`` input size, ``Ho, Wo`` output size (that of a
  convolution with this kernel, stride, padding and dilation), ``C`` channels, ``G`` groups,
  ``kh, kw`` kernel size, ``P`` kernel points (``kh * kw``, one fewer with ``remove_center``),
  ``s = offset_scale``, ``c_h = (kernel_dilation[0] * (kh - 1)) // 2`` and ``c_w`` likewise.

  The sample for output ``(y, x)``, kernel column ``i``, kernel row ``j`` and group ``g`` is
  read at::

    w = x * strides[1] - pad_lo[1] + c_w + (i * kernel_dilation[1] - c_w + dx) * s
    h = y * strides[0] - pad_lo[0] + c_h + (j * kernel_dilation[0] - c_h + dy) * s

  with :func:`flaxdcn.deform_conv2d`'s bilinear rule (0 outside ``(-1, H) x (-1, W)``; corners
  outside the image contribute 0). Points run column-major: ``p = i * kh + j``; with
  ``remove_center`` the point ``(kw // 2, kh // 2)`` is skipped. Offset pairs are ``(dx, dy)``,
  x first. These are the layouts of InternImage's DCNv3, whose checkpoints port with no
  reordering.

  Example usage::

    >>> import jax.numpy as jnp
    >>> import flaxdcn
    >>> x = jnp.ones((2, 9, 9, 8))
    >>> offsets = jnp.zeros((2, 9, 9, 4 * 9 * 2))   # G = 4 groups, P = 9 points
    >>> mask = jnp.full((2, 9, 9, 4 * 9), 1 / 9)     # a 3 x 3 box filter
    >>> y = flaxdcn.dcnv3(x, offsets, mask, kernel_size=3, padding=1, group_count=4)
    >>> y.shape
    (2, 9, 9, 8)
    >>> round(float(y[0, 4, 4, 0]), 6), round(float(y[0, 0, 0, 0]), 6)  # inside; a corner
    (1.0, 0.444444)

  Args:
    inputs: ``[N, H, W, C]``.
    offsets: ``[N, Ho, Wo, G * P * 2]``, channel order ``(g, p, (dx, dy))``.
    mask: ``[N, Ho, Wo, G * P]``, channel order ``(g, p)``, used as given (the DCNv3 module
      applies a softmax over ``p``).
    kernel_size: ``kh`` or ``(kh, kw)``; both odd with ``remove_center``.
    strides: int or ``(sh, sw)``.
    padding: ``"SAME"``, ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``, with
      ``lax.conv_general_dilated``'s meaning (InternImage's ``pad`` is the int form).
    kernel_dilation: int or ``(dh, dw)``.
    group_count: ``G``; ``C`` must be divisible by it.
    offset_scale: ``s``, a Python float (static).
    remove_center: skip the kernel centre (odd kernels only).
    implementation: ``None`` (the native kernels where they were built for the platform, else
      ``"xla"``), ``"xla"`` (pure jnp) or ``"ffi"`` (native; an error where it is not built).
    deterministic_backward: make the native CUDA backward bitwise reproducible (no float
      atomics; slower). The native CPU kernels are always deterministic.

  Returns:
    ``[N, Ho, Wo, C]`` in the promoted dtype of the arguments. Sampling coordinates and
    accumulation are float32 (float64 for float64 inputs).

  Raises:
    ValueError: wrong rank or shape of an argument, channels not divisible by the groups, an
      even kernel with ``remove_center``, a bad padding spec or an empty output.
    TypeError: a non-floating argument, or a non-real ``offset_scale``.

  References:
    - Wang et al., `InternImage: Exploring Large-Scale Vision Foundation Models with Deformable
      Convolutions <https://arxiv.org/abs/2211.05778>`_, CVPR 2023.
  """
  fn = "dcnv3"
  check_implementation(implementation, fn=fn)
  dtype = result_dtype(fn, inputs=inputs, offsets=offsets, mask=mask)
  geometry = _check_geometry(fn, inputs, kernel_size, strides, padding, kernel_dilation,
                             group_count, offset_scale, remove_center)
  n = jnp.shape(inputs)[0]
  ho, wo = geometry.conv.out_size
  gp = geometry.groups * geometry.num_points
  why = f"G={geometry.groups} groups of P={geometry.num_points} points"
  if tuple(jnp.shape(offsets)) != (n, ho, wo, gp * 2):
    raise shape_error(fn, "offsets", jnp.shape(offsets), str((n, ho, wo, gp * 2)),
                      f"[N, Ho, Wo, G * P * 2], {why}")
  if tuple(jnp.shape(mask)) != (n, ho, wo, gp):
    raise shape_error(fn, "mask", jnp.shape(mask), str((n, ho, wo, gp)),
                      f"[N, Ho, Wo, G * P], {why}")
  if n == 0:
    return jnp.zeros((0, ho, wo, jnp.shape(inputs)[3]), dtype)
  inputs, offsets, mask = (jnp.asarray(a, dtype) for a in (inputs, offsets, mask))
  if implementation == "xla":
    return _xla_dcnv3.dcnv3(inputs, offsets, mask, geometry)
  fallback = _xla_dcnv3.dcnv3 if implementation is None else None
  return _ffi.dcnv3(inputs, offsets, mask, geometry,
                    deterministic_backward=deterministic_backward, fallback=fallback)


def dcnv4(
    inputs: jax.Array,
    offset_mask: jax.Array,
    *,
    kernel_size: int | tuple[int, int],
    strides: int | tuple[int, int] = 1,
    padding: PaddingLike = 0,
    kernel_dilation: int | tuple[int, int] = 1,
    group_count: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    implementation: str | None = None,
    deterministic_backward: bool = False,
) -> jax.Array:
  """DCNv4 sampling (FlashInternImage's ``DCNv4Function``), channels last.

  The computation of :func:`dcnv3` (same letters, sample positions and point order), with the
  offsets and mask packed into one array and no softmax anywhere. ``D`` is ``G * P * 3`` rounded
  up to a multiple of 8; group ``g`` occupies channels ``[g * 3P, (g + 1) * 3P)`` of
  ``offset_mask``: first its ``2P`` offsets in order ``(p, (dx, dy))``, then its ``P`` mask
  values. The channels past ``3GP`` are padding: ignored, with zero gradient.

  Example usage::

    >>> import jax.numpy as jnp
    >>> import flaxdcn
    >>> x = jnp.ones((2, 9, 9, 8))
    >>> offset_mask = jnp.zeros((2, 9, 9, 112))   # G = 4, P = 9: 108 channels, padded to 112
    >>> y = flaxdcn.dcnv4(x, offset_mask, kernel_size=3, padding=1, group_count=4)
    >>> y.shape
    (2, 9, 9, 8)

  Args:
    inputs: ``[N, H, W, C]``.
    offset_mask: ``[N, Ho, Wo, D]`` as above.
    kernel_size: ``kh`` or ``(kh, kw)``; both odd with ``remove_center``.
    strides: int or ``(sh, sw)``.
    padding: as in :func:`dcnv3`.
    kernel_dilation: int or ``(dh, dw)``.
    group_count: ``G``; ``C`` must be divisible by it.
    offset_scale: ``s``, a Python float (static).
    remove_center: skip the kernel centre (odd kernels only).
    implementation: ``None`` (the native kernels where they were built for the platform, else
      ``"xla"``), ``"xla"`` (pure jnp) or ``"ffi"`` (native; an error where it is not built).
    deterministic_backward: make the native CUDA backward bitwise reproducible (no float
      atomics; slower). The native CPU kernels are always deterministic.

  Returns:
    ``[N, Ho, Wo, C]`` in the promoted dtype of the arguments. Sampling coordinates and
    accumulation are float32 (float64 for float64 inputs).

  Raises:
    ValueError: wrong rank or shape of an argument, channels not divisible by the groups, an
      even kernel with ``remove_center``, a bad padding spec or an empty output.
    TypeError: a non-floating argument, or a non-real ``offset_scale``.

  References:
    - Xiong et al., `Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for
      Vision Applications <https://arxiv.org/abs/2401.06197>`_, CVPR 2024.
    - Wang et al., `InternImage: Exploring Large-Scale Vision Foundation Models with Deformable
      Convolutions <https://arxiv.org/abs/2211.05778>`_, CVPR 2023.
  """
  fn = "dcnv4"
  check_implementation(implementation, fn=fn)
  dtype = result_dtype(fn, inputs=inputs, offset_mask=offset_mask)
  geometry = _check_geometry(fn, inputs, kernel_size, strides, padding, kernel_dilation,
                             group_count, offset_scale, remove_center)
  n = jnp.shape(inputs)[0]
  ho, wo = geometry.conv.out_size
  d = geometry.offset_mask_channels
  if tuple(jnp.shape(offset_mask)) != (n, ho, wo, d):
    raise shape_error(fn, "offset_mask", jnp.shape(offset_mask), str((n, ho, wo, d)),
                      f"[N, Ho, Wo, D], D = G * P * 3 = {geometry.groups * geometry.num_points * 3}"
                      " rounded up to a multiple of 8")
  if n == 0:
    return jnp.zeros((0, ho, wo, jnp.shape(inputs)[3]), dtype)
  inputs, offset_mask = (jnp.asarray(a, dtype) for a in (inputs, offset_mask))
  if implementation == "xla":
    return _xla_dcnv3.dcnv4(inputs, offset_mask, geometry)
  fallback = _xla_dcnv3.dcnv4 if implementation is None else None
  return _ffi.dcnv4(inputs, offset_mask, geometry,
                    deterministic_backward=deterministic_backward, fallback=fallback)


def _check_geometry(fn, inputs, kernel_size, strides, padding, kernel_dilation, group_count,
                    offset_scale, remove_center) -> Dcnv3Geometry:
  if jnp.ndim(inputs) != 4:
    raise shape_error(fn, "inputs", jnp.shape(inputs), "[N, H, W, C] (rank 4)")
  _, height, width, channels = jnp.shape(inputs)
  kh, kw = pair(kernel_size, "kernel_size", fn=fn)
  groups = pair(group_count, "group_count", fn=fn)[0]
  if channels % groups:
    raise ValueError(f"{fn}: inputs has {channels} channels (shape {tuple(jnp.shape(inputs))}), "
                     f"not divisible by group_count={groups}.")
  if not isinstance(offset_scale, numbers.Real) or isinstance(offset_scale, bool):
    raise TypeError(f"{fn}: offset_scale must be a real number (a static Python float), got "
                    f"{offset_scale!r}.")
  if not isinstance(remove_center, (bool, int)):
    raise TypeError(f"{fn}: remove_center must be a bool, got {remove_center!r}.")
  if remove_center and (kh % 2 == 0 or kw % 2 == 0):
    raise ValueError(f"{fn}: remove_center needs an odd kernel size, got kernel_size="
                     f"{(kh, kw)}.")
  if remove_center and kh * kw == 1:
    raise ValueError(f"{fn}: remove_center with a 1 x 1 kernel leaves no kernel point.")
  conv = ConvGeometry.create((height, width), (kh, kw), strides, padding, kernel_dilation, groups,
                             fn=fn)
  return Dcnv3Geometry(conv, float(offset_scale), bool(remove_center))
