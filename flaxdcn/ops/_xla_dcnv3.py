"""Pure-jnp DCNv3/DCNv4 (``implementation="xla"``): DCN's deformable sampling, summed over points.

DCNv3 is DCN's sampling with one offset group per DCNv3 group and no kernel GEMM. This file
folds DCNv3's conventions into DCN offsets, so the sampling (and its custom VJP) is the one of
``_xla_conv``:

- DCN reads kernel row ``r`` at ``y * sh - ph + r * dh + dy'``; DCNv3 at
  ``y * sh - ph + c_h + (r * dh - c_h + dy) * s``. Hence ``dy' = (r * dh - c_h) * (s - 1) + dy * s``
  (the same for ``x``).
- Points run column-major in DCNv3 (``p = i * kh + j``, ``i`` the column) and row-major in DCN;
  offset pairs are ``(dx, dy)`` in DCNv3 and ``(dy, dx)`` in DCN.
- ``remove_center`` drops the centre point: it is put back with mask 0, so it adds nothing and
  its (discarded) gradient never reaches the caller.

Memory: the sampling materialises DCN's columns ``[N, Ho, Wo, kh * kw, C]`` (``kh * kw`` times
the output) in the data dtype, plus the bilinear plan (int32 corner indices and float32 weights,
``[N, Ho, Wo, kh * kw, G, 4]`` each) and a one-pixel padded copy of the input. The backward holds
the columns' cotangent (the output cotangent broadcast over the points, the same size as the
columns) and works through the scatter in chunks of positions. The native kernels need none of
these: they sum over the points as they sample.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from flaxdcn._geometry import ConvGeometry, Dcnv3Geometry, compute_dtype
from flaxdcn.ops import _xla_conv

#: ``im2col(inputs, offsets, mask, conv_geometry) -> columns [N, Ho, Wo, K, C]`` in DCN layout.
Im2col = Callable[[jax.Array, jax.Array, jax.Array, ConvGeometry], jax.Array]


def dcn_offsets_and_mask(offsets: jax.Array, mask: jax.Array, geometry: Dcnv3Geometry
                         ) -> tuple[jax.Array, jax.Array]:
  """DCNv3 offsets ``[N, Ho, Wo, G * P * 2]`` ``(g, p, (dx, dy))`` and mask ``[N, Ho, Wo, G * P]``
  as DCN's offsets ``[N, Ho, Wo, G * K * 2]`` ``(g, r, c, (dy, dx))`` and mask ``[N, Ho, Wo, G * K]``
  (``K = kh * kw``, ``r`` the kernel row), in the compute dtype."""
  # Reshapes split or merge one group of non-batch axes: explicit sharding types them unchanged.
  n, ho, wo, _ = offsets.shape
  conv = geometry.conv
  (kh, kw), (dh, dw), groups = conv.kernel_size, conv.dilation, geometry.groups
  c_h, c_w = geometry.center
  cdt = compute_dtype(offsets.dtype)
  s = jnp.asarray(geometry.offset_scale, cdt)
  off = offsets.reshape(n, ho, wo, groups * geometry.num_points * 2).reshape(
      n, ho, wo, groups, geometry.num_points, 2).astype(cdt)
  msk = mask.reshape(n, ho, wo, groups, geometry.num_points).astype(cdt)
  if geometry.remove_center:
    centre = kh * kw // 2  # (kw // 2) * kh + kh // 2 for odd kh, kw
    off = jnp.concatenate([off[..., :centre, :], jnp.zeros_like(off[..., :1, :]),
                           off[..., centre:, :]], axis=-2)
    msk = jnp.concatenate([msk[..., :centre], jnp.zeros_like(msk[..., :1]), msk[..., centre:]],
                          axis=-1)
  # Column-major points p = i * kh + j -> [.., kw, kh] -> DCN's row-major [.., kh, kw].
  off = jnp.swapaxes(off.reshape(n, ho, wo, groups, kw, kh, 2), 4, 5)
  msk = jnp.swapaxes(msk.reshape(n, ho, wo, groups, kw, kh), 4, 5)
  rows = (jnp.arange(kh) * dh - c_h).astype(cdt)[:, None]   # [kh, 1]
  cols = (jnp.arange(kw) * dw - c_w).astype(cdt)[None, :]   # [1, kw]
  dy = rows * (s - 1) + off[..., 1] * s
  dx = cols * (s - 1) + off[..., 0] * s
  dcn = jnp.stack([dy, dx], axis=-1)
  k = kh * kw
  dcn = dcn.reshape(n, ho, wo, groups, k, 2).reshape(n, ho, wo, groups * k * 2)
  msk = msk.reshape(n, ho, wo, groups, k).reshape(n, ho, wo, groups * k)
  return dcn, msk


def split_offset_mask(offset_mask: jax.Array, geometry: Dcnv3Geometry
                      ) -> tuple[jax.Array, jax.Array]:
  """DCNv4's ``offset_mask [N, Ho, Wo, D]`` (group ``g`` at ``[g * 3P, (g + 1) * 3P)``: its ``2P``
  offsets ``(p, (dx, dy))``, then its ``P`` mask values; channels past ``3GP`` unused) as DCNv3's
  ``offsets [N, Ho, Wo, G * P * 2]`` and ``mask [N, Ho, Wo, G * P]``."""
  n, ho, wo, _ = offset_mask.shape
  groups, points = geometry.groups, geometry.num_points
  used = offset_mask[..., :groups * points * 3].reshape(n, ho, wo, groups, points * 3)
  offsets = used[..., :points * 2].reshape(n, ho, wo, groups * points * 2)
  mask = used[..., points * 2:].reshape(n, ho, wo, groups * points)
  return offsets, mask


def dcnv3(inputs: jax.Array, offsets: jax.Array, mask: jax.Array, geometry: Dcnv3Geometry,
          im2col: Im2col = _xla_conv.deform_im2col) -> jax.Array:
  """``[N, H, W, C]`` -> ``[N, Ho, Wo, C]`` (arguments checked, one dtype): DCN columns from
  ``im2col`` summed over the kernel points in the compute dtype. ``im2col`` gets the DCN offsets
  and mask in the compute dtype (float32 for half types: no rounding of the folded offsets)."""
  dcn_offsets, dcn_mask = dcn_offsets_and_mask(offsets, mask, geometry)
  dtype = inputs.dtype
  columns = im2col(inputs, dcn_offsets, dcn_mask, geometry.conv)
  return jnp.sum(columns.astype(compute_dtype(dtype)), axis=3).astype(dtype)


def dcnv4(inputs: jax.Array, offset_mask: jax.Array, geometry: Dcnv3Geometry,
          im2col: Im2col = _xla_conv.deform_im2col) -> jax.Array:
  """DCNv4: :func:`dcnv3` on the offsets and mask of ``offset_mask``."""
  offsets, mask = split_offset_mask(offset_mask, geometry)
  return dcnv3(inputs, offsets, mask, geometry, im2col)
