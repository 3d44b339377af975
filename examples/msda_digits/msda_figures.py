"""``attention.png``: where the msda model's queries sampled, and how much of their attention fell
on their digit.

:class:`flaxdcn.MSDeformAttn` sows its sampling locations ``[N, Lq, M, L, P, 2]`` (``(x, y)``
normalised to ``[0, 1]`` on every level) and attention weights ``[N, Lq, M, L, P]`` (softmaxed
over ``L * P`` per head) into the ``"intermediates"`` collection. Every level covers the whole
canvas, so ``x * CANVAS_SIZE`` is the canvas pixel coordinate (pixel edges, as in
``grid_sample(align_corners=False)``) on every level. The figure draws, for a few test canvases
and every decoder layer, each query's samples in its own colour, with the area of a marker
proportional to its attention weight and its shape telling the level, and the query's
reference box (dashed) and predicted box (solid).
"""

from __future__ import annotations

import functools
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

import canvases  # noqa: E402
import models  # noqa: E402

#: Test canvases drawn.
PANELS = (0, 1, 2, 3)
QUERY_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange")
LEVEL_MARKERS = ("o", "s", "^", "D")


def cross_attention_samples(model: nn.Module, params: Mapping[str, Any], images: np.ndarray
                            ) -> dict[str, Any]:
  """The model's predictions on ``images`` and, per decoder layer, its cross-attention's samples.

  Returns:
    the model's outputs (``logits``, ``boxes``, ``reference_boxes``, see
    ``models.DigitDETR``), ``locations``: per decoder layer the sampling locations in canvas
    pixels ``[N, Q, M, L, P, 2]`` (``(x, y)``), and ``weights``: per decoder layer the
    attention weights ``[N, Q, M, L, P]`` divided by the number of heads (each query's weights
    sum to 1); numpy arrays.
  """
  apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
  outputs, state = apply({"params": params}, jnp.asarray(images))
  samples = {k: np.asarray(v) for k, v in outputs.items()}
  samples["locations"], samples["weights"] = [], []
  for i in range(model.num_decoder_layers):
    sown = state["intermediates"][f"decoder_layer_{i}"]["cross_attn"]
    w = np.asarray(sown["softmax_attention_weights"][0])
    samples["locations"].append(np.asarray(sown["sampling_locations"][0]) * canvases.CANVAS_SIZE)
    samples["weights"].append(w / w.shape[2])
  return samples


def weight_inside_boxes(locations: np.ndarray, weights: np.ndarray, boxes: np.ndarray
                        ) -> np.ndarray:
  """Per query, the attention weight of the samples inside its box ``[N, Q, 4]``
  (``(x1, y1, x2, y2)``, pixels): ``[N, Q]``."""
  lo = boxes[:, :, None, None, None, :2]
  hi = boxes[:, :, None, None, None, 2:]
  inside = np.all((locations >= lo) & (locations <= hi), axis=-1)
  return np.sum(np.where(inside, weights, 0.0), axis=(2, 3, 4))


def attention_on_digits(samples: Mapping[str, Any], tight: np.ndarray) -> list[float]:
  """Per decoder layer, the mean over the digits of the attention weight that each digit's
  query put inside the digit's tight box ``tight`` ``[N, Q, 4]``."""
  return [float(weight_inside_boxes(loc, w, tight).mean())
          for loc, w in zip(samples["locations"], samples["weights"])]


def _box(ax, box_xyxy: np.ndarray, colour: str, style: str):
  x1, y1, x2, y2 = box_xyxy
  ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                             linestyle=style, linewidth=1.2))


def plot_attention(samples: Mapping[str, Any], images: np.ndarray, path: str | os.PathLike,
                   *, level_shapes: Sequence[tuple[int, int]], title: str = "",
                   panels: Sequence[int] = PANELS) -> None:
  """Writes ``attention.png`` from :func:`cross_attention_samples` of ``images``: one column per
  canvas of ``panels``, one row per decoder layer."""
  size = canvases.CANVAS_SIZE
  layers = len(samples["locations"])
  fig, axes = plt.subplots(layers, len(panels), figsize=(2.6 * len(panels), 2.8 * layers),
                           squeeze=False)
  for row in range(layers):
    for col, canvas in enumerate(panels):
      ax = axes[row, col]
      ax.imshow(images[canvas, ..., 0], cmap="gray_r", vmin=0, vmax=2.5,
                extent=(0, size, size, 0))
      for q in range(samples["locations"][row].shape[1]):
        colour = QUERY_COLOURS[q % len(QUERY_COLOURS)]
        loc = samples["locations"][row][canvas, q]                     # [M, L, P, 2]
        w = samples["weights"][row][canvas, q]                         # [M, L, P]
        for level in range(loc.shape[1]):
          ax.scatter(loc[:, level, :, 0].ravel(), loc[:, level, :, 1].ravel(),
                     s=400 * w[:, level].ravel(), color=colour, alpha=0.7, linewidths=0,
                     marker=LEVEL_MARKERS[level % len(LEVEL_MARKERS)])
        ref = np.asarray(models.box_cxcywh_to_xyxy(samples["reference_boxes"][row, canvas, q]))
        box = np.asarray(models.box_cxcywh_to_xyxy(samples["boxes"][row, canvas, q]))
        _box(ax, ref * size, colour, "--")
        _box(ax, box * size, colour, "-")
        label = int(np.argmax(samples["logits"][row, canvas, q]))
        ax.text(box[0] * size + 1, box[1] * size + 5, str(label), color=colour, fontsize=8,
                fontweight="bold")
      ax.set_xlim(0, size)
      ax.set_ylim(size, 0)
      ax.set_xticks([])
      ax.set_yticks([])
      if col == 0:
        ax.set_ylabel(f"decoder layer {row + 1}")
  legend = [plt.Line2D([], [], linestyle="", marker=LEVEL_MARKERS[level], color="grey",
                       label=f"level {level} ({h} x {w})")
            for level, (h, w) in enumerate(level_shapes)]
  fig.legend(handles=legend, loc="lower center", ncol=len(legend), frameon=False)
  fig.suptitle(f"{title}: cross-attention samples (area: weight), reference box (dashed), "
               "predicted box and class (solid)", fontsize=9)
  fig.tight_layout(rect=(0, 0.05, 1, 0.96))
  fig.savefig(path, dpi=110)
  plt.close(fig)
