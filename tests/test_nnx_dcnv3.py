"""The NNX DCNv3 / DCNv4 modules against their linen twins: the same parameter tree, and the
same outputs once the linen parameters are loaded (random parameters, every option)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxdcn
import flaxdcn.nnx
from tolerances import assert_close


def _random(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), tree)


@pytest.mark.parametrize("cls, kwargs", [
    pytest.param("DCNv3", dict(group_count=2), id="v3"),
    pytest.param("DCNv3", dict(group_count=3, dw_kernel_size=5, center_feature_scale=True,
                               remove_center=True, offset_scale=0.5), id="v3-options"),
    pytest.param("DCNv4", dict(group_count=2), id="v4"),
    pytest.param("DCNv4", dict(group_count=3, dw_kernel_size=3, center_feature_scale=True,
                               remove_center=True, output_bias=False), id="v4-options"),
    pytest.param("DCNv4", dict(group_count=1, without_pointwise=True), id="v4-no-pointwise"),
])
def test_nnx_matches_linen(cls, kwargs, implementation):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 6, 6)), jnp.float32)
  linen = getattr(flaxdcn, cls)(**kwargs, implementation=implementation)
  params = _random(jax.jit(linen.init)(jax.random.key(0), x)["params"], seed=1)
  layer = getattr(flaxdcn.nnx, cls)(6, **kwargs, implementation=implementation,
                                    rngs=nnx.Rngs(0))
  assert jax.tree.map(jnp.shape, flaxdcn.nnx.linen_params(layer)) == jax.tree.map(
      jnp.shape, params)
  flaxdcn.nnx.load_linen_params(layer, params)
  expected = jax.jit(linen.apply)({"params": params}, x)
  assert_close(nnx.jit(lambda m, x: m(x))(layer, x), expected, jnp.float32)


def test_nnx_channels_checked():
  layer = flaxdcn.nnx.DCNv3(8, group_count=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expected in_features=8"):
    layer(jnp.ones((1, 5, 5, 6)))
