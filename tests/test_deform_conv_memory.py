"""Bounded memory of ``deform_conv2d``: bands of output rows, columns recomputed in the backward.

A chunked call (``COLUMNS_BUDGET_BYTES`` forced down to one output row per band, the last band
smaller where the rows do not divide) must equal the one-band call in values and every gradient;
the compiled forward+backward of a shape whose columns exceed the budget must hold no
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


def _grads(case, args, implementation, budget, monkeypatch):
  """Value and gradients of every argument under ``budget`` bytes of columns per band."""
  monkeypatch.setattr(deform_conv, "COLUMNS_BUDGET_BYTES", budget)
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
  with jax.enable_x64(dtype == jnp.float64):
    _check_chunked_equals_one_band(case, mask, dtype, implementation, monkeypatch)


def _check_chunked_equals_one_band(case, mask, dtype, implementation, monkeypatch):
  args = {k: None if v is None else jnp.asarray(v, dtype)
          for k, v in ref.make_args(case, seed=2, mask=mask, offset_scale=3.0).items()}
  ho = case.out_size[0]
  itemsize = jnp.dtype(dtype).itemsize
  row_bytes = case.n * case.out_size[1] * case.kernel[0] * case.kernel[1] * case.c * itemsize
  assert len(deform_conv._row_bands(ho, row_bytes, 1)) == ho  # one row per band, forward
  assert len(deform_conv._row_bands(ho, 2 * row_bytes, 1)) == ho  # and backward
  out1, grads1 = _grads(case, args, implementation, 2**40, monkeypatch)
  out, grads = _grads(case, args, implementation, 1, monkeypatch)
  assert_close(out, out1, dtype, err_msg="value")
  assert_close(out, ref.reference(case, ref.make_args(case, seed=2, mask=mask, offset_scale=3.0)),
               dtype, err_msg="value against the loop reference")
  assert grads.keys() == grads1.keys()
  for name in grads:
    assert grads[name].dtype == grads1[name].dtype
    assert_close(grads[name], grads1[name], dtype, err_msg=f"grad {name}")


def test_row_bands_cover_rows_with_a_smaller_tail():
  assert deform_conv._row_bands(50, 10, 170) == ((0, 17), (17, 34), (34, 50))
  assert deform_conv._row_bands(7, 10, 10**9) == ((0, 7),)
  assert deform_conv._row_bands(7, 10, 25) == ((0, 2), (2, 4), (4, 6), (6, 7))
  assert deform_conv._row_bands(3, 10**9, 1) == ((0, 1), (1, 2), (2, 3))


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
