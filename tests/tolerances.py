"""The one table of dtype tolerances for the test suite.

Tolerances are for comparing two implementations of the same math (or an implementation against
the loop reference) on inputs of unit scale; they are scaled by the magnitude of the reference, so
they hold for sums over many kernel points too.
"""

import jax.numpy as jnp
import numpy as np

#: ``dtype -> (rtol, atol)`` for forward values and gradients.
TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(jnp.float16): (1e-2, 1e-2),
    np.dtype(jnp.bfloat16): (5e-2, 5e-2),
}


def tolerance(dtype) -> tuple[float, float]:
  return TOLERANCES[np.dtype(dtype)]


def assert_close(actual, expected, dtype=None, *, err_msg: str = "") -> None:
  """``actual ~= expected`` within the tolerance of ``dtype`` (default: ``actual``'s dtype).

  ``atol`` is relative to the largest magnitude of ``expected`` (at least 1), so sums over many
  terms are not held to a unit-scale absolute error.
  """
  dtype = np.asarray(actual).dtype if dtype is None else dtype
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  rtol, atol = tolerance(dtype)
  scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=err_msg)
