"""Pure-jnp deformable RoI pooling (``implementation="xla"``).

The jnp implementation (``implementation="xla"``) rests on one fact: the RoIAlign bilinear read is
separable. With ``a_r(y) = [-1 <= y <= H] * max(0, 1 - |clip(y, 0, H - 1) - r|)`` (and ``b_s(x)``
likewise) a sample is ``sum_r sum_s a_r(y) b_s(x) F[r, s]``, so the mean over a bin's sub-grid is::

  out[p] = scale[p] * sum_r sum_s A[p, r] B[p, s] F[r, s],   A[p, r] = sum_iy a_r(y_iy),  B likewise

*Fixed grids* (``sampling_ratio > 0``, ``S`` samples per axis): ``A`` is kept as the ``2S`` corner
rows of the samples and their weights; one gather of ``2S x 2S`` channel vectors per bin.

*Adaptive grids* (``sampling_ratio = 0``, ``ceil(bin_size)`` samples per axis, data dependent):
``A`` is evaluated on the rows of a crop. A sample reaches row ``r`` only from ``(r - 1, r + 1)``
(``[-1, 1)`` for row 0, ``(H - 2, H]`` for row ``H - 1``), and adaptive sub-samples are more than
half a pixel apart whenever there are two or more of them (``b / ceil(b) > 1/2`` for ``b > 1``),
so at most four samples reach a row: each crop row sums the few candidate samples from just before
the first that can reach it, each with the exact validity test, whatever the grid size. Each RoI
gets one ``K x K`` crop holding every sample of every bin, and one product
``[P, K^2] x [K^2, C]``. RoIs are sorted by the crop they need and processed in chunks; each chunk
takes the smallest crop of a static ladder (8, 16, 32, ... pixels) that holds all its RoIs, chosen
by ``lax.switch``, and the last rung is the whole image, so every RoI, however large or shifted,
is exact: there is no cap.

Cost per RoI (``P = oh * ow`` bins, ``C`` channels): fixed grids gather ``P * 4S^2 * C`` values
and do as many multiply-adds; adaptive grids gather ``K^2 * C`` values and do ``P * K^2 * C``
multiply-adds, ``K`` the ladder rung above the RoI's sample extent (offsets included) plus two
pixels, at most the image. Under ``jax.vmap`` of this implementation the switch sees a batched
index and evaluates every rung (``implementation=None`` folds the vmapped axis into the RoIs
first and keeps the ladder).

Per-image RoIs ``[N, Ri, 4]`` run the same machinery mapped over the images (``jax.vmap``), so
every gather and scatter of the features is batched over the image axis and a batch-sharded
program stays partitioned by batch; the images share each chunk's rung of the ladder.

Both regimes run under one ``custom_vjp`` whose residuals are its inputs: the backward pass walks
the same chunks, recomputes the weights and scatter-adds the feature gradient into one
accumulator, so memory stays bounded by the chunking (``_BUDGET`` elements per intermediate), not
by the number of RoIs. Gradients reach the offsets through the sample positions by plain AD of the
(cheap) weight computation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flaxdcn._geometry import RoIPoolGeometry, compute_dtype

#: Elements of one materialised intermediate (gathered corners, crops and their weights);
#: sub-chunks of RoIs are sized to stay under it (one RoI at a time at least).
_BUDGET = 1 << 24
#: RoIs per chunk of the adaptive ladder: one ``lax.switch`` per chunk.
_CHUNK = 32
#: Smallest crop of the adaptive ladder (holds RoIs up to about six pixels).
_FIRST_CROP = 8
#: Candidate samples evaluated per crop row: at most four reach a row (five with rounding at a
#: spacing of exactly half a pixel); one before and one after that absorb an off-by-one first index.
_CANDIDATES = 7
#: The weighted sums are part of the sampling, not a learned product: full float32 on every backend.
_EXACT = lax.Precision.HIGHEST


class _Plan(NamedTuple):
  """Per-RoI sampling parameters, in the compute dtype unless noted (``P = oh * ow`` bins).

  Sample ``iy`` of bin ``p`` lies at ``origin_h[p] + (iy + 0.5) * step_h`` for ``iy < grid_h``.
  """
  batch: jax.Array     # [R] int32, clamped into [0, N) (dropped RoIs have scale 0)
  origin_h: jax.Array  # [R, P]; 0 for dropped bins
  origin_w: jax.Array  # [R, P]
  step_h: jax.Array    # [R]; 1 where the grid is empty
  step_w: jax.Array    # [R]
  grid_h: jax.Array    # [R] sub-grid size (a float holding an integer); 0: no samples
  grid_w: jax.Array    # [R]
  scale: jax.Array     # [R, P] 1 / count, 0 for dropped RoIs and bins
  first_h: jax.Array   # [R] int32 first row of the crop holding every sample (adaptive grids)
  first_w: jax.Array   # [R] int32 first column of that crop
  need: jax.Array      # [R] int32 rows and columns the crop must span (0: nothing to read)


def _make_plan(rois: jax.Array, offsets: jax.Array | None, geometry: RoIPoolGeometry, n: int,
               dtype) -> _Plan:
  height, width = geometry.in_size
  oh, ow = geometry.output_size
  rois = rois.astype(dtype)
  index = jnp.trunc(rois[:, 0])
  roi_ok = jnp.all(jnp.isfinite(rois), axis=1) & (index >= 0) & (index < n)
  batch = jnp.where(roi_ok, index, 0).astype(jnp.int32)
  # Dropped RoIs get finite corners before any arithmetic: a NaN roi size would otherwise turn
  # the zero cotangent of their offsets into NaN (0 * NaN).
  rois = jnp.where(roi_ok[:, None], rois, 0)
  start_w, start_h, end_w, end_h = (rois[:, k] * geometry.spatial_scale - 0.5 for k in range(1, 5))
  roi_h, roi_w = end_h - start_h, end_w - start_w
  bin_h, bin_w = roi_h / oh, roi_w / ow

  def grid_and_step(bin_size):
    if geometry.sampling_ratio > 0:
      grid = jnp.full_like(bin_size, geometry.sampling_ratio)
    else:
      grid = jnp.ceil(bin_size)
    ok = roi_ok & jnp.isfinite(bin_size) & (grid > 0)
    grid = jnp.where(ok, grid, 0)
    return grid, jnp.where(ok, bin_size / jnp.where(ok, grid, 1), 1)

  grid_h, step_h = grid_and_step(bin_h)
  grid_w, step_w = grid_and_step(bin_w)
  origin_h = start_h[:, None, None] + jnp.arange(oh, dtype=dtype)[:, None] * bin_h[:, None, None]
  origin_w = start_w[:, None, None] + jnp.arange(ow, dtype=dtype) * bin_w[:, None, None]
  if offsets is not None:
    offsets = offsets.astype(dtype)
    origin_h = origin_h + geometry.gamma * roi_h[:, None, None] * offsets[..., 0]
    origin_w = origin_w + geometry.gamma * roi_w[:, None, None] * offsets[..., 1]
  origin_h, origin_w = (jnp.broadcast_to(o, (rois.shape[0], oh, ow)).reshape(-1, oh * ow)
                        for o in (origin_h, origin_w))
  bin_ok = roi_ok[:, None] & jnp.isfinite(origin_h) & jnp.isfinite(origin_w)
  # Dropped bins get a finite origin before any arithmetic, so neither values nor gradients see
  # their Inf/NaN (the where routes a zero cotangent to the offending offset).
  origin_h = jnp.where(bin_ok, origin_h, 0)
  origin_w = jnp.where(bin_ok, origin_w, 0)
  count = jnp.maximum(grid_h * grid_w, 1)
  scale = jnp.where(bin_ok, (1 / count)[:, None], 0)

  zeros = jnp.zeros_like(batch)
  if geometry.sampling_ratio > 0:
    return _Plan(batch, origin_h, origin_w, step_h, step_w, grid_h, grid_w, scale, zeros, zeros,
                 zeros)
  first_h, need_h = _crop(origin_h, step_h, grid_h, bin_ok, height)
  first_w, need_w = _crop(origin_w, step_w, grid_w, bin_ok, width)
  return _Plan(batch, origin_h, origin_w, step_h, step_w, grid_h, grid_w, scale, first_h, first_w,
               jnp.maximum(need_h, need_w))


def _crop(origin, step, grid, bin_ok, size: int) -> tuple[jax.Array, jax.Array]:
  """The rows an adaptive RoI's samples can reach, over all its bins.

  Each bin's sample span ``[origin + step / 2, origin + (grid - 1/2) * step]`` is clamped into the
  image and widened by a few ulps, so that rounding in the weight computation cannot reach a row
  outside; samples outside ``[-1, size]`` read nothing.

  Returns:
    ``first`` int32 ``[R]`` in ``[0, size)`` and ``need`` int32 ``[R]``: rows ``first`` to
    ``first + need - 1`` hold every row with a non-zero weight (``need`` 0: none).
  """
  origin = lax.stop_gradient(origin)
  step, grid = step[:, None], grid[:, None]
  lo = origin + 0.5 * step
  hi = origin + (grid - 0.5) * step
  margin = 64 * jnp.finfo(origin.dtype).eps * (1 + jnp.abs(lo) + jnp.abs(hi))
  reaches = bin_ok & (grid > 0) & (hi >= -1 - margin) & (lo <= size + margin)
  first = jnp.where(reaches, jnp.floor(jnp.clip(lo - margin, 0, size - 1)), size).min(axis=1)
  last = jnp.where(reaches, jnp.ceil(jnp.clip(hi + margin, 0, size - 1)), -1).max(axis=1)
  need = jnp.maximum(last - first + 1, 0)
  return jnp.where(need > 0, first, 0).astype(jnp.int32), need.astype(jnp.int32)


def _adaptive_axis(origin, step, grid, first, length: int, size: int):
  """Summed RoIAlign weights of rows ``first + [0, length)`` over an adaptive sub-grid.

  Args:
    origin: ``[c, P]`` sample origins (finite).
    step: ``[c]`` sample spacing, > 1/2 wherever ``grid >= 2``.
    grid: ``[c]`` samples per axis (float).
    first: ``[c]`` int32 first row of the crop; ``first + length <= size``.
    length: crop length.
    size: ``H`` (or ``W``).

  Returns:
    ``rows`` int32 ``[c, length]`` and ``weights`` ``[c, P, length]`` in ``origin.dtype``.
  """
  dtype = origin.dtype
  rows = first[:, None] + jnp.arange(length, dtype=jnp.int32)
  r = rows[:, None, :].astype(dtype)
  step3, grid3 = step[:, None, None], grid[:, None, None]
  # Lowest position that reaches row r: r - 1 (exclusive), or -1 (inclusive, clamped) for row 0.
  reach_lo = jnp.where(r == 0, -1, r - 1)
  first_sample = jnp.ceil((reach_lo - lax.stop_gradient(origin)[..., None]) / step3 - 0.5)
  first_sample = jnp.clip(first_sample, 0, jnp.maximum(grid3 - 1, 0))
  i = first_sample[..., None] + jnp.arange(-1, _CANDIDATES - 1, dtype=dtype)
  y = origin[..., None, None] + (i + 0.5) * step3[..., None]
  valid = (i >= 0) & (i < grid3[..., None]) & (y >= -1) & (y <= size)
  t = jnp.abs(jnp.clip(y, 0, size - 1) - r[..., None])
  weights = jnp.where(valid & (t < 1), 1 - t, 0).sum(-1)
  return rows, weights


def _fixed_axis(origin, step, samples: int, size: int):
  """Corner rows and bilinear weights of a fixed sub-grid of ``samples`` per axis.

  Returns:
    ``rows`` int32 ``[c, P, 2 * samples]`` (low and high corner of each sample) and their weights.
  """
  offsets = jnp.arange(samples, dtype=origin.dtype) + 0.5
  y = origin[..., None] + offsets * step[:, None, None]
  valid = (y >= -1) & (y <= size)
  y = jnp.clip(y, 0, size - 1)
  low = jnp.floor(y)
  frac = y - low
  weights = jnp.where(valid[..., None], jnp.stack([1 - frac, frac], axis=-1), 0)
  low = low.astype(jnp.int32)
  rows = jnp.stack([low, jnp.minimum(low + 1, size - 1)], axis=-1)
  c, p = origin.shape
  return rows.reshape(c, p, 2 * samples), weights.reshape(c, p, 2 * samples)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one pooling call (hashable: the ``custom_vjp`` static argument).

  ``kinds[k]`` is how branch ``k`` reads the image: ``("crop", kh, kw)`` (adaptive grid: one crop
  of ``kh x kw`` pixels per RoI; the whole image when that is ``H x W``) or ``("corners", 2S, 2S)``
  (fixed grid: the corner pixels of each bin's samples). ``sub[k]``: RoIs per vectorised step of
  branch ``k``.
  """
  size: tuple[int, int]
  kinds: tuple[tuple[str, int, int], ...]
  sub: tuple[int, ...]
  samples: int
  position_grad: bool


def _bin_weights(config: _Config, kind, plan: _Plan, origin_h, origin_w):
  """Weights ``[c, P, kh * kw]`` of one branch's pixels; differentiable in the origins.

  Returns:
    ``(weights, (rows, cols))``: the outer product of the row and column weights (scaled by
    ``1 / count``) and the int32 rows and columns they refer to (``[c, kh]`` per crop, or
    ``[c, P, 2S]`` per bin for corners).
  """
  height, width = config.size
  name, kh, kw = kind
  if name == "corners":
    rows, wy = _fixed_axis(origin_h, plan.step_h, config.samples, height)
    cols, wx = _fixed_axis(origin_w, plan.step_w, config.samples, width)
  else:
    first_h = jnp.clip(plan.first_h, 0, height - kh)
    first_w = jnp.clip(plan.first_w, 0, width - kw)
    rows, wy = _adaptive_axis(origin_h, plan.step_h, plan.grid_h, first_h, kh, height)
    cols, wx = _adaptive_axis(origin_w, plan.step_w, plan.grid_w, first_w, kw, width)
  weights = (wy * plan.scale[..., None])[..., :, None] * wx[..., None, :]
  return weights.reshape(weights.shape[:2] + (kh * kw,)), (rows, cols)


def _whole_image(config: _Config, kind) -> bool:
  """Whether ``kind`` is the last rung of the adaptive ladder: the whole image of each RoI."""
  return kind[0] == "crop" and kind[1:] == config.size


def _pixel_index(kind, batch, rows, cols):
  """Index arrays of the pixels of ``kind``: ``[c, kh, kw]`` per crop or ``[c, P, 2S, 2S]`` per
  bin."""
  if kind[0] == "corners":
    return batch[:, None, None, None], rows[..., :, None], cols[..., None, :]
  return batch[:, None, None], rows[:, :, None], cols[:, None, :]


def _read(config: _Config, kind, features, batch, rows, cols, acc_dtype):
  """The pixels the weights multiply: ``[c, kh * kw, C]`` crops or ``[c, P, 4S^2, C]`` corners."""
  if _whole_image(config, kind):
    pixels = features[batch]
  else:
    pixels = features[_pixel_index(kind, batch, rows, cols)]
  return pixels.reshape(pixels.shape[:-3] + (-1, pixels.shape[-1])).astype(acc_dtype)


def _spec(kind) -> str:
  """Subscripts of the pixels: one crop per RoI or corners per bin."""
  return "cpqz" if kind[0] == "corners" else "cqz"


def _subchunks(fn, xs, size: int, carry=None):
  """``fn`` over sub-chunks of ``size`` RoIs of the leading axis of ``xs`` (a scan threading
  ``carry`` when one is given)."""
  c = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if size >= c:
    return fn(xs) if carry is None else fn(carry, xs)
  split = jax.tree_util.tree_map(lambda a: a.reshape((c // size, size) + a.shape[1:]), xs)
  if carry is None:
    out = lax.map(fn, split)
  else:
    carry, out = lax.scan(fn, carry, split)
  out = jax.tree_util.tree_map(lambda a: a.reshape((c,) + a.shape[2:]), out)
  return out if carry is None else (carry, out)


def _over_chunks(fn, xs, carry=None):
  """``lax.map`` (or ``lax.scan`` threading ``carry``) of ``fn`` over the chunk axis; a single
  chunk is a plain call, which keeps the common small program loop-free."""
  if jax.tree_util.tree_leaves(xs)[0].shape[0] > 1:
    return lax.map(fn, xs) if carry is None else lax.scan(fn, carry, xs)
  first = jax.tree_util.tree_map(lambda a: a[0], xs)
  out = fn(first) if carry is None else fn(carry, first)
  if carry is None:
    return jax.tree_util.tree_map(lambda a: a[None], out)
  carry, out = out
  return carry, jax.tree_util.tree_map(lambda a: a[None], out)


def _forward(config: _Config, features, origin_h, origin_w, plan: _Plan, branch):
  """``[chunks, c, P, C]`` pooled bins (scaled, unmasked) in the compute dtype."""
  acc = origin_h.dtype

  def run(k):
    kind = config.kinds[k]

    def one(xs):
      oh_, ow_, p = xs
      weights, (rows, cols) = _bin_weights(config, kind, p, oh_, ow_)
      pixels = _read(config, kind, features, p.batch, rows, cols, acc)
      return jnp.einsum(f"cpq,{_spec(kind)}->cpz", weights, pixels, precision=_EXACT)
    return lambda xs: _subchunks(one, xs, config.sub[k])

  def chunk(xs):
    *data, b = xs
    if len(config.kinds) == 1:
      return run(0)(data)
    return lax.switch(b, [run(k) for k in range(len(config.kinds))], data)

  return _over_chunks(chunk, (origin_h, origin_w, plan, branch))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pool(config: _Config, features, origin_h, origin_w, plan: _Plan, branch):
  return _forward(config, features, origin_h, origin_w, plan, branch)


def _pool_fwd(config, features, origin_h, origin_w, plan, branch):
  out = _forward(config, features, origin_h, origin_w, plan, branch)
  return out, (features, origin_h, origin_w, plan, branch)


def _pool_bwd(config, residuals, cotangent):
  features, origin_h, origin_w, plan, branch = residuals
  acc = origin_h.dtype

  def run(k):
    kind = config.kinds[k]

    def one(grad_features, xs):
      oh_, ow_, p, g = xs
      weights_fn = functools.partial(_bin_weights, config, kind, p)
      weights, weights_vjp, (rows, cols) = jax.vjp(weights_fn, oh_, ow_, has_aux=True)
      g = g.astype(acc)
      grad_pixels = jnp.einsum(f"cpq,cpz->{_spec(kind)}", weights, g, precision=_EXACT)
      if _whole_image(config, kind):
        grad_features = grad_features.at[p.batch].add(
            grad_pixels.reshape((-1,) + features.shape[1:]))
      else:
        index = _pixel_index(kind, p.batch, rows, cols)
        grad_features = grad_features.at[index].add(
            grad_pixels.reshape(jnp.broadcast_shapes(*(i.shape for i in index))
                                + features.shape[-1:]))
      if not config.position_grad:
        return grad_features, (jnp.zeros_like(oh_), jnp.zeros_like(ow_))
      pixels = _read(config, kind, features, p.batch, rows, cols, acc)
      grad_weights = jnp.einsum(f"cpz,{_spec(kind)}->cpq", g, pixels, precision=_EXACT)
      return grad_features, weights_vjp(grad_weights)
    return lambda carry, xs: _subchunks(one, xs, config.sub[k], carry)

  def chunk(grad_features, xs):
    *data, b = xs
    if len(config.kinds) == 1:
      return run(0)(grad_features, data)
    return lax.switch(b, [run(k) for k in range(len(config.kinds))], grad_features, data)

  grad_features, (grad_h, grad_w) = _over_chunks(
      chunk, (origin_h, origin_w, plan, cotangent, branch), jnp.zeros(features.shape, acc))
  return grad_features.astype(features.dtype), grad_h, grad_w, None, None


_pool.defvjp(_pool_fwd, _pool_bwd)


def _pow2_at_most(value: int) -> int:
  return 1 << (max(int(value), 1).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static chunking of one pooling call: ``num_chunks`` chunks of ``chunk`` RoIs (the last
  padded), and the crop sizes of the adaptive ladder below the whole image."""
  config: _Config
  chunk: int
  num_chunks: int
  sizes: tuple[int, ...]


def _layout(shape: tuple[int, ...], num_rois: int, geometry: RoIPoolGeometry,
            has_offsets: bool) -> _Layout:
  _, height, width, channels = shape
  oh, ow = geometry.output_size
  bins = oh * ow
  sizes: list[int] = []
  if geometry.sampling_ratio > 0:
    side = 2 * geometry.sampling_ratio
    kinds = (("corners", side, side),)
    per_roi = (bins * side * side * channels,)
    chunk = min(1 << (num_rois - 1).bit_length(), _pow2_at_most(_BUDGET // per_roi[0]))
  else:
    while (_FIRST_CROP << len(sizes)) < max(height, width):
      sizes.append(_FIRST_CROP << len(sizes))
    kinds = tuple(("crop", min(k, height), min(k, width)) for k in sizes) + (
        ("crop", height, width),)
    per_roi = tuple((channels + bins) * kh * kw for _, kh, kw in kinds)
    chunk = min(_CHUNK, 1 << (num_rois - 1).bit_length())
  config = _Config(
      size=(height, width), kinds=kinds,
      sub=tuple(min(chunk, _pow2_at_most(_BUDGET // m)) for m in per_roi),
      samples=geometry.sampling_ratio, position_grad=has_offsets)
  return _Layout(config, chunk, -(-num_rois // chunk), tuple(sizes))


def _chunked_plan(layout: _Layout, rois, offsets, geometry: RoIPoolGeometry, n: int, acc):
  """The plan of ``rois`` ``[R, 5]`` cut into chunks ``[num_chunks, chunk, ...]``, each chunk's
  ladder rung ``[num_chunks]`` and the order the RoIs were sorted in (None: not sorted)."""
  num_rois = rois.shape[0]
  plan = _make_plan(rois, offsets, geometry, n, acc)
  num_chunks, chunk = layout.num_chunks, layout.chunk
  pad = num_chunks * chunk - num_rois
  # Padding RoIs have no samples and scale 0 (step 1 keeps their arithmetic finite).
  plan = _Plan(*(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1),
                         constant_values=1 if name.startswith("step") else 0)
                 for name, a in zip(_Plan._fields, plan)))
  order = None
  branch = jnp.zeros((num_chunks,), jnp.int32)
  if layout.sizes:
    # Sorted by need, RoIs of similar size share a chunk; each chunk takes the smallest crop that
    # holds all its RoIs (a k x k crop, clipped to the image, holds a need of up to k), and the
    # last branch, the whole image, holds any RoI.
    order = jnp.argsort(plan.need)
    plan = jax.tree_util.tree_map(lambda a: a[order], plan)
    chunk_need = plan.need.reshape(num_chunks, chunk).max(axis=1)
    branch = jnp.sum(chunk_need[:, None] > jnp.array(layout.sizes, jnp.int32), axis=1)
  chunked = jax.tree_util.tree_map(lambda a: a.reshape((num_chunks, chunk) + a.shape[1:]), plan)
  return chunked, branch, order


def _run(layout: _Layout, features, chunked: _Plan, branch):
  """``[num_chunks * chunk, P, C]`` pooled bins of a chunked plan, in sorted order."""
  out = _pool(layout.config, features, chunked.origin_h, chunked.origin_w,
              chunked._replace(origin_h=None, origin_w=None), branch)
  return out.reshape((layout.num_chunks * layout.chunk,) + out.shape[2:])


def _unsort(out, order, num_rois: int):
  if order is not None:
    out = out[jnp.argsort(order)]
  return out[:num_rois]


def deform_roi_pool_xla(features: jax.Array, rois: jax.Array, offsets: jax.Array | None,
                        geometry: RoIPoolGeometry) -> jax.Array:
  """The pure-jnp deformable RoI pooling (arguments already checked, ``R, N, C > 0``).

  Args:
    features: ``[N, H, W, C]`` in a floating dtype ``T``.
    rois: ``[R, 5]``, or per image ``[N, Ri, 4]``, in the compute dtype of ``T``.
    offsets: ``[R, oh, ow, 2]`` (per image ``[N, Ri, oh, ow, 2]``) ``(dy, dx)`` in ``T``, or None.
    geometry: the static parameters.

  Returns:
    ``[R, oh, ow, C]`` (per image ``[N, Ri, oh, ow, C]``) in ``T`` (unmasked).
  """
  if rois.ndim == 3:
    return _per_image(features, rois, offsets, geometry)
  n, _, _, channels = features.shape
  num_rois = rois.shape[0]
  acc = compute_dtype(features.dtype)
  layout = _layout(features.shape, num_rois, geometry, offsets is not None)
  chunked, branch, order = _chunked_plan(layout, rois, offsets, geometry, n, acc)
  out = _unsort(_run(layout, features, chunked, branch), order, num_rois)
  return out.reshape(num_rois, *geometry.output_size, channels).astype(features.dtype)


def _per_image(features, rois, offsets, geometry: RoIPoolGeometry):
  """Per-image RoIs ``[N, Ri, 4]``: each image pools its own boxes from its own features.

  Every step is mapped over the image axis (``jax.vmap``), so each gather and scatter of the
  features is batched over images, and a batch-sharded program runs per shard with no gather
  of the features. An empty box (not ``x1 < x2 and y1 < y2``) gets batch index -1: no samples.
  The images share each chunk's rung of the ladder (the largest of theirs), so the
  ``lax.switch`` keeps one index; under sharding that is a reduction of ``num_chunks`` ints.
  """
  n, _, _, channels = features.shape
  num_rois = rois.shape[1]
  acc = compute_dtype(features.dtype)
  one_image = (1,) + features.shape[1:]
  layout = _layout(one_image, num_rois, geometry, offsets is not None)
  padding = ~((rois[..., 0] < rois[..., 2]) & (rois[..., 1] < rois[..., 3]))
  rois = jnp.concatenate([jnp.where(padding, -1, 0).astype(rois.dtype)[..., None], rois], axis=-1)

  def plan(rois, offsets):
    return _chunked_plan(layout, rois, offsets, geometry, 1, acc)

  chunked, branch, order = jax.vmap(plan)(rois, offsets)
  branch = branch.max(axis=0)
  out = jax.vmap(lambda f, c: _run(layout, f[None], c, branch))(features, chunked)
  if order is not None:
    out = jax.vmap(lambda o, s: _unsort(o, s, num_rois))(out, order)
  else:
    out = out[:, :num_rois]
  return out.reshape(n, num_rois, *geometry.output_size, channels).astype(features.dtype)
