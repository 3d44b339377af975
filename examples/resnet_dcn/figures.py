"""The example's figures: training curves, and the sampling locations of the deformable layers.

``offsets.png`` follows Fig. 5 of Dai et al., "Deformable Convolutional Networks" (2017): for an
activation unit of the top layer, the 3 x 3 sampling points of the last deformable convolution
are each expanded through the previous deformable convolution's own (learned) offsets into its
3 x 3 sampling points: 81 locations in the image that feed the unit through the two stacked
deformable layers. The plain ResNet's locations form the same fixed, regular grid everywhere.

``erf.png`` shows the effective receptive field (ERF) that the Deformable Kernels paper (Gao et
al., 2019) and the DCNv2 paper analyse: the gradient of a top-layer unit with respect to the input
pixels, ``|d unit / d image|``, averaged over test digits drawn at several scales, for every model
of the run. Its spread is summarised by the ERF radius, the square root of the second moment of
``|grad|`` about its centroid, and by the slope of that radius against the digit scale.
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

#: Digit scales of ``erf.png`` (the shifted test set's extremes are 0.5 and 1.6).
ERF_SCALES = (0.55, 1.0, 1.5)
#: The top-layer unit whose ERF is drawn: (y, x) in the last stage's 6 x 6 output, canvas pixel
#: (8y, 8x). The digits are drawn centred on it.
ERF_UNIT = (3, 3)


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


def effective_receptive_field(model: nn.Module, variables: Mapping[str, Any], digits: np.ndarray,
                              scales: Sequence[float] = ERF_SCALES, unit: tuple[int, int] = ERF_UNIT
                              ) -> tuple[np.ndarray, np.ndarray]:
  """The mean ERF of a top-layer unit over ``digits`` at each scale, and its radius.

  Each digit is drawn upright at each scale, centred on the unit's canvas pixel. The unit is the
  sum over channels of the last ResNet block's output at ``unit`` (read with
  ``capture_intermediates``, in evaluation mode); its ERF is ``|d unit / d image|``, normalised to
  sum to 1 per image, then averaged over the digits.

  Args:
    model, variables: a model of the example and its ``params`` and ``batch_stats``.
    digits: ``[N, 28, 28]``.
    scales: the digit scales.
    unit: ``(y, x)`` in the top layer.

  Returns:
    ``maps [len(scales), H, W]`` (each sums to 1) and ``radius [len(scales)]`` in pixels: the
    square root of the second moment of each map about its centroid.
  """
  n = len(digits)
  scale = np.repeat(np.asarray(scales, np.float32), n)
  centre = (input_pipeline.CANVAS_SIZE - 1) / 2
  shift = np.tile(np.asarray(unit, np.float32) * 2 * STAGE_INPUT_STRIDE - centre, (len(scale), 1))
  images = input_pipeline.warp(jnp.tile(jnp.asarray(digits), (len(scales), 1, 1)),
                               jnp.asarray(scale), jnp.zeros(len(scale)), jnp.asarray(shift))

  def unit_activation(image):
    _, state = model.apply(variables, image[None], train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    blocks = [k for k in state["intermediates"] if k.startswith("ResNetBlock_")]
    top = state["intermediates"][max(blocks, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    return jnp.sum(top["__call__"][0][0, unit[0], unit[1]])

  grads = jnp.abs(jax.jit(jax.vmap(jax.grad(unit_activation)))(images)[..., 0])
  grads = grads / jnp.maximum(jnp.sum(grads, axis=(1, 2), keepdims=True), 1e-30)
  maps = np.asarray(grads).reshape(len(scales), n, *grads.shape[1:]).mean(axis=1)
  return maps, np.asarray([erf_radius(m) for m in maps])


def erf_radius(erf: np.ndarray) -> float:
  """Square root of the second moment of a non-negative map ``[H, W]`` about its centroid."""
  weight = erf / erf.sum()
  rows, cols = np.meshgrid(np.arange(erf.shape[0]), np.arange(erf.shape[1]), indexing="ij")
  cy, cx = np.sum(weight * rows), np.sum(weight * cols)
  return float(np.sqrt(np.sum(weight * ((rows - cy) ** 2 + (cols - cx) ** 2))))


def erf_slope(scales: Sequence[float], radius: Sequence[float]) -> float:
  """Least-squares slope of the ERF radius (pixels) against the digit scale."""
  return float(np.polyfit(np.asarray(scales, np.float64), np.asarray(radius, np.float64), 1)[0])


def plot_erf(erfs: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
             scales: Sequence[float] = ERF_SCALES, digits: np.ndarray | None = None):
  """Draws the mean ERF maps per model (rows) and scale (columns), and radius against scale.

  Args:
    erfs: ``{label: (maps, radius)}`` from :func:`effective_receptive_field`.
    path: the PNG to write.
    scales: the scales of the maps.
    digits: optionally one digit ``[1, 28, 28]`` whose outline is drawn over each map.
  """
  names = list(erfs)
  fig = plt.figure(figsize=(2.2 * len(scales) + 3.4, 2.2 * len(names) + 0.6), dpi=80)
  grid = fig.add_gridspec(len(names), len(scales) + 1, width_ratios=[1] * len(scales) + [1.6])
  size = input_pipeline.CANVAS_SIZE
  unit = np.asarray(ERF_UNIT) * 2 * STAGE_INPUT_STRIDE
  outlines = None
  if digits is not None:
    outlines = np.asarray(input_pipeline.warp(
        jnp.repeat(jnp.asarray(digits[:1]), len(scales), 0), jnp.asarray(scales, jnp.float32),
        jnp.zeros(len(scales)), jnp.tile(jnp.asarray(unit - (size - 1) / 2, jnp.float32),
                                         (len(scales), 1))))[..., 0]
  for row, name in enumerate(names):
    maps, radius = erfs[name]
    for col, scale in enumerate(scales):
      ax = fig.add_subplot(grid[row, col])
      ax.imshow(maps[col] / maps[col].max(), cmap="magma", vmin=0, vmax=1)
      if outlines is not None:
        ax.contour(outlines[col], levels=[0.3], colors="cyan", linewidths=0.6)
      ax.add_patch(plt.Circle((unit[1], unit[0]), radius[col], fill=False, ec="white", lw=0.8,
                              ls="--"))
      ax.set(xticks=[], yticks=[])
      ax.set_title(f"scale {scale:g}: r = {radius[col]:.1f} px", fontsize=8)
      if col == 0:
        ax.set_ylabel(name, fontsize=9)
  ax = fig.add_subplot(grid[:, -1])
  for i, name in enumerate(names):
    radius = erfs[name][1]
    color = COLORS.get(name.split(" ")[0], f"C{i + 2}")
    ax.plot(scales, radius, "o-", color=color,
            label=f"{name}: {erf_slope(scales, radius):+.1f} px / scale")
  ax.set(xlabel="digit scale", ylabel="ERF radius (px)", title="ERF radius against digit scale")
  ax.title.set_fontsize(9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.suptitle("mean |d unit / d image| of a top-layer unit (the digit is centred on it); "
               "dashed: the ERF radius", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
