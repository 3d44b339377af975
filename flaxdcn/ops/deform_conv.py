"""Deformable convolution (DCNv1) and modulated deformable convolution (DCNv2)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax.typing import PaddingLike, PrecisionLike
from jax import lax

from flaxdcn import _ffi
from flaxdcn._geometry import (ConvGeometry, check_implementation, compute_dtype,
                               pair, result_dtype, shape_error)
from flaxdcn.ops import _xla_conv

_FN = "deform_conv2d"

#: Bytes of column-sized buffers one chunk of :func:`deform_conv2d` may hold at once: the
#: forward's columns ``[N, rows, Wo, K, C]`` of one band of output rows; in the backward those
#: columns and their cotangent together. Read when a call is traced.
COLUMNS_BUDGET_BYTES = 64 * 2**20


def deform_conv2d(
    inputs: jax.Array,
    offsets: jax.Array,
    kernel: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    strides: int | tuple[int, int] = 1,
    padding: PaddingLike = "VALID",
    kernel_dilation: int | tuple[int, int] = 1,
    feature_group_count: int = 1,
    offset_group_count: int = 1,
    precision: PrecisionLike = None,
    implementation: str | None = None,
    deterministic_backward: bool = False,
) -> jax.Array:
  r"""Deformable 2-D convolution, channels last (DCNv1; DCNv2 when ``mask`` is given).

  .. math::
     y(p) = \sum_k w_k \, x(p + p_k + \Delta p_k) \, \Delta m_k + b

  Shapes use these letters: ``N`` batch, ``H, W`` input size, ``Ho, Wo`` output size, ``C`` input
  channels, ``O`` output channels, ``kh, kw`` kernel size, ``F`` feature groups, ``G`` offset groups,
  ``K = kh * kw``.

  The sample for output ``(y, x)`` and kernel point ``(i, j)`` is read at::

    h = y * strides[0] - pad_lo[0] + i * kernel_dilation[0] + dy
    w = x * strides[1] - pad_lo[1] + j * kernel_dilation[1] + dx

  by bilinear interpolation of the zero-padded image: 0 when ``h <= -1``, ``h >= H``, ``w <= -1``
  or ``w >= W``; otherwise each of the four neighbouring pixels contributes only if it lies inside
  the image. Input channel ``c`` belongs to offset group ``c // (C // G)``. This is the convention
  of ``torchvision.ops.deform_conv2d`` and mmcv, with the channel axis moved last.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> x = jnp.ones((2, 9, 9, 4))
    >>> kernel = jnp.ones((3, 3, 4, 8))
    >>> offsets = jnp.zeros((2, 9, 9, 3 * 3 * 2))     # zero offsets: a plain convolution
    >>> y = flaxdcn.deform_conv2d(x, offsets, kernel, padding="SAME")
    >>> y.shape
    (2, 9, 9, 8)

  Args:
    inputs: ``[N, H, W, C]``.
    offsets: ``[N, Ho, Wo, G * K * 2]``, channel order ``(g, i, j, (dy, dx))`` (torchvision's
      ``[N, 2 * G * K, Ho, Wo]`` with the channel axis moved last).
    kernel: ``[kh, kw, C // F, O]`` (Flax HWIO).
    mask: ``[N, Ho, Wo, G * K]``, channel order ``(g, i, j)``, or None for DCNv1.
    bias: ``[O]`` or None.
    strides: int or ``(sh, sw)``.
    padding: ``"SAME"``, ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``, with
      ``lax.conv_general_dilated``'s meaning.
    kernel_dilation: int or ``(dh, dw)``.
    feature_group_count: ``F``; ``C`` and ``O`` must be divisible by it.
    offset_group_count: ``G``; ``C`` must be divisible by it.
    precision: precision of the matrix product with ``kernel`` (as in ``lax.dot_general``).
    implementation: ``None`` (the native kernel where it was built for the platform, else
      ``"xla"``), ``"xla"`` (pure jnp) or ``"ffi"`` (native; an error where it is not built).
    deterministic_backward: make the native CUDA backward bitwise reproducible (no float
      atomics; slower). The native CPU kernels are always deterministic; the ``"xla"``
      implementation follows XLA's own ``--xla_gpu_deterministic_ops``.

  Memory: the columns ``[N, Ho, Wo, K, C]`` of the whole batch never exist. The forward samples
  and multiplies one band of output rows at a time (all images of the batch together), each
  band's columns within ``COLUMNS_BUDGET_BYTES`` (64 MiB) of this module; the backward keeps
  only the arguments, recomputes each band's columns and takes that band's kernel gradient and
  column cotangent at once (their sum within the same budget). A call whose columns fit the
  budget is one band. Bands are of equal height; where the height does not divide ``Ho``, the
  last band ends at the last row and recomputes a few rows of the band before it, which count
  once. The bands run in a loop, so the compiled program holds one band's sampling (the jnp
  path) or one native call per band, whatever the image size. A band holds at least one output
  row of every image, so one row of the batch larger than the budget exceeds it; under
  ``jax.vmap`` the budget holds per member, and under explicit sharding per device's shard of
  the batch.

  Returns:
    ``[N, Ho, Wo, O]`` in the promoted dtype of the array arguments. Sampling coordinates and
    accumulation are float32 (float64 for float64 inputs).

  Raises:
    ValueError: wrong rank or shape of an argument, channel counts not divisible by the groups,
      a bad padding spec or an empty output.
    TypeError: a non-floating argument.

  References:
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
    - Zhu et al., `Deformable ConvNets v2: More Deformable, Better Results
      <https://arxiv.org/abs/1811.11168>`_, CVPR 2019.
  """
  check_implementation(implementation, fn=_FN)
  dtype = result_dtype(_FN, inputs=inputs, offsets=offsets, kernel=kernel, mask=mask, bias=bias)
  geometry, out_features = _check_shapes(
      inputs, offsets, kernel, mask, bias, strides, padding, kernel_dilation,
      feature_group_count, offset_group_count)
  n = inputs.shape[0]
  ho, wo = geometry.out_size
  if n == 0:
    return jnp.zeros((0, ho, wo, out_features), dtype)

  inputs, offsets, kernel = (jnp.asarray(a, dtype) for a in (inputs, offsets, kernel))
  mask = None if mask is None else jnp.asarray(mask, dtype)
  row_bytes = (_shard_batch(inputs) * wo * geometry.num_kernel_points * inputs.shape[-1]
               * jnp.dtype(dtype).itemsize)
  if isinstance(precision, list):  # the plan is hashable
    precision = tuple(precision)
  plan = _Plan(geometry, feature_group_count, precision, implementation,
               bool(deterministic_backward),
               forward=_row_bands(ho, row_bytes, COLUMNS_BUDGET_BYTES),
               backward=_row_bands(ho, 2 * row_bytes, COLUMNS_BUDGET_BYTES))
  out = _chunked_conv(plan, inputs, offsets, mask, kernel)
  if bias is not None:
    out = out + jnp.asarray(bias, dtype)
  return out


def _shard_batch(inputs: jax.Array) -> int:
  """The batch of one device's shard: the batch divided by the mesh axes that explicit sharding
  puts on it. Under auto sharding the partitioner splits it after tracing, unseen here, and under
  ``shard_map`` or ``pmap`` the shape is already one device's."""
  sharding = jax.typeof(inputs).sharding
  axes = sharding.spec[0] if len(sharding.spec) else None
  if axes is None:
    return inputs.shape[0]
  axes = axes if isinstance(axes, tuple) else (axes,)
  return -(-inputs.shape[0] // math.prod(sharding.mesh.shape[a] for a in axes))


@dataclasses.dataclass(frozen=True)
class _Bands:
  """The output rows ``[0, rows)`` in ``count`` bands of ``height`` rows each. Band ``i`` starts
  at row ``min(i * height, rows - height)``: where ``height`` does not divide ``rows``, the last
  band ends at the last row and repeats rows of the band before it."""
  rows: int
  height: int

  @property
  def count(self) -> int:
    return -(-self.rows // self.height)

  @property
  def overlap(self) -> bool:
    return self.rows % self.height != 0

  def start(self, i: int | jax.Array) -> int | jax.Array:
    """The first row of band ``i`` (an int, or traced in a loop over the bands)."""
    if isinstance(i, int):
      return min(i * self.height, self.rows - self.height)
    return jnp.minimum(i * self.height, self.rows - self.height)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static parameters of one chunked :func:`deform_conv2d` (hashable: a nondiff argument)."""
  geometry: ConvGeometry
  feature_groups: int
  precision: PrecisionLike
  implementation: str | None
  deterministic_backward: bool
  forward: _Bands
  backward: _Bands


def _row_bands(rows: int, row_bytes: int, budget: int) -> _Bands:
  """Bands whose ``row_bytes`` per row fit ``budget`` (at least one row each), as tall as that
  allows unless a band up to half as tall repeats fewer rows: the tallest height whose repeated
  rows are at most a sixteenth of ``rows``, else the one that repeats fewest."""
  most = max(1, min(rows, budget // max(1, row_bytes)))
  heights = range(most, (most - 1) // 2, -1)
  repeated = lambda h: -(-rows // h) * h - rows
  height = next((h for h in heights if repeated(h) <= rows // 16),
                min(heights, key=lambda h: (repeated(h), -h)))
  return _Bands(rows, height)


def _band_geometry(geometry: ConvGeometry, start: int, stop: int) -> ConvGeometry:
  """Output rows ``[start, stop)`` of ``geometry`` as a convolution of their own: the same input,
  the row origin moved by ``start`` strides (the padding before row 0 may become negative)."""
  (lo, hi), cols = geometry.padding
  return dataclasses.replace(geometry, out_size=(stop - start, geometry.out_size[1]),
                             padding=((lo - start * geometry.strides[0], hi), cols))


def _band_columns(plan: _Plan, bands: _Bands, i, inputs, offsets, mask) -> jax.Array:
  """Columns of band ``i`` (an int, or traced in a loop over the bands), from that band's rows of
  ``offsets`` and ``mask``. The jnp sampling takes the band's first row as a traced value, so a
  loop compiles one band; a native call's geometry is static, so the loop switches over one call
  per band. ``implementation=None`` decides by platform when the program is lowered."""
  h = bands.height

  def xla(inputs, offsets, mask):
    return _xla_conv.deform_im2col(inputs, offsets, mask, _band_geometry(plan.geometry, 0, h),
                                   row_start=bands.start(i))

  def native(inputs, offsets, mask):
    calls = [functools.partial(deform_im2col, geometry=_band_geometry(plan.geometry, s, s + h),
                               implementation=plan.implementation,
                               deterministic_backward=plan.deterministic_backward)
             for s in map(bands.start, range(bands.count))]
    if isinstance(i, int):
      return calls[i](inputs, offsets, mask)
    return lax.switch(i, calls, inputs, offsets, mask)

  if plan.implementation == "xla":
    return xla(inputs, offsets, mask)
  if plan.implementation == "ffi" or isinstance(i, int):
    return native(inputs, offsets, mask)
  return lax.platform_dependent(inputs, offsets, mask, default=xla,
                                **{p: native for p in _ffi.platforms()})


def _band_rows(a: jax.Array | None, bands: _Bands, i) -> jax.Array | None:
  """Band ``i``'s rows of ``a`` (``[N, Ho, ...]``): a slice of a non-batch axis, which keeps a
  batch-sharded array on its devices."""
  if a is None or bands.count == 1:
    return a
  return lax.dynamic_slice_in_dim(a, bands.start(i), bands.height, axis=1)


def _band_conv(plan: _Plan, bands: _Bands, i, inputs, offsets, mask, kernel) -> jax.Array:
  """Output rows of band ``i``, from that band's rows of ``offsets`` and ``mask``."""
  columns = _band_columns(plan, bands, i, inputs, offsets, mask)
  return columns_matmul(columns, kernel, plan.feature_groups, plan.precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_conv(plan: _Plan, inputs, offsets, mask, kernel) -> jax.Array:
  """The convolution without bias, one band of output rows at a time."""
  bands = plan.forward
  if bands.count == 1:
    return _band_conv(plan, bands, 0, inputs, offsets, mask, kernel)

  # One band per loop step: XLA runs them one after another, so no two bands' columns are ever
  # alive together (ops of unrolled bands could be scheduled side by side).
  def step(i, out):
    y = _band_conv(plan, bands, i, inputs, _band_rows(offsets, bands, i),
                   _band_rows(mask, bands, i), kernel)
    return lax.dynamic_update_slice_in_dim(out, y, bands.start(i), 1)

  # Zeros shaped [N, Ho, Wo, O] that keep the offsets' batch sharding.
  out = jnp.broadcast_to(jnp.zeros_like(offsets[..., :1], inputs.dtype),
                         (*offsets.shape[:3], kernel.shape[-1]))
  return lax.fori_loop(0, bands.count, step, out)


def _chunked_conv_fwd(plan, inputs, offsets, mask, kernel):
  # The residuals are the arguments: the columns are recomputed band by band in the backward.
  return _chunked_conv(plan, inputs, offsets, mask, kernel), (inputs, offsets, mask, kernel)


def _chunked_conv_bwd(plan, residuals, grad):
  """Per band: recompute its columns, and from them and the band's cotangent its kernel gradient
  and column cotangent, which the sampling's own VJP scatters to the arguments at once."""
  inputs, offsets, mask, kernel = residuals
  bands = plan.backward
  if bands.count == 1:
    _, vjp = jax.vjp(functools.partial(_band_conv, plan, bands, 0), inputs, offsets, mask, kernel)
    return vjp(grad)
  acc = compute_dtype(inputs.dtype)

  def step(i, carry):
    grad_inputs, grad_kernel, grad_offsets, grad_mask = carry
    start = bands.start(i)
    g = _band_rows(grad, bands, i)
    if bands.overlap:  # rows that the band before this one already took count once
      fresh = start + jnp.arange(bands.height) >= i * bands.height
      g = jnp.where(fresh[:, None, None], g, jnp.zeros((), g.dtype))
    _, vjp = jax.vjp(functools.partial(_band_conv, plan, bands, i), inputs,
                     _band_rows(offsets, bands, i), _band_rows(mask, bands, i), kernel)
    g_inputs, g_offsets, g_mask, g_kernel = vjp(g)

    # A repeated row's gradients from this band are zeros: adding keeps the earlier band's.
    def add_rows(a, g):
      if a is None:
        return None
      rows = lax.dynamic_slice_in_dim(a, start, bands.height, axis=1)
      return lax.dynamic_update_slice_in_dim(a, rows + g, start, 1)

    return (grad_inputs + g_inputs.astype(acc), grad_kernel + g_kernel.astype(acc),
            add_rows(grad_offsets, g_offsets), add_rows(grad_mask, g_mask))

  carry = (jnp.zeros_like(inputs, acc), jnp.zeros_like(kernel, acc), jnp.zeros_like(offsets),
           None if mask is None else jnp.zeros_like(mask))
  grad_inputs, grad_kernel, grad_offsets, grad_mask = lax.fori_loop(0, bands.count, step, carry)
  return (grad_inputs.astype(inputs.dtype), grad_offsets, grad_mask,
          grad_kernel.astype(kernel.dtype))


_chunked_conv.defvjp(_chunked_conv_fwd, _chunked_conv_bwd)


def deform_im2col(inputs: jax.Array, offsets: jax.Array, mask: jax.Array | None,
                  geometry: ConvGeometry, *, implementation: str | None,
                  deterministic_backward: bool = False) -> jax.Array:
  """Columns ``[N, Ho, Wo, K, C]`` from the chosen backend (arguments already checked)."""
  if implementation == "xla":
    return _xla_conv.deform_im2col(inputs, offsets, mask, geometry)
  fallback = _xla_conv.deform_im2col if implementation is None else None
  return _ffi.deform_im2col(inputs, offsets, mask, geometry,
                            deterministic_backward=deterministic_backward, fallback=fallback)


def columns_matmul(columns: jax.Array, kernel: jax.Array, groups: int, precision: PrecisionLike
                    ) -> jax.Array:
  """``[N, Ho, Wo, K, C] x [kh, kw, C // F, O] -> [N, Ho, Wo, O]``, one GEMM per feature group."""
  # Each reshape splits or merges one group of non-batch axes, which explicit sharding accepts.
  n, ho, wo, k, c = columns.shape
  out_features = kernel.shape[-1]
  acc = compute_dtype(columns.dtype)
  cols = columns.reshape(n, ho * wo, k, c).reshape(n, ho * wo, k * c)
  if groups == 1:
    # A plain product over the last axis keeps the columns row-major, as the sampling writes them.
    out = jnp.einsum("npx,xo->npo", cols, kernel.reshape(k * c, out_features),
                     precision=precision, preferred_element_type=acc)
  else:
    cols = cols.reshape(n, ho * wo, k, groups, c // groups)
    w = kernel.reshape(k, c // groups, groups, out_features // groups)
    out = jnp.einsum("npkgc,kcgo->npgo", cols, w, precision=precision,
                     preferred_element_type=acc).reshape(n, ho * wo, out_features)
  return out.reshape(n, ho, wo, out_features).astype(columns.dtype)


def _check_shapes(inputs, offsets, kernel, mask, bias, strides, padding, kernel_dilation,
                  feature_group_count, offset_group_count) -> tuple[ConvGeometry, int]:
  if jnp.ndim(inputs) != 4:
    raise shape_error(_FN, "inputs", jnp.shape(inputs), "[N, H, W, C] (rank 4)")
  n, height, width, channels = jnp.shape(inputs)
  if jnp.ndim(kernel) != 4:
    raise shape_error(_FN, "kernel", jnp.shape(kernel), "[kh, kw, C // feature_group_count, O] "
                      "(rank 4)")
  kh, kw, kernel_in, out_features = jnp.shape(kernel)
  fg = pair(feature_group_count, "feature_group_count", fn=_FN)[0]
  og = pair(offset_group_count, "offset_group_count", fn=_FN)[0]
  if channels % fg:
    raise ValueError(f"{_FN}: inputs has {channels} channels (shape {tuple(jnp.shape(inputs))}), "
                     f"not divisible by feature_group_count={fg}.")
  if kernel_in * fg != channels:
    raise shape_error(_FN, "kernel", jnp.shape(kernel),
                      f"[{kh}, {kw}, {channels // fg}, O]",
                      f"inputs has {channels} channels and feature_group_count={fg}")
  if out_features % fg:
    raise shape_error(_FN, "kernel", jnp.shape(kernel), "O divisible by feature_group_count",
                      f"O={out_features}, feature_group_count={fg}")
  if channels % og:
    raise ValueError(f"{_FN}: inputs has {channels} channels (shape {tuple(jnp.shape(inputs))}), "
                     f"not divisible by offset_group_count={og}.")
  if min(kh, kw) < 1:
    raise shape_error(_FN, "kernel", jnp.shape(kernel), "a kernel of at least 1 x 1")
  geometry = ConvGeometry.create((height, width), (kh, kw), strides, padding, kernel_dilation, og,
                                 fn=_FN)
  ho, wo = geometry.out_size
  k = kh * kw
  expected = (n, ho, wo, og * k * 2)
  if tuple(jnp.shape(offsets)) != expected:
    raise shape_error(_FN, "offsets", jnp.shape(offsets), str(expected),
                      f"[N, Ho, Wo, offset_group_count * kh * kw * 2] with offset_group_count={og}")
  if mask is not None and tuple(jnp.shape(mask)) != expected[:3] + (og * k,):
    raise shape_error(_FN, "mask", jnp.shape(mask), str(expected[:3] + (og * k,)),
                      f"[N, Ho, Wo, offset_group_count * kh * kw] with offset_group_count={og}")
  if bias is not None and tuple(jnp.shape(bias)) != (out_features,):
    raise shape_error(_FN, "bias", jnp.shape(bias), f"({out_features},)")
  return geometry, out_features
