"""Flax linen modules for deformable RoI pooling (mmcv's ``DeformRoIPoolPack`` heads)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import Dtype, Initializer, PrecisionLike

from flaxdcn._geometry import pair
from flaxdcn.ops.roi_pool import deform_roi_pool

Array = jax.Array

default_kernel_init = nn.initializers.lecun_normal()


class _DeformRoIPoolBase(nn.Module):
  """Shared attributes and forward pass of :class:`DeformRoIPool` and
  :class:`ModulatedDeformRoIPool`; subclasses choose whether a mask head is added."""

  output_size: int | Sequence[int] = (7, 7)
  spatial_scale: float = 1.0
  sampling_ratio: int = 0
  gamma: float = 0.1
  deform_fc_channels: int = 1024
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  implementation: str | None = None
  deterministic_backward: bool = False

  modulated = False

  def _dense(self, features: int, name: str, *, last: bool) -> nn.Dense:
    zeros = nn.initializers.zeros_init()
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                    precision=self.precision, kernel_init=zeros if last else self.kernel_init,
                    bias_init=zeros if last else self.bias_init, name=name)

  @nn.compact
  def __call__(self, features: Array, rois: Array) -> Array:
    """Pools every RoI with offsets (and a mask) predicted from its plainly pooled features.

    Args:
      features: ``[N, H, W, C]``, channels last.
      rois: ``[R, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or per-image boxes ``[N, Ri, 4]``
        ``(x1, y1, x2, y2)`` (batch partitionable; padding boxes pool zeros, see
        :func:`flaxdcn.deform_roi_pool`), in input-image coordinates.

    Returns:
      ``[R, oh, ow, C]`` (per image ``[N, Ri, oh, ow, C]``) in ``dtype`` (default: the dtype of
      ``features``).
    """
    name = type(self).__name__
    oh, ow = pair(self.output_size, "output_size", fn=name)
    if jnp.ndim(features) != 4:
      raise ValueError(f"{name}: features has shape {jnp.shape(features)}, expected "
                       "[N, H, W, C].")
    (features,) = promote_dtype(features, dtype=self.dtype)
    pool_kwargs = dict(output_size=(oh, ow), spatial_scale=self.spatial_scale,
                       sampling_ratio=self.sampling_ratio, gamma=self.gamma,
                       implementation=self.implementation,
                       deterministic_backward=self.deterministic_backward)

    pooled = deform_roi_pool(features, rois, **pool_kwargs)
    lead = pooled.shape[:-3]  # (R,) or (N, Ri)
    x = pooled.reshape(*lead, -1)  # (oh, ow, C) order; mmcv flattens (C, oh, ow)
    h = nn.relu(self._dense(self.deform_fc_channels, "offset_fc_0", last=False)(x))
    h = nn.relu(self._dense(self.deform_fc_channels, "offset_fc_2", last=False)(h))
    offsets = self._dense(oh * ow * 2, "offset_fc_4", last=True)(h)
    offsets = offsets.reshape(*lead, oh, ow, 2).astype(features.dtype)
    mask = None
    if self.modulated:
      m = nn.relu(self._dense(self.deform_fc_channels, "mask_fc_0", last=False)(x))
      m = self._dense(oh * ow, "mask_fc_2", last=True)(m)
      mask = jax.nn.sigmoid(m).reshape(*lead, oh, ow).astype(features.dtype)
    return deform_roi_pool(features, rois, offsets, mask, **pool_kwargs)


class DeformRoIPool(_DeformRoIPoolBase):
  """Deformable RoI pooling with its own offset head (mmcv's ``DeformRoIPoolPack``).

  The RoIs are first pooled without offsets; three fully connected layers on the flattened
  ``[R, oh * ow * C]`` result (``deform_fc_channels``, ReLU, ``deform_fc_channels``, ReLU,
  ``oh * ow * 2``) predict normalised offsets ``[R, oh, ow, 2]`` as ``(dy, dx)``, and the RoIs are
  pooled again with them (see :func:`flaxdcn.deform_roi_pool`). The last layer is
  zero-initialised, so at initialisation the module equals plain (RoIAlign-style) pooling.

  Shapes use these letters: ``N`` batch, ``H, W`` feature size, ``C`` channels, ``R`` RoIs,
  ``oh, ow`` output size. Per-image boxes ``[N, Ri, 4]`` work the same way with ``(N, Ri)`` in
  place of ``R``, and partition by batch under sharding.

  Converting an mmcv checkpoint: sub-modules keep mmcv's ``nn.Sequential`` indices
  (``offset_fc.0.weight`` -> ``offset_fc_0/kernel``, ...); kernels are the transposed
  ``Linear.weight`` with two reorderings (``fc = deform_fc_channels``)::

    # mmcv flattens the pooled RoI as (C, oh, ow), flaxdcn as (oh, ow, C): permute the input
    # rows of the first layer.
    kernel_0 = weight_0.reshape(fc, C, oh, ow).transpose(2, 3, 1, 0).reshape(oh * ow * C, fc)
    # mmcv's offsets are [R, 2, oh, ow] with channel 0 = dx; flaxdcn's are [R, oh, ow, 2] as
    # (dy, dx): reorder the outputs of the last layer (weight and bias alike).
    kernel_4 = weight_4.reshape(2, oh, ow, fc)[::-1].transpose(1, 2, 0, 3).reshape(-1, fc).T
    bias_4 = bias_4.reshape(2, oh, ow)[::-1].transpose(1, 2, 0).reshape(-1)

  ``offset_fc.2`` is a plain transpose. mmcv's Pack modules take ``output_channels`` to size the
  first layer; here it is inferred from ``features``.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> layer = flaxdcn.DeformRoIPool(output_size=(3, 3), deform_fc_channels=16)
    >>> features = jnp.ones((2, 16, 16, 4))
    >>> rois = jnp.array([[0, 1.0, 2.0, 12.0, 9.0], [1, 0.0, 0.0, 15.0, 15.0]])
    >>> variables = layer.init(jax.random.key(0), features, rois)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'offset_fc_0': {'bias': (16,), 'kernel': (36, 16)}, 'offset_fc_2': {'bias': (16,), 'kernel': (16, 16)}, 'offset_fc_4': {'bias': (18,), 'kernel': (16, 18)}}}
    >>> layer.apply(variables, features, rois).shape
    (2, 3, 3, 4)
    >>> boxes = jnp.array([[[1.0, 2.0, 12.0, 9.0]], [[0.0, 0.0, 15.0, 15.0]]])  # per image
    >>> layer.apply(variables, features, boxes).shape
    (2, 1, 3, 3, 4)

  Attributes:
    output_size: ``oh`` and ``ow``: an int or a pair (default ``(7, 7)``).
    spatial_scale: factor from input-image to feature coordinates, e.g. ``1 / 16``.
    sampling_ratio: samples per bin and axis; 0 (default) for ``ceil(roi_size / output_size)``.
    gamma: scale of the offsets (default 0.1).
    deform_fc_channels: width of the hidden fully connected layers (default 1024, mmcv's).
    dtype: the dtype of the computation (default: that of ``features``; the fully connected
      layers infer theirs from their input and parameters, as ``flax.linen.Dense`` does).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the fully connected layers (``jax.lax.Precision``).
    kernel_init: initialiser of the hidden layers' kernels (the last layer's is zeros).
    bias_init: initialiser of the hidden layers' biases (the last layer's is zeros).
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.deform_roi_pool`).
    deterministic_backward: bitwise-reproducible native CUDA backward (see
      :func:`flaxdcn.deform_roi_pool`).

  References:
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
  """


class ModulatedDeformRoIPool(_DeformRoIPoolBase):
  """Modulated deformable RoI pooling with offset and mask heads (mmcv's
  ``ModulatedDeformRoIPoolPack``).

  The offset head is :class:`DeformRoIPool`'s. A second head on the same flattened plain pooling
  (``deform_fc_channels``, ReLU, ``oh * ow``, sigmoid) predicts a mask ``[R, oh, ow]`` that
  multiplies every bin of the deformed pooling. Both last layers are zero-initialised, so at
  initialisation every mask value is sigmoid(0) = 0.5 and the module equals 0.5 x plain pooling.

  Shapes use these letters: ``N`` batch, ``H, W`` feature size, ``C`` channels, ``R`` RoIs,
  ``oh, ow`` output size.

  Converting an mmcv checkpoint: the offset head as for :class:`DeformRoIPool`; ``mask_fc.0``
  gets the same input-row permutation as ``offset_fc.0``
  (``weight.reshape(fc, C, oh, ow).transpose(2, 3, 1, 0).reshape(oh * ow * C, fc)``) and
  ``mask_fc.2`` is a plain transpose (its outputs are in (oh, ow) order in both).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> layer = flaxdcn.ModulatedDeformRoIPool(output_size=(3, 3), deform_fc_channels=16)
    >>> features = jnp.ones((2, 16, 16, 4))
    >>> rois = jnp.array([[0, 1.0, 2.0, 12.0, 9.0], [1, 0.0, 0.0, 15.0, 15.0]])
    >>> variables = layer.init(jax.random.key(0), features, rois)
    >>> sorted(variables["params"])
    ['mask_fc_0', 'mask_fc_2', 'offset_fc_0', 'offset_fc_2', 'offset_fc_4']
    >>> variables["params"]["mask_fc_2"]["kernel"].shape
    (16, 9)
    >>> layer.apply(variables, features, rois).shape
    (2, 3, 3, 4)

  Attributes:
    output_size: ``oh`` and ``ow``: an int or a pair (default ``(7, 7)``).
    spatial_scale: factor from input-image to feature coordinates, e.g. ``1 / 16``.
    sampling_ratio: samples per bin and axis; 0 (default) for ``ceil(roi_size / output_size)``.
    gamma: scale of the offsets (default 0.1).
    deform_fc_channels: width of the hidden fully connected layers (default 1024, mmcv's).
    dtype: the dtype of the computation (default: that of ``features``; the fully connected
      layers infer theirs from their input and parameters, as ``flax.linen.Dense`` does).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the fully connected layers (``jax.lax.Precision``).
    kernel_init: initialiser of the hidden layers' kernels (the last layers' are zeros).
    bias_init: initialiser of the hidden layers' biases (the last layers' are zeros).
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.deform_roi_pool`).
    deterministic_backward: bitwise-reproducible native CUDA backward (see
      :func:`flaxdcn.deform_roi_pool`).

  References:
    - Zhu et al., `Deformable ConvNets v2: More Deformable, Better Results
      <https://arxiv.org/abs/1811.11168>`_, CVPR 2019.
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
  """

  modulated = True
