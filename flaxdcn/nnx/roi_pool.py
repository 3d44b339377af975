"""Flax NNX modules for deformable RoI pooling (mmcv's ``DeformRoIPoolPack`` heads)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PrecisionLike

from flaxdcn._geometry import pair
from flaxdcn.nnx._common import check_channels
from flaxdcn.ops.roi_pool import deform_roi_pool

Array = jax.Array

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class _DeformRoIPoolBase(nnx.Module):
  """Shared constructor and forward pass of :class:`DeformRoIPool` and
  :class:`ModulatedDeformRoIPool`; subclasses choose whether a mask head is added."""

  modulated = False

  def __init__(
      self,
      in_features: int,
      output_size: int | Sequence[int] = (7, 7),
      *,
      spatial_scale: float = 1.0,
      sampling_ratio: int = 0,
      gamma: float = 0.1,
      deform_fc_channels: int = 1024,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      precision: PrecisionLike = None,
      kernel_init: Initializer = default_kernel_init,
      bias_init: Initializer = default_bias_init,
      implementation: str | None = None,
      deterministic_backward: bool = False,
      rngs: nnx.Rngs,
  ):
    oh, ow = pair(output_size, "output_size", fn=type(self).__name__)
    flat, fc = oh * ow * in_features, deform_fc_channels

    def linear(fan_in: int, fan_out: int, *, last: bool) -> nnx.Linear:
      zeros = nnx.initializers.zeros_init()
      return nnx.Linear(fan_in, fan_out, dtype=dtype, param_dtype=param_dtype,
                        precision=precision, kernel_init=zeros if last else kernel_init,
                        bias_init=zeros if last else bias_init, rngs=rngs)

    # The names keep mmcv's nn.Sequential indices, as the linen modules do.
    self.offset_fc_0 = linear(flat, fc, last=False)
    self.offset_fc_2 = linear(fc, fc, last=False)
    self.offset_fc_4 = linear(fc, oh * ow * 2, last=True)
    if self.modulated:
      self.mask_fc_0 = linear(flat, fc, last=False)
      self.mask_fc_2 = linear(fc, oh * ow, last=True)

    self.in_features = in_features
    self.output_size = (oh, ow)
    self.spatial_scale = spatial_scale
    self.sampling_ratio = sampling_ratio
    self.gamma = gamma
    self.deform_fc_channels = deform_fc_channels
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.implementation = implementation
    self.deterministic_backward = deterministic_backward

  def __call__(self, features: Array, rois: Array) -> Array:
    """Pools every RoI with offsets (and a mask) predicted from its plainly pooled features.

    Args:
      features: ``[N, H, W, in_features]``, channels last.
      rois: ``[R, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or per-image boxes ``[N, Ri, 4]``
        ``(x1, y1, x2, y2)`` (batch partitionable; padding boxes pool zeros, see
        :func:`flaxdcn.deform_roi_pool`), in input-image coordinates.

    Returns:
      ``[R, oh, ow, C]`` (per image ``[N, Ri, oh, ow, C]``) in ``dtype`` (default: the dtype of
      ``features``).
    """
    name = type(self).__name__
    if jnp.ndim(features) != 4:
      raise ValueError(f"{name}: features has shape {jnp.shape(features)}, expected "
                       "[N, H, W, C].")
    check_channels(self, features, self.in_features, name="features")
    oh, ow = self.output_size
    (features,) = dtypes.promote_dtype((features,), dtype=self.dtype)
    pool_kwargs = dict(output_size=(oh, ow), spatial_scale=self.spatial_scale,
                       sampling_ratio=self.sampling_ratio, gamma=self.gamma,
                       implementation=self.implementation,
                       deterministic_backward=self.deterministic_backward)

    pooled = deform_roi_pool(features, rois, **pool_kwargs)
    lead = pooled.shape[:-3]  # (R,) or (N, Ri)
    x = pooled.reshape(lead + (-1,))  # (oh, ow, C) order; mmcv flattens (C, oh, ow)
    h = nnx.relu(self.offset_fc_0(x))
    h = nnx.relu(self.offset_fc_2(h))
    offsets = self.offset_fc_4(h).reshape(lead + (oh, ow, 2)).astype(features.dtype)
    mask = None
    if self.modulated:
      m = self.mask_fc_2(nnx.relu(self.mask_fc_0(x)))
      mask = jax.nn.sigmoid(m).reshape(lead + (oh, ow)).astype(features.dtype)
    return deform_roi_pool(features, rois, offsets, mask, **pool_kwargs)


class DeformRoIPool(_DeformRoIPoolBase):
  """Deformable RoI pooling with its own offset head (mmcv's ``DeformRoIPoolPack``), the NNX
  twin of :class:`flaxdcn.DeformRoIPool`.

  The RoIs are first pooled without offsets; three ``nnx.Linear`` layers on the flattened
  ``[R, oh * ow * C]`` result (``deform_fc_channels``, ReLU, ``deform_fc_channels``, ReLU,
  ``oh * ow * 2``) predict normalised offsets ``[R, oh, ow, 2]`` as ``(dy, dx)``, and the RoIs are
  pooled again with them (see :func:`flaxdcn.deform_roi_pool`). The last layer is
  zero-initialised, so at initialisation the module equals plain (RoIAlign-style) pooling. The
  layers are named as in the linen module (``offset_fc_0``, ``offset_fc_2``, ``offset_fc_4``:
  mmcv's ``nn.Sequential`` indices), whose docstring gives the mmcv checkpoint reorderings.
  Per-image boxes ``[N, Ri, 4]`` work the same way with ``(N, Ri)`` in place of ``R``, and
  partition by batch under sharding.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn.nnx
    >>> layer = flaxdcn.nnx.DeformRoIPool(4, (3, 3), deform_fc_channels=16, rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, flaxdcn.nnx.linen_params(layer))
    {'offset_fc_0': {'bias': (16,), 'kernel': (36, 16)}, 'offset_fc_2': {'bias': (16,), 'kernel': (16, 16)}, 'offset_fc_4': {'bias': (18,), 'kernel': (16, 18)}}
    >>> features = jnp.ones((2, 16, 16, 4))
    >>> rois = jnp.array([[0, 1.0, 2.0, 12.0, 9.0], [1, 0.0, 0.0, 15.0, 15.0]])
    >>> layer(features, rois).shape
    (2, 3, 3, 4)
    >>> boxes = jnp.array([[[1.0, 2.0, 12.0, 9.0]], [[0.0, 0.0, 15.0, 15.0]]])  # per image
    >>> layer(features, boxes).shape
    (2, 1, 3, 3, 4)

  Args:
    in_features: number of feature channels ``C`` (it sizes the first layer,
      ``oh * ow * C -> deform_fc_channels``).
    output_size: ``oh`` and ``ow``: an int or a pair (default ``(7, 7)``).
    spatial_scale: factor from input-image to feature coordinates, e.g. ``1 / 16``.
    sampling_ratio: samples per bin and axis; 0 (default) for ``ceil(roi_size / output_size)``.
    gamma: scale of the offsets (default 0.1).
    deform_fc_channels: width of the hidden layers (default 1024, mmcv's).
    dtype: the dtype of the computation (default: that of ``features``; the linear layers infer
      theirs from their input and parameters, as ``flax.nnx.Linear`` does).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the linear layers (``jax.lax.Precision``).
    kernel_init: initialiser of the hidden layers' kernels (the last layer's is zeros).
    bias_init: initialiser of the hidden layers' biases (the last layer's is zeros).
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.deform_roi_pool`).
    deterministic_backward: bitwise-reproducible native CUDA backward (see
      :func:`flaxdcn.deform_roi_pool`).
    rngs: the random number generators of the parameter initialisers.

  References:
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
  """


class ModulatedDeformRoIPool(_DeformRoIPoolBase):
  """Modulated deformable RoI pooling with offset and mask heads (mmcv's
  ``ModulatedDeformRoIPoolPack``), the NNX twin of :class:`flaxdcn.ModulatedDeformRoIPool`.

  The offset head is :class:`DeformRoIPool`'s. A second head on the same flattened plain pooling
  (``mask_fc_0``: ``deform_fc_channels``, ReLU; ``mask_fc_2``: ``oh * ow``, sigmoid) predicts a
  mask ``[R, oh, ow]`` that multiplies every bin of the deformed pooling. Both last layers are
  zero-initialised, so at initialisation every mask value is sigmoid(0) = 0.5 and the module
  equals 0.5 x plain pooling.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import flaxdcn.nnx
    >>> layer = flaxdcn.nnx.ModulatedDeformRoIPool(4, (3, 3), deform_fc_channels=16,
    ...                                            rngs=nnx.Rngs(0))
    >>> sorted(flaxdcn.nnx.linen_params(layer))
    ['mask_fc_0', 'mask_fc_2', 'offset_fc_0', 'offset_fc_2', 'offset_fc_4']
    >>> layer.mask_fc_2.kernel.shape
    (16, 9)
    >>> features = jnp.ones((2, 16, 16, 4))
    >>> rois = jnp.array([[0, 1.0, 2.0, 12.0, 9.0], [1, 0.0, 0.0, 15.0, 15.0]])
    >>> layer(features, rois).shape
    (2, 3, 3, 4)

  Args:
    in_features: number of feature channels ``C`` (it sizes the first layers,
      ``oh * ow * C -> deform_fc_channels``).
    output_size: ``oh`` and ``ow``: an int or a pair (default ``(7, 7)``).
    spatial_scale: factor from input-image to feature coordinates, e.g. ``1 / 16``.
    sampling_ratio: samples per bin and axis; 0 (default) for ``ceil(roi_size / output_size)``.
    gamma: scale of the offsets (default 0.1).
    deform_fc_channels: width of the hidden layers (default 1024, mmcv's).
    dtype: the dtype of the computation (default: that of ``features``; the linear layers infer
      theirs from their input and parameters, as ``flax.nnx.Linear`` does).
    param_dtype: the dtype of the parameters (default float32).
    precision: precision of the linear layers (``jax.lax.Precision``).
    kernel_init: initialiser of the hidden layers' kernels (the last layers' are zeros).
    bias_init: initialiser of the hidden layers' biases (the last layers' are zeros).
    implementation: ``None``, ``"xla"`` or ``"ffi"`` (see :func:`flaxdcn.deform_roi_pool`).
    deterministic_backward: bitwise-reproducible native CUDA backward (see
      :func:`flaxdcn.deform_roi_pool`).
    rngs: the random number generators of the parameter initialisers.

  References:
    - Zhu et al., `Deformable ConvNets v2: More Deformable, Better Results
      <https://arxiv.org/abs/1811.11168>`_, CVPR 2019.
    - Dai et al., `Deformable Convolutional Networks
      <https://arxiv.org/abs/1703.06211>`_, ICCV 2017.
  """

  modulated = True
