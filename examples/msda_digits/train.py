"""Detects four digits per canvas with a small Deformable DETR and with the same model on dense
attention.

Both models (``models.DigitDETR``) have the same backbone, encoder and decoder layers, heads,
losses and training; the ``msda`` model attends with ``flaxdcn.MSDeformAttn`` (encoder
self-attention and decoder cross-attention), the ``baseline`` with
``flax.linen.MultiHeadDotProductAttention`` over all tokens of all levels. Query ``i`` predicts
the digit of quadrant ``i`` (class and box), so no matching is needed. With one seed both models
see the same canvases in the same order. Each is evaluated on fixed validation canvases after
every epoch and on fixed test canvases once, at the end: class accuracy, mean box IoU and the
fraction of digits with the right class and IoU >= 0.5; the train step's median time and
XLA's compiled temp memory are measured too. Outputs in ``--workdir``: ``results.json`` and
``attention.png`` (where the msda model's queries sampled).

Usage::

  python examples/msda_digits/train.py                      # both models, seed 0
  python examples/msda_digits/train.py --seeds 0 1 2        # mean and spread over seeds
  python examples/msda_digits/train.py --model msda --implementation xla
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1] / "roi_digits"))
import canvases  # noqa: E402,I001  (the RoI example's; puts examples/resnet_dcn on the path)
import models  # noqa: E402
import msda_figures  # noqa: E402
import parallel  # noqa: E402  (examples/resnet_dcn/parallel.py)

#: ``--model`` name -> ``models.DigitDETR.attention``.
MODELS = {"baseline": "dense", "msda": "msda"}
#: Loss weights of DETR: cross-entropy, L1 on the normalised ``(cx, cy, w, h)``, 1 - GIoU.
CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT = 1.0, 5.0, 2.0
#: Parameters that Deformable DETR trains at ``--linear-proj-lr-mult`` times the learning rate.
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters and options of a run (the command-line flags)."""

  workdir: str = "./runs/msda_digits"
  model: str = "both"
  seeds: tuple[int, ...] = (0,)
  implementation: str | None = None
  epochs: int = 16
  batch_size: int = 32
  learning_rate: float = 1e-3
  linear_proj_lr_mult: float = 0.1
  weight_decay: float = 1e-4
  clip_norm: float = 0.1
  warmup_epochs: float = 1.0
  steps: int | None = None
  train_size: int | None = None
  test_size: int | None = None
  eval_batch_size: int = 100
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0

  @property
  def model_names(self) -> tuple[str, ...]:
    return tuple(MODELS) if self.model == "both" else (self.model,)

  def training_config(self, name: str, seed: int) -> dict[str, Any]:
    """The fields that define how model ``name`` is trained with ``seed``."""
    keep = ("epochs", "batch_size", "learning_rate", "linear_proj_lr_mult", "weight_decay",
            "clip_norm", "warmup_epochs", "steps", "train_size")
    return {**{k: getattr(self, k) for k in keep}, "model": name, "seed": seed}


TrainState = train_state.TrainState


def init_variables(model: nn.Module, key: jax.Array) -> dict[str, Any]:
  """``model.init`` on one blank canvas.

  It runs once per seed, so it is compiled without XLA's backend optimisations, which take
  seconds per random initialiser on a CPU; the values agree with an optimised build to rounding.
  """
  images = jnp.zeros((1, canvases.CANVAS_SIZE, canvases.CANVAS_SIZE, 1))
  init = jax.jit(model.init).lower(key, images).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return init(key, images)


def create_model(name: str, config: Config) -> models.DigitDETR:
  return models.DigitDETR(attention=MODELS[name], num_classes=canvases.NUM_CLASSES,
                          num_queries=canvases.DIGITS_PER_CANVAS,
                          implementation=config.implementation)


def box_targets(tight: jax.Array) -> jax.Array:
  """Normalised ``(cx, cy, w, h)`` of tight pixel boxes ``(x1, y1, x2, y2)``."""
  return models.box_xyxy_to_cxcywh(tight / canvases.CANVAS_SIZE)


def detection_loss(outputs: dict[str, jax.Array], labels: jax.Array, targets: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DETR's loss on every decoder layer's predictions (auxiliary losses), query ``i`` against
  digit ``i``: cross-entropy, L1 on the normalised boxes and 1 - GIoU, each averaged over the
  digits and summed over the layers."""
  logits, boxes = outputs["logits"], outputs["boxes"]           # [layers, N, Q, ...]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None]).mean(axis=(1, 2))
  l1 = jnp.abs(boxes - targets[None]).sum(-1).mean(axis=(1, 2))
  giou = models.generalized_box_iou(models.box_cxcywh_to_xyxy(boxes),
                                    models.box_cxcywh_to_xyxy(targets)[None]).mean(axis=(1, 2))
  per_layer = CLASS_WEIGHT * ce + L1_WEIGHT * l1 + GIOU_WEIGHT * (1.0 - giou)
  return per_layer.sum(), {"class_loss": ce[-1], "l1_loss": l1[-1], "giou": giou[-1]}


def detection_metrics(outputs: dict[str, jax.Array], labels: jax.Array, tight: jax.Array
                      ) -> dict[str, jax.Array]:
  """Per digit, from the last decoder layer: the class is right, the box IoU with the tight
  box, and both (right class, IoU >= 0.5)."""
  correct = jnp.argmax(outputs["logits"][-1], -1) == labels
  boxes = models.box_cxcywh_to_xyxy(outputs["boxes"][-1]) * canvases.CANVAS_SIZE
  iou, _ = models.box_iou(boxes, tight)
  return {"correct": correct.astype(jnp.float32), "iou": iou,
          "detected": (correct & (iou >= 0.5)).astype(jnp.float32)}


def train_step(state: TrainState, digits: jax.Array, labels: jax.Array, data_key: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step on fresh canvases of ``digits`` ``[B, K, 28, 28]`` (labels ``[B, K]``)."""
  key = jax.random.fold_in(data_key, state.step)
  images, tight = canvases.draw_canvases(digits, key)

  def loss_fn(params):
    outputs = state.apply_fn({"params": params}, images)
    loss, aux = detection_loss(outputs, labels, box_targets(tight))
    return loss, (outputs, aux)

  (loss, (outputs, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  metrics = {k: jnp.mean(v) for k, v in detection_metrics(outputs, labels, tight).items()}
  return state, {"loss": loss, **aux, "accuracy": metrics["correct"], "iou": metrics["iou"]}


def eval_step(state: TrainState, images: jax.Array, tight: jax.Array, labels: jax.Array,
              weights: jax.Array) -> dict[str, jax.Array]:
  """Sums of the per-digit metrics and of the weights over a (padded) batch of canvases."""
  outputs = state.apply_fn({"params": state.params}, images)
  metrics = detection_metrics(outputs, labels, tight)
  sums = {k: jnp.sum(v * weights) for k, v in metrics.items()}
  return {**sums, "count": jnp.sum(weights)}


@dataclasses.dataclass(frozen=True)
class Data:
  """Training digits (laid out on the fly) and the fixed validation and test canvases."""

  train_digits: np.ndarray
  train_labels: np.ndarray
  validation: dict[str, np.ndarray]
  test: dict[str, np.ndarray]


def load_data(config: Config) -> Data:
  """The RoI example's splits and fixed canvases (validation: key 1, test: key 0)."""
  splits = canvases.load_splits()
  train_x, train_y = splits["train"]
  train_x, train_y = train_x[:config.train_size], train_y[:config.train_size]
  test_x, test_y = splits["test"]
  val_x, val_y = splits["validation"]
  keep = ("images", "tight", "labels")
  validation = canvases.make_test_sets(val_x[:config.test_size], val_y[:config.test_size], seed=1)
  test = canvases.make_test_sets(test_x[:config.test_size], test_y[:config.test_size], seed=0)
  return Data(train_x, train_y, {k: validation[k] for k in keep}, {k: test[k] for k in keep})


def linear_proj_mask(params: Any) -> Any:
  """True for the parameters of the ``LINEAR_PROJ_NAMES`` layers."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool({getattr(k, "key", None) for k in path} & set(LINEAR_PROJ_NAMES)),
      params)


def create_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
  """AdamW (weight decay on kernels), linear warm-up then cosine decay to zero, gradients
  clipped to a global norm of ``clip_norm``; Deformable DETR's sampling-offset and
  reference-point layers at ``linear_proj_lr_mult`` times the learning rate (AdamW's update,
  weight decay included, is proportional to the learning rate, so scaling those layers'
  updates is the same as their own learning rate)."""
  total = config.epochs * steps_per_epoch
  warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total)
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule, weight_decay=config.weight_decay,
                  mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params)),
      optax.masked(optax.scale(config.linear_proj_lr_mult), linear_proj_mask))


class Trainer:
  """Data-parallel training and evaluation of one model over all devices of all processes.

  Batches of canvases are split along a ``"batch"`` mesh axis (see ``parallel``); the train
  state is replicated, and XLA inserts the gradient reductions. The train step is compiled
  once, ahead of time, so that its memory analysis is read from the executable that trains.
  """

  def __init__(self, model: nn.Module, config: Config, steps_per_epoch: int):
    self.config = config
    self.model = model
    self.steps_per_epoch = steps_per_epoch
    mesh = parallel.batch_mesh()
    self.num_devices = mesh.size
    self.batch_sharding = parallel.batch_sharding(mesh)
    self.replicated = parallel.replicated(mesh)
    self.tx = create_optimizer(config, steps_per_epoch)
    self._train_step = jax.jit(
        train_step, donate_argnums=0,
        in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding, self.replicated),
        out_shardings=(self.replicated, self.replicated))
    self.compiled_step = None
    self.compile_time_s = 0.0
    self.eval_step = jax.jit(
        eval_step, in_shardings=(self.replicated,) + (self.batch_sharding,) * 4,
        out_shardings=self.replicated)

  def init_state(self, key: jax.Array) -> TrainState:
    variables = init_variables(self.model, key)
    state = TrainState.create(apply_fn=self.model.apply, params=variables["params"], tx=self.tx)
    return jax.device_put(state, self.replicated)

  def step(self, state: TrainState, digits: jax.Array, labels: jax.Array, data_key: jax.Array):
    if self.compiled_step is None:
      start = time.perf_counter()
      self.compiled_step = self._train_step.lower(state, digits, labels, data_key).compile()
      self.compile_time_s = time.perf_counter() - start
    return self.compiled_step(state, digits, labels, data_key)

  def memory(self) -> dict[str, int]:
    """XLA's memory analysis of the compiled train step, in bytes."""
    stats = self.compiled_step.memory_analysis()
    return {"temp_bytes": int(stats.temp_size_in_bytes),
            "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes)}

  def train_epoch(self, state: TrainState, data: Data, seed: int, epoch: int,
                  data_key: jax.Array, progress: tqdm
                  ) -> tuple[TrainState, dict[str, float], list[tuple[float, float]]]:
    """One pass over a fresh grouping of the training digits into canvases; also returns the
    wall time and the process's CPU time (all threads) of every step."""
    order = np.random.default_rng((seed, epoch)).permutation(len(data.train_labels))
    digits, labels = canvases.group_digits(data.train_digits, data.train_labels, order)
    batch_size = self.config.batch_size
    records, times = [], []
    for step in range(self.steps_per_epoch):
      rows = slice(step * batch_size, (step + 1) * batch_size)
      batch = (parallel.global_batch(self.batch_sharding, digits[rows]),
               parallel.global_batch(self.batch_sharding, labels[rows]))
      start, cpu_start = time.perf_counter(), time.process_time()
      state, metrics = self.step(state, *batch, data_key)
      # float() waits for the step: honest step times and progress.
      records.append({k: float(v) for k, v in metrics.items()})
      times.append((time.perf_counter() - start, time.process_time() - cpu_start))
      progress.update()
      progress.set_postfix(epoch=epoch + 1, loss=f"{records[-1]['loss']:.3f}", refresh=False)
    mean = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
    return state, {"train_" + k: v for k, v in mean.items()}, times

  def evaluate(self, state: TrainState, sets: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy, mean IoU and detection rate over every digit of the fixed canvases ``sets``."""
    n = len(sets["labels"])
    batch = -(-min(self.config.eval_batch_size, n) // self.num_devices) * self.num_devices
    totals: dict[str, float] = {}
    for start in range(0, n, batch):
      rows = slice(start, start + batch)
      arrays = [sets["images"][rows], sets["tight"][rows], sets["labels"][rows],
                np.ones(sets["labels"][rows].shape, np.float32)]
      pad = batch - len(arrays[0])
      # Padding canvases are blank, with weight 0.
      arrays = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in arrays]
      sums = self.eval_step(state, *(parallel.global_batch(self.batch_sharding, a)
                                     for a in arrays))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    return {"accuracy": totals["correct"] / count, "mean_iou": totals["iou"] / count,
            "detection_rate": totals["detected"] / count}


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


def train_and_evaluate(trainer: Trainer, name: str, seed: int, config: Config, data: Data
                       ) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Trains one model with one seed, validating after every epoch; tests once at the end.

  Returns:
    the results, and for the msda model the cross-attention samples on the test canvases (see
    ``msda_figures.cross_attention_samples``; None for the baseline).
  """
  init_key, data_key = jax.random.split(jax.random.key(seed))
  state = trainer.init_state(init_key)
  history, step_times = [], []
  start = time.perf_counter()
  cpu_start = time.process_time()
  progress = tqdm(total=config.epochs * trainer.steps_per_epoch, desc=f"{name:>8} s{seed}",
                  unit="step", dynamic_ncols=True, file=sys.stdout,
                  disable=not parallel.is_chief())
  with progress:
    for epoch in range(config.epochs):
      state, record, times = trainer.train_epoch(state, data, seed, epoch, data_key, progress)
      step_times += times
      record["epoch"] = epoch + 1
      record.update({"validation_" + k: v
                     for k, v in trainer.evaluate(state, data.validation).items()})
      record["wall_time_s"] = time.perf_counter() - start
      history.append(record)
      progress.set_postfix(epoch=epoch + 1, loss=f"{record['train_loss']:.3f}",
                           val_acc=f"{record['validation_accuracy']:.1%}",
                           val_iou=f"{record['validation_mean_iou']:.3f}")
  if not history:
    raise ValueError("No epoch was trained (--epochs 0).")
  wall_time, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start
  test = trainer.evaluate(state, data.test)
  # The first step after compilation warms caches and thread pools; the median ignores it too.
  timed = np.asarray(step_times[1:] or step_times)
  samples = None
  if MODELS[name] == "msda":
    samples = msda_figures.cross_attention_samples(trainer.model, jax.device_get(state.params),
                                                   data.test["images"])
  result = {
      "test_accuracy": test["accuracy"],
      "test_mean_iou": test["mean_iou"],
      "test_detection_rate": test["detection_rate"],
      **{k: v for k, v in history[-1].items() if k.startswith("validation_")},
      "num_params": count_params(state.params),
      **({"test_attention_on_digit": msda_figures.attention_on_digits(samples, data.test["tight"])}
         if samples is not None else {}),
      "step_time_s": float(np.median(timed[:, 0])),
      "step_cpu_time_s": float(np.median(timed[:, 1])),
      "train_step_memory": trainer.memory(),
      "compile_time_s": trainer.compile_time_s,
      "wall_time_s": wall_time,
      "cpu_time_s": cpu_time,
      "epochs": config.epochs,
      "steps_per_epoch": trainer.steps_per_epoch,
      "implementation": config.implementation or "auto",
      "devices": f"{jax.device_count()} x {jax.default_backend()} in "
                 f"{jax.process_count()} process(es)",
      "config": config.training_config(name, seed),
      "history": history,
  }
  return result, samples


METRICS = ("test_accuracy", "test_mean_iou", "test_detection_rate", "validation_accuracy",
           "validation_mean_iou", "step_time_s", "step_cpu_time_s", "wall_time_s")


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Mean and standard deviation over seeds of every metric, per model; the temp memory and
  parameter count (the same for every seed)."""
  out = {}
  for name in (m for m in MODELS if m in runs):
    by_seed = runs[name]
    out[name] = {"seeds": sorted(int(s) for s in by_seed)}
    for m in METRICS:
      values = np.asarray([r[m] for r in by_seed.values()])
      out[name][m] = float(values.mean())
      out[name][m + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    first = next(iter(by_seed.values()))
    out[name]["num_params"] = first["num_params"]
    out[name]["temp_bytes"] = first["train_step_memory"]["temp_bytes"]
  return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
  """Test metrics (mean ± std over seeds), step time (wall and CPU) and temp memory per model."""
  lines = [f"{'model':<10}{'seeds':>6}{'params':>9}{'accuracy':>15}{'mean IoU':>17}"
           f"{'step':>9}{'step CPU':>10}{'temp MiB':>10}"]
  for name, r in summary.items():
    acc = f"{100 * r['test_accuracy']:.1f} ± {100 * r['test_accuracy_std']:.1f}"
    iou = f"{r['test_mean_iou']:.3f} ± {r['test_mean_iou_std']:.3f}"
    lines.append(f"{name:<10}{len(r['seeds']):>6}{r['num_params']:>9,}{acc:>15}{iou:>17}"
                 f"{1000 * r['step_time_s']:>7.0f}ms{1000 * r['step_cpu_time_s']:>8.0f}ms"
                 f"{r['temp_bytes'] / 2**20:>10.1f}")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Config:
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--workdir", default=defaults.workdir,
                      help="where results.json and attention.png go")
  parser.add_argument("--model", choices=("both",) + tuple(MODELS), default=defaults.model)
  parser.add_argument("--seeds", "--seed", nargs="+", type=int, default=list(defaults.seeds),
                      help="initialisation, batch order and training canvases; results report "
                           "the mean and spread over seeds")
  parser.add_argument("--implementation", choices=("xla", "ffi"), default=None,
                      help="flaxdcn backend of MSDA; default: native where built, else pure jnp")
  parser.add_argument("--epochs", type=int, default=defaults.epochs)
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                      help="global batch of canvases (4 digits each), split over all devices")
  parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
  parser.add_argument("--linear-proj-lr-mult", type=float, default=defaults.linear_proj_lr_mult,
                      help="learning-rate factor of the sampling-offset and reference-point "
                           "layers (Deformable DETR's lr_linear_proj_mult)")
  parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
  parser.add_argument("--clip-norm", type=float, default=defaults.clip_norm,
                      help="global gradient-norm clip")
  parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
  parser.add_argument("--steps", type=int, default=None,
                      help="cap on the training steps per epoch (quick runs, smoke tests)")
  parser.add_argument("--train-size", type=int, default=None,
                      help="use only the first N of the 3500 training digits")
  parser.add_argument("--test-size", type=int, default=None,
                      help="use only the first N test (and validation) digits")
  parser.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size,
                      help="canvases per evaluation batch")
  parallel.add_process_flags(parser)
  args = parser.parse_args(argv)
  values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
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
  log(f"{len(data.train_labels)} training digits; {data.test['labels'].size} test digits on "
      f"{len(data.test['labels'])} canvases; {jax.device_count()} {jax.default_backend()} "
      f"device(s) in {jax.process_count()} process(es); flaxdcn implementation: "
      f"{config.implementation or 'auto'}")

  results_path = workdir / "results.json"
  saved = json.loads(results_path.read_text()) if results_path.exists() else {}
  # Earlier runs of other models or seeds stay when they were trained the same way.
  runs: dict[str, dict[str, Any]] = {}
  for name, by_seed in saved.get("runs", {}).items():
    for seed, r in by_seed.items():
      if name in MODELS and r.get("config") == config.training_config(name, int(seed)):
        runs.setdefault(name, {})[seed] = r
  figure = None
  steps = steps_per_epoch(config, data)
  results: dict[str, Any] = {}
  for name in config.model_names:
    trainer = Trainer(create_model(name, config), config, steps)
    for seed in config.seeds:
      result, samples = train_and_evaluate(trainer, name, seed, config, data)
      runs.setdefault(name, {})[str(seed)] = result
      if samples is not None and figure is None:
        figure = (seed, trainer.model, samples)
      results = {"summary": summarize(runs), "runs": runs}
      if parallel.is_chief():   # after every run: an interrupted command keeps what it did
        results_path.write_text(json.dumps(results, indent=2))
  if parallel.is_chief() and figure is not None:
    seed, model, samples = figure
    size = canvases.CANVAS_SIZE
    msda_figures.plot_attention(samples, data.test["images"], workdir / "attention.png",
                                level_shapes=model.level_shapes(size, size),
                                title=f"msda, seed {seed}")
  log(format_table(results["summary"]))
  log(f"Results and figure in {workdir}")
  return results


if __name__ == "__main__":
  main()
