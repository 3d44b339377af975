"""The native kernels (``implementation="ffi"``): against the jnp implementation, small NumPy loops
and each other, through every transformation the FFI layer promises.

The CPU tests run wherever the CPU kernels are built; ``@pytest.mark.cuda`` tests need a GPU and a
CUDA build and compare the CUDA kernels with the jnp implementation and, when importable, with
``torchvision.ops.deform_conv2d``.
"""

import functools
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxdcn
from flaxdcn import _ffi
from flaxdcn._geometry import ConvGeometry, Dcnv3Geometry, MsDeformAttnGeometry, RoIPoolGeometry
from flaxdcn.ops import _xla_conv
from flaxdcn.ops import _xla_roi_pool
from cuda_testing import (assert_same_on_gpu_and_cpu, on_device, requires_gpu, torch_full_float32,
                          vjp_in_separate_programs)
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not _ffi.available("cpu"), reason="native CPU kernels not built")

DTYPES = [
    pytest.param(jnp.float32, id="f32"),
    pytest.param(jnp.float64, id="f64"),
    pytest.param(jnp.float16, id="f16"),
    pytest.param(jnp.bfloat16, id="bf16"),
]


def _x64(dtype):
  """float64 needs x64 enabled while its arrays are made and its programs traced."""
  return jax.enable_x64(jnp.dtype(dtype) == jnp.float64)


# --- Convolution sampling ------------------------------------------------------------------------

#: (N, (H, W), C, kernel, strides, padding, dilation, offset groups, mask).
CONV_CASES = [
    pytest.param((2, (7, 6), 6, (3, 2), (2, 1), ((1, 0), (0, 2)), (2, 1), 3, True), id="odd-G3"),
    pytest.param((3, (5, 5), 4, (3, 3), (1, 1), "SAME", (1, 1), 1, False), id="same-dcnv1"),
    # One image and 48 (40) channels: the CPU backward splits channels into blocks of 16 (20),
    # so per-block reductions are summed across blocks, and 20 has a ragged SIMD tail.
    pytest.param((1, (6, 5), 48, (3, 3), (1, 1), 1, (1, 1), 1, True), id="blocks-C48"),
    pytest.param((1, (4, 7), 40, (2, 2), (1, 2), 0, (1, 1), 1, False), id="blocks-C40"),
    pytest.param((2, (3, 4), 10, (1, 1), (1, 1), "VALID", (1, 1), 2, True), id="1x1-Cg5"),
]


def conv_setup(case, dtype, seed=0, offset_scale=2.0):
  n, size, channels, kernel, strides, padding, dilation, groups, has_mask = case
  geometry = ConvGeometry.create(size, kernel, strides, padding, dilation, groups, fn="test")
  ho, wo = geometry.out_size
  k = kernel[0] * kernel[1]
  rng = np.random.default_rng(seed)
  inputs = rng.normal(size=(n, *size, channels))
  offsets = offset_scale * rng.normal(size=(n, ho, wo, groups * k * 2))
  mask = rng.uniform(size=(n, ho, wo, groups * k)) if has_mask else None
  cotangent = rng.normal(size=(n, ho, wo, k, channels))
  arrays = [jnp.asarray(a, dtype) if a is not None else None
            for a in (inputs, offsets, mask, cotangent)]
  return geometry, arrays


def im2col(implementation, inputs, offsets, mask, geometry, deterministic=False):
  if implementation == "xla":
    return _xla_conv.deform_im2col(inputs, offsets, mask, geometry)
  return _ffi.deform_im2col(inputs, offsets, mask, geometry,
                            deterministic_backward=deterministic, fallback=None)


def im2col_vjp(implementation, inputs, offsets, mask, geometry, cotangent, deterministic=False):
  """Columns and the gradients of <columns, cotangent> w.r.t. inputs, offsets (and mask)."""
  if mask is None:
    fn = lambda x, o: im2col(implementation, x, o, None, geometry, deterministic)
    primals = (inputs, offsets)
  else:
    fn = lambda x, o, m: im2col(implementation, x, o, m, geometry, deterministic)
    primals = (inputs, offsets, mask)
  out, vjp = jax.vjp(fn, *primals)
  return out, vjp(cotangent)


def loop_im2col(inputs, offsets, mask, geometry):
  """NumPy float64 loop of the sampling contract (docs/ops/deform_conv.md)."""
  n, height, width, channels = inputs.shape
  (ho, wo), (kh, kw) = geometry.out_size, geometry.kernel_size
  (sh, sw), (dh, dw), groups = geometry.strides, geometry.dilation, geometry.offset_groups
  (ph, _), (pw, _) = geometry.padding
  cg = channels // groups
  out = np.zeros((n, ho, wo, kh * kw, channels))
  for b, y, x, i, j, g in np.ndindex(n, ho, wo, kh, kw, groups):
    point = g * kh * kw + i * kw + j
    h = y * sh - ph + i * dh + offsets[b, y, x, 2 * point]
    w = x * sw - pw + j * dw + offsets[b, y, x, 2 * point + 1]
    if not (-1 < h < height and -1 < w < width):
      continue
    h0, w0 = math.floor(h), math.floor(w)
    value = np.zeros(cg)
    lh, lw = h - h0, w - w0
    for r, c, weight in ((h0, w0, (1 - lh) * (1 - lw)), (h0, w0 + 1, (1 - lh) * lw),
                         (h0 + 1, w0, lh * (1 - lw)), (h0 + 1, w0 + 1, lh * lw)):
      if 0 <= r < height and 0 <= c < width:
        value += weight * inputs[b, r, c, g * cg:(g + 1) * cg]
    scale = 1.0 if mask is None else mask[b, y, x, point]
    out[b, y, x, i * kw + j, g * cg:(g + 1) * cg] = scale * value
  return out


def test_build_info():
  info = _ffi.build_info()
  assert info["cpu"] is True and _ffi.available("cpu")
  assert _ffi.available("cuda") == info["cuda"] == _ffi.available("gpu")
  # Built against the oldest supported jaxlib (0.10.x, XLA FFI API 0.3): runs on newer ones.
  assert info["ffi_api"] == (0, 3)


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("FLAXDCN_CUDA", "").lower()
                    in ("off", "0", "false", "no"),
                    reason="no nvcc on PATH (or FLAXDCN_CUDA=off): a CPU-only build is expected")
def test_cuda_kernels_compiled_where_nvcc_is_present():
  """With nvcc on the machine, `pip install` must have compiled the CUDA kernels (auto mode):
  this is what proves, on GPU-less CI, that the CUDA code builds."""
  info = _ffi.build_info()
  assert info["cuda"] is True, info
  if "FLAXDCN_CUDA_ARCHITECTURES" not in os.environ:
    assert info["cuda_architectures"] == "80-real,90-real,90-virtual", info


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_im2col_matches_xla(case, dtype):
  """Forward and gradients for inputs, offsets and mask, under jit, ffi vs the jnp sampling."""
  with _x64(dtype):
    geometry, (inputs, offsets, mask, cotangent) = conv_setup(case, dtype)
    run = jax.jit(functools.partial(im2col_vjp, geometry=geometry), static_argnums=0)
    out_ffi, grads_ffi = run("ffi", inputs, offsets, mask, cotangent=cotangent)
    out_xla, grads_xla = run("xla", inputs, offsets, mask, cotangent=cotangent)
    assert out_ffi.dtype == dtype and out_ffi.shape == out_xla.shape
    assert_close(out_ffi, out_xla, dtype, err_msg="columns")
    for name, g_ffi, g_xla in zip(("inputs", "offsets", "mask"), grads_ffi, grads_xla):
      assert g_ffi.dtype == dtype
      assert_close(g_ffi, g_xla, dtype, err_msg=f"grad {name}")


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_im2col_matches_loop(case):
  with jax.enable_x64(True):
    geometry, (inputs, offsets, mask, _) = conv_setup(case, jnp.float64, seed=1)
    out = im2col("ffi", inputs, offsets, mask, geometry)
    expected = loop_im2col(*(None if a is None else np.asarray(a) for a in (inputs, offsets, mask)),
                           geometry)
    assert_close(out, expected, jnp.float64)


#: Sample coordinates at and around the boundary rule's edges (H = W = 4): exactly -1 and H
#: (dropped), just inside, integers (one corner weight 0), H - 1 (bottom corners outside), huge,
#: infinite and NaN.
SPECIAL = [-1.0, -1 + 2**-20, -0.5, 0.0, 1.0, 2.25, 3.0, 3.5, 4 - 2**-20, 4.0, 1e30, -1e30,
           np.inf, -np.inf, np.nan]


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, id="f32"),
                                   pytest.param(jnp.float64, id="f64")])
def test_boundary_and_non_finite_coordinates(dtype):
  """Every pair of special coordinates: values equal the loop, gradients equal the jnp sampling's
  and are finite (0 for dropped samples)."""
  with _x64(dtype):
    size = 4
    geometry = ConvGeometry.create((size, size), (1, 1), 1, "VALID", 1, 1, fn="test")
    rng = np.random.default_rng(2)
    grid_h, grid_w = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    pairs = [(h, w) for h in SPECIAL for w in SPECIAL]
    n = -(-len(pairs) // (size * size))
    target = np.full((n * size * size, 2), 0.5)
    target[:len(pairs)] = pairs
    target = target.reshape(n, size, size, 2)
    with np.errstate(invalid="ignore"):
      offsets = target - np.stack([grid_h, grid_w], -1)  # base + offset = target
    inputs = rng.normal(size=(n, size, size, 3))
    mask = rng.uniform(size=(n, size, size, 1))
    cotangent = rng.normal(size=(n, size, size, 1, 3))
    args = [jnp.asarray(a, dtype) for a in (inputs, offsets, mask)]
    out, grads = im2col_vjp("ffi", *args, geometry, jnp.asarray(cotangent, dtype))
    out_xla, grads_xla = im2col_vjp("xla", *args, geometry, jnp.asarray(cotangent, dtype))
    assert_close(out, loop_im2col(inputs, offsets, mask, geometry), dtype)
    for g, g_xla in zip(grads, grads_xla):
      assert np.all(np.isfinite(g))
      assert_close(g, g_xla, dtype)
    dropped = ~((target > -1) & (target < size)).all(-1)
    assert np.all(np.asarray(grads[1])[dropped] == 0) and np.all(np.asarray(grads[2])[dropped] == 0)


def test_non_finite_offsets_do_not_touch_other_samples():
  """NaN, Inf and huge offsets give the same columns and gradients as an offset far outside the
  image: nothing leaks into other samples, and no read or write goes out of bounds."""
  case = CONV_CASES[0].values[0]
  geometry, (inputs, offsets, mask, cotangent) = conv_setup(case, jnp.float32, seed=3)
  bad = np.random.default_rng(4).random(offsets.shape) < 0.2
  values = np.random.default_rng(5).choice([np.nan, np.inf, -np.inf, 1e30, -3e38], offsets.shape)
  poisoned = jnp.where(bad, values, offsets)
  far = jnp.where(bad, 1e6, offsets)
  out_bad, grads_bad = im2col_vjp("ffi", inputs, poisoned, mask, geometry, cotangent)
  out_far, grads_far = im2col_vjp("ffi", inputs, far, mask, geometry, cotangent)
  np.testing.assert_array_equal(out_bad, out_far)
  for g_bad, g_far in zip(grads_bad, grads_far):
    assert np.all(np.isfinite(g_bad))
    np.testing.assert_array_equal(g_bad, g_far)


def test_cpu_backward_is_deterministic():
  """Bitwise equal runs; deterministic_backward=True (a CUDA option) changes nothing on CPU."""
  case = CONV_CASES[2].values[0]
  geometry, (inputs, offsets, mask, cotangent) = conv_setup(case, jnp.float32, seed=6)
  first = jax.tree_util.tree_leaves(jax.jit(functools.partial(
      im2col_vjp, "ffi", geometry=geometry))(inputs, offsets, mask, cotangent=cotangent))
  for deterministic in (False, True, False):
    run = jax.jit(functools.partial(im2col_vjp, "ffi", geometry=geometry,
                                    deterministic=deterministic))
    again = jax.tree_util.tree_leaves(run(inputs, offsets, mask, cotangent=cotangent))
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a, b)


def test_empty_batch():
  geometry = ConvGeometry.create((5, 4), (3, 3), 1, 1, 1, 2, fn="test")
  inputs = jnp.zeros((0, 5, 4, 6))
  offsets = jnp.zeros((0, 5, 4, 36))
  mask = jnp.zeros((0, 5, 4, 18))
  out, grads = im2col_vjp("ffi", inputs, offsets, mask, geometry, jnp.zeros((0, 5, 4, 9, 6)))
  assert out.shape == (0, 5, 4, 9, 6)
  assert [g.shape for g in grads] == [inputs.shape, offsets.shape, mask.shape]


# --- Transformations through the public op -------------------------------------------------------

def conv_args(batch_shape, seed=7):
  rng = np.random.default_rng(seed)
  shape = lambda *s: batch_shape + s
  inputs = jnp.asarray(rng.normal(size=shape(5, 6, 4)), jnp.float32)
  offsets = jnp.asarray(2 * rng.normal(size=shape(5, 6, 2 * 9 * 2)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=shape(5, 6, 2 * 9)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 3)), jnp.float32)
  return inputs, offsets, mask, kernel


def conv(inputs, offsets, mask, kernel, implementation="ffi"):
  return flaxdcn.deform_conv2d(inputs, offsets, kernel, mask, padding="SAME",
                               offset_group_count=2, implementation=implementation)


def conv_loss(inputs, offsets, mask, kernel):
  return jnp.sum(jnp.sin(conv(inputs, offsets, mask, kernel)))


conv_grad = jax.grad(conv_loss, argnums=(0, 1, 2, 3))


def test_vmap_and_vmap_of_vmap():
  inputs, offsets, mask, kernel = conv_args((2, 3, 2))  # two vmapped axes over a batch of 2
  nested = jax.jit(jax.vmap(jax.vmap(conv, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, None)))
  out = nested(inputs, offsets, mask, kernel)
  flat = conv(*(a.reshape((-1,) + a.shape[3:]) for a in (inputs, offsets, mask)), kernel)
  assert_close(out, flat.reshape(out.shape), jnp.float32)
  # A vmapped axis that is not the leading one.
  swap = lambda a: jnp.moveaxis(a, 0, 1)
  moved = jax.vmap(conv, in_axes=(1, 1, 1, None), out_axes=1)(
      swap(inputs[:, 0]), swap(offsets[:, 0]), swap(mask[:, 0]), kernel)
  assert_close(moved, swap(out[:, 0]), jnp.float32)
  # Inputs shared by every member, offsets and mask vmapped.
  shared = jax.vmap(conv, in_axes=(None, 0, 0, None))(inputs[0, 0], offsets[:, 0], mask[:, 0],
                                                       kernel)
  for b in range(2):
    assert_close(shared[b], conv(inputs[0, 0], offsets[b, 0], mask[b, 0], kernel), jnp.float32)


def test_grad_of_vmap_and_vmap_of_grad():
  inputs, offsets, mask, kernel = conv_args((3, 2))
  expected = [conv_grad(inputs[b], offsets[b], mask[b], kernel) for b in range(3)]
  per_example = jax.jit(jax.vmap(conv_grad, in_axes=(0, 0, 0, None)))(inputs, offsets, mask,
                                                                       kernel)
  for b in range(3):
    for got, want in zip(per_example, expected[b]):
      assert_close(got[b], want, jnp.float32)

  def batched_loss(inputs, offsets, mask, kernel):
    return jnp.sum(jax.vmap(conv_loss, in_axes=(0, 0, 0, None))(inputs, offsets, mask, kernel))
  total = jax.jit(jax.grad(batched_loss, argnums=(0, 1, 2, 3)))(inputs, offsets, mask, kernel)
  for i in range(3):
    assert_close(total[i], jnp.stack([e[i] for e in expected]), jnp.float32)
  assert_close(total[3], sum(e[3] for e in expected), jnp.float32)


def test_remat_and_eager():
  inputs, offsets, mask, kernel = conv_args((2,))
  plain = jax.jit(conv_grad)(inputs, offsets, mask, kernel)
  remat = jax.jit(jax.grad(jax.checkpoint(conv_loss), argnums=(0, 1, 2, 3)))(
      inputs, offsets, mask, kernel)
  eager = conv_grad(inputs, offsets, mask, kernel)
  reference = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(conv(*a, implementation="xla"))),
                               argnums=(0, 1, 2, 3)))(inputs, offsets, mask, kernel)
  for p, r, e, x in zip(plain, remat, eager, reference):
    np.testing.assert_array_equal(p, r)
    # Eager runs XLA's own ops (GEMM, sin, reductions) one by one, unfused: the last bits may
    # differ from the jitted program's, so only the native stages are held to bitwise equality.
    assert_close(e, p, jnp.float32)
    assert_close(p, x, jnp.float32)


# --- Dispatch ------------------------------------------------------------------------------------

def _lower(implementation, platform):
  """The ``jit`` lowering for ``platform`` (any platform lowers without its backend; an export
  would take the jnp path for ``None``: tests/test_export.py)."""
  inputs, offsets, mask, kernel = conv_args((2,))
  fn = jax.jit(functools.partial(conv, implementation=implementation))
  return fn.trace(inputs, offsets, mask, kernel).lower(lowering_platforms=(platform,)).as_text()


NATIVE_CALL = "custom_call @flaxdcn_deform_im2col("


def test_dispatch_is_decided_per_lowered_platform():
  """None: the native call where built (cpu here), the jnp sampling elsewhere; "ffi" where not
  built: a clear error at lowering time."""
  assert NATIVE_CALL in _lower(None, "cpu")
  assert NATIVE_CALL not in _lower(None, "tpu")
  assert NATIVE_CALL not in _lower("xla", "cpu")
  with pytest.raises(NotImplementedError, match="implementation='ffi' needs the native kernels "
                                                "for platform tpu"):
    _lower("ffi", "tpu")


def test_custom_call_carries_batch_partitioning():
  module = _lower("ffi", "cpu")
  assert 'num_batch_dims = "1"' in module
  assert "sdy.sharding_rule" in module


@pytest.mark.skipif(not _ffi.available("cuda"), reason="CUDA kernels not built")
def test_cuda_lowering_uses_the_same_targets():
  module = _lower("ffi", "cuda")
  assert NATIVE_CALL in module and 'num_batch_dims = "1"' in module


# --- Multiple devices ----------------------------------------------------------------------------

@pytest.mark.slow
def test_multidevice_subprocess():
  """Batch-sharded jit (no all-gather, forward and grad), pmap and shard_map with grad on 8 CPU
  devices, in a fresh process (the device count is fixed when jax initialises)."""
  script = os.path.join(os.path.dirname(__file__), "run_ffi_multidevice.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8").strip())
  result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


# --- Deformable RoI pooling ----------------------------------------------------------------------

def loop_roi_pool(features, rois, offsets, geometry):
  """NumPy float64 loop of mmcv's DeformRoIPool (docs/ops/roi_pool.md)."""
  n, height, width, channels = features.shape
  oh, ow = geometry.output_size
  out = np.zeros((len(rois), oh, ow, channels))

  def read(image, y, x):
    if not (-1 <= y <= height and -1 <= x <= width):
      return 0.0
    y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
    y0, x0 = int(y), int(x)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * image[y0, x0] + (1 - ly) * lx * image[y0, x1]
            + ly * (1 - lx) * image[y1, x0] + ly * lx * image[y1, x1])

  for r, (b, *corners) in enumerate(rois):
    if not np.all(np.isfinite(rois[r])) or not -1 < b < n:
      continue
    x1, y1, x2, y2 = (v * geometry.spatial_scale - 0.5 for v in corners)
    roi_h, roi_w = y2 - y1, x2 - x1
    bin_h, bin_w = roi_h / oh, roi_w / ow
    grid_h = geometry.sampling_ratio or math.ceil(bin_h)
    grid_w = geometry.sampling_ratio or math.ceil(bin_w)
    if grid_h <= 0 or grid_w <= 0:
      continue
    for i, j in np.ndindex(oh, ow):
      dy, dx = (0.0, 0.0) if offsets is None else offsets[r, i, j]
      y0 = y1 + i * bin_h + geometry.gamma * roi_h * dy
      x0 = x1 + j * bin_w + geometry.gamma * roi_w * dx
      total = sum(read(features[int(b)], y0 + (iy + 0.5) * bin_h / grid_h,
                       x0 + (ix + 0.5) * bin_w / grid_w)
                  for iy in range(grid_h) for ix in range(grid_w))
      out[r, i, j] = total / (grid_h * grid_w)
  return out


#: RoIs inside, across and outside the image, negative and zero sizes, fractional and invalid
#: batch indices (feature map 9 x 11, spatial scale 0.5).
ROIS = np.array([
    [0, 2.3, 3.1, 15.2, 12.7], [1, -6.0, -4.0, 30.0, 26.0], [0, 4.0, 4.0, 4.5, 5.0],
    [1, 9.0, 8.0, 3.0, 2.0], [0.7, 0.0, 0.0, 21.0, 17.0], [-0.5, 1.0, 1.0, 5.0, 5.0],
    [2, 1.0, 1.0, 5.0, 5.0], [-1, 1.0, 1.0, 5.0, 5.0], [1, 40.0, 30.0, 60.0, 50.0],
    [0, -30.0, -20.0, -2.5, -1.5], [1, 17.5, 13.0, 23.0, 19.0]])


def roi_setup(dtype, sampling_ratio, with_offsets=True, seed=8, channels=5):
  rng = np.random.default_rng(seed)
  geometry = RoIPoolGeometry((9, 11), (3, 2), 0.5, sampling_ratio, 0.1)
  features = rng.normal(size=(2, 9, 11, channels))
  offsets = 2 * rng.normal(size=(len(ROIS), 3, 2, 2)) if with_offsets else None
  cotangent = rng.normal(size=(len(ROIS), 3, 2, channels))
  acc = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
  return geometry, features, offsets, cotangent, acc


def roi_vjp(implementation, features, rois, offsets, geometry, cotangent):
  if implementation == "xla":
    pool = lambda f, o: _xla_roi_pool.deform_roi_pool_xla(f, rois, o, geometry)
  else:
    pool = lambda f, o: _ffi.deform_roi_pool(f, rois, o, geometry, deterministic_backward=False,
                                             fallback=None)
  if offsets is None:
    out, vjp = jax.vjp(lambda f: pool(f, None), features)
  else:
    out, vjp = jax.vjp(pool, features, offsets)
  return out, vjp(cotangent)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_matches_xla(dtype, sampling_ratio):
  with _x64(dtype):
    geometry, features, offsets, cotangent, acc = roi_setup(dtype, sampling_ratio)
    rois = jnp.asarray(ROIS, acc)
    args = [jnp.asarray(a, dtype) for a in (features, offsets, cotangent)]
    run = jax.jit(functools.partial(roi_vjp, geometry=geometry), static_argnums=0)
    out, grads = run("ffi", args[0], rois, args[1], cotangent=args[2])
    out_xla, grads_xla = run("xla", args[0], rois, args[1], cotangent=args[2])
    assert out.dtype == dtype
    assert_close(out, out_xla, dtype, err_msg="pooled")
    for name, g, g_xla in zip(("features", "offsets"), grads, grads_xla):
      assert g.dtype == dtype
      assert_close(g, g_xla, dtype, err_msg=f"grad {name}")


@pytest.mark.parametrize("with_offsets", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 3])
def test_roi_pool_matches_loop(sampling_ratio, with_offsets):
  with jax.enable_x64(True):
    geometry, features, offsets, _, _ = roi_setup(jnp.float64, sampling_ratio, with_offsets)
    out = _ffi.deform_roi_pool(jnp.asarray(features), jnp.asarray(ROIS),
                               None if offsets is None else jnp.asarray(offsets), geometry,
                               deterministic_backward=False, fallback=None)
    assert_close(out, loop_roi_pool(features, ROIS, offsets, geometry), jnp.float64)


def test_roi_pool_non_finite_and_huge():
  """Non-finite RoIs and offsets pool zeros with zero gradients; a RoI of 2e8 pixels (an adaptive
  sub-grid of about 1e14 reads) finishes, reading only where samples can land; other bins are
  untouched."""
  geometry, features, offsets, cotangent, _ = roi_setup(jnp.float32, 0, seed=9)
  non_finite = [[0, np.nan, 1, 5, 5], [1, 1, 1, np.inf, 5], [np.nan, 1, 1, 5, 5]]
  rois = np.concatenate([ROIS, [[0, -1e8, -1e8, 1e8, 1e8]], non_finite])
  extra = len(rois) - len(ROIS)
  offsets = np.concatenate([offsets, np.ones((extra, 3, 2, 2))])
  offsets[0, 0, 0] = [np.nan, 0.5]
  offsets[1, 1, 1] = [np.inf, -np.inf]
  offsets[2, 2, 0] = [1e30, 0.0]
  cotangent = np.concatenate([cotangent, np.ones((extra, 3, 2, 5))])
  args = [jnp.asarray(a, jnp.float32) for a in (features, rois, offsets, cotangent)]
  out, (grad_features, grad_offsets) = roi_vjp("ffi", *args[:3], geometry, args[3])
  assert np.all(np.isfinite(grad_features)) and np.all(np.isfinite(grad_offsets))
  dropped = [(0, 0, 0), (1, 1, 1), (2, 2, 0)] + [(r, i, j) for r in range(len(ROIS) + 1, len(rois))
                                                 for i, j in np.ndindex(3, 2)]
  for index in dropped:
    assert np.all(np.asarray(out)[index] == 0), index
    assert np.all(np.asarray(grad_offsets)[index] == 0), index
  # The finite RoIs, and the features gradient (non-finite RoIs add nothing to it), match the
  # jnp implementation.
  keep = len(ROIS) + 1
  out_xla, (grad_features_xla, grad_offsets_xla) = roi_vjp(
      "xla", args[0], args[1][:keep], args[2][:keep], geometry, args[3][:keep])
  assert_close(out[:keep], out_xla, jnp.float32)
  assert_close(grad_features, grad_features_xla, jnp.float32)
  assert_close(grad_offsets[:keep], grad_offsets_xla, jnp.float32)


def test_roi_pool_empty():
  geometry = RoIPoolGeometry((4, 4), (2, 2), 1.0, 0, 0.1)
  features = jnp.ones((2, 4, 4, 3))
  out, grads = roi_vjp("ffi", features, jnp.zeros((0, 5)), jnp.zeros((0, 2, 2, 2)), geometry,
                       jnp.zeros((0, 2, 2, 3)))
  assert out.shape == (0, 2, 2, 3)
  np.testing.assert_array_equal(grads[0], jnp.zeros_like(features))
  assert grads[1].shape == (0, 2, 2, 2)


def test_roi_pool_vmap():
  """vmap over features, RoIs and offsets, and over RoIs and offsets with shared features: batch
  indices move to each member's images; invalid ones stay invalid."""
  geometry, features, offsets, cotangent, _ = roi_setup(jnp.float32, 0, seed=10)
  rng = np.random.default_rng(11)
  stack = lambda a: jnp.asarray(np.stack([a, a + 0.3 * rng.normal(size=a.shape)]), jnp.float32)
  features_b, offsets_b, cotangent_b = stack(features), stack(offsets), stack(cotangent)
  rois = jnp.asarray(ROIS, jnp.float32)
  vjp = lambda f, r, o, c: roi_vjp("ffi", f, r, o, geometry, c)
  batched = jax.jit(jax.vmap(vjp, in_axes=(0, None, 0, 0)))(features_b, rois, offsets_b,
                                                             cotangent_b)
  shared = jax.jit(jax.vmap(vjp, in_axes=(None, None, 0, 0)))(features_b[0], rois, offsets_b,
                                                               cotangent_b)
  for b in range(2):
    single = vjp(features_b[b], rois, offsets_b[b], cotangent_b[b])
    for got, want in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(single)):
      assert_close(got[b], want, jnp.float32)
    single = vjp(features_b[0], rois, offsets_b[b], cotangent_b[b])
    for got, want in zip(jax.tree_util.tree_leaves(shared), jax.tree_util.tree_leaves(single)):
      assert_close(got[b], want, jnp.float32)


def per_image_setup(dtype, sampling_ratio, seed=12, channels=5):
  """``ROIS`` as per-image boxes ``[2, Ri, 4]`` plus two padding boxes, and the same problem as
  ``[R, 5]`` rows (padding rows get batch index -1)."""
  geometry, features, _, _, acc = roi_setup(dtype, sampling_ratio, channels=channels)
  valid = ROIS[(ROIS[:, 0] == 0) | (ROIS[:, 0] == 1)]
  per_image = [valid[valid[:, 0] == b, 1:] for b in (0, 1)]
  ri = max(len(b) for b in per_image) + 1
  boxes = np.zeros((2, ri, 4))  # all-zero padding boxes where an image has fewer
  for b, rows in enumerate(per_image):
    boxes[b, :len(rows)] = rows
  boxes[1, 0] = [6.0, 2.0, 1.0, 9.0]  # x2 < x1: padding
  pad = ~((boxes[..., 0] < boxes[..., 2]) & (boxes[..., 1] < boxes[..., 3]))
  index = np.where(pad, -1.0, np.arange(2.0)[:, None])
  rows = np.concatenate([index[..., None], boxes], axis=-1).reshape(-1, 5)
  rng = np.random.default_rng(seed)
  offsets = 2 * rng.normal(size=(2, ri, 3, 2, 2))
  cotangent = rng.normal(size=(2, ri, 3, 2, channels))
  return geometry, features, boxes, rows, offsets, cotangent, acc, pad


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_per_image_matches_rows(dtype, sampling_ratio):
  """Per-image boxes through the per-image target equal the same boxes as ``[R, 5]`` rows through
  the row target, forward and VJP; padding boxes pool zeros with zero offset gradients."""
  with _x64(dtype):
    geometry, features, boxes, rows, offsets, cotangent, acc, pad = per_image_setup(
        dtype, sampling_ratio)
    f, o, g = (jnp.asarray(a, dtype) for a in (features, offsets, cotangent))
    run = jax.jit(functools.partial(roi_vjp, "ffi", geometry=geometry))
    out, grads = run(f, jnp.asarray(boxes, acc), o, cotangent=g)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    out_rows, grads_rows = run(f, jnp.asarray(rows, acc), flat(o), cotangent=flat(g))
    assert out.shape == g.shape and out.dtype == dtype
    np.testing.assert_array_equal(flat(out), out_rows)
    np.testing.assert_array_equal(grads[0], grads_rows[0])
    np.testing.assert_array_equal(flat(grads[1]), grads_rows[1])
    assert not np.any(np.asarray(out)[pad]) and not np.any(np.asarray(grads[1])[pad])


def test_roi_pool_per_image_custom_call_is_batch_partitionable():
  """The per-image form lowers to its own target with the batch-partitioning attributes; the
  ``[R, 5]`` form keeps the plain target without them."""
  geometry, features, boxes, rows, offsets, _, _, _ = per_image_setup(jnp.float32, 0)

  def lowered(rois, offsets):
    fn = jax.jit(lambda f, r, o: _ffi.deform_roi_pool(f, r, o, geometry,
                                                      deterministic_backward=False, fallback=None))
    return fn.lower(*(jnp.asarray(a, jnp.float32) for a in (features, rois, offsets))).as_text()
  per_image = lowered(boxes, offsets)
  assert "custom_call @flaxdcn_deform_roi_pool_images(" in per_image
  assert 'num_batch_dims = "1"' in per_image and "sdy.sharding_rule" in per_image
  flat = lowered(rows, offsets.reshape((-1,) + offsets.shape[2:]))
  assert "custom_call @flaxdcn_deform_roi_pool(" in flat and "num_batch_dims" not in flat


def test_roi_pool_per_image_handler_checks_shapes():
  """The handler takes ``Ri`` from the offsets and names the rois that disagree."""
  geometry = RoIPoolGeometry((4, 4), (2, 2), 1.0, 0, 0.1)
  features = jnp.ones((2, 4, 4, 3))
  with pytest.raises(Exception, match=r"flaxdcn_deform_roi_pool: rois has shape \[2, 4, 4\], "
                                      r"expected \[2, 3, 4\]"):
    jax.block_until_ready(_ffi._ROI_POOL_IMAGES.fwd.bind(
        features, jnp.zeros((2, 4, 4)), jnp.zeros((2, 3, 2, 2, 2)), geometry=geometry,
        fallback=None))


# --- The op table --------------------------------------------------------------------------------

def table_case(op, lead, seed=20):
  """Float32 operands of one call of the table row ``op`` over 2 images, each with the extra
  leading axes ``lead`` (to be vmapped), and the row's geometry."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=(*lead, *shape)), jnp.float32)
  if op.target == "flaxdcn_deform_im2col":
    geometry = ConvGeometry.create((5, 4), (3, 2), (1, 1), 1, (1, 1), 2, fn="test")
    ho, wo = geometry.out_size
    return geometry, [normal(2, 5, 4, 4), normal(2, ho, wo, 24), normal(2, ho, wo, 12)]
  if op.target.startswith("flaxdcn_deform_roi_pool"):
    geometry = RoIPoolGeometry((5, 6), (2, 2), 1.0, 2, 0.1)
    boxes = np.array([[0.5, 0.2, 4.5, 3.9], [1.0, 1.5, 5.5, 4.0], [2.0, 0.0, 3.0, 4.8]])
    boxes = jnp.asarray(boxes + 0.3 * rng.uniform(size=(*lead, 2, 3, 4)), jnp.float32)
    features, offsets = normal(2, 5, 6, 3), normal(2, 3, 2, 2, 2)
    if op.target == "flaxdcn_deform_roi_pool_images":
      return geometry, [features, boxes, offsets]
    # Rows of both images, and an index (2) past the images: invalid in every vmap member.
    index = jnp.broadcast_to(jnp.asarray([[0.0], [1.0], [2.0]]), (*lead, 3, 1))
    rows = jnp.concatenate([index, boxes[..., 0, :, :]], axis=-1)
    return geometry, [features, rows, offsets[..., 0, :, :, :, :]]
  if op.target == "flaxdcn_ms_deform_attn":
    geometry = MsDeformAttnGeometry(((3, 4), (2, 1)))
    locations = jnp.asarray(rng.uniform(-0.1, 1.1, size=(*lead, 2, 5, 2, 2, 3, 2)), jnp.float32)
    return geometry, [normal(2, 14, 2, 3), locations, normal(2, 5, 2, 2, 3)]
  assert op.target in ("flaxdcn_dcnv3", "flaxdcn_dcnv4"), f"no case for the row {op.target}"
  geometry = Dcnv3Geometry(ConvGeometry.create((5, 5), (3, 3), (1, 1), 1, (1, 1), 2, fn="test"),
                           0.8, True)
  inputs, points = normal(2, 5, 5, 4), 2 * geometry.num_points
  if op.target == "flaxdcn_dcnv4":
    return geometry, [inputs, normal(2, 5, 5, geometry.offset_mask_channels)]
  return geometry, [inputs, normal(2, 5, 5, points * 2), normal(2, 5, 5, points)]


def table_call(op, geometry):
  return lambda *operands: _ffi._call(op, *operands, geometry=geometry,
                                      deterministic_backward=False, fallback=None)


def table_value_and_grad(op, geometry, operands):
  loss = lambda *operands: jnp.sum(jnp.sin(table_call(op, geometry)(*operands)))
  return jax.value_and_grad(loss, argnums=tuple(i for i in range(len(operands))
                                                if i not in op.nondiff))


OPS = [pytest.param(op, id=op.target) for op in _ffi._OPS]


def test_table_covers_the_native_targets():
  """Every target the native module hands out is a row's forward or backward."""
  rows = {name for op in _ffi._OPS for name in (op.target, op.target + "_bwd")}
  assert set(_ffi._TARGETS["cpu"]) <= rows


@pytest.mark.parametrize("op", OPS)
def test_table_row_lowers_to_its_targets(op):
  """Forward and backward lower to the row's two custom calls, which carry the batch-partitioning
  attributes exactly when the row partitions by batch; such a row's operands and result all lead
  with the image axis (here 2 images; the ``[R, 5]`` form's 3 RoIs do not)."""
  assert {op.target, op.target + "_bwd"} <= set(_ffi._TARGETS["cpu"])
  geometry, operands = table_case(op, ())
  result = jax.eval_shape(table_call(op, geometry), *operands)
  assert op.batch_partitionable == ({a.shape[0] for a in (*operands, result)} == {2})
  text = jax.jit(table_value_and_grad(op, geometry, operands)).lower(*operands).as_text()
  for target in (op.target, op.target + "_bwd"):
    calls = [line for line in text.splitlines() if f"custom_call @{target}(" in line]
    assert len(calls) == 1, text
    assert ('num_batch_dims = "1"' in calls[0]) == op.batch_partitionable, calls[0]
    assert ("sdy.sharding_rule" in calls[0]) == op.batch_partitionable, calls[0]


@pytest.mark.parametrize("shared", [False, True], ids=["batched", "first-shared"])
@pytest.mark.parametrize("op", OPS)
def test_table_row_vmap_of_vmap(op, shared):
  """vmap of vmap of every row's forward and gradient equals one call per member; with
  ``first-shared`` the inner vmap shares the first operand (features / inputs)."""
  geometry, operands = table_case(op, (2, 3))
  if shared:
    operands[0] = operands[0][:, 0]
  inner = (None if shared else 0,) + (0,) * (len(operands) - 1)
  for fn in (table_call(op, geometry), table_value_and_grad(op, geometry, operands)):
    nested = jax.jit(jax.vmap(jax.vmap(fn, in_axes=inner)))(*operands)
    for i, j in np.ndindex(2, 3):
      member = [a[i] if shared and k == 0 else a[i, j] for k, a in enumerate(operands)]
      want = jax.jit(fn)(*member)
      for got, expected in zip(jax.tree_util.tree_leaves(nested), jax.tree_util.tree_leaves(want)):
        assert_close(got[i, j], expected, jnp.float32, err_msg=f"{op.target} member {i, j}")


# --- CUDA ----------------------------------------------------------------------------------------
# Collected everywhere, skipped without a GPU; .ci/gpu-check runs every ``cuda`` test of tests/.
# conftest.py runs their float32 matmuls at full precision (not TF32). The ``compute_sanitizer``
# tests are the small subset that .ci/gpu-check also runs under compute-sanitizer.

cuda = pytest.mark.cuda


@cuda
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_im2col_matches_xla(case, dtype, deterministic):
  """CUDA forward and gradients (atomic and fixed-point grad-input sums) against the jnp sampling
  on the GPU; the deterministic backward is bitwise reproducible."""
  with _x64(dtype):
    geometry, arrays = conv_setup(case, dtype)
    inputs, offsets, mask, cotangent = on_device(jax.devices("gpu")[0], *arrays)
    run = jax.jit(functools.partial(im2col_vjp, geometry=geometry, deterministic=deterministic),
                  static_argnums=0)
    out, grads = run("ffi", inputs, offsets, mask, cotangent=cotangent)
    out_xla, grads_xla = run("xla", inputs, offsets, mask, cotangent=cotangent)
    assert_close(out, out_xla, dtype)
    for g, g_xla in zip(grads, grads_xla):
      assert_close(g, g_xla, dtype)
    if deterministic:
      for a, b in zip(grads, run("ffi", inputs, offsets, mask, cotangent=cotangent)[1]):
        np.testing.assert_array_equal(a, b)


@cuda
@requires_gpu
@pytest.mark.parametrize("channels", [5, 16], ids=["C5", "C16"])  # C16: the vector kernels
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_roi_pool_matches_xla(dtype, deterministic, channels):
  with _x64(dtype):
    geometry, features, offsets, cotangent, acc = roi_setup(dtype, 0, channels=channels)
    gpu = jax.devices("gpu")[0]
    f, o, g = on_device(gpu, features, offsets, cotangent, dtype=dtype)
    (rois,) = on_device(gpu, ROIS, dtype=acc)

    def run(implementation):
      if implementation == "xla":
        pool = lambda f, o: _xla_roi_pool.deform_roi_pool_xla(f, rois, o, geometry)
      else:
        pool = lambda f, o: _ffi.deform_roi_pool(f, rois, o, geometry,
                                                 deterministic_backward=deterministic,
                                                 fallback=None)
      out, vjp = jax.vjp(pool, f, o)
      return out, vjp(g)
    out, grads = jax.jit(lambda: run("ffi"))()
    out_xla, grads_xla = jax.jit(lambda: run("xla"))()
    assert_close(out, out_xla, dtype)
    for a, b in zip(grads, grads_xla):
      assert_close(a, b, dtype)
    if deterministic:
      for a, b in zip(grads, jax.jit(lambda: run("ffi"))()[1]):
        np.testing.assert_array_equal(a, b)


@cuda
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_cuda_roi_pool_per_image_matches_cpu(sampling_ratio, deterministic):
  """Per-image boxes (padding included) on the GPU equal the CPU kernels, forward and VJP."""
  geometry, features, boxes, _, offsets, cotangent, _, _ = per_image_setup(jnp.float32,
                                                                           sampling_ratio)

  def run(device):
    f, r, o, g = on_device(device, features, boxes, offsets, cotangent, dtype=jnp.float32)
    pool = lambda f, o: _ffi.deform_roi_pool(f, r, o, geometry,
                                             deterministic_backward=deterministic, fallback=None)
    out, vjp = jax.vjp(pool, f, o)
    return out, vjp(g)
  gpu_out, gpu_grads = jax.jit(lambda: run(jax.devices("gpu")[0]))()
  cpu_out, cpu_grads = jax.jit(lambda: run(jax.devices("cpu")[0]))()
  assert_close(gpu_out, cpu_out, jnp.float32)
  for a, b in zip(gpu_grads, cpu_grads):
    assert_close(a, b, jnp.float32)


@cuda
@requires_gpu
def test_cuda_matches_torchvision():
  """Odd geometry (symmetric padding: torchvision has no other), feature and offset groups; both
  sides at full float32 (no TF32 on either)."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  if not torch.cuda.is_available():
    pytest.skip("torch has no CUDA device")
  case = (2, (7, 6), 6, (3, 2), (2, 1), ((1, 1), (2, 2)), (2, 1), 3, True)
  geometry, (inputs, offsets, mask, _) = conv_setup(case, jnp.float32, seed=12)
  kh, kw = geometry.kernel_size
  kernel = np.random.default_rng(13).normal(size=(kh, kw, 3, 4)).astype(np.float32)
  ours = flaxdcn.deform_conv2d(*on_device(jax.devices("gpu")[0], inputs, offsets, kernel, mask),
                               strides=geometry.strides, padding=geometry.padding,
                               kernel_dilation=geometry.dilation, feature_group_count=2,
                               offset_group_count=geometry.offset_groups,
                               precision=jax.lax.Precision.HIGHEST, implementation="ffi")
  to_torch = lambda a, *perm: torch.from_numpy(np.ascontiguousarray(
      np.transpose(np.asarray(a), perm))).cuda()
  with torch_full_float32(torch):
    theirs = torchvision.ops.deform_conv2d(
        to_torch(inputs, 0, 3, 1, 2), to_torch(offsets, 0, 3, 1, 2), to_torch(kernel, 3, 2, 0, 1),
        mask=to_torch(mask, 0, 3, 1, 2), stride=geometry.strides,
        padding=(geometry.padding[0][0], geometry.padding[1][0]), dilation=geometry.dilation)
  assert_close(ours, theirs.permute(0, 2, 3, 1).cpu().numpy(), jnp.float32)


#: The compute-sanitizer subset: the scalar kernels in float32 (channels per group not a multiple
#: of 4) and the vector kernels in bfloat16 (a multiple of 8).
SANITIZER_CONV = [
    pytest.param(jnp.float32, CONV_CASES[0].values[0], id="f32-odd-G3"),
    pytest.param(jnp.bfloat16, CONV_CASES[3].values[0], id="bf16-blocks-C40"),
]
SANITIZER_ROI = [pytest.param(jnp.float32, 5, id="f32-C5"),
                 pytest.param(jnp.bfloat16, 16, id="bf16-C16")]


@cuda
@pytest.mark.compute_sanitizer
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype, case", SANITIZER_CONV)
def test_cuda_im2col_separate_programs(dtype, case, deterministic):
  geometry, (inputs, offsets, mask, cotangent) = conv_setup(case, dtype)
  if mask is None:
    fn = lambda x, o: im2col("ffi", x, o, None, geometry, deterministic)
    primals = (inputs, offsets)
  else:
    fn = lambda x, o, m: im2col("ffi", x, o, m, geometry, deterministic)
    primals = (inputs, offsets, mask)
  assert_same_on_gpu_and_cpu(fn, primals, cotangent, dtype)


@cuda
@pytest.mark.compute_sanitizer
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype, channels", SANITIZER_ROI)
@pytest.mark.parametrize("form", ["rows", "per_image"])
def test_cuda_roi_pool_separate_programs(form, dtype, channels, deterministic):
  """Both RoI forms; the boxes are an argument of their own (not a constant of the program), and
  their gradient is zero by definition."""
  if form == "rows":
    geometry, features, offsets, cotangent, _ = roi_setup(dtype, 0, channels=channels)
    rois = ROIS
  else:
    geometry, features, rois, _, offsets, cotangent, _, _ = per_image_setup(dtype, 2,
                                                                            channels=channels)
  fn = lambda f, r, o: _ffi.deform_roi_pool(f, r, o, geometry,
                                            deterministic_backward=deterministic, fallback=None)
  primals = (jnp.asarray(features, dtype), jnp.asarray(rois, jnp.float32),
             jnp.asarray(offsets, dtype))
  cotangent = jnp.asarray(cotangent, dtype)
  (gpu_out, gpu_grads), (cpu_out, cpu_grads) = (
      vjp_in_separate_programs(fn, primals, cotangent, device)
      for device in (jax.devices("gpu")[0], jax.devices("cpu")[0]))
  assert_close(gpu_out, cpu_out, dtype)
  for i in (0, 2):
    assert_close(gpu_grads[i], cpu_grads[i], dtype)
