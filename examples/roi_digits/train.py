"""Classifies jittered and misaligned digit boxes with plain and deformable RoI heads.

Every variant has the same backbone and head (RoI pooling 7 x 7, fc, fc, 10-way classifier) and
differs only in what pools the boxes, and whether training adds the R-CNN feature mimicking of
DCNv2 (Zhu et al., 2019, Sec. 3.3). All variants of a seed see the same canvases, boxes and batch
order, start from the same weights for every parameter they share, and use the same optimiser
and schedule. Each is evaluated on an in-distribution test set (boxes jittered as in training)
and on a *misaligned* one (boxes shifted and scaled beyond the training jitter; see
``canvases``). Outputs in ``--workdir``: ``results.json``, ``rois.png`` and per variant and seed
the Orbax checkpoints of its last epochs (``--resume`` continues from the latest; see
``examples/resnet_dcn/checkpoints.py``).

Usage::

  python examples/roi_digits/train.py                         # default variants, seed 0
  python examples/roi_digits/train.py --seeds 0 1 2           # mean and spread over seeds
  python examples/roi_digits/train.py --variants align mdconv+mdpool
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

import flaxdcn

import canvases  # noqa: I001  (puts examples/resnet_dcn on the path)
import checkpoints  # examples/resnet_dcn/checkpoints.py
import detector
import parallel  # examples/resnet_dcn/parallel.py
import roi_figures


@dataclasses.dataclass(frozen=True)
class Variant:
  """One head: what pools the boxes, the backbone's last convolution, and feature mimicking."""

  pool: str
  conv: str = "conv"
  mimic: bool = False


VARIANTS = {
    "align": Variant("align"),
    "dpool": Variant("dpool"),
    "mdpool": Variant("mdpool"),
    "mdpool+mimic": Variant("mdpool", mimic=True),
    "mdconv+mdpool": Variant("mdpool", conv="mdconv"),
}
DEFAULT_VARIANTS = ("align", "dpool", "mdpool", "mdpool+mimic")

#: Side of the crops the R-CNN branch of feature mimicking resizes every box to.
CROP_SIZE = 24


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters and options of a run (the command-line flags)."""

  workdir: str = "./runs/roi_digits"
  variants: tuple[str, ...] = DEFAULT_VARIANTS
  seeds: tuple[int, ...] = (0,)
  implementation: str | None = None
  epochs: int = 6
  batch_size: int = 32
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  warmup_epochs: float = 1.0
  mimic_weight: float = 1.0
  steps: int | None = None
  train_size: int | None = None
  test_size: int | None = None
  eval_batch_size: int = 64
  resume: bool = False
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0

  def training_config(self, variant: str, seed: int) -> dict[str, Any]:
    """The fields that define how ``variant`` is trained with ``seed`` (a checkpoint must agree;
    a larger ``--epochs`` continues it under the longer schedule)."""
    keep = ("batch_size", "learning_rate", "weight_decay", "warmup_epochs", "steps", "train_size")
    out = {k: getattr(self, k) for k in keep}
    if VARIANTS[variant].mimic:
      out["mimic_weight"] = self.mimic_weight
    return {**out, "variant": variant, "seed": seed}


TrainState = train_state.TrainState


def create_model(variant: str, config: Config) -> detector.BoxClassifier:
  spec = VARIANTS[variant]
  conv = nn.Conv
  if spec.conv == "mdconv":
    conv = partial(flaxdcn.ModulatedDeformConv, implementation=config.implementation)
  return detector.BoxClassifier(pool=detector.make_pool(spec.pool, config.implementation),
                                conv=conv, num_classes=canvases.NUM_CLASSES)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels.reshape(-1)).mean()


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """``1 - cos(a, b)`` per row."""
  norm = lambda x: x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
  return 1.0 - jnp.sum(norm(a) * norm(b), axis=-1)


def train_step(state: TrainState, digits: jax.Array, labels: jax.Array, data_key: jax.Array, *,
               mimic: bool, mimic_weight: float, implementation: str | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step on fresh canvases of ``digits`` ``[B, K, 28, 28]`` with freshly jittered boxes.

  The loss is the RoI branch's cross-entropy; with ``mimic`` the R-CNN branch (the image inside
  every box, cropped and resized, through the same backbone and head) adds its own
  cross-entropy and ``mimic_weight * (1 - cos(f_roi, f_crop))`` averaged over the boxes.
  """
  key = jax.random.fold_in(data_key, state.step)
  images, tight = canvases.draw_canvases(digits, jax.random.fold_in(key, 0))
  boxes = canvases.jitter_boxes(tight, jax.random.fold_in(key, 1), canvases.TRAIN_JITTER)

  def loss_fn(params):
    f_roi, logits = state.apply_fn({"params": params}, images, boxes,
                                   method=detector.BoxClassifier.roi_branch)
    loss = roi_loss = cross_entropy(logits, labels)
    aux = {"roi_loss": roi_loss}
    if mimic:
      crops = detector.crop_boxes(images, boxes, CROP_SIZE, implementation)
      f_crop, crop_logits = state.apply_fn({"params": params}, crops,
                                           method=detector.BoxClassifier.rcnn)
      aux["mimic_loss"] = jnp.mean(cosine_distance(f_roi, f_crop))
      aux["rcnn_loss"] = cross_entropy(crop_logits, labels)
      loss = loss + aux["rcnn_loss"] + mimic_weight * aux["mimic_loss"]
    return loss, (logits, aux)

  (loss, (logits, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  correct = jnp.argmax(logits, -1) == labels.reshape(-1)
  return state, {"loss": loss, "accuracy": jnp.mean(correct), **aux}


def eval_step(state: TrainState, images: jax.Array, boxes: jax.Array, labels: jax.Array,
              weights: jax.Array) -> dict[str, jax.Array]:
  """Sums of correct predictions and weight over a (padded) batch of canvases."""
  logits = state.apply_fn({"params": state.params}, images, boxes)
  correct = (jnp.argmax(logits, -1) == labels.reshape(-1)) * weights.reshape(-1)
  return {"correct": jnp.sum(correct), "count": jnp.sum(weights)}


@dataclasses.dataclass(frozen=True)
class Data:
  """Training digits (laid out on the fly) and the fixed validation and test canvases."""

  train_digits: np.ndarray
  train_labels: np.ndarray
  validation: dict[str, np.ndarray]
  test: dict[str, np.ndarray]


def load_data(config: Config) -> Data:
  splits = canvases.load_splits()
  train_x, train_y = splits["train"]
  train_x, train_y = train_x[:config.train_size], train_y[:config.train_size]
  test_x, test_y = splits["test"]
  test_x, test_y = test_x[:config.test_size], test_y[:config.test_size]
  val_x, val_y = splits["validation"]
  val_x, val_y = val_x[:config.test_size], val_y[:config.test_size]
  return Data(train_x, train_y, canvases.make_test_sets(val_x, val_y, seed=1),
              canvases.make_test_sets(test_x, test_y, seed=0))


class Trainer:
  """Data-parallel training and evaluation of one variant over all devices of all processes.

  Batches of canvases are split along a ``"batch"`` mesh axis (see ``parallel``); the train
  state is replicated, and XLA inserts the gradient reductions. The optimiser is AdamW (weight
  decay on kernels only) with a linear warm-up and a cosine decay to zero at the last step.
  """

  def __init__(self, model: nn.Module, variant: str, config: Config, steps_per_epoch: int):
    self.config = config
    self.model = model
    self.steps_per_epoch = steps_per_epoch
    mesh = parallel.batch_mesh()
    self.num_devices = mesh.size
    self.batch_sharding = parallel.batch_sharding(mesh)
    self.replicated = parallel.replicated(mesh)
    total = config.epochs * steps_per_epoch
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    self.learning_rate_fn = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate,
                                                               warmup, total)
    step = partial(train_step, mimic=VARIANTS[variant].mimic, mimic_weight=config.mimic_weight,
                   implementation=config.implementation)
    self.train_step = jax.jit(
        step, donate_argnums=0,
        in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding, self.replicated),
        out_shardings=(self.replicated, self.replicated))
    self.eval_step = jax.jit(
        eval_step, in_shardings=(self.replicated,) + (self.batch_sharding,) * 4,
        out_shardings=self.replicated)
    self._init = jax.jit(partial(model.init, method=model.init_all))
    self.tx = optax.adamw(self.learning_rate_fn, weight_decay=config.weight_decay,
                          mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))

  def init_state(self, key: jax.Array) -> TrainState:
    """Initial parameters (of both branches); one optimiser object for every seed, so the
    compiled steps are reused."""
    size = canvases.CANVAS_SIZE
    images = jnp.zeros((1, size, size, 1))
    boxes = jnp.asarray([[[4.0, 4.0, 20.0, 20.0]]])
    crops = jnp.zeros((1, CROP_SIZE, CROP_SIZE, 1))
    variables = self._init(key, images, boxes, crops)
    state = TrainState.create(apply_fn=self.model.apply, params=variables["params"], tx=self.tx)
    return jax.device_put(state, self.replicated)

  def train_epoch(self, state: TrainState, data: Data, seed: int, epoch: int,
                  data_key: jax.Array, progress: tqdm) -> tuple[TrainState, dict[str, float]]:
    """One pass over a fresh grouping of the training digits into canvases."""
    order = np.random.default_rng((seed, epoch)).permutation(len(data.train_labels))
    digits, labels = canvases.group_digits(data.train_digits, data.train_labels, order)
    batch_size = self.config.batch_size
    records = []
    for step in range(self.steps_per_epoch):
      rows = slice(step * batch_size, (step + 1) * batch_size)
      state, metrics = self.train_step(
          state, parallel.global_batch(self.batch_sharding, digits[rows]),
          parallel.global_batch(self.batch_sharding, labels[rows]), data_key)
      # float() waits for the step: an honest progress bar.
      records.append({k: float(v) for k, v in metrics.items()})
      progress.update()
      progress.set_postfix(epoch=epoch + 1, loss=f"{records[-1]['loss']:.3f}", refresh=False)
    mean = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
    return state, {"train_" + k: v for k, v in mean.items()}

  def evaluate(self, state: TrainState, sets: dict[str, np.ndarray], boxes: str) -> float:
    """Accuracy over all boxes ``sets[boxes]`` of the fixed canvases, in padded batches."""
    n = len(sets["labels"])
    batch = -(-min(self.config.eval_batch_size, n) // self.num_devices) * self.num_devices
    correct = count = 0.0
    for start in range(0, n, batch):
      rows = slice(start, start + batch)
      arrays = [sets["images"][rows], sets[boxes][rows], sets["labels"][rows],
                np.ones(sets["labels"][rows].shape, np.float32)]
      pad = batch - len(arrays[0])
      arrays = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in arrays]
      # Padding canvases are blank, with all-zero (padding) boxes and weight 0.
      sums = self.eval_step(state, *(parallel.global_batch(self.batch_sharding, a)
                                     for a in arrays))
      correct, count = correct + float(sums["correct"]), count + float(sums["count"])
    return correct / count


def run_dir(workdir: str | os.PathLike, variant: str, seed: int) -> pathlib.Path:
  """The run directory of ``variant`` with ``seed`` (checkpoints in ``checkpoints/`` below it)."""
  return pathlib.Path(workdir) / f"{variant}_seed{seed}"


def count_params(params: Any) -> int:
  return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def steps_per_epoch(config: Config, data: Data) -> int:
  """Full batches of canvases per pass over the training digits (capped by ``--steps``)."""
  steps = len(data.train_labels) // canvases.DIGITS_PER_CANVAS // config.batch_size
  if steps == 0:
    raise ValueError(f"{len(data.train_labels)} training digits make no batch of "
                     f"{config.batch_size} canvases.")
  if config.batch_size % jax.device_count():
    raise ValueError(f"--batch-size {config.batch_size} is not divisible by the "
                     f"{jax.device_count()} devices.")
  return steps if config.steps is None else min(steps, config.steps)


def train_and_evaluate(trainer: Trainer, variant: str, seed: int, config: Config, data: Data
                       ) -> tuple[dict[str, Any], TrainState]:
  """Trains (or resumes) one variant with one seed; validates and checkpoints every epoch.

  ``trainer`` (its model, optimiser and compiled steps) is reused across seeds.
  """
  steps_per_epoch = trainer.steps_per_epoch
  meta = {"config": config.training_config(variant, seed), "steps_per_epoch": steps_per_epoch,
          "epoch": 0, "history": [], "wall_time_s": 0.0}
  init_key, data_key = jax.random.split(jax.random.key(seed))
  state = trainer.init_state(init_key)   # Same key for every variant: shared parameters agree.
  with checkpoints.Checkpoints(run_dir(config.workdir, variant, seed)) as saved:
    if config.resume and saved.latest_step() is not None:
      saved.check_resumable(meta)
      state, meta = saved.restore(state)   # into the shardings of this run's devices
    else:
      saved.clear()   # a fresh run: earlier checkpoints here would be taken for its own
    start = time.perf_counter() - meta["wall_time_s"]
    progress = tqdm(total=config.epochs * steps_per_epoch,
                    initial=meta["epoch"] * steps_per_epoch, desc=f"{variant:>13} s{seed}",
                    unit="step", dynamic_ncols=True, file=sys.stdout,
                    disable=not parallel.is_chief())
    with progress:
      for epoch in range(meta["epoch"], config.epochs):
        state, record = trainer.train_epoch(state, data, seed, epoch, data_key, progress)
        record["epoch"] = meta["epoch"] = epoch + 1
        record["validation_accuracy"] = trainer.evaluate(state, data.validation, "test")
        record["validation_misaligned_accuracy"] = trainer.evaluate(state, data.validation,
                                                                    "misaligned")
        record["wall_time_s"] = meta["wall_time_s"] = time.perf_counter() - start
        meta["history"].append(record)
        progress.set_postfix(epoch=epoch + 1, loss=f"{record['train_loss']:.3f}",
                             val=f"{record['validation_accuracy']:.1%}",
                             val_misaligned=f"{record['validation_misaligned_accuracy']:.1%}")
        saved.save(state, meta)   # written in the background while the next epoch trains

  if not meta["history"]:
    raise ValueError("No epoch was trained (--epochs 0).")
  last = meta["history"][-1]
  result = {
      "test_accuracy": trainer.evaluate(state, data.test, "test"),
      "misaligned_test_accuracy": trainer.evaluate(state, data.test, "misaligned"),
      "validation_accuracy": last["validation_accuracy"],
      "validation_misaligned_accuracy": last["validation_misaligned_accuracy"],
      "num_params": count_params(state.params),
      "wall_time_s": meta["wall_time_s"],
      "epochs": last["epoch"],
      "steps_per_epoch": steps_per_epoch,
      "implementation": config.implementation or "auto",
      "devices": f"{jax.device_count()} x {jax.default_backend()} in "
                 f"{jax.process_count()} process(es)",
      "config": meta["config"],
      "history": meta["history"],
  }
  return result, state


METRICS = ("test_accuracy", "misaligned_test_accuracy", "wall_time_s")


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Mean and standard deviation over seeds of every metric, per variant."""
  out = {}
  for variant in (v for v in VARIANTS if v in runs):
    by_seed = runs[variant]
    values = {m: np.asarray([r[m] for r in by_seed.values()]) for m in METRICS}
    out[variant] = {"seeds": sorted(int(s) for s in by_seed)}
    for m, v in values.items():
      out[variant][m] = float(v.mean())
      out[variant][m + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
  return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
  """Accuracy on both test sets (mean ± std over seeds) and wall time per variant."""
  lines = [f"{'variant':<16}{'seeds':>6}{'in-dist':>16}{'misaligned':>16}{'time':>9}"]
  pm = lambda r, m: f"{100 * r[m]:.1f} ± {100 * r[m + '_std']:.1f}"
  for variant, r in summary.items():
    lines.append(f"{variant:<16}{len(r['seeds']):>6}{pm(r, 'test_accuracy'):>16}"
                 f"{pm(r, 'misaligned_test_accuracy'):>16}{r['wall_time_s']:>8.0f}s")
  if "align" in summary:
    base = summary["align"]
    for variant, r in summary.items():
      if variant != "align":
        gain = lambda m: 100 * (r[m] - base[m])
        lines.append(f"{variant + ' - align':<22}{gain('test_accuracy'):>+16.1f}"
                     f"{gain('misaligned_test_accuracy'):>+16.1f}")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Config:
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--workdir", default=defaults.workdir,
                      help="where results, the figure and checkpoints go")
  parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS),
                      default=list(defaults.variants))
  parser.add_argument("--seeds", nargs="+", type=int, default=list(defaults.seeds),
                      help="initialisation, batch order, canvases and training boxes; "
                           "results report the mean and spread over them")
  parser.add_argument("--implementation", choices=("xla", "ffi"), default=None,
                      help="flaxdcn backend; default: native where built, else pure jnp")
  parser.add_argument("--epochs", type=int, default=defaults.epochs)
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                      help="global batch of canvases (4 boxes each), split over all devices")
  parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
  parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
  parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
  parser.add_argument("--mimic-weight", type=float, default=defaults.mimic_weight,
                      help="weight of the feature-mimicking loss 1 - cos(f_roi, f_crop)")
  parser.add_argument("--steps", type=int, default=None,
                      help="cap on the training steps per epoch (quick runs, smoke tests)")
  parser.add_argument("--train-size", type=int, default=None,
                      help="use only the first N of the 3500 training digits")
  parser.add_argument("--test-size", type=int, default=None,
                      help="use only the first N test (and validation) digits")
  parser.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size,
                      help="canvases per evaluation batch")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the checkpoints in --workdir")
  parallel.add_process_flags(parser)
  args = parser.parse_args(argv)
  values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
  values["variants"] = tuple(dict.fromkeys(args.variants))
  values["seeds"] = tuple(dict.fromkeys(args.seeds))
  return Config(**values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the results."""
  config = parse_args(argv)
  parallel.initialize(config.coordinator_address, config.num_processes, config.process_id)
  workdir = pathlib.Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = load_data(config)
  log = print if parallel.is_chief() else (lambda *a, **k: None)
  log(f"{len(data.train_labels)} training digits; {data.test['labels'].size} test boxes per test "
      f"set; {jax.device_count()} {jax.default_backend()} device(s) in {jax.process_count()} "
      f"process(es); flaxdcn implementation: {config.implementation or 'auto'}")

  results_path = workdir / "results.json"
  saved = json.loads(results_path.read_text()) if results_path.exists() else {}
  # Earlier runs of other variants or seeds stay when they were trained the same way.
  runs: dict[str, dict[str, Any]] = {}
  for variant, by_seed in saved.get("runs", {}).items():
    for seed, r in by_seed.items():
      if (variant in VARIANTS and r.get("config") == config.training_config(variant, int(seed))
          and r.get("epochs") == config.epochs):
        runs.setdefault(variant, {})[seed] = r
  figure_model = None
  steps = steps_per_epoch(config, data)
  for variant in config.variants:
    trainer = Trainer(create_model(variant, config), variant, config, steps)
    for seed in config.seeds:
      result, state = train_and_evaluate(trainer, variant, seed, config, data)
      runs.setdefault(variant, {})[str(seed)] = result
      if VARIANTS[variant].pool == "mdpool" and figure_model is None:
        figure_model = (variant, seed, trainer.model, jax.device_get(state.params))
      summary = summarize(runs)
      results = {"summary": summary, "runs": runs}
      if parallel.is_chief():   # after every run: an interrupted command keeps what it did
        results_path.write_text(json.dumps(results, indent=2))
  if parallel.is_chief():
    if figure_model is not None:
      variant, seed, model, params = figure_model
      roi_figures.plot_rois(model, params, data.test, workdir / "rois.png",
                            title=f"{variant}, seed {seed}")
  log(format_table(summary))
  log(f"Results, figure and checkpoints in {workdir}")
  return results


if __name__ == "__main__":
  main()
