"""Pure-jnp multi-scale deformable attention (``implementation="xla"``).

DCN's sampling (``_xla_conv``) on several maps at once, summed over levels and points:

- every level is padded by one zero pixel on each side and the padded levels are concatenated
  into one image ``[N, R, M, D]`` (``R = sum_l (H_l + 2) * (W_l + 2)``), heads as channel groups;
- the *plan* (:func:`flaxdcn.ops._xla_conv.bilinear_plan`, once per sample): four corner rows of
  that image per sample and their bilinear weights times the attention weight, in the compute
  dtype, ``K = L * P * 4`` per (query, head);
- :func:`gather_sum`: ``out[n, q, m] = sum_k weight[n, q, m, k] * image[n, index[n, q, m, k], m]``
  with its own VJP (the weight gradient by reductions over ``D``, the image gradient by a
  scatter-add), so XLA never differentiates the gather's index arithmetic; gradients reach the
  locations and the attention weights through the plan by plain AD.

Both directions of the gather run over chunks of queries of about ``2**19`` gathered elements
(2 MiB in float32), so the gathered corners ``[N, Lq, M, L * P * 4, D]`` exist one chunk at a
time, never whole. Measured at the A1 shape of ``python -m flaxdcn.benchmark`` (float32, XLA's
CPU backend, 2 cores; chunks of ``2**16`` to ``2**22`` elements and one single chunk tried):
against one single chunk, the forward is 7x faster and the forward+backward 2.8x, with 1/11 and
1/12 of the temporary memory; smaller chunks lose to the loop's overhead, larger ones to the
cache. Letting autodiff differentiate the chunked gather instead of this VJP is 2.6x slower in
the forward+backward with 6.5x the temporary memory. Packing the four corners of a cell into one
row (Scenic's layout: one gather per sample instead of four, built for TPUs) was as fast in the
forward and 1.5x slower in the backward (one scatter of 4-row blocks), so the corners stay
separate rows. The chunk size is tuned on the CPU only.

Boundary rule (that of ``bilinear_plan``): a corner in the padding ring reads 0; a sample with
``h <= -1``, ``h >= H_l``, ``w <= -1`` or ``w >= W_l`` (NaN included) gets all-zero weights and
coordinates replaced by 0 before any arithmetic, so Inf or NaN locations never index out of
range and give zero, finite gradients. At an integer coordinate the weights are those of the
cell ``[floor(h), floor(h) + 1]``, so the derivative there is that cell's.

Memory: a padded copy of the value (``R`` rows, in the value's dtype), the plan (int32 rows and
compute-dtype weights, ``[N, Lq, M, L * P * 4]`` each: 8 bytes per corner) and one chunk of
gathered corners. The backward adds the value gradient in the compute dtype
(``[N, R, M, D]``) and the weight gradient (the plan's weights' size). XLA's temporary memory
in float32 on the CPU: 16.5 MiB forward and 32 MiB forward+backward at A1, 211 and 406 MiB at
A2, 42 and 115 MiB at A3 (the plan is 139 MiB of A2's). The native kernels need none of these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flaxdcn._geometry import MsDeformAttnGeometry, compute_dtype
from flaxdcn.ops._xla_conv import bilinear_plan

#: Gathered elements (``queries x M x K x D`` over the batch) per chunk of :func:`gather_sum`.
_CHUNK_ELEMENTS = 2**19


def _per_image_and_head(fn):
  """vmaps ``fn(image [R, D], index [Q, K], ...)`` over the batch and head axes."""
  return jax.vmap(jax.vmap(fn, in_axes=1, out_axes=1))


def padded_levels(value: jax.Array, geometry: MsDeformAttnGeometry) -> jax.Array:
  """``value [N, S, M, D]`` as the concatenated, one-pixel zero-padded levels ``[N, R, M, D]``."""
  # Slices and reshapes split or merge non-batch axes only: batch sharding passes through.
  n, _, m, d = value.shape
  levels = []
  for (h, w), start in zip(geometry.spatial_shapes, geometry.level_start_index):
    level = value[:, start:start + h * w].reshape(n, h, w, m, d)
    level = jnp.pad(level, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
    levels.append(level.reshape(n, (h + 2) * (w + 2), m, d))
  return jnp.concatenate(levels, axis=1) if len(levels) > 1 else levels[0]


def plan(sampling_locations: jax.Array, attention_weights: jax.Array,
         geometry: MsDeformAttnGeometry) -> tuple[jax.Array, jax.Array]:
  """Rows of :func:`padded_levels` and their weights, ``[N, Lq, M, L * P * 4]`` each.

  Args:
    sampling_locations: ``[N, Lq, M, L, P, 2]`` ``(x, y)`` in the compute dtype.
    attention_weights: ``[N, Lq, M, L, P]``.
    geometry: the levels.

  Returns:
    ``index`` int32 and ``weight`` (bilinear weight times attention weight; 0 for dropped
    samples and corners in the padding) in the dtype of ``sampling_locations``, ordered
    ``(l, p, corner)``.
  """
  n, lq, m = sampling_locations.shape[:3]
  indices, weights = [], []
  start = 0
  for level, (h, w) in enumerate(geometry.spatial_shapes):
    x = sampling_locations[:, :, :, level, :, 0] * w - 0.5
    y = sampling_locations[:, :, :, level, :, 1] * h - 0.5
    index, weight = bilinear_plan(y, x, attention_weights[:, :, :, level], (h, w))
    # int32 is enough while R < 2**31 (the value itself is then over 2**31 / (M * D) rows).
    indices.append(index + start)
    weights.append(weight)
    start += (h + 2) * (w + 2)
  index = jnp.concatenate(indices, axis=3) if len(indices) > 1 else indices[0]
  weight = jnp.concatenate(weights, axis=3) if len(weights) > 1 else weights[0]
  return index.reshape(n, lq, m, -1), weight.reshape(n, lq, m, -1)


def _chunks(index: jax.Array, image: jax.Array, *arrays: jax.Array
            ) -> tuple[int, int, list[jax.Array]]:
  """``(chunk, count, arrays padded along the query axis to count * chunk)``; padded queries
  have index 0 and, for the weight and the cotangent, zeros."""
  n, q, m, k = index.shape
  d = image.shape[-1]
  chunk = max(1, min(q, _CHUNK_ELEMENTS // max(1, n * m * k * d)))
  count = -(-q // chunk)
  pad = count * chunk - q
  if pad:
    widths = lambda a: ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)
    arrays = tuple(jnp.pad(a, widths(a)) for a in (index,) + arrays)
  else:
    arrays = (index,) + arrays
  return chunk, count, list(arrays)


def _slice(a: jax.Array, i: jax.Array, chunk: int) -> jax.Array:
  return lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)


@jax.custom_vjp
def gather_sum(image: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
  """``out[n, q, m] = sum_k weight[n, q, m, k] * image[n, index[n, q, m, k], m]``.

  Args:
    image: ``[N, R, M, D]``.
    index: ``[N, Q, M, K]`` int32 rows of ``image``.
    weight: ``[N, Q, M, K]`` in the compute dtype.

  Returns:
    ``[N, Q, M, D]`` in ``image.dtype``, accumulated in ``weight.dtype``.
  """
  return _gather_sum(image, index, weight)


def _gather_sum(image, index, weight):
  n, q, m, _ = index.shape
  d = image.shape[-1]

  def one(img, idx, wts):  # [R, D], [Qc, K], [Qc, K] -> [Qc, D]
    return jnp.sum(img[idx].astype(wts.dtype) * wts[..., None], axis=1).astype(img.dtype)

  chunk, count, (index, weight) = _chunks(index, image, weight)

  def step(carry, i):
    return carry, _per_image_and_head(one)(image, _slice(index, i, chunk),
                                           _slice(weight, i, chunk))

  _, out = lax.scan(step, None, jnp.arange(count))
  # [count, N, chunk, M, D] -> [N, count * chunk, M, D]: the chunk axis merges with the queries.
  return jnp.moveaxis(out, 0, 1).reshape(n, count * chunk, m, d)[:, :q]


def _gather_sum_fwd(image, index, weight):
  return _gather_sum(image, index, weight), (image, index, weight)


def _gather_sum_bwd(residuals, cotangent):
  image, index, weight = residuals
  acc = weight.dtype
  n, q, m, k = index.shape

  def one(grad_img, img, idx, wts, g):  # [R, D], [R, D], [Qc, K], [Qc, K], [Qc, D]
    g = g.astype(acc)
    grad_weight = jnp.einsum("qkd,qd->qk", img[idx], g, preferred_element_type=acc)
    grad_img = grad_img.at[idx].add(wts[..., None] * g[:, None, :], indices_are_sorted=False,
                                    unique_indices=False)
    return grad_img, grad_weight

  chunk, count, (index, weight, cotangent) = _chunks(index, image, weight, cotangent)

  def step(grad_image, i):
    return _per_image_and_head(one)(grad_image, image, _slice(index, i, chunk),
                                    _slice(weight, i, chunk), _slice(cotangent, i, chunk))

  # The scatter adds into the loop's carry in place; zeros_like keeps the image's sharding.
  grad_image = jnp.zeros_like(image, dtype=acc)
  grad_image, grad_weight = lax.scan(step, grad_image, jnp.arange(count))
  grad_weight = jnp.moveaxis(grad_weight, 0, 1).reshape(n, count * chunk, m, k)[:, :q]
  return grad_image.astype(image.dtype), None, grad_weight.astype(weight.dtype)


gather_sum.defvjp(_gather_sum_fwd, _gather_sum_bwd)


def ms_deform_attn(value: jax.Array, sampling_locations: jax.Array,
                   attention_weights: jax.Array, geometry: MsDeformAttnGeometry) -> jax.Array:
  """``[N, Lq, M, D]`` (arguments checked; ``value`` and ``attention_weights`` in one dtype
  ``T``, ``sampling_locations`` in its compute dtype); the result is in ``T``."""
  cdt = compute_dtype(value.dtype)
  index, weight = plan(sampling_locations.astype(cdt), attention_weights.astype(cdt), geometry)
  return gather_sum(padded_levels(value, geometry), index, weight)
