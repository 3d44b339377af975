"""A small two-stage-style classifier of boxes: a convnet backbone and a RoI head.

The backbone turns a whole canvas into a stride-4 feature map; the head pools every box from it
(7 x 7 bins), then two fully connected layers give the box's feature ``f`` and a dense layer its
10 class logits, as the R-CNN heads of the DCN papers do. What pools the boxes is injected:

* ``"align"``: ``flaxdcn.deform_roi_pool`` without offsets (RoIAlign-style average pooling);
* ``"dpool"``: ``flaxdcn.DeformRoIPool`` (offsets predicted from the plainly pooled box);
* ``"mdpool"``: ``flaxdcn.ModulatedDeformRoIPool`` (offsets and a mask per bin).

The backbone's last 3 x 3 convolution may be injected too (``flaxdcn.ModulatedDeformConv`` for the
DCNv2 paper's "mdconv + mdpool"). Every submodule is named, so the variants share the parameter
tree of the backbone and of ``fc1``, ``fc2`` and ``classifier``; the deformable pools add their
offset (and mask) heads under ``roi_pool``, and the R-CNN branch of feature mimicking its own
classifier ``rcnn_classifier`` (the DCNv2 paper's unshared classification head).

Boxes are per image, flaxdcn's per-image RoI form: ``boxes [N, K, 4]`` as ``(x1, y1, x2, y2)``
in canvas pixels, the image implied by the leading axis, so under a batch-sharded ``jit`` every
device pools the boxes of its own images. A box that is not ``x1 < x2 and y1 < y2`` (e.g. all
zeros) is a padding box: it pools zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import flaxdcn

ModuleDef = Any

#: The feature map is 1/4 of the canvas (two stride-2 convolutions).
STRIDE = 4
POOL_SIZE = (7, 7)
#: Samples per bin and axis: fixed, so every box costs the same (boxes span 3-7 feature pixels).
SAMPLING_RATIO = 2
POOLS = ("align", "dpool", "mdpool")


class Backbone(nn.Module):
  """Five 3 x 3 convolutions with ReLU (16, 32, 32, 48, 48 channels; strides 1, 2, 1, 2, 1).

  Attributes:
    conv: the convolution class of the last layer (any module with ``flax.linen.Conv``'s
      attributes and call).
  """

  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x):
    """Features ``[N, H / 4, W / 4, 48]`` of images ``[N, H, W, 1]`` (NHWC)."""
    for i, (features, stride) in enumerate(((16, 1), (32, 2), (32, 1), (48, 2))):
      x = nn.relu(nn.Conv(features, (3, 3), stride, padding="SAME", name=f"conv{i}")(x))
    return nn.relu(self.conv(48, (3, 3), padding="SAME", name="conv4")(x))


class PlainRoIPool(nn.Module):
  """RoIAlign-style pooling (``flaxdcn.deform_roi_pool`` without offsets); no parameters."""

  output_size: Sequence[int] = POOL_SIZE
  spatial_scale: float = 1.0
  sampling_ratio: int = 0
  implementation: str | None = None

  def __call__(self, features, rois):
    return flaxdcn.deform_roi_pool(features, rois, output_size=self.output_size,
                                   spatial_scale=self.spatial_scale,
                                   sampling_ratio=self.sampling_ratio,
                                   implementation=self.implementation)


def make_pool(name: str, implementation: str | None = None, deform_fc_channels: int = 256
              ) -> ModuleDef:
  """The pooling class of a head (``"align"``, ``"dpool"`` or ``"mdpool"``), configured."""
  common = dict(output_size=POOL_SIZE, spatial_scale=1 / STRIDE, sampling_ratio=SAMPLING_RATIO,
                implementation=implementation)
  if name == "align":
    return partial(PlainRoIPool, **common)
  classes = {"dpool": flaxdcn.DeformRoIPool, "mdpool": flaxdcn.ModulatedDeformRoIPool}
  if name not in classes:
    raise ValueError(f"Unknown pool {name!r}; expected one of {POOLS}.")
  return partial(classes[name], deform_fc_channels=deform_fc_channels, **common)


class BoxClassifier(nn.Module):
  """Backbone, RoI pooling, ``fc1``, ``fc2`` (the box feature ``f``), and a 10-way classifier.

  Attributes:
    pool: the RoI pooling class (see :func:`make_pool`).
    conv: the backbone's last convolution class.
    num_classes: classifier outputs.
    fc_features: width of ``fc1`` and ``fc2``.
  """

  pool: ModuleDef
  conv: ModuleDef = nn.Conv
  num_classes: int = 10
  fc_features: int = 256

  def setup(self):
    self.backbone = Backbone(conv=self.conv)
    self.roi_pool = self.pool()
    self.fc1 = nn.Dense(self.fc_features)
    self.fc2 = nn.Dense(self.fc_features)
    self.classifier = nn.Dense(self.num_classes)
    self.rcnn_classifier = nn.Dense(self.num_classes)

  def box_features(self, images, boxes):
    """``f`` ``[N * K, fc_features]`` of boxes ``[N, K, 4]`` on images ``[N, H, W, 1]``."""
    pooled = self.roi_pool(self.backbone(images), boxes)          # [N, K, oh, ow, C]
    x = nn.relu(self.fc1(pooled.reshape(pooled.shape[0] * pooled.shape[1], -1)))
    return nn.relu(self.fc2(x))

  def __call__(self, images, boxes):
    """Class logits ``[N * K, num_classes]`` of boxes ``[N, K, 4]`` (the RoI branch)."""
    return self.classifier(self.box_features(images, boxes))

  def roi_branch(self, images, boxes):
    """``(f, logits)`` of the RoI branch."""
    f = self.box_features(images, boxes)
    return f, self.classifier(f)

  def rcnn(self, crops):
    """The R-CNN branch: ``(f, logits)`` of crops ``[M, s, s, 1]``, each pooled as one box.

    The same backbone, pooling and ``fc1``/``fc2`` as the RoI branch (shared weights), with its own
    classifier.
    """
    size = crops.shape[1]
    whole = jnp.broadcast_to(jnp.asarray([0.0, 0.0, size, size], crops.dtype),
                             (crops.shape[0], 1, 4))
    f = self.box_features(crops, whole)
    return f, self.rcnn_classifier(f)

  def init_all(self, images, boxes, crops):
    """Both branches (for ``init``: creates every parameter)."""
    return self.roi_branch(images, boxes), self.rcnn(crops)


def crop_boxes(images: jax.Array, boxes: jax.Array, size: int,
               implementation: str | None = None) -> jax.Array:
  """The image inside every box, resized to ``size x size``: ``[N * K, size, size, C]``.

  Bilinear, 2 x 2 samples per output pixel (RoIAlign on the image itself).
  """
  crops = flaxdcn.deform_roi_pool(images, boxes, output_size=(size, size), sampling_ratio=2,
                                  implementation=implementation)
  return crops.reshape((-1,) + crops.shape[2:])
