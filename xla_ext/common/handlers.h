// The XLA FFI handler symbols (CPU always; CUDA when built with FLAXDCN_WITH_CUDA).

#ifndef FLAXDCN_XLA_EXT_OPS_H_
#define FLAXDCN_XLA_EXT_OPS_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(FlaxdcnDeformIm2colCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlaxdcnDeformIm2colBwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlaxdcnDeformRoiPoolCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlaxdcnDeformRoiPoolBwdCpu);

#ifdef FLAXDCN_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlaxdcnDeformIm2colCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlaxdcnDeformIm2colBwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlaxdcnDeformRoiPoolCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlaxdcnDeformRoiPoolBwdCuda);
#endif

#endif  // FLAXDCN_XLA_EXT_OPS_H_
