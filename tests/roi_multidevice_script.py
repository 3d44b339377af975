"""Multi-device checks of per-image deformable RoI pooling on 8 CPU devices, run in a subprocess by
tests/test_sharding.py (the device count must be fixed before jax initialises).

Usage: ``python tests/roi_multidevice_script.py IMPLEMENTATION``. Exits non-zero (an AssertionError
with a message) on the first failed check:

* batch-sharded ``jit`` of ``deform_roi_pool`` with per-image boxes ``[N, Ri, 4]`` (features,
  boxes, offsets and mask sharded with ``NamedSharding(P('batch'))``; padding boxes among them),
  adaptive and fixed sub-grids: no ``all-gather`` in the compiled forward or ``jax.grad``; the
  native program calls the batch-partitionable target; outputs and gradients stay batch-sharded
  and equal the unsharded values;
* a ``ModulatedDeformRoIPool`` gradient step (fixed sub-grid; parameters replicated, features
  and boxes batch-sharded): no ``all-gather``, the same gradients as unsharded;
* explicit sharding (``AxisType.Explicit`` under ``jax.set_mesh``; fixed sub-grid): the op and its
  gradients are typed batch-sharded and equal the unsharded values.
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
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flaxdcn  # noqa: E402
from tolerances import assert_close  # noqa: E402

DEVICES = 8
N, H, W, C, RI, OUT = 2 * DEVICES, 13, 11, 5, 4, (3, 2)


def make_args():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(N, H, W, C))
  corner = rng.uniform(-2, 9, size=(N, RI, 2))
  boxes = np.concatenate([corner, corner + rng.uniform(0.5, 8, size=(N, RI, 2))], axis=-1)
  boxes[1, 0] = 0.0                    # padding: all zeros
  boxes[6, 2] = [5.0, 1.0, 2.0, 8.0]   # padding: x2 < x1
  offsets = rng.normal(size=(N, RI, *OUT, 2)) * 0.5
  mask = rng.uniform(0.1, 1.0, size=(N, RI, *OUT))
  return [jnp.asarray(a, jnp.float32) for a in (features, boxes, offsets, mask)]


def check_partitioned(implementation, what, fn, args, sharded):
  compiled = jax.jit(fn).lower(*sharded).compile()
  text = compiled.as_text()
  assert "all-gather" not in text, (
      f"{implementation}: the batch-sharded {what} all-gathers:\n"
      + "\n".join(line for line in text.splitlines() if "all-gather" in line)[:4000])
  if implementation == "ffi":
    assert "flaxdcn_deform_roi_pool_images" in text, f"{what}: no per-image native call"
  got, want = compiled(*sharded), jax.jit(fn)(*args)
  for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert_close(g, e, jnp.float32, err_msg=f"{implementation} sharded {what}")
  return got, want


def main(implementation: str) -> None:
  assert jax.device_count() == DEVICES, jax.devices()
  args = make_args()
  mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(AxisType.Auto,))
  batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  sharded = [jax.device_put(a, batch) for a in args]

  unsharded = {}
  for sampling_ratio in (0, 2):
    op = functools.partial(flaxdcn.deform_roi_pool, output_size=OUT,
                           sampling_ratio=sampling_ratio, implementation=implementation)
    grad = jax.grad(lambda *a: jnp.sum(jnp.sin(op(*a))), argnums=(0, 2, 3))
    what = f"sampling_ratio={sampling_ratio}"
    out, want_out = check_partitioned(implementation, f"forward {what}", op, args, sharded)
    assert out.sharding.spec[0] == "batch", f"{implementation}: output sharding {out.sharding}"
    assert np.all(np.asarray(out)[1, 0] == 0) and np.all(np.asarray(out)[6, 2] == 0), (
        "padding boxes must pool zeros")
    grads, want_grads = check_partitioned(implementation, f"grad {what}", grad, args, sharded)
    for g in grads:
      assert g.sharding.spec[0] == "batch", f"{implementation}: grad sharding {g.sharding}"
    unsharded[sampling_ratio] = (op, grad, want_out, want_grads)

  layer = flaxdcn.ModulatedDeformRoIPool(output_size=OUT, sampling_ratio=2, deform_fc_channels=8,
                                         implementation=implementation)
  variables = layer.init(jax.random.key(0), args[0], args[1])
  # Non-zero last layers, so that the offsets and mask depend on the parameters.
  variables = jax.tree_util.tree_map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), variables)
  step = jax.grad(lambda v, f, b: jnp.sum(jnp.sin(layer.apply(v, f, b))), argnums=(0, 1))
  check_partitioned(implementation, "module grad", step, [variables, *args[:2]],
                    [jax.device_put(variables, replicated), *sharded[:2]])

  explicit = jax.make_mesh((DEVICES,), ("batch",), axis_types=(AxisType.Explicit,))
  op, grad, want_out, want_grads = unsharded[2]
  with jax.set_mesh(explicit):
    on_explicit = [jax.device_put(a, NamedSharding(explicit, P("batch"))) for a in args]
    out = jax.jit(op)(*on_explicit)
    assert jax.typeof(out).sharding.spec[0] == "batch", jax.typeof(out)
    assert_close(out, want_out, jnp.float32, err_msg="explicit forward")
    for g, e in zip(jax.jit(grad)(*on_explicit), want_grads):
      assert jax.typeof(g).sharding.spec[0] == "batch", jax.typeof(g)
      assert_close(g, e, jnp.float32, err_msg="explicit grad")


if __name__ == "__main__":
  main(sys.argv[1])
