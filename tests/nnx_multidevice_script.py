"""The NNX modules on 8 CPU devices, run in a subprocess by tests/test_nnx.py (the device count
must be fixed before jax initialises).

Usage: ``python tests/nnx_multidevice_script.py IMPLEMENTATION``. Exits non-zero (an
AssertionError with a message) on the first failed check: a two-layer model (``ModulatedDeformConv``
then ``DeformConv``) with its parameters and optimizer state replicated and the inputs and targets
sharded over a ``batch`` mesh axis,

* the ``nnx.jit`` forward and the ``nnx.jit`` training step (``nnx.value_and_grad`` and
  ``nnx.Optimizer.update``) compile with no ``all-gather`` (the parameter gradients are summed
  over the devices, an all-reduce);
* the forward output stays batch-sharded and the updated parameters stay replicated;
* the loss and the updated parameters equal those of the same step on one device;
* ``flaxdcn.nnx.load_linen_params`` keeps the parameters replicated.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flaxdcn.nnx  # noqa: E402
from tolerances import assert_close  # noqa: E402

DEVICES = 8


class Net(nnx.Module):

  def __init__(self, implementation, rngs):
    self.dcn = flaxdcn.nnx.ModulatedDeformConv(3, 8, 3, implementation=implementation, rngs=rngs)
    self.dcn1 = flaxdcn.nnx.DeformConv(8, 4, (3, 2), strides=(2, 1), offset_group_count=2,
                                       implementation=implementation, rngs=rngs)

  def __call__(self, x):
    return self.dcn1(nnx.relu(self.dcn(x)))


def forward(model, x):
  return model(x)


def train_step(model, optimizer, x, target):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
  optimizer.update(model, grads)
  return loss


def main(implementation: str) -> None:
  assert jax.device_count() == DEVICES, jax.devices()
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.normal(size=(2 * DEVICES, 9, 7, 3)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2 * DEVICES, 5, 7, 4)), jnp.float32)
  model = Net(implementation, nnx.Rngs(0))
  # Non-zero offset heads, so that the deformable sampling (and its gradient) is exercised.
  for head in (model.dcn.conv_offset, model.dcn1.conv_offset):
    head.kernel[...] = 0.2 * jax.random.normal(jax.random.key(1), head.kernel.shape)
  tx = optax.adam(1e-2)

  # The same step on one device.
  reference = nnx.clone(model)
  fwd, step = nnx.jit(forward), nnx.jit(train_step)
  expected_out = fwd(reference, x)
  expected_loss = step(reference, nnx.Optimizer(reference, tx, wrt=nnx.Param), x, target)

  mesh = Mesh(np.array(jax.devices()), ("batch",))
  batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for obj in (model, optimizer):
    nnx.update(obj, jax.device_put(nnx.state(obj), replicated))
  xs, targets = jax.device_put(x, batch), jax.device_put(target, batch)

  for what, fn, args in (("forward", fwd, (model, xs)),
                         ("training step", step, (model, optimizer, xs, targets))):
    hlo = fn.lower(*args).compile().as_text()
    assert "all-gather" not in hlo, (
        f"{implementation}: the batch-sharded {what} all-gathers:\n"
        + "\n".join(line for line in hlo.splitlines() if "all-gather" in line)[:4000])

  out = fwd(model, xs)
  assert out.sharding.is_equivalent_to(batch, out.ndim), (
      f"{implementation}: output sharding {out.sharding}, expected batch-sharded")
  assert_close(out, expected_out, jnp.float32, err_msg="sharded forward")

  loss = step(model, optimizer, xs, targets)
  assert_close(loss, expected_loss, jnp.float32, err_msg="sharded loss")
  for (path, value), (_, want) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                      nnx.to_flat_state(nnx.state(reference, nnx.Param))):
    value, want = value.get_value(), want.get_value()
    assert value.sharding.is_equivalent_to(replicated, value.ndim), (
        f"{implementation}: updated {path} has sharding {value.sharding}, expected replicated")
    assert_close(value, want, jnp.float32, err_msg=f"updated {path}")

  # load_linen_params keeps each parameter's sharding (the loaded arrays live on one device).
  other = Net(implementation, nnx.Rngs(2))
  flaxdcn.nnx.load_linen_params(model, flaxdcn.nnx.linen_params(other))
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = value.get_value()
    assert value.sharding.is_equivalent_to(replicated, value.ndim), (
        f"{implementation}: loaded {path} has sharding {value.sharding}, expected replicated")


if __name__ == "__main__":
  main(sys.argv[1])
