"""Tests of the ResNet-DCN example (examples/resnet_dcn): data, models, and a smoke run."""

import dataclasses
import functools
import itertools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxdcn

#: Long integration tests: run by .ci/run after the default suite (pytest -m extended).
pytestmark = pytest.mark.extended

EXAMPLE_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples" / "resnet_dcn"
sys.path.insert(0, str(EXAMPLE_DIR))

figures = pytest.importorskip("figures", reason="the examples extra (matplotlib) is missing")
input_pipeline = pytest.importorskip("input_pipeline")
models = pytest.importorskip("models")
checkpoints = pytest.importorskip("checkpoints",
                                  reason="the examples extra (orbax-checkpoint) is missing")
train = pytest.importorskip("train", reason="the examples extra (optax, tqdm) is missing")

CANVAS = input_pipeline.CANVAS_SIZE


def _saved(workdir, name):
  """The steps of model ``name``'s checkpoints, and the latest one's metadata."""
  with checkpoints.Checkpoints(train.run_dir(workdir, name)) as saved:
    return saved.steps(), saved.read_meta()


def _flat_shapes(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _init(model, key=0, batch=2):
  x = jnp.zeros((batch, CANVAS, CANVAS, 1))
  return model.init(jax.random.key(key), x, train=False), x


def _init_shapes(model):
  """The variables' shapes and dtypes, without computing them."""
  x = jax.ShapeDtypeStruct((2, CANVAS, CANVAS, 1), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


# --- data -----------------------------------------------------------------------------------------

def test_mnist_5k_file():
  images, labels = input_pipeline.load_mnist_5k()
  assert images.shape == (5000, 28, 28) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))
  (train_x, train_y), (test_x, test_y) = input_pipeline.split(images, labels)
  assert train_x.shape == (4000, 28, 28) and test_x.shape == (1000, 28, 28)
  assert len(set(test_y.tolist())) == 10   # shuffled: the file itself is sorted by label


@pytest.mark.parametrize("deformation", [input_pipeline.TRAIN_RANGE,
                                         input_pipeline.SHIFTED_RANGE],
                         ids=["train", "shifted"])
def test_sampled_transforms_stay_in_range(deformation):
  t = input_pipeline.sample_transforms(jax.random.key(1), 4000, deformation)
  scale, angle, shift = (np.asarray(t[k]) for k in ("scale", "angle", "shift"))
  in_some = np.zeros(scale.shape, bool)
  for lo, hi in deformation.scales:
    in_some |= (scale >= lo * (1 - 1e-6)) & (scale <= hi * (1 + 1e-6))
  assert in_some.all()
  magnitude = np.abs(np.rad2deg(angle))
  assert (magnitude >= deformation.rotation[0] - 1e-4).all()
  assert (magnitude <= deformation.rotation[1] + 1e-4).all()
  assert (angle > 0).any() and (angle < 0).any()
  assert (np.abs(shift) <= deformation.translation).all()
  if len(deformation.scales) == 2:   # shrunk and enlarged digits alike
    assert 0.4 < np.mean(scale < 1) < 0.6


def test_warp_geometry():
  digit = np.zeros((1, 28, 28), np.float32)
  digit[0, 13:15, 20:22] = 1.0       # a blob right of the centre (13.5, 13.5)
  one, zero = jnp.ones(1), jnp.zeros(1)

  def centre(image):
    ys, xs = np.nonzero(np.asarray(image)[0, ..., 0] > 0.25)
    return ys.mean(), xs.mean()

  c = (CANVAS - 1) / 2
  y, x = centre(input_pipeline.warp(digit, one, zero, jnp.zeros((1, 2))))
  np.testing.assert_allclose((y, x), (c, c + 7), atol=0.3)
  y, x = centre(input_pipeline.warp(digit, 2 * one, zero, jnp.zeros((1, 2))))
  np.testing.assert_allclose((y, x), (c, c + 14), atol=0.6)
  # +90 degrees turns the digit counter-clockwise on screen: right of centre -> above it.
  y, x = centre(input_pipeline.warp(digit, one, jnp.full(1, np.pi / 2), jnp.zeros((1, 2))))
  np.testing.assert_allclose((y, x), (c - 7, c), atol=0.3)
  y, x = centre(input_pipeline.warp(digit, one, zero, jnp.asarray([[2.0, -3.0]])))
  np.testing.assert_allclose((y, x), (c + 2, c + 4), atol=0.3)


def test_test_sets_are_fixed_and_differ():
  digits = input_pipeline.load_mnist_5k()[0][:8]
  a, b = input_pipeline.make_test_sets(digits), input_pipeline.make_test_sets(digits)
  for name in ("test", "shifted_test"):
    assert a[name].shape == (8, CANVAS, CANVAS, 1)
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.allclose(a["test"], a["shifted_test"])


# --- models ---------------------------------------------------------------------------------------

DCN_CHOICES = ["dcnv2", "dcnv1", "dk-global", "dk-local"]


@pytest.mark.parametrize("name,dcn", [("baseline", "dcnv2")] + [("dcn", d) for d in DCN_CHOICES],
                         ids=["baseline"] + DCN_CHOICES)
def test_model_output_shape(name, dcn):
  model = train.create_model(name, train.Config(dcn=dcn))
  variables, x = _init(model, batch=3)
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (3, 10)
  logits, updates = model.apply(variables, x, mutable=["batch_stats"])
  assert logits.shape == (3, 10) and "batch_stats" in updates


def _extra_params(dcn):
  """The deformable model's parameters that the baseline lacks: the offset heads."""
  if dcn.startswith("dcn"):
    taps = 27 if dcn == "dcnv2" else 18   # offsets (2 per tap) and, for DCNv2, a mask
    return {"ResNetBlock_2/conv1/conv_offset/kernel": (3, 3, 32, taps),
            "ResNetBlock_2/conv1/conv_offset/bias": (taps,),
            "ResNetBlock_2/conv2/conv_offset/kernel": (3, 3, 64, taps),
            "ResNetBlock_2/conv2/conv_offset/bias": (taps,)}
  if dcn == "dk-global":                  # global pool + dense: one (dy, dx) per tap and image
    return {"ResNetBlock_2/conv1/fc_offset/kernel": (32, 18),
            "ResNetBlock_2/conv1/fc_offset/bias": (18,),
            "ResNetBlock_2/conv2/fc_offset/kernel": (64, 18),
            "ResNetBlock_2/conv2/fc_offset/bias": (18,)}
  return {"ResNetBlock_2/conv1/conv_offset/kernel": (3, 3, 32, 18),   # dk-local: per position
          "ResNetBlock_2/conv1/conv_offset/bias": (18,),
          "ResNetBlock_2/conv2/conv_offset/kernel": (3, 3, 64, 18),
          "ResNetBlock_2/conv2/conv_offset/bias": (18,)}


@pytest.mark.parametrize("dcn", DCN_CHOICES)
def test_deformable_model_shares_all_but_offset_heads(dcn):
  """Same parameter paths as the baseline plus the offset heads.

  Every shared path has the baseline's shape, except that a Deformable Kernels layer's ``kernel``
  is its 5 x 5 scope, from which the 3 x 3 kernel is resampled.
  """
  config = train.Config(dcn=dcn)
  base = _init_shapes(train.create_model("baseline", config))
  deform = _init_shapes(train.create_model("dcn", config))
  base_params, deform_params = _flat_shapes(base["params"]), _flat_shapes(deform["params"])
  assert set(base_params) <= set(deform_params)
  assert {p: s for p, s in deform_params.items() if p not in base_params} == _extra_params(dcn)
  reshaped = {p: (base_params[p], s) for p, s in deform_params.items()
              if p in base_params and base_params[p] != s}
  if dcn.startswith("dk"):
    scope = train.DK_SCOPE_SIZE
    assert reshaped == {
        "ResNetBlock_2/conv1/kernel": ((3, 3, 32, 64), (scope, scope, 32, 64)),
        "ResNetBlock_2/conv2/kernel": ((3, 3, 64, 64), (scope, scope, 64, 64))}
  else:
    assert reshaped == {}
  assert _flat_shapes(base["batch_stats"]) == _flat_shapes(deform["batch_stats"])


def test_dcnv1_starts_as_the_baseline():
  """Same key, same shared parameters; zero-initialised offsets make DCNv1 a plain conv."""
  config = train.Config(dcn="dcnv1", implementation="xla")
  base_model, dcn_model = (train.create_model(n, config) for n in ("baseline", "dcn"))
  base, _ = _init(base_model, key=3)
  deform, _ = _init(dcn_model, key=3)
  for path, leaf in jax.tree_util.tree_leaves_with_path(base):
    other = deform
    for k in path:
      other = other[k.key]
    np.testing.assert_array_equal(leaf, other)
  x = jax.random.uniform(jax.random.key(4), (2, CANVAS, CANVAS, 1))
  np.testing.assert_allclose(dcn_model.apply(deform, x, train=False),
                             base_model.apply(base, x, train=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dcn", ["dk-global", "dk-local"])
def test_deformable_kernels_start_as_the_baseline(dcn):
  """Zero-initialised offset heads make a DK layer the plain conv with the scope's centre crop.

  So the DK model with the baseline's 3 x 3 kernels in the centre of its scopes (any margin)
  computes the baseline; every other shared parameter starts equal (same key).
  """
  config = train.Config(dcn=dcn)
  base_model, dk_model = (train.create_model(n, config) for n in ("baseline", "dcn"))
  base, _ = _init(base_model, key=3)
  dk, _ = _init(dk_model, key=3)
  margin = (train.DK_SCOPE_SIZE - 3) // 2
  params = jax.tree.map(lambda x: x, dk["params"])
  for path, leaf in jax.tree_util.tree_leaves_with_path(base["params"]):
    keys = [k.key for k in path]
    node = params
    for k in keys[:-1]:
      node = node[k]
    if node[keys[-1]].shape == leaf.shape:
      np.testing.assert_array_equal(node[keys[-1]], leaf, err_msg="/".join(keys))
    else:   # a scope: the centre crop takes the baseline's kernel
      node[keys[-1]] = node[keys[-1]].at[margin:margin + 3, margin:margin + 3].set(leaf)
  x = jax.random.uniform(jax.random.key(4), (2, CANVAS, CANVAS, 1))
  np.testing.assert_allclose(
      dk_model.apply({"params": params, "batch_stats": dk["batch_stats"]}, x, train=False),
      base_model.apply(base, x, train=False), rtol=1e-4, atol=1e-5)


def test_deformable_stage_uses_the_injected_conv():
  variables, _ = _init(train.create_model("dcn", train.Config()))
  assert "conv_offset" not in variables["params"]["ResNetBlock_1"]["conv1"]
  assert "conv_offset" not in variables["params"]["ResNetBlock_2"]["conv_proj"]
  with pytest.raises(ValueError, match="deform_conv"):
    _init(models.SmallResNet(num_classes=10, deform_stages=(2,)))


@pytest.mark.parametrize("dcn", ["dk-global", "dk-local"])
def test_ffi_refused_for_deformable_kernels(dcn, capsys):
  """Deformable Kernels have no native kernel: the command line says so before training."""
  with pytest.raises(SystemExit):
    train.parse_args(["--dcn", dcn, "--implementation", "ffi"])
  assert "has no native kernel" in capsys.readouterr().err
  # The baseline alone does not use the deformable layer: nothing to refuse.
  assert train.parse_args(["--dcn", dcn, "--implementation", "ffi", "--model", "baseline"])


def test_sampling_locations_regular_grid():
  """Zero offsets through a stride-2 then a stride-1 3x3 layer give the dilated regular grid."""
  zeros = lambda n: {"offsets": np.zeros((n, n, 3, 3, 2)), "mask": np.ones((n, n, 3, 3))}
  layers = [{**zeros(6), "stride": (1, 1), "padding": (1, 1)},
            {**zeros(6), "stride": (2, 2), "padding": (1, 1)}]
  (mid, _), (points, weight) = figures.sampling_locations((2, 3), layers)
  assert mid.shape == (9, 2) and points.shape == (81, 2)
  np.testing.assert_array_equal(np.unique(mid[:, 0]), [1, 2, 3])
  np.testing.assert_array_equal(np.unique(points[:, 0]), np.arange(1, 8))  # 2 * (1..3) - 1 + 0..2
  np.testing.assert_array_equal(np.unique(points[:, 1]), np.arange(3, 10))
  np.testing.assert_array_equal(weight, 1)
  shifted = [{**layers[0], "offsets": np.full((6, 6, 3, 3, 2), 0.5)}, layers[1]]
  (mid, _), _ = figures.sampling_locations((2, 3), shifted)
  np.testing.assert_array_equal(np.unique(mid[:, 1]), [2.5, 3.5, 4.5])


@pytest.mark.parametrize("dcn", ["dcnv2", "dcnv1"])
def test_figure_reads_the_sown_offsets_and_mask(dcn):
  """``deformable_layers`` turns the sown ``(i, j, (dy, dx))`` channels into ``[..., i, j, 2]``."""
  model = train.create_model("dcn", train.Config(dcn=dcn, implementation="xla"))
  variables, x = _init(model, batch=2)
  params = jax.tree.map(lambda p: p, variables["params"])
  i, j = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
  pattern = np.stack([i / 10, j / 100], -1).reshape(-1)          # dy = i / 10, dx = j / 100
  head = params["ResNetBlock_2"]["conv1"]["conv_offset"]
  head["bias"] = head["bias"].at[:18].set(pattern)
  if dcn == "dcnv2":
    head["bias"] = head["bias"].at[18:].set(np.log(3.0))         # sigmoid -> mask 0.75
  layers = figures.deformable_layers(model, {**variables, "params": params}, x)
  assert len(layers) == 2
  conv2, conv1 = layers[0]                                        # last layer first
  assert conv1["offsets"].shape == (6, 6, 3, 3, 2) and conv1["mask"].shape == (6, 6, 3, 3)
  assert (conv1["stride"], conv1["padding"]) == ((2, 2), (1, 1))    # 11 -> 6
  assert (conv2["stride"], conv2["padding"]) == ((1, 1), (1, 1))    # 6 -> 6
  np.testing.assert_allclose(conv1["offsets"][2, 4, ..., 0], i / 10, atol=1e-6)
  np.testing.assert_allclose(conv1["offsets"][2, 4, ..., 1], j / 100, atol=1e-6)
  np.testing.assert_array_equal(conv2["offsets"], 0)
  if dcn == "dcnv2":
    np.testing.assert_allclose(conv1["mask"], 0.75, rtol=1e-6)
    np.testing.assert_allclose(conv2["mask"], 0.5, rtol=1e-6)
  else:
    np.testing.assert_array_equal(conv1["mask"], 1)


# --- the training entry point ---------------------------------------------------------------------

SMOKE = ["--epochs", "1", "--steps", "2", "--batch-size", "16", "--train-size", "64",
         "--test-size", "24", "--eval-batch-size", "16", "--implementation", "xla"]


def test_smoke_train_resume_and_artefacts(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  results = train.main(SMOKE + ["--workdir", workdir])
  table = capsys.readouterr().out
  assert "dcn - baseline" in table and "ModulatedDeformConv" in table

  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert set(saved) == {"baseline", "dcn"}
  for name in ("baseline", "dcn"):
    r = saved[name]
    for key in ("test_accuracy", "shifted_test_accuracy", "num_params", "wall_time_s"):
      assert key in r
    assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["shifted_test_accuracy"] <= 1.0
    assert len(r["history"]) == 1 and r["steps_per_epoch"] == 2
    assert _saved(workdir, name)[0] == [2]   # after epoch 1 (2 steps)
  assert saved["dcn"]["num_params"] > saved["baseline"]["num_params"]
  assert results["dcn"]["test_accuracy"] == saved["dcn"]["test_accuracy"]
  for png in ("curves.png", "offsets.png", "erf.png"):
    assert (tmp_path / "run" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for name in ("baseline", "dcn"):
    erf = saved[name]["erf"]
    assert erf["scales"] == list(figures.ERF_SCALES) and len(erf["radius_px"]) == 3
    assert all(r > 0 for r in erf["radius_px"])
    assert erf["radius_slope_px_per_scale"] == pytest.approx(
        figures.erf_slope(erf["scales"], erf["radius_px"]))

  # --resume picks up after epoch 1 and trains only epoch 2 (2 more steps).
  train.main(SMOKE[2:] + ["--epochs", "2", "--model", "dcn", "--resume", "--workdir", workdir])
  resumed = json.loads((tmp_path / "run" / "results.json").read_text())
  assert resumed["dcn"]["history"][0] == saved["dcn"]["history"][0]
  assert [r["epoch"] for r in resumed["dcn"]["history"]] == [1, 2]
  assert "baseline" not in resumed   # dropped from the table: trained for 1 epoch, not 2
  steps, meta = _saved(workdir, "dcn")
  assert steps == [2, 4]
  assert meta["epoch"] == 2 and len(meta["history"]) == 2
  config = train.parse_args(SMOKE[2:] + ["--epochs", "2", "--model", "dcn", "--workdir", workdir])
  _, variables = train.restore_variables("dcn", config)
  assert "conv_offset" in variables["params"]["ResNetBlock_2"]["conv1"]

  # A checkpoint written under another training setup is not resumed.
  with pytest.raises(ValueError, match="written with"):
    train.main(SMOKE[2:] + ["--epochs", "2", "--model", "dcn", "--seed", "1", "--resume",
                            "--workdir", workdir])


class Stop(Exception):
  """A stop in the middle of training (a killed process, a preempted host)."""


def _stop_at_step(steps):
  """A ``Trainer.__init__`` whose trainer raises :class:`Stop` instead of its step ``steps + 1``."""
  init = train.Trainer.__init__

  def stopping_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    step, calls = self.train_step, itertools.count()

    def train_step(*step_args):
      if next(calls) == steps:
        raise Stop
      return step(*step_args)

    self.train_step = train_step

  return stopping_init


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, monkeypatch):
  """Stopped after 3 of 4 steps, a run resumes from its last checkpoint (epoch 1, step 2) and ends
  bit for bit where the uninterrupted run ends: the same train state, the same history."""
  args = SMOKE[2:] + ["--epochs", "2", "--model", "dcn"]
  full = train.parse_args(args + ["--workdir", str(tmp_path / "full")])
  data = train.load_data(full)
  expected, expected_state, _ = train.train_and_evaluate("dcn", full, data)
  assert _saved(full.workdir, "dcn")[0] == [2, 4]

  stopped = dataclasses.replace(full, workdir=str(tmp_path / "stopped"))
  with monkeypatch.context() as patch:
    patch.setattr(train.Trainer, "__init__", _stop_at_step(3))
    with pytest.raises(Stop):
      train.train_and_evaluate("dcn", stopped, data)
  assert _saved(stopped.workdir, "dcn")[0] == [2]   # step 3 was lost with the stop

  result, state, _ = train.train_and_evaluate("dcn", dataclasses.replace(stopped, resume=True),
                                              data)
  assert _saved(stopped.workdir, "dcn")[0] == [2, 4]
  assert int(state.step) == 4
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
  expected_leaves = jax.tree.leaves(jax.device_get(expected_state))
  assert len(leaves) == len(expected_leaves)
  for (path, leaf), expected_leaf in zip(leaves, expected_leaves):
    np.testing.assert_array_equal(leaf, expected_leaf, err_msg=jax.tree_util.keystr(path))
  without_time = lambda history: [{k: v for k, v in r.items() if k != "wall_time_s"}
                                  for r in history]
  assert without_time(result["history"]) == without_time(expected["history"])
  assert result["test_accuracy"] == expected["test_accuracy"]


def test_erf_radius_and_slope():
  """The radius is the RMS distance of the map's mass from its centroid."""
  erf = np.zeros((9, 9))
  erf[4, 4] = 1.0
  assert figures.erf_radius(erf) == 0.0
  erf[4, 4], erf[4, 0], erf[4, 8], erf[0, 4], erf[8, 4] = 0.0, 1.0, 1.0, 1.0, 1.0
  assert figures.erf_radius(erf) == pytest.approx(4.0)
  assert figures.erf_slope([0.5, 1.0, 1.5], [2.0, 3.0, 4.0]) == pytest.approx(2.0)


def test_erf_of_a_plain_conv_is_its_kernel():
  """A single 3 x 3 conv of ones: the gradient is 1 on the unit's 3 x 3 window, 0 elsewhere."""
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      x = nn.Conv(1, (3, 3), padding="SAME", use_bias=False, kernel_init=nn.initializers.ones,
                  name="ResNetBlock_0")(x)
      return x.mean(axis=(1, 2))

  model = Tiny()
  variables = model.init(jax.random.key(0), jnp.zeros((1, CANVAS, CANVAS, 1)))
  digits = input_pipeline.load_mnist_5k()[0][:2]
  unit = (3, 3)   # the conv has stride 1 here: canvas pixel (3, 3)
  maps, radius = figures.effective_receptive_field(model, variables, digits, (1.0,), unit)
  expected = np.zeros((CANVAS, CANVAS))
  expected[2:5, 2:5] = 1 / 9
  np.testing.assert_allclose(maps[0], expected, atol=1e-6)
  assert radius[0] == pytest.approx(np.sqrt(2 * 2 / 3))


def test_smoke_deformable_kernels(tmp_path, capsys):
  """``--dcn dk-local`` trains the same ResNet with Deformable Kernels (no offsets figure)."""
  results = train.main(SMOKE + ["--model", "dcn", "--dcn", "dk-local", "--steps", "1",
                                "--workdir", str(tmp_path)])
  assert "dcn (LocalDeformableKernel)" in capsys.readouterr().out
  assert results["dcn"]["conv"] == "LocalDeformableKernel"
  assert results["dcn"]["config"]["dcn"] == "dk-local"
  assert (tmp_path / "curves.png").is_file() and not (tmp_path / "offsets.png").exists()


@pytest.mark.slow
def test_data_parallel_two_devices(tmp_path):
  """The command line on 2 (forced) CPU devices: batches split over a 'batch' mesh axis."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, str(EXAMPLE_DIR / "train.py"), *SMOKE, "--model", "dcn",
         "--test-size", "25", "--workdir", str(tmp_path)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "2 cpu device(s)" in out.stdout
  assert json.loads((tmp_path / "results.json").read_text())["dcn"]["history"][0]["epoch"] == 1
