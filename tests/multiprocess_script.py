"""A few data-parallel training steps of a small deformable detector head, run by
tests/test_multiprocess.py as 2 processes x 2 CPU devices (``jax.distributed``) and as 1 process x
4 devices.

Usage::

  python tests/multiprocess_script.py OUT.npz [--coordinator-address HOST:PORT
      --num-processes P --process-id I]

The device count comes from ``XLA_FLAGS=--xla_force_host_platform_device_count=...`` (set by the
caller). The mesh, the per-process batches and ``jax.distributed`` come from the examples' own
``examples/resnet_dcn/parallel.py``. The model: a stride-2 convolution, a ``ModulatedDeformConv``,
a ``DeformRoIPool`` over per-image boxes ``[N, R, 4]`` (some of them padding boxes of zeros), and a
dense classifier; the loss is the cross-entropy of the real boxes. Every process builds the same
global batch from one seed and feeds its own slice at every step. The script checks that the compiled train
step has no ``all-gather`` (forward and backward stay per shard; only the gradients are
all-reduced), runs ``STEPS`` steps under each implementation, and process 0 writes the losses and
final parameters to ``OUT.npz`` (``<implementation>/loss`` and ``<implementation>/<param path>``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "resnet_dcn"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import flaxdcn  # noqa: E402
from flaxdcn import _ffi  # noqa: E402
import parallel  # noqa: E402  (examples/resnet_dcn/parallel.py)

DEVICES = 4
BATCH = 8            # images per global batch: 2 per device
BOXES = 3            # boxes per image; the last box of every other image is padding
SIZE = 12
CLASSES = 5
STEPS = 3


class TinyDetector(nn.Module):
  """Conv (stride 2), ModulatedDeformConv, DeformRoIPool on per-image boxes, dense."""

  implementation: str | None = None

  @nn.compact
  def __call__(self, images, boxes):
    x = nn.relu(nn.Conv(6, (3, 3), 2, padding="SAME")(images))
    x = nn.relu(flaxdcn.ModulatedDeformConv(6, (3, 3), padding="SAME",
                                            implementation=self.implementation)(x))
    pooled = flaxdcn.DeformRoIPool(output_size=(3, 3), spatial_scale=0.5, sampling_ratio=2,
                                   deform_fc_channels=8, implementation=self.implementation,
                                   kernel_init=nn.initializers.normal(0.1))(x, boxes)
    return nn.Dense(CLASSES)(pooled.reshape(pooled.shape[:2] + (-1,)))   # [N, R, classes]


def make_batches() -> list[dict[str, np.ndarray]]:
  """``STEPS`` global batches: the same images and boxes (so the loss must fall), each step
  assembled afresh from the processes' slices."""
  rng = np.random.default_rng(0)
  corner = rng.uniform(0, SIZE / 2, (BATCH, BOXES, 2))
  size = rng.uniform(2, SIZE / 2, (BATCH, BOXES, 2))
  boxes = np.concatenate([corner, corner + size], -1).astype(np.float32)
  real = np.ones((BATCH, BOXES), np.float32)
  boxes[1::2, -1] = 0.0                            # padding boxes pool zeros
  real[1::2, -1] = 0.0
  batch = {"images": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
           "boxes": boxes, "labels": rng.integers(0, CLASSES, (BATCH, BOXES)), "weights": real}
  return [batch] * STEPS


def train_step(state, images, boxes, labels, weights):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images, boxes)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * weights) / jnp.sum(weights)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def run(implementation: str, batches) -> dict[str, np.ndarray]:
  from flax.training import train_state

  mesh = parallel.batch_mesh()
  batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  model = TinyDetector(implementation)
  first = batches[0]
  params = jax.jit(model.init)(jax.random.key(0), first["images"][:1], first["boxes"][:1])
  state = train_state.TrainState.create(apply_fn=model.apply, params=params["params"],
                                        tx=optax.adam(1e-2))
  state = jax.device_put(state, replicated)
  step = jax.jit(train_step, in_shardings=(replicated,) + (batch,) * 4,
                 out_shardings=(replicated, replicated))
  names = ("images", "boxes", "labels", "weights")
  losses = []
  for i, b in enumerate(batches):
    args = [parallel.global_batch(batch, b[k]) for k in names]
    if i == 0:
      hlo = step.lower(state, *args).compile().as_text()
      gathers = [line for line in hlo.splitlines() if "all-gather" in line]
      assert not gathers, (f"{implementation}: the batch-sharded train step all-gathers:\n"
                           + "\n".join(gathers)[:3000])
      assert "all-reduce" in hlo, f"{implementation}: no gradient all-reduce in the train step"
    state, loss = step(state, *args)
    losses.append(float(loss))
  out = {f"{implementation}/loss": np.asarray(losses)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)):
    out[f"{implementation}/" + "/".join(k.key for k in path)] = np.asarray(leaf)
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parallel.add_process_flags(parser)
  args = parser.parse_args()
  parallel.initialize(args.coordinator_address, args.num_processes, args.process_id)
  assert jax.device_count() == DEVICES, jax.devices()
  assert jax.process_count() == args.num_processes, jax.process_count()
  batches = make_batches()
  implementations = ["xla"] + (["ffi"] if _ffi.available("cpu") else [])
  out = {}
  for implementation in implementations:
    out.update(run(implementation, batches))
  if parallel.is_chief():
    np.savez(args.out, **out)


if __name__ == "__main__":
  main()
