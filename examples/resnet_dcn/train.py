"""Trains a ResNet and the same ResNet with deformable convolutions on deformed MNIST.

Both models see the same digits, the same random deformations in the same order, the same
initial weights (for every parameter they share) and the same optimiser; they differ only in the
convolution class of the last stage. Each is evaluated after every epoch on an in-distribution
test set and on a *shifted* one, whose scales and rotations training never saw (see
``input_pipeline``). Outputs in ``--workdir``: ``results.json``, ``curves.png``, ``offsets.png``,
``erf.png`` and per model the Orbax checkpoints of its last epochs (see ``checkpoints``;
``--resume`` continues from the latest). With the process flags (see ``parallel``) several
processes train one model together over all their devices.

Usage::

  python examples/resnet_dcn/train.py                       # both models, 15 epochs, seed 0
  python examples/resnet_dcn/train.py --model dcn --dcn dcnv1 --seed 1 --workdir /tmp/dcnv1
  python examples/resnet_dcn/train.py --dcn dk-local         # Deformable Kernels in place of DCN
  python examples/resnet_dcn/train.py --coordinator-address host0:1234 --num-processes 2 \
      --process-id 0                                         # on host0; --process-id 1 on host1
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

import checkpoints
import figures
import input_pipeline
import models
import parallel

MODEL_NAMES = ("baseline", "dcn")

#: The scope of the Deformable Kernels: each 3 x 3 kernel is resampled from a 5 x 5 kernel. With
#: one tap of margin on each side the 3 x 3 grid sits on scope taps, so with its zero-initialised
#: offset head the layer starts as a plain 3 x 3 convolution (the centre crop), like the DCN layers;
#: and spreading the three taps over the whole scope (spacing 2) shrinks the kernel's pattern by up
#: to 2x, the smallest scale (0.5) of the shifted test set.
DK_SCOPE_SIZE = 5

#: The convolution the "dcn" model uses for the 3 x 3 convolutions of its last stage (``--dcn``).
#: Any module with ``flax.linen.Conv``'s attributes and call fits.
DEFORMABLE_CONVS = {
    "dcnv2": flaxdcn.ModulatedDeformConv,
    "dcnv1": flaxdcn.DeformConv,
    "dk-global": partial(flaxdcn.GlobalDeformableKernel, scope_size=DK_SCOPE_SIZE),
    "dk-local": partial(flaxdcn.LocalDeformableKernel, scope_size=DK_SCOPE_SIZE),
}

#: ``--dcn`` choices that have no native kernel: ``implementation="ffi"`` raises for them.
PURE_JNP_CONVS = ("dk-global", "dk-local")

#: The stages (0-based) whose 3 x 3 convolutions are deformable in the "dcn" model.
DEFORM_STAGES = (2,)


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters and options of a run (the command-line flags)."""

  workdir: str = "./runs/resnet_dcn"
  model: str = "both"
  dcn: str = "dcnv2"
  implementation: str | None = None
  seed: int = 0
  epochs: int = 15
  batch_size: int = 128
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  warmup_epochs: float = 1.0
  steps: int | None = None
  train_size: int | None = None
  test_size: int | None = None
  eval_batch_size: int = 500
  resume: bool = False
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0

  def training_config(self, model_name: str) -> dict[str, Any]:
    """The fields that define how ``model_name`` is trained (a checkpoint must agree on them)."""
    skip = {"workdir", "model", "epochs", "resume", "implementation", "eval_batch_size",
            "coordinator_address", "num_processes", "process_id"}
    if model_name == "baseline":
      skip.add("dcn")
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_model(name: str, config: Config) -> nn.Module:
  """The baseline ResNet, or the same ResNet with ``config.dcn`` convolutions in its last stage."""
  if name == "baseline":
    return models.SmallResNet(num_classes=input_pipeline.NUM_CLASSES)
  if name == "dcn":
    deform_conv = partial(DEFORMABLE_CONVS[config.dcn], implementation=config.implementation)
    return models.SmallResNet(num_classes=input_pipeline.NUM_CLASSES, deform_conv=deform_conv,
                              deform_stages=DEFORM_STAGES)
  raise ValueError(f"Unknown model {name!r}; expected one of {MODEL_NAMES}.")


def create_learning_rate_fn(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up for ``warmup_epochs``, then cosine decay to zero at the last step."""
  total = config.epochs * steps_per_epoch
  warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
  return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total)


def create_train_state(key: jax.Array, model: nn.Module, learning_rate_fn: optax.Schedule,
                       config: Config) -> TrainState:
  """Initial parameters and AdamW (weight decay on kernels only)."""
  shape = (1, input_pipeline.CANVAS_SIZE, input_pipeline.CANVAS_SIZE, 1)
  variables = jax.jit(partial(model.init, train=False))(key, jnp.zeros(shape, jnp.float32))
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.adamw(learning_rate_fn, weight_decay=config.weight_decay, mask=decay_mask)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, digits: jax.Array, labels: jax.Array, data_key: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step on freshly deformed ``digits`` ``[B, 28, 28]`` (deformations depend on the step)."""
  images = input_pipeline.deform(digits, jax.random.fold_in(data_key, state.step),
                                 input_pipeline.TRAIN_RANGE)

  def loss_fn(params):
    logits, new_model_state = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, mutable=["batch_stats"])
    return cross_entropy_loss(logits, labels).mean(), (logits, new_model_state)

  (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
  return state, metrics


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, weights: jax.Array
              ) -> dict[str, jax.Array]:
  """Sums of loss, correct predictions and weight over a (padded) batch."""
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images,
                          train=False)
  correct = jnp.argmax(logits, -1) == labels
  return {"loss": jnp.sum(cross_entropy_loss(logits, labels) * weights),
          "correct": jnp.sum(correct * weights), "count": jnp.sum(weights)}


@dataclasses.dataclass(frozen=True)
class Data:
  """Training digits (deformed on the fly) and the two fixed, already deformed test sets."""

  train_digits: np.ndarray
  train_labels: np.ndarray
  test_digits: np.ndarray
  test_labels: np.ndarray
  test_sets: dict[str, np.ndarray]


def load_data(config: Config) -> Data:
  """MNIST-5k, shuffled and split 4000 / 1000 with a fixed permutation; test sets from seed 0."""
  images, labels = input_pipeline.load_mnist_5k()
  (train_digits, train_labels), (test_digits, test_labels) = input_pipeline.split(images, labels)
  train_digits, train_labels = train_digits[:config.train_size], train_labels[:config.train_size]
  test_digits, test_labels = test_digits[:config.test_size], test_labels[:config.test_size]
  return Data(train_digits, train_labels, test_digits, test_labels,
              input_pipeline.make_test_sets(test_digits, seed=0))


class Trainer:
  """Data-parallel training and evaluation of one model over all devices of all processes.

  Batches are split along a ``"batch"`` mesh axis (each process feeds its own slice; see
  ``parallel``); the train state is replicated. XLA inserts the gradient (and BatchNorm
  statistics) reductions across devices and processes.
  """

  def __init__(self, model: nn.Module, config: Config, steps_per_epoch: int):
    self.config = config
    self.model = model
    self.steps_per_epoch = steps_per_epoch
    mesh = parallel.batch_mesh()
    self.num_devices = mesh.size
    self.batch_sharding = parallel.batch_sharding(mesh)
    self.replicated = parallel.replicated(mesh)
    self.learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
    self.train_step = jax.jit(
        train_step, donate_argnums=0,
        in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding, self.replicated),
        out_shardings=(self.replicated, self.replicated))
    self.eval_step = jax.jit(
        eval_step, in_shardings=(self.replicated,) + (self.batch_sharding,) * 3,
        out_shardings=self.replicated)

  def init_state(self, key: jax.Array) -> TrainState:
    state = create_train_state(key, self.model, self.learning_rate_fn, self.config)
    return jax.device_put(state, self.replicated)

  def train_epoch(self, state: TrainState, data: Data, epoch: int, data_key: jax.Array,
                  progress: tqdm) -> tuple[TrainState, dict[str, float]]:
    """One pass over a fresh permutation of the training digits (the last partial batch dropped)."""
    batch_size = self.config.batch_size
    perm = np.random.default_rng((self.config.seed, epoch)).permutation(len(data.train_labels))
    losses, accuracies = [], []
    for step in range(self.steps_per_epoch):
      idx = perm[step * batch_size:(step + 1) * batch_size]
      digits = parallel.global_batch(self.batch_sharding, data.train_digits[idx])
      labels = parallel.global_batch(self.batch_sharding, data.train_labels[idx])
      state, metrics = self.train_step(state, digits, labels, data_key)
      losses.append(float(metrics["loss"]))  # Waits for the step: an honest progress bar.
      accuracies.append(float(metrics["accuracy"]))
      progress.update()
      progress.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", refresh=False)
    return state, {"train_loss": float(np.mean(losses)),
                   "train_accuracy": float(np.mean(accuracies))}

  def evaluate(self, state: TrainState, images: np.ndarray, labels: np.ndarray
               ) -> dict[str, float]:
    """Mean loss and accuracy over a whole test set, in padded batches."""
    batch = -(-min(self.config.eval_batch_size, len(labels)) // self.num_devices) * self.num_devices
    total = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, len(labels), batch):
      x, y = images[start:start + batch], labels[start:start + batch]
      pad = batch - len(y)
      weights = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      sums = self.eval_step(state, *(parallel.global_batch(self.batch_sharding, a)
                                     for a in (x, y, weights)))
      total = {k: total[k] + float(v) for k, v in sums.items()}
    return {"loss": total["loss"] / total["count"], "accuracy": total["correct"] / total["count"]}


def run_dir(workdir: str | os.PathLike, name: str) -> pathlib.Path:
  """The run directory of model ``name`` (its checkpoints are in ``checkpoints/`` below it)."""
  return pathlib.Path(workdir) / name


def conv_name(name: str, config: Config) -> str:
  """The class name of the convolution that sets ``name`` apart (``Conv`` for the baseline)."""
  if name == "baseline":
    return nn.Conv.__name__
  conv = DEFORMABLE_CONVS[config.dcn]
  return getattr(conv, "func", conv).__name__   # Unwraps a functools.partial.


def count_params(params: Any) -> int:
  return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def train_and_evaluate(name: str, config: Config, data: Data
                       ) -> tuple[dict[str, Any], TrainState, nn.Module]:
  """Trains (or resumes) one model; evaluates after every epoch; checkpoints after every epoch.

  Returns:
    The model's results (final metrics, parameter count, wall time, per-epoch history), its final
    train state and the model.
  """
  steps_per_epoch = len(data.train_labels) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(data.train_labels)} training digits make no batch of "
                     f"{config.batch_size}.")
  if config.steps is not None:
    steps_per_epoch = min(steps_per_epoch, config.steps)
  if config.batch_size % jax.device_count():
    raise ValueError(f"--batch-size {config.batch_size} is not divisible by the "
                     f"{jax.device_count()} devices.")
  meta = {"config": config.training_config(name), "steps_per_epoch": steps_per_epoch,
          "epoch": 0, "history": [], "wall_time_s": 0.0}
  model = create_model(name, config)
  trainer = Trainer(model, config, steps_per_epoch)
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = trainer.init_state(init_key)  # Same key for both models: shared parameters start equal.
  with checkpoints.Checkpoints(run_dir(config.workdir, name)) as saved:
    if config.resume and saved.latest_step() is not None:
      saved.check_resumable(meta)
      state, meta = saved.restore(state)   # into the shardings of this run's devices
    else:
      saved.clear()   # a fresh run: earlier checkpoints here would be taken for its own
    start = time.perf_counter() - meta["wall_time_s"]
    progress = tqdm(total=config.epochs * steps_per_epoch,
                    initial=meta["epoch"] * steps_per_epoch, desc=f"{name:>8}", unit="step",
                    dynamic_ncols=True, file=sys.stdout, disable=not parallel.is_chief())
    with progress:
      for epoch in range(meta["epoch"], config.epochs):
        state, record = trainer.train_epoch(state, data, epoch, data_key, progress)
        record["epoch"] = meta["epoch"] = epoch + 1
        for split in ("test", "shifted_test"):
          metrics = trainer.evaluate(state, data.test_sets[split], data.test_labels)
          record[f"{split}_loss"] = metrics["loss"]
          record[f"{split}_accuracy"] = metrics["accuracy"]
        record["wall_time_s"] = meta["wall_time_s"] = time.perf_counter() - start
        meta["history"].append(record)
        progress.set_postfix(epoch=epoch + 1, loss=f"{record['train_loss']:.3f}",
                             test=f"{record['test_accuracy']:.1%}",
                             shifted=f"{record['shifted_test_accuracy']:.1%}")
        saved.save(state, meta)   # written in the background while the next epoch trains

  if not meta["history"]:
    raise ValueError("No epoch was trained (--epochs 0).")
  last = meta["history"][-1]
  result = {
      "test_accuracy": last["test_accuracy"],
      "shifted_test_accuracy": last["shifted_test_accuracy"],
      "test_loss": last["test_loss"],
      "shifted_test_loss": last["shifted_test_loss"],
      "num_params": count_params(state.params),
      "wall_time_s": meta["wall_time_s"],
      "epochs": last["epoch"],
      "steps_per_epoch": steps_per_epoch,
      "conv": conv_name(name, config),
      "implementation": config.implementation or "auto",
      "devices": f"{jax.device_count()} x {jax.default_backend()}",
      "processes": jax.process_count(),
      "config": meta["config"],
      "history": meta["history"],
  }
  return result, state, model


#: Test digits the ERF is averaged over (at each scale).
ERF_DIGITS = 64


def restore_variables(name: str, config: Config) -> tuple[nn.Module, dict[str, Any]]:
  """The model ``name`` and its variables from its latest checkpoint in ``config.workdir``."""
  model = create_model(name, config)
  with checkpoints.Checkpoints(run_dir(config.workdir, name)) as saved:
    trainer = Trainer(model, config, saved.read_meta()["steps_per_epoch"])
    shapes = jax.eval_shape(partial(create_train_state, model=model, config=config,
                                    learning_rate_fn=trainer.learning_rate_fn),
                            jax.random.key(0))
    template = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=trainer.replicated), shapes)
    state, _ = saved.restore(template)
  return model, jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """The closing table: accuracy on both test sets, parameters and wall time per model."""
  lines = [f"{'model':<28}{'params':>9}{'in-dist':>10}{'shifted':>10}{'time':>9}"]
  for name in MODEL_NAMES:
    if name in results:
      r = results[name]
      label = f"{name} ({r['conv']})"
      lines.append(f"{label:<28}{r['num_params']:>9,}{r['test_accuracy']:>10.1%}"
                   f"{r['shifted_test_accuracy']:>10.1%}{r['wall_time_s']:>8.0f}s")
  if all(name in results for name in MODEL_NAMES):
    base, dcn = results["baseline"], results["dcn"]
    gain = lambda key: 100 * (dcn[key] - base[key])
    lines.append(f"{'dcn - baseline (points)':<37}{gain('test_accuracy'):>+10.1f}"
                 f"{gain('shifted_test_accuracy'):>+10.1f}")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Config:
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--workdir", default=defaults.workdir,
                      help="where results, figures and checkpoints go")
  parser.add_argument("--model", choices=MODEL_NAMES + ("both",), default=defaults.model)
  parser.add_argument("--dcn", choices=tuple(DEFORMABLE_CONVS), default=defaults.dcn,
                      help="the deformable convolution of the dcn model's last stage")
  parser.add_argument("--implementation", choices=("xla", "ffi"), default=None,
                      help="flaxdcn backend; default: native where built, else pure jnp")
  parser.add_argument("--seed", type=int, default=defaults.seed,
                      help="initialisation, batch order and training deformations")
  parser.add_argument("--epochs", type=int, default=defaults.epochs)
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                      help="global batch, split over all devices (of all processes)")
  parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
  parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
  parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
  parser.add_argument("--steps", type=int, default=None,
                      help="cap on the training steps per epoch (quick runs, smoke tests)")
  parser.add_argument("--train-size", type=int, default=None,
                      help="use only the first N of the 4000 training digits")
  parser.add_argument("--test-size", type=int, default=None,
                      help="use only the first N of the 1000 test digits")
  parser.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
  parser.add_argument("--resume", action="store_true",
                      help="continue from the checkpoints in --workdir")
  parallel.add_process_flags(parser)
  args = parser.parse_args(argv)
  if args.implementation == "ffi" and args.model != "baseline" and args.dcn in PURE_JNP_CONVS:
    parser.error(f"--implementation ffi: --dcn {args.dcn} (Deformable Kernels) has no native "
                 "kernel; leave --implementation out or pass --implementation xla (pure jnp).")
  return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the results."""
  config = parse_args(argv)
  parallel.initialize(config.coordinator_address, config.num_processes, config.process_id)
  log = print if parallel.is_chief() else (lambda *args, **kwargs: None)
  workdir = pathlib.Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names = MODEL_NAMES if config.model == "both" else (config.model,)

  data = load_data(config)
  processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
  log(f"{len(data.train_labels)} training digits, {len(data.test_labels)} test digits per test "
      f"set, {jax.device_count()} {jax.default_backend()} device(s){processes}, "
      f"flaxdcn implementation: {config.implementation or 'auto'}")

  results_path = workdir / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  # Keep another model's results from an earlier run only if it was trained the same way.
  results = {n: r for n, r in results.items()
             if n in MODEL_NAMES and r.get("config") == config.training_config(n)
             and r.get("epochs") == config.epochs}
  trained = {}
  for name in names:
    results[name], state, model = train_and_evaluate(name, config, data)
    trained[name] = (model, jax.device_get({"params": state.params,
                                            "batch_stats": state.batch_stats}))
    if parallel.is_chief():
      results_path.write_text(json.dumps(results, indent=2))

  # The ERF of every model in the table: trained now, or restored from its checkpoint.
  for name in results:
    if name not in trained:
      trained[name] = restore_variables(name, config)
  erfs = {}
  for name, (model, variables) in trained.items():
    maps, radius = figures.effective_receptive_field(model, variables,
                                                     data.test_digits[:ERF_DIGITS])
    results[name]["erf"] = {"scales": list(figures.ERF_SCALES), "radius_px": radius.tolist(),
                            "radius_slope_px_per_scale": figures.erf_slope(figures.ERF_SCALES,
                                                                           radius)}
    erfs[f"{name} ({results[name]['conv']})"] = (maps, radius)

  if parallel.is_chief():
    results_path.write_text(json.dumps(results, indent=2))
    figures.plot_curves({n: results[n]["history"] for n in MODEL_NAMES if n in results},
                        workdir / "curves.png")
    figures.plot_erf({k: erfs[k] for k in sorted(erfs)}, workdir / "erf.png",
                     digits=data.test_digits)
    if "dcn" in names and conv_name("dcn", config) in ("DeformConv", "ModulatedDeformConv"):
      model, variables = trained["dcn"]
      figures.plot_offsets(model, variables, data.test_digits, workdir / "offsets.png")

  log(format_table(results))
  log(f"Results, figures and checkpoints in {workdir}")
  return results


if __name__ == "__main__":
  main()
