// Every FFI target of the module: its name and the stem of its handler symbols, Flaxdcn<Stem>Cpu
// (cpu/<op>_ffi.cc) and Flaxdcn<Stem>Cuda (cuda/<op>_ffi.cc, when built with FLAXDCN_WITH_CUDA).
// module.cc registers each target on every platform of the build from this one table.

#ifndef FLAXDCN_XLA_EXT_COMMON_HANDLERS_H_
#define FLAXDCN_XLA_EXT_COMMON_HANDLERS_H_

#include "xla/ffi/api/ffi.h"

// X(target name, handler symbol stem) for every target.
#define FLAXDCN_FOR_EACH_TARGET(X)                           \
  X("flaxdcn_deform_im2col", DeformIm2col)                   \
  X("flaxdcn_deform_im2col_bwd", DeformIm2colBwd)            \
  X("flaxdcn_deform_roi_pool", DeformRoiPool)                \
  X("flaxdcn_deform_roi_pool_bwd", DeformRoiPoolBwd)         \
  X("flaxdcn_dcnv3", Dcnv3)                                  \
  X("flaxdcn_dcnv3_bwd", Dcnv3Bwd)                           \
  X("flaxdcn_dcnv4", Dcnv4)                                  \
  X("flaxdcn_dcnv4_bwd", Dcnv4Bwd)                           \
  X("flaxdcn_ms_deform_attn", MsDeformAttn)                  \
  X("flaxdcn_ms_deform_attn_bwd", MsDeformAttnBwd)

#define FLAXDCN_DECLARE_CPU_HANDLER(name, stem) XLA_FFI_DECLARE_HANDLER_SYMBOL(Flaxdcn##stem##Cpu);
FLAXDCN_FOR_EACH_TARGET(FLAXDCN_DECLARE_CPU_HANDLER)
#undef FLAXDCN_DECLARE_CPU_HANDLER

#ifdef FLAXDCN_WITH_CUDA
#define FLAXDCN_DECLARE_CUDA_HANDLER(name, stem) \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(Flaxdcn##stem##Cuda);
FLAXDCN_FOR_EACH_TARGET(FLAXDCN_DECLARE_CUDA_HANDLER)
#undef FLAXDCN_DECLARE_CUDA_HANDLER
#endif

// Defines the handler symbol Flaxdcn<stem><backend> (in <backend>/<op>_ffi.cc): the handler body
// flaxdcn::<stem> and the binding flaxdcn::<stem>Binding of common/<op>_ffi.h on the backend's
// context `device`.
#define FLAXDCN_DEFINE_HANDLER(stem, backend, device)                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Flaxdcn##stem##backend, ::flaxdcn::stem<device>, \
                                ::flaxdcn::stem##Binding<device>())

#endif  // FLAXDCN_XLA_EXT_COMMON_HANDLERS_H_
