"""Multi-device checks of ``deform_conv2d`` on 8 CPU devices, run in a subprocess by
tests/test_sharding.py (the device count must be fixed before jax initialises).

Usage: ``python tests/multidevice_script.py IMPLEMENTATION``. Exits non-zero (an AssertionError with
a message) on the first failed check:

Every check runs twice: with the default column budget (one band) and with a budget of one
output row per band (the loop over bands of ``deform_conv2d``, forward and backward).

* batch-sharded ``jit`` (a ``Mesh`` over the 8 devices, inputs/offsets/mask sharded with
  ``NamedSharding(P('batch'))``, kernel/bias replicated): no ``all-gather``, ``all-to-all`` or
  ``collective-permute`` in the compiled HLO of the forward or of ``jax.grad``, and the native
  targets called on each device's shard of the batch; the output stays batch-sharded; values
  equal the unsharded ones (and the loop reference);
* ``pmap`` of the forward and of ``jax.grad``: values equal the unsharded ones;
* explicit sharding (``jax.make_mesh`` with ``AxisType.Explicit``, under ``jax.set_mesh``): the op,
  its gradient and both modules trace, keep the batch sharding and equal the unsharded values;
* under explicit sharding the column budget holds per device's shard: a budget that one shard's
  forward and backward columns fit is one band there, and more than one for the whole batch.
"""

import functools
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flaxdcn  # noqa: E402
from flaxdcn.ops import deform_conv  # noqa: E402
import reference as ref  # noqa: E402
from reference import Case  # noqa: E402
from tolerances import assert_close  # noqa: E402

DEVICES = 8
CASE = Case(2 * DEVICES, 6, 5, 4, 6, (3, 3), padding="SAME", fg=2, og=2)
NAMES = ("inputs", "offsets", "kernel", "mask", "bias")
BATCHED = ("inputs", "offsets", "mask")


#: Collectives that would move batch data between devices (the kernel's gradient is a sum over
#: the batch: its all-reduce is expected).
BATCH_TRAFFIC = ("all-gather", "all-to-all", "collective-permute")


def _check_no_batch_traffic(hlo: str, implementation: str, what: str) -> None:
  """No collective moves batch data, and the native targets run on each device's shard."""
  found = [line for line in hlo.splitlines() if any(op in line for op in BATCH_TRAFFIC)]
  assert not found, (f"{implementation}: the batch-sharded {what} moves batch data:\n"
                     + "\n".join(found)[:4000])
  if implementation == "ffi":
    calls = re.findall(r"= f32\[(\d+),[^\]]*\][^=]*custom-call\(.*flaxdcn_deform_im2col", hlo)
    assert calls, f"{implementation}: no native call in the {what}"
    per_shard = CASE.n // DEVICES
    assert {int(c) for c in calls} == {per_shard}, (
        f"{implementation}: {what}: native calls over batches {calls}, expected {per_shard}")


def main(implementation: str) -> None:
  assert jax.device_count() == DEVICES, jax.devices()
  # Every check twice: one band, and one band per output row (the loop over bands, bwd included).
  _main(implementation)
  _check_explicit_budget_per_shard(implementation)
  deform_conv.COLUMNS_BUDGET_BYTES = 1
  _main(implementation)


def _check_explicit_budget_per_shard(implementation: str) -> None:
  """The bands of the forward and the backward, by the batch that one device holds."""
  chosen = []
  row_bands = deform_conv._row_bands

  def record(*args):
    chosen.append(row_bands(*args))
    return chosen[-1]

  op = functools.partial(flaxdcn.deform_conv2d, **CASE.kwargs(), implementation=implementation)
  grad = jax.grad(lambda *a: jnp.sum(op(*a) ** 2), argnums=(0, 1, 2))
  np_args = ref.make_args(CASE, seed=0, smooth=True)
  args = [jnp.asarray(np_args[k], jnp.float32) for k in NAMES]
  ho, wo = CASE.out_size
  shard_columns = (CASE.n // DEVICES) * ho * wo * CASE.kernel[0] * CASE.kernel[1] * CASE.c * 4
  budget = deform_conv.COLUMNS_BUDGET_BYTES
  deform_conv._row_bands, deform_conv.COLUMNS_BUDGET_BYTES = record, 2 * shard_columns
  try:
    jax.make_jaxpr(grad)(*args)
    assert len(chosen) == 2 and all(b.count > 1 for b in chosen), (
        f"{implementation}: unsharded, the budget should need bands: {chosen}")
    chosen.clear()
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
      batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
      sharded = [jax.device_put(a, batch if k in BATCHED else replicated)
                 for k, a in zip(NAMES, args)]
      jax.jit(grad).lower(*sharded)
    assert len(chosen) == 2 and all(b.count == 1 for b in chosen), (
        f"{implementation}: explicit sharding, one shard's columns fit the budget: {chosen}")
  finally:
    deform_conv._row_bands, deform_conv.COLUMNS_BUDGET_BYTES = row_bands, budget


def _main(implementation: str) -> None:
  op = functools.partial(flaxdcn.deform_conv2d, **CASE.kwargs(), implementation=implementation)

  def loss(inputs, offsets, kernel, mask, bias):
    return jnp.sum(op(inputs, offsets, kernel, mask, bias) ** 2)

  grad = jax.grad(loss, argnums=tuple(range(5)))
  np_args = ref.make_args(CASE, seed=0, smooth=True)
  args = [jnp.asarray(np_args[k], jnp.float32) for k in NAMES]

  # Unsharded results on one device.
  fwd_jit, grad_jit = jax.jit(op), jax.jit(grad)
  expected_out = fwd_jit(*args)
  expected_grads = grad_jit(*args)
  assert_close(expected_out, ref.reference(CASE, np_args), jnp.float32, err_msg="unsharded")

  # Batch-sharded jit.
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  sharded = [jax.device_put(a, batch if k in BATCHED else replicated)
             for k, a in zip(NAMES, args)]
  for what, fn in (("forward", fwd_jit), ("grad", grad_jit)):
    _check_no_batch_traffic(fn.lower(*sharded).compile().as_text(), implementation, what)
  out = fwd_jit(*sharded)
  assert out.sharding.is_equivalent_to(batch, out.ndim), (
      f"{implementation}: output sharding {out.sharding}, expected batch-sharded")
  assert_close(out, expected_out, jnp.float32, err_msg="sharded forward")
  grads = grad_jit(*sharded)
  for name, g, e in zip(NAMES, grads, expected_grads):
    assert_close(g, e, jnp.float32, err_msg=f"sharded grad {name}")
    if name in BATCHED:
      assert g.sharding.is_equivalent_to(batch, g.ndim), (
          f"{implementation}: grad {name} sharding {g.sharding}, expected batch-sharded")

  # pmap: two examples per device, kernel and bias broadcast.
  def per_device(a):
    return a.reshape((DEVICES, -1) + a.shape[1:])
  in_axes = tuple(0 if k in BATCHED else None for k in NAMES)
  pargs = [per_device(a) if k in BATCHED else a for k, a in zip(NAMES, args)]
  pfwd = jax.pmap(op, in_axes=in_axes)
  hlo = pfwd.lower(*pargs).compile().as_text()
  assert not any(op in hlo for op in BATCH_TRAFFIC), f"{implementation}: pmap forward collectives"
  assert_close(pfwd(*pargs).reshape(expected_out.shape), expected_out, jnp.float32,
               err_msg="pmap forward")
  pgrads = jax.pmap(grad, in_axes=in_axes)(*pargs)
  for name, g, e in zip(NAMES, pgrads, expected_grads):
    g = g.reshape(e.shape) if name in BATCHED else jnp.sum(g, axis=0)  # per-device partial sums
    assert_close(g, e, jnp.float32, err_msg=f"pmap grad {name}")

  # Explicit sharding: shardings are part of the types, so every reshape must be one jax can type.
  mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    sharded = [jax.device_put(a, batch if k in BATCHED else replicated)
               for k, a in zip(NAMES, args)]
    out = jax.jit(op)(*sharded)
    assert out.sharding.spec[0] == "batch", f"{implementation}: explicit output {out.sharding}"
    assert_close(out, expected_out, jnp.float32, err_msg="explicit forward")
    for name, g, e in zip(NAMES, jax.jit(grad)(*sharded), expected_grads):
      assert_close(g, e, jnp.float32, err_msg=f"explicit grad {name}")
    for cls in (flaxdcn.DeformConv, flaxdcn.ModulatedDeformConv):
      module = cls(CASE.o, CASE.kernel, padding=CASE.padding, feature_group_count=CASE.fg,
                   offset_group_count=CASE.og, implementation=implementation)
      variables = jax.jit(module.init)(jax.random.key(0), sharded[0])
      y = jax.jit(module.apply)(variables, sharded[0])
      assert y.sharding.spec[0] == "batch", f"{implementation}: explicit {cls.__name__}"
      assert_close(y, module.apply(variables, args[0]), jnp.float32,
                   err_msg=f"explicit {cls.__name__}")


if __name__ == "__main__":
  main(sys.argv[1])
