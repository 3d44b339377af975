"""A few jitted optax steps of a small model built on ``DeformConv`` and ``ModulatedDeformConv``:
the loss goes down and both offset heads learn (offsets move away from zero)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flaxdcn


class _Net(nn.Module):
  """conv -> DeformConv -> ModulatedDeformConv -> global average pool -> dense (one model for both
  layers: one compilation)."""
  implementation: str

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(flaxdcn.DeformConv(6, (3, 3), strides=(2, 1), offset_group_count=2,
                                   implementation=self.implementation, name="dcn")(x))
    x = nn.relu(flaxdcn.ModulatedDeformConv(4, (3, 2), feature_group_count=2,
                                            implementation=self.implementation, name="mdcn")(x))
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_training_reduces_loss_and_moves_offsets(implementation):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.normal(size=(6, 8, 7, 2)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  model = _Net(implementation)
  # An "rbg" key: its initialisers compile in a fraction of threefry's time.
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)["params"]
  optimizer = optax.adam(2e-2)

  def loss_fn(p):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  @jax.jit
  def train(params):
    def step(carry, _):
      p, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, state = optimizer.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), loss
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=15)
    return params, losses, loss_fn(params)

  new_params, losses, final = train(params)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)) and np.isfinite(final)
  assert final < 0.7 * losses[0], (losses, final)

  # The offsets the trained heads predict for the training images are no longer zero.
  _, state = jax.jit(lambda p: model.apply({"params": p}, x, capture_intermediates=True))(
      new_params)
  inter = state["intermediates"]
  for name, num_offsets in (("dcn", 2 * 2 * 9), ("mdcn", 2 * 6)):
    head = new_params[name]["conv_offset"]
    assert float(jnp.max(jnp.abs(head["kernel"]))) > 1e-3, f"{name}: the offset head did not learn"
    offsets = inter[name]["conv_offset"]["__call__"][0][..., :num_offsets]
    assert float(jnp.mean(jnp.abs(offsets))) > 1e-2, name
