"""Checks an installed flaxdcn wheel; run by tests/test_wheel.py with the python of a fresh virtual
environment that has the wheel installed and no compiler on ``PATH``.

Usage::

  VENV/bin/python tests/wheel_check_script.py OUT.json

Run as a script, its own folder (tests/) is first on ``sys.path``, not the source tree, so
``import flaxdcn`` finds the installed wheel. The script checks that no C/C++ compiler, CUDA
compiler or build tool is on ``PATH``; that ``flaxdcn.build_info()`` reports the CPU and CUDA
kernels; and it runs the forward and the backward of every native op of the build (the rows of
``flaxdcn._ffi._OPS``) with ``implementation="ffi"`` on the CPU, checks that the lowered program
calls the op's forward and backward FFI targets, and compares values and gradients with
``implementation="xla"``. A native op without a case in :data:`CASES` fails the check; a case
whose op has no native kernel in this build runs with ``implementation="xla"`` only. It writes
what it found to ``OUT.json``.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import flaxdcn
from flaxdcn import _ffi
from tolerances import assert_close

#: Tools a source build of flaxdcn needs (compilers, CMake and its generators, the linker).
BUILD_TOOLS = ("cc", "gcc", "c++", "g++", "clang", "clang++", "nvcc", "cmake", "ninja", "make",
               "ld")


def _random(key: int, shape: tuple[int, ...], low: float = -1.0, high: float = 1.0) -> jax.Array:
  return jax.random.uniform(jax.random.key(key), shape, jnp.float32, low, high)


def _conv_case(implementation: str):
  x, kernel = _random(0, (2, 6, 5, 4)), _random(1, (3, 3, 2, 6))
  offsets, mask = _random(2, (2, 4, 3, 2 * 9 * 2), -1.5, 1.5), _random(3, (2, 4, 3, 2 * 9), 0, 1)
  op = lambda x, offsets, kernel, mask: flaxdcn.deform_conv2d(
      x, offsets, kernel, mask, feature_group_count=2, offset_group_count=2,
      implementation=implementation)
  return op, (x, offsets, kernel, mask)


def _roi_case(implementation: str):
  features = _random(4, (2, 9, 8, 3))
  rois = jnp.asarray([[0, 1.0, 1.5, 6.0, 7.0], [1, 0.0, 2.0, 7.5, 5.0], [1, 3.0, 0.5, 5.0, 8.0]])
  boxes = jnp.asarray([[[1.0, 1.5, 6.0, 7.0], [0.0, 0.0, 0.0, 0.0]],   # the second: padding
                       [[0.0, 2.0, 7.5, 5.0], [3.0, 0.5, 5.0, 8.0]]])
  offsets, boxes_offsets = _random(5, (3, 3, 2, 2)), _random(6, (2, 2, 3, 2, 2))
  mask, boxes_mask = _random(7, (3, 3, 2), 0, 1), _random(8, (2, 2, 3, 2), 0, 1)
  pool = lambda f, r, o, m: flaxdcn.deform_roi_pool(f, r, o, m, output_size=(3, 2),
                                                    sampling_ratio=2, implementation=implementation)

  def both_forms(features, offsets, mask, boxes_offsets, boxes_mask):
    return (pool(features, rois, offsets, mask), pool(features, boxes, boxes_offsets, boxes_mask))

  return both_forms, (features, offsets, mask, boxes_offsets, boxes_mask)


def _dcnv3_case(implementation: str):
  x = _random(9, (2, 6, 5, 4))
  offsets, mask = _random(10, (2, 6, 5, 2 * 9 * 2), -1.5, 1.5), _random(11, (2, 6, 5, 2 * 9), 0, 1)
  op = lambda x, offsets, mask: flaxdcn.dcnv3(
      x, offsets, mask, kernel_size=3, padding=1, group_count=2, offset_scale=0.5,
      implementation=implementation)
  return op, (x, offsets, mask)


def _dcnv4_case(implementation: str):
  x = _random(12, (2, 6, 5, 4))
  offset_mask = _random(13, (2, 6, 5, 56), -1.5, 1.5)   # G = 2, P = 9: 54 channels, padded to 56
  op = lambda x, offset_mask: flaxdcn.dcnv4(x, offset_mask, kernel_size=3, padding=1,
                                            group_count=2, implementation=implementation)
  return op, (x, offset_mask)


def _msda_case(implementation: str):
  shapes = ((4, 5), (2, 3))
  value = _random(14, (2, 26, 2, 3))
  locations = _random(15, (2, 4, 2, 2, 3, 2), -0.1, 1.1)
  weights = _random(16, (2, 4, 2, 2, 3), 0, 1)
  op = lambda value, locations, weights: flaxdcn.ms_deform_attn(
      value, shapes, locations, weights, implementation=implementation)
  return op, (value, locations, weights)


#: The public op (``_Op.name``) -> ``implementation -> (function, float32 operands)``; the
#: gradient is taken with respect to every operand.
CASES: dict[str, Callable] = {
    "deform_conv2d": _conv_case,
    "deform_roi_pool": _roi_case,
    "dcnv3": _dcnv3_case,
    "dcnv4": _dcnv4_case,
    "ms_deform_attn": _msda_case,
}


def _forward_and_gradients(fn: Callable, operands: tuple[jax.Array, ...]):
  """``fn(*operands)`` and the gradient of a fixed random projection of it."""

  def loss(*args):
    outputs = jax.tree.leaves(fn(*args))
    return sum(jnp.sum(y * _random(100 + i, y.shape)) for i, y in enumerate(outputs))

  both = jax.jit(lambda *args: (fn(*args), jax.grad(loss, range(len(args)))(*args)))
  return both, both(*operands)


def check_op(name: str, targets: list[str]) -> dict[str, object]:
  """Runs op ``name`` natively and with pure jnp; checks it calls every one of ``targets``."""
  fn, operands = CASES[name]("ffi")
  native, (outputs, grads) = _forward_and_gradients(fn, operands)
  lowered = native.lower(*operands).as_text()
  called = {t: f"@{t}(" in lowered and f"@{t}_bwd(" in lowered for t in targets}
  assert all(called.values()), f"{name}: the native program does not call {called}"
  reference_fn, _ = CASES[name]("xla")
  _, (expected, expected_grads) = _forward_and_gradients(reference_fn, operands)
  for actual, wanted in zip(jax.tree.leaves((outputs, grads)), jax.tree.leaves((expected,
                                                                               expected_grads))):
    assert np.all(np.isfinite(actual)), name
    assert_close(actual, wanted, np.float32, err_msg=name)
  return {"targets": targets, "outputs": [list(y.shape) for y in jax.tree.leaves(outputs)],
          "gradients": len(jax.tree.leaves(grads))}


def main() -> None:
  out = pathlib.Path(sys.argv[1])
  found = {tool: shutil.which(tool) for tool in BUILD_TOOLS}
  assert not any(found.values()), f"build tools on PATH: {found}"
  info = flaxdcn.build_info()
  assert info["cpu"] and info["cuda"], info
  native_ops: dict[str, list[str]] = {}
  for op in _ffi._OPS:  # pylint: disable=protected-access
    native_ops.setdefault(op.name, []).append(op.target)
  missing = sorted(set(native_ops) - set(CASES))
  assert not missing, f"native ops without a case in {__file__}: {missing}"
  checked = {name: check_op(name, targets) for name, targets in native_ops.items()}
  jnp_only = sorted(set(CASES) - set(native_ops))
  for name in jnp_only:
    fn, operands = CASES[name]("xla")
    _forward_and_gradients(fn, operands)
  out.write_text(json.dumps({
      "flaxdcn": flaxdcn.__file__, "jax": jax.__version__, "path_tools": found,
      "build_info": {k: list(v) if isinstance(v, tuple) else v for k, v in info.items()},
      "checked": checked, "jnp_only": jnp_only}, indent=2))


if __name__ == "__main__":
  main()
