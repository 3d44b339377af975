"""Bounded memory of ``deform_conv2d``: bands of output rows, columns recomputed in the backward.

A chunked call (``COLUMNS_BUDGET_BYTES`` forced down to one output row per band, or two bands of
which the second repeats rows of the first) must equal the one-band call in values and every
gradient; the compiled forward+backward of a shape whose columns exceed the budget must hold no
``[N, Ho, Wo, K, C]``-sized buffer.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxdcn
import reference as ref
from flaxdcn import _ffi
from flaxdcn.ops import deform_conv
from reference import Case
from tolerances import assert_close

CASES = [
    pytest.param(Case(2, 7, 6, 6, 4, (3, 2), strides=(2, 1), padding=((1, 0), (0, 2)),
                      dilation=(2, 1), fg=2, og=3), id="3x2-s21-p10_02-d21-F2-G3"),
    pytest.param(Case(3, 9, 5, 4, 6, (3, 3), padding="SAME", og=2), id="3x3-SAME-G2"),
    pytest.param(Case(1, 8, 7, 4, 4, (2, 3), strides=2, padding=(1, 2), dilation=2, fg=4),
                 id="2x3-s2-p12-d2-depthwise"),
]

NAMES = ("inputs", "offsets", "kernel", "mask", "bias")


def _bands_of_height(monkeypatch, height):
  """Every call traced from now on runs in bands of ``height`` rows, forward and backward."""
  monkeypatch.setattr(deform_conv, "_row_bands", lambda rows, *_: deform_conv._Bands(rows, height))


def _grads(case, args, implementation, budget, monkeypatch, height=None):
  """Value and gradients of every argument under ``budget`` bytes of columns per band (or in
  bands of ``height`` rows, forward and backward)."""
  monkeypatch.setattr(deform_conv, "COLUMNS_BUDGET_BYTES", budget)
  if height is not None:
    _bands_of_height(monkeypatch, height)
  op = functools.partial(flaxdcn.deform_conv2d, **case.kwargs(), implementation=implementation)
  cotangent = jnp.asarray(np.random.RandomState(3).normal(size=(case.n, *case.out_size, case.o)),
                          args["inputs"].dtype)
  present = [k for k in NAMES if args[k] is not None]

  def loss(*values):
    kw = dict(args, **dict(zip(present, values)))
    return jnp.vdot(op(**kw).astype(jnp.float32), cotangent.astype(jnp.float32))

  # A fresh function per budget: the budget is read when a call is traced.
  fn = jax.jit(lambda *v: (op(**dict(args, **dict(zip(present, v)))),
                           jax.grad(loss, argnums=tuple(range(len(present))))(*v)))
  out, grads = fn(*(args[k] for k in present))
  return out, dict(zip(present, grads))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("mask", [True, False], ids=["v2", "v1"])
@pytest.mark.parametrize("case", CASES)
def test_chunked_equals_one_band(case, mask, dtype, implementation, monkeypatch):
  """One output row per band (``COLUMNS_BUDGET_BYTES`` of 1)."""
  ho = case.out_size[0]
  row_bytes = (case.n * case.out_size[1] * case.kernel[0] * case.kernel[1] * case.c
               * jnp.dtype(dtype).itemsize)
  assert deform_conv._row_bands(ho, row_bytes, 1).count == ho  # one row per band, forward
  assert deform_conv._row_bands(ho, 2 * row_bytes, 1).count == ho  # and backward
  with jax.enable_x64(dtype == jnp.float64):
    _check_chunked_equals_one_band(case, mask, dtype, implementation, monkeypatch)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16],
                         ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("mask", [True, False], ids=["v2", "v1"])
@pytest.mark.parametrize("case", [c for c in CASES if c.values[0].out_size[0] >= 3])
def test_overlapping_last_band_equals_one_band(case, mask, dtype, implementation, monkeypatch):
  """Two bands of ``Ho // 2 + 1`` rows: the second starts before the first ends, so its first
  rows repeat the first band's and must count once in the value and every gradient."""
  height = case.out_size[0] // 2 + 1
  bands = deform_conv._Bands(case.out_size[0], height)
  assert bands.count == 2 and bands.overlap and bands.start(1) < height
  with jax.enable_x64(dtype == jnp.float64):
    _check_chunked_equals_one_band(case, mask, dtype, implementation, monkeypatch, height)


def _check_chunked_equals_one_band(case, mask, dtype, implementation, monkeypatch, height=None):
  args = {k: None if v is None else jnp.asarray(v, dtype)
          for k, v in ref.make_args(case, seed=2, mask=mask, offset_scale=3.0).items()}
  out1, grads1 = _grads(case, args, implementation, 2**40, monkeypatch)
  out, grads = _grads(case, args, implementation, 1, monkeypatch, height)
  assert_close(out, out1, dtype, err_msg="value")
  assert_close(out, ref.reference(case, ref.make_args(case, seed=2, mask=mask, offset_scale=3.0)),
               dtype, err_msg="value against the loop reference")
  assert grads.keys() == grads1.keys()
  for name in grads:
    assert grads[name].dtype == grads1[name].dtype
    assert_close(grads[name], grads1[name], dtype, err_msg=f"grad {name}")


def _rows_of_bands(bands):
  return [tuple(range(bands.start(i), bands.start(i) + bands.height)) for i in range(bands.count)]


@pytest.mark.parametrize("rows, row_bytes, budget, height", [
    (50, 10, 170, 17),       # 17 rows fit; 3 bands repeat 1 row (at most 50 // 16 = 3)
    (50, 10, 90, 5),         # 9 fit; 9, 8, 7, 6 repeat 4 or more, 5 none
    (7, 10, 10**9, 7),       # all in one band
    (7, 10, 25, 1),          # 2 fit but repeat 1 row, more than 7 // 16 = 0; 1 repeats none
    (3, 10**9, 1, 1),        # a band is at least one row, whatever the budget
    (13, 10, 60, 5),         # 6 fit; none repeats 0: 6 repeats 5, 5 and 3 repeat 2, 4 repeats 3
])
def test_row_bands_cover_every_row_once_in_order(rows, row_bytes, budget, height):
  bands = deform_conv._row_bands(rows, row_bytes, budget)
  assert bands.height == height
  assert bands.height * row_bytes <= budget or bands.height == 1
  covered = _rows_of_bands(bands)
  assert sorted(set(sum(covered, ()))) == list(range(rows))
  assert all(len(r) == bands.height and r[-1] < rows for r in covered)
  # Every band but the last starts where the one before it stops; the last ends at the last row.
  assert [r[0] for r in covered[:-1]] == [i * height for i in range(bands.count - 1)]
  assert covered[-1][-1] == rows - 1
  assert bands.overlap == (rows % height != 0)


def test_chunked_deterministic_and_vmap(implementation, monkeypatch):
  """Chunked calls are bitwise reproducible, and ``vmap`` of a chunked call equals the loop."""
  case = CASES[1].values[0]
  args = {k: None if v is None else jnp.asarray(v, jnp.float32)
          for k, v in ref.make_args(case, seed=4).items()}
  first = _grads(case, args, implementation, 1, monkeypatch)
  second = _grads(case, args, implementation, 1, monkeypatch)
  np.testing.assert_array_equal(first[0], second[0])
  for name in first[1]:
    np.testing.assert_array_equal(first[1][name], second[1][name], err_msg=name)

  monkeypatch.setattr(deform_conv, "COLUMNS_BUDGET_BYTES", 1)
  op = functools.partial(flaxdcn.deform_conv2d, **case.kwargs(), implementation=implementation)
  split = {k: args[k][:, None] for k in ("inputs", "offsets", "mask")}

  def member(inputs, offsets, mask):
    return jnp.sum(op(inputs, offsets, args["kernel"], mask) ** 2)

  batched = jax.jit(jax.vmap(jax.value_and_grad(member, argnums=(0, 1, 2))))(*split.values())
  for i in range(case.n):
    single = jax.value_and_grad(member, argnums=(0, 1, 2))(*(a[i] for a in split.values()))
    assert_close(batched[0][i], single[0], jnp.float32, err_msg=f"vmap value {i}")
    for name, g, e in zip(split, batched[1], single[1]):
      assert_close(g[i], e, jnp.float32, err_msg=f"vmap grad {name} {i}")


def _array_sizes(hlo: str) -> list[int]:
  """Element counts of every array shape written in ``hlo``."""
  return [int(np.prod([int(d) for d in dims.split(",")]))
          for dims in re.findall(r"\b(?:f32|f16|bf16|f64)\[([\d,]+)\]", hlo)]


@pytest.mark.parametrize("mask", [True, False], ids=["v2", "v1"])
def test_forward_backward_holds_no_full_columns(mask, implementation):
  """G1 of the benchmark (N=8, 50x50, 256 -> 256, 3x3): its columns (176 MiB) exceed the budget,
  so neither the HLO of the forward or of the forward+backward holds an array half their size,
  nor do XLA's temporaries add up to their size (compiled only, never run)."""
  n, size, c, o = 8, 50, 256, 256
  x = jax.ShapeDtypeStruct((n, size, size, c), jnp.float32)
  offsets = jax.ShapeDtypeStruct((n, size, size, 18), jnp.float32)
  m = jax.ShapeDtypeStruct((n, size, size, 9), jnp.float32) if mask else None
  kernel = jax.ShapeDtypeStruct((3, 3, c, o), jnp.float32)
  columns = n * size * size * 9 * c
  assert columns * 4 > 2 * deform_conv.COLUMNS_BUDGET_BYTES

  def loss(x, offsets, m, kernel):
    out = flaxdcn.deform_conv2d(x, offsets, kernel, m, padding=1, implementation=implementation)
    return jnp.sum(out * out)

  for name, fn in (("forward", lambda *a: loss(*a)),
                   ("forward+backward", jax.grad(loss, argnums=(0, 1, 2, 3) if mask else
                                                 (0, 1, 3)))):
    compiled = jax.jit(fn).lower(x, offsets, m, kernel).compile()
    largest = max(_array_sizes(compiled.as_text()))
    assert largest < columns // 2, f"{name}: an array of {largest} elements, columns {columns}"
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < columns * 4, f"{name}: {temp / 2**20:.1f} MiB of temporaries"


def _hlo_ops(text: str, op: str) -> int:
  return len(re.findall(rf"= [^=\n]* {op}\(", text))


def test_jnp_loop_compiles_one_band_and_default_is_native_in_jit_portable_in_export(monkeypatch):
  """With many bands: ``"xla"`` compiles one band's sampling whatever their count (the band's
  first row is a loop value); ``None`` under ``jit`` on this CPU runs the native call per band
  with the bits of ``"ffi"``, and its export for cpu, cuda and tpu is a loop with no custom call
  that gives ``"xla"``'s values."""
  case = CASES[1].values[0]  # Ho = 9
  args = [jnp.asarray(ref.make_args(case, seed=5)[k], jnp.float32)
          for k in ("inputs", "offsets", "kernel", "mask")]

  def grad_fn(implementation):
    def loss(*a):
      out = flaxdcn.deform_conv2d(*a, **case.kwargs(), implementation=implementation)
      return jnp.sum(jnp.sin(out))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))

  def hlo(implementation, height):
    _bands_of_height(monkeypatch, height)
    return jax.jit(grad_fn(implementation)).lower(*args).compile().as_text()

  three, nine = hlo("xla", 3), hlo("xla", 1)
  assert _hlo_ops(three, "gather") == _hlo_ops(nine, "gather") > 0
  assert _hlo_ops(three, "scatter") == _hlo_ops(nine, "scatter") > 0
  assert "custom-call" not in nine

  monkeypatch.setattr(deform_conv, "COLUMNS_BUDGET_BYTES", 1)
  if _ffi.available("cpu"):
    default = jax.jit(grad_fn(None))
    assert "flaxdcn_deform_im2col" in default.lower(*args).compile().as_text()
    for got, want in zip(jax.tree.leaves(default(*args)),
                         jax.tree.leaves(jax.jit(grad_fn("ffi"))(*args))):
      np.testing.assert_array_equal(got, want)
  exported = jax.export.export(jax.jit(grad_fn(None)), platforms=("cpu", "cuda", "tpu"))(*args)
  text = exported.mlir_module()
  assert "custom_call" not in text and "stablehlo.while" in text
  want = jax.jit(grad_fn("xla"))(*args)
  for got, expected in zip(jax.tree.leaves(exported.call(*args)), jax.tree.leaves(want)):
    assert_close(got, expected, jnp.float32)
