"""The one file that talks to ``jax.ffi``: the native kernels of ``xla_ext/`` as JAX operations.

Every native op is one row of the table ``_OPS`` (an :class:`_Op`): a forward FFI target
``<target>`` and its backward ``<target>_bwd``, each a JAX primitive with

- a lowering per platform, chosen in one place (:func:`_lowers_natively`) when the program is
  lowered: the custom call on the platforms this build has kernels for (``cpu`` always, ``cuda``
  when compiled with CUDA) and elsewhere the op's pure-jnp ``fallback`` (``implementation=None``)
  or a clear error (``implementation="ffi"``, ``fallback=None``); on a machine whose CUDA driver
  is older than the kernels' CUDA runtime, ``cuda`` takes the fallback with one warning, or
  raises for ``implementation="ffi"`` (both name the two versions);
- a batching rule that folds a vmapped axis into the leading axis (one kernel launch, any depth
  of ``vmap``);
- for the rows that partition by batch (every operand and result leads with the image axis):
  a ``num_batch_dims`` frontend attribute and an ``sdy.sharding_rule`` on the custom call, and
  both targets registered as batch partitionable, so under ``jit`` with batch-sharded inputs
  every device runs its own shard (no all-gather).

A lowering for ``jax.export`` takes the fallback wherever there is one, so that an exported
module is plain StableHLO; :func:`disabled_safety_checks` lets an export keep the custom calls
that ``implementation="ffi"`` asks for.

``jax.custom_vjp`` ties each forward to its backward; the residuals are the inputs (the forward's
intermediates are never kept). Registration happens once, at import, for every platform the
build has (a CUDA target registered on a CPU-only jaxlib is queued for a CUDA plugin, harmlessly).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from flaxdcn._geometry import ConvGeometry, MsDeformAttnGeometry, RoIPoolGeometry, compute_dtype

try:
  from flaxdcn import _native
  _IMPORT_ERROR: str | None = None
except ImportError as e:  # a source checkout without the compiled module
  _native = None
  _IMPORT_ERROR = f"{type(e).__name__}: {e}"

try:  # the helpers jax's own linalg lowerings use for their sharding rules
  from jax._src.custom_partitioning_sharding_rule import (sdy_sharding_rule_to_mlir,
                                                          str_to_sdy_sharding_rule)
except ImportError:  # batch partitioning then falls back to XLA's all-gather; results are equal
  sdy_sharding_rule_to_mlir = str_to_sdy_sharding_rule = None

#: Names the native module registers under -> names of JAX lowering platforms.
_PLATFORMS = {"cpu": "cpu", "CUDA": "cuda"}


# --- The table's row -----------------------------------------------------------------------------

def _fold(x, dim, size):
  """Moves the vmapped axis (broadcasting an unbatched operand) to the front and merges it into
  the leading axis: ``[B, N, ...] -> [B * N, ...]``."""
  x = jnp.broadcast_to(x, (size,) + x.shape) if dim is None else jnp.moveaxis(x, dim, 0)
  return x.reshape((size * x.shape[1],) + x.shape[2:])


def _unfold(x, size):
  return x.reshape((size, x.shape[0] // size) + x.shape[1:])


def _fold_leading(operands, dims, size, backward):
  """The plain folding rule: every operand's vmapped axis merges into its leading axis."""
  del backward
  return [_fold(a, d, size) for a, d in zip(operands, dims)]


def _define(name: str, multiple_results: bool) -> Primitive:
  prim = Primitive(name)
  prim.multiple_results = multiple_results

  @functools.lru_cache(maxsize=None)
  def jitted(**params):
    return jax.jit(functools.partial(prim.bind, **params))

  prim.def_impl(lambda *args, **params: jitted(**params)(*args))
  return prim


@dataclasses.dataclass(eq=False)  # hashed by identity: rows are static parameters of primitives
class _Op:
  """One native op, a row of ``_OPS``: the forward target ``target`` and the backward
  ``target + "_bwd"``.

  The forward takes the operands and returns one array; the backward takes the result's
  cotangent and the operands and returns the gradients of the operands not in ``nondiff``, each
  shaped like its operand. Both take the static ``geometry`` (hashable) and ``fallback``; the
  fallback is called as ``fallback(*operands, geometry)``. An entry point calls
  ``_call(row, *operands, geometry=..., deterministic_backward=..., fallback=...)``.
  """
  #: The public function, named in errors.
  name: str
  #: The forward's FFI target name.
  target: str
  #: ``geometry -> {name: numpy scalar}``: the custom call's attributes (the backward adds
  #: ``deterministic``).
  attributes: Callable[[Any], dict[str, Any]]
  #: ``(*operand avals, geometry) -> result aval`` (use :func:`_out_aval`).
  abstract: Callable[..., Any]
  #: Operands that get no gradient (the backward returns none; their cotangent is zero).
  nondiff: tuple[int, ...] = ()
  #: Operands whose empty last axis stands for None: the fallback receives None for them.
  optional: tuple[int, ...] = ()
  #: Every operand and result leads with the image axis, and the targets partition by it.
  batch_partitionable: bool = True
  #: ``(operands, dims, size, backward) -> operands`` folding a vmapped axis of ``size`` into the
  #: axes the kernels read; every result then unfolds from its leading axis. ``backward``: the
  #: operands are the backward's (after the cotangent, which folds into its leading axis).
  fold: Callable[..., Sequence[Any]] = _fold_leading
  #: The native module's name for this target's handlers, where this row registers them again
  #: under its own names (default: ``target``).
  handler: str | None = None
  #: The forward and backward primitives, named after their targets.
  fwd: Primitive = dataclasses.field(init=False, repr=False)
  bwd: Primitive = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    self.fwd = _define(self.target, multiple_results=False)
    self.bwd = _define(self.target + "_bwd", multiple_results=True)


def _out_aval(like, shape, batch_like=None):
  """The abstract value of an output of ``shape`` in ``like``'s dtype, varying over ``like``'s
  manual axes (shard_map). Under explicit sharding it is sharded along its leading axis like
  ``batch_like``'s leading axis (default ``like``) and replicated otherwise."""
  sharding = (like if batch_like is None else batch_like).sharding
  leading = sharding.spec[0] if len(sharding.spec) else None
  sharding = NamedSharding(sharding.mesh, PartitionSpec(leading, *([None] * (len(shape) - 1))))
  return like.update(shape=tuple(shape), weak_type=False, sharding=sharding)


# --- The rows ------------------------------------------------------------------------------------

def _window_attributes(conv: ConvGeometry) -> dict[str, Any]:
  (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.strides, conv.dilation
  (ph, _), (pw, _) = conv.padding
  attrs = dict(kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw,
               dilation_h=dh, dilation_w=dw)
  return {k: np.int64(v) for k, v in attrs.items()}


def _conv_attributes(geometry: ConvGeometry) -> dict[str, Any]:
  return _window_attributes(geometry) | dict(offset_groups=np.int64(geometry.offset_groups))


def _dcnv3_attributes(geometry) -> dict[str, Any]:
  return _window_attributes(geometry.conv) | dict(
      groups=np.int64(geometry.groups), offset_scale=np.float64(geometry.offset_scale),
      remove_center=bool(geometry.remove_center))


def _roi_attributes(geometry: RoIPoolGeometry) -> dict[str, Any]:
  return dict(spatial_scale=np.float64(geometry.spatial_scale),
              sampling_ratio=np.int64(geometry.sampling_ratio), gamma=np.float64(geometry.gamma))


def _roi_abstract(features, rois, offsets, geometry):
  """``[R, oh, ow, C]`` (its leading axis is the RoIs') or per image ``[N, Ri, oh, ow, C]``."""
  del offsets
  return _out_aval(features, (*rois.shape[:-1], *geometry.output_size, features.shape[-1]),
                   rois if rois.ndim == 2 else features)


def _fold_roi_rows(operands, dims, size, backward):
  """``[R, 5]`` RoIs: the vmapped axis folds into the RoI axis, and batched features (always in
  the backward, where each member needs its own grad-features) into the image axis, moving each
  member's batch indices to its own images (invalid indices stay invalid). Unbatched features
  in the forward are shared, unfolded."""
  (features, rois, offsets), (f_dim, r_dim, o_dim) = operands, dims
  rois, offsets = _fold(rois, r_dim, size), _fold(offsets, o_dim, size)
  if f_dim is None and not backward:
    return features, rois, offsets
  features = _fold(features, f_dim, size)
  images = features.shape[0] // size
  index = rois[:, 0]  # exact in float32 while size * images < 2^24
  member = jnp.repeat(jnp.arange(size, dtype=rois.dtype), rois.shape[0] // size)
  index = jnp.where((index > -1) & (index < images), jnp.trunc(index) + member * images, -1)
  return features, rois.at[:, 0].set(index), offsets


def _dcnv3_abstract(inputs, *sampling, geometry):
  del sampling
  return _out_aval(inputs, (inputs.shape[0], *geometry.conv.out_size, inputs.shape[-1]))


#: The most levels the native ``ms_deform_attn`` kernels take (``kMsDeformAttnMaxLevels`` in
#: ``xla_ext/common/ms_deform_attn.h``).
MSDA_MAX_LEVELS = 16


def _msda_attributes(geometry: MsDeformAttnGeometry) -> dict[str, Any]:
  """The levels' ``(H_l, W_l)`` as one int64 array ``[2 L]``; the kernels derive the starts."""
  return dict(spatial_shapes=np.asarray(geometry.spatial_shapes, np.int64).reshape(-1))


def _msda_abstract(value, locations, weights, geometry):
  """``[N, Lq, M, D]`` in the dtype of ``value``."""
  del weights, geometry
  return _out_aval(value, (value.shape[0], locations.shape[1], *value.shape[2:]))


_IM2COL = _Op(  # inputs [N, H, W, C], offsets, mask (or [.., 0]) -> columns [N, Ho, Wo, K, C]
    "deform_conv2d", "flaxdcn_deform_im2col", _conv_attributes, optional=(2,),
    abstract=lambda x, offsets, mask, geometry: _out_aval(
        x, (x.shape[0], *geometry.out_size, geometry.num_kernel_points, x.shape[-1])))
_ROI_POOL = _Op(  # features [N, H, W, C], rois [R, 5], offsets [R, oh, ow, 2 or 0]
    "deform_roi_pool", "flaxdcn_deform_roi_pool", _roi_attributes, _roi_abstract, nondiff=(1,),
    optional=(2,), batch_partitionable=False, fold=_fold_roi_rows)
_ROI_POOL_IMAGES = _Op(  # features [N, H, W, C], rois [N, Ri, 4], offsets [N, Ri, oh, ow, 2 or 0]
    "deform_roi_pool", "flaxdcn_deform_roi_pool_images", _roi_attributes, _roi_abstract,
    nondiff=(1,), optional=(2,), handler="flaxdcn_deform_roi_pool")
_DCNV3 = _Op("dcnv3", "flaxdcn_dcnv3", _dcnv3_attributes, _dcnv3_abstract)
_DCNV4 = _Op("dcnv4", "flaxdcn_dcnv4", _dcnv3_attributes, _dcnv3_abstract)
_MSDA = _Op(  # value [N, S, M, D], locations [N, Lq, M, L, P, 2], weights -> [N, Lq, M, D]
    "ms_deform_attn", "flaxdcn_ms_deform_attn", _msda_attributes, _msda_abstract)

_OPS = (_IM2COL, _ROI_POOL, _ROI_POOL_IMAGES, _DCNV3, _DCNV4, _MSDA)


# --- Registration --------------------------------------------------------------------------------

def _registered() -> dict[str, dict[str, Any]]:
  """Registers the native targets of every platform built; returns ``{jax platform: targets}``."""
  if _native is None:
    return {}
  registrations = _native.registrations()
  for platform, targets in registrations.items():
    for op in _OPS:
      if op.handler is not None and op.handler in targets:
        targets[op.target] = targets[op.handler]
        targets[op.target + "_bwd"] = targets[op.handler + "_bwd"]
    for name, capsule in targets.items():
      jax.ffi.register_ffi_target(name, capsule, platform=platform)
  for op in _OPS:
    if op.batch_partitionable:
      jax.ffi.register_ffi_target_as_batch_partitionable(op.target)
      jax.ffi.register_ffi_target_as_batch_partitionable(op.target + "_bwd")
  return {_PLATFORMS[p]: targets for p, targets in registrations.items() if p in _PLATFORMS}


_TARGETS = _registered()


def available(platform: str) -> bool:
  """Whether the native kernels were built for ``platform`` (``"cpu"``, ``"cuda"``/``"gpu"``)."""
  platform = platform.lower()
  return ("cuda" if platform == "gpu" else platform) in _TARGETS


def platforms() -> tuple[str, ...]:
  """The JAX platforms (``"cpu"``, ``"cuda"``) this build has native kernels for."""
  return tuple(sorted(_TARGETS))


def build_info() -> dict[str, Any]:
  """Facts of the native build: ``{"cpu": bool, "cuda": bool, "ffi_api": (major, minor), ...}``.

  ``ffi_api`` is the XLA FFI API version of the jaxlib headers the kernels were compiled against;
  the kernels run on any jaxlib whose FFI API is at least that version. CUDA builds add
  ``cuda_runtime`` (the statically linked CUDA runtime, ``(major, minor)``),
  ``cuda_architectures`` and ``cuda_driver``: the CUDA version the installed driver supports, or
  None where no driver is installed. The kernels need ``cuda_driver[0] >= cuda_runtime[0]``.
  Without a compiled module, ``cpu`` and ``cuda`` are False and ``error`` says why.
  """
  if _native is None:
    return {"cpu": False, "cuda": False, "ffi_api": None, "error": _IMPORT_ERROR}
  info = dict(_native.build_info())
  info["ffi_api"] = tuple(info["ffi_api"])
  return info


def disabled_safety_checks() -> list[jax.export.DisabledSafetyCheck]:
  """The ``disabled_checks`` that let ``jax.export`` serialise flaxdcn's native custom calls.

  With the default ``implementation=None`` an exported function holds no custom call and needs
  none of this: a lowering for export takes the pure-jnp path. Where ``implementation="ffi"``
  asks for the native kernels in an exported function, pass this list to
  ``jax.export.export(..., disabled_checks=...)``. It names the forward and backward FFI target
  of every native op, whatever platforms this build has (a target name is the same on every
  platform, and a check for a target the module does not use changes nothing). The artifact
  then runs only in a process that imported flaxdcn, whose targets have those names and
  attributes.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import flaxdcn
    >>> def conv(x, offsets, kernel):
    ...   return flaxdcn.deform_conv2d(x, offsets, kernel, implementation="ffi")
    >>> x, offsets = jnp.ones((1, 5, 5, 4)), jnp.zeros((1, 3, 3, 18))
    >>> kernel = jnp.ones((3, 3, 4, 8))
    >>> exported = jax.export.export(jax.jit(conv), platforms=("cpu",),
    ...                              disabled_checks=flaxdcn.disabled_safety_checks())(
    ...     x, offsets, kernel)
    >>> "flaxdcn_deform_im2col" in exported.mlir_module()
    True
    >>> exported.call(x, offsets, kernel).shape
    (1, 3, 3, 8)

  Returns:
    A list of ``jax.export.DisabledSafetyCheck.custom_call(target)``, one per FFI target.
  """
  return [jax.export.DisabledSafetyCheck.custom_call(name)
          for op in _OPS for name in (op.target, op.target + "_bwd")]


# --- Lowering ------------------------------------------------------------------------------------

def _gpu_backend_present() -> bool:
  try:
    return bool(jax.devices("cuda"))
  except RuntimeError:  # no CUDA backend: CPU-only machines, or lowering for export only
    return False


@functools.cache
def _cuda_driver_problem() -> str | None:
  """Why the CUDA kernels cannot run on this machine's GPU backend, or None.

  The kernels link the CUDA runtime statically, which fails every call (cudaErrorInsufficientDriver)
  on a driver older than the runtime's major version, although jax's own CUDA plugin may work
  there. Only a machine where jax has a CUDA backend is checked: lowering for ``cuda`` elsewhere
  (``jax.export``) needs no driver.
  """
  if not _gpu_backend_present():
    return None
  info = build_info()
  runtime, driver = tuple(info["cuda_runtime"]), info.get("cuda_driver")
  if driver is not None and tuple(driver)[0] >= runtime[0]:
    return None
  found = "no CUDA driver" if driver is None else f"a driver for CUDA {driver[0]}.{driver[1]}"
  return (f"this machine has {found}, but flaxdcn's CUDA kernels were built with the CUDA "
          f"{runtime[0]}.{runtime[1]} runtime (linked statically), which needs a driver for CUDA "
          f"{runtime[0]}.0 or newer")


@functools.cache
def _warn_cuda_fallback(problem: str) -> None:
  warnings.warn(f"flaxdcn: {problem}; implementation=None runs the pure-jnp ('xla') "
                "implementation on the GPU instead (update the driver, or rebuild flaxdcn with the "
                "driver's CUDA toolkit, for the native kernels).", RuntimeWarning, stacklevel=2)


def _lowers_natively(ctx, op: _Op, platform: str | None, fallback: Callable | None) -> bool:
  """Whether ``op`` lowers to its custom call for ``platform`` (True) or to ``fallback`` (False);
  raises where the custom call cannot serve and there is no fallback. Every lowering of every
  op decides here.

  A lowering for ``jax.export`` takes the fallback wherever there is one
  (``implementation=None``), so that the exported module is plain StableHLO that runs without
  flaxdcn; ``implementation="ffi"`` (no fallback) exports the custom call, which
  :func:`disabled_safety_checks` lets ``jax.export`` accept."""
  if fallback is not None and ctx.module_context.lowering_parameters.for_export:
    return False
  if platform not in _TARGETS:
    if fallback is None:
      missing = [p for p in ctx.module_context.platforms if p not in _TARGETS]
      raise NotImplementedError(
          f"{op.name}: implementation='ffi' needs the native kernels for platform "
          f"{'/'.join(missing)}, but this flaxdcn build has them for: "
          f"{', '.join(sorted(_TARGETS) or ['none'])}"
          + (f" ({_IMPORT_ERROR})" if _IMPORT_ERROR else "")
          + ". Use implementation=None (native where built, else 'xla') or 'xla'.")
    return False
  problem = _cuda_driver_problem() if platform == "cuda" else None
  if problem is None:
    return True
  if fallback is None:
    raise RuntimeError(f"{op.name}: implementation='ffi' cannot run the CUDA kernels: {problem}. "
                       "Use implementation=None or 'xla'.")
  _warn_cuda_fallback(problem)
  return False


def _batch_sharding_rule(ctx):
  """``sdy.sharding_rule`` with one factor shared by the leading (batch) dimension of every operand
  and result, and every other dimension a factor of its own that must stay replicated."""
  names = (f"d{i}" for i in itertools.count())  # "n" is the batch factor
  others: list[str] = []

  def mapping(aval):
    dims = [next(names) for _ in aval.shape[1:]]
    others.extend(dims)
    return " ".join(["n", *dims])

  lhs = ", ".join(mapping(a) for a in ctx.avals_in)
  rhs = ", ".join(mapping(a) for a in ctx.avals_out)
  rule = str_to_sdy_sharding_rule(f"{lhs} -> {rhs}", need_replication_factors=tuple(others))
  types = lambda avals: [ir.RankedTensorType.get(a.shape, mlir.dtype_to_ir_type(a.dtype))
                         for a in avals]
  return sdy_sharding_rule_to_mlir(rule, types(ctx.avals_in), types(ctx.avals_out))


def _present(op: _Op, operands):
  return [None if i in op.optional and a.shape[-1] == 0 else a for i, a in enumerate(operands)]


def _fallback_fwd(op, fallback, geometry):
  return lambda *operands: fallback(*_present(op, operands), geometry)


def _fallback_bwd(op, fallback, geometry):
  def fn(grad, *operands):
    def differentiable(*args):
      args = iter(args)
      return fallback(*_present(op, [a if i in op.nondiff else next(args)
                                     for i, a in enumerate(operands)]), geometry)
    _, vjp = jax.vjp(differentiable, *(a for i, a in enumerate(operands) if i not in op.nondiff))
    return vjp(grad)
  return fn


def _lowering(op: _Op, backward: bool, platform: str | None):
  """The lowering of ``op``'s forward (or backward) for ``platform`` (None: every platform
  without a rule of its own)."""
  prim = op.bwd if backward else op.fwd

  def rule(ctx, *args, geometry, fallback, deterministic=None):
    if not _lowers_natively(ctx, op, platform, fallback):
      fn = (_fallback_bwd if backward else _fallback_fwd)(op, fallback, geometry)
      return mlir.lower_fun(fn, multiple_results=backward)(ctx, *args)
    extra = None
    if op.batch_partitionable:
      extra = {"mhlo.frontend_attributes": mlir.ir_attribute({"num_batch_dims": "1"})}
      if jax.config.jax_use_shardy_partitioner and str_to_sdy_sharding_rule is not None:
        extra["sdy.sharding_rule"] = _batch_sharding_rule(ctx)
    attributes = op.attributes(geometry)
    if backward:
      attributes["deterministic"] = bool(deterministic)
    return jax.ffi.ffi_lowering(prim.name, extra_attributes=extra)(ctx, *args, **attributes)

  return rule


def _batching(op: _Op, backward: bool):
  prim = op.bwd if backward else op.fwd

  def rule(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if backward:  # the cotangent leads with the forward result's leading axis
      args = [_fold(args[0], dims[0], size), *op.fold(args[1:], dims[1:], size, True)]
    else:
      args = op.fold(args, dims, size, False)
    out = prim.bind(*args, **params)
    if backward:
      return [_unfold(o, size) for o in out], [0] * len(out)
    return _unfold(out, size), 0

  return rule


def _register(op: _Op) -> None:
  def fwd_abstract(*operands, geometry, fallback):
    del fallback
    return op.abstract(*operands, geometry=geometry)

  def bwd_abstract(grad, *operands, geometry, deterministic, fallback):
    del grad, geometry, deterministic, fallback
    return [_out_aval(a, a.shape) for i, a in enumerate(operands) if i not in op.nondiff]

  op.fwd.def_abstract_eval(fwd_abstract)
  op.bwd.def_abstract_eval(bwd_abstract)
  for backward, prim in ((False, op.fwd), (True, op.bwd)):
    batching.primitive_batchers[prim] = _batching(op, backward)
    for platform in _TARGETS:
      mlir.register_lowering(prim, _lowering(op, backward, platform), platform=platform)
    mlir.register_lowering(prim, _lowering(op, backward, None))


for _op in _OPS:
  _register(_op)


# --- Differentiation and the entry points --------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _apply(op: _Op, geometry, deterministic: bool, fallback, operands: tuple):
  del deterministic
  return op.fwd.bind(*operands, geometry=geometry, fallback=fallback)


def _apply_fwd(op, geometry, deterministic, fallback, operands):
  return _apply(op, geometry, deterministic, fallback, operands), operands


def _apply_bwd(op, geometry, deterministic, fallback, operands, grad):
  grads = iter(op.bwd.bind(grad, *operands, geometry=geometry, deterministic=deterministic,
                           fallback=fallback))
  return (tuple(jnp.zeros_like(a) if i in op.nondiff else next(grads)
                for i, a in enumerate(operands)),)


_apply.defvjp(_apply_fwd, _apply_bwd)


def _call(op: _Op, *operands, geometry, deterministic_backward: bool,
          fallback: Callable | None) -> jax.Array:
  """``op`` on ``operands`` (arguments already checked), differentiable in those not in
  ``op.nondiff``.

  Args:
    op: the row of ``_OPS``.
    *operands: its operands, an empty last axis for an absent ``op.optional`` one.
    geometry: the static (hashable) parameters.
    deterministic_backward: the CUDA backward sums its scattered gradient in fixed point instead
      of with float atomics (bitwise reproducible); the CPU backward always is.
    fallback: ``fallback(*operands, geometry)`` (None for an absent optional operand), lowered on
      platforms without native kernels; None (``implementation="ffi"``) makes those platforms
      an error.
  """
  return _apply(op, geometry, bool(deterministic_backward), fallback, tuple(operands))


def deform_im2col(inputs: jax.Array, offsets: jax.Array, mask: jax.Array | None,
                  geometry: ConvGeometry, *, deterministic_backward: bool,
                  fallback: Callable | None) -> jax.Array:
  """Deformable im2col by the native kernels (arguments already checked).

  Args:
    inputs: ``[N, H, W, C]`` in a floating dtype ``T``.
    offsets: ``[N, Ho, Wo, G * kh * kw * 2]`` in ``T``, channel order ``(g, i, j, (dy, dx))``.
    mask: ``[N, Ho, Wo, G * kh * kw]`` in ``T``, or None.
    geometry, deterministic_backward, fallback: as in :func:`_call`.

  Returns:
    Columns ``[N, Ho, Wo, kh * kw, C]`` in ``T``; differentiable in ``inputs``, ``offsets`` and
    ``mask``.
  """
  if mask is None:
    mask = jnp.zeros(offsets.shape[:3] + (0,), offsets.dtype)
  return _call(_IM2COL, inputs, offsets, mask, geometry=geometry,
               deterministic_backward=deterministic_backward, fallback=fallback)


def deform_roi_pool(features: jax.Array, rois: jax.Array, offsets: jax.Array | None,
                    geometry: RoIPoolGeometry, *, deterministic_backward: bool,
                    fallback: Callable | None) -> jax.Array:
  """Deformable RoI pooling by the native kernels (arguments already checked; no mask).

  Args:
    features: ``[N, H, W, C]`` in a floating dtype ``T``.
    rois: ``[R, 5]`` ``(batch_index, x1, y1, x2, y2)``, or per image ``[N, Ri, 4]``
      ``(x1, y1, x2, y2)`` (batch partitionable; a box that is not ``x1 < x2 and y1 < y2`` pools
      zeros), in the compute dtype of ``T`` (float64 for float64, else float32); not
      differentiated.
    offsets: ``[R, oh, ow, 2]`` (per image ``[N, Ri, oh, ow, 2]``) ``(dy, dx)`` in ``T``, or None.
    geometry, deterministic_backward, fallback: as in :func:`_call`.

  Returns:
    ``[R, oh, ow, C]`` (per image ``[N, Ri, oh, ow, C]``) in ``T``; differentiable in
    ``features`` and ``offsets``.
  """
  if rois.dtype != compute_dtype(features.dtype):
    raise TypeError(f"deform_roi_pool: rois must be {compute_dtype(features.dtype)} for "
                    f"{features.dtype} features, got {rois.dtype}.")
  if offsets is None:
    offsets = jnp.zeros((*rois.shape[:-1], *geometry.output_size, 0), features.dtype)
  return _call(_ROI_POOL_IMAGES if rois.ndim == 3 else _ROI_POOL, features, rois, offsets,
               geometry=geometry, deterministic_backward=deterministic_backward,
               fallback=fallback)


def dcnv3(inputs: jax.Array, offsets: jax.Array, mask: jax.Array, geometry, *,
          deterministic_backward: bool, fallback: Callable | None) -> jax.Array:
  """DCNv3 by the fused native kernels (arguments already checked).

  Args:
    inputs: ``[N, H, W, C]`` in a floating dtype ``T``.
    offsets: ``[N, Ho, Wo, G * P * 2]`` in ``T``, channel order ``(g, p, (dx, dy))``.
    mask: ``[N, Ho, Wo, G * P]`` in ``T``.
    geometry: the static :class:`~flaxdcn._geometry.Dcnv3Geometry`.
    deterministic_backward, fallback: as in :func:`_call`.

  Returns:
    ``[N, Ho, Wo, C]`` in ``T``; differentiable in all three arguments.
  """
  return _call(_DCNV3, inputs, offsets, mask, geometry=geometry,
               deterministic_backward=deterministic_backward, fallback=fallback)


def dcnv4(inputs: jax.Array, offset_mask: jax.Array, geometry, *, deterministic_backward: bool,
          fallback: Callable | None) -> jax.Array:
  """DCNv4 by the fused native kernels: :func:`dcnv3` with ``offset_mask [N, Ho, Wo, D]`` (its
  padding channels get zero gradient)."""
  return _call(_DCNV4, inputs, offset_mask, geometry=geometry,
               deterministic_backward=deterministic_backward, fallback=fallback)


def ms_deform_attn(value: jax.Array, sampling_locations: jax.Array, attention_weights: jax.Array,
                   geometry: MsDeformAttnGeometry, *, deterministic_backward: bool,
                   fallback: Callable | None) -> jax.Array:
  """Multi-scale deformable attention by the fused native kernels (arguments already checked).

  Args:
    value: ``[N, S, M, D]`` in a floating dtype ``T``.
    sampling_locations: ``[N, Lq, M, L, P, 2]`` ``(x, y)`` in the compute dtype of ``T``
      (float64 for float64, else float32).
    attention_weights: ``[N, Lq, M, L, P]`` in ``T``.
    geometry: the static :class:`~flaxdcn._geometry.MsDeformAttnGeometry`; at most
      ``MSDA_MAX_LEVELS`` levels (the kernels carry the level table by value).
    deterministic_backward, fallback: as in :func:`_call`.

  Returns:
    ``[N, Lq, M, D]`` in ``T``; differentiable in all three arguments.

  Raises:
    ValueError: more than ``MSDA_MAX_LEVELS`` levels with ``fallback`` None (with a fallback,
      such a call runs the fallback).
  """
  if geometry.num_levels > MSDA_MAX_LEVELS:
    if fallback is None:
      raise ValueError(f"ms_deform_attn: the native kernels take at most {MSDA_MAX_LEVELS} "
                       f"levels, got {geometry.num_levels}; use implementation=None or 'xla'.")
    return fallback(value, sampling_locations, attention_weights, geometry)
  return _call(_MSDA, value, sampling_locations, attention_weights, geometry=geometry,
               deterministic_backward=deterministic_backward, fallback=fallback)
