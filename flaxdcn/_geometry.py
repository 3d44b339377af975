"""Argument normalisation and checks shared by every public op.

Everything here runs on static shapes before anything is traced, so a bad call fails with a
``ValueError``/``TypeError`` that names the argument, the shape it got and the shape it expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Implementation = Literal["xla", "ffi"]
IMPLEMENTATIONS = ("xla", "ffi")

PaddingLike = Union[str, int, Sequence[int], Sequence[tuple[int, int]]]


def pair(value: Any, name: str, *, fn: str, minimum: int = 1) -> tuple[int, int]:
  """Returns ``value`` as a pair of ints (an int is used for both axes)."""
  if isinstance(value, (int, np.integer)):
    out = (int(value), int(value))
  else:
    try:
      out = tuple(int(v) for v in value)
    except TypeError:
      raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}.") from None
    if len(out) != 2 or any(not isinstance(v, (int, np.integer)) for v in value):
      raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}.")
  if min(out) < minimum:
    raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value!r}.")
  return out


def check_implementation(implementation: str | None, *, fn: str) -> None:
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"{fn}: implementation must be None, 'xla' or 'ffi', got {implementation!r}.")


def padding_pairs(padding: PaddingLike, in_size: tuple[int, int], window: tuple[int, int],
                  strides: tuple[int, int], *, fn: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """Explicit ``((lo, hi), (lo, hi))`` padding with ``lax.conv_general_dilated``'s meaning.

  Args:
    padding: ``"SAME"``, ``"VALID"`` (``"SAME_LOWER"`` too), an int, a pair of ints (symmetric per
      axis) or a pair of ``(lo, hi)`` pairs.
    in_size: spatial input size ``(H, W)``.
    window: the dilated kernel extent ``((kh - 1) * dh + 1, (kw - 1) * dw + 1)``.
    strides: ``(sh, sw)``.
  """
  if isinstance(padding, str):
    try:
      pads = lax.padtype_to_pads(in_size, window, strides, padding.upper())
    except (RuntimeError, ValueError, KeyError) as e:
      raise ValueError(
          f"{fn}: padding must be 'SAME', 'VALID', an int, (int, int) or "
          f"((lo, hi), (lo, hi)), got {padding!r}.") from e
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
  if isinstance(padding, (int, np.integer)):
    return ((int(padding),) * 2,) * 2  # type: ignore[return-value]
  try:
    items = list(padding)
  except TypeError:
    items = []
  if len(items) == 2 and all(isinstance(p, (int, np.integer)) for p in items):
    return tuple((int(p), int(p)) for p in items)  # type: ignore[return-value]
  if (len(items) == 2
      and all(isinstance(p, Sequence) and len(p) == 2 for p in items)
      and all(isinstance(v, (int, np.integer)) for p in items for v in p)):
    return tuple((int(lo), int(hi)) for lo, hi in items)  # type: ignore[return-value]
  raise ValueError(
      f"{fn}: padding must be 'SAME', 'VALID', an int, (int, int) or ((lo, hi), (lo, hi)), "
      f"got {padding!r}.")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """Static geometry of one deformable convolution (hashable: used as a static argument).

  Sample point of output ``(y, x)`` and kernel point ``(i, j)``::

    h = y * strides[0] - padding[0][0] + i * dilation[0] + dy
    w = x * strides[1] - padding[1][0] + j * dilation[1] + dx
  """
  in_size: tuple[int, int]
  out_size: tuple[int, int]
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  dilation: tuple[int, int]
  offset_groups: int

  @property
  def num_kernel_points(self) -> int:
    return self.kernel_size[0] * self.kernel_size[1]

  @classmethod
  def create(cls, in_size: tuple[int, int], kernel_size: tuple[int, int], strides: Any,
             padding: PaddingLike, dilation: Any, offset_groups: int, *, fn: str) -> "ConvGeometry":
    strides = pair(strides, "strides", fn=fn)
    dilation = pair(dilation, "kernel_dilation", fn=fn)
    window = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
    pads = padding_pairs(padding, in_size, window, strides, fn=fn)
    out_size = tuple(
        (n + lo + hi - w) // s + 1 if n + lo + hi >= w else 0
        for n, (lo, hi), w, s in zip(in_size, pads, window, strides))
    if min(out_size) < 1:
      raise ValueError(
          f"{fn}: the padded input {tuple(n + lo + hi for n, (lo, hi) in zip(in_size, pads))} is "
          f"smaller than the dilated kernel {window}; the output would be empty "
          f"(input spatial size {in_size}, padding {pads}).")
    return cls(tuple(in_size), out_size, tuple(kernel_size), strides, pads, dilation,
               int(offset_groups))  # type: ignore[arg-type]


def shape_error(fn: str, name: str, got: tuple[int, ...], expected: str, why: str = "") -> ValueError:
  why = f" ({why})" if why else ""
  return ValueError(f"{fn}: {name} has shape {tuple(got)}, expected {expected}{why}.")


def result_dtype(fn: str, **arrays: Any) -> jnp.dtype:
  """The promoted floating dtype of the named arrays (``None`` entries are skipped).

  Raises:
    TypeError: when any of them is not floating point.
  """
  present = {k: v for k, v in arrays.items() if v is not None}
  for name, value in present.items():
    dtype = jnp.result_type(value)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{fn}: {name} must be a floating-point array, got dtype {dtype}.")
  return jnp.result_type(*present.values())


def compute_dtype(dtype: Any) -> jnp.dtype:
  """Dtype of sampling coordinates and accumulation: float32 for 16/32-bit, float64 for float64."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class RoIPoolGeometry:
  """Static parameters of one deformable RoI pooling (hashable: used as a static argument).

  Semantics of mmcv's ``DeformRoIPool`` (see :func:`flaxdcn.deform_roi_pool`).
  """
  in_size: tuple[int, int]
  output_size: tuple[int, int]
  spatial_scale: float
  sampling_ratio: int
  gamma: float


@dataclasses.dataclass(frozen=True)
class Dcnv3Geometry:
  """Static parameters of one DCNv3/DCNv4 sampling (hashable: used as a static argument).

  ``conv`` holds the window (its ``offset_groups`` are the DCNv3 groups). Sample of output
  ``(y, x)``, kernel column ``i``, kernel row ``j``::

    w = x * strides[1] - padding[1][0] + c_w + (i * dilation[1] - c_w + dx) * offset_scale
    h = y * strides[0] - padding[0][0] + c_h + (j * dilation[0] - c_h + dy) * offset_scale

  with ``c = (dilation * (k - 1)) // 2``; points run column-major, ``p = i * kh + j``, skipping
  ``(kw // 2, kh // 2)`` when ``remove_center``.
  """
  conv: ConvGeometry
  offset_scale: float
  remove_center: bool

  @property
  def groups(self) -> int:
    return self.conv.offset_groups

  @property
  def num_points(self) -> int:
    return self.conv.num_kernel_points - int(self.remove_center)

  @property
  def center(self) -> tuple[int, int]:
    """``(c_h, c_w)``."""
    return tuple((d * (k - 1)) // 2 for k, d in zip(self.conv.kernel_size, self.conv.dilation))

  @property
  def offset_mask_channels(self) -> int:
    """``D``: the ``G * P * 3`` channels of DCNv4's ``offset_mask``, rounded up to a multiple
    of 8."""
    return -(-self.groups * self.num_points * 3 // 8) * 8


@dataclasses.dataclass(frozen=True)
class MsDeformAttnGeometry:
  """Static parameters of one multi-scale deformable attention (hashable: a static argument).

  ``spatial_shapes`` are the ``L`` levels' ``(H_l, W_l)``. Level ``l`` occupies rows
  ``[level_start_index[l], level_start_index[l] + H_l * W_l)`` of the value, row-major ``(h, w)``;
  a location ``(x, y)`` on it is read at pixel ``(h, w) = (y * H_l - 0.5, x * W_l - 0.5)``
  (``grid_sample``'s ``align_corners=False``).
  """
  spatial_shapes: tuple[tuple[int, int], ...]

  @property
  def num_levels(self) -> int:
    return len(self.spatial_shapes)

  @property
  def level_sizes(self) -> tuple[int, ...]:
    """``H_l * W_l`` of each level."""
    return tuple(h * w for h, w in self.spatial_shapes)

  @property
  def level_start_index(self) -> tuple[int, ...]:
    """The first value row of each level (Deformable DETR's ``level_start_index``)."""
    return tuple(int(s) for s in np.cumsum((0,) + self.level_sizes[:-1]))

  @property
  def num_values(self) -> int:
    """``S = sum_l H_l * W_l``."""
    return sum(self.level_sizes)

  @classmethod
  def create(cls, spatial_shapes: Any, *, fn: str) -> "MsDeformAttnGeometry":
    """Checks ``spatial_shapes`` (static ``(H_l, W_l)`` ints: a sequence of pairs or an integer
    numpy array ``[L, 2]``).

    Raises:
      TypeError: a traced array, or sizes that are not integers.
      ValueError: not ``L >= 1`` pairs, or a size below 1.
    """
    if isinstance(spatial_shapes, jax.core.Tracer):
      raise TypeError(
          f"{fn}: spatial_shapes must be static Python ints (a tuple or list of (H, W) pairs, or "
          f"a numpy int array), got a traced array: the level sizes fix the "
          "shapes of the computation, so they cannot be jit arguments. Pass them as a tuple, or "
          "mark them static (jax.jit(..., static_argnames=...) with a tuple).")
    try:
      array = np.asarray(spatial_shapes)
    except ValueError as e:  # ragged nesting
      raise ValueError(f"{fn}: spatial_shapes must be L pairs (H, W), got "
                       f"{spatial_shapes!r}.") from e
    if array.size and array.dtype.kind in "fcb":
      raise TypeError(f"{fn}: spatial_shapes must hold ints, got dtype {array.dtype}: "
                      f"{spatial_shapes!r}.")
    if array.size and array.dtype.kind not in "iu":
      raise ValueError(f"{fn}: spatial_shapes must be L pairs (H, W), got {spatial_shapes!r}.")
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < 1:
      raise ValueError(f"{fn}: spatial_shapes must be L >= 1 pairs (H, W) (shape [L, 2]), got "
                       f"shape {array.shape}: {spatial_shapes!r}.")
    if array.min() < 1:
      raise ValueError(f"{fn}: spatial_shapes must be >= 1, got {array.tolist()}.")
    return cls(tuple((int(h), int(w)) for h, w in array))
