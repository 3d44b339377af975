"""Flax NNX modules: the twins of the linen modules, with ``flax.nnx.Conv``-style signatures,
and the transfer of weights to and from linen ``params`` trees."""

from flaxdcn.nnx.conv import DeformConv as DeformConv
from flaxdcn.nnx.conv import ModulatedDeformConv as ModulatedDeformConv
from flaxdcn.nnx.dcnv3 import DCNv3 as DCNv3
from flaxdcn.nnx.dcnv3 import DCNv4 as DCNv4
from flaxdcn.nnx.deformable_kernel import GlobalDeformableKernel as GlobalDeformableKernel
from flaxdcn.nnx.deformable_kernel import LocalDeformableKernel as LocalDeformableKernel
from flaxdcn.nnx.ms_deform_attn import MSDeformAttn as MSDeformAttn
from flaxdcn.nnx.roi_pool import DeformRoIPool as DeformRoIPool
from flaxdcn.nnx.roi_pool import ModulatedDeformRoIPool as ModulatedDeformRoIPool
from flaxdcn.nnx.transfer import linen_params as linen_params
from flaxdcn.nnx.transfer import load_linen_params as load_linen_params
