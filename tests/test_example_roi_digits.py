"""Tests of the RoI example (examples/roi_digits): canvases and boxes, heads, and a smoke run."""

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLE_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples" / "roi_digits"
sys.path.insert(0, str(EXAMPLE_DIR))

pytest.importorskip("matplotlib", reason="the examples extra (matplotlib) is missing")
pytest.importorskip("optax", reason="the examples extra (optax, tqdm) is missing")
pytest.importorskip("tqdm", reason="the examples extra (optax, tqdm) is missing")
canvases = pytest.importorskip("canvases", reason="the examples extra (mlxtend) is missing")
import detector  # noqa: E402
import roi_figures  # noqa: E402

#: Long integration tests: run by .ci/run after the default suite (pytest -m extended).
pytestmark = pytest.mark.extended


def _load_train():
  """The example's ``train.py`` under its own name (the conv example has a ``train`` too)."""
  spec = importlib.util.spec_from_file_location("roi_digits_train", EXAMPLE_DIR / "train.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module


checkpoints = pytest.importorskip("checkpoints",
                                  reason="the examples extra (orbax-checkpoint) is missing")
train = _load_train()
SIZE = canvases.CANVAS_SIZE


# --- canvases and boxes ---------------------------------------------------------------------------

def test_splits_hold_out_validation_from_train():
  splits = canvases.load_splits()
  assert [len(splits[k][1]) for k in ("train", "validation", "test")] == [3500, 500, 1000]
  train_x, val_x, test_x = (splits[k][0].reshape(len(splits[k][0]), -1)
                            for k in ("train", "validation", "test"))
  seen = {row.tobytes() for row in train_x}
  assert not any(row.tobytes() in seen for row in val_x)
  assert not any(row.tobytes() in seen for row in test_x)


def test_tight_boxes():
  layers = np.zeros((2, SIZE, SIZE), np.float32)
  layers[0, 5:9, 10:13] = 1.0            # rows 5..8, columns 10..12
  layers[1, 0, 0] = layers[1, SIZE - 1, SIZE - 1] = 0.9
  layers[1, 20, 20] = 0.1                # below the ink threshold
  np.testing.assert_array_equal(canvases.tight_boxes(jnp.asarray(layers)),
                                [[10, 5, 13, 9], [0, 0, SIZE, SIZE]])


def _shift_and_scale(boxes, jittered):
  size = boxes[..., 2:] - boxes[..., :2]
  shift = ((jittered[..., :2] + jittered[..., 2:]) - (boxes[..., :2] + boxes[..., 2:])) / 2 / size
  scale = (jittered[..., 2:] - jittered[..., :2]) / size
  return shift, scale


def test_jitter_ranges_and_misaligned_beyond_training():
  boxes = jnp.tile(jnp.asarray([[4.0, 6.0, 20.0, 30.0]]), (4000, 1))
  key = jax.random.key(0)
  shift, scale = _shift_and_scale(boxes, canvases.jitter_boxes(boxes, key, canvases.TRAIN_JITTER))
  assert np.abs(shift).max() <= 0.1 + 1e-6 and np.abs(shift).max() > 0.09
  assert (scale >= 1 / 1.1 - 1e-6).all() and (scale <= 1.1 + 1e-6).all()
  shift, scale = _shift_and_scale(
      boxes, canvases.jitter_boxes(boxes, key, canvases.MISALIGNED_JITTER))
  assert (np.abs(shift) >= 0.15 - 1e-6).all() and (np.abs(shift) <= 0.3 + 1e-6).all()
  log_scale = np.abs(np.log(scale))
  assert (log_scale >= np.log(1.2) - 1e-6).all() and (log_scale <= np.log(1.45) + 1e-6).all()
  for values in (shift, np.log(scale)):   # both signs on both axes
    assert ((values > 0).mean(0) > 0.4).all() and ((values < 0).mean(0) > 0.4).all()


def test_canvases_hold_every_digit_in_its_box():
  splits = canvases.load_splits()
  sets = canvases.make_test_sets(*(a[:16] for a in splits["test"]))
  again = canvases.make_test_sets(*(a[:16] for a in splits["test"]))
  assert sets["images"].shape == (4, SIZE, SIZE, 1) and sets["labels"].shape == (4, 4)
  for name in sets:
    np.testing.assert_array_equal(sets[name], again[name])
  np.testing.assert_array_equal(sets["labels"].reshape(-1), splits["test"][1][:16])
  tight = sets["tight"]
  assert (tight[..., 2:] > tight[..., :2]).all()
  ink = sets["images"][..., 0] > canvases.INK_THRESHOLD
  for b in range(4):                      # every inked pixel lies in one of the tight boxes
    covered = np.zeros((SIZE, SIZE), bool)
    for x1, y1, x2, y2 in tight[b].astype(int):
      covered[y1:y2, x1:x2] = True
    assert covered[ink[b]].all()
  assert not np.allclose(sets["test"], sets["misaligned"])


# --- the heads ------------------------------------------------------------------------------------

def _init(variant, key=0):
  model = train.create_model(variant, train.Config(implementation="xla"))
  images = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 1))
  boxes = jnp.asarray([[[4.0, 4.0, 20.0, 22.0], [24.0, 3.0, 40.0, 21.0]],
                       [[2.0, 26.0, 19.0, 45.0], [27.0, 25.0, 44.0, 46.0]]])
  crops = jnp.zeros((3, train.CROP_SIZE, train.CROP_SIZE, 1))
  variables = model.init(jax.random.key(key), images, boxes, crops, method=model.init_all)
  return model, variables, images, boxes


def _paths(tree):
  return {"/".join(str(k.key) for k in p): leaf.shape
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("variant", ["dpool", "mdpool", "mdconv+mdpool"])
def test_variants_share_the_plain_head(variant):
  """Same paths and values as RoIAlign's, plus the pool's heads (and the mdconv's offset head);
  the deformable pools start as plain pooling (times the 0.5 of a zero mask logit)."""
  align_model, align, images, boxes = _init("align", key=3)
  model, variables, _, _ = _init(variant, key=3)
  plain, extra = _paths(align["params"]), _paths(variables["params"])
  assert set(plain) <= set(extra)
  added = {p.rsplit("/", 1)[0] for p in set(extra) - set(plain)}
  expected = {"roi_pool/offset_fc_0", "roi_pool/offset_fc_2", "roi_pool/offset_fc_4"}
  if train.VARIANTS[variant].pool == "mdpool":
    expected |= {"roi_pool/mask_fc_0", "roi_pool/mask_fc_2"}
  if variant == "mdconv+mdpool":
    expected |= {"backbone/conv4/conv_offset"}
  assert added == expected
  f_plain = align_model.apply(align, images, boxes, method=align_model.box_features)
  f = model.apply(variables, images, boxes, method=model.box_features)
  if variant == "dpool":
    np.testing.assert_allclose(f, f_plain, rtol=1e-5, atol=1e-6)
  else:
    assert not np.allclose(f, f_plain)   # the mask (and the mdconv) halve the pooled features
  assert f.shape == (4, 256)


def test_crops_and_mimic_loss():
  image = np.zeros((1, SIZE, SIZE, 1), np.float32)
  image[0, 10:20, 30:40] = 1.0
  crops = detector.crop_boxes(jnp.asarray(image), jnp.asarray([[[30.0, 10.0, 40.0, 20.0]]]), 8,
                              implementation="xla")
  assert crops.shape == (1, 8, 8, 1)
  np.testing.assert_allclose(crops[0, 1:-1, 1:-1], 1.0, atol=1e-6)   # inside the square
  a = jnp.asarray([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
  b = jnp.asarray([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
  np.testing.assert_allclose(train.cosine_distance(a, b), [1.0, 0.0, 2.0], atol=1e-6)


def test_bin_corners_follow_the_offsets():
  box = np.asarray([7.0, 14.0, 21.0, 42.0])                # w = 14, h = 28
  plain = roi_figures.bin_corners(box, None, 0.1)
  np.testing.assert_allclose(plain[0, 0], (14.0, 7.0))
  np.testing.assert_allclose(plain[6, 6], (14.0 + 6 * 4.0, 7.0 + 6 * 2.0))
  offsets = np.zeros(detector.POOL_SIZE + (2,))
  offsets[2, 3] = (0.5, -1.0)                              # (dy, dx)
  moved = roi_figures.bin_corners(box, offsets, 0.1)
  np.testing.assert_allclose(moved[2, 3] - plain[2, 3], (0.1 * 28 * 0.5, -0.1 * 14))
  np.testing.assert_allclose(np.delete(moved.reshape(-1, 2), 2 * 7 + 3, 0),
                             np.delete(plain.reshape(-1, 2), 2 * 7 + 3, 0))


def test_figure_reads_the_predicted_offsets_and_mask():
  model, variables, images, boxes = _init("mdpool")
  params = jax.tree.map(lambda p: p, variables["params"])
  pool = params["roi_pool"]
  pool["offset_fc_4"]["bias"] = jnp.arange(98, dtype=jnp.float32) / 100
  pool["mask_fc_2"]["bias"] = jnp.full(49, np.log(3.0))     # sigmoid -> 0.75
  offsets, mask = roi_figures.deformed_bins(model, params, images, boxes)
  assert offsets.shape == (4, 7, 7, 2) and mask.shape == (4, 7, 7)
  np.testing.assert_allclose(offsets[1], np.arange(98).reshape(7, 7, 2) / 100, atol=1e-6)
  np.testing.assert_allclose(mask, 0.75, rtol=1e-6)


# --- the training entry point ---------------------------------------------------------------------

def _saved(workdir, variant, seed):
  """The steps of the checkpoints of ``variant`` with ``seed``, and the latest one's metadata."""
  with checkpoints.Checkpoints(train.run_dir(workdir, variant, seed)) as saved:
    return saved.steps(), saved.read_meta()


SMOKE = ["--epochs", "1", "--steps", "1", "--batch-size", "4", "--train-size", "64",
         "--test-size", "16", "--eval-batch-size", "4", "--implementation", "xla"]


def test_smoke_train_resume_and_artefacts(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  results = train.main(SMOKE + ["--variants", "align", "mdpool+mimic", "--workdir", workdir])
  table = capsys.readouterr().out
  assert "mdpool+mimic - align" in table

  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert set(saved["runs"]) == {"align", "mdpool+mimic"}
  for variant in ("align", "mdpool+mimic"):
    r = saved["runs"][variant]["0"]
    for key in ("test_accuracy", "misaligned_test_accuracy", "wall_time_s", "num_params"):
      assert key in r
    assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["misaligned_test_accuracy"] <= 1
    assert r["steps_per_epoch"] == 1 and len(r["history"]) == 1
    assert ("train_mimic_loss" in r["history"][0]) == (variant == "mdpool+mimic")
    assert saved["summary"][variant]["seeds"] == [0]
    assert _saved(workdir, variant, 0)[0] == [1]   # after epoch 1 (1 step)
  assert results["summary"] == saved["summary"]
  assert (tmp_path / "run" / "rois.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # --resume trains only epoch 2; a second seed adds to the summary.
  train.main(SMOKE[2:] + ["--epochs", "2", "--variants", "align", "--seeds", "0", "1",
                          "--resume", "--workdir", workdir])
  resumed = json.loads((tmp_path / "run" / "results.json").read_text())
  history = resumed["runs"]["align"]["0"]["history"]
  assert [h["epoch"] for h in history] == [1, 2]
  assert history[0] == saved["runs"]["align"]["0"]["history"][0]
  assert resumed["summary"]["align"]["seeds"] == [0, 1]
  assert "mdpool+mimic" not in resumed["runs"]     # trained for 1 epoch, not 2
  steps, meta = _saved(workdir, "align", 0)
  assert steps == [1, 2] and meta["epoch"] == 2 and meta["history"] == history
  assert _saved(workdir, "align", 1)[0] == [1, 2]   # seed 1: a fresh run of 2 epochs
