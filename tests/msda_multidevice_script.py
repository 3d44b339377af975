"""Multi-device checks of ``ms_deform_attn`` and ``MSDeformAttn`` on 8 CPU devices, run in a
subprocess by tests/test_ms_deform_attn.py (the device count must be fixed before jax
initialises).

Usage: ``python tests/msda_multidevice_script.py IMPLEMENTATION`` (``xla`` or ``ffi``). Exits
non-zero (an AssertionError with a message) on the first failed check: batch-sharded ``jit``
(every argument sharded with ``NamedSharding(P('batch'))``) has no ``all-gather`` in the compiled
HLO of the forward or of ``jax.grad`` (``ffi``: which call the native targets), keeps the output
and the gradients batch-sharded and equals the unsharded values; the same under explicit sharding; and a training-step gradient of the linen
module with a batch-sharded input and replicated parameters has no all-gather either.
"""

import functools
import os
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
import reference_msda as ref  # noqa: E402
from reference_msda import MsdaCase  # noqa: E402
from tolerances import assert_close  # noqa: E402

DEVICES = 8
CASE = MsdaCase(2 * DEVICES, 6, 2, 4, ((5, 3), (2, 2), (1, 1)), 2)


def _no_all_gather(name, fn, args, targets=()):
  """The compiled program of ``fn(*args)`` has no all-gather, and calls every custom call target
  of ``targets`` (the native kernels, each device on its own shard)."""
  hlo = fn.lower(*args).compile().as_text()
  assert "all-gather" not in hlo, (
      f"{name}: the batch-sharded program all-gathers:\n"
      + "\n".join(line for line in hlo.splitlines() if "all-gather" in line)[:4000])
  for target in targets:
    assert f'custom_call_target="{target}"' in hlo, f"{name}: no custom call {target}"


def check_op(implementation):
  np_args = ref.make_args(CASE, seed=0)
  args = [jnp.asarray(np_args[k], jnp.float32)
          for k in ("value", "sampling_locations", "attention_weights")]
  op = lambda v, l, a: flaxdcn.ms_deform_attn(v, CASE.shapes, l, a,  # noqa: E731
                                              implementation=implementation)
  grad = jax.grad(lambda *a: jnp.sum(op(*a) ** 2), argnums=(0, 1, 2))
  fwd_jit, grad_jit = jax.jit(op), jax.jit(grad)
  expected_out, expected_grads = fwd_jit(*args), grad_jit(*args)
  assert_close(expected_out, ref.ms_deform_attn(CASE, **np_args), jnp.float32,
               err_msg="unsharded vs reference")

  mesh = Mesh(np.array(jax.devices()), ("batch",))
  batch = NamedSharding(mesh, P("batch"))
  sharded = [jax.device_put(a, batch) for a in args]
  native = implementation == "ffi"
  for what, fn, targets in (("forward", fwd_jit, ["flaxdcn_ms_deform_attn"]),
                            ("grad", grad_jit, ["flaxdcn_ms_deform_attn_bwd"])):
    _no_all_gather(f"ms_deform_attn {implementation} {what}", fn, sharded,
                   targets if native else ())
  out = fwd_jit(*sharded)
  assert out.sharding.is_equivalent_to(batch, out.ndim), f"output {out.sharding}"
  assert_close(out, expected_out, jnp.float32, err_msg="sharded forward")
  for g, e in zip(grad_jit(*sharded), expected_grads):
    assert g.sharding.is_equivalent_to(batch, g.ndim), f"grad {g.sharding}"
    assert_close(g, e, jnp.float32, err_msg="sharded grad")

  mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in args]
    out = jax.jit(op)(*sharded)
    assert out.sharding.spec[0] == "batch", f"explicit {out.sharding}"
    assert_close(out, expected_out, jnp.float32, err_msg="explicit forward")
    for g, e in zip(jax.jit(grad)(*sharded), expected_grads):
      assert_close(g, e, jnp.float32, err_msg="explicit grad")


def check_module(implementation):
  n, lq, c = 2 * DEVICES, 5, 16
  shapes = ((4, 3), (2, 2))
  s = sum(h * w for h, w in shapes)
  layer = flaxdcn.MSDeformAttn(num_heads=4, num_levels=2, num_points=2,
                               implementation=implementation)
  keys = jax.random.split(jax.random.key(1), 4)
  query = jax.random.normal(keys[0], (n, lq, c))
  reference_points = jax.random.uniform(keys[1], (n, lq, 2, 2))
  inputs = jax.random.normal(keys[2], (n, s, c))
  mask = jax.random.uniform(keys[3], (n, s)) < 0.2
  params = layer.init(jax.random.key(2), query, reference_points, inputs, shapes, mask)["params"]

  def loss(params, *batch):
    return jnp.mean(layer.apply({"params": params}, batch[0], batch[1], batch[2], shapes,
                                batch[3]) ** 2)

  grad = jax.jit(jax.grad(loss))
  batch_args = (query, reference_points, inputs, mask)
  expected = grad(params, *batch_args)
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  sharded = [jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in batch_args]
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  _no_all_gather(f"MSDeformAttn {implementation} grad", grad, (replicated, *sharded),
                 ["flaxdcn_ms_deform_attn_bwd"] if implementation == "ffi" else ())
  got = grad(replicated, *sharded)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert_close(g, e, jnp.float32, err_msg="module grad")


def main(implementation: str) -> None:
  assert jax.device_count() == DEVICES, jax.devices()
  check_op(implementation)
  check_module(implementation)


if __name__ == "__main__":
  main(sys.argv[1])
