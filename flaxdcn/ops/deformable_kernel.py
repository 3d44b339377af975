"""Deformable Kernels (Gao et al., 2019): a convolution whose kernel is resampled from a scope.

Two algorithms, both pure jnp, both built on the bilinear plan of :mod:`flaxdcn.ops._xla_conv`
(same boundary rule as DCN sampling, read here in kernel space):

* one kernel per image (global offsets ``[N, K * 2]``): resample the scope once per image (a
  product with the dense bilinear weights ``beta``), then one batched GEMM of the plain im2col
  columns with the per-image kernels (a plain ``kh x kw`` convolution's cost);
* one kernel per output position (local offsets ``[N, Ho, Wo, K * 2]``): kernel sampling is linear
  in the scope ``W``, so ``O_j = sum_s (sum_k beta[j, s, k] I_{j+k}) W_s``. The im2col columns are
  scattered into scope slots with the dense bilinear weights ``beta`` and contracted with the
  scope in one GEMM (a plain ``Sh x Sw`` convolution's cost, plus the ``K x S`` scatter). Where
  it needs fewer multiply-adds (depthwise layers), the kernels are resampled per position instead
  (one GEMM of ``beta`` with the scope) and applied to the columns directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.typing import PaddingLike, PrecisionLike
from jax import lax

from flaxdcn._geometry import (ConvGeometry, check_implementation, compute_dtype,
                               pair, result_dtype, shape_error)
from flaxdcn.ops import _xla_conv
from flaxdcn.ops.deform_conv import columns_matmul

_FN = "deformable_kernel_conv2d"

# The bilinear weights are interpolation, not the user's matrix product: never let a backend
# round them (or the columns they scatter) to a lower precision.
_EXACT = lax.Precision.HIGHEST


def deformable_kernel_conv2d(
    inputs: jax.Array,
    offsets: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    kernel_size: int | tuple[int, int],
    strides: int | tuple[int, int] = 1,
    padding: PaddingLike = "VALID",
    kernel_dilation: int | tuple[int, int] = 1,
    feature_group_count: int = 1,
    precision: PrecisionLike = None,
    implementation: str | None = None,
) -> jax.Array:
  r"""Deformable Kernels convolution, channels last (global or local DK).

  .. math::
     O_j = \sum_k I_{j + k} \, W(k_{\mathrm{base}} + \Delta k) + b

  ``W`` is the kernel *scope*, an ``Sh x Sw`` kernel at least as large as ``kernel_size``. The data
  are sampled on the ordinary convolution grid; the *kernel* value for kernel point ``(i, j)`` is
  read from the scope at::

    u = i + (Sh - kh) / 2 + dy
    v = j + (Sw - kw) / 2 + dx

  by bilinear interpolation with DCN's boundary rule, in scope coordinates: 0 when ``u <= -1``,
  ``u >= Sh``, ``v <= -1`` or ``v >= Sw``; otherwise each of the four neighbouring scope taps
  contributes only if it lies inside the scope. The base grid is centred in the scope, so zero
  offsets give the convolution with the centred ``kh x kw`` crop of the scope. When ``Sh - kh`` (or
  ``Sw - kw``) is odd the centre is a half-integer, as in the original release: with zero offsets
  each kernel tap is then the mean of the two (or four) nearest scope taps. ``kernel_dilation``
  spaces the data samples only; kernel space is never dilated.

  Shapes use these letters: ``N`` batch, ``H, W`` input size, ``Ho, Wo`` output size, ``C`` input
  channels, ``O`` output channels, ``kh, kw`` kernel size, ``Sh, Sw`` scope size, ``F`` feature
  groups, ``K = kh * kw``.

  The rank of ``offsets`` chooses the variant:

  * ``[N, K * 2]`` (*global* DK): one resampled kernel per image, applied at every position;
  * ``[N, Ho, Wo, K * 2]`` (*local* DK): one resampled kernel per output position.

  One ``(dy, dx)`` per kernel point is shared by all channels and feature groups (the paper's
  ``2 K`` offsets), channel order ``(i, j, (dy, dx))`` as in :func:`flaxdcn.deform_conv2d`.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> x = jnp.ones((2, 9, 9, 4))
    >>> scope = jnp.ones((5, 5, 4, 8))
    >>> local_offsets = jnp.zeros((2, 9, 9, 3 * 3 * 2))
    >>> y = flaxdcn.deformable_kernel_conv2d(x, local_offsets, scope, kernel_size=3,
    ...                                      padding="SAME")
    >>> y.shape
    (2, 9, 9, 8)
    >>> global_offsets = jnp.zeros((2, 3 * 3 * 2))
    >>> flaxdcn.deformable_kernel_conv2d(x, global_offsets, scope, kernel_size=3).shape
    (2, 7, 7, 8)

  Args:
    inputs: ``[N, H, W, C]``.
    offsets: ``[N, K * 2]`` (global) or ``[N, Ho, Wo, K * 2]`` (local), channel order
      ``(i, j, (dy, dx))``, in scope taps.
    kernel: the scope ``[Sh, Sw, C // F, O]`` (Flax HWIO), ``Sh >= kh`` and ``Sw >= kw``.
    bias: ``[O]`` or None.
    kernel_size: int or ``(kh, kw)``: the size of the resampled kernel.
    strides: int or ``(sh, sw)``.
    padding: ``"SAME"``, ``"VALID"``, an int, ``(ph, pw)`` or ``((lo, hi), (lo, hi))``, with
      ``lax.conv_general_dilated``'s meaning for a ``kh x kw`` kernel.
    kernel_dilation: int or ``(dh, dw)``: spacing of the data samples.
    feature_group_count: ``F``; ``C`` and ``O`` must be divisible by it.
    precision: precision of the matrix product with ``kernel`` (as in ``lax.dot_general``); the
      bilinear interpolation itself always runs at full precision.
    implementation: ``None`` or ``"xla"`` (pure jnp). There is no native Deformable Kernels
      kernel, so ``"ffi"`` raises ``NotImplementedError`` on every platform rather than silently
      running something else.

  Returns:
    ``[N, Ho, Wo, O]`` in the promoted dtype of the array arguments. Sampling coordinates and
    accumulation are float32 (float64 for float64 inputs).

  Raises:
    ValueError: wrong rank or shape of an argument, a scope smaller than ``kernel_size``, channel
      counts not divisible by the groups, a bad padding spec or an empty output.
    TypeError: a non-floating argument.
    NotImplementedError: ``implementation="ffi"``.

  References:
    - Gao et al., `Deformable Kernels: Adapting Effective Receptive Fields for Object
      Deformation <https://arxiv.org/abs/1910.02940>`_, ICLR 2020.
  """
  check_implementation(implementation, fn=_FN)
  if implementation == "ffi":
    raise NotImplementedError(
        f"{_FN}: implementation='ffi' asks for a native kernel, and Deformable Kernels have none "
        "on any platform; use implementation=None or 'xla' (pure jnp).")
  dtype = result_dtype(_FN, inputs=inputs, offsets=offsets, kernel=kernel, bias=bias)
  geometry, out_features = _check_shapes(inputs, offsets, kernel, bias, kernel_size, strides,
                                         padding, kernel_dilation, feature_group_count)
  n = inputs.shape[0]
  ho, wo = geometry.out_size
  if n == 0:
    return jnp.zeros((0, ho, wo, out_features), dtype)

  inputs, offsets, kernel = (jnp.asarray(a, dtype) for a in (inputs, offsets, kernel))
  columns = im2col(inputs, geometry)
  if offsets.ndim == 2:
    out = _global_conv(columns, offsets, kernel, geometry.kernel_size, feature_group_count,
                       precision)
  else:
    out = _local_conv(columns, offsets, kernel, geometry.kernel_size, feature_group_count,
                      precision)
  if bias is not None:
    out = out + jnp.asarray(bias, dtype)
  return out


def im2col(inputs: jax.Array, geometry: ConvGeometry) -> jax.Array:
  """Plain convolution columns ``[N, Ho, Wo, K, C]`` by strided slices of the padded input."""
  n, _, _, channels = inputs.shape
  (ho, wo), (kh, kw) = geometry.out_size, geometry.kernel_size
  (sh, sw), (dh, dw) = geometry.strides, geometry.dilation
  (ph_lo, ph_hi), (pw_lo, pw_hi) = geometry.padding
  # lax.pad takes negative padding (a crop), as lax.conv_general_dilated does.
  padded = lax.pad(inputs, jnp.zeros((), inputs.dtype),
                   ((0, 0, 0), (ph_lo, ph_hi, 0), (pw_lo, pw_hi, 0), (0, 0, 0)))
  columns = [
      lax.slice(padded, (0, i * dh, j * dw, 0),
                (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, channels),
                (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)]
  return jnp.stack(columns, axis=3)


def scope_plan(offsets: jax.Array, kernel_size: tuple[int, int], scope_size: tuple[int, int]
               ) -> tuple[jax.Array, jax.Array]:
  """Bilinear plan of the kernel points in the scope.

  Args:
    offsets: ``[..., K * 2]``, channel order ``(i, j, (dy, dx))``, in the compute dtype.
    kernel_size: ``(kh, kw)``.
    scope_size: ``(Sh, Sw)``.

  Returns:
    ``index`` int32 ``[..., K, 4]`` into the 1-padded, flattened scope (``(Sh + 2) * (Sw + 2)``
    rows) and ``weight`` ``[..., K, 4]``, as :func:`~flaxdcn.ops._xla_conv.bilinear_plan`.
  """
  (kh, kw), (s_h, s_w) = kernel_size, scope_size
  off = offsets.reshape(offsets.shape[:-1] + (kh, kw, 2))
  base_h = (jnp.arange(kh, dtype=off.dtype) + (s_h - kh) / 2)[:, None]
  base_w = (jnp.arange(kw, dtype=off.dtype) + (s_w - kw) / 2)[None, :]
  index, weight = _xla_conv.bilinear_plan(base_h + off[..., 0], base_w + off[..., 1], None,
                                          (s_h, s_w))
  lead = offsets.shape[:-1] + (kh * kw, 4)
  return index.reshape(lead), weight.reshape(lead)


def _global_conv(columns: jax.Array, offsets: jax.Array, kernel: jax.Array,
                 kernel_size: tuple[int, int], groups: int, precision: PrecisionLike) -> jax.Array:
  """One kernel per image: resample it from the scope, then a batched GEMM with the columns."""
  n, ho, wo, k, channels = columns.shape
  s_h, s_w, group_in, out_features = kernel.shape
  index, weight = scope_plan(offsets.astype(compute_dtype(kernel.dtype)), kernel_size,
                             (s_h, s_w))
  # Resampling as a product with the dense weights [N, S, K]: its backward is two more GEMMs,
  # where a gather of whole [C / F, O] slices would be transposed into a slow scatter.
  beta = scope_weights(index, weight, (s_h, s_w))
  kernels = jnp.einsum("nsk,sx->nkx", beta, kernel.reshape(s_h * s_w, -1), precision=_EXACT,
                       preferred_element_type=beta.dtype).astype(kernel.dtype)
  acc = compute_dtype(columns.dtype)
  if groups == 1:
    # One GEMM per image on row-major columns: on CPU the forward takes half the einsum's time.
    out = lax.dot_general(columns.reshape(n, ho * wo, k * channels),
                          kernels.reshape(n, k * channels, out_features),
                          (((2,), (1,)), ((0,), (0,))), precision=precision,
                          preferred_element_type=acc)
  else:
    out = jnp.einsum("nhwkgc,nkcgo->nhwgo", columns.reshape(n, ho, wo, k, groups, group_in),
                     kernels.reshape(n, k, group_in, groups, out_features // groups),
                     precision=precision, preferred_element_type=acc)
  return out.reshape(n, ho, wo, out_features).astype(columns.dtype)


def _local_conv(columns: jax.Array, offsets: jax.Array, kernel: jax.Array,
                kernel_size: tuple[int, int], groups: int, precision: PrecisionLike) -> jax.Array:
  """One kernel per position, by whichever of the two algorithms needs fewer multiply-adds."""
  s_h, s_w, group_in, out_features = kernel.shape
  index, weight = scope_plan(offsets.astype(compute_dtype(columns.dtype)), kernel_size,
                             (s_h, s_w))
  beta = scope_weights(index, weight, (s_h, s_w))
  if per_position_kernels_are_cheaper(kernel_size[0] * kernel_size[1], s_h * s_w,
                                      columns.shape[-1], group_in, out_features):
    return _per_position_kernels(columns, beta, kernel, groups)
  return columns_matmul(scatter_columns(beta, columns), kernel, groups, precision)


def per_position_kernels_are_cheaper(k: int, s: int, channels: int, group_in: int,
                                     out_features: int) -> bool:
  """Whether resampling a kernel per position costs fewer multiply-adds than scattering columns.

  Per output position, scattering costs ``K S C`` (columns into slots) plus ``S (C / F) O`` (the
  GEMM with the scope); resampling costs ``K S (C / F) O`` (one GEMM of the weights with the
  scope) plus ``K (C / F) O`` (applying the kernels). In practice resampling wins for depthwise
  convolutions with one output per channel, the original Deformable Kernels layer.
  """
  return (s + 1) * k * group_in * out_features <= k * s * channels + s * group_in * out_features


def _per_position_kernels(columns: jax.Array, beta: jax.Array, kernel: jax.Array, groups: int
                          ) -> jax.Array:
  """Resamples ``[K, C / F, O]`` kernels per output position (one GEMM of ``beta`` with the
  scope) and applies them to the columns."""
  n, ho, wo, k, channels = columns.shape
  s_h, s_w, group_in, out_features = kernel.shape
  group_out = out_features // groups
  # [S, F * (C / F) * (O / F)]: feature groups outermost, as in the columns' channel axis.
  scope = kernel.reshape(s_h * s_w, group_in, groups, group_out).transpose(0, 2, 1, 3)
  kernels = jnp.einsum("...sk,sx->...kx", beta, scope.reshape(s_h * s_w, -1), precision=_EXACT,
                       preferred_element_type=beta.dtype).astype(columns.dtype)
  kernels = kernels.reshape(n, ho, wo, k, groups, group_in, group_out)
  cols = columns.reshape(n, ho, wo, k, groups, group_in, 1)
  out = jnp.sum(cols.astype(beta.dtype) * kernels.astype(beta.dtype), axis=(3, 5))
  return out.reshape(n, ho, wo, out_features).astype(columns.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def scope_weights(index: jax.Array, weight: jax.Array, scope_size: tuple[int, int]
                  ) -> jax.Array:
  """Dense bilinear weights of the kernel points over the scope taps.

  Args:
    index, weight: ``[..., K, 4]``, the plan of :func:`scope_plan`.
    scope_size: ``(Sh, Sw)``.

  Returns:
    ``beta [..., Sh * Sw, K]``: ``beta[..., s, k]`` is the weight of scope tap ``s`` (row-major)
    in kernel point ``k``; every column has at most four non-zeros.
  """
  s_h, s_w = scope_size
  slots = jnp.arange((s_h + 2) * (s_w + 2), dtype=index.dtype)[:, None]
  # Four one-hot terms fuse into one elementwise loop; a sum over the corner axis would not.
  beta = sum(jnp.where(index[..., None, :, q] == slots, weight[..., None, :, q], 0)
             for q in range(4))
  # Slots on the 1-wide border of the padded scope stand for the zeros outside it: drop them.
  beta = beta.reshape(beta.shape[:-2] + (s_h + 2, s_w + 2, beta.shape[-1]))[..., 1:-1, 1:-1, :]
  return beta.reshape(beta.shape[:-3] + (s_h * s_w, beta.shape[-1]))


def _scope_weights_fwd(index, weight, scope_size):
  return scope_weights(index, weight, scope_size), index


def _scope_weights_bwd(scope_size, index, cotangent):
  # d weight[..., k, q] = cotangent at the slot index[..., k, q] of column k (0 on the border):
  # a gather of 4 K values, where plain AD would reduce over every slot.
  s_h, s_w = scope_size
  lead, k = cotangent.shape[:-2], cotangent.shape[-1]
  padded = jnp.pad(cotangent.reshape(lead + (s_h, s_w, k)),
                   [(0, 0)] * len(lead) + [(1, 1), (1, 1), (0, 0)])
  padded = padded.reshape(lead + ((s_h + 2) * (s_w + 2), k))
  grad_weight = jnp.take_along_axis(padded, jnp.swapaxes(index, -1, -2), axis=-2)
  return None, jnp.swapaxes(grad_weight, -1, -2)


scope_weights.defvjp(_scope_weights_fwd, _scope_weights_bwd)


def scatter_columns(beta: jax.Array, columns: jax.Array) -> jax.Array:
  """``out[..., s, c] = sum_k beta[..., s, k] * columns[..., k, c]``.

  Args:
    beta: ``[..., S, K]`` in the compute dtype.
    columns: ``[..., K, C]``.

  Returns:
    ``[..., S, C]`` in ``columns.dtype`` (accumulated in ``beta.dtype``).
  """
  # A batched product, not K fused broadcast products: XLA would fuse the construction of beta
  # into such a loop and redo it for every channel. Slot-major beta keeps this product and its
  # transposes (the backward) row-major: about twice as fast on CPU as [..., K, S].
  out = jnp.einsum("...sk,...kc->...sc", beta, columns, precision=_EXACT,
                   preferred_element_type=beta.dtype)
  return out.astype(columns.dtype)


def _check_shapes(inputs, offsets, kernel, bias, kernel_size, strides, padding, kernel_dilation,
                  feature_group_count) -> tuple[ConvGeometry, int]:
  if jnp.ndim(inputs) != 4:
    raise shape_error(_FN, "inputs", jnp.shape(inputs), "[N, H, W, C] (rank 4)")
  n, height, width, channels = jnp.shape(inputs)
  if jnp.ndim(kernel) != 4:
    raise shape_error(_FN, "kernel", jnp.shape(kernel),
                      "[Sh, Sw, C // feature_group_count, O] (rank 4)")
  s_h, s_w, kernel_in, out_features = jnp.shape(kernel)
  kh, kw = pair(kernel_size, "kernel_size", fn=_FN)
  if s_h < kh or s_w < kw:
    raise shape_error(_FN, "kernel", jnp.shape(kernel), f"a scope of at least [{kh}, {kw}, ...]",
                      f"kernel_size={(kh, kw)} must fit in the scope")
  fg = pair(feature_group_count, "feature_group_count", fn=_FN)[0]
  if channels % fg:
    raise ValueError(f"{_FN}: inputs has {channels} channels (shape {tuple(jnp.shape(inputs))}), "
                     f"not divisible by feature_group_count={fg}.")
  if kernel_in * fg != channels:
    raise shape_error(_FN, "kernel", jnp.shape(kernel), f"[{s_h}, {s_w}, {channels // fg}, O]",
                      f"inputs has {channels} channels and feature_group_count={fg}")
  if out_features % fg:
    raise shape_error(_FN, "kernel", jnp.shape(kernel), "O divisible by feature_group_count",
                      f"O={out_features}, feature_group_count={fg}")
  geometry = ConvGeometry.create((height, width), (kh, kw), strides, padding, kernel_dilation, 1,
                                 fn=_FN)
  ho, wo = geometry.out_size
  k2 = kh * kw * 2
  if tuple(jnp.shape(offsets)) not in ((n, k2), (n, ho, wo, k2)):
    raise shape_error(_FN, "offsets", jnp.shape(offsets), f"{(n, k2)} or {(n, ho, wo, k2)}",
                      "[N, kh * kw * 2] (global) or [N, Ho, Wo, kh * kw * 2] (local)")
  if bias is not None and tuple(jnp.shape(bias)) != (out_features,):
    raise shape_error(_FN, "bias", jnp.shape(bias), f"({out_features},)")
  return geometry, out_features
