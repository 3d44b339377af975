"""Pure-jnp deformable sampling (``implementation="xla"``): offsets + bilinear + mask -> columns.

Runs anywhere XLA runs. The structure follows docs/implementations.md: a cheap *plan* (corner
indices and bilinear weights, once per (position, kernel point, offset group), in the compute
dtype) and a *gather* of contiguous channel vectors weighted by the plan. The gather has its own
VJP (weight gradients by channel reductions, input gradient by one scatter-add), so XLA never
differentiates through the gather index arithmetic; gradients reach offsets and mask through the
plan by plain AD.

Boundary rule: a corner at row -1 or row H (column -1 or W) reads 0; a sample with
``h <= -1 or h >= H or w <= -1 or w >= W`` (NaN included) gets all-zero weights and its
coordinates are replaced by 0 before any arithmetic, so huge, Inf or NaN offsets never produce
NaN gradients. The convolution's gather reads the image in place: such corners, and every corner
of a dropped sample, index one row past the image, which the gather reads as 0 and the
scatter-add skips (no padded copy of the image, no padded gradient). :func:`bilinear_plan`
also indexes a one-pixel zero-padded image, for the callers that pad (Deformable Kernels'
scope, multi-scale deformable attention's levels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flaxdcn._geometry import ConvGeometry, compute_dtype


def sample_grid(geometry: ConvGeometry, dtype, row_start: int | jax.Array = 0
                ) -> tuple[jax.Array, jax.Array]:
  """Undeformed sample coordinates, broadcastable to ``[Ho, Wo, kh, kw]``, of output rows
  ``row_start`` to ``row_start + Ho`` (``row_start`` may be traced)."""
  (ho, wo), (kh, kw) = geometry.out_size, geometry.kernel_size
  (sh, sw), (dh, dw) = geometry.strides, geometry.dilation
  (ph, _), (pw, _) = geometry.padding
  rows = jnp.arange(ho) + row_start  # integers: the coordinates are exact before the cast
  h = (rows * sh - ph)[:, None, None, None] + (jnp.arange(kh) * dh)[None, None, :, None]
  w = (jnp.arange(wo) * sw - pw)[None, :, None, None] + (jnp.arange(kw) * dw)[None, None, None, :]
  return h.astype(dtype), w.astype(dtype)


def bilinear_plan(h: jax.Array, w: jax.Array, mask: jax.Array | None, size: tuple[int, int],
                  *, padded: bool = True) -> tuple[jax.Array, jax.Array]:
  """Corner indices into the flattened image (1-padded, or as it is) and their weights.

  Args:
    h, w: sample coordinates (any shape ``S``) in the unpadded image.
    mask: modulation broadcastable to ``S``, or None.
    size: ``(H, W)`` of the unpadded image.
    padded: index the 1-padded image (``(H + 2) * (W + 2)`` rows, every index in range);
      otherwise the unpadded image (``H * W`` rows), where a corner outside the image or of a
      dropped sample gets the out-of-range index ``H * W`` (read as 0 by a ``"fill"`` gather,
      skipped by a ``"drop"`` scatter).

  Returns:
    ``index`` int32 ``S + [4]`` (corners (h0, w0), (h0, w0+1), (h0+1, w0), (h0+1, w0+1)) and
    ``weight`` ``S + [4]`` in the dtype of ``h`` (bilinear weight times mask; 0 for dropped samples).
  """
  height, width = size
  valid = (h > -1) & (h < height) & (w > -1) & (w < width)
  h = jnp.where(valid, h, 0)
  w = jnp.where(valid, w, 0)
  h0, w0 = jnp.floor(h), jnp.floor(w)
  lh, lw = h - h0, w - w0
  scale = valid.astype(h.dtype) if mask is None else jnp.where(valid, mask.astype(h.dtype), 0)
  hh, hw = (1 - lh) * scale, lh * scale
  weight = jnp.stack([hh * (1 - lw), hh * lw, hw * (1 - lw), hw * lw], axis=-1)
  # int32 is wide enough: indices address one image's pixels, (H + 2) * (W + 2) < 2**31.
  row, col = h0.astype(jnp.int32), w0.astype(jnp.int32)
  if padded:
    top_left = (row + 1) * (width + 2) + (col + 1)
    index = jnp.stack([top_left, top_left + 1, top_left + width + 2, top_left + width + 3], -1)
    return index, weight

  def corner(r, c):
    inside = valid & (r >= 0) & (r < height) & (c >= 0) & (c < width)
    return jnp.where(inside, r * width + c, height * width)

  # The stack last: XLA computes the index array in one fusion and the gather reads it (with the
  # bounds tests after the stack, they fused into the gather, recomputed for every channel).
  index = jnp.stack([corner(row, col), corner(row, col + 1), corner(row + 1, col),
                     corner(row + 1, col + 1)], -1)
  return index, weight


#: Elements of one chunk of positions x channels in the backward of :func:`gather_columns`.
_BWD_CHUNK_ELEMENTS = 2**18


@jax.custom_vjp
def gather_columns(image: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
  """``out[n, p] = sum_q weight[n, p, q] * image[n, index[n, p, q]]``, 0 for an index out of range.

  Args:
    image: ``[N, R, Cg]`` rows of channel vectors.
    index: ``[N, P, 4]`` int32 rows of ``image``; ``R`` or more reads 0 and gets no gradient.
    weight: ``[N, P, 4]`` weights in the compute dtype.

  Returns:
    ``[N, P, Cg]`` in ``image.dtype`` (accumulated in ``weight.dtype``).
  """
  return _gather_columns(image, index, weight)


def _read(img: jax.Array, idx: jax.Array) -> jax.Array:
  return img.at[idx].get(mode="fill", fill_value=0, indices_are_sorted=False,
                         unique_indices=False)


def _gather_columns(image, index, weight):
  def one(img, idx, wts):
    acc = sum(_read(img, idx[:, q]) * wts[:, q, None] for q in range(4))
    return acc.astype(img.dtype)
  return jax.vmap(one)(image, index, weight)


def _gather_columns_fwd(image, index, weight):
  return _gather_columns(image, index, weight), (image, index, weight)


def _gather_columns_bwd(residuals, cotangent):
  image, index, weight = residuals
  acc_dtype = weight.dtype
  n, p, channels = cotangent.shape

  def one(grad_img, img, idx, wts, g):
    # HIGHEST: a reduction inside the sampling's gradient, never a TF32 matmul on a GPU.
    grad_weight = jnp.stack(
        [jnp.einsum("pc,pc->p", _read(img, idx[:, q]), g, preferred_element_type=acc_dtype,
                    precision=lax.Precision.HIGHEST)
         for q in range(4)], axis=-1)
    g = g.astype(acc_dtype)
    for q in range(4):
      grad_img = grad_img.at[idx[:, q]].add(g * wts[:, q, None], mode="drop",
                                            indices_are_sorted=False, unique_indices=False)
    return grad_img, grad_weight

  # Positions in chunks: every temporary of the backward is a chunk's worth, not [N, P, ...]
  # four times over (XLA:CPU allocates temporaries per call; past ~32 MB they cost page faults).
  chunk = max(1, min(p, _BWD_CHUNK_ELEMENTS // max(1, n * channels)))
  # A chunk that divides P (down to half the largest) spares padding the cotangent, a copy as
  # large as the columns.
  chunk = next((d for d in range(chunk, chunk // 2, -1) if p % d == 0), chunk)
  chunks = -(-p // chunk)
  pad = chunks * chunk - p
  if pad:  # padding rows have zero weight and a zero cotangent: they add nothing.
    index = jnp.pad(index, ((0, 0), (0, pad), (0, 0)))
    weight = jnp.pad(weight, ((0, 0), (0, pad), (0, 0)))
    cotangent = jnp.pad(cotangent, ((0, 0), (0, pad), (0, 0)))

  def step(grad_image, i):
    sl = lambda a: lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)
    return jax.vmap(one)(grad_image, image, sl(index), sl(weight), sl(cotangent))

  # The scatters add into the loop's carry in place; zeros_like keeps the image's sharding.
  grad_image = jnp.zeros_like(image, dtype=acc_dtype)
  grad_image, grad_weight = lax.scan(step, grad_image, jnp.arange(chunks))
  grad_weight = jnp.moveaxis(grad_weight, 0, 1).reshape(n, chunks * chunk, 4)[:, :p]
  return grad_image.astype(image.dtype), None, grad_weight.astype(weight.dtype)


gather_columns.defvjp(_gather_columns_fwd, _gather_columns_bwd)


def deform_im2col(inputs: jax.Array, offsets: jax.Array, mask: jax.Array | None,
                  geometry: ConvGeometry, row_start: int | jax.Array = 0) -> jax.Array:
  """Deformable im2col: ``[N, H, W, C]`` -> columns ``[N, Ho, Wo, kh * kw, C]``.

  ``offsets`` is ``[N, Ho, Wo, G * kh * kw * 2]`` in (g, i, j, (dy, dx)) order and ``mask``
  ``[N, Ho, Wo, G * kh * kw]`` or None; all three share one floating dtype. Columns are in that dtype.
  ``row_start`` (an int or a traced int32 scalar) moves the ``Ho`` output rows of ``geometry``
  down by that many rows: they are rows ``row_start`` to ``row_start + Ho`` of its convolution.
  """
  # Every reshape here splits or merges a single group of non-batch axes: the form that explicit
  # sharding propagates without being told, so a batch-sharded call stays batch-sharded.
  n, height, width, channels = inputs.shape
  (ho, wo), (kh, kw), groups = geometry.out_size, geometry.kernel_size, geometry.offset_groups
  cdt = compute_dtype(inputs.dtype)

  # [N, Ho, Wo, G, kh, kw] -> [N, Ho, Wo, kh, kw, G]: the column order, groups innermost.
  off = jnp.moveaxis(offsets.reshape(n, ho, wo, groups, kh, kw, 2).astype(cdt), 3, 5)
  base_h, base_w = sample_grid(geometry, cdt, row_start)
  h = base_h[..., None] + off[..., 0]
  w = base_w[..., None] + off[..., 1]
  if mask is not None:
    mask = jnp.moveaxis(mask.reshape(n, ho, wo, groups, kh, kw), 3, 5)
  index, weight = bilinear_plan(h, w, mask, (height, width), padded=False)
  p = ho * wo * kh * kw
  # Offset groups fold into the rows: image row l * G + g holds group g's channels of pixel l.
  cg = channels // groups
  index = index * groups + jnp.arange(groups, dtype=index.dtype)[:, None]
  index, weight = index.reshape(n, p * groups, 4), weight.reshape(n, p * groups, 4)
  image = (inputs.reshape(n, height * width, channels).reshape(n, height * width, groups, cg)
           .reshape(n, height * width * groups, cg))
  columns = gather_columns(image, index, weight).reshape(n, p, groups, cg).reshape(n, p, channels)
  return columns.reshape(n, ho, wo, kh * kw, channels)
