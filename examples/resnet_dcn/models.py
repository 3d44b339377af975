"""A small ResNet V1 whose convolution class is injected, after flax's ``examples/imagenet``.

The deformable variant is not a second model: the same :class:`ResNet` is handed a deformable
convolution class (``flaxdcn.ModulatedDeformConv``, ``flaxdcn.DeformConv``,
``flaxdcn.GlobalDeformableKernel``, ``flaxdcn.LocalDeformableKernel``, or any module with
``flax.linen.Conv``'s attributes and call) for the 3 x 3 convolutions of chosen stages. The 1 x 1
projections of the shortcuts stay plain convolutions. Every submodule is named, so the baseline
and the deformable model have the same parameter tree except for the deformable layers' own
offset heads (``conv_offset``, or ``fc_offset`` for global Deformable Kernels); a Deformable
Kernels layer's ``kernel`` is also larger (its scope).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any


class ResNetBlock(nn.Module):
  """ResNet basic block.

  Attributes:
    filters: output channels.
    conv: the class of the two 3 x 3 convolutions.
    proj_conv: the class of the 1 x 1 shortcut projection.
    norm: the normalisation class.
    act: the activation.
    strides: strides of the first 3 x 3 convolution and of the projection.
  """

  filters: int
  conv: ModuleDef
  proj_conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, name="conv1")(x)
    y = self.norm(name="norm1")(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), name="conv2")(y)
    y = self.norm(scale_init=nn.initializers.zeros_init(), name="norm2")(y)

    if residual.shape != y.shape:
      residual = self.proj_conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)

    return self.act(residual + y)


class ResNet(nn.Module):
  """ResNet V1 for small images: a 3 x 3 stride-2 stem, stages, global average pool, dense.

  Attributes:
    stage_sizes: blocks per stage; every stage after the first halves the resolution.
    block_cls: the block class.
    num_classes: outputs of the classifier.
    num_filters: channels of the first stage, doubled at every later stage.
    dtype: the computation dtype.
    act: the activation.
    conv: the convolution class of the whole network.
    deform_conv: the convolution class for the 3 x 3 convolutions of ``deform_stages``.
    deform_stages: indices of the stages whose 3 x 3 convolutions are ``deform_conv``.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 16
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv
  deform_conv: ModuleDef | None = None
  deform_stages: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Logits ``[N, num_classes]`` of images ``[N, H, W, C]`` (NHWC)."""
    if self.deform_stages and self.deform_conv is None:
      raise ValueError("deform_stages needs a deform_conv class.")
    conv = partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype)

    x = conv(self.num_filters, (3, 3), (2, 2), padding=((1, 1), (1, 1)), name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = self.act(x)
    for i, block_size in enumerate(self.stage_sizes):
      stage_conv = conv
      if i in self.deform_stages:
        stage_conv = partial(self.deform_conv, use_bias=False, dtype=self.dtype)
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=stage_conv,
                           proj_conv=conv, norm=norm, act=self.act)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, self.dtype)


#: Three stages of one basic block, 16/32/64 channels: 42 x 42 -> 21 -> 21 -> 11 -> 6.
SmallResNet = partial(ResNet, stage_sizes=(1, 1, 1), block_cls=ResNetBlock, num_filters=16)
