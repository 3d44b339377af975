"""``rois.png``: the bins of deformable RoI pooling on test boxes (after Fig. 6 of the DCN paper).

For a few misaligned test boxes, the top row draws the 7 x 7 bins of plain RoI pooling (the box
cut into a regular grid) and the bottom row the same bins moved by the offsets that the model's
deformable pooling predicts for that box, each filled with a strength given by its mask value
(modulated pooling; relative to the box's largest mask value; 1 for ``DeformRoIPool``). The
offsets and masks are read with ``capture_intermediates``: the outputs of the pool's last offset
layer (``offset_fc_4``) and mask layer (``mask_fc_2``, before its sigmoid).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

import detector  # noqa: E402

#: (canvas index, box index) of the test boxes drawn.
PANELS = ((0, 0), (1, 2), (2, 1), (3, 3), (4, 0))


def deformed_bins(model: nn.Module, params: Mapping[str, Any], images: np.ndarray,
                  boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Offsets ``[N * K, oh, ow, 2]`` (normalised ``(dy, dx)``) and mask ``[N * K, oh, ow]`` that
  the model's deformable pooling applies to ``boxes`` ``[N, K, 4]`` on ``images``."""
  oh, ow = detector.POOL_SIZE
  _, state = model.apply({"params": params}, jnp.asarray(images), jnp.asarray(boxes),
                         capture_intermediates=True, mutable=["intermediates"])
  pool = state["intermediates"]["roi_pool"]
  if "offset_fc_4" not in pool:
    raise ValueError("The model's RoI pooling has no offset head (plain RoIAlign).")
  offsets = np.asarray(pool["offset_fc_4"]["__call__"][0]).reshape(-1, oh, ow, 2)
  if "mask_fc_2" in pool:
    mask = np.asarray(jax.nn.sigmoid(pool["mask_fc_2"]["__call__"][0])).reshape(-1, oh, ow)
  else:
    mask = np.ones(offsets.shape[:3], offsets.dtype)
  return offsets, mask


def bin_corners(box: np.ndarray, offsets: np.ndarray | None, gamma: float
                ) -> np.ndarray:
  """Top-left corners ``[oh, ow, 2]`` as ``(y, x)`` in canvas pixels of the bins of ``box``
  ``(x1, y1, x2, y2)``, moved by ``gamma * (h * dy, w * dx)`` when ``offsets`` is given."""
  oh, ow = detector.POOL_SIZE
  x1, y1, x2, y2 = box
  h, w = y2 - y1, x2 - x1
  i, j = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
  corners = np.stack([y1 + i * h / oh, x1 + j * w / ow], -1)
  if offsets is not None:
    corners = corners + gamma * offsets * np.asarray([h, w])
  return corners


def plot_rois(model: nn.Module, params: Mapping[str, Any], test: Mapping[str, np.ndarray],
              path: str | os.PathLike, panels: Sequence[tuple[int, int]] = PANELS,
              title: str = "", gamma: float = 0.1):
  """Draws plain and deformed bins of misaligned test boxes (see the module docstring).

  Args:
    model: a variant with deformable RoI pooling.
    params: its parameters.
    test: the test sets (``canvases.make_test_sets``).
    path: the PNG to write.
    panels: ``(canvas, box)`` per column.
    title: added to the figure's title.
    gamma: the pooling's offset scale.
  """
  oh, ow = detector.POOL_SIZE
  panels = [(c % len(test["labels"]), k) for c, k in panels]
  canvases_drawn = sorted({c for c, _ in panels})
  rows = {c: i for i, c in enumerate(canvases_drawn)}
  images, boxes = test["images"][canvases_drawn], test["misaligned"][canvases_drawn]
  offsets, mask = deformed_bins(model, params, images, boxes)
  k = boxes.shape[1]
  size = images.shape[1]
  fig, axes = plt.subplots(2, len(panels), figsize=(2.2 * len(panels), 4.8), dpi=80,
                           squeeze=False)
  for col, (c, b) in enumerate(panels):
    image, box = images[rows[c]], boxes[rows[c], b]
    r = rows[c] * k + b
    h, w = (box[3] - box[1]) / oh, (box[2] - box[0]) / ow
    for row, off in enumerate((None, offsets[r])):
      ax = axes[row, col]
      ax.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1.5,
                extent=(-0.5, size - 0.5, size - 0.5, -0.5))
      corners = bin_corners(box, off, gamma) - 0.5   # pixel edges: pixel p spans [p-.5, p+.5]
      for i in range(oh):
        for j in range(ow):
          y, x = corners[i, j]
          if off is None:
            patch = plt.Rectangle((x, y), w, h, fill=False, ec="tab:blue", lw=0.5)
          else:
            strength = mask[r, i, j] / max(float(mask[r].max()), 1e-6)
            patch = plt.Rectangle((x, y), w, h, fc=(0.84, 0.15, 0.16, 0.05 + 0.45 * strength),
                                  ec=(0.6, 0.0, 0.0, 0.15 + 0.45 * strength), lw=0.4)
          ax.add_patch(patch)
      ax.add_patch(plt.Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1],
                                 fill=False, ec="tab:green", lw=1.2))
      ax.set(xlim=(-0.5, size - 0.5), ylim=(size - 0.5, -0.5), xticks=[], yticks=[])
      if row == 0:
        ax.set_title(f"label {test['labels'][c, b]}", fontsize=9)
      if col == 0:
        ax.set_ylabel("plain bins" if row == 0 else "deformed bins", fontsize=9)
  fig.suptitle("misaligned test boxes (green); deformed bins shaded by their mask"
               + (f" ({title})" if title else ""), fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
