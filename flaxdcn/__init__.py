"""flaxdcn: deformable convolution (DCNv1, DCNv2), deformable RoI pooling, Deformable Kernels,
DCNv3 and DCNv4 for JAX and Flax: the functional ops and the Flax linen modules.

The NNX modules are in :mod:`flaxdcn.nnx`, the PyTorch checkpoint converters in
:mod:`flaxdcn.convert`.
"""

from flaxdcn._ffi import build_info as build_info
from flaxdcn._ffi import disabled_safety_checks as disabled_safety_checks
from flaxdcn.linen.conv import DeformConv as DeformConv
from flaxdcn.linen.dcnv3 import DCNv3 as DCNv3
from flaxdcn.linen.dcnv3 import DCNv4 as DCNv4
from flaxdcn.linen.conv import ModulatedDeformConv as ModulatedDeformConv
from flaxdcn.linen.deformable_kernel import GlobalDeformableKernel as GlobalDeformableKernel
from flaxdcn.linen.deformable_kernel import LocalDeformableKernel as LocalDeformableKernel
from flaxdcn.linen.ms_deform_attn import MSDeformAttn as MSDeformAttn
from flaxdcn.linen.roi_pool import DeformRoIPool as DeformRoIPool
from flaxdcn.linen.roi_pool import ModulatedDeformRoIPool as ModulatedDeformRoIPool
from flaxdcn.ops.dcnv3 import dcnv3 as dcnv3
from flaxdcn.ops.dcnv3 import dcnv4 as dcnv4
from flaxdcn.ops.deform_conv import deform_conv2d as deform_conv2d
from flaxdcn.ops.deformable_kernel import deformable_kernel_conv2d as deformable_kernel_conv2d
from flaxdcn.ops.ms_deform_attn import ms_deform_attn as ms_deform_attn
from flaxdcn.ops.roi_pool import deform_roi_pool as deform_roi_pool

__version__ = "0.1.0"

#: Subpackages imported on first attribute access (``flaxdcn.nnx`` imports ``flax.nnx``, which
#: ``import flaxdcn`` does not need).
_LAZY_SUBMODULES = ("nnx",)


def __getattr__(name: str):
  if name in _LAZY_SUBMODULES:
    import importlib
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
