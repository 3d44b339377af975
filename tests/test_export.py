"""``jax.export`` of every public op and module.

- Portable by default: with ``implementation=None``, ``jit`` lowers to flaxdcn's custom calls
  while an export (forward, and forward with backward) is plain StableHLO, for ``cpu``, for
  ``("cpu", "cuda", "tpu")`` at once and for ``tpu`` alone.
- TPU: every op and module, forward and gradient, exported for ``platforms=("tpu",)`` with
  ``implementation=None`` and ``"xla"``, holds nothing a TPU cannot run (:data:`TPU_FORBIDDEN`);
  ``"ffi"`` raises ``NotImplementedError``.
- Native on request: ``implementation="ffi"`` exports flaxdcn's custom calls, which
  ``flaxdcn.disabled_safety_checks()`` lets through, for ``cpu`` and ``("cpu", "cuda")``.
- Round trips (tests/export_script.py): the default artifacts of every op family and of a small
  linen and a small NNX model are serialised, then deserialised, run and differentiated through
  their serialised VJP in a process where flaxdcn cannot be imported; the native artifacts run in
  a process that imported flaxdcn and fail, naming their target, in the one without it. Both
  compare with this process's ``jit`` (native kernels).

The functional ops' cases run by default (about half a minute on a loaded 2-core machine); the
modules' cases and the round trips (each lowers or compiles whole modules, several minutes
together) are ``extended``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxdcn
import flaxdcn.nnx
from flaxdcn import _ffi
from tolerances import assert_close

SCRIPT = pathlib.Path(__file__).resolve().parent / "export_script.py"
#: Seconds the artifact-running process may take.
TIMEOUT_S = 600

#: The op families with native kernels in this flaxdcn (``"ffi"`` applies to them). Deformable
#: Kernels never have any.
NATIVE_FAMILIES = ({"deform_conv2d", "deform_roi_pool", "dcnv3", "dcnv4", "ms_deform_attn"}
                   if _ffi.available("cpu") else set())
#: The platforms a native export is checked for: those this build has kernels for.
NATIVE_PLATFORMS = ("cpu", "cuda") if _ffi.available("cuda") else ("cpu",)

#: What an exported module for TPU must not contain, and why.
TPU_FORBIDDEN = {
    # A custom call names a target that must be registered on the platform that compiles it:
    # flaxdcn's are CPU and CUDA only, and host callbacks (pure_callback, debug.print) are custom
    # calls too.
    "custom call": re.compile(r"custom_call"),
    # Transfers with the host stop a TPU program (and a served model has no host to talk to).
    "host transfer": re.compile(r"stablehlo\.(?:send|recv|infeed|outfeed)\b"),
    # TPUs have no float64 arithmetic: a float32 program must stay float32 even with x64 enabled
    # (the test exports under x64, where a stray Python float or numpy scalar would leak).
    "float64": re.compile(r"(?<![A-Za-z0-9_])f64\b|[0-9]xf64\b|complex<f64>"),
}

_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w.$]+)")


def _custom_calls(text: str) -> set[str]:
  return set(_CUSTOM_CALL.findall(text))


# --- The cases: every public op and module ------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity
class Case:
  """A function of arrays to export, built for an ``implementation``."""
  name: str
  #: The op family (``NATIVE_FAMILIES`` decides whether ``"ffi"`` applies).
  family: str
  #: ``() -> (make, args)``: ``make(implementation)`` is the function of ``*args``.
  setup: Callable[[], tuple[Callable[[str | None], Callable], tuple]]

  @functools.cached_property
  def built(self):
    return self.setup()

  def fn(self, implementation):
    return self.built[0](implementation)

  @property
  def args(self) -> tuple:
    return self.built[1]

  @property
  def native(self) -> bool:
    return self.family in NATIVE_FAMILIES


def _rand(seed, *shape, scale=1.0, low=None, high=None):
  rng = np.random.default_rng(seed)
  if low is not None:
    return jnp.asarray(rng.uniform(low, high, shape), jnp.float32)
  return jnp.asarray(rng.normal(0.0, scale, shape), jnp.float32)


_SHAPES = ((4, 3), (2, 2))  # ms_deform_attn levels: S = 12 + 4 = 16
_ROIS = jnp.asarray([[0, 0.5, 1.0, 6.0, 7.5], [1, 2.0, 0.0, 7.5, 5.0], [1, 1.0, 1.5, 4.0, 3.0]],
                    jnp.float32)
_BOXES = jnp.asarray([[[0.5, 1.0, 6.0, 7.5], [1.0, 1.5, 4.0, 3.0]],
                      [[2.0, 0.0, 7.5, 5.0], [0.0, 0.0, 0.0, 0.0]]], jnp.float32)  # one padding


def _op_setups():
  def conv(mask):
    def make(impl):
      return lambda x, o, k, *mb: flaxdcn.deform_conv2d(
          x, o, k, *mb, padding=1, offset_group_count=2,
          feature_group_count=2 if mask else 1, implementation=impl)
    args = (_rand(0, 2, 7, 6, 4), _rand(1, 2, 7, 6, 36), _rand(2, 3, 3, 2 if mask else 4, 6))
    if mask:
      args += (_rand(3, 2, 7, 6, 18, low=0.0, high=1.0), _rand(4, 6))
    return make, args

  def roi(rois, offsets_shape):
    def make(impl):
      return lambda f, r, o, m: flaxdcn.deform_roi_pool(
          f, r, o, m, output_size=(2, 2), sampling_ratio=2, implementation=impl)
    return make, (_rand(5, 2, 9, 8, 4), rois, _rand(6, *offsets_shape, 2),
                  _rand(7, *offsets_shape, low=0.0, high=1.0))

  def dk(offsets_shape):
    def make(impl):
      return lambda x, o, k, b: flaxdcn.deformable_kernel_conv2d(
          x, o, k, b, kernel_size=3, implementation=impl)
    return make, (_rand(8, 2, 7, 7, 4), _rand(9, *offsets_shape), _rand(10, 5, 5, 4, 6),
                  _rand(11, 6))

  def dcnv3():
    def make(impl):
      return lambda x, o, m: flaxdcn.dcnv3(x, o, m, kernel_size=3, padding=1, group_count=2,
                                           implementation=impl)
    return make, (_rand(12, 2, 6, 5, 8), _rand(13, 2, 6, 5, 36),
                  jax.nn.softmax(_rand(14, 2, 6, 5, 2, 9), -1).reshape(2, 6, 5, 18))

  def dcnv4():
    def make(impl):
      return lambda x, om: flaxdcn.dcnv4(x, om, kernel_size=3, padding=1, group_count=2,
                                         implementation=impl)
    return make, (_rand(15, 2, 6, 5, 8), _rand(16, 2, 6, 5, 56))

  def msda():
    def make(impl):
      return lambda v, loc, w: flaxdcn.ms_deform_attn(v, _SHAPES, loc, w, implementation=impl)
    return make, (_rand(17, 2, 16, 2, 4), _rand(18, 2, 5, 2, 2, 3, 2, low=-0.1, high=1.1),
                  _rand(19, 2, 5, 2, 2, 3, low=0.0, high=1.0))

  return [
      ("deform_conv2d_v1", "deform_conv2d", lambda: conv(False)),
      ("deform_conv2d_v2", "deform_conv2d", lambda: conv(True)),
      ("deform_roi_pool_rows", "deform_roi_pool", lambda: roi(_ROIS, (3, 2, 2))),
      ("deform_roi_pool_images", "deform_roi_pool", lambda: roi(_BOXES, (2, 2, 2, 2))),
      ("deformable_kernel_global", "deformable_kernel", lambda: dk((2, 18))),
      ("deformable_kernel_local", "deformable_kernel", lambda: dk((2, 5, 5, 18))),
      ("dcnv3", "dcnv3", dcnv3),
      ("dcnv4", "dcnv4", dcnv4),
      ("ms_deform_attn", "ms_deform_attn", msda),
  ]


def _random_like(shapes, seed):
  """Random parameters shaped like ``shapes`` (not the initial ones: the offset heads start at
  zero, which would sample on the grid only; initialising would also compile the model)."""
  leaves, tree = jax.tree.flatten(shapes)
  return jax.tree.unflatten(tree, [_rand(seed + i, *p.shape, scale=0.3)
                                   for i, p in enumerate(leaves)])


def _linen(module_fn, *inputs, static=()):
  """A linen module as ``make(impl) -> f(params, *inputs)``; ``static`` follow the inputs."""
  def setup():
    variables = jax.eval_shape(lambda *x: module_fn("xla").init(jax.random.key(0), *x, *static),
                               *inputs)

    def make(impl):
      module = module_fn(impl)
      return lambda params, *x: module.apply({"params": params}, *x, *static)
    return make, (_random_like(variables["params"], 100), *inputs)
  return setup


def _nnx(module_fn, *inputs, static=()):
  """An NNX module as ``make(impl) -> f(params, *inputs)``, ``params`` its state as a pure dict
  (the functional form an export takes: ``nnx.split``, then merge inside the function)."""
  def setup():
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: module_fn("xla", nnx.Rngs(0)))))
    params = _random_like(shapes, 200)

    def make(impl):
      graphdef, state = nnx.split(nnx.eval_shape(lambda: module_fn(impl, nnx.Rngs(0))))

      def fn(params, *x):
        state_now = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(state_now, params)
        return nnx.merge(graphdef, state_now)(*x, *static)
      return fn
    return make, (params, *inputs)
  return setup


def _module_setups():
  x, x8 = _rand(20, 2, 7, 6, 4), _rand(21, 2, 6, 5, 8)
  features = _rand(22, 2, 9, 8, 4)
  query, points, flat = _rand(23, 2, 5, 8), _rand(24, 2, 5, 2, 2, low=0.0, high=1.0), \
      _rand(25, 2, 16, 8)
  boxes = jnp.concatenate([points, jnp.full_like(points, 0.3)], -1)  # (cx, cy, w, h)
  linen = [
      ("DeformConv", "deform_conv2d", lambda i: flaxdcn.DeformConv(6, (3, 3), implementation=i),
       (x,)),
      ("ModulatedDeformConv", "deform_conv2d", lambda i: flaxdcn.ModulatedDeformConv(
          6, (3, 3), offset_group_count=2, implementation=i), (x,)),
      ("DeformRoIPool", "deform_roi_pool", lambda i: flaxdcn.DeformRoIPool(
          (2, 2), deform_fc_channels=8, sampling_ratio=2, implementation=i), (features, _ROIS)),
      ("ModulatedDeformRoIPool", "deform_roi_pool", lambda i: flaxdcn.ModulatedDeformRoIPool(
          (2, 2), deform_fc_channels=8, sampling_ratio=2, implementation=i),
       (features, _BOXES)),
      ("GlobalDeformableKernel", "deformable_kernel", lambda i: flaxdcn.GlobalDeformableKernel(
          6, (3, 3), scope_size=(5, 5), implementation=i), (x,)),
      ("LocalDeformableKernel", "deformable_kernel", lambda i: flaxdcn.LocalDeformableKernel(
          6, (3, 3), scope_size=(5, 5), feature_group_count=2, implementation=i), (x,)),
      ("DCNv3", "dcnv3", lambda i: flaxdcn.DCNv3(kernel_size=3, group_count=2,
                                                 implementation=i), (x8,)),
      ("DCNv4", "dcnv4", lambda i: flaxdcn.DCNv4(kernel_size=3, group_count=2,
                                                 implementation=i), (x8,)),
      ("MSDeformAttn", "ms_deform_attn", lambda i: flaxdcn.MSDeformAttn(
          num_heads=2, num_levels=2, num_points=3, implementation=i), (query, points, flat)),
  ]
  m = flaxdcn.nnx
  nnx_modules = [
      ("DeformConv", "deform_conv2d", lambda i, r: m.DeformConv(4, 6, (3, 3), implementation=i,
                                                                rngs=r), (x,)),
      ("ModulatedDeformConv", "deform_conv2d", lambda i, r: m.ModulatedDeformConv(
          4, 6, (3, 3), offset_group_count=2, implementation=i, rngs=r), (x,)),
      ("DeformRoIPool", "deform_roi_pool", lambda i, r: m.DeformRoIPool(
          4, (2, 2), deform_fc_channels=8, sampling_ratio=2, implementation=i, rngs=r),
       (features, _BOXES)),
      ("ModulatedDeformRoIPool", "deform_roi_pool", lambda i, r: m.ModulatedDeformRoIPool(
          4, (2, 2), deform_fc_channels=8, sampling_ratio=2, implementation=i, rngs=r),
       (features, _ROIS)),
      ("GlobalDeformableKernel", "deformable_kernel", lambda i, r: m.GlobalDeformableKernel(
          4, 6, (3, 3), scope_size=(5, 5), implementation=i, rngs=r), (x,)),
      ("LocalDeformableKernel", "deformable_kernel", lambda i, r: m.LocalDeformableKernel(
          4, 6, (3, 3), scope_size=(5, 5), feature_group_count=2, implementation=i, rngs=r),
       (x,)),
      ("DCNv3", "dcnv3", lambda i, r: m.DCNv3(8, group_count=2, implementation=i, rngs=r),
       (x8,)),
      ("DCNv4", "dcnv4", lambda i, r: m.DCNv4(8, group_count=2, implementation=i, rngs=r),
       (x8,)),
      ("MSDeformAttn", "ms_deform_attn", lambda i, r: m.MSDeformAttn(
          8, num_heads=2, num_levels=2, num_points=3, implementation=i, rngs=r),
       (query, boxes, flat)),
  ]
  static = lambda family: (_SHAPES,) if family == "ms_deform_attn" else ()
  return ([(f"linen.{name}", family, _linen(fn, *inputs, static=static(family)))
           for name, family, fn, inputs in linen]
          + [(f"nnx.{name}", family, _nnx(fn, *inputs, static=static(family)))
             for name, family, fn, inputs in nnx_modules])


class _LinenModel(nn.Module):
  """A small classifier: a stem conv, a DCNv2 block, a DCNv4 block, pooling and a dense head."""
  implementation: str | None = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    x = nn.relu(flaxdcn.ModulatedDeformConv(8, (3, 3), implementation=self.implementation)(x))
    x = flaxdcn.DCNv4(kernel_size=3, group_count=2, implementation=self.implementation)(x)
    return nn.Dense(3)(x.mean((1, 2)))


class _NnxModel(nnx.Module):
  """The NNX twin of the model above, with a DCNv1 block and a DCNv3 block."""

  def __init__(self, implementation: str | None, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
    self.dcn = flaxdcn.nnx.DeformConv(8, 8, (3, 3), implementation=implementation, rngs=rngs)
    self.dcnv3 = flaxdcn.nnx.DCNv3(8, group_count=2, implementation=implementation, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.dcn(nnx.relu(self.stem(x))))
    return self.head(self.dcnv3(x).mean((1, 2)))


_IMAGES = _rand(26, 2, 12, 10, 3)
OPS = [Case(*c) for c in _op_setups()]
MODULES = [Case(*c) for c in _module_setups()]
MODELS = [Case("linen_model", "model", _linen(lambda i: _LinenModel(i), _IMAGES)),
          Case("nnx_model", "model", _nnx(lambda i, r: _NnxModel(i, r), _IMAGES))]
ALL = OPS + MODULES


def _ids(cases):
  """The cases as parameters; the modules' are extended (each lowers the whole module, a few
  seconds on a loaded machine), the functions' run by default."""
  return [pytest.param(c, id=c.name, marks=[pytest.mark.extended] if c in MODULES else [])
          for c in cases]


def _value_and_grad(case, implementation):
  """The sum of squares of the case's result and its gradient with respect to every argument."""
  return jax.value_and_grad(lambda *a: jnp.sum(case.fn(implementation)(*a) ** 2),
                            argnums=tuple(range(len(case.args))))


def _export(fn, args, platforms, **kwargs):
  return jax.export.export(jax.jit(fn), platforms=platforms, **kwargs)(*args)


# --- The switch: jit is native, an export portable ----------------------------------------------

@pytest.mark.parametrize("case", _ids(ALL))
def test_export_is_portable_on_every_platform(case):
  """``implementation=None``: the forward and the forward with backward, exported for cpu, cuda
  and tpu at once, hold no custom call; ``jit`` of the same lowers to flaxdcn's native ones."""
  fn, grad_fn = case.fn(None), _value_and_grad(case, None)
  for f in (fn, grad_fn):
    exported = _export(f, case.args, ("cpu", "cuda", "tpu"))
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert "custom_call" not in exported.mlir_module(), case.name
  native = _custom_calls(jax.jit(grad_fn).lower(*case.args).as_text())  # this machine: cpu
  if case.native:
    assert native and all(t.startswith("flaxdcn_") for t in native), native
    assert any(t.endswith("_bwd") for t in native), native
  else:
    assert not native, native


# --- TPU ----------------------------------------------------------------------------------------

def _tpu_problems(text: str) -> dict[str, list[str]]:
  found = {}
  for what, pattern in TPU_FORBIDDEN.items():
    lines = [line.strip()[:200] for line in text.splitlines() if pattern.search(line)]
    if lines:
      found[what] = lines[:3]
  return found


def test_tpu_check_finds_what_it_looks_for():
  """The TPU check flags a host callback, a float64 value and a flaxdcn custom call."""
  x = jnp.ones((3,), jnp.float32)
  callback = lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
  text = jax.jit(callback).lower(x).as_text()
  assert "custom call" in _tpu_problems(text)
  with jax.enable_x64(True):
    exported = _export(lambda x: x + np.float64(0.5) * x.astype(jnp.float64), (x,), ("tpu",))
  assert "float64" in _tpu_problems(exported.mlir_module())
  case = OPS[0]
  text = jax.jit(case.fn("ffi")).lower(*case.args).as_text()
  assert "custom call" in _tpu_problems(text)


@pytest.mark.parametrize("implementation", [None, "xla"], ids=["None", "xla"])
@pytest.mark.parametrize("case", _ids(ALL))
def test_tpu_lowering(case, implementation):
  """Forward and gradient for ``platforms=("tpu",)``: nothing a TPU cannot run, with float32
  arguments under x64."""
  with jax.enable_x64(True):
    exported = _export(_value_and_grad(case, implementation), case.args, ("tpu",))
  assert exported.platforms == ("tpu",)
  assert not _tpu_problems(exported.mlir_module())
  value, grads = exported.out_avals[0], exported.out_avals[1:]
  assert value.dtype == jnp.float32
  assert [g.dtype for g in grads] == [a.dtype for a in jax.tree.leaves(case.args)]


@pytest.mark.parametrize("case", _ids(ALL))
def test_tpu_ffi_raises(case):
  """``implementation="ffi"`` has no kernels to lower for TPU: a clear error, not a module with a
  custom call the TPU cannot run."""
  with pytest.raises(NotImplementedError, match="implementation='ffi'") as error:
    _export(_value_and_grad(case, "ffi"), case.args, ("tpu",),
            disabled_checks=flaxdcn.disabled_safety_checks())
  if case.native:
    assert "platform tpu" in str(error.value)
    with pytest.raises(NotImplementedError, match=r"platform tpu(?!/)"):
      _export(case.fn("ffi"), case.args, ("cpu", "tpu"),
              disabled_checks=flaxdcn.disabled_safety_checks())


# --- Native on request --------------------------------------------------------------------------

def test_disabled_safety_checks_name_every_target():
  """One check per forward and backward target of every native op, each a ``custom_call``."""
  checks = flaxdcn.disabled_safety_checks()
  assert all(isinstance(c, jax.export.DisabledSafetyCheck) for c in checks)
  names = [c.is_custom_call() for c in checks]
  rows = _ffi._OPS  # pylint: disable=protected-access
  expected = [n for op in rows for n in (op.target, op.target + "_bwd")]
  assert names == expected and len(set(names)) == len(names)
  assert {"flaxdcn_deform_im2col", "flaxdcn_deform_roi_pool_bwd", "flaxdcn_dcnv4"} <= set(names)


@pytest.mark.parametrize("case", _ids([c for c in ALL if c.native]))
def test_native_export(case):
  """``implementation="ffi"``, forward and backward for cpu (and cuda with a CUDA build):
  refused without ``disabled_safety_checks()``; with it, the module holds only flaxdcn's
  targets, each once per platform, and runs here like ``jit``."""
  grad_fn = _value_and_grad(case, "ffi")
  checks = flaxdcn.disabled_safety_checks()
  with pytest.raises(ValueError, match="Cannot serialize code with custom calls"):
    _export(grad_fn, case.args, ("cpu",))
  exported = _export(grad_fn, case.args, ("cpu",), disabled_checks=checks)
  text = exported.mlir_module()
  targets = _custom_calls(text)
  assert targets and targets <= {c.is_custom_call() for c in checks}, targets
  assert any(t.endswith("_bwd") for t in targets), targets
  multi = _export(grad_fn, case.args, NATIVE_PLATFORMS, disabled_checks=checks).mlir_module()
  assert _custom_calls(multi) == targets
  for target in targets:
    call = f"custom_call @{target}("
    assert multi.count(call) == len(NATIVE_PLATFORMS) * text.count(call), target
  for got, want in zip(jax.tree.leaves(exported.call(*case.args)),
                       jax.tree.leaves(jax.jit(grad_fn)(*case.args))):
    assert_close(got, want)


# --- Round trips in fresh processes -------------------------------------------------------------

_ROUND_TRIP_FAMILIES = ["deform_conv2d_v1", "deform_conv2d_v2", "deform_roi_pool_rows",
                        "deform_roi_pool_images", "deformable_kernel_global",
                        "deformable_kernel_local", "dcnv3", "dcnv4", "ms_deform_attn"]
PORTABLE = [c for c in OPS if c.name in _ROUND_TRIP_FAMILIES] + MODELS
NATIVE = [c for c in OPS if c.native and c.name in _ROUND_TRIP_FAMILIES] + MODELS


def _expected(case, implementation, cot):
  def forward_and_vjp(args, cot):
    outputs, vjp = jax.vjp(case.fn(implementation), *args)
    return outputs, vjp(cot)
  return jax.jit(forward_and_vjp)(case.args, cot)


def _write_artifacts(directory):
  """Writes every artifact and its inputs (tests/export_script.py's layout); returns
  ``(expected, targets)``: ``expected[(mode, name)] = (outputs, grads)`` of this process's
  ``jit``, ``targets[artifact]`` the custom call targets of an artifact."""
  expected, targets = {}, {}
  manifest = {"portable": [], "native": []}
  for mode, implementation, cases in (("portable", None, PORTABLE), ("native", "ffi", NATIVE)):
    for case in cases:
      name = f"{mode}-{case.name}"
      fn = case.fn(implementation)
      exported = _export(fn, case.args, ("cpu",),
                         disabled_checks=flaxdcn.disabled_safety_checks() if implementation
                         else ())
      (directory / f"{name}.bin").write_bytes(exported.serialize(vjp_order=1))
      cot = _rand(99, *jax.eval_shape(fn, *case.args).shape)
      arrays = {f"arg{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(case.args))}
      np.savez(directory / f"{name}.npz", cot0=np.asarray(cot), **arrays)
      expected[(mode, case.name)] = _expected(case, implementation, cot)
      targets[name] = _custom_calls(exported.mlir_module())
      manifest[mode].append(name)
  (directory / "manifest.json").write_text(json.dumps(manifest))
  return expected, targets


def _mismatches(directory, mode, case, expected) -> list[str]:
  outputs, grads = expected[(mode, case.name)]
  found = []
  with np.load(directory / mode / f"{mode}-{case.name}.npz") as got:
    for kind, leaves in (("out", outputs), ("grad", grads)):
      for i, want in enumerate(jax.tree.leaves(leaves)):
        try:
          assert_close(got[f"{kind}{i}"], want)
        except AssertionError as e:
          found.append(f"{mode} {case.name} {kind}{i}: {e}")
  return found


@pytest.mark.extended
def test_round_trips(tmp_path):
  """Every artifact, in two fresh processes (one test, so that ``pytest -n`` runs them once).

  Without flaxdcn (it cannot be imported there): each default artifact's forward and serialised
  VJP equal this process's ``jit`` (native kernels) within float32 tolerance, and each native
  artifact fails with an error naming one of its targets. With flaxdcn imported: each native
  artifact's forward and VJP equal ``jit``.
  """
  expected, targets = _write_artifacts(tmp_path)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  for mode in ("portable", "native"):
    # -I: no PYTHONPATH, no user site, not the current directory; flaxdcn is refused besides.
    proc = subprocess.run([sys.executable, "-I", str(SCRIPT), str(tmp_path), mode],
                          env=dict(env, JAX_PLATFORMS="cpu"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{mode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  problems = []
  for case in PORTABLE:
    if targets[f"portable-{case.name}"]:
      problems.append(f"portable {case.name} has custom calls {targets[f'portable-{case.name}']}")
    problems += _mismatches(tmp_path, "portable", case, expected)
  errors = json.loads((tmp_path / "portable" / "native_errors.json").read_text())
  for case in NATIVE:
    name = f"native-{case.name}"
    if not targets[name]:
      problems.append(f"{name} has no custom call")
    problems += _mismatches(tmp_path, "native", case, expected)
    if errors[name] is None:
      problems.append(f"{name} ran without flaxdcn")
    elif not any(t in errors[name] for t in targets[name]):
      problems.append(f"{name} failed without naming a target of {targets[name]}: "
                      f"{errors[name][:300]}")
  assert len(errors) == len(NATIVE)
  assert not problems, "\n".join(problems)
