"""Multi-device checks of ``dcnv3`` / ``dcnv4`` on 8 CPU devices, run in a subprocess by
tests/test_dcnv3.py (the device count must be fixed before jax initialises).

Usage: ``python tests/dcnv3_multidevice_script.py IMPLEMENTATION``. Exits non-zero (an
AssertionError with a message) on the first failed check: batch-sharded ``jit`` (inputs, offsets
and mask sharded with ``NamedSharding(P('batch'))``) has no ``all-gather`` in the compiled HLO of
the forward or of ``jax.grad``, keeps the output and gradients batch-sharded and equals the
unsharded values; the same under explicit sharding.
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
import reference_dcnv3 as ref  # noqa: E402
from reference_dcnv3 import V3Case  # noqa: E402
from tolerances import assert_close  # noqa: E402

DEVICES = 8
CASE = V3Case(2 * DEVICES, 5, 6, 8, 2, (3, 3), padding=1, offset_scale=0.9, remove_center=True)


def check(name, op, args, implementation):
  grad = jax.grad(lambda *a: jnp.sum(op(*a) ** 2), argnums=tuple(range(len(args))))
  fwd_jit, grad_jit = jax.jit(op), jax.jit(grad)
  expected_out, expected_grads = fwd_jit(*args), grad_jit(*args)

  mesh = Mesh(np.array(jax.devices()), ("batch",))
  batch = NamedSharding(mesh, P("batch"))
  sharded = [jax.device_put(a, batch) for a in args]
  for what, fn in (("forward", fwd_jit), ("grad", grad_jit)):
    hlo = fn.lower(*sharded).compile().as_text()
    assert "all-gather" not in hlo, (
        f"{name} {implementation}: the batch-sharded {what} all-gathers:\n"
        + "\n".join(line for line in hlo.splitlines() if "all-gather" in line)[:4000])
  out = fwd_jit(*sharded)
  assert out.sharding.is_equivalent_to(batch, out.ndim), f"{name}: output {out.sharding}"
  assert_close(out, expected_out, jnp.float32, err_msg=f"{name} sharded forward")
  for g, e in zip(grad_jit(*sharded), expected_grads):
    assert g.sharding.is_equivalent_to(batch, g.ndim), f"{name}: grad {g.sharding}"
    assert_close(g, e, jnp.float32, err_msg=f"{name} sharded grad")

  mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in args]
    out = jax.jit(op)(*sharded)
    assert out.sharding.spec[0] == "batch", f"{name} {implementation}: explicit {out.sharding}"
    assert_close(out, expected_out, jnp.float32, err_msg=f"{name} explicit forward")
    for g, e in zip(jax.jit(grad)(*sharded), expected_grads):
      assert_close(g, e, jnp.float32, err_msg=f"{name} explicit grad")
  return expected_out


def main(implementation: str) -> None:
  assert jax.device_count() == DEVICES, jax.devices()
  np_args = ref.make_args(CASE, seed=0)
  args = [jnp.asarray(np_args[k], jnp.float32) for k in ("inputs", "offsets", "mask")]
  v3 = functools.partial(flaxdcn.dcnv3, **CASE.kwargs(), implementation=implementation)
  out = check("dcnv3", v3, args, implementation)
  assert_close(out, ref.dcnv3(CASE, **np_args), jnp.float32, err_msg="dcnv3 vs reference")
  om = jnp.asarray(ref.pack_offset_mask(CASE, np_args["offsets"], np_args["mask"]), jnp.float32)
  v4 = functools.partial(flaxdcn.dcnv4, **CASE.kwargs(), implementation=implementation)
  out = check("dcnv4", v4, [args[0], om], implementation)
  assert_close(out, ref.dcnv3(CASE, **np_args), jnp.float32, err_msg="dcnv4 vs reference")


if __name__ == "__main__":
  main(sys.argv[1])
