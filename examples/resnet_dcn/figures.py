"""The example's figures: training curves, and the sampling locations of the deformable layers.

``offsets.png`` follows Fig. 5 of Dai et al., "Deformable Convolutional Networks" (2017): for an
activation unit of the top layer, the 3 x 3 sampling points of the last deformable convolution
are each expanded through the previous deformable convolution's own (learned) offsets into its
3 x 3 sampling points: 81 locations in the image that feed the unit through the two stacked
deformable layers. The plain ResNet's locations form the same fixed, regular grid everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

import input_pipeline  # noqa: E402

#: Feature (y, x) of the last stage's *input* (the stage-2 output, 11 x 11) sits on canvas pixel
#: (4y, 4x): the stem and stage 2 each have stride 2, with padding aligned to the top-left pixel.
STAGE_INPUT_STRIDE = 4

#: Digits and transforms drawn in ``offsets.png``: (test digit index, scale, rotation in degrees).
OFFSET_PANELS = ((0, 1.0, 0.0), (0, 0.55, 0.0), (0, 1.5, 0.0), (3, 1.0, 40.0))

COLORS = {"baseline": "tab:blue", "dcn": "tab:red"}


def plot_curves(histories: Mapping[str, Sequence[Mapping[str, float]]],
                path: str | os.PathLike):
  """Training loss and test accuracies (in-distribution and shifted) per epoch for each model."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
  for name, history in histories.items():
    epochs = [r["epoch"] for r in history]
    color = COLORS.get(name)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], color=color, label=f"{name} train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], color=color, ls=":",
                 label=f"{name} test")
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in history], color=color,
                label=f"{name} in-distribution")
    ax_acc.plot(epochs, [100 * r["shifted_test_accuracy"] for r in history], color=color,
                ls="--", label=f"{name} shifted")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
  ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _same_padding_lo(in_size: int, out_size: int, kernel: int, stride: int) -> int:
  return max((out_size - 1) * stride + kernel - in_size, 0) // 2


def _bilinear(field: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """``field`` ``[H, W, ...]`` read at fractional ``(y, x)`` (clamped to the edge)."""
  height, width = field.shape[:2]
  y, x = np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)
  y0 = np.minimum(np.floor(y).astype(int), height - 2) if height > 1 else np.zeros_like(y, int)
  x0 = np.minimum(np.floor(x).astype(int), width - 2) if width > 1 else np.zeros_like(x, int)
  y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
  ly, lx = (y - y0)[..., None, None], (x - x0)[..., None, None]
  return ((1 - ly) * (1 - lx) * field[y0, x0] + (1 - ly) * lx * field[y0, x1]
          + ly * (1 - lx) * field[y1, x0] + ly * lx * field[y1, x1])


def sampling_locations(point: tuple[int, int], layers: Sequence[Mapping[str, Any]]
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Sampling locations of a unit through a chain of stacked deformable convolutions.

  Args:
    point: ``(y, x)`` of the unit in the output of the last layer.
    layers: from the last layer down; each with ``offsets`` ``[Ho, Wo, kh, kw, 2]`` (dy, dx),
      ``mask`` ``[Ho, Wo, kh, kw]``, ``stride`` and ``padding`` (the low pads) as ``(h, w)``. A
      layer's input is the output of the next one in the list.

  Returns:
    One ``(points [..., 2], weight [...])`` per layer, in that layer's input coordinates; the
    points of layer ``l`` have ``l + 1`` axes of ``kh * kw`` (one per layer above), and ``weight``
    is the product of the masks along the way.
  """
  points = np.asarray(point, np.float64)[None]   # [1, 2]: positions in the current output grid
  weight = np.ones(1)
  out = []
  for layer in layers:
    offsets, mask = np.asarray(layer["offsets"]), np.asarray(layer["mask"])
    kh, kw = offsets.shape[2:4]
    grid = np.stack(np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij"), -1).reshape(-1, 2)
    off = _bilinear(offsets.reshape(offsets.shape[:2] + (kh * kw, 2)), points[:, 0], points[:, 1])
    m = _bilinear(mask.reshape(mask.shape[:2] + (kh * kw, 1)), points[:, 0], points[:, 1])[..., 0]
    stride, pad = np.asarray(layer["stride"]), np.asarray(layer["padding"])
    # h = y * stride - pad + i + dy (kernel_dilation 1), for every point and kernel tap.
    points = (points[:, None] * stride - pad + grid[None] + off).reshape(-1, 2)
    weight = (weight[:, None] * m).reshape(-1)
    out.append((points, weight))
  return out


def deformable_layers(model: nn.Module, variables: Mapping[str, Any], images: jax.Array
                      ) -> list[list[dict[str, Any]]]:
  """Offsets and masks of the deformable convolutions of the model's last block, per image.

  They are read from what ``flaxdcn.DeformConv`` and ``flaxdcn.ModulatedDeformConv`` sow into the
  ``"intermediates"`` collection: ``offsets`` ``[N, Ho, Wo, kh * kw * 2]`` (channel order
  ``(i, j, (dy, dx))``) and, for DCNv2, the ``mask`` ``[N, Ho, Wo, kh * kw]`` (after its sigmoid).
  A DCNv1 layer counts as a mask of ones.

  Args:
    model: the deformable model (its last block's 3 x 3 convolutions deformable, one offset group).
    variables: its ``params`` and ``batch_stats``.
    images: ``[N, H, W, 1]``.

  Returns:
    ``layers[n]``: the deformable layers of image ``n``, last one first, in the format of
    :func:`sampling_locations`.
  """
  apply = jax.jit(partial(model.apply, train=False, mutable=["intermediates"]))
  _, state = apply(variables, images)
  sown = state["intermediates"]
  block = max(sown, key=lambda name: int(name.rsplit("_", 1)[-1]))   # ResNetBlock_<i>: the last
  in_size = -(-images.shape[1] // STAGE_INPUT_STRIDE)   # The block's input: 42 -> 21 -> 21 -> 11.
  layers = []
  for conv in ("conv1", "conv2"):
    offsets = np.asarray(sown[block][conv]["offsets"][0])
    n, ho, wo, channels = offsets.shape
    kh, kw = variables["params"][block][conv]["kernel"].shape[:2]
    if channels != kh * kw * 2:
      raise ValueError(f"{block}/{conv} predicts {channels} offset channels; the figure draws "
                       f"one offset group of {kh} x {kw} taps ({kh * kw * 2} channels).")
    mask = (np.asarray(sown[block][conv]["mask"][0]) if "mask" in sown[block][conv]
            else np.ones((n, ho, wo, kh * kw), offsets.dtype))
    stride = 2 if conv == "conv1" else 1
    pad = _same_padding_lo(in_size, ho, kh, stride)
    layers.append({"offsets": offsets.reshape(n, ho, wo, kh, kw, 2),
                   "mask": mask.reshape(n, ho, wo, kh, kw), "stride": (stride, stride),
                   "padding": (pad, pad)})
    in_size = ho
  return [[{**layer, "offsets": layer["offsets"][i], "mask": layer["mask"][i]}
           for layer in reversed(layers)] for i in range(len(images))]


def _unit_on_digit(image: np.ndarray, top_size: tuple[int, int]) -> tuple[int, int]:
  """The top-layer unit closest to the digit's centre of ink (``image`` ``[H, W, 1]``)."""
  ink = image[..., 0] / image.sum()
  rows, cols = np.arange(image.shape[0]), np.arange(image.shape[1])
  centroid = np.asarray([np.sum(ink * rows[:, None]), np.sum(ink * cols[None, :])])
  unit = np.round(centroid / (2 * STAGE_INPUT_STRIDE)).astype(int)
  return tuple(np.clip(unit, 0, np.asarray(top_size) - 1))


def _regular(chain: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The same chain with zero offsets and unit masks: a plain convolution's sampling grid."""
  return [{**layer, "offsets": np.zeros_like(layer["offsets"]),
           "mask": np.ones_like(layer["mask"])} for layer in chain]


def _spread(unit: tuple[int, int], chain: Sequence[Mapping[str, Any]]) -> float:
  """Mean distance in pixels of the unit's 81 sampling locations from the unit."""
  _, (points, _) = sampling_locations(unit, chain)
  return float(np.mean(np.linalg.norm(points * STAGE_INPUT_STRIDE
                                      - np.asarray(unit) * 2 * STAGE_INPUT_STRIDE, axis=-1)))


def sampling_spread(model: nn.Module, variables: Mapping[str, Any], digits: np.ndarray,
                    scales: Sequence[float]) -> tuple[np.ndarray, float]:
  """Mean spread of the 81 sampling locations of the on-digit unit, per digit scale.

  Args:
    model, variables: the deformable model.
    digits: ``[N, 28, 28]``, drawn upright and centred at every scale.
    scales: the digit scales.

  Returns:
    The deformable model's mean spread per scale (pixels), and the plain convolution's.
  """
  n, scales = len(digits), np.asarray(scales, np.float32)
  images = input_pipeline.warp(jnp.tile(jnp.asarray(digits), (len(scales), 1, 1)),
                               jnp.repeat(jnp.asarray(scales), n), jnp.zeros(n * len(scales)),
                               jnp.zeros((n * len(scales), 2)))
  layers = deformable_layers(model, variables, images)
  top_size = layers[0][0]["offsets"].shape[:2]
  units = [_unit_on_digit(image, top_size) for image in np.asarray(images)]
  spreads = np.asarray([_spread(u, chain) for u, chain in zip(units, layers)])
  regular = _spread(units[0], _regular(layers[0]))
  return spreads.reshape(len(scales), n).mean(axis=1), regular


def plot_offsets(model: nn.Module, variables: Mapping[str, Any], digits: np.ndarray,
                 path: str | os.PathLike,
                 panels: Sequence[tuple[int, float, float]] = OFFSET_PANELS,
                 spread_digits: int = 64):
  """Draws the 81 sampling locations of one top-layer unit over a few deformed test digits.

  Top row: the plain ResNet (regular grid); bottom row: the deformable model's learned locations,
  shaded by the product of the DCNv2 masks. A last panel shows how far the locations spread
  (mean distance from the unit) as the digit scale changes, over ``spread_digits`` test digits.

  Args:
    model: the deformable model (its last block's 3 x 3 convolutions deformable).
    variables: its ``params`` and ``batch_stats``.
    digits: test digits ``[N, 28, 28]``.
    path: the PNG to write.
    panels: ``(digit index, scale, rotation in degrees)`` per column.
    spread_digits: how many test digits the spread panel averages over.
  """
  index = np.asarray([p[0] for p in panels]) % len(digits)
  images = input_pipeline.warp(
      jnp.asarray(digits[index]), scale=jnp.asarray([p[1] for p in panels], jnp.float32),
      angle=jnp.deg2rad(jnp.asarray([p[2] for p in panels], jnp.float32)),
      shift=jnp.zeros((len(panels), 2)))
  layers = deformable_layers(model, variables, images)

  fig = plt.figure(figsize=(2.1 * len(panels) + 3.2, 4.6), dpi=80)
  grid = fig.add_gridspec(2, len(panels) + 1, width_ratios=[1] * len(panels) + [1.5])
  size = images.shape[1]
  grid_stride = 2 * STAGE_INPUT_STRIDE
  for col, (image, chain) in enumerate(zip(np.asarray(images), layers)):
    unit = _unit_on_digit(image, chain[0]["offsets"].shape[:2])
    for row, rows_chain in enumerate((_regular(chain), chain)):
      ax = fig.add_subplot(grid[row, col])
      ax.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1.6,
                extent=(-0.5, size - 0.5, size - 0.5, -0.5))
      (mid, _), (points, weight) = sampling_locations(unit, rows_chain)
      colors = np.tile(matplotlib.colors.to_rgba("tab:red"), (len(weight), 1))
      colors[:, 3] = 0.25 + 0.75 * weight / max(weight.max(), 1e-6)
      points = points * STAGE_INPUT_STRIDE
      ax.scatter(points[:, 1], points[:, 0], s=9, c=colors, linewidths=0)
      ax.scatter(mid[:, 1] * grid_stride, mid[:, 0] * grid_stride, s=14, facecolors="none",
                 edgecolors="tab:orange", linewidths=0.8)
      ax.scatter([unit[1] * grid_stride], [unit[0] * grid_stride], s=70, marker="*",
                 c="tab:green", edgecolors="white", linewidths=0.5)
      ax.set(xlim=(-0.5, size - 0.5), ylim=(size - 0.5, -0.5), xticks=[], yticks=[])
      if row == 0:
        scale, angle = panels[col][1:]
        ax.set_title(f"scale {scale:g}, {angle:g}°", fontsize=9)
      if col == 0:
        ax.set_ylabel("plain conv" if row == 0 else "deformable", fontsize=9)

  scales = np.linspace(0.5, 1.6, 12)
  spreads, regular = sampling_spread(model, variables, digits[:spread_digits], scales)
  ax = fig.add_subplot(grid[:, -1])
  lo, hi = input_pipeline.TRAIN_RANGE.scales[0]
  ax.axvspan(lo, hi, color="0.9", label="training scales")
  ax.plot(scales, spreads, "o-", color=COLORS["dcn"], ms=3, label="deformable")
  ax.axhline(regular, color=COLORS["baseline"], label="plain conv")
  ax.set(xlabel="digit scale", ylabel="mean distance from the unit (px)",
         title="spread of the 81 samples", ylim=(0, None))
  ax.title.set_fontsize(9)
  ax.legend(fontsize=7, loc="lower right")
  ax.grid(alpha=0.3)
  fig.suptitle("green: top-layer unit; orange: its 9 samples in the last layer; "
               "red: their 81 samples in the layer below", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
