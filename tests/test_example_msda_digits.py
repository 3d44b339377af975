"""Tests of the MSDA example (examples/msda_digits): boxes, positions, the two models, the loss,
the optimiser, the figure's arithmetic, and a smoke run of the command line."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLE_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples" / "msda_digits"

pytest.importorskip("matplotlib", reason="the examples extra (matplotlib) is missing")
pytest.importorskip("optax", reason="the examples extra (optax, tqdm) is missing")
pytest.importorskip("tqdm", reason="the examples extra (optax, tqdm) is missing")
pytest.importorskip("mlxtend", reason="the examples extra (mlxtend) is missing")

#: Long integration tests: run by .ci/run after the default suite (pytest -m extended).
pytestmark = pytest.mark.extended


def _load_example():
  """The example's ``models`` and ``train`` (and ``msda_figures``, which ``train`` imports).

  The conv example has a ``models`` and a ``train`` too: both files are loaded under names of
  their own, ``models`` is this example's while ``train`` executes, and afterwards
  ``sys.modules["models"]`` is whatever it was before.
  """
  saved = sys.modules.pop("models", None)
  sys.path.insert(0, str(EXAMPLE_DIR))
  try:
    loaded = {}
    for name in ("models", "train"):
      spec = importlib.util.spec_from_file_location(f"msda_digits_{name}",
                                                    EXAMPLE_DIR / f"{name}.py")
      module = importlib.util.module_from_spec(spec)
      sys.modules[spec.name] = module   # dataclasses look their module up while it executes
      if name == "models":
        sys.modules["models"] = module
      spec.loader.exec_module(module)
      loaded[name] = module
  finally:
    sys.path.remove(str(EXAMPLE_DIR))
    sys.modules.pop("models", None)
    if saved is not None:
      sys.modules["models"] = saved
  assert loaded["train"].models is loaded["models"]
  return loaded["models"], loaded["train"].msda_figures, loaded["train"]


models, msda_figures, train = _load_example()
canvases = train.canvases
SIZE = canvases.CANVAS_SIZE


# --- boxes and positions --------------------------------------------------------------------------

def test_box_conversions_iou_and_giou():
  a = jnp.asarray([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
  b = jnp.asarray([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
  iou, union = models.box_iou(a, b)
  np.testing.assert_allclose(iou, [1 / 7, 1.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(union, [7.0, 1.0, 2.0], rtol=1e-6)
  # Hulls: 3 x 3 = 9, 1, 3 x 1 = 3.
  np.testing.assert_allclose(models.generalized_box_iou(a, b),
                             [1 / 7 - 2 / 9, 1.0, 0.0 - 1 / 3], rtol=1e-6)
  cxcywh = models.box_xyxy_to_cxcywh(a)
  np.testing.assert_allclose(cxcywh[0], [1.0, 1.0, 2.0, 2.0])
  np.testing.assert_allclose(models.box_cxcywh_to_xyxy(cxcywh), a)
  x = jnp.asarray([0.1, 0.5, 0.9])
  np.testing.assert_allclose(jax.nn.sigmoid(models.inverse_sigmoid(x)), x, rtol=1e-5)
  assert np.isfinite(models.inverse_sigmoid(jnp.asarray([0.0, 1.0]))).all()


def test_sine_position_embedding():
  h, w, c = 3, 5, 8
  pos = models.sine_position_embedding(h, w, c)
  assert pos.shape == (h * w, c)
  i, j = 2, 3
  y, x = (i + 0.5) / h * 2 * math.pi, (j + 0.5) / w * 2 * math.pi
  freqs = 10000.0 ** (2 * (np.arange(c // 2) // 2) / (c // 2))   # 1, 1, 100, 100
  expected_y = [np.sin(y / freqs[0]), np.cos(y / freqs[1]), np.sin(y / freqs[2]),
                np.cos(y / freqs[3])]
  expected_x = [np.sin(x / freqs[0]), np.cos(x / freqs[1]), np.sin(x / freqs[2]),
                np.cos(x / freqs[3])]
  np.testing.assert_allclose(pos[i * w + j], expected_y + expected_x, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="divisible by 4"):
    models.sine_position_embedding(2, 2, 6)


def test_encoder_reference_points_are_cell_centres_on_every_level():
  ref = models.encoder_reference_points(((2, 4), (1, 2)))
  assert ref.shape == (10, 2, 2)
  np.testing.assert_allclose(ref[:, 0], ref[:, 1])
  np.testing.assert_allclose(ref[7, 0], [3.5 / 4, 1.5 / 2])    # level 0, row 1, column 3
  np.testing.assert_allclose(ref[9, 0], [0.75, 0.5])           # level 1, row 0, column 1


# --- the models -----------------------------------------------------------------------------------

def _model(name):
  return train.create_model(name, train.Config(implementation="xla"))


def _variables(name, key=0):
  return train.init_variables(_model(name), jax.random.key(key))


def _paths(tree):
  return {"/".join(str(k.key) for k in p): leaf.shape
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_models_differ_only_in_the_attention_layers():
  dense, msda = _paths(_variables("baseline")["params"]), _paths(_variables("msda")["params"])
  attention = ("encoder_layer_0/self_attn/", "decoder_layer_0/cross_attn/",
               "decoder_layer_1/cross_attn/")
  outside = lambda paths: {p: s for p, s in paths.items() if not p.startswith(attention)}
  assert outside(dense) == outside(msda)
  msda_layers = {p.split("/", 2)[2] for p in msda if p.startswith(attention)}
  assert msda_layers == {f"{layer}/{kind}" for layer in ("sampling_offsets", "attention_weights",
                                                         "value_proj", "output_proj")
                         for kind in ("kernel", "bias")}
  dense_layers = {p.split("/", 2)[2].split("/")[0] for p in dense if p.startswith(attention)}
  assert dense_layers == {"query", "key", "value", "out"}


@pytest.mark.parametrize("name", ["baseline", "msda"])
def test_outputs_and_box_refinement(name):
  model = _model(name)
  variables = _variables(name)
  images = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 1))
  out = model.apply(variables, images)
  assert out["logits"].shape == (2, 2, 4, 10)
  assert out["boxes"].shape == out["reference_boxes"].shape == (2, 2, 4, 4)
  # Layer 2 attends around layer 1's box; the box heads start at zero: no refinement yet.
  np.testing.assert_allclose(out["reference_boxes"][1], out["boxes"][0])
  np.testing.assert_allclose(out["boxes"][0], out["reference_boxes"][0], rtol=1e-4, atol=1e-6)
  # Every image gets the same first reference boxes (from the learned queries).
  np.testing.assert_allclose(out["reference_boxes"][0, 0], out["reference_boxes"][0, 1])

  # The refined box goes to the next layer with its gradient stopped.
  params = variables["params"]
  params["bbox_embed_0"]["layers_2"]["bias"] = jnp.asarray([0.3, -0.2, 0.1, 0.2])

  def last_box(p):
    return jnp.sum(model.apply({"params": p}, images)["boxes"][1])

  def first_box(p):
    return jnp.sum(model.apply({"params": p}, images)["boxes"][0])

  grads_last = jax.grad(last_box)(params)
  assert all(not np.any(g) for g in jax.tree.leaves(grads_last["bbox_embed_0"]))
  assert any(np.any(g) for g in jax.tree.leaves(grads_last["bbox_embed_1"]))
  assert any(np.any(g) for g in jax.tree.leaves(jax.grad(first_box)(params)["bbox_embed_0"]))


def test_msda_samples_around_the_reference_boxes():
  """At init, decoder head 0 (angle 0) samples point ``p`` at ``cx + (p + 1) / P * w / 2`` on
  every level, the encoder samples around each token's cell centre, and the figure's weights
  sum to 1 per query."""
  model = _model("msda")
  variables = _variables("msda")
  images = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 1))
  out, state = model.apply(variables, images, mutable=["intermediates"])
  sown = state["intermediates"]
  loc = np.asarray(sown["decoder_layer_0"]["cross_attn"]["sampling_locations"][0])
  p = model.num_points
  assert loc.shape == (2, 4, model.num_heads, model.num_levels, p, 2)
  ref = np.asarray(out["reference_boxes"][0])                                 # [N, Q, 4]
  expected_x = ref[:, :, None, 0] + (np.arange(p) + 1) / p * ref[:, :, None, 2] / 2
  for level in range(model.num_levels):
    np.testing.assert_allclose(loc[:, :, 0, level, :, 0], expected_x, rtol=1e-5)
    np.testing.assert_allclose(loc[:, :, 0, level, :, 1],
                               np.broadcast_to(ref[:, :, None, 1], expected_x.shape), rtol=1e-5)
  enc = np.asarray(sown["encoder_layer_0"]["self_attn"]["sampling_locations"][0])
  shapes = model.level_shapes(SIZE, SIZE)
  assert shapes == ((12, 12), (6, 6), (3, 3))
  assert enc.shape[1] == sum(h * w for h, w in shapes)
  # Token 0 is level 0's top-left cell: head 0's first point is one level-l pixel to its right.
  for level, (h, w) in enumerate(shapes):
    np.testing.assert_allclose(enc[0, 0, 0, level, 0], [0.5 / 12 + 1 / w, 0.5 / 12], rtol=1e-5)

  # With trained (here: random) offset and weight layers, the first decoder layer still samples
  # the same on every canvas (its queries have not seen the image), the second does not.
  heads = ("sampling_offsets", "attention_weights")
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(jax.random.key(len(path)), x.shape) * 0.1
                       if len(path) > 1 and path[-2].key in heads else x),
      variables["params"])
  _, state = model.apply({"params": params}, images, mutable=["intermediates"])
  for i, same in ((0, True), (1, False)):
    sown = state["intermediates"][f"decoder_layer_{i}"]["cross_attn"]
    for name in ("sampling_locations", "softmax_attention_weights"):
      value = np.asarray(sown[name][0])
      assert np.allclose(value[0], value[1]) == same, (i, name)

  samples = msda_figures.cross_attention_samples(model, variables["params"], images)
  assert len(samples["locations"]) == len(samples["weights"]) == 2
  np.testing.assert_allclose(samples["weights"][1].sum(axis=(2, 3, 4)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(samples["locations"][0], loc * SIZE, rtol=1e-5)


def test_weight_inside_boxes():
  locations = np.zeros((1, 2, 1, 1, 3, 2))
  locations[0, 0, 0, 0] = [[5, 5], [15, 5], [10, 10]]        # query 0: in, out, on the edge
  locations[0, 1, 0, 0] = [[30, 30], [31, 31], [1, 1]]
  weights = np.zeros((1, 2, 1, 1, 3))
  weights[0, 0, 0, 0] = [0.5, 0.3, 0.2]
  weights[0, 1, 0, 0] = [0.25, 0.25, 0.5]
  boxes = np.asarray([[[0.0, 0.0, 10.0, 10.0], [29.0, 29.0, 40.0, 40.0]]])
  np.testing.assert_allclose(msda_figures.weight_inside_boxes(locations, weights, boxes),
                             [[0.7, 0.5]])
  samples = {"locations": [locations], "weights": [weights]}
  np.testing.assert_allclose(msda_figures.attention_on_digits(samples, boxes), [0.6])


# --- loss, metrics, optimiser ---------------------------------------------------------------------

def test_detection_loss_and_metrics():
  labels = jnp.asarray([[3, 1]])
  tight = jnp.asarray([[[0.0, 0.0, 24.0, 24.0], [24.0, 12.0, 48.0, 36.0]]])
  targets = train.box_targets(tight)
  np.testing.assert_allclose(targets[0, 1], [0.75, 0.5, 0.5, 0.5])
  logits = jnp.zeros((2, 1, 2, 10)).at[:, 0, 0, 3].set(10.0).at[:, 0, 1, 2].set(10.0)
  wrong = targets.at[0, 1, 0].add(0.25)      # query 1's box moved right by a quarter canvas
  outputs = {"logits": logits, "boxes": jnp.stack([wrong, targets])}
  loss, aux = train.detection_loss(outputs, labels, targets)
  ce = np.asarray([np.log1p(9 * np.exp(-10.0)), 10.0 + np.log1p(9 * np.exp(-10.0))]).mean()
  giou_moved = 1 / 3 - 0.0                    # half the box overlaps; the hull is the union
  expected_first = ce + 5 * 0.25 / 2 + 2 * (1 - (1 + giou_moved) / 2)
  np.testing.assert_allclose(loss, expected_first + ce, rtol=1e-4)
  np.testing.assert_allclose(aux["giou"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux["l1_loss"], 0.0, atol=1e-7)

  metrics = train.detection_metrics({"logits": logits, "boxes": outputs["boxes"][::-1]},
                                    labels, tight)
  np.testing.assert_allclose(metrics["correct"], [[1.0, 0.0]])
  np.testing.assert_allclose(metrics["iou"], [[1.0, 1 / 3]], rtol=1e-5)
  np.testing.assert_allclose(metrics["detected"], [[1.0, 0.0]])


def test_linear_projection_layers_learn_at_a_tenth():
  params = _variables("msda")["params"]
  mask = train.linear_proj_mask(params)
  slow = {"/".join(k.key for k in path)
          for path, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  assert slow == {"reference_points/kernel", "reference_points/bias"} | {
      f"{layer}/sampling_offsets/{kind}" for layer in
      ("encoder_layer_0/self_attn", "decoder_layer_0/cross_attn", "decoder_layer_1/cross_attn")
      for kind in ("kernel", "bias")}
  grads = jax.tree.map(jnp.ones_like, params)
  updates = {}
  for mult in (0.1, 1.0):
    config = train.Config(linear_proj_lr_mult=mult, warmup_epochs=0.0, clip_norm=1e9)
    tx = train.create_optimizer(config, steps_per_epoch=10)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)        # step 0 has learning rate 0 (warm-up)
    updates[mult], _ = tx.update(grads, state, params)
  for path, m in jax.tree_util.tree_leaves_with_path(mask):
    fast = np.asarray(_get(updates[1.0], path))
    assert np.any(fast)
    np.testing.assert_allclose(_get(updates[0.1], path), fast * (0.1 if m else 1.0), rtol=1e-6)


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


# --- the training entry point ---------------------------------------------------------------------

SMOKE = ["--epochs", "1", "--steps", "2", "--batch-size", "4", "--train-size", "64",
         "--test-size", "16", "--eval-batch-size", "4", "--implementation", "xla"]
KEYS = ("test_accuracy", "test_mean_iou", "test_detection_rate", "validation_accuracy",
        "validation_mean_iou", "num_params", "step_time_s", "train_step_memory",
        "step_cpu_time_s", "compile_time_s", "wall_time_s", "cpu_time_s", "history", "config")


def test_smoke_run_writes_sane_results_and_the_figure(tmp_path, capsys):
  workdir = tmp_path / "run"
  results = train.main(SMOKE + ["--workdir", str(workdir)])
  table = capsys.readouterr().out
  assert "baseline" in table and "msda" in table and "temp MiB" in table

  saved = json.loads((workdir / "results.json").read_text())
  assert saved["summary"] == results["summary"]
  assert set(saved["runs"]) == {"baseline", "msda"}
  for name in ("baseline", "msda"):
    r = saved["runs"][name]["0"]
    assert all(k in r for k in KEYS)
    for key in ("test_accuracy", "test_mean_iou", "test_detection_rate", "validation_accuracy"):
      assert 0.0 <= r[key] <= 1.0
    assert r["steps_per_epoch"] == 2 and len(r["history"]) == 1
    assert all(np.isfinite(v) for k, v in r["history"][0].items() if k.startswith("train_"))
    assert r["history"][0]["train_loss"] > 0
    assert r["step_time_s"] > 0 and r["step_cpu_time_s"] > 0
    assert r["train_step_memory"]["temp_bytes"] > 0
    assert r["config"]["model"] == name and r["implementation"] == "xla"
    assert saved["summary"][name]["seeds"] == [0]
  on_digit = saved["runs"]["msda"]["0"]["test_attention_on_digit"]
  assert len(on_digit) == 2 and all(0.0 <= v <= 1.0 for v in on_digit)
  assert "test_attention_on_digit" not in saved["runs"]["baseline"]["0"]
  assert saved["runs"]["msda"]["0"]["num_params"] != saved["runs"]["baseline"]["0"]["num_params"]
  assert (workdir / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Another seed of one model adds to the summary; a run trained otherwise is not mixed in.
  train.main(SMOKE + ["--model", "baseline", "--seed", "1", "--workdir", str(workdir)])
  again = json.loads((workdir / "results.json").read_text())
  assert again["summary"]["baseline"]["seeds"] == [0, 1]
  assert again["runs"]["msda"]["0"] == saved["runs"]["msda"]["0"]
  train.main(SMOKE[2:] + ["--epochs", "2", "--model", "baseline", "--workdir", str(workdir)])
  third = json.loads((workdir / "results.json").read_text())
  assert set(third["runs"]) == {"baseline"} and set(third["runs"]["baseline"]) == {"0"}


@pytest.mark.slow
def test_data_parallel_two_devices(tmp_path):
  """The command line on 2 (forced) CPU devices: batches split over a 'batch' mesh axis."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, str(EXAMPLE_DIR / "train.py"), *SMOKE, "--model", "msda",
         "--workdir", str(tmp_path)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "2 cpu device(s)" in out.stdout
  r = json.loads((tmp_path / "results.json").read_text())["runs"]["msda"]["0"]
  assert r["devices"].startswith("2 x cpu") and np.isfinite(r["history"][0]["train_loss"])
