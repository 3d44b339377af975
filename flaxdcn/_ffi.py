"""The one file that talks to ``jax.ffi``: the native kernels of ``xla_ext/`` as JAX operations.

Each native stage is a JAX primitive (forward and backward of the deformable im2col and of the
deformable RoI pooling) with

- a lowering per platform, chosen when the program is lowered: the XLA FFI custom call on the
  platforms this build has kernels for (``cpu`` always, ``cuda`` when compiled with CUDA), and
  elsewhere the pure-jnp ``fallback`` (``implementation=None``) or a clear error
  (``implementation="ffi"``, ``fallback=None``); on a machine whose CUDA driver is older than
  the kernels' CUDA runtime, the ``cuda`` lowering takes the fallback with one warning, or raises
  for ``implementation="ffi"`` (both name the two versions);
- a batching rule that folds a vmapped axis into the batch axis (one kernel launch, any depth of
  ``vmap``);
- for the convolution and the per-image RoI pooling, batch partitioning: the custom call carries
  a ``num_batch_dims`` frontend attribute and an ``sdy.sharding_rule``, and its targets are
  registered as batch partitionable, so under ``jit`` with batch-sharded inputs every device runs
  its own shard (no all-gather).

``jax.custom_vjp`` ties each forward to its backward; residuals are the inputs (the columns are
never kept). Registration happens once, at import, for every platform the build has (registering
a CUDA target on a CPU-only jaxlib is harmless: it is queued for a CUDA plugin).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from flaxdcn._geometry import ConvGeometry, RoIPoolGeometry, compute_dtype

try:
  from flaxdcn import _native  # pytype: disable=import-error
  _IMPORT_ERROR: str | None = None
except ImportError as e:  # a source checkout without the compiled module
  _native = None
  _IMPORT_ERROR = f"{type(e).__name__}: {e}"

try:  # the helpers jax's own linalg lowerings use for their sharding rules
  from jax._src.custom_partitioning_sharding_rule import (sdy_sharding_rule_to_mlir,
                                                          str_to_sdy_sharding_rule)
except ImportError:  # batch partitioning then falls back to XLA's all-gather; results are equal
  sdy_sharding_rule_to_mlir = str_to_sdy_sharding_rule = None

_IM2COL = "flaxdcn_deform_im2col"
_IM2COL_BWD = "flaxdcn_deform_im2col_bwd"
_ROI_POOL = "flaxdcn_deform_roi_pool"
_ROI_POOL_BWD = "flaxdcn_deform_roi_pool_bwd"
# The RoI handlers read the form from the rank of rois. The per-image form ([N, Ri, 4]: the image
# axis leads every operand and result) is the one that partitions by batch, under names of its own.
_ROI_POOL_IMAGES = "flaxdcn_deform_roi_pool_images"
_ROI_POOL_IMAGES_BWD = "flaxdcn_deform_roi_pool_images_bwd"
_ALIASES = {_ROI_POOL_IMAGES: _ROI_POOL, _ROI_POOL_IMAGES_BWD: _ROI_POOL_BWD}

#: Names the native module registers under -> names of JAX lowering platforms.
_PLATFORMS = {"cpu": "cpu", "CUDA": "cuda"}


def _registered() -> dict[str, dict[str, Any]]:
  if _native is None:
    return {}
  registrations = _native.registrations()
  for platform, targets in registrations.items():
    targets.update({alias: targets[name] for alias, name in _ALIASES.items() if name in targets})
    for name, capsule in targets.items():
      jax.ffi.register_ffi_target(name, capsule, platform=platform)
  for name in (_IM2COL, _IM2COL_BWD, _ROI_POOL_IMAGES, _ROI_POOL_IMAGES_BWD):
    jax.ffi.register_ffi_target_as_batch_partitionable(name)
  return {_PLATFORMS[p]: targets for p, targets in registrations.items() if p in _PLATFORMS}


_TARGETS = _registered()


def available(platform: str) -> bool:
  """Whether the native kernels were built for ``platform`` (``"cpu"``, ``"cuda"``/``"gpu"``)."""
  platform = platform.lower()
  return ("cuda" if platform == "gpu" else platform) in _TARGETS


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


# --- Primitive plumbing ------------------------------------------------------------------------

def _out_aval(like, shape, batch_like=None):
  """The abstract value of an output of ``shape`` in ``like``'s dtype, varying over ``like``'s
  manual axes (shard_map). Under explicit sharding it is sharded along its leading axis like
  ``batch_like``'s leading axis (default ``like``) and replicated otherwise."""
  batch_like = like if batch_like is None else batch_like
  sharding = batch_like.sharding
  spec = sharding.spec
  leading = spec[0] if len(spec) else None
  sharding = NamedSharding(sharding.mesh, PartitionSpec(leading, *([None] * (len(shape) - 1))))
  return like.update(shape=tuple(shape), weak_type=False, sharding=sharding)


def _define(name: str, multiple_results: bool) -> Primitive:
  prim = Primitive(name)
  prim.multiple_results = multiple_results

  @functools.lru_cache(maxsize=None)
  def jitted(**params):
    return jax.jit(functools.partial(prim.bind, **params))

  def impl(*args, **params):
    return jitted(**params)(*args)

  prim.def_impl(impl)
  return prim


def _unavailable_error(op: str, ctx) -> NotImplementedError:
  platforms = tuple(ctx.module_context.platforms)
  built = sorted(_TARGETS) or ["none"]
  return NotImplementedError(
      f"{op}: implementation='ffi' needs the native kernels for platform {'/'.join(platforms)}, "
      f"but this flaxdcn build has them for: {', '.join(built)}"
      + (f" ({_IMPORT_ERROR})" if _IMPORT_ERROR else "")
      + ". Use implementation=None (native where built, else 'xla') or 'xla'.")


def _batch_sharding_rule(ctx):
  """``sdy.sharding_rule`` with one factor shared by the leading (batch) dimension of every operand
  and result, and every other dimension a factor of its own that must stay replicated."""
  letters = iter("abcdefghijklmopqrstuvwxyz")  # "n" is the batch factor
  others: list[str] = []

  def mapping(aval):
    dims = [next(letters) for _ in aval.shape[1:]]
    others.extend(dims)
    return " ".join(["n", *dims])

  lhs = ", ".join(mapping(a) for a in ctx.avals_in)
  rhs = ", ".join(mapping(a) for a in ctx.avals_out)
  rule = str_to_sdy_sharding_rule(f"{lhs} -> {rhs}", need_replication_factors=tuple(others))
  types = lambda avals: [ir.RankedTensorType.get(a.shape, mlir.dtype_to_ir_type(a.dtype))
                         for a in avals]
  return sdy_sharding_rule_to_mlir(rule, types(ctx.avals_in), types(ctx.avals_out))


def _native_lowering(target: str, attributes: Callable[..., dict[str, Any]],
                     batch_partitionable: bool):
  """Lowering to the custom call ``target``; ``attributes(**params)`` gives its attributes."""

  def rule(ctx, *args, **params):
    extra = None
    if batch_partitionable:
      extra = {"mhlo.frontend_attributes": mlir.ir_attribute({"num_batch_dims": "1"})}
      if jax.config.jax_use_shardy_partitioner and str_to_sdy_sharding_rule is not None:
        extra["sdy.sharding_rule"] = _batch_sharding_rule(ctx)
    return jax.ffi.ffi_lowering(target, extra_attributes=extra)(ctx, *args, **attributes(**params))

  return rule


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


def _cuda_checked(native_rule, fallback_rule, op: str):
  """The CUDA lowering: native where the driver can run the kernels; otherwise the fallback with
  one warning (``implementation=None``) or an error (``implementation="ffi"``)."""

  def rule(ctx, *args, fallback, **params):
    problem = _cuda_driver_problem()
    if problem is None:
      return native_rule(ctx, *args, fallback=fallback, **params)
    if fallback is None:
      raise RuntimeError(f"{op}: implementation='ffi' cannot run the CUDA kernels: {problem}. "
                         "Use implementation=None or 'xla'.")
    _warn_cuda_fallback(problem)
    return fallback_rule(ctx, *args, fallback=fallback, **params)

  return rule


def _register_lowerings(prim: Primitive, target: str, attributes, fallback_rule,
                        batch_partitionable: bool) -> None:
  for platform in _TARGETS:
    rule = _native_lowering(target, attributes, batch_partitionable)
    if platform == "cuda":
      rule = _cuda_checked(rule, fallback_rule, prim.name)
    mlir.register_lowering(prim, rule, platform=platform)
  mlir.register_lowering(prim, fallback_rule)  # every other platform


def _fold(x, dim, size):
  """Moves the vmapped axis (broadcasting an unbatched operand) to the front and merges it into
  the leading axis: ``[B, N, ...] -> [B * N, ...]``."""
  x = jnp.broadcast_to(x, (size,) + x.shape) if dim is None else jnp.moveaxis(x, dim, 0)
  return x.reshape((size * x.shape[1],) + x.shape[2:])


def _unfold(x, size):
  return x.reshape((size, x.shape[0] // size) + x.shape[1:])


# --- Deformable im2col ---------------------------------------------------------------------------

_im2col_p = _define(_IM2COL, multiple_results=False)
_im2col_bwd_p = _define(_IM2COL_BWD, multiple_results=True)


def _conv_attributes(geometry: ConvGeometry, **extra) -> dict[str, Any]:
  (kh, kw), (sh, sw), (dh, dw) = geometry.kernel_size, geometry.strides, geometry.dilation
  (ph, _), (pw, _) = geometry.padding
  attrs = dict(kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw,
               dilation_h=dh, dilation_w=dw, offset_groups=geometry.offset_groups)
  return {k: np.int64(v) for k, v in attrs.items()} | extra


def _im2col_abstract(inputs, offsets, mask, *, geometry, fallback):
  del offsets, mask, fallback
  n, _, _, channels = inputs.shape
  return _out_aval(inputs, (n, *geometry.out_size, geometry.num_kernel_points, channels))


def _im2col_bwd_abstract(grad_columns, inputs, offsets, mask, *, geometry, deterministic,
                         fallback):
  del grad_columns, geometry, deterministic, fallback
  return [_out_aval(inputs, inputs.shape), _out_aval(offsets, offsets.shape),
          _out_aval(mask, mask.shape)]


def _mask_or_none(mask):
  return None if mask.shape[-1] == 0 else mask


def _im2col_fallback(ctx, inputs, offsets, mask, *, geometry, fallback):
  if fallback is None:
    raise _unavailable_error("deform_conv2d", ctx)

  def fn(inputs, offsets, mask):
    return fallback(inputs, offsets, _mask_or_none(mask), geometry)

  return mlir.lower_fun(fn, multiple_results=False)(ctx, inputs, offsets, mask)


def _im2col_bwd_fallback(ctx, grad_columns, inputs, offsets, mask, *, geometry, deterministic,
                         fallback):
  del deterministic
  if fallback is None:
    raise _unavailable_error("deform_conv2d", ctx)

  def fn(grad_columns, inputs, offsets, mask):
    if mask.shape[-1] == 0:
      _, vjp = jax.vjp(lambda x, o: fallback(x, o, None, geometry), inputs, offsets)
      return (*vjp(grad_columns), jnp.zeros_like(mask))
    _, vjp = jax.vjp(lambda x, o, m: fallback(x, o, m, geometry), inputs, offsets, mask)
    return vjp(grad_columns)

  return mlir.lower_fun(fn, multiple_results=True)(ctx, grad_columns, inputs, offsets, mask)


def _im2col_batch(args, dims, *, geometry, fallback):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  out = _im2col_p.bind(*(_fold(a, d, size) for a, d in zip(args, dims)), geometry=geometry,
                       fallback=fallback)
  return _unfold(out, size), 0


def _im2col_bwd_batch(args, dims, **params):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  outs = _im2col_bwd_p.bind(*(_fold(a, d, size) for a, d in zip(args, dims)), **params)
  return [_unfold(o, size) for o in outs], [0, 0, 0]


_im2col_p.def_abstract_eval(_im2col_abstract)
_im2col_bwd_p.def_abstract_eval(_im2col_bwd_abstract)
batching.primitive_batchers[_im2col_p] = _im2col_batch
batching.primitive_batchers[_im2col_bwd_p] = _im2col_bwd_batch
_register_lowerings(_im2col_p, _IM2COL,
                    lambda geometry, fallback: _conv_attributes(geometry),
                    _im2col_fallback, batch_partitionable=True)
_register_lowerings(_im2col_bwd_p, _IM2COL_BWD,
                    lambda geometry, deterministic, fallback: _conv_attributes(
                        geometry, deterministic=bool(deterministic)),
                    _im2col_bwd_fallback, batch_partitionable=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _im2col(inputs, offsets, mask, geometry, deterministic, fallback):
  del deterministic
  return _im2col_p.bind(inputs, offsets, mask, geometry=geometry, fallback=fallback)


def _im2col_fwd(inputs, offsets, mask, geometry, deterministic, fallback):
  out = _im2col(inputs, offsets, mask, geometry, deterministic, fallback)
  return out, (inputs, offsets, mask)


def _im2col_bwd(geometry, deterministic, fallback, residuals, grad_columns):
  return tuple(_im2col_bwd_p.bind(grad_columns, *residuals, geometry=geometry,
                                  deterministic=deterministic, fallback=fallback))


_im2col.defvjp(_im2col_fwd, _im2col_bwd)


def deform_im2col(inputs: jax.Array, offsets: jax.Array, mask: jax.Array | None,
                  geometry: ConvGeometry, *, deterministic_backward: bool,
                  fallback: Callable | None) -> jax.Array:
  """Deformable im2col by the native kernels (arguments already checked).

  Args:
    inputs: ``[N, H, W, C]`` in a floating dtype ``T``.
    offsets: ``[N, Ho, Wo, G * kh * kw * 2]`` in ``T``, channel order ``(g, i, j, (dy, dx))``.
    mask: ``[N, Ho, Wo, G * kh * kw]`` in ``T``, or None.
    geometry: the static geometry.
    deterministic_backward: the CUDA backward sums grad-inputs in fixed point instead of with
      float atomics (bitwise reproducible); the CPU backward always is.
    fallback: ``fallback(inputs, offsets, mask, geometry)``, lowered on platforms without native
      kernels; None (``implementation="ffi"``) makes those platforms an error.

  Returns:
    Columns ``[N, Ho, Wo, kh * kw, C]`` in ``T``; differentiable in ``inputs``, ``offsets`` and
    ``mask``.
  """
  if mask is None:
    mask = jnp.zeros(offsets.shape[:3] + (0,), offsets.dtype)
  return _im2col(inputs, offsets, mask, geometry, bool(deterministic_backward), fallback)


# --- Deformable RoI pooling ----------------------------------------------------------------------

_roi_pool_p = _define(_ROI_POOL, multiple_results=False)
_roi_pool_bwd_p = _define(_ROI_POOL_BWD, multiple_results=True)


def _roi_attributes(geometry: RoIPoolGeometry, **extra) -> dict[str, Any]:
  return dict(spatial_scale=np.float64(geometry.spatial_scale),
              sampling_ratio=np.int64(geometry.sampling_ratio),
              gamma=np.float64(geometry.gamma)) | extra


def _roi_pool_abstract(features, rois, offsets, *, geometry, fallback):
  del fallback
  return _out_aval(features, (rois.shape[0], *geometry.output_size, features.shape[-1]), rois)


def _roi_pool_bwd_abstract(grad_pooled, features, rois, offsets, *, geometry, deterministic,
                           fallback):
  del grad_pooled, rois, geometry, deterministic, fallback
  return [_out_aval(features, features.shape), _out_aval(offsets, offsets.shape)]


def _offsets_or_none(offsets):
  return None if offsets.shape[-1] == 0 else offsets


def _roi_pool_fallback(ctx, features, rois, offsets, *, geometry, fallback):
  if fallback is None:
    raise _unavailable_error("deform_roi_pool", ctx)

  def fn(features, rois, offsets):
    return fallback(features, rois, _offsets_or_none(offsets), geometry)

  return mlir.lower_fun(fn, multiple_results=False)(ctx, features, rois, offsets)


def _roi_pool_bwd_fallback(ctx, grad_pooled, features, rois, offsets, *, geometry, deterministic,
                           fallback):
  del deterministic
  if fallback is None:
    raise _unavailable_error("deform_roi_pool", ctx)

  def fn(grad_pooled, features, rois, offsets):
    if offsets.shape[-1] == 0:
      _, vjp = jax.vjp(lambda f: fallback(f, rois, None, geometry), features)
      return (*vjp(grad_pooled), jnp.zeros_like(offsets))
    _, vjp = jax.vjp(lambda f, o: fallback(f, rois, o, geometry), features, offsets)
    return vjp(grad_pooled)

  return mlir.lower_fun(fn, multiple_results=True)(ctx, grad_pooled, features, rois, offsets)


def _fold_roi_operands(features, rois, offsets, dims, size, *, fold_features: bool):
  """Folds the vmapped axis of a pooling call into the RoI axis (and, with ``fold_features``, into
  the image axis, moving each member's RoI batch indices to its own images; invalid indices stay
  invalid). Without ``fold_features`` the features must be unbatched and are shared."""
  f_dim, r_dim, o_dim = dims
  rois = _fold(rois, r_dim, size)
  offsets = _fold(offsets, o_dim, size)
  if not fold_features:
    return features, rois, offsets
  features = _fold(features, f_dim, size)
  images = features.shape[0] // size
  # Exact in float32 while size * images < 2^24.
  index = rois[:, 0]
  member = jnp.repeat(jnp.arange(size, dtype=rois.dtype), rois.shape[0] // size)
  index = jnp.where((index > -1) & (index < images), jnp.trunc(index) + member * images, -1)
  return features, rois.at[:, 0].set(index), offsets


def _roi_pool_batch(args, dims, *, geometry, fallback):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  folded = _fold_roi_operands(*args, dims, size, fold_features=dims[0] is not None)
  out = _roi_pool_p.bind(*folded, geometry=geometry, fallback=fallback)
  return _unfold(out, size), 0


def _roi_pool_bwd_batch(args, dims, **params):
  grad_pooled, *operands = args
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  # Each member needs its own grad-features, so shared features are folded (broadcast) too.
  features, rois, offsets = _fold_roi_operands(*operands, dims[1:], size, fold_features=True)
  grad_pooled = _fold(grad_pooled, dims[0], size)
  outs = _roi_pool_bwd_p.bind(grad_pooled, features, rois, offsets, **params)
  return [_unfold(o, size) for o in outs], [0, 0]


_roi_pool_p.def_abstract_eval(_roi_pool_abstract)
_roi_pool_bwd_p.def_abstract_eval(_roi_pool_bwd_abstract)
batching.primitive_batchers[_roi_pool_p] = _roi_pool_batch
batching.primitive_batchers[_roi_pool_bwd_p] = _roi_pool_bwd_batch
_register_lowerings(_roi_pool_p, _ROI_POOL,
                    lambda geometry, fallback: _roi_attributes(geometry),
                    _roi_pool_fallback, batch_partitionable=False)
_register_lowerings(_roi_pool_bwd_p, _ROI_POOL_BWD,
                    lambda geometry, deterministic, fallback: _roi_attributes(
                        geometry, deterministic=bool(deterministic)),
                    _roi_pool_bwd_fallback, batch_partitionable=False)

# Per-image RoIs: features [N, H, W, C], rois [N, Ri, 4], offsets [N, Ri, oh, ow, 2 or 0] ->
# pooled [N, Ri, oh, ow, C]. The image axis leads everything, so vmap folds into it and the
# custom call partitions by it, like the convolution's.
_roi_pool_images_p = _define(_ROI_POOL_IMAGES, multiple_results=False)
_roi_pool_images_bwd_p = _define(_ROI_POOL_IMAGES_BWD, multiple_results=True)


def _roi_pool_images_abstract(features, rois, offsets, *, geometry, fallback):
  del offsets, fallback
  return _out_aval(features, (*rois.shape[:2], *geometry.output_size, features.shape[-1]))


def _fold_all_batch(prim: Primitive, multiple_results: bool):
  """The batching rule of a primitive whose operands and results all lead with the image axis:
  the vmapped axis is folded into it."""

  def rule(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    out = prim.bind(*(_fold(a, d, size) for a, d in zip(args, dims)), **params)
    if multiple_results:
      return [_unfold(o, size) for o in out], [0] * len(out)
    return _unfold(out, size), 0

  return rule


_roi_pool_images_p.def_abstract_eval(_roi_pool_images_abstract)
_roi_pool_images_bwd_p.def_abstract_eval(_roi_pool_bwd_abstract)
batching.primitive_batchers[_roi_pool_images_p] = _fold_all_batch(_roi_pool_images_p, False)
batching.primitive_batchers[_roi_pool_images_bwd_p] = _fold_all_batch(_roi_pool_images_bwd_p,
                                                                      True)
_register_lowerings(_roi_pool_images_p, _ROI_POOL_IMAGES,
                    lambda geometry, fallback: _roi_attributes(geometry),
                    _roi_pool_fallback, batch_partitionable=True)
_register_lowerings(_roi_pool_images_bwd_p, _ROI_POOL_IMAGES_BWD,
                    lambda geometry, deterministic, fallback: _roi_attributes(
                        geometry, deterministic=bool(deterministic)),
                    _roi_pool_bwd_fallback, batch_partitionable=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _roi_pool(features, rois, offsets, geometry, deterministic, fallback):
  del deterministic
  prim = _roi_pool_images_p if rois.ndim == 3 else _roi_pool_p
  return prim.bind(features, rois, offsets, geometry=geometry, fallback=fallback)


def _roi_pool_fwd(features, rois, offsets, geometry, deterministic, fallback):
  out = _roi_pool(features, rois, offsets, geometry, deterministic, fallback)
  return out, (features, rois, offsets)


def _roi_pool_bwd(geometry, deterministic, fallback, residuals, grad_pooled):
  features, rois, offsets = residuals
  prim = _roi_pool_images_bwd_p if rois.ndim == 3 else _roi_pool_bwd_p
  grad_features, grad_offsets = prim.bind(
      grad_pooled, features, rois, offsets, geometry=geometry, deterministic=deterministic,
      fallback=fallback)
  return grad_features, jnp.zeros_like(rois), grad_offsets  # RoIs are not differentiated


_roi_pool.defvjp(_roi_pool_fwd, _roi_pool_bwd)


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
    geometry: the static parameters.
    deterministic_backward: the CUDA backward sums grad-features in fixed point instead of with
      float atomics (bitwise reproducible); the CPU backward always is.
    fallback: ``fallback(features, rois, offsets, geometry)``, lowered on platforms without native
      kernels; None (``implementation="ffi"``) makes those platforms an error.

  Returns:
    ``[R, oh, ow, C]`` (per image ``[N, Ri, oh, ow, C]``) in ``T``; differentiable in
    ``features`` and ``offsets``.
  """
  if rois.dtype != compute_dtype(features.dtype):
    raise TypeError(f"deform_roi_pool: rois must be {compute_dtype(features.dtype)} for "
                    f"{features.dtype} features, got {rois.dtype}.")
  if offsets is None:
    offsets = jnp.zeros((*rois.shape[:-1], *geometry.output_size, 0), features.dtype)
  return _roi_pool(features, rois, offsets, geometry, bool(deterministic_backward), fallback)


# --- DCNv3 / DCNv4 -------------------------------------------------------------------------------
# Fused sampling summed over points: inputs [N, H, W, C] and DCNv3's offsets + mask (or DCNv4's
# offset_mask) -> out [N, Ho, Wo, C]. Every operand and result leads with the image axis, so vmap
# folds into it and the custom calls partition by it, like the convolution's.

_DCNV3 = "flaxdcn_dcnv3"
_DCNV3_BWD = "flaxdcn_dcnv3_bwd"
_DCNV4 = "flaxdcn_dcnv4"
_DCNV4_BWD = "flaxdcn_dcnv4_bwd"

if _native is not None:
  for _name in (_DCNV3, _DCNV3_BWD, _DCNV4, _DCNV4_BWD):
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)

_dcnv3_p = _define(_DCNV3, multiple_results=False)
_dcnv3_bwd_p = _define(_DCNV3_BWD, multiple_results=True)
_dcnv4_p = _define(_DCNV4, multiple_results=False)
_dcnv4_bwd_p = _define(_DCNV4_BWD, multiple_results=True)


def _dcnv3_attributes(geometry, **extra) -> dict[str, Any]:
  conv = geometry.conv
  (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.strides, conv.dilation
  (ph, _), (pw, _) = conv.padding
  attrs = dict(kernel_h=kh, kernel_w=kw, stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw,
               dilation_h=dh, dilation_w=dw, groups=geometry.groups)
  return ({k: np.int64(v) for k, v in attrs.items()}
          | dict(offset_scale=np.float64(geometry.offset_scale),
                 remove_center=bool(geometry.remove_center)) | extra)


def _dcnv3_abstract(inputs, *sampling, geometry, fallback):
  del sampling, fallback
  return _out_aval(inputs, (inputs.shape[0], *geometry.conv.out_size, inputs.shape[-1]))


def _dcnv3_bwd_abstract(grad_out, inputs, *sampling, geometry, deterministic, fallback):
  del grad_out, geometry, deterministic, fallback
  return [_out_aval(inputs, inputs.shape)] + [_out_aval(a, a.shape) for a in sampling]


def _dcnv3_fallback(op: str):
  def rule(ctx, *args, geometry, fallback):
    if fallback is None:
      raise _unavailable_error(op, ctx)
    fn = lambda *a: fallback(*a, geometry)
    return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)
  return rule


def _dcnv3_bwd_fallback(op: str):
  def rule(ctx, grad_out, *primals, geometry, deterministic, fallback):
    del deterministic
    if fallback is None:
      raise _unavailable_error(op, ctx)

    def fn(grad_out, *primals):
      _, vjp = jax.vjp(lambda *a: fallback(*a, geometry), *primals)
      return vjp(grad_out)

    return mlir.lower_fun(fn, multiple_results=True)(ctx, grad_out, *primals)
  return rule


def _fold_leading(prim: Primitive):
  """Batching rule of a primitive whose operands and results all lead with the image axis."""

  def rule(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    out = prim.bind(*(_fold(a, d, size) for a, d in zip(args, dims)), **params)
    if prim.multiple_results:
      return [_unfold(o, size) for o in out], [0] * len(out)
    return _unfold(out, size), 0

  return rule


for _fwd_p, _bwd_p, _fwd_target, _bwd_target, _op in (
    (_dcnv3_p, _dcnv3_bwd_p, _DCNV3, _DCNV3_BWD, "dcnv3"),
    (_dcnv4_p, _dcnv4_bwd_p, _DCNV4, _DCNV4_BWD, "dcnv4")):
  _fwd_p.def_abstract_eval(_dcnv3_abstract)
  _bwd_p.def_abstract_eval(_dcnv3_bwd_abstract)
  batching.primitive_batchers[_fwd_p] = _fold_leading(_fwd_p)
  batching.primitive_batchers[_bwd_p] = _fold_leading(_bwd_p)
  _register_lowerings(_fwd_p, _fwd_target,
                      lambda geometry, fallback: _dcnv3_attributes(geometry),
                      _dcnv3_fallback(_op), batch_partitionable=True)
  _register_lowerings(_bwd_p, _bwd_target,
                      lambda geometry, deterministic, fallback: _dcnv3_attributes(
                          geometry, deterministic=bool(deterministic)),
                      _dcnv3_bwd_fallback(_op), batch_partitionable=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dcnv3(inputs, offsets, mask, geometry, deterministic, fallback):
  del deterministic
  return _dcnv3_p.bind(inputs, offsets, mask, geometry=geometry, fallback=fallback)


def _dcnv3_fwd(inputs, offsets, mask, geometry, deterministic, fallback):
  return (_dcnv3(inputs, offsets, mask, geometry, deterministic, fallback),
          (inputs, offsets, mask))


def _dcnv3_vjp(geometry, deterministic, fallback, residuals, grad_out):
  return tuple(_dcnv3_bwd_p.bind(grad_out, *residuals, geometry=geometry,
                                 deterministic=deterministic, fallback=fallback))


_dcnv3.defvjp(_dcnv3_fwd, _dcnv3_vjp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dcnv4(inputs, offset_mask, geometry, deterministic, fallback):
  del deterministic
  return _dcnv4_p.bind(inputs, offset_mask, geometry=geometry, fallback=fallback)


def _dcnv4_fwd(inputs, offset_mask, geometry, deterministic, fallback):
  return (_dcnv4(inputs, offset_mask, geometry, deterministic, fallback),
          (inputs, offset_mask))


def _dcnv4_vjp(geometry, deterministic, fallback, residuals, grad_out):
  return tuple(_dcnv4_bwd_p.bind(grad_out, *residuals, geometry=geometry,
                                 deterministic=deterministic, fallback=fallback))


_dcnv4.defvjp(_dcnv4_fwd, _dcnv4_vjp)


def dcnv3(inputs: jax.Array, offsets: jax.Array, mask: jax.Array, geometry, *,
          deterministic_backward: bool, fallback: Callable | None) -> jax.Array:
  """DCNv3 by the fused native kernels (arguments already checked).

  Args:
    inputs: ``[N, H, W, C]`` in a floating dtype ``T``.
    offsets: ``[N, Ho, Wo, G * P * 2]`` in ``T``, channel order ``(g, p, (dx, dy))``.
    mask: ``[N, Ho, Wo, G * P]`` in ``T``.
    geometry: the static :class:`~flaxdcn._geometry.Dcnv3Geometry`.
    deterministic_backward: the CUDA backward sums grad-inputs in fixed point instead of with
      float atomics (bitwise reproducible); the CPU backward always is.
    fallback: ``fallback(inputs, offsets, mask, geometry)``, lowered on platforms without native
      kernels; None (``implementation="ffi"``) makes those platforms an error.

  Returns:
    ``[N, Ho, Wo, C]`` in ``T``; differentiable in all three arguments.
  """
  return _dcnv3(inputs, offsets, mask, geometry, bool(deterministic_backward), fallback)


def dcnv4(inputs: jax.Array, offset_mask: jax.Array, geometry, *, deterministic_backward: bool,
          fallback: Callable | None) -> jax.Array:
  """DCNv4 by the fused native kernels: :func:`dcnv3` with ``offset_mask [N, Ho, Wo, D]`` (its
  padding channels get zero gradient); ``fallback(inputs, offset_mask, geometry)``."""
  return _dcnv4(inputs, offset_mask, geometry, bool(deterministic_backward), fallback)
