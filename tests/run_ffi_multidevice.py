"""Multi-device checks of the native kernels on 8 CPU devices; run by tests/test_ffi.py in a fresh
process (``--xla_force_host_platform_device_count=8`` must be set before jax initialises).

Exits non-zero (an AssertionError with a message) on the first failed check:

* ``jit`` with batch-sharded inputs, offsets and mask: the compiled forward and ``jax.grad`` call
  the native kernels and contain no ``all-gather``; outputs stay batch-sharded; values equal the
  unsharded ones;
* ``pmap`` of the forward and of ``jax.grad``;
* ``shard_map`` over the batch axis, forward and ``jax.grad`` (kernel replicated: its gradient is
  summed over the devices);
* explicit sharding: the sampling's columns and gradients are typed batch-sharded.
"""

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
from flaxdcn import _ffi  # noqa: E402
from flaxdcn._geometry import ConvGeometry  # noqa: E402
from tolerances import assert_close  # noqa: E402

DEVICES = 8


def conv(inputs, offsets, mask, kernel):
  return flaxdcn.deform_conv2d(inputs, offsets, kernel, mask, strides=(2, 1), padding="SAME",
                               offset_group_count=2, implementation="ffi")


def loss(inputs, offsets, mask, kernel):
  return jnp.sum(jnp.sin(conv(inputs, offsets, mask, kernel)))


grad = jax.grad(loss, argnums=(0, 1, 2, 3))


def main() -> None:
  assert jax.device_count() == DEVICES, jax.devices()
  rng = np.random.default_rng(0)
  n = 2 * DEVICES
  inputs = jnp.asarray(rng.normal(size=(n, 7, 5, 4)), jnp.float32)
  offsets = jnp.asarray(2 * rng.normal(size=(n, 4, 5, 2 * 9 * 2)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(n, 4, 5, 2 * 9)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 3)), jnp.float32)
  args = (inputs, offsets, mask, kernel)
  out_ref = jax.jit(conv)(*args)
  grad_ref = jax.jit(grad)(*args)

  # jit over batch-sharded arrays: partitioned by batch, no all-gather.
  mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(AxisType.Auto,))
  batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  sharded = [jax.device_put(a, batch) for a in args[:3]] + [jax.device_put(kernel, replicated)]
  for name, fn in (("forward", conv), ("grad", grad)):
    compiled = jax.jit(fn).lower(*sharded).compile()
    text = compiled.as_text()
    assert "flaxdcn_deform_im2col" in text, f"{name}: no native call"
    assert "all-gather" not in text, f"{name}: all-gather in the partitioned program"
  dcnv1 = lambda x, o, m, k: conv(x, o, None, k)
  for name, fn in (("DCNv1 forward", dcnv1), ("DCNv1 grad", jax.grad(
      lambda *a: jnp.sum(jnp.sin(dcnv1(*a))), argnums=(0, 1, 3)))):
    assert "all-gather" not in jax.jit(fn).lower(*sharded).compile().as_text(), name
  out = jax.jit(conv)(*sharded)
  assert out.sharding.spec[0] == "batch", out.sharding
  assert_close(out, out_ref, jnp.float32, err_msg="sharded forward")
  grads = jax.jit(grad)(*sharded)
  for g, r in zip(grads, grad_ref):
    assert_close(g, r, jnp.float32, err_msg="sharded grad")
  assert grads[0].sharding.spec[0] == "batch", grads[0].sharding

  # pmap: one shard of the batch per device.
  split = lambda a: a.reshape((DEVICES, -1) + a.shape[1:])
  out = jax.pmap(conv, in_axes=(0, 0, 0, None))(*map(split, args[:3]), kernel)
  assert_close(out.reshape(out_ref.shape), out_ref, jnp.float32, err_msg="pmap forward")
  grads = jax.pmap(grad, in_axes=(0, 0, 0, None))(*map(split, args[:3]), kernel)
  for g, r in zip(grads[:3], grad_ref[:3]):
    assert_close(g.reshape(r.shape), r, jnp.float32, err_msg="pmap grad")
  assert_close(grads[3].sum(0), grad_ref[3], jnp.float32, err_msg="pmap kernel grad")

  # shard_map over the batch axis, and its gradient.
  mapped = jax.shard_map(conv, mesh=mesh, in_specs=(P("batch"),) * 3 + (P(),),
                         out_specs=P("batch"))
  assert_close(jax.jit(mapped)(*args), out_ref, jnp.float32, err_msg="shard_map forward")
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(mapped(*a))), argnums=(0, 1, 2, 3)))(*args)
  for g, r in zip(grads, grad_ref):
    assert_close(g, r, jnp.float32, err_msg="shard_map grad")

  # Explicit sharding: the sampling's outputs (and its gradients) are typed batch-sharded.
  explicit = jax.make_mesh((DEVICES,), ("batch",), axis_types=(AxisType.Explicit,))
  geometry = ConvGeometry.create((7, 5), (3, 3), (2, 1), "SAME", 1, 2, fn="test")
  on_explicit = [jax.device_put(a, NamedSharding(explicit, P("batch"))) for a in args[:3]]

  def sample(inputs, offsets, mask):
    return _ffi.deform_im2col(inputs, offsets, mask, geometry, deterministic_backward=False,
                              fallback=None)
  columns = jax.jit(sample)(*on_explicit)
  assert jax.typeof(columns).sharding.spec == P("batch", None, None, None, None), jax.typeof(
      columns)
  assert_close(columns, jax.jit(sample)(*args[:3]), jnp.float32, err_msg="explicit forward")
  sample_grad = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(sample(*a))), argnums=(0, 1, 2)))
  assert "all-gather" not in sample_grad.lower(*on_explicit).compile().as_text()
  for g, r in zip(sample_grad(*on_explicit), sample_grad(*args[:3])):
    assert jax.typeof(g).sharding.spec[0] == "batch", jax.typeof(g)
    assert_close(g, r, jnp.float32, err_msg="explicit grad")


if __name__ == "__main__":
  main()
