"""``deform_conv2d`` under JAX transformations: jit, vmap (several in_axes), vmap of vmap, grad,
vmap(grad), grad(vmap) and remat, each against the loop reference of tests/reference.py.

One tiny geometry (two feature groups, two offset groups, asymmetric padding) keeps the numerical
reference gradients cheap; they are computed once per session and shared by all tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxdcn
import reference as ref
from reference import Case
from tolerances import assert_close

CASE = Case(1, 3, 4, 4, 2, (2, 2), padding=((1, 0), (0, 0)), fg=2, og=2)
NAMES = ("inputs", "offsets", "kernel", "mask", "bias")
ITEMS = 4  # independent examples stacked along a new leading (vmapped) axis


@functools.lru_cache(maxsize=None)
def _items():
  """Per-item float64 arguments, offsets away from integer kinks, and output cotangents."""
  args = [ref.make_args(CASE, seed=100 + i, smooth=True) for i in range(ITEMS)]
  cots = [np.random.RandomState(200 + i).normal(size=(CASE.n, *CASE.out_size, CASE.o))
          for i in range(ITEMS)]
  return args, cots


@functools.lru_cache(maxsize=None)
def _reference_grads(i: int) -> dict:
  """Central-difference gradients of ``sum(reference(args_i) * cot_i)`` w.r.t. every argument."""
  args, cots = _items()
  grads = {}
  for name in NAMES:
    fn = lambda v, name=name: ref.reference(CASE, {**args[i], name: v})
    grads[name] = ref.numerical_grad(fn, args[i][name], cots[i], eps=1e-3)
  return grads


def _stacked(n=ITEMS):
  args, cots = _items()
  batched = {k: jnp.asarray(np.stack([a[k] for a in args[:n]]), jnp.float32) for k in NAMES}
  return batched, jnp.asarray(np.stack(cots[:n]), jnp.float32)


def _single(i=0):
  args, cots = _items()
  return {k: jnp.asarray(args[i][k], jnp.float32) for k in NAMES}, jnp.asarray(cots[i])


def _f(implementation):
  """The op as a function of the five arrays, in NAMES order."""
  def f(inputs, offsets, kernel, mask, bias):
    return flaxdcn.deform_conv2d(inputs, offsets, kernel, mask, bias, **CASE.kwargs(),
                                 implementation=implementation)
  return f


def _loss(implementation):
  def loss(args, cot):
    return jnp.sum(_f(implementation)(*(args[k] for k in NAMES)) * cot)
  return loss


def _assert_grads(actual: dict, expected: dict, what: str):
  for name in NAMES:
    assert_close(actual[name], expected[name], jnp.float32, err_msg=f"{what}: {name}")


def test_jit(implementation):
  args, _ = _single()
  out = jax.jit(_f(implementation))(*(args[k] for k in NAMES))
  assert_close(out, ref.reference(CASE, _items()[0][0]), jnp.float32)


def test_grad(implementation):
  args, cot = _single()
  grads = jax.jit(jax.grad(_loss(implementation)))(args, cot)
  _assert_grads(grads, _reference_grads(0), "grad")


# in_axes of (inputs, offsets, kernel, mask, bias): which arguments carry the vmapped axis.
VMAP_AXES = [
    pytest.param((0, 0, None, 0, None), id="data-batched"),
    pytest.param((0, 0, 0, 0, 0), id="all-batched"),
    pytest.param((None, 0, None, 0, None), id="offsets-mask-batched"),
    pytest.param((0, None, None, None, None), id="inputs-batched"),
    pytest.param((None, None, 0, None, None), id="kernel-batched"),
]


def _unbatched_item(axes, i):
  """Item ``i``'s arguments where batched; item 0's where the axis is None (shared)."""
  args, _ = _items()
  return {k: args[i if ax == 0 else 0][k] for k, ax in zip(NAMES, axes)}


@pytest.mark.parametrize("axes", VMAP_AXES)
def test_vmap(axes, implementation):
  batched, _ = _stacked()
  shared, _ = _single()
  call = [batched[k] if ax == 0 else shared[k] for k, ax in zip(NAMES, axes)]
  out = jax.jit(jax.vmap(_f(implementation), in_axes=axes))(*call)
  assert out.shape == (ITEMS, CASE.n, *CASE.out_size, CASE.o)
  for i in range(ITEMS):
    assert_close(out[i], ref.reference(CASE, _unbatched_item(axes, i)), jnp.float32,
                 err_msg=f"item {i}")


def test_vmap_in_axes_not_leading(implementation):
  """The vmapped axis last for the inputs and in the middle for the offsets; output axis 1."""
  batched, _ = _stacked()
  call = (jnp.moveaxis(batched["inputs"], 0, -1), jnp.moveaxis(batched["offsets"], 0, 2),
          batched["kernel"][0], batched["mask"], batched["bias"][0])
  out = jax.jit(jax.vmap(_f(implementation), in_axes=(4, 2, None, 0, None), out_axes=1))(*call)
  for i in range(ITEMS):
    assert_close(out[:, i], ref.reference(CASE, _unbatched_item((0, 0, None, 0, None), i)),
                 jnp.float32, err_msg=f"item {i}")


def test_vmap_of_vmap(implementation):
  batched, _ = _stacked()
  outer = {k: v.reshape((2, ITEMS // 2) + v.shape[1:]) for k, v in batched.items()}
  inner_fn = jax.vmap(_f(implementation), in_axes=(0, 0, None, 0, None))
  out = jax.jit(jax.vmap(inner_fn, in_axes=(0, 0, 0, 0, 0)))(
      outer["inputs"], outer["offsets"], outer["kernel"][:, 0], outer["mask"], outer["bias"][:, 0])
  assert out.shape == (2, ITEMS // 2, CASE.n, *CASE.out_size, CASE.o)
  for i in range(ITEMS):
    outer_i = (i // (ITEMS // 2)) * (ITEMS // 2)  # kernel and bias come from the outer item
    item = {**_items()[0][i], "kernel": _items()[0][outer_i]["kernel"],
            "bias": _items()[0][outer_i]["bias"]}
    assert_close(out.reshape((ITEMS,) + out.shape[2:])[i], ref.reference(CASE, item),
                 jnp.float32, err_msg=f"item {i}")


def test_vmap_of_grad(implementation):
  batched, cots = _stacked(2)
  grads = jax.jit(jax.vmap(jax.grad(_loss(implementation))))(batched, cots)
  for i in range(2):
    _assert_grads({k: v[i] for k, v in grads.items()}, _reference_grads(i), f"item {i}")


def test_grad_of_vmap(implementation):
  """grad of a batched loss; the kernel and bias are shared, so their gradients are summed."""
  batched, cots = _stacked(2)
  shared, _ = _single()
  def loss(data, kernel, bias):
    out = jax.vmap(_f(implementation), in_axes=(0, 0, None, 0, None))(
        data["inputs"], data["offsets"], kernel, data["mask"], bias)
    return jnp.sum(out * cots)
  data = {k: batched[k] for k in ("inputs", "offsets", "mask")}
  g_data, g_kernel, g_bias = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
      data, shared["kernel"], shared["bias"])
  # Item 1 with item 0's kernel and bias: its reference gradients need their own cache entry.
  args, all_cots = _items()
  for i in range(2):
    item = {**args[i], "kernel": args[0]["kernel"], "bias": args[0]["bias"]}
    for name in ("inputs", "offsets", "mask"):
      fn = lambda v, name=name: ref.reference(CASE, {**item, name: v})
      if i == 0:
        expected = _reference_grads(0)[name]
      else:
        expected = ref.numerical_grad(fn, item[name], all_cots[i], eps=1e-3)
      assert_close(g_data[name][i], expected, jnp.float32, err_msg=f"item {i}: {name}")
  item1 = {**args[1], "kernel": args[0]["kernel"], "bias": args[0]["bias"]}
  kernel_1 = ref.numerical_grad(lambda v: ref.reference(CASE, {**item1, "kernel": v}),
                                args[0]["kernel"], all_cots[1], eps=1e-3)
  assert_close(g_kernel, _reference_grads(0)["kernel"] + kernel_1, jnp.float32, err_msg="kernel")
  assert_close(g_bias, np.sum(all_cots[:2], axis=(0, 1, 2, 3)), jnp.float32, err_msg="bias")


@pytest.mark.parametrize("policy", [
    pytest.param(None, id="save-nothing"),
    pytest.param(jax.checkpoint_policies.dots_saveable, id="dots-saveable"),
])
def test_checkpoint(policy, implementation):
  args, cot = _single()
  loss = jax.checkpoint(_loss(implementation), policy=policy)
  grads = jax.jit(jax.grad(loss))(args, cot)
  _assert_grads(grads, _reference_grads(0), "remat")


def test_jit_of_value_and_grad_with_static_geometry(implementation):
  """Geometry passed through ``static_argnames`` of a jitted wrapper (retraced per value)."""
  args, cot = _single()
  @functools.partial(jax.jit, static_argnames=("padding",))
  def loss(a, padding):
    out = flaxdcn.deform_conv2d(a["inputs"], a["offsets"], a["kernel"], a["mask"], a["bias"],
                                **{**CASE.kwargs(), "padding": padding},
                                implementation=implementation)
    return jnp.sum(out * cot)
  value, grads = jax.value_and_grad(loss)(args, ((1, 0), (0, 0)))
  assert_close(value, np.sum(ref.reference(CASE, _items()[0][0]) * _items()[1][0]), jnp.float32)
  _assert_grads(grads, _reference_grads(0), "static padding")
